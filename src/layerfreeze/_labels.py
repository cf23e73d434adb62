"""Label and mask pytrees for `optax.partition`, `optax.masked` and friends."""

from collections.abc import Callable, Sequence
from typing import Any

import jax

from layerfreeze import _nnx, _paths, _plan, _spec

__all__ = [
    "check_same_structure",
    "freeze_labels",
    "frozen_mask",
    "label_fn",
    "trainable_since",
]


def frozen_mask(params: Any, spec: _spec.SpecLike | _plan.Plan) -> Any:
    """Returns a pytree of bools shaped like `params`: True = frozen.

    The result has the container types of `params` (dict, `FrozenDict`,
    `nnx.State`, ...), so it can be handed to `optax.masked` or `optax.freeze`.

    >>> frozen_mask({"stem": {"w": 1.0}, "head": {"w": 1.0}}, "stem")
    {'head': {'w': False}, 'stem': {'w': True}}

    An NNX model stands for its parameters, `nnx.state(model, nnx.Param)`.
    """
    params = _nnx.as_params(params)
    return _plan.plan(params, spec).leaf_mask(
        params, why="a per-leaf mask or optax label cannot express that"
    )


def freeze_labels(params: Any, spec: _spec.SpecLike | _plan.Plan) -> Any:
    """Returns a pytree of labels shaped like `params`: `"frozen"` or `"trainable"`.

    The result has the container types of `params` and can serve as the
    `param_labels` of `optax.partition`.

    >>> freeze_labels({"stem": {"w": 1.0}, "head": {"w": 1.0}}, "all-but:head")
    {'head': {'w': 'trainable'}, 'stem': {'w': 'frozen'}}
    """
    mask = frozen_mask(params, spec)
    return jax.tree.map(lambda f: _spec.FROZEN if f else _spec.TRAINABLE, mask)


def label_fn(spec: _spec.SpecLike) -> Callable[[Any], Any]:
    """Returns `params -> freeze_labels(params, spec)`, for `optax.partition`.

    >>> import optax
    >>> tx = optax.partition(
    ...     {"frozen": optax.set_to_zero(), "trainable": optax.sgd(0.1)},
    ...     label_fn("stem"))
    """
    spec = _spec.as_spec(spec)
    return lambda params: freeze_labels(params, spec)


def trainable_since(
    params: Any, spec: _spec.SpecLike, previous: Sequence[_spec.SpecLike] = ()
) -> dict[str, int | None]:
    """Maps each leaf path to the phase since which the leaf has trained.

    `previous` holds the freeze specs of the earlier phases, oldest first, and
    `spec` the current one. A trainable leaf's answer is the index in
    `(*previous, spec)` where its last unbroken run of trainable phases
    begins: 0 if it has trained in every phase given. Frozen leaves map to
    None. A stacked leaf whose blocks differ gets one answer per block (a
    tuple). Leaves with the same answer form a *cohort*: under
    `layerfreeze.freeze(..., previous=previous)` each cohort counts its own
    optimizer steps (Adam's bias correction).

    >>> params = {"stem": {"w": 0.0}, "stage1": {"w": 0.0}, "head": {"w": 0.0}}
    >>> trainable_since(params, "none", previous=["stem,stage1", "stem"])
    {'head/w': 0, 'stage1/w': 1, 'stem/w': 2}
    >>> trainable_since(params, "stem", previous=["none"])
    {'head/w': 0, 'stage1/w': 0, 'stem/w': None}
    """
    return _plan.plan(params, spec, previous=previous).since()


def check_same_structure(labels: Any, params: Any, *, what: str = "labels") -> None:
    """Raises a clear error if `labels` is not shaped like `params`."""
    lt, pt = jax.tree.structure(labels), jax.tree.structure(params)
    if lt == pt:
        return
    detail = _paths.path_differences(
        _paths.leaf_paths(params), _paths.leaf_paths(labels), missing_from=what, extra_in="params"
    )
    if not detail:
        detail.append(f"same paths, different containers: {what} {lt} vs params {pt}")
    raise ValueError(
        f"The {what} do not have the structure of the params ({'; '.join(detail)}). "
        f"Build {what} from the same params pytree, e.g. layerfreeze.freeze_labels(params, spec)."
    )
