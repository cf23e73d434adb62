"""Automatic freezing for speed, measured as wall-clock time to accuracy.

Real images, offline: scikit-learn's bundled handwritten digits (1,797 8x8
grey images; `pip install -e .[bench]`), at `--image_size` (32 by default,
CIFAR's size: each pixel repeated 4x4; 8 is the native size) with 3 channels,
uint8. The model (`--model`) is a CIFAR ResNet-18 (3x3 stem, no max-pool; width
16 by default) or a small ViT (`vit`: patch 8, width 192, depth 6, 4 heads, MLP
384, its blocks stacked in one scan; a step costs about the ResNet's). It is
trained from scratch on digits 0-4 (the source task, peak rate 3e-3 for the
ResNet, 5e-4 for the ViT; cached in `--source_cache` and reused by later runs
with the same settings); its weights, head re-initialised, start the
fine-tuning runs on digits 5-9 (the target task: 10 epochs, peak rate 3e-4 for
the ResNet, a tenth of the source's, and 5e-4 for the ViT), with the same
optimizer (AdamW, warmup + cosine), the same batches and the same number of
steps, no augmentation:

* full: everything trains;
* freezeout: `lf.auto.freezeout` (t0 0.8, cubic scaling, the FreezeOut code's
  defaults): groups stop front first, from 80% of the run on;
* auto: `lf.auto.AutoFreeze` (percentile 50 and a decision every tenth of the run,
  the AutoFreeze code's defaults) on the train step's per-group gradient
  norms, the frozen prefix still run forward on every batch;
* auto+cache (the ResNet only: `features.FeatureCache` runs a model's
  `features` method, which the ViT lacks): the same policy, the frozen
  prefix's outputs cached (`features.FeatureCache`) and the steps started
  after it.

The ViT's groups are `models.vit_groups(6, scan=True)`: the embeddings, one
`Transformer/encoderblock[i]` per block, the final norm and the head; a frozen
prefix of blocks is one range (`Transformer/encoderblock[:k]`) whose backward
work the step leaves out.

For each run: the wall-clock seconds (train steps, compilations, feature
caching and policy decisions; evaluation excluded) until the test accuracy
first reaches the full run's final accuracy minus 0.5 points, evaluated every
`--eval_every` steps, with and without the compilations (the first step of
each phase); the final accuracy; the compiled FLOPs of each phase's train step
(`cost_analysis`) and their total over the run (the feature cache's forward
passes not included); the step at the target and the compiled FLOPs of the
steps before it (exact, unlike the seconds). Plot: test accuracy against
wall-clock. The runs take turns, one evaluation interval each, after an
untimed warm-up, so that a drifting load on a shared machine hits them alike;
still, read the seconds as ratios within one run. The load average before and
after is printed and written with the table.

Commands:
  python benchmarks/auto_freeze.py                 # 2 min on 2 CPU cores (4 to train the source)
  python benchmarks/auto_freeze.py --quick         # a smoke run (1.5 min)
  python benchmarks/auto_freeze.py --json /tmp/auto_freeze.json --markdown benchmarks/RESULTS.md
  python benchmarks/auto_freeze.py --model vit     # the ViT: full, freezeout, auto (4 min)
"""

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Generator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import traverse_util

# Run as a script, this file's folder is on sys.path.
from report import command_line, machine_description

import layerfreeze as lf
from layerfreeze import train
from layerfreeze.models import GROUPS, ViT, resnet18, vit_groups
from layerfreeze.train import _ahead, data, features, platform
from layerfreeze.train.platform import cpu_conv_options

RUNS = ("full", "freezeout", "auto", "auto+cache")
TOLERANCE = 0.005  # accuracy points below the full run's final accuracy, as a fraction
TARGET_SPEEDUP = 1.5
IMAGE_SIZES = (8, 16, 32)  # the digits' 8x8, each pixel repeated 1, 2 or 4 times

# XLA options of every step: CPU convolutions through Eigen where that helps.
CONV = cpu_conv_options()


@dataclasses.dataclass(frozen=True)
class ModelChoice:
    """A `--model`: the defaults of the flags left unset, and the runs it supports."""

    width: int
    quick_width: int  # --quick's
    source_lr: float
    lr: float  # fine-tuning peak rate
    runs: tuple[str, ...]
    plot: str


MODELS = {
    # Fine-tuning at a tenth of the source's peak rate.
    "resnet18": ModelChoice(16, 4, 3e-3, 3e-4, RUNS, "benchmarks/auto_freeze.png"),
    # The ViT fine-tunes at the source's rate: its full run reached 0.83 at
    # 5e-4 and 0.79 at 1e-3 (width 192); at width 64 a tenth of the source's
    # rate (1e-4) reached 0.44 in the 210 steps. No auto+cache:
    # `features.FeatureCache` runs the model's `features` method, which only
    # the ResNets have (a ViT cannot start after a group).
    "vit": ModelChoice(192, 16, 5e-4, 5e-4, RUNS[:3], "benchmarks/auto_freeze_vit.png"),
}
# The ViT's fixed sizes; --width sets its token width. Patch 8 on the 32x32
# digits (16 tokens of 2x2 original pixels) learned better than patch 4 (64
# tokens of one pixel each): 0.92 against 0.85 on the source at width 64.
# Width 192 makes a step cost about the ResNet's (100 ms on 2 CPU cores).
VIT_PATCH, VIT_DEPTH, VIT_HEADS, VIT_MLP_RATIO = 8, 6, 4, 2


@dataclasses.dataclass(frozen=True)
class Task:
    """One task's images and labels (`data.Dataset` holds 32x32 images only)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    name: str

    @property
    def num_train(self) -> int:
        return len(self.train_labels)


def load_digits_tasks(
    seed: int = 0, test_fraction: float = 0.25, image_size: int = 16
) -> tuple[Task, Task]:
    """(source: digits 0-4, target: digits 5-9 relabelled 0-4), images uint8 [N, S, S, 3]."""
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"image_size must be one of {IMAGE_SIZES}, got {image_size}.")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SystemExit(
            "benchmarks/auto_freeze.py needs scikit-learn's bundled digits: "
            "pip install -e '.[bench]' (or pip install scikit-learn)."
        ) from e
    digits = load_digits()
    images = np.round(digits.images / 16.0 * 255.0).astype(np.uint8)
    scale = image_size // 8
    images = np.kron(images, np.ones((1, scale, scale), np.uint8))  # nearest neighbour
    images = np.repeat(images[..., None], 3, axis=-1)
    labels = digits.target.astype(np.int32)
    rng = np.random.default_rng(seed)
    tasks = []
    for name, classes in (("digits0-4", range(5)), ("digits5-9", range(5, 10))):
        index = rng.permutation(np.flatnonzero(np.isin(labels, list(classes))))
        n_test = int(len(index) * test_fraction)
        test, tr = index[:n_test], index[n_test:]
        tasks.append(
            Task(
                train_images=images[tr],
                train_labels=labels[tr] - classes[0],
                test_images=images[test],
                test_labels=labels[test] - classes[0],
                num_classes=5,
                name=name,
            )
        )
    return tuple(tasks)


def build_model(args: argparse.Namespace) -> tuple[nn.Module, tuple[str, ...]]:
    """`--model`'s network (5 classes) and its groups, input to output."""
    if args.model == "vit":
        # The blocks stacked in one scan, unrolled: XLA's cost analysis counts
        # a loop body once, and the FLOPs must count every block (the blocks
        # still run as scans over stacked leaves, one per frozen or trainable range).
        model = ViT(
            num_classes=5, patch_size=VIT_PATCH, width=args.width, depth=VIT_DEPTH,
            mlp_dim=VIT_MLP_RATIO * args.width, num_heads=VIT_HEADS, scan=True,
            scan_unroll=True,
        )  # fmt: skip
        return model, vit_groups(VIT_DEPTH, scan=True)
    return resnet18(5, stem="cifar", width=args.width), GROUPS


def model_title(args: argparse.Namespace) -> str:
    """`--model`'s network in words, for the setup line and the markdown section."""
    if args.model == "vit":
        return (
            f"ViT width {args.width} (patch {VIT_PATCH}, depth {VIT_DEPTH}, {VIT_HEADS} heads, "
            f"MLP {VIT_MLP_RATIO * args.width}, scanned blocks)"
        )
    return f"CIFAR ResNet-18 width {args.width}"


def _normalize(rng: jax.Array, x: jax.Array) -> jax.Array:
    return data.normalize(x)


def _identity(rng: jax.Array, x: jax.Array) -> jax.Array:
    return x


def _accuracy(steps: train.TrainSteps, state: train.TrainState, ds: Task, bs: int) -> float:
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


def _sample(ds: Task) -> jax.Array:
    return jnp.zeros((1, *ds.train_images.shape[1:]), jnp.float32)


def source_cache_path(args: argparse.Namespace) -> str:
    """The file of the source run with these settings under `--source_cache`."""
    name = (
        f"source-{args.model}-w{args.width}-i{args.image_size}-n{args.source_steps}"
        f"-lr{args.source_lr:g}-b{args.batch_size}-s{args.seed}.npz"
    )
    return os.path.join(args.source_cache, name)


def source_variables(model, ds: Task, args: argparse.Namespace) -> tuple[dict[str, Any], float]:
    """The source model's variables, head re-initialised: from the cache or trained now."""
    path = source_cache_path(args) if args.source_cache else ""
    if path and os.path.exists(path):
        with np.load(path) as f:
            flat = {k: f[k] for k in f.files}
        accuracy = float(flat.pop("source_accuracy"))
        variables = traverse_util.unflatten_dict(flat, sep="/")
        print(f"source (digits 0-4): test accuracy {accuracy:.4f}, loaded from {path}")
    else:
        before = time.perf_counter()
        variables, accuracy = train_source(model, ds, args)
        print(
            f"source (digits 0-4): test accuracy {accuracy:.4f}, trained in "
            f"{time.perf_counter() - before:.1f}s"
        )
        if path:
            os.makedirs(args.source_cache, exist_ok=True)
            flat = traverse_util.flatten_dict(variables, sep="/")
            np.savez(path, source_accuracy=np.float64(accuracy), **flat)
    fresh = model.init(jax.random.key(args.seed + 1), _sample(ds), train=False)
    params = dict(variables["params"])
    params["head"] = fresh["params"]["head"]  # the target's head starts afresh
    return {**variables, "params": params}, accuracy  # a ViT has no batch_stats


def train_source(model, ds: Task, args: argparse.Namespace) -> tuple[dict[str, Any], float]:
    """The source model (every group trained from scratch on digits 0-4), its accuracy."""
    variables = model.init(jax.random.key(args.seed), _sample(ds), train=False)
    opt = optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, args.source_lr, 20, args.source_steps)
    )
    steps = train.make_steps(
        model, opt, "none", variables["params"], preprocess=_normalize,
        preprocess_eval=data.normalize, grad_norm=False, compiler_options=CONV,
    )  # fmt: skip
    state = steps.init_state(variables, jax.random.key(args.seed))
    for step in range(args.source_steps):
        idx = data.batch_indices(args.seed, step, ds.num_train, args.batch_size)
        state, _ = steps.train_step(
            state, {"image": ds.train_images[idx], "label": ds.train_labels[idx]}
        )
    variables = {"params": jax.device_get(state.params)}
    if state.batch_stats:  # a ResNet's BatchNorm statistics
        variables["batch_stats"] = jax.device_get(state.batch_stats)
    return variables, _accuracy(steps, state, ds, args.batch_size)


def warm_up(model, variables: dict[str, Any], ds: Task, args: argparse.Namespace) -> float:
    """Compiles and runs a few untimed full steps, so the first timed run starts warm.

    Without it the first run in the process paid for starting up (thread pools,
    allocations): in a run of the four one after the other, the full run's
    first 60 steps took 1.7x as long as the same 60 steps of the second run.
    """
    before = time.perf_counter()
    opt = optax.adamw(1e-4)
    steps = train.make_steps(
        model, opt, "none", variables["params"], preprocess=_normalize,
        preprocess_eval=data.normalize, grad_norm=False, compiler_options=CONV,
    )  # fmt: skip
    state = steps.init_state(variables, jax.random.key(args.seed))
    for step in range(args.warmup_steps):
        idx = data.batch_indices(args.seed + 1, step, ds.num_train, args.batch_size)
        state, _ = steps.train_step(
            state, {"image": ds.train_images[idx], "label": ds.train_labels[idx]}
        )
    jax.block_until_ready(state.params)
    return time.perf_counter() - before


def fine_tune(
    kind: str,
    model: nn.Module,
    groups: tuple[str, ...],
    variables: dict[str, Any],
    ds: Task,
    args: argparse.Namespace,
) -> Generator[None, None, dict[str, Any]]:
    """One target run, paused after each evaluation; returns its curve, phases and FLOPs.

    Its clock runs only between a resumption and the next evaluation, so
    `interleave` can run several of these in turns.
    """
    total = args.steps
    params = variables["params"]
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, args.lr, total // 10, total))
    policy = None
    if kind == "full":
        schedule = lf.schedules.constant("none", unit="step")
    elif kind == "freezeout":
        schedule = lf.auto.freezeout(groups, total, t0=args.t0, scaling=args.scaling)
    else:
        policy = lf.auto.AutoFreeze(groups, interval=args.interval, percentile=args.percentile)
        schedule = policy.schedule
    cached = kind == "auto+cache"

    def prefix_of(phase: lf.schedules.Phase) -> str | None:
        return features.frozen_prefix(params, phase.spec, groups[:-1]) if cached else None

    def build(phase: lf.schedules.Phase, previous: Sequence[lf.FreezeSpec]) -> train.TrainSteps:
        prefix = prefix_of(phase)
        return train.make_steps(
            model, opt, phase.spec, params, preprocess=_normalize if prefix is None else _identity,
            preprocess_eval=data.normalize, start_after=prefix, previous=previous,
            group_norms=groups if policy is not None else (), grad_norm=False,
            compiler_options=CONV,
        )  # fmt: skip

    cache = (
        features.FeatureCache(
            model,
            ds.train_images,
            preprocess=data.normalize,
            batch_size=256,
            pool=("stage4",),
            groups=groups[:-1],
        )
        if cached
        else None
    )
    # With the cache, compiling ahead covers the phases that train on other features.
    phases = train.Phases(
        schedule, build, params=params, compile_ahead=args.compile_ahead,
        warm_up=False if getattr(args, "no_warm_up", False) else None,
        prefix_groups=groups[:-1] if cached else None, feature_cache=cache,
    )  # fmt: skip
    guess = None  # the spec of the phase last foreseen (AutoFreeze's guess)
    earlier: list[str] = []  # the guesses before it since the last decision

    def foresee() -> str | None:  # its likeliest next phase, compiled ahead (--compile_ahead)
        if guess is not None:
            earlier.append(guess)
        candidate = policy.candidate_schedule()
        phases.foresee(candidate)
        return None if candidate is None else candidate.phases[-1].spec.describe()

    if policy is not None:
        guess = foresee()
    state = phases.init_state(variables, jax.random.key(args.seed))
    seen: list[dict[str, Any]] = []  # per phase: start, spec, steps, an example batch
    curve: list[tuple[float, int, float]] = []
    first_steps: list[tuple[int, float]] = []  # (step, seconds) of each phase's first step
    feature_seconds: dict[int, float] = {}  # step -> computing the cached features there
    # AutoFreeze's decision step -> True: the phase last foreseen; "earlier": one of the 3
    # other phases foreseen last since the last decision (`Phases` keeps them compiled);
    # False: neither.
    guessed: dict[int, bool | str] = {}
    step_seconds: list[float] = []  # every other step's
    phase_seconds: dict[int, list[float]] = {}  # the same, by the step its phase began
    eval_seconds = 0.0
    elapsed, clock = 0.0, time.perf_counter()
    for step in range(total):
        before = time.perf_counter()  # a phase change counts from its decision on
        if policy is not None and policy.update(step):
            phases.extend(policy.schedule)
            decided = policy.schedule.phases[-1].spec.describe()
            recent = list(dict.fromkeys(reversed(earlier)))[:3]  # as `Phases` keeps them
            guessed[step] = decided == guess or ("earlier" if decided in recent else False)
            guess = None
            earlier.clear()
            guess = foresee()
        steps, state, change = phases.update(step, state)
        idx = data.batch_indices(args.seed, step, ds.num_train, args.batch_size)
        inputs = ds.train_images[idx]
        if cache is not None:
            if cache.update(
                phases.frozen_prefix(), {"params": state.params, "batch_stats": state.batch_stats}
            ):
                feature_seconds[step] = cache.seconds
            if cache.features is not None:
                inputs = cache.features[idx]
        batch = {"image": inputs, "label": ds.train_labels[idx]}
        if step == 0 or change is not None:
            seen.append(
                {"start": step, "spec": steps.spec.describe(), "steps": steps, "batch": batch}
            )
        state, metrics = steps.train_step(state, batch)
        jax.block_until_ready(state.params)  # each step timed to its end
        if step == 0 or change is not None:  # compiles, unless compiled ahead
            first_steps.append((step, time.perf_counter() - before))
        else:
            step_seconds.append(time.perf_counter() - before)
            phase_seconds.setdefault(first_steps[-1][0], []).append(step_seconds[-1])
        if policy is not None:
            policy.observe(metrics)
            if args.compile_ahead and policy.forecast_due():  # the guess, from its norms
                guess = foresee()
        if (step + 1) % args.eval_every == 0 or step + 1 == total:
            elapsed += time.perf_counter() - clock
            evaluated = time.perf_counter()
            curve.append((elapsed, step + 1, _accuracy(steps, state, ds, args.batch_size)))
            eval_seconds += time.perf_counter() - evaluated
            yield
            clock = time.perf_counter()
    phases.close(wait=True)  # nothing compiled ahead runs on into the next run's turn
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
        "median_step": float(np.median(step_seconds)),
        # Each phase change's first step (its decision and `Phases.update` included)
        # over the run's median step.
        "stalls": [(start, sec / float(np.median(step_seconds))) for start, sec in first_steps[1:]],
        # The same over the median step of the phase it begins: what the change adds.
        "phase_stalls": [
            (start, sec / float(np.median(phase_seconds[start])))
            for start, sec in first_steps[1:]
            if phase_seconds.get(start)
        ],
        # Of which computing the new prefix's features (auto+cache), in seconds.
        "feature_seconds": feature_seconds,
        # AutoFreeze's changes: whether the phase last foreseen was the one decided.
        "guessed": guessed,
        "eval_seconds": eval_seconds,
        "cache_mib": 0.0 if cache is None else cache.nbytes / 2**20,
    }


def interleave(runs: Sequence[Generator[None, None, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Runs `fine_tune` generators in turns, one evaluation interval each; their results.

    On a shared machine the load drifts over minutes (in sequential runs,
    identical steps took 1.0 to 1.9 s per 10 in different runs); in turns,
    every run sees the same drift, as `freeze_cost` times its rows round-robin.
    """
    results: list[dict[str, Any] | None] = [None] * len(runs)
    active = list(range(len(runs)))
    while active:
        for i in tuple(active):
            try:
                next(runs[i])
            except StopIteration as done:
                results[i] = done.value
                active.remove(i)
    return results


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adds time to the target accuracy (full final - 0.5 points) and speed-ups."""
    target = results[0]["final_accuracy"] - TOLERANCE
    for r in results:
        hit = next(((t, s) for t, s, acc in r["curve"] if acc >= target), None)
        r["target_accuracy"] = target
        r["seconds_to_target"] = None if hit is None else hit[0]
        r["step_at_target"] = None if hit is None else hit[1]
        # Deterministic, unlike the seconds: the compiled work of the steps before the hit.
        r["tflops_to_target"] = (
            None
            if hit is None
            else sum(
                p["gflops"] * max(0, min(p["start"] + p["steps"], hit[1]) - p["start"])
                for p in r["phases"]
            )
            / 1e3
        )
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
        base_flops = results[0]["tflops_to_target"]
        r["flops_to_target_ratio"] = (
            None if hit is None or base_flops is None else base_flops / r["tflops_to_target"]
        )
    return results


def format_markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| run | final acc | s to target (incl. compile) | speed-up | s to target excl. compile"
        " | step at target | TFLOP to target | total s | compile s | train TFLOP"
        " | median step ms | changes: step (first step / median; / its phase's median) | eval s"
        " | phases: start GFLOP/step (spec) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in results:
        reached = r["seconds_to_target"] is not None
        hit = f"{r['seconds_to_target']:.1f}" if reached else "not reached"
        speed = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"
        warm = (
            f"{r['warm_seconds']:.1f} ({r['warm_speedup']:.2f}x)"
            if r["warm_speedup"] is not None
            else "-"
        )
        step = str(r["step_at_target"]) if reached else "-"
        work = (
            f"{r['tflops_to_target']:.3f} ({r['flops_to_target_ratio']:.2f}x)"
            if r["flops_to_target_ratio"] is not None
            else "-"
        )
        phases = "; ".join(f"{p['start']}: {p['gflops']:.2f} ({p['spec']})" for p in r["phases"])
        stalls = (
            "; ".join(
                f"{start}: {x:.1f}x"
                + _own_note(r.get("phase_stalls", ()), start)
                + _features_note(r["feature_seconds"], start, x, r["median_step"])
                + _guess_note(r["guessed"], start)
                for start, x in r["stalls"]
            )
            or "-"
        )
        lines.append(
            f"| {r['run']} | {r['final_accuracy']:.4f} | {hit} | {speed} | {warm} | {step} | "
            f"{work} | {r['seconds']:.1f} | {r['compile_seconds']:.1f} | "
            f"{r['total_tflops']:.2f} ({r['flops_ratio']:.2f}x) | {1e3 * r['median_step']:.0f} | "
            f"{stalls} | {r['eval_seconds']:.1f} | {phases} |"
        )
    return "\n".join(lines)


def _own_note(phase_stalls: Sequence[Sequence[float]], start: int) -> str:
    """`" (1.4x its phase's)"`: the change's first step over its own phase's median step."""
    own = [x for s, x in phase_stalls if s == start]
    return f" ({own[0]:.1f}x its phase's)" if own else ""


def _features_note(seconds: dict[int, float], start: int, stall: float, median: float) -> str:
    """`" (features 0.80 s; 12.3x without)"` for a change that computed cached features."""
    if start not in seconds:
        return ""
    return f" (features {seconds[start]:.2f} s; {stall - seconds[start] / median:.1f}x without)"


def _guess_note(guessed: dict[int, bool | str], start: int) -> str:
    """`", guessed"`, `", guessed earlier"` or `", not guessed"` for an AutoFreeze change
    (`start` as a JSON key or not)."""
    hit = guessed.get(start, guessed.get(str(start)))
    if hit is None:
        return ""
    return {True: ", guessed", "earlier": ", guessed earlier"}.get(hit, ", not guessed")


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


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def setup_line(args: argparse.Namespace, source: Task, target: Task, accuracy: float) -> str:
    """The run's settings in words, for the console and the markdown section."""
    epoch = target.num_train // args.batch_size
    return (
        f"{model_title(args)} on {args.image_size}x{args.image_size} digits; "
        f"source: digits 0-4 ({source.num_train} train / {len(source.test_labels)} test), "
        f"{args.source_steps} steps from scratch at peak lr {args.source_lr:g}, test accuracy "
        f"{accuracy:.4f}; target: digits 5-9 ({target.num_train} train / "
        f"{len(target.test_labels)} test, {epoch} steps per epoch), {args.steps} steps of "
        f"batch {args.batch_size}, AdamW lr {args.lr:g} (warmup {args.steps // 10} steps, "
        f"cosine), evaluated every {args.eval_every} steps; FreezeOut t0 {args.t0} "
        f"{args.scaling}; AutoFreeze interval {args.interval} steps, percentile "
        f"{args.percentile:g}"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags, checked; those left unset take `--model`'s defaults (`MODELS`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: small and short")
    parser.add_argument(
        "--model",
        default="resnet18",
        choices=list(MODELS),
        help="resnet18: a CIFAR ResNet-18; vit: a small ViT with scanned blocks",
    )
    parser.add_argument(
        "--width", type=int, default=None, help="ResNet: 16; ViT: its token width, 192"
    )
    parser.add_argument(
        "--image_size", type=int, default=32, choices=IMAGE_SIZES, help="8 is the native size"
    )
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--source_steps", type=int, default=300)
    parser.add_argument(
        "--source_lr", type=float, default=None, help="source peak rate (ResNet 3e-3, ViT 5e-4)"
    )
    parser.add_argument(
        "--source_cache",
        default="/tmp/layerfreeze_auto_freeze",
        help="folder of trained source models, one file per setting ('' trains afresh)",
    )
    parser.add_argument(
        "--steps", type=int, default=210, help="target fine-tuning steps (210: 10 epochs)"
    )
    parser.add_argument("--eval_every", type=int, default=10)
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="fine-tuning peak rate (ResNet 3e-4, a tenth of the source's; ViT 5e-4)",
    )
    parser.add_argument(
        "--interval",
        type=int,
        default=None,
        help="AutoFreeze: steps between decisions (default: a tenth of --steps)",
    )
    parser.add_argument("--percentile", type=float, default=50.0, help="AutoFreeze percentile")
    parser.add_argument("--t0", type=float, default=0.8, help="FreezeOut t0")
    parser.add_argument("--scaling", default="cubic", choices=list(lf.auto.SCALINGS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--runs",
        default=None,
        help=f"comma-separated, from {', '.join(RUNS)} (the ViT: all but auto+cache, its "
        "default); full first (it sets the target)",
    )
    parser.add_argument("--warmup_steps", type=int, default=20, help="untimed, before the runs")
    parser.add_argument(
        "--compile_ahead",
        action="store_true",
        help="train.Phases(compile_ahead=True): the phases to come compiled on a background "
        "thread (AutoFreeze: its likeliest next phase); implies --sequential",
    )
    parser.add_argument(
        "--no_warm_up",
        action="store_true",
        help="with --compile_ahead: train.Phases(warm_up=False), a program compiled ahead "
        "first runs at its phase's first step (on the CPU it runs once ahead on zeros)",
    )
    parser.add_argument(
        "--spare_core",
        action="store_true",
        help="Linux: the steps (and XLA's threads) on every core but the last, the compile "
        "worker alone on the last one: a machine with a core to spare for compiling ahead",
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="the runs one after the other, not in turns (a background compile then overlaps "
        "only its own run's steps)",
    )
    parser.add_argument(
        "--compilation_cache",
        default="",
        help="JAX's persistent compilation cache in this folder ('' = off): a second "
        "invocation reads back what the first compiled",
    )
    parser.add_argument(
        "--plot",
        default=None,
        help="the plot's file ('' = none; default benchmarks/auto_freeze.png, the ViT's "
        "benchmarks/auto_freeze_vit.png)",
    )
    parser.add_argument("--json", default="")
    parser.add_argument("--markdown", default="", help="append a section to this file")
    args = parser.parse_args(argv)
    choice = MODELS[args.model]
    for name in ("width", "source_lr", "lr", "plot"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(choice, name))
    if args.runs is None:
        args.runs = ",".join(choice.runs)
    if args.quick:
        args.width, args.image_size, args.source_steps, args.steps = choice.quick_width, 8, 30, 40
        args.eval_every, args.interval = 10, 5
    runs = args.runs.split(",")
    if not runs or runs[0] != "full" or any(r not in choice.runs for r in runs):
        others = [r for r in RUNS if r not in choice.runs]
        why = f"; {', '.join(others)}: the ResNet only" if others else ""
        parser.error(
            f"--runs must start with full and name runs from {', '.join(choice.runs)} "
            f"(--model {args.model}{why}); got {args.runs!r}"
        )
    if args.interval is None:
        args.interval = max(1, args.steps // 10)
    for name in ("width", "batch_size", "source_steps", "steps", "eval_every", "interval"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.model == "vit" and args.width % VIT_HEADS:
        parser.error(f"--width must be a multiple of the ViT's {VIT_HEADS} heads, got {args.width}")
    if args.warmup_steps < 0:
        parser.error(f"--warmup_steps must be >= 0, got {args.warmup_steps}")
    if args.spare_core and len(getattr(os, "sched_getaffinity", lambda _: ())(0)) < 2:
        parser.error("--spare_core needs Linux and at least 2 cores this process may use")
    return args


def spare_core() -> str:
    """Keeps the last usable core for the compile worker, every other one for the rest.

    Every thread of the process so far (XLA's pools among them) moves to the
    other cores, and the threads started later inherit that from the thread
    starting them; the worker's first job then moves the worker's own thread
    to the last core.
    """
    cores = sorted(os.sched_getaffinity(0))
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores[:-1])
        except ProcessLookupError:  # ended meanwhile
            pass
    job = _ahead.submit((-1,), lambda: os.sched_setaffinity(0, cores[-1:]))
    _ahead.wait(job)
    job.result()
    return f"steps on cores {cores[:-1]}, the compile worker on core {cores[-1]}"


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    pinned = spare_core() if args.spare_core else ""
    if args.compilation_cache:
        platform.enable_compilation_cache(args.compilation_cache)
    load_before, clock = _load(), time.perf_counter()
    source, target = load_digits_tasks(args.seed, image_size=args.image_size)
    model, groups = build_model(args)
    variables, source_accuracy = source_variables(model, source, args)
    setup = setup_line(args, source, target, source_accuracy)
    if pinned:
        setup += f"; {pinned}"
    print(setup)
    warm = warm_up(model, variables, target, args)
    print(f"warm-up: {args.warmup_steps} untimed steps in {warm:.1f}s")
    runs = args.runs.split(",")
    tuned = [fine_tune(kind, model, groups, variables, target, args) for kind in runs]
    if args.compile_ahead or args.sequential:
        results = [interleave([run])[0] for run in tuned]
    else:
        results = interleave(tuned)
    for r in results:
        print(
            f"{r['run']}: final accuracy {r['final_accuracy']:.4f} in {r['seconds']:.1f}s "
            f"(compile {r['compile_seconds']:.1f}s); phases: "
            + "; ".join(f"{p['start']}: {p['spec']}" for p in r["phases"])
        )
    results = summarise(results)
    table = format_markdown(results)
    load = f"load average (1/5/15 min) {load_before} before, {_load()} after"
    wall = f"{time.perf_counter() - clock:.0f} s in all"
    print(f"{table}\n{load}; {wall}")
    if args.plot:
        plot(results, args.plot)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {"args": vars(args), "setup": setup, "load": load, "results": results}, f, indent=2
            )
    if args.markdown:
        command = command_line("auto_freeze.py", argv)
        with open(args.markdown, "a", encoding="utf-8") as f:
            f.write(
                "\n## auto_freeze: time to accuracy, digits 0-4 -> 5-9, "
                f"{model_title(args)}\n\n"
                f"Machine: {machine_description()}; {load}; {wall}.\n\n"
                f"Setup: {setup}.\n\nCommand: `{command.strip()}`\n\n{table}\n"
            )
    return results


if __name__ == "__main__":
    main()
