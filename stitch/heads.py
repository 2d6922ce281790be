"""Classifier heads trained on fixed features, for targets that have no head of their own (e.g. encoders).

``kind="logistic"``: multinomial logistic regression (cross-entropy + L2), full-batch L-BFGS, seeded and
deterministic. ``kind="linear"``: ridge regression onto one-hot targets in closed form. Features are
standardised while fitting and the standardisation is folded back into the returned ``nn.Linear``, so
the head reads raw features.

``weight_decay="auto"`` picks the L2 strength by stratified k-fold cross-validation on the training
features (:func:`choose_weight_decay`): a head fitted to about a thousand texts with a fixed small
penalty over-fits, and every stitched figure read through it drops with it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from suture.merge.errors import InputError
from suture.merge.threads import single_threaded_if_small

logger = logging.getLogger(__name__)

__all__ = ["HEAD_KINDS", "WEIGHT_DECAY_GRID", "LinearHead", "choose_weight_decay", "head_accuracy", "train_head"]

HEAD_KINDS = ("logistic", "linear")
# L2 strengths tried by cross-validation (the loss is mean cross-entropy + wd/2 |W|^2 on standardised features)
WEIGHT_DECAY_GRID = (3e-3, 3e-2, 0.1, 0.3, 1.0, 3.0)
CV_FOLDS = 3
# iterations of each cross-validation fit: warm-started along the grid, they start near their optimum
CV_MAX_ITER = 40


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
    weight_decay: float | str = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
) -> LinearHead:
    """Fit a linear classifier (n_features -> num_classes) on fixed features; returns it in eval mode.

    ``weight_decay="auto"`` chooses it from WEIGHT_DECAY_GRID by cross-validation; the choice is kept on
    the head as ``head.weight_decay`` (and ``head.cv_scores``, mean validation loss per value).
    """
    if kind not in HEAD_KINDS:
        raise InputError(f"head kind must be one of {list(HEAD_KINDS)}, got {kind!r}")
    x, y = _check(features, labels)
    k = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if int(y.min()) < 0 or int(y.max()) >= k:
        raise InputError(f"head labels range {int(y.min())}..{int(y.max())} do not fit {k} classes")
    scores: dict[float, float] | None = None
    if weight_decay == "auto":
        weight_decay, scores = choose_weight_decay(x, y, kind=kind, num_classes=k, max_iter=max_iter, seed=seed)
    elif isinstance(weight_decay, str) or weight_decay < 0:
        raise InputError(f"head weight_decay must be >= 0 or 'auto', got {weight_decay!r}")
    head = _fit(x, y, kind, k, float(weight_decay), max_iter, seed)
    head.weight_decay = float(weight_decay)
    head.cv_scores = scores
    acc = head_accuracy(head, x.float(), y)
    logger.info("%s head %d -> %d trained on %d items (weight_decay %g): train accuracy %.4f", kind, x.shape[1], k, x.shape[0], weight_decay, acc)
    return head.eval()


def choose_weight_decay(
    features: Any,
    labels: Any,
    *,
    kind: str = "logistic",
    num_classes: int | None = None,
    grid: tuple[float, ...] = WEIGHT_DECAY_GRID,
    folds: int = CV_FOLDS,
    max_iter: int = 100,
    seed: int = 0,
) -> tuple[float, dict[float, float]]:
    """The grid value with the lowest mean validation loss over stratified folds (ties: the stronger penalty).

    Returns it with the mean validation loss of every value. With fewer than two items in some class no split exists and
    the middle of the grid is returned with an empty score table.
    """
    from sklearn.model_selection import StratifiedKFold

    x, y = _check(features, labels)
    k = int(y.max()) + 1 if num_classes is None else int(num_classes)
    smallest = int(torch.bincount(y).masked_fill(torch.bincount(y) == 0, y.numel()).min())
    n_folds = min(folds, smallest)
    if n_folds < 2:
        fallback = float(grid[len(grid) // 2])
        logger.info("head weight_decay: a class has a single item, no cross-validation; using %g", fallback)
        return fallback, {}
    splits = list(StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(x.numpy(), y.numpy()))
    losses: dict[float, list[float]] = {float(wd): [] for wd in grid}
    for tr, va in splits:
        tr_t, va_t = torch.as_tensor(tr), torch.as_tensor(va)
        start = None
        # Strongest penalty first, each fit warm-started from the last: weakly penalised fits start near their optimum.
        for wd in sorted(losses, reverse=True):
            head = _fit(x[tr_t], y[tr_t], kind, k, wd, min(max_iter, CV_MAX_ITER), seed, start=start)
            start = head.standardised
            losses[wd].append(_validation_loss(head, kind, x[va_t].float(), y[va_t], k))
    scores = {wd: sum(v) / len(v) for wd, v in sorted(losses.items())}
    best = min(scores, key=lambda wd: (round(scores[wd], 9), -wd))
    logger.info("head weight_decay by %d-fold CV: %g (validation loss %.4f)", n_folds, best, scores[best])
    return best, scores


@torch.no_grad()
def _validation_loss(head: nn.Module, kind: str, x: torch.Tensor, y: torch.Tensor, k: int) -> float:
    """The held-out value of what the head is fitted to: cross-entropy (logistic) or squared error to one-hot (linear).

    Smoother than held-out accuracy, which on a few hundred items is flat over a wide range of penalties
    and picks among them by noise.
    """
    logits = head(x)
    if kind == "linear":
        return float((logits - torch.nn.functional.one_hot(y, k).to(logits.dtype)).pow(2).sum(dim=1).mean())
    return float(torch.nn.functional.cross_entropy(logits, y))


def _fit(
    x: torch.Tensor, y: torch.Tensor, kind: str, k: int, weight_decay: float, max_iter: int, seed: int,
    start: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LinearHead:
    """The head on float64 features x: standardise, fit (logistic: from ``start`` if given), fold the standardisation back in."""
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
        if start is None:
            w = (torch.randn(k, d, generator=g, dtype=torch.float64) * 0.01).to(torch.float32).requires_grad_(True)
            b = torch.zeros(k, dtype=torch.float32, requires_grad=True)
        else:
            w, b = (t.detach().to(torch.float32).clone().requires_grad_(True) for t in start)
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
    head.standardised = (w, b)  # the solution in standardised coordinates, a warm start for the next fit
    return head


@torch.no_grad()
def head_accuracy(head: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of a head on features."""
    logits = head(features.reshape(features.shape[0], -1).to(next(head.parameters()).dtype))
    return float((logits.argmax(dim=1) == labels).double().mean())
