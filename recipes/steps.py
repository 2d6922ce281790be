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

from suture.merge.derive import Architecture, architecture_of, load_module, parse_architecture
from suture.merge.errors import AlignmentError, RecipeError, SutureError
from suture.merge.store import TensorStore, open_store
from suture.recipes.sections import AlignmentSection, EvaluateSection

logger = logging.getLogger(__name__)

PLOT_NAME = "interpolation.png"


def recipe_architecture(architecture: Any, alignment: AlignmentSection | None) -> Architecture | None:
    """The recipe's `architecture:` (a factory reference, or {factory, kwargs}; plus alignment.architecture_kwargs)."""
    if architecture is None:
        return None
    if isinstance(architecture, str):
        factory, kwargs = architecture, {}
    else:
        factory, kwargs = architecture.factory, dict(architecture.kwargs or {})
    kwargs.update((alignment.architecture_kwargs if alignment else None) or {})
    return parse_architecture({"factory": factory, "kwargs": kwargs})


def check_trust(stores: dict[str, TensorStore], architecture: Architecture | None, trust_remote_code: bool) -> None:
    """Refuse up front (naming the model's config.json) a recorded factory that alignment or evaluation would build."""
    from suture.merge.hf_module import HFArchitecture, check_remote_code
    from suture.merge.zoo import check_factory_trust

    for store in stores.values():
        arch = architecture_of(store, trust_remote_code=trust_remote_code, chosen=architecture)
        if isinstance(arch, HFArchitecture):
            check_remote_code(arch.config, arch.label, trust_remote_code)
        elif arch is not None:
            check_factory_trust(arch.factory, source=arch.source, trust_remote_code=trust_remote_code)


def load_data(spec: Any, *, split: str = "train", max_items: int | None = None, store: TensorStore | None = None):
    """Calibration/evaluation data from a recipe data spec (text encoded with `store`'s tokenizer files, if any)."""
    from suture.merge.data import load_dataset
    from suture.merge.hf_module import tokenizer_folder

    return load_dataset(spec, split=split, max_items=max_items, tokenizer=tokenizer_folder(store) if store is not None else None)


def run_alignment(section: AlignmentSection, stores: dict[str, TensorStore], reference: str, architecture: Architecture | None,
                  device: torch.device, progress=None, fallback_data: Any = None, trust_remote_code: bool = False):
    """Align every store to the reference with the section's engine; returns its outcome (aligned stores or a built model).

    `fallback_data` (the evaluate section's data) only supplies an example input for tracing when the
    alignment section names no data of its own. `trust_remote_code` lets a model's config.json name an
    architecture outside Suture's zoo.
    """
    from suture.merge.align.pipeline import AlignmentOutcome, align_models

    spec = section.data if section.data is not None else fallback_data
    data = load_data(spec, split="train", max_items=section.max_items, store=stores.get(reference)) if spec is not None else None
    outcome = align_models(stores, reference, section, architecture=architecture, data=data, device=device, progress=progress,
                           trust_remote_code=trust_remote_code)
    if isinstance(outcome, AlignmentOutcome):
        check_repair(section, outcome.architecture)
    return outcome


def interpolation_weight(model_params: list[dict], keys: list[str], reference: str) -> float:
    """t of the merge on the path reference -> other: the other model's share of the weights (0.5 if unknown)."""
    weights = [p.get("weight") for p in model_params]
    if len(keys) != 2 or any(not isinstance(w, (int, float)) for w in weights) or sum(weights) == 0:
        return 0.5
    other = 1 if keys[0] == reference else 0
    return float(weights[other]) / float(sum(weights))


def check_repair(section: AlignmentSection, architecture: Architecture | None) -> None:
    """Refuse `repair:` (before anything is merged) where it cannot run: no runnable module, or a transformers model."""
    from suture.merge.hf_module import refuse_hf

    if section.repair == "none":
        return
    if architecture is None:
        raise AlignmentError(f"alignment.repair: {section.repair} needs a runnable architecture (`architecture:` in the recipe)")
    if section.repair == "reset_bn":
        refuse_hf(architecture, "alignment.repair: reset_bn",
                  "transformers models have LayerNorm, no BatchNorm statistics to reset; use repair: repair or none")


def repair_output(folder: Path, section: AlignmentSection, outcome, t: float) -> dict[str, Any]:
    """Reset BatchNorm statistics or apply REPAIR to the merged weights in `folder`, rewriting them in place."""
    from suture.merge.align.transformer_repair import repair_mlps
    from suture.merge.data import iter_batches
    from suture.merge.hf_module import HFArchitecture
    from suture.merge.repair import repair, reset_batchnorm
    from suture.merge.writer import save_tensors

    check_repair(section, outcome.architecture)
    if section.data is None:
        raise RecipeError(f"alignment.repair: {section.repair} needs calibration data (alignment.data)")
    data = load_data(section.data, split="train", max_items=section.max_items, store=outcome.stores.get(outcome.reference))
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
        if isinstance(outcome.architecture, HFArchitecture):  # transformers: the MLP units (merge.align.transformer_repair)
            batches = [x for x, _ in iter_batches(data, section.batch_size)]
            repair_mlps(merged, ends[0], ends[1], outcome.spec, batches, t=t)
        else:
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


def _truncated(state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The naive baseline for different widths: every tensor cut to the reference's shape (first units kept)."""
    return {n: state[n][tuple(slice(0, d) for d in shape)].clone() for n, shape in shapes.items()}


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
    fused: bool = False,
    permutation_spec: Any = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Endpoints, merged model and interpolation curves (naive or truncated, aligned) on the data.

    With `permutation_spec` (soft engines on models of equal widths) a weight-matching path is added, so the
    plot compares naive, permutation and OT curves.
    """
    from suture.merge.evaluate import barrier, evaluate, interpolation_curve

    merged_store = open_store(folder)
    arch = architecture_of(merged_store, trust_remote_code=trust_remote_code, chosen=architecture) or architecture
    if arch is None:
        raise RecipeError("evaluate: needs a runnable architecture (`architecture:` in the recipe, a model saved by Suture's zoo, or a Hugging Face folder)")
    data = load_data(section.data, split=section.split, max_items=section.max_items, store=raw_stores.get(reference))
    calib = load_data(section.data, split="train", max_items=section.max_items) if reset_bn else None
    merged_module = load_module(merged_store, arch)
    data, lm = _language_model_data(merged_module, data, section)
    merged = evaluate(merged_module, data, batch_size=section.batch_size)
    shapes = merged_store.shapes()
    merged_store.close()
    result: dict[str, Any] = {"data": section.data if isinstance(section.data, str) else dict(section.data), "split": section.split,
                              "items": len(data), **({"language_model": lm} if lm else {}), "merged": merged, "models": {}}
    notes: list[str] = []
    for key, store in raw_stores.items():
        own = (architecture_of(store, trust_remote_code=trust_remote_code, chosen=architecture)
               or (architecture if store.shapes() == shapes else None))
        if own is None:
            notes.append(f"model {key}: not evaluated (no runnable architecture fits its tensors)")
            continue
        try:
            result["models"][key] = evaluate(load_module(store, own), data, batch_size=section.batch_size)
        except SutureError as exc:
            notes.append(f"model {key}: not evaluated ({exc})")
    others = [k for k in stores if k != reference]
    if len(others) != 1 or fused:
        return _with_notes(result, notes)  # interpolation paths are defined between two models in one basis
    other = others[0]
    ref_state = stores[reference].state_dict()
    raw_other = raw_stores[other].state_dict()
    same_shapes = {n: tuple(t.shape) for n, t in raw_other.items()} == shapes
    ref_shapes = {n: tuple(t.shape) for n, t in ref_state.items()}
    if ref_shapes != shapes:
        notes.append("interpolation paths skipped: the reference's tensors do not have the merged model's shapes")
        return _with_notes(result, notes)
    paths = {"naive" if same_shapes else "truncated": raw_other if same_shapes else _truncated(raw_other, shapes)}
    if permutation_spec is not None and same_shapes:
        try:
            paths["permutation"] = _permutation_path(permutation_spec, stores[reference], ref_state, raw_other, arch, data)
        except (SutureError, ValueError) as exc:
            notes.append(f"permutation path skipped: {exc}")
    if aligned:
        paths["aligned"] = stores[other].state_dict()
    curves = {}
    for i, (label, other_state) in enumerate(paths.items()):
        if progress:
            progress("evaluate", i, len(paths), f"{label} path")
        try:
            curves[label] = interpolation_curve(arch.build, ref_state, other_state, data, points=section.points,
                                                reset_bn_data=calib, batch_size=section.batch_size)
        except SutureError as exc:
            notes.append(f"{label} path skipped: {exc}")
    _with_notes(result, notes)
    if not curves:
        return result
    if progress:
        progress("evaluate", len(paths), len(paths), "")
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
        from suture.merge.plot import plot_interpolation

        plot_interpolation(curves, folder / PLOT_NAME, title=f"{reference} → {other}")
        result["plot"] = PLOT_NAME
    return result


def _language_model_data(module: torch.nn.Module, data: Any, section: EvaluateSection) -> tuple[Any, dict[str, Any] | None]:
    """Token data without labels, for a language model: per-token targets fixed once (the same masked positions
    for every model and path point) and what report.json records about them; other data unchanged."""
    from suture.merge.lm_eval import is_token_text, lm_evaluation, lm_kind

    if not is_token_text(data):
        return data, None
    kind = lm_kind(module)
    if kind is None:
        raise RecipeError(f"evaluate.data: {data.name!r} is text without labels, which is scored as language modelling, but the "
                          f"merged model ({type(module).__name__}) has no causal or masked LM head")
    return lm_evaluation(data, kind, mask_rate=section.mask_rate, seed=section.mask_seed)


def _with_notes(result: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """Record what evaluation had to leave out (report.json `evaluation.notes`), so a finished merge is never lost."""
    for note in notes:
        logger.warning("evaluate: %s", note)
    if notes:
        result["notes"] = list(notes)
    return result


def _permutation_path(spec: Any, ref_store: TensorStore, ref_state: dict, other_state: dict, arch: Architecture, data: Any) -> dict:
    """The other model weight-matched onto the reference (the spec re-derived when compression changed the widths)."""
    from suture.merge.align.weight_matching import weight_matching
    from suture.merge.derive import derive_spec
    from suture.merge.spec import permute_state

    shapes = {n: tuple(t.shape) for n, t in ref_state.items()}
    try:
        spec.validate(shapes)
    except ValueError:
        spec, _ = derive_spec(ref_store, architecture=arch, data=data)
    match = weight_matching(spec, ref_state, other_state)
    return permute_state(other_state, spec, match.perms)


