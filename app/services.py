"""Thin, cached calls from the app into merge / stitch / recipes. No algorithm lives here.

Expensive answers are cached per input (``st.cache_data`` for data, ``st.cache_resource`` for modules), so a
page that reruns because a plot option changed never recomputes a merge, an inspection or a similarity
matrix. Merge results are also cached on disk: a recipe's output folder is named by a hash of the recipe,
the device and the state of its local input files, and a finished folder is reused.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import streamlit as st

from suture.app.state import canonical, is_local_ref, recipe_yaml, referenced_refs, slug
from suture.app.workspace import Workspace, WorkspaceError
from suture.merge.errors import InputError, RecipeError, SutureError
from suture.merge.report import as_report, read_report
from suture.merge.store import read_json

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int, str], None]


# ---------------------------------------------------------------------------------------------- models


def resolve(ref: str) -> Path:
    """A local path for a model reference (demo models are trained once and cached, Hub ids downloaded)."""
    from suture.merge.refs import resolve_ref

    return Path(resolve_ref(ref))


def demo_ready(ref: str) -> bool:
    """Whether a ``demo:`` model is already trained and cached (True for any other reference)."""
    from suture.merge.refs import DEMO_MODELS, DEMO_PREFIX, cache_dir

    if not ref.startswith(DEMO_PREFIX):
        return True
    name = ref[len(DEMO_PREFIX):]
    if name not in DEMO_MODELS:
        return True  # resolving it raises the readable error
    # merge.zoo caches each demo model in <cache>/demo/<name>/ (the fine-tunes' base as finetune-base)
    folder = cache_dir() / "demo" / ("finetune-base" if name == "base" else name)
    return (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()


def model_stamp(ref: str) -> str:
    """A cache key part that changes when a local model's files change (empty for demo and Hub models)."""
    if not is_local_ref(ref):
        return ""
    path = Path(ref.split("@")[0]).expanduser()
    if not path.exists():
        return "missing"
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def check_ref(ref: str, workspace: Workspace) -> None:
    """Refuse a local model path outside the workspace (demo models and Hub ids pass)."""
    if is_local_ref(ref, workspace.root):
        path = ref.split("+")[0].split("@")[0]
        if not Path(path).is_absolute():
            path = str(workspace.root / path)
        workspace.resolve(path, must_exist=True)


def confine_data(spec: Any, workspace: Workspace) -> Any:
    """A data spec whose file (if any) lies inside the workspace, made absolute; bundled sklearn data passes."""
    return workspace.confine_data(spec, must_exist=True)


TRUST_TOGGLE = "Trust code named by models (trust_remote_code)"
# (section, sub-section) of every data spec a recipe reads; None: the section itself holds `data`
_DATA_KEYS = (("alignment", None), ("evaluate", None), ("stitch", "anchors"), ("stitch", "head"), ("stitch", "evaluate"))


def _model_paths(recipe: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(key, reference) of every model a recipe reads: models, base models, slices, tokenizer sources, LoRA, stitch."""
    from suture.recipes.runner import load
    from suture.recipes.schema import ModelRef

    r = load(dict(recipe))
    found: list[tuple[str, ModelRef]] = [("models", ref) for ref in r.referenced_models()]
    if isinstance(r.tokenizer_source, ModelRef):
        found.append(("tokenizer_source", r.tokenizer_source))
    if r.tokenizer is not None:
        if isinstance(r.tokenizer.source, ModelRef):
            found.append(("tokenizer.source", r.tokenizer.source))
        for token, setting in (r.tokenizer.tokens or {}).items():
            src = getattr(setting, "source", None)
            ref = src if isinstance(src, ModelRef) else getattr(src, "model", None)
            if isinstance(ref, ModelRef):
                found.append((f"tokenizer.tokens[{token!r}].source", ref))
    out = [(key, ref.path) for key, ref in found] + [(f"{key} (LoRA)", ref.lora.path) for key, ref in found if ref.lora is not None]
    stitch = recipe.get("stitch")
    if isinstance(stitch, Mapping):
        out += [(f"stitch.{side}.model", str(stitch[side]["model"])) for side in ("source", "target")
                if isinstance(stitch.get(side), Mapping) and stitch[side].get("model")]
    return out


def _data_specs(recipe: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(key, spec) of every data set a recipe reads (alignment, evaluate, stitch anchors/head/evaluate)."""
    out = []
    for section, sub in _DATA_KEYS:
        node = recipe.get(section)
        if sub is not None:
            node = node.get(sub) if isinstance(node, Mapping) else None
        if isinstance(node, Mapping) and node.get("data") is not None:
            out.append((f"{section}.{sub}.data" if sub else f"{section}.data", node["data"]))
    return out


def workspace_module(ref: str, workspace: Workspace) -> bool:
    """Whether a factory reference's module file lies inside the workspace (found without importing it)."""
    import importlib.util
    import sys

    top = str(ref).partition(":")[0].split(".")[0]
    if not top.isidentifier():
        return False
    try:
        # a top-level name is located by the import finders without running any of its code
        spec = sys.modules[top].__spec__ if top in sys.modules else importlib.util.find_spec(top)
    except (ImportError, ValueError, AttributeError):
        return False
    if spec is None:
        return False
    places = [spec.origin] if spec.origin and spec.origin not in ("built-in", "frozen") else list(spec.submodule_search_locations or [])
    return bool(places) and all(workspace.contains(p) for p in places)


def check_architecture(recipe: Mapping[str, Any], workspace: Workspace, *, trust_remote_code: bool = False) -> None:
    """Refuse, before anything is imported, a recipe architecture outside the zoo and the workspace (unless trusted)."""
    from suture.merge.errors import UntrustedCodeError
    from suture.merge.zoo import TRUST_HINT, is_zoo_factory

    if recipe.get("trust_remote_code") and not trust_remote_code:
        raise UntrustedCodeError(f"recipe key trust_remote_code: the app runs code named by models only with the toggle "
                                 f"{TRUST_TOGGLE!r}")
    arch = recipe.get("architecture")
    factory = arch.get("factory") if isinstance(arch, Mapping) else arch
    if factory is None or trust_remote_code or is_zoo_factory(factory) or workspace_module(factory, workspace):
        return
    raise UntrustedCodeError(f"recipe key architecture: factory {factory!r} is neither one of Suture's zoo factories nor a "
                             f"module in the workspace {workspace.root}; turn on {TRUST_TOGGLE!r} if you trust it")


def check_recipe_paths(recipe: Mapping[str, Any], workspace: Workspace, *, trust_remote_code: bool = False) -> None:
    """Refuse a recipe that reads a model, data file or module outside the workspace (each error names its key)."""
    checks = [(key, lambda ref=ref: check_ref(ref, workspace)) for key, ref in _model_paths(recipe)]
    checks += [(key, lambda spec=spec: confine_data(spec, workspace)) for key, spec in _data_specs(recipe)]
    for key, check in checks:
        try:
            check()
        except WorkspaceError as exc:
            raise WorkspaceError(f"recipe key {key}: {exc}") from None
    check_architecture(recipe, workspace, trust_remote_code=trust_remote_code)


@st.cache_data(show_spinner=False, max_entries=64)
def inspect_model(ref: str, stamp: str = "", groups: bool = False) -> dict[str, Any]:
    """Tensors, size, dtype mix and family of a model (and its permutation groups when asked)."""
    from suture.recipes.inspect import inspect_model as describe

    info = describe(str(resolve(ref)), groups=False)
    info["model"] = ref
    if groups:
        info["groups"] = permutation_groups(info["path"])
    return info


def permutation_groups(path: str) -> list[dict[str, Any]] | dict[str, str]:
    """Permutation groups of a stored model, or {"error": why} when they cannot be derived here."""
    from suture.merge.derive import spec_for_store
    from suture.merge.store import open_store

    store = open_store(path)
    try:
        return spec_for_store(store).describe()
    except SutureError as exc:
        return {"error": str(exc)}
    finally:
        store.close()


def compatibility(infos: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Which kind of pair (or set) the chosen models are, and which engines apply to it."""
    if len(infos) < 2:
        return {"verdict": "choose at least two models", "kind": None, "engines": [], "differences": []}
    shapes = [{t["name"]: tuple(t["shape"]) for t in info["tensors"]} for info in infos]
    first = shapes[0]
    same_names = all(set(s) == set(first) for s in shapes[1:])
    differences = []
    for name in sorted(set().union(*shapes)):
        found = [s.get(name) for s in shapes]
        if len(set(found)) > 1:
            differences.append({"tensor": name, **{info["model"]: (list(f) if f else "missing") for info, f in zip(infos, found)}})
    if same_names and not differences:
        return {
            "kind": "same",
            "verdict": "same architecture: every tensor has the same name and shape",
            "engines": ["merge methods (all)"] + [e["name"] for e in engines() if "same" in e["applies_to"]],
            "differences": [],
        }
    if same_names:
        return {
            "kind": "widths",
            "verdict": "different widths: same tensors, some shapes differ",
            "engines": [f"{e['name']} ({e['title']})" for e in engines() if "widths" in e["applies_to"]] + ["stitching"],
            "differences": differences,
        }
    from suture.merge.layers import num_layers

    depths = [num_layers(list(s), None) for s in shapes]
    kind = "depths" if len(set(depths)) > 1 else "architectures"
    verdict = (
        f"different depths ({', '.join(str(d) for d in depths)} layers)" if kind == "depths"
        else "different architectures: tensor names differ"
    )
    return {
        "kind": kind,
        "verdict": verdict,
        "engines": ["stitching", "slices (passthrough stacking of layer ranges)"] if kind == "depths" else ["stitching"],
        "differences": differences,
    }


# ---------------------------------------------------------------------------------------------- methods & engines


@st.cache_data(show_spinner=False)
def methods() -> dict[str, dict[str, Any]]:
    """The merge-method registry as plain data: parameters (name, default, required, help), paper, summary."""
    from suture.merge.methods import get_method, list_methods

    out = {}
    for name in list_methods():
        m = get_method(name)
        out[name] = {
            "summary": m.summary,
            "paper": m.paper,
            "uses_base": m.uses_base,
            "requires_base": m.requires_base,
            "min_models": m.min_models,
            "max_models": m.max_models,
            "global": [_param(p) for p in m.global_params],
            "model": [_param(p) for p in m.model_params],
        }
    return out


def _param(p: Any) -> dict[str, Any]:
    """A parameter as the form needs it; its help ends with the range the registry enforces."""
    help_text = f"{p.help} (must be {p.bounds})" if p.bounds else p.help
    return {"name": p.name, "default": p.default, "required": p.required, "help": help_text, "bounds": p.bounds}


def runner_engines() -> set[str]:
    """Engine names the recipe runner accepts in `alignment: {engine: ...}` (the engine registry)."""
    from suture.merge.align.engines import list_engines

    return {e.name for e in list_engines()}


def alignment_defaults() -> dict[str, Any]:
    """Default values of the settings every engine's `alignment:` section shares."""
    from suture.merge.align.engines import AlignmentOptions

    return {name: f.default for name, f in AlignmentOptions.model_fields.items() if name != "engine"}


def common_alignment_keys() -> set[str]:
    """Settings shared by every engine (kept when the form switches engines)."""
    from suture.merge.align.engines import COMMON_OPTIONS

    return set(COMMON_OPTIONS)


def engines() -> list[dict[str, Any]]:
    """Every registered engine as plain data: title, papers, what it needs and what it returns."""
    from suture.merge.align.engines import list_engines
    from suture.merge.card import engine_papers

    return [{"name": e.name, "title": e.title, "needs_data": e.needs_data, "applies_to": e.applies_to,
             "outcome": e.outcome, "builds_model": e.outcome == "built", "papers": engine_papers(e.name)}
            for e in list_engines()]


def engine_options(engine: str) -> list[dict[str, Any]]:
    """The form for an engine, from its Options' JSON schema: its own settings, then the shared ones it shows."""
    from suture.app.forms import form_fields
    from suture.merge.align.engines import COMMON_OPTIONS, find_engine

    found = find_engine(engine)
    if found is None:
        return []
    own = [n for n in found.options.model_fields if n not in COMMON_OPTIONS]
    return [w.as_dict() for w in form_fields(found.options.model_json_schema(), own + list(found.form_common))]


def engine_value_problem(engine: str, name: str, value: Any) -> str | None:
    """Why `value` does not fit an engine's option (its pydantic Options decide), or None when it fits."""
    from suture.app.forms import field_problem
    from suture.merge.align.engines import find_engine

    found = find_engine(engine)
    if found is None or name not in found.options.model_fields:
        return None
    return field_problem(found.options, name, value)


def method_value_problem(method: str, name: str, value: Any) -> str | None:
    """Why `value` does not fit a merge method's parameter (the method registry decides), or None when it fits."""
    from suture.merge.methods import get_method

    return get_method(method).value_problem(name, value)


def devices() -> list[str]:
    """Devices the merge may run on here."""
    import torch

    return ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---------------------------------------------------------------------------------------------- running


@dataclass
class MergeOutcome:
    """A finished merge: its folder, files, report, and whether it was reused from an earlier run."""

    out_dir: Path
    files: list[str]
    report: dict[str, Any] = field(default_factory=dict)
    cached: bool = False

    @property
    def problem(self) -> str | None:
        """Why the finished folder is not a good result (NaN/Inf output tensors), or None: shown as a failure."""
        return as_report(self.report).non_finite_problem()

    def as_dict(self) -> dict[str, Any]:
        """Plain data for session state."""
        return {"out_dir": str(self.out_dir), "files": list(self.files), "report": dict(self.report), "cached": self.cached,
                "problem": self.problem}


def output_dir_for(recipe: Mapping[str, Any], workspace: Workspace, device: str) -> Path:
    """outputs/<name>-<hash>: the hash covers the recipe, the device and the local input files' state."""
    text = recipe_yaml(recipe)
    stamps = [f"{ref}={model_stamp(ref)}" for ref in referenced_refs(recipe)]
    digest = hashlib.sha256("\n".join([text, device, *stamps]).encode()).hexdigest()[:10]
    return workspace.outputs / f"{slug(recipe.get('name'), 'merge')}-{digest}"


def run_merge(
    recipe: Mapping[str, Any],
    workspace: Workspace,
    *,
    device: str = "auto",
    progress: Progress | None = None,
    recompute: bool = False,
    trust_remote_code: bool = False,
) -> MergeOutcome:
    """Run the recipe into the workspace (publishing is left to the Publish page); reuse a finished result.

    `trust_remote_code` is the app's explicit toggle; a recipe's own `trust_remote_code: true` never grants it.
    """
    from suture.recipes.runner import RunOptions, run_recipe

    data = canonical(recipe)
    check_recipe_paths(data, workspace, trust_remote_code=trust_remote_code)
    data.pop("publish", None)  # the Publish page pushes explicitly, with the token the user gives there
    out = output_dir_for(data, workspace, device)
    if (out / "report.json").is_file() and not recompute:
        logger.info("reusing %s", out)
        files = sorted(p.name for p in out.iterdir() if p.is_file())
        return MergeOutcome(out, files, read_report(out).to_json(), cached=True)
    options = RunOptions(device=device, overwrite=out.exists(), trust_remote_code=trust_remote_code)
    result = run_recipe(data, out, options, progress=progress)
    return MergeOutcome(result.out_dir, sorted(result.files), result.report, cached=False)


def start_merge_job(
    recipe: Mapping[str, Any],
    workspace: Workspace,
    *,
    device: str = "auto",
    recompute: bool = False,
    trust_remote_code: bool = False,
):
    """Check the recipe here (paths, trust), then run it as a background job (app/jobs.py) into the folder
    :func:`run_merge` would use; a finished folder is reused as a job that ends at once."""
    from suture.app.jobs import JobStore

    data = canonical(recipe)
    check_recipe_paths(data, workspace, trust_remote_code=trust_remote_code)
    data.pop("publish", None)  # the Publish page pushes explicitly, with the token the user gives there
    out = output_dir_for(data, workspace, device)
    store = JobStore(workspace.root)
    label = data.get("name") or data.get("merge_method") or (data.get("alignment") or {}).get("engine") or "recipe"
    if (out / "report.json").is_file() and not recompute:
        return store.record_reused(data, out, label=label)
    return store.start(data, out, label=label, device=device, overwrite=out.exists(), trust_remote_code=trust_remote_code)


def finished_run(out_dir: str | Path, *, cached: bool = False) -> dict[str, Any]:
    """What the result panels show for a finished output folder (the `LAST_RUN` entry)."""
    out = Path(out_dir)
    outcome = MergeOutcome(out, sorted(p.name for p in out.iterdir() if p.is_file()), read_report(out).to_json(), cached=cached)
    return outcome.as_dict()


def alignment_objective(report: Mapping[str, Any]) -> dict[str, list[float]]:
    """The alignment objective per iteration for each aligned model ({model: [values]}), when reported."""
    section = report.get("alignment")
    if not isinstance(section, Mapping):
        return {}
    out: dict[str, list[float]] = {}
    models = section.get("models")
    entries = models.items() if isinstance(models, Mapping) else [(section.get("engine", "alignment"), section)]
    for label, entry in entries:
        if not isinstance(entry, Mapping):
            continue
        for key in ("objective_per_iteration", "objective_history", "objective"):
            values = entry.get(key)
            if isinstance(values, list) and values and all(isinstance(v, (int, float)) for v in values):
                out[str(label)] = [float(v) for v in values]
                break
    return out


def evaluation_section(report: Mapping[str, Any]) -> Mapping[str, Any]:
    """The report's evaluation (endpoints, merged model, interpolation curves, barriers), or {}."""
    section = report.get("evaluation") or report.get("evaluate")
    return section if isinstance(section, Mapping) else {}


def interpolation_curves(report: Mapping[str, Any]) -> dict[str, list[dict[str, float]]]:
    """Labelled interpolation curves ({label: [{t, loss, accuracy}, ...]}) from the report's evaluation."""
    section = evaluation_section(report)
    curves = section.get("curves")
    if isinstance(curves, Mapping):
        return {str(k): list(v) for k, v in curves.items() if isinstance(v, list) and v and isinstance(v[0], Mapping) and "t" in v[0]}
    return {}


def evaluation_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Loss/accuracy of every input and of the merge, from the report's evaluation ([] when absent)."""
    section = evaluation_section(report)
    rows = [{"model": str(k), **{m: float(v) for m, v in vals.items()}} for k, vals in (section.get("models") or {}).items()
            if isinstance(vals, Mapping)]
    if isinstance(section.get("merged"), Mapping):
        rows.append({"model": "merged", "merged": True, **{m: float(v) for m, v in section["merged"].items()}})
    return rows


BARRIER_COLUMNS = {"loss": "loss barrier", "loss_midpoint": "loss barrier (midpoint)", "accuracy": "accuracy barrier"}


def barrier_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Loss/accuracy barriers per interpolation path (naive, aligned), with the midpoint accuracy.

    Columns name the barrier they hold (the rise above the endpoints' line, Frankle et al. 2020); float noise
    around zero (|x| < 1e-6, an exact endpoint match) is shown as 0 rather than as a tiny improvement.
    """
    from suture.merge.evaluate import shown_barrier

    section = evaluation_section(report)
    mids = section.get("midpoint_accuracy") or {}
    return [{"path": str(label),
             **{BARRIER_COLUMNS.get(k, k): shown_barrier(v) if k in BARRIER_COLUMNS else v for k, v in b.items() if v is not None},
             **({"midpoint accuracy": mids[label]} if label in mids else {})}
            for label, b in (section.get("barriers") or {}).items() if isinstance(b, Mapping)]


def transport_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """OT's per-group transport figures (cost, entropy, sizes, convergence) for every transported model."""
    section = report.get("alignment")
    if not isinstance(section, Mapping) or not isinstance(section.get("models"), Mapping):
        return []
    rows = []
    for model, entry in section["models"].items():
        per_group = entry.get("per_group") if isinstance(entry, Mapping) else None
        if not isinstance(per_group, Mapping):
            continue
        for group, stats in per_group.items():
            if isinstance(stats, Mapping):
                rows.append({"model": str(model), "group": str(group),
                             **{k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool))}})
    return rows


def zipit_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Joint accuracy of the ZipIt output beside its baselines and the ensemble (rows ordered for a table)."""
    section = evaluation_section(report)
    if not isinstance(section.get("ensemble"), Mapping):
        return []
    rows = [{"model": "zipit (this recipe)", "merged": True, **section["merged"]}]
    rows += [{"model": label, **vals} for label, vals in (section.get("baselines") or {}).items() if isinstance(vals, Mapping)]
    rows.append({"model": "ensemble (upper bound)", **section["ensemble"]})
    return [{k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v) for k, v in r.items()} for r in rows]


def stop_sweep_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Joint loss/accuracy for each ZipIt stop layer (full zip first), from the report."""
    sweep = evaluation_section(report).get("stop_sweep")
    return [dict(r) for r in sweep if isinstance(r, Mapping)] if isinstance(sweep, list) else []


def zip_group_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per zipped group: width, merges within each model, mean similarity of the matched features."""
    groups = (report.get("alignment") or {}).get("groups")
    if not isinstance(groups, Mapping):
        return []
    return [{"group": str(g), "size": v.get("size"), "within-model merges": ", ".join(str(n) for n in v.get("within_merges") or []),
             "mean similarity": v.get("mean_similarity")} for g, v in groups.items() if isinstance(v, Mapping)]


def permutation_matrices(name: str, perm: Any) -> dict[str, Any]:
    """0/1 matrices of one group's permutation (aligned unit i is the other model's unit perm[i]); a split
    attention group's 2-row permutation gives one matrix per part, ``<group> (Q/K)`` and ``<group> (V/O)``."""
    import torch

    rows = {name: perm} if perm.dim() == 1 else {f"{name} (Q/K)": perm[0], f"{name} (V/O)": perm[1]}
    out = {}
    for label, row in rows.items():
        n = int(row.numel())
        matrix = torch.zeros(n, n, dtype=torch.float32)
        matrix[torch.arange(n), row.cpu().long()] = 1.0
        out[label] = matrix.numpy()
    return out


@st.cache_data(show_spinner=False, max_entries=8)
def alignment_matrices(recipe_text: str, device: str = "cpu", stamps: str = "") -> dict[str, Any]:
    """The alignment of a recipe recomputed: per group, reference units x other model's units (permutation or transport).

    Returns ``{"model": key, "reference": key, "kind": "permutation"|"transport", "groups": {group: ndarray}}``.
    Runs the same library step the recipe runner runs (cached, so a plot option never recomputes it).
    """
    from suture.merge.execute import resolve_device
    from suture.recipes.runner import load, open_models, reference_key
    from suture.recipes.schema import ModelRef
    from suture.recipes.sections import parse_alignment, parse_evaluate
    from suture.recipes.steps import recipe_architecture, run_alignment
    from suture.merge.align.engines import find_engine

    recipe = load(recipe_text)
    section = parse_alignment(recipe.alignment, recipe.where)
    if section is None or find_engine(section.engine).outcome == "built":
        raise InputError("the recipe has no permutation or transport alignment to show")
    evaluation = parse_evaluate(recipe.evaluate, recipe.where)
    models = open_models(recipe)
    try:
        # the same reference the runner aligns to
        reference = str(ModelRef.parse(section.reference)) if section.reference else reference_key(recipe)
        outcome = run_alignment(section, models.stores, reference, recipe_architecture(recipe.architecture, section),
                                resolve_device(device), fallback_data=evaluation.data if evaluation else None)
        if outcome.fused:
            raise InputError("the models were fused layer by layer (different depths): there is no one matrix per group")
        key, result = next(iter(outcome.results.items()))
        groups: dict[str, Any] = {}
        if hasattr(result, "plans"):
            kind = "transport"
            for name, plan in result.plans.items():
                groups[name] = plan.detach().double().T.cpu().numpy()  # rows: reference units
        else:
            kind = "permutation"
            for name, perm in result.perms.items():
                groups.update(permutation_matrices(name, perm))
        return {"model": key, "reference": outcome.reference, "kind": kind, "groups": groups}
    finally:
        for store in models.stores.values():
            store.close()


# ---------------------------------------------------------------------------------------------- evaluation


def runnable(ref_or_path: str) -> bool:
    """Whether the app can rebuild the model as a module (a zoo model: config.json names its architecture)."""
    from suture.merge.zoo import ARCH_KEY

    if ref_or_path.startswith("demo:"):
        from suture.merge.refs import DEMO_MODELS

        # every demo model is a zoo model: answering must not train it
        return ref_or_path[len("demo:"):] in DEMO_MODELS
    try:
        path = resolve(ref_or_path) if not Path(ref_or_path).exists() else Path(ref_or_path)
    except SutureError:
        return False
    config = (path if path.is_dir() else path.parent) / "config.json"
    try:
        return ARCH_KEY in read_json(config)
    except SutureError:
        return False


@st.cache_resource(show_spinner=False, max_entries=16)
def module(path: str, stamp: str = "", trust_remote_code: bool = False):
    """A model rebuilt from its folder (architecture from config.json), in eval mode.

    A factory outside Suture's zoo is refused unless the app's trust toggle is on.
    """
    from suture.merge.zoo import load_module

    return load_module(path, trust_remote_code=trust_remote_code)


@st.cache_data(show_spinner=False, max_entries=32)
def dataset(spec: str, split: str = "test", max_items: int | None = None):
    """Evaluation/calibration data from a spec (e.g. sklearn:digits, sklearn:digits?classes=0-4)."""
    from suture.merge.data import load_dataset

    return load_dataset(spec, split=split, max_items=max_items)


@st.cache_data(show_spinner=False, max_entries=128)
def evaluate(ref_or_path: str, data_spec: str, stamp: str = "", trust_remote_code: bool = False) -> dict[str, float]:
    """Loss and accuracy of a runnable model on the test split of a dataset."""
    from suture.merge.evaluate import evaluate as run_eval

    path = Path(ref_or_path) if Path(ref_or_path).exists() else resolve(ref_or_path)
    return run_eval(module(str(path), stamp, trust_remote_code), dataset(data_spec, "test"))


# ---------------------------------------------------------------------------------------------- stitching


@st.cache_data(show_spinner=False, max_entries=32)
def layer_features(ref: str, data_spec: str, split: str = "test", max_items: int = 512, stamp: str = "") -> tuple[list[str], list[Any]]:
    """Hidden features (samples x units) at every permutation group's tap of a runnable model."""
    import torch

    from suture.merge.activations import group_taps
    from suture.merge.measure import capture, tap_site

    # a private copy: hooks on the shared cached module could see another session's forward pass
    net = copy.deepcopy(module(str(resolve(ref)), stamp))
    data = dataset(data_spec, split, max_items)
    taps = group_taps(net, data.inputs[:2])
    if not taps:
        raise InputError(f"{ref}: no hidden layers were found to compare")
    with capture(net, {group: tap_site(group_taps_[0]) for group, group_taps_ in taps.items()}) as captured, torch.no_grad():
        net(data.inputs)
    names = [g for g in taps if g in captured]
    return names, [captured[g].numpy() for g in names]


@st.cache_data(show_spinner=False, max_entries=32)
def similarity_matrix(ref_a: str, ref_b: str, data_spec: str, metric: str = "cka", max_items: int = 512) -> dict[str, Any]:
    """Layer-by-layer similarity of two models on the same inputs (rows: A's layers, columns: B's)."""
    from suture.stitch.similarity import METRICS, layer_similarity_matrix

    names_a, feats_a = layer_features(ref_a, data_spec, "test", max_items, model_stamp(ref_a))
    names_b, feats_b = layer_features(ref_b, data_spec, "test", max_items, model_stamp(ref_b))
    matrix = layer_similarity_matrix(feats_a, feats_b, metric)
    return {"matrix": matrix.numpy(), "rows": names_a, "cols": names_b, "metric": metric,
            "higher_is_more_similar": METRICS[metric].higher_is_more_similar, "samples": int(feats_a[0].shape[0])}


def metrics_catalogue() -> dict[str, str]:
    """Similarity metrics and their one-line descriptions."""
    from suture.stitch.similarity import METRICS

    return {name: m.description for name, m in METRICS.items()}


def translators() -> list[str]:
    """Latent translation estimators, plus relative representations."""
    from suture.stitch.translate import TRANSLATORS

    return list(TRANSLATORS) + ["relative"]


@st.cache_data(show_spinner=False, max_entries=32)
def stitch_fit(ref_a: str, layer_a: str, ref_b: str, layer_b: str, data_spec: str, method: str, anchors: int, seed: int = 0) -> dict[str, float]:
    """Fit a map from A's features at the cut to B's on anchors (train split); score it on the test split."""
    import torch

    from suture.stitch.anchors import select_anchors

    names_a, tr_a = layer_features(ref_a, data_spec, "train", 100_000, model_stamp(ref_a))
    names_b, tr_b = layer_features(ref_b, data_spec, "train", 100_000, model_stamp(ref_b))
    _, te_a = layer_features(ref_a, data_spec, "test", 100_000, model_stamp(ref_a))
    _, te_b = layer_features(ref_b, data_spec, "test", 100_000, model_stamp(ref_b))
    if layer_a not in names_a or layer_b not in names_b:
        raise InputError(f"cut {layer_a!r} / {layer_b!r}: expected one of {names_a} and {names_b}")
    xa, xb = torch.from_numpy(tr_a[names_a.index(layer_a)]), torch.from_numpy(tr_b[names_b.index(layer_b)])
    ya, yb = torch.from_numpy(te_a[names_a.index(layer_a)]), torch.from_numpy(te_b[names_b.index(layer_b)])
    labels = dataset(data_spec, "train").labels
    idx = select_anchors("stratified" if labels is not None else "random", anchors, labels=labels, n=xa.shape[0], seed=seed)
    if method == "relative":
        from suture.stitch.relative import RelativeProjector

        rel_a = RelativeProjector().fit(xa[idx]).transform(ya).double()
        rel_b = RelativeProjector().fit(xb[idx]).transform(yb).double()
        cos = torch.nn.functional.cosine_similarity(rel_a, rel_b, dim=1)
        return {"anchors": float(len(idx)), "mean cosine (relative A vs B)": float(cos.mean()), "test samples": float(ya.shape[0])}
    from suture.stitch.translate import TRANSLATORS

    translator = TRANSLATORS[method]().fit(xa[idx], xb[idx])
    pred = translator.transform(ya).double()
    target = yb.double()
    resid = float((pred - target).pow(2).sum())
    total = float((target - target.mean(0)).pow(2).sum())
    cos = torch.nn.functional.cosine_similarity(pred, target, dim=1)
    return {"anchors": float(len(idx)), "R² (translated A vs B)": 1.0 - resid / max(total, 1e-30),
            "mean cosine (translated A vs B)": float(cos.mean()), "test samples": float(ya.shape[0])}


def stitch_output_dir(section: Mapping[str, Any], workspace: Workspace, device: str) -> Path:
    """outputs/stitch-<hash of the section and device>: one folder per stitch, reused when finished."""
    text = json.dumps(section, sort_keys=True, default=str)
    return workspace.outputs / f"stitch-{hashlib.sha256(chr(10).join([text, device]).encode()).hexdigest()[:10]}"


def start_stitch_job(section: Mapping[str, Any], workspace: Workspace, *, device: str = "cpu", recompute: bool = False,
                     trust_remote_code: bool = False):
    """Check a `stitch:` section's paths here, then run it as a background ``stitch`` job: the worker runs the recipe
    ``{stitch: section}`` through the recipe runner (atomic output folder, report, card), as ``suture run`` would."""
    from suture.app.jobs import STITCH, JobStore

    recipe = {"stitch": dict(section)}
    check_recipe_paths(recipe, workspace, trust_remote_code=trust_remote_code)
    out = stitch_output_dir(section, workspace, device)
    store = JobStore(workspace.root)
    sides = [str((section.get(side) or {}).get("model", "?")) for side in ("source", "target")]
    label = f"stitch ({section.get('method')}): {sides[0]} → {sides[1]}"
    if (out / "report.json").is_file() and not recompute:
        return store.record_reused(recipe, out, label=label, kind=STITCH)
    return store.start(recipe, out, label=label, device=device, overwrite=out.exists(), trust_remote_code=trust_remote_code,
                       kind=STITCH)


def finished_stitch(out_dir: str | Path, *, cached: bool = False) -> dict[str, Any]:
    """What the Stitch page shows for a finished stitch folder: its folder and report."""
    return {"out_dir": str(out_dir), "report": read_report(Path(out_dir)).to_json(), "cached": cached}


def run_stitch(section: Mapping[str, Any], workspace: Workspace, *, device: str = "cpu", progress: Progress | None = None,
               recompute: bool = False, trust_remote_code: bool = False) -> dict[str, Any]:
    """Run a `stitch:` section into outputs/stitch-<hash> (a finished folder is reused); returns out_dir and report.

    Its models and data files must lie in the workspace (or be demo/Hub models and bundled data).
    """
    from suture.recipes.stitch_section import run_stitch as execute

    check_recipe_paths({"stitch": dict(section)}, workspace, trust_remote_code=trust_remote_code)
    out = stitch_output_dir(section, workspace, device)
    if (out / "report.json").is_file() and not recompute:
        return {"out_dir": str(out), "report": read_report(out).to_json(), "cached": True}
    report = execute(dict(section), out, device=device, progress=progress, trust_remote_code=trust_remote_code)
    return {"out_dir": str(out), "report": report, "cached": False}


# ---------------------------------------------------------------------------------------------- publishing


def env_token() -> str | None:
    """A Hugging Face token from the environment or the huggingface_hub login (never shown)."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(name):
            return os.environ[name]
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # no login stored, or an old client
        return None


def split_card(text: str) -> tuple[str, str]:
    """(front matter YAML, markdown body) of a model card."""
    if text.startswith("---\n"):
        end = text.find("\n---", 4)
        if end != -1:
            return text[4:end].strip(), text[end + 4:].lstrip("\n")
    return "", text


def matching_layer(layer_a: str, layers_a: Sequence[str], layers_b: Sequence[str]) -> str:
    """Model B's cut that goes with A's: the layer of the same name, else the one at the same depth (the last
    when B is shallower)."""
    if layer_a in layers_b:
        return layer_a
    depth = list(layers_a).index(layer_a) if layer_a in layers_a else 0
    return list(layers_b)[min(depth, len(layers_b) - 1)]


def stitch_result_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The stitch run's scores, one row per model or method: the chosen method's row is marked rather than
    repeated (the report also stores it under "stitch")."""
    results = (report.get("evaluate") or {}).get("results") or {}
    chosen = report.get("method")
    return [{"model": f"{k} (chosen)" if k == chosen else k, **{m: v for m, v in r.items() if not isinstance(v, (dict, list))}}
            for k, r in results.items() if isinstance(r, Mapping) and not (k == "stitch" and chosen in results)]


@st.cache_data(show_spinner=False, max_entries=32)
def stage_names(ref: str, stamp: str = "", trust_remote_code: bool = False) -> list[str]:
    """The names of a model's stages as the stitch cuts it (``layers.0``, ``layers.1``... for a zoo MLP; an encoder's
    blocks as ``encoder.layer.0``...): cutting "at layers.1" keeps the features leaving that module."""
    from suture.stitch.features import load_chain

    chain = load_chain(str(resolve(ref)), trust_remote_code=trust_remote_code)
    if chain.kind == "hf":
        return [f"encoder.layer.{k}" for k in range(chain.num_layers)]
    return list(chain.names)


def cut_choices(names: Sequence[str], *, encoder: bool = False) -> list[str]:
    """Where a model can be cut: after any stage but the last (its output) for a torch model, any block of an encoder."""
    return list(names) if encoder or len(names) < 2 else list(names[:-1])


def layer_name(names: Sequence[str], index: Any) -> str:
    """The stitch pipeline's representation index (features after the first `index` stages) as the stage's name."""
    if isinstance(index, int) and 0 < index <= len(names):
        return names[index - 1]
    return "input" if index == 0 else str(index)


def format_cut(row: Mapping[str, Any], names_a: Sequence[str] = (), names_b: Sequence[str] = ()) -> dict[str, Any]:
    """A planner row as the page shows it: the cut in A and B by module name, figures rounded to 3 decimals."""
    out: dict[str, Any] = {"cut in A": layer_name(names_a, row.get("source_layer")), "cut in B": layer_name(names_b, row.get("target_layer"))}
    for key, name in (("accuracy", "stitched accuracy"), ("f1_macro", "macro F1"), ("cka", "CKA")):
        value = row.get(key)
        out[name] = f"{value:.3f}" if isinstance(value, (int, float)) else "—"
    if row.get("error"):
        out["error"] = str(row["error"])
    return out


_CARD_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


def card_parts(body: str) -> list[tuple[str, str]]:
    """A card body cut at its relative image links: [("text", markdown) | ("image", relative path)], in order.

    The Hub shows `![plot](interpolation.png)` from the repository; a local preview has to load the file itself.
    Absolute URLs stay in the markdown (the app never fetches them, and the card never writes them).
    """
    parts: list[tuple[str, str]] = []
    at = 0
    for match in _CARD_IMAGE.finditer(body):
        target = match.group(1)
        if "://" in target or target.startswith("/"):
            continue
        parts += [("text", body[at:match.start()]), ("image", target)]
        at = match.end()
    return parts + [("text", body[at:])]


def start_push_job(out_dir: str | Path, workspace: Workspace, repo_id: str, *, private: bool, token: str | None):
    """Push a finished, good output folder to the Hub as a background ``publish`` job (token via the worker's
    environment only). A folder outside the workspace or one whose weights or losses are not finite is refused."""
    from suture.app.jobs import JobStore
    from suture.app.results import summarize

    folder = workspace.resolve(out_dir, must_exist=True)
    problem = summarize(folder, read_report(folder).to_json()).problem
    if problem:
        raise InputError(f"{workspace.relative(folder)}: not published: {problem}")
    if not token:
        from suture.merge.hub import LOGIN_HINT

        raise InputError(f"cannot publish {repo_id}: no Hugging Face token; {LOGIN_HINT}")
    return JobStore(workspace.root).start_publish(folder, repo_id, private=private, token=token,
                                                  label=f"publish {workspace.relative(folder)} → {repo_id}")


def push(out_dir: str | Path, repo_id: str, *, private: bool, token: str | None, progress: Callable[[float, str], None] | None = None) -> str:
    """Publish an output folder to the Hub; returns the URL."""
    from suture.merge.hub import push_folder

    return push_folder(out_dir, repo_id, private=private, token=token or None, progress=progress)


def readable(exc: BaseException) -> str:
    """One line for st.error: library errors as they are, other failures with their type (tokens masked)."""
    from suture.merge.redact import redact

    from suture.app.jobs import sentence

    if isinstance(exc, (SutureError, WorkspaceError, RecipeError)):
        return sentence(redact(str(exc)))
    return sentence(redact(f"{type(exc).__name__}: {exc}"))


__all__ = [
    "alignment_matrices",
    "permutation_matrices",
    "demo_ready",
    "engine_options",
    "engine_value_problem",
    "method_value_problem",
    "common_alignment_keys",
    "stop_sweep_rows",
    "transport_rows",
    "zip_group_rows",
    "zipit_rows",
    "MergeOutcome",
    "alignment_objective",
    "check_ref",
    "check_recipe_paths",
    "compatibility",
    "confine_data",
    "dataset",
    "devices",
    "alignment_defaults",
    "barrier_rows",
    "engines",
    "evaluation_rows",
    "evaluation_section",
    "env_token",
    "evaluate",
    "inspect_model",
    "interpolation_curves",
    "layer_features",
    "methods",
    "model_stamp",
    "output_dir_for",
    "permutation_groups",
    "push",
    "read_report",
    "readable",
    "resolve",
    "runner_engines",
    "run_merge",
    "run_stitch",
    "start_push_job",
    "start_stitch_job",
    "finished_stitch",
    "stitch_output_dir",
    "start_merge_job",
    "finished_run",
    "runnable",
    "similarity_matrix",
    "card_parts",
    "format_cut",
    "cut_choices",
    "layer_name",
    "stage_names",
    "matching_layer",
    "stitch_result_rows",
    "split_card",
    "stitch_fit",
    "translators",
]
