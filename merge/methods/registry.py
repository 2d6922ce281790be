"""The merge-method registry: method descriptions, parameter resolution and input checks.

Every merge method is a pure function of one tensor name's inputs (``MergeInputs``) that returns the
merged tensor. This module holds the shared description types, the name -> method registry and
``run_method``, which fills parameter defaults and validates inputs before calling a method, so the
methods themselves can assume well-formed inputs.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from suture.merge.errors import InputError, RecipeError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParamDef:
    """One parameter of a merge method: its name, default, whether it must be given, and help text."""

    name: str
    default: Any
    required: bool = False
    help: str = ""


@dataclass
class MergeInputs:
    """Everything a merge method sees for one tensor name."""

    name: str
    tensors: list[torch.Tensor]
    model_params: list[dict[str, Any]]
    params: dict[str, Any]
    base: torch.Tensor | None = None
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method and its parameter schema.

    ``uses_base``: the base model's tensor arrives separately in ``MergeInputs.base`` and is not part of
    ``tensors``. ``min_models`` / ``max_models`` bound ``len(tensors)`` (``None``: no upper bound).
    """

    name: str
    fn: Callable[[MergeInputs], torch.Tensor]
    global_params: tuple[ParamDef, ...]
    model_params: tuple[ParamDef, ...]
    uses_base: bool
    requires_base: bool
    randomized: bool
    paper: str
    summary: str
    min_models: int = 1
    max_models: int | None = None

    def global_param(self, name: str) -> ParamDef | None:
        """The global parameter definition called ``name``, or None."""
        return next((p for p in self.global_params if p.name == name), None)

    def model_param(self, name: str) -> ParamDef | None:
        """The per-model parameter definition called ``name``, or None."""
        return next((p for p in self.model_params if p.name == name), None)


_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add a method to the registry under its name (a second method with the same name is an error)."""
    if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
        raise ValueError(f"merge method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    """Look up a merge method by name; unknown names raise RecipeError listing the known ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise RecipeError(
            f"merge_method: unknown merge method {name!r}; known methods: {', '.join(list_methods())}"
        ) from None


def list_methods() -> list[str]:
    """Names of all registered merge methods, sorted."""
    return sorted(_REGISTRY)


def value_problem(pdef: ParamDef, value: Any) -> str | None:
    """Why a non-null value does not fit the parameter (type inferred from its default), or None when it does."""
    if isinstance(pdef.default, bool):
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    # every other parameter of the built-in methods is numeric (required ones have no default to infer from)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return f"must be a number, got {value!r}"
    try:
        finite = math.isfinite(float(value))
    except OverflowError:  # an integer too large for a float
        return f"must be a finite number, got an integer of {len(str(value))} digits"
    return None if finite else f"must be finite, got {value!r}"


def _check_value(method: str, where: str, pdef: ParamDef, value: Any) -> Any:
    """Type-check one resolved parameter value against its definition."""
    if value is None:
        if pdef.required:
            raise RecipeError(f"{where}: parameter {pdef.name!r} of merge method {method!r} must not be null")
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    problem = value_problem(pdef, value)
    if problem:
        raise RecipeError(f"{where}: parameter {pdef.name!r} of merge method {method!r} {problem}")
    return value


def _resolve(method: str, where: str, defs: tuple[ParamDef, ...], given: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults into ``given`` and check required parameters and value types."""
    out = dict(given)
    for pdef in defs:
        if pdef.name not in out or (out[pdef.name] is None and pdef.required):
            if pdef.required:
                raise RecipeError(
                    f"{where}: merge method {method!r} requires parameter {pdef.name!r}"
                    + (f" ({pdef.help})" if pdef.help else "")
                )
            out[pdef.name] = pdef.default
        out[pdef.name] = _check_value(method, where, pdef, out[pdef.name])
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
        raise RecipeError(f"{where}: merge method {m.name!r} requires a base_model")
    if len(inputs.model_params) != len(inputs.tensors):
        raise InputError(
            f"{where}: {len(inputs.tensors)} tensors but {len(inputs.model_params)} per-model parameter sets"
        )
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
        want = (
            f"exactly {m.min_models}"
            if m.max_models == m.min_models
            else f"at least {m.min_models}" if m.max_models is None else f"{m.min_models} to {m.max_models}"
        )
        extra = " besides the base" if m.uses_base else ""
        raise RecipeError(f"{where}: merge method {m.name!r} needs {want} model(s){extra}, got {n}")
    _check_shapes(inputs)
    _check_devices(inputs)
    for t in inputs.tensors + ([inputs.base] if inputs.base is not None else []):
        if t.is_complex() or t.dtype == torch.bool:
            raise InputError(f"{where}: cannot merge tensors of dtype {t.dtype}")

    params = _resolve(m.name, f"{where}, global parameters", m.global_params, inputs.params)
    model_params = [
        _resolve(m.name, f"{where}, model {i}", m.model_params, mp) for i, mp in enumerate(inputs.model_params)
    ]
    resolved = replace(inputs, params=params, model_params=model_params)
    out = m.fn(resolved)
    if out.shape != resolved.tensors[0].shape:
        raise RuntimeError(f"{where}: merge method {m.name!r} returned shape {tuple(out.shape)}")
    dtype = output_dtype(resolved)
    if not dtype.is_floating_point:
        out = torch.round(out)
    return out.to(dtype)
