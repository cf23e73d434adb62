"""NNX: the trainable filter for `nnx.Optimizer`/`nnx.grad`, and frozen `nnx.BatchNorm`."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from zoo import NNXNet

import layerfreeze as lf
from layerfreeze import _paths

SPEC = "stem,stem_bn"
X = jnp.asarray(np.random.RandomState(0).randn(8, 8, 8, 3), jnp.float32)
Y = jnp.asarray(np.random.RandomState(1).randint(0, 5, 8), jnp.int32)


def _snapshot(model):
    return {
        path: np.array(leaf)
        for path, leaf in zip(
            _paths.leaf_paths(nnx.state(model, nnx.Param)),
            jax.tree.leaves(nnx.state(model, nnx.Param)),
            strict=True,
        )
    } | {
        path: np.array(leaf)
        for path, leaf in zip(
            _paths.leaf_paths(nnx.state(model, nnx.BatchStat)),
            jax.tree.leaves(nnx.state(model, nnx.BatchStat)),
            strict=True,
        )
    }


def _loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _user_loop(model, spec, steps=20):
    """A plain NNX loop as a user writes it, with layerfreeze's filter and train mode."""
    trainable = lf.nnx_filter(model, spec)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
    optimizer = nnx.Optimizer(model, tx, wrt=trainable)
    lf.nnx_train_mode(model, spec)

    @nnx.jit
    def step(model, optimizer, x, y):
        grads = nnx.grad(_loss, argnums=nnx.DiffState(0, trainable))(model, x, y)
        optimizer.update(model, grads)

    for _ in range(steps):
        step(model, optimizer, X, Y)
    return optimizer


def test_plain_nnx_freeze_moves_frozen_batchnorm_statistics():
    # What the issue reports: lf.freeze alone protects parameters, not BatchNorm.
    model = NNXNet(nnx.Rngs(0))
    before = _snapshot(model)
    optimizer = nnx.Optimizer(model, lf.freeze(optax.adam(1e-2), SPEC), wrt=nnx.Param)
    model.train()
    grads = nnx.grad(_loss)(model, X, Y)
    optimizer.update(model, grads)
    after = _snapshot(model)
    assert np.array_equal(before["stem/kernel"], after["stem/kernel"])
    assert not np.array_equal(before["stem_bn/mean"], after["stem_bn/mean"])


def test_filter_and_train_mode_keep_frozen_params_and_statistics_bit_identical():
    model = NNXNet(nnx.Rngs(0))
    before = _snapshot(model)
    optimizer = _user_loop(model, SPEC)
    after = _snapshot(model)
    for path in before:
        frozen = path.startswith(("stem/", "stem_bn/"))
        assert np.array_equal(before[path], after[path]) == frozen, path
    # The optimizer holds state for trainable parameters only.
    state_paths = _paths.leaf_paths(nnx.state(optimizer, nnx.OptState))
    assert any("head" in p for p in state_paths)
    assert not any("stem" in p for p in state_paths)
    rows = lf.summary(model, SPEC, optimizer).as_dict()["groups"]
    assert rows["stem"]["opt_state_bytes"] == 0 and rows["stem_bn"]["opt_state_bytes"] == 0
    assert rows["head"]["opt_state_bytes"] == 2 * 4 * (16 * 5 + 5)  # Adam's mu and nu


def test_unfreezing_trains_batchnorm_again():
    model = NNXNet(nnx.Rngs(0))
    assert lf.nnx_train_mode(model, SPEC) == {"body_bn": False, "stem_bn": True}
    assert model.stem_bn.use_running_average and not model.body_bn.use_running_average
    assert not model.dropout.deterministic
    assert lf.nnx_train_mode(model, "none") == {"body_bn": False, "stem_bn": False}
    before = np.array(model.stem_bn.mean[...])
    model(X)
    assert not np.array_equal(before, model.stem_bn.mean[...])


def test_train_bn_and_running_stats():
    model = NNXNet(nnx.Rngs(0))
    modes = lf.nnx_train_mode(model, lf.FreezeSpec.parse(SPEC, train_bn=True))
    assert modes == {"body_bn": False, "stem_bn": False}
    assert lf.nnx_train_mode(model, "none", running_stats="all") == {
        "body_bn": True,
        "stem_bn": True,
    }
    with pytest.raises(ValueError, match=r"running_stats rule 'head' matches no BatchNorm"):
        lf.nnx_train_mode(model, "none", running_stats="head")


def test_filter_resolves_the_spec_now():
    with pytest.raises(ValueError, match=r"'stage1' matches no parameter.*body, body_bn"):
        lf.nnx_filter(NNXNet(nnx.Rngs(0)), "stage1")


def test_model_without_params_is_a_clear_error():
    class Empty(nnx.Module):
        def __init__(self):
            self.stats = nnx.BatchStat(jnp.zeros(3))

    with pytest.raises(ValueError, match=r"NNX model Empty holds no nnx.Param"):
        lf.nnx_filter(Empty(), "none")


def test_summary_labels_and_masks_accept_the_model():
    model = NNXNet(nnx.Rngs(0))
    summary = lf.summary(model, SPEC)
    params = nnx.state(model, nnx.Param)
    assert summary.frozen_params == sum(
        int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(nnx.state(model.stem, nnx.Param))
    ) + sum(
        int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(nnx.state(model.stem_bn, nnx.Param))
    )
    assert lf.frozen_mask(model, SPEC) == lf.frozen_mask(params, SPEC)
    assert lf.freeze_labels(model, SPEC) == lf.freeze_labels(params, SPEC)


def _flops(model, spec):
    trainable = lf.nnx_filter(model, spec) if spec != "none" else nnx.Param
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
    optimizer = nnx.Optimizer(model, tx, wrt=trainable)
    lf.nnx_train_mode(model, spec)

    def step(model, optimizer, x, y):
        grads = nnx.grad(_loss, argnums=nnx.DiffState(0, trainable))(model, x, y)
        optimizer.update(model, grads)
        return optax.tree.norm(grads)

    graphdef, state = nnx.split((model, optimizer))

    def pure(state, x, y):
        model, optimizer = nnx.merge(graphdef, state)
        return step(model, optimizer, x, y)

    return jax.jit(pure).lower(state, X, Y).compile().cost_analysis()["flops"]


def test_frozen_backward_work_is_not_compiled():
    full = _flops(NNXNet(nnx.Rngs(0)), "none")
    frozen = _flops(NNXNet(nnx.Rngs(0)), "stem,stem_bn,body,body_bn")
    head_only = _flops(NNXNet(nnx.Rngs(0)), "all-but:head")
    assert frozen < 0.75 * full, (frozen, full)
    assert abs(frozen / head_only - 1) <= 0.01, (frozen, head_only)
