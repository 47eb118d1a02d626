"""The FastAPI application: routes, error answers, the OpenAPI description, and `run_server`."""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fastapi_offline
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import __version__
from ..images import UPLOAD_FORMATS
from ..settings import BY_NAME, stored
from .config import ServiceSettings
from .errors import ApiError
from .predictor import Predictor
from .schemas import CalibrationInfo, ErrorBody, Health, ModelInfo, PredictResponse
from .uploads import FIELD

if TYPE_CHECKING:
    from ..model import Spade

__all__ = ["calibration_info", "create_app", "model_settings", "run_server"]

STATIC_DIR = Path(__file__).with_name("static")
DOCS_ASSETS = Path(fastapi_offline.__file__).with_name("static")
"""Swagger UI 5 (OpenAPI 3.1, as FastAPI writes it) shipped by the fastapi-offline package: /docs needs no CDN."""
PAGE_POLICY = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"

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
                            "description": f"One or several images ({', '.join(UPLOAD_FORMATS)}).",
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
        422: f"No file in the field '{FIELD}'; or a bad query parameter (threshold not a finite number, "
             "false_alarm_rate outside [1e-6, 0.5], or both given).",
        503: "Busy: all workers and queue places taken; retry after Retry-After seconds.",
    }.items()
}


def model_settings(model: Spade) -> dict[str, Any]:
    """The model's settings as `/v1/model` shows them: those the settings table stores in model files, JSON-friendly,
    with file paths (the backbone weights) reduced to the file name, so the server's folders are not disclosed."""
    values = stored(model.get_params())
    return {
        name: os.path.basename(os.fspath(value)) if BY_NAME[name].kind == "path" and value is not None else value
        for name, value in values.items()
    }


def calibration_info(model: Spade) -> CalibrationInfo | None:
    """How the model's thresholds were calibrated, as `/v1/model` shows it (without the list of good scores)."""
    cal = getattr(model, "calibration_", None)
    if cal is None:
        return None
    return CalibrationInfo(
        source=cal.source, n=cal.n, false_alarm_rate=cal.false_alarm_rate, guaranteed_rate=cal.guaranteed_rate,
        pixel_false_alarm_rate=cal.pixel_false_alarm_rate, median=cal.median, threshold_source=cal.threshold_source,
        note=cal.note,
    )


def _query_problem(exc: RequestValidationError) -> str:
    """A request validation error (a query parameter that is not a number) in plain words."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "query")
        shown = f" (got {error['input']!r})" if "input" in error else ""
        problems.append(f"bad query parameter {where}: {error.get('msg', 'invalid')}{shown}")
    return "; ".join(problems) or "bad request parameters"


def create_app(model: Spade, settings: ServiceSettings | None = None) -> FastAPI:
    """The FastAPI application serving the fitted `model` (shared by every request; its progress bars are turned
    off). The worker pool is shut down when the app's lifespan ends."""
    settings = settings or ServiceSettings()
    model.set_params(progress=False)
    predictor = Predictor(model, settings)

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

    @app.exception_handler(RequestValidationError)
    async def bad_parameters(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _query_problem(exc), "file": None}, 422)

    @app.exception_handler(ClientDisconnect)
    async def disconnected(_: Request, exc: ClientDisconnect) -> JSONResponse:
        return JSONResponse({"error": "the upload was interrupted", "file": None}, 400)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}", "file": None}, 500)

    @app.post(
        "/v1/predict", response_model=PredictResponse, openapi_extra=_PREDICT_BODY, responses=_PREDICT_ERRORS,
        summary="Score images: anomaly score, verdict, defect regions, heat map and overlay per image",
    )
    async def predict(
        request: Request,
        threshold: float | None = Query(
            None, description="Judge this request by this image threshold (a raw score) instead of the model's.",
        ),
        false_alarm_rate: float | None = Query(
            None, description="Judge this request by the threshold that keeps this share of good images flagged "
            "(conformal, from the model's good calibration scores; 1e-6 to 0.5). At most one of the two.",
        ),
    ) -> PredictResponse:
        return await predictor(request, threshold, false_alarm_rate)

    @app.get("/v1/model", response_model=ModelInfo, summary="The served model and the service limits")
    async def model_info() -> ModelInfo:
        return ModelInfo(
            version=__version__,
            backbone=model.backbone_.name,
            settings=model_settings(model),
            image_threshold=model.image_threshold_,
            pixel_threshold=model.pixel_threshold_,
            color_scale=predictor.color_scale,
            calibration=calibration_info(model),
            metrics=model.metrics_,
            n_train_images=len(model.train_names_),
            limits=settings.limits,
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

    from ..model import load

    settings = settings or ServiceSettings()
    model = load(model_path, weights=weights, device=device)
    uvicorn.run(
        create_app(model, settings), host=settings.host, port=settings.port,
        limit_concurrency=settings.max_connections, timeout_graceful_shutdown=5,
    )
