"""`suture compare COMPARE.yaml OUT`: one set of fine-tunes, many merge methods, one side-by-side report.

The spec names the inputs once (the pretrained ``base`` encoder, one fine-tune per task with its own head,
each task's evaluation data, and held-out tasks no model was fine-tuned on), then a list of ``rows``: a merge
method (or alignment ``engine``) with its parameters and an optional ``grid`` of hyper-parameters. A grid is
searched on each task's *validation* split (the mean accuracy over the fine-tuned tasks) and only the chosen
point is scored on *test*, as Ilharco et al. (2023) tune task arithmetic's λ; test data never picks anything.

Each row merges the fine-tuned encoders into a temporary folder (the recipe runner, so every registered method
and engine works unchanged), loads the merged encoder and scores every fine-tuned task's test split with that
task's own head (Ilharco et al. 2023; FusionBench's protocol: heads stay per task, encoders merge). A held-out
task is scored with a logistic-regression probe fitted on the *base* encoder's features of its train split and
applied unchanged to each merged encoder, so it measures how much of the pretrained representation a merge
keeps. Per row the report states what Tam et al. (2024) ask every comparison to state: accuracy per task, the
average, the normalised average (mean over tasks of merged ÷ individual fine-tune accuracy), time, peak memory,
and what the row needs (no data / unlabelled / labelled, how many examples, and labelled validation examples
spent on choosing hyper-parameters). Outputs: ``report.json``, ``table.md`` and ``plot.png`` in OUT.

Reference rows: ``method: base`` (the pretrained encoder with each task's fine-tuned head) and ``method:
individual`` (each fine-tune on its own task; always measured, since it normalises every row).

A row may take a parameter from what validation chose for an earlier row (``from_chosen: {init:
task_arithmetic.lambda}``): AdaMerging then starts from task arithmetic's validation-chosen λ, a data-driven
initialisation that spends no further validation data.
"""

from __future__ import annotations

import copy
import itertools
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from suture.merge import __version__
from suture.merge.errors import InputError, RecipeError, SutureError
from suture.merge.tasks_text import SPLITS, TextSplit, load_task, read_split_file, task_names, write_split_file
from suture.merge.text_heads import HEAD_DIR, LinearHead, encode, fit_probe, load_head
from suture.recipes.yaml_lines import KeyPath, format_path, nearest_line, read_yaml_file, validate_spec

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int, str], None]
REFERENCE_ROWS = ("base", "individual")
Scalar = StrictStr | StrictFloat | StrictInt | StrictBool


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskFiles(_Section):
    """A task's splits as files of ``text<TAB>label`` lines (labels 0..k-1, in the head's class order)."""

    train: StrictStr | None = None
    validation: StrictStr
    test: StrictStr


class TaskSpec(_Section):
    """One task: its fine-tune (a folder with ``head/``), or ``heldout: true`` for a task no model saw."""

    name: StrictStr = Field(min_length=1)
    model: StrictStr | None = None
    data: StrictStr | TaskFiles
    heldout: StrictBool = False

    @model_validator(mode="after")
    def _model_or_heldout(self) -> TaskSpec:
        if self.heldout and self.model is not None:
            raise ValueError("a held-out task has no fine-tuned model; drop model or heldout")
        if not self.heldout and self.model is None:
            raise ValueError("needs model (its fine-tune) unless heldout: true")
        return self


class RowData(_Section):
    """Per-model data a data-driven method consumes: each model gets ``examples`` rows of its own task."""

    labels: StrictBool = False
    examples: StrictInt = Field(256, ge=1)
    split: Literal["train", "validation", "test"] = "train"
    key: StrictStr = "data"  # where the file goes in each recipe model entry, dotted (e.g. parameters.data)


class RowSpec(_Section):
    """One row: a merge method (or engine) with parameters, an optional validation grid and per-model data."""

    name: StrictStr | None = None
    method: StrictStr
    engine: StrictStr | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    data: RowData | None = None
    recipe: dict[str, Any] = Field(default_factory=dict)
    # parameter -> "ROW.KEY": the value validation chose for KEY in an earlier row's grid
    from_chosen: dict[str, StrictStr] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _grid(self) -> RowSpec:
        for key, values in self.grid.items():
            if not values:
                raise ValueError(f"grid {key!r} lists no values")
        return self

    @property
    def label(self) -> str:
        """The row's name (its own, else the method, with the engine when there is one)."""
        return self.name or (f"{self.engine}+{self.method}" if self.engine else self.method)

    def points(self) -> list[dict[str, Any]]:
        """Every grid combination (one empty point without a grid)."""
        keys = list(self.grid)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(self.grid[k] for k in keys))]


class EvaluationSettings(_Section):
    """How encoders are scored: tokenisation, batch size, the built-in tasks' split seed, an optional cap."""

    max_length: StrictInt = Field(64, ge=1, le=512)
    batch_size: StrictInt = Field(64, ge=1)
    seed: StrictInt = 0
    max_items: StrictInt | None = Field(None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch CPU threads while comparing (None: torch's default); 1 is several times faster on a busy shared CPU
    threads: StrictInt | None = Field(None, ge=1)


class CompareSpec(_Section):
    """A validated compare spec; build it with :func:`load_compare_spec`."""

    base: StrictStr
    tasks: list[TaskSpec] = Field(min_length=1)
    evaluation: EvaluationSettings = EvaluationSettings()
    rows: list[RowSpec] = Field(min_length=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    _source: str = "<dict>"
    _lines: dict[KeyPath, int] = {}

    @property
    def source(self) -> str:
        """The spec file (or ``<dict>``)."""
        return self._source

    def where(self, path: KeyPath) -> str:
        """``SPEC: rows[2].method (line 14)`` for messages."""
        line = nearest_line(self._lines, path)
        return f"{self._source}: {format_path(path)}" + (f" (line {line})" if line is not None else "")

    def path(self, value: str) -> Path:
        """A path from the spec, relative to the spec's folder."""
        p = Path(value).expanduser()
        if not p.is_absolute() and self._source not in ("<dict>", "<string>"):
            p = Path(self._source).parent / p
        return p

    @property
    def merged_tasks(self) -> list[TaskSpec]:
        """Tasks with a fine-tune (merged and scored with their own heads)."""
        return [t for t in self.tasks if not t.heldout]


def parse_compare_spec(data: Any, *, source: str = "<dict>", lines: Mapping[KeyPath, int] | None = None) -> CompareSpec:
    """Validate spec data; every problem is one RecipeError naming the spec, the key path and its line."""
    spec = validate_spec(CompareSpec, data, source, lines, "compare spec is a mapping with base, tasks, rows (and evaluation)")
    _check_names(spec)
    _check_files(spec)
    for i, row in enumerate(spec.rows):
        _check_row(spec, i, row)
    return spec


def load_compare_spec(path: str | Path) -> CompareSpec:
    """Read and validate a compare spec YAML file."""
    data, lines, source = read_yaml_file(path, "compare spec")
    return parse_compare_spec(data, source=source, lines=lines)


def _check_names(spec: CompareSpec) -> None:
    seen: dict[str, int] = {}
    for i, t in enumerate(spec.tasks):
        if t.name in seen:
            raise RecipeError(f"{spec.where(('tasks', i, 'name'))}: task {t.name!r} is listed twice (first as tasks[{seen[t.name]}])")
        seen[t.name] = i
        if isinstance(t.data, str) and t.data not in task_names():
            raise RecipeError(f"{spec.where(('tasks', i, 'data'))}: unknown built-in task {t.data!r}; built-in: {', '.join(task_names())} (or give validation/test files)")
        if t.heldout and isinstance(t.data, TaskFiles) and t.data.train is None:
            raise RecipeError(f"{spec.where(('tasks', i, 'data'))}: a held-out task needs a train file (its probe is fitted on base features of it)")
    if not spec.merged_tasks:
        raise RecipeError(f"{spec.where(('tasks',))}: every task is held out; at least one needs a fine-tuned model")
    rows: dict[str, int] = {}
    for i, r in enumerate(spec.rows):
        if r.label in rows:
            raise RecipeError(f"{spec.where(('rows', i))}: two rows are named {r.label!r}; give one a name")
        rows[r.label] = i
        for param, ref in r.from_chosen.items():
            source, _, key = ref.rpartition(".")
            where = spec.where(("rows", i, "from_chosen", param))
            if source not in rows or rows[source] == i or key not in spec.rows[rows[source]].grid:
                raise RecipeError(f"{where}: {ref!r} must name an earlier row and a key of its grid (ROW.KEY)")
            if param in r.parameters or param in r.grid:
                raise RecipeError(f"{where}: {param!r} is also given in parameters or grid; give it once")


def _check_files(spec: CompareSpec) -> None:
    if not (spec.path(spec.base) / "config.json").is_file():
        raise RecipeError(f"{spec.where(('base',))}: {spec.path(spec.base)} is not a Hugging Face model folder (no config.json)")
    for i, t in enumerate(spec.tasks):
        if t.model is not None and not (spec.path(t.model) / HEAD_DIR).is_dir():
            raise RecipeError(f"{spec.where(('tasks', i, 'model'))}: {spec.path(t.model)} has no {HEAD_DIR}/ (the task's head)")
        if isinstance(t.data, TaskFiles):
            for split in SPLITS:
                value = getattr(t.data, split)
                if value is not None and not spec.path(value).is_file():
                    raise RecipeError(f"{spec.where(('tasks', i, 'data', split))}: {spec.path(value)} not found")


def _check_row(spec: CompareSpec, i: int, row: RowSpec) -> None:
    from suture.merge.methods.registry import list_methods

    if row.method in REFERENCE_ROWS:
        extra = [k for k in ("engine", "parameters", "grid", "data", "recipe") if k in row.model_fields_set]
        if extra:
            raise RecipeError(f"{spec.where(('rows', i, extra[0]))}: the {row.method!r} row takes no {extra[0]}")
        return
    if row.method not in list_methods():
        raise RecipeError(f"{spec.where(('rows', i, 'method'))}: unknown merge method {row.method!r}; "
                          f"known: {', '.join(list_methods() + list(REFERENCE_ROWS))}")
    from suture.recipes.schema import parse_recipe

    if row.data is not None:  # its data files are written when the row runs; the recipe is checked then (a failure is recorded)
        return
    for point in row.points():
        try:
            parse_recipe(row_recipe(spec, row, point, data_files=None), source="recipe")
        except RecipeError as exc:
            key = ("rows", i, "grid") if point else ("rows", i)
            raise RecipeError(f"{spec.where(key)}: {' '.join(str(exc).split())}") from None


def row_recipe(spec: CompareSpec, row: RowSpec, point: Mapping[str, Any], *, data_files: Mapping[str, Path] | None) -> dict[str, Any]:
    """The merge recipe of one row at one grid point: each parameter goes where the method declares it."""
    from suture.merge.methods.registry import get_method

    method = get_method(row.method)
    model_keys = {p.name for p in method.model_params}
    values = {**row.parameters, **point}
    per_model = {k: v for k, v in values.items() if k in model_keys}
    if "weight" in model_keys:
        per_model.setdefault("weight", 1.0)
    models = []
    for t in spec.merged_tasks:
        entry: dict[str, Any] = {"model": str(spec.path(t.model)), "parameters": dict(per_model)}
        if row.data is not None:
            target = entry
            *parents, last = row.data.key.split(".")
            for part in parents:
                target = target.setdefault(part, {})
            # tokenised as the scorer does, so the data stage sees the texts the tasks are scored on
            target[last] = f"{data_files[t.name] if data_files else 'placeholder.txt'}?max_length={spec.evaluation.max_length}"
            entry["head"] = entry["model"]  # the data stage scores each task with that task's own head/
        models.append(entry)
    recipe: dict[str, Any] = {"merge_method": row.method, "models": models, "dtype": spec.dtype}
    if method.uses_base or method.requires_base:
        recipe["base_model"] = str(spec.path(spec.base))
    top = {k: v for k, v in values.items() if k not in model_keys}
    if top:
        recipe["parameters"] = top
    if row.engine:
        recipe["alignment"] = {"engine": row.engine}
    return _deep_merge(recipe, row.recipe)


def _deep_merge(a: dict[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


# --- running ---------------------------------------------------------------------------------------------


class _PeakRSS:
    """Peak resident memory of this process while a row runs, sampled every 20 ms (psutil)."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.start = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> _PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


@dataclass
class _Task:
    spec: TaskSpec
    splits: dict[str, TextSplit]
    classes: tuple[str, ...]
    head: LinearHead | None = None


@dataclass
class _Scorer:
    """The evaluation model (base architecture) whose weights each row swaps in, the tasks and their heads."""

    spec: CompareSpec
    tasks: list[_Task]
    progress: Progress | None = None
    model: Any = None
    tokenizer: Any = None
    names: set[str] = field(default_factory=set)

    @classmethod
    def open(cls, spec: CompareSpec, tasks: list[_Task], device: torch.device, progress: Progress | None = None) -> _Scorer:
        """The base encoder (the architecture every row's weights go into) and its tokenizer, loaded once."""
        from transformers import AutoModel, AutoTokenizer

        base = str(spec.path(spec.base))
        model = AutoModel.from_pretrained(base).to(device).eval()
        return cls(spec, tasks, progress, model=model, tokenizer=AutoTokenizer.from_pretrained(base),
                   names={k for k, _ in model.named_parameters()})

    def load_weights(self, folder: Path) -> None:
        """Put a folder's encoder tensors into the evaluation model (every parameter must be there)."""
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for f in sorted(folder.glob("*.safetensors")):
            state.update(load_file(str(f)))
        missing = sorted(self.names - set(state))
        if missing:
            raise InputError(f"{folder}: merged encoder lacks {len(missing)} tensor(s), e.g. {missing[0]}")
        self.model.load_state_dict({k: v for k, v in state.items() if k in self.names}, strict=False)

    def features(self, task: _Task, split: str) -> torch.Tensor:
        ev = self.spec.evaluation

        def tick(done: int, total: int) -> None:
            if self.progress:
                self.progress("evaluate", done, total, f"{task.spec.name} {split}")

        return encode(self.model, self.tokenizer, task.splits[split].texts, max_length=ev.max_length, batch_size=ev.batch_size, progress=tick)

    def score(self, split: str, tasks: list[_Task] | None = None) -> dict[str, float]:
        """Accuracy of the current weights on each task's split, each with its own head (or probe)."""
        return {t.spec.name: t.head.accuracy(self.features(t, split), t.splits[split].labels) for t in (tasks or self.tasks)}


def _load_tasks(spec: CompareSpec) -> list[_Task]:
    out = []
    for t in spec.tasks:
        head = load_head(spec.path(t.model)) if t.model is not None else None
        if isinstance(t.data, str):
            builtin = load_task(t.data, spec.evaluation.seed)
            splits = {s: builtin.split(s) for s in SPLITS}
            classes = builtin.classes
        else:
            splits = {s: read_split_file(spec.path(getattr(t.data, s))) for s in SPLITS if getattr(t.data, s) is not None}
            classes = head.classes if head else tuple(str(c) for c in sorted({y for s in splits.values() for y in s.labels}))
        cap = spec.evaluation.max_items
        if cap:
            splits = {s: TextSplit(v.texts[:cap], v.labels[:cap]) for s, v in splits.items()}
        if head is not None and len(head.classes) != len(classes):
            raise InputError(f"task {t.name}: its head has {len(head.classes)} classes, its data {len(classes)}")
        for s, v in splits.items():
            bad = [y for y in v.labels if not 0 <= y < len(classes)]
            if bad:
                raise InputError(f"task {t.name} {s}: label {bad[0]} outside 0..{len(classes) - 1}")
        out.append(_Task(t, splits, tuple(classes), head))
    return out


def _needs(row: RowSpec, spec: CompareSpec, tasks: list[_Task]) -> dict[str, Any]:
    if row.method == "individual":
        return {"data": "labelled", "examples": None, "note": "a fine-tune per task (its own training data)"}
    data: dict[str, Any] = {"data": "none", "examples": 0}
    if row.data is not None:
        n = sum(min(row.data.examples, len(t.splits[row.data.split])) for t in tasks if not t.spec.heldout)
        data = {"data": "labelled" if row.data.labels else "unlabelled", "examples": n, "split": row.data.split}
    points = row.points()
    data["selection"] = ({"labelled_validation_examples": sum(len(t.splits["validation"]) for t in tasks if not t.spec.heldout),
                          "points": len(points)} if len(points) > 1 else None)
    if row.from_chosen:  # the validation data was spent by the rows it takes its values from
        data["selection"] = {**(data["selection"] or {"labelled_validation_examples": 0, "points": 1}),
                             "from_chosen": dict(row.from_chosen)}
    return data


def _with_chosen(row: RowSpec, chosen: Mapping[str, Mapping[str, Any]]) -> RowSpec:
    """``row`` with its ``from_chosen`` parameters filled in from the earlier rows' validation choices."""
    if not row.from_chosen:
        return row
    values = {}
    for param, ref in row.from_chosen.items():
        source, _, key = ref.rpartition(".")
        if key not in chosen.get(source, {}):
            raise RecipeError(f"row {row.label}: from_chosen {param}: row {source!r} chose no {key!r} (it failed)")
        values[param] = chosen[source][key]
    return row.model_copy(update={"parameters": {**row.parameters, **values}})


def _summary(accuracy: dict[str, float], individual: dict[str, float], merged: list[str]) -> dict[str, Any]:
    mean = sum(accuracy[t] for t in merged) / len(merged)
    ratios = [accuracy[t] / individual[t] for t in merged if individual.get(t)]
    return {"average": round(mean, 4), "normalized_average": round(sum(ratios) / len(ratios), 4) if ratios else None}


@dataclass
class CompareResult:
    """Where the report went and its rows."""

    out_dir: Path
    report: dict[str, Any]

    def summary(self) -> str:
        """The table for the terminal."""
        return (self.out_dir / "table.md").read_text(encoding="utf-8") + f"\noutput: {self.out_dir}"


def run_compare(spec: CompareSpec | str | Path, out_dir: str | Path, *, overwrite: bool = False,
                progress: Progress | None = None) -> CompareResult:
    """Run every row of a compare spec and write report.json, table.md and plot.png into OUT (atomically)."""
    started = time.perf_counter()
    if not isinstance(spec, CompareSpec):
        spec = load_compare_spec(spec)
    threads = torch.get_num_threads()
    if spec.evaluation.threads:
        torch.set_num_threads(spec.evaluation.threads)
    try:
        return _run(spec, out_dir, overwrite, progress, started)
    finally:
        torch.set_num_threads(threads)


def _run(spec: CompareSpec, out_dir: str | Path, overwrite: bool, progress: Progress | None, started: float) -> CompareResult:
    from suture.merge.execute import resolve_device
    from suture.merge.writer import atomic_output_dir

    tasks = _load_tasks(spec)
    base = spec.path(spec.base)
    device = resolve_device(spec.evaluation.device)
    scorer = _Scorer.open(spec, tasks, device, progress)
    merged_names = [t.spec.name for t in tasks if not t.spec.heldout]
    heldout_names = [t.spec.name for t in tasks if t.spec.heldout]
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp, tempfile.TemporaryDirectory(prefix="suture-compare-") as work:
        work = Path(work)
        scorer.load_weights(base)
        for t in tasks:  # held-out probes: fitted once on the base encoder's features of the train split
            if t.spec.heldout:
                t.head = fit_probe(scorer.features(t, "train"), t.splits["train"].labels, t.classes, t.spec.name)
        base_scores = scorer.score("test")
        individual, rows = {}, []
        t0 = time.perf_counter()
        for t in tasks:
            if not t.spec.heldout:
                scorer.load_weights(spec.path(t.spec.model))
                individual.update({k: round(v, 4) for k, v in scorer.score("test", [t]).items()})
        individual_seconds = time.perf_counter() - t0
        listed = [r for r in spec.rows]
        chosen: dict[str, dict[str, Any]] = {}
        for i, row in enumerate(listed):
            if progress:
                progress("rows", i, len(listed), row.label)
            logger.info("row %d/%d: %s", i + 1, len(listed), row.label)
            with _PeakRSS() as mem:
                t0 = time.perf_counter()
                if row.method == "base":
                    result = {"accuracy": base_scores, "seconds_merge": 0.0}
                elif row.method == "individual":
                    result = {"accuracy": {**individual, **{h: base_scores[h] for h in heldout_names}}, "seconds_merge": 0.0}
                else:
                    try:
                        row = _with_chosen(row, chosen)
                        result = _merge_row(spec, i, row, tasks, scorer, work)
                    except RecipeError as exc:
                        result = {"error": f"RecipeError: {exc}", "seconds_merge": 0.0}
                chosen[row.label] = dict(result.get("chosen") or {})
                seconds = time.perf_counter() - t0 + (individual_seconds if row.method == "individual" else 0.0)
            entry = {"name": row.label, "method": row.method, "engine": row.engine, "parameters": row.parameters,
                     "needs": _needs(row, spec, tasks), **result,
                     "seconds_total": round(seconds, 2), "peak_rss_mb": round(mem.peak / 2**20, 1),
                     "peak_memory_mb": round((mem.peak - mem.start) / 2**20, 1)}
            if "accuracy" in result:
                entry.update(_summary(result["accuracy"], individual, merged_names))
                entry["heldout"] = {h: result["accuracy"][h] for h in heldout_names}
            rows.append(entry)
        if progress:
            progress("rows", len(listed), len(listed), "done")
        report = {
            "suture_version": __version__,
            "models": [str(spec.path(t.model)) for t in spec.merged_tasks],
            "compare": {
                "spec": spec.source, "base": str(base), "device": str(device),
                "tasks": [{"name": t.spec.name, "model": str(spec.path(t.spec.model)) if t.spec.model else None,
                           "heldout": t.spec.heldout, "classes": list(t.classes),
                           "sizes": {s: len(v) for s, v in t.splits.items()},
                           "head": "logistic-regression probe fitted on the base encoder's train features" if t.spec.heldout
                           else "the fine-tune's own head"} for t in tasks],
                "individual": individual,
                "selection": "grids are searched on the validation splits (mean accuracy over fine-tuned tasks); test scores only the chosen point",
                "rows": rows,
            },
            "seconds_total": round(time.perf_counter() - started, 2),
        }
        _write_outputs(tmp, report)
    out = Path(out_dir).expanduser().resolve()
    return CompareResult(out, report)


class RowScorer:
    """Scores merge rows of a compare spec one at a time, as ``suture compare`` does, for callers that choose the
    rows themselves (a merge search over the spec's fine-tunes): each call merges the row's recipe into a
    temporary folder and returns every fine-tuned task's accuracy on the requested splits, each with its own head.

    The evaluation model, tokenizer and task data are loaded once, so many rows cost one load. The caller sets
    torch's threads (``evaluation.threads`` is applied by ``run_compare`` only)."""

    def __init__(self, spec: CompareSpec | str | Path) -> None:
        from suture.merge.execute import resolve_device

        self.spec = spec if isinstance(spec, CompareSpec) else load_compare_spec(spec)
        self.tasks = [t for t in _load_tasks(self.spec) if not t.spec.heldout]
        self._scorer = _Scorer.open(self.spec, self.tasks, resolve_device(self.spec.evaluation.device))

    def score(self, row: RowSpec | Mapping[str, Any], splits: tuple[str, ...] = ("validation", "test")) -> dict[str, dict[str, float]]:
        """{split: {task: accuracy, ..., "average": mean}} of the row's merge (data-free rows; no grid)."""
        from suture.recipes.runner import RunOptions, run_recipe

        row = row if isinstance(row, RowSpec) else RowSpec.model_validate(dict(row))
        if row.data is not None or row.grid:
            raise RecipeError(f"row {row.label}: RowScorer scores one data-free point (no data:, no grid:)")
        with tempfile.TemporaryDirectory(prefix="suture-row-") as work:
            folder = Path(work) / "merged"
            run_recipe(row_recipe(self.spec, row, {}, data_files=None), folder, RunOptions(device=self.spec.evaluation.device))
            self._scorer.load_weights(folder)
        out = {}
        for split in splits:
            acc = self._scorer.score(split)
            out[split] = {**{k: round(v, 4) for k, v in acc.items()}, "average": round(sum(acc.values()) / len(acc), 4)}
        return out


def _data_files(row: RowSpec, tasks: list[_Task], work: Path) -> dict[str, Path] | None:
    if row.data is None:
        return None
    files = {}
    for t in tasks:
        if t.spec.heldout:
            continue
        if row.data.split not in t.splits:
            raise InputError(f"task {t.spec.name} has no {row.data.split} split for this row's data; give it a {row.data.split} file")
        split = t.splits[row.data.split]
        n = min(row.data.examples, len(split))
        files[t.spec.name] = write_split_file(work / f"{t.spec.name}-{row.data.split}-{n}.txt",
                                              TextSplit(split.texts[:n], split.labels[:n]), labels=row.data.labels)
    return files


def _merge_row(spec: CompareSpec, i: int, row: RowSpec, tasks: list[_Task], scorer: _Scorer, work: Path) -> dict[str, Any]:
    """Merge at every grid point (validation picks one), then score the chosen merge on test; errors are recorded."""
    from suture.recipes.runner import RunOptions, run_recipe

    points = row.points()
    merged = [t for t in tasks if not t.spec.heldout]
    best: tuple[float, int, Path] | None = None
    grid, seconds_merge = [], 0.0
    try:
        files = _data_files(row, tasks, work)
        for j, point in enumerate(points):
            recipe = row_recipe(spec, row, point, data_files=files)
            folder = work / f"row{i}-point{j}"
            t0 = time.perf_counter()
            run_recipe(recipe, folder, RunOptions(device=spec.evaluation.device, overwrite=True))
            seconds_merge += time.perf_counter() - t0
            if len(points) == 1:
                best = (float("nan"), j, folder)
                break
            scorer.load_weights(folder)
            val = scorer.score("validation", merged)
            average = sum(val.values()) / len(val)
            grid.append({"values": point, "validation": {k: round(v, 4) for k, v in val.items()}, "validation_average": round(average, 4)})
            logger.info("%s %s: validation average %.4f", row.label, point, average)
            if best is None or average > best[0]:
                if best is not None:
                    shutil.rmtree(best[2], ignore_errors=True)
                best = (average, j, folder)
            else:
                shutil.rmtree(folder, ignore_errors=True)
        assert best is not None
        scorer.load_weights(best[2])
        accuracy = scorer.score("test")
        shutil.rmtree(best[2], ignore_errors=True)
    except (SutureError, RuntimeError, ValueError) as exc:  # one method failing is a result of the comparison, not its end
        logger.warning("row %s failed: %s", row.label, exc)
        return {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())}", "seconds_merge": round(seconds_merge, 2), "grid": grid}
    return {"accuracy": {k: round(v, 4) for k, v in accuracy.items()}, "chosen": points[best[1]], "grid": grid,
            "recipe": row_recipe(spec, row, points[best[1]], data_files=None if files is None else {k: p.name for k, p in files.items()}),
            "seconds_merge": round(seconds_merge, 2)}


# --- outputs ---------------------------------------------------------------------------------------------


def _fmt(x: Any) -> str:
    return "—" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)


def _needs_text(needs: Mapping[str, Any]) -> str:
    text = needs["data"] if not needs.get("examples") else f"{needs['data']} ({needs['examples']})"
    sel = needs.get("selection")
    return text + (f"; val {sel['labelled_validation_examples']} × {sel['points']} pts" if sel else "")


def table_markdown(report: Mapping[str, Any]) -> str:
    """The report's rows as a Markdown table (accuracy per task, average, normalised, held-out, cost, needs)."""
    c = report["compare"]
    merged = [t["name"] for t in c["tasks"] if not t["heldout"]]
    held = [t["name"] for t in c["tasks"] if t["heldout"]]
    head = ["row", *merged, "average", "normalized", *[f"{h} (held out)" for h in held], "merge s", "total s", "peak MB", "needs", "chosen"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in c["rows"]:
        if "error" in r:
            lines.append("| " + " | ".join([r["name"], f"failed: {r['error'][:120]}"] + [""] * (len(head) - 2)) + " |")
            continue
        acc = r["accuracy"]
        chosen = ", ".join(f"{k}={v}" for k, v in (r.get("chosen") or {}).items()) or "—"
        cells = [r["name"], *[_fmt(acc[t]) for t in merged], _fmt(r["average"]), _fmt(r["normalized_average"]),
                 *[_fmt(acc[h]) for h in held], f"{r['seconds_merge']:.1f}", f"{r['seconds_total']:.1f}", f"{r['peak_memory_mb']:.0f}", _needs_text(r["needs"]), chosen]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_outputs(folder: Path, report: dict[str, Any]) -> None:
    from suture.merge.plot import plot_compare
    from suture.merge.report import write_report

    write_report(folder, report)
    (folder / "table.md").write_text(table_markdown(report), encoding="utf-8")
    c = report["compare"]
    rows = [r for r in c["rows"] if "error" not in r]
    if rows:
        held = [t["name"] for t in c["tasks"] if t["heldout"]]
        plot_compare({r["name"]: {"average": r["average"], **{f"{h} (held out)": r["accuracy"][h] for h in held}} for r in rows},
                     folder / "plot.png", individual=sum(c["individual"].values()) / len(c["individual"]))


__all__ = ["CompareResult", "CompareSpec", "RowScorer", "RowSpec", "TaskSpec", "load_compare_spec", "parse_compare_spec", "row_recipe",
           "run_compare", "table_markdown"]
