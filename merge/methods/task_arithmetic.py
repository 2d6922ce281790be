"""Generalized task arithmetic: task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs,
breadcrumbs_ties, della and della_linear.

Each model contributes its task vector delta_i = x_i - base. A method (1) optionally sparsifies every
delta (magnitude / random / outlier-trimmed / magnitude-ranked random), (2) weights them, (3) optionally
keeps, per entry, only deltas that agree with the elected sign (TIES), (4) sums, optionally divides by the
sum of the weights that took part (``normalize``), scales by ``lambda`` and adds the base back.

Papers:
- Editing Models with Task Arithmetic (Ilharco et al., ICLR 2023) https://arxiv.org/abs/2212.04089
- TIES-Merging: Resolving Interference When Merging Models (Yadav et al., NeurIPS 2023) https://arxiv.org/abs/2306.01708
- Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch (Yu et al.,
  ICML 2024) https://arxiv.org/abs/2311.03099
- Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks (Davari & Belilovsky, ECCV 2024)
  https://arxiv.org/abs/2312.06795
- DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling (Deep et al.,
  arXiv 2024) https://arxiv.org/abs/2406.11617
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, create_model, model_validator

from suture.merge.methods import sparsify
from suture.merge.methods._util import broadcast_weights, work_tensors
from suture.merge.methods.registry import (
    Flag,
    Fraction,
    MergeInputs,
    MethodParams,
    NonNegative,
    Number,
    merge_method,
)

Consensus = Literal["sum", "count"]
Sparsifier = Literal["magnitude", "random", "magnitude_outliers", "della_magprune"]


def sign_consensus_mask(deltas: torch.Tensor, method: Consensus = "sum") -> torch.Tensor:
    """Boolean mask (same shape as ``deltas``, models on dim 0) of entries whose sign matches the elected sign.

    ``sum``: the elected sign is that of the summed deltas (TIES' mass-weighted election);
    ``count``: the sign held by more models. Ties elect +. Zero entries never match.
    """
    sign = deltas.sign()
    if method == "sum":
        elected = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(sign.dtype)
    elif method == "count":
        elected = torch.where(sign.sum(dim=0) >= 0, 1.0, -1.0).to(sign.dtype)
    else:
        raise ValueError(f"unknown sign consensus method {method!r} (expected 'sum' or 'count')")
    return sign == elected


def _sparsify_delta(
    inputs: MergeInputs, i: int, delta: torch.Tensor, method: Sparsifier, rescale: bool
) -> torch.Tensor:
    """Sparsify model i's task vector with its own density / gamma / epsilon (checked by the registry)."""
    mp = inputs.model_params[i]
    density = float(mp["density"])
    if method == "magnitude":
        return sparsify.magnitude(delta, density, rescale=rescale)
    if method == "random":
        return sparsify.random(delta, density, rescale=rescale, generator=inputs.generator)
    if method == "magnitude_outliers":
        return sparsify.magnitude_outliers(delta, density, gamma=float(mp["gamma"]), rescale=rescale)
    return sparsify.della_magprune(delta, density, float(mp["epsilon"]), rescale=rescale, generator=inputs.generator)


def generalized_task_arithmetic(
    inputs: MergeInputs, consensus: Consensus | None, sparsification: Sparsifier | None
) -> torch.Tensor:
    """Sparsify, weight, elect signs, sum, normalize and scale the task vectors; add the base back.

    Computed in the inputs' dtype (the recipe's ``dtype``), step for step as mergekit 0.1.5 does.
    """
    tensors, base = work_tensors(inputs, native=True)
    assert base is not None  # run_method enforces requires_base
    rescale = bool(inputs.params["rescale"])
    deltas = []
    for i, x in enumerate(tensors):
        delta = x - base
        if sparsification is not None:
            delta = _sparsify_delta(inputs, i, delta, sparsification, rescale)
        deltas.append(delta)
    stacked = torch.stack(deltas, dim=0)
    del deltas  # the stack is the only copy from here on; in-place steps keep peak memory near two stacks
    weights = broadcast_weights([mp["weight"] for mp in inputs.model_params], stacked)
    weighted = stacked.mul_(weights)

    if consensus is not None:
        mask = sign_consensus_mask(weighted, consensus).to(weighted.dtype)
        mixed = weighted.mul_(mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor = divisor.masked_fill_(divisor == 0, 1.0)
    else:
        mixed = weighted.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor = divisor.masked_fill_(divisor.abs() < 1e-8, 1.0)

    if inputs.params["normalize"]:
        mixed = mixed.div_(divisor)
    lam = float(inputs.params["lambda"])
    if lam != 1:
        mixed = mixed.mul_(lam)
    return mixed.add_(base)


class TaskVectorWeight(MethodParams):
    """Per-model parameters of every member of the family."""

    weight: Number = Field(description="coefficient of this model's task vector")
    density: Fraction = Field(1.0, description="fraction of task-vector entries kept (1 keeps all)")


class BreadcrumbsModelParams(TaskVectorWeight):
    gamma: NonNegative = Field(0.01, description="fraction of largest-magnitude entries removed as outliers")


class DellaModelParams(TaskVectorWeight):
    epsilon: NonNegative = Field(
        0.15, description="keep probability spans density - epsilon .. density + epsilon by rank"
    )

    @model_validator(mode="after")
    def _keep_probabilities_inside(self) -> "DellaModelParams":
        """Keep probabilities density +/- epsilon must stay inside (0, 1) when anything is dropped."""
        d, e = self.density, self.epsilon
        if 0 < d < 1 and (d + e >= 1 or d - e <= 0):
            raise ValueError(f"epsilon must keep density +/- epsilon inside (0, 1); got density={d}, epsilon={e}")
        return self


_MODEL_PARAMS = {"magnitude_outliers": BreadcrumbsModelParams, "della_magprune": DellaModelParams}


def _make(
    name: str,
    consensus: Consensus | None,
    sparsification: Sparsifier | None,
    default_normalize: bool,
    default_rescale: bool,
    paper: str,
    summary: str,
) -> None:
    """Register one member of the generalized task arithmetic family (its defaults differ by member)."""
    params = create_model(
        f"{name.title().replace('_', '')}Params",
        __base__=MethodParams,
        int8_mask=(Flag, Field(False, description="accepted for mergekit compatibility; has no effect on results")),
        normalize=(Flag, Field(default_normalize, description="divide by the sum of the weights that took part")),
        rescale=(Flag, Field(
            default_rescale,
            description="after sparsifying, rescale kept entries to preserve each task vector's L1 norm",
        )),
        **{"lambda": (Number, Field(1.0, description="scale of the merged task vector"))},
    )

    def fn(inputs: MergeInputs) -> torch.Tensor:
        return generalized_task_arithmetic(inputs, consensus, sparsification)

    fn.__name__ = fn.__qualname__ = f"{name}_merge"
    fn.__doc__ = f"{summary} (generalized task arithmetic)"
    merge_method(
        name=name,
        papers=paper,
        summary=summary,
        requires_base=True,
        params=params,
        model_params=_MODEL_PARAMS.get(sparsification or "", TaskVectorWeight),
        randomized=sparsification in ("random", "della_magprune"),
    )(fn)


_TA = "Editing Models with Task Arithmetic (Ilharco et al., ICLR 2023) https://arxiv.org/abs/2212.04089"
_TIES = (
    "TIES-Merging: Resolving Interference When Merging Models (Yadav et al., NeurIPS 2023) "
    "https://arxiv.org/abs/2306.01708"
)
_DARE = (
    "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch "
    "(Yu et al., ICML 2024) https://arxiv.org/abs/2311.03099"
)
_BREADCRUMBS = (
    "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks (Davari & Belilovsky, ECCV 2024) "
    "https://arxiv.org/abs/2312.06795"
)
_DELLA = (
    "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling "
    "(Deep et al., arXiv 2024) https://arxiv.org/abs/2406.11617"
)

_make(
    "task_arithmetic", None, None, False, False, _TA, "Add the weighted task vectors (model - base) to the base."
)
_make(
    "ties",
    "sum",
    "magnitude",
    True,
    False,
    _TIES,
    "Trim task vectors to their largest entries, elect a sign per entry, average the agreeing ones.",
)
_make(
    "dare_ties",
    "sum",
    "random",
    False,
    True,
    _DARE,
    "Randomly drop task-vector entries and rescale (DARE), then TIES sign election.",
)
_make(
    "dare_linear",
    None,
    "random",
    False,
    True,
    _DARE,
    "Randomly drop task-vector entries and rescale (DARE), then add them up.",
)
_make(
    "breadcrumbs",
    None,
    "magnitude_outliers",
    False,
    False,
    _BREADCRUMBS,
    "Drop both the largest (outlier) and the smallest task-vector entries, then add them up.",
)
_make(
    "breadcrumbs_ties",
    "sum",
    "magnitude_outliers",
    False,
    False,
    _BREADCRUMBS,
    "Model Breadcrumbs masking followed by TIES sign election.",
)
_make(
    "della",
    "sum",
    "della_magprune",
    True,
    True,
    _DELLA,
    "Drop task-vector entries at random with magnitude-ranked keep probabilities, then TIES sign election.",
)
_make(
    "della_linear",
    None,
    "della_magprune",
    False,
    True,
    _DELLA,
    "Drop task-vector entries at random with magnitude-ranked keep probabilities, then add them up.",
)
