"""The torch maps (`spade_ad.core.maps_torch`) give the numpy maps (`spade_ad.core.maps_numpy`) on the same inputs:
per-position scores, upsampling, fusion, smoothing, the map's image score for every image score in the settings table,
and the map at the original size. On CPU tensors here; the same code runs on a GPU (`-m cuda`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spade_ad.core import maps_numpy as maps
from spade_ad.core import maps_torch
from spade_ad.core.geometry import Geometry, plan_geometry
from spade_ad.settings import BY_NAME

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device(name)


def _close(got: torch.Tensor, want: np.ndarray, tolerance: float = 1e-5) -> None:
    """Equal to 1e-5 of the reference's range (NaN where it is NaN)."""
    got_np = got.detach().cpu().numpy()
    assert got_np.shape == want.shape
    span = float(np.nanmax(want) - np.nanmin(want)) or 1.0
    np.testing.assert_allclose(got_np, want, rtol=0, atol=tolerance * span, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("distance", ["euclidean", "squared"])
def test_position_scores(device: str, distance: str) -> None:
    squared = np.random.default_rng(0).gamma(2.0, 3.0, size=(3, 50, 4)).astype(np.float32)
    squared[0, 0, 0] = -1e-6  # cancellation below zero is clamped
    got = maps_torch.position_scores(torch.from_numpy(squared).to(_device(device)), distance)
    want = np.stack([maps.position_scores(s, distance) for s in squared])
    _close(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("source", "target"), [((7, 7), (56, 56)), ((28, 14), (224, 112)), ((5, 9), (3, 4)),
                                                ((8, 8), (8, 8)), ((28, 28), (900, 900))])
def test_upsample(device: str, source: tuple[int, int], target: tuple[int, int]) -> None:
    grids = np.random.default_rng(1).normal(size=(2, *source)).astype(np.float32)
    got = maps_torch.upsample(torch.from_numpy(grids).to(_device(device)), target)
    _close(got, np.stack([maps.upsample(g, target) for g in grids]))


@pytest.mark.parametrize("device", DEVICES)
def test_fuse(device: str) -> None:
    rng = np.random.default_rng(2)
    levels = [rng.normal(size=(3, 28, 28)).astype(np.float32), rng.normal(size=(3, 14, 14)).astype(np.float32)]
    got = maps_torch.fuse([torch.from_numpy(level).to(_device(device)) for level in levels], (224, 224))
    _close(got, np.stack([maps.fuse([level[i] for level in levels], (224, 224)) for i in range(3)]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("shape", "sigma"), [((224, 224), 4.0), ((224, 448), 2.5), ((12, 40), 4.0), ((6, 6), 1.0),
                                              ((64, 64), 0.0), ((2, 30), 4.0)])
def test_smooth(device: str, shape: tuple[int, int], sigma: float) -> None:
    """Including a radius cut by a short side (12 and 6 px) and a map too thin to smooth (2 px: radius 1)."""
    grids = np.random.default_rng(3).gamma(2.0, 1.0, size=(2, *shape)).astype(np.float32)
    got = maps_torch.smooth(torch.from_numpy(grids).to(_device(device)), sigma)
    _close(got, np.stack([maps.smooth(g, sigma) for g in grids]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("image_score", BY_NAME["image_score"].choices)
def test_map_score_for_every_image_score(device: str, image_score: str) -> None:
    """Every image score of the settings table: computed on the device, or None (then `maps.map_score` on the host
    map is the answer: a score added to `maps` is never computed by the wrong formula here)."""
    grids = np.random.default_rng(4).gamma(2.0, 1.0, size=(3, 224, 224)).astype(np.float32)
    got = maps_torch.map_scores(torch.from_numpy(grids).to(_device(device)), image_score)
    want = np.array([maps.map_score(g, image_score) for g in grids], dtype=np.float32)
    if got is None:
        assert image_score not in maps_torch.MAX_SCORES | maps_torch.TOP_SCORES
        return
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-5)


def test_the_device_scores_are_the_ones_numpy_computes_that_way() -> None:
    """map_max is the maximum and the others the top share's mean, in numpy too (what the two sets claim)."""
    grid = np.random.default_rng(5).normal(size=(40, 40)).astype(np.float32)
    for name in maps_torch.MAX_SCORES:
        assert maps.map_score(grid, name) == pytest.approx(float(grid.max()))
    top = np.sort(grid.ravel())[-int(grid.size * maps.TOP_SHARE):].mean()
    for name in maps_torch.TOP_SCORES:
        assert maps.map_score(grid, name) == pytest.approx(float(top), rel=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("original", "mode"), [((900, 900), "keep_aspect"), ((160, 224), "keep_aspect"),
                                                ((300, 500), "paper_crop"), ((256, 4096), "squash")])
def test_to_original(device: str, original: tuple[int, int], mode: str) -> None:
    geometry: Geometry = plan_geometry(original, 224, mode)
    grid = np.random.default_rng(6).gamma(2.0, 1.0, size=geometry.input_size).astype(np.float32)
    got = maps_torch.to_original(torch.from_numpy(grid).to(_device(device)), geometry)
    _close(got, maps.map_to_original(grid, geometry))
