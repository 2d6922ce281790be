"""Git Re-Basin weight matching (Ainsworth et al., ICLR 2023): permute model B's hidden units to match A.

Coordinate descent over permutation groups. For one group, with every other group's permutation held
fixed, the best permutation maximises sum_i <W_a[i], W_b[perm[i]]> over all tensors the group touches
(each tensor's other axes already permuted); that is one linear assignment on
`C = sum_members W_a(axis first, flattened) @ W_b(axis first, flattened)^T`. Groups are visited in a
seeded random order, and passes repeat until no group improves by more than 1e-12.

A split attention group (Q/K and V/O marked, :mod:`merge.spec`) gets one cost per part, each summed over
that part's members and fused blocks only; heads are paired on the sum of both parts' best within-head
scores, then each part takes its own within-head assignment (a 2-row permutation).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch

from suture.merge.align import MatchResult
from suture.merge.align.assignment import assignment_score, timed_assign
from suture.merge.threads import single_threaded_if_small
from suture.merge.errors import AlignmentError, InputError
from suture.merge.spec import PARTS, Member, PermGroup, PermutationSpec, axis_problem, check_permutation, expand_index, unit_matrix
from suture.merge.store import DictStore, PickleStore

logger = logging.getLogger(__name__)

_IMPROVEMENT = 1e-12


def tensor_accessor(params: Any, label: str) -> tuple[set[str], Callable[[str], torch.Tensor]]:
    """Names and a getter for a state dict (Mapping) or a TensorStore-like object (`names()`, `get(name)`)."""
    if isinstance(params, Mapping):
        return set(params.keys()), params.__getitem__
    if callable(getattr(params, "names", None)) and callable(getattr(params, "get", None)):
        return set(params.names()), params.get
    raise InputError(f"{label}: expected a mapping of tensor names to tensors or a tensor store, got {type(params).__name__}")


def reads_fresh_copies(params: Any) -> bool:
    """Whether each read of `params` makes a new tensor (a safetensors file) rather than returning one
    already in memory (a state dict, an in-memory or memory-mapped store): such sources are streamed."""
    return not isinstance(params, (Mapping, DictStore, PickleStore))


class WeightCosts:
    """The tensors of two models that the spec's active groups touch, and their matching costs.

    Memory (the pair of a 7B model would be 56 GB as fp32 copies): tensors are kept in their stored dtype
    and cast to fp32 one member at a time, only where a product needs them. Tensors that are already in
    memory (state dicts, in-memory stores) are referenced, not copied; tensors of a lazy store that reads
    files are streamed, read again each time a group needs them, so memory stays near the largest group
    member instead of two models. On an accelerator, streamed tensors are held there in their stored dtype
    when the pair fits in half its free memory (`resident` forces either way). The fp32 values, and so the
    costs and the answer, are the same as casting everything to fp32 up front.
    """

    def __init__(self, spec: PermutationSpec, params_a: Any, params_b: Any, device: torch.device,
                 *, resident: bool | None = None) -> None:
        self.spec = spec
        self.device = device
        self.groups = spec.active_groups()
        names_a, get_a = tensor_accessor(params_a, "model A")
        names_b, get_b = tensor_accessor(params_b, "model B")
        stream_a, stream_b = reads_fresh_copies(params_a), reads_fresh_copies(params_b)
        self._get = {"a": get_a, "b": get_b}
        self._held: dict[str, dict[str, torch.Tensor]] = {"a": {}, "b": {}}
        self.names: list[str] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        stored_bytes = 0
        storage: dict[tuple, str] = {}
        duplicates: set[str] = set()
        missing: list[str] = []
        for group in self.groups:
            for m in group.members:
                name = m.tensor
                if name in self.shapes or name in duplicates:
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
                # a tied tensor (same storage under two names) counts once; a streamed read is a fresh buffer
                # whose address a later read may reuse, so only in-memory tensors are compared by storage
                key = (ta.data_ptr(), tuple(ta.shape), tuple(ta.stride()), ta.dtype) if ta.numel() and not stream_a else (name,)
                if key in storage:
                    duplicates.add(name)
                    continue
                storage[key] = name
                self.names.append(name)
                self.shapes[name] = tuple(ta.shape)
                stored_bytes += ta.numel() * ta.element_size() + tb.numel() * tb.element_size()
                if not stream_a:
                    self._held["a"][name] = ta.detach().to(device)
                if not stream_b:
                    self._held["b"][name] = tb.detach().to(device)
                del ta, tb
        if missing:
            logger.warning("%d spec tensors are in neither model and are skipped, e.g. %r", len(missing), missing[0])
        if resident is None:
            resident = device.type != "cpu" and stored_bytes <= _free_bytes(device) // 2
        self._stream = {"a": stream_a and not resident, "b": stream_b and not resident}
        for side, streamed, get in (("a", stream_a, get_a), ("b", stream_b, get_b)):
            if streamed and resident:
                self._held[side] = {n: get(n).detach().to(device) for n in self.names}
        logger.info("weight matching: %d tensors, %.2f GB stored for the pair, streamed: A %s, B %s", len(self.names),
                    stored_bytes / 1e9, self._stream["a"], self._stream["b"])
        self.used: dict[str, list[Member]] = {}
        for group in self.groups:
            used = [m for m in group.members if m.tensor in self.shapes]
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
                shape = self.shapes[m.tensor]
                ndim = len(shape)
                problem = axis_problem(group, m, shape)
                if problem:
                    raise AlignmentError(problem)
                self.axes.setdefault(m.tensor, {})[m.axis % ndim] = (group, m)

    def stored(self, side: str, name: str) -> torch.Tensor:
        """Model `side`'s tensor in its stored dtype on the device (read from the store when streamed)."""
        if self._stream[side]:
            return self._get[side](name).detach().to(self.device)
        return self._held[side][name]

    def tensor_a(self, name: str) -> torch.Tensor:
        """A's tensor as fp32 on the device."""
        return self.stored("a", name).to(self.device, torch.float32)

    def permuted_b(self, name: str, perms: Mapping[str, torch.Tensor], skip_axis: int | None = None) -> torch.Tensor:
        """B's tensor with every group axis permuted, except `skip_axis`."""
        t = self.stored("b", name)
        for axis, (group, m) in self.axes.get(name, {}).items():
            if axis == skip_axis:
                continue
            idx = expand_index(perms[group.name].to(self.device), m, group.head_dim)
            t = torch.index_select(t, axis, idx)
        # permuting in the stored dtype moves values exactly; the cast afterwards gives today's fp32 values
        return t.to(self.device, torch.float32)

    def cost(self, group: PermGroup, perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """C[i, j] = similarity of A's unit i and B's unit j with all other groups at their current perms;
        for a split attention group, one such matrix per part (Q/K, V/O), stacked (2, n, n)."""
        parts = PARTS if group.split else (None,)
        costs: list[torch.Tensor | None] = [None] * len(parts)
        for m in self.used[group.name]:
            axis = m.axis % len(self.shapes[m.tensor])
            a, b = self.tensor_a(m.tensor), self.permuted_b(m.tensor, perms, skip_axis=axis)
            for k, part in enumerate(parts):
                wa = unit_matrix(a, m, group.head_dim, part)
                if wa is None:
                    continue
                wb = unit_matrix(b, m, group.head_dim, part)
                # accumulate the fp32 products in place; one conversion to float64 at the end for the solver
                costs[k] = wa @ wb.T if costs[k] is None else costs[k].addmm_(wa, wb.T)
        zero = torch.zeros(group.size, group.size, dtype=torch.float64, device=self.device)
        done = [zero if c is None else c.double() for c in costs]
        return done[0] if len(done) == 1 else torch.stack(done)

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
        return float(sum(float(torch.dot(self.tensor_a(n).reshape(-1), self.permuted_b(n, perms).reshape(-1)).double())
                         for n in self.names))

    def norms(self) -> tuple[float, float]:
        """Frobenius norms of A's and B's touched tensors (float64)."""
        na = sum(float(self.stored("a", n).double().pow(2).sum()) for n in self.names) ** 0.5
        nb = sum(float(self.stored("b", n).double().pow(2).sum()) for n in self.names) ** 0.5
        return na, nb

    def largest(self) -> int:
        """Elements of the largest touched tensor."""
        return max((math.prod(s) for s in self.shapes.values()), default=0)


def _free_bytes(device: torch.device) -> int:
    """Free memory of an accelerator (0 when it cannot be asked)."""
    try:
        return int(torch.cuda.mem_get_info(device)[0]) if device.type == "cuda" else 0
    except (RuntimeError, AssertionError):
        return 0


def weight_matching(
    spec: PermutationSpec,
    params_a: Any,
    params_b: Any,
    *,
    max_iter: int = 100,
    seed: int = 0,
    init_perms: Mapping[str, torch.Tensor] | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[[int, float], None] | None = None,
) -> MatchResult:
    """Permutations for B's groups that maximise the weight inner product with A (coordinate descent).

    `params_a`/`params_b` are state dicts or tensor stores; stores that read files are streamed (see
    :class:`WeightCosts`), so memory stays near one group's tensors rather than two fp32 models.
    """
    start = time.perf_counter()
    dev = torch.device(device)
    problem = WeightCosts(spec, params_a, params_b, dev)
    with single_threaded_if_small(problem.largest(), dev):
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
            why = check_permutation(group, init)
            if why:
                raise AlignmentError(f"init_perms[{group.name!r}]: {why}")
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
    cost_s = objective_s = 0.0
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
            if cost.is_cuda:
                torch.cuda.synchronize(cost.device)
            cost_s += time.perf_counter() - t0
            new, lap_s = timed_assign(cost, group.kind, group.head_dim, group.within_free())
            result.lap_time += lap_s
            old_score = assignment_score(cost, perms[group.name])
            new_score = assignment_score(cost, new)
            if new_score > old_score + _IMPROVEMENT:
                perms[group.name] = new
                version[group.name] += 1
                progressed = True
            result.group_time[group.name] += time.perf_counter() - t0
        result.iterations += 1
        t0 = time.perf_counter()
        value = problem.objective(perms)
        objective_s += time.perf_counter() - t0
        result.objective.append(value)
        logger.debug("weight matching pass %d: objective %.6g", result.iterations, value)
        if progress is not None:
            progress(result.iterations, value)
    result.converged = not progressed
    if not result.converged:
        logger.warning("weight matching stopped after max_iter=%d passes before converging", max_iter)
    result.stats["cosine_after"] = (result.objective[-1] if result.objective else initial) / denom
    # where the time goes: cost products (streamed reads included), assignment (`lap_time`), objective
    result.stats["cost_s"] = round(cost_s, 4)
    result.stats["objective_s"] = round(objective_s, 4)
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
        # the stores themselves, not state_dict(): only spec tensors are read, streamed from files
        return weight_matching(spec, ref_store, store, max_iter=options.max_iter,
                               seed=options.seed, device=request.device, progress=step)

    return align_permutations(request, ENGINE.name, match)


ENGINE = register_engine(Engine(
    name="weight_matching", title="Weight matching (Git Re-Basin)", description="permutation alignment by weight matching",
    papers=(REBASIN,), options=WeightMatchingOptions, align=_align, outcome="permuted",
    form_common=("seed", "repair"),
))
