"""`freeze(optimizer, spec)`: an optax optimizer that never moves frozen leaves."""

from collections.abc import Callable
from typing import Any, Literal

import jax
import numpy as np
import optax

from layerfreeze import _labels, _spec

__all__ = ["METHODS", "Method", "freeze", "check_method"]

Method = Literal["zero", "lr0"]
METHODS: tuple[str, ...] = ("zero", "lr0")


def check_method(method: str) -> None:
    """Raises a ValueError naming the valid methods if `method` is not one."""
    if method not in METHODS:
        raise ValueError(f"Unknown freeze method {method!r}; valid methods: {', '.join(METHODS)}.")


def freeze(
    optimizer: optax.GradientTransformation,
    spec: _spec.SpecLike = None,
    *,
    method: Method = "zero",
    labels: Any = None,
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

    Args:
      optimizer: any optax gradient transformation (a chain, `MultiSteps`, ...).
      spec: what to freeze; anything `layerfreeze.FreezeSpec` accepts, e.g.
        `"stem,stage1"`. Resolved against the params at `init` and the updates
        at `update`, so a rule that matches nothing fails at `init`.
      method: `"zero"` or `"lr0"`.
      labels: instead of `spec`, a ready pytree shaped like the params whose
        leaves are `"frozen"`/`"trainable"` or bools (True = frozen), e.g. a
        mask from elsewhere. Its structure is checked against the params at
        `init` and the updates at `update`.

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    >>> import jax.numpy as jnp, optax
    >>> params = {"stem": {"w": jnp.ones(2)}, "head": {"w": jnp.ones(2)}}
    >>> tx = freeze(optax.adamw(0.1, weight_decay=0.1), "stem")
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> updates["stem"]["w"]
    Array([0., 0.], dtype=float32)
    """
    check_method(method)
    if labels is not None:
        if spec is not None:
            raise ValueError("Pass either a freeze spec or `labels`, not both.")
        label_fn = _fixed_labels(labels)
    else:
        label_fn = _labels.label_fn(_spec.as_spec(spec))
    # Both branches wrap `optimizer` at the same position, so a leaf's state
    # has the same path inside either branch; unfreezing moves it across.
    trainable_tx = optax.chain(optimizer, optax.identity())
    if method == "zero":
        frozen_tx = optax.set_to_zero()
    else:
        frozen_tx = optax.chain(optimizer, optax.set_to_zero())
    return optax.partition(
        {_spec.TRAINABLE: trainable_tx, _spec.FROZEN: frozen_tx},
        label_fn,
    )


def _fixed_labels(labels: Any) -> Callable[[Any], Any]:
    def as_label(leaf: Any) -> str:
        if isinstance(leaf, bool | np.bool_):
            return _spec.FROZEN if leaf else _spec.TRAINABLE
        if leaf in (_spec.FROZEN, _spec.TRAINABLE):
            return leaf
        raise ValueError(
            f"Label {leaf!r} is not valid; labels are 'frozen', 'trainable', or bools "
            "(True = frozen)."
        )

    normalised = jax.tree.map(as_label, labels)

    def label_fn(params: Any) -> Any:
        _labels.check_same_structure(normalised, params)
        return normalised

    return label_fn
