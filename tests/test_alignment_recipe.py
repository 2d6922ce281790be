"""Alignment through recipes: the quickstart floors, planted permutations, activation matching, BN, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from suture.merge.errors import AlignmentError
from suture.merge.store import open_store
from suture.merge.writer import save_tensors
from suture.recipes.runner import run_recipe

EXAMPLES = Path(__file__).parents[1] / "recipes" / "examples"


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "out"
    return run_recipe(EXAMPLES / "quickstart.yaml", out)


def test_quickstart_meets_the_rebasin_floors(quickstart):
    ev = quickstart.report["evaluation"]
    naive, aligned = ev["barriers"]["naive"]["loss"], ev["barriers"]["aligned"]["loss"]
    assert naive >= 0.3, ev["barriers"]
    assert aligned <= 0.05, ev["barriers"]
    endpoints = [m["accuracy"] for m in ev["models"].values()]
    assert ev["midpoint_accuracy"]["aligned"] >= sum(endpoints) / 2 - 0.02
    assert ev["merged"]["accuracy"] == pytest.approx(ev["midpoint_accuracy"]["aligned"], abs=1e-9)
    al = quickstart.report["alignment"]
    curve = al["models"]["demo:mlp-seed2"]["objective_per_iteration"]
    assert curve == sorted(curve)  # coordinate descent never lowers the objective
    assert (quickstart.out_dir / "interpolation.png").stat().st_size > 10_000
    card = (quickstart.out_dir / "README.md").read_text()
    assert "weight_matching" in card and "interpolation.png" in card
    assert json.loads((quickstart.out_dir / "report.json").read_text())["evaluation"]["barriers"]["aligned"]["loss"] == aligned


def _permuted_copy(folder: Path, out: Path, seed: int) -> dict[str, torch.Tensor]:
    """Write a functionally identical, randomly permuted copy of a zoo model (with its config)."""
    from suture.merge.derive import derive_spec
    from suture.merge.spec import permute_state

    store = open_store(folder)
    spec, _ = derive_spec(store, input_shape=(2, 64))
    perms = spec.random_permutations(seed)
    state = permute_state(store.state_dict(), spec, perms)
    save_tensors(state, out, extra_files={"config.json": (folder / "config.json").read_text()})
    return state


@pytest.mark.parametrize("engine", ["weight_matching", "activation_matching"])
def test_planted_permutation_is_undone_bit_for_bit(tmp_path, demo_cache, engine):
    from suture.merge.refs import demo_path

    original = demo_path("mlp-seed1")
    _permuted_copy(original, tmp_path / "permuted", seed=3)
    assert not torch.equal(open_store(tmp_path / "permuted").get("layers.0.weight"), open_store(original).get("layers.0.weight"))
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(original), "parameters": {"weight": 0.0}},
                   {"model": str(tmp_path / "permuted"), "parameters": {"weight": 1.0}}],
        "alignment": {"engine": engine, "data": "sklearn:digits"},
    }
    out = run_recipe(recipe, tmp_path / "out").out_dir
    merged, ref = open_store(out), open_store(original)
    for name in ref.names():
        assert torch.equal(merged.get(name), ref.get(name)), name


def test_resnet_with_batchnorm_reset_reduces_the_barrier(tmp_path, demo_cache):
    result = run_recipe(EXAMPLES / "resnet_rebasin.yaml", tmp_path / "out")
    b = result.report["evaluation"]["barriers"]
    assert b["aligned"]["loss"] < 0.6 * b["naive"]["loss"], b
    assert result.report["alignment"]["postprocess"]["repair"] == "reset_bn"


def test_different_widths_point_to_ot(tmp_path):
    from suture.merge import zoo

    a = zoo.save_module(zoo.mlp((64, 32, 10)), tmp_path / "a", "suture.merge.zoo:mlp", {"widths": [64, 32, 10]})
    b = zoo.save_module(zoo.mlp((64, 48, 10)), tmp_path / "b", "suture.merge.zoo:mlp", {"widths": [64, 48, 10]})
    recipe = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1}}, {"model": str(b), "parameters": {"weight": 1}}],
              "alignment": {"engine": "weight_matching", "input_shape": [2, 64]}}
    with pytest.raises(AlignmentError, match="OT engine"):
        run_recipe(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_alignment_keys_fail_before_work(tmp_path):
    from suture.merge.errors import RecipeError

    recipe = {"merge_method": "linear", "models": [{"model": "demo:mlp-seed1", "parameters": {"weight": 1}}],
              "alignment": {"engine": "telepathy"}}
    with pytest.raises(RecipeError, match="alignment.engine"):
        run_recipe(recipe, tmp_path / "out")


def test_three_models_align_to_a_chosen_reference(tmp_path, demo_cache):
    """Two permuted copies and the original, aligned to the original, average back to the original."""
    from suture.merge.refs import demo_path

    original = demo_path("mlp-seed1")
    _permuted_copy(original, tmp_path / "p3", seed=3)
    _permuted_copy(original, tmp_path / "p4", seed=4)
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(tmp_path / "p3"), "parameters": {"weight": 1.0}},
                   {"model": str(original), "parameters": {"weight": 1.0}},
                   {"model": str(tmp_path / "p4"), "parameters": {"weight": 1.0}}],
        "alignment": {"engine": "weight_matching", "reference": str(original), "input_shape": [2, 64]},
    }
    result = run_recipe(recipe, tmp_path / "out")
    assert result.report["alignment"]["reference"] == str(original)
    assert set(result.report["alignment"]["models"]) == {str(tmp_path / "p3"), str(tmp_path / "p4")}
    merged, ref = open_store(result.out_dir), open_store(original)
    for name in ref.names():
        torch.testing.assert_close(merged.get(name), ref.get(name), rtol=1e-6, atol=1e-7)


def test_architecture_named_in_the_recipe_with_kwargs(tmp_path, demo_cache):
    """Weights without a recorded architecture align once the recipe names the factory and its kwargs."""
    import shutil

    from suture.merge.refs import demo_path

    for name, seed in (("a", "mlp-seed1"), ("b", "mlp-seed2")):
        (tmp_path / name).mkdir()
        shutil.copy(demo_path(seed) / "model.safetensors", tmp_path / name / "model.safetensors")
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(tmp_path / "a"), "parameters": {"weight": 0.5}}, {"model": str(tmp_path / "b"), "parameters": {"weight": 0.5}}],
        "architecture": {"factory": "suture.merge.zoo:mlp", "kwargs": {"widths": [64, 512, 512, 512, 10]}},
        "alignment": {"engine": "activation_matching", "data": "sklearn:digits"},
        "evaluate": {"data": "sklearn:digits", "plot": False},
    }
    result = run_recipe(recipe, tmp_path / "out")
    ev = result.report["evaluation"]
    assert ev["barriers"]["aligned"]["loss"] < ev["barriers"]["naive"]["loss"] / 2, ev["barriers"]
    recipe["architecture"] = {"factory": "suture.merge.zoo:mlp", "kwargs": {"widths": [64, 32, 10]}}  # weights do not fit
    from suture.merge.errors import InputError

    with pytest.raises(InputError, match="do not fit"):
        run_recipe(recipe, tmp_path / "out2")
