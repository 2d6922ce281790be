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

A general linear map commutes with linear layers but not with a norm, an embedding lookup, or a nonlinearity's
pre-activation/post-activation split beyond positive scaling: groups with such members (LayerNorm/BatchNorm
parameters) keep their units as they are. On transformers:

* MLP hidden units get a CCA map (through the GELU this is the paper's approximation, not a re-parametrisation);
* attention blocks are mapped where a linear map is exact. Heads are paired whole first, by the summed canonical
  correlations of their outputs (the per-head context vectors the output projection reads: a score no
  within-head map changes); then each head pair gets a V/O map T from CCA of those head outputs (V's rows and
  bias by T, O's columns by T^-T; attention weights act on the token axis only, so a head's output carries V's
  map unchanged) and a Q/K map T from CCA of the queries (Q's rows and bias by T, K's by T^-T, so every
  ``q . k`` is unchanged). GPT-2's fused c_attn takes one block-diagonal (Q, K, V) map on its output axis. The
  members' Q/K and V/O parts (:mod:`merge.spec`) say which layer or block is which; groups without them
  (traced attention whose sides the tracer could not tell apart) keep their heads as they are.
  Groups that keep each head's dimensions in order (RoPE: llama/mistral/qwen2; BERT's relative positions,
  whose distance embeddings meet q and k dimension by dimension) pair heads and map V/O only: a Q/K map would
  have to commute with the rotation. Under grouped-query attention V/O maps act per KV head, observed at V;
* the residual stream: LayerNorm centres and rescales each token over the stream's units, ``LN(x) = g * (x -
  mean(x)) / std(x) + b``. ``LN(x M) = LN(x) M`` needs M to fix the ones vector and preserve norms (an orthogonal
  M with ``M 1 = 1``) and to commute with the elementwise gain g, which only a permutation does (g and b then
  move with it) unless g is folded into the readers, impossible where the stream itself is the norm's output
  (post-LN BERT adds it to the residual). So ``residual: permute`` (the default) matches the stream by a
  permutation of its units' correlations, pooled over every norm's output on it (as activation matching's
  pooled features), and ``residual: keep`` leaves it as it is.

Every map on attention and the residual is exact: B aligned by them alone computes what B computed.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from suture.merge.activations import FeatureStats, collect_stats
from suture.merge.align.assignment import assign, assignment_score, solve_lap
from suture.merge.align.engines import AlignmentOptions, AlignRequest, Engine, register_engine
from suture.merge.align.transformer_match import SEP, _site, transformer_sites
from suture.merge.errors import AlignmentError
from suture.merge.graph.families_common import RESIDUAL
from suture.merge.graph.trace import Tap
from suture.merge.measure import Site
from suture.merge.spec import PermGroup, PermutationSpec, permute_state

logger = logging.getLogger(__name__)

DEFAULT_REG = 0.3  # digits demo pair, midpoint loss over the inputs' mean: 0.016 (reg 1), 0.019 (0.3), 0.025 (0.1), 0.031 (0.03)
_LINEAR_KINDS = ("Linear", "Conv1d", "Conv2d", "Conv3d", "Conv1D")  # Conv1D: transformers' GPT-2 layer
HOROI = ("Harmony in Diversity: Merging Neural Networks with Canonical Correlation Analysis (Horoi et al., ICML 2024)",
          "https://arxiv.org/abs/2407.05385")


@dataclass
class HeadMaps:
    """One attention group of B in the reference basis: whole heads paired (``perm``, an index vector as in
    :func:`merge.spec.permute_state`), then per head pair a block-diagonal ``vo`` map T (V rows, O columns by
    T^-T) and ``qk`` map (Q rows by T, K rows by T^-T; None where each head's dimensions must stay in order).
    ``parts`` says which of "q", "k", "v", "o" each member tensor is, one letter per block of a fused layer
    ("qkv" for GPT-2's c_attn)."""

    perm: torch.Tensor
    vo: tuple[torch.Tensor, torch.Tensor]  # (T, T^-1), block-diagonal in A's head order
    qk: tuple[torch.Tensor, torch.Tensor] | None
    parts: dict[str, str]

    def matrix(self, part: str) -> torch.Tensor:
        """The (n, n) map of one part for :func:`merge.align.ot.map_axis`: B's heads in A's order, then the
        head pair's map (``new[j] = sum_i M[i, j] old[i]``; a reader's columns take T^-T, as any group's)."""
        if len(part) > 1:  # a fused layer: one block-diagonal map over its blocks, in their order
            return torch.block_diag(*(self.matrix(p) for p in part))
        n = self.perm.numel()
        pick = torch.eye(n, dtype=torch.float64)[:, self.perm]  # pick[i, j] = 1 where B's unit i moves to j
        maps = {"v": self.vo[0], "o": self.vo[1].T}
        if self.qk is not None:
            maps.update(q=self.qk[0], k=self.qk[1].T)
        return pick @ maps[part] if part in maps else pick


@dataclass
class CCAResult:
    """Per-group maps of model B onto the reference basis: ``out_maps`` (T) for the layers writing a group,
    ``in_maps`` (T^-T) for those reading it (identity for groups left as they are), ``heads`` for attention
    groups (their out/in maps stay identity), and figures for reports."""

    out_maps: dict[str, torch.Tensor]
    in_maps: dict[str, torch.Tensor]
    heads: dict[str, HeadMaps] = field(default_factory=dict)
    perms: dict[str, torch.Tensor] = field(default_factory=dict)
    correlations: dict[str, torch.Tensor] = field(default_factory=dict)
    permuted_corr: dict[str, float] = field(default_factory=dict)  # mean correlation of the matched units
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
            **({"permuted": {g: round(float(c), 6) for g, c in self.permuted_corr.items()}} if self.perms else {}),
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
    return cca_from_cov(stats.a.cov(), stats.side("b").cov(), stats.cross_cov(), reg)


def cca_from_cov(cov_a: torch.Tensor, cov_b: torch.Tensor, cross: torch.Tensor,
                 reg: float = DEFAULT_REG) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`cca_maps` from the covariances themselves (A's, B's and ``cov(A_i, B_j)``), e.g. one head's block."""
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


def attention_parts(group: PermGroup, module: nn.Module) -> dict[str, str] | str:
    """member tensor -> "q", "k", "v" or "o" (one letter per block of a fused layer: "qkv" for GPT-2's c_attn)
    for an attention group, or why it cannot be mapped.

    The members' parts (:mod:`merge.spec`) say which side each block is on: V/O blocks that write the heads are
    V, the V/O reader is O, so member order does not matter. Only Q and K, both Q/K, are told apart by order
    (the first Q/K block is taken as Q), and either way is exact: Q's rows take T and K's T^-T for the same T,
    which keeps every ``q . k``; the order only picks whose features estimate T. A group without parts (the
    trace could not tell the sides apart, or Q/K and V/O share one order) keeps its heads as they are: separate
    maps per side would not preserve its function.
    """
    if not group.split:
        return "its members do not say which are Q/K and which V/O, so no map per side is known to be exact"
    modules = dict(module.named_modules())
    letters: dict[str, str] = {}  # owner layer -> its letters
    first: dict[str, tuple] = {}  # owner layer -> role and parts of its first member
    owner_of: dict[str, str] = {}
    queries = iter("qk")
    for m in group.members:
        owner = m.tensor.rsplit(".", 1)[0]
        if type(modules.get(owner)).__name__ not in _LINEAR_KINDS:
            return f"{m.tensor} does not belong to a linear layer"
        if m.inner != 1:
            return f"{m.tensor} has a layout ({m.layout()}) no attention map knows"
        owner_of[m.tensor] = owner
        if owner in letters:  # a bias after its weight: the same blocks
            if first[owner] != (m.role, m.parts):
                return f"{m.tensor} is laid out unlike the rest of {owner}"
            continue
        first[owner] = (m.role, m.parts)
        if m.role == "in":
            letters[owner] = "o" if m.parts == ("vo",) else "?"
        else:
            letters[owner] = "".join("v" if p == "vo" else next(queries, "?") for p in m.parts)
    found = sorted("".join(letters.values()))
    if found != sorted("qkvo"):
        return f"expected one Q, K and V block and one output projection, found {dict(letters)}"
    return {tensor: letters[owner] for tensor, owner in owner_of.items()}


def _head_sites(group: PermGroup, parts: Mapping[str, str]) -> dict[str, list[Site]]:
    """Where an attention group's features are read: queries (Q's output) for the Q/K map, and the head
    outputs (O's input) for the head pairing and the V/O map, or the values where O reads grouped-query
    repeats of them (the values carry the same linear map: attention weights act on the token axis only)."""
    n, label = group.size, f"group {group.name!r}"
    members = {m.tensor: m for m in group.members}
    at = {letter: (t.rsplit(".", 1)[0], i, len(word), members[t].repeat)
          for t, word in parts.items() if t.endswith(".weight") for i, letter in enumerate(word)}

    def output(letter: str) -> Site:  # one block of a fused layer's output
        owner, i, blocks, _ = at[letter]
        return _site(owner, "output", label, i * n, n) if blocks > 1 else _site(owner, "output", label)

    sites: dict[str, list[Site]] = {}
    if at["q"][3] == 1:
        sites["q"] = [output("q")]
    sites["vo"] = [_site(at["o"][0], "input", label)] if at["o"][3] == 1 else [output("v")]
    return sites


def _block(cov: torch.Tensor, i: int, j: int, d: int) -> torch.Tensor:
    return cov[i * d:(i + 1) * d, j * d:(j + 1) * d]


def head_maps(group: PermGroup, parts: dict[str, str], vo: FeatureStats, q: FeatureStats | None,
              reg: float) -> tuple[HeadMaps, torch.Tensor]:
    """Pair B's heads with A's by the summed canonical correlations of their head outputs (a score no
    within-head linear map changes), then CCA within each pair: the head outputs give the V/O map, the
    queries the Q/K map (None without query features or where the group allows whole heads only)."""
    d = group.head_dim
    if not d or group.size % d:
        raise AlignmentError(f"attention group {group.name!r} has no head size dividing its {group.size} units")
    heads = group.size // d
    cov_a, cov_b, cross = vo.a.cov(), vo.side("b").cov(), vo.cross_cov()
    pairs = {(h, g): cca_from_cov(_block(cov_a, h, h, d), _block(cov_b, g, g, d), _block(cross, h, g, d), reg)
             for h in range(heads) for g in range(heads)}
    scores = torch.tensor([[float(pairs[h, g][2].sum()) for g in range(heads)] for h in range(heads)])
    order = solve_lap(scores).tolist()  # A's head h takes B's head order[h]
    perm = torch.cat([g * d + torch.arange(d) for g in order])
    rho = [pairs[h, g][2] for h, g in enumerate(order)]
    vo_maps = (torch.block_diag(*(pairs[h, g][0] for h, g in enumerate(order))),
               torch.block_diag(*(pairs[h, g][1] for h, g in enumerate(order))))
    qk_maps = None
    if q is not None and group.kind == "heads_within":
        qa, qb, qx = q.a.cov(), q.side("b").cov(), q.cross_cov()
        blocks = [cca_from_cov(_block(qa, h, h, d), _block(qb, g, g, d), _block(qx, h, g, d), reg) for h, g in enumerate(order)]
        qk_maps = (torch.block_diag(*(b[0] for b in blocks)), torch.block_diag(*(b[1] for b in blocks)))
        rho += [b[2] for b in blocks]
    return HeadMaps(perm, vo_maps, qk_maps, parts), torch.cat(rho)


def cca_align(
    spec: PermutationSpec,
    module_a: nn.Module,
    module_b: nn.Module,
    batches: Iterable[Any],
    taps: Mapping[str, Sequence[Tap]],
    *,
    reg: float = DEFAULT_REG,
    device: str | torch.device = "cpu",
    permute: Mapping[str, Sequence[Site]] | None = None,
) -> CCAResult:
    """CCA maps of B's groups onto A's from features on the same calibration batches (identity where a group
    cannot be mixed linearly or is not observed). Groups in `permute` (e.g. a transformer's residual stream,
    observed at its norms' outputs) are matched by a permutation of their units' correlations instead, which
    commutes with norms where a general linear map does not."""
    start = time.perf_counter()
    groups, skipped = linear_groups(spec, module_a)
    wanted: dict[str, list[Tap | Site]] = {g.name: list(taps[g.name]) for g in groups if taps.get(g.name)}
    for g in groups:
        if g.name not in wanted:
            skipped[g.name] = "no module input or output carries this group"
    permute = {k: list(v) for k, v in (permute or {}).items() if k in spec.groups and not spec.groups[k].frozen and v}
    for name, sites in permute.items():
        skipped.pop(name, None)
        wanted[f"{name}{SEP}perm"] = sites
    attention: dict[str, dict[str, str]] = {}
    for g in spec.active_groups():
        if g.kind == "free" or g.name in permute:
            continue
        parts = attention_parts(g, module_a)
        if isinstance(parts, str):
            skipped[g.name] = parts
            continue
        skipped.pop(g.name, None)
        attention[g.name] = parts
        wanted.update({f"{g.name}{SEP}{role}": s for role, s in _head_sites(g, parts).items()})
    if not wanted:
        raise AlignmentError("CCA found no group it can align: every group touches a norm or an unobserved layer "
                             f"({'; '.join(f'{k}: {v}' for k, v in list(skipped.items())[:3])})")
    stats = collect_stats(module_a, wanted, batches, model_b=module_b, device=device, self_stats=True)
    result = CCAResult(out_maps={}, in_maps={}, skipped=skipped, reg=reg)
    for g in spec:
        eye = torch.eye(g.size, dtype=torch.float64)
        st = stats.get(g.name)
        if g.name in permute:
            result.out_maps[g.name], result.in_maps[g.name] = eye, eye
            st = stats.get(f"{g.name}{SEP}perm")
            if st is None or st.n != g.size:
                raise AlignmentError(f"group {g.name!r} has {g.size} units but its sites show "
                                     f"{'no' if st is None else st.n} features")
            corr = st.cross_corr().float().cpu()
            result.perms[g.name] = assign(corr, g.kind, g.head_dim)
            result.permuted_corr[g.name] = assignment_score(corr, result.perms[g.name]) / g.size
            continue
        if g.name in attention:
            result.out_maps[g.name], result.in_maps[g.name] = eye, eye
            vo = stats.get(f"{g.name}{SEP}vo")
            if vo is None:
                result.skipped[g.name] = "no features were captured"
                continue
            for key in (f"{g.name}{SEP}vo", f"{g.name}{SEP}q"):
                if key in stats and stats[key].n != g.size:
                    raise AlignmentError(f"group {g.name!r} has {g.size} units but its taps show {stats[key].n} features")
            maps, rho = head_maps(g, attention[g.name], vo, stats.get(f"{g.name}{SEP}q"), reg)
            result.heads[g.name], result.correlations[g.name] = maps, rho.cpu()
            continue
        if st is None:
            if g.name in wanted:
                result.skipped[g.name] = "no features were captured"
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
    """Model B's tensors in the reference basis: rows (and biases) of a group's writers by T, its readers' columns
    by T^-T; attention members by their head pairing and their part's map (:meth:`HeadMaps.matrix`)."""
    from suture.merge.align.ot import map_axis, transport_state

    plain = PermutationSpec({k: g for k, g in spec.groups.items() if k not in result.heads and k not in result.perms},
                            spec.family)
    out = transport_state(plain, plain, state_b, result)  # the same per-axis maps OT fusion applies
    # permutations act on other axes than the maps (a group owns its axes), so the order does not matter
    out = permute_state(out, spec, result.perms)
    for name, maps in result.heads.items():
        group = spec.groups[name]
        matrices = {part: maps.matrix(part) for part in set(maps.parts.values())}
        for m in group.members:
            part = maps.parts[m.tensor]
            member = dataclasses.replace(m, outer=1) if len(part) > 1 else m  # one block-diagonal map over Q, K, V
            out[m.tensor] = map_axis(out[m.tensor], member, group.head_dim, matrices[part])
    return out


# ---------------------------------------------------------------------------------------------- engine


class CCAOptions(AlignmentOptions):
    """`alignment: {engine: cca, data, reg, ...}`."""

    engine: Literal["cca"] = "cca"
    reg: float = Field(DEFAULT_REG, gt=0, le=100, title="Regularisation",
                       description="Added to each covariance's diagonal, relative to the mean unit variance: keeps "
                                   "constant units and small calibration sets from making CCA ill-posed. Small values "
                                   "follow the correlations closely (and undo an exact linear re-parametrisation); large "
                                   "ones tend to an orthogonal map between the centred features.")
    residual: Literal["permute", "keep"] = Field(
        "permute", title="Residual stream",
        description="Transformers models: 'permute' matches the residual stream by a permutation of its units, "
                    "correlated over the outputs of every norm on it (a linear map would not commute with the "
                    "LayerNorms); 'keep' leaves it as it is.")


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
    permute: dict[str, list[Site]] = {}
    if isinstance(arch, HFArchitecture):
        taps = reader_taps(spec, module_a)  # transformers models are not traced
        if request.options.residual == "permute":
            stream = transformer_sites(spec, module_a).get(RESIDUAL, {}).get("stream")
            permute = {RESIDUAL: stream} if stream else {}
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
                           device=request.device, permute=permute)
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
