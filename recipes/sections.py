"""Suture's own recipe sections (`alignment:`, `evaluate:`), validated before any tensor is read.

They sit beside mergekit's keys without reshaping them: a mergekit recipe plus an `alignment:` section
aligns the models first, then merges them with the recipe's method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictInt, StrictStr, Tag, TypeAdapter, ValidationError

from suture.merge.align.engines import COMMON_OPTIONS, AlignmentOptions, Engine, find_engine, list_engines
from suture.merge.errors import RecipeError

DEFAULT_ENGINE = "weight_matching"  # what `alignment:` without `engine:` runs

DataSpec = StrictStr | dict[str, Any]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# The section's common settings; each engine's Options (merge.align.engines) adds its own
AlignmentSection = AlignmentOptions


def _engine_of(value: Any) -> Any:
    """The discriminator: the section's `engine` (weight_matching when left out)."""
    if isinstance(value, Mapping):
        return value.get("engine", DEFAULT_ENGINE)
    return getattr(value, "engine", None)


@lru_cache(maxsize=8)
def _alignment_adapter(engines: tuple[Engine, ...]) -> TypeAdapter:
    """`alignment:` as a discriminated union (on `engine`) of the registered engines' Options."""
    members = tuple(Annotated[e.options, Tag(e.name)] for e in engines)
    union = Union[members] if len(members) > 1 else members[0]  # noqa: UP007 (built from a tuple)
    return TypeAdapter(Annotated[union, Discriminator(_engine_of)])


def _alignment_problems(value: Any, exc: ValidationError, engines: list[Engine]) -> list[tuple[tuple, str]]:
    """Pydantic's errors as (key path, message), with the union's tag left out of the path and the engine's name
    given for options that belong to another engine."""
    names = {e.name for e in engines}
    engine = find_engine(_engine_of(value)) if isinstance(value, Mapping) else None
    problems: list[tuple[tuple, str]] = []
    stray: list[str] = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        if loc and loc[0] in names:
            loc = loc[1:]
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            problems.append((("engine",), f"expected one of {sorted(names)}, got {_engine_of(value)!r}"))
        elif err["type"] == "extra_forbidden" and engine is not None and len(loc) == 1 and any(
                loc[0] in e.options.model_fields for e in engines):
            stray.append(str(loc[0]))
        else:
            problems.append((loc, err["msg"]))
    if stray:
        own = sorted(set(engine.options.model_fields) - set(COMMON_OPTIONS))
        problems.append(((stray[0],), f"option(s) {stray} do not apply to engine {engine.name!r} (it takes {own})"))
    return problems


class EvaluateSection(_Section):
    """`evaluate: {data, points, split, batch_size, max_items, plot, mask_rate, mask_seed}`: interpolation paths,
    naive vs aligned. `mask_rate`/`mask_seed` fix the masked positions when a masked LM is scored on text."""

    data: DataSpec = "sklearn:digits"
    split: Literal["train", "test", "all"] = "test"
    points: StrictInt = Field(11, ge=3)
    batch_size: StrictInt = Field(256, ge=1)
    max_items: StrictInt | None = Field(None, ge=1)
    plot: StrictBool = True
    mask_rate: float = Field(0.15, gt=0.0, lt=1.0)
    mask_seed: StrictInt = Field(0, ge=0)


def _validate(model: type[BaseModel], name: str, value: Any, where: Callable[[tuple], str] | None) -> Any:
    if value is None:
        return None
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            path = (name, *err["loc"])
            label = where(path) if where else ".".join(str(p) for p in path)
            problems.append(f"{label}: {err['msg']}")
        raise RecipeError("; ".join(problems)) from None


class PublishSection(_Section):
    """`publish: {repo_id, private, revision, create_pr, commit_message}` (never a token: recipes get shared)."""

    repo_id: StrictStr
    private: StrictBool = False
    revision: StrictStr | None = None
    create_pr: StrictBool = False
    commit_message: StrictStr | None = None


def parse_publish(value: Any, where: Callable[[tuple], str] | None = None) -> PublishSection | None:
    """Validate the `publish:` section (None when absent)."""
    return _validate(PublishSection, "publish", value, where)


def parse_alignment(value: Any, where: Callable[[tuple], str] | None = None) -> AlignmentOptions | None:
    """Validate the `alignment:` section (None when absent): the Options of the engine it names."""
    if value is None:
        return None
    engines = list_engines()
    if not isinstance(value, Mapping):
        return _validate(AlignmentOptions, "alignment", value, where)  # the same "a mapping" message as other sections
    try:
        return _alignment_adapter(tuple(engines)).validate_python(dict(value))
    except ValidationError as exc:
        problems = _alignment_problems(value, exc, engines)
    labels = [f"{where(('alignment', *loc)) if where else '.'.join(str(p) for p in ('alignment', *loc))}: {msg}"
              for loc, msg in problems]
    raise RecipeError("; ".join(labels)) from None


def parse_evaluate(value: Any, where: Callable[[tuple], str] | None = None) -> EvaluateSection | None:
    """Validate the `evaluate:` section (None when absent)."""
    return _validate(EvaluateSection, "evaluate", value, where)
