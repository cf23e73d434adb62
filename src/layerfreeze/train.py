"""Jitted train and eval steps that differentiate only the trainable parameters.

XLA drops the backward work of frozen layers only when nothing live consumes
their gradients; a global-norm clip, a gradient-norm metric or a gradient
accumulator over the full gradient brings it all back. The steps built here
take the gradient of the trainable partition only, so the frozen backward work
is gone by construction, whatever the optimizer chains. Under method `lr0` the
frozen gradients are computed on purpose: they keep the frozen leaves'
optimizer state warm.

The train step is pure, `(state, batch) -> (state, metrics)`, jitted, donates
its state, and runs data parallel over a `jax.sharding.Mesh` when given one.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from layerfreeze import _freeze, _labels, _spec

__all__ = [
    "TrainState",
    "TrainSteps",
    "make_mesh",
    "make_steps",
    "replicate",
    "shard_batch",
]

Batch = Mapping[str, Any]
Preprocess = Callable[[jax.Array, jax.Array], jax.Array]


@flax.struct.dataclass
class TrainState:
    """Everything a train step reads and writes.

    Attributes:
      step: the number of steps taken (int32 scalar).
      params: the model parameters, frozen ones included.
      batch_stats: BatchNorm running statistics (an empty dict if none).
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
      spec: the resolved freeze spec.
      method: `"zero"` or `"lr0"`.
      tx: `layerfreeze.freeze(optimizer, spec, method=method)`.
      frozen_bn: top-level groups whose BatchNorm runs on running statistics.
      trainable_params: how many parameters train under `spec`.
      train_step: jitted `(TrainState, batch) -> (TrainState, metrics)`;
        donates the state.
      eval_step: jitted `(TrainState, batch) -> metrics` with summed `loss`,
        `correct` and `count` (so padded batches average exactly).
    """

    spec: _spec.FreezeSpec
    method: str
    tx: optax.GradientTransformation
    frozen_bn: frozenset[str]
    trainable_params: int
    train_step: Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]
    eval_step: Callable[[TrainState, Batch], dict[str, jax.Array]]

    def init_state(self, variables: Mapping[str, Any], rng: jax.Array) -> TrainState:
        """A fresh `TrainState` from model variables (`params`, `batch_stats`).

        The arrays are copied: the train step donates its state, and the
        caller's `variables` must survive that.
        """
        params = jax.tree.map(jnp.array, variables["params"])
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=jax.tree.map(jnp.array, variables.get("batch_stats", {})),
            opt_state=self.tx.init(params),
            rng=jnp.array(_raw_key(rng)),
        )


def make_steps(
    model: flax.linen.Module,
    optimizer: optax.GradientTransformation,
    spec: _spec.SpecLike,
    params: Any,
    *,
    method: _freeze.Method = "zero",
    preprocess: Preprocess | None = None,
    preprocess_eval: Callable[[jax.Array], jax.Array] | None = None,
    grad_norm: bool = True,
    mesh: Mesh | None = None,
    donate: bool = True,
    start_after: str | None = None,
    previous: Sequence[_spec.SpecLike] = (),
) -> TrainSteps:
    """Builds the frozen-aware optimizer and the jitted train and eval steps.

    The model is a Flax linen module called as
    `model.apply(variables, images, train=..., frozen_bn=groups, ...)` (the
    ResNets of `layerfreeze.models`), returning logits. BatchNorm in the groups
    that `spec` freezes entirely runs on its running statistics, so their
    `batch_stats` stay bit-identical (`train_bn=True` in the spec turns that
    off).

    Args:
      model: the Flax module.
      optimizer: any optax transformation; it is wrapped with
        `layerfreeze.freeze(optimizer, spec, method=method)`.
      spec: what to freeze.
      params: the parameters (or their shapes), to resolve `spec` once.
      method: `"zero"` (frozen gradients never computed) or `"lr0"`.
      preprocess: `(rng, images) -> float images`, applied inside the jitted
        train step (augmentation, normalisation). Defaults to a float cast.
      preprocess_eval: `images -> float images` for the eval step.
      grad_norm: report the global norm of the trainable gradients.
      mesh: a mesh with a `data` axis: batches are split over it and the state
        is replicated. None: whatever device the inputs live on.
      donate: donate the state to the train step (its buffers are reused).
      start_after: train on cached features: batches carry in `"image"` the
        output of this group (see `layerfreeze.features`), and the train step
        calls `model.apply(..., start_after=start_after)`. Every group up to
        and including it must be frozen with its BatchNorm frozen
        (`features.frozen_prefix`); pass `preprocess=lambda rng, x: x`. The
        eval step still runs the whole model on images. Only with method
        `"zero"`: `"lr0"` computes the frozen gradients on purpose, and the
        groups skipped here have none.
      previous: the specs of the earlier phases, oldest first, passed to
        `layerfreeze.freeze` (e.g. `schedule.previous_specs(i)`), so leaves
        unfrozen by this phase start with fresh optimizer step counts.

    Returns:
      `TrainSteps`.

    Raises:
      ValueError: `start_after` names a group that is not frozen with its
        BatchNorm, or is given with method `"lr0"`.
    """
    _freeze.check_method(method)
    spec = _spec.as_spec(spec)
    resolved = spec.resolve(params)
    mask = jax.tree.unflatten(jax.tree.structure(params), list(resolved.values()))
    frozen_bn = _labels.frozen_bn_groups(params, spec)
    if start_after is not None:
        _check_start_after(start_after, frozen_bn, spec, method)
    apply_kwargs = {} if start_after is None else {"start_after": start_after}
    tx = _freeze.freeze(optimizer, spec, method=method, previous=previous)
    preprocess = preprocess or (lambda rng, x: x.astype(jnp.float32))
    preprocess_eval = preprocess_eval or (lambda x: x.astype(jnp.float32))
    trainable_count = sum(
        int(np.prod(np.shape(leaf)))
        for leaf, f in zip(jax.tree.leaves(params), resolved.values(), strict=True)
        if not f
    )
    differentiate_all = method == "lr0"

    def loss_fn(params, batch_stats, images, labels, dropout_rng):
        variables = {"params": params, "batch_stats": batch_stats}
        logits, updates = model.apply(
            variables,
            images,
            train=True,
            frozen_bn=frozen_bn,
            mutable=["batch_stats"],
            rngs={"dropout": dropout_rng},
            **apply_kwargs,
        )
        logits = logits.astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        return loss, (updates.get("batch_stats", batch_stats), accuracy)

    def train_step(state: TrainState, batch: Batch):
        rng = jax.random.fold_in(state.rng, state.step)
        aug_rng, dropout_rng = jax.random.split(rng)
        images = preprocess(aug_rng, batch["image"])
        labels = batch["label"]
        if differentiate_all:
            (loss, (batch_stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state.params, state.batch_stats, images, labels, dropout_rng
            )
            trainable_grads = jax.tree.map(lambda f, g: None if f else g, mask, grads)
        else:
            trainable, frozen = _split(state.params, mask)

            def partial_loss(trainable):
                return loss_fn(
                    _merge(mask, trainable, frozen),
                    state.batch_stats,
                    images,
                    labels,
                    dropout_rng,
                )

            (loss, (batch_stats, acc)), trainable_grads = jax.value_and_grad(
                partial_loss, has_aux=True
            )(trainable)
            # Frozen leaves get constant zeros that `set_to_zero` discards, so
            # nothing ever asks XLA for their gradients.
            grads = jax.tree.map(
                lambda f, p, g: jnp.zeros_like(p) if f else g, mask, state.params, trainable_grads
            )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "accuracy": acc}
        if grad_norm:
            metrics["grad_norm"] = optax.tree.norm(trainable_grads)
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
        )
        return new_state, metrics

    def eval_step(state: TrainState, batch: Batch):
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        logits = model.apply(variables, preprocess_eval(batch["image"]), train=False)
        logits = logits.astype(jnp.float32)
        labels = batch["label"]
        weight = batch.get("mask", jnp.ones(labels.shape, jnp.float32)).astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return {
            "loss": jnp.sum(loss * weight),
            "correct": jnp.sum(correct * weight),
            "count": jnp.sum(weight),
        }

    jit_kwargs: dict[str, Any] = {}
    eval_kwargs: dict[str, Any] = {}
    if mesh is not None:
        replicated = NamedSharding(mesh, P())
        data = NamedSharding(mesh, P("data"))
        jit_kwargs = {
            "in_shardings": (replicated, data),
            "out_shardings": (replicated, replicated),
        }
        eval_kwargs = {"in_shardings": (replicated, data), "out_shardings": replicated}
    return TrainSteps(
        spec=spec,
        method=method,
        tx=tx,
        frozen_bn=frozen_bn,
        trainable_params=trainable_count,
        train_step=jax.jit(train_step, donate_argnums=(0,) if donate else (), **jit_kwargs),
        eval_step=jax.jit(eval_step, **eval_kwargs),
    )


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
    start_after: str, frozen_bn: frozenset[str], spec: _spec.FreezeSpec, method: str
) -> None:
    if method != "zero":
        raise ValueError(
            f"start_after={start_after!r} (cached features) needs method 'zero'; got "
            f"{method!r}, which computes gradients of the frozen groups that cached "
            "features skip."
        )
    if start_after not in frozen_bn:
        raise ValueError(
            f"start_after={start_after!r}, but under freeze spec {spec.describe()!r} that "
            "group is not entirely frozen with its BatchNorm on running statistics, so its "
            f"output is not fixed; groups that are: {sorted(frozen_bn)}. "
            "layerfreeze.features.frozen_prefix finds the last one that can be skipped."
        )


def _split(params: Any, mask: Any) -> tuple[Any, Any]:
    trainable = jax.tree.map(lambda f, p: None if f else p, mask, params)
    frozen = jax.tree.map(lambda f, p: p if f else None, mask, params)
    return trainable, frozen


def _merge(mask: Any, trainable: Any, frozen: Any) -> Any:
    return jax.tree.map(lambda f, t, z: z if f else t, mask, trainable, frozen)


def _raw_key(rng: jax.Array) -> jax.Array:
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    return jnp.asarray(rng, jnp.uint32)
