"""RAM and RAM+ (tensor-local): merge task vectors by how many models actually change each entry.

An entry of model i's task vector tau_i = x_i - base counts as changed when |tau_i| > epsilon. Entries
changed by exactly one model are taken whole (no averaging dilutes them); entries changed by several
models are averaged over those models only. RAM+ additionally amplifies each model's unique entries by
lambda_i = 1 + r * min(rho_i, alpha), where rho_i is the ratio of model i's shared to unique changed
entries in this tensor, which compensates models whose updates mostly overlap with others'.

Paper: Reinforced Agent Merging (RAM), arXiv 2601.13572 https://arxiv.org/abs/2601.13572; parameters and
the tensor-local variant as in mergekit 0.1.5 (``merge_methods/ram.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from pydantic import Field

from suture.merge.methods._util import work_tensors
from suture.merge.methods.registry import MergeInputs, MethodParams, NonNegative, Number, merge_method

_PAPER = "Reinforced Agent Merging (arXiv 2026) https://arxiv.org/abs/2601.13572"


class Overlap(NamedTuple):
    """Flattened task vectors (models on dim 0) and who changes which entry."""

    deltas: torch.Tensor  # (models, entries), unchanged entries zeroed
    changed: torch.Tensor  # bool (models, entries): |delta| > epsilon
    counts: torch.Tensor  # int (1, entries): how many models change the entry
    shared: torch.Tensor  # bool (1, entries): changed by more than one model
    unique: torch.Tensor  # bool (1, entries): changed by exactly one model


def overlap(tensors: list[torch.Tensor], base: torch.Tensor, epsilon: float) -> Overlap:
    """Task vectors and their change masks for one tensor."""
    deltas = torch.stack([t - base for t in tensors], dim=0).reshape(len(tensors), -1)
    changed = deltas.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    return Overlap(deltas * changed, changed, counts, counts > 1, counts == 1)


def _merged(o: Overlap, base: torch.Tensor, unique_scale: torch.Tensor | None) -> torch.Tensor:
    """base + sum_i (unique part of tau_i, scaled) + (shared part of tau_i) / count."""
    unique = o.deltas * o.unique
    if unique_scale is not None:
        unique = unique * unique_scale.unsqueeze(-1)
    merged = (unique + o.deltas * o.shared / o.counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def _epsilon(inputs: MergeInputs) -> float:
    return float(inputs.params["epsilon"])


class RamParams(MethodParams):
    epsilon: NonNegative = Field(
        1e-5, description="a task-vector entry counts as changed when its magnitude exceeds this"
    )


class RamPlusParams(RamParams):
    r: Number = Field(0.1, description="strength of the unique-change amplification")
    alpha: NonNegative = Field(0.2, description="cap on the shared/unique ratio used for amplification")


@merge_method(
    name="ram",
    papers=_PAPER,
    summary="Keep changes made by one model whole; average changes several models make over those models.",
    requires_base=True,
    params=RamParams,
)
def _ram(inputs: MergeInputs) -> torch.Tensor:
    """RAM: unique changes kept whole, shared changes averaged over the models that make them."""
    tensors, base = work_tensors(inputs, native=True)  # mergekit computes in the recipe dtype
    assert base is not None
    return _merged(overlap(tensors, base, _epsilon(inputs)), base, None)


def unique_amplification(o: Overlap, r: float, alpha: float, epsilon: float) -> torch.Tensor:
    """Per model lambda_i = 1 + r * clamp(shared_i / max(unique_i, epsilon), 0, alpha) (float32)."""
    shared = (o.changed & o.shared).sum(dim=1)
    unique = (o.changed & o.unique).sum(dim=1)
    rho = shared / unique.clamp(min=epsilon)
    return 1 + r * rho.clamp(min=0, max=alpha)


@merge_method(
    name="ramplus_tl",
    papers=_PAPER,
    summary="RAM with each model's unique changes amplified by its shared/unique ratio (tensor-local RAM+).",
    requires_base=True,
    params=RamPlusParams,
)
def _ramplus_tl(inputs: MergeInputs) -> torch.Tensor:
    """RAM+ (tensor-local): RAM with each model's unique changes amplified by its overlap ratio."""
    tensors, base = work_tensors(inputs, native=True)
    assert base is not None
    eps = _epsilon(inputs)
    o = overlap(tensors, base, eps)
    lam = unique_amplification(o, float(inputs.params["r"]), float(inputs.params["alpha"]), eps)
    return _merged(o, base, lam)
