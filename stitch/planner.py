"""Where to cut: score candidate (source layer i, target layer j) pairs by CKA and by stitched accuracy.

For each pair a stitch is fitted on the fit data (closed-form least squares by default, as the
initialisation of Bansal et al., 2021; or any translator method), plugged between A's prefix and B's
suffix (or a head trained on B's layer-j features when B has no head of its own, e.g. an encoder),
and scored on held-out data. Linear CKA between the two layers is reported beside the accuracy,
because a low stitching penalty alone does not show that two layers represent the same thing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from suture.merge.data import CalibrationData
from suture.merge.errors import InputError
from suture.stitch.features import Chain, flatten_features
from suture.stitch.heads import train_head
from suture.stitch.learned import fit_linear_stitch, pixel_rows
from suture.stitch.similarity import layer_similarity_matrix
from suture.stitch.stitched import IdentityStitch, TranslatorStitch, classification_scores, predict
from suture.stitch.translate import Affine, LeastSquares, OrthogonalizedLeastSquares, OTTranslator, Procrustes, Translator

logger = logging.getLogger(__name__)

__all__ = ["TRANSLATOR_METHODS", "build_stitch", "plan_stitch"]

TRANSLATOR_METHODS: dict[str, type[Translator]] = {
    "procrustes": Procrustes,
    "linear": LeastSquares,
    "ortho_linear": OrthogonalizedLeastSquares,
    "affine": Affine,
    "ot": OTTranslator,
}


def build_stitch(method: str, xa: torch.Tensor, xb: torch.Tensor, options: Mapping[str, Any] | None = None) -> nn.Module:
    """Fit a stitch module from parallel features of A (xa) and B (xb): a translator, 'learned' (closed form) or 'identity'."""
    opts = dict(options or {})
    if xa.shape[0] != xb.shape[0]:
        raise InputError(
            f"anchors are not parallel: model A gave {xa.shape[0]} rows, model B {xb.shape[0]}; "
            "each anchor must be the same input through both models"
        )
    if method == "identity":
        if tuple(xa.shape[1:]) != tuple(xb.shape[1:]):
            raise InputError(f"naive stitching needs equal shapes; A gives {tuple(xa.shape[1:])}, B expects {tuple(xb.shape[1:])}")
        return IdentityStitch()
    if method == "learned":
        return fit_linear_stitch(xa, xb, ridge=float(opts.get("ridge", 0.0)))
    cls = TRANSLATOR_METHODS.get(method)
    if cls is None:
        raise InputError(f"unknown stitch method {method!r}; expected one of {sorted([*TRANSLATOR_METHODS, 'learned', 'identity'])}")
    if xa.ndim != xb.ndim or xa.ndim not in (2, 4):
        raise InputError(f"cannot translate {tuple(xa.shape)} features into {tuple(xb.shape)}; expected both (n, d) or both (n, C, H, W)")
    if xa.ndim == 4 and xa.shape[2:] != xb.shape[2:]:
        raise InputError(f"pixel-wise translation needs equal spatial sizes; A gives {tuple(xa.shape[2:])}, B {tuple(xb.shape[2:])}")
    try:
        translator = cls(**opts)
    except TypeError as exc:
        raise InputError(f"options {opts} do not fit the {method!r} translator ({exc})") from exc
    translator.fit(pixel_rows(xa), pixel_rows(xb))
    return TranslatorStitch(translator)


def _pairs(
    source: Chain,
    target: Chain,
    pairs: Sequence[Sequence[int]] | None,
    source_layers: Sequence[int] | None,
    target_layers: Sequence[int] | None,
) -> list[tuple[int, int]]:
    if pairs is not None:
        out = []
        for k, p in enumerate(pairs):
            if len(p) != 2:
                raise InputError(f"pairs[{k}]: expected [source_layer, target_layer], got {p!r}")
            out.append((source.resolve_layer(p[0], f"pairs[{k}] source layer"), target.resolve_layer(p[1], f"pairs[{k}] target layer")))
        return out
    # Default candidates: every hidden representation (not the raw input, not the logits).
    last_a = source.num_layers if source.kind == "hf" else source.num_layers - 1
    last_b = target.num_layers if target.kind == "hf" else target.num_layers - 1
    sl = [source.resolve_layer(i, "source layer") for i in (source_layers or range(1, last_a + 1))]
    tl = [target.resolve_layer(j, "target layer") for j in (target_layers or range(1, last_b + 1))]
    return [(i, j) for i in sl for j in tl]


@torch.no_grad()
def plan_stitch(
    source: Chain,
    target: Chain,
    fit_data: CalibrationData,
    eval_data: CalibrationData,
    *,
    pairs: Sequence[Sequence[int]] | None = None,
    source_layers: Sequence[int] | None = None,
    target_layers: Sequence[int] | None = None,
    method: str = "learned",
    options: Mapping[str, Any] | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Table of {source_layer, target_layer, cka, accuracy, f1_macro} per candidate pair, the CKA matrix and the best pair."""
    if eval_data.labels is None:
        raise InputError(f"data {eval_data.name!r}: the planner scores stitched accuracy and needs labels")
    cand = _pairs(source, target, pairs, source_layers, target_layers)
    if not cand:
        raise InputError("no candidate layer pairs to score")
    sl = sorted({i for i, _ in cand})
    tl = sorted({j for _, j in cand})
    fa = source.features(fit_data, sl, batch_size=batch_size, device=device)
    fb = target.features(fit_data, tl, batch_size=batch_size, device=device)
    ea = source.features(eval_data, sl, batch_size=batch_size, device=device)
    eb = target.features(eval_data, tl, batch_size=batch_size, device=device)
    cka = layer_similarity_matrix([flatten_features(ea[i]) for i in sl], [flatten_features(eb[j]) for j in tl], "cka")
    heads: dict[int, nn.Module] = {}
    rows = []
    for k, (i, j) in enumerate(cand):
        if target.has_head:
            suffix = target.suffix(j)
        else:
            if fit_data.labels is None:
                raise InputError(f"data {fit_data.name!r}: training a head on the target's features needs labels")
            if j not in heads:
                heads[j] = train_head(fb[j], fit_data.labels)
            suffix = heads[j]
        try:
            stitch = build_stitch(method, fa[i], fb[j], options)
        except InputError as exc:
            rows.append({"source_layer": i, "target_layer": j, "cka": float(cka[sl.index(i), tl.index(j)]), "accuracy": None, "f1_macro": None, "error": str(exc)})
            continue
        stitch.eval()
        pred = predict(lambda z: suffix(stitch(z)), ea[i], batch_size=batch_size)
        scores = classification_scores(pred, eval_data.labels)
        rows.append({"source_layer": i, "target_layer": j, "cka": float(cka[sl.index(i), tl.index(j)]), "accuracy": scores["accuracy"], "f1_macro": scores["f1_macro"]})
        if progress:
            progress(k + 1, len(cand))
    scored = [r for r in rows if r["accuracy"] is not None]
    if not scored:
        raise InputError("no candidate pair could be stitched: " + "; ".join(r.get("error", "") for r in rows))
    # Best by accuracy; ties go to the higher CKA, then to the earlier (shallower) cut.
    best = max(scored, key=lambda r: (round(r["accuracy"], 12), r["cka"], -r["source_layer"], -r["target_layer"]))
    logger.info("stitch planner: %d pairs, best %s", len(rows), best)
    return {"method": method, "rows": rows, "best": best, "source_layers": sl, "target_layers": tl, "cka": cka.tolist()}
