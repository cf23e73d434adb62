"""Carrying optimizer state across a change of the frozen set."""

import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from layerfreeze import _blocks, _checks, _freeze, _paths, _spec, _upstream

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
    return carry(old_state, new_state)


def carry(old_state: Any, new_state: Any, pieces: "Pieces | None" = None) -> Any:
    """`transfer_opt_state` without its argument checks; the leaves made of pieces by
    `pieces` (`compile_pieces` for these states' shapes) when given."""
    sources, started_fresh = _sources(old_state, new_state)
    old_leaves = [leaf for _, leaf in _flatten(old_state)]
    new_leaves, treedef = jax.tree.flatten(new_state)
    assembled = {}
    if pieces is not None:
        olds = tuple(old_leaves[i] for i in pieces.old)
        made = pieces.program(olds, tuple(new_leaves[j] for j in pieces.which))
        assembled = dict(zip(pieces.which, made, strict=True))
    leaves = [
        assembled[j] if j in assembled else _take(src, old_leaves, fresh)
        for j, (src, fresh) in enumerate(zip(sources, new_leaves, strict=True))
    ]
    carried = jax.tree.unflatten(treedef, leaves)
    if started_fresh:
        _warn_spent_counts(old_state, carried, started_fresh)
    return carried


# Where each leaf of the new state comes from: None, its fresh value; an int, the
# old leaf of that index (in flattening order); a tuple of `(old leaf index, or None
# for the fresh leaf, start, stop)`, the rows of each piece, concatenated along
# axis 0 (a stacked leaf's state whose block ranges changed).
Source = None | int | tuple[tuple[int | None, int, int], ...]


def _sources(old_state: Any, new_state: Any) -> tuple[list[Source], list[str]]:
    """Each new leaf's `Source`, and the names of trainable leaves no old leaf holds.

    Decided from paths, shapes and dtypes alone: the states may be abstract
    (`jax.ShapeDtypeStruct`s).
    """
    old: dict[str, dict[str | None, list[tuple[tuple[int, int] | None, int, Any]]]] = {}
    for index, (keypath, leaf) in enumerate(_flatten(old_state)):
        branch, name, blocks = _split_branch(keypath)
        old.setdefault(name, {}).setdefault(branch, []).append((blocks, index, leaf))

    sources: list[Source] = []
    started_fresh: list[str] = []
    for keypath, fresh in _flatten(new_state):
        branch, name, blocks = _split_branch(keypath)
        candidates = old.get(name, {})
        if not candidates and branch == _spec.TRAINABLE and np.ndim(fresh):
            started_fresh.append(name)
        ordered = list(candidates.get(branch, []))
        ordered += [v for b, vs in candidates.items() if b != branch for v in vs]
        if blocks is None and all(r is None for r, _, _ in ordered):
            same = (
                i
                for _, i, value in ordered
                if np.shape(value) == np.shape(fresh) and _dtype(value) == _dtype(fresh)
            )
            sources.append(next(same, None))
        else:
            sources.append(_block_pieces(fresh, blocks, ordered))
    return sources, started_fresh


def _take(source: Source, old_leaves: Sequence[Any], fresh: Any) -> Any:
    """The new leaf that `source` describes (traceable: `compile_pieces` jits it)."""
    if source is None:
        return fresh
    if isinstance(source, int):
        return old_leaves[source]
    parts = [(fresh if i is None else old_leaves[i])[a:b] for i, a, b in source]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


class Pieces(NamedTuple):
    """The leaves `transfer_opt_state` assembles from pieces, as one compiled program.

    Attributes:
      which: the indices of those leaves in the new state (flattening order).
      old: the indices of the old leaves they take rows from.
      program: `(old leaves, fresh leaves at which) -> the leaves at which`.
    """

    which: tuple[int, ...]
    old: tuple[int, ...]
    program: Any


def compile_pieces(old_state: Any, new_state: Any) -> Pieces | None:
    """`transfer_opt_state(old_state, new_state)`'s slicing and concatenating, compiled.

    Carrying a stacked leaf's state across a change of its frozen block range
    takes rows of old leaves; run eagerly, every slice and concatenation is
    a small program of its own (compiled at the change the first time its
    shapes occur). This compiles them all as one, for abstract states
    (`jax.ShapeDtypeStruct`s with shardings; each output in its fresh
    leaf's sharding); `carry(old_state, new_state, pieces)` runs it. Nothing
    else is in it: the leaves taken whole stay the arrays they are.

    Returns:
      None when no leaf is made of pieces.
    """
    sources, _ = _sources(old_state, new_state)
    which = tuple(j for j, src in enumerate(sources) if isinstance(src, tuple))
    if not which:
        return None
    old_leaves = [leaf for _, leaf in _flatten(old_state)]
    new_leaves = jax.tree.leaves(new_state)
    used = tuple(sorted({i for j in which for i, _, _ in sources[j] if i is not None}))

    def assemble(olds: tuple[Any, ...], fresh: tuple[Any, ...]) -> tuple[Any, ...]:
        by_index = dict(zip(used, olds, strict=True))
        return tuple(_take(sources[j], by_index, f) for j, f in zip(which, fresh, strict=True))

    shardings = tuple(getattr(new_leaves[j], "sharding", None) for j in which)
    jit_kw = {} if None in shardings else {"out_shardings": shardings}
    program = (
        jax.jit(assemble, **jit_kw)
        .lower(tuple(old_leaves[i] for i in used), tuple(new_leaves[j] for j in which))
        .compile()
    )
    return Pieces(which, used, program)


def _warn_spent_counts(old_state: Any, new_state: Any, started_fresh: list[str]) -> None:
    """Warns when newly trainable leaves share step counts that earlier phases spent.

    Under method `zero` a frozen leaf keeps no state; when it becomes trainable
    it needs counts of its own (a cohort, from `freeze(..., previous=...)`),
    else Adam's bias correction treats its zero moments as if they had
    averaged every earlier step and its first updates come out too large.
    """
    is_cohorts = lambda x: isinstance(x, _freeze.CohortsState)
    new_cohorts = [n for n in jax.tree.leaves(new_state, is_leaf=is_cohorts) if is_cohorts(n)]
    if not new_cohorts or any(c.counts for c in new_cohorts):
        return  # not a `freeze` state, or the new phase was given its history
    old_cohorts = [n for n in jax.tree.leaves(old_state, is_leaf=is_cohorts) if is_cohorts(n)]
    spent = [int(np.max(c)) for o in old_cohorts for c in _freeze.bias_counts(o.inner_state)]
    if not spent or max(spent) == 0:
        return
    parts = [name.split("/") for name in sorted(set(started_fresh))]
    # Drop the optimizer's nesting (`inner_state/0/...`) that every name shares.
    shared = 0
    while shared < min(map(len, parts)) - 1 and len({n[shared] for n in parts}) == 1:
        shared += 1
    leaves = [_paths.path_str(name[shared:]) for name in parts]
    warnings.warn(
        f"transfer_opt_state: {_checks.listing(leaves, 5)} had no optimizer state (frozen) "
        f"and now train, but share the step count of {max(spent)} that the earlier "
        "phases spent: Adam-style bias correction will make their first updates several "
        "times too large. Build the new phase's optimizer with its history, "
        "layerfreeze.freeze(optimizer, spec, previous=[earlier specs]) (train.make_steps "
        "and train.Phases pass it), so newly unfrozen leaves count their own steps.",
        stacklevel=3,
    )


def _block_pieces(
    fresh: Any,
    blocks: tuple[int, int] | None,
    candidates: list[tuple[tuple[int, int] | None, int, Any]],
) -> Source:
    """Blocks `blocks` of a stacked leaf's state, taken from old parts that hold them.

    A stacked leaf split into block ranges by `freeze` (see `_blocks`) has one
    state leaf per range, and the ranges change from phase to phase. Each
    block comes from the first old part that holds it (an old whole leaf holds
    every block) with the same per-block shape and dtype, else from `fresh`.
    """
    if not np.ndim(fresh):
        return None
    start, stop = blocks if blocks is not None else (0, np.shape(fresh)[0])
    sources = []
    for old_blocks, index, value in candidates:
        if not np.ndim(value) or np.shape(value)[1:] != np.shape(fresh)[1:]:
            continue
        if _dtype(value) != _dtype(fresh):
            continue
        a, b = old_blocks if old_blocks is not None else (0, np.shape(value)[0])
        if b - a != np.shape(value)[0]:
            continue
        sources.append((a, b, index))
    pieces: list[tuple[int | None, int, int]] = []
    block, taken = start, False
    while block < stop:
        source = next(((a, b, i) for a, b, i in sources if a <= block < b), None)
        if source is None:
            end = min([a for a, _, _ in sources if a > block] + [stop])
            pieces.append((None, block - start, end - start))
        else:
            a, b, index = source
            end = min(b, stop)
            pieces.append((index, block - a, end - a))
            taken = True
        block = end
    if not taken:
        return None
    if len(pieces) == 1 and pieces[0][0] is not None:  # one old leaf: whole, or some rows
        index, a, b = pieces[0]
        whole = next(v for _, i, v in candidates if i == index)
        if (a, b) == (0, np.shape(whole)[0]):
            return index
    return tuple(pieces)


def _flatten(state: Any) -> list[tuple[Any, Any]]:
    return jax.tree_util.tree_flatten_with_path(state)[0]


def _split_branch(keypath: Any) -> tuple[str | None, str, tuple[int, int] | None]:
    """`(partition branch or None, branch-free name, block range or None)` of a state leaf."""
    keypath, key = _blocks.block_key_of(keypath)
    blocks = None if key is None else (key.start, key.stop)
    names = _paths.keypath_names(keypath)
    if len(keypath) >= 2 and _upstream.is_partition_states_key(keypath[0]):
        return names[1], _paths.path_str(names[2:]), blocks
    return None, _paths.path_str(names), blocks


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
