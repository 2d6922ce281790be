"""Recipe runner and CLI end to end on tiny models written by the tests themselves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from suture.merge.errors import InputError, RecipeError
from suture.merge.store import open_store
from suture.recipes.cli import main
from suture.recipes.runner import RunOptions, dry_run, run_recipe

HIDDEN, LAYERS, VOCAB = 16, 3, 40


def tiny_llama(folder: Path, seed: int, *, layers: int = LAYERS, hidden: int = HIDDEN) -> Path:
    """A random Llama-shaped model folder (safetensors + config.json) that transformers can load."""
    g = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(VOCAB, hidden, generator=g)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{proj}.weight"] = torch.randn(hidden, hidden, generator=g) * 0.1
        t[p + "mlp.gate_proj.weight"] = torch.randn(2 * hidden, hidden, generator=g) * 0.1
        t[p + "mlp.up_proj.weight"] = torch.randn(2 * hidden, hidden, generator=g) * 0.1
        t[p + "mlp.down_proj.weight"] = torch.randn(hidden, 2 * hidden, generator=g) * 0.1
        t[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
        t[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
    t["model.norm.weight"] = torch.ones(hidden)
    t["lm_head.weight"] = torch.randn(VOCAB, hidden, generator=g)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(t, folder / "model.safetensors")
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
        "intermediate_size": 2 * hidden, "num_hidden_layers": layers, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": VOCAB, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture()
def pair(tmp_path):
    return tiny_llama(tmp_path / "a", 1), tiny_llama(tmp_path / "b", 2)


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_linear_merge_matches_formula_and_writes_complete_folder(tmp_path, pair):
    a, b = pair
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(a), "parameters": {"weight": 0.3}}, {"model": str(b), "parameters": {"weight": 0.7}}],
        "dtype": "float32",
    }
    result = run_recipe(recipe, tmp_path / "out")
    out = result.out_dir
    assert {"model.safetensors", "config.json", "suture_recipe.yml", "report.json", "README.md"} <= {p.name for p in out.iterdir()}
    merged, sa, sb = open_store(out), open_store(a), open_store(b)
    assert merged.names() == sa.names()
    for name in sa.names():
        expected = 0.3 * sa.get(name) + 0.7 * sb.get(name)  # normalize=True: weights already sum to 1
        torch.testing.assert_close(merged.get(name), expected, rtol=1e-6, atol=1e-6)
    report = json.loads((out / "report.json").read_text())
    assert report["tensors"] == len(sa.names()) and report["merge_method"] == "linear"
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert {"merge", "suture", "linear"} <= set(front["tags"])
    # local paths are not Hub ids; the Hub accepts base_model_relation only beside base_model
    assert "base_model" not in front and "base_model_relation" not in front
    # the recipe as run parses back to the same recipe
    again = yaml.safe_load((out / "suture_recipe.yml").read_text())
    assert again["merge_method"] == "linear" and again["models"][1]["parameters"]["weight"] == 0.7


def test_output_loads_with_transformers(tmp_path, pair):
    transformers = pytest.importorskip("transformers")
    a, b = pair
    recipe = {"merge_method": "slerp", "base_model": str(a), "models": [{"model": str(a)}, {"model": str(b)}],
              "parameters": {"t": [0.0, 0.5, 1.0]}, "out_dtype": "bfloat16"}
    out = run_recipe(recipe, tmp_path / "out").out_dir
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == LAYERS
    assert next(model.parameters()).dtype == torch.bfloat16


def test_gradient_parameters_follow_layer_position(tmp_path, pair):
    a, b = pair
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(a), "parameters": {"weight": [1.0, 0.0]}},
            {"model": str(b), "parameters": {"weight": [0.0, 1.0]}},
        ],
    }
    out = run_recipe(recipe, tmp_path / "out").out_dir
    merged, sa, sb = open_store(out), open_store(a), open_store(b)
    name = "model.layers.{}.mlp.up_proj.weight"
    torch.testing.assert_close(merged.get(name.format(0)), sa.get(name.format(0)))
    torch.testing.assert_close(merged.get(name.format(2)), sb.get(name.format(2)))
    torch.testing.assert_close(merged.get(name.format(1)), 0.5 * sa.get(name.format(1)) + 0.5 * sb.get(name.format(1)))


def test_passthrough_slices_frankenmerge(tmp_path, pair):
    a, b = pair
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(b), "layer_range": [1, 3]}]},
        ],
    }
    out = run_recipe(recipe, tmp_path / "out").out_dir
    merged, sa, sb = open_store(out), open_store(a), open_store(b)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    w = "model.layers.{}.self_attn.q_proj.weight"
    assert torch.equal(merged.get(w.format(0)), sa.get(w.format(0)))
    assert torch.equal(merged.get(w.format(1)), sa.get(w.format(1)))
    assert torch.equal(merged.get(w.format(2)), sb.get(w.format(1)))
    assert torch.equal(merged.get(w.format(3)), sb.get(w.format(2)))
    assert torch.equal(merged.get("model.embed_tokens.weight"), sa.get("model.embed_tokens.weight"))
    assert torch.equal(merged.get("lm_head.weight"), sb.get("lm_head.weight"))
    assert "model.layers.4.mlp.up_proj.weight" not in merged


def test_sharded_output_and_dry_run(tmp_path, pair):
    a, b = pair
    recipe = write_recipe(tmp_path / "r.yaml", {"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": 1.0}}, {"model": str(b), "parameters": {"weight": 1.0}}]})
    plan = dry_run(recipe)
    assert len(plan["tensors"]) == len(open_store(a).names())
    first = plan["tensors"][0]
    assert first["method"] == "linear" and len(first["sources"]) == 2 and first["model_params"][0]["weight"] == 1.0
    assert not (tmp_path / "out").exists()
    out = run_recipe(recipe, tmp_path / "out", RunOptions(out_shard_size="8KB")).out_dir
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert len(open_store(out)) == len(open_store(a))


def test_missing_tensor_and_shape_mismatch_errors(tmp_path, pair):
    a, _ = pair
    wide = tiny_llama(tmp_path / "wide", 3, hidden=24)
    recipe = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1.0}}, {"model": str(wide), "parameters": {"weight": 1.0}}]}
    with pytest.raises(InputError, match=r"different shapes.*\[40, 16\].*\[40, 24\]"):
        run_recipe(recipe, tmp_path / "out")
    short = tiny_llama(tmp_path / "short", 4, layers=2)
    recipe["models"][1]["model"] = str(short)
    with pytest.raises(InputError, match="'model.layers.2.*' is missing from model"):
        run_recipe(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_required_parameter_names_key(tmp_path, pair):
    a, b = pair
    recipe = {"merge_method": "ties", "base_model": str(a), "models": [{"model": str(b), "parameters": {"density": 0.5}}]}
    with pytest.raises(RecipeError, match=r"needs parameter 'weight'.*models\[0\]\.parameters"):
        run_recipe(recipe, tmp_path / "out")


def test_failure_mid_run_leaves_no_output(tmp_path, pair, monkeypatch):
    from suture.merge.writer import ShardedWriter

    a, b = pair
    calls = {"n": 0}

    original = ShardedWriter.write

    def failing(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk on fire")
        return original(self, name, tensor)

    monkeypatch.setattr(ShardedWriter, "write", failing)
    recipe = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1.0}}, {"model": str(b), "parameters": {"weight": 1.0}}]}
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_recipe(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out") and p.name != ".out.lock"]


def test_cli_run_and_errors(tmp_path, pair, capsys):
    a, b = pair
    recipe = write_recipe(tmp_path / "r.yaml", {"merge_method": "task_arithmetic", "base_model": str(a),
                                                "models": [{"model": str(b), "parameters": {"weight": 0.5}}]})
    assert main(["run", str(recipe), str(tmp_path / "out"), "-q"]) == 0
    assert "output:" in capsys.readouterr().out
    # existing output is not clobbered without --overwrite
    assert main(["run", str(recipe), str(tmp_path / "out"), "-q"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["run", str(recipe), str(tmp_path / "out"), "-q", "--overwrite"]) == 0
    # a bad key is reported with its line before any tensor is read
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"merge_method: linear\nmodels:\n  - model: {a}\n    paramters:\n      weight: 1.0\n")
    assert main(["run", str(bad), str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert "line 4" in err and "paramters" in err
    assert main(["run", str(recipe), str(tmp_path / "out3"), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["merge_method"] == "task_arithmetic"
    assert not (tmp_path / "out3").exists()


def test_cli_inspect(tmp_path, pair, capsys):
    a, _ = pair
    assert main(["inspect", str(a), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tensor_count"] == len(open_store(a).names())
    assert info["parameters"] == sum(open_store(a).info(n).numel for n in open_store(a).names())
    assert info["family"] == "llama"


def test_cli_help_imports_nothing_heavy():
    code = "import sys; from recipes.cli import build_parser; build_parser().format_help(); print(sorted(m for m in ('torch','numpy','safetensors','pydantic') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == "[]"


def test_pickle_inputs_need_opt_in(tmp_path, pair):
    a, b = pair
    pick = tmp_path / "pick"
    pick.mkdir()
    torch.save(open_store(b).state_dict(), pick / "pytorch_model.bin")
    recipe = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1.0}}, {"model": str(pick), "parameters": {"weight": 1.0}}]}
    with pytest.raises(InputError, match="pickle"):
        run_recipe(recipe, tmp_path / "out")
    out = run_recipe(recipe, tmp_path / "out", RunOptions(allow_pickle=True)).out_dir
    assert len(open_store(out)) == len(open_store(a))


def test_tokenizer_union_through_the_runner(tmp_path):
    """Two tiny Llamas with different vocabularies: a union merge grows the embeddings and tokenizer."""
    transformers = pytest.importorskip("transformers")
    from tests.test_tokenizer import make_wordlevel

    folders = {}
    for key, words, seed in (("a", ["the", "cat", "dog"], 1), ("b", ["the", "dog", "bird", "fish"], 2)):
        folder = tmp_path / key
        make_wordlevel(folder, words, [], None, seed)
        vocab = 3 + len(words)
        tiny_llama(folder, seed)  # weights + config for VOCAB rows; cut the vocabulary tensors to this tokenizer
        store = open_store(folder)
        tensors = store.state_dict()
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors[name] = tensors[name][:vocab].clone()
        store.close()
        save_file(tensors, folder / "model.safetensors")
        config = json.loads((folder / "config.json").read_text())
        config.update(vocab_size=vocab, bos_token_id=1, eos_token_id=2)
        (folder / "config.json").write_text(json.dumps(config))
        folders[key] = folder
    recipe = {"merge_method": "linear", "tokenizer_source": "union",
              "models": [{"model": str(folders["a"]), "parameters": {"weight": 0.5}},
                         {"model": str(folders["b"]), "parameters": {"weight": 0.5}}]}
    out = run_recipe(recipe, tmp_path / "out").out_dir
    merged = open_store(out)
    assert merged.shape("model.embed_tokens.weight") == (8, HIDDEN)  # 3 specials + the cat dog bird fish
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ea, eb = open_store(folders["a"]).get("model.embed_tokens.weight"), open_store(folders["b"]).get("model.embed_tokens.weight")
    emb = merged.get("model.embed_tokens.weight")
    # a token both models have is averaged; one only b has comes from b alone (mergekit's missing-row rule)
    the_a, the_b = 3, 3
    torch.testing.assert_close(emb[tok.convert_tokens_to_ids("the")], 0.5 * ea[the_a] + 0.5 * eb[the_b])
    torch.testing.assert_close(emb[tok.convert_tokens_to_ids("bird")], eb[5])
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 8
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model(torch.tensor([[1, 4, 7]])).logits.shape == (1, 3, 8)


def test_non_finite_inputs_warn_or_fail_with_strict(tmp_path, pair, capsys, caplog):
    a, b = pair
    store = open_store(b)
    tensors = store.state_dict()
    tensors["model.norm.weight"] = tensors["model.norm.weight"].clone()
    tensors["model.norm.weight"][3] = float("nan")
    save_file(tensors, b / "model.safetensors")
    recipe = write_recipe(tmp_path / "r.yaml", {"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": 1.0}}, {"model": str(b), "parameters": {"weight": 1.0}}]})
    assert main(["run", str(recipe), str(tmp_path / "strict"), "-q", "--strict"]) == 2
    err = capsys.readouterr().err
    assert "'model.norm.weight' has 1 non-finite value" in err and str(b) in err
    assert not (tmp_path / "strict").exists()
    with caplog.at_level("WARNING"):
        run_recipe(recipe, tmp_path / "lenient")
    assert "non-finite" in caplog.text
