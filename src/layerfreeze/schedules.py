"""Freeze schedules: which groups train when (gradual unfreezing).

A schedule is an ordered tuple of `Phase`s. Each phase starts at an epoch (or
step) and holds a freeze spec plus per-group learning-rate multipliers. A
training loop asks `schedule.phase_at(t)` at every epoch; the answer depends on
`t` only, so a run resumed from a checkpoint at epoch `t` lands in the right
phase. Phases are immutable and hashable: use them as keys to cache one
compiled train step per phase.

Constructors cover the usual recipes: `constant`, `explicit`, `unfreeze`,
`gradual_unfreezing` (ULMFiT), `fine_tune` (fastai) and `parse_schedule` for
command lines. Models are described by their ordered top-level groups, input
to output, e.g. `("stem", "stage1", "stage2", "stage3", "stage4", "head")`.
"""

import bisect
import dataclasses
import itertools
import math
import numbers
import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

from layerfreeze import _checks, _spec, lr

__all__ = [
    "ResumeMismatchError",
    "UNITS",
    "FreezeSchedule",
    "Phase",
    "Unit",
    "constant",
    "explicit",
    "fine_tune",
    "freeze_to",
    "gradual_unfreezing",
    "parse_lr_multipliers",
    "parse_schedule",
    "unfreeze",
]

Unit = Literal["epoch", "step"]
UNITS: tuple[str, ...] = ("epoch", "step")


class ResumeMismatchError(ValueError):
    """A checkpoint was saved under another schedule, spec, method or policy than the run's."""


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase of a schedule: from `start` on, freeze `spec`, scale rates.

    Attributes:
      start: the epoch (or step) where the phase begins, >= 0.
      spec: what is frozen during the phase. Anything `layerfreeze.as_spec`
        accepts is converted (`"all-but:head"`).
      lr_multipliers: `(group, multiplier)` pairs, each multiplier >= 0; a
        group not listed gets 1.0, so `()` means every group at the base rate.
        A mapping is converted (its order kept; order counts for equality).

    >>> phase = Phase(5, "all-but:stage4,head", {"stage4": 0.1})
    >>> phase.trainable_groups(["stem", "stage4", "head"])
    ('stage4', 'head')
    >>> phase.describe()
    '5: freeze all-but:stage4,head; lr stage4=0.1'
    >>> {phase: "compiled step"}[Phase(5, "all-but:stage4,head", {"stage4": 0.1})]
    'compiled step'
    """

    start: int
    spec: _spec.FreezeSpec = dataclasses.field(default_factory=_spec.FreezeSpec)
    lr_multipliers: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "start", _index("A phase's start", self.start))
        if self.start < 0:
            raise ValueError(f"A phase's start must be >= 0, got {self.start}.")
        object.__setattr__(self, "spec", _spec.as_spec(self.spec))
        table = _checks.multipliers(self.lr_multipliers)
        object.__setattr__(self, "lr_multipliers", tuple(table.items()))

    @property
    def multipliers(self) -> dict[str, float]:
        """The learning-rate multipliers as a `{group: multiplier}` dict."""
        return dict(self.lr_multipliers)

    def trainable_groups(self, groups: Sequence[str]) -> tuple[str, ...]:
        """The groups of `groups` that this phase trains, at least in part.

        Decided at group granularity from the spec's rules: a group trains if
        the first rule matching its bare name makes it trainable (or no rule
        matches and the default is trainable), or if an earlier path rule such
        as `stage1/Block_0` makes part of it trainable. Globs and regexes that
        match only deeper paths, and `train_bn`, are not considered; resolve
        the spec against the params (`FreezeSpec.resolve`) for a per-leaf
        answer.

        Args:
          groups: the top-level groups, in order.

        Returns:
          The trainable groups, in the order of `groups`.
        """
        return tuple(g for g in _checks.groups(groups) if _group_trains(self.spec, g))

    def describe(self, unit: str | None = None) -> str:
        """One line: `"epoch 5: freeze all-but:stage4,head; lr stage4=0.1"`."""
        when = f"{unit} {self.start}" if unit else str(self.start)
        text = f"{when}: freeze {self.spec.describe()}"
        if self.lr_multipliers:
            text += "; lr " + ", ".join(f"{g}={m:.3g}" for g, m in self.lr_multipliers)
        return text


@dataclasses.dataclass(frozen=True)
class FreezeSchedule:
    """Phases in order of their starts; `phase_at(t)` is the last one begun by `t`.

    Attributes:
      phases: the phases; the first starts at 0, starts strictly increase.
      unit: what `start` and `t` count: `"epoch"` or `"step"`.
      total: the length of the run in `unit`s, when the recipe fixes it
        (`fine_tune`); None otherwise. Informational: `phase_at` keeps
        answering the last phase past it.

    >>> s = explicit({0: "all-but:head", 5: "none"})
    >>> s.boundaries, s.phase_at(4).spec.describe(), s.phase_at(5).spec.describe()
    ((0, 5), 'all-but:head', 'none')
    """

    phases: tuple[Phase, ...]
    unit: Unit = "epoch"
    total: int | None = None

    def __post_init__(self):
        if isinstance(self.phases, Phase):
            raise TypeError("phases must be a sequence of Phase objects, got a single Phase.")
        phases = tuple(self.phases)
        bad = [p for p in phases if not isinstance(p, Phase)]
        if bad:
            raise TypeError(f"phases must all be Phase objects, got {bad[0]!r}.")
        object.__setattr__(self, "phases", phases)
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {self.unit!r}.")
        if not phases:
            raise ValueError("A freeze schedule needs at least one phase (one starting at 0).")
        starts = tuple(p.start for p in phases)
        shown = ", ".join(map(str, starts))
        if starts[0] != 0:
            raise ValueError(
                f"The first phase must start at {self.unit} 0, got {starts[0]} (starts: {shown}). "
                "Add a phase at 0 saying what is frozen at the beginning."
            )
        for before, after in itertools.pairwise(starts):
            if after <= before:
                raise ValueError(
                    f"Phase starts are non-increasing: {before} then {after} (starts: {shown}). "
                    "Each phase must start strictly after the previous one."
                )
        if self.total is not None:
            total = _index("total", self.total)
            if total <= starts[-1]:
                raise ValueError(
                    f"total must be > the last phase's start {starts[-1]}, got {total}."
                )
            object.__setattr__(self, "total", total)

    @property
    def boundaries(self) -> tuple[int, ...]:
        """The phases' starts."""
        return tuple(p.start for p in self.phases)

    def phase_index(self, t: int | float) -> int:
        """The index of the phase in force at `t` (an epoch or step count, >= 0)."""
        if isinstance(t, bool) or not isinstance(t, numbers.Real):
            t = _index(f"The {self.unit}", t)
        if not t >= 0:
            raise ValueError(f"The {self.unit} must be >= 0, got {t!r}.")
        return bisect.bisect_right(self.boundaries, t) - 1

    def phase_at(self, t: int | float) -> Phase:
        """The phase in force at `t`: the last one whose start is <= `t`."""
        return self.phases[self.phase_index(t)]

    def previous_specs(self, index: int) -> tuple[_spec.FreezeSpec, ...]:
        """The freeze specs of the phases before phase `index`, oldest first.

        Build phase `index`'s optimizer with them, so that the leaves it
        unfreezes start with fresh optimizer step counts:
        `layerfreeze.freeze(optimizer, schedule.phases[i].spec,
        previous=schedule.previous_specs(i))`.

        >>> s = explicit({0: "all-but:head", 5: "stem", 9: "none"})
        >>> [spec.describe() for spec in s.previous_specs(2)]
        ['all-but:head', 'stem']
        """
        index = _index("A phase index", index)
        if not 0 <= index < len(self.phases):
            raise IndexError(
                f"Phase index {index} is out of range; this schedule has phases "
                f"0..{len(self.phases) - 1}."
            )
        return tuple(p.spec for p in self.phases[:index])

    def replace_specs(self, **changes: Any) -> "FreezeSchedule":
        """The schedule with every phase's spec `.replace(**changes)`d (e.g. `train_bn=True`).

        >>> s = explicit({0: "all-but:head", 3: "none"}).replace_specs(train_bn=True)
        >>> [p.spec.train_bn for p in s.phases]
        [True, True]
        """
        phases = tuple(dataclasses.replace(p, spec=p.spec.replace(**changes)) for p in self.phases)
        return dataclasses.replace(self, phases=phases)

    def with_lr_multipliers(self, multipliers: lr.MultipliersLike) -> "FreezeSchedule":
        """The schedule with `multipliers` in every phase, replacing the phases' own.

        Args:
          multipliers: `{group: multiplier}` or `(group, multiplier)` pairs, each
            multiplier >= 0, e.g. from `parse_lr_multipliers`; `{}` removes
            every phase's multipliers. Groups are checked by `validate`.

        Returns:
          A new `FreezeSchedule`; starts, specs, unit and total unchanged.

        Raises:
          TypeError, ValueError: a multiplier that is not a number >= 0, or a
            group given twice.

        >>> s = explicit({0: "all-but:head", 3: "none"}).with_lr_multipliers({"stem": 0.1})
        >>> print(s.validate(["stem", "head"]).describe())
        epoch 0: freeze all-but:head; lr stem=0.1
        epoch 3: freeze none; lr stem=0.1
        """
        table = tuple(_checks.multipliers(multipliers).items())
        phases = tuple(dataclasses.replace(p, lr_multipliers=table) for p in self.phases)
        return dataclasses.replace(self, phases=phases)

    def validate(self, groups: Sequence[str]) -> "FreezeSchedule":
        """Checks that every group the phases name is one of `groups`.

        Checks the group of each group rule of each spec (the first component
        of `stage1/Block_0`) and each learning-rate multiplier's group. Globs
        and regexes are checked when the spec is resolved against params.
        Groups may be path prefixes (a ViT's `Transformer/encoderblock_0`):
        then a name is checked by its first component, which must be the first
        component of one of them, and resolving the spec against the params
        finds the rules that match nothing.

        Args:
          groups: the model's groups: top-level names or path prefixes.

        Returns:
          The schedule itself, so `schedule = parse_schedule(...).validate(groups)`.

        Raises:
          ValueError: naming the unknown group and the phase, and listing the
            valid groups.
        """
        groups = _checks.groups(groups)
        for phase in self.phases:
            for rule in phase.spec.rules:
                if rule.kind in ("group", "block"):
                    _check_group(
                        rule.pattern, groups, phase, self.unit, f"freeze rule {rule.pattern!r}"
                    )
            for group, _ in phase.lr_multipliers:
                _check_group(group, groups, phase, self.unit, "learning-rate multiplier")
        return self

    def describe(self) -> str:
        """One line per phase, e.g. `"epoch 0: freeze all-but:head"`."""
        lines = [p.describe(self.unit) for p in self.phases]
        if self.total is not None:
            lines.append(f"{self.unit} {self.total}: end")
        return "\n".join(lines)

    def __len__(self) -> int:
        return len(self.phases)

    def __iter__(self):
        return iter(self.phases)

    def __str__(self) -> str:
        return self.describe()


# Constructors ---------------------------------------------------------------


def constant(
    spec: _spec.SpecLike,
    *,
    lr_multipliers: lr.MultipliersLike | None = None,
    unit: Unit = "epoch",
) -> FreezeSchedule:
    """One phase for the whole run.

    Args:
      spec: what to freeze; anything `layerfreeze.as_spec` accepts.
      lr_multipliers: `{group: multiplier}`; groups not listed get 1.0.
      unit: `"epoch"` or `"step"`.

    Returns:
      A one-phase `FreezeSchedule`.

    >>> constant("stem,stage1").phase_at(100).spec.describe()
    'stem,stage1'
    """
    return FreezeSchedule((Phase(0, _spec.as_spec(spec), lr_multipliers or ()),), unit)


def explicit(
    mapping: Mapping[int, _spec.SpecLike],
    *,
    unit: Unit = "epoch",
) -> FreezeSchedule:
    """A schedule written out: `{start: freeze spec}`.

    Args:
      mapping: start -> what is frozen from then on (a spec string such as
        `"all-but:head"`, or a `FreezeSpec`). Sorted by start; one must be 0.
      unit: `"epoch"` or `"step"`.

    Returns:
      The `FreezeSchedule`, one phase per entry.

    >>> s = explicit({0: "all-but:head", 5: "stem,stage1"})
    >>> [p.spec.describe() for p in s.phases]
    ['all-but:head', 'stem,stage1']
    """
    return _explicit(_sorted_items(mapping, "explicit"), unit)


def unfreeze(
    mapping: Mapping[int, str | Sequence[str]],
    groups: Sequence[str],
    *,
    unit: Unit = "epoch",
    lr_multipliers: lr.MultipliersLike | None = None,
) -> FreezeSchedule:
    """Groups become trainable at given starts, cumulatively; the rest stay frozen.

    `{0: "head", 5: "stage4", 10: "stage3"}` trains the head from 0, the head
    and stage4 from 5 (spec `all-but:head,stage4`), and so on. Once every
    group of `groups` is trainable the spec is `none`.

    Args:
      mapping: start -> the group (or list of groups, or `"a,b"`) unfrozen
        then. Sorted by start; one must be 0. Names are top-level groups.
      groups: the model's top-level groups, to validate names against.
      unit: `"epoch"` or `"step"`.
      lr_multipliers: `{group: multiplier}` applied in every phase.

    Returns:
      The `FreezeSchedule`, one phase per entry.

    >>> groups = ["stem", "stage1", "head"]
    >>> s = unfreeze({0: "head", 3: "stage1", 6: "stem"}, groups)
    >>> [p.spec.describe() for p in s.phases]
    ['all-but:head', 'all-but:head,stage1', 'none']
    """
    return _unfreeze(_sorted_items(mapping, "unfreeze"), groups, unit, lr_multipliers)


def gradual_unfreezing(
    groups: Sequence[str],
    *,
    every: int = 1,
    start: int = 0,
    unit: Unit = "epoch",
    lr_multipliers: lr.MultipliersLike | None = None,
) -> FreezeSchedule:
    """ULMFiT's gradual unfreezing: the head first, then one group down at a time.

    The last group (the head) trains alone from 0; the group below it joins at
    `start + every`, the next at `start + 2 * every`, down to the first group
    (the stem), from when nothing is frozen.

    Args:
      groups: the model's top-level groups, input to output.
      every: units between two unfreezings, >= 1.
      start: extra units the head trains alone before the first unfreezing,
        >= 0.
      unit: `"epoch"` or `"step"`.
      lr_multipliers: `{group: multiplier}` applied in every phase, e.g.
        `layerfreeze.lr.ulmfit_multipliers(groups)` for ULMFiT's recipe.

    Returns:
      A `FreezeSchedule` of `len(groups)` phases.

    >>> s = gradual_unfreezing(["stem", "stage1", "head"], every=2)
    >>> print(s.describe())
    epoch 0: freeze all-but:head
    epoch 2: freeze all-but:head,stage1
    epoch 4: freeze none
    """
    groups = _checks.groups(groups)
    every = _index("every", every)
    start = _index("start", start)
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}.")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}.")
    order = groups[::-1]
    items = [(0, [order[0]])] + [(start + k * every, [g]) for k, g in enumerate(order) if k]
    return _unfreeze(items, groups, unit, lr_multipliers)


def freeze_to(n: int, groups: Sequence[str]) -> _spec.FreezeSpec:
    """fastai's `freeze_to(n)`: freezes `groups[:n]`, trains the rest.

    Args:
      n: how many leading groups to freeze; negative counts from the end
        (`freeze_to(-1, groups)` freezes all but the last group). Valid:
        `-len(groups) <= n <= len(groups)`.
      groups: the model's top-level groups, input to output.

    Returns:
      A `FreezeSpec` freezing those groups (`none` when there are none).

    >>> freeze_to(2, ["stem", "stage1", "stage2", "head"]).describe()
    'stem,stage1'
    >>> freeze_to(-1, ["stem", "stage1", "stage2", "head"]).describe()
    'stem,stage1,stage2'
    """
    groups = _checks.groups(groups)
    n = _index("n", n)
    if not -len(groups) <= n <= len(groups):
        raise ValueError(
            f"freeze_to: n={n} is out of range for {len(groups)} groups "
            f"({', '.join(groups)}); valid: {-len(groups)} to {len(groups)}."
        )
    return _spec.FreezeSpec(tuple(_spec.Rule(g) for g in groups[:n]))


def fine_tune(
    freeze_epochs: int,
    epochs: int,
    groups: Sequence[str],
    *,
    lr_mult: float = 100.0,
    unit: Unit = "epoch",
) -> FreezeSchedule:
    """fastai's `fine_tune`: train the head, then everything with discriminative rates.

    Phase 0 (from 0) freezes all but the last group, every multiplier 1.0.
    Phase 1 (from `freeze_epochs`) freezes nothing; its multipliers run
    geometrically from `0.5 / lr_mult` (first group) to `0.5` (last group).
    fastai halves the base learning rate when it unfreezes and then trains
    with `slice(base_lr / lr_mult, base_lr)`; the 0.5 folds that halving into
    the multipliers, so one base learning rate serves both phases. (fastai
    also restarts its one-cycle schedule per phase; that is the loop's job.)

    Args:
      freeze_epochs: epochs of training the head alone, >= 0 (0: no phase 0).
      epochs: epochs after unfreezing, >= 1; `total = freeze_epochs + epochs`.
      groups: the model's top-level groups, input to output.
      lr_mult: ratio of the last group's learning rate to the first's, > 0.
      unit: `"epoch"` or `"step"` (then the counts are steps).

    Returns:
      A `FreezeSchedule` with `total` set.

    >>> s = fine_tune(1, 4, ["stem", "body", "head"], lr_mult=100)
    >>> print(s.describe())
    epoch 0: freeze all-but:head
    epoch 1: freeze none; lr stem=0.005, body=0.05, head=0.5
    epoch 5: end
    """
    groups = _checks.groups(groups)
    freeze_epochs = _index("freeze_epochs", freeze_epochs)
    epochs = _index("epochs", epochs)
    if freeze_epochs < 0:
        raise ValueError(f"freeze_epochs must be >= 0, got {freeze_epochs}.")
    if epochs <= 0:
        raise ValueError(f"epochs (after unfreezing) must be > 0, got {epochs}.")
    lr_mult = _checks.positive("lr_mult", lr_mult)
    n = len(groups)
    # fastai's slice(base_lr / lr_mult, base_lr), relative to base_lr, times 0.5.
    halved = {g: 0.5 * lr_mult ** -((n - 1 - i) / max(n - 1, 1)) for i, g in enumerate(groups)}
    unfrozen = Phase(freeze_epochs, _spec.FreezeSpec(), halved)
    phases = (unfrozen,)
    if freeze_epochs:
        phases = (Phase(0, _spec.FreezeSpec.all_but(groups[-1])), unfrozen)
    return FreezeSchedule(phases, unit, total=freeze_epochs + epochs)


# Parsing --------------------------------------------------------------------

_FORMS = (
    "'gradual' or 'gradual:every=2,start=0'",
    "'unfreeze:0=head,5=stage4,10=stage3' (a name without '=' joins the previous start)",
    "'explicit:0=all-but:head;5=none' (semicolon-separated start=spec)",
    "'fine_tune:freeze_epochs=1,epochs=4,lr_mult=100'",
    "a freeze spec for the whole run: 'none', 'all', 'stage1,stage2', 'all-but:head'",
)
_FORMS_TEXT = "Valid schedule forms: " + "; ".join(_FORMS) + "."
_WORD = re.compile(r"[A-Za-z_][\w-]*")


def parse_schedule(text: str, groups: Sequence[str], *, unit: Unit = "epoch") -> FreezeSchedule:
    """Parses a schedule as typed on a command line or in a config.

    Forms:
      * `gradual` / `gradual:every=2,start=0`: `gradual_unfreezing`.
      * `unfreeze:0=head,5=stage4,10=stage3`: `unfreeze`; a name without `=`
        joins the previous start (`unfreeze:0=head,stage4,5=stage3`).
      * `explicit:0=all-but:head;5=none`: `explicit`, entries separated by `;`.
      * `fine_tune:freeze_epochs=1,epochs=4,lr_mult=100`: `fine_tune`
        (`epochs` required; `freeze_epochs` defaults to 1, `lr_mult` to 100).
      * anything else is a freeze spec for the whole run (`constant`):
        `none`, `all`, `stage1,stage2`, `all-but:head`.

    Starts in `unfreeze:` and `explicit:` must be written in increasing order.

    Args:
      text: the schedule string.
      groups: the model's top-level groups; every name is checked against them.
      unit: `"epoch"` or `"step"`.

    Returns:
      The validated `FreezeSchedule`.

    Raises:
      ValueError: a malformed string (listing the valid forms) or an unknown
        group (listing the valid groups).

    >>> groups = ["stem", "stage1", "head"]
    >>> print(parse_schedule("unfreeze:0=head,2=stage1,stem", groups).describe())
    epoch 0: freeze all-but:head
    epoch 2: freeze none
    >>> len(parse_schedule("gradual:every=3", groups))
    3
    """
    if not isinstance(text, str):
        raise TypeError(f"A schedule string was expected, got {type(text).__name__}.")
    groups = _checks.groups(groups)
    stripped = text.strip()
    head, sep, body = stripped.partition(":")
    form = head.strip().lower().replace("-", "_")
    body = body.strip()
    if form == "gradual":
        kw = _keywords(body, text, {"every": _index, "start": _index}, required=())
        return gradual_unfreezing(groups, unit=unit, **kw)
    if form == "unfreeze":
        return _unfreeze(_parse_unfreeze(body, text), groups, unit, None)
    if form == "explicit":
        return _explicit(_parse_explicit(body, text), unit).validate(groups)
    if form in ("fine_tune", "finetune"):
        kw = _keywords(
            body,
            text,
            {"freeze_epochs": _index, "epochs": _index, "lr_mult": _checks.positive},
            required=("epochs",),
        )
        return fine_tune(kw.pop("freeze_epochs", 1), kw.pop("epochs"), groups, unit=unit, **kw)
    if sep and _WORD.fullmatch(head.strip()) and form not in ("all_but", "re"):
        raise ValueError(f"Unknown schedule form {head.strip()!r} in {text!r}. {_FORMS_TEXT}")
    try:
        return constant(stripped, unit=unit).validate(groups)
    except ValueError as e:
        raise ValueError(f"{e} {_FORMS_TEXT}") from e


_LR_FORMS_TEXT = (
    "Valid forms: '' (none), 'ulmfit', 'ulmfit:<factor>', 'geometric', 'geometric:<ratio>', "
    "'group=multiplier,...' (e.g. 'stem=0.1,stage1=0.3')."
)
_DEFAULT_ULMFIT_FACTOR = 2.6
_DEFAULT_GEOMETRIC_RATIO = 1e-2


def parse_lr_multipliers(text: str, groups: Sequence[str]) -> dict[str, float]:
    """Parses per-group learning-rate multipliers as typed on a command line or in a config.

    Forms:
      * `''`: no multipliers (every group at the base learning rate).
      * `ulmfit` / `ulmfit:2.6`: `lr.ulmfit_multipliers(groups, factor)`, each
        group `factor` (> 0, default 2.6) times slower than the next.
      * `geometric` / `geometric:1e-2`: `lr.geometric_multipliers(groups,
        ratio, 1.0)`: the first group gets `ratio` (0 < ratio <= 1, default
        1e-2), the last 1.0, geometrically spaced between.
      * `stem=0.1,stage1=0.3`: explicit multipliers (>= 0) for the groups
        named; the others get 1.0.

    Give the result to `FreezeSchedule.with_lr_multipliers` or
    `lr.scale_by_group`.

    Args:
      text: the multipliers string.
      groups: the model's top-level groups, input to output; every name is
        checked against them.

    Returns:
      `{group: multiplier}` in the order of `groups`.

    Raises:
      ValueError: a malformed string or an unknown group; the message names
        the text, what is wrong and the valid forms (or groups).
      TypeError: `text` is not a string.

    >>> groups = ["stem", "body", "head"]
    >>> parse_lr_multipliers("ulmfit:2", groups)
    {'stem': 0.25, 'body': 0.5, 'head': 1.0}
    >>> parse_lr_multipliers("geometric:1e-2", groups)
    {'stem': 0.01, 'body': 0.1, 'head': 1.0}
    >>> parse_lr_multipliers("head=1, stem=0.1", groups)
    {'stem': 0.1, 'head': 1.0}
    >>> parse_lr_multipliers("", groups)
    {}
    """
    if not isinstance(text, str):
        raise TypeError(
            f"Learning-rate multipliers must be given as a string, got "
            f"{type(text).__name__}: {text!r}. {_LR_FORMS_TEXT}"
        )
    groups = _checks.groups(groups)
    stripped = text.strip()
    if not stripped:
        return {}

    def fail(problem: str) -> ValueError:
        return ValueError(f"Learning-rate multipliers {text!r}: {problem}. {_LR_FORMS_TEXT}")

    if "=" in stripped:
        return _parse_explicit_multipliers(stripped, groups, fail)
    head, sep, arg = (part.strip() for part in stripped.partition(":"))
    form = head.lower()
    if form == "ulmfit":
        usage = "ulmfit:<factor> takes a factor > 0, e.g. 'ulmfit:2.6'"
        factor = _multiplier_number(arg, usage, fail) if sep else _DEFAULT_ULMFIT_FACTOR
        if not factor > 0:
            raise fail(f"a factor must be > 0, got {arg!r}: {usage}")
        return lr.ulmfit_multipliers(groups, factor)
    if form == "geometric":
        usage = (
            "geometric:<ratio> takes the first group's multiplier, 0 < ratio <= 1, "
            "e.g. 'geometric:1e-2'"
        )
        ratio = _multiplier_number(arg, usage, fail) if sep else _DEFAULT_GEOMETRIC_RATIO
        if not 0 < ratio <= 1:
            raise fail(f"a ratio must be > 0 and <= 1, got {arg!r}: {usage}")
        return lr.geometric_multipliers(groups, ratio, 1.0)
    if head in groups:
        raise fail(f"{head!r} is a group without a multiplier: write e.g. '{head}=0.1'")
    raise fail(f"unknown form {head!r}")


def _parse_explicit_multipliers(
    text: str, groups: tuple[str, ...], fail: Callable[[str], ValueError]
) -> dict[str, float]:
    usage = "group=multiplier takes a multiplier >= 0, e.g. 'stem=0.1'"
    table: dict[str, float] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        group, sep, value = (part.strip() for part in entry.partition("="))
        if not sep or not group:
            raise fail(f"{entry!r} is not group=multiplier")
        if group not in groups:
            raise fail(f"unknown group {group!r}; valid groups: {', '.join(groups)}")
        if group in table:
            raise fail(f"group {group!r} is given twice")
        number = _multiplier_number(value, usage, fail)
        if not number >= 0:
            raise fail(f"a multiplier must be >= 0, got {value!r} for {group!r}")
        table[group] = number
    return {g: table[g] for g in groups if g in table}


def _multiplier_number(value: str, usage: str, fail: Callable[[str], ValueError]) -> float:
    try:
        number = float(value)
    except ValueError:
        raise fail(f"{value!r} is not a number: {usage}") from None
    if not math.isfinite(number):
        raise fail(f"{value!r} is not a finite number: {usage}")
    return number


# Helpers --------------------------------------------------------------------


def _explicit(items: Iterable[tuple[int, _spec.SpecLike]], unit: Unit) -> FreezeSchedule:
    return FreezeSchedule(tuple(Phase(start, _spec.as_spec(s)) for start, s in items), unit)


def _unfreeze(
    items: Iterable[tuple[int, str | Sequence[str]]],
    groups: Sequence[str],
    unit: Unit,
    lr_multipliers: lr.MultipliersLike | None,
) -> FreezeSchedule:
    groups = _checks.groups(groups)
    multipliers = tuple(_checks.multipliers(lr_multipliers).items())
    trainable: list[str] = []
    phases = []
    for start, names in items:
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        if not names:
            raise ValueError(f"unfreeze: no group to unfreeze at {unit} {start}.")
        for name in names:
            if name not in groups:
                raise ValueError(
                    f"unfreeze: unknown group {name!r} at {unit} {start}. "
                    f"Valid groups: {', '.join(groups)}."
                )
            if name in trainable:
                raise ValueError(
                    f"unfreeze: group {name!r} is unfrozen twice (again at {unit} {start})."
                )
            trainable.append(name)
        if set(trainable) == set(groups):
            spec = _spec.FreezeSpec()
        else:
            spec = _spec.FreezeSpec.all_but(*trainable)
        phases.append(Phase(start, spec, multipliers))
    return FreezeSchedule(tuple(phases), unit).validate(groups)


def _sorted_items(mapping: Mapping[int, Any], what: str) -> list[tuple[int, Any]]:
    if not isinstance(mapping, Mapping):
        raise TypeError(
            f"{what} takes a mapping {{start: ...}}, got {type(mapping).__name__}: {mapping!r}."
        )
    return sorted((_index(f"A {what} start", k), v) for k, v in mapping.items())


def _parse_unfreeze(body: str, text: str) -> list[tuple[int, list[str]]]:
    if not body:
        raise ValueError(f"{text!r}: 'unfreeze:' needs start=group entries. {_FORMS_TEXT}")
    items: list[tuple[int, list[str]]] = []
    for token in body.split(","):
        token = token.strip()
        key, sep, value = token.partition("=")
        if sep:
            items.append((_parse_int(key, text), []))
            token = value.strip()
        elif not items:
            raise ValueError(f"{text!r}: the first entry must be start=group. {_FORMS_TEXT}")
        if not token:
            raise ValueError(f"{text!r}: empty group name. {_FORMS_TEXT}")
        items[-1][1].append(token)
    return items


def _parse_explicit(body: str, text: str) -> list[tuple[int, str]]:
    if not body:
        raise ValueError(f"{text!r}: 'explicit:' needs start=spec entries. {_FORMS_TEXT}")
    items = []
    for entry in body.split(";"):
        key, sep, value = entry.partition("=")
        if not sep:
            raise ValueError(f"{text!r}: entry {entry.strip()!r} is not start=spec. {_FORMS_TEXT}")
        items.append((_parse_int(key, text), value.strip()))
    return items


def _keywords(
    body: str, text: str, allowed: Mapping[str, Callable[..., Any]], required: Sequence[str]
) -> dict[str, Any]:
    valid = ", ".join(allowed)
    kwargs: dict[str, Any] = {}
    for token in filter(None, (t.strip() for t in body.split(","))):
        key, sep, value = (s.strip() for s in token.partition("="))
        if not sep or key not in allowed:
            raise ValueError(
                f"{text!r}: {token!r} is not one of {valid} given as key=value. {_FORMS_TEXT}"
            )
        if key in kwargs:
            raise ValueError(f"{text!r}: {key} given twice.")
        try:
            kwargs[key] = allowed[key](key, _number_text(value))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{text!r}: bad value for {key}: {e}") from None
    missing = [k for k in required if k not in kwargs]
    if missing:
        raise ValueError(f"{text!r}: missing {', '.join(missing)} (keys: {valid}). {_FORMS_TEXT}")
    return kwargs


def _number_text(value: str) -> int | float:
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a number.") from None


def _parse_int(text_value: str, text: str) -> int:
    try:
        return int(text_value.strip())
    except ValueError:
        raise ValueError(
            f"{text!r}: {text_value.strip()!r} is not an integer start. {_FORMS_TEXT}"
        ) from None


def _index(what: str, value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an integer, got {value!r}.")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {value!r}.") from None


def _check_group(group: str, groups: Sequence[str], phase: Phase, unit: str, where: str) -> None:
    """Raises unless `group` is one of `groups`, inside one, or a prefix of some.

    Groups may be path prefixes (`Transformer/encoderblock_3`) and block
    selectors (`Transformer/encoderblock[3]`); selectors are compared by the
    paths they select under.
    """
    bare = _bare_path(group)
    known = [_bare_path(g) for g in groups]
    related = any(bare == g or bare.startswith(g + "/") or g.startswith(bare + "/") for g in known)
    if not related:
        raise ValueError(
            f"Unknown group {group!r} ({where}, phase starting at {unit} {phase.start}). "
            f"Valid groups: {', '.join(groups)}."
        )


def _bare_path(pattern: str) -> str:
    """A group or block selector's path without the selector."""
    return re.sub(r"\[[^\]]*\]", "", pattern).rstrip("/")


def _group_trains(spec: _spec.FreezeSpec, group: str) -> bool:
    rule = _spec.Rule(group)
    if rule.kind == "block":
        return _block_group_trains(spec, rule)
    for rule in spec.rules:
        if rule.matches(group):
            return rule.state == _spec.TRAINABLE
        if (
            rule.kind == "group"
            and rule.state == _spec.TRAINABLE
            and rule.pattern.startswith(group + "/")
        ):
            return True
    return spec.default == _spec.TRAINABLE


def _block_group_trains(spec: _spec.FreezeSpec, group: _spec.Rule) -> bool:
    """Whether a block group (`stack[i]`) trains, decided without the params.

    Rules over the same stack decide block by block; a selector with a
    negative bound (which needs the depth) counts as matching.
    """
    start, stop, _ = group.selector
    path = group.stack
    if start is None or start < 0 or (stop is not None and stop < 0):
        return any(r.state == _spec.TRAINABLE for r in spec.rules) or (
            spec.default == _spec.TRAINABLE
        )
    for row in range(start, start + 1 if stop is None else stop):
        state = None
        for rule in spec.rules:
            if rule.kind == "block":
                if rule.stack != path:
                    continue
                a, b, _ = rule.selector
                if (a is not None and a < 0) or (b is not None and b < 0):
                    hit = True
                else:
                    hit = (a or 0) <= row and (b is None or row < b)
            else:
                hit = rule.matches(path)
            if hit:
                state = rule.state
                break
        if (state or spec.default) == _spec.TRAINABLE:
            return True
    return False
