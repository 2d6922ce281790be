"""Shared machinery for the name-based family derivers: a spec builder and tensor-name helpers.

Each family module describes its architecture as calls to :class:`SpecBuilder`: "axis A of tensor T belongs
to group G". The builder skips optional tensors the checkpoint does not have, infers each group's size from
its members, checks every member against the real shapes, and lists the tensors no rule claimed in
``spec.notes`` instead of guessing a group for them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from suture.merge.errors import InputError
from suture.merge.spec import GroupKind, Member, Part, PermGroup, PermutationSpec, Role

logger = logging.getLogger(__name__)

RESIDUAL = "residual"


@dataclass(frozen=True)
class Family:
    """What a ``families_<name>`` module declares as its module-level ``FAMILY`` (found by merge.graph.families).

    `model_types`: config.json ``model_type`` values it covers (the first is its name); `build` fills a
    SpecBuilder; `detect` tells the family from tensor names alone when there is no config.json (None: not
    this family); `aliases`: other names accepted by ``spec_from_names(family=...)``; a `fallback` family's
    `detect` runs only after every other family's.
    """

    model_types: tuple[str, ...]
    build: Callable[[SpecBuilder, Mapping[str, Any] | None], None]
    detect: Callable[[list[str]], str | None]
    aliases: tuple[str, ...] = ()
    fallback: bool = False

    @property
    def name(self) -> str:
        return self.model_types[0]


def suffix_rule(suffix: str, family: str) -> Callable[[list[str]], str | None]:
    """A `Family.detect` that names `family` when any tensor name ends with `suffix`."""
    return lambda names: family if any(n.endswith(suffix) for n in names) else None

_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key that orders `layers.10` after `layers.9`."""
    return tuple(int(p) if p.isdigit() else p for p in _DIGITS.split(name))


def find_prefix(names: Iterable[str], anchor: str, family: str, expected: str) -> str:
    """The one module path in front of `anchor` (a regex for the rest of a tensor name).

    Raises InputError naming the family when no tensor, or tensors under several different prefixes, match.
    """
    pattern = re.compile(r"^(?P<prefix>(?:[\w\-]+\.)*?)" + anchor + r"$")
    prefixes = sorted({m.group("prefix") for n in names if (m := pattern.match(n))})
    if not prefixes:
        raise InputError(f"tensor names do not fit family {family!r}: no tensor named like '{expected}'")
    if len(prefixes) > 1:
        raise InputError(
            f"tensor names do not fit family {family!r}: '{expected}' appears under several module paths "
            f"{prefixes}; derive the spec for one sub-model at a time"
        )
    return prefixes[0]


def parent_of(prefix: str) -> str:
    """`bert.` -> ``""``, `model.bert.` -> `model.`: where task heads sit next to the backbone."""
    stripped = prefix.rstrip(".")
    if not stripped:
        return ""
    cut = stripped.rfind(".")
    return stripped[: cut + 1] if cut >= 0 else ""


def layer_indices(names: Iterable[str], stack: str) -> list[int]:
    """Sorted block indices N of every tensor named `<stack>N.<...>` (stack includes its prefix and dot)."""
    pattern = re.compile("^" + re.escape(stack) + r"(\d+)\.")
    return sorted({int(m.group(1)) for n in names if (m := pattern.match(n))})


_HEAD_CLASS = re.compile(r"(?:For[A-Z]\w*|LMHead\w*|Heads?Model)$")


def declares_head(config: Mapping[str, Any] | None) -> bool:
    """True when config.json's `architectures` names a class with a head (…ForCausalLM, GPT2LMHeadModel, …)."""
    archs = (config or {}).get("architectures") or []
    return any(isinstance(a, str) and _HEAD_CLASS.search(a) for a in archs)


def config_int(config: Mapping[str, Any] | None, *keys: str) -> int | None:
    """First integer value among `keys` in a config dict (None when the config is absent or lacks them)."""
    if not config:
        return None
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


class SpecBuilder:
    """Collects group members for one model's tensors and turns them into a checked PermutationSpec."""

    def __init__(self, family: str, shapes: Mapping[str, Iterable[int]], permute_outputs: bool = False) -> None:
        self.family = family
        self.permute_outputs = permute_outputs
        self.shapes: dict[str, tuple[int, ...]] = {n: tuple(int(d) for d in s) for n, s in shapes.items()}
        self._members: dict[str, list[Member]] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        self._claimed: set[str] = set()
        self._known: set[str] = set()
        self.notes: list[str] = []

    def has(self, tensor: str) -> bool:
        """True when the checkpoint holds `tensor`."""
        return tensor in self.shapes

    def add(
        self,
        group: str,
        tensor: str,
        axis: int,
        role: Role = "out",
        repeat: int = 1,
        inner: int = 1,
        required: bool = False,
        outer: int = 1,
        parts: tuple[Part, ...] = (),
    ) -> bool:
        """Put axis `axis` of `tensor` into `group` when the checkpoint has it; a missing required tensor raises.

        `parts`: for attention members, Q/K or V/O per outer block (see :mod:`merge.spec`)."""
        if tensor not in self.shapes:
            if required:
                raise InputError(f"tensor names do not fit family {self.family!r}: missing tensor {tensor!r}")
            return False
        self._members.setdefault(group, []).append(Member(tensor, axis, role, repeat=repeat, inner=inner, outer=outer,
                                                               parts=parts))
        self._meta.setdefault(group, {})
        self._claimed.add(tensor)
        return True

    def declare(
        self,
        group: str,
        kind: GroupKind = "free",
        head_dim: int | None = None,
        size: int | None = None,
        frozen_reason: str | None = None,
    ) -> None:
        """Set a group's structure; `size` (when given) is checked against the members' shapes."""
        self._meta.setdefault(group, {}).update(kind=kind, head_dim=head_dim, size=size, frozen_reason=frozen_reason)
        self._members.setdefault(group, [])

    def known(self, *tensors: str) -> None:
        """Mark tensors the family understands but that no permutation touches (masks, vocab biases, ...)."""
        self._known.update(t for t in tensors if t in self.shapes)

    def output_group(self, group: str, what: str) -> None:
        """Mark `group` as indexing a model output: frozen, unless the caller asked for permuted outputs."""
        if self.permute_outputs:
            self.notes.append(f"output: group {group!r} indexes {what}, which comes out permuted by it")
        else:
            self.declare(
                group,
                frozen_reason=f"indexes the model's output ({what}); outputs stay in order unless permute_outputs=True",
            )

    def build(self) -> PermutationSpec:
        """The checked spec: group sizes from shapes, unknown tensors listed in notes."""
        spec = PermutationSpec(family=self.family)
        for name, members in self._members.items():
            if not members:
                continue
            meta = self._meta.get(name, {})
            size = self._group_size(name, members, meta.get("size"))
            spec.add(
                PermGroup(
                    name=name,
                    size=size,
                    members=members,
                    kind=meta.get("kind") or "free",
                    head_dim=meta.get("head_dim"),
                    frozen_reason=meta.get("frozen_reason"),
                )
            )
        try:
            spec.validate(self.shapes)
        except ValueError as exc:
            raise InputError(f"family {self.family!r}: {exc}") from exc
        for group in spec.active_groups():
            if group.kind != "free" and (not group.head_dim or group.size % group.head_dim):
                raise InputError(
                    f"family {self.family!r}: group {group.name!r} of size {group.size} cannot be split into heads "
                    f"of {group.head_dim} (check num_attention_heads / head_dim in config.json)"
                )
        unknown = [n for n in self.shapes if n not in self._claimed and n not in self._known]
        for n in unknown:
            spec.notes.append(f"untouched: {n} {list(self.shapes[n])} is not part of family {self.family!r}'s layout")
        if unknown:
            logger.warning(
                "%d tensor(s) not understood for family %r are left unpermuted (first: %s); if they read a "
                "permuted axis the permuted model will differ",
                len(unknown),
                self.family,
                unknown[0],
            )
        spec.notes.extend(self.notes)
        return spec

    def _group_size(self, group: str, members: list[Member], declared: int | None) -> int:
        sizes = []
        for m in members:
            shape = self.shapes[m.tensor]
            if not -len(shape) <= m.axis < len(shape):
                raise InputError(
                    f"family {self.family!r}: tensor {m.tensor!r} has no axis {m.axis} (shape {list(shape)})"
                )
            length = shape[m.axis]
            unit = m.outer * m.repeat * m.inner
            if length % unit:
                raise InputError(
                    f"family {self.family!r}: tensor {m.tensor!r} axis {m.axis} has length {length}, "
                    f"not a multiple of {unit} as group {group!r} expects"
                )
            sizes.append((length // unit, m.tensor))
        size = declared if declared is not None else sizes[0][0]
        for s, tensor in sizes:
            if s != size:
                raise InputError(
                    f"family {self.family!r}: tensor {tensor!r} gives group {group!r} size {s}, "
                    f"but {sizes[0][1] if declared is None else 'config.json'} gives {size}"
                )
        return size
