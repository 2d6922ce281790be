"""Plain MLP / CNN chains: layers applied one after another, each reading the previous layer's output.

A layer is a module with a weight of two or more dimensions (Linear (out, in), ConvNd (out, in, *k)); a
norm is a module with a one-dimensional weight or running statistics (BatchNorm, LayerNorm). Between two
consecutive layers sits one group: the first layer's rows and bias, the norms on its output, and the next
layer's columns. When a Linear follows a conv and reads its flattened (channels, inner) map, the Linear's
member carries ``inner``. The input of the first layer and the output of the last are the model's, so no
group touches them.

Names alone cannot show skip connections, so names that suggest them (shortcut, downsample, ...) are
refused; such models need the traced spec. Layer order is the first of these whose widths chain: the
order the names are given in (a state dict's), natural sorting (``0 < 2 < 10``, ``fc1 < fc2``), natural
sorting with head modules (``classifier``, ``head``, ...) last; names given in plain alphabetical order (a
file header's) try natural sorting first. A norm named like a layer with the same number and width (``bn1``
next to ``conv1``) sits on that layer's output, any other on the output of the layer before it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from suture.merge.errors import InputError
from suture.merge.graph.families_common import Family, SpecBuilder, natural_key

PARAMS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_SKIP_HINTS = re.compile(r"(?:^|[._])(?:shortcut|downsample|skip|residual|res_conv|identity)(?:$|[._\d])")
_HEAD_NAMES = frozenset({"classifier", "head", "heads", "fc", "output", "out", "logits", "decoder"})
_NUMBERED = re.compile(r"^(?P<stem>[A-Za-z_]*?)(?P<num>\d+)$")


def chain_modules(names: list[str]) -> dict[str, dict[str, str]] | None:
    """module path -> {param: tensor name} when every name is `<module>.<param>` with a known param."""
    modules: dict[str, dict[str, str]] = {}
    for name in names:
        module, _, param = name.rpartition(".")
        if not module or param not in PARAMS:
            return None
        modules.setdefault(module, {})[param] = name
    return modules


def looks_like_chain(names: list[str], shapes: Mapping[str, tuple[int, ...]] | None = None) -> bool:
    """True when the names read as a plain chain: only layer/norm parameters, two layers or more, no skip hints."""
    modules = chain_modules(names)
    if not modules or any(_SKIP_HINTS.search(m) for m in modules):
        return False
    if shapes is None:
        return sum("weight" in p for p in modules.values()) >= 2
    return sum(len(shapes[p["weight"]]) >= 2 for p in modules.values() if "weight" in p) >= 2


def build_chain(b: SpecBuilder, config: Mapping[str, Any] | None) -> None:
    """Fill `b` with one group between every two consecutive layers."""
    names = list(b.shapes)
    modules = chain_modules(names)
    if modules is None:
        bad = next(n for n in names if n.rpartition(".")[2] not in PARAMS or "." not in n)
        raise InputError(
            f"tensor names do not fit family {b.family!r}: {bad!r} is not '<module>.<{'|'.join(PARAMS)}>'"
        )
    hinted = [m for m in modules if _SKIP_HINTS.search(m)]
    if hinted:
        raise InputError(
            f"tensor names do not fit family {b.family!r}: module {hinted[0]!r} suggests a skip connection, "
            "which names alone cannot place; derive the spec by tracing the model instead"
        )
    layers = [m for m, p in modules.items() if "weight" in p and len(b.shapes[p["weight"]]) >= 2]
    norms = [m for m in modules if m not in layers]
    if len(layers) < 2:
        raise InputError(
            f"tensor names do not fit family {b.family!r}: fewer than two layers with 2-D or larger weights"
        )
    for m in norms:
        for tensor in modules[m].values():
            if len(b.shapes[tensor]) > 1:
                raise InputError(
                    f"family {b.family!r}: tensor {tensor!r} has shape {list(b.shapes[tensor])}; "
                    "expected a layer weight or a 1-D norm tensor"
                )
    given = list(modules)
    natural = sorted(modules, key=natural_key)
    # `features.*` before `classifier.*` (VGG-style stacks), which name order alone gets backwards
    heads_last = sorted(modules, key=lambda m: (m.split(".")[0] in _HEAD_NAMES, natural_key(m)))
    # names in plain alphabetical order come from a file header, not a state dict: `10` sorts before `2` there
    candidates = (natural, heads_last, given) if given == sorted(given) else (given, natural, heads_last)
    order, inners = None, None
    problems = []
    for candidate in candidates:
        ordered_layers = [m for m in candidate if m in layers]
        result = _chain_inners(b, modules, ordered_layers)
        if isinstance(result, str):
            problems.append(result)
            continue
        order, inners = candidate, result
        break
    if order is None or inners is None:
        raise InputError(f"tensor names do not fit family {b.family!r}: {problems[-1]}")
    ordered_layers = [m for m in order if m in layers]
    hosts = {n: _norm_host(b, modules, n, order, ordered_layers) for n in norms}
    for k, layer in enumerate(ordered_layers[:-1]):
        group = layer
        params = modules[layer]
        b.add(group, params["weight"], 0, "out")
        if "bias" in params:
            b.add(group, params["bias"], 0, "out")
        for norm, host in hosts.items():
            if host == layer:
                for p in ("weight", "bias", "running_mean", "running_var"):
                    if p in modules[norm]:
                        b.add(group, modules[norm][p], 0, "out")
        nxt = ordered_layers[k + 1]
        b.add(group, modules[nxt]["weight"], 1, "in", inner=inners[k + 1])
    last = ordered_layers[-1]
    for norm, host in hosts.items():
        if host in (None, last):
            # norms on the model's input or output stay in the model's own order
            b.known(*modules[norm].values())
        else:
            b.known(modules[norm].get("num_batches_tracked", ""))
    b.known(modules[last].get("bias", ""))


def _chain_inners(b: SpecBuilder, modules: dict[str, dict[str, str]], layers: list[str]) -> list[int] | str:
    """Per-layer `inner` of its input axis (1 = reads units directly), or a message saying where the chain breaks."""
    inners = [1]
    for prev, cur in zip(layers, layers[1:]):
        p_shape, c_shape = b.shapes[modules[prev]["weight"]], b.shapes[modules[cur]["weight"]]
        out_units, in_units = p_shape[0], c_shape[1]
        if in_units == out_units:
            inners.append(1)
        elif len(p_shape) >= 3 and len(c_shape) == 2 and in_units % out_units == 0:
            inners.append(in_units // out_units)  # Linear over a flattened (channels, H*W...) map
        else:
            return (
                f"{modules[cur]['weight']!r} reads {in_units} inputs but the layer before it "
                f"({modules[prev]['weight']!r}) produces {out_units}"
            )
    return inners


def _norm_host(
    b: SpecBuilder, modules: dict[str, dict[str, str]], norm: str, order: list[str], layers: list[str]
) -> str | None:
    """The layer whose output a norm module normalises (None for a norm before the first layer)."""
    widths = [b.shapes[t][0] for t in modules[norm].values() if len(b.shapes[t]) == 1]
    size = widths[0] if widths else None
    sizes = {layer: b.shapes[modules[layer]["weight"]][0] for layer in layers}
    parent, _, last = norm.rpartition(".")
    m = _NUMBERED.match(last)
    if m:
        # `bn1` normalises `conv1`: same parent module, same number, a different stem and a matching width
        paired = [
            layer
            for layer in layers
            if layer.rpartition(".")[0] == parent
            and (lm := _NUMBERED.match(layer.rpartition(".")[2]))
            and lm.group("num") == m.group("num")
            and lm.group("stem") != m.group("stem")
            and sizes[layer] == size
        ]
        if len(paired) == 1:
            return paired[0]
    host = None
    for module in order:
        if module == norm:
            break
        if module in layers:
            host = module
    if host is not None and sizes[host] != size:
        raise InputError(
            f"family {b.family!r}: cannot tell which layer norm {norm!r} (width {size}) follows; "
            f"the layer before it in name order, {host!r}, has {sizes[host]} outputs"
        )
    return host


FAMILY = Family(("chain",), build_chain, lambda names: "chain" if looks_like_chain(names) else None,
                aliases=("mlp", "cnn"), fallback=True)
