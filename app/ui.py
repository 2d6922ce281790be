"""Small pieces shared by the pages: the workspace, readable errors, model labels, and the run panel."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import streamlit as st

from app import services, state
from app.workspace import Workspace
from merge.errors import SutureError

logger = logging.getLogger(__name__)


def workspace() -> Workspace:
    """The session's workspace (chosen at start-up by app/main.py)."""
    return Workspace(Path(st.session_state[state.WORKSPACE]))


def error(exc: BaseException) -> None:
    """Show an error as a readable message, never a traceback (unexpected ones keep theirs in the log)."""
    if isinstance(exc, SutureError):
        logger.info("shown to the user: %s", exc)
    else:
        logger.warning("unexpected error shown to the user", exc_info=exc)
    st.error(services.readable(exc))


def model_label(ref: str) -> str:
    """How a model reference is shown: demo models with their description, local paths inside the workspace."""
    from merge.refs import DEMO_MODELS

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


class ProgressPanel:
    """A progress callback for the runner that drives an st.progress bar inside an st.status box."""

    STAGES = {"load": "loading models", "align": "aligning", "merge": "merging tensors", "evaluate": "evaluating", "publish": "publishing"}

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
    with st.status("Running merge…", expanded=True) as status:
        panel = ProgressPanel(status)
        try:
            outcome = services.run_merge(valid, workspace(), device=device, progress=panel, recompute=recompute)
        except Exception as exc:  # library errors, and e.g. out of memory or a full disk: one readable line
            status.update(label="Merge failed", state="error")
            error(exc)
            return None
        panel.bar.progress(1.0, text="done" if not outcome.cached else "reused the earlier result")
        status.update(label="Merge finished" if not outcome.cached else "Merge reused from an earlier run", state="complete", expanded=False)
    ss[state.LAST_RUN] = outcome.as_dict()
    return ss[state.LAST_RUN]
