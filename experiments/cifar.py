r"""Transfer learning on CIFAR with layer freezing.

  python experiments/cifar.py --freeze=stage1,stage2
  python experiments/cifar.py --config=configs/cifar10_linear_probe.py \
      --config.init_from=runs/cifar100_source
  python experiments/cifar.py --config.dataset=synthetic   # offline smoke run

The work lives in `train_and_evaluate(config, workdir)`; `main` only reads the
flags. A run writes to its workdir: Orbax checkpoints (restarting with the
same `--workdir` resumes), `metrics.jsonl`, `config.json` and `curves.png`.
"""

import dataclasses
import json
import math
import pathlib
import sys
import time
from typing import Any

_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # for `configs.*` imports inside config files
    sys.path.insert(0, str(_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import layerfreeze as lf  # noqa: E402
from layerfreeze import checkpoint, data, features, lr, models, schedules, train  # noqa: E402


def _config_fields(argv: list[str]) -> list[str]:
    import importlib.util

    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    path = path or str(_ROOT / "configs" / "cifar10.py")
    spec = importlib.util.spec_from_file_location("_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.get_config().keys())


def _exit_usage(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _bad_override(argv: list[str], error: Exception) -> None:
    try:
        fields = _config_fields(argv)
    except Exception as e:  # the config file itself cannot be loaded
        _exit_usage(_config_file_error(argv, e))
    valid = ", ".join(sorted(fields))
    overrides = [a for a in argv if a.startswith("--config.")]
    for arg in overrides:
        field = arg[len("--config.") :].split("=", 1)[0].split(".", 1)[0]
        if field not in fields:
            _exit_usage(f"Unknown config field {field!r} in {arg!r}. Valid fields: {valid}.")
    named = [a for a in overrides if a[len("--config.") :].split("=", 1)[0] in str(error)]
    arg = (named or overrides or ["--config.*"])[0]
    _exit_usage(f"Bad config override {arg!r} ({error}). Valid fields: {valid}.")


def _config_file_error(argv: list[str], error: Exception) -> str:
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    path = path or str(_ROOT / "configs" / "cifar10.py")
    if not pathlib.Path(path).is_file():
        return f"--config={path!r} does not exist; give a config file such as configs/cifar10.py."
    if isinstance(error, SyntaxError):
        return f"--config={path!r} has a syntax error at line {error.lineno}: {error.msg}."
    if isinstance(error, AttributeError) and "get_config" in str(error):
        return f"--config={path!r} defines no get_config(); a config file must define one."
    return f"--config={path!r} cannot be loaded: {type(error).__name__}: {error}."


try:
    # Overrides in sys.argv are applied here, when the flag is defined.
    _CONFIG = config_flags.DEFINE_config_file(
        "config", str(_ROOT / "configs" / "cifar10.py"), "Training configuration file."
    )
except (AttributeError, KeyError, TypeError, ValueError) as _error:
    if __name__ != "__main__":
        raise
    _bad_override(sys.argv, _error)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints and metrics go (default: runs/<dataset>_<model>_<freeze>)."
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host runs)."
)
_FREEZE = flags.DEFINE_string(
    "freeze", None, "Freeze spec, e.g. 'stage1,stage2', 'none', 'all-but:head' (overrides config)."
)

OPTIMIZERS = ("adamw", "sgd")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class UsageError(ValueError):
    """Bad input from the command line or config: reported as one line."""


# --------------------------------------------------------------------------- #
# Configuration checks
# --------------------------------------------------------------------------- #


def _choice(name: str, value: Any, valid: tuple[str, ...] | list[str]) -> None:
    if value not in valid:
        raise UsageError(f"Unknown {name} {value!r}; valid: {', '.join(map(str, valid))}.")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks the fields that name choices, before any work is done."""
    _choice("dataset", config.dataset, data.DATASETS)
    _choice("model", config.model, models.MODEL_NAMES)
    _choice("stem", config.stem, models.STEMS)
    _choice("head", config.head, models.HEADS)
    _choice("dtype", config.dtype, list(DTYPES))
    _choice("optimizer", config.optimizer, OPTIMIZERS)
    _choice("freeze_method", config.freeze_method, lf.METHODS)
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
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
        raise UsageError("Set config.num_train_steps > 0 or config.num_epochs > 0.")
    n = jax.device_count()
    if config.batch_size % n:
        raise UsageError(
            f"config.batch_size={config.batch_size} must divide over {n} devices; "
            f"use a multiple of {n}."
        )
    if config.init_from and not pathlib.Path(config.init_from).exists():
        raise UsageError(
            f"config.init_from={config.init_from!r} does not exist; give the workdir of an "
            "earlier run or a torchvision .pth/.safetensors file."
        )


def _check_workdir(path: pathlib.Path) -> None:
    """Creates the workdir and makes sure this run can write there."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--workdir={str(path)!r} is a file, not a directory; give a directory.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(
            f"Cannot write to --workdir={str(path)!r} ({e.strerror or e}); give a writable "
            "directory."
        ) from e


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
        return data.load_dataset(
            config.dataset, data_dir=config.data_dir or None, download=config.download
        )
    except data.DatasetUnavailableError as e:
        raise UsageError(str(e)) from e


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> models.ResNet:
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


def build_schedule(config: ml_collections.ConfigDict) -> schedules.FreezeSchedule:
    groups = list(models.GROUPS)
    try:
        if config.schedule:
            schedule = schedules.parse_schedule(config.schedule, groups)
        else:
            schedule = schedules.constant(config.freeze)
        if config.lr_multipliers:
            schedule = _with_multipliers(schedule, config.lr_multipliers, groups)
        schedule.validate(groups)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from e
    return schedule


def _with_multipliers(
    schedule: schedules.FreezeSchedule, text: str, groups: list[str]
) -> schedules.FreezeSchedule:
    kind, _, arg = text.partition(":")
    if "=" in text:  # explicit: 'stem=0.01,stage1=0.1'
        try:
            pairs = [item.split("=", 1) for item in text.split(",")]
            mults = {group.strip(): float(value) for group, value in pairs}
        except ValueError as e:
            raise UsageError(f"Bad lr_multipliers {text!r}: use 'group=factor,...'.") from e
    elif kind == "ulmfit":
        mults = lr.ulmfit_multipliers(groups, float(arg) if arg else 2.6)
    elif kind == "geometric":
        mults = lr.geometric_multipliers(groups, float(arg or 1e-2), 1.0)
    else:
        raise UsageError(
            f"Unknown lr_multipliers {text!r}; valid: '', 'ulmfit', 'ulmfit:<factor>', "
            "'geometric:<lo/hi ratio>', 'group=factor,...'."
        )
    phases = tuple(
        dataclasses.replace(p, lr_multipliers=tuple(mults.items())) for p in schedule.phases
    )
    return dataclasses.replace(schedule, phases=phases)


def _load_source_variables(path: str, model: models.ResNet, variables: dict) -> tuple[dict, str]:
    """Params and batch_stats from another run's workdir or a torchvision file."""
    source = pathlib.Path(path)
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
        note = f"torchvision weights from {source}"
    else:
        ckpt_dir = source / "checkpoints"
        if not ckpt_dir.is_dir():
            raise UsageError(
                f"config.init_from={path!r} holds no checkpoints/ directory; give the workdir "
                "of an earlier run or a torchvision .pth/.safetensors file."
            )
        with checkpoint.Checkpointer(ckpt_dir) as ckpt:
            try:
                step, loaded, damaged = ckpt.restore_arrays_latest_intact(("params", "batch_stats"))
            except (FileNotFoundError, ValueError, checkpoint.CheckpointDamagedError) as e:
                raise UsageError(f"config.init_from={path!r}: {e}") from e
            for bad, reason in damaged:
                print(
                    f"warning: init_from checkpoint step {bad} is damaged ({reason}); "
                    f"using step {step}",
                    file=sys.stderr,
                )
            note = f"run {source} (step {step})"
    params, reinit = _merge_groups(variables["params"], loaded["params"], "params")
    stats, _ = _merge_groups(variables["batch_stats"], loaded.get("batch_stats", {}), "batch_stats")
    if reinit:
        note += f"; re-initialised: {', '.join(reinit)} (shapes differ: class count)"
    return {"params": params, "batch_stats": stats}, note


def _merge_groups(fresh: dict, loaded: dict, what: str) -> tuple[dict, list[str]]:
    merged, reinit = {}, []
    for group, subtree in fresh.items():
        if group not in loaded:
            if group == "head":  # torchvision import without a matching fc layer
                merged[group], reinit = subtree, [*reinit, group]
                continue
            raise UsageError(f"init_from has no {what} group {group!r}; it has {sorted(loaded)}.")
        same = jax.tree.structure(subtree) == jax.tree.structure(loaded[group]) and all(
            np.shape(a) == np.shape(b)
            for a, b in zip(jax.tree.leaves(subtree), jax.tree.leaves(loaded[group]), strict=True)
        )
        if same:
            merged[group] = jax.tree.map(jnp.asarray, loaded[group])
        elif group == "head":
            merged[group] = subtree
            reinit.append(group)
        else:
            raise UsageError(
                f"init_from {what} group {group!r} does not match this model (other "
                "architecture or width); use the same --config.model and --config.stem."
            )
    return merged, reinit


def _local(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This host's contiguous slice of a global batch (all of it on one host)."""
    n, i = jax.process_count(), jax.process_index()
    return {k: np.array_split(v, n)[i] for k, v in arrays.items()}


def _check_feature_caching(
    config: ml_collections.ConfigDict,
    schedule: schedules.FreezeSchedule,
    prefixes: list[str | None],
) -> None:
    """Refuses `cache_frozen_features` where cached features would change the run."""
    if config.augment:
        raise UsageError(
            "config.cache_frozen_features=True computes each training image's features "
            "once, so they would ignore the random crops and flips of config.augment=True; "
            "pass --config.augment=False to cache without augmentation (or turn caching "
            "off with --config.cache_frozen_features=False)."
        )
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


class _FeatureCache:
    """Train-set features up to the current phase's frozen prefix, kept on the host.

    Recomputed from the current state whenever the prefix changes: the groups
    of a prefix stay bit-identical while it lasts, but a phase in between may
    have trained them. Derived data: never checkpointed, recomputed on resume.
    """

    def __init__(self, model: models.ResNet, images: np.ndarray, batch_size: int):
        self.model, self.images, self.batch_size = model, images, batch_size
        self.prefix: str | None = None
        self.features: np.ndarray | None = None

    def update(self, prefix: str | None, state: train.TrainState) -> None:
        if prefix == self.prefix:
            return
        self.prefix, self.features = prefix, None
        if prefix is None:
            print("training on images: this phase leaves no frozen prefix to cache")
            return
        start = time.perf_counter()
        variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
        self.features = features.compute_features(
            self.model,
            variables,
            self.images,
            upto=prefix,
            preprocess=data.normalize,
            batch_size=self.batch_size,
            pool=prefix == "stage4",  # the head reads only the spatial mean
        )
        seconds = time.perf_counter() - start
        mib = self.features.nbytes / 2**20
        logging.info("Cached %s features %s in %.2fs.", prefix, self.features.shape, seconds)
        print(
            f"cached features after {prefix}: shape {self.features.shape} float32 "
            f"({mib:.1f} MiB) in {seconds:.2f}s"
        )


def _final_test_row(path: pathlib.Path, step: int) -> dict[str, Any] | None:
    """The test row a finished run wrote at `step`, if its metrics hold one."""
    if not path.exists():
        return None
    for line in reversed(path.read_text().splitlines()):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("split") == "test" and row.get("step") == step:
            return row
    return None


def _frozen_groups(schedule: schedules.FreezeSchedule, params: Any) -> list[str]:
    """Top-level groups with a parameter frozen in some phase, in model order."""
    frozen: set[str] = set()
    for phase in schedule.phases:
        for path, is_frozen in phase.spec.resolve(params).items():
            if is_frozen:
                frozen.add(path.split("/", 1)[0])
    return [g for g in models.GROUPS if g in frozen]


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


# --------------------------------------------------------------------------- #
# Metrics output
# --------------------------------------------------------------------------- #


class MetricsWriter:
    """Appends one JSON object per log event to `metrics.jsonl`."""

    def __init__(self, path: pathlib.Path, resume_step: int):
        self.path = path
        if path.exists():  # drop rows a dead run wrote after its last checkpoint
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            # A phase row at the resume step is written again when the loop
            # crosses that boundary anew.
            kept = [
                r
                for r in rows
                if r["step"] < resume_step or (r["step"] == resume_step and r["split"] != "phase")
            ]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_curves(rows: list[dict[str, Any]], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-"), ("test", "o-")):
        r = [x for x in rows if x["split"] == split]
        if r:
            steps = [x["step"] for x in r]
            ax_loss.plot(steps, [x["loss"] for x in r], style, label=split)
            ax_acc.plot(steps, [x["accuracy"] for x in r], style, label=split)
    for start in sorted({x["step"] for x in rows if x.get("phase_start")}):
        for ax in (ax_loss, ax_acc):
            ax.axvline(start, color="grey", linestyle=":", linewidth=1)
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains and evaluates; resumes from the latest checkpoint in `workdir`.

    Returns:
      A summary dict: final test `accuracy` and `loss`, `steps`, number of
      train-step `compilations`, and `phases` seen.
    """
    validate_config(config)
    workdir_path = pathlib.Path(workdir)
    _check_workdir(workdir_path)

    schedule = build_schedule(config).replace_specs(train_bn=config.train_bn)
    num_classes = (
        config.synthetic_num_classes
        if config.dataset == "synthetic"
        else data.NUM_CLASSES[config.dataset]
    )
    model = build_model(config, num_classes)
    rng = jax.random.PRNGKey(config.seed)
    sample = jnp.zeros((1, *data.IMAGE_SHAPE), jnp.float32)
    shapes = jax.eval_shape(lambda r: model.init(r, sample, train=False), rng)
    for phase in schedule.phases:  # every spec must fit this model, before any work
        try:
            phase.spec.resolve(shapes["params"])
        except ValueError as e:
            raise UsageError(str(e)) from e

    def feature_prefix(phase: schedules.Phase) -> str | None:
        """The group whose cached output this phase trains from (None: images)."""
        if not config.cache_frozen_features:
            return None
        return features.frozen_prefix(shapes["params"], phase.spec, models.GROUPS[:-1])

    prefixes = [feature_prefix(p) for p in schedule.phases]  # per phase index
    if config.cache_frozen_features:
        _check_feature_caching(config, schedule, prefixes)

    dataset = load_data(config)
    if config.batch_size > dataset.num_train:
        raise UsageError(
            f"config.batch_size={config.batch_size} is larger than the training set "
            f"({dataset.num_train} examples); use a batch size of at most {dataset.num_train}."
        )
    spe = data.steps_per_epoch(dataset.num_train, config.batch_size)
    total_steps = (
        config.num_train_steps
        if config.num_train_steps > 0
        else max(1, math.ceil(config.num_epochs * spe))
    )
    # 0: about 50 train rows over the run, so short runs plot a curve too.
    log_every = config.log_every if config.log_every > 0 else max(1, total_steps // 50)
    variables = jax.jit(lambda r: model.init(r, sample, train=False))(rng)
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    init_note = "random init"
    if config.init_from:
        variables, init_note = _load_source_variables(config.init_from, model, variables)

    mesh = train.make_mesh()
    base_opt = build_optimizer(config, total_steps)
    augment = config.augment

    def preprocess(rng, images):
        if augment:
            images = data.augment(rng, images)
        return data.normalize(images)

    def build(phase: schedules.Phase, previous: tuple[lf.FreezeSpec, ...]) -> train.TrainSteps:
        prefix = feature_prefix(phase)
        # Always chained, so the optimizer state keeps its structure across
        # phases with and without multipliers and carries over intact.
        opt = optax.chain(base_opt, lr.scale_by_group(dict(phase.lr_multipliers)))
        return train.make_steps(
            model,
            opt,
            phase.spec,
            variables["params"],
            method=config.freeze_method,
            preprocess=preprocess if prefix is None else _identity,
            preprocess_eval=data.normalize,
            mesh=mesh,
            start_after=prefix,
            previous=previous,
        )

    phases = lf.Phases(
        schedule,
        build,
        params=shapes["params"],
        steps_per_epoch=spe,
        method=config.freeze_method,
        mesh=mesh,
    )

    ckpt = checkpoint.Checkpointer(
        workdir_path / "checkpoints", max_to_keep=config.keep_checkpoints
    )
    start_step = 0
    if ckpt.latest_step() is not None:

        def make_target(meta: dict[str, Any]) -> dict[str, Any]:
            phases.restore(meta)
            return phases.steps().init_state(variables, rng).as_dict()

        try:
            start_step, restored, _, damaged = ckpt.restore_latest_intact(make_target)
        except lf.ResumeMismatchError as e:
            raise UsageError(f"{e} (workdir {workdir_path})") from e
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
        state = train.TrainState(**restored)
        logging.info(
            "Resumed from step %d (phase %d) in %s.", start_step, phases.current, ckpt.directory
        )
        print(f"Resuming from step {start_step} (phase {phases.current}).")
    else:
        state = phases.init_state(variables, rng)
    state = train.replicate(mesh, state)
    steps = phases.steps()
    if start_step >= total_steps:
        finished = _final_test_row(workdir_path / "metrics.jsonl", start_step)
        if finished is not None:
            ckpt.close()
            print(
                f"{workdir_path} already finished at step {start_step}: test accuracy "
                f"{finished['accuracy']:.4f} (loss {finished['loss']:.4f}). Nothing to do; "
                "give a new --workdir (or more steps) to train again."
            )
            return {
                "accuracy": finished["accuracy"],
                "loss": finished["loss"],
                "steps": start_step,
                "compilations": 0,
                "phase": phases.current,
                "state": state,
            }
    frozen_random = [] if config.init_from else _frozen_groups(schedule, shapes["params"])
    if frozen_random:
        print(
            f"warning: no config.init_from, so the frozen layers ({', '.join(frozen_random)}) "
            "keep their random initial weights; transfer learning freezes pretrained layers. "
            "Pass --config.init_from=<workdir of a source run, or a .pth file>, or "
            "--freeze=none to train from scratch.",
            file=sys.stderr,
        )
    # Only a run that got this far owns the workdir's record of its config.
    record = json.loads(config.to_json())
    record["frozen_random_init"] = frozen_random
    (workdir_path / "config.json").write_text(json.dumps(record, indent=2) + "\n")

    print(
        f"layerfreeze: {config.model} on {config.dataset}, {init_note}, "
        f"{total_steps} steps of {config.batch_size} ({spe} per epoch), "
        f"schedule: {schedule.describe()}"
    )
    print(lf.summary(state.params, steps.spec, state.opt_state, order=models.GROUPS))

    writer = MetricsWriter(workdir_path / "metrics.jsonl", start_step)
    feature_cache = (
        _FeatureCache(model, dataset.train_images, config.batch_size)
        if config.cache_frozen_features
        else None
    )
    progress = _progress(config.progress, start_step, total_steps)
    window: dict[str, list[float]] = {}
    window_start = time.perf_counter()
    window_examples = 0
    last_eval: dict[str, float] = {}
    unchecked: list[tuple[int, dict[str, jax.Array]]] = []  # per step, not yet read back

    def check_finite(check_params: bool = False) -> None:
        """Stops the run at the first step whose loss or gradient norm is not finite."""
        if config.allow_nonfinite:
            unchecked.clear()
            return
        for at, values in jax.device_get(unchecked):
            bad = {k: float(v) for k, v in values.items() if not np.isfinite(v)}
            if bad:
                raise Diverged(_diverged_message(at, bad, ckpt.latest_step(), config))
        unchecked.clear()
        if check_params and not bool(_all_finite(state.params)):
            raise Diverged(
                _diverged_message(int(state.step), {"params": math.nan}, ckpt.latest_step(), config)
            )

    def save(step: int) -> None:
        check_finite(check_params=True)
        ckpt.save(
            step,
            jax.device_get(state.as_dict()),
            metadata={**phases.metadata(), "data_position": step, "epoch": step / spe},
        )

    def evaluate(step: int) -> dict[str, float]:
        totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
        for batch in data.eval_batches(dataset.test_images, dataset.test_labels, config.batch_size):
            sharded = train.shard_batch(
                mesh, _local({"image": batch.images, "label": batch.labels, "mask": batch.mask})
            )
            out = jax.device_get(steps.eval_step(state, sharded))
            for k in totals:
                totals[k] += float(out[k])
        row = {
            "step": step,
            "split": "test",
            "loss": totals["loss"] / totals["count"],
            "accuracy": totals["correct"] / totals["count"],
            "trainable_params": steps.trainable_params,
            "phase": phases.current,
            "examples": int(totals["count"]),
        }
        writer.write(row)
        return row

    for batch in data.train_batches(
        dataset,
        batch_size=config.batch_size,
        seed=config.seed,
        start_step=start_step,
        stop_step=total_steps,
    ):
        step = batch.step
        steps, state, change = phases.update(step, state)
        if change is not None:
            print(change.describe())
            writer.write(
                {
                    "step": step,
                    "split": "phase",
                    "phase": phases.current,
                    "phase_start": True,
                    "spec": steps.spec.describe(),
                    "trainable_params": steps.trainable_params,
                    "loss": None,
                    "accuracy": None,
                }
            )
        image = batch.images
        if feature_cache is not None:
            feature_cache.update(prefixes[phases.current], state)
            if feature_cache.features is not None:
                idx = data.batch_indices(config.seed, step, dataset.num_train, config.batch_size)
                image = feature_cache.features[idx]
        sharded = train.shard_batch(mesh, _local({"image": image, "label": batch.labels}))
        state, metrics = steps.train_step(state, sharded)
        window_examples += config.batch_size
        for k, v in metrics.items():
            window.setdefault(k, []).append(v)
        unchecked.append((step, {k: metrics[k] for k in ("loss", "grad_norm") if k in metrics}))
        done = step + 1
        if done % log_every == 0 or done == total_steps:
            check_finite()
            host = {k: float(np.mean(jax.device_get(v))) for k, v in window.items()}
            elapsed = time.perf_counter() - window_start
            row = {
                "step": done,
                "split": "train",
                "loss": host["loss"],
                "accuracy": host["accuracy"],
                "grad_norm": host.get("grad_norm"),
                "trainable_params": steps.trainable_params,
                "examples_per_sec": window_examples / max(elapsed, 1e-9),
                "phase": phases.current,
                "epoch": done / spe,
            }
            writer.write(row)
            progress.update(done, row, last_eval)
            window, window_examples, window_start = {}, 0, time.perf_counter()
        if done % config.eval_every == 0 and done != total_steps:
            last_eval = evaluate(done)
        if done % config.checkpoint_every == 0 or done == total_steps:
            save(done)
    progress.close()

    final_step = int(jax.device_get(state.step))
    if ckpt.latest_step() != final_step:
        save(final_step)
    ckpt.close()
    result = evaluate(final_step)
    if config.plot:
        plot_curves(writer.rows(), workdir_path / "curves.png")
    print(
        f"final test accuracy: {result['accuracy']:.4f} (loss {result['loss']:.4f}, "
        f"{result['examples']} examples, step {final_step})"
    )
    return {
        "accuracy": result["accuracy"],
        "loss": result["loss"],
        "steps": final_step,
        "compilations": phases.compilations,
        "phase": phases.current,
        "state": state,
    }


class _progress:
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
            "ex/s": f"{row['examples_per_sec']:.0f}",
        }
        if last_eval:
            post["test_acc"] = f"{last_eval['accuracy']:.3f}"
        self.bar.set_postfix(post)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def default_workdir(config: ml_collections.ConfigDict) -> str:
    spec = (config.schedule or config.freeze or "none").replace("/", "-")
    safe = "".join(c if c.isalnum() or c in "-_.," else "_" for c in spec).replace(",", "+")
    return str(pathlib.Path("runs") / f"{config.dataset}_{config.model}_{safe}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        # The console shows the summary, the progress bar, warnings and the
        # result; library INFO logs (Orbax, XLA) only with --verbosity=0.
        logging.set_verbosity(logging.WARNING)
    try:
        config = _CONFIG.value
        config.keys()  # a file that failed to load raises on first use
    except Exception as e:  # config_flags loads the file lazily
        _exit_usage(_config_file_error(sys.argv, e))
    if _FREEZE.value is not None:
        config.freeze = _FREEZE.value
    workdir = _WORKDIR.value or default_workdir(config)
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    if jax.process_count() > 1:
        logging.info("Process %d of %d.", jax.process_index(), jax.process_count())
    try:
        train_and_evaluate(config, workdir)
    except UsageError as e:
        _exit_usage(str(e))
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with bad config overrides reported in one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        cause = e.__cause__ or e.__context__
        if any(a.startswith("--config=") for a in argv) and cause is not None:
            _exit_usage(_config_file_error(argv, cause))
        _exit_usage(str(e))
    except (AttributeError, KeyError, TypeError, ValueError, SyntaxError, OSError) as e:
        _bad_override(argv, e)
    raise AssertionError("unreachable")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
