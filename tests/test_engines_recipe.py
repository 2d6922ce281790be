"""OT fusion and ZipIt through recipes: different widths, compression, depths, task zipping, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from suture.merge.errors import RecipeError, SutureError
from suture.merge.store import open_store
from suture.recipes.runner import run_recipe

EXAMPLES = Path(__file__).parents[1] / "recipes" / "examples"


@pytest.fixture(scope="module")
def mlps(tmp_path_factory):
    """Digits MLPs: two of width 128 (seeds 1, 2), one of width 192, one with 3 hidden layers."""
    from suture.merge import demo, zoo
    from suture.merge.data import load_dataset

    root = tmp_path_factory.mktemp("ot-mlps")
    data = load_dataset("sklearn:digits", split="train")
    out = {}
    for name, widths, seed in (("a", [64, 128, 128, 10], 1), ("b", [64, 128, 128, 10], 2),
                               ("wide", [64, 192, 192, 10], 3), ("deep", [64, 128, 128, 128, 10], 4)):
        module = zoo.build_seeded("suture.merge.zoo:mlp", seed, widths=widths)
        demo.train(module, data, epochs=20, seed=seed)
        out[name] = zoo.save_module(module, root / name, "suture.merge.zoo:mlp", {"widths": widths})
    return out


def _recipe(a, b, **alignment):
    return {"merge_method": "linear",
            "models": [{"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}],
            "alignment": {"engine": "ot", "data": "sklearn:digits", **alignment},
            "evaluate": {"data": "sklearn:digits"}}


def test_ot_exact_on_equal_widths_matches_a_permutation(tmp_path, mlps):
    result = run_recipe(_recipe(mlps["a"], mlps["b"], solver="emd"), tmp_path / "out")
    ev = result.report["evaluation"]
    assert ev["barriers"]["aligned"]["loss"] < ev["barriers"]["naive"]["loss"]
    assert ev["midpoint_accuracy"]["aligned"] > ev["midpoint_accuracy"]["naive"]
    # the exact plan between equal widths is a permutation: OT's path is weight matching's path or close to it
    assert set(ev["curves"]) == {"naive", "permutation", "aligned"}
    assert ev["barriers"]["aligned"]["loss"] <= ev["barriers"]["permutation"]["loss"] + 0.1
    groups = result.report["alignment"]["models"][str(mlps["b"])]["per_group"]
    assert all(g["method"] in ("assignment", "linear_assignment", "lap") or g["converged"] for g in groups.values())


def test_ot_sinkhorn_fuses_different_widths_better_than_truncation(tmp_path, mlps):
    result = run_recipe(_recipe(mlps["a"], mlps["wide"], solver="sinkhorn", reg=0.05, blend=0.5), tmp_path / "out")
    ev = result.report["evaluation"]
    merged = open_store(result.out_dir)
    assert merged.shape("layers.0.weight") == (128, 64)  # the reference's widths
    assert ev["midpoint_accuracy"]["aligned"] > ev["midpoint_accuracy"]["truncated"] + 0.02, ev["midpoint_accuracy"]
    assert ev["merged"]["accuracy"] > 0.9


def test_ot_compresses_to_target_widths(tmp_path, mlps):
    recipe = _recipe(mlps["wide"], mlps["a"], target_widths={"layers.0": 96, "layers.1": 96})
    result = run_recipe(recipe, tmp_path / "out")
    merged = open_store(result.out_dir)
    assert merged.shape("layers.0.weight") == (96, 64) and merged.shape("layers.1.weight") == (96, 96)
    config = json.loads((result.out_dir / "config.json").read_text())
    assert config["suture_architecture"]["kwargs"]["widths"] == [64, 96, 96, 10]
    assert result.report["evaluation"]["merged"]["accuracy"] > 0.85


def test_ot_target_width_equal_to_the_other_model_still_evaluates(tmp_path, mlps):
    # the reference (192) is compressed to the other model's own width (128): every path has the merged shapes
    recipe = _recipe(mlps["wide"], mlps["a"], target_widths={"layers.0": 128, "layers.1": 128})
    result = run_recipe(recipe, tmp_path / "out")
    assert open_store(result.out_dir).shape("layers.0.weight") == (128, 64)
    ev = result.report["evaluation"]
    assert set(ev["models"]) == {str(mlps["wide"]), str(mlps["a"])}
    assert ev["merged"]["accuracy"] > 0.85
    assert {"naive", "permutation", "aligned"} <= set(ev["curves"]), ev.get("notes")
    # the weight-matching path uses a spec of the compressed widths, so it is a real alignment
    assert ev["barriers"]["permutation"]["loss"] < ev["barriers"]["naive"]["loss"]
    assert json.loads((result.out_dir / "report.json").read_text())["evaluation"]["merged"] == ev["merged"]


def test_ot_fuses_different_depths(tmp_path, mlps):
    result = run_recipe(_recipe(mlps["a"], mlps["deep"]), tmp_path / "out")
    assert result.report["alignment"]["fused"] is True
    assert result.report["evaluation"]["merged"]["accuracy"] > 0.85
    config = json.loads((result.out_dir / "config.json").read_text())
    assert config["suture_architecture"]["kwargs"]["widths"][-1] == 10


def test_ot_activation_metric_needs_data(tmp_path, mlps):
    recipe = _recipe(mlps["a"], mlps["wide"], ground_metric="activations")
    del recipe["alignment"]["data"], recipe["evaluate"]
    with pytest.raises(SutureError, match="calibration"):
        run_recipe(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_engine_options_are_checked_before_work(tmp_path, mlps):
    recipe = _recipe(mlps["a"], mlps["b"], alpha=0.3)
    with pytest.raises(RecipeError, match="do not apply to engine 'ot'"):
        run_recipe(recipe, tmp_path / "out")


def test_zipit_example_beats_permutation_and_partial_zips_approach_the_ensemble(tmp_path, demo_cache):
    result = run_recipe(EXAMPLES / "zipit_tasks.yaml", tmp_path / "out")
    ev = result.report["evaluation"]
    assert ev["merged"]["accuracy"] >= ev["baselines"]["permutation"]["accuracy"] + 0.05, ev
    sweep = [row["accuracy"] for row in ev["stop_sweep"]]  # full zip first, then earlier stops
    assert sweep[-1] >= sweep[0] - 0.005 and ev["ensemble"]["accuracy"] >= max(sweep) - 0.01, ev
    assert (result.out_dir / "stop_sweep.png").is_file()


def test_zipit_partial_output_loads_as_a_multihead_module(tmp_path, demo_cache):
    import torch

    from suture.merge.data import load_dataset
    from suture.merge.evaluate import evaluate
    from suture.merge.multihead import is_multihead, load_multihead

    recipe = {"models": [{"model": "demo:task-0-4"}, {"model": "demo:task-5-9"}],
              "alignment": {"engine": "zipit", "data": "sklearn:digits", "stop_at": "layers.1"},
              "evaluate": {"data": "sklearn:digits", "plot": False}}
    out = run_recipe(recipe, tmp_path / "out").out_dir
    assert is_multihead(out)
    module = load_multihead(out)
    data = load_dataset("sklearn:digits", split="test")
    assert module(data.inputs[:3]).shape == (3, 10)
    assert evaluate(module, data)["accuracy"] == pytest.approx(json.loads((out / "report.json").read_text())["evaluation"]["merged"]["accuracy"])
    assert torch.isfinite(module(data.inputs[:3])).all()
