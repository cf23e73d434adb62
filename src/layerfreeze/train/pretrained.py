"""Start a model from an earlier run's weights: load them, merge them into a fresh init.

Transfer learning starts the target model from a source run (say CIFAR-100)
whose architecture matches except where the task differs (the head's class
count). `load_run` reads the source's `params` and `batch_stats` from its
newest intact checkpoint; `merge_pretrained` puts them into a freshly
initialised target, group by group (the top-level keys, e.g. `stem`,
`stage1`, ..., `head`), keeps the fresh init where a group does not fit and
says which groups those are.

>>> import numpy as np
>>> fresh = {"params": {"body": {"w": np.zeros(3)}, "head": {"w": np.zeros((3, 10))}}}
>>> source = {"params": {"body": {"w": np.ones(3)}, "head": {"w": np.ones((3, 20))}}}
>>> variables, reinit = merge_pretrained(fresh, source)
>>> variables["params"]["body"]["w"].tolist(), reinit
([1.0, 1.0, 1.0], ('head',))
"""

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from layerfreeze import _checks, _paths
from layerfreeze.train import checkpoint

__all__ = ["load_run", "merge_pretrained"]

# Keys that a run may lack: a model without BatchNorm saves no batch_stats.
_OPTIONAL_KEYS = ("batch_stats",)
# Leaves listed per group in an error message before it says "and N more".
_MAX_LISTED = 5
_WHAT_TO_PASS = (
    "pass the workdir of an earlier run (the directory holding its checkpoints/) or that "
    "checkpoints directory itself"
)


def load_run(
    path: str | os.PathLike[str],
    keys: Sequence[str] = ("params", "batch_stats"),
    *,
    reference: checkpoint.Reference | Callable[[], checkpoint.Reference | None] | None = None,
) -> tuple[dict[str, Any], int, list[tuple[int, str]]]:
    """Reads variables from the newest intact checkpoint of an earlier run.

    Uses `checkpoint.Checkpointer.restore_arrays_latest_intact`: no target
    structure is needed (shapes and dtypes come from the checkpoint, so an
    optimizer state of any structure is fine; only `keys` are returned), and
    damaged steps are skipped and reported (and logged as warnings), never
    moved or changed.

    A run that was itself fine-tuned may have saved its steps against its own
    source (`checkpoint.Reference`): the leaves still equal to that source are
    not in its steps. They are read from `reference`, the values that run
    started from, after checking that their content is the recorded one. Only
    the caller knows how to find them again (the experiment reads the run's
    `config.json` for its `init_from` and loads that into the run's model), so
    give a function: it is called only if the step read left leaves out.
    Without one, such a run is refused with `checkpoint.CheckpointSourceError`
    naming its source, never read with leaves missing.

    Args:
      path: the run's workdir (holding `checkpoints/`), or a checkpoint
        directory itself (holding numbered steps).
      keys: top-level entries of the saved state to read. A missing
        `batch_stats` (a model without BatchNorm) comes back as `{}`; any
        other missing key is an error.
      reference: the source the run's steps were saved against, or a function
        returning it (or None: not found), called once if it is needed.

    Returns:
      `(variables, step, damaged)`: `{key: nested dicts of NumPy arrays}` for
      each of `keys`, the step read, and `(step, reason)` for each newer
      damaged step skipped, newest first.

    Raises:
      FileNotFoundError: `path` does not exist, is a file, or holds no
        checkpoint; the message says what to pass.
      ValueError: the checkpoint lacks a key of `keys` other than
        `batch_stats`; the message lists what it has.
      checkpoint.CheckpointSourceError: (a ValueError) the step read leaves out
        leaves equal to the run's source, and `reference` gives none, or one
        whose content differs; the message names the source recorded.
      checkpoint.CheckpointDamagedError: every step is damaged.

    >>> import tempfile, pathlib
    >>> import numpy as np
    >>> from layerfreeze.train import checkpoint
    >>> workdir = pathlib.Path(tempfile.mkdtemp())
    >>> state = {"params": {"head": {"w": np.ones(2, np.float32)}}, "opt_state": np.zeros(2)}
    >>> with checkpoint.Checkpointer(workdir / "checkpoints") as ckpt:
    ...     ckpt.save(7, state, metadata={})
    >>> variables, step, damaged = load_run(workdir)
    >>> variables["params"]["head"]["w"].tolist(), variables["batch_stats"], step, damaged
    ([1.0, 1.0], {}, 7, [])
    """
    keys = _check_keys(keys)
    directory = _checkpoint_directory(path)
    with checkpoint.Checkpointer(directory, max_to_keep=None, reference=reference) as ckpt:
        if not ckpt.all_steps():
            raise FileNotFoundError(
                f"No checkpoint found in {directory}: it holds no finished step; {_WHAT_TO_PASS}."
            )
        try:
            step, arrays, damaged = ckpt.restore_arrays_latest_intact(keys)
        except checkpoint.CheckpointSourceError:
            raise  # the keys are there; their source is not
        except ValueError:
            optional = [k for k in keys if k in _OPTIONAL_KEYS]
            if not optional:
                raise
            # Raises the checkpoint's own ValueError if a required key is missing too.
            required = tuple(k for k in keys if k not in _OPTIONAL_KEYS)
            step, arrays, damaged = ckpt.restore_arrays_latest_intact(required)
            arrays = {**arrays, **{k: {} for k in optional}}
    return {k: arrays[k] for k in keys}, step, damaged


def merge_pretrained(
    fresh: Mapping[str, Any],
    loaded: Mapping[str, Any],
    *,
    reinit: Sequence[str] | None = None,
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Puts loaded variables into a fresh init, group by group.

    For each top-level group of each collection of `fresh` (`params`, then
    `batch_stats`, ...):

    * the group in `loaded` has the same leaves with the same shapes: the
      loaded values are taken, as `jax.Array`s in the dtype of the fresh ones;
    * the group is missing from `loaded`, or its shapes differ (a head with
      another class count, a stage of another width): the fresh init is kept
      and the group is reported as re-initialised, if `reinit` is None or
      names the group; otherwise a ValueError;
    * the group has other leaves in `loaded` (another architecture): a
      ValueError, unless `reinit` names the group (then the fresh init is kept
      and reported).

    A group re-initialised in `params` keeps its fresh `batch_stats` too.
    Collections and groups of `loaded` that `fresh` lacks are an error
    (another architecture). `reinit` says which groups *may* be
    re-initialised; a group that fits is always loaded. To start a fitting
    group fresh anyway, leave it out of `loaded`.

    Args:
      fresh: the target model's freshly initialised variables, e.g.
        `{"params": ..., "batch_stats": ...}` (dicts or `FrozenDict`s).
      loaded: the source's variables, e.g. from `load_run`; a collection it
        lacks counts as empty (so `batch_stats: {}` is fine for a model
        without BatchNorm).
      reinit: the groups that may be re-initialised, e.g. `("head",)`; None:
        any group that is missing or whose shapes differ.

    Returns:
      `(variables, reinitialised)`: the merged variables as plain nested
      dicts, and the re-initialised groups in the order of `fresh["params"]`
      (then groups found only in other collections).

    Raises:
      ValueError: a group that may not be re-initialised does not fit (the
        message names it, lists up to 5 differing leaves with both shapes and
        says how to fix it), `loaded` has groups or collections `fresh`
        lacks, `reinit` names a group `fresh` lacks, either has no `params`,
        or a loaded value is NaN or infinite (a diverged or damaged source).
      TypeError: `reinit` is a string rather than a sequence of names.

    >>> import numpy as np
    >>> from flax.core import freeze
    >>> fresh = freeze({
    ...     "params": {"body": {"w": np.zeros(3)}, "head": {"w": np.zeros((3, 10))}},
    ...     "batch_stats": {"body": {"mean": np.zeros(3)}, "head": {"mean": np.zeros(10)}},
    ... })
    >>> source = {
    ...     "params": {"body": {"w": np.ones(3)}, "head": {"w": np.ones((3, 20))}},
    ...     "batch_stats": {"body": {"mean": np.ones(3)}, "head": {"mean": np.ones(20)}},
    ... }
    >>> variables, reinit = merge_pretrained(fresh, source, reinit=("head",))
    >>> reinit, variables["params"]["body"]["w"].tolist(), type(variables).__name__
    (('head',), [1.0, 1.0, 1.0], 'dict')
    >>> variables["batch_stats"]["head"]["mean"].shape
    (10,)
    """
    fresh, loaded = _plain(fresh), _plain(loaded)
    for name, variables in (("fresh", fresh), ("loaded", loaded)):
        if not isinstance(variables, dict) or "params" not in variables:
            have = sorted(variables) if isinstance(variables, dict) else type(variables).__name__
            raise ValueError(
                f"merge_pretrained: {name} must be variables with a 'params' collection, "
                f"e.g. {{'params': ..., 'batch_stats': ...}}; got {have}."
            )
    _check_finite(loaded)
    collections = ["params", *(c for c in fresh if c != "params")]
    extra = [c for c in loaded if c not in fresh and _has_leaves(loaded[c])]
    if extra:
        raise ValueError(
            f"merge_pretrained: loaded has collections {extra} that this model lacks (it has "
            f"{collections}): another architecture? Load a run of the same model, or drop them."
        )
    allowed = _check_reinit(reinit, [g for c in collections for g in fresh[c]])
    merged: dict[str, Any] = {}
    reinitialised: list[str] = []
    for collection in collections:
        merged[collection] = _merge_collection(
            collection, fresh[collection], loaded.get(collection, {}), allowed, reinitialised
        )
    return merged, tuple(reinitialised)


def _check_finite(loaded: Mapping[str, Any]) -> None:
    """Refuses pretrained values that are NaN or infinite: training would start from them."""
    bad = [
        _paths.path_str(_paths.keypath_names(keypath))
        for keypath, leaf in jax.tree_util.tree_flatten_with_path(loaded)[0]
        if np.issubdtype(np.asarray(leaf).dtype, np.inexact)
        and not np.all(np.isfinite(np.asarray(leaf)))
    ]
    if bad:
        raise ValueError(
            f"merge_pretrained: the loaded values of {_checks.listing(bad, _MAX_LISTED)} hold "
            "NaN or infinity: the source run diverged, or its file is damaged. Load an "
            "earlier checkpoint of it, or another source."
        )


def _merge_collection(
    collection: str,
    fresh: Any,
    loaded: Any,
    allowed: tuple[str, ...] | None,
    reinitialised: list[str],
) -> dict[str, Any]:
    if not isinstance(fresh, dict) or not isinstance(loaded, dict):
        raise ValueError(
            f"merge_pretrained: {collection} must map group names to subtrees in both fresh "
            f"and loaded; got {type(fresh).__name__} and {type(loaded).__name__}."
        )
    extra = [g for g in loaded if g not in fresh]
    if extra:
        raise ValueError(
            f"merge_pretrained: loaded {collection} has groups {extra} that this model lacks "
            f"(its groups: {', '.join(fresh) or 'none'}): another architecture? Load a run of "
            "the same model, or drop those groups from loaded."
        )
    merged: dict[str, Any] = {}
    for group, subtree in fresh.items():
        if group in reinitialised:  # re-initialised in params: its statistics go with it
            merged[group] = subtree
            continue
        problem, structural = _mismatch(group, subtree, loaded)
        if not problem:
            merged[group] = jax.tree.map(_as_fresh_dtype, subtree, loaded[group])
            continue
        if allowed is None and structural:
            raise ValueError(
                f"merge_pretrained: {collection} group {group!r} does not fit this model: "
                f"{problem}. Leaves that differ mean another architecture: load a run of the "
                f"same model, or pass reinit=(..., {group!r}) to start this group fresh."
            )
        if allowed is not None and group not in allowed:
            raise ValueError(
                f"merge_pretrained: {collection} group {group!r} does not fit this model: "
                f"{problem}. Only the groups in reinit={allowed!r} may be re-initialised: "
                f"load a run of the same architecture and width, or add {group!r} to reinit "
                "to start it fresh."
            )
        merged[group] = subtree
        reinitialised.append(group)
    return merged


def _mismatch(group: str, subtree: Any, loaded: Mapping[str, Any]) -> tuple[str, bool]:
    """What keeps `loaded[group]` from replacing `subtree`: ('', _) if nothing.

    The flag says whether the leaves themselves differ (not only their shapes).
    """
    if group not in loaded:
        return f"loaded has no such group (it has: {', '.join(loaded) or 'none'})", False
    want = _leaf_shapes(subtree, group)
    have = _leaf_shapes(loaded[group], group)
    if want.keys() != have.keys():
        parts = []
        only_loaded = [f"{p} {have[p]}" for p in have if p not in want]
        only_fresh = [f"{p} {want[p]}" for p in want if p not in have]
        if only_loaded:
            parts.append(f"only in loaded: {_checks.listing(only_loaded, _MAX_LISTED)}")
        if only_fresh:
            parts.append(f"only in fresh: {_checks.listing(only_fresh, _MAX_LISTED)}")
        return "its leaves differ; " + "; ".join(parts), True
    differ = [f"{p} (loaded {have[p]}, fresh {want[p]})" for p in want if have[p] != want[p]]
    if differ:
        return f"shapes differ at {_checks.listing(differ, _MAX_LISTED)}", False
    return "", False


def _leaf_shapes(tree: Any, group: str) -> dict[str, tuple[int, ...]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {
        _paths.path_str((group, *_paths.keypath_names(path))): tuple(np.shape(leaf))
        for path, leaf in flat
    }


def _as_fresh_dtype(fresh_leaf: Any, loaded_leaf: Any) -> jax.Array:
    dtype = getattr(fresh_leaf, "dtype", None)
    # A float64 NumPy init means float32 unless x64 is on; asking for float64 warns.
    return jnp.asarray(loaded_leaf, None if dtype is None else jax.dtypes.canonicalize_dtype(dtype))


def _plain(tree: Any) -> Any:
    """Nested mappings (`FrozenDict` included) as nested dicts; leaves untouched."""
    if isinstance(tree, Mapping):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


def _has_leaves(tree: Any) -> bool:
    return bool(jax.tree.leaves(tree))


def _check_reinit(reinit: Sequence[str] | None, groups: list[str]) -> tuple[str, ...] | None:
    if reinit is None:
        return None
    if isinstance(reinit, str):
        raise TypeError(
            f"reinit must be a sequence of group names such as ({reinit!r},), got the "
            f"string {reinit!r}."
        )
    names = tuple(reinit)
    unknown = [g for g in names if g not in groups]
    if unknown:
        known = ", ".join(dict.fromkeys(groups))
        raise ValueError(
            f"merge_pretrained: reinit names groups {unknown} that this model lacks; its "
            f"groups: {known}."
        )
    return names


def _check_keys(keys: Sequence[str]) -> tuple[str, ...]:
    if isinstance(keys, str) or not all(isinstance(k, str) for k in keys):
        raise TypeError(
            f"keys must be a sequence of top-level names such as ('params', 'batch_stats'), "
            f"got {keys!r}."
        )
    return tuple(keys)


def _checkpoint_directory(path: str | os.PathLike[str]) -> Path:
    """The directory of numbered steps that `path` names (a workdir or itself)."""
    given = Path(path)
    if not given.exists():
        raise FileNotFoundError(f"{path} does not exist: {_WHAT_TO_PASS}.")
    if not given.is_dir():
        raise FileNotFoundError(
            f"{path} is a file, not a run: {_WHAT_TO_PASS}. (Torchvision .pth/.safetensors "
            "weights load with layerfreeze.models.load_torchvision_resnet.)"
        )
    inner = given / "checkpoints"
    return inner if inner.is_dir() else given
