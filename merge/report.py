"""report.json: the typed record of one run, written once by the artifact finisher and read by every reader.

A merge, a ZipIt zip and a stitch all write the same :class:`Report` (each fills the fields it has); the CLI
summary, the app's results and the model card read it back through :func:`read_report`, which refuses a
malformed file with one line naming the file and the field. The JSON keeps the keys runs have always
written: fields are dumped only when a run set them, and what an engine reports beyond the typed fields is
kept, typed as a plain JSON dict, in each section's extras (``model_extra``), so nothing is lost.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from suture.merge.errors import InputError

logger = logging.getLogger(__name__)

REPORT_FILE = "report.json"
NON_FINITE_LISTED = 100  # tensor names kept in the non_finite section (its count is exact)


class _Section(BaseModel):
    """A report section: typed fields, plus whatever else a run recorded (kept, never dropped)."""

    # NaN/inf losses are real outcomes (a diverged merge): written as JSON's NaN/Infinity, like json.dumps
    model_config = ConfigDict(extra="allow", ser_json_inf_nan="constants")
    __pydantic_extra__: dict[str, Any] = Field(init=False)


class Metrics(_Section):
    """Loss and accuracy of one model on the evaluation data (language models: per token, with perplexity)."""

    loss: float | None = None
    accuracy: float | None = None
    perplexity: float | None = None
    tokens: int | None = None


class Barrier(_Section):
    """Loss/accuracy barrier of one interpolation path (Frankle et al. 2020; Ainsworth et al. 2023)."""

    loss: float | None = None
    loss_midpoint: float | None = None
    accuracy: float | None = None


class CurvePoint(_Section):
    """One point of an interpolation curve: the weight t on the other model, and the metrics there."""

    t: float
    loss: float | None = None
    accuracy: float | None = None
    perplexity: float | None = None


class Evaluation(_Section):
    """The `evaluate:` section's results for a merge or a zip: inputs, output, paths, baselines, sweep, notes."""

    data: str | dict[str, Any] | None = None
    split: str | None = None
    items: int | None = None
    language_model: dict[str, Any] | None = None  # kind (causal/masked), masking rate and seed, block size
    models: dict[str, Metrics] = Field(default_factory=dict)
    merged: Metrics | None = None
    ensemble: Metrics | None = None
    baselines: dict[str, Metrics] = Field(default_factory=dict)
    stop_sweep: list[dict[str, Any]] = Field(default_factory=list)
    curves: dict[str, list[CurvePoint]] = Field(default_factory=dict)
    barriers: dict[str, Barrier] = Field(default_factory=dict)
    midpoint_accuracy: dict[str, float] = Field(default_factory=dict)
    plot: str | None = None
    notes: list[str] = Field(default_factory=list)


class Alignment(_Section):
    """What the alignment engine reported: its name, the reference, per-model figures, and engine extras."""

    engine: str
    reference: str | None = None
    fused: bool | None = None
    models: dict[str, Any] | list[Any] | int | None = None  # per-model figures, or how many were zipped
    postprocess: dict[str, Any] | None = None


class NonFinite(_Section):
    """Output tensors holding NaN/Inf after the cast to the output dtype (names listed up to NON_FINITE_LISTED)."""

    tensors: list[str] = Field(default_factory=list)
    count: int = 0


class StitchEnd(_Section):
    """One side of a stitch: the model and the layer it was cut at."""

    model: str
    layer: int | str | None = None
    num_layers: int | None = None
    width: int | None = None
    head: str | None = None


class StitchScore(_Section):
    """A stitch evaluation row: accuracy and macro F1, or why it was skipped."""

    accuracy: float | None = None
    f1_macro: float | None = None
    skipped: str | None = None


class StitchEvaluation(_Section):
    """A stitch's evaluation: the data, its size, and a score per compared setting."""

    data: str
    n: int
    results: dict[str, StitchScore] = Field(default_factory=dict)


class Report(_Section):
    """report.json of a merge, a zip or a stitch (see the module docstring for how keys are kept)."""

    suture_version: str | None = None
    # merges and zips
    merge_method: str | None = None
    models: list[str] = Field(default_factory=list)
    device: str | None = None
    tensors: int | None = None
    bytes_written: int | None = None
    shards: int | None = None
    layers: int | None = None
    seconds_reading: float | None = None
    seconds_merging: float | None = None
    seconds_writing: float | None = None
    seed: int | None = None
    non_finite: NonFinite | None = None
    alignment: Alignment | None = None
    evaluation: Evaluation | None = None
    # stitches
    method: str | None = None
    source: StitchEnd | None = None
    target: StitchEnd | None = None
    evaluate: StitchEvaluation | None = None
    plots: list[str] = Field(default_factory=list)
    artifact: str | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    seconds_total: float | None = None

    @property
    def kind(self) -> str:
        """'stitch', 'merge' (tensors merged by a method) or the engine that built the output (a zip)."""
        if self.source is not None:
            return "stitch"
        if self.merge_method or self.alignment is None:
            return "merge"
        return self.alignment.engine

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to report.json (only the keys the run set, extras included)."""
        return json.loads(self.model_dump_json(exclude_unset=True, fallback=str))

    def non_finite_problem(self) -> str | None:
        """One line when output tensors hold NaN/Inf (such a result must not pass as good), else None."""
        section = self.non_finite
        if section is None or not section.count:
            return None
        from suture.merge.writer import non_finite_summary

        return (f"{section.count} output tensor(s) contain NaN/Inf after the cast to the output dtype: "
                f"{non_finite_summary(section.tensors, section.count)}; rerun with --strict to refuse such output")


_UNION_TAGS = {"str", "int", "float", "bool"}  # pydantic names a union's member in the error location


def _location(error: dict[str, Any]) -> str:
    """The field's dotted path, without the union member tags pydantic adds (`dict[str,any]`, `str`)."""
    parts = [str(p) for p in error["loc"] if not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS))]
    return ".".join(parts) or "(top level)"


def as_report(data: Report | dict[str, Any], where: str = REPORT_FILE) -> Report:
    """A Report from a run's dict (or a Report as is); a malformed one is refused naming `where` and the field."""
    if isinstance(data, Report):
        return data
    try:
        return Report.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InputError(f"{where}: field {_location(first)}: {first['msg']}") from None


def write_report(folder: str | Path, report: Report | dict[str, Any]) -> Report:
    """Validate and write `folder`/report.json; returns the Report written.

    Runs write into the output's temporary folder (merge.writer.atomic_output_dir), which is renamed into place
    only when complete, so a reader never sees half a report.
    """
    target = Path(folder) / REPORT_FILE
    typed = as_report(report, str(target))
    target.write_text(json.dumps(typed.to_json(), indent=2) + "\n", encoding="utf-8")
    logger.debug("wrote %s", target)
    return typed


def read_report(folder: str | Path) -> Report:
    """report.json of a finished output folder; a missing, unreadable or malformed one is refused in one line."""
    from suture.merge.store import read_json  # the one JSON reader: regular files only, size and nesting capped

    path = Path(folder) / REPORT_FILE
    if not path.exists() and not path.is_symlink():
        raise InputError(f"{path}: no report.json (not a finished Suture output folder)")
    data = read_json(path)
    return as_report(data, str(path))


__all__ = ["REPORT_FILE", "NON_FINITE_LISTED", "Report", "Alignment", "Evaluation", "Metrics", "Barrier", "NonFinite",
           "StitchEnd", "StitchEvaluation", "StitchScore", "as_report", "write_report", "read_report"]
