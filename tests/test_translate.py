"""Tests for stitch.translate: latent translation estimators, their invariances, persistence and errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from suture.merge.errors import InputError, SutureError
from suture.stitch.relative import RelativeProjector
from suture.stitch.translate import (
    TRANSLATORS,
    Affine,
    LeastSquares,
    OrthogonalizedLeastSquares,
    OTTranslator,
    Procrustes,
    Translator,
    load_translator,
)
from tests._linalg import gen, random_orthogonal
from tests._digits import digits_data, train_mlp

F64 = torch.float64


def _latent(n: int, d: int, seed: int) -> torch.Tensor:
    g = gen(seed)
    return torch.randn(n, d, generator=g, dtype=F64) * torch.linspace(0.2, 2.0, d, dtype=F64) + 0.5


def _all_translators() -> list[Translator]:
    return [Procrustes(), Procrustes(scale="global"), LeastSquares(), LeastSquares(ridge=0.1), OrthogonalizedLeastSquares(), Affine(), OTTranslator(), OTTranslator(reg=0.05)]


# ---------------------------------------------------------------- stitching two digits MLPs


@pytest.fixture(scope="module")
def digits_pair() -> dict[str, object]:
    data = digits_data()
    a, b = train_mlp(1), train_mlp(2)
    return {
        "data": data,
        "A": a,
        "B": b,
        "za_train": a.latents(data.x_train),
        "zb_train": b.latents(data.x_train),
        "za_test": a.latents(data.x_test),
        "zb_test": b.latents(data.x_test),
    }


def test_procrustes_stitch_matches_b_and_absolute_stitch_is_chance(digits_pair: dict) -> None:
    data, b = digits_pair["data"], digits_pair["B"]
    acc_b = b.accuracy_from_latents(digits_pair["zb_test"], data.y_test)
    acc_a = digits_pair["A"].accuracy_from_latents(digits_pair["za_test"], data.y_test)
    absolute = b.accuracy_from_latents(digits_pair["za_test"], data.y_test)
    assert acc_a > 0.93 and acc_b > 0.93
    assert absolute < 0.25, absolute  # chance is 0.10
    n = digits_pair["za_train"].shape[0]
    stitched = []
    for seed in range(3):  # three draws of 64 anchors: 64 anchors leave a little variance per draw
        idx = torch.randperm(n, generator=gen(seed))[:64]
        tr = Procrustes().fit(digits_pair["za_train"][idx], digits_pair["zb_train"][idx])
        stitched.append(b.accuracy_from_latents(tr.transform(digits_pair["za_test"]), data.y_test))
    assert sum(stitched) / 3 >= acc_b - 0.015, (stitched, acc_b)
    assert min(stitched) >= acc_b - 0.03, (stitched, acc_b)


@pytest.mark.parametrize("translator", _all_translators(), ids=repr)
def test_every_translator_stitches_far_above_chance(digits_pair: dict, translator: Translator) -> None:
    data, b = digits_pair["data"], digits_pair["B"]
    idx = torch.randperm(digits_pair["za_train"].shape[0], generator=gen(0))[:64]
    translator.fit(digits_pair["za_train"][idx], digits_pair["zb_train"][idx])
    out = translator.transform(digits_pair["za_test"])
    assert out.shape == digits_pair["zb_test"].shape and out.dtype == torch.float32
    assert b.accuracy_from_latents(out, data.y_test) > 0.85


# ---------------------------------------------------------------- exactness on planted maps


def test_procrustes_exact_on_rotated_rescaled_translated_copy() -> None:
    x = _latent(300, 24, 1)
    q = random_orthogonal(24, 2)
    shift = torch.randn(24, generator=gen(3), dtype=F64)
    y = 2.5 * x @ q + shift
    x_new = _latent(50, 24, 4)
    tr = Procrustes(scale="global").fit(x[:40], y[:40])
    assert torch.allclose(tr.transform(x_new), 2.5 * x_new @ q + shift, atol=1e-9)
    # R itself is the planted rotation
    assert torch.allclose(tr.state_dict()["R"], q, atol=1e-9)
    # Per-feature standard scaling does not commute with a rotation: not exact, only close.
    err = (Procrustes(scale="feature").fit(x[:40], y[:40]).transform(x_new) - (2.5 * x_new @ q + shift)).abs().max()
    assert err > 1e-3


def test_per_feature_scaling_exact_on_permuted_and_scaled_units() -> None:
    x = _latent(200, 16, 5)
    g = gen(6)
    perm = torch.randperm(16, generator=g)
    scales = torch.rand(16, generator=g, dtype=F64) * 3 + 0.2
    f = lambda z: z[:, perm] * scales - 1.0  # noqa: E731
    x_new = _latent(30, 16, 7)
    for tr in (Procrustes(), OrthogonalizedLeastSquares(), OTTranslator()):
        tr.fit(x, f(x))
        assert torch.allclose(tr.transform(x_new), f(x_new), atol=1e-8), repr(tr)


def test_ot_translator_recovers_planted_unit_permutation_of_digits_latents(digits_pair: dict) -> None:
    za = digits_pair["za_train"].double()
    g = gen(8)
    perm = torch.randperm(za.shape[1], generator=g)
    f = lambda z: z[:, perm] * 2.0 + 0.3  # noqa: E731
    ot = OTTranslator().fit(za[:300], f(za[:300]))
    assert torch.allclose(ot.transform(digits_pair["za_test"].double()), f(digits_pair["za_test"].double()), atol=1e-6)
    # the exact plan of equal widths is a permutation matrix divided by the width
    assert ot.plan_ is not None and int((ot.plan_ > 1e-12).sum()) == za.shape[1]


def test_least_squares_and_affine_exact_on_linear_maps() -> None:
    x = _latent(100, 10, 9)
    w = torch.randn(10, 7, generator=gen(10), dtype=F64)
    bias = torch.randn(7, generator=gen(11), dtype=F64)
    x_new = _latent(20, 10, 12)
    ls = LeastSquares().fit(x, x @ w + bias)
    assert torch.allclose(ls.transform(x_new), x_new @ w + bias, atol=1e-8)
    aff = Affine().fit(x, x @ w + bias)
    assert torch.allclose(aff.transform(x_new), x_new @ w + bias, atol=1e-8)
    assert torch.allclose(aff.state_dict()["W"], w, atol=1e-8) and torch.allclose(aff.state_dict()["b"], bias, atol=1e-8)
    # without centring and without a bias, an offset cannot be fitted
    assert not torch.allclose(LeastSquares(center=False, scale=False).fit(x, x @ w + 5.0).transform(x_new), x_new @ w + 5.0, atol=1e-3)
    # ridge shrinks the map
    assert LeastSquares(ridge=1e3).fit(x, x @ w).state_dict()["W"].norm() < ls.state_dict()["W"].norm()


# ---------------------------------------------------------------- widths and padding


@pytest.mark.parametrize("dx,dy", [(6, 10), (10, 6)])
def test_padding_equals_explicit_zero_padding(dx: int, dy: int) -> None:
    x = _latent(80, dx, 13)
    y = _latent(80, dy, 14) + x[:, :1]
    tr = Procrustes(center=True, scale=False).fit(x, y)
    xc, yc = x - x.mean(0), y - y.mean(0)
    d = max(dx, dy)
    xp = torch.cat([xc, xc.new_zeros(80, d - dx)], 1)
    yp = torch.cat([yc, yc.new_zeros(80, d - dy)], 1)
    u, _, vh = torch.linalg.svd(xp.T @ yp)
    explicit = (xp @ (u @ vh))[:, :dy] + y.mean(0)
    assert torch.allclose(tr.transform(x), explicit, atol=1e-9)


def test_narrow_to_wide_isometric_embedding_is_exact() -> None:
    x = _latent(60, 5, 15)
    emb = random_orthogonal(9, 16)[:5]  # 5 x 9, orthonormal rows
    y = x @ emb + 1.0
    for tr in (Procrustes(scale=False), OrthogonalizedLeastSquares(scale=False)):
        assert torch.allclose(tr.fit(x, y).transform(x), y, atol=1e-9)


def test_padding_refused_when_not_allowed() -> None:
    x, y = _latent(30, 8, 17), _latent(30, 12, 18)
    for cls in (Procrustes, OrthogonalizedLeastSquares):
        with pytest.raises(InputError, match=r"X has 8 features, Y has 12.*allow_padding=False"):
            cls(allow_padding=False).fit(x, y)
    Procrustes(allow_padding=False).fit(x, y[:, :8])  # equal widths are fine


# ---------------------------------------------------------------- robustness and errors


@pytest.mark.parametrize("translator", _all_translators(), ids=repr)
def test_rank_deficient_anchors_give_finite_output(translator: Translator) -> None:
    g = gen(19)
    x = torch.randn(20, 3, generator=g) @ torch.randn(3, 48, generator=g)  # 20 anchors, rank 3, 48-d
    x[:, 5] = 1.0  # a constant unit
    y = torch.relu(torch.randn(20, 32, generator=g))
    y[:, :4] = 0.0  # dead units
    out = translator.fit(x, y).transform(torch.randn(7, 48, generator=g))
    assert out.shape == (7, 32) and torch.isfinite(out).all()


def test_errors() -> None:
    x, y = _latent(30, 8, 20), _latent(29, 8, 21)
    for tr in _all_translators():
        with pytest.raises(InputError, match=r"X \(model A\) has 30 rows, Y \(model B\) has 29"):
            tr.fit(x, y)
    with pytest.raises(SutureError, match="not fitted"):
        Procrustes().transform(x)
    tr = Procrustes().fit(x, x)
    with pytest.raises(InputError, match="has 7 features; this translator was fitted on 8"):
        tr.transform(x[:, :7])
    with pytest.raises(InputError, match="scale must be"):
        Procrustes(scale="robust")
    with pytest.raises(InputError, match="NaN"):
        Procrustes().fit(torch.full((3, 2), float("nan")), torch.zeros(3, 2))
    with pytest.raises(InputError, match="cost must be"):
        OTTranslator(cost="cosine")


# ---------------------------------------------------------------- persistence


@pytest.mark.parametrize("translator", _all_translators(), ids=repr)
def test_save_load_round_trip(tmp_path, translator: Translator) -> None:
    x, y = _latent(50, 12, 22), _latent(50, 9, 23) + _latent(50, 12, 22)[:, :9]
    translator.fit(x, y)
    path = tmp_path / "sub" / "t.safetensors"
    translator.save(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["suture.class"] == type(translator).__name__
    assert json.loads(meta["suture.config"]) == translator.get_config()
    for loaded in (load_translator(path), type(translator).load(path)):
        assert type(loaded) is type(translator) and loaded.get_config() == translator.get_config()
        assert torch.equal(loaded.transform(x), translator.transform(x))
    fresh = type(translator)(**translator.get_config()).load_state_dict(translator.state_dict())
    assert torch.equal(fresh.transform(x), translator.transform(x))
    assert not list(path.parent.glob(".tmp-*"))
    assert set(TRANSLATORS) >= {type(translator).__name__}


def test_load_rejects_wrong_files(tmp_path) -> None:
    x = _latent(20, 4, 24)
    p = Procrustes().fit(x, x).save(tmp_path / "p.safetensors")
    with pytest.raises(InputError, match="holds a Procrustes, not a LeastSquares"):
        LeastSquares.load(p)
    rel = RelativeProjector().fit(x).save(tmp_path / "r.safetensors")
    with pytest.raises(InputError, match="expected 'translator'"):
        load_translator(rel)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="not a readable safetensors file"):
        load_translator(junk)
    with pytest.raises(InputError, match="no such file"):
        load_translator(tmp_path / "missing.safetensors")
    with pytest.raises(InputError, match=r"missing tensors \['R'\]"):
        Procrustes().load_state_dict({k: v for k, v in Procrustes().fit(x, x).state_dict().items() if k != "R"})
