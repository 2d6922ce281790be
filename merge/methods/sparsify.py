"""Sparsification of task vectors: magnitude (TIES), random (DARE), outlier-trimmed magnitude
(Model Breadcrumbs) and magnitude-ranked random pruning (DELLA), with optional L1 rescaling.

Papers:
- TIES-Merging: Resolving Interference When Merging Models (Yadav et al., NeurIPS 2023) https://arxiv.org/abs/2306.01708
- Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch (Yu et al.,
  ICML 2024) https://arxiv.org/abs/2311.03099
- Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks (Davari & Belilovsky, ECCV 2024)
  https://arxiv.org/abs/2312.06795
- DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling (Deep et al.,
  arXiv 2024) https://arxiv.org/abs/2406.11617

Values (density in [0, 1], gamma >= 0, DELLA's density +/- epsilon inside (0, 1)) are checked once, by the
method registry's parameter models, before these functions run.

Rescaling follows mergekit: the kept entries are multiplied so that the L1 norm of the sparsified tensor
equals the original's (in expectation this is the papers' 1 / keep-probability factor).
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

#: below this L1 norm a tensor (or what is left of it) is not rescaled
RESCALE_EPS = 1e-7


def rescale_l1(tensor: torch.Tensor, masked: torch.Tensor, eps: float = RESCALE_EPS) -> torch.Tensor:
    """Scale ``masked`` so its L1 norm matches ``tensor``'s (unchanged when either norm is below ``eps``)."""
    before = tensor.abs().sum()
    after = masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def _finish(tensor: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """Apply a 0/1 mask and optionally rescale."""
    masked = tensor * mask.to(tensor.dtype)
    return rescale_l1(tensor, masked) if rescale else masked


def uniform_draw(shape: torch.Size, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform [0, 1) float32 samples shaped ``shape`` on ``like``'s device.

    Samples are drawn on the generator's own device (then moved), so one seeded CPU generator gives the
    same masks whatever device the tensors live on and whatever their dtype.
    """
    device = generator.device if generator is not None else like.device
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    return u.to(like.device)


def _magnitude_order(tensor: torch.Tensor, descending: bool) -> torch.Tensor:
    """Flat indices by magnitude, ranked in float32 with mergekit's sort so that ties break identically."""
    return torch.argsort(tensor.abs().reshape(-1).float(), descending=descending)


def magnitude(tensor: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude (TIES trim).

    A positive density keeps at least one entry, as in mergekit 0.1.5.
    """
    if density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        logger.debug("magnitude sparsification keeps 0 of %d entries", tensor.numel())
        return torch.zeros_like(tensor)
    k = max(1, int(density * tensor.numel()))
    idx = _magnitude_order(tensor, descending=True)[:k]
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    mask[idx] = 1
    return _finish(tensor, mask.view(tensor.shape), rescale)


def magnitude_outliers(tensor: torch.Tensor, density: float, gamma: float = 0.01, rescale: bool = False) -> torch.Tensor:
    """Drop the ``gamma`` fraction of largest-magnitude entries, then the smallest, keeping ``density``.

    When the two cuts overlap (density + gamma > 1) fewer large entries are dropped so that exactly
    ``int(density * n)`` entries remain.
    """
    if density >= 1:
        return tensor
    n = tensor.numel()
    keep = int(density * n)
    n_top = int(gamma * n)
    if n - keep - n_top < 0:
        n_top = n - keep
    if keep <= 0:
        return torch.zeros_like(tensor)
    # ascending order: skip the n - keep - n_top smallest, keep the next `keep`, the rest are outliers
    order = _magnitude_order(tensor, descending=False)
    n_bot = n - keep - n_top
    mask = torch.zeros(n, dtype=tensor.dtype, device=tensor.device)
    mask[order[n_bot:n_bot + keep]] = 1
    return _finish(tensor, mask.view(tensor.shape), rescale)


def random(
    tensor: torch.Tensor, density: float, rescale: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Keep each entry independently with probability ``density`` (DARE drop-and-rescale)."""
    if density >= 1:
        return tensor
    mask = uniform_draw(tensor.shape, tensor, generator) < density
    return _finish(tensor, mask, rescale)


def della_magprune(
    tensor: torch.Tensor,
    density: float,
    epsilon: float,
    rescale: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Keep entries with probability rising linearly with magnitude rank, from density - epsilon to
    density + epsilon, ranked along dim 1 (each row of a matrix; a vector is one row)."""
    if density >= 1:
        return tensor
    if density <= 0:
        return torch.zeros_like(tensor)
    shape = tensor.shape
    work = tensor.reshape(1, -1) if tensor.dim() < 2 else tensor
    n = work.shape[1]
    ranks = torch.argsort(torch.argsort(work.abs(), dim=1), dim=1).to(work.dtype)
    # a single entry per row has no ranking: give it the middle probability (= density)
    rank_norm = ranks / (n - 1) if n > 1 else torch.full_like(ranks, 0.5)
    probs = (density - epsilon) + rank_norm * (2 * epsilon)
    mask = uniform_draw(work.shape, work, generator) < probs
    return _finish(work, mask, rescale).reshape(shape)
