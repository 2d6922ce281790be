"""The workbench state is a recipe: session state <-> recipe dict, with no Streamlit import.

``st.session_state`` (any mutable mapping here) holds the recipe under :data:`RECIPE` as the plain,
validated dict that ``Recipe.to_dict()`` gives, so exporting it and importing the YAML again yields the same
dict. Pages build their widgets from that dict and write the widget values back through :func:`edit_recipe`.
Widget keys carry :data:`VERSION`, which an import bumps, so every widget starts again from the new recipe.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from suture.merge.errors import RecipeError, SutureError

logger = logging.getLogger(__name__)

RECIPE = "recipe"
LIBRARY = "library"
VERSION = "form_version"
LAST_RUN = "last_run"
WORKSPACE = "workspace"
DEVICE = "device"
EVAL_DATA = "eval_data"
NOTICE = "notice"
EXAMPLE_NOTICE = "example_notice"

DEMO_LIBRARY = ("demo:mlp-seed1", "demo:mlp-seed2", "demo:base", "demo:finetune-0-4", "demo:finetune-5-9",
                "demo:task-0-4", "demo:task-5-9")
DEMO_PREFIX = "demo:"
DEFAULT_EVAL_DATA = "sklearn:digits"
# a starting value for required parameters that have no default (the user changes it)
SUGGESTED = {"weight": 1.0, "t": 0.5}
_SLUG = re.compile(r"[^A-Za-z0-9._-]+")
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "recipes" / "examples"
DEFAULT_EXAMPLE = "quickstart"
TIES_EXAMPLE = "ties_finetunes"


def example_recipes() -> dict[str, Path]:
    """The shipped example recipes (recipes/examples/*.yaml) by file stem, the quickstart first."""
    found = {p.stem: p for p in sorted(EXAMPLES_DIR.glob("*.yaml"))}
    return dict(sorted(found.items(), key=lambda item: (item[0] != DEFAULT_EXAMPLE, item[0])))


def example_summary(name: str) -> str:
    """The leading comment of an example recipe (what it shows), or its name."""
    lines = []
    for line in example_recipes()[name].read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(lines) or name


def example_recipe(name: str) -> dict[str, Any]:
    """An example recipe as the validated plain dict (RecipeError for an unknown name)."""
    examples = example_recipes()
    if name not in examples:
        raise RecipeError(f"example recipe {name!r}: expected one of {list(examples)}")
    return canonical(examples[name].read_text(encoding="utf-8"))


def default_recipe() -> dict[str, Any]:
    """The demo the app opens on: the quickstart Git Re-Basin recipe (two demo MLPs, naive vs aligned barrier)."""
    return example_recipe(DEFAULT_EXAMPLE)


def canonical(recipe: Mapping[str, Any] | str) -> dict[str, Any]:
    """The validated plain dict of a recipe (dict or YAML text); bad input raises RecipeError naming the key."""
    from suture.recipes.runner import load

    return load(dict(recipe) if isinstance(recipe, Mapping) else recipe).to_dict()


def validate(recipe: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """(canonical dict, None) for a valid recipe, else (None, the readable error)."""
    try:
        return canonical(recipe), None
    except SutureError as exc:
        return None, str(exc)


def recipe_yaml(recipe: Mapping[str, Any]) -> str:
    """The recipe as YAML, exactly as `suture run` reads it (validated first)."""
    from suture.recipes.runner import load

    return load(dict(recipe)).to_yaml()


def recipe_payload(recipe: Mapping[str, Any]) -> bytes:
    """The bytes of the recipe download (UTF-8 YAML)."""
    return recipe_yaml(recipe).encode("utf-8")


def slug(text: str | None, fallback: str = "recipe") -> str:
    """A file-name-safe version of a recipe name."""
    cleaned = _SLUG.sub("-", (text or "").strip()).strip("-.")
    return cleaned[:60] or fallback


def download_name(recipe: Mapping[str, Any]) -> str:
    """File name for the recipe download."""
    return f"{slug(recipe.get('name'))}.yaml"


def init_state(ss: MutableMapping[str, Any], workspace: str | Path) -> None:
    """Fill the session with the demo recipe and library on first use (later runs keep what is there)."""
    ss.setdefault(WORKSPACE, str(workspace))
    if RECIPE not in ss:
        ss[RECIPE] = canonical(default_recipe())
    if LIBRARY not in ss:
        ss[LIBRARY] = list(DEMO_LIBRARY)
    add_to_library(ss, referenced_refs(ss[RECIPE]))
    ss.setdefault(VERSION, 0)
    ss.setdefault(DEVICE, "auto")
    ss.setdefault(EVAL_DATA, DEFAULT_EVAL_DATA)


def widget_key(ss: Mapping[str, Any], *parts: Any) -> str:
    """A widget key that changes when a recipe is imported, so the widget starts from the new recipe."""
    return ".".join([*(str(p) for p in parts), f"v{ss.get(VERSION, 0)}"])


def add_to_library(ss: MutableMapping[str, Any], refs: Iterable[str]) -> list[str]:
    """Add model references to the session's model list (no duplicates, order kept); returns the list."""
    library = list(ss.get(LIBRARY, []))
    for ref in refs:
        if ref and ref not in library:
            library.append(ref)
    ss[LIBRARY] = library
    return library


# ---------------------------------------------------------------------------------------------- references


def ref_text(value: Any) -> str:
    """A model reference as one string, whether written short (``org/name@rev``) or in mergekit's long form."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        inner = value.get("model", value)
        if isinstance(inner, str):
            return inner
        if isinstance(inner, Mapping) and "path" in inner:
            rev = inner.get("revision")
            return f"{inner['path']}@{rev}" if rev else str(inner["path"])
    return str(value)


def referenced_refs(recipe: Mapping[str, Any]) -> list[str]:
    """Every model reference of a recipe dict (base first), as strings, without repeats."""
    refs: list[str] = []
    if recipe.get("base_model") is not None:
        refs.append(ref_text(recipe["base_model"]))
    for entry in recipe.get("models") or []:
        refs.append(ref_text(entry.get("model")))
    for sl in recipe.get("slices") or []:
        if sl.get("base_model") is not None:
            refs.append(ref_text(sl["base_model"]))
        refs += [ref_text(src.get("model")) for src in sl.get("sources") or []]
    stitch = recipe.get("stitch")
    if isinstance(stitch, Mapping):
        refs += [ref_text(stitch[side]["model"]) for side in ("source", "target") if isinstance(stitch.get(side), Mapping) and stitch[side].get("model")]
    return list(dict.fromkeys(refs))


def is_local_ref(ref: str, workspace_root: Path | None = None) -> bool:
    """Whether a reference names a file or folder (not a demo model, not a Hub id), decided without network."""
    from suture.merge.hub import is_hub_id

    text = ref.split("+")[0].strip()
    if text.startswith(DEMO_PREFIX):
        return False
    if workspace_root is not None and not Path(text).is_absolute() and (workspace_root / text.split("@")[0]).exists():
        return True
    return not is_hub_id(text)


def localize_refs(recipe: Mapping[str, Any], workspace: Any) -> dict[str, Any]:
    """The recipe with every local model and data path made absolute inside the workspace; paths outside are refused.

    ``workspace`` is an :class:`app.workspace.Workspace`. Relative paths are read from the workspace root.
    """

    def fix(value: Any) -> Any:
        text = ref_text(value)
        if not is_local_ref(text, workspace.root):
            return value
        path, sep, rest = text.partition("@")
        absolute = workspace.resolve(path).as_posix() + (sep + rest if sep else "")
        if isinstance(value, str):
            return absolute
        out = copy.deepcopy(dict(value))
        if isinstance(out.get("model"), Mapping):
            out["model"]["path"] = workspace.resolve(out["model"]["path"]).as_posix()
        elif "model" in out:
            out["model"] = absolute
        elif "path" in out:
            out["path"] = workspace.resolve(out["path"]).as_posix()
        return out

    out = copy.deepcopy(dict(recipe))
    if out.get("base_model") is not None:
        out["base_model"] = fix(out["base_model"])
    for entry in out.get("models") or []:
        entry["model"] = fix(entry["model"])
    for sl in out.get("slices") or []:
        if sl.get("base_model") is not None:
            sl["base_model"] = fix(sl["base_model"])
        for src in sl.get("sources") or []:
            src["model"] = fix(src["model"])
    source = out.get("tokenizer_source")
    if isinstance(source, str) and source not in ("union", "base"):
        out["tokenizer_source"] = fix(source)
    for section in ("alignment", "evaluate"):
        if isinstance(out.get(section), Mapping) and out[section].get("data") is not None:
            out[section]["data"] = workspace.confine_data(out[section]["data"])
    return out


# ---------------------------------------------------------------------------------------------- import


def import_recipe(ss: MutableMapping[str, Any], source: str | bytes | Mapping[str, Any], workspace: Any) -> dict[str, Any]:
    """Replace the session's recipe with an uploaded/pasted one (validated, local paths kept in the workspace)."""
    if isinstance(source, bytes):
        try:
            source = source.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RecipeError(f"the recipe is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    recipe = canonical(source)
    recipe = canonical(localize_refs(recipe, workspace))
    ss[RECIPE] = recipe
    add_to_library(ss, referenced_refs(recipe))
    ss[VERSION] = int(ss.get(VERSION, 0)) + 1
    ss.pop(LAST_RUN, None)
    logger.info("imported recipe %s", recipe.get("name") or "(unnamed)")
    return recipe


# ---------------------------------------------------------------------------------------------- editing


def same_value(a: Any, b: Any) -> bool:
    """Equal values, where 1 and 1.0 count as equal but True and 1 do not."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def keep_or_set(params: Mapping[str, Any], name: str, value: Any, default: Any) -> tuple[bool, Any]:
    """Whether to write a parameter and which value: the old one when equal (keeps 1 vs 1.0 as written)."""
    if name in params:
        old = params[name]
        return True, old if same_value(old, value) else value
    if value is None:
        return False, None
    if default is None or not same_value(value, default):
        return True, value
    return False, None


def edit_recipe(
    recipe: Mapping[str, Any],
    *,
    method: str | None,
    base: str | None,
    models: list[str] | None,
    global_params: Mapping[str, Any],
    model_params: Mapping[str, Mapping[str, Any]],
    known_params: Iterable[str],
    name: str | None = None,
    dtype: str | None = None,
    alignment: Mapping[str, Any] | None = None,
    evaluate: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The recipe with the form's values written in; keys the form does not manage are kept.

    ``models=None`` leaves ``models``/``slices`` as they are (slice recipes are edited as YAML).
    Parameters the chosen method does not know (``known_params``) are dropped from the edited sections.
    ``method=None`` (ZipIt builds the merged model itself) removes ``merge_method``.
    """
    known = set(known_params)
    out = copy.deepcopy(dict(recipe))
    _set(out, "merge_method", method)
    _set(out, "name", name or None)
    _set(out, "base_model", base)
    _set(out, "dtype", dtype)
    _set(out, "alignment", dict(alignment) if alignment else None)
    _set(out, "evaluate", dict(evaluate) if evaluate else None)
    if models is not None and "slices" not in out:
        old = {ref_text(e.get("model")): e for e in out.get("models") or []}
        entries = []
        for ref in models:
            entry = copy.deepcopy(dict(old.get(ref, {"model": ref})))
            params = {k: v for k, v in (entry.get("parameters") or {}).items() if k in known}
            params.update(model_params.get(ref, {}))
            _set(entry, "parameters", params or None)
            entries.append(entry)
        out["models"] = entries
    params = {k: v for k, v in (out.get("parameters") or {}).items() if k in known}
    params.update(global_params)
    _set(out, "parameters", params or None)
    return out


def _set(d: dict[str, Any], key: str, value: Any) -> None:
    if value is None:
        d.pop(key, None)
    else:
        d[key] = value


def parse_param_text(text: str) -> Any:
    """A parameter typed as YAML (a number, true/false, a gradient list, or a list of filter conditions)."""
    import yaml

    text = text.strip()
    if not text:
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{text!r}: not a valid YAML value ({str(exc).splitlines()[0]})") from None


def param_text(value: Any) -> str:
    """The YAML text shown for a structured parameter value."""
    import yaml

    if value is None:
        return ""
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()
