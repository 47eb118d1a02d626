"""HTTP service: a fitted model behind a JSON API and a small web page (`spade-ad serve MODEL`).

Endpoints: `POST /v1/predict` (multipart field `files`, one or several images), `GET /v1/model`, `GET /healthz`,
the web page at `/` (plain files from `spade_ad/static`, no CDN) and OpenAPI docs at `/docs` (Swagger UI from the
`fastapi-offline` package, also without a CDN).

Resources are bounded. The model is loaded once and shared. Inference runs in a pool of `workers` threads; at most
`workers + max_queue` predict requests are admitted at a time (running or waiting), and any further one gets 503 with
`Retry-After` before its body is read, so the memory held by uploads is at most that many times `max_upload_bytes`.
The body is counted while it streams in (413 past the limit, whatever Content-Length says). Image headers are checked
against `max_pixels` before any pixel is decoded (decompression bombs), and each worker decodes, scores and renders
one image at a time. With `workers > 1`, decoding and PNG rendering run in parallel but the model itself is called
under a lock: one shared model, one forward pass at a time (torch already spreads one pass over the CPU cores).

Heat maps use a fixed colour scale when the model is calibrated, so they are comparable between images: 0 to 1.5x
the pixel threshold, which puts the threshold at two thirds of the scale (yellow in the "jet" map; everything colder
is below it). Uncalibrated models get a per-image min..max scale. The overlay outlines the pixels at or above the
pixel threshold in white.
"""

from __future__ import annotations

import asyncio
import base64
import io
import math
import os
import threading
import time
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fastapi_offline
import numpy as np
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from . import __version__
from .errors import ImageReadError
from .visualize import heatmap, overlay, threshold_color_range

if TYPE_CHECKING:
    from .model import Prediction, Spade

__all__ = ["ServiceSettings", "create_app", "run_server"]

FIELD = "files"
"""Name of the multipart field that carries the images."""
FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
"""Image formats accepted (Pillow names); nothing else is even parsed."""
STATIC_DIR = Path(__file__).with_name("static")
DOCS_ASSETS = Path(fastapi_offline.__file__).with_name("static")
"""Swagger UI 5 (OpenAPI 3.1, as FastAPI writes it) shipped by the fastapi-offline package: /docs needs no CDN."""
DRAIN_FACTOR = 4
"""An oversized body is read and dropped up to this many times the limit before answering 413, so that the client
sees the answer instead of a reset connection; beyond that the connection is simply closed."""
PAGE_POLICY = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"


@dataclass(frozen=True)
class ServiceSettings:
    """Where to listen and how much work and data to accept.

    host, port: address to bind (loopback by default: not reachable from other machines).
    workers: inference threads. max_queue: predict requests that may wait for a worker; beyond: 503.
    max_upload_bytes: largest request body (all files together). max_pixels: largest image (width x height),
    checked before decoding. max_files: files per request. max_connections: open connections (uvicorn answers 503
    beyond; covers the page, docs and health checks too).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    max_queue: int = 8
    max_upload_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    max_files: int = 16
    max_connections: int = 64

    def __post_init__(self) -> None:
        minimum = {"workers": 1, "max_queue": 0, "max_upload_bytes": 1, "max_pixels": 1, "max_files": 1,
                   "max_connections": 1, "port": 0}
        for name, low in minimum.items():
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")


# -- response bodies (also the OpenAPI schema) ---------------------------------------------------------------------
class ColorScale(BaseModel):
    """Anomaly values mapped to the lowest (vmin) and highest (vmax) colour; `fixed`: the same for every image."""

    vmin: float
    vmax: float
    fixed: bool


class ImageResult(BaseModel):
    """One image's result. `heatmap` and `overlay` are PNG data URLs at the image's own size."""

    file: str
    width: int
    height: int
    score: float
    threshold: float | None
    is_anomalous: bool | None
    pixel_threshold: float | None
    color_scale: ColorScale
    heatmap: str
    overlay: str


class PredictResponse(BaseModel):
    """Results in upload order, and the seconds spent scoring them (queue wait excluded)."""

    results: list[ImageResult]
    seconds: float


class ModelInfo(BaseModel):
    """The served model: backbone, settings, calibrated thresholds, stored evaluation metrics, service limits."""

    version: str
    backbone: str
    settings: dict[str, Any]
    image_threshold: float | None
    pixel_threshold: float | None
    color_scale: ColorScale | None
    metrics: dict[str, Any]
    n_train_images: int
    limits: dict[str, int]


class Health(BaseModel):
    """`in_flight`: predict requests running or waiting; `capacity`: how many may be."""

    status: str
    in_flight: int
    capacity: int


class ErrorBody(BaseModel):
    """What went wrong, in plain words, and the uploaded file it concerns (if one)."""

    error: str
    file: str | None = None


class ApiError(Exception):
    """A request the service refuses: becomes `{"error": message, "file": file}` with `status`."""

    def __init__(self, status: int, message: str, file: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.file, self.headers = status, message, file, headers


class _Capacity:
    """Counts admitted predict requests (at most `limit`) and keeps a running mean of their service time."""

    def __init__(self, limit: int, workers: int) -> None:
        self.limit, self.workers = limit, workers
        self.in_flight = 0
        self._mean_seconds = 1.0
        self._lock = threading.Lock()

    def try_acquire(self) -> bool:
        with self._lock:
            if self.in_flight >= self.limit:
                return False
            self.in_flight += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def record(self, seconds: float) -> None:
        with self._lock:
            self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * seconds

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the admitted requests' expected service time, per worker."""
        with self._lock:
            return max(1, math.ceil(self._mean_seconds * self.limit / self.workers))


# -- reading uploads -----------------------------------------------------------------------------------------------
def _megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


async def _limited(stream: AsyncGenerator[bytes, None], limit: int) -> AsyncGenerator[bytes, None]:
    """Pass the body through, counting; past `limit` drop the rest (up to DRAIN_FACTOR x limit) and raise 413."""
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size <= limit:
            yield chunk
        elif size > DRAIN_FACTOR * limit:
            break
    if size > limit:
        raise ApiError(413, f"the upload is larger than the limit of {_megabytes(limit)}; send fewer or smaller files")


def _declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    if not value.isdigit():
        raise ApiError(400, f"the Content-Length header is not a number: {value!r}")
    return int(value)


def _check_multipart(request: Request) -> None:
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(
            415,
            f"send the images as multipart/form-data in the field '{FIELD}' (got Content-Type "
            f"{content_type or 'none'}); e.g. curl -F {FIELD}=@image.png URL",
        )


async def _read_files(request: Request, settings: ServiceSettings) -> list[tuple[str, bytes]]:
    """The (name, bytes) of each file in the `files` field, the body limited to `max_upload_bytes`."""
    parser = MultiPartParser(
        request.headers, _limited(request.stream(), settings.max_upload_bytes), max_files=settings.max_files,
        max_fields=settings.max_files,
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, f"the upload is not valid multipart/form-data: {exc.message}") from exc
    try:
        fields = form.getlist(FIELD)
        if not fields:
            given = ", ".join(sorted(set(form.keys()))) or "none"
            raise ApiError(422, f"no images found: send them in the multipart field '{FIELD}' (fields given: {given})")
        files = []
        for number, value in enumerate(fields, 1):
            if not isinstance(value, UploadFile):
                raise ApiError(422, f"field '{FIELD}' #{number} is text, not a file: send it with a filename")
            files.append((value.filename or f"file {number}", await value.read()))
        return files
    finally:
        await form.close()


def _open(name: str, data: bytes, max_pixels: int) -> Image.Image:
    """Open an upload lazily (header only) and check it is a non-empty image within the pixel limit."""
    if not data:
        raise ApiError(400, "the file is empty", name)
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:  # Pillow's own guard, at twice Image.MAX_IMAGE_PIXELS
        raise ApiError(
            413, f"image too large: its header claims over {2 * Image.MAX_IMAGE_PIXELS:,} pixels; the limit is "
            f"{max_pixels:,}", name,
        ) from exc
    except UnidentifiedImageError as exc:
        raise ApiError(415, f"not an image in a supported format ({', '.join(FORMATS)})", name) from exc
    except Exception as exc:  # Pillow's header parsers raise many types on bad data
        raise ApiError(400, "the image header is corrupt", name) from exc
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ApiError(400, "the image has zero size", name)
    if width * height > max_pixels:
        raise ApiError(
            413, f"image too large: {width} x {height} = {width * height:,} pixels; the limit is {max_pixels:,}", name
        )
    return image


def _decode(name: str, data: bytes, max_pixels: int) -> Image.Image:
    """Decode an upload completely (after the checks of `_open`); truncated or corrupt data -> 400."""
    image = _open(name, data, max_pixels)
    try:
        image.load()
    except MemoryError:
        raise
    except Exception as exc:
        raise ApiError(400, "the image is truncated or corrupt", name) from exc
    return image


def _png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# -- the application -----------------------------------------------------------------------------------------------
class _Predictor:
    """Scores uploads with the shared model in the worker pool, one image at a time per worker."""

    def __init__(self, model: Spade, settings: ServiceSettings) -> None:
        self.model = model
        self.settings = settings
        self.capacity = _Capacity(settings.workers + settings.max_queue, settings.workers)
        self.executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="spade-infer")
        self._model_lock = threading.Lock()
        shared_range = threshold_color_range(model.pixel_threshold_)
        self.color_scale = ColorScale(vmin=shared_range[0], vmax=shared_range[1], fixed=True) if shared_range else None

    async def __call__(self, request: Request) -> PredictResponse:
        _check_multipart(request)
        limit = self.settings.max_upload_bytes
        declared = _declared_length(request)
        if declared is not None and declared > limit:
            if declared <= DRAIN_FACTOR * limit:
                async for _ in request.stream():
                    pass
            raise ApiError(413, f"the upload ({_megabytes(declared)}) is larger than the limit of {_megabytes(limit)}")
        if not self.capacity.try_acquire():
            raise ApiError(
                503, "the server is busy: too many images are being scored; try again shortly",
                headers={"Retry-After": str(self.capacity.retry_after())},
            )
        submitted = False
        try:
            files = await _read_files(request, self.settings)
            for name, data in files:
                _open(name, data, self.settings.max_pixels)
            future = self.executor.submit(self._score, files)
            future.add_done_callback(lambda _: self.capacity.release())
            submitted = True
            return await asyncio.wrap_future(future)
        finally:
            if not submitted:
                self.capacity.release()

    def _score(self, files: list[tuple[str, bytes]]) -> PredictResponse:
        """Worker-thread job: decode, score and render each file in turn."""
        started = time.perf_counter()
        results = []
        for name, data in files:
            image = _decode(name, data, self.settings.max_pixels)
            try:
                with self._model_lock:
                    [prediction] = self.model.iter_predict([image], original_size=True, keep_images=True)
            except ImageReadError as exc:
                raise ApiError(415, f"unsupported image: {exc.reason}", name) from exc
            results.append(self._render(name, prediction))
        seconds = time.perf_counter() - started
        self.capacity.record(seconds)
        return PredictResponse(results=results, seconds=round(seconds, 4))

    def _render(self, name: str, prediction: Prediction) -> ImageResult:
        full_map = prediction.original_map
        assert full_map is not None and prediction.image is not None
        if self.color_scale is not None:
            scale = self.color_scale
        else:
            finite = full_map[np.isfinite(full_map)]
            low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
            scale = ColorScale(vmin=low, vmax=high, fixed=False)
        return ImageResult(
            file=name,
            width=prediction.image.width,
            height=prediction.image.height,
            score=prediction.score,
            threshold=self.model.image_threshold_,
            is_anomalous=prediction.is_anomalous,
            pixel_threshold=prediction.pixel_threshold,
            color_scale=scale,
            heatmap=_png_data_url(heatmap(full_map, scale.vmin, scale.vmax)),
            overlay=_png_data_url(
                overlay(prediction.image, full_map, scale.vmin, scale.vmax, mask=prediction.defect_mask)
            ),
        )


_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FIELD],
                    "properties": {
                        FIELD: {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": f"One or several images ({', '.join(FORMATS)}).",
                        }
                    },
                }
            }
        },
    }
}
_PREDICT_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "Empty, truncated or corrupt file, or a malformed upload.",
        413: "Upload over max_upload_bytes, or an image over max_pixels (decompression bomb).",
        415: "Not multipart/form-data, or a file that is not an image in a supported format.",
        422: f"No file in the field '{FIELD}'.",
        503: "Busy: all workers and queue places taken; retry after Retry-After seconds.",
    }.items()
}


def create_app(model: Spade, settings: ServiceSettings | None = None) -> FastAPI:
    """The FastAPI application serving the fitted `model` (shared by every request; its progress bars are turned
    off). The worker pool is shut down when the app's lifespan ends."""
    settings = settings or ServiceSettings()
    model.set_params(progress=False)
    predictor = _Predictor(model, settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncGenerator[None, None]:
        yield
        predictor.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="spade-ad",
        version=__version__,
        description="SPADE anomaly detection: score images and localise defects with a model fitted on good images.",
        lifespan=lifespan,
        docs_url=None,  # served below from local files: FastAPI's default page loads Swagger UI from a CDN
    )

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.message, "file": exc.file}, exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail), "file": None}, exc.status_code, headers=exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def disconnected(_: Request, exc: ClientDisconnect) -> JSONResponse:
        return JSONResponse({"error": "the upload was interrupted", "file": None}, 400)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}", "file": None}, 500)

    @app.post(
        "/v1/predict", response_model=PredictResponse, openapi_extra=_PREDICT_BODY, responses=_PREDICT_ERRORS,
        summary="Score images: anomaly score, verdict, heat map and overlay per image",
    )
    async def predict(request: Request) -> PredictResponse:
        return await predictor(request)

    @app.get("/v1/model", response_model=ModelInfo, summary="The served model and the service limits")
    async def model_info() -> ModelInfo:
        params = model.get_params()
        params["weights"] = None if params["weights"] is None else str(params["weights"])
        return ModelInfo(
            version=__version__,
            backbone=model.backbone_.name,
            settings=params,
            image_threshold=model.image_threshold_,
            pixel_threshold=model.pixel_threshold_,
            color_scale=predictor.color_scale,
            metrics=model.metrics_,
            n_train_images=len(model.train_names_),
            limits={k: v for k, v in asdict(settings).items() if k not in ("host", "port")},
        )

    @app.get("/healthz", response_model=Health, summary="Liveness and load")
    async def healthz() -> Health:
        capacity = predictor.capacity
        return Health(status="ok", in_flight=capacity.in_flight, capacity=capacity.limit)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json", title="spade-ad API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js", swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon.png",
        )

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.mount("/docs-assets", StaticFiles(directory=DOCS_ASSETS), name="docs-assets")
    return app


def run_server(
    model_path: str | os.PathLike[str],
    settings: ServiceSettings | None = None,
    *,
    weights: str | os.PathLike[str] | None = None,
    device: str | None = None,
) -> None:
    """Load the model once and serve it with uvicorn until interrupted."""
    import uvicorn

    from .persistence import load

    settings = settings or ServiceSettings()
    model = load(model_path, weights=weights, device=device)
    uvicorn.run(
        create_app(model, settings), host=settings.host, port=settings.port,
        limit_concurrency=settings.max_connections, timeout_graceful_shutdown=5,
    )
