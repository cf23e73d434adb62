"""`layerfreeze.train.metrics`: the resumable metrics file and the averaging window."""

import json
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layerfreeze.train.metrics import MetricsWriter, Window, read_rows


def _phase(step, phase):
    return {"step": step, "split": "phase", "phase": phase, "phase_start": True, "loss": None}


def _train(step, loss=None):
    return {"step": step, "split": "train", "loss": 1.0 / step if loss is None else loss}


def _test(step, accuracy=0.5):
    return {"step": step, "split": "test", "loss": 2.0 / step, "accuracy": accuracy}


DEAD_RUN = [
    _phase(0, 0),
    _train(2),
    _test(2),
    _train(4),
    _test(4),
    _phase(4, 1),
    _train(6),
    _test(6),
]


def _write_lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# --------------------------------------------------------------------------- #
# MetricsWriter
# --------------------------------------------------------------------------- #


def test_rows_after_the_resume_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_lines(path, DEAD_RUN)
    writer = MetricsWriter(path, resume_step=4)
    # Kept: steps before 4, and step 4 except its phase row (written again on crossing 4).
    kept = [_phase(0, 0), _train(2), _test(2), _train(4), _test(4)]
    assert writer.rows() == kept
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in kept)
    assert not writer.damaged_path.exists()
    assert writer.write(_phase(4, 1)) is True
    assert read_rows(path) == [*kept, _phase(4, 1)]


def test_a_fresh_start_keeps_only_step_0_rows_that_are_not_phases(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_lines(path, [{"step": 0, "split": "test", "accuracy": 0.1}, *DEAD_RUN])
    assert MetricsWriter(path).rows() == [{"step": 0, "split": "test", "accuracy": 0.1}]


def test_nothing_is_rewritten_when_nothing_changes(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_lines(path, DEAD_RUN)
    before = path.stat().st_ino, path.read_bytes()
    MetricsWriter(path, resume_step=7)
    assert (path.stat().st_ino, path.read_bytes()) == before


def test_a_cut_last_line_is_moved_aside_and_the_run_resumes(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    _write_lines(path, DEAD_RUN[:5])
    with path.open("a") as f:
        f.write('{"step": 4, "spl')  # killed mid-write
    with caplog.at_level(logging.WARNING, logger="layerfreeze.train.metrics"):
        writer = MetricsWriter(path, resume_step=4)
    assert writer.rows() == DEAD_RUN[:5]
    assert writer.damaged_path == tmp_path / "metrics.jsonl.damaged"
    assert writer.damaged_path.read_text() == '{"step": 4, "spl\n'
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(messages) == 1
    assert "1 unreadable line(s)" in messages[0] and "metrics.jsonl.damaged" in messages[0]
    # New rows start on a line of their own.
    writer.write(_train(5))
    assert path.read_text().endswith(json.dumps(_test(4)) + "\n" + json.dumps(_train(5)) + "\n")
    assert read_rows(path) == [*DEAD_RUN[:5], _train(5)]
    # Opening again finds nothing more to move.
    MetricsWriter(path, resume_step=5)
    assert writer.damaged_path.read_text() == '{"step": 4, "spl\n'


def test_every_unreadable_line_is_kept_byte_for_byte(tmp_path):
    path = tmp_path / "metrics.jsonl"
    (tmp_path / "metrics.jsonl.damaged").write_bytes(b"from an earlier crash\n")
    lines = [
        json.dumps(_train(1)).encode(),
        b"\x00\x00\xff\xfe garbage",
        b"[1, 2]",
        b'{"loss": 0.5}',
        b'{"step": true}',
        b"",
        json.dumps(_train(2)).encode(),
        b'{"step": 3, "split": "tr',
    ]
    path.write_bytes(b"\n".join(lines))
    writer = MetricsWriter(path, resume_step=10)
    assert writer.rows() == [_train(1), _train(2)]
    assert writer.damaged_path.read_bytes() == (
        b"from an earlier crash\n"
        b'\x00\x00\xff\xfe garbage\n[1, 2]\n{"loss": 0.5}\n{"step": true}\n'
        b'{"step": 3, "split": "tr\n'
    )
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_rows_skips_lines_that_appear_later(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(path)
    writer.write(_train(1))
    with path.open("a") as f:
        f.write("not json\n")
    writer.write(_train(2))
    assert writer.rows() == [_train(1), _train(2)]
    assert any("Skipped 1 unreadable line(s)" in r.getMessage() for r in caplog.records)
    assert read_rows(tmp_path / "missing.jsonl") == []


def test_a_rerun_of_a_finished_run_does_not_repeat_its_final_row(tmp_path):
    path = tmp_path / "metrics.jsonl"
    final = _test(8, accuracy=0.625)
    writer = MetricsWriter(path)
    for row in (_train(4), _train(8), final):
        assert writer.write(row) is True
    finished = path.read_bytes()
    rerun = MetricsWriter(path, resume_step=8)
    assert rerun.write(dict(final)) is False
    assert path.read_bytes() == finished
    # Any difference is written.
    assert rerun.write(_test(8, accuracy=0.5)) is True
    assert read_rows(path)[-1] == _test(8, accuracy=0.5)


def test_the_duplicate_guard_compares_with_the_last_row_of_the_same_step_and_split(tmp_path):
    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    nan = {"step": 2, "split": "train", "loss": math.nan}
    assert [writer.write(r) for r in (_train(2, 1.0), _test(2), _train(2, 1.0))] == [
        True,
        True,
        False,  # the last train row of step 2, though not the last row of the file
    ]
    assert [writer.write(r) for r in (_train(2, 3.0), _train(2, 1.0))] == [True, True]
    assert [writer.write(r) for r in (nan, dict(nan), {"split": "train", **nan})] == [
        True,
        False,
        False,  # key order does not matter
    ]
    assert writer.write({"step": 2, "loss": 1.0}) is True  # no split: a key of its own
    assert len(writer.rows()) == 6


def test_write_converts_numpy_and_jax_scalars(tmp_path):
    writer = MetricsWriter(tmp_path / "sub" / "metrics.jsonl")
    writer.write(
        {"step": np.int64(3), "loss": np.float32(0.5), "accuracy": jnp.float32(0.25), "n": None}
    )
    assert writer.rows() == [{"step": 3, "loss": 0.5, "accuracy": 0.25, "n": None}]


@pytest.mark.parametrize(
    ("row", "error", "match"),
    [
        ({"loss": 1.0}, TypeError, r"needs an integer 'step'; got keys \['loss'\]"),
        ({"step": True}, TypeError, "'step' must be an integer, got True"),
        ({"step": 1.5}, TypeError, "'step' must be an integer, got float 1.5"),
        ({"step": -1}, ValueError, "'step' must be >= 0, got -1"),
        ({"step": 1, 2: 0}, TypeError, r"keys must be strings, got \[2\]"),
        ({"step": 1, "loss": np.ones(2)}, TypeError, "ndarray .* is not a JSON value"),
        ({"step": 1, "f": object()}, TypeError, "object .* is not a JSON value"),
        ([("step", 1)], TypeError, "must be a mapping, got list"),
    ],
)
def test_write_rejects_rows_it_could_not_read_back(tmp_path, row, error, match):
    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    with pytest.raises(error, match=match):
        writer.write(row)
    assert writer.rows() == []


@pytest.mark.parametrize(
    ("resume_step", "error"), [(-1, ValueError), (1.0, TypeError), (True, TypeError)]
)
def test_resume_step_must_be_a_step(tmp_path, resume_step, error):
    with pytest.raises(error, match="resume_step must be"):
        MetricsWriter(tmp_path / "metrics.jsonl", resume_step=resume_step)


# --------------------------------------------------------------------------- #
# Window
# --------------------------------------------------------------------------- #


def _step_metrics(n, seed=0):
    keys = jax.random.split(jax.random.key(seed), n)
    return [
        {
            "loss": jax.random.uniform(k, dtype=jnp.float32) * 3,
            "accuracy": np.float32(i / 7),
            "grad_norm": float(i) + 0.1,
        }
        for i, k in enumerate(keys)
    ]


@pytest.mark.parametrize("cut", [0, 1, 3, 6])
def test_a_restored_window_gives_the_uninterrupted_mean(cut):
    steps = _step_metrics(7)
    straight = Window()
    for m in steps:
        straight.add(m, examples=32)

    interrupted = Window()
    for m in steps[:cut]:
        interrupted.add(m, examples=32)
    saved = json.dumps(interrupted.state(), allow_nan=False)  # as checkpoint metadata
    resumed = Window.from_state(json.loads(saved))
    for m in steps[cut:]:
        resumed.add(m, examples=32)

    assert resumed.mean() == straight.mean()
    assert list(resumed.mean()) == ["loss", "accuracy", "grad_norm"]
    assert (resumed.steps, resumed.examples) == (straight.steps, straight.examples) == (7, 224)
    want = float(np.mean(np.asarray([float(np.asarray(m["loss"])) for m in steps], np.float64)))
    assert straight.mean()["loss"] == want


def test_state_is_strict_json_with_non_finite_values():
    window = Window()
    for value in (math.nan, math.inf, -math.inf, 0.5):
        window.add({"loss": value, "x": np.float32(value)})
    state = window.state()
    assert state == {
        "values": {
            "loss": ["NaN", "Infinity", "-Infinity", 0.5],
            "x": ["NaN", "Infinity", "-Infinity", 0.5],
        },
        "steps": 4,
        "examples": 0,
    }
    resumed = Window.from_state(json.loads(json.dumps(state, allow_nan=False)))
    assert resumed.state() == state
    assert math.isnan(resumed.mean()["loss"])


def test_mean_reset_and_an_empty_window():
    window = Window()
    assert window.mean() == {}
    window.add({"loss": 1.0}, examples=4)
    window.add({"loss": 2.0, "grad_norm": 5.0}, examples=4)
    assert window.mean() == {"loss": 1.5, "grad_norm": 5.0}
    window.reset()
    assert (window.mean(), window.steps, window.examples) == ({}, 0, 0)
    assert window.state() == {"values": {}, "steps": 0, "examples": 0}


def test_add_rejects_anything_but_one_number_and_adds_nothing():
    window = Window()
    window.add({"loss": 1.0})
    with pytest.raises(TypeError, match=r"metric 'loss' has shape \(2,\); give one number"):
        window.add({"accuracy": 0.5, "loss": jnp.ones(2)})
    with pytest.raises(TypeError, match="metric 'loss' is 'high', not a number"):
        window.add({"loss": "high"})
    with pytest.raises(ValueError, match="examples must be >= 0, got -1"):
        window.add({"loss": 1.0}, examples=-1)
    assert window.state() == {"values": {"loss": [1.0]}, "steps": 1, "examples": 0}


def test_examples_per_sec_counts_only_this_process():
    now = [10.0]
    window = Window(clock=lambda: now[0])
    assert window.examples_per_sec() is None
    window.add({"loss": 1.0}, examples=32)
    window.add({"loss": 1.0}, examples=32)
    now[0] = 12.0
    assert window.examples_per_sec() == 32.0
    resumed = Window.from_state(window.state(), clock=lambda: now[0])
    resumed.add({"loss": 1.0}, examples=32)
    now[0] = 14.0
    assert resumed.examples == 96
    assert resumed.examples_per_sec() == 16.0  # 32 examples in 2 s, not 96
    resumed.reset()
    assert resumed.examples_per_sec() is None


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"values": {}}, r"got \['values'\]; expected Window.state\(\)"),
        ([], "got list; expected"),
        ({"values": [], "steps": 0, "examples": 0}, "'values' is list; expected"),
        ({"values": {"loss": "1.0"}, "steps": 1, "examples": 0}, "'values'\\['loss'\\] is '1.0'"),
        ({"values": {"loss": ["x"]}, "steps": 1, "examples": 0}, "holds 'x', not a float"),
        ({"values": {}, "steps": -1, "examples": 0}, "steps must be >= 0, got -1; expected"),
        ({"values": {}, "steps": 0, "examples": 1.5}, "examples must be an integer"),
    ],
)
def test_from_state_rejects_what_state_does_not_give(state, match):
    with pytest.raises(ValueError, match=match):
        Window.from_state(state)
