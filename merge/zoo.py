"""Model factories: the zoo's architectures, factory references, the trust check, saving and loading modules.

A saved zoo model is a folder with ``model.safetensors`` and ``config.json``; the config's
``"suture_architecture": {"factory": "suture.merge.zoo:mlp", "kwargs": {...}}`` lets :func:`load_module` rebuild
the ``nn.Module`` so that merged weights can be evaluated. The same ``factory`` string is what a recipe's
``architecture:`` key holds. Importing a factory runs that module's code, so a factory named by a model's
own ``config.json`` is built only when it is one of the zoo's (:func:`check_factory_trust`) or the user
opted in with ``trust_remote_code`` (the convention of ``transformers``).

Training the built-in demo models lives in :mod:`suture.merge.demo`.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from suture.merge.errors import InputError, UntrustedCodeError
from suture.merge.store import open_store, read_json

logger = logging.getLogger(__name__)

ARCH_KEY = "suture_architecture"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


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
        raise InputError(f"architecture {ref!r}: expected 'package.module:factory' or one of {sorted(ARCHITECTURES)}")
    ref = canonical_factory(ref)
    if ":" not in ref:
        if ref in ARCHITECTURES:
            return ARCHITECTURES[ref]
        raise InputError(
            f"architecture {ref!r}: expected 'package.module:factory' (e.g. 'suture.merge.zoo:mlp') or one of {sorted(ARCHITECTURES)}"
        )
    module_name, _, attr_path = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"architecture {ref!r}: cannot import module {module_name!r} ({exc})") from exc
    for part in attr_path.split("."):
        if not part or not hasattr(obj, part):
            raise InputError(f"architecture {ref!r}: module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise InputError(f"architecture {ref!r}: {attr_path!r} is a {type(obj).__name__}, not a callable that builds a module")
    return obj


def build_architecture(ref: str | Callable[..., nn.Module], **kwargs: Any) -> nn.Module:
    """Build an ``nn.Module`` from a factory reference ('pkg.module:factory' or a registry name) and kwargs."""
    factory = resolve_factory(ref)
    try:
        module = factory(**kwargs)
    except TypeError as exc:
        raise InputError(f"architecture {ref!r}: calling the factory with {kwargs} failed ({exc})") from exc
    if not isinstance(module, nn.Module):
        raise InputError(f"architecture {ref!r}: the factory returned a {type(module).__name__}, expected a torch.nn.Module")
    return module


def build_seeded(ref: str | Callable[..., nn.Module], seed: int, **kwargs: Any) -> nn.Module:
    """Build an architecture with its initial weights drawn under ``torch.manual_seed(seed)``."""
    with torch.random.fork_rng(devices=[]):  # keep the caller's global RNG stream untouched
        torch.manual_seed(seed)
        return build_architecture(ref, **kwargs)


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
    config[ARCH_KEY] = {"factory": factory, "kwargs": jsonable(dict(kwargs or {}))}
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
            "(or name its architecture factory)"
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


def jsonable(value: Any) -> Any:
    """Tuples to lists, keys to strings: factory kwargs as config.json stores (and compares) them."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
