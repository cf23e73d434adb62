"""Phased training in any loop: a `FreezeSchedule` run step by step.

`Phases` turns a schedule and a function that builds the steps of a phase into
what a training loop needs at every step:

* the steps of the phase in force, each distinct phase built (and compiled)
  once;
* at a phase change, the optimizer state carried over
  (`layerfreeze.transfer_opt_state`: what stays trainable keeps its moments
  and step count; under method `zero` what is newly unfrozen starts like a
  fresh optimizer) and placed back on the mesh: in the new phase's shardings
  under sharding rules (`layerfreeze.train.sharding`), the fresh state of a
  newly unfrozen cohort created directly in its sharding; with steps that
  store frozen parameters in a `frozen_dtype`, the newly frozen ones cast
  down and the newly unfrozen ones back up, once (`TrainSteps.cast_params`);
* the metadata a checkpoint needs to resume in the right phase, and the check
  that a resumed run has the same schedule;
* whether the frozen prefix changed (for a feature cache).

>>> import jax, jax.numpy as jnp, numpy as np, optax, layerfreeze as lf
>>> from layerfreeze import train
>>> params = {"stem": {"w": jnp.ones((3, 4))}, "head": {"w": jnp.ones((4, 2))}}
>>> def loss_fn(params, batch, rng):
...     out = jnp.tanh(batch["x"] @ params["stem"]["w"]) @ params["head"]["w"]
...     return jnp.mean((out - batch["y"]) ** 2)
>>> schedule = lf.schedules.gradual_unfreezing(["stem", "head"], every=2, unit="step")
>>> phases = Phases(schedule, lambda phase, previous: train.make_steps(
...     None, optax.adam(0.1), phase.spec, params, loss_fn=loss_fn, previous=previous),
...     params=params)
>>> state = phases.init_state(params, jax.random.key(0))
>>> batch = {"x": np.ones((4, 3), np.float32), "y": np.zeros((4, 2), np.float32)}
>>> for step in range(4):
...     steps, state, change = phases.update(step, state)
...     state, metrics = steps.train_step(state, batch)
...     if change:
...         print(change.describe())
step 2: phase 1 (step 2: freeze none), trainable params 8 -> 20
>>> phases.metadata()["phase"], phases.compilations
(1, 2)
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from layerfreeze import _batchnorm, _checks, _freeze, _nnx, _plan, _spec, _transfer, schedules
from layerfreeze.train import sharding as _sharding

__all__ = ["PhaseChange", "Phases"]

Build = Callable[[schedules.Phase, tuple[_spec.FreezeSpec, ...]], Any]


@dataclasses.dataclass(frozen=True)
class PhaseChange:
    """What happened at a phase change.

    Attributes:
      step: the global step at which the new phase starts.
      index: the new phase's index.
      previous_index: the index of the phase before.
      phase: the new phase.
      unit: the schedule's unit, `"epoch"` or `"step"`.
      trainable_before: trainable parameters before the change.
      trainable_after: trainable parameters after it.
      prefix_before: the frozen prefix's last group before (None: no prefix).
      prefix_after: the frozen prefix's last group after.
    """

    step: int
    index: int
    previous_index: int
    phase: schedules.Phase
    unit: str
    trainable_before: int
    trainable_after: int
    prefix_before: str | None
    prefix_after: str | None

    @property
    def prefix_changed(self) -> bool:
        """Whether the frozen prefix changed: a feature cache must be recomputed."""
        return self.prefix_before != self.prefix_after

    def describe(self) -> str:
        """One line, e.g. `step 40: phase 1 (epoch 2: freeze none), trainable params ...`."""
        return (
            f"step {self.step}: phase {self.index} ({self.phase.describe(self.unit)}), "
            f"trainable params {self.trainable_before:,} -> {self.trainable_after:,}"
        )


class Phases:
    """Runs a `FreezeSchedule` in a training loop: call `update` once per step.

    Args:
      schedule: the schedule; its phases' specs are what the steps freeze.
      build: `(phase, previous_specs) -> steps`: builds the steps of a phase,
        e.g. `train.make_steps(model, optimizer, phase.spec, params,
        previous=previous_specs)`. The result has a `tx` (the frozen-aware
        optimizer) and a `trainable_params` count, like `train.TrainSteps`;
        an `optax.GradientTransformation` alone is accepted too (for a loop
        with a step of its own). Pass `previous_specs` on to
        `layerfreeze.freeze`, so that newly unfrozen leaves start like a
        fresh optimizer under method `zero`.
      params: the parameters (or their shapes; an NNX model stands for its
        `nnx.Param`s), to resolve specs and count parameters.
      steps_per_epoch: how many steps an epoch has, when the schedule counts
        epochs. Required then.
      method: the freeze method `build` uses (`"zero"` or `"lr0"`): under
        `zero`, two phases with the same spec but different unfreezing
        histories are built separately.
      mesh: place the optimizer state carried over at a change on this mesh:
        in the shardings of the new phase's steps when they have them
        (`train.make_steps(..., mesh=mesh, sharding_rules=rules)`; then
        `mesh` may be left out), else by `sharding_rules`, else replicated
        (as `train.make_steps(..., mesh=mesh)` expects).
      sharding_rules: for a `build` that returns a bare optimizer: the rules
        (`layerfreeze.train.sharding`) its state follows on `mesh`.
      prefix_groups: groups in order from the input, after which a model can
        start from cached features (a ResNet: `models.GROUPS[:-1]`); enables
        `PhaseChange.prefix_changed` and `frozen_prefix`.

    Raises:
      ValueError: a phase's spec does not fit `params` (a rule matches no
        parameter), or the schedule counts epochs and `steps_per_epoch` is
        missing or below 1.
      TypeError: `schedule` is no `FreezeSchedule`, `build` is not callable,
        `params` is no parameter pytree, `steps_per_epoch` is no integer, or
        `prefix_groups` is no sequence of group names.
    """

    def __init__(
        self,
        schedule: schedules.FreezeSchedule,
        build: Build,
        *,
        params: Any,
        steps_per_epoch: int | None = None,
        method: _freeze.Method = "zero",
        mesh: Mesh | None = None,
        sharding_rules: _sharding.Rules | None = None,
        prefix_groups: Sequence[str] | None = None,
    ):
        if not isinstance(schedule, schedules.FreezeSchedule):
            raise TypeError(
                f"Phases takes a layerfreeze.schedules.FreezeSchedule, got "
                f"{type(schedule).__name__}; build one with layerfreeze.schedules."
                "parse_schedule, gradual_unfreezing, fine_tune, ..."
            )
        _check_build(build)
        _freeze.check_method(method)
        if schedule.unit == "epoch" and steps_per_epoch is None:
            raise ValueError(
                "This schedule counts epochs: pass steps_per_epoch (steps in one epoch)."
            )
        if steps_per_epoch is not None:
            steps_per_epoch = _checks.count("steps_per_epoch", steps_per_epoch)
            if steps_per_epoch < 1:
                raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch!r}.")
        if prefix_groups is not None:
            prefix_groups = _checks.groups(prefix_groups, "prefix_groups", empty=True)
        if sharding_rules is not None:
            if mesh is None:
                raise ValueError("Phases: sharding_rules need the mesh they shard over.")
            _sharding.check_rules(sharding_rules, mesh)
        self.schedule = schedule
        self.build = build
        # An NNX model's BatchNorm layers are named by type in its specs, as
        # make_steps does, so both resolve the same spec.
        self._bn_modules = (
            _batchnorm.batchnorm_modules(params) if isinstance(params, nnx.Module) else ()
        )
        self.params = _nnx.as_params(params)
        self.steps_per_epoch = steps_per_epoch
        self.method = method
        self.mesh = mesh
        self.sharding_rules = sharding_rules
        self.prefix_groups = prefix_groups
        for index in range(len(schedule.phases)):  # every spec must fit, before any work
            self.plan(index)
        self._cache: dict[Any, Any] = {}
        self._keys: dict[int, Any] = {}  # phase index -> build key, computed once
        self.current = self.index_at(0)

    # Where we are ------------------------------------------------------------

    def index_at(self, step: int) -> int:
        """The index of the phase in force at global step `step`."""
        unit_value = step // self.steps_per_epoch if self.schedule.unit == "epoch" else step
        return self.schedule.phase_index(unit_value)

    @property
    def total_steps(self) -> int | None:
        """The run's length in steps when the schedule fixes it (`fine_tune`), else None."""
        total = self.schedule.total
        if total is None:
            return None
        return total * self.steps_per_epoch if self.schedule.unit == "epoch" else total

    @property
    def compilations(self) -> int:
        """How many distinct phases have been built."""
        return len(self._cache)

    def frozen_prefix(self, index: int | None = None) -> str | None:
        """The last group of phase `index`'s frozen prefix (see `features.frozen_prefix`)."""
        if self.prefix_groups is None:
            return None
        from layerfreeze.train import features  # features imports models; keep this import light

        return features.frozen_prefix(self.params, self.plan(index), self.prefix_groups)

    def extend(self, schedule: schedules.FreezeSchedule) -> None:
        """Adopts a schedule that keeps every phase of the current one and adds later ones.

        For adaptive policies (`layerfreeze.auto.AutoFreeze`): a decision made
        during training appends a phase, and the loop hands the longer
        schedule over before the next `update`. What was built stays built.

        Raises:
          ValueError: `schedule` changes or drops a phase of the current
            schedule, counts another unit, or a new phase's spec does not fit
            the params.
        """
        if not isinstance(schedule, schedules.FreezeSchedule):
            raise TypeError(f"extend takes a FreezeSchedule, got {type(schedule).__name__}.")
        old = self.schedule.phases
        if schedule.unit != self.schedule.unit or schedule.phases[: len(old)] != old:
            raise ValueError(
                "extend takes a schedule that keeps every phase of the current one; current "
                f"{self.schedule.describe()!r}, given {schedule.describe()!r}."
            )
        self.schedule, before = schedule, self.schedule
        try:
            for index in range(len(old), len(schedule.phases)):
                self.plan(index)
        except ValueError:
            self.schedule = before
            raise

    # Steps ---------------------------------------------------------------------

    def plan(self, index: int | None = None) -> _plan.Plan:
        """Phase `index`'s spec resolved against the params (`layerfreeze.plan`), with its history.

        The plan `build`'s `make_steps(..., phase.spec, params, previous=previous)`
        gets for the same phase: the spec is resolved once.
        """
        index = self.current if index is None else index
        spec = _batchnorm.with_bn_modules(self.schedule.phases[index].spec, self._bn_modules)
        previous = self.schedule.previous_specs(index)
        return _plan.plan(self.params, spec, previous=previous, method=self.method)

    def steps(self, index: int | None = None) -> Any:
        """The steps of phase `index` (default: the current one), built once."""
        index = self.current if index is None else index
        key = self._key(index)
        if key not in self._cache:
            self._cache[key] = self.build(
                self.schedule.phases[index], self.schedule.previous_specs(index)
            )
        return self._cache[key]

    def tx(self, index: int | None = None) -> optax.GradientTransformation:
        """The frozen-aware optimizer of phase `index`."""
        steps = self.steps(index)
        return steps if isinstance(steps, optax.GradientTransformation) else steps.tx

    def _key(self, index: int) -> Any:
        if index not in self._keys:
            self._keys[index] = self._compute_key(index)
        return self._keys[index]

    def _compute_key(self, index: int) -> Any:
        phase = self.schedule.phases[index]
        cohorts: Any = ()
        if self.method == "zero":
            cohorts = tuple(self.plan(index).since().items())
        return (phase.spec, phase.lr_multipliers, cohorts)

    def _trainable(self, steps: Any, index: int) -> int:
        count = getattr(steps, "trainable_params", None)  # a bare optimizer has none
        return self.plan(index).trainable_params if count is None else int(count)

    def init_state(self, variables: Any, rng: jax.Array, *, step: int = 0) -> Any:
        """A fresh state in the phase in force at `step` (`steps.init_state`)."""
        self.current = self.index_at(step)
        return self.steps().init_state(variables, rng)

    # The loop ----------------------------------------------------------------

    def update(self, step: int, state: Any) -> tuple[Any, Any, PhaseChange | None]:
        """Call before each train step: `steps, state, change = phases.update(step, state)`.

        At a phase change the new phase's steps are built (once) and the
        optimizer state is carried over into the new optimizer.

        Args:
          step: the global step about to be taken (0-based).
          state: anything with `params` and `opt_state` fields and a `replace`
            method (`train.TrainState`, `flax.training.train_state.TrainState`,
            whose `tx` is replaced too).

        Returns:
          `(steps, state, change)`: the current phase's steps, the state (with
          the carried-over optimizer state after a change, and the params in
          the new phase's dtypes when its steps have a `frozen_dtype`), and a
          `PhaseChange` or None.

        Raises:
          TypeError: `step` is no integer or `state` no train state.
          ValueError: `step` is negative.
        """
        step = _checks.count("Phases.update: step", step)
        _check_state(state)
        wanted = self.index_at(step)
        if wanted == self.current:
            return self.steps(), state, None
        before_steps, before_index = self.steps(), self.current
        prefix_before = self.frozen_prefix(before_index)
        new_tx = self.tx(wanted)
        new_steps = self.steps(wanted)
        shardings = getattr(new_steps, "shardings", None)
        # Steps with a frozen_dtype store newly frozen leaves down in it and newly
        # unfrozen ones back up, before any optimizer state is made for them.
        cast = getattr(new_steps, "cast_params", None)
        params = state.params if cast is None else cast(state.params)
        opt_state = self.transfer(
            state.opt_state,
            new_tx,
            params,
            shardings=None if shardings is None else shardings.opt_state,
        )
        fields = {"opt_state": opt_state}
        if params is not state.params:
            fields["params"] = params
        if hasattr(state, "tx"):
            fields["tx"] = new_tx
        state = state.replace(**fields)
        self.current = wanted
        change = PhaseChange(
            step=step,
            index=wanted,
            previous_index=before_index,
            phase=self.schedule.phases[wanted],
            unit=self.schedule.unit,
            trainable_before=self._trainable(before_steps, before_index),
            trainable_after=self._trainable(self.steps(), wanted),
            prefix_before=prefix_before,
            prefix_after=self.frozen_prefix(wanted),
        )
        return self.steps(), state, change

    def transfer(
        self,
        opt_state: Any,
        new_tx: optax.GradientTransformation,
        params: Any,
        *,
        shardings: Any = None,
    ) -> Any:
        """The old optimizer state carried into `new_tx`'s, placed on the mesh if any.

        Args:
          opt_state: the state before the change.
          new_tx: the new phase's optimizer.
          params: the parameters.
          shardings: the new state's shardings (default: by `sharding_rules`
            on `mesh` if given, else replicated on `mesh`, else as it comes).
        """
        if shardings is None and self.sharding_rules is not None:
            param_shardings = _sharding.param_shardings(self.mesh, params, self.sharding_rules)
            shardings = _sharding.opt_state_shardings(new_tx, params, param_shardings)
        if shardings is None:
            new_state = _transfer.transfer_opt_state(opt_state, new_tx.init(params))
            if self.mesh is not None:
                new_state = jax.device_put(new_state, NamedSharding(self.mesh, P()))
            return new_state
        # Fresh state (a newly unfrozen cohort's) is made in its sharding; what
        # carries over moves only where the new phase splits it otherwise.
        fresh = jax.jit(new_tx.init, out_shardings=shardings)(params)
        return jax.device_put(_transfer.transfer_opt_state(opt_state, fresh), shardings)

    # Checkpoints ---------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """What a checkpoint needs to resume in the right phase (JSON-serialisable)."""
        return {
            "phase": self.current,
            "spec": self.schedule.phases[self.current].spec.describe(),
            "method": self.method,
            "schedule": self.schedule.describe(),
        }

    def restore(self, metadata: Mapping[str, Any]) -> int:
        """Resumes in the phase a checkpoint was saved in; returns its index.

        Build the restore target with `phases.steps().init_state(...)` after
        this call: its optimizer state has that phase's structure.

        Raises:
          layerfreeze.schedules.ResumeMismatchError: the checkpoint's phase,
            spec, method or schedule
            differ from this run's; the message names both and says how to
            start afresh.
        """
        saved = {k: metadata.get(k) for k in ("phase", "spec", "method", "schedule")}
        index = saved["phase"]
        if not isinstance(index, int) or not 0 <= index < len(self.schedule.phases):
            raise schedules.ResumeMismatchError(
                f"The checkpoint was saved in phase {index!r}, but this schedule has phases "
                f"0..{len(self.schedule.phases) - 1}. {_FRESH}"
            )
        mine = {
            "spec": self.schedule.phases[index].spec.describe(),
            "method": self.method,
            "schedule": self.schedule.describe(),
        }
        differ = [
            f"{k}: checkpoint {saved[k]!r}, this run {mine[k]!r}"
            for k in mine
            if saved[k] is not None and saved[k] != mine[k]
        ]
        if differ:
            raise schedules.ResumeMismatchError(
                f"Cannot resume: the checkpoint (phase {index}) was saved with other settings "
                f"({'; '.join(differ)}). {_FRESH}"
            )
        self.current = index
        return index


def _check_build(build: Any) -> None:
    if callable(build):
        return
    usage = (
        "build must be a function (phase, previous_specs) -> steps, e.g. lambda phase, "
        "previous: train.make_steps(model, optimizer, phase.spec, params, previous=previous)"
    )
    if isinstance(build, optax.GradientTransformation):
        raise TypeError(
            f"{usage}; got an optax optimizer. For a loop with a step of its own: lambda "
            "phase, previous: layerfreeze.freeze(optimizer, phase.spec, previous=previous)."
        )
    raise TypeError(f"{usage}; got {_checks.given(build)}.")


def _check_state(state: Any) -> None:
    missing = [a for a in ("params", "opt_state", "replace") if not hasattr(state, a)]
    if missing:
        raise TypeError(
            "Phases.update takes the train state: anything with params and opt_state fields "
            "and a replace method (train.TrainState, flax.training.train_state.TrainState), "
            f"e.g. from phases.init_state(...); got {_checks.given(state)}, which has no "
            f"{', '.join(missing)}."
        )


_FRESH = "Resume with the settings it was saved with, or start a fresh run in another workdir."
