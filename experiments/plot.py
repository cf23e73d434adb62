"""The experiment's plot: metrics rows drawn into a PNG, one panel per metric."""

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["curves_figure", "plot_curves"]

# Train curves with at most this many points also mark each point.
_MARK_POINTS_UP_TO = 50


def plot_curves(
    rows: Iterable[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    metrics: Sequence[str] = ("loss", "accuracy"),
) -> None:
    """Draws metrics rows into an image file (`curves_figure`, saved at 100 dpi).

    Args:
      rows: metrics rows, e.g. `MetricsWriter.rows()`.
      path: the image file to write (PNG by its name; any format Matplotlib
        knows).
      metrics: the metrics to draw, one panel each.

    >>> import tempfile, pathlib
    >>> rows = [
    ...     {"step": 0, "split": "phase", "phase": 0, "phase_start": True},
    ...     {"step": 10, "split": "train", "loss": 2.0, "accuracy": 0.2},
    ...     {"step": 10, "split": "test", "loss": 2.1, "accuracy": 0.18},
    ... ]
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "curves.png"
    >>> plot_curves(rows, path)
    >>> path.read_bytes()[:4]
    b'\\x89PNG'
    """
    curves_figure(rows, metrics=metrics).savefig(path, dpi=100)


def curves_figure(
    rows: Iterable[Mapping[str, Any]], *, metrics: Sequence[str] = ("loss", "accuracy")
) -> Any:
    """Draws metrics rows into a Matplotlib `Figure`: one panel per metric, phase starts marked.

    Train rows are drawn as a line (each point marked while there are few),
    every other split (test, validation) as markers, in one colour per split
    across panels; phase starts (rows with `phase_start`) are dotted vertical
    lines labelled with the phase (or the row's `label`, e.g. the groups that
    froze). Rows without a number for a metric are
    left out of its panel; a panel with nothing to draw says so. Uses
    Matplotlib's `Figure` directly: no pyplot state and no backend change.

    Args:
      rows: metrics rows, e.g. `MetricsWriter.rows()`: each with `step`, and
        `split` plus the metrics (`split == "phase"` rows mark phases).
      metrics: the metrics to draw, one panel each; `"accuracy"` gets a 0-1
        axis.

    Returns:
      The `matplotlib.figure.Figure`, 5 x 4 inches per panel.

    >>> fig = curves_figure([{"step": 10, "split": "train", "loss": 2.0}], metrics=("loss",))
    >>> [ax.get_title() for ax in fig.axes], fig.axes[0].lines[0].get_ydata().tolist()
    (['loss'], [2.0])
    """
    from matplotlib.figure import Figure

    rows = list(rows)
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    if not metrics:
        raise ValueError("curves_figure: metrics is empty; name at least one, e.g. ('loss',).")
    splits = list(dict.fromkeys(r.get("split") for r in rows if r.get("split") != "phase"))
    starts = {r["step"]: r.get("label", r.get("phase")) for r in rows if r.get("phase_start")}
    steps = [r["step"] for r in rows if _is_number(r.get("step"))]
    # Half a step either side at least: a single point still gets a whole-step tick.
    lo, hi = (min(steps), max(steps)) if steps else (0, 1)
    pad = max(0.5, 0.04 * (hi - lo))
    fig = Figure(figsize=(5 * len(metrics), 4), layout="constrained")
    legend: dict[str, Any] = {}
    for ax, metric in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics, strict=True):
        _draw_panel(ax, rows, metric, splits, starts, legend)
        ax.set_xlim(lo - pad, hi + pad)
    if legend:
        # One legend for every panel: a split has the same colour in each.
        fig.legend(legend.values(), legend.keys(), loc="outside lower center", ncols=len(legend))
    return fig


def _draw_panel(
    ax: Any,
    rows: list[Mapping[str, Any]],
    metric: str,
    splits: list[Any],
    starts: dict[int, Any],
    legend: dict[str, Any],
) -> None:
    from matplotlib.ticker import MaxNLocator

    drawn = False
    for index, split in enumerate(splits):
        points = sorted(
            (r["step"], r[metric])
            for r in rows
            if r.get("split") == split and _is_number(r.get(metric))
        )
        if not points:
            continue
        drawn = True
        x, y = zip(*points, strict=True)
        style = {"color": f"C{index}", "label": str(split)}
        if split == "train":
            few = len(points) <= _MARK_POINTS_UP_TO
            (line,) = ax.plot(
                x,
                y,
                linestyle="-",
                linewidth=1.5,
                marker="o" if few else None,
                markersize=3,
                **style,
            )
        else:
            (line,) = ax.plot(x, y, linestyle="none", marker="o", markersize=5, **style)
        legend.setdefault(str(split), line)
    for step, phase in sorted(starts.items()):
        ax.axvline(step, color="grey", linestyle=":", linewidth=1)
        text = f" {phase}" if isinstance(phase, str) else f" phase {phase}"
        text = " phase" if phase is None else text
        ax.text(
            step,
            0.98,
            text,
            transform=ax.get_xaxis_transform(),
            va="top",
            ha="left",
            fontsize=8,
            color="grey",
        )
    if not drawn:
        ax.text(0.5, 0.5, f"no {metric} yet", ha="center", color="grey", transform=ax.transAxes)
    ax.set(xlabel="step", ylabel=metric, title=metric)
    if metric == "accuracy":
        ax.set_ylim(-0.02, 1.02)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
