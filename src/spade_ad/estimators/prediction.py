"""One image's result: scores, verdict, maps, and the defect regions a person acts on."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from scipy import ndimage

from ..core.geometry import Geometry

if TYPE_CHECKING:
    from ..core.explain import Explanation


@dataclass(frozen=True)
class Region:
    """A connected region of the defect mask (8-connected): bounding box (left, top, right, bottom; right and bottom
    exclusive) in the pixels of the map it was found in, its area in pixels, and its peak and mean score."""

    box: tuple[int, int, int, int]
    area: int
    peak: float
    mean: float

    def to_json(self) -> dict[str, object]:
        return {"box": list(self.box), "area": self.area, "peak": round(self.peak, 6), "mean": round(self.mean, 6)}


#: What `Prediction.regions` is derived from.
_REGIONS_FROM = {"anomaly_map", "original_map", "is_anomalous", "pixel_threshold"}


@dataclass(frozen=True)
class Prediction:
    """One image's result: immutable (`with_` makes a changed copy), so that what is derived from it (`regions`,
    computed once from the map, the verdict and the pixel threshold) can never go stale.

    `score` is the raw image score (its unit depends on `image_score`); `normalized_score` puts it on a scale where
    0 is the median good image and 1 the image threshold; `p_value` is the conformal p-value (the share of good
    calibration images that scored at least as high, counting this one): small means unlike the good images.
    `is_anomalous` is `score > image_threshold` (None when the model has no threshold). `anomaly_map` is at the
    network input resolution; `original_map` (on request) covers the whole original image, NaN where a pixel was
    not scored (outside the paper-crop box); `image` (on request) is the decoded input. `neighbours` names the
    nearest normal training images with their squared global-feature distances; `explanation` (on request) says
    where the strongest region sits in the nearest of them.
    """

    name: str
    path: Path | None
    score: float
    anomaly_map: np.ndarray
    geometry: Geometry
    original_map: np.ndarray | None = None
    image: Image.Image | None = None
    is_anomalous: bool | None = None
    pixel_threshold: float | None = None
    image_threshold: float | None = None
    normalized_score: float | None = None
    p_value: float | None = None
    neighbours: list[tuple[str, float]] = field(default_factory=list)
    explanation: Explanation | None = None  # with predict(..., explain=True): see `spade_ad.core.explain`

    def with_(self, **changes: object) -> Prediction:
        """A copy with `changes` (`dataclasses.replace`): a new name, or another verdict (made by
        `spade_ad.estimators.detector.Detector.judged`, the one place verdicts are made). Its `regions` are derived anew
        when a change touches what they come from, and carried over otherwise."""
        new = replace(self, **changes)
        if "regions" in self.__dict__ and not _REGIONS_FROM & changes.keys():
            new.__dict__["regions"] = self.__dict__["regions"]
        return new

    def without_pixels(self) -> Prediction:
        """A light copy to send elsewhere (a Ray actor to the driver): the decoded image and the original-size map
        dropped, its `regions` (found in that map, in original-image pixels) kept as they are."""
        light = replace(self, original_map=None, image=None)
        light.__dict__["regions"] = self.regions  # what cached_property stores: derived from the map dropped
        return light

    @property
    def verdict(self) -> str:
        """"defect" or "good" at the image threshold; "none" for a model without one (what the record, the published
        messages and `watch --move-to` say)."""
        if self.is_anomalous is None:
            return "none"
        return "defect" if self.is_anomalous else "good"

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(width, height) of the original image, when its decoded image or original-size map is kept."""
        if self.image is not None:
            return self.image.width, self.image.height
        if self.original_map is not None:
            height, width = self.original_map.shape[:2]
            return int(width), int(height)
        return None

    @property
    def defect_mask(self) -> np.ndarray | None:
        """Pixels above the pixel threshold (original size when available); None if uncalibrated."""
        if self.pixel_threshold is None:
            return None
        values = self.original_map if self.original_map is not None else self.anomaly_map
        return np.nan_to_num(values, nan=-np.inf) > self.pixel_threshold

    @cached_property
    def regions(self) -> list[Region]:
        """Connected regions of `defect_mask` on an anomalous image, strongest peak first; [] otherwise."""
        mask = self.defect_mask
        if mask is None or not self.is_anomalous or not mask.any():
            return []
        values = self.original_map if self.original_map is not None else self.anomaly_map
        labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
        regions = []
        for index, found in enumerate(ndimage.find_objects(labels), start=1):
            if found is None:
                continue
            inside = labels[found] == index
            scores = values[found][inside]
            rows, cols = found
            regions.append(Region(
                box=(int(cols.start), int(rows.start), int(cols.stop), int(rows.stop)), area=int(inside.sum()),
                peak=float(scores.max()), mean=float(scores.mean()),
            ))
        return sorted(regions, key=lambda r: -r.peak)
