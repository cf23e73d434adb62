"""`train_and_evaluate(config, workdir)`: a CIFAR transfer run composed of layerfreeze pieces.

`experiments/cifar.py` reads the flags and calls it; tests call it directly.
The pieces: `layerfreeze.Phases` (the freeze schedule, one compiled step per
distinct phase, compiled ahead while the phase before trains with
`config.compile_ahead`, optimizer state carried over, resume in the right phase),
`train.make_steps`, `checkpoint.Checkpointer` (resume from the newest intact
step), `pretrained` (`init_from`), `features.FeatureCache`, `metrics`
(`metrics.jsonl`, exact across resumes, and `curves.png`), `auto` (automatic
freezing for speed: `config.schedule='auto'` or `'freezeout'`).

Models: the ResNets (`resnet18`, ...) and the ViTs (`vit_ti4`, ...); a model's
ordered layer groups (`model_groups`) drive its schedules, learning-rate
multipliers and summary.

Devices: the run builds the mesh of `config.mesh` over every process's
devices (`train.make_mesh`) and the sharding rules of `config.sharding`
(`layerfreeze.train.sharding`), which `train.make_steps` gets; the state is
created, and restored, in those shardings, each process feeds its part of the
global batch (`_local`), every process writes its shards of a checkpoint, and
process 0 alone writes `metrics.jsonl`, `config.json` and `curves.png`.

`train_and_evaluate` reads top to bottom: the setup helpers, then the loop
(`_loop`).
What lasts across the loop is explicit: `_PhaseBuilder` builds each phase's
steps, `_ResumeTarget` finds the phases a checkpoint resumes in, and `_Run`
holds the phases, metrics, checkpointer, feature cache and progress bar.
"""

import contextlib
import dataclasses
import functools
import json
import math
import pathlib
import shutil
import sys
from collections.abc import Iterator
from typing import Any

import input_pipeline
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import plot
from absl import logging
from configs import cifar10 as default_config
from jax.sharding import PartitionSpec as P

import layerfreeze as lf
from layerfreeze import auto, lr, models, schedules, train
from layerfreeze.train import checkpoint, data, features, metrics, platform, pretrained, sharding
from layerfreeze.train.workdir import WorkdirBusyError, WorkdirLock

__all__ = [
    "Diverged",
    "UsageError",
    "environment_message",
    "run_source",
    "train_and_evaluate",
    "validate_config",
]

OPTIMIZERS = ("adamw", "sgd")
# The axes `config.mesh` may name: both split the batch; `fsdp` also splits the
# state under `config.sharding='fsdp'`.
MESH_AXES = ("data", "fsdp")
SHARDINGS = ("", "fsdp", "fsdp:<min size>")
# The values of a test row that a finished run reports again.
_RESULT_FIELDS = ("accuracy", "loss")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
FROZEN_DTYPES = ("", "bfloat16", "float16")  # '': off, frozen parameters stay float32
# What a checkpoint of a run with `init_from` does with the leaves that still equal the
# source: leaves them out (a `checkpoint.Reference`, checked on restore) or stores a copy.
CHECKPOINT_SOURCES = ("reference", "copy")


class UsageError(ValueError):
    """Bad input from the command line or config: reported as one line."""


# --------------------------------------------------------------------------- #
# Configuration checks
# --------------------------------------------------------------------------- #


def _choice(name: str, value: Any, valid: tuple[str, ...] | list[str]) -> None:
    if value not in valid:
        raise UsageError(f"Unknown {name} {value!r}; valid: {', '.join(map(str, valid))}.")


def is_vit(config: ml_collections.ConfigDict) -> bool:
    """Whether `config.model` names a ViT (`models.VIT_NAMES`)."""
    return config.model in models.VIT_NAMES


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks the fields that name choices, before any work is done."""
    missing = sorted(
        set(_flat(default_config.get_config().to_dict())) - set(_flat(config.to_dict()))
    )
    if missing:
        raise UsageError(
            f"The config lacks field(s) {', '.join(missing)}. A config file builds on the "
            "default one (from configs import cifar10; config = cifar10.get_config()) and "
            "changes fields of it."
        )
    _choice("dataset", config.dataset, input_pipeline.DATASETS)
    _choice("model", config.model, models.MODEL_NAMES + models.VIT_NAMES)
    _choice("pool", config.pool, models.POOLS)
    _choice("stem", config.stem, models.STEMS)
    _choice("head", config.head, models.HEADS)
    _choice("dtype", config.dtype, list(DTYPES))
    _choice("optimizer", config.optimizer, OPTIMIZERS)
    _choice("freeze_method", config.freeze_method, lf.METHODS)
    _choice("checkpoint_source", config.checkpoint_source, CHECKPOINT_SOURCES)
    _check_frozen_dtype(config)
    for field in (
        "batch_size",
        "checkpoint_every",
        "eval_every",
        "keep_checkpoints",
        "width",
        "head_hidden",
        "synthetic_train_size",
        "synthetic_test_size",
    ):
        if int(config[field]) <= 0:
            raise UsageError(f"config.{field} must be > 0, got {config[field]}.")
    for field in ("vit_width", "vit_depth", "vit_mlp_dim", "vit_heads"):
        if int(config[field]) < 0:
            raise UsageError(
                f"config.{field} must be >= 0 (0: the size's default), got {config[field]}."
            )
    if is_vit(config):
        _check_vit_options(config)
    elif config.scan:
        raise UsageError(
            f"config.scan=True stacks a ViT's blocks; {config.model!r} is a ResNet. Pick a "
            f"ViT ({', '.join(models.VIT_NAMES)}) or leave config.scan=False."
        )
    if config.log_every < 0:
        raise UsageError(
            f"config.log_every must be >= 0 (0: about 50 rows per run), got {config.log_every}."
        )
    if config.synthetic_num_classes < 2:
        raise UsageError(
            f"config.synthetic_num_classes must be >= 2, got {config.synthetic_num_classes}."
        )
    for field in ("learning_rate", "weight_decay", "clip_norm", "momentum"):
        value = float(config[field])
        if not math.isfinite(value) or value < 0:
            raise UsageError(f"config.{field} must be a finite number >= 0, got {config[field]}.")
    if not math.isfinite(float(config.num_epochs)):
        raise UsageError(f"config.num_epochs must be a finite number, got {config.num_epochs}.")
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
        raise UsageError("Set config.num_train_steps > 0 or config.num_epochs > 0.")
    _check_ranges(config)
    n = jax.device_count()
    if config.batch_size % n:
        raise UsageError(
            f"config.batch_size={config.batch_size} must divide over {n} devices; "
            f"use a multiple of {n}."
        )
    sharding_rules(config, build_mesh(config))
    if config.cache_frozen_features and jax.process_count() > 1:
        raise UsageError(
            "config.cache_frozen_features=True keeps the features of every training image on "
            f"one host; this run has {jax.process_count()} processes. Run it on one process, "
            "or turn caching off."
        )
    _validate_auto(config)
    if config.init_from and not pathlib.Path(config.init_from).exists():
        raise UsageError(
            f"config.init_from={config.init_from!r} does not exist; give the workdir of an "
            "earlier run, a torchvision .pth/.safetensors file (ResNets) or a big_vision .npz "
            "file (ViTs)."
        )


def _check_frozen_dtype(config: ml_collections.ConfigDict) -> None:
    value = config.frozen_dtype
    if value not in FROZEN_DTYPES:
        raise UsageError(
            f"config.frozen_dtype={value!r} is not a float dtype to store frozen parameters "
            f"in; valid: {', '.join(map(repr, FROZEN_DTYPES))} ('' = off, float32)."
        )
    if value and config.freeze_method != "zero":
        raise UsageError(
            f"config.frozen_dtype={value!r} needs --config.freeze_method=zero; under "
            f"{config.freeze_method!r} frozen parameters run the optimizer and would be rounded."
        )


def _check_ranges(config: ml_collections.ConfigDict) -> None:
    """Numbers that would otherwise train anyway, bent, or fail deep inside a library."""
    if config.warmup_steps < 0:
        raise UsageError(f"config.warmup_steps must be >= 0, got {config.warmup_steps}.")
    dropout = float(config.head_dropout)
    if not 0 <= dropout < 1:
        raise UsageError(f"config.head_dropout must be in [0, 1), got {config.head_dropout}.")
    if not 0 <= config.seed < 2**32:
        raise UsageError(f"config.seed must be in [0, 2**32), got {config.seed}.")


def mesh_axes(config: ml_collections.ConfigDict) -> dict[str, int] | None:
    """`config.mesh` as `{axis: size}`, from `'data=2,fsdp=2'`; None for `''` (all on `data`)."""
    text = str(config.mesh).strip()
    if not text:
        return None
    usage = (
        f"config.mesh={config.mesh!r}: give axis sizes as name=size, e.g. 'data=2,fsdp=2' "
        f"(-1: the devices the others leave); valid axes: {', '.join(MESH_AXES)}"
    )
    axes: dict[str, int] = {}
    for part in text.split(","):
        name, equals, size = (x.strip() for x in part.partition("="))
        if not equals or name not in MESH_AXES:
            raise UsageError(f"{usage}; {part.strip()!r} is not one.")
        if name in axes:
            raise UsageError(f"{usage}; {name!r} is given twice.")
        try:
            axes[name] = int(size)
        except ValueError:
            raise UsageError(f"{usage}; {part.strip()!r} has no integer size.") from None
    return axes


def build_mesh(config: ml_collections.ConfigDict) -> Any:
    """The mesh of `config.mesh` over every process's devices."""
    try:
        return train.make_mesh(mesh_axes(config))
    except ValueError as e:
        count = jax.process_count()
        raise UsageError(
            f"config.mesh={config.mesh!r}: {e} This run has {jax.device_count()} devices "
            f"({count} process{'es' if count > 1 else ''} x {jax.local_device_count()})."
        ) from e


def sharding_rules(config: ml_collections.ConfigDict, mesh: Any) -> list[tuple[str, Any]]:
    """The sharding rules of `config.sharding` on `mesh` (`layerfreeze.train.sharding`).

    `''`: the state replicated on every device. `'fsdp'`: each leaf of at
    least 2**20 elements split along its largest dimension that the `fsdp`
    axis divides (`sharding.fsdp()`); `'fsdp:<min size>'` sets that size.
    """
    name, _, size = str(config.sharding).partition(":")
    if config.sharding == "":
        return [(".*", P())]
    if name != "fsdp" or (size and not size.isdigit()):
        raise UsageError(
            f"Unknown sharding {config.sharding!r}; valid: "
            f"{', '.join(map(repr, SHARDINGS))} (e.g. 'fsdp:4096')."
        )
    if "fsdp" not in mesh.axis_names:
        raise UsageError(
            f"config.sharding={config.sharding!r} splits the state over the mesh axis fsdp, "
            f"which config.mesh={config.mesh!r} lacks; give one, e.g. "
            "--config.mesh=data=1,fsdp=-1."
        )
    return [(".*", sharding.fsdp(min_size=int(size) if size else 2**20))]


def _check_vit_options(config: ml_collections.ConfigDict) -> None:
    """Refuses the ResNet-only options for a ViT, which has no BatchNorm and no stages."""
    name = config.model
    if config.train_bn:
        raise UsageError(
            f"config.train_bn=True keeps BatchNorm training in frozen groups; {name!r} is a "
            "ViT and has no BatchNorm (its LayerNorms freeze with their group). Leave "
            "config.train_bn=False."
        )
    if config.cache_frozen_features:
        raise UsageError(
            "config.cache_frozen_features=True is supported for the ResNets only (their "
            f"stages' outputs are cached); {name!r} is a ViT. Leave it False."
        )
    if config.head != "linear":
        raise UsageError(
            f"config.head={config.head!r}: a ViT's head is one Dense layer (big_vision's "
            "'head'); leave config.head='linear'."
        )


_POLICY_LOOKALIKES = ("auto", "autofreeze", "auto_freeze", "freezeout", "freeze_out")


def _validate_auto(config: ml_collections.ConfigDict) -> None:
    """The knobs of automatic freezing (`config.auto`, `config.freezeout`)."""
    name = config.schedule
    near = name.strip().lower().replace("-", "_") in _POLICY_LOOKALIKES
    if near and name not in auto.POLICIES:
        raise UsageError(
            f"Unknown automatic freezing policy {name!r}; valid: {', '.join(auto.POLICIES)}."
        )
    if name not in auto.POLICIES:
        return
    if config.lr_multipliers:
        raise UsageError(
            f"config.lr_multipliers={config.lr_multipliers!r} cannot be combined with "
            f"config.schedule={name!r}; leave config.lr_multipliers empty."
        )
    if config.layer_decay:  # the policy's phases carry no learning-rate multipliers
        raise UsageError(
            f"config.layer_decay={config.layer_decay} cannot be combined with "
            f"config.schedule={name!r}; pass --config.layer_decay=0."
        )
    if name == "auto":
        interval = config.auto.interval
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise UsageError(
                f"config.auto.interval must be an integer >= 1 (steps between decisions), "
                f"got {interval!r}."
            )
        percentile = float(config.auto.percentile)
        if not 0 < percentile < 100:
            raise UsageError(
                f"config.auto.percentile must be in (0, 100) (exclusive), got {percentile}."
            )
    else:
        t0 = float(config.freezeout.t0)
        if not 0 < t0 <= 1:
            raise UsageError(f"config.freezeout.t0 must be in (0, 1], got {t0}.")
        _choice("config.freezeout.scaling", config.freezeout.scaling, list(auto.SCALINGS))


def _check_workdir(path: pathlib.Path) -> None:
    """Creates the workdir and makes sure this run can write there."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--workdir={str(path)!r} is a file, not a directory; give a directory.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{jax.process_index()}"  # processes may share the workdir
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(
            f"Cannot write to --workdir={str(path)!r} ({e.strerror or e}); give a writable "
            "directory."
        ) from e


@contextlib.contextmanager
def _one_run(path: pathlib.Path) -> Iterator[None]:
    """Holds the workdir for this run: a second run there is refused, naming the holder.

    On several processes process 0 holds it for all (`WorkdirLock`).
    """
    try:
        lock = WorkdirLock(path)
        lock.acquire()
    except WorkdirBusyError as e:
        raise UsageError(str(e)) from e
    try:
        yield
    finally:
        lock.release()


class Diverged(RuntimeError):
    """Training produced a non-finite loss, gradient or parameter."""


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


# --------------------------------------------------------------------------- #
# Building blocks
# --------------------------------------------------------------------------- #


def load_data(config: ml_collections.ConfigDict) -> data.Dataset:
    if config.dataset == "synthetic":
        return data.make_synthetic(
            num_train=config.synthetic_train_size,
            num_test=config.synthetic_test_size,
            num_classes=config.synthetic_num_classes,
            seed=config.seed,
        )
    try:
        return input_pipeline.load_dataset(
            config.dataset, data_dir=config.data_dir or None, download=config.download
        )
    except input_pipeline.DatasetUnavailableError as e:
        raise UsageError(str(e)) from e


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> models.ResNet | models.ViT:
    if is_vit(config):
        sizes = {
            "width": config.vit_width,
            "depth": config.vit_depth,
            "mlp_dim": config.vit_mlp_dim,
            "num_heads": config.vit_heads,
        }
        try:
            return models.create_vit(
                config.model,
                num_classes=num_classes,
                pool=config.pool,
                scan=config.scan,
                dtype=DTYPES[config.dtype],
                **{k: int(v) for k, v in sizes.items() if v},
            )
        except ValueError as e:  # e.g. heads that do not divide the width
            raise UsageError(f"config.model={config.model!r}: {e}") from e
    return models.create_model(
        config.model,
        num_classes=num_classes,
        stem=config.stem,
        head=config.head,
        head_hidden=config.head_hidden,
        head_dropout=config.head_dropout,
        width=config.width,
        dtype=DTYPES[config.dtype],
    )


def build_optimizer(
    config: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    # A warmup longer than a tenth of the run would end a short run at its
    # peak learning rate, with BatchNorm statistics that lag the weights.
    warmup = min(config.warmup_steps, total_steps // 10)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, warmup, max(total_steps, warmup + 1)
    )
    if config.optimizer == "adamw":
        opt = optax.adamw(schedule, weight_decay=config.weight_decay)
    else:
        opt = optax.chain(
            optax.add_decayed_weights(config.weight_decay),
            optax.sgd(schedule, momentum=config.momentum, nesterov=True),
        )
    if config.clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(config.clip_norm), opt)
    return opt


def model_groups(model: models.ResNet | models.ViT) -> tuple[str, ...]:
    """The model's layer groups, input to output, as path prefixes.

    ResNet: `stem`, `stage1`..`stage4`, `head`. ViT: `models.vit_groups`, one
    group per block (`Transformer/encoderblock[i]` for the stacked blocks of
    `scan=True`).
    """
    if isinstance(model, models.ViT):
        return models.vit_groups(model.depth, pool=model.pool, scan=model.scan)
    return models.GROUPS


def build_schedule(
    config: ml_collections.ConfigDict, groups: tuple[str, ...] = models.GROUPS
) -> schedules.FreezeSchedule:
    groups = list(groups)
    try:
        if config.schedule in auto.POLICIES:  # the fixed part; the policy adds phases
            schedule = schedules.constant(config.freeze, unit="step")
        elif config.schedule:
            schedule = schedules.parse_schedule(config.schedule, groups)
        else:
            schedule = schedules.constant(config.freeze)
        schedule.validate(groups)
    except (TypeError, ValueError) as e:
        if is_vit(config) and any(f"'{g}'" in str(e) for g in models.GROUPS):
            # e.g. cifar10.py's default freeze 'stem,stage1' with --config.model=vit_*
            raise UsageError(
                f"{e} The spec names a ResNet's stages; for a ViT freeze its groups, e.g. "
                "--freeze=embedding,pos_embedding,cls, or start from "
                "experiments/configs/vit_cifar10_finetune.py."
            ) from e
        policies = f" Automatic freezing: {' or '.join(map(repr, auto.POLICIES))}."
        raise UsageError(str(e) + (policies if config.schedule else "")) from e
    if config.lr_multipliers and config.layer_decay:
        raise UsageError(
            f"config.lr_multipliers={config.lr_multipliers!r} and config.layer_decay="
            f"{config.layer_decay} both set learning-rate multipliers; set one of them."
        )
    if config.lr_multipliers:
        try:
            multipliers = schedules.parse_lr_multipliers(config.lr_multipliers, groups)
        except (TypeError, ValueError) as e:
            raise UsageError(f"config.lr_multipliers={config.lr_multipliers!r}: {e}") from e
        schedule = schedule.with_lr_multipliers(multipliers)
    if config.layer_decay:
        try:
            multipliers = lr.layerwise_decay(decay_layers(groups), config.layer_decay)
        except (TypeError, ValueError) as e:
            raise UsageError(f"config.layer_decay={config.layer_decay!r}: {e}") from e
        schedule = schedule.with_lr_multipliers(multipliers)
    return schedule


def decay_layers(groups: tuple[str, ...] | list[str]) -> list[tuple[str, ...]]:
    """The layers of layer-wise learning-rate decay over a model's groups.

    As in BEiT and timm's `param_groups_layer_decay`: a ViT's embeddings
    (`embedding`, `pos_embedding`, `cls`) are layer 0, block `i` is layer
    `i + 1`, and the final norm and the head share the last layer (the base
    rate). Any other model: one layer per group. Stacked blocks (`scan=True`)
    are groups `Transformer/encoderblock[i]`: one rate per block along the
    stacked axis.
    """
    groups = list(groups)
    blocks = [g for g in groups if g.startswith("Transformer/encoderblock")]
    if not blocks:
        return [(g,) for g in groups]
    first, last = groups.index(blocks[0]), groups.index(blocks[-1])
    return [tuple(groups[:first]), *((b,) for b in blocks), tuple(groups[last + 1 :])]


def _load_source_variables(
    path: str, model: models.ResNet | models.ViT, variables: dict
) -> tuple[dict, str, checkpoint.Reference]:
    """The variables merged from `path` (`_read_source`), a note, and the source as a Reference.

    The Reference is what the run's checkpoints leave out while the run still
    holds it: the merged values (the source's, in this model's dtypes), its
    re-initialised groups aside. `run_source` reads the same values again.
    """
    loaded, note = _read_source(path, model, variables["params"])
    try:
        merged, reinit = pretrained.merge_pretrained(variables, loaded, reinit=("head",))
    except ValueError as e:
        raise UsageError(
            f"config.init_from={path!r} does not fit this model ({e}); use the same "
            "--config.model, --config.stem and --config.width as the source."
        ) from e
    kept = {c: {g: v for g, v in groups.items() if g not in reinit} for c, groups in merged.items()}
    source = checkpoint.Reference(note, kept)
    if reinit:
        note += f"; re-initialised: {', '.join(reinit)} (shapes differ: class count)"
    return merged, note, source


def _read_source(path: str, model: models.ResNet | models.ViT, params: Any) -> tuple[dict, str]:
    """Params and batch_stats from another run's workdir, a torchvision or a big_vision file.

    In the layout of `model` (`params`: its parameters or their shapes), with a
    note on where they came from.
    """
    source = pathlib.Path(path)
    if source.is_file() and (source.suffix == ".npz" or isinstance(model, models.ViT)):
        loaded = {"params": _load_npz(source, model, params), "batch_stats": {}}
        return loaded, f"big_vision weights from {source}"
    if source.is_file():
        try:
            loaded = models.load_torchvision_resnet(source, model)
        except (ValueError, ImportError) as e:
            raise UsageError(f"Cannot import {source}: {e}") from e
        except Exception as e:  # a damaged or foreign file: pickle, zip, safetensors errors
            raise UsageError(
                f"Cannot read {source} as torchvision ResNet weights ({type(e).__name__}: {e}); "
                "give a .pth state dict or a .safetensors file saved from torchvision."
            ) from e
        return loaded, f"torchvision weights from {source}"
    try:
        # A run that was fine-tuned itself left out what equals its own source.
        reference = functools.partial(run_source, source)
        loaded, step, damaged = pretrained.load_run(source, reference=reference)
    except (FileNotFoundError, ValueError, checkpoint.CheckpointDamagedError) as e:
        raise UsageError(f"config.init_from={path!r}: {e}") from e
    if isinstance(model, models.ViT):  # a source run with the other block layout
        loaded["params"] = _vit_layout(loaded["params"], scan=model.scan)
    for bad, reason in damaged:
        print(
            f"warning: init_from checkpoint step {bad} is damaged ({reason}); using step {step}",
            file=sys.stderr,
        )
    return loaded, f"run {source} (step {step})"


def run_source(workdir: str | pathlib.Path) -> checkpoint.Reference | None:
    """The source a run's checkpoints were saved against: its `init_from`, read again.

    The run's `config.json` names its `init_from` and its model; the source is
    read into that model's layout (`_read_source`), as the run read it when it
    started. Give it to `checkpoint.Checkpointer(reference=...)` or
    `pretrained.load_run(reference=...)` to read the run's checkpoints outside
    the run; the content of every leaf it fills is checked against the record.

    Returns:
      The source, or None for a run without `init_from` (or without a readable
      `config.json`).

    Raises:
      UsageError: the source cannot be read as the run read it (moved, deleted,
        no longer fitting the model).
    """
    config = _recorded_config(pathlib.Path(workdir))
    if config is None or not config.init_from:
        return None
    if not pathlib.Path(config.init_from).exists():
        raise UsageError(
            f"{workdir} was saved against its init_from {config.init_from!r}, which no longer "
            "exists; its checkpoints need it back there (or a copy: the content is checked)."
        )
    model = build_model(config, _num_classes(config))
    shapes = jax.eval_shape(functools.partial(_model_init, model), jax.random.PRNGKey(0))
    loaded, note = _read_source(config.init_from, model, shapes["params"])
    return checkpoint.Reference(note, loaded)


def _recorded_config(workdir: pathlib.Path) -> ml_collections.ConfigDict | None:
    """The config a run recorded in `config.json`, on the defaults; None if unreadable."""
    try:
        record = _flat(json.loads((workdir / "config.json").read_text()))
    except (OSError, ValueError, AttributeError):
        return None
    config = default_config.get_config()
    known = _flat(config.to_dict())
    config.update_from_flattened_dict({k: v for k, v in record.items() if k in known})
    return config


def _speed_policy(
    config: ml_collections.ConfigDict,
    params: Any,
    total_steps: int,
    groups: tuple[str, ...],
) -> tuple[schedules.FreezeSchedule, auto.AutoFreeze | None]:
    """The schedule (and for `auto`, the policy) of `config.schedule='auto'|'freezeout'`.

    `config.freeze` is the fixed freeze, whole groups only; the policy may
    freeze `config.auto.groups` (default: every other group but the head).
    The groups are `model_groups`: a scanned ViT's blocks are
    `Transformer/encoderblock[i]`, and a frozen prefix of them is one range
    (`Transformer/encoderblock[:k]`) whose backward work the step leaves out.
    """
    fixed = _fixed_groups(config, params, groups)
    text = config.auto.groups.strip()
    candidates = [g.strip() for g in text.split(",") if g.strip()] if text else None
    try:
        if config.schedule == "freezeout":
            schedule = auto.freezeout(
                groups,
                total_steps,
                t0=float(config.freezeout.t0),
                scaling=config.freezeout.scaling,
                frozen=fixed,
                candidates=candidates,
                train_bn=config.train_bn,
            )
            return schedule, None
        policy = auto.AutoFreeze(
            groups,
            interval=config.auto.interval,
            percentile=float(config.auto.percentile),
            frozen=fixed,
            candidates=candidates,
            train_bn=config.train_bn,
        )
    except ValueError as e:
        raise UsageError(
            f"{e} (config.freeze={config.freeze!r} is frozen for the whole run; "
            f"config.auto.groups={text!r} lists what the policy may freeze)"
        ) from e
    return policy.schedule, policy


def _fixed_groups(
    config: ml_collections.ConfigDict, params: Any, groups: tuple[str, ...]
) -> list[str]:
    """The groups `config.freeze` freezes for a speed policy's whole run: whole groups only.

    Through `lf.summary`, which matches groups as path prefixes and block
    selectors (a ViT's `Transformer/encoderblock_0`, or `[0]` when stacked).
    """
    rows = lf.summary(params, lf.as_spec(config.freeze), groups=groups).groups
    fixed = [row.name for row in rows if row.status == "frozen"]
    partly = [row.name for row in rows if row.status == "partial"]
    if partly:
        raise UsageError(
            f"config.schedule={config.schedule!r} takes a fixed freeze of whole groups, but "
            f"config.freeze={config.freeze!r} freezes part of {', '.join(partly)}; name whole "
            f"groups ({', '.join(groups[:-1])}) or 'none'."
        )
    return fixed


def _load_npz(source: pathlib.Path, model: models.ResNet | models.ViT, params: Any) -> dict:
    if not isinstance(model, models.ViT):
        raise UsageError(
            f"config.init_from={str(source)!r} is an .npz file: big_vision ViT weights, but "
            "config.model is a ResNet. Use a ViT "
            f"({', '.join(models.VIT_NAMES)}), or a torchvision .pth/.safetensors file."
        )
    if source.suffix != ".npz":
        raise UsageError(
            f"config.init_from={str(source)!r}: a ViT loads weights from a big_vision .npz "
            "file or from the workdir of an earlier run; this is neither."
        )
    try:
        return models.load_big_vision_npz(source, params)
    except ValueError as e:
        raise UsageError(
            f"config.init_from={str(source)!r} does not fit this model: {e} Set "
            "config.vit_width, vit_depth, vit_mlp_dim, vit_heads and config.pool to the "
            "checkpoint's."
        ) from e


def _vit_layout(params: dict, *, scan: bool) -> dict:
    """ViT params with stacked blocks if `scan`, else unrolled (as they are if so already)."""
    encoder = params.get("Transformer", {}) if isinstance(params, dict) else {}
    if scan and "encoderblock_0" in encoder:
        return models.stack_blocks(params)
    if not scan and "encoderblock" in encoder:
        return models.unstack_blocks(params)
    return params


def _local(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This host's contiguous slice of a global batch (all of it on one host)."""
    n, i = jax.process_count(), jax.process_index()
    return {k: np.array_split(v, n)[i] for k, v in arrays.items()}


def _check_feature_caching(
    config: ml_collections.ConfigDict,
    schedule: schedules.FreezeSchedule,
    params: Any,
    feature_groups: tuple[str, ...],
) -> None:
    """Refuses `cache_frozen_features` where cached features would change the run."""
    prefixes = [_feature_prefix(params, p, feature_groups) for p in schedule.phases]
    if config.augment:
        raise UsageError(
            "config.cache_frozen_features=True computes each training image's features "
            "once, so they would ignore the random crops and flips of config.augment=True; "
            "pass --config.augment=False to cache without augmentation (or turn caching "
            "off with --config.cache_frozen_features=False)."
        )
    if config.schedule == "auto":  # the prefixes are decided during the run
        if config.train_bn:
            raise UsageError(
                "config.cache_frozen_features=True with config.schedule='auto', but "
                "config.train_bn=True keeps BatchNorm training in frozen groups, so no frozen "
                "prefix's output is fixed; pass --config.train_bn=False or turn caching off."
            )
        return
    if config.freeze_method != "zero":
        raise UsageError(
            f"config.cache_frozen_features=True needs config.freeze_method='zero'; "
            f"{config.freeze_method!r} computes the frozen groups' gradients, which cached "
            "features skip."
        )
    if not any(prefixes):
        specs = " / ".join(p.spec.describe() for p in schedule.phases)
        why = (
            "config.train_bn=True keeps BatchNorm training in frozen groups"
            if config.train_bn
            else "the stem is trainable"
        )
        raise UsageError(
            f"config.cache_frozen_features=True, but freeze spec {specs!r} leaves no frozen "
            f"prefix whose output could be cached ({why}). Freeze the groups from the stem "
            "on, e.g. --freeze=all-but:head, or turn caching off."
        )


def _final_test_row(path: pathlib.Path, step: int) -> dict[str, Any] | None:
    """The test row a finished run wrote at `step`, if its metrics hold a readable one."""
    rows = metrics.read_rows(path) if path.exists() else []
    row = next((r for r in reversed(rows) if r.get("split") == "test" and r["step"] == step), None)
    if row is None:
        return None
    bad = {k: row.get(k) for k in _RESULT_FIELDS if not _is_number(row.get(k))}
    if bad:
        given = ", ".join(f"{k} {v!r}" for k, v in bad.items())
        print(
            f"warning: the test row of {path} at step {step} holds {given}, not numbers; "
            "evaluating the final checkpoint again.",
            file=sys.stderr,
        )
        return None
    return row


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _frozen_groups(
    schedule: schedules.FreezeSchedule, params: Any, groups: tuple[str, ...]
) -> list[str]:
    """The groups with a parameter frozen in some phase, in model order.

    Through `lf.summary`, so a stacked ViT's block groups (`[i]`) count too.
    """
    frozen = {
        row.name
        for phase in schedule.phases
        for row in lf.summary(params, phase.spec, groups=groups).groups
        if row.trainable_params < row.params
    }
    return [g for g in groups if g in frozen]


def _frozen_now(spec: lf.FreezeSpec, params: Any, groups: tuple[str, ...]) -> list[str]:
    """The groups `spec` freezes entirely, in model order.

    Through `lf.summary`, which matches groups as path prefixes and block
    selectors (a ViT's `Transformer/encoderblock_0`, or `[0]` when stacked).
    """
    rows = lf.summary(params, spec, groups=groups).groups
    return [row.name for row in rows if row.status == "frozen"]


def _diverged_message(
    step: int, bad: dict[str, float], last_good: int | None, config: ml_collections.ConfigDict
) -> str:
    what = ", ".join(f"{k} is {v}" for k, v in bad.items())
    kept = (
        f"checkpoints up to step {last_good} are intact"
        if last_good is not None
        else "no checkpoint was written"
    )
    return (
        f"Training diverged at step {step}: {what}. Nothing non-finite was saved; {kept}. "
        f"Lower config.learning_rate (now {config.learning_rate}) or raise "
        "config.warmup_steps, or pass --config.allow_nonfinite=True to continue regardless."
    )


def _identity(rng: jax.Array, x: jax.Array) -> jax.Array:
    return x


def _augment_and_normalize(rng: jax.Array, images: jax.Array) -> jax.Array:
    return data.normalize(data.augment(rng, images))


def _normalize(rng: jax.Array, images: jax.Array) -> jax.Array:
    return data.normalize(images)


def _feature_groups(model: models.ResNet | models.ViT) -> tuple[str, ...]:
    """The groups after which `model` can start from cached features, input to output.

    A ResNet starts after any group but its head (`start_after`); a ViT has no
    such entry point.
    """
    return () if isinstance(model, models.ViT) else model_groups(model)[:-1]


def _pooled_feature_groups(model: models.ResNet | models.ViT) -> tuple[str, ...]:
    """The groups whose features are cached as their spatial mean.

    The head reads only the mean of the last group before it, so caching the
    mean instead of the map loses nothing.
    """
    return _feature_groups(model)[-1:]


def _feature_prefix(
    params: Any, phase: schedules.Phase, feature_groups: tuple[str, ...] | None
) -> str | None:
    """The group whose cached output `phase` trains from (None: images, or no caching)."""
    if feature_groups is None:
        return None
    return features.frozen_prefix(params, phase.spec, feature_groups)


# --------------------------------------------------------------------------- #
# Setting up a run
# --------------------------------------------------------------------------- #


def _num_classes(config: ml_collections.ConfigDict) -> int:
    if config.dataset == "synthetic":
        return config.synthetic_num_classes
    return input_pipeline.NUM_CLASSES[config.dataset]


def _model_init(model: models.ResNet | models.ViT, rng: jax.Array) -> Any:
    """The model's variables, initialised on one CIFAR-sized image."""
    return model.init(rng, jnp.zeros((1, *data.IMAGE_SHAPE), jnp.float32), train=False)


def _param_shapes(
    model: models.ResNet | models.ViT, rng: jax.Array, schedule: schedules.FreezeSchedule
) -> Any:
    """The model's parameter shapes, once every spec of `schedule` is known to fit them."""
    params = jax.eval_shape(functools.partial(_model_init, model), rng)["params"]
    for phase in schedule.phases:  # every spec must fit this model, before any work
        try:
            phase.spec.resolve(params)
        except ValueError as e:
            raise UsageError(str(e)) from e
    return params


def _check_batch_size(config: ml_collections.ConfigDict, dataset: data.Dataset) -> None:
    if config.batch_size > dataset.num_train:
        raise UsageError(
            f"config.batch_size={config.batch_size} is larger than the training set "
            f"({dataset.num_train} examples); use a batch size of at most {dataset.num_train}."
        )


def _total_steps(
    config: ml_collections.ConfigDict, schedule: schedules.FreezeSchedule, steps_per_epoch: int
) -> int:
    if config.num_train_steps > 0:
        return config.num_train_steps
    if schedule.total is not None:  # the recipe fixes the length (fine_tune)
        return schedule.total * (steps_per_epoch if schedule.unit == "epoch" else 1)
    return max(1, math.ceil(config.num_epochs * steps_per_epoch))


def _check_phases_start(
    schedule: schedules.FreezeSchedule, total_steps: int, steps_per_epoch: int
) -> None:
    """Refuses a schedule whose later phases would start after the run has ended."""
    per_unit = steps_per_epoch if schedule.unit == "epoch" else 1
    late = [
        f"phase {i} ({phase.describe(schedule.unit)}, step {phase.start * per_unit})"
        for i, phase in enumerate(schedule.phases)
        if phase.start * per_unit >= total_steps
    ]
    if late:
        raise UsageError(
            f"The schedule has phases that start after the run's {total_steps} steps "
            f"({steps_per_epoch} per epoch) and would never run: "
            f"{'; '.join(late)}. Lengthen the run (--config.num_epochs or "
            "--config.num_train_steps) or start them earlier."
        )


def _initial_variables(
    config: ml_collections.ConfigDict, model: models.ResNet | models.ViT, rng: jax.Array
) -> tuple[dict, str, checkpoint.Reference | None]:
    """The variables training starts from, a note on where they came from, and its source.

    The source (`init_from`, None without) is what the checkpoints leave out
    under `config.checkpoint_source='reference'`.
    """
    variables = jax.jit(functools.partial(_model_init, model))(rng)
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    if not config.init_from:
        return variables, "random init", None
    return _load_source_variables(config.init_from, model, variables)


def _record_config(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    schedule: schedules.FreezeSchedule,
    params: Any,
    groups: tuple[str, ...],
) -> None:
    """Writes `config.json`, warning first if frozen layers keep their random weights."""
    frozen_random = [] if config.init_from else _frozen_groups(schedule, params, groups)
    if frozen_random:
        print(
            f"warning: no config.init_from, so the frozen layers ({', '.join(frozen_random)}) "
            "keep their random initial weights; transfer learning freezes pretrained layers. "
            "Pass --config.init_from=<workdir of a source run, or a .pth/.npz file>, or "
            "--freeze=none to train from scratch.",
            file=sys.stderr,
        )
    # Only a run that got this far owns the workdir's record of its config.
    record = json.loads(config.to_json())
    record["frozen_random_init"] = frozen_random
    (workdir / "config.json").write_text(json.dumps(record, indent=2) + "\n")


def _print_finished(workdir: pathlib.Path, step: int, test_row: dict[str, Any]) -> None:
    print(
        f"{workdir} already finished at step {step}: test accuracy "
        f"{test_row['accuracy']:.4f} (loss {test_row['loss']:.4f}). Nothing to do; "
        "give a new --workdir (or more steps) to train again."
    )


def _compile_ahead(config: ml_collections.ConfigDict) -> bool:
    """`config.compile_ahead`, turned off (with a logged note) on several processes.

    Each process compiles ahead on a worker of its own, and which programs it
    compiles there, and whether a change waits for one or compiles the step
    itself, depends on that process's timing. XLA may compile a program of
    several processes together (on GPUs they share the autotuning), so a
    process could wait for a compile that another never starts. With several
    processes every phase compiles at its change, on every process alike.
    """
    if config.compile_ahead and jax.process_count() > 1:
        logging.info(
            "config.compile_ahead is off: %d processes compile each phase at its change.",
            jax.process_count(),
        )
        return False
    return bool(config.compile_ahead)


def _summary(
    test_row: dict[str, Any], step: int, compilations: int, phase: int, state: train.TrainState
) -> dict[str, Any]:
    """What `train_and_evaluate` returns."""
    return {
        "accuracy": test_row["accuracy"],
        "loss": test_row["loss"],
        "steps": step,
        "compilations": compilations,
        "phase": phase,
        "state": state,
    }


# --------------------------------------------------------------------------- #
# Phases, resuming, the loop's state
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True, eq=False)
class _PhaseBuilder:
    """Builds the steps of a phase (the `build` of `train.Phases`) and a schedule's `Phases`.

    Attributes:
      params: the initial parameters, which `train.make_steps` builds for.
      shapes: their shapes, which specs resolve against.
      mesh: the devices (`config.mesh`), over every process.
      sharding_rules: how the state is split over the mesh (`config.sharding`).
      feature_groups: where a phase may start from cached features; None: no
        caching.
      groups: the model's groups (`model_groups`).
      policy: the automatic freezing policy whose decisions add phases, if any.
      compile_ahead: compile the phases to come in the background
        (`_compile_ahead`).
    """

    config: ml_collections.ConfigDict
    model: models.ResNet | models.ViT
    optimizer: optax.GradientTransformation
    params: Any
    shapes: Any
    mesh: Any
    sharding_rules: Any
    steps_per_epoch: int
    feature_groups: tuple[str, ...] | None
    groups: tuple[str, ...]
    policy: auto.AutoFreeze | None
    compile_ahead: bool

    def __call__(
        self, phase: schedules.Phase, previous: tuple[lf.FreezeSpec, ...]
    ) -> train.TrainSteps:
        prefix = _feature_prefix(self.shapes, phase, self.feature_groups)
        preprocess = _augment_and_normalize if self.config.augment else _normalize
        # Always chained, so the optimizer state keeps its structure across
        # phases with and without multipliers and carries over intact.
        opt = optax.chain(self.optimizer, lr.scale_by_group(dict(phase.lr_multipliers)))
        return train.make_steps(
            self.model,
            opt,
            phase.spec,
            self.params,
            method=self.config.freeze_method,
            preprocess=preprocess if prefix is None else _identity,
            preprocess_eval=data.normalize,
            mesh=self.mesh,
            sharding_rules=self.sharding_rules,
            start_after=prefix,
            previous=previous,
            # The policy decides from each group's gradient norm.
            group_norms=self.groups if self.policy is not None else (),
            # CPU convolutions through Eigen: the frozen ResNet-18 step 1.30x ->
            # 1.10x PyTorch's on a 2-core CPU (benchmarks/RESULTS.md); {} elsewhere.
            compiler_options=platform.cpu_conv_options(),
            frozen_dtype=self.config.frozen_dtype or None,
        )

    def phases(self, schedule: schedules.FreezeSchedule) -> train.Phases:
        return train.Phases(
            schedule,
            self,
            params=self.shapes,
            steps_per_epoch=self.steps_per_epoch,
            method=self.config.freeze_method,
            mesh=self.mesh,
            prefix_groups=self.feature_groups,
            compile_ahead=self.compile_ahead,
        )


@dataclasses.dataclass(eq=False)
class _ResumeTarget:
    """The restore target of a checkpoint's metadata; keeps the phases it resumes in.

    `restore_latest_intact` calls it for each step it tries, newest first; the
    phases of the step it restores are the run's from then on. Under
    `config.schedule='auto'` they are rebuilt from the decisions made up to
    that step.
    """

    builder: _PhaseBuilder
    phases: train.Phases
    variables: dict
    rng: jax.Array

    def __call__(self, meta: dict[str, Any]) -> dict[str, Any]:
        policy = self.builder.policy
        if policy is not None:  # the decisions so far, then the phases they made
            policy.restore(meta.get("auto", {}))
            self.phases = self.builder.phases(policy.schedule)
        self.phases.restore(meta)
        return self.phases.steps().init_state(self.variables, self.rng).as_dict()


# Fields a resumed run may change: where data and records go, how often it logs,
# evaluates and saves, how long it runs (the learning-rate schedule then spans
# the new length), and the devices it runs on (the state is restored into the
# new mesh's shardings). The freeze spec, schedule and method are checked
# against the checkpoint itself (`train.Phases.restore`).
_CHANGEABLE_ON_RESUME = frozenset(
    {
        "num_epochs", "num_train_steps", "data_dir", "download", "checkpoint_every",
        "keep_checkpoints", "eval_every", "log_every", "progress", "plot", "allow_nonfinite",
        "compilation_cache", "compile_ahead", "mesh", "sharding",
        "freeze", "schedule", "freeze_method", "train_bn",
    }
)  # fmt: skip


def _check_same_run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """Refuses to resume a workdir's checkpoint under settings that change what it trains."""
    try:
        saved = json.loads((workdir / "config.json").read_text())
    except (OSError, ValueError):
        return  # no readable record: the checkpoint's own checks still apply
    now = _flat(json.loads(config.to_json()))
    before = _flat(saved)
    differ = [
        f"{key}: {before[key]!r} in the checkpoint's run, {now[key]!r} now"
        for key in sorted(now)
        if key in before
        and before[key] != now[key]
        and key.split(".")[0] not in _CHANGEABLE_ON_RESUME
    ]
    if differ:
        raise UsageError(
            f"Cannot resume {workdir}: its checkpoint was trained with other settings "
            f"({'; '.join(differ)}). Resume with the settings it was saved with, or start a "
            "fresh run in another --workdir."
        )


def _flat(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out


def _resume(
    ckpt: checkpoint.Checkpointer, target: _ResumeTarget, workdir: pathlib.Path
) -> tuple[train.Phases, train.TrainState, int, dict[str, Any]]:
    """The phases, state and step to start from, and the restored checkpoint's metadata."""
    if ckpt.latest_step() is None:
        return target.phases, target.phases.init_state(target.variables, target.rng), 0, {}
    try:
        start_step, restored, resumed, damaged = ckpt.restore_latest_intact(target)
    except lf.schedules.ResumeMismatchError as e:
        raise UsageError(f"{e} (workdir {workdir})") from e
    except checkpoint.CheckpointSourceError as e:
        raise UsageError(_source_changed(e, workdir)) from e
    except checkpoint.CheckpointDamagedError as e:
        raise UsageError(
            f"{e} Nothing intact is left to resume from; run the same command again to "
            "start this workdir from scratch."
        ) from e
    for step, reason in damaged:
        print(
            f"warning: checkpoint step {step} is damaged ({reason}); moved to "
            f"{ckpt.damaged_directory}, resuming from step {start_step}",
            file=sys.stderr,
        )
    phases = target.phases
    logging.info(
        "Resumed from step %d (phase %d) in %s.", start_step, phases.current, ckpt.directory
    )
    print(f"Resuming from step {start_step} (phase {phases.current}).")
    return phases, train.TrainState(**restored), start_step, resumed


def _source_changed(error: checkpoint.CheckpointSourceError, workdir: pathlib.Path) -> str:
    """One line for a checkpoint whose source (`init_from`) now holds other values."""
    if error.given is None:
        return f"Cannot resume {workdir}: {error}"
    listed = ", ".join(error.differ[:5])
    if len(error.differ) > 5:
        listed += f" and {len(error.differ) - 5} more"
    return (
        f"Cannot resume {workdir}: its checkpoint step {error.step} leaves out the layers "
        f"that still equal its source, {error.recorded}, and config.init_from now gives other "
        f"values ({error.given}) at {len(error.differ)} of them: {listed}. Put back the "
        "source the run started from, or start a fresh run in another --workdir; nothing "
        "was changed."
    )


class _Run:
    """What a run carries from step to step: its phases and what records them.

    The train rows average every step since the last row; the steps before a
    checkpoint ride along in its metadata, so a resumed run writes the rows an
    uninterrupted one writes.
    """

    def __init__(
        self,
        builder: _PhaseBuilder,
        dataset: data.Dataset,
        phases: train.Phases,
        ckpt: checkpoint.Checkpointer,
        workdir: pathlib.Path,
        start_step: int,
        total_steps: int,
        resumed: dict[str, Any],
    ):
        config = builder.config
        self.config, self.builder, self.policy = config, builder, builder.policy
        self.dataset, self.phases, self.ckpt = dataset, phases, ckpt
        # Process 0 writes the run's records; the others compute the same rows.
        self.writer = (
            metrics.MetricsWriter(workdir / "metrics.jsonl", resume_step=start_step)
            if jax.process_index() == 0
            else _Unwritten()
        )
        self.feature_cache = None
        if builder.feature_groups is not None:
            self.feature_cache = features.FeatureCache(
                builder.model,
                dataset.train_images,
                preprocess=data.normalize,
                batch_size=config.batch_size,
                pool=_pooled_feature_groups(builder.model),
                groups=_feature_groups(builder.model),  # a longer prefix grows from the held
            )
            # Compiled ahead, a change of frozen prefix gets its features' program and
            # its train step on them ready.
            phases.feature_cache = self.feature_cache
        self.progress = _Progress(config.progress, start_step, total_steps)
        saved_window = resumed.get("window")
        self.window = metrics.Window.from_state(saved_window) if saved_window else metrics.Window()
        self.pending: list[tuple[int, dict[str, jax.Array]]] = []  # per step, still on the device
        self.last_eval: dict[str, float] = {}
        self._frozen: dict[int, list[str]] = {}  # phase index -> frozen_now
        self.speed_policy = config.schedule in auto.POLICIES
        if self.policy is not None:  # AutoFreeze's likeliest next phase, compiled ahead
            phases.foresee(self.policy.candidate_schedule())

    def frozen_now(self, index: int) -> list[str]:
        """The groups phase `index` freezes entirely."""
        if index not in self._frozen:
            spec = self.phases.schedule.phases[index].spec
            self._frozen[index] = _frozen_now(spec, self.builder.shapes, self.builder.groups)
        return self._frozen[index]

    def begin_step(self, step: int, state: train.TrainState) -> tuple[Any, train.TrainState]:
        """The steps of the phase in force at `step`, and the state carried into it."""
        if self.policy is not None and self.policy.update(step):
            self.phases.extend(self.policy.schedule)
            self.phases.foresee(self.policy.candidate_schedule())  # compiled ahead, if asked
        steps, state, change = self.phases.update(step, state)
        if change is not None:
            print(change.describe())
            self.writer.write(self._phase_row(step, change, steps))
        return steps, state

    def _phase_row(self, step: int, change: train.PhaseChange, steps: Any) -> dict[str, Any]:
        row = {
            "step": step,
            "split": "phase",
            "phase": self.phases.current,
            "phase_start": True,
            "spec": steps.spec.describe(),
            "frozen": self.frozen_now(self.phases.current),
            "trainable_params": steps.trainable_params,
            "loss": None,
            "accuracy": None,
        }
        if self.policy is not None:  # what AutoFreeze decided from
            row["rates"] = dict(self.policy.last_rates)
        if self.speed_policy:  # the plot labels the line with the groups that froze
            before = self.frozen_now(change.previous_index)
            row["label"] = "+" + ",".join(g for g in row["frozen"] if g not in before)
        return row

    def inputs(self, batch: data.TrainBatch, state: train.TrainState) -> np.ndarray:
        """The batch's images, or their cached features after the phase's frozen prefix."""
        cache = self.feature_cache
        if cache is None:
            return batch.images
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        if cache.update(self.phases.frozen_prefix(), variables):
            print(
                f"cached features after {cache.prefix}: shape {cache.features.shape} float32 "
                f"({cache.nbytes / 2**20:.1f} MiB) in {cache.seconds:.2f}s"
            )
        if cache.features is None:
            return batch.images
        config = self.config
        idx = data.batch_indices(config.seed, batch.step, self.dataset.num_train, config.batch_size)
        return cache.features[idx]

    def collect(self, step: int, step_metrics: dict[str, jax.Array]) -> None:
        """Keeps a step's metrics on the device until the next row or checkpoint."""
        if self.policy is not None:
            self.policy.observe(step_metrics)
            if self.phases.compile_ahead and self.policy.forecast_due():  # the guess, revised
                self.phases.foresee(self.policy.candidate_schedule())
            step_metrics = {k: v for k, v in step_metrics.items() if not k.startswith("grad_norm/")}
        self.pending.append((step, step_metrics))

    def flush(self) -> None:
        """Moves pending step metrics into the window; stops at the first non-finite one."""
        config = self.config
        for at, values in jax.device_get(self.pending):
            bad = {k: float(values[k]) for k in ("loss", "grad_norm") if k in values}
            bad = {k: v for k, v in bad.items() if not math.isfinite(v)}
            if bad and not config.allow_nonfinite:
                raise Diverged(_diverged_message(at, bad, self.ckpt.latest_step(), config))
            self.window.add(values, examples=config.batch_size)
        self.pending.clear()

    def log_train(self, done: int, steps: Any) -> None:
        """Writes the train row of the steps up to `done`."""
        self.flush()
        host = self.window.mean()
        row = {
            "step": done,
            "split": "train",
            "loss": host["loss"],
            "accuracy": host["accuracy"],
            "grad_norm": host.get("grad_norm"),
            "trainable_params": steps.trainable_params,
            "examples_per_sec": self.window.examples_per_sec(),
            "phase": self.phases.current,
            "epoch": done / self.builder.steps_per_epoch,
        }
        if self.speed_policy:
            row["frozen"] = self.frozen_now(self.phases.current)
        self.writer.write(row)
        self.progress.update(done, row, self.last_eval)
        self.window.reset()

    def evaluate(self, step: int, state: train.TrainState, steps: Any) -> dict[str, Any]:
        """Writes the test row at `step`, and keeps it for the progress bar."""
        totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
        dataset, mesh = self.dataset, self.builder.mesh
        for batch in data.eval_batches(
            dataset.test_images, dataset.test_labels, self.config.batch_size
        ):
            sharded = train.shard_batch(
                mesh, _local({"image": batch.images, "label": batch.labels, "mask": batch.mask})
            )
            out = jax.device_get(steps.eval_step(state, sharded))
            for k in totals:
                totals[k] += float(out[k])
        self.last_eval = {
            "step": step,
            "split": "test",
            "loss": totals["loss"] / totals["count"],
            "accuracy": totals["correct"] / totals["count"],
            "trainable_params": steps.trainable_params,
            "phase": self.phases.current,
            "examples": int(totals["count"]),
        }
        self.writer.write(self.last_eval)
        return self.last_eval

    def save(self, step: int, state: train.TrainState) -> None:
        """Checkpoints `state` at `step`, once its metrics and params are known to be finite."""
        self.flush()
        config = self.config
        if not config.allow_nonfinite and not bool(_all_finite(state.params)):
            raise Diverged(
                _diverged_message(
                    int(state.step), {"params": math.nan}, self.ckpt.latest_step(), config
                )
            )
        self.ckpt.save(
            step,
            jax.tree.map(_host_if_whole, state.as_dict()),
            metadata={
                **self.phases.metadata(),
                **({"auto": self.policy.metadata()} if self.policy is not None else {}),
                "data_position": step,
                "epoch": step / self.builder.steps_per_epoch,
                "window": self.window.state(),
            },
        )


def _host_if_whole(x: Any) -> Any:
    """A leaf this process holds whole, as NumPy; a leaf split over processes as it is.

    Orbax writes a replicated `jax.Array` by splitting it among its replicas,
    compiling a slice program per shape; from the host it writes the same
    bytes and compiles nothing. Each process writes its shards of the others.
    """
    return np.asarray(x) if isinstance(x, jax.Array) and x.is_fully_addressable else x


class _Unwritten:
    """The metrics writer of a process other than 0: rows go nowhere."""

    def write(self, row: dict[str, Any]) -> bool:
        return False

    def rows(self) -> list[dict[str, Any]]:
        return []


class _Progress:
    """A tqdm bar with loss, accuracy and examples/s; silent when disabled."""

    def __init__(self, enabled: bool, start: int, total: int):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
        self.position = start

    def update(self, step: int, row: dict[str, Any], last_eval: dict[str, Any]) -> None:
        if self.bar is None:
            return
        self.bar.update(step - self.position)
        self.position = step
        post = {
            "loss": f"{row['loss']:.3f}",
            "acc": f"{row['accuracy']:.3f}",
            "ex/s": f"{row['examples_per_sec'] or 0:.0f}",
        }
        if last_eval:
            post["test_acc"] = f"{last_eval['accuracy']:.3f}"
        self.bar.set_postfix(post)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains and evaluates; resumes from the latest checkpoint in `workdir`.

    Returns:
      A summary dict: final test `accuracy` and `loss`, `steps`, number of
      train-step `compilations`, the final `phase` and `state`, and `compile`:
      the XLA programs this call `compiled`, those read from the persistent
      compilation cache (`cache_hits`) and the `seconds` both took.
    """
    validate_config(config)
    workdir_path = pathlib.Path(workdir)
    created = not workdir_path.exists()
    _check_workdir(workdir_path)
    try:
        with _one_run(workdir_path), platform.CompileCounter() as compiles:
            result = _train(config, workdir_path, compiles)
    except BaseException:
        if created and jax.process_index() == 0:
            _remove_if_unused(workdir_path)
        raise
    result["compile"] = {
        "compiled": compiles.compiled,
        "cache_hits": compiles.cache_hits,
        "seconds": compiles.seconds,
    }
    return result


def environment_message(error: OSError, workdir: str) -> str:
    """One line for a run stopped by its environment (no space, no permission)."""
    step = _newest_step(pathlib.Path(workdir) / "checkpoints")
    then = f"it resumes from checkpoint step {step}" if step is not None else "it starts afresh"
    if isinstance(error, checkpoint.CheckpointWriteError):  # says what was kept
        return f"{error} Fix that and run the same command again: {then}."
    what = error.strerror or str(error)
    where = f": {error.filename}" if error.filename else ""
    return (
        f"{what.rstrip('.')}{where}. Nothing saved was lost: fix that and run the same "
        f"command again: {then}."
    )


def _newest_step(directory: pathlib.Path) -> int | None:
    """The newest finished step directory under `directory`, read without Orbax."""
    try:
        steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()]
    except OSError:
        return None
    return max(steps, default=None)


def _remove_if_unused(path: pathlib.Path) -> None:
    """Removes a workdir that a failed run created and left with no file but its lock."""
    try:
        files = [p for p in path.rglob("*") if not p.is_dir() and p.name != ".lock"]
        if not files:
            shutil.rmtree(path)
    except OSError:
        pass  # leaving an empty directory behind is harmless


def _train(
    config: ml_collections.ConfigDict,
    workdir_path: pathlib.Path,
    compiles: platform.CompileCounter,
) -> dict[str, Any]:
    """`train_and_evaluate` in a checked workdir that this run holds, counting compilations."""
    model = build_model(config, _num_classes(config))
    groups = model_groups(model)
    schedule = build_schedule(config, groups).replace_specs(train_bn=config.train_bn)
    rng = jax.random.PRNGKey(config.seed)
    shapes = _param_shapes(model, rng, schedule)
    feature_groups = _feature_groups(model) if config.cache_frozen_features else None
    speed_policy = config.schedule in auto.POLICIES  # the schedule comes once the length is known
    if feature_groups is not None and not speed_policy:
        _check_feature_caching(config, schedule, shapes, feature_groups)

    dataset = load_data(config)
    _check_batch_size(config, dataset)
    steps_per_epoch = data.steps_per_epoch(dataset.num_train, config.batch_size)
    total_steps = _total_steps(config, schedule, steps_per_epoch)
    if not speed_policy:
        _check_phases_start(schedule, total_steps, steps_per_epoch)
    policy: auto.AutoFreeze | None = None
    if speed_policy:
        schedule, policy = _speed_policy(config, shapes, total_steps, groups)
        if feature_groups is not None:
            _check_feature_caching(config, schedule, shapes, feature_groups)
    # 0: about 50 train rows over the run, so short runs plot a curve too.
    log_every = config.log_every if config.log_every > 0 else max(1, total_steps // 50)
    variables, init_note, source = _initial_variables(config, model, rng)

    mesh = build_mesh(config)
    builder = _PhaseBuilder(
        config,
        model,
        build_optimizer(config, total_steps),
        params=variables["params"],
        shapes=shapes,
        mesh=mesh,
        sharding_rules=sharding_rules(config, mesh),
        steps_per_epoch=steps_per_epoch,
        feature_groups=feature_groups,
        groups=groups,
        policy=policy,
        compile_ahead=_compile_ahead(config),
    )
    target = _ResumeTarget(builder, builder.phases(schedule), variables, rng)
    ckpt = checkpoint.Checkpointer(
        workdir_path / "checkpoints",
        max_to_keep=config.keep_checkpoints,
        # Steps leave out what still equals init_from (frozen layers); a resume checks it.
        reference=source if config.checkpoint_source == "reference" else None,
    )
    if ckpt.latest_step() is not None:
        _check_same_run(config, workdir_path)
    # In the shardings of `config.sharding` on this run's mesh, whatever mesh saved it.
    phases, state, start_step, resumed = _resume(ckpt, target, workdir_path)
    steps = phases.steps()
    if start_step >= total_steps:
        finished = _final_test_row(workdir_path / "metrics.jsonl", start_step)
        if finished is not None:
            ckpt.close()
            _print_finished(workdir_path, start_step, finished)
            return _summary(finished, start_step, 0, phases.current, state)
    if jax.process_index() == 0:
        _record_config(config, workdir_path, schedule, shapes, groups)
    print(
        f"layerfreeze: {config.model} on {config.dataset}, {init_note}, "
        f"{total_steps} steps of {config.batch_size} ({steps_per_epoch} per epoch), "
        f"schedule: {schedule.describe()}"
    )
    print(lf.summary(state.params, steps.spec, state.opt_state, groups=groups))

    run = _Run(builder, dataset, phases, ckpt, workdir_path, start_step, total_steps, resumed)
    try:
        state, steps = _loop(config, run, dataset, mesh, state, start_step, total_steps, log_every)
    finally:
        # A guess compiled ahead (AutoFreeze) may still be compiling: let it end here
        # rather than compete with what runs next.
        phases.close(wait=True)
    final_step = int(jax.device_get(state.step))
    if ckpt.latest_step() != final_step:
        run.save(final_step, state)
    ckpt.close()
    result = run.evaluate(final_step, state, steps)
    if config.plot and jax.process_index() == 0:
        plot.plot_curves(run.writer.rows(), workdir_path / "curves.png")
    print(
        f"compilation: {compiles.compiled} program(s) compiled, {compiles.cache_hits} read "
        f"from the persistent cache, {compiles.seconds:.1f} s"
    )
    print(
        f"final test accuracy: {result['accuracy']:.4f} (loss {result['loss']:.4f}, "
        f"{result['examples']} examples, step {final_step})"
    )
    return _summary(result, final_step, phases.compilations, phases.current, state)


def _loop(
    config: ml_collections.ConfigDict,
    run: "_Run",
    dataset: data.Dataset,
    mesh: Any,
    state: train.TrainState,
    start_step: int,
    total_steps: int,
    log_every: int,
) -> tuple[train.TrainState, Any]:
    """The training loop: the state after the last step, and the last phase's steps."""
    steps = run.phases.steps()
    for batch in data.train_batches(
        dataset,
        batch_size=config.batch_size,
        seed=config.seed,
        start_step=start_step,
        stop_step=total_steps,
    ):
        steps, state = run.begin_step(batch.step, state)
        image = run.inputs(batch, state)
        sharded = train.shard_batch(mesh, _local({"image": image, "label": batch.labels}))
        state, step_metrics = steps.train_step(state, sharded)
        run.collect(batch.step, step_metrics)
        done = batch.step + 1
        if done % log_every == 0 or done == total_steps:
            run.log_train(done, steps)
        if done % config.eval_every == 0 and done != total_steps:
            run.evaluate(done, state, steps)
        if done % config.checkpoint_every == 0 or done == total_steps:
            run.save(done, state)
    run.progress.close()
    return state, steps
