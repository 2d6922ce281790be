"""The statistics stage of data-driven merges: each recipe model's own data, run through that model.

For a method registered with ``needs_data`` (RegMean, RegMean++, Fisher merging) the runner calls
:func:`model_statistics` after planning and before executing the plan. Every model the method merges names
its data in the recipe (``models[i].data``, a :mod:`merge.data` spec; text is encoded with that model's own
tokenizer files) and, for an encoder whose task classifier lives beside it (a text fine-tune's ``head/``,
:mod:`merge.text_heads`), ``models[i].head`` names that folder, so Fisher's log-likelihood and AdaMerging's
entropy see the task's logits on the mean-pooled output; the top-level ``data:`` sets ``max_items`` (default 256), ``batch_size`` (32), ``split``
(train) and, for Fisher merging, ``labels`` (auto / true / sampled). Each model is built as a torch module
through the same route as alignment and evaluation (the recipe's ``architecture``, a zoo model's recorded
factory, or a Hugging Face folder via transformers, with the same trust checks), one model at a time, and
:mod:`merge.calibrate` turns its data into per-tensor statistics on the run's device. Problems name the
recipe key and its YAML line (``models[1].data (line 9): ...``).

:func:`model_data` is the reusable part for methods that need each model and its data in other ways.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch

from suture.merge.calibrate import ModelData, Stats, collect_stats, sequential_gram
from suture.merge.derive import Architecture, architecture_of, load_module
from suture.merge.errors import InputError, RecipeError, SutureError
from suture.merge.execute import TensorTask, execute_in_memory
from suture.merge.methods import MergeMethod
from suture.merge.store import TensorStore
from suture.recipes.plan import Progress, torch_dtype
from suture.recipes.schema import DataOptions, Recipe

logger = logging.getLogger(__name__)


def data_options(r: Recipe) -> DataOptions:
    """The recipe's top-level `data:` options, defaults filled in."""
    return r.data or DataOptions()


def model_data(r: Recipe, stores: Mapping[str, TensorStore], keys: Sequence[str], architecture: Architecture | None,
               trust_remote_code: bool) -> list[ModelData]:
    """Each model in ``keys`` with its recipe data loaded and a builder for its module (nothing is built yet)."""
    from suture.recipes.steps import check_trust, load_data

    opts = data_options(r)
    entries = {str(e.model): (i, e) for i, e in enumerate(r.models or [])}
    check_trust({k: stores[k] for k in keys}, architecture, trust_remote_code)
    out = []
    for key in keys:
        i, entry = entries[key]
        where = r.where(("models", i, "data"))
        if entry.data is None:
            raise r.error(("models", i), "this model has no `data:` to learn from")
        store = stores[key]
        arch = architecture_of(store, architecture, trust_remote_code=trust_remote_code, chosen=architecture)
        if arch is None:
            raise r.error(("models", i, "model"), f"cannot build model {key} to run its data: it records no architecture; "
                          "name one with the top-level `architecture:` (package.module:factory) or use a zoo model or a "
                          "Hugging Face folder")
        try:
            data = load_data(entry.data, split=opts.split, max_items=opts.max_items, store=store)
        except SutureError as exc:
            raise InputError(f"{where}: {exc}") from None
        build = lambda store=store, arch=arch: load_module(store, arch)  # noqa: E731
        if entry.head is not None:
            build = _with_head(build, _model_head(r, i, entry.head))
        out.append(ModelData(key=key, data=data, build=build, where=where))
    return out


def _model_head(r: Recipe, i: int, value: str):
    """``models[i].head``: the task head (``FOLDER/head/``) whose logits this model's data stage scores."""
    from pathlib import Path

    from suture.merge.text_heads import load_head

    folder = Path(value).expanduser()
    if not folder.is_absolute() and r.base_dir is not None:
        folder = r.base_dir / folder
    try:
        return load_head(folder)
    except SutureError as exc:
        raise InputError(f"{r.where(('models', i, 'head'))}: {exc}") from None


def _with_head(build: Callable[[], torch.nn.Module], head) -> Callable[[], torch.nn.Module]:
    """A builder whose module ends in the task head (an encoder's pooled output -> that task's logits)."""
    from suture.merge.text_heads import attach_head

    return lambda: attach_head(build(), head)


def model_statistics(r: Recipe, method: MergeMethod, tasks: Sequence[TensorTask], stores: Mapping[str, TensorStore],
                     architecture: Architecture | None, device: torch.device, *, seed: int = 0,
                     trust_remote_code: bool = False, progress: Progress | None = None) -> dict[str, Stats]:
    """Per-model statistics for ``method`` (model key -> tensor name -> dict), for ``execute_plan(stats=...)``."""
    if method.needs_data is None:
        raise RecipeError(f"merge method {method.name!r} does not learn from data")
    keys = list(dict.fromkeys(src.model for t in tasks for src in t.sources))
    models = model_data(r, stores, keys, architecture, trust_remote_code)
    opts = data_options(r)
    if not method.sequential:
        return collect_stats(method.needs_data, models, batch_size=opts.batch_size, device=device, labels=opts.labels,
                             seed=seed, progress=progress)
    by_name = {t.out_name: t for t in tasks}
    out_dtype = torch_dtype(r.out_dtype or r.dtype)

    def merge(names: set[str], stats: Mapping[str, Stats]) -> dict[str, torch.Tensor]:
        chosen = [by_name[n] for n in by_name if n in names]
        return execute_in_memory(chosen, stores, out_dtype, device=device, compute_dtype=torch_dtype(r.dtype), seed=seed,
                                 stats=stats)

    return sequential_gram(models, list(by_name), merge, batch_size=opts.batch_size, device=device, progress=progress)
