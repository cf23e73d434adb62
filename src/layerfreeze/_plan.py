"""`plan(params, spec)`: a freeze spec resolved once, against one params structure.

Everything that freezes reads a `Plan`: `freeze` (which leaves get
`set_to_zero`, each leaf's cohort), `value_and_grad` (which leaves and which
blocks of stacked leaves are differentiated), the BatchNorm policy (which
groups are wholly frozen), `summary`, the train steps and `Phases`. Each of
them takes a `Plan` where it takes a spec, and resolves a spec it is given
into one through `plan`, which returns the same object for the same params
structure, spec, history and method, and resolves each spec once per params
structure: a phase's spec is resolved once, however many pieces read it.

A plan holds no arrays: only paths, shapes and Python bools, so it is static
under `jit`.
"""

import collections
import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from layerfreeze import _blocks, _checks, _paths, _spec

__all__ = ["Plan", "check_previous", "from_labels", "plan", "since_from_history"]

# Per leaf, in one phase: frozen or not, or one bool per block of a stacked leaf.
History = tuple[tuple[_spec.FrozenBlocks, ...], ...]

# Plans and resolutions hold no arrays (paths, shapes, bools): cheap to keep.
_CACHE_SIZE = 256
_plans: collections.OrderedDict[Any, "Plan"] = collections.OrderedDict()
_resolutions: collections.OrderedDict[Any, tuple[Any, ...]] = collections.OrderedDict()


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """What one phase freezes, resolved against one params structure.

    Build it with `layerfreeze.plan`. Attributes:
      spec: the phase's freeze spec (None for a plan built from label pytrees).
      previous: the earlier phases' specs, oldest first.
      method: `"zero"` or `"lr0"`.
      paths: each leaf's `/`-joined path, in `jax.tree.leaves` order.
      shapes: each leaf's shape.
      frozen: per leaf, True (frozen), False (trainable), or one bool per block
        for a stacked leaf that block selectors freeze in part.
      history: `frozen` for each phase of `(*previous, spec)`, oldest first.
    """

    spec: _spec.FreezeSpec | None
    previous: tuple[Any, ...]
    method: str
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    frozen: tuple[_spec.FrozenBlocks, ...]
    history: History
    treedef: Any = dataclasses.field(repr=False)

    # The per-leaf answers -------------------------------------------------

    @functools.cached_property
    def resolved(self) -> dict[str, bool]:
        """Path -> frozen, a leaf frozen in some blocks only counting as trainable."""
        return {p: f is True for p, f in zip(self.paths, self.frozen, strict=True)}

    @functools.cached_property
    def trainable_params(self) -> int:
        """How many parameters train (blocks of stacked leaves counted one by one)."""
        total = 0
        for shape, frozen in zip(self.shapes, self.frozen, strict=True):
            size = math.prod(shape)
            if isinstance(frozen, tuple):
                total += size // len(frozen) * frozen.count(False)
            elif not frozen:
                total += size
        return total

    @functools.cached_property
    def frozen_bn_groups(self) -> frozenset[str]:
        """Top-level groups whose BatchNorm layers run on running statistics.

        A group's BatchNorm is frozen when every parameter of the group is
        frozen; with `train_bn=True`, none is (fastai semantics).
        """
        if self.spec is not None and self.spec.train_bn:
            return frozenset()
        all_frozen: dict[str, bool] = {}
        for path, frozen in self.resolved.items():
            group = path.split("/", 1)[0]
            all_frozen[group] = all_frozen.get(group, True) and frozen
        return frozenset(g for g, f in all_frozen.items() if f)

    def since(self) -> dict[str, int | tuple[int | None, ...] | None]:
        """Per leaf path, the phase since which it has trained (see `trainable_since`)."""
        out: dict[str, Any] = {}
        for n, path in enumerate(self.paths):
            column = [phase[n] for phase in self.history]
            depths = {len(c) for c in column if isinstance(c, tuple)}
            if not depths:
                out[path] = since_from_history([[c] for c in column])[0]
                continue
            (depth,) = depths
            per_phase = [c if isinstance(c, tuple) else (c,) * depth for c in column]
            since = tuple(since_from_history(per_phase))
            out[path] = since[0] if len(set(since)) == 1 else since
        return out

    def leaf_mask(self, params: Any, *, why: str) -> Any:
        """`params`-shaped bools (True = frozen); refuses stacked leaves frozen in part.

        Args:
          params: the tree whose containers the mask takes.
          why: why whole leaves are needed, for the error message.
        """
        self.check(params)
        partly = [p for p, f in zip(self.paths, self.frozen, strict=True) if isinstance(f, tuple)]
        if partly:
            raise ValueError(
                f"The spec freezes some blocks of the stacked leaves {partly[:3]}"
                f"{' ...' if len(partly) > 3 else ''} and not others; {why}. Use "
                "layerfreeze.freeze(optimizer, spec) "
                "(it splits stacked leaves by block) with layerfreeze.value_and_grad or "
                "layerfreeze.train.make_steps, or FreezeSpec.resolve_blocks for the "
                "per-block answer."
            )
        return jax.tree.unflatten(self.treedef, list(self.frozen))

    # Block views ----------------------------------------------------------

    @functools.cached_property
    def grad_view(self) -> tuple[tuple[Any, ...], tuple[bool, ...]]:
        """How a gradient splits stacked leaves: `(bounds, frozen)`.

        `bounds[i]` holds the block ranges of leaf `i` where its frozen state
        changes (None: kept whole); `frozen` has one bool per leaf of the
        resulting block view (`_blocks.split`).
        """
        bounds: list[Any] = []
        flags: list[bool] = []
        for state in self.frozen:
            if isinstance(state, bool):
                bounds.append(None)
                flags.append(state)
                continue
            parts = _blocks.runs(state)
            bounds.append(tuple((a, b) for a, b, _ in parts))
            flags.extend(f for _, _, f in parts)
        return tuple(bounds), tuple(flags)

    @functools.cached_property
    def grad_mask(self) -> Any:
        """The frozen mask (True = frozen) of the params' block view by `grad_view`."""
        bounds, flags = self.grad_view
        # Placeholders as long as each split stack, to build the view's structure.
        holders = [
            0 if b is None else np.zeros(shape[0])
            for b, shape in zip(bounds, self.shapes, strict=True)
        ]
        view = _blocks.split(jax.tree.unflatten(self.treedef, holders), bounds)
        flat = iter(flags)
        return jax.tree.map(lambda _: next(flat), view)

    @functools.cached_property
    def segments(self) -> _blocks.Segments:
        """For `_blocks.segments_context`: each split stacked leaf's `(start, stop, frozen)`."""
        bounds, flags = self.grad_view
        it = iter(flags)
        out = {}
        for path, b in zip(self.paths, bounds, strict=True):
            if b is None:
                next(it)
                continue
            out[path] = tuple((a, z, bool(next(it))) for a, z in b)
        return out

    @functools.cached_property
    def opt_view(self) -> tuple[tuple[Any, ...], tuple[bool, ...], tuple[int | None, ...]]:
        """How `freeze` splits stacked leaves: `(bounds, frozen, since)`.

        A stacked leaf splits where its blocks differ in frozen state or in
        cohort; `frozen` and `since` have one entry per leaf of the block view.
        Under method `lr0` every leaf is in one cohort (frozen leaves ran the
        optimizer too).
        """
        history = self.history[-1:] if self.method == "lr0" else self.history
        bounds: list[Any] = []
        frozen: list[bool] = []
        since: list[int | None] = []
        for n, shape in enumerate(self.shapes):
            column = [phase[n] for phase in history]
            if all(isinstance(c, bool) for c in column):
                bounds.append(None)
                frozen.append(column[-1])
                since.extend(since_from_history([[c] for c in column]))
                continue
            depth = shape[0]
            per_phase = [c if isinstance(c, tuple) else (c,) * depth for c in column]
            per_block = since_from_history(per_phase)
            parts = _blocks.runs([(per_phase[-1][r], per_block[r]) for r in range(depth)])
            bounds.append(tuple((a, b) for a, b, _ in parts) if len(parts) > 1 else None)
            for _, _, (is_frozen, s) in parts:
                frozen.append(is_frozen)
                since.append(s)
        return tuple(bounds), tuple(frozen), tuple(since)

    # Checks ---------------------------------------------------------------

    def fits(self, tree: Any) -> bool:
        """Whether `tree` has this plan's structure and leaf shapes."""
        return _structure_key(tree) == (self.treedef, self.shapes)

    def check(self, tree: Any, what: str = "params") -> None:
        """Raises a ValueError naming the difference unless `tree` fits this plan."""
        if self.fits(tree):
            return
        paths = _paths.leaf_paths(tree)
        detail = _paths.path_differences(
            self.paths, paths, missing_from=f"the {what}", extra_in="the plan"
        )
        if not detail:
            shapes = dict(
                zip(paths, (tuple(_shape(x)) for x in jax.tree.leaves(tree)), strict=True)
            )
            changed = [
                f"{p} {shapes.get(p)} (plan: {o})"
                for p, o in zip(self.paths, self.shapes, strict=True)
                if shapes.get(p) != o
            ][:5]
            detail.append(f"other shapes: {changed}" if changed else "other containers")
        raise ValueError(
            f"The {what} do not fit this freeze plan ({'; '.join(detail)}). A plan is "
            "resolved against one params structure: build it from these params, "
            "layerfreeze.plan(params, spec)."
        )


def plan(
    params: Any,
    spec: _spec.SpecLike | Plan = None,
    *,
    previous: Sequence[_spec.SpecLike] = (),
    method: str = "zero",
) -> Plan:
    """Resolves a freeze spec against `params` once: the `Plan` a phase's pieces share.

    The same params structure (leaf paths, shapes and containers), spec,
    `previous` and method give the same `Plan` object, so building a phase's
    optimizer, gradient and steps from one spec resolves it once.

    Args:
      params: the parameters, their shapes (`jax.eval_shape`), or an NNX model
        (its `nnx.Param`s).
      spec: what is frozen; anything `layerfreeze.as_spec` accepts. A `Plan`
        is checked against `params` and returned as is.
      previous: the earlier phases' specs, oldest first (they decide each
        trainable leaf's cohort; see `layerfreeze.trainable_since`).
      method: `"zero"` or `"lr0"`.

    Returns:
      The `Plan`.

    Raises:
      ValueError: a rule matches nothing, a strict spec leaves a leaf
        uncovered, a block selector does not fit its stack, a given
        `Plan` was resolved against other params, or an unknown method.
      TypeError: `params` is plainly no parameter pytree (None, a string, a
        model, an optimizer) or `spec` is no spec.

    >>> import jax.numpy as jnp
    >>> params = {"stem": {"w": jnp.ones((3, 4))}, "head": {"w": jnp.ones(4)}}
    >>> p = plan(params, "stem")
    >>> p.resolved, p.trainable_params, sorted(p.frozen_bn_groups)
    ({'head/w': False, 'stem/w': True}, 4, ['stem'])
    >>> plan(params, "stem") is p
    True
    """
    from layerfreeze import _freeze, _nnx  # both build on plans

    params = _checks.params(_nnx.as_params(params))
    if isinstance(spec, Plan):
        spec.check(params)
        return spec
    _freeze.check_method(method)
    spec = _spec.as_spec(spec)
    previous = tuple(_spec.as_spec(s) for s in check_previous(previous))
    treedef, shapes = _structure_key(params)
    key = (treedef, shapes, spec, previous, method)
    if key not in _plans:
        history = tuple(_resolve(s, params, (treedef, shapes)) for s in (*previous, spec))
        paths = tuple(_paths.leaf_paths(params))
        _remember(
            _plans, key, Plan(spec, previous, method, paths, shapes, history[-1], history, treedef)
        )
    _plans.move_to_end(key)
    return _plans[key]


def from_labels(tree: Any, history: Sequence[Callable[[Any], list[bool]]], *, method: str) -> Plan:
    """A plan from fixed label pytrees (no spec), for `freeze(..., labels=...)`.

    Args:
      tree: the params (or updates) the labels describe.
      history: per phase, oldest first, a function giving each leaf's frozen bool.
      method: `"zero"` or `"lr0"`.
    """
    treedef, shapes = _structure_key(tree)
    rows = tuple(tuple(frozen(tree)) for frozen in history)
    return Plan(None, (), method, tuple(_paths.leaf_paths(tree)), shapes, rows[-1], rows, treedef)


def _resolve(spec: _spec.FreezeSpec, params: Any, structure: Any) -> tuple[_spec.FrozenBlocks, ...]:
    """`spec.resolve_blocks(params)`, once per spec and params structure."""
    key = (*structure, spec)
    if key not in _resolutions:
        _remember(_resolutions, key, tuple(spec.resolve_blocks(params).values()))
    _resolutions.move_to_end(key)
    return _resolutions[key]


def _remember(cache: collections.OrderedDict, key: Any, value: Any) -> None:
    cache[key] = value
    if len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)


def _structure_key(tree: Any) -> tuple[Any, tuple[tuple[int, ...], ...]]:
    return jax.tree.structure(tree), tuple(tuple(_shape(x)) for x in jax.tree.leaves(tree))


def _shape(x: Any) -> tuple[int, ...]:
    shape = getattr(x, "shape", None)
    return tuple(np.shape(x) if shape is None else shape)


def check_previous(previous: Any) -> tuple[Any, ...]:
    """Returns `previous` as a tuple, or raises a TypeError if it is no sequence of specs."""
    if isinstance(previous, str | bytes | Mapping) or not isinstance(previous, Sequence):
        raise TypeError(
            "previous must be a sequence of the earlier phases' freeze specs, oldest first "
            f"(e.g. ['all-but:head', 'all-but:head,stage4']); got {type(previous).__name__}: "
            f"{previous!r}."
        )
    return tuple(previous)


def since_from_history(frozen_rows: Sequence[Sequence[bool]]) -> list[int | None]:
    """Per leaf, where its trailing run of trainable phases begins (None: frozen now).

    Args:
      frozen_rows: one row per phase, oldest first; each row holds one bool per
        leaf (True = frozen). The last row is the current phase.
    """
    since: list[int | None] = []
    for column in zip(*frozen_rows, strict=True):
        if column[-1]:
            since.append(None)
            continue
        start = len(column) - 1
        while start > 0 and not column[start - 1]:
            start -= 1
        since.append(start)
    return since
