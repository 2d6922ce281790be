"""Data-driven merges of models with per-task heads: the merged trunk plus each model's own head, one multi-head model.

When the models of a data-driven merge (RegMean, Fisher, ...) do not share every tensor (fine-tunes of one
encoder with task heads of different sizes), the shared tensors are merged and each model keeps the rest as
its branch, written in the multi-head format ZipIt's partial zips use (:mod:`merge.multihead`): one module
per model with the merged trunk's tensors shared, the members' logits concatenated. Members are built from
their zoo (or recipe) architectures; transformers folders are not supported by that format.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from suture.merge.derive import Architecture, architecture_of, load_module
from suture.merge.execute import TensorTask, execute_in_memory
from suture.merge.store import TensorStore
from suture.recipes.schema import Recipe

logger = logging.getLogger(__name__)


def write_per_model_heads(folder: Path, r: Recipe, tasks: Sequence[TensorTask], stores: Mapping[str, TensorStore],
                          branches: Mapping[str, list[str]], stats: Any, architecture: Architecture | None,
                          device: torch.device, *, out_dtype: torch.dtype | None, compute_dtype: torch.dtype | None,
                          seed: int, trust_remote_code: bool) -> tuple[Any, dict[str, Any]]:
    """Merge the shared tensors, build each model with them and its own head, save the multi-head folder.

    Returns the multi-head module (for evaluation) and what report.json records about the heads.
    """
    from suture.merge.hf_module import HFArchitecture
    from suture.merge.multihead import MultiHeadModel, save_multihead

    merged = execute_in_memory(tasks, stores, out_dtype, device=device, compute_dtype=compute_dtype, seed=seed, stats=stats)
    index = {str(e.model): i for i, e in enumerate(r.models or [])}
    members, archs = [], []
    for key in branches:
        arch = architecture_of(stores[key], architecture, trust_remote_code=trust_remote_code, chosen=architecture)
        if arch is None or isinstance(arch, HFArchitecture):
            raise r.error(("models", index[key], "model"), f"model {key} keeps tensors of its own ({', '.join(branches[key][:3])}); "
                          "per-model heads are written as a multi-head model, which needs a zoo or recipe architecture, "
                          "not a transformers folder: merge the shared encoder tensors only")
        module = load_module(stores[key], arch)
        own = module.state_dict()
        module.load_state_dict({n: t.to(own[n].dtype) for n, t in merged.items()}, strict=False)
        members.append(module)
        archs.append({"factory": arch.factory, "kwargs": dict(arch.kwargs)})
    model = MultiHeadModel(members, trunk=list(merged), heads="concat")
    info = {"merge_method": r.merge_method, "per_model": {k: list(v) for k, v in branches.items()}}
    target = folder / ".heads"
    save_multihead(model, target, archs, extra=info, overwrite=True)
    for item in target.iterdir():
        item.replace(folder / item.name)
    target.rmdir()
    logger.info("kept %d models' own tensors as heads of a multi-head model", len(branches))
    return model, {"multihead": True, "trunk": len(merged), "per_model": info["per_model"]}
