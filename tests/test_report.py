"""report.json as one typed Report: written once by the finisher, read back the same by the CLI summary, the app and the card."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from suture.app import services
from suture.app.workspace import Workspace
from suture.merge.card import build_model_card, report_card, write_report_card
from suture.merge.errors import InputError
from suture.merge.report import Report, read_report, write_report
from suture.recipes.runner import RunResult, run_recipe

# A merge report as runs write it, with an engine's own figures (per_group, options) beside the typed fields.
MERGE_REPORT = {
    "suture_version": "0.0.0",
    "merge_method": "linear",
    "models": ["a", "b"],
    "device": "cpu",
    "tensors": 6,
    "bytes_written": 1024,
    "shards": 1,
    "layers": None,
    "seconds_reading": 0.01,
    "seconds_merging": 0.02,
    "seconds_writing": 0.03,
    "seed": 0,
    "non_finite": {"tensors": ["w"], "count": 1},
    "alignment": {"engine": "ot", "reference": "a", "fused": False, "groups": 2, "options": {"reg": 0.01},
                  "models": {"b": {"per_group": {"g0": {"cost": 1.5, "converged": True}}}}},
    "evaluation": {
        "data": "sklearn:digits", "split": "test", "items": 360,
        "merged": {"loss": 0.5, "accuracy": 0.8}, "models": {"a": {"loss": 0.4, "accuracy": 0.9}},
        "curves": {"aligned": [{"t": 0.0, "loss": 0.4, "accuracy": 0.9}, {"t": 1.0, "loss": float("nan"), "accuracy": 0.1}]},
        "barriers": {"aligned": {"loss": 0.25, "loss_midpoint": None, "accuracy": 0.125}},
        "midpoint_accuracy": {"aligned": 0.625},
        "notes": ["model b: not evaluated (no runnable architecture fits its tensors)"],
    },
    "seconds_total": 1.5,
}


def test_round_trip_keeps_every_key_and_value(tmp_path):
    written = write_report(tmp_path, MERGE_REPORT)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    back = read_report(tmp_path)
    for data in (on_disk, back.to_json(), written.to_json()):
        nan_point = data["evaluation"]["curves"]["aligned"][1]
        assert math.isnan(nan_point.pop("loss"))  # a diverged path stays NaN, not null
        expected = json.loads(json.dumps(MERGE_REPORT))
        expected["evaluation"]["curves"]["aligned"][1].pop("loss")
        assert data == expected
    # typed fields are typed; what the engine added beyond them is kept in the section's extras
    assert back.evaluation.barriers["aligned"].loss == 0.25 and back.evaluation.midpoint_accuracy == {"aligned": 0.625}
    assert back.alignment.engine == "ot" and back.alignment.model_extra == {"groups": 2, "options": {"reg": 0.01}}
    assert back.kind == "merge" and back.layers is None
    assert "1 output tensor(s) contain NaN/Inf" in back.non_finite_problem()


def test_a_merge_run_writes_what_its_result_and_readers_hold(tmp_path):
    for i in (1, 2):
        save_file({"w": torch.full((3, 3), float(i)), "b": torch.ones(3)}, str(tmp_path / f"m{i}.safetensors"))
    recipe = {"merge_method": "linear", "models": [{"model": str(tmp_path / f"m{i}.safetensors"), "parameters": {"weight": 0.5}} for i in (1, 2)]}
    result = run_recipe(recipe, tmp_path / "out")
    assert result.report == read_report(result.out_dir).to_json() == json.loads((result.out_dir / "report.json").read_text())
    assert result.report["tensors"] == 2 and result.report["non_finite"] == {"tensors": [], "count": 0}
    assert {"report.json", "suture_recipe.yml", "README.md"} <= set(result.files)


@pytest.mark.parametrize("text, field", [
    ('{"evaluation": {"merged": {"loss": "high"}}}', "evaluation.merged.loss"),
    ('{"alignment": {"reference": "a"}}', "alignment.engine"),
    ('{"non_finite": {"count": "many"}}', "non_finite.count"),
    ('{"evaluation": {"data": 5}}', "evaluation.data"),
    ('{"alignment": {"engine": "zipit", "models": "two"}}', "alignment.models"),
    ('{"source": {"model": "a"}, "evaluate": {"data": "x", "n": 3, "results": {"stitch": {"accuracy": []}}}}', "evaluate.results.stitch.accuracy"),
])
def test_a_malformed_report_is_refused_in_one_line_naming_file_and_field(tmp_path, text, field):
    (tmp_path / "report.json").write_text(text)
    with pytest.raises(InputError) as err:
        read_report(tmp_path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'report.json'}: field {field}:"), message


@pytest.mark.parametrize("text, words", [("{not json", r"not valid JSON \(.*line 1"), ("[1, 2]", "expected a JSON object, found list")])
def test_unreadable_reports_are_one_line(tmp_path, text, words):
    (tmp_path / "report.json").write_text(text)
    with pytest.raises(InputError, match=words):
        read_report(tmp_path)
    with pytest.raises(InputError, match="no report.json"):
        read_report(tmp_path / "missing")


def test_a_fifo_named_report_json_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "report.json")  # opening it for reading would wait forever for a writer
    with pytest.raises(InputError, match="not a regular file"):
        read_report(tmp_path)


@pytest.fixture
def merged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A real merge run through the app's services into a workspace: (workspace, recipe, output folder)."""
    monkeypatch.setenv("SUTURE_WORKSPACE", str(tmp_path / "ws"))
    ws = Workspace.open(tmp_path / "ws")
    (ws.root / "models").mkdir(parents=True, exist_ok=True)
    for i in (1, 2):
        save_file({"w": torch.full((3, 3), float(i))}, str(ws.root / "models" / f"m{i}.safetensors"))
    recipe = {"merge_method": "linear", "models": [{"model": str(ws.root / "models" / f"m{i}.safetensors"), "parameters": {"weight": 0.5}} for i in (1, 2)]}
    outcome = services.run_merge(recipe, ws)
    assert not outcome.cached and outcome.report == read_report(outcome.out_dir).to_json()
    return ws, recipe, outcome.out_dir


def test_summary_card_and_app_read_the_same_report_from_the_folder(merged):
    ws, recipe, out = merged
    # change the written report: every reader must show the changed figures, so none keeps its own copy
    data = {**json.loads((out / "report.json").read_text()), **{k: MERGE_REPORT[k] for k in ("evaluation", "non_finite", "seconds_total")}}
    (out / "report.json").write_text(json.dumps(data))
    report = read_report(out)

    summary = RunResult(out, ["model.safetensors"]).summary()  # no report held: the summary reads the folder
    assert summary.splitlines()[0] == "merged 1 tensors with linear (0.0 MB) in 1.5 s on cpu"
    assert "  merged                       accuracy 0.8000  loss 0.5000" in summary
    assert "  aligned path                 loss barrier 0.2500, midpoint accuracy 0.6250" in summary
    assert "warning: 1 output tensor(s) contain NaN/Inf" in summary

    outcome = services.run_merge(recipe, ws)  # reused folder: read through the same reader
    assert outcome.cached and outcome.report == report.to_json()
    assert outcome.problem == report.non_finite_problem()
    assert services.evaluation_rows(outcome.report)[-1] == {"model": "merged", "merged": True, "loss": 0.5, "accuracy": 0.8}

    card = write_report_card(out, report).read_text()
    # the path's barrier under its own column, not under "loss"
    assert "| aligned path |  |  | 0.25 | 0.625 |" in card and "| merged | 0.5 | 0.8 |  |  |" in card
    assert card == build_model_card(**report_card(report), recipe_yaml=(out / "suture_recipe.yml").read_text())


def test_a_malformed_report_stops_every_reader_with_the_same_line(merged):
    ws, recipe, out = merged
    data = json.loads((out / "report.json").read_text())
    (out / "report.json").write_text(json.dumps({**data, "tensors": "six"}))
    expected = f"{out / 'report.json'}: field tensors:"
    for reader in (lambda: RunResult(out, []).summary(), lambda: services.run_merge(recipe, ws), lambda: report_card(read_report(out))):
        with pytest.raises(InputError) as err:
            reader()
        assert str(err.value).startswith(expected), str(err.value)


def test_zip_and_stitch_reports_give_their_own_summary_and_card(tmp_path):
    zipped = {"suture_version": "0", "merge_method": None, "models": ["a", "b"], "device": "cpu", "seconds_total": 2.0,
              "alignment": {"engine": "zipit", "multihead": False, "zipped_groups": ["g0"], "branch_groups": []},
              "evaluation": {"data": "sklearn:digits", "split": "test", "items": 10, "merged": {"loss": 1.0, "accuracy": 0.5},
                             "ensemble": {"loss": 0.5, "accuracy": 0.75}, "baselines": {"permutation": {"loss": 2.0, "accuracy": 0.25}},
                             "stop_sweep": [{"stop_at": "full", "loss": 1.0, "accuracy": 0.5}]}}
    (tmp_path / "z").mkdir()
    write_report(tmp_path / "z", zipped)
    report = read_report(tmp_path / "z")
    assert report.kind == "zipit"
    summary = RunResult(tmp_path / "z", []).summary()
    assert summary.startswith("zipit: 2 models in 2.0 s on cpu") and "zip up to full" in summary and "ensemble" in summary
    args = report_card(report)
    assert (args["method"], args["engine"]) == ("zipit", "zipit")
    assert args["evaluation"] is None  # a built model's table comes from its engine (BuiltModel.card_rows)

    stitched = {"method": "procrustes", "source": {"model": "a", "layer": 2}, "target": {"model": "b", "layer": 1},
                "evaluate": {"data": "sklearn:digits", "n": 10, "results": {"stitch": {"accuracy": 0.9, "f1_macro": 0.88, "per_class": [1]},
                                                                             "naive_absolute": {"accuracy": None, "f1_macro": None, "skipped": "shapes differ"}}},
                "plots": ["accuracy.png"], "anchors": {"count": 64}, "seconds_total": 3.0}
    (tmp_path / "s").mkdir()
    report = write_report(tmp_path / "s", stitched)
    assert report.kind == "stitch" and report.model_extra == {"anchors": {"count": 64}}
    summary = RunResult(tmp_path / "s", []).summary()
    assert summary.startswith("stitched a (layer 2) into b (layer 1) with procrustes in 3.0 s")
    assert "naive_absolute               skipped: shapes differ" in summary
    args = report_card(report)
    assert args["inputs"] == ["a", "b"] and args["method"] == "stitch (procrustes)" and args["plot_path"] == "accuracy.png"
    assert args["evaluation"]["stitch"] == {"accuracy": 0.9, "f1_macro": 0.88}
    assert args["stitched"]["source"] == "a up to layer 2"
