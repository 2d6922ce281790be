"""A merge method defined outside the package, the way a new method is added: one decorated kernel.

``toy_max`` blends the element-wise maximum of the models' tensors with their mean; ``mix`` (a fraction)
says how much of the maximum to take. Importing this module registers it.
"""

from __future__ import annotations

import torch
from pydantic import Field

from suture.merge.methods import Fraction, MergeInputs, MethodParams, merge_method


class ToyMaxParams(MethodParams):
    mix: Fraction = Field(1.0, description="share of the element-wise maximum (the rest is the mean)")


@merge_method(
    name="toy_max",
    papers="Test fixture, no paper (https://example.org/toy_max)",
    summary="Blend of the element-wise maximum and the mean of the models' tensors.",
    requires_base=False,
    models=(2, None),
    params=ToyMaxParams,
)
def toy_max(inputs: MergeInputs) -> torch.Tensor:
    """mix * max_i x_i + (1 - mix) * mean_i x_i, element-wise."""
    stacked = torch.stack([t.float() for t in inputs.tensors])
    mix = float(inputs.params["mix"])
    return mix * stacked.max(dim=0).values + (1 - mix) * stacked.mean(dim=0)
