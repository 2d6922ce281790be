"""Background jobs: a recipe run (merge, alignment, zip, stitch, evaluation) or a push in its own worker process.

The page never computes: it writes a job record under ``<workspace>/jobs/<id>/`` and starts
``python -m suture.app.jobs <job folder>`` in a new session (its own process group), so Cancel can kill the
whole group and the job outlives page switches and browser reloads. A ``search`` job runs ``suture search``'s
:func:`suture.recipes.search_run.run_search` in the worker with a local Ray whose processes (GCS, raylet, trial
workers) stay in the worker's process group, so the same Cancel stops them all. A ``stitch`` job runs a recipe
whose only section is ``stitch:`` (the runner's own stitch path), and a ``publish`` job pushes a finished output
folder to the Hub with :func:`suture.merge.hub.push_folder`; its token reaches the worker through the worker's
environment only (``HF_TOKEN``), never through a file of the job. Files of a job folder:

* ``job.json`` -- written by the app at start: kind, label, recipe, output folder, device, pid, started;
* ``progress.json`` -- replaced atomically by the worker at each progress report (stage, done, total);
* ``outcome.json`` -- the end: ``finished`` (a push adds its ``url``), ``failed`` (with the reason) or ``cancelled``. It is created
  with an exclusive link, so the first writer wins and a job is never both finished and cancelled;
* ``log.txt`` -- the worker's stderr (shown when it dies without an outcome, e.g. killed for memory).

Cancel sends SIGTERM to the group (the worker unwinds like Ctrl-C and the atomic output folder removes its
temporary data), then SIGKILL after a grace period and :func:`suture.merge.writer.recover_output` for what a
killed writer left. The message is true: a run whose output folder was completed by this job counts as
finished even when Cancel arrived at that moment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

JOBS = "jobs"
JOB_FILE = "job.json"
PROGRESS_FILE = "progress.json"
OUTCOME_FILE = "outcome.json"
LOG_FILE = "log.txt"
# Seconds slept at each progress report ("0.3"), or only in one stage ("evaluate:1"): read only by tests' slow jobs
STEP_DELAY_ENV = "SUTURE_TEST_JOB_STEP_DELAY"
GRACE_S = 5.0
RUNNING, FINISHED, FAILED, CANCELLED = "running", "finished", "failed", "cancelled"
RUN, STITCH, SEARCH, PUBLISH = "run", "stitch", "search", "publish"  # job kinds
TOKEN_ENV = "HF_TOKEN"  # how a push job's worker gets its token: its environment, never a file
ROOT = Path(__file__).resolve().parents[1]  # the checkout whose `suture` package the worker imports
_PROGRESS_EVERY_S = 0.2


SEARCH_SETTINGS = ("spec", "trials", "workers", "address", "resume")


@dataclass
class Job:
    """A job as read from its folder: what it runs, where it stands, and how it ended."""

    folder: Path
    id: str
    kind: str
    label: str
    out_dir: str
    started: float
    pid: int | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    state: str = RUNNING
    stage: str = ""
    done: int = 0
    total: int = 0
    detail: str = ""
    finished: float | None = None
    error: str | None = None
    cached: bool = False
    # a search job's settings: spec, trials, workers, address, resume
    settings: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)  # what a finished job hands back beyond its folder (a push's url)

    @property
    def progress(self) -> float:
        """Fraction of the current stage done (1.0 once finished)."""
        if self.state == FINISHED:
            return 1.0
        return min(max(self.done / self.total, 0.0), 1.0) if self.total else 0.0

    @property
    def elapsed(self) -> float:
        """Seconds from start to the end (or to now while running)."""
        return (self.finished or time.time()) - self.started

    @property
    def active(self) -> bool:
        return self.state == RUNNING

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["folder"] = str(self.folder)
        return out


# ---------------------------------------------------------------------------------------------- files


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Replace a JSON file atomically (a reader never sees half of it)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, default=str)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _claim_outcome(folder: Path, state: str, error: str | None = None, result: Mapping[str, Any] | None = None) -> bool:
    """Record how the job ended unless an outcome is already there (first writer wins); True if this one won."""
    fd, tmp = tempfile.mkstemp(prefix=".outcome.", dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({"state": state, "error": error, "finished": time.time(), "result": dict(result or {})}, fh)
    try:
        os.link(tmp, folder / OUTCOME_FILE)  # fails when it exists: atomic on POSIX file systems
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def _completed_by(job: Job) -> bool:
    """Whether this job's output folder holds a finished report written after the job started."""
    if job.kind == PUBLISH:  # a push writes nothing locally: only its worker knows whether it got through
        return False
    report = Path(job.out_dir) / ("trials.json" if job.kind == "search" else "report.json")
    try:
        return report.stat().st_mtime >= job.started - 1.0
    except OSError:
        return False


def _alive(pid: int | None) -> bool:
    """Whether the process runs (a zombie, exited but not yet reaped, counts as gone)."""
    if not pid:
        return False
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def sentence(message: str) -> str:
    """An error as a sentence: no `<dict>:`/`<string>:` source prefix, a capital first letter, a full stop."""
    text = message.strip()
    for source in ("<dict>", "<string>"):
        if text.startswith(source):
            rest = text[len(source):]
            text = ("Recipe" + rest) if rest.startswith(" line") else ("Recipe key " + rest.removeprefix(": ")) if rest.startswith(": ") else rest.lstrip(": ")
    if text and text[0].islower():
        text = text[0].upper() + text[1:]
    return text if not text or text.endswith((".", "!", "?", ")")) or "\n" in text else text + "."


# ---------------------------------------------------------------------------------------------- the app's side


class JobStore:
    """The jobs of one workspace (``<workspace>/jobs``)."""

    def __init__(self, workspace_root: str | Path) -> None:
        self.root = Path(workspace_root) / JOBS
        self.root.mkdir(parents=True, exist_ok=True)

    def start(self, recipe: Mapping[str, Any], out_dir: str | Path, *, label: str, device: str = "auto",
              overwrite: bool = False, trust_remote_code: bool = False, kind: str = RUN) -> Job:
        """Write the job record and start its worker in a new process group; returns the running job.

        `kind` is ``run`` (merge, alignment, zip) or ``stitch`` (a recipe holding a `stitch:` section): the worker
        runs both through the recipe runner; the kind tells the app which page shows the result."""
        return self._launch({"kind": kind, "label": label, "out_dir": str(out_dir), "recipe": dict(recipe), "device": device,
                             "overwrite": overwrite, "trust_remote_code": trust_remote_code})

    def start_search(self, spec_path: str | Path, out_dir: str | Path, *, label: str, trials: int | None, workers: int,
                     address: str | None = None, resume: bool = False) -> Job:
        """Start a merge search (``suture search SPEC OUT --trials N --workers K [--address A] [--resume]``) as a job.

        Without `address` the worker starts a local Ray; with `resume` it continues the search in `out_dir` to the
        trial count it started with (`trials` is then ignored)."""
        return self._launch({"kind": "search", "label": label, "out_dir": str(out_dir), "spec": str(spec_path),
                             "trials": None if resume else int(trials or 0) or None, "workers": int(workers),
                             "address": address or None, "resume": bool(resume)})

    def pause(self, job_id: str) -> Job:
        """Stop a running search so it can be resumed: SIGINT to the worker alone, as Ctrl-C on ``suture search``.

        Ray Tune saves the experiment state and the worker writes the trials so far; the job then ends as
        finished with an unfinished search (``trials.json``'s ``finished`` is false) that Resume continues."""
        job = self.get(job_id)
        if job.active and job.kind == "search" and job.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(job.pid, signal.SIGINT)
        return self.get(job_id)

    def start_publish(self, out_dir: str | Path, repo_id: str, *, private: bool, token: str | None, label: str) -> Job:
        """Push a finished output folder to the Hub as a job; the token goes to the worker's environment only."""
        env = {k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, "HUGGING_FACE_HUB_TOKEN")}
        if token:
            env[TOKEN_ENV] = token
        return self._launch({"kind": PUBLISH, "label": label, "out_dir": str(out_dir), "repo_id": repo_id,
                             "private": bool(private)}, env=env)

    def _launch(self, fields: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Job:
        job_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
        folder = self.root / job_id
        folder.mkdir()
        record = {"id": job_id, **fields, "started": time.time()}
        _write_json(folder / JOB_FILE, record)
        with (folder / LOG_FILE).open("ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "suture.app.jobs", str(folder)], cwd=ROOT, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=dict(env) if env is not None else None)
        # reap it when it ends, so a finished worker leaves no zombie behind in the server process
        threading.Thread(target=proc.wait, daemon=True, name=f"reap-{job_id}").start()
        _write_json(folder / JOB_FILE, {**record, "pid": proc.pid})
        logger.info("started %s job %s (pid %d): %s", record["kind"], job_id, proc.pid, record["label"])
        return self.get(job_id)

    def record_reused(self, recipe: Mapping[str, Any], out_dir: str | Path, *, label: str, kind: str = RUN) -> Job:
        """A job that reused a finished output folder (listed like any other, finished at once)."""
        job_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
        folder = self.root / job_id
        folder.mkdir()
        _write_json(folder / JOB_FILE, {"id": job_id, "kind": kind, "label": label, "out_dir": str(out_dir),
                                        "started": time.time(), "recipe": dict(recipe), "cached": True})
        _claim_outcome(folder, FINISHED)
        return self.get(job_id)

    def get(self, job_id: str) -> Job:
        """A job as it stands now, read from its folder."""
        folder = self.root / job_id
        record = _read_json(folder / JOB_FILE)
        if not record:
            from suture.merge.errors import InputError

            raise InputError(f"job {job_id}: no such job in {self.root}")
        job = Job(folder=folder, id=record["id"], kind=record.get("kind", "run"), label=record.get("label", ""),
                  out_dir=record.get("out_dir", ""), started=float(record.get("started", 0.0)), pid=record.get("pid"),
                  recipe=record.get("recipe") or {}, cached=bool(record.get("cached")),
                  settings={k: record[k] for k in SEARCH_SETTINGS if k in record})
        progress = _read_json(folder / PROGRESS_FILE)
        job.stage, job.done, job.total, job.detail = (progress.get("stage", ""), int(progress.get("done", 0)),
                                                      int(progress.get("total", 0)), progress.get("detail", ""))
        outcome = _read_json(folder / OUTCOME_FILE)
        if outcome:
            job.state, job.error, job.finished = outcome["state"], outcome.get("error"), outcome.get("finished")
            job.result = outcome.get("result") or {}
        elif not _alive(job.pid) and record.get("pid") is not None:
            # the worker is gone without saying how it ended (killed for memory, a crash): a failure, with its log
            _claim_outcome(folder, FAILED, self._died_reason(folder))
            return self.get(job_id)
        return job

    @staticmethod
    def _died_reason(folder: Path) -> str:
        try:
            tail = (folder / LOG_FILE).read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        except OSError:
            tail = []
        return "The worker stopped without a result" + (f": {' '.join(tail)}" if tail else " (no message; it may have run out of memory).")

    def list(self) -> list[Job]:
        """Every job of the workspace, newest first."""
        found = []
        for folder in sorted(self.root.iterdir(), reverse=True):
            if folder.is_dir() and (folder / JOB_FILE).is_file():
                found.append(self.get(folder.name))
        return found

    def cancel(self, job_id: str, grace: float = GRACE_S) -> Job:
        """Stop a running job: SIGTERM to its process group, SIGKILL after `grace` seconds, then clean its output.

        Returns the job as it ended: ``finished`` when its work completed before the signal landed."""
        job = self.get(job_id)
        if not job.active:
            return job
        _signal_group(job.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _alive(job.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(job.pid):
            _signal_group(job.pid, signal.SIGKILL)
            while _alive(job.pid) and time.monotonic() < deadline + grace:
                time.sleep(0.05)
        if job.kind != PUBLISH:  # a push reads a finished folder: nothing of it is temporary
            from suture.merge.writer import recover_output

            recover_output(job.out_dir)  # a killed writer's temporary folder is deleted (its owner is dead)
        if _completed_by(job):
            _claim_outcome(job.folder, FINISHED)
        else:
            _claim_outcome(job.folder, CANCELLED, _cancelled_message(job.kind))
        return self.get(job_id)

    def wait(self, job_id: str, timeout: float = 300.0) -> Job:
        """Block until the job ends (for tests and scripts)."""
        deadline = time.monotonic() + timeout
        while (job := self.get(job_id)).active:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still running after {timeout} s")
            time.sleep(0.1)
        return job


def _cancelled_message(kind: str) -> str:
    if kind == PUBLISH:
        return "Cancelled: the push was stopped; files already uploaded may remain in the Hub repository."
    return "Cancelled: the worker was stopped and no output was written."


def _signal_group(pid: int | None, sig: signal.Signals) -> None:
    if not pid:
        return
    try:
        os.killpg(pid, sig)  # the worker leads its own session: its whole group goes
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------------------------------------- the worker's side


def _problem_of(report: Mapping[str, Any]) -> str | None:
    """Why a finished run is not a good result: NaN/Inf weights, or NaN/Inf loss/accuracy of its output."""
    from suture.app.results import non_finite_figures
    from suture.merge.report import as_report

    return as_report(report).non_finite_problem() or non_finite_figures(report)


def work(folder: Path) -> int:
    """Run the job recorded in `folder` and record its outcome (the worker process's whole life)."""
    record = _read_json(folder / JOB_FILE)
    job = Job(folder=folder, id=record["id"], kind=record.get("kind", "run"), label=record["label"], out_dir=record["out_dir"],
              started=float(record["started"]))

    def interrupted(signum, frame):  # noqa: ARG001 - SIGTERM unwinds like Ctrl-C: the output's temp folder goes
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    delay_stage, _, delay_text = (os.environ.get(STEP_DELAY_ENV) or "").rpartition(":")
    delay = float(delay_text or 0)
    last = [0.0]

    def progress(stage: str, done: int, total: int, detail: str = "") -> None:
        now = time.monotonic()
        if now - last[0] >= _PROGRESS_EVERY_S or done >= total:
            last[0] = now
            _write_json(folder / PROGRESS_FILE, {"stage": stage, "done": done, "total": total, "detail": str(detail)[:200]})
        if delay and delay_stage in ("", stage):
            time.sleep(delay)

    try:
        from suture.merge.errors import SutureError
        from suture.merge.redact import redact
        from suture.recipes.runner import RunOptions, run_recipe

        try:
            if job.kind == SEARCH:
                _search(record, progress)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                _claim_outcome(folder, FINISHED)
                return 0
            if job.kind == PUBLISH:
                url = _publish(record, progress)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                _claim_outcome(folder, FINISHED, result={"url": url})
                return 0
            options = RunOptions(device=record.get("device", "auto"), overwrite=bool(record.get("overwrite")),
                                 trust_remote_code=bool(record.get("trust_remote_code")))
            result = run_recipe(dict(record["recipe"]), job.out_dir, options, progress=progress)
        except SutureError as exc:
            _claim_outcome(folder, FAILED, sentence(redact(str(exc))))
            return 2
        except Exception as exc:  # out of memory, a full disk...: one readable line, never a traceback
            logger.warning("job %s failed", job.id, exc_info=exc)
            _claim_outcome(folder, FAILED, sentence(redact(f"{type(exc).__name__}: {exc}")))
            return 1
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the work is done: a late Cancel cannot turn it into "cancelled"
        problem = _problem_of(result.report)
        _claim_outcome(folder, FAILED if problem else FINISHED, sentence(problem) if problem else None)
        return 0
    except KeyboardInterrupt:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if _completed_by(job):  # the output was installed just before the signal landed: it did finish
            _claim_outcome(folder, FINISHED)
        else:
            _claim_outcome(folder, CANCELLED, _cancelled_message(job.kind))
        return 130


def _search(record: Mapping[str, Any], progress: Any) -> None:
    """Run the search in this process (local Ray), reporting trials finished / total while Tune runs."""
    from suture.recipes.search import load_search_spec
    from suture.recipes.search_run import run_search, saved_trials, trial_results

    spec = load_search_spec(record["spec"])
    resume = bool(record.get("resume"))
    total = saved_trials(record["out_dir"]) if resume else int(record.get("trials") or spec.search.trials)
    stop = threading.Event()

    def watch() -> None:  # Tune's trial results on disk are the progress: one result per finished trial
        while not stop.wait(0.5):
            progress("search", sum(t.get("objective") is not None for t in trial_results(record["out_dir"])), total)

    progress("search", 0, total)
    watcher = threading.Thread(target=watch, daemon=True, name="search-progress")
    watcher.start()
    try:
        result = run_search(spec, record["out_dir"], trials=None if resume else total, workers=int(record.get("workers") or 1),
                            address=record.get("address") or None, resume=resume, verbose=0)
    finally:
        stop.set()
        watcher.join()
    progress("search", sum(t.get("objective") is not None for t in result.trials), total)


def _publish(record: Mapping[str, Any], progress: Any) -> str:
    """Push the job's folder to the Hub (token from this worker's environment); progress in thousandths."""
    from suture.merge.hub import push_folder

    def report(fraction: float, message: str) -> None:
        progress("publish", int(round(min(max(fraction, 0.0), 1.0) * 1000)), 1000, message)

    progress("publish", 0, 1000, "starting")
    return push_folder(record["out_dir"], record["repo_id"], private=bool(record.get("private")),
                       token=os.environ.get(TOKEN_ENV) or None, progress=report)


def main(argv: list[str] | None = None) -> int:
    """``python -m suture.app.jobs JOB_FOLDER``: the worker entry point."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from suture.merge.redact import install_log_redaction

    install_log_redaction()
    return work(Path(args[0]))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
