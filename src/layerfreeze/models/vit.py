"""A Flax (linen) Vision Transformer with big_vision's parameter names.

The parameter tree is that of big_vision's ``vit.py`` (learned position embedding), so a
checkpoint converted from big_vision maps by name and shape::

    embedding/{kernel [p, p, C, width], bias}       patch embedding (a strided conv)
    pos_embedding [1, N, width]                     learned, N = (H / p) * (W / p)
    cls [1, 1, width]                               class token (pool="tok" only)
    Transformer/encoderblock_{i}/
        LayerNorm_0, MultiHeadDotProductAttention_1/{query, key, value, out},
        LayerNorm_2, MlpBlock_3/{Dense_0, Dense_1}
    Transformer/encoder_norm
    head                                            Dense(num_classes)

As in big_vision, the position embedding is added to the patch tokens *before* the class
token is prepended, so it has N rows, not N + 1 (the original ViT code, and timm, give
the class token a position row too; big_vision folds that row into ``cls`` on loading).

With ``scan=True`` the blocks are one ``nn.scan`` over ``Transformer/encoderblock``, whose
leaves have a leading depth axis, as with big_vision's ``scan=True``.
:func:`stack_blocks` and :func:`unstack_blocks` convert parameters between the two layouts,
and both models give the same outputs from the same weights.

Blocks are pre-norm: ``x + MHSA(LN(x))``, then ``x + MLP(LN(x))``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.typing import Dtype

import layerfreeze

__all__ = [
    "POOLS",
    "VIT_NAMES",
    "VIT_SIZES",
    "ViT",
    "create_vit",
    "stack_blocks",
    "unstack_blocks",
    "vit",
    "vit_groups",
]

VIT_SIZES: dict[str, dict[str, int]] = {
    "Ti": {"width": 192, "depth": 12, "mlp_dim": 768, "num_heads": 3},
    "S": {"width": 384, "depth": 12, "mlp_dim": 1536, "num_heads": 6},
    "B": {"width": 768, "depth": 12, "mlp_dim": 3072, "num_heads": 12},
}
"""Model sizes (big_vision's variants, Table 2 of arXiv:2106.04560)."""

POOLS: tuple[str, ...] = ("tok", "gap")
"""Poolings: ``"tok"`` (the class token's output) and ``"gap"`` (mean over tokens)."""

# Names are "vit_<size><patch>": size lower-cased, then the patch size in pixels, e.g.
# "vit_ti4" is ViT-Ti with 4x4 patches (for 32x32 CIFAR images: 64 tokens).
_NAMED: dict[str, tuple[str, int]] = {
    "vit_ti4": ("Ti", 4),
    "vit_s4": ("S", 4),
    "vit_ti16": ("Ti", 16),
    "vit_s16": ("S", 16),
}
VIT_NAMES: tuple[str, ...] = tuple(_NAMED)
"""Names accepted by :func:`create_vit`: ``vit_<size><patch>``, e.g. ``vit_ti4``."""

_BLOCK = "encoderblock"
_BLOCK_RE = re.compile(rf"{_BLOCK}_(\d+)")


class MlpBlock(nn.Module):
    """Dense -> gelu -> dropout -> Dense, back to the input width."""

    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        inits = dict(
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(stddev=1e-6),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        width = x.shape[-1]
        x = nn.Dense(self.mlp_dim, name="Dense_0", **inits)(x)
        x = nn.gelu(x)
        x = nn.Dropout(rate=self.dropout)(x, deterministic)
        return nn.Dense(width, name="Dense_1", **inits)(x)


class EncoderBlock(nn.Module):
    """A pre-norm transformer block; returns ``(x, None)`` so that it can be scanned."""

    mlp_dim: int
    num_heads: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> tuple[jax.Array, None]:
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = nn.LayerNorm(name="LayerNorm_0", **dtypes)(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            kernel_init=nn.initializers.xavier_uniform(),
            deterministic=deterministic,
            name="MultiHeadDotProductAttention_1",
            **dtypes,
        )(y, y)
        x = x + nn.Dropout(rate=self.dropout)(y, deterministic)
        y = nn.LayerNorm(name="LayerNorm_2", **dtypes)(x)
        y = MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout, name="MlpBlock_3", **dtypes)(
            y, deterministic
        )
        return x + nn.Dropout(rate=self.dropout)(y, deterministic), None


class Encoder(nn.Module):
    """``depth`` blocks (unrolled, or one scan) and the final LayerNorm."""

    depth: int
    mlp_dim: int
    num_heads: int
    dropout: float = 0.0
    scan: bool = False
    scan_unroll: int | bool = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        block_kw = dict(
            mlp_dim=self.mlp_dim,
            num_heads=self.num_heads,
            dropout=self.dropout,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        if self.scan:
            path = "/".join((*self.path, _BLOCK))
            segments = layerfreeze.scan_segments(path, self.depth)
            if len(segments) > 1 and not self.is_initializing():
                x = self._scan_segments(x, deterministic, path, segments, block_kw)
            else:
                blocks = nn.scan(
                    EncoderBlock,
                    variable_axes={"params": 0},
                    split_rngs={"params": True, "dropout": True},
                    in_axes=nn.broadcast,
                    length=self.depth,
                    unroll=self.scan_unroll,
                )(name=_BLOCK, **block_kw)
                x, _ = blocks(x, deterministic)
        else:
            for i in range(self.depth):
                x, _ = EncoderBlock(name=f"{_BLOCK}_{i}", **block_kw)(x, deterministic)
        return nn.LayerNorm(name="encoder_norm", dtype=self.dtype, param_dtype=self.param_dtype)(x)

    def _scan_segments(
        self,
        x: jax.Array,
        deterministic: bool,
        path: str,
        segments: tuple[tuple[int, int], ...],
        block_kw: dict[str, Any],
    ) -> jax.Array:
        """The stacked blocks as one scan per block range (`layerfreeze.scan_segments`).

        Each scan takes its slice of the stacked parameters, so a frozen
        range's parameters are not differentiated and XLA drops their gradient
        work. Dropout draws one key per block from the module's `dropout` key
        (not the stream of an unsplit `nn.scan`).
        """
        stacked = self.variables["params"][_BLOCK]
        block = EncoderBlock(**block_kw)
        use_dropout = not deterministic and self.dropout > 0
        keys = jax.random.split(self.make_rng("dropout"), self.depth) if use_dropout else None

        def body(h, xs):
            params, key = xs
            rngs = {"dropout": key} if key is not None else {}
            return block.apply({"params": params}, h, deterministic, rngs=rngs)[0], None

        for start, stop in segments:
            part = layerfreeze.stack_slice(path, stacked, start, stop)
            part_keys = None if keys is None else keys[start:stop]
            x, _ = jax.lax.scan(body, x, (part, part_keys), unroll=self.scan_unroll)
        return x


class ViT(nn.Module):
    """Vision Transformer classifier; the module docstring lists its parameters.

    Attributes:
        num_classes: Number of output logits.
        patch_size: Side of the square patches, in pixels; it must divide the image's
            height and width (4 for 32x32 CIFAR images, 16 for 224x224 ImageNet).
        width: Token width.
        depth: Number of transformer blocks.
        mlp_dim: Hidden width of each block's MLP.
        num_heads: Attention heads; they must divide ``width``.
        pool: One of :data:`POOLS`.
        dropout: Dropout rate after the embeddings, attention and MLPs (in training).
        scan: Stack the blocks with ``nn.scan`` (``Transformer/encoderblock``). In a
            step where a spec freezes some blocks (``Transformer/encoderblock[:6]``), the
            blocks run as one scan per run of frozen or trainable blocks
            (``layerfreeze.scan_segments``), so the frozen blocks cost no backward work.
        scan_unroll: ``unroll`` of the scan (``True``: fully unrolled, e.g. to count
            compiled FLOPs, which XLA counts once per loop body otherwise).
        head_zeroinit: Initialise the head's kernel to zeros (big_vision's default).
        dtype: Computation dtype (e.g. ``jnp.bfloat16``); the logits are float32.
        param_dtype: Parameter dtype.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> model = ViT(num_classes=10, patch_size=4, width=32, depth=2, mlp_dim=64,
        ...             num_heads=2)
        >>> x = jnp.zeros((1, 16, 16, 3))
        >>> params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
        >>> sorted(params)
        ['Transformer', 'cls', 'embedding', 'head', 'pos_embedding']
        >>> params["pos_embedding"].shape
        (1, 16, 32)
    """

    num_classes: int
    patch_size: int = 16
    width: int = 192
    depth: int = 12
    mlp_dim: int = 768
    num_heads: int = 3
    pool: str = "tok"
    dropout: float = 0.0
    scan: bool = False
    scan_unroll: int | bool = 1
    head_zeroinit: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        if self.pool not in POOLS:
            raise ValueError(f"Unknown pool {self.pool!r}; valid choices are {list(POOLS)}.")
        if self.width % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} does not divide width={self.width}; "
                f"choose a number of heads that divides the width."
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        p = self.patch_size
        height, width = x.shape[-3:-1]
        if height % p or width % p:
            raise ValueError(
                f"patch_size={p} does not divide the image size {height}x{width}; use a "
                f"patch size that divides both sides (e.g. 4 for 32x32, 16 for 224x224)."
            )
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Conv(
            self.width, (p, p), strides=(p, p), padding="VALID", name="embedding", **dtypes
        )(x)
        n, h, w, c = x.shape
        x = jnp.reshape(x, (n, h * w, c))
        pos = self.param(
            "pos_embedding",
            nn.initializers.normal(stddev=1 / np.sqrt(c)),
            (1, h * w, c),
            self.param_dtype,
        )
        x = x + jnp.asarray(pos, x.dtype)
        if self.pool == "tok":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, c), self.param_dtype)
            x = jnp.concatenate([jnp.tile(jnp.asarray(cls, x.dtype), (n, 1, 1)), x], axis=1)
        x = nn.Dropout(rate=self.dropout)(x, not train)
        x = Encoder(
            depth=self.depth,
            mlp_dim=self.mlp_dim,
            num_heads=self.num_heads,
            dropout=self.dropout,
            scan=self.scan,
            scan_unroll=self.scan_unroll,
            name="Transformer",
            **dtypes,
        )(x, not train)
        x = x[:, 0] if self.pool == "tok" else jnp.mean(x, axis=1)
        head_kw = {"kernel_init": nn.initializers.zeros} if self.head_zeroinit else {}
        x = nn.Dense(self.num_classes, name="head", **dtypes, **head_kw)(x)
        return jnp.asarray(x, jnp.float32)


def vit(size_name: str, *, patch_size: int, num_classes: int, **kw: Any) -> ViT:
    """The ViT of size ``size_name`` (a key of :data:`VIT_SIZES`).

    Args:
        size_name: ``"Ti"``, ``"S"`` or ``"B"``.
        patch_size: Side of the square patches, in pixels.
        num_classes: Number of output logits.
        **kw: Further :class:`ViT` attributes (``pool``, ``scan``, ``dtype``, ...); they
            may override the size's ``width``, ``depth``, ``mlp_dim`` or ``num_heads``.

    Returns:
        The (unbound) :class:`ViT`.

    Raises:
        ValueError: If ``size_name`` is not a key of :data:`VIT_SIZES`.

    Example:
        >>> vit("S", patch_size=16, num_classes=1000).width
        384
    """
    if size_name not in VIT_SIZES:
        raise ValueError(f"Unknown ViT size {size_name!r}; valid sizes are {list(VIT_SIZES)}.")
    return ViT(num_classes=num_classes, patch_size=patch_size, **{**VIT_SIZES[size_name], **kw})


def create_vit(name: str, *, num_classes: int, **kw: Any) -> ViT:
    """Builds the ViT called ``name``, one of :data:`VIT_NAMES`.

    A name is ``vit_<size><patch>``: the size (a key of :data:`VIT_SIZES`, lower-cased)
    followed by the patch size in pixels. ``vit_ti4`` and ``vit_s4`` suit 32x32 images
    (64 tokens), ``vit_ti16`` and ``vit_s16`` 224x224 images (196 tokens).

    Args:
        name: One of :data:`VIT_NAMES`.
        num_classes: Number of output logits.
        **kw: Further :class:`ViT` attributes.

    Raises:
        ValueError: If ``name`` is not one of :data:`VIT_NAMES`.

    Example:
        >>> m = create_vit("vit_ti4", num_classes=10)
        >>> m.width, m.patch_size
        (192, 4)
    """
    if name not in _NAMED:
        raise ValueError(f"Unknown ViT name {name!r}; valid names are {list(VIT_NAMES)}.")
    size_name, patch_size = _NAMED[name]
    return vit(size_name, patch_size=patch_size, num_classes=num_classes, **kw)


def vit_groups(depth: int, *, pool: str = "tok", scan: bool = False) -> tuple[str, ...]:
    """A ViT's parameter groups, input to output, as path prefixes.

    The embeddings are three groups, in the order the forward pass uses them:
    ``embedding`` (the patch conv), ``pos_embedding`` and, with ``pool="tok"``, ``cls``.
    They are separate entries because each entry is one path-prefix rule of a freeze spec
    and ``cls`` does not exist with ``pool="gap"``; to freeze "the embeddings", freeze all
    three (``groups[:3]`` with ``pool="tok"``, ``groups[:2]`` with ``"gap"``). Then come
    one group per block, the final LayerNorm and the head. With ``scan=True`` a block's
    group is a block selector, ``Transformer/encoderblock[i]`` (block ``i`` along the
    leading axis of the stacked leaves), so schedules, layer-wise decay and the summary
    treat a scanned ViT block by block, as the unrolled one.

    Args:
        depth: Number of transformer blocks.
        pool: One of :data:`POOLS`.
        scan: Whether the model stacks its blocks (``ViT(scan=True)``).

    Raises:
        ValueError: If ``pool`` is not one of :data:`POOLS` or ``depth`` < 1.

    Example:
        >>> vit_groups(2)
        ('embedding', 'pos_embedding', 'cls', 'Transformer/encoderblock_0', \
'Transformer/encoderblock_1', 'Transformer/encoder_norm', 'head')
        >>> ",".join(vit_groups(2, pool="gap")[:3])
        'embedding,pos_embedding,Transformer/encoderblock_0'
        >>> vit_groups(2, scan=True)[3:5]
        ('Transformer/encoderblock[0]', 'Transformer/encoderblock[1]')
    """
    if pool not in POOLS:
        raise ValueError(f"Unknown pool {pool!r}; valid choices are {list(POOLS)}.")
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}.")
    embeddings = ("embedding", "pos_embedding") + (("cls",) if pool == "tok" else ())
    if scan:
        blocks = tuple(f"Transformer/{_BLOCK}[{i}]" for i in range(depth))
    else:
        blocks = tuple(f"Transformer/{_BLOCK}_{i}" for i in range(depth))
    return embeddings + blocks + ("Transformer/encoder_norm", "head")


def stack_blocks(params: Mapping[str, Any]) -> dict[str, Any]:
    """Unrolled ViT parameters -> those of ``ViT(scan=True)``.

    ``Transformer/encoderblock_{0..depth-1}`` become ``Transformer/encoderblock``, each
    leaf stacked along a new leading axis (block ``i`` at index ``i``). Other parameters
    are kept as they are. numpy leaves stay numpy.

    Raises:
        ValueError: If there are no ``encoderblock_{i}`` entries, their numbers are not
            ``0..depth-1``, their structures differ, or the blocks are already stacked.

    Example:
        >>> import numpy as np
        >>> p = {"Transformer": {f"encoderblock_{i}": {"w": np.full(2, i)} for i in range(3)}}
        >>> stack_blocks(p)["Transformer"]["encoderblock"]["w"].tolist()
        [[0, 0], [1, 1], [2, 2]]
    """
    params, encoder = _split_encoder(params)
    if _BLOCK in encoder:
        raise ValueError("The blocks are already stacked (Transformer/encoderblock exists).")
    numbered = {int(m.group(1)): k for k in encoder if (m := _BLOCK_RE.fullmatch(k))}
    if not numbered:
        raise ValueError(
            f"No Transformer/{_BLOCK}_{{i}} entries to stack; the Transformer has "
            f"{sorted(encoder)}."
        )
    if sorted(numbered) != list(range(len(numbered))):
        raise ValueError(f"Block numbers must be 0..{len(numbered) - 1}, got {sorted(numbered)}.")
    blocks = [encoder.pop(numbered[i]) for i in range(len(numbered))]
    structures = {jax.tree.structure(b) for b in blocks}
    if len(structures) > 1:
        raise ValueError("The blocks have different parameter structures; they cannot stack.")
    encoder[_BLOCK] = jax.tree.map(lambda *xs: _xp(xs[0]).stack(xs), *blocks)
    params["Transformer"] = encoder
    return params


def unstack_blocks(params: Mapping[str, Any]) -> dict[str, Any]:
    """``ViT(scan=True)`` parameters -> those of the unrolled ViT.

    The inverse of :func:`stack_blocks`: each leaf of ``Transformer/encoderblock`` is
    split along its leading axis into ``Transformer/encoderblock_{i}``.

    Raises:
        ValueError: If there is no ``Transformer/encoderblock`` entry.

    Example:
        >>> import numpy as np
        >>> p = {"Transformer": {"encoderblock": {"w": np.arange(4).reshape(2, 2)}}}
        >>> unstack_blocks(p)["Transformer"]["encoderblock_1"]["w"].tolist()
        [2, 3]
    """
    params, encoder = _split_encoder(params)
    if _BLOCK not in encoder:
        raise ValueError(
            f"No Transformer/{_BLOCK} entry to unstack; the Transformer has {sorted(encoder)}."
        )
    stacked = encoder.pop(_BLOCK)
    depth = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(depth):
        encoder[f"{_BLOCK}_{i}"] = jax.tree.map(lambda leaf, i=i: leaf[i], stacked)
    params["Transformer"] = encoder
    return params


def _split_encoder(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Shallow copies of ``params`` and of its ``Transformer`` entry."""
    if not isinstance(params, Mapping) or not isinstance(params.get("Transformer"), Mapping):
        raise ValueError(
            "Expected ViT parameters, a mapping with a 'Transformer' entry (pass "
            "variables['params'], not the variables)."
        )
    return dict(params), dict(params["Transformer"])


def _xp(leaf: Any) -> Any:
    """numpy for numpy leaves (e.g. loaded from an .npz), jax.numpy otherwise."""
    return np if isinstance(leaf, np.ndarray) else jnp
