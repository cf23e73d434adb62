"""Gradual unfreezing end to end: phases, compilations, state and resume."""

import cifar_train as cifar
import pytest
from test_cifar_experiment import (
    _assert_trees_equal,
    _kill_after,
    _Killed,
    _params,
    _rows,
    tiny_config,
)

from layerfreeze import train
from layerfreeze.train import checkpoint

# 64 synthetic images in batches of 16: 4 steps per epoch.
SCHEDULE = "unfreeze:0=head,1=stage4,2=stage3"


def test_trainable_count_grows_at_scheduled_epochs(tmp_path, capsys):
    config = tiny_config(schedule=SCHEDULE, num_train_steps=12, log_every=1, eval_every=100)
    result = cifar.train_and_evaluate(config, str(tmp_path))
    assert result["compilations"] == 3 and result["phase"] == 2
    rows = [r for r in _rows(tmp_path) if r["split"] == "train"]
    phases = [r["phase"] for r in rows]
    assert phases == [0] * 4 + [1] * 4 + [2] * 4
    counts = [r["trainable_params"] for r in rows]
    assert counts[0] < counts[4] < counts[8]
    assert counts[0] == counts[3] and counts[4] == counts[7]
    starts = [r for r in _rows(tmp_path) if r["split"] == "phase"]
    assert [(r["step"], r["spec"]) for r in starts] == [
        (4, "all-but:head,stage4"),
        (8, "all-but:head,stage4,stage3"),
    ]
    out = capsys.readouterr().out
    assert "step 4: phase 1" in out and "step 8: phase 2" in out


def test_a_repeated_phase_reuses_its_compiled_step(tmp_path):
    config = tiny_config(
        schedule="explicit:0=all-but:head;1=none;2=all-but:head",
        num_train_steps=12,
        eval_every=100,
    )
    result = cifar.train_and_evaluate(config, str(tmp_path))
    assert result["compilations"] == 2
    assert result["phase"] == 2


def test_a_repeated_phase_that_unfreezes_gets_its_own_step(tmp_path):
    # Phase 2 repeats phase 0's spec, but its body is newly unfrozen: under
    # method zero those leaves count their own steps, so the step differs.
    config = tiny_config(
        schedule="explicit:0=none;1=all-but:head;2=none", num_train_steps=12, eval_every=100
    )
    assert cifar.train_and_evaluate(config, str(tmp_path / "zero"))["compilations"] == 3
    config.freeze_method = "lr0"
    assert cifar.train_and_evaluate(config, str(tmp_path / "lr0"))["compilations"] == 2


def _resume_config(method, checkpoint_every):
    return tiny_config(
        schedule=SCHEDULE,
        num_train_steps=10,
        freeze_method=method,
        checkpoint_every=checkpoint_every,
        eval_every=100,
        lr_multipliers="ulmfit",
    )


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory):
    """An uninterrupted run per method, shared (checkpoints change no result): its
    result, workdir and `train.Phases`.

    The `zero` run compiles its phases ahead (`config.compile_ahead`; the other
    experiment tests turn it off), the runs resumed against it at each change.
    """
    runs = {}
    real = train.Phases

    def run(method):
        if method not in runs:
            workdir = tmp_path_factory.mktemp(f"straight_{method}")
            config = _resume_config(method, 5)
            config.compile_ahead = method == "zero"
            made = []  # the run's Phases
            with pytest.MonkeyPatch.context() as m:
                m.setattr(train, "Phases", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
                result = cifar.train_and_evaluate(config, str(workdir))
            runs[method] = result, workdir, made[-1]
        return runs[method]

    return run


@pytest.mark.parametrize(
    ("method", "checkpoint_every", "kill_at", "resumes_in_phase"),
    [
        ("zero", 4, 5, 0),  # last checkpoint just before the boundary
        ("lr0", 5, 6, 1),  # last checkpoint right after the boundary
        ("zero", 9, 9, 2),  # restores the step counts of two unfreezing cohorts
    ],
)
def test_resume_across_a_phase_boundary_is_bitwise_identical(
    tmp_path, monkeypatch, straight_runs, method, checkpoint_every, kill_at, resumes_in_phase
):
    config = _resume_config(method, checkpoint_every)
    straight, straight_dir, phases = straight_runs(method)
    with monkeypatch.context() as m:
        _kill_after(m, kill_at)
        with pytest.raises(_Killed):
            cifar.train_and_evaluate(config, str(tmp_path / "resumed"))
    with checkpoint.Checkpointer(tmp_path / "resumed" / "checkpoints") as ckpt:
        assert ckpt.latest_step() == checkpoint_every
        assert ckpt.restore_metadata()["phase"] == resumes_in_phase
    resumed = cifar.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert resumed["phase"] == straight["phase"] == 2
    # params, batch_stats and the optimizer state (Adam moments, counts).
    _assert_trees_equal(_params(straight_dir), _params(tmp_path / "resumed"))
    events = [
        [(r["split"], r["step"], r["phase"]) for r in _rows(d)]
        for d in (straight_dir, tmp_path / "resumed")
    ]
    assert events[0] == events[1]
    if method == "zero":
        # Compiled ahead: the steps of phases 1 and 2 ran the programs compiled for
        # them in the background, never compiling at their changes.
        for index in (1, 2):
            train_step = phases.steps(index).train_step
            assert train_step.programs and train_step.jitted._cache_size() == 0


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ("unfreeze:0=head,1=stage9", "stage9"),
        ("unfreeze:0=head,2=stage4,1=stage3", "non-increasing"),
        ("sometimes", "sometimes"),
    ],
)
def test_bad_schedules_are_usage_errors(tmp_path, schedule, message):
    with pytest.raises(cifar.UsageError, match=message):
        cifar.train_and_evaluate(tiny_config(schedule=schedule), str(tmp_path))


def test_negative_multiplier_is_a_usage_error(tmp_path):
    with pytest.raises(cifar.UsageError, match=r"stage4.*must be >= 0"):
        cifar.train_and_evaluate(tiny_config(lr_multipliers="stage4=-1"), str(tmp_path))
    with pytest.raises(cifar.UsageError, match="factor must be > 0"):
        cifar.train_and_evaluate(tiny_config(lr_multipliers="ulmfit:-2"), str(tmp_path))


def test_a_schedule_with_a_total_sets_the_run_length(tmp_path):
    config = tiny_config(
        schedule="fine_tune:freeze_epochs=1,epochs=2", num_train_steps=-1, num_epochs=10.0
    )
    result = cifar.train_and_evaluate(config, str(tmp_path))
    assert result["steps"] == 12 and result["phase"] == 1  # (1 + 2) epochs of 4 steps


@pytest.mark.parametrize(
    ("schedule", "late"),
    [
        ("fine_tune:freeze_epochs=1,epochs=2", "phase 1 (epoch 1: freeze none;"),
        ("gradual:every=1", "phase 1 (epoch 1: freeze"),
    ],
)
def test_phases_after_the_runs_end_are_refused(tmp_path, schedule, late):
    # 64 examples in batches of 16: 4 steps an epoch, and the run stops at step 4.
    config = tiny_config(schedule=schedule, num_train_steps=4)
    with pytest.raises(cifar.UsageError, match="would never run") as info:
        cifar.train_and_evaluate(config, str(tmp_path))
    message = str(info.value)
    assert late in message and "step 4)" in message and "Lengthen the run" in message
    assert "\n" not in message
    assert not (tmp_path / "checkpoints").exists()
