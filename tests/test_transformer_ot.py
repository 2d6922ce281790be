"""OT fusion for transformers (Imfeld et al., ICLR 2024) on Hugging Face GPT-2 and BERT folders.

Models are tiny random transformers built from configs in the test; nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers as T

from suture.merge.align.ot import fuse_states, map_axis, ot_align, transport_state
from suture.merge.align.transformer_ot import collect_transformer_moments
from suture.merge.derive import derive_spec, load_module
from suture.merge.errors import AlignmentError
from suture.merge.spec import PermutationSpec, permute_state
from suture.merge.store import DictStore, open_store
from suture.recipes.runner import run_recipe
from tests.test_engines_foreign import _save_tokenizer, _texts

VOCAB = 100


def _gpt2(width: int = 32, heads: int = 4, tied: bool = True) -> T.GPT2LMHeadModel:
    return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=width, n_layer=2, n_head=heads, n_positions=32,
                                          bos_token_id=0, eos_token_id=0, tie_word_embeddings=tied))


def _bert(width: int = 32, heads: int = 4) -> T.BertForMaskedLM:
    return T.BertForMaskedLM(T.BertConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=48 * width // 32,
                                          num_hidden_layers=2, num_attention_heads=heads, max_position_embeddings=32))


BUILD = {"gpt2": _gpt2, "bert": _bert}


def _folder(root: Path, name: str, model: torch.nn.Module) -> Path:
    folder = root / name
    model.eval().save_pretrained(folder)
    _save_tokenizer(folder)
    return folder


def _batches(n: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (4, 16), generator=g)} for _ in range(n)]


def _logits(module: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(input_ids=ids).logits


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(5))


def _transport(store_a, store_b, ground_metric: str, **options):
    """(B in A's basis, result) through ot_align, with activation moments from transformer_ot when asked."""
    spec_a, arch_a = derive_spec(store_a)
    spec_b, arch_b = derive_spec(store_b)
    activations = None
    if ground_metric == "activations":
        activations = collect_transformer_moments(spec_a, spec_b, load_module(store_a, arch_a), load_module(store_b, arch_b),
                                                  _batches())
    result = ot_align(spec_a, spec_b, store_a.state_dict(), store_b.state_dict(), ground_metric=ground_metric,
                      activations=activations, **options)
    return transport_state(spec_a, spec_b, store_b.state_dict(), result), result, arch_a


@pytest.mark.parametrize("ground_metric", ["weights", "activations"])
@pytest.mark.parametrize("family", list(BUILD))
def test_permuted_copy_is_transported_back_to_the_model(tmp_path, family, ground_metric):
    """B = A under a random residual, head x within-head and MLP permutation: the exact plan undoes it."""
    torch.manual_seed(1)
    store_a = open_store(_folder(tmp_path, "a", BUILD[family]()))
    spec, arch = derive_spec(store_a)
    state_b = permute_state(store_a.state_dict(), spec, spec.random_permutations(7))
    store_b = DictStore(state_b, source="b", config=store_a.config)
    moved, result, _ = _transport(store_a, store_b, ground_metric)
    for g in spec.active_groups():
        plan = result.plans[g.name] * g.size
        assert torch.equal(plan, plan.round()) and torch.equal(plan.sum(0), torch.ones(g.size, dtype=plan.dtype)), g.name
    for name, tensor in store_a.state_dict().items():
        torch.testing.assert_close(moved[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    fused = load_module(DictStore(moved, source="moved", config=store_a.config), arch)
    torch.testing.assert_close(_logits(fused, _ids()), _logits(load_module(store_a, arch), _ids()), rtol=1e-4, atol=1e-4)


def _duplicated(narrow: torch.nn.Module, spec: PermutationSpec, wide: torch.nn.Module, seed: int = 3) -> dict[str, torch.Tensor]:
    """`wide`'s tensors built from `narrow`: every residual, head and MLP unit split in two (shuffled), each copy
    reading like the original and writing half of its outgoing weight, so `wide` computes what `narrow` does."""
    gen = torch.Generator().manual_seed(seed)
    copy_of: dict[str, torch.Tensor] = {}  # group -> (n, 2n) 0/1: wide unit j copies narrow unit i
    for g in spec:
        if g.kind == "free":
            src = torch.cat([torch.arange(g.size)] * 2)[torch.randperm(2 * g.size, generator=gen)]
        else:
            d, heads = g.head_dim, g.size // g.head_dim
            src_heads = torch.cat([torch.arange(heads)] * 2)[torch.randperm(2 * heads, generator=gen)]
            src = (src_heads[:, None] * d + torch.arange(d)).flatten()
        copy_of[g.name] = torch.nn.functional.one_hot(src, g.size).T.double()
    slots = {}
    for g in spec:
        for m in g.members:
            slots.setdefault(m.tensor, []).append((g, m))
    state = {}
    for name, t in narrow.state_dict().items():
        for g, m in slots.get(name, []):
            t = map_axis(t, m, g.head_dim, copy_of[g.name] * (0.5 if m.role == "in" else 1.0))
        state[name] = t
    expected = wide.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    return state


@pytest.mark.parametrize("ground_metric", ["weights", "activations"])
def test_split_units_fuse_back_into_the_narrow_model(tmp_path, ground_metric):
    """A wider GPT-2 (twice the residual width, heads and MLP units) made by splitting the narrow one's units
    computes what the narrow one does; transported onto the narrow model it is the narrow model again."""
    torch.manual_seed(2)
    narrow = _gpt2(32, 4, tied=False).eval()
    store_a = open_store(_folder(tmp_path, "narrow", narrow))
    spec, arch = derive_spec(store_a)
    wide = _gpt2(64, 8, tied=False).eval()
    wide.load_state_dict(_duplicated(narrow, spec, wide))
    torch.testing.assert_close(_logits(wide, _ids()), _logits(narrow, _ids()), rtol=1e-4, atol=1e-4)  # a faithful split
    store_b = open_store(_folder(tmp_path, "wide", wide))
    moved, result, _ = _transport(store_a, store_b, ground_metric)
    assert result.plans["residual"].shape == (64, 32) and result.plans["layer0.attn"].shape == (64, 32)
    back = load_module(DictStore(moved, source="moved", config=store_a.config), arch)
    torch.testing.assert_close(_logits(back, _ids()), _logits(narrow, _ids()), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("solver", ["emd", "sinkhorn"])
def test_wider_gpt2_fuses_into_the_narrow_config(tmp_path, solver):
    """Two GPT-2s of different residual width, head count and MLP width (same head size): B's heads are carried
    whole onto the reference's heads, and the fused model loads in the reference's config."""
    torch.manual_seed(3)
    store_a = open_store(_folder(tmp_path, "narrow", _gpt2(32, 4)))
    store_b = open_store(_folder(tmp_path, "wide", _gpt2(48, 6)))
    moved, result, arch = _transport(store_a, store_b, "activations", solver=solver)
    for layer in (0, 1):
        plan = result.plans[f"layer{layer}.attn"]  # (6 heads x 8, 4 heads x 8)
        assert plan.shape == (48, 32)
        blocks = plan.reshape(6, 8, 4, 8).permute(0, 2, 1, 3)  # (head of B, head of A, dim of B, dim of A)
        for g in range(6):
            for h in range(4):
                nonzero = blocks[g, h] > 0
                # a pair of heads shares mass only through a one-to-one pairing of their dimensions
                if nonzero.any():
                    assert bool((nonzero.sum(0) == 1).all() and (nonzero.sum(1) == 1).all()), (layer, g, h)
        if solver == "sinkhorn":
            assert int((blocks.sum((2, 3)) > 1e-6).sum()) > 6  # soft: some of B's heads feed several heads of A
    fused = fuse_states(store_a.state_dict(), moved)
    module = load_module(DictStore(fused, source="fused", config=store_a.config), arch)
    assert module.config.n_embd == 32 and module.config.n_head == 4
    logits = _logits(module, _ids())
    assert logits.shape == (3, 20, VOCAB) and bool(torch.isfinite(logits).all())


def test_heads_of_different_sizes_are_refused(tmp_path):
    torch.manual_seed(4)
    store_a = open_store(_folder(tmp_path, "a", _gpt2(32, 4)))
    store_b = open_store(_folder(tmp_path, "b", _gpt2(48, 4)))  # heads of 12 vs 8
    with pytest.raises(AlignmentError, match="head sizes must match"):
        _transport(store_a, store_b, "weights")


@pytest.mark.parametrize("widths", [(32, 32), (32, 48)])
def test_recipe_fuses_two_gpt2_folders_on_activations(tmp_path, widths):
    """`alignment: {engine: ot, ground_metric: activations, data: <.txt>}` on two HF folders (equal or different
    widths): fused into the reference's config, evaluated on the same text."""
    torch.manual_seed(5)
    a = _folder(tmp_path, "a", _gpt2(widths[0], widths[0] // 8))
    b = _folder(tmp_path, "b", _gpt2(widths[1], widths[1] // 8))
    data = _texts(tmp_path / "lines.txt", n=12)
    recipe = {"merge_method": "linear",
              "models": [{"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}],
              "alignment": {"engine": "ot", "data": str(data), "ground_metric": "activations", "solver": "sinkhorn",
                            "batch_size": 4},
              "evaluate": {"data": str(data), "points": 3, "plot": False}}
    result = run_recipe(recipe, tmp_path / "out")
    report = result.report
    summary = report["alignment"]["models"][str(b)]
    assert summary["options"]["ground_metric"] == "activations" and summary["groups"] == 5
    assert summary["per_group"]["layer0.attn"]["size_b"] == widths[1]
    ev = report["evaluation"]
    assert isinstance(ev["merged"]["loss"], float) and ev["merged"]["loss"] > 0
    merged = open_store(result.out_dir)
    assert {k: v for k, v in merged.shapes().items()} == {k: v for k, v in open_store(a).shapes().items()}
