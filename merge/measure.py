"""Measuring hidden features, once for every engine and for stitching: hook capture, streaming moments, CKA.

* :func:`capture` reads named submodules' inputs or outputs with forward hooks while a model runs, shaped
  by a per-site transform (:func:`unit_features`: every batch/token/pixel position is a sample of a unit;
  :func:`flatten_items`: one row per item; :func:`pool_items`: one row per item, averaged over positions,
  padded tokens masked out).
* :class:`RunningMoments` / :class:`PairedMoments` accumulate count, sums, per-unit squares and optionally
  ``X^T X`` and ``X^T Y`` in float64, so means, (co)variances, second moments and correlations over any
  number of batches equal those of the concatenated features, with one batch in memory at a time.
  Units that do not vary on the data (dead ReLUs, saturated units) are found by one rule,
  :class:`DeadUnits`, whose tolerances a caller may set.
* :func:`linear_cka` and the HSIC estimators: linear CKA with the biased HSIC (Kornblith et al., 2019) or
  the unbiased one (Song et al., 2012), from features, from centred scatter matrices or from Gram matrices.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from torch import nn

from suture.merge.errors import InputError

logger = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
_F64 = torch.float64


# ----------------------------------------------------------------------------------------- capture
def unit_features(x: torch.Tensor, axis: int, inner: int = 1) -> torch.Tensor:
    """Rows = samples, columns = hidden units: every other position (batch, tokens, pixels, inner) is a sample.

    ``inner`` > 1 reads a flattened conv map (``C*H*W`` on ``axis``) as C units with ``inner`` positions each.
    """
    x = torch.movedim(x, axis, -1)
    x = x.reshape(*x.shape[:-1], x.shape[-1] // inner, inner)
    x = torch.movedim(x, -2, -1)
    return x.reshape(-1, x.shape[-1])


def flatten_items(x: torch.Tensor) -> torch.Tensor:
    """(n, ...) -> (n, features): one row per item, every position and channel a column."""
    return x.reshape(x.shape[0], -1)


def pool_items(x: torch.Tensor, mask: torch.Tensor | None = None, channel_axis: int = 1) -> torch.Tensor:
    """(n, ...) -> (n, channels): the mean over every other position; ``mask`` (n, positions) drops padding.

    A conv map (n, C, H, W) pools over H*W with ``channel_axis=1``; token states (n, T, d) with
    ``channel_axis=-1`` and an attention mask (n, T) average only the real tokens.
    """
    x = torch.movedim(x, channel_axis, -1)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    if mask is None:
        return x.mean(dim=1)
    m = mask.reshape(x.shape[0], -1).to(x.dtype).unsqueeze(-1)
    if m.shape[1] != x.shape[1]:
        raise InputError(f"token mask has {m.shape[1]} positions per item, the features {x.shape[1]}")
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


@dataclass(frozen=True)
class Site:
    """Where a feature is read: a named submodule's input (its first positional argument) or its output.

    ``label`` names the site in error messages (e.g. ``group 'fc1'``); ``transform`` shapes the detached
    tensor (e.g. :func:`unit_features`) before it is stored.
    """

    module: str
    where: Literal["input", "output"] = "output"
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    label: str = ""


def tap_site(tap: Any, label: str = "") -> Site:
    """A :class:`~merge.graph.trace.Tap` as a site whose features are ``unit_features(x, tap.axis, tap.inner)``."""
    axis, inner = tap.axis, tap.inner
    return Site(tap.module, tap.where, lambda x: unit_features(x, axis, inner), label or f"group {tap.group!r}")


def _first_tensor(value: Any) -> Any:
    """A module's main tensor: the first item of a tuple output, ``last_hidden_state`` of a model output."""
    value = value[0] if isinstance(value, (tuple, list)) and value else value
    return getattr(value, "last_hidden_state", value)


@contextmanager
def capture(
    model: nn.Module,
    sites: Mapping[K, Site],
    *,
    keep: Literal["last", "all"] = "last",
    unwrap: bool = False,
    on_missing_tensor: Literal["raise", "skip"] = "raise",
    error: type[Exception] = InputError,
) -> Iterator[dict[K, Any]]:
    """Forward hooks on ``sites`` while the block runs; yields the store they fill, keyed like ``sites``.

    ``keep="last"`` stores each site's latest tensor (clear the store between batches); ``"all"`` appends
    every call's tensor to a list (a module run twice in one forward pass is seen twice). ``unwrap`` takes
    the first item of tuple outputs and ``last_hidden_state`` of model outputs. A site whose value is not a
    tensor raises ``error`` (or is skipped); a module the model lacks raises ``error`` before anything runs.
    The hooks are removed on exit, also when the block raises.
    """
    store: dict[K, Any] = {}
    handles = []

    def make(key: K, site: Site) -> Callable[[Any], None]:
        def grab(value: Any) -> None:
            if unwrap:
                value = _first_tensor(value)
            if not isinstance(value, torch.Tensor):
                if on_missing_tensor == "skip":
                    return
                raise error(f"{site.label or f'module {site.module!r}'}: its {site.where} is a {type(value).__name__}, not a tensor")
            value = value.detach()
            if site.transform is not None:
                value = site.transform(value)
            if keep == "all":
                store.setdefault(key, []).append(value)
            else:
                store[key] = value

        return grab

    try:
        for key, site in sites.items():
            try:
                mod = model.get_submodule(site.module)
            except AttributeError as exc:
                raise error(f"{site.label or 'capture'}: the model has no module {site.module!r} to observe") from exc
            grab = make(key, site)
            if site.where == "input":
                handles.append(mod.register_forward_pre_hook(lambda _m, args, g=grab: g(args[0] if args else None)))
            else:
                handles.append(mod.register_forward_hook(lambda _m, _args, out, g=grab: g(out)))
        yield store
    finally:
        for h in handles:
            h.remove()


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Every module of ``models`` in eval mode inside the block, each back in its own mode afterwards."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, mode in modes:
            m.train(mode)


# ----------------------------------------------------------------------------------------- moments
@dataclass(frozen=True)
class DeadUnits:
    """When a unit counts as constant on the data (a dead ReLU, a saturated unit): it carries no signal.

    A unit is constant when ``std <= rel_mean * |mean| + floor`` or ``var <= rel_peak * max(var)``. The
    defaults suit float64 sums: a constant unit keeps a rounding std of about ``1e-8 * |mean|``, far below
    ``1e-6 * |mean|``, and far below any unit that varies. ``rel_peak`` judges units against the most
    varying one of the same set instead (ZipIt: ``DeadUnits(rel_mean=0.0, rel_peak=1e-12)``).
    """

    rel_mean: float = 1e-6
    floor: float = 1e-12
    rel_peak: float = 0.0

    def mask(self, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the constant units."""
        var = var.clamp_min(0)
        bound = self.rel_mean * mean.abs() + self.floor if self.rel_mean else self.floor
        dead = var.sqrt() <= bound
        if self.rel_peak and var.numel():
            dead |= var <= self.rel_peak * float(var.max())
        return dead


DEAD = DeadUnits()


def _collected(count: int, value: torch.Tensor | None, missing: str) -> torch.Tensor:
    """``value``, or a clear error when no sample was seen or it was not accumulated."""
    if count == 0:
        raise InputError("no calibration samples were seen")
    if value is None:
        raise InputError(missing)
    return value


class RunningMoments:
    """Streaming moments of one feature set X (rows = samples, columns = units), accumulated in float64.

    Keeps the sample count, per-unit sums and sums of squares; with ``gram=True`` also ``X^T X``, from which
    the covariance, the uncentred second moment ``E[x x^T]`` and the correlation matrix follow.
    """

    def __init__(self, width: int, *, gram: bool = False, device: torch.device | str = "cpu", dtype: torch.dtype = _F64) -> None:
        self.n = width
        self.device = torch.device(device)
        self.dtype = dtype
        self.count = 0
        self.sum = torch.zeros(width, dtype=dtype, device=self.device)
        self.sq = torch.zeros(width, dtype=dtype, device=self.device)
        self.gram = torch.zeros(width, width, dtype=dtype, device=self.device) if gram else None

    def prepare(self, x: torch.Tensor, what: str = "features") -> torch.Tensor:
        """``x`` as (samples, width) in this accumulator's dtype and device, or a clear error."""
        if x.dim() != 2 or x.shape[1] != self.n:
            raise InputError(f"{what} have shape {tuple(x.shape)}, expected (samples, {self.n})")
        return x.to(self.device, self.dtype)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """Add a block of samples (rows); returns it as accumulated (converted)."""
        x = self.prepare(x)
        self.count += x.shape[0]
        self.sum += x.sum(0)
        self.sq += x.pow(2).sum(0)
        if self.gram is not None:
            self.gram += x.T @ x
        return x

    @property
    def mean(self) -> torch.Tensor:
        return _collected(self.count, self.sum, "") / self.count

    @property
    def var(self) -> torch.Tensor:
        """Population variance per unit (divided by the count, as numpy's ``ddof=0``)."""
        return (self.sq / self.count - self.mean.pow(2)).clamp_min(0)

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    @property
    def rms(self) -> torch.Tensor:
        """Root-mean-square value per unit (0 before any sample)."""
        return (self.sq / max(self.count, 1)).sqrt()

    def constant(self, dead: DeadUnits = DEAD) -> torch.Tensor:
        """Units that never vary on the data (boolean mask)."""
        return dead.mask(self.mean, self.var)

    def second_moment(self) -> torch.Tensor:
        """``E[x x^T]``, uncentred (what a layer reading the features sees)."""
        return _collected(self.count, self.gram, "the full second moments were not collected (gram=False)") / self.count

    def cov(self) -> torch.Tensor:
        """Population covariance ``E[x x^T] - E[x] E[x]^T``."""
        return self.second_moment() - torch.outer(self.mean, self.mean)

    def corr(self, eps: float = 1e-12, *, dead: DeadUnits = DEAD, dead_with_dead: float = 0.0) -> torch.Tensor:
        """Pearson correlation between units; constant units correlate 0 with every unit, also themselves.

        ``dead_with_dead`` is the value between two constant units (ZipIt uses 1: dead units merge with each
        other and are never averaged into a live unit).
        """
        cov = self.cov()
        var = cov.diagonal().clamp_min(0)
        std = var.sqrt()
        corr = cov / (torch.outer(std, std) + eps)
        # rounding noise over a near-zero std would otherwise show up as large spurious correlations
        const = dead.mask(self.mean, var)
        if bool(const.any()):
            corr[const, :] = 0.0
            corr[:, const] = 0.0
            if dead_with_dead:
                corr[const.unsqueeze(1) & const.unsqueeze(0)] = dead_with_dead
        return corr


class PairedMoments:
    """Moments of two feature sets seen on the same samples: each side's :class:`RunningMoments` and ``X^T Y``.

    The sides may differ in width (``(n_a, n_b)`` cross products, as transport between layers of different
    widths needs); ``width_b=None`` keeps only side A.
    """

    def __init__(
        self, width_a: int, width_b: int | None = None, *, gram: bool = False,
        device: torch.device | str = "cpu", dtype: torch.dtype = _F64,
    ) -> None:  # fmt: skip
        self.a = RunningMoments(width_a, gram=gram, device=device, dtype=dtype)
        self.b = None if width_b is None else RunningMoments(width_b, gram=gram, device=device, dtype=dtype)
        self.cross = None if width_b is None else torch.zeros(width_a, width_b, dtype=dtype, device=self.a.device)

    @property
    def n(self) -> int:
        return self.a.n

    @property
    def count(self) -> int:
        return self.a.count

    @property
    def paired(self) -> bool:
        return self.b is not None

    def update(self, xa: torch.Tensor, xb: torch.Tensor | None = None) -> None:
        """Add a block of samples for A's units and, when paired, the same samples for B's units."""
        if self.b is None:
            self.a.update(xa)
            return
        if xb is None or xb.dim() != 2 or xb.shape[0] != xa.shape[0]:
            shape = None if xb is None else tuple(xb.shape)
            raise InputError(f"model B features {shape} do not pair with A's {tuple(xa.shape)} (the same samples are needed)")
        xa = self.a.update(xa)
        xb = self.b.update(xb)
        self.cross += xa.T @ xb

    def side(self, which: str) -> RunningMoments:
        """Side ``"a"`` or ``"b"``."""
        side = self.a if which == "a" else self.b
        if side is None:
            raise InputError("moments of B were not collected (the moments are not paired)")
        return side

    def cross_second_moment(self) -> torch.Tensor:
        """``E[x y^T]``, (n_a, n_b)."""
        return _collected(self.count, self.cross, "the cross-covariance was not collected (the moments are not paired)") / self.count

    def cross_cov(self) -> torch.Tensor:
        """``cov(A_i, B_j)``, (n_a, n_b)."""
        return self.cross_second_moment() - torch.outer(self.a.mean, self.side("b").mean)

    def cross_corr(self, eps: float = 1e-12, *, dead: DeadUnits = DEAD) -> torch.Tensor:
        """Pearson correlation of A's unit i with B's unit j; constant units correlate exactly 0."""
        b = self.side("b")
        corr = self.cross_cov() / (torch.outer(self.a.std, b.std) + eps)
        corr[self.a.constant(dead)] = 0.0
        corr[:, b.constant(dead)] = 0.0
        return corr


# ----------------------------------------------------------------------------------------- CKA
def as_features(x: Any, what: str) -> torch.Tensor:
    """``x`` as a finite 2-D float64 tensor (n, features); trailing axes are flattened."""
    t = torch.as_tensor(x)
    if t.ndim == 0:
        raise InputError(f"{what}: expected a (n, features) tensor, got a scalar")
    t = t.unsqueeze(1) if t.ndim == 1 else t.reshape(t.shape[0], -1)
    if t.shape[1] == 0:
        raise InputError(f"{what}: has zero features (shape {tuple(t.shape)})")
    if t.is_complex():
        raise InputError(f"{what}: complex features are not supported")
    t = t.to(_F64)
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{what}: contains NaN or infinite values")
    return t


def cka_from_hsic(hxy: float, hxx: float, hyy: float, *, unbiased: bool = False) -> float:
    """CKA ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` from HSIC values (any common scale).

    Biased values lie in [0, 1]. The unbiased estimator may go slightly below 0 for independent features;
    its sign is kept, in [-1, 1]. A side whose self-HSIC is not positive (a constant feature set) carries no
    similarity: 0, with a warning.
    """
    if not (hxx > 0.0 and hyy > 0.0):
        logger.warning("linear CKA: a feature set has no variance (self-HSIC %.3g, %.3g); returning 0", hxx, hyy)
        return 0.0
    return min(max(hxy / math.sqrt(hxx * hyy), -1.0 if unbiased else 0.0), 1.0)


def cka_from_scatter(sxy: torch.Tensor, sxx: torch.Tensor, syy: torch.Tensor) -> float:
    """Biased linear CKA ``|X^T Y|_F^2 / (|X^T X|_F |Y^T Y|_F)`` from centred scatter matrices (sums or means)."""
    return cka_from_hsic(float((sxy * sxy).sum()), float((sxx * sxx).sum()), float((syy * syy).sum()))


def hsic_unbiased_gram(K: torch.Tensor, L: torch.Tensor) -> float:
    """Unbiased HSIC estimator (Song et al., 2012) from two n x n Gram matrices (n >= 4)."""
    n = K.shape[0]
    if n < 4:
        raise InputError(f"unbiased HSIC needs at least 4 samples, got {n}")
    K = K.to(_F64).clone()
    L = L.to(_F64).clone()
    K.fill_diagonal_(0.0)
    L.fill_diagonal_(0.0)
    k1 = K.sum(dim=1)
    l1 = L.sum(dim=1)
    value = float((K * L).sum()) + float(k1.sum()) * float(l1.sum()) / ((n - 1) * (n - 2)) - 2.0 * float(k1 @ l1) / (n - 2)
    return value / (n * (n - 3))


def hsic_unbiased_sums(
    n: int, sxy: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor,
    sum_a: float, sum_b: float, sum_ab: float, ay: torch.Tensor, bx: torch.Tensor,
) -> float:  # fmt: skip
    """Unbiased HSIC (Song et al., 2012) of linear kernels from Gram-free sums, for streaming.

    With K = X X^T, L = Y Y^T, K~ and L~ their copies with zeroed diagonals, a_i = |x_i|^2, b_i = |y_i|^2,
    ``sxy`` = X^T Y, ``sx``/``sy`` the column sums, ``ay`` = sum a_i y_i, ``bx`` = sum b_i x_i:
    tr(K~L~) = |X^T Y|_F^2 - sum a_i b_i;  1^T K~ 1 = |sum x|^2 - sum a_i;
    1^T K~ L~ 1 = sx^T (X^T Y) sy - sy^T ay - sx^T bx + sum a_i b_i.
    """
    tr_kl = float((sxy * sxy).sum()) - sum_ab
    k1 = float(sx @ sx) - sum_a
    l1 = float(sy @ sy) - sum_b
    kl1 = float(sx @ (sxy @ sy)) - float(sy @ ay) - float(sx @ bx) + sum_ab
    return (tr_kl + k1 * l1 / ((n - 1) * (n - 2)) - 2.0 * kl1 / (n - 2)) / (n * (n - 3))


def linear_cka(x: Any, y: Any, unbiased: bool = False) -> float:
    """Linear CKA between two feature sets on the same samples (rows), trailing axes flattened.

    Biased HSIC (Kornblith et al., 2019): invariant to orthogonal maps, isotropic scaling and shifts of
    either side, in [0, 1], 0 when a side is constant. ``unbiased``: the HSIC estimator of Song et al.
    (2012), about 0 for independent features (needs 4 samples). Wide features use n x n Gram matrices.
    """
    xs, ys = as_features(x, "features of A"), as_features(y, "features of B")
    if xs.shape[0] != ys.shape[0]:
        raise InputError(f"CKA needs the same samples on both sides, got {xs.shape[0]} and {ys.shape[0]} rows")
    n = xs.shape[0]
    xs = xs - xs.mean(0, keepdim=True)
    ys = ys - ys.mean(0, keepdim=True)
    if unbiased:
        if n < 4:
            raise InputError(f"unbiased CKA needs at least 4 samples, got {n}")
        if xs.shape[1] + ys.shape[1] > 2 * n:
            k, lg = xs @ xs.T, ys @ ys.T
            return cka_from_hsic(hsic_unbiased_gram(k, lg), hsic_unbiased_gram(k, k), hsic_unbiased_gram(lg, lg), unbiased=True)
        a, b = (xs * xs).sum(1), (ys * ys).sum(1)
        sx, sy = xs.sum(0), ys.sum(0)
        hxy = hsic_unbiased_sums(n, xs.T @ ys, sx, sy, float(a.sum()), float(b.sum()), float((a * b).sum()), a @ ys, b @ xs)
        hxx = hsic_unbiased_sums(n, xs.T @ xs, sx, sx, float(a.sum()), float(a.sum()), float((a * a).sum()), a @ xs, a @ xs)
        hyy = hsic_unbiased_sums(n, ys.T @ ys, sy, sy, float(b.sum()), float(b.sum()), float((b * b).sum()), b @ ys, b @ ys)
        return cka_from_hsic(hxy, hxx, hyy, unbiased=True)
    if xs.shape[1] + ys.shape[1] <= 2 * n:
        return cka_from_scatter(xs.T @ ys, xs.T @ xs, ys.T @ ys)
    # wide features: <K, L>_F = |X^T Y|_F^2 and |K|_F = |X^T X|_F with the n x n centred Gram matrices
    k, lg = xs @ xs.T, ys @ ys.T
    return cka_from_hsic(float((k * lg).sum()), float((k * k).sum()), float((lg * lg).sum()))
