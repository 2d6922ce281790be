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

from merge.align import MatchResult
from merge.derive import Architecture, derive_spec, load_module
from merge.errors import AlignmentError
from merge.spec import PermutationSpec, permute_tensor
from merge.store import TensorInfo, TensorStore

logger = logging.getLogger(__name__)

Engine = Literal["weight_matching", "activation_matching"]
PERMUTATION_ENGINES = ("weight_matching", "activation_matching")


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
    """The recipe's `alignment:` section for permutation engines."""

    engine: Engine = "weight_matching"
    reference: str | None = None
    max_iter: int = 100
    seed: int = 0
    data: Any = None
    batch_size: int = 256
    max_items: int | None = None
    input_shape: list[int] | None = None
    repair: Literal["none", "reset_bn", "repair"] = "none"


@dataclass
class AlignmentOutcome:
    """Aligned stores (reference unchanged), the spec, per-model match results and the architecture."""

    reference: str
    spec: PermutationSpec
    stores: dict[str, TensorStore]
    results: dict[str, MatchResult] = field(default_factory=dict)
    architecture: Architecture | None = None

    def report(self) -> dict[str, Any]:
        """JSON-ready summary: engine, reference, per-model objective curves and timings."""
        return {
            "reference": self.reference,
            "groups": len(self.spec.active_groups()),
            "frozen_groups": {g.name: g.frozen_reason for g in self.spec if g.frozen},
            "models": {
                key: {**r.summary(), "objective_per_iteration": [float(v) for v in r.objective],
                      "time_per_group_s": {k: round(v, 4) for k, v in r.group_time.items()}}
                for key, r in self.results.items()
            },
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
    if settings.engine not in PERMUTATION_ENGINES:
        raise AlignmentError(f"alignment.engine {settings.engine!r}: expected one of {list(PERMUTATION_ENGINES)}")
    if reference not in stores:
        raise AlignmentError(f"alignment.reference {reference!r} is not one of the recipe's models {list(stores)}")
    _check_same_shapes(stores, reference)
    ref_store = stores[reference]
    spec, arch = derive_spec(ref_store, architecture=architecture, data=data, input_shape=settings.input_shape)
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
            from merge.align.weight_matching import weight_matching

            result = weight_matching(spec, ref_params, stores[key].state_dict(), max_iter=settings.max_iter,
                                     seed=settings.seed, device=device, progress=step)
        else:
            if arch is None:
                raise AlignmentError("activation matching needs a runnable architecture (`architecture:` in the recipe, or a model saved by Suture's zoo)")
            if data is None:
                raise AlignmentError("activation matching needs calibration data: set alignment.data (e.g. sklearn:digits)")
            from merge.align.activation_matching import activation_matching
            from merge.data import iter_batches

            batches = (x for x, _ in iter_batches(data, settings.batch_size))
            result = activation_matching(spec, load_module(ref_store, arch), load_module(stores[key], arch), batches,
                                         device=device, progress=step)
        outcome.results[key] = result
        outcome.stores[key] = PermutedStore(stores[key], spec, result.perms)
        logger.info("aligned %s to %s: %s", key, reference, result.summary())
    if progress:
        progress("align", len(others), len(others), "")
    return outcome
