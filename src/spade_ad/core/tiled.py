"""Tiled mode on the torch path: images read one at a time, the backbone run on batches of tiles, the training
pyramid stitched from the tiles' cores, and the predict and leave-one-out loops over tiles (the maths and the tile
plan are `spade_ad.core.tiles`, numpy only). See docs/tiles.md.

Memory per image: the decoded image and its copy at the tiled input size (3 bytes a pixel each), the map (4 bytes
a pixel, a few copies while smoothing and resizing) and one batch of tiles' features: never the whole image's
features (at predict; fit stitches the image's pyramid before storing it, 0.3 to 0.8 bytes of float32 a pixel for
the default layers).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .. import settings as settings_table
from ..data.inputs import ImageItem, iter_loaded
from .backbones import Backbone
from .feature_store import FeatureStore
from .features import SkipCallback, thumbnails
from .gallery import image_offsets
from .geometry import Geometry, image_to_array
from .maps_numpy import coarse_map, smooth
from .scoring import kept_neighbours, knn_image_scores
from .tiles import Tile, plan_tiles, stitch_features, stored_cores, tile_cores, tiled_geometry, tiled_map, window_rows


@dataclass(frozen=True)
class TileSettings:
    """What the tiled loops read of a model's settings."""

    tile_size: int
    tile_overlap: int
    tile_margin: int
    image_size: int
    k_gallery: int
    k_image: int
    kappa: int
    distance: str
    sigma: float
    patch_size: int
    batch_size: int
    memory_budget: int | None
    density_k: int  # the image score's (`settings.density_k`: 0 when it has no density normalisation)
    coarse: bool  # whether the image score has the coarse part (`settings.uses_coarse`)

    @classmethod
    def of(cls, model: Any) -> TileSettings:
        derived = {"density_k": settings_table.density_k(model), "coarse": settings_table.uses_coarse(model)}
        return cls(**{name: derived[name] if name in derived else getattr(model, name)
                      for name in cls.__dataclass_fields__})


@dataclass
class TiledImage:
    """One decoded image in tiled mode: its pixels at the tiled input size (uint8 (H, W, 3)), its geometry, its
    global view (float (3, s, s)) and the decoded image when kept."""

    pixels: np.ndarray
    geometry: Geometry
    view: torch.Tensor
    image: Image.Image | None


def iter_images(items: list[ImageItem], image_size: int, *, skip_bad: bool, on_skip: SkipCallback | None,
                keep_images: bool = False, desc: str = "", progress: bool | None = None
                ) -> Iterator[tuple[ImageItem, TiledImage]]:
    """Decode and prepare the images one at a time (one decoder thread, one image read ahead: two large images at
    most in memory)."""
    def prepare(item: ImageItem, image: Image.Image) -> TiledImage:
        geometry = tiled_geometry((image.height, image.width))
        height, width = geometry.input_size
        resized = image if (image.height, image.width) == (height, width) else image.resize(
            (width, height), Image.Resampling.BILINEAR, reducing_gap=None)
        view = Geometry(geometry.original_size, (image_size, image_size), geometry.crop_box)
        return TiledImage(np.asarray(resized.convert("RGB")), geometry, torch.from_numpy(image_to_array(image, view)),
                          image if keep_images else None)

    bar = tqdm(total=len(items), desc=desc, unit="img", disable=None if progress is None else not progress)
    try:
        for item, tiled in iter_loaded(items, skip_bad=skip_bad, on_skip=on_skip, workers=1, prefetch=1,
                                       prepare=prepare):
            yield item, tiled
            bar.update(1)
    finally:
        bar.close()


def tile_pyramids(backbone: Backbone, pixels: np.ndarray, tiles: list[Tile], *, batch_size: int,
                  patch_size: int = 1) -> Iterator[tuple[Tile, list[np.ndarray]]]:
    """Each tile with its core's cells per level ([(C_l, h_l, w_l)] float32), the backbone run on `batch_size`
    tiles at a time (tiles of one image share a size)."""
    device = next(backbone.parameters()).device
    for first in range(0, len(tiles), batch_size):
        chunk = tiles[first:first + batch_size]
        batch = torch.from_numpy(np.stack([pixels[t.top:t.top + t.size[0], t.left:t.left + t.size[1]]
                                           for t in chunk])).to(device).permute(0, 3, 1, 2).float().div_(255.0)
        with torch.no_grad():
            pyramid, _ = backbone(batch)
            if patch_size > 1:
                pyramid = [F.avg_pool2d(m, patch_size, stride=1, padding=patch_size // 2, count_include_pad=False)
                           for m in pyramid]
        levels = [m.float().cpu().numpy() for m in pyramid]
        for i, tile in enumerate(chunk):
            yield tile, tile_cores(tile, [level[i] for level in levels], backbone.strides)


def global_features(backbone: Backbone, view: torch.Tensor) -> torch.Tensor:
    """The global feature (1, D) of an image's global view."""
    with torch.no_grad():
        return backbone(view[None].to(next(backbone.parameters()).device))[1]


def training_features(backbone: Backbone, items: list[ImageItem], settings: TileSettings, *, skip_bad: bool,
                      on_skip: SkipCallback | None, thumbnail_size: int, progress: bool | None = None,
                      desc: str = "fit") -> Iterator[tuple[list[str], list[torch.Tensor], torch.Tensor,
                                                           list[np.ndarray]]]:
    """What fit stores, one image at a time: (names, pyramid [(1, C_l, H / s_l, W / s_l)] stitched from the
    tiles' cores, global feature (1, D), thumbnails)."""
    for item, tiled in iter_images(items, settings.image_size, skip_bad=skip_bad, on_skip=on_skip, desc=desc,
                                   progress=progress):
        size = tiled.geometry.input_size
        tiles = plan_tiles(size, settings.tile_size, settings.tile_overlap)
        full = stitch_features(tile_pyramids(backbone, tiled.pixels, tiles, batch_size=settings.batch_size,
                                             patch_size=settings.patch_size), size, backbone.strides,
                               backbone.channels)
        yield ([item.name], [torch.from_numpy(level)[None] for level in full],
               global_features(backbone, tiled.view).cpu(), thumbnails(tiled.view[None], thumbnail_size))


def _gallery(store: FeatureStore, offsets: np.ndarray, images: np.ndarray) -> Any:
    def window(level: int, box: tuple[int, int, int, int], cells: tuple[int, int]) -> np.ndarray:
        return window_rows(store.levels[level], offsets, store.shapes, level, images, box, cells)
    return window


def predict_parts(backbone: Backbone, store: FeatureStore, items: list[ImageItem], settings: TileSettings, *,
                  skip_bad: bool, on_skip: SkipCallback | None, keep_images: bool = False,
                  progress: bool | None = None) -> Iterator[tuple[Any, ...]]:
    """Per image: (map score input: the smoothed map at the tiled input size, the coarsest level's own score grid
    (`tiles.tiled_map`), kNN score, item, geometry, decoded image or None, nearest training images (indices), their
    squared distances)."""
    offsets = image_offsets(store.shapes)
    for item, tiled in iter_images(items, settings.image_size, skip_bad=skip_bad, on_skip=on_skip,
                                   keep_images=keep_images, desc="predict", progress=progress):
        distances, neighbours = store.nearest_images(global_features(backbone, tiled.view),
                                                     max(settings.k_gallery, settings.k_image, settings.density_k))
        distances, neighbours = distances.cpu(), neighbours.cpu()
        knn = float(knn_image_scores(distances, settings.k_image)[0])
        size = tiled.geometry.input_size
        tiles = plan_tiles(size, settings.tile_size, settings.tile_overlap)
        raw, coarse = tiled_map(tile_pyramids(backbone, tiled.pixels, tiles, batch_size=settings.batch_size,
                                              patch_size=settings.patch_size), backbone.strides, size,
                                _gallery(store, offsets, neighbours[0, :settings.k_gallery].numpy()),
                                margin=settings.tile_margin, kappa=settings.kappa, distance=settings.distance,
                                memory_budget=settings.memory_budget)
        del tiled.pixels
        yield (smooth(raw, settings.sigma), coarse, knn, item, tiled.geometry, tiled.image, neighbours[0].tolist(),
               distances[0].tolist())


def leave_one_out(store: FeatureStore, strides: tuple[int, ...], channels: tuple[int, ...],
                  settings: TileSettings, groups: np.ndarray | None = None
                  ) -> Iterator[tuple[int, float, np.ndarray, np.ndarray, np.ndarray]]:
    """Every training image scored against the others (its own global feature out of its kNN, its own maps out
    of its gallery; with `groups`, without its whole group), its tiles' cores read back from the store: (index, kNN
    score, smoothed map at its input size, the coarsest level's own smoothed map when the score has the coarse
    part (else None), its `density_k` nearest other training images), as `spade_ad.core.scoring.leave_one_out` does
    for whole images."""
    n = store.n_images
    if n < 2:
        raise ValueError("leave-one-out needs at least two training images")
    offsets = image_offsets(store.shapes)
    want = n if groups is not None else min(n, max(settings.k_gallery, settings.k_image, settings.density_k) + 1)
    for index in range(n):
        distances, neighbours = store.nearest_images(store.global_features[index:index + 1], want)
        keep = kept_neighbours(neighbours[0], index, groups)
        d, nearest = distances[0][keep], neighbours[0][keep]
        size = (int(store.shapes[index, 0, 0]) * strides[0], int(store.shapes[index, 0, 1]) * strides[0])
        tiles = plan_tiles(size, settings.tile_size, settings.tile_overlap)
        cores = stored_cores(size, tiles, strides, _gallery(store, offsets, np.array([index])), channels)
        raw, coarse = tiled_map(cores, strides, size, _gallery(store, offsets, nearest[:settings.k_gallery].numpy()),
                                margin=settings.tile_margin, kappa=settings.kappa, distance=settings.distance,
                                memory_budget=settings.memory_budget)
        yield (index, float(d[:settings.k_image].mean()), smooth(raw, settings.sigma),
               coarse_map(coarse, size, settings.sigma) if settings.coarse else None,
               nearest[:settings.density_k].cpu().numpy())
