"""experiments/bench/fidelity_official.py: its comparison helpers on hand-computed arrays, and its
one-line refusals. Nothing here needs the official code."""

import subprocess
import sys

import numpy as np
import pytest

from experiments.bench import fidelity_official as bench

REPO = bench.REPO


def test_pearson_and_relative_difference_by_hand():
    assert bench.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert bench.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # deviations (-1.5, -.5, .5, 1.5) and (-1.5, .5, -.5, 1.5): 4 / (sqrt(5) sqrt(5))
    assert bench.pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert bench.pearson([2, 2], [2, 2]) == 1.0
    assert np.isnan(bench.pearson([2, 2], [1, 3]))
    assert bench.max_relative_difference([1.1, 2.0], [1.0, 2.0]) == pytest.approx(0.1)
    assert bench.max_relative_difference([3.0, 4.0], [3.0, 5.0]) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        bench.pearson([1, 2], [1, 2, 3])


def test_official_binarisation_keeps_only_exact_ones():
    masks = np.array([0.0, 0.5, 0.999, 1.0], dtype=np.float32)
    assert bench.official_binarise(masks).tolist() == [False, False, False, True]


def test_align_matches_paths_and_refuses_different_lists():
    assert bench.align(["/d/a.png", "/d/b.png"], ["/d/b.png", "/d/a.png"]).tolist() == [1, 0]
    with pytest.raises(ValueError):
        bench.align(["/d/a.png"], ["/d/c.png"])


def _scored_pair():
    maps = np.array([[[0.1, 0.2], [0.3, 0.4]], [[0.5, 0.9], [0.35, 0.8]]], dtype=np.float32)
    fed = {"scores": np.array([1.0, 2.0]), "labels": np.array([0, 1]), "maps": maps,
           "masks": np.array([[[0, 0], [0, 0]], [[0, 1], [1, 1]]], dtype=bool)}
    off = {"scores": np.array([1.0, 2.2]), "labels": np.array([0, 1]), "maps": maps.copy(),
           "masks": np.array([[[0, 0], [0, 0]], [[0.6, 1.0], [0.4, 1.0]]], dtype=np.float32)}
    return fed, off


def test_compare_on_hand_computed_maps():
    fed, off = _scored_pair()
    c = bench.compare(fed, off)
    assert c["score_max_rel_diff"] == pytest.approx(0.2 / 2.2)
    assert c["map_pearson"] == pytest.approx(1.0) and c["map_max_abs_diff_over_range"] == 0.0
    assert c["image_auroc_fedpatch"] == c["image_auroc_official"] == 1.0
    # nearest-exact mask: positives 0.9, 0.35, 0.8 against 0.1 0.2 0.3 0.4 0.5 -> 5 + 3 + 5 of 15 pairs
    assert c["pixel_auroc_fedpatch_nearest"] == pytest.approx(13 / 15)
    assert c["pixel_auroc_official_nearest"] == pytest.approx(13 / 15)
    # astype(int): only the two 1.0 pixels (0.9, 0.8) are defective, and they top every other pixel
    assert c["pixel_auroc_fedpatch_astype_int"] == pytest.approx(1.0)
    counts = bench.mask_counts(fed["masks"], off["masks"])
    assert counts == {"nearest_exact": 3, "astype_int": 2, "bilinear_gt_0.5": 3, "bilinear_gt_0": 4,
                      "nearest_vs_bilinear_gt_0.5_disagree": 2}


def test_compare_refuses_differently_labelled_sets():
    fed, off = _scored_pair()
    off["labels"] = np.array([1, 0])
    with pytest.raises(ValueError):
        bench.compare(fed, off)


def test_markdown_tables_show_every_row():
    fed, off = _scored_pair()
    report = {"comparisons": [{"category": "toy", "coreset": "off", "official_backbone": "BN restored",
                               "bank_fedpatch": 4, "bank_official": 4, "metrics": bench.compare(fed, off)}],
              "aupro": [{"category": "toy", "coreset": "off", "maps": "fedpatch", "fedpatch": 0.5, "anomalib": 0.5}],
              "masks": {"toy": bench.mask_counts(fed["masks"], off["masks"])}}
    md = bench.markdown_tables(report)
    assert "| toy | off | BN restored | 4 / 4 | - |" in md
    assert "| toy | off | fedpatch | 0.500000 | 0.500000 | 0.000000 |" in md
    assert "| toy | 3 | 2 | 3 | 4 | 2 |" in md


def test_cli_refuses_a_folder_without_src_patchcore_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match="src/patchcore"):
        bench.main(["--official", str(tmp_path), "--official-python", sys.executable])
    proc = subprocess.run([sys.executable, "-m", "experiments.bench.fidelity_official", "--official", str(tmp_path),
                           "--official-python", sys.executable], capture_output=True, text=True, cwd=REPO,
                          check=False)
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1 and "src/patchcore" in proc.stderr


def test_cli_refuses_a_missing_official_python_in_one_line(tmp_path):
    (tmp_path / "src" / "patchcore").mkdir(parents=True)
    (tmp_path / "src" / "patchcore" / "patchcore.py").write_text("")
    with pytest.raises(SystemExit, match="--official-python .* is not an executable python"):
        bench.main(["--official", str(tmp_path), "--official-python", str(tmp_path / "nope")])


def test_official_driver_refuses_a_folder_without_src_patchcore(tmp_path):
    proc = subprocess.run([sys.executable, str(bench.DRIVER), "--official", str(tmp_path), "--data-root", str(tmp_path),
                           "--category", "x", "--weights", "w.pt", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1 and "src/patchcore" in proc.stderr


def test_discordant_pairs_are_the_pairs_ordered_differently_ties_included():
    labels = [1, 1, 0]
    assert bench.discordant_pairs([1.0, 2.0, 1.5], [1.6, 2.0, 1.5], labels) == [(0, 2)]
    assert bench.discordant_pairs([1.0, 2.0, 1.5], [1.5, 2.0, 1.5], labels) == [(0, 2)]  # a tie is its own order
    assert bench.discordant_pairs([1.0, 2.0, 1.5], [1.1, 2.5, 1.4], labels) == []


def test_check_discordant_says_which_side_float64_agrees_with():
    fed = {"paths": np.array(["/a", "/b", "/c"]), "labels": np.array([1, 1, 0]), "scores": np.array([1.0, 2.0, 1.5])}
    off = {"scores": np.array([1.6, 2.0, 1.5])}
    d = bench.check_discordant(fed, off, {"/a": 1.55, "/b": 2.0, "/c": 1.5})
    assert d["num_pairs"] == 1 and d["num_positive_x_negative"] == 2
    assert d["pairs"][0]["agrees_with_float64"] == ["official"] and d["pairs"][0]["float64"] == [1.55, 1.5]


def test_saved_pieces_keep_the_ratio_in_their_name_and_round_trip(tmp_path):
    for name, value in (("0.1", 1.0), ("0.2", 2.0), ("off", 3.0)):
        bench._save_piece(bench.piece_path(tmp_path, "tire", name), {"scores": np.array([value])}, {"bank": int(value)})
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["tire_0.1.npz", "tire_0.2.npz", "tire_off.npz"]
    piece = bench._load_piece(bench.piece_path(tmp_path, "tire", "0.2"))
    assert piece["scores"].tolist() == [2.0] and piece["bank"] == 2
    assert bench._load_piece(bench.piece_path(tmp_path, "tire", "0.3")) is None


def test_markdown_shows_the_float64_aurocs_of_both_sides():
    fed, off = _scored_pair()
    metrics = {**bench.compare(fed, off), "score_max_rel_err_fedpatch_vs_own_float64": 1e-7,
               "score_max_rel_err_official_vs_own_float64": 2e-4, "float64_scores_max_rel_diff": 3e-6,
               "float64_scores_pearson": 1.0, "image_auroc_fedpatch_float64": 0.59,
               "image_auroc_official_float64": 0.59}
    report = {"comparisons": [{"category": "toy", "coreset": "off", "official_backbone": "BN restored",
                               "bank_fedpatch": 4, "bank_official": 4, "fedpatch_nn": "faiss", "metrics": metrics}]}
    md = bench.markdown_tables(report)
    assert "| toy | off | faiss | 1.00e-07 | 2.00e-04 | 3.00e-06 |" in md
    assert "| 0.5900 / 0.5900 |" in md


def test_cli_refuses_a_missing_weights_file_in_one_line(tmp_path):
    (tmp_path / "src" / "patchcore").mkdir(parents=True)
    (tmp_path / "src" / "patchcore" / "patchcore.py").write_text("")
    with pytest.raises(SystemExit, match="--weights .*nope.pt not found"):
        bench.main(["--official", str(tmp_path), "--official-python", sys.executable, "--anomalib-python", "",
                    "--weights", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # refused before anything was written
