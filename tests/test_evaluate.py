"""Evaluation, interpolation curves, loss barriers, plots, and the Git Re-Basin digits result end to end."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from suture.merge import demo, zoo
from suture.merge.data import CalibrationData, load_dataset
from suture.merge.errors import InputError
from suture.merge.evaluate import barrier, evaluate, interpolate_states, interpolation_curve
from suture.merge.plot import interpolation_figure, plot_interpolation


def _curve(ts, losses, accs=None):
    accs = accs or [0.0] * len(ts)
    return [{"t": t, "loss": loss, "accuracy": a} for t, loss, a in zip(ts, losses, accs)]


def test_barrier_on_hand_made_curves():
    # line from 1.0 to 1.5 passes 1.25 at t=0.5; the curve is 2.0 there
    assert barrier(_curve([0, 0.5, 1], [1.0, 2.0, 1.5])) == pytest.approx(0.75)
    assert barrier(_curve([0, 0.5, 1], [1.0, 2.0, 1.5]), kind="midpoint") == pytest.approx(0.75)
    # peak away from the midpoint: excess over the line 0 + t is [0, 1.25, 0.5, -0.25, 0]
    bumpy = _curve([0, 0.25, 0.5, 0.75, 1], [0.0, 1.5, 1.0, 0.5, 1.0])
    assert barrier(bumpy) == pytest.approx(1.25)
    assert barrier(bumpy, kind="midpoint") == pytest.approx(0.5)
    assert barrier(list(reversed(bumpy))) == pytest.approx(1.25)  # order of rows does not matter
    # a convex path below the line: the max barrier is 0 (endpoints), the midpoint one is negative
    convex = _curve([0, 0.5, 1], [1.0, 0.8, 1.0])
    assert barrier(convex) == 0.0 and barrier(convex, kind="midpoint") == pytest.approx(-0.2)
    # accuracy barriers measure the drop below the line
    acc = _curve([0, 0.5, 1], [0, 0, 0], [1.0, 0.5, 0.9])
    assert barrier(acc, metric="accuracy") == pytest.approx(0.45)


@pytest.mark.parametrize(
    ("curve", "kwargs", "fragment"),
    [
        (_curve([0.5, 1], [1, 1]), {}, "t=0 and t=1"),
        (_curve([0, 0.4, 1], [1, 1, 1]), {"kind": "midpoint"}, "t=0.5"),
        (_curve([0, 1], [1, 1]), {"metric": "f1"}, "no metric 'f1'"),
        (_curve([0, 1], [1, 1]), {"kind": "mean"}, "'max' or 'midpoint'"),
    ],
)
def test_barrier_errors(curve, kwargs, fragment):
    with pytest.raises(InputError, match=fragment):
        barrier(curve, **kwargs)


def test_evaluate_matches_direct_cross_entropy():
    torch.manual_seed(0)
    net = nn.Linear(5, 3)
    data = CalibrationData(torch.randn(50, 5), torch.randint(0, 3, (50,)))
    with torch.no_grad():
        logits = net(data.inputs)
    expected_loss = F.cross_entropy(logits, data.labels).item()
    expected_acc = (logits.argmax(1) == data.labels).float().mean().item()
    net.train()
    for batch_size in (7, 256):
        got = evaluate(net, data, batch_size=batch_size)
        assert got["loss"] == pytest.approx(expected_loss, rel=1e-5)
        assert got["accuracy"] == pytest.approx(expected_acc)
    assert net.training  # the caller's mode is restored


class _TinyLM(nn.Module):
    """Embeds tokens and predicts the next one; returns a Hugging Face style object with .logits."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.head = nn.Linear(4, 6)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.head(self.emb(input_ids)))


def test_evaluate_language_model_on_unlabelled_tokens():
    torch.manual_seed(1)
    lm = _TinyLM()
    ids = torch.tensor([[1, 2, 3, 4], [5, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    data = CalibrationData({"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        logits = lm(ids).logits
    # scored positions: row 0 predicts 2, 3, 4; row 1 predicts 1 (padding is never a target)
    pairs = [(0, 0, 2), (0, 1, 3), (0, 2, 4), (1, 0, 1)]
    losses = [F.cross_entropy(logits[r, p][None], torch.tensor([y])).item() for r, p, y in pairs]
    hits = [int(logits[r, p].argmax() == y) for r, p, y in pairs]
    got = evaluate(lm, data, batch_size=1)
    assert got["loss"] == pytest.approx(sum(losses) / 4, rel=1e-5)
    assert got["accuracy"] == pytest.approx(sum(hits) / 4)


def test_evaluate_errors():
    net = nn.Linear(4, 3)
    with pytest.raises(InputError, match="labels range 0..5 but the model has 3 outputs"):
        evaluate(net, CalibrationData(torch.randn(6, 4), torch.arange(6)))
    with pytest.raises(InputError, match="no labels"):
        evaluate(net, CalibrationData(torch.randn(6, 4)))
    with pytest.raises(InputError, match="empty"):
        evaluate(net, CalibrationData(torch.randn(0, 4), torch.zeros(0, dtype=torch.long)))


def test_interpolate_states_lerps_floats_and_keeps_integer_buffers():
    a = {"w": torch.zeros(2, 2), "n": torch.tensor(3)}
    b = {"w": torch.ones(2, 2) * 4, "n": torch.tensor(9)}
    mid = interpolate_states(a, b, 0.25)
    assert torch.equal(mid["w"], torch.ones(2, 2)) and mid["n"].item() == 3
    with pytest.raises(InputError, match=r"only in A \['n'\]"):
        interpolate_states(a, {"w": b["w"]}, 0.5)
    with pytest.raises(InputError, match=r"tensor 'w': shape \(2, 2\) in A but \(3,\) in B"):
        interpolate_states(a, {"w": torch.zeros(3), "n": b["n"]}, 0.5)


def test_interpolation_curve_endpoints_and_midpoint():
    data = load_dataset("sklearn:digits", max_items=120)
    a = zoo.build_seeded("mlp", 1, widths=(64, 16, 10))
    b = zoo.build_seeded("mlp", 2, widths=(64, 16, 10))
    sa = {k: v.clone() for k, v in a.state_dict().items()}
    sb = b.state_dict()
    curve = interpolation_curve(a, sa, sb, data, points=5)
    assert [r["t"] for r in curve] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert curve[0]["loss"] == pytest.approx(evaluate(a, data)["loss"], rel=1e-6)
    assert curve[-1]["loss"] == pytest.approx(evaluate(b, data)["loss"], rel=1e-6)
    assert all(torch.equal(a.state_dict()[k], sa[k]) for k in sa)  # the given module is not modified
    mid = copy.deepcopy(a)
    mid.load_state_dict({k: (sa[k] + sb[k]) / 2 for k in sa})
    assert curve[2]["accuracy"] == pytest.approx(evaluate(mid, data)["accuracy"])
    # a zero-argument factory and explicit t values work the same way
    again = interpolation_curve(lambda: zoo.mlp((64, 16, 10)), sa, sb, data, points=[1.0, 0.5, 0.0])
    assert [r["t"] for r in again] == [0.0, 0.5, 1.0]
    assert again[1]["loss"] == pytest.approx(curve[2]["loss"], rel=1e-6)
    with pytest.raises(InputError, match="at least 2 points"):
        interpolation_curve(a, sa, sb, data, points=1)
    with pytest.raises(InputError, match="weights do not fit"):
        interpolation_curve(zoo.mlp((64, 8, 10)), sa, sb, data)


def test_interpolation_curve_resets_batchnorm():
    from suture.merge.repair import reset_batchnorm

    data = load_dataset("sklearn:digits", max_items=64)
    calib = load_dataset("sklearn:digits", split="train", max_items=128)
    a = zoo.build_seeded("resnet", 1, width=4)
    b = zoo.build_seeded("resnet", 2, width=4)
    sa, sb = a.state_dict(), b.state_dict()  # fresh BN stats (0 mean, 1 var): wrong for the data
    plain = interpolation_curve(a, sa, sb, data, points=3)
    reset = interpolation_curve(a, sa, sb, data, points=3, reset_bn_data=calib)
    manual = copy.deepcopy(a)
    manual.load_state_dict(interpolate_states(sa, sb, 0.5))
    reset_batchnorm(manual, calib)
    assert reset[1]["loss"] == pytest.approx(evaluate(manual, data)["loss"], rel=1e-5)
    assert reset[1]["loss"] != pytest.approx(plain[1]["loss"], rel=1e-3)


def test_plot_writes_png_with_two_panels(tmp_path):
    curves = {
        "naive": _curve([0, 0.5, 1], [0.1, 0.8, 0.1], [0.98, 0.8, 0.98]),
        "aligned": _curve([0, 0.5, 1], [0.1, 0.12, 0.1], [0.98, 0.97, 0.98]),
    }
    fig = interpolation_figure(curves)
    assert len(fig.axes) == 2 and [len(ax.lines) for ax in fig.axes] == [2, 2]
    assert list(fig.axes[0].lines[0].get_ydata()) == [0.1, 0.8, 0.1]
    path = plot_interpolation(curves, tmp_path / "plots" / "curve.png", title="digits")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width = matplotlib.image.imread(path).shape[:2]
    assert width > height > 100
    one = plot_interpolation(curves, tmp_path / "loss.png", metric="loss")
    assert matplotlib.image.imread(one).shape[1] < width
    with pytest.raises(InputError, match="no metric 'f1'"):
        plot_interpolation(curves, tmp_path / "x.png", metric="f1")
    with pytest.raises(InputError, match="no interpolation curves"):
        plot_interpolation({}, tmp_path / "x.png")


# --- end to end: the Git Re-Basin digits experiment on the real demo pair ------------------------


@pytest.fixture(scope="session")
def demo_pair(tmp_path_factory):
    # Shared base temp dir: the pair is trained once per session whichever test module asks first.
    paths = demo.demo_models(tmp_path_factory.getbasetemp() / "suture-demo-zoo", "mlp")
    return [zoo.load_module(p) for p in paths]


def test_weight_matching_removes_the_barrier_on_demo_mlps(demo_pair, tmp_path):
    from suture.merge.align.weight_matching import weight_matching
    from suture.merge.graph.trace import spec_from_module
    from suture.merge.spec import permute_state

    model_a, model_b = demo_pair
    sa, sb = model_a.state_dict(), model_b.state_dict()
    test = load_dataset("sklearn:digits")
    spec = spec_from_module(model_a, torch.zeros(2, 64))
    result = weight_matching(spec, sa, sb)
    aligned_b = permute_state(sb, spec, result.perms)
    naive = interpolation_curve(model_a, sa, sb, test, points=11)
    aligned = interpolation_curve(model_a, sa, aligned_b, test, points=11)
    ends = (naive[0]["accuracy"] + naive[-1]["accuracy"]) / 2
    assert naive[0]["accuracy"] >= 0.97 and naive[-1]["accuracy"] >= 0.97
    assert aligned[-1]["loss"] == pytest.approx(naive[-1]["loss"], rel=1e-5)  # permuting B keeps its function
    assert barrier(naive) >= 0.3
    assert barrier(aligned) <= 0.05 and barrier(aligned, kind="midpoint") <= 0.05
    assert abs(aligned[5]["accuracy"] - ends) <= 0.02
    assert aligned[5]["accuracy"] > naive[5]["accuracy"]
    plot_interpolation({"naive": naive, "weight matching": aligned}, tmp_path / "digits.png")
