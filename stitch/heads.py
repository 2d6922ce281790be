"""Classifier heads trained on fixed features, for targets that have no head of their own (e.g. encoders).

``kind="logistic"``: multinomial logistic regression (cross-entropy + L2), full-batch L-BFGS, seeded and
deterministic. ``kind="linear"``: ridge regression onto one-hot targets in closed form. Features are
standardised while fitting and the standardisation is folded back into the returned ``nn.Linear``, so
the head reads raw features.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from merge.errors import InputError
from merge.threads import single_threaded_if_small

logger = logging.getLogger(__name__)

__all__ = ["HEAD_KINDS", "LinearHead", "head_accuracy", "train_head"]

HEAD_KINDS = ("logistic", "linear")


class LinearHead(nn.Linear):
    """A linear classifier that flattens its input first, so it also reads (n, C, H, W) feature maps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(x.shape[0], -1))


def _check(features: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(features)
    y = torch.as_tensor(labels)
    if x.ndim < 2 or x.shape[0] == 0:
        raise InputError(f"head features: expected a non-empty (samples, features) tensor, got shape {tuple(x.shape)}")
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise InputError(f"head labels: expected {x.shape[0]} integer labels, got shape {tuple(y.shape)}")
    if y.is_floating_point():
        raise InputError("head labels: expected integer class ids")
    if not bool(torch.isfinite(x).all()):
        raise InputError("head features: contain NaN or infinite values")
    return x, y.long()


def train_head(
    features: Any,
    labels: Any,
    *,
    kind: str = "logistic",
    num_classes: int | None = None,
    weight_decay: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
) -> LinearHead:
    """Fit a linear classifier (n_features -> num_classes) on fixed features; returns it in eval mode."""
    if kind not in HEAD_KINDS:
        raise InputError(f"head kind must be one of {list(HEAD_KINDS)}, got {kind!r}")
    if weight_decay < 0:
        raise InputError(f"head weight_decay must be >= 0, got {weight_decay}")
    x, y = _check(features, labels)
    k = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if int(y.min()) < 0 or int(y.max()) >= k:
        raise InputError(f"head labels range {int(y.min())}..{int(y.max())} do not fit {k} classes")
    mean = x.mean(dim=0)
    std = x.std(dim=0, correction=0)
    std = torch.where(std > 1e-8 * std.max().clamp_min(1e-30), std, torch.ones_like(std))
    xs = (x - mean) / std
    n, d = xs.shape
    if kind == "linear":
        # Ridge on one-hot targets with an unpenalised intercept (centred features, mean target as bias).
        t = torch.nn.functional.one_hot(y, k).to(torch.float64)
        tm = t.mean(dim=0)
        gram = xs.T @ xs + weight_decay * n * torch.eye(d, dtype=torch.float64)
        w = torch.linalg.lstsq(gram, xs.T @ (t - tm)).solution.T  # (k, d)
        b = tm
    else:
        g = torch.Generator().manual_seed(seed)
        # float32 is ample for a convex problem on standardised features and twice as fast on a CPU.
        xs32 = xs.to(torch.float32)
        w = (torch.randn(k, d, generator=g, dtype=torch.float64) * 0.01).to(torch.float32).requires_grad_(True)
        b = torch.zeros(k, dtype=torch.float32, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-6, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(xs32 @ w.T + b, y) + 0.5 * weight_decay * (w * w).sum()
            loss.backward()
            return loss

        with torch.enable_grad(), single_threaded_if_small(xs32.numel()):
            opt.step(closure)
        w, b = w.detach().to(torch.float64), b.detach().to(torch.float64)
    # Fold the standardisation in: w (x - m) / s + b = (w / s) x + (b - w m / s).
    w_raw = w / std
    b_raw = b - w_raw @ mean
    head = LinearHead(d, k)
    with torch.no_grad():
        head.weight.copy_(w_raw.to(torch.float32))
        head.bias.copy_(b_raw.to(torch.float32))
    acc = head_accuracy(head, x.float(), y)
    logger.info("%s head %d -> %d trained on %d items: train accuracy %.4f", kind, d, k, n, acc)
    return head.eval()


@torch.no_grad()
def head_accuracy(head: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of a head on features."""
    logits = head(features.reshape(features.shape[0], -1).to(next(head.parameters()).dtype))
    return float((logits.argmax(dim=1) == labels).double().mean())
