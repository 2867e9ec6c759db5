"""Run folders: strict JSON, and what a failed command leaves behind."""

import json
import math

import numpy as np
import pytest
import torch

from experiments.app.runs import Manifest, failures_recorded, new_run_dir, write_json
from patchcore.config import Config


def strict(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_write_json_turns_non_finite_numbers_into_null(tmp_path):
    payload = {"auroc": math.nan, "inf": -math.inf, "np": np.float32("nan"), "ok": np.float64(0.5),
               "n": np.int64(3), "array": np.array([1.0, np.inf]), "tensor": torch.tensor([math.nan, 2.0]),
               "nested": [{"x": float("inf")}], "path": tmp_path}
    write_json(tmp_path / "m.json", payload)
    data = strict((tmp_path / "m.json").read_text())
    assert data == {"auroc": None, "inf": None, "np": None, "ok": 0.5, "n": 3, "array": [1.0, None],
                    "tensor": [None, 2.0], "nested": [{"x": None}], "path": str(tmp_path)}


def _fail(kind: str):
    return ("failed", f"error: {kind}")


def test_a_failed_run_with_results_keeps_them_and_its_manifest_says_why(tmp_path):
    with pytest.raises(RuntimeError), failures_recorded(lambda exc: _fail(str(exc))):
        run = new_run_dir(tmp_path, "fit")
        manifest = Manifest(run, Config(), "fit")
        manifest.write(status="running")
        (run / "banks").mkdir()
        (run / "banks" / "a.json").write_text("{}")
        raise RuntimeError("boom")
    data = strict((run / "manifest.json").read_text())
    assert data["status"] == "failed" and data["error"] == "error: boom" and "wall_s" in data
    assert (run / "banks" / "a.json").is_file()


def test_a_run_that_failed_before_any_work_is_removed_but_a_user_folder_stays(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    with pytest.raises(RuntimeError), failures_recorded(lambda exc: _fail("x")):
        ours = new_run_dir(tmp_path / "results", "fit")
        (ours / "banks" / "empty").mkdir(parents=True)  # empty sub-folders hold nothing
        Manifest(ours, Config(), "fit").write(status="running")
        Manifest(new_run_dir(tmp_path, "x", mine), Config(), "fit").write(status="running")
        raise RuntimeError
    assert not ours.exists() and mine.is_dir() and not any(mine.iterdir())


def test_a_complete_run_and_a_clean_exit_are_left_alone(tmp_path):
    with pytest.raises(RuntimeError), failures_recorded(lambda exc: _fail("x")):
        done = new_run_dir(tmp_path, "fit")
        Manifest(done, Config(), "fit").write(status="complete")
        raise RuntimeError
    assert strict((done / "manifest.json").read_text())["status"] == "complete"
    with pytest.raises(SystemExit), failures_recorded(lambda exc: None):  # None: not a failure
        running = new_run_dir(tmp_path, "fit")
        Manifest(running, Config(), "fit").write(status="running")
        raise SystemExit(0)
    assert strict((running / "manifest.json").read_text())["status"] == "running"
