"""`train.make_steps` on models the library has never seen: linen, NNX, none; any loss."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from zoo import DeepNormNet, FlaxExampleResNet, NNXNet

import layerfreeze as lf
from layerfreeze import _paths, train
from layerfreeze.train import platform

R = np.random.RandomState(0)
IMAGES = R.randn(8, 8, 8, 3).astype(np.float32)
LABELS = R.randint(0, 5, 8).astype(np.int32)
TARGETS = R.randn(8, 1).astype(np.float32)


def _mse(outputs, batch):
    loss = jnp.mean((outputs - batch["target"]) ** 2)
    return loss, {"mae": jnp.mean(jnp.abs(outputs - batch["target"]))}


def _optimizer():
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))


KINDS = {
    # name: (build model, spec, loss_fn, batch, paths that must stay bit-identical)
    "flax_example": (
        lambda: FlaxExampleResNet(),
        "conv_init,bn_init,block0",
        None,
        {"image": IMAGES, "label": LABELS},
        ("conv_init/", "bn_init/", "block0/"),
    ),
    "deep_norm_regression": (
        lambda: DeepNormNet(),
        "encoder,middle/unit_a",
        _mse,
        {"image": IMAGES, "target": TARGETS},
        ("encoder/", "middle/unit_a/"),
    ),
    "nnx": (
        lambda: NNXNet(nnx.Rngs(0)),
        "stem,stem_bn",
        None,
        {"image": IMAGES, "label": LABELS},
        ("stem/", "stem_bn/"),
    ),
}


def _build(kind, spec=None, **kw):
    make, default_spec, loss_fn, batch, frozen = KINDS[kind]
    model = make()
    spec = default_spec if spec is None else spec
    if isinstance(model, nnx.Module):
        steps = train.make_steps(model, _optimizer(), spec, loss_fn=loss_fn, **kw)
        state = steps.init_state(model, jax.random.key(1))
    else:
        variables = model.init(jax.random.key(0), IMAGES[:2], train=False)
        steps = train.make_steps(
            model, _optimizer(), spec, variables["params"], loss_fn=loss_fn, **kw
        )
        state = steps.init_state(variables, jax.random.key(1))
    return model, steps, state, batch, frozen


def _as_numpy(leaf):
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    return np.array(leaf)


def _leaves(tree):
    return dict(zip(_paths.leaf_paths(tree), map(_as_numpy, jax.tree.leaves(tree)), strict=True))


@pytest.mark.parametrize("kind", list(KINDS))
def test_frozen_params_and_statistics_bit_identical_over_20_steps(kind):
    _, steps, state, batch, frozen = _build(kind)
    params0, stats0 = _leaves(state.params), _leaves(state.batch_stats)
    for _ in range(20):
        state, metrics = steps.train_step(state, batch)
    params1, stats1 = _leaves(state.params), _leaves(state.batch_stats)
    for path in params0:
        same = np.array_equal(params0[path], params1[path])
        assert same == path.startswith(frozen), path
    stat_paths = [p for p in stats0 if p.endswith(("mean", "var"))]
    assert stat_paths
    for path in stat_paths:
        same = np.array_equal(stats0[path], stats1[path])
        assert same == path.startswith(frozen), path
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    if kind == "deep_norm_regression":
        assert set(metrics) == {"loss", "mae", "grad_norm"}


@pytest.mark.parametrize("kind", list(KINDS))
def test_train_bn_trains_batchnorm_inside_frozen_layers(kind):
    spec = lf.FreezeSpec.parse(KINDS[kind][1], train_bn=True)
    if kind != "nnx":  # linen: BatchNorm by type from the variables' statistics
        model = KINDS[kind][0]()
        variables = model.init(jax.random.key(0), IMAGES[:2], train=False)
        spec = spec.replace(bn_modules=lf.batchnorm_modules(variables))
    _, steps, state, batch, frozen = _build(kind, spec)
    stats0 = _leaves(state.batch_stats)
    params0 = _leaves(state.params)
    state, _ = steps.train_step(state, batch)
    stats1, params1 = _leaves(state.batch_stats), _leaves(state.params)
    assert all(
        not np.array_equal(stats0[p], stats1[p]) for p in stats0 if p.endswith(("mean", "var"))
    )
    norm_scales = [p for p in params0 if p.startswith(frozen) and p.endswith("scale")]
    assert norm_scales
    # The BatchNorm scales (zero-initialised ones aside) train; frozen kernels do not.
    assert any(not np.array_equal(params0[p], params1[p]) for p in norm_scales)
    for p in params0:
        if p.startswith(frozen) and p.endswith("kernel"):
            assert np.array_equal(params0[p], params1[p]), p


def _linen_ideal_flops(model, variables, spec, batch, loss_fn):
    mask = lf.frozen_mask(variables["params"], spec)
    tx = _optimizer()

    def step(trainable, frozen, batch_stats, opt_state, batch):
        def objective(trainable):
            params = jax.tree.map(lambda f, t, z: z if f else t, mask, trainable, frozen)
            with lf.frozen_batchnorm(params, spec):
                out, updates = model.apply(
                    {"params": params, "batch_stats": batch_stats},
                    batch["image"],
                    train=True,
                    mutable=["batch_stats"],
                    rngs={"dropout": jax.random.key(0)},
                )
            return loss_fn(out, batch)[0], updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), batch_stats, opt_state, loss

    params = variables["params"]
    trainable = jax.tree.map(lambda f, p: None if f else p, mask, params)
    frozen = jax.tree.map(lambda f, p: p if f else None, mask, params)
    args = (trainable, frozen, variables["batch_stats"], tx.init(trainable), batch)
    return jax.jit(step).lower(*args).compile().cost_analysis()["flops"]


def _nnx_ideal_flops(model, spec, batch):
    trainable = lf.nnx_filter(model, spec)
    optimizer = nnx.Optimizer(model, _optimizer(), wrt=trainable)
    lf.nnx_train_mode(model, spec)
    graphdef, state = nnx.split((model, optimizer))

    def step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)

        def objective(model):
            return train.classification_loss(model(batch["image"]), batch)[0]

        grads = nnx.grad(objective, argnums=nnx.DiffState(0, trainable))(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer))

    return jax.jit(step).lower(state, batch).compile().cost_analysis()["flops"]


@pytest.mark.parametrize("kind", list(KINDS))
def test_compiled_flops_equal_the_hand_written_ideal(kind):
    model, steps, state, batch, _ = _build(kind)
    ours = steps.train_step.lower(state, batch).compile().cost_analysis()["flops"]
    _, full_steps, full_state, _, _ = _build(kind, "none")
    full = full_steps.train_step.lower(full_state, batch).compile().cost_analysis()["flops"]
    spec, loss_fn = KINDS[kind][1], KINDS[kind][2] or train.classification_loss
    if isinstance(model, nnx.Module):
        ideal = _nnx_ideal_flops(KINDS[kind][0](), spec, batch)
    else:
        variables = model.init(jax.random.key(0), IMAGES[:2], train=False)
        ideal = _linen_ideal_flops(model, variables, spec, batch, loss_fn)
    print(f"{kind}: ours {ours:.0f}, ideal {ideal:.0f}, all trainable {full:.0f} FLOPs")
    assert abs(ours / ideal - 1) <= 0.01, (ours, ideal)
    assert ours < 0.9 * full, (ours, full)


def test_train_bn_with_batchnorm_the_spec_cannot_name_is_an_error():
    # `norm1` matches no default bn_pattern: training would silently keep its
    # scale frozen while its statistics move; it is an error naming the fix.
    spec = lf.FreezeSpec.parse("encoder", train_bn=True)
    _, steps, state, batch, _ = _build("deep_norm_regression", spec)
    with pytest.raises(
        ValueError, match=r"train_bn=True, but .*'encoder/unit_a/norm1'.*bn_modules"
    ):
        steps.train_step(state, batch)


def test_batchnorm_modules():
    model = DeepNormNet()
    variables = model.init(jax.random.key(0), IMAGES[:2], train=False)
    assert lf.batchnorm_modules(variables) == tuple(
        f"{s}/{u}/norm1" for s in ("encoder", "middle") for u in ("unit_a", "unit_b")
    )
    assert lf.batchnorm_modules(NNXNet(nnx.Rngs(0))) == ("body_bn", "stem_bn")
    with pytest.raises(TypeError, match=r"NNX model or a linen model's variables"):
        lf.batchnorm_modules(variables["params"])


def test_eval_step_of_a_custom_loss_sums_over_batches():
    _, steps, state, batch, _ = _build("deep_norm_regression")
    out = steps.eval_step(state, batch)
    assert float(out["count"]) == 8.0
    assert set(out) == {"loss", "mae", "count"}
    model = DeepNormNet()
    variables = model.init(jax.random.key(0), IMAGES[:2], train=False)
    preds = model.apply(variables, IMAGES, train=False)
    expected = _mse(preds, batch)[0] * 8
    np.testing.assert_allclose(out["loss"], expected, rtol=1e-5)


def test_nnx_eval_step_runs_in_eval_mode_and_leaves_the_model_alone():
    model, steps, state, batch, _ = _build("nnx")
    assert not model.stem_bn.use_running_average  # the user's model is untouched
    out1 = steps.eval_step(state, batch)
    out2 = steps.eval_step(state, batch)
    assert float(out1["loss"]) == float(out2["loss"])  # no dropout, running statistics
    assert float(out1["count"]) == 8.0


@pytest.mark.parametrize("kind", ["flax_example", "nnx"])
def test_steps_that_evaluate_alike_share_one_compiled_eval_step(kind):
    """Two phases of one model (other specs, other optimizers) evaluate with one
    program: the second compiles nothing and gives the same sums."""
    make, spec, _, batch, _ = KINDS[kind]
    model = make()
    if isinstance(model, nnx.Module):
        given, variables, params = model, model, None
    else:
        variables = model.init(jax.random.key(0), IMAGES[:2], train=False)
        given, params = model, variables["params"]

    def steps_for(spec, optimizer, **kw):
        steps = train.make_steps(given, optimizer, spec, params, **kw)
        return steps, steps.init_state(variables, jax.random.key(1))

    full, full_state = steps_for("none", _optimizer())
    frozen, frozen_state = steps_for(spec, optax.sgd(0.1))
    assert frozen.eval_step is full.eval_step
    want = full.eval_step(full_state, batch)
    with platform.CompileCounter() as counter:
        got = frozen.eval_step(frozen_state, batch)  # another optimizer state: not read
    assert counter.requests == 0
    for name in want:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]))
    # Another eval preprocessing evaluates otherwise: its own eval step.
    other, other_state = steps_for(spec, optax.sgd(0.1), preprocess_eval=lambda x: 2 * x)
    assert other.eval_step is not full.eval_step
    assert float(other.eval_step(other_state, batch)["loss"]) != float(want["loss"])


def test_an_eval_step_with_unhashable_eval_kwargs_is_its_own():
    class Scaled(nn.Module):
        @nn.compact
        def __call__(self, x, train=False, scales=(1.0,)):
            return nn.Dense(5)(x.reshape(x.shape[0], -1) * scales[0])

    model = Scaled()
    variables = model.init(jax.random.key(0), IMAGES[:2])
    batch = {"image": IMAGES, "label": LABELS}
    outs = []
    for scales in ([1.0], [2.0]):  # lists: not hashable, not shared
        steps = train.make_steps(
            model, optax.sgd(0.1), "none", variables["params"], eval_kwargs={"scales": scales}
        )
        state = steps.init_state(variables, jax.random.key(0))
        outs.append(float(steps.eval_step(state, batch)["loss"]))
    assert outs[0] != outs[1]


def test_no_model_the_loss_sees_the_params():
    params = {"stem": {"w": jnp.ones((3, 4))}, "head": {"w": jnp.ones((4, 1))}}
    x = R.randn(6, 3).astype(np.float32)
    y = R.randn(6, 1).astype(np.float32)

    def loss_fn(params, batch, rng):
        del rng
        pred = jnp.tanh(batch["x"] @ params["stem"]["w"]) @ params["head"]["w"]
        return jnp.mean((pred - batch["y"]) ** 2)

    steps = train.make_steps(None, _optimizer(), "stem", params, loss_fn=loss_fn)
    state = steps.init_state(params, jax.random.key(0))
    for _ in range(5):
        state, metrics = steps.train_step(state, {"x": x, "y": y})
    np.testing.assert_array_equal(state.params["stem"]["w"], params["stem"]["w"])
    assert not np.array_equal(state.params["head"]["w"], params["head"]["w"])
    assert set(metrics) == {"loss", "grad_norm"}
    assert float(steps.eval_step(state, {"x": x, "y": y})["count"]) == 6.0


def test_inputs_and_kwargs_for_a_model_without_train_argument():
    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="head")(nn.Dense(4, name="stem")(x))

    model = Plain()
    variables = model.init(jax.random.key(0), jnp.ones((1, 2)))
    steps = train.make_steps(
        model,
        optax.sgd(0.1),
        "stem",
        variables["params"],
        inputs=lambda batch: batch["features"],
        train_kwargs={},
        eval_kwargs={},
    )
    state = steps.init_state(variables, jax.random.key(0))
    batch = {"features": np.ones((4, 2), np.float32), "label": np.zeros(4, np.int32)}
    state, metrics = steps.train_step(state, batch)
    assert set(metrics) == {"loss", "accuracy", "grad_norm"}
    assert float(steps.eval_step(state, batch)["count"]) == 4.0


def test_bad_input_is_a_clear_error():
    model = FlaxExampleResNet()
    variables = model.init(jax.random.key(0), IMAGES[:2], train=False)
    batch = {"image": IMAGES, "label": LABELS}

    steps = train.make_steps(
        model, optax.sgd(0.1), "block0", variables["params"], loss_fn=lambda out, b: out
    )
    state = steps.init_state(variables, jax.random.key(0))
    with pytest.raises(ValueError, match=r"loss_fn must return a float scalar.*shape \(8, 5\)"):
        steps.train_step(state, batch)
    with pytest.raises(TypeError, match=r"flax.linen.Module, a flax.nnx.Module or None.*dict"):
        train.make_steps({"params": 1}, optax.sgd(0.1), "none", variables["params"])
    with pytest.raises(ValueError, match=r"NNX model; leave `params` out"):
        train.make_steps(NNXNet(nnx.Rngs(0)), optax.sgd(0.1), "none", variables["params"])
    with pytest.raises(ValueError, match=r"needs `params`"):
        train.make_steps(model, optax.sgd(0.1), "none")
    with pytest.raises(ValueError, match=r"loss_fn\(params, batch, rng\)"):
        train.make_steps(None, optax.sgd(0.1), "none", variables["params"])
    with pytest.raises(TypeError, match=r"init_state takes a linen model's variables"):
        train.make_steps(model, optax.sgd(0.1), "none", variables["params"]).init_state(
            model, jax.random.key(0)
        )


def test_running_stats_rule_matching_no_batchnorm_is_an_error_in_make_steps():
    _, steps, state, batch, _ = _build("flax_example", running_stats="head")
    with pytest.raises(ValueError, match=r"running_stats rule 'head' matches no BatchNorm"):
        steps.train_step(state, batch)
