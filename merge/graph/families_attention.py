"""The attention group shared by the transformer families: heads of Q, K, V and O move together.

See the module docstring of :mod:`merge.graph.families` for the function-preserving moves: Q and K members
are marked part ``qk``, V and O members part ``vo``, so the group may take a different within-head
permutation for each part (:mod:`merge.spec`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from suture.merge.errors import InputError
from suture.merge.graph.families_common import SpecBuilder, config_int
from suture.merge.spec import GroupKind


def head_layout(config: Mapping[str, Any] | None, hidden: int | None, family: str) -> tuple[int, int, int] | None:
    """(n_heads, n_kv_heads, head_dim) from config.json, or None when the config does not say."""
    n_heads = config_int(config, "num_attention_heads", "n_head", "num_heads")
    if n_heads is None:
        return None
    n_kv = config_int(config, "num_key_value_heads", "n_kv_heads") or n_heads
    head_dim = config_int(config, "head_dim")
    if head_dim is None:
        if hidden is None or hidden % n_heads:
            raise InputError(
                f"family {family!r}: config.json num_attention_heads={n_heads} does not divide hidden size {hidden}"
            )
        head_dim = hidden // n_heads
    if n_heads % n_kv:
        raise InputError(
            f"family {family!r}: config.json num_key_value_heads={n_kv} does not divide num_attention_heads={n_heads}"
        )
    return n_heads, n_kv, head_dim


def add_attention(
    b: SpecBuilder,
    group: str,
    q: str,
    k: str,
    v: str,
    o: str,
    layout: tuple[int, int, int] | None,
    kind: GroupKind,
) -> None:
    """One group over Q/K/V rows (weights `<x>.weight`, biases `<x>.bias`) and O's input columns.

    `q`, `k`, `v`, `o` are module paths of Linear layers (weights stored (out, in)). With grouped-query
    attention Q's rows and O's columns are laid out (n_kv_heads, n_heads // n_kv_heads, head_dim), so their
    members carry that repeat and follow their KV head.
    """
    repeat = 1
    if layout is not None:
        n_heads, n_kv, head_dim = layout
        repeat = n_heads // n_kv
    elif b.has(q + ".weight") and b.has(k + ".weight"):
        # no head count: Q and K row counts still give the GQA ratio, enough to describe the (frozen) group
        q_rows, k_rows = b.shapes[q + ".weight"][0], b.shapes[k + ".weight"][0]
        repeat = q_rows // k_rows if k_rows and q_rows % k_rows == 0 else 1
    for name, rep, part in ((q, repeat, "qk"), (k, 1, "qk"), (v, 1, "vo")):
        b.add(group, name + ".weight", 0, "out", repeat=rep, required=True, parts=(part,))
        b.add(group, name + ".bias", 0, "out", repeat=rep, parts=(part,))
    b.add(group, o + ".weight", 1, "in", repeat=repeat, required=True, parts=("vo",))
    if layout is None:
        kv_rows = b.shapes[k + ".weight"][0]
        # a frozen group is never permuted; head_dim = its whole width keeps the repeat layout well defined
        reason = "head count unknown: config.json has no num_attention_heads"
        b.declare(group, "free", head_dim=kv_rows, frozen_reason=reason)
        return
    n_heads, n_kv, head_dim = layout
    b.declare(group, kind, head_dim=head_dim, size=n_kv * head_dim)
