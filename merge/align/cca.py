"""CCA Merge (Horoi et al., 2024, "Harmony in Diversity: Merging Neural Networks with Canonical Correlation
Analysis"): align model B to the reference A with a linear map per hidden layer instead of a permutation.

Both models see the same calibration data. For a group of hidden units with features ``X_A`` and ``X_B``
(samples x units), regularised CCA finds projections ``P_A``, ``P_B`` whose canonical variables ``X_A P_A`` and
``X_B P_B`` are maximally correlated. With ``S_AA``, ``S_BB`` the regularised covariances and
``S_AA^-1/2 S_AB S_BB^-1/2 = U diag(rho) V^T``: ``P_A = S_AA^-1/2 U``, ``P_B = S_BB^-1/2 V``, and

    T = P_B P_A^-1 = S_BB^-1/2 V U^T S_AA^1/2      (B's units -> A's units, X_B T ~ X_A)
    T^-1 = S_AA^-1/2 U V^T S_BB^1/2

B's layer writing the group is mapped by ``T`` (its rows become ``T^T W``: each A unit a linear combination of
B's units) and the layer reading it by ``T^-T`` (``W T^-T``), then the models are averaged by the recipe's merge
method. When B's features are an invertible linear function of A's (``X_B = X_A M``, e.g. permuted and
positively scaled ReLU units), ``T = M^-1`` exactly (without regularisation), so alignment undoes it.

A general linear map commutes with linear layers but not with a norm, an embedding lookup, a nonlinearity's
pre-activation/post-activation split beyond positive scaling, or attention heads: groups with such members
(LayerNorm/BatchNorm parameters, residual streams, attention heads, fused Q/K/V) keep their units as they are,
so on transformers only the MLP blocks' hidden units are aligned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from suture.merge.activations import FeatureStats, collect_stats
from suture.merge.align.engines import AlignmentOptions, AlignRequest, Engine, register_engine
from suture.merge.errors import AlignmentError
from suture.merge.graph.trace import Tap
from suture.merge.spec import PermGroup, PermutationSpec

logger = logging.getLogger(__name__)

DEFAULT_REG = 0.3  # digits demo pair, midpoint loss over the inputs' mean: 0.016 (reg 1), 0.019 (0.3), 0.025 (0.1), 0.031 (0.03)
_LINEAR_KINDS = ("Linear", "Conv1d", "Conv2d", "Conv3d", "Conv1D")  # Conv1D: transformers' GPT-2 layer
HOROI = ("Harmony in Diversity: Merging Neural Networks with Canonical Correlation Analysis (Horoi et al., ICML 2024)",
          "https://arxiv.org/abs/2407.05385")


@dataclass
class CCAResult:
    """Per-group maps of model B onto the reference basis: ``out_maps`` (T) for the layers writing a group,
    ``in_maps`` (T^-T) for those reading it (identity for groups left as they are), and figures for reports."""

    out_maps: dict[str, torch.Tensor]
    in_maps: dict[str, torch.Tensor]
    correlations: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    reg: float = DEFAULT_REG
    total_time: float = 0.0

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures: mean canonical correlation per aligned group, skipped groups, seconds."""
        return {
            "engine": ENGINE.name,
            "groups": len(self.correlations),
            "reg": self.reg,
            "mean_canonical_correlation": {g: round(float(c.mean()), 6) for g, c in self.correlations.items()},
            "total_time_s": round(self.total_time, 4),
            **({"skipped": dict(self.skipped)} if self.skipped else {}),
        }


def _inverse_and_root(cov: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cov^-1/2, cov^1/2) of a symmetric positive (semi)definite matrix from one eigendecomposition,
    eigenvalues floored at `floor`."""
    vals, vecs = torch.linalg.eigh((cov + cov.T) / 2)
    root = vals.clamp_min(floor).sqrt()
    return (vecs / root) @ vecs.T, (vecs * root) @ vecs.T


def cca_maps(stats: FeatureStats, reg: float = DEFAULT_REG) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(T, T^-1, canonical correlations) from one group's paired moments (float64); the correlations are
    those of the canonical variable pairs found, measured on the unregularised covariances.

    `reg` is relative: ``reg * mean unit variance`` is added to each side's covariance diagonal, so one value
    means the same at any activation scale and keeps constant (dead) units from making the covariance singular.
    """
    cov_a, cov_b, cross = stats.a.cov(), stats.side("b").cov(), stats.cross_cov()
    powers = []
    for cov in (cov_a, cov_b):
        lam = reg * max(float(cov.diagonal().clamp_min(0).mean()), 1e-30)
        ridge = cov + lam * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        powers.append(_inverse_and_root(ridge, lam / 2))
    (a_isqrt, a_sqrt), (b_isqrt, b_sqrt) = powers
    u, _, vh = torch.linalg.svd(a_isqrt @ cross @ b_isqrt)
    rotation = vh.T @ u.T  # V U^T, (n_b, n_a)
    t = b_isqrt @ rotation @ a_sqrt
    t_inv = a_isqrt @ rotation.T @ b_sqrt
    # the correlation each pair of canonical variables really has (the regularised values are shrunk)
    p_a, p_b = a_isqrt @ u, b_isqrt @ vh.T
    var_a = ((cov_a @ p_a) * p_a).sum(0)
    var_b = ((cov_b @ p_b) * p_b).sum(0)
    k = min(p_a.shape[1], p_b.shape[1])
    num = ((cross @ p_b[:, :k]) * p_a[:, :k]).sum(0)
    den = (var_a[:k] * var_b[:k]).clamp_min(0).sqrt()
    rho = torch.where(den > 1e-12 * float(den.max().clamp_min(1e-300)), num / den.clamp_min(1e-300), torch.zeros_like(num))
    return t, t_inv, rho


def linear_groups(spec: PermutationSpec, module: nn.Module) -> tuple[list[PermGroup], dict[str, str]]:
    """The groups a linear map may mix (every member a Linear/Conv weight or bias or an embedding's output, plain
    layout), and why the others keep their units."""
    modules = dict(module.named_modules())
    ok: list[PermGroup] = []
    why: dict[str, str] = {}
    for g in spec.active_groups():
        if g.kind != "free":
            why[g.name] = f"{g.kind} group (attention heads): a linear map would mix heads"
            continue
        for m in g.members:
            owner = modules.get(m.tensor.rsplit(".", 1)[0])
            kind = type(owner).__name__ if owner is not None else "?"
            if m.outer != 1 or m.repeat != 1:
                why[g.name] = f"{m.tensor} is a fused or grouped layout"
                break
            if kind not in _LINEAR_KINDS and not (kind == "Embedding" and m.role == "out"):  # a lookup writes rows linearly
                why[g.name] = f"{m.tensor} belongs to a {kind}, which a linear map does not commute with"
                break
        else:
            ok.append(g)
    return ok, why


def reader_taps(spec: PermutationSpec, module: nn.Module) -> dict[str, list[Tap]]:
    """Each group observed at the input of a linear layer that reads it: after the nonlinearity, where a
    transformer MLP's hidden features span all their units (its pre-activations lie in the narrower residual
    stream's span, so CCA could not tell the units apart there)."""
    modules = dict(module.named_modules())
    taps: dict[str, list[Tap]] = {}
    for g in spec.active_groups():
        for m in g.members:
            owner_name = m.tensor.rsplit(".", 1)[0]
            owner = modules.get(owner_name)
            if m.role != "in" or m.outer != 1 or m.repeat != 1 or not m.tensor.endswith(".weight") or owner is None:
                continue
            reads = (isinstance(owner, nn.Linear) and m.axis % 2 == 1) or (type(owner).__name__ == "Conv1D" and m.axis % 2 == 0)
            if reads:
                taps[g.name] = [Tap(g.name, owner_name, "input", axis=-1)]
                break
    return taps


def cca_align(
    spec: PermutationSpec,
    module_a: nn.Module,
    module_b: nn.Module,
    batches: Iterable[Any],
    taps: Mapping[str, Sequence[Tap]],
    *,
    reg: float = DEFAULT_REG,
    device: str | torch.device = "cpu",
) -> CCAResult:
    """CCA maps of B's groups onto A's from features on the same calibration batches (identity where a group
    cannot be mixed linearly or is not observed)."""
    start = time.perf_counter()
    groups, skipped = linear_groups(spec, module_a)
    wanted = {g.name: list(taps[g.name]) for g in groups if taps.get(g.name)}
    for g in groups:
        if g.name not in wanted:
            skipped[g.name] = "no module input or output carries this group"
    if not wanted:
        raise AlignmentError("CCA found no group it can align: every group touches a norm, attention heads or an "
                             f"unobserved layer ({'; '.join(f'{k}: {v}' for k, v in list(skipped.items())[:3])})")
    stats = collect_stats(module_a, wanted, batches, model_b=module_b, device=device, self_stats=True)
    result = CCAResult(out_maps={}, in_maps={}, skipped=skipped, reg=reg)
    for g in spec:
        st = stats.get(g.name)
        if st is None:
            if g.name in wanted:
                result.skipped[g.name] = "no features were captured"
            eye = torch.eye(g.size, dtype=torch.float64)
            result.out_maps[g.name], result.in_maps[g.name] = eye, eye
            continue
        if st.n != g.size:
            raise AlignmentError(f"group {g.name!r} has {g.size} units but its taps show {st.n} features")
        t, t_inv, rho = cca_maps(st, reg)
        result.out_maps[g.name], result.in_maps[g.name] = t.cpu(), t_inv.T.contiguous().cpu()
        result.correlations[g.name] = rho.cpu()
    for name, why in result.skipped.items():
        logger.info("cca leaves group %r as it is: %s", name, why)
    result.total_time = time.perf_counter() - start
    return result


def cca_state(spec: PermutationSpec, state_b: Mapping[str, torch.Tensor] | Any, result: CCAResult) -> dict[str, torch.Tensor]:
    """Model B's tensors in the reference basis: rows (and biases) of a group's writers by T, its readers' columns by T^-T."""
    from suture.merge.align.ot import transport_state

    return transport_state(spec, spec, state_b, result)  # the same per-axis maps OT fusion applies


# ---------------------------------------------------------------------------------------------- engine


class CCAOptions(AlignmentOptions):
    """`alignment: {engine: cca, data, reg, ...}`."""

    engine: Literal["cca"] = "cca"
    reg: float = Field(DEFAULT_REG, gt=0, le=100, title="Regularisation",
                       description="Added to each covariance's diagonal, relative to the mean unit variance: keeps "
                                   "constant units and small calibration sets from making CCA ill-posed. Small values "
                                   "follow the correlations closely (and undo an exact linear re-parametrisation); large "
                                   "ones tend to an orthogonal map between the centred features.")


def _align(request: AlignRequest):
    from suture.merge.align.pipeline import AlignmentOutcome, _check_same_shapes
    from suture.merge.data import iter_batches
    from suture.merge.derive import derive_spec, load_module
    from suture.merge.graph.trace import trace_module
    from suture.merge.hf_module import HFArchitecture
    from suture.merge.store import DictStore

    stores, reference, progress = request.stores, request.reference, request.progress
    if request.data is None:
        raise AlignmentError("CCA needs calibration data (e.g. sklearn:digits)", field=("data",))
    _check_same_shapes(stores, reference)
    ref_store = stores[reference]
    spec, arch = derive_spec(ref_store, architecture=request.architecture, data=request.data,
                             input_shape=request.options.input_shape, trust_remote_code=request.trust_remote_code)
    if arch is None:
        raise AlignmentError("CCA runs the models: it needs a runnable architecture (a package.module:factory, or a model "
                             "saved by Suture's zoo)", field=("architecture",))
    module_a = load_module(ref_store, arch)
    if isinstance(arch, HFArchitecture):
        taps = reader_taps(spec, module_a)  # transformers models are not traced
    else:
        first, _ = next(iter_batches(request.data, 2))
        if isinstance(first, Mapping):
            raise AlignmentError("CCA traces the reference to find its hidden layers, which keyword (token) inputs do "
                                 "not allow outside transformers models")
        taps = trace_module(module_a, first).taps
    outcome = AlignmentOutcome(reference, spec, {reference: ref_store}, architecture=arch, engine=ENGINE.name,
                               kind="transported")
    others = [k for k in stores if k != reference]
    for i, key in enumerate(others):
        if progress:
            progress("align", i, len(others), key)
        batches = (x for x, _ in iter_batches(request.data, request.options.batch_size))
        result = cca_align(spec, module_a, load_module(stores[key], arch), batches, taps, reg=request.options.reg,
                           device=request.device)
        state = cca_state(spec, stores[key], result)
        outcome.stores[key] = DictStore(state, source=f"{stores[key].source} (CCA-aligned)", config=ref_store.config)
        outcome.results[key] = result
        logger.info("aligned %s to %s by CCA: %s", key, reference, result.summary())
    if progress:
        progress("align", len(others), len(others), "")
    return outcome


ENGINE = register_engine(Engine(
    name="cca", title="CCA Merge (linear maps)",
    description="alignment by linear maps from canonical correlation analysis of activations",
    papers=(HOROI,), options=CCAOptions, align=_align, outcome="transported", needs_data=True, needs_module=True,
    aliases=("cca_merge",),
))
