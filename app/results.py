"""The results browser's data: every finished run in the workspace's outputs, named by what it is.

A run is a folder under ``outputs/`` with a ``report.json`` (written last by `suture run`, so its presence
means the run finished). Each summary carries the figures people compare runs by: the merged model's
accuracy and loss, and the interpolation barrier of the best path (aligned when the run aligned, else naive),
as defined by Frankle et al. 2020 / Ainsworth et al. 2023 (the rise of the path above the line between its
endpoints). Pure functions, no Streamlit: the page only draws what these return.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from suture.app.workspace import Workspace
from suture.merge.errors import InputError
from suture.merge.evaluate import shown_barrier
from suture.merge.report import as_report, read_report

logger = logging.getLogger(__name__)

PATH_PREFERENCE = ("aligned", "permutation", "naive", "truncated")
clean_barrier = shown_barrier  # one rule for every table that shows a barrier


@dataclass
class RunSummary:
    """One finished run: where it is, what it merged and how, and its key figures."""

    folder: Path
    name: str
    method: str
    engine: str | None
    models: list[str]
    finished: datetime
    accuracy: float | None = None
    loss: float | None = None
    barrier_path: str | None = None
    loss_barrier: float | None = None
    accuracy_barrier: float | None = None
    problem: str | None = None
    curves: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    table: str | None = None  # a `suture compare` run: its table.md (one row per method)
    plot: Path | None = None  # ... and its plot.png

    @property
    def is_compare(self) -> bool:
        """True for a `suture compare` output (many methods side by side) rather than one merge."""
        return self.table is not None

    @property
    def failed(self) -> bool:
        """True when the run's output is not a usable model (NaN/Inf tensors): never offered as a result."""
        return self.problem is not None

    def label(self, now: datetime | None = None) -> str:
        """What the run is, e.g. ``ties · demo:finetune-0-4 + demo:finetune-5-9 · 06:12`` (date shown unless today)."""
        now = now or datetime.now()
        when = self.finished.strftime("%H:%M" if self.finished.date() == now.date() else "%Y-%m-%d %H:%M")
        how = f"{self.engine} → {self.method}" if self.engine else self.method
        return " · ".join(x for x in (how, " + ".join(self.models) or "(no models)", when))


def _recipe(folder: Path) -> Mapping[str, Any]:
    """The run's suture_recipe.yml as data ({} when missing or unreadable: the report alone still names the run)."""
    try:
        data = yaml.safe_load((folder / "suture_recipe.yml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, Mapping) else {}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _summarize_compare(folder: Path, compare: Mapping[str, Any]) -> RunSummary:
    """A `suture compare` output: named by its rows, its figure the best row's average test accuracy."""
    rows = [r for r in compare.get("rows") or [] if isinstance(r, Mapping)]
    averages = [_number(r.get("average")) for r in rows if r.get("method") not in ("base", "individual")]
    try:
        table = (folder / "table.md").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        table = "(table.md missing)"
    report_file = folder / "report.json"
    return RunSummary(folder=folder, name=folder.name, method=f"compare ({len(rows)} rows)", engine=None,
                      models=[str(t.get("name")) for t in compare.get("tasks") or [] if isinstance(t, Mapping)],
                      finished=datetime.fromtimestamp(report_file.stat().st_mtime) if report_file.exists() else datetime.now(),
                      accuracy=max((a for a in averages if a is not None), default=None), table=table,
                      plot=folder / "plot.png" if (folder / "plot.png").is_file() else None)


def non_finite_figures(report: Mapping[str, Any]) -> str | None:
    """One line when the result's own loss/accuracy or a barrier is NaN/Inf (a merge that diverged), else None.

    Only the output's figures count (the merged model's, a stitch's): an input's figures do not make the result bad."""
    evaluation = report.get("evaluation") if isinstance(report.get("evaluation"), Mapping) else {}
    stitch_results = (report.get("evaluate") or {}).get("results") if isinstance(report.get("evaluate"), Mapping) else None
    found: dict[str, Mapping[str, Any]] = {}
    if isinstance(evaluation.get("merged"), Mapping):
        found["merged model"] = evaluation["merged"]
    if isinstance(stitch_results, Mapping) and isinstance(stitch_results.get("stitch"), Mapping):
        found["stitched model"] = stitch_results["stitch"]
    for path, barrier in (evaluation.get("barriers") or {}).items() if isinstance(evaluation.get("barriers"), Mapping) else ():
        if isinstance(barrier, Mapping):
            found[f"{path} barrier"] = barrier
    bad = [f"{what} {key} = {value}" for what, figures in found.items() for key, value in figures.items()
           if key in ("loss", "accuracy") and isinstance(value, float) and not math.isfinite(value)]
    return "non-finite evaluation figures: " + ", ".join(bad) if bad else None


def summarize(folder: Path, report: Mapping[str, Any]) -> RunSummary:
    """The summary of one run from its report.json data (and recipe, for the run's name and base model)."""
    if isinstance(report.get("compare"), Mapping):
        return _summarize_compare(folder, report["compare"])
    recipe = _recipe(folder)
    stitch = report.get("method") and isinstance(report.get("source"), Mapping)
    if stitch:
        method, engine = f"stitch ({report['method']})", None
        models = [str(report["source"].get("model")), str((report.get("target") or {}).get("model"))]
        results = (report.get("evaluate") or {}).get("results") or {}
        figures = results.get("stitch") if isinstance(results.get("stitch"), Mapping) else {}
    else:
        alignment = report.get("alignment") if isinstance(report.get("alignment"), Mapping) else {}
        engine = alignment.get("engine")
        method = str(report.get("merge_method") or engine or "merge")
        engine = engine if report.get("merge_method") else None  # a zip: the engine is the method
        base = recipe.get("base_model")
        models = [str(m) for m in report.get("models") or [] if str(m) != str(base)]
        evaluation = report.get("evaluation") if isinstance(report.get("evaluation"), Mapping) else {}
        figures = evaluation.get("merged") if isinstance(evaluation.get("merged"), Mapping) else {}
    evaluation = report.get("evaluation") if isinstance(report.get("evaluation"), Mapping) else {}
    barriers = evaluation.get("barriers") if isinstance(evaluation.get("barriers"), Mapping) else {}
    path = next((p for p in PATH_PREFERENCE if isinstance(barriers.get(p), Mapping)), next(iter(barriers), None))
    chosen = barriers.get(path) or {}
    curves = evaluation.get("curves") if isinstance(evaluation.get("curves"), Mapping) else {}
    report_file = folder / "report.json"
    return RunSummary(
        folder=folder,
        name=str(recipe.get("name") or folder.name),
        method=method,
        engine=str(engine) if engine else None,
        models=models,
        finished=datetime.fromtimestamp(report_file.stat().st_mtime) if report_file.exists() else datetime.now(),
        accuracy=_number(figures.get("accuracy")),
        loss=_number(figures.get("loss")),
        barrier_path=str(path) if path is not None else None,
        loss_barrier=clean_barrier(chosen.get("loss")),
        accuracy_barrier=clean_barrier(chosen.get("accuracy")),
        # the Report's own rule for weights, then the output's own figures
        problem=as_report(dict(report), str(report_file)).non_finite_problem() or non_finite_figures(report),
        curves={str(k): list(v) for k, v in curves.items() if isinstance(v, list) and v},
    )


def list_runs(workspace: Workspace) -> list[RunSummary]:
    """Every finished run in the workspace's outputs (newest first); unreadable reports are logged and left out."""
    runs = []
    for folder in workspace.list_outputs():
        try:
            report = read_report(folder).to_json()  # the one reader: a malformed file is one line naming it
        except (OSError, InputError) as exc:
            logger.warning("results: %s left out (%s)", folder.name, exc)
            continue
        runs.append(summarize(folder, report))
    return sorted(runs, key=lambda r: r.finished, reverse=True)


def unique_labels(runs: Sequence[RunSummary], now: datetime | None = None) -> list[str]:
    """Each run's label; runs that would read the same get their folder name added, so a choice is never ambiguous."""
    labels = [r.label(now) for r in runs]
    return [f"{lab} · {r.folder.name}" if labels.count(lab) > 1 else lab for lab, r in zip(labels, runs)]


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def overview_rows(runs: Iterable[RunSummary], now: datetime | None = None) -> list[dict[str, Any]]:
    """The all-runs table: one row per run with its status and key figures (failed runs say so)."""
    runs = list(runs)
    return [{"run": label, "method": r.method, "engine": r.engine or "—", "models": " + ".join(r.models),
             "status": ("failed: non-finite weights" if "NaN/Inf" in r.problem else "failed: " + r.problem) if r.failed else "ok",
             "merged accuracy": _fmt(r.accuracy), "loss barrier": _fmt(r.loss_barrier), "folder": r.folder.name}
            for r, label in zip(runs, unique_labels(runs, now))]


def comparison_rows(runs: Sequence[RunSummary], now: datetime | None = None) -> list[dict[str, Any]]:
    """Side by side: one row per figure, one column per run (the barrier row names its path)."""
    labels = unique_labels(runs, now)
    figures: list[tuple[str, Any]] = [
        ("method", lambda r: r.method),
        ("engine", lambda r: r.engine or "—"),
        ("models", lambda r: " + ".join(r.models)),
        ("status", lambda r: r.problem or "ok"),
        ("merged accuracy", lambda r: _fmt(r.accuracy)),
        ("merged loss", lambda r: _fmt(r.loss)),
        ("loss barrier", lambda r: f"{_fmt(r.loss_barrier)} ({r.barrier_path})" if r.barrier_path else "—"),
        ("accuracy barrier", lambda r: f"{_fmt(r.accuracy_barrier)} ({r.barrier_path})" if r.barrier_path else "—"),
        ("folder", lambda r: r.folder.name),
    ]
    return [{"figure": name, **{label: get(r) for label, r in zip(labels, runs)}} for name, get in figures]


def overlaid_curves(runs: Sequence[RunSummary], now: datetime | None = None) -> dict[str, list[dict[str, float]]]:
    """Every chosen run's interpolation curves under one legend ("<run> · <path>"), for one plot."""
    return {f"{label} · {path}": curve for label, r in zip(unique_labels(runs, now), runs) for path, curve in r.curves.items()}
