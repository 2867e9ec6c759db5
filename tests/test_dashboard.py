"""The dashboard: what `compare` keeps per image, the data functions, and the app driven by AppTest.

One small comparison run (2 factories, 64 px, local models on) is made here, once for the module:
the app is exercised on what `fedpatch compare` really writes.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from streamlit.testing.v1 import AppTest

from experiments.app.cli import main
from experiments.app.dashboard import data
from experiments.app.image_results import IMAGE_COLUMNS, patch_box

slow = pytest.mark.slow  # tests on the compare run (Ray start-up + 2-factory fits): ~40 s on 2 cores

APP = str(Path(__file__).resolve().parents[1] / "experiments" / "app" / "dashboard" / "app.py")
CATEGORIES = ["stripes", "disc"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """RESULTS/compare-small: a real `fedpatch compare` run on tiny synthetic factories."""
    tmp = tmp_path_factory.mktemp("dash")
    config = {
        "seed": 0, "device": "cpu", "output_dir": str(tmp / "results"),
        "data": {"format": "synthetic", "root": str(tmp / "syn"), "resize": 64, "crop": 64, "batch_size": 8,
                 "synthetic": {"categories": CATEGORIES, "size": 64, "n_train": 8, "n_test_good": 4,
                               "n_test_defect": 6}},
        "model": {"backbone": {"name": "efficientnet_lite0", "weights": "imagenet"}},
        "federation": {"num_factories": 2, "partition": "iid", "domain_shift": True, "local_only": True},
    }
    path = tmp / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp / "results" / "compare-small"
    assert main(["compare", "--config", str(path), "--quiet", "--out", str(out)]) == 0
    return out


def _images(run: Path) -> pd.DataFrame:
    return data.load_images(data.as_run(run))


# --- what compare keeps -----------------------------------------------------------------------

@slow
def test_compare_keeps_every_models_images_grids_and_local_banks(run):
    frame = _images(run)
    assert list(frame.columns[:len(IMAGE_COLUMNS)]) == list(IMAGE_COLUMNS)
    assert frame["id"].is_unique
    per_model = frame.groupby("model")["image"].apply(sorted)
    assert set(per_model.index) == {"centralized", "federated", "local"}
    assert per_model["centralized"] == per_model["federated"] == per_model["local"]  # same test images
    assert set(frame["factory"]) == {"factory-0", "factory-1"}
    assert (frame.loc[frame["label"] == 1, "mask"] != "").all() and (frame.loc[frame["label"] == 0, "mask"] == "").all()
    assert (frame["decision"] == np.where(frame["score"] > frame["threshold"], "reject", "accept")).all()
    # no validation split: the centralized and local banks calibrate on held-out training normals,
    # the federated bank on the scores its sites' held-out normals got (numbers, not images)
    sources = frame.groupby("model")["threshold_source"].apply(set)
    held, test_cut = "calibrated on held-out training normals (quantile)", "f1-max on the test set (optimistic)"
    assert sources["centralized"] == {held}
    assert sources["federated"] == {"calibrated on held-out training normals at the sites (quantile)"}
    assert sources["local"] == {held, test_cut}  # one held-out image a category: only its factory calibrates
    for factory in ("factory-0", "factory-1"):
        for category in CATEGORIES:
            assert (run / "local" / factory / "banks" / f"{category}.safetensors").is_file()
    for (model, category), rows in frame.groupby(["model", "category"]):
        with np.load(run / "maps" / model / f"{category}.npz") as grids:
            assert sorted(grids.files) == sorted(str(i) for i in rows["id"])
            for row in rows.itertuples():
                grid = grids[str(row.id)]
                assert grid.ndim == 2 and grid.shape[0] < 64
                assert np.isclose(grid.max(), row.score, rtol=1e-5)  # the image score is the max patch
                assert (row.box_x0, row.box_y0, row.box_x1, row.box_y1) == patch_box(grid, (64, 64))
    metrics = pd.read_csv(run / "factory_metrics.csv")
    assert len(metrics) == 3 * 2 * len(CATEGORIES)  # models x factories x categories
    local = json.loads((run / "results.json").read_text())["local"]
    row = metrics[(metrics["model"] == "local") & (metrics["factory"] == "factory-1") & (metrics["category"] == "disc")]
    assert np.isclose(row["image_auroc"].iloc[0], local["disc"]["factory-1"]["image_auroc"])


# --- data.py on hand-made folders -------------------------------------------------------------

def _fake_compare(folder: Path, started: str, status: str = "complete", results: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"kind": "compare", "status": status, "started_utc": started}))
    if results:
        (folder / "results.json").write_text("{}")
        (folder / "images.csv").write_text(",".join(IMAGE_COLUMNS) + "\n")
    return folder


def test_discover_runs_lists_finished_runs_newest_first_and_skips_half_written(tmp_path):
    _fake_compare(tmp_path / "compare-old", "2026-01-01T00:00:00+00:00")
    _fake_compare(tmp_path / "compare-new", "2026-02-01T00:00:00+00:00", status="interrupted")
    _fake_compare(tmp_path / "compare-running", "2026-03-01T00:00:00+00:00", status="running", results=False)
    (tmp_path / "compare-no-manifest").mkdir()
    (tmp_path / "compare-broken").mkdir()
    (tmp_path / "compare-broken" / "manifest.json").write_text('{"kind": "compa')  # cut off mid-write
    (tmp_path / "fit-unevaluated").mkdir()
    (tmp_path / "fit-unevaluated" / "manifest.json").write_text('{"kind": "fit", "status": "complete"}')
    runs = data.discover_runs(tmp_path)
    assert [r.path.name for r in runs] == ["compare-new", "compare-old"]
    assert runs[0].label == "compare-new (compare, interrupted)"
    assert [r.path.name for r in data.discover_runs(tmp_path / "compare-old")] == ["compare-old"]  # a run itself
    assert data.discover_runs(tmp_path / "absent") == []


def test_images_csv_parsing_and_filters(tmp_path):
    run = _fake_compare(tmp_path / "compare-x", "2026-01-01T00:00:00+00:00")
    rows = [[0, "disc", "factory-0", "local", "/a/good.png", 0, "good", "", 1.0, 2.5, "calibrated",
             "accept", 0, 0, 8, 8],
            [1, "disc", "factory-0", "local", "/a/cut.png", 1, "cut", "/a/cut_mask.png", 3.0, 2.5, "calibrated",
             "reject", 8, 0, 16, 8],
            [2, "disc", "factory-1", "local", "/b/cut.png", 1, "cut", "/b/m1.png;/b/m2.png", 2.0, 1.5, "calibrated",
             "reject", 0, 8, 8, 16]]
    pd.DataFrame(rows, columns=IMAGE_COLUMNS).to_csv(run / "images.csv", index=False)
    frame = data.load_images(data.as_run(run))
    assert frame.loc[0, "mask"] == "" and frame.loc[2, "mask"] == "/b/m1.png;/b/m2.png"
    assert frame["score"].dtype == float and frame["factory"].tolist() == ["factory-0", "factory-0", "factory-1"]
    selected = data.select(frame, "local", "disc")
    assert len(selected) == 3 and len(data.select(frame, "local", "disc", "factory-1")) == 1
    assert data.stored_thresholds(selected) == {"factory-0": 2.5, "factory-1": 1.5}
    assert data.default_threshold(selected) == 2.0  # the median of the factories' thresholds
    assert data.stored_thresholds(data.select(frame, "local", "disc", "factory-0")) == {"": 2.5}
    assert data.apply_filters(selected, 2.5, "reject")["id"].tolist() == [1]
    assert data.apply_filters(selected, 1.5, "reject")["id"].tolist() == [1, 2]  # re-decided at the threshold
    assert data.apply_filters(selected, 1.5, "all", ["good"])["id"].tolist() == [0]
    assert data.box_of(frame.loc[1]) == (8, 0, 16, 8)


def test_fit_run_reads_its_newest_evaluation(tmp_path):
    run = tmp_path / "fit-1"
    (run / "evaluation-a").mkdir(parents=True)
    (run / "manifest.json").write_text('{"kind": "fit", "status": "complete", "started_utc": "x"}')
    (run / "evaluation-a" / "scores.csv").write_text("category,image,defect,label,score,decision\n"
                                                     "tire,/t/1.png,good,0,1.0,PASS\ntire,/t/2.png,cut,1,5.0,FAIL\n")
    (run / "evaluation-a" / "metrics.json").write_text(json.dumps(
        {"tire": {"image_auroc": 1.0, "threshold": 3.0, "threshold_source": "quantile"}, "mean": {"image_auroc": 1.0}}))
    frame = data.load_images(data.as_run(run))
    assert frame["model"].unique().tolist() == [data.FIT_MODEL]
    assert frame["decision"].tolist() == ["accept", "reject"] and frame["threshold_source"].iloc[0] == "quantile"
    assert data.box_of(frame.iloc[0]) is None and not frame["has_grid"].any()


def test_patch_box_is_the_argmax_cell_in_input_pixels():
    grid = np.zeros((4, 4), np.float32)
    grid[2, 1] = 5.0
    assert patch_box(grid, (64, 64)) == (16, 32, 32, 48)  # x0, y0, x1, y1: 16-px cells
    grid = np.zeros((3, 3), np.float32)
    grid[2, 2] = 1.0
    assert patch_box(grid, (10, 10)) == (6, 6, 10, 10)  # uneven cells stay inside the image
    grid = np.zeros((2, 4), np.float32)
    grid[0, 3] = 1.0
    assert patch_box(grid, (20, 40)) == (30, 0, 40, 10)


def test_client_problems_say_none_or_name_the_client(tmp_path):
    run = _fake_compare(tmp_path / "compare-x", "t")
    (run / "results.json").write_text(json.dumps({"federation": {
        "failed": [{"factory": None, "node_id": 7, "reason": "boom"}], "missing": ["factory-2"],
        "refused": [{"factory": "factory-0", "node_id": 9, "reason": "factory-0 is bound to node 4"}],
        "rejected": [{"factory": "factory-1", "reason": "bad payload"}],
        "poisoning": {"tire": {"mode": "exclude", "reasons": {"3": "factory-3: 99th-percentile ... above"}}}}}))
    table = data.client_problems(data.as_run(run))
    assert table.values.tolist() == [["failed", "node 7", "node_id: 7; reason: boom"], ["missing", "factory-2", ""],
                                     ["refused", "factory-0", "node_id: 9; reason: factory-0 is bound to node 4"],
                                     ["rejected", "factory-1", "reason: bad payload"],
                                     ["poisoning flagged", "factory-3", "tire: 99th-percentile ... above"]]


def test_cli_dashboard_missing_folder_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["dashboard", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: results folder") and "\n" not in err


def test_cli_dashboard_runs_streamlit_headless_on_the_folder(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("subprocess.call", lambda cmd: calls.append(cmd) or 0)
    assert main(["dashboard", str(tmp_path), "--port", "8765"]) == 0
    cmd = calls[0]
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4].endswith("experiments/app/dashboard/app.py")
    assert cmd[cmd.index("--server.port") + 1] == "8765" and cmd[cmd.index("--server.headless") + 1] == "true"
    assert cmd[-2:] == ["--", str(tmp_path.resolve())]


# --- the app, driven by AppTest ---------------------------------------------------------------

@pytest.fixture
def app(run, monkeypatch) -> AppTest:
    monkeypatch.setattr(sys, "argv", ["app.py", str(run.parent)])  # as `streamlit run app.py -- RESULTS`
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert not at.exception, at.exception
    return at


def _table(at: AppTest) -> pd.DataFrame:
    return at.tabs[0].dataframe[0].value


def _count(node, kind: str) -> int:
    """How many elements of `kind` (e.g. "image": a matplotlib figure) sit under `node`."""
    children = getattr(node, "children", {}).values()
    return int(getattr(node, "type", "") == kind) + sum(_count(c, kind) for c in children)


def _metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


@slow
def test_app_filters_by_decision_threshold_and_defect(app, run):
    at = app
    assert at.sidebar.selectbox(key="run").value.path == run
    at.sidebar.selectbox(key="category").set_value("disc")
    at.sidebar.radio(key="model").set_value("centralized").run()
    expected = data.select(_images(run), "centralized", "disc")
    assert len(_table(at)) == len(expected)
    assert _metric(at, "image AUROC") != "n/a"
    slider = at.sidebar.slider[0]
    assert np.isclose(slider.value, expected["threshold"].iloc[0])  # starts at the stored threshold
    at.sidebar.radio(key="decision").set_value("reject").run()
    table = _table(at)
    assert (table["decision"] == "reject").all()
    assert sorted(table["id"]) == sorted(expected.loc[expected["decision"] == "reject", "id"])
    at.sidebar.slider[0].set_value(float(expected["score"].min()) - 1e-3).run()  # below every score
    assert len(_table(at)) == len(expected)  # everything is rejected now
    assert int(_metric(at, "good parts rejected")) == int((expected["label"] == 0).sum())
    at.sidebar.radio(key="decision").set_value("accept").run()
    assert _table(at).empty
    at.sidebar.radio(key="decision").set_value("all")
    at.sidebar.multiselect[0].set_value(["good"]).run()
    table = _table(at)
    assert len(table) == int((expected["defect"] == "good").sum()) and (table["defect"] == "good").all()


@slow
def test_app_image_view_shows_decision_heatmap_box_and_mask(app, run):
    at = app
    at.sidebar.radio(key="model").set_value("federated").run()
    category = at.sidebar.selectbox(key="category").value
    rows = data.select(_images(run), "federated", category)
    defect = rows[rows["label"] == 1].iloc[0]
    at.selectbox(key="inspect").set_value(int(defect["id"])).run()
    assert not at.exception
    assert _metric(at, "score") == f"{defect['score']:.1f}"
    assert _metric(at, "decision") == defect["decision"].upper()
    assert _metric(at, "truth") == "defective"
    caption = " ".join(c.value for c in at.caption)
    assert f"x {defect['box_x0']}–{defect['box_x1']}, y {defect['box_y0']}–{defect['box_y1']}" in caption
    assert "ground-truth mask:" in caption and "camera shift applied" in caption
    assert _count(at.tabs[0], "image") == 2  # the histogram and part | heatmap + box | mask
    mask_px = int(caption.split("ground-truth mask: ")[1].split(" px")[0])
    assert mask_px > 0
    # moving the threshold above the score re-decides the same image
    at.sidebar.slider[0].set_value(float(rows["score"].max()) + 1e-3).run()
    assert _metric(at, "decision") == "ACCEPT"
    assert _metric(at, "threshold") == f"{at.sidebar.slider[0].value:.1f}"


@slow
def test_app_federation_view_has_bars_uploads_and_clients(app, run):
    federation = app.tabs[1]
    headings = [h.value for h in federation.subheader]
    assert any(h.startswith("Per factory") for h in headings) and "Per category: all test images" in headings
    assert "Bytes uploaded per factory" in headings
    per_factory = federation.dataframe[0].value
    assert set(per_factory["model"]) == {"centralized", "federated", "local"}
    assert set(per_factory["factory"]) == {"factory-0", "factory-1"}
    uploads = federation.dataframe[1].value
    assert (uploads["bytes_sent"] > 0).all() and len(uploads) == 2
    clients = federation.table[0].value
    assert clients["client"].tolist() == ["none", "none", "none", "none", "none"]
    assert _count(federation, "image") == 5  # per-factory and per-category bars (x2 each), uploads
