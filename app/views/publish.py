"""Publish: preview the model card of a finished merge and push the folder to the Hugging Face Hub.

The push is a background job (app/jobs.py, kind ``publish``). The token comes from HF_TOKEN / the
huggingface_hub login, or from a password field whose value is used for the push only: it is never shown,
never put in session state, and never written to a file (the job's worker gets it in its environment).
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from suture.app import results, services, state, ui

ss = st.session_state
ws = ui.workspace()
recipe = ss[state.RECIPE]

st.title("Publish")
runs = results.list_runs(ws)
failed = [r for r in runs if r.failed]
good = [r for r in runs if not r.failed]
if failed:
    st.warning(f"{len(failed)} result(s) not offered: their weights or losses are not finite (NaN/Inf): "
               + "; ".join(f"`{ws.relative(r.folder)}` ({r.problem})" for r in failed) + ". Fix the recipe and run again.")
if not good:
    st.info("No finished merge in the workspace yet: run one on the Align & merge page.")
    st.stop()

names = [r.folder.as_posix() for r in good]
labels = dict(zip(names, (f"{label} — {ws.relative(r.folder)}" for label, r in zip(results.unique_labels(good), good))))
last = ss.get(state.LAST_RUN)
start = names.index(last["out_dir"]) if last and last["out_dir"] in names else 0
chosen = Path(st.selectbox("Result to publish", names, index=start, format_func=labels.get, key="publish.folder"))

files = sorted(p for p in chosen.iterdir() if p.is_file() and not p.name.startswith("."))
st.caption(" · ".join(f"{p.name} ({p.stat().st_size / 1e6:.2f} MB)" for p in files))

st.subheader("Model card")
readme = chosen / "README.md"
if readme.is_file():
    front, body = services.split_card(readme.read_text(encoding="utf-8"))
    with st.expander("Hub metadata (front matter)", expanded=False):
        st.code(front, language="yaml")
    with st.container(border=True, key="card-preview"):
        # the card's images are files next to it: shown from the folder (st.markdown cannot load them)
        for kind, part in services.card_parts(body):
            image = chosen / part
            if kind == "image" and image.is_file() and ws.contains(image):
                st.image(str(image))
            elif kind == "text" and part.strip():
                st.markdown(part)
else:
    st.warning("This folder has no README.md model card.")

st.subheader("Push to the Hub")
settings = recipe.get("publish") or {}
repo_id = st.text_input("Repository id", value=settings.get("repo_id", ""), placeholder="your-name/merged-model",
                        key=state.widget_key(ss, "publish.repo"))
private = st.checkbox("Private repository", value=bool(settings.get("private", False)), key=state.widget_key(ss, "publish.private"))
keep = st.checkbox("Store repository and privacy in the recipe (`publish:` section; `suture run` then pushes too)",
                   value=bool(settings), key=state.widget_key(ss, "publish.keep"))
if keep and repo_id.strip():
    edited = dict(recipe)
    edited["publish"] = {**settings, "repo_id": repo_id.strip(), "private": private}
    if not edited["publish"]["private"]:
        edited["publish"].pop("private")
    valid, _ = state.validate(edited)
    ss[state.RECIPE] = valid if valid is not None else edited
elif not keep and settings:
    ss[state.RECIPE] = {k: v for k, v in recipe.items() if k != "publish"}

env_token = services.env_token()
if env_token:
    st.caption("Using the token from HF_TOKEN or your Hugging Face login (not shown).")
    typed_token = ""
else:
    # no key: the value stays in the widget only, never in st.session_state
    typed_token = st.text_input("Hugging Face token (write access)", type="password",
                                help="Used for this push only; set HF_TOKEN to avoid typing it.")

if st.button("Push", type="primary", disabled=not repo_id.strip(), key="publish.push"):
    try:  # a background job: the token reaches its worker through the worker's environment, never a file
        job = services.start_push_job(chosen, ws, repo_id.strip(), private=private, token=typed_token or env_token)
    except Exception as exc:  # shown as one readable line, never a traceback
        st.status("Publishing failed", state="error", expanded=False)
        ui.error(exc)
    else:
        ss[ui.PUBLISH_JOB] = job.id
        st.rerun()  # the sidebar's Jobs panel lists it at once
job = ui.page_job(ui.PUBLISH_JOB, "publish.job")
if job is not None:
    if job.state == "finished" and job.result.get("url"):
        url = job.result["url"]
        st.success(f"Published `{ws.relative(job.out_dir)}`: [{url}]({url})")
    elif job.state == "failed":
        st.status("Publishing failed", state="error", expanded=False)
        st.error(job.error or "The push failed.")
    elif job.state == "cancelled":
        st.warning(job.error or "Cancelled.")
