"""Separate within-head permutations for Q/K and for V/O (2-row permutations of split attention groups).

Tiny random transformers (no downloads): a planted 2-row permutation, with different Q/K and V/O orders, is
undone exactly by weight matching (in memory and streamed from safetensors files) and by activation
matching; marking the parts wrongly breaks the function, so the function checks can fail; 1-D permutations
apply as before.
"""

from __future__ import annotations

import copy
import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import transformers as T
from safetensors.torch import save_file

from suture.merge.align.assignment import assign, assignment_score
from suture.merge.align.transformer_match import match_transformer
from suture.merge.align.weight_matching import weight_matching
from suture.merge.errors import AlignmentError
from suture.merge.graph.families import spec_from_names
from suture.merge.spec import (
    Member,
    PermGroup,
    PermutationSpec,
    check_permutation,
    collapse_rows,
    expand_index,
    invert_permutation,
    permute_state,
)
from suture.merge.store import open_store

SMALL = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             initializer_range=0.2, attn_implementation="eager")
MODELS = {
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                                   initializer_range=0.2, attn_implementation="eager")),
    "bert": lambda: T.BertForMaskedLM(T.BertConfig(**SMALL, max_position_embeddings=32)),
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**SMALL)),
    "llama_gqa": lambda: T.LlamaForCausalLM(T.LlamaConfig(**SMALL, num_key_value_heads=2)),
}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]().eval()


def _spec(model: torch.nn.Module) -> PermutationSpec:
    return spec_from_names({k: tuple(v.shape) for k, v in model.state_dict().items()}, model.config.to_dict())


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(seed))


def _logits(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.Tensor:
    other = copy.deepcopy(model)
    other.load_state_dict(state)
    with torch.no_grad():
        return other(input_ids=_ids()).logits


def _planted(spec: PermutationSpec, seed: int) -> dict[str, torch.Tensor]:
    """A split draw whose Q/K and V/O rows differ in every attention group."""
    perms = spec.random_permutations(seed, split=True)
    for g in spec.active_groups():
        if g.kind != "free":
            assert g.split and perms[g.name].shape == (2, g.size), g.name
            assert not torch.equal(perms[g.name][0], perms[g.name][1]), g.name
            assert check_permutation(g, perms[g.name]) is None
    return perms


# ------------------------------------------------------------------------------------------ the spec
def test_expand_index_gives_each_fused_block_its_part_row():
    """GPT-2's c_attn (Q, K, V blocks): Q and K take row 0, V row 1; a 1-D perm serves every block as before."""
    member = Member("c_attn.weight", 1, outer=3, parts=("qk", "qk", "vo"))
    qk, vo = torch.tensor([1, 0, 3, 2]), torch.tensor([0, 1, 2, 3]).flip(0)
    assert torch.equal(expand_index(torch.stack([qk, vo]), member, 2), torch.cat([qk, qk + 4, vo + 8]))
    assert torch.equal(expand_index(qk, member, 2), torch.cat([qk, qk + 4, qk + 8]))
    # GQA: O's columns (kv_head, repeat, head_dim) follow the V/O row
    o = Member("o.weight", 1, "in", repeat=2, parts=("vo",))
    assert torch.equal(expand_index(torch.stack([qk, vo]), o, 2), expand_index(vo, o, 2))
    with pytest.raises(ValueError, match="no Q/K or V/O part"):
        expand_index(torch.stack([qk, vo]), Member("w", 0), 2)


def test_check_and_invert_two_row_permutations():
    members = [Member("q", 0, parts=("qk",)), Member("v", 0, parts=("vo",))]
    within = PermGroup("attn", 8, members, kind="heads_within", head_dim=4)
    rope = PermGroup("attn", 8, members, kind="heads", head_dim=4)
    unmarked = PermGroup("attn", 8, [Member("q", 0)], kind="heads_within", head_dim=4)
    good = torch.tensor([[5, 4, 6, 7, 1, 0, 2, 3], [7, 6, 5, 4, 3, 2, 1, 0]])
    assert check_permutation(within, good) is None and check_permutation(within, good[0]) is None
    assert "moves them differently" in check_permutation(within, torch.stack([good[0], torch.arange(8)]))
    assert "must be 1-D" in check_permutation(unmarked, good)
    assert "may not move within a head" in check_permutation(rope, good)  # row 0 moves Q/K dimensions
    assert check_permutation(rope, torch.stack([torch.tensor([4, 5, 6, 7, 0, 1, 2, 3]), good[1]])) is None
    inv = invert_permutation(good)
    for row, back in zip(good, inv):
        assert torch.equal(row[back], torch.arange(8))
    assert torch.equal(collapse_rows(torch.stack([good[0], good[0]])), good[0])
    assert collapse_rows(good).shape == (2, 8)


def test_parts_and_within_freedom_per_family():
    gpt2, llama, bert = (_spec(_model(n)) for n in ("gpt2", "llama_gqa", "bert"))
    attn = gpt2.groups["layer0.attn"]
    assert attn.split and attn.within_free() == (True, True)
    c_attn = next(r for r in gpt2.describe() if r["group"] == "layer0.attn")["members"][0]
    assert c_attn.endswith("{outer=3} [qk qk vo]"), c_attn
    rope = llama.groups["layer0.attn"]
    assert rope.kind == "heads" and rope.split and rope.within_free() == (False, True)
    assert {m.tensor.split(".")[-2]: m.parts for m in rope.members if m.tensor.endswith("weight")} == {
        "q_proj": ("qk",), "k_proj": ("qk",), "v_proj": ("vo",), "o_proj": ("vo",)}
    assert bert.groups["layer0.attn"].within_free() == (True, True)
    # an unmarked group (e.g. a traced module) keeps one within-head order, and RoPE-style kind keeps none
    plain = PermGroup("a", 8, [Member("q", 0)], kind="heads", head_dim=4)
    assert not plain.split and plain.within_free() == (False, False)
    assert plain.random_permutation(torch.Generator().manual_seed(0), split=True).dim() == 1


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_wrongly_marked_parts_break_the_function(name):
    """The function check is sensitive: K marked V/O (its within order taken from V's row) changes the logits,
    while the correct marking keeps them."""
    model = _model(name)
    spec, state = _spec(model), model.state_dict()
    perms = _planted(spec, 1)
    before = _logits(model, state)
    torch.testing.assert_close(_logits(model, permute_state(state, spec, perms)), before, atol=1e-5, rtol=0)
    wrong = copy.deepcopy(spec)
    for g in wrong.active_groups():
        g.members = [_k_marked_vo(m) for m in g.members]
    assert (_logits(model, permute_state(state, wrong, perms)) - before).abs().max() > 1e-3


def _k_marked_vo(m: Member) -> Member:
    if m.outer == 3:  # GPT-2's fused c_attn: Q, K, V blocks
        return dataclasses.replace(m, parts=("qk", "vo", "vo"))
    return dataclasses.replace(m, parts=("vo",)) if ".key." in m.tensor else m


# ------------------------------------------------------------------------------------- the matchers
def test_assign_pairs_heads_on_both_parts_then_each_part_within():
    """Per-part costs planted with one head order and different within orders come back as the 2-row answer."""
    g = torch.Generator().manual_seed(0)
    group = PermGroup("a", 12, [Member("q", 0, parts=("qk",)), Member("v", 0, parts=("vo",))],
                      kind="heads_within", head_dim=4)
    planted = group.random_permutation(g, split=True)
    cost = torch.stack([torch.eye(12, dtype=torch.float64)[row] for row in planted])  # cost[r][i, p[r][i]] = 1
    cost = cost + 0.01 * torch.rand(cost.shape, generator=g, dtype=torch.float64)
    found = assign(cost, group.kind, group.head_dim, group.within_free())
    assert torch.equal(found, planted)
    assert assignment_score(cost, found) > assignment_score(cost, planted[0]) + 1.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["gpt2", "bert", "llama", "llama_gqa"])
def test_weight_matching_recovers_planted_split_permutation_from_files(tmp_path, name, device):
    """Streamed from safetensors stores (bf16 stored, fp32 products) as from state dicts: the plant is undone."""
    model = _model(name)
    spec = _spec(model)
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    planted = _planted(spec, 2)
    scrambled = permute_state(state, spec, planted)
    stores = {}
    for side, tensors in (("a", state), ("b", scrambled)):
        (tmp_path / side).mkdir()
        save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(tmp_path / side / "model.safetensors"))
        stores[side] = open_store(tmp_path / side)
    streamed = weight_matching(spec, stores["a"], stores["b"], device=device)
    in_memory = weight_matching(spec, state, scrambled, device=device)
    for g in spec.active_groups():
        assert torch.equal(streamed.perms[g.name].cpu(), invert_permutation(planted[g.name])), g.name
        assert torch.equal(in_memory.perms[g.name], streamed.perms[g.name]), g.name
    restored = permute_state(scrambled, spec, streamed.perms)
    assert all(torch.equal(restored[k], state[k]) for k in state)
    # a 2-row answer is a valid starting point, and a malformed one is refused naming the group
    again = weight_matching(spec, state, scrambled, init_perms=streamed.perms)
    assert again.iterations == 1
    attn = next(g for g in spec.active_groups() if g.kind != "free")
    bad = streamed.perms[attn.name].clone()
    bad[1] = bad[1].flip(0)  # V/O heads in the reverse order of Q/K ones
    with pytest.raises(AlignmentError, match=f"init_perms\\['{attn.name}'\\]"):
        weight_matching(spec, state, scrambled, init_perms={attn.name: bad})


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama", "llama_gqa"])
def test_activation_matching_recovers_planted_split_permutation(name):
    """B is A under a planted 2-row permutation: Q/K orders come from Q/K features, V/O from V and head outputs."""
    model = _model(name)
    spec = _spec(model)
    planted = _planted(spec, 3)
    other = copy.deepcopy(model)
    other.load_state_dict(permute_state(model.state_dict(), spec, planted))
    batches = [{"input_ids": _ids(s)} for s in range(3)]
    result = match_transformer(spec, model, other, batches)
    for g in spec.active_groups():
        assert torch.equal(result.perms[g.name], invert_permutation(planted[g.name])), g.name
    restored = permute_state(other.state_dict(), spec, result.perms)
    assert all(torch.equal(restored[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------ reports
def test_app_shows_one_permutation_matrix_per_part():
    from suture.app.services import permutation_matrices

    perm = torch.tensor([[2, 3, 0, 1], [3, 2, 0, 1]])
    mats = permutation_matrices("layer0.attn", perm)
    assert list(mats) == ["layer0.attn (Q/K)", "layer0.attn (V/O)"]
    for row, matrix in zip(perm, mats.values()):
        assert matrix.sum() == 4 and all(matrix[i, j] == 1 for i, j in enumerate(row.tolist()))
    assert list(permutation_matrices("layer0.mlp", perm[0])) == ["layer0.mlp"]
