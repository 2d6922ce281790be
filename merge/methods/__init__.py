"""Merge methods: pure tensor functions registered by name (mergekit's names, parameters and formulas).

Importing this package registers every built-in method: linear, slerp, nuslerp, multislerp, karcher,
task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear,
model_stock, sce, nearswap, passthrough, arcee_fusion, ram, ramplus_tl, and the data-free subspace merges
tsv_m, iso_c, iso_cts and wudi. Use ``run_method(name, MergeInputs(...))`` to merge one
tensor; it fills defaults and checks the inputs first. A new method is one module in this package
with a kernel decorated with ``@merge_method`` (see :mod:`suture.merge.methods.registry`).
"""

from __future__ import annotations

import importlib
import pkgutil

from suture.merge.methods.registry import (
    Flag,
    Fraction,
    MergeInputs,
    MergeMethod,
    MethodParams,
    NonNegative,
    Number,
    ParamDef,
    Positive,
    get_method,
    list_methods,
    merge_method,
    output_dtype,
    register,
    run_method,
)

# every module of this package is imported for its side effect: its @merge_method kernels register
# themselves, so a new method is one new module (helpers start with an underscore)
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Flag",
    "Fraction",
    "MergeInputs",
    "MergeMethod",
    "MethodParams",
    "NonNegative",
    "Number",
    "ParamDef",
    "Positive",
    "get_method",
    "list_methods",
    "merge_method",
    "output_dtype",
    "register",
    "run_method",
]
