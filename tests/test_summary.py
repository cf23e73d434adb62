from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import layerfreeze as lf


def _params():
    return {
        "stem": {"kernel": np.zeros((3, 3, 3, 8), np.float32)},
        "stage1": {"kernel": np.zeros((3, 3, 8, 8), np.float32), "scale": np.zeros(8, np.float32)},
        "head": {"kernel": np.zeros((8, 10), np.float32), "bias": np.zeros(10, np.float32)},
    }


def test_counts_and_order():
    s = lf.summary(_params(), "stem,stage1/kernel")
    d = s.as_dict()
    assert list(d["groups"]) == ["stem", "stage1", "head"]
    assert d["groups"]["stem"] == {
        "params": 216,
        "bytes": 864,
        "trainable_params": 0,
        "status": "frozen",
        "opt_state_bytes": None,
    }
    assert d["groups"]["stage1"]["status"] == "partial"
    assert d["groups"]["stage1"]["trainable_params"] == 8
    assert d["total_params"] == 216 + 576 + 8 + 90
    assert d["trainable_params"] == 98
    assert abs(d["trainable_fraction"] - 98 / 890) < 1e-12


def test_opt_state_bytes_and_table():
    params = _params()
    state = lf.freeze(optax.adam(1e-3), "stem,stage1").init(params)
    s = lf.summary(params, "stem,stage1", state)
    assert s.as_dict()["groups"]["head"]["opt_state_bytes"] == 2 * 90 * 4
    assert s.shared_opt_state_bytes == 4  # Adam's int32 step count
    text = str(s)
    assert text.splitlines()[0] == "freeze spec: stem,stage1"
    assert "trainable: 90 of 890 (10.11%), frozen: 800" in text
    assert "(shared)" in text
    head_row = next(line for line in text.splitlines() if line.startswith("head"))
    assert head_row.split() == ["head", "90", "360", "B", "trainable", "720", "B"]


class _CountedState(NamedTuple):
    inner_state: Any
    counts: Any


def _counted_freeze(optimizer, spec):
    """`freeze` with one more level in its trainable branch (per-leaf step counts)."""

    def init(params):
        counts = jax.tree.map(lambda _: jnp.zeros((), jnp.int32), params)
        return _CountedState(optimizer.init(params), counts)

    def update(updates, state, params=None):
        updates, inner = optimizer.update(updates, state.inner_state, params)
        return updates, _CountedState(inner, jax.tree.map(lambda c: c + 1, state.counts))

    branches = {"trainable": optax.GradientTransformation(init, update)}
    return optax.partition({**branches, "frozen": optax.set_to_zero()}, lf.label_fn(spec))


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: _counted_freeze(optax.adam(1e-3), "stem,stage1"),
        lambda: lf.freeze(optax.adam(1e-3), "stem,stage1"),
        lambda: lf.freeze(optax.adam(1e-3), "stem,stage1", method="lr0"),
        lambda: lf.freeze(optax.adafactor(1e-3, min_dim_size_to_factor=8), "stem,stage1"),
        lambda: lf.freeze(optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3), "stem,stage1"),
        lambda: optax.MultiSteps(lf.freeze(optax.sgd(0.1, momentum=0.9), "stem,stage1"), 2),
        lambda: optax.lbfgs(),
        lambda: lf.freeze(optax.sgd(0.1), "stem,stage1"),  # no per-parameter state at all
    ],
    ids=[
        "wrapped-branch",
        "adam",
        "adam-lr0",
        "adafactor",
        "inject-hyperparams",
        "multisteps",
        "lbfgs",
        "sgd",
    ],
)
def test_opt_state_of_many_optimizers_is_accepted(make_tx):
    params = _params()
    state = make_tx().init(params)
    s = lf.summary(params, "stem,stage1", state)
    assert s.opt_state_bytes == sum(np.asarray(x).nbytes for x in jax.tree.leaves(state))


def _other_params():
    params = _params()
    params["head"] = {"kernel": np.zeros((8, 100), np.float32), "bias": np.zeros(100, np.float32)}
    return params


@pytest.mark.parametrize(
    ("opt_state", "error", "hint"),
    [
        ("adam", TypeError, r"an nnx.Optimizer or None; got str\.$"),
        (optax.sgd(0.1), TypeError, r"ExtraArgs whose leaf init is a function"),
        ({"a": np.zeros(3), "b": np.ones((2, 2))}, ValueError, "none of its leaves belongs"),
        (nn.Dense(3), TypeError, r"got Dense\.$"),
        (_params(), ValueError, "is a parameter tree"),
    ],
    ids=["string", "optimizer-not-state", "unrelated-arrays", "model", "params"],
)
def test_summary_rejects_what_is_not_an_optimizer_state(opt_state, error, hint):
    with pytest.raises(error, match=hint):
        lf.summary(_params(), "stem,stage1", opt_state)


def test_summary_rejects_opt_state_of_other_params():
    state = lf.freeze(optax.adam(1e-3), "stem,stage1").init(_other_params())
    with pytest.raises(ValueError, match="does not belong to these params") as info:
        lf.summary(_params(), "stem,stage1", state)
    assert info.match(r"mu/head/kernel has shape \(8, 100\), which parameter head/kernel")
    # A state built for params with one more group than these.
    larger = {**_params(), "extra": {"kernel": np.zeros((2, 2), np.float32)}}
    state = lf.freeze(optax.adam(1e-3), "stem,stage1").init(larger)
    with pytest.raises(ValueError, match="mu/extra/kernel sits among per-parameter state"):
        lf.summary(_params(), "stem,stage1", state)


@pytest.mark.parametrize("method", lf.METHODS)
def test_summary_rejects_opt_state_built_for_another_spec(method):
    params = _params()
    state = lf.freeze(optax.adam(1e-3), "stem", method=method).init(params)
    # stage1 trains in the state's spec but is frozen in the summary's.
    with pytest.raises(ValueError, match="trainable state for stage1/kernel, which this spec"):
        lf.summary(params, "stem,stage1", state)
    if method == "lr0":  # and stem's frozen-branch state contradicts a spec that trains it
        with pytest.raises(ValueError, match="frozen-branch state for stem/kernel"):
            lf.summary(params, "none", state)


def test_summary_rejects_wrapped_state_built_for_another_spec():
    params = _params()
    state = _counted_freeze(optax.adam(1e-3), "stem").init(params)
    lf.summary(params, "stem", state)
    with pytest.raises(ValueError, match=r"inner_state/counts/stage1/kernel is trainable state"):
        lf.summary(params, "stem,stage1", state)


def test_rows_by_a_models_layer_groups():
    from layerfreeze.models import ViT, vit_groups

    model = ViT(num_classes=3, patch_size=4, width=16, depth=3, mlp_dim=32, num_heads=2)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 8, 8, 3))))
    params = shapes["params"]
    groups = vit_groups(3)
    spec = "all-but:Transformer/encoderblock_2,Transformer/encoder_norm,head"
    s = lf.summary(params, spec, groups=groups)
    rows = s.as_dict()["groups"]
    assert list(rows) == list(groups)
    assert rows["Transformer/encoderblock_1"]["trainable_params"] == 0
    block = rows["Transformer/encoderblock_2"]
    assert block["trainable_params"] == block["params"] > 0
    assert s.total_params == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    opt_state = jax.eval_shape(lf.freeze(optax.adam(1e-3), spec).init, params)
    with_state = lf.summary(params, spec, opt_state, groups=groups).as_dict()["groups"]
    assert with_state["Transformer/encoderblock_1"]["opt_state_bytes"] == 0
    assert with_state["Transformer/encoderblock_2"]["opt_state_bytes"] == 2 * 4 * block["params"]
    with pytest.raises(ValueError, match=r"'head/bias' is in none of the groups"):
        lf.summary(params, spec, groups=groups[:-1])
    with pytest.raises(ValueError, match=r"Groups \['stage9'\] cover no parameter"):
        lf.summary(params, spec, groups=[*groups, "stage9"])


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (("params", "stem"), {}, TypeError, r"params must be the parameter pytree .* got str"),
        ((None, "stem"), {}, TypeError, r"params must be the parameter pytree .* got NoneType"),
        ((nn.Dense(3), "stem"), {}, TypeError, r"got the model Dense itself.*\['params'\]"),
        ((optax.adam(0.1), "stem"), {}, TypeError, r"got an optax optimizer .*swapped"),
        ((_params(), optax.adam(0.1)), {}, TypeError, r"spec from an optax optimizer"),
        ((_params(), "stem"), {"order": "stem"}, TypeError, r"order must be a sequence .*str"),
        ((_params(), "stem"), {"groups": [1]}, TypeError, r"non-empty strings, got \[1\]"),
        (({"params": _params(), "batch_stats": {}}, "stem"), {}, ValueError, r"variables\['p"),
    ],
    ids=["string", "none", "model", "optimizer", "spec-optimizer", "order", "groups", "variables"],
)
def test_summary_names_wrong_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        lf.summary(*args, **kwargs)


def test_bytes_by_dtype_line_when_params_mix_dtypes():
    params = _params()
    params["stem"]["kernel"] = params["stem"]["kernel"].astype(jnp.bfloat16)  # as frozen_dtype
    s = lf.summary(params, "stem")
    assert s.as_dict()["bytes_by_dtype"] == {"float32": (576 + 8 + 90) * 4, "bfloat16": 216 * 2}
    assert s.as_dict()["groups"]["stem"]["bytes"] == 432
    assert str(s).splitlines()[-1] == "bytes by dtype: float32 2.6 KiB, bfloat16 432 B"
    # One dtype, one device: the table as before, no extra line.
    plain = lf.summary(_params(), "stem")
    assert plain.as_dict()["bytes_by_dtype"] == {"float32": 890 * 4}
    assert plain.as_dict()["bytes_per_device"] is None
    assert str(plain).splitlines()[-1].startswith("trainable: ")
