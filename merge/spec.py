"""Permutation spec: which axes of which tensors index the same hidden units.

A :class:`PermutationSpec` maps group names to :class:`PermGroup` objects. Each group lists its members,
``(tensor, axis, role)``: ``role="out"`` for axes on the producing side of the hidden units (a Linear's
rows, its bias, a norm's weight, BatchNorm running stats) and ``role="in"`` for axes that read them (the
next Linear's columns). Permutation engines apply the same index vector to both roles; soft engines
(optimal transport, ZipIt) apply a merge matrix on ``out`` members and the matching unmerge matrix on
``in`` members, which is why the role is recorded.

Attention needs structure: a free permutation of the Q/K axes does not preserve function because heads
split those axes. ``kind="heads"`` allows whole-head permutations only (RoPE); ``kind="heads_within"``
allows a head permutation composed with a per-head within-head permutation. Grouped-query attention ties Q
heads to their KV head with ``Member.repeat``: the member's axis is laid out as ``(n_kv_heads, repeat,
head_dim)`` and the group's permutation acts on the KV-head and head-dim parts only. ``Member.inner`` says
the axis is laid out ``(units, inner)``: a Linear reading a flattened ``(C, H, W)`` map sees each channel as a
block of ``H*W`` columns, so the permutation moves whole blocks. ``Member.outer`` says the axis holds
``outer`` blocks side by side, each laid out as above, and the same permutation acts inside every block: GPT-2's
fused ``c_attn`` stores Q, K and V as three blocks of one axis, ``(3, heads * head_dim)``.

The full layout of a member's axis is therefore ``(outer, units, inner)``, with ``units`` read as
``(kv_heads, repeat, head_dim)`` when ``repeat > 1``; its length is ``outer * size * repeat * inner``.

Q/K and V/O parts. Attention scores only need Q and K of a head to share a within-head order (q . k), and a
head's output only needs V and O to share theirs, so one head permutation with two within-head permutations
(one for Q/K, one for V/O) keeps the function. ``Member.parts`` records which part each member belongs to,
one entry per outer block (``("qk", "qk", "vo")`` for GPT-2's fused c_attn; ``("qk",)`` for a Q projection,
``("vo",)`` for V's rows and O's columns). A group whose members all carry parts is *split*, and its
permutation may be either a 1-D index vector of ``size`` entries (the same order for both parts, as every
engine produces) or a ``(2, size)`` tensor: row 0 (:data:`QK`) for Q/K members and blocks, row 1
(:data:`VO`) for V/O ones, both rows moving the same head to the same place. Kind ``heads`` (RoPE, or BERT's
relative positions, which index Q/K dimensions) keeps row 0's dimensions in order while row 1 may still
permute dimensions within heads; kind ``heads_within`` lets both rows do so. :func:`expand_index`,
:func:`unit_matrix` (with ``part=``), :func:`invert_permutation` and :func:`check_permutation` accept
both shapes; a 2-row permutation whose rows are equal is the 1-D one (:func:`collapse_rows`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

GroupKind = Literal["free", "heads", "heads_within"]
Role = Literal["out", "in"]
Part = Literal["qk", "vo"]
PARTS: tuple[Part, ...] = ("qk", "vo")
QK, VO = 0, 1  # rows of a 2-row permutation


@dataclass(frozen=True)
class Member:
    """One tensor axis that is indexed by a group's hidden units."""

    tensor: str
    axis: int
    role: Role = "out"
    repeat: int = 1
    # The axis is laid out (units, inner): each hidden unit owns `inner` consecutive entries, as when a
    # Linear reads a flattened (C, H, W) feature map and one channel covers H*W columns.
    inner: int = 1
    # The axis holds `outer` blocks side by side, each laid out as above, and the group's permutation acts
    # on every block alike: GPT-2's c_attn stores Q, K and V as three blocks of its output axis.
    outer: int = 1
    # Attention only: the part ("qk" or "vo") of each outer block (one entry per block; empty when unmarked).
    parts: tuple[Part, ...] = ()

    def part_of(self, block: int) -> Part:
        """The part of outer block `block` (ValueError when the member carries no parts)."""
        if not self.parts:
            raise ValueError(f"member {self.tensor!r} has no Q/K or V/O part, so a 2-row permutation cannot apply")
        return self.parts[block]

    def layout(self) -> str:
        """Short text of the non-default layout fields, e.g. ``"outer=3"`` (empty for a plain axis)."""
        parts = [f"{k}={v}" for k, v in (("repeat", self.repeat), ("inner", self.inner), ("outer", self.outer)) if v != 1]
        return " ".join(parts)


def axis_length(size: int, member: Member) -> int:
    """Length of a member's axis for a group of `size` units: outer * size * repeat * inner."""
    return member.outer * size * member.repeat * member.inner


def axis_problem(group: PermGroup, member: Member, shape: Sequence[int]) -> str | None:
    """Why a group's member does not fit a tensor of `shape` (no such axis, wrong length), or None when it fits.

    The one check behind spec validation and every engine's own refusal, so they agree on what fits.
    """
    shape = tuple(shape)
    if not -len(shape) <= member.axis < len(shape):
        return f"group {group.name!r}: tensor {member.tensor!r} has no axis {member.axis} (shape {list(shape)})"
    if shape[member.axis] != axis_length(group.size, member):
        layout = f", {member.layout()}" if member.layout() else ""
        return (f"group {group.name!r} (size {group.size}{layout}) does not fit tensor {member.tensor!r} "
                f"axis {member.axis} of length {shape[member.axis]}")
    if member.parts and (len(member.parts) != member.outer or any(p not in PARTS for p in member.parts)):
        return (f"group {group.name!r}: tensor {member.tensor!r} has parts {list(member.parts)}; expected one of "
                f"{list(PARTS)} per outer block ({member.outer})")
    return None


@dataclass
class PermGroup:
    """A set of tensor axes that must be permuted together to keep the model's function."""

    name: str
    size: int
    members: list[Member] = field(default_factory=list)
    kind: GroupKind = "free"
    head_dim: int | None = None
    frozen_reason: str | None = None

    @property
    def frozen(self) -> bool:
        """True when the group must stay in its original order (an op the deriver did not understand)."""
        return self.frozen_reason is not None

    @property
    def split(self) -> bool:
        """True when Q/K and V/O may take different within-head permutations (an attention group whose
        members all say which part they belong to): its permutation may then have two rows."""
        return self.kind != "free" and bool(self.members) and all(m.parts for m in self.members)

    def within_free(self) -> tuple[bool, bool]:
        """Whether (Q/K, V/O) dimensions may move within a head: Q/K only for ``heads_within``; V/O also under
        ``heads`` when the group is split (RoPE and relative positions tie Q/K dimensions, not V/O ones)."""
        qk = self.kind == "heads_within"
        return qk, qk or (self.kind == "heads" and self.split)

    def random_permutation(self, generator: torch.Generator | None = None, *, split: bool = False) -> torch.Tensor:
        """Draw a random permutation that respects this group's structure (identity when frozen).

        With `split` a split group draws a 2-row permutation: one head order, and separate within-head orders
        for Q/K and V/O. Without it every group draws a 1-D permutation, which any engine can also produce.
        """
        if self.frozen:
            return torch.arange(self.size)
        if self.kind == "free":
            return torch.randperm(self.size, generator=generator)
        head_dim = self._require_head_dim()
        n_heads = self.size // head_dim
        heads = torch.randperm(n_heads, generator=generator).tolist()
        qk_free, vo_free = self.within_free()
        frees = (qk_free, vo_free) if split and self.split else (qk_free,)
        rows = []
        for free in frees:
            blocks = [h * head_dim + (torch.randperm(head_dim, generator=generator) if free else torch.arange(head_dim))
                      for h in heads]
            rows.append(torch.cat(blocks))
        return rows[0] if len(rows) == 1 else torch.stack(rows)

    def _require_head_dim(self) -> int:
        if not self.head_dim or self.size % self.head_dim:
            raise ValueError(
                f"group {self.name!r}: kind {self.kind!r} needs head_dim dividing size {self.size}, got {self.head_dim}"
            )
        return self.head_dim


@dataclass
class PermutationSpec:
    """Groups of tied tensor axes for one architecture, plus the tensors no group touches."""

    groups: dict[str, PermGroup] = field(default_factory=dict)
    family: str | None = None
    notes: list[str] = field(default_factory=list)

    def add(self, group: PermGroup) -> PermGroup:
        """Register a group, refusing duplicate names."""
        if group.name in self.groups:
            raise ValueError(f"duplicate permutation group {group.name!r}")
        self.groups[group.name] = group
        return group

    def __iter__(self) -> Iterator[PermGroup]:
        return iter(self.groups.values())

    def __len__(self) -> int:
        return len(self.groups)

    def active_groups(self) -> list[PermGroup]:
        """Groups that may be permuted (not frozen)."""
        return [g for g in self.groups.values() if not g.frozen]

    def axes_of(self) -> dict[str, dict[int, tuple[str, Member]]]:
        """tensor -> {axis: (group name, member)} for every member of every group."""
        out: dict[str, dict[int, tuple[str, Member]]] = {}
        for group in self.groups.values():
            for m in group.members:
                slot = out.setdefault(m.tensor, {})
                if m.axis in slot:
                    raise ValueError(
                        f"tensor {m.tensor!r} axis {m.axis} belongs to both {slot[m.axis][0]!r} and {group.name!r}"
                    )
                slot[m.axis] = (group.name, m)
        return out

    def validate(self, shapes: Mapping[str, Iterable[int]]) -> None:
        """Check every member against real tensor shapes; raise ValueError naming the first mismatch."""
        self.axes_of()  # raises on an axis claimed twice
        for group in self.groups.values():
            for m in group.members:
                if m.tensor not in shapes:
                    raise ValueError(f"group {group.name!r} names tensor {m.tensor!r}, which the model does not have")
                problem = axis_problem(group, m, tuple(shapes[m.tensor]))
                if problem:
                    raise ValueError(problem)

    def random_permutations(self, seed: int = 0, *, split: bool = False) -> dict[str, torch.Tensor]:
        """One structured random permutation per group (identity for frozen groups); `split`: 2-row
        permutations for split attention groups (see :meth:`PermGroup.random_permutation`)."""
        gen = torch.Generator().manual_seed(seed)
        return {g.name: g.random_permutation(gen, split=split) for g in self.groups.values()}

    def describe(self) -> list[dict]:
        """Rows for `suture inspect`: name, size, kind, members (with any repeat/inner/outer layout), frozen reason."""
        return [
            {
                "group": g.name,
                "size": g.size,
                "kind": g.kind,
                "members": [_member_text(m) for m in g.members],
                "frozen": g.frozen_reason,
            }
            for g in self.groups.values()
        ]


def _member_text(m: Member) -> str:
    """`tensor[axis]`, `(in)` for the reading side, the layout when it is not a plain axis, then any parts."""
    layout = m.layout()
    parts = f" [{' '.join(m.parts)}]" if m.parts else ""
    return f"{m.tensor}[{m.axis}]{'(in)' if m.role == 'in' else ''}{f' {{{layout}}}' if layout else ''}{parts}"


def expand_index(perm: torch.Tensor, member: Member, head_dim: int | None) -> torch.Tensor:
    """Index vector for a member's whole axis: the group permutation, expanded across GQA repeats, inner
    blocks and outer blocks (block o, entry i -> o * block length + expanded[i]). A 2-row permutation gives
    each outer block the row of its part."""
    if perm.dim() == 2:
        length = axis_length(perm.shape[1], member) // member.outer
        rows = [_expand_one(perm[PARTS.index(member.part_of(o))], member, head_dim) + o * length
                for o in range(member.outer)]
        return torch.cat(rows)
    return _expand_outer(_expand_one(perm, member, head_dim), member)


def _expand_one(perm: torch.Tensor, member: Member, head_dim: int | None) -> torch.Tensor:
    """A 1-D permutation expanded across GQA repeats and inner blocks (one outer block)."""
    idx = _expand_repeat(perm, member, head_dim)
    if member.inner != 1:
        # layout (..., inner): new (i, j) <- old (idx[i], j)
        inner = torch.arange(member.inner, device=idx.device)
        idx = (idx[:, None] * member.inner + inner[None, :]).reshape(-1)
    return idx


def _expand_outer(idx: torch.Tensor, member: Member) -> torch.Tensor:
    if member.outer == 1:
        return idx
    # layout (outer, ...): every block is permuted alike, new (o, i) <- old (o, idx[i])
    offsets = torch.arange(member.outer, device=idx.device) * idx.numel()
    return (offsets[:, None] + idx[None, :]).reshape(-1)


def _expand_repeat(perm: torch.Tensor, member: Member, head_dim: int | None) -> torch.Tensor:
    if member.repeat == 1:
        return perm
    if not head_dim:
        raise ValueError(f"member {member.tensor!r} has repeat {member.repeat} but its group has no head_dim")
    n_heads = perm.numel() // head_dim
    blocks = perm.view(n_heads, head_dim)  # new head i, dim d -> old flat index
    old_head = blocks[:, 0] // head_dim
    within = blocks % head_dim
    rep = torch.arange(member.repeat, device=perm.device)
    # axis layout (kv_head, repeat, head_dim): new (i, r, d) <- old (old_head[i], r, within[i, d])
    idx = (old_head[:, None, None] * member.repeat + rep[None, :, None]) * head_dim + within[:, None, :]
    return idx.reshape(-1)


def unit_matrix(tensor: torch.Tensor, member: Member, head_dim: int | None = None, part: Part | None = None) -> torch.Tensor | None:
    """The member's axis as rows of a (group size, everything else) matrix, one row per hidden unit.

    GQA repeats, inner blocks and outer blocks of a unit are folded into its row, so row i always gathers
    every entry that the group's unit i owns in this tensor. With `part`, only the outer blocks of that part
    (Q/K or V/O) are gathered; None when the member has none.
    """
    t = torch.movedim(tensor, member.axis, 0)
    if member.outer != 1 or part is not None:
        if t.shape[0] % member.outer:
            raise ValueError(f"member {member.tensor!r}: axis length {t.shape[0]} is not {member.outer} equal blocks")
        # (outer, block, ...) -> (block, outer, ...): each outer block of a unit becomes more of its row
        t = t.reshape(member.outer, t.shape[0] // member.outer, *t.shape[1:])
        if part is not None:
            keep = [o for o in range(member.outer) if member.part_of(o) == part]
            if not keep:
                return None
            t = t[keep]
        t = t.movedim(0, 1)
        t = t.reshape(t.shape[0], -1)
    rest = t.shape[1:]
    if member.repeat > 1:
        if not head_dim:
            raise ValueError(f"member {member.tensor!r} has repeat {member.repeat} but its group has no head_dim")
        n_kv = t.shape[0] // (member.repeat * head_dim * member.inner)
        # (kv_head, repeat, head_dim, inner, ...) -> (kv_head, head_dim, repeat, inner, ...)
        t = t.reshape(n_kv, member.repeat, head_dim, member.inner, *rest).transpose(1, 2)
        return t.reshape(n_kv * head_dim, -1)
    return t.reshape(t.shape[0] // member.inner, -1)


def permute_tensor(tensor: torch.Tensor, name: str, spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Apply every group permutation that touches `name` to `tensor` (both out and in roles use the index)."""
    slots = spec.axes_of().get(name, {})
    for axis, (group_name, member) in slots.items():
        perm = perms.get(group_name)
        if perm is None:
            continue
        idx = expand_index(perm, member, spec.groups[group_name].head_dim).to(tensor.device)
        tensor = torch.index_select(tensor, axis, idx)
    return tensor


def permute_state(state: Mapping[str, torch.Tensor], spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply group permutations to a whole state dict (tensors no group touches are returned as they are)."""
    return {name: permute_tensor(t, name, spec, perms) for name, t in state.items()}


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    """The inverse index vector: invert(p)[p[i]] = i (row by row for a 2-row permutation)."""
    if perm.dim() == 2:
        return torch.stack([invert_permutation(row) for row in perm])
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def collapse_rows(perm: torch.Tensor) -> torch.Tensor:
    """A 2-row permutation whose rows agree is the 1-D one: return that row (anything else unchanged)."""
    if perm.dim() == 2 and bool((perm == perm[0]).all()):
        return perm[0].clone()
    return perm


def check_permutation(group: PermGroup, perm: torch.Tensor) -> str | None:
    """Why `perm` is not a valid permutation for `group` (wrong shape, not a permutation, rows that move heads
    differently, dimensions moved where the kind forbids it), or None when it is valid."""
    perm = torch.as_tensor(perm)
    size = group.size
    if perm.dim() == 2 and not group.split:
        return f"group {group.name!r} has no Q/K and V/O parts: its permutation must be 1-D, got shape {list(perm.shape)}"
    if tuple(perm.shape) not in ((size,), (len(PARTS), size)):
        return f"group {group.name!r}: permutation of shape {list(perm.shape)}, expected [{size}] or [2, {size}]"
    rows = perm.reshape(-1, size).cpu().long()
    if any(not torch.equal(row.sort().values, torch.arange(size)) for row in rows):
        return f"group {group.name!r}: not a permutation of {size} units"
    if group.kind == "free":
        return None
    head_dim = group.head_dim or size
    blocks = rows.view(len(rows), size // head_dim, head_dim)
    heads = blocks // head_dim
    if not bool((heads == heads[..., :1]).all()) or not bool((heads[:, :, 0] == heads[0, :, 0]).all()):
        return f"group {group.name!r}: the permutation splits heads or moves them differently for Q/K and V/O"
    frees = group.within_free() if len(rows) == 2 else group.within_free()[:1]
    for row, free in zip(blocks, frees):
        if not free and not bool((row % head_dim == torch.arange(head_dim)).all()):
            return f"group {group.name!r} (kind {group.kind!r}): dimensions may not move within a head here"
    return None
