"""`benchmarks/auto_freeze.py`: time to the target accuracy, the table; no scikit-learn needed."""

import importlib.util
import pathlib
import sys

_DIR = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, _DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


_load("freeze_cost")  # auto_freeze imports it as a sibling script
auto_freeze = _load("auto_freeze")


def _result(run, curve, first_steps, phases):
    return {
        "run": run,
        "curve": curve,
        "final_accuracy": curve[-1][2],
        "seconds": curve[-1][0],
        "first_steps": first_steps,
        "compile_seconds": sum(s for _, s in first_steps),
        "phases": phases,
        "total_tflops": sum(p["gflops"] * p["steps"] for p in phases) / 1e3,
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
    full, auto, never = auto_freeze.summarise([full, auto, never])
    # Target: 0.97 - 0.005 = 0.965, reached by full at 30 s and by auto at 12 s.
    assert full["seconds_to_target"] == 30.0 and auto["seconds_to_target"] == 12.0
    assert auto["speedup"] == 2.5
    # Compiles before step 40: auto's at steps 0 and 30 (6 s), full's at 0 (4 s).
    assert auto["warm_seconds"] == 6.0 and auto["warm_speedup"] == 26.0 / 6.0
    assert auto["flops_ratio"] == 60.0 / 45.0
    assert never["seconds_to_target"] is None and never["speedup"] is None
    table = auto_freeze.format_markdown([full, auto, never])
    assert "| auto | 0.9680 | 12.0 | 2.50x |" in table and "not reached" in table
