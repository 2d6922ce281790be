"""Permutation specs for known model families, derived from tensor names and config.json alone (no model code).

Families: ``llama`` / ``mistral`` / ``qwen2`` / ``qwen3``, ``gpt2``, ``bert`` / ``roberta``, ``vit``, and
``chain`` (plain MLP / CNN stacks; aliases ``mlp``, ``cnn``). Each ``families_<name>`` module writes its
architecture down as group memberships and declares a module-level ``FAMILY``
(:class:`~merge.graph.families_common.Family`: model types, builder, name-based detection), which this module
finds on import, so a new family is one new module. :class:`~merge.graph.families_common.SpecBuilder` sizes
the groups from the shapes and checks them. Tensors a family does not know are left untouched and listed in
``spec.notes``; no group is invented for them.

Design: every permutation a spec can draw must leave the model's function unchanged.

* Residual stream. Every tensor that writes the stream (embeddings, attention-output and MLP-output rows
  and biases) or reads it (Q/K/V, MLP-input and head columns) shares one group, ``residual``. Norms on the
  stream (LayerNorm, RMSNorm, pre- or post-LN alike) commute with a permutation when their weight and bias
  are permuted too: the statistics are taken over all features, so they join the group.
* Outputs. A group that indexes what the model returns stays in order by default, as in traced specs:
  for a bare backbone (no head tensor, and no head class in config.json's ``architectures``) the
  ``residual`` group (last hidden state) and the ``pooler`` group are frozen with that reason. Aligning two
  bare encoders needs their streams aligned too: ``permute_outputs=True`` leaves those groups free (the
  outputs then come out permuted by them, and ``spec.notes`` says so with an ``output:`` line). A tied LM
  head reads the stream through the embedding matrix, so with ``architectures`` naming an LM class the
  stream is internal even when the checkpoint stores no lm_head.
* MLP hidden units. One free group per block: up/gate/intermediate rows and biases, down/output columns.
* Attention. Head ``h`` of Q is scored against head ``h // g`` of K (``g = n_heads / n_kv_heads``, 1 without
  grouped-query attention), mixes the values of head ``h // g`` of V, and its output is read by columns block
  ``h`` of O. The function-preserving moves are: one permutation of KV heads, applied to K and V and,
  block-wise, to the Q and O head blocks that follow each KV head; a within-head permutation shared by a K
  head and all its Q heads (only the identity under RoPE, which rotates fixed pairs of dimensions); and an
  independent within-head permutation shared by a V head and its O block. A head permutation applied to
  Q/K but not to V/O (or the reverse) pairs attention patterns with the wrong values, so Q, K, V and O must
  take the same head permutation. Each attention block is therefore one group holding Q/K/V rows (and
  biases) and O's columns, with ``Member.repeat = g`` on Q and O, and every member marked with its part
  (``qk`` for Q and K, ``vo`` for V and O; :mod:`merge.spec`), so the group's permutation may carry one
  within-head permutation for Q/K and another for V/O: kind ``heads`` for RoPE families (Q/K dimensions stay
  in order, V/O may still move within heads) and ``heads_within`` for absolute-position families (BERT,
  ViT). Permuting the Q heads that share one KV head is given up.
* GPT-2 fuses Q, K and V side by side in one axis of ``c_attn``; its members carry ``Member.outer = 3``
  (the axis is three blocks, each permuted alike) and parts ``(qk, qk, vo)``, so its attention groups are
  ``heads_within`` like BERT's.

Detection: ``config.json``'s ``model_type`` decides when present (an unknown type gives ``None`` rather
than a guess: its extra tensors could read permuted axes); without it the tensor names decide.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Iterable, Mapping
from typing import Any

from suture.merge import graph
from suture.merge.errors import InputError
from suture.merge.graph.families_common import Family, SpecBuilder
from suture.merge.spec import PermutationSpec

logger = logging.getLogger(__name__)


def _discover() -> list[Family]:
    """Every ``FAMILY`` declared by a ``families_<name>`` module of this package (name order, fallbacks last).

    A module that fails to import is a bug to see, not a family to skip: its error propagates.
    """
    found = []
    for info in sorted(pkgutil.iter_modules(graph.__path__), key=lambda i: i.name):
        if info.name.startswith("families_"):
            family = getattr(importlib.import_module(f"{graph.__name__}.{info.name}"), "FAMILY", None)
            if isinstance(family, Family):
                found.append(family)
    return sorted(found, key=lambda f: f.fallback)


_FAMILIES = _discover()
FAMILIES: dict[str, Family] = {t: f for f in _FAMILIES for t in f.model_types}
ALIASES: dict[str, str] = {a: f.name for f in _FAMILIES for a in f.aliases}


def supported_families() -> list[str]:
    """Names accepted by spec_from_names(family=...)."""
    return sorted(FAMILIES) + sorted(ALIASES)


def detect_family(names: Iterable[str], config: Mapping[str, Any] | None) -> str | None:
    """The family of a checkpoint from config.json's model_type, else from its tensor names; None if unknown."""
    names = list(names)
    config = _as_dict(config)
    model_type = config.get("model_type") if config else None
    if model_type:
        family = _normalise(str(model_type))
        if family not in FAMILIES:
            logger.info("model_type %r has no name-based spec; use tracing", model_type)
            return None
        return family
    for family in _FAMILIES:
        found = family.detect(names)
        if found is not None:
            return found
    return None


def spec_from_names(
    names_to_shapes: Mapping[str, Iterable[int]],
    config: Mapping[str, Any] | None,
    family: str | None = None,
    *,
    permute_outputs: bool = False,
) -> PermutationSpec:
    """Derive a checked permutation spec from tensor names/shapes (+ config.json) for a known family.

    `permute_outputs` lets groups that index a bare backbone's outputs be permuted (frozen otherwise).
    Raises InputError when the family cannot be told or the names do not fit it.
    """
    config = _as_dict(config)
    if family is None:
        family = detect_family(names_to_shapes, config)
        if family is None:
            model_type = (config or {}).get("model_type")
            why = f"model_type {model_type!r} is not supported" if model_type else "no supported family matches"
            raise InputError(
                f"cannot derive a permutation spec from tensor names: {why} "
                f"(supported: {', '.join(supported_families())}); trace the model instead"
            )
    family = _normalise(family)
    declared = FAMILIES.get(family)
    if declared is None:
        raise InputError(f"unknown model family {family!r} (supported: {', '.join(supported_families())})")
    builder = SpecBuilder(family, names_to_shapes, permute_outputs=permute_outputs)
    declared.build(builder, config)
    spec = builder.build()
    logger.info(
        "family %s: %d groups (%d frozen), %d notes",
        family,
        len(spec),
        len(spec) - len(spec.active_groups()),
        len(spec.notes),
    )
    return spec


def spec_from_store(store: Any, family: str | None = None, *, permute_outputs: bool = False) -> PermutationSpec:
    """spec_from_names for a TensorStore: its tensor names and shapes, and the config.json it carries."""
    shapes = {name: tuple(store.shape(name)) for name in store.names()}
    return spec_from_names(shapes, getattr(store, "config", None), family, permute_outputs=permute_outputs)


def _normalise(family: str) -> str:
    key = family.strip().lower().replace("_", "-")
    return ALIASES.get(key, key)


def _as_dict(config: Any) -> dict[str, Any] | None:
    if config is None:
        return None
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise InputError(f"config must be a mapping (the contents of config.json), got {type(config).__name__}")
    return dict(config)
