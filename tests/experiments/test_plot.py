"""`experiments/plot.py`: what each panel draws, and the image written."""

import math

import matplotlib
import numpy as np
import pytest
from PIL import Image
from plot import curves_figure, plot_curves

from layerfreeze.train.metrics import MetricsWriter


def _phase(step, phase, **extra):
    return {"step": step, "split": "phase", "phase": phase, "phase_start": True, **extra}


def _lines_by_label(ax):
    return {line.get_label(): line for line in ax.lines}


def _xy(line):
    return list(zip(line.get_xdata().tolist(), line.get_ydata().tolist(), strict=True))


def test_panels_draw_each_split_with_its_own_style_and_skip_missing_values():
    rows = [_phase(0, 0)]
    for step in range(1, 101):
        rows.append({"step": step, "split": "train", "loss": 1 / step, "accuracy": step / 100})
        if step % 50 == 0:
            rows.append({"step": step, "split": "test", "loss": 2 / step, "accuracy": 0.5})
        if step == 40:
            rows.append(_phase(40, 1, label="stem+stage1"))
    rows.append({"step": 100, "split": "test", "loss": math.nan, "accuracy": None})
    fig = curves_figure(rows)
    loss, accuracy = fig.axes[:2]
    assert [loss.get_title(), accuracy.get_title()] == ["loss", "accuracy"]
    train, test = _lines_by_label(loss)["train"], _lines_by_label(loss)["test"]
    assert _xy(train) == [(s, 1 / s) for s in range(1, 101)]
    assert train.get_linestyle() == "-" and train.get_marker() in ("None", None)  # 100 points
    # NaN and None are left out: the test panel has the two finite points only.
    assert _xy(test) == [(50, 2 / 50), (100, 2 / 100)]
    assert test.get_linestyle() == "None" and test.get_marker() == "o"
    assert train.get_color() != test.get_color()
    assert _lines_by_label(accuracy)["train"].get_color() == train.get_color()
    assert accuracy.get_ylim() == (-0.02, 1.02)
    # Phase starts: a dotted vertical line each, labelled by phase or by its label.
    starts = sorted(line.get_xdata()[0] for line in loss.lines if line.get_linestyle() == ":")
    assert starts == [0, 40]
    assert {t.get_text() for t in loss.texts} == {" phase 0", " stem+stage1"}
    assert [t.get_text() for t in fig.legends[0].texts] == ["train", "test"]


def test_few_train_points_are_marked_and_empty_panels_say_so():
    rows = [{"step": s, "split": "train", "grad_norm": float(s)} for s in (1, 2)]
    fig = curves_figure(rows, metrics=("grad_norm", "loss"))
    (line,) = fig.axes[0].lines
    assert _xy(line) == [(1, 1.0), (2, 2.0)] and line.get_marker() == "o"
    assert not fig.axes[1].lines
    assert [t.get_text() for t in fig.axes[1].texts] == ["no loss yet"]
    with pytest.raises(ValueError, match="metrics is empty"):
        curves_figure(rows, metrics=())


def test_plot_curves_writes_the_figure_from_a_metrics_file(tmp_path):
    backend = matplotlib.get_backend()
    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    writer.write(_phase(0, 0))
    writer.write({"step": 2, "split": "train", "loss": 1.5, "accuracy": 0.4})
    writer.write({"step": 2, "split": "test", "loss": 1.7, "accuracy": 0.3})
    path = tmp_path / "curves.png"
    plot_curves(writer.rows(), path)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1000, 400)  # two 5x4 in panels
        pixels = np.asarray(image.convert("L"))
    assert pixels.min() < 128  # something was drawn on the white canvas
    assert matplotlib.get_backend() == backend  # no pyplot state touched
