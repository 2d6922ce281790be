"""The recipe schema: mergekit's YAML merge configuration, unchanged, plus Suture's own top-level sections.

A recipe names a ``merge_method`` and either ``models`` (whole models to merge) or ``slices`` (layer ranges
to merge or stack), with optional ``base_model``, ``parameters`` (see :mod:`recipes.params`), ``dtype``,
``out_dtype``, ``tokenizer_source`` / ``tokenizer`` and ``chat_template``, exactly as mergekit reads them.
Suture adds ``name``, ``architecture``, ``allow_pickle``, ``trust_remote_code``, ``strict``, ``out_shard_size``, ``seed`` and the
sections ``alignment``, ``stitch``, ``evaluate`` and ``publish``; data-driven methods (RegMean, Fisher) read each
model's own data from ``models[i].data`` with the top-level ``data`` options (max_items, batch_size, split, labels).

Everything is checked before any tensor is read: unknown keys, wrong types and impossible combinations raise
one :class:`~merge.errors.RecipeError` listing every problem with its key path and YAML line.
"""

from __future__ import annotations

import difflib
import logging
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    StrictBool,
    StrictInt,
    StrictStr,
    Tag,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from suture.merge.errors import ParameterError, RecipeError
from suture.merge.methods import MergeMethod, get_method, list_methods
from suture.recipes.params import check_setting, describe_kind, unreachable_conditions
from suture.recipes.yaml_lines import MAX_DOCUMENT_BYTES, KeyPath, format_path, load_yaml_with_lines, nearest_line

logger = logging.getLogger(__name__)


class _PathError(ValueError):
    """A validation failure below the value being validated (``subpath`` is relative to it)."""

    def __init__(self, subpath: KeyPath, message: str) -> None:
        super().__init__(message)
        self.subpath = tuple(subpath)
        self.message = message


# ---------------------------------------------------------------------------------------------------
# Model references
# ---------------------------------------------------------------------------------------------------

_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_HUB_RE = re.compile(rf"^(?:{_HUB_PART}/)?{_HUB_PART}$")
_FILE_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".json", ".yaml", ".yml", ".npz", ".npy",
    ".h5", ".onnx", ".msgpack", ".txt",
)


def looks_like_hub_id(text: str) -> bool:
    """Whether a reference has the form of a Hub repo id (``org/name`` or a legacy bare ``name``), offline.

    Purely syntactic: ``./x``, ``/abs/x``, ``~/x``, ``a/b/c``, Windows paths and weight files are local.
    ``org/name`` may still be a relative folder: callers check the disk first, then the Hub.
    """
    if not text or not _HUB_RE.match(text):
        return False
    if "--" in text or ".." in text:
        return False
    return not text.lower().endswith(_FILE_SUFFIXES)


def _split_revision(text: str, what: str) -> dict[str, Any]:
    if text.count("@") > 1:
        raise _PathError((), f"{what} {text!r} has more than one '@' (the form is path@revision)")
    path, _, revision = text.partition("@")
    if not path.strip():
        raise _PathError((), f"{what} {text!r} has an empty path")
    if "@" in text and not revision.strip():
        raise _PathError((), f"{what} {text!r} has an empty revision after '@'")
    return {"path": path.strip(), "revision": revision.strip() or None}


def _parse_ref_string(text: str) -> dict[str, Any]:
    chunks = text.strip().split("+")
    if len(chunks) > 2:
        raise _PathError((), f"model reference {text!r} has more than one '+' (the form is model+lora)")
    out = _split_revision(chunks[0], "model reference")
    if len(chunks) == 2:
        out["lora"] = _split_revision(chunks[1], "LoRA reference")
    return out


class ModelRef(BaseModel):
    """A model: local path or Hub id (``path``), optional ``@revision``, optional ``+lora`` adapter.

    Written as one string in recipes: ``org/name``, ``org/name@v1.0``, ``./models/a``,
    ``org/base+org/adapter``. mergekit's long form ``{model: {path, revision}, lora, override_architecture}``
    is accepted too.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: StrictStr
    revision: StrictStr | None = None
    lora: ModelRef | None = None
    override_architecture: StrictStr | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            return _parse_ref_string(value)
        if isinstance(value, ModelRef) or (isinstance(value, Mapping) and "model" not in value):
            return value
        if isinstance(value, Mapping):  # mergekit's long form
            out = {k: v for k, v in value.items() if k != "model"}
            inner = value["model"]
            if isinstance(inner, str):
                inner = _split_revision(inner, "model reference")
            if isinstance(inner, Mapping):
                out.update(inner)
            else:
                raise _PathError(("model",), f"expected a path string or {{path, revision}}, got {type(inner).__name__}")
            lora = out.get("lora")
            if isinstance(lora, str):
                out["lora"] = _split_revision(lora, "LoRA reference")
            return out
        raise _PathError(
            (), f"expected a model reference (a local path or Hub id, optional @revision), got {describe_kind(value)}"
        )

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """Parse ``path[@revision][+lora[@revision]]``; bad input raises RecipeError."""
        try:
            return cls.model_validate(text)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            inner = (err.get("ctx") or {}).get("error")
            raise RecipeError(str(inner) if inner else err["msg"]) from None

    @property
    def is_hub_id(self) -> bool:
        """True when ``path`` has the form of a Hub repo id (decided offline, see :func:`looks_like_hub_id`)."""
        return looks_like_hub_id(self.path)

    @property
    def repo_id(self) -> str | None:
        """The Hub repo id, or None for a local path."""
        return self.path if self.is_hub_id else None

    def find_local(self, *search_dirs: str | Path) -> Path | None:
        """The existing local file/folder this reference names (relative paths tried in each dir, default cwd)."""
        p = Path(self.path).expanduser()
        if p.is_absolute():
            return p if p.exists() else None
        for d in search_dirs or (Path.cwd(),):
            candidate = Path(d).expanduser() / p
            if candidate.exists():
                return candidate
        return None

    def __str__(self) -> str:
        text = f"{self.path}@{self.revision}" if self.revision else self.path
        return f"{text}+{self.lora}" if self.lora else text

    @model_serializer(mode="plain")
    def _serialize(self) -> Any:
        text = str(self)
        if self.override_architecture is None and ModelRef.model_validate(text) == self:
            return text
        out: dict[str, Any] = {"model": {"path": self.path}}
        if self.revision:
            out["model"]["revision"] = self.revision
        if self.lora is not None:
            out["lora"] = {"path": self.lora.path, **({"revision": self.lora.revision} if self.lora.revision else {})}
        if self.override_architecture is not None:
            out["override_architecture"] = self.override_architecture
        return out


# ---------------------------------------------------------------------------------------------------
# Field types
# ---------------------------------------------------------------------------------------------------


def _check_param_value(value: Any) -> Any:
    problems = check_setting(value)
    if problems:
        raise _PathError(*problems[0])
    return value


ParamValue = Annotated[Any, BeforeValidator(_check_param_value)]
Params = dict[StrictStr, ParamValue]

DTYPES = ("float16", "bfloat16", "float32", "float64")
_DTYPE_HINTS = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32",
                "fp64": "float64", "double": "float64"}


def _check_dtype(value: str) -> str:
    name = value.removeprefix("torch.")
    if name not in DTYPES:
        close = [_DTYPE_HINTS[name]] if name in _DTYPE_HINTS else difflib.get_close_matches(name, DTYPES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown dtype {value!r}{hint}; use one of {', '.join(DTYPES)}")
    return name


DtypeName = Annotated[StrictStr, AfterValidator(_check_dtype)]


def _parse_shard_size(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected a size in bytes or a string like '5GB' or '500MB', got {describe_kind(value)}")
    from suture.merge.writer import parse_size  # imported here: it pulls in torch

    try:
        size = parse_size(value)
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    if size <= 0:  # parse_size passes integers through; 0 or -1 would mean no shards or one per tensor
        raise ValueError(f"expected a positive size, got {value!r}")
    return size


ShardSize = Annotated[StrictInt, BeforeValidator(_parse_shard_size)]


def _tokenizer_source(value: Any) -> Any:
    # resolved here rather than by a union, so a bad reference yields one clear error instead of one per branch
    if value in ("union", "base") or isinstance(value, ModelRef):
        return value
    if isinstance(value, str):
        # mergekit's README once spelled a model source as `model:<path>`
        return ModelRef(**_parse_ref_string(value.removeprefix("model:")))
    if isinstance(value, Mapping):
        try:
            return ModelRef.model_validate(value)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            inner = (err.get("ctx") or {}).get("error")
            loc = tuple(p for p in err["loc"] if isinstance(p, (str, int)))
            if isinstance(inner, _PathError):
                raise _PathError(loc + inner.subpath, inner.message) from None
            raise _PathError(loc, f"{err['msg']} (got {_short(err.get('input'))})") from None
    raise _PathError((), f"expected 'union', 'base' or a model reference, got {describe_kind(value)}")


TokenizerSource = Annotated[Union[Literal["union", "base"], ModelRef], BeforeValidator(_tokenizer_source)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_data_spec(value: Any) -> Any:
    """A data spec's form (source and options) is checked here; the files are read when the recipe runs."""
    from suture.merge.data import parse_spec
    from suture.merge.errors import InputError

    try:
        parse_spec(value)
    except InputError as exc:
        raise ValueError(str(exc)) from None
    return value


#: a model's own data (merge.data spec: 'sklearn:digits?classes=0-4', a .txt/.safetensors/.npz file, or a dict)
DataSpec = Annotated[Union[StrictStr, dict[StrictStr, Any]], AfterValidator(_check_data_spec)]


class ModelEntry(_Section):
    """One item of ``models:``: a model, its parameters and (data-driven methods) its own data."""

    model: ModelRef
    parameters: Params | None = None
    data: DataSpec | None = None
    # a text fine-tune's task head (a folder holding head/, merge.text_heads) for the data stage's logits
    head: StrictStr | None = None


class DataOptions(_Section):
    """Top-level ``data:``: how data-driven methods read each model's ``data`` (FusionBench: 256 items, batch 32)."""

    max_items: Annotated[StrictInt, Field(ge=1)] = 256
    batch_size: Annotated[StrictInt, Field(ge=1)] = 32
    split: Literal["train", "test", "all"] = "train"
    # Fisher merging: 'true' labels (empirical Fisher), labels 'sampled' from the model, or 'auto' (true when present)
    labels: Literal["auto", "true", "sampled"] = "auto"


class SliceSource(_Section):
    """One source of an output slice: layers ``[start, end)`` of a model, and their parameters."""

    model: ModelRef
    layer_range: tuple[StrictInt, StrictInt]
    parameters: Params | None = None

    @field_validator("layer_range")
    @classmethod
    def _range(cls, value: tuple[int, int]) -> tuple[int, int]:
        start, end = value
        if start < 0:
            raise ValueError(f"[{start}, {end}]: layer numbers start at 0")
        if end <= start:
            raise ValueError(
                f"[{start}, {end}]: the start must be smaller than the end "
                "(layers start .. end-1 are taken; the end is excluded)"
            )
        return value


class Slice(_Section):
    """One output slice of ``slices:``: its sources (same number of layers each) and parameters."""

    sources: list[SliceSource]
    base_model: ModelRef | None = None
    residual_weight: float | None = None
    parameters: Params | None = None


class TokenSource(_Section):
    """Where one token's embedding comes from: another token of a model (``model_token``) or zeros (``zero``)."""

    kind: Literal["model_token", "zero"]
    model: ModelRef | None = None
    token_id: StrictInt | None = None
    token: StrictStr | None = None

    @model_validator(mode="after")
    def _combination(self) -> TokenSource:
        if self.kind == "zero":
            extra = [k for k in ("model", "token_id", "token") if getattr(self, k) is not None]
            if extra:
                raise ValueError(f"kind 'zero' takes no {', '.join(extra)}")
        else:
            if self.model is None:
                raise _PathError(("model",), "kind 'model_token' needs the model to take the embedding from")
            if (self.token_id is None) == (self.token is None):
                raise ValueError("kind 'model_token' needs exactly one of token or token_id")
        return self


_TAG_KIND = "<token source>"
_TAG_REF = "<model reference>"


def _token_source_tag(value: Any) -> str:
    if isinstance(value, TokenSource) or (isinstance(value, Mapping) and "kind" in value):
        return _TAG_KIND
    return _TAG_REF


class TokenEmbedding(_Section):
    """Settings for one token of the output vocabulary."""

    source: Annotated[
        Union[Annotated[TokenSource, Tag(_TAG_KIND)], Annotated[ModelRef, Tag(_TAG_REF)]],
        Discriminator(_token_source_tag),
    ] | None = None
    force: StrictBool = False


class TokenizerConfig(_Section):
    """mergekit's ``tokenizer:`` section: output vocabulary source, per-token embedding sources, padding."""

    source: TokenizerSource = "union"
    tokens: dict[StrictStr, TokenEmbedding] | None = None
    pad_to_multiple_of: StrictInt | None = None

    @field_validator("pad_to_multiple_of")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise ValueError(f"pad_to_multiple_of must be a positive integer, got {value}")
        return value


_TAGS = {_TAG_KIND, _TAG_REF, "[key]"}


# ---------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------


class ArchitectureRef(_Section):
    """`architecture: {factory: package.module:factory, kwargs: {...}}`."""

    factory: StrictStr
    kwargs: dict[StrictStr, Any] | None = None


class Recipe(_Section):
    """A validated recipe. Build it with :func:`load_recipe` (YAML) or :func:`parse_recipe` (dict)."""

    name: StrictStr | None = None
    merge_method: StrictStr | None = None
    base_model: ModelRef | None = None
    models: list[ModelEntry] | None = None
    slices: list[Slice] | None = None
    parameters: Params | None = None
    dtype: DtypeName | None = None
    out_dtype: DtypeName | None = None
    tokenizer_source: TokenizerSource | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: StrictStr | None = None
    # Suture's own settings
    # the module to trace: "package.module:factory", or {factory: ..., kwargs: {...}}
    architecture: StrictStr | ArchitectureRef | None = None
    allow_pickle: StrictBool = False
    # run architecture factories that a model's config.json names outside Suture's zoo (imports their code)
    trust_remote_code: StrictBool = False
    strict: StrictBool = False
    out_shard_size: ShardSize | None = None
    seed: StrictInt | None = None
    # options of data-driven methods (each model's data is `models[i].data`)
    data: DataOptions | None = None
    # Sections that later work defines; kept as plain mappings until then.
    alignment: dict[str, Any] | None = None
    stitch: dict[str, Any] | None = None
    evaluate: dict[str, Any] | None = None
    publish: dict[str, Any] | None = None

    @field_validator("data", mode="before")
    @classmethod
    def _data_options(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, Mapping):
            raise ValueError("the top-level `data` holds options (max_items, batch_size, split, labels); "
                             "give each model its own data as models[i].data")
        return value

    _source: str = PrivateAttr(default="<dict>")
    _lines: dict[KeyPath, int] = PrivateAttr(default_factory=dict)

    def __eq__(self, other: object) -> bool:
        # where a recipe was read from is not part of its value
        return type(other) is type(self) and self.__dict__ == other.__dict__  # type: ignore[union-attr]

    @property
    def source(self) -> str:
        """Where the recipe came from: a file path, ``<string>`` or ``<dict>``."""
        return self._source

    @property
    def base_dir(self) -> Path | None:
        """Folder of the recipe file (relative model paths may be meant from there); None if not from a file."""
        return Path(self._source).parent if self._source not in ("<dict>", "<string>") else None

    @property
    def mode(self) -> Literal["models", "slices"]:
        """``models`` (whole models merged) or ``slices`` (layer ranges merged or stacked)."""
        return "slices" if self.slices else "models"

    def line_of(self, path: KeyPath | str) -> int | None:
        """YAML line of a key path (a tuple, or a string like ``models[1].parameters``); nearest ancestor if absent."""
        return nearest_line(self._lines, _parse_path(path) if isinstance(path, str) else tuple(path))

    def where(self, path: KeyPath | str) -> str:
        """``models[1].parameters (line 7)``: a key path with its line, for error messages."""
        key = _parse_path(path) if isinstance(path, str) else tuple(path)
        line = self.line_of(key)
        return f"{format_path(key)} (line {line})" if line is not None else format_path(key)

    def error(self, path: KeyPath | str, message: str) -> RecipeError:
        """A RecipeError for a problem found later (e.g. while planning), pointing at a key and its line."""
        key = _parse_path(path) if isinstance(path, str) else tuple(path)
        return RecipeError(_format_issues(self._source, [RecipeIssue(key, message, self.line_of(key))]))

    def referenced_models(self) -> list[ModelRef]:
        """Every model the merge reads (base first), without repeats, in recipe order."""
        refs: list[ModelRef] = []
        if self.base_model is not None:
            refs.append(self.base_model)
        for entry in self.models or []:
            refs.append(entry.model)
        for sl in self.slices or []:
            if sl.base_model is not None:
                refs.append(sl.base_model)
            refs.extend(src.model for src in sl.sources)
        return list(dict.fromkeys(refs))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (mergekit-compatible: model references as strings); ``parse_recipe`` reads it back."""
        return _plain(self.model_dump(mode="python", exclude_unset=True, exclude_none=True))

    def to_yaml(self) -> str:
        """The recipe as YAML (numeric lists in flow style); ``load_recipe`` reads it back."""
        return yaml.dump(self.to_dict(), Dumper=_RecipeDumper, sort_keys=False, allow_unicode=True, width=100)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _RecipeDumper(yaml.SafeDumper):
    """Safe YAML dumper writing lists of scalars inline (``layer_range: [0, 16]``)."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = bool(data) and all(isinstance(v, (bool, int, float)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_RecipeDumper.add_representer(list, _represent_list)


_PATH_TOKEN = re.compile(r"""\[(\d+)\]|\["((?:[^"\\]|\\.)*)"\]|\['((?:[^'\\]|\\.)*)'\]|\.?([^.\[\]]+)""")


def _parse_path(text: str) -> KeyPath:
    """Inverse of :func:`format_path` for the common cases (``models[1].parameters.weight``)."""
    parts: list[Any] = []
    for m in _PATH_TOKEN.finditer(text):
        idx, dq, sq, key = m.groups()
        if idx is not None:
            parts.append(int(idx))
        elif dq is not None:
            parts.append(dq.replace('\\"', '"'))
        elif sq is not None:
            parts.append(sq)
        elif key is not None:
            parts.append(key)
    return tuple(parts)


# ---------------------------------------------------------------------------------------------------
# Validation and error reporting
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecipeIssue:
    """One problem in a recipe: the key path at fault, what is wrong, and its YAML line (when known)."""

    path: KeyPath
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"line {self.line}, " if self.line is not None else ""
        return f"{where}{format_path(self.path)}: {self.message}"


def _format_issues(source: str, issues: list[RecipeIssue]) -> str:
    if len(issues) == 1:
        i = issues[0]
        where = f"{source} line {i.line}" if i.line is not None else source
        return f"{where}: {format_path(i.path)}: {i.message}"
    return f"{source}: {len(issues)} problems in the recipe:\n" + "\n".join(f"  {i}" for i in issues)


def _raise(source: str, issues: list[RecipeIssue]) -> None:
    issues = sorted(issues, key=lambda i: (i.line if i.line is not None else 0))
    err = RecipeError(_format_issues(source, issues))
    err.issues = issues  # type: ignore[attr-defined]
    raise err


def _model_classes(annotation: Any) -> list[type[BaseModel]]:
    """BaseModel classes mentioned anywhere in a type annotation."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        out += _model_classes(arg)
    return out


def _fields_at(loc: KeyPath) -> list[str]:
    """Allowed keys of the mapping at ``loc`` (walking the schema; list indices and dict keys are skipped)."""
    classes: list[type[BaseModel]] = [Recipe]
    for seg in loc:
        nxt: list[type[BaseModel]] = []
        for cls in classes:
            if isinstance(seg, str) and seg in cls.model_fields:
                nxt += _model_classes(cls.model_fields[seg].annotation)
        if nxt:
            classes = nxt
    return sorted({f for cls in classes for f in cls.model_fields})


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _issues_from_pydantic(exc: ValidationError, lines: Mapping[KeyPath, int] | None) -> list[RecipeIssue]:
    issues: list[RecipeIssue] = []
    seen: set[tuple[KeyPath, str]] = set()
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if p not in _TAGS)
        kind = err["type"]
        inner = (err.get("ctx") or {}).get("error")
        if isinstance(inner, _PathError):
            loc += inner.subpath
            msg = inner.message
        elif "[key]" in err["loc"]:
            msg = f"key {_short(err.get('input'))} must be a string"
        elif kind in ("value_error", "assertion_error"):
            msg = str(inner) if inner is not None else err["msg"]
        elif kind == "missing":
            msg = "required key is missing"
        elif kind == "extra_forbidden":
            key = loc[-1]
            if loc == ("modules",):
                msg = "mergekit's multi-module recipes (`modules`) are not supported; use `models` or `slices`"
            else:
                allowed = _fields_at(loc[:-1])
                close = difflib.get_close_matches(str(key), allowed, n=1) if allowed else []
                hint = f"did you mean {close[0]!r}? " if close else ""
                msg = f"unknown key {key!r}; {hint}allowed here: {', '.join(allowed)}"
        else:
            msg = f"{err['msg']} (got {_short(err.get('input'))})"
        if (loc, msg) in seen:
            continue
        seen.add((loc, msg))
        issues.append(RecipeIssue(loc, msg, nearest_line(lines, loc)))
    return issues


def _registered(method: str) -> MergeMethod | None:
    """The registry's description of ``method``, or None for a name it does not know (reported elsewhere)."""
    try:
        return get_method(method)
    except ParameterError:
        return None


class _Issues(list):
    """Collects RecipeIssues, looking lines up in the recipe's line map."""

    def __init__(self, lines: Mapping[KeyPath, int] | None) -> None:
        super().__init__()
        self.lines = lines

    def line(self, path: KeyPath) -> int | None:
        return nearest_line(self.lines, path)

    def add(self, path: KeyPath, message: str, line_path: KeyPath | None = None) -> None:
        self.append(RecipeIssue(path, message, self.line(line_path if line_path is not None else path)))


def _produces_its_own_model(r: Recipe) -> bool:
    """Engines whose outcome is a built model (ZipIt!) and stitching build the output themselves: no merge method applies."""
    from suture.merge.align.engines import find_engine

    engine = find_engine(r.alignment.get("engine")) if isinstance(r.alignment, Mapping) else None
    return (engine is not None and engine.outcome == "built") or r.stitch is not None


def _check_method(r: Recipe, issues: _Issues) -> None:
    if r.merge_method is None:
        if not _produces_its_own_model(r):
            issues.add(("merge_method",), "required key is missing: name the merge method (e.g. linear, slerp, ties, passthrough)")
        return
    known = list_methods()
    if r.merge_method not in known:
        close = difflib.get_close_matches(r.merge_method, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        issues.add(
            ("merge_method",), f"unknown merge method {r.merge_method!r}; {hint}known methods: {', '.join(known)}"
        )


def _check_inputs(r: Recipe, data: Mapping[str, Any], issues: _Issues) -> None:
    has_models = "models" in data and r.models is not None
    has_slices = "slices" in data and r.slices is not None
    if has_models and has_slices:
        at = issues.line(("models",))
        issues.add(("slices",), f"give either `models` or `slices`, not both (`models` is on line {at})")
    elif not has_models and not has_slices:
        if r.stitch is None:  # a stitch names its models in its own section
            issues.add((), "the recipe needs `models` (whole models to merge) or `slices` (layer ranges to merge or stack)")
    elif has_models and not r.models:
        issues.add(("models",), "`models` is empty: list at least one model")
    elif has_slices and not r.slices:
        issues.add(("slices",), "`slices` is empty: list at least one slice")

    models = r.models or []
    for i, entry in enumerate(models):
        twin = next((j for j in range(i) if models[j].model == entry.model), None)
        if twin is not None:
            issues.add(("models", i, "model"), f"model {entry.model} is listed twice (also models[{twin}])")

    for i, sl in enumerate(r.slices or []):
        if not sl.sources:
            issues.add(("slices", i, "sources"), "a slice needs at least one source")
            continue
        a0, b0 = sl.sources[0].layer_range
        for j, src in enumerate(sl.sources[1:], start=1):
            a, b = src.layer_range
            if b - a != b0 - a0:
                issues.add(
                    ("slices", i, "sources", j, "layer_range"),
                    f"[{a}, {b}] has {b - a} layers but sources[0] has {b0 - a0} ([{a0}, {b0}]); "
                    "all sources of a slice must have the same number of layers",
                )


def _check_method_inputs(r: Recipe, issues: _Issues) -> None:
    """Base model and model counts that the method cannot work without (the registry's requires_base, models)."""
    m = _registered(r.merge_method) if r.merge_method is not None else None
    if m is None or not (r.models or r.slices):
        return
    if m.requires_base:
        if r.slices:
            missing = r.base_model is None and any(sl.base_model is None for sl in r.slices)
        else:
            missing = r.base_model is None
        if missing:
            msg = f"merge method {m.name!r} needs a base_model (set it next to merge_method)"
            issues.add(("base_model",), msg, ("merge_method",))
    besides = " besides the base_model" if m.uses_base else ""
    if r.models:
        refs = {e.model for e in r.models}
        if m.uses_base:
            n = len(refs - {r.base_model})
        else:
            n = len(refs | ({r.base_model} if r.base_model else set()))
        # a method with an open-ended count may get no model besides the base (the output is then the base)
        if not m.fits(n) and (n > 0 or not m.uses_base or m.max_models is not None):
            if m.requires_base and m.max_models == 1:
                msg = f"{m.name} merges exactly two models, base_model and one other; got {n} other(s)"
            else:
                msg = f"{m.name} merges {m.count_words()}{besides}; got {n}"
            issues.add(("models",), msg)
    for i, sl in enumerate(r.slices or []):
        base = sl.base_model or r.base_model
        refs = [s.model for s in sl.sources]
        n = len([ref for ref in refs if ref != base]) if m.uses_base else len(refs)
        if not m.fits(n) and refs:
            where = f" (base_model {base})" if m.uses_base and base is not None else ""
            msg = f"{m.name} takes {m.count_words('source')} per slice{besides}{where}, got {n}"
            issues.add(("slices", i, "sources"), msg)


def _check_data(r: Recipe, issues: _Issues) -> None:
    """Data-driven methods need `data:` on every model they merge; other methods ignore it (warned)."""
    m = _registered(r.merge_method) if r.merge_method is not None else None
    entries = r.models or []
    if m is None or m.needs_data is None:
        for i, e in enumerate(entries):
            if e.data is not None:
                logger.warning("%s: merge method %r does not learn from data; `data` is ignored", _where(r, ("models", i, "data")), r.merge_method)
        return
    if r.slices:
        issues.add(("merge_method",), f"merge method {m.name!r} learns from each model's data: list whole models under "
                   "`models` (each with `data:`), not `slices`")
        return
    for i, e in enumerate(entries):
        if e.data is None and not (m.uses_base and e.model == r.base_model):
            issues.add(("models", i), f"merge method {m.name!r} learns from each model's data ({m.needs_data} statistics): "
                       "give this model `data:` (e.g. sklearn:digits?classes=0-4, or a .txt/.safetensors/.npz file)")


def _check_tokenizer(r: Recipe, issues: _Issues) -> None:
    if r.tokenizer_source is not None and r.tokenizer is not None:
        at = issues.line(("tokenizer_source",))
        issues.add(("tokenizer",), f"give either tokenizer_source or tokenizer, not both (tokenizer_source is on line {at})")
    sources = ((("tokenizer_source",), r.tokenizer_source), (("tokenizer", "source"), r.tokenizer.source if r.tokenizer else None))
    for path, src in sources:
        if src == "base" and r.base_model is None:
            issues.add(path, "'base' takes the base model's tokenizer, but the recipe has no base_model")


def _warn_parameters(r: Recipe) -> None:
    """Warnings only: mergekit accepts these silently, but they are usually mistakes."""
    allowed = _method_param_names(r.merge_method) if r.merge_method is not None else None
    for path, value in _all_params(r):
        if allowed is not None and path[-1] not in allowed:
            close = difflib.get_close_matches(str(path[-1]), sorted(allowed), n=1)
            logger.warning(
                "%s: merge method %r has no parameter %r%s; it is ignored",
                _where(r, path), r.merge_method, path[-1], f" (did you mean {close[0]!r}?)" if close else "",
            )
        for k in unreachable_conditions(value):
            logger.warning("%s: condition %d can never match: an earlier condition has no filter", _where(r, path), k)


def _param_leaves(value: Any) -> list[tuple[KeyPath, Any]]:
    """The plain values inside a parameter setting (a scalar, a gradient's items, each condition's value)."""
    if isinstance(value, list):
        if value and all(isinstance(v, Mapping) for v in value):
            return [((i, "value") + p, v) for i, cond in enumerate(value) for p, v in _param_leaves(cond.get("value"))]
        return [((i,), v) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return [(("value",) + p, v) for p, v in _param_leaves(value.get("value"))]
    return [] if value is None else [((), value)]


def _check_param_values(r: Recipe, issues: _Issues) -> None:
    """Values the method's parameter models refuse (`weight: half`, `.nan`, `normalize: 'yes'`, `density: 1.5`)."""
    method = _registered(r.merge_method) if r.merge_method is not None else None
    if method is None:
        return
    for path, value in _all_params(r):
        for sub, leaf in _param_leaves(value):
            problem = method.value_problem(str(path[-1]), leaf)  # unknown names: warned about by _warn_parameters
            if problem:
                issues.add(path + sub, f"parameter {path[-1]!r} of merge method {method.name!r} {problem}")
                break


def _semantic_issues(
    r: Recipe, data: Mapping[str, Any], lines: Mapping[KeyPath, int] | None
) -> list[RecipeIssue]:
    """Combinations the types alone cannot rule out."""
    issues = _Issues(lines)
    _check_method(r, issues)
    _check_inputs(r, data, issues)
    _check_method_inputs(r, issues)
    _check_tokenizer(r, issues)
    _check_data(r, issues)
    _check_param_values(r, issues)
    _warn_parameters(r)
    return list(issues)


def _where(r: Recipe, path: KeyPath) -> str:
    return f"{r.source}: {r.where(path)}"


def _method_param_names(method: str) -> set[str] | None:
    """Parameter names the registered method declares, or None for a name the registry does not know."""
    m = _registered(method)
    return None if m is None else {p.name for p in (*m.global_params, *m.model_params)}


def _all_params(r: Recipe) -> list[tuple[KeyPath, Any]]:
    out: list[tuple[KeyPath, Any]] = []
    out += [(("parameters", k), v) for k, v in (r.parameters or {}).items()]
    for i, e in enumerate(r.models or []):
        out += [(("models", i, "parameters", k), v) for k, v in (e.parameters or {}).items()]
    for i, sl in enumerate(r.slices or []):
        out += [(("slices", i, "parameters", k), v) for k, v in (sl.parameters or {}).items()]
        for j, src in enumerate(sl.sources):
            out += [(("slices", i, "sources", j, "parameters", k), v) for k, v in (src.parameters or {}).items()]
    return out




def parse_recipe(
    data: Any,
    *,
    source: str = "<dict>",
    lines: Mapping[KeyPath, int] | None = None,
) -> Recipe:
    """Validate recipe data (a dict as from YAML) into a Recipe; every problem raises one RecipeError.

    ``lines`` maps key paths to YAML lines (from :func:`recipes.yaml_lines.load_yaml_with_lines`).
    Merge method names, whether a method needs a base_model, how many models it takes and which
    parameter values it accepts come from the registry in ``merge.methods``.
    """
    if data is None:
        raise RecipeError(f"{source}: the recipe is empty")
    if not isinstance(data, Mapping):
        raise RecipeError(
            f"{source}: a recipe is a mapping of keys (merge_method, models or slices, ...), got {describe_kind(data)}"
        )
    odd = [k for k in data if not isinstance(k, str)]
    if odd:
        # YAML 1.1 reads yes/no/on/off/true/false keys as booleans; pydantic would only say "Keys should be strings"
        _raise(source, [
            RecipeIssue((k,), f"key {k!r} is not a string (quote it if YAML read it as a boolean or number)", nearest_line(lines, (k,)))
            for k in odd
        ])
    try:
        recipe = Recipe.model_validate(dict(data))
    except ValidationError as exc:
        _raise(source, _issues_from_pydantic(exc, lines))
    recipe._source = source
    recipe._lines = dict(lines or {})
    issues = _semantic_issues(recipe, data, lines)
    if issues:
        _raise(source, issues)
    return recipe


def load_recipe(path_or_text: str | Path) -> Recipe:
    """Read a recipe from a YAML file (a Path, or a str naming an existing/``.yml`` file) or from YAML text."""
    if isinstance(path_or_text, Path) or (
        "\n" not in path_or_text
        and (path_or_text.lower().endswith((".yml", ".yaml")) or Path(path_or_text).expanduser().is_file())
    ):
        path = Path(path_or_text).expanduser()
        source = str(path)
        if path.is_dir():
            raise RecipeError(f"{source}: is a folder; expected a recipe YAML file")
        if not path.is_file():
            raise RecipeError(f"recipe file {source} not found")
        try:
            size = path.stat().st_size
            if size > MAX_DOCUMENT_BYTES:
                raise RecipeError(f"{source}: {size:,} bytes is over the recipe size limit of {MAX_DOCUMENT_BYTES:,} bytes")
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise RecipeError(f"{source}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
        except OSError as exc:
            raise RecipeError(f"{source}: cannot read the recipe ({exc.strerror})") from None
    else:
        text, source = path_or_text, "<string>"
    data, lines = load_yaml_with_lines(text, source)
    return parse_recipe(data, source=source, lines=lines)


__all__ = [
    "DTYPES",
    "ModelEntry",
    "ModelRef",
    "Recipe",
    "RecipeIssue",
    "Slice",
    "SliceSource",
    "TokenEmbedding",
    "TokenSource",
    "TokenizerConfig",
    "load_recipe",
    "looks_like_hub_id",
    "parse_recipe",
]
