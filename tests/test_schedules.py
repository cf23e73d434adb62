"""Tests for `layerfreeze.schedules`: phases, schedules, constructors, parsing."""

import dataclasses
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

import layerfreeze as lf
from layerfreeze import FreezeSpec
from layerfreeze import schedules as S

GROUPS = ("stem", "stage1", "stage2", "stage3", "stage4", "head")
PARAMS = {
    "stem": {"Conv_0": {"kernel": 0.0}},
    "stage1": {"Block_0": {"kernel": 0.0}, "Block_1": {"kernel": 0.0}},
    "stage2": {"Block_0": {"kernel": 0.0}},
    "stage3": {"Block_0": {"kernel": 0.0}},
    "stage4": {"Block_0": {"kernel": 0.0}},
    "head": {"bias": 0.0, "kernel": 0.0},
}


def frozen_groups(spec: FreezeSpec) -> set[str]:
    """Top-level groups with a frozen leaf, resolved against PARAMS."""
    return {path.split("/")[0] for path, frozen in spec.resolve(PARAMS).items() if frozen}


def specs(schedule: S.FreezeSchedule) -> list[str]:
    return [p.spec.describe() for p in schedule.phases]


# Phase -----------------------------------------------------------------------


def test_phase_converts_spec_and_multipliers():
    phase = S.Phase(3, "all-but:head", {"stem": 0.5, "head": 1})
    assert phase.spec == FreezeSpec.parse("all-but:head")
    assert phase.lr_multipliers == (("stem", 0.5), ("head", 1.0))
    assert phase.multipliers == {"stem": 0.5, "head": 1.0}
    assert phase.multipliers.get("stage1", 1.0) == 1.0
    assert phase.multipliers["stem"] == 0.5


def test_phase_is_hashable_and_equal_by_value():
    a = S.Phase(5, FreezeSpec.parse("stem,stage1"), (("stem", 0.1),))
    b = S.Phase(5, "stem,stage1", {"stem": 0.1})
    assert a == b and hash(a) == hash(b)
    cache = {a: "step A"}
    assert cache[b] == "step A"
    assert S.Phase(5, "stem") != a
    assert S.Phase(6, "stem,stage1", {"stem": 0.1}) != a
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.start = 1  # type: ignore[misc]


def test_schedule_is_hashable():
    assert hash(S.gradual_unfreezing(GROUPS)) == hash(S.gradual_unfreezing(GROUPS))
    assert S.gradual_unfreezing(GROUPS) == S.gradual_unfreezing(list(GROUPS))


def test_phase_trainable_groups():
    assert S.Phase(0, "all-but:head,stage4").trainable_groups(GROUPS) == ("stage4", "head")
    assert S.Phase(0, "none").trainable_groups(GROUPS) == GROUPS
    assert S.Phase(0, "all").trainable_groups(GROUPS) == ()
    assert S.Phase(0, "stem,stage1").trainable_groups(GROUPS) == GROUPS[2:]
    assert S.Phase(0, "stage*").trainable_groups(GROUPS) == ("stem", "head")
    # Part of stage1 trains: stage1 counts as trainable.
    spec = FreezeSpec((("stage1/Block_1", "trainable"), ("stage1", "frozen")))
    assert S.Phase(0, spec).trainable_groups(GROUPS) == GROUPS


def test_phase_describe():
    phase = S.Phase(5, "all-but:stage4,head", {"stage4": 0.1})
    assert phase.describe() == "5: freeze all-but:stage4,head; lr stage4=0.1"
    assert phase.describe("step") == "step 5: freeze all-but:stage4,head; lr stage4=0.1"
    assert S.Phase(0).describe("epoch") == "epoch 0: freeze none"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"start": -1}, ValueError, "must be >= 0"),
        ({"start": 1.5}, TypeError, "integer"),
        ({"start": True}, TypeError, "integer"),
        ({"start": 0, "lr_multipliers": {"stem": -0.5}}, ValueError, r"'stem'.*must be >= 0"),
        ({"start": 0, "lr_multipliers": {"stem": float("nan")}}, ValueError, "must be >= 0"),
        ({"start": 0, "lr_multipliers": {"stem": "x"}}, TypeError, "number"),
        ({"start": 0, "lr_multipliers": (("stem", 1.0), ("stem", 2.0))}, ValueError, "twice"),
    ],
)
def test_phase_rejects(kwargs, error, match):
    with pytest.raises(error, match=match):
        S.Phase(**kwargs)


# FreezeSchedule ------------------------------------------------------------------


def test_schedule_rejects_negative_multiplier_naming_group_and_value():
    with pytest.raises(ValueError, match=r"'stage2'.*must be >= 0.*-1\.0"):
        S.FreezeSchedule((S.Phase(0, "none", {"stage2": -1.0}),))


def test_schedule_rejects_non_increasing_starts():
    phases = (S.Phase(0), S.Phase(5, "stem"), S.Phase(5, "all"))
    with pytest.raises(ValueError, match=r"non-increasing: 5 then 5 \(starts: 0, 5, 5\)"):
        S.FreezeSchedule(phases)
    with pytest.raises(ValueError, match=r"non-increasing: 7 then 3"):
        S.FreezeSchedule((S.Phase(0), S.Phase(7), S.Phase(3)))


def test_schedule_rejects_first_phase_not_at_zero():
    with pytest.raises(ValueError, match=r"first phase must start at epoch 0, got 2"):
        S.FreezeSchedule((S.Phase(2), S.Phase(4)))


def test_schedule_rejects_empty_bad_unit_and_non_phases():
    with pytest.raises(ValueError, match="at least one phase"):
        S.FreezeSchedule(())
    with pytest.raises(ValueError, match=r"unit must be one of epoch, step, got 'batch'"):
        S.FreezeSchedule((S.Phase(0),), "batch")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Phase objects"):
        S.FreezeSchedule(((0, "none"),))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="single Phase"):
        S.FreezeSchedule(S.Phase(0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="total must be > the last phase's start 5"):
        S.FreezeSchedule((S.Phase(0), S.Phase(5)), total=5)


def test_phase_at_boundaries():
    s = S.explicit({0: "all", 3: "stem,stage1", 10: "none"})
    assert s.boundaries == (0, 3, 10)
    assert len(s) == 3
    expected = {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 9: 1, 10: 2, 11: 2, 10_000: 2}
    for t, i in expected.items():
        assert s.phase_index(t) == i, t
        assert s.phase_at(t) is s.phases[i]
    assert s.phase_index(2.999) == 0
    assert s.phase_index(3.0) == 1
    assert [t in s.boundaries for t in (0, 2, 3, 10)] == [True, False, True, True]
    assert list(s) == list(s.phases)


def test_previous_specs_are_the_earlier_phases_specs():
    s = S.explicit({0: "all", 3: "stem,stage1", 10: "none"})
    assert s.previous_specs(0) == ()
    assert s.previous_specs(2) == (s.phases[0].spec, s.phases[1].spec)
    for bad in (3, -1):
        with pytest.raises(IndexError, match=r"phases 0\.\.2"):
            s.previous_specs(bad)
    with pytest.raises(TypeError, match="integer"):
        s.previous_specs(1.5)


def test_previous_specs_give_each_unfrozen_group_its_phase():
    s = S.gradual_unfreezing(GROUPS, every=2)
    last = len(s) - 1
    since = lf.trainable_since(PARAMS, s.phases[last].spec, s.previous_specs(last))
    by_group = {path.split("/")[0]: i for path, i in since.items()}
    assert by_group == {"head": 0, "stage4": 1, "stage3": 2, "stage2": 3, "stage1": 4, "stem": 5}


def test_phase_at_rejects_negative_and_non_numbers():
    s = S.constant("none")
    with pytest.raises(ValueError, match="must be >= 0, got -1"):
        s.phase_at(-1)
    with pytest.raises(TypeError, match="integer"):
        s.phase_at("3")  # type: ignore[arg-type]


def test_validate_unknown_group_lists_valid_groups():
    with pytest.raises(ValueError, match=r"Unknown group 'stage9'.*Valid groups: stem, stage1"):
        S.explicit({0: "all-but:head", 4: "stage9"}).validate(GROUPS)
    with pytest.raises(ValueError, match=r"'stage5/Block_0'.*freeze rule.*epoch 0"):
        S.constant("stage5/Block_0").validate(GROUPS)
    with pytest.raises(ValueError, match=r"'neck'.*learning-rate multiplier.*Valid groups"):
        S.constant("none", lr_multipliers={"neck": 0.5}).validate(GROUPS)


def test_validate_accepts_paths_globs_regexes_and_returns_self():
    s = S.explicit({0: "stage1/Block_0,*/kernel", 2: "re:stage[12]/.*", 4: "all"})
    assert s.validate(GROUPS) is s


def test_validate_rejects_bad_groups_argument():
    with pytest.raises(TypeError, match="sequence of group names"):
        S.constant("none").validate("stem")
    with pytest.raises(ValueError, match="Duplicate"):
        S.constant("none").validate(["stem", "stem"])
    with pytest.raises(ValueError, match="empty"):
        S.constant("none").validate([])


def test_schedule_describe():
    s = S.fine_tune(1, 2, ("stem", "head"), lr_mult=10)
    assert s.describe() == (
        "epoch 0: freeze all-but:head\nepoch 1: freeze none; lr stem=0.05, head=0.5\nepoch 3: end"
    )
    assert str(S.constant("stem", unit="step")) == "step 0: freeze stem"


# Constructors ----------------------------------------------------------------------


def test_constant():
    s = S.constant("stem,stage1", lr_multipliers={"head": 2.0})
    assert len(s) == 1 and s.unit == "epoch" and s.total is None
    assert specs(s) == ["stem,stage1"]
    assert s.phase_at(0).multipliers == {"head": 2.0}
    assert s.phase_at(999) is s.phases[0]
    assert frozen_groups(s.phases[0].spec) == {"stem", "stage1"}
    assert S.constant(None).phases[0].spec == FreezeSpec()


def test_explicit_sorts_and_converts():
    spec = FreezeSpec.parse("stem,stage1")
    s = S.explicit({5: spec, 0: "all-but:head"}, unit="step")
    assert s.unit == "step"
    assert s.boundaries == (0, 5)
    assert specs(s) == ["all-but:head", "stem,stage1"]
    assert s.phases[1].spec is spec
    assert frozen_groups(s.phases[0].spec) == set(GROUPS) - {"head"}
    assert frozen_groups(s.phases[1].spec) == {"stem", "stage1"}


def test_explicit_rejects():
    with pytest.raises(ValueError, match="first phase must start at epoch 0"):
        S.explicit({1: "none"})
    with pytest.raises(TypeError, match="mapping"):
        S.explicit([(0, "none")])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="integer"):
        S.explicit({"0": "none"})  # type: ignore[dict-item]


def test_unfreeze_is_cumulative():
    s = S.unfreeze({0: "head", 5: "stage4", 10: "stage3"}, GROUPS)
    assert s.boundaries == (0, 5, 10)
    assert specs(s) == ["all-but:head", "all-but:head,stage4", "all-but:head,stage4,stage3"]
    assert frozen_groups(s.phase_at(4).spec) == {"stem", "stage1", "stage2", "stage3", "stage4"}
    assert frozen_groups(s.phase_at(5).spec) == {"stem", "stage1", "stage2", "stage3"}
    assert frozen_groups(s.phase_at(12).spec) == {"stem", "stage1", "stage2"}
    assert s.phase_at(12).trainable_groups(GROUPS) == ("stage3", "stage4", "head")


def test_unfreeze_several_groups_at_once_and_to_none():
    s = S.unfreeze({0: ["head", "stage4"], 2: "stage3,stage2", 4: ("stage1", "stem")}, GROUPS)
    assert specs(s) == ["all-but:head,stage4", "all-but:head,stage4,stage3,stage2", "none"]
    assert frozen_groups(s.phases[-1].spec) == set()


def test_unfreeze_multipliers_in_every_phase():
    s = S.unfreeze({0: "head", 1: "stage4"}, GROUPS, lr_multipliers={"stage4": 0.1})
    assert [p.lr_multipliers for p in s.phases] == [(("stage4", 0.1),)] * 2


@pytest.mark.parametrize(
    ("mapping", "match"),
    [
        ({0: "head", 5: "stage9"}, r"unknown group 'stage9' at epoch 5.*Valid groups: stem"),
        ({0: "head", 5: "head"}, "unfrozen twice"),
        ({0: "head", 5: []}, "no group to unfreeze at epoch 5"),
        ({3: "head"}, "first phase must start at epoch 0"),
    ],
)
def test_unfreeze_rejects(mapping, match):
    with pytest.raises(ValueError, match=match):
        S.unfreeze(mapping, GROUPS)


def test_unfreeze_rejects_unknown_multiplier_group():
    with pytest.raises(ValueError, match=r"'neck'.*Valid groups"):
        S.unfreeze({0: "head"}, GROUPS, lr_multipliers={"neck": 0.1})


def test_gradual_unfreezing_order():
    s = S.gradual_unfreezing(GROUPS)
    assert len(s) == len(GROUPS)
    assert s.boundaries == (0, 1, 2, 3, 4, 5)
    assert specs(s) == [
        "all-but:head",
        "all-but:head,stage4",
        "all-but:head,stage4,stage3",
        "all-but:head,stage4,stage3,stage2",
        "all-but:head,stage4,stage3,stage2,stage1",
        "none",
    ]
    trained = [p.trainable_groups(GROUPS) for p in s.phases]
    assert trained[0] == ("head",)
    assert [set(b) - set(a) for a, b in itertools.pairwise(trained)] == [
        {"stage4"},
        {"stage3"},
        {"stage2"},
        {"stage1"},
        {"stem"},
    ]
    assert frozen_groups(s.phases[-1].spec) == set()
    assert frozen_groups(s.phases[-2].spec) == {"stem"}


def test_gradual_unfreezing_every_start_unit_and_multipliers():
    s = S.gradual_unfreezing(GROUPS[-3:], every=3, start=2, unit="step", lr_multipliers={"head": 2})
    assert s.unit == "step"
    assert s.boundaries == (0, 5, 8)
    assert specs(s) == ["all-but:head", "all-but:head,stage4", "none"]
    assert all(p.multipliers == {"head": 2.0} for p in s.phases)
    assert specs(S.gradual_unfreezing(["head"])) == ["none"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"every": 0}, ValueError, "every must be >= 1"),
        ({"start": -1}, ValueError, "start must be >= 0"),
        ({"every": 1.5}, TypeError, "every must be an integer"),
        ({"unit": "batch"}, ValueError, "unit must be one of"),
    ],
)
def test_gradual_unfreezing_rejects(kwargs, error, match):
    with pytest.raises(error, match=match):
        S.gradual_unfreezing(GROUPS, **kwargs)


@pytest.mark.parametrize(
    ("n", "frozen"),
    [
        (0, []),
        (2, ["stem", "stage1"]),
        (6, list(GROUPS)),
        (-1, list(GROUPS[:-1])),
        (-2, list(GROUPS[:-2])),
        (-6, []),
    ],
)
def test_freeze_to(n, frozen):
    spec = S.freeze_to(n, GROUPS)
    assert spec.describe() == (",".join(frozen) or "none")
    assert frozen_groups(spec) == set(frozen)


@pytest.mark.parametrize("n", [7, -7, 100])
def test_freeze_to_out_of_range(n):
    with pytest.raises(ValueError, match=rf"n={n} is out of range for 6 groups.*valid: -6 to 6"):
        S.freeze_to(n, GROUPS)


def test_freeze_to_rejects_non_int():
    with pytest.raises(TypeError, match="integer"):
        S.freeze_to(1.0, GROUPS)  # type: ignore[arg-type]


def test_fine_tune():
    s = S.fine_tune(2, 4, GROUPS, lr_mult=100.0)
    assert s.boundaries == (0, 2)
    assert s.total == 6
    first, second = s.phases
    assert first.spec.describe() == "all-but:head"
    assert frozen_groups(first.spec) == set(GROUPS) - {"head"}
    assert first.lr_multipliers == ()
    assert second.spec.describe() == "none"
    m = second.multipliers
    assert list(m) == list(GROUPS)
    assert m["stem"] == pytest.approx(0.5 / 100)
    assert m["head"] == 0.5
    ratios = [m[b] / m[a] for a, b in itertools.pairwise(GROUPS)]
    assert ratios == pytest.approx([100 ** (1 / 5)] * 5)


def test_fine_tune_without_freeze_epochs_and_with_one_group():
    s = S.fine_tune(0, 3, GROUPS)
    assert s.boundaries == (0,) and s.total == 3
    assert s.phases[0].spec == FreezeSpec()
    assert S.fine_tune(1, 1, ["head"]).phases[1].multipliers == {"head": 0.5}


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((1, 0), {}, r"epochs \(after unfreezing\) must be > 0, got 0"),
        ((-1, 2), {}, "freeze_epochs must be >= 0"),
        ((1, 2), {"lr_mult": 0}, "lr_mult must be > 0"),
    ],
)
def test_fine_tune_rejects(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        S.fine_tune(*args, GROUPS, **kwargs)


# Parsing ---------------------------------------------------------------------------


def test_parse_gradual():
    assert S.parse_schedule("gradual", GROUPS) == S.gradual_unfreezing(GROUPS)
    assert S.parse_schedule(" gradual:every=2 ", GROUPS) == S.gradual_unfreezing(GROUPS, every=2)
    assert S.parse_schedule("gradual:every=2,start=1", GROUPS, unit="step") == (
        S.gradual_unfreezing(GROUPS, every=2, start=1, unit="step")
    )


def test_parse_unfreeze():
    s = S.parse_schedule("unfreeze:0=head,5=stage4,10=stage3", GROUPS)
    assert s == S.unfreeze({0: "head", 5: "stage4", 10: "stage3"}, GROUPS)
    joined = S.parse_schedule("unfreeze: 0=head, stage4, 3=stage3", GROUPS)
    assert specs(joined) == ["all-but:head,stage4", "all-but:head,stage4,stage3"]


def test_parse_explicit():
    s = S.parse_schedule("explicit:0=all-but:head;5=none", GROUPS)
    assert s == S.explicit({0: "all-but:head", 5: "none"})
    s = S.parse_schedule("explicit:0=all; 2=stem,stage1 ;4=re:stem/.*", GROUPS)
    assert specs(s) == ["all", "stem,stage1", "re:stem/.*"]


def test_parse_fine_tune():
    s = S.parse_schedule("fine_tune:freeze_epochs=1,epochs=4,lr_mult=100", GROUPS)
    assert s == S.fine_tune(1, 4, GROUPS, lr_mult=100)
    assert S.parse_schedule("fine-tune:epochs=3", GROUPS) == S.fine_tune(1, 3, GROUPS)
    assert S.parse_schedule("fine_tune:epochs=3,lr_mult=2.5", GROUPS) == (
        S.fine_tune(1, 3, GROUPS, lr_mult=2.5)
    )


@pytest.mark.parametrize("text", ["none", "all", "stem,stage1", "all-but:head", "re:stem/.*"])
def test_parse_plain_spec_is_constant(text):
    s = S.parse_schedule(text, GROUPS, unit="step")
    assert s == S.constant(text, unit="step")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("gradul:every=2", "Unknown schedule form 'gradul'"),
        ("gradual:evry=2", "'evry=2' is not one of every, start"),
        ("gradual:every=two", "bad value for every"),
        ("gradual:every=1,every=2", "every given twice"),
        ("gradual:every=0", "every must be >= 1"),
        ("unfreeze:", "needs start=group entries"),
        ("unfreeze:head", "first entry must be start=group"),
        ("unfreeze:x=head", "'x' is not an integer start"),
        ("unfreeze:0=head,5=", "empty group name"),
        ("unfreeze:0=head,5=stage9", "unknown group 'stage9'.*Valid groups"),
        ("unfreeze:0=head,10=stage4,5=stage3", "non-increasing: 10 then 5"),
        ("explicit:", "needs start=spec entries"),
        ("explicit:0=none;all", "'all' is not start=spec"),
        ("explicit:2=none", "first phase must start at epoch 0"),
        ("explicit:0=all-but:neck", "Unknown group 'neck'.*Valid groups"),
        ("fine_tune:freeze_epochs=1", "missing epochs"),
        ("fine_tune:epochs=0", "epochs .* must be > 0"),
        ("fine_tune:epochs=2,lr_mult=-1", "lr_mult must be > 0"),
        ("stage9", "Unknown group 'stage9'.*Valid groups: stem.*Valid schedule forms"),
    ],
)
def test_parse_rejects(text, match):
    with pytest.raises(ValueError, match=match) as info:
        S.parse_schedule(text, GROUPS)
    if "form" in match or "not one of" in match or "start=" in match:
        assert "Valid schedule forms: 'gradual'" in str(info.value)


def test_parse_rejects_non_string():
    with pytest.raises(TypeError, match="schedule string"):
        S.parse_schedule(3, GROUPS)  # type: ignore[arg-type]


# Learning-rate multipliers ---------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   "])
def test_parse_lr_multipliers_empty_is_none(text):
    assert S.parse_lr_multipliers(text, GROUPS) == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ulmfit", lf.lr.ulmfit_multipliers(GROUPS, 2.6)),
        ("ulmfit:2.6", lf.lr.ulmfit_multipliers(GROUPS, 2.6)),
        (" ULMFiT : 2 ", lf.lr.ulmfit_multipliers(GROUPS, 2.0)),
        ("ulmfit:0.5", lf.lr.ulmfit_multipliers(GROUPS, 0.5)),
        ("geometric", lf.lr.geometric_multipliers(GROUPS, 1e-2, 1.0)),
        ("geometric:1e-3", lf.lr.geometric_multipliers(GROUPS, 1e-3, 1.0)),
        ("geometric:1", dict.fromkeys(GROUPS, 1.0)),
    ],
)
def test_parse_lr_multipliers_recipes(text, expected):
    assert lf.schedules.parse_lr_multipliers is S.parse_lr_multipliers
    got = S.parse_lr_multipliers(text, GROUPS)
    assert got == expected
    assert list(got) == list(GROUPS)
    assert got["head"] == 1.0


def test_parse_lr_multipliers_ulmfit_values():
    assert S.parse_lr_multipliers("ulmfit:2", ["a", "b", "c"]) == {"a": 0.25, "b": 0.5, "c": 1.0}
    assert S.parse_lr_multipliers("geometric:1e-2", ["a", "b", "c"]) == {
        "a": 0.01,
        "b": 0.1,
        "c": 1.0,
    }


def test_parse_lr_multipliers_explicit_in_group_order():
    got = S.parse_lr_multipliers(" stage1 = 0.3, stem=0.1,head=0,", GROUPS)
    assert got == {"stem": 0.1, "stage1": 0.3, "head": 0.0}
    assert list(got) == ["stem", "stage1", "head"]


_LR_FORMS = "Valid forms: '' (none), 'ulmfit', 'ulmfit:<factor>', 'geometric'"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "ulmfit:x",
            "Learning-rate multipliers 'ulmfit:x': 'x' is not a number: ulmfit:<factor> "
            "takes a factor > 0, e.g. 'ulmfit:2.6'.",
        ),
        ("ulmfit:", "'ulmfit:': '' is not a number: ulmfit:<factor> takes a factor > 0"),
        ("ulmfit:0", "'ulmfit:0': a factor must be > 0, got '0': ulmfit:<factor> takes"),
        ("ulmfit:-2.6", "a factor must be > 0, got '-2.6'"),
        ("ulmfit:inf", "'inf' is not a finite number: ulmfit:<factor>"),
        ("geometric:lo", "'lo' is not a number: geometric:<ratio> takes the first group's"),
        ("geometric:0", "a ratio must be > 0 and <= 1, got '0'"),
        ("geometric:100", "a ratio must be > 0 and <= 1, got '100': geometric:<ratio>"),
        ("geometric:nan", "'nan' is not a finite number"),
        ("slice:1e-2", "'slice:1e-2': unknown form 'slice'."),
        ("stage1", "'stage1' is a group without a multiplier: write e.g. 'stage1=0.1'"),
        (
            "stem=0.1,neck=2",
            "unknown group 'neck'; valid groups: stem, stage1, stage2, stage3, stage4, head.",
        ),
        ("stem=0.1,stage1", "'stage1' is not group=multiplier."),
        ("=0.1", "'=0.1' is not group=multiplier."),
        ("stem=x", "'x' is not a number: group=multiplier takes a multiplier >= 0"),
        ("stem=-0.1", "a multiplier must be >= 0, got '-0.1' for 'stem'."),
        ("stem=0.1,stem=0.2", "group 'stem' is given twice."),
    ],
)
def test_parse_lr_multipliers_rejects(text, problem):
    with pytest.raises(ValueError) as info:
        S.parse_lr_multipliers(text, GROUPS)
    message = str(info.value)
    assert message.startswith(f"Learning-rate multipliers {text!r}: ")
    assert problem in message
    assert _LR_FORMS in message


def test_parse_lr_multipliers_rejects_non_string_and_bad_groups():
    with pytest.raises(TypeError, match=r"must be given as a string, got dict: \{\}"):
        S.parse_lr_multipliers({}, GROUPS)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="groups is empty"):
        S.parse_lr_multipliers("ulmfit", [])


def test_with_lr_multipliers_sets_every_phase_and_keeps_the_rest():
    schedule = S.fine_tune(1, 4, GROUPS, unit="step")
    mults = S.parse_lr_multipliers("ulmfit:2", GROUPS)
    got = schedule.with_lr_multipliers(mults)
    assert [p.multipliers for p in got.phases] == [mults, mults]
    assert [p.spec for p in got.phases] == [p.spec for p in schedule.phases]
    assert (got.boundaries, got.unit, got.total) == (schedule.boundaries, "step", 5)
    assert got.validate(GROUPS) is got
    # Replaced, not merged; {} removes them; the original is unchanged.
    assert got.with_lr_multipliers({"stem": 0.5}).phases[1].multipliers == {"stem": 0.5}
    assert all(p.lr_multipliers == () for p in got.with_lr_multipliers({}).phases)
    assert schedule.phases[1].multipliers["head"] == 0.5


def test_with_lr_multipliers_is_validated():
    schedule = S.constant("stem").with_lr_multipliers({"neck": 0.1})
    with pytest.raises(ValueError, match=r"Unknown group 'neck' .*Valid groups: stem"):
        schedule.validate(GROUPS)
    with pytest.raises(ValueError, match="must be >= 0"):
        S.constant("stem").with_lr_multipliers({"stem": -1.0})


# Properties --------------------------------------------------------------------


@given(
    gaps=st.lists(st.integers(min_value=1, max_value=50), min_size=0, max_size=8),
    t=st.integers(min_value=0, max_value=500),
)
def test_phase_at_is_last_phase_started(gaps, t):
    starts = [0]
    for gap in gaps:
        starts.append(starts[-1] + gap)
    schedule = S.FreezeSchedule(tuple(S.Phase(s) for s in starts))
    expected = max(i for i, s in enumerate(starts) if s <= t)
    assert schedule.phase_index(t) == expected
    assert schedule.phase_at(t).start <= t
    if expected + 1 < len(starts):
        assert starts[expected + 1] > t


def test_validate_and_parse_with_path_prefix_groups():
    # A ViT's groups: path prefixes under a shared top-level `Transformer`.
    groups = ("embedding", "Transformer/encoderblock_0", "Transformer/encoderblock_1", "head")
    s = S.constant(
        "embedding,Transformer/encoderblock_0", lr_multipliers={"Transformer/encoderblock_1": 0.5}
    )
    assert s.validate(groups) is s
    with pytest.raises(ValueError, match=r"'stage1/Block_0'.*Valid groups: embedding, Tr"):
        S.constant("stage1/Block_0").validate(groups)
    gradual = S.parse_schedule("gradual", groups)
    assert [p.spec.describe() for p in gradual.phases] == [
        "all-but:head",
        "all-but:head,Transformer/encoderblock_1",
        "all-but:head,Transformer/encoderblock_1,Transformer/encoderblock_0",
        "none",
    ]
    spec = S.parse_schedule("embedding,Transformer/encoderblock_0", groups).phases[0].spec
    assert spec.describe() == "embedding,Transformer/encoderblock_0"
