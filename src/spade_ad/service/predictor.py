"""Scoring uploads: admitted requests are decoded, scored and rendered in a pool of worker threads.

Images are checked and decoded by `spade_ad.images` (header first, before the request is queued; then in full, in
the worker), scored by the shared model under a lock (one forward pass at a time), and drawn with the colour scale
of `spade_ad.visualize.color_range`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from fastapi import Request
from PIL import Image

from ..errors import ImageReadError
from ..images import UPLOAD_FORMATS, check_bytes, decode_bytes
from ..visualize import color_range, heatmap, overlay, threshold_color_range
from .config import ServiceSettings
from .errors import image_error
from .schemas import ColorScale, ImageResult, PredictResponse
from .uploads import Capacity, check_request, read_files

if TYPE_CHECKING:
    from ..model import Prediction, Spade

__all__ = ["Predictor"]


def _png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class Predictor:
    """Scores uploads with the shared model in the worker pool, one image at a time per worker."""

    def __init__(self, model: Spade, settings: ServiceSettings) -> None:
        self.model = model
        self.settings = settings
        self.capacity = Capacity(settings.workers + settings.max_queue, settings.workers)
        self.executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="spade-infer")
        self._model_lock = threading.Lock()
        # The colour scale every heat map shares (calibrated models), else None (each image has its own).
        shared = threshold_color_range(model.pixel_threshold_)
        self.color_scale = ColorScale(vmin=shared[0], vmax=shared[1], fixed=True) if shared else None

    async def __call__(self, request: Request) -> PredictResponse:
        await check_request(request, self.settings)
        self.capacity.acquire_or_refuse()
        submitted = False
        try:
            files = await read_files(request, self.settings)
            for name, data in files:
                try:
                    check_bytes(data, name, max_pixels=self.settings.max_pixels, formats=UPLOAD_FORMATS)
                except ImageReadError as exc:
                    raise image_error(exc, name) from exc
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
            try:
                image = decode_bytes(data, name, max_pixels=self.settings.max_pixels, formats=UPLOAD_FORMATS)
                with self._model_lock:
                    [prediction] = self.model.iter_predict([image], original_size=True, keep_images=True)
            except ImageReadError as exc:
                raise image_error(exc, name) from exc
            results.append(self._render(name, prediction))
        seconds = time.perf_counter() - started
        self.capacity.record(seconds)
        return PredictResponse(results=results, seconds=round(seconds, 4))

    def _render(self, name: str, prediction: Prediction) -> ImageResult:
        full_map = prediction.original_map
        assert full_map is not None and prediction.image is not None
        vmin, vmax, fixed = color_range(full_map, self.model.pixel_threshold_)
        return ImageResult(
            file=name,
            width=prediction.image.width,
            height=prediction.image.height,
            score=prediction.score,
            threshold=self.model.image_threshold_,
            is_anomalous=prediction.is_anomalous,
            pixel_threshold=prediction.pixel_threshold,
            color_scale=ColorScale(vmin=vmin, vmax=vmax, fixed=fixed),
            heatmap=_png_data_url(heatmap(full_map, vmin, vmax)),
            overlay=_png_data_url(overlay(prediction.image, full_map, vmin, vmax, mask=prediction.defect_mask)),
        )
