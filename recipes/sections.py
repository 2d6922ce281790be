"""Suture's own recipe sections (`alignment:`, `evaluate:`), validated before any tensor is read.

They sit beside mergekit's keys without reshaping them: a mergekit recipe plus an `alignment:` section
aligns the models first, then merges them with the recipe's method.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, model_validator

from suture.merge.errors import RecipeError

DataSpec = StrictStr | dict[str, Any]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AlignmentSection(_Section):
    """`alignment: {engine, reference, data, ...}` with each engine's own options (others refused)."""

    engine: Literal["weight_matching", "activation_matching", "ot", "zipit"] = "weight_matching"
    reference: StrictStr | None = None
    seed: StrictInt = 0
    data: DataSpec | None = None
    batch_size: StrictInt = Field(256, ge=1)
    max_items: StrictInt | None = Field(None, ge=1)
    input_shape: list[StrictInt] | None = None
    repair: Literal["none", "reset_bn", "repair"] = "none"
    architecture_kwargs: dict[str, Any] | None = None
    # weight matching: coordinate-descent passes; ot: the solver's iteration cap
    max_iter: StrictInt | None = Field(None, ge=1)
    # ot (OTFusion)
    ground_metric: Literal["weights", "activations"] | None = None
    distance: Literal["euclidean", "cosine"] | None = None
    normalize: StrictBool | None = None
    solver: Literal["emd", "sinkhorn"] | None = None
    reg: float | None = Field(None, gt=0)
    stop_thr: float | None = Field(None, gt=0)
    marginals: Literal["uniform", "activation"] | None = None
    target_widths: dict[StrictStr, StrictInt] | None = None
    blend: float | None = Field(None, ge=0, le=1)
    # zipit
    alpha: float | None = Field(None, ge=0, le=1)
    beta: float | None = Field(None, ge=0)
    stop_at: StrictStr | None = None
    matcher: Literal["zip", "permute", "identity"] | None = None
    heads: Literal["concat", "average"] | None = None
    unmerge: Literal["copy", "lstsq", "fit"] | None = None
    match_head_scale: StrictBool | None = None

    @model_validator(mode="after")
    def _options_fit_engine(self) -> "AlignmentSection":
        allowed = ENGINE_OPTIONS[self.engine]
        stray = [k for k in ENGINE_ONLY if getattr(self, k) is not None and k not in allowed]
        if stray:
            raise ValueError(f"option(s) {stray} do not apply to engine {self.engine!r} (it takes {sorted(allowed)})")
        return self

    def ot_options(self) -> dict[str, Any]:
        """The OT engine's keyword options that were set."""
        return {k: getattr(self, k) for k in ENGINE_OPTIONS["ot"] if k != "blend" and getattr(self, k) is not None}


ENGINE_ONLY = ("ground_metric", "distance", "normalize", "solver", "reg", "stop_thr", "marginals", "target_widths",
               "blend", "alpha", "beta", "stop_at", "matcher", "heads", "unmerge", "match_head_scale")
ENGINE_OPTIONS: dict[str, set[str]] = {
    "weight_matching": {"max_iter"},
    "activation_matching": set(),
    "ot": {"max_iter", "ground_metric", "distance", "normalize", "solver", "reg", "stop_thr", "marginals", "target_widths", "blend"},
    "zipit": {"alpha", "beta", "stop_at", "matcher", "heads", "unmerge", "match_head_scale"},
}


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


def parse_alignment(value: Any, where: Callable[[tuple], str] | None = None) -> AlignmentSection | None:
    """Validate the `alignment:` section (None when absent)."""
    return _validate(AlignmentSection, "alignment", value, where)


def parse_evaluate(value: Any, where: Callable[[tuple], str] | None = None) -> EvaluateSection | None:
    """Validate the `evaluate:` section (None when absent)."""
    return _validate(EvaluateSection, "evaluate", value, where)
