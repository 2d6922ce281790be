"""Widget specs from a pydantic model's JSON schema: the app's forms follow each engine's `Options`.

A pure function (no Streamlit), so the form an engine gets is testable without a browser: the schema's
types give the widget, ``enum`` the choices, ``minimum``/``maximum`` the limits, ``title`` the label,
``description`` the help text and ``default`` the value shown when the recipe leaves the setting out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal

Kind = Literal["bool", "choice", "int", "float", "text", "yaml"]


@dataclass(frozen=True)
class WidgetSpec:
    """One form field: the setting's name, how to show it, its limits and when it applies."""

    name: str
    label: str
    kind: Kind
    default: Any = None
    help: str = ""
    choices: list[Any] = field(default_factory=list)
    min: float | None = None
    max: float | None = None
    step: float | None = None
    depends: tuple[str, Any] | None = None  # shown only while another setting has this value
    bounds: str = ""  # the range as shown beside the field, e.g. "≥ 1", "in [0, 1]"; empty when unbounded

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the page (and for st.session_state)."""
        return asdict(self)


def _variants(prop: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The non-null alternatives of a property (`X | None` is anyOf [X, null] in the schema)."""
    options = prop.get("anyOf") or [prop]
    return [o for o in options if o.get("type") != "null"]


def _kind(prop: Mapping[str, Any], defs: Mapping[str, Any]) -> tuple[Kind, list[Any]]:
    variants = [defs.get(v["$ref"].rsplit("/", 1)[-1], v) if "$ref" in v else v for v in _variants(prop)]
    if len(variants) != 1:
        return "yaml", []
    v = variants[0]
    if "enum" in v:
        return "choice", list(v["enum"])
    if "const" in v:
        return "choice", [v["const"]]
    return {"boolean": "bool", "integer": "int", "number": "float", "string": "text"}.get(v.get("type"), "yaml"), []


def _limit(prop: Mapping[str, Any], *keys: str) -> float | None:
    for v in _variants(prop):
        for key in keys:
            if key in v:
                return v[key]
    return None


def bounds_text(prop: Mapping[str, Any]) -> str:
    """A numeric property's range as people read it ("in [0, 1]", "> 0", "≥ 1"), from its JSON schema limits."""
    variant = next(iter(_variants(prop)), {})
    lo_key = "minimum" if "minimum" in variant else "exclusiveMinimum" if "exclusiveMinimum" in variant else None
    hi_key = "maximum" if "maximum" in variant else "exclusiveMaximum" if "exclusiveMaximum" in variant else None
    if lo_key and hi_key:
        return f"in {'[' if lo_key == 'minimum' else '('}{variant[lo_key]:g}, {variant[hi_key]:g}{']' if hi_key == 'maximum' else ')'}"
    if lo_key:
        return f"{'≥' if lo_key == 'minimum' else '>'} {variant[lo_key]:g}"
    if hi_key:
        return f"{'≤' if hi_key == 'maximum' else '<'} {variant[hi_key]:g}"
    return ""


def field_bounds(model: Any, name: str) -> str:
    """The range of field `name` of a pydantic model, as :func:`bounds_text` writes it."""
    return bounds_text(model.model_json_schema()["properties"][name])


def field_problem(model: Any, name: str, value: Any) -> str | None:
    """Why `value` does not fit field `name` of a pydantic model (type, range), as a short phrase; None when it fits."""
    from pydantic import TypeAdapter, ValidationError

    info = model.model_fields[name]
    try:
        TypeAdapter(Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation).validate_python(value)
    except ValidationError as exc:
        message = exc.errors(include_url=False)[0]["msg"].replace("Input should be", "must be")
        return f"{message}, got {value!r}"
    return None


def form_fields(schema: Mapping[str, Any], names: Iterable[str] | None = None) -> list[WidgetSpec]:
    """Widget specs for the schema's properties (only `names`, in that order, when given)."""
    props = schema.get("properties", {})
    defs = schema.get("$defs", {})
    chosen = list(names) if names is not None else list(props)
    out = []
    for name in chosen:
        prop = props[name]
        kind, choices = _kind(prop, defs)
        depends = prop.get("depends")
        out.append(WidgetSpec(
            name=name,
            label=prop.get("title") or name.replace("_", " ").capitalize(),
            kind=kind,
            default=prop.get("default"),
            help=prop.get("description", ""),
            choices=choices,
            min=_limit(prop, "minimum", "exclusiveMinimum"),
            max=_limit(prop, "maximum", "exclusiveMaximum"),
            step=prop.get("step"),
            depends=tuple(depends) if depends else None,
            bounds=bounds_text(prop) if kind in ("int", "float") else "",
        ))
    return out
