"""Planning a merge: from a validated recipe and opened models to a plan of tensor tasks (executed by merge.execute).

`models:` recipes merge every tensor of the reference model across models; `slices:` recipes renumber layers
consecutively across slices (frankenmerges). Per-tensor parameters come from the recipe's resolver, and
vocabulary-sized tensors get row remaps when the tokenizer setting changes the vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from suture.merge.errors import InputError, RecipeError
from suture.merge.layers import SliceLayout, find_layer, num_layers, rename_layer, tensor_section
from suture.merge.execute import SourceRef, TensorTask
from suture.merge.store import TensorStore, open_store
from suture.recipes.params import ParamResolver
from suture.recipes.schema import ModelRef, Recipe

Progress = Callable[[str, int, int, str], None]


@dataclass
class OpenedModels:
    """Model references resolved to local folders and opened as lazy stores, keyed by str(ref)."""

    refs: dict[str, ModelRef]
    paths: dict[str, Path]
    stores: dict[str, TensorStore]

    def folder(self, key: str) -> Path:
        """The folder holding a model's config/tokenizer files."""
        path = self.paths[key]
        return path if path.is_dir() else path.parent


def open_models(recipe: Recipe, *, allow_pickle: bool = False, strict: bool = False, progress: Progress | None = None) -> OpenedModels:
    """Resolve every referenced model (demo, local, Hub) and open it lazily."""
    from suture.merge.refs import resolve_ref

    allow_pickle = allow_pickle or recipe.allow_pickle
    strict = strict or recipe.strict
    refs = {str(r): r for r in recipe.referenced_models()}
    paths: dict[str, Path] = {}
    stores: dict[str, TensorStore] = {}
    for i, (key, ref) in enumerate(refs.items()):
        if ref.lora is not None:
            raise RecipeError(f"{recipe.source}: model {key}: LoRA references (model+lora) are not supported yet; merge the adapter first")
        if progress:
            progress("load", i, len(refs), key)
        location = ref.path if ref.revision is None else f"{ref.path}@{ref.revision}"
        paths[key] = resolve_ref(location, allow_pickle=allow_pickle)
        stores[key] = open_store(paths[key], allow_pickle=allow_pickle, strict=strict)
    if progress:
        progress("load", len(refs), len(refs), "")
    return OpenedModels(refs, paths, stores)


def torch_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype for a recipe dtype name (None stays None)."""
    return getattr(torch, name) if name else None


def _method_inputs(method, refs: list[ModelRef], base: ModelRef | None) -> tuple[list[ModelRef], ModelRef | None]:
    """Which models feed `tensors` and which is the separate base, per the method's base handling."""
    if method.uses_base:
        if base is None and method.requires_base:
            raise RecipeError(f"merge method {method.name!r} needs base_model")
        return [r for r in refs if r != base], base
    return list(refs), None


class _Planner:
    """Builds TensorTasks for a recipe over opened stores."""

    def __init__(self, recipe: Recipe, models: OpenedModels, vocab_names: set[str] | None = None) -> None:
        from suture.merge.methods import get_method

        self.recipe = recipe
        self.models = models
        self.method = get_method(recipe.merge_method or "")
        self.vocab_names = vocab_names or set()
        self.out_dtype = torch_dtype(recipe.out_dtype or recipe.dtype)

    def _params(self, resolver: ParamResolver, tensor: str, layer: int | None, n_layers: int | None, sources: list[ModelRef], slice_index: int | None,
                source_names: list[str] | None = None) -> tuple[list[dict], dict]:
        """Per-model and method-wide parameters of one output tensor.

        As in mergekit 0.1.5, a per-model ``filter`` is matched against that model's own tensor name (in a
        slice, its source layer number) and a method-wide one against the output name.
        """
        model_params = []
        for i, ref in enumerate(sources):
            values = {}
            name = source_names[i] if source_names is not None else tensor
            for p in self.method.model_params:
                values[p.name] = resolver.get(p.name, name, layer, n_layers, model=ref, slice_index=slice_index, default=p.default, required=p.required)
            model_params.append(values)
        params = {
            p.name: resolver.get(p.name, tensor, layer, n_layers, slice_index=slice_index, default=p.default, required=p.required)
            for p in self.method.global_params
        }
        return model_params, params

    def _check_compatible(self, tensor: str, refs: list[ModelRef], names: list[str]) -> None:
        shapes = {}
        for ref, name in zip(refs, names):
            store = self.models.stores[str(ref)]
            if name not in store:
                raise InputError(f"tensor {name!r} is missing from model {ref} ({store.source})")
            shapes[str(ref)] = store.shape(name)
        if tensor in self.vocab_names:
            return  # vocabulary rows are remapped to a common size before merging
        distinct = set(shapes.values())
        if len(distinct) > 1:
            listed = ", ".join(f"{k}: {list(v)}" for k, v in shapes.items())
            raise InputError(f"tensor {tensor!r} has different shapes across models ({listed}); "
                             "models of different widths need alignment with the OT engine, not a plain merge")

    def _task(self, out_name: str, feed: list[tuple[ModelRef, str]], base: tuple[ModelRef, str] | None, model_params: list[dict], params: dict) -> TensorTask:
        refs = [r for r, _ in feed] + ([base[0]] if base else [])
        self._check_compatible(out_name, refs, [n for _, n in feed] + ([base[1]] if base else []))
        return TensorTask(
            out_name=out_name,
            method=self.method.name,
            sources=[SourceRef(str(r), n) for r, n in feed],
            model_params=model_params,
            params=params,
            base=SourceRef(str(base[0]), base[1]) if base else None,
        )

    def plan_models(self) -> tuple[list[TensorTask], int | None]:
        """Tasks for a `models:` recipe: every tensor of the base (or first) model, merged across models."""
        r = self.recipe
        refs = [m.model for m in r.models or []]
        feed_refs, base = _method_inputs(self.method, refs, r.base_model)
        if not feed_refs and base is None:
            raise RecipeError(f"{r.source}: models: no input models")
        reference = base or feed_refs[0]
        ref_store = self.models.stores[str(reference)]
        names = ref_store.names()
        n_layers = num_layers(names, ref_store.config)
        resolver = ParamResolver(r, num_layers=n_layers)
        own = set().union(*per_model_tensors(r, self.models).values()) if self.method.needs_data else set()
        tasks = []
        for name in names:
            if name in own:  # a per-task head: kept per model, not merged
                continue
            match = find_layer(name, generic=False)
            layer = match.index if match else None
            model_params, params = self._params(resolver, name, layer, n_layers, feed_refs, None)
            tasks.append(self._task(name, [(ref, name) for ref in feed_refs], (base, name) if base else None, model_params, params))
        return tasks, n_layers

    def plan_slices(self) -> tuple[list[TensorTask], int]:
        """Tasks for a `slices:` recipe: layers renumbered consecutively across slices (frankenmerges)."""
        r = self.recipe
        slices = r.slices or []
        for s, sl in enumerate(slices):
            lengths = {src.layer_range[1] - src.layer_range[0] for src in sl.sources}
            if len(lengths) > 1:
                raise r.error(("slices", s, "sources"), f"every source of a slice needs the same number of layers, got {sorted(lengths)}")
        layout = SliceLayout([sl.sources[0].layer_range for sl in slices])
        resolver = ParamResolver(r)
        tasks: list[TensorTask] = []

        def slice_inputs(s: int) -> tuple[list[ModelRef], ModelRef | None]:
            sl = slices[s]
            return _method_inputs(self.method, [src.model for src in sl.sources], sl.base_model or r.base_model)

        def non_layer(section: str, s: int) -> None:
            feed_refs, base = slice_inputs(s)
            reference = base or feed_refs[0]
            for name in self.models.stores[str(reference)].names():
                if find_layer(name, generic=False) is None and tensor_section(name) == section:
                    model_params, params = self._params(resolver, name, None, None, feed_refs, s)
                    tasks.append(self._task(name, [(ref, name) for ref in feed_refs], (base, name) if base else None, model_params, params))

        non_layer("pre", 0)
        for slot in layout:
            sl = slices[slot.slice_index]
            feed_refs, base = slice_inputs(slot.slice_index)
            first = sl.sources[0]
            src_layer = {str(src.model): src.layer_range[0] + slot.offset for src in sl.sources}
            first_store = self.models.stores[str(first.model)]
            layer_names = [n for n in first_store.names() if (m := find_layer(n, generic=False)) and m.index == src_layer[str(first.model)]]
            if not layer_names:
                raise r.error(("slices", slot.slice_index, "sources", 0, "layer_range"), f"model {first.model} has no layer {src_layer[str(first.model)]}")
            for name in layer_names:
                out_name = rename_layer(name, slot.out_index)
                feed = [(ref, rename_layer(name, src_layer.get(str(ref), src_layer[str(first.model)]))) for ref in feed_refs]
                base_name = (base, rename_layer(name, src_layer.get(str(base), src_layer[str(first.model)]))) if base else None
                model_params, params = self._params(resolver, out_name, slot.out_index, None, feed_refs, slot.slice_index, [n for _, n in feed])
                tasks.append(self._task(out_name, feed, base_name, model_params, params))
        non_layer("post", len(slices) - 1)
        return tasks, layout.num_layers


def per_model_tensors(recipe: Recipe, models: OpenedModels) -> dict[str, list[str]]:
    """Each model's tensors that not every merged model has with the same shape (per-task heads), by model key.

    Only data-driven `models:` merges keep such tensors per model (the output is then a multi-head model);
    every other merge refuses tensors whose shapes differ. Empty when all models share all tensors.
    """
    from suture.merge.methods import get_method

    if recipe.slices or not recipe.models or recipe.merge_method is None or get_method(recipe.merge_method).needs_data is None:
        return {}
    method = get_method(recipe.merge_method)
    feed, _ = _method_inputs(method, [m.model for m in recipe.models], recipe.base_model)
    shapes = [models.stores[str(ref)].shapes() for ref in feed]
    shared = {n for n, shape in shapes[0].items() if all(s.get(n) == shape for s in shapes[1:])}
    own = {str(ref): [n for n in s if n not in shared] for ref, s in zip(feed, shapes)}
    return own if any(own.values()) else {}


def _vocabulary(recipe: Recipe, models: OpenedModels) -> tuple[Any, set[str]]:
    """The tokenizer plan (None when the recipe changes no vocabulary) and the names of vocabulary-sized tensors."""
    setting: Any = None
    if recipe.tokenizer is not None:
        setting = recipe.tokenizer.model_dump(mode="python", exclude_none=True)
        setting["source"] = str(recipe.tokenizer.source)
    elif recipe.tokenizer_source is not None:
        setting = str(recipe.tokenizer_source)
    if setting is None:
        return None, set()
    from suture.merge.tokenizer import embedding_tensor_names, plan_vocabulary

    dirs = {key: models.folder(key) for key in models.refs}
    base = str(recipe.base_model) if recipe.base_model is not None else None
    try:
        vocab = plan_vocabulary(setting, dirs, base)
    except RecipeError as exc:
        raise _tokenizer_error(recipe, exc) from None
    if vocab is None:
        return None, set()
    names: set[str] = set()
    for store in models.stores.values():
        names |= embedding_tensor_names(store.names(), store.config, shapes=store.shapes())
    return vocab, names


def _tokenizer_error(recipe: Recipe, exc: RecipeError) -> RecipeError:
    """A vocabulary-planning error pointed at its recipe key and YAML line.

    The tokenizer planner names the setting at fault (``tokenizer.tokens.bird.source: ...``) but knows no file
    or line; the recipe does. A ``tokenizer_source:`` shorthand is reported at that key.
    """
    root = "tokenizer" if recipe.tokenizer is not None else "tokenizer_source"
    key, sep, message = str(exc).partition(": ")
    if not sep or not key.startswith("tokenizer"):
        return recipe.error(root, str(exc))
    return recipe.error(key if root == "tokenizer" else root, message)


def _attach_vocab_remaps(tasks: list[TensorTask], vocab: Any, vocab_names: set[str], models: OpenedModels) -> None:
    """Give every vocabulary-sized task row remaps into the output vocabulary, and its output row count."""
    from suture.merge.tokenizer import embedding_remaps

    for task in tasks:
        if task.out_name not in vocab_names:
            continue
        name = task.out_name
        # mergekit's missing-row rule needs other models' rows too, so remaps load them lazily by name
        task.remaps = embedding_remaps(vocab, lambda key, name=name: models.stores[key].get(name))
        first = task.sources[0] if task.sources else task.base
        assert first is not None
        rest = models.stores[first.model].shape(first.tensor)[1:]
        task.out_shape = (vocab.vocab_size, *rest)


def reference_key(recipe: Recipe) -> str:
    """The model whose names, config and tokenizer the output follows: base_model, else the first model."""
    if recipe.base_model is not None:
        return str(recipe.base_model)
    if recipe.models:
        return str(recipe.models[0].model)
    return str(recipe.slices[0].sources[0].model)  # type: ignore[index]


def build(recipe: Recipe, models: OpenedModels) -> tuple[list[TensorTask], int | None, Any]:
    """The plan for a recipe over opened models: (tasks, output layer count, vocabulary plan)."""
    vocab, vocab_names = _vocabulary(recipe, models)
    planner = _Planner(recipe, models, vocab_names)
    tasks, n_layers = planner.plan_slices() if recipe.slices else planner.plan_models()
    if vocab is not None:
        _attach_vocab_remaps(tasks, vocab, vocab_names, models)
    return tasks, n_layers, vocab
