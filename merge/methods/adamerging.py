"""AdaMerging and aTLAS as recipe merge methods: task arithmetic with weights learned from the models' data.

Papers:
- AdaMerging: Adaptive Model Merging for Multi-Task Learning (Yang et al., ICLR 2024)
  https://arxiv.org/abs/2310.02575
- Knowledge Composition using Task Vectors with Learned Anisotropic Scaling (Zhang et al., NeurIPS 2024)
  https://arxiv.org/abs/2407.02880

Both methods declare ``needs_data="coefficients"``: before the per-tensor merge, the recipe runner learns
one coefficient per (model, group) on every model's own data at once (:mod:`suture.merge.coefficients`,
run by :mod:`suture.recipes.coefficient_stage`) and hands each tensor's coefficients to the kernel in
``MergeInputs.stats`` as ``{"coefficient": w}``. The kernel is then exactly ``task_arithmetic`` with those
weights (lambda 1, no normalisation), so the exported recipe reproduces the output bit for bit.

- ``adamerging``: entropy of the predictions on unlabelled inputs (labels are ignored), λ initialised at
  ``init`` (0.3) and clamped to [0, 1], Adam. ``layerwise: true`` learns one coefficient per parameter tensor
  and model (what the paper's code and FusionBench call layer-wise), ``false`` one per model (task-wise).
- ``atlas``: one coefficient per parameter tensor (block) and model, initialised at 0, AdamW with weight
  decay, gradient norm clipped to 1, cosine decay; cross-entropy when every model's data has labels (and
  ``data.labels`` is not ``sampled``), else entropy (the paper's unsupervised variant).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Annotated, Any

import torch
from pydantic import Field, Strict

from suture.merge.coefficients import ADAMERGING, ATLAS, LearnSettings
from suture.merge.methods.registry import (
    Flag,
    Fraction,
    MergeInputs,
    MethodParams,
    NonNegative,
    Number,
    Positive,
    merge_method,
)
from suture.merge.methods.task_arithmetic import generalized_task_arithmetic

#: a whole number of optimisation steps
Steps = Annotated[int, Strict(), Field(ge=0)]

_ADAMERGING = ("AdaMerging: Adaptive Model Merging for Multi-Task Learning (Yang et al., ICLR 2024) "
               "https://arxiv.org/abs/2310.02575")
_ATLAS = ("Knowledge Composition using Task Vectors with Learned Anisotropic Scaling (Zhang et al., NeurIPS 2024) "
          "https://arxiv.org/abs/2407.02880")


class AdaMergingParams(MethodParams):
    layerwise: Flag = Field(True, description="one coefficient per parameter tensor and model (false: one per model)")
    steps: Steps = Field(500, description="optimisation steps, each on one batch of every model's data")
    lr: Positive = Field(1e-3, description="Adam learning rate")
    init: Fraction = Field(0.3, description="initial coefficient; coefficients stay clamped to [0, 1]")


class AtlasParams(MethodParams):
    steps: Steps = Field(200, description="optimisation steps, each on one batch of every model's data")
    lr: Positive = Field(0.1, description="AdamW learning rate (cosine decay to 0)")
    init: Number = Field(0.0, description="initial coefficient")
    weight_decay: NonNegative = Field(0.1, description="AdamW weight decay on the coefficients")


def coefficient_setup(method: str, params: Mapping[str, Any], labelled: bool) -> tuple[LearnSettings, str]:
    """The learning settings and coefficient granularity of ``method`` for resolved recipe ``params``.

    ``labelled``: every model's data has labels that may be used (aTLAS then trains with cross-entropy).
    """
    if method == "adamerging":
        settings = ADAMERGING.with_(steps=params["steps"], lr=params["lr"], init=params["init"])
        return settings, "tensor" if params["layerwise"] else "task"
    if method == "atlas":
        settings = ATLAS.with_(steps=params["steps"], lr=params["lr"], init=params["init"],
                               weight_decay=params["weight_decay"], objective="cross_entropy" if labelled else "entropy")
        return settings, "tensor"
    raise ValueError(f"merge method {method!r} does not learn coefficients")


def learned_task_arithmetic(inputs: MergeInputs) -> torch.Tensor:
    """``base + Σ_k w_k (x_k - base)`` with each model's learned coefficient (0 where none was learned)."""
    stats = inputs.stats or [None] * len(inputs.tensors)
    weights = [0.0 if s is None else float(s["coefficient"]) for s in stats]
    plain = replace(inputs, model_params=[{"weight": w, "density": 1.0} for w in weights],
                    params={"rescale": False, "normalize": False, "lambda": 1.0})
    return generalized_task_arithmetic(plain, None, None)


@merge_method(
    name="adamerging",
    papers=_ADAMERGING,
    summary="Task arithmetic whose per-model (or per-tensor) weights minimise prediction entropy on unlabelled data.",
    requires_base=True,
    params=AdaMergingParams,
    needs_data="coefficients",
)
def adamerging_merge(inputs: MergeInputs) -> torch.Tensor:
    """AdaMerging: task arithmetic with the learned coefficients."""
    return learned_task_arithmetic(inputs)


@merge_method(
    name="atlas",
    papers=_ATLAS,
    summary="Task arithmetic with one learned weight per parameter block and model, from a few labelled examples.",
    requires_base=True,
    params=AtlasParams,
    needs_data="coefficients",
)
def atlas_merge(inputs: MergeInputs) -> torch.Tensor:
    """aTLAS: task arithmetic with the learned anisotropic coefficients."""
    return learned_task_arithmetic(inputs)
