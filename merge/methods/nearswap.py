"""NearSwap: take the other model's value wherever it is close to the base's, interpolating by closeness.

Reference: NearSwap as used for QuartetAnemoi-70B (alchemonaut, 2024)
https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001

Per entry, w = clamp(t / |base - other|, 0, 1) (1 where the two are equal) and the result is
w * other + (1 - w) * base: entries that differ by at most t are swapped in fully, larger differences less.
"""

from __future__ import annotations

import torch
from pydantic import Field

from suture.merge.methods._util import work_tensors
from suture.merge.methods.registry import MergeInputs, MethodParams, Positive, merge_method


def nearswap_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Interpolate from v0 (base) towards v1 with per-entry weight clamp(t / |v0 - v1|, 0, 1)."""
    # differences below 1e-6 count as 1e-6 (mergekit 0.1.5), so equal entries take weight min(1, t / 1e-6)
    w = (t / (v0 - v1).abs().clamp(min=1e-6)).clamp(0.0, 1.0)
    return w * v1 + (1 - w) * v0


class NearswapParams(MethodParams):
    t: Positive = Field(description="similarity threshold: differences up to t are swapped in fully")


@merge_method(
    name="nearswap",
    papers=(
        "NearSwap, QuartetAnemoi-70B model card (alchemonaut, Hugging Face 2024) "
        "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"
    ),
    summary="Swap in the other model's weights where they are close to the base's.",
    requires_base=True,
    models=(1, 1),
    params=NearswapParams,
)
def _nearswap(inputs: MergeInputs) -> torch.Tensor:
    """NearSwap of the one non-base model into the base."""
    t = float(inputs.params["t"])
    (other,), base = work_tensors(inputs, native=True)  # in the recipe dtype, as mergekit computes it
    assert base is not None
    return nearswap_tensors(t, base, other)
