"""Stitch: layer-by-layer similarity (CKA and friends) of two models, and a latent map fitted at a cut."""

from __future__ import annotations

import streamlit as st

from app import plots, services, state, ui

ss = st.session_state
st.title("Stitch")
st.caption(
    "Compare two models' hidden layers on the same inputs, then fit a map from model A's features at a cut to "
    "model B's (latent translation, or relative representations) and see how well it carries over to held-out data."
)

try:
    metrics = services.metrics_catalogue()
    translators = services.translators()
except ImportError:
    st.warning(f"Stitching is {services.NOT_AVAILABLE}.")
    st.stop()

runnable = [r for r in ss[state.LIBRARY] if ui.model_kind(r) != "hub" and services.runnable(r)]
if len(runnable) < 1:
    st.info("Add a runnable model (a demo model, or a folder whose config.json names its architecture) on the Models page.")
    st.stop()

c1, c2 = st.columns(2)
default_b = 1 if len(runnable) > 1 else 0
ref_a = c1.selectbox("Model A", runnable, format_func=ui.model_label, key="stitch.a")
ref_b = c2.selectbox("Model B", runnable, index=default_b, format_func=ui.model_label, key="stitch.b")
c3, c4, c5 = st.columns(3)
data_spec = c3.text_input("Data (same inputs through both models)", value=ss.get(state.EVAL_DATA, state.DEFAULT_EVAL_DATA), key="stitch.data")
samples = c4.slider("Samples", 64, 1000, 360, step=8, key="stitch.samples")
metric = c5.selectbox("Similarity", list(metrics), key="stitch.metric", help="\n\n".join(f"**{k}**: {v}" for k, v in metrics.items()))

if st.button("Compute similarity", type="primary", key="stitch.compute"):
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
    k1, k2, k3, k4 = st.columns(4)
    layer_a = k1.selectbox("Cut in A (features leaving)", layers["a"], key="stitch.layer_a")
    layer_b = k2.selectbox("Cut in B (features entering)", layers["b"], index=min(layers["a"].index(layer_a), len(layers["b"]) - 1)
                           if layer_a in layers["a"] else 0, key="stitch.layer_b")
    method = k3.selectbox("Method", translators, key="stitch.method",
                          help="A latent translation estimator (Procrustes: orthogonal map), or 'relative': compare relative representations")
    anchors = k4.slider("Anchors", 10, 500, 64, key="stitch.anchors")
    if st.button("Fit the map", key="stitch.fit"):
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
    st.info(f"Running a stitched model end to end (A up to the cut, the map, then B) is {services.NOT_AVAILABLE}.")
