"""Tests for layerfreeze.models.vit: big_vision names, pooling, scan, groups, freezing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import layerfreeze as lf
from layerfreeze.models import (
    POOLS,
    VIT_NAMES,
    ViT,
    create_vit,
    stack_blocks,
    unstack_blocks,
    vit,
    vit_groups,
)
from layerfreeze.train import make_steps

# Tiny ViTs keep the file fast on two CPU cores: 16 tokens of width 32.
TINY = dict(num_classes=5, patch_size=4, width=32, depth=3, mlp_dim=64, num_heads=2)
X = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))


def _tiny(**kw) -> ViT:
    return ViT(**{**TINY, **kw})


def _shapes(model: ViT, x=X):
    return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


@functools.cache
def _params(model: ViT):
    """Seeded random values of the model's structure (a zero head would hide the body)."""
    rng = np.random.default_rng(0)

    def fill(leaf):
        return jnp.asarray(rng.normal(scale=0.2, size=leaf.shape), leaf.dtype)

    return jax.tree.map(fill, _shapes(model))


def _flat_shapes(params):
    return {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(params).items()}


def test_big_vision_names_and_shapes():
    shapes = _flat_shapes(_shapes(_tiny(depth=2)))
    block = {
        "LayerNorm_0/scale": (32,),
        "LayerNorm_0/bias": (32,),
        "MultiHeadDotProductAttention_1/query/kernel": (32, 2, 16),
        "MultiHeadDotProductAttention_1/query/bias": (2, 16),
        "MultiHeadDotProductAttention_1/key/kernel": (32, 2, 16),
        "MultiHeadDotProductAttention_1/key/bias": (2, 16),
        "MultiHeadDotProductAttention_1/value/kernel": (32, 2, 16),
        "MultiHeadDotProductAttention_1/value/bias": (2, 16),
        "MultiHeadDotProductAttention_1/out/kernel": (2, 16, 32),
        "MultiHeadDotProductAttention_1/out/bias": (32,),
        "LayerNorm_2/scale": (32,),
        "LayerNorm_2/bias": (32,),
        "MlpBlock_3/Dense_0/kernel": (32, 64),
        "MlpBlock_3/Dense_0/bias": (64,),
        "MlpBlock_3/Dense_1/kernel": (64, 32),
        "MlpBlock_3/Dense_1/bias": (32,),
    }
    expected = {
        "embedding/kernel": (4, 4, 3, 32),
        "embedding/bias": (32,),
        "pos_embedding": (1, 16, 32),
        "cls": (1, 1, 32),
        **{f"Transformer/encoderblock_{i}/{k}": v for i in range(2) for k, v in block.items()},
        "Transformer/encoder_norm/scale": (32,),
        "Transformer/encoder_norm/bias": (32,),
        "head/kernel": (32, 5),
        "head/bias": (5,),
    }
    assert shapes == expected


def test_scanned_layout_has_a_depth_axis():
    unrolled = _flat_shapes(_shapes(_tiny()))
    scanned = _flat_shapes(_shapes(_tiny(scan=True)))
    prefix = "Transformer/encoderblock/"
    stacked = {k[len(prefix) :]: v for k, v in scanned.items() if k.startswith(prefix)}
    assert stacked == {
        k[len("Transformer/encoderblock_0/") :]: (3, *v)
        for k, v in unrolled.items()
        if k.startswith("Transformer/encoderblock_0/")
    }
    rest = {k: v for k, v in scanned.items() if not k.startswith(prefix)}
    assert rest == {k: v for k, v in unrolled.items() if "encoderblock_" not in k}


def test_init_runs_and_head_starts_at_zero():
    model = _tiny(depth=1)
    params = model.init(jax.random.key(0), X)["params"]
    assert not np.any(params["head"]["kernel"])
    assert not np.any(params["cls"])
    assert model.apply({"params": params}, X).shape == (2, 5)


@pytest.mark.parametrize("pool", POOLS)
def test_pools(pool):
    model = _tiny(pool=pool)
    params = _params(model)
    assert ("cls" in params) == (pool == "tok")
    assert params["pos_embedding"].shape == (1, 16, 32)
    logits = model.apply({"params": params}, X)
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))


def test_tok_and_gap_differ_from_the_same_body():
    tok = _tiny(pool="tok")
    params = _params(tok)
    gap_params = {k: v for k, v in params.items() if k != "cls"}
    out_tok = tok.apply({"params": params}, X)
    out_gap = _tiny(pool="gap").apply({"params": gap_params}, X)
    assert not np.allclose(out_tok, out_gap)


def test_scanned_equals_unrolled_from_the_same_weights():
    unrolled = _tiny()
    params = _params(unrolled)
    stacked = stack_blocks(params)
    assert stacked["Transformer"]["encoderblock"]["LayerNorm_0"]["scale"].shape == (3, 32)
    assert jax.tree.structure(stacked) == jax.tree.structure(_shapes(_tiny(scan=True)))
    out = unrolled.apply({"params": params}, X)
    out_scan = _tiny(scan=True).apply({"params": stacked}, X)
    np.testing.assert_allclose(out_scan, out, atol=1e-5, rtol=1e-5)


def test_stack_unstack_round_trip_is_bitwise():
    params = _params(_tiny())
    stacked = stack_blocks(params)
    back = unstack_blocks(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    again = stack_blocks(back)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(stacked), strict=True):
        np.testing.assert_array_equal(a, b)
    # The inputs are not changed.
    assert "encoderblock_0" in params["Transformer"]
    assert "encoderblock" in stacked["Transformer"]


def test_stack_keeps_numpy_leaves_numpy():
    params = jax.tree.map(np.asarray, _params(_tiny()))
    leaf = stack_blocks(params)["Transformer"]["encoderblock"]["LayerNorm_0"]["scale"]
    assert isinstance(leaf, np.ndarray)


@pytest.mark.parametrize(
    "fn, params, match",
    [
        (stack_blocks, {"Transformer": {"encoderblock": {}}}, "already stacked"),
        (stack_blocks, {"Transformer": {"encoder_norm": {}}}, "No Transformer/encoderblock_"),
        (
            stack_blocks,
            {"Transformer": {"encoderblock_0": {"w": 0}, "encoderblock_2": {"w": 0}}},
            r"0\.\.1, got \[0, 2\]",
        ),
        (unstack_blocks, {"Transformer": {"encoderblock_0": {}}}, "No Transformer/encoderblock "),
        (unstack_blocks, {"params": {}}, "'Transformer' entry"),
    ],
)
def test_stack_errors(fn, params, match):
    with pytest.raises(ValueError, match=match):
        fn(params)


def test_ti16_parameter_count():
    # ViT-Ti/16 at 224px, 1000 classes: 5,717,416 in the original ViT / timm layout,
    # whose position embedding also has a row for the class token (197 x 192). big_vision
    # adds the position embedding before prepending the class token (196 x 192), so its
    # layout has 192 parameters fewer.
    model = create_vit("vit_ti16", num_classes=1000)
    shapes = _shapes(model, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))
    assert shapes["pos_embedding"].shape == (1, 196, 192)
    assert count == 5_717_416 - 192
    scanned = _shapes(
        create_vit("vit_ti16", num_classes=1000, scan=True),
        jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32),
    )
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(scanned)) == count


@pytest.mark.parametrize(
    "name, size, patch", [("vit_ti4", "Ti", 4), ("vit_s4", "S", 4), ("vit_s16", "S", 16)]
)
def test_names(name, size, patch):
    assert name in VIT_NAMES
    model = create_vit(name, num_classes=10, pool="gap")
    assert model == vit(size, patch_size=patch, num_classes=10, pool="gap")
    assert model.patch_size == patch and model.pool == "gap"


def test_sizes():
    s = vit("S", patch_size=4, num_classes=10)
    assert (s.width, s.depth, s.mlp_dim, s.num_heads) == (384, 12, 1536, 6)
    ti = vit("Ti", patch_size=4, num_classes=10)
    assert (ti.width, ti.depth, ti.mlp_dim, ti.num_heads) == (192, 12, 768, 3)


def test_groups_cover_the_params_in_order():
    for pool in POOLS:
        for scan in (False, True):
            groups = vit_groups(3, pool=pool, scan=scan)
            params = _shapes(_tiny(pool=pool, scan=scan))
            # Every parameter (every block of a stacked one) in exactly one group,
            # each group non-empty, and the blocks equally sized.
            rows = lf.summary(params, "none", groups=groups).groups
            assert [g.name for g in rows] == list(groups)
            blocks = [g.params for g in rows if "encoderblock" in g.name]
            assert len(blocks) == 3 and len(set(blocks)) == 1
    assert vit_groups(3) == (
        "embedding",
        "pos_embedding",
        "cls",
        "Transformer/encoderblock_0",
        "Transformer/encoderblock_1",
        "Transformer/encoderblock_2",
        "Transformer/encoder_norm",
        "head",
    )
    assert vit_groups(3, pool="gap", scan=True) == (
        "embedding",
        "pos_embedding",
        "Transformer/encoderblock[0]",
        "Transformer/encoderblock[1]",
        "Transformer/encoderblock[2]",
        "Transformer/encoder_norm",
        "head",
    )


def test_groups_as_freeze_specs():
    params = _shapes(_tiny())
    groups = vit_groups(3)
    spec = lf.FreezeSpec.parse(",".join(groups[:4]))
    mask = traverse_util.flatten_dict(lf.frozen_mask(params, spec), sep="/")
    frozen = {p for p, f in mask.items() if f}
    assert frozen == {
        p for p in mask if p.split("/")[0] in ("embedding", "pos_embedding", "cls")
    } | {p for p in mask if p.startswith("Transformer/encoderblock_0/")}
    table = lf.summary(params, spec, order=["embedding", "pos_embedding", "cls"]).as_dict()
    assert table["trainable_params"] < table["total_params"]


def test_freeze_all_but_last_block_and_head_trains_only_those():
    model = _tiny()
    params = _params(model)
    spec = "all-but:Transformer/encoderblock_2,Transformer/encoder_norm,head"
    steps = make_steps(
        model,
        optax.adamw(1e-2),
        spec,
        params,
        train_kwargs={"train": True},
        eval_kwargs={"train": False},
    )
    state = steps.init_state({"params": params}, jax.random.key(0))
    batch = {"image": np.asarray(X), "label": np.array([1, 3])}
    for _ in range(3):
        state, metrics = steps.train_step(state, batch)
    assert np.isfinite(metrics["loss"])
    trained = ("Transformer/encoderblock_2/", "Transformer/encoder_norm/", "head/")
    before = traverse_util.flatten_dict(params, sep="/")
    after = traverse_util.flatten_dict(state.params, sep="/")
    for path, old in before.items():
        if path.startswith(trained):
            assert not np.array_equal(after[path], old), path
        else:
            np.testing.assert_array_equal(after[path], old, err_msg=path)
    assert steps.eval_step(state, batch)["count"] == 2


def test_bfloat16_compute_gives_float32_logits():
    model = _tiny(dtype=jnp.bfloat16)
    params = _params(_tiny())
    logits = model.apply({"params": params}, X)
    assert logits.dtype == jnp.float32
    ref = _tiny().apply({"params": params}, X)
    np.testing.assert_allclose(logits, ref, atol=0.2, rtol=0.1)


def test_dropout_in_training_only():
    model = _tiny(dropout=0.5)
    params = _params(_tiny())
    a = model.apply({"params": params}, X, train=True, rngs={"dropout": jax.random.key(0)})
    b = model.apply({"params": params}, X, train=True, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(
        model.apply({"params": params}, X), _tiny().apply({"params": params}, X)
    )


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: vit("XL", patch_size=4, num_classes=10), r"valid sizes are \['Ti', 'S', 'B'\]"),
        (lambda: create_vit("vit_b4", num_classes=10), r"valid names are \['vit_ti4'"),
        (lambda: _tiny(pool="map"), r"valid choices are \['tok', 'gap'\]"),
        (lambda: _tiny(num_heads=3), "does not divide width=32"),
        (lambda: vit_groups(3, pool="avg"), r"valid choices are \['tok', 'gap'\]"),
        (lambda: vit_groups(0), "depth must be at least 1"),
        (lambda: _shapes(_tiny(patch_size=5)), r"patch_size=5 does not divide .* 16x16"),
    ],
)
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()
