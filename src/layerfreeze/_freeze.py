"""`freeze(optimizer, spec)`: an optax optimizer that never moves frozen leaves."""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import numpy as np
import optax

from layerfreeze import _blocks, _labels, _paths, _plan, _spec, _upstream

__all__ = ["METHODS", "CohortsState", "Method", "check_method", "freeze"]

Method = Literal["zero", "lr0"]
METHODS: tuple[str, ...] = ("zero", "lr0")


class CohortsState(NamedTuple):
    """The state of `freeze`'s trainable branch.

    Attributes:
      inner_state: the optimizer's state. Its bias-correction counts (Adam's
        `count`) are those of the base cohort: the leaves that have trained
        since the first phase given to `freeze`.
      counts: for each later cohort, named `since_<i>` after the phase where
        it became trainable, the bias-correction counts of `inner_state` (in
        the order they appear there) as that cohort has seen them.
    """

    inner_state: Any
    counts: dict[str, tuple[Any, ...]]


def check_method(method: str) -> None:
    """Raises a ValueError naming the valid methods if `method` is not one."""
    if method not in METHODS:
        raise ValueError(f"Unknown freeze method {method!r}; valid methods: {', '.join(METHODS)}.")


def freeze(
    optimizer: optax.GradientTransformation,
    spec: _spec.SpecLike | _plan.Plan = None,
    *,
    method: Method | None = None,
    labels: Any = None,
    previous: Sequence[Any] = (),
) -> optax.GradientTransformationExtraArgs:
    """Wraps `optimizer` so that the leaves frozen by `spec` never change.

    Built on `optax.partition` with the labels of `layerfreeze.freeze_labels`:

    * `method="zero"` (default): frozen leaves go to `optax.set_to_zero()`. They
      hold no optimizer state, get no update and no weight decay, and whatever
      `optimizer` chains (`clip_by_global_norm`, `optax.MultiSteps`
      accumulation, schedules) sees the trainable leaves only. A train step that
      differentiates only the trainable leaves (`layerfreeze.train`) pays
      nothing for frozen ones.
    * `method="lr0"`: every leaf runs `optimizer` (frozen ones in a separate
      copy whose updates are set to zero, i.e. a learning rate of 0), so frozen
      leaves keep warm optimizer state (Adam moments, step counts) and a later
      unfreeze continues from it. The cost: optimizer state for every leaf
      (2x params bytes for Adam) and the frozen gradients must be computed,
      so the backward pass costs as much as training everything.

    In both methods frozen leaves stay bit-identical, and clipping norms and
    accumulators of the trainable branch see trainable leaves only.

    What a leaf gets when it is unfrozen (a new phase built with `previous`,
    its state carried by `layerfreeze.transfer_opt_state`):

    * `zero`: exactly what a freshly initialised `optimizer` would give it:
      zero moments and its own bias-correction step count, starting at 0. The
      leaves unfrozen at phase `i` form a cohort that counts its own steps;
      schedules (`optax.scale_by_schedule`, `optax.inject_hyperparams`, a
      schedule as learning rate) keep the global step, leaves that stayed
      trainable continue unchanged, and a global-norm clip still takes one
      norm over all trainable leaves. Without `previous`, every trainable leaf
      shares the global count, so Adam's bias correction of a newly unfrozen
      leaf is already spent and its first updates are several times too large.
    * `lr0`: the leaf continues with the moments and the global step count it
      kept while frozen (it ran the optimizer at every step), as if it had
      been trainable all along. `previous` changes nothing.

    Each extra cohort runs `optimizer` once more on the same gradients; only
    its own leaves' results are kept, and XLA drops the rest, so a jitted step
    costs about what it cost with one cohort.

    Args:
      optimizer: any optax gradient transformation (a chain, `MultiSteps`, ...).
      spec: what to freeze; anything `layerfreeze.FreezeSpec` accepts, e.g.
        `"stem,stage1"`, resolved into a `layerfreeze.plan` of the params at
        `init` (so a rule that matches nothing fails there) and reused for
        updates of the same structure; or a ready `layerfreeze.Plan`, which
        carries `previous` and the method itself.
      method: `"zero"` (the default) or `"lr0"`; with a `Plan`, the plan's.
      labels: instead of `spec`, a ready pytree shaped like the params whose
        leaves are `"frozen"`/`"trainable"` or bools (True = frozen), e.g. a
        mask from elsewhere. Its structure is checked against the params at
        `init` and the updates at `update`.
      previous: the freeze specs of the earlier phases, oldest first (label
        pytrees like `labels` when `labels` is given); for a schedule,
        `FreezeSchedule.previous_specs(i)`. Under `zero` it decides each
        trainable leaf's cohort (see `layerfreeze.trainable_since`); under
        `lr0` it is checked and otherwise ignored.

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    Raises:
      TypeError: `optimizer` is not an optax transformation, or `previous` is
        not a sequence.

    >>> import jax.numpy as jnp, optax
    >>> params = {"stem": {"w": jnp.ones(2)}, "head": {"w": jnp.ones(2)}}
    >>> tx = freeze(optax.adamw(0.1, weight_decay=0.1), "stem")
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> updates["stem"]["w"]
    Array([0., 0.], dtype=float32)

    Unfreezing the stem after a phase with it frozen: its first update is
    the one a fresh `optax.adam` gives.

    >>> import layerfreeze
    >>> tx = freeze(optax.adam(0.1), "stem")
    >>> state = tx.update(params, tx.init(params), params)[1]
    >>> tx = freeze(optax.adam(0.1), "none", previous=["stem"])
    >>> state = layerfreeze.transfer_opt_state(state, tx.init(params))
    >>> updates, state = tx.update(params, state, params)
    >>> fresh = optax.adam(0.1)
    >>> fresh_updates = fresh.update(params, fresh.init(params), params)[0]
    >>> bool(jnp.all(updates["stem"]["w"] == fresh_updates["stem"]["w"]))
    True
    """
    _check_optimizer(optimizer)
    plan_of, method = _planner(spec, method, labels, previous)

    def build(tree: Any) -> tuple[optax.GradientTransformationExtraArgs, tuple[Any, ...]]:
        bounds, frozen_now, since = plan_of(tree).opt_view
        view = _blocks.split(tree, bounds)
        paths = _paths.leaf_paths(view)
        cohort_of = {p: s for p, s in zip(paths, since, strict=True) if s}
        flat = iter(_spec.FROZEN if f else _spec.TRAINABLE for f in frozen_now)
        labels_tree = jax.tree.map(lambda _: next(flat), view)
        # Both branches wrap `optimizer` at the same position, so a leaf's
        # state has the same path inside either branch; unfreezing moves it.
        trainable_tx = optax.chain(_cohorts(optimizer, cohort_of), optax.identity())
        if method == "zero":
            frozen_tx = optax.set_to_zero()
        else:
            frozen_tx = optax.chain(_cohorts(optimizer, {}), optax.set_to_zero())
        tx = optax.partition({_spec.TRAINABLE: trainable_tx, _spec.FROZEN: frozen_tx}, labels_tree)
        return tx, bounds

    def init_fn(params: Any) -> Any:
        tx, bounds = build(params)
        return tx.init(_blocks.split(params, bounds))

    def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> Any:
        tx, bounds = build(updates)
        if params is not None:
            params = _blocks.split(params, bounds)
        new_updates, state = tx.update(_blocks.split(updates, bounds), state, params, **extra_args)
        return _blocks.join(new_updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_optimizer(optimizer: Any) -> None:
    if callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None)):
        return
    hint = ""
    if callable(optimizer):
        hint = " It is callable: call it to build the optimizer, e.g. optax.adam(1e-3)."
    raise TypeError(
        "freeze needs an optax optimizer (a GradientTransformation with init and update, "
        f"e.g. optax.adam(1e-3) or optax.MultiSteps(...)); got {type(optimizer).__name__}: "
        f"{optimizer!r}.{hint}"
    )


def _planner(
    spec: Any, method: Method | None, labels: Any, previous: Sequence[Any]
) -> tuple[Callable[[Any], _plan.Plan], str]:
    """`tree -> Plan` for `freeze`'s arguments, and the method in force."""
    previous = _plan.check_previous(previous)
    if isinstance(spec, _plan.Plan):
        if labels is not None or previous:
            raise ValueError(
                "A layerfreeze.Plan carries its own history: pass `previous` to "
                "layerfreeze.plan, and no `labels` or `previous` to freeze."
            )
        if method not in (None, spec.method):
            raise ValueError(
                f"freeze(..., method={method!r}) with a plan built for method "
                f"{spec.method!r}; build the plan with layerfreeze.plan(..., method={method!r})."
            )

        def fitted(tree: Any) -> _plan.Plan:
            spec.check(tree, "updates")
            return spec

        return fitted, spec.method
    method = "zero" if method is None else method
    check_method(method)
    if labels is not None:
        if spec is not None:
            raise ValueError("Pass either a freeze spec or `labels`, not both.")
        history = [_fixed_frozen(p, "previous") for p in previous]
        history.append(_fixed_frozen(labels, "labels"))
        return lambda tree: _plan.from_labels(tree, history, method=method), method
    spec = _spec.as_spec(spec)
    specs = tuple(_spec.as_spec(s) for s in previous)
    return lambda tree: _plan.plan(tree, spec, previous=specs, method=method), method


def _fixed_frozen(labels: Any, where: str) -> Callable[[Any], list[bool]]:
    def as_label(leaf: Any) -> str:
        if isinstance(leaf, bool | np.bool_):
            return _spec.FROZEN if leaf else _spec.TRAINABLE
        if leaf in (_spec.FROZEN, _spec.TRAINABLE):
            return leaf
        raise ValueError(
            f"Label {leaf!r} is not valid (in {where}); labels are 'frozen', 'trainable', or "
            "bools (True = frozen). With `labels`, each entry of `previous` is a label "
            "pytree too."
        )

    normalised = jax.tree.map(as_label, labels)

    def frozen(tree: Any) -> list[bool]:
        _labels.check_same_structure(normalised, tree)
        return [label == _spec.FROZEN for label in jax.tree.leaves(normalised)]

    return frozen


# Cohorts ----------------------------------------------------------------------


def _cohorts(
    optimizer: optax.GradientTransformation, cohort_of: Mapping[str, int]
) -> optax.GradientTransformationExtraArgs:
    """Runs `optimizer` with one set of bias-correction counts per cohort.

    `cohort_of` maps leaf paths to their cohort (> 0); other leaves are in the
    base cohort 0, whose counts stay in the optimizer's own state. For each
    other cohort the optimizer runs again on the full trainable tree (so a
    global norm is global) with that cohort's counts; each leaf's update and
    per-parameter state come from its own cohort's run, everything else from
    the base run. The choice is static, so XLA removes what is not kept.
    """
    optimizer = optax.with_extra_args_support(optimizer)

    def leaf_cohorts(tree: Any) -> list[int]:
        return [cohort_of.get(path, 0) for path in _paths.leaf_paths(tree)]

    def init_fn(params: Any) -> CohortsState:
        inner = optimizer.init(params)
        fresh = bias_counts(inner)
        names = sorted({_cohort_name(c) for c in leaf_cohorts(params) if c})
        return CohortsState(inner_state=inner, counts={name: fresh for name in names})

    def update_fn(updates: Any, state: CohortsState, params: Any = None, **extra_args: Any):
        cohorts = leaf_cohorts(updates)
        base_updates, base_state = optimizer.update(
            updates, state.inner_state, params, **extra_args
        )
        others = sorted({c for c in cohorts if c})
        if not others:
            return base_updates, CohortsState(base_state, {})
        missing = [_cohort_name(c) for c in others if _cohort_name(c) not in state.counts]
        if missing:
            raise ValueError(
                f"The optimizer state has no step counts for cohort(s) {missing}; it holds "
                f"{sorted(state.counts)}. Build the state with this transformation's init "
                "(layerfreeze.transfer_opt_state(old_state, tx.init(params)) at a phase change)."
            )
        all_updates, all_states, counts = {0: base_updates}, {0: base_state}, {}
        for c in others:
            name = _cohort_name(c)
            inner = _replace_bias_counts(state.inner_state, state.counts[name])
            all_updates[c], all_states[c] = optimizer.update(updates, inner, params, **extra_args)
            counts[name] = bias_counts(all_states[c])
        treedef = jax.tree.structure(updates)
        new_updates = _pick(all_updates, cohorts, treedef)
        new_state = _combine(all_states, cohorts, treedef)
        # The base cohort's counts come from the base run, even where a
        # single-leaf params tree makes a count look like a parameter.
        new_state = _replace_bias_counts(new_state, bias_counts(base_state))
        return new_updates, CohortsState(new_state, counts)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _cohort_name(cohort: int) -> str:
    return f"since_{cohort}"


def _pick(trees: Mapping[int, Any], cohorts: list[int], treedef: Any) -> Any:
    """Leaf i of the result is leaf i of `trees[cohorts[i]]`."""
    leaves = {c: treedef.flatten_up_to(t) for c, t in trees.items()}
    return treedef.unflatten([leaves[c][i] for i, c in enumerate(cohorts)])


def _combine(states: Mapping[int, Any], cohorts: list[int], treedef: Any) -> Any:
    """Per-parameter subtrees leaf by leaf from each cohort's state, the rest from the base."""
    base = states[0]
    if jax.tree.structure(base) == treedef:
        return _pick(states, cohorts, treedef)
    if _is_namedtuple(base):
        parts = [
            _combine({c: s[i] for c, s in states.items()}, cohorts, treedef)
            for i in range(len(base))
        ]
        return type(base)(*parts)
    if isinstance(base, tuple | list):
        parts = [
            _combine({c: s[i] for c, s in states.items()}, cohorts, treedef)
            for i in range(len(base))
        ]
        return type(base)(parts)
    if isinstance(base, dict):
        return _dict_map(
            base, lambda k, _: _combine({c: s[k] for c, s in states.items()}, cohorts, treedef)
        )
    return base


def bias_counts(state: Any) -> tuple[Any, ...]:
    """The bias-correction counts of an optimizer state, in walking order."""
    found: list[Any] = []

    def record(count: Any) -> Any:
        found.append(count)
        return count

    _map_bias_counts(state, record)
    return tuple(found)


def _replace_bias_counts(state: Any, counts: Sequence[Any]) -> Any:
    wanted = len(bias_counts(state))
    if len(counts) != wanted:
        raise ValueError(
            f"A cohort has {len(counts)} step count(s) but the optimizer state holds "
            f"{wanted}; the state was built for a different optimizer."
        )
    replacements = iter(counts)
    return _map_bias_counts(state, lambda _: next(replacements))


def _map_bias_counts(node: Any, fn: Callable[[Any], Any]) -> Any:
    """Applies `fn` to every NamedTuple field `count` that is a bias-correction count.

    A `count` of a schedule-position state (`_upstream.GLOBAL_COUNT_STATES`) is the
    global step and is left alone; the walk still enters the state's other
    fields (`inject_hyperparams` wraps the optimizer's own state).
    """
    if _is_namedtuple(node):
        is_global = type(node).__name__ in _upstream.GLOBAL_COUNT_STATES
        parts = [
            fn(value) if name == "count" and not is_global else _map_bias_counts(value, fn)
            for name, value in zip(node._fields, node, strict=True)
        ]
        return type(node)(*parts)
    if isinstance(node, tuple | list):
        return type(node)(_map_bias_counts(v, fn) for v in node)
    if isinstance(node, dict):
        return _dict_map(node, lambda _, v: _map_bias_counts(v, fn))
    return node


def _dict_map(node: dict, fn: Callable[[Any, Any], Any]) -> dict:
    # A copy keeps the dict's own type (OrderedDict, ...): a pytree's type is
    # part of its structure.
    new = node.copy()
    for key, value in node.items():
        new[key] = fn(key, value)
    return new


def _is_namedtuple(node: Any) -> bool:
    return isinstance(node, tuple) and hasattr(node, "_fields")
