"""SCE (Select, Calculate, Erase): variance-selected, energy-weighted, sign-agreeing task-vector fusion.

Paper: FuseChat: Knowledge Fusion of Chat Models (Wan et al., arXiv 2024) https://arxiv.org/abs/2408.07990

Select: keep the ``select_topk`` fraction of entries where the task vectors vary most across models.
Calculate: weight each model by the mean square of its (selected) task vector, normalized to sum 1.
Erase: per entry, drop task vectors whose sign disagrees with the sign of their sum, then take the
weighted average of the rest and add it to the base.
"""

from __future__ import annotations

import torch
from pydantic import Field

from suture.merge.methods._util import work_tensors
from suture.merge.methods.registry import Flag, Fraction, MergeInputs, MethodParams, merge_method
from suture.merge.methods.task_arithmetic import sign_consensus_mask


def sce_select_mask(deltas: torch.Tensor, density: float) -> torch.Tensor:
    """0/1 mask over one tensor's entries keeping the ``density`` fraction of nonzero-variance entries
    with the largest variance across models (models on dim 0)."""
    if density <= 0:
        return torch.zeros_like(deltas[0])
    if density >= 1:
        return torch.ones_like(deltas[0])
    var = torch.var(deltas, dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * density)
    mask = torch.zeros_like(var)
    if k == 0:
        return mask
    idx = torch.topk(var.abs().reshape(-1), k=k, largest=True).indices  # mergekit's call: ties break alike
    mask.view(-1)[idx] = 1
    return mask


def sce_weights(deltas: torch.Tensor) -> torch.Tensor:
    """Per-model weights: mean square of each task vector, normalized to sum 1.

    Uniform when the energies sum below 1e-6, mergekit 0.1.5's cut-off (tiny task vectors count as equal).
    """
    energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = float(energy.sum())
    if abs(total) < 1e-6 or not torch.isfinite(energy.sum()):
        return torch.full_like(energy, 1.0 / energy.shape[0])
    return energy / total


class SceParams(MethodParams):
    int8_mask: Flag = Field(False, description="accepted for mergekit compatibility; has no effect on results")
    select_topk: Fraction = Field(1.0, description="fraction of highest-variance entries kept (1 keeps all)")


@merge_method(
    name="sce",
    papers="FuseChat: Knowledge Fusion of Chat Models (Wan et al., arXiv 2024) https://arxiv.org/abs/2408.07990",
    summary="Select high-variance entries, weight models by task-vector energy, erase minority signs.",
    requires_base=True,
    params=SceParams,
)
def _sce(inputs: MergeInputs) -> torch.Tensor:
    """SCE merge of all non-base models onto the base."""
    tensors, base = work_tensors(inputs, native=True)  # in the recipe dtype, as mergekit computes it
    assert base is not None
    deltas = torch.stack([t - base for t in tensors], dim=0)
    topk = float(inputs.params["select_topk"])
    if topk < 1:
        deltas = deltas * sce_select_mask(deltas, topk).unsqueeze(0)
    erase = sign_consensus_mask(deltas, "sum").to(deltas.dtype)
    weights = sce_weights(deltas).view(-1, *([1] * (deltas.dim() - 1)))
    erased = weights * erase
    merged = (deltas * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6)
    return base + merged
