"""Carrying optimizer state across a change of the frozen set."""

from typing import Any

import jax
import numpy as np

from layerfreeze import _paths

__all__ = ["transfer_opt_state"]


def transfer_opt_state(old_state: Any, new_state: Any) -> Any:
    """Fills a fresh optimizer state with what carries over from the old one.

    Both states come from `layerfreeze.freeze` over the same optimizer and
    params, under different specs (a new phase of an unfreezing schedule).
    `freeze` places `optimizer` at the same position in its trainable and
    frozen branches, so a state leaf is named by the branch-free part of its
    path (`mu/stage4/.../kernel`, `count`). A leaf of `new_state` takes the old
    value found under that name, looking in its own branch first, then in the
    other: parameters that stay trainable keep their Adam moments and step
    counts (a cohort's counts are named after the phase it began,
    `counts/since_<i>`); under method `lr0` newly unfrozen parameters continue
    with the moments they kept while frozen and the global step count; under
    method `zero` they start from `new_state`'s fresh values (no state was
    kept for them), with fresh step counts when the new phase's `freeze` was
    given `previous`.

    Args:
      old_state: the state before the change.
      new_state: `tx.init(params)` of the new phase's optimizer.

    Returns:
      `new_state` with carried-over leaves replaced by the old values.

    Raises:
      TypeError: either argument is not an optimizer state (None, a string, a
        model: anything that is not a pytree of arrays), or the two are
        different kinds of state (e.g. a parameter dict and a `freeze` state).

    >>> import jax.numpy as jnp, optax, layerfreeze as lf
    >>> params = {"stem": {"w": jnp.ones(2)}, "head": {"w": jnp.ones(2)}}
    >>> old_tx = lf.freeze(optax.adam(0.1), "stem")
    >>> old = old_tx.update(params, old_tx.init(params), params)[1]
    >>> new_tx = lf.freeze(optax.adam(0.1), "none", previous=["stem"])
    >>> new = transfer_opt_state(old, new_tx.init(params))
    >>> cohorts = new.inner_states["trainable"].inner_state[0]
    >>> int(cohorts.inner_state[0].count), int(cohorts.counts["since_1"][0])
    (1, 0)
    """
    _check_state("old_state", old_state)
    _check_state("new_state", new_state)
    if type(old_state) is not type(new_state):
        raise TypeError(
            f"old_state is a {type(old_state).__name__} but new_state is a "
            f"{type(new_state).__name__}; both must be states of the same optimizer, "
            "e.g. `layerfreeze.freeze(optimizer, spec).init(params)` under two specs."
        )
    old = {}
    for keypath, leaf in _flatten(old_state):
        branch, name = _split_branch(keypath)
        old.setdefault(name, {})[branch] = leaf

    def carry(keypath, fresh):
        branch, name = _split_branch(keypath)
        candidates = old.get(name, {})
        ordered = [candidates[branch]] if branch in candidates else []
        ordered += [v for b, v in candidates.items() if b != branch]
        for value in ordered:
            same_dtype = _dtype(value) == _dtype(fresh)
            if np.shape(value) == np.shape(fresh) and same_dtype:
                return value
        return fresh

    return jax.tree_util.tree_map_with_path(carry, new_state)


def _flatten(state: Any) -> list[tuple[Any, Any]]:
    return jax.tree_util.tree_flatten_with_path(state)[0]


def _split_branch(keypath: Any) -> tuple[str | None, str]:
    names = _paths.keypath_names(keypath)
    if (
        len(keypath) >= 2
        and isinstance(keypath[0], jax.tree_util.GetAttrKey)
        and keypath[0].name == "inner_states"
    ):
        return names[1], _paths.path_str(names[2:])
    return None, _paths.path_str(names)


def _dtype(x: Any) -> np.dtype:
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.result_type(x)


def _check_state(name: str, state: Any) -> None:
    """Raises a TypeError unless `state` is a pytree whose leaves are all arrays."""
    expected = f"{name} must be an optimizer state (e.g. `tx.init(params)`)"
    if state is None:
        raise TypeError(f"{expected}; got None.")
    flat = _flatten(state)
    if len(flat) == 1 and not flat[0][0]:  # `state` is itself a leaf
        raise TypeError(f"{expected}; got {type(state).__name__}, which is not a pytree.")
    for keypath, leaf in flat:
        if not (isinstance(leaf, bool | int | float) or hasattr(leaf, "dtype")):
            where = _paths.path_str(_paths.keypath_names(keypath))
            raise TypeError(
                f"{expected}; got a {type(state).__name__} whose leaf {where} is a "
                f"{type(leaf).__name__}, not an array."
            )
