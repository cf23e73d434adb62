"""Tests for `layerfreeze.lr`: discriminative learning-rate multipliers."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.core import FrozenDict

import layerfreeze
from layerfreeze import lr
from layerfreeze import schedules as S

GROUPS = ("stem", "stage1", "stage2", "head")


def make_params():
    keys = jax.random.split(jax.random.key(0), len(GROUPS))
    return {
        g: {"kernel": jax.random.normal(k, (3, 2)), "bias": jnp.full((2,), 0.5)}
        for g, k in zip(GROUPS, keys, strict=True)
    }


def make_grads(params):
    return jax.tree.map(lambda p: jnp.sin(3.0 * p) + 0.1, params)


def base_optimizer():
    return optax.adamw(optax.cosine_decay_schedule(1e-2, 100), weight_decay=0.1)


def run(tx, params, steps=3):
    """Returns the updates of `steps` steps at fixed params (so runs compare)."""
    state = tx.init(params)
    out = []
    for i in range(steps):
        grads = jax.tree.map(lambda g, i=i: g * (i + 1), make_grads(params))
        updates, state = tx.update(grads, state, params)
        out.append(updates)
    return out


# Multipliers ---------------------------------------------------------------------


def test_geometric_multipliers():
    m = lr.geometric_multipliers(GROUPS, 1e-5, 1e-3)
    assert list(m) == list(GROUPS)
    assert m["stem"] == pytest.approx(1e-2)
    assert m["head"] == 1.0
    values = list(m.values())
    ratios = [b / a for a, b in itertools.pairwise(values)]
    assert ratios == pytest.approx([100 ** (1 / 3)] * 3)
    assert lr.geometric_multipliers(["head"], 1e-5, 1e-3) == {"head": 1.0}
    assert lr.geometric_multipliers(GROUPS, 1e-3, 1e-3) == dict.fromkeys(GROUPS, 1.0)


@pytest.mark.parametrize(
    ("lo", "hi", "error", "match"),
    [
        (0.0, 1.0, ValueError, "lo must be > 0"),
        (1.0, -1.0, ValueError, "hi must be > 0"),
        (1e-2, 1e-4, ValueError, "lo <= hi"),
        (float("inf"), 1.0, ValueError, "lo must be > 0"),
        ("a", 1.0, TypeError, "lo must be a number"),
        ("0.001", 1.0, TypeError, "lo must be a number, got str '0.001'"),
    ],
)
def test_geometric_multipliers_rejects(lo, hi, error, match):
    with pytest.raises(error, match=match):
        lr.geometric_multipliers(GROUPS, lo, hi)


def test_ulmfit_multipliers():
    m = lr.ulmfit_multipliers(GROUPS)
    assert list(m) == list(GROUPS)
    assert m["head"] == 1.0
    assert m["stage2"] == pytest.approx(1 / 2.6)
    assert m["stem"] == pytest.approx(1 / 2.6**3)
    assert lr.ulmfit_multipliers(GROUPS, factor=2.0) == {
        "stem": 0.125,
        "stage1": 0.25,
        "stage2": 0.5,
        "head": 1.0,
    }
    with pytest.raises(ValueError, match="factor must be > 0"):
        lr.ulmfit_multipliers(GROUPS, factor=0)


@pytest.mark.parametrize(
    ("groups", "error", "match"),
    [
        ("stem", TypeError, "sequence of group names"),
        ([], ValueError, "empty"),
        (["stem", "stem"], ValueError, "Duplicate"),
        (["stem", 1], TypeError, "non-empty strings"),
    ],
)
def test_multipliers_reject_bad_groups(groups, error, match):
    with pytest.raises(error, match=match):
        lr.geometric_multipliers(groups, 0.1, 1.0)


# scale_by_group ---------------------------------------------------------------------


MULTIPLIERS = {"stem": 0.0, "stage1": 0.01, "stage2": 0.37, "head": 1.0}


def test_scale_by_group_ratios_after_adamw_with_schedule():
    params = make_params()
    plain = run(base_optimizer(), params)
    scaled = run(optax.chain(base_optimizer(), lr.scale_by_group(MULTIPLIERS)), params)
    for (group, m), step, name in itertools.product(
        MULTIPLIERS.items(), range(3), ("kernel", "bias")
    ):
        got, ref = scaled[step][group][name], plain[step][group][name]
        if m == 1.0:
            np.testing.assert_array_equal(got, ref)
        elif m == 0.0:
            np.testing.assert_array_equal(got, np.zeros_like(ref))
        else:
            np.testing.assert_allclose(got, m * ref, rtol=1e-6)


def test_scale_by_group_under_jit_each_step():
    params = make_params()
    tx_ref = base_optimizer()
    tx = optax.chain(base_optimizer(), lr.scale_by_group(MULTIPLIERS))
    state, ref_state = tx.init(params), tx_ref.init(params)

    @jax.jit
    def step(state, ref_state, grads):
        u, state = tx.update(grads, state, params)
        r, ref_state = tx_ref.update(grads, ref_state, params)
        return u, r, state, ref_state

    for i in range(4):
        grads = jax.tree.map(lambda g, i=i: g * (i + 1), make_grads(params))
        updates, ref, state, ref_state = step(state, ref_state, grads)
        for group, m in MULTIPLIERS.items():
            for name in ("kernel", "bias"):
                got, want = updates[group][name], ref[group][name]
                if m == 0.0:
                    assert np.all(np.asarray(got) == 0.0)
                    assert not np.any(np.signbit(got))
                else:
                    np.testing.assert_allclose(got, m * want, rtol=1e-6)


def test_scale_by_group_default_and_pairs():
    params = make_params()
    grads = make_grads(params)
    tx = lr.scale_by_group((("stage1", 2.0),), default=0.5)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["stage1"]["kernel"], grads["stage1"]["kernel"] * 2.0)
    np.testing.assert_array_equal(updates["head"]["bias"], grads["head"]["bias"] * 0.5)


def test_scale_by_group_from_fine_tune_phase():
    params = make_params()
    phase = S.fine_tune(1, 2, GROUPS, lr_mult=10).phase_at(1)
    tx = lr.scale_by_group(phase.lr_multipliers)
    grads = make_grads(params)
    updates, _ = tx.update(grads, tx.init(params))
    np.testing.assert_allclose(updates["stem"]["kernel"], grads["stem"]["kernel"] * 0.05, 1e-6)
    np.testing.assert_allclose(updates["head"]["kernel"], grads["head"]["kernel"] * 0.5, 1e-6)


def test_scale_by_group_zero_is_exact_even_for_nan():
    tx = lr.scale_by_group({"stem": 0.0})
    grads = {"stem": jnp.array([jnp.nan, jnp.inf, -1.0]), "head": jnp.array([1.0])}
    updates, _ = tx.update(grads, tx.init(grads))
    np.testing.assert_array_equal(updates["stem"], np.zeros(3, np.float32))
    assert not np.any(np.signbit(updates["stem"]))


def test_scale_by_group_keeps_dtype():
    grads = {"stem": jnp.ones(2, jnp.bfloat16), "head": jnp.ones(2, jnp.float16)}
    tx = lr.scale_by_group({"stem": 0.25, "head": 0.0})
    updates, _ = tx.update(grads, tx.init(grads))
    assert updates["stem"].dtype == jnp.bfloat16
    assert updates["head"].dtype == jnp.float16


def test_scale_by_group_unknown_group_at_init():
    tx = lr.scale_by_group({"stem": 0.5, "neck": 0.1, "tail": 1.0})
    expected = r"'neck', 'tail'.*Groups that exist: head, stage1, stage2, stem\."
    with pytest.raises(ValueError, match=expected):
        tx.init(make_params())


@pytest.mark.parametrize(
    ("multipliers", "kwargs", "error", "match"),
    [
        ({"stage1": -0.1}, {}, ValueError, r"'stage1' must be >= 0.*-0\.1"),
        ({"stage1": float("inf")}, {}, ValueError, r"'stage1' must be >= 0"),
        ({"stage1": 1.0}, {"default": -1.0}, ValueError, "default must be >= 0"),
        ({1: 1.0}, {}, TypeError, "non-empty string"),
        ("stem", {}, TypeError, "group: float"),
        ([("stem",)], {}, TypeError, "pairs"),
    ],
)
def test_scale_by_group_rejects(multipliers, kwargs, error, match):
    with pytest.raises(error, match=match):
        lr.scale_by_group(multipliers, **kwargs)


def test_scale_by_group_frozendict():
    params = FrozenDict(make_params())
    tx = optax.chain(base_optimizer(), lr.scale_by_group({"stage1": 0.5}))
    ref_tx = base_optimizer()
    grads = make_grads(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    ref, _ = ref_tx.update(grads, ref_tx.init(params), params)
    assert isinstance(updates, FrozenDict)
    np.testing.assert_allclose(updates["stage1"]["kernel"], 0.5 * ref["stage1"]["kernel"], 1e-6)
    np.testing.assert_array_equal(updates["head"]["kernel"], ref["head"]["kernel"])
    with pytest.raises(ValueError, match="'neck'"):
        lr.scale_by_group({"neck": 0.5}).init(params)


class Net(nnx.Module):
    def __init__(self, rngs):
        self.stem = nnx.Linear(3, 4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)


def test_scale_by_group_nnx_state():
    params = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
    grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
    tx = lr.scale_by_group({"stem": 0.25})
    updates, _ = tx.update(grads, tx.init(params), params)
    assert type(updates) is type(params)
    np.testing.assert_array_equal(updates["stem"]["kernel"][...], np.full((3, 4), 0.25))
    np.testing.assert_array_equal(updates["head"]["kernel"][...], np.ones((4, 2)))
    with pytest.raises(ValueError, match="Groups that exist: head, stem"):
        lr.scale_by_group({"body": 0.5}).init(params)


@pytest.mark.parametrize("method", layerfreeze.METHODS)
def test_scale_by_group_inside_freeze(method):
    # Inside `freeze`, the trainable branch sees the frozen groups as masked
    # nodes; naming a wholly frozen group must not count as unknown.
    params = make_params()
    inner = optax.chain(base_optimizer(), lr.scale_by_group({"stem": 0.5, "stage2": 0.25}))
    tx = layerfreeze.freeze(inner, "stem,stage1", method=method)
    ref_tx = layerfreeze.freeze(base_optimizer(), "stem,stage1", method=method)
    grads = make_grads(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    ref, _ = ref_tx.update(grads, ref_tx.init(params), params)
    np.testing.assert_array_equal(updates["stem"]["kernel"], np.zeros((3, 2)))
    np.testing.assert_allclose(updates["stage2"]["kernel"], 0.25 * ref["stage2"]["kernel"], 1e-6)
    np.testing.assert_array_equal(updates["head"]["kernel"], ref["head"]["kernel"])


def test_layerwise_decay_over_path_prefix_groups_of_a_vit():
    from layerfreeze.models import ViT, vit_groups

    model = ViT(num_classes=3, patch_size=4, width=16, depth=3, mlp_dim=32, num_heads=2)
    params = jax.tree.map(
        jnp.ones_like, model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    )
    groups = vit_groups(3)
    layers = [groups[:3], *groups[3:6], groups[6:]]  # embeddings, blocks 0-2, norm + head
    mults = layerfreeze.lr.layerwise_decay(layers, 0.5)
    assert mults["embedding"] == mults["cls"] == 0.0625
    assert [mults[f"Transformer/encoderblock_{i}"] for i in range(3)] == [0.125, 0.25, 0.5]
    assert mults["head"] == mults["Transformer/encoder_norm"] == 1.0
    tx = optax.chain(optax.sgd(1.0), layerfreeze.lr.scale_by_group(mults))
    updates, _ = tx.update(params, tx.init(params))
    for i in range(3):
        block = updates["Transformer"][f"encoderblock_{i}"]
        for leaf in jax.tree.leaves(block):
            np.testing.assert_array_equal(leaf, -0.125 * 2**i)
    np.testing.assert_array_equal(updates["Transformer"]["encoder_norm"]["scale"], -1.0)
    np.testing.assert_array_equal(updates["pos_embedding"], -0.0625)


@pytest.mark.parametrize(
    ("decay", "error"),
    [(0.0, r"must be in \(0, 1\]"), (1.5, r"must be in \(0, 1\]"), (float("nan"), "decay")],
)
def test_layerwise_decay_bad_values(decay, error):
    with pytest.raises(ValueError, match=error):
        layerfreeze.lr.layerwise_decay(["a", "b"], decay)
    with pytest.raises(ValueError, match="Duplicate group name"):
        layerfreeze.lr.layerwise_decay(["a", ("b", "a")], 0.5)


@pytest.mark.parametrize(
    ("layers", "decay", "error", "match"),
    [
        (["a", "b"], "0.75", TypeError, r"decay must be a number, got str '0.75'"),
        (["a", "b"], np.float32(1.5), ValueError, r"decay must be in \(0, 1\], got np.float32"),
        (["a", "b"], jnp.float32(1.5), ValueError, r"decay must be in \(0, 1\], got Array"),
        ([1, 2], 0.5, TypeError, r"layers\[0\] must be a group name or a tuple .*got int 1"),
        ([("a",), ()], 0.5, ValueError, r"layers\[1\] is empty"),
        ({"a": 1, "b": 2}, 0.5, TypeError, r"layers must be a sequence of groups .*got dict"),
    ],
    ids=["string-decay", "numpy-decay", "jax-decay", "int-layers", "empty-layer", "dict-layers"],
)
def test_layerwise_decay_names_wrong_arguments(layers, decay, error, match):
    with pytest.raises(error, match=match):
        layerfreeze.lr.layerwise_decay(layers, decay)
