import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import layerfreeze as lf
from layerfreeze import _paths


def _params(key=0):
    k = jax.random.split(jax.random.key(key), 4)
    return {
        "stem": {"kernel": jax.random.normal(k[0], (4, 4)), "bias": jnp.zeros(4)},
        "stage1": {"kernel": jax.random.normal(k[1], (4, 4))},
        "stage2": {"kernel": jax.random.normal(k[2], (4, 4))},
        "head": {"kernel": jax.random.normal(k[3], (4, 2)), "bias": jnp.zeros(2)},
    }


def _loss(params, x):
    h = x
    for g in ("stem", "stage1", "stage2"):
        h = jnp.tanh(h @ params[g]["kernel"] + params[g].get("bias", 0.0))
    return jnp.mean((h @ params["head"]["kernel"] + params["head"]["bias"]) ** 2)


def _train(tx, params, steps=20, grads_fn=None):
    state = tx.init(params)

    @jax.jit
    def step(params, state, x):
        grads = jax.grad(_loss)(params, x)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for i in range(steps):
        x = jax.random.normal(jax.random.key(100 + i), (8, 4))
        params, state = step(params, state, x)
    return params, state


def _assert_frozen_exactly(before, after, frozen_groups):
    for path, b, a in zip(
        _paths.leaf_paths(before), jax.tree.leaves(before), jax.tree.leaves(after), strict=True
    ):
        if path.split("/")[0] in frozen_groups:
            np.testing.assert_array_equal(a, b, err_msg=path)
        else:
            assert not np.array_equal(a, b), f"{path} did not train"


OPTIMIZERS = {
    "adamw+clip": lambda: optax.chain(
        optax.clip_by_global_norm(0.1), optax.adamw(1e-2, weight_decay=0.1)
    ),
    "schedule": lambda: optax.adamw(optax.cosine_decay_schedule(1e-2, 20), weight_decay=0.1),
    "multisteps": lambda: optax.MultiSteps(optax.adamw(1e-2, weight_decay=0.1), 2),
    "sgd-momentum": lambda: optax.sgd(1e-2, momentum=0.9),
}


@pytest.mark.parametrize("method", lf.METHODS)
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_frozen_leaves_bit_identical_after_20_steps(method, opt):
    params = _params()
    tx = lf.freeze(OPTIMIZERS[opt](), "stem,stage1", method=method)
    new, _ = _train(tx, params)
    _assert_frozen_exactly(params, new, {"stem", "stage1"})


@settings(max_examples=15, deadline=None)
@given(groups=st.sets(st.sampled_from(["stem", "stage1", "stage2", "head"]), max_size=3))
def test_any_frozen_subset_stays_identical(groups):
    params = _params()
    spec = ",".join(sorted(groups)) or "none"
    new, _ = _train(lf.freeze(optax.adamw(1e-2, weight_decay=0.1), spec), params, steps=3)
    _assert_frozen_exactly(params, new, groups)


def _state_paths(state):
    return [
        _paths.path_str(_paths.keypath_names(p))
        for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]
    ]


def test_zero_method_holds_no_state_for_frozen_leaves():
    params = _params()
    state = lf.freeze(optax.adamw(1e-2), "stem,stage1").init(params)
    paths = _state_paths(state)
    assert not any("/stem/" in p or "/stage1/" in p for p in paths)
    assert any(p.endswith("mu/head/kernel") for p in paths)
    s = lf.summary(params, "stem,stage1", state)
    assert s.as_dict()["groups"]["stem"]["opt_state_bytes"] == 0
    assert s.as_dict()["groups"]["head"]["opt_state_bytes"] == 2 * 4 * (8 + 2)


def test_lr0_keeps_state_for_every_leaf():
    params = _params()
    new, state = _train(lf.freeze(optax.adam(1e-2), "stem", method="lr0"), params, steps=3)
    np.testing.assert_array_equal(new["stem"]["kernel"], params["stem"]["kernel"])
    frozen_mu = state.inner_states["frozen"].inner_state[0].inner_state[0].mu["stem"]["kernel"]
    assert np.all(np.asarray(frozen_mu) != 0), "frozen moments should be warm under lr0"
    total = lf.summary(params, "stem", state).opt_state_bytes
    assert total >= 2 * lf.summary(params, "stem").total_bytes


def test_clipping_sees_trainable_leaves_only():
    params = _params()
    grads = jax.tree.map(jnp.ones_like, params)
    grads["stem"]["kernel"] = jnp.full((4, 4), 1e6)  # a huge frozen gradient
    tx = lf.freeze(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0)), "stem")
    updates, _ = tx.update(grads, tx.init(params), params)
    trainable = {k: v for k, v in updates.items() if k != "stem"}
    norm = optax.tree.norm(trainable)
    # Unclipped trainable norm is sqrt(42) > 1, so it is clipped to exactly 1,
    # not crushed by the frozen 1e6 entries.
    np.testing.assert_allclose(norm, 1.0, rtol=1e-5)


def test_multisteps_accumulator_sees_trainable_only():
    params = _params()
    tx = lf.freeze(optax.MultiSteps(optax.sgd(1.0), 2), "stem")
    state = tx.init(params)
    paths = _state_paths(state)
    assert not any("/stem/" in p for p in paths)
    assert any("acc_grads/head/kernel" in p for p in paths)


def test_bad_method():
    with pytest.raises(ValueError, match=r"Unknown freeze method 'sgd'; valid methods: zero, lr0"):
        lf.freeze(optax.sgd(1.0), "stem", method="sgd")


def test_bad_spec_fails_at_init():
    tx = lf.freeze(optax.sgd(1.0), "stage9")
    with pytest.raises(
        ValueError, match=r"'stage9' matches no parameter\. Groups that exist: head, stage1"
    ):
        tx.init(_params())


def test_ready_labels_or_mask_instead_of_a_spec():
    params = _params()
    mask = lf.frozen_mask(params, "stem,stage1")
    for labels in (mask, lf.freeze_labels(params, "stem,stage1")):
        new, _ = _train(lf.freeze(optax.adamw(1e-2), labels=labels), params, steps=3)
        _assert_frozen_exactly(params, new, {"stem", "stage1"})


def test_labels_with_the_wrong_structure_are_explained():
    params = _params()
    labels = lf.freeze_labels(params, "stem")
    del labels["stage2"]
    tx = lf.freeze(optax.sgd(1.0), labels=labels)
    with pytest.raises(ValueError, match=r"missing from labels: \['stage2/kernel'\]"):
        tx.init(params)
    with pytest.raises(ValueError, match="not both"):
        lf.freeze(optax.sgd(1.0), "stem", labels=labels)
    bad = jax.tree.map(lambda _: "sometimes", params)
    with pytest.raises(ValueError, match="Label 'sometimes' is not valid"):
        lf.freeze(optax.sgd(1.0), labels=bad)
