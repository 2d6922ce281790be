"""Plots of interpolation curves (PNG files, no display needed).

Figures are built with matplotlib's object API and the Agg canvas, so nothing touches pyplot's global
state or the process-wide backend (safe inside Streamlit and tests).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any
from pathlib import Path

from suture.merge.errors import InputError

logger = logging.getLogger(__name__)

_LABELS = {"loss": "test loss", "accuracy": "test accuracy"}
# One set of text sizes (points) for every figure the CLI writes and the app shows, so panels side by side match.
FONT = {"title": 10, "label": 9, "tick": 8, "legend": 8}


def style_axes(ax: Any) -> None:
    """Apply the shared text sizes to one panel (title, axis labels, tick labels)."""
    ax.title.set_fontsize(FONT["title"])
    ax.xaxis.label.set_fontsize(FONT["label"])
    ax.yaxis.label.set_fontsize(FONT["label"])
    ax.tick_params(labelsize=FONT["tick"])


def save_png(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Render a Figure on the Agg canvas (no pyplot state) and write it as PNG, making the folder."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg


    FigureCanvasAgg(fig)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, format="png")
    return out


def legend_below(fig: Any, ax: Any) -> None:
    """One legend for the figure, under its panels, so it never covers a line (the layout makes room for it)."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    longest = max(len(label) for label in labels)
    ncols = 1 if longest > 40 else min(len(labels), 4)
    fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize=FONT["legend"], frameon=False)


def legend_rows(labels: Sequence[str]) -> int:
    """How many lines legend_below takes for these labels (figures grow by that much)."""
    if not labels:
        return 0
    return len(labels) if max(len(label) for label in labels) > 40 else -(-len(labels) // 4)


def interpolation_figure(
    curves: Mapping[str, Sequence[Mapping[str, float]]],
    metric: str | Sequence[str] = ("loss", "accuracy"),
    title: str | None = None,
):
    """A matplotlib Figure with one panel per metric and one line per labelled curve."""
    from matplotlib.figure import Figure

    metrics = [metric] if isinstance(metric, str) else list(metric)
    if not curves:
        raise InputError("nothing to plot: no interpolation curves given")
    if not metrics:
        raise InputError("nothing to plot: no metric named")
    fig = Figure(figsize=(5.0 * len(metrics), 3.6 + 0.2 * legend_rows([str(k) for k in curves])), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, name in zip(axes, metrics):
        for label, curve in curves.items():
            rows = sorted(curve, key=lambda r: r["t"])
            if not rows or name not in rows[0]:
                raise InputError(f"curve {label!r} has no metric {name!r}")
            ax.plot([r["t"] for r in rows], [r[name] for r in rows], marker="o", markersize=3, label=label)
        ax.set_xlabel("interpolation t (0 = model A, 1 = model B)")
        ax.set_ylabel(_LABELS.get(name, name))
        ax.set_xlim(0.0, 1.0)
        ax.grid(True, alpha=0.3)
        style_axes(ax)
    legend_below(fig, axes[0])  # every panel has the same lines: one legend, below, covering none of them
    if title:
        fig.suptitle(title, fontsize=FONT["title"])
    return fig


def plot_interpolation(
    curves: Mapping[str, Sequence[Mapping[str, float]]],
    path: str | Path,
    metric: str | Sequence[str] = ("loss", "accuracy"),
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """Write a PNG with a loss panel and an accuracy panel (or the named metrics) for labelled curves."""

    fig = interpolation_figure(curves, metric, title)
    out = save_png(fig, path, dpi)
    logger.info("wrote interpolation plot %s", out)
    return out


def plot_stop_sweep(sweep: Sequence[Mapping[str, Any]], ensemble_accuracy: float | None, path: str | Path, dpi: int = 120) -> Path:
    """Accuracy of partial zips against the layer zipping stops at (full zip first), with the ensemble as a line."""
    from matplotlib.figure import Figure

    if not sweep:
        raise InputError("nothing to plot: empty stop-layer sweep")
    fig = Figure(figsize=(max(5.0, 0.9 * len(sweep)), 3.8), layout="constrained")
    ax = fig.subplots()
    labels = [str(row["stop_at"]) for row in sweep]
    ax.plot(range(len(sweep)), [row["accuracy"] for row in sweep], marker="o", label="zipped model")
    if ensemble_accuracy is not None:
        ax.axhline(ensemble_accuracy, linestyle="--", color="gray", label="ensemble")
    ax.set_xticks(range(len(sweep)), labels, rotation=30, ha="right")
    ax.set_xlabel("zipped up to (later layers kept per model)")
    ax.set_ylabel("test accuracy")
    ax.grid(True, alpha=0.3)
    style_axes(ax)
    legend_below(fig, ax)
    out = save_png(fig, path, dpi)
    return out


def plot_compare(rows: Mapping[str, Mapping[str, float]], path: str | Path, *, individual: float | None = None, dpi: int = 120) -> Path:
    """Horizontal bars per compared row (one bar per figure, e.g. average and held-out accuracy), best on top."""
    from matplotlib.figure import Figure

    if not rows:
        raise InputError("nothing to plot: no compared rows")
    names = sorted(rows, key=lambda n: rows[n].get("average", 0.0))
    figures = list(next(iter(rows.values())))
    height = 0.8 / max(len(figures), 1)
    fig = Figure(figsize=(7.0, 1.2 + 0.32 * len(names) * max(1, len(figures) / 1.5)), layout="constrained")
    ax = fig.subplots()
    for k, figure in enumerate(figures):
        ys = [i + (k - (len(figures) - 1) / 2) * height for i in range(len(names))]
        ax.barh(ys, [rows[n].get(figure, float("nan")) for n in names], height=height, label=figure)
    if individual is not None:
        ax.axvline(individual, linestyle="--", color="gray", label="individual fine-tunes (average)")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("test accuracy")
    ax.set_xlim(0.0, 1.0)
    ax.grid(True, axis="x", alpha=0.3)
    style_axes(ax)
    legend_below(fig, ax)
    out = save_png(fig, path, dpi)
    return out
