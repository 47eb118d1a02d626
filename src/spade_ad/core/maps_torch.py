"""The maps of `spade_ad.core.maps_numpy` in torch, for batches that stay on a device (`spade_ad.core.device_maps`).

The same formulas as `spade_ad.core.maps_numpy`, on batches of maps (B, h, w) on any device: per-position scores from
the kappa smallest squared distances, bilinear upsampling with half-pixel centres and clamped borders (torch's
`interpolate(..., align_corners=False)`: the convention `maps.upsample` reproduces), "mean" fusion, Gaussian
smoothing as two 1-D convolutions with mirrored borders (d c b | a b c d: scipy's "mirror", torch's "reflect"), the
map's image score and the map at the original image size. `tests/test_maps_torch.py` holds each to the numpy
version on the same inputs (1e-5 of the map's range). An image score this module does not know is computed by
`maps.map_score` on the host copy of the map (see `map_scores`), so a new score added there is never computed
wrongly here.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from . import maps_numpy as maps
from .geometry import Geometry

#: The image scores whose map part `map_scores` computes on the device: every one that `maps.map_score` computes
#: as the maximum ("map_max") or as the mean of the top TOP_SHARE ("map_top", and the map part of "fused" and of
#: "knn", which does not use it).
MAX_SCORES = frozenset({"map_max"})
TOP_SCORES = frozenset({"map_top", "fused", "knn"})


def position_scores(squared: torch.Tensor, distance: str) -> torch.Tensor:
    """Scores (..., Q) from the kappa smallest squared distances (..., Q, kappa): mean Euclidean distance
    ("euclidean") or mean squared distance ("squared"); `maps.position_scores` on a batch."""
    squared = squared.float()
    values = squared.clamp_min(0).sqrt() if distance == "euclidean" else squared
    return values.mean(-1)


def upsample(grids: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of maps (B, h, w) to `size` (height, width) by `maps.upsample`'s taps (source positions
    computed in float64, as there: torch's own `interpolate` computes them in float32, which moves a few output
    pixels of a 224 -> 900 resize by 1e-4 of the range). Rows, then columns, two source values each."""
    grids = grids.float()
    if tuple(grids.shape[-2:]) == tuple(size):
        return grids
    rows = _taps(grids.shape[-2], size[0], grids.device)
    cols = _taps(grids.shape[-1], size[1], grids.device)
    tall = grids[:, rows[0]] * rows[2][:, None] + grids[:, rows[1]] * rows[3][:, None]
    return tall[:, :, cols[0]] * cols[2] + tall[:, :, cols[1]] * cols[3]


@functools.lru_cache(maxsize=64)
def _taps(source: int, target: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """`maps._linear_taps` on `device` (cached: a batch's maps share their sizes)."""
    return tuple(torch.from_numpy(np.ascontiguousarray(v)).to(device) for v in maps._linear_taps(source, target))


def fuse(level_maps: list[torch.Tensor], input_size: tuple[int, int]) -> torch.Tensor:
    """"mean" fusion of per-level maps [(B, h_l, w_l)]: each upsampled to `input_size`, averaged (B, H, W)."""
    total = upsample(level_maps[0], input_size).clone()
    for grid in level_maps[1:]:
        total += upsample(grid, input_size)
    return total / len(level_maps)


def gaussian_kernel(sigma: float, radius: int) -> torch.Tensor:
    """The normalised 1-D kernel of `maps.smooth` (computed in float64, as there)."""
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    return torch.from_numpy(kernel / kernel.sum())


def smooth(anomaly_maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing of maps (B, H, W) as `maps.smooth` does it: radius 4 sigma (at most the shorter side minus
    one), mirrored borders, rows then columns; sigma <= 0 returns them unchanged."""
    anomaly_maps = anomaly_maps.float()
    if sigma <= 0:
        return anomaly_maps
    radius = min(int(4 * sigma + 0.5), min(anomaly_maps.shape[-2:]) - 1)
    if radius < 1:
        return anomaly_maps
    kernel = gaussian_kernel(sigma, radius).to(device=anomaly_maps.device, dtype=torch.float32)
    x = anomaly_maps[:, None]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))  # along each row
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))  # along each column
    return x[:, 0]


def map_scores(anomaly_maps: torch.Tensor, image_score: str) -> torch.Tensor | None:
    """The map part of the image score of each map (B, H, W) -> (B,), float32, as `maps.map_score`; None for an
    image score this module does not compute (then use `maps.map_score` on the host maps)."""
    flat = anomaly_maps.flatten(1)
    if image_score in MAX_SCORES:
        return flat.amax(1)
    if image_score in TOP_SCORES:
        count = max(1, int(flat.shape[1] * maps.TOP_SHARE))
        return flat.topk(count, dim=1).values.mean(1)
    return None


def to_original(anomaly_map: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """A map at input resolution (H, W) resized onto the whole original image (`maps.map_to_original`): pixels
    outside the scored box are NaN."""
    height, width = geometry.original_size
    left, top, right, bottom = geometry.crop_box
    box = (int(round(left)), int(round(top)), int(round(right)), int(round(bottom)))
    inner = upsample(anomaly_map[None], (box[3] - box[1], box[2] - box[0]))[0]
    if box == (0, 0, width, height):
        return inner
    full = torch.full((height, width), float("nan"), dtype=torch.float32, device=anomaly_map.device)
    full[box[1]:box[3], box[0]:box[2]] = inner
    return full
