"""Tests for stitch.relative (relative representations) and stitch.anchors (anchor selection)."""

from __future__ import annotations

import pytest
import torch

from suture.merge.errors import InputError, SutureError
from suture.stitch.anchors import (
    ANCHOR_METHODS,
    farthest_point_anchors,
    kmeans_anchors,
    random_anchors,
    select_anchors,
    stratified_anchors,
)
from suture.stitch.relative import NORMALIZATIONS, SIMILARITIES, RelativeProjector, relative_projection
from tests._linalg import gen, random_orthogonal
from tests._digits import digits_data, train_linear_head, train_mlp

F64 = torch.float64


def _latent(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=gen(seed), dtype=F64) * torch.linspace(0.3, 2.0, d, dtype=F64) + 0.4


def _same(anchors_a, x_a, anchors_b, x_b, **kwargs) -> bool:
    ra = RelativeProjector(**kwargs).fit(anchors_a).transform(x_a)
    rb = RelativeProjector(**kwargs).fit(anchors_b).transform(x_b)
    return torch.allclose(ra, rb, atol=1e-9)


# ---------------------------------------------------------------- invariances


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_cosine_relative_is_invariant_to_rotation_and_rescaling(normalization: str) -> None:
    x = _latent(100, 20, 1)
    anchors = x[:15]
    q = random_orthogonal(20, 2)
    x2 = 3.3 * x @ q
    assert _same(anchors, x, x2[:15], x2, normalization=normalization)
    # a translation breaks plain cosine similarity but not the anchor-centred variant
    x3 = x2 + 5.0
    assert not _same(anchors, x, x3[:15], x3, normalization=normalization)
    assert _same(anchors, x, x3[:15], x3, normalization=normalization, center_anchors=True)


def test_each_similarity_has_its_own_invariance_class() -> None:
    x = _latent(80, 12, 3)
    anchors = x[:10]
    q = random_orthogonal(12, 4)
    perm = torch.randperm(12, generator=gen(5))
    signs = torch.where(torch.rand(12, generator=gen(6)) < 0.5, -1.0, 1.0).to(F64)
    rotated_shifted = x @ q + 2.0
    permuted_flipped_shifted = x[:, perm] * signs - 1.0
    scaled = 4.0 * x
    kw = {"normalization": "none"}
    # euclidean: isometries (rotation + translation), not rescaling
    assert _same(anchors, x, rotated_shifted[:10], rotated_shifted, similarities=("euclidean",), **kw)
    assert not _same(anchors, x, scaled[:10], scaled, similarities=("euclidean",), **kw)
    # l1 / linf: coordinate permutations, sign flips and translations, not rotations
    for sim in ("l1", "linf"):
        assert _same(anchors, x, permuted_flipped_shifted[:10], permuted_flipped_shifted, similarities=(sim,), **kw)
        assert not _same(anchors, x, rotated_shifted[:10], rotated_shifted, similarities=(sim,), **kw)
    # after l2 normalisation of each relative vector, rescaling no longer matters for distance-based ones
    assert _same(anchors, x, scaled[:10], scaled, similarities=("euclidean", "l1", "linf"), normalization="l2")


def test_raw_similarities_have_the_documented_values() -> None:
    x = torch.tensor([[3.0, 4.0]], dtype=F64)
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=F64)
    assert torch.allclose(relative_projection(x, a, "cosine"), torch.tensor([[0.6, 0.8]], dtype=F64))
    d = torch.tensor([[(4 + 16) ** 0.5, (9 + 4) ** 0.5]], dtype=F64)
    assert torch.allclose(relative_projection(x, a, "euclidean"), -d)
    assert torch.allclose(relative_projection(x, a, "l1"), torch.tensor([[-6.0, -5.0]], dtype=F64))
    assert torch.allclose(relative_projection(x, a, "linf"), torch.tensor([[-4.0, -3.0]], dtype=F64))


def test_normalizations_and_aggregation() -> None:
    x = _latent(60, 8, 7)
    anchors = x[:12]
    sims = ("cosine", "euclidean", "l1", "linf")
    cat = RelativeProjector(sims, "l2").fit(anchors)
    assert cat.out_features == 48 and cat.transform(x).shape == (60, 48)
    out = cat.transform(x)
    for i in range(4):
        assert torch.allclose(out[:, 12 * i : 12 * (i + 1)].norm(dim=1), torch.ones(60, dtype=F64))
    summed = RelativeProjector(sims, "l2", aggregation="sum").fit(anchors).transform(x)
    assert torch.allclose(summed, sum(out[:, 12 * i : 12 * (i + 1)] for i in range(4)))
    ln = RelativeProjector(("cosine",), "layernorm").fit(anchors).transform(x)
    assert torch.allclose(ln.mean(dim=1), torch.zeros(60, dtype=F64), atol=1e-12)
    assert torch.allclose(ln.std(dim=1, correction=0), torch.ones(60, dtype=F64))
    centred = RelativeProjector(("cosine",), "center").fit(anchors).transform(x)
    assert torch.allclose(centred.mean(dim=1), torch.zeros(60, dtype=F64), atol=1e-12)
    # batchnorm statistics come from the reference set: standardised columns there
    bn = RelativeProjector(("cosine", "l1"), "batchnorm").fit(anchors, reference=x)
    z = bn.transform(x)
    assert torch.allclose(z.mean(dim=0), torch.zeros(24, dtype=F64), atol=1e-10)
    assert torch.allclose(z.std(dim=0, correction=0), torch.ones(24, dtype=F64))
    raw = RelativeProjector(("cosine",), "none").fit(anchors).transform(anchors)
    assert torch.allclose(torch.diagonal(raw), torch.ones(12, dtype=F64))


# ---------------------------------------------------------------- zero-shot stitching on digits


@pytest.fixture(scope="module")
def digits_pair() -> dict[str, object]:
    data = digits_data()
    a, b = train_mlp(1), train_mlp(2)
    return {
        "data": data,
        "za_train": a.latents(data.x_train),
        "zb_train": b.latents(data.x_train),
        "za_test": a.latents(data.x_test),
        "zb_test": b.latents(data.x_test),
    }


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"normalization": "batchnorm", "center_anchors": True},
        {"similarities": ("cosine", "euclidean", "l1", "linf"), "normalization": "layernorm"},
    ],
    ids=["cosine-l2", "cosine-batchnorm-centred", "product-layernorm"],
)
def test_relative_zero_shot_stitching_far_above_chance(digits_pair: dict, config: dict) -> None:
    data = digits_pair["data"]
    idx = stratified_anchors(data.y_train, 64, seed=0)
    pa = RelativeProjector(**config).fit(digits_pair["za_train"][idx])
    pb = RelativeProjector(**config).fit(digits_pair["zb_train"][idx])
    head = train_linear_head(pb.transform(digits_pair["zb_train"]), data.y_train)
    with torch.no_grad():
        acc_b = float((head(pb.transform(digits_pair["zb_test"])).argmax(1) == data.y_test).float().mean())
        acc_ab = float((head(pa.transform(digits_pair["za_test"])).argmax(1) == data.y_test).float().mean())
    assert acc_b > 0.85, acc_b
    assert acc_ab > 0.7, acc_ab  # chance is 0.10


def test_relative_vectors_of_rotated_digits_latents_are_identical(digits_pair: dict) -> None:
    za = digits_pair["za_test"]
    rotated = 0.1 * za @ random_orthogonal(za.shape[1], 8).float()
    ra = RelativeProjector().fit(za[:50]).transform(za)
    rb = RelativeProjector().fit(rotated[:50]).transform(rotated)
    assert torch.allclose(ra, rb, atol=1e-5)


# ---------------------------------------------------------------- persistence and errors


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_save_load_round_trip(tmp_path, normalization: str) -> None:
    x = _latent(40, 6, 9).float()
    proj = RelativeProjector(("cosine", "linf"), normalization, center_anchors=True).fit(x[:10], reference=x)
    path = proj.save(tmp_path / "rel.safetensors")
    loaded = RelativeProjector.load(path)
    assert loaded.get_config() == proj.get_config()
    assert torch.equal(loaded.transform(x), proj.transform(x))
    assert loaded.transform(x).dtype == torch.float32


def test_errors() -> None:
    with pytest.raises(InputError, match="unknown"):
        RelativeProjector(("cosine", "manhattan"))
    with pytest.raises(InputError, match="normalization must be one of"):
        RelativeProjector(normalization="softmax")
    with pytest.raises(InputError, match="aggregation"):
        RelativeProjector(aggregation="attention")
    with pytest.raises(SutureError, match="not fitted"):
        RelativeProjector().transform(torch.zeros(2, 3))
    proj = RelativeProjector().fit(torch.randn(5, 4, generator=gen(0)))
    with pytest.raises(InputError, match="X has 3 features; the anchors have 4"):
        proj.transform(torch.zeros(2, 3))
    with pytest.raises(InputError, match="NaN"):
        RelativeProjector().fit(torch.full((3, 2), float("nan")))
    assert set(SIMILARITIES) == {"cosine", "euclidean", "l1", "linf"}


def test_zero_vectors_give_finite_relative_vectors() -> None:
    anchors = torch.zeros(4, 3)
    anchors[1, 0] = 1.0
    x = torch.zeros(2, 3)
    for norm in NORMALIZATIONS:
        out = RelativeProjector(SIMILARITIES, norm).fit(anchors).transform(x)
        assert torch.isfinite(out).all(), norm


# ---------------------------------------------------------------- anchor selection


def _blobs(per: int = 30, k: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(seed)
    centres = torch.randn(k, 6, generator=g) * 20
    x = torch.cat([centres[i] + torch.randn(per, 6, generator=g) for i in range(k)])
    return x, torch.arange(k).repeat_interleave(per)


@pytest.mark.parametrize("method", ANCHOR_METHODS)
def test_anchor_methods_return_distinct_valid_seeded_indices(method: str) -> None:
    x, y = _blobs()
    idx = select_anchors(method, 12, features=x, labels=y, seed=3)
    assert idx.dtype == torch.long and idx.shape == (12,)
    assert idx.unique().numel() == 12 and int(idx.min()) >= 0 and int(idx.max()) < x.shape[0]
    assert torch.equal(idx, select_anchors(method, 12, features=x, labels=y, seed=3))


def test_random_anchors_depend_on_seed() -> None:
    assert not torch.equal(random_anchors(1000, 20, seed=0), random_anchors(1000, 20, seed=1))
    assert sorted(random_anchors(10, 10, seed=4).tolist()) == list(range(10))


def test_stratified_anchors_follow_class_proportions() -> None:
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 9 + [3] * 1)
    idx = stratified_anchors(labels, 20, seed=0)
    counts = torch.bincount(labels[idx], minlength=4).tolist()
    # one per class first, then the largest remaining deficit to the proportional share (12, 6, 1.8, 0.2)
    assert counts == [12, 6, 1, 1]
    few = stratified_anchors(labels, 2, seed=1)
    assert labels[few].unique().numel() == 2
    data = digits_data()
    digits_idx = stratified_anchors(data.y_train, 50, seed=0)
    assert torch.bincount(data.y_train[digits_idx], minlength=10).min() >= 4


def test_farthest_point_and_kmeans_cover_every_cluster() -> None:
    x, y = _blobs(per=40, k=6, seed=2)
    assert y[farthest_point_anchors(x, 6, seed=0)].unique().numel() == 6
    assert y[farthest_point_anchors(x, 6, seed=0, metric="cosine")].unique().numel() >= 5
    for backend in ("torch", "sklearn"):
        idx = kmeans_anchors(x, 6, seed=0, backend=backend)
        assert y[idx].unique().numel() == 6, backend
        # each anchor is the sample nearest its own cluster's mean
        for i in idx.tolist():
            members = torch.nonzero(y == y[i]).flatten()
            centre = x[members].mean(dim=0, keepdim=True)
            assert int(members[torch.cdist(centre, x[members]).argmin()]) == i


def test_kmeans_with_duplicate_points_still_returns_distinct_indices() -> None:
    x = torch.cat([torch.zeros(10, 3), torch.ones(10, 3)])
    idx = kmeans_anchors(x, 5, seed=0)
    assert idx.unique().numel() == 5


def test_anchor_errors() -> None:
    x, y = _blobs(per=3, k=2)
    with pytest.raises(InputError, match="asked for 7 anchors but only 6 samples"):
        select_anchors("kmeans", 7, features=x)
    with pytest.raises(InputError, match="positive integer"):
        random_anchors(5, 0)
    with pytest.raises(InputError, match="stratified anchors need labels"):
        select_anchors("stratified", 2, features=x)
    with pytest.raises(InputError, match="unknown anchor method"):
        select_anchors("coreset", 2, features=x)
    with pytest.raises(InputError, match="backend"):
        kmeans_anchors(x, 2, backend="faiss")
