"""Linear merge: a weighted average of the models' tensors.

Paper: Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing
inference time (Wortsman et al., ICML 2022) https://arxiv.org/abs/2203.05482
"""

from __future__ import annotations

import torch
from pydantic import Field

from suture.merge.errors import ParameterError
from suture.merge.methods._util import per_model, work_tensors
from suture.merge.methods.registry import Flag, MergeInputs, MethodParams, Number, merge_method


class LinearParams(MethodParams):
    normalize: Flag = Field(True, description="divide by the sum of the weights")


class LinearModelParams(MethodParams):
    weight: Number = Field(description="this model's coefficient")


@merge_method(
    name="linear",
    papers=(
        "Model soups: averaging weights of multiple fine-tuned models improves accuracy without "
        "increasing inference time (Wortsman et al., ICML 2022) https://arxiv.org/abs/2203.05482"
    ),
    summary="Weighted average of the models' weights (a model soup).",
    requires_base=False,
    params=LinearParams,
    model_params=LinearModelParams,
)
def linear(inputs: MergeInputs) -> torch.Tensor:
    """sum_i w_i x_i, divided by sum_i w_i when ``normalize`` is set."""
    tensors, _ = work_tensors(inputs)
    weights = [float(w) for w in per_model(inputs, "weight")]
    # Accumulate in place instead of stacking: peak memory is two tensors' worth, not 2 x n_models.
    res = tensors[0] * weights[0]
    for tensor, weight in zip(tensors[1:], weights[1:]):
        res.add_(tensor, alpha=weight)
    if inputs.params["normalize"]:
        total = sum(weights)
        if total == 0.0:
            raise ParameterError(
                f"tensor {inputs.name!r}: linear merge with normalize=true needs weights that do not sum to 0"
            )
        res.div_(total)
    return res

