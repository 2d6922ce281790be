"""ZipIt! matching (Stoica et al., ICLR 2024): cluster the hidden units of k models into n merged units.

The input is the (k*n, k*n) correlation matrix of every model's units stacked model by model. A matcher
returns one cluster label per stacked unit (labels 0..n-1); from the labels come the merge matrix
``M`` (n, k*n), which averages the units of a cluster, and the unmerge matrix ``U`` (k*n, n), which copies a
merged unit back to every unit of its cluster, so that ``M @ U`` is the identity.

Matchers:

- ``zip``: greedy. Repeatedly merge the most correlated pair of current clusters, within a model or across
  models. A merged cluster's similarity to every other cluster becomes the smaller of its parts' similarities,
  decayed by ``alpha`` (positive values are multiplied by alpha, negative ones divided, so clusters that
  already absorbed units always become less attractive). Of the ``(k-1)*n`` merges each model's share is
  ``(k-1)*n // k``; ``beta`` times that share is the model's within-model budget (as in the paper's reference
  code: beta=1 lets a model make all of its share of merges with itself, beta=0 allows only cross-model
  merges). Merging two clusters that both hold units of model m spends one unit of m's budget; a model with
  an exhausted budget takes part in no further merge with itself. Stops after ``(k-1)*n`` merges.
- ``permute``: linear assignment of every model's units to model 0's units on their cross-correlation
  (across models only): the permutation baseline of the ZipIt paper.
- ``identity``: unit i of every model forms cluster i (naive weight averaging).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch

from suture.merge.align.assignment import solve_lap
from suture.merge.errors import AlignmentError, InputError

logger = logging.getLogger(__name__)

Matcher = Literal["zip", "permute", "identity"]
MATCHERS = ("zip", "permute", "identity")


@dataclass
class ZipMatch:
    """Cluster labels of the stacked units and the merge / unmerge matrices built from them."""

    labels: torch.Tensor  # (k*n,) cluster of every stacked unit, values 0..n-1
    merge: torch.Tensor  # (n, k*n) rows average a cluster
    unmerge: torch.Tensor  # (k*n, n) 0/1, column c marks cluster c
    within_merges: list[int]  # per model: merges that joined two clusters holding that model's units
    mean_similarity: float  # mean correlation of the pairs merged (zip) or matched (permute), NaN otherwise


def zip_match(corr: torch.Tensor, n_models: int, *, alpha: float = 0.5, beta: float = 1.0) -> ZipMatch:
    """Greedy ZipIt matching of k models' stacked units on their (k*n, k*n) correlation matrix."""
    total, n = _check(corr, n_models)
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must lie in [0, 1], got {alpha}")
    if beta < 0:
        raise InputError(f"beta must be >= 0, got {beta}")
    sim = corr.detach().to(torch.float64).clone()
    sim = torch.nan_to_num(sim, nan=0.0)
    sim.fill_diagonal_(-math.inf)
    model_of = torch.arange(total, device=sim.device) // n
    # has[c, m]: cluster c (indexed by its representative unit) holds a unit of model m
    has = torch.zeros(total, n_models, dtype=torch.bool, device=sim.device)
    has[torch.arange(total, device=sim.device), model_of] = True
    budget = math.floor(((total - n) // n_models) * beta + 1e-9)
    spent = [0] * n_models
    exhausted = torch.zeros(n_models, dtype=torch.bool, device=sim.device)
    if budget == 0:
        exhausted[:] = True
        sim[_shared_exhausted(has, exhausted)] = -math.inf
    rep = torch.arange(total)  # representative of every unit's cluster
    scores: list[float] = []
    for _ in range(total - n):
        flat = int(torch.argmax(sim))
        i, j = divmod(flat, total)
        best = float(sim[i, j])
        if best == -math.inf:
            raise AlignmentError(
                f"zip matching ran out of allowed merges with {len(set(rep.tolist()))} clusters left for {n} units "
                f"(beta={beta} forbids the remaining within-model merges)"
            )
        scores.append(best)
        shared = (has[i] & has[j]).nonzero().flatten().tolist()
        newly_exhausted = False
        for m in shared:
            spent[m] += 1
            if spent[m] >= budget and not exhausted[m]:
                exhausted[m] = True
                newly_exhausted = True
        # j's cluster joins i's
        rep[rep == j] = i
        has[i] |= has[j]
        has[j] = False
        merged = torch.minimum(sim[i], sim[j])
        # decay toward "less attractive": shrink positive similarities, stretch negative ones
        merged = torch.where(merged > 0, merged * alpha, merged / max(alpha, 1e-12))
        sim[i, :] = merged
        sim[:, i] = merged
        sim[i, i] = -math.inf
        sim[j, :] = -math.inf
        sim[:, j] = -math.inf
        if newly_exhausted:
            sim[_shared_exhausted(has, exhausted)] = -math.inf
        elif bool(exhausted.any()):
            # only the grown cluster's row can newly share an exhausted model with another cluster
            h = (has & exhausted[None, :]).to(torch.float64)
            row = (h @ h[i]) > 0
            sim[i, row] = -math.inf
            sim[row, i] = -math.inf
    labels = _relabel(rep)
    return _build(labels, n_models, spent, sum(scores) / len(scores) if scores else math.nan)


def permute_match(corr: torch.Tensor, n_models: int) -> ZipMatch:
    """Permutation baseline: each model's units assigned one-to-one to model 0's units (max correlation)."""
    total, n = _check(corr, n_models)
    labels = torch.empty(total, dtype=torch.long)
    labels[:n] = torch.arange(n)
    matched = []
    c = torch.nan_to_num(corr.detach().to(torch.float64), nan=0.0)
    for m in range(1, n_models):
        block = c[:n, m * n : (m + 1) * n]
        perm = solve_lap(block, maximize=True)  # model 0 unit i <-> model m unit perm[i]
        labels[m * n + perm] = torch.arange(n)
        matched.append(float(block[torch.arange(n), perm].mean()))
    return _build(labels, n_models, [0] * n_models, sum(matched) / len(matched))


def identity_match(n: int, n_models: int) -> ZipMatch:
    """Unit i of every model in cluster i: plain averaging."""
    labels = torch.arange(n).repeat(n_models)
    return _build(labels, n_models, [0] * n_models, math.nan)


def match(corr: torch.Tensor, n_models: int, matcher: str = "zip", *, alpha: float = 0.5, beta: float = 1.0) -> ZipMatch:
    """Dispatch to the named matcher ('zip', 'permute' or 'identity')."""
    if matcher == "zip":
        return zip_match(corr, n_models, alpha=alpha, beta=beta)
    if matcher == "permute":
        return permute_match(corr, n_models)
    if matcher == "identity":
        return identity_match(corr.shape[0] // n_models, n_models)
    raise InputError(f"matcher {matcher!r}: expected one of {', '.join(MATCHERS)}")


def _check(corr: torch.Tensor, n_models: int) -> tuple[int, int]:
    if n_models < 2:
        raise InputError(f"zipping needs at least two models, got {n_models}")
    if corr.dim() != 2 or corr.shape[0] != corr.shape[1] or corr.shape[0] % n_models:
        raise InputError(f"correlation matrix of shape {tuple(corr.shape)} does not stack {n_models} models of equal width")
    return corr.shape[0], corr.shape[0] // n_models


def _shared_exhausted(has: torch.Tensor, exhausted: torch.Tensor) -> torch.Tensor:
    """Pairs of clusters that both hold a unit of a model whose within-model budget is spent."""
    h = (has & exhausted[None, :]).to(torch.float64)
    return (h @ h.T) > 0


def _relabel(rep: torch.Tensor) -> torch.Tensor:
    """Cluster ids 0..n-1 in order of each cluster's first stacked unit."""
    labels = torch.empty_like(rep)
    ids: dict[int, int] = {}
    for unit, r in enumerate(rep.tolist()):
        labels[unit] = ids.setdefault(r, len(ids))
    return labels


def _build(labels: torch.Tensor, n_models: int, within: list[int], mean_sim: float) -> ZipMatch:
    total = labels.numel()
    n = total // n_models
    if int(labels.max()) + 1 != n or labels.unique().numel() != n:
        raise AlignmentError(f"matching produced {labels.unique().numel()} clusters, expected {n}")
    unmerge = torch.zeros(total, n, dtype=torch.float32)
    unmerge[torch.arange(total), labels] = 1.0
    merge = unmerge.T / unmerge.sum(0)[:, None]
    return ZipMatch(labels.clone(), merge.contiguous(), unmerge, list(within), mean_sim)
