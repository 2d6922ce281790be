"""Layers keep their direction: one axis-length check for spec and engines, core errors name their own settings."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from suture.merge.align.weight_matching import weight_matching
from suture.merge.errors import AlignmentError, InputError, OptionError, RecipeError
from suture.merge.spec import Member, PermGroup, PermutationSpec, axis_problem
from suture.merge.align.zipit import zip_models

ROOT = Path(__file__).resolve().parent.parent


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def _spec(size: int) -> PermutationSpec:
    spec = PermutationSpec()
    spec.add(PermGroup("hidden", size, [Member("0.weight", 0), Member("0.bias", 0), Member("2.weight", 1, role="in")]))
    return spec


def test_spec_and_engines_refuse_a_misfit_group_with_one_message() -> None:
    state = _model().state_dict()
    assert axis_problem(_spec(3).groups["hidden"], Member("0.weight", 0), state["0.weight"].shape) is None
    problem = axis_problem(_spec(5).groups["hidden"], Member("0.weight", 0), state["0.weight"].shape)
    assert problem == "group 'hidden' (size 5) does not fit tensor '0.weight' axis 0 of length 3"
    assert "has no axis 2" in axis_problem(_spec(3).groups["hidden"], Member("0.bias", 2), state["0.bias"].shape)
    with pytest.raises(ValueError, match=re.escape(problem)):
        _spec(5).validate({k: tuple(v.shape) for k, v in state.items()})
    with pytest.raises(AlignmentError, match=re.escape(problem)):
        weight_matching(_spec(5), state, _model().state_dict())
    with pytest.raises(AlignmentError, match=re.escape(f"model 0: {problem}")):
        zip_models(_spec(5), [_model(), _model()], torch.randn(8, 4), reset_bn=False)
    # a fitting spec passes all three
    _spec(3).validate({k: tuple(v.shape) for k, v in state.items()})
    assert set(weight_matching(_spec(3), state, _model().state_dict()).perms) == {"hidden"}


def test_option_error_names_the_setting_not_a_recipe_key() -> None:
    from suture.merge.align.ot import fuse_states

    with pytest.raises(OptionError) as info:
        fuse_states({}, {}, blend=2.0)
    assert info.value.field == ("blend",) and "alignment" not in str(info.value)
    assert isinstance(info.value, InputError) and str(info.value) == "blend: must be in [0, 1], got 2.0"


def test_recipe_runner_maps_core_fields_to_recipe_keys(tmp_path) -> None:
    from suture.merge import zoo
    from suture.recipes.runner import run_recipe

    for seed in (1, 2):
        zoo.save_module(zoo.build_seeded("mlp", seed, widths=[64, 16, 10]), tmp_path / f"m{seed}", "suture.merge.zoo:mlp",
                        {"widths": [64, 16, 10]})
    recipe = (f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'm1'}\n  - model: {tmp_path / 'm2'}\n"
              "alignment:\n  engine: ot\n  blend: 0.5\n  target_widths: {nope: 3}\n")
    with pytest.raises(InputError, match=r"^alignment\.target_widths \(line 8\): names group 'nope'"):
        run_recipe(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


CORE = [p for d in ("merge", "stitch") for p in (ROOT / d).rglob("*.py")]
# recipe parsing that still lives beside the core: the tokenizer section and the method parameter checks
RECIPE_PARSERS = {"merge/errors.py", "merge/tokenizer.py", "merge/methods/registry.py", "merge/methods/linear.py",
                  "merge/methods/nearswap.py", "merge/methods/task_arithmetic.py"}


# the alignment pipeline reads the recipe's `alignment:` section as a whole (its engine registry replaces it)
SECTION_READERS = {"merge/align/pipeline.py"}


@pytest.mark.parametrize("path", [p for p in CORE if str(p.relative_to(ROOT)) not in RECIPE_PARSERS | SECTION_READERS],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_core_does_not_raise_recipe_errors_or_cite_recipe_keys(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert "import RecipeError" not in text and ", RecipeError" not in text
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Raise) and node.exc is not None:
            raised = ast.get_source_segment(text, node) or ""
            assert "RecipeError" not in raised
            assert not re.search(r"`architecture:`|in the recipe|\balignment\.\w|\bstitch\.\w", raised), raised


def test_stitch_schema_lives_in_recipes() -> None:
    from suture.recipes import stitch_section
    from suture.stitch import pipeline

    assert not hasattr(pipeline, "StitchSection") and not hasattr(pipeline, "validate_stitch_section")
    assert "pydantic" not in (ROOT / "stitch" / "pipeline.py").read_text(encoding="utf-8")
    with pytest.raises(RecipeError, match=r"stitch\.anchors\.count"):
        stitch_section.validate_stitch_section({"source": {"model": "a"}, "target": {"model": "b"}, "method": "ot",
                                                "anchors": {"count": 0}})
