"""Frozen parameters stored in a smaller float dtype (`make_steps(..., frozen_dtype=...)`).

Tiny models, one compile per step; the sharded case (each cast leaf keeps its
sharding) runs in `test_sharding.py`'s four-device subprocess.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from layerfreeze import _paths, schedules, train

SPEC = "conv1,bn1,conv2"  # bn2 and the head train


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        norm = functools.partial(nn.BatchNorm, use_running_average=not train)
        x = nn.relu(norm(name="bn1")(nn.Conv(8, (3, 3), name="conv1")(x)))
        x = nn.relu(norm(name="bn2")(nn.Conv(8, (3, 3), name="conv2")(x)))
        return nn.Dense(10, name="head")(x.mean((1, 2)))


def _batch(seed):
    r = np.random.RandomState(seed)
    return {
        "image": r.randn(4, 8, 8, 3).astype(np.float32),
        "label": r.randint(0, 10, 4).astype(np.int32),
    }


def _flat(tree):
    return dict(zip(_paths.leaf_paths(tree), jax.tree.leaves(tree), strict=True))


def _bits(x):
    x = np.asarray(x)
    return x.view(np.uint16 if x.itemsize == 2 else np.uint32)


def _bfloat16(x):
    return np.asarray(jnp.asarray(x, jnp.bfloat16))


def test_frozen_leaves_stored_in_bfloat16_stay_bit_identical_and_shrink_the_step():
    model = CNN()
    variables = jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(0), jnp.zeros((1, 8, 8, 3))
    )
    initial = _flat(variables["params"])
    frozen = {p for p in initial if p.split("/")[0] in ("conv1", "bn1", "conv2")}
    argument_bytes = {}
    for dtype in (None, "bfloat16"):
        steps = train.make_steps(
            model, optax.adamw(1e-2), SPEC, variables["params"], frozen_dtype=dtype
        )
        state = steps.init_state(variables, jax.random.key(1))
        compiled = steps.train_step.lower(state, _batch(0)).compile()
        argument_bytes[dtype] = compiled.memory_analysis().argument_size_in_bytes
    assert steps.frozen_dtype == np.dtype(jnp.bfloat16)

    # Stored: the frozen leaves rounded to bfloat16; the rest, and every float
    # leaf of the optimizer state, float32; BatchNorm statistics untouched.
    stored = _flat(state.params)
    for path, leaf in stored.items():
        if path in frozen:
            assert leaf.dtype == jnp.bfloat16, path
            np.testing.assert_array_equal(_bits(leaf), _bits(_bfloat16(initial[path])))
        else:
            assert leaf.dtype == jnp.float32, path
    opt_dtypes = {x.dtype for x in jax.tree.leaves(state.opt_state)}
    assert opt_dtypes <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}, opt_dtypes
    assert {x.dtype for x in jax.tree.leaves(state.batch_stats)} == {jnp.dtype(jnp.float32)}
    # The step's arguments shrink by 2 bytes per frozen parameter.
    frozen_params = sum(initial[p].size for p in frozen)
    assert argument_bytes[None] - argument_bytes["bfloat16"] == 2 * frozen_params

    # Flax's layers compute with the bfloat16 kernels in their float32 dtype.
    out = jax.eval_shape(
        lambda p, s: model.apply({"params": p, "batch_stats": s}, _batch(0)["image"], train=False),
        state.params,
        state.batch_stats,
    )
    assert out.dtype == jnp.float32

    before = {p: np.array(x) for p, x in stored.items()}
    for i in range(3):
        state, metrics = compiled(state, _batch(i))
    assert np.isfinite(float(metrics["loss"]))
    for path, leaf in _flat(state.params).items():
        assert leaf.dtype == before[path].dtype, path
        same = np.array_equal(_bits(leaf), _bits(before[path]))
        assert same == (path in frozen), path
    assert np.isfinite(float(steps.eval_step(state, _batch(3))["loss"]))


def test_a_phase_change_casts_newly_frozen_leaves_down_and_unfrozen_ones_up():
    r = np.random.RandomState(0)
    params = {
        "a": {"w": r.randn(4, 8).astype(np.float32)},
        "b": {"w": r.randn(8, 8).astype(np.float32)},
        "head": {"w": r.randn(8, 2).astype(np.float32)},
    }

    def loss_fn(params, batch, rng):
        x = jnp.tanh(jnp.tanh(batch["x"] @ params["a"]["w"]) @ params["b"]["w"])
        return jnp.mean((x @ params["head"]["w"] - batch["y"]) ** 2)

    schedule = schedules.explicit({0: "a", 2: "b"}, unit="step")
    phases = train.Phases(
        schedule,
        lambda phase, previous: train.make_steps(
            None,
            optax.adam(0.05),
            phase.spec,
            params,
            loss_fn=loss_fn,
            previous=previous,
            frozen_dtype=jnp.bfloat16,
        ),
        params=params,
    )
    state = phases.init_state(params, jax.random.key(0))
    assert state.params["a"]["w"].dtype == jnp.bfloat16
    batch = {"x": r.randn(16, 4).astype(np.float32), "y": r.randn(16, 2).astype(np.float32)}
    for step in range(4):
        b_before = np.array(state.params["b"]["w"])
        steps, state, change = phases.update(step, state)
        if change:
            # Unfrozen a comes back as float32 holding its rounded values (no
            # master copy), with fresh float32 moments; b is rounded down once.
            a, b = state.params["a"]["w"], state.params["b"]["w"]
            assert a.dtype == jnp.float32 and b.dtype == jnp.bfloat16
            np.testing.assert_array_equal(a, _bfloat16(params["a"]["w"]).astype(np.float32))
            np.testing.assert_array_equal(_bits(b), _bits(_bfloat16(b_before)))
            adam = state.opt_state.inner_states["trainable"].inner_state
            moments = _flat(jax.tree.leaves(adam, is_leaf=lambda x: hasattr(x, "mu"))[0].mu)
            assert {p: m.dtype for p, m in moments.items() if m is not None} == {
                "a/w": jnp.float32,
                "head/w": jnp.float32,
            }
            b_stored = np.array(b)
        state, metrics = steps.train_step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    np.testing.assert_array_equal(_bits(state.params["b"]["w"]), _bits(b_stored))
    assert not np.array_equal(state.params["a"]["w"], _bfloat16(params["a"]["w"]))
    assert state.params["a"]["w"].dtype == jnp.float32


def test_an_nnx_model_stores_its_frozen_params_in_the_dtype():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.body, self.head = nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.head(nnx.relu(self.body(x)))

    net = Net(nnx.Rngs(0))
    steps = train.make_steps(net, optax.sgd(0.1), "body", inputs="x", frozen_dtype="float16")
    state = steps.init_state(net, jax.random.key(0))
    dtypes = {p: x.dtype for p, x in _flat(state.params).items()}
    assert dtypes == {
        "body/bias": jnp.float16,
        "body/kernel": jnp.float16,
        "head/bias": jnp.float32,
        "head/kernel": jnp.float32,
    }
    body = np.array(state.params["body"]["kernel"][...])
    batch = {"x": np.ones((2, 4), np.float32), "label": np.array([0, 2], np.int32)}
    state, metrics = steps.train_step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    np.testing.assert_array_equal(_bits(state.params["body"]["kernel"][...]), _bits(body))


@pytest.mark.parametrize(
    ("value", "shown"),
    [("int8", "got 'int8'"), (jnp.int32, "got int32 ("), ("fp33", "got 'fp33'"), (3.5, "3.5")],
)
def test_a_frozen_dtype_that_is_no_valid_float_type_names_it_and_the_choices(value, shown):
    with pytest.raises(ValueError) as info:
        train.StepOptions(frozen_dtype=value)
    message = str(info.value)
    assert shown in message
    assert "one of 'bfloat16', 'float16', 'float32'" in message and "or None" in message


def test_frozen_dtype_forms_and_method_lr0():
    for value in ("bfloat16", jnp.bfloat16, np.dtype(jnp.bfloat16)):
        assert train.StepOptions(frozen_dtype=value).frozen_dtype == np.dtype(jnp.bfloat16)
    params = {"a": jnp.ones(2), "b": jnp.ones(2)}
    with pytest.raises(ValueError, match=r"frozen_dtype='float16' needs method 'zero'; got 'lr0'"):
        train.make_steps(
            None,
            optax.sgd(0.1),
            "a",
            params,
            loss_fn=lambda p, batch, rng: jnp.sum(p["a"] * p["b"]),
            method="lr0",
            frozen_dtype="float16",
        )


def test_the_abstract_state_has_the_frozen_dtype():
    # jax.eval_shape(init_state) is how a program is compiled before any array exists.
    params = {"stem": {"w": jnp.ones((4, 4))}, "head": {"w": jnp.ones((4, 2))}}

    def loss_fn(p, batch, rng):
        return jnp.sum(p["stem"]["w"] @ p["head"]["w"])

    steps = train.make_steps(
        None, optax.adam(1e-3), "stem", params, loss_fn=loss_fn, frozen_dtype="bfloat16"
    )
    state = jax.eval_shape(lambda p: steps.init_state(p, jax.random.key(0)), params)
    assert state.params["stem"]["w"].dtype == jnp.bfloat16
    assert state.params["head"]["w"].dtype == jnp.float32
