r"""Transfer learning on CIFAR with layer freezing: the command line.

  python experiments/cifar.py --freeze=stage1,stage2
  python experiments/cifar.py --config=experiments/configs/cifar10_linear_probe.py \
      --config.init_from=runs/cifar100_source
  python experiments/cifar.py --config.dataset=synthetic   # offline smoke run

This file reads the flags; the work is `cifar_train.train_and_evaluate(config,
workdir)`. A run writes to its workdir: Orbax checkpoints (restarting with the
same `--workdir` resumes), `metrics.jsonl`, `config.json` and `curves.png`.
Bad input ends the run with one `error:` line (exit code 2); divergence, and
an environment that stops the run (a full disk, a path it may not write or
read), with one `error:` line (exit code 1) that says what remains to resume.
"""

import pathlib
import sys

import cifar_train  # this folder is on sys.path when the file runs as a script
import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from layerfreeze.train import platform

_DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parent / "configs" / "cifar10.py")


def _config_fields(argv: list[str]) -> list[str]:
    import importlib.util

    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    path = path or _DEFAULT_CONFIG
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
    path = path or _DEFAULT_CONFIG
    if not pathlib.Path(path).is_file():
        return (
            f"--config={path!r} does not exist; give a config file such as "
            "experiments/configs/cifar10.py."
        )
    if isinstance(error, SyntaxError):
        return f"--config={path!r} has a syntax error at line {error.lineno}: {error.msg}."
    if isinstance(error, AttributeError) and "get_config" in str(error):
        return f"--config={path!r} defines no get_config(); a config file must define one."
    return f"--config={path!r} cannot be loaded: {type(error).__name__}: {error}."


try:
    # Overrides in sys.argv are applied here, when the flag is defined.
    _CONFIG = config_flags.DEFINE_config_file(
        "config", _DEFAULT_CONFIG, "Training configuration file."
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
_HOST_MEMORY = flags.DEFINE_enum(
    "host_memory",
    "release",
    ["retain", "release"],
    "retain: keep the host memory a step frees for the next (layerfreeze.train."
    "platform.retain_host_memory: on glibc, no per-step page faults, but one allocator arena); "
    "release: the C library's defaults.",
)


def default_workdir(config: ml_collections.ConfigDict) -> str:
    spec = (config.schedule or config.freeze or "none").replace("/", "-")
    safe = "".join(c if c.isalnum() or c in "-_.," else "_" for c in spec).replace(",", "+")
    return str(pathlib.Path("runs") / f"{config.dataset}_{config.model}_{safe}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if _HOST_MEMORY.value == "retain":
        platform.retain_host_memory()  # before the first JAX computation; warns off glibc
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
        cifar_train.train_and_evaluate(config, workdir)
    except cifar_train.UsageError as e:
        _exit_usage(str(e))
    except cifar_train.Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # no space, no permission: the run stops, nothing saved is lost
        print(f"error: {cifar_train.environment_message(e, workdir)}", file=sys.stderr)
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
