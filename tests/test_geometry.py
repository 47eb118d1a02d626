"""Geometry: inputs of any size and aspect ratio, and maps that cover the whole original image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from spade_ad.core import geometry
from spade_ad.core.geometry import image_to_array, plan_geometry
from spade_ad.core.maps_numpy import map_to_original
from spade_ad.errors import ImageReadError, ImageTooLargeError


@pytest.mark.parametrize("size", [(900, 300), (300, 900), (256, 256), (1000, 1333), (50, 40)])
def test_keep_aspect_scales_short_side_and_keeps_ratio(size: tuple[int, int]) -> None:
    geometry = plan_geometry(size, 224, "keep_aspect")
    height, width = geometry.input_size
    assert height % 32 == 0 and width % 32 == 0
    short = min(height, width)
    assert abs(short - 224) <= 16
    assert abs((height / width) / (size[0] / size[1]) - 1) < 0.1
    assert geometry.crop_box == (0.0, 0.0, float(size[1]), float(size[0]))


def test_squash_and_paper_crop_are_square() -> None:
    assert plan_geometry((900, 300), 224, "squash").input_size == (224, 224)
    crop = plan_geometry((900, 900), 224, "paper_crop")
    assert crop.input_size == (224, 224)
    left, top, right, bottom = crop.crop_box
    # 256 -> 224: 16 of 256 pixels cut on each side, i.e. 1/16 of the side.
    assert left == pytest.approx(900 / 16) and right == pytest.approx(900 - 900 / 16)
    assert top == pytest.approx(900 / 16) and bottom == pytest.approx(900 - 900 / 16)
    with pytest.raises(ValueError, match="resize mode"):
        plan_geometry((10, 10), 224, "stretch")  # type: ignore[arg-type]


def test_map_covers_whole_image_without_crop() -> None:
    geometry = plan_geometry((300, 900), 224, "keep_aspect")
    anomaly_map = np.random.default_rng(0).random(geometry.input_size).astype(np.float32)
    full = map_to_original(anomaly_map, geometry)
    assert full.shape == (300, 900)
    assert not np.isnan(full).any()
    assert full.min() >= anomaly_map.min() - 1e-6 and full.max() <= anomaly_map.max() + 1e-6


def test_paper_crop_marks_unscored_border_as_nan() -> None:
    geometry = plan_geometry((320, 480), 224, "paper_crop")
    full = map_to_original(np.ones(geometry.input_size, dtype=np.float32), geometry)
    assert full.shape == (320, 480)
    assert np.isnan(full[0, 0]) and np.isnan(full[-1, -1])
    assert full[160, 240] == pytest.approx(1.0)
    scored = ~np.isnan(full)
    assert scored.mean() == pytest.approx((14 / 16) ** 2, abs=0.02)


def test_image_to_array_range_and_size() -> None:
    image = Image.fromarray(np.full((90, 30, 3), 255, dtype=np.uint8))
    geometry = plan_geometry((90, 30), 64, "keep_aspect")
    tensor = image_to_array(image, geometry)
    assert tensor.dtype == np.float32
    assert tuple(tensor.shape) == (3, *geometry.input_size)
    assert float(tensor.min()) == pytest.approx(1.0) and float(tensor.max()) == pytest.approx(1.0)


@pytest.mark.parametrize(("size", "image_size"), [((8, 2000), 224), ((8, 20000), 224), ((2000, 8), 64),
                                                  ((2000, 2000), 1400)])
def test_network_input_over_the_limits_is_refused(size: tuple[int, int], image_size: int) -> None:
    """A 2000 x 8 strip kept to scale would be a 224 x 56,000 input (GBs of features): refused by its aspect ratio;
    a square image at a huge image_size by its pixel count."""
    with pytest.raises(ImageTooLargeError, match="strip.png") as caught:
        plan_geometry(size, image_size, "keep_aspect", name="strip.png")
    error = caught.value
    assert isinstance(error, ImageReadError) and error.kind == "too_large"
    assert f"{geometry.MAX_INPUT_PIXELS:,} pixels" in error.reason and f"{geometry.MAX_ASPECT_RATIO}:1" in error.reason
    assert "squash" in error.reason and "image_size" in error.reason  # how to get past it


def test_limits_allow_long_fabric_images_and_square_inputs() -> None:
    assert plan_geometry((256, 4096), 224, "keep_aspect").input_size == (224, 3584)
    assert plan_geometry((4096, 256), 320, "keep_aspect").input_size == (5120, 320)
    for mode in ("squash", "paper_crop"):  # square inputs, whatever the file's shape
        assert plan_geometry((8, 20000), 224, mode).input_size == (224, 224)  # type: ignore[arg-type]


def test_limits_are_module_constants(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(geometry, "MAX_ASPECT_RATIO", 300)
    monkeypatch.setattr(geometry, "MAX_INPUT_PIXELS", 224 * 56000)
    assert plan_geometry((8, 2000), 224, "keep_aspect").input_size == (224, 56000)
    monkeypatch.setattr(geometry, "MAX_INPUT_PIXELS", 224 * 224 - 1)
    with pytest.raises(ImageTooLargeError, match="50,176 pixels"):
        plan_geometry((224, 224), 224, "keep_aspect")


def test_global_view_is_the_square_image_unless_the_input_already_is() -> None:
    """global_view="square": a long input's global view is the same scored region squashed to image_size^2; a square
    input is its own view (no second pass), and "input" never makes one."""
    long_input = plan_geometry((256, 4096), 224, "keep_aspect")
    view = geometry.global_view_geometry(long_input, 224, "square")
    assert view is not None and view.input_size == (224, 224) and view.crop_box == long_input.crop_box
    assert view.original_size == long_input.original_size
    assert geometry.global_view_geometry(long_input, 224, "input") is None
    for square in (plan_geometry((900, 900), 224, "keep_aspect"), plan_geometry((256, 4096), 224, "squash"),
                   plan_geometry((600, 800), 224, "paper_crop")):
        assert geometry.global_view_geometry(square, 224, "square") is None
