"""The merge-method registry: the ``@merge_method`` decorator, parameter checks and ``run_method``.

A merge method is one kernel, a pure function of one tensor name's inputs (``MergeInputs``) that returns
the merged tensor, decorated with ``@merge_method``: its name, papers, base handling and model count, and
its parameters as pydantic models (one field per parameter: type, default, value range, help text). The
framework resolves defaults and checks every value against those fields before the kernel runs, so
kernels assume well-formed inputs and the recipe schema, the app and the model card read one description.

Data-driven methods (RegMean, Fisher merging) declare ``needs_data`` (which statistics: ``"gram"`` for the
input Gram matrix of every ``nn.Linear``, ``"fisher"`` for the diagonal Fisher of every parameter) and, when
the statistics of a layer must be measured under the *merged* model's earlier layers, ``sequential=True``.
The recipe then gives each model its own data (``models[i].data``); the runner builds each model, runs its
data through it (:mod:`merge.calibrate`) and hands the kernel one statistics dict per model in
``MergeInputs.stats``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Annotated, Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, TypeAdapter, ValidationError

from suture.merge.errors import InputError, ParameterError

logger = logging.getLogger(__name__)

#: a finite real number (booleans, strings, NaN and infinities are refused)
Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]
#: a fraction in [0, 1] (densities, top-k fractions)
Fraction = Annotated[Number, Field(ge=0, le=1)]
#: a finite number >= 0 (tolerances, thresholds that may be zero)
NonNegative = Annotated[Number, Field(ge=0)]
#: a finite number > 0
Positive = Annotated[Number, Field(gt=0)]
#: true or false (strings such as 'yes' are refused)
Flag = StrictBool
#: statistics a data-driven method asks for: "gram" (per nn.Linear weight: {"gram": E[x x^T] of its inputs,
#: "count": rows seen}), "fisher" (per parameter: {"fisher": the diagonal Fisher, shaped like the tensor}) or
#: "coefficients" (per tensor: {"coefficient": a task-arithmetic weight learned on every model's data at once,
#: AdaMerging / aTLAS, see merge.coefficients})
StatsKind = Literal["gram", "fisher", "coefficients"]
STATS_KINDS: tuple[str, ...] = ("gram", "fisher", "coefficients")


class MethodParams(BaseModel):
    """Base of a method's parameter declarations: one field per parameter; unknown keys pass through."""

    model_config = ConfigDict(extra="allow", frozen=True)


class NoParams(MethodParams):
    """A method without parameters at this level."""


@dataclass(frozen=True)
class ParamDef:
    """One parameter as the recipe schema and the app see it: name, default, required, help, value range."""

    name: str
    default: Any
    required: bool = False
    help: str = ""
    kind: str = "number"  # "number" or "bool"
    bounds: str = ""  # e.g. "in [0, 1]", "> 0"; empty when any finite value is allowed
    minimum: float | None = None
    maximum: float | None = None


@dataclass
class MergeInputs:
    """Everything a merge method sees for one tensor name."""

    name: str
    tensors: list[torch.Tensor]
    model_params: list[dict[str, Any]]
    params: dict[str, Any]
    base: torch.Tensor | None = None
    generator: torch.Generator | None = None
    # data-driven methods: one statistics dict per entry of `tensors` (None where that model has none for
    # this tensor, e.g. a LayerNorm under "gram"); None when no statistics were collected at all
    stats: list[dict[str, Any] | None] | None = None


def _fmt(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _param_defs(model: type[MethodParams]) -> tuple[ParamDef, ...]:
    """ParamDefs for the fields of a parameter model (range and kind read from its JSON schema)."""
    props = model.model_json_schema().get("properties", {})
    defs = []
    for name, info in model.model_fields.items():
        prop = props.get(name, {})
        prop = next((p for p in prop.get("anyOf", []) if p.get("type") != "null"), prop)
        lo = prop.get("minimum", prop.get("exclusiveMinimum"))
        hi = prop.get("maximum", prop.get("exclusiveMaximum"))
        lo_sign = ">=" if "minimum" in prop else ">"
        hi_sign = "<=" if "maximum" in prop else "<"
        if lo is not None and hi is not None:
            bounds = f"in {'[' if lo_sign == '>=' else '('}{_fmt(lo)}, {_fmt(hi)}{']' if hi_sign == '<=' else ')'}"
        elif lo is not None:
            bounds = f"{lo_sign} {_fmt(lo)}"
        elif hi is not None:
            bounds = f"{hi_sign} {_fmt(hi)}"
        else:
            bounds = ""
        required = info.is_required()
        defs.append(ParamDef(
            name=name,
            default=None if required else info.default,
            required=required,
            help=info.description or "",
            kind="bool" if prop.get("type") == "boolean" else "number",
            bounds=bounds,
            minimum=lo,
            maximum=hi,
        ))
    return tuple(defs)


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: its kernel, description and parameter models.

    ``uses_base``: the base model's tensor arrives separately in ``MergeInputs.base`` and is not part of
    ``tensors``. ``min_models`` / ``max_models`` bound ``len(tensors)`` (``None``: no upper bound).
    ``needs_data``: the statistics kind the kernel reads from ``MergeInputs.stats`` (None: data-free);
    ``sequential``: those statistics are measured under the merged model's earlier layers.
    """

    name: str
    fn: Callable[[MergeInputs], torch.Tensor]
    params_model: type[MethodParams]
    model_params_model: type[MethodParams]
    uses_base: bool
    requires_base: bool
    randomized: bool
    papers: tuple[str, ...]
    summary: str
    min_models: int = 1
    max_models: int | None = None
    needs_data: str | None = None
    sequential: bool = False
    _adapters: dict[str, TypeAdapter] = field(default_factory=dict, compare=False, repr=False)

    @property
    def paper(self) -> str:
        """The papers behind the method as one citation line."""
        return "; ".join(self.papers)

    @cached_property
    def global_params(self) -> tuple[ParamDef, ...]:
        """Method-wide parameters (slice and top-level `parameters`)."""
        return _param_defs(self.params_model)

    @cached_property
    def model_params(self) -> tuple[ParamDef, ...]:
        """Per-model parameters (`models[i].parameters`, slice sources)."""
        return _param_defs(self.model_params_model)

    def global_param(self, name: str) -> ParamDef | None:
        """The global parameter definition called ``name``, or None."""
        return next((p for p in self.global_params if p.name == name), None)

    def model_param(self, name: str) -> ParamDef | None:
        """The per-model parameter definition called ``name``, or None."""
        return next((p for p in self.model_params if p.name == name), None)

    def param(self, name: str) -> ParamDef | None:
        """The parameter called ``name`` at either level, or None."""
        return self.global_param(name) or self.model_param(name)

    def value_problem(self, name: str, value: Any) -> str | None:
        """Why ``value`` does not fit parameter ``name`` (type, finiteness, range), or None when it fits.

        Checks one value on its own, as a recipe's scalars and gradient items are checked before a run;
        cross-parameter rules of a parameter model run in :func:`run_method`.
        """
        pdef = self.param(name)
        if pdef is None or value is None:
            return None
        model = self.params_model if name in self.params_model.model_fields else self.model_params_model
        adapter = self._adapters.get(name)
        if adapter is None:
            info = model.model_fields[name]
            typ = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
            adapter = self._adapters.setdefault(name, TypeAdapter(typ))
        try:
            adapter.validate_python(value)
        except ValidationError as exc:
            return _problem(pdef, exc.errors(include_url=False)[0], value)
        return None

    def fits(self, n: int) -> bool:
        """Whether the method takes ``n`` models (besides the base, when it uses one)."""
        return n >= self.min_models and (self.max_models is None or n <= self.max_models)

    def count_words(self, noun: str = "model") -> str:
        """How many inputs the method takes, in words ('exactly one model', 'at least two models')."""
        lo, hi = self.min_models, self.max_models
        plural = noun if (hi if hi is not None else lo) == 1 else noun + "s"
        words = {1: "one", 2: "two"}
        if hi == lo:
            return f"exactly {words.get(lo, lo)} {plural}"
        return f"at least {words.get(lo, lo)} {plural}" if hi is None else f"{lo} to {hi} {plural}"


def _problem(pdef: ParamDef, err: Any, value: Any) -> str:
    """One pydantic error as the tail of a message ('must be in [0, 1], got 1.5')."""
    kind = err["type"]
    if kind.startswith("bool"):
        return f"must be true or false, got {value!r}"
    if kind == "finite_number":
        return f"must be finite, got {value!r}"
    if kind.startswith("int_"):
        return f"must be a whole number, got {value!r}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"must be {pdef.bounds}, got {value!r}"
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            float(value)
        except OverflowError:
            return f"must be a finite number, got an integer of {len(str(value))} digits"
    if kind in ("value_error", "assertion_error"):
        return str((err.get("ctx") or {}).get("error", err["msg"]))
    return f"must be a number, got {value!r}"


_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add a method to the registry under its name (a second method with the same name is an error)."""
    if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
        raise ValueError(f"merge method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def merge_method(
    *,
    name: str,
    papers: tuple[str, ...] | str,
    summary: str,
    requires_base: bool,
    uses_base: bool | None = None,
    models: tuple[int, int | None] = (1, None),
    params: type[MethodParams] = NoParams,
    model_params: type[MethodParams] = NoParams,
    randomized: bool = False,
    needs_data: StatsKind | None = None,
    sequential: bool = False,
) -> Callable[[Callable[[MergeInputs], torch.Tensor]], Callable[[MergeInputs], torch.Tensor]]:
    """Register the decorated kernel as merge method ``name``; the kernel itself is returned unchanged.

    ``params`` / ``model_params``: pydantic models of the method-wide and per-model parameters (field type,
    default, range via ``Field(ge=..., le=...)``, help via ``description``); values are checked against
    them before the kernel runs. ``uses_base`` (default: ``requires_base``): the base tensor arrives in
    ``MergeInputs.base`` rather than among ``tensors``. ``models``: (min, max) count of ``tensors``, max
    None for no limit. ``randomized``: the kernel draws from ``MergeInputs.generator``. ``needs_data``:
    ``"gram"`` or ``"fisher"``, the per-model statistics the kernel reads from ``MergeInputs.stats`` (every
    model of a recipe then needs ``data:``); ``sequential``: measure them under the merged earlier layers.
    """
    lo, hi = models
    if lo < 1 or (hi is not None and hi < lo):
        raise ValueError(f"merge method {name!r}: models=(min, max) needs 1 <= min <= max, got {models}")
    if needs_data is not None and needs_data not in STATS_KINDS:
        raise ValueError(f"merge method {name!r}: needs_data must be one of {STATS_KINDS}, got {needs_data!r}")
    if sequential and needs_data is None:
        raise ValueError(f"merge method {name!r}: sequential=True needs needs_data")

    def decorate(fn: Callable[[MergeInputs], torch.Tensor]) -> Callable[[MergeInputs], torch.Tensor]:
        method = MergeMethod(
            name=name,
            fn=fn,
            params_model=params,
            model_params_model=model_params,
            uses_base=requires_base if uses_base is None else uses_base,
            requires_base=requires_base,
            randomized=randomized,
            papers=(papers,) if isinstance(papers, str) else tuple(papers),
            summary=summary,
            min_models=lo,
            max_models=hi,
            needs_data=needs_data,
            sequential=sequential,
        )
        register(method)
        fn.merge_method = method  # type: ignore[attr-defined]
        return fn

    return decorate


def get_method(name: str) -> MergeMethod:
    """Look up a merge method by name; unknown names raise ParameterError listing the known ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ParameterError(
            f"unknown merge method {name!r}; known methods: {', '.join(list_methods())}"
        ) from None


def list_methods() -> list[str]:
    """Names of all registered merge methods, sorted."""
    return sorted(_REGISTRY)


def _resolve(m: MergeMethod, where: str, model: type[MethodParams], given: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults into ``given`` and check every value against the parameter model."""
    values = {}
    for key, value in given.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if value is not None:  # null counts as unset: the default applies, a required parameter is missing
            values[key] = value
    try:
        checked = model.model_validate(values)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        key = str(err["loc"][0]) if err["loc"] else ""
        pdef = (m.global_param if model is m.params_model else m.model_param)(key)
        if err["type"] == "missing" and pdef is not None:
            raise ParameterError(
                f"{where}: merge method {m.name!r} requires parameter {key!r}" + (f" ({pdef.help})" if pdef.help else "")
            ) from None
        if pdef is None:  # a rule across parameters (a model validator)
            raise ParameterError(f"{where}: merge method {m.name!r}: {_problem(ParamDef('', None), err, None)}") from None
        problem = _problem(pdef, err, values.get(key))
        raise ParameterError(f"{where}: parameter {key!r} of merge method {m.name!r} {problem}") from None
    out = dict(given)
    out.update({k: getattr(checked, k) for k in model.model_fields})
    return out


def _check_shapes(inputs: MergeInputs) -> None:
    """All tensors (and the base) must share one shape; the runner rectifies vocabulary rows beforehand."""
    ref_label, ref = ("base", inputs.base) if inputs.base is not None else ("model 0", inputs.tensors[0])
    for i, t in enumerate(inputs.tensors):
        if t.shape != ref.shape:
            raise InputError(
                f"tensor {inputs.name!r}: model {i} has shape {tuple(t.shape)} but {ref_label} has "
                f"{tuple(ref.shape)}; all inputs of a merge must have the same shape"
            )


def _check_devices(inputs: MergeInputs) -> None:
    """All tensors must live on one device: methods never move data between devices behind the caller's back."""
    devices = {t.device for t in inputs.tensors}
    if inputs.base is not None:
        devices.add(inputs.base.device)
    if len(devices) > 1:
        raise InputError(f"tensor {inputs.name!r}: inputs are on several devices {sorted(map(str, devices))}")


def output_dtype(inputs: MergeInputs) -> torch.dtype:
    """The dtype a merge returns: the base's when there is one, else the first model's."""
    return inputs.base.dtype if inputs.base is not None else inputs.tensors[0].dtype


def run_method(method: MergeMethod | str, inputs: MergeInputs) -> torch.Tensor:
    """Resolve parameters, check base / counts / shapes, and run a merge method on one tensor's inputs."""
    m = get_method(method) if isinstance(method, str) else method
    where = f"tensor {inputs.name!r}"
    if inputs.base is not None and not m.uses_base:
        raise InputError(
            f"{where}: merge method {m.name!r} takes every model (the base included) in `tensors`, "
            "not as a separate base"
        )
    if m.requires_base and inputs.base is None:
        raise InputError(f"{where}: merge method {m.name!r} requires a base model")
    if len(inputs.model_params) != len(inputs.tensors):
        raise InputError(
            f"{where}: {len(inputs.tensors)} tensors but {len(inputs.model_params)} per-model parameter sets"
        )
    if m.needs_data is not None:
        if inputs.stats is None:
            raise InputError(
                f"{where}: merge method {m.name!r} learns from data ({m.needs_data} statistics): give every model "
                "`data:` in the recipe, or pass MergeInputs.stats"
            )
        if len(inputs.stats) != len(inputs.tensors):
            raise InputError(f"{where}: {len(inputs.tensors)} tensors but {len(inputs.stats)} statistics entries")
    if not inputs.tensors:
        if inputs.base is not None:
            # no other model has this tensor: every base-relative method then returns the base unchanged
            return inputs.base.clone()
        raise InputError(f"{where}: merge method {m.name!r} got no tensors to merge")
    n = len(inputs.tensors)
    if n < m.min_models or (m.max_models is not None and n > m.max_models):
        # one tensor without a base means only one model holds this tensor: pass it through as mergekit does
        if n == 1 and inputs.base is None:
            logger.debug("%s: only one input for %s, passing it through", where, m.name)
            return inputs.tensors[0].clone()
        extra = " besides the base" if m.uses_base else ""
        raise InputError(f"{where}: merge method {m.name!r} needs {m.count_words()}{extra}, got {n}")
    _check_shapes(inputs)
    _check_devices(inputs)
    for t in inputs.tensors + ([inputs.base] if inputs.base is not None else []):
        if t.is_complex() or t.dtype == torch.bool:
            raise InputError(f"{where}: cannot merge tensors of dtype {t.dtype}")

    params = _resolve(m, f"{where}, global parameters", m.params_model, inputs.params)
    model_params = [
        _resolve(m, f"{where}, model {i}", m.model_params_model, mp) for i, mp in enumerate(inputs.model_params)
    ]
    resolved = replace(inputs, params=params, model_params=model_params)
    out = m.fn(resolved)
    if out.shape != resolved.tensors[0].shape:
        raise RuntimeError(f"{where}: merge method {m.name!r} returned shape {tuple(out.shape)}")
    dtype = output_dtype(resolved)
    if not dtype.is_floating_point:
        out = torch.round(out)
    return out.to(dtype)
