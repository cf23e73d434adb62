"""Import big_vision / AugReg ViT checkpoints (``.npz``) into :class:`~layerfreeze.models.ViT`.

No weights are downloaded: the caller passes a local ``.npz`` file whose keys are the
parameter paths joined by ``/``, as big_vision and the AugReg release publish them::

    embedding/kernel, embedding/bias, cls, pos_embedding,
    Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel, ...,
    Transformer/encoder_norm/scale, head/kernel, head/bias

The :class:`~layerfreeze.models.ViT` uses the same names, so keys map one to one. As in
big_vision's ``vit.load``, the loader also accepts:

* a ``params/`` prefix on every key (a big_vision training checkpoint; other entries, such
  as ``opt/...``, are ignored);
* the older position-embedding locations ``Transformer/posembed_input/pos_embedding``
  (the original ViT and AugReg files) and ``Transformer/pos_embedding``;
* a position embedding with a row for the class token (``1 + g * g`` rows): that row is
  added to ``cls`` (the class token's input is the same) or dropped for ``pool="gap"``;
* either block layout: unrolled ``encoderblock_{i}`` or stacked ``encoderblock`` (a
  leading depth axis), converted to the layout of the target model;
* another square grid of patches (another image size or patch count): the position
  embedding is resized bilinearly (``scipy.ndimage.zoom(order=1)``, as big_vision does).
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

from layerfreeze import _checks
from layerfreeze.models.vit import stack_blocks, unstack_blocks

__all__ = ["load_big_vision_npz"]

_SHOW = 8  # How many offending keys an error lists per kind.
_PREFIX = "params/"
_STACKED_PREFIX = "Transformer/encoderblock/"
_UNROLLED = re.compile(r"encoderblock_\d+")
_NPY_MAGIC = b"\x93NUMPY"


def load_big_vision_npz(path: str | os.PathLike, params: Any) -> dict[str, Any]:
    """Reads a big_vision/AugReg ``.npz`` ViT checkpoint into the layout of ``params``.

    The result has the structure and shapes of ``params``, the target model's parameters,
    with two exceptions for a head trained on another task:

    * if the file has no head, or a head with another number of classes (``head/kernel``
      and ``head/bias`` differ only in their last dimension), ``head`` is left out, for
      the caller to
      initialise; :func:`layerfreeze.train.pretrained.merge_pretrained` with
      ``reinit=("head",)`` keeps the fresh head and reports it;
    * the position embedding is resized to the target's grid when both grids are square.

    Everything else must match: a file for another depth, width or pooling is an error
    that lists every missing, unexpected and differently shaped key.

    Args:
        path: A ``.npz`` file written with ``np.savez`` from a flat ``{path: array}`` dict
            (the format of big_vision's and AugReg's published checkpoints).
        params: The target :class:`~layerfreeze.models.ViT`'s ``params`` (arrays or the
            ``jax.ShapeDtypeStruct`` leaves of ``jax.eval_shape(model.init, ...)``); it
            fixes the block layout (unrolled or ``scan=True``), the grid, the pooling and
            the dtypes.

    Returns:
        The parameters as plain nested dicts of numpy arrays, in the dtypes of ``params``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        TypeError: If ``path`` is not a str or path, or ``params`` not a nested dict.
        ValueError: If the file is not an ``.npz`` of ViT parameters, a position embedding
            grid is not square and differs from the target's, or the checkpoint does not
            fit ``params`` (the message lists the keys and shapes that differ).

    Example:
        >>> import tempfile, pathlib, jax, numpy as np
        >>> from flax import traverse_util
        >>> from layerfreeze.models import ViT
        >>> model = ViT(num_classes=10, patch_size=4, width=32, depth=2, mlp_dim=64,
        ...             num_heads=2)
        >>> x = np.zeros((1, 16, 16, 3), np.float32)
        >>> fresh = model.init(jax.random.key(0), x)["params"]
        >>> flat = traverse_util.flatten_dict(fresh, sep="/")
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "vit.npz"
        >>> np.savez(path, **{k: np.ones(v.shape, np.float32) for k, v in flat.items()})
        >>> scanned = ViT(num_classes=10, patch_size=4, width=32, depth=2, mlp_dim=64,
        ...               num_heads=2, scan=True)
        >>> like = jax.eval_shape(scanned.init, jax.random.key(0), x)["params"]
        >>> loaded = load_big_vision_npz(path, like)
        >>> loaded["Transformer"]["encoderblock"]["MlpBlock_3"]["Dense_0"]["kernel"].shape
        (2, 32, 64)
    """
    _check_arguments(path, params)
    target = traverse_util.flatten_dict(_plain(params), sep="/")
    if not any(k.startswith("Transformer/") for k in target):
        raise ValueError(
            "params must be a ViT's parameters, with Transformer/... entries (pass "
            f"variables['params']); got the keys {sorted(target)[:_SHOW]}."
        )
    flat = _read_npz(Path(path))
    tree = _fix_old_layouts(traverse_util.unflatten_dict(flat, sep="/"), target, path)
    stacked = any(k.startswith(_STACKED_PREFIX) for k in target)
    tree = _to_layout(tree, stacked=stacked)
    loaded = traverse_util.flatten_dict(tree, sep="/")
    if "pos_embedding" in loaded and "pos_embedding" in target:
        loaded["pos_embedding"] = _resize_posemb(
            loaded["pos_embedding"], tuple(target["pos_embedding"].shape), path
        )
    # A head for another task (or none at all) is left for the caller to initialise.
    no_head = not any(k.startswith("head/") for k in loaded)
    if no_head or _head_has_other_classes(loaded, target):
        loaded = {k: v for k, v in loaded.items() if not k.startswith("head/")}
        target_checked = {k: v for k, v in target.items() if not k.startswith("head/")}
    else:
        target_checked = target
    _check_fits(loaded, target_checked, path)
    out = {k: np.asarray(v, dtype=target[k].dtype) for k, v in loaded.items()}
    return traverse_util.unflatten_dict(out, sep="/")


def _check_arguments(path: Any, params: Any) -> None:
    swapped = isinstance(path, Mapping) and isinstance(params, str | os.PathLike)
    hint = " The arguments are (path, params): were they swapped?" if swapped else ""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(
            "path must be the path of a local .npz file (a str or os.PathLike), got "
            f"{_checks.given(path)}.{hint}"
        )
    if not isinstance(params, Mapping):
        raise TypeError(
            "params must be the target ViT's parameters, a nested dict such as "
            "variables['params'] or jax.eval_shape(model.init, ...)['params'], got "
            f"{_checks.given(params)}.{hint}"
        )


def _plain(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; give a local big_vision .npz file.")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give the path of a big_vision .npz file.")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            npy = f.read(len(_NPY_MAGIC)) == _NPY_MAGIC
        what = "a single-array .npy file (np.save)" if npy else "not a zip archive"
        raise ValueError(
            f"Cannot read {path} as an .npz checkpoint: it is {what}. An .npz checkpoint is "
            "a zip of named arrays, written by np.savez with one array per parameter path."
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            flat = {k: npz[k] for k in npz.files}
    except Exception as e:  # zip, pickle and format errors alike
        raise ValueError(
            f"Cannot read {path} as an .npz checkpoint ({type(e).__name__}: {e}); give a "
            "file written by np.savez with one array per parameter path."
        ) from e
    if not isinstance(flat, dict) or not flat:
        raise ValueError(f"{path} holds no arrays; give a big_vision .npz checkpoint.")
    if any(k.startswith(_PREFIX) for k in flat):  # a big_vision training checkpoint
        flat = {k[len(_PREFIX) :]: v for k, v in flat.items() if k.startswith(_PREFIX)}
    return flat


def _fix_old_layouts(tree: dict[str, Any], target: dict[str, Any], path: Any) -> dict[str, Any]:
    """big_vision's ``fix_old_checkpoints``: old position-embedding places and rows."""
    encoder = tree.get("Transformer")
    if not isinstance(encoder, dict):
        raise ValueError(
            f"{path} holds no Transformer/... parameters (its top-level keys: "
            f"{sorted(tree)}); is it a ViT checkpoint?"
        )
    if "posembed_input" in encoder:  # the original ViT code and AugReg
        tree["pos_embedding"] = encoder.pop("posembed_input")["pos_embedding"]
    if "pos_embedding" in encoder:  # big_vision before 2022
        tree["pos_embedding"] = encoder.pop("pos_embedding")
    pe = tree.get("pos_embedding")
    if isinstance(pe, np.ndarray) and pe.ndim == 3 and target.get("pos_embedding") is not None:
        rows, want = pe.shape[1], target["pos_embedding"].shape[1]
        # Older code prepended the class token, then added the position embedding: its
        # first row belongs to the class token.
        if rows != want and _is_square(rows - 1):
            cls_row, tree["pos_embedding"] = pe[:, :1], pe[:, 1:]
            if "cls" in tree and "cls" in target:
                tree["cls"] = tree["cls"] + cls_row
    return tree


def _to_layout(tree: dict[str, Any], *, stacked: bool) -> dict[str, Any]:
    encoder = tree["Transformer"]
    if stacked and any(_UNROLLED.fullmatch(k) for k in encoder):
        return stack_blocks(tree)
    if not stacked and "encoderblock" in encoder:
        return unstack_blocks(tree)
    return tree


def _is_square(n: int) -> bool:
    return n > 0 and round(np.sqrt(n)) ** 2 == n


def _resize_posemb(pe: np.ndarray, want: tuple[int, ...], path: Any) -> np.ndarray:
    if pe.shape == want or pe.ndim != 3 or len(want) != 3 or pe.shape[2] != want[2]:
        return pe  # equal, or a width mismatch: reported with the other keys
    old, new = pe.shape[1], want[1]
    if not (_is_square(old) and _is_square(new)):
        raise ValueError(
            f"{path}: pos_embedding has {old} rows and the model {new}; a position "
            "embedding is resized only between square grids of patches (g * g rows). Use "
            "an image size and patch size that give the checkpoint's grid, or a square one."
        )
    import scipy.ndimage  # a dependency of jax

    g_old, g_new = round(np.sqrt(old)), round(np.sqrt(new))
    grid = pe.reshape(g_old, g_old, -1)
    grid = scipy.ndimage.zoom(grid, (g_new / g_old, g_new / g_old, 1), order=1)
    return grid.reshape(1, g_new * g_new, -1).astype(pe.dtype)


def _head_has_other_classes(loaded: dict[str, Any], target: dict[str, Any]) -> bool:
    """Whether the head differs only in its number of outputs (another task)."""
    keys = ("head/kernel", "head/bias")
    if not all(k in loaded and k in target for k in keys):
        return False
    kernel, bias = (np.shape(loaded[k]) for k in keys)
    t_kernel, t_bias = (tuple(target[k].shape) for k in keys)
    return (
        kernel[:-1] == t_kernel[:-1]
        and bias[:-1] == t_bias[:-1]
        and (kernel[-1], bias[-1]) != (t_kernel[-1], t_bias[-1])
    )


def _check_fits(loaded: dict[str, Any], target: dict[str, Any], path: Any) -> None:
    missing = [f"{k} {tuple(v.shape)}" for k, v in target.items() if k not in loaded]
    unexpected = [f"{k} {tuple(np.shape(v))}" for k, v in loaded.items() if k not in target]
    differ = [
        f"{k} (file {tuple(np.shape(v))}, model {tuple(target[k].shape)})"
        for k, v in loaded.items()
        if k in target and tuple(np.shape(v)) != tuple(target[k].shape)
    ]
    if not (missing or unexpected or differ):
        return
    parts = []
    for what, items in (
        ("missing from the file", missing),
        ("unexpected (not in the model)", unexpected),
        ("shapes differ", differ),
    ):
        if items:
            shown = ", ".join(items[:_SHOW])
            more = f" and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
            parts.append(f"{len(items)} {what}: {shown}{more}")
    raise ValueError(
        f"{path} does not fit this ViT: " + "; ".join(parts) + ". Build the model with the "
        "checkpoint's width, depth, mlp_dim, heads, patch size and pooling (a class token "
        "'cls' means pool='tok')."
    )
