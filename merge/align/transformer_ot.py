"""OT fusion for transformers (Imfeld, Graldi, Giordano, Hofmann, Anagnostidis & Singh, "Transformer Fusion
with Optimal Transport", ICLR 2024): soft transport through attention heads, the residual stream and
LayerNorm, also between transformers of different widths.

:mod:`merge.align.ot` transports model B onto the reference group by group; this module supplies what is
specific to transformers:

* **Attention heads** (:func:`head_plan`). Imfeld et al. transport Q, K and V like fully connected layers
  over all of a block's units (their "cross-head alignment", which lets a unit move to another head) and
  find that soft (Sinkhorn) plans matter for transformers. Here the plan keeps the head structure instead:
  heads are the units of the transport plan, a ``(heads of B, heads of A)`` plan with the group's solver
  (``emd`` or ``sinkhorn``); the cost of a pair of heads is the mean unit cost after the best within-head
  assignment of their dimensions (kind ``heads_within``; RoPE heads, kind ``heads``, keep their dimensions
  in order), and the unit plan is ``P[g, h] / head_dim`` on the paired dimensions. So Q and K (and V and the
  output projection) of a fused head always come from the same heads of B with the same dimension
  pairing, the attention logits ``q . k`` of an exact plan are B's own, and for equal widths the exact
  plan is a head permutation (B's function unchanged). Different head counts give a rectangular plan:
  each reference head becomes a convex combination of B's heads (OTFusion's correction in
  :mod:`merge.align.ot`), and heads must have the same ``head_dim`` in both models.
* **Residual stream** (one group in the family specs): ONE transport for the whole stream, shared by the
  embeddings, every writer (attention output and MLP down projections), every reader (Q/K/V, MLP up, LM
  head) and every LayerNorm's weight and bias (transported as out members, like biases, as Imfeld et al.
  do). Imfeld et al. compute a map per layer and combine the residual branch's and the sublayer's maps by
  a residual policy; a single stream map needs no policy and is exact for permuted copies. LayerNorm is
  equivariant to permutations only: a soft or rectangular stream plan changes its statistics slightly,
  which is part of the zero-shot gap the paper closes by fine-tuning.
* **Activation ground metric** (:func:`collect_transformer_moments`): features where activation matching
  for transformers observes each group (:func:`merge.align.transformer_match.transformer_sites`): the
  residual stream as every norm on it outputs it, pooled over all those sites; an attention block's Q, K
  and V outputs and its head outputs (the output projection's input), pooled; MLP units at the down
  projection's input. Pooling stacks the sites' samples, so one euclidean (or cosine) cost per group
  compares units over all of them. The two models may have different widths: each is observed at its own
  sites, paired by module and role.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from suture.merge.align.assignment import head_pair_scores
from suture.merge.align.ot_features import UnitMoments, moments_at
from suture.merge.align.ot_solve import SolveInfo, Solver, normalize_cost, solve_plan
from suture.merge.align.transformer_match import transformer_sites
from suture.merge.errors import AlignmentError
from suture.merge.spec import PermGroup, PermutationSpec

logger = logging.getLogger(__name__)


def head_blocks(group_a: PermGroup, group_b: PermGroup) -> tuple[int, int, int]:
    """(heads of B, heads of A, head_dim) of an attention group, refusing layouts a head plan cannot pair."""
    if not group_a.head_dim or group_a.head_dim != group_b.head_dim:
        raise AlignmentError(f"group {group_a.name!r}: heads of size {group_b.head_dim} in model B and {group_a.head_dim} in "
                             "the reference; attention heads are transported whole, so head sizes must match")
    d = group_a.head_dim
    if group_a.size % d or group_b.size % d:
        raise AlignmentError(f"group {group_a.name!r}: widths {group_b.size} (model B) and {group_a.size} (reference) are "
                             f"not whole numbers of heads of size {d}")
    return group_b.size // d, group_a.size // d, d


def head_plan(
    cost: torch.Tensor,
    group_a: PermGroup,
    group_b: PermGroup,
    mass_b: torch.Tensor,
    mass_a: torch.Tensor,
    *,
    solver: Solver,
    reg: float,
    max_iter: int,
    stop_thr: float,
    uniform: bool,
    normalize: bool = True,
) -> tuple[torch.Tensor, SolveInfo, torch.Tensor]:
    """(unit plan (n_b, n_a), how the head plan was solved, head plan (heads_b, heads_a)) from a unit cost.

    Heads are the transported units; dimensions within a paired head follow the best within-head
    assignment (kind ``heads_within``) or stay in order (kind ``heads``).
    """
    hb, ha, d = head_blocks(group_a, group_b)
    if tuple(cost.shape) != (group_b.size, group_a.size):
        raise AlignmentError(f"group {group_a.name!r}: cost of shape {tuple(cost.shape)}, expected {(group_b.size, group_a.size)}")
    within = group_a.kind == "heads_within" and group_b.kind == "heads_within"
    # the best within-head matching of every (head of A, head of B) pair, as a score to maximise: minus the cost;
    # pairing[h, g, i] is B's dimension sent to A's dimension i (None: in order)
    scores, pairing = head_pair_scores(-cost.detach().to("cpu", torch.float64).T, d, within=within)
    heads = (-scores.T / d).to(cost.device)  # (heads of B, heads of A): mean unit cost of the pair
    if normalize:
        heads = normalize_cost(heads)
    heads_b = mass_b.reshape(hb, d).sum(1)
    heads_a = mass_a.reshape(ha, d).sum(1)
    plan_h, info = solve_plan(heads, heads_b, heads_a, solver=solver, reg=reg, max_iter=max_iter, stop_thr=stop_thr,
                              uniform=uniform)
    plan_h = plan_h.to(cost.device, torch.float64)
    logger.debug("group %s: %d heads of B onto %d heads of the reference by %s", group_a.name, hb, ha, info.method)
    plan = torch.zeros(group_b.size, group_a.size, dtype=torch.float64, device=cost.device)
    dims = torch.arange(d, device=cost.device)
    for g, h in torch.nonzero(plan_h > 0).tolist():
        dims_b = dims if pairing is None else pairing[h, g].to(cost.device)
        plan[g * d + dims_b, h * d + dims] = plan_h[g, h] / d
    return plan, info, plan_h


def _paired_sites(spec_a: PermutationSpec, spec_b: PermutationSpec, module_a: nn.Module, module_b: nn.Module) -> tuple[dict, dict]:
    """Sites of A and of B keyed alike (group, role, index): the same modules, each sliced at its own widths."""
    sites_a, sites_b = transformer_sites(spec_a, module_a), transformer_sites(spec_b, module_b)
    keyed_a, keyed_b = {}, {}
    for group, roles in sites_a.items():
        for role, sa in roles.items():
            sb = sites_b.get(group, {}).get(role, [])
            if len(sb) != len(sa) or [s.module for s in sa] != [s.module for s in sb]:
                raise AlignmentError(f"group {group!r} is observed at {[s.module for s in sa]} in the reference but at "
                                     f"{[s.module for s in sb]} in model B: the models' graphs differ")
            for i, (x, y) in enumerate(zip(sa, sb)):
                keyed_a[(group, role, i)], keyed_b[(group, role, i)] = x, y
    return keyed_a, keyed_b


def collect_transformer_moments(
    spec_a: PermutationSpec,
    spec_b: PermutationSpec,
    module_a: nn.Module,
    module_b: nn.Module,
    batches: Iterable[Any],
    *,
    device: str | torch.device = "cpu",
    max_batches: int | None = None,
) -> dict[str, UnitMoments]:
    """Per group, unit moments of A and B over all the group's sites and roles (samples stacked), same inputs."""
    sites_a, sites_b = _paired_sites(spec_a, spec_b, module_a, module_b)
    if not sites_a:
        raise AlignmentError("none of the spec's groups can be observed in this transformers model")
    return moments_at(module_a, module_b, sites_a, sites_b, batches, device=device, max_batches=max_batches)
