"""Counts of the fuzz suites in `tests/robustness/` (hostile inputs through the CLI, in-process); prints JSON.

Each suite builds its cases in a temporary folder and runs every one with `run_cli_case`: the JSON gives,
per suite and in total, cases tried, clean errors, tracebacks, hangs, silent wrong results (exit 0 on input
that must be refused) and output folders left behind. The floor is 0 for all but the first two.
Suites: `store` (malformed safetensors files and sharded indexes, each through `suture inspect` and a
linear merge) and, when present, `recipe` (mutated recipes, `tests/robustness/recipe_cases.py`).

    python benchmarks/robustness.py [--workdir DIR] [--timeout 10] [--suites store recipe]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's code and its tests package, not an installed copy

# suite name -> (module, function returning list[Case] for a work folder)
SUITES = {
    "store": ("tests.robustness.store_cases", "store_cases"),
    "recipe": ("tests.robustness.recipe_cases", "recipe_cases"),
}


def load_suite(name: str) -> Callable[[Path], list] | None:
    """The suite's case generator, or None when its module is not in this checkout."""
    module_name, function = SUITES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name != module_name:  # the module exists but is broken: say so instead of hiding it
            raise
        return None
    return getattr(module, function)


def run_suite(make_cases: Callable[[Path], list], workdir: Path, timeout: float) -> dict:
    """Build and run one suite's cases; its tally plus timing and the ids of any case that was not clean."""
    from tests.robustness.harness import run_cli_case, tally

    start = time.perf_counter()
    cases = make_cases(workdir)
    built = time.perf_counter()
    outcomes = [run_cli_case(case, timeout=timeout) for case in cases]
    return {
        **tally(outcomes),
        "not_clean": [o.case_id for o in outcomes if not o.clean][:20],
        "build_s": round(built - start, 2),
        "run_s": round(time.perf_counter() - built, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where cases are built (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds before a case counts as a hang")
    parser.add_argument("--suites", nargs="+", default=list(SUITES), choices=list(SUITES))
    args = parser.parse_args()
    report: dict = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "processor": platform.processor() or platform.machine()},
        "suites": {},
    }
    with tempfile.TemporaryDirectory(prefix="suture-robustness-") as tmp:
        base = args.workdir or Path(tmp)
        for name in args.suites:
            make_cases = load_suite(name)
            if make_cases is None:
                report["suites"][name] = {"skipped": f"{SUITES[name][0]} is not in this checkout"}
                continue
            workdir = base / name
            workdir.mkdir(parents=True, exist_ok=True)
            report["suites"][name] = run_suite(make_cases, workdir, args.timeout)
    ran = [s for s in report["suites"].values() if "cases" in s]
    keys = ("cases", "clean_errors", "tracebacks", "hangs", "silent_wrong", "outputs_left")
    report["total"] = {k: sum(s[k] for s in ran) for k in keys}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
