"""BatchNorm that really stays frozen, for any Flax model.

A BatchNorm layer is *frozen* when every one of its own parameters (its
`scale` and `bias`) is frozen by the spec. A frozen BatchNorm normalises with
its running statistics during training and its `batch_stats` stay
bit-identical (Keras semantics: `trainable=False` puts BatchNorm in inference
mode). The decision is made per BatchNorm module, found by type
(`flax.linen.BatchNorm` and its subclasses, `flax.nnx.BatchNorm`), at any
depth and under any name.

Two other policies are explicit choices:

* `train_bn=True` in the spec (fastai): BatchNorm scale and bias stay
  trainable inside frozen groups, and every BatchNorm keeps normalising with
  batch statistics.
* `running_stats=<spec>`: a freeze spec over BatchNorm *module* paths that
  says which BatchNorm layers run on running statistics, whatever their
  parameters do (e.g. `"all"` for every BatchNorm, `"none"` to let frozen
  layers keep updating their statistics).
"""

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
from flax import nnx

from layerfreeze import _paths, _plan, _spec

__all__ = ["BatchNormPolicy", "batchnorm_modules", "frozen_batchnorm", "use_policy"]


def batchnorm_modules(tree: Any) -> tuple[str, ...]:
    """The paths of a model's BatchNorm modules, found by type or by their statistics.

    Args:
      tree: an NNX model (its `nnx.BatchNorm` modules, subclasses included),
        or a linen model's variables (the modules that keep `mean` and `var`
        in `batch_stats`).

    Returns:
      Module paths such as `encoder/unit_a/norm1`, sorted; for a spec's
      `bn_modules`, so that `train_bn=True` finds BatchNorm whatever its name.

    >>> import jax.numpy as jnp
    >>> batchnorm_modules({"params": {}, "batch_stats": {
    ...     "enc": {"norm1": {"mean": jnp.zeros(2), "var": jnp.ones(2)}}}})
    ('enc/norm1',)
    """
    if isinstance(tree, nnx.Module):
        return tuple(
            sorted(
                _paths.path_str([str(p) for p in path])
                for path, module in nnx.iter_modules(tree)
                if isinstance(module, nnx.BatchNorm)
            )
        )
    if not isinstance(tree, Mapping) or "batch_stats" not in tree:
        raise TypeError(
            "batchnorm_modules takes an NNX model or a linen model's variables (a mapping "
            f"with 'batch_stats'); got {type(tree).__name__}."
        )
    stats: dict[str, set[str]] = {}
    for path in _paths.leaf_paths(tree["batch_stats"]):
        module, _, name = path.rpartition("/")
        stats.setdefault(module, set()).add(name)
    return tuple(sorted(m for m, names in stats.items() if {"mean", "var"} <= names))


def with_bn_modules(spec: _spec.FreezeSpec, modules: tuple[str, ...]) -> _spec.FreezeSpec:
    """`spec` with `modules` added to its `bn_modules` when it uses `train_bn`."""
    if not spec.train_bn:
        return spec
    return spec.replace(bn_modules=tuple(dict.fromkeys(spec.bn_modules + modules)))


class BatchNormPolicy:
    """Decides, per BatchNorm module path, whether it runs on running statistics.

    Built once from the params and the spec, outside `jit`; the decision is a
    Python bool per module path.

    Args:
      params: the parameters (or their shapes).
      spec: the freeze spec, or its `layerfreeze.Plan` for `params`.
      running_stats: None (follow the spec, see the module docstring), or a
        spec over BatchNorm module paths naming the layers that run on
        running statistics.
    """

    def __init__(
        self,
        params: Any,
        spec: _spec.SpecLike,
        *,
        running_stats: _spec.SpecLike | None = None,
    ):
        self.plan = _plan.plan(params, spec)
        self.spec = self.plan.spec
        self.resolved = self.plan.resolved
        self.running_stats = None if running_stats is None else _spec.as_spec(running_stats)
        self._cache: dict[str, bool] = {}
        self.seen: dict[str, bool] = {}

    def frozen(self, module_path: str) -> bool:
        """Whether the BatchNorm at `module_path` (`a/b/bn`) uses running statistics."""
        if module_path not in self._cache:
            self._cache[module_path] = self._decide(module_path)
        self.seen[module_path] = self._cache[module_path]
        return self._cache[module_path]

    def _decide(self, module_path: str) -> bool:
        if self.running_stats is not None:
            return self.running_stats.frozen_at(module_path)
        prefix = module_path + "/"
        own = [frozen for path, frozen in self.resolved.items() if path.startswith(prefix)]
        if self.spec.train_bn:
            if any(own):
                raise ValueError(
                    f"train_bn=True, but the BatchNorm layer {module_path!r} has frozen "
                    "parameters: its path matches neither the spec's bn_pattern nor its "
                    "bn_modules. Name BatchNorm layers by type with "
                    "spec.replace(bn_modules=layerfreeze.batchnorm_modules(variables))."
                )
            return False
        if own:
            return all(own)
        # No scale and no bias: the layer follows the rule that covers its path.
        return self.spec.frozen_at(prefix + "mean")

    def check_rules_used(self) -> None:
        """Raises if a `running_stats` rule matched none of the BatchNorm layers run."""
        if self.running_stats is None or not self.seen:
            return
        for rule in self.running_stats.rules:
            if rule.kind != "all" and not any(rule.matches(p) for p in self.seen):
                raise ValueError(
                    f"running_stats rule {rule.pattern!r} matches no BatchNorm layer. "
                    f"BatchNorm layers of this model: {', '.join(sorted(self.seen))}."
                )


@contextlib.contextmanager
def frozen_batchnorm(
    params: Any,
    spec: _spec.SpecLike,
    *,
    running_stats: _spec.SpecLike | None = None,
) -> Iterator[BatchNormPolicy]:
    """Within this context, linen BatchNorm layers frozen by `spec` use running statistics.

    Wrap the `apply` of any linen model, inside or outside `jax.jit`. Every
    `flax.linen.BatchNorm` (subclasses included, at any depth) whose own scale
    and bias `spec` freezes normalises with its running statistics, so its
    `batch_stats` stay bit-identical, whether the model passes
    `use_running_average` when calling the layer or fixes it when building it
    (as Flax's ImageNet example does). Other BatchNorm layers behave as the
    model says.

    Args:
      params: the model's `params` collection (or its shapes).
      spec: the freeze spec; `train_bn=True` leaves every BatchNorm training.
      running_stats: instead of following `spec`, a spec over BatchNorm module
        paths naming the layers that use running statistics (`"all"`,
        `"none"`, `"stem,stage1"`, globs, `re:`); a rule that matches no
        BatchNorm layer is an error when the context exits.

    Yields:
      The `BatchNormPolicy`; after the apply, its `seen` maps each BatchNorm
      layer that ran to whether it was frozen.

    Raises:
      ValueError: a frozen BatchNorm layer has no `batch_stats` to run on
        (apply with the `batch_stats` collection).

    >>> import functools, jax, jax.numpy as jnp, flax.linen as nn
    >>> class Net(nn.Module):
    ...     train: bool = True
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         norm = functools.partial(nn.BatchNorm, use_running_average=not self.train)
    ...         x = norm(name="norm1")(nn.Dense(3, name="stem")(x))
    ...         return nn.Dense(2, name="head")(norm(name="norm2")(x))
    >>> net = Net()
    >>> variables = net.init(jax.random.key(0), jnp.ones((4, 3)))
    >>> with frozen_batchnorm(variables["params"], "stem,norm1") as policy:
    ...     _, updates = net.apply(variables, jnp.ones((4, 3)), mutable=["batch_stats"])
    >>> policy.seen
    {'norm1': True, 'norm2': False}
    >>> new, old = updates["batch_stats"], variables["batch_stats"]
    >>> bool((new["norm1"]["mean"] == old["norm1"]["mean"]).all())
    True
    >>> bool((new["norm2"]["mean"] == old["norm2"]["mean"]).all())
    False
    """
    policy = BatchNormPolicy(params, spec, running_stats=running_stats)
    with use_policy(policy):
        yield policy
    policy.check_rules_used()


@contextlib.contextmanager
def use_policy(policy: BatchNormPolicy) -> Iterator[None]:
    """Applies a ready `BatchNormPolicy` to the linen applies within the context."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.BatchNorm):
            return next_fun(*args, **kwargs)
        if module.is_initializing():
            return next_fun(*args, **kwargs)
        path = "/".join(str(p) for p in module.scope.path)
        if not policy.frozen(path):
            return next_fun(*args, **kwargs)
        if not module.has_variable("batch_stats", "mean"):
            raise ValueError(
                f"BatchNorm {path!r} is frozen (runs on its running statistics) but has no "
                "'batch_stats' to run on. Apply the model with its 'batch_stats' collection, "
                "or keep this layer training (spec train_bn=True, or running_stats=...)."
            )
        return _call_with_running_average(module, next_fun, args, kwargs)

    with nn.intercept_methods(interceptor):
        yield


def _call_with_running_average(
    module: nn.BatchNorm, next_fun: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> Any:
    kwargs = dict(kwargs)
    # `use_running_average` may come positionally after `x`, as a keyword, or
    # from the constructor; linen refuses it from both at once.
    args = args[:1]
    kwargs.pop("use_running_average", None)
    if module.use_running_average is None:
        return next_fun(*args, use_running_average=True, **kwargs)
    if module.use_running_average:
        return next_fun(*args, **kwargs)
    object.__setattr__(module, "use_running_average", True)
    try:
        return next_fun(*args, **kwargs)
    finally:
        object.__setattr__(module, "use_running_average", False)
