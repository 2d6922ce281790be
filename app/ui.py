"""Small pieces shared by the pages: the workspace, readable errors, model labels, and the run panel."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import streamlit as st

from suture.app import services, state
from suture.app.workspace import Workspace
from suture.merge.errors import SutureError

logger = logging.getLogger(__name__)


def workspace() -> Workspace:
    """The session's workspace (chosen at start-up by app/main.py)."""
    return Workspace(Path(st.session_state[state.WORKSPACE]))


TRUST_KEY = "trust_remote_code"


def trust_toggle() -> None:
    """The explicit opt-in (off by default) to build architectures that models' files or recipes name outside
    Suture's zoo and the workspace: building one imports and runs its code."""
    st.toggle(services.TRUST_TOGGLE, value=False, key=TRUST_KEY,
              help="Off: only Suture's zoo architectures and modules inside the workspace are built.")


def trusted() -> bool:
    """Whether this session turned the trust toggle on."""
    return bool(st.session_state.get(TRUST_KEY, False))


def error(exc: BaseException) -> None:
    """Show an error as a readable message, never a traceback (unexpected ones keep theirs in the log)."""
    if isinstance(exc, SutureError):
        logger.info("shown to the user: %s", exc)
    else:
        logger.warning("unexpected error shown to the user", exc_info=exc)
    st.error(services.readable(exc))


def number_field(label: str, shown: float | int, *, integer: bool, bounds: str, problem: Any, key: str,
                 help: str | None = None, step: float | None = None, where: Any = st) -> tuple[float | int, str | None]:
    """A number typed as it is: the range is part of the label, and a value outside it (or of the wrong type) is an
    error right below the field, never clamped (st.number_input without min/max keeps what was typed).

    `problem(value)` says why a value does not fit (the method or engine registry decides); returns (value, error)."""
    shown_label = f"{label} {bounds.removeprefix('in ')}" if bounds.startswith("in ") else f"{label} ({bounds})" if bounds else label
    if integer:
        raw = where.number_input(shown_label, value=int(shown), step=1, help=help, key=key)
    else:
        raw = where.number_input(shown_label, value=float(shown), step=step or 0.05, format="%g", help=help, key=key)
    value = int(raw) if integer else float(raw)
    error = problem(value)
    if error:
        where.error(f"{label}: {error.rstrip('.')}.")
    return value, error


def model_label(ref: str) -> str:
    """How a model reference is shown: demo models with their description, local paths inside the workspace."""
    from suture.merge.refs import DEMO_MODELS

    if ref.startswith(state.DEMO_PREFIX):
        entry = DEMO_MODELS.get(ref[len(state.DEMO_PREFIX):])
        return f"{ref} — {entry[1]}" if entry else ref
    if state.is_local_ref(ref):
        ws = workspace()
        return f"{ws.relative(ref)} (workspace)" if ws.contains(ref) else ref
    return f"{ref} (Hub)"


def short_label(ref: str) -> str:
    """A compact label: the reference itself, with local paths shown relative to the workspace."""
    if state.is_local_ref(ref):
        ws = workspace()
        return ws.relative(ref) if ws.contains(ref) else ref
    return ref


def model_kind(ref: str) -> str:
    """demo, local or hub."""
    if ref.startswith(state.DEMO_PREFIX):
        return "demo"
    return "local" if state.is_local_ref(ref) else "hub"


def examples_picker(where: str) -> None:
    """A picker of the shipped example recipes (recipes/examples/*.yaml); loading one replaces the session's recipe."""
    ss = st.session_state
    examples = state.example_recipes()
    c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
    pick = c1.selectbox("Example recipe", list(examples), format_func=lambda n: n.replace("_", " "), key=f"{where}.examples.pick",
                        help="The recipes shipped in recipes/examples/; loading one replaces the current recipe on every page.")
    if c2.button("Load example", key=f"{where}.examples.load"):
        try:
            loaded = state.import_recipe(ss, examples[pick].read_text(encoding="utf-8"), workspace())
        except Exception as exc:  # shown as one readable line, never a traceback
            error(exc)
        else:
            ss[state.EXAMPLE_NOTICE] = f"Loaded the example {pick}: {loaded.get('name') or '(unnamed)'}. Run it on Align & merge."
            st.rerun()
    st.caption(state.example_summary(pick))
    notice = ss.pop(state.EXAMPLE_NOTICE, None)
    if notice:
        st.success(notice)


def prepare_demo_models(refs: list[str] | tuple[str, ...]) -> None:
    """Train the demo models among `refs` that are not cached yet, shown in an st.status box (errors propagate)."""
    pending = [r for r in dict.fromkeys(refs) if r.startswith(state.DEMO_PREFIX) and not services.demo_ready(r)]
    if not pending:
        return
    label = "Training the demo models on first use (about 10-20 s each, cached afterwards)…"
    with st.status(label, expanded=True) as status:
        for i, ref in enumerate(pending, 1):
            st.write(f"{i}/{len(pending)}: training {model_label(ref)}")
            try:
                services.resolve(ref)
            except Exception:
                status.update(label=f"Training {ref} failed", state="error")
                raise
        status.update(label="Trained on first use: " + ", ".join(pending), state="complete", expanded=False)


class ProgressPanel:
    """A progress callback for the runner that drives an st.progress bar inside an st.status box."""

    STAGES = {"load": "loading models", "align": "aligning", "merge": "merging tensors", "zip": "zipping", "evaluate": "evaluating",
              "publish": "publishing", "features": "computing features", "stitch": "fitting the stitch", "plan": "scoring cuts"}

    def __init__(self, status: Any) -> None:
        self.status = status
        self.bar = st.progress(0.0, text="starting")
        self.stage = ""

    def __call__(self, stage: str, done: int, total: int, detail: str = "") -> None:
        fraction = min(max(done / total, 0.0), 1.0) if total else 0.0
        label = self.STAGES.get(stage, stage)
        if stage != self.stage:
            self.stage = stage
            self.status.update(label=f"Running: {label}")
        text = f"{label}: {done}/{total}" + (f" — {detail}" if detail else "")
        self.bar.progress(fraction, text=text[:120])


ACTIVE_JOB = "active_job"  # the job this session started or opened (its id); the job itself lives on disk
JOB_POLL_S = 1.0


def job_store():
    """The workspace's jobs (app/jobs.py): shared by every session and page, kept across reloads."""
    from suture.app.jobs import JobStore

    return JobStore(workspace().root)


def _for_recipe(recipe: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A recipe as a job stores it (canonical, without `publish`), to tell whether a result belongs to the form."""
    if recipe is None:
        return None
    return {k: v for k, v in recipe.items() if k != "publish"}


def open_job(job: Any) -> None:
    """Make a finished job the session's result (its recipe becomes the form's recipe)."""
    ss = st.session_state
    ss[ACTIVE_JOB] = job.id
    if job.recipe:
        ss[state.RECIPE] = state.canonical(job.recipe)
        ss[state.VERSION] = int(ss.get(state.VERSION, 0)) + 1
    ss[state.LAST_RUN] = {**services.finished_run(job.out_dir, cached=job.cached), "job": job.id}


def _job_outcome(job: Any, recipe: Mapping[str, Any] | None) -> None:
    """The end of the session's job, shown in full where the user looks (never in a collapsed box)."""
    from suture.app import jobs

    ss = st.session_state
    if job.state == jobs.FINISHED:
        if (ss.get(state.LAST_RUN) or {}).get("job") != job.id:
            ss[state.LAST_RUN] = {**services.finished_run(job.out_dir, cached=job.cached), "job": job.id}
        with st.status("Merge finished" if not job.cached else "Merge reused from an earlier run", state="complete", expanded=False):
            st.progress(1.0, text="done" if not job.cached else "reused the earlier result")
    elif job.state == jobs.FAILED:
        ss.pop(state.LAST_RUN, None)
        st.status("Merge failed" + (": non-finite output" if "NaN/Inf" in (job.error or "") else ""), state="error", expanded=False)
        st.error(job.error or "The merge failed.")
    else:
        ss.pop(state.LAST_RUN, None)
        st.warning(job.error or "Cancelled.")


def running_job(job_id: str, key: str) -> None:
    """A running job's stage and progress, refreshed every second; Cancel stops its worker."""
    from suture.app import jobs

    job = job_store().get(job_id)
    if not job.active:
        st.rerun()  # the whole page shows the outcome (and the result) now
    label = ProgressPanel.STAGES.get(job.stage, job.stage or "starting")
    with st.status(f"Running: {label}", expanded=True):
        text = f"{label}: {job.done}/{job.total}" + (f" — {job.detail}" if job.detail else "") if job.total else label
        st.progress(job.progress, text=f"{text} · {job.elapsed:.0f} s"[:120])
        if st.button("Cancel", key=f"{key}.cancel"):
            ended = job_store().cancel(job.id)
            if ended.state == jobs.FINISHED:
                st.toast("The job had already finished: its result is kept.")
            st.rerun()


def run_panel(recipe: Mapping[str, Any], key: str, blocked: str | None = None) -> dict[str, Any] | None:
    """Run button, the session's job (progress, Cancel, outcome); returns the finished run shown (or None).

    The run is a background job (app/jobs.py): it goes on while the user visits other pages, and Cancel kills it.
    `blocked` (fields in error on the page) turns Run off and says why."""
    ss = st.session_state
    valid, problem = state.validate(recipe)
    if blocked:
        valid, problem = None, blocked
    c1, c3, c4 = st.columns([1.2, 1.2, 2.6])
    devices = services.devices()
    current = ss.get(state.DEVICE, "auto")
    device = c3.selectbox("Device", devices, index=devices.index(current) if current in devices else 0, key=f"{key}.device")
    ss[state.DEVICE] = device
    recompute = c4.checkbox("Recompute even if this recipe already has a result", key=f"{key}.recompute")
    run = c1.button("Run merge", type="primary", disabled=valid is None, key=f"{key}.run")
    if problem:
        st.error(problem)
    if run and valid is not None:
        try:
            prepare_demo_models(state.referenced_refs(valid))
            job = services.start_merge_job(valid, workspace(), device=device, recompute=recompute, trust_remote_code=trusted())
        except Exception as exc:  # shown as one readable line, never a traceback
            error(exc)
            return None
        ss[ACTIVE_JOB] = job.id
        ss.pop(state.LAST_RUN, None)
        st.rerun()  # the sidebar's Jobs panel lists it at once
    job = page_job(ACTIVE_JOB, key)
    if job is None:  # none yet, or still running (its progress and Cancel are shown)
        return None
    if _for_recipe(job.recipe) != _for_recipe(valid):
        ss.pop(state.LAST_RUN, None)  # the form changed since: the old banner and result no longer describe it
        return None
    _job_outcome(job, valid)
    return ss.get(state.LAST_RUN)


JOBS_LISTED = 6
STITCH_JOB, PUBLISH_JOB = "stitch.job", "publish.job"  # the job the Stitch / Publish page shows (its id)
# job kinds whose result another page than Align & merge shows: (session key of the job id, page)
RESULT_PAGES = {"search": ("search_job", "views/search.py"), "stitch": (STITCH_JOB, "views/stitch.py"),
                "publish": (PUBLISH_JOB, "views/publish.py")}


def page_job(session_key: str, key: str) -> Any:
    """The job a page shows (its id under `session_key`): progress and Cancel while it runs (refreshed every second),
    else the job as it ended (None when there is none)."""
    ss = st.session_state
    job_id = ss.get(session_key)
    if not job_id:
        return None
    try:
        job = job_store().get(job_id)
    except SutureError:
        ss.pop(session_key, None)
        return None
    if job.active:
        st.fragment(run_every=JOB_POLL_S)(running_job)(job.id, key)
        return None
    return job


def _jobs_list() -> None:
    """The workspace's recent jobs: state, stage, progress, elapsed time and recipe; a finished one opens."""
    from suture.app import jobs

    store = job_store()
    listed = store.list()[:JOBS_LISTED]
    if not listed:
        st.caption("No jobs yet: a run started on Align & merge or Recipe is listed here.")
        return
    icons = {jobs.RUNNING: ":material/progress_activity:", jobs.FINISHED: ":material/check_circle:",
             jobs.FAILED: ":material/error:", jobs.CANCELLED: ":material/cancel:"}
    for job in listed:
        with st.container(border=True, key=f"job-{job.id}"):
            stage = ProgressPanel.STAGES.get(job.stage, job.stage)
            where = f" · {stage} {job.progress:.0%}" if job.active and stage else ""
            st.markdown(f"{icons.get(job.state, '')} **{job.label}** · {job.state}{where} · {job.elapsed:.0f} s")
            if job.state == jobs.FAILED and job.error:
                st.caption(job.error)
            if job.state == jobs.FINISHED and st.button("Open result", key=f"jobs.open.{job.id}"):
                if job.kind in RESULT_PAGES:  # a search, stitch or push: its own page shows the result
                    session_key, page = RESULT_PAGES[job.kind]
                    st.session_state[session_key] = job.id
                    st.switch_page(page)
                open_job(job)
                st.switch_page("views/align_merge.py")
            if job.active and st.button("Cancel", key=f"jobs.cancel.{job.id}"):
                store.cancel(job.id)
                st.rerun()


def jobs_panel() -> None:
    """The Jobs panel of the sidebar, refreshed while a job runs (jobs live on disk, so a reload keeps them)."""
    st.caption("Jobs")
    running = any(job.active for job in job_store().list()[:JOBS_LISTED])
    (st.fragment(run_every=JOB_POLL_S)(_jobs_list) if running else _jobs_list)()
