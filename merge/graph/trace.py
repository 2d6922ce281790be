"""Permutation spec of a runnable ``torch.nn.Module``, derived by torch.fx symbolic tracing.

The traced graph is interpreted abstractly: every tensor value carries at most one *label*, the hidden-unit
group that indexes one of its axes (with the axis laid out ``(units, inner)``). Layers that create hidden
units (Linear, Conv, Embedding) start a new group; the layers and ops that read a value tie their input axes
to its group; elementwise ops that combine two labelled values (residual sums, gated products) merge their
groups with a union-find. Anything the deriver does not understand *freezes* the groups it touches: those
keep their original order, so the spec may be less useful but is never wrong. Groups that reach the model's
output are left out of the spec (outputs are never permuted); the model's inputs are never labelled.

Multi-head attention is recognised from its shapes: a reshape that splits a labelled axis into ``(heads,
head_dim)`` (or ``(3, heads, head_dim)`` for a fused Q/K/V projection) yields a value whose two axes carry the
group; transposes, scaling, masks, softmax and dropout keep it; ``q @ k^T`` (matmul, einsum) ties Q's and K's
groups and leaves per-head scores, ``scores @ v`` or ``scaled_dot_product_attention`` ties V's group too, and the
reshape that merges the heads back gives an ordinary label that the out projection reads. The group gets kind
``heads_within`` (whole heads, then one permutation inside each head): the same joint Q/K/V/O group the
Hugging Face families declare. A rotary embedding (rotate-half slicing, cos/sin shared by all heads) restricts
it to kind ``heads`` (whole heads only); any other op on split heads (a norm over head_dim, a reduction over
heads, a per-head bias) freezes the group, as any op the deriver does not understand does.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from suture.merge.errors import InputError
from suture.merge.spec import Member, PermGroup, PermutationSpec

logger = logging.getLogger(__name__)

_OUTPUT_REASON = "reaches the model output"


@dataclass(frozen=True)
class Tap:
    """A hookable place where a group's hidden units can be observed: a module's input or output."""

    group: str
    module: str
    where: Literal["input", "output"]
    axis: int
    inner: int = 1
    node: str = ""


@dataclass
class TraceResult:
    """What tracing produced: the spec, the traced graph, where each group can be observed, tied names."""

    spec: PermutationSpec
    graph_module: torch.fx.GraphModule
    taps: dict[str, list[Tap]] = field(default_factory=dict)
    aliases: dict[str, list[str]] = field(default_factory=dict)


# Which attention part a value may feed: ("p", elem, block) for the output of the projection that created
# element `elem` (block: which of a fused projection's Q/K/V blocks, None for all of them), ("o", node, None)
# for the output of the attention op `node`. Ops that keep a value's order keep its tag; any other drops it.
_Tag = tuple[str, Any, "int | None"]


@dataclass(frozen=True)
class _Lab:
    """A tensor whose `axis` is indexed by union-find element `elem`, laid out (units, inner)."""

    elem: int
    axis: int
    inner: int = 1
    tag: _Tag | None = None


@dataclass(frozen=True)
class _Param:
    """A state-dict tensor (or a view of it); dims[i] is the tensor axis behind value axis i (None: added)."""

    name: str
    dims: tuple[int | None, ...]


@dataclass(frozen=True)
class _Tuple:
    items: tuple[Any, ...]


@dataclass(frozen=True)
class _Heads:
    """A tensor whose axes `head` and `dim` carry group `elem`'s units laid out (heads, head_dim).

    `dim` is None for attention scores (one value per head, nothing within heads); `outer` is the axis that
    still holds a fused projection's Q, K and V blocks before they are indexed apart.
    """

    elem: int
    head: int
    dim: int | None
    outer: int | None = None
    tag: _Tag | None = None

    def axes(self) -> tuple[int | None, int | None, int | None]:
        return self.head, self.dim, self.outer

    def moved(self, where: Any) -> _Heads:
        """The same value with every axis a renumbered by where(a)."""
        return _Heads(self.elem, where(self.head), None if self.dim is None else where(self.dim),
                      None if self.outer is None else where(self.outer), self.tag)


def _common_tag(values: Iterable[Any]) -> _Tag | None:
    """The tag all `values` share (their op keeps that order), else None."""
    tags = {v.tag for v in values}
    return tags.pop() if len(tags) == 1 else None


def _fused_tag(tag: _Tag | None, elem: int) -> _Tag | None:
    """A projection's tag once its output axis is re-read as blocks of element `elem` (fused Q/K/V)."""
    return ("p", elem, None) if tag is not None and tag[0] == "p" and tag[2] is None else None


def _block_tag(tag: _Tag | None, block: int) -> _Tag | None:
    """The tag of one block of a fused projection's output."""
    return (tag[0], tag[1], block) if tag is not None and tag[0] == "p" and tag[2] is None else None


_SHAPE_ATTRS = ("shape", "dtype", "device", "ndim", "is_cuda", "requires_grad")


def _shape_query(node: torch.fx.Node) -> bool:
    """True for a node that reads only a tensor's shape or type."""
    if node.op == "call_method":
        return node.target in ("size", "dim", "numel", "ndimension", "nelement")
    return node.op == "call_function" and node.target is getattr and node.args[1] in _SHAPE_ATTRS


class _UnionFind:
    """Hidden-unit groups under construction; elements are created in graph order."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.producer: list[str] = []
        self.reasons: dict[int, list[tuple[str, bool]]] = {}
        self.head_dim: dict[int, int] = {}  # root -> head size, for groups that attention splits into heads
        self.whole_heads: dict[int, str] = {}  # root -> why its heads may only move whole (rotary embeddings)

    def new(self, size: int, producer: str) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.producer.append(producer)
        return len(self.parent) - 1

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.size[ra] != self.size[rb]:
            # cannot happen for a consistent graph; refuse to tie rather than guess
            why = f"ties groups of different sizes ({self.size[ra]} vs {self.size[rb]})"
            self.freeze(ra, why)
            self.freeze(rb, why)
            return ra
        lo, hi = min(ra, rb), max(ra, rb)
        self.parent[hi] = lo
        dims = {self.head_dim.pop(r) for r in (ra, rb) if r in self.head_dim}
        if len(dims) > 1:
            self.freeze(lo, f"ties attention heads of different sizes ({sorted(dims)})")
        if dims:
            self.head_dim[lo] = min(dims)
        why = self.whole_heads.pop(hi, None)
        if why is not None:
            self.whole_heads.setdefault(lo, why)
        return lo

    def whole(self, x: int, reason: str) -> None:
        """An op that treats every head's dims alike but in their order: only whole heads may move."""
        self.whole_heads.setdefault(self.find(x), reason)

    def split_heads(self, x: int, head_dim: int, where: str) -> None:
        """Record that `x`'s units are read as heads of `head_dim` (one size per group, else frozen)."""
        root = self.find(x)
        prev = self.head_dim.setdefault(root, head_dim)
        if prev != head_dim:
            self.freeze(root, f"{where} splits it into heads of {head_dim}, elsewhere of {prev}")

    def freeze(self, x: int, reason: str, boundary: bool = False) -> None:
        self.reasons.setdefault(x, []).append((reason, boundary))


_ELEMENTWISE_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.LogSigmoid, nn.Threshold, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.Softmax, nn.LogSoftmax, nn.Softmin,
)  # fmt: skip
_POOL_MODULES: dict[type, int] = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3, nn.LPPool1d: 1, nn.LPPool2d: 2,
}  # fmt: skip
# Functions (and same-named tensor methods) that act on each entry independently, or are
# permutation-equivariant along every axis (softmax), so a label passes straight through.
_ELEMENTWISE_FUNCS: set[Any] = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow, operator.iadd,
    operator.imul, torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.maximum,
    torch.minimum, torch.where, torch.pow, torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.log,
    torch.abs, torch.neg, torch.sqrt, torch.rsqrt, torch.square, torch.clamp, torch.clip, torch.erf,
    torch.reciprocal, torch.nan_to_num, torch.softmax, torch.log_softmax, F.relu, F.relu6, F.gelu, F.silu,
    F.mish, F.elu, F.selu, F.celu, F.leaky_relu, F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus,
    F.softsign, F.logsigmoid, F.sigmoid, F.tanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.alpha_dropout, F.softmax, F.log_softmax, F.softmin,
}  # fmt: skip
_ELEMENTWISE_METHODS = {
    "add", "sub", "mul", "div", "neg", "pow", "relu", "sigmoid", "tanh", "exp", "log", "abs", "sqrt", "rsqrt",
    "square", "clamp", "clip", "erf", "reciprocal", "maximum", "minimum", "softmax", "log_softmax", "float",
    "double", "half", "bfloat16", "to", "contiguous", "clone", "detach", "add_", "mul_", "relu_",
    "__add__", "__mul__", "__sub__", "__truediv__", "__radd__", "__rmul__", "masked_fill",
}  # fmt: skip
_LAYOUT_FUNCS = {torch.flatten, torch.reshape, torch.unflatten, torch.squeeze, torch.unsqueeze}
_LAYOUT_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze"}
_TRANSPOSE_FUNCS = {torch.transpose, torch.permute, torch.movedim, torch.t, torch.swapaxes}
_TRANSPOSE_METHODS = {"transpose", "permute", "t", "movedim", "swapaxes"}
# reduction -> position of its `dim` argument
_REDUCTIONS = {"mean": 1, "sum": 1, "amax": 1, "amin": 1, "logsumexp": 1, "prod": 1, "var": 1, "std": 1, "norm": 2}
_REDUCTION_FUNCS = {getattr(torch, n): n for n in _REDUCTIONS}
_SHAPE_METHODS = {"size", "dim", "numel", "ndimension", "nelement", "type_as"}
_SOFTMAX_NAMES = {"softmax", "log_softmax", "softmin"}
_SOFTMAX_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Softmin)
_POOL_FUNCS: dict[Any, int] = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3, F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3, F.lp_pool1d: 1, F.lp_pool2d: 2,
}  # fmt: skip


def spec_from_module(
    module: nn.Module, example_input: torch.Tensor | tuple, *, prefix: str = ""
) -> PermutationSpec:
    """Derive the permutation spec of `module` by tracing it on `example_input` (tensor names: state_dict keys)."""
    return trace_module(module, example_input, prefix=prefix).spec


def trace_module(module: nn.Module, example_input: torch.Tensor | tuple, *, prefix: str = "") -> TraceResult:
    """Trace `module` and return its spec, the fx graph, and the hookable places that carry each group."""
    try:
        gm = torch.fx.symbolic_trace(module)
    except Exception as exc:  # fx raises many types for data-dependent control flow
        raise InputError(
            f"cannot trace {type(module).__name__} with torch.fx ({type(exc).__name__}: {exc}); "
            "derive its spec from tensor names and config.json instead"
        ) from exc
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()  # shape propagation must not update BatchNorm statistics
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    except Exception as exc:
        raise InputError(f"running {type(module).__name__} on the example input failed: {exc}") from exc
    finally:
        for m, mode in modes.items():
            m.train(mode)
    return _Deriver(module, gm, prefix).run()


def _shape(node: Any) -> tuple[int, ...] | None:
    if not isinstance(node, torch.fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def _nodes_in(obj: Any) -> Iterable[torch.fx.Node]:
    if isinstance(obj, torch.fx.Node):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _nodes_in(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _nodes_in(item)
    elif isinstance(obj, slice):
        for item in (obj.start, obj.stop, obj.step):
            yield from _nodes_in(item)


def _full_slice(item: slice, length: int) -> bool:
    """True for a slice that keeps a whole axis in order (x[:], x[0:], x[:n] with n >= length)."""
    parts = (item.start, item.stop, item.step)
    if any(isinstance(p, torch.fx.Node) for p in parts):
        return False
    return item.step in (None, 1) and item.start in (None, 0) and (item.stop is None or item.stop >= length)


def _reshape_move(in_shape: tuple[int, ...], out_shape: tuple[int, ...], axis: int, units: int, inner: int):
    """Where a (units, inner)-laid-out axis lands after a row-major reshape, or None if its units get split."""
    prefix = math.prod(in_shape[:axis])
    for b in range(len(out_shape)):
        if math.prod(out_shape[:b]) != prefix:
            continue
        if out_shape[b] % units == 0 and (out_shape[b] > 1 or units == 1):
            new_inner = out_shape[b] // units
            # the unit index stays the outermost part of axis b, everything after it (inner and the
            # following axes) is folded into or split out of the new inner block
            if units * new_inner * math.prod(out_shape[b + 1 :]) == units * inner * math.prod(in_shape[axis + 1 :]):
                return b, new_inner
    return None


class _Deriver:
    """Abstract interpretation of one traced graph."""

    def __init__(self, module: nn.Module, gm: torch.fx.GraphModule, prefix: str) -> None:
        self.module = module
        self.gm = gm
        self.prefix = prefix
        self.uf = _UnionFind()
        self.vals: dict[torch.fx.Node, Any] = {}
        state = module.state_dict(keep_vars=True)
        self.state_shapes = {k: tuple(v.shape) for k, v in state.items()}
        self.canon: dict[str, str] = {}
        self.aliases: dict[str, list[str]] = {}
        seen: dict[tuple, str] = {}
        for name, t in state.items():
            key = (t.data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) if t.numel() else (name,)
            first = seen.setdefault(key, name)
            self.canon[name] = first
            self.aliases.setdefault(first, []).append(name)
        self.claims: dict[tuple[str, int], tuple[int, int]] = {}  # (canonical, axis) -> (elem, inner)
        self.outer: dict[tuple[str, int], int] = {}  # (canonical, axis) -> fused blocks side by side (Q, K, V)
        self.members: dict[tuple[str, int], tuple[str, bool]] = {}  # (name, axis) -> (role, direct)
        self.pinned: dict[str, str] = {}  # canonical name -> why it must keep its order
        self.module_calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                self.module_calls[node.target] = self.module_calls.get(node.target, 0) + 1
        self.reader_inputs: dict[torch.fx.Node, int] = {}  # reader node -> elem its weight's in-axis joined
        self.unknown_ops: list[str] = []
        # Q/K vs V/O parts (see _member_parts): the tensors each projection created, the parts each tagged value
        # was used as, the (node, tag) uses attention sanctions, the out-projection columns reading an attention
        # output, the tags behind "whole heads only", and the tensor axes claimed more than once
        self.proj_keys: dict[int, list[tuple[str, int]]] = {}
        self.renamed: dict[int, int] = {}  # a fused projection's element -> the element of its blocks
        self.part_marks: dict[tuple, set[str]] = {}
        self.tag_uses: set[tuple[str, tuple]] = set()
        self.vo_reads: dict[tuple[str, int], _Tag] = {}
        self.whole_tags: list[tuple[int, _Tag | None]] = []
        self.reclaimed: set[tuple[str, int]] = set()

    # ----------------------------------------------------------------------------------- claims
    def claim(self, name: str, axis: int, role: str, elem: int, inner: int = 1, *, where: str) -> None:
        """Tie tensor `name` axis `axis` to group element `elem`; aliases of the same tensor follow."""
        if name not in self.canon:
            self.uf.freeze(elem, f"{where} uses {name!r}, which is not in the state dict")
            return
        canon = self.canon[name]
        axis = axis % len(self.state_shapes[name])
        expected = self.uf.size[elem] * inner
        if self.state_shapes[name][axis] != expected:
            self.uf.freeze(elem, f"{where}: {name!r} axis {axis} has length {self.state_shapes[name][axis]}, not {expected}")
            return
        key = (canon, axis)
        if key in self.claims:
            self.reclaimed.add(key)
            prev, prev_inner = self.claims[key]
            if prev_inner != inner:
                why = f"{where} reads {name!r} axis {axis} with a different layout than before"
                self.uf.freeze(prev, why)
                self.uf.freeze(elem, why)
            self.uf.union(prev, elem)
        else:
            self.claims[key] = (elem, inner)
        for alias in self.aliases[canon]:
            slot = (alias, axis)
            if alias == name:
                if slot not in self.members or not self.members[slot][1]:
                    self.members[slot] = (role, True)
            elif slot not in self.members:
                self.members[slot] = (role, False)

    def claim_module(self, target: str, pname: str, axis: int, role: str, elem: int, inner: int = 1) -> None:
        name = f"{target}.{pname}" if target else pname
        if name in self.canon:
            self.claim(name, axis, role, elem, inner, where=f"module {target!r}")

    def pin(self, value: Any, reason: str) -> None:
        for item in self._flatten(value):
            if isinstance(item, _Param):
                self.pinned.setdefault(self.canon[item.name], reason)

    def freeze_all(self, value: Any, reason: str, boundary: bool = False) -> None:
        for item in self._flatten(value):
            if isinstance(item, (_Lab, _Heads)):
                self.uf.freeze(item.elem, reason, boundary)
            elif isinstance(item, _Param):
                self.pinned.setdefault(self.canon[item.name], reason)

    def _flatten(self, value: Any) -> Iterable[Any]:
        if isinstance(value, _Tuple):
            for item in value.items:
                yield from self._flatten(item)
        elif value is not None:
            yield value

    def unknown(self, node: torch.fx.Node, what: str) -> None:
        """Freeze every group the node touches: an op we cannot reason about must see original orders."""
        reason = f"unsupported op {what} (node {node.name})"
        touched = False
        for arg in _nodes_in((node.args, node.kwargs)):
            value = self.vals.get(arg)
            if any(isinstance(v, (_Lab, _Param, _Heads)) for v in self._flatten(value)):
                touched = True
            self.freeze_all(value, reason)
        if touched:
            logger.warning("freezing the groups that %s touches", reason)
            self.unknown_ops.append(what)
        return None

    # ----------------------------------------------------------------------------------- walk
    def run(self) -> TraceResult:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                value = None
            elif node.op == "get_attr":
                value = self._get_attr(node)
            elif node.op in ("call_module", "call_function", "call_method") and self._reads_heads(node):
                value = self._heads_op(node)
            elif node.op == "call_module":
                value = self._call_module(node)
            elif node.op == "call_function":
                value = self._call_function(node)
            elif node.op == "call_method":
                value = self._call_method(node)
            elif node.op == "output":
                for arg in _nodes_in(node.args):
                    self.freeze_all(self.vals.get(arg), _OUTPUT_REASON, boundary=True)
                value = None
            else:
                value = self.unknown(node, node.op)
            self.vals[node] = value
        return self._finish()

    def _get_attr(self, node: torch.fx.Node) -> Any:
        target = node.target
        shape = _shape(node)
        if target in self.canon and shape is not None:
            return _Param(target, tuple(range(len(shape))))
        return None  # a constant of the traced code: never permuted

    def _arg(self, node: torch.fx.Node, i: int, key: str, default: Any = None) -> Any:
        if len(node.args) > i:
            return node.args[i]
        return node.kwargs.get(key, default)

    def _val(self, arg: Any) -> Any:
        return self.vals.get(arg) if isinstance(arg, torch.fx.Node) else None

    # ----------------------------------------------------------------------------------- modules
    def _call_module(self, node: torch.fx.Node) -> Any:
        target = str(node.target)
        mod = self.gm.get_submodule(target)
        x = node.args[0] if node.args else None
        lab = self._val(x)
        in_shape, out_shape = _shape(x), _shape(node)
        if isinstance(lab, (_Param, _Tuple)):
            return self.unknown(node, f"{type(mod).__name__} on a parameter or tuple")
        if isinstance(mod, nn.Linear):
            return self._linear(node, lab, in_shape, out_shape, target, "weight", "bias", mod.out_features)
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return self._conv(node, mod, lab, in_shape, target)
        if isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) and mod.groups == 1:
            ch = len(in_shape) - len(mod.kernel_size) - 1
            self._read(lab, ch, target, "weight", 0, node, f"{type(mod).__name__} {target!r}")
            elem = self.uf.new(mod.out_channels, target)
            self.claim_module(target, "weight", 1, "out", elem)
            self.claim_module(target, "bias", 0, "out", elem)
            return _Lab(elem, ch)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            return self._channel_norm(lab, 1, target)
        if isinstance(mod, nn.modules.instancenorm._InstanceNorm):
            ch = 0 if len(in_shape) == mod._get_no_batch_dim() else 1
            return self._channel_norm(lab, ch, target)
        if isinstance(mod, (nn.LayerNorm, nn.RMSNorm)):
            norm_dims = len(tuple(mod.normalized_shape))
            return self._last_dims_norm(lab, in_shape, norm_dims, target, "weight", "bias")
        if isinstance(mod, nn.GroupNorm):
            if isinstance(lab, _Lab) and lab.axis == 1 and mod.num_groups in (1, mod.num_channels):
                # one group (statistics over all channels) or one channel per group: both commute with
                # any channel permutation; only the per-channel affine follows it
                return self._channel_norm(lab, 1, target)
            if isinstance(lab, _Lab):
                self.uf.freeze(lab.elem, f"GroupNorm {target!r}: permutations of whole channel groups are not supported")
            return None
        if isinstance(mod, nn.Embedding):
            if lab is not None:
                return self.unknown(node, f"Embedding {target!r} on permuted indices")
            elem = self.uf.new(mod.embedding_dim, target)
            self.claim_module(target, "weight", 1, "out", elem)
            return _Lab(elem, len(out_shape) - 1)
        if isinstance(mod, _ELEMENTWISE_MODULES):
            return self._elementwise(node, [x])
        if isinstance(mod, nn.PReLU) and mod.num_parameters == 1:
            return self._elementwise(node, [x])
        if type(mod) in _POOL_MODULES and not getattr(mod, "return_indices", False):
            return self._pool(node, lab, in_shape, out_shape, _POOL_MODULES[type(mod)])
        if isinstance(mod, (nn.Flatten, nn.Unflatten)):
            return self._layout(node, x)
        for p in mod.state_dict(keep_vars=True):
            full = f"{target}.{p}"
            if full in self.canon:
                self.pinned.setdefault(self.canon[full], f"used by unsupported module {type(mod).__name__} {target!r}")
        return self.unknown(node, f"module {type(mod).__name__} {target!r}")

    def _read(self, lab: Any, axis: int, target: str, pname: str, w_axis: int, node: torch.fx.Node, where: str, name: str | None = None) -> None:
        """A weight reads `lab` along value axis `axis`: tie the weight's `w_axis` to the label's group."""
        if not isinstance(lab, _Lab):
            return
        if lab.axis != axis:
            self.uf.freeze(lab.elem, f"{where} reads the permuted axis {lab.axis} as if it were a spatial/batch axis")
            return
        full = name if name is not None else (f"{target}.{pname}" if target else pname)
        key = self._key(full, w_axis)
        fresh = key is not None and key not in self.claims
        self.claim(full, w_axis, "in", lab.elem, lab.inner, where=where)
        self.reader_inputs[node] = lab.elem
        if lab.tag is not None and lab.tag[0] == "o" and fresh and key in self.claims:
            # an out projection reading an attention output: its columns follow the V/O order
            self.vo_reads[key] = lab.tag
            self.tag_uses.add((node.name, self._base(lab.tag)))

    def _linear(self, node, lab, in_shape, out_shape, target, wname, bname, out_features, *, names=None):
        where = f"Linear {target!r}" if names is None else f"linear (node {node.name})"
        w = names[0] if names else f"{target}.{wname}"
        self._read(lab, len(in_shape) - 1, target, wname, 1, node, where, name=w)
        elem = self.uf.new(out_features, target if names is None else w.rsplit(".", 1)[0])
        b = names[1] if names else f"{target}.{bname}"
        keys = [k for k in (self._key(w, 0), self._key(b, 0)) if k is not None and k not in self.claims]
        self.claim(w, 0, "out", elem, where=where)
        if b is not None and b in self.canon:
            self.claim(b, 0, "out", elem, where=where)
        keys = [k for k in keys if self.claims.get(k) == (elem, 1)]
        if self._key(w, 0) not in keys:
            return _Lab(elem, len(out_shape) - 1)
        self.proj_keys[elem] = keys  # this projection's own rows: they take the part its output is used as
        return _Lab(elem, len(out_shape) - 1, tag=("p", elem, None))

    def _conv(self, node, mod, lab, in_shape, target):
        ch = len(in_shape) - len(mod.kernel_size) - 1
        where = f"{type(mod).__name__} {target!r}"
        if mod.groups == 1:
            self._read(lab, ch, target, "weight", 1, node, where)
            elem = self.uf.new(mod.out_channels, target)
            self.claim_module(target, "weight", 0, "out", elem)
            self.claim_module(target, "bias", 0, "out", elem)
            return _Lab(elem, ch)
        if mod.groups == mod.in_channels:
            # depthwise: output channel c*m + k reads input channel c only, so the output axis is the input
            # axis with a `m`-times larger inner block
            if not isinstance(lab, _Lab):
                return None
            if lab.axis != ch:
                self.uf.freeze(lab.elem, f"{where} convolves over the permuted axis")
                return _Lab(lab.elem, lab.axis, lab.inner)
            mult = mod.out_channels // mod.in_channels
            self.claim_module(target, "weight", 0, "out", lab.elem, lab.inner * mult)
            self.claim_module(target, "bias", 0, "out", lab.elem, lab.inner * mult)
            self.reader_inputs[node] = lab.elem
            return _Lab(lab.elem, ch, lab.inner * mult)
        reason = f"{where} has groups={mod.groups}; grouped convolutions are not supported"
        if isinstance(lab, _Lab):
            self.uf.freeze(lab.elem, reason)
        elem = self.uf.new(mod.out_channels, target)
        self.uf.freeze(elem, reason)
        self.claim_module(target, "weight", 0, "out", elem)
        self.claim_module(target, "bias", 0, "out", elem)
        logger.warning("freezing the groups around %s", reason)
        return _Lab(elem, ch)

    def _channel_norm(self, lab, ch, target):
        if not isinstance(lab, _Lab):
            return None
        if lab.axis == ch:
            for p in ("weight", "bias", "running_mean", "running_var"):
                self.claim_module(target, p, 0, "out", lab.elem, lab.inner)
        # statistics over the other axes are permutation-invariant, so the label passes either way
        return lab

    def _last_dims_norm(self, lab, in_shape, norm_dims, target, wname, bname, *, names=None):
        if not isinstance(lab, _Lab):
            return None
        first = len(in_shape) - norm_dims
        if lab.axis >= first:
            # mean/variance over the normalised block are invariant under any permutation of its entries
            w_axis = lab.axis - first
            for n in names if names is not None else (f"{target}.{wname}", f"{target}.{bname}"):
                if n is not None and n in self.canon:
                    self.claim(n, w_axis, "out", lab.elem, lab.inner, where=f"norm {target or n!r}")
        return lab

    def _pool(self, node, lab, in_shape, out_shape, spatial):
        if not isinstance(lab, _Lab):
            return None
        if lab.axis >= len(in_shape) - spatial or len(in_shape) != len(out_shape) or lab.inner != 1:
            return self.unknown(node, f"pooling over the permuted axis (node {node.name})")
        return lab

    # ----------------------------------------------------------------------------------- functions
    def _call_function(self, node: torch.fx.Node) -> Any:
        fn = node.target
        args = node.args
        if fn is operator.getitem:
            return self._getitem(node)
        if fn is getattr:
            attr = args[1]
            if attr in ("shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"):
                return None
            if attr in ("T", "mT"):
                return self._transpose(node, args[0])
            return self.unknown(node, f"attribute .{attr}")
        if fn in (len, torch._assert):
            return None
        if fn in _ELEMENTWISE_FUNCS:
            return self._elementwise(node, self._tensor_args(node))
        if fn in _LAYOUT_FUNCS:
            return self._layout(node, args[0])
        if fn in _TRANSPOSE_FUNCS:
            return self._transpose(node, args[0])
        if fn in _REDUCTION_FUNCS:
            return self._reduce(node, _REDUCTIONS[_REDUCTION_FUNCS[fn]])
        if fn in _POOL_FUNCS and not self._arg(node, 99, "return_indices", False):
            x = args[0]
            return self._pool(node, self._val(x), _shape(x), _shape(node), _POOL_FUNCS[fn])
        if fn in (torch.cat, torch.concat, torch.stack):
            return self._cat(node, stack=fn is torch.stack)
        if fn is F.linear:
            return self._functional_linear(node)
        if fn in (F.layer_norm, F.rms_norm):
            return self._functional_norm(node)
        if fn is F.embedding:
            w = self._val(self._arg(node, 1, "weight"))
            if self._val(args[0]) is None and isinstance(w, _Param) and w.dims == (0, 1):
                elem = self.uf.new(self.state_shapes[w.name][1], w.name.rsplit(".", 1)[0])
                self.claim(w.name, 1, "out", elem, where=f"embedding (node {node.name})")
                return _Lab(elem, len(_shape(node)) - 1)
        return self.unknown(node, getattr(fn, "__name__", str(fn)))

    def _call_method(self, node: torch.fx.Node) -> Any:
        name = node.target
        x = node.args[0]
        if name in _SHAPE_METHODS:
            return self._val(x) if name == "type_as" else None
        if name in _ELEMENTWISE_METHODS:
            return self._elementwise(node, self._tensor_args(node))
        if name in _LAYOUT_METHODS:
            return self._layout(node, x)
        if name == "expand":
            return self._expand(node, x)
        if name in _TRANSPOSE_METHODS:
            return self._transpose(node, x)
        if name in _REDUCTIONS:
            return self._reduce(node, _REDUCTIONS[name])
        if name in ("chunk", "split", "unbind"):
            return self._split(node)
        return self.unknown(node, f"method .{name}()")

    def _tensor_args(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        return [a for a in _nodes_in((node.args, node.kwargs)) if _shape(a) is not None or self._val(a) is not None]

    def _elementwise(self, node: torch.fx.Node, operands: list[Any]) -> Any:
        """Entry-wise op: labelled operands must share one axis (their groups merge); others must broadcast."""
        out_shape = _shape(node)
        if out_shape is None:
            return self.unknown(node, f"{node.target} without a tensor result")
        do = len(out_shape)
        where = f"{getattr(node.target, '__name__', node.target)} (node {node.name})"
        labs = []
        for a in operands:
            v, s = self._val(a), _shape(a)
            if isinstance(v, _Lab):
                labs.append((v, v.axis + do - len(s)))
            elif isinstance(v, _Tuple):
                return self.unknown(node, where)
        if not labs:
            # parameters combined without hidden units: their result must keep the original order
            for a in operands:
                self.pin(self._val(a), f"{where} combines it outside a permuted stream")
            return None
        layouts = {(ax, lab.inner) for lab, ax in labs}
        if len(layouts) > 1:
            for lab, _ in labs:
                self.uf.freeze(lab.elem, f"{where} mixes differently laid out permuted axes")
            for a in operands:
                self.pin(self._val(a), f"{where} mixes differently laid out permuted axes")
            return None
        ax, inner = layouts.pop()
        root = labs[0][0].elem
        for lab, _ in labs[1:]:
            root = self.uf.union(root, lab.elem)
        for a in operands:
            v, s = self._val(a), _shape(a)
            if isinstance(v, _Lab) or s is None:
                continue
            k = ax - (do - len(s))
            if k < 0 or s[k] == 1:
                continue  # broadcasts along the permuted axis
            if isinstance(v, _Param) and v.dims[k] is not None:
                self.claim(v.name, v.dims[k], "out", root, inner, where=where)
            else:
                self.uf.freeze(root, f"{where} ties it to an unpermuted tensor")
        return _Lab(root, ax, inner, _common_tag(lab for lab, _ in labs))

    def _layout(self, node: torch.fx.Node, x: Any) -> Any:
        """Reshape-like ops (view, reshape, flatten, unflatten, squeeze, unsqueeze), decided from shapes."""
        v, s_in, s_out = self._val(x), _shape(x), _shape(node)
        if v is None:
            return None
        if isinstance(v, _Lab):
            moved = _reshape_move(s_in, s_out, v.axis, s_in[v.axis] // v.inner, v.inner)
            if moved is None:
                heads = self._split_heads(node, x, v) if v.inner == 1 else None
                if heads is not None:
                    return heads
                return self.unknown(node, f"reshape that splits the permuted axis (node {node.name})")
            return _Lab(v.elem, moved[0], moved[1], v.tag)
        if isinstance(v, _Param):
            kept = [d for d in range(len(s_in)) if s_in[d] != 1]
            if [s_in[d] for d in kept] != [s for s in s_out if s != 1]:
                self.pin(v, f"reshaped by node {node.name}")
                return None
            dims: list[int | None] = [None] * len(s_out)
            for d, b in zip(kept, [b for b in range(len(s_out)) if s_out[b] != 1]):
                dims[b] = v.dims[d]
            return _Param(v.name, tuple(dims))
        return self.unknown(node, f"reshape of a tuple (node {node.name})")

    def _expand(self, node: torch.fx.Node, x: Any) -> Any:
        v, s_in, s_out = self._val(x), _shape(x), _shape(node)
        if v is None:
            return None
        shift = len(s_out) - len(s_in)
        if isinstance(v, _Lab) and s_out[v.axis + shift] == s_in[v.axis]:
            return _Lab(v.elem, v.axis + shift, v.inner)
        if isinstance(v, _Param):
            return _Param(v.name, (None,) * shift + tuple(d if s_in[i] == s_out[i + shift] else None for i, d in enumerate(v.dims)))
        return self.unknown(node, f"expand (node {node.name})")

    def _transpose(self, node: torch.fx.Node, x: Any) -> Any:
        v, s_in = self._val(x), _shape(x)
        if v is None:
            return None
        nd = len(s_in)
        order = self._axis_order(node, nd)
        if order is None or not isinstance(v, (_Lab, _Param)):
            return self.unknown(node, f"transpose (node {node.name})")
        if isinstance(v, _Lab):
            return _Lab(v.elem, order.index(v.axis), v.inner)
        return _Param(v.name, tuple(v.dims[o] for o in order))

    def _axis_order(self, node: torch.fx.Node, nd: int) -> list[int] | None:
        """Output axis i shows input axis order[i]."""
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        args = list(node.args[1:])
        if name in ("t", "T") or (name == "getattr" and node.args[1] == "T"):
            return list(range(nd))[::-1]
        if name == "getattr" and node.args[1] == "mT":
            return list(range(nd - 2)) + [nd - 1, nd - 2]
        if name in ("transpose", "swapaxes"):
            a = self._arg(node, 1, "dim0")
            b = self._arg(node, 2, "dim1")
            order = list(range(nd))
            a, b = a % nd, b % nd
            order[a], order[b] = order[b], order[a]
            return order
        if name == "permute":
            dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
            if not dims:
                dims = node.kwargs.get("dims", [])
            return [d % nd for d in dims]
        if name == "movedim":
            src, dst = self._arg(node, 1, "source"), self._arg(node, 2, "destination")
            src = [src] if isinstance(src, int) else list(src)
            dst = [dst] if isinstance(dst, int) else list(dst)
            src, dst = [s % nd for s in src], [d % nd for d in dst]
            rest = iter([i for i in range(nd) if i not in src])
            mapping = dict(zip(dst, src))
            return [mapping[i] if i in mapping else next(rest) for i in range(nd)]
        return None

    def _reduce(self, node: torch.fx.Node, dim_pos: int) -> Any:
        x = node.args[0]
        v, s_in, s_out = self._val(x), _shape(x), _shape(node)
        if v is None:
            return None
        if not isinstance(v, _Lab) or s_out is None:
            return self.unknown(node, f"reduction (node {node.name})")
        dim = self._arg(node, dim_pos, "dim")
        nd = len(s_in)
        if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
            return None  # full reduction: invariant under any permutation
        dims = {d % nd for d in ([dim] if isinstance(dim, int) else dim)}
        if v.axis in dims:
            return None  # reducing over the permuted axis is permutation-invariant
        keep = len(s_out) == nd
        return _Lab(v.elem, v.axis if keep else v.axis - sum(1 for d in dims if d < v.axis), v.inner)

    def _cat(self, node: torch.fx.Node, stack: bool) -> Any:
        tensors = list(self._arg(node, 0, "tensors"))
        dim = self._arg(node, 1, "dim", 0)
        nd = len(_shape(tensors[0]))
        dim = dim % (nd + 1 if stack else nd)
        vals = [self._val(t) for t in tensors]
        labs = [v for v in vals if isinstance(v, _Lab)]
        if not labs:
            self.pin(_Tuple(tuple(vals)), f"concatenated by node {node.name}")
            return None
        if any(not isinstance(v, _Lab) for v in vals) or len({(v.axis, v.inner) for v in labs}) > 1 or labs[0].axis == dim and not stack:
            return self.unknown(node, f"{'stack' if stack else 'cat'} across or beside permuted axes")
        root = labs[0].elem
        for v in labs[1:]:
            root = self.uf.union(root, v.elem)
        axis = labs[0].axis + (1 if stack and dim <= labs[0].axis else 0)
        return _Lab(root, axis, labs[0].inner)

    def _split(self, node: torch.fx.Node) -> Any:
        x = node.args[0]
        v, s_in = self._val(x), _shape(x)
        if v is None:
            return None
        metas = node.meta.get("tensor_meta")
        count = len(metas) if isinstance(metas, (list, tuple)) else 0
        dim = self._arg(node, 1 if node.target == "unbind" else 2, "dim", 0)
        if isinstance(v, _Lab) and count and dim % len(s_in) == v.axis and node.target != "unbind":
            return self._split_fused(node, x, v, count)
        if not isinstance(v, _Lab) or not count or dim % len(s_in) == v.axis:
            return self.unknown(node, f".{node.target}() across the permuted axis")
        axis = v.axis - (1 if node.target == "unbind" and dim % len(s_in) < v.axis else 0)
        return _Tuple(tuple(_Lab(v.elem, axis, v.inner) for _ in range(count)))

    def _getitem(self, node: torch.fx.Node) -> Any:
        x, idx = node.args
        v = self._val(x)
        if isinstance(v, _Tuple):
            return v.items[idx] if isinstance(idx, int) else _Tuple(tuple(v.items[idx]))
        s_in = _shape(x)
        if v is None or s_in is None:
            return None
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(isinstance(i, torch.fx.Node) for i in idx) or any(not isinstance(i, (int, slice, type(None), type(Ellipsis))) for i in idx):
            return self.unknown(node, f"advanced indexing (node {node.name})")
        n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        mapping: dict[int, int] = {}  # input axis -> output axis for axes kept whole
        d = o = 0
        for i in idx:
            if i is None:
                o += 1
            elif i is Ellipsis:
                for _ in range(len(s_in) - n_real):
                    mapping[d] = o
                    d += 1
                    o += 1
            elif isinstance(i, int):
                d += 1
            else:
                if _full_slice(i, s_in[d]):
                    mapping[d] = o
                d += 1
                o += 1
        while d < len(s_in):
            mapping[d] = o
            d += 1
            o += 1
        if isinstance(v, _Lab):
            if v.axis not in mapping:
                return self.unknown(node, f"indexing into the permuted axis (node {node.name})")
            return _Lab(v.elem, mapping[v.axis], v.inner)
        s_out = _shape(node)
        dims: list[int | None] = [None] * len(s_out)
        for din, dout in mapping.items():
            dims[dout] = v.dims[din]
        return _Param(v.name, tuple(dims))

    def _functional_linear(self, node: torch.fx.Node) -> Any:
        x = node.args[0]
        w, b = self._val(self._arg(node, 1, "weight")), self._val(self._arg(node, 2, "bias"))
        lab = self._val(x)
        if not isinstance(w, _Param) or w.dims != (0, 1) or not (b is None or isinstance(b, _Param) and b.dims == (0,)) or isinstance(lab, (_Param, _Tuple)):
            return self.unknown(node, "F.linear with a computed weight")
        out_features = self.state_shapes[w.name][0]
        return self._linear(node, lab, _shape(x), _shape(node), "", "", "", out_features, names=(w.name, b.name if b else None))

    def _functional_norm(self, node: torch.fx.Node) -> Any:
        x = node.args[0]
        shape = self._arg(node, 1, "normalized_shape")
        w, b = self._val(self._arg(node, 2, "weight")), self._val(self._arg(node, 3, "bias"))
        lab = self._val(x)
        if lab is None:
            self.pin(_Tuple((w, b)), f"norm (node {node.name}) on an unpermuted tensor")
            return None
        params = [p for p in (w, b) if p is not None]
        norm_dims = len(shape) if isinstance(shape, (list, tuple)) else 1
        if not isinstance(lab, _Lab) or any(not isinstance(p, _Param) or p.dims != tuple(range(norm_dims)) for p in params):
            return self.unknown(node, f"{node.target.__name__} with computed parameters")
        return self._last_dims_norm(lab, _shape(x), norm_dims, "", "", "", names=tuple(p.name for p in params))

    # ----------------------------------------------------------------------------------- attention heads
    def _split_heads(self, node: torch.fx.Node, x: Any, v: _Lab) -> Any:
        """A reshape of a labelled axis into (heads, head_dim), or (blocks, heads, head_dim) for fused Q/K/V."""
        s_in, s_out = _shape(x), _shape(node)
        units, prefix, suffix = s_in[v.axis], math.prod(s_in[: v.axis]), math.prod(s_in[v.axis + 1 :])
        for b in range(len(s_out)):
            if math.prod(s_out[:b]) != prefix:
                continue
            for k in (2, 3):
                if b + k <= len(s_out) and math.prod(s_out[b : b + k]) == units and math.prod(s_out[b + k :]) == suffix:
                    where = f"reshape (node {node.name})"
                    if k == 2:
                        self.uf.split_heads(v.elem, s_out[b + 1], where)
                        return _Heads(v.elem, b, b + 1, tag=v.tag)
                    elem = self._refactor_outer(node, x, v, s_out[b])
                    if elem is None:
                        return None
                    self.uf.split_heads(elem, s_out[b + 2], where)
                    return _Heads(elem, b + 1, b + 2, outer=b, tag=_fused_tag(v.tag, elem))
        return None

    def _split_fused(self, node: torch.fx.Node, x: Any, v: _Lab, count: int) -> Any:
        """chunk/split of a fused projection's output axis into `count` equal blocks (Q, K and V)."""
        metas = node.meta.get("tensor_meta")
        lengths = {tuple(m.shape)[v.axis] for m in metas} if isinstance(metas, (list, tuple)) else set()
        if v.inner != 1 or len(lengths) != 1:
            return self.unknown(node, f".{node.target}() across the permuted axis into unequal parts")
        elem = self._refactor_outer(node, x, v, count)
        if elem is None:
            return self.unknown(node, f".{node.target}() across the permuted axis")
        whole = _fused_tag(v.tag, elem)
        return _Tuple(tuple(_Lab(elem, v.axis, tag=_block_tag(whole, i)) for i in range(count)))

    def _refactor_outer(self, node: torch.fx.Node, x: Any, v: _Lab, blocks: int) -> int | None:
        """Re-read a fresh projection's group of `blocks` * n units as n units in `blocks` blocks side by side.

        Sound only while nothing else has seen the group whole: it must be one projection's output, tied to
        nothing, and every value carrying it may only flow on (unchanged) into this split.
        """
        uf, e = self.uf, v.elem
        if uf.find(e) != e or uf.size[e] % blocks or any(uf.find(i) == e for i in range(len(uf.parent)) if i != e):
            return None
        carriers = {n for n, val in self.vals.items() if isinstance(val, _Lab) and uf.find(val.elem) == e}
        if x not in carriers or any(u not in carriers and u is not node for n in carriers for u in n.users):
            return None
        keys = [k for k, (el, inner) in self.claims.items() if el == e]
        if any(self.claims[k][1] != 1 or self.members.get(k, ("out",))[0] != "out" for k in keys):
            return None
        elem = uf.new(uf.size[e] // blocks, uf.producer[e])
        for key in keys:
            self.claims[key] = (elem, 1)
            self.outer[key] = blocks
        self.renamed[e] = elem
        if e in self.proj_keys:
            self.proj_keys[elem] = self.proj_keys.pop(e)
        for reason in uf.reasons.pop(e, []):
            uf.freeze(elem, *reason)
        return elem

    # ----------------------------------------------------------------------------------- Q/K and V/O parts
    def _key(self, name: str | None, axis: int) -> tuple[str, int] | None:
        if name is None or name not in self.canon:
            return None
        return self.canon[name], axis % len(self.state_shapes[name])

    def _base(self, tag: _Tag) -> tuple[str, Any]:
        """The tag without its block, a fused projection's element followed to its blocks' element."""
        return (tag[0], self.renamed.get(tag[1], tag[1])) if tag[0] == "p" else (tag[0], tag[1])

    def _whole(self, elem: int, tag: _Tag | None, reason: str) -> None:
        """Whole heads only (rotary): fine for Q/K's within-head order, but remembered in case it touches V/O."""
        self.uf.whole(elem, reason)
        self.whole_tags.append((elem, tag))

    def _mark(self, node: torch.fx.Node, part: str, *values: _Heads) -> None:
        """Attention op `node` uses these projection outputs as Q/K (scores) or V/O (weighted by the scores)."""
        for v in values:
            if v.tag is not None and v.tag[0] == "p":  # an attention output reused as Q, K or V stays unmarked
                base = self._base(v.tag)
                self.part_marks.setdefault(base + (v.tag[2],), set()).add(part)
                self.tag_uses.add((node.name, base))

    def _tags(self, value: Any) -> set[tuple | None]:
        """The tag bases of every labelled item of `value` (None for an untagged one)."""
        return {self._base(v.tag) if v.tag is not None else None
                for v in self._flatten(value) if isinstance(v, (_Lab, _Heads))}

    def _tainted(self) -> set[tuple]:
        """Tag bases with a use attention does not sanction: a user that neither keeps the tag, nor is the
        attention op or out projection that marked it, nor only reads shapes. Their parts stay unknown."""
        tainted: set[tuple] = set()
        for node, value in self.vals.items():
            for base in self._tags(value) - {None}:
                for user in node.users:
                    if (user.name, base) not in self.tag_uses and not _shape_query(user) and self._tags(self.vals.get(user)) != {base}:
                        tainted.add(base)
        return tainted

    def _member_parts(self) -> tuple[dict[tuple[str, int], tuple[str, ...]], set[int]]:
        """Q/K or V/O part per outer block of the tensor axes attention is made of, only where the trace is
        sure: a projection whose every output block flows, order kept, into one side of attention only (q and
        k of ``q @ k^T``, the values the scores weigh), and the out projection's columns reading an attention
        output. Also the roots whose "whole heads only" came from something other than Q/K (they may not split).
        """
        tainted = self._tainted()

        def single(tag: tuple) -> str | None:
            seen = self.part_marks.get(tag, set())
            return next(iter(seen)) if len(seen) == 1 else None

        parts: dict[tuple[str, int], tuple[str, ...]] = {}
        for elem, keys in self.proj_keys.items():
            base = ("p", elem)
            for key in keys if base not in tainted else ():
                blocks = self.outer.get(key, 1)
                got = tuple(single(base + (None if blocks == 1 else i,)) for i in range(blocks))
                if key not in self.reclaimed and all(got):
                    parts[key] = got
        for key, tag in self.vo_reads.items():
            if key not in self.reclaimed and self._base(tag) not in tainted and self.outer.get(key, 1) == 1:
                parts[key] = ("vo",)
        unsplit = {self.uf.find(elem) for elem, tag in self.whole_tags
                   if tag is None or tag[0] != "p" or self._base(tag) in tainted or single(self._base(tag) + (tag[2],)) != "qk"}
        return parts, unsplit

    def _reads_heads(self, node: torch.fx.Node) -> bool:
        return any(isinstance(item, _Heads) for a in _nodes_in((node.args, node.kwargs)) for item in self._flatten(self.vals.get(a)))

    def _heads_op(self, node: torch.fx.Node) -> Any:
        """An op reading split attention heads: the ones attention is made of keep them, any other freezes."""
        x = node.args[0] if node.args else None
        if node.op == "call_module":
            mod = self.gm.get_submodule(str(node.target))
            if isinstance(mod, _ELEMENTWISE_MODULES):
                return self._heads_elementwise(node, [x], getattr(mod, "dim", None) if isinstance(mod, _SOFTMAX_MODULES) else False)
            return self.unknown(node, f"module {type(mod).__name__} {node.target!r} on attention heads")
        fn = node.target
        if node.op == "call_method":
            if fn in _SHAPE_METHODS:
                return self._val(x) if fn == "type_as" else None
            if fn in _ELEMENTWISE_METHODS:
                return self._heads_elementwise(node, self._tensor_args(node), self._arg(node, 1, "dim") if fn in _SOFTMAX_NAMES else False)
            if fn in _LAYOUT_METHODS:
                return self._heads_layout(node, x)
            if fn in _TRANSPOSE_METHODS:
                return self._heads_transpose(node, x)
            if fn in ("matmul", "__matmul__"):
                return self._heads_matmul(node, x, node.args[1])
            if fn == "unbind":
                return self._heads_unbind(node, x)
            return self.unknown(node, f"method .{fn}() on attention heads")
        if fn is operator.getitem:
            return self._getitem(node) if isinstance(self._val(x), _Tuple) else self._heads_getitem(node)
        if fn is getattr:
            if node.args[1] in ("shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"):
                return None
            if node.args[1] in ("T", "mT"):
                return self._heads_transpose(node, x)
        if fn in _ELEMENTWISE_FUNCS:
            dim = self._arg(node, 1, "dim") if getattr(fn, "__name__", "") in _SOFTMAX_NAMES else False
            return self._heads_elementwise(node, self._tensor_args(node), dim)
        if fn in _LAYOUT_FUNCS:
            return self._heads_layout(node, x)
        if fn in _TRANSPOSE_FUNCS:
            return self._heads_transpose(node, x)
        if fn in (operator.matmul, torch.matmul):
            return self._heads_matmul(node, x, node.args[1])
        if fn is torch.unbind:
            return self._heads_unbind(node, x)
        if fn is F.scaled_dot_product_attention:
            return self._heads_sdpa(node)
        if fn is torch.einsum:
            return self._heads_einsum(node)
        if fn in (torch.cat, torch.concat):
            return self._heads_cat(node)
        return self.unknown(node, f"{getattr(fn, '__name__', fn)} on attention heads")

    def _heads_cat(self, node: torch.fx.Node) -> Any:
        """cat of split heads along tokens, or along head_dim (rotate-half: then only whole heads may move)."""
        tensors = list(self._arg(node, 0, "tensors"))
        vals = [self._val(t) for t in tensors]
        dim = self._arg(node, 1, "dim", 0)
        if any(not isinstance(v, _Heads) for v in vals) or len({v.axes() for v in vals}) != 1 or not isinstance(dim, int):
            return self.unknown(node, "cat of attention heads with other tensors")
        v, dim = vals[0], dim % len(_shape(tensors[0]))
        if dim in (v.head, v.outer):
            return self.unknown(node, "cat across attention heads")
        root, tag = v.elem, _common_tag(vals)
        for other in vals[1:]:
            root = self.uf.union(root, other.elem)
        if dim == v.dim:
            self._whole(root, tag, f"node {node.name} concatenates inside heads")
        return _Heads(root, v.head, v.dim, v.outer, tag)

    def _heads_layout(self, node: torch.fx.Node, x: Any) -> Any:
        """A reshape that keeps the head axes whole, or merges (heads, head_dim) back into one axis."""
        v, s_in, s_out = self._val(x), _shape(x), _shape(node)
        if not isinstance(v, _Heads):
            return self.unknown(node, "reshape of a tuple holding attention heads")

        def kept(i: int) -> int | None:
            for j in range(len(s_out)):
                if s_out[j] == s_in[i] and math.prod(s_out[:j]) == math.prod(s_in[:i]):
                    return j
            return None

        axes = [a for a in v.axes() if a is not None]
        if all(kept(a) is not None for a in axes):
            return v.moved(kept)
        if v.dim == v.head + 1 and v.outer is None and s_in[v.head] * s_in[v.dim] == self.uf.size[v.elem]:
            width, prefix = s_in[v.head] * s_in[v.dim], math.prod(s_in[: v.head])
            for j in range(len(s_out)):
                if s_out[j] == width and math.prod(s_out[:j]) == prefix:
                    return _Lab(v.elem, j, tag=v.tag)
        return self.unknown(node, "reshape across attention heads")

    def _heads_transpose(self, node: torch.fx.Node, x: Any) -> Any:
        v, s_in = self._val(x), _shape(x)
        order = self._axis_order(node, len(s_in)) if isinstance(v, _Heads) else None
        if order is None:
            return self.unknown(node, "transpose of attention heads")
        return v.moved(order.index)

    def _heads_getitem(self, node: torch.fx.Node) -> Any:
        """qkv[i]: one block of a fused projection, picked by an integer on its block axis (full slices elsewhere)."""
        x, idx = node.args
        v, s_in = self._val(x), _shape(x)
        idx = idx if isinstance(idx, tuple) else (idx,)
        if not isinstance(v, _Heads) or any(i is None for i in idx) or sum(i is Ellipsis for i in idx) > 1:
            return self.unknown(node, "indexing into attention heads")
        if Ellipsis in idx:
            at = idx.index(Ellipsis)
            idx = idx[:at] + (slice(None),) * (len(s_in) - len(idx) + 1) + idx[at + 1 :]
        idx = idx + (slice(None),) * (len(s_in) - len(idx))
        full = [isinstance(i, slice) and _full_slice(i, s_in[d]) for d, i in enumerate(idx)]
        rest = [d for d in range(len(s_in)) if not full[d]]
        if not rest:
            return v
        if v.outer is not None and rest == [v.outer] and isinstance(idx[v.outer], int):
            return _Heads(v.elem, v.head - (v.head > v.outer), v.dim - (v.dim > v.outer),
                          tag=_block_tag(v.tag, idx[v.outer] % s_in[v.outer]))
        if v.dim is not None and rest == [v.dim] and isinstance(idx[v.dim], slice):
            # rotate-half style slicing inside heads: the same for every head, so whole heads may still move
            self._whole(v.elem, v.tag, f"node {node.name} slices inside heads")
            return v
        return self.unknown(node, "indexing into attention heads")

    def _heads_unbind(self, node: torch.fx.Node, x: Any) -> Any:
        v, s_in, dim = self._val(x), _shape(x), self._arg(node, 1, "dim", 0)
        if not isinstance(v, _Heads) or v.outer is None or not isinstance(dim, int) or dim % len(s_in) != v.outer:
            return self.unknown(node, "unbind of attention heads")
        return _Tuple(tuple(_Heads(v.elem, v.head - (v.head > v.outer), v.dim - (v.dim > v.outer), tag=_block_tag(v.tag, i))
                            for i in range(s_in[v.outer])))

    def _heads_elementwise(self, node: torch.fx.Node, operands: list[Any], softmax_dim: Any) -> Any:
        """Scaling, masks, softmax, dropout: heads pass when the other operands broadcast over them.

        `softmax_dim` is False for entry-wise ops, else the axis a softmax normalises over: along head_dim
        or tokens it commutes with the permutation, along heads it would mix differently permuted dims.
        """
        do = len(_shape(node))
        heads, others = [], []
        for a in operands:
            v, s = self._val(a), _shape(a)
            if isinstance(v, _Heads):
                heads.append(v.moved(lambda i, shift=do - len(s): i + shift))
            elif v is None and s is not None:
                others.append(s)
            elif v is not None:
                return self.unknown(node, f"{getattr(node.target, '__name__', node.target)} mixing heads with other permuted values")
        if (len({h.axes() for h in heads}) != 1 or (heads[0].outer is not None and softmax_dim is not False)
                or not (softmax_dim is False or isinstance(softmax_dim, int))):
            return self.unknown(node, f"{getattr(node.target, '__name__', node.target)} across attention heads")
        out = _Heads(heads[0].elem, heads[0].head, heads[0].dim, heads[0].outer, _common_tag(heads))
        if softmax_dim is not False and softmax_dim % do == out.head and out.dim is not None:
            return self.unknown(node, "softmax over attention heads")
        root = out.elem
        for h in heads[1:]:
            root = self.uf.union(root, h.elem)
        for s in others:
            for a in out.axes():
                k = None if a is None else a - (do - len(s))
                if k is None or k < 0 or s[k] == 1:
                    continue
                if a == out.dim:  # the same for every head (rotary cos/sin): whole heads may still move
                    self._whole(root, out.tag, f"node {node.name} weighs head dims by a tensor laid out along them")
                else:
                    self.uf.freeze(root, f"node {node.name} combines attention heads with a tensor laid out along them")
        return _Heads(root, out.head, out.dim, out.outer, out.tag)

    def _heads_matmul(self, node: torch.fx.Node, a: Any, b: Any) -> Any:
        """q @ k^T (contracting head_dim: scores per head) or scores @ v (heads of v's head_dim)."""
        va, vb, sa, sb, so = self._val(a), self._val(b), _shape(a), _shape(b), _shape(node)
        if not (isinstance(va, _Heads) and isinstance(vb, _Heads)) or va.outer is not None or vb.outer is not None:
            return self.unknown(node, "matmul of attention heads with another tensor")
        na, nb, no = len(sa), len(sb), len(so)
        head = va.head + no - na
        if va.head >= na - 2 or vb.head >= nb - 2 or head != vb.head + no - nb:
            return self.unknown(node, "matmul across attention heads")
        if va.dim == na - 1 and vb.dim == nb - 2:
            self._mark(node, "qk", va, vb)
            return _Heads(self.uf.union(va.elem, vb.elem), head, None)
        if va.dim is None and vb.dim == nb - 1:
            self._mark(node, "vo", vb)
            return _Heads(self.uf.union(va.elem, vb.elem), head, no - 1, tag=("o", node.name, None))
        return self.unknown(node, "matmul within attention heads")

    def _heads_sdpa(self, node: torch.fx.Node) -> Any:
        """F.scaled_dot_product_attention(q, k, v, attn_mask): heads of q, k, v on the same axes, head_dim last."""
        q, k, v = (self._arg(node, i, key) for i, key in enumerate(("query", "key", "value")))
        mask = self._arg(node, 3, "attn_mask")
        vals = [self._val(t) for t in (q, k, v)]
        shapes = [_shape(t) for t in (q, k, v)]
        if (node.kwargs.get("enable_gqa") or any(not isinstance(h, _Heads) or h.outer is not None or h.dim != len(s) - 1
                                                 or h.head != vals[0].head or len(s) != len(shapes[0]) for h, s in zip(vals, shapes))
                or self._val(mask) is not None):
            return self.unknown(node, "scaled_dot_product_attention with heads laid out differently")
        root = self.uf.union(self.uf.union(vals[0].elem, vals[1].elem), vals[2].elem)
        s = _shape(mask)
        if s is not None and vals[0].head - (len(shapes[0]) - len(s)) >= 0 and s[vals[0].head - (len(shapes[0]) - len(s))] != 1:
            self.uf.freeze(root, f"node {node.name} masks attention heads with a per-head mask")
        self._mark(node, "qk", vals[0], vals[1])
        self._mark(node, "vo", vals[2])
        return _Heads(root, vals[0].head, len(_shape(node)) - 1, tag=("o", node.name, None))

    def _heads_einsum(self, node: torch.fx.Node) -> Any:
        """einsum of two operands: 'bhqd,bhkd->bhqk' (scores) or 'bhqk,bhkd->bhqd' (heads of v)."""
        eq, *ops = node.args
        ops = list(ops[0]) if len(ops) == 1 and isinstance(ops[0], (list, tuple)) else ops
        if not isinstance(eq, str) or "..." in eq or "->" not in eq or len(ops) != 2:
            return self.unknown(node, "einsum on attention heads")
        ins, out = eq.replace(" ", "").split("->")
        (la, lb), (va, vb) = ins.split(","), (self._val(o) for o in ops)
        if not (isinstance(va, _Heads) and isinstance(vb, _Heads)) or va.outer is not None or vb.outer is not None:
            return self.unknown(node, "einsum of attention heads with another tensor")
        head = la[va.head]
        if lb[vb.head] != head or head not in out:
            return self.unknown(node, "einsum across attention heads")
        if va.dim is not None and vb.dim is not None and la[va.dim] == lb[vb.dim] and la[va.dim] not in out:
            self._mark(node, "qk", va, vb)
            return _Heads(self.uf.union(va.elem, vb.elem), out.index(head), None)
        if va.dim is None and vb.dim is not None and lb[vb.dim] in out and lb[vb.dim] not in la:
            self._mark(node, "vo", vb)
            return _Heads(self.uf.union(va.elem, vb.elem), out.index(head), out.index(lb[vb.dim]), tag=("o", node.name, None))
        return self.unknown(node, "einsum within attention heads")

    # ----------------------------------------------------------------------------------- result
    def _finish(self) -> TraceResult:
        uf = self.uf
        for (canon, _axis), (elem, _inner) in self.claims.items():
            if canon in self.pinned:
                uf.freeze(elem, f"{canon!r} {self.pinned[canon]}")
        reasons: dict[int, list[tuple[str, bool]]] = {}
        for elem, rs in uf.reasons.items():
            reasons.setdefault(uf.find(elem), []).extend(rs)
        parts, unsplit = self._member_parts()
        members: dict[int, list[Member]] = {}
        for (name, axis), (role, _direct) in self.members.items():
            elem, inner = self.claims[(self.canon[name], axis)]
            outer = self.outer.get((self.canon[name], axis), 1)
            members.setdefault(uf.find(elem), []).append(Member(self.prefix + name, axis, role, inner=inner, outer=outer,
                                                                parts=parts.get((self.canon[name], axis), ())))
        spec = PermutationSpec(family="traced")
        names: dict[int, str] = {}
        for root in sorted(members):
            rs = reasons.get(root, [])
            hard = list(dict.fromkeys(r for r, boundary in rs if not boundary))
            base = self.prefix + uf.producer[root]
            if rs and not hard:
                spec.notes.append(f"{base}: left unpermuted, it {_OUTPUT_REASON}")
                continue
            name, k = base, 1
            while name in spec.groups:
                k += 1
                name = f"{base}#{k}"
            names[root] = name
            head_dim = uf.head_dim.get(root)
            kind = ("heads" if root in uf.whole_heads else "heads_within") if head_dim else "free"
            if kind == "free" or hard or root in unsplit or not all(m.parts for m in members[root]):
                # Q/K and V/O may take separate orders only where every member's part is known
                members[root] = [dataclasses.replace(m, parts=()) for m in members[root]]
            if kind == "heads" and not hard:
                spec.notes.append(f"{name}: whole heads only, {uf.whole_heads[root]}")
            spec.add(PermGroup(name, uf.size[root], members[root], kind=kind,
                               head_dim=head_dim, frozen_reason="; ".join(hard) if hard else None))
        tied = {c: a for c, a in self.aliases.items() if len(a) > 1}
        for canon, alias in tied.items():
            spec.notes.append(f"tied tensor: {' = '.join(self.prefix + a for a in alias)}")
        spec.validate({self.prefix + k: v for k, v in self.state_shapes.items()})
        return TraceResult(spec, self.gm, self._taps(names), {self.prefix + c: [self.prefix + x for x in a] for c, a in tied.items()})

    def _taps(self, names: dict[int, str]) -> dict[str, list[Tap]]:
        """Hookable places per group: the inputs of the layers that read it, else module outputs carrying it."""
        uf = self.uf
        read: dict[str, list[Tap]] = {}
        carried: dict[str, list[Tap]] = {}
        seen: set[tuple[str, str]] = set()
        for node in self.gm.graph.nodes:
            v = self.vals.get(node)
            if not isinstance(v, _Lab) or uf.find(v.elem) not in names:
                continue
            group = names[uf.find(v.elem)]
            for user in node.users:
                if user.op != "call_module" or not user.args or user.args[0] is not node:
                    continue
                if self.module_calls[user.target] != 1 or (group, node.name) in seen:
                    continue
                reads = user in self.reader_inputs and uf.find(self.reader_inputs[user]) == uf.find(v.elem)
                tap = Tap(group, str(user.target), "input", v.axis, v.inner, node.name)
                (read if reads else carried).setdefault(group, []).append(tap)
                seen.add((group, node.name))
            if node.op == "call_module" and self.module_calls[node.target] == 1 and (group, node.name) not in seen:
                carried.setdefault(group, []).append(Tap(group, str(node.target), "output", v.axis, v.inner, node.name))
                seen.add((group, node.name))
        taps: dict[str, list[Tap]] = {}
        for group in names.values():
            if group in read:
                taps[group] = read[group]
            elif group in carried:
                taps[group] = carried[group][-1:]
        return taps


def module_state_shapes(module: nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Shapes of a module's state dict keys (with `prefix`), for PermutationSpec.validate."""
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


