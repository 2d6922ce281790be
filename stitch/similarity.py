"""Representation similarity: linear CKA, SVCCA, PWCCA, Procrustes distance and generalized shape metrics.

Every metric here is a function of the joint second moments of the two feature sets: the centred
scatter matrices X^T X, Y^T Y, X^T Y (plus, for the unbiased CKA estimator, a few sums of squared
norms). One code path therefore serves in-memory tensors (a single "batch") and streams of batches
(:class:`StreamingSimilarity`). An n x n Gram matrix is formed only to shrink in-memory features that
are wider than they are many (an exact reduction for every metric but PWCCA) and in
:class:`MinibatchCKA`, which follows the minibatch estimator of Nguyen et al. (2021). Linear CKA and the
HSIC estimators themselves live in :mod:`merge.measure`, shared with depth alignment.

Conventions:

* Features are ``(n, ...)`` tensors; trailing axes are flattened. Work is done in float64.
* Each metric in :data:`METRICS` declares ``higher_is_more_similar``.
* Degenerate input (a side with zero variance, fewer canonical directions than needed) never yields
  NaN: the metric returns its "least similar" value and logs a warning. Eigenvalues of scatter
  matrices are floored relative to the largest one, so rank-deficient features are handled by
  working in their range instead of inverting noise.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from suture.merge.errors import InputError
from suture.merge.measure import as_features, cka_from_hsic, cka_from_scatter, hsic_unbiased_gram, hsic_unbiased_sums, linear_cka

logger = logging.getLogger(__name__)

__all__ = [
    "EIG_RTOL",
    "METRICS",
    "Metric",
    "MinibatchCKA",
    "Moments",
    "SimilarityResult",
    "StreamingCKA",
    "StreamingSimilarity",
    "hsic_unbiased_gram",
    "layer_similarity_matrix",
    "layer_similarity_matrix_streaming",
    "linear_cka",
    "procrustes_distance",
    "pwcca",
    "shape_distance",
    "similarity",
    "svcca",
]

_DTYPE = torch.float64
# A direction whose variance is below EIG_RTOL times the largest variance is treated as absent. In
# float64 this keeps rounding noise of rank-deficient float32 features (relative ~1e-14) out of CCA
# and whitening, while any direction with a singular value above ~1e-5 of the largest is kept.
EIG_RTOL = 1e-10


# --------------------------------------------------------------------------------------------------
# input handling


def _centre_and_reduce(x: torch.Tensor) -> torch.Tensor:
    """Centre `x` and, when it has more columns than rows, replace it by an n-column matrix with the same Gram.

    Valid for metrics invariant to orthogonal maps of the feature space (all here except PWCCA): the
    centred data X equals U S V^T, and every such metric of X equals that of U S.
    """
    x = x - x.mean(dim=0, keepdim=True)
    n, d = x.shape
    if d <= n:
        return x
    evals, evecs = torch.linalg.eigh(x @ x.T)
    evals = evals.clamp_min(0.0)
    keep = evals > EIG_RTOL * evals.max().clamp_min(torch.finfo(_DTYPE).tiny)
    if not bool(keep.any()):
        return x.new_zeros(n, 1)
    return evecs[:, keep] * evals[keep].sqrt()


# --------------------------------------------------------------------------------------------------
# moments


@dataclass
class Moments:
    """Centred second moments of one (X, Y) pair: what every metric in this module is computed from.

    ``sxx``, ``syy``, ``sxy`` are centred scatter matrices (sums, not averages). ``hsic_u`` holds the
    unbiased HSIC estimates (K,L), (K,K), (L,L) for linear kernels when they were accumulated.
    """

    n: int
    sxx: torch.Tensor
    syy: torch.Tensor
    sxy: torch.Tensor
    hsic_u: tuple[float, float, float] | None = None

    def normalized(self) -> "Moments":
        """Moments of X/||X||_F and Y/||Y||_F (centred); a zero-variance side stays zero."""
        tx = float(torch.trace(self.sxx))
        ty = float(torch.trace(self.syy))
        fx = 1.0 / tx if tx > 0 else 0.0
        fy = 1.0 / ty if ty > 0 else 0.0
        return Moments(self.n, self.sxx * fx, self.syy * fy, self.sxy * math.sqrt(fx * fy), self.hsic_u)


class _SideStats:
    """Running sums for one feature set (one layer of one model)."""

    def __init__(self, unbiased: bool) -> None:
        self.unbiased = unbiased
        self.n = 0
        self.shift: torch.Tensor | None = None
        self.s: torch.Tensor | None = None  # sum of shifted rows
        self.S: torch.Tensor | None = None  # shifted X^T X
        self.sum_a = 0.0  # sum of squared row norms
        self.sum_a2 = 0.0  # sum of fourth powers of row norms
        self.ax: torch.Tensor | None = None  # sum_i |x_i|^2 x_i

    def prepare(self, x: torch.Tensor, what: str) -> torch.Tensor:
        """Shift a batch by the first batch's mean (fixed thereafter) after checking its width."""
        if self.shift is None:
            # A fixed shift changes no centred moment and no unbiased HSIC (both are translation
            # invariant) but keeps the raw sums small, so centring at the end loses little precision.
            self.shift = x.mean(dim=0)
            d = x.shape[1]
            self.s = x.new_zeros(d)
            self.S = x.new_zeros(d, d)
            if self.unbiased:
                self.ax = x.new_zeros(d)
        elif x.shape[1] != self.shift.shape[0]:
            raise InputError(f"{what}: width {x.shape[1]} differs from {self.shift.shape[0]} in earlier batches")
        return x - self.shift

    def update(self, xs: torch.Tensor) -> torch.Tensor | None:
        """Add a shifted batch; returns its squared row norms when unbiased statistics are kept."""
        self.n += xs.shape[0]
        self.s += xs.sum(dim=0)
        self.S += xs.T @ xs
        if not self.unbiased:
            return None
        a = (xs * xs).sum(dim=1)
        self.sum_a += float(a.sum())
        self.sum_a2 += float((a * a).sum())
        self.ax += a @ xs
        return a

    def centred_scatter(self) -> torch.Tensor:
        """X^T X of the centred data."""
        return self.S - torch.outer(self.s, self.s) / self.n


class _CrossStats:
    """Running cross sums between one feature set of model A and one of model B."""

    def __init__(self, unbiased: bool) -> None:
        self.unbiased = unbiased
        self.S: torch.Tensor | None = None  # shifted X^T Y
        self.sum_ab = 0.0
        self.ay: torch.Tensor | None = None  # sum_i |x_i|^2 y_i
        self.bx: torch.Tensor | None = None  # sum_i |y_i|^2 x_i

    def update(self, xs: torch.Tensor, ys: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Add one shifted batch pair (a, b: squared row norms, when unbiased)."""
        if self.S is None:
            self.S = xs.new_zeros(xs.shape[1], ys.shape[1])
            if self.unbiased:
                self.ay = xs.new_zeros(ys.shape[1])
                self.bx = xs.new_zeros(xs.shape[1])
        self.S += xs.T @ ys
        if self.unbiased:
            assert a is not None and b is not None
            self.sum_ab += float((a * b).sum())
            self.ay += a @ ys
            self.bx += b @ xs


def _pair_moments(a: _SideStats, b: _SideStats, c: _CrossStats) -> Moments:
    """Centred moments of one (A-layer, B-layer) pair from running sums."""
    n = a.n
    sxy = c.S - torch.outer(a.s, b.s) / n
    hsic = None
    if a.unbiased and n >= 4:
        hxy = hsic_unbiased_sums(n, c.S, a.s, b.s, a.sum_a, b.sum_a, c.sum_ab, c.ay, c.bx)
        hxx = hsic_unbiased_sums(n, a.S, a.s, a.s, a.sum_a, a.sum_a, a.sum_a2, a.ax, a.ax)
        hyy = hsic_unbiased_sums(n, b.S, b.s, b.s, b.sum_a, b.sum_a, b.sum_a2, b.ax, b.ax)
        hsic = (hxy, hxx, hyy)
    return Moments(n, a.centred_scatter(), b.centred_scatter(), sxy, hsic)


# --------------------------------------------------------------------------------------------------
# metrics from moments


def _range(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors of a PSD scatter matrix, restricted to its numerical range."""
    evals, evecs = torch.linalg.eigh((S + S.T) / 2)
    evals = evals.flip(0)
    evecs = evecs.flip(1)
    top = float(evals[0]) if evals.numel() else 0.0
    if top <= 0.0:
        return evals[:0], evecs[:, :0]
    keep = evals > EIG_RTOL * top
    return evals[keep], evecs[:, keep]


def _cka_biased(m: Moments) -> float:
    return cka_from_scatter(m.sxy, m.sxx, m.syy)


def _cka_unbiased(m: Moments) -> float:
    if m.n < 4:
        raise InputError(f"unbiased CKA needs at least 4 samples, got {m.n}")
    if m.hsic_u is None:
        raise InputError("unbiased CKA: these moments were accumulated without unbiased statistics")
    return cka_from_hsic(*m.hsic_u, unbiased=True)


def _cca(
    m: Moments, keep_x: int | None = None, keep_y: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical correlations (descending) and X's canonical weights (unit-variance variates)."""
    lx, vx = _range(m.sxx)
    ly, vy = _range(m.syy)
    if keep_x is not None:
        lx, vx = lx[:keep_x], vx[:, :keep_x]
    if keep_y is not None:
        ly, vy = ly[:keep_y], vy[:, :keep_y]
    if lx.numel() == 0 or ly.numel() == 0:
        return m.sxx.new_zeros(0), m.sxx.new_zeros(m.sxx.shape[0], 0)
    # Whitening on the range only: directions with (numerically) no variance are dropped rather than
    # inverted, which is what keeps CCA finite on rank-deficient features.
    t = (vx.T @ m.sxy @ vy) / lx.sqrt()[:, None] / ly.sqrt()[None, :]
    u, rho, _ = torch.linalg.svd(t, full_matrices=False)
    weights = (vx / lx.sqrt()[None, :]) @ u
    return rho.clamp(0.0, 1.0), weights


def _n_components(evals: torch.Tensor, keep_variance: float, keep_dims: int | None) -> int:
    if keep_dims is not None:
        return min(int(keep_dims), evals.numel())
    if evals.numel() == 0:
        return 0
    frac = torch.cumsum(evals, 0) / evals.sum()
    return min(int((frac < keep_variance - 1e-12).sum()) + 1, evals.numel())


def _svcca(m: Moments, keep_variance: float = 0.99, keep_dims: int | None = None) -> float:
    if not 0.0 < keep_variance <= 1.0:
        raise InputError(f"svcca: keep_variance must be in (0, 1], got {keep_variance}")
    if keep_dims is not None and keep_dims < 1:
        raise InputError(f"svcca: keep_dims must be >= 1, got {keep_dims}")
    kx = _n_components(_range(m.sxx)[0], keep_variance, keep_dims)
    ky = _n_components(_range(m.syy)[0], keep_variance, keep_dims)
    rho, _ = _cca(m, kx, ky)
    if rho.numel() == 0:
        logger.warning("svcca: a feature set has zero variance (n=%d); returning 0", m.n)
        return 0.0
    return float(rho.mean())


def _pwcca(m: Moments) -> float:
    rho, weights = _cca(m)
    if rho.numel() == 0:
        logger.warning("pwcca: a feature set has zero variance (n=%d); returning 0", m.n)
        return 0.0
    # Morcos et al. (2018): weight each canonical variate h_i = X w_i by how much of X's neurons it
    # accounts for, sum_j |<h_i, x_j>| = sum_j |(X^T X w_i)_j|.
    alpha = (m.sxx @ weights[:, : rho.numel()]).abs().sum(dim=0)
    total = float(alpha.sum())
    if not total > 0.0:
        return float(rho.mean())
    return float((alpha / total) @ rho)


def _procrustes(m: Moments) -> float:
    tx = float(torch.trace(m.sxx))
    ty = float(torch.trace(m.syy))
    if not (tx > 0.0 and ty > 0.0):
        logger.warning("procrustes distance: a feature set has zero variance (n=%d); returning 2", m.n)
        return 2.0
    nuclear = float(torch.linalg.svdvals(m.sxy).sum())
    return min(max(2.0 - 2.0 * nuclear / math.sqrt(tx * ty), 0.0), 2.0)


def _whitening(S: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Range eigenvectors V, eigenvalues lam and scales d of the partial whitening X -> X V diag(d) V^T.

    d = alpha + (1 - alpha) lam^(-1/2) (Williams et al., 2021), rescaled so the whitened data keeps the
    total variance of X.
    """
    lam, v = _range(S)
    if lam.numel() == 0:
        return lam, v, lam
    d = alpha + (1.0 - alpha) * lam.rsqrt()
    d = d * torch.sqrt(lam.sum() / (lam * d * d).sum())
    return lam, v, d


def _shape_parts(m: Moments, alpha: float, normalize: bool) -> tuple[float, float, float]:
    """(|phi(X)|^2, |phi(Y)|^2, max over orthogonal Q of <phi(X), phi(Y) Q>)."""
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"shape metric: alpha must be in [0, 1], got {alpha}")
    if normalize:
        m = m.normalized()
    lx, vx, dx = _whitening(m.sxx, alpha)
    ly, vy, dy = _whitening(m.syy, alpha)
    nx = float((lx * dx * dx).sum()) if lx.numel() else 0.0
    ny = float((ly * dy * dy).sum()) if ly.numel() else 0.0
    if lx.numel() == 0 or ly.numel() == 0:
        return nx, ny, 0.0
    # The optimum over orthogonal (zero-padded, for unequal widths) Q is the nuclear norm of phi(X)^T phi(Y).
    cross = dx[:, None] * (vx.T @ m.sxy @ vy) * dy[None, :]
    return nx, ny, float(torch.linalg.svdvals(cross).sum())


def _shape_angular(m: Moments, alpha: float = 1.0, normalize: bool = True) -> float:
    nx, ny, cross = _shape_parts(m, alpha, normalize)
    if not (nx > 0.0 and ny > 0.0):
        logger.warning("shape metric: a feature set has zero variance (n=%d); returning pi/2", m.n)
        return math.pi / 2
    return math.acos(min(max(cross / math.sqrt(nx * ny), 0.0), 1.0))


def _shape_euclidean(m: Moments, alpha: float = 1.0, normalize: bool = True) -> float:
    nx, ny, cross = _shape_parts(m, alpha, normalize)
    return math.sqrt(max(nx + ny - 2.0 * cross, 0.0))


# --------------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class Metric:
    """A similarity or distance between two feature sets, computed from their :class:`Moments`."""

    name: str
    from_moments: Callable[..., float]
    higher_is_more_similar: bool
    description: str
    # Invariant to orthogonal maps of either feature space: wide features may be reduced to n columns.
    orthogonally_invariant: bool = True
    needs_unbiased: bool = False

    def __call__(self, x: Any, y: Any, **kwargs: Any) -> float:
        """Compute the metric on two in-memory feature sets."""
        return similarity(x, y, self, **kwargs).value


METRICS: dict[str, Metric] = {
    m.name: m
    for m in [
        Metric("cka", _cka_biased, True, "linear CKA, biased HSIC estimator (Kornblith et al., 2019); in [0, 1]"),
        Metric(
            "cka_unbiased",
            _cka_unbiased,
            True,
            "linear CKA with the unbiased HSIC estimator (Song et al., 2012); about 0 for independent features, may dip below 0",
            needs_unbiased=True,
        ),
        Metric("svcca", _svcca, True, "SVCCA (Raghu et al., 2017): mean canonical correlation after keeping top principal directions; kwargs keep_variance=0.99, keep_dims"),
        Metric(
            "pwcca",
            _pwcca,
            True,
            "PWCCA (Morcos et al., 2018): canonical correlations weighted by their share of X's neurons (asymmetric)",
            orthogonally_invariant=False,
        ),
        Metric("procrustes", _procrustes, False, "orthogonal Procrustes distance of unit-Frobenius centred features (Ding et al., 2021); in [0, 2]"),
        Metric("shape_angular", _shape_angular, False, "generalized shape metric, angular (Williams et al., 2021); radians in [0, pi/2]; kwargs alpha (1: Procrustes, 0: CCA), normalize"),
        Metric("shape_euclidean", _shape_euclidean, False, "generalized shape metric, Euclidean (Williams et al., 2021); in [0, 2] when normalize=True; kwargs alpha, normalize"),
    ]
}


def _get_metric(metric: str | Metric) -> Metric:
    if isinstance(metric, Metric):
        return metric
    try:
        return METRICS[metric]
    except KeyError:
        raise InputError(f"unknown similarity metric {metric!r}; expected one of {sorted(METRICS)}") from None


@dataclass(frozen=True)
class SimilarityResult:
    """A metric value with the number of samples it used and its direction."""

    metric: str
    value: float
    n: int
    higher_is_more_similar: bool


# --------------------------------------------------------------------------------------------------
# streaming accumulation


def _as_layer_list(feats: Any, what: str) -> list[Any]:
    if isinstance(feats, torch.Tensor) or not isinstance(feats, (list, tuple)):
        return [feats]
    if len(feats) == 0:
        raise InputError(f"{what}: got an empty list of layers")
    return list(feats)


class StreamingSimilarity:
    """Accumulates Gram-free statistics for every (layer of A, layer of B) pair over batches.

    Memory: one d x d matrix per layer and one d_a x d_b matrix per pair (float64). Every metric in
    :data:`METRICS` can be computed at the end, on exactly the data seen (no approximation).
    """

    def __init__(
        self,
        *,
        unbiased: bool = True,
        dtype: torch.dtype = _DTYPE,
        device: torch.device | str | None = None,
    ) -> None:
        self.unbiased = unbiased
        self.dtype = dtype
        self.device = device
        self._a: list[_SideStats] = []
        self._b: list[_SideStats] = []
        self._cross: list[list[_CrossStats]] = []
        self.batches = 0

    @property
    def n(self) -> int:
        """Number of samples accumulated so far."""
        return self._a[0].n if self._a else 0

    @property
    def shape(self) -> tuple[int, int]:
        """(layers of A, layers of B)."""
        return len(self._a), len(self._b)

    def _convert(self, x: Any, what: str) -> torch.Tensor:
        t = as_features(x, what)
        device = self.device if self.device is not None else torch.as_tensor(x).device
        return t.to(device=device, dtype=self.dtype)

    def update(self, feats_a: Sequence[Any] | Any, feats_b: Sequence[Any] | Any) -> "StreamingSimilarity":
        """Add one batch: per-layer features of model A and of model B for the same inputs."""
        la = _as_layer_list(feats_a, "features of A")
        lb = _as_layer_list(feats_b, "features of B")
        xa = [self._convert(x, f"features of A, layer {i}") for i, x in enumerate(la)]
        xb = [self._convert(y, f"features of B, layer {j}") for j, y in enumerate(lb)]
        counts = {x.shape[0] for x in xa + xb}
        if len(counts) != 1:
            detail = ", ".join(f"A[{i}]={x.shape[0]}" for i, x in enumerate(xa))
            detail += ", " + ", ".join(f"B[{j}]={y.shape[0]}" for j, y in enumerate(xb))
            raise InputError(f"batch {self.batches}: layers have different sample counts ({detail})")
        if not self._a:
            self._a = [_SideStats(self.unbiased) for _ in xa]
            self._b = [_SideStats(self.unbiased) for _ in xb]
            self._cross = [[_CrossStats(self.unbiased) for _ in xb] for _ in xa]
        elif (len(xa), len(xb)) != self.shape:
            raise InputError(f"batch {self.batches}: got {len(xa)} x {len(xb)} layers, earlier batches had {self.shape[0]} x {self.shape[1]}")
        sa = [st.prepare(x, f"features of A, layer {i}") for i, (st, x) in enumerate(zip(self._a, xa))]
        sb = [st.prepare(y, f"features of B, layer {j}") for j, (st, y) in enumerate(zip(self._b, xb))]
        na = [st.update(x) for st, x in zip(self._a, sa)]
        nb = [st.update(y) for st, y in zip(self._b, sb)]
        for i, x in enumerate(sa):
            for j, y in enumerate(sb):
                self._cross[i][j].update(x, y, na[i], nb[j])
        self.batches += 1
        return self

    def moments(self, i: int = 0, j: int = 0) -> Moments:
        """Centred moments of layer i of A against layer j of B."""
        if not self._a:
            raise InputError("no batches accumulated yet")
        return _pair_moments(self._a[i], self._b[j], self._cross[i][j])

    def compute(self, metric: str | Metric = "cka", **kwargs: Any) -> torch.Tensor:
        """Metric for every layer pair, as a float64 CPU tensor of shape (layers of A, layers of B)."""
        met = _get_metric(metric)
        if met.needs_unbiased and not self.unbiased:
            raise InputError(f"metric {met.name!r} needs unbiased statistics: create the accumulator with unbiased=True")
        la, lb = self.shape
        out = torch.empty(la, lb, dtype=_DTYPE)
        for i in range(la):
            for j in range(lb):
                out[i, j] = met.from_moments(self.moments(i, j), **kwargs)
        return out


class StreamingCKA(StreamingSimilarity):
    """Linear CKA of one pair of feature sets, accumulated over batches from Gram-free statistics."""

    def __init__(self, *, unbiased: bool = True, dtype: torch.dtype = _DTYPE, device: torch.device | str | None = None) -> None:
        super().__init__(unbiased=unbiased, dtype=dtype, device=device)

    def update(self, x: Any, y: Any) -> "StreamingCKA":  # type: ignore[override]
        """Add one batch of paired features (same inputs through both models)."""
        super().update([x], [y])
        return self

    def value(self, unbiased: bool = False) -> float:
        """Linear CKA over every sample seen (biased estimator unless `unbiased`)."""
        return float(self.compute("cka_unbiased" if unbiased else "cka")[0, 0])


class MinibatchCKA:
    """Minibatch linear CKA (Nguyen et al., 2021): unbiased HSIC averaged over batches, then normalized.

    Needs only per-batch Gram matrices, so memory does not grow with feature width; the result is an
    estimate of population CKA, not the full-data CKA. Batches with fewer than 4 samples are skipped.
    """

    def __init__(self) -> None:
        self._kl: torch.Tensor | None = None
        self._kk: torch.Tensor | None = None
        self._ll: torch.Tensor | None = None
        self.n = 0
        self.batches = 0
        self.skipped = 0

    def update(self, feats_a: Sequence[Any] | Any, feats_b: Sequence[Any] | Any) -> "MinibatchCKA":
        """Add one batch of per-layer features of A and B."""
        la = [as_features(x, f"features of A, layer {i}") for i, x in enumerate(_as_layer_list(feats_a, "features of A"))]
        lb = [as_features(y, f"features of B, layer {j}") for j, y in enumerate(_as_layer_list(feats_b, "features of B"))]
        counts = {x.shape[0] for x in la + lb}
        if len(counts) != 1:
            raise InputError(f"batch {self.batches + self.skipped}: layers have different sample counts {sorted(counts)}")
        n = counts.pop()
        if n < 4:
            logger.warning("minibatch CKA: skipping a batch of %d samples (the unbiased estimator needs 4)", n)
            self.skipped += 1
            return self
        if self._kl is None:
            self._kl = torch.zeros(len(la), len(lb), dtype=_DTYPE)
            self._kk = torch.zeros(len(la), dtype=_DTYPE)
            self._ll = torch.zeros(len(lb), dtype=_DTYPE)
        elif self._kl.shape != (len(la), len(lb)):
            raise InputError(f"batch {self.batches}: got {len(la)} x {len(lb)} layers, expected {tuple(self._kl.shape)}")
        grams_a = [x @ x.T for x in la]
        grams_b = [y @ y.T for y in lb]
        assert self._kk is not None and self._ll is not None
        for i, k in enumerate(grams_a):
            self._kk[i] += hsic_unbiased_gram(k, k)
        for j, g in enumerate(grams_b):
            self._ll[j] += hsic_unbiased_gram(g, g)
        for i, k in enumerate(grams_a):
            for j, g in enumerate(grams_b):
                self._kl[i, j] += hsic_unbiased_gram(k, g)
        self.n += n
        self.batches += 1
        return self

    def compute(self) -> torch.Tensor:
        """CKA for every layer pair (layers of A, layers of B); 0 where a self-HSIC is not positive."""
        if self._kl is None:
            raise InputError("minibatch CKA: no batch with at least 4 samples was accumulated")
        assert self._kk is not None and self._ll is not None
        den = torch.outer(self._kk, self._ll)
        ok = den > 0
        if not bool(ok.all()):
            logger.warning("minibatch CKA: some layers have non-positive self-HSIC; their entries are 0")
        out = torch.zeros_like(self._kl)
        out[ok] = self._kl[ok] / den[ok].sqrt()
        return out.clamp(-1.0, 1.0)


# --------------------------------------------------------------------------------------------------
# public functions


def _accumulate_in_memory(
    feats_a: list[Any], feats_b: list[Any], met: Metric
) -> StreamingSimilarity:
    xa = [as_features(x, f"features of A, layer {i}") for i, x in enumerate(feats_a)]
    xb = [as_features(y, f"features of B, layer {j}") for j, y in enumerate(feats_b)]
    counts = {x.shape[0] for x in xa + xb}
    if len(counts) != 1:
        detail = ", ".join(f"A[{i}]={x.shape[0]}" for i, x in enumerate(xa))
        detail += ", " + ", ".join(f"B[{j}]={y.shape[0]}" for j, y in enumerate(xb))
        raise InputError(f"features are not parallel: layers have different sample counts ({detail})")
    if met.orthogonally_invariant:
        xa = [_centre_and_reduce(x) for x in xa]
        xb = [_centre_and_reduce(y) for y in xb]
    elif any(x.shape[1] > x.shape[0] for x in xa + xb):
        logger.warning("%s: some layers have more features than samples; canonical correlations are then degenerate", met.name)
    acc = StreamingSimilarity(unbiased=met.needs_unbiased)
    return acc.update(xa, xb)


def similarity(x: Any, y: Any, metric: str | Metric = "cka", **kwargs: Any) -> SimilarityResult:
    """Compare two in-memory feature sets (n, ...) with a metric from :data:`METRICS`."""
    met = _get_metric(metric)
    if isinstance(x, (list, tuple)) or isinstance(y, (list, tuple)):
        raise InputError("similarity() takes one feature tensor per side; use layer_similarity_matrix for lists")
    acc = _accumulate_in_memory([x], [y], met)
    value = met.from_moments(acc.moments(0, 0), **kwargs)
    return SimilarityResult(met.name, float(value), acc.n, met.higher_is_more_similar)


def svcca(x: Any, y: Any, keep_variance: float = 0.99, keep_dims: int | None = None) -> float:
    """SVCCA similarity: mean canonical correlation of the top principal directions of each side."""
    return similarity(x, y, "svcca", keep_variance=keep_variance, keep_dims=keep_dims).value


def pwcca(x: Any, y: Any) -> float:
    """Projection-weighted CCA similarity (weights from x's neurons)."""
    return similarity(x, y, "pwcca").value


def procrustes_distance(x: Any, y: Any) -> float:
    """Orthogonal Procrustes distance 2 - 2 |X^T Y|_* of centred, unit-Frobenius features (0 = same shape)."""
    return similarity(x, y, "procrustes").value


def shape_distance(x: Any, y: Any, alpha: float = 1.0, kind: str = "angular", normalize: bool = True) -> float:
    """Generalized shape metric of Williams et al. (2021) with partial whitening alpha in [0, 1]."""
    if kind not in ("angular", "euclidean"):
        raise InputError(f"shape_distance: kind must be 'angular' or 'euclidean', got {kind!r}")
    return similarity(x, y, f"shape_{kind}", alpha=alpha, normalize=normalize).value


def layer_similarity_matrix(
    features_a: Sequence[Any], features_b: Sequence[Any], metric: str | Metric = "cka", **kwargs: Any
) -> torch.Tensor:
    """Metric between every layer of A (rows) and every layer of B (columns) on in-memory features."""
    met = _get_metric(metric)
    la = _as_layer_list(features_a, "features_a")
    lb = _as_layer_list(features_b, "features_b")
    acc = _accumulate_in_memory(la, lb, met)
    return acc.compute(met, **kwargs)


def layer_similarity_matrix_streaming(
    batches: Iterable[tuple[Sequence[Any], Sequence[Any]]],
    metric: str | Metric = "cka",
    *,
    mode: str = "exact",
    **kwargs: Any,
) -> torch.Tensor:
    """Layer-by-layer metric over an iterable of (features of A per layer, features of B per layer) batches.

    ``mode="exact"`` accumulates second moments and equals :func:`layer_similarity_matrix` on the
    concatenated batches, for every metric. ``mode="minibatch"`` (CKA only) averages per-batch
    unbiased HSIC, which needs no d x d storage.
    """
    met = _get_metric(metric)
    if mode == "minibatch":
        if met.name not in ("cka", "cka_unbiased"):
            raise InputError(f"mode='minibatch' supports only CKA, not {met.name!r}")
        mb = MinibatchCKA()
        for fa, fb in batches:
            mb.update(fa, fb)
        logger.info("minibatch CKA over %d samples in %d batches (%d skipped)", mb.n, mb.batches, mb.skipped)
        return mb.compute()
    if mode != "exact":
        raise InputError(f"mode must be 'exact' or 'minibatch', got {mode!r}")
    acc = StreamingSimilarity(unbiased=met.needs_unbiased)
    for fa, fb in batches:
        acc.update(fa, fb)
    if acc.n == 0:
        raise InputError("layer_similarity_matrix_streaming: the iterable yielded no batches")
    logger.info("%s over %d samples in %d batches", met.name, acc.n, acc.batches)
    return acc.compute(met, **kwargs)
