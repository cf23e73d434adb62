"""Names for the leaves of a parameter pytree: `stage1/Block_0/Conv_0/kernel`."""

from collections.abc import Sequence
from typing import Any

import jax

__all__ = ["keypath_names", "leaf_paths", "path_differences", "path_str", "top_level_groups"]

_SEPARATOR = "/"


def keypath_names(keypath: Sequence[Any], *, drop_value: bool = True) -> tuple[str, ...]:
    """Turns a JAX key path into the names of its parts.

    Flax NNX variables flatten to their array under a trailing `.value`
    attribute; that part names no module, so it is dropped.

    Args:
      keypath: a key path as given by `jax.tree_util.tree_flatten_with_path`.
      drop_value: drop a trailing `.value` attribute (NNX variables).

    Returns:
      The names of the path's parts, e.g. `("stage1", "Block_0", "kernel")`.

    >>> import jax
    >>> [keypath_names(p) for p, _ in jax.tree_util.tree_flatten_with_path({'a': [1]})[0]]
    [('a', '0')]
    """
    names = []
    for key in keypath:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            names.append(key.name)
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            names.append(str(key.key))
        else:
            names.append(str(key))
    if drop_value and len(keypath) > 1 and isinstance(keypath[-1], jax.tree_util.GetAttrKey):
        if keypath[-1].name == "value":
            names.pop()
    return tuple(names)


def path_str(names: Sequence[str]) -> str:
    """Joins path names with `/`."""
    return _SEPARATOR.join(names)


def leaf_paths(tree: Any) -> list[str]:
    """Returns the `/`-joined path of every leaf of `tree`, in flattening order.

    >>> leaf_paths({'stem': {'kernel': 0}, 'head': {'bias': 0, 'kernel': 0}})
    ['head/bias', 'head/kernel', 'stem/kernel']
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [path_str(keypath_names(keypath)) for keypath, _ in flat]


def top_level_groups(paths: Sequence[str]) -> list[str]:
    """Returns the first path component of each path, unique, in order of appearance."""
    groups: dict[str, None] = {}
    for path in paths:
        groups.setdefault(path.split(_SEPARATOR, 1)[0], None)
    return list(groups)


def path_differences(
    expected: Sequence[str], got: Sequence[str], *, missing_from: str, extra_in: str
) -> list[str]:
    """What differs between two lists of leaf paths, for error messages.

    `["missing from <missing_from>: [...]", "not in <extra_in>: [...]"]`, empty ones left out.

    At most five paths each, sorted.
    """
    missing = sorted(set(expected) - set(got))[:5]
    extra = sorted(set(got) - set(expected))[:5]
    return [
        *([f"missing from {missing_from}: {missing}"] if missing else []),
        *([f"not in {extra_in}: {extra}"] if extra else []),
    ]
