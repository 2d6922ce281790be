"""Attention heads in traced user modules: the reshape into heads gives one heads_within Q/K/V/O group.

Every check is against the module itself: a permutation drawn from the derived spec must leave outputs unchanged,
a free (unstructured) permutation of the same group must change them, weight matching must undo a planted
permutation, and `suture run` must align a permuted copy back onto its original.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from suture.merge.align.activation_matching import activation_matching
from suture.merge.align.weight_matching import weight_matching
from suture.merge.graph.trace import spec_from_module
from suture.merge.spec import PermutationSpec, permute_state
from tests._user_attention import Attention, TinyTransformer
from tests.test_trace_spec import _members, _randomize, assert_invariant

ROOT = Path(__file__).parents[1]
STYLES = ["separate", "fused", "chunk", "sdpa", "einsum"]
X = torch.randn(3, 7, 6, generator=torch.Generator().manual_seed(0))


def _model(style: str = "separate", **kw) -> TinyTransformer:
    torch.manual_seed(0)
    return _randomize(TinyTransformer(style=style, **kw))


def _outputs_after(model: nn.Module, spec: PermutationSpec, perms: dict) -> torch.Tensor:
    other = copy.deepcopy(model)
    other.load_state_dict(permute_state(model.state_dict(), spec, perms))
    with torch.no_grad():
        return other.eval()(X)


@pytest.mark.parametrize("style", STYLES)
def test_heads_within_group_keeps_outputs(style):
    model = _model(style)
    spec = spec_from_module(model, X)
    fused = style in ("fused", "chunk")
    for i in range(2):
        a = f"blocks.{i}.attn."
        group = spec.groups[a + ("qkv" if fused else "q")]
        assert (group.kind, group.size, group.head_dim, group.frozen) == ("heads_within", 32, 8, False)
        rows = {a + "qkv.weight[0]", a + "qkv.bias[0]"} if fused else {
            f"{a}{p}.{t}[0]" for p in "qkv" for t in ("weight", "bias")}
        assert _members(spec, group.name) == rows | {a + "out.weight[1]"}
        assert {m.outer for m in group.members if m.role == "out"} == {3 if fused else 1}
        assert [m.tensor for m in group.members if m.role == "in"] == [a + "out.weight"]
    assert not any(g.frozen for g in spec)
    assert_invariant(model, X, spec, min_active=5)


@pytest.mark.parametrize("style", ["separate", "fused"])
def test_free_permutation_of_the_heads_group_changes_outputs(style):
    """The structure is necessary: permuting the same axes without respecting heads breaks the model."""
    model = _model(style)
    spec = spec_from_module(model, X)
    name = "blocks.0.attn." + ("qkv" if style == "fused" else "q")
    perms = {name: torch.randperm(32, generator=torch.Generator().manual_seed(1))}
    with torch.no_grad():
        ref = model(X)
    assert not torch.allclose(_outputs_after(model, spec, perms), ref, atol=1e-3)


@pytest.mark.parametrize("style", ["separate", "fused", "sdpa"])
def test_weight_matching_recovers_planted_heads(style):
    model = _model(style)
    spec = spec_from_module(model, X)
    state = model.state_dict()
    planted = spec.random_permutations(seed=5)
    scrambled = permute_state(state, spec, planted)
    result = weight_matching(spec, state, scrambled)
    restored = permute_state(scrambled, spec, result.perms)
    for name in state:
        torch.testing.assert_close(restored[name], state[name], rtol=0, atol=0, msg=name)
    assert result.stats["cosine_before"] < 0.99


def _activation_matched(model: nn.Module, spec: PermutationSpec, planted: dict) -> dict:
    """Activation matching of `model` against its copy permuted by `planted`: asserts the answer restores the
    copy exactly, returns the permutations it found."""
    other = copy.deepcopy(model)
    other.load_state_dict(permute_state(model.state_dict(), spec, planted))
    batches = [(torch.randn(16, 7, 6, generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    result = activation_matching(spec, model, other.eval(), batches)
    assert not result.skipped
    restored = permute_state(other.state_dict(), spec, result.perms)
    for name, t in model.state_dict().items():
        torch.testing.assert_close(restored[name], t, rtol=0, atol=0, msg=name)
    return result.perms


def test_activation_matching_recovers_planted_heads():
    """Activation matching observes the heads group at the out projection's input and assigns whole heads."""
    model = _model("chunk")
    spec = spec_from_module(model, X)
    _activation_matched(model, spec, spec.random_permutations(seed=4))


# ------------------------------------------------------------------ patterns that restrict or freeze the group
def test_rotary_embedding_allows_whole_heads_only():
    model = _model()
    for block in model.blocks:
        block.attn = Rotary(32, 4)
    model = _randomize(model)
    spec = spec_from_module(model, X)
    group = spec.groups["blocks.0.attn.q"]
    assert (group.kind, group.head_dim, group.frozen) == ("heads", 8, False)
    assert any(n.startswith("blocks.0.attn.q: whole heads only") for n in spec.notes), spec.notes
    assert_invariant(model, X, spec, min_active=5)
    # a within-head permutation would break the rotation pairs
    forced = copy.deepcopy(spec)
    forced.groups["blocks.0.attn.q"].kind = "heads_within"
    with torch.no_grad():
        ref = model(X)
    perms = {"blocks.0.attn.q": forced.groups["blocks.0.attn.q"].random_permutation(torch.Generator().manual_seed(2))}
    assert not torch.allclose(_outputs_after(model, forced, perms), ref, atol=1e-4)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rotary(Attention):
    """RoPE-like rotation of q and k inside each head: pairs dims (i, i + D/2), so only whole heads may move."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__(width, heads)
        angles = torch.arange(16)[:, None] * 0.3 ** torch.arange(self.head_dim // 2)[None, :]
        self.register_buffer("cos", torch.cat([angles.cos()] * 2, -1), persistent=False)
        self.register_buffer("sin", torch.cat([angles.sin()] * 2, -1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        cos, sin = self.cos[:7], self.sin[:7]
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class QKNorm(Attention):
    """A LayerNorm over head_dim with one affine shared by every head: heads' dims must stay in order."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__(width, heads)
        self.qn = nn.LayerNorm(self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qn(self.split(self.q(x))), self.split(self.k(x)), self.split(self.v(x))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class SoftmaxOverHeads(Attention):
    """Normalises scores across heads, not tokens: outputs depend on values of other heads' dims."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        y = (q * v).softmax(dim=1) @ k.transpose(-2, -1) @ v / math.sqrt(self.head_dim)
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class MeanOverHeads(Attention):
    """Reads q's per-head features elsewhere: the mean over heads mixes differently permuted dims."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        y = F.scaled_dot_product_attention(q, k, v) + q.mean(dim=1, keepdim=True)
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class PerHeadBias(Attention):
    """An ALiBi-like per-head bias added to the scores: a tensor laid out along the heads."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__(width, heads)
        distance = torch.arange(16)[None, :] - torch.arange(16)[:, None]
        self.register_buffer("alibi", torch.linspace(0.1, 1, heads)[:, None, None] * distance, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        scores = (q @ k.transpose(-2, -1) + self.alibi[:, :7, :7]).softmax(-1)
        return self.out((scores @ v).transpose(1, 2).reshape(b, t, c))


@pytest.mark.parametrize("cls, why", [(QKNorm, "LayerNorm"), (SoftmaxOverHeads, "softmax over attention heads"),
                                      (MeanOverHeads, "mean"), (PerHeadBias, "laid out along them")],
                         ids=["qk-norm", "softmax-over-heads", "mean-over-heads", "per-head-bias"])
def test_mixing_across_heads_stays_frozen(cls, why):
    model = _model()
    for block in model.blocks:
        block.attn = cls(32, 4)
    model = _randomize(model)
    spec = spec_from_module(model, X)
    for i in range(2):
        group = spec.groups[f"blocks.{i}.attn.q"]
        assert group.frozen and why in group.frozen_reason, group.frozen_reason
    assert_invariant(model, X, spec, min_active=3)  # the residual stream and MLPs still move
    # the freeze is necessary: the same group unfrozen changes the outputs
    forced = copy.deepcopy(spec)
    forced.groups["blocks.0.attn.q"].frozen_reason = None
    forced.groups["blocks.0.attn.q"].kind = "heads_within"
    with torch.no_grad():
        ref = model(X)
    perms = forced.random_permutations(3)
    assert not torch.allclose(_outputs_after(model, forced, {"blocks.0.attn.q": perms["blocks.0.attn.q"]}), ref, atol=1e-4)


# ------------------------------------------------------------------ recipe end to end
def test_suture_run_aligns_a_permuted_user_transformer(tmp_path):
    """`suture run` with `architecture: {factory: ...}` undoes a planted permutation: the 50/50 merge is the original."""
    model = _model("fused")
    spec = spec_from_module(model, X)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    scrambled = permute_state(state, spec, spec.random_permutations(seed=9))
    for name, tensors in (("a", state), ("b", scrambled)):
        (tmp_path / name).mkdir()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / name / "model.safetensors"))
    recipe = {"merge_method": "linear",
              "architecture": {"factory": "tests._user_attention:tiny_transformer", "kwargs": {"style": "fused"}},
              "models": [{"model": str(tmp_path / n), "parameters": {"weight": 0.5}} for n in ("a", "b")],
              "alignment": {"engine": "weight_matching", "input_shape": [2, 7, 6]}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run = subprocess.run([sys.executable, "-m", "suture.recipes.cli", "run", "-q", str(tmp_path / "recipe.yaml"),
                          str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, tensor in state.items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-6, rtol=1e-6, msg=name)
    naive = {k: (state[k] + scrambled[k]) / 2 for k in state}
    assert any(not torch.allclose(naive[k], state[k], atol=1e-3) for k in state)  # alignment was needed


class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle: view into (groups, channels per group), transpose, flatten. Not attention:
    heads and dims trade places, so no head-structured permutation survives it and the group stays frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 12, 3, padding=1), nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x))
        b, c, hh, ww = h.shape
        h = h.view(b, 3, c // 3, hh, ww).transpose(1, 2).reshape(b, c, hh, ww)
        return self.fc(h.mean((2, 3)))


def test_channel_shuffle_split_is_not_mistaken_for_heads():
    torch.manual_seed(0)
    model = ChannelShuffle().eval()
    x = torch.randn(2, 3, 8, 8)
    group = spec_from_module(model, x).groups["conv"]
    assert group.frozen and "reshape across attention heads" in group.frozen_reason
    forced = copy.deepcopy(spec_from_module(model, x))
    forced.groups["conv"].frozen_reason = None
    other = copy.deepcopy(model)
    other.load_state_dict(permute_state(model.state_dict(), forced, forced.random_permutations(1)))
    with torch.no_grad():
        assert not torch.allclose(other(x), model(x), atol=1e-4)


# ------------------------------------------------------------------ Q/K and V/O parts of traced attention
def _split_draw(spec: PermutationSpec, seed: int) -> dict:
    """A 2-row draw in which every attention group's Q/K and V/O rows differ."""
    perms = spec.random_permutations(seed, split=True)
    for g in spec.active_groups():
        if g.kind != "free":
            assert g.split and perms[g.name].shape == (2, g.size), g.name
            assert not torch.equal(perms[g.name][0], perms[g.name][1])
    return perms


def _with_attention(cls: type) -> TinyTransformer:
    """The tiny transformer with every block's attention replaced by `cls`."""
    model = _model()
    for block in model.blocks:
        block.attn = cls(32, 4)
    return _randomize(model)


@pytest.mark.parametrize("style", STYLES + ["rotary"])
def test_split_permutations_keep_outputs(style):
    """q and k rows are Q/K, v rows and the out projection's columns V/O: separate within-head orders keep outputs."""
    model = _with_attention(Rotary) if style == "rotary" else _model(style)
    spec = spec_from_module(model, X)
    fused = style in ("fused", "chunk")
    a = "blocks.0.attn."
    group = spec.groups[a + ("qkv" if fused else "q")]
    parts = {m.tensor: m.parts for m in group.members}
    if fused:
        assert parts == {a + "qkv.weight": ("qk", "qk", "vo"), a + "qkv.bias": ("qk", "qk", "vo"), a + "out.weight": ("vo",)}
    else:
        assert parts == {**{f"{a}{p}.{t}": ("vo",) if p == "v" else ("qk",) for p in "qkv" for t in ("weight", "bias")},
                         a + "out.weight": ("vo",)}
    assert group.within_free() == ((style != "rotary"), True)
    with torch.no_grad():
        ref = model(X)
    for seed in (1, 2):
        perms = _split_draw(spec, seed)
        if style == "rotary":  # Q/K dimensions stay in order, V/O ones move
            d = torch.arange(32) % 8
            assert torch.equal(perms[group.name][0] % 8, d) and not torch.equal(perms[group.name][1] % 8, d)
        torch.testing.assert_close(_outputs_after(model, spec, perms), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("style", ["separate", "chunk"])
def test_wrong_part_breaks_outputs(style):
    """The parts matter: V rows marked Q/K (or Q rows marked V/O) change the outputs under the same draw."""
    model = _model(style)
    spec = spec_from_module(model, X)
    with torch.no_grad():
        ref = model(X)
    a = "blocks.0.attn."
    flip = {"qk": "vo", "vo": "qk"}
    for target in ((a + "v.weight", a + "v.bias") if style == "separate" else (a + "qkv.weight", a + "qkv.bias")):
        wrong = copy.deepcopy(spec)
        group = wrong.groups[a + ("q" if style == "separate" else "qkv")]
        group.members = [dataclasses.replace(m, parts=tuple(flip[p] for p in m.parts)) if m.tensor == target else m
                         for m in group.members]
        assert not torch.allclose(_outputs_after(model, wrong, _split_draw(wrong, 1)), ref, atol=1e-3), target


@pytest.mark.parametrize("style", ["separate", "fused", "einsum"])
def test_weight_matching_recovers_planted_split_permutation(style):
    model = _model(style)
    spec = spec_from_module(model, X)
    state = model.state_dict()
    scrambled = permute_state(state, spec, _split_draw(spec, 7))
    result = weight_matching(spec, state, scrambled)
    assert any(p.dim() == 2 for p in result.perms.values())  # the answer has separate Q/K and V/O rows
    restored = permute_state(scrambled, spec, result.perms)
    for name in state:
        torch.testing.assert_close(restored[name], state[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("style", ["separate", "fused", "sdpa"])
def test_activation_matching_recovers_planted_split_permutation(style):
    """Plain activation matching observes Q/K (q and k outputs) and V/O (v outputs, the out projection's input)
    apart, so separate within-head orders for the two parts are undone exactly."""
    model = _model(style)
    spec = spec_from_module(model, X)
    perms = _activation_matched(model, spec, _split_draw(spec, 3))
    for g in spec.active_groups():
        if g.kind != "free":
            assert perms[g.name].shape == (2, g.size), g.name  # the rows differ, as planted


def test_activation_matching_collapses_agreeing_rows():
    """A planted 1-D permutation of a split group comes back 1-D: both parts agree, so the rows collapse."""
    model = _model("separate")
    spec = spec_from_module(model, X)
    perms = _activation_matched(model, spec, spec.random_permutations(seed=6))
    assert spec.groups["blocks.0.attn.q"].split and perms["blocks.0.attn.q"].dim() == 1


class _Retied(Rotary):
    """Separate q/k/v Linears and SDPA, with `tie` rewriting (q, k, v) after the split into heads."""

    def tie(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        y = F.scaled_dot_product_attention(*self.tie(self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))))
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class SharedQV(_Retied):
    """q's projection also serves as the values: its rows are Q/K and V/O at once, so the parts stay unmarked."""

    def tie(self, q, k, v):
        return q, k, q


class GatedValues(_Retied):
    """The values are scaled by q elementwise: q's and v's orders are tied, so the parts stay unmarked."""

    def tie(self, q, k, v):
        return q, k, v * q.sigmoid()


class RotatedValues(_Retied):
    """The rotation also applied to the values: V/O dimensions must keep their order too."""

    def tie(self, q, k, v):
        cos, sin = self.cos[:7], self.sin[:7]
        return tuple(z * cos + _rotate_half(z) * sin for z in (q, k, v))


@pytest.mark.parametrize("cls", [SharedQV, GatedValues, RotatedValues])
def test_unsure_parts_stay_unmarked(cls):
    """Where Q/K and V/O orders are tied the group takes one order (and that is necessary: split, it breaks)."""
    model = _with_attention(cls)
    spec = spec_from_module(model, X)
    group = spec.groups["blocks.0.attn.q"]
    assert not group.frozen and not group.split and not any(m.parts for m in group.members)
    assert_invariant(model, X, spec, min_active=5)
    # marking the parts the way the plain style would is wrong here
    forced = copy.deepcopy(spec)
    g = forced.groups["blocks.0.attn.q"]
    g.members = [dataclasses.replace(m, parts=("qk",) if m.tensor.split(".")[-2] in "qk" else ("vo",)) for m in g.members]
    with torch.no_grad():
        ref = model(X)
    perms = {g.name: g.random_permutation(torch.Generator().manual_seed(3), split=True)}
    assert not torch.allclose(_outputs_after(model, forced, perms), ref, atol=1e-4)
