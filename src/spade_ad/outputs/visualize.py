"""Render anomaly maps for people: colour heat maps, overlays on the inspected image, mask contours, and the
annotations a person acts on (a box and peak score per defect region, the verdict in a corner label).

Only numpy and Pillow (ImageDraw with its built-in default font: no font files; a built-in copy of matplotlib's
"jet" table) are used: no matplotlib, so these functions work in servers, tests and the light runtime install.
NaN in an anomaly map means "not scored" and is shown as such (mid-grey in a heat map, the untouched image in an
overlay) rather than as a low score. PNG files are encoded by `spade_ad.outputs.png`.
Files (`spade_ad.outputs.writers`: predict, watch, the Ray actors) and the service draw an image's overlay through one
function, `overlay_picture`, so the same prediction gives the same pixels whoever shows it. For a calibrated model
it shows heat only where it matters: pixels below `HEAT_FROM` (0.75) x the pixel threshold are left as they are (a
good part looks like itself), the rest is coloured on the shared scale (0 .. 1.5 x the pixel threshold, the
threshold yellow), the defect mask is outlined in white, and a legend in the bottom-left corner states the scale in
multiples of the pixel threshold. An uncalibrated model has no level to cut at: its overlay is washed in its own
min..max scale (as every overlay was before), with the raw score in the corner label.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from ..estimators.prediction import Prediction, Region

__all__ = [
    "HEAT_FROM", "annotate", "color_range", "contour", "heat_level", "heatmap", "overlay", "overlay_picture",
    "threshold_color_range", "verdict_label", "side_by_side", "why_picture",
]

NAN_GREY = (128, 128, 128)
BOX_COLOR = (255, 0, 255)  # magenta: not in the "jet" colour map, so a box stands out from any heat
LABEL_COLORS = {True: (179, 38, 30), False: (27, 110, 53), None: (95, 99, 104)}  # DEFECT red, OK green, no verdict
TEXT_COLOR = (255, 255, 255)


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
    level: float | None = None,
) -> Image.Image:
    """Blend the heat map of `anomaly_map` over `image` (RGB result, the image's size).

    `alpha` is the heat map's weight.  A map of another shape is resized bilinearly to the image; colour
    bounds are taken from the map before resizing.  Where the map is NaN, or below `level` when one is given
    (heat only where it matters: see `heat_level`), the image is left unchanged.  If `mask` (bool or 0/255, e.g.
    the predicted defect region) is given, its outline is drawn in white.
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
    with np.errstate(invalid="ignore"):  # NaN is never shown
        shown = np.isfinite(scores) if level is None else scores >= level
    box = _box(shown)
    if box is not None:  # blended on the box around the heat, pasted where it is shown (Pillow: a fast masked copy)
        top, bottom, left, right = box
        rows, cols = slice(top, bottom), slice(left, right)
        heat = Image.frombytes("P", (right - left, bottom - top), _colour_index(scores[rows, cols], low, high))
        heat.putpalette(_lookup_table(cmap).tobytes())
        blended = Image.blend(base.crop((left, top, right, bottom)), heat.convert("RGB"), alpha)
        base.paste(blended, (left, top), _mask_picture(shown[rows, cols]))
    return base if mask is None else contour(base, mask, color=(255, 255, 255))


def _mask_picture(inside: np.ndarray) -> Image.Image:
    """A boolean array as a Pillow paste mask (mode "L": 255 inside, 0 outside)."""
    return Image.fromarray(np.ascontiguousarray(inside).view(np.uint8) * np.uint8(255))


def _box(inside: np.ndarray, margin: int = 0) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right), bottom and right exclusive, of the True pixels of a 2-D mask, grown by `margin`
    pixels within the array; None when there are none."""
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    if rows.size == 0:
        return None
    height, width = inside.shape
    return (max(0, int(rows[0]) - margin), min(height, int(rows[-1]) + 1 + margin),
            max(0, int(cols[0]) - margin), min(width, int(cols[-1]) + 1 + margin))


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
    box = _box(inside, margin=1)  # the outline lies in the mask's box; one pixel around it is outside or the border
    if box is None:
        return base
    rows, cols = slice(box[0], box[1]), slice(box[2], box[3])
    part = inside[rows, cols]
    padded = np.pad(part, 1, constant_values=True)  # the border is not outside (the margin, where there is one, is)
    # eroded with the 4-neighbour cross (as scipy's binary_erosion, border_value=1), by shifted views: fast on big masks
    eroded = part & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    base.paste(color, (box[2], box[0], box[3], box[1]), _mask_picture(part & ~eroded))
    return base


def verdict_label(is_anomalous: bool | None, normalized_score: float | None, score: float | None = None) -> str:
    """The corner label of an annotated image: "DEFECT 1.84" / "OK 0.42" (verdict and normalised score, 1 = the
    threshold); without a verdict "score 36.7" (the raw score), or "" when there is nothing to say."""
    if is_anomalous is not None:
        verdict = "DEFECT" if is_anomalous else "OK"
        return verdict if normalized_score is None else f"{verdict} {normalized_score:.2f}"
    return "" if score is None else f"score {score:.3g}"


def annotate(
    image: Image.Image,
    regions: Sequence[Region] = (),
    label: str | None = None,
    *,
    anomalous: bool | None = None,
    map_shape: tuple[int, int] | None = None,
) -> Image.Image:
    """Return a copy of `image` (RGB) with a box and the peak score drawn for each region, and `label` (e.g. from
    `verdict_label`) in the top-left corner on a red (`anomalous` True), green (False) or grey (None) ground.

    Region boxes are (left, top, right, bottom), right and bottom exclusive, in the pixels of the map they were found
    in; `map_shape` is that map's (height, width) when it differs from the image's size (the boxes are then scaled).
    Line width and text size grow with the image, so the marks stay readable on large images. Uses Pillow's
    default font (no font files).
    """
    result = image.convert("RGB")  # always a copy
    draw = ImageDraw.Draw(result)
    width, height = result.size
    scale_x, scale_y = (1.0, 1.0) if map_shape is None else (width / map_shape[1], height / map_shape[0])
    font = _default_font(_font_size(result.size))
    line = max(1, round(min(width, height) / 200))
    for region in regions:
        left, top, right, bottom = region.box
        x0, y0 = round(left * scale_x), round(top * scale_y)
        x1, y1 = max(x0, round(right * scale_x) - 1), max(y0, round(bottom * scale_y) - 1)  # inclusive corners
        draw.rectangle((x0, y0, x1, y1), outline=BOX_COLOR, width=line)
        text = f"{region.peak:.3g}"
        text_w, text_h = _text_size(draw, text, font)
        # Above the box when there is room, else just inside its top edge; kept within the image.
        tx = min(max(0, x0), max(0, width - text_w - 2))
        ty = y0 - text_h - 2 if y0 - text_h - 2 >= 0 else min(y0 + line, max(0, height - text_h - 2))
        _text_on_ground(draw, (tx, ty), text, font, BOX_COLOR)
    if label:
        _text_on_ground(draw, (0, 0), label, font, LABEL_COLORS.get(anomalous, LABEL_COLORS[None]), pad=3)
    return result


def side_by_side(
    test_image: Image.Image, test_box: tuple[float, float, float, float], normal_image: Image.Image,
    normal_box: tuple[float, float, float, float], *, test_label: str = "", normal_label: str = "",
    height: int = 320,
) -> Image.Image:
    """The "why" picture: the test image with its region boxed, next to the nearest normal image with the matched
    area boxed. Boxes are (left, top, right, bottom) in each image's own pixels; both images are scaled to `height`
    (wide images are capped at 4x `height` in width, so long fabric strips stay readable)."""
    panels = []
    for image, box, label in ((test_image, test_box, test_label), (normal_image, normal_box, normal_label)):
        scale = min(height / image.height, 4 * height / image.width)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        panel = image.convert("RGB").resize(size, Image.Resampling.BILINEAR)
        draw = ImageDraw.Draw(panel)
        left, top, right, bottom = (round(v * scale) for v in box)
        draw.rectangle((left, top, max(left, right - 1), max(top, bottom - 1)), outline=BOX_COLOR,
                       width=max(2, round(height / 160)))
        if label:
            _text_on_ground(draw, (0, 0), label, _default_font(max(10, round(height / 22))), (60, 60, 60))
        panels.append(panel)
    gap = 8
    result = Image.new("RGB", (panels[0].width + gap + panels[1].width, max(p.height for p in panels)), (255, 255, 255))
    result.paste(panels[0], (0, 0))
    result.paste(panels[1], (panels[0].width + gap, 0))
    return result


def why_picture(prediction: Prediction, thumbnails: Sequence[np.ndarray]) -> Image.Image | None:
    """The "why" picture of a prediction with an explanation (`predict(..., explain=True)`): its image with the
    strongest region boxed (original pixels) next to the nearest normal image's thumbnail with the area matched at
    the finest pyramid level boxed. None without an explanation, a decoded image or the model's thumbnails."""
    why = prediction.explanation
    if why is None or prediction.image is None or not len(thumbnails):
        return None
    thumb = Image.fromarray(np.asarray(thumbnails[why.normal_index], dtype=np.uint8))
    geometry = prediction.geometry
    (in_h, in_w), (left, top, right, bottom) = geometry.input_size, geometry.crop_box
    sx, sy = (right - left) / in_w, (bottom - top) / in_h  # input pixels -> original pixels
    box = why.region_box
    test_box = (left + box[0] * sx, top + box[1] * sy, left + box[2] * sx, top + box[3] * sy)
    normal_h, normal_w = why.normal_input_size
    match = why.matches[0].normal_box
    tx, ty = thumb.width / normal_w, thumb.height / normal_h
    normal_box = (match[0] * tx, match[1] * ty, match[2] * tx, match[3] * ty)
    return side_by_side(prediction.image, test_box, thumb, normal_box,
                        test_label=verdict_label(prediction.is_anomalous, prediction.normalized_score),
                        normal_label=f"nearest good: {Path(why.normal_name).name}")


@lru_cache(maxsize=32)
def _default_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at `size` (scalable with FreeType), else its fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # old Pillow or no FreeType: the small bitmap font
        return ImageFont.load_default()


def _text_size(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont
) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return int(right - min(0, left)), int(bottom - min(0, top))


def _text_on_ground(
    draw: ImageDraw.ImageDraw, at: tuple[int, int], text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    ground: tuple[int, int, int], pad: int = 1,
) -> None:
    """`text` in white on a filled rectangle of colour `ground`, its top-left corner at `at`."""
    text_w, text_h = _text_size(draw, text, font)
    x, y = at
    draw.rectangle((x, y, x + text_w + 2 * pad - 1, y + text_h + 2 * pad - 1), fill=ground)
    draw.text((x + pad, y + pad), text, fill=TEXT_COLOR, font=font)


def _as_map(anomaly_map: np.ndarray) -> np.ndarray:
    scores = np.asarray(anomaly_map, dtype=np.float64)
    if scores.ndim != 2 or scores.size == 0:
        raise ValueError(f"anomaly map must be a non-empty 2-D (H, W) array, got shape {scores.shape}")
    return scores


def _bounds(scores: np.ndarray, vmin: float | None, vmax: float | None) -> tuple[float, float]:
    """Colour-scale bounds: the given ones, else the finite extremes of the map (0 for an all-NaN map)."""
    if vmin is not None and vmax is not None:
        return float(vmin), float(vmax)
    finite = scores[np.isfinite(scores)]
    low = float(vmin) if vmin is not None else float(finite.min()) if finite.size else 0.0
    high = float(vmax) if vmax is not None else float(finite.max()) if finite.size else 0.0
    return low, high


#: matplotlib's "jet" colour map as its segment data ((x, value) per channel, piecewise linear): the table is built
#: here so that rendering needs no matplotlib (the light runtime install); a test checks it equals matplotlib's.
_JET_SEGMENTS = (
    ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
)
_LUT_SIZE = 256


@lru_cache(maxsize=8)
def _lookup_table(cmap: str) -> np.ndarray:
    """(256, 3) uint8 colours of a colour map, as matplotlib's `Colormap(..., bytes=True)` gives them: "jet" built
    in, any other matplotlib colour map when matplotlib is installed."""
    if cmap != "jet":
        try:
            import matplotlib  # deferred: only other colour maps need it
        except ImportError as exc:
            raise ValueError(f"colour map {cmap!r} needs matplotlib (only 'jet' is built in)") from exc
        table = matplotlib.colormaps[cmap].resampled(_LUT_SIZE)(np.arange(_LUT_SIZE), bytes=True)[:, :3]
    else:
        x = np.linspace(0.0, 1.0, _LUT_SIZE)
        channels = [np.interp(x, [p for p, _ in seg], [v for _, v in seg]) for seg in _JET_SEGMENTS]
        table = (np.clip(np.stack(channels, 1), 0.0, 1.0) * 255).astype(np.uint8)
    table.setflags(write=False)  # cached: shared by every call
    return table


def _colour(scores: np.ndarray, low: float, high: float, cmap: str) -> np.ndarray:
    """(H, W, 3) uint8 colours of `scores` scaled to [low, high]; NaN → mid-grey."""
    rgb = np.take(_lookup_table(cmap), _colour_index(scores, low, high), axis=0)
    missing = np.isnan(scores)
    if missing.any():
        rgb[missing] = NAN_GREY
    return rgb


def _colour_index(scores: np.ndarray, low: float, high: float) -> np.ndarray:
    """The colour table's index (uint8, C-ordered) of each score scaled to [low, high] (float32: a millisecond on a
    big map); NaN and a constant scale give 0."""
    if not high > low:
        return np.zeros(scores.shape, dtype=np.uint8)
    unit = np.subtract(scores, low, dtype=np.float32)
    unit *= np.float32(_LUT_SIZE / (high - low))
    np.clip(unit, 0.0, _LUT_SIZE - 1, out=unit)
    np.nan_to_num(unit, copy=False, nan=0.0)
    return unit.astype(np.uint8, order="C")


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


#: Overlays of a calibrated model colour only the pixels scoring at least this share of the pixel threshold; below
#: it the image is shown as it is. Measured on 6 good and 6 defective test images each (docs/outputs.md): at 0.75 x
#: the threshold 4.7% (bottle) and 1.7% (metal plate) of a good part's pixels show heat, against 33% and 24% at 0.5,
#: while the heat around a defect still shows how far it reaches (35% and 18% of the defective images' pixels). On
#: the shared scale (0 .. 1.5 x the threshold) the heat starts at green, the threshold is yellow.
HEAT_FROM = 0.75


def heat_level(pixel_threshold: float | None) -> float | None:
    """The score below which an overlay shows no heat: `HEAT_FROM` x the pixel threshold (None without one)."""
    return None if pixel_threshold is None else HEAT_FROM * pixel_threshold


def overlay_picture(prediction: Prediction) -> Image.Image:
    """The annotated overlay of one prediction, the picture a person looks at: the one render used by the files
    (`spade_ad.outputs.writers`), watch and the service, so an image's overlay is the same pixels wherever it is shown.

    Drawn on its decoded image (`prediction.image`) from its original-size map (else its network-input map): heat on
    the scale of `color_range`, from `heat_level` up when the model is calibrated (with the defect mask outlined in
    white and a legend of the scale in the bottom-left corner), region boxes with their peaks, and the
    `verdict_label` in the top-left corner."""
    if prediction.image is None:
        raise ValueError(f"{prediction.name}: no decoded image to draw on (predict with keep_images=True)")
    scores = prediction.original_map if prediction.original_map is not None else prediction.anomaly_map
    threshold = prediction.pixel_threshold
    vmin, vmax, _ = color_range(scores, threshold)
    shown = overlay(prediction.image, scores, vmin, vmax, mask=prediction.defect_mask, level=heat_level(threshold))
    shown = annotate(
        shown, prediction.regions, verdict_label(prediction.is_anomalous, prediction.normalized_score,
                                                 prediction.score),
        anomalous=prediction.is_anomalous, map_shape=scores.shape,
    )
    return shown if threshold is None else _legend(shown, vmin, vmax, threshold)


def legend_box(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Where `overlay_picture` draws its scale legend on a calibrated model's overlay of `size` (width, height):
    (left, top, right, bottom) in the bottom-left corner, right and bottom exclusive."""
    width, height = size
    font = _default_font(_font_size(size))
    text_w, text_h = _text_size(ImageDraw.Draw(Image.new("RGB", (1, 1))), _legend_text(), font)
    legend_w = max(text_w, round(width / 4)) + 8
    return 0, max(0, height - 2 * text_h - 12), min(width, legend_w), height


def _legend_text() -> str:
    return f"{HEAT_FROM:g} to {THRESHOLD_SCALE:g} x thr"


def _font_size(size: tuple[int, int]) -> int:
    """The text size of the marks on an image of `size`: grows with the image, so they stay readable."""
    return max(10, round(min(size) / 24))


def _legend(image: Image.Image, vmin: float, vmax: float, threshold: float) -> Image.Image:
    """Draw the overlay's colour scale in the bottom-left corner (in place; returned) on a dark ground: the scale
    in words ("0.75 to 1.5 x thr": multiples of the pixel threshold), and below it the colours from the heat level to
    the top of the scale with a white tick at the pixel threshold."""
    left, top, right, bottom = legend_box(image.size)
    draw = ImageDraw.Draw(image)
    font = _default_font(_font_size(image.size))
    draw.rectangle((left, top, right - 1, bottom - 1), fill=(40, 40, 40))
    draw.text((left + 4, top + 3), _legend_text(), fill=TEXT_COLOR, font=font)
    low = heat_level(threshold) or vmin
    bar_left, bar_right = left + 4, right - 4
    bar_top, bar_bottom = (top + bottom) // 2 + 2, bottom - 4
    values = np.linspace(low, vmax, max(1, bar_right - bar_left))
    strip = _colour(values[None, :], vmin, vmax, "jet")
    image.paste(Image.fromarray(np.repeat(strip, max(1, bar_bottom - bar_top), axis=0)), (bar_left, bar_top))
    tick = bar_left + round((threshold - low) / max(vmax - low, 1e-12) * (bar_right - bar_left - 1))
    draw.line((tick, bar_top - 2, tick, bar_bottom), fill=TEXT_COLOR, width=max(2, (bottom - top) // 16))
    return image
