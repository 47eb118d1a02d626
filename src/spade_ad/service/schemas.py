"""Response bodies of the service (also its OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

__all__ = ["ColorScale", "ErrorBody", "Health", "ImageResult", "ModelInfo", "PredictResponse"]


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
    """The served model: backbone, settings (the stored ones of the settings table; file paths as file names only),
    calibrated thresholds, stored evaluation metrics, service limits."""

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
