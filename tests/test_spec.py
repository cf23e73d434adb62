import optax
import pytest

from layerfreeze import FROZEN, TRAINABLE, FreezeSpec, Rule, as_spec

PATHS = [
    "stem/Conv_0/kernel",
    "stem/BatchNorm_0/scale",
    "stem/BatchNorm_0/bias",
    "stage1/Block_0/Conv_0/kernel",
    "stage1/Block_0/BatchNorm_0/scale",
    "stage10/kernel",
    "stage2/Block_0/Conv_0/kernel",
    "head/Dense_0/kernel",
    "head/Dense_0/bias",
]


def frozen(spec, paths=PATHS):
    return sorted(p for p, f in as_spec(spec).resolve_paths(paths).items() if f)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("none", []),
        ("all", sorted(PATHS)),
        ("ALL", sorted(PATHS)),
        ("stem", ["stem/BatchNorm_0/bias", "stem/BatchNorm_0/scale", "stem/Conv_0/kernel"]),
        # A group matches at a component boundary: stage1 is not stage10.
        ("stage1", ["stage1/Block_0/BatchNorm_0/scale", "stage1/Block_0/Conv_0/kernel"]),
        ("stage1/Block_0/Conv_0", ["stage1/Block_0/Conv_0/kernel"]),
        ("all-but:head", sorted(p for p in PATHS if not p.startswith("head/"))),
        (
            "all-but:head,stage2",
            sorted(p for p in PATHS if p.split("/")[0] not in ("head", "stage2")),
        ),
        ("*/kernel", sorted(p for p in PATHS if p.endswith("/kernel"))),
        ("re:stage[12]/.*", sorted(p for p in PATHS if p.split("/")[0] in ("stage1", "stage2"))),
        (" stem , head ", sorted(p for p in PATHS if p.split("/")[0] in ("stem", "head"))),
    ],
)
def test_parse_and_resolve(text, expected):
    assert frozen(FreezeSpec.parse(text)) == expected


def test_first_match_wins():
    spec = FreezeSpec((("stage1/Block_0/BatchNorm_0", TRAINABLE), ("stage1", FROZEN)))
    assert frozen(spec) == ["stage1/Block_0/Conv_0/kernel"]
    reversed_spec = FreezeSpec((("stage1", FROZEN), ("stage1/Block_0/BatchNorm_0", TRAINABLE)))
    assert frozen(reversed_spec) == [
        "stage1/Block_0/BatchNorm_0/scale",
        "stage1/Block_0/Conv_0/kernel",
    ]


def test_big_vision_pairs_none_means_frozen():
    spec = as_spec([("head/.*", "trainable"), ("re:.*", None)])
    # `head/.*` has no glob characters, so it is a path prefix that matches nothing.
    with pytest.raises(ValueError, match=r"'head/\.\*' matches no parameter"):
        spec.resolve_paths(PATHS)
    spec = as_spec([("re:head/.*", "trainable"), ("re:.*", None)])
    assert frozen(spec) == sorted(p for p in PATHS if not p.startswith("head/"))


def test_mapping_spec():
    assert frozen({"stem": "frozen"}) == frozen("stem")


def test_describe_round_trips():
    for text in ["none", "all", "stem,stage1", "all-but:head,stage4", "re:stage[12]/.*"]:
        spec = FreezeSpec.parse(text)
        assert FreezeSpec.parse(spec.describe()) == spec


def test_train_bn_keeps_batchnorm_trainable():
    spec = FreezeSpec.parse("stem,stage1", train_bn=True)
    assert frozen(spec) == ["stage1/Block_0/Conv_0/kernel", "stem/Conv_0/kernel"]


def test_strict_requires_cover():
    spec = FreezeSpec.parse("stem", strict=True)
    with pytest.raises(ValueError, match=r"6 parameter\(s\) are covered by no rule: stage1"):
        spec.resolve_paths(PATHS)
    strict_ok = FreezeSpec((("stem", FROZEN), ("re:.*", TRAINABLE)), strict=True)
    assert frozen(strict_ok) == frozen("stem")


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        (
            "stage9",
            ValueError,
            r"'stage9' matches no parameter\. Groups that exist: stem, stage1, ",
        ),
        ("stem,,head", ValueError, r"Empty pattern in freeze spec 'stem,,head'"),
        ("all-but:", ValueError, r"Empty pattern"),
        ("re:stage[", ValueError, r"Invalid regex in freeze rule 're:stage\['"),
        ("*/nothing", ValueError, r"'\*/nothing' matches no parameter"),
        ([("stem", "sometimes")], ValueError, r"'frozen', 'trainable' or None"),
        ([("stem", "frozen", 3)], TypeError, r"\(pattern, state\) pair"),
        (3.5, TypeError, r"Cannot build a freeze spec from float"),
        ([None], TypeError, r"Freeze rule None is not valid"),
        (optax.adam(0.1), TypeError, r"spec from an optax optimizer .*Were two arguments swapped"),
    ],
)
def test_bad_specs(spec, error, match):
    with pytest.raises(error, match=match):
        as_spec(spec).resolve_paths(PATHS)


def test_rule_rejects_empty_and_bad_state():
    with pytest.raises(ValueError, match="Empty pattern"):
        Rule("  ")
    with pytest.raises(ValueError, match="Rule state must be one of"):
        Rule("stem", "maybe")
    with pytest.raises(ValueError, match="default must be one of"):
        FreezeSpec(default="nope")


@pytest.mark.parametrize("text", ["", "  "])
def test_empty_spec_is_an_error_that_suggests_none(text):
    with pytest.raises(ValueError, match=r"Empty freeze spec. Write 'none' to freeze nothing"):
        as_spec(text)


def test_a_rule_that_matches_inside_variables_params_says_pass_params():
    paths = ["params/stem/kernel", "params/head/kernel", "batch_stats/stem/mean"]
    with pytest.raises(ValueError, match=r"flax variables dict .*pass variables\['params'\]"):
        as_spec("stem").resolve_paths(paths)
    with pytest.raises(ValueError, match=r"matches no parameter\. Groups that exist: [^.]*\. A"):
        as_spec("stage9").resolve_paths(paths)  # not inside params either: no hint
