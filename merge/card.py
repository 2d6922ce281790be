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

from suture.merge.errors import InputError, ParameterError, SutureError
from suture.merge.hub import hub_cache_dir, hub_endpoint, is_hub_id, split_hub_ref
from suture.merge.report import Report
from suture.merge.store import read_json

logger = logging.getLogger(__name__)

# Papers of methods a card may name that are not registered merge methods (the registry cites its own).
METHOD_PAPERS: dict[str, tuple[str, str]] = {
    "fisher": ("Merging Models with Fisher-Weighted Averaging (Matena & Raffel, NeurIPS 2022)", "https://arxiv.org/abs/2111.09832"),
    "regmean": (
        "Dataless Knowledge Fusion by Merging Weights of Language Models (Jin et al., ICLR 2023)",
        "https://arxiv.org/abs/2212.09849",
    ),
}

# Stitching is not an alignment engine (it has no registry entry): its papers and title live here.
STITCHING = "stitching"
STITCHING_PAPERS = [
    (
        "Relative representations enable zero-shot latent space communication (Moschella et al., ICLR 2023)",
        "https://arxiv.org/abs/2209.15430",
    ),
    ("Latent Space Translation via Semantic Alignment (Maiorca et al., NeurIPS 2023)", "https://arxiv.org/abs/2311.00664"),
]
STITCHING_TITLE = "stitching of representations"
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
    """Markdown citation of the papers behind a merge method (the registry's, else the table above)."""
    from suture.merge.methods import get_method

    key = method.strip().lower()
    try:
        papers = get_method(key).papers
    except ParameterError:
        papers = ()
    cited = [text for text in map(_format_paper, papers) if text]
    if cited:
        return "; ".join(cited)
    return _format_paper(METHOD_PAPERS.get(key))


def engine_key(engine: str | None) -> str | None:
    """Canonical engine name (the registry resolves aliases such as 'otfusion')."""
    if engine is None:
        return None
    from suture.merge.align.engines import find_engine

    key = engine.strip().lower().replace("-", "_")
    if key in (STITCHING, "stitch"):
        return STITCHING
    found = find_engine(key)
    return found.name if found is not None else key


def engine_title(engine: str | None) -> str:
    """What the card says an engine did (from the engine registry)."""
    from suture.merge.align.engines import find_engine

    key = engine_key(engine)
    if key == STITCHING:
        return STITCHING_TITLE
    found = find_engine(key)
    return found.description if found is not None else "alignment"


def engine_papers(engine: str | None) -> list[str]:
    """Markdown citations of the papers behind an alignment engine (from the engine registry)."""
    from suture.merge.align.engines import find_engine

    key = engine_key(engine)
    found = find_engine(key)
    papers = STITCHING_PAPERS if key == STITCHING else list(found.papers) if found is not None else []
    return [text for text in (_format_paper(p) for p in papers) if text]


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
            data = read_json(config)
        except SutureError:  # an unreadable config only means no license is known
            data = {}
        if isinstance(data.get("license"), str):
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
    if ref.startswith("demo:"):
        return [str(index), f"`{ref}`", "", "built-in demo (trained by Suture on scikit-learn's digits)"]
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
    for tag in ("merge", "suture", method.strip().lower(), engine, STITCHING if stitched else None):
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
        f"using the `{method}` {what}" + (f" after `{engine}` alignment." if engine and engine != STITCHING else ".")
    )
    body += ["", "## Method", ""]
    paper = method_paper(method)
    body.append(f"- **{what.capitalize()}:** `{method}`" + (f" — {paper}" if paper else ""))
    if engine:
        description = engine_title(engine)
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


# ---------------------------------------------------------------------------------------------- from a report

STITCH_PLOT = "accuracy.png"  # the stitch pipeline's accuracy figure, shown on the card when it was drawn


def _merge_rows(evaluation: Any) -> list[dict[str, Any]]:
    """Inputs and the merge under loss/accuracy; each interpolation path under its own "loss barrier" and
    "midpoint accuracy" columns (a barrier is not a loss, so it never sits under one; noise below 1e-6 reads 0)."""
    from suture.merge.evaluate import shown_barrier

    rows = [{"model": key, **{k: round(v, 4) for k, v in m.model_dump(exclude_unset=True).items()}} for key, m in evaluation.models.items()]
    rows.append({"model": "merged", **{k: round(v, 4) for k, v in evaluation.merged.model_dump(exclude_unset=True).items()}})
    for label, b in evaluation.barriers.items():
        loss = shown_barrier(b.loss)
        rows.append({"model": f"{label} path", "loss barrier": "" if loss is None else round(loss, 4),
                     **({"midpoint accuracy": round(evaluation.midpoint_accuracy[label], 4)} if label in evaluation.midpoint_accuracy else {})})
    return rows


def report_card(report: Report) -> dict[str, Any]:
    """build_model_card's arguments read from a run's Report (inputs, method, engine, evaluation, plot, stitch)."""
    if report.kind == "stitch":
        source, target = report.source, report.target
        return {
            "inputs": [source.model, target.model],
            "method": f"stitch ({report.method})",
            "engine": "stitching",
            "evaluation": {k: row.model_dump(include={"accuracy", "f1_macro", "skipped"}, exclude_unset=True)
                           for k, row in report.evaluate.results.items()},
            "plot_path": STITCH_PLOT if STITCH_PLOT in report.plots else None,
            "stitched": {"source": f"{source.model} up to layer {source.layer}",
                         "target": f"{target.model} from layer {target.layer}", "method": report.method},
        }
    engine = report.alignment.engine if report.alignment is not None else None
    evaluation = report.evaluation
    rows = None
    if report.kind == "merge" and evaluation is not None and evaluation.merged is not None:
        rows = _merge_rows(evaluation)  # an engine that builds the model gives its own rows (BuiltModel.card_rows)
    return {
        "inputs": list(report.models),
        "method": report.merge_method or engine or "",
        "engine": engine,
        "evaluation": rows,
        "plot_path": evaluation.plot if evaluation is not None else None,
    }


def write_report_card(out_dir: str | Path, report: Report, **kwargs: Any) -> Path:
    """README.md for a finished run, described by its Report (kwargs add or replace build_model_card's arguments)."""
    return write_model_card(out_dir, **{**report_card(report), **kwargs})


__all__ = [
    "METHOD_PAPERS",
    "STITCHING_PAPERS",
    "engine_title",
    "method_paper",
    "engine_papers",
    "read_license",
    "common_license",
    "build_model_card",
    "write_model_card",
    "report_card",
    "write_report_card",
]
