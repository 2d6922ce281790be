"""Parameter resolution (gradients, filters, precedence) and layer numbering, against hand-computed values."""

from __future__ import annotations

import pytest

from suture.merge.errors import RecipeError
from suture.merge.layers import (
    SliceLayout,
    find_layer,
    layer_index,
    num_layers,
    num_layers_from_config,
    num_layers_from_names,
    rename_layer,
    tensor_section,
)
from suture.recipes.params import (
    ParamResolver,
    check_setting,
    evaluate_setting,
    layer_position,
    resolve_param,
    unreachable_conditions,
)
from suture.recipes.schema import ModelRef, load_recipe


def load(text: str):
    return load_recipe(text)


# ---- single values ----------------------------------------------------------------------------------


def test_scalars_pass_through() -> None:
    for v in (0.3, 2, True, "chatml"):
        assert resolve_param(v, "model.layers.3.mlp.up_proj.weight", 3, 8) == v


def test_layer_position() -> None:
    assert layer_position(0, 40) == 0.0
    assert layer_position(39, 40) == 1.0
    assert layer_position(13, 40) == pytest.approx(1 / 3)
    assert layer_position(0, 1) == 1.0  # a one-layer span sits at the end, as in mergekit
    with pytest.raises(ValueError):
        layer_position(5, 5)
    with pytest.raises(ValueError):
        layer_position(0, None)


def test_gradient_interpolates_piecewise_linearly() -> None:
    grad = [0, 0.5, 0.3, 0.7, 1]  # 5 values -> 4 segments, whatever the layer count
    name = "model.layers.{}.self_attn.q_proj.weight"
    # 40 layers: layer 10 sits at t = 10/39, i.e. 10/39 * 4 = 1.0256 segments in: 0.5 + 0.0256 * (0.3 - 0.5)
    assert resolve_param(grad, name.format(10), 10, 40) == pytest.approx(0.5 - 0.2 * (40 / 39 - 1))
    assert resolve_param(grad, name.format(0), 0, 40) == 0
    assert resolve_param(grad, name.format(39), 39, 40) == 1
    # 9 layers: layer i sits exactly on knot i/2
    assert resolve_param(grad, name.format(4), 4, 9) == pytest.approx(0.3)
    assert resolve_param(grad, name.format(3), 3, 9) == pytest.approx(0.4)  # halfway between 0.5 and 0.3
    assert resolve_param(grad, name.format(7), 7, 9) == pytest.approx(0.85)  # halfway between 0.7 and 1
    # three values over five layers (mergekit's ties example): t = 0, .25, .5, .75, 1
    density = [0.8, 0.3, 0.1]
    got = [resolve_param(density, name.format(i), i, 5) for i in range(5)]
    assert got == pytest.approx([0.8, 0.55, 0.3, 0.2, 0.1])
    # a one-value list is a constant; a two-value list is a straight line
    assert resolve_param([0.7], name.format(2), 2, 5) == 0.7
    assert resolve_param([1.0, 0.0], name.format(1), 1, 5) == pytest.approx(0.75)


def test_non_numeric_gradients_step() -> None:
    grad = ["a", "b", "c"]
    assert [evaluate_setting(grad, "x", t) for t in (0.0, 0.49, 0.5, 0.99, 1.0)] == ["a", "a", "b", "b", "c"]
    assert evaluate_setting([True, False], "x", 0.99) is True


def test_edge_tensors_sit_at_zero() -> None:
    # mergekit 0.1.5 reads pre- and post-block weights alike through ConfigReader(t=0)
    grad = [0.1, 0.9]
    assert resolve_param(grad, "model.embed_tokens.weight") == pytest.approx(0.1)
    assert resolve_param(grad, "transformer.wte.weight") == pytest.approx(0.1)
    assert resolve_param(grad, "lm_head.weight") == pytest.approx(0.1)
    assert resolve_param(grad, "model.norm.weight") == pytest.approx(0.1)
    assert resolve_param(grad, "model.norm.weight", t=0.25) == pytest.approx(0.3)
    # a layer name without layer_index: taken from the name, which then needs num_layers
    assert resolve_param(grad, "model.layers.2.mlp.weight", num_layers=5) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        resolve_param(grad, "model.layers.2.mlp.weight")
    with pytest.raises(ValueError):
        resolve_param(grad, "x", t=1.5)


def test_conditions_first_match_wins_with_nested_gradients() -> None:
    t_param = [
        {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
        {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
        {"value": 0.5},
    ]
    attn, mlp, norm = ("model.layers.{}.self_attn.o_proj.weight", "model.layers.{}.mlp.down_proj.weight",
                       "model.layers.{}.input_layernorm.weight")
    # 9 layers, layer 1: t = 1/8 -> half way through the first segment
    assert resolve_param(t_param, attn.format(1), 1, 9) == pytest.approx(0.25)
    assert resolve_param(t_param, mlp.format(1), 1, 9) == pytest.approx(0.75)
    assert resolve_param(t_param, norm.format(1), 1, 9) == 0.5
    assert resolve_param(t_param, "model.embed_tokens.weight") == 0.5
    # order decides, not specificity: a filterless condition first swallows everything
    swallowing = [{"value": 0.9}, {"filter": "mlp", "value": 0.1}]
    assert resolve_param(swallowing, mlp.format(0), 0, 4) == 0.9
    assert unreachable_conditions(swallowing) == [1]
    assert resolve_param([{"filter": "*", "value": 2}, {"filter": "mlp", "value": 1}], mlp.format(0), 0, 4) == 2
    # no match and no fallback: unset
    assert resolve_param([{"filter": "mlp", "value": 1}], attn.format(0), 0, 4) is None
    # a lone condition mapping behaves like a one-item list
    assert resolve_param({"filter": "mlp", "value": [0, 1]}, mlp.format(3), 3, 4) == 1


def test_check_setting_paths() -> None:
    assert check_setting(0.5) == [] and check_setting([0, 1]) == [] and check_setting([{"filter": "a", "value": [1, 2]}]) == []
    assert check_setting([1, "a"])[0][0] == (1,)
    assert check_setting([{"filter": "a", "value": 1}, 3])[0][0] == (1,)
    assert check_setting([{"filter": 3, "value": 1}])[0][0] == (0, "filter")
    assert check_setting([{"filter": "a"}])[0][0] == (0,)
    assert check_setting([{"filter": "a", "value": [{"value": 1}]}])[0][0] == (0, "value")
    assert check_setting([])[0][0] == ()
    assert check_setting(None)[0][0] == ()


# ---- precedence through the resolver ----------------------------------------------------------------

MODELS = """\
models:
  - model: org/a
    parameters:
      weight: [1.0, 0.0]
      density:
        - filter: mlp
          value: 0.2
  - model: org/b
    parameters:
      weight: 0.5
  - model: org/c
merge_method: ties
base_model: org/base
parameters:
  weight: 0.25
  density: 0.9
  normalize: true
  lambda:
    - filter: self_attn
      value: 2.0
"""


def test_models_precedence_model_over_global() -> None:
    r = ParamResolver(load(MODELS), num_layers=5)
    mlp = "model.layers.1.mlp.up_proj.weight"
    attn = "model.layers.1.self_attn.q_proj.weight"
    # model level wins; its gradient is read at t = 1/4
    assert r.get("weight", mlp, 1, model="org/a") == pytest.approx(0.75)
    assert r.get("weight", mlp, 1, model=ModelRef.parse("org/b")) == 0.5
    # org/c sets nothing: global
    assert r.get("weight", mlp, 1, model="org/c") == 0.25
    # a model-level condition that does not match falls through to the global value
    assert r.get("density", mlp, 1, model="org/a") == 0.2
    assert r.get("density", attn, 1, model="org/a") == 0.9
    assert r.lookup("density", attn, 1, model="org/a") == (0.9, "parameters.density")
    assert r.lookup("density", mlp, 1, model="org/a") == (0.2, "models[0].parameters.density")
    # the base model has no entry of its own: only global values reach it
    assert r.sources() == [ModelRef.parse(x) for x in ("org/a", "org/b", "org/c", "org/base")]
    base = {k: r.get(k, mlp, 1, model="org/base") for k in ("weight", "density", "normalize")}
    assert base == {"weight": 0.25, "density": 0.9, "normalize": True}
    assert {k: r.get(k, mlp, 1, source_index=3) for k in base} == base
    # method-wide parameters skip the model level
    assert {k: r.get(k, attn, 1) for k in ("weight", "density", "normalize", "lambda")} == {
        "weight": 0.25, "density": 0.9, "normalize": True, "lambda": 2.0,
    }
    assert r.get("lambda", mlp, 1) is None and r.get("epsilon", mlp, 1, default=0.1) == 0.1
    assert r.get("weight", "model.embed_tokens.weight", model="org/a") == 1.0
    assert r.get("weight", "lm_head.weight", model="org/a") == 1.0  # t = 0 after the blocks too, as in mergekit


def test_required_parameter_missing_names_the_places() -> None:
    r = ParamResolver(load(MODELS), num_layers=5)
    with pytest.raises(RecipeError) as info:
        r.get("lambda", "model.layers.0.mlp.up_proj.weight", 0, model="org/c", required=True)
    msg = str(info.value)
    assert "'lambda'" in msg and "org/c" in msg and "models[2].parameters (line 11)" in msg
    with pytest.raises(RecipeError):
        r.get("t", "model.layers.0.mlp.weight", 0, model="org/a", required=True)
    with pytest.raises(ValueError):
        r.get("weight", "x", model="org/a", source_index=1)  # source 1 is org/b


SLICES = """\
slices:
  - sources:
      - model: org/a
        layer_range: [0, 4]
        parameters:
          t: 0.9
      - model: org/b
        layer_range: [2, 6]
    parameters:
      t:
        - filter: mlp
          value: [0.0, 0.3]
  - sources:
      - model: org/a
        layer_range: [4, 7]
      - model: org/b
        layer_range: [6, 9]
merge_method: slerp
base_model: org/a
parameters:
  t: [0.0, 1.0]
"""


def test_slices_precedence_source_over_slice_over_global() -> None:
    recipe = load(SLICES)
    r = ParamResolver(recipe)
    assert r.layout.num_layers == 7
    # output layer 1 is slice 0, offset 1 of 4: t = 1/3
    assert r.locate("model.layers.1.mlp.up_proj.weight", 1) == (0, pytest.approx(1 / 3))
    assert r.get("t", "model.layers.1.mlp.up_proj.weight", 1, model="org/a") == 0.9  # source level
    assert r.get("t", "model.layers.1.mlp.up_proj.weight", 1, model="org/b") == pytest.approx(0.1)  # slice level
    assert r.get("t", "model.layers.1.mlp.up_proj.weight", 1) == pytest.approx(0.1)  # global lookup sees the slice
    assert r.get("t", "model.layers.1.self_attn.q_proj.weight", 1) == pytest.approx(1 / 3)  # slice filter misses
    # output layer 5 is slice 1, offset 1 of 3: t = 1/2 on the global gradient
    assert r.locate("model.layers.5.mlp.up_proj.weight", 5) == (1, 0.5)
    assert r.get("t", "model.layers.5.mlp.up_proj.weight", 5, model="org/a") == pytest.approx(0.5)
    assert r.sources(1) == [ModelRef.parse("org/a"), ModelRef.parse("org/b")]
    # source_index picks one source even when models repeat
    assert r.get("t", "model.layers.0.mlp.w", 0, source_index=0) == 0.9
    assert r.get("t", "model.layers.0.mlp.w", 0, source_index=1) == 0.0
    # embeddings use the first slice, heads the last; both sit at t = 0 (mergekit's ConfigReader(t=0))
    assert r.locate("model.embed_tokens.weight") == (0, 0.0)
    assert r.locate("lm_head.weight") == (1, 0.0)
    assert r.get("t", "model.embed_tokens.weight", model="org/b") == 0.0
    assert r.get("t", "lm_head.weight", model="org/b") == 0.0
    assert r.lookup("t", "model.embed_tokens.weight", model="org/a") == (0.9, "slices[0].sources[0].parameters.t")
    # a layer tensor of a slices recipe needs its output layer number
    with pytest.raises(ValueError):
        r.locate("model.layers.5.mlp.up_proj.weight")
    with pytest.raises(ValueError):
        r.locate("model.layers.5.mlp.up_proj.weight", 5, slice_index=0)


def test_one_layer_slice_sits_at_one() -> None:
    recipe = load(
        "slices:\n  - sources:\n      - model: a\n        layer_range: [3, 4]\n"
        "merge_method: passthrough\nparameters:\n  scale: [0.0, 2.0]\n"
    )
    assert ParamResolver(recipe).get("scale", "model.layers.0.mlp.w", 0) == 2.0


# ---- layer numbering ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, index",
    [
        ("model.layers.12.self_attn.q_proj.weight", 12),
        ("transformer.h.3.attn.c_attn.weight", 3),
        ("bert.encoder.layer.7.attention.self.query.weight", 7),
        ("encoder.layer.7.output.dense.bias", 7),
        ("layers.5.feed_forward.w1.weight", 5),
        ("blocks.11.mlp.fc1.weight", 11),
        ("encoder.block.2.layer.1.DenseReluDense.wi.weight", 2),
        ("model.layers.4.mlp.experts.17.w1.weight", 4),
        ("gpt_neox.layers.0.attention.dense.weight", 0),
        ("features.3.weight", 3),  # generic: first all-digit component
        ("model.embed_tokens.weight", None),
        ("lm_head.weight", None),
        ("layer1.0.conv1.weight", 0),
    ],
)
def test_layer_index(name: str, index: int | None) -> None:
    assert layer_index(name) == index


def test_layer_index_family_only_and_rename() -> None:
    assert layer_index("features.3.weight", generic=False) is None
    assert rename_layer("model.layers.12.mlp.up_proj.weight", 40) == "model.layers.40.mlp.up_proj.weight"
    assert rename_layer("model.layers.4.mlp.experts.17.w1", 9) == "model.layers.9.mlp.experts.17.w1"
    m = find_layer("transformer.h.10.ln_1.weight")
    assert (m.index, m.start, m.end) == (10, 14, 16)
    with pytest.raises(ValueError):
        rename_layer("lm_head.weight", 1)


def test_tensor_section() -> None:
    assert tensor_section("model.embed_tokens.weight") == "pre"
    assert tensor_section("transformer.wpe.weight") == "pre"
    assert tensor_section("bert.embeddings.word_embeddings.weight") == "pre"
    assert tensor_section("model.layers.0.mlp.up_proj.weight") == "layer"
    assert tensor_section("model.norm.weight") == "post"
    assert tensor_section("lm_head.weight") == "post"
    assert tensor_section("transformer.ln_f.weight") == "post"


def test_num_layers() -> None:
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(6)] + ["model.embed_tokens.weight", "lm_head.weight"]
    assert num_layers_from_names(names) == 6
    assert num_layers_from_config({"num_hidden_layers": 32}) == 32
    assert num_layers_from_config({"n_layer": 12, "n_embd": 768}) == 12
    assert num_layers_from_config({"text_config": {"num_hidden_layers": 24}}) == 24
    assert num_layers_from_config({"hidden_size": 8}) is None
    assert num_layers(names, {"num_hidden_layers": 6}) == 6
    assert num_layers(names, None) == 6
    assert num_layers(["features.0.weight", "features.2.weight"]) == 3
    assert num_layers(["lm_head.weight"]) is None


def test_slice_layout_for_frankenmerge() -> None:
    # mergekit's 44-layer example: layers 0-23 of one model, then 20-39 of another
    layout = SliceLayout([(0, 24), (20, 40)])
    assert layout.num_layers == len(layout) == 44
    slots = list(layout)
    assert [s.out_index for s in slots] == list(range(44))
    assert slots[23].source_index == 23 and slots[23].slice_index == 0
    assert (slots[24].slice_index, slots[24].offset, slots[24].source_index) == (1, 0, 20)
    assert layout.slot(30).source_index == 26
    assert layout.output_index(1, 26) == 30
    assert layout.output_name("model.layers.26.mlp.down_proj.weight", 1) == "model.layers.30.mlp.down_proj.weight"
    assert layout.source_name("model.layers.30.mlp.down_proj.weight") == (1, "model.layers.26.mlp.down_proj.weight")
    assert layout.source_name("model.layers.5.mlp.down_proj.weight") == (0, "model.layers.5.mlp.down_proj.weight")
    with pytest.raises(IndexError):
        layout.output_index(1, 10)
    with pytest.raises(IndexError):
        layout.slot(44)
    with pytest.raises(ValueError):
        SliceLayout([(4, 4)])
