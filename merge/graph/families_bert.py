"""BERT and RoBERTa encoders: post-LayerNorm blocks with absolute position embeddings.

Groups: ``residual`` (word/position/token-type embeddings, every LayerNorm, Q/K/V and intermediate columns,
attention-output and output rows and biases, and the columns of whatever reads the stream: pooler,
MLM transform, token classifier, QA head); ``layer{i}.attn`` (kind ``heads_within``: positions enter once,
at the embeddings, so a head may also reorder its dimensions); ``layer{i}.mlp`` (intermediate rows,
output columns; free); ``pooler`` (pooler rows + the sequence classifier / next-sentence head reading it);
``head`` (RoBERTa's classifier.dense rows + out_proj columns); ``mlm_head`` (an untied MLM transform).

A post-LN block computes LN(x + f(x)): LayerNorm normalises over all features, so permuting its input and
its weight/bias alike permutes its output, and the whole stream keeps one permutation across blocks.
An MLM decoder tied to the word embeddings must share their permutation, so the MLM transform's output
joins ``residual`` when tied. Relative position embeddings (``distance_embedding``) are shared by a layer's
heads and index the Q/K head dimensions, so with them (kind ``heads``) Q/K dimensions stay in order; V/O
dimensions may still move within heads.
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
)

_ANCHOR = r"encoder\.layer\.\d+\.attention\.self\.query\.weight"


def build_bert(b: SpecBuilder, config: Mapping[str, Any] | None) -> None:
    """Fill `b` with the BERT / RoBERTa groups."""
    cfg = config or {}
    names = list(b.shapes)
    prefix = find_prefix(names, _ANCHOR, b.family, "<prefix>encoder.layer.<i>.attention.self.query.weight")
    top = parent_of(prefix)
    R = RESIDUAL
    E = prefix + "embeddings."
    for emb in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        b.add(R, E + emb + ".weight", 1, "out", required=emb == "word_embeddings")
    b.add(R, E + "LayerNorm.weight", 0, "out", required=True)
    b.add(R, E + "LayerNorm.bias", 0, "out")
    b.known(E + "position_ids", E + "token_type_ids")
    hidden = config_int(cfg, "hidden_size") or b.shapes[E + "word_embeddings.weight"][1]
    layout = head_layout(cfg, hidden, b.family)
    relative = str(cfg.get("position_embedding_type") or "absolute") != "absolute"
    for i in layer_indices(names, prefix + "encoder.layer."):
        L = f"{prefix}encoder.layer.{i}."
        A, M = f"layer{i}.attn", f"layer{i}.mlp"
        S = L + "attention.self."
        for x in ("query", "key", "value"):
            b.add(R, S + x + ".weight", 1, "in", required=True)
        dist = S + "distance_embedding.weight"
        b.known(dist)
        kind = "heads" if relative or b.has(dist) else "heads_within"
        add_attention(b, A, S + "query", S + "key", S + "value", L + "attention.output.dense", layout, kind)
        b.add(R, L + "attention.output.dense.weight", 0, "out")
        b.add(R, L + "attention.output.dense.bias", 0, "out")
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            b.add(R, L + ln + ".weight", 0, "out", required=True)
            b.add(R, L + ln + ".bias", 0, "out")
        b.add(M, L + "intermediate.dense.weight", 0, "out", required=True)
        b.add(M, L + "intermediate.dense.bias", 0, "out")
        b.add(R, L + "intermediate.dense.weight", 1, "in")
        b.add(M, L + "output.dense.weight", 1, "in", required=True)
        b.add(R, L + "output.dense.weight", 0, "out")
        b.add(R, L + "output.dense.bias", 0, "out")
    _add_heads(b, prefix, top, cfg)


def _add_heads(b: SpecBuilder, prefix: str, top: str, cfg: Mapping[str, Any]) -> None:
    R, P, H = RESIDUAL, "pooler", "head"
    pooled = b.add(R, prefix + "pooler.dense.weight", 1, "in")
    if pooled:
        b.add(P, prefix + "pooler.dense.weight", 0, "out")
        b.add(P, prefix + "pooler.dense.bias", 0, "out")
    readers_of_stream = 0
    readers_of_pooler = 0
    # BertFor{Sequence,MultipleChoice}Classification read the pooler; token classification has no pooler
    if b.has(top + "classifier.weight"):
        if pooled:
            readers_of_pooler += b.add(P, top + "classifier.weight", 1, "in")
        else:
            readers_of_stream += b.add(R, top + "classifier.weight", 1, "in")
    readers_of_pooler += b.add(P, top + "cls.seq_relationship.weight", 1, "in") if pooled else 0
    b.known(top + "classifier.bias", top + "cls.seq_relationship.bias")
    readers_of_stream += b.add(R, top + "qa_outputs.weight", 1, "in")
    b.known(top + "qa_outputs.bias")
    # RoBERTa sequence classifier: dense (on the <s> token) -> tanh -> out_proj
    if b.add(R, top + "classifier.dense.weight", 1, "in"):
        readers_of_stream += 1
        b.add(H, top + "classifier.dense.weight", 0, "out")
        b.add(H, top + "classifier.dense.bias", 0, "out")
        b.add(H, top + "classifier.out_proj.weight", 1, "in", required=True)
        b.known(top + "classifier.out_proj.bias")
    # MLM heads: transform dense -> act -> LayerNorm -> decoder (tied to word embeddings by default)
    tied = bool(cfg.get("tie_word_embeddings", True))
    for dense, norm, decoder, biases in (
        ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm", "cls.predictions.decoder",
         ("cls.predictions.bias", "cls.predictions.decoder.bias")),
        ("lm_head.dense", "lm_head.layer_norm", "lm_head.decoder", ("lm_head.bias", "lm_head.decoder.bias")),
    ):
        if not b.add(R, top + dense + ".weight", 1, "in"):
            continue
        readers_of_stream += 1
        group = R if tied else "mlm_head"
        b.add(group, top + dense + ".weight", 0, "out")
        b.add(group, top + dense + ".bias", 0, "out")
        b.add(group, top + norm + ".weight", 0, "out")
        b.add(group, top + norm + ".bias", 0, "out")
        b.add(group, top + decoder + ".weight", 1, "in")
        b.known(*(top + x for x in biases))
    if not (readers_of_stream or readers_of_pooler or declares_head(cfg)):
        # a bare encoder: its last hidden state and pooler output are what callers read
        b.output_group(R, "the last hidden state")
        if pooled:
            b.output_group(P, "the pooler output")


def _detect(names: list[str]) -> str | None:
    hits = [n for n in names if n.endswith(".attention.self.query.weight")]
    if not hits:
        return None
    return "roberta" if any(n.startswith("roberta.") for n in hits) else "bert"


FAMILY = Family(("bert", "roberta"), build_bert, _detect)
