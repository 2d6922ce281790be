"""Spherical merges: SLERP, NuSLERP, Multi-SLERP and the Karcher mean.

Papers / references:
- SLERP: Animating rotation with quaternion curves (Shoemake, SIGGRAPH 1985) https://doi.org/10.1145/325165.325242
- NuSLERP: Arcee's MergeKit: A Toolkit for Merging Large Language Models (Goddard et al., EMNLP Industry 2024)
  https://arxiv.org/abs/2403.13257
- Multi-SLERP: barycentric interpolation on a hypersphere (Goddard, blog 2025)
  https://goddard.blog/posts/multislerp-wow-what-a-cool-idea
- Karcher mean: Riemannian center of mass and mollifier smoothing (Karcher, Comm. Pure Appl. Math. 1977)
  https://doi.org/10.1002/cpa.3160300502

All interpolate directions on a sphere and magnitudes linearly, which keeps the norm of the merged
tensor from shrinking the way a plain average of diverging vectors does.
"""

from __future__ import annotations

import logging

import torch
from pydantic import Field

from suture.merge.errors import InputError
from suture.merge.methods._util import per_model, work_tensors
from suture.merge.methods.registry import (
    Flag,
    MergeInputs,
    MethodParams,
    NonNegative,
    Number,
    merge_method,
)

logger = logging.getLogger(__name__)

#: |cos| above which two tensors count as colinear and SLERP falls back to linear interpolation
SLERP_DOT_THRESHOLD = 0.9995


def lerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Linear interpolation (1 - t) v0 + t v1."""
    return (1 - t) * v0 + t * v1


def slerp_tensors(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = SLERP_DOT_THRESHOLD, eps: float = 1e-8
) -> torch.Tensor:
    """Spherical interpolation of two whole tensors (treated as flat vectors), lerp when nearly colinear.

    Angle and coefficients are tensors of the inputs' dtype, computed as mergekit 0.1.5 computes them
    (sin((1 - t) theta) / sin theta, sin(t theta) / sin theta), so results agree to the last bit.
    """
    n0 = torch.linalg.vector_norm(v0)
    n1 = torch.linalg.vector_norm(v1)
    # a (near) zero vector has no direction; it is used as is, which gives cos = 0 below
    n0 = torch.where(n0 > eps, n0, 1)
    n1 = torch.where(n1 > eps, n1, 1)
    dot = ((v0 / n0) * (v1 / n1)).sum().clamp(-1, 1)
    if float(dot.abs()) > dot_threshold:
        return lerp(t, v0, v1)
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    return (torch.sin((1 - t) * theta) / sin_theta) * v0 + (torch.sin(t * theta) / sin_theta) * v1


class SlerpParams(MethodParams):
    t: Number = Field(description="0 gives the base model, 1 the other model")


@merge_method(
    name="slerp",
    papers="Animating rotation with quaternion curves (Shoemake, SIGGRAPH 1985) https://doi.org/10.1145/325165.325242",
    summary="Spherical interpolation between the base and one other model (lerp when nearly colinear).",
    requires_base=True,
    models=(1, 1),
    params=SlerpParams,
)
def _slerp(inputs: MergeInputs) -> torch.Tensor:
    """SLERP from the base (t = 0) to the other model (t = 1)."""
    (other,), base = work_tensors(inputs)
    return slerp_tensors(float(inputs.params["t"]), base, other)


def nuslerp_tensors(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, eps: float = 1e-8, flatten: bool = False
) -> torch.Tensor:
    """SLERP of whole tensors (``flatten``) or of the vectors along ``dim``; lerp where sin(theta) < eps."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    n0 = torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    n1 = torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = ((v0 / n0) * (v1 / n1)).sum(dim=-1, keepdim=True)
    theta = torch.acos(cos.clamp(-1, 1))
    sin = torch.sin(theta)
    colinear = sin.abs() < eps
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.where(colinear, 1.0, sin)
    res = torch.where(colinear, lerp(t, v0, v1), spherical)
    if dim != -1 and not flatten:
        res = res.transpose(dim, -1)
    return res.reshape(shape)


class NuslerpParams(MethodParams):
    nuslerp_row_wise: Flag = Field(
        False, description="interpolate the vectors along axis 0 separately instead of along the last axis"
    )
    nuslerp_flatten: Flag = Field(True, description="treat the whole tensor as one vector")


class RelativeWeight(MethodParams):
    weight: Number = Field(description="relative weight; t = w_1 / (w_0 + w_1)")


@merge_method(
    name="nuslerp",
    papers=(
        "Arcee's MergeKit: A Toolkit for Merging Large Language Models (Goddard et al., EMNLP Industry "
        "2024) https://arxiv.org/abs/2403.13257"
    ),
    summary="SLERP of two models with relative weights, row-wise or whole-tensor, optionally on task vectors.",
    requires_base=False,
    uses_base=True,
    models=(2, 2),
    params=NuslerpParams,
    model_params=RelativeWeight,
)
def _nuslerp(inputs: MergeInputs) -> torch.Tensor:
    """NuSLERP of two models with t = w_1 / (w_0 + w_1), on task vectors when a base is given."""
    (a, b), base = work_tensors(inputs, native=True)  # mergekit computes in the recipe dtype
    w0, w1 = (float(w) for w in per_model(inputs, "weight"))
    # an arbitrary but sane choice for weights that cancel out
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    dim = 0 if inputs.params["nuslerp_row_wise"] else -1
    flatten = bool(inputs.params["nuslerp_flatten"])
    if base is not None:
        return base + nuslerp_tensors(t, a - base, b - base, dim=dim, flatten=flatten)
    return nuslerp_tensors(t, a, b, dim=dim, flatten=flatten)


def multislerp_tensors(
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
    name: str = "?",
) -> torch.Tensor:
    """Weighted barycentre of the tensors' directions on the unit sphere, scaled by their weighted norm."""
    if len(tensors) == 1:
        return tensors[0]
    stacked = torch.stack(tensors, dim=0)
    if base is not None:
        stacked = stacked - base
    flat = stacked.reshape(stacked.shape[0], -1)
    w = torch.tensor([float(x) for x in weights], dtype=flat.dtype, device=flat.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if not bool(norms.any()):
            # every model equals the base here (e.g. a frozen embedding table: all task vectors are zero). mergekit
            # 0.1.5 returns the base for two models (its linear fallback) but raises its "antipodal" error for
            # three or more; the only merge all models agree on is the base, so it is kept for any number
            res = torch.zeros_like(stacked[0])
            return res + base if base is not None else res
        if flat.shape[0] == 2:
            res = (stacked[0] * w[0] + stacked[1] * w[1]).reshape(stacked.shape[1:])
            return res + base if base is not None else res
        raise InputError(
            f"tensor {name!r}: multislerp weights make the directions cancel out (weighted sum of unit "
            "vectors is zero, e.g. antipodal tensors with equal weights); use different weights"
        )
    mean = mean / mean_norm
    # log map at the mean, weighted average in the tangent space, exp map back onto the sphere
    dots = (units * mean).sum(-1, keepdim=True)
    tangent = ((units - dots * mean) * w.view(-1, 1)).sum(0)
    tangent_norm = torch.linalg.vector_norm(tangent) + eps
    direction = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    res = (direction * (norms.squeeze(-1) * w).sum()).reshape(stacked.shape[1:])
    return res + base if base is not None else res


class MultislerpParams(MethodParams):
    normalize_weights: Flag = Field(True, description="divide the weights by their sum")
    eps: NonNegative = Field(1e-8, description="numerical floor for norms")


class BarycentricWeight(MethodParams):
    weight: Number = Field(description="this model's barycentric weight")


@merge_method(
    name="multislerp",
    papers=(
        "Multi-SLERP: barycentric interpolation on a hypersphere (Goddard, blog 2025) "
        "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"
    ),
    summary="Spherical barycentre of any number of models (of their task vectors when a base is given).",
    requires_base=False,
    uses_base=True,
    params=MultislerpParams,
    model_params=BarycentricWeight,
)
def _multislerp(inputs: MergeInputs) -> torch.Tensor:
    """Multi-SLERP of all models, about the base when one is given."""
    tensors, base = work_tensors(inputs, native=True)  # mergekit computes in the recipe dtype
    return multislerp_tensors(
        tensors,
        per_model(inputs, "weight"),
        base=base,
        normalize_weights=bool(inputs.params["normalize_weights"]),
        eps=float(inputs.params["eps"]),
        name=inputs.name,
    )


def karcher_mean_tensors(
    tensors: list[torch.Tensor], alphas: list[float], max_iter: int = 10, tol: float = 1e-5
) -> torch.Tensor:
    """Weighted Karcher (Riemannian) mean of the tensors' directions, scaled by the weighted mean norm.

    The running mean stays in the inputs' dtype and norms are taken in float32 (float64 for float64
    inputs), as mergekit 0.1.5 does, so half-precision merges round where mergekit's do.
    """
    if len(tensors) == 1:
        return tensors[0]
    shape = tensors[0].shape
    acc = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    flats = [t.reshape(-1) for t in tensors]
    norms = [torch.linalg.vector_norm(f.to(acc)) for f in flats]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    units = [(flats[i] / norms[i]).to(flats[i].dtype) for i in valid]

    u = torch.zeros_like(units[0])
    for a, x in zip(weights, units):
        u += a * x
    u_norm = torch.linalg.vector_norm(u.to(acc))
    u = units[0].clone() if u_norm.item() < tol else (u / u_norm).to(u.dtype)
    for _ in range(max_iter):
        # Riemannian gradient step: weighted mean of the log maps of every point at the current estimate
        tangent = torch.zeros_like(u)
        for a, x in zip(weights, units):
            dot = torch.dot(u, x).clamp(-1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (x - dot * u)
        t_norm = torch.linalg.vector_norm(tangent.to(acc))
        if t_norm.item() < tol:
            break
        u = (torch.cos(t_norm) * u + torch.sin(t_norm) * (tangent / t_norm)).to(u.dtype)
        n = torch.linalg.vector_norm(u.to(acc))
        if n.item() > tol:
            u = (u / n).to(u.dtype)
    scale = sum(a * n for a, n in zip(alphas, norms))
    return (scale * u).reshape(shape)


class KarcherParams(MethodParams):
    max_iter: NonNegative = Field(10, description="maximum Riemannian gradient iterations")
    tol: NonNegative = Field(1e-5, description="convergence tolerance (also the smallest norm that counts)")


@merge_method(
    name="karcher",
    papers=(
        "Riemannian center of mass and mollifier smoothing (Karcher, Comm. Pure Appl. Math. 1977) "
        "https://doi.org/10.1002/cpa.3160300502"
    ),
    summary="Karcher (Riemannian) mean of the models' directions on the sphere, scaled by their mean norm.",
    requires_base=False,
    params=KarcherParams,
)
def _karcher(inputs: MergeInputs) -> torch.Tensor:
    """Equal-weight Karcher mean of every model's tensor (the base, if listed, is just one of them)."""
    tensors, _ = work_tensors(inputs, native=True)
    n = len(tensors)
    return karcher_mean_tensors(
        tensors, [1.0 / n] * n, max_iter=int(inputs.params["max_iter"]), tol=float(inputs.params["tol"])
    )
