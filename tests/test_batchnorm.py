"""`layerfreeze.frozen_batchnorm`: linen BatchNorm frozen by type, per module, at any depth."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from zoo import DeepNormNet, FlaxExampleResNet

import layerfreeze as lf
from layerfreeze import _paths

X = jnp.asarray(np.random.RandomState(0).randn(4, 8, 8, 3), jnp.float32)


def _init(model, **kw):
    return model.init(jax.random.key(0), X, **kw)


def _changed_stats(model, variables, spec, **kw):
    """Maps each batch_stats leaf path to whether one training-mode apply changed it."""
    with lf.frozen_batchnorm(variables["params"], spec, **kw) as policy:
        _, updates = model.apply(
            variables, X, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)}, **CALL
        )
    before, after = variables["batch_stats"], updates["batch_stats"]
    changed = {
        path: not np.array_equal(b, a)
        for path, b, a in zip(
            _paths.leaf_paths(before), jax.tree.leaves(before), jax.tree.leaves(after), strict=True
        )
    }
    return changed, policy


CALL: dict = {}


@pytest.fixture(autouse=True)
def _call_kwargs():
    CALL.clear()
    yield


def test_flax_example_model_batchnorm_fixed_at_construction():
    model = FlaxExampleResNet()
    variables = _init(model, train=False)
    changed, policy = _changed_stats(model, variables, "conv_init,bn_init,block0")
    for path, c in changed.items():
        frozen = path.startswith(("bn_init/", "block0/"))
        assert c != frozen, path
    assert policy.seen["block0/BatchNorm_0"] and not policy.seen["block1/BatchNorm_0"]
    # The model's own modules are left as they were: a later apply trains again.
    changed_again, _ = _changed_stats(model, variables, "none")
    assert all(changed_again.values())


def test_deep_subclassed_norm_with_positional_mode():
    model = DeepNormNet()
    CALL["train"] = True
    variables = _init(model, train=False)
    changed, policy = _changed_stats(model, variables, "encoder")
    assert set(policy.seen) == {
        f"{stage}/{unit}/norm1" for stage in ("encoder", "middle") for unit in ("unit_a", "unit_b")
    }
    for path, c in changed.items():
        assert c != path.startswith("encoder/"), path


@pytest.mark.parametrize(
    ("spec", "frozen_norms"),
    [
        ("encoder/unit_a", {"encoder/unit_a/norm1"}),
        # The layer's own scale and bias decide; a frozen conv beside it does not.
        ("encoder/unit_a/conv", set()),
        (
            "*/norm1/*",
            {
                "encoder/unit_a/norm1",
                "encoder/unit_b/norm1",
                "middle/unit_a/norm1",
                "middle/unit_b/norm1",
            },
        ),
        # Half of a layer's parameters frozen: it still trains its statistics.
        ("encoder/unit_b/norm1/scale", set()),
    ],
)
def test_decided_per_batchnorm_module(spec, frozen_norms):
    model = DeepNormNet()
    CALL["train"] = True
    variables = _init(model, train=False)
    changed, policy = _changed_stats(model, variables, spec)
    assert {p for p, f in policy.seen.items() if f} == frozen_norms
    for path, c in changed.items():
        assert c != (path.rsplit("/", 1)[0] in frozen_norms), path


def test_train_bn_keeps_every_batchnorm_training():
    model = FlaxExampleResNet()
    variables = _init(model, train=False)
    spec = lf.FreezeSpec.parse("all", train_bn=True)
    # `bn_init` is no name the default bn_pattern knows: found by type instead.
    with pytest.raises(ValueError, match=r"train_bn=True, but the BatchNorm layer 'bn_init'"):
        _changed_stats(model, variables, spec)
    spec = spec.replace(bn_modules=lf.batchnorm_modules(variables))
    changed, policy = _changed_stats(model, variables, spec)
    assert all(changed.values()) and not any(policy.seen.values())


def test_running_stats_overrides_the_spec():
    model = FlaxExampleResNet()
    variables = _init(model, train=False)
    # Frozen parameters, statistics still updating.
    changed, _ = _changed_stats(model, variables, "all", running_stats="none")
    assert all(changed.values())
    # Nothing frozen, yet the block0 layers run on running statistics.
    changed, _ = _changed_stats(model, variables, "none", running_stats="block0")
    for path, c in changed.items():
        assert c != path.startswith("block0/"), path


def test_running_stats_rule_matching_no_batchnorm_is_an_error():
    model = FlaxExampleResNet()
    variables = _init(model, train=False)
    with pytest.raises(
        ValueError, match=r"running_stats rule 'head' matches no BatchNorm.*bn_init"
    ):
        _changed_stats(model, variables, "none", running_stats="head,block0")


def test_frozen_batchnorm_without_batch_stats_is_a_clear_error():
    model = FlaxExampleResNet()
    variables = _init(model, train=False)
    with (
        pytest.raises(ValueError, match=r"BatchNorm 'bn_init' is frozen.*no 'batch_stats'"),
        lf.frozen_batchnorm(variables["params"], "bn_init"),
    ):
        model.apply({"params": variables["params"]}, X, mutable=["batch_stats"])


def test_batchnorm_without_scale_and_bias_follows_the_rule_of_its_path():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = True):
            x = nn.Conv(4, (3, 3), name="stem")(x)
            x = nn.BatchNorm(not train, use_scale=False, use_bias=False, name="stem_norm")(x)
            return nn.Dense(2, name="head")(x.mean((1, 2)))

    model = Net()
    variables = _init(model, train=False)
    changed, policy = _changed_stats(model, variables, "re:stem.*")
    assert policy.seen == {"stem_norm": True} and not any(changed.values())
    changed, policy = _changed_stats(model, variables, "stem")
    assert policy.seen == {"stem_norm": False} and all(changed.values())


def test_works_inside_jit_and_matches_eval_mode_when_all_frozen():
    model = FlaxExampleResNet()
    variables = _init(model, train=False)

    @jax.jit
    def train_mode(variables):
        with lf.frozen_batchnorm(variables["params"], "all"):
            return model.apply(variables, X, mutable=["batch_stats"])[0]

    np.testing.assert_array_equal(train_mode(variables), model.apply(variables, X, train=False))
