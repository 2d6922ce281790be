"""Transport solvers for one group: ground metric, marginals, exact EMD / Sinkhorn / linear assignment.

Plans are ``(n_b, n_a)``: row i is model B's unit i, column j is the reference's unit j. Exact EMD must
reach optimality: POT's network simplex stops at ``numItermax`` with only a warning and returns a
sub-optimal plan, so the result code is checked, the cap raised, and an :class:`AlignmentError` raised
when even the largest cap is not enough.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from suture.merge.align.assignment import assign
from suture.merge.errors import AlignmentError

logger = logging.getLogger(__name__)

Distance = Literal["euclidean", "cosine"]
Solver = Literal["emd", "sinkhorn"]

# network simplex iteration caps tried in turn (POT's default is 1e5, too small beyond ~2000 units)
EMD_CAPS = (1_000_000, 10_000_000, 100_000_000)
_EMD_OPTIMAL = 1
_MASS_FLOOR = 1e-8
# Sinkhorn's entropic regularisation on costs scaled by normalize_cost. Fused digits MLP pairs of widths 32,
# 128 and 512 scored within 0.6 points of their best reg over 0.003..1 at this value, and Sinkhorn converges
# in a few hundred iterations (0.03 needed over 2000 on one layer). On max-normalised costs the good range
# moved with width: 0.05 lost 1.7 points at width 32 and 1.1 at 128, 0.1 lost 8 at 128.
DEFAULT_REG = 0.05


@dataclass
class SolveInfo:
    """How one group's transport was found."""

    method: str
    converged: bool
    iterations: int
    seconds: float


def pairwise_cost(fa: torch.Tensor, fb: torch.Tensor, distance: Distance = "euclidean") -> torch.Tensor:
    """(n_b, n_a) ground metric between B's units (rows of fb) and the reference's units (rows of fa)."""
    fa, fb = fa.double(), fb.double()
    if distance == "euclidean":
        return torch.cdist(fb, fa)
    if distance == "cosine":
        na = fa / fa.norm(dim=1, keepdim=True).clamp_min(1e-12)
        nb = fb / fb.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return (1.0 - nb @ na.T).clamp_min(0.0)
    raise AlignmentError(f"distance {distance!r}: expected 'euclidean' or 'cosine'")


def cost_from_moments(
    sq_a: torch.Tensor, sq_b: torch.Tensor, cross: torch.Tensor, count: int, distance: Distance = "euclidean"
) -> torch.Tensor:
    """(n_b, n_a) ground metric between units from activation moments (sum of squares, cross products)."""
    if distance == "euclidean":
        # ||x_i - y_j||^2 over samples, divided by the sample count so that the scale is data-size free
        sq = (sq_b[:, None] + sq_a[None, :] - 2.0 * cross.T).clamp_min(0.0) / max(count, 1)
        return sq.sqrt()
    if distance == "cosine":
        denom = (sq_b[:, None] * sq_a[None, :]).sqrt().clamp_min(1e-12)
        return (1.0 - cross.T / denom).clamp_min(0.0)
    raise AlignmentError(f"distance {distance!r}: expected 'euclidean' or 'cosine'")


def normalize_cost(cost: torch.Tensor) -> torch.Tensor:
    """The cost divided by its typical matching gap, so one Sinkhorn ``reg`` means the same at every width and scale.

    Sinkhorn's plan is exp(-M/reg) rescaled by row and column factors, so adding a constant to a row or
    column changes nothing; what decides how soft the plan is, is how far a unit's best match lies below
    the others, measured in units of ``reg``. Dividing by max(M) does not measure that: distances between
    d-dimensional units concentrate around a common value as d grows, and the share of the spread in the
    max changes with width and scale. Here the scale is the median over rows of (row median - row min):
    a typical unit's gap between its best and a typical partner becomes 1.
    """
    if cost.numel() == 0:
        return cost
    gap = (cost.median(dim=1).values - cost.min(dim=1).values).median()
    scale = float(gap)
    if not scale > 0:
        scale = float(cost.max())
    return cost / scale if scale > 0 else cost


def normalize_mass(weights: torch.Tensor) -> torch.Tensor:
    """A probability vector proportional to `weights` (floored so no unit gets zero mass)."""
    w = weights.double().clamp_min(0.0)
    total = float(w.sum())
    if not math.isfinite(total) or total <= 0:
        return torch.full_like(w, 1.0 / w.numel())
    w = (w / total).clamp_min(_MASS_FLOOR)
    return w / w.sum()


def plan_cost(plan: torch.Tensor, cost: torch.Tensor) -> float:
    """<T, M>: the transport's total ground cost."""
    return float((plan.double() * cost.to(plan.device).double()).sum())


def plan_entropy(plan: torch.Tensor) -> float:
    """-sum T log T (0 for no mass); a permutation of n units has entropy log n."""
    p = plan.double().clamp_min(0.0)
    nz = p[p > 0]
    return float(-(nz * nz.log()).sum())


def assignment_plan(cost: torch.Tensor, kind: str = "free", head_dim: int | None = None) -> torch.Tensor:
    """The exact uniform-marginal plan of a square problem: a permutation matrix / n (linear assignment)."""
    n = cost.shape[0]
    # assign maximizes similarity and returns perm[a] = b; minimize cost by maximizing its negative
    perm = assign(-cost.detach().cpu().double().T, kind, head_dim)
    plan = torch.zeros(n, n, dtype=torch.float64)
    plan[perm, torch.arange(n)] = 1.0 / n
    return plan.to(cost.device)


def emd_plan(a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Exact OT plan (network simplex on the CPU) that reached optimality; returns (plan, cap used)."""
    import ot

    an, bn = a.cpu().double().numpy(), b.cpu().double().numpy()
    bn = bn * (an.sum() / bn.sum())  # exact mass balance in float64
    m = np.ascontiguousarray(cost.detach().cpu().double().numpy())
    last = ""
    for cap in EMD_CAPS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the result code is checked instead
            plan, log = ot.emd(an, bn, m, numItermax=cap, log=True)
        if log.get("result_code") == _EMD_OPTIMAL:
            return torch.from_numpy(np.asarray(plan)).to(cost.device), cap
        last = str(log.get("warning"))
        logger.info("exact OT (%dx%d) did not reach optimality with numItermax=%d (%s); raising the cap", *m.shape, cap, last)
    raise AlignmentError(
        f"exact OT on a {m.shape[0]}x{m.shape[1]} problem did not converge within {EMD_CAPS[-1]} network simplex "
        f"iterations ({last}); use solver: sinkhorn"
    )


def _valid(plan: torch.Tensor, a: torch.Tensor) -> bool:
    """A finite plan that carries (about) the whole mass: exp(-M/reg) underflow leaves almost none."""
    if not bool(torch.isfinite(plan).all()):
        return False
    return abs(float(plan.sum()) - float(a.sum())) <= 1e-2 * float(a.sum())


def sinkhorn_plan(
    a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor, reg: float, max_iter: int, stop_thr: float
) -> tuple[torch.Tensor, bool, int, str]:
    """Entropic OT with POT's torch backend on the cost's device; falls back to log-domain on overflow."""
    import ot

    a = a.to(cost.device, cost.dtype)
    b = b.to(cost.device, cost.dtype)
    b = b * (a.sum() / b.sum())
    method = "sinkhorn"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # convergence is read from the log
        plan, log = ot.sinkhorn(a, b, cost, reg, method=method, numItermax=max_iter, stopThr=stop_thr, log=True)
        if not _valid(plan, a):
            logger.info("sinkhorn under/overflowed at reg=%g; retrying in the log domain", reg)
            method = "sinkhorn_log"
            plan, log = ot.sinkhorn(a, b, cost, reg, method=method, numItermax=max_iter, stopThr=stop_thr, log=True)
    if not _valid(plan, a):
        raise AlignmentError(f"sinkhorn produced no finite plan at reg={reg}; raise `reg` or set `normalize: true`")
    errs = log.get("err") or []
    err = float(errs[-1]) if len(errs) else float("inf")
    niter = int(log.get("niter", max_iter))
    return plan, err <= stop_thr, niter, method


def solve_plan(
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    solver: Solver,
    reg: float,
    max_iter: int,
    stop_thr: float,
    uniform: bool,
    kind: str = "free",
    head_dim: int | None = None,
) -> tuple[torch.Tensor, SolveInfo]:
    """One group's (n_b, n_a) plan; exact uniform square problems (and head groups) use linear assignment."""
    start = time.perf_counter()
    n_b, n_a = cost.shape
    if kind != "free":
        # head-structured groups move whole heads: a structured permutation, never a soft plan
        plan = assignment_plan(cost, kind, head_dim)
        return plan, SolveInfo("assignment", True, 1, time.perf_counter() - start)
    if solver == "emd":
        if uniform and n_a == n_b:
            plan = assignment_plan(cost)
            return plan, SolveInfo("assignment", True, 1, time.perf_counter() - start)
        plan, cap = emd_plan(a, b, cost)
        return plan, SolveInfo(f"emd(numItermax={cap})", True, 0, time.perf_counter() - start)
    if solver == "sinkhorn":
        plan, converged, niter, method = sinkhorn_plan(a, b, cost, reg, max_iter, stop_thr)
        if not converged:
            logger.warning("sinkhorn stopped after %d iterations above stop_thr=%g (plan is approximate)", niter, stop_thr)
        return plan, SolveInfo(method, converged, niter, time.perf_counter() - start)
    raise AlignmentError(f"solver {solver!r}: expected 'emd' or 'sinkhorn'")
