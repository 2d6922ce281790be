"""Latent-space translation: estimators that map model A's latents into model B's space from parallel anchors.

Every translator follows the same recipe (Maiorca et al., 2023, "Latent space translation via semantic
alignment"): normalise each side with statistics of its own anchors, fit a map between the normalised
anchor sets, and at transform time normalise A's latents, map them, and undo B's normalisation, so the
output can be fed to B's unchanged head.

Normalisation options (``center``, ``scale``):

* ``scale="feature"`` (or ``True``): per-feature standard deviation, as in the reference method.
* ``scale="global"``: one scalar per side (root mean per-feature variance). Unlike per-feature scaling
  it commutes with rotations, so a rotated and rescaled copy of a space is translated exactly.
* ``scale="none"`` (or ``False``).

All estimators have ``fit(X, Y) -> self``, ``transform(X)``, ``state_dict()`` / ``load_state_dict()``,
and ``save(path)`` / ``load(path)`` to a single safetensors file whose metadata carries the class name
and configuration as JSON.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from suture.merge.errors import InputError, SutureError

logger = logging.getLogger(__name__)

__all__ = [
    "Affine",
    "LeastSquares",
    "OTTranslator",
    "OrthogonalizedLeastSquares",
    "Procrustes",
    "TRANSLATORS",
    "Translator",
    "load_state_file",
    "load_translator",
    "save_state_file",
]

_DTYPE = torch.float64
_FORMAT_KEY = "suture.format"
_CONFIG_KEY = "suture.config"
_CLASS_KEY = "suture.class"
# Singular values below this fraction of the largest are treated as zero in least-squares solves.
_RCOND = 1e-10


# --------------------------------------------------------------------------------------------------
# safetensors state files (shared with stitch.relative)


def save_state_file(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], fmt: str, cls: str, config: dict[str, Any]) -> Path:
    """Write tensors + JSON config to one safetensors file atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {_FORMAT_KEY: fmt, _CLASS_KEY: cls, _CONFIG_KEY: json.dumps(config, sort_keys=True)}
    payload = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file(payload, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("saved %s %s to %s", fmt, cls, path)
    return path


def load_state_file(path: str | os.PathLike[str], fmt: str) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """Read (class name, config, tensors) written by :func:`save_state_file`; checks the format tag."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except InputError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise InputError(f"{path}: not a readable safetensors file ({exc})") from exc
    if meta.get(_FORMAT_KEY) != fmt:
        raise InputError(f"{path}: metadata {_FORMAT_KEY!r} is {meta.get(_FORMAT_KEY)!r}, expected {fmt!r}")
    try:
        config = json.loads(meta.get(_CONFIG_KEY, "{}"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: metadata {_CONFIG_KEY!r} is not valid JSON ({exc})") from exc
    return meta.get(_CLASS_KEY, ""), config, tensors


# --------------------------------------------------------------------------------------------------
# helpers


def _as_matrix(x: Any, what: str) -> torch.Tensor:
    """A finite 2-D float tensor (n, d) from `x`."""
    t = torch.as_tensor(x)
    if t.ndim != 2:
        raise InputError(f"{what}: expected a 2-D (samples, features) tensor, got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise InputError(f"{what}: empty tensor of shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{what}: contains NaN or infinite values")
    return t


def _check_parallel(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape[0] != y.shape[0]:
        raise InputError(
            f"anchors are not parallel: X (model A) has {x.shape[0]} rows, Y (model B) has {y.shape[0]}; "
            "each row must be the same input through both models"
        )


def _scale_mode(scale: bool | str) -> str:
    if scale is True:
        return "feature"
    if scale is False:
        return "none"
    if scale in ("feature", "global", "none"):
        return str(scale)
    raise InputError(f"scale must be True, False, 'feature', 'global' or 'none', got {scale!r}")


def _polar(m: torch.Tensor) -> torch.Tensor:
    """Nearest (semi-)orthogonal matrix U V^T to `m` (d_x x d_y) in Frobenius norm."""
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return u @ vh


def _lstsq(x: torch.Tensor, y: torch.Tensor, ridge: float) -> torch.Tensor:
    """Minimum-norm (ridge-regularised) least squares W = argmin |X W - Y|^2 + ridge |W|^2 via SVD.

    SVD rather than torch.linalg.lstsq: it works the same on every device and handles rank-deficient X.
    """
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    if ridge > 0:
        f = s / (s * s + ridge)
    else:
        keep = s > _RCOND * s.max().clamp_min(torch.finfo(s.dtype).tiny)
        f = torch.where(keep, 1.0 / s.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(s))
    return vh.T @ (f[:, None] * (u.T @ y))


# --------------------------------------------------------------------------------------------------
# base class


class Translator:
    """Base class: anchor-statistics normalisation around a map fitted by :meth:`_fit_map`."""

    kind: ClassVar[str] = "translator"
    _map_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, center: bool = True, scale: bool | str = True, allow_padding: bool = True) -> None:
        self.center = bool(center)
        self.scale = _scale_mode(scale)
        self.allow_padding = bool(allow_padding)
        self._state: dict[str, torch.Tensor] = {}

    # -- configuration ----------------------------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments, JSON-serialisable."""
        return {"center": self.center, "scale": self.scale, "allow_padding": self.allow_padding}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    @property
    def is_fitted(self) -> bool:
        """Whether fit() or load_state_dict() has run."""
        return bool(self._state)

    @property
    def in_features(self) -> int:
        """Width of model A's latents."""
        self._require_fitted()
        return int(self._state["x_mean"].shape[0])

    @property
    def out_features(self) -> int:
        """Width of model B's latents."""
        self._require_fitted()
        return int(self._state["y_mean"].shape[0])

    def _require_fitted(self) -> None:
        if not self._state:
            raise SutureError(f"{type(self).__name__} is not fitted: call fit(X, Y) or load_state_dict() first")

    # -- normalisation ----------------------------------------------------------------------------

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = z.shape[1]
        mean = z.mean(dim=0) if self.center else z.new_zeros(d)
        zc = z - mean
        if self.scale == "feature":
            std = zc.pow(2).mean(dim=0).sqrt()
            # A constant feature carries nothing to standardise; dividing by ~0 would blow up noise.
            tiny = 1e-12 * float(std.max()) if std.numel() else 0.0
            std = torch.where(std > max(tiny, torch.finfo(z.dtype).tiny), std, torch.ones_like(std))
        elif self.scale == "global":
            g = float(zc.pow(2).mean().sqrt())
            std = z.new_full((d,), g if g > 0 else 1.0)
        else:
            std = z.new_ones(d)
        return mean, std

    def _check_widths(self, dx: int, dy: int) -> None:
        if dx != dy and not self.allow_padding:
            raise InputError(
                f"{type(self).__name__}: widths differ (X has {dx} features, Y has {dy}) and allow_padding=False; "
                "pass allow_padding=True to zero-pad the narrower side"
            )

    # -- estimator API ----------------------------------------------------------------------------

    def fit(self, X: Any, Y: Any) -> "Translator":
        """Fit on parallel anchors: row i of X (model A) and row i of Y (model B) encode the same input."""
        x = _as_matrix(X, "X (model A anchors)").to(_DTYPE)
        y = _as_matrix(Y, "Y (model B anchors)").to(_DTYPE)
        _check_parallel(x, y)
        x_mean, x_std = self._stats(x)
        y_mean, y_std = self._stats(y)
        xs = (x - x_mean) / x_std
        ys = (y - y_mean) / y_std
        fitted = self._fit_map(xs, ys)
        self._state = {"x_mean": x_mean, "x_std": x_std, "y_mean": y_mean, "y_std": y_std, **fitted}
        logger.info("%s fitted on %d anchors (%d -> %d features)", type(self).__name__, x.shape[0], x.shape[1], y.shape[1])
        return self

    def transform(self, X: Any) -> torch.Tensor:
        """Translate model A latents (n, d_A) into model B's un-normalised space (n, d_B)."""
        self._require_fitted()
        x = _as_matrix(X, "X (model A latents)")
        if x.shape[1] != self.in_features:
            raise InputError(f"X (model A latents) has {x.shape[1]} features; this translator was fitted on {self.in_features}")
        out_dtype = x.dtype
        work = torch.promote_types(out_dtype, torch.float32)
        st = {k: v.to(device=x.device, dtype=work) for k, v in self._state.items()}
        xs = (x.to(work) - st["x_mean"]) / st["x_std"]
        y = self._apply_map(xs, st) * st["y_std"] + st["y_mean"]
        return y.to(out_dtype)

    def fit_transform(self, X: Any, Y: Any) -> torch.Tensor:
        """fit(X, Y) then transform(X)."""
        return self.fit(X, Y).transform(X)

    def _fit_map(self, xs: torch.Tensor, ys: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _apply_map(self, xs: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    # -- persistence ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Fitted tensors (normalisation statistics and the map)."""
        self._require_fitted()
        return {k: v.clone() for k, v in self._state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> "Translator":
        """Restore fitted tensors produced by state_dict()."""
        required = ("x_mean", "x_std", "y_mean", "y_std", *self._map_keys)
        missing = [k for k in required if k not in state]
        if missing:
            raise InputError(f"{type(self).__name__}.load_state_dict: missing tensors {missing}")
        unexpected = sorted(set(state) - set(required))
        if unexpected:
            raise InputError(f"{type(self).__name__}.load_state_dict: unexpected tensors {unexpected}")
        self._state = {k: torch.as_tensor(state[k]).to(_DTYPE) for k in required}
        return self

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save to one safetensors file (tensors + JSON config in the metadata)."""
        return save_state_file(path, self.state_dict(), self.kind, type(self).__name__, self.get_config())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Translator":
        """Load a translator saved with save(); on a subclass, the file must hold that subclass."""
        name, config, tensors = load_state_file(path, cls.kind)
        target = TRANSLATORS.get(name)
        if target is None:
            raise InputError(f"{path}: unknown translator class {name!r}; expected one of {sorted(TRANSLATORS)}")
        if cls is not Translator and not issubclass(target, cls):
            raise InputError(f"{path}: holds a {name}, not a {cls.__name__}")
        try:
            obj = target(**config)
        except TypeError as exc:
            raise InputError(f"{path}: configuration {config} does not fit {name} ({exc})") from exc
        return obj.load_state_dict(tensors)


# --------------------------------------------------------------------------------------------------
# estimators


class Procrustes(Translator):
    """Orthogonal map R = U V^T from the SVD of Xs^T Ys = U S V^T (normalised anchors).

    With different widths the narrower side is zero-padded (``allow_padding``). Padding X (or Y) with
    zero columns and keeping the first d_B outputs gives exactly the semi-orthogonal d_A x d_B factor
    U V^T of the thin SVD, which is what is stored.
    """

    _map_keys = ("R",)

    def _fit_map(self, xs: torch.Tensor, ys: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check_widths(xs.shape[1], ys.shape[1])
        return {"R": _polar(xs.T @ ys)}

    def _apply_map(self, xs: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return xs @ state["R"]


class LeastSquares(Translator):
    """Linear map W = argmin |Xs W - Ys|^2 (+ ridge |W|^2); minimum-norm when anchors are rank-deficient."""

    _map_keys = ("W",)

    def __init__(self, center: bool = True, scale: bool | str = True, ridge: float = 0.0) -> None:
        super().__init__(center=center, scale=scale, allow_padding=True)
        if ridge < 0:
            raise InputError(f"ridge must be >= 0, got {ridge}")
        self.ridge = float(ridge)

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments, JSON-serialisable."""
        return {"center": self.center, "scale": self.scale, "ridge": self.ridge}

    def _fit_map(self, xs: torch.Tensor, ys: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"W": _lstsq(xs, ys, self.ridge)}

    def _apply_map(self, xs: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return xs @ state["W"]


class OrthogonalizedLeastSquares(Translator):
    """Least squares, then the nearest (semi-)orthogonal matrix to the solution (polar factor of W)."""

    _map_keys = ("R",)

    def __init__(self, center: bool = True, scale: bool | str = True, allow_padding: bool = True, ridge: float = 0.0) -> None:
        super().__init__(center=center, scale=scale, allow_padding=allow_padding)
        if ridge < 0:
            raise InputError(f"ridge must be >= 0, got {ridge}")
        self.ridge = float(ridge)

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments, JSON-serialisable."""
        return {**super().get_config(), "ridge": self.ridge}

    def _fit_map(self, xs: torch.Tensor, ys: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check_widths(xs.shape[1], ys.shape[1])
        return {"R": _polar(_lstsq(xs, ys, self.ridge))}

    def _apply_map(self, xs: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return xs @ state["R"]


class Affine(Translator):
    """Least squares with an explicit bias: Y ~ Xs W + b (b unpenalised).

    Defaults to no centring or scaling so that the bias is learned rather than absorbed by centring;
    with ``center=True`` it coincides with :class:`LeastSquares` and b is 0.
    """

    _map_keys = ("W", "b")

    def __init__(self, center: bool = False, scale: bool | str = False, ridge: float = 0.0) -> None:
        super().__init__(center=center, scale=scale, allow_padding=True)
        if ridge < 0:
            raise InputError(f"ridge must be >= 0, got {ridge}")
        self.ridge = float(ridge)

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments, JSON-serialisable."""
        return {"center": self.center, "scale": self.scale, "ridge": self.ridge}

    def _fit_map(self, xs: torch.Tensor, ys: torch.Tensor) -> dict[str, torch.Tensor]:
        # An unpenalised intercept is least squares on centred data plus the mean residual.
        mx = xs.mean(dim=0)
        my = ys.mean(dim=0)
        w = _lstsq(xs - mx, ys - my, self.ridge)
        return {"W": w, "b": my - mx @ w}

    def _apply_map(self, xs: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return xs @ state["W"] + state["b"]


class OTTranslator(Translator):
    """Optimal-transport map between feature dimensions (units) of A and B, fitted on parallel anchors.

    Design: each unit is a point described by its activations over the anchors. The cost between unit
    i of A and unit j of B is ``1 - corr(x_i, y_j)`` over the anchors (``cost="correlation"``) or the
    squared Euclidean distance of the normalised anchor columns divided by n (``cost="sqeuclidean"``).
    A transport plan T (d_A x d_B, uniform marginals) is solved exactly (POT ``emd``, ``reg=0``) or
    with entropic regularisation (``ot.sinkhorn``, ``reg>0``, on a cost divided by its maximum). The
    map sends each unit of B to the barycentre of the A units it receives mass from:
    ``M = T diag(1 / colsum(T))``, and ``Y_hat = Xs M`` in normalised units. With equal widths and
    ``reg=0`` the plan is a permutation, i.e. unit matching as in OT fusion. This suits spaces whose
    units correspond up to a (soft) permutation, such as two networks of one architecture; spaces
    related by a general rotation need :class:`Procrustes`.
    """

    _map_keys = ("M",)

    def __init__(
        self,
        center: bool = True,
        scale: bool | str = True,
        reg: float = 0.0,
        cost: str = "correlation",
        num_iter_max: int = 10_000_000,
    ) -> None:
        super().__init__(center=center, scale=scale, allow_padding=True)
        if reg < 0:
            raise InputError(f"reg must be >= 0, got {reg}")
        if cost not in ("correlation", "sqeuclidean"):
            raise InputError(f"cost must be 'correlation' or 'sqeuclidean', got {cost!r}")
        self.reg = float(reg)
        self.cost = cost
        self.num_iter_max = int(num_iter_max)
        self.plan_: torch.Tensor | None = None

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments, JSON-serialisable."""
        return {"center": self.center, "scale": self.scale, "reg": self.reg, "cost": self.cost, "num_iter_max": self.num_iter_max}

    def _cost(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        n = xs.shape[0]
        if self.cost == "sqeuclidean":
            return torch.cdist(xs.T, ys.T).pow(2) / n
        xc = xs - xs.mean(dim=0)
        yc = ys - ys.mean(dim=0)
        nx = xc.norm(dim=0)
        ny = yc.norm(dim=0)
        # A constant unit correlates with nothing: cost 1 (as for uncorrelated units), not NaN.
        corr = (xc.T @ yc) / torch.outer(nx, ny).clamp_min(torch.finfo(xs.dtype).tiny)
        corr = torch.where(torch.outer(nx > 0, ny > 0), corr, torch.zeros_like(corr))
        return 1.0 - corr.clamp(-1.0, 1.0)

    def _fit_map(self, xs: torch.Tensor, ys: torch.Tensor) -> dict[str, torch.Tensor]:
        import numpy as np
        import ot

        cost = self._cost(xs, ys).cpu()
        dx, dy = cost.shape
        a = np.full(dx, 1.0 / dx)
        b = np.full(dy, 1.0 / dy)
        c = cost.numpy()
        if self.reg == 0.0:
            plan, log = ot.emd(a, b, c, numItermax=self.num_iter_max, log=True)
            if log.get("warning"):
                logger.warning("OTTranslator: exact OT did not converge cleanly: %s", log["warning"])
        else:
            cmax = float(c.max()) if c.size else 1.0
            plan = ot.sinkhorn(a, b, c / (cmax if cmax > 0 else 1.0), self.reg, stopThr=1e-6, numItermax=10_000)
        t = torch.as_tensor(np.asarray(plan), dtype=_DTYPE)
        self.plan_ = t
        colsum = t.sum(dim=0, keepdim=True)
        m = t / colsum.clamp_min(torch.finfo(_DTYPE).tiny)
        return {"M": m.to(xs.device)}

    def _apply_map(self, xs: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return xs @ state["M"]


TRANSLATORS: dict[str, type[Translator]] = {
    cls.__name__: cls for cls in (Procrustes, LeastSquares, OrthogonalizedLeastSquares, Affine, OTTranslator)
}


def load_translator(path: str | os.PathLike[str]) -> Translator:
    """Load any translator saved with ``Translator.save``."""
    return Translator.load(path)
