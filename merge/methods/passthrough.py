"""Passthrough: copy one model's tensor unchanged, optionally scaled (used to stack layer slices).

Reference: Arcee's MergeKit: A Toolkit for Merging Large Language Models (Goddard et al., EMNLP Industry
2024) https://arxiv.org/abs/2403.13257
"""

from __future__ import annotations

import torch

from pydantic import Field

from suture.merge.methods.registry import MergeInputs, MethodParams, Number, merge_method


class PassthroughModelParams(MethodParams):
    scale: Number | None = Field(None, description="optional factor applied to the tensor")


@merge_method(
    name="passthrough",
    papers=(
        "Arcee's MergeKit: A Toolkit for Merging Large Language Models (Goddard et al., EMNLP Industry "
        "2024) https://arxiv.org/abs/2403.13257"
    ),
    summary="Copy one model's tensor as is (optionally scaled); used for layer stacking.",
    requires_base=False,
    models=(1, 1),
    model_params=PassthroughModelParams,
)
def passthrough(inputs: MergeInputs) -> torch.Tensor:
    """The single input tensor, times its ``scale`` when one is set."""
    (tensor,) = inputs.tensors
    scale = inputs.model_params[0].get("scale")
    if scale is None:
        return tensor.clone()
    return tensor * float(scale)  # in the tensor's own dtype, as mergekit does

