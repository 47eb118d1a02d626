"""Render anomaly maps for people: colour heat maps, overlays on the inspected image, mask contours.

Only numpy, Pillow and matplotlib's colormap registry are used (no pyplot, no GUI backend), so these
functions work in servers and tests.  NaN in an anomaly map means "not scored" and is shown as such
(mid-grey in a heat map, the untouched image in an overlay) rather than as a low score.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import binary_erosion

__all__ = ["color_range", "contour", "heatmap", "overlay", "save_png", "threshold_color_range"]

NAN_GREY = (128, 128, 128)


def heatmap(
    anomaly_map: np.ndarray,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "jet",
) -> Image.Image:
    """Colour an (H, W) anomaly map as an RGB image.

    Scores are scaled linearly from `vmin` (lowest colour) to `vmax` (top colour) and clipped; each bound
    defaults to the map's smallest/largest finite score.  Pass fixed bounds to make several maps comparable.
    A constant map (or vmax <= vmin) is drawn in the lowest colour.  NaN pixels are mid-grey.
    """
    scores = _as_map(anomaly_map)
    return Image.fromarray(_colour(scores, *_bounds(scores, vmin, vmax), cmap))


def overlay(
    image: Image.Image,
    anomaly_map: np.ndarray,
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    mask: np.ndarray | None = None,
) -> Image.Image:
    """Blend the heat map of `anomaly_map` over `image` (RGB result, the image's size).

    `alpha` is the heat map's weight.  A map of another shape is resized bilinearly to the image; colour
    bounds are taken from the map before resizing.  Where the map is NaN the image is left unchanged.  If
    `mask` (bool or 0/255, e.g. the predicted defect region) is given, its outline is drawn in white.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = image.convert("RGB")
    scores = _as_map(anomaly_map)
    low, high = _bounds(scores, vmin, vmax)
    size = base.size  # (width, height)
    if scores.shape != (size[1], size[0]):
        missing = np.isnan(scores)
        filled = np.where(missing, low, scores).astype(np.float32)
        scores = np.asarray(Image.fromarray(filled).resize(size, Image.Resampling.BILINEAR), dtype=np.float64)
        gaps = Image.fromarray(missing.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
        scores = np.where(np.asarray(gaps) > 0, np.nan, scores)
    pixels = np.asarray(base, dtype=np.float64)
    blended = (1.0 - alpha) * pixels + alpha * _colour(scores, low, high, cmap)
    blended = np.where(np.isnan(scores)[..., None], pixels, blended)
    result = Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))
    return result if mask is None else contour(result, mask, color=(255, 255, 255))


def contour(image: Image.Image, mask: np.ndarray, color: tuple[int, int, int] = (0, 255, 0)) -> Image.Image:
    """Return a copy of `image` (RGB) with the 1-pixel inner outline of `mask` drawn in `color`.

    `mask` is bool or 0/255 (anything > 0 is inside); one of another shape is resized (nearest) to the
    image.  The outline is the mask pixels that touch a non-mask pixel; the image border does not count
    as outside, so a region running off the edge is not boxed in by a line along the border.
    """
    base = image.convert("RGB")
    inside = np.asarray(mask) > 0
    if inside.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {inside.shape}")
    if inside.shape != (base.height, base.width):
        resized = Image.fromarray(inside.astype(np.uint8) * 255).resize(base.size, Image.Resampling.NEAREST)
        inside = np.asarray(resized) > 0
    edge = inside & ~binary_erosion(inside, border_value=1)
    pixels = np.array(base)
    pixels[edge] = color
    return Image.fromarray(pixels)


def save_png(img: Image.Image, path: str | Path) -> Path:
    """Save `img` as PNG at `path`, creating parent folders; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path


def _as_map(anomaly_map: np.ndarray) -> np.ndarray:
    scores = np.asarray(anomaly_map, dtype=np.float64)
    if scores.ndim != 2 or scores.size == 0:
        raise ValueError(f"anomaly map must be a non-empty 2-D (H, W) array, got shape {scores.shape}")
    return scores


def _bounds(scores: np.ndarray, vmin: float | None, vmax: float | None) -> tuple[float, float]:
    """Colour-scale bounds: the given ones, else the finite extremes of the map (0 for an all-NaN map)."""
    finite = scores[np.isfinite(scores)]
    low = float(vmin) if vmin is not None else float(finite.min()) if finite.size else 0.0
    high = float(vmax) if vmax is not None else float(finite.max()) if finite.size else 0.0
    return low, high


def _colour(scores: np.ndarray, low: float, high: float, cmap: str) -> np.ndarray:
    """(H, W, 3) uint8 colours of `scores` scaled to [low, high]; NaN → mid-grey."""
    import matplotlib  # deferred: only colormaps are needed, and importing matplotlib is slow

    missing = np.isnan(scores)
    if high > low:
        unit = np.clip((np.where(missing, low, scores) - low) / (high - low), 0.0, 1.0)
    else:
        unit = np.zeros(scores.shape)
    rgb = matplotlib.colormaps[cmap](unit, bytes=True)[..., :3]
    rgb[missing] = NAN_GREY
    return rgb


#: Heat maps of a calibrated model share one colour scale, 0 .. THRESHOLD_SCALE x the pixel threshold, so that maps
#: compare between images and the threshold always has the same colour (two thirds up: yellow in "jet").
THRESHOLD_SCALE = 1.5


def threshold_color_range(pixel_threshold: float | None) -> tuple[float, float] | None:
    """The shared (vmin, vmax) for a model's heat maps, or None (per-image range) when it has no threshold."""
    return (0.0, THRESHOLD_SCALE * pixel_threshold) if pixel_threshold is not None else None


def color_range(anomaly_map: np.ndarray, pixel_threshold: float | None) -> tuple[float, float, bool]:
    """The colour scale of one heat map: (vmin, vmax, fixed).

    A calibrated model (`pixel_threshold` set) gets the shared scale of `threshold_color_range` (fixed=True: the
    same for every image); an uncalibrated one gets the map's own finite min..max (fixed=False; 0..0 when the
    map is all NaN), which is what `heatmap` and `overlay` use when given no bounds.
    """
    shared = threshold_color_range(pixel_threshold)
    if shared is not None:
        return shared[0], shared[1], True
    low, high = _bounds(_as_map(anomaly_map), None, None)
    return low, high, False
