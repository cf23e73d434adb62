"""Freezing Flax NNX models: what `nnx.Optimizer` and `nnx.grad` should see, and BatchNorm.

NNX keeps parameters inside the model, so the freeze spec is resolved over
`nnx.state(model, nnx.Param)`, whose paths read like linen's
(`stem/kernel`, `blocks/0/norm/scale`).
"""

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from layerfreeze import _batchnorm, _paths, _plan, _spec

__all__ = ["as_params", "nnx_filter", "nnx_train_mode"]


def as_params(tree: Any) -> Any:
    """`nnx.state(tree, nnx.Param)` for an NNX module; anything else unchanged.

    Raises:
      ValueError: the module holds no `nnx.Param`.
    """
    if not isinstance(tree, nnx.Module):
        return tree
    params = nnx.state(tree, nnx.Param)
    if not _paths.leaf_paths(params):
        raise ValueError(
            f"The NNX model {type(tree).__name__} holds no nnx.Param, so there is nothing to "
            "freeze or train. Parameters must be nnx.Param variables (nnx.Linear, nnx.Conv, "
            "... create them)."
        )
    return params


def nnx_filter(model: nnx.Module, spec: _spec.SpecLike) -> Callable[[Any, Any], bool]:
    """The NNX filter of the parameters that train under `spec`.

    Use it as `nnx.Optimizer(model, tx, wrt=...)` and as the filter of
    `nnx.DiffState(0, ...)` in `nnx.grad` / `nnx.value_and_grad`: the step
    then differentiates only trainable `nnx.Param`s (frozen backward work is
    never computed) and the optimizer holds state for them alone. Frozen
    parameters are never touched, whatever the optimizer chains.

    The spec is resolved once, here, against the model's parameters, so a rule
    that matches nothing fails now. Build a new filter (and optimizer) when the
    frozen set changes.

    Args:
      model: the NNX model.
      spec: what is frozen; anything `layerfreeze.as_spec` accepts.

    Returns:
      A filter `(path, value) -> bool`: True for a trainable `nnx.Param`.

    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> class Net(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.stem = nnx.Linear(3, 4, rngs=rngs)
    ...         self.head = nnx.Linear(4, 2, rngs=rngs)
    ...     def __call__(self, x):
    ...         return self.head(nnx.relu(self.stem(x)))
    >>> model = Net(nnx.Rngs(0))
    >>> trainable = nnx_filter(model, "stem")
    >>> optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=trainable)
    >>> def loss_fn(model, x):
    ...     return jnp.mean(model(x) ** 2)
    >>> grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, trainable))(model, jnp.ones((5, 3)))
    >>> sorted(grads.keys())
    ['head']
    >>> _ = optimizer.update(model, grads)
    """
    params = as_params(model)
    spec = _batchnorm.with_bn_modules(_spec.as_spec(spec), _batchnorm.batchnorm_modules(model))
    mask = _plan.plan(params, spec).leaf_mask(params, why="an nnx filter selects whole variables")
    trainable = frozenset(
        path
        for path, frozen in zip(_paths.leaf_paths(mask), jax.tree.leaves(mask), strict=True)
        if not frozen
    )

    def is_trainable(path: Any, value: Any) -> bool:
        return isinstance(value, nnx.Param) and _paths.path_str(map(str, path)) in trainable

    return is_trainable


def nnx_train_mode(
    model: nnx.Module,
    spec: _spec.SpecLike,
    *,
    running_stats: _spec.SpecLike | None = None,
) -> dict[str, bool]:
    """`model.train()`, except that BatchNorm layers frozen by `spec` use running statistics.

    Every `nnx.BatchNorm` (found by type, whatever its name) whose own scale
    and bias `spec` freezes gets
    `use_running_average=True`, so its statistics stay bit-identical while it
    is frozen; all others train (`use_running_average=False`), as do dropout
    layers. Call it again when the frozen set changes (an unfrozen BatchNorm
    trains again), and `model.eval()` for evaluation. Attributes are static in
    NNX, so `nnx.jit` compiles one step per mode.

    Args:
      model: the NNX model; changed in place.
      spec: what is frozen; `train_bn=True` leaves every BatchNorm training.
      running_stats: instead of following `spec`, a spec over BatchNorm module
        paths naming the layers that use running statistics.

    Returns:
      `{module path: uses running statistics}` for every `nnx.BatchNorm`.

    Raises:
      ValueError: a `running_stats` rule matches no BatchNorm layer.

    >>> from flax import nnx
    >>> class Net(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.stem, self.stem_bn = nnx.Linear(3, 4, rngs=rngs), nnx.BatchNorm(4, rngs=rngs)
    ...         self.head, self.head_bn = nnx.Linear(4, 2, rngs=rngs), nnx.BatchNorm(2, rngs=rngs)
    >>> nnx_train_mode(Net(nnx.Rngs(0)), "stem,stem_bn")
    {'head_bn': False, 'stem_bn': True}
    """
    if not isinstance(spec, _plan.Plan):
        modules = _batchnorm.batchnorm_modules(model)
        spec = _batchnorm.with_bn_modules(_spec.as_spec(spec), modules)
    policy = _batchnorm.BatchNormPolicy(as_params(model), spec, running_stats=running_stats)
    model.train()
    modes = {}
    for path, module in nnx.iter_modules(model):
        if isinstance(module, nnx.BatchNorm):
            name = _paths.path_str([str(p) for p in path])
            frozen = policy.frozen(name)
            module.use_running_average = frozen
            modes[name] = frozen
    policy.check_rules_used()
    return dict(sorted(modes.items()))
