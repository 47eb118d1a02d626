"""Heat maps, overlays and contours: sizes, colour scaling, NaN handling and outline placement; annotations: region
boxes, peak scores and the verdict label."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from spade_ad.estimators.prediction import Prediction, Region
from spade_ad.outputs.png import encode_png, save_png
from spade_ad.outputs.visualize import (
    BOX_COLOR,
    LABEL_COLORS,
    annotate,
    color_range,
    contour,
    heat_level,
    heatmap,
    legend_box,
    overlay,
    overlay_picture,
    threshold_color_range,
    verdict_label,
)

JET = matplotlib.colormaps["jet"]
BOTTOM = tuple(int(c) for c in JET(0.0, bytes=True)[:3])
TOP = tuple(int(c) for c in JET(1.0, bytes=True)[:3])
GREY = (128, 128, 128)


def _photo(width: int = 40, height: int = 30) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def _px(img: Image.Image, row: int, col: int) -> tuple[int, ...]:
    return tuple(int(c) for c in np.asarray(img)[row, col])


def test_heatmap_shape_mode_and_default_bounds() -> None:
    scores = np.linspace(0.0, 5.0, 30 * 40).reshape(30, 40)
    img = heatmap(scores)
    assert (img.mode, img.size) == ("RGB", (40, 30))
    assert _px(img, 0, 0) == BOTTOM
    assert _px(img, 29, 39) == TOP


def test_heatmap_nan_is_grey() -> None:
    scores = np.arange(12.0).reshape(3, 4)
    scores[1, 2] = np.nan
    img = heatmap(scores)
    assert _px(img, 1, 2) == GREY
    assert _px(img, 0, 0) == BOTTOM and _px(img, 2, 3) == TOP  # NaN ignored for the bounds
    assert np.all(np.asarray(heatmap(np.full((3, 3), np.nan))) == 128)


def test_heatmap_constant_map_is_lowest_colour() -> None:
    with np.errstate(all="raise"):
        img = heatmap(np.full((5, 6), 3.0))
    assert np.all(np.asarray(img) == BOTTOM)


def test_heatmap_respects_vmin_vmax() -> None:
    scores = np.array([[0.0, 1.0, 2.0, 3.0, 10.0]])
    img = heatmap(scores, vmin=1.0, vmax=3.0)
    assert _px(img, 0, 0) == BOTTOM and _px(img, 0, 1) == BOTTOM  # at and below vmin
    assert _px(img, 0, 2) == tuple(int(c) for c in JET(0.5, bytes=True)[:3])
    assert _px(img, 0, 3) == TOP and _px(img, 0, 4) == TOP  # at and above vmax


def test_heatmap_other_cmap_and_bad_input() -> None:
    img = heatmap(np.array([[0.0, 1.0]]), cmap="inferno")
    assert _px(img, 0, 1) == tuple(int(c) for c in matplotlib.colormaps["inferno"](1.0, bytes=True)[:3])
    with pytest.raises(ValueError):
        heatmap(np.zeros((2, 3, 3)))


def test_overlay_shape_and_alpha_extremes() -> None:
    image = _photo()
    scores = np.random.default_rng(1).random((30, 40))
    blended = overlay(image, scores)
    assert (blended.mode, blended.size) == ("RGB", image.size)
    assert np.array_equal(np.asarray(overlay(image, scores, alpha=0.0)), np.asarray(image))
    assert np.array_equal(np.asarray(overlay(image, scores, alpha=1.0)), np.asarray(heatmap(scores)))
    with pytest.raises(ValueError):
        overlay(image, scores, alpha=1.5)


def test_overlay_leaves_nan_region_untouched() -> None:
    image = _photo()
    scores = np.random.default_rng(1).random((30, 40))
    scores[5:15, 10:30] = np.nan
    result = np.asarray(overlay(image, scores, alpha=0.7))
    original = np.asarray(image)
    assert np.array_equal(result[5:15, 10:30], original[5:15, 10:30])
    assert not np.array_equal(result[20:, :], original[20:, :])


def test_overlay_resizes_a_smaller_map() -> None:
    image = _photo(width=64, height=48)
    scores = np.random.default_rng(2).random((12, 16))
    scores[:6, :8] = np.nan  # the top-left quarter
    result = overlay(image, scores, alpha=0.5)
    assert result.size == (64, 48)
    assert np.array_equal(np.asarray(result)[:24, :32], np.asarray(image)[:24, :32])


def test_overlay_draws_mask_outline_in_white() -> None:
    image = Image.new("RGB", (20, 20), (10, 10, 10))
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[5:10, 5:10] = 255
    result = np.asarray(overlay(image, np.zeros((20, 20)), mask=mask))
    white = np.all(result == 255, axis=-1)
    assert white[5, 5:10].all() and white[5:10, 5].all()
    assert not white[7, 7] and not white[0, 0]


def test_contour_is_exactly_the_mask_boundary() -> None:
    image = Image.new("RGB", (30, 25), (0, 0, 0))
    mask = np.zeros((25, 30), dtype=bool)
    mask[10:20, 5:15] = True
    result = contour(image, mask, color=(255, 0, 255))
    expected = np.zeros_like(mask)
    expected[[10, 19], 5:15] = True
    expected[10:20, [5, 14]] = True
    drawn = np.any(np.asarray(result) != 0, axis=-1)
    assert np.array_equal(drawn, expected)
    assert _px(result, 10, 5) == (255, 0, 255)
    assert np.asarray(image).max() == 0  # the input is not modified


def test_contour_accepts_0_255_and_skips_the_image_border() -> None:
    image = Image.new("RGB", (10, 10), (0, 0, 0))
    mask = np.zeros((10, 10), dtype=np.uint8)
    mask[:, :4] = 255  # runs off the left, top and bottom edges
    drawn = np.any(np.asarray(contour(image, mask)) != 0, axis=-1)
    expected = np.zeros((10, 10), dtype=bool)
    expected[:, 3] = True
    assert np.array_equal(drawn, expected)


def test_save_png_creates_parents(tmp_path: Path) -> None:
    img = heatmap(np.arange(6.0).reshape(2, 3))
    path = save_png(img, tmp_path / "a" / "b" / "map.png")
    assert path.is_file()
    with Image.open(path) as loaded:
        assert loaded.format == "PNG"
        assert np.array_equal(np.asarray(loaded), np.asarray(img))


def test_color_range_calibrated_is_fixed_and_shared() -> None:
    assert threshold_color_range(2.0) == (0.0, 3.0)
    assert threshold_color_range(None) is None
    for anomaly_map in (np.zeros((3, 4)), np.arange(12.0).reshape(3, 4)):
        assert color_range(anomaly_map, 2.0) == (0.0, 3.0, True)  # 1.5 x the threshold, whatever the map


def test_color_range_uncalibrated_is_the_maps_own_min_max() -> None:
    anomaly_map = np.array([[np.nan, 2.0], [5.0, np.inf]])
    assert color_range(anomaly_map, None) == (2.0, 5.0, False)  # finite values only
    assert color_range(np.full((2, 2), np.nan), None) == (0.0, 0.0, False)
    vmin, vmax, _ = color_range(np.arange(6.0).reshape(2, 3), None)
    assert np.array_equal(np.asarray(heatmap(np.arange(6.0).reshape(2, 3), vmin, vmax)),
                          np.asarray(heatmap(np.arange(6.0).reshape(2, 3))))  # what heatmap uses by default
    with pytest.raises(ValueError, match="2-D"):
        color_range(np.zeros(3), None)


def _differs(a: Image.Image, b: Image.Image) -> np.ndarray:
    return np.any(np.asarray(a) != np.asarray(b), axis=-1)


def test_verdict_label() -> None:
    assert verdict_label(True, 1.8372) == "DEFECT 1.84"
    assert verdict_label(False, 0.4167) == "OK 0.42"
    assert verdict_label(True, None) == "DEFECT"
    assert verdict_label(None, None, 36.66) == "score 36.7"
    assert verdict_label(None, None) == ""


def test_annotate_draws_the_box_and_its_peak_and_nothing_else() -> None:
    base = Image.new("RGB", (120, 100), (0, 0, 90))
    region = Region(box=(40, 50, 80, 90), area=1200, peak=62.35, mean=48.0)
    drawn = annotate(base, [region])
    assert drawn is not base and drawn.size == base.size and drawn.mode == "RGB"
    assert np.asarray(base).max() == 90  # the input is not drawn on
    for row, col in ((50, 40), (50, 79), (89, 40), (89, 79), (70, 40)):  # corners and an edge (right/bottom exclusive)
        assert _px(drawn, row, col) == BOX_COLOR
    assert _px(drawn, 70, 60) == (0, 0, 90)  # the inside stays visible
    assert _px(drawn, 90, 81) == (0, 0, 90)  # just outside the box
    changed = _differs(drawn, base)
    assert changed[35:50, 40:80].any()  # the peak score above the box
    changed[30:90, 40:80] = False
    assert not changed.any()  # no label asked for: nothing else


def test_annotate_label_colours_follow_the_verdict() -> None:
    base = Image.new("RGB", (200, 150), (0, 0, 0))
    for anomalous in (True, False, None):
        drawn = annotate(base, [], "DEFECT 1.84" if anomalous else "OK 0.42", anomalous=anomalous)
        assert _px(drawn, 0, 0) == LABEL_COLORS[anomalous]  # the label's ground in the top-left corner
        assert _differs(drawn, base)[:20, :100].any() and not _differs(drawn, base)[40:, :].any()
    assert not _differs(annotate(base, [], None), base).any()


def test_annotate_scales_boxes_found_in_a_smaller_map() -> None:
    base = Image.new("RGB", (200, 100), (0, 0, 90))
    region = Region(box=(10, 10, 20, 20), area=100, peak=1.0, mean=1.0)  # in a 50 x 100 map: 2x smaller
    drawn = annotate(base, [region], map_shape=(50, 100))
    assert _px(drawn, 39, 39) == BOX_COLOR and _px(drawn, 20, 20) == BOX_COLOR
    assert _px(drawn, 30, 30) == (0, 0, 90)


def test_annotate_keeps_text_inside_the_image_for_boxes_at_the_edge() -> None:
    base = Image.new("RGB", (64, 48), (0, 0, 90))
    drawn = annotate(base, [Region(box=(50, 0, 64, 48), area=14 * 48, peak=123456.0, mean=1.0)], "DEFECT 9.99",
                     anomalous=True)
    assert drawn.size == base.size
    assert _px(drawn, 47, 63) == BOX_COLOR


def test_built_in_jet_equals_matplotlib() -> None:
    """The heat maps' colour table is built in (the runtime install has no matplotlib) and equals matplotlib's."""
    import matplotlib

    from spade_ad.outputs.visualize import _colour

    unit = np.linspace(0.0, 1.0, 100_001).reshape(1, -1)
    expected = matplotlib.colormaps["jet"](unit, bytes=True)[..., :3]
    assert np.array_equal(_colour(unit, 0.0, 1.0, "jet"), expected)


def test_overlay_below_the_level_leaves_the_image_as_it_is() -> None:
    photo = _photo()
    scores = np.tile(np.linspace(0.0, 3.0, 40), (30, 1))
    scores[0, 39] = np.nan
    shown = np.asarray(overlay(photo, scores, 0.0, 3.0, level=1.5))
    plain = np.asarray(overlay(photo, scores, 0.0, 3.0))
    cool = np.nan_to_num(scores, nan=-np.inf) < 1.5
    np.testing.assert_array_equal(shown[cool], np.asarray(photo)[cool])  # and NaN too
    np.testing.assert_array_equal(shown[~cool], plain[~cool])  # above it: blended as without a level


def test_contour_is_scipy_s_cross_erosion_boundary() -> None:
    from scipy.ndimage import binary_erosion

    mask = np.random.default_rng(1).random((50, 70)) > 0.4
    drawn = np.all(np.asarray(contour(Image.new("RGB", (70, 50)), mask, color=(255, 255, 255))) == 255, axis=-1)
    np.testing.assert_array_equal(drawn, mask & ~binary_erosion(mask, border_value=1))


def _prediction(pixel_threshold: float | None) -> Prediction:
    from spade_ad.core.geometry import Geometry

    scores = np.zeros((90, 120))
    scores[30:50, 40:70] = 3.0  # a hot patch: flagged, one region
    photo = Image.fromarray(np.full((90, 120, 3), 90, dtype=np.uint8))
    calibrated = pixel_threshold is not None
    return Prediction(name="x.png", path=None, score=3.0, anomaly_map=scores, original_map=scores, image=photo,
                      geometry=Geometry((90, 120), (90, 120), (0, 0, 120, 90)), pixel_threshold=pixel_threshold,
                      is_anomalous=True if calibrated else None, normalized_score=2.0 if calibrated else None)


def test_overlay_picture_of_a_calibrated_model_states_its_scale() -> None:
    prediction = _prediction(pixel_threshold=2.0)
    shown = np.asarray(overlay_picture(prediction))
    left, top, right, bottom = legend_box((120, 90))
    assert left == 0 and bottom == 90 and right > 40
    legend = shown[top:bottom, left:right]
    assert (legend == (40, 40, 40)).all(axis=-1).any() and (legend == (255, 255, 255)).all(axis=-1).any()
    assert heat_level(2.0) == 1.5
    assert np.all(shown[60:top, 80:] == 90)  # the cool part, clear of marks: untouched
    assert tuple(shown[49, 69]) == BOX_COLOR and _px(Image.fromarray(shown), 2, 2) == LABEL_COLORS[True]
    inside = shown[35:45, 45:65]
    assert not np.all(inside == 90)  # heat over the hot patch


def test_overlay_picture_without_thresholds_is_washed_in_its_own_range_with_the_score() -> None:
    prediction = _prediction(pixel_threshold=None)
    shown = np.asarray(overlay_picture(prediction))
    plain = np.asarray(overlay(prediction.image, prediction.anomaly_map))
    assert np.array_equal(shown[60:, 80:], plain[60:, 80:])  # no legend; the whole part washed as before
    assert _px(Image.fromarray(shown), 2, 2) == LABEL_COLORS[None]  # "score 3": no verdict
    with pytest.raises(ValueError, match="keep_images"):
        overlay_picture(dataclasses.replace(prediction, image=None))


@pytest.mark.parametrize("shape", [(1, 1), (30, 40), (30, 40, 3), (7, 1, 3)])
def test_encode_png_round_trips_through_pillow(shape: tuple[int, ...], tmp_path: Path) -> None:
    pixels = np.random.default_rng(2).integers(0, 256, size=shape, dtype=np.uint8)
    pixels[..., 0] = 255  # rows whose differences wrap around 256
    for level in (0, 1, 3):
        decoded = np.asarray(Image.open(io.BytesIO(encode_png(pixels, level))))
        assert decoded.dtype == np.uint8 and decoded.shape == shape
        np.testing.assert_array_equal(decoded, pixels)
    image = Image.fromarray(pixels)
    np.testing.assert_array_equal(np.asarray(Image.open(save_png(image, tmp_path / "a" / "x.png"))), pixels)
    with pytest.raises(ValueError, match="shape"):
        encode_png(np.zeros((4, 4, 2), dtype=np.uint8))
