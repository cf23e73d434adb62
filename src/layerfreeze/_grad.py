"""Gradients of the trainable parameters only, for any loss.

`jax.value_and_grad` over the whole params, followed by an optimizer that
discards the frozen gradients, leaves XLA to prune the frozen backward pass,
and it cannot once anything consumes the full gradient: a global-norm clip, a
gradient-norm metric, an accumulator, or returning the gradients from `jit`.
`value_and_grad` here differentiates the trainable leaves alone and puts
constant zeros in the frozen places, so the frozen backward work never
exists, whatever is done with the result.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from layerfreeze import _blocks, _checks, _plan, _spec

__all__ = ["grad", "merge", "split", "value_and_grad", "value_and_grads"]


def split(params: Any, mask: Any) -> tuple[Any, Any]:
    """Splits `params` by a frozen mask into (trainable, frozen); the other side holds None."""
    trainable = jax.tree.map(lambda f, p: None if f else p, mask, params)
    frozen = jax.tree.map(lambda f, p: p if f else None, mask, params)
    return trainable, frozen


def merge(mask: Any, trainable: Any, frozen: Any) -> Any:
    """Inverse of `split`."""
    return jax.tree.map(lambda f, t, z: z if f else t, mask, trainable, frozen)


def fill_frozen(mask: Any, params: Any, trainable_grads: Any) -> Any:
    """Full-structure gradients: `trainable_grads` where trainable, constant zeros where frozen."""
    return jax.tree.map(
        lambda f, p, g: jnp.zeros_like(p) if f else g, mask, params, trainable_grads
    )


def check_scalar(loss: Any, what: str = "The loss function") -> None:
    """Raises a clear error unless `loss` is a real scalar."""
    shape = jnp.shape(loss)
    dtype = jnp.result_type(loss)
    if shape != () or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{what} must return a float scalar (or `(scalar, aux)` with has_aux=True); "
            f"got shape {shape} and dtype {dtype}. Reduce it, e.g. with `.mean()`."
        )


def value_and_grad(
    fun: Callable[..., Any],
    spec: _spec.SpecLike,
    *,
    has_aux: bool = False,
) -> Callable[..., tuple[Any, Any]]:
    """Like `jax.value_and_grad` over a params pytree, differentiating only what trains.

    `fun(params, *args, **kwargs)` returns a float scalar (or `(scalar, aux)`
    with `has_aux=True`). The returned function gives `(value, grads)` where
    `grads` has the structure and container types of `params` (dict,
    `FrozenDict`, `nnx.State`): the trainable leaves' gradients, and constant
    zeros for the leaves `spec` freezes (for the frozen blocks of a stacked
    leaf that block selectors freeze in part; while `fun` runs,
    `layerfreeze.scan_segments` tells a scanned model where to split its
    scan). The frozen zeros are constants, so
    XLA never computes frozen gradients, even when the step clips by the
    global norm, reports it, accumulates, or returns the gradients.

    The spec is resolved into a `layerfreeze.plan` of the structure of
    `params` (once per structure, outside of any traced value), so a rule that
    matches nothing fails on the first call; a ready `Plan` is checked against
    `params` instead.

    Args:
      fun: the loss; differentiated with respect to its first argument.
      spec: what is frozen; anything `layerfreeze.as_spec` accepts, or a `Plan`.
      has_aux: `fun` returns `(loss, aux)`.

    Returns:
      `(params, *args, **kwargs) -> (value, grads)`, with `value` being
      `(loss, aux)` when `has_aux`.

    Raises:
      TypeError: `fun` is not callable, `spec` is no spec (e.g. an optax
        optimizer), or `has_aux` is no bool; when called, `params` is no
        parameter pytree.

    >>> import jax.numpy as jnp
    >>> params = {"stem": {"w": jnp.ones(2)}, "head": {"w": jnp.ones(2)}}
    >>> loss = lambda p, x: jnp.sum((p["stem"]["w"] * p["head"]["w"] - x) ** 2)
    >>> value, grads = value_and_grad(loss, "stem")(params, 3.0)
    >>> float(value), grads["stem"]["w"], grads["head"]["w"]
    (8.0, Array([0., 0.], dtype=float32), Array([-4., -4.], dtype=float32))
    """
    if not callable(fun):
        raise TypeError(
            "value_and_grad takes the loss function first, then the freeze spec: "
            f"value_and_grad(fun, spec); got fun={_checks.given(fun)}."
        )
    if not isinstance(spec, _plan.Plan):
        spec = _spec.as_spec(spec)
    has_aux = _checks.flag("has_aux", has_aux)

    @functools.wraps(fun)
    def wrapped(params: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        plan = _plan.plan(params, spec)
        value, grads, _ = value_and_grads(fun, plan, has_aux=has_aux)(params, *args, **kwargs)
        return value, grads

    return wrapped


def value_and_grads(
    fun: Callable[..., Any], plan: _plan.Plan, *, has_aux: bool = False
) -> Callable[..., tuple[Any, Any, Any]]:
    """`value_and_grad` for a ready plan, also giving the trainable gradients alone.

    Returns:
      `(params, *args, **kwargs) -> (value, grads, trainable_grads)`:
      `trainable_grads` is the block view of the gradients (`plan.grad_view`)
      with None in the frozen places, for norms over what trains.
    """

    def wrapped(params: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any, Any]:
        bounds, _ = plan.grad_view
        view = _blocks.split(params, bounds)
        mask = plan.grad_mask
        trainable, frozen = split(view, mask)

        def partial(trainable: Any) -> Any:
            with _blocks.segments_context(plan.segments):
                out = fun(_blocks.join(merge(mask, trainable, frozen)), *args, **kwargs)
            if has_aux:
                if not (isinstance(out, tuple) and len(out) == 2):
                    raise ValueError(
                        "With has_aux=True the function must return a pair (loss, aux); "
                        f"got {type(out).__name__}."
                    )
                check_scalar(out[0])
            else:
                check_scalar(out)
            return out

        value, trainable_grads = jax.value_and_grad(partial, has_aux=has_aux)(trainable)
        # Frozen leaves (and frozen blocks of stacked leaves) get constant zeros,
        # so nothing ever asks XLA for their gradients.
        grads = _blocks.join(fill_frozen(mask, view, trainable_grads))
        return value, grads, trainable_grads

    return wrapped


def grad(
    fun: Callable[..., Any],
    spec: _spec.SpecLike,
    *,
    has_aux: bool = False,
) -> Callable[..., Any]:
    """Like `jax.grad`, differentiating only the leaves `spec` leaves trainable.

    See `value_and_grad`. Returns `grads`, or `(grads, aux)` with `has_aux`.

    >>> import jax.numpy as jnp
    >>> params = {"stem": jnp.ones(2), "head": jnp.ones(2)}
    >>> grad(lambda p: jnp.sum(p["stem"] * p["head"]), "head")(params)["head"]
    Array([0., 0.], dtype=float32)
    """
    value_and_grad_fun = value_and_grad(fun, spec, has_aux=has_aux)

    @functools.wraps(fun)
    def wrapped(params: Any, *args: Any, **kwargs: Any) -> Any:
        value, grads = value_and_grad_fun(params, *args, **kwargs)
        return (grads, value[1]) if has_aux else grads

    return wrapped
