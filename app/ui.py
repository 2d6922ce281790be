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

    STAGES = {"load": "loading models", "align": "aligning", "merge": "merging tensors", "zip": "zipping", "evaluate": "evaluating", "publish": "publishing"}

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


def run_panel(recipe: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    """Run and Cancel buttons, the progress panel and the outcome; returns the finished run (or None)."""
    ss = st.session_state
    valid, problem = state.validate(recipe)
    c1, c2, c3, c4 = st.columns([1.2, 1, 1.2, 2.6])
    devices = services.devices()
    current = ss.get(state.DEVICE, "auto")
    device = c3.selectbox("Device", devices, index=devices.index(current) if current in devices else 0, key=f"{key}.device")
    ss[state.DEVICE] = device
    recompute = c4.checkbox("Recompute even if this recipe already has a result", key=f"{key}.recompute")
    run = c1.button("Run merge", type="primary", disabled=valid is None, key=f"{key}.run")
    # clicking Cancel while a run is going reruns the script: the runner is interrupted at its next progress
    # report and its temporary output folder is removed, so nothing partial is left behind
    cancel = c2.button("Cancel", key=f"{key}.cancel")
    if problem:
        st.error(problem)
    if cancel and not run:
        st.warning("Cancelled: no output was written for the interrupted run.")
        return None
    if not run or valid is None:
        return None
    try:
        prepare_demo_models(state.referenced_refs(valid))
    except Exception as exc:  # shown as one readable line, never a traceback
        error(exc)
        return None
    with st.status("Running merge…", expanded=True) as status:
        panel = ProgressPanel(status)
        try:
            outcome = services.run_merge(valid, workspace(), device=device, progress=panel, recompute=recompute,
                                         trust_remote_code=trusted())
        except Exception as exc:  # library errors, and e.g. out of memory or a full disk: one readable line
            status.update(label="Merge failed", state="error")
            error(exc)
            return None
        if outcome.problem:  # a folder was written, but its weights are not usable: never shown as a success
            status.update(label="Merge failed: non-finite output", state="error")
            st.error(outcome.problem)
            ss.pop(state.LAST_RUN, None)
            return None
        panel.bar.progress(1.0, text="done" if not outcome.cached else "reused the earlier result")
        status.update(label="Merge finished" if not outcome.cached else "Merge reused from an earlier run", state="complete", expanded=False)
    ss[state.LAST_RUN] = outcome.as_dict()
    return ss[state.LAST_RUN]
