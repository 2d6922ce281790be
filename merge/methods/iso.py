"""Iso-C and Iso-CTS: isotropic merging in the common (and task-specific) subspaces of the task vectors.

Paper: No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces
(Marczak et al., ICML 2025) https://arxiv.org/abs/2502.04959

Iso-C, per 2-D weight matrix: sum the task vectors, Delta = U diag(s) V^T, and replace the spectrum by its
mean, Delta_iso = mean(s) U V^T, so that no few dominant directions (usually the tasks with the largest
updates) drown the others; merged = base + alpha * Delta_iso. The mean runs over the sum's nonzero singular
values (numerical rank): for a full-rank sum, the usual case, this is the paper's formula, and for a
rank-deficient one it keeps the output inside the sum's row and column spaces instead of adding arbitrary
null-space directions; either way the nuclear norm of the sum is kept.

Iso-CTS: the top k singular directions of the sum form the common subspace (k = common_fraction * r,
adjusted so that the remaining r - k split evenly between the T tasks); each task's residual outside it,
tau_t - U_k U_k^T tau_t, contributes its top (r - k) / T directions; the collected left and right vectors are
orthogonalised (orthogonal Procrustes) and given one shared singular value, the mean of all the collected
ones. The paper's code uses common_fraction 0.8.

alpha is tuned on validation data in the paper (it grows with the number of tasks); the default 1.3 is its
value for 8 tasks on CLIP ViT-B/32. Tune it on held-out data for other models and task counts.
"""

from __future__ import annotations

import torch
from pydantic import Field

from suture.merge.methods._subspace import TaskVectorWeight, orthogonalize, subspace_merge
from suture.merge.methods.registry import Fraction, MergeInputs, MethodParams, Number, merge_method

_PAPER = (
    "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces "
    "(Marczak et al., ICML 2025) https://arxiv.org/abs/2502.04959"
)
_ALPHA_HELP = "scale of the merged task vector (tune on validation; 1.3 is the paper's value for 8 ViT-B/32 tasks)"


class IsoCParams(MethodParams):
    alpha: Number = Field(1.3, description=_ALPHA_HELP)


class IsoCtsParams(IsoCParams):
    common_fraction: Fraction = Field(
        0.8, description="share of the rank given to the common subspace (the rest is split between tasks)"
    )


def isotropic(delta: torch.Tensor) -> torch.Tensor:
    """mean(s) U V^T over the nonzero singular values s of ``delta`` (its isotropic version)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    if s.numel() == 0 or s[0] == 0:
        return torch.zeros_like(delta)
    keep = s > s[0] * max(delta.shape) * torch.finfo(s.dtype).eps
    return s[keep].mean() * (u[:, keep] @ vh[keep, :])


def iso_cts_matrix(taus: list[torch.Tensor], common_fraction: float) -> torch.Tensor:
    """Iso-CTS's merged task matrix for one layer (see the module docstring)."""
    n_tasks, r = len(taus), min(taus[0].shape)
    specific = round((r - int(r * common_fraction)) / n_tasks) * n_tasks
    if specific > r:  # rounding up past the rank: give the tasks one direction less each
        specific -= n_tasks
    common, per_task = r - specific, specific // n_tasks
    u, s, vh = torch.linalg.svd(torch.stack(taus).sum(dim=0), full_matrices=False)
    us, ss, vhs = [u[:, :common]], [s[:common]], [vh[:common, :]]
    if per_task:
        u_common = u[:, :common]
        for tau in taus:
            ut, st, vht = torch.linalg.svd(tau - u_common @ (u_common.T @ tau), full_matrices=False)
            us.append(ut[:, :per_task])
            ss.append(st[:per_task])
            vhs.append(vht[:per_task, :])
    u_all = orthogonalize(torch.cat(us, dim=1))
    v_all = orthogonalize(torch.cat(vhs, dim=0).T)
    return torch.cat(ss).mean() * (u_all @ v_all.T)


@merge_method(
    name="iso_c",
    papers=_PAPER,
    summary="Sum the task vectors per layer and flatten their singular spectrum to its mean (isotropic).",
    requires_base=True,
    params=IsoCParams,
    model_params=TaskVectorWeight,
)
def iso_c(inputs: MergeInputs) -> torch.Tensor:
    """base + alpha * isotropic(sum of task vectors) per 2-D matrix; task arithmetic for other tensors."""
    return subspace_merge(inputs, lambda taus: isotropic(torch.stack(taus).sum(dim=0)))


@merge_method(
    name="iso_cts",
    papers=_PAPER,
    summary="Iso-C in the sum's top subspace plus each task's own top directions outside it.",
    requires_base=True,
    params=IsoCtsParams,
    model_params=TaskVectorWeight,
)
def iso_cts(inputs: MergeInputs) -> torch.Tensor:
    """base + alpha * Iso-CTS(task vectors) per 2-D matrix; task arithmetic for other tensors."""
    fraction = float(inputs.params["common_fraction"])
    return subspace_merge(inputs, lambda taus: iso_cts_matrix(taus, fraction))
