"""Fusing MLPs of different depths: CKA, layer alignment by dynamic programming, identity insertion."""

from __future__ import annotations

import itertools

import pytest
import torch

from suture.merge.align.depth import (
    align_layers,
    balance_depths,
    fuse_depths,
    hidden_features,
    insert_identity_layers,
    linear_cka,
)
from suture.merge.data import load_dataset
from suture.merge.errors import AlignmentError, InputError
from suture.merge.evaluate import evaluate
from suture.merge.demo import train
from suture.merge.zoo import mlp, resnet_small


@pytest.fixture(scope="module")
def data():
    return load_dataset("sklearn:digits", split="train"), load_dataset("sklearn:digits", split="test")


@pytest.fixture(scope="module")
def models(data):
    tr, _ = data
    out = {}
    for key, widths, seed in (("three", [64, 128, 128, 128, 10], 1), ("four", [64, 128, 128, 128, 128, 10], 2),
                              ("four_wide", [64, 160, 160, 160, 160, 10], 3)):
        torch.manual_seed(seed)
        m = mlp(widths)
        train(m, tr, 15, seed=seed)
        out[key] = m
    return out


def test_linear_cka_invariances():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ q + 2.0) == pytest.approx(1.0)  # rotation, scale and shift invariant
    y = torch.randn(200, 16, generator=gen, dtype=torch.float64)
    assert linear_cka(x, y) < 0.3
    assert linear_cka(x, torch.zeros(200, 4)) == 0.0
    with pytest.raises(InputError):
        linear_cka(x, y[:10])


def test_align_layers_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    for m, n in [(3, 4), (3, 6), (4, 7), (2, 5), (5, 5)]:
        cost = torch.rand(m, n, generator=gen, dtype=torch.float64)
        got = align_layers(cost)
        best = min(
            ([0, *mid, n - 1] for mid in itertools.combinations(range(1, n - 1), m - 2)),
            key=lambda cols: float(sum(cost[i, j] for i, j in enumerate(cols))),
        )
        assert got == best
    with pytest.raises(AlignmentError):
        align_layers(torch.rand(4, 3))


def test_identity_insertion_keeps_the_function(models, data):
    _, test = data
    three = models["three"]
    deeper = insert_identity_layers(three, [0, 2, 4], 5)
    assert deeper.widths == (64, 128, 128, 128, 128, 128, 10)
    assert torch.allclose(deeper(test.inputs), three(test.inputs), atol=1e-5)


def test_balance_depths_reports_cka_and_mapping(models, data):
    tr, _ = data
    a, b, info = balance_depths(models["three"], models["four"], tr)
    assert len(a.layers) == len(b.layers) == 5 and info["balanced"] == "reference" and info["inserted"] == 1
    assert len(info["cka"]) == 3 and len(info["cka"][0]) == 4
    assert info["mapping"][0] == 0 and info["mapping"][-1] == 3
    # the middle layer goes where its CKA is higher
    mid = info["mapping"][1]
    assert info["cka"][1][mid] == max(info["cka"][1][1:3])
    feats = hidden_features(models["three"], tr, max_items=64)
    assert [f.shape for f in feats] == [torch.Size([64, 128])] * 3


@pytest.mark.parametrize("options", [{}, {"ground_metric": "activations"}, {"solver": "sinkhorn", "reg": 0.01}])
def test_three_with_four_hidden_layers_end_to_end(models, data, options):
    tr, test = data
    three, four = models["three"], models["four"]
    fused = fuse_depths(three, four, tr, **options)
    assert fused.widths == [64, 128, 128, 128, 128, 10]
    acc = evaluate(fused.module, test)["accuracy"]
    ends = [evaluate(m, test)["accuracy"] for m in (three, four)]
    assert acc > 0.85, (options, acc, ends)
    assert fused.summary()["identity_layers"] == 1


def test_deeper_reference_and_different_widths(models, data):
    tr, test = data
    fused = fuse_depths(models["four_wide"], models["three"], tr, ground_metric="activations")
    assert fused.widths == [64, 160, 160, 160, 160, 10] and fused.balanced == "other"
    assert evaluate(fused.module, test)["accuracy"] > 0.85


def test_depth_bad_input(models, data):
    tr, _ = data
    with pytest.raises(InputError, match="MLP"):
        fuse_depths(resnet_small(4), models["three"], tr)
    with pytest.raises(InputError, match="calibration data"):
        fuse_depths(models["three"], models["four"], None)
    with pytest.raises(AlignmentError, match="inputs/outputs"):
        fuse_depths(models["three"], mlp([32, 16, 10]), tr)
