"""Every deterministic merge method gives mergekit 0.1.5's tensors (relative error <= 1e-6).

Each case runs one recipe through mergekit's ``run_merge`` and through ``suture run`` and compares every
tensor: names, shapes, dtypes and values. Parameters come as scalars, gradients (read per layer, and at
t = 0 outside the blocks) and ``filter`` conditions, on ``models:`` and ``slices:`` recipes, over tiny
Llama, Mistral, Qwen2 and GPT-2 checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.parity.conftest import NEEDS_MERGEKIT, Zoo, compare, load_dir, run_mergekit, run_suture

pytest.importorskip("mergekit", reason=NEEDS_MERGEKIT)

FAMILIES = ["llama", "mistral", "qwen2", "gpt2"]


def value(variant: str, a: float, b: float) -> Any:
    """One parameter as a scalar (a), a gradient [a, b] or a filter (b on MLP tensors, a elsewhere)."""
    if variant == "scalar":
        return a
    if variant == "gradient":
        return [a, b]
    return [{"filter": "mlp", "value": b}, {"filter": "attn", "value": [b, a]}, {"value": a}]


def recipe_for(method: str, variant: str, zoo: Zoo, family: str) -> dict:
    """A ``models:`` recipe exercising ``method`` with parameters in the given variant."""
    b, f1, f2, f3 = (zoo.path(family, n) for n in ("base", "ft1", "ft2", "ft3"))
    v = lambda a, c: value(variant, a, c)  # noqa: E731
    r: dict[str, Any] = {"merge_method": method, "dtype": "float32"}
    if method == "linear":
        r["models"] = [{"model": f1, "parameters": {"weight": v(0.2, 0.9)}}, {"model": f2, "parameters": {"weight": v(0.7, 0.1)}},
                       {"model": f3, "parameters": {"weight": 0.4}}]
    elif method in ("slerp", "nearswap"):
        r["base_model"] = b
        r["models"] = [{"model": b}, {"model": f1}]
        r["parameters"] = {"t": v(0.3, 0.8) if method == "slerp" else v(0.0005, 0.002)}
    elif method == "nuslerp":
        r["models"] = [{"model": f1, "parameters": {"weight": v(0.3, 0.8)}}, {"model": f2, "parameters": {"weight": v(0.6, 0.2)}}]
        if variant == "filter":
            r["base_model"] = b
            r["parameters"] = {"nuslerp_row_wise": True}
        elif variant == "gradient":
            r["parameters"] = {"nuslerp_flatten": False}
    elif method == "multislerp":
        r["models"] = [{"model": f, "parameters": {"weight": v(w, 1 - w)}} for f, w in ((f1, 0.2), (f2, 0.5), (f3, 0.9))]
        if variant != "scalar":
            r["base_model"] = b
    elif method == "karcher":
        r["models"] = [{"model": f} for f in (f1, f2, f3)]
        r["parameters"] = {"max_iter": 10 if variant == "scalar" else 25, "tol": v(1e-5, 1e-7)}
    elif method == "model_stock":
        r["base_model"] = b
        r["models"] = [{"model": f1}, {"model": f2}, {"model": f3}]
        r["parameters"] = {"filter_wise": variant == "filter"}
    elif method == "sce":
        r["base_model"] = b
        r["models"] = [{"model": f1}, {"model": f2}, {"model": f3}]
        r["parameters"] = {"select_topk": v(0.3, 0.8)}
    elif method == "passthrough":
        r["models"] = [{"model": f2, "parameters": {"scale": v(0.5, 2.0)}}]
    else:  # task arithmetic family
        r["base_model"] = b
        models = []
        for f, w, d in ((f1, 0.6, 0.7), (f2, 0.3, 0.4), (f3, 0.5, 0.5)):
            params: dict[str, Any] = {"weight": v(w, 1 - w)}
            if method != "task_arithmetic":
                params["density"] = v(d, 1 - d / 2)
            if method.startswith("breadcrumbs"):
                params["gamma"] = v(0.05, 0.1)
            models.append({"model": f, "parameters": params})
        r["models"] = models
        r["parameters"] = {"lambda": v(1.0, 0.7)}
    return r


DETERMINISTIC = ["linear", "slerp", "nuslerp", "multislerp", "karcher", "task_arithmetic", "ties", "breadcrumbs",
                 "breadcrumbs_ties", "model_stock", "sce", "nearswap", "passthrough", "arcee_fusion", "ram",
                 "ramplus_tl"]
CASES = [(m, variant) for m in DETERMINISTIC for variant in ("scalar", "gradient", "filter")]


def _run_both(recipe: dict, tmp_path: Path) -> None:
    theirs = load_dir(run_mergekit(recipe, tmp_path / "mergekit"))
    ours = load_dir(run_suture(recipe, tmp_path / "suture"))
    compare(ours, theirs)


@pytest.mark.parametrize(("method", "variant"), CASES, ids=[f"{m}-{v}" for m, v in CASES])
def test_models_recipe_matches_mergekit(method: str, variant: str, zoo: Zoo, tmp_path: Path) -> None:
    family = FAMILIES[CASES.index((method, variant)) % len(FAMILIES)]
    recipe = recipe_for(method, variant, zoo, family)
    if method in ("arcee_fusion", "ram", "ramplus_tl"):
        recipe = new_method_recipe(method, variant, zoo, family)
    _run_both(recipe, tmp_path)


def new_method_recipe(method: str, variant: str, zoo: Zoo, family: str) -> dict:
    """Recipes for the methods mergekit 0.1.5 added: arcee_fusion (two models), RAM and RAM+ (base + models)."""
    b, f1, f2 = (zoo.path(family, n) for n in ("base", "ft1", "ft2"))
    r: dict[str, Any] = {"merge_method": method, "dtype": "float32", "base_model": b}
    if method == "arcee_fusion":
        r["models"] = [{"model": b}, {"model": f1}]
        return r
    r["models"] = [{"model": f1}, {"model": f2}]
    if method == "ram":
        r["parameters"] = {"epsilon": value(variant, 0.02, 0.01)}
    else:
        r["parameters"] = {"r": value(variant, 0.3, 0.6), "alpha": value(variant, 0.2, 0.5), "epsilon": 0.02}
    return r


SLICE_METHODS = ["linear", "slerp", "task_arithmetic", "ties", "passthrough", "model_stock"]


@pytest.mark.parametrize("method", SLICE_METHODS)
def test_slices_recipe_matches_mergekit(method: str, zoo: Zoo, tmp_path: Path) -> None:
    """Two output slices from different layer ranges; gradients run per slice, edges read the first/last."""
    family = FAMILIES[SLICE_METHODS.index(method) % len(FAMILIES)]
    b, f1, f2 = (zoo.path(family, n) for n in ("base", "ft1", "ft2"))
    grad = [0.2, 0.9]
    r: dict[str, Any] = {"merge_method": method, "dtype": "float32"}
    if method == "passthrough":
        r["slices"] = [{"sources": [{"model": f1, "layer_range": [0, 3]}]},
                       {"sources": [{"model": f2, "layer_range": [1, 4], "parameters": {"scale": grad}}]}]
    elif method == "slerp":
        r["base_model"] = b
        r["slices"] = [{"sources": [{"model": b, "layer_range": [0, 2]}, {"model": f1, "layer_range": [1, 3]}]},
                       {"sources": [{"model": b, "layer_range": [2, 4]}, {"model": f1, "layer_range": [2, 4]}],
                        "parameters": {"t": [{"filter": "mlp", "value": 0.1}, {"value": [0.6, 0.3]}]}}]
        r["parameters"] = {"t": grad}
    else:
        ta = method in ("task_arithmetic", "ties", "model_stock")
        if ta:
            r["base_model"] = b
        first = [{"model": f1, "layer_range": [0, 3], "parameters": {"weight": grad, "density": 0.6}},
                 {"model": f2, "layer_range": [1, 4], "parameters": {"weight": 0.5, "density": [0.9, 0.4]}}]
        second = [{"model": f1, "layer_range": [3, 4]}, {"model": f2, "layer_range": [2, 3]}]
        if ta:
            first.append({"model": b, "layer_range": [0, 3]})
            second.append({"model": b, "layer_range": [3, 4]})
        if method in ("linear", "model_stock"):
            for s in first + second:
                s.get("parameters", {}).pop("density", None)
        r["slices"] = [{"sources": first}, {"sources": second, "parameters": {"weight": [0.3, 0.8], "density": 0.7}}]
        if method == "model_stock":
            for s in r["slices"]:
                s.pop("parameters", None)
                for src in s["sources"]:
                    src.pop("parameters", None)
        else:
            r["parameters"] = {"weight": 1.0}
    _run_both(r, tmp_path)


OPTIONS = [
    ("ties", {"normalize": False}), ("ties", {"rescale": True}), ("ties", {"int8_mask": True}),
    ("task_arithmetic", {"normalize": True}), ("task_arithmetic", {"rescale": True, "int8_mask": True}),
    ("breadcrumbs_ties", {"normalize": True, "int8_mask": True}), ("sce", {"int8_mask": True}),
    ("linear", {"normalize": False}),
]


@pytest.mark.parametrize(("method", "options"), OPTIONS, ids=[f"{m}-{'-'.join(o)}" for m, o in OPTIONS])
def test_normalize_rescale_int8_mask(method: str, options: dict, zoo: Zoo, tmp_path: Path) -> None:
    family = FAMILIES[OPTIONS.index((method, options)) % len(FAMILIES)]
    r = recipe_for(method, "gradient", zoo, family)
    r.setdefault("parameters", {}).update(options)
    _run_both(r, tmp_path)


DTYPES = [("float32", "bfloat16"), ("bfloat16", None), ("float16", "float32"), ("bfloat16", "float16")]


@pytest.mark.parametrize(("dtype", "out_dtype"), DTYPES, ids=[f"{a}-{b}" for a, b in DTYPES])
@pytest.mark.parametrize("method", ["linear", "ties", "slerp"])
def test_dtype_and_out_dtype(method: str, dtype: str, out_dtype: str | None, zoo: Zoo, tmp_path: Path) -> None:
    r = recipe_for(method, "scalar", zoo, "llama")
    r["dtype"] = dtype
    if out_dtype:
        r["out_dtype"] = out_dtype
    _run_both(r, tmp_path)


#: methods whose mergekit output leaves the recipe dtype: a float32 mask or factor promotes the result
PROMOTED_TO_FLOAT32 = {"arcee_fusion", "ramplus_tl"}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("method", [m for m in DETERMINISTIC if m not in ("linear", "ties", "slerp")])
def test_half_precision_merges(method: str, dtype: str, zoo: Zoo, tmp_path: Path) -> None:
    """mergekit merges in ``dtype``; every method rounds where mergekit rounds.

    Two deliberate differences: Suture writes the recipe dtype where mergekit's arcee_fusion/ramplus_tl
    promote to float32 (compared after rounding mergekit's values to the dtype).
    """
    r = recipe_for(method, "gradient", zoo, "qwen2")
    if method in ("arcee_fusion", "ram", "ramplus_tl"):
        r = new_method_recipe(method, "gradient", zoo, "qwen2")
    r["dtype"] = dtype
    theirs = load_dir(run_mergekit(r, tmp_path / "mergekit"))
    ours = load_dir(run_suture(r, tmp_path / "suture"))
    want = getattr(torch, dtype)
    assert {t.dtype for t in ours.values()} == {want}
    if method in PROMOTED_TO_FLOAT32:
        assert {t.dtype for t in theirs.values()} == {torch.float32}
        theirs = {k: v.to(want) for k, v in theirs.items()}
    compare(ours, theirs)


def test_slices_edges_follow_first_and_last_slice(zoo: Zoo, tmp_path: Path) -> None:
    """Embeddings merge the first slice's models, the final norm and head the last slice's, both at t = 0;
    a per-source filter matches the source's own tensor name, a slice-level one the output name."""
    b, f1, f2, f3 = (zoo.path("llama", n) for n in ("base", "ft1", "ft2", "ft3"))
    r = {
        "merge_method": "linear", "dtype": "float32",
        "slices": [
            {"sources": [{"model": f1, "layer_range": [0, 2], "parameters": {"weight": [0.9, 0.1]}},
                         {"model": f2, "layer_range": [2, 4], "parameters": {"weight": [{"filter": "layers.3.", "value": 5.0}, {"value": 0.5}]}}]},
            {"sources": [{"model": f3, "layer_range": [1, 4], "parameters": {"weight": [0.2, 0.8, 0.4]}},
                         {"model": b, "layer_range": [0, 3]}],
             "parameters": {"weight": [{"filter": "layers.4.", "value": 3.0}, {"value": [0.7, 0.1]}]}},
        ],
    }
    _run_both(r, tmp_path)
