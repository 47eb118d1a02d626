"""Scores on the torch path (CPU or GPU): per-level distance maps against a gallery and image kNN scores.

Pixel stage: each test position scores the mean distance to its kappa nearest gallery vectors, per pyramid level
("mean" fusion: per-level maps upsampled to the input size and averaged) or over the channel-concatenated pyramid
("concat" fusion, the paper's text). The search runs in torch on a GPU and in `spade_ad.core.search_numpy` on the CPU
(the runtime's search: single-threaded BLAS in one worker thread per core, which holds up far better than torch's
intra-op threads when other work shares the cores; see benchmarks/bench_long_images.py); everything after it
(per-position scores, fusion, Gaussian smoothing, the map's image score) is `spade_ad.core.maps_numpy`, shared with the
torch-free runtime.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..settings import SearchSettings
from . import search_numpy as numpy_search
from .feature_store import FeatureStore
from .gallery import gallery_fraction
from .maps_numpy import coarse_map, fuse, position_scores, smooth, upsample
from .search_torch import topk_squared_distances, window_topk_squared_distances

#: The table's search settings (frozen, so one object serves as every default).
DEFAULT_SEARCH = SearchSettings()

Fusion = Literal["mean", "concat"]
Distance = Literal["euclidean", "squared"]


def pixel_anomaly_map(
    maps: list[torch.Tensor],
    store: FeatureStore,
    neighbours: torch.Tensor,
    input_size: tuple[int, int],
    search: SearchSettings = DEFAULT_SEARCH,
) -> np.ndarray:
    """Unsmoothed pixel anomaly map (H, W), float32, of one test image against the gallery of training images
    `neighbours` (`pixel_maps`' first map)."""
    return pixel_maps(maps, store, neighbours, input_size, search)[0]


def pixel_maps(
    maps: list[torch.Tensor],
    store: FeatureStore,
    neighbours: torch.Tensor,
    input_size: tuple[int, int],
    search: SearchSettings = DEFAULT_SEARCH,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Unsmoothed pixel anomaly map (H, W), float32, of one test image against the gallery of training images
    `neighbours`, and with `search.coarse` the coarsest level's own score grid (h_L, w_L) (None otherwise): the
    fused score's third part is its top 1% once upsampled and smoothed (`maps.coarse_map`). With "mean" fusion it
    is that level's map before the fusion (no extra search); with "concat", that level searched on its own.

    With `max_pairs`, a level whose queries x gallery vectors exceed it (long or large images) searches a reduced
    gallery: the same share of every gallery image's vectors, taken in each image's coreset order (greedy k-centre,
    computed at fit time), so that the work stays within `max_pairs`. Exact otherwise, and always with
    `search_radius` or "concat" fusion.

    `maps`: the test image's pyramid [(C_l, h_l, w_l)]. Each test position's score is the mean distance to its kappa
    nearest gallery vectors (only those within `search_radius` cells of the same position, if given); "mean" fusion
    averages the per-level maps after bilinear upsampling to `input_size`. `search`: the model's search settings
    (`kappa`, `fusion`, `distance`, `memory_budget`, `search_radius`, `max_pairs`).
    """
    kappa, distance, memory_budget = search.kappa, search.distance, search.memory_budget
    search_radius, max_pairs = search.search_radius, search.max_pairs

    def score(query_map: torch.Tensor, gallery: torch.Tensor) -> np.ndarray:
        """(h, w) scores of a query map (C, h, w) against gallery maps (K, C, h, w), or rows (M, C) if unwindowed."""
        if search_radius is not None:
            squared = window_topk_squared_distances(query_map, gallery, kappa, search_radius).cpu().numpy()
        elif query_map.device.type == "cpu":
            squared, _ = numpy_search.topk_squared_distances(query_map.flatten(1).T.numpy(), gallery.numpy(), kappa,
                                                             memory_budget)
        else:
            squared = topk_squared_distances(query_map.flatten(1).T, gallery, kappa, memory_budget)[0].cpu().numpy()
        return position_scores(squared, distance).reshape(query_map.shape[1:])

    def resample(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(grid[None], size=size, mode="bilinear", align_corners=False)[0]

    device = maps[0].device

    def level_map(level: int, fmap: torch.Tensor) -> np.ndarray:
        shapes = store.shapes[neighbours.cpu().numpy(), level]
        fraction = 1.0 if search_radius is not None else \
            gallery_fraction(fmap.shape[1] * fmap.shape[2], shapes, max_pairs)
        gallery = store.gallery(level, neighbours, device, fraction)
        if search_radius is not None:
            gallery = _rows_to_maps(gallery, shapes, tuple(fmap.shape))
        return score(fmap, gallery)

    if search.fusion == "mean":
        levels = [level_map(level, fmap) for level, fmap in enumerate(maps)]
        return fuse(levels, input_size), (levels[-1] if search.coarse else None)
    size = tuple(maps[0].shape[1:])
    query = torch.cat([resample(m.float(), size) for m in maps], 0)
    gallery = torch.stack([
        torch.cat([resample(store.image_map(level, int(n)).to(device).float(), size) for level in range(len(maps))], 0)
        for n in neighbours
    ])  # (K, C, h, w): every training map resampled onto the test image's grid
    if search_radius is None:
        gallery = gallery.permute(0, 2, 3, 1).reshape(-1, query.shape[0])
    coarse = level_map(len(maps) - 1, maps[-1]) if search.coarse else None
    return upsample(score(query, gallery), input_size), coarse


def _rows_to_maps(rows: torch.Tensor, shapes: np.ndarray, query_shape: tuple[int, int, int]) -> torch.Tensor:
    """Gallery rows (K * h * w, C) back to maps (K, C, h, w); a windowed search needs every map at the query's size."""
    channels, height, width = query_shape
    if not (shapes == (height, width)).all():
        sizes = sorted({tuple(int(v) for v in shape) for shape in shapes})
        raise ValueError(
            f"search_radius needs training and test images of one size: the test feature map is {height}x{width}, "
            f"training maps are {', '.join(f'{h}x{w}' for h, w in sizes)}; resize the images or use search_radius=None"
        )
    return rows.view(len(shapes), height, width, channels).permute(0, 3, 1, 2)


def knn_image_scores(squared_distances: torch.Tensor, k_image: int) -> torch.Tensor:
    """The paper's image score: mean squared distance to the k_image nearest training global features (Q,)."""
    return squared_distances[:, :k_image].mean(1)


def training_input_size(store: FeatureStore, index: int, stride: int) -> tuple[int, int]:
    """The network input size of training image `index`, from its first pyramid level's shape and stride."""
    h, w = (int(v) for v in store.shapes[index, 0])
    return h * stride, w * stride


def leave_one_out(
    store: FeatureStore,
    first_stride: int,
    *,
    k_image: int,
    k_gallery: int,
    search: SearchSettings = DEFAULT_SEARCH,
    device: torch.device | str = "cpu",
    batch: int = 32,
    density_k: int = 0,
    groups: np.ndarray | None = None,
) -> Iterator[tuple[int, float, np.ndarray, np.ndarray | None, np.ndarray]]:
    """Score every training image against the store without itself: its own global feature leaves its kNN, its own
    maps leave its gallery (the next nearest image takes its place). Yields (index, kNN image score, smoothed map at
    its input size, the coarsest level's own smoothed map with `search.coarse` (else None), its `density_k` nearest
    other training images). The queries are the stored features (float16 by default), so the scores differ from a
    fresh prediction of the same image by that rounding only. Needs at least two training images.

    `groups` (N,): each image is scored without every image of its group (its capture session,
    `spade_ad.data.sessions`), not only without itself."""
    n = store.n_images
    if n < 2:
        raise ValueError("leave-one-out needs at least two training images")
    want = n if groups is not None else min(n, max(k_gallery, k_image, density_k) + 1)
    for first in range(0, n, batch):
        indices = list(range(first, min(n, first + batch)))
        queries = store.global_features[indices].to(device)
        distances, neighbours = store.nearest_images(queries, want)
        for row, index in enumerate(indices):
            keep = kept_neighbours(neighbours[row], index, groups)
            d, nearest = distances[row][keep], neighbours[row][keep]
            maps = [store.image_map(level, index).to(device) for level in range(len(store.levels))]
            size = training_input_size(store, index, first_stride)
            raw, coarse = pixel_maps(maps, store, nearest[:k_gallery].cpu(), size, search)
            yield (index, float(d[:k_image].mean()), smooth(raw, search.sigma),
                   None if coarse is None else coarse_map(coarse, size, search.sigma),
                   nearest[:density_k].cpu().numpy())


def kept_neighbours(neighbours: torch.Tensor, index: int, groups: np.ndarray | None) -> torch.Tensor:
    """Which of an image's nearest images its leave-one-out keeps: all but itself, or with `groups` all but its
    group. Without groups, a duplicate at distance 0 may outrank the image itself: the farthest goes instead."""
    if groups is not None:
        found = groups[neighbours.cpu().numpy()]
        return torch.from_numpy(found != groups[index]).to(neighbours.device)
    keep = neighbours != index
    if bool(keep.all()):
        keep[-1] = False
    return keep
