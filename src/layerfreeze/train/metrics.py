"""Training metrics that survive a crash: a JSON-lines log and an averaging window.

* `MetricsWriter` appends one JSON object per row (`{"step": 100, "split":
  "train", "loss": 0.41, ...}`) to a file. Reopened to resume from a
  checkpoint, it drops the rows a dead run wrote after that checkpoint, and
  moves lines a crash left unreadable aside instead of failing.
* `Window` averages train metrics between two log rows; its `state()` goes
  into the checkpoint metadata, so a run resumed between two rows writes the
  same next row as one that never stopped.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "metrics.jsonl"
>>> writer, window = MetricsWriter(path), Window()
>>> for step in range(4):
...     window.add({"loss": 1.0 / 2**step}, examples=32)
...     if (step + 1) % 2 == 0:
...         _ = writer.write({"step": step + 1, "split": "train", **window.mean()})
...         window.reset()
>>> [(r["step"], r["loss"]) for r in writer.rows()]
[(2, 0.75), (4, 0.1875)]
"""

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Self

import numpy as np

from layerfreeze import _checks

__all__ = ["MetricsWriter", "Window", "read_rows"]

_log = logging.getLogger(__name__)

# Bytes that are not UTF-8 (a crash can leave zeros or garbage) survive a round
# trip through str, so unreadable lines are moved aside byte for byte.
_ERRORS = "surrogateescape"
# Non-finite floats in `Window.state()`, which must be strict JSON (checkpoint metadata).
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def read_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a metrics file, skipping lines that are not rows.

    A row is a JSON object with an integer `step`. Other non-blank lines (a
    line cut by a crash) are skipped with a warning and left in the file
    (`MetricsWriter` moves them aside when it opens the file).

    Args:
      path: a JSON-lines file, e.g. written by `MetricsWriter`.

    Returns:
      The rows in file order; `[]` if the file does not exist.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "m.jsonl"
    >>> _ = path.write_text('{"step": 1, "loss": 0.5}\\n{"step": 2, "lo')
    >>> read_rows(path)
    [{'step': 1, 'loss': 0.5}]
    """
    path = Path(path)
    if not path.exists():
        return []
    rows, bad = [], 0
    for line in _lines(path):
        if not line.strip():
            continue
        row = _parse_row(line)
        if row is None:
            bad += 1
        else:
            rows.append(row)
    if bad:
        _log.warning("Skipped %d unreadable line(s) of %s.", bad, path)
    return rows


class MetricsWriter:
    """Appends one JSON object per row to a JSON-lines file, resumably.

    Opening the file to resume from a checkpoint at `resume_step` drops the
    rows a dead run wrote after that checkpoint: a row is kept if its `step`
    is below `resume_step`, or equal to it and its `split` is not `"phase"`
    (a phase row at the resume step is written again when the resumed loop
    crosses that boundary anew). Opening with `resume_step=0` (a fresh start)
    keeps only rows at step 0 that are not phase rows.

    Lines that are not rows (a JSON object with an integer `step`), such as
    a last line cut by a crash mid-write, never stop a resume: they are
    appended to `<path>.damaged` (nothing is lost), a warning is logged, and
    the readable rows are kept. The file is rewritten atomically (a
    temporary file renamed over it), and only when something changed.

    Duplicate guard: `write` skips a row equal to the last row already in the
    file with the same `step` and `split`, so re-running a finished run (which
    resumes at its last step and evaluates again) does not append its final
    rows twice. A row that differs in any value is always written.

    Args:
      path: the JSON-lines file; created (with its directory) if missing.
      resume_step: the step the run resumes from (its checkpoint's step), 0
        for a fresh start.

    Raises:
      TypeError, ValueError: `resume_step` is not an integer >= 0.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "metrics.jsonl"
    >>> writer = MetricsWriter(path)
    >>> for step in (2, 4, 6):
    ...     _ = writer.write({"step": step, "split": "train", "loss": 1 / step})
    >>> with path.open("a") as f:  # killed mid-write
    ...     _ = f.write('{"step": 8, "spl')
    >>> [r["step"] for r in MetricsWriter(path, resume_step=4).rows()]  # checkpoint at 4
    [2, 4]
    >>> pathlib.Path(f"{path}.damaged").read_text()
    '{"step": 8, "spl\\n'
    """

    def __init__(self, path: str | os.PathLike[str], *, resume_step: int = 0):
        self._path = Path(path)
        self._last: dict[tuple[int, Any], str] = {}
        resume_step = _checks.count("resume_step", resume_step)
        if self._path.exists():
            self._truncate(resume_step)
        else:
            self._path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def path(self) -> Path:
        """The JSON-lines file."""
        return self._path

    @property
    def damaged_path(self) -> Path:
        """Where unreadable lines go: `<path>.damaged`."""
        return self._path.with_name(self._path.name + ".damaged")

    def write(self, row: Mapping[str, Any]) -> bool:
        """Appends `row` as one line, unless it repeats the last row of its step and split.

        Args:
          row: a mapping with string keys and an integer `step`; values are
            JSON values, NumPy or JAX scalars (converted with `.item()`).
            `split` (e.g. `"train"`, `"test"`, `"phase"`) is optional.

        Returns:
          Whether the row was written (False: the duplicate guard skipped it).

        Raises:
          TypeError: `row` is not such a mapping or holds a value JSON cannot
            represent.
        """
        line = _dumps(row)
        parsed = json.loads(line)
        key, canonical = _key(parsed), _canonical(parsed)
        if self._last.get(key) == canonical:
            return False
        with self._path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
        self._last[key] = canonical
        return True

    def rows(self) -> list[dict[str, Any]]:
        """Every row in the file, in order (see `read_rows`)."""
        return read_rows(self._path)

    def _truncate(self, resume_step: int) -> None:
        raw = self._path.read_bytes().decode("utf-8", _ERRORS)
        kept: list[str] = []
        damaged: list[str] = []
        dropped = 0
        for line in raw.split("\n"):
            if not line.strip():
                continue
            row = _parse_row(line)
            if row is None:
                damaged.append(line)
            elif row["step"] < resume_step or (
                row["step"] == resume_step and row.get("split") != "phase"
            ):
                kept.append(line)
                self._last[_key(row)] = _canonical(row)
            else:
                dropped += 1
        if damaged:
            # Written before the file is rewritten: a crash in between duplicates
            # lines in `.damaged` but loses none.
            with self.damaged_path.open("a", encoding="utf-8", errors=_ERRORS) as f:
                f.write("".join(line + "\n" for line in damaged))
            _log.warning(
                "%d unreadable line(s) in %s (a run killed mid-write?) moved to %s; "
                "kept %d readable row(s).",
                len(damaged),
                self._path,
                self.damaged_path,
                len(kept),
            )
        if dropped:
            _log.info(
                "Dropped %d row(s) of %s written after step %d, where this run resumes.",
                dropped,
                self._path,
                resume_step,
            )
        text = "".join(line + "\n" for line in kept)
        if text != raw:
            tmp = self._path.with_name(self._path.name + ".tmp")
            tmp.write_bytes(text.encode("utf-8", _ERRORS))
            os.replace(tmp, self._path)

    def __repr__(self) -> str:
        return f"MetricsWriter({str(self._path)!r})"


class Window:
    """Averages per-step train metrics between two log rows; resumable.

    Each `add` stores one Python float per metric (`float(np.asarray(v))`);
    `mean()` is `float(np.mean(np.asarray(values, np.float64)))` per metric,
    so a window restored with `from_state` (floats round-trip exactly through
    JSON) gives bit for bit the mean an uninterrupted window gives. Put
    `state()` in the checkpoint metadata and restore it on resume.

    Throughput is not part of the state: `examples_per_sec()` counts only
    the examples added in this process since the window was made or reset,
    timed by `clock`.

    Args:
      clock: seconds, for `examples_per_sec` (default `time.perf_counter`).

    >>> import json
    >>> window = Window()
    >>> window.add({"loss": 0.5, "accuracy": 0.25}, examples=32)
    >>> saved = json.dumps(window.state())  # into the checkpoint metadata
    >>> resumed = Window.from_state(json.loads(saved))
    >>> resumed.add({"loss": 0.25, "accuracy": 0.75}, examples=32)
    >>> resumed.mean(), resumed.steps, resumed.examples
    ({'loss': 0.375, 'accuracy': 0.5}, 2, 64)
    """

    def __init__(self, *, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._values: dict[str, list[float]] = {}
        self._steps = 0
        self._examples = 0
        self._timed_examples = 0
        self._start = clock()

    @property
    def steps(self) -> int:
        """How many times `add` was called since the window began."""
        return self._steps

    @property
    def examples(self) -> int:
        """Examples added since the window began (restored ones included)."""
        return self._examples

    def add(self, metrics: Mapping[str, Any], *, examples: int = 0) -> None:
        """Adds one step's metrics.

        Args:
          metrics: `{name: number}`; each value a Python number or a NumPy or
            JAX scalar (arrays are fetched from the device).
          examples: the step's batch size, for `examples` and
            `examples_per_sec`.

        Raises:
          TypeError: a value is not a single number; nothing is added.
          ValueError: `examples` < 0.
        """
        examples = _checks.count("examples", examples)
        converted = {str(name): _scalar(name, value) for name, value in metrics.items()}
        for name, value in converted.items():
            self._values.setdefault(name, []).append(value)
        self._steps += 1
        self._examples += examples
        self._timed_examples += examples

    def mean(self) -> dict[str, float]:
        """The mean of each metric over the window, in the order first added; `{}` if empty."""
        return {
            name: float(np.mean(np.asarray(values, np.float64)))
            for name, values in self._values.items()
        }

    def examples_per_sec(self) -> float | None:
        """Examples per second added in this process since the window began or was reset.

        None when none were added yet (or no time has passed).
        """
        elapsed = self._clock() - self._start
        if not self._timed_examples or elapsed <= 0:
            return None
        return self._timed_examples / elapsed

    def reset(self) -> None:
        """Empties the window (after writing a row) and restarts its clock."""
        self._values = {}
        self._steps = self._examples = self._timed_examples = 0
        self._start = self._clock()

    def state(self) -> dict[str, Any]:
        """The window as strict JSON: `{"values": {name: [float, ...]}, "steps", "examples"}`.

        Non-finite values are written as the strings `"NaN"`, `"Infinity"`
        and `"-Infinity"`, so the state is valid checkpoint metadata.
        """
        return {
            "values": {name: [_encode(v) for v in vs] for name, vs in self._values.items()},
            "steps": self._steps,
            "examples": self._examples,
        }

    @classmethod
    def from_state(
        cls, state: Mapping[str, Any], *, clock: Callable[[], float] = time.perf_counter
    ) -> Self:
        """A window holding what `state()` saved; its clock starts now.

        Args:
          state: what `Window.state()` returned, possibly through JSON.
          clock: as for `Window`.

        Returns:
          The restored window.

        Raises:
          ValueError: `state` is not of that form; the message says what is wrong.
        """
        expected = (
            "expected Window.state(): {'values': {name: [float, ...]}, 'steps': int, "
            "'examples': int}"
        )
        if not isinstance(state, Mapping) or set(state) != {"values", "steps", "examples"}:
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"Window.from_state: got {got}; {expected}.")
        values = state["values"]
        if not isinstance(values, Mapping):
            raise ValueError(f"Window.from_state: 'values' is {type(values).__name__}; {expected}.")
        window = cls(clock=clock)
        try:
            window._steps = _checks.count("steps", state["steps"])
            window._examples = _checks.count("examples", state["examples"])
            for name, vs in values.items():
                if isinstance(vs, str) or not isinstance(vs, Iterable):
                    raise ValueError(f"'values'[{name!r}] is {vs!r}, not a list of floats")
                window._values[str(name)] = [_decode(name, v) for v in vs]
        except (TypeError, ValueError) as e:
            raise ValueError(f"Window.from_state: {str(e).rstrip('.')}; {expected}.") from None
        return window

    def __repr__(self) -> str:
        return (
            f"Window(steps={self._steps}, examples={self._examples}, metrics={list(self._values)})"
        )


def _lines(path: Path) -> list[str]:
    return path.read_bytes().decode("utf-8", _ERRORS).split("\n")


def _parse_row(line: str) -> dict[str, Any] | None:
    """The row a line holds, or None if it holds none."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if not isinstance(row, dict):
        return None
    step = row.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        return None
    return row


def _key(row: Mapping[str, Any]) -> tuple[int, Any]:
    split = row.get("split")
    # Unhashable splits (a list) still get a key of their own.
    return row["step"], split if isinstance(split, str | None) else json.dumps(split)


def _canonical(row: Mapping[str, Any]) -> str:
    # Text, not values: NaN != NaN, but a repeated NaN row is still a duplicate.
    return json.dumps(row, sort_keys=True)


def _dumps(row: Mapping[str, Any]) -> str:
    if not isinstance(row, Mapping):
        raise TypeError(f"A metrics row must be a mapping, got {type(row).__name__}: {row!r}.")
    bad_keys = [k for k in row if not isinstance(k, str)]
    if bad_keys:
        raise TypeError(f"A metrics row's keys must be strings, got {bad_keys!r}.")
    if "step" not in row:
        raise TypeError(f"A metrics row needs an integer 'step'; got keys {sorted(row)}.")
    step = _checks.count("A metrics row's 'step'", row["step"])
    try:
        return json.dumps({**row, "step": step}, default=_json_scalar)
    except TypeError as e:
        raise TypeError(f"Metrics row {dict(row)!r} is not JSON: {e}.") from None


def _json_scalar(value: Any) -> Any:
    if hasattr(value, "item") and np.ndim(value) == 0:
        return value.item()
    raise TypeError(
        f"{type(value).__name__} {value!r} is not a JSON value (give numbers, strings, "
        "booleans, None, lists or dicts; NumPy and JAX scalars are converted)"
    )


def _scalar(name: Any, value: Any) -> float:
    array = np.asarray(value)
    if array.shape != ():
        raise TypeError(
            f"Window.add: metric {name!r} has shape {array.shape}; give one number per step "
            "(e.g. the mean over devices)."
        )
    try:
        return float(array)
    except (TypeError, ValueError):
        raise TypeError(f"Window.add: metric {name!r} is {value!r}, not a number.") from None


def _encode(value: float) -> float | str:
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _decode(name: Any, value: Any) -> float:
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"'values'[{name!r}] holds {value!r}, not a float")
    return float(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
