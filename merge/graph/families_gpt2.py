"""GPT-2: pre-LayerNorm blocks whose `Conv1D` layers store weights as (in, out), with Q/K/V fused in c_attn.

Groups: ``residual`` (wte, wpe, ln_1/ln_2/ln_f, c_attn and c_fc rows, both c_proj columns and biases,
lm_head / score columns), ``layer{i}.mlp`` (c_fc columns and bias, mlp.c_proj rows; free) and
``layer{i}.attn``, which is frozen: c_attn's output axis is laid out (3, heads, head_dim) with the Q, K and V
blocks side by side, and a spec member covers a whole axis, so the head structure cannot be written down
for it. Permuting heads needs the spec to give one axis several member slices (or a fused (chunks, units)
layout).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from merge.graph.families_common import RESIDUAL, SpecBuilder, declares_head, find_prefix, layer_indices, parent_of

_ANCHOR = r"h\.\d+\.attn\.c_attn\.weight"
_FUSED_REASON = (
    "Q, K and V are fused in c_attn's output axis (3, heads, head_dim); a spec member spans a whole axis, "
    "so heads cannot be permuted until the spec can slice one axis into several members"
)


def build_gpt2(b: SpecBuilder, config: Mapping[str, Any] | None) -> None:
    """Fill `b` with the GPT-2 groups."""
    names = list(b.shapes)
    prefix = find_prefix(names, _ANCHOR, b.family, "<prefix>h.<i>.attn.c_attn.weight")
    top = parent_of(prefix)
    R = RESIDUAL
    b.add(R, prefix + "wte.weight", 1, "out", required=True)
    b.add(R, prefix + "wpe.weight", 1, "out")
    for i in layer_indices(names, prefix + "h."):
        L = f"{prefix}h.{i}."
        A, M = f"layer{i}.attn", f"layer{i}.mlp"
        for ln in ("ln_1", "ln_2"):
            b.add(R, L + f"{ln}.weight", 0, "out", required=True)
            b.add(R, L + f"{ln}.bias", 0, "out")
        b.add(R, L + "attn.c_attn.weight", 0, "in", required=True)
        b.add(A, L + "attn.c_proj.weight", 0, "in", required=True)
        b.declare(A, frozen_reason=_FUSED_REASON)
        b.known(L + "attn.c_attn.bias", L + "attn.bias", L + "attn.masked_bias")
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
