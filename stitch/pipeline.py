"""Stitching two models end to end: fit a stitch between them, evaluate it, save the artifact.

`stitch_models` takes a validated stitch configuration (the recipe's ``stitch:`` section, whose schema lives
in :mod:`suture.recipes.stitch_section`): source and target (model, layer, pooling), method and options,
anchors, head, learned fine-tuning, evaluation and an optional cut-pair plan. A wrong setting raises
:class:`~suture.merge.errors.OptionError` whose ``field`` names the setting (e.g. ``("source", "layer")``),
so a caller can point at its own key.

The stitched model (A's prefix, the stitch, B's suffix or head) is written to ``<out>/stitched/``;
``<out>/report.json`` holds accuracy and macro F1 of source-only, target-only, naive absolute stitching,
the stitch and every compared method, CKA at the cut and the layer-similarity matrix; plots are
``similarity.png`` (CKA heatmap) and ``accuracy.png`` (accuracy by method).

Token anchors (two Hugging Face encoders with the same tokenizer) fit translators and the learned stitch on
every token state of the anchor texts: a d-wide space needs more than d anchors to pin down a map, and a
few dozen texts give thousands of tokens.

``procrustes`` and ``ortho_linear`` default here to ``scale="global"`` (one scale per side), which keeps
them exact for a rotated and rescaled copy of a space; pass ``options: {scale: feature}`` for the
per-feature standardisation of Maiorca et al.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from suture.merge.data import CalibrationData, load_dataset
from suture.merge.errors import InputError, OptionError
from suture.stitch.anchors import select_anchors
from suture.stitch.features import Chain, flatten_features, load_chain
from suture.stitch.heads import train_head
from suture.stitch.learned import finetune_stitch
from suture.stitch.planner import TRANSLATOR_METHODS, build_stitch, plan_stitch
from suture.stitch.relative import RelativeProjector
from suture.stitch.similarity import layer_similarity_matrix, linear_cka
from suture.stitch.stitched import RelativeStitch, StitchedModel, classification_scores, make_stitched, predict

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "PLAN_METHODS", "make_estimator", "stitch_models"]

METHODS = ("relative", "procrustes", "linear", "ortho_linear", "affine", "ot", "learned")
PLAN_METHODS = tuple(m for m in METHODS if m != "relative")  # cut-pair scoring fits translators or learned stitches
Progress = Callable[[str, int, int, str], None]


def _error(field: tuple, message: str) -> OptionError:
    return OptionError(field, message)


def _method_options(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    opts = dict(options)
    if method in ("procrustes", "ortho_linear"):
        opts.setdefault("scale", "global")
    return opts


def make_estimator(method: str, options: Mapping[str, Any]) -> Any:
    """The unfitted estimator of a stitch method (None for `learned`); wrong options raise TypeError or InputError."""
    opts = _method_options(method, options)
    if method == "relative":
        return RelativeProjector(**opts)
    if method == "learned":
        unknown = sorted(set(opts) - {"ridge"})
        if unknown:
            raise InputError(f"unknown options {unknown}; the learned stitch takes 'ridge'")
        return None
    return TRANSLATOR_METHODS[method](**opts)


# --------------------------------------------------------------------------------------------------
# helpers


def _load_data(spec: Any, split: str, max_items: int | None, tokenizer: Any, key: tuple) -> CalibrationData:
    try:
        data = load_dataset(spec, split=split, tokenizer=tokenizer, max_items=max_items)  # type: ignore[arg-type]
    except InputError as exc:
        raise _error(key, str(exc)) from None
    return data


def _tokenizer(*chains: Chain) -> Any:
    for c in chains:
        if c.kind == "hf" and c.hf.get("tokenizer") is not None:
            return c.hf["tokenizer"]
    return None


def _width(x: torch.Tensor) -> int:
    return int(x.shape[1])


def _short(ref: str) -> str:
    return Path(ref).name or ref


def _figure_similarity(matrix: list[list[float]], sl: list[int], tl: list[int], cut: tuple[int, int], path: Path, names: tuple[str, str]) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.2 + 0.6 * len(tl) + 1.5, 1.2 + 0.5 * len(sl) + 1.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    # first source layer on top, as in the app's similarity heatmap (rows read like a table)
    im = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(tl)), [str(j) for j in tl])
    ax.set_yticks(range(len(sl)), [str(i) for i in sl])
    ax.set_xlabel(f"target layer ({names[1]})")
    ax.set_ylabel(f"source layer ({names[0]})")
    for a, i in enumerate(sl):
        for b, j in enumerate(tl):
            ax.text(b, a, f"{matrix[a][b]:.2f}", ha="center", va="center", fontsize=7, color="w" if matrix[a][b] < 0.6 else "k")
    if cut[0] in sl and cut[1] in tl:
        from matplotlib.patches import Rectangle

        ax.add_patch(Rectangle((tl.index(cut[1]) - 0.5, sl.index(cut[0]) - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    fig.colorbar(im, ax=ax, label="linear CKA (higher = more similar)")
    ax.set_title("layer similarity")
    fig.savefig(path, dpi=110, format="png")
    return path


def _figure_accuracy(results: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [k for k, v in results.items() if v.get("accuracy") is not None]
    fig = Figure(figsize=(max(4.0, 1.0 + 0.9 * len(names)), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    accs = [results[k]["accuracy"] for k in names]
    bars = ax.bar(range(len(names)), accs, color=["#4c72b0" if "only" in k or k == "target_relative" else "#dd8452" if k == "naive_absolute" else "#55a868" for k in names])
    for b, a in zip(bars, accs):
        ax.text(b.get_x() + b.get_width() / 2, a + 0.01, f"{a:.3f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0.0, 1.08)
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy by method")
    fig.savefig(path, dpi=110, format="png")
    return path


# --------------------------------------------------------------------------------------------------
# the run


def stitch_models(
    cfg: Any,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    progress: Progress | None = None,
    trust_remote_code: bool = False,
    write_report: bool = True,
) -> dict[str, Any]:
    """Fit, evaluate and save a stitch: write <out>/stitched/, <out>/report.json and plots; return the report.

    The recipe runner passes ``write_report=False``: its artifact finisher writes report.json once, with the
    run's totals.

    `cfg` is a validated stitch configuration (:class:`suture.recipes.stitch_section.StitchSection` or an
    object with its fields). `trust_remote_code` lets the models' own files name architecture code outside
    Suture's zoo. Settings that do not fit the models or data raise OptionError naming the setting.
    """
    out = Path(out_dir)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def step(name: str, done: int, total: int, detail: str = "") -> None:
        if progress:
            progress(name, done, total, detail)

    # -- models and cut points (errors name the setting) -------------------------------------------
    step("load", 0, 2, cfg.source.model)
    chains = []
    for side, spec in (("source", cfg.source), ("target", cfg.target)):
        try:
            chains.append(load_chain(spec.model, pooling=spec.pooling, max_length=spec.max_length, trust_remote_code=trust_remote_code))
        except InputError as exc:
            raise _error((side, "model"), str(exc)) from None
    A, B = chains
    step("load", 2, 2, cfg.target.model)
    try:
        i = A.resolve_layer(cfg.source.layer, "layer")
    except InputError as exc:
        raise _error(("source", "layer"), str(exc)) from None
    try:
        j = B.resolve_layer(cfg.target.layer, "layer")
    except InputError as exc:
        raise _error(("target", "layer"), str(exc)) from None
    if i == 0 and A.kind != "hf":
        raise _error(("source", "layer"), "layer 0 is the raw input; cut after at least one layer")
    head_kind = cfg.head.kind
    if head_kind == "auto":
        head_kind = "model" if B.has_head else "logistic"
    if head_kind == "model" and not B.has_head:
        raise _error(("head", "kind"), "the target is an encoder without a classifier; use logistic or linear")
    if cfg.method == "learned" and head_kind != "model" and cfg.learned.epochs > 0:
        logger.info("learned stitch fine-tuned through a trained head (the target has no head of its own)")

    # -- data ---------------------------------------------------------------------------------------
    tok = _tokenizer(A, B)
    anchors_data = _load_data(cfg.anchors.data, cfg.anchors.split, cfg.anchors.max_items, tok, ("anchors", "data"))
    head_data = anchors_data
    if cfg.head.data is not None:
        head_data = _load_data(cfg.head.data, cfg.head.split, cfg.head.max_items, tok, ("head", "data"))
    eval_spec = cfg.evaluate.data if cfg.evaluate.data is not None else cfg.anchors.data
    eval_data = _load_data(eval_spec, cfg.evaluate.split, cfg.evaluate.max_items, tok, ("evaluate", "data"))
    if eval_data.labels is None:
        raise _error(("evaluate", "data"), "evaluation needs labelled data")
    if cfg.anchors.count > len(anchors_data):
        raise _error(("anchors", "count"), f"{cfg.anchors.count} anchors asked for, but the anchor data has only {len(anchors_data)} items")
    if cfg.anchors.tokens and not (A.kind == "hf" and B.kind == "hf"):
        raise _error(("anchors", "tokens"), "token anchors need two Hugging Face encoders")
    if cfg.anchors.selection == "stratified" and anchors_data.labels is None:
        raise _error(("anchors", "selection"), "stratified selection needs labelled anchor data")
    needs_labels = head_kind != "model" or cfg.method == "relative" or "relative" in cfg.evaluate.compare or cfg.learned.epochs > 0
    if needs_labels and head_data.labels is None:
        raise _error(("head", "data"), "training a head (or fine-tuning) needs labelled data")
    timings["load"] = time.perf_counter() - t0

    # -- features -------------------------------------------------------------------------------------
    t1 = time.perf_counter()
    bs = cfg.evaluate.batch_size
    step("features", 0, 3, "anchors")
    fa_anchor_all = A.features(anchors_data, i, batch_size=bs, device=device)[i]
    fb_anchor_all = B.features(anchors_data, j, batch_size=bs, device=device)[j]
    if fa_anchor_all.shape[0] != fb_anchor_all.shape[0]:
        raise _error(("anchors", "data"), f"anchors are not parallel: A gave {fa_anchor_all.shape[0]} rows, B {fb_anchor_all.shape[0]}")
    if head_data is anchors_data:
        fa_head, fb_head = fa_anchor_all, fb_anchor_all
    else:
        step("features", 1, 3, "head data")
        fa_head = A.features(head_data, i, batch_size=bs, device=device)[i]
        fb_head = B.features(head_data, j, batch_size=bs, device=device)[j]
    step("features", 2, 3, "evaluation data")
    all_a = sorted({i, *range(1, (A.num_layers if A.kind == "hf" else A.num_layers - 1) + 1)}) if cfg.evaluate.similarity else [i]
    all_b = sorted({j, *range(1, (B.num_layers if B.kind == "hf" else B.num_layers - 1) + 1)}) if cfg.evaluate.similarity else [j]
    ea = A.features(eval_data, all_a, batch_size=bs, device=device)
    eb = B.features(eval_data, all_b, batch_size=bs, device=device)
    step("features", 3, 3, "")
    timings["features"] = time.perf_counter() - t1

    # -- anchors ------------------------------------------------------------------------------------
    sel = cfg.anchors.selection
    idx = select_anchors(
        sel, cfg.anchors.count, features=flatten_features(fa_anchor_all) if sel in ("farthest", "kmeans") else None,
        labels=anchors_data.labels, n=len(anchors_data), seed=cfg.anchors.seed,
    )
    xa, xb = fa_anchor_all[idx], fb_anchor_all[idx]
    if cfg.anchors.tokens:
        # Every token of the chosen anchor texts is a parallel anchor (both encoders must tokenize alike);
        # relative representations keep the pooled anchors (thousands of anchors would be the vector).
        sub = anchors_data.subset(idx)
        ta = A.features(sub, i, batch_size=bs, device=device, tokens=True)[i]
        tb = B.features(sub, j, batch_size=bs, device=device, tokens=True)[j]
        if ta.shape[0] != tb.shape[0]:
            raise _error(("anchors", "tokens"), f"token anchors are not parallel: A's tokenizer gave {ta.shape[0]} tokens, B's {tb.shape[0]}")
        token_anchors = (ta, tb)
    else:
        token_anchors = None
    if cfg.method in ("procrustes", "ortho_linear") and _width(flatten_features(xa[:1])) != _width(flatten_features(xb[:1])):
        if not _method_options(cfg.method, cfg.options).get("allow_padding", True):
            raise _error(
                ("options", "allow_padding"),
                f"source layer {i} has width {xa.shape[1]} and target layer {j} width {xb.shape[1]}; "
                "zero-padding is needed but allow_padding is false",
            )

    # -- the target side: own suffix or a trained head ----------------------------------------------
    t2 = time.perf_counter()
    # One head setting for every trained head, so the baselines are read exactly like the stitch.
    head_wd: float | str = cfg.head.weight_decay if cfg.head.weight_decay == "auto" else float(cfg.head.weight_decay)
    head_choices: dict[str, float] = {}
    if head_kind == "model":
        suffix = B.suffix(j)
        head = None
    else:
        head = train_head(fb_head, head_data.labels, kind=head_kind, weight_decay=head_wd)
        suffix = head
        head_choices["target"] = head.weight_decay
    labels = eval_data.labels

    def score(fn: Callable[[Any], torch.Tensor], x: Any) -> dict[str, Any]:
        return classification_scores(predict(fn, x, batch_size=bs), labels)

    results: dict[str, dict[str, Any]] = {}
    # Source alone: A's own classifier, or a head of the same kind trained on A's features at the cut.
    if A.has_head:
        results["source_only"] = score(A.suffix(i), ea[i])
    else:
        source_head = train_head(fa_head, head_data.labels, kind="logistic" if head_kind == "model" else head_kind, weight_decay=head_wd)
        head_choices["source_only"] = source_head.weight_decay
        results["source_only"] = score(source_head, ea[i])
    results["target_only"] = score(suffix, eb[j])
    if tuple(ea[i].shape[1:]) == tuple(eb[j].shape[1:]):
        results["naive_absolute"] = score(suffix, ea[i])
    else:
        results["naive_absolute"] = {"accuracy": None, "f1_macro": None, "skipped": f"shapes differ: {tuple(ea[i].shape[1:])} vs {tuple(eb[j].shape[1:])}"}

    # -- stitches -----------------------------------------------------------------------------------
    methods = [cfg.method, *[m for m in cfg.evaluate.compare if m != cfg.method]]
    stitched: dict[str, StitchedModel] = {}
    info_base = {"source": cfg.source.model, "target": cfg.target.model, "source_layer": i, "target_layer": j, "anchors": cfg.anchors.count}
    for k, m in enumerate(methods):
        step("stitch", k, len(methods), m)
        opts = _method_options(m, cfg.options if m == cfg.method else {})
        info = {**info_base, "method": m, "options": opts}
        try:
            if m == "relative":
                proj_a = RelativeProjector(**opts).fit(flatten_features(xa))
                proj_b = RelativeProjector(**opts).fit(flatten_features(xb))
                rel_kind = head_kind if head_kind != "model" else "logistic"
                rel_head = train_head(proj_b.transform(flatten_features(fb_head)), head_data.labels, kind=rel_kind, weight_decay=head_wd)
                head_choices["relative"] = rel_head.weight_decay
                model = make_stitched(A, i, RelativeStitch(proj_a), target=B, target_layer=j, head=rel_head, info=info)
                results["target_relative"] = score(rel_head, proj_b.transform(flatten_features(eb[j])))
            else:
                st = build_stitch(m, *(token_anchors or (xa, xb)), opts)
                if m == "learned" and cfg.learned.epochs > 0:
                    info["finetune_loss"] = finetune_stitch(
                        st, fa_head, suffix, head_data.labels, epochs=cfg.learned.epochs, lr=cfg.learned.lr,
                        batch_size=cfg.learned.batch_size, seed=cfg.learned.seed, device=device,
                    )
                if head is not None:
                    model = make_stitched(A, i, st, target=B, target_layer=j, head=head, info=info)
                else:
                    model = make_stitched(A, i, st, target=B, target_layer=j, info=info)
        except InputError as exc:
            if m == cfg.method:
                raise _error(("method",), f"{m}: {exc}") from None
            results[m] = {"accuracy": None, "f1_macro": None, "skipped": str(exc)}
            continue
        model.eval()
        results[m] = score(lambda z, mm=model: mm.target(mm.stitch(z)), ea[i])
        stitched[m] = model
    results["stitch"] = dict(results[cfg.method])
    step("stitch", len(methods), len(methods), "")
    timings["stitch"] = time.perf_counter() - t2

    report: dict[str, Any] = {
        "method": cfg.method,
        "source": {"model": cfg.source.model, "layer": i, "num_layers": A.num_layers, "width": _width(flatten_features(ea[i][:1]))},
        "target": {"model": cfg.target.model, "layer": j, "num_layers": B.num_layers, "width": _width(flatten_features(eb[j][:1])), "head": head_kind},
        "heads": {"weight_decay": cfg.head.weight_decay, "chosen": head_choices},
        "anchors": {
            "count": cfg.anchors.count, "selection": sel, "seed": cfg.anchors.seed, "data": anchors_data.name,
            "token_anchors": None if token_anchors is None else int(token_anchors[0].shape[0]),
        },
        "evaluate": {"data": eval_data.name, "n": len(eval_data), "results": results},
        "similarity": {"metric": "linear CKA (biased), higher = more similar", "cka_at_cut": linear_cka(flatten_features(ea[i]), flatten_features(eb[j]))},
    }

    # -- similarity, plan, artifacts ----------------------------------------------------------------
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    if cfg.evaluate.similarity:
        mat = layer_similarity_matrix([flatten_features(ea[a]) for a in all_a], [flatten_features(eb[b]) for b in all_b], "cka")
        report["similarity"].update(source_layers=all_a, target_layers=all_b, matrix=mat.tolist())
        if cfg.evaluate.plot:
            plots.append(_figure_similarity(mat.tolist(), all_a, all_b, (i, j), out / "similarity.png", (_short(cfg.source.model), _short(cfg.target.model))).name)
    if cfg.plan is not None:
        step("plan", 0, 1, "")
        p = cfg.plan
        try:
            report["plan"] = plan_stitch(
                A, B, head_data, eval_data, pairs=p.pairs, source_layers=p.source_layers, target_layers=p.target_layers,
                method=p.method, batch_size=bs, device=device,
            )
        except InputError as exc:
            raise _error(("plan",), str(exc)) from None
        step("plan", 1, 1, "")
    if cfg.evaluate.plot:
        plots.append(_figure_accuracy(results, out / "accuracy.png").name)
    report["plots"] = plots
    if cfg.save:
        model = stitched[cfg.method]
        model.manifest["info"]["evaluate"] = results["stitch"]
        model.save(out / "stitched")
        report["artifact"] = "stitched"
    timings["total"] = time.perf_counter() - t0
    report["timings"] = {k: round(v, 3) for k, v in timings.items()}
    if write_report:
        from suture.merge.report import write_report as write_typed

        write_typed(out, report)  # the typed report.json every reader reads
    logger.info("stitch %s: %s", cfg.method, {k: v.get("accuracy") for k, v in results.items()})
    return report
