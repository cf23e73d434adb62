"""`benchmarks/first_run.py`: the summary and the table, on made-up timings; its flags."""

import first_run
import pytest


def test_first_run_against_the_later_runs():
    measured = {"spec": "stem,stage1", "compile_s": 3.25, "times": [0.3, 0.1, 0.12, 0.1]}
    row = first_run.summarise({**measured, "zeros_s": 0.31, "after_zeros": 0.11})
    assert (row["first"], row["median"]) == (0.3, 0.1) and row["ratio"] == pytest.approx(3.0)
    table = first_run.table([row], markdown=True)
    assert "| stem,stage1 | 3.25 | 300 | 100 | 3.0x | 310 | 110 | 1.1x |" in table


def test_fewer_than_two_runs_is_a_parser_error(capsys):
    with pytest.raises(SystemExit):
        first_run.main(["--runs", "1"])
    assert "--runs must be >= 2 (a first run and later ones), got 1" in capsys.readouterr().err
