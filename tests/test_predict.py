"""`fedpatch predict` and the scorer it shares with the inspection API: distinct overlay names,
one colour scale per bank, accept/reject words, the results table, honest overlay titles."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from experiments.app import plots
from experiments.app.cli import main
from experiments.app.predict import THRESHOLD_SPAN, BankScorer, ColorScale, Inspection, overlay_names
from patchcore.errors import BankFormatError
from patchcore.memory_bank import MemoryBank
from tests.test_cli import TINY, write_config


def _with_metadata(bank_path: Path, folder: Path, drop: tuple[str, ...] = (), **metadata) -> Path:
    """A copy of the bank with metadata added or dropped (saved anew, so its checksum is right)."""
    bank = MemoryBank.load(bank_path)
    for key in drop:
        bank.metadata.pop(key, None)
    bank.metadata.update(metadata)
    return bank.save(folder / "disc")[0]


@pytest.fixture(scope="module")
def bank(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny synthetic bank fitted by `fedpatch fit`, stripped of any threshold and display range
    (whatever `fit` stores), and its test images' folder."""
    tmp = tmp_path_factory.mktemp("predict")
    assert main(["fit", "--config", str(write_config(tmp, TINY)), "--quiet", "--out", str(tmp / "run")]) == 0
    plain = _with_metadata(tmp / "run" / "banks" / "disc.safetensors", tmp / "plain",
                           drop=("threshold", "display_range"))
    return plain, tmp / "synthetic" / "disc" / "test"


def _scorer(threshold: float | None, display: ColorScale | None = None) -> BankScorer:
    return BankScorer(model=None, bank=None, preprocess=None, category="disc", threshold=threshold, display=display)


def test_overlay_names_are_distinct_for_same_named_inputs(tmp_path):
    assert overlay_names([tmp_path / "a" / "000.png", tmp_path / "b" / "000.png"]) == ["a__000.png", "b__000.png"]
    assert overlay_names([tmp_path / "a" / "000.png"]) == ["000.png"]  # one image: its own name
    assert overlay_names([Path("x/a/1.png"), Path("x/b/c/1.png")]) == ["a__1.png", "b__c__1.png"]
    assert (overlay_names([tmp_path / "p.jpg", tmp_path / "p.png", tmp_path / "p.jpg"])
            == ["p.png", "p-2.png", "p-3.png"])


def test_predict_writes_one_overlay_per_input_and_a_results_table(bank, tmp_path, capsys):
    bank_path, test_root = bank
    source = sorted(test_root.glob("*/*.png"))[:2]
    inputs = []
    for folder, image in zip(("line-a", "line-b"), source):  # same file name, different parts
        target = tmp_path / "in" / folder / "000.png"
        target.parent.mkdir(parents=True)
        inputs.append(shutil.copy(image, target))
    out = tmp_path / "pred"
    args = ["predict", *map(str, inputs), "--bank", str(bank_path), "--threshold", "1.0", "--out", str(out),
            "--device", "cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "reject" in printed and "FAIL" not in printed and str(out / "results.csv") in printed
    assert sorted(p.name for p in out.glob("*.png")) == ["line-a__000.png", "line-b__000.png"]
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["image"] for r in rows] == [str(p) for p in inputs]
    assert [r["decision"] for r in rows] == ["reject", "reject"]  # squared-L2 scores of real features >> 1.0
    assert {Path(r["overlay"]).name for r in rows} == {"line-a__000.png", "line-b__000.png"}
    assert all(float(r["threshold"]) == 1.0 and float(r["score"]) > 1.0 for r in rows)
    stored = json.loads((out / "results.json").read_text())
    assert stored["category"] == "disc" and [r["overlay"] for r in stored["images"]] == [r["overlay"] for r in rows]
    assert {r["color_scale"] for r in stored["images"]} == {"threshold"}


def test_uncalibrated_predict_says_uncalibrated(bank, tmp_path, capsys):
    bank_path, test_root = bank
    image = sorted(test_root.glob("*/*.png"))[0]
    assert main(["predict", str(image), "--bank", str(bank_path), "--out", str(tmp_path / "p"), "--device", "cpu"]) == 0
    assert "uncalibrated" in capsys.readouterr().out
    row = json.loads((tmp_path / "p" / "results.json").read_text())["images"][0]
    assert row["decision"] == "uncalibrated" and row["threshold"] is None and row["color_scale"] == "image"


def test_every_overlay_of_a_bank_uses_its_display_range(bank, tmp_path, monkeypatch, capsys):
    bank_path, test_root = bank
    ranged = _with_metadata(bank_path, tmp_path / "bank", display_range={"vmin": 0.5, "vmax": 40.0})
    drawn = []
    monkeypatch.setattr(plots, "overlay", lambda *a: drawn.append(a) or a[3])
    images = [str(p) for p in sorted(test_root.glob("*/*.png"))[:3]]
    assert main(["predict", *images, "--bank", str(ranged), "--out", str(tmp_path / "p"), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert [call[5:7] for call in drawn] == [(0.5, 40.0)] * 3  # vmin, vmax: the same for every image
    assert BankScorer.load(ranged, device="cpu").display == ColorScale(0.5, 40.0, "bank")


@pytest.mark.parametrize("display_range",
                         [{"vmin": 3.0, "vmax": 1.0}, {"vmin": 0.0}, [0, 1], {"vmin": 0, "vmax": float("nan")}])
def test_unusable_display_range_is_a_one_line_bank_error(bank, tmp_path, display_range):
    bad = _with_metadata(bank[0], tmp_path / "bad", display_range=display_range)
    with pytest.raises(BankFormatError, match="display_range") as caught:
        BankScorer.load(bad, device="cpu")
    assert str(bad) in str(caught.value) and "\n" not in str(caught.value)


def test_color_scale_falls_back_to_the_threshold_then_to_the_image(bank, tmp_path):
    amap = np.linspace(2.0, 10.0, 64, dtype=np.float32).reshape(8, 8)
    result = Inspection(np.zeros((8, 8, 3), np.float32), 10.0, amap, amap)
    stored = ColorScale(1.0, 9.0, "bank")
    assert _scorer(4.0, stored).color_scale(result) == stored
    calibrated = BankScorer.load(_with_metadata(bank[0], tmp_path, threshold={
        "value": 4.0, "method": "quantile", "details": {}}), device="cpu")
    assert calibrated.color_scale(result) == ColorScale(0.0, THRESHOLD_SPAN * 4.0, "threshold")
    per_image = _scorer(None).color_scale(result)
    assert per_image.source == "image" and per_image.vmax == 10.0
    assert per_image.vmin == pytest.approx(np.percentile(amap, 1))


def test_decisions_are_accept_reject_or_uncalibrated():
    assert [_scorer(2.0).decide(s) for s in (1.0, 2.0, 2.5)] == ["accept", "accept", "reject"]
    assert _scorer(None).decide(99.0) == "uncalibrated"


@pytest.mark.parametrize("with_mask, threshold, title", [
    (False, None, "anomaly map"), (True, None, "anomaly map (white: ground truth)"),
    (False, 0.5, "anomaly map (magenta: threshold)"), (False, 5.0, "anomaly map"),  # no contour above the map
])
def test_overlay_title_names_only_what_is_drawn(tmp_path, monkeypatch, with_mask, threshold, title):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    amap = np.linspace(0.0, 1.0, 256, dtype=np.float32).reshape(16, 16)
    mask = (amap > 0.8) if with_mask else None
    plots.overlay(np.zeros((16, 16, 3), np.float32), amap, mask, tmp_path / "o.png", "t", 0.0, 1.0, threshold)
    assert figures[0].axes[1].get_title() == title


def test_a_missing_image_is_one_line_before_any_bank_or_folder(tmp_path, capsys):
    missing = tmp_path / "line-a" / "000.png"
    assert main(["predict", str(missing), "--bank", str(tmp_path / "no-bank.safetensors"),
                 "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: image not found: {missing}" and not (tmp_path / "p").exists()
