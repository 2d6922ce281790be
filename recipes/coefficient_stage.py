"""The learning stage of AdaMerging / aTLAS recipes: task-arithmetic coefficients from every model's data.

For a method registered with ``needs_data="coefficients"`` the runner calls :func:`learn_recipe_coefficients`
after planning. Each fine-tuned model is built as a module with its own data (``models[i].data``, loaded
by :func:`recipes.calibration.model_data` with the top-level ``data:`` options), and the coefficients are
learned jointly (:func:`merge.coefficients.learn_coefficients`): each model's module runs its own batches
with the merged tensors swapped in, so its own head (when heads differ) scores its own task. The result is

* the per-tensor statistics ``{"coefficient": w}`` the kernel reads (:mod:`merge.methods.adamerging`);
* a report (settings, coefficients per model and group, first and last loss) for ``report.json``, holding
  the equivalent plain ``task_arithmetic`` recipe, which the runner also writes as
  ``task_arithmetic_recipe.yaml`` beside the merged model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from suture.merge.coefficient_export import export_recipe, recipe_yaml
from suture.merge.coefficients import group_tensors, learn_coefficients, learnable_names, module_objective
from suture.merge.derive import Architecture
from suture.merge.execute import TensorTask
from suture.merge.layers import num_layers
from suture.merge.methods import MergeMethod
from suture.merge.methods.adamerging import coefficient_setup
from suture.recipes.calibration import data_options, model_data
from suture.recipes.plan import OpenedModels, Progress
from suture.recipes.schema import Recipe

logger = logging.getLogger(__name__)

RECIPE_FILE = "task_arithmetic_recipe.yaml"
_REPORT_KEY = "task_arithmetic_recipe"


def _portable_ref(models: OpenedModels, key: str) -> str:
    """The reference the exported recipe uses: local paths made absolute (the recipe lands in the output folder)."""
    ref = models.refs[key]
    if ref.revision is None and Path(ref.path).expanduser().exists():
        return str(models.paths[key])
    return key


def _global_params(r: Recipe, method: MergeMethod, tasks: Sequence[TensorTask]) -> dict[str, Any]:
    """The method's settings: one value for the whole run (a gradient or filter that varies them is refused)."""
    first = tasks[0].params
    for task in tasks[1:]:
        for p in method.global_params:
            if task.params.get(p.name) != first.get(p.name):
                raise r.error(("parameters", p.name), f"merge method {method.name!r} learns once for the whole model: "
                              f"{p.name!r} must be one value, not vary by tensor")
    return {p.name: first.get(p.name, p.default) for p in method.global_params}


def learn_recipe_coefficients(
    r: Recipe, method: MergeMethod, tasks: Sequence[TensorTask], models: OpenedModels, architecture: Architecture | None,
    device: torch.device, *, seed: int = 0, trust_remote_code: bool = False, progress: Progress | None = None,
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, Any]]:
    """(per-model per-tensor ``{"coefficient": w}``, report) for a coefficient-learning recipe."""
    started = time.perf_counter()
    stores = models.stores
    keys = list(dict.fromkeys(src.model for t in tasks for src in t.sources))
    base_key = next(t.base.model for t in tasks if t.base is not None)
    params = _global_params(r, method, tasks)
    opts = data_options(r)
    entries = model_data(r, stores, keys, architecture, trust_remote_code)
    labelled = opts.labels != "sampled" and all(md.data.labels is not None for md in entries)
    settings, granularity = coefficient_setup(method.name, params, labelled)
    base = stores[base_key].state_dict(device)
    finetuned = [stores[k].state_dict(device) for k in keys]
    objectives = []
    for md in entries:
        module = md.build().to(device)
        objectives.append(module_objective(md.key, module, md.data, batch_size=opts.batch_size, seed=seed, device=device,
                                           labelled=settings.objective == "cross_entropy", where=md.where))
    # every floating-point tensor the models share, buffers included: in eval mode BatchNorm's running
    # statistics enter the forward too, so they follow the learned weights like the parameters they belong to
    names = learnable_names(base, finetuned)
    learned = learn_coefficients(base, finetuned, group_tensors(names, granularity), objectives, settings,
                                 vector_names=keys, progress=progress, stage=method.name)
    del base, finetuned, objectives  # the merge itself reads the stores tensor by tensor
    stats = {k: {n: {"coefficient": w} for n, w in learned.weights(i).items()} for i, k in enumerate(keys)}
    base_names = stores[base_key].names()
    exported = export_recipe(learned, base_model=_portable_ref(models, base_key),
                             models=[_portable_ref(models, k) for k in keys], names=base_names,
                             n_layers=num_layers(base_names, stores[base_key].config), dtype=r.dtype,
                             name=f"{r.name}-{method.name}-coefficients" if r.name else None)
    if r.out_dtype:
        exported["out_dtype"] = r.out_dtype
    specs = {str(e.model): e.data if isinstance(e.data, str) else dict(e.data) for e in r.models or [] if str(e.model) in keys}
    report = {
        "statistics": "coefficients", "split": opts.split, "max_items": opts.max_items, "batch_size": opts.batch_size,
        "labelled": settings.objective == "cross_entropy", "models": specs, **learned.report(),
        _REPORT_KEY: exported, "seconds": round(time.perf_counter() - started, 3),
    }
    return stats, report


def write_learned_recipe(folder: Path, data_report: Mapping[str, Any] | None) -> list[str]:
    """Write the exported task_arithmetic recipe of a coefficient-learning run into ``folder`` (file names written)."""
    if not data_report or _REPORT_KEY not in data_report:
        return []
    comment = (f"task_arithmetic with the coefficients learned on the models' data ({data_report['objective']},\n"
               f"{data_report['steps']} steps, {data_report['granularity']}-wise): the same merge, without data")
    (Path(folder) / RECIPE_FILE).write_text(recipe_yaml(data_report[_REPORT_KEY], comment), encoding="utf-8")
    return [RECIPE_FILE]


__all__ = ["RECIPE_FILE", "learn_recipe_coefficients", "write_learned_recipe"]
