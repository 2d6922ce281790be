"""Llama-style decoders (llama, mistral, qwen2, qwen3): pre-RMSNorm blocks, RoPE attention, gated MLP.

Groups: ``residual`` (embed_tokens, every RMSNorm, Q/K/V and gate/up columns, o_proj and down_proj rows,
lm_head / score columns), ``layer{i}.attn`` (kind ``heads``: RoPE rotates fixed dimension pairs of every
Q/K head, so Q/K dimensions stay in order while V/O ones may move within heads; GQA through
``Member.repeat``) and ``layer{i}.mlp`` (gate/up rows and
biases, down_proj columns; free). Qwen3's per-head q_norm/k_norm weights are shared by all heads, so
Q/K permutations that keep dimensions in order leave them as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from suture.merge.graph.families_attention import add_attention, head_layout
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

_ANCHOR = r"layers\.\d+\.self_attn\.q_proj\.weight"


def build_llama(b: SpecBuilder, config: Mapping[str, Any] | None) -> None:
    """Fill `b` with the llama-family groups."""
    names = list(b.shapes)
    prefix = find_prefix(names, _ANCHOR, b.family, "<prefix>layers.<i>.self_attn.q_proj.weight")
    top = parent_of(prefix)
    R = RESIDUAL
    b.add(R, prefix + "embed_tokens.weight", 1, "out")
    hidden = config_int(config, "hidden_size")
    if hidden is None and b.has(prefix + "norm.weight"):
        hidden = b.shapes[prefix + "norm.weight"][0]
    layout = head_layout(config, hidden, b.family)
    for i in layer_indices(names, prefix + "layers."):
        L = f"{prefix}layers.{i}."
        A, M = f"layer{i}.attn", f"layer{i}.mlp"
        b.add(R, L + "input_layernorm.weight", 0, "out", required=True)
        for x in ("q", "k", "v"):
            b.add(R, L + f"self_attn.{x}_proj.weight", 1, "in", required=True)
        add_attention(
            b, A, L + "self_attn.q_proj", L + "self_attn.k_proj", L + "self_attn.v_proj", L + "self_attn.o_proj",
            layout, "heads",
        )
        b.add(R, L + "self_attn.o_proj.weight", 0, "out")
        b.add(R, L + "self_attn.o_proj.bias", 0, "out")
        b.known(L + "self_attn.q_norm.weight", L + "self_attn.k_norm.weight", L + "self_attn.rotary_emb.inv_freq")
        b.add(R, L + "post_attention_layernorm.weight", 0, "out", required=True)
        for x in ("gate", "up"):
            b.add(M, L + f"mlp.{x}_proj.weight", 0, "out", required=True)
            b.add(M, L + f"mlp.{x}_proj.bias", 0, "out")
            b.add(R, L + f"mlp.{x}_proj.weight", 1, "in")
        b.add(M, L + "mlp.down_proj.weight", 1, "in", required=True)
        b.add(R, L + "mlp.down_proj.weight", 0, "out")
        b.add(R, L + "mlp.down_proj.bias", 0, "out")
    b.add(R, prefix + "norm.weight", 0, "out", required=True)
    b.known(prefix + "rotary_emb.inv_freq")
    heads = [b.add(R, top + head, 1, "in") for head in ("lm_head.weight", "score.weight")]
    if not any(heads) and not declares_head(config):
        b.output_group(R, "the last hidden state")


FAMILY = Family(("llama", "mistral", "qwen2", "qwen3"), build_llama, suffix_rule(".self_attn.q_proj.weight", "llama"))
