"""`experiments/cifar.py --config.schedule=auto|freezeout` on tiny models and data."""

import cifar_train as cifar
import jax
import numpy as np
import pytest
from test_cifar_experiment import _kill_after, _Killed, _params, _rows, _run_cli, tiny_config

from layerfreeze.train import checkpoint


def auto_config(**overrides):
    config = tiny_config(
        schedule="auto", freeze="none", num_train_steps=12, augment=False, **overrides
    )
    config.auto.interval = 2
    return config


def _decisions(workdir):
    return [(r["step"], r["frozen"]) for r in _rows(workdir) if r["split"] == "phase"]


def _without_speed(rows):
    return [{k: v for k, v in r.items() if k != "examples_per_sec"} for r in rows]


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory):
    """An uninterrupted auto run on cached features: (config, workdir, result)."""
    config = auto_config(cache_frozen_features=True)
    workdir = tmp_path_factory.mktemp("auto") / "straight"
    return config, workdir, cifar.train_and_evaluate(config, str(workdir))


def test_auto_freezes_front_groups_records_them_and_resumes_bitwise(
    cached_run, tmp_path, monkeypatch
):
    config, straight, result = cached_run
    decisions = _decisions(straight)
    assert decisions and decisions[0][1][0] == "stem"  # front first
    assert all(r["frozen"] == decisions[-1][1] for r in _rows(straight)[-2:] if "frozen" in r)
    assert result["compilations"] == len(decisions) + 1
    with checkpoint.Checkpointer(straight / "checkpoints") as ckpt:
        saved = ckpt.restore_metadata()["auto"]
    assert [(step, frozen) for step, frozen in decisions] == [
        (step, [g for _, names in saved["decisions"][: i + 1] for g in names])
        for i, (step, _) in enumerate(saved["decisions"])
    ]

    # Killed after the step-9 checkpoint, before the decision at step 10.
    killed = tmp_path / "killed"
    with monkeypatch.context() as m:
        _kill_after(m, 10)
        with pytest.raises(_Killed):
            cifar.train_and_evaluate(config, str(killed))
    with checkpoint.Checkpointer(killed / "checkpoints") as ckpt:
        assert ckpt.latest_step() == 9 and not ckpt.restore_metadata()["auto"]["decisions"]
    cifar.train_and_evaluate(config, str(killed))
    want, got = _params(straight), _params(killed)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)
    assert _without_speed(_rows(killed)) == _without_speed(_rows(straight))


def test_cached_and_uncached_auto_runs_agree(cached_run, tmp_path):
    _, cached_dir, _ = cached_run
    cifar.train_and_evaluate(auto_config(), str(tmp_path / "images"))
    assert _decisions(cached_dir) == _decisions(tmp_path / "images")
    assert _decisions(cached_dir)
    cached, images = _params(cached_dir), _params(tmp_path / "images")
    for a, b in zip(jax.tree.leaves(cached), jax.tree.leaves(images), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_freezeout_runs_its_phases_once_each(tmp_path):
    config = tiny_config(schedule="freezeout", freeze="stem", num_train_steps=10)
    config.freezeout.t0 = 0.5
    config.freezeout.scaling = "linear"
    config.auto.groups = "stage1,stage2"
    result = cifar.train_and_evaluate(config, str(tmp_path))
    # Candidates stage1, stage2 and the head: t = 0.5 and 0.75 of 10 steps (rounded up).
    assert _decisions(tmp_path) == [(5, ["stem", "stage1"]), (8, ["stem", "stage1", "stage2"])]
    assert result["compilations"] == 3
    labels = [r["label"] for r in _rows(tmp_path) if r["split"] == "phase"]
    assert labels == ["+stage1", "+stage2"]


def _set(config, dotted, value):
    *parents, leaf = dotted.split(".")
    target = config
    for name in parents:
        target = target[name]
    target[leaf] = value
    return config


@pytest.mark.parametrize(
    ("schedule", "overrides", "message"),
    [
        ("autofreeze", {}, "Unknown automatic freezing policy 'autofreeze'; valid: auto, freeze"),
        ("auto", {"auto.percentile": 100.0}, "config.auto.percentile must be in (0, 100)"),
        ("auto", {"auto.percentile": 0.0}, "config.auto.percentile must be in (0, 100)"),
        ("auto", {"auto.interval": 0}, "config.auto.interval must be an integer >= 1"),
        (
            "auto",
            {"freeze": "stem", "auto.groups": "stem,stage1"},
            "['stem'] are both frozen for the whole run and left to the policy",
        ),
        ("auto", {"freeze": "stem/Conv_0"}, "freezes part of stem; name whole groups"),
        (
            "auto",
            {"cache_frozen_features": True, "augment": True},
            "would ignore the random crops and flips of config.augment=True",
        ),
        ("freezeout", {"freezeout.scaling": "cos"}, "valid: linear, squared, cubic"),
        ("freezeout", {"freezeout.t0": 0.0}, "config.freezeout.t0 must be in (0, 1]"),
        ("auto", {"lr_multipliers": "ulmfit"}, "cannot be combined with config.schedule='auto'"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, schedule, overrides, message):
    config = tiny_config(schedule=schedule, freeze="none")
    for dotted, value in overrides.items():
        _set(config, dotted, value)
    with pytest.raises(cifar.UsageError) as info:
        cifar.train_and_evaluate(config, str(tmp_path / "run"))
    assert message in str(info.value)
    assert not (tmp_path / "run" / "config.json").exists()


def test_cli_names_the_valid_policies(tmp_path):
    proc = _run_cli(
        f"--workdir={tmp_path / 'run'}",
        "--config.dataset=synthetic",
        "--config.schedule=auto",
        "--config.auto.percentile=100",
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: config.auto.percentile must be in (0, 100) (exclusive), got 100.0."]
