"""Weight matching: exact recovery of planted permutations, structured (attention) groups, and digits MLPs."""

from __future__ import annotations

import itertools
import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from suture.merge.align.assignment import assign, solve_lap
from suture.merge.align.weight_matching import weight_matching
from suture.merge.data import CalibrationData
from suture.merge.errors import AlignmentError
from suture.merge.graph.trace import spec_from_module
from suture.merge.align.ot import _sum_units, map_axis
from suture.merge.demo import train
from suture.merge.spec import Member, PermGroup, PermutationSpec, expand_index, permute_state, unit_matrix
from suture.merge.align.zipit import apply_units
from tests.test_trace_spec import CNN, MLP, ResNet, SwiGLU, TinyLM, _randomize


# ----------------------------------------------------------------------------------------- planted
@pytest.mark.parametrize(
    "factory, example",
    [
        (lambda: MLP(widths=(12, 48, 48, 48, 5)), lambda: torch.randn(2, 12)),
        (lambda: _randomize(CNN()), lambda: torch.randn(2, 3, 16, 16)),
        (lambda: _randomize(ResNet()), lambda: torch.randn(2, 3, 16, 16)),
        (lambda: _randomize(SwiGLU()), lambda: torch.randn(2, 10)),
        (lambda: _randomize(TinyLM()), lambda: torch.randint(0, 50, (2, 7))),
    ],
    ids=["mlp", "cnn", "resnet", "swiglu", "tied-lm"],
)
def test_recovers_planted_permutation_bit_for_bit(factory, example):
    torch.manual_seed(0)
    model = factory().eval()
    spec = spec_from_module(model, example())
    state = model.state_dict()
    planted = spec.random_permutations(seed=7)
    scrambled = permute_state(state, spec, planted)
    assert any(not torch.equal(scrambled[k], state[k]) for k in state)
    seen = []
    result = weight_matching(spec, state, scrambled, progress=lambda i, obj: seen.append((i, obj)))
    restored = permute_state(scrambled, spec, result.perms)
    for name in state:
        assert torch.equal(restored[name], state[name]), name
    assert result.converged and 1 <= result.iterations <= 10
    assert seen == list(zip(range(1, result.iterations + 1), result.objective))
    assert result.stats["cosine_after"] == pytest.approx(1.0, abs=1e-6)
    assert result.stats["cosine_before"] < 0.99
    assert set(result.group_time) == {g.name for g in spec.active_groups()}
    assert 0 < result.lap_time <= result.total_time


def test_objective_never_decreases_and_init_perms_are_used():
    torch.manual_seed(0)
    a, b = MLP(widths=(12, 64, 64, 5)), MLP(widths=(12, 64, 64, 5))
    spec = spec_from_module(a, torch.randn(2, 12))
    result = weight_matching(spec, a.state_dict(), b.state_dict(), seed=3)
    assert all(y >= x - 1e-9 for x, y in zip(result.objective, result.objective[1:]))
    assert result.stats["cosine_after"] > result.stats["cosine_before"]
    # starting from the answer: nothing improves, the first pass already converges
    again = weight_matching(spec, a.state_dict(), b.state_dict(), init_perms=result.perms)
    assert again.iterations == 1
    for g in result.perms:
        assert torch.equal(again.perms[g], result.perms[g])


# ---------------------------------------------------------------------------------- assignment
def test_lap_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    cost = torch.randn(6, 6, generator=gen)
    best = max(itertools.permutations(range(6)), key=lambda p: sum(float(cost[i, j]) for i, j in enumerate(p)))
    assert solve_lap(cost).tolist() == list(best)


@pytest.mark.parametrize("kind", ["heads", "heads_within"])
def test_structured_assignment_matches_brute_force(kind):
    heads, d = 3, 2
    gen = torch.Generator().manual_seed(1)
    cost = torch.randn(heads * d, heads * d, generator=gen, dtype=torch.float64)
    group = PermGroup("g", heads * d, kind=kind, head_dim=d)
    candidates = set()
    for head_order in itertools.permutations(range(heads)):
        withins = itertools.product(*[list(itertools.permutations(range(d)))] * heads) if kind == "heads_within" else [[tuple(range(d))] * heads]
        for within in withins:
            candidates.add(tuple(h * d + w for h, ws in zip(head_order, within) for w in ws))
    assert len(candidates) == (math.factorial(heads) * (math.factorial(d) ** heads if kind == "heads_within" else 1))
    score = lambda p: float(cost[torch.arange(len(p)), torch.tensor(p)].sum())  # noqa: E731
    best = max(candidates, key=score)
    perm = assign(cost, kind, d)
    assert tuple(perm.tolist()) in candidates
    assert score(tuple(perm.tolist())) == pytest.approx(score(best))
    # the spec's own random draws live in the same candidate set
    assert tuple(group.random_permutation(torch.Generator().manual_seed(0)).tolist()) in candidates


# ---------------------------------------------------------------------------- attention groups
class GQAttention(nn.Module):
    """Grouped-query self-attention with separate q/k/v/o projections (no RoPE)."""

    def __init__(self, dim=12, heads=4, kv_heads=2, head_dim=3):
        super().__init__()
        self.h, self.kv, self.d = heads, kv_heads, head_dim
        self.q = nn.Linear(dim, heads * head_dim)
        self.k = nn.Linear(dim, kv_heads * head_dim)
        self.v = nn.Linear(dim, kv_heads * head_dim)
        self.o = nn.Linear(heads * head_dim, dim)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.h, self.d).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv, self.d).transpose(1, 2).repeat_interleave(self.h // self.kv, dim=1)
        v = self.v(x).view(b, t, self.kv, self.d).transpose(1, 2).repeat_interleave(self.h // self.kv, dim=1)
        att = torch.softmax(q @ k.transpose(-1, -2) / self.d**0.5, dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, t, -1))


def attention_spec(model: GQAttention, kind: str) -> PermutationSpec:
    """Q and K share a (kv-head, within-head) permutation; V and O's input share another."""
    rep, size = model.h // model.kv, model.kv * model.d
    spec = PermutationSpec()
    spec.add(PermGroup("qk", size, [Member("q.weight", 0, "out", rep), Member("q.bias", 0, "out", rep),
                                    Member("k.weight", 0), Member("k.bias", 0)], kind=kind, head_dim=model.d))  # fmt: skip
    spec.add(PermGroup("vo", size, [Member("v.weight", 0), Member("v.bias", 0), Member("o.weight", 1, "in", rep)],
                       kind=kind, head_dim=model.d))  # fmt: skip
    spec.validate({k: v.shape for k, v in model.state_dict().items()})
    return spec


@pytest.mark.parametrize("kind", ["heads", "heads_within"])
def test_attention_groups_planted_and_structured(kind):
    torch.manual_seed(0)
    model = GQAttention().eval()
    spec = attention_spec(model, kind)
    state = model.state_dict()
    planted = spec.random_permutations(seed=11)
    scrambled = permute_state(state, spec, planted)
    # the hand-written spec is function-preserving (including the GQA repeat layout)
    x = torch.randn(2, 5, 12)
    other = GQAttention().eval()
    other.load_state_dict(scrambled)
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), atol=1e-5, rtol=1e-5)
    result = weight_matching(spec, state, scrambled)
    restored = permute_state(scrambled, spec, result.perms)
    assert all(torch.equal(restored[k], state[k]) for k in state)
    # two unrelated models: the answer still respects the head structure
    unrelated = GQAttention().state_dict()
    perms = weight_matching(spec, state, unrelated).perms
    d = model.d
    for perm in perms.values():
        blocks = perm.view(-1, d)
        heads = blocks // d
        assert (heads == heads[:, :1]).all()  # each new head takes one old head
        assert sorted(heads[:, 0].tolist()) == list(range(blocks.shape[0]))
        if kind == "heads":
            assert torch.equal(blocks % d, torch.arange(d).expand_as(blocks))


# ------------------------------------------------------------------------------- outer layouts
@pytest.mark.parametrize("outer, repeat, inner", [(3, 1, 1), (3, 2, 1), (2, 1, 4), (2, 2, 3)])
def test_outer_blocks_follow_one_permutation_in_every_engine(outer, repeat, inner):
    """An axis of `outer` blocks (fused Q/K/V): spec indexing, unit rows, OT maps and ZipIt maps agree."""
    kv, hd, rest = 2, 3, 5
    size = kv * hd
    group = PermGroup("g", size, kind="heads_within", head_dim=hd)
    member = Member("w", 1, "out", repeat=repeat, inner=inner, outer=outer)
    t = torch.randn(rest, outer * size * repeat * inner, generator=torch.Generator().manual_seed(0))
    spec = PermutationSpec()
    spec.add(PermGroup("g", size, [member], kind="heads_within", head_dim=hd))
    spec.validate({"w": t.shape})
    with pytest.raises(ValueError, match="outer"):
        spec.validate({"w": (rest, size * repeat * inner)})
    perm = group.random_permutation(torch.Generator().manual_seed(1))
    assert not torch.equal(perm, torch.arange(size))

    # reference: the axis viewed as (outer, kv_head, repeat, head_dim, inner); new (o, h, r, d, i) <- old
    # (o, old_head[h], r, within[h, d], i) in every block o alike
    view = t.reshape(rest, outer, kv, repeat, hd, inner)
    old_head = (perm.view(kv, hd)[:, 0] // hd)[:, None]
    within = perm.view(kv, hd) % hd
    expected = view[:, :, old_head, :, within, :]  # advanced indices in front: (kv, hd, rest, outer, repeat, inner)
    expected = expected.permute(2, 3, 0, 4, 1, 5).reshape(t.shape)
    idx = expand_index(perm, member, hd)
    assert torch.equal(torch.index_select(t, 1, idx), expected)
    assert torch.equal(permute_state({"w": t}, spec, {"g": perm})["w"], expected)

    # unit_matrix: row u gathers every entry unit u owns, in every outer block
    rows = unit_matrix(t, member, hd)
    assert rows.shape == (size, rest * outer * repeat * inner)
    for u in (0, size - 1):
        h, d = divmod(u, hd)
        owned = view[:, :, h, :, d, :]
        assert sorted(rows[u].tolist()) == sorted(owned.reshape(-1).tolist())
    # permuting the axis permutes the unit rows
    assert torch.equal(unit_matrix(expected, member, hd), rows[perm])

    # OT's map_axis with the permutation's 0/1 matrix is the same move; summaries are permutation-invariant
    onehot = torch.zeros(size, size, dtype=torch.float64)
    onehot[perm, torch.arange(size)] = 1.0  # new unit j <- old unit perm[j]
    torch.testing.assert_close(map_axis(t, member, hd, onehot), expected, atol=0, rtol=0)
    torch.testing.assert_close(_sum_units(expected, member), _sum_units(t, member), atol=1e-5, rtol=0)
    assert _sum_units(t, member).shape[1] == outer * (1 if repeat > 1 else inner)
    if repeat == 1:  # ZipIt maps free groups (no GQA repeat) through apply_units
        torch.testing.assert_close(apply_units(t, 1, inner, onehot.T, outer), expected, atol=0, rtol=0)
        with pytest.raises(AlignmentError, match="block"):
            apply_units(t, 1, inner, onehot.T, outer + 1)


# ------------------------------------------------------------------------------------- errors
def test_errors_name_the_tensor():
    a, b = MLP(widths=(12, 32, 5)), MLP(widths=(12, 40, 5))
    spec = spec_from_module(a, torch.randn(2, 12))
    with pytest.raises(AlignmentError, match="layers.0.weight"):
        weight_matching(spec, a.state_dict(), b.state_dict())
    renamed = {"model." + k: v for k, v in a.state_dict().items()}
    with pytest.raises(AlignmentError, match="prefix"):
        weight_matching(spec, renamed, renamed)
    with pytest.raises(AlignmentError, match="init_perms"):
        weight_matching(spec, a.state_dict(), a.state_dict(), init_perms={"layers.0": torch.zeros(32, dtype=torch.long)})


# -------------------------------------------------------------------------------------- digits
def _digits():
    from sklearn.datasets import load_digits

    ds = load_digits()
    x = torch.tensor(ds.data, dtype=torch.float32) / 16.0
    y = torch.tensor(ds.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    test, train = perm[:360], perm[360:]
    return x[train], y[train], x[test], y[test]


def _train(seed, x, y, epochs):
    torch.manual_seed(seed)
    model = MLP(widths=(64, 512, 512, 512, 10))
    train(model, CalibrationData(x, y), epochs, seed=seed)  # the library's seeded Adam loop, batch 64
    return model.eval()


@torch.no_grad()
def _evaluate(model, state, x, y):
    model.load_state_dict(state)
    logits = model(x)
    return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


def test_digits_mlps_weight_matching_removes_the_barrier():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: one thread is faster and reproducible on a shared machine
    try:
        xtr, ytr, xte, yte = _digits()
        a, b = _train(1, xtr, ytr, epochs=20), _train(2, xtr, ytr, epochs=20)
        spec = spec_from_module(a, xtr[:2])
        assert [g.size for g in spec.active_groups()] == [512, 512, 512]
        sa, sb = a.state_dict(), b.state_dict()
        start = time.perf_counter()
        result = weight_matching(spec, sa, sb)
        elapsed = time.perf_counter() - start
        sb_aligned = permute_state(sb, spec, result.perms)
        probe = MLP(widths=(64, 512, 512, 512, 10)).eval()
        acc_a, loss_a = _evaluate(probe, sa, xte, yte)
        acc_b, loss_b = _evaluate(probe, sb, xte, yte)
        aligned_b = _evaluate(probe, sb_aligned, xte, yte)  # permuting B alone changes nothing
        naive_acc, naive_loss = _evaluate(probe, {k: 0.5 * (sa[k] + sb[k]) for k in sa}, xte, yte)
        aligned_acc, aligned_loss = _evaluate(probe, {k: 0.5 * (sa[k] + sb_aligned[k]) for k in sa}, xte, yte)
    finally:
        torch.set_num_threads(threads)
    naive_barrier = naive_loss - 0.5 * (loss_a + loss_b)
    aligned_barrier = aligned_loss - 0.5 * (loss_a + loss_b)
    print(
        f"\ndigits 64-512x3-10, 20 epochs: endpoints acc {acc_a:.3f}/{acc_b:.3f}; midpoint naive acc {naive_acc:.3f} "
        f"(loss barrier {naive_barrier:.3f}), aligned acc {aligned_acc:.3f} (loss barrier {aligned_barrier:.3f}); "
        f"weight matching {elapsed:.2f}s wall, {result.iterations} passes, LAP {result.lap_time:.2f}s, "
        f"cosine {result.stats['cosine_before']:.3f} -> {result.stats['cosine_after']:.3f}"
    )
    assert aligned_b[0] == acc_b and aligned_b[1] == pytest.approx(loss_b, rel=1e-5)
    assert min(acc_a, acc_b) > 0.94
    assert naive_barrier > 0.3 and aligned_barrier < 0.1
    assert aligned_acc > naive_acc + 0.02
    assert aligned_acc > min(acc_a, acc_b) - 0.03
    assert result.converged and elapsed < 10.0  # under 1 s of CPU time; wall time depends on machine load


# ------------------------------------------------------------------------------- streamed stores
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_file_stores_are_streamed_and_match_as_state_dicts_do(tmp_path, dtype):
    """Stores that read safetensors files are streamed (each group re-reads its tensors in their stored dtype,
    nothing held for the pair) and give the same permutations as the same tensors held in memory."""
    from safetensors.torch import save_file

    from suture.merge.align.weight_matching import WeightCosts, reads_fresh_copies
    from suture.merge.store import open_store

    torch.manual_seed(0)
    model = _randomize(TinyLM()).eval()
    spec = spec_from_module(model, torch.randint(0, 50, (2, 7)))
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    scrambled = permute_state(state, spec, spec.random_permutations(seed=5))
    stores = {}
    for side, tensors in (("a", state), ("b", scrambled)):
        (tmp_path / side).mkdir()
        # tied tensors share storage in the module: the file holds a copy of each name
        save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(tmp_path / side / "model.safetensors"))
        stores[side] = open_store(tmp_path / side)
    assert reads_fresh_copies(stores["a"]) and reads_fresh_copies(stores["b"])
    costs = WeightCosts(spec, stores["a"], stores["b"], torch.device("cpu"))
    assert costs._stream == {"a": True, "b": True}
    assert all(costs.stored(side, n).dtype == dtype for side in "ab" for n in costs.names)  # fp32 only inside a product
    assert costs.tensor_a(costs.names[0]).dtype == torch.float32
    streamed = weight_matching(spec, stores["a"], stores["b"])
    in_memory = weight_matching(spec, state, scrambled)
    assert set(streamed.perms) == set(in_memory.perms)
    for group, perm in in_memory.perms.items():
        assert torch.equal(streamed.perms[group], perm), group
    restored = permute_state(scrambled, spec, streamed.perms)
    assert all(torch.equal(restored[k], state[k]) for k in state)
