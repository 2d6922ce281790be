"""The results browser's helpers (suture.app.results): runs found, named, summarised and compared."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import pytest

from suture.app import results
from suture.app.workspace import Workspace


def _curve(mid_loss: float) -> list[dict[str, float]]:
    return [{"t": 0.0, "loss": 0.1, "accuracy": 0.98}, {"t": 0.5, "loss": mid_loss, "accuracy": 0.9},
            {"t": 1.0, "loss": 0.3, "accuracy": 0.96}]


def _run(ws: Workspace, folder: str, report: dict, recipe: str = "", when: float = 1_700_000_000.0) -> Path:
    out = ws.outputs / folder
    out.mkdir(parents=True)
    (out / "report.json").write_text(json.dumps(report))
    if recipe:
        (out / "suture_recipe.yml").write_text(recipe)
    os.utime(out / "report.json", (when, when))
    return out


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    ws = Workspace.open(tmp_path / "ws")
    _run(ws, "ties-0123456789", {
        "merge_method": "ties", "models": ["demo:base", "demo:finetune-0-4", "demo:finetune-5-9"],
        "non_finite": {"tensors": [], "count": 0},
        "evaluation": {"merged": {"loss": 0.2, "accuracy": 0.922}, "models": {}},
    }, recipe="name: my-ties\nbase_model: demo:base\nmerge_method: ties\n", when=1_700_000_000.0)
    _run(ws, "rebasin-abcdef0123", {
        "merge_method": "linear", "models": ["demo:mlp-seed1", "demo:mlp-seed2"], "alignment": {"engine": "weight_matching"},
        "non_finite": {"tensors": [], "count": 0},
        "evaluation": {"merged": {"loss": 0.11, "accuracy": 0.977},
                       "curves": {"naive": _curve(0.65), "aligned": _curve(0.2)},
                       "barriers": {"naive": {"loss": 0.45, "accuracy": 0.07}, "aligned": {"loss": -3e-9, "accuracy": 0.05}}},
    }, when=1_700_000_600.0)
    return ws


def test_runs_are_named_by_what_they_are_newest_first(ws: Workspace):
    runs = results.list_runs(ws)
    now = datetime.fromtimestamp(1_700_000_600.0)
    assert [r.folder.name for r in runs] == ["rebasin-abcdef0123", "ties-0123456789"]
    rebasin, ties = runs
    hhmm = datetime.fromtimestamp(1_700_000_000.0).strftime("%H:%M")
    # the base model is not one of the merged models; the recipe's name is kept
    assert ties.label(now) == f"ties · demo:finetune-0-4 + demo:finetune-5-9 · {hhmm}"
    assert ties.name == "my-ties" and ties.models == ["demo:finetune-0-4", "demo:finetune-5-9"]
    assert rebasin.label(now).startswith("weight_matching → linear · demo:mlp-seed1 + demo:mlp-seed2 · ")
    # another day: the date is shown too
    assert ties.label(datetime(2100, 1, 1)).endswith(datetime.fromtimestamp(1_700_000_000.0).strftime("%Y-%m-%d %H:%M"))


def test_key_figures_prefer_the_aligned_path_and_clamp_float_noise(ws: Workspace):
    rebasin, ties = results.list_runs(ws)
    assert rebasin.barrier_path == "aligned" and rebasin.loss_barrier == 0.0 and rebasin.accuracy_barrier == 0.05
    assert rebasin.accuracy == pytest.approx(0.977) and set(rebasin.curves) == {"naive", "aligned"}
    assert ties.barrier_path is None and ties.loss_barrier is None and ties.accuracy == pytest.approx(0.922)
    assert results.clean_barrier(-0.02) == -0.02  # a real dip below the line is kept
    assert results.clean_barrier(float("nan")) is None and results.clean_barrier(None) is None


def test_comparison_has_one_column_per_run_and_overlaid_curves(ws: Workspace):
    runs = results.list_runs(ws)
    now = datetime.fromtimestamp(1_700_000_600.0)
    rows = results.comparison_rows(runs, now)
    labels = results.unique_labels(runs, now)
    by_figure = {row["figure"]: row for row in rows}
    assert set(by_figure["merged accuracy"]) == {"figure", *labels}
    assert by_figure["merged accuracy"][labels[0]] == "0.9770"
    assert by_figure["loss barrier"][labels[0]] == "0.0000 (aligned)" and by_figure["loss barrier"][labels[1]] == "—"
    curves = results.overlaid_curves(runs, now)
    assert list(curves) == [f"{labels[0]} · naive", f"{labels[0]} · aligned"]


def test_same_label_runs_are_told_apart_and_failed_runs_say_so(ws: Workspace):
    _run(ws, "ties-ffffffffff", {
        "merge_method": "ties", "models": ["demo:base", "demo:finetune-0-4", "demo:finetune-5-9"],
        "non_finite": {"tensors": ["layers.0.weight"], "count": 1}, "evaluation": {},
    }, recipe="base_model: demo:base\n", when=1_700_000_000.0)
    (ws.outputs / "broken").mkdir()
    (ws.outputs / "broken" / "report.json").write_text("{not json")
    runs = results.list_runs(ws)  # the unreadable report is left out, not fatal
    assert len(runs) == 3
    labels = results.unique_labels(runs)
    assert len(set(labels)) == 3 and any(lab.endswith("· ties-ffffffffff") for lab in labels)
    failed = next(r for r in runs if r.folder.name == "ties-ffffffffff")
    assert failed.failed and "NaN/Inf" in failed.problem
    status = {row["folder"]: row["status"] for row in results.overview_rows(runs)}
    assert status["ties-ffffffffff"].startswith("failed") and status["ties-0123456789"] == "ok"


def _compare_run(ws: Workspace) -> Path:
    from suture.merge.plot import plot_compare
    from suture.recipes.compare import table_markdown

    row = {"needs": {"data": "none", "examples": 0, "selection": None}, "seconds_total": 1.0, "seconds_merge": 0.5, "peak_memory_mb": 3.0,
           "heldout": {"held": 0.6}}
    report = {"models": ["a", "b"], "compare": {
        "tasks": [{"name": "a", "heldout": False}, {"name": "b", "heldout": False}, {"name": "held", "heldout": True}],
        "individual": {"a": 0.9, "b": 0.8},
        "rows": [{**row, "name": "individual", "method": "individual", "accuracy": {"a": 0.9, "b": 0.8, "held": 0.6},
                  "average": 0.85, "normalized_average": 1.0},
                 {**row, "name": "ties", "method": "ties", "accuracy": {"a": 0.7, "b": 0.6, "held": 0.5},
                  "average": 0.65, "normalized_average": 0.764, "chosen": {"lambda": 0.5}}]}}
    out = _run(ws, "compare-1", report, when=1_700_000_900.0)
    (out / "table.md").write_text(table_markdown(report))
    plot_compare({"individual": {"average": 0.85}, "ties": {"average": 0.65}}, out / "plot.png", individual=0.85)
    return out


def test_a_compare_output_is_listed_with_its_table_and_plot(ws: Workspace):
    out = _compare_run(ws)
    runs = results.list_runs(ws)
    assert runs[0].folder == out and runs[0].is_compare and not runs[1].is_compare
    assert runs[0].method == "compare (2 rows)" and runs[0].accuracy == 0.65  # the best merge, not the fine-tunes
    assert "| ties | 0.7000 | 0.6000 | 0.6500 | 0.7640 | 0.5000 |" in runs[0].table and "lambda=0.5" in runs[0].table
    assert runs[0].plot == out / "plot.png" and runs[0].models == ["a", "b", "held"]


def test_results_page_shows_a_compare_table_and_plot(ws: Workspace, monkeypatch: pytest.MonkeyPatch):
    from streamlit.testing.v1 import AppTest

    _compare_run(ws)
    monkeypatch.setenv("SUTURE_WORKSPACE", str(ws.root))
    at = AppTest.from_file(str(Path(results.__file__).parent / "main.py"), default_timeout=120).run()
    at.switch_page("views/results.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox(key="results.compare_run").value.startswith("compare (2 rows)")
    assert any("| ties | 0.7000 |" in m.value for m in at.markdown)
    assert len(at.get("image")) == 1
