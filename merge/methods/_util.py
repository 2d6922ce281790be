"""Small helpers shared by the merge methods (working precision, per-model parameter vectors)."""

from __future__ import annotations

from typing import Any

import torch

from suture.merge.methods.registry import MergeInputs


def work_dtype(inputs: MergeInputs) -> torch.dtype:
    """Precision to compute in: float64 when any input is float64, otherwise float32."""
    tensors = inputs.tensors + ([inputs.base] if inputs.base is not None else [])
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def native_dtype(inputs: MergeInputs) -> torch.dtype:
    """The inputs' promoted dtype: the precision mergekit merges in when a method does not upcast."""
    tensors = inputs.tensors + ([inputs.base] if inputs.base is not None else [])
    dt = tensors[0].dtype
    for t in tensors[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def work_tensors(inputs: MergeInputs, *, native: bool = False) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The model tensors and the base (if any) upcast to the working precision.

    ``native``: stay in the inputs' own (promoted) dtype instead, as mergekit 0.1.5 does for the task
    arithmetic family, so that a ``dtype: bfloat16`` merge rounds exactly where mergekit's does.
    """
    dt = native_dtype(inputs) if native else work_dtype(inputs)
    base = inputs.base.to(dt) if inputs.base is not None else None
    return [t.to(dt) for t in inputs.tensors], base


def per_model(inputs: MergeInputs, key: str) -> list[Any]:
    """The resolved value of per-model parameter ``key`` for every model, in input order."""
    return [mp[key] for mp in inputs.model_params]


def broadcast_weights(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """Per-model scalars as a tensor shaped to broadcast against ``like`` (models stacked on dim 0)."""
    w = torch.tensor([float(v) for v in values], dtype=like.dtype, device=like.device)
    return w.view(-1, *([1] * (like.dim() - 1)))
