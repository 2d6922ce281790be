"""Recipe parameter values and their resolution per tensor, with mergekit's semantics.

A parameter value is one of

* a scalar (number, boolean or string): used as is;
* a *gradient*, a list of scalars: read at the tensor's position ``t`` in [0, 1]. With N values the list
  spans N - 1 equal segments whatever the number of layers; numbers are interpolated linearly between the
  two neighbouring values, other scalars are picked without interpolation (``values[int(t * (N - 1))]``);
* a list of conditions ``{filter: str, value: scalar | gradient}``: the first condition whose ``filter`` is
  a substring of the tensor name (or has no filter, or filter ``"*"``) gives the value. Order matters, as
  in mergekit: a filterless condition matches everything, so it belongs last as the fallback. When no
  condition matches, the value counts as unset and lookup falls through to the next level.

Positions: a layer tensor at index i of a gradient span of n layers sits at ``t = i / (n - 1)`` (``t = 1``
when n == 1). For ``models:`` recipes the span is the whole model; for ``slices:`` recipes each output
slice is its own span. Every tensor outside the blocks (embeddings before them, final norm and heads
after them) sits at t = 0, as in mergekit 0.1.5's ``plan_module``; pre-block tensors take their sources and
slice-level parameters from the first slice, post-block tensors from the last.

Lookup precedence (first level whose value is set wins): slice source > slice > model (``models[i]``) >
global ``parameters``. A method's global parameters skip the per-model/per-source level.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from suture.merge.errors import RecipeError
from suture.merge.layers import SliceLayout, find_layer, tensor_section

if TYPE_CHECKING:  # pragma: no cover
    from suture.recipes.schema import ModelRef, Recipe

logger = logging.getLogger(__name__)

KeyPath = tuple[Any, ...]
_CONDITION_KEYS = ("filter", "value")


def is_scalar(value: Any) -> bool:
    """True for the scalar parameter values: numbers, booleans and strings."""
    return isinstance(value, (bool, int, float, str))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def describe_kind(value: Any) -> str:
    """A value's YAML kind in words ('a number', 'a list', ...) for error messages."""
    if isinstance(value, bool):
        return "a boolean"
    if _is_number(value):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    return f"a {type(value).__name__}"


_WHAT = "a number, a boolean, a string, a gradient list [a, b, ...] or a list of {filter, value} conditions"


def _check_gradient(values: list[Any]) -> list[tuple[KeyPath, str]]:
    """A gradient holds only numbers, or only strings/booleans of one kind (nothing to interpolate)."""
    first = values[0]
    for i, v in enumerate(values):
        if not is_scalar(v):
            return [((i,), f"a gradient list holds plain values, but item {i} is {describe_kind(v)}")]
        if _is_number(first) != _is_number(v) or (not _is_number(first) and type(v) is not type(first)):
            return [((i,), f"a gradient list must not mix kinds: item 0 is {describe_kind(first)}, item {i} is {describe_kind(v)}")]
    return []


def _check_condition(cond: Mapping[Any, Any]) -> list[tuple[KeyPath, str]]:
    problems: list[tuple[KeyPath, str]] = []
    for key in cond:
        if key == "pattern":
            problems.append(((key,), "unknown key 'pattern' in a condition; the tensor-name substring key is 'filter'"))
        elif key not in _CONDITION_KEYS:
            problems.append(((key,), f"unknown key {key!r} in a condition (allowed: filter, value)"))
    if "value" not in cond:
        problems.append(((), "a condition needs a 'value' (and usually a 'filter', a substring of tensor names)"))
    flt = cond.get("filter")
    if flt is not None and not isinstance(flt, str):
        problems.append((("filter",), f"a filter is a substring of tensor names (a string), got {describe_kind(flt)}"))
    if "value" in cond:
        value = cond["value"]
        if isinstance(value, Mapping) or (isinstance(value, list) and any(isinstance(v, Mapping) for v in value)):
            problems.append((("value",), "a condition's value is a scalar or a gradient list, not further conditions"))
        elif isinstance(value, list):
            if not value:
                problems.append((("value",), "an empty list is not a value; give a scalar or a gradient [a, b, ...]"))
            else:
                problems += [(("value",) + p, m) for p, m in _check_gradient(value)]
        elif not is_scalar(value):
            problems.append((("value",), f"expected a scalar or a gradient list, got {describe_kind(value)}"))
    return problems


def check_setting(value: Any) -> list[tuple[KeyPath, str]]:
    """Structural problems of one parameter value as (sub-path, message) pairs; empty when well formed."""
    if is_scalar(value):
        return []
    if isinstance(value, Mapping):
        return _check_condition(value)  # a lone condition counts as a one-item condition list
    if isinstance(value, list):
        if not value:
            return [((), f"an empty list is not a value; expected {_WHAT}")]
        if all(isinstance(v, Mapping) for v in value):
            problems: list[tuple[KeyPath, str]] = []
            for i, cond in enumerate(value):
                problems += [((i,) + p, m) for p, m in _check_condition(cond)]
            return problems
        if any(isinstance(v, Mapping) for v in value):
            bad = next(i for i, v in enumerate(value) if not isinstance(v, Mapping))
            return [((bad,), f"a condition list holds only {{filter, value}} mappings, but item {bad} is {describe_kind(value[bad])}")]
        return _check_gradient(value)
    return [((), f"expected {_WHAT}; got {describe_kind(value)}")]


def unreachable_conditions(value: Any) -> list[int]:
    """Indices of conditions that can never match because an earlier one has no filter (or filter '*')."""
    if not isinstance(value, list) or not value or not all(isinstance(v, Mapping) for v in value):
        return []
    for i, cond in enumerate(value):
        if cond.get("filter") in (None, "*"):
            return list(range(i + 1, len(value)))
    return []


def layer_position(layer_index: int, num_layers: int | None) -> float:
    """Gradient position of layer ``layer_index`` in a span of ``num_layers``: i / (n - 1), or 1 when n == 1."""
    if num_layers is None:
        raise ValueError(f"layer {layer_index}: num_layers is needed to place a layer on a gradient")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if not 0 <= layer_index < num_layers:
        raise ValueError(f"layer index {layer_index} is outside 0..{num_layers - 1}")
    return layer_index / (num_layers - 1) if num_layers > 1 else 1.0


def edge_position(tensor_name: str) -> float:
    """Gradient position of a tensor outside the blocks: always 0, before (embeddings) or after (heads) them.

    mergekit 0.1.5 reads pre- and post-block weights through one ``ConfigReader(t=0)``, so a gradient
    ``[0.2, 0.9]`` gives ``lm_head`` 0.2, not 0.9.
    """
    return 0.0


def evaluate_setting(value: Any, tensor_name: str | None, t: float) -> Any:
    """Value of a parameter setting for one tensor at gradient position ``t``; None when no condition matches."""
    if is_scalar(value):
        return value
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list):
        raise TypeError(f"unexpected parameter setting {value!r}")
    if not value:
        return None
    if all(_is_number(v) for v in value):
        # same arithmetic as mergekit so that results agree to the last bit
        scaled = t * (len(value) - 1)
        i0 = int(scaled)
        i1 = min(len(value) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * value[i0] + frac * value[i1]
    if all(is_scalar(v) for v in value):
        return value[int(t * (len(value) - 1))]
    for cond in value:
        flt = cond.get("filter")
        if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
            return evaluate_setting(cond["value"], tensor_name, t)
    return None


def resolve_param(
    value: Any,
    tensor_name: str,
    layer_index: int | None = None,
    num_layers: int | None = None,
    *,
    t: float | None = None,
) -> Any:
    """Evaluate one parameter setting for a tensor.

    ``layer_index``/``num_layers`` place a block tensor on the gradient (``layer_index`` None: taken from a
    ``layers.N``-style name; a tensor outside the blocks sits at 0 or 1); ``t`` overrides the position.
    Returns None when a condition list has no match.
    """
    if t is None:
        if layer_index is None:
            m = find_layer(tensor_name, generic=False)
            layer_index = m.index if m is not None else None
        t = layer_position(layer_index, num_layers) if layer_index is not None else edge_position(tensor_name)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"gradient position t must lie in [0, 1], got {t}")
    return evaluate_setting(value, tensor_name, t)


def _path_str(path: KeyPath) -> str:
    from suture.recipes.yaml_lines import format_path

    return format_path(path)


class ParamResolver:
    """Answers "what is parameter X for this tensor (and this model)?" for a validated recipe.

    Layer numbers given to the methods are *output* layer numbers. In a ``models:`` recipe they equal the
    models' own layer numbers and ``num_layers`` (here or per call) is the models' layer count. In a
    ``slices:`` recipe the slice and the position inside it follow from the layer ranges, and a layer tensor
    needs an explicit ``layer_index`` (its source name carries the source layer number, not the output one).
    """

    def __init__(self, recipe: Recipe, *, num_layers: int | None = None) -> None:
        self.recipe = recipe
        self.num_layers = num_layers
        self.layout: SliceLayout | None = None
        if recipe.slices:
            self.layout = SliceLayout([s.sources[0].layer_range for s in recipe.slices])

    # -- where a tensor sits -------------------------------------------------------------------------

    def sources(self, slice_index: int | None = None) -> list[ModelRef]:
        """Models feeding one output slice (``models:``: every model, plus base_model when not listed)."""
        r = self.recipe
        if r.slices:
            return [src.model for src in r.slices[slice_index if slice_index is not None else 0].sources]
        refs = [m.model for m in r.models or []]
        if r.base_model is not None and r.base_model not in refs:
            refs.append(r.base_model)
        return refs

    def base_model(self, slice_index: int | None = None) -> ModelRef | None:
        """The base model for a slice (its own base_model, else the recipe's)."""
        r = self.recipe
        if r.slices and slice_index is not None and r.slices[slice_index].base_model is not None:
            return r.slices[slice_index].base_model
        return r.base_model

    def locate(
        self,
        tensor_name: str,
        layer_index: int | None = None,
        num_layers: int | None = None,
        *,
        slice_index: int | None = None,
    ) -> tuple[int | None, float]:
        """The output slice (None for ``models:`` recipes) and the gradient position t of a tensor."""
        if self.layout is None:
            if layer_index is None:
                m = find_layer(tensor_name, generic=False)
                layer_index = m.index if m is not None else None
            if layer_index is None:
                return None, edge_position(tensor_name)
            return None, layer_position(layer_index, num_layers if num_layers is not None else self.num_layers)
        if layer_index is None:
            if find_layer(tensor_name, generic=False) is not None and slice_index is None:
                raise ValueError(
                    f"tensor {tensor_name!r} is a layer tensor of a slices recipe: pass layer_index "
                    "(its output layer number) so the slice and gradient position are known"
                )
            pre = tensor_section(tensor_name) == "pre"
            s = slice_index if slice_index is not None else (0 if pre else len(self.layout.ranges) - 1)
            return s, edge_position(tensor_name)
        slot = self.layout.slot(layer_index)
        if slice_index is not None and slice_index != slot.slice_index:
            raise ValueError(f"output layer {layer_index} belongs to slice {slot.slice_index}, not slice {slice_index}")
        return slot.slice_index, layer_position(slot.offset, slot.slice_length)

    # -- lookup ----------------------------------------------------------------------------------------

    def _model(self, model: ModelRef | str | None) -> ModelRef | None:
        if model is None or not isinstance(model, str):
            return model
        from suture.recipes.schema import ModelRef

        return ModelRef.parse(model)

    def _levels(
        self, name: str, model: ModelRef | None, slice_index: int | None, source_index: int | None, per_model: bool
    ) -> Iterator[tuple[KeyPath, Any]]:
        """(key path, setting) of every level that sets ``name``, highest precedence first."""
        r = self.recipe
        if r.slices:
            sl = r.slices[slice_index if slice_index is not None else 0]
            s = slice_index if slice_index is not None else 0
            if per_model:
                for j, src in enumerate(sl.sources):
                    if source_index is not None and j != source_index:
                        continue
                    if model is not None and src.model != model:
                        continue
                    if src.parameters and name in src.parameters:
                        yield ("slices", s, "sources", j, "parameters", name), src.parameters[name]
            if sl.parameters and name in sl.parameters:
                yield ("slices", s, "parameters", name), sl.parameters[name]
        elif per_model:
            for i, entry in enumerate(r.models or []):
                if source_index is not None and i != source_index:
                    continue
                if model is not None and entry.model != model:
                    continue
                if entry.parameters and name in entry.parameters:
                    yield ("models", i, "parameters", name), entry.parameters[name]
        if r.parameters and name in r.parameters:
            yield ("parameters", name), r.parameters[name]

    def _check_source(self, model: ModelRef | None, slice_index: int | None, source_index: int | None) -> None:
        if source_index is None:
            return
        refs = self.sources(slice_index)
        if not 0 <= source_index < len(refs):
            raise IndexError(f"source_index {source_index} is outside 0..{len(refs) - 1}")
        if model is not None and refs[source_index] != model:
            raise ValueError(f"source {source_index} is {refs[source_index]}, not {model}")

    def lookup(
        self,
        name: str,
        tensor_name: str,
        layer_index: int | None = None,
        num_layers: int | None = None,
        *,
        model: ModelRef | str | None = None,
        slice_index: int | None = None,
        source_index: int | None = None,
        t: float | None = None,
    ) -> tuple[Any, str | None]:
        """(value, key path it came from) of parameter ``name``; (None, None) when no level sets it.

        With ``model`` or ``source_index`` the per-model level is searched too (a tensor parameter such as
        ``weight``); without, only slice and global levels (a method-wide parameter such as ``normalize``).
        """
        ref = self._model(model)
        s, pos = self.locate(tensor_name, layer_index, num_layers, slice_index=slice_index)
        if t is not None:
            pos = t
        self._check_source(ref, s, source_index)
        per_model = ref is not None or source_index is not None
        for path, setting in self._levels(name, ref, s, source_index, per_model):
            value = evaluate_setting(setting, tensor_name, pos)
            if value is not None:
                return value, _path_str(path)
        return None, None

    def get(
        self,
        name: str,
        tensor_name: str,
        layer_index: int | None = None,
        num_layers: int | None = None,
        *,
        model: ModelRef | str | None = None,
        slice_index: int | None = None,
        source_index: int | None = None,
        t: float | None = None,
        default: Any = None,
        required: bool = False,
    ) -> Any:
        """Value of parameter ``name`` for a tensor (see :meth:`lookup`); ``default`` or RecipeError when unset."""
        value, _ = self.lookup(
            name, tensor_name, layer_index, num_layers, model=model, slice_index=slice_index,
            source_index=source_index, t=t,
        )
        if value is not None:
            return value
        if required:
            raise self._missing(name, tensor_name, self._model(model), layer_index, slice_index, source_index)
        return default

    def _missing(
        self, name: str, tensor_name: str, model: ModelRef | None, layer_index: int | None,
        slice_index: int | None, source_index: int | None,
    ) -> RecipeError:
        r = self.recipe
        places: list[str] = []
        if model is not None or source_index is not None:
            if r.slices:
                s, _ = self.locate(tensor_name, layer_index, slice_index=slice_index)
                for j, src in enumerate(r.slices[s or 0].sources):
                    if (source_index is None or j == source_index) and (model is None or src.model == model):
                        places.append(r.where(("slices", s or 0, "sources", j, "parameters")))
            else:
                for i, entry in enumerate(r.models or []):
                    if (source_index is None or i == source_index) and (model is None or entry.model == model):
                        places.append(r.where(("models", i, "parameters")))
        places.append("the top-level parameters")
        who = f" for model {model}" if model is not None else ""
        return RecipeError(
            f"{r.source}: merge method {r.merge_method!r} needs parameter {name!r}{who} (tensor {tensor_name!r}) "
            f"but no level sets it (or no filter matches); set it in {' or '.join(places)}"
        )


__all__ = [
    "ParamResolver",
    "check_setting",
    "edge_position",
    "evaluate_setting",
    "is_scalar",
    "layer_position",
    "resolve_param",
    "unreachable_conditions",
]
