"""Trials per minute of `suture search` with 1 and 2 workers (a local Ray per run), on the example spec.

Prints one JSON object: the machine (CPUs, load average before each run) and, per worker count, trials,
wall seconds (Ray start included) and trials per minute. Run: python benchmarks/search_bench.py [--trials N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from suture.recipes.search import load_search_spec
from suture.recipes.search_run import run_search

SPEC = Path(__file__).resolve().parents[1] / "recipes" / "examples" / "search_tasks.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=8)
    args = parser.parse_args()
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
