"""Seeded random generators and orthogonal matrices shared by the stitching tests."""

from __future__ import annotations

import torch


def gen(seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed`."""
    return torch.Generator().manual_seed(seed)


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    """A uniformly random d x d orthogonal matrix in float64 (QR with the sign fix)."""
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen(seed), dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))
