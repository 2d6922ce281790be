"""Thin, cached calls from the app into merge / stitch / recipes. No algorithm lives here.

Expensive answers are cached per input (``st.cache_data`` for data, ``st.cache_resource`` for modules), so a
page that reruns because a plot option changed never recomputes a merge, an inspection or a similarity
matrix. Merge results are also cached on disk: a recipe's output folder is named by a hash of the recipe,
the device and the state of its local input files, and a finished folder is reused.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import streamlit as st

from app.state import canonical, is_local_ref, recipe_yaml, referenced_refs, slug
from app.workspace import Workspace, WorkspaceError
from merge.errors import InputError, RecipeError, SutureError

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int, str], None]
NOT_AVAILABLE = "not available in this build"


# ---------------------------------------------------------------------------------------------- models


def resolve(ref: str) -> Path:
    """A local path for a model reference (demo models are trained once and cached, Hub ids downloaded)."""
    from merge.refs import resolve_ref

    return Path(resolve_ref(ref))


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


def check_recipe_paths(recipe: Mapping[str, Any], workspace: Workspace) -> None:
    """Refuse a recipe whose models or data files lie outside the workspace."""
    for ref in referenced_refs(recipe):
        check_ref(ref, workspace)
    for section in ("alignment", "evaluate"):
        data = (recipe.get(section) or {}).get("data")
        if data is not None:
            confine_data(data, workspace)


@st.cache_data(show_spinner=False, max_entries=64)
def inspect_model(ref: str, stamp: str = "", groups: bool = False) -> dict[str, Any]:
    """Tensors, size, dtype mix and family of a model (and its permutation groups when asked)."""
    from recipes.inspect import inspect_model as describe

    info = describe(str(resolve(ref)), groups=False)
    info["model"] = ref
    if groups:
        info["groups"] = permutation_groups(info["path"])
    return info


def permutation_groups(path: str) -> list[dict[str, Any]] | dict[str, str]:
    """Permutation groups of a stored model, or {"error": why} when they cannot be derived here."""
    from merge.store import open_store

    store = open_store(path)
    spec_for_store = None
    for module_name in ("merge.derive", "merge.graph"):
        try:
            spec_for_store = getattr(importlib.import_module(module_name), "spec_for_store", None)
        except ImportError:
            continue
        if spec_for_store is not None:
            break
    try:
        if spec_for_store is not None:
            return spec_for_store(store).describe()
        from merge.graph.families import spec_from_names

        return spec_from_names({n: store.shape(n) for n in store.names()}, store.config).describe()
    except ImportError:
        return {"error": f"permutation groups are {NOT_AVAILABLE}"}
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
            "engines": ["merge methods (all)", "weight_matching", "activation_matching", "ot", "zipit"],
            "differences": [],
        }
    if same_names:
        return {
            "kind": "widths",
            "verdict": "different widths: same tensors, some shapes differ",
            "engines": ["ot (soft alignment across widths)", "stitching"],
            "differences": differences,
        }
    from merge.layers import num_layers

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
    from merge.methods import get_method, list_methods

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
    return {"name": p.name, "default": p.default, "required": p.required, "help": p.help}


@dataclass(frozen=True)
class Engine:
    """An alignment engine the recipe runner may name, and the library modules that implement it."""

    name: str
    title: str
    modules: tuple[str, ...]
    needs_data: bool
    applies_to: tuple[str, ...]


ENGINES = (
    Engine("weight_matching", "Weight matching (Git Re-Basin)", ("merge.align.weight_matching",), False, ("same",)),
    Engine("activation_matching", "Activation matching (Git Re-Basin)", ("merge.align.activation_matching",), True, ("same",)),
    Engine("ot", "Optimal transport (OTFusion)", ("merge.align.ot", "merge.align.otfusion", "merge.align.optimal_transport"), True, ("same", "widths")),
    Engine("zipit", "ZipIt (feature zipping)", ("merge.align.zipit",), True, ("same",)),
)


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def runner_engines() -> set[str]:
    """Engine names this build's recipe runner accepts in `alignment: {engine: ...}` (read from its schema)."""
    import typing

    try:
        from recipes.sections import AlignmentSection
    except ImportError:  # a runner without the alignment section
        return set()
    annotation = AlignmentSection.model_fields["engine"].annotation
    return {str(a) for a in typing.get_args(annotation)} or ({str(annotation)} if isinstance(annotation, str) else set())


def alignment_defaults() -> dict[str, Any]:
    """Default values of the `alignment:` section's settings (empty when the runner has no such section)."""
    try:
        from recipes.sections import AlignmentSection
    except ImportError:
        return {}
    return {name: f.default for name, f in AlignmentSection.model_fields.items()}


def engines() -> list[dict[str, Any]]:
    """Every engine with whether it can run here and why not."""
    from merge.card import engine_papers

    accepted = runner_engines()
    out = []
    for e in ENGINES:
        present = e.name in accepted or any(_module_exists(m) for m in e.modules)
        if e.name in accepted:
            why = ""
        elif present:
            why = f"running {e.name} from a recipe is {NOT_AVAILABLE}"
        else:
            why = f"the {e.name} engine is {NOT_AVAILABLE}"
        out.append({"name": e.name, "title": e.title, "needs_data": e.needs_data, "applies_to": e.applies_to,
                    "available": not why, "reason": why, "papers": engine_papers(e.name)})
    return out


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

    def as_dict(self) -> dict[str, Any]:
        """Plain data for session state."""
        return {"out_dir": str(self.out_dir), "files": list(self.files), "report": dict(self.report), "cached": self.cached}


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
) -> MergeOutcome:
    """Run the recipe into the workspace (publishing is left to the Publish page); reuse a finished result."""
    from recipes.runner import RunOptions, run_recipe

    data = canonical(recipe)
    check_recipe_paths(data, workspace)
    data.pop("publish", None)  # the Publish page pushes explicitly, with the token the user gives there
    out = output_dir_for(data, workspace, device)
    if (out / "report.json").is_file() and not recompute:
        logger.info("reusing %s", out)
        files = sorted(p.name for p in out.iterdir() if p.is_file())
        return MergeOutcome(out, files, json.loads((out / "report.json").read_text()), cached=True)
    result = run_recipe(data, out, RunOptions(device=device, overwrite=out.exists()), progress=progress)
    return MergeOutcome(result.out_dir, sorted(result.files), result.report, cached=False)


def read_report(out_dir: str | Path) -> dict[str, Any]:
    """report.json of a finished output folder."""
    return json.loads((Path(out_dir) / "report.json").read_text())


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


def barrier_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Loss/accuracy barriers per interpolation path (naive, aligned), with the midpoint accuracy."""
    section = evaluation_section(report)
    mids = section.get("midpoint_accuracy") or {}
    return [{"path": str(label), **{k: v for k, v in b.items() if v is not None}, **({"midpoint accuracy": mids[label]} if label in mids else {})}
            for label, b in (section.get("barriers") or {}).items() if isinstance(b, Mapping)]


# ---------------------------------------------------------------------------------------------- evaluation


def runnable(ref_or_path: str) -> bool:
    """Whether the app can rebuild the model as a module (a zoo model: config.json names its architecture)."""
    from merge.zoo import ARCH_KEY

    try:
        path = resolve(ref_or_path) if not Path(ref_or_path).exists() else Path(ref_or_path)
    except SutureError:
        return False
    config = (path if path.is_dir() else path.parent) / "config.json"
    try:
        return ARCH_KEY in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


@st.cache_resource(show_spinner=False, max_entries=16)
def module(path: str, stamp: str = ""):
    """A model rebuilt from its folder (architecture from config.json), in eval mode."""
    from merge.zoo import load_module

    return load_module(path)


@st.cache_data(show_spinner=False, max_entries=32)
def dataset(spec: str, split: str = "test", max_items: int | None = None):
    """Evaluation/calibration data from a spec (e.g. sklearn:digits, sklearn:digits?classes=0-4)."""
    from merge.data import load_dataset

    return load_dataset(spec, split=split, max_items=max_items)


@st.cache_data(show_spinner=False, max_entries=128)
def evaluate(ref_or_path: str, data_spec: str, stamp: str = "") -> dict[str, float]:
    """Loss and accuracy of a runnable model on the test split of a dataset."""
    from merge.evaluate import evaluate as run_eval

    path = Path(ref_or_path) if Path(ref_or_path).exists() else resolve(ref_or_path)
    return run_eval(module(str(path), stamp), dataset(data_spec, "test"))


# ---------------------------------------------------------------------------------------------- stitching


@st.cache_data(show_spinner=False, max_entries=32)
def layer_features(ref: str, data_spec: str, split: str = "test", max_items: int = 512, stamp: str = "") -> tuple[list[str], list[Any]]:
    """Hidden features (samples x units) at every permutation group's tap of a runnable model."""
    import torch

    from merge.activations import group_taps, unit_features

    # a private copy: hooks on the shared cached module could see another session's forward pass
    net = copy.deepcopy(module(str(resolve(ref)), stamp))
    data = dataset(data_spec, split, max_items)
    taps = group_taps(net, data.inputs[:2])
    if not taps:
        raise InputError(f"{ref}: no hidden layers were found to compare")
    modules = dict(net.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for group, group_taps_ in taps.items():
        tap = group_taps_[0]

        def hook(mod, args, output, tap=tap, group=group):
            value = args[0] if tap.where == "input" else output
            captured[group] = unit_features(value.detach(), tap.axis, tap.inner)

        handles.append(modules[tap.module].register_forward_hook(hook))
    try:
        with torch.no_grad():
            net(data.inputs)
    finally:
        for h in handles:
            h.remove()
    names = [g for g in taps if g in captured]
    return names, [captured[g].numpy() for g in names]


@st.cache_data(show_spinner=False, max_entries=32)
def similarity_matrix(ref_a: str, ref_b: str, data_spec: str, metric: str = "cka", max_items: int = 512) -> dict[str, Any]:
    """Layer-by-layer similarity of two models on the same inputs (rows: A's layers, columns: B's)."""
    from stitch.similarity import METRICS, layer_similarity_matrix

    names_a, feats_a = layer_features(ref_a, data_spec, "test", max_items, model_stamp(ref_a))
    names_b, feats_b = layer_features(ref_b, data_spec, "test", max_items, model_stamp(ref_b))
    matrix = layer_similarity_matrix(feats_a, feats_b, metric)
    return {"matrix": matrix.numpy(), "rows": names_a, "cols": names_b, "metric": metric,
            "higher_is_more_similar": METRICS[metric].higher_is_more_similar, "samples": int(feats_a[0].shape[0])}


def metrics_catalogue() -> dict[str, str]:
    """Similarity metrics and their one-line descriptions."""
    from stitch.similarity import METRICS

    return {name: m.description for name, m in METRICS.items()}


def translators() -> list[str]:
    """Latent translation estimators, plus relative representations."""
    from stitch.translate import TRANSLATORS

    return list(TRANSLATORS) + ["relative"]


@st.cache_data(show_spinner=False, max_entries=32)
def stitch_fit(ref_a: str, layer_a: str, ref_b: str, layer_b: str, data_spec: str, method: str, anchors: int, seed: int = 0) -> dict[str, float]:
    """Fit a map from A's features at the cut to B's on anchors (train split); score it on the test split."""
    import torch

    from stitch.anchors import select_anchors

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
        from stitch.relative import RelativeProjector

        rel_a = RelativeProjector().fit(xa[idx]).transform(ya).double()
        rel_b = RelativeProjector().fit(xb[idx]).transform(yb).double()
        cos = torch.nn.functional.cosine_similarity(rel_a, rel_b, dim=1)
        return {"anchors": float(len(idx)), "mean cosine (relative A vs B)": float(cos.mean()), "test samples": float(ya.shape[0])}
    from stitch.translate import TRANSLATORS

    translator = TRANSLATORS[method]().fit(xa[idx], xb[idx])
    pred = translator.transform(ya).double()
    target = yb.double()
    resid = float((pred - target).pow(2).sum())
    total = float((target - target.mean(0)).pow(2).sum())
    cos = torch.nn.functional.cosine_similarity(pred, target, dim=1)
    return {"anchors": float(len(idx)), "R² (translated A vs B)": 1.0 - resid / max(total, 1e-30),
            "mean cosine (translated A vs B)": float(cos.mean()), "test samples": float(ya.shape[0])}


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


def push(out_dir: str | Path, repo_id: str, *, private: bool, token: str | None, progress: Callable[[float, str], None] | None = None) -> str:
    """Publish an output folder to the Hub; returns the URL."""
    from merge.hub import push_folder

    return push_folder(out_dir, repo_id, private=private, token=token or None, progress=progress)


def readable(exc: BaseException) -> str:
    """One line for st.error: library errors as they are, other failures with their type."""
    if isinstance(exc, (SutureError, WorkspaceError, RecipeError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


__all__ = [
    "ENGINES",
    "MergeOutcome",
    "NOT_AVAILABLE",
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
    "runnable",
    "similarity_matrix",
    "split_card",
    "stitch_fit",
    "translators",
]
