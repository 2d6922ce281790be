"""Results: every finished run in the workspace's outputs, named by what it is, and two or more side by side.

The figures come from each run's report.json (see suture.app.results); nothing is recomputed here.
"""

from __future__ import annotations

import streamlit as st

from suture.app import plots, results, ui

ws = ui.workspace()

st.title("Results")
runs = results.list_runs(ws)
if not runs:
    st.info("No finished run in the workspace yet: run one on the Align & merge or Stitch page, "
            "or with `suture run RECIPE WORKSPACE/outputs/NAME`.")
    st.stop()

st.caption(f"{len(runs)} run(s) in {ws.relative(ws.outputs)} (newest first). The loss barrier is the rise of the "
           "interpolation path's loss above the straight line between its endpoints (aligned path when the run "
           "aligned; |x| < 1e-6 is shown as 0).")
st.dataframe(results.overview_rows(runs), hide_index=True, width="stretch", key="results.overview")

labels = results.unique_labels(runs)
by_label = dict(zip(labels, runs))
compares = [label for label, r in by_label.items() if r.is_compare]
if compares:
    st.subheader("Method comparisons")
    shown = by_label[st.selectbox("Comparison", compares, key="results.compare_run",
                                  help="A `suture compare` output: every method's accuracy per task on the same fine-tunes.")]
    with st.container(key="results-compare-table"):
        st.markdown(shown.table)
    if shown.plot is not None:
        st.image(str(shown.plot))
chosen = st.multiselect("Compare runs", labels, key="results.compare", placeholder="Choose two or more runs",
                        help="Pick two or more runs to see their figures side by side and their interpolation curves in one plot.")
picked = [by_label[label] for label in chosen if label in by_label]
if len(picked) == 1:
    st.info("Choose at least one more run to compare.")
if len(picked) >= 2:
    st.subheader("Side by side")
    with st.container(key="results-table"):
        st.table(results.comparison_rows(picked))
    curves = results.overlaid_curves(picked)
    if curves:
        st.subheader("Interpolation curves")
        with st.container(key="results-curves"):
            st.pyplot(plots.interpolation(curves), clear_figure=False)
    else:
        st.caption("None of the chosen runs evaluated an interpolation path (it needs two models and `evaluate:`).")
