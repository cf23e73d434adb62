"""`layerfreeze.value_and_grad` / `grad`: gradients of the trainable leaves only, any loss."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from zoo import FlaxExampleResNet

import layerfreeze as lf


def _params():
    r = np.random.RandomState(0)
    return {
        "stem": {"w": jnp.asarray(r.randn(3, 4), jnp.float32)},
        "body": {"w": jnp.asarray(r.randn(4, 4), jnp.float32), "b": jnp.zeros(4)},
        "head": {"w": jnp.asarray(r.randn(4, 2), jnp.float32)},
    }


def _loss(params, x, y, *, scale=1.0):
    h = jnp.tanh(x @ params["stem"]["w"])
    h = jnp.tanh(h @ params["body"]["w"] + params["body"]["b"])
    return scale * jnp.mean((h @ params["head"]["w"] - y) ** 2)


X = jnp.asarray(np.random.RandomState(1).randn(5, 3), jnp.float32)
Y = jnp.asarray(np.random.RandomState(2).randn(5, 2), jnp.float32)


@pytest.mark.parametrize("spec", ["stem", "stem,body", "all-but:head", "none", "all"])
def test_trainable_grads_equal_full_grads_frozen_are_zero(spec):
    value, grads = lf.value_and_grad(_loss, spec)(_params(), X, Y, scale=2.0)
    ref_value, ref = jax.value_and_grad(_loss)(_params(), X, Y, scale=2.0)
    assert float(value) == float(ref_value)
    mask = lf.frozen_mask(_params(), spec)
    for frozen, g, r in zip(
        jax.tree.leaves(mask), jax.tree.leaves(grads), jax.tree.leaves(ref), strict=True
    ):
        if frozen:
            np.testing.assert_array_equal(g, np.zeros_like(r))
        else:
            np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-7)
            assert np.any(g != 0)


def test_grad_and_has_aux():
    def loss(params, x, y):
        value = _loss(params, x, y)
        return value, {"twice": 2 * value}

    grads, aux = lf.grad(loss, "stem", has_aux=True)(_params(), X, Y)
    assert float(aux["twice"]) == pytest.approx(2 * float(_loss(_params(), X, Y)))
    np.testing.assert_array_equal(grads["stem"]["w"], np.zeros((3, 4)))
    assert lf.grad(_loss, "head")(_params(), X, Y)["head"]["w"].shape == (4, 2)


@pytest.mark.parametrize("container", ["dict", "FrozenDict", "nnx.State"])
def test_grads_have_the_params_container(container):
    params = _params()
    if container == "FrozenDict":
        params = flax.core.freeze(params)
    elif container == "nnx.State":
        params = nnx.State(params)
    _, grads = jax.jit(lf.value_and_grad(_loss, "stem"))(params, X, Y)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert type(grads) is type(params)


def test_nnx_state_of_params():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.stem = nnx.Linear(3, 4, rngs=rngs)
            self.head = nnx.Linear(4, 2, rngs=rngs)

    graphdef, params = nnx.split(Net(nnx.Rngs(0)), nnx.Param)

    def loss(params, x):
        model = nnx.merge(graphdef, params)
        return jnp.mean(model.head(jnp.tanh(model.stem(x))) ** 2)

    _, grads = lf.value_and_grad(loss, "stem")(params, X)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    np.testing.assert_array_equal(grads["stem"]["kernel"][...], np.zeros((3, 4)))
    assert np.any(np.asarray(grads["head"]["kernel"][...]) != 0)


def test_non_scalar_loss_is_a_clear_error():
    with pytest.raises(ValueError, match=r"float scalar.*shape \(5, 2\).*mean"):
        lf.value_and_grad(lambda p, x: x @ p["stem"]["w"] @ p["body"]["w"][:, :2], "stem")(
            _params(), X
        )
    with pytest.raises(ValueError, match=r"pair \(loss, aux\)"):
        lf.value_and_grad(lambda p: _loss(p, X, Y), "stem", has_aux=True)(_params())


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("loss", "stem"), {}, r"takes the loss function first.*got fun=str 'loss'"),
        (("stem", _loss), {}, r"takes the loss function first.*got fun=str 'stem'"),
        ((_loss, optax.adam(0.1)), {}, r"spec from an optax optimizer"),
        ((_loss, "stem"), {"has_aux": "yes"}, r"has_aux must be True or False, got str 'yes'"),
    ],
    ids=["fun-string", "swapped", "spec-optimizer", "has_aux"],
)
def test_value_and_grad_names_wrong_arguments(args, kwargs, match):
    with pytest.raises(TypeError, match=match):
        lf.value_and_grad(*args, **kwargs)
    with pytest.raises(TypeError, match=match):
        lf.grad(*args, **kwargs)


def test_rule_matching_nothing_fails_on_first_call():
    with pytest.raises(ValueError, match=r"'stage9' matches no parameter.*body, head, stem"):
        lf.value_and_grad(_loss, "stage9")(_params(), X, Y)


# Compiled cost: a user's own step with clip + AdamW that also reports the
# global norm of the returned gradients, against a hand-written ideal.

SPEC = "conv_init,bn_init,block0"


def _setup():
    model = FlaxExampleResNet()
    x = jnp.zeros((16, 16, 16, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1], train=False))
    batch = {
        "image": jax.ShapeDtypeStruct(x.shape, jnp.float32),
        "label": jax.ShapeDtypeStruct((16,), jnp.int32),
    }
    return model, variables, batch


def _optimizer():
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.1))


def _user_step(model, differentiate):
    tx = lf.freeze(_optimizer(), SPEC)

    def loss_fn(params, batch_stats, batch):
        with lf.frozen_batchnorm(params, SPEC):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                batch["image"],
                mutable=["batch_stats"],
            )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, updates["batch_stats"]

    def step(params, batch_stats, opt_state, batch):
        (loss, batch_stats), grads = differentiate(loss_fn)(params, batch_stats, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, batch_stats, opt_state, loss, optax.tree.norm(grads)

    return tx, step


def _ideal_step(model, params):
    mask = lf.frozen_mask(params, SPEC)
    tx = _optimizer()

    def step(trainable, frozen, batch_stats, opt_state, batch):
        def loss_fn(trainable):
            merged = jax.tree.map(lambda f, t, z: z if f else t, mask, trainable, frozen)
            with lf.frozen_batchnorm(merged, SPEC):
                logits, updates = model.apply(
                    {"params": merged, "batch_stats": batch_stats},
                    batch["image"],
                    mutable=["batch_stats"],
                )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
            return loss, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, batch_stats, opt_state, loss, optax.tree.norm(grads)

    trainable = jax.tree.map(lambda f, p: None if f else p, mask, params)
    frozen = jax.tree.map(lambda f, p: p if f else None, mask, params)
    return tx, step, trainable, frozen


def _flops(fn, *args):
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def test_user_step_compiles_to_the_ideal_flops_even_reporting_the_grad_norm():
    model, variables, batch = _setup()
    params, stats = variables["params"], variables["batch_stats"]

    tx, ours = _user_step(model, lambda f: lf.value_and_grad(f, SPEC, has_aux=True))
    opt_state = jax.eval_shape(tx.init, params)
    ours_flops = _flops(ours, params, stats, opt_state, batch)

    _, naive = _user_step(model, lambda f: jax.value_and_grad(f, has_aux=True))
    naive_flops = _flops(naive, params, stats, opt_state, batch)

    ideal_tx, ideal, trainable, frozen = _ideal_step(model, params)
    ideal_state = jax.eval_shape(ideal_tx.init, trainable)
    ideal_flops = _flops(ideal, trainable, frozen, stats, ideal_state, batch)

    print(f"ours {ours_flops:.0f}, ideal {ideal_flops:.0f}, jax.value_and_grad {naive_flops:.0f}")
    assert abs(ours_flops / ideal_flops - 1) <= 0.01, (ours_flops, ideal_flops)
    # The same step with jax.value_and_grad pays for the frozen backward pass.
    assert naive_flops > 1.2 * ideal_flops, (naive_flops, ideal_flops)
