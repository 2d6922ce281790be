"""CCA Merge (Horoi et al., 2024): canonical correlations against scipy's principal angles, an invertible linear
re-parametrisation of hidden units undone exactly, transformers' MLP blocks, and the digits demo pair merged
from a recipe with a lower midpoint loss than plain averaging.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import save_file

from suture.merge import zoo
from suture.merge.activations import FeatureStats
from suture.merge.align.cca import (
    CCAResult,
    HeadMaps,
    attention_parts,
    cca_align,
    cca_maps,
    cca_state,
    linear_groups,
    reader_taps,
)
from suture.merge.data import iter_batches, load_dataset
from suture.merge.errors import SutureError
from suture.merge.graph.trace import trace_module
from suture.merge.spec import permute_state
from suture.merge.store import open_store
from suture.recipes.runner import run_recipe

WIDTHS = (64, 48, 32, 10)


def test_canonical_correlations_are_the_cosines_of_scipys_principal_angles():
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(2000, 4, generator=g, dtype=torch.float64)
    xa = torch.cat([shared, torch.randn(2000, 4, generator=g, dtype=torch.float64)], 1) @ torch.randn(8, 8, generator=g, dtype=torch.float64)
    xb = torch.cat([shared + 0.5 * torch.randn(2000, 4, generator=g, dtype=torch.float64),
                    torch.randn(2000, 4, generator=g, dtype=torch.float64)], 1) @ torch.randn(8, 8, generator=g, dtype=torch.float64)
    xa, xb = xa + 3.0, xb - 1.0  # CCA centres; the reference gets centred data
    stats = FeatureStats(8, self_stats=True)
    for rows in torch.split(torch.arange(2000), 300):
        stats.update(xa[rows], xb[rows])
    t, t_inv, rho = cca_maps(stats, reg=1e-12)
    angles = scipy.linalg.subspace_angles((xa - xa.mean(0)).numpy(), (xb - xb.mean(0)).numpy())
    np.testing.assert_allclose(np.sort(rho.numpy())[::-1], np.sort(np.cos(angles))[::-1], atol=1e-8)
    torch.testing.assert_close(t @ t_inv, torch.eye(8, dtype=torch.float64), atol=1e-8, rtol=0)
    # T carries B's canonical variables onto A's: centred X_B T has A's covariance with X_A in canonical form
    ca, cb = xa - xa.mean(0), xb - xb.mean(0)
    mapped = cb @ t
    assert torch.linalg.norm(mapped - ca) < torch.linalg.norm(cb - ca)


def _reparametrised(a: torch.nn.Module, spec, seed: int) -> dict[str, torch.Tensor]:
    """A's weights with every hidden layer's units permuted and positively scaled (the same function)."""
    state = permute_state(a.state_dict(), spec, spec.random_permutations(seed))
    g = torch.Generator().manual_seed(seed)
    for i in range(len(WIDTHS) - 2):
        scale = torch.empty(WIDTHS[i + 1], dtype=torch.float64).uniform_(0.3, 3.0, generator=g).float()
        state[f"layers.{i}.weight"] = state[f"layers.{i}.weight"] * scale[:, None]
        state[f"layers.{i}.bias"] = state[f"layers.{i}.bias"] * scale
        state[f"layers.{i + 1}.weight"] = state[f"layers.{i + 1}.weight"] / scale[None, :]
    return state


def test_cca_undoes_permuted_and_scaled_hidden_units():
    a = zoo.build_seeded("suture.merge.zoo:mlp", 0, widths=WIDTHS).eval()
    calib, test = load_dataset("sklearn:digits", split="train"), load_dataset("sklearn:digits")
    traced = trace_module(a, calib.inputs[:2])
    b = zoo.mlp(WIDTHS).eval()
    b.load_state_dict(_reparametrised(a, traced.spec, seed=3))
    x = test.inputs
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), atol=1e-5, rtol=1e-5)  # the same function, other weights
        naive = zoo.mlp(WIDTHS).eval()
        naive.load_state_dict({k: (v + b.state_dict()[k]) / 2 for k, v in a.state_dict().items()})
        assert (naive(x) - a(x)).abs().max() > 0.1  # plain averaging does not give A back

    result = cca_align(traced.spec, a, b, (x for x, _ in iter_batches(calib, 256)), traced.taps, reg=1e-9)
    aligned = cca_state(traced.spec, b.state_dict(), result)
    assert min(float(r.min()) for r in result.correlations.values()) > 0.99
    # the first hidden layer has no dead unit: its transported weights are A's own
    torch.testing.assert_close(aligned["layers.0.weight"], a.state_dict()["layers.0.weight"], atol=1e-4, rtol=1e-4)
    merged = zoo.mlp(WIDTHS).eval()
    merged.load_state_dict({k: (v + aligned[k]) / 2 for k, v in a.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(merged(x), a(x), atol=1e-4, rtol=1e-4)  # held-out inputs, not the calibration set


def test_linear_groups_leave_norms_and_heads_alone():
    import transformers as T

    from suture.merge.derive import derive_spec
    from suture.merge.store import DictStore

    model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    store = DictStore(dict(model.state_dict()), source="gpt2", config={**model.config.to_dict(), "architectures": ["GPT2LMHeadModel"]})
    spec, _ = derive_spec(store)
    ok, why = linear_groups(spec, model)
    assert [g.name for g in ok] == ["layer0.mlp", "layer1.mlp"]
    assert "LayerNorm" in why["residual"] and "heads" in why["layer0.attn"]


def _invertible(d: int, g: torch.Generator) -> torch.Tensor:
    """A random well-conditioned invertible (d, d) map: rotation x scales in [0.5, 2] x rotation."""
    q1, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q1 @ torch.diag(torch.empty(d, dtype=torch.float64).uniform_(0.5, 2.0, generator=g)) @ q2


def _head_transformed(spec, model, state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """`state` with every attention group's V/O and Q/K spaces re-parametrised per head by random invertible maps."""
    g = torch.Generator().manual_seed(seed)
    heads = {}
    for group in spec.active_groups():
        if group.kind == "free":
            continue
        d, n = group.head_dim, group.size
        vo = [_invertible(d, g) for _ in range(n // d)]
        qk = [_invertible(d, g) for _ in range(n // d)]
        heads[group.name] = HeadMaps(torch.arange(n), (torch.block_diag(*vo), torch.block_diag(*(torch.linalg.inv(m) for m in vo))),
                                     (torch.block_diag(*qk), torch.block_diag(*(torch.linalg.inv(m) for m in qk))),
                                     attention_parts(group, model))
    eye = {g_.name: torch.eye(g_.size, dtype=torch.float64) for g_ in spec}
    return cca_state(spec, state, CCAResult(out_maps=eye, in_maps=eye, heads=heads))


def _logits(model, state: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}  # tied
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_cca_undoes_permuted_heads_and_within_head_linear_maps_from_a_recipe(tmp_path, family):
    """A GPT-2 / BERT folder and a copy of the same function whose MLP units and heads are permuted and whose
    heads' V/O and Q/K spaces are mixed by random invertible maps: CCA gives the original weights back."""
    from tests.test_engines_foreign import CONFIGS, _save_tokenizer, _texts

    from suture.merge.derive import derive_spec

    torch.manual_seed(0)
    model = CONFIGS[family]().eval()
    a, b = tmp_path / "a", tmp_path / "b"
    model.save_pretrained(a)
    _save_tokenizer(a)
    store = open_store(a)
    spec, _ = derive_spec(store)
    perms = spec.random_permutations(5)  # the residual stream too
    state_a = {k: v.double() for k, v in store.state_dict().items()}
    state_b = permute_state(_head_transformed(spec, model, state_a, seed=7), spec, perms)
    ids = torch.randint(2, 99, (3, 12), generator=torch.Generator().manual_seed(2))
    check = CONFIGS[family]().double().eval()
    torch.testing.assert_close(_logits(check, state_b, ids), _logits(check, state_a, ids), atol=1e-9, rtol=1e-9)  # same function
    assert (state_b[next(m.tensor for m in spec.groups["layer0.attn"].members)] - state_a[next(
        m.tensor for m in spec.groups["layer0.attn"].members)]).abs().max() > 0.1  # other weights
    b.mkdir()
    save_file({k: v.float().contiguous() for k, v in state_b.items()}, str(b / "model.safetensors"))
    (b / "config.json").write_text((a / "config.json").read_text())
    _save_tokenizer(b)
    data = _texts(tmp_path / "lines.txt", n=80)  # ~500 tokens for 128 MLP units
    recipe = {"merge_method": "linear",
              "models": [{"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}],
              "alignment": {"engine": "cca", "data": str(data), "reg": 1e-9}}
    result = run_recipe(recipe, tmp_path / "out")
    merged = open_store(result.out_dir)
    for name in store.names():
        torch.testing.assert_close(merged.get(name).float(), store.get(name).float(), atol=1e-4, rtol=1e-4, msg=name)
    summary = result.report["alignment"]["models"][str(b)]
    assert set(summary["mean_canonical_correlation"]) == {"layer0.mlp", "layer1.mlp", "layer0.attn", "layer1.attn"}
    assert set(summary["permuted"]) == {"residual"} and "skipped" not in summary


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_cca_attention_maps_reparametrise_b(family):
    """Aligned to an unrelated model, B's attention maps (head pairing, V/O and Q/K maps) and residual permutation
    leave B's function as it was; only the MLP maps (through the activation) and the merge change it. Llama
    (RoPE, grouped-query attention) pairs KV heads and maps V/O only."""
    from tests.test_engines_foreign import CONFIGS

    from suture.merge.align.transformer_match import transformer_sites
    from suture.merge.derive import derive_spec
    from suture.merge.store import DictStore

    torch.manual_seed(0)
    a = CONFIGS[family]().eval()
    torch.manual_seed(1)
    b = CONFIGS[family]().eval()
    config = {**a.config.to_dict(), "architectures": [type(a).__name__]}
    spec, _ = derive_spec(DictStore(dict(a.state_dict()), source=family, config=config))
    ids = torch.randint(2, 99, (16, 16), generator=torch.Generator().manual_seed(3))
    stream = {"residual": transformer_sites(spec, a)["residual"]["stream"]}
    result = cca_align(spec, a, b, [{"input_ids": ids[i:i + 4]} for i in range(0, 16, 4)], reader_taps(spec, a), reg=0.1,
                       permute=stream)
    assert set(result.heads) == {"layer0.attn", "layer1.attn"} and set(result.perms) == {"residual"}
    assert not torch.equal(result.perms["residual"], torch.arange(spec.groups["residual"].size))
    if family != "llama":  # 2 KV heads there: the pairing may keep them in order
        assert any(not torch.equal(h.perm, torch.arange(h.perm.numel())) for h in result.heads.values())
    assert all((h.qk is None) == (family == "llama") for h in result.heads.values())
    for g in spec:
        if g.kind == "free":
            result.out_maps[g.name] = result.in_maps[g.name] = torch.eye(g.size, dtype=torch.float64)
    state_b = {k: v.double() for k, v in b.state_dict().items()}
    aligned = cca_state(spec, state_b, result)
    for part in {"v", "o"} if family == "llama" else {"q", "k", "v", "o"}:  # every mapped part really moved
        attn = next(t for t, p in result.heads["layer0.attn"].parts.items() if p in (part, "qkv") and t.endswith("weight"))
        assert (aligned[attn] - permute_state(state_b, spec, result.perms)[attn]).abs().max() > 0.05, attn
    check = CONFIGS[family]().double().eval()
    # llama's RMSNorm computes in float32 even in a float64 model: 1e-5, where a wrong map moves logits by O(1)
    torch.testing.assert_close(_logits(check, aligned, ids), _logits(check, state_b, ids), atol=1e-5, rtol=1e-5)


def test_cca_recipe_on_the_digits_demo_pair_beats_plain_averaging(tmp_path, demo_cache):
    recipe = {"merge_method": "linear",
              "models": [{"model": "demo:mlp-seed1", "parameters": {"weight": 0.5}}, {"model": "demo:mlp-seed2", "parameters": {"weight": 0.5}}],
              "alignment": {"engine": "cca", "data": "sklearn:digits"},
              "evaluate": {"data": "sklearn:digits", "points": 3, "plot": False}}
    result = run_recipe(recipe, tmp_path / "out")
    ev = result.report["evaluation"]
    ends = sum(m["loss"] for m in ev["models"].values()) / 2
    naive_mid = ev["curves"]["naive"][1]["loss"]
    # the merge against the inputs' own mean loss (the aligned path ends at B mapped by CCA, not at B itself)
    cca_excess, naive_excess = ev["merged"]["loss"] - ends, naive_mid - ends
    assert naive_excess > 0.3, ev["curves"]["naive"]
    assert cca_excess < 0.25 * naive_excess, (cca_excess, naive_excess)
    assert ev["merged"]["accuracy"] > ev["curves"]["naive"][1]["accuracy"]
    correlations = result.report["alignment"]["models"]["demo:mlp-seed2"]["mean_canonical_correlation"]
    assert set(correlations) == {"layers.0", "layers.1", "layers.2"} and all(0.0 < c <= 1.0 for c in correlations.values())


@pytest.mark.parametrize("alignment, pattern", [
    ({"engine": "cca", "reg": 0}, r"^alignment\.reg( \(line \d+\))?: Input should be greater than 0"),
    ({"engine": "cca", "max_iter": 3}, r"do not apply to engine 'cca'"),
    ({"engine": "cca"}, r"CCA needs calibration data"),
])
def test_cca_recipe_errors_are_one_line(tmp_path, alignment, pattern):
    folders = [zoo.save_module(zoo.build_seeded("suture.merge.zoo:mlp", seed, widths=WIDTHS), tmp_path / f"m{seed}",
                               "suture.merge.zoo:mlp") for seed in (0, 1)]
    recipe = {"merge_method": "linear", "models": [{"model": str(f), "parameters": {"weight": 0.5}} for f in folders],
              "alignment": alignment}
    with pytest.raises(SutureError, match=pattern) as err:
        run_recipe(recipe, tmp_path / "out")
    assert "\n" not in str(err.value)


def test_cca_on_a_cnn_maps_conv_channels_and_leaves_batchnorm_groups():
    from tests._user_models import small_cnn

    torch.manual_seed(0)
    a = small_cnn().eval()
    x = torch.randn(256, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    traced = trace_module(a, x[:2])
    perms = {name: (p if name == "mid" else torch.arange(len(p))) for name, p in traced.spec.random_permutations(1).items()}
    b = small_cnn().eval()
    b.load_state_dict(permute_state(a.state_dict(), traced.spec, perms))
    result = cca_align(traced.spec, a, b, [x], traced.taps, reg=1e-9)
    assert "BatchNorm2d" in result.skipped["z_stem"] and set(result.correlations) == {"mid"}
    aligned = cca_state(traced.spec, b.state_dict(), result)
    torch.testing.assert_close(aligned["mid.weight"], a.state_dict()["mid.weight"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(aligned["a_head.weight"], a.state_dict()["a_head.weight"], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ attention parts from the members' marks
@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_attention_parts_do_not_depend_on_member_order(family):
    """The Q/K and V/O marks, not member order, say which layer is V and which O: with every attention group's
    members reversed, random per-head maps still keep B's logits (the old order-based reading mapped V as Q)."""
    import dataclasses

    from tests.test_engines_foreign import CONFIGS

    from suture.merge.derive import derive_spec
    from suture.merge.store import DictStore

    torch.manual_seed(0)
    model = CONFIGS[family]().double().eval()
    config = {**model.config.to_dict(), "architectures": [type(model).__name__]}
    spec, _ = derive_spec(DictStore(dict(model.state_dict()), source=family, config=config))
    reversed_spec = dataclasses.replace(spec, groups={
        k: dataclasses.replace(g, members=g.members[::-1]) if g.kind != "free" else g for k, g in spec.groups.items()})
    for name, group in reversed_spec.groups.items():
        if group.kind != "free":
            before, after = attention_parts(spec.groups[name], model), attention_parts(group, model)
            assert {t: p for t, p in after.items() if p in "vo"} == {t: p for t, p in before.items() if p in "vo"}
            assert {t for t, p in after.items() if set(p) & set("qk")} == {t for t, p in before.items() if set(p) & set("qk")}
    state = {k: v.clone() for k, v in model.state_dict().items()}  # _logits loads into the model
    moved = _head_transformed(reversed_spec, model, state, seed=3)
    ids = torch.randint(2, 99, (3, 12), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_logits(model, moved, ids), _logits(model, state, ids), atol=1e-6, rtol=1e-6)
    attn = next(m.tensor for m in spec.groups["layer0.attn"].members if m.role == "in")
    assert (moved[attn] - state[attn]).abs().max() > 0.05  # the maps really moved O's columns


def _v_first(width: int, heads: int):
    """A fused Q/K/V layer whose blocks are stored V, Q, K (unbound in that order)."""
    from tests._user_attention import Attention

    class VFirst(Attention):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, c = x.shape
            v, q, k = self.qkv(x).reshape(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return self.out(y.transpose(1, 2).reshape(b, t, c))

    return VFirst(width, heads, style="fused")


@pytest.mark.parametrize("style", ["separate", "chunk", "v-first"])
def test_cca_maps_on_traced_attention_follow_the_traced_parts(style):
    """Traced user attention: the tracer's parts name Q, K, V and O (a fused layer stored V, Q, K included), and
    per-head maps by those parts keep the module's outputs."""
    from tests._user_attention import TinyTransformer
    from tests.test_trace_spec import _randomize

    torch.manual_seed(0)
    model = TinyTransformer(style="fused" if style == "v-first" else style)
    if style == "v-first":
        for block in model.blocks:
            block.attn = _v_first(32, 4)
    model = _randomize(model).double()
    x = torch.randn(3, 7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    spec = trace_module(model, x).spec
    group = spec.groups["blocks.0.attn." + ("q" if style == "separate" else "qkv")]
    parts = attention_parts(group, model)
    a = "blocks.0.attn."
    expected = {"separate": {a + "q.weight": "q", a + "k.weight": "k", a + "v.weight": "v"},
                "chunk": {a + "qkv.weight": "qkv"}, "v-first": {a + "qkv.weight": "vqk"}}[style]
    assert {t: p for t, p in parts.items() if t in expected} == expected and parts[a + "out.weight"] == "o"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    moved = _head_transformed(spec, model, state, seed=4)
    with torch.no_grad():
        ref = model(x)
        model.load_state_dict(moved)
        torch.testing.assert_close(model(x), ref, atol=1e-9, rtol=1e-9)
    assert (moved[a + "out.weight"] - state[a + "out.weight"]).abs().max() > 0.05


def test_attention_without_parts_is_left_as_it_is():
    """Where the tracer cannot tell Q/K from V/O (q's projection also gives the values) no map per side is exact."""
    from tests._user_attention import TinyTransformer
    from tests.test_trace_attention import SharedQV

    model = TinyTransformer()
    for block in model.blocks:
        block.attn = SharedQV(32, 4)
    spec = trace_module(model.eval(), torch.randn(2, 7, 6)).spec
    why = attention_parts(spec.groups["blocks.0.attn.q"], model)
    assert isinstance(why, str) and "Q/K" in why


@pytest.mark.parametrize("style", ["separate", "chunk"])
def test_cca_aligns_traced_attention_and_keeps_b_exactly(style):
    """cca_align on two unrelated traced user transformers: the attention groups get head maps observed at the
    traced parts' layers, and B mapped by them (MLP groups left as identity) computes what B computed."""
    import copy

    from tests._user_attention import TinyTransformer
    from tests.test_trace_spec import _randomize

    torch.manual_seed(0)
    a = _randomize(TinyTransformer(style=style)).double()
    torch.manual_seed(1)
    b = _randomize(TinyTransformer(style=style)).double()
    x = torch.randn(64, 7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    traced = trace_module(a, x[:2])
    result = cca_align(traced.spec, a, b, [(x[i:i + 16],) for i in range(0, 64, 16)], traced.taps, reg=0.1)
    assert len(result.heads) == 2 and all(h.qk is not None for h in result.heads.values())
    for g in traced.spec:
        if g.kind == "free":
            result.out_maps[g.name] = result.in_maps[g.name] = torch.eye(g.size, dtype=torch.float64)
    state_b = {k: v.clone() for k, v in b.state_dict().items()}
    aligned = cca_state(traced.spec, state_b, result)
    assert max(float((aligned[k] - state_b[k]).abs().max()) for k in state_b) > 0.1
    moved = copy.deepcopy(b)
    moved.load_state_dict(aligned)
    with torch.no_grad():
        torch.testing.assert_close(moved(x), b(x), atol=1e-9, rtol=1e-9)
