"""Flax (linen) ResNets whose parameters are grouped into named stages.

The top level of both the ``params`` and the ``batch_stats`` collections is exactly the
groups in :data:`GROUPS` (``head`` has no ``batch_stats``), so freezing "the stem and the
first stage" is a statement about top-level keys. Inside a group every module has a fixed
name, which gives paths such as ``stage1/Block_0/Conv_0/kernel``::

    stem/Conv_0, stem/BatchNorm_0
    stageN/Block_i/{Conv_0, BatchNorm_0, Conv_1, BatchNorm_1[, Conv_2, BatchNorm_2]}
    stageN/Block_i/{Downsample_Conv, Downsample_BatchNorm}   (projection shortcut)
    head/Dense_0                                             (linear head)
    head/Dense_0 -> relu -> dropout -> head/Dense_1          (MLP head)

With ``stem="imagenet"`` and ``width=64`` the architecture and the parameter shapes are
those of torchvision's ``resnet18``, ``resnet34`` and ``resnet50`` (v1.5: the stride of a
downsampling bottleneck sits on its 3x3 conv), so torchvision weights load one to one
(see :mod:`layerfreeze.models.torchvision`). Every convolution pads explicitly and
symmetrically, like PyTorch; ``"SAME"`` would pad stride-2 convolutions asymmetrically.
"""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp
from flax import linen as nn
from flax.typing import Dtype

__all__ = [
    "BLOCKS",
    "GROUPS",
    "HEADS",
    "MODEL_NAMES",
    "STEMS",
    "ResNet",
    "create_model",
    "resnet10",
    "resnet18",
    "resnet34",
    "resnet50",
]

GROUPS: tuple[str, ...] = ("stem", "stage1", "stage2", "stage3", "stage4", "head")
"""Top-level parameter groups, in order from input to output."""

BLOCKS: tuple[str, ...] = ("basic", "bottleneck")
"""Residual block kinds: ``"basic"`` (two 3x3 convs) and ``"bottleneck"`` (expansion 4)."""

STEMS: tuple[str, ...] = ("cifar", "imagenet")
"""Stem kinds: ``"cifar"`` (3x3 conv, stride 1) and ``"imagenet"`` (torchvision's)."""

HEADS: tuple[str, ...] = ("linear", "mlp")
"""Classifier head kinds: one ``Dense`` layer, or ``Dense -> relu -> dropout -> Dense``."""

MODEL_NAMES: tuple[str, ...] = ("resnet10", "resnet18", "resnet34", "resnet50")
"""Names accepted by :func:`create_model`."""

_EXPANSION = {"basic": 1, "bottleneck": 4}
_STAGES = GROUPS[1:-1]


def _pad(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Symmetric padding that keeps the size for stride 1, as PyTorch's ``padding=k//2``."""
    p = kernel_size // 2
    return ((p, p), (p, p))


def _check_choice(what: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {what} {value!r}; valid choices are {list(choices)}.")


class _Layers:
    """Factories for the conv and BatchNorm layers of one group, sharing dtypes."""

    def __init__(self, dtype: Dtype, param_dtype: Dtype, use_running_average: bool):
        self.conv = functools.partial(nn.Conv, use_bias=False, dtype=dtype, param_dtype=param_dtype)
        self.norm = functools.partial(
            nn.BatchNorm,
            use_running_average=use_running_average,
            momentum=0.9,
            epsilon=1e-5,
            dtype=dtype,
            param_dtype=param_dtype,
        )


class _Stem(nn.Module):
    kind: str
    width: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, use_running_average: bool) -> jnp.ndarray:
        layers = _Layers(self.dtype, self.param_dtype, use_running_average)
        if self.kind == "imagenet":
            x = layers.conv(self.width, (7, 7), strides=2, padding=_pad(7), name="Conv_0")(x)
        else:
            x = layers.conv(self.width, (3, 3), strides=1, padding=_pad(3), name="Conv_0")(x)
        x = nn.relu(layers.norm(name="BatchNorm_0")(x))
        if self.kind == "imagenet":
            # max_pool pads with -inf, like torch.nn.MaxPool2d(3, 2, padding=1).
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3))
        return x


class _Block(nn.Module):
    """A basic or bottleneck residual block; ``features`` is the inner width."""

    kind: str
    features: int
    strides: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, use_running_average: bool) -> jnp.ndarray:
        layers = _Layers(self.dtype, self.param_dtype, use_running_average)
        out_features = self.features * _EXPANSION[self.kind]
        s = self.strides
        if self.kind == "basic":
            convs = [(self.features, 3, s), (self.features, 3, 1)]
        else:
            # torchvision v1.5: the stride sits on the 3x3 conv, not on the first 1x1.
            convs = [(self.features, 1, 1), (self.features, 3, s), (out_features, 1, 1)]
        y = x
        for i, (features, k, stride) in enumerate(convs):
            y = layers.conv(features, (k, k), strides=stride, padding=_pad(k), name=f"Conv_{i}")(y)
            y = layers.norm(name=f"BatchNorm_{i}")(y)
            if i < len(convs) - 1:
                y = nn.relu(y)
        shortcut = x
        if s != 1 or x.shape[-1] != out_features:
            shortcut = layers.conv(
                out_features, (1, 1), strides=s, padding=_pad(1), name="Downsample_Conv"
            )(x)
            shortcut = layers.norm(name="Downsample_BatchNorm")(shortcut)
        return nn.relu(y + shortcut)


class _Stage(nn.Module):
    kind: str
    num_blocks: int
    features: int
    strides: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, use_running_average: bool) -> jnp.ndarray:
        for i in range(self.num_blocks):
            x = _Block(
                self.kind,
                self.features,
                self.strides if i == 0 else 1,
                self.dtype,
                self.param_dtype,
                name=f"Block_{i}",
            )(x, use_running_average=use_running_average)
        return x


class _Head(nn.Module):
    kind: str
    num_classes: int
    hidden: int
    dropout: float
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        if self.kind == "linear":
            return dense(self.num_classes, name="Dense_0")(x)
        x = nn.relu(dense(self.hidden, name="Dense_0")(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return dense(self.num_classes, name="Dense_1")(x)


class ResNet(nn.Module):
    """ResNet v1.5 classifier whose parameters are grouped as :data:`GROUPS`.

    Inputs are NHWC images. Logits are returned in float32 whatever ``dtype`` is, so a loss
    computed from them does not lose precision under mixed precision.

    Attributes:
        stage_sizes: Number of blocks in each of the four stages, e.g. ``(2, 2, 2, 2)``.
        num_classes: Number of output logits.
        block: Block kind, one of :data:`BLOCKS`.
        stem: ``"imagenet"`` (7x7 stride-2 conv, BN, relu, 3x3 stride-2 max-pool, exactly as
            torchvision) or ``"cifar"`` (3x3 stride-1 conv, BN, relu, no pooling), see
            :data:`STEMS`.
        width: Channels of the stem and of the first stage; stage ``n`` has
            ``width * 2**(n-1)`` (times 4 at a bottleneck's output). 64 is torchvision's.
        head: ``"linear"`` or ``"mlp"``, see :data:`HEADS`.
        head_hidden: Hidden units of the MLP head.
        head_dropout: Dropout rate of the MLP head, active only when ``train=True``; it
            draws from the ``"dropout"`` rng.
        dtype: Compute dtype, e.g. ``jnp.bfloat16`` for mixed precision. BatchNorm
            statistics are reduced in float32 regardless.
        param_dtype: Dtype of the parameters.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> model = ResNet(stage_sizes=(1, 1, 1, 1), num_classes=10, stem="cifar", width=8)
        >>> x = jnp.zeros((2, 16, 16, 3))
        >>> variables = model.init(jax.random.key(0), x, train=False)
        >>> sorted(variables["params"]) == sorted(GROUPS)
        True
        >>> sorted(variables["batch_stats"]["stage1"]["Block_0"])
        ['BatchNorm_0', 'BatchNorm_1']
        >>> logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        >>> logits.shape
        (2, 10)
    """

    stage_sizes: tuple[int, ...]
    num_classes: int
    block: str = "basic"
    stem: str = "imagenet"
    width: int = 64
    head: str = "linear"
    head_hidden: int = 512
    head_dropout: float = 0.5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        # A list (say from a config) would make the module unhashable, hence unusable as a
        # static argument of jax.jit.
        object.__setattr__(self, "stage_sizes", tuple(self.stage_sizes))
        _check_choice("block", self.block, BLOCKS)
        _check_choice("stem", self.stem, STEMS)
        _check_choice("head", self.head, HEADS)
        if len(self.stage_sizes) != len(_STAGES) or any(n < 1 for n in self.stage_sizes):
            raise ValueError(
                f"stage_sizes must be {len(_STAGES)} positive block counts, one for each of "
                f"{list(_STAGES)}; got {self.stage_sizes!r}."
            )
        if not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(f"head_dropout must be in [0, 1); got {self.head_dropout!r}.")
        super().__post_init__()

    def __call__(
        self,
        x: jnp.ndarray,
        *,
        train: bool,
        start_after: str | None = None,
    ) -> jnp.ndarray:
        """Returns float32 logits of shape ``(batch, num_classes)``.

        Args:
            x: Images, NHWC; with ``start_after``, the output of that group instead.
            train: Training mode: BatchNorm normalises with batch statistics and updates
                its running statistics (apply with ``mutable=["batch_stats"]``), and the
                MLP head's dropout is active (pass a ``"dropout"`` rng). To keep the
                BatchNorm of frozen groups on their running statistics, apply inside
                :func:`layerfreeze.frozen_batchnorm` (:func:`layerfreeze.train.make_steps`
                does).
            start_after: Skip the groups up to and including this one (any group but
                ``"head"``): ``x`` is then that group's output, e.g. features cached with
                :meth:`features`. With ``"stage4"``, ``x`` may also be the
                ``[batch, channels]`` spatial mean the head reads
                (``features(..., pool=True)``). Skipped groups are not run and their
                variables are left untouched; initialise without ``start_after`` so that
                every group is created.

        Raises:
            ValueError: If ``start_after`` names a group that does not exist, or is
                ``"head"``.
        """
        first = 0
        if start_after is not None:
            _check_group("start_after", start_after, GROUPS[:-1])
            first = GROUPS.index(start_after) + 1
        return self._forward(x, train=train, first=first, last=len(GROUPS) - 1)

    def features(
        self, x: jnp.ndarray, *, upto: str, pool: bool = False, start_after: str | None = None
    ) -> jnp.ndarray:
        """Output of group ``upto`` in eval mode (BatchNorm on running statistics).

        Runs the groups from ``"stem"`` up to and including ``upto``. When those groups are
        frozen and their BatchNorm too, this output depends only on the input: it can be
        computed once per example and fed back with ``start_after=upto``.

        Args:
            x: Images, NHWC; with ``start_after``, the output of that group instead.
            upto: The last group to run, one of :data:`GROUPS` (``"head"`` gives logits).
            pool: Return the spatial mean of ``stage4``'s output, ``[batch, channels]``,
                which is all the head reads (16x smaller than the 4x4 map of a CIFAR
                ResNet). Only with ``upto="stage4"``.
            start_after: Skip the groups up to and including this one, a group before
                ``upto``: the features of a longer frozen prefix from those of a shorter one.

        Returns:
            The group's output in the compute ``dtype`` (float32 logits for ``"head"``).

        Raises:
            ValueError: If ``upto`` is not one of :data:`GROUPS`, ``pool`` is set with
                a group other than ``"stage4"``, or ``start_after`` is not a group before
                ``upto``.

        Example:
            >>> import jax, jax.numpy as jnp
            >>> model = ResNet(stage_sizes=(1, 1, 1, 1), num_classes=10, stem="cifar", width=8)
            >>> x = jnp.ones((2, 16, 16, 3))
            >>> variables = model.init(jax.random.key(0), x, train=False)
            >>> feats = model.apply(variables, x, upto="stage2", method=ResNet.features)
            >>> feats.shape
            (2, 8, 8, 16)
            >>> logits = model.apply(variables, feats, train=False, start_after="stage2")
            >>> bool(jnp.allclose(logits, model.apply(variables, x, train=False), atol=1e-5))
            True
        """
        _check_group("upto", upto, GROUPS)
        if pool and upto != "stage4":
            raise ValueError(
                f"pool=True is only valid with upto='stage4' (the head's input); got {upto!r}."
            )
        first = 0
        if start_after is not None:
            _check_group("start_after", start_after, GROUPS[: GROUPS.index(upto)])
            first = GROUPS.index(start_after) + 1
        x = self._forward(x, train=False, first=first, last=GROUPS.index(upto))
        return jnp.mean(x, axis=(1, 2)) if pool else x

    @nn.compact
    def _forward(self, x: jnp.ndarray, *, train: bool, first: int, last: int) -> jnp.ndarray:
        """Runs the groups ``GROUPS[first : last + 1]``; the head returns float32 logits."""

        def runs(group: str) -> bool:
            return first <= GROUPS.index(group) <= last

        x = jnp.asarray(x, self.dtype)
        if runs("stem"):
            x = _Stem(self.stem, self.width, self.dtype, self.param_dtype, name="stem")(
                x, use_running_average=not train
            )
        for i, (group, num_blocks) in enumerate(zip(_STAGES, self.stage_sizes, strict=True)):
            if not runs(group):
                continue
            x = _Stage(
                self.block,
                num_blocks,
                self.width * 2**i,
                1 if i == 0 else 2,
                self.dtype,
                self.param_dtype,
                name=group,
            )(x, use_running_average=not train)
        if not runs("head"):
            return x
        if x.ndim == 4:  # a 2-D input is stage4's spatial mean already (pooled features)
            x = jnp.mean(x, axis=(1, 2))
        x = _Head(
            self.head,
            self.num_classes,
            self.head_hidden,
            self.head_dropout,
            self.dtype,
            self.param_dtype,
            name="head",
        )(x, train=train)
        return jnp.asarray(x, jnp.float32)


def _check_group(what: str, group: Any, valid: tuple[str, ...]) -> None:
    if not isinstance(group, str) or group not in valid:
        raise ValueError(f"{what} must be one of {list(valid)}; got {group!r}.")


def resnet10(num_classes: int, **kw: Any) -> ResNet:
    """ResNet-10: basic blocks, one per stage, ``(1, 1, 1, 1)``.

    Half of ResNet-18's depth with the same groups and widths: it traces and
    compiles in about half the time, for quick runs and smoke tests.
    torchvision has no ResNet-10, so there are no torchvision weights for it.

    Args:
        num_classes: Number of output logits.
        **kw: Further :class:`ResNet` attributes (``stem``, ``width``, ``head``, ...).

    Example:
        >>> resnet10(10, stem="cifar").stage_sizes
        (1, 1, 1, 1)
    """
    return ResNet(stage_sizes=(1, 1, 1, 1), block="basic", num_classes=num_classes, **kw)


def resnet18(num_classes: int, **kw: Any) -> ResNet:
    """ResNet-18: basic blocks, stages ``(2, 2, 2, 2)``.

    Args:
        num_classes: Number of output logits.
        **kw: Further :class:`ResNet` attributes (``stem``, ``width``, ``head``, ...).

    Example:
        >>> resnet18(10, stem="cifar").stage_sizes
        (2, 2, 2, 2)
    """
    return ResNet(stage_sizes=(2, 2, 2, 2), block="basic", num_classes=num_classes, **kw)


def resnet34(num_classes: int, **kw: Any) -> ResNet:
    """ResNet-34: basic blocks, stages ``(3, 4, 6, 3)``.

    Args:
        num_classes: Number of output logits.
        **kw: Further :class:`ResNet` attributes (``stem``, ``width``, ``head``, ...).

    Example:
        >>> resnet34(10).block
        'basic'
    """
    return ResNet(stage_sizes=(3, 4, 6, 3), block="basic", num_classes=num_classes, **kw)


def resnet50(num_classes: int, **kw: Any) -> ResNet:
    """ResNet-50: bottleneck blocks (expansion 4), stages ``(3, 4, 6, 3)``.

    Args:
        num_classes: Number of output logits.
        **kw: Further :class:`ResNet` attributes (``stem``, ``width``, ``head``, ...).

    Example:
        >>> resnet50(10).block
        'bottleneck'
    """
    return ResNet(stage_sizes=(3, 4, 6, 3), block="bottleneck", num_classes=num_classes, **kw)


_FACTORIES = {
    "resnet10": resnet10,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
}


def create_model(name: str, *, num_classes: int, **kw: Any) -> ResNet:
    """Builds the ResNet called ``name``, one of :data:`MODEL_NAMES`.

    Args:
        name: ``"resnet10"``, ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``.
        num_classes: Number of output logits.
        **kw: Further :class:`ResNet` attributes (``stem``, ``width``, ``head``, ...).

    Returns:
        The (unbound) :class:`ResNet`.

    Raises:
        ValueError: If ``name`` is not one of :data:`MODEL_NAMES`.

    Example:
        >>> create_model("resnet18", num_classes=100, stem="cifar").stem
        'cifar'
    """
    if name not in _FACTORIES:
        raise ValueError(f"Unknown model name {name!r}; valid names are {list(MODEL_NAMES)}.")
    return _FACTORIES[name](num_classes, **kw)
