"""Jitted train and eval steps for any Flax model, differentiating only what trains.

XLA drops the backward work of frozen layers only when nothing live consumes
their gradients; a global-norm clip, a gradient-norm metric or a gradient
accumulator over the full gradient brings it all back. The steps built here
take the gradient of the trainable partition only (`layerfreeze.value_and_grad`),
so the frozen backward work is gone by construction, whatever the optimizer
chains. Under method `lr0` the frozen gradients are computed on purpose: they
keep the frozen leaves' optimizer state warm.

The model is any linen module (written like Flax's examples, BatchNorm passed
`use_running_average` at call time or fixed at construction), any NNX module,
or none at all (a loss function of the params). BatchNorm layers whose
parameters are frozen run on their running statistics (`layerfreeze.frozen_batchnorm`,
`layerfreeze.nnx_train_mode`). The loss is any function of the model's outputs
and the batch; softmax cross-entropy over integer labels is the default.

The train step is pure, `(state, batch) -> (state, metrics)`, jitted, donates
its state, and runs data parallel over a `jax.sharding.Mesh` when given one.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from layerfreeze import _batchnorm, _blocks, _freeze, _grad, _nnx, _plan, _spec

__all__ = [
    "LossFn",
    "TrainState",
    "TrainSteps",
    "classification_loss",
    "make_mesh",
    "make_steps",
    "replicate",
    "shard_batch",
]

Batch = Any
Preprocess = Callable[[jax.Array, Any], Any]
LossFn = Callable[[Any, Batch], Any]
"""`(outputs, batch) -> loss` or `(loss, {name: scalar metric})`; the loss a float scalar."""


@flax.struct.dataclass
class TrainState:
    """Everything a train step reads and writes.

    Attributes:
      step: the number of steps taken (int32 scalar).
      params: the model parameters, frozen ones included (an `nnx.State` of
        the `nnx.Param`s for an NNX model).
      batch_stats: the model's other state: BatchNorm running statistics of
        a linen model (an empty dict if none); for an NNX model, every
        variable that is not an `nnx.Param` (BatchNorm statistics, RNG
        streams).
      opt_state: the state of the frozen-aware optimizer (`TrainSteps.tx`).
      rng: the run's base PRNG key (raw uint32 key data); each step folds in
        its step number, so a resumed run draws the same randomness.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array

    def as_dict(self) -> dict[str, Any]:
        """The fields as a dict (for checkpointing)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class TrainSteps:
    """The optimizer and the jitted steps for one freeze spec.

    Attributes:
      plan: the freeze spec resolved against the params (`layerfreeze.plan`),
        shared by the optimizer, the gradient and the BatchNorm policy.
      spec: the freeze spec, `plan.spec`.
      method: `"zero"` or `"lr0"`.
      tx: `layerfreeze.freeze(optimizer, spec, method=method, previous=previous)`.
      trainable_params: how many parameters train under `spec`.
      train_step: jitted `(TrainState, batch) -> (TrainState, metrics)`;
        donates the state. Metrics: `loss`, the loss function's metrics
        (`accuracy` for the default loss), `grad_norm`, and
        `grad_norm/<group>` for each of `make_steps`' `group_norms`.
      eval_step: jitted `(TrainState, batch) -> metrics`, sums over the batch
        and a `count`, so that summing over batches and dividing by the
        summed count gives exact means. The default loss reports summed
        `loss` and `correct` and honours a `"mask"` entry of the batch
        (padded examples weigh 0); a custom loss reports its mean loss and
        metrics times the batch size.
      init_state: `(variables, rng) -> TrainState`; see `TrainSteps.init_state`.
    """

    plan: _plan.Plan
    spec: _spec.FreezeSpec
    method: str
    tx: optax.GradientTransformation
    trainable_params: int
    train_step: Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]
    eval_step: Callable[[TrainState, Batch], dict[str, jax.Array]]
    _split_variables: Callable[[Any], tuple[Any, Any]] = dataclasses.field(repr=False)

    def init_state(self, variables: Any, rng: jax.Array) -> TrainState:
        """A fresh `TrainState`.

        Args:
          variables: a linen model's variables (`{"params": ..., "batch_stats":
            ...}`), an NNX model, or (no model) the params.
          rng: a PRNG key.

        The arrays are copied: the train step donates its state, and the
        caller's variables must survive that.
        """
        params, batch_stats = self._split_variables(variables)
        params = jax.tree.map(jnp.array, params)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=jax.tree.map(jnp.array, batch_stats),
            opt_state=self.tx.init(params),
            rng=jnp.array(_raw_key(rng)),
        )


def classification_loss(logits: jax.Array, batch: Batch) -> tuple[jax.Array, dict[str, Any]]:
    """Softmax cross-entropy with the integer labels `batch["label"]`, and accuracy.

    >>> import jax.numpy as jnp
    >>> loss, metrics = classification_loss(jnp.array([[2.0, 0.0]]), {"label": jnp.array([0])})
    >>> round(float(loss), 4), float(metrics["accuracy"])
    (0.1269, 1.0)
    """
    logits = jnp.asarray(logits, jnp.float32)
    labels = batch["label"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}


def make_steps(
    model: nn.Module | nnx.Module | None,
    optimizer: optax.GradientTransformation,
    spec: _spec.SpecLike,
    params: Any = None,
    *,
    loss_fn: Callable[..., Any] | None = None,
    inputs: str | Callable[[Batch], Any] = "image",
    train_kwargs: Mapping[str, Any] | None = None,
    eval_kwargs: Mapping[str, Any] | None = None,
    method: _freeze.Method = "zero",
    running_stats: _spec.SpecLike | None = None,
    preprocess: Preprocess | None = None,
    preprocess_eval: Callable[[Any], Any] | None = None,
    grad_norm: bool = True,
    group_norms: Sequence[str] = (),
    mesh: Mesh | None = None,
    donate: bool = True,
    start_after: str | None = None,
    previous: Sequence[_spec.SpecLike] = (),
    compiler_options: Mapping[str, Any] | None = None,
) -> TrainSteps:
    """Builds the frozen-aware optimizer and the jitted train and eval steps.

    The model is one of:

    * a linen module, applied as `model.apply(variables, x, **train_kwargs)`
      with `x` the batch's inputs (`train_kwargs` defaults to
      `{"train": True}`, `eval_kwargs` to `{"train": False}`; pass `{}` for a
      module without a `train` argument). Its `batch_stats` are updated, and
      every `nn.BatchNorm` whose parameters `spec` freezes runs on its running
      statistics (`layerfreeze.frozen_batchnorm`), at any depth.
    * an NNX module, called as `model(x)` in train mode, with frozen
      `nnx.BatchNorm`s on running statistics (`layerfreeze.nnx_train_mode`),
      and in eval mode by the eval step. The model is not changed.
    * None: `loss_fn(params, batch, rng)` is the whole loss.

    Args:
      model: the model, see above.
      optimizer: any optax transformation; it is wrapped with
        `layerfreeze.freeze(optimizer, spec, method=method)`.
      spec: what to freeze.
      params: the parameters (or their shapes), to resolve `spec` once; for
        an NNX model, leave it out.
      loss_fn: `(outputs, batch) -> loss` or `(loss, {name: metric})`
        (default `classification_loss`); with no model,
        `(params, batch, rng) -> loss` or `(loss, metrics)`. The loss must
        be a float scalar.
      inputs: the batch key of the model's input, or `batch -> input`.
      train_kwargs: extra keyword arguments of a linen apply in training.
      eval_kwargs: extra keyword arguments of a linen apply in evaluation.
      method: `"zero"` (frozen gradients never computed) or `"lr0"`.
      running_stats: override which BatchNorm layers run on running
        statistics: a spec over BatchNorm module paths (see
        `layerfreeze.frozen_batchnorm`). Default: those whose parameters
        are frozen (none under `train_bn=True`).
      preprocess: `(rng, inputs) -> inputs`, applied inside the jitted train
        step (augmentation, normalisation). Default: none.
      preprocess_eval: `inputs -> inputs` for the eval step.
      grad_norm: report the global norm of the trainable gradients.
      group_norms: groups (path prefixes such as `"stem"` or
        `"Transformer/encoderblock_3"`) whose gradient norms to report, as
        metrics `grad_norm/<group>`: the norm of the group's trainable
        gradients (0 for a frozen group). Cheap: a sum of squares per group
        of gradients the step computes anyway; `layerfreeze.auto.AutoFreeze`
        reads them.
      mesh: a mesh with a `data` axis: batches are split over it and the state
        is replicated. None: whatever device the inputs live on.
      donate: donate the state to the train step (its buffers are reused).
      start_after: (the bundled ResNets) train on cached features: batches
        carry in `"image"` the output of this group (see
        `layerfreeze.train.features`), and the train step applies the model with
        `start_after=start_after`. Every group up to and including it must be
        frozen with its BatchNorm frozen (`features.frozen_prefix`). Only with
        method `"zero"`.
      previous: the specs of the earlier phases, oldest first, passed to
        `layerfreeze.freeze` (e.g. `schedule.previous_specs(i)`), so leaves
        unfrozen by this phase start with fresh optimizer step counts.
      compiler_options: XLA options for compiling both steps
        (`jax.jit(..., compiler_options=...)`). None (the default): XLA's
        own. `layerfreeze.train.platform.cpu_conv_options()` is an opt-in
        that made CPU convolutions faster on one machine.

    Returns:
      `TrainSteps`.

    Raises:
      ValueError: `start_after` names a group that is not frozen with its
        BatchNorm, or is given with method `"lr0"`; an NNX model without
        parameters; `params` missing for a linen model.
      TypeError: `model` is not a linen or NNX module or None.
    """
    if isinstance(model, nnx.Module):
        if params is not None:
            raise ValueError(
                "make_steps takes the parameters from an NNX model; leave `params` out."
            )
        params = _nnx.as_params(model)
        if not isinstance(spec, _plan.Plan):
            modules = _batchnorm.batchnorm_modules(model)
            spec = _batchnorm.with_bn_modules(_spec.as_spec(spec), modules)
    elif model is not None and not isinstance(model, nn.Module):
        raise TypeError(
            f"make_steps takes a flax.linen.Module, a flax.nnx.Module or None (a loss of the "
            f"params), got {type(model).__name__}."
        )
    if params is None:
        raise ValueError("make_steps needs `params` (or their shapes) for a linen model or None.")
    if not isinstance(spec, _plan.Plan):
        _freeze.check_method(method)
    plan = _plan.plan(params, spec, previous=previous, method=method)
    method = plan.method
    bounds, _ = plan.grad_view
    mask = plan.grad_mask
    group_leaves = _group_leaves(group_norms, plan.resolved)
    if start_after is not None:
        _check_start_after(start_after, plan, running_stats)
    tx = _freeze.freeze(optimizer, plan)
    default_loss = loss_fn is None
    if model is None and default_loss:
        raise ValueError("With no model, pass loss_fn(params, batch, rng) -> loss.")
    loss_fn = loss_fn or classification_loss
    get_inputs = inputs if callable(inputs) else (lambda batch: batch[inputs])
    preprocess = preprocess or (lambda rng, x: x)
    preprocess_eval = preprocess_eval or (lambda x: x)

    if model is None:
        forward = _FullLoss(loss_fn)
    elif isinstance(model, nnx.Module):
        forward = _NNXForward(model, plan, running_stats)
    else:
        extra = {} if start_after is None else {"start_after": start_after}
        forward = _LinenForward(
            model,
            _batchnorm.BatchNormPolicy(params, plan, running_stats=running_stats),
            {"train": True, **extra} if train_kwargs is None else {**train_kwargs, **extra},
            {"train": False} if eval_kwargs is None else dict(eval_kwargs),
        )

    def objective(params, batch_stats, batch, rng):
        aug_rng, model_rng = jax.random.split(rng)
        if model is None:
            out = loss_fn(params, batch, model_rng)
            new_batch_stats = batch_stats
        else:
            x = preprocess(aug_rng, get_inputs(batch))
            outputs, new_batch_stats = forward.train(params, batch_stats, x, model_rng)
            out = loss_fn(outputs, batch)
        loss, metrics = out if isinstance(out, tuple) else (out, {})
        _grad.check_scalar(loss, "loss_fn")
        return loss, (new_batch_stats, dict(metrics))

    def train_step(state: TrainState, batch: Batch):
        rng = jax.random.fold_in(state.rng, state.step)
        if method == "lr0":
            (loss, (batch_stats, metrics)), grads = jax.value_and_grad(objective, has_aux=True)(
                state.params, state.batch_stats, batch, rng
            )
            trainable_grads = _grad.split(_blocks.split(grads, bounds), mask)[0]
        else:
            view = _blocks.split(state.params, bounds)
            trainable, frozen = _grad.split(view, mask)

            def partial(t):
                with _blocks.segments_context(plan.segments):
                    params = _blocks.join(_grad.merge(mask, t, frozen))
                    return objective(params, state.batch_stats, batch, rng)

            (loss, (batch_stats, metrics)), trainable_grads = jax.value_and_grad(
                partial, has_aux=True
            )(trainable)
            # Frozen leaves (and frozen blocks of stacked leaves) get constant
            # zeros that `set_to_zero` discards, so nothing ever asks XLA for
            # their gradients.
            grads = _blocks.join(_grad.fill_frozen(mask, view, trainable_grads))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, **metrics}
        if grad_norm:
            metrics["grad_norm"] = optax.tree.norm(trainable_grads)
        if group_leaves:
            leaves = jax.tree.leaves(grads)
            for group, indices in group_leaves.items():
                squares = [jnp.sum(jnp.square(leaves[i].astype(jnp.float32))) for i in indices]
                metrics[f"grad_norm/{group}"] = jnp.sqrt(sum(squares, jnp.zeros((), jnp.float32)))
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
        )
        return new_state, metrics

    def eval_step(state: TrainState, batch: Batch):
        if model is None:
            out = loss_fn(state.params, batch, jax.random.key(0))
        else:
            outputs = forward.eval(
                state.params, state.batch_stats, preprocess_eval(get_inputs(batch))
            )
            if default_loss:
                return _classification_sums(outputs, batch)
            out = loss_fn(outputs, batch)
        loss, metrics = out if isinstance(out, tuple) else (out, {})
        count = jnp.asarray(jax.tree.leaves(batch)[0].shape[0], jnp.float32)
        sums = {"loss": loss, **metrics}
        return {**{k: jnp.asarray(v, jnp.float32) * count for k, v in sums.items()}, "count": count}

    jit_kwargs: dict[str, Any] = {}
    eval_kwargs_jit: dict[str, Any] = {}
    if compiler_options:
        jit_kwargs["compiler_options"] = dict(compiler_options)
        eval_kwargs_jit["compiler_options"] = dict(compiler_options)
    if mesh is not None:
        replicated = NamedSharding(mesh, P())
        data = NamedSharding(mesh, P("data"))
        jit_kwargs |= {
            "in_shardings": (replicated, data),
            "out_shardings": (replicated, replicated),
        }
        eval_kwargs_jit |= {"in_shardings": (replicated, data), "out_shardings": replicated}
    return TrainSteps(
        plan=plan,
        spec=plan.spec,
        method=method,
        tx=tx,
        trainable_params=plan.trainable_params,
        train_step=jax.jit(train_step, donate_argnums=(0,) if donate else (), **jit_kwargs),
        eval_step=jax.jit(eval_step, **eval_kwargs_jit),
        _split_variables=forward.split_variables,
    )


class _LinenForward:
    """A linen module in train mode (frozen BatchNorm on running statistics) and eval mode."""

    def __init__(self, model, policy, train_kwargs, eval_kwargs):
        self.model, self.policy = model, policy
        self.train_kwargs, self.eval_kwargs = train_kwargs, eval_kwargs

    def train(self, params, batch_stats, x, rng):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        with _batchnorm.use_policy(self.policy):
            out = self.model.apply(
                variables,
                x,
                mutable=["batch_stats"] if batch_stats else False,
                rngs={"dropout": rng},
                **self.train_kwargs,
            )
        self.policy.check_rules_used()  # at trace time: a running_stats rule must match
        if not batch_stats:
            return out, batch_stats
        outputs, updates = out
        return outputs, updates.get("batch_stats", batch_stats)

    def eval(self, params, batch_stats, x):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        return self.model.apply(variables, x, **self.eval_kwargs)

    @staticmethod
    def split_variables(variables):
        if not isinstance(variables, Mapping) or "params" not in variables:
            raise TypeError(
                "init_state takes a linen model's variables, a mapping with 'params' (and "
                f"'batch_stats' if it has BatchNorm); got {type(variables).__name__}."
            )
        return variables["params"], variables.get("batch_stats", {})


class _NNXForward:
    """An NNX module as two pure functions: train mode (per the spec) and eval mode."""

    def __init__(self, model, spec, running_stats):
        train_model = nnx.clone(model)
        _nnx.nnx_train_mode(train_model, spec, running_stats=running_stats)
        eval_model = nnx.clone(model)
        eval_model.eval()
        self.train_graphdef = nnx.graphdef(train_model)
        self.eval_graphdef = nnx.graphdef(eval_model)

    def train(self, params, rest, x, rng):
        del rng  # an NNX model carries its own RNG streams, in `rest`
        # Fresh Variables, owned by the current trace (the step's `rest` was
        # made by an outer one, and NNX refuses to mutate across traces).
        model = nnx.merge(self.train_graphdef, params, jax.tree.map(lambda v: v, rest))
        outputs = model(x)
        return outputs, nnx.split(model, nnx.Param, ...)[2]

    def eval(self, params, rest, x):
        return nnx.merge(self.eval_graphdef, params, rest)(x)

    @staticmethod
    def split_variables(model):
        if not isinstance(model, nnx.Module):
            raise TypeError(
                f"init_state of NNX steps takes the NNX model, got {type(model).__name__}."
            )
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return params, rest


class _FullLoss:
    """No model: the loss function sees the params directly."""

    def __init__(self, loss_fn):
        self.loss_fn = loss_fn

    @staticmethod
    def split_variables(params):
        return params, {}


def _classification_sums(logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    logits = jnp.asarray(logits, jnp.float32)
    labels = batch["label"]
    weight = batch.get("mask", jnp.ones(labels.shape, jnp.float32)).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {
        "loss": jnp.sum(loss * weight),
        "correct": jnp.sum(correct * weight),
        "count": jnp.sum(weight),
    }


def make_mesh(devices: Any = None) -> Mesh:
    """A one-axis mesh named `data` over `devices` (default: all devices).

    On several hosts call `jax.distributed.initialize()` first; `jax.devices()`
    then lists every host's devices.
    """
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), ("data",))


def shard_batch(mesh: Mesh, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Places this host's part of a batch on the mesh, split over `data`.

    The leading dimension of each array must divide by the number of local
    devices; on one host the batch is the global batch.
    """
    sharding = NamedSharding(mesh, P("data"))
    n = len(mesh.local_devices)
    out = {}
    for key, value in batch.items():
        if value.shape[0] % n:
            raise ValueError(
                f"Batch array {key!r} has leading size {value.shape[0]}, which does not "
                f"divide over {n} local devices; use a batch size that is a multiple of {n}."
            )
        out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(value))
    return out


def replicate(mesh: Mesh, tree: Any) -> Any:
    """Places `tree` on every device of `mesh`."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def _check_start_after(
    start_after: str, plan: _plan.Plan, running_stats: _spec.SpecLike | None
) -> None:
    if plan.method != "zero":
        raise ValueError(
            f"start_after={start_after!r} (cached features) needs method 'zero'; got "
            f"{plan.method!r}, which computes gradients of the frozen groups that cached "
            "features skip."
        )
    if running_stats is not None:
        raise ValueError(
            f"start_after={start_after!r} (cached features) follows the spec's BatchNorm "
            "policy; it cannot be combined with running_stats."
        )
    if start_after not in plan.frozen_bn_groups:
        raise ValueError(
            f"start_after={start_after!r}, but under freeze spec {plan.spec.describe()!r} that "
            "group is not entirely frozen with its BatchNorm on running statistics, so its "
            f"output is not fixed; groups that are: {sorted(plan.frozen_bn_groups)}. "
            "layerfreeze.train.features.frozen_prefix finds the last one that can be skipped."
        )


def _group_leaves(groups: Sequence[str], resolved: Mapping[str, bool]) -> dict[str, list[int]]:
    """`{group: indices of its trainable leaves}`, in `jax.tree.leaves(params)` order."""
    if isinstance(groups, str):
        raise TypeError(
            f"group_norms takes a sequence of groups such as ({groups!r},), got the string "
            f"{groups!r}."
        )
    paths = list(resolved)
    out: dict[str, list[int]] = {}
    for group in groups:
        inside = [i for i, p in enumerate(paths) if p == group or p.startswith(group + "/")]
        if not inside:
            top = list(dict.fromkeys(p.split("/", 1)[0] for p in paths))
            raise ValueError(
                f"group_norms: group {group!r} is no parameter's path prefix; the top-level "
                f"groups are {', '.join(top)}."
            )
        out[group] = [i for i in inside if not resolved[paths[i]]]
    return out


def _raw_key(rng: jax.Array) -> jax.Array:
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    return jnp.asarray(rng, jnp.uint32)
