"""Automatic freezing for speed: freeze front layers as they converge, or on a fixed schedule.

Freezing also makes training cheaper: a frozen group leaves the backward pass
(`train.make_steps` differentiates only what trains), and once a prefix of
the network is frozen its outputs can be cached (`features.FeatureCache`,
`train.make_steps(start_after=...)`). Two policies decide what to freeze:

* `AutoFreeze` (Liu et al. 2021, "AutoFreeze: automatically freezing model
  blocks to accelerate fine-tuning"): adaptive. Every `interval` steps it
  compares each still-trainable group's gradient norm, summed over the last
  interval, with the interval before:
  `rate = |norm_now - norm_before| / norm_before`. The front-most
  trainable groups whose rate is below the `percentile` of every trainable
  group's rate freeze, for good; only groups contiguous from the input
  freeze, and the last group (the head) never does.
* `freezeout` (Brock et al. 2017, "FreezeOut: accelerate training by
  progressively freezing layers"): a fixed schedule. Group `i` of `n` stops
  training at fraction `t_i = t0 + (1 - t0) * (i / (n - 1)) ** p` of the run
  (`p` = 1, 2, 3 for linear, squared and cubic scaling), the last group at 1.
  FreezeOut also anneals each layer's learning rate to zero by its `t_i`;
  here the run's own learning-rate schedule applies to every group.

Groups are path prefixes (`stem`, `Transformer/encoderblock_3`) or, for
blocks stacked by `nn.scan`, block selectors (`Transformer/encoderblock[3]`,
as `models.vit_groups(depth, scan=True)` names them). Consecutive frozen
blocks of one stack make one rule, `Transformer/encoderblock[:k]`: a scanned
model freezes block by block from the input, and the step leaves the frozen
blocks' backward work out as it does for a fixed spec.

Both produce a `FreezeSchedule` counted in steps that `layerfreeze.train.Phases`
runs: one compile per distinct phase, the optimizer state of what still
trains carried over. `AutoFreeze`'s schedule grows as it decides; hand it to
`Phases.extend`. Its decisions depend only on the gradient norms it was
shown, and its `metadata()` (for the checkpoint) holds its whole state, so a
resumed run decides exactly as an uninterrupted one.

>>> policy = AutoFreeze(["stem", "body", "head"], interval=2, percentile=50)
>>> norms = [(1.0, 4.0, 9.0), (1.0, 4.0, 9.0),   # interval 1
...          (1.0, 3.0, 6.0), (1.0, 3.0, 6.0),   # interval 2: stem did not change
...          (0.5, 3.0, 4.0), (0.5, 3.0, 4.0)]   # interval 3: body changes least
>>> for step, (stem, body, head) in enumerate(norms):
...     policy.update(step)
...     policy.observe({"grad_norm/stem": stem, "grad_norm/body": body,
...                     "grad_norm/head": head})
()
()
()
()
('stem',)
()
>>> policy.update(6)
('body',)
>>> print(policy.schedule.describe())
step 0: freeze none
step 4: freeze stem
step 6: freeze stem,body
>>> print(freezeout(["stem", "body", "head"], 100, t0=0.5, scaling="linear").describe())
step 0: freeze none
step 50: freeze stem
step 75: freeze stem,body
step 100: end
>>> stacked = ["emb", "blocks[0]", "blocks[1]", "blocks[2]", "head"]
>>> print(freezeout(stacked, 100, t0=0.5, scaling="linear").describe())
step 0: freeze none
step 50: freeze emb
step 62: freeze emb,blocks[0]
step 75: freeze emb,blocks[:2]
step 88: freeze emb,blocks[:3]
step 100: end
"""

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from layerfreeze import _checks, _spec, schedules

__all__ = ["POLICIES", "SCALINGS", "AutoFreeze", "freezeout", "norm_metric"]

POLICIES = ("auto", "freezeout")
"""The automatic freezing policies: `AutoFreeze` and `freezeout`."""

SCALINGS = {"linear": 1, "squared": 2, "cubic": 3}
"""FreezeOut's scalings of the groups' stop times: the power of `i / (n - 1)`."""


def norm_metric(group: str) -> str:
    """The name of a group's gradient-norm metric (`train.make_steps(group_norms=...)`)."""
    return f"grad_norm/{group}"


def _policy_groups(
    groups: Sequence[str], frozen: Sequence[str], candidates: Sequence[str] | None, what: str
) -> tuple[tuple, tuple, tuple]:
    if isinstance(groups, str) or isinstance(frozen, str) or isinstance(candidates, str):
        raise TypeError(
            f"{what} takes sequences of group names, e.g. ['stem', 'body', 'head'], not a string."
        )
    groups = _checks.groups(groups, f"{what}: groups")
    frozen = _checks.groups(frozen, f"{what}: frozen", empty=True)
    if len(groups) < 2:
        raise ValueError(
            f"{what} needs at least two groups (the last, the head, never freezes); got {groups}."
        )
    unknown = [g for g in frozen if g not in groups]
    if unknown:
        raise ValueError(
            f"{what}: frozen groups {unknown} are not among the groups; valid: {', '.join(groups)}."
        )
    if groups[-1] in frozen:
        raise ValueError(f"{what}: the last group {groups[-1]!r} (the head) cannot be frozen.")
    if len(frozen) == len(groups) - 1:
        raise ValueError(
            f"{what}: every group but the head is frozen already ({', '.join(frozen)}); there "
            "is nothing left to freeze automatically."
        )
    if candidates is None:
        return groups, frozen, tuple(g for g in groups[:-1] if g not in frozen)
    candidates = _checks.groups(candidates, f"{what}: candidates", empty=True)
    unknown = [g for g in candidates if g not in groups[:-1]]
    if unknown:
        raise ValueError(
            f"{what}: groups {unknown} cannot be left to the policy; valid: "
            f"{', '.join(groups[:-1])} (every group but the last, the head)."
        )
    both = [g for g in candidates if g in frozen]
    if both:
        raise ValueError(
            f"{what}: groups {both} are both frozen for the whole run and left to the policy "
            "to freeze; name each in one of the two."
        )
    if not candidates:
        raise ValueError(f"{what}: no group is left to the policy to freeze.")
    return groups, frozen, tuple(g for g in groups if g in candidates)


def _spec_of(groups: Sequence[str], frozen: Sequence[str], train_bn: bool) -> _spec.FreezeSpec:
    names = [g for g in groups if g in frozen]  # model order
    return _spec.FreezeSpec(tuple(_merge_blocks(names)), train_bn=train_bn)


def _merge_blocks(names: Sequence[str]) -> list[str]:
    """Consecutive block selectors of one stack as one range: `s[0]`, `s[1]` -> `s[:2]`.

    A frozen prefix of stacked blocks is then one rule, whatever its length.
    """
    out: list[str] = []
    last: tuple[str, int, int] | None = None  # out[-1]'s (stack, start, stop), if a range
    for name in names:
        here = _block_range(name)
        if here is not None and last is not None and here[:2] == (last[0], last[2]):
            last = (last[0], last[1], here[2])
            out[-1] = f"{last[0]}[{last[1] or ''}:{last[2]}]"
        else:
            out.append(name)
            last = here
    return out


def _block_range(name: str) -> tuple[str, int, int] | None:
    """`(stack, start, stop)` of a block selector of whole blocks with both bounds >= 0."""
    rule = _spec.Rule(name)
    if rule.kind != "block":
        return None
    start, stop, rest = rule.selector
    start = 0 if start is None else start
    if rest or start < 0 or stop is None or stop < start:
        return None
    return rule.stack, start, stop


class AutoFreeze:
    """AutoFreeze's adaptive policy: front groups freeze when their gradients settle.

    Use in a training loop (see the module docstring): before each train
    step call `update(step)`; after it, `observe(metrics)` with the step's
    metrics, which must hold `grad_norm/<group>` for every group
    (`train.make_steps(..., group_norms=groups)`). When `update` freezes
    something, give `schedule` to `Phases.extend`. Put `metadata()` in each
    checkpoint and call `restore` on resume.

    Args:
      groups: the model's groups in order from input to output: path
        prefixes (e.g. `models.GROUPS`) or block selectors of stacked blocks
        (`Transformer/encoderblock[i]`, e.g. `models.vit_groups(depth,
        scan=True)`); the last one never freezes.
      interval: steps between decisions, >= 1. The first decision comes after
        two intervals (a rate needs two of them).
      percentile: in (0, 100): a group may freeze when its rate is below
        this percentile of every trainable group's rate (numpy's linear
        interpolation).
      frozen: groups frozen for the whole run, decided by no one (e.g. a
        user's fixed freeze); they count as frozen for contiguity.
      candidates: the groups the policy may freeze (default: every group
        but the last and those in `frozen`); a group outside them stays
        trainable, and so does every group after it.
      train_bn: the specs' `train_bn` (BatchNorm stays trainable in frozen
        groups; then no frozen prefix can be cached).

    Raises:
      ValueError: a percentile outside (0, 100), an interval below 1, fewer
        than two groups, an unknown or the last group in `frozen` or
        `candidates`, a group in both.
      TypeError: `groups`, `frozen` or `candidates` is no sequence of group
        names, `interval` no integer, `percentile` no number, `train_bn` no
        bool.
    """

    def __init__(
        self,
        groups: Sequence[str],
        *,
        interval: int,
        percentile: float = 50.0,
        frozen: Sequence[str] = (),
        candidates: Sequence[str] | None = None,
        train_bn: bool = False,
    ):
        self.groups, self.fixed, self.candidates = _policy_groups(
            groups, frozen, candidates, "AutoFreeze"
        )
        if isinstance(interval, bool) or not isinstance(interval, int | np.integer):
            raise TypeError(f"AutoFreeze: interval must be an integer >= 1, got {interval!r}.")
        if interval < 1:
            raise ValueError(
                f"AutoFreeze: interval must be >= 1 (steps between decisions), got {interval}."
            )
        if isinstance(percentile, bool) or not isinstance(percentile, int | float | np.number):
            raise TypeError(f"AutoFreeze: percentile must be a number, got {percentile!r}.")
        if not 0 < percentile < 100:
            raise ValueError(
                f"AutoFreeze: percentile must be in (0, 100) (exclusive), got {percentile}."
            )
        self.interval = int(interval)
        self.percentile = float(percentile)
        self.train_bn = _checks.flag("AutoFreeze: train_bn", train_bn)
        self._reset()

    def _reset(self) -> None:
        self._decisions: list[tuple[int, tuple[str, ...]]] = []
        self._previous: dict[str, float] = {}  # the last interval's summed norms
        self._sums: dict[str, float] = {}  # this interval's, so far
        self._count = 0  # steps observed in this interval
        self._pending: list[dict[str, Any]] = []  # observed, not yet fetched
        self._last_update: int | None = None
        self.last_rates: dict[str, float] = {}

    # What has been decided ---------------------------------------------------

    @property
    def frozen(self) -> tuple[str, ...]:
        """Every frozen group, fixed or decided, in model order."""
        decided = {g for _, names in self._decisions for g in names}
        return tuple(g for g in self.groups if g in decided or g in self.fixed)

    @property
    def trainable(self) -> tuple[str, ...]:
        """The groups still training, in model order."""
        frozen = set(self.frozen)
        return tuple(g for g in self.groups if g not in frozen)

    @property
    def decisions(self) -> tuple[tuple[int, tuple[str, ...]], ...]:
        """`(step, groups frozen at that step)`, oldest first."""
        return tuple(self._decisions)

    @property
    def schedule(self) -> schedules.FreezeSchedule:
        """The decisions so far as a schedule in steps: one phase per decision.

        A phase's spec lists the frozen groups in model order, consecutive
        blocks of one stack as one range (`blocks[0]`, `blocks[1]` frozen:
        `blocks[:2]`).
        """
        phases = [schedules.Phase(0, _spec_of(self.groups, self.fixed, self.train_bn))]
        frozen = list(self.fixed)
        for step, names in self._decisions:
            frozen.extend(names)
            phases.append(schedules.Phase(step, _spec_of(self.groups, frozen, self.train_bn)))
        return schedules.FreezeSchedule(tuple(phases), "step")

    def candidate_schedule(self) -> schedules.FreezeSchedule | None:
        """`schedule` plus the likeliest next phase, for `train.Phases.foresee`.

        `Phases.foresee` compiles that phase's steps ahead while the current
        phase trains. The guessed phase starts at the next decision step and
        freezes what `forecast` says that decision will freeze, or, when it
        says nothing (or cannot tell yet: the interval in progress has no
        norms, or no interval before it to compare with), the next front
        group alone. The policy may decide otherwise there, and then the
        guess is discarded. Ask again when `forecast_due` says so (a quarter
        and half of the interval observed): the guess then follows its
        norms. None when no group can freeze any more (the next trainable
        group is the head, or not among `candidates`), or none can at the
        next decision: it closes the first interval, with no interval
        before it to compare rates with (a guess would be compiled for
        nothing).

        >>> policy = AutoFreeze(["stem", "body", "head"], interval=2)
        >>> print(policy.candidate_schedule())  # the decision at step 2 compares nothing
        None
        >>> norms = {"grad_norm/stem": 1.0, "grad_norm/body": 2.0, "grad_norm/head": 3.0}
        >>> for _ in range(2):
        ...     policy.observe(norms)
        >>> policy.update(2)
        ()
        >>> print(policy.candidate_schedule().describe())
        step 0: freeze none
        step 4: freeze stem
        """
        following = self.trainable[0]
        if following not in self.candidates:
            return None
        if sum(g in self._previous for g in self.trainable) < 2:
            return None  # the next decision has no rates to compare: it freezes nothing
        schedule = self.schedule
        start = (self._last_update or 0) + self.interval
        guess = self.forecast() or (following,)
        spec = _spec_of(self.groups, (*self.frozen, *guess), self.train_bn)
        return schedules.FreezeSchedule((*schedule.phases, schedules.Phase(start, spec)), "step")

    def forecast(self) -> tuple[str, ...]:
        """What the next decision would freeze if the rest of its interval went as its start.

        The norms observed so far in the interval in progress, scaled to a
        whole interval, compared with the interval before, as `update` will
        compare them. `()` when nothing would freeze, or the interval has no
        norms yet or no interval before it. Fetches the norms observed so far
        (waits for their steps); the decision itself is unchanged by it.

        In `benchmarks/auto_freeze.py`'s runs, the guess it made (asked a
        quarter and half of the way through each interval) was the phase
        decided at all three of the ResNet's changes, the first freezing three
        groups at once, and at three of the ViT's four (`benchmarks/RESULTS.md`).
        """
        self._fetch()
        if not self._count:
            return ()
        scale = self.interval / self._count
        return self._decide({g: value * scale for g, value in self._sums.items()})[1]

    def forecast_due(self) -> bool:
        """Whether it is time to guess again: the interval in progress is a quarter or
        half observed, just now.

        Call after `observe`; when True, hand `candidate_schedule()` to
        `Phases.foresee`. True at most twice per interval, and only in an
        interval that ends in a decision with rates to compare (not the
        first). The first guess leaves a compile most of the interval; the
        second, from twice the norms, replaces it when it differs.
        """
        marks = {max(1, self.interval // 4), max(1, self.interval // 2)}
        return bool(self._previous) and self._count in marks

    # The loop ----------------------------------------------------------------

    def observe(self, metrics: Mapping[str, Any]) -> None:
        """Adds one train step's `grad_norm/<group>` of every trainable group.

        Values may be device arrays: they are fetched at the next decision
        (or `metadata()`), so observing does not wait for the step.

        Raises:
          KeyError: a trainable group's norm is missing from `metrics`.
          TypeError: `metrics` is no mapping, or a norm is no number or array.
        """
        if not isinstance(metrics, Mapping):
            raise TypeError(
                "AutoFreeze.observe takes the train step's metrics, a mapping such as "
                f"{{'grad_norm/{self.groups[0]}': ..., ...}}; got {_checks.given(metrics)}."
            )
        missing = [g for g in self.trainable if norm_metric(g) not in metrics]
        if missing:
            raise KeyError(
                f"AutoFreeze.observe: no {', '.join(map(norm_metric, missing))} in the step's "
                f"metrics (it has {', '.join(sorted(metrics))}); build the steps with "
                f"train.make_steps(..., group_norms={list(self.groups)})."
            )
        values = {g: metrics[norm_metric(g)] for g in self.trainable}
        for group, value in values.items():
            # Device arrays are fetched later; only their type is checked here.
            if isinstance(value, bool | str | bytes) or not (
                isinstance(value, numbers.Real) or hasattr(value, "dtype")
            ):
                raise TypeError(
                    f"AutoFreeze.observe: {norm_metric(group)} must be a number (a float or "
                    f"a scalar array), got {_checks.given(value)}."
                )
        self._pending.append(values)
        self._count += 1

    def _fetch(self) -> None:
        # In step order, one float64 addition at a time: a resumed run that
        # restores the partial sums adds in the same order.
        import jax

        for values in jax.device_get(self._pending):
            for group, value in values.items():
                self._sums[group] = self._sums.get(group, 0.0) + float(value)
        self._pending.clear()

    def update(self, step: int) -> tuple[str, ...]:
        """Call before train step `step` (0-based); returns the groups it freezes now.

        At a positive multiple of `interval` the interval just ended is
        closed: rates are computed, and the front-most trainable groups
        whose rate is below the percentile freeze from this step on. Other
        steps (and a second call for the same step) return `()`.

        Raises:
          ValueError: the interval ending here did not get one `observe` per
            step, or `step` is negative.
          TypeError: `step` is no integer.
        """
        step = _checks.count("AutoFreeze.update: step", step)
        if step == self._last_update or step <= 0 or step % self.interval:
            return ()
        if self._count != self.interval:
            raise ValueError(
                f"AutoFreeze.update({step}): the interval ending here got {self._count} "
                f"observe() calls, expected {self.interval} (one per train step)."
            )
        self._last_update = step
        self._fetch()
        now, self._sums, self._count = self._sums, {}, 0
        rates, newly = self._decide(now)
        self._previous = now
        self.last_rates = rates
        if newly:
            self._decisions.append((step, newly))
            for group in newly:
                self._previous.pop(group, None)
        return newly

    def _decide(self, now: Mapping[str, float]) -> tuple[dict[str, float], tuple[str, ...]]:
        """The rates of an interval with summed norms `now`, and the groups they freeze."""
        rates = {g: _rate(now[g], self._previous[g]) for g in now if g in self._previous}
        if len(rates) < 2:
            return rates, ()
        values = np.array(list(rates.values()), np.float64)
        threshold = float(np.percentile(values, self.percentile))
        newly: list[str] = []
        frozen = set(self.frozen)
        for group in self.groups[:-1]:
            if group in frozen:
                continue
            if group in self.candidates and group in rates and rates[group] < threshold:
                newly.append(group)
                continue
            break
        return rates, tuple(newly)

    # Checkpoints -------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        return {
            "policy": "auto",
            "groups": list(self.groups),
            "interval": self.interval,
            "percentile": self.percentile,
            "fixed": list(self.fixed),
            "candidates": list(self.candidates),
            "train_bn": self.train_bn,
        }

    def metadata(self) -> dict[str, Any]:
        """The policy's whole state, JSON-serialisable (floats round-trip exactly)."""
        self._fetch()
        return {
            **self._settings(),
            "decisions": [[step, list(names)] for step, names in self._decisions],
            "previous": dict(self._previous),
            "sums": dict(self._sums),
            "count": self._count,
            "last_update": self._last_update,
        }

    def restore(self, metadata: Mapping[str, Any]) -> None:
        """Takes the state `metadata()` saved; afterwards `schedule` is the saved one.

        Raises:
          ResumeMismatchError: the checkpoint was saved by a policy with other
            settings (groups, interval, percentile, fixed freeze) or by none.
        """
        mine = self._settings()
        differ = [
            f"{k}: checkpoint {metadata.get(k)!r}, this run {v!r}"
            for k, v in mine.items()
            if metadata.get(k) != v
        ]
        if differ:
            raise schedules.ResumeMismatchError(
                f"Cannot resume the AutoFreeze decisions: {'; '.join(differ)}. Resume with "
                "the settings the run was saved with, or start a fresh run in another workdir."
            )
        self._reset()
        self._decisions = [(int(s), tuple(names)) for s, names in metadata["decisions"]]
        self._previous = {g: float(v) for g, v in metadata["previous"].items()}
        self._sums = {g: float(v) for g, v in metadata["sums"].items()}
        self._count = int(metadata["count"])
        last = metadata.get("last_update")
        self._last_update = None if last is None else int(last)

    def __repr__(self) -> str:
        return (
            f"AutoFreeze(interval={self.interval}, percentile={self.percentile}, "
            f"frozen={self.frozen})"
        )


def _rate(now: float, before: float) -> float:
    if before == 0:
        return 0.0 if now == 0 else math.inf
    return abs(now - before) / before


def freezeout(
    groups: Sequence[str],
    total_steps: int,
    *,
    t0: float = 0.5,
    scaling: str = "cubic",
    frozen: Sequence[str] = (),
    candidates: Sequence[str] | None = None,
    train_bn: bool = False,
) -> schedules.FreezeSchedule:
    """FreezeOut's fixed schedule: group `i` stops training at step `t_i * total_steps`.

    `t_i = t0 + (1 - t0) * (i / (n - 1)) ** p` over the `n - 1` groups the
    policy may freeze (`candidates`) and the last group (the head), `p`
    given by `scaling` (`SCALINGS`); the head has `t = 1` and trains to the
    end. Groups whose stop steps
    round to the same step freeze in one phase; a group frozen only at the
    run's end never freezes.

    Args:
      groups: the model's groups, input to output (as for `AutoFreeze`).
      total_steps: the run's length in steps, >= 1.
      t0: when the first group stops, as a fraction of the run, in (0, 1].
      scaling: `"linear"`, `"squared"` or `"cubic"` (the paper's default).
      frozen: groups frozen for the whole run.
      candidates: the groups that stop (default: every group but the last
        and those in `frozen`); in model order, each stops after the one
        before it.
      train_bn: the specs' `train_bn`.

    Returns:
      A `FreezeSchedule` in steps, with `total` = `total_steps`.

    Raises:
      ValueError: `t0` outside (0, 1], an unknown scaling, `total_steps` < 1,
        bad groups.
    """
    groups, fixed, candidates = _policy_groups(groups, frozen, candidates, "freezeout")
    if not isinstance(scaling, str):
        raise TypeError(
            f"freezeout: scaling must be one of the strings {', '.join(SCALINGS)}; got "
            f"{_checks.given(scaling)}."
        )
    if scaling not in SCALINGS:
        raise ValueError(f"freezeout: unknown scaling {scaling!r}; valid: {', '.join(SCALINGS)}.")
    train_bn = _checks.flag("freezeout: train_bn", train_bn)
    if isinstance(t0, bool) or not isinstance(t0, int | float | np.number) or not 0 < t0 <= 1:
        raise ValueError(f"freezeout: t0 must be a number in (0, 1], got {t0!r}.")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"freezeout: total_steps must be an integer >= 1, got {total_steps!r}.")
    managed = (*candidates, groups[-1])
    n, power = len(managed), SCALINGS[scaling]
    stops: dict[int, list[str]] = {}
    for i, group in enumerate(candidates):
        t = t0 + (1 - t0) * (i / (n - 1)) ** power
        step = round(t * total_steps)
        if step < total_steps:
            stops.setdefault(step, []).append(group)
    frozen_now = list(fixed)
    phases = []
    if 0 not in stops:
        phases.append(schedules.Phase(0, _spec_of(groups, frozen_now, train_bn)))
    for step in sorted(stops):
        frozen_now.extend(stops[step])
        phases.append(schedules.Phase(step, _spec_of(groups, frozen_now, train_bn)))
    return schedules.FreezeSchedule(tuple(phases), "step", total=total_steps)
