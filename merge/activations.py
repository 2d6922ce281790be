"""Capture hidden features with forward hooks and keep running statistics instead of the features.

A :class:`~merge.graph.trace.Tap` names a module whose input or output carries a permutation group along
one axis. For every group, :func:`collect_stats` runs the calibration batches through one model (or two,
batch by batch in lock step) and accumulates sums from which means, variances, the cross-covariance and
cross-correlation between the two models' units, and optionally each model's own (self-)correlation are
computed. Memory stays at one batch of features plus ``O(n^2)`` per group, however much data is used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from suture.merge.errors import InputError
from suture.merge.graph.trace import Tap, trace_module
from suture.merge.measure import PairedMoments, Site, capture, eval_mode, tap_site, unit_features

__all__ = ["FeatureStats", "batch_inputs", "collect_stats", "group_taps", "unit_features"]

logger = logging.getLogger(__name__)


def group_taps(module: nn.Module, example_input: torch.Tensor | tuple, *, prefix: str = "") -> dict[str, list[Tap]]:
    """Map each traced spec group to the module inputs/outputs that carry it (group names as in the spec)."""
    return trace_module(module, example_input, prefix=prefix).taps


class FeatureStats(PairedMoments):
    """Running sums over the samples of one group's units in model A and, optionally, model B.

    A :class:`~merge.measure.PairedMoments` of equal widths (``stats.a.mean``, ``stats.b.std``, ...);
    ``self_stats`` also keeps each side's ``X^T X``. Constant units follow the default
    :data:`~merge.measure.DEAD` rule.
    """

    def __init__(
        self, n: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64,
        paired: bool = True, self_stats: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(n, n if paired else None, gram=self_stats, device=device, dtype=dtype)

    def constant_a(self) -> torch.Tensor:
        """Units of A that never vary on the data (dead ReLUs, saturated units): bool mask."""
        return self.a.constant()

    def constant_b(self) -> torch.Tensor:
        """Units of B that never vary on the data: bool mask."""
        return self.side("b").constant()

    def self_corr(self, which: str = "a", eps: float = 1e-12) -> torch.Tensor:
        """Correlation between the units of one model (constant units: 0, also on the diagonal)."""
        return self.side(which).corr(eps)

    def joint_corr(self, eps: float = 1e-12) -> torch.Tensor:
        """(2n, 2n) correlation of A's and B's units stacked [A; B], as ZipIt matches within and across."""
        cross = self.cross_corr(eps)
        top = torch.cat([self.self_corr("a", eps), cross], dim=1)
        bottom = torch.cat([cross.T, self.self_corr("b", eps)], dim=1)
        return torch.cat([top, bottom], dim=0)


def batch_inputs(batch: Any) -> tuple[tuple, dict]:
    """Positional and keyword model inputs of a calibration batch (tensor, (inputs, labels), or dict)."""
    # (inputs, labels) pairs from a DataLoader feed only the inputs; a dict is keyword arguments (HF style)
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return (batch[0],), {}
    raise InputError(f"cannot feed a calibration batch of type {type(batch).__name__}; pass input_fn")


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def collect_stats(
    model_a: nn.Module,
    taps: Mapping[str, Sequence[Tap | Site]],
    batches: Iterable[Any],
    *,
    model_b: nn.Module | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    self_stats: bool = False,
    max_batches: int | None = None,
    input_fn: Callable[[Any], tuple[tuple, dict]] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, FeatureStats]:
    """Run calibration batches through model A (and B) in eval mode; return per-group feature statistics.

    Each group is observed at its taps (or :class:`~merge.measure.Site` objects, which shape their own
    features); the samples of all of a group's taps are pooled into one set of statistics.
    """
    dev = torch.device(device)
    feed = input_fn or batch_inputs
    stats: dict[str, FeatureStats] = {}
    models = (model_a,) if model_b is None else (model_a, model_b)
    seen = 0
    sites = {(group, i): tap if isinstance(tap, Site) else tap_site(tap)
             for group, group_taps_ in taps.items() for i, tap in enumerate(group_taps_)}
    with eval_mode(*models), torch.no_grad(), capture(model_a, sites) as rec_a:
        with capture(model_b, sites) if model_b is not None else nullcontext({}) as rec_b:
            for batch in batches:
                if max_batches is not None and seen >= max_batches:
                    break
                args, kwargs = feed(batch)
                rec_a.clear()
                model_a(*_to(args, _model_device(model_a)), **_to(kwargs, _model_device(model_a)))
                if model_b is not None:
                    rec_b.clear()
                    model_b(*_to(args, _model_device(model_b)), **_to(kwargs, _model_device(model_b)))
                for (group, i), xa in rec_a.items():
                    xb = rec_b.get((group, i)) if model_b is not None else None
                    if group not in stats:
                        stats[group] = FeatureStats(xa.shape[1], dev, dtype, paired=model_b is not None, self_stats=self_stats)
                    stats[group].update(xa, xb)
                seen += 1
                if progress is not None:
                    progress(seen)
    if seen == 0:
        raise InputError("no calibration batches were given")
    missing = [g for g in taps if g not in stats]
    if missing:
        logger.warning("no features were captured for %d groups, e.g. %r (were their modules run?)", len(missing), missing[0])
    return stats
