"""Hugging Face ViT folders through the engines: a tiny random-config ViTForImageClassification saved as
config.json + model.safetensors, its derived groups, a spec permutation that keeps the logits, and a planted
permutation recovered by weight matching, and by activation matching and CCA on image tensors (a .safetensors data file
whose ``inputs`` are ``(N, 3, H, W)`` pixel values, fed to the model positionally as ``pixel_values``).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers as T
from safetensors.torch import save_file

from suture.merge.derive import derive_spec, load_module
from suture.merge.hf_module import HFArchitecture
from suture.merge.spec import permute_state
from suture.merge.store import open_store
from suture.recipes.runner import run_recipe

LAYERS = 2


def _vit() -> T.ViTForImageClassification:
    config = T.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=LAYERS,
                         num_attention_heads=4, intermediate_size=48, num_labels=5, initializer_range=0.2)
    return T.ViTForImageClassification(config).eval()


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vit_pair(tmp_path_factory) -> tuple[Path, Path, dict[str, torch.Tensor], Path]:
    """A ViT folder, a copy permuted by a random draw from its spec, the planted permutations, image data."""
    root = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    a, b = root / "a", root / "b"
    _vit().save_pretrained(a)
    store = open_store(a)
    spec, _ = derive_spec(store)
    perms = spec.random_permutations(11)
    b.mkdir()
    save_file({k: v.contiguous() for k, v in permute_state(store.state_dict(), spec, perms).items()}, str(b / "model.safetensors"))
    (b / "config.json").write_text((a / "config.json").read_text())
    data = root / "images.safetensors"
    save_file({"inputs": _images(64, 1)}, str(data))
    return a, b, perms, data


def test_vit_folder_groups_and_a_spec_permutation_keeps_the_logits(vit_pair):
    a, b, perms, _ = vit_pair
    store_a, store_b = open_store(a), open_store(b)
    spec, arch = derive_spec(store_a)
    assert isinstance(arch, HFArchitecture) and arch.factory == "transformers:ViTForImageClassification"
    assert spec.family == "vit"
    kinds = {g.name: (g.kind, g.size, g.head_dim) for g in spec}
    assert kinds == {"residual": ("free", 32, None),
                     **{f"layer{i}.attn": ("heads_within", 32, 8) for i in range(LAYERS)},
                     **{f"layer{i}.mlp": ("free", 48, None) for i in range(LAYERS)}}
    members = {m.tensor for m in spec.groups["residual"].members}
    assert {"vit.embeddings.patch_embeddings.projection.weight", "vit.embeddings.cls_token",
            "vit.embeddings.position_embeddings", "vit.layernorm.weight", "classifier.weight"} <= members
    # every tensor of the model but the classifier bias is in a group (no silent leftovers)
    grouped = {m.tensor for g in spec for m in g.members}
    assert set(store_a.names()) - grouped == {"classifier.bias"}
    assert all(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    x = _images(6, 2)
    with torch.no_grad():
        logits_a = load_module(store_a, arch)(pixel_values=x).logits
        logits_b = load_module(store_b, arch)(pixel_values=x).logits
    assert logits_a.abs().max() > 0.1
    torch.testing.assert_close(logits_b, logits_a, atol=1e-5, rtol=1e-5)


def test_vit_module_answers_to_the_checkpoint_names(vit_pair):
    """transformers may rename ViT's layers in memory; the built module still speaks the file's names, copies too."""
    import copy

    a = open_store(vit_pair[0])
    module = load_module(a, derive_spec(a)[1])
    query = "vit.encoder.layer.0.attention.attention.query"
    for m in (module, copy.deepcopy(module)):
        assert set(m.state_dict()) == set(a.names())
        assert dict(m.named_modules())[query] is m.get_submodule(query)
        assert isinstance(m.get_submodule(query), torch.nn.Linear)
        torch.testing.assert_close(m.state_dict()[query + ".weight"], a.get(query + ".weight"))


@pytest.mark.parametrize("alignment", [
    {"engine": "weight_matching"},
    {"engine": "activation_matching", "features": "pooled"},
    {"engine": "cca", "reg": 1e-9},
], ids=["weight_matching", "activation_matching", "cca"])
def test_vit_planted_permutation_is_recovered_from_a_recipe(tmp_path, vit_pair, alignment):
    a, b, perms, data = vit_pair
    if alignment["engine"] != "weight_matching":
        alignment = {**alignment, "data": str(data)}
    recipe = {"merge_method": "linear",
              "models": [{"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}],
              "alignment": alignment}
    result = run_recipe(recipe, tmp_path / "out")
    original, merged = open_store(a), open_store(result.out_dir)
    for name in original.names():  # aligned B is A again, so the average is A
        torch.testing.assert_close(merged.get(name).float(), original.get(name).float(), rtol=1e-5, atol=1e-6, msg=name)
