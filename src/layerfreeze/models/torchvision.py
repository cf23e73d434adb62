"""Import torchvision ImageNet ResNet weights into :class:`~layerfreeze.models.ResNet`.

No weights are downloaded: the caller passes a local file holding a torchvision ResNet
``state_dict``, saved with ``torch.save`` (``.pth``/``.pt``) or with safetensors
(``.safetensors``). Keys map one to one onto the Flax paths::

    conv1, bn1                          -> stem/Conv_0, stem/BatchNorm_0
    layerN.i.conv{k}, layerN.i.bn{k}    -> stageN/Block_i/Conv_{k-1}, .../BatchNorm_{k-1}
    layerN.i.downsample.0, .1           -> stageN/Block_i/Downsample_Conv, .../Downsample_BatchNorm
    fc                                  -> head/Dense_0

Conv weights go from OIHW to HWIO, ``fc.weight`` is transposed, BatchNorm
``weight/bias/running_mean/running_var`` become ``scale/bias`` (params) and ``mean/var``
(batch_stats), and ``num_batches_tracked`` is ignored.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from layerfreeze.models.resnet import MODEL_NAMES, ResNet, create_model

__all__ = ["load_torchvision_resnet"]

_INSTALL_HINT = 'pip install "layerfreeze[torch]"'
_TORCH_SUFFIXES = (".pth", ".pt")
_SAFETENSORS_SUFFIXES = (".safetensors",)
_SHOW = 5  # How many offending keys an error lists.
_TORCHVISION_NAMES = tuple(name for name in MODEL_NAMES if name != "resnet10")  # no ResNet-10

_BN_LEAVES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def load_torchvision_resnet(path: str | os.PathLike, model: ResNet) -> dict:
    """Loads a torchvision ResNet ``state_dict`` as variables for ``model``.

    The returned tree has exactly the structure of ``model.init(...)`` output, except that
    the head is left out of ``params`` when it cannot be taken from the file: when
    ``model.head == "mlp"``, or when ``model.num_classes`` differs from the out-features
    of ``fc``. The caller then initialises the head itself, e.g. with
    ``fresh = model.init(...)`` and ``params = {**loaded["params"], "head":
    fresh["params"]["head"]}``. The file must still hold ``fc.weight`` and ``fc.bias``,
    and their in-features must match the model, so that a file for another architecture is
    caught.

    Args:
        path: A ``.pth``/``.pt`` file written by ``torch.save(model.state_dict(), path)``
            or a ``.safetensors`` file of the same tensors.
        model: The ResNet to load into. It must use ``stem="imagenet"``; with ``width=64``
            :func:`~layerfreeze.models.resnet18`, ``resnet34`` and ``resnet50`` match
            torchvision's models of the same name.

    Returns:
        ``{"params": ..., "batch_stats": ...}`` as plain nested dicts of numpy arrays, in
        the dtypes ``model.init`` would give.

    Raises:
        ImportError: If torch (for ``.pth``) or safetensors is not installed.
        ValueError: If the model does not use the ImageNet stem, the file suffix is not
            supported, keys are missing or unused, or a tensor has the wrong shape.

    Example:
        >>> import tempfile, pathlib, numpy as np
        >>> from safetensors.numpy import save_file
        >>> from layerfreeze.models import resnet18
        >>> model = resnet18(num_classes=1000)
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> save_file(_zeros_state_dict(model), d / "resnet18.safetensors")
        >>> variables = load_torchvision_resnet(d / "resnet18.safetensors", model)
        >>> variables["params"]["stem"]["Conv_0"]["kernel"].shape
        (7, 7, 3, 64)
        >>> "head" in load_torchvision_resnet(d / "resnet18.safetensors", resnet18(10))["params"]
        False
    """
    if model.stem != "imagenet":
        raise ValueError(
            f"torchvision ResNets use the 'imagenet' stem; got a model with stem="
            f"{model.stem!r}. Build it with stem='imagenet'."
        )
    state = _read_state_dict(Path(path))
    expected = _expected_variables(model)
    what = _describe(model)
    expected_fc: dict[str, tuple[int | None, ...]] = {}
    if not _loads_head(model, state):
        expected, expected_fc = _without_head(expected)
    targets, optional = _targets(expected)
    required = set(targets) | set(expected_fc)
    missing = sorted(required - set(state))
    unused = sorted(set(state) - required - optional)
    if missing or unused:
        raise ValueError(_key_error(path, what, missing, unused, state))
    _check_fc_shapes(state, expected_fc, path, what)
    return _convert(state, targets, path, what)


# Flax path, expected leaf and converter of a torchvision key.
_Target = tuple[tuple[str, ...], jax.ShapeDtypeStruct, Callable[[np.ndarray], np.ndarray]]


def _loads_head(model: ResNet, state: Mapping[str, np.ndarray]) -> bool:
    return (
        model.head == "linear"
        and "fc.weight" in state
        and state["fc.weight"].shape[0] == model.num_classes
    )


def _without_head(
    expected: dict[tuple[str, ...], jax.ShapeDtypeStruct],
) -> tuple[dict[tuple[str, ...], jax.ShapeDtypeStruct], dict[str, tuple[int | None, ...]]]:
    """The variables but the head, and the shapes the file's classifier must still have.

    The classifier is checked against the model's features (`None`: any number of classes).
    """
    # The head's first kernel is (features, units) for either head kind.
    num_features = expected[("params", "head", "Dense_0", "kernel")].shape[0]
    body = {k: v for k, v in expected.items() if k[1] != "head"}
    return body, {"fc.weight": (None, num_features), "fc.bias": (None,)}


def _targets(
    expected: dict[tuple[str, ...], jax.ShapeDtypeStruct],
) -> tuple[dict[str, _Target], set[str]]:
    """The torchvision key of each expected variable, and the keys a file may also hold."""
    targets: dict[str, _Target] = {}
    optional: set[str] = set()
    for flax_path, leaf in expected.items():
        key, transform = _torch_key(flax_path)
        targets[key] = (flax_path, leaf, transform)
        if key.endswith(".running_mean"):
            optional.add(key.removesuffix("running_mean") + "num_batches_tracked")
    return targets, optional


def _check_fc_shapes(
    state: Mapping[str, np.ndarray],
    expected_fc: dict[str, tuple[int | None, ...]],
    path: Any,
    what: str,
) -> None:
    for key, shape in expected_fc.items():
        got = tuple(state[key].shape)
        if len(got) != len(shape) or any(
            w is not None and w != g for w, g in zip(shape, got, strict=True)
        ):
            want = tuple("*" if w is None else w for w in shape)
            raise ValueError(
                f"Shape mismatch for {key!r} in {path}: file has {got}, {what} expects {want} "
                "(any number of classes)."
            )


def _convert(
    state: Mapping[str, np.ndarray], targets: dict[str, _Target], path: Any, what: str
) -> dict:
    """The variables tree of the file's tensors, converted to Flax layout and dtypes."""
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for key, (flax_path, leaf, transform) in targets.items():
        value = transform(state[key])
        if value.shape != leaf.shape:
            raise ValueError(
                f"Shape mismatch for {key!r} -> {'/'.join(flax_path)}: file has "
                f"{tuple(state[key].shape)} (that is {value.shape} after conversion), "
                f"{what} expects {leaf.shape}."
            )
        flat[flax_path] = np.asarray(value, dtype=leaf.dtype)
    return traverse_util.unflatten_dict(flat)


def _read_state_dict(path: Path) -> dict[str, np.ndarray]:
    suffix = path.suffix.lower()
    if suffix in _SAFETENSORS_SUFFIXES:
        try:
            from safetensors.numpy import load_file
        except ImportError as err:
            raise ImportError(
                f"Reading {path} needs the safetensors package: {_INSTALL_HINT}"
            ) from err
        return dict(load_file(path))
    if suffix in _TORCH_SUFFIXES:
        try:
            import torch
        except ImportError as err:
            raise ImportError(f"Reading {path} needs PyTorch: {_INSTALL_HINT}") from err
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(loaded, Mapping) or not all(
            isinstance(v, torch.Tensor) for v in loaded.values()
        ):
            keys = list(loaded)[:_SHOW] if isinstance(loaded, Mapping) else type(loaded)
            raise ValueError(
                f"{path} does not hold a state_dict (a mapping of names to tensors); found "
                f"{keys}. Save it with torch.save(model.state_dict(), path)."
            )
        out = {}
        for key, tensor in loaded.items():
            tensor = tensor.detach()
            if tensor.is_floating_point():
                # numpy has no bfloat16; float32 holds every torch float exactly.
                tensor = tensor.to(torch.float32)
            out[key] = tensor.numpy()
        return out
    raise ValueError(
        f"Unsupported weight file suffix {path.suffix!r} for {path}; valid suffixes are "
        f"{list(_TORCH_SUFFIXES + _SAFETENSORS_SUFFIXES)}."
    )


def _expected_variables(model: ResNet) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    init = functools.partial(model.init, train=False)
    shapes = jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32))
    return traverse_util.flatten_dict(dict(shapes))


def _conv(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 1, 0))  # OIHW -> HWIO


def _identity(w: np.ndarray) -> np.ndarray:
    return w


def _torch_key(flax_path: tuple[str, ...]) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """Maps ``(collection, group, ..., leaf)`` to a torchvision key and a converter."""
    _, group, *modules, leaf = flax_path
    if group == "stem":
        prefix = ""
    elif group == "head":
        prefix = ""
        modules = ["fc"] if modules == ["Dense_0"] else modules
    else:
        block = modules.pop(0)
        prefix = f"layer{group.removeprefix('stage')}.{block.removeprefix('Block_')}."
    (module,) = modules
    if module.startswith("Conv_"):
        name = f"conv{int(module.removeprefix('Conv_')) + 1}"
    elif module.startswith("BatchNorm_"):
        name = f"bn{int(module.removeprefix('BatchNorm_')) + 1}"
    elif module == "Downsample_Conv":
        name = "downsample.0"
    elif module == "Downsample_BatchNorm":
        name = "downsample.1"
    elif module == "fc":
        name = "fc"
    else:
        raise AssertionError(f"No torchvision name for {'/'.join(flax_path)}")

    if leaf == "kernel":
        transform = _conv if name != "fc" else np.transpose
        return f"{prefix}{name}.weight", transform
    return f"{prefix}{name}.{_BN_LEAVES.get(leaf, leaf)}", _identity


def _describe(model: ResNet) -> str:
    for name in _TORCHVISION_NAMES:
        reference = create_model(name, num_classes=model.num_classes)
        if (tuple(model.stage_sizes), model.block, model.width) == (
            reference.stage_sizes,
            reference.block,
            reference.width,
        ):
            return f"torchvision {name}"
    return (
        f"ResNet(stage_sizes={tuple(model.stage_sizes)}, block={model.block!r}, "
        f"width={model.width})"
    )


def _key_error(
    path: Any, what: str, missing: list[str], unused: list[str], state: Mapping[str, Any]
) -> str:
    parts = [f"{path} does not match the state_dict of {what}."]
    if missing:
        parts.append(f"Missing keys ({len(missing)}): {missing[:_SHOW]}.")
    if unused:
        parts.append(f"Unused keys ({len(unused)}): {unused[:_SHOW]}.")
    if state and all(k.startswith("module.") for k in state):
        parts.append("Every key starts with 'module.' (saved from DataParallel?): strip it.")
    return " ".join(parts)


def _zeros_state_dict(model: ResNet) -> dict[str, np.ndarray]:
    """A torchvision-layout state_dict of zeros for ``model`` (for docs and tests)."""
    out = {}
    for flax_path, leaf in _expected_variables(model).items():
        key, _ = _torch_key(flax_path)
        shape = leaf.shape
        if len(shape) == 4:
            shape = (shape[3], shape[2], shape[0], shape[1])
        elif len(shape) == 2:
            shape = shape[::-1]
        out[key] = np.zeros(shape, np.float32)
    return out
