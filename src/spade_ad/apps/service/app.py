"""The FastAPI application: routes, error answers, the OpenAPI description, and the request guards (request id and
internal errors: `context`; Host and origin: `guard`; CORS for `allow_origins`)."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import AsyncGenerator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fastapi_offline
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..._version import __version__
from ...data.images import UPLOAD_FORMATS
from ...settings import BY_NAME, stored
from .config import ServiceSettings
from .context import REQUEST_ID_HEADER, RequestContext
from .errors import ApiError
from .guard import HostOriginGuard, HostPolicy, OriginPolicy
from .predictor import Predictor
from .review import ReviewStore, add_review_routes
from .schemas import (
    AddResponse,
    CalibrationInfo,
    ErrorBody,
    Health,
    ModelInfo,
    PredictResponse,
    RoiResponse,
    public_name,
)
from .uploads import FIELD

if TYPE_CHECKING:
    from ...estimators.detector import FittedModel
    from ...estimators.spade import Spade

__all__ = ["ServedModel", "calibration_info", "create_app", "model_metrics", "model_settings"]

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
        400: "Empty, truncated or corrupt file, or a malformed upload; or a Host header this service does not "
             "answer (DNS-rebinding guard).",
        403: "A cross-origin request (Origin not the service's own nor allowed with --allow-origin).",
        408: "The body did not arrive within read_timeout seconds (the connection is closed).",
        413: "Upload over max_upload_bytes, or an image over max_pixels (decompression bomb).",
        415: "Not multipart/form-data, or a file that is not an image in a supported format.",
        422: f"No file in the field '{FIELD}'; or a bad query parameter (threshold not a finite number, "
             "false_alarm_rate outside [1e-6, 0.5], or both given).",
        500: "Internal error: only a request_id is given; the details are in the server's log under it.",
        503: "Busy: all workers and queue places, or all upload places, taken; retry after Retry-After seconds.",
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


def _plain(value: Any) -> Any:
    """A metric as JSON can carry it (numbers that are not finite as None, paths as file names), or `_plain` itself
    when it is not a single value."""
    value = value.item() if hasattr(value, "item") and getattr(value, "ndim", 0) == 0 else value
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return public_name(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    return _plain


def model_metrics(model: Spade) -> dict[str, Any]:
    """What the model knows about itself, flat (see `ModelInfo`): training images, thresholds, calibration, then the
    single-valued metrics the model file recorded (evaluation metrics, fit time), which never replace these."""
    metrics: dict[str, Any] = {
        "n_train_images": len(model.train_names_),
        "image_threshold": model.image_threshold_,
        "pixel_threshold": model.pixel_threshold_,
    }
    cal = getattr(model, "calibration_", None)
    if cal is not None:
        metrics.update(
            calibration_source=cal.source, calibration_n=cal.n, false_alarm_rate_asked=cal.false_alarm_rate,
            false_alarm_rate_guaranteed=cal.guaranteed_rate, pixel_false_alarm_rate=cal.pixel_false_alarm_rate,
            median_good_score=cal.median,
        )
    for name, value in (getattr(model, "metrics_", None) or {}).items():
        if str(name) not in metrics and _plain(value) is not _plain:
            metrics[str(name)] = _plain(value)
    return {name: _plain(value) for name, value in metrics.items()}


def calibration_info(model: Spade) -> CalibrationInfo | None:
    """How the model's thresholds were calibrated, as `/v1/model` shows it (without the list of good scores)."""
    cal = getattr(model, "calibration_", None)
    if cal is None:
        return None
    return CalibrationInfo(
        source=cal.source, n=cal.n, false_alarm_rate=cal.false_alarm_rate, guaranteed_rate=cal.guaranteed_rate,
        pixel_false_alarm_rate=cal.pixel_false_alarm_rate, median=cal.median, threshold_source=cal.threshold_source,
        note=cal.note, warning=getattr(cal, "warning", ""), sessions=cal.session_sizes,
    )


_PLACES = {"query": "query parameter", "path": "path parameter", "header": "header", "cookie": "cookie"}


def _query_problem(exc: RequestValidationError) -> str:
    """A request validation error (a query or path parameter that is not a number or out of range, a JSON body
    that does not match) in plain words, naming where: "bad query parameter limit: ...", "bad request body: ..."."""
    problems = []
    for error in exc.errors():
        place, *rest = [str(part) for part in error.get("loc", ())] or ["request"]
        where = "" if error.get("type") == "json_invalid" else ".".join(rest)  # there, rest is an offset
        shown = f" (got {error['input']!r})" if "input" in error and not isinstance(error["input"], dict) else ""
        message = error.get("msg", "invalid")
        if place in _PLACES:
            problems.append(f"bad {_PLACES[place]} {where}: {message}{shown}")
        else:  # the body (JSON that does not parse, a missing or wrong field)
            problems.append(f"bad request body{f' field {where}' if where else ''}: {message}"
                            f"{shown if where else ''}")
    return "; ".join(problems) or "bad request parameters"


@dataclass
class ServedModel:
    """One product's model in a service: `name` (in `/v1/models/{name}/...`), the fitted `model`, `model_file` (shown
    by name only), `save_to` (where `POST .../good` saves it, with allow_add) and `identity_file` (the file whose
    content hash identifies the model in the record; default `save_to`)."""

    name: str
    model: FittedModel
    model_file: str | os.PathLike[str] | None = None
    save_to: str | os.PathLike[str] | None = None
    identity_file: str | os.PathLike[str] | None = None


def create_app(
    model: Spade | None, settings: ServiceSettings | None = None, *, model_file: str | os.PathLike[str] | None = None,
    save_to: str | os.PathLike[str] | None = None, review: ReviewStore | None = None,
    identity_file: str | os.PathLike[str] | None = None, products: Sequence[ServedModel] = (),
    publisher: Any = None,
) -> FastAPI:
    """The FastAPI application serving the fitted `model` (shared by every request; its progress bars are turned
    off); `model_file`: the model's file, shown by `/v1/model` as its name only; `save_to`: where `POST /v1/good`
    saves the model after adding images (with `settings.allow_add`; default `model_file`). `products`: several
    models instead of `model` (each under `/v1/models/{name}/...`; the first also under `/v1/predict`, `/v1/good`,
    `/v1/model`). `review`: the inspection record (`spade_ad.apps.service.review`): every prediction recorded, and the
    review, history and drift routes. The worker pools are shut down when the app's lifespan ends."""
    settings = settings or ServiceSettings()
    entries = list(products) or [ServedModel("default", model, model_file, save_to, identity_file)]
    served: dict[str, tuple[ServedModel, Predictor]] = {}
    for entry in entries:
        if entry.name in served:
            raise ValueError(f"two served models are named {entry.name!r}")
        entry.model.set_params(progress=False)
        target = entry.save_to if entry.save_to is not None else entry.model_file
        recorder = None if review is None else review.recorder(
            entry.name, entry.model, entry.identity_file if entry.identity_file is not None else target)
        served[entry.name] = (entry, Predictor(entry.model, settings, save_to=target, recorder=recorder,
                                               review=review, identity_file=entry.identity_file or target,
                                               publisher=publisher, name=entry.name if products else None))
    default_entry, predictor = next(iter(served.values()))

    def product(name: str) -> tuple[ServedModel, Predictor]:
        if name not in served:
            raise ApiError(404, f"no model named {name!r} is served; served: {', '.join(served)}")
        return served[name]

    def describe(entry: ServedModel, served_predictor: Predictor) -> ModelInfo:
        served_model = served_predictor.model
        return ModelInfo(
            version=__version__,
            model_file=os.path.basename(os.fspath(entry.model_file)) if entry.model_file is not None else None,
            backbone=served_model.backbone,
            settings=model_settings(served_model),
            image_threshold=served_model.image_threshold_,
            pixel_threshold=served_model.pixel_threshold_,
            color_scale=served_predictor.color_scale,
            calibration=calibration_info(served_model),
            metrics=model_metrics(served_model),
            n_train_images=len(served_model.train_names_),
            limits=settings.limits,
            allow_add=settings.allow_add and served_predictor.save_to is not None,
            name=entry.name,
            record=review is not None,
        )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncGenerator[None, None]:
        yield
        for _, each in served.values():
            each.executor.shutdown(wait=False, cancel_futures=True)
        if review is not None:
            review.close()

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

    threshold_query = Query(
        None, description="Judge this request by this image threshold (a raw score) instead of the model's.",
    )
    rate_query = Query(
        None, description="Judge this request by the threshold that keeps this share of good images flagged "
        "(conformal, from the model's good calibration scores; 1e-6 to 0.5). At most one of the two.",
    )
    good_errors = {**_PREDICT_ERRORS, 403: {"model": ErrorBody, "description": "Adding good images is off (start "
                   "the service with --allow-add); or a cross-origin request."}}

    @app.post(
        "/v1/predict", response_model=PredictResponse, openapi_extra=_PREDICT_BODY, responses=_PREDICT_ERRORS,
        summary="Score images: anomaly score, verdict, defect regions, heat map and overlay per image",
    )
    async def predict(request: Request, threshold: float | None = threshold_query,
                      false_alarm_rate: float | None = rate_query) -> PredictResponse:
        return await predictor(request, threshold, false_alarm_rate)

    @app.post(
        "/v1/good", response_model=AddResponse, openapi_extra=_PREDICT_BODY, responses=good_errors,
        summary="Add images to the model as good ones (only with --allow-add) and save the model to its file",
    )
    async def add_good(request: Request) -> AddResponse:
        return await predictor.add_good(request)

    @app.put(
        "/v1/model/roi", response_model=RoiResponse, openapi_extra=_PREDICT_BODY, responses=good_errors,
        summary="Set the model's region of interest from one mask image (white = inspect; only with --allow-add) "
        "and save the model to its file",
    )
    async def set_roi(request: Request) -> RoiResponse:
        return await predictor.set_roi(request)

    @app.get("/v1/model", response_model=ModelInfo, summary="The served model and the service limits")
    async def model_info() -> ModelInfo:
        return describe(default_entry, predictor)

    @app.get("/v1/models", response_model=list[ModelInfo], summary="Every served model (one per product)")
    async def models_info() -> list[ModelInfo]:
        return [describe(entry, each) for entry, each in served.values()]

    @app.post(
        "/v1/models/{name}/predict", response_model=PredictResponse, openapi_extra=_PREDICT_BODY,
        responses={**_PREDICT_ERRORS, 404: {"model": ErrorBody, "description": "No model of that name is served."}},
        summary="Score images with the model of one product",
    )
    async def predict_with(name: str, request: Request, threshold: float | None = threshold_query,
                           false_alarm_rate: float | None = rate_query) -> PredictResponse:
        return await product(name)[1](request, threshold, false_alarm_rate)

    @app.post("/v1/models/{name}/good", response_model=AddResponse, openapi_extra=_PREDICT_BODY,
              responses=good_errors, summary="Add good images to the model of one product (only with --allow-add)")
    async def add_good_to(name: str, request: Request) -> AddResponse:
        return await product(name)[1].add_good(request)

    @app.get("/v1/models/{name}", response_model=ModelInfo, summary="The model of one product")
    async def model_info_of(name: str) -> ModelInfo:
        return describe(*product(name))

    @app.get("/healthz", response_model=Health, summary="Liveness and load")
    async def healthz() -> Health:
        each = [p for _, p in served.values()]
        return Health(status="ok", in_flight=sum(p.capacity.in_flight for p in each),
                      capacity=sum(p.capacity.limit for p in each),
                      uploads=sum(p.uploads.in_flight for p in each), max_uploads=sum(p.uploads.limit for p in each))

    add_review_routes(app, review, served)

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
    # Added innermost first: RequestContext (request id, 500s) -> HostOriginGuard -> CORS (only when asked for).
    origins = OriginPolicy(settings)
    if origins.any or origins.allowed:
        app.add_middleware(
            CORSMiddleware, allow_origins=origins.cors_origins(), allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", REQUEST_ID_HEADER], expose_headers=[REQUEST_ID_HEADER, "Retry-After"],
        )
    app.add_middleware(HostOriginGuard, hosts=HostPolicy(settings), origins=origins)
    app.add_middleware(RequestContext)
    return app
