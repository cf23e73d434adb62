"""`benchmarks/freeze_cost.py` on a tiny ResNet-18 and tiny ViTs: rows, ratios, JSON, bad input."""

import json

import freeze_cost
import jax
import pytest
import report

from layerfreeze import FreezeSpec

FREEZES = ("none", "stem,stage1,stage2", "all-but:head")


@pytest.fixture(scope="module")
def rows():
    # Width 8 at 16x16. Compiling dominates (seconds per step function even
    # this small), so two frozen specs and method zero only.
    return freeze_cost.measure_model(
        "resnet18",
        batch_size=4,
        image_size=16,
        width=8,
        freezes=FREEZES,
        methods=("zero",),
        steps=2,
        warmup=1,
        log=lambda msg: None,
    )


def test_rows_cover_every_config(rows):
    configs = [(r["freeze"], r["method"]) for r in rows]
    assert configs == [(f, "zero") for f in FREEZES]


def test_json_has_the_documented_keys(rows, tmp_path):
    path = tmp_path / "rows.json"
    report.write_json(str(path), rows)
    loaded = json.loads(path.read_text())
    assert len(loaded) == len(rows)
    for row in loaded:
        assert set(freeze_cost.ROW_KEYS) <= set(row)
        assert row["step_ms"] > 0


def test_all_trainable_is_the_baseline(rows):
    (full,) = [r for r in rows if r["freeze"] == "none" and r["method"] == "zero"]
    assert full["flops_ratio_full"] == 1.0
    assert full["step_ratio_full"] == 1.0


def test_zero_method_matches_the_ideal_step(rows):
    full = rows[0]
    frozen_zero = [r for r in rows if r["method"] == "zero" and r["freeze"] != "none"]
    assert frozen_zero
    for row in frozen_zero:
        assert row["flops_ratio_ideal"] <= freeze_cost.IDEAL_TOLERANCE, row
        assert row["flops"] < full["flops"], row
        assert row["opt_state_bytes"] < full["opt_state_bytes"], row
    assert freeze_cost.ideal_warnings(rows) == []


def test_table_and_markdown_name_every_row(rows, tmp_path):
    table = freeze_cost.format_table(rows)
    assert "xideal" in table and "all but head" in table
    path = tmp_path / "results.md"
    freeze_cost.write_markdown(str(path), rows, "python benchmarks/freeze_cost.py --quick")
    text = path.read_text()
    assert "Machine:" in text and "--quick" in text
    assert text.count("| resnet18 |") == len(rows)


def test_warning_when_frozen_work_survives(rows):
    bad = [dict(rows[1], flops_ratio_ideal=1.5)]
    (line,) = freeze_cost.ideal_warnings(bad)
    assert line.startswith("WARNING") and "stem,stage1,stage2" in line


# Two blocks of width 32 on 16x16 images (16 tokens): the ViT path at a few seconds a step.
TINY_VIT = {"width": 32, "model_kw": {"depth": 2, "mlp_dim": 64, "num_heads": 2}}
EMBEDDINGS = "embedding,pos_embedding,cls"


@pytest.fixture(scope="module")
def vit_rows():
    # Compiling dominates (seconds per step function): two specs of the scanned layout.
    # That it costs what the unrolled layout costs is tests/test_stacked.py's check.
    return freeze_cost.measure_model(
        "vit_ti4_scan",
        freezes=("none", f"{EMBEDDINGS},Transformer/encoderblock[:1]"),
        log=lambda msg: None,
        batch_size=4,
        image_size=16,
        methods=("zero",),
        steps=1,
        warmup=0,
        **TINY_VIT,
    )


def test_vit_rows_shrink_and_match_the_ideal_step(vit_rows):
    assert [r["freeze"] for r in vit_rows] == ["none", f"{EMBEDDINGS},Transformer/encoderblock[:1]"]
    # A frozen block of the stack holds no optimizer state and costs no backward work.
    assert vit_rows[1]["opt_state_bytes"] < vit_rows[0]["opt_state_bytes"]
    assert vit_rows[1]["flops"] < vit_rows[0]["flops"], vit_rows
    assert vit_rows[1]["flops_ratio_ideal"] <= freeze_cost.IDEAL_TOLERANCE, vit_rows[1]
    assert freeze_cost.ideal_warnings(vit_rows) == []
    assert "Transformer/encoderblock[:1]" in freeze_cost.format_table(vit_rows)


@pytest.mark.parametrize("model", list(freeze_cost.MODELS))
def test_every_row_spec_resolves_against_its_model(model):
    freezes = freeze_cost.model_freezes(model)
    assert freezes[0] == "none" and freezes[-1] == "all-but:head"
    setup = freeze_cost.MODELS[model]
    net = freeze_cost.build_model(model)
    x = jax.ShapeDtypeStruct((1, setup.image_size, setup.image_size, 3), "float32")
    params = jax.eval_shape(lambda x: net.init(jax.random.key(0), x, train=False), x)["params"]
    frozen_counts = [sum(FreezeSpec.parse(f).resolve(params).values()) for f in freezes]
    assert frozen_counts == sorted(frozen_counts) and frozen_counts[0] == 0, frozen_counts
    assert all(freeze_cost.freeze_label(f) for f in freezes)


def test_models_flag_picks_the_vit():
    assert freeze_cost.parse_args(["--models", "vit_ti4"]).models == ["vit_ti4"]
    assert freeze_cost.parse_args([]).models == list(freeze_cost.MODELS)


def test_unknown_model_is_an_error(capsys):
    with pytest.raises(ValueError, match="resnet18, resnet50"):
        freeze_cost.measure_model("vgg16")
    with pytest.raises(SystemExit) as exit_info:
        freeze_cost.main(["--models", "resnet18,vgg16"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "'vgg16'" in err and "resnet18, resnet50" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dtype", "float16"], "float32, bfloat16"),
        (["--steps", "0"], "--steps"),
        (["--models", ""], "resnet18, resnet50"),
    ],
)
def test_bad_arguments_exit_nonzero(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        freeze_cost.main(argv)
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err
