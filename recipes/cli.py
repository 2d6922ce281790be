"""The `suture` command line: run recipes, inspect models, publish results, start the app.

Start-up imports only argparse: torch and friends load inside the command that needs them, so
`suture --help` answers instantly. This is the only module that prints; library code logs.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence

EPILOG = "Run `suture COMMAND --help` for a command's options. Docs: README.md."


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a merge/alignment/stitch recipe (YAML; mergekit recipes accepted)")
    p.add_argument("recipe", help="path to the recipe YAML")
    p.add_argument("out_dir", help="output folder (written atomically)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where tensors are computed (default: auto)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (tensors, sources, method, parameters) without computing")
    p.add_argument("--out-shard-size", default=None, help="largest output shard, e.g. 5GB (default) or 500MB")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--allow-pickle", action="store_true", help="load .bin/.pt checkpoints (weights_only=True); refused by default")
    p.add_argument("--strict", action="store_true", help="treat non-finite (NaN/Inf) input or output values as errors instead of warnings")
    p.add_argument("--seed", type=int, default=None, help="seed for randomized methods and alignment (overrides the recipe)")
    _add_trust(p)
    _add_verbosity(p)


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="list a model's tensors, size, detected family and permutation groups")
    p.add_argument("model", help="a .safetensors file, a model folder, or a Hub id")
    p.add_argument("--allow-pickle", action="store_true", help="load .bin/.pt checkpoints (weights_only=True)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--groups", action="store_true", help="also derive and list permutation groups")
    p.add_argument("--input-shape", type=_shape, default=None, metavar="N,C,H,W",
                   help="input shape to trace a runnable model with for --groups, e.g. 1,3,32,32 (default: from its first layer)")
    _add_trust(p)
    _add_verbosity(p)


def _shape(text: str) -> list[int]:
    """`1,3,32,32` -> [1, 3, 32, 32] (argparse reports a bad value as a one-line usage error)."""
    try:
        dims = [int(d) for d in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated positive integers, e.g. 1,3,32,32") from None
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated positive integers, e.g. 1,3,32,32")
    return dims


def _add_push(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="publish an output folder to the Hugging Face Hub (token from HF_TOKEN or `hf auth login`)")
    p.add_argument("out_dir", help="a folder written by `suture run`")
    p.add_argument("repo_id", help="Hub repository, e.g. your-name/merged-model")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--revision", default=None, help="branch to push to (created when missing)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    p.add_argument("--commit-message", default=None, help="commit message")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait for any answer from the Hub before giving up (default: SUTURE_PUSH_TIMEOUT or 60)")
    _add_verbosity(p)


def _add_app(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("app", help="start the Streamlit workbench on 127.0.0.1")
    p.add_argument("--port", type=int, default=8501, help="port to serve on (default 8501)")
    p.add_argument("--workspace", default=None, help="folder the app may read and write (default ./suture-workspace)")
    _add_verbosity(p)


def _add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="search recipe values (weights, densities, method, ...) with Ray Tune and Optuna")
    p.add_argument("spec", help="search spec YAML: a base recipe, the space to search and the objective")
    p.add_argument("out_dir", help="results folder: trials.csv/json, objective.png, best_recipe.yaml, ray/ (state)")
    p.add_argument("--address", default=None, help="an existing Ray cluster (e.g. 10.0.0.1:6379 or auto); default: start Ray here")
    p.add_argument("--trials", type=int, default=None, help="number of trials (default: the spec's search.trials)")
    p.add_argument("--workers", type=int, default=1, help="trials run at once (and CPUs of the local Ray; default 1)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search in out_dir")
    _add_verbosity(p)


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="merge the same fine-tunes with many methods and score each per task: a side-by-side table")
    p.add_argument("spec", help="compare spec YAML: base, tasks (fine-tune + data each), rows (method, parameters, grid)")
    p.add_argument("out_dir", help="results folder: report.json, table.md, plot.png (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _add_verbosity(p)


def _add_trust(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", action="store_true",
                   help="build architectures that a model's config.json names outside Suture's zoo (runs that code)")


def _add_verbosity(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("-v", "--verbose", action="store_true", help="log details")
    g.add_argument("-q", "--quiet", action="store_true", help="only errors, no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="suture", description="Merge and stitch neural networks: align, merge, stitch, evaluate, publish.", epilog=EPILOG)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run(sub)
    _add_inspect(sub)
    _add_push(sub)
    _add_app(sub)
    _add_search(sub)
    _add_compare(sub)
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if getattr(args, "verbose", False) else logging.ERROR if getattr(args, "quiet", False) else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    from suture.merge.redact import install_log_redaction  # tokens never reach a log line, even at -v

    install_log_redaction()


def _sigterm_as_interrupt() -> None:
    # SIGTERM (e.g. `kill`) unwinds like Ctrl-C, so the atomic output folder removes its partial data
    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def cmd_run(args: argparse.Namespace) -> int:
    """`suture run`: execute a recipe with a tqdm progress bar."""
    from pathlib import Path

    from suture.recipes.runner import RunOptions, dry_run, run_recipe

    options = RunOptions(
        device=args.device,
        out_shard_size=args.out_shard_size,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        strict=args.strict,
        seed=args.seed,
        trust_remote_code=args.trust_remote_code,
    )
    recipe = Path(args.recipe)  # always a file: never read the argument itself as YAML text
    if args.dry_run:
        plan = dry_run(recipe, options)
        print(json.dumps(plan, indent=2))
        return 0
    bars: dict = {}
    try:
        result = run_recipe(recipe, args.out_dir, options, progress=_tqdm_progress(bars, args.quiet))
    finally:
        for bar in bars.values():
            bar.close()
    print(result.summary())
    return 0


def _tqdm_progress(bars: dict, quiet: bool):
    """A ``progress(stage, done, total, detail)`` callback drawing one tqdm bar per stage (none with --quiet)."""
    from tqdm import tqdm

    def progress(stage: str, done: int, total: int, detail: str = "") -> None:
        if quiet:
            return
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="step" if stage != "merge" else "tensor", leave=True)
        bar.total = total
        bar.n = done
        bar.set_postfix_str(detail[-40:], refresh=True)

    return progress


def cmd_compare(args: argparse.Namespace) -> int:
    """`suture compare`: every row of a compare spec merged and scored per task; report.json, table.md, plot.png."""
    from suture.recipes.compare import load_compare_spec, run_compare

    spec = load_compare_spec(args.spec)  # validated before any model loads: a bad key is one line
    bars: dict = {}
    try:
        result = run_compare(spec, args.out_dir, overwrite=args.overwrite, progress=_tqdm_progress(bars, args.quiet))
    finally:
        for bar in bars.values():
            bar.close()
    print(result.summary())
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """`suture inspect`: describe a model without loading its weights."""
    from suture.recipes.inspect import inspect_model, format_inspection

    info = inspect_model(args.model, allow_pickle=args.allow_pickle, groups=args.groups, input_shape=args.input_shape,
                         trust_remote_code=args.trust_remote_code)
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """`suture push`: upload an output folder to the Hub with a progress bar."""
    from tqdm import tqdm

    from suture.merge.hub import push_folder

    with tqdm(total=100, desc="push", unit="%", disable=args.quiet) as bar:

        def progress(fraction: float, message: str) -> None:
            bar.n = int(fraction * 100)
            bar.set_postfix_str(message[-40:], refresh=True)

        url = push_folder(args.out_dir, args.repo_id, private=args.private, revision=args.revision,
                          create_pr=args.create_pr, commit_message=args.commit_message, progress=progress,
                          timeout=args.timeout)
    print(f"published: {url}")
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    """`suture app`: run the Streamlit workbench (only on the loopback interface)."""
    import subprocess
    from pathlib import Path

    entry = Path(__file__).resolve().parents[1] / "app" / "main.py"
    cmd = [sys.executable, "-m", "streamlit", "run", str(entry), "--server.address", "127.0.0.1",
           "--server.port", str(args.port), "--browser.gatherUsageStats", "false",
           "--client.toolbarMode", "minimal", "--server.fileWatcherType", "none"]
    if args.workspace:
        cmd += ["--", "--workspace", args.workspace]
    print(f"Suture workbench: http://127.0.0.1:{args.port}")
    return subprocess.call(cmd)


def cmd_search(args: argparse.Namespace) -> int:
    """`suture search`: Ray Tune trials; Tune's progress table unless --quiet. 130 when stopped early."""
    from suture.recipes.search import load_search_spec
    from suture.recipes.search_run import run_search

    if args.workers < 1 or (args.trials is not None and args.trials < 1):
        raise SystemExit("error: --workers and --trials must be at least 1")
    spec = load_search_spec(args.spec)
    result = run_search(spec, args.out_dir, address=args.address, trials=args.trials, workers=args.workers,
                        resume=args.resume, verbose=0 if args.quiet else 2 if args.verbose else 1)
    print(result.summary())
    return 0 if result.finished else 130


COMMANDS = {"run": cmd_run, "inspect": cmd_inspect, "push": cmd_push, "app": cmd_app, "search": cmd_search, "compare": cmd_compare}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `suture` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from suture.merge import __version__

        print(f"suture {__version__}")
        return 0
    if not args.command:
        parser.print_help()
        return 0
    _setup_logging(args)
    _sigterm_as_interrupt()
    from suture.merge.errors import SutureError

    try:
        return COMMANDS[args.command](args)
    except SutureError as exc:
        from suture.merge.redact import redact

        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
