"""What is frozen, what is trainable, and what it costs: a Keras-style summary."""

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, NoReturn

import jax
import numpy as np
from flax import nnx

from layerfreeze import _blocks, _checks, _nnx, _paths, _plan, _spec, _upstream

__all__ = ["FreezeSummary", "GroupSummary", "summary", "tree_bytes", "opt_state_bytes_by_path"]

_SHARED = "(shared)"
# Problems listed in an error message before it says "and N more".
_MAX_LISTED = 5


@dataclasses.dataclass(frozen=True)
class GroupSummary:
    """One row of a `FreezeSummary`: a top-level group of parameters."""

    name: str
    params: int
    bytes: int
    trainable_params: int
    opt_state_bytes: int | None

    @property
    def status(self) -> str:
        if self.trainable_params == 0:
            return "frozen"
        if self.trainable_params == self.params:
            return "trainable"
        return "partial"


@dataclasses.dataclass(frozen=True)
class FreezeSummary:
    """Per-group counts of a parameter tree under a freeze spec.

    Prints as a table; `as_dict()` gives the numbers.

    Attributes:
      spec: the freeze spec, described.
      groups: one `GroupSummary` per row.
      shared_opt_state_bytes: bytes of optimizer state that belong to no
        parameter (step counts); None without an optimizer state.
      bytes_by_dtype: the parameters' bytes per dtype name, largest first
        (`{"float32": ..., "bfloat16": ...}` with frozen parameters stored in
        bfloat16). Printed as a line when the parameters mix dtypes.
      bytes_per_device: when the arrays lie on several devices (sharded or
        replicated over a mesh), per device (`"cpu:0"`) the bytes of its
        shards: `{"params": ..., "opt_state": ...}` (`opt_state` None without
        an optimizer state); None otherwise. Printed as a line.
    """

    spec: str
    groups: tuple[GroupSummary, ...]
    shared_opt_state_bytes: int | None
    bytes_by_dtype: Mapping[str, int] = dataclasses.field(default_factory=dict)
    bytes_per_device: Mapping[str, Mapping[str, int | None]] | None = None

    @property
    def total_params(self) -> int:
        return sum(g.params for g in self.groups)

    @property
    def trainable_params(self) -> int:
        return sum(g.trainable_params for g in self.groups)

    @property
    def frozen_params(self) -> int:
        return self.total_params - self.trainable_params

    @property
    def total_bytes(self) -> int:
        return sum(g.bytes for g in self.groups)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    @property
    def opt_state_bytes(self) -> int | None:
        if self.shared_opt_state_bytes is None:
            return None
        return self.shared_opt_state_bytes + sum(g.opt_state_bytes or 0 for g in self.groups)

    def as_dict(self) -> dict[str, Any]:
        """The numbers, as plain Python values."""
        return {
            "spec": self.spec,
            "groups": {
                g.name: {
                    "params": g.params,
                    "bytes": g.bytes,
                    "trainable_params": g.trainable_params,
                    "status": g.status,
                    "opt_state_bytes": g.opt_state_bytes,
                }
                for g in self.groups
            },
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "frozen_params": self.frozen_params,
            "total_bytes": self.total_bytes,
            "trainable_fraction": self.trainable_fraction,
            "opt_state_bytes": self.opt_state_bytes,
            "bytes_by_dtype": dict(self.bytes_by_dtype),
            "bytes_per_device": None
            if self.bytes_per_device is None
            else {d: dict(b) for d, b in self.bytes_per_device.items()},
        }

    def __str__(self) -> str:
        with_opt = self.shared_opt_state_bytes is not None
        header = ["group", "params", "size", "status"] + (["opt state"] if with_opt else [])
        rows = [header]
        for g in self.groups:
            row = [g.name, f"{g.params:,}", _human(g.bytes), g.status]
            if with_opt:
                row.append(_human(g.opt_state_bytes or 0))
            rows.append(row)
        if with_opt and self.shared_opt_state_bytes:
            rows.append([_SHARED, "", "", "", _human(self.shared_opt_state_bytes)])
        total = ["total", f"{self.total_params:,}", _human(self.total_bytes), ""]
        if with_opt:
            total.append(_human(self.opt_state_bytes or 0))
        rows.append(total)
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]

        def fmt(row):
            cells = [row[0].ljust(widths[0])] + [
                c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
            ]
            return "  ".join(cells).rstrip()

        rule = "-" * len(fmt(header))
        lines = [f"freeze spec: {self.spec}", fmt(header), rule]
        lines += [fmt(r) for r in rows[1:-1]]
        lines += [rule, fmt(rows[-1])]
        lines.append(
            f"trainable: {self.trainable_params:,} of {self.total_params:,} "
            f"({100 * self.trainable_fraction:.2f}%), frozen: {self.frozen_params:,}"
        )
        if len(self.bytes_by_dtype) > 1:
            by_dtype = ", ".join(f"{d} {_human(n)}" for d, n in self.bytes_by_dtype.items())
            lines.append(f"bytes by dtype: {by_dtype}")
        if self.bytes_per_device:
            lines.append(_per_device_line(self.bytes_per_device))
        return "\n".join(lines)


def _per_device_line(per_device: Mapping[str, Mapping[str, int | None]]) -> str:
    """`bytes per device (4 devices): params 1.0 KiB, opt state 2.0 KiB`; when devices
    hold different amounts, the numbers of the one holding the most, named."""

    def total(bytes_: Mapping[str, int | None]) -> int:
        return sum(n or 0 for n in bytes_.values())

    fullest = max(per_device, key=lambda d: total(per_device[d]))
    where = f"{len(per_device)} devices"
    if len({tuple(b.items()) for b in per_device.values()}) > 1:
        where += f", most on {fullest}"
    held = per_device[fullest]
    parts = [f"params {_human(held['params'] or 0)}"]
    if held.get("opt_state") is not None:
        parts.append(f"opt state {_human(held['opt_state'])}")
    return f"bytes per device ({where}): {', '.join(parts)}"


def summary(
    params: Any,
    spec: _spec.SpecLike | _plan.Plan,
    opt_state: Any = None,
    *,
    order: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
) -> FreezeSummary:
    """Summarises `params` under `spec`, per top-level group (or per given group).

    Args:
      params: the parameter pytree, or an NNX model (its `nnx.Param`s).
      spec: the freeze spec (anything `layerfreeze.FreezeSpec` accepts), or
        its `layerfreeze.Plan` for `params`.
      opt_state: optionally the optimizer state (or an `nnx.Optimizer`), to
        count its bytes per group. State leaves that belong to no parameter
        (step counts) are shown as `(shared)`. It must be the state of these
        params under this spec; see Raises.
      order: the order of the groups in the table, e.g. a model's
        `GROUPS`; groups it does not name come last. Default: the order of the
        keys of `params` when it is a mapping.
      groups: rows by these path prefixes instead of top-level keys, in this
        order: a model's ordered layer groups, e.g.
        `models.vit_groups(depth)` for one row per transformer block. A leaf
        goes to the first group that is its path or a prefix of it; every
        leaf must be covered, and every group must cover a leaf.

    Returns:
      A `FreezeSummary`; `print` it, or read `as_dict()`. Below the table,
      a line gives the parameters' bytes per dtype when they mix dtypes
      (frozen leaves stored in bfloat16 by `train.make_steps(...,
      frozen_dtype=...)`), and one the bytes on each device when the arrays
      lie on several (the most any device holds, and which, when they differ).

    Raises:
      TypeError: `params` is no parameter pytree (None, a string, a model,
        an optimizer), `spec` is no spec (e.g. an optimizer), `order` or
        `groups` is not a sequence of names, or `opt_state` is not a pytree
        of arrays (a string, a model, ...).
      ValueError: `opt_state` does not belong to `params` under `spec`: a leaf
        whose path ends with a parameter's path has a shape that parameter
        cannot give, state sits among per-parameter state for a parameter
        `params` lacks, no leaf belongs to any parameter, `opt_state` is the
        parameter tree itself, or a `layerfreeze.freeze` state keeps trainable
        state for a parameter `spec` freezes (or frozen-branch state for one it
        trains), i.e. it was built for another spec.

    >>> import numpy as np
    >>> s = summary({"stem": {"w": np.zeros(3)}, "head": {"w": np.zeros(2)}}, "stem")
    >>> s.trainable_params, s.total_params
    (2, 5)
    """
    if order is not None:
        order = _checks.groups(order, "order", empty=True)
    if groups is not None:
        groups = _checks.groups(groups)
    params = _nnx.as_params(params)
    plan = _plan.plan(params, spec)
    spec = plan.spec
    if isinstance(opt_state, nnx.Optimizer):
        opt_state = nnx.state(opt_state, nnx.OptState)
    resolved = dict(zip(plan.paths, plan.frozen, strict=True))
    leaves = jax.tree.leaves(params)
    depths = {
        p: (np.shape(x)[0] if np.ndim(x) else 1) for p, x in zip(resolved, leaves, strict=True)
    }
    group_of = _group_of(list(resolved), groups, depths)
    per_group = _count_params(resolved, leaves, group_of, depths, groups or ())
    shared = None
    if opt_state is not None:
        shapes = {path: tuple(np.shape(leaf)) for path, leaf in zip(resolved, leaves, strict=True)}
        _check_opt_state(opt_state, shapes, resolved, spec.describe())
        shared = _add_opt_state_bytes(per_group, opt_state, list(resolved), group_of, depths)
    per_group = _ordered(per_group, list(groups) if groups is not None else order, params)
    return FreezeSummary(
        spec=spec.describe(),
        groups=_group_summaries(per_group, with_opt_state=opt_state is not None),
        shared_opt_state_bytes=shared,
        bytes_by_dtype=_bytes_by_dtype(leaves),
        bytes_per_device=_bytes_per_device(params, opt_state),
    )


def _bytes_by_dtype(leaves: Sequence[Any]) -> dict[str, int]:
    """Bytes per dtype name, largest first."""
    out: dict[str, int] = {}
    for leaf in leaves:
        dtype = getattr(leaf, "dtype", None)
        name = np.dtype(np.asarray(leaf).dtype if dtype is None else dtype).name
        out[name] = out.get(name, 0) + _size(leaf)[1]
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


def _bytes_per_device(params: Any, opt_state: Any) -> dict[str, dict[str, int | None]] | None:
    """Per device, the bytes of its shards of `params` and `opt_state`; None unless
    the arrays lie on more than one device."""
    trees = {"params": params, "opt_state": opt_state}
    per_tree = {name: _device_bytes(tree) for name, tree in trees.items() if tree is not None}
    devices = sorted({d for held in per_tree.values() for d in held}, key=lambda d: d.id)
    if len(devices) < 2:
        return None
    return {
        f"{d.platform}:{d.id}": {
            name: per_tree[name].get(d, 0) if name in per_tree else None for name in trees
        }
        for d in devices
    }


def _device_bytes(tree: Any) -> dict[Any, int]:
    """Per device, the bytes of the shards of the arrays of `tree` that it holds."""
    out: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if not isinstance(sharding, jax.sharding.Sharding) or jax.dtypes.issubdtype(
            leaf.dtype, jax.dtypes.prng_key
        ):
            continue
        shape = tuple(leaf.shape)
        itemsize = np.dtype(leaf.dtype).itemsize
        for device, index in sharding.devices_indices_map(shape).items():
            size = math.prod(len(range(*s.indices(n))) for s, n in zip(index, shape, strict=True))
            out[device] = out.get(device, 0) + size * itemsize
    return out


# A row of counts per group: params, bytes, trainable params, optimizer-state bytes.
_Counts = list[int]


def _count_params(
    frozen: Mapping[str, _spec.FrozenBlocks],
    leaves: Sequence[Any],
    group_of: Mapping[str, str | tuple[str, ...]],
    depths: Mapping[str, int],
    first_rows: Sequence[str],
) -> dict[str, _Counts]:
    """Counts each leaf into its row, starting with the (empty) rows `first_rows`.

    A stacked leaf whose blocks go to different rows, or are frozen differently,
    counts one block's share per block.
    """
    per_group: dict[str, _Counts] = {g: [0, 0, 0, 0] for g in first_rows}
    for (path, leaf_frozen), leaf in zip(frozen.items(), leaves, strict=True):
        size, nbytes = _size(leaf)
        owners = group_of[path]
        if isinstance(owners, str) and isinstance(leaf_frozen, bool):
            _add_params(per_group, owners, size, nbytes, leaf_frozen)
            continue
        depth = depths[path]
        owners = owners if not isinstance(owners, str) else (owners,) * depth
        blocks = leaf_frozen if not isinstance(leaf_frozen, bool) else (leaf_frozen,) * depth
        for owner, block_frozen in zip(owners, blocks, strict=True):
            _add_params(per_group, owner, size // depth, nbytes // depth, block_frozen)
    return per_group


def _add_params(
    per_group: dict[str, _Counts], owner: str, size: int, nbytes: int, frozen: bool
) -> None:
    row = per_group.setdefault(owner, [0, 0, 0, 0])
    row[0] += size
    row[1] += nbytes
    row[2] += 0 if frozen else size


def _add_opt_state_bytes(
    per_group: dict[str, _Counts],
    opt_state: Any,
    paths: list[str],
    group_of: Mapping[str, str | tuple[str, ...]],
    depths: Mapping[str, int],
) -> int:
    """Adds each state leaf's bytes to its parameter's row; returns the bytes of the rest.

    The state of a stacked leaf spread over several rows is shared out per block.
    """
    shared = 0
    for (path, rows), nbytes in _opt_state_bytes(opt_state, paths).items():
        if path is None:
            shared += nbytes
            continue
        owners = group_of[path]
        if isinstance(owners, str):
            per_group[owners][3] += nbytes
            continue
        start, stop = rows if rows is not None else (0, depths[path])
        for owner in owners[start:stop]:
            per_group[owner][3] += nbytes // (stop - start)
    return shared


def _ordered(
    per_group: dict[str, _Counts], order: Sequence[str] | None, params: Any
) -> dict[str, _Counts]:
    """The rows in `order` (by default the keys of a mapping `params`), unnamed ones last."""
    if order is None and isinstance(params, Mapping):
        # Mappings keep their modules' definition order (stem ... head); the
        # flattened order is sorted.
        order = [str(k) for k in params.keys()]
    if order is None:
        return per_group
    rank = {g: i for i, g in enumerate(order)}
    return dict(sorted(per_group.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def _group_summaries(
    per_group: Mapping[str, _Counts], *, with_opt_state: bool
) -> tuple[GroupSummary, ...]:
    return tuple(
        GroupSummary(
            name=name,
            params=row[0],
            bytes=row[1],
            trainable_params=row[2],
            opt_state_bytes=row[3] if with_opt_state else None,
        )
        for name, row in per_group.items()
    )


def tree_bytes(tree: Any) -> int:
    """Total bytes of the array leaves of `tree`."""
    return sum(_size(leaf)[1] for leaf in jax.tree.leaves(tree))


def opt_state_bytes_by_path(opt_state: Any, param_paths: list[str]) -> dict[str | None, int]:
    """Attributes each optimizer-state leaf to the parameter it belongs to.

    A state leaf belongs to a parameter when its key path ends with the
    parameter's path (as Adam's `mu` and `nu` do); other leaves (counts,
    scalars) go under the key None. The state of the block ranges of a
    stacked leaf split by `layerfreeze.freeze` counts for that leaf.
    """
    out: dict[str | None, int] = {}
    for (owner, _), nbytes in _opt_state_bytes(opt_state, param_paths).items():
        out[owner] = out.get(owner, 0) + nbytes
    return out


def _opt_state_bytes(
    opt_state: Any, param_paths: list[str]
) -> dict[tuple[str | None, tuple[int, int] | None], int]:
    """Bytes per (parameter or None, block range of a split stacked leaf or None)."""
    known = {tuple(p.split("/")): p for p in param_paths}
    out: dict[tuple[str | None, tuple[int, int] | None], int] = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        keypath, key = _blocks.block_key_of(keypath)
        owner, _ = _owner(_paths.keypath_names(keypath), known)
        rows = None if key is None or owner is None else (key.start, key.stop)
        out[owner, rows] = out.get((owner, rows), 0) + _size(leaf)[1]
    return out


def _owner(names: tuple[str, ...], known: dict[tuple[str, ...], str]) -> tuple[str | None, int]:
    """The parameter whose path ends `names` (the longest such), and its length."""
    for n in range(len(names), 0, -1):
        owner = known.get(names[-n:])
        if owner is not None:
            return owner, n
    return None, 0


def _check_opt_state(
    opt_state: Any,
    shapes: dict[str, tuple[int, ...]],
    frozen: Mapping[str, _spec.FrozenBlocks],
    spec: str,
) -> None:
    """Raises unless `opt_state` looks like an optimizer state of these params.

    Robust to how optimizers nest their state (chains, wrappers, `MultiSteps`,
    `partition`) and to extra scalar leaves (counts, hyperparameters): only
    leaves whose path ends with a parameter's path are held to that parameter.
    """
    flat = jax.tree_util.tree_flatten_with_path(opt_state)[0]
    _check_array_leaves(opt_state, flat)
    owned, unowned = _by_owner(flat, shapes)
    problems = _owned_problems(owned, shapes, frozen)
    problems += _unowned_problems(unowned, owned, shapes)
    if problems:
        _raise_mismatch(problems, spec)


class _OwnedLeaf(NamedTuple):
    """An optimizer-state leaf whose path ends with the path of parameter `owner`."""

    names: tuple[str, ...]
    n: int  # how many trailing names are the parameter's path
    owner: str
    leaf: Any
    key: _blocks.BlockKey | None  # the block range of a stacked leaf split by `freeze`


def _check_array_leaves(opt_state: Any, flat: list[tuple[Any, Any]]) -> None:
    for keypath, leaf in flat:
        if not _is_array_like(leaf):
            got = type(opt_state).__name__
            if keypath:
                where = _paths.path_str(_paths.keypath_names(keypath))
                got += f" whose leaf {where} is a {type(leaf).__name__}, not an array"
            raise TypeError(
                "opt_state must be the optimizer state of `params` (e.g. `tx.init(params)`), "
                f"an nnx.Optimizer or None; got {got}."
            )


def _by_owner(
    flat: list[tuple[Any, Any]], shapes: Mapping[str, tuple[int, ...]]
) -> tuple[list[_OwnedLeaf], list[tuple[tuple[str, ...], Any]]]:
    """The leaves that belong to a parameter, and the (names, leaf) of the others."""
    known = {tuple(p.split("/")): p for p in shapes}
    owned, unowned = [], []
    for keypath, leaf in flat:
        keypath, key = _blocks.block_key_of(keypath)
        names = _paths.keypath_names(keypath)
        owner, n = _owner(names, known)
        if owner is None:
            unowned.append((names, leaf))
        else:
            owned.append(_OwnedLeaf(names, n, owner, leaf, key))
    return owned, unowned


def _owned_problems(
    owned: list[_OwnedLeaf],
    shapes: Mapping[str, tuple[int, ...]],
    frozen: Mapping[str, _spec.FrozenBlocks],
) -> list[str]:
    problems = []
    if any(o.n == len(o.names) for o in owned):
        problems.append(
            "it is a parameter tree (its leaves are named exactly like the parameters), "
            "not an optimizer state"
        )
    for o in owned:
        problems += _leaf_problems(o, shapes[o.owner], frozen[o.owner])
    return problems


def _leaf_problems(
    o: _OwnedLeaf, param_shape: tuple[int, ...], state: _spec.FrozenBlocks
) -> list[str]:
    """What in `o` a parameter of `param_shape`, frozen as `state`, cannot explain."""
    problems = []
    path, shape = _paths.path_str(o.names), tuple(np.shape(o.leaf))
    key = o.key
    if key is not None:
        path += f"/{key}"
        param_shape = (key.stop - key.start, *param_shape[1:])
        if not isinstance(state, bool) and key.stop <= len(state):
            state = all(state[key.start : key.stop])
    if not _derived_shape(shape, param_shape):
        problems.append(
            f"{path} has shape {shape}, which parameter {o.owner} of shape "
            f"{param_shape} cannot give"
        )
    branch = _branch(o.names[: len(o.names) - o.n])
    if branch == _spec.TRAINABLE and state is True:
        problems.append(f"{path} is trainable state for {o.owner}, which this spec freezes")
    elif branch == _spec.FROZEN and state is False:
        problems.append(f"{path} is frozen-branch state for {o.owner}, which this spec trains")
    return problems


def _unowned_problems(
    unowned: list[tuple[tuple[str, ...], Any]],
    owned: list[_OwnedLeaf],
    shapes: Mapping[str, tuple[int, ...]],
) -> list[str]:
    problems = []
    # Where per-parameter trees sit (Adam's `mu`, ...): any other leaf there
    # is state for a parameter these params do not have.
    roots = {o.names[: len(o.names) - o.n] for o in owned if o.n < len(o.names)}
    for names, _ in unowned:
        if any(names[: len(root)] == root for root in roots):
            problems.append(
                f"{_paths.path_str(names)} sits among per-parameter state but names no "
                "parameter of `params`"
            )
    if not owned and any(np.ndim(leaf) > 0 for _, leaf in unowned):
        example = next(iter(shapes), "")
        problems.append(
            "none of its leaves belongs to a parameter (no leaf path ends with a "
            f"parameter path such as {example!r})"
        )
    return problems


def _raise_mismatch(problems: list[str], spec: str) -> NoReturn:
    listed = "\n".join(f"  {p}" for p in problems[:_MAX_LISTED])
    if len(problems) > _MAX_LISTED:
        listed += f"\n  and {len(problems) - _MAX_LISTED} more"
    raise ValueError(
        f"opt_state does not belong to these params under freeze spec {spec!r}:\n"
        f"{listed}\nPass the state of the optimizer that trains these params with this "
        "spec, e.g. `layerfreeze.freeze(optimizer, spec).init(params)`."
    )


def _is_array_like(leaf: Any) -> bool:
    if isinstance(leaf, bool | int | float | complex):
        return True
    return hasattr(leaf, "shape") and hasattr(leaf, "dtype")


def _derived_shape(shape: tuple[int, ...], param: tuple[int, ...]) -> bool:
    """Whether an optimizer keeps state of `shape` for a parameter of shape `param`.

    The parameter's own shape (Adam's moments), a scalar or size-1 stand-in
    (per-parameter counts, Adafactor's unfactored rows), the shape with some
    dimensions dropped (Adafactor's factored moments) or with leading ones added
    (L-BFGS's memory).
    """
    if shape in (param, (), (1,)):
        return True
    if len(shape) > len(param):
        return shape[len(shape) - len(param) :] == param
    dims = iter(param)
    return all(any(d == p for p in dims) for d in shape)


def _branch(prefix: tuple[str, ...]) -> str | None:
    """The `partition` branch (`trainable` or `frozen`) a state path runs through."""
    for i, name in enumerate(prefix[:-1]):
        if name == _upstream.PARTITION_STATES and prefix[i + 1] in (_spec.TRAINABLE, _spec.FROZEN):
            return prefix[i + 1]
    return None


def _group_of(
    paths: Sequence[str], groups: Sequence[str] | None, depths: Mapping[str, int]
) -> dict[str, str | tuple[str, ...]]:
    """Maps each leaf path to its row: its top-level key, or the first group covering it.

    A stacked leaf that block-selector groups (`Transformer/encoderblock[3]`)
    cover maps to one group per block.
    """
    if groups is None:
        return {p: p.split("/", 1)[0] for p in paths}
    rules = [(g, _spec.Rule(g)) for g in groups]
    found: dict[str, str | tuple[str, ...]] = {}
    used: set[str] = set()
    for path in paths:
        if any(r.kind == "block" and r.matches(path) for _, r in rules):
            depth = depths[path]
            owners = []
            for row in range(depth):
                owner = next(
                    (
                        g
                        for g, r in rules
                        if r.matches(path) and (r.kind != "block" or row in r.blocks(depth))
                    ),
                    None,
                )
                if owner is None:
                    raise ValueError(
                        f"Block {row} of {path!r} is in none of the groups {list(groups)}; "
                        "give groups that cover every parameter (a model's ordered layer "
                        "groups)."
                    )
                owners.append(owner)
            used.update(owners)
            found[path] = owners[0] if len(set(owners)) == 1 else tuple(owners)
            continue
        group = next((g for g in groups if path == g or path.startswith(g.rstrip("/") + "/")), None)
        if group is None:
            raise ValueError(
                f"Parameter {path!r} is in none of the groups {list(groups)}; give groups that "
                "cover every parameter (a model's ordered layer groups)."
            )
        found[path] = group
        used.add(group)
    empty = [g for g in groups if g not in used]
    if empty:
        raise ValueError(
            f"Groups {empty} cover no parameter; parameters: {', '.join(paths[:8])} ..."
        )
    return found


def _size(leaf: Any) -> tuple[int, int]:
    shape = getattr(leaf, "shape", ())
    dtype = getattr(leaf, "dtype", None)
    size = int(np.prod(shape, dtype=np.int64))
    itemsize = np.dtype(dtype).itemsize if dtype is not None else np.asarray(leaf).itemsize
    return size, size * itemsize


def _human(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
