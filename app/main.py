"""Suture workbench (Streamlit): `suture app` or `streamlit run app/main.py -- --workspace DIR`.

The workspace comes from ``--workspace DIR`` (after ``--``), else $SUTURE_WORKSPACE, else
./suture-workspace. The session opens on the quickstart example (Git Re-Basin on two demo MLPs, with the naive vs aligned
barrier plot); the sidebar loads any other example recipe. Demo models train on first use: no downloads.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `streamlit run app/main.py` puts app/ on the path, not the project root
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from suture.app import state  # noqa: E402
from suture.app.workspace import Workspace, WorkspaceError, workspace_from_args  # noqa: E402
from suture.merge.redact import install_log_redaction  # noqa: E402

# Not "pages/": Streamlit treats a pages/ folder beside the entry script as an old-style multipage app for the
# first run after a server start, where /merge is no page and a spurious "Page not found" dialog appears.
PAGES = Path(__file__).resolve().parent / "views"
ICON = Path(__file__).resolve().parent / "icon.svg"  # a local file: a :material/...: favicon is fetched from Google's CDN

st.set_page_config(page_title="Suture workbench", page_icon=str(ICON), layout="wide")
install_log_redaction()  # Hub tokens never reach a log line

try:
    workspace = Workspace.open(st.session_state.get(state.WORKSPACE) or workspace_from_args(sys.argv[1:]))
except WorkspaceError as exc:
    st.error(str(exc))
    st.stop()
state.init_state(st.session_state, workspace.root)

navigation = st.navigation(
    [
        st.Page(PAGES / "models.py", title="Models", icon=":material/deployed_code:", default=True),
        st.Page(PAGES / "align_merge.py", title="Align & merge", icon=":material/call_merge:", url_path="merge"),
        st.Page(PAGES / "stitch.py", title="Stitch", icon=":material/link:"),
        st.Page(PAGES / "recipe.py", title="Recipe", icon=":material/description:"),
        st.Page(PAGES / "search.py", title="Search", icon=":material/manage_search:"),
        st.Page(PAGES / "results.py", title="Results", icon=":material/leaderboard:", url_path="results"),
        st.Page(PAGES / "publish.py", title="Publish", icon=":material/cloud_upload:"),
    ]
)


def recipe_summary(where) -> None:
    """The sidebar's one-line summary of the session's recipe."""
    recipe = st.session_state[state.RECIPE]
    engine = (recipe.get("alignment") or {}).get("engine")
    what = " · ".join(f"`{x}`" for x in (engine, recipe.get("merge_method")) if x)
    where.markdown(f"**{recipe.get('name') or '(unnamed)'}** · {what} · {len(state.referenced_refs(recipe))} model(s)")


with st.sidebar:
    st.caption("Current recipe")
    summary = st.empty()
    recipe_summary(summary)
    st.caption("Workspace")
    st.code(str(workspace.root), language=None)
    from suture.app import ui

    ui.trust_toggle()
    ui.jobs_panel()

navigation.run()
recipe_summary(summary)  # again after the page wrote the form's values: the summary follows the form at once
