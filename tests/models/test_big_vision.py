"""Tests for layerfreeze.models.big_vision: .npz checkpoints into unrolled and scanned ViTs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from layerfreeze.models import ViT, load_big_vision_npz, stack_blocks
from layerfreeze.train import pretrained

TINY = dict(num_classes=5, patch_size=4, width=32, depth=3, mlp_dim=64, num_heads=2)
X = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))  # a 4x4 grid: 16 tokens


def _tiny(**kw) -> ViT:
    return ViT(**{**TINY, **kw})


def _shapes(model: ViT, x=X):
    return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


@functools.cache
def _source(**kw):
    """Random float32 values of an unrolled tiny ViT's parameters, as numpy."""
    rng = np.random.default_rng(0)
    shapes = _shapes(_tiny(**kw))
    return jax.tree.map(lambda s: rng.normal(scale=0.2, size=s.shape).astype(np.float32), shapes)


def _write(path, params, prefix=""):
    flat = traverse_util.flatten_dict(params, sep="/")
    np.savez(path, **{prefix + k: v for k, v in flat.items()})
    return path


def _assert_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("file_scan", [False, True])
@pytest.mark.parametrize("model_scan", [False, True])
def test_loads_either_layout_into_either_model(tmp_path, file_scan, model_scan):
    source = _source()
    saved = stack_blocks(source) if file_scan else source
    path = _write(tmp_path / "vit.npz", saved)
    model = _tiny(scan=model_scan)
    loaded = load_big_vision_npz(path, _shapes(model))
    want = stack_blocks(source) if model_scan else source
    _assert_equal(loaded, want)
    # The loaded model computes what the source computes.
    out = model.apply({"params": loaded}, X)
    np.testing.assert_allclose(out, _tiny().apply({"params": source}, X), rtol=1e-5, atol=1e-5)


def test_big_vision_params_prefix_and_other_entries(tmp_path):
    path = tmp_path / "ckpt.npz"
    flat = traverse_util.flatten_dict(_source(), sep="/")
    np.savez(path, **{f"params/{k}": v for k, v in flat.items()}, **{"opt/count": np.zeros(())})
    _assert_equal(load_big_vision_npz(path, _shapes(_tiny())), _source())


def test_old_posemb_with_a_class_token_row_is_folded_into_cls(tmp_path):
    source = _source()
    old = {k: v for k, v in source.items() if k != "pos_embedding"}
    cls_row = np.full((1, 1, 32), 0.5, np.float32)
    posemb = np.concatenate([cls_row, source["pos_embedding"]], axis=1)  # 1 + 16 rows
    old["Transformer"] = {**source["Transformer"], "posembed_input": {"pos_embedding": posemb}}
    loaded = load_big_vision_npz(_write(tmp_path / "old.npz", old), _shapes(_tiny()))
    np.testing.assert_array_equal(loaded["pos_embedding"], source["pos_embedding"])
    np.testing.assert_array_equal(loaded["cls"], source["cls"] + cls_row)
    # A model pooling by the mean has no class token: the row is dropped.
    gap = {k: v for k, v in old.items() if k != "cls"}
    loaded = load_big_vision_npz(_write(tmp_path / "gap.npz", gap), _shapes(_tiny(pool="gap")))
    np.testing.assert_array_equal(loaded["pos_embedding"], source["pos_embedding"])


def test_posemb_is_resized_bilinearly_to_another_square_grid(tmp_path):
    path = _write(tmp_path / "vit.npz", _source())
    x = jnp.zeros((1, 32, 32, 3))  # an 8x8 grid: 64 tokens
    big = _tiny()
    loaded = load_big_vision_npz(path, _shapes(big, x))
    assert loaded["pos_embedding"].shape == (1, 64, 32)
    grid = loaded["pos_embedding"].reshape(8, 8, 32)
    old = _source()["pos_embedding"].reshape(4, 4, 32)
    # Corners are kept (scipy's zoom aligns them); the rest is interpolated.
    np.testing.assert_allclose(grid[0, 0], old[0, 0], rtol=1e-6)
    np.testing.assert_allclose(grid[-1, -1], old[-1, -1], rtol=1e-6)
    assert big.apply({"params": loaded}, x).shape == (1, 5)


def test_posemb_of_a_non_square_grid_is_a_clear_error(tmp_path):
    path = _write(tmp_path / "vit.npz", _source())
    with pytest.raises(ValueError, match=r"pos_embedding has 16 rows and the model 8.*square"):
        load_big_vision_npz(path, _shapes(_tiny(), jnp.zeros((1, 8, 16, 3))))


def test_head_with_another_class_count_is_reinitialised(tmp_path):
    path = _write(tmp_path / "vit.npz", _source())
    target = _tiny(num_classes=7, scan=True)
    fresh = target.init(jax.random.key(3), X)["params"]
    loaded = load_big_vision_npz(path, fresh)
    assert "head" not in loaded
    merged, reinit = pretrained.merge_pretrained(
        {"params": fresh}, {"params": loaded}, reinit=("head",)
    )
    assert reinit == ("head",)
    _assert_equal(merged["params"]["head"], fresh["head"])
    _assert_equal(merged["params"]["Transformer"], stack_blocks(_source())["Transformer"])
    assert target.apply(merged, X).shape == (2, 7)


def test_mismatch_names_missing_unexpected_and_differing_keys(tmp_path):
    bad = jax.tree.map(lambda x: x, _source())  # new dicts: the cached tree stays intact
    bad["Transformer"]["encoderblock_3"] = bad["Transformer"]["encoderblock_0"]  # one block more
    del bad["Transformer"]["encoder_norm"]["scale"]
    bad["embedding"] = {**bad["embedding"], "kernel": np.zeros((8, 8, 3, 32), np.float32)}
    path = _write(tmp_path / "vit.npz", bad)
    with pytest.raises(ValueError) as info:
        load_big_vision_npz(path, _shapes(_tiny()))
    message = str(info.value)
    assert "does not fit this ViT" in message
    assert "1 missing from the file: Transformer/encoder_norm/scale (32,)" in message
    assert "unexpected (not in the model): Transformer/encoderblock_3/" in message
    assert "1 shapes differ: embedding/kernel (file (8, 8, 3, 32), model (4, 4, 3, 32))" in message
    # The same file into the scanned model: the extra block shows as a depth of 4, not 3.
    with pytest.raises(ValueError, match=r"MlpBlock_3/Dense_0/kernel \(file \(4, 32, 64\), model"):
        load_big_vision_npz(path, _shapes(_tiny(scan=True)))


def test_class_token_into_a_gap_model_is_unexpected(tmp_path):
    path = _write(tmp_path / "vit.npz", _source())
    with pytest.raises(ValueError, match=r"unexpected \(not in the model\): cls \(1, 1, 32\)"):
        load_big_vision_npz(path, _shapes(_tiny(pool="gap")))


def test_dtype_follows_the_model(tmp_path):
    path = _write(tmp_path / "vit.npz", _source())
    shapes = _shapes(_tiny(param_dtype=jnp.bfloat16))
    loaded = load_big_vision_npz(path, shapes)
    assert {x.dtype for x in jax.tree.leaves(loaded)} == {np.dtype(jnp.bfloat16)}


@pytest.mark.parametrize(
    ("content", "params", "error", "match"),
    [
        (None, None, FileNotFoundError, "does not exist"),
        (b"not a zip", None, ValueError, r"Cannot read .* as an .npz checkpoint"),
        ({"w": np.zeros(2)}, None, ValueError, "holds no Transformer"),
        (None, {"stem": {"w": jnp.zeros(2)}}, ValueError, "must be a ViT's parameters"),
    ],
)
def test_bad_files(tmp_path, content, params, error, match):
    path = tmp_path / "vit.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, dict):
        np.savez(path, **content)
    elif params is not None:
        _write(path, _source())
    with pytest.raises(error, match=match):
        load_big_vision_npz(path, params if params is not None else _shapes(_tiny()))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("npy", r"it is a single-array .npy file \(np.save\)"),
        (b"not a zip", r"it is not a zip archive"),
        ("dir", r"is a directory; give the path of a big_vision .npz file"),
    ],
)
def test_files_that_are_no_npz_say_what_they_are(tmp_path, content, match):
    path = tmp_path / "vit.npz"
    if content == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    elif content == "dir":
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        load_big_vision_npz(path, _shapes(_tiny()))


@pytest.mark.parametrize(
    ("path", "params", "match"),
    [
        (None, "shapes", r"path must be the path of a local .npz file .*got NoneType None"),
        (["vit.npz"], "shapes", r"path must be .*got list \['vit.npz'\]"),
        ("file", "params", r"params must be the target ViT's parameters.*got str 'params'"),
        ("file", None, r"params must be the target ViT's parameters.*got NoneType None"),
        ("shapes", "file", r"path must be .*got dict .*\(path, params\): were they swapped"),
    ],
    ids=["path-none", "path-list", "params-string", "params-none", "swapped"],
)
def test_wrong_argument_types(tmp_path, path, params, match):
    file = _write(tmp_path / "vit.npz", _source())
    given = {"file": file, "shapes": _shapes(_tiny())}
    path, params = (given.get(x, x) if isinstance(x, str) else x for x in (path, params))
    with pytest.raises(TypeError, match=match):
        load_big_vision_npz(path, params)
