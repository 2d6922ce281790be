"""Recipe runner: a validated recipe becomes a plan of tensor tasks, executed into a complete output folder.

Order of work: validate the recipe (no tensor read), resolve model references, open lazy stores, check
names and shapes across models, build the plan, stream it through the writer inside an atomic folder, then
add config and tokenizer; the artifact finisher (recipes/artifacts.py) then writes report.json, the recipe as
run and the model card, and publishes the finished folder when the recipe asks. Progress goes to a callback
``progress(stage, done, total, detail)`` (tqdm in the CLI, st.progress in the app).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from suture.merge import __version__
from suture.merge.align.engines import BuiltModel
from suture.merge.errors import InputError, OptionError, RecipeError, SutureError
from suture.merge.execute import execute_plan, infer_output, resolve_device
from suture.merge.report import NON_FINITE_LISTED, read_report
from suture.merge.writer import DEFAULT_SHARD_SIZE, ShardedWriter, atomic_output_dir, parse_size
from suture.recipes import steps
from suture.recipes.artifacts import finish, publish_output
from suture.recipes.plan import OpenedModels, Progress, build, open_models, per_model_tensors, reference_key, torch_dtype
from suture.recipes.sections import parse_alignment, parse_evaluate, parse_publish
from suture.recipes.schema import ModelRef, Recipe, load_recipe, parse_recipe

logger = logging.getLogger(__name__)

CONFIG_FILES = ("config.json", "generation_config.json")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass
class RunOptions:
    """Command-line overrides of recipe settings."""

    device: str = "auto"
    out_shard_size: int | str | None = None
    overwrite: bool = False
    allow_pickle: bool = False
    strict: bool = False
    seed: int | None = None
    trust_remote_code: bool = False  # run architecture code that a model's config.json names outside the zoo


@dataclass
class RunResult:
    """What a run produced: the output folder, its files and the report."""

    out_dir: Path
    files: list[str]
    report: dict[str, Any] = field(default_factory=dict)
    url: str | None = None  # set when the recipe's publish section pushed the result

    def summary(self) -> str:
        """A few lines for the terminal, read from the report.json the run wrote."""
        r = read_report(self.out_dir)
        if r.kind == "stitch":
            head = (f"stitched {r.source.model} (layer {r.source.layer}) into {r.target.model} "
                    f"(layer {r.target.layer}) with {r.method} in {r.seconds_total or 0:.1f} s")
            lines = [head, f"output: {self.out_dir}"] + [f"  {name}" for name in sorted(self.files)]
            lines.append(f"evaluation on {r.evaluate.data} ({r.evaluate.n} items):")
            for label, row in r.evaluate.results.items():
                lines.append(f"  {label:<28} " + (f"accuracy {row.accuracy:.4f}" if row.accuracy is not None else f"skipped: {row.skipped}"))
            return "\n".join(lines)
        if r.merge_method:
            head = (f"merged {r.tensors or 0} tensors with {r.merge_method} "
                    f"({(r.bytes_written or 0) / 1e6:,.1f} MB) in {r.seconds_total or 0:.1f} s on {r.device}")
        else:
            head = f"{r.alignment.engine if r.alignment else 'built'}: {len(r.models)} models in {r.seconds_total or 0:.1f} s on {r.device}"
        lines = [head, f"output: {self.out_dir}"]
        lines += [f"  {name}" for name in sorted(self.files)]
        problem = r.non_finite_problem()
        if problem:
            lines.append(f"warning: {problem}")
        evaluation = r.evaluation
        if evaluation:
            lm = evaluation.language_model
            lm_text = f", {lm['kind']} LM per token" if lm and lm.get("kind") else ""
            lines.append(f"evaluation on {evaluation.data} ({evaluation.split}, {evaluation.items} items{lm_text}):")
            rows = list(evaluation.models.items()) + [(label, m) for label, m in (("merged", evaluation.merged), ("ensemble", evaluation.ensemble)) if m]
            for label, m in rows + list(evaluation.baselines.items()):
                ppl = f"  perplexity {m.perplexity:.2f} ({m.tokens} tokens)" if m.perplexity is not None else ""
                lines.append(f"  {label:<28} accuracy {m.accuracy:.4f}  loss {m.loss:.4f}{ppl}")
            for row in evaluation.stop_sweep:
                lines.append(f"  {'zip up to ' + str(row['stop_at']):<28} accuracy {row['accuracy']:.4f}")
            for label, b in evaluation.barriers.items():
                mid = evaluation.midpoint_accuracy.get(label)
                mid_text = f", midpoint accuracy {mid:.4f}" if mid is not None else ""
                if b.loss is not None:
                    lines.append(f"  {label + ' path':<28} loss barrier {b.loss:.4f}{mid_text}")
                elif b.loss_midpoint is not None:  # a built model (a zip): its loss minus the inputs' mean loss
                    lines.append(f"  {label:<28} loss barrier {b.loss_midpoint:.4f} (vs the inputs' mean loss)")
        if self.url:
            lines.append(f"published: {self.url}")
        return "\n".join(lines)




def load(recipe: str | Path | Mapping[str, Any] | Recipe) -> Recipe:
    """A validated Recipe from a path, YAML text, a dict or a Recipe (errors name key and line)."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return parse_recipe(dict(recipe))
    return load_recipe(recipe)


def _output_config(config: dict | None, recipe: Recipe, n_layers: int | None, vocab: Any, out_dtype: torch.dtype | None, config_model: str) -> dict | None:
    if config is None:
        return None
    config = dict(config)
    if recipe.slices and n_layers is not None:
        for key in LAYER_COUNT_KEYS:
            if key in config:
                config[key] = n_layers
    if vocab is not None:
        from suture.merge.tokenizer import updated_config

        config = updated_config(config, vocab, config_model=config_model)
    if out_dtype is not None and "torch_dtype" in config:
        config["torch_dtype"] = str(out_dtype).removeprefix("torch.")
    return config


def dry_run(recipe: str | Path | Mapping[str, Any] | Recipe, options: RunOptions | None = None) -> dict[str, Any]:
    """The plan as JSON-friendly data, without computing any tensor."""
    options = options or RunOptions()
    r = load(recipe)
    models = open_models(r, allow_pickle=options.allow_pickle, strict=options.strict)
    tasks, n_layers, vocab = build(r, models)
    out_dtype = torch_dtype(r.out_dtype or r.dtype)
    for task in tasks:
        entry = infer_output(task, models.stores, out_dtype)
        task.out_shape, task.out_dtype = entry.shape, entry.dtype
    return {
        "merge_method": r.merge_method,
        "models": {k: str(p) for k, p in models.paths.items()},
        "layers": n_layers,
        "vocabulary": len(vocab.tokens) if vocab is not None else None,
        "tensors": [t.describe() for t in tasks],
    }


def _trusts(r: Recipe, options: RunOptions) -> bool:
    """Whether models' own files may name architecture code outside the zoo (--trust-remote-code or the recipe)."""
    return options.trust_remote_code or r.trust_remote_code


def _shard_size(option: int | str | None, recipe_value: int | None) -> int:
    """--out-shard-size, else the recipe's out_shard_size, else the default; 0 or below is refused."""
    chosen = next((v for v in (option, recipe_value) if v is not None), DEFAULT_SHARD_SIZE)
    size = parse_size(chosen)
    if size <= 0:
        raise RecipeError(f"out_shard_size {chosen!r}: must be a positive size such as 5GB or 500MB")
    return size


def _apply_blend(r: Recipe, blend: float, reference: str | None) -> Recipe:
    """alignment.blend: the reference's weight in a two-model linear merge (the other gets 1 - blend)."""
    if r.merge_method != "linear" or not r.models or len(r.models) != 2:
        raise r.error(("alignment", "blend"), "blend sets the weights of a two-model linear merge; use merge_method: linear with two models")
    ref = str(ModelRef.parse(reference)) if reference else reference_key(r)
    data = r.to_dict()
    for entry in data["models"]:
        weight = blend if str(ModelRef.parse(entry["model"])) == ref else 1.0 - blend
        entry["parameters"] = {**(entry.get("parameters") or {}), "weight": weight}
    return parse_recipe(data, source=r.source)


# Core errors name the setting at fault in their own terms (SutureError.field); these live at the recipe's top
# level, every other one is an `alignment:` setting of the same name.
_TOP_LEVEL_FIELDS = {"architecture"}


def _recipe_key(field: tuple) -> tuple:
    return field if field[0] in _TOP_LEVEL_FIELDS else ("alignment", *field)


def run_recipe(
    recipe: str | Path | Mapping[str, Any] | Recipe,
    out_dir: str | Path,
    options: RunOptions | None = None,
    *,
    progress: Progress | None = None,
) -> RunResult:
    """Run a recipe end to end and return where the output went (a core error names its recipe key and line)."""
    r = load(recipe)
    try:
        return _run_recipe(r, out_dir, options, progress=progress)
    except SutureError as exc:
        if not exc.field or isinstance(exc, RecipeError) or r.stitch is not None:
            raise
        message, kind = (exc.message, InputError) if isinstance(exc, OptionError) else (str(exc), type(exc))
        raise kind(f"{r.where(_recipe_key(exc.field))}: {message}") from None


def _run_recipe(recipe: Recipe, out_dir: str | Path, options: RunOptions | None, *, progress: Progress | None) -> RunResult:
    started = time.perf_counter()
    options = options or RunOptions()
    r = load(recipe)
    if r.stitch is not None:
        return _run_stitch(r, out_dir, options, started, progress)
    alignment = parse_alignment(r.alignment, r.where)
    evaluation_section = parse_evaluate(r.evaluate, r.where)
    publish_section = parse_publish(r.publish, r.where)
    if alignment is not None and "blend" in alignment.model_fields_set:  # an engine option that sets the merge's weights
        r = _apply_blend(r, alignment.blend, alignment.reference)
    device = resolve_device(options.device)
    shard_size = _shard_size(options.out_shard_size, r.out_shard_size)
    seed = options.seed if options.seed is not None else (r.seed or 0)
    models = open_models(r, allow_pickle=options.allow_pickle, strict=options.strict, progress=progress)
    if alignment is not None or evaluation_section is not None:  # these build modules from the models' configs
        steps.check_trust(models.stores, steps.recipe_architecture(r.architecture, alignment), _trusts(r, options))
    reference = reference_key(r)
    raw_stores = dict(models.stores)
    architecture = steps.recipe_architecture(r.architecture, alignment)
    outcome = None
    if alignment is not None:
        align_ref = str(ModelRef.parse(alignment.reference)) if alignment.reference else reference
        outcome = steps.run_alignment(alignment, models.stores, align_ref, architecture, device, progress,
                                      fallback_data=evaluation_section.data if evaluation_section else None,
                                      trust_remote_code=_trusts(r, options))
        if isinstance(outcome, BuiltModel):
            return _run_built(r, outcome, evaluation_section, publish_section, models, out_dir, options, device, started, progress)
        models.stores = outcome.stores
        architecture = architecture or outcome.architecture
    tasks, n_layers, vocab = build(r, models)
    out_dtype = torch_dtype(r.out_dtype or r.dtype)
    entries = [infer_output(t, models.stores, out_dtype) for t in tasks]
    model_stats, data_report = _data_statistics(r, tasks, models, architecture, device, seed, _trusts(r, options), progress)
    branches = per_model_tensors(r, models)
    if branches:  # per-task heads: the merged trunk and each model's own head, as one multi-head model
        return _run_heads(r, tasks, models, model_stats, data_report, branches, architecture, evaluation_section,
                          publish_section, out_dir, options, device, seed, started)

    def merge_progress(done: int, total: int, name: str) -> None:
        if progress:
            progress("merge", done, total, name)

    with atomic_output_dir(out_dir, overwrite=options.overwrite) as tmp:
        writer = ShardedWriter(tmp, entries, max_shard_size=shard_size, metadata={"format": "pt", "suture_version": __version__, "merge_method": r.merge_method or ""},
                              strict=options.strict)
        try:
            stats = execute_plan(tasks, models.stores, writer, device=device, compute_dtype=torch_dtype(r.dtype), seed=seed,
                                 progress=merge_progress, stats=model_stats)
            shards = writer.finish()
        finally:
            writer.abort()
            for store in models.stores.values():
                store.close()
        files = list(shards) + (["model.safetensors.index.json"] if len(shards) > 1 else [])
        files += _write_side_files(tmp, r, models, reference, n_layers, vocab, out_dtype)
        if data_report and data_report.get("statistics") == "coefficients":
            from suture.recipes.coefficient_stage import write_learned_recipe

            files += write_learned_recipe(tmp, data_report)
        library = _library_name(models.stores[reference].config)
        extra: dict[str, Any] = {"data": data_report} if data_report else {}
        if outcome is not None:
            extra["alignment"] = {"engine": alignment.engine, **outcome.report()}
            if alignment.repair != "none":
                keys = [s.model for s in tasks[0].sources] if tasks else []
                t = steps.interpolation_weight(tasks[0].model_params if tasks else [], keys, outcome.reference)
                extra["alignment"]["postprocess"] = steps.repair_output(tmp, alignment, outcome, t)
        if evaluation_section is not None:
            ref_key = outcome.reference if outcome is not None else reference
            extra["evaluation"] = steps.evaluate_output(
                tmp, evaluation_section, models.stores, raw_stores, ref_key, architecture, outcome is not None,
                reset_bn=alignment is not None and alignment.repair == "reset_bn", progress=progress,
                fused=outcome is not None and outcome.fused,
                permutation_spec=outcome.spec if outcome is not None and outcome.kind == "transported" else None,
                trust_remote_code=_trusts(r, options))
            if "plot" in extra["evaluation"]:
                files.append(extra["evaluation"]["plot"])
        report = {
            "suture_version": __version__,
            "merge_method": r.merge_method,
            "models": [str(ref) for ref in r.referenced_models()],
            "device": stats.device,
            "tensors": stats.tensors,
            "bytes_written": stats.bytes_written,
            "shards": len(shards),
            "layers": n_layers,
            "seconds_reading": round(stats.seconds_reading, 3),
            "seconds_merging": round(stats.seconds_merging, 3),
            "seconds_writing": round(stats.seconds_writing, 3),
            "seed": seed,
            "non_finite": {"tensors": writer.non_finite[:NON_FINITE_LISTED], "count": len(writer.non_finite)},
            **extra,
            "seconds_total": round(time.perf_counter() - started, 3),  # after evaluation, which can dominate
        }
        typed, written = finish(tmp, r, report, library_name=library)
        files += written
    out = Path(out_dir).expanduser().resolve()
    logger.info("merged %d tensors into %s", stats.tensors, out)
    return RunResult(out, files, typed.to_json(), url=publish_output(out, publish_section, progress))


def _data_statistics(r: Recipe, tasks: list, models: OpenedModels, architecture: Any, device: torch.device, seed: int,
                     trust_remote_code: bool, progress: Progress | None) -> tuple[dict | None, dict[str, Any] | None]:
    """Data-driven methods: each model's statistics on its own data, and what report.json records about them."""
    from suture.merge.methods import get_method

    method = get_method(r.merge_method or "")
    if method.needs_data is None:
        return None, None
    if method.needs_data == "coefficients":  # AdaMerging / aTLAS: weights learned on every model's data at once
        from suture.recipes.coefficient_stage import learn_recipe_coefficients

        return learn_recipe_coefficients(r, method, tasks, models, architecture, device, seed=seed,
                                         trust_remote_code=trust_remote_code, progress=progress)
    from suture.recipes.calibration import data_options, model_statistics

    started = time.perf_counter()
    stats = model_statistics(r, method, tasks, models.stores, architecture, device, seed=seed,
                             trust_remote_code=trust_remote_code, progress=progress)
    opts = data_options(r)
    specs = {str(e.model): e.data for e in r.models or [] if str(e.model) in stats}
    report = {"statistics": method.needs_data, "sequential": method.sequential, "split": opts.split,
              "max_items": opts.max_items, "models": {k: v if isinstance(v, str) else dict(v) for k, v in specs.items()},
              "seconds": round(time.perf_counter() - started, 3)}
    if method.needs_data == "fisher":
        report["labels"] = opts.labels
    return stats, report


def _run_heads(r: Recipe, tasks: list, models: OpenedModels, stats: Any, data_report: Any, branches: dict, architecture: Any,
               evaluation_section: Any, publish_section: Any, out_dir, options: RunOptions, device: torch.device, seed: int,
               started: float) -> RunResult:
    """Data-driven merges whose models keep tensors of their own: a multi-head folder, its report and card."""
    from suture.merge.evaluate import evaluate
    from suture.recipes.heads import write_per_model_heads

    with atomic_output_dir(out_dir, overwrite=options.overwrite) as tmp:
        module, heads = write_per_model_heads(tmp, r, tasks, models.stores, branches, stats, architecture, device,
                                              out_dtype=torch_dtype(r.out_dtype or r.dtype), compute_dtype=torch_dtype(r.dtype),
                                              seed=seed, trust_remote_code=_trusts(r, options))
        report: dict[str, Any] = {"suture_version": __version__, "merge_method": r.merge_method, "device": str(device), "seed": seed,
                                  "models": [str(ref) for ref in r.referenced_models()], "tensors": len(tasks),
                                  "data": data_report, "heads": heads}
        if evaluation_section is not None:  # the members' logits side by side: joint accuracy over every task's classes
            data = steps.load_data(evaluation_section.data, split=evaluation_section.split, max_items=evaluation_section.max_items)
            report["evaluation"] = {"data": evaluation_section.data if isinstance(evaluation_section.data, str) else dict(evaluation_section.data),
                                    "split": evaluation_section.split, "items": len(data), "models": {},
                                    "merged": evaluate(module.cpu(), data, batch_size=evaluation_section.batch_size)}
        report["seconds_total"] = round(time.perf_counter() - started, 3)
        typed, _ = finish(tmp, r, report)
        files = sorted(p.name for p in tmp.iterdir())
    for store in models.stores.values():
        store.close()
    out = Path(out_dir).expanduser().resolve()
    return RunResult(out, files, typed.to_json(), url=publish_output(out, publish_section, None))


def _run_stitch(r: Recipe, out_dir, options: RunOptions, started: float, progress: Progress | None) -> RunResult:
    """Stitch recipes: A's prefix + a fitted stitch + B's suffix (or head), written as an artifact with report and card."""
    from suture.recipes.stitch_section import run_stitch, validate_stitch_section

    if r.models or r.slices or r.merge_method:
        raise r.error(("stitch",), "a stitch recipe names its models in the stitch section; drop merge_method/models/slices")
    section = validate_stitch_section(r.stitch, where=r.where)
    publish_section = parse_publish(r.publish, r.where)
    device = resolve_device(options.device)
    with atomic_output_dir(out_dir, overwrite=options.overwrite) as tmp:
        report = run_stitch(section, tmp, device=str(device), progress=progress, where=r.where, trust_remote_code=_trusts(r, options),
                            write_report=False)  # finish() writes report.json once, with the totals
        report["seconds_total"] = round(time.perf_counter() - started, 3)
        typed, _ = finish(tmp, r, report)
        files = sorted(p.name for p in tmp.iterdir())
    out = Path(out_dir).expanduser().resolve()
    return RunResult(out, files, typed.to_json(), url=publish_output(out, publish_section, progress))


def _run_built(r: Recipe, built: BuiltModel, evaluation_section, publish_section, models: OpenedModels, out_dir,
               options: RunOptions, device: torch.device, started: float, progress: Progress | None) -> RunResult:
    """Engines that build the output model themselves (ZipIt!): their weights (or a multi-head model), report, card."""
    with atomic_output_dir(out_dir, overwrite=options.overwrite) as tmp:
        built.save(tmp)
        evaluation = None
        if evaluation_section is not None and built.evaluate is not None:
            evaluation = built.evaluate(tmp, evaluation_section, progress)
        report = {"suture_version": __version__, "merge_method": None, "models": list(models.refs), "device": str(device),
                  "alignment": dict(built.summary), **({"evaluation": evaluation} if evaluation else {}),
                  "seconds_total": round(time.perf_counter() - started, 3)}
        typed, _ = finish(tmp, r, report, card_rows=built.card_rows)
        files = sorted(p.name for p in tmp.iterdir())
    for store in models.stores.values():
        store.close()
    out = Path(out_dir).expanduser().resolve()
    return RunResult(out, files, typed.to_json(), url=publish_output(out, publish_section, progress))


def _write_side_files(tmp: Path, r: Recipe, models: OpenedModels, reference: str, n_layers: int | None, vocab: Any, out_dtype: torch.dtype | None) -> list[str]:
    """config.json (updated), generation config and tokenizer files (the finisher adds the recipe as run)."""
    written = []
    ref_folder = models.folder(reference)
    config = _output_config(models.stores[reference].config, r, n_layers, vocab, out_dtype, reference)
    if config is not None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        written.append("config.json")
    if (ref_folder / "generation_config.json").is_file():
        shutil.copyfile(ref_folder / "generation_config.json", tmp / "generation_config.json")
        written.append("generation_config.json")
    from suture.merge.tokenizer import copy_tokenizer_files, write_tokenizer_files

    if vocab is not None:
        written += write_tokenizer_files(vocab, {k: models.folder(k) for k in models.refs}, tmp)
    else:
        written += copy_tokenizer_files(ref_folder, tmp)
    if r.chat_template:
        from suture.merge.tokenizer import apply_chat_template

        apply_chat_template(r.chat_template, {k: models.folder(k) for k in models.refs}, tmp)
        if "tokenizer_config.json" not in written:
            written.append("tokenizer_config.json")
    return written


def _library_name(config: Mapping[str, Any] | None) -> str | None:
    """The card's library_name: transformers for a transformers config, none for a zoo/recipe architecture."""
    config = config or {}
    return "transformers" if config.get("architectures") and "suture_architecture" not in config else None
