"""`layerfreeze.train.pretrained`: reading an earlier run, merging it into a fresh init."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import FrozenDict, freeze

from layerfreeze.train import checkpoint
from layerfreeze.train.pretrained import load_run, merge_pretrained


def _variables(seed=0, *, classes=10, width=4, stage1_width=None, blocks=1, dtype=jnp.float32):
    """A ResNet-like `{"params", "batch_stats"}` with groups stem, stage1, head."""
    rng = np.random.default_rng(seed)
    s1 = stage1_width or width

    def a(*shape):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    def bn(n):
        return {"scale": a(n), "bias": a(n)}

    def stats(n):
        return {"mean": a(n), "var": a(n)}

    params = {
        "stem": {"Conv_0": {"kernel": a(3, 3, 3, width)}, "BatchNorm_0": bn(width)},
        "stage1": {
            f"Block_{i}": {"Conv_0": {"kernel": a(3, 3, width, s1)}, "BatchNorm_0": bn(s1)}
            for i in range(blocks)
        },
        # BatchNorm on the head's input: its statistics do not depend on the class count.
        "head": {"BatchNorm_0": bn(s1), "Dense_0": {"kernel": a(s1, classes), "bias": a(classes)}},
    }
    batch_stats = {
        "stem": {"BatchNorm_0": stats(width)},
        "stage1": {f"Block_{i}": {"BatchNorm_0": stats(s1)} for i in range(blocks)},
        "head": {"BatchNorm_0": stats(s1)},
    }
    return {"params": params, "batch_stats": batch_stats}


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_bitwise_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for path, x in jax.tree_util.tree_flatten_with_path(got)[0]:
        y = want
        for key in path:
            y = y[key.key]
        assert np.asarray(x).dtype == np.asarray(y).dtype, path
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), path


def _assert_plain_dicts(tree):
    assert type(tree) is dict
    for value in tree.values():
        if isinstance(value, dict | FrozenDict):
            _assert_plain_dicts(value)
        else:
            assert isinstance(value, jax.Array), type(value)


# --------------------------------------------------------------------------- #
# merge_pretrained
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("reinit", [None, ("head",)])
def test_20_class_source_into_10_class_target_reinitialises_the_head(reinit):
    fresh = _variables(0, classes=10)
    loaded = _host(_variables(1, classes=20))
    merged, reinitialised = merge_pretrained(fresh, loaded, reinit=reinit)
    assert reinitialised == ("head",)
    for collection in ("params", "batch_stats"):
        for group in ("stem", "stage1"):
            _assert_bitwise_equal(merged[collection][group], loaded[collection][group])
        # The head's statistics would fit, but they belong to the re-initialised head.
        _assert_bitwise_equal(merged[collection]["head"], fresh[collection]["head"])
    assert merged["params"]["head"]["Dense_0"]["kernel"].shape == (4, 10)
    _assert_plain_dicts(merged)


def test_same_model_loads_everything_bitwise():
    fresh = _variables(0)
    loaded = _host(_variables(1))
    merged, reinitialised = merge_pretrained(fresh, loaded)
    assert reinitialised == ()
    _assert_bitwise_equal(merged, loaded)
    _assert_plain_dicts(merged)
    assert list(merged) == ["params", "batch_stats"]


def test_frozen_dicts_in_plain_dicts_out():
    source = _host(_variables(1, classes=20))
    merged, reinitialised = merge_pretrained(freeze(_variables(0, classes=10)), freeze(source))
    assert reinitialised == ("head",)
    _assert_plain_dicts(merged)
    _assert_bitwise_equal(merged["params"]["stem"], source["params"]["stem"])


def test_loaded_values_take_the_dtype_of_the_fresh_ones():
    fresh = _variables(0, dtype=jnp.bfloat16)
    loaded = _host(_variables(1))
    merged, _ = merge_pretrained(fresh, loaded)
    kernel = merged["params"]["stem"]["Conv_0"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    want = jnp.asarray(loaded["params"]["stem"]["Conv_0"]["kernel"], jnp.bfloat16)
    assert np.asarray(kernel).tobytes() == np.asarray(want).tobytes()


@pytest.mark.parametrize("reinit", [None, ("head",)])
def test_missing_group_is_reinitialised_when_allowed(reinit):
    fresh = _variables(0)
    loaded = _host(_variables(1))
    del loaded["params"]["head"], loaded["batch_stats"]["head"]
    merged, reinitialised = merge_pretrained(fresh, loaded, reinit=reinit)
    assert reinitialised == ("head",)
    _assert_bitwise_equal(merged["params"]["head"], fresh["params"]["head"])
    _assert_bitwise_equal(merged["params"]["stage1"], loaded["params"]["stage1"])


def test_missing_group_not_allowed_is_an_error():
    loaded = _host(_variables(1))
    del loaded["params"]["stage1"]
    with pytest.raises(ValueError) as info:
        merge_pretrained(_variables(0), loaded, reinit=("head",))
    assert str(info.value) == (
        "merge_pretrained: params group 'stage1' does not fit this model: loaded has no such "
        "group (it has: head, stem). Only the groups in reinit=('head',) may be "
        "re-initialised: load a run of the same architecture and width, or add 'stage1' to "
        "reinit to start it fresh."
    )


def test_structure_mismatch_is_an_error_naming_the_leaves():
    fresh = _variables(0, blocks=1)
    loaded = _host(_variables(1, blocks=3))
    with pytest.raises(ValueError) as info:
        merge_pretrained(fresh, loaded)
    message = str(info.value)
    assert message.startswith(
        "merge_pretrained: params group 'stage1' does not fit this model: its leaves differ; "
        "only in loaded: stage1/Block_1/BatchNorm_0/bias (4,), "
        "stage1/Block_1/BatchNorm_0/scale (4,), stage1/Block_1/Conv_0/kernel (3, 3, 4, 4), "
        "stage1/Block_2/BatchNorm_0/bias (4,), stage1/Block_2/BatchNorm_0/scale (4,) "
        "and 1 more. "
    )
    assert message.endswith(
        "load a run of the same model, or pass reinit=(..., 'stage1') to start this group fresh."
    )
    assert "only in fresh" not in message


def test_structure_mismatch_of_a_named_group_is_reinitialised():
    fresh = _variables(0, blocks=1)
    loaded = _host(_variables(1, blocks=2))
    merged, reinitialised = merge_pretrained(fresh, loaded, reinit=["stage1"])
    assert reinitialised == ("stage1",)
    for collection in ("params", "batch_stats"):
        _assert_bitwise_equal(merged[collection]["stage1"], fresh[collection]["stage1"])
        _assert_bitwise_equal(merged[collection]["head"], loaded[collection]["head"])


def test_reinit_head_refuses_a_stage_whose_width_differs():
    fresh = _variables(0, stage1_width=4, blocks=2)
    loaded = _host(_variables(1, stage1_width=8, blocks=2))
    with pytest.raises(ValueError) as info:
        merge_pretrained(fresh, loaded, reinit=("head",))
    assert str(info.value) == (
        "merge_pretrained: params group 'stage1' does not fit this model: shapes differ at "
        "stage1/Block_0/BatchNorm_0/bias (loaded (8,), fresh (4,)), "
        "stage1/Block_0/BatchNorm_0/scale (loaded (8,), fresh (4,)), "
        "stage1/Block_0/Conv_0/kernel (loaded (3, 3, 4, 8), fresh (3, 3, 4, 4)), "
        "stage1/Block_1/BatchNorm_0/bias (loaded (8,), fresh (4,)), "
        "stage1/Block_1/BatchNorm_0/scale (loaded (8,), fresh (4,)) and 1 more. "
        "Only the groups in reinit=('head',) may be re-initialised: load a run of the same "
        "architecture and width, or add 'stage1' to reinit to start it fresh."
    )
    # Without reinit, every group whose shapes differ starts fresh, and is reported.
    merged, reinitialised = merge_pretrained(fresh, loaded)
    assert reinitialised == ("stage1", "head")
    _assert_bitwise_equal(merged["batch_stats"]["stage1"], fresh["batch_stats"]["stage1"])
    _assert_bitwise_equal(merged["params"]["stem"], loaded["params"]["stem"])


def test_batch_stats_that_do_not_fit_are_reinitialised_and_reported():
    fresh = _variables(0)
    loaded = _host(_variables(1))
    loaded["batch_stats"]["stem"]["BatchNorm_0"]["mean"] = np.zeros(5, np.float32)
    merged, reinitialised = merge_pretrained(fresh, loaded)
    assert reinitialised == ("stem",)
    _assert_bitwise_equal(merged["params"]["stem"], loaded["params"]["stem"])
    _assert_bitwise_equal(merged["batch_stats"]["stem"], fresh["batch_stats"]["stem"])
    with pytest.raises(ValueError, match=r"batch_stats group 'stem' does not fit .* \(5,\)"):
        merge_pretrained(fresh, loaded, reinit=("head",))


def test_a_model_without_batchnorm():
    fresh = {"params": _variables(0)["params"]}
    loaded = {"params": _host(_variables(1)["params"]), "batch_stats": {}}
    merged, reinitialised = merge_pretrained(fresh, loaded)
    assert reinitialised == ()
    assert list(merged) == ["params"]
    _assert_bitwise_equal(merged["params"], loaded["params"])


def test_groups_and_collections_the_model_lacks_are_errors():
    fresh = _variables(0)
    loaded = _host(_variables(1))
    loaded["params"]["stage5"] = {"w": np.ones(2)}
    with pytest.raises(ValueError) as info:
        merge_pretrained(fresh, loaded)
    assert str(info.value) == (
        "merge_pretrained: loaded params has groups ['stage5'] that this model lacks (its "
        "groups: stem, stage1, head): another architecture? Load a run of the same model, or "
        "drop those groups from loaded."
    )
    loaded = _host(_variables(1))
    loaded["cache"] = {"stem": {"x": np.ones(2)}}
    with pytest.raises(ValueError, match=r"loaded has collections \['cache'\] that this model"):
        merge_pretrained(fresh, loaded)


@pytest.mark.parametrize(
    ("fresh", "loaded", "reinit", "error", "match"),
    [
        ({"params": {"a": {}}}, {"params": {}}, "a", TypeError, r"such as \('a',\), got the"),
        (
            {"params": {"a": {}, "b": {}}},
            {"params": {}},
            ("haed",),
            ValueError,
            r"reinit names groups \['haed'\] that this model lacks; its groups: a, b\.",
        ),
        ({"batch_stats": {}}, {"params": {}}, None, ValueError, r"fresh must be variables .*"),
        ({"params": {}}, {"a": {}}, None, ValueError, r"loaded must be .*got \['a'\]"),
    ],
)
def test_bad_arguments(fresh, loaded, reinit, error, match):
    with pytest.raises(error, match=match):
        merge_pretrained(fresh, loaded, reinit=reinit)


# --------------------------------------------------------------------------- #
# load_run
# --------------------------------------------------------------------------- #


def _save_run(workdir: Path, steps=(1, 2), *, batch_stats=True, classes=20):
    """Saves a tiny run's state under workdir/checkpoints; returns the states by step."""
    states = {}
    with checkpoint.Checkpointer(workdir / "checkpoints") as ckpt:
        for step in steps:
            # width 16: the stem's kernel (1.7 KiB) gets a data file of its own.
            variables = _variables(step, classes=classes, width=16)
            state = {
                "params": variables["params"],
                "opt_state": optax.adam(1e-3).init(variables["params"]),
                "step": jnp.int32(step),
            }
            if batch_stats:
                state["batch_stats"] = variables["batch_stats"]
            ckpt.save(step, state, metadata={"step": step})
            states[step] = _host(state)
    return states


def _largest_data_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def _listing(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def test_load_run_reads_the_newest_step(tmp_path):
    states = _save_run(tmp_path)
    variables, step, damaged = load_run(tmp_path)
    assert (step, damaged) == (2, [])
    assert list(variables) == ["params", "batch_stats"]
    _assert_bitwise_equal(variables["params"], states[2]["params"])
    _assert_bitwise_equal(variables["batch_stats"], states[2]["batch_stats"])


def test_load_run_skips_a_damaged_latest_step_and_changes_nothing(tmp_path, caplog):
    states = _save_run(tmp_path)
    _largest_data_file(tmp_path / "checkpoints" / "2").unlink()
    before = _listing(tmp_path)
    for path in (tmp_path, tmp_path / "checkpoints", str(tmp_path)):
        variables, step, damaged = load_run(path)
        assert step == 1
        assert [s for s, _ in damaged] == [2]
        assert "missing" in damaged[0][1]
        _assert_bitwise_equal(variables["params"], states[1]["params"])
        _assert_bitwise_equal(variables["batch_stats"], states[1]["batch_stats"])
    assert _listing(tmp_path) == before
    assert any(r.levelname == "WARNING" and "step 2" in r.getMessage() for r in caplog.records)


def test_load_run_then_merge_into_a_target_with_another_class_count(tmp_path):
    states = _save_run(tmp_path, steps=(3,), classes=20)
    loaded, _, _ = load_run(tmp_path)
    fresh = _variables(0, classes=10, width=16)
    merged, reinitialised = merge_pretrained(fresh, loaded)
    assert reinitialised == ("head",)
    _assert_bitwise_equal(merged["params"]["stage1"], states[3]["params"]["stage1"])
    _assert_bitwise_equal(merged["batch_stats"]["stem"], states[3]["batch_stats"]["stem"])
    _assert_bitwise_equal(merged["params"]["head"], fresh["params"]["head"])


def test_load_run_without_batch_stats_gives_empty_batch_stats(tmp_path):
    states = _save_run(tmp_path, steps=(5,), batch_stats=False)
    variables, step, _ = load_run(tmp_path)
    assert step == 5
    assert variables["batch_stats"] == {}
    _assert_bitwise_equal(variables["params"], states[5]["params"])
    only, _, _ = load_run(tmp_path, keys=("params",))
    assert list(only) == ["params"]


def test_load_run_without_batch_stats_skips_damage_too(tmp_path):
    states = _save_run(tmp_path, steps=(1, 2), batch_stats=False)
    _largest_data_file(tmp_path / "checkpoints" / "2").unlink()
    variables, step, damaged = load_run(tmp_path)
    assert (step, [s for s, _ in damaged], variables["batch_stats"]) == (1, [2], {})
    _assert_bitwise_equal(variables["params"], states[1]["params"])


def test_load_run_without_params_is_an_error(tmp_path):
    with checkpoint.Checkpointer(tmp_path / "checkpoints") as ckpt:
        ckpt.save(1, {"weights": {"w": jnp.ones(2)}}, metadata={})
    with pytest.raises(ValueError, match=r"no entries \['params'\]; it has \['weights'\]"):
        load_run(tmp_path)
    with pytest.raises(ValueError, match=r"no entries \['opt_state'\]"):
        load_run(tmp_path, keys=("opt_state", "batch_stats"))


def test_load_run_of_a_fine_tuned_run_fills_what_it_left_out_from_its_source(tmp_path):
    source = _host(_variables(0))
    # Every parameter trained; the BatchNorm statistics still equal the source's.
    trained = jax.tree.map(lambda x: x + 1, source["params"])
    state = {"params": trained, "batch_stats": source["batch_stats"], "step": jnp.int32(5)}
    reference = checkpoint.Reference("runs/src (step 3)", source)
    with checkpoint.Checkpointer(tmp_path / "checkpoints", reference=reference) as ckpt:
        ckpt.save(5, state, metadata={})
    # Refused, never read as a run without BatchNorm (`batch_stats: {}`).
    with pytest.raises(checkpoint.CheckpointSourceError, match="its source 'runs/src \\(step 3"):
        load_run(tmp_path)
    calls = []

    def find_source():
        calls.append(1)
        return checkpoint.Reference("moved/src", source)

    variables, step, _ = load_run(tmp_path, reference=find_source)
    assert step == 5 and calls == [1]
    _assert_bitwise_equal(
        variables, {"params": _host(trained), "batch_stats": source["batch_stats"]}
    )


def test_load_run_says_what_to_pass(tmp_path):
    what = r"pass the workdir of an earlier run \(the directory holding its checkpoints/\)"
    with pytest.raises(FileNotFoundError, match=f"nowhere does not exist: {what}"):
        load_run(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=f"weights.pth is a file, not a run: {what}"):
        load_run(weights)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as info:
        load_run(tmp_path / "run")
    assert str(info.value).startswith(
        f"No checkpoint found in {tmp_path / 'run' / 'checkpoints'}: it holds no finished step; "
        "pass the workdir of an earlier run"
    )
    with pytest.raises(TypeError, match="keys must be a sequence"):
        load_run(tmp_path / "run", keys="params")


def test_merge_refuses_non_finite_pretrained_values():
    fresh = {"params": {"body": {"w": np.zeros(3)}, "head": {"w": np.zeros(2)}}}
    loaded = {"params": {"body": {"w": np.array([1.0, np.nan, 2.0])}, "head": {"w": np.ones(2)}}}
    with pytest.raises(ValueError, match=r"body/w hold NaN or infinity: the source run diverged"):
        merge_pretrained(fresh, loaded)
    loaded["params"]["body"]["w"] = np.array([1.0, np.inf, 2.0])
    with pytest.raises(ValueError, match="body/w hold NaN or infinity"):
        merge_pretrained(fresh, loaded)
    # Integer leaves (step counters) and finite values pass.
    loaded["params"]["body"]["w"] = np.arange(3)
    variables, _ = merge_pretrained(fresh, loaded)
    assert variables["params"]["body"]["w"].tolist() == [0.0, 1.0, 2.0]
