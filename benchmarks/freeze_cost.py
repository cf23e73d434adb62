"""What freezing saves: compiled FLOPs, memory and step time of layerfreeze's train step.

For each (model, freeze spec) row of `ROWS`, builds `layerfreeze.train.make_steps` under both
methods (`zero`, `lr0`) with a clipped AdamW (the global-norm clip is on purpose:
it is what brings frozen backward work back in a naive step), and reports

* compiled FLOPs and temp bytes (`cost_analysis`, `memory_analysis`): exact and
  deterministic;
* optimizer-state bytes;
* the median wall time of a step (random uint8 images), timed round-robin over
  all configurations of a model so that machine-load drift hits every row alike;
* ratios to the all-trainable step of the same run (`xfull`) and the FLOPs
  ratio to an "ideal" hand-written step (`xideal`) that differentiates only
  the trainable parameters and runs the same optimizer on them alone.

Models: CIFAR ResNet-18, ResNet-50 (ImageNet stem), and ViT-Ti/4 on 32x32
images, with its blocks unrolled (`vit_ti4`) or stacked by `nn.scan`
(`vit_ti4_scan`; its scans fully unrolled, since XLA's cost analysis counts a loop body
once). A scanned row freezing some blocks (`Transformer/encoderblock[:6]`) has as ideal the
unrolled model with the same blocks frozen.

Wall time on shared machines is noisy: read it only as a ratio within one run.

Commands:
  python benchmarks/freeze_cost.py --quick
  python benchmarks/freeze_cost.py --models vit_ti4 --steps 3
  python benchmarks/freeze_cost.py --json /tmp/freeze_cost.json \
      --markdown /tmp/freeze_cost.md --plot benchmarks/freeze_cost.png
"""

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

# Run as a script, this file's folder is on sys.path.
from report import (
    check_choices,
    command_line,
    machine_description,
    markdown_table,
    parse_list,
    text_table,
    write_json,
)

import layerfreeze
from layerfreeze.models import create_model, create_vit, unstack_blocks, vit_groups
from layerfreeze.train import make_steps
from layerfreeze.train.platform import cpu_conv_options


class ModelSetup(NamedTuple):
    """How a model is benchmarked.

    Attributes:
      name: the name the model is built from (`create_model` or `create_vit`).
      image_size: image side in pixels.
      batch_size: default images per step.
      kwargs: further constructor arguments (a ResNet's stem, a ViT's `scan`).
    """

    name: str
    image_size: int
    batch_size: int
    kwargs: dict[str, Any]


MODELS: dict[str, ModelSetup] = {
    "resnet18": ModelSetup("resnet18", 32, 32, {"stem": "cifar"}),
    "resnet50": ModelSetup("resnet50", 224, 4, {"stem": "imagenet"}),
    "vit_ti4": ModelSetup("vit_ti4", 32, 32, {}),
    # XLA's cost analysis counts a loop body once: the scan is unrolled so that
    # FLOPs count every block (the blocks still run as scans over stacked leaves).
    "vit_ti4_scan": ModelSetup("vit_ti4", 32, 32, {"scan": True, "scan_unroll": True}),
}
# A ResNet's specs, ordered by depth: 0 stages frozen ... 4 (everything but the head).
FREEZES: tuple[str, ...] = (
    "none",
    "stem,stage1",
    "stem,stage1,stage2",
    "stem,stage1,stage2,stage3",
    "all-but:head",
)
_VIT_DEPTH = 12  # ViT-Ti's
_VIT_EMBEDDINGS = ",".join(vit_groups(_VIT_DEPTH)[:3])  # embedding,pos_embedding,cls
_VIT_HALF = ",".join(vit_groups(_VIT_DEPTH)[: 3 + _VIT_DEPTH // 2])  # ... blocks 0-5
# With stacked blocks, freezing blocks 0-5 selects rows of each stacked leaf.
_VIT_SCAN_HALF = _VIT_EMBEDDINGS + f",Transformer/encoderblock[:{_VIT_DEPTH // 2}]"
# The ViT's specs, ordered by depth: nothing, the embeddings, the embeddings and the
# first half of the blocks, everything but the head.
VIT_FREEZES: tuple[str, ...] = ("none", _VIT_EMBEDDINGS, _VIT_HALF, "all-but:head")
VIT_SCAN_FREEZES: tuple[str, ...] = ("none", _VIT_EMBEDDINGS, _VIT_SCAN_HALF, "all-but:head")
# The rows measured, as (model, freeze spec) pairs; each model's specs in depth order.
ROWS: tuple[tuple[str, str], ...] = (
    *(("resnet18", f) for f in FREEZES),
    *(("resnet50", f) for f in FREEZES),
    *(("vit_ti4", f) for f in VIT_FREEZES),
    *(("vit_ti4_scan", f) for f in VIT_SCAN_FREEZES),
)
FREEZE_LABELS: dict[str, str] = {
    "none": "none",
    "stem,stage1": "stem+s1",
    "stem,stage1,stage2": "stem+s1-2",
    "stem,stage1,stage2,stage3": "stem+s1-3",
    "all-but:head": "all but head",
    _VIT_EMBEDDINGS: "emb",
    _VIT_HALF: "emb+blocks 0-5",
    _VIT_SCAN_HALF: "emb+blocks[:6]",
}


def model_freezes(model_name: str) -> tuple[str, ...]:
    """The freeze specs `ROWS` measures for `model_name`, in depth order."""
    check_choices("model", [model_name], list(MODELS))
    return tuple(f for m, f in ROWS if m == model_name)


def freeze_label(freeze: str) -> str:
    """A short name of a freeze spec for tables and plots (the spec if it has none)."""
    return FREEZE_LABELS.get(freeze, freeze)


def build_model(
    model_name: str,
    *,
    width: int | None = None,
    dtype: str = "float32",
    **overrides: Any,
) -> Any:
    """The model of `MODELS[model_name]`, `NUM_CLASSES` outputs.

    Args:
      model_name: a key of `MODELS`.
      width: a ResNet's base channels (default 64) or a ViT's token width
        (default: the size's).
      dtype: compute dtype, a key of `DTYPES`.
      **overrides: further constructor arguments, e.g. a small ViT's `depth`,
        `mlp_dim` and `num_heads` for tests.
    """
    check_choices("model", [model_name], list(MODELS))
    check_choices("dtype", [dtype], list(DTYPES))
    setup = MODELS[model_name]
    kwargs = {**setup.kwargs, **overrides, "dtype": DTYPES[dtype]}
    if width is not None:
        kwargs["width"] = width
    if setup.name.startswith("vit_"):
        return create_vit(setup.name, num_classes=NUM_CLASSES, **kwargs)
    return create_model(setup.name, num_classes=NUM_CLASSES, **kwargs)


METHODS: tuple[str, ...] = ("zero", "lr0")
DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ROW_KEYS: tuple[str, ...] = (
    "model",
    "freeze",
    "method",
    "flops",
    "flops_ratio_full",
    "flops_ratio_ideal",
    "temp_bytes",
    "opt_state_bytes",
    "step_ms",
    "step_ratio_full",
)
IDEAL_TOLERANCE = 1.01
NUM_CLASSES = 10
_MIB = 2**20


def _tree_bytes(tree: Any) -> int:
    """Bytes of every array leaf of `tree` (shapes and dtypes are enough)."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def make_optimizer() -> optax.GradientTransformation:
    """The benchmarked optimizer: clipping, then AdamW."""
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=1e-4))


def init_variables(model: Any, image_size: int, seed: int = 0) -> dict[str, Any]:
    """Variables of the model's shapes, He-normal kernels, unit BN scales and variances.

    The values only need to be sane (no NaN, no denormals slowing the CPU): the
    costs measured here do not depend on them. Avoids compiling `model.init`,
    which takes 10-20 s on a CPU.
    """
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda r, x: model.init(r, x, train=False), jax.random.key(0), x)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape)
        elif name in ("scale", "var"):
            value = np.ones(leaf.shape)
        else:
            value = np.zeros(leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _ideal_setup(model: Any, params: Any, freeze: str) -> tuple[Any, Any, Any]:
    """The model, params and spec of `freeze`'s ideal step.

    A spec that freezes some blocks of stacked leaves cannot be split leaf by
    leaf; its ideal is the unrolled model's with the same blocks frozen (the
    same computation, each block its own leaves).
    """
    resolved = layerfreeze.FreezeSpec.parse(freeze).resolve_blocks(params)
    if all(isinstance(f, bool) for f in resolved.values()):
        return model, params, freeze
    frozen = []
    for path, state in resolved.items():
        head, _, rest = path.partition("/encoderblock/")
        if not rest:
            frozen += [path] if state else []
            continue
        rows = state if isinstance(state, tuple) else (state,) * model.depth
        frozen += [f"{head}/encoderblock_{i}/{rest}" for i, f in enumerate(rows) if f]
    spec = layerfreeze.FreezeSpec(tuple(frozen))
    return model.clone(scan=False), unstack_blocks(params), spec


def make_ideal_step(
    model: Any,
    optimizer: optax.GradientTransformation,
    params: dict[str, Any],
    freeze: str,
) -> tuple[Callable[..., Any], Callable[[dict[str, Any]], tuple[Any, Any, Any]]]:
    """A hand-written step that differentiates the trainable parameters only.

    The parameters are split leaf by leaf (by `layerfreeze.frozen_mask`) into
    a trainable and a frozen nested dict; `jax.value_and_grad` runs w.r.t. the
    trainable dict, `optimizer` sees the trainable dict alone, and frozen
    groups' BatchNorm runs on running statistics. No freezing library in the
    step: this is the cost to beat. (A spec that freezes part of a stacked
    leaf cannot be split this way; its ideal is the unrolled model's.)

    Returns:
      `(step, split)`: the jitted `step(trainable, frozen, batch_stats,
      opt_state, batch)` and `split(params) -> (trainable, frozen, opt_state)`.
    """
    frozen_paths = {
        path
        for path, is_frozen in traverse_util.flatten_dict(
            layerfreeze.frozen_mask(params, freeze)
        ).items()
        if is_frozen
    }

    def split(params):
        flat = traverse_util.flatten_dict(params)
        trainable = {k: v for k, v in flat.items() if k not in frozen_paths}
        frozen = {k: v for k, v in flat.items() if k in frozen_paths}
        trainable, frozen = (
            traverse_util.unflatten_dict(trainable),
            traverse_util.unflatten_dict(frozen),
        )
        return trainable, frozen, optimizer.init(trainable)

    def merge(frozen, trainable):
        flat = {**traverse_util.flatten_dict(frozen), **traverse_util.flatten_dict(trainable)}
        return traverse_util.unflatten_dict(flat)

    def step(trainable, frozen, batch_stats, opt_state, batch):
        images = batch["image"].astype(jnp.float32)

        def loss_fn(trainable):
            merged = merge(frozen, trainable)
            with layerfreeze.frozen_batchnorm(merged, freeze):
                logits, updates = model.apply(
                    {"params": merged, "batch_stats": batch_stats},
                    images,
                    train=True,
                    mutable=["batch_stats"],
                )
            loss = optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), batch["label"]
            ).mean()
            return loss, updates.get("batch_stats", batch_stats)

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), batch_stats, opt_state, loss

    return jax.jit(step, donate_argnums=(0, 2, 3)), split


def _compiled_cost(compiled: Any) -> tuple[float, int]:
    cost = compiled.cost_analysis()
    # Older jax returned a list with one dict per computation.
    if isinstance(cost, list):
        cost = cost[0]
    return float(cost["flops"]), int(compiled.memory_analysis().temp_size_in_bytes)


def measure_model(
    model_name: str,
    *,
    batch_size: int | None = None,
    image_size: int | None = None,
    width: int | None = None,
    dtype: str = "float32",
    freezes: Sequence[str] | None = None,
    model_kw: dict[str, Any] | None = None,
    methods: Sequence[str] = METHODS,
    steps: int = 10,
    warmup: int = 3,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Measures every (freeze, method) of one model; returns one row dict each.

    Args:
      model_name: a key of `MODELS`.
      batch_size: images per step (default: the model's, see `MODELS`).
      image_size: image side (default: the model's).
      width: a ResNet's channels of the stem and stage1 (default 64, the real
        ResNet), or a ViT's token width (default: the size's); smaller for tests.
      dtype: compute dtype, a key of `DTYPES`.
      freezes: freeze specs (default: the model's in `ROWS`); `none` is
        measured first whether listed or not, as the all-trainable baseline
        of the ratios. Each must resolve against the model's parameters.
      model_kw: further constructor arguments (a small ViT's `depth`, ...).
      methods: freeze methods, from `METHODS`.
      steps: timed steps per configuration (median reported).
      warmup: untimed steps per configuration before timing.
      seed: seed of the parameters and the random batch.
      log: progress messages go here.

    Returns:
      Rows with the keys of `ROW_KEYS`, plus `label` (`freeze_label`),
      `step_ms_samples` (every timed step), `trainable_params`, `ideal_flops`,
      `batch_size`, `image_size` and `dtype`.
    """
    check_choices("model", [model_name], list(MODELS))
    check_choices("dtype", [dtype], list(DTYPES))
    check_choices("method", list(methods), list(METHODS))
    if freezes is None:
        freezes = model_freezes(model_name)
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0; got {steps} and {warmup}.")
    setup = MODELS[model_name]
    batch_size = batch_size or setup.batch_size
    image_size = image_size or setup.image_size
    freezes = ["none"] + [f for f in dict.fromkeys(freezes) if f != "none"]
    methods = list(dict.fromkeys(methods))
    if "zero" not in methods:
        methods = ["zero", *methods]

    model = build_model(model_name, width=width, dtype=dtype, **(model_kw or {}))
    variables = init_variables(model, image_size, seed)
    variables = {**variables, "batch_stats": variables.get("batch_stats", {})}
    params = variables["params"]
    optimizer = make_optimizer()
    rng = np.random.default_rng(seed)
    batch = {
        "image": jnp.asarray(
            rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
        ),
        "label": jnp.asarray(rng.integers(0, NUM_CLASSES, (batch_size,), dtype=np.int32)),
    }
    key = jax.random.key(seed)

    # Compile everything first; time afterwards, round-robin.
    ideal_flops: dict[str, float] = {}
    configs = []
    for freeze in freezes:
        ideal_model, ideal_params, ideal_freeze = _ideal_setup(model, params, freeze)
        ideal_step, split = make_ideal_step(ideal_model, optimizer, ideal_params, ideal_freeze)
        trainable, frozen, opt_state = jax.eval_shape(split, ideal_params)
        lowered = ideal_step.lower(trainable, frozen, variables["batch_stats"], opt_state, batch)
        ideal_flops[freeze] = _compiled_cost(lowered.compile())[0]
        for method in methods:
            t0 = time.perf_counter()
            train = make_steps(
                model, optimizer, freeze, params, method=method,
                compiler_options=cpu_conv_options(),
            )  # fmt: skip
            abstract = jax.eval_shape(train.init_state, variables, key)
            compiled = train.train_step.lower(abstract, batch).compile()
            flops, temp = _compiled_cost(compiled)
            configs.append(
                {
                    "freeze": freeze,
                    "method": method,
                    "train": train,
                    "compiled": compiled,
                    "flops": flops,
                    "temp_bytes": temp,
                    "opt_state_bytes": _tree_bytes(abstract.opt_state),
                }
            )
            log(
                f"  compiled {model_name} {freeze} {method}: {flops / 1e9:.2f} GFLOP "
                f"({time.perf_counter() - t0:.1f} s)"
            )

    # A fresh key each: `init_state` keeps the key's buffer, and donating one
    # state would delete the rng of every other state built from the same key.
    states = [c["train"].init_state(variables, jax.random.key(seed)) for c in configs]
    times: list[list[float]] = [[] for _ in configs]
    log(f"  timing {len(configs)} configurations: {warmup} warm-up + {steps} timed rounds")
    for round_ in range(warmup + steps):
        for i, config in enumerate(configs):
            t0 = time.perf_counter()
            states[i], metrics = config["compiled"](states[i], batch)
            jax.block_until_ready((states[i], metrics))
            if round_ >= warmup:
                times[i].append(time.perf_counter() - t0)
    del states

    full = configs[0]
    full_ms = 1e3 * statistics.median(times[0])
    rows = []
    for config, samples in zip(configs, times, strict=True):
        step_ms = 1e3 * statistics.median(samples)
        row = {
            "model": model_name,
            "freeze": config["freeze"],
            "label": freeze_label(config["freeze"]),
            "method": config["method"],
            "flops": config["flops"],
            "flops_ratio_full": config["flops"] / full["flops"],
            "flops_ratio_ideal": config["flops"] / ideal_flops[config["freeze"]],
            "temp_bytes": config["temp_bytes"],
            "opt_state_bytes": config["opt_state_bytes"],
            "step_ms": step_ms,
            "step_ratio_full": step_ms / full_ms,
            "step_ms_samples": [round(1e3 * t, 3) for t in samples],
            "trainable_params": config["train"].trainable_params,
            "ideal_flops": ideal_flops[config["freeze"]],
            "batch_size": batch_size,
            "image_size": image_size,
            "dtype": dtype,
        }
        rows.append(row)
    return rows


def ideal_warnings(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Warning lines for frozen method-zero rows that cost more than the ideal step."""
    return [
        f"WARNING: {r['model']} freeze={r['freeze']} method=zero costs "
        f"{r['flops_ratio_ideal']:.3f}x the ideal step's FLOPs (> {IDEAL_TOLERANCE}): "
        "XLA kept frozen work."
        for r in rows
        if r["method"] == "zero" and r["freeze"] != "none"
        if r["flops_ratio_ideal"] > IDEAL_TOLERANCE
    ]


# The freeze column shows `freeze_label` (the JSON rows keep the full spec).
_COLUMNS = (
    ("model", "model", "{}"),
    ("freeze", "label", "{}"),
    ("method", "method", "{}"),
    ("GFLOP", "flops", "{:.2f}"),
    ("xfull", "flops_ratio_full", "{:.3f}"),
    ("xideal", "flops_ratio_ideal", "{:.3f}"),
    ("temp MiB", "temp_bytes", "{:.1f}"),
    ("opt MiB", "opt_state_bytes", "{:.2f}"),
    ("ms/step", "step_ms", "{:.1f}"),
    ("xfull-time", "step_ratio_full", "{:.2f}"),
)


def _cells(row: dict[str, Any]) -> list[str]:
    out = []
    for _, key, fmt in _COLUMNS:
        value = row.get(key, row["freeze"]) if key == "label" else row[key]
        if key == "flops":
            value /= 1e9
        elif key.endswith("_bytes"):
            value /= _MIB
        out.append(fmt.format(value))
    return out


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table, one section per model: text left-aligned, numbers right-aligned."""
    body = [_cells(r) for r in rows]
    return text_table([h for h, _, _ in _COLUMNS], body, sections=[r["model"] for r in rows])


def format_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The table as GitHub markdown."""
    return markdown_table([h for h, _, _ in _COLUMNS], [_cells(r) for r in rows])


def write_markdown(path: str, rows: Sequence[dict[str, Any]], command: str) -> None:
    """Appends a section with the machine, the command and the table to `path`."""
    models = ", ".join(dict.fromkeys(r["model"] for r in rows))
    setups = "; ".join(
        f"{r['model']}: batch {r['batch_size']}, {r['image_size']}x{r['image_size']}, {r['dtype']}"
        for r in {r["model"]: r for r in rows}.values()
    )
    text = (
        f"## freeze_cost: {models}\n\n"
        f"Machine: {machine_description()}.\n\n"
        f"Setup: {setups}.\n\n"
        f"Command: `{command}`\n\n"
        f"{format_markdown(rows)}\n"
    )
    exists = os.path.exists(path) and os.path.getsize(path) > 0
    with open(path, "a", encoding="utf-8") as f:
        f.write(("\n" if exists else "") + text)


def write_plot(path: str, rows: Sequence[dict[str, Any]]) -> None:
    """Two panels against freeze depth: step cost ratios, and temp memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cost_ax, mem_ax) = plt.subplots(1, 2, figsize=(13, 5.2))
    # Blue/green/purple: method zero; red/orange/brown: lr0. Circles: ResNet-18,
    # squares: ResNet-50, triangles: ViT-Ti/4 (filled unrolled, hollow scanned).
    colors = {
        ("resnet18", "zero"): "tab:blue",
        ("resnet50", "zero"): "tab:green",
        ("vit_ti4", "zero"): "tab:purple",
        ("vit_ti4_scan", "zero"): "tab:cyan",
        ("resnet18", "lr0"): "tab:red",
        ("resnet50", "lr0"): "tab:orange",
        ("vit_ti4", "lr0"): "tab:brown",
        ("vit_ti4_scan", "lr0"): "tab:pink",
    }
    markers = {"resnet18": "o", "resnet50": "s", "vit_ti4": "^", "vit_ti4_scan": "v"}
    models = list(dict.fromkeys(r["model"] for r in rows))
    # x: a spec's depth among its model's specs (0: none ... last: all but head).
    depth = {
        (m, f): i
        for m in models
        for i, f in enumerate(dict.fromkeys(r["freeze"] for r in rows if r["model"] == m))
    }
    tick_labels: dict[int, list[str]] = {}
    for (_, f), i in depth.items():
        if freeze_label(f) not in tick_labels.setdefault(i, []):
            tick_labels[i].append(freeze_label(f))
    for model in models:
        for method in METHODS:
            sel = [r for r in rows if r["model"] == model and r["method"] == method]
            if not sel:
                continue
            x = [depth[model, r["freeze"]] for r in sel]
            style = {"color": colors.get((model, method)), "marker": markers.get(model, "^")}
            name = f"{model} {method}"
            cost_ax.plot(
                x, [r["flops_ratio_full"] for r in sel], "-", label=f"{name}: FLOPs", **style
            )
            cost_ax.plot(
                x,
                [r["step_ratio_full"] for r in sel],
                "--",
                mfc="none",
                label=f"{name}: time",
                **style,
            )
            mem_ax.plot(x, [r["temp_bytes"] / _MIB for r in sel], "-", label=name, **style)
    ticks = ["\n".join(tick_labels[i]) for i in sorted(tick_labels)]
    for ax in (cost_ax, mem_ax):
        ax.set_xticks(sorted(tick_labels), ticks)
        ax.set_xlabel("freeze spec, by depth")
        ax.grid(alpha=0.3)
    cost_ax.set_ylabel("train step cost / all-trainable step")
    cost_ax.set_ylim(bottom=0)
    cost_ax.axhline(1.0, color="gray", lw=0.8)
    cost_ax.set_title("Step cost: compiled FLOPs (solid) and wall time (dashed)")
    cost_ax.legend(fontsize=8, ncol=2)
    mem_ax.set_ylabel("compiled temp memory (MiB)")
    mem_ax.set_ylim(bottom=0)
    mem_ax.set_title("Temp memory of the compiled step")
    mem_ax.legend(fontsize=8)
    dtypes = ", ".join(sorted({r["dtype"] for r in rows}))
    setups = ", ".join(
        f"{m} batch {r['batch_size']} @{r['image_size']}px"
        for m, r in {r["model"]: r for r in rows}.items()
    )
    fig.suptitle(
        f"layerfreeze: what freezing saves ({setups}; {dtypes}; "
        f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Compiled FLOPs, memory and step time of frozen train steps.",
    )
    parser.add_argument(
        "--models",
        default=",".join(MODELS),
        help=f"comma-separated, from: {', '.join(MODELS)} (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="resnet18 only, batch 8, 10 steps")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3)")
    parser.add_argument("--batch_size_r18", type=int, default=None, help="default 32 (quick: 8)")
    parser.add_argument("--batch_size_r50", type=int, default=None, help="default 4")
    parser.add_argument("--batch_size_vit", type=int, default=None, help="default 32")
    parser.add_argument("--dtype", default="float32", help=f"one of {', '.join(DTYPES)}")
    parser.add_argument(
        "--methods", default="zero,lr0", help="comma-separated, from: zero, lr0 (default: both)"
    )
    parser.add_argument("--json", default=None, help="write the rows as JSON here")
    parser.add_argument("--markdown", default=None, help="append a markdown table here")
    parser.add_argument("--plot", default=None, help="write a PNG plot here")
    args = parser.parse_args(argv)
    models = parse_list(args.models)
    if args.quick:
        models = ["resnet18"]
        if args.batch_size_r18 is None:
            args.batch_size_r18 = 8
        if args.warmup is None:
            args.warmup = 2
    try:
        if not models:
            raise ValueError(f"--models is empty; valid choices: {', '.join(MODELS)}.")
        check_choices("model", models, list(MODELS))
        check_choices("dtype", [args.dtype], list(DTYPES))
        args.methods = parse_list(args.methods)
        if not args.methods:
            raise ValueError("--methods is empty; valid choices: zero, lr0.")
        check_choices("method", args.methods, ["zero", "lr0"])
    except ValueError as e:
        parser.error(str(e))
    for flag in ("steps", "batch_size_r18", "batch_size_r50", "batch_size_vit"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag} must be a positive integer; got {value}.")
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup must be >= 0; got {args.warmup}.")
    args.models = models
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Runs the benchmark from command-line arguments; returns the rows."""
    args = parse_args(argv)
    command = command_line("freeze_cost.py", argv)
    batch_sizes = {
        "resnet18": args.batch_size_r18,
        "resnet50": args.batch_size_r50,
        "vit_ti4": args.batch_size_vit,
        "vit_ti4_scan": args.batch_size_vit,
    }
    print(f"machine: {machine_description()}", flush=True)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for model in args.models:
        t0 = time.perf_counter()
        print(f"{model}:", flush=True)
        rows += measure_model(
            model,
            batch_size=batch_sizes.get(model),
            dtype=args.dtype,
            steps=args.steps,
            warmup=3 if args.warmup is None else args.warmup,
            methods=tuple(args.methods),
            log=lambda msg: print(msg, flush=True),
        )
        print(f"  {model} done in {time.perf_counter() - t0:.0f} s", flush=True)
    print()
    print(format_table(rows))
    for warning in ideal_warnings(rows):
        print(warning)
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        write_json(args.json, rows)
    if args.markdown:
        write_markdown(args.markdown, rows, command.strip())
    if args.plot:
        write_plot(args.plot, rows)
    return rows


if __name__ == "__main__":
    main()
