"""`benchmarks/report.py`: the tables' exact text, the choice check, timing helpers, JSON."""

import doctest
import json
import shlex

import pytest
import report

HEADER = ["model", "freeze", "ms", "x"]
BODY = [["resnet18", "none", "12.5", "1.00"], ["vit", "all but head", "3.0", "0.24"]]


def test_text_table_aligns_left_then_right_columns():
    assert report.text_table(HEADER, BODY, left=2).splitlines() == [
        "model     freeze          ms     x",
        "----------------------------------",
        "resnet18  none          12.5  1.00",
        "vit       all but head   3.0  0.24",
    ]


def test_text_table_strips_trailing_spaces_of_left_aligned_last_column():
    # Three left-aligned columns by default: the short cells of the third are not padded.
    text = report.text_table(["a", "b", "long name"], [["x", "y", "z"]])
    assert text.splitlines() == ["a  b  long name", "---------------", "x  y  z"]


def test_text_table_puts_a_blank_line_between_sections():
    body = [["a", "1"], ["a", "2"], ["b", "3"]]
    text = report.text_table(["k", "v"], body, left=1, sections=["a", "a", "b"])
    assert text.splitlines() == ["k  v", "----", "a  1", "a  2", "", "b  3"]


def test_markdown_table_header_separator_aligns_columns():
    assert report.markdown_table(HEADER, BODY, left=2).splitlines() == [
        "| model | freeze | ms | x |",
        "|---|---|---:|---:|",
        "| resnet18 | none | 12.5 | 1.00 |",
        "| vit | all but head | 3.0 | 0.24 |",
    ]


def test_markdown_table_left_defaults_to_three_columns():
    separator = report.markdown_table(HEADER, BODY).splitlines()[1]
    assert separator == "|---|---|---|---:|"


def test_check_choices_passes_valid_values():
    report.check_choices("model", ["vit", "resnet18"], ["resnet18", "vit"])


def test_check_choices_names_the_unknown_values_and_every_valid_choice():
    with pytest.raises(ValueError) as info:
        report.check_choices("model", ["vit", "vgg", "lenet"], ["resnet18", "vit"])
    assert str(info.value) == "Unknown model 'vgg', 'lenet'; valid choices: resnet18, vit."


def test_quartiles():
    assert report.quartiles([5.0]) == (5.0, 5.0, 5.0)
    assert report.quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)


def test_time_round_robin_calls_each_function_once_per_round():
    calls = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b")]
    cpu = [[99.0]]
    times = report.time_round_robin(fns, steps=3, warmup=2, pause=0.0, cpu_times=cpu)
    assert calls == ["a", "b"] * 5
    assert [len(t) for t in times] == [3, 3] and [len(c) for c in cpu] == [3, 3]
    assert all(t >= 0 for t in times[0] + times[1])


def test_call_and_block_returns_the_result():
    assert report.call_and_block(lambda x, y: x + y, 2, 3) == 5


def test_write_json_writes_a_list_and_a_final_newline(tmp_path):
    path = tmp_path / "rows.json"
    report.write_json(str(path), ({"a": 1}, {"a": 2}))
    text = path.read_text()
    assert text.endswith("]\n") and json.loads(text) == [{"a": 1}, {"a": 2}]


def test_docstring_examples():
    result = doctest.testmod(report)
    assert result.attempted > 0 and result.failed == 0


def test_command_line_runs_again_as_given():
    line = report.command_line("auto_freeze.py", ["--plot", "", "--json", "/tmp/a b.json"])
    assert line == "python benchmarks/auto_freeze.py --plot '' --json '/tmp/a b.json'"
    assert shlex.split(line)[2:] == ["--plot", "", "--json", "/tmp/a b.json"]
