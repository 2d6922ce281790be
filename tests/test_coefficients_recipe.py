"""AdaMerging and aTLAS as recipe merge methods: the learning stage, report.json and the exported recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from suture.merge.errors import InputError, RecipeError
from suture.merge.zoo import load_state
from suture.recipes.runner import run_recipe

EXAMPLE = Path(__file__).resolve().parent.parent / "recipes" / "examples" / "adamerging_finetunes.yaml"


def _recipe(**changes) -> dict:
    recipe = yaml.safe_load(EXAMPLE.read_text())
    recipe.pop("evaluate")
    recipe["parameters"]["steps"] = 20
    for key, value in changes.items():
        recipe[key] = value
    return recipe


def _same(a: Path, b: Path) -> bool:
    x, y = load_state(a), load_state(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_adamerging_recipe_reports_and_exports_an_exact_task_arithmetic_recipe(tmp_path):
    seen = []
    result = run_recipe(_recipe(), tmp_path / "ada", progress=lambda *a: seen.append(a))
    report = result.report["data"]
    assert report["statistics"] == "coefficients" and report["objective"] == "entropy" and not report["labelled"]
    assert report["granularity"] == "tensor" and report["steps"] == 20 and report["split"] == "test"
    assert set(report["coefficients"]) == {"demo:finetune-0-4", "demo:finetune-5-9"}
    assert all(len(v) == 6 and all(0 <= c <= 1 for c in v) for v in report["coefficients"].values())
    assert [a[1] for a in seen if a[0] == "adamerging"] == list(range(1, 21))
    exported = result.out_dir / "task_arithmetic_recipe.yaml"
    assert "task_arithmetic_recipe.yaml" in result.files
    text = yaml.safe_load(exported.read_text())
    assert text == report["task_arithmetic_recipe"] and text["merge_method"] == "task_arithmetic"
    again = run_recipe(exported, tmp_path / "ta")
    assert _same(result.out_dir, again.out_dir)


def test_taskwise_adamerging_exports_one_weight_per_model(tmp_path):
    recipe = _recipe()
    recipe["parameters"]["layerwise"] = False
    report = run_recipe(recipe, tmp_path / "ada").report["data"]
    assert report["granularity"] == "task" and report["groups"] == ["all"]
    weights = [m["parameters"]["weight"] for m in report["task_arithmetic_recipe"]["models"]]
    assert weights == [v[0] for v in report["coefficients"].values()] and all(isinstance(w, float) for w in weights)


def test_atlas_recipe_learns_from_labels(tmp_path):
    recipe = _recipe(merge_method="atlas", data={"split": "train", "max_items": 128, "batch_size": 32})
    recipe["parameters"] = {"steps": 15}
    result = run_recipe(recipe, tmp_path / "atlas")
    report = result.report["data"]
    assert report["labelled"] and report["objective"] == "cross_entropy" and report["granularity"] == "tensor"
    assert report["loss_last"] < report["loss_first"]
    assert _same(result.out_dir, run_recipe(result.out_dir / "task_arithmetic_recipe.yaml", tmp_path / "ta").out_dir)


def test_missing_data_and_bad_settings_name_the_key(tmp_path):
    recipe = _recipe()
    del recipe["models"][1]["data"]
    with pytest.raises(RecipeError, match=r"models\[1\].*adamerging.*data:"):
        run_recipe(recipe, tmp_path / "x")
    recipe = _recipe()
    recipe["parameters"]["init"] = 1.5
    with pytest.raises(RecipeError, match="init"):
        run_recipe(recipe, tmp_path / "y")
    recipe = _recipe()
    recipe["models"][1]["data"] = "sklearn:iris"  # 4 features for a 64-input MLP
    with pytest.raises(InputError, match=r"^models\[1\]\.data.*: running its data through the model failed: .*shapes") as err:
        run_recipe(recipe, tmp_path / "z")
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """Two tiny BERT text classifiers fine-tuned from one base (tests/_tiny_bert.py), built on one thread (10x faster)."""
    from suture.merge.threads import single_threaded
    from tests._tiny_bert import build

    with single_threaded():
        return build(tmp_path_factory.mktemp("tiny-bert"))


def test_adamerging_beats_task_arithmetic_on_two_tiny_bert_text_tasks(tiny_bert, tmp_path):
    """Entropy on each task's unlabelled test sentences; scored with their labels against task arithmetic at 0.3."""
    from tests.test_data_driven import _task_scores

    p = tiny_bert
    ta = run_recipe({"merge_method": "task_arithmetic", "base_model": str(p["base"]),
                     "models": [{"model": str(p[t]), "parameters": {"weight": 0.3}} for t in "ab"]}, tmp_path / "ta")
    ada = run_recipe({"merge_method": "adamerging", "base_model": str(p["base"]),
                      "models": [{"model": str(p[t]), "data": str(p[f"{t}_test"])} for t in "ab"],
                      "data": {"max_items": 128, "batch_size": 16}, "parameters": {"steps": 100}}, tmp_path / "ada")
    scores = {"ta": _task_scores(ta.out_dir, p), "ada": _task_scores(ada.out_dir, p)}
    loss = {k: sum(v[t]["loss"] for t in "ab") / 2 for k, v in scores.items()}
    accuracy = {k: sum(v[t]["accuracy"] for t in "ab") / 2 for k, v in scores.items()}
    assert loss["ada"] < 0.5 * loss["ta"] and accuracy["ada"] >= accuracy["ta"], scores
    assert ada.report["data"]["loss_last"] < ada.report["data"]["loss_first"]
    exported = run_recipe(ada.out_dir / "task_arithmetic_recipe.yaml", tmp_path / "exported")
    assert _same(ada.out_dir, exported.out_dir)


def test_the_run_seed_fixes_the_batch_order_and_so_the_coefficients(tmp_path):
    def coefficients(seed: int, out: str) -> dict:
        return run_recipe(_recipe(seed=seed), tmp_path / out).report["data"]["coefficients"]

    first = coefficients(1, "a")
    assert coefficients(1, "b") == first
    assert coefficients(2, "c") != first
