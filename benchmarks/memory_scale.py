"""Memory per device of layerfreeze's sharded train step, at 1, 2, 4 and 8 devices.

For each model (default ViT-B/16 and ViT-g/14) and each device count N, a
mesh `{"data": 1, "fsdp": N}` and the rules `[(".*", sharding.fsdp(min_size=...))]`
split the parameters, their gradients and the AdamW state over the N devices,
and the batch with them (`layerfreeze.train.make_steps(..., mesh=mesh,
sharding_rules=rules, frozen_dtype=...)`). For each freeze (`none`, `half`: the embeddings and the
first half of the blocks, `all-but-head`) and each dtype the frozen weights are
stored in (`float32`, `bfloat16`), it reports per device:

* the bytes of the train state (parameters, optimizer state, step, rng): the
  bytes of each leaf's shard, from the state's shardings, summed (as
  `layerfreeze.summary` counts bytes per device), and that against total/N;
* the compiled train step's `memory_analysis()`: arguments, outputs, the
  outputs aliased to (donated) arguments, temporaries, and the step's
  footprint, arguments + outputs - aliased + temporaries (`peak`), against
  that of full fine-tuning (`none`, float32) at the same N;
* whether that footprint fits a stated budget (`--budget_gib`, 16 GiB: a
  V100-16GB or T4-class device).

Two more rows per N > 1, `replicated` (no sharding rules: pure data
parallelism, every device holding the whole state), for full fine-tuning and
for everything but the head frozen in bfloat16: what a model "too large to fit
replicated" means.

Nothing is materialised: the parameters are `jax.eval_shape`d and the step is
lowered and compiled from `ShapeDtypeStruct`s carrying the state's shardings,
so ViT-g/14's 1.0 billion parameters cost no memory here. JAX fixes the number
of devices when it starts: the script runs itself once per N, in a process
with N devices (on a CPU host, `--xla_force_host_platform_device_count=N`),
and collects the rows. The children compile with
`--xla_backend_optimization_level=0`: LLVM's optimisation level changes the
generated code, not XLA's buffer assignment, so the memory numbers are the
same (checked on ViT-B/16 at 2 and 8 devices) and compiling is faster.

The blocks are scanned (`ViT(scan=True)`), as big_vision trains large ViTs;
a stacked leaf whose blocks are only partly frozen cannot hold two dtypes, so
`half` in bfloat16 stores only the embeddings in bfloat16.

Targets: state per device within 5% of total/N (`STATE_TOLERANCE`); all but
the head frozen in bfloat16 at most 0.3x full fine-tuning's footprint per
device at the same N (`FULL_TARGET`). A missed target prints a WARNING line.

Commands:
  python benchmarks/memory_scale.py --quick
  python benchmarks/memory_scale.py --json /tmp/memory_scale.json \
      --markdown /tmp/memory_scale.md
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

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

from layerfreeze.models import VIT_SIZES, ViT
from layerfreeze.train import TrainState, TrainSteps, make_mesh, make_steps, sharding


class ModelSetup(NamedTuple):
    """A ViT measured here (big_vision's sizes), its blocks scanned.

    Attributes:
      name: how tables name it (`ViT-B/16`).
      patch_size: patch side in pixels.
      image_size: image side in pixels.
      width, depth, mlp_dim, num_heads: the size.
      num_classes: outputs of the head.
    """

    name: str
    patch_size: int
    image_size: int
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_classes: int = 1000


MODELS: dict[str, ModelSetup] = {
    "vit_b16": ModelSetup("ViT-B/16", 16, 224, **VIT_SIZES["B"]),
    # big_vision's H and g (arXiv:2106.04560, Table 2): 632M and 1.01B parameters.
    "vit_h14": ModelSetup("ViT-H/14", 14, 224, width=1280, depth=32, mlp_dim=5120, num_heads=16),
    "vit_g14": ModelSetup("ViT-g/14", 14, 224, width=1408, depth=40, mlp_dim=6144, num_heads=16),
}
# Replicated, ViT-g/14 does not fit 16 GiB at any N (its parameters and AdamW
# moments alone are 11.3 GiB); ViT-H/14 does at N=8 (one image per device:
# 11.2 GiB), so the large default is g.
DEFAULT_MODELS: tuple[str, ...] = ("vit_b16", "vit_g14")
DEVICES: tuple[int, ...] = (1, 2, 4, 8)
FREEZES: tuple[str, ...] = ("none", "half", "all-but-head")
FROZEN_DTYPES: tuple[str, ...] = ("float32", "bfloat16")
LAYOUTS: tuple[str, ...] = ("fsdp", "replicated")
# The (freeze, frozen dtype) pairs measured replicated too: the baseline and the target row.
REPLICATED_CONFIGS: tuple[tuple[str, str], ...] = (
    ("none", "float32"),
    ("all-but-head", "bfloat16"),
)
BASELINE = ("none", "float32")
STATE_TOLERANCE = 1.05
FULL_TARGET = 0.3
DEFAULT_BATCH_SIZE = 8
DEFAULT_BUDGET_GIB = 16.0
# 4096 elements: every stacked leaf shards (a ViT-B block's LayerNorm scales
# are 12 x 768); the few that stay whole (cls, the final LayerNorm, the
# head's bias) hold a few KiB.
DEFAULT_MIN_SIZE = 2**12
ROW_KEYS: tuple[str, ...] = (
    "model",
    "devices",
    "layout",
    "freeze",
    "frozen_dtype",
    "state_bytes",
    "state_bytes_per_device",
    "state_ratio_ideal",
    "argument_bytes",
    "output_bytes",
    "alias_bytes",
    "temp_bytes",
    "peak_bytes",
    "state_ratio_full",
    "peak_ratio_full",
    "fits",
)
_MIB = 2**20
_GIB = 2**30


def freeze_spec(freeze: str, depth: int) -> str:
    """The layerfreeze spec of a freeze of `FREEZES` for a scanned ViT of `depth` blocks.

    >>> freeze_spec("half", 12)
    'embedding,pos_embedding,cls,Transformer/encoderblock[:6]'
    """
    check_choices("freeze", [freeze], list(FREEZES))
    if freeze == "half":
        return f"embedding,pos_embedding,cls,Transformer/encoderblock[:{depth // 2}]"
    return {"none": "none", "all-but-head": "all-but:head"}[freeze]


def build_model(setup: ModelSetup) -> ViT:
    """The setup's ViT, blocks scanned, computing in float32."""
    return ViT(
        num_classes=setup.num_classes,
        patch_size=setup.patch_size,
        width=setup.width,
        depth=setup.depth,
        mlp_dim=setup.mlp_dim,
        num_heads=setup.num_heads,
        scan=True,
    )


def abstract_params(model: ViT, image_size: int) -> Any:
    """The model's parameters as `ShapeDtypeStruct`s (nothing computed)."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)["params"]


def abstract_state(steps: TrainSteps, params: Any, mesh: jax.sharding.Mesh) -> TrainState:
    """The steps' `TrainState` as `ShapeDtypeStruct`s carrying their shardings.

    `jax.eval_shape(steps.init_state, ...)` would trace the state's creation,
    but the cast to `frozen_dtype` reads the arrays' shardings, which tracers
    lack (jax 0.10.2); so the stored dtypes come from the plan: a leaf wholly
    frozen (every block of a stacked leaf) and floating is stored in
    `frozen_dtype`, as `TrainSteps.cast_params` stores it. Without sharding
    rules the state is replicated over `mesh`.
    """
    leaves, treedef = jax.tree.flatten(params)
    cast = steps.frozen_dtype

    def stored(leaf: Any, frozen: Any) -> jax.ShapeDtypeStruct:
        wholly = frozen is True or (isinstance(frozen, tuple) and all(frozen))
        floating = jnp.issubdtype(leaf.dtype, jnp.floating)
        dtype = cast if cast is not None and wholly and floating else leaf.dtype
        return jax.ShapeDtypeStruct(leaf.shape, dtype)

    params = jax.tree.unflatten(treedef, list(map(stored, leaves, steps.plan.frozen)))
    opt_state = jax.eval_shape(steps.tx.init, params)
    shardings = steps.shardings
    if shardings is None:
        replicated = NamedSharding(mesh, P())
        shardings = TrainState(
            step=replicated,
            params=jax.tree.map(lambda _: replicated, params),
            batch_stats=replicated,
            opt_state=jax.tree.map(lambda _: replicated, opt_state),
            rng=replicated,
        )

    def placed(leaf: Any, sharding: NamedSharding) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    return TrainState(
        step=placed(jax.ShapeDtypeStruct((), jnp.int32), shardings.step),
        params=jax.tree.map(placed, params, shardings.params),
        batch_stats={},  # a ViT has no BatchNorm
        opt_state=jax.tree.map(placed, opt_state, shardings.opt_state),
        rng=placed(rng, shardings.rng),
    )


def tree_bytes(tree: Any) -> int:
    """Bytes of every array leaf of `tree`, whole (shapes and dtypes are enough)."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def device_bytes(tree: Any) -> dict[Any, int]:
    """Per device, the bytes of the shards of `tree`'s leaves it holds (leaves carry
    shardings: arrays, or `ShapeDtypeStruct`s with `sharding=`)."""
    out: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        shape, itemsize = tuple(leaf.shape), np.dtype(leaf.dtype).itemsize
        for device, index in leaf.sharding.devices_indices_map(shape).items():
            size = math.prod(len(range(*s.indices(n))) for s, n in zip(index, shape, strict=True))
            out[device] = out.get(device, 0) + size * itemsize
    return out


def replicated_bytes(tree: Any) -> int:
    """Bytes of the leaves that every device holds whole (too small to split, or
    no dimension the axis divides)."""
    return tree_bytes([x for x in jax.tree.leaves(tree) if x.sharding.is_fully_replicated])


def make_optimizer() -> optax.GradientTransformation:
    """AdamW: two float32 moments per trainable parameter."""
    return optax.adamw(1e-4, weight_decay=1e-4)


def configs(
    devices: int,
    freezes: Sequence[str] = FREEZES,
    frozen_dtypes: Sequence[str] = FROZEN_DTYPES,
    layouts: Sequence[str] = LAYOUTS,
) -> list[tuple[str, str, str]]:
    """The `(layout, freeze, frozen dtype)` measured at `devices`, the baseline first.

    Nothing frozen means nothing cast: `none` is measured once, in float32.
    `replicated` is measured for `REPLICATED_CONFIGS` at N > 1 only (at N = 1
    it is the `fsdp` program). The baseline, full fine-tuning in float32, is
    measured whether listed or not: every ratio is to it.
    """
    out = [("fsdp", *BASELINE)]
    for layout in layouts:
        if layout == "replicated" and devices == 1:
            continue
        if layout == "replicated":
            out.append((layout, *BASELINE))
        for freeze in freezes:
            for dtype in frozen_dtypes:
                pair = (freeze, dtype)
                if freeze == "none" and dtype != "float32":
                    continue
                if layout == "replicated" and pair not in REPLICATED_CONFIGS:
                    continue
                out.append((layout, freeze, dtype))
    return list(dict.fromkeys(out))


def measure(
    setup: ModelSetup,
    devices: int,
    *,
    model: str = "",
    batch_size: int = DEFAULT_BATCH_SIZE,
    min_size: int = DEFAULT_MIN_SIZE,
    budget_bytes: int = int(DEFAULT_BUDGET_GIB * _GIB),
    freezes: Sequence[str] = FREEZES,
    frozen_dtypes: Sequence[str] = FROZEN_DTYPES,
    layouts: Sequence[str] = LAYOUTS,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Measures one model on the first `devices` devices of this process.

    Args:
      setup: the model.
      devices: N, the mesh's `fsdp` size (at most `jax.device_count()`).
      model: the name rows carry (a key of `MODELS`; default `setup.name`).
      batch_size: global images per step, split over the N devices.
      min_size: `fsdp(min_size=...)`: leaves with fewer elements stay whole.
      budget_bytes: the per-device budget the `fits` column checks.
      freezes, frozen_dtypes, layouts: subsets of `FREEZES`,
        `FROZEN_DTYPES` and `LAYOUTS` (see `configs`).
      log: progress messages go here.

    Returns:
      Rows with the keys of `ROW_KEYS`, plus `model_name`, `spec`,
      `batch_size`, `image_size`, `params`, `trainable_params`,
      `replicated_state_bytes` (state every device holds whole),
      `budget_bytes`, `min_size`, `compile_s`, `platform` and `device_kind`.

    Raises:
      ValueError: too few devices, a batch the devices do not divide, or an
        unknown freeze, dtype or layout.
    """
    check_choices("freeze", list(freezes), list(FREEZES))
    check_choices("frozen dtype", list(frozen_dtypes), list(FROZEN_DTYPES))
    check_choices("layout", list(layouts), list(LAYOUTS))
    available = jax.devices()
    if devices > len(available):
        raise ValueError(
            f"{devices} devices asked for, but this process has {len(available)} "
            f"({available[0].platform}); on a CPU host set XLA_FLAGS="
            f"--xla_force_host_platform_device_count={devices} before JAX starts."
        )
    if batch_size % devices:
        raise ValueError(f"batch size {batch_size} does not divide over {devices} devices.")
    mesh = make_mesh({"data": 1, "fsdp": devices}, devices=available[:devices])
    net = build_model(setup)
    params = abstract_params(net, setup.image_size)
    batch = {
        "image": jax.ShapeDtypeStruct((batch_size, setup.image_size, setup.image_size, 3), "uint8"),
        "label": jax.ShapeDtypeStruct((batch_size,), "int32"),
    }
    rules = [(".*", sharding.fsdp(min_size=min_size))]
    rows = []
    for layout, freeze, dtype in configs(devices, freezes, frozen_dtypes, layouts):
        t0 = time.perf_counter()
        steps = make_steps(
            net,
            make_optimizer(),
            freeze_spec(freeze, setup.depth),
            params,
            mesh=mesh,
            sharding_rules=rules if layout == "fsdp" else None,
            frozen_dtype=dtype,
        )
        state = abstract_state(steps, params, mesh)
        memory = steps.train_step.lower(state, batch).compile().memory_analysis()
        compile_s = time.perf_counter() - t0
        per_device = max(device_bytes(state).values())
        total = tree_bytes(state)
        argument, output = memory.argument_size_in_bytes, memory.output_size_in_bytes
        alias, temp = memory.alias_size_in_bytes, memory.temp_size_in_bytes
        peak = argument + output - alias + temp
        rows.append(
            {
                "model": model or setup.name,
                "model_name": setup.name,
                "devices": devices,
                "layout": layout,
                "freeze": freeze,
                "spec": freeze_spec(freeze, setup.depth),
                "frozen_dtype": dtype,
                "batch_size": batch_size,
                "image_size": setup.image_size,
                "params": sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
                "trainable_params": steps.trainable_params,
                "state_bytes": total,
                "state_bytes_per_device": per_device,
                "state_ratio_ideal": per_device / (total / devices),
                "replicated_state_bytes": replicated_bytes(state),
                "argument_bytes": argument,
                "output_bytes": output,
                "alias_bytes": alias,
                "temp_bytes": temp,
                "peak_bytes": peak,
                "budget_bytes": budget_bytes,
                "fits": peak <= budget_bytes,
                "min_size": min_size,
                "compile_s": round(compile_s, 2),
                "platform": available[0].platform,
                "device_kind": available[0].device_kind,
            }
        )
        log(
            f"  {setup.name} N={devices} {layout} {freeze} {dtype}: state "
            f"{per_device / _MIB:.1f} MiB/device, peak {peak / _MIB:.1f} MiB ({compile_s:.1f} s)"
        )
    for row in rows:
        base = next(
            r
            for r in rows
            if (r["layout"], r["freeze"], r["frozen_dtype"]) == (row["layout"], *BASELINE)
        )
        row["state_ratio_full"] = row["state_bytes_per_device"] / base["state_bytes_per_device"]
        row["peak_ratio_full"] = row["peak_bytes"] / base["peak_bytes"]
    return rows


def target_warnings(rows: Sequence[dict[str, Any]]) -> list[str]:
    """WARNING lines for the rows that miss a target, each saying where the bytes are.

    * `fsdp` rows at N > 1 whose state per device exceeds `STATE_TOLERANCE`
      times total/N;
    * `fsdp` rows of everything but the head frozen in bfloat16 whose
      footprint exceeds `FULL_TARGET` times full fine-tuning's at the same N.
    """
    out = []
    for r in rows:
        if r["layout"] != "fsdp":
            continue
        where = f"{r['model']} N={r['devices']} freeze={r['freeze']} frozen={r['frozen_dtype']}"
        if r["devices"] > 1 and r["state_ratio_ideal"] > STATE_TOLERANCE:
            out.append(
                f"WARNING: {where}: state {r['state_bytes_per_device'] / _MIB:.1f} MiB per "
                f"device is {r['state_ratio_ideal']:.3f}x total/N (> {STATE_TOLERANCE}); "
                f"{r['replicated_state_bytes'] / _MIB:.1f} MiB of it is in leaves every device "
                f"holds whole (fewer than min_size={r['min_size']} elements, or no dimension "
                "the axis divides)."
            )
        if (r["freeze"], r["frozen_dtype"]) == ("all-but-head", "bfloat16"):
            if r["peak_ratio_full"] > FULL_TARGET:
                out.append(
                    f"WARNING: {where}: {r['peak_bytes'] / _MIB:.1f} MiB per device is "
                    f"{r['peak_ratio_full']:.3f}x full fine-tuning's (> {FULL_TARGET}): state "
                    f"{r['state_bytes_per_device'] / _MIB:.1f} MiB, temporaries "
                    f"{r['temp_bytes'] / _MIB:.1f} MiB."
                )
    return out


def fit_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Per model, layout and configuration: the device counts whose footprint fits."""
    out = []
    seen: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        seen.setdefault((r["model"], r["layout"], r["freeze"], r["frozen_dtype"]), []).append(r)
    for (model, layout, freeze, dtype), group in seen.items():
        budget = group[0]["budget_bytes"] / _GIB
        fitting = ", ".join(str(r["devices"]) for r in group if r["fits"]) or "none"
        tried = ", ".join(str(r["devices"]) for r in group)
        out.append(
            f"{model} {layout} {freeze} {dtype}: fits {budget:g} GiB at N = {fitting} "
            f"(measured at N = {tried})"
        )
    return out


_COLUMNS = (
    ("model", "model_name", "{}"),
    ("N", "devices", "{}"),
    ("layout", "layout", "{}"),
    ("freeze", "freeze", "{}"),
    ("frozen", "frozen_dtype", "{}"),
    ("state MiB", "state_bytes_per_device", "{:.1f}"),
    ("xtotal/N", "state_ratio_ideal", "{:.3f}"),
    ("args MiB", "argument_bytes", "{:.1f}"),
    ("out MiB", "output_bytes", "{:.1f}"),
    ("alias MiB", "alias_bytes", "{:.1f}"),
    ("temp MiB", "temp_bytes", "{:.1f}"),
    ("peak MiB", "peak_bytes", "{:.1f}"),
    ("state vs full", "state_ratio_full", "{:.3f}"),
    ("vs full", "peak_ratio_full", "{:.3f}"),
    ("fits", "fits", "{}"),
)


def _cells(row: dict[str, Any]) -> list[str]:
    out = []
    for _, key, fmt in _COLUMNS:
        value = row[key]
        if key.endswith("_bytes") or key == "state_bytes_per_device":
            value /= _MIB
        elif key == "fits":
            value = "yes" if value else "no"
        out.append(fmt.format(value))
    return out


def _header(rows: Sequence[dict[str, Any]]) -> list[str]:
    budget = rows[0]["budget_bytes"] / _GIB if rows else DEFAULT_BUDGET_GIB
    return [f"fits {budget:g} GiB" if h == "fits" else h for h, _, _ in _COLUMNS]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table, a section per model and N."""
    return text_table(
        _header(rows),
        [_cells(r) for r in rows],
        left=5,
        sections=[(r["model"], r["devices"]) for r in rows],
    )


def format_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The table as GitHub markdown."""
    return markdown_table(_header(rows), [_cells(r) for r in rows], left=5)


def write_markdown(path: str, rows: Sequence[dict[str, Any]], command: str) -> None:
    """Appends a section with the machine, the setup, the command, the table, the
    device counts at which each configuration fits the budget, and the targets'
    verdict to `path`."""
    models = ", ".join(dict.fromkeys(r["model_name"] for r in rows))
    first = rows[0]
    setups = "; ".join(
        f"{r['model_name']}: {r['params'] / 1e6:.1f}M parameters, {r['image_size']}x"
        f"{r['image_size']}"
        for r in {r["model"]: r for r in rows}.values()
    )
    kinds = ", ".join(sorted({f"{r['device_kind']} ({r['platform']})" for r in rows}))
    warnings = target_warnings(rows)
    verdict = "\n".join(f"- {w}" for w in warnings) if warnings else _targets_met(rows)
    text = (
        f"## memory_scale: {models}\n\n"
        f"Machine: {machine_description()}; each N in its own process of N {kinds} devices.\n\n"
        f"Setup: {setups}; blocks scanned, float32 compute, AdamW; global batch "
        f"{first['batch_size']}; mesh data=1, fsdp=N, rules `[('.*', fsdp(min_size="
        f"{first['min_size']}))]`; budget {first['budget_bytes'] / _GIB:g} GiB per device.\n\n"
        f"Command: `{command}`\n\n"
        f"{format_markdown(rows)}\n\n"
        + "\n".join(f"- {line}" for line in fit_lines(rows))
        + f"\n\n{verdict}\n"
    )
    exists = os.path.exists(path) and os.path.getsize(path) > 0
    with open(path, "a", encoding="utf-8") as f:
        f.write(("\n" if exists else "") + text)


def _targets_met(rows: Sequence[dict[str, Any]]) -> str:
    """The line saying both targets are met, with the worst values."""
    sharded = [r for r in rows if r["layout"] == "fsdp"]
    state = max((r["state_ratio_ideal"] for r in sharded if r["devices"] > 1), default=None)
    frozen = [
        r["peak_ratio_full"]
        for r in sharded
        if (r["freeze"], r["frozen_dtype"]) == ("all-but-head", "bfloat16")
    ]
    parts = []
    if state is not None:
        parts.append(f"state per device at most {state:.3f}x total/N (target {STATE_TOLERANCE})")
    if frozen:
        parts.append(
            f"all but the head frozen in bfloat16 at most {max(frozen):.3f}x full "
            f"fine-tuning's bytes per device (target {FULL_TARGET})"
        )
    return "- Targets met: " + "; ".join(parts) + "." if parts else "- No target applies."


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Per-device memory of sharded, frozen train steps at 1 to 8 devices.",
    )
    parser.add_argument(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help=f"comma-separated, from: {', '.join(MODELS)} (default: {','.join(DEFAULT_MODELS)})",
    )
    parser.add_argument(
        "--devices",
        default=",".join(map(str, DEVICES)),
        help="comma-separated device counts, each its own process (default: 1,2,4,8)",
    )
    parser.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help=f"global batch, divisible by every device count (default {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--budget_gib",
        type=float,
        default=DEFAULT_BUDGET_GIB,
        help=f"per-device budget the 'fits' column checks (default {DEFAULT_BUDGET_GIB:g})",
    )
    parser.add_argument(
        "--min_size",
        type=int,
        default=DEFAULT_MIN_SIZE,
        help=f"fsdp(min_size=...): smaller leaves stay whole (default {DEFAULT_MIN_SIZE})",
    )
    parser.add_argument("--quick", action="store_true", help="vit_b16 at 1 and 2 devices, batch 2")
    parser.add_argument("--json", default=None, help="write the rows as JSON here")
    parser.add_argument("--markdown", default=None, help="append a markdown section here")
    # A child run by the driver: measure at one N in this process, rows as JSON last.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    models = parse_list(args.models)
    devices = parse_list(args.devices)
    if args.quick:
        models, devices = ["vit_b16"], ["1", "2"]
        if args.batch_size is None:
            args.batch_size = 2
    if args.batch_size is None:
        args.batch_size = DEFAULT_BATCH_SIZE
    try:
        if not models:
            raise ValueError(f"--models is empty; valid choices: {', '.join(MODELS)}.")
        check_choices("model", models, list(MODELS))
        if not devices:
            raise ValueError("--devices is empty; give device counts such as 1,2,4,8.")
        bad = [d for d in devices if not d.isdigit() or int(d) < 1]
        if bad:
            raise ValueError(f"--devices takes positive integers; got {', '.join(map(repr, bad))}.")
    except ValueError as e:
        parser.error(str(e))
    args.models, args.devices = models, list(dict.fromkeys(int(d) for d in devices))
    if args.batch_size < 1:
        parser.error(f"--batch_size must be a positive integer; got {args.batch_size}.")
    uneven = [n for n in args.devices if args.batch_size % n]
    if uneven:
        parser.error(
            f"--batch_size {args.batch_size} does not divide over "
            f"{', '.join(map(str, uneven))} devices; use a multiple of each device count."
        )
    if args.min_size < 1:
        parser.error(f"--min_size must be a positive integer; got {args.min_size}.")
    if not args.budget_gib > 0:
        parser.error(f"--budget_gib must be positive; got {args.budget_gib}.")
    return args


def _worker_argv(args: argparse.Namespace, devices: int) -> list[str]:
    return [
        "--worker",
        "--models",
        ",".join(args.models),
        "--devices",
        str(devices),
        "--batch_size",
        str(args.batch_size),
        "--budget_gib",
        str(args.budget_gib),
        "--min_size",
        str(args.min_size),
    ]


def run_worker(args: argparse.Namespace, devices: int) -> list[dict[str, Any]]:
    """Runs this script in a fresh process with `devices` devices; returns its rows.

    Its progress goes to this process's stderr; its rows come back as the
    last line of its stdout.
    """
    flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *_worker_argv(args, devices)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"memory_scale: the run at {devices} devices failed (see above).")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _worker(args: argparse.Namespace) -> None:
    (devices,) = args.devices
    rows = []
    for model in args.models:
        rows += measure(
            MODELS[model],
            devices,
            model=model,
            batch_size=args.batch_size,
            min_size=args.min_size,
            budget_bytes=int(args.budget_gib * _GIB),
            log=lambda msg: print(msg, file=sys.stderr, flush=True),
        )
    print(json.dumps(rows))


def _ordered(rows: Sequence[dict[str, Any]], models: Sequence[str]) -> list[dict[str, Any]]:
    """Rows by model (in `models` order), then N, each N's rows as measured."""
    rank = {m: i for i, m in enumerate(models)}
    return sorted(rows, key=lambda r: (rank[r["model"]], r["devices"]))


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Runs the benchmark from command-line arguments; returns the rows."""
    args = parse_args(argv)
    if args.worker:
        _worker(args)
        return []
    command = command_line("memory_scale.py", argv)
    print(f"machine: {machine_description()}", flush=True)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for devices in args.devices:
        t0 = time.perf_counter()
        print(f"{devices} device(s):", file=sys.stderr, flush=True)
        rows += run_worker(args, devices)
        print(f"  done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    rows = _ordered(rows, args.models)
    print()
    print(format_table(rows))
    print()
    for line in fit_lines(rows):
        print(line)
    for warning in target_warnings(rows):
        print(warning)
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        write_json(args.json, rows)
    if args.markdown:
        write_markdown(args.markdown, rows, command.strip())
    return rows


if __name__ == "__main__":
    main()
