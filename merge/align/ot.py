"""Optimal-transport fusion (Singh & Jaggi, "Model Fusion via Optimal Transport", NeurIPS 2020).

Model B is expressed in the reference A's basis group by group, in the graph's order: a group's ground
metric compares A's units with B's units whose incoming side is already expressed in A's basis by the
earlier groups' transports (from weights), or compares their activations on calibration data. The plan
``T`` (``(n_b, n_a)``, rows B's units, columns A's units) is then turned into two maps:

- the outgoing side (a layer's rows, its bias, norm parameters): OTFusion's correction
  ``T diag(1/colsum)``, so every reference unit becomes a convex combination of B's units;
- the incoming side (the next layer's columns): ``diag(1/rowsum) T``, which spreads each B unit over the
  reference units it was sent to. When widths are equal and marginals uniform both maps equal ``n T``
  (a permutation matrix for the exact plan). For different widths this keeps the next layer's
  pre-activations on the same scale: a unit of B split into two A units hands each its full outgoing
  weight only once in total.

Widths may differ (the plan is rectangular, the result has A's widths). ``target_widths`` first compresses
the reference itself (see :func:`compress_reference`) and then transports B onto the compressed basis.
Head-structured groups (attention) are transported whole heads to whole heads, also between different
head counts of one head size (:mod:`merge.align.transformer_ot`, Imfeld et al., ICLR 2024); frozen groups
stay as they are and must have equal sizes.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from suture.merge.align.ot_features import UnitMoments, collect_unit_moments
from suture.merge.align.ot_solve import (
    Distance,
    Solver,
    cost_from_moments,
    DEFAULT_REG,
    normalize_cost,
    normalize_mass,
    pairwise_cost,
    plan_cost,
    plan_entropy,
    solve_plan,
)
from suture.merge.align.transformer_ot import head_blocks, head_plan
from suture.merge.align.weight_matching import tensor_accessor
from suture.merge.errors import AlignmentError, InputError, OptionError
from suture.merge.spec import Member, PermGroup, PermutationSpec, axis_length, unit_matrix

logger = logging.getLogger(__name__)

GroundMetric = Literal["weights", "activations"]
Marginals = Literal["uniform", "activation"]


@dataclass
class TransportResult:
    """Per-group transports of model B onto the reference basis, the maps derived from them, and stats."""

    plans: dict[str, torch.Tensor]  # group -> raw plan (n_b, n_a)
    out_maps: dict[str, torch.Tensor]  # group -> T diag(1/colsum): columns are convex combinations
    in_maps: dict[str, torch.Tensor]  # group -> diag(1/rowsum) T
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    total_time: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)
    # set when target_widths compressed the reference first: its tensors and spec in the target basis
    reference_state: dict[str, torch.Tensor] | None = None
    reference_spec: PermutationSpec | None = None
    reference_plans: dict[str, torch.Tensor] | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures for reports: per-group cost, entropy, convergence, iterations, seconds."""
        return {
            "engine": ENGINE.name,
            "groups": len(self.plans),
            "total_time_s": round(self.total_time, 4),
            "converged": all(s.get("converged", True) for s in self.stats.values()),
            "options": dict(self.options),
            "per_group": {g: dict(s) for g, s in self.stats.items()},
            **({"target_widths": {g: int(p.shape[1]) for g, p in self.reference_plans.items()}} if self.reference_plans else {}),
        }


# --------------------------------------------------------------------------------------- graph order


def group_order(spec: PermutationSpec) -> list[str]:
    """Groups in topological order: a group comes after the groups its layers read (cycles: spec order)."""
    axes = spec.axes_of()
    deps: dict[str, set[str]] = {g.name: set() for g in spec}
    for g in spec:
        for m in g.members:
            if m.role != "out":
                continue
            for _axis, (other, om) in axes.get(m.tensor, {}).items():
                if other != g.name and om.role == "in":
                    deps[g.name].add(other)
    order: list[str] = []
    done: set[str] = set()
    remaining = [g.name for g in spec]
    while remaining:
        ready = next((g for g in remaining if deps[g] <= done), None)
        if ready is None:
            # a residual stream reads and writes groups in a cycle; its unresolved axes are summed out
            ready = remaining[0]
            logger.debug("group %r is in a cycle of the graph; solving it before %s", ready, sorted(deps[ready] - done))
        order.append(ready)
        done.add(ready)
        remaining.remove(ready)
    return order


# --------------------------------------------------------------------------------------- tensor maps


def map_axis(t: torch.Tensor, member: Member, head_dim: int | None, matrix: torch.Tensor) -> torch.Tensor:
    """Replace the member's unit axis: new[..., j, ...] = sum_i matrix[i, j] old[..., i, ...] (in every outer block)."""
    n_src, n_dst = matrix.shape
    axis = member.axis % t.dim()
    x = torch.movedim(t, axis, 0).double()
    rest = x.shape[1:]
    m = matrix.to(x.device, torch.float64)
    # outer blocks (fused Q/K/V) are mapped alike: (outer, block, ...) -> (block, outer, ...) lets them ride
    # along as extra columns, and the reverse move puts them back in front
    x = x.reshape(member.outer, x.shape[0] // member.outer, -1).transpose(0, 1)
    cols = x.shape[1:]
    if member.repeat > 1:
        if not head_dim:
            raise AlignmentError(f"member {member.tensor!r} has repeat {member.repeat} but its group has no head_dim")
        kv_src = n_src // head_dim
        y = x.reshape(kv_src, member.repeat, head_dim, member.inner, *cols).transpose(1, 2)
        y = m.T @ y.reshape(n_src, -1)
        kv_dst = n_dst // head_dim
        y = y.reshape(kv_dst, head_dim, member.repeat, member.inner, *cols).transpose(1, 2)
        y = y.reshape(kv_dst * member.repeat * head_dim * member.inner, *cols)
    else:
        y = m.T @ x.reshape(n_src, -1)
        y = y.reshape(n_dst * member.inner, *cols)
    y = y.transpose(0, 1).reshape(-1, *rest)
    return torch.movedim(y, 0, axis).to(t.dtype)


def _sum_units(t: torch.Tensor, member: Member) -> torch.Tensor:
    """Sum a grouped axis over its units (a permutation-invariant summary), keeping outer and inner blocks."""
    axis = member.axis % t.dim()
    if member.outer == 1 and (member.repeat > 1 or member.inner == 1):
        return t.sum(axis, keepdim=True)
    x = torch.movedim(t, axis, 0)
    rest = x.shape[1:]
    # with GQA repeats the whole (kv_head, repeat, head_dim, inner) block is summed, as without outer blocks
    inner = 1 if member.repeat > 1 else member.inner
    x = x.reshape(member.outer, -1, inner, *rest).sum(1).reshape(member.outer * inner, *rest)
    return torch.movedim(x, 0, axis)


def _member_slots(spec: PermutationSpec) -> dict[str, dict[int, tuple[PermGroup, Member]]]:
    out: dict[str, dict[int, tuple[PermGroup, Member]]] = {}
    for g in spec:
        for m in g.members:
            out.setdefault(m.tensor, {})[m.axis] = (g, m)
    return out


def _resolved_b(
    tb: torch.Tensor,
    ta: torch.Tensor | None,
    keep_axis: int,
    slots: Mapping[int, tuple[PermGroup, Member]],
    out_maps: Mapping[str, torch.Tensor],
    in_maps: Mapping[str, torch.Tensor],
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """A's and B's tensors with every other grouped axis in A's basis (solved) or summed out (not yet)."""
    for axis, (g, m) in sorted(slots.items(), reverse=True):
        if axis % tb.dim() == keep_axis:
            continue
        if g.name in out_maps:
            tb = map_axis(tb, m, g.head_dim, out_maps[g.name] if m.role == "out" else in_maps[g.name])
        else:
            tb = _sum_units(tb, m)
            ta = None if ta is None else _sum_units(ta, m)
    return ta, tb


def _weight_features(
    group_a: PermGroup,
    group_b: PermGroup,
    get_a: Callable[[str], torch.Tensor],
    get_b: Callable[[str], torch.Tensor],
    slots_b: Mapping[str, Mapping[int, tuple[PermGroup, Member]]],
    out_maps: Mapping[str, torch.Tensor],
    in_maps: Mapping[str, torch.Tensor],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_a, d) and (n_b, d): each unit's outgoing-side weights (incoming side already in A's basis)."""
    members = [m for m in group_b.members if m.role == "out"] or list(group_b.members)
    fa, fb = [], []
    for m in members:
        ta = get_a(m.tensor).to(device, torch.float64)
        tb = get_b(m.tensor).to(device, torch.float64)
        axis = m.axis % tb.dim()
        ta, tb = _resolved_b(tb, ta, axis, slots_b.get(m.tensor, {}), out_maps, in_maps)
        fa.append(unit_matrix(ta, m, group_a.head_dim))
        fb.append(unit_matrix(tb, m, group_b.head_dim))
    return torch.cat(fa, dim=1), torch.cat(fb, dim=1)


def _maps_from_plan(plan: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out map, in map): the column-normalized (barycentric) and row-normalized plan."""
    col = plan.sum(0, keepdim=True).clamp_min(1e-300)
    row = plan.sum(1, keepdim=True).clamp_min(1e-300)
    return plan / col, plan / row


# --------------------------------------------------------------------------------------- checks


def _check_options(ground_metric: str, distance: str, solver: str, marginals: str, reg: float, max_iter: int, stop_thr: float) -> None:
    if ground_metric not in ("weights", "activations"):
        raise OptionError(("ground_metric",), f"{ground_metric!r}: expected 'weights' or 'activations'")
    if distance not in ("euclidean", "cosine"):
        raise OptionError(("distance",), f"{distance!r}: expected 'euclidean' or 'cosine'")
    if solver not in ("emd", "sinkhorn"):
        raise OptionError(("solver",), f"{solver!r}: expected 'emd' or 'sinkhorn'")
    if marginals not in ("uniform", "activation"):
        raise OptionError(("marginals",), f"{marginals!r}: expected 'uniform' or 'activation'")
    if solver == "sinkhorn" and not reg > 0:
        raise OptionError(("reg",), f"must be > 0 for sinkhorn, got {reg}")
    if max_iter < 1 or not stop_thr > 0:
        raise OptionError(("max_iter",), f"must be >= 1 and stop_thr > 0, got {max_iter} and {stop_thr}")


def check_compatible(
    spec_a: PermutationSpec,
    spec_b: PermutationSpec,
    names_a: set[str],
    names_b: set[str],
    shape_a: Callable[[str], tuple[int, ...]],
    shape_b: Callable[[str], tuple[int, ...]],
) -> None:
    """Refuse, before any work, models whose graphs or widths cannot be transported onto each other."""
    if set(spec_a.groups) != set(spec_b.groups):
        only_a = sorted(set(spec_a.groups) - set(spec_b.groups))[:3]
        only_b = sorted(set(spec_b.groups) - set(spec_a.groups))[:3]
        raise AlignmentError(f"the models' graphs differ: groups only in the reference {only_a}, only in model B {only_b} "
                             "(different depths need merge.align.depth first)")
    for name, ga in spec_a.groups.items():
        gb = spec_b.groups[name]
        key = lambda g: sorted((m.tensor, m.axis, m.role, m.inner, m.repeat, m.outer) for m in g.members)  # noqa: E731
        if key(ga) != key(gb):
            raise AlignmentError(f"group {name!r} ties different tensors in the two models")
        if (ga.kind != "free" or gb.kind != "free") and not (ga.frozen or gb.frozen):
            head_blocks(ga, gb)  # heads are transported whole: one head size, whole heads, also between head counts
        if ga.size == gb.size:
            continue
        if ga.frozen or gb.frozen:
            raise AlignmentError(
                f"group {name!r} has width {ga.size} in the reference but {gb.size} in model B, and it is frozen "
                f"({ga.frozen_reason or gb.frozen_reason}): frozen groups cannot be transported, widths must match"
            )
    if names_a != names_b:
        raise AlignmentError(f"the models have different tensors: only in the reference {sorted(names_a - names_b)[:3]}, "
                             f"only in model B {sorted(names_b - names_a)[:3]}")
    grouped = {(m.tensor, m.axis % len(shape_a(m.tensor))) for g in spec_a for m in g.members}
    for name in sorted(names_a):
        sa, sb = tuple(shape_a(name)), tuple(shape_b(name))
        if len(sa) != len(sb):
            raise AlignmentError(f"tensor {name!r}: shape {list(sb)} in model B vs {list(sa)} in the reference")
        for axis, (da, db) in enumerate(zip(sa, sb)):
            if da != db and (name, axis) not in grouped:
                raise AlignmentError(
                    f"tensor {name!r} axis {axis}: length {db} in model B vs {da} in the reference, and no transportable "
                    "group indexes that axis (only hidden widths may differ)"
                )


# --------------------------------------------------------------------------------------- engine


def ot_align(
    spec_a: PermutationSpec,
    spec_b: PermutationSpec,
    params_a: Any,
    params_b: Any,
    *,
    ground_metric: GroundMetric = "weights",
    distance: Distance = "euclidean",
    normalize: bool = True,
    solver: Solver = "emd",
    reg: float = DEFAULT_REG,
    max_iter: int = 1000,
    stop_thr: float = 1e-6,
    marginals: Marginals = "uniform",
    activations: Mapping[str, UnitMoments] | None = None,
    device: str | torch.device = "cpu",
    target_widths: Mapping[str, int] | None = None,
    compress_iter: int = 5,
) -> TransportResult:
    """Transport plans that express model B in the reference A's basis, layer by layer (OTFusion)."""
    start = time.perf_counter()
    _check_options(ground_metric, distance, solver, marginals, reg, max_iter, stop_thr)
    names_a, get_a = tensor_accessor(params_a, "reference")
    names_b, get_b = tensor_accessor(params_b, "model B")
    shape_a = lambda n: tuple(get_a(n).shape)  # noqa: E731
    shape_b = lambda n: tuple(get_b(n).shape)  # noqa: E731
    if hasattr(params_a, "shape") and not isinstance(params_a, Mapping):
        shape_a = lambda n: tuple(params_a.shape(n))  # noqa: E731
    if hasattr(params_b, "shape") and not isinstance(params_b, Mapping):
        shape_b = lambda n: tuple(params_b.shape(n))  # noqa: E731
    if target_widths:
        _check_targets(spec_a, target_widths)
        if ground_metric == "activations" or marginals == "activation":
            raise OptionError(("target_widths",), "works with ground_metric: weights and marginals: uniform only "
                              "(the compressed reference has no recorded activations)")
    check_compatible(spec_a if not target_widths else _resized(spec_a, target_widths), spec_b, names_a, names_b,
                     lambda n: _target_shape(spec_a, target_widths, n, shape_a(n)), shape_b)
    needs_data = ground_metric == "activations" or marginals == "activation"
    solved = [g.name for g in spec_b if not (spec_a.groups[g.name].frozen or g.frozen)]
    if needs_data:
        what = "ground_metric: activations" if ground_metric == "activations" else "marginals: activation"
        if not activations:
            raise OptionError(("data",), f"{what} needs calibration data, and none was given")
        missing = [g for g in solved if g not in activations]
        if missing:
            raise InputError(f"{what}: no activations were captured for groups {missing[:3]} "
                             "(are they reached by the calibration inputs?)")
    options = dict(ground_metric=ground_metric, distance=distance, normalize=normalize, solver=solver, reg=reg,
                   max_iter=max_iter, stop_thr=stop_thr, marginals=marginals, device=str(device))
    reference_state = reference_spec = reference_plans = None
    if target_widths:
        reference_spec, reference_state, compressed = compress_reference(
            spec_a, params_a, target_widths, distance=distance, solver=solver, reg=reg, max_iter=max_iter,
            stop_thr=stop_thr, iterations=compress_iter, device=device)
        reference_plans = {g: compressed.plans[g] for g in target_widths}
        spec_a, get_a = reference_spec, reference_state.__getitem__
    dev = torch.device(device)
    slots_b = _member_slots(spec_b)
    result = TransportResult({}, {}, {}, order=group_order(spec_b), options=options)
    for name in result.order:
        ga, gb = spec_a.groups[name], spec_b.groups[name]
        t0 = time.perf_counter()
        if ga.frozen or gb.frozen:
            eye = torch.eye(gb.size, dtype=torch.float64, device=dev)
            result.plans[name], result.out_maps[name], result.in_maps[name] = eye / gb.size, eye, eye
            result.stats[name] = {"method": "frozen", "converged": True}
            continue
        if ground_metric == "weights":
            fa, fb = _weight_features(ga, gb, get_a, get_b, slots_b, result.out_maps, result.in_maps, dev)
            cost = pairwise_cost(fa, fb, distance)
        else:
            mom = activations[name]
            if mom.sq_a.numel() != ga.size or mom.sq_b.numel() != gb.size:
                raise AlignmentError(f"group {name!r}: activations have {mom.sq_a.numel()}/{mom.sq_b.numel()} units, "
                                     f"expected {ga.size}/{gb.size}")
            cost = cost_from_moments(mom.sq_a.to(dev), mom.sq_b.to(dev), mom.cross.to(dev), mom.count, distance)
        if not bool(torch.isfinite(cost).all()):
            raise AlignmentError(f"group {name!r}: the ground metric has NaN or infinite entries (are the weights finite?)")
        if normalize:
            cost = normalize_cost(cost)  # one scale for every layer and width, so `reg` means the same everywhere
        if marginals == "activation":
            mass_b, mass_a = normalize_mass(activations[name].rms_b.to(dev)), normalize_mass(activations[name].rms_a.to(dev))
        else:
            mass_b = torch.full((gb.size,), 1.0 / gb.size, dtype=torch.float64, device=dev)
            mass_a = torch.full((ga.size,), 1.0 / ga.size, dtype=torch.float64, device=dev)
        if gb.kind != "free" or ga.kind != "free":
            # attention: heads are the transported units (Imfeld et al., 2024), see merge.align.transformer_ot
            plan, info, _ = head_plan(cost, ga, gb, mass_b, mass_a, solver=solver, reg=reg, max_iter=max_iter,
                                      stop_thr=stop_thr, uniform=marginals == "uniform", normalize=normalize)
        else:
            plan, info = solve_plan(cost, mass_b, mass_a, solver=solver, reg=reg, max_iter=max_iter, stop_thr=stop_thr,
                                    uniform=marginals == "uniform")
        plan = plan.to(dev, torch.float64)
        result.plans[name] = plan
        result.out_maps[name], result.in_maps[name] = _maps_from_plan(plan)
        result.stats[name] = {
            "method": info.method, "size_b": gb.size, "size_a": ga.size, "cost": plan_cost(plan, cost),
            "entropy": plan_entropy(plan / plan.sum()), "converged": info.converged, "iterations": info.iterations,
            "seconds": round(time.perf_counter() - t0, 4),
        }
        logger.debug("ot group %s: %s", name, result.stats[name])
    result.reference_state, result.reference_spec, result.reference_plans = reference_state, reference_spec, reference_plans
    result.total_time = time.perf_counter() - start
    logger.info("ot alignment of %d groups in %.2f s", len(result.plans), result.total_time)
    return result


def transport_state(
    spec_a: PermutationSpec, spec_b: PermutationSpec, params_b: Any, result: TransportResult
) -> dict[str, torch.Tensor]:
    """Model B's tensors expressed in the reference basis (reference shapes): rows by the corrected plan, columns by the row-normalized plan."""
    names_b, get_b = tensor_accessor(params_b, "model B")
    for g in spec_b:
        plan = result.out_maps.get(g.name)
        target = spec_a.groups.get(g.name)
        if plan is not None and (target is None or tuple(plan.shape) != (g.size, target.size)):
            raise AlignmentError(f"group {g.name!r}: the transport is {tuple(plan.shape)}, but the specs give "
                                 f"{g.size} units in model B and {None if target is None else target.size} in the reference")
    slots = _member_slots(spec_b)
    out: dict[str, torch.Tensor] = {}
    for name in sorted(names_b):
        t = get_b(name)
        if not t.is_floating_point():
            out[name] = t.clone()  # counters (BatchNorm's num_batches_tracked) are not units
            continue
        dev = next(iter(result.out_maps.values())).device if result.out_maps else t.device
        x = t.to(dev)
        for axis, (g, m) in sorted(slots.get(name, {}).items()):
            if g.name not in result.out_maps:
                raise AlignmentError(f"group {g.name!r} of tensor {name!r} has no transport in this result")
            x = map_axis(x, m, g.head_dim, result.out_maps[g.name] if m.role == "out" else result.in_maps[g.name])
        out[name] = x.to(t.device)
    return out


def fuse_states(state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor], blend: float = 0.5) -> dict[str, torch.Tensor]:
    """blend * A + (1 - blend) * B for same-shaped floating tensors (others from A)."""
    if not 0.0 <= blend <= 1.0:
        raise OptionError(("blend",), f"must be in [0, 1], got {blend}")
    out = {}
    for name, a in state_a.items():
        if name not in state_b:
            raise AlignmentError(f"tensor {name!r} is missing from the aligned model")
        b = state_b[name]
        if a.shape != b.shape:
            raise AlignmentError(f"tensor {name!r}: shape {tuple(b.shape)} after transport vs {tuple(a.shape)} in the reference")
        out[name] = torch.lerp(b.to(a.device).double(), a.double(), blend).to(a.dtype) if a.is_floating_point() else a.clone()
    return out


# --------------------------------------------------------------------------------------- compression


def _check_targets(spec: PermutationSpec, target_widths: Mapping[str, int]) -> None:
    for name, width in target_widths.items():
        if name not in spec.groups:
            raise OptionError(("target_widths",), f"names group {name!r}, which the model does not have "
                                                   f"(groups: {list(spec.groups)[:8]})")
        g = spec.groups[name]
        if not isinstance(width, int) or isinstance(width, bool) or not 1 <= width <= g.size:
            raise OptionError(("target_widths", name), f"{width!r}: expected an integer between 1 and the "
                                                         f"reference width {g.size}")
        if g.frozen or g.kind != "free":
            raise OptionError(("target_widths", name), f"group is {'frozen' if g.frozen else g.kind} and cannot be narrowed")


def _resized(spec: PermutationSpec, target_widths: Mapping[str, int]) -> PermutationSpec:
    out = copy.deepcopy(spec)
    for name, width in target_widths.items():
        out.groups[name].size = int(width)
    return out


def _target_shape(spec: PermutationSpec, target_widths: Mapping[str, int] | None, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if not target_widths:
        return shape
    new = list(shape)
    for g in spec:
        if g.name in target_widths:
            for m in g.members:
                if m.tensor == name:
                    new[m.axis % len(shape)] = axis_length(target_widths[g.name], m)
    return tuple(new)


def _farthest_points(feats: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of k rows: the largest-norm row, then each time the row farthest from those already chosen."""
    chosen = [int(feats.norm(dim=1).argmax())]
    dist = torch.cdist(feats, feats[chosen[0]][None]).squeeze(1)
    for _ in range(k - 1):
        nxt = int(dist.argmax())
        chosen.append(nxt)
        dist = torch.minimum(dist, torch.cdist(feats, feats[nxt][None]).squeeze(1))
    return torch.tensor(chosen, device=feats.device)


def compress_reference(
    spec: PermutationSpec,
    params: Any,
    target_widths: Mapping[str, int],
    *,
    distance: Distance = "euclidean",
    solver: Solver = "emd",
    reg: float = DEFAULT_REG,
    max_iter: int = 1000,
    stop_thr: float = 1e-6,
    iterations: int = 5,
    device: str | torch.device = "cpu",
) -> tuple[PermutationSpec, dict[str, torch.Tensor], TransportResult]:
    """Narrow a model to `target_widths` by transporting each group onto k barycentres of its own units.

    Per group, in graph order: farthest-point seeding (start at the unit with the largest outgoing-weight
    norm, then repeatedly add the unit farthest from those chosen) picks k distinct barycentres; then `iterations` rounds of balanced OT k-means (plan from the units onto the barycentres with uniform
    marginals, barycentres = plan-weighted means) give the final plan. Units merged into one barycentre
    are averaged on their outgoing side and summed on the next layer's incoming side, which keeps the
    function when they were duplicates. Returns (narrow spec, narrow tensors, the transports).
    """
    _check_targets(spec, target_widths)
    names, get = tensor_accessor(params, "reference")
    dev = torch.device(device)
    slots = _member_slots(spec)
    result = TransportResult({}, {}, {}, order=group_order(spec), options={"compress": dict(target_widths)})
    start = time.perf_counter()
    for name in result.order:
        g = spec.groups[name]
        if name not in target_widths:
            eye = torch.eye(g.size, dtype=torch.float64, device=dev)
            result.plans[name], result.out_maps[name], result.in_maps[name] = eye / g.size, eye, eye
            continue
        t0 = time.perf_counter()
        _, feats = _weight_features(g, g, get, get, slots, result.out_maps, result.in_maps, dev)
        k = int(target_widths[name])
        centres = feats[_farthest_points(feats, k)].clone()
        mass_src = torch.full((g.size,), 1.0 / g.size, dtype=torch.float64, device=dev)
        mass_dst = torch.full((k,), 1.0 / k, dtype=torch.float64, device=dev)
        plan = None
        for _ in range(max(1, iterations)):
            cost = normalize_cost(pairwise_cost(centres, feats, distance))
            plan, info = solve_plan(cost, mass_src, mass_dst, solver=solver, reg=reg, max_iter=max_iter,
                                    stop_thr=stop_thr, uniform=True)
            plan = plan.to(dev, torch.float64)
            centres = _maps_from_plan(plan)[0].T @ feats
        result.plans[name] = plan
        result.out_maps[name], result.in_maps[name] = _maps_from_plan(plan)
        result.stats[name] = {"method": info.method, "size_b": g.size, "size_a": k, "cost": plan_cost(plan, cost),
                              "entropy": plan_entropy(plan), "converged": info.converged,
                              "seconds": round(time.perf_counter() - t0, 4)}
    result.total_time = time.perf_counter() - start
    narrow = _resized(spec, target_widths)
    state = transport_state(narrow, spec, params, result)
    return narrow, state, result


# --------------------------------------------------------------------------------------- one call

OT_OPTIONS = ("ground_metric", "distance", "normalize", "solver", "reg", "max_iter", "stop_thr", "marginals",
              "target_widths", "compress_iter")


def align_with_ot(
    spec_a: PermutationSpec,
    spec_b: PermutationSpec,
    params_a: Any,
    params_b: Any,
    *,
    module_a: torch.nn.Module | None = None,
    module_b: torch.nn.Module | None = None,
    batches: Any = None,
    example_input: torch.Tensor | tuple | None = None,
    device: str | torch.device = "cpu",
    activations: Mapping[str, UnitMoments] | None = None,
    **options: Any,
) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor], TransportResult]:
    """Collect activation moments when the options need them (unless `activations` already holds them), transport B;
    returns (narrowed reference or None, B in the reference basis, result)."""
    unknown = sorted(set(options) - set(OT_OPTIONS))
    if unknown:
        raise InputError(f"unknown option(s) {unknown} for engine ot; expected some of {list(OT_OPTIONS)}")
    needs = options.get("ground_metric") == "activations" or options.get("marginals") == "activation"
    if needs and activations is None:
        if module_a is None or module_b is None:
            raise OptionError(("ground_metric",), "activations / marginals: activation need runnable models "
                              "(a named architecture, or models saved by Suture's zoo)")
        if batches is None or example_input is None:
            raise OptionError(("data",), "ground_metric: activations / marginals: activation need calibration data")
        # validate everything else before running the models
        _check_options(options.get("ground_metric", "weights"), options.get("distance", "euclidean"),
                       options.get("solver", "emd"), options.get("marginals", "uniform"), options.get("reg", DEFAULT_REG),
                       options.get("max_iter", 1000), options.get("stop_thr", 1e-6))
        activations = collect_unit_moments(module_a, module_b, batches, example_input=example_input, device=device)
    result = ot_align(spec_a, spec_b, params_a, params_b, activations=activations, device=device, **options)
    reference_spec = result.reference_spec or spec_a
    aligned = transport_state(reference_spec, spec_b, params_b, result)
    return result.reference_state, aligned, result


# ---------------------------------------------------------------------------------------------- engine

from pydantic import Field, StrictBool, StrictInt, StrictStr  # noqa: E402

from suture.merge.align.engines import AlignmentOptions, AlignRequest, Engine, register_engine  # noqa: E402

if TYPE_CHECKING:
    from suture.merge.align.pipeline import AlignmentOutcome
    from suture.merge.derive import Architecture


class OTOptions(AlignmentOptions):
    """`alignment: {engine: ot, ...}`: OTFusion's ground metric, solver and masses (defaults: :func:`ot_align`)."""

    engine: Literal["ot"] = "ot"
    max_iter: StrictInt = Field(1000, ge=1, title="Max iterations",
                                description="Iteration cap of the transport solver (network simplex for emd, Sinkhorn "
                                            "iterations for sinkhorn).")
    ground_metric: GroundMetric = Field(
        "weights", title="Ground metric",
        description="What the cost between two units compares: their incoming weights (with the earlier layers already "
                    "transported), or their activations on calibration data. OTFusion (Singh & Jaggi, NeurIPS 2020) "
                    "defines both; activations need data. On transformers folders the activations are read where "
                    "activation matching reads them (norm outputs for the residual stream, Q/K/V and head outputs, "
                    "MLP activations; Imfeld et al., ICLR 2024).")
    distance: Distance = Field("euclidean", title="Distance", description="Cost between two units' feature vectors.")
    normalize: StrictBool = Field(
        True, title="Normalize features",
        description="Divide each layer's cost matrix by its typical matching gap (median over units of median minus "
                    "minimum cost), so one Sinkhorn regularisation means the same at every width and weight scale.")
    solver: Solver = Field(
        "emd", title="Solver",
        description="emd: exact transport (a permutation when widths match and masses are uniform); sinkhorn: "
                    "entropy-regularised transport, a soft plan that spreads each unit over several.")
    reg: float = Field(DEFAULT_REG, gt=0, title="Sinkhorn regularisation",
                       description="Entropic regularisation: larger values give a softer, more spread-out plan.",
                       json_schema_extra={"depends": ["solver", "sinkhorn"]})
    stop_thr: float = Field(1e-6, gt=0, title="Sinkhorn tolerance",
                            description="Sinkhorn stops when the marginals are met to this tolerance.",
                            json_schema_extra={"depends": ["solver", "sinkhorn"]})
    marginals: Marginals = Field(
        "uniform", title="Unit masses",
        description="uniform: every unit carries the same mass; activation: mass proportional to the unit's mean "
                    "activation on the data (OTFusion's importance weighting).")
    target_widths: dict[StrictStr, StrictInt] | None = Field(
        None, title="Target widths",
        description="Compress the reference first, e.g. {layers.0: 96}: each listed group gets that many units, then "
                    "the other model is transported onto the narrower basis (OTFusion's fusion into a smaller model). "
                    "Empty: keep the reference's widths.")
    blend: float = Field(
        0.5, ge=0, le=1, title="Reference share",
        description="Weight of the reference in the fused average of two models; the transported model gets 1 - blend "
                    "(replaces the models' own weights).")

    def solver_options(self) -> dict[str, Any]:
        """The options the recipe set that :func:`align_with_ot` takes (unset ones keep the library's defaults)."""
        return {k: getattr(self, k) for k in OT_OPTIONS if k in self.model_fields_set}


def _with_widths(config: dict | None, architecture: Architecture | None, state: Mapping[str, torch.Tensor]) -> dict | None:
    """The reference's config with a zoo MLP's `widths` rewritten to match `state` (after compression/depth fusion)."""
    from suture.merge.zoo import ARCH_KEY, FACTORY_REFS, canonical_factory

    if config is None or architecture is None or canonical_factory(architecture.factory) not in (FACTORY_REFS["mlp"], "mlp"):
        return config

    layers = sorted({int(n.split(".")[1]) for n in state if n.startswith("layers.") and n.endswith(".weight")})
    widths = [int(state[f"layers.{layers[0]}.weight"].shape[1])] + [int(state[f"layers.{i}.weight"].shape[0]) for i in layers]
    config = dict(config)
    config[ARCH_KEY] = {"factory": architecture.factory, "kwargs": {**architecture.kwargs, "widths": widths}}
    return config


def _align(request: AlignRequest) -> AlignmentOutcome:
    """OT fusion (OTFusion): transport every model into the reference's basis, whatever its widths or depth."""
    from suture.merge.align.pipeline import AlignmentOutcome
    from suture.merge.derive import architecture_of, derive_spec, example_input, load_module
    from suture.merge.align.transformer_ot import collect_transformer_moments
    from suture.merge.hf_module import HFArchitecture, refuse_hf
    from suture.merge.store import DictStore

    stores, reference, settings, progress = request.stores, request.reference, request.options, request.progress
    architecture, data, device = request.architecture, request.data, request.device
    ot_options = settings.solver_options()

    ref_store = stores[reference]
    trust = request.trust_remote_code
    spec_ref, arch_ref = derive_spec(ref_store, architecture=architecture, data=data, input_shape=settings.input_shape,
                                     trust_remote_code=trust)
    outcome = AlignmentOutcome(reference, spec_ref, {reference: ref_store}, architecture=arch_ref, engine=ENGINE.name,
                               kind="transported")
    others = [k for k in stores if k != reference]
    if ot_options.get("target_widths") and len(others) != 1:
        raise AlignmentError("compression is defined for one reference and one other model", field=("target_widths",))
    # tracing examples are for user modules; transformers models are observed where their family spec says
    traced = not isinstance(arch_ref, HFArchitecture) and (data is not None or settings.input_shape)
    example = example_input(data, settings.input_shape) if traced else None
    for i, key in enumerate(others):
        if progress:
            progress("align", i, len(others), key)
        store = stores[key]
        # the recipe's architecture runs this model too when it has the reference's shapes (it has no record of its own)
        fits = architecture is not None and (arch_ref is None or store.shapes() == ref_store.shapes())
        arch_b = architecture_of(store, trust_remote_code=trust, chosen=architecture) or (architecture if fits else None)
        spec_b, arch_b = derive_spec(store, architecture=arch_b, data=data, input_shape=settings.input_shape, trust_remote_code=trust)
        if len(spec_b.groups) != len(spec_ref.groups):
            refuse_hf(arch_ref, "fusing models of different depths", "layer alignment runs MLP layers, not transformer blocks")
            return _fuse_depths(stores, reference, key, settings, arch_ref, arch_b, data, outcome)
        modules: dict[str, Any] = {}
        needs_modules = ot_options.get("ground_metric") == "activations" or ot_options.get("marginals") == "activation"
        if needs_modules and arch_ref is not None and arch_b is not None:
            modules = {"module_a": load_module(ref_store, arch_ref), "module_b": load_module(store, arch_b)}
        batches = None
        if data is not None:
            from suture.merge.data import iter_batches

            batches = [x for x, _ in iter_batches(data, settings.batch_size)]
        if modules and isinstance(arch_ref, HFArchitecture):
            # transformers models are not traced: the family spec says where each group shows (transformer_ot)
            if batches is None:
                raise AlignmentError("ground_metric: activations / marginals: activation need calibration data",
                                     field=("data",))
            modules["activations"] = collect_transformer_moments(spec_ref, spec_b, modules["module_a"],
                                                                 modules["module_b"], batches, device=device)
        options = dict(ot_options)
        narrow, aligned, result = align_with_ot(spec_ref, spec_b, ref_store.state_dict(), store.state_dict(),
                                                batches=batches, example_input=example, device=device, **modules, **options)
        config = ref_store.config
        if narrow is not None:
            config = _with_widths(config, arch_ref, narrow)
            outcome.stores[reference] = DictStore(narrow, source=f"{ref_store.source} (compressed)", config=config)
            if arch_ref is not None and config is not None:
                outcome.architecture = architecture_of(outcome.stores[reference], trust_remote_code=trust, chosen=arch_ref)
        outcome.stores[key] = DictStore(aligned, source=f"{store.source} (transported)", config=config)
        outcome.results[key] = result
        logger.info("transported %s onto %s: %s", key, reference, result.summary())
    if progress:
        progress("align", len(others), len(others), "")
    return outcome


def _fuse_depths(stores, reference, key, settings: OTOptions, arch_ref, arch_b, data, outcome) -> AlignmentOutcome:
    """Models of different depths: CLAFusion-style layer alignment, identity insertion, then OT fusion."""
    from dataclasses import replace

    from suture.merge.align.depth import fuse_depths
    from suture.merge.derive import load_module
    from suture.merge.store import DictStore

    if len(stores) != 2 or arch_ref is None or arch_b is None:
        raise AlignmentError("models of different depths fuse only as a pair of runnable MLPs (suture.merge.zoo:mlp)")
    if data is None:
        raise AlignmentError("fusing models of different depths aligns layers by CKA on activations: give calibration data",
                             field=("data",))
    options = {k: v for k, v in settings.solver_options().items() if k != "target_widths"}
    fused = fuse_depths(load_module(stores[reference], arch_ref), load_module(stores[key], arch_b), data,
                        blend=settings.blend, **options)
    state = {k: v.detach().contiguous() for k, v in fused.module.state_dict().items()}
    arch = replace(arch_ref, kwargs={**arch_ref.kwargs, "widths": list(fused.widths)})  # keeps its source and trust
    config = _with_widths(stores[reference].config, arch, state)
    fused_store = DictStore(state, source="fused", config=config)
    outcome.stores = {reference: fused_store, key: fused_store}
    outcome.architecture = arch
    outcome.fused = True
    outcome.results[key] = fused
    return outcome


ENGINE = register_engine(Engine(
    name="ot", title="Optimal transport (OTFusion)", description="soft alignment by optimal transport",
    papers=(("Model Fusion via Optimal Transport, OTFusion (Singh & Jaggi, NeurIPS 2020)", "https://arxiv.org/abs/1910.05653"),
            ("Transformer Fusion with Optimal Transport (Imfeld et al., ICLR 2024)", "https://arxiv.org/abs/2310.05719")),
    options=OTOptions, align=_align, outcome="transported", needs_data=True, applies_to=("same", "widths"),
    form_common=("repair",), aliases=("otfusion", "optimal_transport"),
))
