"""`Spade`'s predict steps (a mixin of `spade_ad.estimators.spade.Spade`): images to score parts and maps, one
`ScoredImage` each, on the whole image (a batch at a time; on a device the whole batch's pixel stage at once) or in
tiles, with the explanation of the strongest region. `Spade.iter_predict` turns them into Predictions."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .. import settings as settings_table
from ..core import device_maps
from ..core.explain import explain as explain_region
from ..core.explain import strongest_region
from ..core.features import SkipCallback, extract
from ..core.maps_numpy import apply_roi, coarse_map, map_score, original_with_roi, smooth
from ..core.scoring import knn_image_scores, pixel_maps
from ..core.tiled import TileSettings
from ..core.tiled import predict_parts as tiled_predict_parts
from ..core.tiles import tile_top_count
from ..data.inputs import ImageItem, collect_images
from ..settings import SearchSettings
from .detector import ScoredImage


class PredictSteps:
    """How `Spade` scores images; its attributes are `Spade`'s (settings and fitted state)."""

    def _predict_parts(
        self, images: Any, *, original_size: bool = False, keep_images: bool = False, skip_bad: bool = False,
        on_skip: SkipCallback | None = None, full: bool = False, explain: bool = False,
    ) -> Iterator[ScoredImage]:
        """The predict loop: a `ScoredImage` per image (its map score per `image_score`, see `maps.map_score`; its
        kNN score; its map), and with `full` also its item, geometry, decoded image, original-size map, nearest
        normal images and explanation. Routing only: the maps come from `_tiled_maps` or `_batch_maps`."""
        items = collect_images(images)
        maps = self._tiled_maps(items, skip_bad, on_skip, keep_images) if self.tile_size is not None else \
            self._batch_maps(items, skip_bad, on_skip, keep_images, original_size and full)
        k_density = settings_table.density_k(self)
        for map_part, coarse_part, coarse_grid, knn, array, item, geometry, image, original, nearest, levels in maps:
            if self.roi_ is not None:  # the region of interest: NaN (not scored) outside
                array = apply_roi(array, self.roi_, geometry)
                map_part = self._map_score(array)
                original = None if original is None else original_with_roi(array, self.roi_, geometry)
                if coarse_grid is not None:
                    coarse_part = self._coarse_score(apply_roi(coarse_map(coarse_grid, geometry.input_size,
                                                                          self.sigma), self.roi_, geometry))
            near = np.array([n for n, _ in nearest[:k_density]], dtype=np.int64) if k_density else None
            coarse_part = 0.0 if coarse_part is None else coarse_part
            if not full:
                yield ScoredImage(map_part, knn, array, item, coarse_part=coarse_part, near=near)
                continue
            if original is None and original_size:
                original = original_with_roi(array, self.roi_, geometry)
            why = self._explain(array, levels, nearest) if explain and levels is not None else None
            yield ScoredImage(map_part, knn, array, item, geometry, image, original,
                              [(self.train_names_[n], d) for n, d in nearest[:self.k_image]], why, coarse_part, near)

    def _map_score(self, array: np.ndarray) -> float:
        """The map's part of the image score (`maps.map_score`); in tiled mode its top share is one tile's (1% of
        tile_size^2 pixels), not 1% of the whole large image."""
        return map_score(array, self.image_score, None if self.tile_size is None else tile_top_count(self.tile_size))

    def _coarse_score(self, coarse: np.ndarray) -> float:
        """The coarse part of the fused image score: the top share of the coarsest level's own smoothed map
        (`maps.coarse_map`), one tile's share in tiled mode as for the map part."""
        return map_score(coarse, "map_top", None if self.tile_size is None else tile_top_count(self.tile_size))

    def _tiled_maps(self, items: list[ImageItem], skip_bad: bool, on_skip: SkipCallback | None,
                    keep_images: bool) -> Iterator[tuple[Any, ...]]:
        """Tiled mode (`spade_ad.core.tiled`), one image at a time stitched from its tiles: (map score, coarse part
        and grid (None without the coarse part), kNN, map, item, geometry, image, None, nearest [(index, distance)],
        None: no pyramid kept, so no explanation)."""
        coarse = settings_table.uses_coarse(self)
        for array, grid, knn, item, geometry, image, neighbours, distances in tiled_predict_parts(
                self.backbone_, self.store_, items, TileSettings.of(self), skip_bad=skip_bad, on_skip=on_skip,
                keep_images=keep_images, progress=self.progress):
            coarse_part = self._coarse_score(coarse_map(grid, geometry.input_size, self.sigma)) if coarse else None
            yield (self._map_score(array), coarse_part, grid if coarse else None, knn, array, item, geometry, image,
                   None, list(zip(neighbours, distances)), None)

    def _batch_maps(self, items: list[ImageItem], skip_bad: bool, on_skip: SkipCallback | None, keep_images: bool,
                    original_size: bool) -> Iterator[tuple[Any, ...]]:
        """The batched loop: (map score, coarse part or None, coarse grid or None, kNN, map, item, geometry, image,
        original-size map or None, nearest [(index, distance)], the image's pyramid). One image-level search serves
        the gallery (K nearest), the paper's kNN score (k nearest) and the density normalisation (density_k
        nearest); off the CPU the whole batch's maps are made on the device (`spade_ad.core.device_maps`), on the CPU
        image by image with the numpy search."""
        search = SearchSettings.of(self)
        wanted = max(self.k_gallery, self.k_image, settings_table.density_k(self))
        for batch in self._batches(items, skip_bad, on_skip, "predict", keep_images):
            pyramid, global_features = extract(self.backbone_, batch, self.patch_size)
            distances, neighbours = self.store_.nearest_images(global_features, wanted)
            knn_scores = knn_image_scores(distances, self.k_image)
            on_device = None
            if (self.device_.type != "cpu" if self._device_pipeline is None else self._device_pipeline) and \
                    device_maps.supports(self.store_, neighbours[:, :self.k_gallery], pyramid, fusion=self.fusion,
                                         search_radius=self.search_radius):
                on_device = device_maps.predict_batch(pyramid, self.store_, neighbours[:, :self.k_gallery],
                                                      batch.geometries, search, original_size=original_size)
                distances, neighbours, knn_scores = distances.cpu(), neighbours.cpu(), knn_scores.cpu()
            for i, (item, geometry) in enumerate(zip(batch.items, batch.geometries)):
                original = coarse_part = None
                if on_device is not None:
                    map_part, array, original = on_device.image(i)
                    coarse_part, coarse_grid = on_device.coarse(i)
                else:
                    raw, coarse_grid = pixel_maps([level[i] for level in pyramid], self.store_,
                                                  neighbours[i, :self.k_gallery].cpu(), geometry.input_size, search)
                    array = smooth(raw, search.sigma)
                    map_part = map_score(array, self.image_score)
                    if coarse_grid is not None:
                        coarse_part = self._coarse_score(coarse_map(coarse_grid, geometry.input_size, search.sigma))
                nearest = list(zip(neighbours[i, :wanted].tolist(), distances[i, :wanted].tolist()))
                yield (map_part, coarse_part, coarse_grid, float(knn_scores[i]), array, item, geometry,
                       batch.originals[i] if keep_images else None, original, nearest, [level[i] for level in pyramid])

    def _explain(self, array: np.ndarray, levels: list[torch.Tensor], nearest: list[tuple[int, float]]) -> Any:
        """Where the strongest region of `array` matched in the nearest normal image (`spade_ad.core.explain`)."""
        first = int(nearest[0][0])
        region = strongest_region(array, self.pixel_threshold_, self.backbone_.strides[-1])
        normal = [self.store_.image_map(level, first).numpy() for level in range(len(levels))]
        return explain_region([level.cpu().numpy() for level in levels], self.backbone_.strides, normal, first,
                              self.train_names_[first], region)
