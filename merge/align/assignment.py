"""Linear assignment for permutation groups, free or structured by attention heads.

`cost[i, j]` scores pairing unit i of model A with unit j of model B (higher is better). The answer is an
index vector `perm` with `perm[i] = j`, the convention of :func:`merge.spec.permute_state`: applying it to
B's axis puts B's unit j where A's unit i is.

A split attention group (:mod:`merge.spec`: Q/K and V/O may take different within-head orders) is scored by
a ``(2, n, n)`` cost, one matrix per part, and answered by a ``(2, n)`` permutation that moves whole heads
alike in both rows.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from suture.merge.errors import AlignmentError
from suture.merge.spec import collapse_rows


def solve_lap(cost: torch.Tensor | np.ndarray, *, maximize: bool = True) -> torch.Tensor:
    """Optimal one-to-one assignment of rows to columns of a square cost matrix (scipy, on the CPU)."""
    c = cost.detach().to("cpu", torch.float64).numpy() if isinstance(cost, torch.Tensor) else np.asarray(cost, np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise AlignmentError(f"assignment needs a square cost matrix, got shape {c.shape}")
    if not np.isfinite(c).all():
        raise AlignmentError("assignment cost has NaN or infinite entries (are the weights or features finite?)")
    rows, cols = linear_sum_assignment(c, maximize=maximize)
    perm = np.empty(c.shape[0], dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm)


def head_pair_scores(cost: torch.Tensor, head_dim: int, *, within: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Score every (head of A, head of B) pair: the block trace, or the best within-head assignment.

    Returns `(scores (H_A, H_B), within (H_A, H_B, head_dim) or None)`, where `within[h, g]` is the best
    within-head permutation when A's head h takes B's head g. The head counts may differ (a rectangular cost).
    """
    heads, heads_b = cost.shape[0] // head_dim, cost.shape[1] // head_dim
    blocks = cost.reshape(heads, head_dim, heads_b, head_dim).permute(0, 2, 1, 3)  # (hA, hB, dA, dB)
    if not within:
        return blocks.diagonal(dim1=2, dim2=3).sum(-1), None
    blocks_np = blocks.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(blocks_np).all():
        raise AlignmentError("assignment cost has NaN or infinite entries (are the weights or features finite?)")
    scores = np.empty((heads, heads_b))
    best = np.empty((heads, heads_b, head_dim), dtype=np.int64)
    for h in range(heads):
        for g in range(heads_b):
            rows, cols = linear_sum_assignment(blocks_np[h, g], maximize=True)
            best[h, g, rows] = cols
            scores[h, g] = blocks_np[h, g][rows, cols].sum()
    return torch.from_numpy(scores), torch.from_numpy(best)


def assign(cost: torch.Tensor, kind: str = "free", head_dim: int | None = None,
           within: tuple[bool, bool] | None = None) -> torch.Tensor:
    """Best permutation for one group under its structure: free, whole heads, or heads x within-head.

    A ``(2, n, n)`` cost (Q/K, V/O) gives a 2-row permutation (1-D when both rows agree): heads are paired
    on the sum of both parts' head-pair scores, then each part takes its own within-head assignment where
    `within` (default: both when kind is ``heads_within``) lets its dimensions move.
    """
    if kind == "free":
        return solve_lap(cost)
    if not head_dim or cost.shape[-1] % head_dim:
        raise AlignmentError(f"group of kind {kind!r} needs a head_dim dividing its size {cost.shape[-1]}, got {head_dim}")
    if cost.dim() == 3:
        frees = within if within is not None else (kind == "heads_within",) * 2
        pairs = [head_pair_scores(c, head_dim, within=free) for c, free in zip(cost, frees)]
        head_perm = solve_lap(sum(scores.to("cpu", torch.float64) for scores, _ in pairs))
        return collapse_rows(torch.stack([heads_then_within(head_perm, best, head_dim) for _, best in pairs]))
    scores, best = head_pair_scores(cost, head_dim, within=kind == "heads_within")
    return heads_then_within(solve_lap(scores), best, head_dim)


def heads_then_within(head_perm: torch.Tensor, within: torch.Tensor | None, head_dim: int) -> torch.Tensor:
    """Index vector from a head pairing and, per (head of A, head of B), a within-head order (None: in order)."""
    offsets = torch.arange(head_dim)
    # new head h <- old head g, its dims in the order the within-head assignment chose
    return torch.cat([g * head_dim + (within[h, g] if within is not None else offsets)
                      for h, g in enumerate(head_perm.tolist())])


def timed_assign(cost: torch.Tensor, kind: str = "free", head_dim: int | None = None,
                 within: tuple[bool, bool] | None = None) -> tuple[torch.Tensor, float]:
    """`assign`, plus the seconds it took (moving the cost to the CPU included)."""
    start = time.perf_counter()
    perm = assign(cost, kind, head_dim, within)
    return perm, time.perf_counter() - start


def assignment_score(cost: torch.Tensor, perm: torch.Tensor) -> float:
    """Sum of cost[i, perm[i]] in float64. A per-part ``(2, n, n)`` cost sums each part under its row (a 1-D
    perm serves both); one cost scored under a 2-row perm gives the mean of its rows' scores."""
    if cost.dim() == 3:
        rows = perm if perm.dim() == 2 else perm.expand(cost.shape[0], -1)
        return sum(assignment_score(c, row) for c, row in zip(cost, rows))
    if perm.dim() == 2:
        return sum(assignment_score(cost, row) for row in perm) / perm.shape[0]
    idx = perm.to(cost.device)
    return float(cost[torch.arange(cost.shape[0], device=cost.device), idx].double().sum())
