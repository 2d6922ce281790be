"""Small deterministic architectures and trainers for the built-in demo (sklearn digits, CPU).

A saved zoo model is a folder with ``model.safetensors`` and ``config.json``; the config's
``"suture_architecture": {"factory": "suture.merge.zoo:mlp", "kwargs": {...}}`` lets :func:`load_module` rebuild
the ``nn.Module`` so that merged weights can be evaluated. The same ``factory`` string is what a recipe's
``architecture:`` key holds. Importing a factory runs that module's code, so a factory named by a model's
own ``config.json`` is built only when it is one of the zoo's (:func:`check_factory_trust`) or the user
opted in with ``trust_remote_code`` (the convention of ``transformers``).

Training is bit-reproducible: the model is initialised under ``torch.manual_seed(seed)``, batches are drawn
from a generator seeded with ``seed``, and training runs single-threaded (multi-threaded CPU reductions
may sum in a different order from run to run).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from suture.merge.data import CalibrationData, load_dataset
from suture.merge.errors import InputError, RecipeError, UntrustedCodeError
from suture.merge.store import open_store, read_json
from suture.merge.threads import single_threaded

logger = logging.getLogger(__name__)

ARCH_KEY = "suture_architecture"
DEMO_KEY = "suture_demo"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_DEMO_VERSION = 1


# --- architectures ------------------------------------------------------------------------------


class MLP(nn.Module):
    """Fully connected ReLU network: widths[0] inputs, widths[-1] logits, ReLU between layers."""

    def __init__(self, widths: Sequence[int] = (64, 512, 512, 512, 10)) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) < 2 or min(widths) < 1:
            raise ValueError(f"MLP widths must list at least two positive sizes, got {widths}")
        self.widths = widths
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with a residual add; a 1x1 conv+BN shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + skip)


class ResNetSmall(nn.Module):
    """A three-stage ResNet (width, 2*width, 4*width channels) for 8x8 single-channel digits."""

    def __init__(self, width: int = 16, num_classes: int = 10, in_channels: int = 1, image_size: int = 8) -> None:
        super().__init__()
        self.in_channels, self.image_size = in_channels, image_size
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = BasicBlock(width, width, 1)
        self.layer2 = BasicBlock(width, 2 * width, 2)
        self.layer3 = BasicBlock(2 * width, 4 * width, 2)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Accept flat (N, 64) features as well as (N, 1, 8, 8) images; reshape keeps torch.fx tracing simple.
        x = x.reshape(-1, self.in_channels, self.image_size, self.image_size)
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def mlp(widths: Sequence[int] = (64, 512, 512, 512, 10)) -> MLP:
    """The demo MLP (ReLU between Linear layers)."""
    return MLP(widths)


def resnet_small(width: int = 16, num_classes: int = 10) -> ResNetSmall:
    """The demo ResNet with BatchNorm and residual adds, for 8x8 digits."""
    return ResNetSmall(width=width, num_classes=num_classes)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "resnet": resnet_small}
FACTORY_REFS = {"mlp": "suture.merge.zoo:mlp", "resnet": "suture.merge.zoo:resnet_small"}


# Folders installed under `suture.` since 0.2: references saved before then ('merge.zoo:mlp') still resolve.
LEGACY_PACKAGES = ("merge", "stitch", "recipes", "app")


def canonical_factory(ref: str) -> str:
    """'merge.zoo:mlp' (a pre-namespace reference in old recipes and saved configs) -> 'suture.merge.zoo:mlp'."""
    ref = ref.strip()
    if ref.split(".", 1)[0].split(":", 1)[0] in LEGACY_PACKAGES:
        return f"suture.{ref}"
    return ref


TRUST_HINT = "pass --trust-remote-code (recipe: `trust_remote_code: true`; app: the trust toggle) if you trust it"


def is_zoo_factory(ref: Any) -> bool:
    """Whether `ref` names one of Suture's own architectures ('mlp', 'suture.merge.zoo:mlp', ...)."""
    trusted = set(ARCHITECTURES) | set(FACTORY_REFS.values()) | {f"{__name__}:{f.__name__}" for f in ARCHITECTURES.values()}
    return isinstance(ref, str) and canonical_factory(ref) in trusted


def check_factory_trust(ref: Any, *, source: str | None, trust_remote_code: bool = False) -> None:
    """Refuse, before anything is imported, a factory that model metadata names outside the zoo.

    `source` is the file that named the factory (a config.json); None means the user chose it (a recipe's
    `architecture:`), which is trusted as their own code. Importing a module runs it, so the check must
    come first.
    """
    if source is None or trust_remote_code or callable(ref) or is_zoo_factory(ref):
        return
    raise UntrustedCodeError(
        f"{source}: architecture factory {ref!r} is not one of Suture's zoo factories and building it would run "
        f"its code; {TRUST_HINT}"
    )


def resolve_factory(ref: str | Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Turn 'mlp', 'suture.merge.zoo:mlp' or 'pkg.module:Class.attr' into the callable it names."""
    if callable(ref):
        return ref
    if not isinstance(ref, str) or not ref.strip():
        raise RecipeError(f"architecture {ref!r}: expected 'package.module:factory' or one of {sorted(ARCHITECTURES)}")
    ref = canonical_factory(ref)
    if ":" not in ref:
        if ref in ARCHITECTURES:
            return ARCHITECTURES[ref]
        raise RecipeError(
            f"architecture {ref!r}: expected 'package.module:factory' (e.g. 'suture.merge.zoo:mlp') or one of {sorted(ARCHITECTURES)}"
        )
    module_name, _, attr_path = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise RecipeError(f"architecture {ref!r}: cannot import module {module_name!r} ({exc})") from exc
    for part in attr_path.split("."):
        if not part or not hasattr(obj, part):
            raise RecipeError(f"architecture {ref!r}: module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RecipeError(f"architecture {ref!r}: {attr_path!r} is a {type(obj).__name__}, not a callable that builds a module")
    return obj


def build_architecture(ref: str | Callable[..., nn.Module], **kwargs: Any) -> nn.Module:
    """Build an ``nn.Module`` from a factory reference ('pkg.module:factory' or a registry name) and kwargs."""
    factory = resolve_factory(ref)
    try:
        module = factory(**kwargs)
    except TypeError as exc:
        raise RecipeError(f"architecture {ref!r}: calling the factory with {kwargs} failed ({exc})") from exc
    if not isinstance(module, nn.Module):
        raise RecipeError(f"architecture {ref!r}: the factory returned a {type(module).__name__}, expected a torch.nn.Module")
    return module


def build_seeded(ref: str | Callable[..., nn.Module], seed: int, **kwargs: Any) -> nn.Module:
    """Build an architecture with its initial weights drawn under ``torch.manual_seed(seed)``."""
    with torch.random.fork_rng(devices=[]):  # keep the caller's global RNG stream untouched
        torch.manual_seed(seed)
        return build_architecture(ref, **kwargs)


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


# --- saving and loading -------------------------------------------------------------------------


def save_module(
    module: nn.Module,
    out_dir: str | Path,
    factory: str,
    kwargs: Mapping[str, Any] | None = None,
    extra_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (with the architecture reference) into ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    config = dict(extra_config or {})
    config[ARCH_KEY] = {"factory": factory, "kwargs": _jsonable(dict(kwargs or {}))}
    tmp_weights = out / f".{WEIGHTS_FILE}.tmp"
    save_file(state, str(tmp_weights), metadata={"format": "pt"})
    os.replace(tmp_weights, out / WEIGHTS_FILE)
    tmp_config = out / f".{CONFIG_FILE}.tmp"
    tmp_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp_config, out / CONFIG_FILE)
    return out


def config_path(path: str | Path) -> Path:
    """The config.json of a model folder (or the file itself)."""
    folder = Path(path)
    return folder / CONFIG_FILE if folder.is_dir() else folder


def read_architecture(path: str | Path) -> tuple[str, dict[str, Any]]:
    """The (factory, kwargs) recorded in a model folder's config.json."""
    config_file = config_path(path)
    if not config_file.is_file():
        raise InputError(f"model {str(path)!r}: no {CONFIG_FILE}; expected a folder written by save_module")
    config = read_json(config_file)
    arch = config.get(ARCH_KEY) if isinstance(config, Mapping) else None
    if not isinstance(arch, Mapping) or not isinstance(arch.get("factory"), str) or not isinstance(arch.get("kwargs") or {}, Mapping):
        raise InputError(
            f"{str(config_file)!r}: no {ARCH_KEY!r} entry (with a factory string and a kwargs mapping); expected {{\"factory\": \"pkg.module:factory\", \"kwargs\": {{...}}}} "
            "(or name the architecture in the recipe)"
        )
    return arch["factory"], dict(arch.get("kwargs") or {})


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a model folder or file (one file, a sharded index, or every *.safetensors file)."""
    store = open_store(path)
    try:
        return store.state_dict()
    finally:
        store.close()


def load_module(path: str | Path, state: Mapping[str, torch.Tensor] | None = None, strict: bool = True, *,
                trust_remote_code: bool = False) -> nn.Module:
    """Rebuild a module from a zoo-style folder (config.json architecture + weights) in eval mode.

    A factory outside the zoo is refused unless `trust_remote_code` (see :func:`check_factory_trust`).
    """
    factory, kwargs = read_architecture(path)
    check_factory_trust(factory, source=str(config_path(path)), trust_remote_code=trust_remote_code)
    module = build_architecture(factory, **kwargs)
    weights = load_state(path) if state is None else dict(state)
    load_into(module, weights, source=str(path), strict=strict)
    return module.eval()


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], source: str = "state", strict: bool = True) -> None:
    """load_state_dict with an InputError that names missing/unexpected/misshaped tensors."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    if misshaped or (strict and (missing or unexpected)):
        raise InputError(
            f"{source}: weights do not fit {type(module).__name__}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatches {misshaped[:5]}"
        )
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=strict)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# --- demo models --------------------------------------------------------------------------------

DEMO_TRAINING: dict[str, dict[str, Any]] = {
    # The Git Re-Basin digits setting: 64-512-512-512-10 ReLU MLP, Adam 1e-3, batch 64, 60 epochs.
    # The ResNet uses width 32: at width 16 even aligned midpoints stay poor (narrow nets barely merge).
    "mlp": {"factory": FACTORY_REFS["mlp"], "kwargs": {"widths": [64, 512, 512, 512, 10]}, "epochs": 60, "lr": 1e-3, "batch_size": 64},
    "resnet": {"factory": FACTORY_REFS["resnet"], "kwargs": {"width": 32, "num_classes": 10}, "epochs": 20, "lr": 1e-3, "batch_size": 64},
}
DEMO_DATA = "sklearn:digits"


def _demo_entry(settings: Mapping[str, Any], seed: int, data: str) -> dict[str, Any]:
    return {"version": _DEMO_VERSION, "seed": seed, "data": data, **{k: _jsonable(v) for k, v in settings.items()}}


def _cached(folder: Path, entry: Mapping[str, Any]) -> bool:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
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
    settings = {**settings, "kwargs": {**settings["kwargs"], **_jsonable(arch_kwargs)}}
    if epochs is not None:
        settings["epochs"] = int(epochs)
    suffix = "" if settings == _jsonable(DEMO_TRAINING[kind]) else "-" + _short_hash(settings)
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
