"""Activation moments for optimal-transport fusion: models of different widths seen on the same inputs.

:class:`merge.activations.FeatureStats` pairs two models of equal width; transport between different
widths needs the same sums with a rectangular cross term. Per group, :class:`UnitMoments` (a
:class:`~merge.measure.PairedMoments`) keeps the sample count, each model's per-unit sum of squares and the
``(n_a, n_b)`` cross products, from which euclidean or cosine distances between units and activation-norm
marginals follow.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from suture.merge.activations import batch_inputs
from suture.merge.errors import InputError
from suture.merge.graph.trace import Tap, trace_module
from suture.merge.measure import PairedMoments, Site, capture, eval_mode, tap_site

logger = logging.getLogger(__name__)


class UnitMoments(PairedMoments):
    """Running sums over calibration samples for one group: A's units, B's units, their cross products."""

    @property
    def sq_a(self) -> torch.Tensor:
        return self.a.sq

    @property
    def sq_b(self) -> torch.Tensor:
        return self.side("b").sq

    @property
    def rms_a(self) -> torch.Tensor:
        """Root-mean-square activation of each reference unit."""
        return self.a.rms

    @property
    def rms_b(self) -> torch.Tensor:
        """Root-mean-square activation of each unit of model B."""
        return self.side("b").rms


def _sites(taps: Mapping[str, Sequence[Tap]]) -> dict[str, Site]:
    """Each group read at its first tap (unit features)."""
    return {g: tap_site(t[0]) for g, t in taps.items() if t}


@torch.no_grad()
def collect_unit_moments(
    module_a: nn.Module,
    module_b: nn.Module,
    batches: Iterable[Any],
    *,
    example_input: torch.Tensor | tuple,
    groups: Iterable[str] | None = None,
    device: str | torch.device = "cpu",
    max_batches: int | None = None,
) -> dict[str, UnitMoments]:
    """Run the same calibration batches through both models (eval mode); per-group unit moments."""
    taps_a = trace_module(module_a, example_input).taps
    taps_b = trace_module(module_b, example_input).taps
    wanted = set(taps_a) & set(taps_b)
    if groups is not None:
        wanted &= set(groups)
    taps_a = {g: t for g, t in taps_a.items() if g in wanted}
    taps_b = {g: t for g, t in taps_b.items() if g in wanted}
    return moments_at(module_a, module_b, _sites(taps_a), _sites(taps_b), batches, device=device,
                      max_batches=max_batches, on_missing_tensor="skip")


@torch.no_grad()
def moments_at(
    module_a: nn.Module,
    module_b: nn.Module,
    sites_a: Mapping[Hashable, Site],
    sites_b: Mapping[Hashable, Site],
    batches: Iterable[Any],
    *,
    device: str | torch.device = "cpu",
    max_batches: int | None = None,
    on_missing_tensor: Literal["raise", "skip"] = "raise",
) -> dict[str, UnitMoments]:
    """Unit moments of A's and B's features at sites keyed alike, on the same batches (eval mode).

    A key is a group name or a tuple starting with one; the samples of every site of a group are pooled
    (stacked) into that group's moments.
    """
    dev = torch.device(device)
    moments: dict[str, UnitMoments] = {}
    seen = 0
    with eval_mode(module_a, module_b), capture(module_a, sites_a, on_missing_tensor=on_missing_tensor) as rec_a, \
            capture(module_b, sites_b, on_missing_tensor=on_missing_tensor) as rec_b:  # fmt: skip
        for batch in batches:
            if max_batches is not None and seen >= max_batches:
                break
            args, kwargs = batch_inputs(batch)
            rec_a.clear()
            rec_b.clear()
            for model in (module_a, module_b):
                # inputs go where the model is; the moments live on `device`
                where = next((p.device for p in model.parameters()), torch.device("cpu"))
                model(*[x.to(where) if isinstance(x, torch.Tensor) else x for x in args],
                      **{k: v.to(where) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
            for key, xa in rec_a.items():
                group = key[0] if isinstance(key, tuple) else key
                xb = rec_b.get(key)
                if xb is None or xb.shape[0] != xa.shape[0]:
                    raise InputError(f"group {group!r}: models A and B gave features for different sample counts")
                if group not in moments:
                    moments[group] = UnitMoments(xa.shape[1], xb.shape[1], device=dev)
                moments[group].update(xa, xb)
            seen += 1
    if seen == 0:
        raise InputError("no calibration batches were given for activation-based transport")
    logger.info("collected activation moments for %d groups over %d batches", len(moments), seen)
    return moments
