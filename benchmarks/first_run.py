"""The first run of a phase's compiled train step, against the runs after it.

A program compiled ahead saves a phase change its compile, but not what
XLA's runtime does the first time a new executable runs. This measures it:
for each phase of `benchmarks/auto_freeze.py`'s models (`--model resnet18`:
the CIFAR ResNet-18 width 16; `--model vit`: the scanned ViT), the train step
is compiled (`lower(...).compile()`, in this process, or read back from the
persistent cache with `--compilation_cache`) and then run `--runs` times on
one batch of random 32x32 images, each run timed to its end. Per phase: the
compile's seconds, the first run, the median of the others, and their ratio;
then, for the same program compiled anew, a run on zeros (what
`train.Phases(compile_ahead=True)` does on the CPU before the phase begins)
and the first real run after it.

Commands:
  python benchmarks/first_run.py                       # the ResNet, 1 min on 2 CPU cores
  python benchmarks/first_run.py --model vit
  python benchmarks/first_run.py --compilation_cache /tmp/first_run   # twice: read back
"""

import argparse
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax

# Run as a script, this file's folder is on sys.path.
from auto_freeze import CONV, MODELS, build_model
from report import machine_description, markdown_table, text_table

from layerfreeze import train
from layerfreeze.train import _ahead, data, platform

# A phase per row: what `auto_freeze.py`'s policies freeze, from nothing to most.
SPECS = {
    "resnet18": ("none", "stem,stage1", "stem,stage1,stage2,stage3"),
    "vit": (
        "none",
        "embedding,pos_embedding,cls,Transformer/encoderblock[:2]",
        "embedding,pos_embedding,cls,Transformer/encoderblock[:5]",
    ),
}


def _normalize(rng: jax.Array, x: jax.Array) -> jax.Array:
    return data.normalize(x)


def measure(model: Any, spec: str, batch: dict[str, np.ndarray], runs: int) -> dict[str, Any]:
    """One phase: its compile's seconds and every run's seconds, in order."""
    variables = model.init(jax.random.key(0), batch["image"][:1].astype(np.float32), train=False)
    steps = train.make_steps(
        model, optax.adamw(1e-4), spec, variables["params"], preprocess=_normalize,
        grad_norm=False, compiler_options=CONV,
    )  # fmt: skip
    state = steps.init_state(variables, jax.random.key(0))
    start = time.perf_counter()
    program = steps.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    times, state = _timed(program, state, batch, runs)
    # The same program compiled again (a new executable), first run once on zeros
    # as `train.Phases(compile_ahead=True)` does on the CPU: its first real run.
    jax.clear_caches()
    program = steps.train_step.lower(state, batch).compile()
    start = time.perf_counter()
    _ahead.run_once(program)
    zeros_s = time.perf_counter() - start
    after = _timed(program, state, batch, 1)[0][0]
    return {
        "spec": spec, "compile_s": compile_s, "times": times, "zeros_s": zeros_s,
        "after_zeros": after,
    }  # fmt: skip


def _timed(
    program: Any, state: Any, batch: dict[str, np.ndarray], runs: int
) -> tuple[list[float], Any]:
    """Each of `runs` runs' seconds, to its end, and the state after them (the step
    donates its state: each run takes the one before's)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        state, metrics = program(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    return times, state


def summarise(row: dict[str, Any]) -> dict[str, Any]:
    """Adds the first run, the median of the later runs and their ratio."""
    first, later = row["times"][0], statistics.median(row["times"][1:])
    return {**row, "first": first, "median": later, "ratio": first / later}


def table(rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    header = [
        "phase (frozen)", "compile s", "first run ms", "later runs ms", "first / later",
        "run on zeros ms", "then first run ms", "/ later",
    ]  # fmt: skip
    body = [
        [
            r["spec"],
            f"{r['compile_s']:.2f}",
            f"{1e3 * r['first']:.0f}",
            f"{1e3 * r['median']:.0f}",
            f"{r['ratio']:.1f}x",
            f"{1e3 * r['zeros_s']:.0f}",
            f"{1e3 * r['after_zeros']:.0f}",
            f"{r['after_zeros'] / r['median']:.1f}x",
        ]
        for r in rows
    ]
    return (markdown_table if markdown else text_table)(header, body, left=1)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default="resnet18", choices=list(MODELS))
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--runs", type=int, default=6, help="runs per phase, >= 2")
    parser.add_argument("--compilation_cache", default="", help="JAX's persistent cache here")
    args = parser.parse_args(argv)
    if args.runs < 2:
        parser.error(f"--runs must be >= 2 (a first run and later ones), got {args.runs}")
    if args.compilation_cache:
        platform.enable_compilation_cache(args.compilation_cache)
    args.width = MODELS[args.model].width
    model, _ = build_model(args)
    r = np.random.RandomState(0)
    batch = {
        "image": r.randint(0, 256, (args.batch_size, 32, 32, 3)).astype(np.uint8),
        "label": r.randint(0, 5, args.batch_size).astype(np.int32),
    }
    print(machine_description(), f"load average before: {os.getloadavg()}", sep="\n")
    rows = [summarise(measure(model, spec, batch, args.runs)) for spec in SPECS[args.model]]
    print(table(rows), f"load average after: {os.getloadavg()}", sep="\n")
    return rows


if __name__ == "__main__":
    main()
