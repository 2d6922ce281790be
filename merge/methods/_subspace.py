"""Shared steps of the data-free subspace merges (TSV-M, Iso-C / Iso-CTS, WUDI).

Each of them works on task vectors tau_k = w_k (theta_k - theta_base) of one 2-D weight matrix; every other
tensor (biases, norms, scalars) is merged by task arithmetic with the method's scale, as the papers' own
code leaves non-matrix parameters to a plain combination.
"""

from __future__ import annotations

from typing import Callable

import torch
from pydantic import Field

from suture.merge.methods._util import work_tensors
from suture.merge.methods.registry import MergeInputs, MethodParams, Number


class TaskVectorWeight(MethodParams):
    """Per-model parameter of the subspace merges: a coefficient on that model's task vector."""

    weight: Number = Field(1.0, description="coefficient of this model's task vector before merging")


def orthogonalize(m: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (orthogonal Procrustes): P Q^T from m = P S Q^T."""
    p, _, qh = torch.linalg.svd(m, full_matrices=False)
    return p @ qh


def subspace_merge(inputs: MergeInputs, merge_matrix: Callable[[list[torch.Tensor]], torch.Tensor]) -> torch.Tensor:
    """base + alpha * merge_matrix(task vectors) for a 2-D tensor, base + alpha * sum(task vectors) otherwise.

    Computed in float32 (float64 when an input is float64): SVDs in bfloat16 are not available or accurate.
    """
    tensors, base = work_tensors(inputs)
    assert base is not None  # run_method enforces requires_base
    taus = [float(mp["weight"]) * (t - base) for t, mp in zip(tensors, inputs.model_params)]
    alpha = float(inputs.params["alpha"])
    merged = merge_matrix(taus) if base.dim() == 2 else torch.stack(taus).sum(dim=0)
    return base + alpha * merged
