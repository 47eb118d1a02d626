"""Evaluation plots: each writes a readable PNG, handles NaN pixels, subsamples big inputs fast, picks cases."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spade_ad.apps.evaluation.metrics import pro_curve
from spade_ad.apps.evaluation.plots import (
    plot_cases,
    plot_image_roc,
    plot_pixel_roc,
    plot_pro_curve,
    plot_score_histogram,
    select_cases,
)


def _assert_png(path: Path) -> None:
    assert path.is_file()
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.mode in ("RGB", "RGBA")
        assert img.width > 0 and img.height > 0


def _image_scores(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.array([0] * 20 + [1] * 30)
    return rng.normal(size=50) + 1.5 * labels, labels


def _pixel_data(n: int = 4, size: int = 64, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for _ in range(n):
        mask = np.zeros((size, size), dtype=np.uint8)
        r, c = rng.integers(0, size - 16, size=2)
        mask[r:r + 12, c:c + 12] = 255
        masks.append(mask)
        maps.append((rng.normal(size=(size, size)) + 2.0 * (mask > 0)).astype(np.float32))
    return maps, masks


def test_image_roc_writes_png_in_new_dirs(tmp_path: Path) -> None:
    scores, labels = _image_scores()
    out = plot_image_roc(scores, labels, tmp_path / "a" / "b" / "roc.png", title="widget")
    assert out == tmp_path / "a" / "b" / "roc.png"
    _assert_png(out)


def test_image_roc_needs_both_classes(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        plot_image_roc([0.1, 0.2], [1, 1], tmp_path / "roc.png")


def test_pixel_roc_with_nan_pixels(tmp_path: Path) -> None:
    maps, masks = _pixel_data()
    maps[0][:8] = np.nan
    maps[1][:, :] = np.nan  # a wholly unscored map
    _assert_png(plot_pixel_roc(maps, masks, tmp_path / "px" / "roc.png"))


def test_pixel_roc_subsamples_big_input_quickly(tmp_path: Path) -> None:
    maps, masks = _pixel_data(n=30, size=300)
    start = time.perf_counter()
    out = plot_pixel_roc(maps, masks, tmp_path / "roc.png", max_points=10_000, auroc=0.987)
    assert time.perf_counter() - start < 2.0
    _assert_png(out)


def test_pixel_roc_rejects_shape_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        plot_pixel_roc([np.zeros((4, 4))], [np.zeros((4, 5))], tmp_path / "roc.png")


@pytest.mark.parametrize("au_pro", [None, 0.8])
def test_pro_curve_plot(tmp_path: Path, au_pro: float | None) -> None:
    maps, masks = _pixel_data()
    maps[2][-5:] = np.nan
    fpr, pro = pro_curve(maps, masks, limit=0.3)
    _assert_png(plot_pro_curve(fpr, pro, tmp_path / "p" / "pro.png", limit=0.3, au_pro=au_pro))


@pytest.mark.parametrize("threshold", [None, 0.7])
def test_score_histogram(tmp_path: Path, threshold: float | None) -> None:
    scores, labels = _image_scores()
    _assert_png(plot_score_histogram(scores, labels, tmp_path / "h" / "hist.png", threshold=threshold))


def test_select_cases_hand_made() -> None:
    #                  0    1    2    3    4    5    6    7
    scores = np.array([0.1, 0.9, 0.3, 0.5, 0.2, 0.8, 0.95, 0.4])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    best, worst = select_cases(scores, labels, n=4)
    assert best == [6, 5, 0, 2]  # highest defective, then lowest good
    assert worst == [4, 7, 1, 3]  # lowest defective, then highest good


def test_select_cases_small_class() -> None:
    best, worst = select_cases([0.5, 0.1, 0.9], [0, 0, 1], n=4)
    assert best == [2, 1, 0]
    assert worst == [2, 0, 1]


def test_plot_cases_with_none_mask(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, size=(600, 400, 3), dtype=np.uint8)) for _ in range(2)]
    maps, masks = _pixel_data(n=2, size=56)
    maps[0][:4] = np.nan
    out = plot_cases(images, maps, [masks[0], None], ["defect 0", "good 1"], tmp_path / "c" / "cases.png")
    _assert_png(out)
    with Image.open(out) as img:
        assert img.width < 1200 and img.height < 1000  # downscaled, light
