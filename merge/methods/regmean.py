"""RegMean and RegMean++: merge each linear layer so that it best reproduces every model's outputs on its own data.

Papers:
- Dataless Knowledge Fusion by Merging Weights of Language Models (Jin et al., ICLR 2023)
  https://arxiv.org/abs/2212.09849
- RegMean++: Enhancing Effectiveness and Generalization of Regression Mean for Model Merging (Nguyen et al.,
  2025) https://arxiv.org/abs/2508.03121

For a Linear layer y = W x (torch stores W as (out, in)), model i's inputs X_i (rows = input vectors) and
G_i = X_i^T X_i / n_i (the mean Gram matrix, as FusionBench keeps it, so each model weighs the same whatever
its number of tokens), RegMean minimises sum_i ||X_i W^T - X_i W_i^T||^2 / n_i, whose solution is

    W^T = (sum_i G_i)^-1 sum_i G_i W_i^T ,

the least-squares fit over the models' inputs stacked together. Off-diagonal entries of every G_i are
multiplied by ``reduce_non_diagonal_ratio`` (alpha; FusionBench's CLIP setting 0.6): alpha = 1 is the exact
regression, alpha = 0 a per-input-feature weighted average; shrinking towards the diagonal keeps the solve
well conditioned and the result closer to the models. Input directions that no model's data reaches (a
pixel that is always blank) leave sum_i G_i singular; there the merged weight keeps the plain average, the
minimum-change solution W_avg + pinv(A) (B - A W_avg). Biases and every tensor that is not a Linear weight
(embeddings, norms, convolutions) are averaged, as in the paper's code and FusionBench.

RegMean++ uses the same solve, but measures each layer's inputs under the merged model: block by block,
model i's data passes through the already merged embeddings and blocks < l and then through model i's own
block l (:func:`merge.calibrate.sequential_gram`, as in FusionBench's ``RegMeanAlgorithmPlusPlus``).
"""

from __future__ import annotations

import logging

import torch
from pydantic import Field

from suture.merge.methods.registry import Fraction, MergeInputs, MethodParams, merge_method

logger = logging.getLogger(__name__)


class RegMeanParams(MethodParams):
    reduce_non_diagonal_ratio: Fraction = Field(
        0.6, description="scale of the Gram matrices' off-diagonal entries (1: exact regression; 0: diagonal only)"
    )


def reduce_non_diagonal(gram: torch.Tensor, ratio: float) -> torch.Tensor:
    """The Gram matrix with its off-diagonal entries multiplied by ``ratio`` (the diagonal unchanged)."""
    if ratio == 1:
        return gram
    diag = torch.diag(torch.diagonal(gram))
    return ratio * gram + (1 - ratio) * diag


def regmean_linear(weights: list[torch.Tensor], grams: list[torch.Tensor], ratio: float = 1.0) -> torch.Tensor:
    """The RegMean weight (out, in) of one Linear layer from each model's weight (out, in) and input Gram (in, in), in float64."""
    w = [x.to(torch.float64) for x in weights]
    g = [reduce_non_diagonal(x.to(torch.float64), ratio) for x in grams]
    a = sum(g)
    a = (a + a.T) / 2
    b = sum(gi @ wi.T for gi, wi in zip(g, w))  # (in, out)
    avg = torch.stack(w).mean(dim=0).T
    evals, evecs = torch.linalg.eigh(a)
    floor = evals.abs().max() * a.shape[0] * torch.finfo(a.dtype).eps
    inv = torch.where(evals > floor, 1 / evals.clamp(min=torch.finfo(a.dtype).tiny), 0.0)
    merged = avg + (evecs * inv) @ (evecs.T @ (b - a @ avg))
    return merged.T


def _average(inputs: MergeInputs) -> torch.Tensor:
    return torch.stack([t.to(torch.float64) for t in inputs.tensors]).mean(dim=0)


def _regmean(inputs: MergeInputs) -> torch.Tensor:
    stats = inputs.stats or [None] * len(inputs.tensors)
    grams = [s.get("gram") if s else None for s in stats]
    first = inputs.tensors[0]
    if first.dim() != 2 or any(g is None or tuple(g.shape) != (first.shape[1],) * 2 for g in grams):
        if first.dim() == 2 and any(g is not None for g in grams):
            logger.warning("tensor %r: some models have no input statistics for it; it is averaged", inputs.name)
        return _average(inputs)
    ratio = float(inputs.params["reduce_non_diagonal_ratio"])
    return regmean_linear(inputs.tensors, [g.to(first.device) for g in grams], ratio)  # type: ignore[union-attr]


_REGMEAN = (
    "Dataless Knowledge Fusion by Merging Weights of Language Models (Jin et al., ICLR 2023) "
    "https://arxiv.org/abs/2212.09849"
)
_REGMEAN_PP = (
    "RegMean++: Enhancing Effectiveness and Generalization of Regression Mean for Model Merging "
    "(Nguyen et al., 2025) https://arxiv.org/abs/2508.03121"
)


@merge_method(
    name="regmean",
    papers=_REGMEAN,
    summary="Solve each linear layer for the weights that best reproduce every model's outputs on its own data.",
    requires_base=False,
    params=RegMeanParams,
    needs_data="gram",
)
def regmean(inputs: MergeInputs) -> torch.Tensor:
    """(sum G_i)^-1 sum G_i W_i per Linear weight from each model's input Gram matrix; other tensors averaged."""
    return _regmean(inputs)


@merge_method(
    name="regmean_plusplus",
    papers=(_REGMEAN, _REGMEAN_PP),
    summary="RegMean with each layer's inputs measured under the merged earlier layers, block by block.",
    requires_base=False,
    params=RegMeanParams,
    needs_data="gram",
    sequential=True,
)
def regmean_plusplus(inputs: MergeInputs) -> torch.Tensor:
    """RegMean's solve on Gram matrices measured under the merged model's earlier blocks."""
    return _regmean(inputs)
