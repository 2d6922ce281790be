"""Layer numbering in tensor names: find a tensor's block index, count a model's layers, renumber for slices.

Transformer checkpoints name per-block tensors ``<prefix>.<stack>.<N>.<rest>`` (``model.layers.3.mlp...``,
``transformer.h.3.attn...``, ``encoder.layer.3...``, ``blocks.3...``). Everything that is not inside a
block is either *pre* (embeddings, stems) or *post* (final norm, heads), which matters for parameter
gradients: pre tensors sit at position 0 and post tensors at position 1 of a gradient.

Layer stacking ("passthrough frankenmerges") takes source layer ranges ``[start, end)`` from one or more
models and numbers the output layers consecutively across slices; :class:`SliceLayout` does that arithmetic.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

logger = logging.getLogger(__name__)

# Stack names used by common families, matched as a whole path component followed by the index.
# The leftmost match wins, so T5's `block.N.layer.M` yields N and MoE's `layers.N.experts.M` yields N.
_STACK_NAMES = ("layers", "layer", "h", "blocks", "block", "decoder_layers", "encoder_layers", "transformer_blocks")
_FAMILY_RE = re.compile(r"(?:^|\.)(?:" + "|".join(_STACK_NAMES) + r")\.(\d+)(?=\.|$)")
_GENERIC_RE = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")

# Non-block tensors that come before the first block (position 0 of a gradient); the rest come after it.
_PRE_RE = re.compile(
    r"(?:^|[._])(?:embed\w*|embeddings?|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|"
    r"patch_embed\w*|pos_embed\w*|cls_token|mask_token|conv_stem|stem\w*|tok_embeddings|shared)(?=\.|$|_)"
)

# config.json keys that hold the number of blocks, in the order they are trusted.
_CONFIG_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "num_blocks", "depth")
# multimodal configs keep the language model's settings in a sub-config
_SUB_CONFIGS = ("text_config", "llm_config", "language_config")


@dataclass(frozen=True)
class LayerMatch:
    """Where a layer index sits in a tensor name: the index and the character span of its digits."""

    index: int
    start: int
    end: int


def find_layer(name: str, *, generic: bool = True) -> LayerMatch | None:
    """Locate the block index in a tensor name; ``generic`` also accepts the first all-digit path component."""
    m = _FAMILY_RE.search(name)
    if m is None and generic:
        m = _GENERIC_RE.search(name)
    if m is None:
        return None
    return LayerMatch(int(m.group(1)), m.start(1), m.end(1))


def layer_index(name: str, *, generic: bool = True) -> int | None:
    """Block index of a tensor (``model.layers.7.mlp.up_proj.weight`` -> 7), or None outside blocks."""
    m = find_layer(name, generic=generic)
    return None if m is None else m.index


def rename_layer(name: str, new_index: int) -> str:
    """Replace the block index in a tensor name (``model.layers.7.x`` -> ``model.layers.2.x``)."""
    m = find_layer(name)
    if m is None:
        raise ValueError(f"tensor {name!r} has no layer index to renumber")
    if new_index < 0:
        raise ValueError(f"layer index must be >= 0, got {new_index}")
    return f"{name[: m.start]}{new_index}{name[m.end:]}"


def tensor_section(name: str) -> Literal["pre", "layer", "post"]:
    """Whether a tensor is inside a block ("layer"), before the blocks ("pre") or after them ("post")."""
    if find_layer(name) is not None:
        return "layer"
    return "pre" if _PRE_RE.search(name) else "post"


def num_layers_from_config(config: Mapping[str, Any] | None) -> int | None:
    """Number of blocks from a config.json dict (``num_hidden_layers``, ``n_layer``, ...), or None."""
    if not config:
        return None
    for key in _CONFIG_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    for sub in _SUB_CONFIGS:
        nested = config.get(sub)
        if isinstance(nested, Mapping):
            found = num_layers_from_config(nested)
            if found is not None:
                return found
    return None


def num_layers_from_names(names: Iterable[str]) -> int | None:
    """Number of blocks from tensor names: highest block index + 1 (family patterns first, then generic)."""
    names = list(names)
    for generic in (False, True):
        indices = [i for i in (layer_index(n, generic=generic) for n in names) if i is not None]
        if indices:
            return max(indices) + 1
    return None


def num_layers(names: Iterable[str], config: Mapping[str, Any] | None = None) -> int | None:
    """Number of blocks: config.json when it says, else counted from the tensor names."""
    names = list(names)
    from_config = num_layers_from_config(config)
    from_names = num_layers_from_names(names)
    if from_config is not None:
        if from_names is not None and from_names != from_config:
            logger.debug("config says %d layers, tensor names say %d; using the config", from_config, from_names)
        return from_config
    return from_names


@dataclass(frozen=True)
class LayerSlot:
    """One output layer of a stacked model: where it comes from."""

    out_index: int  # layer number in the output model
    slice_index: int  # which slice it belongs to
    offset: int  # position inside that slice (0-based)
    source_index: int  # layer number in the source model(s) of that slice
    slice_length: int  # number of layers in that slice


class SliceLayout:
    """Output layer numbering for slices ``[start, end)`` stacked one after another."""

    def __init__(self, ranges: Sequence[Sequence[int]]) -> None:
        cleaned: list[tuple[int, int]] = []
        for i, r in enumerate(ranges):
            if len(r) != 2:
                raise ValueError(f"slice {i}: a layer range is [start, end], got {list(r)}")
            start, end = int(r[0]), int(r[1])
            if start < 0 or end <= start:
                raise ValueError(f"slice {i}: layer range [{start}, {end}] must satisfy 0 <= start < end")
            cleaned.append((start, end))
        self.ranges: tuple[tuple[int, int], ...] = tuple(cleaned)
        offsets, total = [], 0
        for start, end in self.ranges:
            offsets.append(total)
            total += end - start
        self._offsets = tuple(offsets)
        self.num_layers = total

    def __len__(self) -> int:
        return self.num_layers

    def __iter__(self) -> Iterator[LayerSlot]:
        for s, (start, end) in enumerate(self.ranges):
            for k in range(end - start):
                yield LayerSlot(self._offsets[s] + k, s, k, start + k, end - start)

    def slice_length(self, slice_index: int) -> int:
        """Number of layers in one slice."""
        start, end = self.ranges[slice_index]
        return end - start

    def slot(self, out_index: int) -> LayerSlot:
        """Which slice, offset and source layer produce output layer ``out_index``."""
        if not 0 <= out_index < self.num_layers:
            raise IndexError(f"output layer {out_index} is outside 0..{self.num_layers - 1}")
        for s in range(len(self.ranges) - 1, -1, -1):
            if out_index >= self._offsets[s]:
                start, end = self.ranges[s]
                k = out_index - self._offsets[s]
                return LayerSlot(out_index, s, k, start + k, end - start)
        raise AssertionError("unreachable")

    def output_index(self, slice_index: int, source_index: int) -> int:
        """Output layer number of source layer ``source_index`` taken by slice ``slice_index``."""
        start, end = self.ranges[slice_index]
        if not start <= source_index < end:
            raise IndexError(f"source layer {source_index} is not in slice {slice_index}'s range [{start}, {end})")
        return self._offsets[slice_index] + source_index - start

    def output_name(self, source_name: str, slice_index: int) -> str:
        """Rename a source tensor of slice ``slice_index`` to its output name (layer renumbered)."""
        m = find_layer(source_name)
        if m is None:
            raise ValueError(f"tensor {source_name!r} has no layer index")
        return rename_layer(source_name, self.output_index(slice_index, m.index))

    def source_name(self, out_name: str) -> tuple[int, str]:
        """The slice and the source tensor name that output tensor ``out_name`` comes from."""
        m = find_layer(out_name)
        if m is None:
            raise ValueError(f"tensor {out_name!r} has no layer index")
        slot = self.slot(m.index)
        return slot.slice_index, rename_layer(out_name, slot.source_index)


__all__ = [
    "LayerMatch",
    "LayerSlot",
    "SliceLayout",
    "find_layer",
    "layer_index",
    "num_layers",
    "num_layers_from_config",
    "num_layers_from_names",
    "rename_layer",
    "tensor_section",
]
