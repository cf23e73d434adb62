"""Tests for layerfreeze.models.resnet: grouping, naming, BatchNorm freezing, heads, dtypes."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import layerfreeze as lf
from layerfreeze.models import (
    GROUPS,
    MODEL_NAMES,
    ResNet,
    create_model,
    resnet18,
    resnet50,
)

# Tiny nets keep the whole file fast on two CPU cores.
TINY = dict(stem="cifar", width=8)
X = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))


def _tiny(**kw) -> ResNet:
    return ResNet(**{"stage_sizes": (1, 1, 1, 1), "num_classes": 5, **TINY, **kw})


# model.init compiles one XLA program of random initialisers per model (seconds on a busy
# CPU), so only test_init_groups_and_dtypes calls it; the other tests read structure from
# jax.eval_shape and run on variables of that structure filled from a seeded numpy rng.
BASIC = _tiny()
BOTTLENECK_MLP = _tiny(block="bottleneck", head="mlp", head_hidden=32)


@functools.cache
def _init(model: ResNet):
    shapes = _shapes(model)
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = np.prod(leaf.shape[:-1])
            value = rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, size=leaf.shape)
        else:
            value = rng.normal(scale=0.1, size=leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree.map_with_path(fill, shapes)


def _shapes(model: ResNet):
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), X)


@functools.partial(
    jax.jit,
    static_argnums=0,
    static_argnames=("train", "freeze", "mutable", "capture_intermediates"),
)
def _apply(model: ResNet, variables, x, freeze=None, **kw):
    # One compiled program per configuration is much cheaper than op-by-op dispatch.
    if freeze is None:
        return model.apply(variables, x, **kw)
    with lf.frozen_batchnorm(variables["params"], freeze):
        return model.apply(variables, x, **kw)


def _paths(tree) -> set[str]:
    return set(traverse_util.flatten_dict(tree, sep="/"))


def test_init_groups_and_dtypes():
    variables = jax.jit(functools.partial(BASIC.init, train=False))(jax.random.key(0), X)
    assert set(variables) == {"params", "batch_stats"}
    assert set(variables["params"]) == set(GROUPS)
    assert set(variables["batch_stats"]) == set(GROUPS) - {"head"}
    assert jax.tree.structure(variables) == jax.tree.structure(_shapes(BASIC))
    for leaf in jax.tree.leaves(variables):
        assert leaf.dtype == jnp.float32


@pytest.mark.parametrize("head", ["linear", "mlp"])
@pytest.mark.parametrize("block", ["basic", "bottleneck"])
@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_top_level_groups(stem, block, head):
    variables = _shapes(_tiny(stem=stem, block=block, head=head))
    assert set(variables) == {"params", "batch_stats"}
    assert set(variables["params"]) == set(GROUPS)
    assert set(variables["batch_stats"]) == set(GROUPS) - {"head"}


def test_basic_block_paths():
    variables = _shapes(resnet18(5, **TINY))
    params = _paths(variables["params"])
    stem_and_head = {
        "stem/Conv_0/kernel",
        "stem/BatchNorm_0/scale",
        "stem/BatchNorm_0/bias",
        "head/Dense_0/kernel",
        "head/Dense_0/bias",
    }
    assert {p for p in params if p.startswith(("stem/", "head/"))} == stem_and_head
    stage1_block0 = {p for p in params if p.startswith("stage1/Block_0/")}
    assert stage1_block0 == {
        "stage1/Block_0/Conv_0/kernel",
        "stage1/Block_0/BatchNorm_0/scale",
        "stage1/Block_0/BatchNorm_0/bias",
        "stage1/Block_0/Conv_1/kernel",
        "stage1/Block_0/BatchNorm_1/scale",
        "stage1/Block_0/BatchNorm_1/bias",
    }
    # Only the first block of a downsampling stage has a projection shortcut.
    assert "stage2/Block_0/Downsample_Conv/kernel" in params
    assert "stage2/Block_0/Downsample_BatchNorm/scale" in params
    assert not any("Downsample" in p for p in params if p.startswith("stage2/Block_1"))
    assert variables["params"]["stage2"]["Block_0"]["Conv_0"]["kernel"].shape == (3, 3, 8, 16)
    stats = _paths(variables["batch_stats"])
    assert "stage2/Block_0/Downsample_BatchNorm/mean" in stats
    assert "stem/BatchNorm_0/var" in stats
    assert {p.split("/")[1] for p in params if p.startswith("stage3/")} == {"Block_0", "Block_1"}


def test_bottleneck_paths_and_shapes():
    variables = _shapes(_tiny(block="bottleneck"))
    block = variables["params"]["stage1"]["Block_0"]
    assert set(block) == {
        "Conv_0",
        "BatchNorm_0",
        "Conv_1",
        "BatchNorm_1",
        "Conv_2",
        "BatchNorm_2",
        "Downsample_Conv",
        "Downsample_BatchNorm",
    }
    assert block["Conv_0"]["kernel"].shape == (1, 1, 8, 8)
    assert block["Conv_1"]["kernel"].shape == (3, 3, 8, 8)
    assert block["Conv_2"]["kernel"].shape == (1, 1, 8, 32)
    assert variables["params"]["head"]["Dense_0"]["kernel"].shape == (256, 5)


def test_mlp_head_paths():
    params = _shapes(_tiny(head="mlp", head_hidden=7))["params"]["head"]
    assert set(params) == {"Dense_0", "Dense_1"}
    assert params["Dense_0"]["kernel"].shape == (64, 7)
    assert params["Dense_1"]["kernel"].shape == (7, 5)


@pytest.mark.parametrize(
    ("name", "count"),
    [("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032)],
)
def test_param_count_matches_torchvision(name, count):
    model = create_model(name, num_classes=1000)
    init = functools.partial(model.init, train=False)
    shapes = jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    assert sum(leaf.size for leaf in jax.tree.leaves(shapes["params"])) == count


@pytest.mark.parametrize(
    ("stem", "size", "feature_size"), [("cifar", 32, 4), ("imagenet", 64, 2), ("imagenet", 65, 3)]
)
def test_stem_output_shapes(stem, size, feature_size):
    model = _tiny(stem=stem)
    init = functools.partial(model.init, train=False)
    x = jnp.zeros((3, size, size, 3))
    shapes = jax.eval_shape(init, jax.random.key(0), x)
    out = jax.eval_shape(functools.partial(model.apply, train=False), shapes, x)
    assert out.shape == (3, 5)
    assert out.dtype == jnp.float32

    def features(variables, x):
        _, state = model.apply(
            variables, x, train=False, capture_intermediates=True, mutable=("intermediates",)
        )
        return state["intermediates"]["stage4"]["__call__"][0]

    assert jax.eval_shape(features, shapes, x).shape == (3, feature_size, feature_size, 64)


def test_logits_shape_and_eval_is_deterministic():
    model = BASIC
    variables = _init(model)
    a = _apply(model, variables, X, train=False)
    b = _apply(model, variables, X, train=False)
    assert a.shape == (2, 5)
    np.testing.assert_array_equal(a, b)


def _stats_by_group(before, after):
    changed = {}
    for group in GROUPS[:-1]:
        leaves = zip(jax.tree.leaves(before[group]), jax.tree.leaves(after[group]), strict=True)
        changed[group] = any(not np.array_equal(x, y) for x, y in leaves)
    return changed


@pytest.mark.parametrize("frozen", [("stem", "stage1"), ("stage3", "head"), ()])
def test_frozen_batchnorm_keeps_batch_stats_bit_identical(frozen):
    model = BASIC
    variables = _init(model)
    spec = ",".join(frozen) or "none"
    _, updates = _apply(model, variables, X, freeze=spec, train=True, mutable=("batch_stats",))
    before, after = variables["batch_stats"], updates["batch_stats"]
    assert jax.tree.structure(before) == jax.tree.structure(after)
    for group in set(frozen) - {"head"}:
        for x, y in zip(jax.tree.leaves(before[group]), jax.tree.leaves(after[group]), strict=True):
            np.testing.assert_array_equal(x, y)
    changed = _stats_by_group(before, after)
    assert changed == {group: group not in frozen for group in GROUPS[:-1]}


def test_frozen_batchnorm_uses_running_stats_in_frozen_groups():
    # With every group frozen, a training-mode pass is the eval-mode pass.
    model = BASIC
    variables = _init(model)
    train, _ = _apply(model, variables, X, freeze="all", train=True, mutable=("batch_stats",))
    np.testing.assert_array_equal(train, _apply(model, variables, X, train=False))


def test_eval_mode_batch_stats_unchanged():
    model = BASIC
    variables = _init(model)
    _, updates = _apply(model, variables, X, train=False, mutable=("batch_stats",))
    for x, y in zip(
        jax.tree.leaves(variables["batch_stats"]),
        jax.tree.leaves(updates["batch_stats"]),
        strict=True,
    ):
        np.testing.assert_array_equal(x, y)


def test_create_model_names():
    assert MODEL_NAMES == ("resnet10", "resnet18", "resnet34", "resnet50")
    for name in MODEL_NAMES:
        model = create_model(name, num_classes=3, stem="cifar")
        assert (model.num_classes, model.stem) == (3, "cifar")
    assert create_model("resnet50", num_classes=3).block == "bottleneck"
    assert resnet50(3).stage_sizes == (3, 4, 6, 3)
    assert create_model("resnet10", num_classes=3).stage_sizes == (1, 1, 1, 1)


def test_stage_sizes_list_is_stored_as_tuple():
    # Hashable, so the module can be a static argument of jax.jit.
    model = _tiny(stage_sizes=[1, 1, 1, 1])
    assert model.stage_sizes == (1, 1, 1, 1)
    assert hash(model) == hash(BASIC)


def test_create_model_unknown_name():
    with pytest.raises(
        ValueError, match=r"'resnet101'.*\['resnet10', 'resnet18', 'resnet34', 'resnet50'\]"
    ):
        create_model("resnet101", num_classes=10)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(stem="tiny"), r"stem 'tiny'.*\['cifar', 'imagenet'\]"),
        (dict(head="conv"), r"head 'conv'.*\['linear', 'mlp'\]"),
        (dict(block="wide"), r"block 'wide'.*\['basic', 'bottleneck'\]"),
        (dict(stage_sizes=(1, 1, 1)), r"stage_sizes must be 4 positive"),
        (dict(head_dropout=1.0), r"head_dropout"),
    ],
)
def test_invalid_attributes(kw, match):
    with pytest.raises(ValueError, match=match):
        _tiny(**kw)


def test_mlp_head_dropout():
    model = BOTTLENECK_MLP
    variables = _init(model)

    def train(seed):
        logits, _ = _apply(
            model,
            variables,
            X,
            train=True,
            freeze="all",  # Isolate dropout: BN behaves as in eval.
            rngs={"dropout": jax.random.key(seed)},
            mutable=("batch_stats",),
        )
        return logits

    eval_logits = _apply(model, variables, X, train=False)
    assert not np.array_equal(train(0), eval_logits)
    assert not np.array_equal(train(0), train(1))
    np.testing.assert_array_equal(train(0), train(0))
    with pytest.raises(flax.errors.InvalidRngError, match="dropout"):
        _apply(model, variables, X, train=True, mutable=("batch_stats",))
    # Eval mode needs no dropout rng.
    np.testing.assert_array_equal(eval_logits, _apply(model, variables, X, train=False))


def test_linear_head_train_needs_no_rng():
    model = BASIC
    logits, _ = _apply(model, _init(model), X, train=True, mutable=("batch_stats",))
    assert logits.shape == (2, 5)


@pytest.mark.parametrize("f32_model", [BASIC, BOTTLENECK_MLP], ids=["basic", "bottleneck_mlp"])
def test_bfloat16_params_and_stats_stay_float32(f32_model):
    model = f32_model.clone(dtype=jnp.bfloat16)
    shapes = _shapes(model)
    assert jax.tree.structure(shapes) == jax.tree.structure(_shapes(f32_model))
    for leaf in jax.tree.leaves(shapes):
        assert leaf.dtype == jnp.float32
    train = functools.partial(model.apply, train=True, mutable=["batch_stats"])
    logits, updates = jax.eval_shape(train, shapes, X, rngs={"dropout": jax.random.key(0)})
    assert logits.dtype == jnp.float32
    for leaf in jax.tree.leaves(updates):
        assert leaf.dtype == jnp.float32


def test_bfloat16_runs():
    # Compiling bfloat16 convolutions is slow on CPU, so only the basic net runs.
    model = BASIC.clone(dtype=jnp.bfloat16)
    variables = _init(BASIC)  # Same architecture, so the float32 variables fit.
    logits, updates = _apply(model, variables, X, train=True, mutable=("batch_stats",))
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    for leaf in jax.tree.leaves(updates):
        assert leaf.dtype == jnp.float32

    logits, state = _apply(
        model, variables, X, train=False, capture_intermediates=True, mutable=("intermediates",)
    )
    # The convolutions really run in bfloat16, and the logits stay close to float32's.
    assert state["intermediates"]["stage1"]["__call__"][0].dtype == jnp.bfloat16
    reference = _apply(BASIC, variables, X, train=False)
    np.testing.assert_allclose(logits, reference, rtol=0.1, atol=0.1 * np.abs(reference).max())
