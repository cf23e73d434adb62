"""`layerfreeze.plan`: one resolved plan per phase, shared by every piece that freezes."""

import collections

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import FrozenDict

import layerfreeze as lf
from layerfreeze import _plan, train


class _Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return h + nn.Dense(8, name="tokens")(nn.LayerNorm(name="norm")(h)), None


class Mixer(nn.Module):
    """A model the library has not seen: an embedding, stacked blocks via nn.scan, a head."""

    depth: int = 4

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(8, name="embed")(x)
        blocks = nn.scan(
            _Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.depth
        )
        x, _ = blocks(name="blocks")(x, None)
        return nn.Dense(3, name="head")(x.mean(axis=1))


@pytest.fixture(scope="module")
def mixer():
    model = Mixer()
    params = model.init(jax.random.key(0), jnp.zeros((1, 5, 4)))["params"]
    return model, params


def test_same_inputs_give_the_same_plan_and_each_spec_resolves_once(mixer, monkeypatch):
    model, params = mixer
    calls = []
    resolve_blocks = lf.FreezeSpec.resolve_blocks

    def counted(self, tree):
        calls.append(self.describe())
        return resolve_blocks(self, tree)

    monkeypatch.setattr(lf.FreezeSpec, "resolve_blocks", counted)
    # Start from empty caches: other tests in this process may have resolved these specs.
    monkeypatch.setattr(_plan, "_plans", collections.OrderedDict())
    monkeypatch.setattr(_plan, "_resolutions", collections.OrderedDict())
    spec = lf.FreezeSpec.parse("embed,blocks[:2]", default="trainable")
    schedule = lf.schedules.explicit({0: spec, 2: "embed"}, unit="step")

    def build(phase, previous):
        return train.make_steps(
            model, optax.adam(1e-2), phase.spec, params, inputs="x",
            loss_fn=lambda out, b: jnp.mean((out - b["y"]) ** 2), previous=previous,
        )  # fmt: skip

    phases = train.Phases(schedule, build, params=params)
    state = phases.init_state({"params": params}, jax.random.key(0))
    batch = {"x": np.ones((2, 5, 4), np.float32), "y": np.zeros((2, 3), np.float32)}
    for step in range(3):
        steps, state, _ = phases.update(step, state)
        state, _ = steps.train_step(state, batch)
    lf.summary(params, phases.plan(1), state.opt_state)
    # Two phases, two specs, each resolved once: by Phases' check, reused by the
    # optimizer, the gradient, the BatchNorm policy, the counts and the summary.
    assert sorted(calls) == sorted({spec.describe(), "embed"})
    assert phases.steps(1).plan is phases.plan(1)
    assert lf.plan(params, "embed", previous=[spec]) is phases.plan(1)


def test_plan_answers_per_leaf_and_per_block(mixer):
    _, params = mixer
    p = lf.plan(params, lf.FreezeSpec.parse("embed,blocks[:3]", default="trainable"))
    frozen = dict(zip(p.paths, p.frozen, strict=True))
    assert frozen["embed/kernel"] is True and frozen["head/kernel"] is False
    assert frozen["blocks/tokens/kernel"] == (True, True, True, False)
    sizes = {path: int(np.prod(np.shape(x))) for path, x in zip(
        p.paths, jax.tree.leaves(params), strict=True)}  # fmt: skip
    stacked = sum(s for path, s in sizes.items() if path.startswith("blocks/"))
    assert p.trainable_params == stacked // 4 + sizes["head/kernel"] + sizes["head/bias"]
    assert p.trainable_params == lf.summary(params, p).trainable_params
    assert p.resolved["blocks/tokens/kernel"] is False  # partly frozen counts as trainable
    with pytest.raises(ValueError, match="some blocks of the stacked leaves"):
        lf.frozen_mask(params, p)


def test_freeze_with_a_plan_equals_freeze_with_its_spec_and_history(mixer):
    _, params = mixer
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
    by_plan = lf.freeze(optax.adam(0.1), lf.plan(params, "none", previous=["embed,blocks[:2]"]))
    by_spec = lf.freeze(optax.adam(0.1), "none", previous=["embed,blocks[:2]"])
    a = by_plan.update(grads, by_plan.init(params), params)
    b = by_spec.update(grads, by_spec.init(params), params)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_a_plan_refuses_other_params_and_conflicting_arguments(mixer):
    _, params = mixer
    p = lf.plan(params, "embed")
    other = {**params, "extra": {"w": jnp.ones(2)}}
    with pytest.raises(
        ValueError, match=r"do not fit this freeze plan.*not in the plan: \['extra/w'\]"
    ):
        lf.freeze(optax.sgd(0.1), p).init(other)
    with pytest.raises(ValueError, match=r"other shapes: \['head/bias \(4,\) \(plan: \(3,\)\)'\]"):
        lf.value_and_grad(lambda q: 0.0, p)(
            {**params, "head": {**params["head"], "bias": jnp.ones(4)}}
        )
    with pytest.raises(ValueError, match="carries its own history"):
        lf.freeze(optax.sgd(0.1), p, previous=["head"])
    with pytest.raises(ValueError, match=r"method='lr0'\) with a plan built for method 'zero'"):
        lf.freeze(optax.sgd(0.1), p, method="lr0")


def test_plan_keeps_containers_and_takes_frozen_dicts(mixer):
    _, params = mixer
    frozen_dict = FrozenDict(params)
    mask = lf.frozen_mask(frozen_dict, lf.plan(frozen_dict, "embed,blocks"))
    assert isinstance(mask, FrozenDict)
    assert mask["embed"]["kernel"] is True and mask["head"]["kernel"] is False
    # A plan for a dict does not fit a FrozenDict of the same leaves.
    with pytest.raises(ValueError, match="other containers"):
        lf.plan(frozen_dict, lf.plan(params, "embed"))


def test_value_and_grad_with_a_plan_is_the_spec_version(mixer):
    model, params = mixer
    x = jnp.ones((2, 5, 4))

    def loss(p):
        return jnp.mean(model.apply({"params": p}, x) ** 2)

    spec = lf.FreezeSpec.parse("blocks[1:]", default="trainable")
    v1, g1 = lf.value_and_grad(loss, lf.plan(params, spec))(params)
    v2, g2 = lf.value_and_grad(loss, spec)(params)
    assert v1 == v2
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.any(g1["blocks"]["tokens"]["kernel"][1:])
    assert np.any(g1["blocks"]["tokens"]["kernel"][0])


def test_frozen_bn_groups_follow_spec():
    params = {
        "stem": {"Conv_0": {"kernel": 1}, "BatchNorm_0": {"scale": 1, "bias": 1}},
        "stage1": {"Conv_0": {"kernel": 1}, "BatchNorm_0": {"scale": 1, "bias": 1}},
        "head": {"kernel": 1},
    }
    assert lf.plan(params, "stem").frozen_bn_groups == {"stem"}
    assert lf.plan(params, "stem,stage1/Conv_0").frozen_bn_groups == {"stem"}
    assert lf.plan(params, "all").frozen_bn_groups == {"stem", "stage1", "head"}
    assert lf.plan(params, lf.FreezeSpec.parse("all", train_bn=True)).frozen_bn_groups == set()


@pytest.mark.parametrize(
    ("params", "kwargs", "error", "match"),
    [
        ("params", {}, TypeError, r"params must be the parameter pytree .*got str 'params'"),
        (None, {}, TypeError, r"params must be the parameter pytree .*got NoneType None"),
        ({"stem": {"w": jnp.ones(2)}}, {"method": "adam"}, ValueError, r"method 'adam'; valid"),
    ],
    ids=["string", "none", "method"],
)
def test_plan_names_wrong_arguments(params, kwargs, error, match):
    with pytest.raises(error, match=match):
        lf.plan(params, "none", **kwargs)
