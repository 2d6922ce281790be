"""Passthrough: copy one model's tensor unchanged, optionally scaled (used to stack layer slices).

Reference: Arcee's MergeKit: A Toolkit for Merging Large Language Models (Goddard et al., EMNLP Industry
2024) https://arxiv.org/abs/2403.13257
"""

from __future__ import annotations

import torch

from suture.merge.methods.registry import MergeInputs, MergeMethod, ParamDef, register


def _passthrough(inputs: MergeInputs) -> torch.Tensor:
    """The single input tensor, times its ``scale`` when one is set."""
    (tensor,) = inputs.tensors
    scale = inputs.model_params[0].get("scale")
    if scale is None:
        return tensor.clone()
    return tensor * float(scale)  # in the tensor's own dtype, as mergekit does


PASSTHROUGH = register(
    MergeMethod(
        name="passthrough",
        fn=_passthrough,
        global_params=(),
        model_params=(ParamDef("scale", None, help="optional factor applied to the tensor"),),
        uses_base=False,
        requires_base=False,
        randomized=False,
        paper=(
            "Arcee's MergeKit: A Toolkit for Merging Large Language Models (Goddard et al., EMNLP Industry "
            "2024) https://arxiv.org/abs/2403.13257"
        ),
        summary="Copy one model's tensor as is (optionally scaled); used for layer stacking.",
        min_models=1,
        max_models=1,
    )
)
