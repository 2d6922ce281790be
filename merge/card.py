"""Model cards (README.md) for merged and stitched models, with Hub metadata.

The front matter follows the Hub's conventions for merges: ``base_model`` lists the inputs that are Hub
ids (decided syntactically, never over the network), ``base_model_relation: merge``, tags naming Suture,
the method and the alignment engine, and ``library_name`` / ``pipeline_tag`` / ``license`` when known. A
license is carried over from the inputs only when every input declares the same one. The body says how
the model was made (method and engine, with their papers), from what, with which recipe, and how it scored.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from suture.merge.errors import InputError
from suture.merge.hub import hub_cache_dir, hub_endpoint, is_hub_id, split_hub_ref

logger = logging.getLogger(__name__)

# Papers behind the merge methods, used when the method registry cannot say (text, link).
METHOD_PAPERS: dict[str, tuple[str, str]] = {
    "linear": (
        "Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing "
        "inference time (Wortsman et al., ICML 2022)",
        "https://arxiv.org/abs/2203.05482",
    ),
    "slerp": (
        "Animating rotation with quaternion curves (Shoemake, SIGGRAPH 1985)",
        "https://doi.org/10.1145/325165.325242",
    ),
    "task_arithmetic": ("Editing Models with Task Arithmetic (Ilharco et al., ICLR 2023)", "https://arxiv.org/abs/2212.04089"),
    "ties": (
        "TIES-Merging: Resolving Interference When Merging Models (Yadav et al., NeurIPS 2023)",
        "https://arxiv.org/abs/2306.01708",
    ),
    "dare_ties": (
        "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch (Yu et al., ICML 2024)",
        "https://arxiv.org/abs/2311.03099",
    ),
    "dare_linear": (
        "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch (Yu et al., ICML 2024)",
        "https://arxiv.org/abs/2311.03099",
    ),
    "breadcrumbs": (
        "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks (Davari & Belilovsky, ECCV 2024)",
        "https://arxiv.org/abs/2312.06795",
    ),
    "model_stock": ("Model Stock: All we need is just a few fine-tuned models (Jang et al., ECCV 2024)", "https://arxiv.org/abs/2403.19522"),
    "della": (
        "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling (Deep et al., 2024)",
        "https://arxiv.org/abs/2406.11617",
    ),
    "fisher": ("Merging Models with Fisher-Weighted Averaging (Matena & Raffel, NeurIPS 2022)", "https://arxiv.org/abs/2111.09832"),
    "regmean": (
        "Dataless Knowledge Fusion by Merging Weights of Language Models (Jin et al., ICLR 2023)",
        "https://arxiv.org/abs/2212.09849",
    ),
}
METHOD_PAPERS["breadcrumbs_ties"] = METHOD_PAPERS["breadcrumbs"]
METHOD_PAPERS["della_linear"] = METHOD_PAPERS["della"]

_REBASIN = (
    "Git Re-Basin: Merging Models modulo Permutation Symmetries (Ainsworth et al., ICLR 2023)",
    "https://arxiv.org/abs/2209.04836",
)
# Papers behind the alignment engines.
ENGINE_PAPERS: dict[str, list[tuple[str, str]]] = {
    "weight_matching": [_REBASIN],
    "activation_matching": [_REBASIN],
    "ot": [("Model Fusion via Optimal Transport, OTFusion (Singh & Jaggi, NeurIPS 2020)", "https://arxiv.org/abs/1910.05653")],
    "zipit": [
        ("ZipIt! Merging Models from Different Tasks without Training (Stoica et al., ICLR 2024)", "https://arxiv.org/abs/2305.03053")
    ],
    "stitching": [
        (
            "Relative representations enable zero-shot latent space communication (Moschella et al., ICLR 2023)",
            "https://arxiv.org/abs/2209.15430",
        ),
        ("Latent Space Translation via Semantic Alignment (Maiorca et al., NeurIPS 2023)", "https://arxiv.org/abs/2311.00664"),
    ],
}
ENGINE_TITLES = {
    "weight_matching": "permutation alignment by weight matching",
    "activation_matching": "permutation alignment by activation matching",
    "ot": "soft alignment by optimal transport",
    "zipit": "feature zipping (merge/unmerge matrices)",
    "stitching": "stitching of representations",
}
_ENGINE_ALIASES = {"otfusion": "ot", "optimal_transport": "ot", "stitch": "stitching"}
_LICENSE_KEYS = ("license", "license_name", "license_link")
_TRAILING_URL = re.compile(r"^(.+?)\s+(https?://\S+)$", re.DOTALL)


# ---------------------------------------------------------------------------------------------- papers


def _format_paper(paper: Any) -> str | None:
    """Markdown for a paper given as text, (text, url), or a mapping/object with title and url."""
    if paper is None:
        return None
    if isinstance(paper, str):
        match = _TRAILING_URL.match(paper.strip())
        return f"[{match.group(1)}]({match.group(2)})" if match else (paper.strip() or None)
    if isinstance(paper, Mapping):
        title, url = paper.get("title") or paper.get("text"), paper.get("url") or paper.get("link")
    elif isinstance(paper, Sequence) and len(paper) == 2:
        title, url = paper
    else:
        title, url = getattr(paper, "title", None), getattr(paper, "url", None)
    if title and url:
        return f"[{title}]({url})"
    return str(title or url or paper)


def method_paper(method: str) -> str | None:
    """Markdown citation of the paper behind a merge method (registry first, then the built-in table)."""
    from suture.merge.methods import get_method

    key = method.strip().lower()
    try:
        text = _format_paper(getattr(get_method(key), "paper", None))
    except (LookupError, ValueError, TypeError, AttributeError):
        text = None  # not in the registry: fall back to the table
    return text or _format_paper(METHOD_PAPERS.get(key))


def engine_key(engine: str | None) -> str | None:
    """Canonical engine name (accepts a few aliases such as 'otfusion')."""
    if engine is None:
        return None
    key = engine.strip().lower().replace("-", "_")
    return _ENGINE_ALIASES.get(key, key)


def engine_papers(engine: str | None) -> list[str]:
    """Markdown citations of the papers behind an alignment engine."""
    key = engine_key(engine)
    return [text for text in (_format_paper(p) for p in ENGINE_PAPERS.get(key or "", [])) if text]


# ---------------------------------------------------------------------------------------------- licenses


def _front_matter(readme: Path) -> dict:
    """README metadata parsed by huggingface_hub; empty when missing or malformed (license then unknown)."""
    from huggingface_hub.repocard import metadata_load

    try:
        data = metadata_load(readme)
    except Exception:  # malformed YAML or encoding: treat as "no metadata", never fail a merge over it
        logger.debug("could not parse the metadata of %s", readme)
        return {}
    return data if isinstance(data, dict) else {}


def _license_from_folder(folder: Path) -> dict[str, str] | None:
    readme = folder / "README.md"
    if readme.is_file():
        meta = _front_matter(readme)
        if isinstance(meta.get("license"), str):
            return {k: str(meta[k]) for k in _LICENSE_KEYS if isinstance(meta.get(k), str)}
    config = folder / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text())
        except (OSError, json.JSONDecodeError):
            data = {}
        if isinstance(data, dict) and isinstance(data.get("license"), str):
            return {"license": data["license"]}
    return None


def _cached_readme(ref: str) -> Path | None:
    """README.md of a Hub model if it is already in the local cache (never touches the network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo_id, revision = split_hub_ref(ref)
    try:
        found = try_to_load_from_cache(repo_id, "README.md", cache_dir=str(hub_cache_dir()), revision=revision)
    except Exception:
        return None
    return Path(found) if isinstance(found, str) else None


def read_license(ref: str | Path) -> dict[str, str] | None:
    """License metadata of one input (local folder/file, or a Hub id already in the cache); None if unknown."""
    path = Path(ref).expanduser()
    if path.exists():
        return _license_from_folder(path if path.is_dir() else path.parent)
    if isinstance(ref, str) and is_hub_id(ref):
        readme = _cached_readme(ref)
        if readme is not None:
            return _license_from_folder(readme.parent)
    return None


def common_license(inputs: Sequence[str | Path]) -> dict[str, str] | None:
    """The license every input declares, or None when any input is unknown or they disagree."""
    found = [read_license(ref) for ref in inputs]
    if not found or any(item is None for item in found):
        return None
    first = found[0]
    return dict(first) if all(item == first for item in found[1:]) else None


# ---------------------------------------------------------------------------------------------- rendering


def _cell(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (dict, list)):
        text = json.dumps(value, sort_keys=True)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def _evaluation_table(evaluation: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[str]:
    """A flat {metric: value} gives a two-column table; {row: {metric: value}} or a list of rows a grid."""
    if isinstance(evaluation, Mapping):
        if evaluation and all(isinstance(v, Mapping) for v in evaluation.values()):
            rows = [{"model": name, **dict(values)} for name, values in evaluation.items()]
        else:
            return _table(["Metric", "Value"], [[k, v] for k, v in evaluation.items()])
    else:
        rows = [dict(r) for r in evaluation]
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    return _table(columns, [[row.get(c, "") for c in columns] for row in rows])


def _fence(text: str) -> str:
    """A code fence longer than any backtick run inside `text`."""
    longest = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def _input_row(index: int, ref: str, endpoint: str) -> list[str]:
    if is_hub_id(ref):
        repo_id, revision = split_hub_ref(ref)
        link = f"[{repo_id}]({endpoint}/{repo_id})"
        return [str(index), link, revision or "main", "Hub"]
    return [str(index), f"`{ref}`", "", "local"]


def _base_models(inputs: Sequence[str]) -> list[str]:
    seen: list[str] = []
    for ref in inputs:
        if isinstance(ref, str) and is_hub_id(ref):
            repo_id = split_hub_ref(ref)[0]
            if repo_id not in seen:
                seen.append(repo_id)
    return seen


def build_model_card(
    *,
    inputs: list[str],
    method: str,
    engine: str | None = None,
    recipe_yaml: str | None = None,
    evaluation: dict | None = None,
    plot_path: str | None = None,
    license: str | None = None,  # noqa: A002 - the Hub metadata key
    library_name: str | None = None,
    pipeline_tag: str | None = None,
    stitched: dict | None = None,
    name: str | None = None,
) -> str:
    """README.md text (Hub front matter + body) describing a merged or stitched model."""
    # license=None carries over the license all inputs share (if they agree); license="" states none.
    from huggingface_hub import ModelCard, ModelCardData

    if not method or not isinstance(method, str):
        raise InputError("model card: 'method' must name the merge method (e.g. 'linear', 'ties')")
    inputs = [str(ref) for ref in inputs]
    engine = engine_key(engine)
    base_models = _base_models(inputs)

    license_meta: dict[str, str] = {}
    if license:
        license_meta = {"license": license}
    elif license is None:
        license_meta = common_license(inputs) or {}
    tags = []
    for tag in ("merge", "suture", method.strip().lower(), engine, "stitching" if stitched else None):
        if tag and tag not in tags:
            tags.append(tag)
    extra: dict[str, Any] = {}
    if base_models:
        extra["base_model_relation"] = "merge"
    if "license_name" in license_meta:
        extra["license_name"] = license_meta["license_name"]
    if "license_link" in license_meta:
        extra["license_link"] = license_meta["license_link"]
    data = ModelCardData(
        base_model=base_models or None,
        library_name=library_name,
        license=license_meta.get("license"),
        pipeline_tag=pipeline_tag,
        tags=tags,
        **extra,
    )

    endpoint = hub_endpoint()
    kind = "stitched" if stitched else "merged"
    title = name or f"{kind.capitalize()} model"
    body: list[str] = [f"# {title}", ""]
    what = "method" if stitched else "merge method"
    body.append(
        f"This model was {kind} from {len(inputs)} input model{'s' if len(inputs) != 1 else ''} with Suture, "
        f"using the `{method}` {what}" + (f" after `{engine}` alignment." if engine and engine != "stitching" else ".")
    )
    body += ["", "## Method", ""]
    paper = method_paper(method)
    body.append(f"- **{what.capitalize()}:** `{method}`" + (f" — {paper}" if paper else ""))
    if engine:
        description = ENGINE_TITLES.get(engine, "alignment")
        papers = engine_papers(engine)
        body.append(f"- **Alignment engine:** `{engine}` ({description})" + (" — " + "; ".join(papers) if papers else ""))
    else:
        body.append("- **Alignment engine:** none (tensors were combined by name, without aligning hidden units)")

    body += ["", "## Input models", ""]
    body += _table(["#", "Model", "Revision", "Source"], [_input_row(i + 1, ref, endpoint) for i, ref in enumerate(inputs)])

    if stitched:
        body += ["", "## Stitching", ""]
        body += _table(["Part", "Value"], [[k, v] for k, v in stitched.items()])

    if recipe_yaml and recipe_yaml.strip():
        fence = _fence(recipe_yaml)
        body += ["", "## Recipe", "", "The recipe that produced this model (`suture_recipe.yml`):", "", f"{fence}yaml", recipe_yaml.rstrip("\n"), fence]

    if evaluation or plot_path:
        body += ["", "## Evaluation", ""]
        if evaluation:
            body += _evaluation_table(evaluation)
        if plot_path:
            body += ["", f"![Evaluation plot]({Path(plot_path).as_posix()})"]

    if license_meta.get("license"):
        body += ["", "## License", "", f"Released under `{license_meta['license']}`" + (
            ", the license shared by all input models." if license is None else "."
        )]
    text = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"
    return str(ModelCard(text))


def write_model_card(out_dir: str | Path, **kwargs: Any) -> Path:
    """Write README.md into `out_dir` (copying an outside plot image next to it); returns the README path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot = kwargs.get("plot_path")
    if plot:
        source = Path(plot)
        if not source.is_absolute():
            source = out / source
        if not source.is_file():
            raise InputError(f"{plot}: plot image not found (give a path inside {out} or an existing image file)")
        try:
            relative = source.resolve().relative_to(out.resolve())
        except ValueError:
            relative = Path(source.name)
            shutil.copyfile(source, out / relative)
        kwargs["plot_path"] = relative.as_posix()
    if kwargs.get("recipe_yaml") is None and (out / "suture_recipe.yml").is_file():
        kwargs["recipe_yaml"] = (out / "suture_recipe.yml").read_text(encoding="utf-8")
    readme = out / "README.md"
    readme.write_text(build_model_card(**kwargs), encoding="utf-8")
    logger.info("wrote model card %s", readme)
    return readme


__all__ = [
    "METHOD_PAPERS",
    "ENGINE_PAPERS",
    "method_paper",
    "engine_papers",
    "read_license",
    "common_license",
    "build_model_card",
    "write_model_card",
]
