"""A runnable module for a Hugging Face model folder, built from its ``config.json`` with transformers.

Activation matching, REPAIR, evaluation and the other engines that run models need an ``nn.Module``; a Hub
folder has no Suture architecture entry, but ``config.json`` names its transformers class. The module is
built with ``AutoConfig`` + the class named in ``config.architectures`` (else ``AutoModel``) and never runs
code shipped with the model: a config whose ``auto_map`` points at custom code is refused unless the caller
opts in with ``trust_remote_code``. Random initial weights are then replaced by the store's tensors.

The built module's ``state_dict()`` has exactly the store's tensor names, so every loader in the project
(``merge.zoo.load_into``, ``load_state_dict``, interpolation paths, the REPAIR rewrite) works unchanged:

* a checkpoint saved with the base model's prefix (``bert.``, ``model.``, ``transformer.``) around a headless
  class gets a wrapper holding the model under that prefix; a head class whose checkpoint lacks the prefix
  falls back to the class's base model;
* tied weights the checkpoint leaves out (``lm_head.weight`` tied to the input embedding) are dropped from
  ``state_dict()`` and not reported missing when loading;
* layers transformers renames in memory (its conversion mapping: recent releases load ViT's
  ``encoder.layer.N.attention.attention.query`` as ``layers.N.attention.q_proj`` and save the old name back) are
  answered under the checkpoint's names by a wrapper (state dict, ``named_modules``, ``get_submodule``);
* non-persistent buffers the checkpoint still carries (old BERT checkpoints' ``embeddings.position_ids``) are
  exposed under their names and ignored when loading.

Anything else missing or unexpected is an error that names the tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from suture.merge.derive import Architecture
from suture.merge.errors import AlignmentError, InputError
from suture.merge.spec import PermutationSpec

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")
_SUTURE_ARCH_KEY = "suture_architecture"


def is_hf_config(config: Mapping[str, Any] | None) -> bool:
    """True for a transformers config.json (a `model_type`, no Suture architecture entry)."""
    return isinstance(config, Mapping) and isinstance(config.get("model_type"), str) and _SUTURE_ARCH_KEY not in config


@dataclass
class HFArchitecture(Architecture):
    """A transformers class built from a config (no remote code) whose state names are the store's names."""

    # `source` stays None: a transformers class is library code, not code the model ships (that is `auto_map`,
    # refused in build() unless `trust_remote_code`)
    config: dict[str, Any] = field(default_factory=dict)
    names: tuple[str, ...] = ()
    label: str = "model"
    path: str | None = None

    def build(self) -> nn.Module:
        """A fresh module (random weights) in eval mode whose state_dict() names are exactly `names`."""
        model = _instantiate(self.config, self.label, self.path, self.trust_remote_code)
        module = _fit_names(model, set(self.names))
        return module.eval()


def hf_architecture(store: Any, *, trust_remote_code: bool = False) -> HFArchitecture:
    """The transformers architecture of a store whose config.json is a Hugging Face config."""
    config = dict(store.config or {})
    return HFArchitecture(
        factory=f"transformers:{_class_name(config)}",
        kwargs={},
        config=config,
        names=tuple(store.names()),
        label=str(store.source),
        path=str(store.path) if getattr(store, "path", None) is not None else None,
        trust_remote_code=trust_remote_code,
    )


def tokenizer_folder(store: Any) -> str | None:
    """The model folder when it holds tokenizer files (text data is encoded with them), else None."""
    path = getattr(store, "path", None)
    if path is None:
        return None
    folder = Path(path)
    folder = folder if folder.is_dir() else folder.parent
    return str(folder) if any((folder / name).is_file() for name in TOKENIZER_FILES) else None


# --- building ------------------------------------------------------------------------------------


def _class_name(config: Mapping[str, Any]) -> str:
    """The transformers class config.architectures names, when transformers has it; else AutoModel."""
    import transformers

    for name in config.get("architectures") or []:
        cls = getattr(transformers, str(name), None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return str(name)
    return "AutoModel"


def check_remote_code(config: Mapping[str, Any], source: str, trust_remote_code: bool) -> None:
    """Refuse a config whose `auto_map` points at code shipped with the model, unless the user opted in."""
    if config.get("auto_map") and not trust_remote_code:
        from suture.merge.errors import UntrustedCodeError
        from suture.merge.zoo import TRUST_HINT

        raise UntrustedCodeError(
            f"{source}: config.json maps to custom model code (auto_map {sorted(config['auto_map'])}) and building it "
            f"would run that code; {TRUST_HINT}"
        )


def _instantiate(config: Mapping[str, Any], source: str, path: str | None, trust_remote_code: bool) -> nn.Module:
    import transformers
    from transformers import AutoConfig, AutoModel

    check_remote_code(config, source, trust_remote_code)
    values = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version", "_name_or_path", "auto_map")}
    try:
        if trust_remote_code and config.get("auto_map"):
            if path is None:
                raise InputError(f"{source}: custom model code needs the model folder")
            folder = Path(path) if Path(path).is_dir() else Path(path).parent
            cfg = AutoConfig.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True)
            return AutoModel.from_config(cfg, trust_remote_code=True)
        cfg = AutoConfig.for_model(str(config["model_type"]), **values)
        name = _class_name(config)
        if name == "AutoModel":
            return AutoModel.from_config(cfg, trust_remote_code=False)
        return getattr(transformers, name)(cfg)
    except InputError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, ImportError, OSError) as exc:
        raise InputError(f"{source}: transformers cannot build model_type {config.get('model_type')!r} from config.json ({exc})") from None


def _tied_aliases(model: nn.Module) -> dict[str, list[str]]:
    """State names grouped by the tensor they share (tied weights), each name mapped to its aliases."""
    by_id: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(tensor), []).append(name)
    return {name: [n for n in names if n != name] for names in by_id.values() for name in names}


def _candidates(model: nn.Module) -> Iterable[tuple[nn.Module, str]]:
    """(module, prefix to wrap it under): the model as is, under its base prefix, or its headless base model."""
    yield model, ""
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        yield getattr(model, prefix), ""
    elif prefix:
        yield model, prefix


def _fit_names(model: nn.Module, names: set[str]) -> nn.Module:
    """The module (maybe wrapped or headless) whose state names best match `names`, with the name hooks attached."""
    best, best_score, inner = model, None, model
    for candidate, prefix in _candidates(model):
        module = _Prefixed(prefix, candidate) if prefix else candidate
        renames = {} if prefix else _checkpoint_names(candidate)
        for option in (module, _Renamed(candidate, renames)) if renames else (module,):
            own = set(option.state_dict())
            score = len(own & names) - len(own - names)
            if best_score is None or score > best_score:
                best, best_score, inner = option, score, candidate
    _attach_name_hooks(best, names)
    best.suture_objective = _objective(inner)  # how merge.evaluate scores token logits
    return best


class _Prefixed(nn.Module):
    """A model held under its checkpoint's prefix (`bert.`, `model.`, `transformer.`) so state names match."""

    def __init__(self, prefix: str, model: nn.Module) -> None:
        super().__init__()
        self.prefix = prefix
        self.add_module(prefix, model)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, self.prefix)(*args, **kwargs)


def _checkpoint_names(model: nn.Module) -> dict[str, str]:
    """In-memory state name -> the name transformers saves it under, for the tensors its conversion mapping renames
    (recent versions load ViT's ``encoder.layer.N.attention.attention.query`` as ``layers.N.attention.q_proj`` and
    save it back under the old name). Empty when nothing is renamed, or when a tensor is converted, not renamed."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers before its conversion mapping: names on disk are the names in memory
        return {}
    state = model.state_dict(keep_vars=True)
    try:
        saved = revert_weight_conversion(model, dict(state))
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError):  # transformers' internals: no renaming then
        return {}
    by_id: dict[int, list[str]] = {}
    for name, tensor in state.items():
        by_id.setdefault(id(tensor), []).append(name)  # tied weights: one tensor, several names
    renames: dict[str, str] = {}
    for disk, tensor in saved.items():
        own = by_id.get(id(tensor))
        if own is None or (disk not in own and len(own) > 1):
            return {}  # a converted (split, merged, reshaped) tensor, or a renamed tied one: not a plain rename
        if disk not in own:
            renames[own[0]] = disk
    return renames


class _Renamed(nn.Module):
    """A transformers model answering to its checkpoint's tensor names (see :func:`_checkpoint_names`):
    ``state_dict()``, ``load_state_dict()``, ``named_modules()`` and ``get_submodule()`` speak the names on disk,
    so a spec derived from the files finds the layer behind every tensor."""

    def __init__(self, model: nn.Module, renames: Mapping[str, str]) -> None:
        super().__init__()
        self.model = model
        self._to_disk = dict(renames)
        self._to_memory = {v: k for k, v in renames.items()}
        modules: dict[str, str] = {}
        for own, disk in renames.items():
            (own_mod, own_leaf), (disk_mod, disk_leaf) = own.rpartition(".")[::2], disk.rpartition(".")[::2]
            if own_leaf == disk_leaf:
                modules[own_mod] = disk_mod
        self._module_to_disk = modules
        self._module_to_memory = {v: k for k, v in modules.items()}
        # plain functions of the module the hook is called with, so copies (deepcopy) rename their own tensors
        self.register_state_dict_post_hook(_names_on_save)
        self.register_load_state_dict_pre_hook(_names_on_load)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("model")  # absent while copy/pickle rebuilds the object
            if inner is None:
                raise
            return getattr(inner, name)  # config, generation helpers, ...

    def named_modules(self, memo: set | None = None, prefix: str = "", remove_duplicate: bool = True) -> Iterable[tuple[str, nn.Module]]:
        for name, mod in super().named_modules(memo, prefix, remove_duplicate):
            rest = name[len(prefix):].lstrip(".")
            if rest.startswith("model."):
                own = rest[len("model."):]
                name = ".".join(x for x in (prefix, self._module_to_disk.get(own, own)) if x)
            yield name, mod

    def get_submodule(self, target: str) -> nn.Module:
        if not target:
            return self
        return self.model.get_submodule(self._module_to_memory.get(target, target))


def _rekey(state: dict, rename: Any) -> None:
    items = list(state.items())
    state.clear()
    state.update((rename(k), v) for k, v in items)


def _names_on_save(mod: _Renamed, state: dict, prefix: str, _meta: Any) -> None:
    head = prefix + "model."
    _rekey(state, lambda k: prefix + mod._to_disk.get(k[len(head):], k[len(head):]) if k.startswith(head) else k)


def _names_on_load(mod: _Renamed, state: dict, prefix: str, *_: Any) -> None:
    def to_memory(k: str) -> str:
        rest = k[len(prefix):] if k.startswith(prefix) else None
        return k if rest is None else f"{prefix}model.{mod._to_memory.get(rest, rest)}"

    _rekey(state, to_memory)


def _attach_name_hooks(module: nn.Module, names: set[str]) -> None:
    """Make state_dict() report exactly `names` where tied weights or non-persistent buffers differ."""
    aliases = _tied_aliases(module)
    own = set(aliases)
    tied_absent = {n for n in own - names if any(a in names for a in aliases[n])}
    buffers = dict(module.named_buffers())
    extra_buffers = {n for n in names - own if n in buffers}

    def on_save(mod: nn.Module, state: dict, prefix: str, _meta: Any) -> None:
        if prefix:
            return
        for name in tied_absent:
            state.pop(name, None)
        for name in extra_buffers:
            state[name] = mod.get_buffer(name).detach()

    def on_load(_mod: nn.Module, keys: Any) -> None:
        keys.missing_keys[:] = [k for k in keys.missing_keys if k not in tied_absent]
        keys.unexpected_keys[:] = [k for k in keys.unexpected_keys if k not in extra_buffers]

    module.register_state_dict_post_hook(on_save)
    module.register_load_state_dict_post_hook(on_load)


def _objective(module: nn.Module) -> str | None:
    """'masked' for masked-LM heads (each token scored at its own position), 'causal' for LM heads, else None."""
    name = type(module).__name__
    if name.endswith("ForMaskedLM"):
        return "masked"
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal"
    return None


# --- observing groups ----------------------------------------------------------------------------


def hf_taps(spec: PermutationSpec, module: nn.Module) -> dict[str, list[Any]]:
    """Where each spec group's units can be observed in a transformers module, from the groups' members.

    A member on a norm's weight, a Linear's rows, GPT-2's Conv1D columns or an embedding's columns means the
    module's output carries the group on its last axis; a Linear's columns (Conv1D rows) mean its input does.
    Norm outputs are preferred (the residual stream, normalised), then other outputs, then inputs. Members
    with a fused (`outer`) or grouped-query (`repeat`) layout are not observed directly.
    """
    from suture.merge.graph.trace import Tap

    modules = dict(module.named_modules())
    taps: dict[str, list[Tap]] = {}
    for group in spec.active_groups():
        tiers: list[list[Tap]] = [[], [], []]
        seen: set[tuple[str, str]] = set()
        for m in group.members:
            if m.outer != 1 or m.repeat != 1 or not m.tensor.endswith(".weight"):
                continue
            owner = m.tensor.removesuffix(".weight")
            mod = modules.get(owner)
            if mod is None:
                continue
            where, tier = _observed(mod, m.axis, m.role)
            if where is None or (owner, where) in seen:
                continue
            seen.add((owner, where))
            tiers[tier].append(Tap(group.name, owner, where, axis=-1, inner=m.inner))
        chosen = next((t for t in tiers if t), [])
        if chosen:
            taps[group.name] = chosen
    return taps


def _observed(mod: nn.Module, axis: int, role: str) -> tuple[str | None, int]:
    """('output' or 'input' or None, preference tier) for a weight member of `mod`."""
    kind = type(mod).__name__
    weight = getattr(mod, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None, 0
    axis = axis % weight.dim()
    if weight.dim() == 1 and "Norm" in kind:
        return "output", 0
    if isinstance(mod, nn.Linear):
        return ("output", 1) if axis == 0 else ("input", 2)
    if kind == "Conv1D":  # transformers' GPT-2 layer: weight is (in, out)
        return ("output", 1) if axis == 1 else ("input", 2)
    if isinstance(mod, nn.Embedding) and axis == 1:
        return "output", 1
    return None, 0


def refuse_hf(architecture: Architecture | None, what: str, why: str) -> None:
    """Raise one AlignmentError line when an engine cannot run on a transformers model."""
    if isinstance(architecture, HFArchitecture):
        raise AlignmentError(f"{what} does not apply to the transformers model {architecture.label}: {why}")
