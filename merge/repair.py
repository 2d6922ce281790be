"""Fixing activation statistics after merging: BatchNorm reset and REPAIR.

Interpolating two aligned networks shrinks the variance of hidden units ("variance collapse"), and
interpolated BatchNorm running statistics no longer describe the merged network's activations.

:func:`reset_batchnorm` re-estimates every BatchNorm's ``running_mean``/``running_var`` on data: the
statistics are cleared, ``momentum=None`` makes PyTorch keep a cumulative average over all batches, the
batches run through the network with the BatchNorm layers in training mode (everything else, e.g.
dropout, in eval mode), and the network is left in eval mode. As in PyTorch's own training mode, each
batch is normalised with its own statistics during the pass, and ``running_var`` is the average of the
per-batch unbiased variances.

:func:`repair` implements REPAIR (Jordan et al. 2022, "REPAIR: REnormalizing Permuted Activations for
Interpolation Repair"). Statistics are taken per output channel, in eval mode, over all items (and all
positions: spatial positions for convolutions, tokens for sequence Linears). For a merge at ``t`` the
target of channel c at a repair point is

    mean* = (1 - t) * mean_A[c] + t * mean_B[c],   std* = (1 - t) * std_A[c] + t * std_B[c]

measured at the same point of the two endpoint networks. With the merged network's own statistics
(m, s) at that point, the output y of the channel becomes ``(y - m) * std* / sqrt(s^2 + eps) + mean*``.
This affine change is folded into parameters, so the repaired network has the original architecture:

* **Norm points** (BatchNorm, GroupNorm, LayerNorm over one axis, with affine parameters): the output of
  the norm is corrected by rescaling ``weight[c]`` and setting ``bias[c] = (bias[c] - m) * k + mean*``.
  Running statistics are left as they are (the correction already accounts for them): do not reset
  BatchNorm statistics after REPAIR.
* **Linear / Conv1d/2d/3d points** whose output does not feed a norm directly (e.g. the hidden layers
  of a plain MLP, measured *before* the activation function): row/output-channel c of ``weight`` is
  multiplied by k and ``bias[c] = (bias[c] - m) * k + mean*``. A layer without a bias only gets the
  rescaling (logged), since there is no parameter that could carry the shift.
* A Linear/Conv whose output goes straight into a norm is not a point itself: the norm after it is.
* By default the last point executed (the classifier / logits layer) is left alone.

Points are repaired in execution order, each measured after the earlier ones were corrected, so later
layers see the repaired distribution (as REPAIR's BatchNorm-insertion procedure does).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from suture.merge.data import CalibrationData, Inputs, inputs_to, iter_batches
from suture.merge.errors import InputError
from suture.merge.measure import RunningMoments, Site, capture, eval_mode

logger = logging.getLogger(__name__)

_LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM_TYPES = (_BatchNorm, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class RepairPoint:
    """A module whose output channels REPAIR renormalises."""

    name: str
    kind: str  # "norm" or "linear"
    channel_dim: int  # axis of the module output that indexes channels


def as_input_batches(batches: Any, batch_size: int = 256) -> list[Inputs]:
    """Normalise calibration data to a list of input batches.

    Accepts a :class:`CalibrationData`, one tensor / dict batch, or an iterable of batches where each
    batch is inputs or an ``(inputs, labels)`` pair.
    """
    if isinstance(batches, CalibrationData):
        out = [inputs for inputs, _ in iter_batches(batches, batch_size)]
    elif isinstance(batches, (torch.Tensor, Mapping)):
        out = [batches]
    elif isinstance(batches, Iterable):
        out = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]
    else:
        raise InputError(f"calibration batches must be a dataset, a tensor or an iterable of batches, got {type(batches).__name__}")
    if not out:
        raise InputError("calibration data is empty; expected at least one batch")
    return out


def _device(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def _run(module: nn.Module, inputs: Inputs) -> None:
    inputs = inputs_to(inputs, _device(module))
    module(**inputs) if isinstance(inputs, Mapping) else module(inputs)


@torch.no_grad()
def reset_batchnorm(module: nn.Module, batches: Any, batch_size: int = 256) -> nn.Module:
    """Recompute BatchNorm running statistics on data (cumulative average), then put the module in eval."""
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        logger.info("reset_batchnorm: no BatchNorm layers with running statistics; nothing to do")
        return module.eval()
    data = as_input_batches(batches, batch_size)
    momenta = [m.momentum for m in norms]
    module.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over every batch, not an exponential one
        m.train()
    try:
        for inputs in data:
            _run(module, inputs)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        module.eval()
    logger.info("reset statistics of %d BatchNorm layers on %d batches", len(norms), len(data))
    return module


def _channel_dim(module: nn.Module) -> int | None:
    if isinstance(module, (nn.Linear, nn.LayerNorm)):
        return -1
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, _BatchNorm, nn.GroupNorm)):
        return 1
    return None


def _is_affine_norm(module: nn.Module) -> bool:
    if isinstance(module, nn.LayerNorm):
        return module.weight is not None and len(module.normalized_shape) == 1
    if isinstance(module, (_BatchNorm, nn.GroupNorm)):
        return module.weight is not None and module.bias is not None
    return False


@torch.no_grad()
def repair_points(module: nn.Module, example_inputs: Inputs, skip_last: bool = True) -> list[RepairPoint]:
    """The modules REPAIR would correct, in execution order (found by running one batch)."""
    order: list[str] = []
    produced: dict[str, torch.Tensor] = {}
    feeds_norm: set[str] = set()
    handles = []
    names = {m: n for n, m in module.named_modules()}

    def after(mod: nn.Module, _inp: Any, out: Any) -> None:
        name = names[mod]
        if name not in order:
            order.append(name)
        if isinstance(mod, _LINEAR_TYPES) and isinstance(out, torch.Tensor):
            produced[name] = out

    def before(mod: nn.Module, inp: Any) -> None:
        # A norm reading the exact tensor a Linear/Conv produced: repair the norm, not the layer.
        if inp and isinstance(inp[0], torch.Tensor):
            for producer, tensor in produced.items():
                if inp[0] is tensor:
                    feeds_norm.add(producer)

    for mod in module.modules():
        if isinstance(mod, _LINEAR_TYPES) or isinstance(mod, _NORM_TYPES):
            handles.append(mod.register_forward_hook(after))
            if isinstance(mod, _NORM_TYPES):
                handles.append(mod.register_forward_pre_hook(before))
    was_training = module.training
    module.eval()
    try:
        _run(module, example_inputs)
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    by_name = dict(module.named_modules())
    points = []
    for name in order:
        mod = by_name[name]
        if isinstance(mod, _NORM_TYPES):
            if _is_affine_norm(mod):
                points.append(RepairPoint(name, "norm", _channel_dim(mod)))
            else:
                logger.info("REPAIR skips %s: a norm without per-channel affine parameters", name)
        elif name not in feeds_norm:
            points.append(RepairPoint(name, "linear", _channel_dim(mod)))
    if skip_last and points and points[-1].kind == "linear" and order and order[-1] == points[-1].name:
        points = points[:-1]
    return points


@torch.no_grad()
def channel_stats(
    module: nn.Module, batches: Any, names: Sequence[str], batch_size: int = 256
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel (mean, std) of the named modules' outputs over all items and positions, in eval mode."""
    data = as_input_batches(batches, batch_size)
    by_name = dict(module.named_modules())
    missing = [n for n in names if n not in by_name]
    if missing:
        raise InputError(f"{type(module).__name__} has no module(s) {missing}; expected the same architecture on both sides")
    sites = {}
    for name in names:
        dim = _channel_dim(by_name[name])
        if dim is None:
            raise InputError(f"module {name!r} is a {type(by_name[name]).__name__}; REPAIR handles Linear, Conv and norm layers")
        sites[name] = Site(name, "output", partial(_channels, dim=dim), f"REPAIR {name!r}")
    moments: dict[str, RunningMoments] = {}
    with eval_mode(module), capture(module, sites, keep="all") as seen:
        for inputs in data:
            seen.clear()
            _run(module, inputs)
            for name, blocks in seen.items():
                for x in blocks:  # a module run twice in one pass counts twice
                    if name not in moments:
                        moments[name] = RunningMoments(x.shape[1])
                    moments[name].update(x)
    out = {}
    for name in names:
        if name not in moments:
            raise InputError(f"module {name!r} did not run on the calibration data")
        out[name] = (moments[name].mean.float(), moments[name].std.float())
    return out


def _channels(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Rows = every item and position, columns = the channels on ``dim``."""
    x = x.double().movedim(dim, -1)
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def _fold(module: nn.Module, point: RepairPoint, scale: torch.Tensor, shift: torch.Tensor) -> bool:
    """Make the module's output channel c become out*scale[c] + shift[c]; False if no bias could take the shift."""
    weight = module.weight
    view = [-1] + [1] * (weight.dim() - 1) if point.kind == "linear" else [-1]
    weight.mul_(scale.to(weight).view(view))
    bias = module.bias
    if bias is None:
        return False
    bias.mul_(scale.to(bias)).add_(shift.to(bias))
    return True


def repair(
    merged: nn.Module,
    module_a: nn.Module,
    module_b: nn.Module,
    batches: Any,
    t: float = 0.5,
    *,
    eps: float = 1e-5,
    skip_last: bool = True,
    modules: Sequence[str] | None = None,
    batch_size: int = 256,
) -> nn.Module:
    """REPAIR the merged module in place so its channel statistics match the interpolated endpoints'."""
    if not 0.0 <= t <= 1.0:
        raise InputError(f"REPAIR t must lie in [0, 1], got {t}")
    data = as_input_batches(batches, batch_size)
    found = repair_points(merged, data[0], skip_last=skip_last)
    if modules is not None:
        wanted = {p.name: p for p in repair_points(merged, data[0], skip_last=False)}
        unknown = [m for m in modules if m not in wanted]
        if unknown:
            raise InputError(f"REPAIR modules {unknown} are not Linear/Conv/affine-norm layers that ran; candidates: {sorted(wanted)}")
        found = [wanted[m] for m in wanted if m in set(modules)]
    names = [p.name for p in found]
    if not names:
        logger.warning("REPAIR found nothing to correct in %s", type(merged).__name__)
        return merged.eval()
    stats_a = channel_stats(module_a, data, names)
    stats_b = channel_stats(module_b, data, names)
    by_name = dict(merged.named_modules())
    for point in found:
        (mean_a, std_a), (mean_b, std_b) = stats_a[point.name], stats_b[point.name]
        if mean_a.shape != mean_b.shape:
            raise InputError(f"REPAIR {point.name!r}: A has {mean_a.numel()} channels, B {mean_b.numel()}")
        target_mean = torch.lerp(mean_a, mean_b, t)
        target_std = torch.lerp(std_a, std_b, t)
        mean, std = channel_stats(merged, data, [point.name])[point.name]
        if mean.shape != target_mean.shape:
            raise InputError(f"REPAIR {point.name!r}: merged model has {mean.numel()} channels, endpoints {target_mean.numel()}")
        scale = target_std / torch.sqrt(std * std + eps)
        shift = target_mean - mean * scale
        if not _fold(by_name[point.name], point, scale, shift):
            logger.warning("REPAIR %s: no bias, so only the scale was corrected (mean left as is)", point.name)
        logger.debug("REPAIR %s (%s): mean std ratio %.3f", point.name, point.kind, float((target_std / std.clamp_min(1e-12)).mean()))
    logger.info("REPAIR corrected %d points at t=%.3f", len(found), t)
    return merged.eval()
