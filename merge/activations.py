"""Capture hidden features with forward hooks and keep running statistics instead of the features.

A :class:`~merge.graph.trace.Tap` names a module whose input or output carries a permutation group along
one axis. For every group, :func:`collect_stats` runs the calibration batches through one model (or two,
batch by batch in lock step) and accumulates sums from which means, variances, the cross-covariance and
cross-correlation between the two models' units, and optionally each model's own (self-)correlation are
computed. Memory stays at one batch of features plus ``O(n^2)`` per group, however much data is used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from suture.merge.errors import InputError
from suture.merge.graph.trace import Tap, trace_module

logger = logging.getLogger(__name__)


def group_taps(module: nn.Module, example_input: torch.Tensor | tuple, *, prefix: str = "") -> dict[str, list[Tap]]:
    """Map each traced spec group to the module inputs/outputs that carry it (group names as in the spec)."""
    return trace_module(module, example_input, prefix=prefix).taps


def unit_features(x: torch.Tensor, axis: int, inner: int = 1) -> torch.Tensor:
    """Rows = samples, columns = hidden units: every other position (batch, tokens, pixels, inner) is a sample."""
    x = torch.movedim(x, axis, -1)
    x = x.reshape(*x.shape[:-1], x.shape[-1] // inner, inner)
    x = torch.movedim(x, -2, -1)
    return x.reshape(-1, x.shape[-1])


@dataclass
class FeatureStats:
    """Running sums over the samples of one group's units in model A and, optionally, model B."""

    n: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float64
    paired: bool = True
    self_stats: bool = False
    count: int = 0

    def __post_init__(self) -> None:
        z = lambda *s: torch.zeros(*s, dtype=self.dtype, device=self.device)  # noqa: E731
        self.sum_a, self.sq_a = z(self.n), z(self.n)
        self.sum_b, self.sq_b = (z(self.n), z(self.n)) if self.paired else (None, None)
        self.cross = z(self.n, self.n) if self.paired else None
        self.gram_a = z(self.n, self.n) if self.self_stats else None
        self.gram_b = z(self.n, self.n) if self.self_stats and self.paired else None

    def update(self, xa: torch.Tensor, xb: torch.Tensor | None = None) -> None:
        """Add a block of samples (rows) for A's units and, when paired, the same samples for B's units."""
        xa = xa.to(self.device, self.dtype)
        if xa.shape[1] != self.n:
            raise InputError(f"features have {xa.shape[1]} units, expected {self.n}")
        self.count += xa.shape[0]
        self.sum_a += xa.sum(0)
        self.sq_a += xa.pow(2).sum(0)
        if self.gram_a is not None:
            self.gram_a += xa.T @ xa
        if self.paired:
            if xb is None or xb.shape != xa.shape:
                raise InputError(f"model B features {None if xb is None else tuple(xb.shape)} do not match A's {tuple(xa.shape)}")
            xb = xb.to(self.device, self.dtype)
            self.sum_b += xb.sum(0)
            self.sq_b += xb.pow(2).sum(0)
            self.cross += xa.T @ xb
            if self.gram_b is not None:
                self.gram_b += xb.T @ xb

    def _need(self, value: torch.Tensor | None, what: str) -> torch.Tensor:
        if self.count == 0:
            raise InputError("no calibration samples were seen")
        if value is None:
            raise InputError(f"{what} was not collected (paired={self.paired}, self_stats={self.self_stats})")
        return value

    @property
    def mean_a(self) -> torch.Tensor:
        return self._need(self.sum_a, "mean of A") / self.count

    @property
    def mean_b(self) -> torch.Tensor:
        return self._need(self.sum_b, "mean of B") / self.count

    @property
    def var_a(self) -> torch.Tensor:
        return (self.sq_a / self.count - self.mean_a.pow(2)).clamp_min(0)

    @property
    def var_b(self) -> torch.Tensor:
        return (self._need(self.sq_b, "variance of B") / self.count - self.mean_b.pow(2)).clamp_min(0)

    @property
    def std_a(self) -> torch.Tensor:
        return self.var_a.sqrt()

    @property
    def std_b(self) -> torch.Tensor:
        return self.var_b.sqrt()

    def cross_cov(self) -> torch.Tensor:
        """cov(A_i, B_j), (n, n)."""
        return self._need(self.cross, "cross-covariance") / self.count - torch.outer(self.mean_a, self.mean_b)

    def constant_a(self) -> torch.Tensor:
        """Units of A that never vary on the data (dead ReLUs, saturated units): bool mask."""
        return _constant(self.std_a, self.mean_a)

    def constant_b(self) -> torch.Tensor:
        """Units of B that never vary on the data: bool mask."""
        return _constant(self.std_b, self.mean_b)

    def cross_corr(self, eps: float = 1e-12) -> torch.Tensor:
        """Pearson correlation of A's unit i with B's unit j; constant (dead) units correlate exactly 0."""
        corr = self.cross_cov() / (torch.outer(self.std_a, self.std_b) + eps)
        # rounding noise over a near-zero std would otherwise show up as large spurious correlations
        corr[self.constant_a()] = 0.0
        corr[:, self.constant_b()] = 0.0
        return corr

    def self_cov(self, which: str = "a") -> torch.Tensor:
        """cov(X_i, X_j) within model A or B."""
        gram = self._need(self.gram_a if which == "a" else self.gram_b, f"self-covariance of {which.upper()}")
        mean = self.mean_a if which == "a" else self.mean_b
        return gram / self.count - torch.outer(mean, mean)

    def self_corr(self, which: str = "a", eps: float = 1e-12) -> torch.Tensor:
        """Correlation between the units of one model (constant units: 0, also on the diagonal)."""
        std = self.std_a if which == "a" else self.std_b
        corr = self.self_cov(which) / (torch.outer(std, std) + eps)
        const = self.constant_a() if which == "a" else self.constant_b()
        corr[const] = 0.0
        corr[:, const] = 0.0
        return corr

    def joint_corr(self, eps: float = 1e-12) -> torch.Tensor:
        """(2n, 2n) correlation of A's and B's units stacked [A; B], as ZipIt matches within and across."""
        top = torch.cat([self.self_corr("a", eps), self.cross_corr(eps)], dim=1)
        bottom = torch.cat([self.cross_corr(eps).T, self.self_corr("b", eps)], dim=1)
        return torch.cat([top, bottom], dim=0)


def _constant(std: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    # float64 sums leave a std of about 1e-8 * |mean| on a constant unit
    return std <= 1e-6 * mean.abs() + 1e-12


def batch_inputs(batch: Any) -> tuple[tuple, dict]:
    """Positional and keyword model inputs of a calibration batch (tensor, (inputs, labels), or dict)."""
    # (inputs, labels) pairs from a DataLoader feed only the inputs; a dict is keyword arguments (HF style)
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return (batch[0],), {}
    raise InputError(f"cannot feed a calibration batch of type {type(batch).__name__}; pass input_fn")


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextmanager
def _recording(model: nn.Module, taps: Mapping[str, Sequence[Tap]]) -> Iterator[dict[tuple[str, int], torch.Tensor]]:
    """Forward hooks that store the latest features of every tap, keyed by (group, tap index)."""
    store: dict[tuple[str, int], torch.Tensor] = {}
    handles = []

    def make(key: tuple[str, int], tap: Tap) -> Callable:
        def grab(tensor: Any) -> None:
            if not isinstance(tensor, torch.Tensor):
                raise InputError(f"tap {tap.module!r} ({tap.where}) did not see a tensor")
            store[key] = unit_features(tensor.detach(), tap.axis, tap.inner)

        if tap.where == "input":
            return lambda _m, args, kwargs=None: grab(args[0] if args else None)
        return lambda _m, _args, out: grab(out)

    try:
        for group, group_taps_ in taps.items():
            for i, tap in enumerate(group_taps_):
                try:
                    mod = model.get_submodule(tap.module)
                except AttributeError as exc:
                    raise InputError(f"group {group!r}: the model has no module {tap.module!r} to observe") from exc
                hook = make((group, i), tap)
                handles.append(mod.register_forward_pre_hook(hook) if tap.where == "input" else mod.register_forward_hook(hook))
        yield store
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _eval_mode(*models: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, mode in modes:
            m.train(mode)


def collect_stats(
    model_a: nn.Module,
    taps: Mapping[str, Sequence[Tap]],
    batches: Iterable[Any],
    *,
    model_b: nn.Module | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    self_stats: bool = False,
    max_batches: int | None = None,
    input_fn: Callable[[Any], tuple[tuple, dict]] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, FeatureStats]:
    """Run calibration batches through model A (and B) in eval mode; return per-group feature statistics."""
    dev = torch.device(device)
    feed = input_fn or batch_inputs
    stats: dict[str, FeatureStats] = {}
    models = (model_a,) if model_b is None else (model_a, model_b)
    seen = 0
    with _eval_mode(*models), torch.no_grad(), _recording(model_a, taps) as rec_a:
        with _recording(model_b, taps) if model_b is not None else _null() as rec_b:
            for batch in batches:
                if max_batches is not None and seen >= max_batches:
                    break
                args, kwargs = feed(batch)
                rec_a.clear()
                model_a(*_to(args, _model_device(model_a)), **_to(kwargs, _model_device(model_a)))
                if model_b is not None:
                    rec_b.clear()
                    model_b(*_to(args, _model_device(model_b)), **_to(kwargs, _model_device(model_b)))
                for (group, i), xa in rec_a.items():
                    xb = rec_b.get((group, i)) if model_b is not None else None
                    if group not in stats:
                        stats[group] = FeatureStats(xa.shape[1], dev, dtype, paired=model_b is not None, self_stats=self_stats)
                    stats[group].update(xa, xb)
                seen += 1
                if progress is not None:
                    progress(seen)
    if seen == 0:
        raise InputError("no calibration batches were given")
    missing = [g for g in taps if g not in stats]
    if missing:
        logger.warning("no features were captured for %d groups, e.g. %r (were their modules run?)", len(missing), missing[0])
    return stats


@contextmanager
def _null() -> Iterator[dict]:
    yield {}
