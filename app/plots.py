"""The app's figures, all with matplotlib's object API (no pyplot global state, safe across sessions)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure

COLORMAPS = ("viridis", "magma", "cividis", "Blues")


def heatmap(matrix: Any, rows: Sequence[str], cols: Sequence[str], *, title: str = "", label: str = "",
            cmap: str = "viridis", annotate: bool = True, xlabel: str = "model B", ylabel: str = "model A") -> Figure:
    """A layer-by-layer similarity heatmap (rows: model A's layers, columns: model B's)."""
    values = [[float(v) for v in row] for row in matrix]
    fig = Figure(figsize=(3.2 + 0.8 * max(len(cols), 2), 2.2 + 0.6 * max(len(rows), 2)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(values, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(cols)), labels=list(cols), rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), labels=list(rows))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if annotate:
        finite = [v for row in values for v in row]
        middle = (min(finite) + max(finite)) / 2 if finite else 0.0
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if v < middle else "black")
    fig.colorbar(image, ax=ax, label=label)
    if title:
        ax.set_title(title)
    return fig


def objective(series: Mapping[str, Sequence[float]], *, title: str = "alignment objective per iteration") -> Figure:
    """The alignment objective after each pass of the engine, one line per aligned model."""
    fig = Figure(figsize=(5.5, 3.0), layout="constrained")
    ax = fig.subplots()
    for label, values in series.items():
        ax.plot(range(1, len(values) + 1), list(values), marker="o", label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel("objective")
    ax.grid(True, alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize="small")
    ax.set_title(title)
    return fig


def interpolation(curves: Mapping[str, Sequence[Mapping[str, float]]], metrics: Sequence[str] = ("loss", "accuracy")) -> Figure:
    """Loss/accuracy along interpolation paths (one line per labelled curve)."""
    from suture.merge.plot import interpolation_figure

    return interpolation_figure(curves, list(metrics))


def scores(rows: Sequence[Mapping[str, Any]], metric: str = "accuracy") -> Figure:
    """A horizontal bar per model (inputs and the merge) for one metric."""
    labels = [str(r["model"]) for r in rows]
    values = [float(r[metric]) for r in rows]
    fig = Figure(figsize=(6.0, 0.6 + 0.45 * len(rows)), layout="constrained")
    ax = fig.subplots()
    bars = ax.barh(range(len(rows)), values, color=["#d62728" if r.get("merged") else "#1f77b4" for r in rows])
    ax.set_yticks(range(len(rows)), labels=labels)
    ax.invert_yaxis()
    ax.bar_label(bars, fmt="%.3f", padding=2, fontsize=8)
    ax.set_xlabel(f"test {metric}")
    if metric == "accuracy":
        ax.set_xlim(0, 1.08)
    ax.grid(True, axis="x", alpha=0.3)
    return fig


def matrix(values: Any, *, title: str = "", kind: str = "transport", xlabel: str = "other model's units",
           ylabel: str = "reference units") -> Figure:
    """An alignment matrix (reference units x the other model's units): a permutation or a transport plan."""
    import numpy as np

    data = np.asarray(values, dtype=float)
    fig = Figure(figsize=(5.2, 4.4), layout="constrained")
    ax = fig.subplots()
    # a permutation is sparse: black on white shows each matched pair; a plan needs a colour scale
    image = ax.imshow(data, cmap="Greys" if kind == "permutation" else "viridis", aspect="auto", interpolation="nearest")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if kind != "permutation":
        fig.colorbar(image, ax=ax, label="transported mass")
    if title:
        ax.set_title(title, fontsize="medium")
    return fig


def stop_sweep(rows: Sequence[Mapping[str, Any]], ensemble_accuracy: float | None = None,
               baselines: Mapping[str, Mapping[str, float]] | None = None) -> Figure:
    """ZipIt joint accuracy against the layer zipping stops at (partial zipping), with ensemble and baselines."""
    ordered = list(reversed(list(rows)))  # left to right: more layers zipped, the full zip last
    labels = [str(r["stop_at"]) for r in ordered]
    fig = Figure(figsize=(5.8, 3.4), layout="constrained")
    ax = fig.subplots()
    ax.plot(range(len(ordered)), [float(r["accuracy"]) for r in ordered], marker="o", label="ZipIt")
    if ensemble_accuracy is not None:
        ax.axhline(float(ensemble_accuracy), color="#2ca02c", linestyle="--", label="ensemble")
    for (label, vals), style in zip((baselines or {}).items(), (":", "-.")):
        ax.axhline(float(vals["accuracy"]), color="#7f7f7f", linestyle=style, label=label)
    ax.set_xticks(range(len(ordered)), labels=labels)
    ax.set_xlabel("zipped up to (later layers kept per model)")
    ax.set_ylabel("joint accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return fig
