"""The inspection API (`fedpatch serve`) on a tiny real bank: answers, refusals, concurrency, CLI."""

import base64
import contextlib
import inspect
import io
import json
import re
import shutil
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments.app import cli
from experiments.app.dashboard.screenshot import Browser
from experiments.app.local_server import free_port
from experiments.app.predict import BankScorer, Inspection
from experiments.app.serve import MULTIPART_OVERHEAD, create_app
from federated.config import ExperimentConfig
from patchcore.config import load_config
from patchcore.data.images import decode_image, read_image
from patchcore.data.sources import load_records
from patchcore.errors import BankFormatError, DataError
from patchcore.fitting import fit_category, score_records
from patchcore.memory_bank import MemoryBank
from patchcore.threshold import Threshold
from tests.conftest import REPO, SHARED_MVTEC
from tests.test_cli import TINY, write_config

with warnings.catch_warnings():  # starlette 1.x asks for httpx2 in its TestClient; httpx still works
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

# TINY with a few more images: 8 training images separate good from defective clearly
CONFIG = {**TINY, "data": {**TINY["data"],
                           "synthetic": {**TINY["data"]["synthetic"], "n_train": 8, "n_test_defect": 6}}}
SMALL_LIMIT = 20_000  # bytes: above one 64 px synthetic PNG, far below the default 10 MiB


def _largest_defect(root: Path) -> Path:
    """The test defect image with the largest mask (the plainest defect)."""
    def area(image: Path) -> int:
        mask = root / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"
        return int((np.asarray(Image.open(mask)) > 0).sum())
    images = (p for p in sorted((root / "test").glob("*/*"))
              if p.suffix in (".png", ".jpg") and p.parent.name != "good")
    return max(images, key=area)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A bank fitted by `fedpatch fit` made uncalibrated (whatever threshold and colour range fit
    stored are dropped), a calibrated copy with its threshold halfway between the good and the
    defect scores, and one app on each."""
    tmp = tmp_path_factory.mktemp("serve")
    assert cli.main(["fit", "--config", str(write_config(tmp, CONFIG)), "--quiet", "--out", str(tmp / "run")]) == 0
    bank = MemoryBank.load(tmp / "run" / "banks" / "disc.safetensors")
    bank.metadata.pop("threshold", None)
    bank.metadata.pop("display_range", None)
    bank_path, _ = bank.save(tmp / "uncalibrated" / "disc")
    root = tmp / "synthetic" / "disc"
    goods = sorted((root / "test" / "good").glob("*.png"))
    defect = _largest_defect(root)
    scorer = BankScorer.load(bank_path, device="cpu")
    good_scores = [scorer.inspect(scorer.preprocess.image(read_image(p))).score for p in goods]
    defect_score = scorer.inspect(scorer.preprocess.image(read_image(defect))).score
    bank.metadata["threshold"] = Threshold((max(good_scores) + defect_score) / 2, "quantile").to_dict()
    calibrated, _ = bank.save(tmp / "calibrated" / "disc")
    return {
        "bank": bank_path, "calibrated": calibrated, "goods": goods, "defect": defect,
        "good_scores": good_scores, "defect_score": defect_score,
        "app": TestClient(create_app(calibrated, device="cpu")),
        "small": TestClient(create_app(bank_path, device="cpu", max_upload_bytes=SMALL_LIMIT)),
    }


def post(client: TestClient, path: Path | str, data: bytes | None = None, content_type: str = "image/png",
         query: str = ""):
    data = Path(path).read_bytes() if data is None else data
    return client.post(f"/inspect{query}", files={"file": (Path(path).name, data, content_type)})


def _png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        img.load()
        return img.size  # (W, H)


def test_inspect_scores_and_decides_good_below_defect(served):
    client = served["app"]
    threshold = (max(served["good_scores"]) + served["defect_score"]) / 2
    results = {}
    for path in [*served["goods"], served["defect"]]:
        r = post(client, path)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["filename"] == path.name and body["category"] == "disc"
        assert np.isfinite(body["score"]) and body["threshold"] == pytest.approx(threshold)
        assert body["decision"] == ("reject" if body["score"] > body["threshold"] else "accept")
        assert body["image_size"] == [64, 64]
        assert _png_size(base64.b64decode(body["heatmap_png"])) == (64, 64)
        box = body["max_patch"]  # one cell of the 8 x 8 layer2 grid (stride 8) of a 64 px input
        assert 0 <= box["x0"] < box["x1"] <= 64 and 0 <= box["y0"] < box["y1"] <= 64
        assert (box["x1"] - box["x0"], box["y1"] - box["y0"]) == (8, 8) and box["x0"] % 8 == box["y0"] % 8 == 0
        assert body["latency_ms"] > 0
        results[path] = body
    defect = results[served["defect"]]
    assert defect["score"] == pytest.approx(served["defect_score"], rel=1e-5)
    assert all(defect["score"] > results[g]["score"] for g in served["goods"])
    assert defect["decision"] == "reject" and all(results[g]["decision"] == "accept" for g in served["goods"])


def test_max_patch_box_is_the_argmax_cell_in_input_pixels():
    patches = np.zeros((4, 8), np.float32)  # (h, w) grid over a 32 x 64 input
    patches[2, 5] = 3.0
    result = Inspection(np.zeros((32, 64, 3), np.float32), 3.0, np.zeros((32, 64), np.float32), patches)
    assert result.max_patch_box() == (40, 16, 48, 24)
    patches[2, 5], patches[3, 7] = 0.0, 1.0  # the last cell ends at the image border
    assert result.max_patch_box() == (56, 24, 64, 32)


def test_heatmap_can_be_skipped_or_returned_as_png(served):
    client, image = served["app"], served["defect"]
    assert post(client, image, query="?heatmap=false").json()["heatmap_png"] is None
    as_json = post(client, image).json()
    r = post(client, image, query="?format=png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert _png_size(r.content) == (64, 64)
    from_json = np.asarray(Image.open(io.BytesIO(base64.b64decode(as_json["heatmap_png"]))))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), from_json)


def test_uncalibrated_bank_says_so(served):
    body = post(served["small"], served["defect"]).json()
    assert body["threshold"] is None and body["decision"] == "uncalibrated"
    assert served["small"].get("/model").json()["threshold"] is None


def test_health_and_model_describe_the_bank(served):
    client = served["app"]
    assert client.get("/health").json() == {"status": "ok", "bank_loaded": True, "device": "cpu"}
    info = client.get("/model").json()
    stored = json.loads(served["calibrated"].with_suffix(".json").read_text())
    assert info["bank_size"] == stored["shape"][0] == len(MemoryBank.load(served["calibrated"]))
    assert info["feature_dim"] == stored["shape"][1] == MemoryBank.load(served["calibrated"]).dim
    assert info["bank_sha256"] == stored["sha256"] and info["bank_file"] == str(served["calibrated"])
    assert info["backbone"] == "efficientnet_lite0" and info["backbone_id"].startswith("efficientnet_lite0:")
    assert info["category"] == "disc" and info["threshold"] == stored["metadata"]["threshold"]["value"]
    assert info["preprocess"] == {"resize": 64, "crop": 64}
    assert info["config"]["backbone"]["name"] == "efficientnet_lite0"


def test_index_is_a_self_contained_upload_page_posting_to_inspect(served):
    r = served["app"].get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert '<input id="file" type="file" name="file" multiple' in page  # the picker; drops go to the same code
    assert 'action="./inspect"' in page and 'fetch("./inspect"' in page and 'fetch("./model")' in page
    assert "max_patch" in page and "heatmap_png" in page and "image_size" in page
    # nothing from elsewhere: no external script, style, font or picture, so it works offline
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(|<link|<script\s+src""", page, re.I)
    assert not re.search(r"https?://", page)


def test_model_gives_the_page_its_colour_scale_and_upload_limit(served):
    threshold = (max(served["good_scores"]) + served["defect_score"]) / 2
    info = served["app"].get("/model").json()
    assert info["display_range"] == {"vmin": 0.0, "vmax": pytest.approx(2 * threshold), "source": "threshold"}
    assert info["max_upload_bytes"] == 10 * 2**20
    small = served["small"].get("/model").json()  # no threshold, no stored range: each image its own
    assert small["display_range"] is None and small["max_upload_bytes"] == SMALL_LIMIT


def test_openapi_lists_the_routes_and_handlers_run_in_the_threadpool(served):
    schema = served["app"].get("/openapi.json").json()
    assert schema["info"]["title"] == "fedpatch inspection API"
    assert {"/", "/inspect", "/health", "/model"} <= set(schema["paths"])
    assert "InspectionResult" in schema["components"]["schemas"]
    assert served["app"].get("/docs").status_code == 200
    for route in served["app"].app.routes:
        if getattr(route, "path", "") in ("/", "/inspect", "/health", "/model"):
            assert not inspect.iscoroutinefunction(route.endpoint), route.path  # async would block the loop


@pytest.mark.parametrize("fmt, content_type, lossless", [
    ("BMP", "image/bmp", True), ("TIFF", "image/tiff", True), ("JPEG", "image/jpeg", False), ("L", "image/png", False)])
def test_other_formats_and_modes_are_accepted(served, fmt, content_type, lossless):
    image = Image.open(served["defect"])
    buffer = io.BytesIO()
    if fmt == "L":  # grayscale PNG: replicated to RGB like files on disk
        image.convert("L").save(buffer, "PNG")
    else:
        image.save(buffer, fmt)
    body = post(served["app"], f"part.{fmt.lower()}", buffer.getvalue(), content_type).json()
    assert body["image_size"] == [64, 64] and np.isfinite(body["score"])
    if lossless:
        assert body["score"] == pytest.approx(served["defect_score"], rel=1e-5)


def test_decode_image_refuses_oversized_headers_before_decoding(served):
    data = served["goods"][0].read_bytes()
    assert decode_image(data, "a.png", ("PNG",), max_pixels=64 * 64).size == (64, 64)
    with pytest.raises(DataError, match="a.png is 64x64 pixels"):
        decode_image(data, "a.png", ("PNG",), max_pixels=64 * 64 - 1)
    with pytest.raises(DataError, match="a.png"):  # a PNG offered to the JPEG decoder only
        decode_image(data, "a.png", ("JPEG",))


@pytest.mark.parametrize("content_type", ["text/plain", "application/pdf"])
def test_wrong_content_type_is_415_naming_the_type(served, content_type):
    r = post(served["app"], "notes.txt", b"%PDF-1.4 hello", content_type)
    assert r.status_code == 415 and content_type in r.json()["detail"]


@pytest.mark.parametrize("payload", ["truncated", "not an image"])
def test_undecodable_upload_is_4xx_naming_the_file(served, payload):
    data = served["goods"][0].read_bytes()[:200] if payload == "truncated" else b"just some text, really" * 20
    r = post(served["app"], "broken-part.png", data)
    assert 400 <= r.status_code < 500 and "broken-part.png" in r.json()["detail"]


def test_oversized_uploads_are_413(served):
    client = served["small"]
    assert len(served["goods"][0].read_bytes()) < SMALL_LIMIT  # a normal image passes
    r = post(client, "big.png", b"\0" * (SMALL_LIMIT + 1))  # counted while the handler reads
    assert r.status_code == 413 and "big.png" in r.json()["detail"]
    r = post(client, "huge.png", b"\0" * (SMALL_LIMIT + MULTIPART_OVERHEAD + 1))  # refused by Content-Length
    assert r.status_code == 413 and "request body larger than" in r.json()["detail"]

    def stream():  # chunked, no Content-Length: counted as it arrives
        yield (b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"s.png\"\r\n"
               b"Content-Type: image/png\r\n\r\n")
        for _ in range(40):
            yield b"\0" * 4096

    r = client.post("/inspect", content=stream(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413 and "request body larger than" in r.json()["detail"]


def test_concurrent_requests_are_all_answered_identically(served):
    client, images = served["app"], [served["goods"][0], served["defect"]]
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda i: post(client, images[i % 2]), range(16)))
    assert [r.status_code for r in responses] == [200] * 16
    for k, image in enumerate(images):
        scores = {responses[i].json()["score"] for i in range(k, 16, 2)}
        assert len(scores) == 1 and {responses[i].json()["filename"] for i in range(k, 16, 2)} == {image.name}
    assert responses[1].json()["score"] == pytest.approx(served["defect_score"], rel=1e-5)


def test_missing_bank_fails_at_creation_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "disc.safetensors"
    with pytest.raises(BankFormatError, match=str(missing)):
        create_app(missing)


def test_cli_serve_builds_the_app_first_then_runs_uvicorn(served, tmp_path, capsys, monkeypatch):
    missing = tmp_path / "gone.safetensors"
    assert cli.main(["serve", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(missing) in err and "\n" not in err

    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    low = min(served["good_scores"]) / 2  # below every score: all rejected
    args = ["serve", str(served["bank"]), "--port", "8123", "--device", "cpu", "--threshold", str(low)]
    assert cli.main(args) == 0
    (app, kw), = calls
    assert kw["host"] == "127.0.0.1" and kw["port"] == 8123
    body = post(TestClient(app), served["goods"][0]).json()
    assert body["threshold"] == pytest.approx(low) and body["decision"] == "reject"


# --- the inspection page in a real browser ---------------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HAZELNUT = SHARED_MVTEC / "hazelnut"
PAGE_DONE_JS = """(() => { const cards = [...document.querySelectorAll('.card')];
  return cards.length === 2 && cards.every(c => c.dataset.state !== 'pending'); })()"""
PAGE_STATE_JS = """(() => { const card = (state) => document.querySelector(`.card[data-state="${state}"]`);
  const done = card('reject'), refused = card('error'), img = done && done.querySelector('img.overlay');
  const box = done && done.querySelector('.box').getBoundingClientRect();
  return {text: document.body.innerText, decision: done && done.querySelector('.decision').textContent,
          category: done && done.querySelector('.category').textContent, natural: img ? img.naturalWidth : 0,
          box: box ? [box.width, box.height] : null, refused: refused && refused.querySelector('.error').textContent,
          bank: document.getElementById('bank').textContent,
          resources: performance.getEntriesByType('resource').map(e => e.name)}; })()"""


@pytest.fixture(scope="module")
def hazelnut_app(tmp_path_factory):
    """An app on a Lite0 bank fitted on the shared hazelnut training images (1% coreset) with the
    threshold `fit` calibrates on its held-out training normals (hazelnut has no validation
    folder), and the defect to upload."""
    if not HAZELNUT.is_dir():
        pytest.skip(f"real images not found at {HAZELNUT}")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"chromium not found at {CHROMIUM} (apt-get install -y chromium)")
    config = load_config(REPO / "configs" / "shared_real.yaml", ExperimentConfig,
                         {"data.root": str(SHARED_MVTEC), "device": "cpu", "model.coreset.ratio": 0.01})
    records = load_records(config.data, SHARED_MVTEC, "hazelnut", config.threshold.holdout, config.seed)
    model, _ = fit_category(config, "hazelnut", records, progress=False)
    threshold = model.bank.metadata["threshold"]
    assert threshold["details"]["source"] == "held-out training normals"
    defect = _largest_defect(HAZELNUT)
    scored = score_records(model, [r for r in records if r.path == defect], config, progress=False)
    assert scored.scores[0] > threshold["value"], (scored.scores[0], threshold)
    bank_path, _ = model.bank.save(tmp_path_factory.mktemp("hazelnut") / "hazelnut")
    return create_app(bank_path, device="cpu"), defect  # the bank's own threshold decides


@contextlib.contextmanager
def uvicorn_on_loopback(app):
    """The app behind a real uvicorn server on a free 127.0.0.1 port, in a thread; its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _choose_files(browser: Browser, selector: str, paths: list[Path]) -> None:
    """What a person does with the file picker: DevTools sets the input's files, the page's
    change handler runs as for a real choice."""
    root = browser.call("DOM.getDocument")["root"]["nodeId"]
    node = browser.call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
    browser.call("DOM.setFileInputFiles", nodeId=node, files=[str(p) for p in paths])


@pytest.mark.slow  # a real uvicorn server and headless Chromium (and a fit on the shared images)
def test_inspection_page_in_headless_chromium_rejects_a_hazelnut_defect(hazelnut_app, tmp_path):
    app, defect = hazelnut_app
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("not a picture of a part")
    with uvicorn_on_loopback(app) as url:
        browser = Browser(CHROMIUM, (1100, 800))
        try:
            browser.call("Page.navigate", url=f"{url}/")
            browser.wait_for("document.getElementById('bank').textContent.includes('hazelnut')", timeout=30, settle=0.2)
            _choose_files(browser, "#file", [defect, not_an_image])
            browser.wait_for(PAGE_DONE_JS, timeout=60, settle=0.3)
            state = browser.evaluate(PAGE_STATE_JS)
            shot = browser.screenshot(tmp_path / "inspect-page.png")
        finally:
            browser.close()
    assert state["decision"] == "reject" and "reject" in state["text"].lower()
    assert state["category"] == "hazelnut" and "threshold" in state["bank"]
    assert state["natural"] == 224  # the overlay PNG loaded, at the model input's size
    assert state["box"][0] > 0 and state["box"][1] > 0  # the worst patch is boxed
    assert state["refused"].startswith("refused (HTTP 415") and "notes.txt" in state["refused"]
    assert all(r.startswith((url, "data:")) for r in state["resources"]), state["resources"]  # nothing external
    with Image.open(shot) as picture:
        assert picture.format == "PNG" and picture.size[0] == 1100 and picture.size[1] > 400
        pixels = np.asarray(picture.convert("RGB"))
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000  # not blank: text, heatmap
