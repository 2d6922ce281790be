"""Safe YAML loading that remembers the line of every key and list item.

Recipe errors must point at the line that is wrong, so the document is composed into YAML nodes with
PyYAML's safe loader and turned into plain Python objects here, recording ``path -> line`` on the way.
Only the safe constructors run (no Python object tags), exactly as with ``yaml.safe_load``.
A key path is a tuple of mapping keys and list indices, e.g. ``("models", 1, "parameters", "weight")``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from suture.merge.errors import RecipeError

logger = logging.getLogger(__name__)

KeyPath = tuple[Any, ...]
LineMap = dict[KeyPath, int]

# Bounds that keep a hostile recipe from exhausting memory or the stack. A real recipe is a few KiB with
# a handful of anchors; a "billion laughs" document multiplies nodes through nested aliases instead.
MAX_DOCUMENT_BYTES = 1024 * 1024
MAX_ALIAS_EXPANSIONS = 100_000
MAX_DEPTH = 64

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"


def format_path(path: KeyPath) -> str:
    """Render a key path as ``models[1].parameters.weight`` (odd keys quoted: ``tokens["<|im_end|>"]``)."""
    out = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier():
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]" if not isinstance(part, str) else '["' + part.replace('"', '\\"') + '"]'
    return out or "<top level>"


def nearest_line(lines: Mapping[KeyPath, int] | None, path: KeyPath) -> int | None:
    """Line of ``path``, or of its closest ancestor when the key itself is absent (e.g. a missing key)."""
    if not lines:
        return None
    p = tuple(path)
    while True:
        if p in lines:
            return lines[p]
        if not p:
            return None
        p = p[:-1]


class _Builder:
    """Turns a composed node tree into Python objects while filling a LineMap."""

    def __init__(self, loader: yaml.SafeLoader, source: str) -> None:
        self.loader = loader
        self.source = source
        self.lines: LineMap = {}
        self._active: set[int] = set()
        self._built: set[int] = set()
        self._expanded = 0  # nodes built a second time or more: what aliases multiply

    def _count(self, node: yaml.Node, path: KeyPath) -> None:
        if len(path) > MAX_DEPTH:
            raise self._fail(node, f"the recipe nests deeper than {MAX_DEPTH} levels")
        if id(node) in self._built:
            self._expanded += 1
            if self._expanded > MAX_ALIAS_EXPANSIONS:
                raise self._fail(node, f"YAML aliases expand to more than {MAX_ALIAS_EXPANSIONS:,} values (an alias bomb?)")
        else:
            self._built.add(id(node))

    def _fail(self, node: yaml.Node, message: str) -> RecipeError:
        return RecipeError(f"{self.source} line {node.start_mark.line + 1}: {message}")

    def build(self, node: yaml.Node, path: KeyPath) -> Any:
        self._count(node, path)
        self.lines.setdefault(path, node.start_mark.line + 1)
        if id(node) in self._active:
            raise self._fail(node, "a YAML alias refers to the structure that contains it (recursive alias)")
        if isinstance(node, yaml.MappingNode) and node.tag == _MAP_TAG:
            self._active.add(id(node))
            try:
                return self._mapping(node, path)
            finally:
                self._active.discard(id(node))
        if isinstance(node, yaml.SequenceNode) and node.tag == _SEQ_TAG:
            self._active.add(id(node))
            try:
                return [self.build(child, path + (i,)) for i, child in enumerate(node.value)]
            finally:
                self._active.discard(id(node))
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as exc:
            raise self._fail(node, f"unsupported YAML value ({exc.problem})") from None

    def _key(self, knode: yaml.Node) -> Any:
        try:
            key = self.loader.construct_object(knode, deep=True)
        except yaml.constructor.ConstructorError as exc:
            raise self._fail(knode, f"unsupported YAML key ({exc.problem})") from None
        try:
            hash(key)
        except TypeError:
            raise self._fail(knode, "a mapping key must be a plain value, not a list or mapping") from None
        return key

    def _mapping(self, node: yaml.MappingNode, path: KeyPath) -> dict[Any, Any]:
        # A repeated key is almost always a copy-paste slip that would silently drop a setting:
        # refuse it (explicit keys only; keys pulled in through a `<<` merge may be overridden).
        seen: dict[Any, int] = {}
        for knode, _ in node.value:
            if knode.tag == _MERGE_TAG:
                continue
            key = self._key(knode)
            line = knode.start_mark.line + 1
            if key in seen:
                raise self._fail(knode, f"key {key!r} appears twice in the same mapping (first on line {seen[key]})")
            seen[key] = line
        try:
            self.loader.flatten_mapping(node)
        except yaml.constructor.ConstructorError as exc:
            raise self._fail(node, f"bad YAML merge key ({exc.problem})") from None
        result: dict[Any, Any] = {}
        for knode, vnode in node.value:
            key = self._key(knode)
            self.lines[path + (key,)] = knode.start_mark.line + 1
            # later entries win: explicit keys come after merged ones, as in yaml.safe_load
            result[key] = self.build(vnode, path + (key,))
        return result


def load_yaml_with_lines(text: str, source: str = "<string>") -> tuple[Any, LineMap]:
    """Parse one YAML document safely; return the data and a map of key path -> 1-based line.

    Documents over :data:`MAX_DOCUMENT_BYTES`, nested deeper than :data:`MAX_DEPTH` or whose aliases expand
    to more than :data:`MAX_ALIAS_EXPANSIONS` values are refused.
    """
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_DOCUMENT_BYTES:
        raise RecipeError(f"{source}: {size:,} bytes is over the recipe size limit of {MAX_DOCUMENT_BYTES:,} bytes")
    try:
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as exc:  # the reader refuses control characters before any parsing
        raise RecipeError(f"{source}: not valid YAML ({' '.join(str(exc).split())})") from None
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise RecipeError(f"{source}: the recipe nests deeper than {MAX_DEPTH} levels") from None
        except yaml.composer.ComposerError as exc:
            if "single document" in f"{exc.context} {exc.problem}":
                line = exc.problem_mark.line + 1 if exc.problem_mark else "?"
                raise RecipeError(
                    f"{source} line {line}: the file holds several YAML documents ('---'); a recipe is one document"
                ) from None
            raise _syntax_error(exc, source) from None
        except yaml.MarkedYAMLError as exc:
            raise _syntax_error(exc, source) from None
        except yaml.YAMLError as exc:
            raise RecipeError(f"{source}: not valid YAML ({' '.join(str(exc).split())})") from None
        if node is None:
            return None, {}
        builder = _Builder(loader, source)
        try:
            data = builder.build(node, ())
        except RecursionError:  # a tagged collection (!!omap, !!set) nested past the stack
            raise RecipeError(f"{source}: the recipe nests deeper than {MAX_DEPTH} levels") from None
        return data, builder.lines
    finally:
        loader.dispose()


def read_yaml_file(path: str | Path, what: str) -> tuple[Any, LineMap, str]:
    """A spec file's data, line map and source name; a missing file is one RecipeError naming ``what``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise RecipeError(f"{what} {path} not found")
    data, lines = load_yaml_with_lines(path.read_text(encoding="utf-8"), str(path))
    return data, lines, str(path)


def validate_spec(model: Any, data: Any, source: str, lines: Mapping[KeyPath, int] | None, keys: str) -> Any:
    """A pydantic spec model from YAML data, with ``_source``/``_lines`` set; problems are one RecipeError line."""
    from pydantic import ValidationError

    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a {keys}")
    try:
        spec = model.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(validation_message(source, exc, lines)) from None
    spec._source, spec._lines = source, dict(lines or {})
    return spec


def validation_message(source: str, exc: Any, lines: Mapping[KeyPath, int] | None) -> str:
    """A pydantic ValidationError as one line: ``SOURCE: key.path (line N): problem; ...``."""
    problems = []
    for err in exc.errors():
        path = tuple(p for p in err["loc"] if not isinstance(p, str) or not p.startswith(("function-", "constrained-")))
        line = nearest_line(lines, path)
        problems.append(f"{format_path(path)}{f' (line {line})' if line else ''}: {err['msg']}")
    return f"{source}: " + "; ".join(problems)


def _syntax_error(exc: yaml.MarkedYAMLError, source: str) -> RecipeError:
    mark = exc.problem_mark or exc.context_mark
    where = f"{source} line {mark.line + 1}, column {mark.column + 1}" if mark else source
    what = " ".join(str(x) for x in (exc.context, exc.problem) if x)
    return RecipeError(f"{where}: YAML syntax error: {what or exc}")


__all__ = ["MAX_ALIAS_EXPANSIONS", "MAX_DEPTH", "MAX_DOCUMENT_BYTES", "KeyPath", "LineMap", "format_path", "load_yaml_with_lines", "nearest_line",
           "read_yaml_file", "validate_spec", "validation_message"]
