"""Align & merge: alignment engine, merge method and parameters, calibration data, device; run and results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st

from suture.app import plots, services, state, ui
from suture.merge.errors import SutureError

ss = st.session_state
recipe: dict[str, Any] = ss[state.RECIPE]
library: list[str] = ss[state.LIBRARY]
catalogue = services.methods()
NONE = "(none)"
field_errors: list[str] = []  # labels of the numeric fields whose typed value is out of range (Run stays off)


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
    integer = isinstance(shown, int) and isinstance(default, int) and not isinstance(default, bool)
    value, error = ui.number_field(label, shown, integer=integer, bounds=pdef["bounds"], key=wkey, help=help_text,
                                   problem=lambda v: services.method_value_problem(method, name, v))
    if error:
        field_errors.append(label)
        return current  # the recipe keeps its last good value; the field shows what was typed, with the error
    return value


def option_widget(opt: dict[str, Any], shown: Any, wkey: str, where: Any = st) -> Any:
    """One alignment option's widget, typed by the option's kind; returns the value (None for an empty text)."""
    label, help_text = opt["label"], opt["help"] or None
    if opt["kind"] == "bool":
        return where.checkbox(label, value=bool(shown), help=help_text, key=wkey)
    if opt["kind"] == "choice":
        choices = list(opt["choices"])
        if shown not in choices:
            choices.append(shown)
        return where.selectbox(label, choices, index=choices.index(shown), help=help_text, key=wkey)
    if opt["kind"] in ("int", "float"):
        value, error = ui.number_field(label, shown, integer=opt["kind"] == "int", bounds=opt["bounds"], key=wkey, help=help_text,
                                       step=opt["step"], where=where,
                                       problem=lambda v: services.engine_value_problem(engine, opt["name"], v))
        if error:
            field_errors.append(label)
            return shown  # the recipe keeps its last good value; the field shows what was typed, with the error
        return value
    text = where.text_input(label, value=state.param_text(shown) if opt["kind"] == "yaml" else (shown or ""), help=help_text, key=wkey)
    if opt["kind"] == "yaml":
        try:
            return state.parse_param_text(text)
        except SutureError as exc:
            ui.error(exc)
            return shown
    return text.strip() or None


st.title("Align & merge")
if recipe.get("stitch") is not None:
    st.info("The current recipe stitches two models (its `stitch:` section): run it on the Stitch page, or load a merge "
            "recipe (Models or Recipe page) to align and merge here.")
    st.page_link("views/stitch.py", label="Go to Stitch", icon=":material/link:")
    st.stop()
name = st.text_input("Recipe name", value=recipe.get("name", ""), key=key("name"))
left, right = st.columns([1, 1], gap="large")

# ------------------------------------------------------------------------------------------------ models & alignment
with left:
    st.subheader("Models")
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
    current_engine = current_alignment.get("engine", NONE) if recipe.get("alignment") is not None else NONE
    engine_names = [NONE] + [e["name"] for e in engine_rows]
    if current_engine not in engine_names:
        engine_names.append(current_engine)

    def engine_label(n: str) -> str:
        if n == NONE:
            return "none (merge tensors by name)"
        e = by_name.get(n)
        return e["title"] if e is not None else f"{n} (unknown engine)"

    engine = st.selectbox("Engine", engine_names, index=engine_names.index(current_engine), format_func=engine_label, key=key("engine"),
                          help="Git Re-Basin permutes one model's hidden units onto the other's; OTFusion transports them "
                               "(soft, across widths too); ZipIt! merges features within and across models.")
    chosen_engine = by_name.get(engine)
    option_values: dict[str, tuple[Any, Any]] = {}
    if engine == current_engine:
        alignment_base = dict(current_alignment)
    else:
        # switching engines: keep the shared settings (data, reference, ...), drop the old engine's own options
        own = {o["name"] for o in services.engine_options(engine)} if engine != NONE else set()
        common = services.common_alignment_keys()
        alignment_base = {k: v for k, v in current_alignment.items() if k in common or k in own}
    if chosen_engine is not None:
        if chosen_engine["papers"]:
            st.caption("Paper: " + "; ".join(chosen_engine["papers"]))
        specs = services.engine_options(engine)
        seen: dict[str, Any] = {}
        # a form: typing in a field reruns nothing until "Apply" (then every field is checked at once)
        with st.form(key("align-form"), border=False):
            columns = st.columns(3)
            shown_count = 0
            for opt in specs:
                shown = alignment_base.get(opt["name"], opt["default"])
                seen[opt["name"]] = shown
                depends = opt["depends"]
                if depends and seen.get(depends[0]) != depends[1]:
                    continue  # e.g. Sinkhorn's settings while the exact solver is chosen: kept as written, not shown
                value = option_widget(opt, shown, key("align", engine, opt["name"]), columns[shown_count % 3])
                seen[opt["name"]] = value
                option_values[opt["name"]] = (value, opt["default"])
                shown_count += 1
            st.form_submit_button("Apply alignment options", key=key("align-apply"))
    data_default = current_alignment.get("data") or (recipe.get("evaluate") or {}).get("data") or ss.get(state.EVAL_DATA, state.DEFAULT_EVAL_DATA)
    data_spec = st.text_input("Calibration / evaluation data", value=str(data_default), key=key("data"),
                              help="sklearn:digits (bundled), sklearn:digits?classes=0-4, or a .safetensors/.npz/.txt file in the workspace")
    try:
        data_spec = services.confine_data(data_spec, ui.workspace())
    except Exception as exc:  # a data file outside the workspace, or missing
        ui.error(exc)
        data_spec = ss.get(state.EVAL_DATA, state.DEFAULT_EVAL_DATA)
    ss[state.EVAL_DATA] = data_spec
    eval_help = ("joint accuracy, baselines (naive averaging, permutation), the ensemble and the stop-layer sweep"
                 if chosen_engine is not None and chosen_engine["builds_model"] else "inputs, merge, interpolation paths (naive vs aligned) and barriers")
    want_eval = st.checkbox(f"Evaluate: {eval_help} in the report (recipe `evaluate:` section)",
                            value=bool(recipe.get("evaluate")), key=key("evaluate"))

# ------------------------------------------------------------------------------------------------ method & parameters
builds_model = chosen_engine is not None and chosen_engine["builds_model"]
with right:
    st.subheader("Merge method")
    if builds_model:
        st.info("ZipIt! builds the merged model itself from the models' features (merge and unmerge matrices per layer): "
                "no merge method applies. With `heads: concat` each task keeps its own output head.")
        method = recipe.get("merge_method")
        info = catalogue.get(method) if method else None
        base = state.ref_text(recipe["base_model"]) if recipe.get("base_model") is not None else None
        dtype = recipe.get("dtype")
        given_params = [recipe.get("parameters") or {}] + [e.get("parameters") or {} for e in recipe.get("models") or []]
        known = sorted({p for params in given_params for p in params})
        global_values: dict[str, Any] = {}
        model_values: dict[str, dict[str, Any]] = {}
    else:
        methods = list(catalogue)
        current_method = recipe.get("merge_method") if recipe.get("merge_method") in catalogue else "linear" if "linear" in catalogue else methods[0]
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
        dtypes = [NONE, "float32", "float16", "bfloat16", "float64"]
        current_dtype = recipe.get("dtype") or NONE
        dtype = st.selectbox("Compute dtype", dtypes, index=dtypes.index(current_dtype) if current_dtype in dtypes else 0, key=key("dtype"))
        dtype = None if dtype == NONE else dtype

        st.subheader("Parameters")
        given_global = recipe.get("parameters") or {}
        global_values = {}
        model_values = {}
        if not info["global"] and not info["model"]:
            st.caption("This method has no parameters.")
        else:
            # a form: typing in a field reruns nothing until "Apply" (then every field is checked at once)
            with st.form(key("params-form"), border=False):
                for p in info["global"]:
                    value = param_widget(p, p["name"] in given_global, given_global.get(p["name"]), p["default"], key("gp", method, p["name"]))
                    write, value = state.keep_or_set(given_global, p["name"], value, p["default"])
                    if write:
                        global_values[p["name"]] = value
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
                st.form_submit_button("Apply parameters", key=key("params-apply"))
        known = [p["name"] for p in info["global"] + info["model"]]

alignment = None
if engine != NONE:
    alignment = alignment_base
    alignment["engine"] = engine
    for setting, (value, default) in option_values.items():
        write, value = state.keep_or_set(alignment, setting, value, default)
        if write:
            alignment[setting] = value
        else:
            alignment.pop(setting, None)
    needs_data = (chosen_engine is not None and chosen_engine["needs_data"]) or alignment.get("repair", "none") != "none"
    if needs_data or "data" in alignment:
        alignment["data"] = data_spec
evaluate = None
if want_eval:
    evaluate = dict(recipe.get("evaluate") or {})
    evaluate["data"] = data_spec

edited = state.edit_recipe(
    recipe, method=method, base=base, models=models, global_params=global_values, model_params=model_values,
    known_params=known, name=name.strip() or None, dtype=dtype, alignment=alignment, evaluate=evaluate,
)
valid, problem = state.validate(edited)
ss[state.RECIPE] = valid if valid is not None else edited

# ------------------------------------------------------------------------------------------------ run
st.divider()
ui.run_panel(ss[state.RECIPE], "am", blocked=(
    f"Out of range: {', '.join(field_errors)}; fix the fields marked above (the recipe keeps their last valid values)."
    if field_errors else None))

# ------------------------------------------------------------------------------------------------ results
last = ss.get(state.LAST_RUN)
if last and Path(last["out_dir"]).is_dir():
    report = last["report"]
    out_dir = Path(last["out_dir"])
    ws = ui.workspace()
    ran_engine = (report.get("alignment") or {}).get("engine")
    ran_outcome = (by_name.get(ran_engine) or {}).get("outcome")
    st.subheader("Result")
    reused = " (reused: this recipe was run before)" if last.get("cached") else ""
    if ran_outcome == "built":
        st.success(f"Zipped {len(report.get('models') or [])} models with ZipIt! into {ws.relative(out_dir)}{reused}")
    else:
        st.success(f"Merged {report.get('tensors', 0)} tensors with {report.get('merge_method')} into {ws.relative(out_dir)}{reused}")
    m1, m2, m3, m4 = st.columns(4)
    if ran_outcome == "built":
        m1.metric("Zipped groups", len((report.get("alignment") or {}).get("zipped_groups") or []))
        m2.metric("Kept per model", len((report.get("alignment") or {}).get("branch_groups") or []))
    else:
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
        st.columns(2)[0].pyplot(plots.objective(objective), width="stretch")
    transport = services.transport_rows(report)
    if transport:
        st.markdown("**Optimal transport per group** (cost and entropy of each plan; exact plans between equal widths are permutations)")
        st.dataframe(transport, hide_index=True)

    if ran_outcome in ("permuted", "transported") and not (report.get("alignment") or {}).get("fused"):
        kind = "transport plan" if ran_outcome == "transported" else "permutation"
        with st.expander(f"Alignment matrix of a group ({kind})"):
            st.caption("Recomputed from the recipe's models with the same settings (cached): rows are the reference's units, "
                       "columns the other model's; a permutation has one mark per row.")
            if st.checkbox(f"Show the {kind}", key="am.show_matrix"):
                recipe_file = out_dir / "suture_recipe.yml"
                try:
                    text = recipe_file.read_text(encoding="utf-8") if recipe_file.is_file() else state.recipe_yaml(ss[state.RECIPE])
                    with st.spinner("Recomputing the alignment…"):
                        matrices = services.alignment_matrices(text, "cpu", last["out_dir"])
                except Exception as exc:  # shown as one readable line, never a traceback
                    ui.error(exc)
                else:
                    group = st.selectbox("Group", list(matrices["groups"]), key="am.matrix_group")
                    values = matrices["groups"][group]
                    st.pyplot(plots.matrix(values, kind=matrices["kind"], xlabel=f"{ui.short_label(matrices['model'])} units",
                                           ylabel=f"{ui.short_label(matrices['reference'])} units",
                                           title=f"{group}: {values.shape[0]} × {values.shape[1]} {matrices['kind']}"), width="content")

    if ran_outcome == "built":
        joint = services.zipit_rows(report)
        groups_table = services.zip_group_rows(report)
        if groups_table:
            st.markdown("**Zipped groups** (merges within each model, mean similarity of the matched features)")
            st.dataframe(groups_table, hide_index=True)
        if joint:
            section = services.evaluation_section(report)
            st.markdown(f"**Joint accuracy on {section.get('data')} ({section.get('split')} split, {section.get('items')} items)**: "
                        "the output's per-task logits concatenated, beside naive averaging, the permutation baseline and the ensemble")
            st.dataframe([{k: v for k, v in r.items() if k != "merged"} for r in joint], hide_index=True)
            sweep = services.stop_sweep_rows(report)
            if sweep:
                st.markdown("**Partial zipping: joint accuracy by the layer zipping stops at**")
                st.dataframe(sweep, hide_index=True)
                with st.container(key="stop-sweep-plot"):
                    st.pyplot(plots.stop_sweep(sweep, section["ensemble"].get("accuracy"), section.get("baselines")), width="content")
            st.pyplot(plots.scores(joint, "accuracy"), width="content")
        elif (out_dir / "stop_sweep.png").is_file():
            st.image(str(out_dir / "stop_sweep.png"), caption="stop_sweep.png")
    else:
        rows = services.evaluation_rows(report)
        curves = services.interpolation_curves(report)
        barriers = services.barrier_rows(report)
        if rows:
            section = services.evaluation_section(report)
            st.markdown(f"**Evaluation on {section.get('data')} ({section.get('split')} split, {section.get('items')} items)**")
            st.dataframe([{k: v for k, v in r.items() if k != "merged"} for r in rows], hide_index=True)
        if curves:
            st.markdown("**Interpolation barrier: naive vs aligned** (loss and accuracy along the straight path between the two "
                        "models; a barrier is the bump above the endpoints' line)" if "aligned" in curves else "**Interpolation paths**")
            if barriers:
                st.dataframe(barriers, hide_index=True)
            shown = st.multiselect("Interpolation curves to plot", ["loss", "accuracy"], default=["loss", "accuracy"], key="am.curve_metrics")
            if shown:
                with st.container(key="barrier-plot"):
                    st.pyplot(plots.interpolation(curves, shown), width="content")
        elif barriers:
            st.dataframe(barriers, hide_index=True)
        elif (out_dir / "interpolation.png").is_file():
            st.image(str(out_dir / "interpolation.png"), caption="interpolation.png")

        inputs = report.get("models") or []
        local_inputs = inputs and all(ui.model_kind(r) != "hub" for r in inputs)
        if not rows and local_inputs and services.runnable(str(out_dir)) and all(services.runnable(r) for r in inputs):
            st.markdown("**Test accuracy of the inputs and the merge**")
            eval_spec = st.text_input("Evaluate on", value=ss.get(state.EVAL_DATA, state.DEFAULT_EVAL_DATA), key="am.eval_data")
            try:
                eval_spec = services.confine_data(eval_spec, ws)
                trust = ui.trusted()
                rows = [{"model": r, **services.evaluate(r, eval_spec, services.model_stamp(r), trust)} for r in inputs]
                rows.append({"model": "merged", "merged": True, **services.evaluate(str(out_dir), eval_spec, last["out_dir"], trust)})
            except Exception as exc:  # shown as one readable line, never a traceback
                ui.error(exc)
                rows = []
            else:
                st.dataframe([{k: v for k, v in r.items() if k != "merged"} for r in rows], hide_index=True)
        if rows:
            metric = st.radio("Plot", ["accuracy", "loss"], horizontal=True, key="am.eval_metric")
            # local models are labelled relative to the workspace: full paths would squeeze the bars out of the figure
            labelled = [{**r, "model": r["model"] if r.get("merged") else ui.short_label(r["model"])} for r in rows]
            st.pyplot(plots.scores(labelled, metric), width="content")
