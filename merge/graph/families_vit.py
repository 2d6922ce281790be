"""ViT (Hugging Face ViTModel / ViTForImageClassification): pre-LayerNorm blocks over patch tokens.

Both tensor namings are understood: checkpoints on disk (``encoder.layer.N.attention.attention.query``,
``intermediate.dense``, ``output.dense``) and the names recent transformers versions use in memory
(``layers.N.attention.q_proj``, ``mlp.fc1``, ``mlp.fc2``).

Groups: ``residual`` (patch-embedding conv rows + bias, cls/mask token and position embeddings on their
last axis, layernorm_before/after, Q/K/V and fc1 columns, O and fc2 rows, final layernorm, pooler and
classifier columns); ``layer{i}.attn`` (kind ``heads_within``: absolute positions are added once, at the
embeddings); ``layer{i}.mlp`` (free); ``pooler`` (pooler rows).
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

_ANCHOR = r"(?:layers|encoder\.layer)\.\d+\.layernorm_before\.weight"

# stack name -> (q, k, v, o, fc1, fc2) module paths inside a block
_SCHEMES = {
    "encoder.layer.": (
        "attention.attention.query", "attention.attention.key", "attention.attention.value",
        "attention.output.dense", "intermediate.dense", "output.dense",
    ),
    "layers.": (
        "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2",
    ),
}


def build_vit(b: SpecBuilder, config: Mapping[str, Any] | None) -> None:
    """Fill `b` with the ViT groups."""
    names = list(b.shapes)
    prefix = find_prefix(names, _ANCHOR, b.family, "<prefix>encoder.layer.<i>.layernorm_before.weight")
    stack = "encoder.layer." if any(n.startswith(prefix + "encoder.layer.") for n in names) else "layers."
    q, k, v, o, fc1, fc2 = _SCHEMES[stack]
    top = parent_of(prefix)
    R = RESIDUAL
    E = prefix + "embeddings."
    b.add(R, E + "patch_embeddings.projection.weight", 0, "out", required=True)
    b.add(R, E + "patch_embeddings.projection.bias", 0, "out")
    for token in ("cls_token", "mask_token", "position_embeddings"):
        b.add(R, E + token, 2, "out")
    hidden = config_int(config, "hidden_size") or b.shapes[E + "patch_embeddings.projection.weight"][0]
    layout = head_layout(config, hidden, b.family)
    for i in layer_indices(names, prefix + stack):
        L = f"{prefix}{stack}{i}."
        A, M = f"layer{i}.attn", f"layer{i}.mlp"
        for ln in ("layernorm_before", "layernorm_after"):
            b.add(R, L + ln + ".weight", 0, "out", required=True)
            b.add(R, L + ln + ".bias", 0, "out")
        for x in (q, k, v):
            b.add(R, L + x + ".weight", 1, "in", required=True)
        add_attention(b, A, L + q, L + k, L + v, L + o, layout, "heads_within")
        b.add(R, L + o + ".weight", 0, "out")
        b.add(R, L + o + ".bias", 0, "out")
        b.add(M, L + fc1 + ".weight", 0, "out", required=True)
        b.add(M, L + fc1 + ".bias", 0, "out")
        b.add(R, L + fc1 + ".weight", 1, "in")
        b.add(M, L + fc2 + ".weight", 1, "in", required=True)
        b.add(R, L + fc2 + ".weight", 0, "out")
        b.add(R, L + fc2 + ".bias", 0, "out")
    b.add(R, prefix + "layernorm.weight", 0, "out", required=True)
    b.add(R, prefix + "layernorm.bias", 0, "out")
    pooled = b.add(R, prefix + "pooler.dense.weight", 1, "in")
    if pooled:
        b.add("pooler", prefix + "pooler.dense.weight", 0, "out")
        b.add("pooler", prefix + "pooler.dense.bias", 0, "out")
    headed = b.add(R, top + "classifier.weight", 1, "in")
    b.known(top + "classifier.bias")
    if not headed and not declares_head(config):
        b.output_group(R, "the last hidden state")
        if pooled:
            b.output_group("pooler", "the pooler output")


FAMILY = Family(("vit",), build_vit, suffix_rule(".layernorm_before.weight", "vit"))
