"""Align several models to a reference and expose the aligned models as lazy tensor stores.

This is the one ``apply(store, alignment, spec)`` of the architecture: a :class:`PermutedStore` applies
the permutations of a :class:`~merge.align.MatchResult` to each tensor as it is read, so an aligned model
feeds any merge method (or the writer, to save the permuted model) without a second copy in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from suture.merge.align import MatchResult
from suture.merge.align.engines import AlignmentOptions, AlignRequest, BuiltModel, OutcomeKind, get_engine
from suture.merge.derive import Architecture, derive_spec
from suture.merge.errors import AlignmentError
from suture.merge.spec import PermutationSpec, permute_tensor
from suture.merge.store import TensorInfo, TensorStore

logger = logging.getLogger(__name__)



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
    engine: str = ""
    kind: OutcomeKind = "permuted"  # "transported" for soft engines (stores may change widths)

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
    options: AlignmentOptions,
    *,
    architecture: Architecture | None = None,
    data: Any = None,
    device: str | torch.device = "cpu",
    progress: Callable[[str, int, int, str], None] | None = None,
    trust_remote_code: bool = False,
) -> AlignmentOutcome | BuiltModel:
    """Align every model to `reference` with the engine `options` names (see merge.align.engines)."""
    engine = get_engine(options.engine)
    if reference not in stores:
        raise AlignmentError(f"{reference!r} is not one of the models {list(stores)}", field=("reference",))
    request = AlignRequest(stores, reference, options, architecture=architecture, data=data, device=device,
                           progress=progress, trust_remote_code=trust_remote_code)
    return engine.align(request)


Matcher = Callable[[PermutationSpec, TensorStore, TensorStore, Architecture | None, Callable[[int, float], None]], MatchResult]


def align_permutations(request: AlignRequest, engine: str, match: Matcher) -> AlignmentOutcome:
    """Permutation engines: derive the reference's spec, `match` each other model to it, wrap it in a PermutedStore."""
    stores, reference, progress = request.stores, request.reference, request.progress
    _check_same_shapes(stores, reference)
    ref_store = stores[reference]
    spec, arch = derive_spec(ref_store, architecture=request.architecture, data=request.data,
                             input_shape=request.options.input_shape, trust_remote_code=request.trust_remote_code)
    if not spec.active_groups():
        raise AlignmentError(f"{ref_store.source}: the derived spec has no permutable group; nothing to align")
    outcome = AlignmentOutcome(reference, spec, {reference: ref_store}, architecture=arch, engine=engine)
    others = [k for k in stores if k != reference]
    for i, key in enumerate(others):
        if progress:
            progress("align", i, len(others), key)

        def step(iteration: int, objective: float, key: str = key, i: int = i) -> None:
            if progress:
                progress("align", i, len(others), f"{key}: iteration {iteration}, objective {objective:.4g}")

        result = match(spec, ref_store, stores[key], arch, step)
        outcome.results[key] = result
        outcome.stores[key] = PermutedStore(stores[key], spec, result.perms)
        logger.info("aligned %s to %s: %s", key, reference, result.summary())
    if progress:
        progress("align", len(others), len(others), "")
    return outcome
