"""`benchmarks/first_run.py`: the summary and the table, on made-up timings; its flags."""

import first_run
import pytest


def test_first_run_against_the_later_runs():
    row = first_run.summarise(
        {"spec": "stem,stage1", "compile_s": 3.25, "times": [0.3, 0.1, 0.12, 0.1]}
    )
    assert (row["first"], row["median"]) == (0.3, 0.1) and row["ratio"] == pytest.approx(3.0)
    assert "| stem,stage1 | 3.25 | 300 | 100 | 3.0x |" in first_run.table([row], markdown=True)


def test_fewer_than_two_runs_is_a_parser_error(capsys):
    with pytest.raises(SystemExit):
        first_run.main(["--runs", "1"])
    assert "--runs must be >= 2 (a first run and later ones), got 1" in capsys.readouterr().err
