"""What frozen-feature caching saves: epoch wall time of head-only training.

A CIFAR ResNet-18 (full width by default) trains only its head (`all-but:head`,
clipped AdamW) on a synthetic CIFAR-shaped train set, without augmentation,
three ways:

* uncached: every step runs the frozen backbone forward on the images
  (`train.make_steps` already skips its backward pass);
* first cached epoch: `features.compute_features` over the whole train set
  (pooled `stage4` output, what the head reads), then an epoch of steps
  with `start_after="stage4"`;
* later cached epochs: the steps alone.

Batches follow `data.batch_indices`, as in `experiments/cifar.py`. All
functions are compiled and warmed up before timing; each epoch ends with
`block_until_ready`. The two epoch-0 runs start from the same state, so their
losses must agree (printed as `max loss rel diff`). Wall time on shared
machines is noisy: read it as ratios within one run.

Commands:
  python benchmarks/feature_cache.py                       # 1024 images, batch 64
  python benchmarks/feature_cache.py --json /tmp/feature_cache.json
  python benchmarks/feature_cache.py --train_size 512 --width 16 --later_epochs 2
"""

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Run as a script, this file's folder is on sys.path.
from report import command_line, machine_description

from layerfreeze import train
from layerfreeze.models import GROUPS, resnet18
from layerfreeze.train import data, features
from layerfreeze.train.platform import cpu_conv_options

SPEC = "all-but:head"
TARGET_RATIO = 0.10  # later cached epoch / uncached epoch, on CPU


def _identity(rng: jax.Array, x: jax.Array) -> jax.Array:
    return x


def _normalize(rng: jax.Array, x: jax.Array) -> jax.Array:
    return data.normalize(x)


def _run_epoch(
    steps: train.TrainSteps,
    state: train.TrainState,
    inputs: np.ndarray,
    labels: np.ndarray,
    *,
    epoch: int,
    batch_size: int,
    seed: int,
) -> tuple[train.TrainState, list[float]]:
    """One epoch of train steps over `inputs` in `data.batch_indices` order."""
    num = len(labels)
    spe = data.steps_per_epoch(num, batch_size)
    losses = []
    for step in range(epoch * spe, (epoch + 1) * spe):
        idx = data.batch_indices(seed, step, num, batch_size)
        state, metrics = steps.train_step(state, {"image": inputs[idx], "label": labels[idx]})
        losses.append(metrics["loss"])
    jax.block_until_ready(state)
    return state, [float(v) for v in jax.device_get(losses)]


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure(
    *,
    train_size: int = 1024,
    batch_size: int = 64,
    width: int = 64,
    later_epochs: int = 3,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Times uncached and cached head-only epochs; returns the numbers as a dict."""
    if later_epochs < 1:
        raise ValueError(f"later_epochs must be >= 1; got {later_epochs}.")
    dataset = data.make_synthetic(num_train=train_size, num_test=1, seed=seed)
    images, labels = dataset.train_images, dataset.train_labels
    spe = data.steps_per_epoch(train_size, batch_size)
    model = resnet18(dataset.num_classes, stem="cifar", width=width)
    variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, *data.IMAGE_SHAPE)), train=False))(
        jax.random.key(seed)
    )
    params = variables["params"]
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=5e-4))
    prefix = features.frozen_prefix(params, SPEC, GROUPS[:-1])
    assert prefix == "stage4", prefix
    conv = cpu_conv_options()
    uncached = train.make_steps(
        model, optimizer, SPEC, params, preprocess=_normalize, compiler_options=conv
    )
    cached = train.make_steps(
        model, optimizer, SPEC, params, preprocess=_identity, start_after=prefix,
        compiler_options=conv,
    )  # fmt: skip

    def cache() -> np.ndarray:
        return features.compute_features(
            model,
            variables,
            images,
            upto=prefix,
            preprocess=data.normalize,
            batch_size=batch_size,
            pool=True,
        )

    def fresh() -> train.TrainState:
        return uncached.init_state(variables, jax.random.key(seed + 1))

    log(f"warm-up: compiling (resnet18 width {width}, batch {batch_size}, {spe} steps/epoch)")
    first = data.batch_indices(seed, 0, train_size, batch_size)
    warm = features.compute_features(
        model,
        variables,
        images[first],
        upto=prefix,
        preprocess=data.normalize,
        batch_size=batch_size,
        pool=True,
    )
    for steps, inputs in ((uncached, images[first]), (cached, warm)):
        state = fresh()
        for _ in range(2):
            state, metrics = steps.train_step(state, {"image": inputs, "label": labels[first]})
        jax.block_until_ready(metrics)

    (_, uncached_losses), uncached_s = _timed(
        lambda: _run_epoch(
            uncached, fresh(), images, labels, epoch=0, batch_size=batch_size, seed=seed
        )
    )
    log(f"uncached epoch: {uncached_s:.3f} s")

    feats, cache_s = _timed(cache)
    (state, cached_losses), first_train_s = _timed(
        lambda: _run_epoch(
            cached, fresh(), feats, labels, epoch=0, batch_size=batch_size, seed=seed
        )
    )
    first_s = cache_s + first_train_s
    log(
        f"first cached epoch: {first_s:.3f} s (cache {cache_s:.3f} s + train {first_train_s:.3f} s)"
    )
    later = []
    for epoch in range(1, later_epochs + 1):
        (state, _), seconds = _timed(
            lambda state=state, epoch=epoch: _run_epoch(
                cached, state, feats, labels, epoch=epoch, batch_size=batch_size, seed=seed
            )
        )
        later.append(seconds)
    later_s = statistics.median(later)
    log(f"later cached epoch (median of {later_epochs}): {later_s:.4f} s")

    loss_diff = float(
        np.max(np.abs(np.subtract(cached_losses, uncached_losses)) / np.abs(uncached_losses))
    )
    return {
        "model": "resnet18",
        "stem": "cifar",
        "width": width,
        "spec": SPEC,
        "prefix": prefix,
        "train_size": train_size,
        "batch_size": batch_size,
        "steps_per_epoch": spe,
        "feature_shape": list(feats.shape),
        "feature_mib": feats.nbytes / 2**20,
        "uncached_epoch_s": uncached_s,
        "cache_s": cache_s,
        "first_cached_train_s": first_train_s,
        "first_cached_epoch_s": first_s,
        "later_cached_epoch_s": later_s,
        "later_cached_epochs_s": later,
        "ratio_later_cached_to_uncached": later_s / uncached_s,
        "ratio_first_cached_to_uncached": first_s / uncached_s,
        "target_ratio": TARGET_RATIO,
        "max_loss_rel_diff": loss_diff,
        "machine": machine_description(),
    }


def format_result(r: dict[str, Any]) -> str:
    """A short human-readable summary of `measure`'s result."""
    return "\n".join(
        [
            f"resnet18 (cifar stem, width {r['width']}), {r['spec']}, {r['train_size']} images, "
            f"batch {r['batch_size']} ({r['steps_per_epoch']} steps/epoch)",
            f"cached features: {tuple(r['feature_shape'])} float32, {r['feature_mib']:.2f} MiB",
            f"uncached epoch          {r['uncached_epoch_s']:9.3f} s",
            f"first cached epoch      {r['first_cached_epoch_s']:9.3f} s "
            f"(cache {r['cache_s']:.3f} s + train {r['first_cached_train_s']:.3f} s)  "
            f"x{r['ratio_first_cached_to_uncached']:.2f}",
            f"later cached epoch      {r['later_cached_epoch_s']:9.4f} s  "
            f"x{r['ratio_later_cached_to_uncached']:.4f} (target <= {r['target_ratio']})",
            f"max loss rel diff, cached vs uncached epoch 0: {r['max_loss_rel_diff']:.1e}",
        ]
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--train_size", type=int, default=1024, help="synthetic train images")
    parser.add_argument("--batch_size", type=int, default=64, help="train and feature batch")
    parser.add_argument("--width", type=int, default=64, help="ResNet base width (64 = full)")
    parser.add_argument("--later_epochs", type=int, default=3, help="cached epochs after the first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    for name in ("train_size", "batch_size", "width", "later_epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1; got {getattr(args, name)}.")
    if args.batch_size > args.train_size:
        parser.error(
            f"--batch_size={args.batch_size} is larger than --train_size={args.train_size}."
        )
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark from command-line arguments; returns the result."""
    args = parse_args(argv)
    command = command_line("feature_cache.py", argv)
    print(f"machine: {machine_description()}", flush=True)
    result = measure(
        train_size=args.train_size,
        batch_size=args.batch_size,
        width=args.width,
        later_epochs=args.later_epochs,
        seed=args.seed,
        log=lambda msg: print(msg, flush=True),
    )
    result["command"] = command.strip()
    print()
    print(format_result(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return result


if __name__ == "__main__":
    main()
