"""The alignment-engine registry: one :class:`Engine` description per engine, found by name.

An engine module declares its name, title, papers, a pydantic ``Options`` model (the recipe's
``alignment:`` section for that engine: types, ranges, defaults and help text), what it needs (calibration
data, a runnable module) and one ``align(request)``. ``align`` returns one of a few outcome kinds, so the
recipe runner has one path per kind rather than one per engine:

- ``permuted``: stores in the reference's basis whose tensors keep their shapes (Git Re-Basin);
- ``transported``: stores transported into the reference's basis, possibly of other widths (OTFusion);
- ``built``: a model the engine builds itself (ZipIt!), no merge method applies.

Adding an engine is one module that calls :func:`register_engine` (built-in engines are imported on first
use of the registry) plus its tests.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from suture.merge.errors import AlignmentError

if TYPE_CHECKING:
    from suture.merge.align.pipeline import AlignmentOutcome
    from suture.merge.derive import Architecture
    from suture.merge.store import TensorStore

logger = logging.getLogger(__name__)

OutcomeKind = Literal["permuted", "transported", "built"]
Progress = Callable[[str, int, int, str], None]
# modules of the engines that ship with Suture; each registers itself when imported
BUILTIN_ENGINE_MODULES = (
    "suture.merge.align.weight_matching",
    "suture.merge.align.activation_matching",
    "suture.merge.align.ot",
    "suture.merge.align.zipit",
    "suture.merge.align.cca",
)
DataSpec = StrictStr | dict[str, Any]


class AlignmentOptions(BaseModel):
    """Settings every engine takes; an engine's ``Options`` subclasses this and adds its own (others refused)."""

    model_config = ConfigDict(extra="forbid")

    engine: str
    reference: StrictStr | None = Field(None, description="The model the others are aligned to (default: the first).")
    seed: StrictInt = Field(0, title="Seed", description="Random seed of the engine.")
    data: DataSpec | None = Field(None, description="Calibration data spec, e.g. sklearn:digits.")
    batch_size: StrictInt = Field(256, ge=1, description="Batch size when running the models on the data.")
    max_items: StrictInt | None = Field(None, ge=1, description="Use at most this many calibration items.")
    input_shape: list[StrictInt] | None = Field(None, description="Example input shape for tracing when there is no data.")
    repair: Literal["none", "reset_bn", "repair"] = Field(
        "none", title="After merging",
        description="reset_bn: re-estimate BatchNorm statistics on the data; repair: rescale channels to the endpoints' "
                    "statistics (REPAIR, Jordan et al., ICLR 2023). Needs calibration data.")
    architecture_kwargs: dict[str, Any] | None = Field(None, description="Keyword arguments added to the recipe's architecture.")


COMMON_OPTIONS = tuple(AlignmentOptions.model_fields)


@dataclass
class AlignRequest:
    """What an engine's ``align`` gets: the models, the reference, its options and the calibration data."""

    stores: Mapping[str, TensorStore]
    reference: str
    options: AlignmentOptions
    architecture: Architecture | None = None
    data: Any = None  # a loaded dataset (merge.data), or None
    device: str | torch.device = "cpu"
    progress: Progress | None = None
    trust_remote_code: bool = False


@dataclass
class BuiltModel:
    """An engine's own output model: `save(folder)` writes its weights and config into `folder`.

    `summary` goes to report.json's `alignment` section; `evaluate(folder, section, progress)` (optional)
    scores the output on the recipe's `evaluate:` data, and `card_rows(evaluation)` turns that into the model
    card's table.
    """

    engine: str
    summary: dict[str, Any]
    save: Callable[[Path], None]
    evaluate: Callable[[Path, Any, Progress | None], dict[str, Any]] | None = None
    card_rows: Callable[[dict[str, Any]], list[dict[str, Any]]] | None = None
    kind: OutcomeKind = "built"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Engine:
    """One alignment engine: what it is, what it cites, what it takes and what it returns."""

    name: str
    title: str  # short label for forms ("Weight matching (Git Re-Basin)")
    description: str  # what the model card says the engine did
    papers: tuple[tuple[str, str], ...]  # (citation, url)
    options: type[AlignmentOptions]
    align: Callable[[AlignRequest], "AlignmentOutcome | BuiltModel"]
    outcome: OutcomeKind
    needs_data: bool = False
    needs_module: bool = False
    applies_to: tuple[str, ...] = ("same",)  # kinds of model sets: same shapes, different widths
    form_common: tuple[str, ...] = ()  # shared settings (seed, repair) the app's form shows for this engine
    aliases: tuple[str, ...] = ()

    def parse(self, value: Mapping[str, Any]) -> AlignmentOptions:
        """Options from a mapping (pydantic errors propagate: callers turn them into recipe errors)."""
        return self.options.model_validate({"engine": self.name, **value})


_ENGINES: dict[str, Engine] = {}
_loaded = False


def register_engine(engine: Engine) -> Engine:
    """Add an engine (a second engine of the same name replaces the first: tests register toy engines)."""
    if engine.options.model_fields["engine"].annotation is str:
        raise TypeError(f"engine {engine.name}: its Options must declare engine: Literal[{engine.name!r}]")
    _ENGINES[engine.name] = engine
    return engine


def unregister_engine(name: str) -> None:
    """Remove an engine (tests use it to clean up a toy engine)."""
    _ENGINES.pop(name, None)


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN_ENGINE_MODULES:
            importlib.import_module(module)


def list_engines() -> list[Engine]:
    """Every registered engine, built-in ones first."""
    _load_builtins()
    return list(_ENGINES.values())


def find_engine(name: str | None) -> Engine | None:
    """The engine called `name` (or one of its aliases), None when there is none."""
    if not isinstance(name, str):
        return None
    _load_builtins()
    key = name.strip().lower().replace("-", "_")
    if key in _ENGINES:
        return _ENGINES[key]
    return next((e for e in _ENGINES.values() if key in e.aliases), None)


def get_engine(name: str) -> Engine:
    """The engine called `name`; an AlignmentError lists the known ones otherwise."""
    engine = find_engine(name)
    if engine is None:
        raise AlignmentError(f"alignment engine {name!r}: expected one of {[e.name for e in list_engines()]}")
    return engine
