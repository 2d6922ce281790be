"""Merge methods: pure tensor functions registered by name (mergekit's names, parameters and formulas).

Importing this package registers every built-in method: linear, slerp, nuslerp, multislerp, karcher,
task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear,
model_stock, sce, nearswap, passthrough, arcee_fusion, ram and ramplus_tl. Use ``run_method(name, MergeInputs(...))`` to merge one
tensor; it fills defaults and checks the inputs first. A new method is one kernel decorated with
``@merge_method`` (see :mod:`suture.merge.methods.registry`).
"""

from __future__ import annotations

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

# imported for their side effect: each module registers its methods
from suture.merge.methods import arcee_fusion as _arcee_fusion  # noqa: E402,F401
from suture.merge.methods import linear as _linear  # noqa: E402,F401
from suture.merge.methods import model_stock as _model_stock  # noqa: E402,F401
from suture.merge.methods import nearswap as _nearswap  # noqa: E402,F401
from suture.merge.methods import passthrough as _passthrough  # noqa: E402,F401
from suture.merge.methods import ram as _ram  # noqa: E402,F401
from suture.merge.methods import sce as _sce  # noqa: E402,F401
from suture.merge.methods import spherical as _spherical  # noqa: E402,F401
from suture.merge.methods import task_arithmetic as _task_arithmetic  # noqa: E402,F401

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
