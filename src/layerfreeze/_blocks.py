"""Block views of a pytree: stacked leaves split into runs of blocks.

A stacked leaf (blocks run by `nn.scan`, depth on the leading axis) that a
spec freezes in some blocks and not in others cannot be one optax leaf: optax
labels, masks and optimizer state are per leaf. In a *block view* such a
leaf is replaced by a `Blocks` node whose children are its block ranges
`leaf[start:stop]`, one per run of blocks in the same state. Each child is
then wholly frozen or wholly trainable, so `optax.partition`, clipping and
optimizer state work per child: frozen blocks hold no optimizer state under
method `zero`, and newly unfrozen blocks get fresh state of their own.
`join` concatenates the children back into the stacked leaf.

The children's key in a key path is a `BlockKey`, printed `blocks[start:stop]`,
so the leaf paths of a view read `Transformer/encoderblock/.../kernel/blocks[0:6]`.
"""

import contextlib
import contextvars
import itertools
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from layerfreeze import _paths

__all__ = [
    "Blocks",
    "BlockKey",
    "join",
    "block_key_of",
    "runs",
    "segments_of",
    "scan_segments",
    "segments_context",
    "split",
    "stack_slice",
]

Bounds = tuple[tuple[int, int], ...]
# Per split stacked leaf, by path: its block ranges `(start, stop, frozen)`.
Segments = Mapping[str, tuple[tuple[int, int, bool], ...]]


class BlockKey(str):
    """The name of one block range of a split stacked leaf: `blocks[start:stop]`.

    A string (so checkpointers that name leaves by their key path store it as
    is), in a `jax.tree_util.DictKey`, with the range and the stack's depth as
    attributes.
    """

    start: int
    stop: int
    depth: int

    def __new__(cls, start: int, stop: int, depth: int) -> "BlockKey":
        key = super().__new__(cls, f"blocks[{start}:{stop}]")
        key.start, key.stop, key.depth = start, stop, depth
        return key

    def __reduce__(self) -> Any:
        return (BlockKey, (self.start, self.stop, self.depth))


@jax.tree_util.register_pytree_with_keys_class
class Blocks:
    """A stacked leaf split along its leading axis into consecutive block ranges.

    Attributes:
      parts: `leaf[start:stop]` for each range, in order.
      bounds: the `(start, stop)` of each range; they tile `0..depth`.
    """

    def __init__(self, parts: Sequence[Any], bounds: Bounds):
        self.parts = tuple(parts)
        self.bounds = tuple(bounds)

    def tree_flatten_with_keys(self) -> tuple[list[tuple[Any, Any]], Bounds]:
        depth = self.bounds[-1][1]
        keys = [jax.tree_util.DictKey(BlockKey(a, b, depth)) for a, b in self.bounds]
        return list(zip(keys, self.parts, strict=True)), self.bounds

    def tree_flatten(self) -> tuple[tuple[Any, ...], Bounds]:
        return self.parts, self.bounds

    @classmethod
    def tree_unflatten(cls, bounds: Bounds, parts: Sequence[Any]) -> "Blocks":
        return cls(parts, bounds)

    def __repr__(self) -> str:
        return f"Blocks({list(self.parts)!r}, bounds={self.bounds})"


def runs(values: Sequence[Hashable]) -> tuple[tuple[int, int, Hashable], ...]:
    """Maximal runs of equal consecutive values: `(start, stop, value)`.

    >>> runs([True, True, False])
    ((0, 2, True), (2, 3, False))
    """
    out: list[tuple[int, int, Hashable]] = []
    for i, value in enumerate(values):
        if out and out[-1][2] == value:
            out[-1] = (out[-1][0], i + 1, value)
        else:
            out.append((i, i + 1, value))
    return tuple(out)


def split(tree: Any, bounds: Sequence[Bounds | None]) -> Any:
    """The block view of `tree`: leaf `i` becomes a `Blocks` node when `bounds[i]` is set.

    >>> split({"w": np.arange(3)}, [((0, 1), (1, 3))])["w"]
    Blocks([array([0]), array([1, 2])], bounds=((0, 1), (1, 3)))
    """
    leaves, treedef = jax.tree.flatten(tree)
    if len(leaves) != len(bounds):
        raise ValueError(f"{len(bounds)} block plans for a tree of {len(leaves)} leaves.")
    if not any(bounds):
        return tree
    new = [
        leaf if b is None else Blocks([leaf[start:stop] for start, stop in b], b)
        for leaf, b in zip(leaves, bounds, strict=True)
    ]
    return jax.tree.unflatten(treedef, new)


def join(tree: Any) -> Any:
    """Concatenates each `Blocks` node of `tree` back into its stacked leaf."""

    def one(node: Any) -> Any:
        if not isinstance(node, Blocks):
            return node
        if all(isinstance(p, np.ndarray) for p in node.parts):
            return np.concatenate(node.parts)
        return jnp.concatenate(node.parts)

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, Blocks))


def block_key_of(keypath: Sequence[Any]) -> tuple[tuple[Any, ...], BlockKey | None]:
    """Splits a key path into the stacked leaf's key path and its `BlockKey`.

    Returns:
      `(keypath without the BlockKey, BlockKey)` for a child of a `Blocks` node,
      `(keypath, None)` otherwise.
    """
    keypath = tuple(keypath)
    for i, key in enumerate(keypath):
        if isinstance(key, jax.tree_util.DictKey) and isinstance(key.key, BlockKey):
            return keypath[:i] + keypath[i + 1 :], key.key
    return keypath, None


# Scan segments --------------------------------------------------------------

_SEGMENTS: contextvars.ContextVar[Segments | None] = contextvars.ContextVar(
    "layerfreeze_scan_segments", default=None
)


@contextlib.contextmanager
def segments_context(ranges: Segments) -> Iterator[None]:
    """Makes `scan_segments` answer from `ranges` inside.

    Args:
      ranges: for each split stacked leaf, by path, its block ranges
        `(start, stop, frozen)`.
    """
    token = _SEGMENTS.set(dict(ranges))
    try:
        yield
    finally:
        _SEGMENTS.reset(token)


def scan_segments(stack: str, depth: int) -> tuple[tuple[int, int], ...]:
    """The block ranges in which a model should scan the stacked blocks at `stack`.

    Inside a step built by `layerfreeze.value_and_grad` or
    `layerfreeze.train.make_steps`, a stack whose blocks a spec freezes in part
    is split where the frozen state changes (`Transformer/encoderblock[:6]`
    frozen: `((0, 6), (6, 12))`); everywhere else the answer is `((0, depth),)`.
    A scanned model that runs one scan per range over `stack_slice` of its
    stacked parameters leaves the frozen ranges out of differentiation, so
    their gradient work (and the whole backward pass of a frozen prefix)
    never exists. The bundled ViT does this.

    Args:
      stack: the path of the stacked subtree, e.g. `Transformer/encoderblock`.
      depth: the number of blocks.

    >>> scan_segments("Transformer/encoderblock", 12)
    ((0, 12),)
    """
    found = _SEGMENTS.get()
    if not found:
        return ((0, depth),)
    prefix = stack.rstrip("/") + "/"
    points = sorted({a for path, rs in found.items() if path.startswith(prefix) for a, _, _ in rs})
    points = [p for p in points if 0 < p < depth]
    edges = [0, *points, depth]
    return tuple(itertools.pairwise(edges))


def stack_slice(stack: str, stacked: Any, start: int, stop: int) -> Any:
    """Blocks `start:stop` of every leaf of the stacked subtree `stacked` at path `stack`.

    Leaves frozen in those blocks (by the step's block selectors; see
    `scan_segments`) come through `jax.lax.stop_gradient`, so nothing is
    differentiated through them: the range's frozen parameters cost no
    gradient work. Outside such a step it is plain slicing.
    """
    found = _SEGMENTS.get() or {}
    prefix = stack.rstrip("/")

    def one(keypath: Any, leaf: Any) -> Any:
        part = leaf[start:stop]
        names = [prefix, *_paths.keypath_names(keypath)]
        ranges = found.get("/".join(n for n in names if n), ())
        if any(a <= start and stop <= b and frozen for a, b, frozen in ranges):
            return jax.lax.stop_gradient(part)
        return part

    return jax.tree_util.tree_map_with_path(one, stacked)


def segments_of(paths: Sequence[str], bounds: Sequence[Bounds | None], mask: Any) -> Segments:
    """`segments_context`'s ranges from a block plan (`bounds`, view `mask`)."""
    flags = iter(jax.tree.leaves(mask))
    out = {}
    for path, b in zip(paths, bounds, strict=True):
        if b is None:
            next(flags)
            continue
        out[path] = tuple((a, z, bool(next(flags))) for a, z in b)
    return out
