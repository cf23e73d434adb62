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
its state, and runs data parallel over a `jax.sharding.Mesh` when given one;
with sharding rules (`layerfreeze.train.sharding`) its parameters, gradients
and optimizer state are split over the mesh instead of replicated. With
`frozen_dtype` the frozen parameters are stored, and used, in a smaller float
dtype (bfloat16: half the bytes of float32), as Levanter keeps them in the
compute dtype.
"""

import dataclasses
import weakref
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

from layerfreeze import _batchnorm, _blocks, _checks, _freeze, _grad, _nnx, _plan, _spec
from layerfreeze.train import sharding as _sharding

__all__ = [
    "EvalStep",
    "LossFn",
    "StepOptions",
    "TrainState",
    "TrainSteps",
    "classification_loss",
    "make_steps",
]

Batch = Any
Preprocess = Callable[[jax.Array, Any], Any]
# Per group of `group_norms`: (leaf index, the leaf's block ranges in the group; None: all).
GroupLeaves = Mapping[str, list[tuple[int, tuple[tuple[int, int], ...] | None]]]
LossFn = Callable[[Any, Batch], Any]
"""`(outputs, batch) -> loss` or `(loss, {name: scalar metric})`; the loss a float scalar."""
# The dtypes `StepOptions.frozen_dtype` may store frozen parameters in.
_FROZEN_DTYPES = ("bfloat16", "float16", "float32")


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
      eval_step: an `EvalStep`, `(TrainState, batch) -> metrics`, jitted;
        sums over the batch and a `count`, so that summing over batches and
        dividing by the summed count gives exact means. The default loss
        reports summed `loss` and `correct` and honours a `"mask"` entry of
        the batch (padded examples weigh 0); a custom loss reports its mean
        loss and metrics times the batch size. It does not read the
        optimizer state, and the steps of `make_steps` calls that evaluate
        alike share it: the phases of a run compile their evaluation once.
      init_state: `(variables, rng) -> TrainState`; see `TrainSteps.init_state`.
      shardings: with `sharding_rules`, the `NamedSharding`s of the state, a
        `TrainState` of them (`batch_stats`, `step` and `rng` replicated, as
        one sharding each); the steps take and give the state in them.
        None without rules.
      frozen_dtype: the dtype the wholly frozen parameters are stored in
        (`StepOptions.frozen_dtype`), or None.
    """

    plan: _plan.Plan
    spec: _spec.FreezeSpec
    method: str
    tx: optax.GradientTransformation
    trainable_params: int
    train_step: Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]
    eval_step: "EvalStep"
    _split_variables: Callable[[Any], tuple[Any, Any]] = dataclasses.field(repr=False)
    shardings: TrainState | None = None
    frozen_dtype: np.dtype | None = None
    # Per leaf, the dtype it is stored in under this phase (None: as given);
    # None without frozen_dtype.
    _dtypes: tuple[np.dtype | None, ...] | None = dataclasses.field(default=None, repr=False)

    def cast_params(self, params: Any) -> Any:
        """`params` in the dtypes this phase stores them in.

        With `frozen_dtype`, the wholly frozen float leaves are cast to it and
        every other leaf to its dtype in the params `make_steps` was given
        (float32 for a model initialised in float32): what `init_state` does
        to fresh params and what `train.Phases` does at a phase change (newly
        frozen leaves are rounded down, newly unfrozen ones come back up with
        the rounded values; see `StepOptions.frozen_dtype`). A leaf already in
        its dtype is returned as is (no copy), and a cast leaf keeps its
        sharding. Without `frozen_dtype`, `params` is returned unchanged.
        """
        if self._dtypes is None:
            return params
        leaves, treedef = jax.tree.flatten(params)
        if len(leaves) != len(self._dtypes):
            self.plan.check(params)  # names the difference
        return jax.tree.unflatten(
            treedef, [_cast(x, d) for x, d in zip(leaves, self._dtypes, strict=True)]
        )

    def init_state(self, variables: Any, rng: jax.Array) -> TrainState:
        """A fresh `TrainState`.

        Args:
          variables: a linen model's variables (`{"params": ..., "batch_stats":
            ...}`), an NNX model, or (no model) the params.
          rng: a PRNG key.

        The arrays are copied: the train step donates its state, and the
        caller's variables must survive that. With sharding rules each
        array goes straight to its sharding (each device receives its own
        shard) and the optimizer state is created in its sharding. With a
        `frozen_dtype` the wholly frozen parameters are cast to it
        (`cast_params`); an NNX model updated from the state later
        (`nnx.update(model, state.params, ...)`) receives them in it.
        """
        params, batch_stats = self._split_variables(variables)
        if self.shardings is not None:
            return self._init_sharded(params, batch_stats, rng)
        # A copy of each leaf that the cast did not make anew.
        cast = self.cast_params(params)
        params = jax.tree.map(lambda new, old: jnp.array(new) if new is old else new, cast, params)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=jax.tree.map(jnp.array, batch_stats),
            opt_state=self.tx.init(params),
            rng=jnp.array(_raw_key(rng)),
        )

    def _init_sharded(self, params: Any, batch_stats: Any, rng: jax.Array) -> TrainState:
        to = self.shardings
        params = self.cast_params(_placed_copy(params, to.params))
        return TrainState(
            step=_placed_copy(np.zeros((), np.int32), to.step),
            params=params,
            batch_stats=_placed_copy(batch_stats, to.batch_stats),
            opt_state=jax.jit(self.tx.init, out_shardings=to.opt_state)(params),
            rng=_placed_copy(_raw_key(rng), to.rng),
        )


def _placed_copy(tree: Any, shardings: Any) -> Any:
    """A copy of `tree` in `shardings` (one sharding for all, or one per leaf), each
    device receiving its shards only (on several processes, each process its own
    devices'); it shares no buffer with `tree`, which the donating train step
    would otherwise delete."""
    return _sharding.place(tree, shardings)


def _cast(x: Any, dtype: np.dtype | None) -> Any:
    """`x` in `dtype` (None: as it is), in the same sharding; `x` itself if already there."""
    if dtype is None or getattr(x, "dtype", None) == dtype:
        return x
    if not isinstance(x, jax.Array):
        return jnp.asarray(x, dtype)
    cast = x.astype(dtype)
    if isinstance(cast, jax.core.Tracer):  # traced (jax.eval_shape, jit): no sharding to keep
        return cast
    if cast.sharding != x.sharding:
        cast = jax.device_put(cast, x.sharding)
    return cast


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepOptions:
    """How `make_steps` builds the steps, beyond the model, optimizer and spec.

    Pass them to `make_steps` as keywords (`make_steps(..., preprocess=f)`) or
    as one object (`make_steps(..., options=StepOptions(preprocess=f))`).

    Attributes:
      loss_fn: `(outputs, batch) -> loss` or `(loss, {name: metric})`
        (default `classification_loss`); with no model,
        `(params, batch, rng) -> loss` or `(loss, metrics)`. The loss must
        be a float scalar.
      inputs: the batch key of the model's input, or `batch -> input`.
      train_kwargs: extra keyword arguments of a linen apply in training
        (default `{"train": True}`; `{}` for a module without `train`).
      eval_kwargs: extra keyword arguments of a linen apply in evaluation
        (default `{"train": False}`).
      method: `"zero"` (frozen gradients never computed) or `"lr0"`.
      previous: the specs of the earlier phases, oldest first (e.g.
        `schedule.previous_specs(i)`), so leaves unfrozen by this phase start
        with fresh optimizer step counts (see `layerfreeze.plan`).
      running_stats: override which BatchNorm layers run on running
        statistics: a spec over BatchNorm module paths (see
        `layerfreeze.frozen_batchnorm`). Default: those whose parameters
        are frozen (none under `train_bn=True`).
      preprocess: `(rng, inputs) -> inputs`, applied inside the jitted train
        step (augmentation, normalisation). Default: none.
      preprocess_eval: `inputs -> inputs` for the eval step.
      grad_norm: report the global norm of the trainable gradients.
      group_norms: groups whose gradient norms to report, as metrics
        `grad_norm/<group>`: path prefixes such as `"stem"` or
        `"Transformer/encoderblock_3"`, or block selectors of stacked
        (scanned) blocks such as `"Transformer/encoderblock[3]"` (block 3
        along the leading axis of every leaf under the stack), e.g.
        `models.vit_groups(depth, scan=True)`. The metric is the norm of the
        group's trainable gradients, frozen blocks left out (0 for a frozen
        group). Cheap: a sum of squares per group of gradients the step
        computes anyway (a block's is a slice of its stacked gradient);
        `layerfreeze.auto.AutoFreeze` reads them.
      start_after: (the bundled ResNets) train on cached features: batches
        carry in `"image"` the output of this group (see
        `layerfreeze.train.features`), and the train step applies the model
        with `start_after=start_after`. Every group up to and including it
        must be frozen with its BatchNorm frozen (`features.frozen_prefix`).
        Only with method `"zero"`.
      mesh: a `jax.sharding.Mesh` (`layerfreeze.train.make_mesh`): batches
        are split over its batch axes and the state is replicated, or split
        by `sharding_rules`. None: whatever device the inputs live on.
      sharding_rules: ordered `(regex, PartitionSpec or rule)` pairs over
        parameter paths (`layerfreeze.train.sharding`; e.g.
        `[(".*", sharding.fsdp())]`); needs `mesh`. Parameters, gradients
        and optimizer state follow them (frozen leaves hold no optimizer
        state); every parameter must be covered (end with `(".*", P())` to
        replicate the rest). `batch_stats` (an NNX model's other state) are
        replicated. `TrainSteps.shardings` holds the result.
      batch_axes: the mesh axes that split the batch (default: those named
        `data` or `fsdp`); `shard_batch` must be given the same.
      donate: donate the state to the train step (its buffers are reused).
      compiler_options: XLA options for compiling both steps
        (`jax.jit(..., compiler_options=...)`). None (the default): XLA's
        own. `layerfreeze.train.platform.cpu_conv_options()` is an opt-in
        that made CPU convolutions faster on one machine.
      frozen_dtype: store the frozen parameters in this float dtype,
        `"bfloat16"`, `"float16"` or `"float32"` (a name or a dtype such as
        `jnp.bfloat16`); None (the default): as given. `init_state` casts
        every wholly frozen float leaf once, the steps use them as stored
        (the model computes with them as given: flax's layers promote a
        bfloat16 kernel to their compute dtype, so a float32 model keeps
        float32 activations), and they stay bit-identical in that dtype.
        Trainable leaves keep the dtype of `params` (float32), and so do
        their gradients and optimizer state. A stacked leaf whose blocks are
        only partly frozen cannot hold two dtypes: it stays in its own.
        BatchNorm statistics (`batch_stats`) are not cast. At a phase change
        `train.Phases` casts newly frozen leaves down and newly unfrozen ones
        back up (`TrainSteps.cast_params`). No float32 master copy is kept:
        an unfrozen leaf resumes training from its rounded values (bfloat16
        keeps 8 significant bits, a relative error of at most 2**-8 per
        weight; float16 keeps 11, 2**-11, between 6.1e-5 and 65504 in
        magnitude: smaller weights lose bits, below 3e-8 they become 0, and
        larger ones overflow). Kept on the device, a float32 copy would cost
        more than the cast saves (6 bytes per frozen parameter instead of
        4); kept on the host, it would need host memory and a checkpoint of
        its own for exact resumes. Only with method `"zero"` (under `"lr0"`
        frozen leaves run the optimizer, whose state would be rounded too).
    """

    loss_fn: Callable[..., Any] | None = None
    inputs: str | Callable[[Batch], Any] = "image"
    train_kwargs: Mapping[str, Any] | None = None
    eval_kwargs: Mapping[str, Any] | None = None
    method: _freeze.Method = "zero"
    previous: Sequence[_spec.SpecLike] = ()
    running_stats: _spec.SpecLike | None = None
    preprocess: Preprocess | None = None
    preprocess_eval: Callable[[Any], Any] | None = None
    grad_norm: bool = True
    group_norms: Sequence[str] = ()
    start_after: str | None = None
    mesh: Mesh | None = None
    sharding_rules: _sharding.Rules | None = None
    batch_axes: Sequence[str] | None = None
    donate: bool = True
    compiler_options: Mapping[str, Any] | None = None
    frozen_dtype: Any = None

    def __post_init__(self):
        # Stored as a numpy dtype (e.g. dtype(bfloat16)), whatever form it was given in.
        object.__setattr__(self, "frozen_dtype", _frozen_dtype(self.frozen_dtype))
        # The functions and keywords are first used while tracing the step, where a
        # wrong type fails far from here.
        for name in ("loss_fn", "preprocess", "preprocess_eval"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise TypeError(
                    f"make_steps option {name} must be a function (or None for the default), "
                    f"got {_checks.given(value)}."
                )
        if not (isinstance(self.inputs, str) or callable(self.inputs)):
            raise TypeError(
                "make_steps option inputs must be the batch key of the model's input (e.g. "
                f"'image') or a function batch -> input, got {_checks.given(self.inputs)}."
            )
        for name in ("train_kwargs", "eval_kwargs", "compiler_options"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Mapping):
                raise TypeError(
                    f"make_steps option {name} must be a dict (of keyword arguments or "
                    f"options) or None, got {_checks.given(value)}."
                )
        for name in ("grad_norm", "donate"):
            _checks.flag(f"make_steps option {name}", getattr(self, name))
        if self.mesh is not None and not isinstance(self.mesh, Mesh):
            raise TypeError(
                "make_steps option mesh must be a jax.sharding.Mesh (train.make_mesh(...)) "
                f"or None, got {_checks.given(self.mesh)}."
            )
        if self.sharding_rules is not None:
            if self.mesh is None:
                raise ValueError(
                    "make_steps option sharding_rules needs a mesh to shard over: pass "
                    "mesh=train.make_mesh({...}) with the axes the rules name."
                )
            _sharding.check_rules(self.sharding_rules, self.mesh)
        if self.batch_axes is not None or self.mesh is not None:
            if self.mesh is None:
                raise ValueError("make_steps option batch_axes needs a mesh.")
            _sharding.batch_sharding(self.mesh, self.batch_axes)

    @classmethod
    def of(cls, options: "StepOptions | None", fields: Mapping[str, Any]) -> "StepOptions":
        """`options` (default: all defaults) with `fields` replaced; unknown names refused."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(fields) - set(valid))
        if unknown:
            raise TypeError(
                f"make_steps got unknown option(s) {', '.join(map(repr, unknown))}; valid "
                f"options: {', '.join(valid)}."
            )
        return dataclasses.replace(options or cls(), **fields)


def _frozen_dtype(value: Any) -> np.dtype | None:
    """`value` as a numpy dtype, if it names one of `_FROZEN_DTYPES`; None stays None."""
    if value is None:
        return None
    try:
        dtype = None if isinstance(value, bool) else jnp.dtype(value)
    except (TypeError, ValueError):
        dtype = None
    if dtype is not None and dtype.name in _FROZEN_DTYPES:
        return dtype
    got = repr(value) if isinstance(value, str) else _checks.given(value)
    if dtype is not None and not isinstance(value, str):
        got = f"{dtype.name} ({got})"
    raise ValueError(
        "make_steps option frozen_dtype is the float dtype to store frozen parameters in: "
        f"one of {', '.join(map(repr, _FROZEN_DTYPES))} (a name or a dtype such as "
        f"jnp.bfloat16), or None to keep them as given; got {got}."
    )


def make_steps(
    model: nn.Module | nnx.Module | None,
    optimizer: optax.GradientTransformation,
    spec: _spec.SpecLike | _plan.Plan,
    params: Any = None,
    *,
    options: StepOptions | None = None,
    **fields: Any,
) -> TrainSteps:
    """Builds the frozen-aware optimizer and the jitted train and eval steps.

    The model is one of:

    * a linen module, applied as `model.apply(variables, x, **train_kwargs)`
      with `x` the batch's inputs. Its `batch_stats` are updated, and every
      `nn.BatchNorm` whose parameters `spec` freezes runs on its running
      statistics (`layerfreeze.frozen_batchnorm`), at any depth.
    * an NNX module, called as `model(x)` in train mode, with frozen
      `nnx.BatchNorm`s on running statistics (`layerfreeze.nnx_train_mode`),
      and in eval mode by the eval step. The model is not changed.
    * None: `loss_fn(params, batch, rng)` is the whole loss.

    Args:
      model: the model, see above.
      optimizer: any optax transformation; it is wrapped with
        `layerfreeze.freeze(optimizer, plan)`.
      spec: what to freeze, or its `layerfreeze.Plan` (which then carries
        `method` and `previous`).
      params: the parameters (or their shapes), to resolve `spec` once; for
        an NNX model, leave it out.
      options: a `StepOptions`.
      **fields: `StepOptions` fields, replacing those of `options`: `loss_fn`,
        `inputs`, `method`, `previous`, `preprocess`, `mesh`, ...

    Returns:
      `TrainSteps`.

    Raises:
      ValueError: `start_after` names a group that is not frozen with its
        BatchNorm, or is given with method `"lr0"`; `frozen_dtype` is no
        float dtype of the valid ones, or is given with method `"lr0"`; an
        NNX model without parameters; `params` missing for a linen model.
      TypeError: `model` is not a linen or NNX module or None; an unknown option.
    """
    options = StepOptions.of(options, fields)
    params, spec = _model_params(model, spec, params)
    if not isinstance(spec, _plan.Plan):
        _freeze.check_method(options.method)
    plan = _plan.plan(params, spec, previous=options.previous, method=options.method)
    if options.start_after is not None:
        _check_start_after(options.start_after, plan, options.running_stats)
    if options.frozen_dtype is not None and plan.method != "zero":
        raise ValueError(
            f"make_steps option frozen_dtype={options.frozen_dtype.name!r} needs method "
            f"'zero'; got {plan.method!r}, under which frozen parameters run the optimizer "
            "(their state kept warm for an unfreeze) and would be rounded with it."
        )
    if model is None and options.loss_fn is None:
        raise ValueError("With no model, pass loss_fn(params, batch, rng) -> loss.")
    forward = _forward(model, params, plan, options)
    tx = _freeze.freeze(optimizer, plan)
    shardings = _state_shardings(options, params, tx)
    steps = _Steps(plan, tx, forward, options, model is None, shardings)
    train_jit, eval_jit = _jit_options(options, shardings)
    return TrainSteps(
        plan=plan,
        spec=plan.spec,
        method=plan.method,
        tx=steps.tx,
        trainable_params=plan.trainable_params,
        train_step=jax.jit(steps.train_step, **train_jit),
        eval_step=_eval_step(_Eval.of(model, forward, options), eval_jit),
        _split_variables=forward.split_variables,
        shardings=shardings,
        frozen_dtype=options.frozen_dtype,
        _dtypes=_stored_dtypes(params, plan, options.frozen_dtype),
    )


def _stored_dtypes(
    params: Any, plan: _plan.Plan, frozen_dtype: np.dtype | None
) -> tuple[np.dtype | None, ...] | None:
    """Per leaf, its dtype under `frozen_dtype`: wholly frozen float leaves in it, the
    others in their own (None: a leaf without a dtype, left as it is)."""
    if frozen_dtype is None:
        return None
    out = []
    for leaf, frozen in zip(jax.tree.leaves(params), plan.frozen, strict=True):
        dtype = getattr(leaf, "dtype", None)
        dtype = None if dtype is None else np.dtype(dtype)
        if dtype is not None and _wholly_frozen(frozen) and jnp.issubdtype(dtype, jnp.floating):
            dtype = frozen_dtype
        out.append(dtype)
    return tuple(out)


def _wholly_frozen(frozen: _spec.FrozenBlocks) -> bool:
    """Whether a leaf is frozen whole (every block of a stacked leaf included)."""
    return frozen is True or (isinstance(frozen, tuple) and all(frozen))


def _model_params(model: Any, spec: Any, params: Any) -> tuple[Any, Any]:
    """The params to plan over, and the spec (an NNX model's BatchNorm named by type)."""
    if isinstance(model, nnx.Module):
        if params is not None:
            raise ValueError(
                "make_steps takes the parameters from an NNX model; leave `params` out."
            )
        if not isinstance(spec, _plan.Plan):
            modules = _batchnorm.batchnorm_modules(model)
            spec = _batchnorm.with_bn_modules(_spec.as_spec(spec), modules)
        return _nnx.as_params(model), spec
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(
            f"make_steps takes a flax.linen.Module, a flax.nnx.Module or None (a loss of the "
            f"params), got {type(model).__name__}."
        )
    if params is None:
        raise ValueError("make_steps needs `params` (or their shapes) for a linen model or None.")
    return params, spec


def _forward(model: Any, params: Any, plan: _plan.Plan, options: StepOptions) -> Any:
    """The model as pure train and eval functions of (params, other state, inputs)."""
    if model is None:
        return _FullLoss(options.loss_fn)
    if isinstance(model, nnx.Module):
        return _NNXForward(model, plan, options.running_stats)
    extra = {} if options.start_after is None else {"start_after": options.start_after}
    train_kwargs = {"train": True} if options.train_kwargs is None else options.train_kwargs
    return _LinenForward(
        model,
        _batchnorm.BatchNormPolicy(params, plan, running_stats=options.running_stats),
        {**train_kwargs, **extra},
        {"train": False} if options.eval_kwargs is None else dict(options.eval_kwargs),
    )


def _state_shardings(
    options: StepOptions, params: Any, tx: optax.GradientTransformation
) -> TrainState | None:
    """The state's shardings under `options.sharding_rules` (None without rules)."""
    if options.sharding_rules is None:
        return None
    mesh = options.mesh
    replicated = NamedSharding(mesh, P())
    param_shardings = _sharding.param_shardings(mesh, params, options.sharding_rules)
    return TrainState(
        step=replicated,
        params=param_shardings,
        batch_stats=replicated,
        opt_state=_sharding.opt_state_shardings(tx, params, param_shardings),
        rng=replicated,
    )


def _jit_options(
    options: StepOptions, shardings: TrainState | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`jax.jit` keywords of the train step and of the eval step."""
    train: dict[str, Any] = {"donate_argnums": (0,) if options.donate else ()}
    evaluate: dict[str, Any] = {}
    if options.compiler_options:
        train["compiler_options"] = dict(options.compiler_options)
        evaluate["compiler_options"] = dict(options.compiler_options)
    if options.mesh is not None:
        replicated = NamedSharding(options.mesh, P())
        state = replicated if shardings is None else shardings
        data = _sharding.batch_sharding(options.mesh, options.batch_axes)
        train |= {"in_shardings": (state, data), "out_shardings": (state, replicated)}
        # The eval step takes the state without its optimizer state (`EvalStep`).
        without = state if shardings is None else state.replace(opt_state=None)
        evaluate |= {"in_shardings": (without, data), "out_shardings": replicated}
    return train, evaluate


class _Steps:
    """The pure train step function of one phase (jitted by `make_steps`)."""

    def __init__(self, plan, tx, forward, options, no_model, shardings):
        self.plan, self.tx, self.forward, self.options = plan, tx, forward, options
        self.no_model = no_model
        self.shardings = shardings
        self.loss_fn = options.loss_fn or classification_loss
        inputs = options.inputs
        self.inputs = inputs if callable(inputs) else (lambda batch: batch[inputs])
        self.preprocess = options.preprocess or (lambda rng, x: x)
        self.group_leaves = _group_leaves(options.group_norms, plan)

    def objective(self, params, batch_stats, batch, rng):
        """`(loss, (new batch_stats, metrics))` of one batch."""
        aug_rng, model_rng = jax.random.split(rng)
        if self.no_model:
            out = self.loss_fn(params, batch, model_rng)
            new_batch_stats = batch_stats
        else:
            x = self.preprocess(aug_rng, self.inputs(batch))
            outputs, new_batch_stats = self.forward.train(params, batch_stats, x, model_rng)
            out = self.loss_fn(outputs, batch)
        loss, metrics = out if isinstance(out, tuple) else (out, {})
        _grad.check_scalar(loss, "loss_fn")
        return loss, (new_batch_stats, dict(metrics))

    def gradients(self, state: TrainState, batch: Batch, rng: jax.Array):
        """`((loss, aux), grads, trainable grads)`; under `zero` only what trains."""
        args = (state.params, state.batch_stats, batch, rng)
        if self.plan.method == "zero":
            return _grad.value_and_grads(self.objective, self.plan, has_aux=True)(*args)
        # lr0: the frozen gradients keep the frozen leaves' optimizer state warm.
        value, grads = jax.value_and_grad(self.objective, has_aux=True)(*args)
        view = _blocks.split(grads, self.plan.grad_view[0])
        return value, grads, _grad.split(view, self.plan.grad_mask)[0]

    def train_step(self, state: TrainState, batch: Batch):
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, (batch_stats, metrics)), grads, trainable_grads = self.gradients(state, batch, rng)
        if self.shardings is not None:  # reduce-scattered, never whole on every device
            grads = jax.lax.with_sharding_constraint(grads, self.shardings.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if self.options.frozen_dtype is not None:
            params = self.keep_frozen(state.params, params)
        metrics = {"loss": loss, **metrics}
        if self.options.grad_norm:
            metrics["grad_norm"] = optax.tree.norm(trainable_grads)
        metrics |= _group_norms(grads, self.group_leaves)
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
        )
        return new_state, metrics

    def keep_frozen(self, old: Any, new: Any) -> Any:
        """`new` with the wholly frozen leaves of `old`: bit-identical by construction
        (adding a zero update would turn a -0.0 into 0.0)."""
        flat, treedef = jax.tree.flatten(new)
        kept = [
            o if _wholly_frozen(f) else n
            for o, n, f in zip(jax.tree.leaves(old), flat, self.plan.frozen, strict=True)
        ]
        return jax.tree.unflatten(treedef, kept)


class EvalStep:
    """`TrainSteps.eval_step`: `(TrainState, batch) -> metrics`, jitted.

    An evaluation reads the state's params and model state, never its optimizer
    state, so the jitted function (`jitted`) takes the state without it, and
    `make_steps` gives one `EvalStep` to the steps of every call that evaluates
    alike: the same model (equal linen modules, or NNX modules of equal graph
    definitions), the same `loss_fn`, `inputs`, `preprocess_eval` and
    `eval_kwargs` objects, mesh and compiler options. The phases of a run, whose
    optimizers differ, then compile their evaluation once (once per dtype of
    the params under `frozen_dtype`). `lower`, `trace` and `eval_shape` take the
    arguments of a call.
    """

    def __init__(self, jitted: Any):
        self.jitted = jitted

    def __call__(self, state: TrainState, batch: Batch) -> dict[str, jax.Array]:
        return self.jitted(_without_opt_state(state), batch)

    def lower(self, state: TrainState, batch: Batch) -> Any:
        return self.jitted.lower(_without_opt_state(state), batch)

    def trace(self, state: TrainState, batch: Batch) -> Any:
        return self.jitted.trace(_without_opt_state(state), batch)

    def eval_shape(self, state: TrainState, batch: Batch) -> Any:
        return self.jitted.eval_shape(_without_opt_state(state), batch)


def _without_opt_state(state: Any) -> Any:
    return state.replace(opt_state=None) if isinstance(state, TrainState) else state


@dataclasses.dataclass(frozen=True)
class _Eval:
    """The eval step as a pure function of `(state, batch)`, equal (and hashable)
    for two `make_steps` calls that evaluate alike.

    Attributes:
      forward: the model in eval mode, `(params, model state, x) -> outputs`
        (`_LinenEval`, `_NNXEval`), or None without a model.
      loss_fn, inputs, preprocess_eval: the `StepOptions` fields, as given.
    """

    forward: Any
    loss_fn: Any
    inputs: Any
    preprocess_eval: Any

    @classmethod
    def of(cls, model: Any, forward: Any, options: "StepOptions") -> "_Eval":
        return cls(
            None if model is None else forward.eval,
            options.loss_fn,
            options.inputs,
            options.preprocess_eval,
        )

    def __call__(self, state: TrainState, batch: Batch) -> dict[str, jax.Array]:
        if self.forward is None:
            out = self.loss_fn(state.params, batch, jax.random.key(0))
        else:
            inputs = self.inputs(batch) if callable(self.inputs) else batch[self.inputs]
            x = inputs if self.preprocess_eval is None else self.preprocess_eval(inputs)
            outputs = self.forward(state.params, state.batch_stats, x)
            if self.loss_fn is None:
                return _classification_sums(outputs, batch)
            out = self.loss_fn(outputs, batch)
        loss, metrics = out if isinstance(out, tuple) else (out, {})
        count = jnp.asarray(jax.tree.leaves(batch)[0].shape[0], jnp.float32)
        sums = {"loss": loss, **metrics}
        return {**{k: jnp.asarray(v, jnp.float32) * count for k, v in sums.items()}, "count": count}


# `EvalStep`s by what they compute: `(_Eval, jit keywords)`; an entry lives while
# some steps hold its `EvalStep`.
_EVAL_STEPS: "weakref.WeakValueDictionary[Any, EvalStep]" = weakref.WeakValueDictionary()


def _eval_step(evaluate: _Eval, jit_kwargs: dict[str, Any]) -> EvalStep:
    """The `EvalStep` of `evaluate` jitted with `jit_kwargs`: the one made before
    for an equal pair, if some steps still hold it."""
    leaves, treedef = jax.tree.flatten(jit_kwargs)
    key: Any = (evaluate, treedef, tuple(leaves))
    try:
        hash(key)
    except TypeError:  # an unhashable option (a list in eval_kwargs): not shared
        key = None
    found = None if key is None else _EVAL_STEPS.get(key)
    if found is not None:
        return found

    def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
        return evaluate(state, batch)

    step = EvalStep(jax.jit(eval_step, **jit_kwargs))
    if key is not None:
        _EVAL_STEPS[key] = step
    return step


def _group_norms(grads: Any, group_leaves: GroupLeaves) -> dict[str, jax.Array]:
    """`grad_norm/<group>`: the norm of each group's trainable gradients.

    A block group's part of a stacked gradient is a slice of the one the step
    computes anyway: no gradient work is added, and frozen blocks are not read.
    """
    leaves = jax.tree.leaves(grads)
    out = {}
    for group, pieces in group_leaves.items():
        parts = [leaves[i][a:b] for i, ranges in pieces for a, b in (ranges or [(None, None)])]
        squares = [jnp.sum(jnp.square(part.astype(jnp.float32))) for part in parts]
        out[f"grad_norm/{group}"] = jnp.sqrt(sum(squares, jnp.zeros((), jnp.float32)))
    return out


class _LinenForward:
    """A linen module in train mode (frozen BatchNorm on running statistics) and eval mode."""

    def __init__(self, model, policy, train_kwargs, eval_kwargs):
        self.model, self.policy = model, policy
        self.train_kwargs = train_kwargs
        self.eval = _LinenEval(model, tuple(eval_kwargs.items()))

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

    @staticmethod
    def split_variables(variables):
        if not isinstance(variables, Mapping) or "params" not in variables:
            raise TypeError(
                "init_state takes a linen model's variables, a mapping with 'params' (and "
                f"'batch_stats' if it has BatchNorm); got {type(variables).__name__}."
            )
        return variables["params"], variables.get("batch_stats", {})


@dataclasses.dataclass(frozen=True)
class _LinenEval:
    """A linen module in eval mode; equal for equal modules and keywords."""

    model: nn.Module
    kwargs: tuple[tuple[str, Any], ...]

    def __call__(self, params, batch_stats, x):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        return self.model.apply(variables, x, **dict(self.kwargs))


@dataclasses.dataclass(frozen=True)
class _NNXEval:
    """An NNX module in eval mode, by its graph definition (equal for equal ones)."""

    graphdef: Any

    def __call__(self, params, rest, x):
        return nnx.merge(self.graphdef, params, rest)(x)


class _NNXForward:
    """An NNX module as two pure functions: train mode (per the spec) and eval mode."""

    def __init__(self, model, spec, running_stats):
        train_model = nnx.clone(model)
        _nnx.nnx_train_mode(train_model, spec, running_stats=running_stats)
        eval_model = nnx.clone(model)
        eval_model.eval()
        self.train_graphdef = nnx.graphdef(train_model)
        self.eval = _NNXEval(nnx.graphdef(eval_model))

    def train(self, params, rest, x, rng):
        del rng  # an NNX model carries its own RNG streams, in `rest`
        # Fresh Variables, owned by the current trace (the step's `rest` was
        # made by an outer one, and NNX refuses to mutate across traces).
        model = nnx.merge(self.train_graphdef, params, jax.tree.map(lambda v: v, rest))
        outputs = model(x)
        return outputs, nnx.split(model, nnx.Param, ...)[2]

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


def _group_leaves(groups: Sequence[str], plan: _plan.Plan) -> GroupLeaves:
    """Each group's trainable gradient pieces: `(leaf index, block ranges or None)`.

    Leaf indices are in `jax.tree.leaves(params)` order. A path-prefix group
    takes whole leaves; a block-selector group (`Transformer/encoderblock[3]`)
    takes its blocks of the stacked leaves under the stack. Frozen leaves and
    frozen blocks are left out, so a wholly frozen group has no pieces.
    """
    if isinstance(groups, str):
        raise TypeError(
            f"group_norms takes a sequence of groups such as ({groups!r},), got the string "
            f"{groups!r}."
        )
    groups = _checks.groups(groups, "group_norms", empty=True)
    paths = plan.paths
    out: dict[str, list[tuple[int, tuple[tuple[int, int], ...] | None]]] = {}
    for group in groups:
        try:
            rule = _spec.Rule(group)
        except ValueError as e:  # e.g. a malformed block selector
            raise ValueError(f"group_norms: {e}") from e
        if rule.kind not in ("group", "block"):
            raise ValueError(
                f"group_norms: {group!r} is a {rule.kind}; a group is a path prefix (e.g. "
                "'stem', 'Transformer/encoderblock_3') or a block selector of stacked blocks "
                "(e.g. 'Transformer/encoderblock[3]')."
            )
        inside = [i for i, p in enumerate(paths) if rule.matches(p)]
        if not inside:
            top = list(dict.fromkeys(p.split("/", 1)[0] for p in paths))
            what = f"selects blocks of {rule.stack!r}, which " if rule.kind == "block" else ""
            raise ValueError(
                f"group_norms: group {group!r} {what}is no parameter's path prefix; the "
                f"top-level groups are {', '.join(top)}."
            )
        members = _members(rule, plan)
        pieces = []
        for i in inside:
            ranges = _trainable_ranges(members[i], plan.frozen[i], plan.shapes[i])
            if ranges is None or ranges == ((0, plan.shapes[i][0]),):
                pieces.append((i, None))
            elif ranges:
                pieces.append((i, ranges))
        out[group] = pieces
    return out


def _members(rule: _spec.Rule, plan: _plan.Plan) -> tuple[_spec.FrozenBlocks, ...]:
    """Per leaf: in the group (True), not (False), or one bool per block of a stacked leaf."""
    if rule.kind != "block":
        return tuple(rule.matches(p) for p in plan.paths)
    shapes = [jax.ShapeDtypeStruct(s, jnp.float32) for s in plan.shapes]
    try:  # the spec's own checks: the selector fits a stack of blocks
        picked = _spec.FreezeSpec((rule,)).resolve_blocks(jax.tree.unflatten(plan.treedef, shapes))
    except ValueError as e:
        raise ValueError(f"group_norms: {e}") from e
    return tuple(picked.values())


def _trainable_ranges(
    member: _spec.FrozenBlocks, frozen: _spec.FrozenBlocks, shape: tuple[int, ...]
) -> tuple[tuple[int, int], ...] | None:
    """The block ranges of a leaf in a group that train; None: the whole leaf (not stacked)."""
    if isinstance(member, bool) and isinstance(frozen, bool):
        return None if member and not frozen else ()
    depth = shape[0]
    member = member if isinstance(member, tuple) else (member,) * depth
    frozen = frozen if isinstance(frozen, tuple) else (frozen,) * depth
    trains = [m and not f for m, f in zip(member, frozen, strict=True)]
    return tuple((a, b) for a, b, t in _blocks.runs(trains) if t)


def _raw_key(rng: jax.Array) -> jax.Array:
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    return jnp.asarray(rng, jnp.uint32)
