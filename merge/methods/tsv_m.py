"""TSV-M: merge each layer's task vectors through their top singular vectors, decorrelated across tasks.

Paper: Task Singular Vectors: Reducing Task Interference in Model Merging (Gargiulo et al., CVPR 2025)
https://arxiv.org/abs/2412.00081

Per 2-D weight matrix with T task vectors and r = min(rows, cols): keep each task's top
k = floor(r * rank_fraction / T) singular triplets (at least one), concatenate the kept left vectors
U = [U_1 .. U_T] and right vectors V = [V_1 .. V_T], replace each by its nearest orthonormal matrix
(orthogonal Procrustes, U_perp = P Q^T from U = P S Q^T; this removes the overlap between tasks' subspaces,
the paper's measure of interference), and rebuild U_perp diag(sigma_1 .. sigma_T) V_perp^T with the kept
singular values. The merged model is base + alpha * that. With task subspaces that are already mutually
orthogonal the decorrelation changes nothing and TSV-M returns the sum of the (truncated) task vectors.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from suture.merge.methods._subspace import TaskVectorWeight, orthogonalize, subspace_merge
from suture.merge.methods.registry import MergeInputs, MethodParams, Number, merge_method

#: a share of the rank in (0, 1]: every task keeps at least one direction
RankFraction = Annotated[Number, Field(gt=0, le=1)]


class TsvParams(MethodParams):
    alpha: Number = Field(1.0, description="scale of the merged task vector (the paper uses 1.0)")
    rank_fraction: RankFraction = Field(
        1.0, description="share of each matrix's rank split between the tasks (each keeps fraction/T)"
    )


def tsv_matrix(taus: list[torch.Tensor], rank_fraction: float = 1.0) -> torch.Tensor:
    """TSV-M's merged task matrix for one layer (see the module docstring)."""
    r = min(taus[0].shape)
    k = max(1, min(r, int(r * rank_fraction / len(taus))))
    us, ss, vhs = [], [], []
    for tau in taus:
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k, :])
    u_perp = orthogonalize(torch.cat(us, dim=1))
    v_perp = orthogonalize(torch.cat(vhs, dim=0).T)
    return (u_perp * torch.cat(ss)) @ v_perp.T


@merge_method(
    name="tsv_m",
    papers=(
        "Task Singular Vectors: Reducing Task Interference in Model Merging (Gargiulo et al., CVPR 2025) "
        "https://arxiv.org/abs/2412.00081"
    ),
    summary="Keep each task's top singular vectors per layer, decorrelate them across tasks, and sum.",
    requires_base=True,
    params=TsvParams,
    model_params=TaskVectorWeight,
)
def tsv_m(inputs: MergeInputs) -> torch.Tensor:
    """base + alpha * TSV-M(task vectors) per 2-D matrix; task arithmetic for other tensors."""
    fraction = float(inputs.params["rank_fraction"])
    return subspace_merge(inputs, lambda taus: tsv_matrix(taus, fraction))
