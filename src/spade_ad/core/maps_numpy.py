"""Anomaly maps after the search, in numpy and scipy only: per-position scores from neighbour distances, fusion of
the pyramid levels, Gaussian smoothing, the map's part of the image score and the map at the original image size.

Written once for both scoring paths: the torch path (`spade_ad.core.scoring`, CPU or GPU search) hands its per-level
distance maps here, and the torch-free runtime (`spade_ad.estimators.runtime`) does the same with its numpy search, so
the two cannot drift apart. The maps here are small (a few hundred thousand values): numpy costs about as much as torch.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..errors import SettingError
from .geometry import Geometry

#: Share of a map's highest values that image_score="map_top" averages (1%: a defect's area, not one pixel).
TOP_SHARE = 0.01


def position_scores(squared: np.ndarray, distance: str) -> np.ndarray:
    """Each query position's score (Q,) from its kappa smallest squared distances (Q, kappa): the mean Euclidean
    distance ("euclidean") or mean squared distance ("squared")."""
    squared = np.asarray(squared, dtype=np.float32)
    values = np.sqrt(np.maximum(squared, 0)) if distance == "euclidean" else squared
    return values.mean(axis=1)


def upsample(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D map to `size` (height, width) with half-pixel centres and clamped borders: the
    convention of torch's `interpolate(..., mode="bilinear", align_corners=False)` (checked by a test). Separable:
    rows, then columns, two source values per output value."""
    grid = np.asarray(grid, dtype=np.float32)
    rows = _linear_taps(grid.shape[0], size[0])
    cols = _linear_taps(grid.shape[1], size[1])
    tall = grid[rows[0]] * rows[2][:, None] + grid[rows[1]] * rows[3][:, None]
    return tall[:, cols[0]] * cols[2] + tall[:, cols[1]] * cols[3]


def _linear_taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(first index, second index, first weight, second weight) of each output position along one axis."""
    if source == target:
        index = np.arange(target)
        return index, index, np.ones(target, np.float32), np.zeros(target, np.float32)
    position = np.maximum((np.arange(target, dtype=np.float64) + 0.5) * (source / target) - 0.5, 0.0)
    first = np.minimum(np.floor(position).astype(np.int64), source - 1)
    second = np.minimum(first + 1, source - 1)
    weight = (position - first).astype(np.float32)
    return first, second, 1 - weight, weight


def fuse(level_maps: list[np.ndarray], input_size: tuple[int, int]) -> np.ndarray:
    """"mean" fusion: every level's (h_l, w_l) score map upsampled to the network input size and averaged."""
    return np.mean([upsample(grid, input_size) for grid in level_maps], axis=0, dtype=np.float32)


def smooth(anomaly_map: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing: kernel radius 4 sigma (at most the map's shorter side minus one), mirrored borders
    (d c b | a b c d), two 1-D passes (the Gaussian is separable); sigma <= 0 returns the map unchanged."""
    anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
    if sigma <= 0:
        return anomaly_map
    radius = min(int(4 * sigma + 0.5), min(anomaly_map.shape) - 1)
    if radius < 1:
        return anomaly_map
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    smoothed = ndimage.correlate1d(anomaly_map, kernel, axis=1, mode="mirror")
    return ndimage.correlate1d(smoothed, kernel, axis=0, mode="mirror")


def coarse_map(grid: np.ndarray, input_size: tuple[int, int], sigma: float) -> np.ndarray:
    """The coarsest pyramid level's own map (h, w) as the fused map is made: upsampled to the network input size
    and smoothed. Its top 1% (`map_score(..., "map_top")`) is the fused image score's third part."""
    return smooth(upsample(grid, input_size), sigma)


def map_score(anomaly_map: np.ndarray, image_score: str, top_count: int | None = None) -> float:
    """The map's part of the image score: with "map_max" its maximum, otherwise ("map_top", and the map part of
    "fused") the mean of its highest TOP_SHARE values (less sensitive to one noisy peak on large, busy images such
    as long fabric strips), or of its `top_count` highest values when given (tiled mode: a tile's share, so that a
    small defect is not averaged away over a whole large image). NaN pixels (not scored) are left out."""
    flat = anomaly_map.ravel()
    if np.isnan(flat).any():  # pixels outside a region of interest (or a crop) are not scored
        flat = flat[~np.isnan(flat)]
        if not flat.size:
            return 0.0
    if image_score == "map_max":
        return float(flat.max())
    count = max(1, min(flat.size, int(flat.size * TOP_SHARE) if top_count is None else top_count))
    return float(np.partition(flat, flat.size - count)[flat.size - count:].mean())


def map_to_original(anomaly_map: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Resize a map at input resolution onto the whole original image; pixels outside the scored box are NaN."""
    height, width = geometry.original_size
    left, top, right, bottom = geometry.crop_box
    box = (int(round(left)), int(round(top)), int(round(right)), int(round(bottom)))
    inner = upsample(anomaly_map, (box[3] - box[1], box[2] - box[0]))
    if box == (0, 0, width, height):
        return inner
    full = np.full((height, width), np.nan, dtype=np.float32)
    full[box[1]:box[3], box[0]:box[2]] = inner
    return full


def roi_grid(roi: np.ndarray, box: tuple[float, float, float, float], original_size: tuple[int, int],
             shape: tuple[int, int]) -> np.ndarray:
    """A region of interest (bool (H, W), in original-image pixels; True = inspect) on a map of `shape` (h, w)
    that covers `box` (left, top, right, bottom) of an image of `original_size` (height, width): nearest
    neighbour, each map pixel taking the ROI pixel under its centre. An ROI of another size than the image is
    scaled to it (a fixtured camera's images all have one size)."""
    roi = np.asarray(roi, dtype=bool)
    scale_y, scale_x = roi.shape[0] / original_size[0], roi.shape[1] / original_size[1]
    left, top, right, bottom = box
    rows = (top + (np.arange(shape[0]) + 0.5) * (bottom - top) / shape[0]) * scale_y
    cols = (left + (np.arange(shape[1]) + 0.5) * (right - left) / shape[1]) * scale_x
    rows = np.clip(rows.astype(np.int64), 0, roi.shape[0] - 1)
    cols = np.clip(cols.astype(np.int64), 0, roi.shape[1] - 1)
    return roi[np.ix_(rows, cols)]


def apply_roi(anomaly_map: np.ndarray, roi: np.ndarray | None, geometry: Geometry) -> np.ndarray:
    """The map (at the network input size of `geometry`) with NaN outside the region of interest (not scored:
    ignored by `map_score`, the regions and the pixel threshold); the map itself when `roi` is None."""
    if roi is None:
        return anomaly_map
    inside = roi_grid(roi, geometry.crop_box, geometry.original_size, anomaly_map.shape)
    return np.where(inside, anomaly_map, np.float32(np.nan)).astype(np.float32, copy=False)


def original_with_roi(anomaly_map: np.ndarray, roi: np.ndarray | None, geometry: Geometry) -> np.ndarray:
    """`map_to_original` of a map masked by `apply_roi`: resized without the NaN (so the ROI's edge is not eaten
    by the bilinear resize), then masked at the original size."""
    if roi is None:
        return map_to_original(anomaly_map, geometry)
    full = map_to_original(np.nan_to_num(anomaly_map, nan=0.0), geometry)
    height, width = geometry.original_size
    inside = roi_grid(roi, (0.0, 0.0, float(width), float(height)), geometry.original_size, full.shape)
    full[~inside] = np.nan
    return full


def as_roi(value: object) -> np.ndarray | None:
    """A region of interest as a bool array (H, W), True = inspect, in the images' original pixels: from a mask
    file (PNG: white = inspect, black = ignore; any pixel over half grey counts as white), a PIL image or an
    array; None stays None. A mask with nothing to inspect raises SettingError naming `roi`."""
    if value is None:
        return None
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, (str, bytes)) or hasattr(value, "__fspath__"):
        try:
            with Image.open(value) as opened:  # type: ignore[arg-type]
                value = opened.convert("L")
        except (OSError, UnidentifiedImageError) as exc:
            raise SettingError("roi", f"cannot be read as an image ({type(exc).__name__})", str(value),
                               "a mask image, white where to inspect") from exc
    if isinstance(value, Image.Image):
        value = np.asarray(value.convert("L"))
    array = np.asarray(value)
    if array.ndim == 3:
        array = array.max(axis=-1)
    if array.ndim != 2 or min(array.shape) < 1:
        raise SettingError("roi", "is not a 2-D mask", f"shape {array.shape}", "a mask image (H, W), white = inspect")
    inside = array > 127 if array.dtype == np.uint8 else array.astype(np.float64) > 0.5
    if not inside.any():
        raise SettingError("roi", "has no white (inspected) pixel", f"{array.shape[1]} x {array.shape[0]} mask",
                           "a mask with white where to inspect")
    return inside
