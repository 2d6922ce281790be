"""Merge search on Ray Tune: each trial merges a recipe in memory from the lazy stores and scores it.

Trials are Ray Tune trials; values are drawn by Optuna's samplers (TPE by default, CMA-ES as in
mergekit-evolve and Akiba et al. 2024, "Evolutionary Optimization of Model Merging Recipes") through
``ray.tune.search.optuna.OptunaSearch``. Without an address a local Ray starts with one CPU per worker; with
one, trials run on that cluster (models must resolve on every node: shared storage or Hub ids). A trial whose
worker dies is retried (``FailureConfig(max_failures)``); the experiment state lives under ``OUT/ray`` so an
interrupted search resumes (``Tuner.restore``). Results: ``trials.csv``/``trials.json``, ``objective.png`` and
``best_recipe.yaml``, a normal recipe that ``suture run`` reproduces (same tensors, same score).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from suture.merge.errors import RecipeError
from suture.recipes.schema import Recipe
from suture.recipes.search import EvaluateSpec, SearchSpec

logger = logging.getLogger(__name__)

EXPERIMENT = "search"
#: the settings a search started with (its trial count), read back on --resume
SETTINGS = "search_settings.json"
METRIC = "objective"
TrialHook = Callable[[dict[str, Any]], None]


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes: equal digests mean the same tensors."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def merge_recipe(r: Recipe, device: str = "cpu") -> tuple[dict[str, torch.Tensor], Any]:
    """A recipe's merged state dict in memory, computed as `suture run` computes it; plus its runnable architecture."""
    from suture.merge.derive import architecture_of
    from suture.merge.execute import execute_in_memory, resolve_device
    from suture.recipes import steps
    from suture.recipes.plan import build, open_models, per_model_tensors, reference_key, torch_dtype
    from suture.recipes.runner import _apply_blend, _data_statistics
    from suture.recipes.sections import parse_alignment

    alignment = parse_alignment(r.alignment, r.where)
    if r.stitch is not None or r.slices:
        raise RecipeError(f"{r.source}: search merges whole models; stitch and slices recipes are not searchable")
    if alignment is not None and "blend" in alignment.model_fields_set:
        r = _apply_blend(r, alignment.blend, alignment.reference)
    dev = resolve_device(device)
    models = open_models(r)
    try:
        architecture = steps.recipe_architecture(r.architecture, alignment)
        reference = reference_key(r)
        if alignment is not None:
            from suture.recipes.schema import ModelRef

            ref = str(ModelRef.parse(alignment.reference)) if alignment.reference else reference
            outcome = steps.run_alignment(alignment, models.stores, ref, architecture, dev)
            if not hasattr(outcome, "stores"):
                raise RecipeError(f"{r.source}: alignment engine {alignment.engine!r} builds its own model; search needs a merge recipe")
            models.stores = outcome.stores
            architecture = architecture or outcome.architecture
        tasks, _, _ = build(r, models)
        seed = r.seed or 0
        if per_model_tensors(r, models):
            raise RecipeError(f"{r.source}: the models keep tensors of their own (per-task heads); search needs one merged model")
        # data-driven methods (RegMean, Fisher, AdaMerging...): each trial measures its models on their data, as `suture run`
        stats, _ = _data_statistics(r, tasks, models, architecture, dev, seed, r.trust_remote_code, None)
        state = execute_in_memory(tasks, models.stores, torch_dtype(r.out_dtype or r.dtype), device=dev,
                                  compute_dtype=torch_dtype(r.dtype), seed=seed, stats=stats)
        arch = architecture_of(models.stores[reference], chosen=architecture) or architecture
    finally:
        for store in models.stores.values():
            store.close()
    if arch is None:
        raise RecipeError(f"{r.source}: search needs a runnable architecture (`architecture:`, a zoo model or a Hugging Face folder)")
    return state, arch


def score_state(state: dict[str, torch.Tensor], arch: Any, section: EvaluateSpec, split: str) -> dict[str, Any]:
    """Per-task loss/accuracy on `split` and their weighted mean of the chosen metric (`objective`)."""
    from suture.merge.data import load_dataset
    from suture.merge.evaluate import evaluate
    from suture.merge.zoo import load_into

    module = arch.build()
    load_into(module, state, source="merged state")
    module.eval()
    out: dict[str, Any] = {}
    total = weights = 0.0
    for name, task in zip(section.task_names(), section.tasks):
        data = load_dataset(task.data, split=split, max_items=section.max_items)
        row = evaluate(module, data, batch_size=section.batch_size)
        out[name] = row
        total += float(task.weight) * row[section.metric]
        weights += float(task.weight)
    out["objective"] = total / weights
    return out


def evaluate_recipe(spec: SearchSpec, r: Recipe) -> dict[str, Any]:
    """Merge in memory and score on the validation split (and the held-out split, reported only)."""
    state, arch = merge_recipe(r)
    val = score_state(state, arch, spec.evaluate, spec.evaluate.split)
    result: dict[str, Any] = {METRIC: val.pop("objective"), "digest": state_digest(state)}
    for name, row in val.items():
        for k, v in row.items():
            result[f"val/{name}/{k}"] = v
    if spec.evaluate.heldout_split:
        held = score_state(state, arch, spec.evaluate, spec.evaluate.heldout_split)
        result["heldout"] = held.pop("objective")
        for name, row in held.items():
            for k, v in row.items():
                result[f"heldout/{name}/{k}"] = v
    return result


def _trainable(spec: SearchSpec, hook: TrialHook | None) -> Callable[[dict[str, Any]], None]:
    def trial(config: dict[str, Any]) -> None:
        from ray import tune

        torch.set_num_threads(1)  # one CPU per trial: Ray packs trials, torch must not oversubscribe
        if hook is not None:
            hook(config)
        result = evaluate_recipe(spec, spec.trial_recipe(config))
        tune.report(result)

    return trial


def _space(spec: SearchSpec) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {}
    for dim in spec.space:
        for name in dim.names():
            if dim.choices is not None:
                space[name] = tune.choice(dim.choices)
            elif dim.int:
                space[name] = tune.lograndint(int(dim.low), int(dim.high) + 1) if dim.log else tune.randint(int(dim.low), int(dim.high) + 1)
            else:
                space[name] = tune.loguniform(dim.low, dim.high) if dim.log else tune.uniform(dim.low, dim.high)
    return space


def _searcher(spec: SearchSpec, resume: bool) -> Any:
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    s = spec.search
    sampler = {"tpe": lambda: optuna.samplers.TPESampler(seed=s.seed),
               "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=s.seed, warn_independent_sampling=False),
               "random": lambda: optuna.samplers.RandomSampler(seed=s.seed)}[s.sampler]()
    start = spec.start_config() if s.start_from_recipe and not resume else None
    return OptunaSearch(metric=METRIC, mode=spec.evaluate.mode, sampler=sampler, points_to_evaluate=[start] if start else None)


def _memory(value: int | str | None) -> int | None:
    if value is None:
        return None
    from suture.merge.writer import parse_size

    return parse_size(value)


@dataclass
class SearchResult:
    """Where a search wrote its results, its trials and the best one."""

    out_dir: Path
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    finished: bool

    def summary(self) -> str:
        """A few lines for the terminal."""
        done = [t for t in self.trials if t.get(METRIC) is not None]
        lines = [f"{len(done)} trials finished ({len(self.trials)} in all); results in {self.out_dir}"]
        if self.best:
            held = f", held-out {self.best['heldout']:.4f}" if self.best.get("heldout") is not None else ""
            lines.append(f"best: trial {self.best['trial']} objective {self.best[METRIC]:.4f}{held} -> best_recipe.yaml")
        if not self.finished:
            lines.append("the search stopped before all trials ran; continue it with --resume")
        return "\n".join(lines)


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Refuse at once a HOST:PORT (or ray://HOST:PORT) where nothing listens: Ray would retry for minutes."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise RecipeError(f"--address {address!r}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError, OverflowError) as exc:
        raise RecipeError(f"--address {address}: cannot reach a Ray cluster there ({getattr(exc, 'strerror', None) or exc}); "
                          "start one with `ray start --head` or leave --address out to run Ray here") from exc


def start_ray(address: str | None, workers: int) -> bool:
    """Connect to `address`, or start a local Ray with `workers` CPUs; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        _check_reachable(address)
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    return True


def run_search(
    spec: SearchSpec,
    out_dir: str | Path,
    *,
    address: str | None = None,
    trials: int | None = None,
    workers: int = 1,
    resume: bool = False,
    verbose: int = 1,
    trial_hook: TrialHook | None = None,
) -> SearchResult:
    """Run (or resume) a search and write trials.csv/json, objective.png and best_recipe.yaml under `out_dir`.

    `trial_hook(config)` runs at the start of every trial inside the worker (tests use it to kill a worker).
    """
    import ray
    from ray import tune

    out = Path(out_dir).expanduser().resolve()
    storage = out / "ray"
    experiment = storage / EXPERIMENT
    if experiment.exists() and not resume:
        raise RecipeError(f"{out}: already holds a search; pass --resume to continue it or choose another folder")
    if resume and not experiment.exists():
        raise RecipeError(f"{out}: no search to resume (no {experiment})")
    wanted = _resumed_trials(out, trials) if resume else trials or spec.search.trials
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        (out / SETTINGS).write_text(json.dumps({"trials": wanted}) + "\n")
    started = start_ray(address, workers)
    try:
        trainable = _trainable(spec, trial_hook)
        memory = _memory(spec.search.memory_per_trial)
        trainable = tune.with_resources(trainable, {"cpu": 1, **({"memory": memory} if memory else {})})
        if resume:
            if not tune.Tuner.can_restore(str(experiment)):
                raise RecipeError(f"{experiment}: the experiment state cannot be restored")
            tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_errored=True, resume_unfinished=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=_space(spec),
                tune_config=tune.TuneConfig(search_alg=_searcher(spec, resume), num_samples=wanted,
                                            max_concurrent_trials=workers),
                run_config=tune.RunConfig(storage_path=str(storage), name=EXPERIMENT, verbose=verbose,
                                          failure_config=tune.FailureConfig(max_failures=spec.search.max_failures)),
            )
        grid = tuner.fit()
        rows = _rows(grid, spec)
    finally:
        if started:
            ray.shutdown()
    result = _write_outputs(spec, out, rows, finished=sum(r.get(METRIC) is not None for r in rows) >= wanted or resume and _all_done(rows))
    return result


def trial_results(out_dir: str | Path) -> list[dict[str, Any]]:
    """Trials read from Tune's result files while a search runs (``OUT/ray/search/<trial>/result.json``), in
    creation order: its values (``config``) and, once it finished, its ``objective`` and held-out score."""
    rows = []
    for folder in (Path(out_dir) / "ray" / EXPERIMENT).glob("*/"):
        if not folder.name.startswith("trial"):
            continue
        try:
            lines = (folder / "result.json").read_text(encoding="utf-8").strip().splitlines()
            last = json.loads(lines[-1]) if lines else {}
        except (OSError, ValueError):
            last = {}
        rows.append({"_order": _trial_order(str(folder)), **(last.get("config") or {}),
                     **{k: last[k] for k in (METRIC, "heldout") if k in last}})
    rows.sort(key=lambda r: r.pop("_order"))
    for i, row in enumerate(rows):
        row["trial"] = i
    return rows


def saved_trials(out_dir: str | Path) -> int:
    """The trial count the search in `out_dir` started with (from ``search_settings.json``)."""
    from suture.merge.store import read_json

    settings = Path(out_dir) / SETTINGS
    saved = read_json(settings).get("trials") if settings.exists() else None
    if not isinstance(saved, int) or isinstance(saved, bool) or saved < 1:
        raise RecipeError(f"{settings}: missing or without a trial count; this search cannot be resumed")
    return saved


def _resumed_trials(out: Path, trials: int | None) -> int:
    """The trial count a search started with; Ray Tune restores that count, so a different --trials is refused."""
    saved = saved_trials(out)
    if trials is not None and trials != saved:
        raise RecipeError(f"{out}: --trials {trials} cannot change a search on --resume: it was started with "
                          f"{saved} trials (Ray Tune restores that count); leave --trials out or start a new search")
    return saved


def _all_done(rows: list[dict[str, Any]]) -> bool:
    return all(r["status"] in ("TERMINATED", "ERROR") for r in rows)


def _rows(grid: Any, spec: SearchSpec) -> list[dict[str, Any]]:
    """One row per trial in creation order: its values, scores, status and digest."""
    names = spec.param_names()
    rows = []
    for res in grid:
        m = dict(res.metrics or {})
        config = res.config or {}
        rows.append({"trial_id": m.get("trial_id"),
                     "status": "ERROR" if res.error else ("TERMINATED" if METRIC in m else "PENDING"),
                     **{n: config.get(n) for n in names},
                     **{k: v for k, v in m.items() if k == METRIC or k == "heldout" or k == "digest" or k.startswith(("val/", "heldout/"))},
                     "_order": _trial_order(res.path)})
    rows.sort(key=lambda r: r.pop("_order"))
    for i, row in enumerate(rows):
        row["trial"] = i
    return rows


def _trial_order(path: str | None) -> int:
    """Tune names trial folders `trial_<id>_<counter>_...`: the counter is the creation order."""
    if not path:
        return 1 << 30
    parts = Path(path).name.split("_")
    for part in parts[2:]:
        if part.isdigit():
            return int(part)
    return 1 << 30


def _write_outputs(spec: SearchSpec, out: Path, rows: list[dict[str, Any]], finished: bool) -> SearchResult:
    done = [r for r in rows if r.get(METRIC) is not None]
    best = None
    if done:
        pick = max if spec.evaluate.mode == "max" else min
        best = pick(done, key=lambda r: r[METRIC])
        (out / "best_recipe.yaml").write_text(export_recipe(spec, {n: best[n] for n in spec.param_names()}).to_yaml())
    columns = ["trial", "status", *spec.param_names(), METRIC, "heldout"]
    columns += sorted({k for r in rows for k in r} - set(columns) - {"digest", "trial_id"}) + ["digest"]
    with (out / "trials.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    summary = {"metric": spec.evaluate.metric, "mode": spec.evaluate.mode, "split": spec.evaluate.split,
               "heldout_split": spec.evaluate.heldout_split, "finished": finished, "best": best, "trials": rows}
    (out / "trials.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if done:
        _plot(done, spec, out / "objective.png")
    return SearchResult(out, rows, best, finished)


def export_recipe(spec: SearchSpec, config: dict[str, Any]) -> Recipe:
    """A trial as a normal recipe; without its own `evaluate:` it gets one on the first task's validation data,
    so `suture run` reports the merged model's score there (the search recorded the same number)."""
    from suture.recipes.schema import parse_recipe

    r = spec.trial_recipe(config)
    if r.evaluate is not None:
        return r
    task = spec.evaluate.tasks[0]
    data = r.to_dict()
    data["evaluate"] = {"data": task.data, "split": spec.evaluate.split, "points": 3, "plot": False,
                        "batch_size": spec.evaluate.batch_size, **({"max_items": spec.evaluate.max_items} if spec.evaluate.max_items else {})}
    return parse_recipe(data, source=r.source)


def _plot(done: list[dict[str, Any]], spec: SearchSpec, path: Path) -> None:
    """Objective per trial (dots), the running best (line) and the held-out score (crosses)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["trial"] for r in done]
    ys = [r[METRIC] for r in done]
    pick = max if spec.evaluate.mode == "max" else min
    running = [pick(ys[: i + 1]) for i in range(len(ys))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.scatter(xs, ys, s=18, label=f"{spec.evaluate.metric} ({spec.evaluate.split})")
    ax.plot(xs, running, color="C1", label="best so far")
    held = [(r["trial"], r["heldout"]) for r in done if r.get("heldout") is not None]
    if held:
        ax.scatter(*zip(*held), marker="x", s=18, color="C2", label=f"held-out ({spec.evaluate.heldout_split})")
    ax.set_xlabel("trial")
    ax.set_ylabel(spec.evaluate.metric)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
