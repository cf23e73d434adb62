r"""Transfer learning on CIFAR with layer freezing: the command line.

  python experiments/cifar.py --freeze=stage1,stage2
  python experiments/cifar.py --config=experiments/configs/cifar10_linear_probe.py \
      --config.init_from=runs/cifar100_source
  python experiments/cifar.py --config.dataset=synthetic   # offline smoke run
  python experiments/cifar.py --config.mesh=data=2,fsdp=2 --config.sharding=fsdp

On several hosts every host runs the same command with `--distributed` (and
`--num_processes`, `--process_id`, `--coordinator_address` where no cluster
manager tells JAX); see the README's "Scale out".

This file reads the flags; the work is `cifar_train.train_and_evaluate(config,
workdir)`. A run writes to its workdir: Orbax checkpoints (restarting with the
same `--workdir` resumes), `metrics.jsonl`, `config.json` and `curves.png`.
Bad input ends the run with one `error:` line (exit code 2); divergence, and
an environment that stops the run (a full disk, a path it may not write or
read), with one `error:` line (exit code 1) that says what remains to resume.
"""

import pathlib
import re
import sys

import cifar_train  # this folder is on sys.path when the file runs as a script
import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from layerfreeze.train import platform

_DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parent / "configs" / "cifar10.py")


def _config_path(argv: list[str]) -> str:
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    return path or _DEFAULT_CONFIG


def _load_config(argv: list[str]) -> ml_collections.ConfigDict:
    """The config file's `get_config()`, loaded without applying overrides."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_config", _config_path(argv))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _config_fields(argv: list[str]) -> list[str]:
    return list(_load_config(argv).keys())


def _config_help(argv: list[str]) -> str:
    """Every `--config.*` field with its default and the config file's comment on it."""
    path = _config_path(argv)
    comments = _field_comments(pathlib.Path(path).read_text())
    fields = dict(_flat(_load_config(argv)))
    order = [name for name in comments if name in fields]
    order += sorted(set(fields) - set(order))
    lines = [f"Config fields, set with --config.<field>=<value> (defaults from {path}):"]
    for name in order:
        comment = f"  # {comments[name]}" if comments.get(name) else ""
        lines.append(f"  {name} = {fields[name]!r}{comment}")
    return "\n".join(lines)


def _field_comments(source: str) -> dict[str, str]:
    """`{field: comment}` in file order: a field's trailing comment, else the lines above it."""
    comments: dict[str, str] = {}
    above: list[str] = []
    for line in source.splitlines():
        field = re.match(r"\s*config\.([\w.]+)\s*=[^#]*(?:#\s*(.*))?$", line)
        if field:
            comments.setdefault(field.group(1), field.group(2) or " ".join(above))
            above = []
        elif line.strip().startswith("#"):
            above.append(line.strip().lstrip("#").strip())
        else:
            above = []
    return comments


def _flat(config: ml_collections.ConfigDict, prefix: str = "") -> list[tuple[str, object]]:
    items = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            items += _flat(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _print_help(argv: list[str]) -> None:
    print(__doc__)
    print(flags.FLAGS.main_module_help())
    try:
        print(_config_help(argv))
    except Exception as e:  # the config file itself cannot be loaded
        _exit_usage(_config_file_error(argv, e))
    sys.exit(0)


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
    path = _config_path(argv)
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
except Exception as _error:  # a config file may raise anything
    if __name__ != "__main__":
        raise
    _bad_override(sys.argv, _error)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints and metrics go (default: runs/<dataset>_<model>_<freeze>)."
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() first: one process per host, each running this "
    "command; --config.mesh then spans every host's devices.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "With --distributed: host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS, or "
    "what Slurm, Open MPI or Cloud TPU tell JAX).",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "With --distributed: how many processes (default: the cluster's)."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id",
    None,
    "With --distributed: this process's index, 0 .. num_processes-1 (default: the cluster's).",
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
    if _DISTRIBUTED.value:  # before anything asks JAX for its devices
        _initialize_distributed()
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
    if config.get("compilation_cache"):  # before the first compilation
        try:
            platform.enable_compilation_cache(config.compilation_cache)
        except OSError as e:
            print(
                f"warning: no persistent compilation cache ({e}); set "
                "--config.compilation_cache to a writable directory, or '' to say so.",
                file=sys.stderr,
            )
    if _FREEZE.value is not None:
        config.freeze = _FREEZE.value
    workdir = _WORKDIR.value or default_workdir(config)
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


def _initialize_distributed() -> None:
    """`jax.distributed.initialize` from the flags, or one `error:` line."""
    try:
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    except (ValueError, TypeError) as e:
        _exit_usage(
            f"--distributed: {e} Pass --coordinator_address=<host of process 0>:<port>, "
            "--num_processes and --process_id (or run under Slurm, Open MPI or Cloud TPU)."
        )


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with bad config overrides reported in one line.

    `-h`, `--help` and `--helpshort` print this file's flags and every config field.
    """
    if any(a in ("-h", "--help", "--helpshort") for a in argv[1:]):
        _print_help(argv)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        cause = e.__cause__ or e.__context__
        if any(a.startswith("--config=") for a in argv) and cause is not None:
            _exit_usage(_config_file_error(argv, cause))
        _exit_usage(str(e))
    except (AttributeError, KeyError, TypeError, ValueError, SyntaxError, OSError) as e:
        _bad_override(argv, e)
    except Exception as e:  # a config file whose get_config() raises
        _exit_usage(_config_file_error(argv, e))
    raise AssertionError("unreachable")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
