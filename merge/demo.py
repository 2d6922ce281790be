"""The built-in demo models: reproducible training of the zoo's architectures on sklearn digits (CPU), cached.

Training is bit-reproducible: the model is initialised under ``torch.manual_seed(seed)``, batches are drawn
from a generator seeded with ``seed``, and training runs single-threaded (multi-threaded CPU reductions
may sum in a different order from run to run). A cached demo folder records its training settings under
``config.json``'s ``suture_demo`` key and is retrained when they change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from suture.merge.data import CalibrationData, load_dataset
from suture.merge.errors import InputError, SutureError
from suture.merge.store import read_json
from suture.merge.threads import single_threaded
from suture.merge.zoo import CONFIG_FILE, FACTORY_REFS, WEIGHTS_FILE, jsonable, build_seeded, load_into, load_state, save_module

logger = logging.getLogger(__name__)

DEMO_KEY = "suture_demo"
_DEMO_VERSION = 1


# --- training -----------------------------------------------------------------------------------


def train(
    model: nn.Module,
    dataset: CalibrationData,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 0.0,
    eval_data: CalibrationData | None = None,
    target_accuracy: float | None = None,
) -> list[dict[str, float]]:
    """Train a classifier with Adam and cross-entropy, reproducibly; returns per-epoch history.

    With ``target_accuracy`` and ``eval_data`` training stops after the first epoch whose accuracy on
    ``eval_data`` reaches the target.
    """
    from suture.merge.evaluate import evaluate

    if dataset.labels is None:
        raise InputError(f"data {dataset.name!r}: training needs labels")
    if not isinstance(dataset.inputs, torch.Tensor):
        raise InputError(f"data {dataset.name!r}: the zoo trainer takes tensor inputs, not {type(dataset.inputs).__name__}")
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    history: list[dict[str, float]] = []
    n = len(dataset)
    with single_threaded():
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(n, generator=gen)
            total, count = 0.0, 0
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                loss = F.cross_entropy(model(dataset.inputs[idx]), dataset.labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
                count += len(idx)
            row = {"epoch": epoch + 1, "train_loss": total / max(count, 1)}
            if eval_data is not None:
                metrics = evaluate(model, eval_data)
                row.update(eval_loss=metrics["loss"], eval_accuracy=metrics["accuracy"])
            history.append(row)
            logger.debug("epoch %d: %s", epoch + 1, row)
            if target_accuracy is not None and row.get("eval_accuracy", -1.0) >= target_accuracy:
                break
    model.eval()
    return history


# --- demo models --------------------------------------------------------------------------------

DEMO_TRAINING: dict[str, dict[str, Any]] = {
    # The Git Re-Basin digits setting: 64-512-512-512-10 ReLU MLP, Adam 1e-3, batch 64, 60 epochs.
    # The ResNet uses width 32: at width 16 even aligned midpoints stay poor (narrow nets barely merge).
    "mlp": {"factory": FACTORY_REFS["mlp"], "kwargs": {"widths": [64, 512, 512, 512, 10]}, "epochs": 60, "lr": 1e-3, "batch_size": 64},
    "resnet": {"factory": FACTORY_REFS["resnet"], "kwargs": {"width": 32, "num_classes": 10}, "epochs": 20, "lr": 1e-3, "batch_size": 64},
}
DEMO_DATA = "sklearn:digits"


def _demo_entry(settings: Mapping[str, Any], seed: int, data: str) -> dict[str, Any]:
    return {"version": _DEMO_VERSION, "seed": seed, "data": data, **{k: jsonable(v) for k, v in settings.items()}}


def _cached(folder: Path, entry: Mapping[str, Any]) -> bool:
    try:
        config = read_json(folder / CONFIG_FILE)
    except SutureError:  # missing or damaged: not a cached demo model, so it is trained again
        return False
    return config.get(DEMO_KEY, {}).get("recipe") == entry and (folder / WEIGHTS_FILE).is_file()


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished temporary folder into place (replacing a stale one)."""
    if final.exists():
        shutil.rmtree(final, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:
        # Another process published the same model first (same seed, same bits): keep theirs.
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / WEIGHTS_FILE).is_file():
            raise


def _train_and_save(
    folder: Path,
    entry: dict[str, Any],
    *,
    init_state: Mapping[str, torch.Tensor] | None = None,
    train_data: str,
    eval_specs: Mapping[str, str],
) -> Path:
    """Build (or start from init_state), train, evaluate and save one demo model atomically."""
    from suture.merge.evaluate import evaluate

    model = build_seeded(entry["factory"], entry["seed"], **entry["kwargs"])
    if init_state is not None:
        load_into(model, init_state, source=f"base of {folder.name}")
    data = load_dataset(train_data, split="train")
    start = time.perf_counter()
    train(model, data, entry["epochs"], lr=entry["lr"], batch_size=entry["batch_size"], seed=entry["seed"])
    seconds = time.perf_counter() - start
    metrics = {label: evaluate(model, load_dataset(spec, split="test")) for label, spec in eval_specs.items()}
    logger.info("trained demo model %s in %.1f s: %s", folder.name, seconds, metrics)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    extra = {
        "architectures": [type(model).__name__],
        "model_type": f"suture-{type(model).__name__.lower()}",
        DEMO_KEY: {"recipe": entry, "train_seconds": round(seconds, 3), "test": metrics},
    }
    save_module(model, tmp, entry["factory"], entry["kwargs"], extra)
    _publish(tmp, folder)
    return folder


def demo_models(
    cache_dir: str | Path,
    kind: str = "mlp",
    seeds: Sequence[int] = (1, 2),
    epochs: int | None = None,
    **arch_kwargs: Any,
) -> list[Path]:
    """Train (once) and cache demo models ``<cache>/<kind>-seed<seed>/``, one per seed; returns the folders.

    Defaults follow :data:`DEMO_TRAINING`; ``epochs`` and architecture kwargs override them (the folder
    name then carries a short hash so different settings never share a cache entry).
    """
    if kind not in DEMO_TRAINING:
        raise InputError(f"demo kind {kind!r}: expected one of {sorted(DEMO_TRAINING)}")
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in DEMO_TRAINING[kind].items()}
    settings = {**settings, "kwargs": {**settings["kwargs"], **jsonable(arch_kwargs)}}
    if epochs is not None:
        settings["epochs"] = int(epochs)
    suffix = "" if settings == jsonable(DEMO_TRAINING[kind]) else "-" + _short_hash(settings)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in seeds:
        entry = _demo_entry(settings, int(seed), DEMO_DATA)
        folder = cache / f"{kind}-seed{seed}{suffix}"
        if not _cached(folder, entry):
            _train_and_save(folder, entry, train_data=DEMO_DATA, eval_specs={"digits": DEMO_DATA})
        paths.append(folder)
    return paths


FINETUNE_SETTINGS: dict[str, Any] = {
    "factory": FACTORY_REFS["mlp"],
    "kwargs": {"widths": [64, 128, 128, 10]},
    "base_epochs": 2,
    "finetune_epochs": 10,
    "lr": 1e-3,
    "batch_size": 64,
    "seed": 0,
}
FINETUNE_TASKS = {"ft_0_4": "sklearn:digits?classes=0-4", "ft_5_9": "sklearn:digits?classes=5-9"}


def demo_finetunes(cache_dir: str | Path) -> dict[str, Path]:
    """A small base MLP (briefly trained on all digits) and two fine-tunes of it on digits 0-4 and 5-9.

    Returns ``{"base": ..., "ft_0_4": ..., "ft_5_9": ...}`` folders under ``<cache>/finetune-*``. Each
    fine-tune forgets the other half of the classes, which is what task arithmetic / TIES merges repair.
    """
    s = FINETUNE_SETTINGS
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    evals = {"digits": DEMO_DATA, **{f"digits_{k[3:]}": v for k, v in FINETUNE_TASKS.items()}}
    common = {"factory": s["factory"], "kwargs": s["kwargs"], "lr": s["lr"], "batch_size": s["batch_size"]}
    base_entry = _demo_entry({**common, "epochs": s["base_epochs"]}, s["seed"], DEMO_DATA)
    base = cache / "finetune-base"
    if not _cached(base, base_entry):
        _train_and_save(base, base_entry, train_data=DEMO_DATA, eval_specs=evals)
    out = {"base": base}
    base_state = load_state(base)
    for i, (name, task) in enumerate(FINETUNE_TASKS.items(), start=1):
        entry = _demo_entry({**common, "epochs": s["finetune_epochs"], "base": base_entry}, s["seed"] + i, task)
        folder = cache / f"finetune-{name[3:].replace('_', '-')}"
        if not _cached(folder, entry):
            _train_and_save(folder, entry, init_state=base_state, train_data=task, eval_specs=evals)
        out[name] = folder
    return out


def _short_hash(value: Any) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]


TASK_TRAINING: dict[str, dict[str, Any]] = {
    # ZipIt's setting: one model per half of the classes, different initializations, 5-class heads
    "mlp": {"factory": FACTORY_REFS["mlp"], "kwargs": {"widths": [64, 128, 128, 128, 5]}, "epochs": 40, "lr": 1e-3, "batch_size": 64},
    # the BatchNorm ResNet at width 32 (at width 16 the stem is too narrow to zip well)
    "resnet": {"factory": FACTORY_REFS["resnet"], "kwargs": {"width": 32, "num_classes": 5}, "epochs": 20, "lr": 1e-3, "batch_size": 64},
}
TASK_DATA = {"0-4": ("sklearn:digits?classes=0-4&relabel=true", 10), "5-9": ("sklearn:digits?classes=5-9&relabel=true", 11)}


def demo_tasks(cache_dir: str | Path, kind: str = "mlp") -> dict[str, Path]:
    """Two models trained on different tasks (digits 0-4 and 5-9, labels 0..4 each) from different seeds.

    Returns ``{"0-4": ..., "5-9": ...}`` folders under ``<cache>/task-*`` (``task-resnet-*`` for the ResNet);
    concatenating their logits gives a 10-class classifier, the joint accuracy ZipIt reports.
    """
    if kind not in TASK_TRAINING:
        raise InputError(f"task demo kind {kind!r}: expected one of {sorted(TASK_TRAINING)}")
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for task, (spec, seed) in TASK_DATA.items():
        if kind == "resnet":
            spec += "&shape=image"
        entry = _demo_entry(TASK_TRAINING[kind], seed, spec)
        folder = cache / (f"task-{task}" if kind == "mlp" else f"task-{kind}-{task}")
        if not _cached(folder, entry):
            _train_and_save(folder, entry, train_data=spec, eval_specs={"task": spec})
        out[task] = folder
    return out
