"""The search spec (`suture search SEARCH.yaml`): a base recipe, the recipe values to search, and the objective.

A spec names recipe keys by path (``models[0].parameters.weight``, ``merge_method``, ``alignment.engine``);
each becomes one search dimension (a float range, an int range or a choice), or ``points`` dimensions for a
gradient over layer groups (mergekit's list form of a parameter). The objective scores the merged model on
one or more labelled datasets, weighted; a held-out split is scored too but never optimised, so the reported
held-out number shows whether the search overfitted its validation split. Problems are reported with the
spec's key path and YAML line, as recipes are.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from suture.merge.errors import RecipeError
from suture.recipes.schema import Recipe, _parse_path, load_recipe, parse_recipe
from suture.recipes.yaml_lines import KeyPath, format_path, nearest_line, read_yaml_file, validate_spec

Number = StrictFloat | StrictInt
Scalar = StrictStr | StrictFloat | StrictInt | StrictBool


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Dimension(_Section):
    """One searched recipe value: `low`/`high` (float, or int with `int: true`; `log` for log scale) or `choices`."""

    key: StrictStr
    low: Number | None = None
    high: Number | None = None
    log: StrictBool = False
    int: StrictBool = False
    choices: list[Scalar] | None = Field(None, min_length=1)
    # a gradient: this many values spread over the layers (mergekit interpolates between them), one dimension each
    points: StrictInt | None = Field(None, ge=2, le=64)

    @model_validator(mode="after")
    def _domain(self) -> Dimension:
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low/high, not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("needs low and high (a range) or choices (a list)")
        if not self.high > self.low:
            raise ValueError(f"high ({self.high}) must be above low ({self.low})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self

    @property
    def path(self) -> KeyPath:
        """The recipe key path this dimension sets."""
        return _parse_path(self.key)

    def names(self) -> list[str]:
        """The search-space parameter names (one per gradient point)."""
        return [f"{self.key}[{i}]" for i in range(self.points)] if self.points else [self.key]

    def sample_start(self) -> Any:
        """A value inside the domain, used to check the spec before any trial runs."""
        value = self.choices[0] if self.choices is not None else self.low
        return [value] * self.points if self.points else value


class ObjectiveTask(_Section):
    """One scored dataset and its weight in the objective."""

    data: StrictStr | dict[str, Any]
    weight: Number = Field(1.0, gt=0)
    name: StrictStr | None = None


class EvaluateSpec(_Section):
    """`evaluate:` the objective. `split` is searched on (validation); `heldout_split` is only reported."""

    metric: Literal["accuracy", "loss"] = "accuracy"
    tasks: list[ObjectiveTask] = Field(min_length=1)
    split: Literal["train", "test", "all"] = "train"
    heldout_split: Literal["train", "test", "all"] | None = "test"
    batch_size: StrictInt = Field(512, ge=1)
    max_items: StrictInt | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _distinct(self) -> EvaluateSpec:
        if self.heldout_split is not None and (self.heldout_split == self.split or "all" in (self.split, self.heldout_split)):
            raise ValueError(f"heldout_split {self.heldout_split!r} overlaps split {self.split!r}; the held-out data must be unseen by the search")
        return self

    @property
    def mode(self) -> Literal["max", "min"]:
        """Accuracy is maximised, loss minimised."""
        return "max" if self.metric == "accuracy" else "min"

    def task_names(self) -> list[str]:
        """A short unique name per task (its own `name`, else task0, task1, ...)."""
        return [t.name or f"task{i}" for i, t in enumerate(self.tasks)]


class SearchSettings(_Section):
    """`search:` how trials are drawn and run."""

    sampler: Literal["tpe", "cmaes", "random"] = "tpe"
    trials: StrictInt = Field(20, ge=1)
    seed: StrictInt = 0
    max_failures: StrictInt = Field(2, ge=0)  # retries of a trial whose worker died
    # Ray's memory reservation per trial (bytes or "2GB"): the scheduler never packs more trials on a node than fit
    memory_per_trial: StrictInt | StrictStr | None = None
    start_from_recipe: StrictBool = True  # evaluate the base recipe's own values as the first trial


class SearchSpec(_Section):
    """A validated search spec; build it with :func:`load_search_spec`."""

    recipe: StrictStr | dict[str, Any]
    space: list[Dimension] = Field(min_length=1)
    evaluate: EvaluateSpec
    search: SearchSettings = SearchSettings()

    _source: str = "<dict>"
    _base: Recipe | None = None
    _lines: dict[KeyPath, int] = {}

    @property
    def source(self) -> str:
        """The spec file (or ``<dict>``)."""
        return self._source

    @property
    def base(self) -> Recipe:
        """The base recipe, validated."""
        assert self._base is not None
        return self._base

    def where(self, path: KeyPath) -> str:
        """``space[0].key (line 7)`` for messages."""
        line = nearest_line(self._lines, path)
        return f"{format_path(path)} (line {line})" if line is not None else format_path(path)

    def param_names(self) -> list[str]:
        """Every search-space parameter name, in spec order."""
        return [n for d in self.space for n in d.names()]

    def trial_recipe(self, config: dict[str, Any]) -> Recipe:
        """The base recipe with a trial's values set (validated; `config` maps param names to values)."""
        values = []
        for dim in self.space:
            names = dim.names()
            values.append([config[n] for n in names] if dim.points else config[names[0]])
        return self._with_values(values)

    def start_config(self) -> dict[str, Any] | None:
        """The base recipe's own values as a trial config, when every dimension's key is set there and in range."""
        data = self.base.to_dict()
        config: dict[str, Any] = {}
        for dim in self.space:
            value = _get(data, dim.path)
            items = value if dim.points else [value]
            if dim.points and not isinstance(value, list):
                items = [value] * dim.points
            if not isinstance(items, list) or len(items) != len(dim.names()):
                return None
            for name, item in zip(dim.names(), items):
                if not _in_domain(dim, item):
                    return None
                config[name] = item
        return config

    def _with_values(self, values: list[Any]) -> Recipe:
        data = self.base.to_dict()
        for dim, value in zip(self.space, values):
            _set(data, dim.path, value)
        return parse_recipe(data, source=self.base.source)


def _in_domain(dim: Dimension, value: Any) -> bool:
    if dim.choices is not None:
        return value in dim.choices
    return isinstance(value, (int, float)) and not isinstance(value, bool) and dim.low <= value <= dim.high


def _get(data: Any, path: KeyPath) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _set(data: Any, path: KeyPath, value: Any) -> None:
    """Set a recipe value at a key path, creating missing mappings (e.g. a model's `parameters:`)."""
    for i, part in enumerate(path[:-1]):
        nxt = data[part] if isinstance(data, list) else data.get(part)
        if nxt is None:
            nxt = {}
            data[part] = nxt
        if not isinstance(nxt, (dict, list)):
            raise KeyError(format_path(path[: i + 1]))
        data = nxt
    data[path[-1]] = copy.deepcopy(value)


def parse_search_spec(data: Any, *, source: str = "<dict>", lines: dict[KeyPath, int] | None = None) -> SearchSpec:
    """Validate spec data; one RecipeError naming the spec, key path and line for every problem."""
    spec = validate_spec(SearchSpec, data, source, lines, "search spec is a mapping with recipe, space, evaluate and search keys")
    if isinstance(spec.recipe, str):
        base_path = Path(spec.recipe).expanduser()
        if not base_path.is_absolute() and source not in ("<dict>", "<string>"):
            base_path = Path(source).parent / base_path
        spec._base = load_recipe(base_path)
    else:
        spec._base = parse_recipe(spec.recipe, source=f"{source}: recipe")
    names = spec.param_names()
    if len(set(names)) != len(names):
        raise RecipeError(f"{source}: space names the same recipe key twice")
    for i, dim in enumerate(spec.space):  # every key must land on a valid recipe for a value in its domain
        try:
            data = spec.base.to_dict()
            _set(data, dim.path, dim.sample_start())
            parse_recipe(data, source=spec.base.source)
        except (KeyError, IndexError, TypeError) as exc:
            raise RecipeError(f"{source}: {spec.where(('space', i, 'key'))}: recipe has no key {dim.key!r} ({exc})") from None
        except RecipeError as exc:
            raise RecipeError(f"{source}: {spec.where(('space', i, 'key'))}: with {dim.key} = {dim.sample_start()!r} the recipe is invalid: {exc}") from None
    return spec


def load_search_spec(path: str | Path) -> SearchSpec:
    """Read and validate a search spec YAML file."""
    data, lines, source = read_yaml_file(path, "search spec")
    return parse_search_spec(data, source=source, lines=lines)
