"""The alignment, repair and evaluation steps a recipe can add around its merge.

Order inside :func:`recipes.runner.run_recipe`: align (replace each model's store by a lazily permuted
one), merge (unchanged), then on the merged folder: BatchNorm reset or REPAIR, then evaluation of the
interpolation paths (naive vs aligned), whose numbers go to report.json and whose plot goes next to the
weights and into the model card.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from merge.derive import Architecture, architecture_of, load_module, parse_architecture
from merge.errors import AlignmentError, RecipeError
from merge.store import TensorStore, open_store
from recipes.sections import AlignmentSection, EvaluateSection

logger = logging.getLogger(__name__)

PLOT_NAME = "interpolation.png"


def recipe_architecture(architecture: str | None, alignment: AlignmentSection | None) -> Architecture | None:
    """The recipe's `architecture:` (+ alignment.architecture_kwargs), if any."""
    if architecture is None:
        return None
    kwargs = (alignment.architecture_kwargs if alignment else None) or {}
    return parse_architecture({"factory": architecture, "kwargs": kwargs})


def load_data(spec: Any, *, split: str = "train", max_items: int | None = None):
    """Calibration/evaluation data from a recipe data spec."""
    from merge.data import load_dataset

    return load_dataset(spec, split=split, max_items=max_items)


def run_alignment(section: AlignmentSection, stores: dict[str, TensorStore], reference: str, architecture: Architecture | None,
                  device: torch.device, progress=None, fallback_data: Any = None):
    """Align every store to the reference; returns the AlignmentOutcome (its stores replace the originals).

    `fallback_data` (the evaluate section's data) only supplies an example input for tracing when the
    alignment section names no data of its own.
    """
    from merge.align.pipeline import AlignmentSettings, align_models

    spec = section.data if section.data is not None else fallback_data
    data = load_data(spec, split="train", max_items=section.max_items) if spec is not None else None
    settings = AlignmentSettings(
        engine=section.engine, reference=reference, max_iter=section.max_iter, seed=section.seed, data=section.data,
        batch_size=section.batch_size, max_items=section.max_items, input_shape=section.input_shape, repair=section.repair,
    )
    return align_models(stores, reference, settings, architecture=architecture, data=data, device=device, progress=progress)


def interpolation_weight(model_params: list[dict], keys: list[str], reference: str) -> float:
    """t of the merge on the path reference -> other: the other model's share of the weights (0.5 if unknown)."""
    weights = [p.get("weight") for p in model_params]
    if len(keys) != 2 or any(not isinstance(w, (int, float)) for w in weights) or sum(weights) == 0:
        return 0.5
    other = 1 if keys[0] == reference else 0
    return float(weights[other]) / float(sum(weights))


def repair_output(folder: Path, section: AlignmentSection, outcome, t: float) -> dict[str, Any]:
    """Reset BatchNorm statistics or apply REPAIR to the merged weights in `folder`, rewriting them in place."""
    from merge.repair import repair, reset_batchnorm
    from merge.writer import save_tensors

    if outcome.architecture is None:
        raise AlignmentError(f"alignment.repair: {section.repair} needs a runnable architecture (`architecture:` in the recipe)")
    if section.data is None:
        raise RecipeError(f"alignment.repair: {section.repair} needs calibration data (alignment.data)")
    data = load_data(section.data, split="train", max_items=section.max_items)
    merged_store = open_store(folder)
    merged = load_module(merged_store, outcome.architecture)
    merged_store.close()
    if section.repair == "reset_bn":
        reset_batchnorm(merged, data, batch_size=section.batch_size)
    else:
        keys = list(outcome.stores)
        if len(keys) != 2:
            raise AlignmentError("alignment.repair: repair interpolates two endpoints; it needs exactly two models")
        ends = [load_module(outcome.stores[k], outcome.architecture) for k in keys]
        repair(merged, ends[0], ends[1], data, t=t, batch_size=section.batch_size)
    state = {k: v.detach().contiguous() for k, v in merged.state_dict().items()}
    names = open_store(folder).names()
    ordered = {n: state[n] for n in names}
    # rewrite the weights inside the (still temporary) output folder
    for shard in list(folder.glob("model*.safetensors")) + list(folder.glob("model.safetensors.index.json")):
        shard.unlink()
    tmp = folder / ".repaired"
    save_tensors(ordered, tmp, overwrite=True)
    for item in tmp.iterdir():
        item.replace(folder / item.name)
    tmp.rmdir()
    return {"repair": section.repair, "t": t}


def evaluate_output(
    folder: Path,
    section: EvaluateSection,
    stores: dict[str, TensorStore],
    raw_stores: dict[str, TensorStore],
    reference: str,
    architecture: Architecture | None,
    aligned: bool,
    reset_bn: bool,
    progress=None,
) -> dict[str, Any]:
    """Endpoints, merged model and interpolation curves (naive and aligned) on the evaluation data."""
    from merge.evaluate import barrier, evaluate, interpolation_curve

    ref_store = stores[reference]
    arch = architecture or architecture_of(ref_store)
    if arch is None:
        raise RecipeError("evaluate: needs a runnable architecture (`architecture:` in the recipe, or models saved by Suture's zoo)")
    data = load_data(section.data, split=section.split, max_items=section.max_items)
    calib = load_data(section.data, split="train", max_items=section.max_items) if reset_bn else None
    factory = arch.build
    merged_store = open_store(folder)
    merged = evaluate(load_module(merged_store, arch), data, batch_size=section.batch_size)
    merged_store.close()
    result: dict[str, Any] = {"data": section.data if isinstance(section.data, str) else dict(section.data), "split": section.split,
                              "items": len(data), "merged": merged, "models": {}}
    for key, store in raw_stores.items():
        result["models"][key] = evaluate(load_module(store, arch), data, batch_size=section.batch_size)
    others = [k for k in stores if k != reference]
    if len(others) != 1:
        return result  # interpolation paths are defined between two models
    other = others[0]
    ref_state = ref_store.state_dict()
    curves = {}
    if progress:
        progress("evaluate", 0, 2 if aligned else 1, "naive path")
    curves["naive"] = interpolation_curve(factory, ref_state, raw_stores[other].state_dict(), data, points=section.points,
                                          reset_bn_data=calib, batch_size=section.batch_size)
    if aligned:
        if progress:
            progress("evaluate", 1, 2, "aligned path")
        curves["aligned"] = interpolation_curve(factory, ref_state, stores[other].state_dict(), data, points=section.points,
                                                reset_bn_data=calib, batch_size=section.batch_size)
    if progress:
        progress("evaluate", len(curves), len(curves), "")
    result["curves"] = curves
    result["barriers"] = {
        label: {
            "loss": barrier(c, "loss"),
            "loss_midpoint": barrier(c, "loss", kind="midpoint") if section.points % 2 else None,
            "accuracy": barrier(c, "accuracy"),
        }
        for label, c in curves.items()
    }
    mid = section.points // 2 if section.points % 2 else None
    if mid is not None:
        result["midpoint_accuracy"] = {label: c[mid]["accuracy"] for label, c in curves.items()}
    if section.plot:
        from merge.plot import plot_interpolation

        plot_interpolation(curves, folder / PLOT_NAME, title=f"{reference} → {other}")
        result["plot"] = PLOT_NAME
    return result


def evaluation_rows(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for the model card's evaluation table."""
    rows = [{"model": key, **{k: round(v, 4) for k, v in m.items()}} for key, m in evaluation.get("models", {}).items()]
    rows.append({"model": "merged", **{k: round(v, 4) for k, v in evaluation["merged"].items()}})
    for label, b in evaluation.get("barriers", {}).items():
        rows.append({"model": f"{label} path: loss barrier", "loss": round(b["loss"], 4),
                     "accuracy": round(evaluation.get("midpoint_accuracy", {}).get(label, float("nan")), 4)})
    return rows

