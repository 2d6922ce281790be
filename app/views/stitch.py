"""Stitch: layer-by-layer similarity (CKA and friends) of two models, and a latent map fitted at a cut."""

from __future__ import annotations

import logging

import streamlit as st

from suture.app import plots, services, state, ui

ss = st.session_state
st.title("Stitch")
st.caption(
    "Compare two models' hidden layers on the same inputs, then fit a map from model A's features at a cut to "
    "model B's (latent translation, or relative representations) and see how well it carries over to held-out data."
)

metrics = services.metrics_catalogue()
translators = services.translators()

runnable = [r for r in ss[state.LIBRARY] if ui.model_kind(r) != "hub" and services.runnable(r)]
if len(runnable) < 1:
    st.info("Add a runnable model (a demo model, or a folder whose config.json names its architecture) on the Models page.")
    st.stop()

c1, c2 = st.columns(2)
default_b = 1 if len(runnable) > 1 else 0
ref_a = c1.selectbox("Model A", runnable, format_func=ui.model_label, key="stitch.a")
ref_b = c2.selectbox("Model B", runnable, index=default_b, format_func=ui.model_label, key="stitch.b")
with st.form("stitch.similarity.form", border=False):  # the options apply (and are checked) on the button only
    c3, c4, c5 = st.columns(3)
    data_spec = c3.text_input("Data (same inputs through both models)", value=ss.get(state.EVAL_DATA, state.DEFAULT_EVAL_DATA), key="stitch.data")
    samples = c4.slider("Samples", 64, 1000, 360, step=8, key="stitch.samples")
    metric = c5.selectbox("Similarity", list(metrics), key="stitch.metric", help="\n\n".join(f"**{k}**: {v}" for k, v in metrics.items()))
    compute = st.form_submit_button("Compute similarity", type="primary", key="stitch.compute")

if compute:
    try:
        data_spec = services.confine_data(data_spec, ui.workspace())
    except Exception as exc:  # a data file outside the workspace, or missing
        ui.error(exc)
    else:
        ss["stitch.similarity"] = {"ref_a": ref_a, "ref_b": ref_b, "data_spec": data_spec, "metric": metric, "max_items": samples}

request = ss.get("stitch.similarity")
if request:
    try:
        with st.spinner("Running both models on the data…"):
            result = services.similarity_matrix(**request)
    except Exception as exc:  # shown as one readable line, never a traceback
        ui.error(exc)
        result = None
    if result is not None:
        o1, o2 = st.columns(2)
        cmap = o1.selectbox("Colours", plots.COLORMAPS, key="stitch.cmap")
        annotate = o2.checkbox("Show values", value=True, key="stitch.annotate")
        direction = "higher = more similar" if result["higher_is_more_similar"] else "lower = more similar"
        st.pyplot(plots.heatmap(
            result["matrix"], result["rows"], result["cols"], cmap=cmap, annotate=annotate,
            title=f"{result['metric']} on {result['samples']} samples ({direction})", label=result["metric"],
            xlabel=f"B: {request['ref_b']}", ylabel=f"A: {request['ref_a']}",
        ), width="content")
        ss["stitch.layers"] = {"a": result["rows"], "b": result["cols"]}

layers = ss.get("stitch.layers")
st.subheader("Cut and map")
if not layers:
    st.caption("Compute the similarity first: the cut is chosen among the layers it lists.")
else:
    k1, k2, k3 = st.columns([1, 1, 2])

    def _b_follows_a() -> None:
        """Choosing cut A moves cut B to the matching layer (the same name, else the same depth); B stays editable."""
        ss["stitch.layer_b"] = services.matching_layer(ss["stitch.layer_a"], layers["a"], layers["b"])

    layer_a = k1.selectbox("Cut in A (features leaving)", layers["a"], key="stitch.layer_a", on_change=_b_follows_a)
    if ss.get("stitch.layer_b") not in layers["b"]:
        ss["stitch.layer_b"] = services.matching_layer(layer_a, layers["a"], layers["b"])
    layer_b = k2.selectbox("Cut in B (features entering)", layers["b"], key="stitch.layer_b")
    with k3.form("stitch.fit.form", border=False):  # method and anchors apply on the button only
        method = st.selectbox("Method", translators, key="stitch.method",
                              help="A latent translation estimator (Procrustes: orthogonal map), or 'relative': compare relative representations")
        anchors = st.slider("Anchors", 10, 500, 64, key="stitch.anchors")
        fit = st.form_submit_button("Fit the map", key="stitch.fit")
    if fit:
        try:
            with st.spinner("Fitting on anchors (train split), scoring on the test split…"):
                scores = services.stitch_fit(ref_a, layer_a, ref_b, layer_b, request["data_spec"] if request else data_spec, method, anchors)
        except Exception as exc:  # shown as one readable line, never a traceback
            ui.error(exc)
        else:
            ss["stitch.scores"] = {"method": method, "cut": f"{layer_a} → {layer_b}", **scores}
    if ss.get("stitch.scores"):
        st.dataframe([{"figure": k, "value": f"{v:.4g}" if isinstance(v, float) else str(v)} for k, v in ss["stitch.scores"].items()],
                     hide_index=True)


# ------------------------------------------------------------------------------------------------ run the stitch
st.subheader("Run the stitch")
from suture.recipes.stitch_section import METHODS as STITCH_METHODS  # noqa: E402 - a Streamlit page runs top to bottom

given = ss[state.RECIPE].get("stitch")


def _names(ref: str) -> list[str]:
    """A model's stage names (cut points), [] when they cannot be read here (shown as the pipeline's numbers then)."""
    try:
        return services.stage_names(ref, services.model_stamp(ref), ui.trusted())
    except Exception as exc:  # an unreadable model: the run itself reports why
        logging.getLogger(__name__).info("stage names of %s: %s", ref, exc)
        return []


if isinstance(given, dict):
    st.caption("From the current recipe's `stitch:` section (edit it on the Recipe page):")
    st.code(state.param_text(given), language="yaml")
    section = given
    run = st.button("Run the stitch", type="primary", key="stitch.run")
else:
    st.caption("A's layers up to the cut, a map fitted on anchors, then B's layers after its cut (or a head trained on B's "
               "features). A cut names the module whose output is carried over, as in the similarity above.")
    names_a = _names(ref_a) if services.demo_ready(ref_a) else []
    names_b = _names(ref_b) if services.demo_ready(ref_b) else []
    cut_a = cut_b = None
    if names_a and names_b:
        choices_a, choices_b = services.cut_choices(names_a), services.cut_choices(names_b)

        def _run_b_follows_a() -> None:
            """Choosing A's cut moves B's to the matching module (same name, else same depth); B stays editable."""
            ss["stitch.run.layer_b"] = services.matching_layer(ss["stitch.run.layer_a"], choices_a, choices_b)

        if ss.get("stitch.run.layer_a") not in choices_a:
            ss["stitch.run.layer_a"] = choices_a[-1]  # the penultimate representation: what a classifier head reads
        if ss.get("stitch.run.layer_b") not in choices_b:
            _run_b_follows_a()
        r1, r2 = st.columns(2)
        cut_a = r1.selectbox("Cut in A (features leaving)", choices_a, key="stitch.run.layer_a", on_change=_run_b_follows_a)
        cut_b = r2.selectbox("Cut in B (features entering)", choices_b, key="stitch.run.layer_b")
    else:
        st.caption("Cut: each model's penultimate layer (the list of layers appears once the demo models are trained).")
    from suture.app.forms import field_bounds, field_problem
    from suture.recipes.stitch_section import AnchorsSection, PlanSection

    # a form: the options take effect (and are checked) when the stitch is run, not at each keystroke
    with st.form("stitch.run.form", border=False):
        r3, r4 = st.columns(2)
        run_method = r3.selectbox("Stitch", list(STITCH_METHODS), index=list(STITCH_METHODS).index("procrustes")
                                  if "procrustes" in STITCH_METHODS else 0, key="stitch.run.method",
                                  help="relative: relative representations (Moschella et al., ICLR 2023); procrustes / linear / "
                                       "affine / ortho_linear / ot: latent translation; learned: a trained linear stitch")
        count, count_error = ui.number_field("Anchors", 256, integer=True, bounds=field_bounds(AnchorsSection, "count"),
                                             problem=lambda v: field_problem(AnchorsSection, "count", v), key="stitch.run.anchors",
                                             help="Parallel inputs the map is fitted on (train split)", where=r4)
        use_planner = st.checkbox("Also let the planner score every pair of hidden layers (CKA and stitched accuracy per cut)",
                                  key="stitch.run.plan")
        run = st.form_submit_button("Run the stitch", type="primary", key="stitch.run") and not count_error
    section = {
        "source": {"model": ref_a, **({"layer": names_a.index(cut_a) + 1} if cut_a is not None else {})},
        "target": {"model": ref_b, **({"layer": names_b.index(cut_b) + 1} if cut_b is not None else {})},
        "method": run_method,
        "anchors": {"count": int(count), "data": ss.get(state.EVAL_DATA, state.DEFAULT_EVAL_DATA)},
        "evaluate": {"data": ss.get(state.EVAL_DATA, state.DEFAULT_EVAL_DATA)},
    }
    if use_planner:
        planner_methods = PlanSection.model_fields["method"].annotation.__args__
        section["plan"] = {"method": run_method if run_method in planner_methods else "procrustes"}
if run:
    try:
        models = [section.get("source", {}).get("model"), section.get("target", {}).get("model")]
        ui.prepare_demo_models([m for m in models if isinstance(m, str)])
        job = services.start_stitch_job(section, ui.workspace(), trust_remote_code=ui.trusted())
    except Exception as exc:  # shown as one readable line, never a traceback
        ui.error(exc)
    else:  # a background job: it goes on while the user visits other pages, and Cancel kills its worker
        ss[ui.STITCH_JOB] = job.id
        ss.pop("stitch.run.result", None)
        st.rerun()  # the sidebar's Jobs panel lists it at once
job = ui.page_job(ui.STITCH_JOB, "stitch.job")
if job is not None:
    if job.state == "finished":
        if (ss.get("stitch.run.result") or {}).get("job") != job.id:
            ss["stitch.run.result"] = {**services.finished_stitch(job.out_dir, cached=job.cached), "job": job.id}
        st.status("Stitch reused from an earlier run" if job.cached else "Stitch finished", state="complete", expanded=False)
    else:  # failed or cancelled: the reason in full, where the user looks
        ss.pop("stitch.run.result", None)
        if job.state == "failed":
            st.status("Stitching failed", state="error", expanded=False)
            st.error(job.error or "The stitch failed.")
        else:
            st.warning(job.error or "Cancelled.")
done = ss.get("stitch.run.result")
if done and job is not None:
    report = done["report"]
    src, tgt = report["source"], report["target"]
    names_src, names_tgt = _names(src["model"]), _names(tgt["model"])
    st.success(f"Stitched {src['model']} (cut at {services.layer_name(names_src, src['layer'])}) into {tgt['model']} "
               f"(at {services.layer_name(names_tgt, tgt['layer'])}) with {report['method']}: {ui.workspace().relative(done['out_dir'])}")
    st.dataframe(services.stitch_result_rows(report), hide_index=True)
    similarity = report.get("similarity") or {}
    if similarity.get("matrix"):
        # drawn here rather than shown from similarity.png: module names and the orientation of the heatmap above
        st.pyplot(plots.heatmap(
            similarity["matrix"], [services.layer_name(names_src, i) for i in similarity["source_layers"]],
            [services.layer_name(names_tgt, j) for j in similarity["target_layers"]], label="linear CKA",
            title=f"linear CKA between the layers (cut: {services.layer_name(names_src, src['layer'])} → "
                  f"{services.layer_name(names_tgt, tgt['layer'])})", xlabel=f"B: {tgt['model']}", ylabel=f"A: {src['model']}",
        ), width="content")
    plan = report.get("plan")
    if isinstance(plan, dict) and plan.get("rows"):
        st.markdown(f"**Planner ({plan.get('method')})**: CKA and stitched accuracy per cut")
        if isinstance(plan.get("best"), dict):
            st.caption("Best cut (highest stitched accuracy, then CKA):")
            with st.container(key="stitch-best-cut"):
                st.dataframe([services.format_cut(plan["best"], names_src, names_tgt)], hide_index=True)
        st.dataframe([services.format_cut(row, names_src, names_tgt) for row in plan["rows"]], hide_index=True)
    for name in report.get("plots") or []:
        path = ui.workspace().resolve(done["out_dir"]) / name
        if path.is_file() and not (name == "similarity.png" and similarity.get("matrix")):
            st.image(str(path), caption=name)
