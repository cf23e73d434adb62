"""A phase change's cost, compiled at the change or ahead, and what compiling ahead costs a step.

A CIFAR ResNet-18 (3x3 stem, no max-pool; width 16 by default, as in
`benchmarks/auto_freeze.py`), batch 32 of random 32x32 images, AdamW, CPU
convolutions through Eigen (`platform.cpu_conv_options()`). Two measurements:

* stall: one FreezeOut schedule (`lf.auto.freezeout(GROUPS, steps, t0=0.5,
  scaling="linear")`: stem, stage1, ..., stage4 stop at 50, 60, 70, 80 and
  90% of the run) trained three ways, in one process, each compiling
  everything afresh (no persistent cache): `at the change`
  (`train.Phases(..., compile_ahead=False)`: each phase compiles at its first
  step), `ahead` (`compile_ahead=True`: the phases after the current one
  compile on the background worker while it trains; a change whose program
  is not ready waits for it) and `ahead, waited` (the same, with the queued
  compiles waited for before each change, untimed: the cost of a change whose
  program is ready). Every step is timed to completion, `phases.update`
  included. Per run: the median step, each change's first step in seconds
  and in median steps, the whole run (without the untimed waits), and the
  steps taken while the worker had compiles pending (how many, their median).
* slowdown: the all-trainable train step, timed in windows that alternate
  between an idle machine and a thread compiling another phase's train step
  (`lower(...).compile()`, what the worker does), the thread at nice 0 and at
  nice 19 (Linux sets the priority of one thread). Per setting: the median
  step with and without the compile, and how long the compile took.

Time on a shared machine drifts: read the seconds as ratios within one run.
The load average before and after is printed.

Commands:
  python benchmarks/compile_ahead.py                 # about 9 minutes on 2 CPU cores
  python benchmarks/compile_ahead.py --quick         # ResNet-10 width 8: a smoke run
  python benchmarks/compile_ahead.py --json /tmp/compile_ahead.json
"""

import argparse
import os
import statistics
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Run as a script, this file's folder is on sys.path.
from report import machine_description, markdown_table, text_table, write_json

import layerfreeze as lf
from layerfreeze import train
from layerfreeze.models import GROUPS, resnet10, resnet18
from layerfreeze.train import data
from layerfreeze.train.platform import cpu_conv_options

CONV = cpu_conv_options()


def _normalize(rng: jax.Array, x: jax.Array) -> jax.Array:
    return data.normalize(x)


class Setup:
    """The model, its variables, a pool of batches, and a phase's steps on demand."""

    def __init__(self, args: argparse.Namespace):
        make = resnet10 if args.quick else resnet18
        self.model = make(10, stem="cifar", width=args.width)
        r = np.random.RandomState(0)
        self.batches = [
            {
                "image": r.randint(0, 256, (args.batch_size, 32, 32, 3)).astype(np.uint8),
                "label": r.randint(0, 10, args.batch_size).astype(np.int32),
            }
            for _ in range(8)
        ]
        init = jax.jit(self.model.init, static_argnames="train")
        x = jnp.zeros((1, 32, 32, 3), jnp.float32)
        self.variables = init(jax.random.key(0), x, train=False)
        self.optimizer = optax.adamw(1e-4)

    def build(self, phase: Any, previous: Sequence[lf.FreezeSpec] = ()) -> train.TrainSteps:
        spec = phase.spec if isinstance(phase, lf.schedules.Phase) else phase
        return train.make_steps(
            self.model,
            self.optimizer,
            spec,
            self.variables["params"],
            preprocess=_normalize,
            previous=previous,
            compiler_options=CONV,
        )

    def batch(self, step: int) -> dict[str, np.ndarray]:
        return self.batches[step % len(self.batches)]


RUNS = ("at the change", "ahead", "ahead, waited")


def stall_run(setup: Setup, run: str, steps: int) -> dict[str, Any]:
    """One run of the FreezeOut schedule, every step timed.

    `run`: "at the change" (no compiling ahead), "ahead" (the changes come
    when they come) or "ahead, waited" (before each change the compiles queued
    ahead are waited for, untimed: the change with its program ready).
    """
    ahead = run != "at the change"
    schedule = lf.auto.freezeout(GROUPS, steps, t0=0.5, scaling="linear")
    phases = train.Phases(
        schedule, setup.build, params=setup.variables["params"], compile_ahead=ahead
    )
    state = phases.init_state(setup.variables, jax.random.key(1))
    times, busy, changes, waited = [], [], [], 0.0
    start = time.perf_counter()
    for step in range(steps):
        if run == "ahead, waited" and phases.index_at(step) != phases.current:
            clock = time.perf_counter()
            phases.wait_ahead()
            waited += time.perf_counter() - clock
        pending = ahead and not phases.wait_ahead(timeout=0)
        clock = time.perf_counter()
        step_fn, state, change = phases.update(step, state)
        state, metrics = step_fn.train_step(state, setup.batch(step))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - clock)
        busy.append(pending)
        if change is not None:
            changes.append({"step": step, "spec": change.phase.spec.describe()})
    total = time.perf_counter() - start - waited
    phases.close(wait=True)
    return {"run": run, "times": times, "busy": busy, "changes": changes, "seconds": total,
            "waited": waited}  # fmt: skip


def summarise_stall(result: dict[str, Any]) -> dict[str, Any]:
    """The median step, each change's first step (s, x median), the busy steps' median."""
    times, busy = result["times"], result["busy"]
    firsts = {0} | {c["step"] for c in result["changes"]}
    ordinary = [t for i, t in enumerate(times) if i not in firsts]
    median = statistics.median(ordinary)
    during = [t for i, t in enumerate(times) if busy[i] and i not in firsts]
    return {
        "run": result["run"],
        "median_step": median,
        "first_step": times[0],
        "changes": [
            {**c, "seconds": times[c["step"]], "x_median": times[c["step"]] / median}
            for c in result["changes"]
        ],
        "seconds": result["seconds"],
        "waited": result.get("waited", 0.0),
        "compiling_steps": len(during),
        "compiling_median": statistics.median(during) if during else None,
    }


def _compile_in_thread(setup: Setup, state: Any, spec: str, nice: int, out: list) -> None:
    if nice:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    steps = setup.build(spec)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.params)
    abstract = state.replace(opt_state=jax.eval_shape(steps.tx.init, params))
    clock = time.perf_counter()
    steps.train_step.lower(abstract, setup.batch(0)).compile()
    out.append(time.perf_counter() - clock)


def slowdown(setup: Setup, rounds: int, window: int) -> list[dict[str, Any]]:
    """The full step timed alone and beside a compile, alternating, per nice value."""
    steps = setup.build("none")
    state = steps.init_state(setup.variables, jax.random.key(1))
    step = 0

    def timed() -> float:
        nonlocal state, step
        clock = time.perf_counter()
        state, metrics = steps.train_step(state, setup.batch(step))
        jax.block_until_ready(metrics)
        step += 1
        return time.perf_counter() - clock

    for _ in range(3):
        timed()  # compiled, warm
    samples = {nice: {"alone": [], "compiling": [], "compile_s": []} for nice in (0, 19)}
    specs = ["stem", "stem,stage1", "stem,stage1,stage2"]
    for r in range(rounds):
        for nice in (0, 19) if r % 2 == 0 else (19, 0):
            record = samples[nice]
            record["alone"] += [timed() for _ in range(window)]
            thread = threading.Thread(
                target=_compile_in_thread,
                args=(setup, state, specs[r % len(specs)], nice, record["compile_s"]),
            )
            thread.start()
            while thread.is_alive():
                record["compiling"].append(timed())
            thread.join()
    rows = []
    for nice, record in samples.items():
        alone = statistics.median(record["alone"])
        compiling = statistics.median(record["compiling"])
        rows.append(
            {
                "nice": nice,
                "alone": alone,
                "compiling": compiling,
                "slowdown": compiling / alone,
                "compile_s": statistics.median(record["compile_s"]),
                "steps": len(record["compiling"]),
            }
        )
    return rows


def stall_table(rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    header = [
        "run", "median step ms", "changes: first step s (x median)", "run s", "waited s",
        "steps beside a compile: n, median ms",
    ]  # fmt: skip
    body = []
    for row in rows:
        changes = "; ".join(
            f"{c['step']}: {c['seconds']:.2f} ({c['x_median']:.1f}x)" for c in row["changes"]
        )
        busy = "-"
        if row["compiling_median"] is not None:
            busy = f"{row['compiling_steps']}, {row['compiling_median'] * 1e3:.0f}"
        body.append([
            row["run"], f"{row['median_step'] * 1e3:.0f}", changes, f"{row['seconds']:.1f}",
            f"{row['waited']:.1f}", busy,
        ])  # fmt: skip
    return (markdown_table if markdown else text_table)(header, body, left=1)


def slowdown_table(rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    header = ["compile thread", "step alone ms", "step beside ms", "x", "compile s", "steps"]
    body = [
        [
            f"nice {r['nice']}",
            f"{r['alone'] * 1e3:.0f}",
            f"{r['compiling'] * 1e3:.0f}",
            f"{r['slowdown']:.2f}",
            f"{r['compile_s']:.1f}",
            str(r["steps"]),
        ]
        for r in rows
    ]
    return (markdown_table if markdown else text_table)(header, body, left=1)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-10 width 8, fewer steps")
    parser.add_argument("--width", type=int, default=None, help="ResNet width (default 16)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 160)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each kind, in turns")
    parser.add_argument("--rounds", type=int, default=6, help="slowdown windows per nice")
    parser.add_argument(
        "--only", choices=("stall", "slowdown"), default=None, help="one measurement only"
    )
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args(argv)
    args.width = args.width or (8 if args.quick else 16)
    steps = args.steps or (40 if args.quick else 160)
    print(machine_description(), f"load average before: {os.getloadavg()}", sep="\n")
    setup = Setup(args)
    stall, slow = [], []
    for r in range(args.repeats if args.only != "slowdown" else 0):
        for run in RUNS if r % 2 == 0 else RUNS[::-1]:
            stall.append(summarise_stall(stall_run(setup, run, steps)))
            print(stall_table(stall[-1:]), flush=True)
    if args.only != "stall":
        slow = slowdown(setup, 2 if args.quick else args.rounds, 3 if args.quick else 6)
    print(stall_table(stall), slowdown_table(slow), sep="\n\n")
    print(f"load average after: {os.getloadavg()}")
    result = {"stall": stall, "slowdown": slow, "load": os.getloadavg()}
    if args.json:
        write_json(args.json, [result])
    return result


if __name__ == "__main__":
    main()
