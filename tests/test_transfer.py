import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import layerfreeze as lf
from layerfreeze._transfer import transfer_opt_state


def _params():
    return {"stem": {"w": jnp.ones(3)}, "stage4": {"w": jnp.ones(3)}, "head": {"w": jnp.ones(2)}}


def _steps(tx, state, params, n=3):
    grads = jax.tree.map(lambda p: 0.5 * p, params)
    for _ in range(n):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _adam(state, branch):
    return state.inner_states[branch].inner_state[0].inner_state[0]


def test_zero_keeps_state_of_still_trainable_and_starts_new_ones_fresh():
    params = _params()
    old_tx = lf.freeze(optax.adam(0.1), "stem,stage4")
    params, old = _steps(old_tx, old_tx.init(params), params)
    new_tx = lf.freeze(optax.adam(0.1), "stem")  # no `previous`: stage4 shares count 3
    with pytest.warns(UserWarning, match=r"mu/stage4/w, nu/stage4/w had no optimizer state"):
        new = transfer_opt_state(old, new_tx.init(params))
    adam_old, adam_new = _adam(old, "trainable"), _adam(new, "trainable")
    assert int(adam_new.count) == 3
    np.testing.assert_array_equal(adam_new.mu["head"]["w"], adam_old.mu["head"]["w"])
    np.testing.assert_array_equal(adam_new.nu["head"]["w"], adam_old.nu["head"]["w"])
    np.testing.assert_array_equal(adam_new.mu["stage4"]["w"], np.zeros(3))
    # The transferred state works with the new transformation.
    _steps(new_tx, new, params, n=1)


def test_lr0_carries_warm_moments_of_newly_unfrozen_leaves():
    params = _params()
    old_tx = lf.freeze(optax.adam(0.1), "stem,stage4", method="lr0")
    params, old = _steps(old_tx, old_tx.init(params), params)
    new = transfer_opt_state(old, lf.freeze(optax.adam(0.1), "stem", method="lr0").init(params))
    warm = _adam(old, "frozen").mu["stage4"]["w"]
    assert np.all(np.asarray(warm) != 0)
    np.testing.assert_array_equal(_adam(new, "trainable").mu["stage4"]["w"], warm)
    np.testing.assert_array_equal(
        _adam(new, "frozen").mu["stem"]["w"], _adam(old, "frozen").mu["stem"]["w"]
    )


@pytest.mark.parametrize("method", lf.METHODS)
def test_refreezing_drops_or_parks_state(method):
    params = _params()
    old_tx = lf.freeze(optax.adam(0.1), "none", method=method)
    params, old = _steps(old_tx, old_tx.init(params), params)
    new = transfer_opt_state(old, lf.freeze(optax.adam(0.1), "stage4", method=method).init(params))
    if method == "lr0":  # kept, in the frozen branch
        np.testing.assert_array_equal(
            _adam(new, "frozen").mu["stage4"]["w"], _adam(old, "trainable").mu["stage4"]["w"]
        )
    else:  # dropped: no state leaf names stage4 any more
        paths = jax.tree_util.tree_flatten_with_path(new)[0]
        assert not any("stage4" in jax.tree_util.keystr(p) for p, _ in paths)
    np.testing.assert_array_equal(  # still-trainable leaves keep their moments
        _adam(new, "trainable").mu["head"]["w"], _adam(old, "trainable").mu["head"]["w"]
    )
    assert int(_adam(new, "trainable").count) == 3


def test_same_spec_is_identity():
    params = _params()
    tx = lf.freeze(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.1)), "stem")
    _, old = _steps(tx, tx.init(params), params)
    new = transfer_opt_state(old, tx.init(params))
    assert jax.tree.structure(new) == jax.tree.structure(old)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old), strict=True):
        np.testing.assert_array_equal(a, b)


def _state():
    params = _params()
    return lf.freeze(optax.adam(0.1), "stem").init(params)


@pytest.mark.parametrize(
    ("bad", "hint"),
    [
        (None, "got None"),
        ("adam", "got str, which is not a pytree"),
        (nn.Dense(3), "got Dense, which is not a pytree"),
        (jnp.ones(3), "which is not a pytree"),
        ({"stem": {"w": "adam"}}, "got a dict whose leaf stem/w is a str, not an array"),
        (optax.adam(0.1), "leaf init is a function"),
    ],
    ids=["none", "string", "linen-model", "array", "dict-of-strings", "optimizer"],
)
@pytest.mark.parametrize("position", ["old_state", "new_state"])
def test_rejects_what_is_not_an_optimizer_state(bad, hint, position):
    args = {"old_state": _state(), "new_state": _state(), position: bad}
    with pytest.raises(TypeError, match=f"{position} must be an optimizer state.*{hint}"):
        transfer_opt_state(**args)


@pytest.mark.parametrize("position", ["old_state", "new_state"])
def test_rejects_params_in_place_of_a_state(position):
    args = {"old_state": _state(), "new_state": _state(), position: _params()}
    with pytest.raises(TypeError, match=r"old_state is a \w+ but new_state is a \w+"):
        transfer_opt_state(**args)


def test_no_warning_with_previous_or_before_any_step():
    params = _params()
    old_tx = lf.freeze(optax.adam(0.1), "stem,stage4")
    _, old = _steps(old_tx, old_tx.init(params), params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new_tx = lf.freeze(optax.adam(0.1), "stem", previous=["stem,stage4"])
        transfer_opt_state(old, new_tx.init(params))
        # Nothing spent yet: the shared count is still 0.
        transfer_opt_state(old_tx.init(params), lf.freeze(optax.adam(0.1), "stem").init(params))


def test_accepts_states_without_array_leaves():
    # Plain SGD keeps no per-parameter state: the carried state holds no arrays
    # and still drives the new phase's optimizer.
    params = _params()
    old = lf.freeze(optax.sgd(0.1), "stem").init(params)
    new_tx = lf.freeze(optax.sgd(0.1), "stem,stage4")
    carried = transfer_opt_state(old, new_tx.init(params))
    assert not jax.tree.leaves(carried)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = new_tx.update(grads, carried, params)
    np.testing.assert_array_equal(updates["stem"]["w"], np.zeros(3))
    np.testing.assert_array_equal(updates["stage4"]["w"], np.zeros(3))
    np.testing.assert_allclose(updates["head"]["w"], np.full(2, -0.1))
