"""Arcee Fusion: take the other model's value only where it differs from the base in an important way.

Per entry, importance = |x - base| * KL(softmax(x) || softmax(base)), the KL divergence taken along the
last axis (one value per row; a vector is one row). Entries whose importance reaches the outlier fence
median + 1.5 * IQR of all importances (Tukey's rule) take the other model's value; the rest keep the base.

Origin: Arcee AI's method in mergekit 0.1.5 (``merge_methods/arcee_fusion.py``; https://arcee.ai, the
"Arcee Fusion" merge used for Arcee's SuperNova models). Quantiles follow mergekit exactly: the sorted
values at floor(q * (n - 1)), from a seeded sample of 1,000,000 entries (drawn with replacement) when a
tensor is larger than that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from suture.merge.methods._util import work_tensors
from suture.merge.methods.registry import MergeInputs, merge_method

#: tensors above this many entries estimate their quartiles from a sample of this size
QUANTILE_SAMPLE_SIZE = 1_000_000
_KL_EPS = 1e-8


def fusion_importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|other - base| scaled by the row-wise KL divergence of the rows' softmax distributions."""
    p = F.softmax(other, dim=-1) + _KL_EPS
    q = F.softmax(base, dim=-1) + _KL_EPS
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (other - base).abs() * kl


def quartiles(values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Q1, median and Q3 as the sorted values at floor(q * (n - 1)) (sampled for very large tensors)."""
    flat = values.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE_SIZE:
        device = generator.device if generator is not None else flat.device
        pick = torch.randint(flat.numel(), (QUANTILE_SAMPLE_SIZE,), generator=generator, device=device)
        flat = flat[pick.to(flat.device)]
    ordered = torch.sort(flat).values
    q = torch.tensor([0.25, 0.5, 0.75], device=ordered.device)
    return ordered[(q * (ordered.numel() - 1)).long()]


def fusion_mask(importance: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """float32 0/1 mask of entries at or above the fence median + 1.5 * (Q3 - Q1)."""
    q1, median, q3 = quartiles(importance, generator)
    return (importance >= median + 1.5 * (q3 - q1)).float()


@merge_method(
    name="arcee_fusion",
    papers="Arcee Fusion (Arcee AI, mergekit 0.1.5 merge_methods/arcee_fusion.py) https://arcee.ai",
    summary="Keep the base except where the other model's change is an importance outlier (median + 1.5 IQR).",
    requires_base=True,
    models=(1, 1),
)
def _arcee_fusion(inputs: MergeInputs) -> torch.Tensor:
    """Fuse the one non-base model into the base where its changes are important outliers."""
    (other,), base = work_tensors(inputs, native=True)  # mergekit computes in the recipe dtype
    assert base is not None
    mask = fusion_mask(fusion_importance(other, base), inputs.generator)
    return base + (other - base) * mask
