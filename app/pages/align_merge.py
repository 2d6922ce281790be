"""Align & merge: alignment engine, merge method and parameters, calibration data, device; run and results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st

from app import plots, services, state, ui
from merge.errors import SutureError

ss = st.session_state
recipe: dict[str, Any] = ss[state.RECIPE]
library: list[str] = ss[state.LIBRARY]
catalogue = services.methods()
NONE = "(none)"


def key(*parts: Any) -> str:
    return state.widget_key(ss, "am", *parts)


def param_widget(pdef: dict[str, Any], present: bool, current: Any, inherited: Any, wkey: str, label: str | None = None) -> Any:
    """One parameter's widget, typed by its default; structured values (gradients, filters) are typed as YAML."""
    name, default = pdef["name"], pdef["default"]
    shown = current if present else inherited if inherited is not None else state.SUGGESTED.get(name)
    help_text = pdef["help"] or None
    label = label or name + (" *" if pdef["required"] else "")
    if isinstance(default, bool) and isinstance(shown, bool):
        return st.checkbox(label, value=shown, help=help_text, key=wkey)
    if isinstance(shown, bool) or shown is None or isinstance(shown, (list, dict, str)):
        text = st.text_input(label, value=state.param_text(shown), help=(help_text or "") + " (YAML: a number, a gradient list, or filter conditions)", key=wkey)
        try:
            return state.parse_param_text(text)
        except SutureError as exc:
            ui.error(exc)
            return current
    if isinstance(shown, int) and isinstance(default, int) and not isinstance(default, bool):
        return int(st.number_input(label, value=int(shown), step=1, help=help_text, key=wkey))
    return float(st.number_input(label, value=float(shown), step=0.05, format="%g", help=help_text, key=wkey))


st.title("Align & merge")

# ------------------------------------------------------------------------------------------------ method
name = st.text_input("Recipe name", value=recipe.get("name", ""), key=key("name"))
methods = list(catalogue)
current_method = recipe.get("merge_method") if recipe.get("merge_method") in catalogue else methods[0]
left, right = st.columns([1, 1], gap="large")
with left:
    st.subheader("Merge method")
    method = st.selectbox("Method", methods, index=methods.index(current_method), key=key("method"))
    info = catalogue[method]
    st.caption(info["summary"])
    if info["paper"]:
        st.caption(f"Paper: {info['paper']}")
    base_options = [NONE] + library
    current_base = state.ref_text(recipe["base_model"]) if recipe.get("base_model") is not None else NONE
    if current_base not in base_options:
        base_options.append(current_base)
    base_help = "required by this method" if info["requires_base"] else "used by this method" if info["uses_base"] else "not used by this method"
    base = st.selectbox(f"Base model ({base_help})", base_options, index=base_options.index(current_base),
                        format_func=lambda r: r if r == NONE else ui.model_label(r), key=key("base"))
    base = None if base == NONE else base
    if recipe.get("slices"):
        models = None
        st.info("This recipe stacks layer ranges (`slices`); edit them on the Recipe page.")
        st.code(state.param_text(recipe["slices"]), language="yaml")
    else:
        current_models = [state.ref_text(e["model"]) for e in recipe.get("models") or []]
        options = library + [r for r in current_models if r not in library]
        models = st.multiselect("Models to merge", options, default=current_models, format_func=ui.short_label, key=key("models"))

    st.subheader("Alignment")
    engine_rows = services.engines()
    by_name = {e["name"]: e for e in engine_rows}
    current_alignment = recipe.get("alignment") or {}
    current_engine = current_alignment.get("engine", NONE)
    engine_names = [NONE] + [e["name"] for e in engine_rows]
    if current_engine not in engine_names:
        engine_names.append(current_engine)

    def engine_label(n: str) -> str:
        if n == NONE:
            return "none (merge tensors by name)"
        e = by_name.get(n)
        if e is None:
            return f"{n} (unknown engine)"
        return e["title"] + ("" if e["available"] else f" — {services.NOT_AVAILABLE}")

    engine = st.selectbox("Engine", engine_names, index=engine_names.index(current_engine), format_func=engine_label, key=key("engine"))
    chosen_engine = by_name.get(engine)
    alignment_settings: dict[str, Any] = {}
    if chosen_engine is not None:
        if chosen_engine["papers"]:
            st.caption("Paper: " + "; ".join(chosen_engine["papers"]))
        if not chosen_engine["available"]:
            st.warning(chosen_engine["reason"].capitalize() + ".")
        defaults = services.alignment_defaults()
        a1, a2, a3 = st.columns(3)
        given = current_alignment if current_alignment.get("engine") == engine else {}
        if "max_iter" in defaults:
            value = int(a1.number_input("Max iterations", min_value=1, value=int(given.get("max_iter", defaults["max_iter"])), step=1,
                                        key=key("align", "max_iter")))
            alignment_settings["max_iter"] = (value, defaults["max_iter"])
        if "seed" in defaults:
            value = int(a2.number_input("Seed", value=int(given.get("seed", defaults["seed"])), step=1, key=key("align", "seed")))
            alignment_settings["seed"] = (value, defaults["seed"])
        if "repair" in defaults:
            repairs = ["none", "reset_bn", "repair"]
            current_repair = given.get("repair", defaults["repair"])
            value = a3.selectbox("After merging", repairs, index=repairs.index(current_repair) if current_repair in repairs else 0,
                                 key=key("align", "repair"), help="reset BatchNorm statistics on the data, or REPAIR (rescale channels)")
            alignment_settings["repair"] = (value, defaults["repair"])
    data_default = current_alignment.get("data") or (recipe.get("evaluate") or {}).get("data") or ss.get(state.EVAL_DATA, state.DEFAULT_EVAL_DATA)
    data_spec = st.text_input("Calibration / evaluation data", value=str(data_default), key=key("data"),
                              help="sklearn:digits (bundled), sklearn:digits?classes=0-4, or a .safetensors/.npz/.txt file in the workspace")
    try:
        data_spec = services.confine_data(data_spec, ui.workspace())
    except Exception as exc:  # a data file outside the workspace, or missing
        ui.error(exc)
        data_spec = ss.get(state.EVAL_DATA, state.DEFAULT_EVAL_DATA)
    ss[state.EVAL_DATA] = data_spec
    want_eval = st.checkbox("Evaluate: inputs, merge, interpolation paths and barriers in the report (recipe `evaluate:` section)",
                            value=bool(recipe.get("evaluate")), key=key("evaluate"))
    dtypes = [NONE, "float32", "float16", "bfloat16", "float64"]
    current_dtype = recipe.get("dtype") or NONE
    dtype = st.selectbox("Compute dtype", dtypes, index=dtypes.index(current_dtype) if current_dtype in dtypes else 0, key=key("dtype"))

with right:
    st.subheader("Parameters")
    given_global = recipe.get("parameters") or {}
    global_values: dict[str, Any] = {}
    for p in info["global"]:
        value = param_widget(p, p["name"] in given_global, given_global.get(p["name"]), p["default"], key("gp", method, p["name"]))
        write, value = state.keep_or_set(given_global, p["name"], value, p["default"])
        if write:
            global_values[p["name"]] = value
    model_values: dict[str, dict[str, Any]] = {}
    if models and info["model"]:
        entries = {state.ref_text(e["model"]): e for e in recipe.get("models") or []}
        feed = [m for m in models if not (info["uses_base"] and m == base)]
        for ref in feed:
            given = (entries.get(ref) or {}).get("parameters") or {}
            with st.expander(ui.model_label(ref), expanded=len(feed) <= 3):
                values = {}
                for p in info["model"]:
                    inherited = given_global.get(p["name"], p["default"])
                    value = param_widget(p, p["name"] in given, given.get(p["name"]), inherited, key("mp", method, ref, p["name"]))
                    write, value = state.keep_or_set(given, p["name"], value, inherited)
                    if write:
                        values[p["name"]] = value
                model_values[ref] = values
    if not info["global"] and not info["model"]:
        st.caption("This method has no parameters.")

alignment = None
if engine != NONE:
    alignment = dict(current_alignment) if current_alignment.get("engine") == engine else {}
    alignment["engine"] = engine
    for setting, (value, default) in alignment_settings.items():
        write, value = state.keep_or_set(alignment, setting, value, default)
        if write:
            alignment[setting] = value
    needs_data = (chosen_engine is not None and chosen_engine["needs_data"]) or alignment.get("repair", "none") != "none"
    if needs_data or "data" in alignment:
        alignment["data"] = data_spec
evaluate = None
if want_eval:
    evaluate = dict(recipe.get("evaluate") or {})
    evaluate["data"] = data_spec

edited = state.edit_recipe(
    recipe, method=method, base=base, models=models, global_params=global_values, model_params=model_values,
    known_params=[p["name"] for p in info["global"] + info["model"]], name=name.strip() or None,
    dtype=None if dtype == NONE else dtype, alignment=alignment, evaluate=evaluate,
)
valid, problem = state.validate(edited)
ss[state.RECIPE] = valid if valid is not None else edited

# ------------------------------------------------------------------------------------------------ run
st.divider()
ui.run_panel(ss[state.RECIPE], "am")

# ------------------------------------------------------------------------------------------------ results
last = ss.get(state.LAST_RUN)
if last and Path(last["out_dir"]).is_dir():
    report = last["report"]
    out_dir = Path(last["out_dir"])
    ws = ui.workspace()
    st.subheader("Result")
    st.success(
        f"Merged {report.get('tensors', 0)} tensors with {report.get('merge_method')} into {ws.relative(out_dir)}"
        + (" (reused: this recipe was run before)" if last.get("cached") else "")
    )
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("Tensors", report.get("tensors", 0))
    m2.metric("Written", f"{report.get('bytes_written', 0) / 1e6:,.2f} MB")
    m3.metric("Time", f"{report.get('seconds_total', 0):.2f} s")
    m4.metric("Device", str(report.get("device", "?")))
    with st.expander("Files and report"):
        st.write(", ".join(f"`{f}`" for f in last["files"]))
        st.json(report, expanded=False)

    objective = services.alignment_objective(report)
    if objective:
        st.markdown("**Alignment objective per iteration**")
        st.pyplot(plots.objective(objective), width="content")
    rows = services.evaluation_rows(report)
    curves = services.interpolation_curves(report)
    barriers = services.barrier_rows(report)
    if rows:
        section = services.evaluation_section(report)
        st.markdown(f"**Evaluation on {section.get('data')} ({section.get('split')} split, {section.get('items')} items)**")
        st.dataframe([{k: v for k, v in r.items() if k != "merged"} for r in rows], hide_index=True)
    if barriers:
        st.dataframe(barriers, hide_index=True)
    if curves:
        shown = st.multiselect("Interpolation curves to plot", ["loss", "accuracy"], default=["loss", "accuracy"], key="am.curve_metrics")
        if shown:
            st.pyplot(plots.interpolation(curves, shown), width="content")
    elif (out_dir / "interpolation.png").is_file():
        st.image(str(out_dir / "interpolation.png"), caption="interpolation.png")

    inputs = report.get("models") or []
    local_inputs = inputs and all(ui.model_kind(r) != "hub" for r in inputs)
    if not rows and local_inputs and services.runnable(str(out_dir)) and all(services.runnable(r) for r in inputs):
        st.markdown("**Test accuracy of the inputs and the merge**")
        eval_spec = st.text_input("Evaluate on", value=ss.get(state.EVAL_DATA, state.DEFAULT_EVAL_DATA), key="am.eval_data")
        try:
            eval_spec = services.confine_data(eval_spec, ws)
            rows = [{"model": r, **services.evaluate(r, eval_spec, services.model_stamp(r))} for r in inputs]
            rows.append({"model": "merged", "merged": True, **services.evaluate(str(out_dir), eval_spec, last["out_dir"])})
        except Exception as exc:  # shown as one readable line, never a traceback
            ui.error(exc)
            rows = []
        else:
            st.dataframe([{k: v for k, v in r.items() if k != "merged"} for r in rows], hide_index=True)
    if rows:
        metric = st.radio("Plot", ["accuracy", "loss"], horizontal=True, key="am.eval_metric")
        st.pyplot(plots.scores(rows, metric), width="content")
