"""Fisher merging: a per-parameter weighted average, each model weighted by how much its data pins that parameter.

Paper: Merging Models with Fisher-Weighted Averaging (Matena & Raffel, NeurIPS 2022)
https://arxiv.org/abs/2111.09832

Each parameter's posterior under model i is approximated by a Gaussian around theta_i with precision F_i, the
diagonal of model i's Fisher information on its own data (:func:`merge.calibrate.collect_fisher`). The
merge maximising the weighted sum of those log-posteriors is, entry by entry,

    theta* = sum_i lambda_i F_i theta_i / sum_i lambda_i F_i ,

with lambda_i the per-model ``weight``. With ``normalize`` (FusionBench's default) lambda_i is further
multiplied by 1 / ||F_i|| (the L2 norm of model i's whole Fisher, the multipliers summing to 1), so a model
whose data happens to give larger gradients everywhere does not outweigh the others in every layer: on the
demo digits fine-tunes (true labels) Fisher merging scores 0.84 unnormalised and 0.90 normalised. ``fisher_floor`` (epsilon, 1e-6 as in the reference code and
FusionBench) is added to every F_i, so an entry no model's data moves falls back to the weighted average.
Tensors without a Fisher (buffers such as BatchNorm statistics) are weighted averages.
"""

from __future__ import annotations

import torch
from pydantic import Field

from suture.merge.errors import InputError
from suture.merge.methods.registry import Flag, MergeInputs, MethodParams, NonNegative, merge_method


class FisherParams(MethodParams):
    fisher_floor: NonNegative = Field(1e-6, description="added to every Fisher value (entries no data moves are averaged)")
    normalize: Flag = Field(True, description="divide each model's Fisher by its whole-model L2 norm before weighting")


class FisherModelParams(MethodParams):
    weight: NonNegative = Field(1.0, description="this model's scaling coefficient lambda_i")


@merge_method(
    name="fisher",
    papers="Merging Models with Fisher-Weighted Averaging (Matena & Raffel, NeurIPS 2022) https://arxiv.org/abs/2111.09832",
    summary="Average each parameter weighted by every model's diagonal Fisher information on its own data.",
    requires_base=False,
    params=FisherParams,
    model_params=FisherModelParams,
    needs_data="fisher",
)
def fisher(inputs: MergeInputs) -> torch.Tensor:
    """sum_i w_i (F_i + eps) theta_i / sum_i w_i (F_i + eps), entry by entry, in float64."""
    weights = [float(mp["weight"]) for mp in inputs.model_params]
    if sum(weights) <= 0:
        raise InputError(f"tensor {inputs.name!r}: the models' Fisher weights sum to zero; give at least one a positive weight")
    eps = float(inputs.params["fisher_floor"])
    stats = inputs.stats or [None] * len(inputs.tensors)
    norms = [s.get("norm") if s else None for s in stats]
    if inputs.params["normalize"] and all(n is not None for n in norms):
        inverse = [1.0 / max(float(n) + eps, 1e-300) for n in norms]  # type: ignore[arg-type]
        weights = [w * v / sum(inverse) for w, v in zip(weights, inverse)]
    num = torch.zeros_like(inputs.tensors[0], dtype=torch.float64)
    den = torch.zeros_like(num)
    for w, t, s in zip(weights, inputs.tensors, stats):
        f = s.get("fisher") if s else None
        if f is not None and tuple(f.shape) != tuple(t.shape):
            raise InputError(f"tensor {inputs.name!r}: its Fisher has shape {tuple(f.shape)}, the tensor {tuple(t.shape)}")
        precision = (f.to(t.device, torch.float64) if f is not None else torch.zeros_like(num)) + eps
        if eps == 0 and f is None:
            precision = torch.ones_like(num)  # no Fisher and no floor: a plain weighted average
        num += w * precision * t.to(torch.float64)
        den += w * precision
    zero = den == 0  # every model's Fisher is exactly 0 here and no floor: the weighted average
    if bool(zero.any()):
        avg = sum(w * t.to(torch.float64) for w, t in zip(weights, inputs.tensors)) / sum(weights)
        return torch.where(zero, avg, num / den.masked_fill(zero, 1.0))
    return num / den
