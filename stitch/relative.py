"""Relative representations: describe each latent by its similarities to a fixed set of anchor latents.

Moschella et al. (ICLR 2023): with anchors a_1..a_k (the same k inputs encoded by each model), a latent
x becomes r(x) = [sim(x, a_1), ..., sim(x, a_k)]. With cosine similarity r is invariant to rotations,
reflections and rescaling of the latent space; with ``center_anchors=True`` (subtract the anchors'
mean from anchors and inputs) also to translations. A head trained on model B's relative vectors can
then read model A's relative vectors of the same anchors (zero-shot stitching).

Several similarity functions (Cannistraci et al., ICLR 2024, "From Bricks to Bridges: Product of
Invariances to Enhance Latent Space Communication"): each function gives its own relative space with
its own invariance class (cosine: angle-preserving maps; Euclidean: isometries; L1 and L-infinity:
coordinate permutations, sign flips and translations). Here each space is normalised separately and
then aggregated, by concatenation (``aggregation="concat"``: the product space, k * m features) or by
summation (``"sum"``: k features). The paper also studies a learned aggregation; that belongs in the
trainable head and is not done here. Distance-based similarities are negated (``-|x - a|``) so every
component grows with similarity.

Normalisation of each relative space (applied per similarity, before aggregation):

* ``"none"``: raw similarities.
* ``"l2"``: each relative vector scaled to unit L2 norm (the default).
* ``"center"``: each relative vector minus its mean over the anchors.
* ``"layernorm"``: each relative vector standardised over the anchors (no learned affine).
* ``"batchnorm"``: each anchor column standardised with mean and std measured at fit time on the
  model's own reference latents (the anchors, unless ``reference`` is given), so each model is
  normalised by statistics of its own space.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from suture.merge.errors import InputError, SutureError
from suture.stitch.translate import load_state_file, save_state_file

logger = logging.getLogger(__name__)

__all__ = ["NORMALIZATIONS", "RelativeProjector", "SIMILARITIES", "relative_projection"]

SIMILARITIES = ("cosine", "euclidean", "l1", "linf")
NORMALIZATIONS = ("none", "l2", "center", "layernorm", "batchnorm")
_EPS = 1e-12
_FORMAT = "suture.relative"


def _as_matrix(x: Any, what: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise InputError(f"{what}: expected a non-empty 2-D (samples, features) tensor, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{what}: contains NaN or infinite values")
    return t


def relative_projection(x: torch.Tensor, anchors: torch.Tensor, similarity: str = "cosine") -> torch.Tensor:
    """Raw similarities (n, k) of each row of x to each anchor row."""
    if similarity == "cosine":
        xn = x / x.norm(dim=1, keepdim=True).clamp_min(_EPS)
        an = anchors / anchors.norm(dim=1, keepdim=True).clamp_min(_EPS)
        return xn @ an.T
    p = {"euclidean": 2.0, "l1": 1.0, "linf": float("inf")}.get(similarity)
    if p is None:
        raise InputError(f"unknown similarity {similarity!r}; expected one of {list(SIMILARITIES)}")
    # The matrix-product shortcut for p=2 loses ~1e-7 absolute near zero distance (an anchor against
    # itself), which would break the exact isometry invariance; compute differences directly.
    return -torch.cdist(x, anchors, p=p, compute_mode="donot_use_mm_for_euclid_dist")


def _row_normalize(r: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "l2":
        return r / r.norm(dim=1, keepdim=True).clamp_min(_EPS)
    if mode == "center":
        return r - r.mean(dim=1, keepdim=True)
    if mode == "layernorm":
        c = r - r.mean(dim=1, keepdim=True)
        return c / c.pow(2).mean(dim=1, keepdim=True).sqrt().clamp_min(_EPS)
    return r


class RelativeProjector:
    """Maps latents to (normalised) similarity vectors against anchors fitted from one model's space."""

    def __init__(
        self,
        similarities: Sequence[str] | str = ("cosine",),
        normalization: str = "l2",
        center_anchors: bool = False,
        aggregation: str = "concat",
    ) -> None:
        sims = (similarities,) if isinstance(similarities, str) else tuple(similarities)
        if not sims:
            raise InputError("similarities: give at least one of " + ", ".join(SIMILARITIES))
        bad = [s for s in sims if s not in SIMILARITIES]
        if bad:
            raise InputError(f"similarities: unknown {bad}; expected names from {list(SIMILARITIES)}")
        if len(set(sims)) != len(sims):
            raise InputError(f"similarities: repeated entries in {list(sims)}")
        if normalization not in NORMALIZATIONS:
            raise InputError(f"normalization must be one of {list(NORMALIZATIONS)}, got {normalization!r}")
        if aggregation not in ("concat", "sum"):
            raise InputError(f"aggregation must be 'concat' or 'sum', got {aggregation!r}")
        self.similarities = sims
        self.normalization = normalization
        self.center_anchors = bool(center_anchors)
        self.aggregation = aggregation
        self._state: dict[str, torch.Tensor] = {}

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments, JSON-serialisable."""
        return {
            "similarities": list(self.similarities),
            "normalization": self.normalization,
            "center_anchors": self.center_anchors,
            "aggregation": self.aggregation,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"RelativeProjector({args})"

    @property
    def is_fitted(self) -> bool:
        """Whether fit() or load_state_dict() has run."""
        return bool(self._state)

    @property
    def num_anchors(self) -> int:
        """Number of anchors k."""
        self._require_fitted()
        return int(self._state["anchors"].shape[0])

    @property
    def out_features(self) -> int:
        """Width of the relative vectors: k * len(similarities) for concat, k for sum."""
        k = self.num_anchors
        return k * len(self.similarities) if self.aggregation == "concat" else k

    def _require_fitted(self) -> None:
        if not self._state:
            raise SutureError("RelativeProjector is not fitted: call fit(anchors) or load_state_dict() first")

    def _raw(self, x: torch.Tensor, state: dict[str, torch.Tensor], sim: str) -> torch.Tensor:
        shift = state["anchor_mean"]
        return relative_projection(x - shift, state["anchors"] - shift, sim)

    def fit(self, anchors: Any, reference: Any | None = None) -> "RelativeProjector":
        """Store this model's anchor latents (k, d); ``reference`` latents feed batchnorm statistics."""
        a = _as_matrix(anchors, "anchors")
        if a.shape[0] < 2 and self.normalization in ("center", "layernorm"):
            raise InputError(f"normalization {self.normalization!r} needs at least 2 anchors, got {a.shape[0]}")
        work = torch.promote_types(a.dtype, torch.float32)
        a = a.to(work)
        state: dict[str, torch.Tensor] = {
            "anchors": a.clone(),
            "anchor_mean": a.mean(dim=0) if self.center_anchors else a.new_zeros(a.shape[1]),
        }
        if self.normalization == "batchnorm":
            ref = a if reference is None else _as_matrix(reference, "reference").to(work)
            if ref.shape[1] != a.shape[1]:
                raise InputError(f"reference has {ref.shape[1]} features, anchors have {a.shape[1]}")
            if ref.shape[0] < 2:
                raise InputError(f"batchnorm statistics need at least 2 reference rows, got {ref.shape[0]}")
            for sim in self.similarities:
                r = self._raw(ref, state, sim)
                std = r.std(dim=0, correction=0)
                state[f"bn_mean.{sim}"] = r.mean(dim=0)
                # A column that is constant on the reference set cannot be standardised: leave it unscaled.
                state[f"bn_std.{sim}"] = torch.where(std > _EPS, std, torch.ones_like(std))
        self._state = state
        logger.info("relative projector fitted on %d anchors of width %d", a.shape[0], a.shape[1])
        return self

    def transform(self, X: Any) -> torch.Tensor:
        """Relative vectors (n, out_features) of latents X (n, d) of the model the anchors came from."""
        self._require_fitted()
        x = _as_matrix(X, "X")
        d = self._state["anchors"].shape[1]
        if x.shape[1] != d:
            raise InputError(f"X has {x.shape[1]} features; the anchors have {d}")
        out_dtype = x.dtype
        work = torch.promote_types(out_dtype, torch.float32)
        st = {k: v.to(device=x.device, dtype=work) for k, v in self._state.items()}
        x = x.to(work)
        parts = []
        for sim in self.similarities:
            r = self._raw(x, st, sim)
            if self.normalization == "batchnorm":
                r = (r - st[f"bn_mean.{sim}"]) / st[f"bn_std.{sim}"]
            else:
                r = _row_normalize(r, self.normalization)
            parts.append(r)
        out = torch.cat(parts, dim=1) if self.aggregation == "concat" else torch.stack(parts).sum(dim=0)
        return out.to(out_dtype)

    def fit_transform(self, anchors: Any, X: Any | None = None) -> torch.Tensor:
        """fit(anchors) then transform(X) (X defaults to the anchors)."""
        self.fit(anchors)
        return self.transform(anchors if X is None else X)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Fitted tensors: anchors, anchor mean and batchnorm statistics."""
        self._require_fitted()
        return {k: v.clone() for k, v in self._state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> "RelativeProjector":
        """Restore tensors produced by state_dict()."""
        required = ["anchors", "anchor_mean"]
        if self.normalization == "batchnorm":
            required += [f"bn_{s}.{sim}" for sim in self.similarities for s in ("mean", "std")]
        missing = [k for k in required if k not in state]
        if missing:
            raise InputError(f"RelativeProjector.load_state_dict: missing tensors {missing}")
        unexpected = sorted(set(state) - set(required))
        if unexpected:
            raise InputError(f"RelativeProjector.load_state_dict: unexpected tensors {unexpected}")
        self._state = {k: torch.as_tensor(state[k]) for k in required}
        return self

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save anchors and configuration to one safetensors file."""
        return save_state_file(path, self.state_dict(), _FORMAT, "RelativeProjector", self.get_config())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "RelativeProjector":
        """Load a projector saved with save()."""
        name, config, tensors = load_state_file(path, _FORMAT)
        if name != "RelativeProjector":
            raise InputError(f"{path}: holds a {name!r}, not a RelativeProjector")
        try:
            obj = cls(**config)
        except TypeError as exc:
            raise InputError(f"{path}: configuration {config} does not fit RelativeProjector ({exc})") from exc
        return obj.load_state_dict(tensors)
