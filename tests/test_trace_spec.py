"""Specs derived by torch.fx tracing: a random permutation drawn from the spec must leave outputs unchanged."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from suture.merge.errors import InputError
from suture.merge.graph.trace import spec_from_module, trace_module
from suture.merge.spec import PermutationSpec, permute_state


def _randomize(model: nn.Module) -> nn.Module:
    """Give norms non-trivial affine parameters and statistics so a wrong permutation shows up."""
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=gen) * 0.2)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
            for name, p in mod.named_parameters(recurse=False):
                if p.dim() == 1:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if name == "weight" else 0.0))
    return model.eval()


def _permuted_copy(model: nn.Module, spec: PermutationSpec, seed: int) -> nn.Module:
    perms = spec.random_permutations(seed)
    other = copy.deepcopy(model)
    other.load_state_dict(permute_state(model.state_dict(), spec, perms))
    return other.eval()


def assert_invariant(model: nn.Module, x, spec: PermutationSpec, *, min_active: int, seeds=(1, 2, 3)) -> None:
    """Outputs are unchanged under random spec permutations, and the check is not vacuous."""
    assert len(spec.active_groups()) >= min_active, spec.describe()
    xs = x if isinstance(x, tuple) else (x,)
    with torch.no_grad():
        ref = model(*xs)
        for seed in seeds:
            perms = spec.random_permutations(seed)
            moved = [g.name for g in spec.active_groups() if not torch.equal(perms[g.name], torch.arange(g.size))]
            assert moved, "no group was actually permuted"
            out = _permuted_copy(model, spec, seed)(*xs)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def _members(spec: PermutationSpec, group: str) -> set[str]:
    return {f"{m.tensor}[{m.axis}]" for m in spec.groups[group].members}


# ----------------------------------------------------------------------------------------------- models
class MLP(nn.Module):
    def __init__(self, widths=(12, 32, 32, 5), norm: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.norms = nn.ModuleList(nn.LayerNorm(b) if norm else nn.Identity() for b in widths[1:-1])

    def forward(self, x):
        for layer, norm in zip(self.layers[:-1], self.norms):
            x = F.gelu(norm(layer(x)))
        return self.layers[-1](x)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(12 * 4 * 4, 20)
        self.head = nn.Linear(20, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.pool(x)
        return self.head(torch.relu(self.fc(self.flatten(x))))


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(Block(8, 8, 1), Block(8, 8, 1))
        self.layer2 = nn.Sequential(Block(8, 16, 2), Block(16, 16, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class SwiGLU(nn.Module):
    def __init__(self, dim=16, hidden=40):
        super().__init__()
        self.inp = nn.Linear(10, dim)
        self.norm = nn.RMSNorm(dim)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.out = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.down(F.silu(self.gate(self.norm(h))) * self.up(self.norm(h)))
        return self.out(h)


class HandRMSNorm(nn.Module):
    """Written out the way Llama-style code does it, so tracing sees pow/mean/rsqrt/mul by a parameter."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + 1e-6))


class TinyLM(nn.Module):
    def __init__(self, vocab=50, dim=16, seq=7):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, seq, dim))
        self.norm1 = HandRMSNorm(dim)
        self.fc1 = nn.Linear(dim, 32)
        self.fc2 = nn.Linear(32, dim)
        self.norm_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, ids):
        h = self.emb(ids) + self.pos[:, : ids.shape[1]]
        h = h + self.fc2(F.gelu(self.fc1(self.norm1(h))))
        return self.head(self.norm_f(h))


class WithUnknownOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 16)
        self.fc3 = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = torch.cumsum(h, dim=-1)  # order-dependent along the hidden axis: must freeze fc1's group
        return self.fc3(torch.relu(self.fc2(h)))


class MiscConv(nn.Module):
    """Depthwise conv with a channel multiplier, layer scale via a reshaped parameter, GroupNorm, shared layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.dw = nn.Conv2d(6, 12, 3, padding=1, groups=6)
        self.bn = nn.BatchNorm2d(12)
        self.gamma = nn.Parameter(torch.randn(12))
        self.pw = nn.Conv2d(12, 8, 1)
        self.gn = nn.GroupNorm(2, 8)
        self.pw2 = nn.Conv2d(8, 8, 1)
        self.gn1 = nn.GroupNorm(1, 8)
        self.shared = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = self.bn(self.dw(F.relu(self.conv(x))))
        h = h * self.gamma.view(1, -1, 1, 1)
        h = self.gn1(self.pw2(self.gn(F.relu(self.pw(h)))))  # GroupNorm(1, C) commutes, GroupNorm(2, C) does not
        h = h.mean((2, 3))
        h = self.shared(F.relu(self.shared(h)))  # one module called twice: its axes tie both calls
        return self.fc(h)


# ----------------------------------------------------------------------------------------------- tests
def test_mlp():
    torch.manual_seed(0)
    model = MLP().eval()
    spec = spec_from_module(model, torch.randn(4, 12))
    assert set(spec.groups) == {"layers.0", "layers.1"}
    assert _members(spec, "layers.0") == {"layers.0.weight[0]", "layers.0.bias[0]", "layers.1.weight[1]"}
    assert spec.groups["layers.0"].members[-1].role == "in"
    assert all(not g.frozen for g in spec)
    assert_invariant(model, torch.randn(9, 12), spec, min_active=2)


def test_mlp_with_layernorm():
    torch.manual_seed(0)
    model = _randomize(MLP(norm=True))
    spec = spec_from_module(model, torch.randn(4, 12))
    assert {"norms.0.weight[0]", "norms.0.bias[0]"} <= _members(spec, "layers.0")
    assert_invariant(model, torch.randn(9, 12), spec, min_active=2)


def test_cnn_batchnorm_flatten_linear():
    torch.manual_seed(0)
    model = _randomize(CNN())
    result = trace_module(model, torch.randn(2, 3, 16, 16))
    spec = result.spec
    assert set(spec.groups) == {"conv1", "conv2", "fc"}
    fc_in = [m for m in spec.groups["conv2"].members if m.tensor == "fc.weight"]
    assert fc_in and fc_in[0].inner == 16 and fc_in[0].axis == 1  # channel blocks of H*W columns
    assert {"bn2.running_mean[0]", "bn2.running_var[0]"} <= _members(spec, "conv2")
    assert "bn2.num_batches_tracked" not in {m.tensor for g in spec for m in g.members}
    assert_invariant(model, torch.randn(5, 3, 16, 16), spec, min_active=3)
    assert result.taps["conv2"][0].module == "fc" and result.taps["conv2"][0].inner == 16


def test_resnet_residual_streams():
    torch.manual_seed(0)
    model = _randomize(ResNet())
    spec = spec_from_module(model, torch.randn(2, 3, 16, 16))
    stream1 = _members(spec, "stem")
    # the stem, both identity blocks' last convs and the downsampling block's input share one stream
    assert {"stem.weight[0]", "layer1.0.bn2.weight[0]", "layer1.1.bn2.weight[0]", "layer2.0.shortcut.0.weight[1]"} <= stream1
    stream2 = _members(spec, "layer2.0.conv2")  # named after its first producer
    assert {"layer2.0.shortcut.0.weight[0]", "layer2.0.shortcut.1.running_var[0]", "layer2.1.bn2.weight[0]", "fc.weight[1]"} <= stream2
    assert len(spec.active_groups()) == 2 + 4  # two streams + one inner group per block
    assert_invariant(model, torch.randn(3, 3, 16, 16), spec, min_active=6)


def test_swiglu_ties_gate_and_up():
    torch.manual_seed(0)
    model = _randomize(SwiGLU())
    spec = spec_from_module(model, torch.randn(2, 10))
    hidden = _members(spec, "gate")
    assert {"gate.weight[0]", "up.weight[0]", "down.weight[1]"} == hidden
    assert {"inp.weight[0]", "norm.weight[0]", "down.weight[0]", "out.weight[1]"} <= _members(spec, "inp")
    assert_invariant(model, torch.randn(6, 10), spec, min_active=2)


def test_embedding_tied_head_and_positional_parameter():
    torch.manual_seed(0)
    model = _randomize(TinyLM())
    ids = torch.randint(0, 50, (3, 7))
    result = trace_module(model, ids)
    spec = result.spec
    stream = _members(spec, "emb")
    assert {"emb.weight[1]", "head.weight[1]", "pos[2]", "norm1.weight[0]", "fc2.weight[0]", "norm_f.weight[0]"} <= stream
    roles = {m.tensor: m.role for m in spec.groups["emb"].members}
    assert roles["emb.weight"] == "out" and roles["head.weight"] == "in"
    assert result.aliases == {"emb.weight": ["emb.weight", "head.weight"]}
    assert any("tied tensor" in n for n in spec.notes)
    assert_invariant(model, ids, spec, min_active=2)
    # the vocabulary axis is model input/output: nothing may touch it
    assert all(m.axis == 1 for m in spec.groups["emb"].members if m.tensor in ("emb.weight", "head.weight"))


def test_unknown_op_freezes_and_keeps_outputs(caplog):
    torch.manual_seed(0)
    model = WithUnknownOp().eval()
    with caplog.at_level(logging.WARNING, logger="suture.merge.graph.trace"):
        spec = spec_from_module(model, torch.randn(2, 6))
    assert spec.groups["fc1"].frozen and "cumsum" in spec.groups["fc1"].frozen_reason
    assert not spec.groups["fc2"].frozen
    assert "cumsum" in caplog.text
    assert_invariant(model, torch.randn(8, 6), spec, min_active=1)
    # the freeze is necessary: permuting fc1's group anyway changes the outputs
    forced = copy.deepcopy(spec)
    forced.groups["fc1"].frozen_reason = None
    x = torch.randn(8, 6)
    with torch.no_grad():
        assert not torch.allclose(_permuted_copy(model, forced, 1)(x), model(x), atol=1e-3)


def test_depthwise_layer_scale_groupnorm_and_shared_module():
    torch.manual_seed(0)
    model = _randomize(MiscConv())
    spec = spec_from_module(model, torch.randn(2, 3, 8, 8))
    conv = spec.groups["conv"]
    by_name = {m.tensor: m for m in conv.members}
    assert by_name["dw.weight"].inner == 2 and by_name["bn.running_var"].inner == 2
    assert by_name["gamma"].inner == 2 and by_name["pw.weight"].inner == 2 and by_name["pw.weight"].role == "in"
    assert spec.groups["pw"].frozen and "GroupNorm" in spec.groups["pw"].frozen_reason
    assert {"shared.weight[1]", "shared.weight[0]", "gn1.weight[0]", "gn1.bias[0]"} <= _members(spec, "pw2")
    assert_invariant(model, torch.randn(4, 3, 8, 8), spec, min_active=2)


def test_training_mode_and_batchnorm_stats_are_left_alone():
    model = CNN().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec_from_module(model, torch.randn(2, 3, 16, 16))
    assert model.training and model.bn1.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_prefix_names_tensors_like_the_store():
    model = MLP()
    spec = spec_from_module(model, torch.randn(2, 12), prefix="model.")
    assert "model.layers.0.weight" in {m.tensor for m in spec.groups["model.layers.0"].members}
    spec.validate({"model." + k: v.shape for k, v in model.state_dict().items()})


def test_untraceable_model_raises_input_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(InputError, match="Branchy"):
        spec_from_module(Branchy(), torch.randn(2, 3))


class Seq1d(nn.Module):
    """Conv1d + BatchNorm1d + ConvTranspose1d + pooling over a sequence, then a Linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 10, 3, padding=1)
        self.bn = nn.BatchNorm1d(10)
        self.up = nn.ConvTranspose1d(10, 6, 2, stride=2)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = F.silu(self.bn(self.conv(x)))
        h = torch.tanh(self.up(h) * 0.5)
        return self.fc(self.pool(h).squeeze(-1))


class WithLeafAttention(nn.Module):
    """A torch.nn attention layer is opaque to the tracer: the stream it reads must keep its order."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(10, 16)
        self.block = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.fc1 = nn.Linear(16, 24)
        self.fc2 = nn.Linear(24, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.block(self.inp(x)))))


class InputResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 20)
        self.fc2 = nn.Linear(20, 8)

    def forward(self, x):
        return x + self.fc2(F.relu(self.fc1(x)))


def test_conv1d_batchnorm1d_transposed_conv():
    torch.manual_seed(0)
    model = _randomize(Seq1d())
    spec = spec_from_module(model, torch.randn(2, 4, 9))
    assert {"up.weight[0]", "bn.running_mean[0]"} <= _members(spec, "conv")
    assert {"up.weight[1]", "up.bias[0]", "fc.weight[1]"} == _members(spec, "up")
    assert_invariant(model, torch.randn(5, 4, 9), spec, min_active=2)


def test_opaque_torch_layer_and_input_residual_freeze_their_streams():
    torch.manual_seed(0)
    model = WithLeafAttention().eval()
    spec = spec_from_module(model, torch.randn(2, 5, 10))
    assert spec.groups["inp"].frozen and "TransformerEncoderLayer" in spec.groups["inp"].frozen_reason
    assert not spec.groups["fc1"].frozen
    assert_invariant(model, torch.randn(3, 5, 10), spec, min_active=1)
    res = InputResidual().eval()
    spec = spec_from_module(res, torch.randn(2, 8))
    assert spec.groups["fc2"].frozen and "unpermuted" in spec.groups["fc2"].frozen_reason
    assert_invariant(res, torch.randn(6, 8), spec, min_active=1)
