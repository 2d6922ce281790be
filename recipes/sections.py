"""Suture's own recipe sections (`alignment:`, `evaluate:`), validated before any tensor is read.

They sit beside mergekit's keys without reshaping them: a mergekit recipe plus an `alignment:` section
aligns the models first, then merges them with the recipe's method.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from merge.errors import RecipeError

DataSpec = StrictStr | dict[str, Any]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AlignmentSection(_Section):
    """`alignment: {engine, reference, max_iter, seed, data, repair, ...}`."""

    engine: Literal["weight_matching", "activation_matching"] = "weight_matching"
    reference: StrictStr | None = None
    max_iter: StrictInt = Field(100, ge=1)
    seed: StrictInt = 0
    data: DataSpec | None = None
    batch_size: StrictInt = Field(256, ge=1)
    max_items: StrictInt | None = Field(None, ge=1)
    input_shape: list[StrictInt] | None = None
    repair: Literal["none", "reset_bn", "repair"] = "none"
    architecture_kwargs: dict[str, Any] | None = None


class EvaluateSection(_Section):
    """`evaluate: {data, points, split, batch_size, max_items, plot}`: interpolation paths, naive vs aligned."""

    data: DataSpec = "sklearn:digits"
    split: Literal["train", "test", "all"] = "test"
    points: StrictInt = Field(11, ge=3)
    batch_size: StrictInt = Field(256, ge=1)
    max_items: StrictInt | None = Field(None, ge=1)
    plot: StrictBool = True


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


def parse_alignment(value: Any, where: Callable[[tuple], str] | None = None) -> AlignmentSection | None:
    """Validate the `alignment:` section (None when absent)."""
    return _validate(AlignmentSection, "alignment", value, where)


def parse_evaluate(value: Any, where: Callable[[tuple], str] | None = None) -> EvaluateSection | None:
    """Validate the `evaluate:` section (None when absent)."""
    return _validate(EvaluateSection, "evaluate", value, where)
