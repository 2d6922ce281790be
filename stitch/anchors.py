"""Anchor selection: which samples serve as the parallel anchors for relative representations and translation.

Every selector is seeded, returns a 1-D int64 tensor of distinct sample indices, and never needs the
second model: anchors are picked in one model's space (or from labels) and then encoded by every model.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from suture.merge.errors import InputError

logger = logging.getLogger(__name__)

__all__ = [
    "ANCHOR_METHODS",
    "farthest_point_anchors",
    "kmeans_anchors",
    "random_anchors",
    "select_anchors",
    "stratified_anchors",
]

ANCHOR_METHODS = ("random", "stratified", "farthest", "kmeans")


def _check_k(k: int, n: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise InputError(f"number of anchors k must be a positive integer, got {k!r}")
    if k > n:
        raise InputError(f"asked for {k} anchors but only {n} samples are available")


def _features(x: Any) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 2 or t.shape[0] == 0:
        raise InputError(f"features: expected a non-empty 2-D (samples, features) tensor, got shape {tuple(t.shape)}")
    t = t.to(torch.float64) if not t.is_floating_point() else t.to(torch.promote_types(t.dtype, torch.float32))
    if not bool(torch.isfinite(t).all()):
        raise InputError("features: contain NaN or infinite values")
    return t


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def random_anchors(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """k distinct indices drawn uniformly from range(n)."""
    _check_k(k, n)
    return torch.randperm(n, generator=_generator(seed))[:k]


def stratified_anchors(labels: Any, k: int, seed: int = 0) -> torch.Tensor:
    """k indices spread over classes in proportion to class size, at least one per class when k allows.

    Allocation: one anchor per class first (if k >= number of classes), the rest by largest remainder
    of the proportional share, never more than a class holds. With fewer anchors than classes, k
    classes are drawn at random and contribute one anchor each.
    """
    y = torch.as_tensor(labels)
    if y.ndim != 1 or y.numel() == 0:
        raise InputError(f"labels: expected a non-empty 1-D tensor, got shape {tuple(y.shape)}")
    n = y.numel()
    _check_k(k, n)
    g = _generator(seed)
    classes, counts = torch.unique(y, return_counts=True)
    c = classes.numel()
    alloc = torch.zeros(c, dtype=torch.long)
    if k < c:
        logger.info("stratified anchors: %d anchors for %d classes; drawing %d classes", k, c, k)
        alloc[torch.randperm(c, generator=g)[:k]] = 1
    else:
        alloc += 1
        left = k - c
        while left > 0:
            room = counts - alloc
            share = counts.to(torch.float64) / n * k - alloc.to(torch.float64)
            share[room <= 0] = -float("inf")
            # Largest remaining proportional deficit first; ties broken by class order.
            alloc[int(torch.argmax(share))] += 1
            left -= 1
    picks = []
    for cls, m in zip(classes.tolist(), alloc.tolist()):
        if m == 0:
            continue
        idx = torch.nonzero(y == cls, as_tuple=False).flatten()
        picks.append(idx[torch.randperm(idx.numel(), generator=g)[:m]])
    return torch.sort(torch.cat(picks)).values


def farthest_point_anchors(features: Any, k: int, seed: int = 0, metric: str = "euclidean") -> torch.Tensor:
    """Greedy farthest-point sampling: start at a seeded random sample, then repeatedly add the sample farthest from the chosen set."""
    x = _features(features)
    n = x.shape[0]
    _check_k(k, n)
    if metric == "cosine":
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    elif metric != "euclidean":
        raise InputError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    first = int(torch.randint(n, (1,), generator=_generator(seed)))
    chosen = [first]
    dist = (x - x[first]).norm(dim=1)
    dist[first] = -1.0
    for _ in range(k - 1):
        # Already-chosen samples have distance 0 (or -1) and are never re-picked while others remain;
        # duplicates of chosen samples also sit at 0, so the argmax prefers genuinely new points.
        nxt = int(torch.argmax(dist))
        chosen.append(nxt)
        dist = torch.minimum(dist, (x - x[nxt]).norm(dim=1))
        dist[chosen] = -1.0
    return torch.tensor(chosen, dtype=torch.long)


def _kmeans_torch(x: torch.Tensor, k: int, g: torch.Generator, n_iter: int) -> tuple[torch.Tensor, float]:
    """Lloyd's k-means with k-means++ seeding; returns centroids (k, d) and inertia."""
    n = x.shape[0]
    centroids = [x[int(torch.randint(n, (1,), generator=g))]]
    d2 = (x - centroids[0]).pow(2).sum(dim=1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:
            idx = int(torch.randint(n, (1,), generator=g))
        else:
            idx = int(torch.multinomial((d2 / total).cpu(), 1, generator=g))
        centroids.append(x[idx])
        d2 = torch.minimum(d2, (x - x[idx]).pow(2).sum(dim=1))
    c = torch.stack(centroids)
    assign = None
    for _ in range(n_iter):
        new = torch.cdist(x, c).argmin(dim=1)
        if assign is not None and bool((new == assign).all()):
            break
        assign = new
        for j in range(k):
            members = x[assign == j]
            if members.shape[0] > 0:
                c[j] = members.mean(dim=0)
    inertia = float(torch.cdist(x, c).min(dim=1).values.pow(2).sum())
    return c, inertia


def kmeans_anchors(
    features: Any, k: int, seed: int = 0, backend: str = "torch", n_iter: int = 100, n_init: int = 4
) -> torch.Tensor:
    """Cluster the features into k groups (best of n_init runs) and take, per centroid, the nearest sample not already taken."""
    x = _features(features)
    n = x.shape[0]
    _check_k(k, n)
    if n_init < 1:
        raise InputError(f"n_init must be >= 1, got {n_init}")
    if backend == "torch":
        g = _generator(seed)
        # Single k-means++ runs often merge two clusters; keep the restart with the lowest inertia.
        centroids, _ = min((_kmeans_torch(x, k, g, n_iter) for _ in range(n_init)), key=lambda r: r[1])
    elif backend == "sklearn":
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=k, n_init=n_init, max_iter=n_iter, random_state=int(seed)).fit(x.cpu().numpy())
        centroids = torch.as_tensor(km.cluster_centers_, dtype=x.dtype, device=x.device)
    else:
        raise InputError(f"backend must be 'torch' or 'sklearn', got {backend!r}")
    dist = torch.cdist(centroids, x)
    taken = torch.zeros(n, dtype=torch.bool, device=x.device)
    out = []
    for j in range(k):
        # Two centroids may share a nearest sample (duplicates, empty clusters): take the next nearest.
        dj = dist[j].masked_fill(taken, float("inf"))
        idx = int(torch.argmin(dj))
        taken[idx] = True
        out.append(idx)
    return torch.tensor(out, dtype=torch.long)


def select_anchors(
    method: str,
    k: int,
    *,
    features: Any | None = None,
    labels: Any | None = None,
    n: int | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> torch.Tensor:
    """Pick k anchor indices with one of ANCHOR_METHODS ("random", "stratified", "farthest", "kmeans")."""
    if method == "random":
        if n is None:
            if features is not None:
                n = int(torch.as_tensor(features).shape[0])
            elif labels is not None:
                n = int(torch.as_tensor(labels).shape[0])
            else:
                raise InputError("random anchors need n, features or labels to know how many samples exist")
        return random_anchors(n, k, seed)
    if method == "stratified":
        if labels is None:
            raise InputError("stratified anchors need labels")
        return stratified_anchors(labels, k, seed)
    if method in ("farthest", "kmeans"):
        if features is None:
            raise InputError(f"{method} anchors need features")
        fn = farthest_point_anchors if method == "farthest" else kmeans_anchors
        return fn(features, k, seed, **kwargs)
    raise InputError(f"unknown anchor method {method!r}; expected one of {list(ANCHOR_METHODS)}")
