"""Recipe: the workbench state as YAML — view, download, upload or edit, dry-run and run."""

from __future__ import annotations

import yaml

import streamlit as st

from suture.app import services, state, ui

ss = st.session_state
ws = ui.workspace()
recipe = ss[state.RECIPE]

st.title("Recipe")
st.caption(
    "Everything the other pages set is this recipe. Download it and run it anywhere with "
    "`suture run recipe.yaml OUT_DIR`; it gives the same tensors as a run here."
)

notice = ss.pop(state.NOTICE, None)
if notice:
    st.success(notice)

valid, problem = state.validate(recipe)
if valid is not None:
    text = state.recipe_yaml(valid)
    st.code(text, language="yaml")
    st.download_button("Download recipe", data=state.recipe_payload(valid), file_name=state.download_name(valid),
                       mime="application/x-yaml", key="recipe.download")
else:
    text = yaml.safe_dump(recipe, sort_keys=False)
    st.code(text, language="yaml")
    st.error(problem)

st.subheader("Load a recipe")
ui.examples_picker("recipe")
c1, c2 = st.columns(2)
with c1:
    uploaded = st.file_uploader("Upload a recipe (YAML; mergekit recipes work too)", type=["yaml", "yml"],
                                key=state.widget_key(ss, "recipe.upload"))
    if uploaded is not None and st.button("Use the uploaded recipe", key="recipe.use_upload"):
        try:
            loaded = state.import_recipe(ss, uploaded.getvalue(), ws)
        except Exception as exc:  # shown as one readable line, never a traceback
            ui.error(exc)
        else:
            ss[state.NOTICE] = f"Loaded {uploaded.name}: {loaded.get('merge_method')} of {len(state.referenced_refs(loaded))} model(s)."
            st.rerun()
with c2:
    edited = st.text_area("Or edit the YAML", value=text, height=260, key=state.widget_key(ss, "recipe.text"))
    if st.button("Apply the edited YAML", key="recipe.apply"):
        try:
            state.import_recipe(ss, edited, ws)
        except Exception as exc:  # shown as one readable line, never a traceback
            ui.error(exc)
        else:
            ss[state.NOTICE] = "Applied the edited recipe."
            st.rerun()

st.subheader("Plan")
if st.button("Show the plan (dry run: no tensor is computed)", key="recipe.plan", disabled=valid is None):
    from suture.recipes.runner import dry_run

    try:
        services.check_recipe_paths(valid, ws)
        plan = dry_run({k: v for k, v in valid.items() if k != "publish"})
    except Exception as exc:  # shown as one readable line, never a traceback
        ui.error(exc)
    else:
        st.caption(f"{len(plan['tensors'])} tensors · method {plan['merge_method']} · layers {plan['layers']}")
        st.dataframe(plan["tensors"], hide_index=True)

st.subheader("Run")
ui.run_panel(ss[state.RECIPE], "recipe")
last = ss.get(state.LAST_RUN)
if last:
    st.success(f"Merged {last['report'].get('tensors', 0)} tensors into {ws.relative(last['out_dir'])}. See Align & merge for results.")
