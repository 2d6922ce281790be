"""Activation moments for optimal-transport fusion: models of different widths seen on the same inputs.

:class:`merge.activations.FeatureStats` pairs two models of equal width; transport between different
widths needs the same sums with a rectangular cross term. Per group, :class:`UnitMoments` keeps the sample
count, each model's per-unit sum of squares and the ``(n_a, n_b)`` cross products, from which euclidean or
cosine distances between units and activation-norm marginals follow.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from suture.merge.activations import batch_inputs, unit_features
from suture.merge.errors import InputError
from suture.merge.graph.trace import Tap, trace_module

logger = logging.getLogger(__name__)


@dataclass
class UnitMoments:
    """Running sums over calibration samples for one group: A's units, B's units, their cross products."""

    count: int
    sq_a: torch.Tensor
    sq_b: torch.Tensor
    cross: torch.Tensor  # (n_a, n_b)

    @property
    def rms_a(self) -> torch.Tensor:
        """Root-mean-square activation of each reference unit."""
        return (self.sq_a / max(self.count, 1)).sqrt()

    @property
    def rms_b(self) -> torch.Tensor:
        """Root-mean-square activation of each unit of model B."""
        return (self.sq_b / max(self.count, 1)).sqrt()


def _hook(store: dict[str, torch.Tensor], group: str, tap: Tap):
    def grab(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            store[group] = unit_features(value.detach(), tap.axis, tap.inner).double()

    if tap.where == "input":
        return lambda _m, args: grab(args[0] if args else None)
    return lambda _m, _args, out: grab(out)


def _register(stack: ExitStack, model: nn.Module, taps: Mapping[str, Sequence[Tap]], store: dict) -> None:
    for group, group_taps in taps.items():
        if not group_taps:
            continue
        tap = group_taps[0]
        try:
            mod = model.get_submodule(tap.module)
        except AttributeError as exc:
            raise InputError(f"group {group!r}: the model has no module {tap.module!r} to observe") from exc
        hook = _hook(store, group, tap)
        handle = mod.register_forward_pre_hook(hook) if tap.where == "input" else mod.register_forward_hook(hook)
        stack.callback(handle.remove)


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
    dev = torch.device(device)
    taps_a = trace_module(module_a, example_input).taps
    taps_b = trace_module(module_b, example_input).taps
    wanted = set(taps_a) & set(taps_b)
    if groups is not None:
        wanted &= set(groups)
    taps_a = {g: t for g, t in taps_a.items() if g in wanted}
    taps_b = {g: t for g, t in taps_b.items() if g in wanted}
    modes = [(m, m.training) for model in (module_a, module_b) for m in model.modules()]
    moments: dict[str, UnitMoments] = {}
    seen = 0
    rec_a: dict[str, torch.Tensor] = {}
    rec_b: dict[str, torch.Tensor] = {}
    try:
        module_a.eval()
        module_b.eval()
        with ExitStack() as stack:
            _register(stack, module_a, taps_a, rec_a)
            _register(stack, module_b, taps_b, rec_b)
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
                for group, xa in rec_a.items():
                    xa = xa.to(dev)
                    xb = rec_b.get(group)
                    xb = None if xb is None else xb.to(dev)
                    if xb is None or xb.shape[0] != xa.shape[0]:
                        raise InputError(f"group {group!r}: models A and B gave features for different sample counts")
                    mom = moments.get(group)
                    if mom is None:
                        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=dev)  # noqa: E731
                        mom = moments[group] = UnitMoments(0, z(xa.shape[1]), z(xb.shape[1]), z(xa.shape[1], xb.shape[1]))
                    mom.count += xa.shape[0]
                    mom.sq_a += xa.pow(2).sum(0)
                    mom.sq_b += xb.pow(2).sum(0)
                    mom.cross += xa.T @ xb
                seen += 1
    finally:
        for m, mode in modes:
            m.train(mode)
    if seen == 0:
        raise InputError("no calibration batches were given for activation-based transport")
    logger.info("collected activation moments for %d groups over %d batches", len(moments), seen)
    return moments
