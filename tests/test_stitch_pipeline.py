"""The `stitch:` recipe section run end to end on digits MLPs: report, artifact, plots, validation errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from suture.merge.data import load_dataset
from suture.merge.errors import RecipeError
from suture.merge.evaluate import evaluate
from suture.merge.demo import demo_models
from suture.recipes.stitch_section import run_stitch, validate_stitch_section
from suture.stitch.stitched import load_stitched


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("zoo")
    a, b = demo_models(root, seeds=(1, 2), widths=[64, 128, 128, 10])
    (narrow,) = demo_models(root, seeds=(3,), widths=[64, 96, 96, 10], epochs=10)
    return {"a": str(a), "b": str(b), "narrow": str(narrow)}


def _section(models: dict[str, str], **over) -> dict:
    sec = {
        "source": {"model": models["a"], "layer": 2},
        "target": {"model": models["b"], "layer": 2},
        "method": "procrustes",
        "anchors": {"count": 256, "selection": "random", "data": "sklearn:digits"},
        "evaluate": {"data": "sklearn:digits", "split": "test", "compare": ["relative", "learned"]},
    }
    sec.update(over)
    return sec


def test_run_stitch_digits_report_artifact_plots(models, tmp_path: Path) -> None:
    calls = []
    report = run_stitch(_section(models, plan={"pairs": [[1, 1], [2, 2], [1, 2]]}), tmp_path, progress=lambda *a: calls.append(a[0]))
    res = report["evaluate"]["results"]
    for key in ("source_only", "target_only", "naive_absolute", "stitch", "procrustes", "relative", "learned", "target_relative"):
        assert 0.0 <= res[key]["accuracy"] <= 1.0 and "f1_macro" in res[key], key
    assert res["naive_absolute"]["accuracy"] < 0.3
    assert res["stitch"]["accuracy"] >= res["target_only"]["accuracy"] - 0.01
    assert res["relative"]["accuracy"] > 0.8
    assert res["learned"]["accuracy"] > 0.95
    assert 0.5 < report["similarity"]["cka_at_cut"] <= 1.0
    assert len(report["similarity"]["matrix"]) == 2 and len(report["similarity"]["matrix"][0]) == 2
    assert report["plan"]["best"]["accuracy"] == max(r["accuracy"] for r in report["plan"]["rows"])
    assert {"load", "features", "stitch", "plan"} <= set(calls)
    # files: report, plots, artifact
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["evaluate"]["results"]["stitch"] == res["stitch"]
    for png in ("similarity.png", "accuracy.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = load_stitched(tmp_path / "stitched")
    test = load_dataset("sklearn:digits", split="test")
    assert evaluate(model, test)["accuracy"] == pytest.approx(res["stitch"]["accuracy"])
    assert model.manifest["info"]["method"] == "procrustes"


def test_run_stitch_relative_learned_finetune_and_widths(models, tmp_path: Path) -> None:
    # relative as the main method, into a narrower target: widths may differ
    rep = run_stitch(_section(models, method="relative", target={"model": models["narrow"]},
                              evaluate={"compare": ["linear"], "similarity": False, "plot": False}), tmp_path / "rel")
    res = rep["evaluate"]["results"]
    assert rep["target"]["width"] == 96 and rep["source"]["width"] == 128
    assert res["naive_absolute"]["accuracy"] is None and "shapes differ" in res["naive_absolute"]["skipped"]
    assert res["stitch"]["accuracy"] > 0.8
    assert (tmp_path / "rel" / "stitched" / "stitch.json").is_file() and not (tmp_path / "rel" / "accuracy.png").exists()
    # learned stitch across depths, fine-tuned with A and B frozen
    rep = run_stitch(_section(models, method="learned", source={"model": models["a"], "layer": 1}, learned={"epochs": 2},
                              evaluate={"compare": [], "similarity": False}), tmp_path / "learned")
    assert rep["evaluate"]["results"]["stitch"]["accuracy"] > 0.95
    back = load_stitched(tmp_path / "learned" / "stitched")
    assert back.manifest["stitch"]["kind"] == "linear" and len(back.manifest["info"]["finetune_loss"]) == 2
    # a head trained on the target's features instead of its own layers
    rep = run_stitch(_section(models, head={"kind": "logistic"}, evaluate={"compare": [], "similarity": False}), tmp_path / "head")
    assert rep["target"]["head"] == "logistic" and rep["evaluate"]["results"]["stitch"]["accuracy"] > 0.95


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"method": "magic"}, "stitch.method"),
        ({"source": {"model": "x", "layer": 1.5}}, "stitch.source.layer"),
        ({"anchors": {"count": 0}}, "stitch.anchors.count"),
        ({"anchors": {"count": 8, "bogus": 1}}, "stitch.anchors.bogus"),
        ({"options": {"no_such_option": 1}}, "stitch.options"),
        ({"evaluate": {"compare": ["nope"]}}, "stitch.evaluate.compare.0"),
    ],
)
def test_validation_names_the_key(models, change, key) -> None:
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        validate_stitch_section(_section(models, **change))


def test_errors_before_work(models, tmp_path: Path) -> None:
    def fails(key: str, **change) -> None:
        with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
            run_stitch(_section(models, **change), tmp_path / "x")

    fails("stitch.source.layer", source={"model": models["a"], "layer": 9})
    fails("stitch.target.layer", target={"model": models["b"], "layer": -9})
    fails("stitch.source.model", source={"model": str(tmp_path / "missing"), "layer": 1})
    fails("stitch.anchors.count", anchors={"count": 5000})
    fails("stitch.options.allow_padding", target={"model": models["narrow"]}, options={"allow_padding": False})
    fails("stitch.evaluate.data", evaluate={"data": "sklearn:nothing"})
    assert not (tmp_path / "x").exists()  # nothing written before the section was found wrong
    # recipe line numbers come through the `where` callback
    with pytest.raises(RecipeError, match="line 7"):
        run_stitch(_section(models, source={"model": models["a"], "layer": 9}), tmp_path / "x", where=lambda p: f"{'.'.join(map(str, p))} (line 7)")
    assert torch.get_num_threads() >= 1


def test_stitch_example_recipe_through_the_runner(tmp_path, demo_cache):
    """The example recipe runs from `suture run`: report, artifact, card, and the issue's floors."""
    import yaml as _yaml

    from suture.recipes.cli import main
    from suture.stitch.stitched import evaluate_stitched

    example = Path(__file__).parents[1] / "recipes" / "examples" / "stitch_digits.yaml"
    assert main(["run", str(example), str(tmp_path / "out"), "-q"]) == 0
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    res = report["evaluate"]["results"]
    assert res["naive_absolute"]["accuracy"] < 0.3  # near chance (0.1)
    assert res["procrustes"]["accuracy"] >= res["target_only"]["accuracy"] - 0.01
    assert res["relative"]["accuracy"] > 0.7
    card = (out / "README.md").read_text()
    front = _yaml.safe_load(card.split("---")[1])
    assert "stitching" in front["tags"]
    assert "demo:mlp-seed1" in card and "procrustes" in card
    model = load_stitched(out / "stitched")
    acc = evaluate_stitched(model, load_dataset("sklearn:digits", split="test"))
    assert abs(acc["accuracy"] - res["stitch"]["accuracy"]) < 1e-9
