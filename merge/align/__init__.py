"""Alignment engines: turn two models (and optionally calibration data) into per-group transforms.

Permutation engines (Git Re-Basin weight matching and activation matching) return a :class:`MatchResult`
whose ``perms`` apply to model B with :func:`merge.spec.permute_state` so that B lines up with A.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from suture.merge.align.activation_matching import activation_matching
    from suture.merge.align.weight_matching import weight_matching


@dataclass
class MatchResult:
    """Permutations for model B (group -> index vector, new[i] = old[perm[i]]) and how they were found."""

    perms: dict[str, torch.Tensor]
    objective: list[float] = field(default_factory=list)
    group_time: dict[str, float] = field(default_factory=dict)
    lap_time: float = 0.0
    iterations: int = 0
    engine: str = ""
    total_time: float = 0.0
    converged: bool = True
    stats: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures for reports (no tensors)."""
        return {
            "engine": self.engine,
            "groups": len(self.perms),
            "iterations": self.iterations,
            "converged": self.converged,
            "objective": self.objective[-1] if self.objective else None,
            "total_time_s": round(self.total_time, 4),
            "lap_time_s": round(self.lap_time, 4),
            **self.stats,
            **({"skipped": dict(self.skipped)} if self.skipped else {}),
        }


def __getattr__(name: str):
    # engines load lazily so that importing MatchResult stays cheap and free of import cycles
    if name == "weight_matching":
        from suture.merge.align.weight_matching import weight_matching

        return weight_matching
    if name == "activation_matching":
        from suture.merge.align.activation_matching import activation_matching

        return activation_matching
    raise AttributeError(f"module 'suture.merge.align' has no attribute {name!r}")


__all__ = ["MatchResult", "activation_matching", "weight_matching"]
