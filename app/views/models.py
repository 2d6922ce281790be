"""Models: add models (workspace path, upload, Hub id, demo), inspect them, check whether they fit together."""

from __future__ import annotations

import streamlit as st

from suture.app import services, state, ui
from suture.merge.errors import SutureError

ss = st.session_state
ws = ui.workspace()

st.title("Models")
st.caption(
    "Models the workbench knows about. The built-in demo models are trained on scikit-learn's digits the first "
    "time they are used (about 10-20 s each) and cached, so everything works without downloads."
)

ui.examples_picker("models")

# ------------------------------------------------------------------------------------------------ add
with st.expander("Add a model", expanded=False):
    tab_path, tab_upload, tab_hub, tab_demo = st.tabs(["Workspace path", "Upload", "Hub id", "Demo model"])
    with tab_path:
        typed = st.text_input("Path inside the workspace", key="models.path",
                              help=f"A .safetensors file or a model folder, relative to {ws.root}")
        if st.button("Add path", key="models.add_path"):
            try:
                path = ws.resolve(typed, must_exist=True)
                services.inspect_model(path.as_posix(), services.model_stamp(path.as_posix()))  # refuse what cannot be opened
                state.add_to_library(ss, [path.as_posix()])
                st.success(f"Added {ws.relative(path)}")
            except Exception as exc:  # shown as one readable line, never a traceback
                ui.error(exc)
    with tab_upload:
        from suture.app.workspace import upload_limit_bytes

        limit = upload_limit_bytes()
        uploaded = st.file_uploader(f"A .safetensors file (up to {limit / 1e6:.0f} MB)", type=["safetensors"],
                                    key=state.widget_key(ss, "models.upload"))
        if uploaded is not None and st.button("Add upload", key="models.add_upload"):
            try:
                if uploaded.size > limit:
                    raise SutureError(f"{uploaded.name}: {uploaded.size / 1e6:.1f} MB is over the upload limit of {limit / 1e6:.0f} MB")
                path = ws.save_upload(uploaded.name, uploaded.getvalue(), limit)
                state.add_to_library(ss, [path.as_posix()])
                st.success(f"Stored as {ws.relative(path)}")
            except Exception as exc:  # shown as one readable line, never a traceback
                ui.error(exc)
    with tab_hub:
        hub_id = st.text_input("Hugging Face Hub id", placeholder="org/name or org/name@revision", key="models.hub")
        st.caption("Only safetensors weights and config/tokenizer files are downloaded, when the model is first inspected or merged.")
        if st.button("Add Hub model", key="models.add_hub"):
            from suture.merge.hub import is_hub_id

            if is_hub_id(hub_id.strip()):
                state.add_to_library(ss, [hub_id.strip()])
                st.success(f"Added {hub_id.strip()}")
            else:
                st.error(f"{hub_id!r}: not a Hub id (expected org/name or org/name@revision)")
    with tab_demo:
        from suture.merge.refs import DEMO_MODELS

        choices = [f"demo:{name}" for name in DEMO_MODELS]
        demo = st.selectbox("Built-in demo model", choices, format_func=ui.model_label, key="models.demo")
        if st.button("Add demo model", key="models.add_demo"):
            state.add_to_library(ss, [demo])
            st.success(f"Added {demo}")

# ------------------------------------------------------------------------------------------------ library
library: list[str] = ss[state.LIBRARY]
st.subheader("Model list")
st.dataframe(
    [{"model": ref, "kind": ui.model_kind(ref), "description": ui.model_label(ref)} for ref in library],
    hide_index=True, width="stretch",
)
found = [p.as_posix() for p in ws.list_models() if p.as_posix() not in library]
if found:
    extra = st.multiselect("Models found in the workspace", found, format_func=ws.relative, key="models.found")
    if extra and st.button("Add the selected workspace models", key="models.add_found"):
        state.add_to_library(ss, extra)
        st.rerun()

# ------------------------------------------------------------------------------------------------ inspect
st.subheader("Inspect")
c1, c2 = st.columns([3, 1])
chosen = c1.selectbox("Model", library, format_func=ui.model_label, key="models.inspect")
groups = c2.checkbox("Permutation groups", key="models.groups", help="Which tensor axes index the same hidden units")
if chosen:
    fetched = ss.setdefault("models.fetched", [])
    if ui.model_kind(chosen) == "hub" and chosen not in fetched and not st.button("Inspect (downloads the model's weights)", key="models.inspect_hub"):
        st.info("Hub models are downloaded only when you ask.")
    else:
        try:
            ui.prepare_demo_models([chosen])
            with st.spinner(f"Reading {chosen}…"):
                info = services.inspect_model(chosen, services.model_stamp(chosen), groups)
            if ui.model_kind(chosen) == "hub" and chosen not in fetched:
                fetched.append(chosen)
        except Exception as exc:  # shown as one readable line, never a traceback
            ui.error(exc)
        else:
            m1, m2, m3, m4 = st.columns(4)
            m1.metric("Tensors", info["tensor_count"])
            m2.metric("Parameters", f"{info['parameters']:,}")
            m3.metric("Size", f"{info['bytes'] / 1e6:,.2f} MB")
            m4.metric("Family", info["family"] or "unknown")
            st.caption(f"{info['path']} · dtypes: " + ", ".join(f"{k} ({v})" for k, v in info["dtypes"].items()))
            st.dataframe(
                [{"tensor": t["name"], "shape": " × ".join(map(str, t["shape"])), "dtype": t["dtype"]} for t in info["tensors"]],
                hide_index=True, width="stretch",
            )
            if groups:
                g = info.get("groups")
                if isinstance(g, dict):
                    st.warning(f"Permutation groups: {g['error']}")
                elif g:
                    st.dataframe(
                        [{"group": r["group"], "size": r["size"], "kind": r["kind"], "members": len(r["members"]),
                          "frozen": r["frozen"] or ""} for r in g],
                        hide_index=True, width="stretch",
                    )
    if chosen not in state.referenced_refs(ss[state.RECIPE]) and st.button("Remove from the list", key="models.remove"):
        ss[state.LIBRARY] = [r for r in library if r != chosen]
        st.rerun()

# ------------------------------------------------------------------------------------------------ compatibility
st.subheader("Compatibility")
default = [r for r in state.referenced_refs(ss[state.RECIPE]) if r in library]
picked = st.multiselect("Models to compare", library, default=default, format_func=ui.short_label, key="models.compare")
if len(picked) >= 2:
    hub = [r for r in picked if ui.model_kind(r) == "hub" and r not in ss.setdefault("models.fetched", [])]
    if hub and not st.button("Compare (downloads Hub models)", key="models.compare_hub"):
        st.info("Comparing needs the Hub models' headers: press the button to download them.")
    else:
        try:
            ui.prepare_demo_models(picked)
            with st.spinner("Reading tensor shapes…"):
                infos = [services.inspect_model(r, services.model_stamp(r)) for r in picked]
            ss["models.fetched"] = list(dict.fromkeys(ss["models.fetched"] + hub))
            verdict = services.compatibility(infos)
        except Exception as exc:  # shown as one readable line, never a traceback
            ui.error(exc)
        else:
            (st.success if verdict["kind"] == "same" else st.warning)(verdict["verdict"])
            st.markdown("**Applicable:** " + ", ".join(f"`{e}`" for e in verdict["engines"]))
            if verdict["differences"]:
                st.dataframe(verdict["differences"][:200], hide_index=True, width="stretch")
else:
    st.caption("Pick two or more models to see whether they can be merged directly, need alignment, or only stitched.")
