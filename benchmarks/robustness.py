"""Counts of the fuzz suites in `tests/robustness/` (hostile inputs through the CLI, in-process); prints JSON.

Each suite builds its cases in a temporary folder and runs every one with `run_cli_case`: the JSON gives,
per suite and in total, cases tried, clean errors, tracebacks, hangs, silent wrong results (exit 0 on input
that must be refused) and output folders left behind. The floor is 0 for all but the first two.
Suites: `store` (malformed safetensors files and sharded indexes, each through `suture inspect` and a
linear merge), `recipe` (mutated recipes, run offline with the case folder importable, so that a missing
trust check would really run the planted module: `code_executions` counts its marker file), `tokens`
(a canary token through `-v` pushes, planted files and a server that never answers: leaks, hangs) and
`processes` (SIGKILL at seeded random moments and two concurrent writers on real `suture run`s: outputs
lost, non-identical re-runs).

    python benchmarks/robustness.py [--workdir DIR] [--timeout 10] [--suites store recipe tokens processes]
"""

from __future__ import annotations

import argparse
import contextlib
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

# suite name -> (module, function): case suites return list[Case] for a work folder, count suites a dict
SUITES = {
    "store": ("tests.robustness.store_cases", "store_cases"),
    "recipe": ("tests.robustness.recipe_cases", "recipe_cases"),
    "tokens": ("tests.robustness.token_cases", "token_canary_counts"),
    "processes": ("tests.robustness.process_cases", "kill_and_concurrency_counts"),
}
COUNT_SUITES = {"tokens", "processes"}


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


@contextlib.contextmanager
def hostile_environment(workdir: Path):
    """Offline Hub, and the case folder first on sys.path: a planted module is importable if anything tries."""
    saved_offline, saved_cwd = os.environ.get("HF_HUB_OFFLINE"), Path.cwd()
    os.environ["HF_HUB_OFFLINE"] = "1"
    sys.path.insert(0, str(workdir))
    os.chdir(workdir)
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        sys.path.remove(str(workdir))
        if saved_offline is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_offline


def run_suite(make_cases: Callable[[Path], list], workdir: Path, timeout: float) -> dict:
    """Build and run one suite's cases; its tally plus timing and the ids of any case that was not clean."""
    from tests.robustness.harness import run_cli_case, tally

    start = time.perf_counter()
    with hostile_environment(workdir):
        cases = make_cases(workdir)
        built = time.perf_counter()
        outcomes = [run_cli_case(case, timeout=timeout) for case in cases]
    markers = sum(1 for _ in workdir.rglob("MARKER"))  # written only if code named by model metadata ran
    return {
        **tally(outcomes),
        "code_executions": markers,
        "not_clean": [o.case_id for o in outcomes if not o.clean][:20],
        "build_s": round(built - start, 2),
        "run_s": round(time.perf_counter() - built, 2),
    }


def run_counts(count: Callable[[Path], dict], workdir: Path) -> dict:
    """A suite that judges its own cases (real processes, a stand-in Hub): its counts plus timing."""
    start = time.perf_counter()
    counts = count(workdir)
    return {**counts, "run_s": round(time.perf_counter() - start, 2)}


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
            if name in COUNT_SUITES:
                report["suites"][name] = run_counts(make_cases, workdir)
            else:
                report["suites"][name] = run_suite(make_cases, workdir, args.timeout)
    ran = [s for n, s in report["suites"].items() if "cases" in s and n not in COUNT_SUITES]
    keys = ("cases", "clean_errors", "tracebacks", "hangs", "silent_wrong", "outputs_left", "code_executions")
    report["total"] = {k: sum(s[k] for s in ran) for k in keys}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
