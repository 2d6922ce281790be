"""Model cards: Hub front matter (base_model only for Hub ids, license agreement), papers, recipe, evaluation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard, constants

from suture.merge.card import (
    engine_papers,
    METHOD_PAPERS,
    build_model_card,
    common_license,
    method_paper,
    read_license,
    write_model_card,
)
from suture.merge.errors import InputError
from suture.merge.hub import is_hub_id, split_hub_ref
from tests.hub_server import validate_card_metadata

RECIPE = """merge_method: ties
base_model: org/base-model
models:
  - model: org/model-a@v1.0
    parameters: {weight: 0.6, density: 0.5}
  - model: ./local/model-b
parameters:
  normalize: true
dtype: bfloat16
"""


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Run in tmp_path with a private, empty Hugging Face cache (cards never use the network)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://huggingface.co")


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    end = text.index("\n---\n", 4)
    meta = yaml.safe_load(text[4:end])
    assert isinstance(meta, dict)
    return meta


def local_model(path: Path, license: str | None = None, extra: str = "") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.safetensors").write_bytes(b"")
    if license is not None:
        (path / "README.md").write_text(f"---\nlicense: {license}\n{extra}---\n# a model\n")
    return path


def test_is_hub_id_is_syntactic(tmp_path):
    (tmp_path / "models" / "mine").mkdir(parents=True)
    assert is_hub_id("meta-llama/Llama-3.2-1B")
    assert is_hub_id("org/model_name.v2@main")
    assert is_hub_id("org/model@refs/pr/3")
    assert is_hub_id("org/model@0123456789abcdef0123456789abcdef01234567")
    assert is_hub_id("hf://org/model")
    assert not is_hub_id("models/mine")  # exists locally
    assert not is_hub_id("./org/model")
    assert not is_hub_id("/abs/org/model")
    assert not is_hub_id("~/org/model")
    assert not is_hub_id("gpt2")  # no namespace
    assert not is_hub_id("a/b/c")
    assert not is_hub_id("org/model.safetensors")  # a missing local file, not a repo
    assert not is_hub_id("org--x/model")
    assert not is_hub_id("org/-model")
    assert not is_hub_id("org/model@")
    assert not is_hub_id("C:/models/x")
    assert not is_hub_id("")
    (tmp_path / "recipes" / "acme" / "thing").mkdir(parents=True)
    assert is_hub_id("acme/thing")
    assert not is_hub_id("acme/thing", base_dir=tmp_path / "recipes")  # relative to the recipe's folder
    assert split_hub_ref("org/model@dev") == ("org/model", "dev")
    assert split_hub_ref("hf://org/model") == ("org/model", None)


def test_front_matter_has_required_keys_and_only_hub_ids(tmp_path):
    local = local_model(tmp_path / "local" / "model-b")
    looks_like_hub = local_model(tmp_path / "acme" / "weights")  # "acme/weights" exists here: a local path
    inputs = ["org/model-a@v1.0", str(local), "acme/weights", "./missing/x.safetensors", "other/model_b", "org/model-a"]

    text = build_model_card(
        inputs=inputs,
        method="ties",
        engine="weight_matching",
        recipe_yaml=RECIPE,
        library_name="transformers",
        pipeline_tag="text-generation",
        license="apache-2.0",
    )

    meta = front_matter(text)
    assert meta["base_model"] == ["org/model-a", "other/model_b"]
    assert meta["base_model_relation"] == "merge"
    assert meta["tags"] == ["merge", "suture", "ties", "weight_matching"]
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0"
    # huggingface_hub reads the same metadata, and the Hub's validation rules accept it
    card = ModelCard(text)
    assert card.data.base_model == ["org/model-a", "other/model_b"]
    assert card.data.to_dict()["base_model_relation"] == "merge"
    assert validate_card_metadata(text) == []
    assert str(looks_like_hub) not in meta["base_model"]


def test_no_hub_inputs_means_no_base_model(tmp_path):
    a, b = local_model(tmp_path / "a"), local_model(tmp_path / "b")
    text = build_model_card(inputs=[str(a), str(b)], method="linear")
    meta = front_matter(text)
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert "license" not in meta and "library_name" not in meta and "pipeline_tag" not in meta
    assert meta["tags"] == ["merge", "suture", "linear"]
    assert validate_card_metadata(text) == []
    assert "none (tensors were combined by name" in text


def test_license_carried_over_only_when_all_inputs_agree(tmp_path):
    a = local_model(tmp_path / "a", "apache-2.0")
    b = local_model(tmp_path / "b", "apache-2.0")
    c = local_model(tmp_path / "c", "mit")
    d = local_model(tmp_path / "d")  # no README: unknown license

    assert read_license(a) == {"license": "apache-2.0"}
    assert read_license(a / "model.safetensors") == {"license": "apache-2.0"}
    assert read_license(d) is None
    assert common_license([a, b]) == {"license": "apache-2.0"}
    assert common_license([a, c]) is None
    assert common_license([a, d]) is None

    assert front_matter(build_model_card(inputs=[str(a), str(b)], method="linear"))["license"] == "apache-2.0"
    assert "license" not in front_matter(build_model_card(inputs=[str(a), str(c)], method="linear"))
    assert "license" not in front_matter(build_model_card(inputs=[str(a), str(d)], method="linear"))
    # an explicit license wins; an empty one drops the carried-over license
    assert front_matter(build_model_card(inputs=[str(a), str(c)], method="linear", license="other"))["license"] == "other"
    assert "license" not in front_matter(build_model_card(inputs=[str(a), str(b)], method="linear", license=""))


def test_license_from_config_and_custom_licenses(tmp_path):
    a = local_model(tmp_path / "a", "other", extra="license_name: llama3\nlicense_link: LICENSE\n")
    b = local_model(tmp_path / "b", "other", extra="license_name: llama3\nlicense_link: LICENSE\n")
    c = local_model(tmp_path / "c", "other", extra="license_name: gemma\n")
    meta = front_matter(build_model_card(inputs=[str(a), str(b)], method="slerp"))
    assert (meta["license"], meta["license_name"], meta["license_link"]) == ("other", "llama3", "LICENSE")
    assert "license" not in front_matter(build_model_card(inputs=[str(a), str(c)], method="slerp"))

    e = local_model(tmp_path / "e")
    (e / "config.json").write_text('{"license": "mit"}')
    assert read_license(e) == {"license": "mit"}
    broken = local_model(tmp_path / "broken")
    (broken / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    assert read_license(broken) is None  # malformed metadata: unknown, not an error


def test_license_of_hub_inputs_read_from_the_local_cache(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    for name, license in (("a", "cc-by-4.0"), ("b", "cc-by-4.0")):
        repo = tmp_path / "hf_home" / "hub" / f"models--org--{name}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "README.md").write_text(f"---\nlicense: {license}\n---\n")
    assert read_license("org/a") == {"license": "cc-by-4.0"}
    assert front_matter(build_model_card(inputs=["org/a", "org/b"], method="linear"))["license"] == "cc-by-4.0"
    # not cached: unknown, so no license is claimed
    assert "license" not in front_matter(build_model_card(inputs=["org/a", "org/not-cached"], method="linear"))


@pytest.mark.parametrize(
    ("engine", "links"),
    [
        ("weight_matching", ["https://arxiv.org/abs/2209.04836"]),
        ("activation_matching", ["https://arxiv.org/abs/2209.04836"]),
        ("ot", ["https://arxiv.org/abs/1910.05653", "https://arxiv.org/abs/2310.05719"]),
        ("zipit", ["https://arxiv.org/abs/2305.03053"]),
        ("stitching", ["https://arxiv.org/abs/2209.15430", "https://arxiv.org/abs/2311.00664"]),
    ],
)
def test_engine_papers_are_cited(engine, links):
    text = build_model_card(inputs=["org/a", "org/b"], method="linear", engine=engine)
    engine_line = next(line for line in text.splitlines() if line.startswith("- **Alignment engine:**"))
    assert f"`{engine}`" in engine_line
    for link in links:
        assert f"]({link})" in engine_line
    assert engine in front_matter(text)["tags"]


def test_method_papers_come_from_the_registry_or_the_table():
    assert method_paper("ties") == (
        "[TIES-Merging: Resolving Interference When Merging Models (Yadav et al., NeurIPS 2023)]"
        "(https://arxiv.org/abs/2306.01708)"
    )
    # fisher is in the fallback table only
    assert method_paper("fisher").endswith("(https://arxiv.org/abs/2111.09832)")
    assert method_paper("no_such_method") is None
    for name in METHOD_PAPERS:
        assert re.fullmatch(r"\[.+\]\(https://\S+\)", method_paper(name)), name
    try:
        from suture.merge.methods import list_methods
    except ImportError:
        return
    for name in list_methods():
        assert re.fullmatch(r"\[.+\]\(https?://\S+\)", method_paper(name) or ""), name
    from suture.merge.align.engines import list_engines

    engines = {e.name for e in list_engines()}
    assert {"weight_matching", "activation_matching", "ot", "zipit"} <= engines
    for name in engines:  # every registered engine cites its papers as links
        assert all(re.fullmatch(r"\[.+\]\(https://\S+\)", text) for text in engine_papers(name)) and engine_papers(name), name


def test_body_has_recipe_evaluation_plot_and_inputs(tmp_path):
    local = local_model(tmp_path / "local" / "model-b")
    evaluation = {"org/model-a": {"accuracy": 0.91234, "loss": 0.3}, "merged": {"accuracy": 0.95, "barrier": 0.0212}}
    text = build_model_card(
        inputs=["org/model-a@v1.0", str(local)],
        method="ties",
        engine="zipit",
        recipe_yaml=RECIPE,
        evaluation=evaluation,
        plot_path="plots/barrier.png",
        name="Zipped model",
    )
    body = text.split("\n---\n", 1)[1]
    assert body.lstrip().startswith("# Zipped model")
    assert "`ties`" in body and "(https://arxiv.org/abs/2306.01708)" in body
    # the recipe is shown verbatim in a yaml block that parses back to the same document
    block = re.search(r"```yaml\n(.*?)\n```", body, re.DOTALL)
    assert block is not None and yaml.safe_load(block.group(1)) == yaml.safe_load(RECIPE)
    # evaluation as a table: a row per model, a column per metric
    assert "| model | accuracy | loss | barrier |" in body
    assert "| org/model-a | 0.9123 | 0.3 |  |" in body
    assert "| merged | 0.95 |  | 0.0212 |" in body
    assert "![Evaluation plot](plots/barrier.png)" in body
    # inputs: Hub ids link to the Hub with their revision, local paths are named as given
    assert "[org/model-a](https://huggingface.co/org/model-a) | v1.0 | Hub" in body
    assert f"`{local}` |  | local" in body
    for placeholder in ("More Information Needed", "{{", "}}", "[optional]"):
        assert placeholder not in text


def test_flat_evaluation_and_stitch_section():
    text = build_model_card(
        inputs=["org/encoder-a", "org/encoder-b"],
        method="procrustes",
        engine="stitching",
        evaluation={"accuracy": 0.98, "cka": 0.874},
        stitched={"front": "org/encoder-a up to layer 4", "back": "org/encoder-b from layer 5", "anchors": 64},
    )
    assert "| Metric | Value |" in text and "| accuracy | 0.98 |" in text and "| cka | 0.874 |" in text
    section = text.split("## Stitching", 1)[1]
    assert "| front | org/encoder-a up to layer 4 |" in section and "| anchors | 64 |" in section
    assert "stitched from 2 input models" in text
    meta = front_matter(text)
    assert meta["tags"] == ["merge", "suture", "procrustes", "stitching"]
    assert "## Evaluation" in text and "![" not in text


def test_recipe_with_backticks_keeps_its_fence():
    recipe = "merge_method: linear\n# note: ```not a fence```\nmodels: []\n"
    text = build_model_card(inputs=["org/a"], method="linear", recipe_yaml=recipe)
    assert "````yaml\n" + recipe.rstrip("\n") + "\n````" in text


def test_table_cells_escape_pipes():
    text = build_model_card(inputs=["org/a"], method="linear", evaluation={"a|b": "x\ny"})
    assert "| a\\|b | x y |" in text


def test_write_model_card_copies_outside_plot_and_reads_recipe(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "suture_recipe.yml").write_text(RECIPE)
    plot = tmp_path / "elsewhere" / "interp.png"
    plot.parent.mkdir()
    plot.write_bytes(b"\x89PNG fake")

    readme = write_model_card(out, inputs=["org/a", "org/b"], method="linear", plot_path=str(plot), evaluation={"acc": 1.0})

    assert readme == out / "README.md"
    assert (out / "interp.png").read_bytes() == plot.read_bytes()
    text = readme.read_text()
    assert "![Evaluation plot](interp.png)" in text
    assert RECIPE.rstrip("\n") in text
    assert ModelCard.load(readme).data.base_model == ["org/a", "org/b"]

    # a plot already inside the output folder is referenced by its relative path
    (out / "plots").mkdir()
    (out / "plots" / "b.png").write_bytes(b"png")
    text = write_model_card(out, inputs=["org/a"], method="linear", plot_path=str(out / "plots" / "b.png")).read_text()
    assert "![Evaluation plot](plots/b.png)" in text
    with pytest.raises(InputError, match="plot image not found"):
        write_model_card(out, inputs=["org/a"], method="linear", plot_path="missing.png")


def test_method_is_required():
    with pytest.raises(InputError, match="method"):
        build_model_card(inputs=["org/a"], method="")


def test_demo_inputs_and_barrier_rows_are_labelled_for_what_they_are():
    from suture.merge.card import report_card
    from suture.merge.report import as_report

    evaluation = {"models": {"demo:mlp-seed1": {"loss": 0.0957, "accuracy": 0.9861}},
                  "merged": {"loss": 0.112, "accuracy": 0.9777},
                  "barriers": {"naive": {"loss": 0.52971, "accuracy": 0.05}, "aligned": {"loss": 2e-9, "accuracy": 0.0}},
                  "midpoint_accuracy": {"naive": 0.9387, "aligned": 0.9777}}
    report = as_report({"merge_method": "linear", "models": ["demo:mlp-seed1", "demo:mlp-seed2"], "evaluation": evaluation})
    text = build_model_card(**report_card(report))
    # a barrier is not a loss: its rows fill the barrier column, and rounding noise reads 0
    assert "| model | loss | accuracy | loss barrier | midpoint accuracy |" in text
    assert "| naive path |  |  | 0.5297 | 0.9387 |" in text and "| aligned path |  |  | 0 | 0.9777 |" in text
    assert "| merged | 0.112 | 0.9777 |  |  |" in text
    assert "`demo:mlp-seed1` |  | built-in demo" in text and "| local |" not in text
