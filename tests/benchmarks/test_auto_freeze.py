"""`benchmarks/auto_freeze.py`: time to the target accuracy, the table, the flags; no
scikit-learn needed."""

import os
import threading

import auto_freeze
import pytest

from layerfreeze.train import _ahead


def _result(run, curve, first_steps, phases):
    return {
        "run": run,
        "curve": curve,
        "final_accuracy": curve[-1][2],
        "seconds": curve[-1][0],
        "first_steps": first_steps,
        "compile_seconds": sum(s for _, s in first_steps),
        "median_step": 0.5,
        "stalls": [(start, s / 0.5) for start, s in first_steps[1:]],
        "eval_seconds": 1.0,
        "phases": phases,
        "total_tflops": sum(p["gflops"] * p["steps"] for p in phases) / 1e3,
        "feature_seconds": {},
        "guessed": {},
    }


def test_time_to_target_speedups_and_table():
    full = _result(
        "full",
        [(10.0, 20, 0.90), (20.0, 40, 0.96), (30.0, 60, 0.97)],
        [(0, 4.0)],
        [{"start": 0, "steps": 60, "spec": "none", "gflops": 1.0}],
    )
    auto = _result(
        "auto",
        [(6.0, 20, 0.92), (12.0, 40, 0.966), (15.0, 60, 0.968)],
        [(0, 4.0), (30, 2.0), (50, 2.0)],
        [
            {"start": 0, "steps": 30, "spec": "none", "gflops": 1.0},
            {"start": 30, "steps": 30, "spec": "stem", "gflops": 0.5},
        ],
    )
    never = _result(
        "freezeout",
        [(5.0, 20, 0.5), (9.0, 60, 0.9)],
        [(0, 4.0)],
        [{"start": 0, "steps": 60, "spec": "none", "gflops": 1.0}],
    )
    auto["feature_seconds"] = {50: 1.5}  # the change at step 50 computed cached features
    auto["guessed"] = {30: True, 50: False}  # AutoFreeze foresaw the first change only
    auto["phase_stalls"] = [(30, 2.5), (50, 1.25)]  # over their own phases' median steps
    full, auto, never = auto_freeze.summarise([full, auto, never])
    # Target: 0.97 - 0.005 = 0.965, reached by full at 30 s and by auto at 12 s.
    assert full["seconds_to_target"] == 30.0 and auto["seconds_to_target"] == 12.0
    assert auto["speedup"] == 2.5
    # Compiles before step 40: auto's at steps 0 and 30 (6 s), full's at 0 (4 s).
    assert auto["warm_seconds"] == 6.0 and auto["warm_speedup"] == 26.0 / 6.0
    assert auto["flops_ratio"] == 60.0 / 45.0
    # Work to the target: full's 60 steps at 1 GFLOP; auto's 30 at 1 and 10 at 0.5.
    assert full["step_at_target"] == 60 and auto["step_at_target"] == 40
    assert full["tflops_to_target"] == 0.06 and auto["tflops_to_target"] == 0.035
    assert auto["flops_to_target_ratio"] == 0.06 / 0.035
    assert never["step_at_target"] is None and never["flops_to_target_ratio"] is None
    assert never["seconds_to_target"] is None and never["speedup"] is None
    table = auto_freeze.format_markdown([full, auto, never])
    assert "| auto | 0.9680 | 12.0 | 2.50x | 6.0 (4.33x) | 40 | 0.035 (1.71x) |" in table
    # The median step (ms), each change's first step over it, the evaluations' seconds.
    # With cached features, also the stall without computing them: (2.0 - 1.5) / 0.5.
    assert (
        "| 500 | 30: 4.0x (2.5x its phase's), guessed; "
        "50: 4.0x (1.2x its phase's) (features 1.50 s; 1.0x without), not guessed | 1.0 |" in table
    )
    assert "| 500 | - | 1.0 |" in table  # full: no change
    # A decision that took a guess made before the last one (which `Phases` kept).
    assert auto_freeze._guess_note({"30": "earlier"}, 30) == ", guessed earlier"
    assert "| freezeout | 0.9000 | not reached | - | - | - | - |" in table


def test_source_model_is_cached_per_setting_and_reloaded_exactly(tmp_path, monkeypatch):
    import argparse

    import jax
    import numpy as np

    from layerfreeze.models import resnet18

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(4, dtype=np.int32)
    task = auto_freeze.Task(images, labels, images, labels, 5, "tiny")
    model = resnet18(5, stem="cifar", width=2)
    trained = model.init(jax.random.key(7), auto_freeze._sample(task), train=False)
    calls = []

    def fake_train_source(model, ds, args):
        calls.append(args.width)
        return jax.device_get(dict(trained)), 0.75

    monkeypatch.setattr(auto_freeze, "train_source", fake_train_source)
    args = argparse.Namespace(
        model="resnet18", width=2, image_size=8, source_steps=3, source_lr=3e-3, batch_size=2,
        seed=0, source_cache=str(tmp_path),
    )  # fmt: skip
    first, acc1 = auto_freeze.source_variables(model, task, args)
    second, acc2 = auto_freeze.source_variables(model, task, args)
    assert calls == [2] and acc1 == acc2 == 0.75  # trained once, then loaded
    assert (tmp_path / "source-resnet18-w2-i8-n3-lr0.003-b2-s0.npz").exists()
    flat1 = jax.tree_util.tree_leaves_with_path(first)
    flat2 = jax.tree_util.tree_leaves_with_path(second)
    assert [p for p, _ in flat1] == [p for p, _ in flat2]
    for (_, a), (_, b) in zip(flat1, flat2, strict=True):
        np.testing.assert_array_equal(a, b)
    # The head starts afresh (seed + 1), every other group is the source's.
    np.testing.assert_array_equal(
        second["params"]["stem"]["Conv_0"]["kernel"], trained["params"]["stem"]["Conv_0"]["kernel"]
    )
    assert not np.array_equal(
        second["params"]["head"]["Dense_0"]["kernel"],
        trained["params"]["head"]["Dense_0"]["kernel"],
    )
    args.source_steps = 4  # another setting: another file, trained again
    auto_freeze.source_variables(model, task, args)
    assert calls == [2, 2]
    args.model = "vit"  # a ViT's source never mixes with a ResNet's
    assert auto_freeze.source_cache_path(args).endswith("source-vit-w2-i8-n4-lr0.003-b2-s0.npz")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            [],
            {"width": 16, "source_lr": 3e-3, "lr": 3e-4, "runs": "full,freezeout,auto,auto+cache"},
        ),
        (
            ["--model", "vit"],
            {"width": 192, "source_lr": 5e-4, "lr": 5e-4, "runs": "full,freezeout,auto"},
        ),
        (["--model", "vit", "--width", "32", "--lr", "2e-4"], {"width": 32, "lr": 2e-4}),
    ],
)
def test_unset_flags_take_the_models_defaults(argv, expected):
    args = auto_freeze.parse_args(argv)
    assert {k: getattr(args, k) for k in expected} == expected


def test_vit_is_scanned_and_its_groups_are_block_selectors():
    model, groups = auto_freeze.build_model(auto_freeze.parse_args(["--model", "vit"]))
    assert model.scan and model.depth == len(groups) - 5  # 3 embeddings, norm and head
    assert groups[3] == "Transformer/encoderblock[0]" and groups[-1] == "head"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--model", "vit", "--runs", "full,auto+cache"],
            "name runs from full, freezeout, auto (--model vit; auto+cache: the ResNet only)",
        ),
        (["--runs", "auto,full"], "must start with full"),
        (["--model", "vit", "--width", "30"], "multiple of the ViT's 4 heads, got 30"),
    ],
)
def test_bad_flags_are_a_parser_error(argv, message, capsys):
    with pytest.raises(SystemExit):
        auto_freeze.parse_args(argv)
    assert message in capsys.readouterr().err


def test_interleave_takes_turns_and_keeps_the_runs_order():
    log = []

    def run(name, chunks):
        for i in range(chunks):
            log.append((name, i))
            yield
        return {"run": name}

    results = auto_freeze.interleave([run("a", 3), run("b", 1), run("c", 2)])
    assert [r["run"] for r in results] == ["a", "b", "c"]
    assert log == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("c", 1), ("a", 2)]


@pytest.mark.skipif(
    len(getattr(os, "sched_getaffinity", lambda _: ())(0)) < 2, reason="Linux, 2 cores or more"
)
def test_spare_core_gives_the_compile_worker_the_last_core_alone():
    before = {int(t): os.sched_getaffinity(int(t)) for t in os.listdir("/proc/self/task")}
    cores = os.sched_getaffinity(0)
    worker = _on_worker(threading.get_native_id)
    try:
        auto_freeze.spare_core()
        last = max(cores)
        others = {int(t) for t in os.listdir("/proc/self/task")} - {worker}
        assert {t: os.sched_getaffinity(t) for t in others & set(before)} == dict.fromkeys(
            others & set(before), cores - {last}
        )
        assert os.sched_getaffinity(worker) == {last}
    finally:
        for tid, mask in before.items():
            try:
                os.sched_setaffinity(tid, mask)
            except ProcessLookupError:
                pass


def test_spare_core_needs_two_cores(monkeypatch, capsys):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0}, raising=False)
    with pytest.raises(SystemExit):
        auto_freeze.parse_args(["--spare_core"])
    assert "at least 2 cores" in capsys.readouterr().err


def _on_worker(fn):
    """`fn()` run on the compile-ahead worker thread."""
    job = _ahead.submit((-1,), fn)
    assert _ahead.wait(job, timeout=60.0)
    return job.result()
