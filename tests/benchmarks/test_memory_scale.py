"""`benchmarks/memory_scale.py` on a tiny ViT at 1 and 2 devices: rows, targets, bad input."""

import doctest
import json
import pathlib

import jax
import memory_scale
import pytest
import report
from devices import run_on_cpu_devices

BENCHMARKS = pathlib.Path(memory_scale.__file__).resolve().parent

# Width 32, two blocks, 16x16 images of 4x4 patches, 10 classes. min_size 64
# splits every leaf of 64 elements or more, all but a few hundred bytes (cls,
# the patch embedding's bias, the final LayerNorm, the head's bias): the state
# splits within 5% of total/N.
_SCRIPT = f"""
import json, sys
sys.path.insert(0, {str(BENCHMARKS)!r})
import jax
import memory_scale as ms
from layerfreeze import summary
from layerfreeze.train import make_mesh, make_steps, sharding

tiny = ms.ModelSetup("tiny", 4, 16, width=32, depth=2, mlp_dim=64, num_heads=2, num_classes=10)
# Compiling dominates (seconds per full step on 2 busy CPUs): the baseline alone
# at N=1, and all but the head frozen in bfloat16 beside it at N=2. The test
# process's persistent compilation cache makes a rerun's compilations file reads.
jax.config.update("jax_compilation_cache_dir", {jax.config.jax_compilation_cache_dir!r})
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
common = dict(model="tiny", batch_size=2, min_size=64, frozen_dtypes=("bfloat16",),
              layouts=("fsdp",), log=lambda msg: None)
rows = ms.measure(tiny, 1, freezes=("none",), **common)
rows += ms.measure(tiny, 2, freezes=("none", "all-but-head"), **common)

# Without compiling: the per-device count against layerfreeze.summary's, the
# stored dtypes against those TrainSteps.cast_params gives real arrays, and
# the replicated layout's state (no rules) whole on each device.
net = ms.build_model(tiny)
params = ms.abstract_params(net, 16)
mesh = make_mesh({{"data": 1, "fsdp": 2}})
steps = make_steps(net, ms.make_optimizer(), "all-but:head", params, mesh=mesh,
                   sharding_rules=[(".*", sharding.fsdp(min_size=64))], frozen_dtype="bfloat16")
state = ms.abstract_state(steps, params, mesh)
held = summary(state.params, steps.plan, state.opt_state).bytes_per_device
counted = ms.device_bytes((state.params, state.opt_state))
zeros = jax.tree.map(lambda x: jax.numpy.zeros(x.shape, x.dtype), params)
cast = steps.cast_params(zeros)
replicated = ms.abstract_state(make_steps(net, ms.make_optimizer(), "none", params, mesh=mesh),
                               params, mesh)
print(json.dumps({{
    "devices": jax.device_count(),
    "rows": rows,
    "summary": sorted(b["params"] + b["opt_state"] for b in held.values()),
    "counted": sorted(counted.values()),
    "dtypes_match": jax.tree.map(lambda a, b: a.dtype == b.dtype, state.params, cast)
    == jax.tree.map(lambda a: True, cast),
    "replicated": [ms.tree_bytes(replicated), sorted(ms.device_bytes(replicated).values()),
                   ms.replicated_bytes(replicated)],
}}))
"""


@pytest.fixture(scope="module")
def result():
    return run_on_cpu_devices(_SCRIPT, devices=2)


def _row(rows, devices, layout, freeze, dtype):
    (row,) = [
        r
        for r in rows
        if (r["devices"], r["layout"], r["freeze"], r["frozen_dtype"])
        == (devices, layout, freeze, dtype)
    ]
    return row


def test_rows_cover_the_configs_with_the_documented_keys(result, tmp_path):
    rows = result["rows"]
    configs = [(r["devices"], r["layout"], r["freeze"], r["frozen_dtype"]) for r in rows]
    # The baseline (none, float32) is measured though float32 is not listed.
    assert configs == [
        (1, "fsdp", "none", "float32"),
        (2, "fsdp", "none", "float32"),
        (2, "fsdp", "all-but-head", "bfloat16"),
    ]
    path = tmp_path / "rows.json"
    report.write_json(str(path), rows)
    for row in json.loads(path.read_text()):
        assert set(memory_scale.ROW_KEYS) <= set(row)
        assert row["temp_bytes"] > 0 and row["argument_bytes"] >= row["state_bytes_per_device"]


def test_state_splits_evenly_and_counts_as_the_summary_does(result):
    rows = result["rows"]
    for row in rows:
        if row["layout"] == "fsdp":
            assert row["state_ratio_ideal"] <= memory_scale.STATE_TOLERANCE, row
    full1 = _row(rows, 1, "fsdp", "none", "float32")
    full2 = _row(rows, 2, "fsdp", "none", "float32")
    assert full2["state_bytes"] == full1["state_bytes"]
    assert full2["state_bytes_per_device"] < 0.51 * full1["state_bytes_per_device"]
    total, per_device, whole = result["replicated"]  # no rules: all on every device
    assert per_device == [total, total] and whole == total == full1["state_bytes"]
    # Parameters and optimizer state per device, as layerfreeze.summary counts them.
    assert result["summary"] == result["counted"]
    assert result["dtypes_match"]


def test_frozen_bfloat16_costs_less_than_full_fine_tuning(result):
    rows = result["rows"]
    full = _row(rows, 2, "fsdp", "none", "float32")
    frozen = _row(rows, 2, "fsdp", "all-but-head", "bfloat16")
    assert full["peak_ratio_full"] == 1.0 and full["state_ratio_full"] == 1.0
    assert frozen["peak_bytes"] < full["peak_bytes"]
    assert frozen["peak_ratio_full"] == frozen["peak_bytes"] / full["peak_bytes"]
    assert frozen["state_bytes_per_device"] < 0.5 * full["state_bytes_per_device"]


def test_table_markdown_and_warnings(result, tmp_path):
    rows = result["rows"]
    table = memory_scale.format_table(rows)
    assert "xtotal/N" in table and "vs full" in table and "fits 16 GiB" in table
    path = tmp_path / "results.md"
    memory_scale.write_markdown(str(path), rows, "python benchmarks/memory_scale.py --quick")
    text = path.read_text()
    assert "Machine:" in text and "--quick" in text
    assert text.count("| tiny |") == len(rows)
    assert "tiny fsdp none float32: fits 16 GiB at N = 1, 2 (measured at N = 1, 2)" in text
    # Made-up misses: each names the row and where the bytes are.
    full = _row(rows, 2, "fsdp", "none", "float32")
    frozen = _row(rows, 2, "fsdp", "all-but-head", "bfloat16")
    bad = [dict(full, state_ratio_ideal=1.2), dict(frozen, peak_ratio_full=0.5)]
    state_line, full_line = memory_scale.target_warnings(bad)
    assert state_line.startswith("WARNING: tiny N=2") and "whole" in state_line
    assert full_line.startswith("WARNING") and "0.500x full fine-tuning" in full_line
    assert memory_scale.target_warnings(rows) == []


def test_main_collects_the_workers_rows(result, monkeypatch, tmp_path, capsys):
    rows = result["rows"]
    monkeypatch.setattr(
        memory_scale, "run_worker", lambda args, n: [r for r in rows if r["devices"] == n]
    )
    monkeypatch.setattr(memory_scale, "MODELS", {"tiny": None, **memory_scale.MODELS})
    out = memory_scale.main(
        ["--models", "tiny", "--devices", "2,1", "--json", str(tmp_path / "r.json")]
    )
    assert [r["devices"] for r in out] == sorted(r["devices"] for r in rows)
    assert json.loads((tmp_path / "r.json").read_text()) == out
    assert "xtotal/N" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--models", "vit_b16,vgg"], "'vgg'; valid choices: vit_b16, vit_h14, vit_g14"),
        (["--models", ""], "--models is empty"),
        (["--devices", "1,two"], "'two'"),
        (["--devices", "0"], "'0'"),
        (["--batch_size", "6", "--devices", "1,4"], "does not divide over 4 devices"),
        (["--batch_size", "0"], "--batch_size"),
        (["--min_size", "0"], "--min_size"),
        (["--budget_gib", "0"], "--budget_gib"),
    ],
)
def test_bad_arguments_exit_nonzero(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        memory_scale.main(argv)
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err


def test_bad_choices_in_process_are_clear():
    with pytest.raises(ValueError, match="valid choices: none, half, all-but-head"):
        memory_scale.freeze_spec("most", 12)
    with pytest.raises(ValueError, match="valid choices: fsdp, replicated"):
        memory_scale.measure(memory_scale.MODELS["vit_b16"], 1, layouts=("tensor",))
    with pytest.raises(ValueError, match="4096 devices asked for"):
        memory_scale.measure(memory_scale.MODELS["vit_b16"], 4096)


def test_configs_measure_none_once_and_replicated_above_one_device():
    fsdp = [
        ("fsdp", "none", "float32"),
        ("fsdp", "half", "float32"),
        ("fsdp", "half", "bfloat16"),
        ("fsdp", "all-but-head", "float32"),
        ("fsdp", "all-but-head", "bfloat16"),
    ]
    assert memory_scale.configs(1) == fsdp
    replicated = [("replicated", "none", "float32"), ("replicated", "all-but-head", "bfloat16")]
    assert memory_scale.configs(2) == fsdp + replicated
    assert memory_scale.freeze_spec("half", 40).endswith("encoderblock[:20]")


def test_docstring_examples_run():
    result = doctest.testmod(memory_scale)
    assert result.attempted > 0 and result.failed == 0
