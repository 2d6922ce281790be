"""GPT-2: pre-LayerNorm blocks whose `Conv1D` layers store weights as (in, out), with Q/K/V fused in c_attn.

Groups: ``residual`` (wte, wpe, ln_1/ln_2/ln_f, c_attn and c_fc rows, both c_proj columns and biases,
lm_head / score columns), ``layer{i}.mlp`` (c_fc columns and bias, mlp.c_proj rows; free) and
``layer{i}.attn`` (kind ``heads_within``: positions are learned embeddings added to the stream, so nothing
ties a head's dimensions to fixed pairs and a within-head permutation is allowed, as for BERT and ViT).
c_attn's output axis (weight axis 1, bias axis 0) is laid out (3, heads, head_dim) with the Q, K and V blocks
side by side; its members carry ``outer=3`` and parts ``(qk, qk, vo)``, so the one head permutation acts on
each block alike while Q/K and V may take their own within-head permutations. attn.c_proj reads the heads
through its input axis, weight axis 0 (the ``in`` member, part ``vo``).
Without ``n_head`` in config.json the head size is unknown and the attention groups stay frozen.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from suture.merge.graph.families_attention import head_layout
from suture.merge.graph.families_common import (
    RESIDUAL,
    Family,
    SpecBuilder,
    config_int,
    declares_head,
    find_prefix,
    layer_indices,
    parent_of,
    suffix_rule,
)

_ANCHOR = r"h\.\d+\.attn\.c_attn\.weight"
_QKV = 3  # c_attn's output axis holds the Q, K and V blocks in this order
_QKV_PARTS = ("qk", "qk", "vo")


def build_gpt2(b: SpecBuilder, config: Mapping[str, Any] | None) -> None:
    """Fill `b` with the GPT-2 groups."""
    names = list(b.shapes)
    prefix = find_prefix(names, _ANCHOR, b.family, "<prefix>h.<i>.attn.c_attn.weight")
    top = parent_of(prefix)
    R = RESIDUAL
    b.add(R, prefix + "wte.weight", 1, "out", required=True)
    b.add(R, prefix + "wpe.weight", 1, "out")
    hidden = config_int(config, "n_embd", "hidden_size")
    if hidden is None:
        hidden = b.shapes[prefix + "wte.weight"][1]
    layout = head_layout(config, hidden, b.family)
    for i in layer_indices(names, prefix + "h."):
        L = f"{prefix}h.{i}."
        A, M = f"layer{i}.attn", f"layer{i}.mlp"
        for ln in ("ln_1", "ln_2"):
            b.add(R, L + f"{ln}.weight", 0, "out", required=True)
            b.add(R, L + f"{ln}.bias", 0, "out")
        b.add(R, L + "attn.c_attn.weight", 0, "in", required=True)
        _add_fused_attention(b, A, L + "attn.", layout)
        b.known(L + "attn.bias", L + "attn.masked_bias")
        b.add(R, L + "attn.c_proj.weight", 1, "out")
        b.add(R, L + "attn.c_proj.bias", 0, "out")
        b.add(M, L + "mlp.c_fc.weight", 1, "out", required=True)
        b.add(M, L + "mlp.c_fc.bias", 0, "out")
        b.add(R, L + "mlp.c_fc.weight", 0, "in")
        b.add(M, L + "mlp.c_proj.weight", 0, "in", required=True)
        b.add(R, L + "mlp.c_proj.weight", 1, "out")
        b.add(R, L + "mlp.c_proj.bias", 0, "out")
    b.add(R, prefix + "ln_f.weight", 0, "out", required=True)
    b.add(R, prefix + "ln_f.bias", 0, "out")
    heads = [b.add(R, top + head, 1, "in") for head in ("lm_head.weight", "score.weight", "classifier.weight")]
    if not any(heads) and not declares_head(config):
        b.output_group(R, "the last hidden state")


def _add_fused_attention(b: SpecBuilder, group: str, attn: str, layout: tuple[int, int, int] | None) -> None:
    """One group over c_attn's fused (Q, K, V) output axis and c_proj's input axis (Conv1D: weights (in, out))."""
    b.add(group, attn + "c_attn.weight", 1, "out", outer=_QKV, required=True, parts=_QKV_PARTS)
    b.add(group, attn + "c_attn.bias", 0, "out", outer=_QKV, parts=_QKV_PARTS)
    b.add(group, attn + "c_proj.weight", 0, "in", required=True, parts=("vo",))
    if layout is None:
        b.declare(group, frozen_reason="head count unknown: config.json has no n_head")
        return
    n_heads, _n_kv, head_dim = layout  # GPT-2 has no grouped-query attention: K and V have all n_head heads
    b.declare(group, "heads_within", head_dim=head_dim, size=n_heads * head_dim)


FAMILY = Family(("gpt2",), build_gpt2, suffix_rule(".attn.c_attn.weight", "gpt2"))
