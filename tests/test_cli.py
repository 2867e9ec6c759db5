"""The command line end to end on tiny synthetic data: outputs, one-line errors, determinism."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from experiments.app.cli import main
from patchcore.errors import DataError

TINY = {
    "seed": 0,
    "device": "cpu",
    "data": {"format": "synthetic", "resize": 64, "crop": 64, "batch_size": 8,
             "synthetic": {"categories": ["disc"], "size": 64, "n_train": 6, "n_test_good": 3, "n_test_defect": 4}},
    "model": {"backbone": {"name": "efficientnet_lite0", "layers": ["layer2", "layer3"], "weights": "imagenet"}},
}


def write_config(tmp_path: Path, config: dict, name: str = "c.yaml") -> Path:
    cfg = json.loads(json.dumps(config))
    cfg.setdefault("output_dir", str(tmp_path / "results"))
    if cfg["data"]["format"] == "synthetic":
        cfg["data"].setdefault("root", str(tmp_path / "synthetic"))
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    config = write_config(tmp, TINY)
    assert main(["fit", "--config", str(config), "--quiet", "--out", str(tmp / "run")]) == 0
    return tmp, config, tmp / "run"


def test_fit_writes_bank_config_and_manifest(fitted):
    _, _, run = fitted
    bank_json = json.loads((run / "banks" / "disc.json").read_text())
    # 6 train images, no validation split: threshold.holdout 0.1 holds ceil(0.6) = 1 out for the
    # threshold; 5 x (64/8)^2 = 64 patches -> 320 patches -> 10% = 32, Lite0's 40 + 112 channels
    assert bank_json["shape"] == [32, 152]
    meta = bank_json["metadata"]
    assert meta["num_patches"] == 320 and meta["category"] == "disc" and meta["num_train_images"] == 5
    threshold = meta["threshold"]
    assert threshold["method"] == "quantile" and threshold["details"]["source"] == "held-out training normals"
    assert threshold["details"]["num_normal"] == 1
    assert meta["display_range"]["vmin"] <= threshold["value"] < meta["display_range"]["vmax"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["versions"]["torch"] != "absent"
    assert "commit" in manifest["git"] and manifest["config"]["model"]["backbone"]["name"] == "efficientnet_lite0"
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["crop"] == 64


def test_evaluate_writes_metrics_plots_and_overlays(fitted, capsys):
    _, _, run = fitted
    code, out, _ = run_cli(["evaluate", "--run", run, "--quiet", "--out", run / "eval", "--overlays", "2"], capsys)
    assert code == 0 and "image_auroc" in out
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["disc"]["num_images"] == 7 and 0.0 <= metrics["disc"]["image_auroc"] <= 1.0
    for name in ("metrics.csv", "scores.csv", "roc.png", "manifest.json", "histograms/disc.png"):
        assert (run / "eval" / name).is_file(), name
    assert len(list((run / "eval" / "overlays" / "disc").glob("*.png"))) == 2
    rows = (run / "eval" / "scores.csv").read_text().splitlines()
    assert len(rows) == 8 and rows[0].startswith("category,image,defect,label,score,decision")


def test_predict_prints_score_threshold_decision_and_overlay(fitted, capsys, tmp_path):
    tmp, _, run = fitted
    image = next((tmp / "synthetic" / "disc" / "test").glob("*/*.png"))
    code, out, _ = run_cli(["predict", image, "--bank", run / "banks" / "disc.safetensors", "--threshold", "1.0",
                            "--out", tmp_path / "pred", "--device", "cpu"], capsys)
    assert code == 0 and "reject" in out  # squared-L2 scores of real features are far above 1.0
    assert (tmp_path / "pred" / f"{image.stem}.png").is_file()


def test_same_seed_twice_gives_identical_bank_bytes_and_scores(fitted, capsys):
    tmp, config, run = fitted
    code, _, _ = run_cli(["fit", "--config", config, "--quiet", "--out", tmp / "run2"], capsys)
    assert code == 0
    assert ((run / "banks" / "disc.safetensors").read_bytes()
            == (tmp / "run2" / "banks" / "disc.safetensors").read_bytes())
    for name in ("e1", "e2"):
        assert main(["evaluate", "--run", str(run), "--quiet", "--overlays", "0", "--out", str(tmp / name)]) == 0
    capsys.readouterr()
    assert (tmp / "e1" / "scores.csv").read_text() == (tmp / "e2" / "scores.csv").read_text()


def test_existing_output_is_never_overwritten(fitted, capsys):
    _, config, run = fitted
    before = (run / "banks" / "disc.safetensors").read_bytes()
    code, _, err = run_cli(["fit", "--config", config, "--quiet", "--out", run], capsys)
    assert code == 2 and "already holds files" in err and str(run) in err
    assert (run / "banks" / "disc.safetensors").read_bytes() == before


def _one_line_error(code: int, err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("patch, expected", [
    ({"model": {"backbone": {"name": "vgg16"}}}, "model.backbone.name: must be one of"),
    ({"model": {"coreset": {"ratio": 1.5}}}, "model.coreset.ratio"),
    ({"model": {"coreset": {"ratio": 0}}}, "model.coreset.ratio"),
    ({"model": {"corset": {}}}, "model.corset: unknown key"),
    ({"data": {"format": "mvtec", "root": "/nonexistent/mvtec"}}, "/nonexistent/mvtec"),
])
def test_bad_config_is_one_line_and_writes_nothing(tmp_path, capsys, patch, expected):
    cfg = json.loads(json.dumps(TINY))
    for section, values in patch.items():
        cfg[section] = {**cfg[section], **values}
    config = write_config(tmp_path, cfg)
    code, _, err = run_cli(["fit", "--config", config, "--quiet"], capsys)
    assert expected in _one_line_error(code, err)
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


def test_corrupt_image_in_dataset_is_one_line_naming_the_file(tmp_path, capsys):
    root = tmp_path / "mv"
    for sub in ("train/good", "test/good"):
        (root / "cat" / sub).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((64, 64, 3), 100 + i, np.uint8)).save(root / "cat" / sub / f"{i}.png")
    bad = root / "cat" / "train" / "good" / "1.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    cfg = {**TINY, "data": {**TINY["data"], "format": "mvtec", "root": str(root)}}
    code, _, err = run_cli(["fit", "--config", write_config(tmp_path, cfg), "--quiet"], capsys)
    assert str(bad) in _one_line_error(code, err)


def test_console_script_exit_code_and_stderr(tmp_path):
    cfg = {**TINY, "model": {"backbone": {"name": "nope"}}}
    exe = Path(sys.executable).with_name("fedpatch")
    result = subprocess.run([str(exe), "fit", "--config", str(write_config(tmp_path, cfg))],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: model.backbone.name: must be one of")
    assert len(result.stderr.strip().splitlines()) == 1


def _break_missing_mask(cat: Path) -> Path:
    target = cat / "ground_truth" / "crack" / "001_mask.png"
    target.unlink()
    return cat / "test" / "crack" / "001.png"  # the image whose mask is missing


def _break_mask_size(cat: Path) -> Path:
    from tests.test_data_loaders import save_png

    return save_png(cat / "ground_truth" / "dent" / "000_mask.png", size=(20, 20), value=0, mode="L")


def _break_layout(cat: Path) -> Path:
    import shutil

    shutil.rmtree(cat / "train")
    return cat / "train" / "good"


def _break_empty(cat: Path) -> Path:
    for f in (cat / "train" / "good").iterdir():
        f.unlink()
    return cat / "train" / "good"


def _break_corrupt(cat: Path) -> Path:
    bad = cat / "test" / "good" / "000.png"
    bad.write_bytes(b"this is not a png")
    return bad


@pytest.mark.parametrize("breaker", [_break_missing_mask, _break_layout, _break_empty])
def test_bad_dataset_is_one_line_naming_the_file_and_writes_nothing(tmp_path, capsys, breaker):
    from tests.test_data_loaders import make_mvtec_tree

    root = make_mvtec_tree(tmp_path / "mv")
    named = breaker(root / "widget")
    cfg = {**TINY, "data": {**TINY["data"], "format": "mvtec", "root": str(root), "resize": 32, "crop": 32}}
    code, _, err = run_cli(["fit", "--config", write_config(tmp_path, cfg), "--quiet"], capsys)
    assert str(named) in _one_line_error(code, err)
    results = tmp_path / "results"
    assert not results.exists() or not any(results.rglob("*.safetensors"))


@pytest.mark.parametrize("breaker", [_break_mask_size, _break_corrupt])
def test_bad_test_image_fails_evaluate_in_one_line_and_keeps_the_bank(tmp_path, capsys, breaker):
    """Test images are read by `evaluate`, not `fit`: the error comes there, the bank survives."""
    from tests.test_data_loaders import make_mvtec_tree

    root = make_mvtec_tree(tmp_path / "mv")
    cfg = {**TINY, "data": {**TINY["data"], "format": "mvtec", "root": str(root), "resize": 32, "crop": 32}}
    config = write_config(tmp_path, cfg)
    assert run_cli(["fit", "--config", config, "--quiet", "--out", tmp_path / "run"], capsys)[0] == 0
    bank = (tmp_path / "run" / "banks" / "widget.safetensors").read_bytes()
    named = breaker(root / "widget")
    code, _, err = run_cli(["evaluate", "--run", tmp_path / "run", "--quiet"], capsys)
    assert str(named) in _one_line_error(code, err)
    assert (tmp_path / "run" / "banks" / "widget.safetensors").read_bytes() == bank


def test_missing_data_root_via_flag_is_one_line(tmp_path, capsys):
    cfg = {**TINY, "data": {**TINY["data"], "format": "mvtec", "root": str(tmp_path)}}
    code, _, err = run_cli(["fit", "--config", write_config(tmp_path, cfg), "--data-root", tmp_path / "gone"], capsys)
    assert str(tmp_path / "gone") in _one_line_error(code, err)


def test_fit_with_a_cache_dir_skips_the_backbone_for_cached_training_images(tmp_path, capsys, monkeypatch):
    from patchcore.backbones import FeatureExtractor

    seen = []
    forward = FeatureExtractor.forward
    monkeypatch.setattr(FeatureExtractor, "forward",
                        lambda self, images: seen.append(len(images)) or forward(self, images))
    cfg = json.loads(json.dumps(TINY))
    cfg["data"]["cache_dir"] = str(tmp_path / "cache")
    config = write_config(tmp_path, cfg)
    assert run_cli(["fit", "--config", config, "--out", tmp_path / "first", "--quiet"], capsys)[0] == 0
    first = sum(seen)
    entries = list((tmp_path / "cache" / "central").rglob("*.safetensors"))
    assert len(entries) == 5  # n_train images of the one category less the held-out one, in data.cache_dir/central
    seen.clear()
    assert run_cli(["fit", "--config", config, "--out", tmp_path / "second", "--quiet"], capsys)[0] == 0
    assert sum(seen) == first - 5  # only what is never cached (validation/calibration images) ran again
    a = load_file(str(next((tmp_path / "first" / "banks").rglob("*.safetensors"))))
    b = load_file(str(next((tmp_path / "second" / "banks").rglob("*.safetensors"))))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same bank from cached rows


def _strict(text: str):
    """json.loads that refuses NaN / Infinity (not JSON, though Python writes them)."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_evaluate_json_parses_strictly_and_the_manifest_is_complete(fitted, capsys):
    _, _, run = fitted
    code, _, _ = run_cli(["evaluate", "--run", run, "--quiet", "--out", run / "strict", "--overlays", "0"], capsys)
    assert code == 0
    for name in ("metrics.json", "manifest.json"):
        _strict((run / "strict" / name).read_text())
    assert _strict((run / "strict" / "manifest.json").read_text())["status"] == "complete"
    _strict((run / "banks" / "disc.json").read_text())


@pytest.mark.parametrize("raised, status, line, exit_code", [
    (DataError("disk on fire"), "failed", "error: disk on fire", 2),
    (KeyboardInterrupt(), "interrupted", "interrupted", 130),
])
def test_a_failed_fit_keeps_its_results_and_says_why(tmp_path, capsys, monkeypatch, raised, status, line, exit_code):
    import patchcore.fitting

    real, calls = patchcore.fitting.fit_category, []

    def second_fails(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise raised
        return real(*args, **kwargs)

    monkeypatch.setattr(patchcore.fitting, "fit_category", second_fails)
    cfg = json.loads(json.dumps(TINY))
    cfg["data"]["synthetic"]["categories"] = ["disc", "stripes"]
    code, _, err = run_cli(["fit", "--config", write_config(tmp_path, cfg), "--quiet", "--out", tmp_path / "run"],
                           capsys)
    assert code == exit_code and err.strip().splitlines() == [line]
    manifest = _strict((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == status and manifest["error"] == line and manifest["wall_s"] > 0
    assert (tmp_path / "run" / "banks" / f"{calls[0]}.safetensors").is_file()  # the first bank stays


def test_a_run_that_fails_before_any_work_leaves_no_folder(fitted, tmp_path, capsys, monkeypatch):
    import patchcore.fitting

    def fails(*args, **kwargs):
        raise DataError("no luck")

    monkeypatch.setattr(patchcore.fitting, "fit_category", fails)
    monkeypatch.setattr(patchcore.fitting, "score_records", fails)
    code, _, err = run_cli(["fit", "--config", write_config(tmp_path, TINY), "--quiet"], capsys)
    assert _one_line_error(code, err) == "error: no luck"
    assert not any((tmp_path / "results").iterdir())  # fit-* held only config.yaml + manifest.json
    _, _, run = fitted
    before = sorted(p.name for p in run.iterdir())
    code, _, err = run_cli(["evaluate", "--run", run, "--quiet"], capsys)
    assert _one_line_error(code, err) == "error: no luck"
    assert sorted(p.name for p in run.iterdir()) == before  # no empty evaluation-* folder
    (tmp_path / "mine").mkdir()  # an --out the user made, empty: emptied again, never removed
    code, _, _ = run_cli(["evaluate", "--run", run, "--quiet", "--out", tmp_path / "mine"], capsys)
    assert code == 2 and (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())


def test_a_config_error_comes_before_torch_is_imported(tmp_path):
    """`fedpatch fit --config` with a typo: exit 2, one line naming the key, torch never loaded
    (it used to take ~5-13 s for the libraries to import before the config was even read)."""
    cfg = json.loads(json.dumps(TINY))
    cfg["model"]["corset"] = {"ratio": 0.1}
    config = write_config(tmp_path, cfg)
    probe = ("import sys; from experiments.app.cli import main; code = main(['fit', '--config', sys.argv[1]]); "
             "print(code, sorted(m for m in ('torch', 'torchvision', 'flwr', 'ray', 'sklearn') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe, str(config)], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.split() == ["2", "[]"], result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.corset: unknown key"), lines
    for command in (["compare"], ["federate"], ["sweep", "privacy"], ["deploy", "--site", f"a={tmp_path}"]):
        probe_c = probe.replace("['fit', ", repr(command)[:-1] + ", ")
        result = subprocess.run([sys.executable, "-c", probe_c, str(config)], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parents[1])
        assert result.stdout.split() == ["2", "[]"] and "model.corset: unknown key" in result.stderr, (command, result)


def test_the_import_light_backbone_names_are_the_registry():
    from patchcore.backbones import REGISTRY
    from patchcore.config import BACKBONES

    assert tuple(REGISTRY) == BACKBONES


def test_serve_port_is_checked_before_uvicorn(capsys):
    import socket

    from experiments.app.cli import _check_bindable, build_parser
    from patchcore.errors import ConfigError

    with pytest.raises(SystemExit) as exc:  # argparse: out of range -> usage line, exit 2
        build_parser().parse_args(["serve", "bank.safetensors", "--port", "99999"])
    assert exc.value.code == 2 and "must be in 1-65535, got 99999" in capsys.readouterr().err
    with socket.socket() as taken:  # bound (not listening): the address is in use all the same
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"cannot serve on 127.0.0.1:{port}: .*choose another --port"):
            _check_bindable("127.0.0.1", port)
    with pytest.raises(ConfigError, match="--host 'no such host.invalid' does not resolve"):
        _check_bindable("no such host.invalid", 8000)
