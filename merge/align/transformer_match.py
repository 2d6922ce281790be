"""Activation matching for transformers (Verma & Elbayad, 2024, "Merging Text Transformer Models from
Different Initializations"): which features decide each permutation group of a transformers model.

Plain activation matching observes each group at one module. In a transformer that is the wrong evidence:

* the residual stream is one permutation shared by every block, so it is matched once on features pooled
  over all its sites: the output of every norm on the stream, i.e. the stream as each sublayer reads it
  (pre-LN, GPT-2: the embeddings output and every residual add, normalised) or the stream itself (post-LN,
  BERT). Samples of all sites are stacked, so one correlation matrix over all of them decides the
  permutation. On the two-seed GPT-2 pair of ``benchmarks/lm_pairs.py`` the normalised stream gave a lower
  midpoint barrier than the raw one (the norms' inputs): 0.41 vs 0.44 nats, naive 0.89;
* an attention block's units are heads: whole heads are paired first, scored by how well the head outputs
  (the per-head context vectors the output projection reads), and for split groups also the Q/K features,
  can be matched within the head, then each pair of heads gets its within-head assignments. The derived
  spec marks Q/K and V/O members (split groups,
  :mod:`merge.spec`), so Q/K dimensions are matched on the Q and K features and V/O dimensions on the V
  features and the head outputs, each pair its own order (a 2-row permutation); RoPE families (kind
  ``heads``) keep Q/K dimensions in order. Unmarked groups keep one order for all four, matched on the
  correlation summed over Q, K, V and the head outputs;
* MLP units are matched on their activations (the input of the down projection, after the nonlinearity).

The permutations are applied through the derived spec, so the aligned model computes exactly what it did.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from suture.merge.align import MatchResult
from suture.merge.align.activation_matching import collect_paired, finish_match
from suture.merge.align.assignment import assignment_score, head_pair_scores, heads_then_within, solve_lap
from suture.merge.errors import AlignmentError
from suture.merge.graph.families_common import RESIDUAL
from suture.merge.measure import Site
from suture.merge.spec import Member, Part, PermGroup, PermutationSpec, collapse_rows

logger = logging.getLogger(__name__)

HEAD_OUTPUTS = "heads_out"  # role of the per-head context vectors (the output projection's input)
SEP = "\x1f"  # joins a group name and a feature role into one statistics key


def _columns(x: torch.Tensor, start: int = 0, width: int | None = None) -> torch.Tensor:
    """Rows = every token of the batch, columns = the features [start, start + width) of the last axis."""
    width = x.shape[-1] - start if width is None else width
    return x[..., start:start + width].reshape(-1, width)


def _site(module: str, where: str, label: str, start: int = 0, width: int | None = None) -> Site:
    return Site(module, where, lambda x: _columns(x, start, width), label)  # type: ignore[arg-type]


def _weight_side(mod: nn.Module, member: Member) -> str | None:
    """'output' when the member's axis indexes the module's outputs, 'input' for its inputs, else None."""
    weight = getattr(mod, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    axis = member.axis % weight.dim()
    kind = type(mod).__name__
    if weight.dim() == 1 and "Norm" in kind:
        return "norm"
    if isinstance(mod, nn.Linear):
        return "output" if axis == 0 else "input"
    if kind == "Conv1D":  # transformers' GPT-2 layer stores its weight (in, out)
        return "output" if axis == 1 else "input"
    if isinstance(mod, nn.Embedding) and axis == 1:
        return "output"
    return None


def transformer_sites(spec: PermutationSpec, module: nn.Module) -> dict[str, dict[str, list[Site]]]:
    """group -> feature role -> the module inputs/outputs whose last axis carries the group's units.

    Roles: ``stream`` (residual: the output of every norm on it, pooled), ``out0``/``out1``/... (Q, K, V in member order, or the
    blocks of a fused QKV projection), ``heads_out`` (what the attention output projection reads) and
    ``units`` (other groups: the reading layer's input, else the writing layer's output). Members laid out
    with grouped-query repeats are not observed (Q heads tied to a KV head); K and V still are.
    """
    return _sites_and_parts(spec, module)[0]


def _sites_and_parts(spec: PermutationSpec, module: nn.Module) -> tuple[dict[str, dict[str, list[Site]]], dict[str, dict[str, Part]]]:
    """:func:`transformer_sites`, plus group -> ``out<i>`` role -> its Q/K or V/O part (marked members only)."""
    modules = dict(module.named_modules())
    sites: dict[str, dict[str, list[Site]]] = {}
    parts: dict[str, dict[str, Part]] = {}
    for group in spec.active_groups():
        roles: dict[str, list[Site]] = {}
        fallback: list[Site] = []
        n_out = 0
        seen: set[tuple[str, str, int]] = set()
        for m in group.members:
            if m.repeat != 1 or m.inner != 1 or not m.tensor.endswith(".weight"):
                continue
            owner = m.tensor.removesuffix(".weight")
            mod = modules.get(owner)
            side = _weight_side(mod, m) if mod is not None else None
            if side is None:
                continue
            label = f"group {group.name!r}"
            if group.name == RESIDUAL:
                if side == "norm" and (owner, "output", 0) not in seen:
                    seen.add((owner, "output", 0))
                    roles.setdefault("stream", []).append(_site(owner, "output", label))
                continue
            if side == "norm":
                side = "output"
            if group.kind != "free":  # attention: Q/K/V blocks and the head outputs, each its own role
                if side == "input":
                    roles.setdefault(HEAD_OUTPUTS, []).append(_site(owner, "input", label))
                    continue
                for block in range(m.outer):
                    roles[f"out{n_out}"] = [_site(owner, "output", label, block * group.size, group.size)]
                    if m.parts:
                        parts.setdefault(group.name, {})[f"out{n_out}"] = m.part_of(block)
                    n_out += 1
                continue
            if m.outer != 1 or (owner, side, 0) in seen:
                continue
            seen.add((owner, side, 0))
            (roles.setdefault("units", []) if side == "input" else fallback).append(_site(owner, side, label))
        if group.kind == "free" and "units" not in roles and fallback and group.name != RESIDUAL:
            roles["units"] = fallback
        if roles:
            sites[group.name] = roles
    return sites, parts


def assign_heads(head_cost: torch.Tensor, within_cost: torch.Tensor, head_dim: int, *, within: bool) -> torch.Tensor:
    """Whole heads first, then dimensions within each paired head.

    Heads are paired by one linear assignment on `head_cost`'s head-pair scores (the best within-head matching
    of each (head of A, head of B) block, or the block trace when dimensions must stay in order); each pair then
    takes the within-head assignment that maximises `within_cost`'s block.
    """
    return assign_head_parts(head_cost, [within_cost], head_dim, within=(within,))


def match_transformer(
    spec: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    batches: Iterable[Any],
    *,
    device: str | torch.device = "cpu",
    max_batches: int | None = None,
    input_fn: Callable[[Any], tuple[tuple, dict]] | None = None,
    progress: Callable[[int, float], None] | None = None,
    engine: str = "activation_matching",
) -> MatchResult:
    """Permutations for B's groups from correlations of A's and B's features on the same calibration batches."""
    start = time.perf_counter()
    sites, parts = _sites_and_parts(spec, model_a)
    result = MatchResult(perms={}, engine=engine)
    for g in spec.active_groups():
        if g.name not in sites:
            result.skipped[g.name] = "no module input or output carries this group"
    if not sites:
        raise AlignmentError("none of the spec's groups can be observed in this transformers model")
    keyed = {f"{group}{SEP}{role}": s for group, roles in sites.items() for role, s in roles.items()}

    stats = collect_paired(model_a, model_b, keyed, batches, device=device, max_batches=max_batches,
                           input_fn=input_fn, progress=progress)
    before = after = 0.0
    units = 0
    for g in spec.active_groups():
        roles = {key.split(SEP, 1)[1]: st for key, st in stats.items() if key.split(SEP, 1)[0] == g.name}
        if not roles:
            result.skipped.setdefault(g.name, "no features were captured")
            continue
        for role, st in roles.items():
            if st.n != g.size:
                raise AlignmentError(f"group {g.name!r} has {g.size} units but its {role} features have {st.n}")
        t0 = time.perf_counter()
        corrs = {role: st.cross_corr().float().cpu() for role, st in roles.items()}
        total = sum(corrs.values()) / len(corrs)
        result.perms[g.name], scored = _assign(g, corrs, total, parts.get(g.name, {}))
        result.group_time[g.name] = time.perf_counter() - t0
        before += assignment_score(scored, torch.arange(g.size))
        after += assignment_score(scored, result.perms[g.name])
        units += g.size
        result.stats[f"corr_{_kind(g)}"] = result.stats.get(f"corr_{_kind(g)}", 0.0) + assignment_score(
            scored, result.perms[g.name])
        result.stats[f"units_{_kind(g)}"] = result.stats.get(f"units_{_kind(g)}", 0) + g.size
    for kind in ("residual", "attention", "mlp"):
        if f"units_{kind}" in result.stats:
            result.stats[f"mean_corr_{kind}"] = result.stats.pop(f"corr_{kind}") / result.stats.pop(f"units_{kind}")
    return finish_match(result, before, after, units, start, progress)


def _kind(group: PermGroup) -> str:
    if group.name == RESIDUAL:
        return "residual"
    return "mlp" if group.kind == "free" else "attention"


def _assign(group: PermGroup, corrs: Mapping[str, torch.Tensor], total: torch.Tensor,
            parts: Mapping[str, Part]) -> tuple[torch.Tensor, torch.Tensor]:
    """One group's permutation, and the correlation it is scored on: free units by total correlation,
    attention as heads then within heads (for a split group, heads paired on the head outputs and the Q/K
    features together, then Q/K within heads on the Q and K features, V/O on the V features and head outputs;
    scored on both parts' correlations, half each, a (2, n, n) cost)."""
    if group.kind == "free":
        return solve_lap(total), total
    if not group.head_dim:
        raise AlignmentError(f"attention group {group.name!r} has no head size")
    heads = corrs.get(HEAD_OUTPUTS, total)
    if not group.split:
        return assign_heads(heads, total, group.head_dim, within=group.kind == "heads_within"), total
    qk = _mean([c for role, c in corrs.items() if parts.get(role) == "qk"], total)
    vo = _mean([c for role, c in corrs.items() if parts.get(role) == "vo" or role == HEAD_OUTPUTS], total)
    perm = assign_head_parts(heads, [qk, vo], group.head_dim, within=group.within_free(), pair_qk=True)
    return perm, torch.stack([qk, vo]) / 2


def _mean(costs: list[torch.Tensor], fallback: torch.Tensor) -> torch.Tensor:
    return sum(costs) / len(costs) if costs else fallback


def assign_head_parts(head_cost: torch.Tensor, part_costs: Sequence[torch.Tensor], head_dim: int, *,
                      within: Sequence[bool], pair_qk: bool = False) -> torch.Tensor:
    """Whole heads paired on `head_cost` (the head outputs: scored by their best within-head matching when the
    last part, V/O, may move dimensions, else by the block trace), plus with `pair_qk` the first part's (Q/K)
    head-pair scores, as weight matching pairs heads on both parts; then each part (Q/K, V/O) its own
    within-head assignment on its cost where `within` allows: one row per part (1-D when the rows agree).

    Pairing on the Q/K features too: on the seeds 1/2 BERT pair of ``benchmarks/transformer_align.py`` the
    pooled midpoint barrier went from 0.0204 to 0.0199 nats, on seeds 3/4 from 0.0046 to 0.0020 (GPT-2 kept the
    same pairing on both: 0.4137 and 0.4418)."""
    n = head_cost.shape[0]
    if n % head_dim:
        raise AlignmentError(f"attention group of size {n} is not a whole number of heads of size {head_dim}")
    scores, _ = head_pair_scores(head_cost, head_dim, within=within[-1])
    if pair_qk:
        scores = scores.double() + head_pair_scores(part_costs[0], head_dim, within=within[0])[0].double()
    head_perm = solve_lap(scores)
    rows = [heads_then_within(head_perm, _within_orders(cost, head_perm, head_dim) if free else None, head_dim)
            for cost, free in zip(part_costs, within)]
    return collapse_rows(torch.stack(rows))


def _within_orders(cost: torch.Tensor, head_perm: torch.Tensor, head_dim: int) -> dict[tuple[int, int], torch.Tensor]:
    """(head of A, paired head of B) -> the within-head assignment on that block of `cost`."""
    heads = cost.shape[0] // head_dim
    blocks = cost.reshape(heads, head_dim, heads, head_dim)
    return {(h, g): solve_lap(blocks[h, :, g, :]) for h, g in enumerate(head_perm.tolist())}
