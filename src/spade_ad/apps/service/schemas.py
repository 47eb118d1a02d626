"""Response bodies of the service (also its OpenAPI schema)."""

from __future__ import annotations

from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from pydantic import BaseModel

__all__ = [
    "AddResponse", "CalibrationInfo", "ColorScale", "ErrorBody", "Health", "ImageResult", "ModelInfo", "Neighbour",
    "PredictResponse", "RegionBody", "public_name",
]


def public_name(name: str) -> str:
    """A file name fit to show a client: an absolute path, or one that climbs out of its folder (".."), is reduced
    to its last part, so the server's folders are not disclosed; a name relative to a folder ("good/000.png") is
    kept."""
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or ".." in posix.parts or PureWindowsPath(name).drive or name.startswith("~"):
        return posix.name
    return name


class ColorScale(BaseModel):
    """Anomaly values mapped to the lowest (vmin) and highest (vmax) colour; `fixed`: the same for every image."""

    vmin: float
    vmax: float
    fixed: bool


class RegionBody(BaseModel):
    """A connected region of the defect mask: its box (left, top, right, bottom; right and bottom exclusive) in the
    image's own pixels, its area in pixels, and its peak and mean anomaly value."""

    box: list[int]
    area: int
    peak: float
    mean: float


class Neighbour(BaseModel):
    """A nearest normal training image: its name and squared distance in global-feature space."""

    name: str
    distance: float


class ImageResult(BaseModel):
    """One image's result. `score` is the raw score; `normalized_score` puts it on a scale where 0 is the median good
    image and 1 the `threshold` applied (above 1: anomalous); `p_value` is the conformal p-value (the share of good
    calibration images scoring at least as high: small means unlike the good images). `threshold` is the image
    threshold applied to this request (the model's, or the one asked for in the query). `regions` are the defect
    regions of an anomalous image, strongest first; `neighbours` the nearest normal training images. `heatmap` and
    `overlay` are PNG data URLs at the image's own size; the overlay shows the region boxes and the verdict.
    `explanation`: where the strongest region matched in the nearest good training image (`normal` its name,
    `normal_input_size`, `region_box` in model-input pixels, `matches` per pyramid level), or null. `why`: for a
    flagged image, a PNG data URL of the image with that region boxed next to the nearest good image's thumbnail
    with the matched area boxed (`spade_ad.outputs.visualize.why_picture`); else null."""

    file: str
    width: int
    height: int
    score: float
    normalized_score: float | None
    p_value: float | None
    threshold: float | None
    is_anomalous: bool | None
    pixel_threshold: float | None
    regions: list[RegionBody]
    neighbours: list[Neighbour]
    color_scale: ColorScale
    heatmap: str
    overlay: str
    explanation: dict[str, Any] | None = None
    why: str | None = None
    inspection_id: int | None = None  # its row in the inspection record (`--record`), once written


class PredictResponse(BaseModel):
    """Results in upload order, and the seconds spent scoring them (queue wait excluded). `threshold` is the image
    threshold applied, `threshold_source` where it came from ("model", or "threshold" / "false_alarm_rate" when the
    query asked for one), `note` a caveat about it (e.g. too few good images for the rate asked for)."""

    results: list[ImageResult]
    seconds: float
    threshold: float | None = None
    threshold_source: str = "model"
    note: str = ""


class CalibrationInfo(BaseModel):
    """How the model's thresholds were calibrated: from which good images (`source`: "leave_one_out", "validation"
    or "none"; `n` of them), the image false-alarm rate asked for and the one the threshold guarantees (conformal
    bound), the pixel false-alarm rate, the median good score (0 on the normalised scale), how the image threshold was
    set (`threshold_source`), any caveat (`note`), when good images held out at fit or added by calibrate scored
    above the ones before them so that a threshold from those would not hold, a `warning` in words ("" if none),
    and when fit found capture sessions in its training images and left each out whole, their sizes (`sessions`,
    [] if none)."""

    source: str
    n: int
    false_alarm_rate: float
    guaranteed_rate: float | None
    pixel_false_alarm_rate: float
    median: float | None
    threshold_source: str
    note: str
    warning: str = ""
    sessions: list[int] = []


class ModelInfo(BaseModel):
    """The served model: its file's name (never a path), backbone, settings (the stored ones of the settings table;
    file paths as file names only), calibrated thresholds and how they were calibrated, `metrics` (what the model
    knows about itself, flat: `n_train_images`, `image_threshold`, `pixel_threshold`, `calibration_source`,
    `calibration_n`, `false_alarm_rate_asked`, `false_alarm_rate_guaranteed`, `pixel_false_alarm_rate`,
    `median_good_score`, then whatever the model file recorded, e.g. the evaluation's `image_auroc`, `pixel_auroc`,
    `au_pro`, `false_alarm_rate_measured`; numbers that are not finite as null), and the service's limits and
    timeouts. `allow_add`: whether `POST /v1/good` may add images to the model (`--allow-add`). `name`: the product's
    name in `/v1/models/{name}/...` ("default" for a service of one model); `record`: whether the service keeps an
    inspection record (`--record`: the review, history and drift routes)."""

    version: str
    model_file: str | None = None
    backbone: str
    settings: dict[str, Any]
    image_threshold: float | None
    pixel_threshold: float | None
    color_scale: ColorScale | None
    calibration: CalibrationInfo | None
    metrics: dict[str, Any]
    n_train_images: int
    limits: dict[str, int | float]
    allow_add: bool = False
    name: str = "default"
    record: bool = False


class RoiResponse(BaseModel):
    """`PUT /v1/model/roi`: the share of the image's pixels now inspected, the thresholds now (recomputed inside
    the region with leave-one-out calibration) and a warning when they could not be (recalibrate with
    `spade-ad calibrate --good DIR --roi MASK`)."""

    inspected_share: float
    image_threshold: float | None
    pixel_threshold: float | None
    warning: str


class AddResponse(BaseModel):
    """`POST /v1/good`: how many images were added as good ones, the model's training images now, and its image
    threshold now (recomputed with leave-one-out calibration, else kept)."""

    added: int
    n_train_images: int
    image_threshold: float | None


class Health(BaseModel):
    """`in_flight`: predict requests running or waiting; `capacity`: how many may be. `uploads`: predict requests
    holding a body (being received, waiting or running); `max_uploads`: how many may."""

    status: str
    in_flight: int
    capacity: int
    uploads: int
    max_uploads: int


class ErrorBody(BaseModel):
    """What went wrong, in plain words, and the uploaded file it concerns (if one). An internal error (500) says only
    "internal error" and its `request_id` (also in the `X-Request-ID` header); the details are in the server's log."""

    error: str
    file: str | None = None
    request_id: str | None = None
