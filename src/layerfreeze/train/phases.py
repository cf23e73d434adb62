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
* whether the frozen prefix changed (for a feature cache);
* optionally, the phases to come compiled ahead on a background thread
  (`compile_ahead=True`), so that a change costs about one step.

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

Compiled ahead, the change compiles nothing (`platform.CompileCounter` counts
what JAX compiles):

>>> from layerfreeze.train import platform
>>> ahead = Phases(schedule, phases.build, params=params, compile_ahead=True)
>>> state = ahead.init_state(params, jax.random.key(0))
>>> for step in range(2):
...     steps, state, _ = ahead.update(step, state)
...     state, metrics = steps.train_step(state, batch)
>>> ahead.wait_ahead()  # phase 1's step, compiled on the background thread meanwhile
True
>>> with platform.CompileCounter() as counter:
...     steps, state, change = ahead.update(2, state)
...     state, metrics = steps.train_step(state, batch)
>>> change.index, counter.requests
(1, 0)
>>> ahead.close()
"""

import concurrent.futures
import dataclasses
import functools
import logging
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from layerfreeze import _batchnorm, _checks, _freeze, _nnx, _plan, _spec, _transfer, schedules
from layerfreeze.train import _ahead, _steps
from layerfreeze.train import sharding as _sharding

__all__ = ["PhaseChange", "Phases"]

Build = Callable[[schedules.Phase, tuple[_spec.FreezeSpec, ...]], Any]

_log = logging.getLogger(__name__)


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
      compile_ahead: compile the phases to come while the current one trains
        (see "Compiling ahead" below). Off by default.
      feature_cache: the run's `features.FeatureCache`, with `prefix_groups`:
        compiling ahead then covers the phases whose frozen prefix differs
        from the current one's too: their train step against the cached
        features they will get (`FeatureCache.batch_like`, in the batch's
        `"image"`), and the program computing those features
        (`FeatureCache.compile_job`).
      warm_up: with `compile_ahead`, run each program compiled ahead for the
        change (the train step, the params' cast, `tx.init`, the carrying of
        a stacked leaf's rows, the cached features') once, on zeros, right
        after its compile: XLA's CPU runtime prepares an executable's library
        kernels in its first run, which took 2-5x a later run
        (`benchmarks/first_run.py`), and the change would pay it. None (the
        default): for the programs that run on CPU devices. It costs one
        step's work on the background thread and, while it runs, a second
        copy of the state (zeros); a host callback in the loss sees the
        zeros. Never for a program spanning several processes.

    Compiling ahead: with `compile_ahead=True`, once a phase's train step (and
    eval step) has run, the phases that can be foreseen are built (`build`, on
    the calling thread) and their steps lowered and compiled on a background
    thread against the abstract state each phase will get (the current state's
    shapes and shardings, the params in the phase's dtypes when its steps have a
    `frozen_dtype`, with the optimizer state that `tx.init` gives the phase,
    placed as `update` places it) and the batch just seen: every later phase of
    the schedule, and the phases of a schedule given to `foresee` (an
    `AutoFreeze` guess). At the change the step runs the program compiled ahead
    (the executable `jax.jit` would build there, so bitwise the same step), the
    params' casts and the fresh part of the optimizer state come from programs
    compiled ahead too, and the change costs about one ordinary step; a compile
    still in flight is waited for, one not begun is dropped (the step compiles
    as usual). A step called with another signature (a batch of other shapes)
    compiles as usual, with a logged note; with `prefix_groups`, the train step
    of a phase whose frozen prefix differs from the current one's is compiled
    ahead only given the `feature_cache` (its batches will be other cached
    features), and the eval step (on images) either way. The compiles queued
    by a phase's first step start once that step has run; when a change is
    due at the next step (a `foresee` right after an `extend`), only its own
    phase is queued before it, the rest by its first step. On the CPU each
    program compiled ahead runs once on zeros (`warm_up`). An error raised
    while building a phase ahead is raised where building it would raise it
    (`update`, at the change); one raised while lowering or compiling its step is raised by the
    step's first call at the change when that call has the arguments compiled
    for (the error compiling there would raise), with a note and the background
    thread's traceback. One background thread serves the whole process: a
    compile competes with the train step for the CPU (`benchmarks/RESULTS.md`).
    Steps are compiled ahead when `build` returns `train.TrainSteps` (or another
    dataclass of jitted `train_step`/`eval_step`); a bare optimizer is used as
    it is. The phases share `make_steps`' eval step (`train.EvalStep`) when
    `build` passes the same model, loss and eval options to each: it is
    compiled once per signature, not once per phase. `close()` cancels the
    compiles not begun; `wait_ahead()` waits for them. With several processes,
    each compiles ahead on its own timing: which programs it compiles in the
    background, and whether a change waits for one or compiles at the change,
    can differ between processes, and XLA may compile
    a program of several processes together (on GPUs they share its autotuning).
    The experiment turns it off there.

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
        compile_ahead: bool = False,
        feature_cache: Any = None,
        warm_up: bool | None = None,
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
        if feature_cache is not None:
            if prefix_groups is None:
                raise ValueError(
                    "Phases: feature_cache needs prefix_groups (the groups after which the "
                    "model can start from cached features, e.g. models.GROUPS[:-1])."
                )
            if not all(hasattr(feature_cache, a) for a in ("batch_like", "compile_job")):
                raise TypeError(
                    "Phases: feature_cache takes a layerfreeze.train.features.FeatureCache, "
                    f"got {_checks.given(feature_cache)}."
                )
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
        self.feature_cache = feature_cache
        for index in range(len(schedule.phases)):  # every spec must fit, before any work
            self.plan(index)
        self._cache: dict[Any, Any] = {}
        # make_steps' eval steps (shared by phases that evaluate alike), compiling ahead.
        self._evals: dict[_steps.EvalStep, _steps.EvalStep] = {}
        self._keys: dict[int, Any] = {}  # phase index -> build key, computed once
        self.current = self.index_at(0)
        self.compile_ahead = _checks.flag("Phases: compile_ahead", compile_ahead)
        if warm_up is not None:
            warm_up = _checks.flag("Phases: warm_up", warm_up)
        self.warm_up = warm_up
        # Compiling ahead, per build key: steps built before their phase began,
        # the error their build raised, the compiles queued or done, and what
        # the change runs before the step (the params' cast, `tx.init`) compiled.
        self._ahead_steps: dict[Any, Any] = {}
        self._ahead_errors: dict[Any, BaseException] = {}
        self._jobs: dict[Any, list[concurrent.futures.Future]] = {}
        # Eval-step compiles, which a change does not wait for; once their phase has
        # begun, those not done are kept here (its first evaluation may find them done).
        self._eval_jobs: set[concurrent.futures.Future] = set()
        self._begun: list[concurrent.futures.Future] = []
        self._starts: dict[Any, _Start] = {}
        self._submitted: set[tuple[Any, str, Any]] = set()  # (key, step name, base signature)
        # Step name -> abstract args of its first call in the latest phase (of a shared
        # eval step: its first call in the run).
        self._seen: dict[str, tuple[Any, ...]] = {}
        self._seen_prefix: str | None = None  # the frozen prefix of the phase they come from
        self._foreseen: schedules.FreezeSchedule | None = None
        self._kept: list[Any] = []  # build keys of earlier guesses, compiled, kept
        self._first_outputs: Any = None  # of the step whose first call queues compiles
        self._last_step: int | None = None  # the step last given to `update`

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
        return self._prefix_in(self.schedule, self.current if index is None else index)

    def _prefix_in(self, schedule: schedules.FreezeSchedule, index: int) -> str | None:
        if self.prefix_groups is None:
            return None
        from layerfreeze.train import features  # features imports models; keep this import light

        return features.frozen_prefix(
            self.params, self._plan_in(schedule, index), self.prefix_groups
        )

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
        self._check_extension(schedule, "extend")
        old = self.schedule.phases
        self.schedule, before = schedule, self.schedule
        try:
            for index in range(len(old), len(schedule.phases)):
                self.plan(index)
        except ValueError:
            self.schedule = before
            raise
        if self._foreseen is not None and not _extends(self._foreseen, schedule):
            self._foreseen = None  # a guess that did not come true
        if len(schedule.phases) > len(old):
            self._kept.clear()  # guesses of this decision: its phase, if one, is upcoming
        self._prune()
        self._schedule_ahead()

    def foresee(self, schedule: schedules.FreezeSchedule | None) -> None:
        """Names phases that may come, to be compiled ahead speculatively.

        `schedule` keeps every phase of the current schedule and adds the
        phases that might follow, e.g. `AutoFreeze.candidate_schedule()`: what
        the next decision is likeliest to freeze. With `compile_ahead`, their
        steps are built and compiled in the background. If `extend` later adopts a phase with
        the same spec, history and learning-rate multipliers (its start may
        differ), its steps are those compiled ahead. A guess replaced by
        another is kept if its compiles have ended (the last three), since
        guesses come back: the next decision may still adopt it. What
        `extend` does not adopt is discarded there. None withdraws the
        guess. Without `compile_ahead` this only checks.

        Raises:
          ValueError: `schedule` changes or drops a phase of the current
            schedule, counts another unit, or a new phase's spec does not fit
            the params.
        """
        if schedule == self._foreseen:
            return
        if schedule is not None:
            self._check_extension(schedule, "foresee")
            for index in range(len(self.schedule.phases), len(schedule.phases)):
                self._plan_in(schedule, index)
        self._keep_guess()
        self._foreseen = schedule
        self._prune()
        self._schedule_ahead()

    def _keep_guess(self) -> None:
        """Keeps the phases of the guess being replaced whose compiles have all ended."""
        guess = self._foreseen
        if guess is None or not self.compile_ahead:
            return
        for index in range(len(self.schedule.phases), len(guess.phases)):
            key = self._key_in(guess, index)
            jobs = self._jobs.get(key)
            if key in self._ahead_steps and jobs and all(f.done() for f in jobs):
                others = [k for k in self._kept if k != key]
                self._kept = [*others[len(others) + 1 - _KEPT_GUESSES :], key]

    def _check_extension(self, schedule: Any, what: str) -> None:
        if not isinstance(schedule, schedules.FreezeSchedule):
            raise TypeError(f"{what} takes a FreezeSchedule, got {type(schedule).__name__}.")
        if not _extends(schedule, self.schedule):
            raise ValueError(
                f"{what} takes a schedule that keeps every phase of the current one; current "
                f"{self.schedule.describe()!r}, given {schedule.describe()!r}."
            )

    # Steps ---------------------------------------------------------------------

    def plan(self, index: int | None = None) -> _plan.Plan:
        """Phase `index`'s spec resolved against the params (`layerfreeze.plan`), with its history.

        The plan `build`'s `make_steps(..., phase.spec, params, previous=previous)`
        gets for the same phase: the spec is resolved once.
        """
        return self._plan_in(self.schedule, self.current if index is None else index)

    def _plan_in(self, schedule: schedules.FreezeSchedule, index: int) -> _plan.Plan:
        spec = _batchnorm.with_bn_modules(schedule.phases[index].spec, self._bn_modules)
        previous = schedule.previous_specs(index)
        return _plan.plan(self.params, spec, previous=previous, method=self.method)

    def steps(self, index: int | None = None) -> Any:
        """The steps of phase `index` (default: the current one), built once."""
        index = self.current if index is None else index
        key = self._key(index)
        if key not in self._cache:
            if key in self._ahead_errors:  # raised where building it would have raised it
                raise _noted(self._ahead_errors.pop(key), index, "building")
            steps = self._ahead_steps.pop(key, None)
            if steps is None:
                steps = self._build(self.schedule, index)
            self._cache[key] = steps
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
        return self._key_in(self.schedule, index)

    def _key_in(self, schedule: schedules.FreezeSchedule, index: int) -> Any:
        phase = schedule.phases[index]
        cohorts: Any = ()
        if self.method == "zero":
            cohorts = tuple(self._plan_in(schedule, index).since().items())
        return (phase.spec, phase.lr_multipliers, cohorts)

    def _build(self, schedule: schedules.FreezeSchedule, index: int) -> Any:
        steps = self.build(schedule.phases[index], schedule.previous_specs(index))
        if not self.compile_ahead or not dataclasses.is_dataclass(steps):
            return steps
        ref = weakref.ref(self)
        wrapped = {}
        for name in _STEP_NAMES:
            fn = getattr(steps, name, None)
            if isinstance(fn, _steps.EvalStep):  # shared by phases: one AheadFn for all
                if fn not in self._evals:
                    ahead = _ahead.AheadFn(fn.jitted, functools.partial(_first_call, ref, name))
                    self._evals[fn] = _steps.EvalStep(ahead)
                wrapped[name] = self._evals[fn]
            elif hasattr(fn, "lower"):
                wrapped[name] = _ahead.AheadFn(fn, functools.partial(_first_call, ref, name))
        return dataclasses.replace(steps, **wrapped) if wrapped else steps

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
        self._last_step = step
        wanted = self.index_at(step)
        if wanted == self.current:
            return self.steps(), state, None
        before_steps, before_index = self.steps(), self.current
        prefix_before = self.frozen_prefix(before_index)
        new_tx = self.tx(wanted)
        key = self._key(wanted)
        self._settle(key)
        new_steps = self.steps(wanted)
        shardings = getattr(new_steps, "shardings", None)
        # Steps with a frozen_dtype store newly frozen leaves down in it and newly
        # unfrozen ones back up, before any optimizer state is made for them.
        params = self._cast(key, new_steps, state.params)
        opt_state = self._transfer(
            state.opt_state,
            new_tx,
            params,
            None if shardings is None else shardings.opt_state,
            self._starts.get(key),
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
        self._prune()
        train_step = getattr(self.steps(), "train_step", None)
        if not isinstance(train_step, _ahead.AheadFn) or train_step.called:
            self._schedule_ahead()  # no first call will queue what waited for this change
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
        return self._transfer(opt_state, new_tx, params, shardings, None)

    def _transfer(
        self,
        opt_state: Any,
        new_tx: optax.GradientTransformation,
        params: Any,
        shardings: Any,
        start: "_Start | None",
    ) -> Any:
        """`transfer`, with `new_tx.init` compiled ahead (`start.init`) when it fits `params`."""
        if shardings is None and self.sharding_rules is not None:
            shardings = self._rule_shardings(new_tx, params)
        if start is not None and start.taken == _ahead.signature(params):
            # The fresh state comes out of the program in its shardings already, and
            # a stacked leaf's pieces out of one program when it fits the old state.
            fresh = start.init(params)
            if start.pieces is not None and start.pieces[0] == _ahead.signature(opt_state):
                new_state = _transfer.carry(opt_state, fresh, start.pieces[1])
            else:
                new_state = _transfer.transfer_opt_state(opt_state, fresh)
            target = shardings if shardings is not None else self._replicated()
            return new_state if target is None else jax.device_put(new_state, target)
        if shardings is None:
            new_state = _transfer.transfer_opt_state(opt_state, new_tx.init(params))
            if self.mesh is not None:
                new_state = jax.device_put(new_state, NamedSharding(self.mesh, P()))
            return new_state
        # Fresh state (a newly unfrozen cohort's) is made in its sharding; what
        # carries over moves only where the new phase splits it otherwise.
        fresh = jax.jit(new_tx.init, out_shardings=shardings)(params)
        return jax.device_put(_transfer.transfer_opt_state(opt_state, fresh), shardings)

    def _cast(self, key: Any, steps: Any, params: Any) -> Any:
        """`steps.cast_params(params)` (a `frozen_dtype`'s casts), by the program
        compiled ahead for these params if there is one: a cast at the change
        would compile (one program per leaf shape) there."""
        cast = getattr(steps, "cast_params", None)
        if cast is None:
            return params
        start = self._starts.get(key)
        if start is None or start.given != _ahead.signature(params):
            return cast(params)
        if start.cast is None:  # no leaf changes its dtype
            return params
        which, program = start.cast
        leaves, treedef = jax.tree.flatten(params)
        for i, x in zip(which, program(tuple(leaves[i] for i in which)), strict=True):
            leaves[i] = x
        return jax.tree.unflatten(treedef, leaves)

    def _rule_shardings(self, new_tx: optax.GradientTransformation, params: Any) -> Any:
        param_shardings = _sharding.param_shardings(self.mesh, params, self.sharding_rules)
        return _sharding.opt_state_shardings(new_tx, params, param_shardings)

    def _replicated(self) -> NamedSharding | None:
        return None if self.mesh is None else NamedSharding(self.mesh, P())

    # Compiling ahead -------------------------------------------------------------

    def wait_ahead(self, timeout: float | None = None) -> bool:
        """Waits for the compiles queued ahead (at most `timeout` seconds).

        Returns:
          True when none is left pending (failed ones included: their errors
          are raised at their phase's change).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        for future in self._futures():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            _ahead.wait(future, left)
        return all(f.done() for f in self._futures())

    def _futures(self) -> list[concurrent.futures.Future]:
        """Every compile queued ahead: of the phases to come, and the eval steps left going."""
        return [*(f for jobs in list(self._jobs.values()) for f in jobs), *self._begun]

    def close(self, *, wait: bool = False) -> None:
        """Stops compiling ahead: cancels the compiles not begun, drops what was built ahead.

        A compile in flight cannot be stopped: with `wait`, this waits for it
        to end (so that it does not compete with what runs next); its program
        is dropped either way. The phases stay usable, compiling at each change.
        """
        futures = self._futures()
        for future in self._begun:
            future.cancel()
        self._begun.clear()
        self.compile_ahead = False
        self._foreseen = None
        self._prune()
        self._seen.clear()
        if wait:
            for future in futures:
                _ahead.wait(future)

    def _record(self, name: str, args: tuple[Any, ...], outputs: Any = None) -> None:
        """A step's first call in a phase: what the next phases' programs take.

        The compiles it queues start once the step's `outputs` are computed:
        the first step of a phase (the change) runs with nothing beside it.
        """
        self._seen[name] = args
        self._seen_prefix = self.frozen_prefix(self.current)
        self._first_outputs = outputs
        try:
            self._schedule_ahead()
        finally:
            self._first_outputs = None

    def _upcoming(self) -> Iterator[tuple[schedules.FreezeSchedule, int]]:
        """`(schedule, index)` of the phases after the current one, the foreseen last."""
        for index in range(self.current + 1, len(self.schedule.phases)):
            yield self.schedule, index
        if self._foreseen is not None:
            for index in range(len(self.schedule.phases), len(self._foreseen.phases)):
                yield self._foreseen, index

    def _upcoming_key(self, schedule: schedules.FreezeSchedule, index: int) -> Any:
        return self._key(index) if schedule is self.schedule else self._key_in(schedule, index)

    def _schedule_ahead(self) -> None:
        """Builds the foreseeable phases and queues the compiles of their steps."""
        if not self.compile_ahead or not self._seen:
            return
        # A change at the next step (an `extend`ed decision): only its own phase is
        # queued now; the rest waits for its first step, whose first call queues it.
        coming = None
        if self._first_outputs is None and self._last_step is not None:
            coming = self.index_at(self._last_step + 1)
            coming = None if coming == self.current else coming
        for schedule, index in self._upcoming():
            if coming is not None and (schedule is not self.schedule or index != coming):
                continue
            key = self._upcoming_key(schedule, index)
            prefix = self._seen_prefix
            if self.prefix_groups is not None:
                prefix = self._prefix_in(schedule, index)
            if prefix != self._seen_prefix:  # its train batches: other cached features
                self._queue_features(key, index, prefix)
            for name, args in list(self._seen.items()):
                features = None  # the train batch's other features, found on the worker
                if name == "train_step" and prefix != self._seen_prefix:
                    if self.feature_cache is None:
                        continue  # of shapes not seen yet
                    features = functools.partial(self.feature_cache.batch_like, prefix)
                base = _ahead.signature((args[0].replace(opt_state=None), *args[1:]))
                if (key, name, base) in self._submitted or key in self._ahead_errors:
                    continue
                steps = self._cache.get(key, self._ahead_steps.get(key))
                if steps is None:
                    try:
                        steps = self._ahead_steps[key] = self._build(schedule, index)
                    except Exception as e:  # raised at the change, as without compiling ahead
                        self._ahead_errors[key] = e
                        continue
                fn = _ahead_fn(steps, name)
                # A bare optimizer, or a phase that ran (and compiled) already; an eval
                # step shared by phases compiles once per signature (`_compile`).
                if fn is None or (fn.called and not _shared_eval(steps, name)):
                    continue
                self._submitted.add((key, name, base))
                # The optimizer state it will carry over: its phase before's, if foreseen.
                before = (
                    None if index - 1 <= self.current else self._upcoming_key(schedule, index - 1)
                )
                job = functools.partial(
                    self._compile, key, index, steps, name, args, features, before
                )
                # Train steps before eval steps (an eval comes later, and a change waits for
                # a compile in flight), the next phase first.
                priority = (_STEP_NAMES.index(name), index, 0)
                future = _ahead.submit(priority, self._after(job))
                self._jobs.setdefault(key, []).append(future)
                if name == "eval_step":
                    self._eval_jobs.add(future)
                elif self.warm_up is not False:
                    # Right after the compile, before the next phase's: its first run.
                    warm = functools.partial(self._warm, key, future)
                    warmed = _ahead.submit((*priority[:2], 1), self._after(warm))
                    self._jobs[key].append(warmed)

    def _queue_features(self, key: Any, index: int, prefix: str | None) -> None:
        """Queues the program computing the features after `prefix` (`feature_cache`'s)."""
        if self.feature_cache is None or (key, "features", prefix) in self._submitted:
            return
        compile_features = self.feature_cache.compile_job(prefix)
        if compile_features is None:
            return

        def job() -> None:
            program = compile_features()
            if self.warm_up is not False and program is not None:
                self._run_once([program], key)

        self._submitted.add((key, "features", prefix))
        # Before the phase's train step: the change computes the features first.
        self._jobs.setdefault(key, []).append(_ahead.submit((0, index, -1), self._after(job)))

    def _after(self, job: Callable[[], Any]) -> Callable[[], Any]:
        """`job`, waiting first for the outputs of the step that queued it, if one did."""
        outputs = self._first_outputs
        return job if outputs is None else _ahead.after(outputs, job)

    def _compile(
        self,
        key: Any,
        index: int,
        steps: Any,
        name: str,
        args: tuple[Any, ...],
        features: Callable[[Any], Any] | None,
        before: Any = None,
    ) -> Any:
        """On the worker: `steps`' step `name` compiled for its phase's abstract arguments
        (the batch as `features` makes it, when the phase trains on other features).
        The phase is entered from the current phase, or from the phase to come with
        build key `before`, whose start, if compiled, gives the optimizer state. A
        shared eval step is compiled once per signature, for every phase.

        Returns:
          The program (a `jax.stages.Compiled`), or None when nothing was compiled.
        """
        state, *rest = args
        if features is not None:
            try:
                rest[0] = features(rest[0])
            except Exception as e:  # the step compiles at the change
                _ahead.log_skip(f"the train step of {key[0]!r}", e)
                return None
        fn = _ahead_fn(steps, name)
        start = self._starts.get(key)
        if start is not None and start.given != _ahead.signature(state.params):
            start = None
        if _shared_eval(steps, name):  # it takes the state without its optimizer state
            if start is None and getattr(steps, "frozen_dtype", None) is not None:
                return None  # the params' dtypes: known once its train step is compiled
            params = state.params if start is None else start.params
            abstract = (state.replace(params=params, opt_state=None), *rest)
        else:
            if start is None:
                previous = None if before is None else self._starts.get(before)
                if previous is not None:
                    state = state.replace(opt_state=previous.init.out_info)
                try:
                    start = self._starts[key] = self._compile_start(steps, state)
                except Exception as e:  # not the phase's own error: it compiles at the change
                    _ahead.log_skip(f"the steps of {key[0]!r}", e)
                    return None
            fields = {"params": start.params, "opt_state": start.init.out_info}
            if hasattr(state, "tx"):
                fields["tx"] = steps.tx
            abstract = (state.replace(**fields), *rest)
        if _ahead.signature(abstract) in fn.programs:
            return None  # compiled for another phase, or a phase that casts to the same
        try:
            program = fn.jitted.lower(*abstract).compile()
        except Exception as e:  # raised by the step at the change, if called with `abstract`
            fn.fail(abstract, _noted(e, index, "compiling"))
            return None
        fn.add(abstract, program)
        return program

    def _warm(self, key: Any, compiled: concurrent.futures.Future) -> None:
        """On the worker: the programs that `compiled` (a `_compile` job of a train
        step) made ready for the change, each run once on zeros (`_ahead.run_once`),
        so that the change runs none for the first time: the train step, the cast
        of the params, `tx.init` and the carrying of block pieces.

        Only with `warm_up` (by default where the programs run on CPU devices),
        and never for a program spanning several processes.
        """
        if not compiled.done() or compiled.cancelled() or compiled.exception() is not None:
            return
        program = compiled.result()
        if program is None:
            return
        programs = [program]
        start = self._starts.get(key)
        if start is not None:
            programs += [start.init]
            programs += [] if start.cast is None else [start.cast[1]]
            programs += [] if start.pieces is None else [start.pieces[1].program]
        self._run_once(programs, key)

    def _run_once(self, programs: Sequence[Any], key: Any) -> None:
        """`_ahead.run_once` of each program, if `warm_up` wants it (None: on the CPU)."""
        for program in programs:
            if self.warm_up is None and not _ahead.on_cpu(program):
                continue
            try:
                _ahead.run_once(program)
            except Exception as e:  # the change runs it first instead
                _log.info("Not warming up a program of %r: %r", key[0], e)

    def _compile_start(self, steps: Any, state: Any) -> "_Start":
        """What `update` runs at the change to `steps`' phase from abstract `state`,
        compiled: the cast of the params to the phase's dtypes (`cast_params`, as
        `update` casts them: each cast leaf in its sharding), and `steps.tx.init`
        for the cast params, its output placed as `update` places the state: by
        the new steps' shardings, the rules, on the mesh, or else where all of the
        current optimizer state is (one device, or replicated on the steps' mesh),
        which is where what carries over stays."""
        params, cast = _compile_cast(getattr(steps, "cast_params", None), state.params)
        shardings = getattr(steps, "shardings", None)
        target = None if shardings is None else shardings.opt_state
        if target is None and self.sharding_rules is not None:
            target = self._rule_shardings(steps.tx, params)
        if target is None:
            target = self._replicated()
        if target is None:
            where = {x.sharding for x in jax.tree.leaves(state.opt_state)}
            target = where.pop() if len(where) == 1 else None
        jit_kw = {} if target is None else {"out_shardings": target}
        init = jax.jit(steps.tx.init, **jit_kw).lower(params).compile()
        try:
            pieces = _transfer.compile_pieces(state.opt_state, init.out_info)
        except Exception as e:  # the change carries them eagerly instead
            _ahead.log_skip("the carrying of the optimizer state's block pieces", e)
            pieces = None
        if pieces is not None:
            pieces = (_ahead.signature(state.opt_state), pieces)
        given = _ahead.signature(state.params)
        return _Start(given, cast, params, _ahead.signature(params), init, pieces)

    def _settle(self, key: Any) -> None:
        """At a change: the compiles of the new phase done, or not to be waited for.

        A compile still queued is cancelled (the step compiles at its first
        call instead); one in flight is waited for. The eval step's compile is
        neither: the change does not need it, and it goes on in the background
        (an evaluation that comes first compiles as usual). A failure of the
        phase's own lowering or compiling is the step's to raise
        (`AheadFn.fail`); anything else that failed only means that the step
        compiles as usual.
        """
        self._begun = [f for f in self._begun if not f.done()]
        for future in self._jobs.pop(key, []):
            if future in self._eval_jobs:
                self._eval_jobs.discard(future)
                if not future.done():
                    self._begun.append(future)
                continue
            if future.cancel() or not _ahead.wait(future):
                continue
            if future.exception() is not None:
                _ahead.log_skip(f"the steps of {key[0]!r}", future.exception())

    def _prune(self) -> None:
        """Drops what was built or queued ahead for phases no longer to come."""
        wanted = set()
        if self.compile_ahead:
            wanted = {self._upcoming_key(s, i) for s, i in self._upcoming()} | set(self._kept)
        else:
            self._kept.clear()
        for key in set(self._ahead_steps) | set(self._jobs) | set(self._ahead_errors):
            if key in wanted:
                continue
            for future in self._jobs.pop(key, []):
                future.cancel()
                self._eval_jobs.discard(future)
            self._ahead_steps.pop(key, None)
            self._ahead_errors.pop(key, None)
        # The worker may add to `_starts` meanwhile: list() copies the keys in one
        # step, and pop() tolerates a key gone since.
        for key in list(self._starts):
            if key not in wanted:
                self._starts.pop(key, None)
        self._submitted = {s for s in self._submitted if s[0] in wanted}

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


_STEP_NAMES = ("train_step", "eval_step")
# Earlier guesses (`foresee`) kept compiled: on the scanned ViT, a decision adopted a
# guess made two guesses before it (`benchmarks/RESULTS.md`).
_KEPT_GUESSES = 3


class _Start(NamedTuple):
    """What the change to a phase runs before its step, compiled ahead.

    Attributes:
      given: the signature of the params it was compiled for (the phase
        before's, as the change finds them).
      cast: the params' leaves whose dtype the phase's `cast_params` changes
        (`frozen_dtype`) and the program casting them; None: none changes.
      params: the params as the phase gets them (cast), abstract.
      taken: their signature.
      init: the phase's `tx.init`, compiled for `params`.
      pieces: `(signature of the optimizer state it fits, _transfer.Pieces)`:
        the optimizer state's leaves carried over in pieces (a stacked leaf's
        whose block range changes), compiled; None: no leaf is.
    """

    given: Any
    cast: tuple[tuple[int, ...], Any] | None
    params: Any
    taken: Any
    init: Any
    pieces: tuple[Any, _transfer.Pieces] | None


def _compile_cast(cast: Callable[[Any], Any] | None, params: Any) -> tuple[Any, Any]:
    """Abstract `params` as `cast` (a `cast_params`) gives them, and the program casting
    the leaves whose dtype changes (`(their indices, program)`; None: none changes).

    Each cast leaf keeps its sharding, as `cast_params` keeps it; only those leaves
    are the program's, so the others stay the arrays they are (no copy).
    """
    if cast is None:
        return params, None
    leaves, treedef = jax.tree.flatten(params)
    dtypes = [x.dtype for x in jax.tree.leaves(jax.eval_shape(cast, params))]
    which = tuple(i for i, (x, d) in enumerate(zip(leaves, dtypes, strict=True)) if x.dtype != d)
    if not which:
        return params, None
    to = tuple(dtypes[i] for i in which)
    shardings = tuple(leaves[i].sharding for i in which)
    jit_kw = {} if None in shardings else {"out_shardings": shardings}

    def convert(xs: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(x.astype(d) for x, d in zip(xs, to, strict=True))

    program = jax.jit(convert, **jit_kw).lower(tuple(leaves[i] for i in which)).compile()
    for i, d in zip(which, to, strict=True):
        leaves[i] = jax.ShapeDtypeStruct(leaves[i].shape, d, sharding=leaves[i].sharding)
    return jax.tree.unflatten(treedef, leaves), (which, program)


def _ahead_fn(steps: Any, name: str) -> _ahead.AheadFn | None:
    """The `AheadFn` of `steps`' step `name` (inside a shared `EvalStep`), or None."""
    fn = getattr(steps, name, None)
    if isinstance(fn, _steps.EvalStep):
        fn = fn.jitted
    return fn if isinstance(fn, _ahead.AheadFn) else None


def _shared_eval(steps: Any, name: str) -> bool:
    """Whether `steps`' step `name` is `make_steps`' `EvalStep`, shared by phases."""
    return isinstance(getattr(steps, name, None), _steps.EvalStep)


def _first_call(ref: "weakref.ref[Phases]", name: str, args: tuple[Any, ...], outputs: Any) -> None:
    """A phase's step ran for the first time, with abstract `args`: plan the next phases."""
    phases = ref()
    if phases is None or not args:
        return
    if not all(hasattr(args[0], a) for a in ("opt_state", "params", "replace")):
        return  # a state of another kind: nothing to derive the next phases' from
    try:
        phases._record(name, args, outputs)
    except Exception as e:  # the step itself ran; the next phases compile at their changes
        _ahead.log_skip("the next phases", e)


def _extends(schedule: schedules.FreezeSchedule, base: schedules.FreezeSchedule) -> bool:
    """Whether `schedule` keeps every phase of `base` (and may add later ones)."""
    n = len(base.phases)
    return schedule.unit == base.unit and schedule.phases[:n] == base.phases


def _noted(error: BaseException, index: int, what: str) -> BaseException:
    """`error`, noted as raised ahead of its phase (its traceback kept)."""
    where = {
        "building": "",
        "compiling": " on a background thread, whose traceback this is",
    }[what]
    error.add_note(
        f"(Raised while {what} phase {index} ahead of its start{where}: "
        "train.Phases(..., compile_ahead=True).)"
    )
    return error


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
