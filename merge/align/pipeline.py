"""Align several models to a reference and expose the aligned models as lazy tensor stores.

This is the one ``apply(store, alignment, spec)`` of the architecture: a :class:`PermutedStore` applies
the permutations of a :class:`~merge.align.MatchResult` to each tensor as it is read, so an aligned model
feeds any merge method (or the writer, to save the permuted model) without a second copy in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from suture.merge.align import MatchResult
from suture.merge.derive import Architecture, derive_spec, load_module
from suture.merge.errors import AlignmentError
from suture.merge.spec import PermutationSpec, permute_tensor
from suture.merge.store import TensorInfo, TensorStore

logger = logging.getLogger(__name__)

Engine = Literal["weight_matching", "activation_matching", "ot"]
PERMUTATION_ENGINES = ("weight_matching", "activation_matching")
ENGINES = (*PERMUTATION_ENGINES, "ot")


class PermutedStore(TensorStore):
    """A store whose tensors are read from `inner` and permuted by group (shapes are unchanged)."""

    def __init__(self, inner: TensorStore, spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> None:
        super().__init__(f"{inner.source} (aligned)", dict(inner._infos), path=inner.path, config=inner.config, strict=inner.strict)
        self.inner = inner
        self.spec = spec
        self.perms = dict(perms)

    def _read(self, name: str, info: TensorInfo) -> torch.Tensor:
        return permute_tensor(self.inner._read(name, info), name, self.spec, self.perms)

    def close(self) -> None:
        """Close the wrapped store."""
        self.inner.close()


@dataclass
class AlignmentSettings:
    """The recipe's `alignment:` section, as the engines need it."""

    engine: Engine = "weight_matching"
    reference: str | None = None
    max_iter: int | None = None
    seed: int = 0
    data: Any = None
    batch_size: int = 256
    max_items: int | None = None
    input_shape: list[int] | None = None
    repair: Literal["none", "reset_bn", "repair"] = "none"
    ot_options: dict[str, Any] = field(default_factory=dict)
    blend: float = 0.5
    trust_remote_code: bool = False  # build architectures that a model's config.json names outside the zoo


@dataclass
class AlignmentOutcome:
    """Aligned stores in the reference's basis (reference unchanged unless compressed), spec and results.

    `fused` is set when the engine produced the merged model itself (models of different depths): every
    store then holds the fused weights, so any merge of them returns it unchanged.
    """

    reference: str
    spec: PermutationSpec
    stores: dict[str, TensorStore]
    results: dict[str, Any] = field(default_factory=dict)
    architecture: Architecture | None = None
    fused: bool = False
    engine: str = "weight_matching"

    def report(self) -> dict[str, Any]:
        """JSON-ready summary: engine, reference, per-model objective or transport figures and timings."""
        models = {}
        for key, r in self.results.items():
            entry = dict(r.summary())
            if isinstance(r, MatchResult):
                entry["objective_per_iteration"] = [float(v) for v in r.objective]
                entry["time_per_group_s"] = {k: round(v, 4) for k, v in r.group_time.items()}
            models[key] = entry
        return {
            "reference": self.reference,
            "groups": len(self.spec.active_groups()),
            "frozen_groups": {g.name: g.frozen_reason for g in self.spec if g.frozen},
            "fused": self.fused,
            "models": models,
        }


def _check_same_shapes(stores: Mapping[str, TensorStore], reference: str) -> None:
    ref = stores[reference]
    for key, store in stores.items():
        if key == reference:
            continue
        if set(store.names()) != set(ref.names()):
            missing = sorted(set(ref.names()) - set(store.names()))[:3]
            raise AlignmentError(f"model {key} does not have the same tensors as the reference {reference} (missing {missing})")
        for name in ref.names():
            if store.shape(name) != ref.shape(name):
                raise AlignmentError(
                    f"tensor {name!r}: shape {list(store.shape(name))} in {key} vs {list(ref.shape(name))} in {reference}. "
                    "Permutation matching needs models of equal widths; use the OT engine (`engine: ot`) for different widths"
                )


def align_models(
    stores: Mapping[str, TensorStore],
    reference: str,
    settings: AlignmentSettings,
    *,
    architecture: Architecture | None = None,
    data: Any = None,
    device: str | torch.device = "cpu",
    progress: Callable[[str, int, int, str], None] | None = None,
) -> AlignmentOutcome:
    """Align every model to `reference` with a permutation engine; return lazily permuted stores."""
    if settings.engine not in ENGINES:
        raise AlignmentError(f"alignment.engine {settings.engine!r}: expected one of {list(ENGINES)}")
    if reference not in stores:
        raise AlignmentError(f"alignment.reference {reference!r} is not one of the recipe's models {list(stores)}")
    if settings.engine == "ot":
        return _align_ot(stores, reference, settings, architecture=architecture, data=data, device=device, progress=progress)
    _check_same_shapes(stores, reference)
    ref_store = stores[reference]
    spec, arch = derive_spec(ref_store, architecture=architecture, data=data, input_shape=settings.input_shape,
                             trust_remote_code=settings.trust_remote_code)
    if not spec.active_groups():
        raise AlignmentError(f"{ref_store.source}: the derived spec has no permutable group; nothing to align")
    outcome = AlignmentOutcome(reference, spec, {reference: ref_store}, architecture=arch)
    others = [k for k in stores if k != reference]
    ref_params = ref_store.state_dict()
    for i, key in enumerate(others):
        if progress:
            progress("align", i, len(others), key)

        def step(iteration: int, objective: float, key: str = key) -> None:
            if progress:
                progress("align", i, len(others), f"{key}: iteration {iteration}, objective {objective:.4g}")

        if settings.engine == "weight_matching":
            from suture.merge.align.weight_matching import weight_matching

            result = weight_matching(spec, ref_params, stores[key].state_dict(), max_iter=settings.max_iter or 100,
                                     seed=settings.seed, device=device, progress=step)
        else:
            if arch is None:
                raise AlignmentError("activation matching needs a runnable architecture (`architecture:` in the recipe, or a model saved by Suture's zoo)")
            if data is None:
                raise AlignmentError("activation matching needs calibration data: set alignment.data (e.g. sklearn:digits)")
            from suture.merge.align.activation_matching import activation_matching
            from suture.merge.data import iter_batches

            from suture.merge.hf_module import HFArchitecture, hf_taps

            batches = (x for x, _ in iter_batches(data, settings.batch_size))
            module_a = load_module(ref_store, arch)
            # transformers models are not traced: the family spec's members say where each group shows
            taps = hf_taps(spec, module_a) if isinstance(arch, HFArchitecture) else None
            result = activation_matching(spec, module_a, load_module(stores[key], arch), batches, taps=taps,
                                         device=device, progress=step)
        outcome.results[key] = result
        outcome.stores[key] = PermutedStore(stores[key], spec, result.perms)
        logger.info("aligned %s to %s: %s", key, reference, result.summary())
    if progress:
        progress("align", len(others), len(others), "")
    return outcome


def _with_widths(config: dict | None, architecture: Architecture | None, state: Mapping[str, torch.Tensor]) -> dict | None:
    """The reference's config with a zoo MLP's `widths` rewritten to match `state` (after compression/depth fusion)."""
    from suture.merge.zoo import ARCH_KEY, FACTORY_REFS, canonical_factory

    if config is None or architecture is None or canonical_factory(architecture.factory) not in (FACTORY_REFS["mlp"], "mlp"):
        return config

    layers = sorted({int(n.split(".")[1]) for n in state if n.startswith("layers.") and n.endswith(".weight")})
    widths = [int(state[f"layers.{layers[0]}.weight"].shape[1])] + [int(state[f"layers.{i}.weight"].shape[0]) for i in layers]
    config = dict(config)
    config[ARCH_KEY] = {"factory": architecture.factory, "kwargs": {**architecture.kwargs, "widths": widths}}
    return config


def _align_ot(
    stores: Mapping[str, TensorStore],
    reference: str,
    settings: AlignmentSettings,
    *,
    architecture: Architecture | None,
    data: Any,
    device: str | torch.device,
    progress: Callable[[str, int, int, str], None] | None,
) -> AlignmentOutcome:
    """OT fusion (OTFusion): transport every model into the reference's basis, whatever its widths or depth."""
    from suture.merge.align.ot import align_with_ot
    from suture.merge.derive import architecture_of, example_input
    from suture.merge.hf_module import refuse_hf
    from suture.merge.store import DictStore

    ref_store = stores[reference]
    trust = settings.trust_remote_code
    spec_ref, arch_ref = derive_spec(ref_store, architecture=architecture, data=data, input_shape=settings.input_shape,
                                     trust_remote_code=trust)
    outcome = AlignmentOutcome(reference, spec_ref, {reference: ref_store}, architecture=arch_ref, engine="ot")
    others = [k for k in stores if k != reference]
    if settings.ot_options.get("target_widths") and len(others) != 1:
        raise AlignmentError("alignment.target_widths: compression is defined for one reference and one other model")
    example = example_input(data, settings.input_shape) if (data is not None or settings.input_shape) else None
    for i, key in enumerate(others):
        if progress:
            progress("align", i, len(others), key)
        store = stores[key]
        # the recipe's architecture runs this model too when it has the reference's shapes (it has no record of its own)
        fits = architecture is not None and (arch_ref is None or store.shapes() == ref_store.shapes())
        arch_b = architecture_of(store, trust_remote_code=trust, chosen=architecture) or (architecture if fits else None)
        spec_b, arch_b = derive_spec(store, architecture=arch_b, data=data, input_shape=settings.input_shape, trust_remote_code=trust)
        if len(spec_b.groups) != len(spec_ref.groups):
            refuse_hf(arch_ref, "fusing models of different depths", "layer alignment runs MLP layers, not transformer blocks")
            return _fuse_depths(stores, reference, key, settings, arch_ref, arch_b, data, outcome)
        modules = {}
        needs_modules = settings.ot_options.get("ground_metric") == "activations" or settings.ot_options.get("marginals") == "activation"
        if needs_modules:
            refuse_hf(arch_ref, "alignment.ground_metric: activations",
                      "OT's activation features come from torch.fx tracing, which transformers models do not support; "
                      "use ground_metric: weights or engine: activation_matching")
        if needs_modules and arch_ref is not None and arch_b is not None:
            modules = {"module_a": load_module(ref_store, arch_ref), "module_b": load_module(store, arch_b)}
        batches = None
        if data is not None:
            from suture.merge.data import iter_batches

            batches = [x for x, _ in iter_batches(data, settings.batch_size)]
        options = dict(settings.ot_options)
        narrow, aligned, result = align_with_ot(spec_ref, spec_b, ref_store.state_dict(), store.state_dict(),
                                                batches=batches, example_input=example, device=device, **modules, **options)
        config = ref_store.config
        if narrow is not None:
            config = _with_widths(config, arch_ref, narrow)
            outcome.stores[reference] = DictStore(narrow, source=f"{ref_store.source} (compressed)", config=config)
            if arch_ref is not None and config is not None:
                outcome.architecture = architecture_of(outcome.stores[reference], trust_remote_code=trust, chosen=arch_ref)
        outcome.stores[key] = DictStore(aligned, source=f"{store.source} (transported)", config=config)
        outcome.results[key] = result
        logger.info("transported %s onto %s: %s", key, reference, result.summary())
    if progress:
        progress("align", len(others), len(others), "")
    return outcome


def _fuse_depths(stores, reference, key, settings, arch_ref, arch_b, data, outcome) -> AlignmentOutcome:
    """Models of different depths: CLAFusion-style layer alignment, identity insertion, then OT fusion."""
    from dataclasses import replace

    from suture.merge.align.depth import fuse_depths
    from suture.merge.store import DictStore

    if len(stores) != 2 or arch_ref is None or arch_b is None:
        raise AlignmentError("models of different depths fuse only as a pair of runnable MLPs (suture.merge.zoo:mlp)")
    if data is None:
        raise AlignmentError("fusing models of different depths aligns layers by CKA on activations: set alignment.data")
    options = {k: v for k, v in settings.ot_options.items() if k != "target_widths"}
    fused = fuse_depths(load_module(stores[reference], arch_ref), load_module(stores[key], arch_b), data,
                        blend=settings.blend, **options)
    state = {k: v.detach().contiguous() for k, v in fused.module.state_dict().items()}
    arch = replace(arch_ref, kwargs={**arch_ref.kwargs, "widths": list(fused.widths)})  # keeps its source and trust
    config = _with_widths(stores[reference].config, arch, state)
    fused_store = DictStore(state, source="fused", config=config)
    outcome.stores = {reference: fused_store, key: fused_store}
    outcome.architecture = arch
    outcome.fused = True
    outcome.results[key] = fused
    return outcome
