"""Merge search benchmarks: trials per minute of `suture search`, and search vs hand-set methods at equal budget.

Default: trials per minute with 1 and 2 workers (a local Ray per run) on the example spec; prints one JSON
object with the machine (CPUs, load average before each run) and, per worker count, trials, wall seconds (Ray
start included) and trials per minute. Run: python benchmarks/search_bench.py [--trials N]

``--multitask [--budget B]``: on the multi-task benchmark (`benchmarks/multitask.py` must have run once: its
fine-tunes and compare spec are cached), B evaluations each way. Hand-set: the B settings a user tries by hand
(task arithmetic λ 0.3/0.5/1.0 and the usual TIES, DARE, DELLA, breadcrumbs, WUDI settings, in that order),
the best on validation kept. Search: B Ray Tune trials drawn by Optuna's TPE over method, λ and density, the best
on validation kept. Both are then scored on test (never used to choose), each task with its own head.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from suture.recipes.search import load_search_spec
from suture.recipes.search_run import run_search

SPEC = Path(__file__).resolve().parents[1] / "recipes" / "searches" / "tasks.yaml"

#: what a user tries by hand, in order (the first B are spent): the methods' usual settings
HAND_SET = [
    {"method": "task_arithmetic", "parameters": {"lambda": 0.3}},
    {"method": "task_arithmetic", "parameters": {"lambda": 0.5}},
    {"method": "task_arithmetic", "parameters": {"lambda": 1.0}},
    {"method": "ties", "parameters": {"density": 0.2}},
    {"method": "dare_ties", "parameters": {"density": 0.5}},
    {"method": "della", "parameters": {"density": 0.5, "epsilon": 0.15}},
    {"method": "breadcrumbs", "parameters": {"density": 0.9, "gamma": 0.01, "lambda": 0.5}},
    {"method": "wudi", "parameters": {}},
]
SEARCH_METHODS = ["task_arithmetic", "ties", "dare_ties", "della"]
_SCORER: dict[str, object] = {}  # one RowScorer per Ray worker process (loading the encoder and tasks once)


def _row_scorer(spec_path: str):
    from suture.recipes.compare import RowScorer

    if spec_path not in _SCORER:
        _SCORER[spec_path] = RowScorer(spec_path)
    return _SCORER[spec_path]


def _search_trial(config: dict) -> None:
    import torch
    from ray import tune

    torch.set_num_threads(1)  # one CPU per trial, as suture search's trials
    row = {"method": config["method"], "parameters": {"lambda": config["lambda"], "density": config["density"]}}
    scores = _row_scorer(config["spec"]).score(row)
    tune.report({"validation": scores["validation"]["average"], "test": scores["test"]["average"]})


def multitask(budget: int) -> dict:
    """Hand-set vs searched (Ray Tune + Optuna TPE) merges of the multi-task fine-tunes, B evaluations each."""
    import optuna
    import ray
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from suture.merge.refs import cache_dir

    spec_path = cache_dir() / "multitask" / "compare.yaml"
    if not spec_path.is_file():
        raise SystemExit(f"{spec_path} is missing: run python benchmarks/multitask.py once (it fine-tunes and writes it)")
    import torch

    torch.set_num_threads(1)  # as the trials (and as compare's evaluation.threads: one is faster on a shared CPU)
    t0 = time.perf_counter()
    hand = []
    for row in HAND_SET[:budget]:
        scores = _row_scorer(str(spec_path)).score(row)
        hand.append({**row, "validation": scores["validation"]["average"], "test": scores["test"]["average"]})
    hand_s = time.perf_counter() - t0
    _SCORER.clear()  # each Ray worker loads its own (the trial function must not carry this process's model)
    t0 = time.perf_counter()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        space = {"spec": str(spec_path), "method": tune.choice(SEARCH_METHODS), "lambda": tune.uniform(0.2, 1.5),
                 "density": tune.uniform(0.1, 1.0)}
        with tempfile.TemporaryDirectory() as tmp:
            tuner = tune.Tuner(_search_trial, param_space=space,
                               tune_config=tune.TuneConfig(search_alg=OptunaSearch(metric="validation", mode="max",
                                                                                   sampler=optuna.samplers.TPESampler(seed=0)),
                                                           num_samples=budget, max_concurrent_trials=1),
                               run_config=tune.RunConfig(storage_path=tmp, name="multitask", verbose=0))
            with contextlib.redirect_stdout(sys.stderr):  # Tune's tables go to stderr: stdout is the JSON
                grid = tuner.fit()
            searched = [{"method": r.config["method"], "parameters": {"lambda": round(r.config["lambda"], 4),
                                                                       "density": round(r.config["density"], 4)},
                         "validation": r.metrics.get("validation"), "test": r.metrics.get("test")}
                        for r in grid if r.metrics and r.metrics.get("validation") is not None]
    finally:
        ray.shutdown()
    search_s = time.perf_counter() - t0
    best_hand = max(hand, key=lambda r: r["validation"])
    best_search = max(searched, key=lambda r: r["validation"])
    return {"spec": str(spec_path), "budget": budget,
            "hand_set": {"rows": hand, "best": best_hand, "seconds": round(hand_s, 1)},
            "search": {"sampler": "optuna tpe (ray tune)", "space": {"method": SEARCH_METHODS, "lambda": [0.2, 1.5], "density": [0.1, 1.0]},
                       "rows": searched, "best": best_search, "seconds": round(search_s, 1)},
            "search_minus_hand_test": round(best_search["test"] - best_hand["test"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--multitask", action="store_true", help="search vs hand-set methods on the multi-task benchmark")
    parser.add_argument("--budget", type=int, default=8, help="evaluations each way with --multitask (at most 8 hand-set)")
    args = parser.parse_args()
    if args.multitask:
        load = os.getloadavg()[0]
        result = multitask(min(args.budget, len(HAND_SET)))
        print(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average_before": round(load, 2)},
                          **result}, indent=2))
        return
    spec = load_search_spec(SPEC)
    runs = []
    for workers in (1, 2):
        load = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            result = run_search(spec, Path(tmp) / "out", trials=args.trials, workers=workers, verbose=0)
            seconds = time.perf_counter() - t0
        done = sum(r.get("objective") is not None for r in result.trials)
        runs.append({"workers": workers, "trials": done, "seconds": round(seconds, 1),
                     "trials_per_minute": round(60 * done / seconds, 2), "load_average_before": round(load, 2)})
    print(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
                      "spec": str(SPEC.name), "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
