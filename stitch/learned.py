"""Learned stitching layers (Bansal et al., 2021, "Revisiting model stitching to compare neural representations").

A stitching layer is an affine map from A's representation at layer i to B's at layer j: a Linear layer for
(n, d) features, a 1x1 convolution for (n, C, H, W) feature maps (the same affine map at every pixel).
It is initialised in closed form by least squares on activations of the same inputs through both models,
and can then be fine-tuned on the task loss through B's frozen suffix with A frozen (only the stitch
learns), as in the paper.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from suture.merge.errors import InputError
from suture.merge.threads import single_threaded

logger = logging.getLogger(__name__)

__all__ = ["LinearStitch", "finetune_stitch", "fit_linear_stitch", "pixel_rows"]

# Singular values below this fraction of the largest are dropped in the least-squares solve
# (dead ReLU units make activations rank-deficient).
_RTOL = 1e-10


def pixel_rows(x: torch.Tensor) -> torch.Tensor:
    """(n, d) -> itself; (n, C, H, W) -> (n*H*W, C): one row per pixel, channels as features."""
    if x.ndim == 2:
        return x
    if x.ndim == 4:
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    raise InputError(f"stitching layer input: expected (n, d) features or (n, C, H, W) maps, got shape {tuple(x.shape)}")


class LinearStitch(nn.Module):
    """Affine stitch: ``x W^T + b`` on (n, d) features, or the same map per pixel (1x1 conv) on (n, C, H, W)."""

    def __init__(self, in_features: int, out_features: int, conv: bool = False) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.conv = bool(conv)
        self.weight = nn.Parameter(torch.zeros(self.out_features, self.in_features))
        self.bias = nn.Parameter(torch.zeros(self.out_features))

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments, JSON-serialisable."""
        return {"in_features": self.in_features, "out_features": self.out_features, "conv": self.conv}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv:
            if x.ndim != 4:
                raise InputError(f"1x1-conv stitch expects (n, C, H, W) maps, got shape {tuple(x.shape)}")
            return F.conv2d(x, self.weight[:, :, None, None], self.bias)
        if x.ndim != 2:
            raise InputError(f"linear stitch expects (n, d) features, got shape {tuple(x.shape)}")
        return F.linear(x, self.weight, self.bias)


def fit_linear_stitch(xa: torch.Tensor, xb: torch.Tensor, *, ridge: float = 0.0) -> LinearStitch:
    """Closed-form least-squares stitch from A's activations ``xa`` to B's ``xb`` on the same inputs."""
    xa = torch.as_tensor(xa)
    xb = torch.as_tensor(xb)
    if xa.shape[0] != xb.shape[0]:
        raise InputError(
            f"activations are not parallel: A has {xa.shape[0]} items, B has {xb.shape[0]}; "
            "each row must be the same input through both models"
        )
    if xa.ndim != xb.ndim:
        raise InputError(f"cannot stitch a {xa.ndim}-D representation {tuple(xa.shape)} into a {xb.ndim}-D one {tuple(xb.shape)}")
    if xa.ndim == 4 and xa.shape[2:] != xb.shape[2:]:
        raise InputError(
            f"a 1x1-conv stitch needs equal spatial sizes; A's maps are {tuple(xa.shape[2:])}, B's {tuple(xb.shape[2:])}"
        )
    if ridge < 0:
        raise InputError(f"ridge must be >= 0, got {ridge}")
    x = pixel_rows(xa).to(torch.float64)
    y = pixel_rows(xb).to(torch.float64)
    mx, my = x.mean(dim=0), y.mean(dim=0)
    xc, yc = x - mx, y - my
    if ridge > 0:
        gram = xc.T @ xc + ridge * torch.eye(x.shape[1], dtype=x.dtype)
        w = torch.linalg.solve(gram, xc.T @ yc)
    else:
        w = torch.linalg.pinv(xc, rtol=_RTOL) @ yc  # minimum-norm solution when xc is rank-deficient
    b = my - mx @ w
    stitch = LinearStitch(x.shape[1], y.shape[1], conv=xa.ndim == 4)
    with torch.no_grad():
        stitch.weight.copy_(w.T.to(torch.float32))
        stitch.bias.copy_(b.to(torch.float32))
    resid = float((xc @ w - yc).pow(2).sum() / yc.pow(2).sum().clamp_min(1e-30))
    logger.info("closed-form stitch %d -> %d on %d rows: relative residual %.4f", x.shape[1], y.shape[1], x.shape[0], resid)
    return stitch


def finetune_stitch(
    stitch: nn.Module,
    source_features: torch.Tensor,
    suffix: nn.Module,
    labels: torch.Tensor,
    *,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> list[float]:
    """Train only the stitch on cross-entropy through B's frozen suffix; A is frozen (features precomputed)."""
    if source_features.shape[0] != labels.shape[0]:
        raise InputError(f"fine-tuning data: {source_features.shape[0]} feature rows but {labels.shape[0]} labels")
    if epochs < 0:
        raise InputError(f"epochs must be >= 0, got {epochs}")
    dev = torch.device(device)
    # Both modules return to where they were, so callers keep working on their own device.
    homes = [(m, next((p.device for p in m.parameters()), torch.device("cpu"))) for m in (stitch, suffix)]
    stitch.to(dev).train()
    suffix.to(dev).eval()
    frozen = [(p, p.requires_grad) for p in suffix.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    opt = torch.optim.Adam(stitch.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = source_features.shape[0]
    history: list[float] = []
    try:
        small = dev.type == "cpu" and source_features[:batch_size].numel() < (1 << 20)
        with torch.enable_grad(), (single_threaded() if small else nullcontext()):
            for _ in range(epochs):
                order = torch.randperm(n, generator=g)
                total = 0.0
                for start in range(0, n, batch_size):
                    idx = order[start : start + batch_size]
                    logits = suffix(stitch(source_features[idx].to(dev)))
                    loss = F.cross_entropy(logits, labels[idx].to(dev))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(idx)
                history.append(total / n)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        for m, home in homes:
            m.to(home)
        stitch.eval()
    logger.info("fine-tuned stitch for %d epochs: loss %s", epochs, [round(h, 4) for h in history])
    return history
