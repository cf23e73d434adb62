"""`benchmarks/compile_ahead.py`: the stall summary and both tables, on made-up timings."""

import compile_ahead


def test_stall_summary_and_tables():
    times = [5.0, 0.1, 0.2, 0.1, 0.3, 0.1, 0.1]
    result = {
        "run": "ahead",
        "times": times,
        "busy": [False, True, True, False, False, False, False],
        "changes": [{"step": 4, "spec": "stem"}],
        "seconds": sum(times),
        "waited": 0.0,
    }
    row = compile_ahead.summarise_stall(result)
    # Steps 0 (the first compile) and 4 (the change) are no ordinary steps.
    assert row["median_step"] == 0.1 and row["first_step"] == 5.0
    (change,) = row["changes"]
    assert change["seconds"] == 0.3 and change["x_median"] == 0.3 / 0.1
    assert row["compiling_steps"] == 2 and row["compiling_median"] == 0.15000000000000002
    assert "| ahead | 100 | 4: 0.30 (3.0x) | 5.9 | 0.0 | 2, 150 |" in compile_ahead.stall_table(
        [row], markdown=True
    )
    slow = [{"nice": 0, "alone": 0.1, "compiling": 0.2, "slowdown": 2.0, "compile_s": 3.0,
             "steps": 7}]  # fmt: skip
    assert "| nice 0 | 100 | 200 | 2.00 | 3.0 | 7 |" in compile_ahead.slowdown_table(
        slow, markdown=True
    )
