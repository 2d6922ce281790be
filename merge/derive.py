"""Find a model's permutation spec and, when possible, a runnable module for it.

Two routes, tried in this order:

1. a runnable architecture: named explicitly (``pkg.module:factory`` + kwargs, the recipe's
   ``architecture`` key) or recorded in the model's ``config.json`` by :mod:`merge.zoo`; the module is
   traced with torch.fx on an example input (from calibration data or an explicit input shape);
2. tensor names + ``config.json`` for known families (llama/mistral/qwen2, gpt2, bert/roberta, vit,
   plain chains), with no model code.

A Hugging Face folder (``config.json`` with a ``model_type``) takes both: its spec from names + config, its
runnable module from transformers (:mod:`merge.hf_module`, never remote code). The runnable module is what
activation matching, BatchNorm reset, REPAIR and evaluation need.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from suture.merge.errors import AlignmentError, InputError
from suture.merge.spec import PermutationSpec
from suture.merge.store import TensorStore

logger = logging.getLogger(__name__)

ModuleFactory = Callable[[], nn.Module]
DEFAULT_SPATIAL = 32  # image side assumed for a Conv's input when `suture inspect` is given no input shape


@dataclass
class Architecture:
    """How to build an empty module of the model's architecture (factory reference + kwargs).

    `source` is the config.json that named the factory (None: the user named it in a recipe); a factory
    from model metadata outside Suture's zoo is built only with `trust_remote_code`.
    """

    factory: str
    kwargs: dict[str, Any]
    source: str | None = None
    trust_remote_code: bool = False

    def build(self) -> nn.Module:
        """A fresh module (random weights) in eval mode; refused before any import when not trusted."""
        from suture.merge.zoo import build_architecture, check_factory_trust

        check_factory_trust(self.factory, source=self.source, trust_remote_code=self.trust_remote_code)
        return build_architecture(self.factory, **self.kwargs).eval()


def parse_architecture(value: str | Mapping[str, Any] | None) -> Architecture | None:
    """`pkg.module:factory` or {factory, kwargs} from a recipe; None when not given."""
    if value is None:
        return None
    if isinstance(value, str):
        return Architecture(value, {})
    if isinstance(value, Mapping) and isinstance(value.get("factory"), str):
        return Architecture(value["factory"], dict(value.get("kwargs") or {}))
    raise InputError(f"architecture {value!r}: expected 'package.module:factory' or {{factory: ..., kwargs: {{...}}}}")


def architecture_of(store: TensorStore, explicit: Architecture | None = None, *, trust_remote_code: bool = False,
                    chosen: Architecture | None = None) -> Architecture | None:
    """The explicit architecture, else the one a config.json records (marked with its source), else None.

    A recorded factory equal to `chosen`'s (the user's own, e.g. written into a merged folder by this run)
    counts as the user's choice; any other outside the zoo needs `trust_remote_code` to be built.
    """
    if explicit is not None:
        return explicit
    from suture.merge.zoo import ARCH_KEY, CONFIG_FILE

    arch = (store.config or {}).get(ARCH_KEY)
    if isinstance(arch, Mapping) and isinstance(arch.get("factory"), str):
        kwargs = arch.get("kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise InputError(f"{store.source}: {ARCH_KEY}.kwargs in {CONFIG_FILE} must be a mapping, got {type(kwargs).__name__}")
        own = chosen is not None and chosen.source is None and chosen.factory == arch["factory"]
        source = None if own else _config_source(store)
        return Architecture(arch["factory"], dict(kwargs), source=source, trust_remote_code=trust_remote_code)
    from suture.merge.hf_module import hf_architecture, is_hf_config

    if is_hf_config(store.config):  # a Hugging Face folder: transformers builds it from config.json
        return hf_architecture(store, trust_remote_code=trust_remote_code)
    return None


def _config_source(store: TensorStore) -> str:
    """The config.json path of a store, for refusals (its source when it has no folder)."""
    from suture.merge.zoo import CONFIG_FILE

    path = getattr(store, "path", None)
    if path is None:
        return f"{store.source} {CONFIG_FILE}"
    from pathlib import Path

    folder = Path(path)
    return str((folder if folder.is_dir() else folder.parent) / CONFIG_FILE)


def load_module(store: TensorStore, architecture: Architecture) -> nn.Module:
    """Build the architecture and load the store's tensors into it (names must match)."""
    from suture.merge.zoo import load_into

    module = architecture.build()
    load_into(module, store.state_dict(), source=store.source)
    return module.eval()


def example_input(data: Any = None, input_shape: Sequence[int] | None = None) -> torch.Tensor:
    """A small input batch to trace with: two items of the calibration data, or zeros of `input_shape`."""
    if input_shape is not None:
        return torch.zeros(tuple(int(d) for d in input_shape))
    if data is not None:
        inputs = data.inputs
        if isinstance(inputs, Mapping):
            raise InputError("tracing needs a tensor input; give `input_shape` for models fed dicts")
        return inputs[:2]
    raise InputError("deriving a spec by tracing needs an example input: give calibration data or an input shape",
                     field=("input_shape",))


def derive_spec(
    store: TensorStore,
    *,
    architecture: Architecture | None = None,
    data: Any = None,
    input_shape: Sequence[int] | None = None,
    trust_remote_code: bool = False,
) -> tuple[PermutationSpec, Architecture | None]:
    """The permutation spec of a model (traced when runnable, else from names + config) and its architecture.

    A runnable model is traced on two items of `data`, on zeros of `input_shape`, or (given neither) on zeros
    shaped for its first Linear or Conv layer.
    """
    arch = architecture_of(store, architecture, trust_remote_code=trust_remote_code)
    from suture.merge.hf_module import HFArchitecture

    if isinstance(arch, HFArchitecture):  # the spec from names + config, the module from transformers
        return _family_spec(store), arch
    if arch is not None:
        module = load_module(store, arch)
        if data is None and input_shape is None:  # the first layer tells the input of a plain MLP/CNN
            input_shape = first_layer_input_shape(module)
        return _trace_spec(store, module, example_input(data, input_shape), arch), arch
    return _family_spec(store), None


def _family_spec(store: TensorStore) -> PermutationSpec:
    """The spec from tensor names + config.json for a family Suture knows (no model code)."""
    from suture.merge.graph.families import detect_family, spec_from_names

    family = detect_family(store.names(), store.config)
    if family is None:
        raise AlignmentError(
            f"{store.source}: cannot tell the architecture (no config.json model_type Suture knows, no recorded "
            "architecture); name its factory as package.module:factory",
            field=("architecture",),
        )
    spec = spec_from_names(store.shapes(), store.config, family)
    spec.validate(store.shapes())
    return spec


def spec_for_store(store: TensorStore, input_shape: Sequence[int] | None = None, *, trust_remote_code: bool = False) -> PermutationSpec:
    """The spec for `suture inspect --groups`: traced on zeros for runnable models, else from names + config.

    Without `input_shape` the shape comes from the model's first layer in forward order (a Linear's
    in_features, or a Conv's in_channels at a 32-pixel spatial size); when that cannot be told or tracing
    fails, the error asks for the shape.
    """
    from suture.merge.hf_module import HFArchitecture

    arch = architecture_of(store, trust_remote_code=trust_remote_code)
    if arch is None or isinstance(arch, HFArchitecture):
        return _family_spec(store)
    module = load_module(store, arch)
    shape = tuple(int(d) for d in input_shape) if input_shape else first_layer_input_shape(module)
    if shape is None:
        raise InputError(f"{store.source}: cannot tell the input shape of {arch.factory} (no Linear or Conv layer found); "
                         "give it, e.g. 1,3,32,32", field=("input_shape",))
    return _trace_spec(store, module, torch.zeros(shape), arch)


def first_layer_input_shape(module: nn.Module, spatial: int = DEFAULT_SPATIAL) -> tuple[int, ...] | None:
    """A two-item input for the first Linear/Conv the forward pass reaches (torch.fx order, else registration order)."""
    try:
        import torch.fx

        graph = torch.fx.symbolic_trace(module).graph
        mods = dict(module.named_modules())
        order = [mods[str(n.target)] for n in graph.nodes if n.op == "call_module" and str(n.target) in mods]
    except Exception:  # noqa: BLE001 - untraceable forward: registration order is the next best guess
        order = list(module.modules())
    for mod in order:
        if isinstance(mod, nn.Linear):
            return (2, mod.in_features)
        if isinstance(mod, nn.modules.conv._ConvNd):
            dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}.get(type(mod), len(mod.kernel_size))
            return (2, mod.in_channels, *([spatial] * dims))
    return None


def _trace_spec(store: TensorStore, module: nn.Module, example: torch.Tensor, arch: Architecture) -> PermutationSpec:
    """spec_from_module with one clear line (factory, input shape, what to give instead) when tracing fails."""
    from suture.merge.errors import SutureError
    from suture.merge.graph.trace import spec_from_module

    try:
        with contextlib.redirect_stderr(io.StringIO()):  # shape propagation prints the traceback it then raises
            spec = spec_from_module(module, example)
    except Exception as exc:  # noqa: BLE001 - torch.fx / shape propagation errors carry graph dumps, not user messages
        if isinstance(exc, SutureError) and "\n" not in str(exc):
            raise
        root = exc
        while root.__cause__ is not None:
            root = root.__cause__
        first = (str(root).strip().splitlines() or [type(root).__name__])[0]
        raise InputError(f"{store.source}: tracing {arch.factory} on an input of shape {list(example.shape)} failed "
                         f"({first}); give the model's input shape", field=("input_shape",)) from None
    try:
        spec.validate(store.shapes())
    except ValueError as exc:
        raise AlignmentError(f"{store.source}: the traced spec does not fit the stored tensors ({exc})") from None
    return spec
