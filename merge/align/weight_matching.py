"""Git Re-Basin weight matching (Ainsworth et al., ICLR 2023): permute model B's hidden units to match A.

Coordinate descent over permutation groups. For one group, with every other group's permutation held
fixed, the best permutation maximises sum_i <W_a[i], W_b[perm[i]]> over all tensors the group touches
(each tensor's other axes already permuted); that is one linear assignment on
`C = sum_members W_a(axis first, flattened) @ W_b(axis first, flattened)^T`. Groups are visited in a
seeded random order, and passes repeat until no group improves by more than 1e-12.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch

from suture.merge.align import MatchResult
from suture.merge.align.assignment import assignment_score, timed_assign
from suture.merge.threads import single_threaded_if_small
from suture.merge.errors import AlignmentError, InputError
from suture.merge.spec import Member, PermGroup, PermutationSpec, axis_problem, expand_index, unit_matrix

logger = logging.getLogger(__name__)

_IMPROVEMENT = 1e-12


def tensor_accessor(params: Any, label: str) -> tuple[set[str], Callable[[str], torch.Tensor]]:
    """Names and a getter for a state dict (Mapping) or a TensorStore-like object (`names()`, `get(name)`)."""
    if isinstance(params, Mapping):
        return set(params.keys()), params.__getitem__
    if callable(getattr(params, "names", None)) and callable(getattr(params, "get", None)):
        return set(params.names()), params.get
    raise InputError(f"{label}: expected a mapping of tensor names to tensors or a tensor store, got {type(params).__name__}")


class WeightCosts:
    """The tensors of two models that the spec's active groups touch, on one device, and their matching costs."""

    def __init__(self, spec: PermutationSpec, params_a: Any, params_b: Any, device: torch.device) -> None:
        self.spec = spec
        self.device = device
        self.groups = spec.active_groups()
        names_a, get_a = tensor_accessor(params_a, "model A")
        names_b, get_b = tensor_accessor(params_b, "model B")
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        storage: dict[tuple, str] = {}
        duplicates: set[str] = set()
        missing: list[str] = []
        for group in self.groups:
            for m in group.members:
                name = m.tensor
                if name in self.a or name in duplicates:
                    continue
                in_a, in_b = name in names_a, name in names_b
                if not in_a and not in_b:
                    missing.append(name)
                    continue
                if in_a != in_b:
                    raise AlignmentError(f"tensor {name!r} (group {group.name!r}) is in model {'A' if in_a else 'B'} only")
                ta, tb = get_a(name), get_b(name)
                if tuple(ta.shape) != tuple(tb.shape):
                    raise AlignmentError(
                        f"tensor {name!r} has shape {tuple(ta.shape)} in model A but {tuple(tb.shape)} in model B; "
                        "permutation matching needs equal widths (use optimal transport for different widths)"
                    )
                key = (ta.data_ptr(), tuple(ta.shape), tuple(ta.stride()), ta.dtype) if ta.numel() else (name,)
                if key in storage:
                    # a tied tensor (same storage under two names) counts once
                    duplicates.add(name)
                    continue
                storage[key] = name
                self.a[name] = ta.detach().to(device, torch.float32)
                self.b[name] = tb.detach().to(device, torch.float32)
        if missing:
            logger.warning("%d spec tensors are in neither model and are skipped, e.g. %r", len(missing), missing[0])
        self.used: dict[str, list[Member]] = {}
        for group in self.groups:
            used = [m for m in group.members if m.tensor in self.a]
            if not used and group.members:
                raise AlignmentError(
                    f"group {group.name!r}: none of its tensors (e.g. {group.members[0].tensor!r}) is in the models; "
                    "does the spec use the same tensor names (prefix) as the checkpoints?"
                )
            self.used[group.name] = used
        # tensor -> {axis: (group, member)} over the groups being permuted; frozen groups stay identity
        self.axes: dict[str, dict[int, tuple[PermGroup, Member]]] = {}
        for group in self.groups:
            for m in self.used[group.name]:
                ndim = self.a[m.tensor].dim()
                problem = axis_problem(group, m, self.a[m.tensor].shape)
                if problem:
                    raise AlignmentError(problem)
                self.axes.setdefault(m.tensor, {})[m.axis % ndim] = (group, m)

    def permuted_b(self, name: str, perms: Mapping[str, torch.Tensor], skip_axis: int | None = None) -> torch.Tensor:
        """B's tensor with every group axis permuted, except `skip_axis`."""
        t = self.b[name]
        for axis, (group, m) in self.axes.get(name, {}).items():
            if axis == skip_axis:
                continue
            idx = expand_index(perms[group.name].to(self.device), m, group.head_dim)
            t = torch.index_select(t, axis, idx)
        return t

    def cost(self, group: PermGroup, perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """C[i, j] = similarity of A's unit i and B's unit j with all other groups at their current perms."""
        c: torch.Tensor | None = None
        for m in self.used[group.name]:
            axis = m.axis % self.a[m.tensor].dim()
            wa = unit_matrix(self.a[m.tensor], m, group.head_dim)
            wb = unit_matrix(self.permuted_b(m.tensor, perms, skip_axis=axis), m, group.head_dim)
            # accumulate the fp32 products in place; one conversion to float64 at the end for the solver
            c = wa @ wb.T if c is None else c.addmm_(wa, wb.T)
        if c is None:
            return torch.zeros(group.size, group.size, dtype=torch.float64, device=self.device)
        return c.double()

    def neighbours(self) -> dict[str, set[str]]:
        """Groups whose permutation enters each group's cost (they share a tensor with it)."""
        out: dict[str, set[str]] = {g.name: set() for g in self.groups}
        for slots in self.axes.values():
            names = {group.name for group, _ in slots.values()}
            for name in names:
                out[name] |= names
        for name, found in out.items():
            found.discard(name)
        return out

    def objective(self, perms: Mapping[str, torch.Tensor]) -> float:
        """sum over touched tensors of <A, permuted B>."""
        return float(sum(float(torch.dot(self.a[n].reshape(-1), self.permuted_b(n, perms).reshape(-1)).double()) for n in self.a))

    def norms(self) -> tuple[float, float]:
        na = sum(float(t.double().pow(2).sum()) for t in self.a.values()) ** 0.5
        nb = sum(float(t.double().pow(2).sum()) for t in self.b.values()) ** 0.5
        return na, nb


def weight_matching(
    spec: PermutationSpec,
    params_a: Mapping[str, torch.Tensor],
    params_b: Mapping[str, torch.Tensor],
    *,
    max_iter: int = 100,
    seed: int = 0,
    init_perms: Mapping[str, torch.Tensor] | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[[int, float], None] | None = None,
) -> MatchResult:
    """Permutations for B's groups that maximise the weight inner product with A (coordinate descent)."""
    start = time.perf_counter()
    dev = torch.device(device)
    problem = WeightCosts(spec, params_a, params_b, dev)
    largest = max((t.numel() for t in problem.a.values()), default=0)
    with single_threaded_if_small(largest, dev):
        return _coordinate_descent(problem, start, max_iter=max_iter, seed=seed, init_perms=init_perms, progress=progress)


def _coordinate_descent(
    problem: WeightCosts,
    start: float,
    *,
    max_iter: int,
    seed: int,
    init_perms: Mapping[str, torch.Tensor] | None,
    progress: Callable[[int, float], None] | None,
) -> MatchResult:
    """Solve one group at a time (random order) until a whole pass improves none."""
    groups = problem.groups
    perms: dict[str, torch.Tensor] = {}
    for group in groups:
        init = (init_perms or {}).get(group.name)
        if init is None:
            perms[group.name] = torch.arange(group.size)
        else:
            init = torch.as_tensor(init, dtype=torch.long).cpu()
            if init.shape != (group.size,) or not torch.equal(init.sort().values, torch.arange(group.size)):
                raise AlignmentError(f"init_perms[{group.name!r}] is not a permutation of {group.size} units")
            perms[group.name] = init.clone()
    norm_a, norm_b = problem.norms()
    denom = max(norm_a * norm_b, 1e-30)
    initial = problem.objective(perms)
    result = MatchResult(perms=perms, engine=ENGINE.name, group_time={g.name: 0.0 for g in groups})
    result.stats["cosine_before"] = initial / denom
    gen = torch.Generator().manual_seed(seed)
    neighbours = problem.neighbours()
    # a group's cost depends only on its neighbours' permutations: when none changed since the group was
    # last solved, solving again would give the same answer, so the step is skipped
    version = {g.name: 0 for g in groups}
    solved_at: dict[str, dict[str, int] | None] = {g.name: None for g in groups}
    progressed = True
    while progressed and result.iterations < max_iter:
        progressed = False
        for gi in torch.randperm(len(groups), generator=gen).tolist():
            group = groups[gi]
            if group.size < 2:
                continue
            seen = {n: version[n] for n in neighbours[group.name]}
            if solved_at[group.name] == seen:
                continue
            solved_at[group.name] = seen
            t0 = time.perf_counter()
            cost = problem.cost(group, perms)
            new, lap_s = timed_assign(cost, group.kind, group.head_dim)
            result.lap_time += lap_s
            old_score = assignment_score(cost, perms[group.name])
            new_score = assignment_score(cost, new)
            if new_score > old_score + _IMPROVEMENT:
                perms[group.name] = new
                version[group.name] += 1
                progressed = True
            result.group_time[group.name] += time.perf_counter() - t0
        result.iterations += 1
        value = problem.objective(perms)
        result.objective.append(value)
        logger.debug("weight matching pass %d: objective %.6g", result.iterations, value)
        if progress is not None:
            progress(result.iterations, value)
    result.converged = not progressed
    if not result.converged:
        logger.warning("weight matching stopped after max_iter=%d passes before converging", max_iter)
    result.stats["cosine_after"] = (result.objective[-1] if result.objective else initial) / denom
    result.total_time = time.perf_counter() - start
    return result


# ---------------------------------------------------------------------------------------------- engine

from pydantic import Field, StrictInt  # noqa: E402

from suture.merge.align.engines import AlignmentOptions, AlignRequest, Engine, register_engine  # noqa: E402

REBASIN = ("Git Re-Basin: Merging Models modulo Permutation Symmetries (Ainsworth et al., ICLR 2023)",
           "https://arxiv.org/abs/2209.04836")


class WeightMatchingOptions(AlignmentOptions):
    """`alignment: {engine: weight_matching, max_iter, seed, ...}`."""

    engine: Literal["weight_matching"] = "weight_matching"
    max_iter: StrictInt = Field(100, ge=1, title="Max iterations",
                                description="Coordinate-descent passes over the groups; stops earlier when a pass changes no "
                                            "permutation (Git Re-Basin, Ainsworth et al., ICLR 2023).")
    seed: StrictInt = Field(0, title="Seed", description="Order in which weight matching visits the groups (Git Re-Basin's "
                                                         "coordinate descent is order dependent).")


def _align(request: AlignRequest):
    from suture.merge.align.pipeline import align_permutations

    options = request.options

    def match(spec, ref_store, store, arch, step):
        return weight_matching(spec, ref_store.state_dict(), store.state_dict(), max_iter=options.max_iter,
                               seed=options.seed, device=request.device, progress=step)

    return align_permutations(request, ENGINE.name, match)


ENGINE = register_engine(Engine(
    name="weight_matching", title="Weight matching (Git Re-Basin)", description="permutation alignment by weight matching",
    papers=(REBASIN,), options=WeightMatchingOptions, align=_align, outcome="permuted",
    form_common=("seed", "repair"),
))
