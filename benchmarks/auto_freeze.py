"""Automatic freezing for speed, measured as wall-clock time to accuracy.

Real images, offline: scikit-learn's bundled handwritten digits (1,797 8x8
grey images; `pip install -e .[bench]`), scaled to 32x32x3 uint8. A CIFAR
ResNet-18 (width 16 by default) is trained from scratch on digits 0-4 (the
source task); its weights, head re-initialised, start four fine-tuning runs on
digits 5-9 (the target task), with the same optimizer (AdamW, warmup + cosine),
the same batches and the same number of steps, no augmentation:

* full: everything trains;
* freezeout: `lf.freezeout` (t0, cubic scaling): groups stop front first;
* auto: `lf.AutoFreeze` (interval, percentile) on the train step's per-group
  gradient norms, the frozen prefix still run forward on every batch;
* auto+cache: the same policy, the frozen prefix's outputs cached
  (`features.FeatureCache`) and the steps started after it.

For each run: the wall-clock seconds (train steps, compilations, feature
caching and policy decisions; evaluation excluded) until the test accuracy
first reaches the full run's final accuracy minus 0.5 points, evaluated every
`--eval_every` steps; the final accuracy; the compiled FLOPs of each phase's
train step (`cost_analysis`) and their total over the run (the feature
cache's forward passes not included). Plot: test accuracy against wall-clock.
Wall time on shared machines is noisy: read it as ratios within one run.

Commands:
  python benchmarks/auto_freeze.py                 # writes benchmarks/auto_freeze.png
  python benchmarks/auto_freeze.py --quick         # a smoke run (a minute)
  python benchmarks/auto_freeze.py --json /tmp/auto_freeze.json --markdown benchmarks/RESULTS.md
"""

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Run as a script, this file's folder is on sys.path.
from freeze_cost import machine_description

import layerfreeze as lf
from layerfreeze import data, features, train
from layerfreeze.models import GROUPS, resnet18

RUNS = ("full", "freezeout", "auto", "auto+cache")
TOLERANCE = 0.005  # accuracy points below the full run's final accuracy, as a fraction
TARGET_SPEEDUP = 1.5


def load_digits_tasks(seed: int = 0, test_fraction: float = 0.25) -> tuple[data.Dataset, ...]:
    """(source: digits 0-4, target: digits 5-9 relabelled 0-4) as 32x32x3 uint8 datasets."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SystemExit(
            "benchmarks/auto_freeze.py needs scikit-learn's bundled digits: "
            "pip install -e '.[bench]' (or pip install scikit-learn)."
        ) from e
    digits = load_digits()
    images = np.round(digits.images / 16.0 * 255.0).astype(np.uint8)
    images = np.kron(images, np.ones((1, 4, 4), np.uint8))  # 8x8 -> 32x32, nearest
    images = np.repeat(images[..., None], 3, axis=-1)
    labels = digits.target.astype(np.int32)
    rng = np.random.default_rng(seed)
    tasks = []
    for name, classes in (("digits0-4", range(5)), ("digits5-9", range(5, 10))):
        index = rng.permutation(np.flatnonzero(np.isin(labels, list(classes))))
        n_test = int(len(index) * test_fraction)
        test, tr = index[:n_test], index[n_test:]
        tasks.append(
            data.Dataset(
                train_images=images[tr],
                train_labels=labels[tr] - classes[0],
                test_images=images[test],
                test_labels=labels[test] - classes[0],
                num_classes=5,
                name=name,
            )
        )
    return tuple(tasks)


def _normalize(rng: jax.Array, x: jax.Array) -> jax.Array:
    return data.normalize(x)


def _identity(rng: jax.Array, x: jax.Array) -> jax.Array:
    return x


def _accuracy(steps: train.TrainSteps, state: train.TrainState, ds: data.Dataset, bs: int) -> float:
    correct = count = 0.0
    for batch in data.eval_batches(ds.test_images, ds.test_labels, bs):
        out = steps.eval_step(
            state, {"image": batch.images, "label": batch.labels, "mask": batch.mask}
        )
        correct += float(out["correct"])
        count += float(out["count"])
    return correct / count


def _flops(steps: train.TrainSteps, variables: Any, batch: dict[str, np.ndarray]) -> float:
    state = jax.eval_shape(lambda: steps.init_state(variables, jax.random.key(0)))
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    cost = steps.train_step.lower(state, shapes).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def train_source(model, ds: data.Dataset, args: argparse.Namespace) -> dict[str, Any]:
    """The source model: every group trained from scratch on digits 0-4."""
    sample = jnp.zeros((1, *data.IMAGE_SHAPE), jnp.float32)
    variables = model.init(jax.random.key(args.seed), sample, train=False)
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 20, args.source_steps))
    steps = train.make_steps(
        model, opt, "none", variables["params"], preprocess=_normalize,
        preprocess_eval=data.normalize, grad_norm=False,
    )  # fmt: skip
    state = steps.init_state(variables, jax.random.key(args.seed))
    for step in range(args.source_steps):
        idx = data.batch_indices(args.seed, step, ds.num_train, args.batch_size)
        state, _ = steps.train_step(
            state, {"image": ds.train_images[idx], "label": ds.train_labels[idx]}
        )
    print(f"source (digits 0-4): test accuracy {_accuracy(steps, state, ds, args.batch_size):.4f}")
    fresh = model.init(jax.random.key(args.seed + 1), sample, train=False)
    params = dict(jax.device_get(state.params))
    params["head"] = fresh["params"]["head"]  # the target's head starts afresh
    return {"params": params, "batch_stats": jax.device_get(state.batch_stats)}


def fine_tune(
    kind: str, model, variables: dict[str, Any], ds: data.Dataset, args: argparse.Namespace
) -> dict[str, Any]:
    """One target run; returns its accuracy curve, phases and FLOPs."""
    total = args.steps
    params = variables["params"]
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, args.lr, total // 10, total))
    policy = None
    if kind == "full":
        schedule = lf.constant("none", unit="step")
    elif kind == "freezeout":
        schedule = lf.freezeout(GROUPS, total, t0=args.t0, scaling=args.scaling)
    else:
        policy = lf.AutoFreeze(GROUPS, interval=args.interval, percentile=args.percentile)
        schedule = policy.schedule
    cached = kind == "auto+cache"

    def prefix_of(phase: lf.Phase) -> str | None:
        return features.frozen_prefix(params, phase.spec, GROUPS[:-1]) if cached else None

    def build(phase: lf.Phase, previous: Sequence[lf.FreezeSpec]) -> train.TrainSteps:
        prefix = prefix_of(phase)
        return train.make_steps(
            model, opt, phase.spec, params, preprocess=_normalize if prefix is None else _identity,
            preprocess_eval=data.normalize, start_after=prefix, previous=previous,
            group_norms=GROUPS if policy is not None else (), grad_norm=False,
        )  # fmt: skip

    phases = lf.Phases(schedule, build, params=params)
    cache = (
        features.FeatureCache(
            model, ds.train_images, preprocess=data.normalize, batch_size=256, pool=("stage4",)
        )
        if cached
        else None
    )
    state = phases.init_state(variables, jax.random.key(args.seed))
    seen: list[dict[str, Any]] = []  # per phase: start, spec, steps, an example batch
    curve: list[tuple[float, int, float]] = []
    first_steps: list[tuple[int, float]] = []  # (step, seconds) of each phase's first step
    elapsed, clock = 0.0, time.perf_counter()
    for step in range(total):
        if policy is not None and policy.update(step):
            phases.extend(policy.schedule)
        steps, state, change = phases.update(step, state)
        idx = data.batch_indices(args.seed, step, ds.num_train, args.batch_size)
        inputs = ds.train_images[idx]
        if cache is not None:
            current = phases.schedule.phases[phases.current]
            cache.update(
                prefix_of(current), {"params": state.params, "batch_stats": state.batch_stats}
            )
            if cache.features is not None:
                inputs = cache.features[idx]
        batch = {"image": inputs, "label": ds.train_labels[idx]}
        if step == 0 or change is not None:
            seen.append(
                {"start": step, "spec": steps.spec.describe(), "steps": steps, "batch": batch}
            )
        if step == 0 or change is not None:  # compiles: timed apart as well
            before = time.perf_counter()
            state, metrics = steps.train_step(state, batch)
            jax.block_until_ready(state.params)
            first_steps.append((step, time.perf_counter() - before))
        else:
            state, metrics = steps.train_step(state, batch)
        if policy is not None:
            policy.observe(metrics)
        if (step + 1) % args.eval_every == 0 or step + 1 == total:
            jax.block_until_ready(state.params)
            elapsed += time.perf_counter() - clock
            curve.append((elapsed, step + 1, _accuracy(steps, state, ds, args.batch_size)))
            clock = time.perf_counter()
    ends = [p["start"] for p in seen[1:]] + [total]
    phase_rows = []
    for p, end in zip(seen, ends, strict=True):
        flops = _flops(p["steps"], variables, p["batch"])
        phase_rows.append(
            {
                "start": p["start"],
                "steps": end - p["start"],
                "spec": p["spec"],
                "gflops": flops / 1e9,
            }
        )
    return {
        "run": kind,
        "curve": curve,
        "final_accuracy": curve[-1][2],
        "seconds": curve[-1][0],
        "phases": phase_rows,
        "total_tflops": sum(r["gflops"] * r["steps"] for r in phase_rows) / 1e3,
        "first_steps": first_steps,
        "compile_seconds": sum(sec for _, sec in first_steps),
        "cache_mib": 0.0 if cache is None else cache.nbytes / 2**20,
    }


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adds time to the target accuracy (full final - 0.5 points) and speed-ups."""
    target = results[0]["final_accuracy"] - TOLERANCE
    for r in results:
        hit = next(((t, s) for t, s, acc in r["curve"] if acc >= target), None)
        r["target_accuracy"] = target
        r["seconds_to_target"] = None if hit is None else hit[0]
        r["compile_before_target"] = sum(
            sec for start, sec in r["first_steps"] if hit is not None and start < hit[1]
        )
    base = results[0]["seconds_to_target"]
    for r in results:
        hit = r["seconds_to_target"]
        r["speedup"] = None if hit is None or base is None else base / hit
        # Compilations come once per phase, whatever the run's length: without
        # them, what a longer run converges to.
        r["warm_seconds"] = None if hit is None else hit - r["compile_before_target"]
        warm_base = results[0]["warm_seconds"]
        r["warm_speedup"] = (
            None if hit is None or warm_base is None else warm_base / r["warm_seconds"]
        )
        r["flops_ratio"] = results[0]["total_tflops"] / r["total_tflops"]
    return results


def format_markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| run | final acc | s to target | speed-up | total s | compile s | s to target"
        " excl. compile | train TFLOP (vs full) | phases: start GFLOP/step (spec) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        hit = "not reached" if r["seconds_to_target"] is None else f"{r['seconds_to_target']:.1f}"
        speed = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        warm = (
            "-"
            if r["warm_speedup"] is None
            else f"{r['warm_seconds']:.1f} ({r['warm_speedup']:.2f}x)"
        )
        phases = "; ".join(f"{p['start']}: {p['gflops']:.2f} ({p['spec']})" for p in r["phases"])
        lines.append(
            f"| {r['run']} | {r['final_accuracy']:.4f} | {hit} | {speed} | {r['seconds']:.1f} | "
            f"{r['compile_seconds']:.1f} | {warm} | "
            f"{r['total_tflops']:.2f} ({r['flops_ratio']:.2f}x less) | {phases} |"
        )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for r in results:
        t, _, acc = zip(*r["curve"], strict=True)
        ax.plot(t, acc, marker="o", markersize=3, label=r["run"])
    ax.axhline(results[0]["target_accuracy"], color="grey", linestyle=":", label="target")
    ax.set_xlabel("wall-clock seconds (evaluation excluded)")
    ax.set_ylabel("test accuracy (digits 5-9)")
    ax.legend()
    fig.savefig(path, dpi=100)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: small and short")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--source_steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=600, help="target fine-tuning steps")
    parser.add_argument("--eval_every", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--interval", type=int, default=30, help="AutoFreeze interval")
    parser.add_argument("--percentile", type=float, default=50.0, help="AutoFreeze percentile")
    parser.add_argument("--t0", type=float, default=0.5, help="FreezeOut t0")
    parser.add_argument("--scaling", default="cubic", choices=list(lf.auto.SCALINGS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="benchmarks/auto_freeze.png")
    parser.add_argument("--json", default="")
    parser.add_argument("--markdown", default="", help="append a section to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.source_steps, args.steps = 4, 30, 40
        args.eval_every, args.interval = 10, 5
    for name in ("width", "batch_size", "source_steps", "steps", "eval_every", "interval"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    source, target = load_digits_tasks(args.seed)
    model = resnet18(5, stem="cifar", width=args.width)
    variables = train_source(model, source, args)
    results = []
    for kind in RUNS:
        result = fine_tune(kind, model, variables, target, args)
        print(f"{kind}: final accuracy {result['final_accuracy']:.4f} in {result['seconds']:.1f}s")
        results.append(result)
    results = summarise(results)
    table = format_markdown(results)
    print(table)
    if args.plot:
        plot(results, args.plot)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    if args.markdown:
        command = "python benchmarks/auto_freeze.py " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        with open(args.markdown, "a", encoding="utf-8") as f:
            f.write(
                "\n## auto_freeze: time to accuracy, digits 0-4 -> 5-9, "
                f"ResNet-18 width {args.width}\n\n"
                f"Machine: {machine_description()}.\n\nCommand: `{command.strip()}`\n\n{table}\n"
            )
    return results


if __name__ == "__main__":
    main()
