"""Scoring uploads: admitted requests are decoded, scored and rendered in a pool of worker threads.

Images are checked and decoded by `spade_ad.data.images` (header first, before the request is queued; then in full, in
the worker), scored by the shared model under a lock (one forward pass at a time), and drawn with the colour scale
of `spade_ad.outputs.visualize.color_range`; the overlay is `spade_ad.outputs.visualize.overlay_picture`, the one render
the files of `spade-ad predict` and `watch` use too (the same pixels for the same prediction).

A request may ask for its own image threshold (`?threshold=` a raw score, or `?false_alarm_rate=` turned into a
threshold by `spade_ad.core.calibration.conformal_threshold` on the model's good calibration scores). It applies to that
request only: the shared model is never changed; each of the request's Predictions gets its verdict and normalised
score recomputed from its raw score (`RequestThreshold.apply`).

Every image is predicted with `explain=True`; a flagged one also gets the "why" picture of
`spade_ad.outputs.visualize.why_picture`. With `allow_add`, `add_good` adds uploads to the shared model as good images
(`Spade.add`) and saves it to the file the service was started with, under the same lock.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from fastapi import Request
from PIL import Image

from ...core.calibration import conformal_threshold
from ...core.shift import ShiftMonitor
from ...data.images import UPLOAD_FORMATS, check_bytes, decode_bytes
from ...errors import ImageReadError, SettingError
from ...outputs.png import encode_png
from ...outputs.visualize import color_range, heatmap, overlay_picture, threshold_color_range, why_picture
from ...settings import BY_NAME
from .config import ServiceSettings
from .errors import ApiError, image_error
from .schemas import (
    AddResponse,
    ColorScale,
    ImageResult,
    Neighbour,
    PredictResponse,
    RegionBody,
    RoiResponse,
    public_name,
)
from .uploads import Capacity, check_request, receive_files

if TYPE_CHECKING:
    from ...estimators.spade import Prediction, Spade
    from ...record.recorder import Recorder
    from ..publish import Publishers
    from .review import ReviewStore

__all__ = ["ADD_OFF", "Predictor", "RequestThreshold"]

ADD_OFF = "adding good images is off: start the service with --allow-add"
T = TypeVar("T")


def _explanation(prediction: Prediction) -> dict[str, Any] | None:
    """The prediction's explanation as JSON, the nearest good image's name reduced as `public_name` does."""
    if prediction.explanation is None:
        return None
    # numpy numbers (box corners, sizes) become plain JSON numbers
    body: dict[str, Any] = json.loads(json.dumps(prediction.explanation.to_json(), default=lambda v: v.item()))
    body["normal"] = public_name(str(body["normal"]))
    return body


def _png_data_url(image: Image.Image) -> str:
    """A picture as a PNG data URL, encoded as the files are (`png.encode_png`: about twice Pillow's speed)."""
    pixels = np.asarray(image if image.mode in ("L", "RGB") else image.convert("RGB"))
    return "data:image/png;base64," + base64.b64encode(encode_png(pixels)).decode("ascii")


@dataclass(frozen=True)
class RequestThreshold:
    """The image threshold one request is judged by: the model's (`source` "model"), or the one its query asked for
    (`source` "threshold" or "false_alarm_rate"), with a caveat `note`."""

    value: float | None
    source: str = "model"
    note: str = ""

    @classmethod
    def resolve(cls, model: Spade, threshold: float | None, false_alarm_rate: float | None) -> RequestThreshold:
        """The threshold asked for by the query parameters (at most one of them), checked; 422 when it is bad."""
        cal = model.calibration_
        if threshold is not None and false_alarm_rate is not None:
            raise ApiError(422, "give at most one of the query parameters threshold and false_alarm_rate")
        if threshold is not None:
            if not math.isfinite(threshold):
                raise ApiError(422, f"bad query parameter threshold: must be a finite number (got {threshold})")
            return cls(float(threshold), "threshold")
        if false_alarm_rate is not None:
            try:
                rate = BY_NAME["false_alarm_rate"].validate(false_alarm_rate)
            except SettingError as exc:
                raise ApiError(
                    422, f"bad query parameter false_alarm_rate: {exc.problem} (got {false_alarm_rate}); "
                    f"allowed: {exc.allowed}",
                ) from exc
            if not cal.scores:
                raise ApiError(422, "the model has no good calibration scores, so a false_alarm_rate cannot be turned "
                                    "into a threshold; ask for a threshold instead")
            value, note = conformal_threshold(cal.scores, rate)
            return cls(value, "false_alarm_rate", note)
        return cls(cal.image_threshold, "model", cal.note if cal.image_threshold is not None else "")

    def apply(self, prediction: Prediction, model: Spade) -> Prediction:
        """`prediction` judged by this threshold (the library's `Detector.judged`: the verdict made where `predict`
        makes it). The model's own threshold needs nothing: the model already judged by it."""
        if self.source == "model" or self.value is None:
            return prediction
        return model.judged(prediction, self.value)


class Predictor:
    """Scores uploads with the shared model in the worker pool, one image at a time per worker."""

    def __init__(self, model: Spade, settings: ServiceSettings, save_to: str | os.PathLike[str] | None = None, *,
                 recorder: Recorder | None = None, review: ReviewStore | None = None,
                 identity_file: str | os.PathLike[str] | None = None, publisher: Publishers | None = None,
                 name: str | None = None) -> None:
        self.model = model
        self.recorder = recorder  # with --record: every prediction recorded (`review.keep`)
        self.publisher = publisher  # with --publish: every prediction published (`spade_ad.apps.publish`)
        self.name = name  # the product's name (serve --models), in the published messages
        self.review = review
        self.identity_file = identity_file
        self.settings = settings
        self.save_to = save_to  # where `add_good` saves the model (the file the service was started with)
        self.capacity = Capacity(settings.workers + settings.max_queue, settings.workers)
        # Request bodies held at once (being received, waiting or being scored); the memory bound on uploads.
        self.uploads = Capacity(
            settings.max_uploads, settings.max_uploads,
            busy="the server is busy: too many uploads are being received; try again shortly",
        )
        self.executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="spade-infer")
        self._model_lock = threading.Lock()
        self.shift = ShiftMonitor()  # the uploads' scores against the calibration's (a new session is warned about)
        # The colour scale every heat map shares (calibrated models), else None (each image has its own).
        shared = threshold_color_range(model.pixel_threshold_)
        self.color_scale = ColorScale(vmin=shared[0], vmax=shared[1], fixed=True) if shared else None
        self._published_as = self._identify() if publisher is not None and recorder is None else None

    def _identify(self) -> tuple[str, str]:
        """(name, id) of the model in published messages without a record (with one: the recorder's)."""
        from ...record import model_identity

        path = self.identity_file or self.save_to
        identity = model_identity(self.model, path, name=self.name)
        return str(identity["name"]), str(identity["id"])

    def _publish(self, scored: list[tuple[str, bytes, Prediction]], results: list[ImageResult]) -> None:
        """Publish each scored upload (its record row id in the message when recorded)."""
        assert self.publisher is not None
        if self.recorder is not None:
            name, model_id = self.recorder.model_name, self.recorder.model_id
        else:
            assert self._published_as is not None
            name, model_id = self._published_as
        for (file, data, prediction), result in zip(scored, results, strict=True):
            self.publisher.inspection(prediction, source=file, sha256=hashlib.sha256(data).hexdigest(),
                                      model_name=name, model_id=model_id, inspection_id=result.inspection_id)

    async def __call__(
        self, request: Request, threshold: float | None = None, false_alarm_rate: float | None = None
    ) -> PredictResponse:
        applied = RequestThreshold.resolve(self.model, threshold, false_alarm_rate)
        return await self._admit(request, lambda files: self._score(files, applied))

    async def add_good(self, request: Request) -> AddResponse:
        """`POST /v1/good`: add the uploaded images to the shared model as good ones and save it to `save_to`
        (403 unless the service allows adding). Same checks, limits and admission as predict."""
        if not self.settings.allow_add or self.save_to is None:
            raise ApiError(403, ADD_OFF)
        return await self._admit(request, self._add)

    async def _admit(self, request: Request, job: Callable[[list[tuple[str, bytes]]], T]) -> T:
        """Receive the uploads within the limits, check their headers, and run `job` on them in the worker pool."""
        declared = check_request(request, self.settings)
        self.capacity.refuse_if_full()  # busy: answer before the body is read
        self.uploads.acquire_or_refuse()
        admitted = submitted = False
        try:
            # The body is received within read_timeout and holds an upload place, not a scoring one: slow clients
            # cannot take the workers' places.
            files = await receive_files(request, self.settings, declared)
            for name, data in files:
                try:
                    check_bytes(data, name, max_pixels=self.settings.max_pixels, formats=UPLOAD_FORMATS)
                except ImageReadError as exc:
                    raise image_error(exc, name) from exc
            self.capacity.acquire_or_refuse()
            admitted = True
            future = self.executor.submit(job, files)
            future.add_done_callback(lambda _: self.capacity.release())
            submitted = True
            return await asyncio.wrap_future(future)
        finally:
            self.uploads.release()
            if admitted and not submitted:
                self.capacity.release()

    def _add(self, files: list[tuple[str, bytes]]) -> AddResponse:
        """Worker-thread job: decode every file, then add them to the model and save it, under the model lock."""
        images = []
        for name, data in files:
            try:
                images.append(decode_bytes(data, name, max_pixels=self.settings.max_pixels, formats=UPLOAD_FORMATS))
            except ImageReadError as exc:
                raise image_error(exc, name) from exc
        return self.add_images(images)

    async def set_roi(self, request: Request) -> RoiResponse:
        """`PUT /v1/model/roi`: one uploaded mask image (white = inspect) becomes the served model's region of
        interest, saved to `save_to`; the same guard (--allow-add), checks, limits and admission as `/v1/good`."""
        if not self.settings.allow_add or self.save_to is None:
            raise ApiError(403, ADD_OFF)
        if not hasattr(self.model, "set_roi"):
            raise ApiError(409, "this model (an exported bundle) cannot take a region of interest: set it on the "
                                "model file with `spade-ad calibrate MODEL --good DIR --roi MASK` and export again")
        return await self._admit(request, self._set_roi)

    def _set_roi(self, files: list[tuple[str, bytes]]) -> RoiResponse:
        """Worker-thread job: decode the one mask, set it on the model and save the model, under the model lock."""
        if len(files) != 1:
            raise ApiError(400, f"send exactly one mask image (white = inspect), not {len(files)} files")
        name, data = files[0]
        try:
            mask = decode_bytes(data, name, max_pixels=self.settings.max_pixels, formats=UPLOAD_FORMATS)
        except ImageReadError as exc:
            raise image_error(exc, name) from exc
        assert self.save_to is not None
        with self._model_lock:
            try:
                self.model.set_roi(np.asarray(mask.convert("L")))
            except SettingError as exc:
                raise ApiError(400, str(exc)) from exc
            self.model.save(self.save_to)
            self._saved_model_changed()
            return RoiResponse(inspected_share=float(self.model.roi_.mean()),
                               image_threshold=self.model.image_threshold_, pixel_threshold=self.model.pixel_threshold_,
                               warning=self.model.calibration_.warning or "")

    def _saved_model_changed(self) -> None:
        """After `add` or a new ROI changed the model and it was saved (under the model lock): the shared colour
        scale follows its pixel threshold, and the next predictions are recorded (or published) under its new
        identity."""
        shared = threshold_color_range(self.model.pixel_threshold_)
        self.color_scale = ColorScale(vmin=shared[0], vmax=shared[1], fixed=True) if shared else None
        if self.recorder is not None:
            self.recorder.set_model(self.model, self.identity_file or self.save_to, name=self.recorder.model_name)
        elif self.publisher is not None:
            self._published_as = self._identify()

    def add_images(self, images: list[Any]) -> AddResponse:
        """Add images (decoded, or files) to the model as good ones and save it, under the model lock; with a
        record, the next predictions are recorded under the model's new identity."""
        assert self.save_to is not None
        with self._model_lock:
            self.model.add(images)
            self.model.save(self.save_to)  # atomic: written beside the file, then renamed over it
            self._saved_model_changed()
            return AddResponse(added=len(images), n_train_images=len(self.model.train_names_),
                               image_threshold=self.model.image_threshold_)

    @property
    def can_add(self) -> bool:
        return self.settings.allow_add and self.save_to is not None

    def _score(self, files: list[tuple[str, bytes]], applied: RequestThreshold) -> PredictResponse:
        """Worker-thread job: decode, score and render each file in turn."""
        started = time.perf_counter()
        results = []
        rows: list[dict[str, Any]] = []
        scored: list[tuple[str, bytes, Prediction]] = []  # published once recorded (with their row ids)
        for name, data in files:
            try:
                image = decode_bytes(data, name, max_pixels=self.settings.max_pixels, formats=UPLOAD_FORMATS)
                with self._model_lock:
                    [prediction] = self.model.iter_predict([image], original_size=True, keep_images=True,
                                                           explain=True)
                    thumbs = self.model.thumbnails_  # replaced, never changed, by `add`
            except ImageReadError as exc:
                raise image_error(exc, name) from exc
            warning = self.shift.add(self.model.calibration_, prediction.score)
            if warning is not None:
                from .context import logger

                logger.warning("%s%s", f"{self.name}: " if self.name else "", warning)
            prediction = applied.apply(prediction, self.model)
            scored.append((name, data, prediction))
            pictures: dict[str, Image.Image | None] = {}
            results.append(self._render(name, prediction, thumbs, pictures))
            if self.recorder is not None and self.review is not None:
                overlay_image = pictures["overlay"]
                assert overlay_image is not None
                rows.append(self.review.keep(self.recorder, name, data, prediction, overlay_image, pictures["why"]))
        if rows and self.recorder is not None:  # one transaction per request
            for result, inspection_id in zip(results, self.recorder.write(rows), strict=False):
                result.inspection_id = inspection_id
        if self.publisher is not None:
            self._publish(scored, results)
        seconds = time.perf_counter() - started
        self.capacity.record(seconds)
        return PredictResponse(
            results=results, seconds=round(seconds, 4), threshold=applied.value, threshold_source=applied.source,
            note=applied.note,
        )

    def _render(self, name: str, prediction: Prediction, thumbs: Sequence[np.ndarray],
                pictures: dict[str, Image.Image | None] | None = None) -> ImageResult:
        full_map = prediction.original_map
        assert full_map is not None and prediction.image is not None
        vmin, vmax, fixed = color_range(full_map, self.model.pixel_threshold_)
        regions = prediction.regions  # in original-image pixels: found in original_map
        picture = why_picture(prediction, thumbs) if prediction.is_anomalous else None  # drawn by the library
        shown = overlay_picture(prediction)  # the render the files use: the same pixels as `spade-ad predict`'s
        if pictures is not None:  # kept by the record
            pictures.update(overlay=shown, why=picture)
        return ImageResult(
            file=name,
            width=prediction.image.width,
            height=prediction.image.height,
            score=prediction.score,
            normalized_score=prediction.normalized_score,
            p_value=prediction.p_value,
            threshold=prediction.image_threshold,
            is_anomalous=prediction.is_anomalous,
            pixel_threshold=prediction.pixel_threshold,
            regions=[RegionBody.model_validate(region.to_json()) for region in regions],
            neighbours=[Neighbour(name=public_name(n), distance=d) for n, d in prediction.neighbours],
            color_scale=ColorScale(vmin=vmin, vmax=vmax, fixed=fixed),
            heatmap=_png_data_url(heatmap(full_map, vmin, vmax)),
            overlay=_png_data_url(shown),
            explanation=_explanation(prediction),
            why=None if picture is None else _png_data_url(picture),
        )
