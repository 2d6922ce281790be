"""Engines are plug-ins: a toy engine from the test package runs from a recipe (`suture run`) and gets a form."""

from __future__ import annotations

import inspect

import pytest
import torch
import yaml

from suture.merge import zoo
from suture.merge.align.engines import get_engine, list_engines, unregister_engine
from suture.merge.derive import derive_spec
from suture.merge.errors import AlignmentError, RecipeError
from suture.merge.spec import permute_state
from suture.merge.store import open_store
from suture.recipes.sections import parse_alignment
from tests import _toy_engine

WIDTHS = [64, 16, 10]


@pytest.fixture
def toy():
    engine = _toy_engine.register()
    yield engine
    unregister_engine(engine.name)


@pytest.fixture
def pair(tmp_path):
    """A model and the same model with every hidden group's units reversed (the same function)."""
    torch.manual_seed(0)
    a = zoo.save_module(zoo.mlp(tuple(WIDTHS)), tmp_path / "a", "suture.merge.zoo:mlp", {"widths": WIDTHS})
    store = open_store(a)
    spec, _ = derive_spec(store, input_shape=[2, 64])
    perms = {g.name: torch.arange(g.size).flip(0) for g in spec.active_groups()}
    module = zoo.mlp(tuple(WIDTHS))
    module.load_state_dict(permute_state(store.state_dict(), spec, perms))
    store.close()
    b = zoo.save_module(module, tmp_path / "b", "suture.merge.zoo:mlp", {"widths": WIDTHS})
    return a, b


def _recipe(tmp_path, a, b, **alignment) -> str:
    recipe = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1.0}},
                                                   {"model": str(b), "parameters": {"weight": 1.0}}],
              "alignment": {"engine": "flip", "input_shape": [2, 64], **alignment}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_toy_engine_runs_from_suture_run(toy, pair, tmp_path):
    from suture.recipes.cli import main

    a, b = pair
    assert main(["run", _recipe(tmp_path, a, b), str(tmp_path / "out")]) == 0
    merged, ref, raw_b = open_store(tmp_path / "out"), open_store(a), open_store(b)
    # flipped back onto A, B is A: the average is A itself, which averaging the raw tensors is not
    for name in ref.names():
        torch.testing.assert_close(merged.get(name), ref.get(name))
    assert any(not torch.allclose((ref.get(n) + raw_b.get(n)) / 2, ref.get(n)) for n in ref.names())
    report = yaml.safe_load((tmp_path / "out" / "report.json").read_text())
    assert report["alignment"]["engine"] == "flip"
    card = (tmp_path / "out" / "README.md").read_text()
    assert "`flip` (units reversed)" in card and "](https://example.org/toy)" in card
    # its own option reaches align(): an even number of flips leaves B as it was
    assert main(["run", _recipe(tmp_path, a, b, times=2), str(tmp_path / "out2")]) == 0
    name = next(n for n in ref.names() if n.endswith("0.weight"))
    assert not torch.allclose(open_store(tmp_path / "out2").get(name), ref.get(name))


def test_toy_engine_options_are_validated_like_built_in_ones(toy):
    assert parse_alignment({"engine": "flip", "times": 3}).times == 3
    with pytest.raises(RecipeError, match=r"alignment\.times: Input should be less than or equal to 3"):
        parse_alignment({"engine": "flip", "times": 5})
    with pytest.raises(RecipeError, match="do not apply to engine 'flip'"):
        parse_alignment({"engine": "flip", "solver": "emd"})


def test_unregistered_engine_is_refused():
    assert "flip" not in {e.name for e in list_engines()}
    with pytest.raises(RecipeError, match=r"alignment\.engine: expected one of .*got 'flip'"):
        parse_alignment({"engine": "flip"})
    with pytest.raises(AlignmentError, match="alignment engine 'flip'"):
        get_engine("flip")


def test_toy_engine_gets_a_form_from_its_options(toy):
    from suture.app import services
    from suture.app.forms import form_fields

    assert "flip" in services.runner_engines()
    row = next(e for e in services.engines() if e["name"] == "flip")
    assert row["title"] == "Flip (toy)" and row["outcome"] == "permuted" and not row["builds_model"]
    (times,) = services.engine_options("flip")
    assert times == {"name": "times", "label": "Flips", "kind": "int", "default": 1, "min": 0, "max": 3, "step": None,
                     "help": "How many times each group's units are reversed.", "choices": [], "depends": None, "bounds": "in [0, 3]"}
    # the builder is a pure function of the JSON schema
    schema = _toy_engine.FlipOptions.model_json_schema()
    assert [w.name for w in form_fields(schema)] == list(_toy_engine.FlipOptions.model_fields)


def test_form_builder_reads_widgets_limits_and_conditions():
    from suture.app.forms import form_fields

    schema = get_engine("ot").options.model_json_schema()
    fields = {w.name: w for w in form_fields(schema, ["solver", "reg", "target_widths", "blend", "normalize"])}
    assert fields["solver"].kind == "choice" and fields["solver"].choices == ["emd", "sinkhorn"]
    assert fields["reg"].kind == "float" and fields["reg"].min == 0 and fields["reg"].depends == ("solver", "sinkhorn")
    assert fields["target_widths"].kind == "yaml" and fields["blend"].max == 1 and fields["normalize"].kind == "bool"


@pytest.mark.parametrize(("engine", "function", "skip"), [
    ("weight_matching", "suture.merge.align.weight_matching:weight_matching", set()),
    ("ot", "suture.merge.align.ot:ot_align", set()),
    ("zipit", "suture.merge.align.zipit:zip_models", set()),
])
def test_options_defaults_agree_with_the_library(engine, function, skip):
    """The form shows Options' defaults; a recipe that leaves a setting out runs the library's default."""
    import importlib

    module, name = function.split(":")
    params = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    options = get_engine(engine).options
    own = [n for n in options.model_fields if n in params and n not in skip]
    assert own
    for n in own:
        assert options.model_fields[n].default == params[n].default, (engine, n)
