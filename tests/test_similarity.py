"""Tests for stitch.similarity: CKA (biased, unbiased, streaming, minibatch), SVCCA, PWCCA, Procrustes, shape metrics."""

from __future__ import annotations

import math

import pytest
import torch

from suture.merge.errors import InputError
from suture.stitch.similarity import (
    METRICS,
    MinibatchCKA,
    StreamingCKA,
    StreamingSimilarity,
    hsic_unbiased_gram,
    layer_similarity_matrix,
    layer_similarity_matrix_streaming,
    linear_cka,
    procrustes_distance,
    pwcca,
    shape_distance,
    similarity,
    svcca,
)
from tests._digits import digits_data, train_mlp

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _related(n: int = 300, dx: int = 20, dy: int = 15, noise: float = 0.7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    x = torch.randn(n, dx, generator=g, dtype=F64) * torch.linspace(0.3, 3.0, dx, dtype=F64)
    y = x @ torch.randn(dx, dy, generator=g, dtype=F64) + noise * torch.randn(n, dy, generator=g, dtype=F64)
    return x, y


def _random_orthogonal(d: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=_gen(seed), dtype=F64))
    return q * torch.sign(torch.diagonal(r))


# ---------------------------------------------------------------- reference formulas written from the papers


def _ref_cka_biased(x: torch.Tensor, y: torch.Tensor) -> float:
    """HSIC with the centring matrix H: tr(KHLH) / sqrt(tr(KHKH) tr(LHLH))."""
    n = x.shape[0]
    h = torch.eye(n, dtype=F64) - 1.0 / n
    k = h @ (x @ x.T) @ h
    lm = h @ (y @ y.T) @ h
    return float((k * lm).sum() / torch.sqrt((k * k).sum() * (lm * lm).sum()))


def _ref_hsic_u(k: torch.Tensor, lm: torch.Tensor) -> float:
    """Song et al. (2012), eq. (5), written with explicit matrices."""
    n = k.shape[0]
    kt = k - torch.diag(torch.diag(k))
    lt = lm - torch.diag(torch.diag(lm))
    one = torch.ones(n, 1, dtype=F64)
    val = torch.trace(kt @ lt) + (one.T @ kt @ one) * (one.T @ lt @ one) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (one.T @ kt @ lt @ one)
    return float(val) / (n * (n - 3))


def _ref_cka_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    k, lm = x @ x.T, y @ y.T
    return _ref_hsic_u(k, lm) / math.sqrt(_ref_hsic_u(k, k) * _ref_hsic_u(lm, lm))


def _ref_canonical_correlations(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosines of principal angles between the centred column spaces (full-rank inputs)."""
    qx, _ = torch.linalg.qr(x - x.mean(0))
    qy, _ = torch.linalg.qr(y - y.mean(0))
    return torch.linalg.svdvals(qx.T @ qy)


# ---------------------------------------------------------------- correctness against references


def test_cka_matches_reference_formulas() -> None:
    x, y = _related()
    assert linear_cka(x, y) == pytest.approx(_ref_cka_biased(x, y), rel=1e-10)
    assert linear_cka(x, y, unbiased=True) == pytest.approx(_ref_cka_unbiased(x, y), rel=1e-9)
    assert hsic_unbiased_gram(x @ x.T, y @ y.T) == pytest.approx(_ref_hsic_u(x @ x.T, y @ y.T), rel=1e-10)
    # CKA is symmetric; its value here is neither trivial 0 nor 1
    assert linear_cka(y, x) == pytest.approx(linear_cka(x, y), rel=1e-12)
    assert 0.2 < linear_cka(x, y) < 0.95


def test_wide_features_take_the_gram_route_with_identical_results() -> None:
    # d > n: features are reduced to n columns with the same Gram; compare with no reduction.
    x, y = _related(n=40, dx=200, dy=150, seed=3)
    for name in ("cka", "cka_unbiased", "procrustes", "shape_angular", "shape_euclidean", "svcca"):
        direct = StreamingSimilarity(unbiased=True).update(x, y).compute(name)[0, 0].item()
        assert similarity(x, y, name).value == pytest.approx(direct, abs=1e-8), name
    assert linear_cka(x, y) == pytest.approx(_ref_cka_biased(x, y), rel=1e-9)
    assert linear_cka(x, y, unbiased=True) == pytest.approx(_ref_cka_unbiased(x, y), rel=1e-8)


def test_biased_cka_inflated_at_small_n_unbiased_not() -> None:
    g = _gen(5)
    biased, unbiased = [], []
    for _ in range(10):
        x = torch.randn(32, 64, generator=g)
        y = torch.randn(32, 64, generator=g)
        biased.append(linear_cka(x, y))
        unbiased.append(linear_cka(x, y, unbiased=True))
    assert sum(biased) / 10 > 0.3
    assert abs(sum(unbiased) / 10) < 0.05
    assert min(unbiased) < max(unbiased)


def test_canonical_correlation_metrics_match_principal_angles() -> None:
    x, y = _related(n=400, dx=12, dy=12, noise=1.0, seed=1)
    rho = _ref_canonical_correlations(x, y)
    assert svcca(x, y, keep_variance=1.0) == pytest.approx(float(rho.mean()), abs=1e-9)
    # Full whitening (alpha=0) turns the angular shape metric into arccos(mean canonical correlation).
    assert shape_distance(x, y, alpha=0.0) == pytest.approx(math.acos(float(rho.mean())), abs=1e-7)
    # SVCCA with fewer kept directions differs from full CCA
    assert svcca(x, y, keep_dims=3) != pytest.approx(float(rho.mean()), abs=1e-3)
    # PWCCA is a weighted mean of the same correlations: between their min and max, and asymmetric
    p = pwcca(x, y)
    assert float(rho.min()) - 1e-9 <= p <= float(rho.max()) + 1e-9
    assert p != pytest.approx(pwcca(y, x), abs=1e-6)


def test_procrustes_distance_matches_explicit_alignment() -> None:
    x, y = _related(n=200, dx=10, dy=10, noise=2.0, seed=2)
    xc = x - x.mean(0)
    yc = y - y.mean(0)
    xc, yc = xc / xc.norm(), yc / yc.norm()
    u, _, vh = torch.linalg.svd(xc.T @ yc)
    best = float((xc @ (u @ vh) - yc).pow(2).sum())
    d = procrustes_distance(x, y)
    assert d == pytest.approx(best, abs=1e-10)
    # any other orthogonal map does worse
    q = _random_orthogonal(10, 9)
    assert float((xc @ q - yc).pow(2).sum()) > d
    # alpha = 1 shape metric is the angle whose chord is the Procrustes distance
    theta = shape_distance(x, y, alpha=1.0)
    assert d == pytest.approx(2 - 2 * math.cos(theta), abs=1e-9)
    assert shape_distance(x, y, alpha=1.0, kind="euclidean") == pytest.approx(math.sqrt(d), abs=1e-9)


def test_shape_metric_interpolates_and_is_a_metric_in_alpha() -> None:
    x, y = _related(n=300, dx=8, dy=8, noise=1.5, seed=4)
    z, _ = _related(n=300, dx=8, dy=8, seed=7)
    values = [shape_distance(x, y, alpha=a) for a in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert len(set(round(v, 8) for v in values)) == 5
    for a in (0.0, 0.5, 1.0):
        for kind in ("angular", "euclidean"):
            dxy = shape_distance(x, y, a, kind)
            dyz = shape_distance(y, z[:, :8], a, kind)
            dxz = shape_distance(x, z[:, :8], a, kind)
            assert dxz <= dxy + dyz + 1e-9  # triangle inequality (Williams et al., 2021)
            assert dxy == pytest.approx(shape_distance(y, x, a, kind), abs=1e-9)


# ---------------------------------------------------------------- invariances


@pytest.mark.parametrize("name", sorted(METRICS))
def test_rotated_rescaled_translated_copy_is_identical(name: str) -> None:
    x, _ = _related(n=250, dx=16, dy=4, seed=6)
    x2 = 3.7 * x @ _random_orthogonal(16, 1) + torch.randn(16, generator=_gen(2), dtype=F64)
    value = similarity(x, x2, name).value
    same = 1.0 if METRICS[name].higher_is_more_similar else 0.0
    assert value == pytest.approx(same, abs=1e-6)


def test_cka_equals_one_on_rotated_digits_latents() -> None:
    za = train_mlp(1).latents(digits_data().x_test)
    rotated = 0.25 * za @ _random_orthogonal(za.shape[1], 3).float()
    assert linear_cka(za, rotated) == pytest.approx(1.0, abs=1e-5)
    assert linear_cka(za, rotated, unbiased=True) == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------- two digits MLPs from different seeds


def test_digits_models_similar_random_features_not() -> None:
    data = digits_data()
    za = train_mlp(1).latents(data.x_test)
    zb = train_mlp(2).latents(data.x_test)
    rand = torch.randn(za.shape, generator=_gen(0))
    cka_ab = linear_cka(za, zb)
    cka_ar = linear_cka(za, rand)
    assert cka_ab > 0.9, cka_ab
    assert cka_ar < 0.1, cka_ar
    assert abs(linear_cka(za, rand, unbiased=True)) < 0.03
    # Each metric's declared direction ranks the trained pair above the random pair.
    for name, met in METRICS.items():
        ab = similarity(za, zb, name)
        ar = similarity(za, rand, name)
        assert ab.n == za.shape[0]
        assert ab.higher_is_more_similar == met.higher_is_more_similar
        assert (ab.value > ar.value) == met.higher_is_more_similar, (name, ab.value, ar.value)


# ---------------------------------------------------------------- streaming and layer matrices


def test_streaming_equals_in_memory_for_every_metric() -> None:
    x, y = _related(n=257, dx=12, dy=9, seed=8)
    # a large offset would cost precision if sums were not shifted
    x = x + 1e4
    acc = StreamingSimilarity(unbiased=True)
    for lo, hi in [(0, 100), (100, 101), (101, 200), (200, 257)]:
        acc.update(x[lo:hi], y[lo:hi])
    assert acc.n == 257 and acc.batches == 4
    for name in METRICS:
        assert acc.compute(name)[0, 0].item() == pytest.approx(similarity(x, y, name).value, abs=1e-8), name


def test_streaming_cka_reports_n_and_matches() -> None:
    x, y = _related(n=120, seed=9)
    acc = StreamingCKA()
    for i in range(0, 120, 25):
        acc.update(x[i : i + 25].float(), y[i : i + 25].float())
    assert acc.n == 120
    assert acc.value() == pytest.approx(linear_cka(x, y), abs=1e-6)
    assert acc.value(unbiased=True) == pytest.approx(linear_cka(x, y, unbiased=True), abs=1e-6)


def _layers(n: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = _gen(seed)
    base = torch.randn(n, 10, generator=g, dtype=F64)
    a = [base @ torch.randn(10, 12, generator=g, dtype=F64), torch.tanh(base @ torch.randn(10, 7, generator=g, dtype=F64))]
    b = [base @ torch.randn(10, 9, generator=g, dtype=F64) + torch.randn(n, 9, generator=g, dtype=F64), torch.randn(n, 2, 3, generator=g, dtype=F64), a[0].clone()]
    return a, b


def test_layer_similarity_matrix_matches_pairwise_and_streaming() -> None:
    a, b = _layers(180, 11)
    for name in ("cka", "cka_unbiased", "procrustes", "pwcca"):
        mat = layer_similarity_matrix(a, b, metric=name)
        assert mat.shape == (2, 3)
        for i in range(2):
            for j in range(3):
                assert mat[i, j].item() == pytest.approx(similarity(a[i], b[j], name).value, abs=1e-9)
        batches = [([t[k : k + 50] for t in a], [t[k : k + 50] for t in b]) for k in range(0, 180, 50)]
        streamed = layer_similarity_matrix_streaming(iter(batches), metric=name)
        assert torch.allclose(streamed, mat, atol=1e-8)
    cka = layer_similarity_matrix(a, b)
    assert cka[0, 2].item() == pytest.approx(1.0, abs=1e-12)  # B's third layer is a copy of A's first
    assert cka[0, 1].item() < 0.2  # independent noise layer


def test_minibatch_cka_is_the_average_of_batch_hsics() -> None:
    a, b = _layers(120, 12)
    batches = [([t[k : k + 40] for t in a], [t[k : k + 40] for t in b]) for k in range(0, 120, 40)]
    batches.append(([t[:2] for t in a], [t[:2] for t in b]))  # too small: skipped
    mat = layer_similarity_matrix_streaming(batches, metric="cka", mode="minibatch")
    for i in range(2):
        for j in range(3):
            kl = sum(_ref_hsic_u(fa[i] @ fa[i].T, fb[j].reshape(40, -1) @ fb[j].reshape(40, -1).T) for fa, fb in batches[:3])
            kk = sum(_ref_hsic_u(fa[i] @ fa[i].T, fa[i] @ fa[i].T) for fa, _ in batches[:3])
            ll = sum(_ref_hsic_u(fb[j].reshape(40, -1) @ fb[j].reshape(40, -1).T, fb[j].reshape(40, -1) @ fb[j].reshape(40, -1).T) for _, fb in batches[:3])
            assert mat[i, j].item() == pytest.approx(kl / math.sqrt(kk * ll), abs=1e-9)
    mb = MinibatchCKA()
    for fa, fb in batches:
        mb.update(fa, fb)
    assert (mb.n, mb.batches, mb.skipped) == (120, 3, 1)
    assert mat[0, 2].item() == pytest.approx(1.0, abs=1e-12)


# ---------------------------------------------------------------- robustness


def _degenerate_inputs() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    g = _gen(13)
    low_rank = torch.randn(200, 3, generator=g) @ torch.randn(3, 64, generator=g)
    dup = torch.randn(100, 5, generator=g).repeat(1, 4)
    const_cols = torch.cat([torch.randn(80, 6, generator=g), torch.full((80, 10), 2.5)], dim=1)
    wide = torch.randn(20, 384, generator=g)
    return [
        ("rank3-in-64d", low_rank, low_rank @ torch.randn(64, 32, generator=g)),
        ("duplicated columns", dup, torch.randn(100, 8, generator=g)),
        ("constant columns", const_cols, const_cols[:, :6] + 0.1 * torch.randn(80, 6, generator=g)),
        ("n < d", wide, wide @ torch.randn(384, 384, generator=g)),
        ("all constant", torch.ones(30, 8), torch.randn(30, 4, generator=g)),
        ("both constant", torch.zeros(30, 8), torch.zeros(30, 4)),
        ("float16 rank-1", (torch.randn(50, 1, generator=g) @ torch.randn(1, 16, generator=g)).half(), torch.randn(50, 16, generator=g).half()),
        ("four rows", torch.randn(4, 10, generator=g), torch.randn(4, 3, generator=g)),
    ]


@pytest.mark.parametrize("name", sorted(METRICS))
def test_no_nan_on_rank_deficient_or_degenerate_inputs(name: str) -> None:
    for label, x, y in _degenerate_inputs():
        for kwargs in ({}, {"alpha": 0.0}, {"alpha": 0.5}) if name.startswith("shape") else ({},):
            v = similarity(x, y, name, **kwargs).value
            assert math.isfinite(v), (label, name, kwargs, v)
    # a rank-deficient space compared with a rotated copy of itself is still "identical"
    low_rank = _degenerate_inputs()[0][1]
    v = similarity(low_rank, low_rank @ _random_orthogonal(64, 4).float(), name).value
    assert v == pytest.approx(1.0 if METRICS[name].higher_is_more_similar else 0.0, abs=1e-4), name


def test_layer_matrix_has_no_nan_with_degenerate_layers() -> None:
    g = _gen(14)
    a = [torch.zeros(40, 5), torch.randn(40, 3, generator=g) @ torch.randn(3, 30, generator=g)]
    b = [torch.randn(40, 100, generator=g), torch.ones(40, 2)]
    for name in METRICS:
        assert torch.isfinite(layer_similarity_matrix(a, b, metric=name)).all(), name


# ---------------------------------------------------------------- errors


def test_errors_name_what_is_wrong() -> None:
    x, y = _related(n=50)
    with pytest.raises(InputError, match=r"A\[0\]=50.*B\[0\]=49"):
        similarity(x, y[:49])
    with pytest.raises(InputError, match="unknown similarity metric 'cca2'"):
        similarity(x, y, "cca2")
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        linear_cka(bad, y)
    with pytest.raises(InputError, match="at least 4 samples, got 3"):
        linear_cka(x[:3], y[:3], unbiased=True)
    with pytest.raises(InputError, match="alpha must be in"):
        shape_distance(x, y, alpha=1.5)
    acc = StreamingSimilarity().update(x[:10], y[:10])
    with pytest.raises(InputError, match="width 19 differs from 20"):
        acc.update(x[10:20, :19], y[10:20])
    with pytest.raises(InputError, match="needs unbiased statistics"):
        StreamingSimilarity(unbiased=False).update(x, y).compute("cka_unbiased")
    with pytest.raises(InputError, match="supports only CKA"):
        layer_similarity_matrix_streaming([([x], [y])], metric="procrustes", mode="minibatch")
