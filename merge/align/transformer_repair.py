"""REPAIR for transformer MLPs: give each merged hidden unit the interpolated statistics of its endpoints.

Averaging two aligned networks shrinks the variance of hidden units whose partners are not perfectly
correlated (Jordan et al., ICLR 2023, "REPAIR: REnormalizing Permuted Activations for Interpolation Repair").
For an MLP's up projection (GPT-2 ``c_fc``, BERT ``intermediate.dense``) the fix folds into the layer: unit
``i``'s pre-activation ``z`` becomes ``(z - mean_m) * std_t / std_m + mean_t``, where ``m`` is the merged
model and ``t`` the interpolation of A's and (aligned) B's statistics, measured on calibration batches. Blocks
are corrected in order, each measured after the earlier ones were corrected, since a corrected block changes
what the next one sees. LayerNorm needs no correction of its own: it renormalises the residual stream.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from suture.merge.activations import collect_stats
from suture.merge.errors import AlignmentError
from suture.merge.measure import Site
from suture.merge.spec import PermutationSpec

logger = logging.getLogger(__name__)


def up_projections(spec: PermutationSpec, module: nn.Module) -> list[tuple[str, str]]:
    """(group, module name) of every free MLP group written by exactly one biased Linear / Conv1D."""
    modules = dict(module.named_modules())
    found = []
    for g in spec.active_groups():
        if g.kind != "free" or g.name == "residual":
            continue
        writers = [m.tensor.removesuffix(".weight") for m in g.members if m.role == "out" and m.tensor.endswith(".weight")]
        if len(writers) != 1 or writers[0] not in modules:
            continue
        mod = modules[writers[0]]
        if (isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D") and getattr(mod, "bias", None) is not None:
            found.append((g.name, writers[0]))
    return found


def _site(name: str) -> Site:
    return Site(name, "output", lambda x: x.reshape(-1, x.shape[-1]), f"module {name!r}")


def _moments(model: nn.Module, names: Sequence[str], batches: Sequence[Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    stats = collect_stats(model, {n: [_site(n)] for n in names}, batches)
    return {n: (st.a.mean, st.a.std) for n, st in stats.items()}


def repair_mlps(merged: nn.Module, model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec,
                batches: Sequence[Any], t: float = 0.5, eps: float = 1e-6) -> int:
    """Rescale `merged`'s MLP up projections in place to the endpoints' interpolated unit statistics.

    `model_b` must be aligned to `model_a` (its units in A's order). Returns the number of corrected layers.
    """
    layers = up_projections(spec, merged)
    if not layers:
        raise AlignmentError("REPAIR found no MLP up projection (one biased Linear or Conv1D per MLP group) to correct")
    names = [name for _, name in layers]
    ends_a, ends_b = _moments(model_a, names, batches), _moments(model_b, names, batches)
    modules = dict(merged.named_modules())
    for name in names:
        mean_m, std_m = _moments(merged, [name], batches)[name]
        mean_t = (1 - t) * ends_a[name][0] + t * ends_b[name][0]
        std_t = (1 - t) * ends_a[name][1] + t * ends_b[name][1]
        scale = std_t / std_m.clamp_min(eps)
        mod = modules[name]
        with torch.no_grad():
            w = mod.weight
            s = scale.to(w.dtype)
            if isinstance(mod, nn.Linear):
                w.mul_(s[:, None])
            else:  # Conv1D stores (in, out)
                w.mul_(s[None, :])
            mod.bias.copy_(((mod.bias.double() - mean_m) * scale + mean_t).to(mod.bias.dtype))
        logger.info("REPAIR %s: mean std ratio %.3f", name, float(scale.mean()))
    return len(names)
