import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import layerfreeze as lf
from layerfreeze import _paths, train
from layerfreeze.models import resnet18


def _batch(n=4, size=16, seed=0):
    r = np.random.RandomState(seed)
    return {
        "image": r.randint(0, 255, (n, size, size, 3)).astype(np.uint8),
        "label": r.randint(0, 10, (n,)).astype(np.int32),
    }


def _tiny(**kw):
    return resnet18(10, stem="cifar", width=4, **kw)


def _run(spec, method="zero", steps=3, model=None, optimizer=None):
    model = model or _tiny()
    variables = model.init(jax.random.key(0), jnp.zeros((2, 16, 16, 3)), train=False)
    optimizer = optimizer or optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1)
    )
    s = train.make_steps(model, optimizer, spec, variables["params"], method=method)
    state = s.init_state(variables, jax.random.key(1))
    before = jax.tree.map(np.array, state.as_dict())
    for i in range(steps):
        state, metrics = s.train_step(state, _batch(seed=i))
    return s, before, jax.tree.map(np.array, state.as_dict()), metrics


def _changed(before, after):
    """Maps each leaf path to whether it changed."""
    return {
        path: not np.array_equal(b, a)
        for path, b, a in zip(
            _paths.leaf_paths(before), jax.tree.leaves(before), jax.tree.leaves(after), strict=True
        )
    }


@pytest.mark.parametrize("method", lf.METHODS)
def test_frozen_params_and_batch_stats_bit_identical(method):
    _, before, after, metrics = _run("stem,stage1", method=method)
    for collection in ("params", "batch_stats"):
        for path, changed in _changed(before[collection], after[collection]).items():
            frozen = path.split("/")[0] in ("stem", "stage1")
            assert changed != frozen, f"{collection}/{path} changed={changed}"
    assert set(metrics) == {"loss", "accuracy", "grad_norm"}
    assert np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0


def test_train_bn_trains_batchnorm_inside_frozen_stages():
    spec = lf.FreezeSpec.parse("stem,stage1", train_bn=True)
    _, before, after, _ = _run(spec)
    changed = _changed(before["params"], after["params"])
    assert changed["stage1/Block_0/BatchNorm_0/scale"]
    assert not changed["stage1/Block_0/Conv_0/kernel"]
    assert not changed["stem/Conv_0/kernel"]
    stats = _changed(before["batch_stats"], after["batch_stats"])
    assert stats["stage1/Block_0/BatchNorm_0/mean"]


def test_everything_frozen_but_mlp_head():
    s, before, after, _ = _run("all-but:head", model=_tiny(head="mlp", head_hidden=16))
    changed = _changed(before["params"], after["params"])
    assert all(changed[p] == p.startswith("head/") for p in changed)
    assert not any(_changed(before["batch_stats"], after["batch_stats"]).values())
    assert s.trainable_params == 32 * 16 + 16 + 16 * 10 + 10  # 32 features -> 16 -> 10


def test_mixed_precision_keeps_f32_params():
    model = _tiny(dtype=jnp.bfloat16)
    _, _, after, metrics = _run("stem", model=model)
    assert {leaf.dtype for leaf in jax.tree.leaves(after["params"])} == {np.dtype("float32")}
    assert np.isfinite(metrics["loss"])


def test_eval_step_counts_masked_examples():
    model = _tiny()
    variables = model.init(jax.random.key(0), jnp.zeros((2, 16, 16, 3)), train=False)
    s = train.make_steps(model, optax.sgd(0.1), "none", variables["params"])
    state = s.init_state(variables, jax.random.key(0))
    batch = dict(_batch(), mask=np.array([1, 1, 0, 0], np.float32))
    out = s.eval_step(state, batch)
    assert float(out["count"]) == 2.0
    assert 0 <= float(out["correct"]) <= 2


def test_nnx_model_with_same_spec():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.stem = nnx.Linear(4, 8, rngs=rngs)
            self.stage1 = nnx.Linear(8, 8, rngs=rngs)
            self.head = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.head(nnx.relu(self.stage1(nnx.relu(self.stem(x)))))

    model = Net(nnx.Rngs(0))
    before = jax.tree.map(np.array, nnx.state(model, nnx.Param))
    tx = lf.freeze(optax.adamw(1e-2, weight_decay=0.1), "stem,stage1")
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        grads = nnx.grad(loss_fn)(model)
        optimizer.update(model, grads)

    x = jax.random.normal(jax.random.key(0), (16, 4))
    y = jnp.arange(16) % 3
    for _ in range(5):
        step(model, optimizer, x, y)
    after = jax.tree.map(np.array, nnx.state(model, nnx.Param))
    for path, changed in _changed(before, after).items():
        assert changed == path.startswith("head/"), path


# --- Compiled cost of a CIFAR ResNet-18, batch 32 (deterministic, no timing) ---

FROZEN = ("stem", "stage1", "stage2")


@pytest.fixture(scope="module")
def resnet18_shapes():
    model = resnet18(10, stem="cifar")
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    batch = {
        "image": jax.ShapeDtypeStruct((32, 32, 32, 3), jnp.uint8),
        "label": jax.ShapeDtypeStruct((32,), jnp.int32),
    }
    return model, variables, batch


def _compile_project_step(model, variables, batch, spec, optimizer, grad_norm=True):
    s = train.make_steps(model, optimizer, spec, variables["params"], grad_norm=grad_norm)
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), variables)
    state = jax.eval_shape(lambda: s.init_state(zeros, jax.random.key(0)))
    return s.train_step.lower(state, batch).compile()


def _compile_ideal_step(model, variables, batch, frozen_groups):
    """A hand-written step: gradient and Adam over the trainable groups only."""
    tx = optax.adamw(1e-3, weight_decay=1e-4)

    def step(trainable, frozen, batch_stats, opt_state, batch):
        def loss_fn(trainable):
            params = {**trainable, **frozen}
            with lf.frozen_batchnorm(params, ",".join(frozen_groups) or "none"):
                logits, updates = model.apply(
                    {"params": params, "batch_stats": batch_stats},
                    batch["image"].astype(jnp.float32),
                    train=True,
                    mutable=["batch_stats"],
                )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
            return loss.mean(), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), batch_stats, opt_state, loss

    params = variables["params"]
    trainable = {k: v for k, v in params.items() if k not in frozen_groups}
    frozen = {k: v for k, v in params.items() if k in frozen_groups}
    opt_state = jax.eval_shape(tx.init, trainable)
    return (
        jax.jit(step, donate_argnums=(0, 3))
        .lower(trainable, frozen, variables["batch_stats"], opt_state, batch)
        .compile()
    )


# MultiSteps around clip + AdamW: accumulation, clipping and weight decay in one step.
OPTIMIZERS = {
    "multisteps": lambda: optax.MultiSteps(
        optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=1e-4)), 4
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_compiled_cost_matches_ideal_step(resnet18_shapes, opt):
    model, variables, batch = resnet18_shapes
    full = _compile_project_step(model, variables, batch, "none", OPTIMIZERS[opt]())
    frozen = _compile_project_step(model, variables, batch, ",".join(FROZEN), OPTIMIZERS[opt]())
    ideal = _compile_ideal_step(model, variables, batch, FROZEN)
    flops = {
        k: c.cost_analysis()["flops"]
        for k, c in [("full", full), ("frozen", frozen), ("ideal", ideal)]
    }
    print(json.dumps(flops))
    assert abs(flops["frozen"] / flops["ideal"] - 1) <= 0.01, flops
    assert flops["frozen"] <= 0.65 * flops["full"], flops
    assert frozen.memory_analysis().temp_size_in_bytes < full.memory_analysis().temp_size_in_bytes


def test_options_as_one_object_or_as_keywords_build_the_same_steps():
    params = {"stem": {"w": jnp.ones(3)}, "head": {"w": jnp.ones(3)}}
    batch = {"x": jnp.arange(3.0)}

    def loss_fn(p, b, rng):
        return jnp.sum(p["stem"]["w"] * p["head"]["w"] * b["x"])

    options = train.StepOptions(loss_fn=loss_fn, grad_norm=False, method="lr0")
    by_object = train.make_steps(None, optax.sgd(0.1), "stem", params, options=options)
    by_keywords = train.make_steps(
        None, optax.sgd(0.1), "stem", params, loss_fn=loss_fn, grad_norm=False, method="lr0"
    )
    # A keyword replaces the object's field.
    zero = train.make_steps(None, optax.sgd(0.1), "stem", params, options=options, method="zero")
    assert (by_object.method, by_keywords.method, zero.method) == ("lr0", "lr0", "zero")
    results = []
    for steps in (by_object, by_keywords):
        state, metrics = steps.train_step(steps.init_state(params, jax.random.key(0)), batch)
        results.append((state.params, metrics))
    assert "grad_norm" not in results[0][1]
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError, match=r"unknown option\(s\) 'lr'; valid options: loss_fn, "):
        train.make_steps(None, optax.sgd(0.1), "stem", params, loss_fn=loss_fn, lr=0.1)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"loss_fn": "mse"}, r"option loss_fn must be a function .*got str 'mse'"),
        ({"preprocess": "normalize"}, r"option preprocess must be a function .*got str"),
        ({"inputs": 3}, r"option inputs must be the batch key .*got int 3"),
        ({"train_kwargs": True}, r"option train_kwargs must be a dict .*got bool True"),
        ({"grad_norm": "yes"}, r"option grad_norm must be True or False, got str 'yes'"),
    ],
)
def test_options_of_the_wrong_type_fail_when_given(fields, match):
    params = {"w": jnp.ones(2)}
    with pytest.raises(TypeError, match=match):
        train.make_steps(None, optax.sgd(0.1), "none", params, **fields)
    with pytest.raises(TypeError, match=match):
        train.StepOptions(**fields)
