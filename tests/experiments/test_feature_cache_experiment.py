"""`experiments/cifar.py` with `cache_frozen_features`: cached runs equal uncached ones."""

import cifar_train as cifar
import jax
import numpy as np
import pytest
from test_cifar_experiment import (
    _assert_trees_equal,
    _kill_after,
    _Killed,
    _params,
    _rows,
    tiny_config,
)

from layerfreeze.models import GROUPS


def _train_losses(workdir):
    return [(r["step"], r["loss"]) for r in _rows(workdir) if r["split"] == "train"]


def _assert_same_run(cached_dir, plain_dir):
    cached, plain = _train_losses(cached_dir), _train_losses(plain_dir)
    assert [s for s, _ in cached] == [s for s, _ in plain]
    np.testing.assert_allclose([v for _, v in cached], [v for _, v in plain], rtol=1e-5)
    a, b = _params(cached_dir)["params"], _params(plain_dir)["params"]
    for x, y in zip(jax.tree.leaves(a["head"]), jax.tree.leaves(b["head"]), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_cached_head_only_run_equals_uncached_run(tmp_path, capsys):
    config = tiny_config(freeze="all-but:head", augment=False, eval_every=100)
    cifar.train_and_evaluate(config, str(tmp_path / "plain"))
    capsys.readouterr()
    config.cache_frozen_features = True
    result = cifar.train_and_evaluate(config, str(tmp_path / "cached"))
    out = capsys.readouterr().out
    assert "cached features after stage4: shape (64, 32) float32" in out
    assert result["steps"] == 8 and result["compilations"] == 1
    _assert_same_run(tmp_path / "cached", tmp_path / "plain")
    # The frozen backbone is bit-identical in both runs.
    a, b = _params(tmp_path / "cached"), _params(tmp_path / "plain")
    for group in GROUPS[:-1]:
        _assert_trees_equal(a["params"][group], b["params"][group])
        _assert_trees_equal(a["batch_stats"][group], b["batch_stats"][group])


@pytest.mark.parametrize(
    ("schedule", "caches"),
    [
        ("unfreeze:0=head,1=stage4,2=stage3", 3),  # the prefix shrinks: recomputed per phase
        ("explicit:0=all-but:head;1=none;2=all-but:head", 2),  # images, then recomputed
    ],
)
def test_cached_schedule_equals_uncached_schedule(tmp_path, capsys, schedule, caches):
    config = tiny_config(
        schedule=schedule, augment=False, num_train_steps=12, eval_every=100, checkpoint_every=100
    )
    cifar.train_and_evaluate(config, str(tmp_path / "plain"))
    capsys.readouterr()
    config.cache_frozen_features = True
    cifar.train_and_evaluate(config, str(tmp_path / "cached"))
    out = capsys.readouterr().out
    assert out.count("cached features after") == caches
    _assert_same_run(tmp_path / "cached", tmp_path / "plain")


def test_cached_run_resumes_bitwise(tmp_path, monkeypatch):
    config = tiny_config(freeze="all-but:head", augment=False, cache_frozen_features=True)
    cifar.train_and_evaluate(config, str(tmp_path / "straight"))
    with monkeypatch.context() as m:
        _kill_after(m, 5)
        with pytest.raises(_Killed):
            cifar.train_and_evaluate(config, str(tmp_path / "resumed"))
    cifar.train_and_evaluate(config, str(tmp_path / "resumed"))
    _assert_trees_equal(_params(tmp_path / "straight"), _params(tmp_path / "resumed"))


def test_caching_refuses_augmentation(tmp_path):
    config = tiny_config(freeze="all-but:head", cache_frozen_features=True)
    assert config.augment
    with pytest.raises(cifar.UsageError, match="ignore the random crops and flips") as info:
        cifar.train_and_evaluate(config, str(tmp_path))
    assert "pass --config.augment=False to cache without augmentation" in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"freeze": "stage1"}, r"freeze spec 'stage1' leaves no frozen prefix"),
        ({"freeze": "none"}, r"freeze spec 'none' leaves no frozen prefix"),
        ({"freeze": "all-but:head", "train_bn": True}, r"train_bn=True keeps BatchNorm"),
        ({"freeze": "all-but:head", "freeze_method": "lr0"}, r"needs config.freeze_method='zero'"),
    ],
)
def test_caching_refuses_runs_without_a_fixed_prefix(tmp_path, overrides, match):
    config = tiny_config(augment=False, cache_frozen_features=True, **overrides)
    with pytest.raises(cifar.UsageError, match=match):
        cifar.train_and_evaluate(config, str(tmp_path))
