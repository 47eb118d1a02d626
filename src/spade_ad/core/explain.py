"""Why an image was flagged: SPADE's answer is an alignment with a few similar normal images, so show it.

For the strongest region of a prediction, each pyramid level looks at the feature cells around the region (the box
grown by one cell, so that the normal context around a defect is included), finds where each of them matched best
in the nearest normal training image, and takes the median displacement: the region, shifted by it, is where the
same part sits in the normal image. Coordinates are network-input pixels of either image; `spade_ad.outputs.visualize`
draws them on the test image and the normal image's thumbnail.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .search_numpy import topk_squared_distances

Box = tuple[int, int, int, int]  # left, top, right, bottom (right and bottom exclusive)


@dataclass(frozen=True)
class Match:
    """Where a region's features matched at one pyramid level."""

    stride: int
    test_box: Box  # the region in the test image's input pixels
    normal_box: Box  # the same part in the normal image's input pixels
    distance: float  # median distance of the region's cells to their best match

    def to_json(self) -> dict[str, object]:
        return {"stride": self.stride, "test_box": list(self.test_box), "normal_box": list(self.normal_box),
                "distance": round(self.distance, 6)}


@dataclass(frozen=True)
class Explanation:
    """The nearest normal image (by global feature) and where the strongest region matched in it, per level."""

    normal_index: int
    normal_name: str
    normal_input_size: tuple[int, int]  # (height, width) of the normal image's network input
    region_box: Box  # the strongest region in the test image's input pixels
    matches: list[Match]

    def to_json(self) -> dict[str, object]:
        return {"normal": self.normal_name, "normal_input_size": list(self.normal_input_size),
                "region_box": list(self.region_box), "matches": [m.to_json() for m in self.matches]}


def strongest_region(anomaly_map: np.ndarray, threshold: float | None, cell: int) -> Box:
    """The bounding box (input pixels) of the connected region above `threshold` that holds the map's maximum; one
    feature cell around the maximum when there is no threshold or nothing above it."""
    y, x = np.unravel_index(int(np.nanargmax(anomaly_map)), anomaly_map.shape)
    if threshold is not None and anomaly_map[y, x] > threshold:
        labels, _ = ndimage.label(anomaly_map > threshold, structure=np.ones((3, 3), dtype=bool))
        rows, cols = ndimage.find_objects(labels)[labels[y, x] - 1]
        return int(cols.start), int(rows.start), int(cols.stop), int(rows.stop)
    half = cell // 2
    height, width = anomaly_map.shape
    return max(0, x - half), max(0, y - half), min(width, x + half + 1), min(height, y + half + 1)


def explain(
    pyramid: list[np.ndarray], strides: tuple[int, ...], normal_maps: list[np.ndarray], normal_index: int,
    normal_name: str, region: Box,
) -> Explanation:
    """Match the region's cells (grown by one cell) at every level of the test `pyramid` [(C, h, w)] against the
    normal image's maps `normal_maps` [(C, h', w')] (training image `normal_index`, named `normal_name`)."""
    matches = []
    for fmap, stride, normal in zip(pyramid, strides, normal_maps):
        _, height, width = fmap.shape
        left, top = max(0, region[0] // stride - 1), max(0, region[1] // stride - 1)
        right, bottom = min(width, -(-region[2] // stride) + 1), min(height, -(-region[3] // stride) + 1)
        cells = np.asarray(fmap[:, top:bottom, left:right], dtype=np.float32).reshape(fmap.shape[0], -1).T  # (n, C)
        bank = np.asarray(normal, dtype=np.float32).reshape(normal.shape[0], -1).T  # (h' w', C)
        squared, nearest = topk_squared_distances(cells, bank, 1)
        best = nearest[:, 0]
        ys, xs = np.divmod(best, normal.shape[2])
        grid_y, grid_x = np.mgrid[top:bottom, left:right]
        dy = int(np.median(ys - grid_y.ravel()))
        dx = int(np.median(xs - grid_x.ravel()))
        normal_h, normal_w = normal.shape[1] * stride, normal.shape[2] * stride
        shifted = (region[0] + dx * stride, region[1] + dy * stride, region[2] + dx * stride, region[3] + dy * stride)
        clipped = (max(0, shifted[0]), max(0, shifted[1]), min(normal_w, shifted[2]), min(normal_h, shifted[3]))
        matches.append(Match(stride, region, clipped, float(np.median(np.sqrt(np.maximum(squared[:, 0], 0))))))
    size = (int(normal_maps[0].shape[1]) * strides[0], int(normal_maps[0].shape[2]) * strides[0])
    return Explanation(normal_index, normal_name, size, region, matches)
