"""Reporting and timing helpers shared by the benchmark scripts.

Tables as plain text (`text_table`) or GitHub markdown (`markdown_table`), rows
written as JSON (`write_json`), the machine in one line (`machine_description`),
the CPUs this process may use (`cpu_threads`), the check of command-line choices
(`check_choices`), and timing: calls run round-robin (`time_round_robin`), a
compiled function called until its result is ready (`call_and_block`), the
quartiles of the samples (`quartiles`).

The first `left` columns of a table are left-aligned, the others right-aligned:

>>> header, body = ["model", "ms"], [["resnet18", "12.5"], ["vit", "3.0"]]
>>> print(text_table(header, body, left=1))
model       ms
--------------
resnet18  12.5
vit        3.0
>>> print(markdown_table(header, body, left=1))
| model | ms |
|---|---:|
| resnet18 | 12.5 |
| vit | 3.0 |
>>> check_choices("model", ["resnet18"], ["resnet18", "vit"])  # passes silently
>>> check_choices("model", ["vgg"], ["resnet18", "vit"])
Traceback (most recent call last):
  ...
ValueError: Unknown model 'vgg'; valid choices: resnet18, vit.
"""

import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax


def text_table(
    header: Sequence[str],
    body: Sequence[Sequence[str]],
    left: int = 3,
    sections: Sequence[Any] | None = None,
) -> str:
    """A plain-text table: the first `left` columns left-aligned, the others right-aligned.

    Args:
      header: the column names.
      body: the rows, one string per column each.
      left: how many leading columns are left-aligned.
      sections: one key per body row; a blank line goes where the key changes.

    Returns:
      The header, a line of dashes as long as the header, and the rows; trailing
      spaces stripped.
    """
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]

    def line(cells):
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [line(header), "-" * len(line(header))]
    keys = list(sections) if sections is not None else [None] * len(body)
    for i, cells in enumerate(body):
        if i and keys[i] != keys[i - 1]:
            out.append("")
        out.append(line(cells))
    return "\n".join(out)


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]], left: int = 3) -> str:
    """A GitHub markdown table: the first `left` columns left-aligned, the others right.

    Args:
      header: the column names.
      body: the rows, one string per column each.
      left: how many leading columns are left-aligned (`---`; the others `---:`).
    """
    align = ["---" if i < left else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])


def write_json(path: str, rows: Sequence[dict[str, Any]]) -> None:
    """Writes the rows to `path` as a JSON list of dicts (indent 2, final newline)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(list(rows), f, indent=2)
        f.write("\n")


def machine_description() -> str:
    """Platform, CPU count, accelerator kind, jax version and date."""
    device = jax.devices()[0]
    return (
        f"{platform.platform()}, {os.cpu_count()} CPUs, {len(jax.devices())}x "
        f"{device.device_kind} ({device.platform}), jax {jax.__version__}, "
        f"{datetime.date.today().isoformat()}"
    )


def cpu_threads() -> int:
    """The CPUs this process may run on: the size of XLA's CPU thread pool."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
    """`python benchmarks/<script> <arguments>` as a shell runs it again (an empty one quoted).

    `argv`: the arguments (default: this process's).
    """
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", f"benchmarks/{script}", *args])


def parse_list(text: str) -> list[str]:
    """`"a, b,,c"` -> `["a", "b", "c"]`: a comma-separated flag's items."""
    return [x.strip() for x in text.split(",") if x.strip()]


def check_choices(what: str, values: Sequence[str], valid: Sequence[str]) -> None:
    """Raises if a value is not among the valid ones.

    Args:
      what: what the values are, for the message (`"model"`, `"XLA variant"`).
      values: the values given.
      valid: the valid choices.

    Raises:
      ValueError: naming every unknown value and every valid choice.
    """
    unknown = [v for v in values if v not in valid]
    if unknown:
        raise ValueError(
            f"Unknown {what} {', '.join(map(repr, unknown))}; valid choices: {', '.join(valid)}."
        )


def time_round_robin(
    fns: Sequence[Callable[[], Any]],
    *,
    steps: int,
    warmup: int,
    pause: float,
    cpu_times: list[list[float]] | None = None,
) -> list[list[float]]:
    """Wall milliseconds of each call, calling every function once per round.

    Each call is preceded by `pause` seconds of sleep, so the worker threads of
    the framework that ran before (OpenMP threads spin-wait after a parallel
    region) are idle and do not take CPU from the next one. If `cpu_times` is
    given, the process CPU milliseconds (all threads) of each call are appended
    to it: CPU / wall near 1 means a call kept one core busy, near N all N.

    Args:
      fns: the functions timed, called without arguments.
      steps: timed rounds.
      warmup: untimed rounds before them.
      pause: seconds of sleep before each call.
      cpu_times: if given, replaced by one list of CPU milliseconds per function.

    Returns:
      One list of `steps` wall milliseconds per function, in the order of `fns`.
    """
    times: list[list[float]] = [[] for _ in fns]
    if cpu_times is not None:
        cpu_times[:] = [[] for _ in fns]
    for round_ in range(warmup + steps):
        for i, fn in enumerate(fns):
            time.sleep(pause)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            t1, c1 = time.perf_counter(), time.process_time()
            if round_ >= warmup:
                times[i].append(1e3 * (t1 - t0))
                if cpu_times is not None:
                    cpu_times[i].append(1e3 * (c1 - c0))
    return times


def call_and_block(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`, once every array of its result is ready (`jax.block_until_ready`).

    A JAX call returns before its computation ends; timing it needs the wait.
    """
    return jax.block_until_ready(fn(*args))


def quartiles(samples: Sequence[float]) -> tuple[float, float, float]:
    """The first quartile, the median and the third quartile of `samples`.

    Inclusive quantiles (`statistics.quantiles(..., method="inclusive")`): each
    lies between the smallest and the largest sample. One sample is all three.
    """
    if len(samples) < 2:
        return samples[0], samples[0], samples[0]
    q1, q2, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q1, q2, q3
