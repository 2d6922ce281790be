"""Fusing models of different depths (cross-layer alignment, after Nguyen et al., CLAFusion).

1. Layer similarity: linear CKA between every hidden layer of the shallower and the deeper model, on the
   same calibration inputs.
2. Layer alignment: dynamic programming picks an order-preserving one-to-one map from the shallower
   model's hidden layers into the deeper model's, minimising the summed ``1 - CKA``. The first and last
   hidden layers are matched to each other: the last ones both feed the classifier, and an identity layer
   can only be inserted after a ReLU (see 3), never in front of the raw inputs.
3. Depth balancing: for every deep layer left unmatched the shallower model gets an identity hidden layer
   (``W = I``, ``b = 0``) after its preceding matched layer. With ReLU between layers the inserted layer
   sees non-negative features, and ``relu(I x) = x``, so the balanced model computes the same function.
4. Fusion: both models now have equal depth; :func:`merge.align.ot.ot_align` transports model B into the
   reference's basis (widths may differ) and the result is ``blend * A + (1 - blend) * B``.

Supported architectures: :class:`merge.zoo.MLP` (Linear layers with ReLU between them).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from suture.merge.data import CalibrationData, iter_batches
from suture.merge.errors import AlignmentError, InputError, OptionError
from suture.merge.measure import linear_cka
from suture.merge.zoo import MLP

logger = logging.getLogger(__name__)


def _require_mlp(module: nn.Module, label: str) -> MLP:
    if not isinstance(module, MLP):
        raise InputError(f"{label}: depth alignment supports merge.zoo.MLP (Linear + ReLU) models, got {type(module).__name__}")
    if len(module.layers) < 2:
        raise InputError(f"{label}: the model has no hidden layer to align")
    return module


@torch.no_grad()
def hidden_features(module: nn.Module, data: CalibrationData, *, batch_size: int = 512, max_items: int | None = 1024) -> list[torch.Tensor]:
    """Post-ReLU features of every hidden layer of an MLP on calibration inputs (rows = samples)."""
    mlp = _require_mlp(module, "model")
    data = data.take(min(max_items, len(data))) if max_items else data
    feats: list[list[torch.Tensor]] = [[] for _ in range(len(mlp.layers) - 1)]
    was = mlp.training
    mlp.eval()
    try:
        for inputs, _ in iter_batches(data, batch_size):
            x = inputs.flatten(1)
            for i, layer in enumerate(mlp.layers[:-1]):
                x = torch.relu(layer(x))
                feats[i].append(x)
    finally:
        mlp.train(was)
    return [torch.cat(f) for f in feats]


def cka_matrix(feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor]) -> torch.Tensor:
    """(len(a), len(b)) linear CKA between every pair of layers."""
    return torch.tensor([[linear_cka(fa, fb) for fb in feats_b] for fa in feats_a], dtype=torch.float64)


def align_layers(cost: torch.Tensor) -> list[int]:
    """Order-preserving map of the m rows (shallow layers) to m of the n >= m columns, first and last fixed, minimum cost."""
    m, n = cost.shape
    if m > n:
        raise AlignmentError(f"align_layers needs rows <= columns (shallow x deep), got {m} x {n}")
    if m == 1:
        return [n - 1]
    if m == 2:
        return [0, n - 1]
    # middle rows 1..m-2 go to columns 1..n-2, strictly increasing
    inner = cost[1 : m - 1, 1 : n - 1]
    mi, ni = inner.shape
    inf = float("inf")
    best = [[inf] * (ni + 1) for _ in range(mi + 1)]
    take = [[False] * (ni + 1) for _ in range(mi + 1)]
    for j in range(ni + 1):
        best[0][j] = 0.0
    for i in range(1, mi + 1):
        for j in range(1, ni + 1):
            skip = best[i][j - 1]
            use = best[i - 1][j - 1] + float(inner[i - 1, j - 1])
            best[i][j], take[i][j] = (use, True) if use <= skip else (skip, False)
    picks: list[int] = []
    i, j = mi, ni
    while i > 0:
        if take[i][j]:
            picks.append(j)  # column j-1 of inner is deep layer j
            i -= 1
        j -= 1
    return [0, *reversed(picks), n - 1]


def insert_identity_layers(module: nn.Module, mapping: Sequence[int], deep_layers: int) -> MLP:
    """A deeper copy of a ReLU MLP: an identity hidden layer for every deep layer that `mapping` skips."""
    mlp = _require_mlp(module, "shallow model")
    hidden = len(mlp.layers) - 1
    if len(mapping) != hidden or list(mapping) != sorted(set(mapping)) or mapping[0] != 0 or mapping[-1] != deep_layers - 1:
        raise AlignmentError(f"layer mapping {list(mapping)} does not fit {hidden} hidden layers into {deep_layers}")
    widths = [mlp.widths[0]]
    layers: list[nn.Linear] = []
    for k, layer in enumerate(mlp.layers[:-1]):
        widths.append(mlp.widths[k + 1])
        layers.append(layer)
        gap = (mapping[k + 1] if k + 1 < hidden else deep_layers) - mapping[k] - 1
        for _ in range(gap):
            # relu(I x + 0) = x for the non-negative (post-ReLU) features it reads
            ident = nn.Linear(widths[-1], widths[-1])
            with torch.no_grad():
                ident.weight.copy_(torch.eye(widths[-1], dtype=ident.weight.dtype))
                ident.bias.zero_()
            widths.append(widths[-1])
            layers.append(ident)
    widths.append(mlp.widths[-1])
    layers.append(mlp.layers[-1])
    out = MLP(widths)
    with torch.no_grad():
        for dst, src in zip(out.layers, layers):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
    return out.eval()


@dataclass
class DepthFusion:
    """The fused model and how it was obtained."""

    module: MLP
    widths: list[int]
    cka: list[list[float]]  # shallow x deep hidden layers
    mapping: list[int]  # deep hidden layer of each shallow hidden layer
    balanced: str  # "reference", "other" or "none": which model received identity layers
    inserted: int
    transport: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description for reports."""
        return {"widths": self.widths, "cka": self.cka, "mapping": self.mapping, "balanced": self.balanced,
                "identity_layers": self.inserted, "transport": self.transport}


def balance_depths(module_a: nn.Module, module_b: nn.Module, data: CalibrationData, *, max_items: int | None = 1024) -> tuple[MLP, MLP, dict[str, Any]]:
    """Both MLPs at the deeper depth (identity layers in the shallower), with the CKA matrix and mapping."""
    a, b = _require_mlp(module_a, "reference"), _require_mlp(module_b, "model B")
    if a.widths[0] != b.widths[0] or a.widths[-1] != b.widths[-1]:
        raise AlignmentError(f"the models' inputs/outputs differ: {a.widths[0]}->{a.widths[-1]} vs {b.widths[0]}->{b.widths[-1]}")
    if not isinstance(data, CalibrationData) or len(data) == 0:
        raise OptionError(("data",), "depth alignment needs calibration data (CKA on activations)")
    fa, fb = hidden_features(a, data, max_items=max_items), hidden_features(b, data, max_items=max_items)
    a_shallow = len(fa) <= len(fb)
    shallow, deep = (fa, fb) if a_shallow else (fb, fa)
    cka = cka_matrix(shallow, deep)
    mapping = align_layers(1.0 - cka)
    info = {"cka": cka.tolist(), "mapping": mapping, "inserted": len(deep) - len(shallow),
            "balanced": "none" if len(fa) == len(fb) else ("reference" if a_shallow else "other")}
    if len(fa) == len(fb):
        return a, b, info
    if a_shallow:
        return insert_identity_layers(a, mapping, len(deep)), b, info
    return a, insert_identity_layers(b, mapping, len(deep)), info


def fuse_depths(
    module_a: nn.Module,
    module_b: nn.Module,
    data: CalibrationData,
    *,
    blend: float = 0.5,
    max_items: int | None = 1024,
    **ot_options: Any,
) -> DepthFusion:
    """Fuse two ReLU MLPs of different depths (and widths) into one with the reference's widths."""
    from suture.merge.align.ot import fuse_states, ot_align, transport_state
    from suture.merge.align.ot_features import collect_unit_moments
    from suture.merge.graph.trace import spec_from_module

    if not 0.0 <= blend <= 1.0:
        raise OptionError(("blend",), f"must be in [0, 1], got {blend}")
    if ot_options.get("target_widths"):
        raise OptionError(("target_widths",), "is not supported together with different depths")
    a, b, info = balance_depths(module_a, module_b, data, max_items=max_items)
    x = data.inputs[:2]
    spec_a, spec_b = spec_from_module(a, x), spec_from_module(b, x)
    params_a = {k: v.detach() for k, v in a.state_dict().items()}
    params_b = {k: v.detach() for k, v in b.state_dict().items()}
    if ot_options.get("ground_metric") == "activations" or ot_options.get("marginals") == "activation":
        calib = data.take(min(max_items, len(data))) if max_items else data
        ot_options["activations"] = collect_unit_moments(a, b, (inp for inp, _ in iter_batches(calib, 256)), example_input=x)
    result = ot_align(spec_a, spec_b, params_a, params_b, **ot_options)
    fused = fuse_states(params_a, transport_state(spec_a, spec_b, params_b, result), blend)
    module = MLP(a.widths)
    module.load_state_dict(fused)
    logger.info("fused depths %d and %d: mapping %s", len(module_a.layers) - 1, len(module_b.layers) - 1, info["mapping"])
    return DepthFusion(module.eval(), list(a.widths), info["cka"], info["mapping"], info["balanced"], info["inserted"],
                       result.summary())
