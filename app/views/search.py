"""Search: `suture search` as a background job — pick or upload a spec, start it, watch trials, load the best recipe."""

from __future__ import annotations

import re
import time
from pathlib import Path

import streamlit as st

from suture.app import services, state, ui

ss = st.session_state
ws = ui.workspace()
SEARCHES = Path(__file__).resolve().parents[2] / "recipes" / "searches"
SEARCH_JOB = "search_job"  # the search job this session started or opened (its id)
TRIALS = (1, 200)
WORKERS = (1, 16)

ADDRESS = re.compile(r"(ray://)?[A-Za-z0-9]([A-Za-z0-9.-]{0,252})?:[0-9]{1,5}")


def cluster_address(text: str) -> tuple[str | None, str | None]:
    """(address, problem) for the address field: empty means a local Ray; else `auto`, HOST:PORT or ray://HOST:PORT."""
    text = text.strip()
    if not text:
        return None, None
    if text == "auto" or (ADDRESS.fullmatch(text) and 0 < int(text.rsplit(":", 1)[1]) < 65536):
        return text, None
    return None, (f"Ray cluster address {text[:80]!r} is not valid: use auto, HOST:PORT (e.g. 10.0.0.1:6379) or "
                  "ray://HOST:PORT, or leave it empty to start Ray here.")


st.title("Search")
st.caption("Search recipe values (weights, densities, method...) with Ray Tune and Optuna; the same as "
           "`suture search SPEC OUT --trials N --workers K [--address A]`. It runs as a job: Pause stops it with its state saved (Resume continues it, as `--resume`); Cancel stops it and its Ray processes.")

# the bundled examples, then the specs kept in the workspace (uploads land there)
examples = {p.stem: p for p in sorted(SEARCHES.glob("*.yaml"))}
examples |= {f"workspace: {p.name}": p for p in sorted((ws.root / "searches").glob("*.y*ml"))}
choice = st.selectbox("Search spec", [*examples, "upload"], key="search.spec")
spec_path: Path | None = examples.get(choice)
if choice == "upload":
    uploaded = st.file_uploader("Upload a search spec (YAML)", type=["yaml", "yml"], key="search.upload")
    if uploaded is not None:  # kept in the workspace, so a relative base recipe resolves there
        spec_path = ws.root / "searches" / f"{state.slug(Path(uploaded.name).stem, 'search')}.yaml"
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        spec_path.write_bytes(uploaded.getvalue())

spec = None
if spec_path is not None:
    from suture.recipes.search import load_search_spec

    try:
        spec = load_search_spec(spec_path)
        services.check_recipe_paths(spec.base.to_dict(), ws)
    except Exception as exc:  # one readable line, never a traceback
        spec = None
        ui.error(exc)
    else:
        with st.expander(f"{spec_path.name}: {len(spec.param_names())} values searched, "
                         f"{spec.evaluate.metric} on {', '.join(spec.evaluate.task_names())}"):
            st.code(spec_path.read_text(encoding="utf-8"), language="yaml")

c1, c2, c3 = st.columns([1, 1, 1.2])


def _within(limits: tuple[int, int]):
    return lambda v: None if limits[0] <= v <= limits[1] else f"must be in [{limits[0]}, {limits[1]}], got {v:g}"


trials, trials_problem = ui.number_field("Trials", min(max(spec.search.trials if spec else 12, TRIALS[0]), TRIALS[1]), integer=True,
                                         bounds=f"in [{TRIALS[0]}, {TRIALS[1]}]", problem=_within(TRIALS), key="search.trials", where=c1)
workers, workers_problem = ui.number_field("Workers", 1, integer=True, bounds=f"in [{WORKERS[0]}, {WORKERS[1]}]", problem=_within(WORKERS),
                                           key="search.workers", help="Trials run at once, one CPU each", where=c2)
address_text = st.text_input("Ray cluster address (optional)", key="search.address", placeholder="auto, HEAD_IP:6379 or ray://HEAD_IP:10001",
                             help="Leave empty to start Ray on this machine. With an address the trials run on that "
                                  "cluster (`--address`); the models must resolve on every node.")
address, address_problem = cluster_address(address_text)
if address_problem:
    st.error(address_problem)
if c3.button("Start search", type="primary", disabled=spec is None or bool(address_problem or trials_problem or workers_problem),
              key="search.start"):
    try:
        ui.prepare_demo_models(state.referenced_refs(spec.base.to_dict()))
        out = ws.root / "outputs" / f"search-{state.slug(spec.base.name or spec_path.stem, 'search')}-{time.strftime('%Y%m%d-%H%M%S')}"
        job = ui.job_store().start_search(spec_path, out, label=f"search {spec_path.stem}", trials=int(trials), workers=int(workers),
                                          address=address)
    except Exception as exc:  # one readable line, never a traceback
        ui.error(exc)
    else:
        ss[SEARCH_JOB] = job.id


def trials_view(out: Path, finished: bool) -> None:
    """The trials table, the objective-vs-trial plot and (at the end) the best recipe with a Load button."""
    from suture.merge.store import read_json
    from suture.recipes.search_run import trial_results

    summary = read_json(out / "trials.json") if finished and (out / "trials.json").is_file() else None
    rows = summary["trials"] if summary else trial_results(out)
    if not rows:
        st.caption("No trial has reported yet.")
        return
    st.dataframe(rows, hide_index=True)
    if (out / "objective.png").is_file():
        st.image(str(out / "objective.png"), caption="Objective per trial (dots), best so far (line), held-out (crosses)")
    else:
        st.line_chart({"objective": [r.get("objective") for r in rows]})
    best = (summary or {}).get("best")
    if best and (out / "best_recipe.yaml").is_file():
        held = f", held-out {best['heldout']:.4f}" if best.get("heldout") is not None else ""
        st.success(f"Best: trial {best['trial']} with objective {best['objective']:.4f}{held}.")
        text = (out / "best_recipe.yaml").read_text(encoding="utf-8")
        st.code(text, language="yaml")
        if st.button("Load the best recipe into the workbench", key="search.load_best"):
            try:
                state.import_recipe(ss, text, ws)
            except Exception as exc:  # one readable line, never a traceback
                ui.error(exc)
            else:
                ss[state.NOTICE] = f"Loaded the best recipe of the search (trial {best['trial']})."
                st.switch_page("views/recipe.py")


def resumable(job) -> None:
    """For a search stopped before its last trial: how far it got and a Resume button (``--resume``)."""
    from suture.merge.store import read_json

    summary = Path(job.out_dir) / "trials.json"
    try:
        finished = read_json(summary).get("finished", True) if summary.is_file() else True
    except Exception as exc:  # one readable line, never a traceback
        ui.error(exc)
        return
    if finished:
        return
    settings = job.settings
    st.info(f"The search stopped after {job.done} of {job.total} trials. Resume continues it to {job.total} trials, "
            "keeping the finished ones.")
    if st.button("Resume", type="primary", key="search.resume"):
        try:
            resumed = ui.job_store().start_search(settings["spec"], job.out_dir, label=f"{job.label} (resumed)", trials=None,
                                                  workers=int(settings.get("workers") or 1), address=settings.get("address"),
                                                  resume=True)
        except Exception as exc:  # one readable line, never a traceback
            ui.error(exc)
        else:
            ss[SEARCH_JOB] = resumed.id
            st.rerun()


def running(job_id: str) -> None:
    """Progress and live trials, refreshed every second while the search runs."""
    job = ui.job_store().get(job_id)
    if not job.active:
        st.rerun()
    with st.status(f"Searching: {job.done}/{job.total} trials", expanded=True):
        st.progress(job.progress, text=f"{job.done}/{job.total} trials finished · {job.elapsed:.0f} s")
        b1, b2 = st.columns(2)
        if b1.button("Pause (resume later)", key="search.pause",
                     help="Stop after saving Tune's state, as Ctrl-C on `suture search`; Resume continues it."):
            ui.job_store().pause(job.id)
            st.rerun()
        if b2.button("Cancel", key="search.cancel"):
            ui.job_store().cancel(job.id)
            st.rerun()
    trials_view(Path(job.out_dir), finished=False)


job_id = ss.get(SEARCH_JOB)
if job_id:
    from suture.app import jobs

    job = ui.job_store().get(job_id)
    st.subheader(f"Search {job.id}")
    st.caption(f"Results in {ws.relative(job.out_dir)}")
    if job.active:
        st.fragment(run_every=ui.JOB_POLL_S)(running)(job.id)
    elif job.state == jobs.FINISHED:
        resumable(job)
        trials_view(Path(job.out_dir), finished=True)
    elif job.state == jobs.FAILED:
        st.error(job.error or "The search failed.")
    else:
        st.warning(job.error or "Cancelled.")
