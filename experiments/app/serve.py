"""`fedpatch serve BANK`: an HTTP inspection API around one saved memory bank.

POST an image to /inspect and get its anomaly score, the accept/reject decision against the
bank's calibrated threshold, the heatmap overlay and the box of the patch that drove the score.
`GET /` is the same for people at the line: one self-contained page (static/inspect.html: inline
CSS and JS, nothing fetched from elsewhere, so it works on an offline plant network) that posts
dropped images to /inspect and shows each answer.

The bank loads once, in `create_app`, so a bad bank fails before a server starts. Handlers are
plain `def` functions: FastAPI runs them in its threadpool, the event loop stays free, and one
lock serialises the model call (one torch model, many request threads); decoding, resizing and
PNG encoding run outside the lock, in parallel.

Uploads are refused while they arrive, not after: the `UploadLimit` middleware counts body bytes
as they are received (a missing or lying Content-Length changes nothing), and the handler reads
the file part in chunks up to `max_upload_bytes`.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, Literal

from experiments.app.extras import require

require("serve", "fedpatch serve")  # fastapi, uvicorn, python-multipart: the `serve` extra

from fastapi import FastAPI, File, HTTPException, Query, UploadFile  # noqa: E402
from fastapi.responses import HTMLResponse, JSONResponse, Response  # noqa: E402
from PIL import Image  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

from experiments.app import plots  # noqa: E402
from experiments.app.predict import BankScorer, Inspection  # noqa: E402
from patchcore.data.images import decode_image  # noqa: E402
from patchcore.errors import DataError  # noqa: E402
from patchcore.memory_bank import bank_paths  # noqa: E402

# Declared part type -> accepted. Whatever the label, only these PIL decoders are ever tried.
ACCEPTED_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/bmp", "image/x-ms-bmp", "image/tiff"}
DECODERS = ("PNG", "JPEG", "BMP", "TIFF")
MAX_PIXELS = 50_000_000  # ~ a 8K x 6K camera frame; larger headers are refused before decoding
MULTIPART_OVERHEAD = 64 * 2**10  # boundary and part headers on top of the file's own bytes
CHUNK = 2**16


class Box(BaseModel):
    """End-exclusive pixel box in the preprocessed (model input) image."""

    x0: int
    y0: int
    x1: int
    y1: int


class InspectionResult(BaseModel):
    filename: str
    category: str = Field(description="the category the bank was fitted on")
    score: float = Field(description="image anomaly score: the highest patch score")
    threshold: float | None = Field(description="decision threshold; null when the bank is uncalibrated")
    decision: Literal["accept", "reject", "uncalibrated"] = Field(
        description="reject when score > threshold, accept otherwise, uncalibrated without a threshold")
    heatmap_png: str | None = Field(
        description="base64 PNG, image_size pixels: the anomaly map over the input (null with heatmap=false)")
    max_patch: Box = Field(description="the feature-grid cell with the highest patch score, in input pixels")
    image_size: tuple[int, int] = Field(description="[H, W] of the model input after resize and crop")
    latency_ms: float = Field(description="server time from the received upload to the answer")


class Health(BaseModel):
    status: Literal["ok"]
    bank_loaded: bool
    device: str


class DisplayRange(BaseModel):
    vmin: float
    vmax: float
    source: Literal["bank", "threshold"] = Field(
        description="bank: stored at calibration; threshold: 0 to 2 x threshold")


class ModelInfo(BaseModel):
    backbone: str
    backbone_id: str
    bank_size: int = Field(description="rows (patch features) in the memory bank")
    feature_dim: int
    category: str
    threshold: float | None
    preprocess: dict[str, Any]
    config: dict[str, Any] = Field(description="the model config stored with the bank")
    bank_file: str
    bank_sha256: str | None = None
    display_range: DisplayRange | None = Field(
        None, description="the heatmaps' colour scale, the same for every image; null: each image its own")
    max_upload_bytes: int = Field(description="largest accepted upload (the page refuses larger files itself)")


class Problem(BaseModel):
    detail: str


class UploadLimit:
    """ASGI middleware: 413 as soon as a request body passes `limit` bytes, counted on arrival."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    def _message(self) -> str:
        return f"request body larger than {self.limit} bytes (the upload limit plus room for multipart headers)"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:  # refuse without reading a byte
            return await JSONResponse({"detail": self._message()}, status_code=413)(scope, receive, send)
        received = 0

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise HTTPException(413, self._message())  # FastAPI re-raises it from body parsing
            return message

        await self.app(scope, counted, send)


def _read_limited(upload: UploadFile, name: str, limit: int) -> bytes:
    """The file part's bytes, refusing (413) as soon as they pass `limit`."""
    chunks, size = [], 0
    while chunk := upload.file.read(CHUNK):
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"{name}: upload larger than {limit} bytes ({limit / 2**20:.3g} MiB)")
        chunks.append(chunk)
    return b"".join(chunks)


def _png(rgb: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _heatmap_png(scorer: BankScorer, result: Inspection) -> bytes:
    scale = scorer.color_scale(result)  # the bank's scale: equal colours mean equal scores across parts
    return _png(plots.heatmap_rgb(result.image, result.amap, scale.vmin, scale.vmax))


def inspection_page() -> str:
    """The inspection page's HTML, read from the installed package (package data)."""
    return (files("experiments.app") / "static" / "inspect.html").read_text(encoding="utf-8")


def _model_info(scorer: BankScorer, bank_path: str | Path, max_upload_bytes: int) -> ModelInfo:
    tensor_path, meta_path = bank_paths(bank_path)
    sha = json.loads(meta_path.read_text()).get("sha256")  # verified by MemoryBank.load
    config = scorer.bank.metadata.get("model", {})
    display = scorer.display
    return ModelInfo(
        backbone=scorer.model.config.backbone.name, backbone_id=scorer.model.backbone_id,
        bank_size=len(scorer.bank), feature_dim=scorer.bank.dim, category=scorer.category,
        threshold=scorer.threshold,
        preprocess={"resize": scorer.preprocess.resize, "crop": scorer.preprocess.crop},
        config=config, bank_file=str(tensor_path), bank_sha256=sha,
        display_range=None if display is None else DisplayRange(vmin=display.vmin, vmax=display.vmax,
                                                                source=display.source),
        max_upload_bytes=max_upload_bytes)


def _app_version() -> str:
    try:
        return version("fedpatch")
    except PackageNotFoundError:
        return "0+unknown"


def create_app(bank_path: str | Path, *, device: str = "auto", threshold: float | None = None,
               max_upload_bytes: int = 10 * 2**20) -> FastAPI:
    """The inspection API for one bank. Loads (and verifies) the bank now: a missing or bad bank
    raises BankFormatError naming the file, before any server starts."""
    scorer = BankScorer.load(bank_path, device=device, threshold=threshold)
    info = _model_info(scorer, bank_path, max_upload_bytes)
    page = inspection_page()
    lock = threading.Lock()
    app = FastAPI(
        title="fedpatch inspection API",
        description=(f"PatchCore anomaly detection with the memory bank `{info.bank_file}` "
                     f"(category `{info.category}`, {info.bank_size} x {info.feature_dim}). "
                     "POST an image to /inspect for its score, accept/reject decision and heatmap."),
        version=_app_version(),
    )
    app.add_middleware(UploadLimit, limit=max_upload_bytes + MULTIPART_OVERHEAD)
    app.state.scorer = scorer

    def judge(result: Inspection, name: str, heatmap: bool, started: float) -> InspectionResult:
        x0, y0, x1, y1 = result.max_patch_box()
        png = _heatmap_png(scorer, result) if heatmap else None
        return InspectionResult(
            filename=name, category=scorer.category, score=result.score, threshold=scorer.threshold,
            decision=scorer.decide(result.score),
            heatmap_png=None if png is None else base64.b64encode(png).decode("ascii"),
            max_patch=Box(x0=x0, y0=y0, x1=x1, y1=y1), image_size=result.amap.shape,
            latency_ms=(time.perf_counter() - started) * 1e3)

    errors = {413: {"model": Problem, "description": "upload too large"},
              415: {"model": Problem, "description": "not a PNG, JPEG, BMP or TIFF upload"},
              422: {"model": Problem, "description": "the image cannot be decoded (truncated, not an image)"}}

    @app.post("/inspect", response_model=InspectionResult, summary="Score one image",
              responses={200: {"content": {"image/png": {}},
                               "description": "JSON result, or the overlay PNG with format=png"}, **errors})
    def inspect(file: Annotated[UploadFile, File(description="the image (PNG, JPEG, BMP or TIFF)")],
                heatmap: Annotated[bool, Query(description="include heatmap_png in the JSON")] = True,
                output: Annotated[Literal["json", "png"], Query(
                    alias="format", description="json (default), or png: the heatmap overlay itself")] = "json",
                ) -> Any:
        started = time.perf_counter()
        name = file.filename or "upload"
        content_type = (file.content_type or "").split(";")[0].strip().lower()
        if content_type not in ACCEPTED_TYPES:
            raise HTTPException(415, f"{name}: unsupported type {content_type or 'none'!r}; "
                                     "send image/png, image/jpeg, image/bmp or image/tiff")
        data = _read_limited(file, name, max_upload_bytes)
        try:
            image = scorer.preprocess.image(decode_image(data, name, DECODERS, MAX_PIXELS))  # (3, H, W)
        except DataError as exc:
            raise HTTPException(422, str(exc)) from None
        with lock:
            result = scorer.inspect(image)
        if output == "png":
            return Response(_heatmap_png(scorer, result), media_type="image/png")
        return judge(result, name, heatmap, started)

    @app.get("/", response_class=HTMLResponse, summary="The inspection page: drop part images, see decisions")
    def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health", response_model=Health, summary="Liveness: the bank is loaded")
    def health() -> Health:
        return Health(status="ok", bank_loaded=True, device=str(scorer.model.device))

    @app.get("/model", response_model=ModelInfo, summary="The bank and model being served")
    def model() -> ModelInfo:
        return info

    return app
