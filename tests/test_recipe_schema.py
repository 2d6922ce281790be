"""Recipe schema: mergekit recipes load unchanged; bad recipes fail with key path and YAML line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from suture.merge.errors import RecipeError
from suture.recipes.schema import (
    ModelRef,
    Recipe,
    load_recipe,
    looks_like_hub_id,
    parse_recipe,
)
from suture.recipes.yaml_lines import format_path, load_yaml_with_lines, nearest_line

def load(text: str) -> Recipe:
    return load_recipe(text)


def fails(text: str) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load(text)
    return info.value


# ---- recipes as mergekit's documentation and examples write them ------------------------------------

LINEAR = """\
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      weight: 1.0
  - model: WizardLM/WizardLM-13B-V1.2
    parameters:
      weight: 0.3
  - model: garage-bAInd/Platypus2-13B
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
"""

GRADIENT_SLERP = """\
slices:
  - sources:
      - model: psmathur/orca_mini_v3_13b
        layer_range: [0, 40]
      - model: garage-bAInd/Platypus2-13B
        layer_range: [0, 40]
merge_method: slerp
base_model: psmathur/orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
"""

TIES = """\
models:
  - model: mistralai/Mistral-7B-Instruct-v0.2
    parameters:
      density: 0.5
      weight: 0.5
  - model: BioMistral/BioMistral-7B
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  normalize: false
  int8_mask: true
dtype: float16
"""

DARE_TIES = """\
models:
  - model: mistralai/Mistral-7B-v0.1
    # no parameters necessary for base model
  - model: samir-fama/SamirGPT-v1
    parameters:
      density: 0.53
      weight: 0.4
  - model: abacusai/Slerp-CM-mist-dpo
    parameters:
      density: 0.53
      weight: 0.3
  - model: EmbeddedLLM/Mistral-7B-Merge-14-v0.2
    parameters:
      density: 0.53
      weight: 0.3
merge_method: dare_ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  int8_mask: true
dtype: bfloat16
"""

FRANKENMERGE = """\
slices:
  - sources:
    - model: psmathur/orca_mini_v3_13b
      layer_range: [0, 24]
  - sources:
    - model: garage-bAInd/Platypus2-13B
      layer_range: [20, 40]
merge_method: passthrough
dtype: float16
"""

TOKENIZER_UNION = """\
models:
  - model: meta-llama/Meta-Llama-3-8B-Instruct
    parameters:
      weight: 0.5
  - model: teknium/OpenHermes-2.5-Mistral-7B@main
    parameters:
      weight: 0.5
merge_method: linear
base_model: meta-llama/Meta-Llama-3-8B-Instruct
tokenizer:
  source: union
  tokens:
    <|im_start|>:
      source: "teknium/OpenHermes-2.5-Mistral-7B@main"
    <|eot_id|>:
      source: meta-llama/Meta-Llama-3-8B-Instruct
      force: true
    <|renamed_token|>:
      source:
        kind: "model_token"
        model: "meta-llama/Meta-Llama-3-8B-Instruct"
        token_id: 1234
    <|blank|>:
      source: {kind: zero}
  pad_to_multiple_of: 64
chat_template: "chatml"
"""

LEGACY_TOKENIZER = """\
models:
  - model: ./models/a
  - model: ./models/b+./adapters/lora-b
merge_method: linear
parameters:
  weight: 0.5
tokenizer_source: union
"""

ALL = [LINEAR, GRADIENT_SLERP, TIES, DARE_TIES, FRANKENMERGE, TOKENIZER_UNION, LEGACY_TOKENIZER]


@pytest.mark.parametrize("text", ALL, ids=["linear", "slerp", "ties", "dare_ties", "passthrough", "tok_union", "tok_legacy"])
def test_mergekit_recipes_load_and_round_trip(text: str, tmp_path: Path) -> None:
    recipe = load(text)
    # dict and YAML round trips give the same recipe back
    assert parse_recipe(recipe.to_dict()) == recipe
    out = tmp_path / "suture_recipe.yml"
    out.write_text(recipe.to_yaml())
    again = load(out)
    assert again == recipe
    assert again.source == str(out) and again.base_dir == tmp_path and recipe.base_dir is None
    assert again.to_yaml() == recipe.to_yaml()


def test_linear_fields() -> None:
    r = load(LINEAR)
    assert r.mode == "models" and r.merge_method == "linear" and r.dtype == "float16"
    assert [str(m.model) for m in r.models] == [
        "psmathur/orca_mini_v3_13b", "WizardLM/WizardLM-13B-V1.2", "garage-bAInd/Platypus2-13B",
    ]
    assert [m.parameters["weight"] for m in r.models] == [1.0, 0.3, 0.5]
    assert r.base_model is None and r.slices is None


def test_slerp_fields() -> None:
    r = load(GRADIENT_SLERP)
    assert r.mode == "slices"
    assert [s.layer_range for s in r.slices[0].sources] == [(0, 40), (0, 40)]
    assert r.parameters["t"][0] == {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}
    assert r.parameters["t"][2] == {"value": 0.5}
    assert r.base_model == ModelRef.parse("psmathur/orca_mini_v3_13b")
    assert r.referenced_models() == [ModelRef.parse("psmathur/orca_mini_v3_13b"), ModelRef.parse("garage-bAInd/Platypus2-13B")]


def test_tokenizer_fields() -> None:
    r = load(TOKENIZER_UNION)
    tok = r.tokenizer
    assert tok.source == "union" and tok.pad_to_multiple_of == 64
    start = tok.tokens["<|im_start|>"].source
    assert isinstance(start, ModelRef) and start.path == "teknium/OpenHermes-2.5-Mistral-7B" and start.revision == "main"
    assert tok.tokens["<|eot_id|>"].force is True
    renamed = tok.tokens["<|renamed_token|>"].source
    assert renamed.kind == "model_token" and renamed.token_id == 1234 and renamed.model.path == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert tok.tokens["<|blank|>"].source.kind == "zero"
    assert r.chat_template == "chatml"
    legacy = load(LEGACY_TOKENIZER)
    assert legacy.tokenizer_source == "union"
    assert legacy.models[1].model.lora == ModelRef(path="./adapters/lora-b")


def test_null_parameters_and_comments_are_accepted() -> None:
    r = load("models:\n  - model: a/b # best\n    parameters:\n      weight: 1\nmerge_method: linear\nparameters:\n")
    assert r.parameters is None and r.models[0].parameters == {"weight": 1}


def test_suture_sections_slot_in() -> None:
    text = LINEAR + """\
name: my-merge
architecture: LlamaForCausalLM
allow_pickle: true
strict: true
out_shard_size: 500MB
seed: 7
alignment: {engine: weight_matching, iterations: 30}
evaluate: {data: "sklearn:digits"}
stitch: {layer: 3}
publish: {repo_id: me/my-merge, private: true}
"""
    r = load(text)
    assert r.name == "my-merge" and r.allow_pickle is True and r.strict is True and r.seed == 7
    assert r.out_shard_size == 500 * 10**6
    assert r.alignment == {"engine": "weight_matching", "iterations": 30}
    assert r.publish["repo_id"] == "me/my-merge" and r.stitch == {"layer": 3}
    assert load(r.to_yaml()) == r
    # defaults and model_copy updates show up in to_dict only when set
    plain = load(LINEAR)
    assert "seed" not in plain.to_dict() and plain.allow_pickle is False and plain.strict is False
    assert plain.model_copy(update={"seed": 3}).to_dict()["seed"] == 3


def test_dtype_accepts_torch_prefix() -> None:
    assert load(LINEAR.replace("dtype: float16", "dtype: torch.bfloat16\nout_dtype: float32")).dtype == "bfloat16"


# ---- model references ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, path, revision, lora, hub",
    [
        ("mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-v0.1", None, None, True),
        ("org/name@v1.0", "org/name", "v1.0", None, True),
        ("gpt2", "gpt2", None, None, True),
        ("./models/a", "./models/a", None, None, False),
        ("/abs/path/model", "/abs/path/model", None, None, False),
        ("~/models/m", "~/models/m", None, None, False),
        ("out/a/b", "out/a/b", None, None, False),
        ("model.safetensors", "model.safetensors", None, None, False),
        ("C:\\models\\m", "C:\\models\\m", None, None, False),
        ("org/base+org/adapter@abc123", "org/base", None, "org/adapter", True),
        ("bad--name/x", "bad--name/x", None, None, False),
        ("-lead/x", "-lead/x", None, None, False),
    ],
)
def test_model_ref_parsing(text: str, path: str, revision: str | None, lora: str | None, hub: bool) -> None:
    ref = ModelRef.parse(text)
    assert ref.path == path and ref.revision == revision
    assert (ref.lora.path if ref.lora else None) == lora
    assert ref.is_hub_id is hub and looks_like_hub_id(path) is hub
    assert ref.repo_id == (path if hub else None)
    assert ModelRef.parse(str(ref)) == ref
    if lora:
        assert ref.lora.revision == "abc123"


@pytest.mark.parametrize("text", ["a@b@c", "a+b+c", "@rev", "org/name@", ""])
def test_model_ref_rejects(text: str) -> None:
    with pytest.raises(RecipeError):
        ModelRef.parse(text)


def test_model_ref_long_form_and_hash() -> None:
    long = {"model": {"path": "org/m", "revision": "r1"}, "lora": "org/l", "override_architecture": "MistralForCausalLM"}
    r = load(f"merge_method: linear\nmodels:\n  - model: {long}\n")
    ref = r.models[0].model
    assert (ref.path, ref.revision, ref.lora.path, ref.override_architecture) == ("org/m", "r1", "org/l", "MistralForCausalLM")
    assert load(r.to_yaml()) == r  # serialized in mergekit's long form since it carries an architecture
    assert len({ModelRef.parse("a/b"), ModelRef.parse("a/b"), ModelRef.parse("a/b@x")}) == 2


def test_find_local(tmp_path: Path) -> None:
    (tmp_path / "org" / "name").mkdir(parents=True)
    ref = ModelRef.parse("org/name")
    assert ref.is_hub_id  # syntactically a Hub id ...
    assert ref.find_local(tmp_path) == tmp_path / "org" / "name"  # ... but present on disk, so local wins
    assert ModelRef.parse("org/other").find_local(tmp_path) is None
    assert ModelRef.parse(str(tmp_path / "org")).find_local() == tmp_path / "org"


# ---- bad recipes: key path and line in the message ----------------------------------------------------


def _has(err: RecipeError, path: str, line: int) -> bool:
    text = str(err)
    return any(path in row and re.search(rf"\bline {line}\b", row) for row in text.splitlines())


def test_bad_parameter_value_names_path_and_line() -> None:
    text = """\
models:
  - model: a/b
    parameters:
      weight: 1.0
  - model: c/d
    parameters:
      weight: {filtr: mlp, value: 0.5}
merge_method: linear
"""
    err = fails(text)
    assert _has(err, "models[1].parameters.weight.filtr", 7), str(err)
    assert "unknown key 'filtr'" in str(err)


def test_wrong_types_are_reported_with_lines() -> None:
    text = """\
models:
  - model: a/b
    parameters:
      weight: [0.1, "x"]
  - model: 42
merge_method: linear
dtype: fp16
seed: "seven"
"""
    err = fails(text)
    msg = str(err)
    assert "4 problems" in msg, msg
    assert _has(err, "models[0].parameters.weight[1]", 4)
    assert _has(err, "models[1].model", 5) and "got a number" in msg
    assert _has(err, "dtype", 7) and "did you mean 'float16'" in msg
    assert _has(err, "seed", 8)
    assert [i.line for i in err.issues] == [4, 5, 7, 8]


def test_unknown_keys_suggest_the_right_one() -> None:
    err = fails("models:\n  - model: a/b\n    paramters: {weight: 1}\nmerge_method: linear\nbase_modle: a/b\n")
    assert _has(err, "models[0].paramters", 3) and "did you mean 'parameters'" in str(err)
    assert _has(err, "base_modle", 5) and "did you mean 'base_model'" in str(err)


def test_pattern_is_not_a_filter() -> None:
    # an old mergekit example wrote `pattern:`, which mergekit silently ignores (every condition then matches)
    err = fails(GRADIENT_SLERP.replace("filter: self_attn", "pattern: self_attn"))
    assert _has(err, "parameters.t[0].pattern", 11) and "'filter'" in str(err)


def test_models_and_slices_both_or_neither() -> None:
    both = fails(LINEAR + "slices:\n  - sources:\n      - model: a/b\n        layer_range: [0, 2]\n")
    assert _has(both, "slices", 13) and "not both" in str(both) and "line 1" in str(both)
    neither = fails("merge_method: linear\ndtype: float16\n")
    assert "needs `models`" in str(neither) and "line 1" in str(neither)
    empty = fails("merge_method: linear\nmodels: []\n")
    assert _has(empty, "models", 2) and "empty" in str(empty)


def test_slerp_without_base_model() -> None:
    text = GRADIENT_SLERP.replace("base_model: psmathur/orca_mini_v3_13b\n", "")
    err = fails(text)
    assert _has(err, "base_model", 7) and "'slerp' needs a base_model" in str(err)
    # a per-slice base_model is enough
    per_slice = text.replace("  - sources:\n", "  - base_model: psmathur/orca_mini_v3_13b\n    sources:\n")
    assert load(per_slice).slices[0].base_model.path == "psmathur/orca_mini_v3_13b"


def test_slerp_needs_exactly_two_models() -> None:
    text = "models:\n  - model: a/x\n  - model: a/y\n  - model: a/z\nmerge_method: slerp\nbase_model: a/x\nparameters: {t: 0.5}\n"
    err = fails(text)
    assert _has(err, "models", 1) and "exactly two" in str(err)
    assert load(text.replace("  - model: a/z\n", "")).merge_method == "slerp"
    # base not listed among the models: mergekit adds it, so one other model is fine
    assert load("models:\n  - model: a/y\nmerge_method: slerp\nbase_model: a/x\nparameters: {t: 0.5}\n").base_model.path == "a/x"


def test_passthrough_takes_one_source_per_slice() -> None:
    text = FRANKENMERGE.replace(
        "      layer_range: [0, 24]\n", "      layer_range: [0, 24]\n    - model: a/b\n      layer_range: [0, 24]\n"
    )
    err = fails(text)
    assert _has(err, "slices[0].sources", 2) and "exactly one source" in str(err)


def test_layer_range_checks() -> None:
    err = fails(FRANKENMERGE.replace("[20, 40]", "[40, 20]"))
    assert _has(err, "slices[1].sources[0].layer_range", 7) and "start must be smaller" in str(err)
    err = fails(FRANKENMERGE.replace("[20, 40]", "[20, 40, 60]"))
    assert _has(err, "slices[1].sources[0].layer_range", 7)
    err = fails(FRANKENMERGE.replace("[0, 24]", "[0, x]"))
    assert _has(err, "slices[0].sources[0].layer_range[1]", 4)
    err = fails(GRADIENT_SLERP.replace("layer_range: [0, 40]\nmerge", "layer_range: [0, 32]\nmerge"))
    assert _has(err, "slices[0].sources[1].layer_range", 6) and "same number of layers" in str(err)


def test_unknown_merge_method() -> None:
    err = fails(LINEAR.replace("merge_method: linear", "merge_method: liner"))
    assert _has(err, "merge_method", 11) and "did you mean 'linear'" in str(err)
    # the registry's names pass, and the error lists them
    assert load(LINEAR).merge_method == "linear"
    assert "known methods: adamerging, arcee_fusion, atlas, breadcrumbs" in str(err)


def test_missing_merge_method() -> None:
    err = fails(LINEAR.replace("merge_method: linear\n", ""))
    assert "merge_method: required key is missing" in str(err)


def test_tokenizer_conflicts() -> None:
    err = fails(TOKENIZER_UNION + "tokenizer_source: base\n")
    assert _has(err, "tokenizer", 10) and "not both" in str(err) and "line 27" in str(err)
    err = fails(LEGACY_TOKENIZER.replace("tokenizer_source: union", "tokenizer_source: base"))
    assert _has(err, "tokenizer_source", 7) and "no base_model" in str(err)
    err = fails(TOKENIZER_UNION.replace("token_id: 1234", "token_id: 1234\n        token: x"))
    assert _has(err, 'tokenizer.tokens["<|renamed_token|>"].source', 19) and "exactly one of token" in str(err)
    err = fails(TOKENIZER_UNION.replace("pad_to_multiple_of: 64", "pad_to_multiple_of: 0"))
    assert _has(err, "tokenizer.pad_to_multiple_of", 25)


def test_modules_are_refused_clearly() -> None:
    err = fails(LINEAR + "modules: {}\n")
    assert _has(err, "modules", 13) and "not supported" in str(err)


def test_duplicate_models_and_duplicate_keys() -> None:
    err = fails("models:\n  - model: a/b\n  - model: a/b\nmerge_method: linear\n")
    assert _has(err, "models[1].model", 3) and "twice" in str(err)
    with pytest.raises(RecipeError, match=r"line 3: key 'merge_method' appears twice .*first on line 1"):
        load("merge_method: linear\nmodels: [{model: a}]\nmerge_method: ties\n")


def test_yaml_problems() -> None:
    with pytest.raises(RecipeError, match=r"line 3, column \d+: YAML syntax error"):
        load("models:\n  - model: a\n merge_method: [linear\n")
    with pytest.raises(RecipeError, match="several YAML documents"):
        load(LINEAR + "---\n" + LINEAR)
    with pytest.raises(RecipeError, match="unsupported YAML value"):
        load("merge_method: !!python/object/apply:os.system ['true']\nmodels: [{model: a}]\n")
    with pytest.raises(RecipeError, match="empty"):
        load("# nothing here\n")
    with pytest.raises(RecipeError, match="mapping of keys"):
        load("- just\n- a list\n")
    with pytest.raises(RecipeError, match="not found"):
        load("missing-recipe.yml")


def test_yaml_lines_and_anchors() -> None:
    text = "defaults: &d\n  weight: 0.5\nmodels:\n  - model: a\n    parameters:\n      <<: *d\n      density: 0.3\n"
    data, lines = load_yaml_with_lines(text)
    assert data["models"][0]["parameters"] == {"weight": 0.5, "density": 0.3}
    assert lines[("models", 0)] == 4 and lines[("models", 0, "parameters", "density")] == 7
    assert lines[("models", 0, "parameters", "weight")] == 2  # merged in from the anchor
    assert nearest_line(lines, ("models", 0, "parameters", "missing")) == 5
    assert format_path(("tokenizer", "tokens", "<|im_end|>", "source")) == 'tokenizer.tokens["<|im_end|>"].source'


def test_recipe_error_helper_points_at_lines() -> None:
    r = load(LINEAR)
    assert r.line_of("models[2].parameters.weight") == 10
    assert r.where(("models", 1, "model")) == "models[1].model (line 5)"
    err = r.error("models[1].model", "no such model on disk or on the Hub")
    assert str(err) == "<string> line 5: models[1].model: no such model on disk or on the Hub"


def test_equality_is_by_value() -> None:
    assert load(LINEAR) == parse_recipe(load(LINEAR).to_dict())
    assert load(LINEAR) != load(TIES)
    assert load(LINEAR) != load(LINEAR.replace("weight: 0.3", "weight: 0.4"))


def test_tokenizer_source_and_key_errors_are_single_and_clear() -> None:
    err = fails(LEGACY_TOKENIZER.replace("tokenizer_source: union", "tokenizer_source: x@y@z"))
    assert len(err.issues) == 1 and _has(err, "tokenizer_source", 7) and "more than one '@'" in str(err)
    assert load(LEGACY_TOKENIZER.replace("tokenizer_source: union", "tokenizer_source: model:org/tok")).tokenizer_source == ModelRef(path="org/tok")
    err = fails(LINEAR + "yes: 1\n")
    assert _has(err, "[True]", 13) and "not a string" in str(err)
    err = fails(LINEAR + "parameters: {1: 2}\n")
    assert _has(err, "parameters[1]", 13) and "must be a string" in str(err)


def test_warnings_for_unreachable_conditions_and_unknown_parameters(caplog, monkeypatch) -> None:
    import suture.recipes.schema as schema

    monkeypatch.setattr(schema, "_method_param_names", lambda method: {"weight", "normalize"})
    text = LINEAR.replace("      weight: 0.3\n", "      wieght: 0.3\n") + "parameters:\n  normalize: [{value: true}, {filter: mlp, value: false}]\n"
    with caplog.at_level("WARNING", logger="suture.recipes.schema"):
        load(text)
    msgs = [r.getMessage() for r in caplog.records]
    assert any("models[1].parameters.wieght (line 7)" in m and "did you mean 'weight'" in m for m in msgs), msgs
    assert any("parameters.normalize (line 14)" in m and "condition 1 can never match" in m for m in msgs), msgs


def test_parameter_ranges_come_from_the_registry() -> None:
    # density is a fraction: the framework refuses 1.5 (a gradient item too), naming the key and its line
    err = fails(TIES.replace("density: 0.5", "density: 1.5"))
    assert _has(err, "models[0].parameters.density", 4) and "must be in [0, 1], got 1.5" in str(err)
    err = fails(TIES.replace("[1, 0.7, 0.1]", "[1, 0.7, -0.1]"))
    assert _has(err, "models[1].parameters.density[2]", 8) and "got -0.1" in str(err)
    # model counts come from the registry too: model_stock needs two models besides the base
    one = "models:\n  - model: a/x\nmerge_method: model_stock\nbase_model: a/b\n"
    err = fails(one)
    assert _has(err, "models", 1) and "at least two models besides the base_model; got 1" in str(err)
    assert load(one.replace("  - model: a/x\n", "  - model: a/x\n  - model: a/y\n")).merge_method == "model_stock"
