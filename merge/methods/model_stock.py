"""Model Stock: move from the base towards the average of fine-tuned models by an angle-derived ratio.

Paper: Model Stock: All we need is just a few fine-tuned models (Jang et al., ECCV 2024)
https://arxiv.org/abs/2403.19522

With N fine-tuned models whose task vectors meet at (mean pairwise) angle theta, the merged weight is
t * mean(w_i) + (1 - t) * w_base with t = N cos(theta) / (1 + (N - 1) cos(theta)).
"""

from __future__ import annotations

import torch
from pydantic import Field

from suture.merge.methods._util import work_tensors
from suture.merge.methods.registry import Flag, MergeInputs, MethodParams, merge_method


def model_stock_ratio(cos_theta: torch.Tensor, n: int) -> torch.Tensor:
    """Interpolation ratio t = N cos / (1 + (N - 1) cos); 0 where the denominator vanishes."""
    denom = 1 + (n - 1) * cos_theta
    # mergekit 0.1.5 treats |denominator| < 1e-6 as the singularity and keeps the base there
    singular = denom.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denom), denom)
    return torch.where(singular, torch.zeros_like(cos_theta), n * cos_theta / safe)


class ModelStockParams(MethodParams):
    filter_wise: Flag = Field(False, description="compute the angle per row (output filter) instead of per tensor")


@merge_method(
    name="model_stock",
    papers=(
        "Model Stock: All we need is just a few fine-tuned models (Jang et al., ECCV 2024) "
        "https://arxiv.org/abs/2403.19522"
    ),
    summary="Interpolate between the base and the models' average by a ratio set by their task vectors' angle.",
    requires_base=True,
    models=(2, None),
    params=ModelStockParams,
)
def _model_stock(inputs: MergeInputs) -> torch.Tensor:
    """Model Stock over all non-base models; one angle per tensor, or per row when ``filter_wise``."""
    ws, w0 = work_tensors(inputs, native=True)  # in the recipe dtype, as mergekit computes it
    assert w0 is not None
    shape = w0.shape
    if inputs.params["filter_wise"]:
        # one ratio per output filter (vectors along the last axis); a vector is a single filter
        if w0.dim() <= 1:
            w0 = w0.reshape(1, -1)
            ws = [w.reshape(1, -1) for w in ws]
    else:
        w0 = w0.reshape(-1)
        ws = [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    # the paper uses a single angle; for N > 2 models the mean pairwise cosine stands in for it
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            a, b = offsets[i], offsets[j]
            norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    t = model_stock_ratio(cos_theta, n)
    w_avg = sum(ws) / n
    return (t * w_avg + (1 - t) * w0).reshape(shape)
