"""Git Re-Basin activation matching (Ainsworth et al., ICLR 2023): pair units whose features correlate.

Both models see the same calibration batches; for every group the cross-correlation between A's and B's
units is accumulated over all samples (batch, tokens and pixels alike), and one linear assignment per
group maximises the total correlation of matched units. Unlike weight matching there is no coordinate
descent: each group's features do not depend on the other groups' permutations.

Units that are constant on the calibration data (dead ReLUs are common in trained networks) correlate
with nothing, so correlation leaves their partners arbitrary. Among the assignments that are optimal for
correlation, the one whose weights agree best (the weight-matching cost, other groups at their
activation-matched permutations) is then chosen, so that a planted permutation is recovered exactly.

Attention groups whose members are marked Q/K or V/O (split groups, :mod:`merge.spec`) are observed per part:
Q/K on the q and k projection outputs, V/O on the v outputs and what the out projection reads. Heads are
paired on both parts' evidence and each part takes its own within-head order (a 2-row permutation, 1-D when
the rows agree), as in the transformers path (:mod:`merge.align.transformer_match`).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from suture.merge.activations import batch_inputs, collect_stats
from suture.merge.align import MatchResult
from suture.merge.align.assignment import assignment_score, solve_lap, timed_assign
from suture.merge.align.weight_matching import WeightCosts
from suture.merge.errors import AlignmentError
from suture.merge.graph.trace import Tap, trace_module
from suture.merge.measure import Site
from suture.merge.spec import Part, PermGroup, PermutationSpec

logger = logging.getLogger(__name__)

QK_KEY = "\x1fqk"  # suffix of a split group's name: the statistics of its Q/K features


def activation_matching(
    spec: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    batches: Iterable[Any],
    *,
    taps: Mapping[str, Sequence[Tap]] | None = None,
    prefix: str = "",
    device: str | torch.device = "cpu",
    max_batches: int | None = None,
    input_fn: Callable[[Any], tuple[tuple, dict]] | None = None,
    resolve_constant: bool = True,
    progress: Callable[[int, float], None] | None = None,
) -> MatchResult:
    """Permutations for B's groups maximising the correlation of matched units on calibration data.

    `taps` says where each group is observed; without it model A is traced on the first batch (the spec
    must then come from tracing too, with the same `prefix`, so that group names agree). `progress` gets
    `(batches seen, nan)` while features are captured and `(1, objective)` at the end.
    """
    start = time.perf_counter()
    batches = iter(batches)
    if taps is None:
        try:
            first = next(batches)
        except StopIteration:
            raise AlignmentError("activation matching needs at least one calibration batch") from None
        args, kwargs = (input_fn or batch_inputs)(first)
        if kwargs:
            raise AlignmentError("cannot trace a model fed keyword inputs; pass taps= explicitly")
        taps = trace_module(model_a, args if len(args) > 1 else args[0], prefix=prefix).taps
        batches = itertools.chain([first], batches)
    groups = spec.active_groups()
    wanted = {g.name: list(taps[g.name]) for g in groups if taps.get(g.name)}
    result = MatchResult(perms={}, engine=ENGINE.name)
    for g in groups:
        if g.name not in wanted:
            result.skipped[g.name] = "no module input or output carries this group"
    if not wanted:
        raise AlignmentError("none of the spec's groups can be observed: the taps name no group of this spec")
    for g in groups:
        parts = _part_sites(g, model_a, prefix) if g.name in wanted and g.split else {}
        if parts.get("qk") and parts.get("vo"):  # the group's statistics are its V/O ones, Q/K's kept apart
            wanted[g.name] = parts["vo"]
            wanted[g.name + QK_KEY] = parts["qk"]

    stats = collect_paired(model_a, model_b, wanted, batches, device=device, max_batches=max_batches,
                           input_fn=input_fn, progress=progress)
    before = after = 0.0
    units = constant = 0
    corrs: dict[str, torch.Tensor] = {}
    dead: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for g in groups:
        if g.name not in stats:
            result.skipped.setdefault(g.name, "no features were captured")
            continue
        st = stats[g.name]
        if st.n != g.size:
            raise AlignmentError(f"group {g.name!r} has {g.size} units but its taps show {st.n} features")
        t0 = time.perf_counter()
        corr = st.cross_corr()
        if g.name + QK_KEY in stats:
            perm, lap_s, scored = _assign_parts(g, stats[g.name + QK_KEY], corr)
        else:
            (perm, lap_s), scored = timed_assign(corr, g.kind, g.head_dim), corr
        result.perms[g.name] = perm
        result.lap_time += lap_s
        result.group_time[g.name] = time.perf_counter() - t0
        corrs[g.name] = scored
        dead_a, dead_b = st.constant_a().cpu(), st.constant_b().cpu()
        if bool(dead_a.any() or dead_b.any()):
            dead[g.name] = (dead_a, dead_b)
            constant += int(dead_a.sum() + dead_b.sum())
        before += assignment_score(scored, torch.arange(g.size))
        units += g.size
    if dead and resolve_constant:
        result.stats["constant_units_rematched"] = _resolve_constant_units(
            spec, result.perms, dead, model_a, model_b, prefix, torch.device(device)
        )
    for g in groups:
        if g.name in corrs:
            after += assignment_score(corrs[g.name], result.perms[g.name])
    if constant:
        logger.info("%d units (A and B together) are constant on the calibration data", constant)
    result.stats["constant_units"] = constant
    return finish_match(result, before, after, units, start, progress)


def _part_sites(group: PermGroup, module: nn.Module, prefix: str) -> dict[Part, list[Site]]:
    """Where a split group's parts show, from its marked members: the outputs of the Linears whose rows it
    indexes (q, k, v, or each block of a fused qkv) under their block's part, and the input of the out
    projection (its columns, V/O: the per-head context vectors)."""
    from suture.merge.align.transformer_match import _site, _weight_side

    modules = dict(module.named_modules())
    sites: dict[Part, list[Site]] = {"qk": [], "vo": []}
    for m in group.members:
        if not m.parts or m.repeat != 1 or m.inner != 1 or not m.tensor.startswith(prefix):
            continue
        owner = m.tensor[len(prefix):].removesuffix(".weight")
        mod = modules.get(owner)
        side = _weight_side(mod, m) if m.tensor.endswith(".weight") and mod is not None else None
        if side not in ("output", "input") or (side == "input" and m.outer != 1):
            continue
        for block, part in enumerate(m.parts):
            sites[part].append(_site(owner, side, f"group {group.name!r}", block * group.size, group.size))
    return sites


def _assign_parts(group: PermGroup, qk_stats: Any, vo: torch.Tensor) -> tuple[torch.Tensor, float, torch.Tensor]:
    """A split group's permutation: heads paired on the V/O and Q/K correlations together, then each part its
    own within-head order (:func:`assign_head_parts`); also the seconds it took and the (2, n, n) cost it is
    scored on (both parts, half each)."""
    from suture.merge.align.transformer_match import assign_head_parts

    if qk_stats.n != group.size:
        raise AlignmentError(f"group {group.name!r} has {group.size} units but its Q/K features have {qk_stats.n}")
    if not group.head_dim:
        raise AlignmentError(f"attention group {group.name!r} has no head size")
    start = time.perf_counter()
    qk, vo = qk_stats.cross_corr().float().cpu(), vo.float().cpu()
    perm = assign_head_parts(vo, [qk, vo], group.head_dim, within=group.within_free(), pair_qk=True)
    return perm, time.perf_counter() - start, torch.stack([qk, vo]) / 2


def collect_paired(model_a: nn.Module, model_b: nn.Module, wanted: Mapping[str, Sequence[Any]], batches: Iterable[Any], *,
                   device: str | torch.device, max_batches: int | None,
                   input_fn: Callable[[Any], tuple[tuple, dict]] | None,
                   progress: Callable[[int, float], None] | None) -> dict[str, Any]:
    """Paired feature statistics of A and B at `wanted`'s taps or sites; `progress` gets (batches seen, nan)."""
    def on_batch(seen: int) -> None:
        if progress is not None:
            progress(seen, float("nan"))

    return collect_stats(model_a, wanted, batches, model_b=model_b, device=device, max_batches=max_batches,
                         input_fn=input_fn, progress=on_batch)  # fmt: skip


def finish_match(result: MatchResult, before: float, after: float, units: int, start: float,
                 progress: Callable[[int, float], None] | None) -> MatchResult:
    """Log skipped groups, record the mean correlation of matched units before/after and the time; report."""
    for name, why in result.skipped.items():
        logger.warning("activation matching leaves group %r unpermuted: %s", name, why)
    result.iterations = 1
    result.stats["mean_corr_before"] = before / max(units, 1)
    result.stats["mean_corr_after"] = after / max(units, 1)
    result.objective = [after]
    result.total_time = time.perf_counter() - start
    if progress is not None:
        progress(1, after)
    return result


def _resolve_constant_units(
    spec: PermutationSpec,
    perms: dict[str, torch.Tensor],
    dead: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    model_a: nn.Module,
    model_b: nn.Module,
    prefix: str,
    device: torch.device,
    max_passes: int = 10,
) -> int:
    """Re-pair units involving a constant unit by weight similarity, keeping the correlation optimum.

    Pairs (i, j) where A's unit i or B's unit j is constant all have correlation exactly 0, and an optimal
    assignment only pairs such units among themselves, so any reassignment inside that set keeps the
    total correlation; a linear assignment on the weight cost picks the best one. Repeated a few times
    because a group's weight cost depends on its neighbours' permutations.
    """
    state_a = {prefix + k: v for k, v in model_a.state_dict().items()}
    state_b = {prefix + k: v for k, v in model_b.state_dict().items()}
    try:
        costs = WeightCosts(spec, state_a, state_b, device)
    except AlignmentError as exc:
        logger.warning("cannot compare weights to pair constant units (%s); their matches stay arbitrary", exc)
        return 0
    current = {g.name: perms.get(g.name, torch.arange(g.size)) for g in costs.groups}
    start = {name: p.clone() for name, p in current.items()}
    groups: list[PermGroup] = [g for g in costs.groups if g.name in dead and g.name in perms and g.kind == "free"]
    for _ in range(max_passes):
        changed = False
        for g in groups:
            dead_a, dead_b = dead[g.name]
            perm = current[g.name]
            rows = torch.nonzero(dead_a | dead_b[perm]).flatten()
            if rows.numel() < 2:
                continue
            cols = perm[rows]
            w = costs.cost(g, current).cpu()[rows][:, cols]
            allowed = dead_a[rows][:, None] | dead_b[cols][None, :]
            penalty = (w.abs().max() + 1.0) * (rows.numel() + 1)
            pick = solve_lap(torch.where(allowed, w, w - penalty))
            if not bool(allowed[torch.arange(rows.numel()), pick].all()):
                continue  # cannot happen for an optimal correlation assignment; keep it untouched then
            if float(w[torch.arange(rows.numel()), pick].sum()) > float(w.diagonal().sum()) + 1e-12:
                new = perm.clone()
                new[rows] = cols[pick]
                current[g.name] = new
                changed = True
        if not changed:
            break
    moved = 0
    for g in groups:
        moved += int((current[g.name] != start[g.name]).sum())
        perms[g.name] = current[g.name]
    return moved


# ---------------------------------------------------------------------------------------------- engine

from suture.merge.align.engines import AlignmentOptions, AlignRequest, Engine, register_engine  # noqa: E402
from suture.merge.align.weight_matching import REBASIN  # noqa: E402

VERMA = ("Merging Text Transformer Models from Different Initializations (Verma & Elbayad, TMLR 2024)",
         "https://arxiv.org/abs/2403.00986")


class ActivationMatchingOptions(AlignmentOptions):
    """`alignment: {engine: activation_matching, data, ...}`."""

    engine: Literal["activation_matching"] = "activation_matching"
    features: Literal["pooled", "modules"] = Field(
        "pooled", title="Transformer features",
        description="Transformers folders only. pooled: the residual stream is matched once on features pooled over "
                    "all its sites, attention heads as whole heads by their outputs then within heads, MLP units by "
                    "their activations (Verma & Elbayad, 2024); modules: each group observed at one module.")


def _align(request: AlignRequest):
    from suture.merge.align.pipeline import align_permutations
    from suture.merge.align.transformer_match import match_transformer
    from suture.merge.data import iter_batches
    from suture.merge.derive import load_module
    from suture.merge.hf_module import HFArchitecture, hf_taps

    if request.data is None:
        raise AlignmentError("activation matching needs calibration data (e.g. sklearn:digits)", field=("data",))

    def match(spec, ref_store, store, arch, step):
        if arch is None:
            raise AlignmentError("activation matching needs a runnable architecture (a package.module:factory, or a model saved by "
                                 "Suture's zoo)", field=("architecture",))
        batches = (x for x, _ in iter_batches(request.data, request.options.batch_size))
        module_a = load_module(ref_store, arch)
        if isinstance(arch, HFArchitecture) and request.options.features == "pooled":
            return match_transformer(spec, module_a, load_module(store, arch), batches, device=request.device,
                                     progress=step, engine=ENGINE.name)
        # transformers models are not traced: the family spec's members say where each group shows
        taps = hf_taps(spec, module_a) if isinstance(arch, HFArchitecture) else None
        return activation_matching(spec, module_a, load_module(store, arch), batches, taps=taps,
                                   device=request.device, progress=step)

    return align_permutations(request, ENGINE.name, match)


ENGINE = register_engine(Engine(
    name="activation_matching", title="Activation matching (Git Re-Basin)",
    description="permutation alignment by activation matching", papers=(REBASIN, VERMA), options=ActivationMatchingOptions,
    align=_align, outcome="permuted", needs_data=True, needs_module=True, form_common=("repair",),
))
