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
can leave an *older* step half deleted (Orbax deletes it file by file). A step
that is a symbolic link (to an archived copy, say) is pruned by removing the link;
what it points to is left alone. One run writes a directory at a time.

The environment: a save that needs more space than the filesystem has free is
refused before anything is written, and a write that fails all the same (the disk
filled meanwhile, a read-only or unwritable directory) leaves no partial step and
raises :class:`CheckpointWriteError`, an ``OSError`` with a one-line message; the
older steps stay as they were. A step that cannot be read for want of permission
raises ``PermissionError``: it is not damage, and is never moved aside.

Damage: a step whose files were later truncated, emptied or deleted (a full disk,
a copy cut short, a person tidying up) cannot be read, and one whose stored bytes
changed (a flipped bit, a block overwritten) reads wrong values: Orbax's OCDBT
format stores no checksums. Each step therefore records a checksum of every leaf it
saves (in its metadata item, written in the same atomic step), and every restore
recomputes them. The checksum is a sum over the leaf's elements of a 64-bit hash of
each element's bits and position: it does not depend on how the leaf is split, so
each process adds up the shards it holds, the sums are gathered, and a step saved on
one mesh is checked when restored onto another (steps saved with the earlier CRC-32
checksums are checked where a process holds the whole leaf). Every read of a damaged
step raises :class:`CheckpointDamagedError` naming the step and what failed, rather
than an Orbax or TensorStore error (steps saved before checksums are read
unchecked); a structure mismatch with the caller's target is not damage and stays a
``ValueError``. :meth:`Checkpointer.restore_latest_intact` moves damaged steps aside
to ``<directory>_damaged/`` (never deletes them) and falls back to the newest intact
step.

Several processes (``jax.distributed.initialize``): every process constructs the
:class:`Checkpointer` on the same directory (a filesystem all of them see) and makes
the same calls in the same order. Each process writes the shards it holds (Orbax);
the metadata item is written once, by process 0. A target whose leaves carry
shardings (concrete arrays, or ``jax.ShapeDtypeStruct`` with ``sharding``) is
restored into them, each process reading its own shards, so a step saved on one
mesh shape or process count restores onto another. What changes the directory
(removing unfinished steps, moving a damaged step aside, unlinking a linked step) is
done by process 0 between barriers, and a read that fails on one process fails on
all of them with that process's error, so that every process takes the same branch.

Leaving out what a run started from: a fine-tuning run keeps most of its
weights as they came from its source (``init_from``): frozen layers never
change. Give the :class:`Checkpointer` that source as a :class:`Reference`, and
each step leaves out every leaf whose content still equals the source's leaf at
the same path, recording the source's name and, per leaf left out, its checksum
(the content hash), shape and dtype. A restore fills those leaves from the
checkpointer's reference after checking that its content at each of them is the
recorded one: a checkpoint restored without its source, or with a source whose
content differs, is refused with a :class:`CheckpointSourceError` (``strict``,
the default) rather than loaded. Nothing depends on a freeze schedule: a leaf
unfrozen and trained later no longer equals its source and is saved again. On
several processes each decision is taken from the global checksums, the same on
every process. Such a step is read with its source only: keep the source as long
as the step, or save without a reference. Steps that leave nothing out (every
step saved without a reference, and every step written before references
existed) are stored and read exactly as before.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import os
import re
import shutil
import zlib
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from jax.experimental import multihost_utils

from layerfreeze import _checks, _paths
from layerfreeze.train import _multihost, sharding

__all__ = [
    "CheckpointDamagedError",
    "CheckpointSourceError",
    "CheckpointWriteError",
    "Checkpointer",
    "Reference",
]

PyTree = Any

_log = logging.getLogger(__name__)

_STATE = "state"
_METADATA = "metadata"
# The key of the metadata item under which a step records its leaves' checksums.
_CHECKSUMS = "layerfreeze.checksums"
# The key of the metadata item under which a step that leaves leaves out records
# its source: {"name": ..., "omitted": {path: {"checksum", "shape", "dtype"}}}.
_SOURCE = "layerfreeze.source"
# How a checksum that does not depend on the leaf's layout starts (see `_checksums`);
# checksums without it are the CRC-32s of earlier steps.
_SUM = "sum64:"
# Elements hashed at a time, bounding the temporary memory of a checksum.
_CHUNK = 1 << 20
# Mismatches listed per kind in an error message before it says "and N more".
_MAX_LISTED = 5
# How much of a low-level error message a damage reason quotes.
_MAX_REASON = 200
# What Orbax says when the containers of `target` differ from the saved tree in
# a way our own comparison of leaf paths cannot see (a dict where a list was
# saved, an empty node present on one side only): a mismatch, not damage.
_ORBAX_STRUCTURE_MISMATCH = "structures do not match"
# How TensorStore reports the OS error under a failed read or write.
_TENSORSTORE_OS_ERROR = re.compile(r"\[os_error_code='(\d+)'\]")
# OS errors of the environment, not of the checkpoint: no space, no permission.
_ENVIRONMENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}
)


class CheckpointDamagedError(Exception):
    """A saved step cannot be read: one of its files is missing, truncated or corrupt.

    Attributes:
        step: The damaged step (the newest one when several are listed).
        reason: One line saying what could not be read, for ``step``.
        damaged: Every damaged step found, as ``(step, reason)``, newest first.
        moved_to: Where each damaged step was moved, by step; empty when nothing
            was moved.
    """

    def __init__(
        self,
        message: str,
        damaged: Sequence[tuple[int, str]],
        moved_to: Mapping[int, Path] | None = None,
    ):
        super().__init__(message)
        self.damaged = list(damaged)
        self.step, self.reason = self.damaged[0]
        self.moved_to = dict(moved_to or {})


class CheckpointWriteError(OSError):
    """A checkpoint step could not be written (no space, no permission); none of it is kept.

    An ``OSError`` whose ``errno`` says why (``ENOSPC``, ``EACCES``, ``EROFS``, ...)
    and whose message is one line naming the step, the directory and the steps
    that remain.
    """

    def __init__(self, code: int, message: str):
        super().__init__(code, message)

    def __str__(self) -> str:
        return self.strerror


class CheckpointSourceError(ValueError):
    """A step that leaves out leaves equal to its source cannot be filled from the one given.

    Either no :class:`Reference` was given, or its content differs from the
    recorded one at some of the leaves left out (or it lacks them). It is not
    damage: such a step is never moved aside, and restores once its source is
    given. The message is one line.

    Attributes:
        step: The step that was read.
        recorded: The name of the source the step was saved against.
        given: The name of the reference given, or ``None`` if none was.
        differ: The paths left out whose content the reference does not hold
            (every one of them when no reference was given), sorted.
    """

    def __init__(
        self, message: str, *, step: int, recorded: str, given: str | None, differ: Sequence[str]
    ):
        super().__init__(message)
        self.step = step
        self.recorded = recorded
        self.given = given
        self.differ = list(differ)


@dataclasses.dataclass(frozen=True, eq=False)
class Reference:
    """Values a run started from, which its checkpoints need not store again.

    A leaf of a saved state is matched to the leaf of ``tree`` at the same path
    (``params/stem/Conv_0/kernel`` names an attribute of a ``TrainState`` and a
    dict key alike; tuples and lists by index) with the same shape, and compared
    in the state leaf's dtype: a reference leaf in float32 is cast first to the
    bfloat16 of a frozen leaf stored in bfloat16 (NumPy's round-to-nearest-even).

    Equal means an equal checksum: the same layout-independent 64-bit content
    hash that every saved leaf gets anyway (see :class:`Checkpointer`), so
    deciding costs no read of the state beyond the one the save makes, gives
    the same answer on every process without moving any data, and each
    reference leaf is hashed once per dtype. A leaf that differs and still
    hashes equal has a probability of about 2**-64.

    Attributes:
        name: Where the values come from, e.g. ``"run runs/src (step 400)"`` or a
            file path. Recorded with every step that leaves a leaf out, and named
            in errors. A restore from a reference of another name but the same
            content is accepted (the source moved): the content is what counts.
        tree: A pytree of arrays (NumPy arrays or ``jax.Array``), e.g.
            ``{"params": ..., "batch_stats": ...}``. Leaves that no state leaf
            matches are ignored. On several processes every process gives the
            same values.

    Example:
        >>> import tempfile
        >>> import numpy as np
        >>> ones, zeros = np.ones(3, np.float32), np.zeros(2, np.float32)
        >>> reference = Reference("pretrained.npz", {"params": {"body": ones, "head": zeros}})
        >>> state = {"params": {"body": ones, "head": zeros + 0.5}}  # the head trained
        >>> with Checkpointer(tempfile.mkdtemp(), reference=reference) as ckpt:
        ...     ckpt.save(1, state, metadata={})
        ...     restored, _ = ckpt.restore(state)
        >>> restored["params"]["body"].tolist(), restored["params"]["head"].tolist()
        ([1.0, 1.0, 1.0], [0.5, 0.5])
    """

    name: str
    tree: PyTree

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(
                f"Reference name must be a non-empty string saying where the values come "
                f"from, got {self.name!r}."
            )


class Checkpointer:
    """Saves and restores training state with its JSON metadata, atomically.

    Saving is synchronous: when :meth:`save` returns, the step is fully written
    and renamed into place. Use it as a context manager, or call :meth:`close`.

    Args:
        directory: Directory that holds one subdirectory per saved step. Created
            if missing.
        max_to_keep: How many of the most recent steps to keep; older ones are
            deleted after each save (a step that is a symbolic link loses the
            link only). ``None`` keeps every step.
        reference: The values the run started from (see :class:`Reference`), or
            a function returning them (or ``None``), called once, when a save or
            a step that leaves leaves out first needs them: a reader of steps
            that leave nothing out never loads the source. Each step leaves out
            the leaves of the state equal to it; a restore fills them back from
            it. ``None``: steps store every leaf, and a step that left leaves out
            cannot be restored.
        strict: A restored step that left leaves out must find them in the
            reference with the recorded content, or :class:`CheckpointSourceError`
            is raised. ``False`` loads the reference's values where their
            content differs (the same paths, shapes and dtypes), with a logged
            warning: for a source deliberately replaced, say; the restored state
            is then not the one saved.

    Raises:
        ValueError: If ``max_to_keep`` is not a positive integer or ``None``.
        TypeError: If ``reference`` is not a :class:`Reference`, a function or
            ``None``, or ``strict`` is not a bool.

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

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_to_keep: int | None = 3,
        reference: Reference | Callable[[], Reference | None] | None = None,
        strict: bool = True,
    ):
        if max_to_keep is not None and (
            isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1
        ):
            raise ValueError(
                f"max_to_keep must be a positive integer or None (keep all), got {max_to_keep!r}."
            )
        if not (reference is None or isinstance(reference, Reference) or callable(reference)):
            raise TypeError(
                "reference must be a checkpoint.Reference, a function returning one, or None; "
                f"got {type(reference).__name__}."
            )
        self._reference_given = reference
        self._strict = _checks.flag("strict", strict)
        # The reference's leaves by path, once known, and their checksums by (path, dtype).
        self._reference_leaves: dict[str, Any] | None = None
        self._reference_checksums: dict[tuple[str, str], str] = {}
        self._directory = Path(directory).absolute()
        self._directory.mkdir(parents=True, exist_ok=True)
        self._max_to_keep = max_to_keep
        if _multihost.is_primary():
            _remove_unfinished_steps(self._directory)
        _multihost.barrier(f"layerfreeze.Checkpointer.open:{self._directory}")
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        registry.add(_STATE, ocp.args.StandardSave, ocp.StandardCheckpointHandler)
        registry.add(_STATE, ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
        registry.add(_METADATA, ocp.args.JsonSave, ocp.handlers.JsonCheckpointHandler)
        registry.add(_METADATA, ocp.args.JsonRestore, ocp.handlers.JsonCheckpointHandler)
        self._manager = ocp.CheckpointManager(
            self._directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=None,  # pruned by `_prune`, which also handles linked steps
                # Synchronous: `save` returns only once the step is renamed into place.
                enable_async_checkpointing=False,
                create=True,
            ),
            handler_registry=registry,
        )
        # The state is read by its handler, without the manager's closing barrier:
        # a process that fails to read must still meet the others (`_agreed`).
        self._state_handler = ocp.StandardCheckpointHandler()
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

        With a ``reference``, each leaf of ``state`` whose content equals the
        reference's leaf at its path (compared in the leaf's dtype) is left out
        of the step; the step records the reference's name and each such leaf's
        checksum, shape and dtype, for :meth:`restore` to fill it back.

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
            CheckpointWriteError: If the step needs more space than is free (checked
                before writing), or writing it failed for want of space or
                permission. Nothing of the step is kept; older steps are untouched.
        """
        step = _checks.count("step", step)
        metadata = _check_metadata(metadata)
        checksums = _checksums(state)
        omitted = self._unchanged(state, checksums)
        written = _leave_out(state, omitted)
        stored = {**metadata, _CHECKSUMS: {p: c for p, c in checksums.items() if p not in omitted}}
        if omitted:
            stored[_SOURCE] = {"name": self._reference().name, "omitted": omitted}
        stale = [s for s in self.all_steps() if s >= step]
        if stale and not force:
            raise ValueError(
                f"Step {step} is not newer than the latest checkpoint (step {stale[-1]}) "
                f"in {self._directory}; checkpoints are never overwritten. Save under a "
                f"newer step, or pass force=True to delete steps {stale} first."
            )
        self._check_space(step, written)
        for old in reversed(stale):
            # Newest first: an interruption leaves the older steps intact.
            self._delete(old)
        try:
            saved = self._manager.save(
                step,
                args=ocp.args.Composite(
                    **{_STATE: ocp.args.StandardSave(written), _METADATA: ocp.args.JsonSave(stored)}
                ),
                # Our checks above replace Orbax's save-interval policy.
                force=True,
            )
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._write_error(step, e) from e
        if not saved:
            raise RuntimeError(f"Orbax declined to save step {step} in {self._directory}.")
        self._prune()

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
            CheckpointSourceError: If the step left out leaves equal to its
                source and the checkpointer has no reference, or (``strict``) one
                whose content differs at them.
            CheckpointDamagedError: If a file of the step is missing, truncated
                or corrupt (see :meth:`restore_latest_intact`).
        """
        step = self._resolve_step(step)
        state, stored = self._agreed(step, lambda: self._read_into(step, target))
        checksums, source = stored.pop(_CHECKSUMS, None), stored.pop(_SOURCE, None)
        if source is not None:
            # Outside `_agreed`: hashing a reference split over processes gathers.
            like = {_path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
            values = self._source_values(step, source, list(source["omitted"]))
            placed = {path: _placed(value, like[path]) for path, value in values.items()}
            state = _fill(state, placed)
        self._verify(step, state, checksums)
        return state, stored

    def _read_into(self, step: int, target: PyTree) -> tuple[PyTree, dict[str, Any]]:
        """This process's part of `restore`: the state read into `target`, and its metadata.

        Leaves the step left out come back as ``None``, for `restore` to fill.
        """
        saved = self._saved_tree(step)
        stored = self._read_stored(step)
        omitted = _omitted(stored)
        if omitted is None:
            raise self._damaged(step, f"its {_METADATA!r} item holds an unreadable {_SOURCE!r}")
        mismatch = _describe_mismatch(saved, target, omitted)
        if mismatch:
            raise self._mismatch_error(step, mismatch)
        # Orbax reads what the step holds: the leaves left out are empty nodes there.
        readable = jax.tree_util.tree_map_with_path(
            lambda p, x: None if _path_str(p) in omitted else _abstract(x), target
        )
        state = self._read_state(step, readable)
        mismatch = _describe_restored_mismatch(state, readable)
        if mismatch:
            raise self._mismatch_error(step, mismatch)
        return state, stored

    def restore_latest_intact(
        self, make_target: Callable[[dict[str, Any]], PyTree]
    ) -> tuple[int, PyTree, dict[str, Any], list[tuple[int, str]]]:
        """Restores the newest step that can be read, moving damaged ones aside.

        Steps are tried newest first. A damaged step (see
        :class:`CheckpointDamagedError`) is moved, not deleted, to
        ``<directory>_damaged/<step>`` (:attr:`damaged_directory`; a numeric
        suffix is added if that name is taken), a warning is logged, and the
        next older step is tried. The steps left in :attr:`directory` are then
        all readable, so :meth:`latest_step` and :meth:`save` carry on from the
        restored one.

        Args:
            make_target: Called with a step's metadata, returns the ``target`` of
                :meth:`restore` for it (e.g. the state of the phase it names).

        Returns:
            ``(step, state, metadata, damaged)``: the restored step, its state and
            metadata as :meth:`restore` gives them, and ``(step, reason)`` for
            each damaged step moved aside, newest first (empty if none).

        Raises:
            FileNotFoundError: If the directory holds no checkpoint at all.
            CheckpointDamagedError: If every step is damaged; all of them have
                been moved aside and the message lists them and where they went.
                The directory now holds no checkpoint: start afresh or stop.
            ValueError: If an intact step does not match its target (nothing is
                moved: a mismatch is not damage).
            CheckpointSourceError: If the newest intact step cannot be filled
                from the reference (see :meth:`restore`); nothing is moved.

        Example:
            >>> import tempfile
            >>> import jax.numpy as jnp
            >>> with Checkpointer(tempfile.mkdtemp()) as ckpt:
            ...     ckpt.save(10, {"w": jnp.ones(2)}, metadata={"size": 2})
            ...     step, state, meta, damaged = ckpt.restore_latest_intact(
            ...         lambda meta: {"w": jnp.zeros(meta["size"])}
            ...     )
            >>> step, state["w"].tolist(), damaged
            (10, [1.0, 1.0], [])
        """

        def read(step: int) -> tuple[PyTree, dict[str, Any]]:
            return self.restore(make_target(self._read_metadata(step)), step=step)

        step, (state, metadata), damaged = self._newest_intact(read, move_aside=True)
        return step, state, metadata, damaged

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
            arrays; leaves the step left out come from the checkpointer's
            reference, checked as :meth:`restore` checks them).

        Raises:
            FileNotFoundError: If there is no checkpoint (or not that step).
            ValueError: If the saved state lacks one of `keys`; the message lists
                the keys it has.
            CheckpointSourceError: If the step left out leaves under `keys` that
                equal its source, and the checkpointer has no reference, or
                (``strict``) one whose content differs at them.
            CheckpointDamagedError: If a file of the step is missing, truncated
                or corrupt.
        """
        step = self._resolve_step(step)
        restored, stored = self._agreed(step, lambda: self._read_arrays(step, keys))
        source = stored.get(_SOURCE)
        if source is not None:
            wanted = [p for p in source["omitted"] if p.split("/", 1)[0] in keys]
            if wanted:
                values = self._source_values(step, source, wanted)
                restored = _fill(restored, {p: _host(v) for p, v in values.items()})
        self._verify(step, restored, stored.get(_CHECKSUMS))
        return {k: restored[k] for k in keys}

    def _read_arrays(self, step: int, keys: tuple[str, ...]) -> tuple[PyTree, dict[str, Any]]:
        """This process's part of `restore_arrays`: the whole saved state, and its metadata.

        Leaves the step left out come back as ``None``; the metadata is ``{}``
        when it cannot be read and the step holds every leaf under `keys`.
        """
        tree = self._saved_tree(step)
        if not isinstance(tree, Mapping) or any(k not in tree for k in keys):
            have = sorted(tree) if isinstance(tree, Mapping) else []
            raise ValueError(
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
        restored = self._read_state(step, target)
        try:
            stored = self._read_stored(step)
        except CheckpointDamagedError as e:  # the arrays can still be read, unchecked
            # ...unless the step left leaves out: only its metadata says what they were.
            empty = [
                path
                for path, x in _flat_paths({k: tree[k] for k in keys}, keep_none=True).items()
                if x is None
            ]
            if empty:
                raise self._damaged(
                    step,
                    f"{e.reason}; the step stores no values for "
                    f"{_checks.listing(empty, _MAX_LISTED)}, which only that item describes",
                ) from e
            _log.warning("%s Its arrays are read without their checksums.", e)
            return restored, {}
        if _omitted(stored) is None:
            raise self._damaged(step, f"its {_METADATA!r} item holds an unreadable {_SOURCE!r}")
        return restored, stored

    def restore_arrays_latest_intact(
        self, keys: tuple[str, ...]
    ) -> tuple[int, dict[str, Any], list[tuple[int, str]]]:
        """:meth:`restore_arrays` of the newest step that can be read.

        For reading another run's checkpoints (`init_from`): damaged steps are
        skipped and reported, and nothing in the directory is moved or changed.

        Args:
            keys: top-level keys of the saved state, e.g. `("params", "batch_stats")`.

        Returns:
            ``(step, arrays, damaged)``: the step read, what :meth:`restore_arrays`
            gives for it, and ``(step, reason)`` for each newer damaged step
            skipped, newest first.

        Raises:
            FileNotFoundError: If the directory holds no checkpoint.
            CheckpointDamagedError: If every step is damaged; the message lists
                them.
            ValueError: If the newest intact step lacks one of `keys`.
            CheckpointSourceError: If it cannot be filled from the reference
                (see :meth:`restore_arrays`).
        """
        step, arrays, damaged = self._newest_intact(
            lambda step: self.restore_arrays(keys, step=step), move_aside=False
        )
        return step, arrays, damaged

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
            CheckpointDamagedError: If the step's metadata file is missing,
                truncated or corrupt.
        """
        return self._read_metadata(self._resolve_step(step))

    @property
    def damaged_directory(self) -> Path:
        """Where :meth:`restore_latest_intact` moves damaged steps: ``<directory>_damaged``."""
        return self._directory.with_name(self._directory.name + "_damaged")

    def close(self) -> None:
        """Waits for pending work and releases Orbax resources. Idempotent."""
        if not self._closed:
            self._manager.close()
            self._state_handler.close()
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

    def _newest_intact(
        self, read: Callable[[int], Any], *, move_aside: bool
    ) -> tuple[int, Any, list[tuple[int, str]]]:
        """`read(step)` of the newest step that is not damaged, trying older ones in turn.

        Returns `(step, what read gave, [(damaged step, reason)], newest first)`.
        With `move_aside`, each damaged step is moved to `damaged_directory`;
        without, the directory is left as it is (another run's checkpoints).
        """
        damaged: list[tuple[int, str]] = []
        moved: dict[int, Path] = {}
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(
                f"No checkpoint found in {self._directory}: it holds no finished step."
            )
        for step in reversed(steps):
            try:
                return step, read(step), damaged
            except CheckpointDamagedError as e:
                damaged.append((step, e.reason))
                if not move_aside:
                    _log.warning(
                        "Checkpoint step %d in %s is damaged (%s); skipping it.",
                        step,
                        self._directory,
                        e.reason,
                    )
                    continue
                moved[step] = self._move_aside(step)
                _log.warning(
                    "Checkpoint step %d in %s is damaged (%s); moved it to %s and trying "
                    "the next older step.",
                    step,
                    self._directory,
                    e.reason,
                    moved[step],
                )
        if not move_aside:
            listed = "\n".join(f"  step {s}: {r}" for s, r in damaged)
            raise CheckpointDamagedError(
                f"Every checkpoint in {self._directory} is damaged (left in place):\n{listed}",
                damaged,
            )
        listed = "\n".join(f"  step {s}: {r} (moved to {moved[s]})" for s, r in damaged)
        raise CheckpointDamagedError(
            f"Every checkpoint in {self._directory} is damaged; each was moved aside and "
            f"the directory now holds none:\n{listed}\nStart afresh, or repair a step and "
            "move it back.",
            damaged,
            moved,
        )

    def _resolve_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(
                f"No checkpoint found in {self._directory}: it holds no finished step."
            )
        if step is None:
            return steps[-1]
        step = _checks.count("step", step)
        if step not in steps:
            raise FileNotFoundError(
                f"No checkpoint for step {step} in {self._directory}; saved steps: {steps}."
            )
        return step

    def _saved_tree(self, step: int) -> PyTree:
        """The saved state's tree of leaf metadata, once its files are checked."""
        try:
            item = self._step_path(step) / _STATE
        except ValueError as e:  # Orbax no longer finds the step's directory.
            raise self._damaged(step, "its directory is gone", e) from e
        try:
            problem = _check_state_files(item)
        except PermissionError as e:
            raise self._damaged(step, f"cannot read its {_STATE!r} item", e) from e
        if problem:
            raise self._damaged(step, problem)
        try:
            saved = self._manager.item_metadata(step)[_STATE]
        except Exception as e:
            raise self._damaged(step, f"cannot read the layout of its {_STATE!r} item", e) from e
        tree = getattr(saved, "tree", None)
        if tree is None:
            raise self._damaged(
                step, f"its {_STATE!r} item is missing or has no layout file (_METADATA)"
            )
        return tree

    def _read_metadata(self, step: int) -> dict[str, Any]:
        return {k: v for k, v in self._read_stored(step).items() if k not in (_CHECKSUMS, _SOURCE)}

    def _read_stored(self, step: int) -> dict[str, Any]:
        """The step's metadata item as stored: the caller's metadata and the checksums."""
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()})
            )[_METADATA]
        except Exception as e:
            raise self._damaged(step, f"cannot read its {_METADATA!r} item", e) from e
        if not isinstance(restored, Mapping):
            raise self._damaged(
                step, f"its {_METADATA!r} item holds {type(restored).__name__}, not a JSON object"
            )
        return dict(restored)

    def _verify(self, step: int, state: PyTree, saved: Mapping[str, str] | None) -> None:
        """Raises CheckpointDamagedError if a restored leaf's checksum differs from `saved`.

        `saved` is None for a step written before checksums were recorded.
        """
        if saved is None:
            return
        now = _checksums(state, only=saved.keys())
        leaves = {_path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
        changed = []
        for path, checksum in saved.items():
            if checksum.startswith(_SUM):
                if now.get(path, checksum) != checksum:
                    changed.append(path)
            elif checksum and path in leaves and _whole_here(leaves[path]):  # an earlier CRC-32
                if _crc32(leaves[path]) != checksum:
                    changed.append(path)
        if changed:
            raise self._damaged(
                step,
                f"the stored values of {_checks.listing(changed, _MAX_LISTED)} changed after "
                "they were written (checksum mismatch)",
            )

    def _reference(self) -> Reference | None:
        """The reference given, the function that gives it called once."""
        given = self._reference_given
        if given is not None and not isinstance(given, Reference):
            given = given()
            if given is not None and not isinstance(given, Reference):
                raise TypeError(
                    "The reference function of a Checkpointer must return a "
                    f"checkpoint.Reference or None, got {type(given).__name__}."
                )
            self._reference_given = given
        if given is not None and self._reference_leaves is None:
            self._reference_leaves = _flat_paths(given.tree)
        return given

    def _reference_checksum(self, path: str, dtype: Any, value: Any = None) -> str:
        """The checksum of the reference's leaf at `path` cast to `dtype`, computed once.

        `value`: that cast, if the caller has it.
        """
        assert self._reference_leaves is not None
        key = (path, np.dtype(dtype).name)
        if key not in self._reference_checksums:
            if value is None:
                value = _in_dtype(self._reference_leaves[path], dtype)
            self._reference_checksums[key] = _checksums({"": value})[""]
        return self._reference_checksums[key]

    def _unchanged(self, state: PyTree, checksums: Mapping[str, str]) -> dict[str, Any]:
        """What `save` records of each leaf of `state` equal to the reference's, by path."""
        if self._reference_given is None or self._reference() is None:
            return {}
        assert self._reference_leaves is not None
        omitted = {}
        for path, leaf in _flat_paths(state).items():
            source = self._reference_leaves.get(path)
            stored = _stored_shape_dtype(leaf)
            if source is None or stored is None or _is_key(leaf) or _is_key(source):
                continue
            if np.shape(source) != stored[0]:
                continue
            checksum = self._reference_checksum(path, stored[1])  # in the state's dtype
            if checksum == checksums[path]:
                omitted[path] = {
                    "checksum": checksum,
                    "shape": list(stored[0]),
                    "dtype": stored[1].name,
                }
        return omitted

    def _source_values(
        self, step: int, source: Mapping[str, Any], paths: Sequence[str]
    ) -> dict[str, Any]:
        """The reference's values of the leaves at `paths` that `step` left out, checked.

        In the recorded dtypes: NumPy arrays, or `jax.Array`s for reference
        leaves split over processes.
        """
        recorded, omitted = source["name"], source["omitted"]
        reference = self._reference()
        where = f"Checkpoint step {step} in {self._directory}"
        count = f"{len(omitted)} lea{'f' if len(omitted) == 1 else 'ves'}"
        if reference is None:
            raise CheckpointSourceError(
                f"{where} does not store {count} equal to its source {recorded!r}, and this "
                f"Checkpointer was given no reference to fill them from (first: "
                f"{_checks.listing(sorted(omitted), _MAX_LISTED)}). Give it "
                f"reference=checkpoint.Reference(<name>, <the values the run started from>); "
                "their content is checked against the step's record.",
                step=step,
                recorded=recorded,
                given=None,
                differ=sorted(omitted),
            )
        assert self._reference_leaves is not None
        values, missing, changed = {}, [], []
        for path in sorted(paths):
            entry = omitted[path]
            shape, dtype = tuple(entry["shape"]), jax.numpy.dtype(entry["dtype"])
            leaf = self._reference_leaves.get(path)
            if leaf is None or np.shape(leaf) != shape:
                have = "none" if leaf is None else f"{_fmt(np.shape(leaf), leaf.dtype)}"
                missing.append(f"{path} (reference {have}, checkpoint {_fmt(shape, dtype)})")
                continue
            values[path] = _in_dtype(leaf, dtype)
            if self._reference_checksum(path, dtype, values[path]) != entry["checksum"]:
                changed.append(path)
        if missing or (changed and self._strict):
            problems = []
            if changed:
                problems.append(
                    f"differs in content at {len(changed)} of them: "
                    f"{_checks.listing(changed, _MAX_LISTED)}"
                )
            if missing:
                problems.append(f"lacks {len(missing)}: {_checks.listing(missing, _MAX_LISTED)}")
            advice = "Give the source the run started from (its content is checked, not its name)"
            advice += "." if missing else ", or strict=False to load the given values anyway."
            raise CheckpointSourceError(
                f"{where} does not store {count} equal to its source {recorded!r}, but the "
                f"reference given, {reference.name!r}, {'; and '.join(problems)}. {advice}",
                step=step,
                recorded=recorded,
                given=reference.name,
                differ=sorted([*changed, *(m.split(" ", 1)[0] for m in missing)]),
            )
        if changed:
            _log.warning(
                "%s does not store leaves equal to its source %r; the reference given, %r, differs "
                "in content at %d of them (%s): loading its values anyway (strict=False), so "
                "the restored state is not the one saved.",
                where,
                recorded,
                reference.name,
                len(changed),
                _checks.listing(changed, _MAX_LISTED),
            )
        elif reference.name != recorded:
            _log.info(
                "%s was saved against %r; the reference %r holds the same content.",
                where,
                recorded,
                reference.name,
            )
        return values

    def _read_state(self, step: int, target: PyTree) -> PyTree:
        try:
            item = epath.Path(self._step_path(step) / _STATE)
            return self._state_handler.restore(item, args=ocp.args.StandardRestore(target))
        except ValueError as e:
            if _ORBAX_STRUCTURE_MISMATCH in str(e):
                raise self._mismatch_error(step, str(e)) from e
            raise self._damaged(step, f"cannot read its {_STATE!r} item", e) from e
        except Exception as e:
            raise self._damaged(step, f"cannot read its {_STATE!r} item", e) from e

    def _agreed(self, step: int, read: Callable[[], Any]) -> Any:
        """`read()`, run on every process: when it fails on one, it fails on all.

        Each process reads its own shards, so one may meet damage the others do
        not see; they all raise the error of the first process that failed (a
        damaged step, a permission or a mismatch), and go on alike.
        """
        if not _multihost.several():
            return read()
        try:
            result, failure = read(), None
        except (CheckpointDamagedError, PermissionError, ValueError) as e:
            result, failure = None, e
        texts = _multihost.gather_text(_failure_text(failure))
        first = next((i for i, text in enumerate(texts) if text), None)
        if first is None:
            return result
        if first == jax.process_index():
            raise failure
        kind, text = texts[first].split(":", 1)
        if kind == "permission":
            raise PermissionError(errno.EACCES, text)
        if kind == "mismatch":
            raise ValueError(text)
        raise self._damaged(step, f"{text} (read by process {first})")

    def _damaged(
        self, step: int, what: str, error: BaseException | None = None
    ) -> CheckpointDamagedError | PermissionError:
        """The error for a step that cannot be read: damage, unless permission is wanting."""
        found = _os_error(error) if error is not None else None
        if found is not None and found[0] in (errno.EACCES, errno.EPERM):
            code, strerror, where = found
            at = f" ({where})" if where else ""
            return PermissionError(
                code,
                f"Cannot read checkpoint step {step} in {self._directory}: {strerror}{at}. "
                "It is not damaged and was left in place; give this process read access.",
            )
        reason = f"{what}: {_one_line(error)}" if error is not None else what
        return CheckpointDamagedError(
            f"The checkpoint at step {step} in {self._directory} is damaged: {reason}.",
            [(step, reason)],
        )

    def _check_space(self, step: int, state: PyTree) -> None:
        needed = _stored_bytes(state)
        free = shutil.disk_usage(self._directory).free
        if _multihost.several():  # each process writes its shards; decide alike
            gathered = _multihost.gather_ints([needed, free])
            needed = sum(row[0] for row in gathered)
            free = min(row[1] for row in gathered)
        if needed > free:
            raise CheckpointWriteError(
                errno.ENOSPC,
                f"No space for checkpoint step {step} in {self._directory}: it needs about "
                f"{_size(needed)} and {_size(free)} is free. Nothing was written; "
                f"{self._remaining()}",
            )

    def _write_error(self, step: int, error: Exception) -> Exception:
        """`error` as a one-line CheckpointWriteError if the environment caused it."""
        found = _os_error(error)
        if found is None or found[0] not in _ENVIRONMENT_ERRNOS:
            return error
        code, strerror, where = found
        if _multihost.is_primary():
            _remove_unfinished_steps(self._directory)
        self._manager.reload()
        at = f" ({where})" if where else ""
        return CheckpointWriteError(
            code,
            f"Cannot write checkpoint step {step} in {self._directory}: {strerror}{at}. "
            f"Nothing of step {step} was kept; {self._remaining()}",
        )

    def _remaining(self) -> str:
        steps = self.all_steps()
        if not steps:
            return "there is no earlier checkpoint."
        return f"the newest checkpoint is still step {steps[-1]}."

    def _prune(self) -> None:
        if self._max_to_keep is None:
            return
        for old in self.all_steps()[: -self._max_to_keep]:
            self._delete(old)

    def _delete(self, step: int) -> None:
        path = self._step_path(step)
        if not path.is_symlink():
            self._manager.delete(step)  # by process 0, then a barrier (Orbax)
            return
        _multihost.barrier(f"layerfreeze.Checkpointer.unlink:{step}:before")
        if _multihost.is_primary():
            target = os.readlink(path)
            path.unlink()
            _log.info("Removed checkpoint step %d, a link to %s (left in place).", step, target)
        _multihost.barrier(f"layerfreeze.Checkpointer.unlink:{step}:after")
        self._manager.reload()

    def _step_path(self, step: int) -> Path:
        return Path(
            ocp.path.step.find_step_path(
                self._directory, ocp.path.step.standard_name_format(), step=step
            )
        )

    def _move_aside(self, step: int) -> Path:
        source = self._step_path(step)
        # Every process has finished reading the step before process 0 moves it.
        _multihost.barrier(f"layerfreeze.Checkpointer.move_aside:{step}")
        dest = Path()
        if _multihost.is_primary():
            self.damaged_directory.mkdir(parents=True, exist_ok=True)
            dest = self.damaged_directory / source.name
            suffix = 1
            while dest.exists():
                dest = self.damaged_directory / f"{source.name}.{suffix}"
                suffix += 1
            # A sibling of the directory, so normally the same filesystem: a rename.
            shutil.move(source, dest)
        # Where it went, from process 0 (once it is there).
        dest = Path(_multihost.gather_text(str(dest))[0])
        # Orbax caches the list of steps; make it forget the one just moved.
        self._manager.reload()
        return dest

    def _mismatch_error(self, step: int, details: str) -> ValueError:
        return ValueError(
            f"The checkpoint at step {step} in {self._directory} does not match the "
            f"structure of `target`:\n{details}"
        )


def _one_line(error: BaseException) -> str:
    """The first line of an error, without TensorStore's spec dump, kept short."""
    # Orbax wraps a failed array read in an Exception whose message is mostly the
    # TensorStore spec; the cause says what actually failed.
    while error.__cause__ is not None and "See full TensorStore details" in str(error):
        error = error.__cause__
    lines = str(error).strip().splitlines()
    text = lines[0].split(" [tensorstore_spec", 1)[0].rstrip(".") if lines else ""
    if len(text) > _MAX_REASON:
        text = text[: _MAX_REASON - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _check_state_files(item: Path) -> str:
    """Reads what Orbax needs from a saved ``state`` item; '' if it is all there.

    Orbax (0.12) reads a step's arrays concurrently and, when one read fails,
    closes its event loop with the others still pending: they later print
    "Exception ignored" tracebacks at unpredictable times. Checking the files
    first, with synchronous TensorStore reads of one byte per stored value, finds
    truncated, emptied and deleted files before Orbax reads any of them.
    """
    layout = None
    for path in [item / "_METADATA", *sorted((item / "array_metadatas").glob("*"))]:
        name = f"{_STATE}/{path.relative_to(item)}"
        try:
            parsed = json.loads(path.read_bytes())
        except FileNotFoundError:
            return f"{name} is missing"
        except PermissionError:
            raise  # not damage: the caller says so
        except (OSError, ValueError) as e:
            return f"{name} is unreadable: {_one_line(e)}"
        layout = parsed if layout is None else layout
    if not isinstance(layout, dict) or not layout.get("use_ocdbt", True):
        return ""  # Not a layout this check knows; Orbax reads it and tells.
    if not (item / "manifest.ocdbt").is_file():
        return f"{_STATE}/manifest.ocdbt is missing"
    try:
        base = {"driver": "file", "path": f"{item}/"}
        store = ts.KvStore.open({"driver": "ocdbt", "base": base}).result()
        keys = store.list().result()
        # The last byte of each value: its data file must still reach that far.
        reads = [(key, store.read(key, byte_range=slice(-1, None))) for key in keys]
        for key, read in reads:
            if len(read.result().value) != 1:
                return f"the data of {key.decode()!r} is missing from {_STATE}/"
    except ValueError as e:
        return f"cannot read {_STATE}/: {_one_line(e)}"
    return ""


def _stored_bytes(tree: PyTree) -> int:
    """The bytes of array data this process writes for `tree`: one replica of each shard."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        if isinstance(leaf, jax.Array):
            total += sum(s.data.nbytes for s in leaf.addressable_shards if s.replica_id == 0)
        else:
            total += np.asarray(leaf).nbytes
    return total


def _size(nbytes: int) -> str:
    """`1.5 MiB`: bytes in the largest binary unit that keeps a number >= 1."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def _os_error(error: BaseException) -> tuple[int, str, str] | None:
    """`(errno, strerror, filename)` of the OS error under `error`, if one is there.

    Follows the chain of causes; TensorStore (under Orbax) reports one as
    `[os_error_code='28']` in its message rather than as an OSError.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno is not None:
            return error.errno, error.strerror or os.strerror(error.errno), error.filename or ""
        match = _TENSORSTORE_OS_ERROR.search(str(error))
        if match:
            code = int(match.group(1))
            return code, os.strerror(code), ""
        error = error.__cause__ or error.__context__
    return None


def _checksums(tree: PyTree, *, only: Collection[str] | None = None) -> dict[str, str]:
    """`{leaf path: checksum}`, the same whatever the mesh and however many processes.

    A leaf's checksum is a hash of its dtype and shape plus the sum, modulo
    2**64, of a hash of each element's bits and position (`_block_sum`): a sum
    does not depend on the order it is taken in, so each process adds up the
    shards it holds (one replica of each) and the sums of leaves split over
    processes are gathered. One changed element always changes the sum (its
    hash is a bijection of its bits); several do with probability 1 - 2**-64.
    On several processes every one must call this with the same tree. With
    `only`, the leaves at other paths are left out.
    """
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    if only is not None:
        flat = [(path, leaf) for path, leaf in flat if _path_str(path) in only]
    headers, sums, split = [], [], []
    for i, (_, leaf) in enumerate(flat):
        dtype, shape, blocks, whole = _local_blocks(leaf)
        headers.append(zlib.crc32(f"{np.dtype(dtype).name}{tuple(shape)}".encode()))
        sums.append(sum(_block_sum(data, starts, shape) for starts, data in blocks))
        if not whole:
            split.append(i)
    if split and _multihost.several():
        gathered = _multihost.gather_ints([sums[i] % 2**64 for i in split])
        for j, i in enumerate(split):
            sums[i] = sum(row[j] for row in gathered)
    return {
        _path_str(path): f"{_SUM}{(header + total) % 2**64:016x}"
        for (path, _), header, total in zip(flat, headers, sums, strict=True)
    }


Blocks = list[tuple[list[int], np.ndarray]]


def _local_blocks(leaf: Any) -> tuple[Any, tuple[int, ...], Blocks, bool]:
    """`(dtype, shape, [(start of block, block)], whole)`: what this process hashes of `leaf`.

    A leaf split over processes gives one replica of each shard this process
    holds (`whole` False); any other leaf is one block, all of it.
    """
    if isinstance(leaf, jax.Array):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        if not leaf.is_fully_addressable:
            blocks = [
                (_starts(shard.index, leaf.ndim), np.asarray(shard.data))
                for shard in leaf.addressable_shards
                if shard.replica_id == 0
            ]
            return leaf.dtype, tuple(leaf.shape), blocks, False
    array = np.asarray(leaf)
    return array.dtype, array.shape, [([0] * array.ndim, array)], True


def _starts(index: tuple[Any, ...], ndim: int) -> list[int]:
    """Where a shard starts in each dimension (its index may leave trailing ones out)."""
    starts = [(entry.start or 0) if isinstance(entry, slice) else int(entry) for entry in index]
    return starts + [0] * (ndim - len(starts))


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
# SplitMix64's finaliser, a bijection of 64-bit words that spreads every bit:
# (multiplier, shift before it); a last shift by 31 follows.
_MIX = (
    (np.uint64(0xBF58476D1CE4E5B9), np.uint64(30)),
    (np.uint64(0x94D049BB133111EB), np.uint64(27)),
)


def _block_sum(data: np.ndarray, starts: Sequence[int], shape: tuple[int, ...]) -> int:
    """The sum (mod 2**64) of the element hashes of `data`, the block at `starts` of a leaf."""
    data = np.asarray(data, order="C")  # (np.ascontiguousarray makes a scalar 1-D)
    if data.ndim and data.shape[0] > 1 and data.size > _CHUNK:
        rows = max(1, _CHUNK // (data.size // data.shape[0]))
        chunks = (
            _block_sum(data[r : r + rows], [starts[0] + r, *starts[1:]], shape)
            for r in range(0, data.shape[0], rows)
        )
        return sum(chunks) % 2**64
    words = _words(data.reshape(-1))  # [elements, words per element]
    k = words.shape[1]
    z = _positions(starts, data.shape, shape)
    if k > 1:
        z = (z[:, None] * np.uint64(k) + np.arange(k, dtype=np.uint64)).reshape(-1)
    # hash(word, position) = mix(word ^ position * golden): a bijection of the word.
    z *= _GOLDEN
    z ^= words.reshape(-1)
    for multiplier, shift in _MIX:
        z ^= z >> shift
        z *= multiplier
    z ^= z >> np.uint64(31)
    return int(np.sum(z, dtype=np.uint64))


def _positions(starts: Sequence[int], block: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """The position in C order in the whole leaf of each element of a block: uint64, flat."""
    if tuple(block) == tuple(shape):  # all of it
        return np.arange(math.prod(shape), dtype=np.uint64)
    position, stride = np.zeros((), np.uint64), 1
    for dim in reversed(range(len(block))):
        axis = np.arange(starts[dim], starts[dim] + block[dim], dtype=np.uint64)
        axis *= np.uint64(stride)
        position = position + axis.reshape((-1,) + (1,) * (len(block) - 1 - dim))
        stride *= shape[dim]
    return np.broadcast_to(position, block).reshape(-1).copy()


def _words(flat: np.ndarray) -> np.ndarray:
    """The bits of each element of a 1-D array as 64-bit words: `[elements, words]`."""
    size = flat.dtype.itemsize
    if size in (1, 2, 4, 8):
        return flat.view(f"u{size}").astype(np.uint64)[:, None]
    if size % 8 == 0:
        return flat.view(np.uint64).reshape(flat.shape[0], size // 8)
    return flat.view(np.uint8).reshape(flat.shape[0], size).astype(np.uint64)


def _whole_here(leaf: Any) -> bool:
    """Whether this process holds all of `leaf`."""
    return not isinstance(leaf, jax.Array) or leaf.is_fully_addressable


def _crc32(leaf: Any) -> str:
    """The CRC-32 of a leaf's dtype, shape and bytes, as steps recorded it before `_SUM`."""
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    array = np.ascontiguousarray(np.asarray(leaf))
    crc = zlib.crc32(f"{array.dtype.str}{array.shape}".encode())
    return f"{zlib.crc32(array.reshape(-1).view(np.uint8), crc):08x}"


def _failure_text(failure: BaseException | None) -> str:
    """`kind:text` of a failed read, for the other processes ('' if it did not fail)."""
    if failure is None:
        return ""
    if isinstance(failure, CheckpointDamagedError):
        return f"damaged:{failure.reason}"
    if isinstance(failure, PermissionError):
        return f"permission:{failure.strerror or failure}"
    return f"mismatch:{failure}"


def _remove_unfinished_steps(directory: Path) -> None:
    # Orbax's own test for "not finalized" (the temporary-name suffix), so we only
    # ever delete what Orbax would never restore from.
    for tmp in ocp.path.step.all_temporary_paths(directory):
        shutil.rmtree(tmp.get(), ignore_errors=True)


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


def _flat_paths(tree: PyTree, *, keep_none: bool = False) -> dict[str, Any]:
    """`{path: leaf}`; with `keep_none`, empty `None` nodes are listed as leaves too."""
    is_leaf = (lambda x: x is None) if keep_none else None
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {_path_str(path): leaf for path, leaf in flat}


def _is_key(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _leave_out(state: PyTree, omitted: Collection[str]) -> PyTree:
    """`state` with the leaves at `omitted` paths replaced by `None`, which Orbax stores as
    an empty node: the step keeps its structure and holds no bytes of them."""
    if not omitted:
        return state
    return jax.tree_util.tree_map_with_path(
        lambda p, x: None if _path_str(p) in omitted else x, state
    )


def _fill(tree: PyTree, values: Mapping[str, Any]) -> PyTree:
    """`tree` with its `None` nodes at the paths of `values` replaced by those values."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
    leaves = [values.get(_path_str(p), x) if x is None else x for p, x in flat]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _omitted(stored: Mapping[str, Any]) -> dict[str, _Omitted] | None:
    """What a step's metadata records of the leaves it left out; None if that is unreadable."""
    source = stored.get(_SOURCE)
    if source is None:
        return {}
    try:
        if not isinstance(source["name"], str):
            return None
        omitted = {}
        for path, entry in source["omitted"].items():
            if not isinstance(entry["checksum"], str):
                return None
            shape = tuple(int(n) for n in entry["shape"])
            omitted[path] = _Omitted(shape, jax.numpy.dtype(entry["dtype"]))
        return omitted
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


class _Omitted(NamedTuple):
    """A leaf a step left out, as `_describe_mismatch` compares it with a target leaf."""

    shape: tuple[int, ...]
    dtype: np.dtype


def _in_dtype(leaf: Any, dtype: Any) -> Any:
    """`leaf` as an array of `dtype`: NumPy, but a `jax.Array` split over processes stays one."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return leaf if leaf.dtype == dtype else leaf.astype(dtype)
    array = np.asarray(leaf)
    return array if array.dtype == dtype else array.astype(dtype)


def _host(value: Any) -> np.ndarray:
    """`value` as a NumPy array on this process (gathered if it is split over processes)."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return np.asarray(value)


def _placed(value: Any, like: Any) -> Any:
    """`value` where `restore` puts a leaf read into the target leaf `like`.

    A `jax.Array` or a `ShapeDtypeStruct` with a sharding: in that sharding (each
    device gets its shards, copied, none shared with the reference); a
    `ShapeDtypeStruct` without one: on the default device, as Orbax restores it;
    a NumPy array: NumPy; a Python scalar: a Python scalar.
    """
    if isinstance(like, jax.Array | jax.ShapeDtypeStruct):
        where = like.sharding
        if where is None:
            where = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return sharding.place(value, where)
    if isinstance(like, bool | int | float | complex):
        return np.asarray(value).item()
    return np.asarray(value)


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
    return f"  {label}: {_checks.listing(items, _MAX_LISTED)}"


def _describe_mismatch(
    saved_tree: PyTree, target: PyTree, omitted: Mapping[str, _Omitted] | None = None
) -> str:
    """Lists leaves missing, unexpected or differently shaped/typed; '' if none.

    The leaves a step left out (`omitted`) count as saved, with their recorded
    shapes and dtypes.
    """
    saved = {_path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(saved_tree)[0]}
    saved |= omitted or {}
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
