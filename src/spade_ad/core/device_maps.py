"""The pixel stage of a whole batch on one device (a GPU; the same code runs on CPU tensors in the tests).

`Spade._predict_parts` hands a batch here when its device is not the CPU (the CPU keeps its per-image numpy
search, `spade_ad.core.search_numpy`, which holds up better on shared cores). For the batch's images at once:

1. gallery selection: the rows of every image's K gallery images gathered in one indexed read of the stored
   levels (kept on the device by `FeatureStore` when they fit: no host round trip);
2. the exact search, batched across the images: ranking |b|^2 - 2 q.b by batched matrix products in tiles sized to
   the device's memory budget, a running top-kappa, the chosen neighbours' distances recomputed directly (as
   `spade_ad.core.search_torch.topk_squared_distances`, image by image);
3. per-position scores, "mean" fusion, Gaussian smoothing and the map's image score (`spade_ad.core.maps_torch`: the
   formulas of `spade_ad.core.maps_numpy`), and with `original_size` each map at its original image size;
4. the maps copied back to the host only at the end, on CUDA into pinned memory on a copy stream (`DeviceMaps`).

`supports` says when a batch can take this path: "mean" fusion, no `search_radius`, and galleries of one map size
per level (the usual case: training images of one size). Otherwise `Spade` scores the batch image by image with the
torch search, as before.
"""

from __future__ import annotations

import numpy as np
import torch

from ..settings import SearchSettings
from . import maps_numpy as maps
from . import maps_torch
from .feature_store import FeatureStore
from .gallery import gallery_fraction
from .geometry import Geometry
from .search_torch import default_memory_budget


def supports(store: FeatureStore, neighbours: torch.Tensor, pyramid: list[torch.Tensor], *, fusion: str,
             search_radius: int | None) -> bool:
    """Whether the batch can be scored at once: "mean" fusion, no window, and every gallery image of the batch
    with one map size per level (so the galleries stack into one tensor)."""
    if fusion != "mean" or search_radius is not None:
        return False
    shapes = store.shapes[neighbours.cpu().numpy().ravel()]  # (B * K, L, 2)
    return bool((shapes == shapes[:1]).all()) and len(pyramid) == shapes.shape[1]


def batched_topk_squared_distances(queries: torch.Tensor, banks: torch.Tensor, k: int,
                                   memory_budget: int | None = None) -> torch.Tensor:
    """The k smallest squared distances (B, Q, k), ascending, from each image's queries (B, Q, D) to its own bank
    (B, M, D): ranked by |b|^2 - 2 q.b in tiles of at most `memory_budget` bytes of rankings (None: the device's
    default), then recomputed directly for the chosen neighbours (no cancellation error)."""
    n_images, n_queries, channels = queries.shape
    if banks.shape[1] == 0:
        raise ValueError("cannot search an empty feature bank")
    k = min(k, banks.shape[1])
    budget = memory_budget or default_memory_budget(queries.device)
    queries, banks = queries.float(), banks.float()
    ranking = torch.cat([banks, banks.square().sum(-1, keepdim=True)], -1).transpose(1, 2)  # (B, D + 1, M)
    extended = torch.cat([-2.0 * queries, queries.new_ones(n_images, n_queries, 1)], -1)  # (B, Q, D + 1)
    tile = max(k, min(banks.shape[1], budget // (4 * n_queries)))
    group = max(1, budget // (4 * n_queries * tile))  # images per product
    chosen = []
    for first in range(0, n_images, group):
        rows = extended[first:first + group]
        best_d = best_i = None
        for start in range(0, banks.shape[1], tile):
            scores = torch.bmm(rows, ranking[first:first + group, :, start:start + tile])
            d, i = scores.topk(min(k, scores.shape[2]), dim=2, largest=False)
            i += start
            if best_d is not None:
                d, order = torch.cat([best_d, d], 2).topk(k, dim=2, largest=False)
                i = torch.cat([best_i, i], 2).gather(2, order)
            best_d, best_i = d, i
        chosen.append(best_i)
    indices = torch.cat(chosen, 0)  # (B, Q, k)
    neighbours = torch.gather(banks, 1, indices.flatten(1)[..., None].expand(-1, -1, channels))
    exact = (queries[:, :, None, :] - neighbours.view(n_images, n_queries, k, channels)).square().sum(-1)
    return exact.sort(dim=2).values


def batch_maps(pyramid: list[torch.Tensor], store: FeatureStore, neighbours: torch.Tensor,
               input_size: tuple[int, int], settings: SearchSettings
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Smoothed maps (B, H, W) at the input size of a batch whose `supports` is true, on the pyramid's device,
    their map scores (B,) (None for an image score `maps_torch` does not compute) and, with `settings.coarse`, the
    coarsest level's own grids (B, h_L, w_L) and their parts (B,): the top 1% of each grid upsampled and smoothed
    as the map is (`maps.coarse_map`); else None and None.

    `pyramid`: [(B, C_l, h_l, w_l)]; `neighbours`: (B, K) gallery images per image. With `max_pairs`, a level whose
    queries x gallery vectors exceed it searches the same share of every gallery image's vectors (its coreset
    order), as `spade_ad.core.scoring.pixel_anomaly_map` does."""
    device = pyramid[0].device
    n_images, k_gallery = neighbours.shape
    flat = neighbours.reshape(-1).cpu()
    levels = []
    for level, fmap in enumerate(pyramid):
        _, channels, height, width = fmap.shape
        shapes = store.shapes[flat[:k_gallery].numpy(), level]
        fraction = gallery_fraction(height * width, shapes, settings.max_pairs)
        if fraction >= 1.0:  # every image's gallery, image after image, in one gather
            banks = store.gallery(level, flat, device).view(n_images, -1, channels)
        else:  # a reduced gallery's rows come sorted (file order): one gather per image
            banks = torch.stack([store.gallery(level, flat[i * k_gallery:(i + 1) * k_gallery], device, fraction)
                                 for i in range(n_images)])
        queries = fmap.flatten(2).transpose(1, 2)  # (B, h * w, C)
        squared = batched_topk_squared_distances(queries, banks, settings.kappa, settings.memory_budget)
        levels.append(maps_torch.position_scores(squared, settings.distance).view(n_images, height, width))
    smoothed = maps_torch.smooth(maps_torch.fuse(levels, input_size), settings.sigma)
    coarse = coarse_parts = None
    if settings.coarse:
        coarse = levels[-1]
        coarse_parts = maps_torch.map_scores(maps_torch.smooth(maps_torch.upsample(coarse, input_size),
                                                               settings.sigma), "map_top")
    return smoothed, maps_torch.map_scores(smoothed, settings.image_score), coarse, coarse_parts


class DeviceMaps:
    """A batch's maps and map scores, on their way to the host: everything asked for is computed on the device,
    then copied back in one go (on CUDA into pinned host memory on a side stream, so the copies overlap the work
    queued after them); `image(i)` waits for them on first use."""

    def __init__(self, smoothed: torch.Tensor, scores: torch.Tensor | None, image_score: str,
                 geometries: list[Geometry] | None, coarse: torch.Tensor | None = None,
                 coarse_parts: torch.Tensor | None = None) -> None:
        self.image_score = image_score
        originals = [maps_torch.to_original(smoothed[i], g) for i, g in enumerate(geometries)] if geometries else []
        self._has_coarse = coarse is not None and coarse_parts is not None
        tensors = [smoothed, *originals] + ([coarse, coarse_parts] if self._has_coarse else []) + \
            ([] if scores is None else [scores])
        self._event = None
        if smoothed.device.type == "cuda":
            stream = torch.cuda.Stream(smoothed.device)
            stream.wait_stream(torch.cuda.current_stream(smoothed.device))
            with torch.cuda.stream(stream):
                host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
                for target, source in zip(host, tensors):
                    target.copy_(source, non_blocking=True)
                    source.record_stream(stream)
                self._event = torch.cuda.Event()
                self._event.record(stream)
        else:
            host = [t.detach() for t in tensors]
        self._host = host
        self._count = len(originals)
        self._has_scores = scores is not None
        self._ready = False

    def _wait(self) -> None:
        if not self._ready:
            if self._event is not None:
                self._event.synchronize()
            self._arrays = [t.numpy() for t in self._host]
            self._ready = True

    def image(self, index: int) -> tuple[float, np.ndarray, np.ndarray | None]:
        """(map score, smoothed map at the input size, map at the original size or None) of image `index`: copies,
        so that a kept Prediction holds neither the batch's buffer nor pinned memory."""
        self._wait()
        array = self._arrays[0][index].copy()
        original = self._arrays[1 + index].copy() if self._count else None
        score = float(self._arrays[-1][index]) if self._has_scores else maps.map_score(array, self.image_score)
        return score, array, original

    def coarse(self, index: int) -> tuple[float | None, np.ndarray | None]:
        """(coarse part, the coarsest level's own grid (h_L, w_L), a copy) of image `index`; (None, None) when the
        model's score has no coarse part."""
        if not self._has_coarse:
            return None, None
        self._wait()
        first = 1 + self._count
        return float(self._arrays[first + 1][index]), self._arrays[first][index].copy()


def predict_batch(pyramid: list[torch.Tensor], store: FeatureStore, neighbours: torch.Tensor,
                  geometries: list[Geometry], settings: SearchSettings, *, original_size: bool) -> DeviceMaps:
    """`batch_maps` of a batch (images of one input size) and, with `original_size`, its maps at the original
    sizes, all on the device, on their way to the host (`DeviceMaps`)."""
    smoothed, scores, coarse, coarse_parts = batch_maps(pyramid, store, neighbours, geometries[0].input_size,
                                                        settings)
    return DeviceMaps(smoothed, scores, settings.image_score, geometries if original_size else None, coarse,
                      coarse_parts)
