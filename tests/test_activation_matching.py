"""Activation statistics and activation matching: exact planted recovery, structure, streaming statistics."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from suture.merge.activations import FeatureStats, collect_stats, group_taps, unit_features
from suture.merge.align.activation_matching import activation_matching
from suture.merge.align.weight_matching import weight_matching
from suture.merge.data import CalibrationData
from suture.merge.errors import AlignmentError, InputError
from suture.merge.graph.trace import Tap, spec_from_module
from suture.merge.demo import train
from suture.merge.spec import permute_state
from tests.test_trace_spec import CNN, MLP, ResNet, SwiGLU, TinyLM
from tests.test_weight_matching import GQAttention, attention_spec


def _scrambled(model: nn.Module, spec, seed: int = 7) -> nn.Module:
    other = copy.deepcopy(model)
    other.load_state_dict(permute_state(model.state_dict(), spec, spec.random_permutations(seed)))
    return other.eval()


@pytest.mark.parametrize(
    "factory, data",
    [
        (lambda: MLP(widths=(12, 48, 48, 5)), lambda: torch.randn(96, 12)),
        (lambda: ResNet(), lambda: torch.randn(24, 3, 16, 16)),
        (lambda: SwiGLU(), lambda: torch.randn(96, 10)),
        (lambda: TinyLM(), lambda: torch.randint(0, 50, (24, 7))),
    ],
    ids=["mlp", "resnet", "swiglu", "tied-lm"],
)
def test_recovers_planted_permutation_bit_for_bit(factory, data):
    torch.manual_seed(0)
    model = factory().eval()
    x = data()
    spec = spec_from_module(model, x[:2])
    other = _scrambled(model, spec)
    calls = []
    batches = [(x[:8], None), (x[8:],)]  # (inputs, labels)-style batches feed only the inputs
    result = activation_matching(spec, model, other, batches, progress=lambda i, v: calls.append(i))
    assert result.stats["constant_units"] == 0  # otherwise some matches would be arbitrary
    assert not result.skipped
    restored = permute_state(other.state_dict(), spec, result.perms)
    for name, t in model.state_dict().items():
        assert torch.equal(restored[name], t), name
    assert result.stats["mean_corr_after"] == pytest.approx(1.0, abs=1e-6)
    assert result.stats["mean_corr_before"] < 0.9
    assert calls[:2] == [1, 2] and set(result.group_time) == {g.name for g in spec.active_groups()}


@pytest.mark.parametrize("kind", ["heads", "heads_within"])
def test_structured_groups_with_explicit_taps(kind):
    torch.manual_seed(0)
    model = GQAttention().eval()
    spec = attention_spec(model, kind)
    other = _scrambled(model, spec, seed=3)
    # k's output carries the qk group exactly (q repeats it per query head); v's output carries vo
    taps = {"qk": [Tap("qk", "k", "output", 2)], "vo": [Tap("vo", "v", "output", 2)]}
    batches = [torch.randn(4, 6, 12) for _ in range(3)]
    result = activation_matching(spec, model, other, batches, taps=taps)
    restored = permute_state(other.state_dict(), spec, result.perms)
    assert all(torch.equal(restored[k], v) for k, v in model.state_dict().items())
    unrelated = activation_matching(spec, model, GQAttention().eval(), batches, taps=taps)
    for perm in unrelated.perms.values():
        heads = perm.view(-1, model.d) // model.d
        assert (heads == heads[:, :1]).all()


def test_feature_stats_match_direct_computation():
    gen = torch.Generator().manual_seed(0)
    xa = torch.randn(300, 5, generator=gen) * 3 + 1
    xb = xa[:, [2, 0, 4, 1, 3]] * 0.5 + 0.1 * torch.randn(300, 5, generator=gen)
    stats = FeatureStats(5, self_stats=True)
    for i in range(0, 300, 70):  # uneven blocks: the sums must not care
        stats.update(xa[i : i + 70], xb[i : i + 70])
    joint = torch.corrcoef(torch.cat([xa, xb], 1).T.double())
    torch.testing.assert_close(stats.cross_corr(), joint[:5, 5:], atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(stats.joint_corr(), joint, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(stats.self_corr("b"), joint[5:, 5:], atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(stats.a.mean, xa.double().mean(0))
    torch.testing.assert_close(stats.b.std, xb.double().std(0, unbiased=False))
    torch.testing.assert_close(stats.cross_cov(), torch.cov(torch.cat([xa, xb], 1).T.double(), correction=0)[:5, 5:])
    assert stats.cross_corr().argmax(1).tolist() == [1, 3, 0, 4, 2]
    single = FeatureStats(5, paired=False)
    single.update(xa)
    with pytest.raises(InputError, match="not collected"):
        single.cross_corr()


def test_unit_features_flattened_layout_matches_channels():
    x = torch.randn(3, 4, 2, 5)
    per_channel = unit_features(x, axis=1)
    flat = unit_features(x.flatten(1), axis=1, inner=10)
    assert per_channel.shape == (30, 4)
    assert torch.equal(per_channel, flat)
    assert torch.equal(per_channel[:, 2], x[:, 2].reshape(-1))


def test_taps_point_at_inputs_of_reading_layers():
    model = CNN().eval()
    taps = group_taps(model, torch.randn(2, 3, 16, 16))
    assert taps["conv1"] == [Tap("conv1", "conv2", "input", 1, 1, taps["conv1"][0].node)]
    assert taps["conv2"][0].module == "fc" and taps["conv2"][0].inner == 16
    assert taps["fc"][0].module == "head"
    stats = collect_stats(model, taps, [torch.randn(4, 3, 16, 16)])
    assert {g: s.n for g, s in stats.items()} == {"conv1": 8, "conv2": 12, "fc": 20}
    assert stats["conv1"].count == 4 * 8 * 8  # pooled map: every pixel is a sample
    assert stats["conv2"].count == 4 * 16  # flattened: every H*W position of a channel is a sample


def test_collect_stats_leaves_models_as_they_were():
    model = ResNet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    taps = group_taps(model, torch.randn(2, 3, 16, 16))
    collect_stats(model, taps, [torch.randn(4, 3, 16, 16)], model_b=copy.deepcopy(model))
    assert model.training and model.layer1[0].bn1.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_dead_units_are_reported():
    torch.manual_seed(0)
    model = CNN().eval()  # at this init several of fc's ReLU units never fire on random inputs
    spec = spec_from_module(model, torch.randn(2, 3, 16, 16))
    result = activation_matching(spec, model, _scrambled(model, spec), [torch.randn(16, 3, 16, 16)])
    assert result.stats["constant_units"] > 0


def test_dead_units_are_paired_by_weights_without_losing_correlation():
    torch.manual_seed(0)
    model = MLP(widths=(12, 40, 40, 5)).eval()
    with torch.no_grad():  # kill a third of each hidden layer: constant zero on every input
        for layer in model.layers[:2]:
            layer.bias[::3] = -100.0
    spec = spec_from_module(model, torch.randn(2, 12))
    other = _scrambled(model, spec, seed=5)
    batches = [torch.randn(64, 12) for _ in range(2)]
    plain = activation_matching(spec, model, other, batches, resolve_constant=False)
    fixed = activation_matching(spec, model, other, batches)
    assert plain.stats["constant_units"] == fixed.stats["constant_units"] == 2 * 2 * 14
    assert fixed.stats["mean_corr_after"] == pytest.approx(plain.stats["mean_corr_after"], abs=1e-12)
    assert fixed.stats["constant_units_rematched"] > 0
    restored = permute_state(other.state_dict(), spec, fixed.perms)
    assert all(torch.equal(restored[k], v) for k, v in model.state_dict().items())
    unresolved = permute_state(other.state_dict(), spec, plain.perms)
    assert not all(torch.equal(unresolved[k], v) for k, v in model.state_dict().items())


def test_errors():
    model = MLP()
    spec = spec_from_module(model, torch.randn(2, 12))
    with pytest.raises(AlignmentError, match="at least one"):
        activation_matching(spec, model, model, [])
    with pytest.raises(InputError, match="no module 'nope'"):
        activation_matching(spec, model, model, [torch.randn(4, 12)], taps={"layers.0": [Tap("layers.0", "nope", "input", 1)]})
    with pytest.raises(AlignmentError, match="can be observed"):
        activation_matching(spec, model, model, [torch.randn(4, 12)], taps={"other": []})


# -------------------------------------------------------------------------------------- digits
def _train(seed, x, y, epochs=15):
    torch.manual_seed(seed)
    model = MLP(widths=(64, 128, 128, 10))
    train(model, CalibrationData(x, y), epochs, seed=seed)  # the library's seeded Adam loop, batch 64
    return model.eval()


def test_digits_activation_matching_agrees_with_weight_matching():
    from sklearn.datasets import load_digits

    ds = load_digits()
    x = torch.tensor(ds.data, dtype=torch.float32) / 16.0
    y = torch.tensor(ds.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    xte, yte, xtr, ytr = x[perm[:360]], y[perm[:360]], x[perm[360:]], y[perm[360:]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = _train(1, xtr, ytr), _train(2, xtr, ytr)
        spec = spec_from_module(a, xtr[:2])
        act = activation_matching(spec, a, b, xtr.split(256))
        wm = weight_matching(spec, a.state_dict(), b.state_dict())
        probe = MLP(widths=(64, 128, 128, 10)).eval()
        sa = a.state_dict()

        def midpoint(perms):
            sb = permute_state(b.state_dict(), spec, perms)
            probe.load_state_dict({k: 0.5 * (sa[k] + sb[k]) for k in sa})
            with torch.no_grad():
                return float(F.cross_entropy(probe(xte), yte))

        naive, via_act, via_wm = midpoint({}), midpoint(act.perms), midpoint(wm.perms)
    finally:
        torch.set_num_threads(threads)
    agree = sum(int((act.perms[g] == wm.perms[g]).sum()) for g in act.perms) / sum(g.size for g in spec.active_groups())
    print(f"\ndigits 64-128x2-10 midpoint loss: naive {naive:.3f}, activation {via_act:.3f}, weight {via_wm:.3f}; "
          f"units matched alike {agree:.2f}; mean corr {act.stats['mean_corr_before']:.3f} -> {act.stats['mean_corr_after']:.3f}")  # fmt: skip
    assert via_act < 0.6 * naive
    assert act.stats["mean_corr_after"] > act.stats["mean_corr_before"] + 0.2
    assert agree > 0.1  # two different objectives, yet far more shared pairs than chance (1/128)
