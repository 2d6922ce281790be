"""BatchNorm reset and REPAIR: recovered statistics, matched channel statistics, folded parameters."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from suture.merge import demo, zoo
from suture.merge.data import CalibrationData, load_dataset
from suture.merge.errors import InputError
from suture.merge.evaluate import evaluate, interpolate_states, interpolation_curve
from suture.merge.repair import as_input_batches, channel_stats, repair, repair_points, reset_batchnorm


def _linear_bn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 2))


def test_reset_batchnorm_recovers_exact_statistics():
    net = _linear_bn()
    x = torch.randn(96, 4) * 3 + 1
    with torch.no_grad():
        pre = net[0](x)
    net[1].running_mean.fill_(5.0)
    net[1].running_var.fill_(0.01)
    net[1].momentum = 0.3
    net.train()
    reset_batchnorm(net, x)  # one batch
    assert not net.training and not net[1].training and net[1].momentum == 0.3
    assert torch.allclose(net[1].running_mean, pre.mean(0), atol=1e-5)
    assert torch.allclose(net[1].running_var, pre.var(0, unbiased=True), rtol=1e-4)
    # equal-sized batches: the cumulative average of batch means is the overall mean
    reset_batchnorm(net, [(x[i : i + 32], None) for i in range(0, 96, 32)])
    assert torch.allclose(net[1].running_mean, pre.mean(0), atol=1e-5)
    batch_vars = torch.stack([pre[i : i + 32].var(0, unbiased=True) for i in range(0, 96, 32)])
    assert torch.allclose(net[1].running_var, batch_vars.mean(0), rtol=1e-4)
    # after the reset the eval-mode BN output is standardized on that data (then scaled by weight/bias = 1/0)
    with torch.no_grad():
        out = net[1](pre)
    assert torch.allclose(out.mean(0), torch.zeros(6), atol=1e-4)
    assert net[1].num_batches_tracked.item() == 3


def test_reset_batchnorm_keeps_dropout_off_and_handles_datasets():
    net = _linear_bn()
    data = CalibrationData(torch.randn(40, 4), torch.zeros(40, dtype=torch.long))
    reset_batchnorm(net, data, batch_size=40)
    first = net[1].running_var.clone()
    reset_batchnorm(net, data, batch_size=40)
    assert torch.equal(first, net[1].running_var)  # dropout was not sampling during the pass
    plain = nn.Sequential(nn.Linear(3, 3))
    assert reset_batchnorm(plain, torch.randn(4, 3)) is plain
    with pytest.raises(InputError, match="empty"):
        reset_batchnorm(net, [])


def test_reset_batchnorm_on_resnet_conv_channels():
    net = zoo.resnet_small(width=4)
    x = load_dataset("sklearn:digits?shape=image", split="train", max_items=200).inputs
    reset_batchnorm(net, x)
    captured = {}
    handle = net.conv1.register_forward_hook(lambda m, i, o: captured.setdefault("out", o.detach()))
    net(x)
    handle.remove()
    out = captured["out"]
    assert torch.allclose(net.bn1.running_mean, out.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(net.bn1.running_var, out.var((0, 2, 3), unbiased=True), rtol=1e-3)


def test_repair_points_follow_the_architecture():
    mlp = zoo.mlp((64, 16, 16, 10))
    x = torch.randn(3, 64)
    assert [(p.name, p.kind) for p in repair_points(mlp, x)] == [("layers.0", "linear"), ("layers.1", "linear")]
    assert [p.name for p in repair_points(mlp, x, skip_last=False)][-1] == "layers.2"
    res = zoo.resnet_small(width=4)
    points = repair_points(res, x)
    assert all(p.kind == "norm" for p in points) and len(points) == 9  # convs feed BN: the BN is repaired
    assert points[0].name == "bn1" and "layer2.shortcut.1" in [p.name for p in points]
    assert "fc" not in [p.name for p in points]


def _check_matched(merged, a, b, data, names, t, atol=2e-3):
    sa, sb, sm = (channel_stats(m, data, names) for m in (a, b, merged))
    for name in names:
        target_mean = (1 - t) * sa[name][0] + t * sb[name][0]
        target_std = (1 - t) * sa[name][1] + t * sb[name][1]
        assert torch.allclose(sm[name][0], target_mean, atol=atol), name
        assert torch.allclose(sm[name][1], target_std, atol=atol, rtol=1e-3), name


def test_repair_matches_interpolated_stats_on_mlp():
    data = load_dataset("sklearn:digits", split="train", max_items=300)
    a = zoo.build_seeded("mlp", 1, widths=(64, 32, 32, 10))
    b = zoo.build_seeded("mlp", 2, widths=(64, 32, 32, 10))
    t = 0.3
    merged = zoo.mlp((64, 32, 32, 10))
    merged.load_state_dict(interpolate_states(a.state_dict(), b.state_dict(), t))
    names = ["layers.0", "layers.1"]
    before_std = channel_stats(merged, data, names)["layers.1"][1]
    target_std = 0.7 * channel_stats(a, data, names)["layers.1"][1] + 0.3 * channel_stats(b, data, names)["layers.1"][1]
    assert (before_std / target_std).mean() < 0.9  # variance collapse is there to repair
    untouched = merged.layers[2].weight.clone()
    repair(merged, a, b, data, t=t)
    _check_matched(merged, a, b, data, names, t)
    assert torch.equal(merged.layers[2].weight, untouched)  # the logits layer is left alone


def test_repair_matches_stats_on_resnet_with_batchnorm():
    data = load_dataset("sklearn:digits?shape=image", split="train", max_items=200)
    a, b = zoo.build_seeded("resnet", 1, width=4), zoo.build_seeded("resnet", 2, width=4)
    reset_batchnorm(a, data)
    reset_batchnorm(b, data)
    merged = zoo.resnet_small(width=4)
    merged.load_state_dict(interpolate_states(a.state_dict(), b.state_dict(), 0.5))
    running = merged.bn1.running_mean.clone()
    repair(merged, a, b, data)
    names = [p.name for p in repair_points(merged, data.inputs[:2])]
    _check_matched(merged, a, b, data, names, 0.5)
    assert torch.equal(merged.bn1.running_mean, running)  # the correction lives in weight/bias only


def test_repair_conv_without_norm_and_without_bias():
    torch.manual_seed(0)

    def make():
        return nn.Sequential(
            nn.Conv2d(1, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 6, 3, padding=1, bias=False), nn.ReLU(),
            nn.Flatten(), nn.Linear(6 * 64, 10),
        )

    a, b = make(), make()
    merged = make()
    merged.load_state_dict(interpolate_states(a.state_dict(), b.state_dict(), 0.5))
    data = load_dataset("sklearn:digits?shape=image", max_items=100)
    repair(merged, a, b, data.inputs)
    _check_matched(merged, a, b, data.inputs, ["0"], 0.5)
    # the bias-less conv can only be rescaled: its std matches, its mean is merely scaled
    sm, sa, sb = (channel_stats(m, data.inputs, ["2"])["2"] for m in (merged, a, b))
    assert torch.allclose(sm[1], (sa[1] + sb[1]) / 2, rtol=1e-3, atol=1e-3)


def test_repair_is_a_no_op_on_an_endpoint():
    data = load_dataset("sklearn:digits", split="train", max_items=200)
    a = zoo.build_seeded("mlp", 3, widths=(64, 24, 24, 10))
    merged = copy.deepcopy(a)
    repair(merged, a, copy.deepcopy(a), data, t=0.5, eps=1e-12)
    for key, value in a.state_dict().items():
        assert torch.allclose(merged.state_dict()[key], value, atol=1e-5), key


def test_repair_selected_modules_and_errors():
    data = load_dataset("sklearn:digits", max_items=50)
    a, b = zoo.build_seeded("mlp", 1, widths=(64, 16, 16, 10)), zoo.build_seeded("mlp", 2, widths=(64, 16, 16, 10))
    merged = zoo.mlp((64, 16, 16, 10))
    merged.load_state_dict(interpolate_states(a.state_dict(), b.state_dict(), 0.5))
    first_layer = merged.layers[0].weight.clone()
    repair(merged, a, b, data, modules=["layers.1"])
    assert torch.equal(merged.layers[0].weight, first_layer)
    _check_matched(merged, a, b, data, ["layers.1"], 0.5)
    with pytest.raises(InputError, match=r"\['layers.9'\] are not"):
        repair(merged, a, b, data, modules=["layers.9"])
    with pytest.raises(InputError, match="t must lie in"):
        repair(merged, a, b, data, t=1.5)
    with pytest.raises(InputError, match="no module"):
        repair(merged, zoo.resnet_small(width=4), b, data)
    with pytest.raises(InputError, match="calibration batches"):
        as_input_batches(3)


def test_interpolation_curve_with_repair_matches_manual_repair():
    data = load_dataset("sklearn:digits", max_items=100)
    a, b = zoo.build_seeded("mlp", 1, widths=(64, 16, 10)), zoo.build_seeded("mlp", 2, widths=(64, 16, 10))
    sa, sb = a.state_dict(), b.state_dict()
    curve = interpolation_curve(a, sa, sb, data, points=3, repair_data=data)
    manual = zoo.mlp((64, 16, 10))
    manual.load_state_dict(interpolate_states(sa, sb, 0.5))
    repair(manual, a, b, data)
    assert curve[1]["loss"] == pytest.approx(evaluate(manual, data)["loss"], rel=1e-5)
    assert curve[0]["loss"] == pytest.approx(evaluate(a, data)["loss"], rel=1e-6)  # endpoints untouched


@pytest.fixture(scope="session")
def demo_pair(tmp_path_factory):
    # Shared base temp dir: the pair is trained once per session whichever test module asks first.
    paths = demo.demo_models(tmp_path_factory.getbasetemp() / "suture-demo-zoo", "mlp")
    return [zoo.load_module(p) for p in paths]


def test_repair_rescues_the_naive_midpoint_of_demo_mlps(demo_pair):
    model_a, model_b = demo_pair
    test = load_dataset("sklearn:digits")
    calib = load_dataset("sklearn:digits", split="train", max_items=512)
    merged = zoo.mlp((64, 512, 512, 512, 10))
    merged.load_state_dict(interpolate_states(model_a.state_dict(), model_b.state_dict(), 0.5))
    naive = evaluate(merged, test)
    repair(merged, model_a, model_b, calib)
    repaired = evaluate(merged, test)
    ends = [evaluate(m, test) for m in demo_pair]
    line = (ends[0]["loss"] + ends[1]["loss"]) / 2
    assert naive["loss"] - line >= 0.3  # the unaligned midpoint has a real barrier
    assert repaired["loss"] < naive["loss"] - 0.2 and repaired["accuracy"] > naive["accuracy"]
