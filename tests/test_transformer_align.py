"""Activation matching for transformers (Verma & Elbayad, 2024) on Hugging Face GPT-2 and BERT folders.

Models are tiny random transformers built from configs in the test; nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers as T

from suture.merge.align.assignment import solve_lap
from suture.merge.align.transformer_match import assign_head_parts, assign_heads, match_transformer, transformer_sites
from suture.merge.derive import derive_spec, load_module
from suture.merge.spec import invert_permutation, permute_state
from suture.merge.store import DictStore, open_store
from suture.recipes.runner import run_recipe
from tests.test_engines_foreign import _save_tokenizer, _texts

CONFIGS = {
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                                   bos_token_id=0, eos_token_id=0)),
    "bert": lambda: T.BertForMaskedLM(T.BertConfig(vocab_size=100, hidden_size=32, intermediate_size=48,
                                                   num_hidden_layers=2, num_attention_heads=4,
                                                   max_position_embeddings=32)),
}


def _folder(root: Path, family: str, seed: int) -> Path:
    torch.manual_seed(seed)
    folder = root / f"{family}-{seed}"
    CONFIGS[family]().eval().save_pretrained(folder)
    _save_tokenizer(folder)
    return folder


def _batches(n: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 100, (4, 16), generator=g)} for _ in range(n)]


def _logits(module: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(input_ids=ids).logits


@pytest.mark.parametrize("family", list(CONFIGS))
def test_matched_permutation_keeps_the_model_function(tmp_path, family):
    """Two models from different seeds: B permuted by what matching found computes exactly what B did."""
    store_a, store_b = open_store(_folder(tmp_path, family, 1)), open_store(_folder(tmp_path, family, 2))
    spec, arch = derive_spec(store_a)
    module_a, module_b = load_module(store_a, arch), load_module(store_b, arch)
    result = match_transformer(spec, module_a, module_b, _batches())
    assert set(result.perms) == {g.name for g in spec.active_groups()}
    assert any(not torch.equal(p, torch.arange(len(p))) for p in result.perms.values())
    assert result.stats["mean_corr_after"] > result.stats["mean_corr_before"]
    permuted = load_module(DictStore(permute_state(store_b.state_dict(), spec, result.perms), source="b", config=store_b.config), arch)
    ids = torch.randint(0, 100, (3, 20), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(_logits(permuted, ids), _logits(module_b, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_planted_permutation_is_recovered_head_by_head(tmp_path, family):
    """B is A permuted by a random head x within-head permutation per block: matching undoes it exactly."""
    store_a = open_store(_folder(tmp_path, family, 3))
    spec, arch = derive_spec(store_a)
    planted = spec.random_permutations(11)
    state_b = permute_state(store_a.state_dict(), spec, planted)
    module_a = load_module(store_a, arch)
    module_b = load_module(DictStore(state_b, source="b", config=store_a.config), arch)
    result = match_transformer(spec, module_a, module_b, _batches())
    for g in spec.active_groups():
        expected = invert_permutation(planted[g.name])
        assert torch.equal(result.perms[g.name], expected), g.name
        if g.kind == "heads_within":
            heads = result.perms[g.name].view(-1, g.head_dim) // g.head_dim
            assert bool((heads == heads[:, :1]).all()), f"{g.name}: a head was split"
    moved = [g.name for g in spec.active_groups() if g.kind == "heads_within"
             and not torch.equal(planted[g.name].view(-1, g.head_dim)[:, 0] // g.head_dim, torch.arange(g.size // g.head_dim))]
    assert moved  # the planted permutation moves whole heads somewhere
    restored = permute_state(state_b, spec, result.perms)
    for name, tensor in store_a.state_dict().items():
        assert torch.equal(restored[name], tensor), name


def test_assign_heads_keeps_heads_whole_where_free_matching_splits_them():
    """Head outputs decide the head pairing: dims of a head never go to two heads, unlike a free assignment."""
    g = torch.Generator().manual_seed(0)
    heads, dim = 4, 3
    head_perm = torch.tensor([2, 0, 3, 1])
    within = [torch.randperm(dim, generator=g) for _ in range(heads)]
    planted = torch.cat([head_perm[h] * dim + within[h] for h in range(heads)])
    cost = 0.05 * torch.randn(heads * dim, heads * dim, generator=g)
    cost[torch.arange(heads * dim), planted] += 1.0
    # a decoy: one dimension of head 0 correlates better with a dimension of another head than with its partner
    decoy = int(head_perm[1]) * dim + int(within[1][0])
    cost[0, decoy] = 3.0
    free = solve_lap(cost)
    assert free[0] == decoy  # a free assignment splits head 0
    perm = assign_heads(cost, cost, dim, within=True)
    assert torch.equal(perm, planted)


def test_split_head_pairing_weighs_the_queries_too():
    """A split group pairs heads on the head outputs and the Q/K features together (as weight matching sums both
    parts): where the head outputs say nothing, the queries still pair the heads, and each part keeps its order."""
    g = torch.Generator().manual_seed(1)
    heads, dim = 4, 3
    head_perm = torch.tensor([2, 0, 3, 1])
    qk_rows = torch.cat([head_perm[h] * dim + torch.randperm(dim, generator=g) for h in range(heads)])
    qk = 0.05 * torch.randn(heads * dim, heads * dim, generator=g)
    qk[torch.arange(heads * dim), qk_rows] += 1.0
    outputs = 0.05 * torch.randn(heads * dim, heads * dim, generator=g)  # no signal in the head outputs
    perm = assign_head_parts(outputs, [qk, outputs], dim, within=(True, True), pair_qk=True)
    assert torch.equal(perm[0], qk_rows) and torch.equal(perm[1] // dim, qk_rows // dim)
    alone = assign_head_parts(outputs, [qk, outputs], dim, within=(True, True))
    assert not torch.equal(alone[0] // dim, qk_rows // dim)  # the head outputs alone pair them otherwise


def test_sites_pool_the_residual_stream_over_every_block():
    torch.manual_seed(0)
    model = CONFIGS["gpt2"]().eval()
    from suture.merge.graph.families import spec_from_names

    spec = spec_from_names({k: tuple(v.shape) for k, v in model.state_dict().items()}, model.config.to_dict(), "gpt2")
    sites = transformer_sites(spec, model)
    stream = [(s.module, s.where) for s in sites["residual"]["stream"]]
    # pre-LN: every norm reads the stream after the embeddings, after each residual add, and at the end
    assert stream == [("transformer.h.0.ln_1", "output"), ("transformer.h.0.ln_2", "output"),
                      ("transformer.h.1.ln_1", "output"), ("transformer.h.1.ln_2", "output"), ("transformer.ln_f", "output")]
    assert set(sites["layer0.attn"]) == {"out0", "out1", "out2", "heads_out"}  # Q, K, V blocks of c_attn + head outputs
    assert [(s.module, s.where) for s in sites["layer1.mlp"]["units"]] == [("transformer.h.1.mlp.c_proj", "input")]


def test_recipe_aligns_two_gpt2_folders_trained_apart(tmp_path):
    """`alignment: {engine: activation_matching, data: <.txt>, repair: repair}` on two HF folders: merged, repaired,
    evaluated, reported."""
    a, b = _folder(tmp_path, "gpt2", 1), _folder(tmp_path, "gpt2", 2)
    data = _texts(tmp_path / "lines.txt", n=12)
    recipe = {"merge_method": "linear",
              "models": [{"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}],
              "alignment": {"engine": "activation_matching", "data": str(data), "features": "pooled", "batch_size": 4,
                            "repair": "repair"},
              "evaluate": {"data": str(data), "points": 3, "plot": False}}
    result = run_recipe(recipe, tmp_path / "out")
    report = result.report
    summary = report["alignment"]["models"][str(b)]
    assert summary["mean_corr_after"] > summary["mean_corr_before"]
    assert {"mean_corr_residual", "mean_corr_attention", "mean_corr_mlp"} <= set(summary)
    ev = report["evaluation"]
    # the aligned copy of B is B up to a permutation: the same loss
    assert ev["models"][str(b)]["loss"] > 0 and isinstance(ev["merged"]["loss"], float)
    assert report["alignment"]["postprocess"]["repair"] == "repair"  # the merged MLP units were rescaled
    merged = open_store(result.out_dir)
    assert set(merged.names()) == set(open_store(a).names())


@pytest.mark.parametrize("family", list(CONFIGS))
def test_repair_gives_merged_mlp_units_the_interpolated_statistics(tmp_path, family):
    from suture.merge.align.transformer_repair import _moments, repair_mlps, up_projections

    store_a, store_b = open_store(_folder(tmp_path, family, 1)), open_store(_folder(tmp_path, family, 2))
    spec, arch = derive_spec(store_a)
    module_a, module_b = load_module(store_a, arch), load_module(store_b, arch)
    state_a, state_b = store_a.state_dict(), store_b.state_dict()
    merged = load_module(DictStore({k: (v + state_b[k]) / 2 for k, v in state_a.items()}, source="m",
                                   config=store_a.config), arch)
    batches = _batches(4)
    names = [n for _, n in up_projections(spec, merged)]
    assert len(names) == 2  # one MLP up projection per block
    before = _moments(merged, names, batches)
    assert repair_mlps(merged, module_a, module_b, spec, batches) == 2
    after, ends_a, ends_b = _moments(merged, names, batches), _moments(module_a, names, batches), _moments(module_b, names, batches)
    for n in names:
        target_std = (ends_a[n][1] + ends_b[n][1]) / 2
        assert not torch.allclose(before[n][1], target_std, rtol=1e-3)
        torch.testing.assert_close(after[n][1], target_std, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(after[n][0], (ends_a[n][0] + ends_b[n][0]) / 2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_modules_features_recover_planted_split_permutation(tmp_path, family):
    """`features: modules` (plain activation matching at the family's taps) observes Q/K and V/O apart too, so a
    planted permutation with separate within-head orders per part is undone exactly."""
    from suture.merge.align.activation_matching import activation_matching
    from suture.merge.hf_module import hf_taps

    store = open_store(_folder(tmp_path, family, 1))
    spec, arch = derive_spec(store)
    module_a, module_b = load_module(store, arch), load_module(store, arch)
    module_b.load_state_dict(permute_state(module_a.state_dict(), spec, spec.random_permutations(3, split=True)))
    result = activation_matching(spec, module_a, module_b, _batches(), taps=hf_taps(spec, module_a))
    assert sum(p.dim() == 2 for p in result.perms.values()) == 2  # one 2-row answer per attention block
    restored = permute_state(module_b.state_dict(), spec, result.perms)
    for name, t in module_a.state_dict().items():
        torch.testing.assert_close(restored[name], t, rtol=0, atol=0, msg=name)
