"""The recipe's ``stitch:`` section: its schema, validation and run (the algorithms live in suture.stitch).

Section shape (validated with pydantic before any model or data is touched; errors name the key, e.g.
``stitch.source.layer``)::

    stitch:
      source: {model: demo:mlp-seed1, layer: 2}          # layer: index, negative index, stage name; default: penultimate
      target: {model: demo:mlp-seed2, layer: 2}          # HF encoders: pooling: mean|cls, max_length
      method: procrustes    # relative | procrustes | linear | ortho_linear | affine | ot | learned
      options: {}           # constructor options of the method (translator / RelativeProjector / learned ridge)
      anchors: {count: 256, selection: random, data: sklearn:digits, split: train, seed: 0, tokens: false}
      head: {kind: auto, weight_decay: auto}   # auto | model | logistic | linear; data/split (default: the anchors' data)
      learned: {epochs: 0, lr: 0.001, batch_size: 64}    # fine-tuning of the learned stitch (A, B frozen)
      evaluate: {data: sklearn:digits, split: test, compare: [relative, learned], similarity: true, plot: true}
      plan: {method: learned, pairs: [[1, 1], [2, 2]]}   # optional: score (i, j) cut pairs

``anchors.tokens: true`` (two Hugging Face encoders with the same tokenizer) fits on every token state of
the anchor texts. What the run writes is described in :mod:`suture.stitch.pipeline`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError, field_validator

from suture.merge.errors import InputError, OptionError, RecipeError
from suture.stitch.pipeline import METHODS, PLAN_METHODS, Progress, make_estimator, stitch_models

__all__ = ["METHODS", "PlanSection", "StitchSection", "run_stitch", "validate_stitch_section"]

Method = Literal[METHODS]  # type: ignore[valid-type]
PlanMethod = Literal[PLAN_METHODS]  # type: ignore[valid-type]
DataSpec = StrictStr | dict[str, Any]
Where = Callable[[tuple], str]
_DEFAULT_DATA = "sklearn:digits"


class _S(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSide(_S):
    """`source:` / `target:`: a model reference and the layer to cut at."""

    model: StrictStr
    layer: StrictInt | StrictStr | None = None
    pooling: Literal["mean", "cls"] = "mean"
    max_length: StrictInt = Field(128, ge=2)


class AnchorsSection(_S):
    """`anchors:`: how many parallel anchors, how they are picked, from which data."""

    count: StrictInt = Field(256, ge=1)
    selection: Literal["random", "stratified", "farthest", "kmeans"] = "random"
    data: DataSpec = _DEFAULT_DATA
    split: Literal["train", "test", "all"] = "train"
    max_items: StrictInt | None = Field(None, ge=1)
    seed: StrictInt = 0
    tokens: StrictBool = False


class HeadSection(_S):
    """`head:`: use the target's own layers after the cut, or train a linear/logistic head on its features.

    ``weight_decay: auto`` picks the L2 strength by cross-validation on the head's training features; every
    trained head of the run (target, source-only baseline, relative) is fitted with the same setting.
    """

    kind: Literal["auto", "model", "logistic", "linear"] = "auto"
    data: DataSpec | None = None
    split: Literal["train", "test", "all"] = "train"
    max_items: StrictInt | None = Field(None, ge=1)
    weight_decay: StrictFloat | StrictInt | StrictStr = "auto"

    @field_validator("weight_decay")
    @classmethod
    def _weight_decay(cls, value: float | int | str) -> float | int | str:
        if value == "auto" or (not isinstance(value, str) and value >= 0):
            return value
        raise ValueError(f"expected a number >= 0 or 'auto', got {value!r}")


class LearnedSection(_S):
    """`learned:`: fine-tuning of the learned stitch after its closed-form initialisation."""

    epochs: StrictInt = Field(0, ge=0)
    lr: StrictFloat = Field(1e-3, gt=0)
    batch_size: StrictInt = Field(64, ge=1)
    seed: StrictInt = 0


class EvaluateSection(_S):
    """`evaluate:`: held-out data, methods to compare, similarity heatmap and plots."""

    data: DataSpec | None = None
    split: Literal["train", "test", "all"] = "test"
    max_items: StrictInt | None = Field(None, ge=1)
    batch_size: StrictInt = Field(256, ge=1)
    compare: list[Method] = Field(default_factory=list)
    similarity: StrictBool = True
    plot: StrictBool = True


class PlanSection(_S):
    """`plan:`: score candidate (source layer, target layer) pairs."""

    method: PlanMethod = "learned"
    pairs: list[list[StrictInt]] | None = None
    source_layers: list[StrictInt] | None = None
    target_layers: list[StrictInt] | None = None


class StitchSection(_S):
    """The whole `stitch:` section."""

    source: ModelSide
    target: ModelSide
    method: Method
    options: dict[str, Any] = Field(default_factory=dict)
    anchors: AnchorsSection = Field(default_factory=AnchorsSection)
    head: HeadSection = Field(default_factory=HeadSection)
    learned: LearnedSection = Field(default_factory=LearnedSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    plan: PlanSection | None = None
    save: StrictBool = True


def _label(path: tuple, where: Where | None) -> str:
    return where(path) if where else ".".join(str(p) for p in path)


def _error(path: tuple, message: str, where: Where | None) -> RecipeError:
    return RecipeError(f"{_label(path, where)}: {message}")


def validate_stitch_section(section: Any, where: Where | None = None) -> StitchSection:
    """Validate a `stitch:` mapping (types, allowed values, method options); errors name keys like stitch.source.layer."""
    if not isinstance(section, Mapping):
        raise _error(("stitch",), f"expected a mapping with source, target and method, got {type(section).__name__}", where)
    try:
        cfg = StitchSection.model_validate(dict(section))
    except ValidationError as exc:
        problems = [f"{_label(('stitch', *err['loc']), where)}: {err['msg']}" for err in exc.errors()]
        raise RecipeError("; ".join(problems)) from None
    # Method options are checked by building the (unfitted) estimator now, not after minutes of work.
    try:
        make_estimator(cfg.method, cfg.options)
    except (TypeError, InputError) as exc:
        raise _error(("stitch", "options"), f"does not fit method {cfg.method!r} ({exc})", where) from None
    return cfg


def run_stitch(
    section: Mapping[str, Any] | StitchSection,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    progress: Progress | None = None,
    where: Where | None = None,
    trust_remote_code: bool = False,
    write_report: bool = True,
) -> dict[str, Any]:
    """Validate and run a `stitch:` section (see suture.stitch.pipeline.stitch_models); errors name the recipe key."""
    cfg = section if isinstance(section, StitchSection) else validate_stitch_section(section, where)
    try:
        return stitch_models(cfg, out_dir, device=device, progress=progress, trust_remote_code=trust_remote_code,
                             write_report=write_report)
    except OptionError as exc:
        raise _error(("stitch", *exc.field), exc.message, where) from None
