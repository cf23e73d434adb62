"""Checkpoints that let an interrupted training run resume bit for bit.

A :class:`Checkpointer` owns one directory of numbered steps. Each step holds two
items, written together by an Orbax ``CheckpointManager``:

* ``state``: a pytree of arrays (params, batch stats, optimizer state, PRNG key, step
  counter), restored into the structure, shapes and dtypes of a target pytree;
* ``metadata``: a JSON object (freeze spec, phase index, data position, ...) that can
  be read on its own, before the target structure is known.

Atomicity (checked against orbax-checkpoint 0.12.8 on a local filesystem): Orbax
writes a step into ``<step>.orbax-checkpoint-tmp/``, each item into
``<item>.orbax-checkpoint-tmp/`` inside it; it commits each item, then the step, by
writing ``commit_success.txt`` and renaming the directory to its final name. Step
discovery ignores names with the temporary suffix, so a process killed mid-write
leaves a temporary directory that is never taken for a checkpoint, and the previous
step stays the latest. Opening a :class:`Checkpointer` deletes such leftovers
(found with Orbax's own test) before doing anything else, so they neither pile up
nor collide with the step when it is saved again. Orbax does not fsync the
directory after the rename: this protects against a dying process, not necessarily
against losing power.
Pruning old steps (``max_to_keep``) happens only after the new step is renamed into
place, so the newest checkpoint is never touched; a process killed while pruning
can leave an *older* step half deleted (Orbax deletes it file by file).
One process writes a directory at a time.
"""

from __future__ import annotations

import json
import operator
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import jax
import numpy as np
import orbax.checkpoint as ocp

from layerfreeze import _paths

__all__ = ["Checkpointer"]

PyTree = Any

_STATE = "state"
_METADATA = "metadata"
# Mismatches listed per kind in an error message before it says "and N more".
_MAX_LISTED = 5


class Checkpointer:
    """Saves and restores training state with its JSON metadata, atomically.

    Saving is synchronous: when :meth:`save` returns, the step is fully written
    and renamed into place. Use it as a context manager, or call :meth:`close`.

    Args:
        directory: Directory that holds one subdirectory per saved step. Created
            if missing.
        max_to_keep: How many of the most recent steps to keep; older ones are
            deleted after each save. ``None`` keeps every step.

    Raises:
        ValueError: If ``max_to_keep`` is not a positive integer or ``None``.

    Example:
        >>> import tempfile
        >>> import jax, jax.numpy as jnp
        >>> state = {"params": {"w": jnp.ones(3)}, "rng": jax.random.key(0)}
        >>> with Checkpointer(tempfile.mkdtemp()) as ckpt:
        ...     ckpt.save(10, state, metadata={"phase": 1, "freeze": "stage1"})
        ...     target = jax.eval_shape(lambda: state)
        ...     restored, meta = ckpt.restore(target)
        >>> ckpt.latest_step(), meta["phase"], restored["params"]["w"].tolist()
        (10, 1, [1.0, 1.0, 1.0])
    """

    def __init__(self, directory: str | os.PathLike[str], *, max_to_keep: int | None = 3):
        if max_to_keep is not None and (
            isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1
        ):
            raise ValueError(
                f"max_to_keep must be a positive integer or None (keep all), got {max_to_keep!r}."
            )
        self._directory = Path(directory).absolute()
        self._directory.mkdir(parents=True, exist_ok=True)
        _remove_unfinished_steps(self._directory)
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        registry.add(_STATE, ocp.args.StandardSave, ocp.StandardCheckpointHandler)
        registry.add(_STATE, ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
        registry.add(_METADATA, ocp.args.JsonSave, ocp.handlers.JsonCheckpointHandler)
        registry.add(_METADATA, ocp.args.JsonRestore, ocp.handlers.JsonCheckpointHandler)
        self._manager = ocp.CheckpointManager(
            self._directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                # Synchronous: `save` returns only once the step is renamed into place.
                enable_async_checkpointing=False,
                create=True,
            ),
            handler_registry=registry,
        )
        self._closed = False

    @property
    def directory(self) -> Path:
        """The absolute directory this checkpointer reads and writes."""
        return self._directory

    def save(
        self,
        step: int,
        state: PyTree,
        *,
        metadata: Mapping[str, Any],
        force: bool = False,
    ) -> None:
        """Writes ``state`` and ``metadata`` as checkpoint ``step``.

        Args:
            step: Non-negative training step; names the checkpoint.
            state: Pytree of arrays: ``jax.Array`` (typed PRNG keys such as
                ``jax.random.key`` included), NumPy arrays, Python scalars.
                Containers may be dicts, lists, tuples, NamedTuples (optax states,
                ``optax.MaskedNode``) and other registered pytree nodes.
            metadata: JSON-serialisable mapping with string keys. It comes back as
                ``json.loads`` would parse it (tuples become lists).
            force: Allow a ``step`` that is not newer than :meth:`latest_step`,
                e.g. after deliberately resuming from an older checkpoint: the
                checkpoints at ``step`` and later are deleted (newest first) before
                the new one is written, so it becomes the latest. Without
                ``force`` such a save raises, and nothing is ever overwritten.

        Raises:
            ValueError: If ``step`` is negative, or (without ``force``) not newer
                than the latest saved step.
            TypeError: If ``step`` is not an integer, or ``metadata`` is not a
                mapping of JSON-serialisable values with string keys.
        """
        step = _check_step(step)
        metadata = _check_metadata(metadata)
        stale = [s for s in self.all_steps() if s >= step]
        if stale and not force:
            raise ValueError(
                f"Step {step} is not newer than the latest checkpoint (step {stale[-1]}) "
                f"in {self._directory}; checkpoints are never overwritten. Save under a "
                f"newer step, or pass force=True to delete steps {stale} first."
            )
        for old in reversed(stale):
            # Newest first: an interruption leaves the older steps intact.
            self._manager.delete(old)
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardSave(state), _METADATA: ocp.args.JsonSave(metadata)}
            ),
            # Our checks above replace Orbax's save-interval policy.
            force=True,
        )
        if not saved:
            raise RuntimeError(f"Orbax declined to save step {step} in {self._directory}.")
        self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        """Returns the newest saved step, or ``None`` if there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """Returns the saved steps in increasing order."""
        return sorted(self._manager.all_steps())

    def restore(self, target: PyTree, *, step: int | None = None) -> tuple[PyTree, dict[str, Any]]:
        """Restores a saved state into the structure of ``target``.

        Args:
            target: Example state with the structure, shapes and dtypes to restore
                into: concrete arrays (e.g. a freshly initialised state) or
                ``jax.ShapeDtypeStruct`` leaves (e.g. from ``jax.eval_shape``).
                Restored ``jax.Array`` leaves take the target's sharding when it
                has one, NumPy leaves stay NumPy and Python scalars stay Python
                scalars.
            step: Step to restore; the latest one if ``None``.

        Returns:
            ``(state, metadata)``: ``state`` has exactly the treedef of ``target``
            and leaves bitwise equal to the saved ones; ``metadata`` is the JSON
            object saved with it.

        Raises:
            FileNotFoundError: If the directory holds no checkpoint, or not the
                requested ``step``.
            ValueError: If the saved state does not match ``target`` (missing or
                unexpected leaves, different containers, shapes or dtypes, typed
                versus raw PRNG keys).
        """
        step = self._resolve_step(step)
        saved = self._manager.item_metadata(step)[_STATE]
        if saved is None:
            raise ValueError(
                f"Step {step} in {self._directory} has no {_STATE!r} item; it was not "
                "written by layerfreeze.Checkpointer."
            )
        mismatch = _describe_mismatch(saved.tree, target)
        if mismatch:
            raise self._mismatch_error(step, mismatch)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        _STATE: ocp.args.StandardRestore(jax.tree.map(_abstract, target)),
                        _METADATA: ocp.args.JsonRestore(),
                    }
                ),
            )
        except ValueError as e:
            raise self._mismatch_error(step, str(e)) from e
        state = restored[_STATE]
        mismatch = _describe_restored_mismatch(state, target)
        if mismatch:
            raise self._mismatch_error(step, mismatch)
        return state, dict(restored[_METADATA])

    def restore_arrays(self, keys: tuple[str, ...], *, step: int | None = None) -> dict[str, Any]:
        """Restores some top-level entries of a saved dict state, as saved.

        No target is needed: shapes and dtypes come from the checkpoint. Use it
        to take the `params` and `batch_stats` of another run (`init_from`)
        whose optimizer state has a structure unknown here.

        Args:
            keys: top-level keys of the saved state, e.g. `("params", "batch_stats")`.
            step: Step to read; the latest one if ``None``.

        Returns:
            A dict from each key to its restored subtree (nested dicts of NumPy
            arrays).

        Raises:
            FileNotFoundError: If there is no checkpoint (or not that step).
            KeyError: If the saved state lacks one of `keys`; the message lists
                the keys it has.
        """
        step = self._resolve_step(step)
        saved = self._manager.item_metadata(step)[_STATE]
        tree = getattr(saved, "tree", None)
        if not isinstance(tree, Mapping) or any(k not in tree for k in keys):
            have = sorted(tree) if isinstance(tree, Mapping) else []
            raise KeyError(
                f"The checkpoint at step {step} in {self._directory} has no entries "
                f"{[k for k in keys if k not in have]}; it has {have}."
            )
        # The whole saved tree, as saved (NamedTuples come back as lists): the
        # handler restores complete trees only.
        target = jax.tree.map(
            lambda m: np.zeros(m.shape, m.dtype),
            tree,
            is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"),
        )
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)})
        )
        return {k: restored[_STATE][k] for k in keys}

    def restore_metadata(self, step: int | None = None) -> dict[str, Any]:
        """Reads only the JSON metadata of a step, without touching its arrays.

        Use it to learn the phase or freeze spec needed to build the ``target`` of
        :meth:`restore`.

        Args:
            step: Step to read; the latest one if ``None``.

        Returns:
            The metadata saved with the step.

        Raises:
            FileNotFoundError: If the directory holds no checkpoint, or not the
                requested ``step``.
        """
        step = self._resolve_step(step)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()})
        )
        return dict(restored[_METADATA])

    def close(self) -> None:
        """Waits for pending work and releases Orbax resources. Idempotent."""
        if not self._closed:
            self._manager.close()
            self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpointer({str(self._directory)!r}, steps={self.all_steps()})"

    def _resolve_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(
                f"No checkpoint found in {self._directory}: it holds no finished step."
            )
        if step is None:
            return steps[-1]
        step = _check_step(step)
        if step not in steps:
            raise FileNotFoundError(
                f"No checkpoint for step {step} in {self._directory}; saved steps: {steps}."
            )
        return step

    def _mismatch_error(self, step: int, details: str) -> ValueError:
        return ValueError(
            f"The checkpoint at step {step} in {self._directory} does not match the "
            f"structure of `target`:\n{details}"
        )


def _remove_unfinished_steps(directory: Path) -> None:
    # Orbax's own test for "not finalized" (the temporary-name suffix), so we only
    # ever delete what Orbax would never restore from.
    for tmp in ocp.path.step.all_temporary_paths(directory):
        shutil.rmtree(tmp.get(), ignore_errors=True)


def _check_step(step: int) -> int:
    if isinstance(step, bool):
        raise TypeError(f"step must be an integer, got {step!r}.")
    try:
        step = operator.index(step)
    except TypeError:
        raise TypeError(f"step must be an integer, got {type(step).__name__}.") from None
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}.")
    return step


def _check_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping, got {type(metadata).__name__}.")
    bad_keys = [k for k in metadata if not isinstance(k, str)]
    if bad_keys:
        raise TypeError(f"metadata keys must be strings, got {bad_keys!r}.")
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"metadata must be JSON-serialisable: {e}") from e
    return dict(metadata)


def _abstract(leaf: Any) -> Any:
    # Orbax restores a jax.Array for a ShapeDtypeStruct (with its sharding), a NumPy
    # array for a NumPy array and a Python scalar for a Python scalar.
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    return leaf


def _path_str(path: tuple[Any, ...]) -> str:
    # Orbax stores NamedTuples as dicts of their fields and tuples as lists, so name
    # every key kind by its bare name or index to compare the two trees.
    return _paths.path_str(_paths.keypath_names(path, drop_value=False))


def _stored_shape_dtype(leaf: Any) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype a target leaf has on disk; ``None`` for Python scalars."""
    if isinstance(leaf, bool | int | float | complex):
        return None
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        return None
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        # Typed keys are stored as their raw uint32 key data.
        data = jax.eval_shape(jax.random.key_data, leaf)
        return tuple(data.shape), np.dtype(data.dtype)
    return tuple(leaf.shape), np.dtype(dtype)


def _fmt(shape: tuple[int, ...], dtype: Any) -> str:
    return f"{np.dtype(dtype).name}{list(shape)}"


def _listing(label: str, items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"  {label}: {shown}{more}"


def _describe_mismatch(saved_tree: PyTree, target: PyTree) -> str:
    """Lists leaves missing, unexpected or differently shaped/typed; '' if none."""
    saved = {_path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(saved_tree)[0]}
    wanted = {_path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
    lines = []
    missing = sorted(wanted.keys() - saved.keys())
    if missing:
        lines.append(_listing("in target but not in checkpoint", missing))
    unexpected = sorted(saved.keys() - wanted.keys())
    if unexpected:
        lines.append(_listing("in checkpoint but not in target", unexpected))
    differ = []
    for path in sorted(saved.keys() & wanted.keys()):
        have = (tuple(saved[path].shape), np.dtype(saved[path].dtype))
        want = _stored_shape_dtype(wanted[path])
        if want is None:
            # Python scalar: Orbax stores it as a 64-bit value; compare the kind only.
            want = ((), np.asarray(wanted[path]).dtype)
            same = have[0] == () and have[1].kind == want[1].kind
        else:
            same = have == want
        if not same:
            # Orbax restores a saved Python scalar as a scalar only into a scalar target.
            was_scalar = isinstance(saved[path], ocp.metadata.ScalarMetadata)
            have_str = f"Python scalar {_fmt(*have)}" if was_scalar else _fmt(*have)
            differ.append(f"{path} (checkpoint {have_str}, target {_fmt(*want)})")
    if differ:
        lines.append(_listing("shape or dtype differs", differ))
    return "\n".join(lines)


def _describe_restored_mismatch(state: PyTree, target: PyTree) -> str:
    """Catches what the on-disk metadata cannot show, such as typed vs raw keys."""
    if jax.tree.structure(state) != jax.tree.structure(target):
        return (
            f"  restored treedef {jax.tree.structure(state)}\n"
            f"  differs from target {jax.tree.structure(target)}"
        )
    differ = []
    for (path, got), want in zip(
        jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(target), strict=True
    ):
        want_dtype = getattr(want, "dtype", None)
        if want_dtype is not None and getattr(got, "dtype", None) != want_dtype:
            differ.append(
                f"{_path_str(path)} (checkpoint {getattr(got, 'dtype', type(got).__name__)}, "
                f"target {want_dtype})"
            )
    if differ:
        return _listing(
            "dtype differs (a typed PRNG key and a raw uint32 key are not interchangeable; "
            "convert with jax.random.key_data / jax.random.wrap_key_data)",
            differ,
        )
    return ""
