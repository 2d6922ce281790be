"""Learned coefficients as a plain ``task_arithmetic`` recipe that reproduces the merge exactly.

AdaMerging and aTLAS only choose task-arithmetic weights; once learned, the merge needs no data. The export
writes each model's ``weight`` in mergekit's parameter forms, the most compact one that resolves to the
learned value for every tensor:

* one number when the model has one coefficient (task-wise);
* a gradient list with one value per layer (``t = i / (n - 1)`` lands on item i) when coefficients vary by
  block, with ``{filter, value}`` conditions before it for the tensors outside the blocks;
* otherwise ``{filter, value}`` conditions naming tensors (longest names first, so that a name that is a
  substring of another never captures it), the most common value as the filterless fallback.

Every candidate is checked through the recipe runner's own :class:`~suture.recipes.params.ParamResolver`
before it is used; tensors that were not learned get weight 0 (the base's values).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from suture.merge.coefficients import LearnedCoefficients
from suture.merge.errors import InputError
from suture.merge.layers import find_layer

logger = logging.getLogger(__name__)

Setting = float | list[Any]


def _gradient_setting(values: Mapping[str, float], n_layers: int | None) -> Setting | None:
    """Per-layer gradient (plus conditions for non-block tensors), or None when values vary inside a layer."""
    if not n_layers:
        return None
    per_layer: dict[int, float] = {}
    outside: dict[str, float] = {}
    for name, value in values.items():
        match = find_layer(name, generic=False)
        if match is None:
            outside[name] = value
        elif per_layer.setdefault(match.index, value) != value or match.index >= n_layers:
            return None
    if not per_layer:
        return None
    gradient, last = [], per_layer[min(per_layer)]
    for i in range(n_layers):
        last = per_layer.get(i, last)
        gradient.append(last)
    if not outside:
        return gradient
    conditions: list[Any] = [{"filter": n, "value": v} for n, v in sorted(outside.items(), key=lambda kv: -len(kv[0]))]
    return conditions + [{"value": gradient}]


def _filter_setting(values: Mapping[str, float], *, fallback: bool) -> Setting:
    """Exact-name conditions, longest first; with ``fallback`` the most common value needs no condition."""
    common = Counter(values.values()).most_common(1)[0][0] if fallback else None
    named = [(n, v) for n, v in values.items() if not fallback or v != common]
    conditions: list[Any] = [{"filter": n, "value": v} for n, v in sorted(named, key=lambda kv: -len(kv[0]))]
    if fallback:
        conditions.append({"value": common})
    return conditions


def _candidates(values: Mapping[str, float], n_layers: int | None) -> list[Setting]:
    distinct = set(values.values())
    if len(distinct) == 1:
        return [next(iter(distinct))]
    out: list[Setting] = []
    gradient = _gradient_setting(values, n_layers)
    if gradient is not None:
        out.append(gradient)
    out += [_filter_setting(values, fallback=True), _filter_setting(values, fallback=False)]
    return out


def _resolved_weights(recipe: Mapping[str, Any], names: Sequence[str], n_layers: int | None, index: int) -> dict[str, Any]:
    """What the recipe runner resolves as model ``index``'s weight for every tensor."""
    from suture.recipes.params import ParamResolver
    from suture.recipes.runner import load

    r = load(recipe)
    resolver = ParamResolver(r, num_layers=n_layers)
    ref = r.models[index].model  # type: ignore[index]
    out = {}
    for name in names:
        match = find_layer(name, generic=False)
        out[name] = resolver.get("weight", name, match.index if match else None, n_layers, model=ref)
    return out


def export_recipe(
    learned: LearnedCoefficients,
    *,
    base_model: str,
    models: Sequence[str],
    names: Sequence[str],
    n_layers: int | None,
    dtype: str | None = "float32",
    name: str | None = None,
) -> dict[str, Any]:
    """A ``task_arithmetic`` recipe (as a dict) whose per-model weights are the learned coefficients.

    ``models``: references of the fine-tuned models, in the order of ``learned.vectors``; ``names``: every
    tensor name of the base model (what the runner plans over); ``n_layers``: the runner's layer count for
    the base (``suture.merge.layers.num_layers(names, config)``).
    """
    if len(models) != len(learned.vectors):
        raise InputError(f"{len(learned.vectors)} learned task vectors but {len(models)} model references")
    recipe: dict[str, Any] = {}
    if name:
        recipe["name"] = name
    recipe.update({"merge_method": "task_arithmetic", "base_model": str(base_model),
                   "models": [{"model": str(ref), "parameters": {"weight": 0.0}} for ref in models]})
    recipe["parameters"] = {"normalize": False, "lambda": 1.0}
    if dtype:
        recipe["dtype"] = dtype
    for k in range(len(models)):
        values = {n: learned.weight(k, n) for n in names}
        for setting in _candidates(values, n_layers):
            recipe["models"][k]["parameters"]["weight"] = setting
            if _resolved_weights(recipe, names, n_layers, k) == values:
                break
        else:  # the exact-name list always resolves (longest names first); a guard against silent drift
            raise InputError(f"model {models[k]}: no weight setting reproduces the learned coefficients")
    return recipe


def recipe_yaml(recipe: Mapping[str, Any], comment: str = "") -> str:
    """The recipe as YAML text (validated by the recipe schema), with optional leading comment lines."""
    from suture.recipes.runner import load

    text = load(recipe).to_yaml()
    head = "".join(f"# {line}\n" for line in comment.splitlines()) if comment else ""
    return head + text


__all__ = ["export_recipe", "recipe_yaml"]
