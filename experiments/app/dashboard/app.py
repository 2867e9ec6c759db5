"""The fedpatch dashboard (Streamlit): inspect what a `fedpatch compare` or `fit` run decided.

    fedpatch dashboard [RESULTS_DIR]     # = python -m streamlit run experiments/app/dashboard/app.py -- RESULTS_DIR

Inspection tab: one model's scores on one category (optionally one factory's images), filtered by
decision and defect type at a threshold you can move; pick an image to see it as the model saw
it, its anomaly map redrawn from the stored patch grid, the ground truth and the most anomalous
patch. Federation tab: federated vs centralized vs local per factory and per category, bytes
uploaded, and the clients that failed, went missing or were rejected. Reading runs lives in
data.py, drawing in figures.py; this file only lays things out.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import streamlit as st

from experiments.app.dashboard import data, figures

MODEL_ORDER = ("federated", "centralized", "local", data.FIT_MODEL)
METRIC_NAMES = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO"}
TABLE_COLUMNS = ["id", "factory", "defect", "label", "score", "decision", "image"]


def default_results_dir() -> str:
    """The folder given after `--` on the streamlit command line, else $FEDPATCH_RESULTS, else results/."""
    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    return args[0] if args else os.environ.get("FEDPATCH_RESULTS", "results")


@st.cache_data(show_spinner=False)
def _images(run: data.Run, stamp: float) -> pd.DataFrame:
    return data.load_images(run)


@st.cache_resource(show_spinner=False)
def _config(run: data.Run):
    return data.load_run_config(run)


@st.cache_data(show_spinner=False)
def _colour_range(run: data.Run, model: str, category: str) -> tuple[float, float] | None:
    """One heatmap colour scale per (model, category), as the evaluation overlays use."""
    path = run.path / "maps" / model / f"{category}.npz"
    if not path.is_file():
        return None
    with np.load(path) as grids:
        values = np.concatenate([grids[k].ravel() for k in grids.files])
    return float(np.percentile(values, 1)), float(values.max())


def _show(fig: plt.Figure) -> None:
    st.pyplot(fig, clear_figure=True)
    plt.close(fig)


def sidebar(runs: list[data.Run]) -> dict:
    """The run, selection and filters the user picked."""
    side = st.sidebar
    run = side.selectbox("run (newest first)", runs, format_func=lambda r: r.label, key="run")
    stamp = (run.path / ("images.csv" if run.kind == "compare" else "manifest.json")).stat().st_mtime
    frame = _images(run, stamp)
    category = side.selectbox("category", sorted(frame["category"].unique()), key="category")
    models = [m for m in MODEL_ORDER if m in set(frame["model"])]
    model = side.radio("model", models, horizontal=True, key="model")
    owners = sorted(f for f in frame.loc[frame["category"] == category, "factory"].unique() if f)
    factory = side.selectbox("factory", ["all", *owners], key="factory") if owners else "all"
    rows = data.select(frame, model, category, factory)
    side.subheader("filters")
    decision = side.radio("decision", data.DECISIONS, horizontal=True, key="decision")
    stored = data.default_threshold(rows)
    scores = rows["score"].to_numpy(float)
    low, high = float(np.min(scores, initial=stored or 0.0)), float(np.max(scores, initial=stored or 1.0))
    pad = 0.05 * (high - low or 1.0)
    threshold = side.slider("score threshold", low - pad, high + pad, float(stored if stored is not None else high),
                            step=(high - low + 2 * pad) / 400, format="%.1f",
                            key=f"threshold|{run.path}|{model}|{category}|{factory}")
    defects = sorted(rows["defect"].unique())
    chosen = side.multiselect("defect types", defects, default=defects, key=f"defects|{model}|{category}|{factory}")
    return {"run": run, "frame": frame, "category": category, "model": model, "factory": factory, "rows": rows,
            "decision": decision, "stored": stored, "threshold": threshold, "defects": chosen}


def metric_row(s: dict) -> None:
    metrics = data.selection_metrics(s["run"], s["model"], s["category"], s["factory"])
    cols = st.columns(5)
    for col, key in zip(cols, data.METRICS):
        value = metrics.get(key)
        col.metric(METRIC_NAMES[key], "n/a" if value is None or not np.isfinite(value) else f"{value:.3f}")
    decided = data.decide(s["rows"]["score"].to_numpy(float), s["threshold"])
    labels = s["rows"]["label"].to_numpy(int)
    cols[3].metric("good parts rejected", int(((decided == "reject") & (labels == 0)).sum()))
    cols[4].metric("defects accepted", int(((decided == "accept") & (labels == 1)).sum()))
    thresholds = data.stored_thresholds(s["rows"])
    source = s["rows"]["threshold_source"].iloc[0] if len(s["rows"]) else "none"
    note = f"metrics: {metrics['source']}. Stored threshold: {source}"
    if len(thresholds) > 1:
        note += " — one per factory (" + ", ".join(f"{k}: {v:.4g}" for k, v in thresholds.items()) + \
            "); the slider starts at their median and applies one threshold to all"
    st.caption(note + ".")


def image_table(shown: pd.DataFrame) -> int | None:
    """The filtered images, most anomalous first; returns the id of the one picked to inspect."""
    table = shown.sort_values("score", ascending=False)
    table = table.assign(image=[Path(p).name for p in table["image"]])[TABLE_COLUMNS]
    st.dataframe(table, hide_index=True, height=260,
                 column_config={"score": st.column_config.NumberColumn(format="%.1f")})
    if table.empty:
        return None
    labels = {int(r.id): f"#{r.id} {r.factory or ''} {r.defect}/{r.image}: {r.score:.1f} → {r.decision}"
              for r in table.itertuples()}
    return st.selectbox("inspect image", list(labels), format_func=labels.get, key="inspect")


def image_view(s: dict, row: pd.Series) -> None:
    """One image: score, threshold, decision at the slider's threshold; part, heatmap, mask, box."""
    decision = str(data.decide(np.array([row["score"]]), s["threshold"])[0])
    cols = st.columns(4)
    cols[0].metric("score", f"{row['score']:.1f}")
    cols[1].metric("threshold", f"{s['threshold']:.1f}")
    cols[2].metric("decision", decision.upper())
    cols[3].metric("truth", "defective" if int(row["label"]) else "good")
    config = _config(s["run"])
    try:
        view = data.model_view(config, row)
    except Exception as exc:  # a moved or deleted image: say which, keep the rest of the page
        st.error(f"cannot read {row['image']}: {exc}")
        return
    size = view.image.shape[:2]
    grid = data.load_grid(s["run"], s["model"], s["category"], int(row["id"])) if row["has_grid"] else None
    amap = data.pixel_map(grid, size, config.model.smoothing_sigma) if grid is not None else None
    box = data.box_of(row)
    colours = _colour_range(s["run"], s["model"], s["category"])
    _show(figures.inspection(view.image, amap, view.mask, box, *(colours or (None, None))))
    notes = [f"image as the model saw it: {view.note}"]
    if box is not None:
        notes.append(f"most suspicious patch (lime box): x {box[0]}–{box[2]}, y {box[1]}–{box[3]} "
                     f"of the {size[1]}×{size[0]} model input")
    notes.append(f"ground-truth mask: {int(view.mask.sum())} px (white contour)" if view.mask is not None
                 else "ground-truth mask: none for this image")
    if grid is None:
        notes.append("heatmap: this run kept no patch grids")
    st.caption(" · ".join(notes))


def inspection_tab(s: dict) -> None:
    st.subheader(f"{s['model']} · {s['category']} · {'all factories' if s['factory'] == 'all' else s['factory']}")
    metric_row(s)
    shown = data.apply_filters(s["rows"], s["threshold"], s["decision"], s["defects"])
    left, right = st.columns([2, 3])
    with left:
        _show(figures.histogram(s["rows"]["score"].to_numpy(float), s["rows"]["label"].to_numpy(int),
                                s["threshold"], s["stored"]))
    with right:
        st.caption(f"{len(shown)} of {len(s['rows'])} images match the filters")
        picked = image_table(shown)
    if picked is not None:
        image_view(s, shown[shown["id"] == picked].iloc[0])


def federation_tab(s: dict) -> None:
    run = s["run"]
    if run.kind != "compare":
        st.info("a `fedpatch fit` run has no federation: run `fedpatch compare` to compare federated, "
                "centralized and local models")
        return
    per_factory = data.factory_metrics(run)
    per_factory = per_factory[per_factory["category"] == s["category"]]
    st.subheader(f"Per factory ({s['category']}): each model on the factory's own test images")
    cols = st.columns(2)
    for col, metric in zip(cols, ("image_auroc", "pixel_auroc")):
        with col:
            if per_factory.empty:
                st.info("no per-factory metrics in this run")
            else:
                _show(figures.grouped_bars(per_factory, "factory", "model", metric, METRIC_NAMES[metric], MODEL_ORDER))
    st.dataframe(per_factory, hide_index=True)
    st.subheader("Per category: all test images")
    per_category = data.category_metrics(run)
    cols = st.columns(2)
    for col, metric in zip(cols, ("image_auroc", "pixel_auroc")):
        with col:
            _show(figures.grouped_bars(per_category, "category", "model", metric, METRIC_NAMES[metric],
                                       ("federated", "centralized", "local (mean)")))
    uploads_and_clients(run)


def uploads_and_clients(run: data.Run) -> None:
    left, right = st.columns(2)
    with left:
        st.subheader("Bytes uploaded per factory")
        uploads = data.uploads(run)
        if uploads.empty:
            st.info("no uploads recorded")
        else:
            _show(figures.upload_bars(uploads))
            st.dataframe(uploads, hide_index=True)
    with right:
        st.subheader("Clients: failed, missing, refused, rejected")
        st.table(data.client_problems(run))


def main() -> None:
    st.set_page_config(page_title="fedpatch dashboard", layout="wide")
    st.title("fedpatch dashboard")
    results_dir = st.sidebar.text_input("results folder", default_results_dir(), key="results_dir")
    runs = data.discover_runs(results_dir)
    if not runs:
        st.warning(f"no finished `fedpatch compare` or `fit` runs in {results_dir!r} "
                   "(a run is listed once its results are written)")
        return
    selection = sidebar(runs)
    inspect, federation = st.tabs(["Inspection", "Federation"])
    with inspect:
        inspection_tab(selection)
    with federation:
        federation_tab(selection)


main()
