"""End-to-end runs of `experiments/cifar.py` on tiny models and data."""

import contextlib
import errno
import functools
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import types

import cifar_train as cifar
import fresh
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from configs import cifar10 as default_config

from layerfreeze.train import checkpoint, data

ROOT = pathlib.Path(__file__).resolve().parents[2]


def tiny_config(**overrides):
    config = default_config.get_config()
    config.dataset = "synthetic"
    config.model = "resnet10"  # half of ResNet-18's depth: half its tracing and compiling
    config.synthetic_train_size = 64
    config.synthetic_test_size = 24
    config.width = 4
    config.batch_size = 16
    config.num_train_steps = 8
    config.warmup_steps = 2
    config.log_every = 2
    config.eval_every = 4
    config.checkpoint_every = 3
    config.progress = False
    config.plot = False
    # Compiling ahead adds background compiles to every run; one test turns it on
    # (test_unfreezing_experiment.py's straight runs).
    config.compile_ahead = False
    for key, value in overrides.items():
        config[key] = value
    return config


# The fields tiny_config sets, for a command line that runs the same config.
_TINY_FIELDS = (
    "dataset",
    "model",
    "synthetic_train_size",
    "synthetic_test_size",
    "width",
    "batch_size",
    "num_train_steps",
    "warmup_steps",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "progress",
    "plot",
    "compile_ahead",
)


def _rows(workdir):
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").open()]


def _params(workdir):
    # A run with init_from leaves out what still equals its source: read it back through it.
    reference = functools.partial(cifar.run_source, workdir)
    with checkpoint.Checkpointer(
        pathlib.Path(workdir) / "checkpoints", reference=reference
    ) as ckpt:
        return ckpt.restore_arrays(("params", "batch_stats", "opt_state"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One run of `tiny_config(plot=True)`, shared: tests read it or copy it, never change it."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        result = cifar.train_and_evaluate(tiny_config(plot=True), str(workdir))
    return types.SimpleNamespace(
        workdir=workdir, result=result, out=out.getvalue(), err=err.getvalue()
    )


def _copy(run, tmp_path):
    """A copy of a shared run's workdir, for a test that goes on from it."""
    return pathlib.Path(shutil.copytree(run.workdir, tmp_path / "run"))


def test_synthetic_run_writes_checkpoints_metrics_and_plot(tiny_run):
    result, out, tmp_path = tiny_run.result, tiny_run.out, tiny_run.workdir
    assert "freeze spec: stem,stage1" in out
    assert out.strip().splitlines()[-1].startswith("final test accuracy: ")
    assert result["steps"] == 8 and result["compilations"] == 1
    rows = _rows(tmp_path)
    train_rows = [r for r in rows if r["split"] == "train"]
    test_rows = [r for r in rows if r["split"] == "test"]
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8]
    assert [r["step"] for r in test_rows] == [4, 8]
    for r in train_rows + test_rows:
        assert {"step", "split", "loss", "accuracy", "trainable_params"} <= set(r)
        assert np.isfinite(r["loss"])
    assert test_rows[-1]["examples"] == 24
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert json.loads((tmp_path / "config.json").read_text())["width"] == 4
    with checkpoint.Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [3, 6, 8]
        assert ckpt.restore_metadata()["spec"] == "stem,stage1"


def test_learns_on_synthetic_data(tmp_path):
    config = tiny_config(
        width=8,
        num_train_steps=40,
        learning_rate=3e-3,
        freeze="none",
        eval_every=100,
        checkpoint_every=100,
        synthetic_train_size=320,
        log_every=4,
    )
    cifar.train_and_evaluate(config, str(tmp_path))
    losses = [r["loss"] for r in _rows(tmp_path) if r["split"] == "train"]
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.usefixtures("fixed_mock_getitems")
def test_cifar10_through_tfds_mock_data(tmp_path):
    config = tiny_config(dataset="cifar10", data_dir=str(tmp_path / "tfds"), download=False)
    with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
        result = cifar.train_and_evaluate(config, str(tmp_path / "run"))
    assert result["steps"] == 8
    assert [r["examples"] for r in _rows(tmp_path / "run") if r["split"] == "test"] == [48, 48]


class _Killed(Exception):
    pass


def _kill_after(monkeypatch, n_batches):
    real = data.train_batches

    def dying(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == n_batches:
                raise _Killed
            yield batch

    monkeypatch.setattr(data, "train_batches", dying)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture
def cache_every_program():
    """The test session's persistent compilation cache (conftest) stores every program."""
    before = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before)


@pytest.mark.usefixtures("cache_every_program")
@pytest.mark.parametrize("kill_at", [5])
def test_resume_after_kill_is_bitwise_identical(tmp_path, monkeypatch, kill_at):
    # Frozen parameters stored in bfloat16 and a phase change at step 4 (epoch 1)
    # that the resumed run crosses: stage2 is unfrozen (cast up), stage1 frozen
    # (cast down). The float32 path resumes bitwise in the tests below.
    config = tiny_config(frozen_dtype="bfloat16", schedule="explicit:0=stem,stage2;1=stem,stage1")
    cifar.train_and_evaluate(config, str(tmp_path / "straight"))

    with monkeypatch.context() as m:
        _kill_after(m, kill_at)
        with pytest.raises(_Killed):
            cifar.train_and_evaluate(config, str(tmp_path / "resumed"))
    with checkpoint.Checkpointer(tmp_path / "resumed" / "checkpoints") as ckpt:
        assert ckpt.latest_step() == 3  # the kill lost steps 4 and 5
    resumed = cifar.train_and_evaluate(config, str(tmp_path / "resumed"))
    # With the persistent cache warm, the resumed run compiles nothing: every
    # program it asks for (init, train and eval steps) is read back.
    assert resumed["compile"]["compiled"] == 0 and resumed["compile"]["cache_hits"] >= 3

    _assert_trees_equal(_params(tmp_path / "straight"), _params(tmp_path / "resumed"))
    stored = _params(tmp_path / "resumed")["params"]
    for group, dtype in [("stem", "bfloat16"), ("stage1", "bfloat16"), ("stage2", "float32")]:
        assert {x.dtype.name for x in jax.tree.leaves(stored[group])} == {dtype}, group
    assert json.loads((tmp_path / "resumed" / "config.json").read_text())["frozen_dtype"] == (
        "bfloat16"
    )

    def rows(workdir):
        return [{k: v for k, v in r.items() if k != "examples_per_sec"} for r in _rows(workdir)]

    # Rows of the lost steps were dropped, none doubled, and every value matches.
    assert rows(tmp_path / "resumed") == rows(tmp_path / "straight")


def test_init_from_source_run_with_other_class_count(tmp_path, capsys):
    source = tiny_config(synthetic_num_classes=20, freeze="none", num_train_steps=4)
    cifar.train_and_evaluate(source, str(tmp_path / "source"))
    source_params = _params(tmp_path / "source")["params"]

    target = tiny_config(init_from=str(tmp_path / "source"), freeze="all-but:head")
    cifar.train_and_evaluate(target, str(tmp_path / "target"))
    out = capsys.readouterr().out
    assert f"run {tmp_path / 'source'} (step 4); re-initialised: head" in out
    target_params = _params(tmp_path / "target")["params"]
    assert target_params["head"]["Dense_0"]["kernel"].shape == (32, 10)
    frozen = ("stem", "stage1", "stage2", "stage3", "stage4")
    for group in frozen:
        _assert_trees_equal(source_params[group], target_params[group])
    # The frozen layers still equal the source's: the checkpoints leave them out.
    stored = json.loads(
        (tmp_path / "target" / "checkpoints" / "8" / "metadata" / "metadata").read_text()
    )
    recorded = stored["layerfreeze.source"]
    assert recorded["name"] == f"run {tmp_path / 'source'} (step 4)"
    assert {path.split("/")[1] for path in recorded["omitted"]} == set(frozen)

    # The source changed since (its step 4 is gone: it now gives step 3): a resume is
    # refused in one line, and changes nothing.
    shutil.rmtree(tmp_path / "source" / "checkpoints" / "4")
    files = {p: p.read_bytes() for p in (tmp_path / "target").rglob("*") if p.is_file()}
    with pytest.raises(cifar.UsageError) as info:
        cifar.train_and_evaluate(
            tiny_config(
                init_from=str(tmp_path / "source"), freeze="all-but:head", num_train_steps=12
            ),
            str(tmp_path / "target"),
        )
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        f"Cannot resume {tmp_path / 'target'}: its checkpoint step 8 leaves out the layers that "
        f"still equal its source, run {tmp_path / 'source'} (step 4), and config.init_from now "
        f"gives other values (run {tmp_path / 'source'} (step 3)) at "
    )
    assert {p: p.read_bytes() for p in (tmp_path / "target").rglob("*") if p.is_file()} == files


def _run_cli(*args, cwd):
    return fresh.run_script(ROOT / "experiments" / "cifar.py", *args, cwd=cwd, timeout=120)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--freeze=stage9", "--config.dataset=synthetic"],
            "Valid groups: stem, stage1, stage2, stage3, stage4, head",
        ),
        (
            ["--config.init_from=does/not/exist"],
            "does not exist; give the workdir of an earlier run",
        ),
        (["--config.nope=1"], "Unknown config field 'nope' in '--config.nope=1'"),
        (["--config.width=four"], "--config.width=four: invalid literal for int()"),
        (["--config=missing.py"], "--config='missing.py' does not exist"),
        (["--config=syntax.py"], "has a syntax error at line 1"),
        (["--config=noget.py"], "defines no get_config()"),
        (["--config=raises.py"], "--config='raises.py' cannot be loaded: RuntimeError: boom."),
        (["--freeze="], "Empty freeze spec. Write 'none'"),
    ],
)
def test_bad_input_exits_with_one_clear_line(tmp_path, args, message):
    (tmp_path / "syntax.py").write_text("def get_config(:\n")
    (tmp_path / "noget.py").write_text("X = 1\n")
    (tmp_path / "raises.py").write_text("def get_config():\n    raise RuntimeError('boom')\n")
    proc = _run_cli(f"--workdir={tmp_path / 'run'}", *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # a failed run leaves no empty workdir behind


@pytest.mark.parametrize("flag", ["-h"])  # --help and --helpshort take the same path
def test_help_lists_every_config_field_with_its_default_and_meaning(tmp_path, flag):
    proc = _run_cli(flag, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = proc.stdout.split("Config fields, set with --config.<field>=<value>", 1)[1]
    fields = default_config.get_config()
    for name in [*fields.keys(), "auto.interval", "freezeout.t0"]:
        if name not in ("auto", "freezeout"):
            value = fields[name.split(".")[0]]
            value = value[name.split(".")[1]] if "." in name else value
            assert f"\n  {name} = {value!r}" in listed, name
    assert "  dataset = 'cifar10'  # cifar10 | cifar100 | synthetic" in listed
    assert "  init_from = ''  # Workdir of another run, a torchvision" in listed
    assert "--workdir:" in proc.stdout and "--freeze:" in proc.stdout


def test_resume_with_another_spec_names_both_and_changes_nothing(tmp_path, tiny_run):
    tmp_path = _copy(tiny_run, tmp_path)
    record = (tmp_path / "config.json").read_bytes()
    metrics = (tmp_path / "metrics.jsonl").read_bytes()
    with pytest.raises(cifar.UsageError, match=r"spec: checkpoint 'stem,stage1', this run 'stem'"):
        cifar.train_and_evaluate(tiny_config(num_train_steps=12, freeze="stem"), str(tmp_path))
    assert (tmp_path / "config.json").read_bytes() == record
    assert (tmp_path / "metrics.jsonl").read_bytes() == metrics
    with pytest.raises(cifar.UsageError, match=r"method: checkpoint 'zero', this run 'lr0'"):
        cifar.train_and_evaluate(
            tiny_config(num_train_steps=12, freeze_method="lr0"), str(tmp_path)
        )


def test_resume_under_other_training_settings_is_refused_naming_each(tmp_path, tiny_run):
    tmp_path = _copy(tiny_run, tmp_path)
    record = (tmp_path / "config.json").read_bytes()
    metrics = (tmp_path / "metrics.jsonl").read_bytes()
    other = tiny_config(
        num_train_steps=12, batch_size=8, learning_rate=3e-3, frozen_dtype="bfloat16"
    )
    with pytest.raises(cifar.UsageError) as info:
        cifar.train_and_evaluate(other, str(tmp_path))
    message = str(info.value)
    assert "batch_size: 16 in the checkpoint's run, 8 now" in message
    assert "learning_rate: 0.001 in the checkpoint's run, 0.003 now" in message
    assert "frozen_dtype: '' in the checkpoint's run, 'bfloat16' now" in message
    assert "\n" not in message and "another --workdir" in message
    # Another model is refused the same way, before its restore is tried.
    with pytest.raises(cifar.UsageError, match=r"width: 4 in the checkpoint's run, 8 now"):
        cifar.train_and_evaluate(tiny_config(num_train_steps=12, width=8), str(tmp_path))
    assert (tmp_path / "config.json").read_bytes() == record
    assert (tmp_path / "metrics.jsonl").read_bytes() == metrics
    # Running longer, or logging differently, resumes.
    result = cifar.train_and_evaluate(tiny_config(num_train_steps=10, log_every=5), str(tmp_path))
    assert result["steps"] == 10


def test_damaged_latest_checkpoint_resumes_from_the_one_before(tmp_path, capsys, tiny_run):
    uninterrupted = tiny_run.workdir
    run = _copy(tiny_run, tmp_path)  # steps 3, 6 and 8
    metadata_files = [
        p for p in (run / "checkpoints" / "8").rglob("*") if p.is_file() and "metadata" in p.parts
    ]
    assert metadata_files
    metadata_files[0].write_text("{ cut")
    capsys.readouterr()
    cifar.train_and_evaluate(tiny_config(plot=True), str(run))
    err = capsys.readouterr().err
    assert "checkpoint step 8 is damaged" in err and "resuming from step 6" in err
    assert (run / "checkpoints_damaged" / "8").is_dir()
    want, got = _params(uninterrupted), _params(run)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"keep_checkpoints": 0}, "config.keep_checkpoints must be > 0, got 0"),
        ({"width": 0}, "config.width must be > 0, got 0"),
        ({"synthetic_num_classes": 1}, "config.synthetic_num_classes must be >= 2, got 1"),
        ({"batch_size": 128}, "larger than the training set (64 examples)"),
        ({"learning_rate": float("nan")}, "config.learning_rate must be a finite number >= 0"),
        ({"freeze": ""}, "Empty freeze spec. Write 'none' to freeze nothing"),
        ({"log_every": -1}, "config.log_every must be >= 0"),
        ({"warmup_steps": -5}, "config.warmup_steps must be >= 0, got -5"),
        ({"num_epochs": float("nan")}, "config.num_epochs must be a finite number, got nan"),
        ({"num_epochs": float("inf")}, "config.num_epochs must be a finite number, got inf"),
        ({"head_dropout": 1.5}, "config.head_dropout must be in [0, 1), got 1.5"),
        ({"seed": -1}, "config.seed must be in [0, 2**32), got -1"),
        # The command line reports these as it reports --freeze=stage9 above.
        (
            {"dataset": "imagenet"},
            "Unknown dataset 'imagenet'; valid: cifar10, cifar100, synthetic",
        ),
        ({"model": "vgg"}, "Unknown model 'vgg'; valid: resnet10, resnet18, resnet34, resnet50"),
        ({"freeze_method": "half"}, "Unknown freeze_method 'half'; valid: zero, lr0"),
        (
            {"checkpoint_source": "skip"},
            "Unknown checkpoint_source 'skip'; valid: reference, copy",
        ),
        (
            {"dataset": "cifar10", "download": False, "data_dir": "/nonexistent/tfds"},
            "--config.dataset=synthetic",
        ),
        (
            {"frozen_dtype": "int8"},
            "config.frozen_dtype='int8' is not a float dtype to store frozen parameters in; "
            "valid: '', 'bfloat16', 'float16'",
        ),
        (
            {"frozen_dtype": "float16", "freeze_method": "lr0"},
            "config.frozen_dtype='float16' needs --config.freeze_method=zero",
        ),
    ],
)
def test_bad_values_are_one_clear_error(tmp_path, overrides, message):
    with pytest.raises(cifar.UsageError) as info:
        cifar.train_and_evaluate(tiny_config(**overrides), str(tmp_path / "run"))
    assert message in str(info.value)
    assert not (tmp_path / "run" / "config.json").exists()


def test_unusable_workdir_and_weights_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(cifar.UsageError, match=r"is a file, not a directory"):
        cifar.train_and_evaluate(tiny_config(), str(afile))
    with pytest.raises(cifar.UsageError, match=r"Cannot write to --workdir"):
        cifar.train_and_evaluate(tiny_config(), str(afile / "run"))
    bad = tmp_path / "resnet18.pth"
    bad.write_bytes(b"\x80\x02not a pickle at all")
    with pytest.raises(cifar.UsageError, match=r"Cannot read .*resnet18.pth as torchvision"):
        cifar.train_and_evaluate(
            tiny_config(init_from=str(bad), stem="imagenet"), str(tmp_path / "run")
        )


def test_divergence_stops_at_the_step_and_saves_nothing_non_finite(tmp_path):
    config = tiny_config(learning_rate=1e30, clip_norm=0.0, warmup_steps=0, checkpoint_every=100)
    with pytest.raises(cifar.Diverged, match=r"diverged at step \d+: .*(nan|inf).*no checkpoint"):
        cifar.train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())


def test_finished_run_rerun_changes_nothing(tmp_path, capsys, tiny_run):
    config = tiny_config(plot=True)
    first = tiny_run.result
    tmp_path = _copy(tiny_run, tmp_path)
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    again = cifar.train_and_evaluate(config, str(tmp_path))
    assert "already finished at step 8" in capsys.readouterr().out
    assert again["accuracy"] == first["accuracy"]
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files
    # A final test row that holds no numbers (edited by hand, say) is evaluated again.
    rows = _rows(tmp_path)
    rows[-1] = {**rows[-1], "accuracy": "n/a"}
    assert rows[-1]["split"] == "test" and rows[-1]["step"] == 8
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    repaired = cifar.train_and_evaluate(config, str(tmp_path))
    out, err = capsys.readouterr()
    assert "holds accuracy 'n/a', not numbers; evaluating the final checkpoint again" in err
    assert "final test accuracy" in out and repaired["accuracy"] == first["accuracy"]
    assert _rows(tmp_path)[-1] == _rows(tmp_path)[-1] | {"accuracy": first["accuracy"]}


def test_frozen_random_layers_are_announced_and_recorded(tiny_run):
    err = tiny_run.err
    assert "warning: no config.init_from, so the frozen layers (stem, stage1)" in err
    record = json.loads((tiny_run.workdir / "config.json").read_text())
    assert record["frozen_random_init"] == [
        "stem",
        "stage1",
    ]


def test_metrics_rows_after_a_resume_equal_the_uninterrupted_run(tmp_path, tiny_run):
    straight, killed = tiny_run.workdir, _copy(tiny_run, tmp_path)
    # As if killed right after the step-3 checkpoint: later checkpoints never happened,
    # while the rows of steps 4-8 were written. The train row at step 4 averages
    # steps 3 and 4 (log_every=2): its window crosses the resume.
    for step in ("6", "8"):
        shutil.rmtree(killed / "checkpoints" / step)
    cifar.train_and_evaluate(tiny_config(plot=True), str(killed))

    def rows(workdir):
        return [{k: v for k, v in r.items() if k != "examples_per_sec"} for r in _rows(workdir)]

    assert [r["step"] for r in rows(straight) if r["split"] == "train"] == [2, 4, 6, 8]
    assert rows(killed) == rows(straight)


def test_a_second_run_in_a_workdir_is_refused_in_one_line(tmp_path):
    from layerfreeze.train.workdir import WorkdirLock

    with WorkdirLock(tmp_path / "run"):  # a run in progress, here this test process
        proc = _run_cli(f"--workdir={tmp_path / 'run'}", "--config.dataset=synthetic", cwd=tmp_path)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: Another run is using the workdir")
    assert f"pid {os.getpid()} on " in line and "another --workdir" in line
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]  # nothing written


_FULL_DISK = """
import pathlib, runpy, shutil, sys
usage = shutil.disk_usage
shutil.disk_usage = lambda path: usage(path)._replace(free=1000)  # a full disk
script = pathlib.Path(sys.argv[1])
sys.path.insert(0, str(script.parent))
sys.argv = sys.argv[1:]
runpy.run_path(str(script), run_name="__main__")
"""


def test_a_full_disk_stops_the_run_in_one_line_and_loses_nothing(tmp_path):
    run = tmp_path / "run"
    config = tiny_config(num_train_steps=3, checkpoint_every=3)
    flags = [f"--workdir={run}", *(f"--config.{k}={config[k]}" for k in _TINY_FIELDS)]
    flags.append(f"--config.compilation_cache={tmp_path / 'jax_cache'}")
    proc = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(ROOT / "experiments" / "cifar.py"), *flags],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Exception" not in proc.stderr, proc.stderr[-3000:]
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert error.startswith(f"error: No space for checkpoint step 3 in {run / 'checkpoints'}: ")
    assert error.endswith(
        "Nothing was written; there is no earlier checkpoint. Fix that and run the same "
        "command again: it starts afresh."
    )
    assert not list((run / "checkpoints").iterdir())
    assert [r["step"] for r in _rows(run)] == [2, 3]  # the train rows logged before the save
    assert any((tmp_path / "jax_cache").iterdir())  # the compiled programs, for the rerun


def test_a_config_that_lacks_fields_is_one_clear_error(tmp_path):
    import ml_collections

    fields = tiny_config().to_dict()
    del fields["freeze_method"], fields["auto"]["interval"]
    with pytest.raises(cifar.UsageError, match=r"lacks field\(s\) auto.interval, freeze_method\."):
        cifar.train_and_evaluate(ml_collections.ConfigDict(fields), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_an_environment_error_anywhere_is_one_line_naming_the_resume_step(tmp_path):
    (tmp_path / "checkpoints" / "6").mkdir(parents=True)
    (tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp").mkdir()
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.jsonl"))
    assert cifar.environment_message(full, str(tmp_path)) == (
        f"No space left on device: {tmp_path / 'metrics.jsonl'}. Nothing saved was lost: fix "
        "that and run the same command again: it resumes from checkpoint step 6."
    )
    denied = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "config.json"))
    assert cifar.environment_message(denied, str(tmp_path / "fresh")).endswith(
        "config.json. Nothing saved was lost: fix that and run the same command again: it "
        "starts afresh."
    )
