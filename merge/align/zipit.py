"""ZipIt! engine (Stoica et al., ICLR 2024): zip k models of one architecture into one, fully or partially.

For every zipped permutation group the calibration features of all models are stacked (k*n units), their
correlation is accumulated batch by batch, and a matcher (:mod:`merge.align.zipit_match`) clusters the stacked
units into n merged units, giving a merge matrix ``M`` (n, k*n) and an unmerge matrix ``U`` (k*n, n).
The zipped model is the k models side by side (block-diagonal weights) with ``M`` applied on every "out"
member of a group and ``U`` on every "in" member: for a tensor ``T_m`` of model m,
``T = sum_m M[:, m] . T_m . U[m, :]`` along its out and in axes. Norms and residual streams need nothing
special: they are members of the group they normalise or carry.

Partial zipping (``stop_at``) zips the groups up to and including the named one (in graph order, closed so
that no zipped layer reads an unzipped group) and keeps every later tensor per model, with ``U`` folded into
the first per-model layer's inputs. The result is a :class:`merge.multihead.MultiHeadModel`: one shared
trunk and one branch per model whose outputs are concatenated (``heads="concat"``, per-task logits as in
the paper) or averaged (``heads="average"``). Tensors with no output-side group (a classifier's head) stay
per model under ``heads="concat"``; under ``heads="average"`` a full zip averages them too and yields one
ordinary model of the input architecture. BatchNorm statistics are recomputed on the calibration data
after zipping, since averaged units no longer have the recorded statistics.

Branch inputs (``unmerge``). ``"lstsq"`` (the default) feeds each branch through the least-squares unmerge
(:func:`lstsq_unmerge`): the linear map from the merged features back to that model's own features that
best reconstructs them on the calibration data. The paper's 0/1 copy ``U`` (``"copy"``) hands every unit
its cluster's average and loses more where dissimilar units were merged. ``"fit"`` fits the map on the
zipped trunk's actual output after its BatchNorm reset (one more pass over the data). Inside the trunk
``U`` is always the copy, so a full zip is the same under every choice.

Head scales (``match_head_scale``, off by default). Measured on digits 0-4 / 5-9 ResNets: a branch behind
an early stop ranks its own classes about as well as its source model, but its logits' spread drifts
from the source's by a different factor for every branch (its BatchNorm-renormalised inputs mix in the
other model's features), so the concatenated heads' argmax hands inputs to the
sharper head and joint accuracy falls below the full zip's. ``match_head_scale=True`` rescales each
head's logits to the spread its source model's logits have on the calibration data
(:func:`match_head_scales`). It is a calibration choice: it leaves every head's ranking unchanged and
makes the heads comparable the way the source models are in an ensemble.

Transformers folders (Hugging Face config.json) are zipped by :mod:`merge.align.transformer_zip`: attention
heads zipped whole, the full zip written as one model of the reference's architecture.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from suture.merge.data import Inputs, inputs_to
from suture.merge.evaluate import model_logits
from suture.merge.errors import AlignmentError, InputError, OptionError
from suture.merge.graph.trace import Tap, trace_module
from suture.merge.measure import DeadUnits, RunningMoments, Site, capture, eval_mode, tap_site
from suture.merge.multihead import MultiHeadModel, save_multihead
from suture.merge.repair import as_input_batches, reset_batchnorm
from suture.merge.align.zipit_match import MATCHERS, ZipMatch, match
from suture.merge.spec import Member, PermGroup, PermutationSpec, axis_problem

logger = logging.getLogger(__name__)

Heads = Literal["concat", "average"]
Unmerge = Literal["copy", "lstsq", "fit"]


@dataclass
class ZipResult:
    """A zipped model and how it was made."""

    module: nn.Module  # MultiHeadModel, or one module of the input architecture (full zip, averaged heads)
    merges: dict[str, torch.Tensor]  # group -> M (n, k*n)
    unmerges: dict[str, torch.Tensor]  # group -> U (k*n, n) that the branches read through (the copy U on a full zip)
    zipped_groups: list[str]
    branch_groups: list[str]
    trunk: list[str]  # tensor names shared by every model (merged)
    heads: str
    state: dict[str, torch.Tensor] | None = None  # merged state dict when the result is a single model
    architectures: list[dict[str, Any]] | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def multihead(self) -> bool:
        """True when the result keeps per-model branches."""
        return isinstance(self.module, MultiHeadModel)

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures for reports (no tensors)."""
        return {
            "engine": ENGINE.name,
            "multihead": self.multihead,
            "heads": self.heads,
            "zipped_groups": list(self.zipped_groups),
            "branch_groups": list(self.branch_groups),
            "trunk_tensors": len(self.trunk),
            **self.stats,
        }


def zip_models(
    spec: PermutationSpec | None,
    modules: Sequence[nn.Module],
    batches: Any,
    *,
    alpha: float = 0.5,
    beta: float = 1.0,
    matcher: str = "zip",
    stop_at: str | None = None,
    heads: Heads = "concat",
    device: str | torch.device = "cpu",
    reset_bn: bool = True,
    max_batches: int | None = None,
    architectures: Sequence[Mapping[str, Any]] | None = None,
    batch_size: int = 256,
    progress: Callable[[str], None] | None = None,
    unmerge: Unmerge = "lstsq",
    match_head_scale: bool = False,
) -> ZipResult:
    """Zip k >= 2 models of one architecture on calibration batches; see the module docstring."""
    start = time.perf_counter()
    if len(modules) < 2:
        raise InputError(f"zipit needs at least two models, got {len(modules)}")
    if matcher not in MATCHERS:
        raise OptionError(("matcher",), f"{matcher!r}: expected one of {', '.join(MATCHERS)}")
    if heads not in ("concat", "average"):
        raise InputError(f"heads {heads!r}: expected 'concat' or 'average'")
    if unmerge not in ("copy", "lstsq", "fit"):
        raise InputError(f"unmerge {unmerge!r}: expected 'copy', 'lstsq' or 'fit'")
    dev = torch.device(device)
    data = as_input_batches(batches, batch_size)
    if max_batches is not None:
        data = data[:max_batches]
    if not isinstance(data[0], torch.Tensor):
        raise InputError("zipit calibration data must be tensor inputs (zipping token models is not supported)")
    traced = trace_module(modules[0], data[0])
    spec = spec or traced.spec
    states = [{k: v.detach() for k, v in m.state_dict().items()} for m in modules]
    _check_states(spec, states)
    zipped = _zipped_groups(spec, stop_at)
    branch_groups = [g.name for g in spec.active_groups() if g.name not in zipped]
    missing_taps = [g for g in zipped if g not in traced.taps]
    if missing_taps:
        raise AlignmentError(f"no place in the model shows the features of group(s) {missing_taps}; cannot zip them")
    logger.info("zipping %d groups (%s), %d kept per model", len(zipped), ", ".join(zipped), len(branch_groups))
    t0 = time.perf_counter()
    stacked = stacked_stats(modules, {g: traced.taps[g] for g in zipped}, data, device=dev)
    corrs = {g: st.corr() for g, st in stacked.items()}
    stats_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    matches: dict[str, ZipMatch] = {}
    for name in zipped:
        if progress is not None:
            progress(name)
        matches[name] = match(corrs[name], len(modules), matcher, alpha=alpha, beta=beta)
    match_s = time.perf_counter() - t0
    full = not branch_groups
    average_heads = heads == "average" and full
    branch_unmerges = None
    if unmerge == "lstsq" and branch_groups:
        branch_unmerges = {g: lstsq_unmerge(stacked[g].second_moment(), matches[g].merge) for g in zipped}
    trunk_state, branches = _zip_tensors(spec, states, matches, average_heads=average_heads, branch_unmerges=branch_unmerges)
    if average_heads:
        module = copy.deepcopy(modules[0])
        module.load_state_dict(trunk_state)
    else:
        members = []
        for m, mod in enumerate(modules):
            member = copy.deepcopy(mod)
            member.load_state_dict({**trunk_state, **branches[m]})
            members.append(member)
        module = MultiHeadModel(members, trunk=list(trunk_state), heads=heads)
    module.eval()
    if reset_bn and any(isinstance(m, _BatchNorm) for m in module.modules()):
        reset_batchnorm(module, data)
    if unmerge == "fit" and branch_groups:
        branch_unmerges = fitted_unmerges(modules, module.members[0], {g: traced.taps[g] for g in zipped}, data, device=dev)
        _, branches = _zip_tensors(spec, states, matches, average_heads=False, branch_unmerges=branch_unmerges)
        for m, member in enumerate(module.members):
            member.load_state_dict(branches[m], strict=False)
        if reset_bn and any(isinstance(m, _BatchNorm) for m in module.modules()):
            reset_batchnorm(module, data)
    head_scales = None
    if match_head_scale and isinstance(module, MultiHeadModel) and heads == "concat":
        head_scales = match_head_scales(module, modules, spec, data)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()} if average_heads else None
    group_stats = {
        name: {
            "size": spec.groups[name].size,
            "within_merges": mt.within_merges,
            "mean_similarity": None if math.isnan(mt.mean_similarity) else round(mt.mean_similarity, 6),
        }
        for name, mt in matches.items()
    }
    result = ZipResult(
        module=module,
        merges={k: v.merge for k, v in matches.items()},
        unmerges={k: (branch_unmerges or {}).get(k, v.unmerge) for k, v in matches.items()},
        zipped_groups=list(zipped),
        branch_groups=branch_groups,
        trunk=sorted(trunk_state),
        heads="average" if average_heads else heads,
        state=state,
        architectures=[dict(a) for a in architectures] if architectures is not None else None,
        stats={
            "matcher": matcher,
            "alpha": alpha,
            "beta": beta,
            "stop_at": stop_at,
            "unmerge": unmerge,
            "head_scales": head_scales,
            "models": len(modules),
            "groups": group_stats,
            "stats_time_s": round(stats_s, 4),
            "match_time_s": round(match_s, 4),
            "total_time_s": round(time.perf_counter() - start, 4),
        },
    )
    return result


def save_zip_result(result: ZipResult, out_dir: str | Path, architectures: Sequence[Mapping[str, Any]] | None = None, *, overwrite: bool = False) -> Path:
    """Write a zipped model: a multi-head folder (safetensors + multihead.json) or a plain model folder."""
    archs = list(architectures) if architectures is not None else result.architectures
    if not archs:
        raise InputError("saving a zipped model needs each model's architecture ({'factory': ..., 'kwargs': {...}})")
    if result.multihead:
        return save_multihead(result.module, out_dir, archs, extra={"zipit": result.summary()}, overwrite=overwrite)
    from suture.merge.zoo import save_module

    out = Path(out_dir)
    if out.exists() and not overwrite and any(out.iterdir()):
        raise InputError(f"{out}: output folder already exists and is not empty")
    arch = archs[0]
    return save_module(result.module, out, arch["factory"], arch.get("kwargs") or {}, extra_config={"suture_zipit": result.summary()})


# ----------------------------------------------------------------------------------------- groups
def _zipped_groups(spec: PermutationSpec, stop_at: str | None) -> list[str]:
    """Groups to zip, in spec (graph) order: all active ones, or those up to `stop_at`, closed under reading."""
    order = [g.name for g in spec]
    if stop_at is None:
        frozen = [g for g in spec if g.frozen]
        if frozen:
            raise AlignmentError(
                f"group {frozen[0].name!r} cannot be zipped ({frozen[0].frozen_reason}); set stop_at to a layer before it"
            )
        chosen = set(order)
    else:
        stop = resolve_stop(spec, stop_at)
        chosen = set(order[: order.index(stop) + 1])
    # a zipped layer must not read a group that stays per model: pull such groups into the zip
    axes = spec.axes_of()
    changed = True
    while changed:
        changed = False
        for slots in axes.values():
            outs = {g for g, m in slots.values() if m.role == "out"}
            if outs & chosen:
                for g, m in slots.values():
                    if m.role == "in" and g not in chosen:
                        chosen.add(g)
                        changed = True
                        logger.info("zipping group %r too: a zipped layer reads it", g)
    for name in order:
        group = spec.groups[name]
        if name in chosen:
            _check_zippable(group)
    return [n for n in order if n in chosen]


def stop_layers(spec: PermutationSpec) -> list[str]:
    """Group names in graph order: the values `stop_at` accepts, earliest first (for accuracy-vs-depth sweeps)."""
    return [g.name for g in spec if not g.frozen]


def resolve_stop(spec: PermutationSpec, stop_at: str) -> str:
    """The group named by `stop_at`: a group name, a module that produces a group, or one of its tensors."""
    if stop_at in spec.groups:
        return stop_at
    for group in spec:
        for m in group.members:
            if m.role == "out" and (m.tensor == stop_at or m.tensor.rsplit(".", 1)[0] == stop_at):
                return group.name
    raise OptionError(("stop_at",), f"{stop_at!r}: no such group or layer; expected one of {', '.join(spec.groups)}")


def _check_zippable(group: PermGroup) -> None:
    if group.frozen:
        raise AlignmentError(f"group {group.name!r} cannot be zipped ({group.frozen_reason}); stop_at a layer before it")
    if group.kind != "free" or any(m.repeat != 1 for m in group.members):
        raise AlignmentError(f"group {group.name!r} is structured ({group.kind}); zipping attention heads is not supported")


def _check_states(spec: PermutationSpec, states: Sequence[Mapping[str, torch.Tensor]]) -> None:
    names = set(states[0])
    for i, st in enumerate(states[1:], start=1):
        if set(st) != names:
            diff = sorted(names ^ set(st))
            raise AlignmentError(f"model {i} has different tensor names than model 0, e.g. {diff[:3]}")
    axes = spec.axes_of()
    for i, st in enumerate(states):
        for name, slots in axes.items():
            if name not in st:
                raise AlignmentError(f"spec tensor {name!r} is missing from model {i}")
            for group, member in slots.values():
                problem = axis_problem(spec.groups[group], member, st[name].shape)
                if problem:
                    raise AlignmentError(f"model {i}: {problem}")


# ----------------------------------------------------------------------------------------- features
# ZipIt judges a unit dead against the most varying unit of the stack, not against its own mean
ZIPIT_DEAD = DeadUnits(rel_mean=0.0, floor=1e-12, rel_peak=1e-12)


class _StackedStats(RunningMoments):
    """Running first and second moments of the stacked (k*n) features of one group."""

    def __init__(self, width: int, device: torch.device) -> None:
        super().__init__(width, gram=True, device=device)

    def corr(self, eps: float = 1e-12) -> torch.Tensor:  # type: ignore[override]
        # constant units (dead ReLUs) carry no signal: they match each other perfectly and nothing else,
        # so they are never averaged into a live unit
        return super().corr(eps, dead=ZIPIT_DEAD, dead_with_dead=1.0)


def stacked_correlations(
    modules: Sequence[nn.Module], taps: Mapping[str, Sequence[Tap]], batches: Iterable[Inputs], *, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Per group, the (k*n, k*n) correlation of all models' units stacked model by model, on calibration data."""
    return {g: st.corr() for g, st in stacked_stats(modules, taps, batches, device=device).items()}


def stacked_stats(
    modules: Sequence[nn.Module], taps: Mapping[str, Sequence[Tap]], batches: Iterable[Inputs], *, device: torch.device | str = "cpu"
) -> dict[str, _StackedStats]:
    """Per group, running first and second moments of all models' units stacked model by model."""
    return stacked_site_stats(modules, {g: [tap_site(tap) for tap in group_taps] for g, group_taps in taps.items()},
                              batches, device=device)


def stacked_site_stats(
    modules: Sequence[nn.Module], sites: Mapping[str, Sequence[Site]], batches: Iterable[Inputs], *, device: torch.device | str = "cpu"
) -> dict[str, _StackedStats]:
    """Per key, moments of all models' features stacked model by model; a key's sites are pooled (rows stacked)."""
    dev = torch.device(device)
    stats: dict[str, _StackedStats] = {}
    keyed = {(key, t): site for key, key_sites in sites.items() for t, site in enumerate(key_sites)}
    seen = 0
    with ExitStack() as stack:
        records = [stack.enter_context(capture(mod, keyed, error=AlignmentError)) for mod in modules]
        stack.enter_context(eval_mode(*modules))
        stack.enter_context(torch.no_grad())
        for inputs in batches:
            for mod, rec in zip(modules, records):
                rec.clear()
                x = inputs_to(inputs, next((p.device for p in mod.parameters()), torch.device("cpu")))
                mod(**x) if isinstance(x, Mapping) else mod(x)
            for key in records[0]:
                feats = [rec[key] for rec in records]
                if any(f.shape != feats[0].shape for f in feats):
                    raise AlignmentError(f"group {key[0]!r}: models produced features of different shapes")
                group = key[0]
                if group not in stats:
                    stats[group] = _StackedStats(feats[0].shape[1] * len(feats), dev)
                stats[group].update(torch.cat(feats, dim=1))
            seen += 1
    if seen == 0:
        raise InputError("no calibration batches were given")
    missing = [g for g in sites if g not in stats]
    if missing:
        raise AlignmentError(f"no features were captured for group(s) {missing}")
    return stats


def lstsq_unmerge(second_moment: torch.Tensor, merge: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """Least-squares unmerge U (k*n, n): the linear map from merged features z = M x back to x, fitted on data.

    Minimises E||x - U M x||^2 over the calibration features, so U = G M^T (M G M^T)^-1 with G = E[x x^T].
    The 0/1 copy unmerge hands every unit its cluster's average; this one also draws on the other merged
    units that carry the unit's signal, which matters where a narrow layer merged dissimilar units.
    """
    g = second_moment.to(torch.float64)
    m = merge.to(g.device, torch.float64)
    gm = g @ m.T  # (k*n, n)
    a = m @ gm  # (n, n)
    a = a + ridge * (float(a.diagonal().mean()) + 1e-12) * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    return torch.linalg.solve(a, gm.T).T.to(torch.float32).cpu()


def fitted_unmerges(
    modules: Sequence[nn.Module], zipped: nn.Module, taps: Mapping[str, Sequence[Tap]], batches: Sequence[Inputs], *,
    device: torch.device | str = "cpu", ridge: float = 1e-6,
) -> dict[str, torch.Tensor]:
    """Per group, U (k*n, n) fitted by least squares from the zipped trunk's actual features to each model's own."""
    stats = stacked_stats([*modules, zipped], taps, batches, device=device)
    out = {}
    for g, st in stats.items():
        gram = st.second_moment()
        kn = gram.shape[0] - gram.shape[0] // (len(modules) + 1)
        gxz, gzz = gram[:kn, kn:], gram[kn:, kn:]
        gzz = gzz + ridge * (float(gzz.diagonal().mean()) + 1e-12) * torch.eye(gzz.shape[0], dtype=gzz.dtype, device=gzz.device)
        out[g] = torch.linalg.solve(gzz, gxz.T).T.to(torch.float32).cpu()
    return out


# ----------------------------------------------------------------------------------------- heads
@torch.no_grad()
def match_head_scales(module: MultiHeadModel, sources: Sequence[nn.Module], spec: PermutationSpec, batches: Sequence[Inputs]) -> list[float]:
    """Scale every member's logits so their spread on the calibration data equals its source model's.

    Concatenated heads are compared by argmax, so a head whose logits came out flatter than its source's
    loses inputs to the other heads even when it ranks its own classes correctly. The factor
    ``std(source logits) / std(member logits)`` is folded into the member's output layer (its tensors
    with no output-side group, e.g. a classifier's weight and bias), which scales the logits exactly.
    This is a calibration choice, off by default: it equalises confidence, it does not restore features.
    """
    axes = spec.axes_of()
    heads = [n for n in module.branch_names(0) if not any(m.role == "out" for _, m in axes.get(n, {}).values())]
    heads = [n for n in heads if module.members[0].state_dict()[n].is_floating_point()]
    if not heads:
        raise AlignmentError("match_head_scale: no per-model output layer to scale (every branch tensor feeds a group)")
    member_logits: list[list[torch.Tensor]] = [[] for _ in sources]
    source_logits: list[list[torch.Tensor]] = [[] for _ in sources]
    for inputs in batches:
        for m, out in enumerate(module.member_outputs(inputs_to(inputs, next(module.parameters()).device))):
            member_logits[m].append(out.detach().double().cpu())
        for m, src in enumerate(sources):
            src.eval()
            x = inputs_to(inputs, next((p.device for p in src.parameters()), torch.device("cpu")))
            source_logits[m].append(model_logits(src(x)).detach().double().cpu())
    scales = []
    for m, member in enumerate(module.members):
        ratio = float(torch.cat(source_logits[m]).std() / torch.cat(member_logits[m]).std().clamp_min(1e-12))
        state = member.state_dict()  # shares storage with the parameters: scaling it scales them
        for name in heads:
            state[name].mul_(ratio)
        scales.append(round(ratio, 6))
    logger.info("head logit scales matched to the source models: %s", scales)
    return scales


# ----------------------------------------------------------------------------------------- tensors
def apply_units(tensor: torch.Tensor, axis: int, inner: int, matrix: torch.Tensor, outer: int = 1) -> torch.Tensor:
    """Map the units of `tensor`'s axis (laid out (outer, units, inner)) through `matrix` (new units, old units).

    Every one of the `outer` blocks (fused Q/K/V-style axes) is mapped by the same matrix.
    """
    t = torch.movedim(tensor, axis, 0)
    rest = t.shape[1:]
    units = t.shape[0] // (inner * outer)
    if matrix.shape[1] != units or units * inner * outer != t.shape[0]:
        raise AlignmentError(
            f"matrix with {matrix.shape[1]} columns cannot act on an axis of {t.shape[0]} entries "
            f"laid out as {outer} block(s) of units x {inner}"
        )
    # (outer, units, inner, ...) -> (units, outer, inner, ...): the outer blocks ride along as columns
    x = t.reshape(outer, units, -1).transpose(0, 1).reshape(units, -1)
    out = (matrix.to(t.dtype) @ x).reshape(matrix.shape[0], outer, -1).transpose(0, 1)
    return torch.movedim(out.reshape(outer * matrix.shape[0] * inner, *rest), 0, axis)


def _zip_tensors(
    spec: PermutationSpec,
    states: Sequence[Mapping[str, torch.Tensor]],
    matches: Mapping[str, ZipMatch],
    *,
    average_heads: bool,
    branch_unmerges: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Split every tensor into the merged trunk or per-model branches (with U folded into their inputs).

    ``branch_unmerges`` (group -> U) replaces the matcher's U where a branch reads a zipped group.
    """
    branch_u = {g: branch_unmerges.get(g, mt.unmerge) for g, mt in matches.items()} if branch_unmerges else None
    axes = spec.axes_of()
    k = len(states)
    trunk: dict[str, torch.Tensor] = {}
    branches: list[dict[str, torch.Tensor]] = [{} for _ in range(k)]
    for name, ref in states[0].items():
        slots = axes.get(name, {})
        outs = [(ax, g, m) for ax, (g, m) in slots.items() if m.role == "out"]
        ins = [(ax, g, m) for ax, (g, m) in slots.items() if m.role == "in" and g in matches]
        zipped_out = [o for o in outs if o[1] in matches]
        if not ref.is_floating_point() or ref.dim() == 0:
            trunk[name] = ref.clone()  # counters and scalars: nothing to merge
            continue
        if zipped_out or (not outs and average_heads):
            if any(st[name].shape != ref.shape for st in states):
                raise AlignmentError(f"tensor {name!r} differs in shape between the models; heads='average' needs equal heads")
            parts = []
            for m in range(k):
                t = states[m][name].to(torch.float64)
                for ax, g, mem in zipped_out:
                    n = spec.groups[g].size
                    block = matches[g].merge[:, m * n : (m + 1) * n].to(torch.float64)
                    t = apply_units(t, ax, mem.inner, repeat_units(block, mem.repeat, spec.groups[g].head_dim), mem.outer)
                t = _unmerge_inputs(t, ins, spec, {g: mt.unmerge for g, mt in matches.items()}, m)
                parts.append(t)
            total = torch.stack(parts).sum(0)
            if not zipped_out:
                total = total / k  # averaged heads: the mean of the models' outputs
            trunk[name] = total.to(ref.dtype)
        else:
            for m in range(k):
                unmerges = branch_u or {g: mt.unmerge for g, mt in matches.items()}
                t = _unmerge_inputs(states[m][name].to(torch.float64), ins, spec, unmerges, m)
                branches[m][name] = t.to(ref.dtype)
    return trunk, branches


def _unmerge_inputs(t: torch.Tensor, ins: list[tuple[int, str, Member]], spec: PermutationSpec, unmerges: Mapping[str, torch.Tensor], m: int) -> torch.Tensor:
    """Fold model m's block of U into the axes of `t` that read zipped groups."""
    for ax, g, mem in ins:
        n = spec.groups[g].size
        u = unmerges[g][m * n : (m + 1) * n].to(torch.float64)  # (n old units of model m, n merged)
        t = apply_units(t, ax, mem.inner, repeat_units(u.T, mem.repeat, spec.groups[g].head_dim), mem.outer)
    return t


def repeat_units(matrix: torch.Tensor, repeat: int, head_dim: int | None) -> torch.Tensor:
    """A (new units, old units) map of a head group widened to an axis laid out (heads, repeat, head_dim).

    Grouped-query attention ties `repeat` query heads to each KV head (:class:`merge.spec.Member`): they
    follow their KV head, so the map acts on (head, dim) and passes the repeat index through.
    """
    if repeat == 1:
        return matrix
    if not head_dim or matrix.shape[0] % head_dim or matrix.shape[1] % head_dim:
        raise AlignmentError(f"a member repeated {repeat} times needs whole heads, got a map of shape {tuple(matrix.shape)}")
    blocks = matrix.reshape(matrix.shape[0] // head_dim, head_dim, matrix.shape[1] // head_dim, head_dim)
    eye = torch.eye(repeat, dtype=matrix.dtype, device=matrix.device)
    wide = torch.einsum("aibj,rs->aribsj", blocks, eye)
    return wide.reshape(matrix.shape[0] * repeat, matrix.shape[1] * repeat)


# ---------------------------------------------------------------------------------------------- engine

from pydantic import Field, StrictBool, StrictStr  # noqa: E402

from suture.merge.align.engines import AlignmentOptions, AlignRequest, BuiltModel, Engine, register_engine  # noqa: E402

STOP_SWEEP_PLOT = "stop_sweep.png"


class ZipItOptions(AlignmentOptions):
    """`alignment: {engine: zipit, alpha, beta, stop_at, matcher, heads, unmerge, match_head_scale}` (defaults: :func:`zip_models`)."""

    engine: Literal["zipit"] = "zipit"
    alpha: float = Field(0.5, ge=0, le=1, title="alpha (merge decay)",
                         description="ZipIt! (Stoica et al., ICLR 2024): after two feature clusters are zipped, their "
                                     "similarity to the others is multiplied by alpha, so clusters that already absorbed "
                                     "features become less attractive. 1: no decay.", json_schema_extra={"step": 0.05})
    beta: float = Field(1.0, ge=0, title="beta (within-model budget)",
                        description="Share of each model's merges that may pair features of the same model (ZipIt! merges "
                                    "redundant features within a model too). 0: only across models.",
                        json_schema_extra={"step": 0.05})
    stop_at: StrictStr | None = Field(
        None, title="Zip up to group",
        description="Partial zipping: zip the layers up to and including this permutation group and keep the later "
                    "layers per model (a shared trunk with one branch per model). Empty: zip the whole model "
                    "(the only choice for transformers folders).")
    matcher: Literal["zip", "permute", "identity"] = Field(
        "zip", title="Matcher",
        description="zip: ZipIt!'s greedy matching within and across models; permute: the permutation baseline (across "
                    "models only); identity: naive averaging of unit i with unit i.")
    heads: Heads = Field("concat", title="Heads",
                         description="concat: keep one output head per model and concatenate their outputs (per-task "
                                     "logits); average: average the heads into one. Transformers folders are always "
                                     "zipped into one model (average).")
    unmerge: Unmerge = Field("lstsq", title="Unmerge (partial zips)",
                             description="How each branch reads the zipped trunk: copy: the paper's 0/1 unmerge; lstsq: "
                                         "least squares from the feature statistics; fit: least squares on the zipped "
                                         "trunk's output.")
    match_head_scale: StrictBool = Field(
        False, title="Match head scales",
        description="Rescale each kept head's logits to its source model's spread on the calibration data, so "
                    "concatenated per-task logits compare fairly (a head's own ranking is unchanged).")


class _Ensemble(nn.Module):
    """The models side by side: their outputs concatenated (the upper bound partial zipping moves toward)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.members], dim=-1)


def _align(request: AlignRequest) -> BuiltModel:
    """ZipIt!: zip the models (fully or up to stop_at); each runs as the recipe's architecture or the one its config records."""
    from suture.merge.derive import architecture_of, load_module
    from suture.merge.hf_module import HFArchitecture

    stores, options = request.stores, request.options
    archs = {key: architecture_of(store, request.architecture, trust_remote_code=request.trust_remote_code)
             for key, store in stores.items()}
    missing = [k for k, a in archs.items() if a is None]
    if missing:
        raise AlignmentError(f"zipit runs the models on data: {missing} have no runnable architecture "
                             "(give one as package.module:factory)", field=("architecture",))
    if any(isinstance(arch, HFArchitecture) for arch in archs.values()):  # heads zipped whole (merge.align.transformer_zip)
        from suture.merge.align.transformer_zip import align_transformers

        return align_transformers(request, archs)
    if options.data is None or request.data is None:
        raise AlignmentError("zipit needs calibration data (e.g. sklearn:digits)", field=("data",))
    modules = [load_module(stores[k], archs[k]) for k in stores]
    arch_dicts = [{"factory": archs[k].factory, "kwargs": archs[k].kwargs} for k in stores]
    chosen = {"alpha": options.alpha, "beta": options.beta, "matcher": options.matcher, "heads": options.heads,
              "unmerge": options.unmerge, "match_head_scale": options.match_head_scale}

    def zip_at(stop_at: str | None, matcher: str | None = None) -> ZipResult:
        return zip_models(None, modules, request.data, stop_at=stop_at, architectures=arch_dicts, device=request.device,
                          batch_size=options.batch_size, **{**chosen, "matcher": matcher or chosen["matcher"]})

    if request.progress:
        request.progress("zip", 0, 1, "matching features")
    result = zip_at(options.stop_at)
    if request.progress:
        request.progress("zip", 1, 1, "")

    def save(folder: Path) -> None:
        target = folder / ".zipped"
        save_zip_result(result, target, arch_dicts, overwrite=True)
        for item in target.iterdir():
            item.replace(folder / item.name)
        target.rmdir()

    def evaluate(folder: Path, section: Any, progress=None) -> dict[str, Any]:
        return _evaluate_zip(folder, section, modules, zip_at, progress, archs[next(iter(stores))])

    return BuiltModel(ENGINE.name, {"engine": ENGINE.name, **result.summary()}, save, evaluate, _card_rows)


def _evaluate_zip(folder: Path, section: Any, modules, zip_at, progress, architecture) -> dict[str, Any]:
    """Joint accuracy of the output, the baselines (naive averaging, permutation), the ensemble and every stop layer."""
    from suture.merge.data import load_dataset
    from suture.merge.derive import load_module
    from suture.merge.evaluate import evaluate
    from suture.merge.graph.trace import spec_from_module
    from suture.merge.multihead import is_multihead, load_multihead
    from suture.merge.store import open_store

    data = load_dataset(section.data, split=section.split, max_items=section.max_items)
    store = open_store(folder)
    # the output's factories are the ones built (and trust-checked) above to zip the models
    output = load_multihead(folder, trust_remote_code=True) if is_multihead(folder) else load_module(store, architecture)
    store.close()
    result: dict[str, Any] = {"data": section.data if isinstance(section.data, str) else dict(section.data), "split": section.split,
                              "items": len(data), "merged": evaluate(output, data, batch_size=section.batch_size),
                              "ensemble": evaluate(_Ensemble(modules), data, batch_size=section.batch_size)}
    # every group but the last: stopping at the last group is the full zip
    stops = stop_layers(spec_from_module(modules[0], data.inputs[:2]))[:-1]
    runs = [("naive averaging", None, "identity"), ("permutation", None, "permute"), ("zipit full", None, "zip")]
    runs += [(f"zipit up to {stop}", stop, "zip") for stop in reversed(stops)]
    baselines, sweep = {}, []
    for i, (label, stop, matcher) in enumerate(runs):
        if progress:
            progress("evaluate", i, len(runs), label)
        metrics = evaluate(zip_at(stop, matcher).module, data, batch_size=section.batch_size)
        if matcher == "zip":
            sweep.append({"stop_at": stop or "full", **metrics})
        else:
            baselines[label] = metrics
    if progress:
        progress("evaluate", len(runs), len(runs), "")
    result["baselines"] = baselines
    result["stop_sweep"] = sweep
    if section.plot:
        from suture.merge.plot import plot_stop_sweep

        plot_stop_sweep(sweep, result["ensemble"]["accuracy"], folder / STOP_SWEEP_PLOT)
        result["plot"] = STOP_SWEEP_PLOT
    return result


def _card_rows(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """The model card's table: the output, the ensemble, the baselines and the stop-layer sweep."""
    rows = [{"model": "zipped output", **evaluation["merged"]}, {"model": "ensemble", **evaluation["ensemble"]}]
    rows += [{"model": label, **m} for label, m in evaluation.get("baselines", {}).items()]
    rows += [{"model": f"stop_at {row['stop_at']}", "loss": row["loss"], "accuracy": row["accuracy"]}
             for row in evaluation.get("stop_sweep", [])]
    return rows


ENGINE = register_engine(Engine(
    name="zipit", title="ZipIt (feature zipping)", description="feature zipping (merge/unmerge matrices)",
    papers=(("ZipIt! Merging Models from Different Tasks without Training (Stoica et al., ICLR 2024)",
             "https://arxiv.org/abs/2305.03053"),),
    options=ZipItOptions, align=_align, outcome="built", needs_data=True, needs_module=True,
))
