"""Stitched models on digits MLPs: features, learned stitches, heads, the saved artifact, the planner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from suture.merge.data import load_dataset
from suture.merge.errors import InputError
from suture.merge.evaluate import evaluate
from suture.merge.demo import demo_models
from suture.merge.zoo import build_architecture, resnet_small
from suture.stitch.anchors import select_anchors
from suture.stitch.features import capture_module_features, chain_from_module, load_chain
from suture.stitch.heads import head_accuracy, train_head
from suture.stitch.learned import LinearStitch, finetune_stitch, fit_linear_stitch
from suture.stitch.planner import build_stitch, plan_stitch
from suture.stitch.relative import RelativeProjector
from suture.stitch.stitched import (
    IdentityStitch,
    RelativeStitch,
    TranslatorStitch,
    evaluate_stitched,
    load_stitched,
    make_stitched,
    predict,
)
from suture.stitch.translate import Procrustes

WIDTHS = [64, 128, 128, 10]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two digits MLPs (64-128-128-10) trained from seeds 1 and 2 (a few seconds each)."""
    pa, pb = demo_models(tmp_path_factory.mktemp("zoo"), seeds=(1, 2), widths=WIDTHS)
    return pa, pb


@pytest.fixture(scope="module")
def data():
    return load_dataset("sklearn:digits", split="train"), load_dataset("sklearn:digits", split="test")


@pytest.fixture(scope="module")
def chains(models):
    return load_chain(models[0]), load_chain(models[1])


# -- features ------------------------------------------------------------------------------------


def test_mlp_chain_matches_module_and_manual_layers(chains, data) -> None:
    a, _ = chains
    x = data[1].inputs[:50]
    mod = a.module
    assert a.num_layers == 3 and a.default_layer == 2
    assert torch.allclose(a.run(x), mod(x), atol=1e-6)
    feats = a.features(x, [0, 1, 2, 3])
    h1 = torch.relu(mod.layers[0](x))
    h2 = torch.relu(mod.layers[1](h1))
    assert torch.allclose(feats[0], x)
    assert torch.allclose(feats[1], h1, atol=1e-6)
    assert torch.allclose(feats[2], h2, atol=1e-6)
    assert torch.allclose(feats[3], mod(x), atol=1e-6)
    # prefix / suffix compose to the model at every cut
    for i in range(4):
        assert torch.allclose(a.suffix(i)(a.prefix(i)(x)), mod(x), atol=1e-5)
    assert a.resolve_layer(-1) == 3 and a.resolve_layer("layers.1") == 2
    with pytest.raises(InputError, match="out of range"):
        a.resolve_layer(4)
    with pytest.raises(InputError, match="no stage named"):
        a.resolve_layer("layers.9")


def test_resnet_and_sequential_chains_and_hooks() -> None:
    torch.manual_seed(0)
    net = resnet_small(width=4).eval()
    chain = chain_from_module(net)
    x = torch.randn(6, 64)
    assert torch.allclose(chain.run(x), net(x), atol=1e-5)
    maps = chain.features(x, [2])[2]
    assert maps.shape == (6, 4, 8, 8)
    # prefix weights are the stem + layer1 only, named as in the original module
    names = set(chain.prefix_state(2))
    assert "conv1.weight" in names and "layer1.conv1.weight" in names and not any(n.startswith(("layer2", "fc")) for n in names)

    seq = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).eval()
    sc = chain_from_module(seq)
    x = torch.randn(9, 5)
    hooked = capture_module_features(seq, x, ["1", "2"])
    assert torch.allclose(hooked["1"], torch.tanh(seq[0](x)), atol=1e-6)
    assert torch.allclose(sc.features(x, ["1"])[2], hooked["1"], atol=1e-6)
    with pytest.raises(InputError, match="no submodule"):
        capture_module_features(seq, x, ["nope"])


# -- stitching evidence on digits -------------------------------------------------------------------


def _scores(chains, data, n_anchors: int = 256):
    a, b = chains
    train, test = data
    i = j = 2
    fa, fb = a.features(train, i)[i], b.features(train, j)[j]
    idx = select_anchors("random", n_anchors, n=len(train), seed=0)
    labels = test.labels
    target_only = evaluate(b.module, test)["accuracy"]
    naive = evaluate_stitched(make_stitched(a, i, IdentityStitch(), target=b, target_layer=j), test)["accuracy"]
    proc = make_stitched(a, i, TranslatorStitch(Procrustes(scale="global").fit(fa[idx], fb[idx])), target=b, target_layer=j)
    pa, pb = RelativeProjector().fit(fa[idx]), RelativeProjector().fit(fb[idx])
    rel_head = train_head(pb.transform(fb), train.labels)
    rel = make_stitched(a, i, RelativeStitch(pa), head=rel_head)
    return target_only, naive, evaluate_stitched(proc, test)["accuracy"], evaluate_stitched(rel, test)["accuracy"], proc, labels


def test_digits_naive_vs_procrustes_vs_relative(chains, data) -> None:
    target_only, naive, proc, rel, _, _ = _scores(chains, data)
    assert target_only > 0.95
    assert naive < 0.3  # different seeds: absolute coordinates do not transfer (chance is 0.1)
    assert proc >= target_only - 0.01  # within 1 point of the unstitched target
    assert rel > 0.8  # zero-shot relative stitching, far above chance


def test_stitched_artifact_round_trip(chains, data, tmp_path: Path) -> None:
    *_, model, _ = _scores(chains, data)
    test = data[1]
    model.save(tmp_path / "st")
    manifest = json.loads((tmp_path / "st" / "stitch.json").read_text())
    assert manifest["format"] == "suture.stitched"
    assert manifest["source"]["architecture"]["factory"] == "suture.merge.zoo:mlp" and manifest["source"]["layer"] == 2
    assert manifest["stitch"]["class"] == "Procrustes" and manifest["target"]["kind"] == "torch"
    back = load_stitched(tmp_path / "st")
    x = test.inputs
    assert torch.allclose(back(x), model(x), atol=1e-5)
    # evaluates like any model
    assert evaluate(back, test)["accuracy"] == pytest.approx(evaluate_stitched(model, test)["accuracy"])
    # only A's prefix and B's suffix are stored
    from safetensors.torch import load_file

    names = load_file(str(tmp_path / "st" / "model.safetensors")).keys()
    assert {n.split(".")[0] for n in names} == {"source", "stitch", "target"}
    assert sum(n.startswith("source.") for n in names) == 4  # two Linear layers (weight, bias)
    assert sum(n.startswith("target.") for n in names) == 2  # the last Linear
    with pytest.raises(InputError, match="stitch.json"):
        load_stitched(tmp_path)


def test_relative_and_learned_artifacts_round_trip(chains, data, tmp_path: Path) -> None:
    a, b = chains
    train, test = data
    fa1, fb2 = a.features(train, 1)[1], b.features(train, 2)[2]
    proj = RelativeProjector(similarities=("cosine", "euclidean"), normalization="l2").fit(fa1[:100])
    head = train_head(proj.transform(fa1), train.labels)
    for k, stitch, kw in (
        ("rel", RelativeStitch(proj), {"head": head}),
        ("lin", fit_linear_stitch(fa1, fb2), {"target": b, "target_layer": 2}),
    ):
        m = make_stitched(a, 1, stitch, **kw)
        m.save(tmp_path / k)
        back = load_stitched(tmp_path / k)
        assert torch.allclose(back(test.inputs), m(test.inputs), atol=1e-5)
        assert evaluate(back, test)["accuracy"] > 0.9


# -- learned stitches -----------------------------------------------------------------------------


def test_closed_form_recovers_planted_affine_map() -> None:
    g = torch.Generator().manual_seed(0)
    xa = torch.randn(300, 12, generator=g)
    w = torch.randn(12, 7, generator=g)
    b = torch.randn(7, generator=g)
    st = fit_linear_stitch(xa, xa @ w + b)
    assert torch.allclose(st.weight, w.T, atol=1e-4) and torch.allclose(st.bias, b, atol=1e-4)
    # 1x1 conv: the same map at every pixel
    maps = torch.randn(20, 12, 3, 3, generator=g)
    target = torch.einsum("nchw,cd->ndhw", maps, w) + b[None, :, None, None]
    conv = fit_linear_stitch(maps, target)
    assert conv.conv and torch.allclose(conv(maps), target, atol=1e-4)
    with pytest.raises(InputError, match="not parallel"):
        fit_linear_stitch(xa, xa[:-1] @ w)
    with pytest.raises(InputError, match="spatial"):
        fit_linear_stitch(maps, torch.randn(20, 7, 2, 2))


def test_finetune_trains_only_the_stitch(chains, data) -> None:
    a, b = chains
    train, test = data
    i, j = 1, 2
    fa = a.features(train, i)[i]
    # A deliberately poor start: fitted on 20 anchors only.
    st = fit_linear_stitch(fa[:20], b.features(train, j)[j][:20], ridge=1.0)
    suffix = b.suffix(j)
    before_suffix = {k: v.clone() for k, v in suffix.state_dict().items()}
    ea = a.features(test, i)[i]
    acc0 = float((predict(lambda z: suffix(st(z)), ea) == test.labels).double().mean())
    hist = finetune_stitch(st, fa, suffix, train.labels, epochs=5, lr=1e-3)
    acc1 = float((predict(lambda z: suffix(st(z)), ea) == test.labels).double().mean())
    assert hist[-1] < hist[0]
    assert acc1 > acc0 and acc1 > 0.9
    assert all(torch.equal(v, suffix.state_dict()[k]) for k, v in before_suffix.items())
    assert all(p.requires_grad for p in suffix.parameters())  # flags restored


# -- heads ----------------------------------------------------------------------------------------


def test_heads_fit_separable_data() -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 4 + 100.0  # far from the origin: the folded standardisation matters
    y = torch.arange(300) % 3
    x = centers[y] + torch.randn(300, 8, generator=g)
    for kind in ("logistic", "linear"):
        head = train_head(x, y, kind=kind)
        assert head.in_features == 8 and head.out_features == 3
        assert head_accuracy(head, x, y) > 0.97
    with pytest.raises(InputError, match="kind"):
        train_head(x, y, kind="svm")
    with pytest.raises(InputError, match="labels"):
        train_head(x, y[:10])


def test_cross_validated_weight_decay_beats_a_weak_fixed_one_on_few_noisy_items() -> None:
    # 200 items, 300 features of which 3 carry the label: a weakly penalised head memorises noise
    g = torch.Generator().manual_seed(0)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 300, generator=g)
        return x, (x[:, :3].sum(dim=1) + 0.5 * torch.randn(n, generator=g) > 0).long()

    x, y = sample(200)
    xt, yt = sample(2000)
    for kind in ("logistic", "linear"):
        auto = train_head(x, y, kind=kind, weight_decay="auto")
        weak = train_head(x, y, kind=kind, weight_decay=1e-4)
        assert auto.weight_decay in auto.cv_scores and auto.weight_decay >= 0.1, (kind, auto.cv_scores)
        assert auto.cv_scores[auto.weight_decay] == min(auto.cv_scores.values())  # lowest held-out loss
        assert head_accuracy(auto, xt, yt) > head_accuracy(weak, xt, yt) + 0.015, kind
        assert weak.weight_decay == 1e-4 and weak.cv_scores is None
    with torch.no_grad():  # the weak logistic head is confidently wrong far more often
        ce = {h: float(nn.functional.cross_entropy(train_head(x, y, weight_decay=h)(xt), yt)) for h in ("auto", 1e-4)}
    assert ce["auto"] < ce[1e-4] - 0.3, ce
    with pytest.raises(InputError, match="weight_decay"):
        train_head(x, y, weight_decay="lots")
    with pytest.raises(InputError, match="weight_decay"):
        train_head(x, y, weight_decay=-1.0)
    # a class with a single item leaves no stratified split: the grid's middle value, said plainly
    y1 = y.clone()
    y1[0], y1[1:] = 1, 0
    assert train_head(x, y1, weight_decay="auto").cv_scores == {}


# -- planner and bad input ----------------------------------------------------------------------------


def test_planner_table_and_best_pair(chains, data) -> None:
    a, b = chains
    train, test = data
    res = plan_stitch(a, b, train, test, pairs=[[1, 1], [2, 2], [1, 2], [0, 2]], method="learned")
    rows = res["rows"]
    assert [(r["source_layer"], r["target_layer"]) for r in rows] == [(1, 1), (2, 2), (1, 2), (0, 2)]
    for r in rows:
        assert 0.0 <= r["cka"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0
    assert res["best"]["accuracy"] == max(r["accuracy"] for r in rows)
    assert res["best"]["accuracy"] > 0.95
    with pytest.raises(InputError, match="out of range"):
        plan_stitch(a, b, train, test, pairs=[[1, 7]])


def test_bad_input_errors(chains, data) -> None:
    a, b = chains
    x = torch.randn(50, 128)
    with pytest.raises(InputError, match="not parallel"):
        build_stitch("procrustes", x, torch.randn(49, 128))
    with pytest.raises(InputError, match="allow_padding"):
        build_stitch("procrustes", x, torch.randn(50, 96), {"allow_padding": False})
    padded = build_stitch("procrustes", x, torch.randn(50, 96))  # padding allowed by default
    assert padded(x).shape == (50, 96)
    with pytest.raises(InputError, match="equal shapes"):
        build_stitch("identity", x, torch.randn(50, 96))
    with pytest.raises(InputError, match="unknown stitch method"):
        build_stitch("magic", x, x)
    with pytest.raises(InputError, match="out of range"):
        make_stitched(a, 5, IdentityStitch(), target=b, target_layer=2)
    with pytest.raises(InputError, match="architecture"):
        make_stitched(chain_from_module(build_architecture("mlp", widths=WIDTHS)), 1, IdentityStitch(), head=nn.Linear(128, 10))
    with pytest.raises(InputError, match="linear stitch expects"):
        LinearStitch(3, 2)(torch.randn(2, 3, 1, 1))


def test_resnet_1x1_conv_stitch_finetune_and_round_trip(tmp_path: Path, data) -> None:
    pa, pb = demo_models(tmp_path / "zoo", kind="resnet", seeds=(1, 2), epochs=3, width=8)
    a, b = load_chain(pa), load_chain(pb)
    train, test = data
    fa, fb = a.features(train, 2)[2], b.features(train, 2)[2]
    assert fa.shape[1:] == (8, 8, 8)
    st = build_stitch("learned", fa[:200], fb[:200])
    assert isinstance(st, LinearStitch) and st.conv
    model = make_stitched(a, 2, st, target=b, target_layer=2)
    acc0 = evaluate_stitched(model, test)["accuracy"]
    finetune_stitch(st, fa, b.suffix(2), train.labels, epochs=3)
    acc1 = evaluate_stitched(model, test)["accuracy"]
    assert acc1 > acc0 + 0.05
    model.save(tmp_path / "st")
    back = load_stitched(tmp_path / "st")
    assert torch.allclose(back(test.inputs[:32]), model(test.inputs[:32]), atol=1e-4)
    # pixel-wise translators keep the map's shape
    proc = build_stitch("procrustes", fa[:200], fb[:200])
    assert proc(fa[:3]).shape == (3, 8, 8, 8)
