"""Tiled mode (setting `tile_size`): small defects on large images, in numpy only (shared by the torch path and,
should it support tiled models, the runtime).

The image is scored at (nearly) its own resolution: resized only to sides that are multiples of 32, cut into square
tiles of `tile_size` pixels that overlap by `tile_overlap`, each run through the network on its own. Every tile
owns a *core*, the part of it nearest to it (cores partition the image, on a 32-pixel grid so that every pyramid
level's cells line up), so a position is always scored with the features of the tile it sits in the middle of,
away from the tile's padded borders.

Fit stores each training image's pyramid stitched from its tiles' cores (one map per level at the image's full
resolution, on disk like any stored map). Predict searches each tile core's positions against the same region of the
K gallery images grown by `tile_margin` pixels on every side (never the whole gallery image), so the cost grows
with the pixels, not with their square, and stitches the per-core maps into one map at the input size, smoothed and
scored once. Only one batch of tiles' features is ever in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import SettingError
from . import search_numpy as numpy_search
from .geometry import Geometry
from .maps_numpy import TOP_SHARE, fuse, position_scores

#: Sides of the tiled input and tile borders are multiples of this (the coarsest stride of the pyramid).
GRID = 32


@dataclass(frozen=True)
class Tile:
    """One tile: its top-left corner in input pixels, its size (height, width), and its core (top, left, bottom,
    right), the region of the input whose scores and stored features come from this tile."""

    top: int
    left: int
    size: tuple[int, int]
    core: tuple[int, int, int, int]

    def core_cells(self, stride: int) -> tuple[int, int, int, int]:
        """The core in cells of a level of `stride`, relative to the tile (top, left, bottom, right)."""
        top, left, bottom, right = self.core
        return ((top - self.top) // stride, (left - self.left) // stride, (bottom - self.top) // stride,
                (right - self.left) // stride)


def tile_top_count(tile_size: int) -> int:
    """How many of a tiled map's highest values `map_top` (and the map part of `fused`) average: TOP_SHARE of one
    tile's pixels (655 for tiles of 256), the area the default mode's top share covers at its resolution, so a
    defect of a few pixels on a 20-megapixel image is not averaged away with 200,000 good pixels."""
    return max(1, int(TOP_SHARE * tile_size * tile_size))


def check_tiling(tile_size: int, tile_overlap: int) -> None:
    """The tile settings together: an overlap smaller than the tile (each setting alone is checked by the table)."""
    if tile_overlap >= tile_size:
        raise SettingError("tile_overlap", f"must be smaller than tile_size ({tile_size})", tile_overlap,
                           f"a multiple of {GRID} below tile_size, e.g. {max(0, tile_size // 4 // GRID * GRID)}")


def tiled_geometry(original_size: tuple[int, int]) -> Geometry:
    """The geometry of an image in tiled mode: its own size rounded to multiples of `GRID` (at least one `GRID`),
    the whole image scored."""
    height, width = original_size
    size = (max(GRID, int(round(height / GRID)) * GRID), max(GRID, int(round(width / GRID)) * GRID))
    return Geometry(original_size, size, (0.0, 0.0, float(width), float(height)))


def _axis(length: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Tiles along one axis: (start, extent, core start, core end); the last tile ends at the input's end."""
    if length <= tile:
        return [(0, length, 0, length)]
    step = tile - overlap
    starts = list(range(0, length - tile, step)) + [length - tile]
    starts = sorted(set(starts))
    bounds = [0] + [(starts[i + 1] + starts[i] + tile) // 2 // GRID * GRID for i in range(len(starts) - 1)] + [length]
    return [(start, tile, bounds[i], bounds[i + 1]) for i, start in enumerate(starts)]


def plan_tiles(input_size: tuple[int, int], tile_size: int, tile_overlap: int) -> list[Tile]:
    """The tiles of an input of `input_size` (multiples of `GRID`), row by row; their cores partition it."""
    rows = _axis(input_size[0], tile_size, tile_overlap)
    cols = _axis(input_size[1], tile_size, tile_overlap)
    return [Tile(top, left, (height, width), (core_top, core_left, core_bottom, core_right))
            for top, height, core_top, core_bottom in rows for left, width, core_left, core_right in cols]


def window_rows(level_rows: np.ndarray, offsets: np.ndarray, shapes: np.ndarray, level: int, images: Iterable[int],
                box: tuple[int, int, int, int], query_cells: tuple[int, int]) -> np.ndarray:
    """The stored vectors (as stored, float16 or float32) of a window of each of `images` at `level`: `box` (top,
    left, bottom, right) in cells of a map of `query_cells` (h, w), scaled to each image's own map size (the same
    for a fixtured camera) and clipped to it. Reads only those rows of a memory-mapped level."""
    top, left, bottom, right = box
    indices = []
    for image in images:
        h, w = (int(v) for v in shapes[image, level])
        sy, sx = h / query_cells[0], w / query_cells[1]
        y0, x0 = min(h - 1, max(0, int(np.floor(top * sy)))), min(w - 1, max(0, int(np.floor(left * sx))))
        ys = np.arange(y0, min(h, max(y0 + 1, int(np.ceil(bottom * sy)))))
        xs = np.arange(x0, min(w, max(x0 + 1, int(np.ceil(right * sx)))))
        indices.append((int(offsets[image, level]) + ys[:, None] * w + xs[None, :]).ravel())
    rows = np.concatenate(indices)
    return np.asarray(level_rows[rows])


#: Gallery vectors of a window: (level, box in the query's cells, the query's map size in cells) -> rows (M, C).
GalleryWindow = Callable[[int, tuple[int, int, int, int], tuple[int, int]], np.ndarray]


def core_map(cores: list[np.ndarray], tile: Tile, strides: tuple[int, ...], input_size: tuple[int, int],
             gallery: GalleryWindow, *, margin: int, kappa: int, distance: str,
             memory_budget: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The unsmoothed scores (core height, core width) of one tile's core: its feature cells at each level
    (`cores`: [(C_l, h_l, w_l)] of the core only) searched against the gallery images' same region grown by
    `margin` pixels, each position's distance to its `kappa` nearest (see `spade_ad.core.maps_numpy.position_scores`),
    the levels fused by the mean of their upsampled maps; and the coarsest level's own grid (h_L, w_L) of the
    core."""
    top, left, bottom, right = tile.core
    grids = []
    for level, (cells, stride) in enumerate(zip(cores, strides)):
        box = ((top - margin) // stride, (left - margin) // stride, -(-(bottom + margin) // stride),
               -(-(right + margin) // stride))
        rows = gallery(level, box, (input_size[0] // stride, input_size[1] // stride))
        queries = np.asarray(cells, dtype=np.float32).reshape(cells.shape[0], -1).T
        squared, _ = numpy_search.topk_squared_distances(queries, rows, kappa, memory_budget)
        grids.append(position_scores(squared, distance).reshape(cells.shape[1:]))
    return fuse(grids, (bottom - top, right - left)), grids[-1]


def tiled_map(tile_features: Iterable[tuple[Tile, list[np.ndarray]]], strides: tuple[int, ...],
              input_size: tuple[int, int], gallery: GalleryWindow, *, margin: int, kappa: int, distance: str,
              memory_budget: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The unsmoothed map (input height, width) stitched from every tile's core map, and the coarsest level's own
    score grid (input height / s_L, width / s_L) stitched from the cores' coarsest cells (the fused image score's
    third part, as `spade_ad.core.maps_numpy.coarse_map` makes it); `tile_features` yields each tile with its cores'
    cells per level ([(C_l, h_l, w_l)], e.g. from `tile_cores`), one tile at a time."""
    stitched = np.zeros(input_size, dtype=np.float32)
    coarse = np.zeros((input_size[0] // strides[-1], input_size[1] // strides[-1]), dtype=np.float32)
    for tile, cores in tile_features:
        top, left, bottom, right = tile.core
        stitched[top:bottom, left:right], grid = core_map(cores, tile, strides, input_size, gallery, margin=margin,
                                                          kappa=kappa, distance=distance,
                                                          memory_budget=memory_budget)
        coarse[top // strides[-1]:bottom // strides[-1], left // strides[-1]:right // strides[-1]] = grid
    return stitched, coarse


def tile_cores(tile: Tile, levels: list[np.ndarray], strides: tuple[int, ...]) -> list[np.ndarray]:
    """The core's cells of a tile's pyramid ([(C_l, tile h / s_l, tile w / s_l)] -> [(C_l, core h_l, core w_l)])."""
    out = []
    for cells, stride in zip(levels, strides):
        top, left, bottom, right = tile.core_cells(stride)
        out.append(cells[:, top:bottom, left:right])
    return out


def stored_cores(input_size: tuple[int, int], tiles: list[Tile], strides: tuple[int, ...],
                 window: Callable[[int, tuple[int, int, int, int], tuple[int, int]], np.ndarray],
                 channels: tuple[int, ...]) -> Iterator[tuple[Tile, list[np.ndarray]]]:
    """Each tile's core cells read back from a stored (stitched) image (leave-one-out: a training image scored as a
    query): `window(level, box, query_cells)` gives that image's rows of `box`."""
    for tile in tiles:
        cores = []
        for level, (stride, channel) in enumerate(zip(strides, channels)):
            top, left, bottom, right = (v // stride for v in tile.core)
            rows = window(level, (top, left, bottom, right), (input_size[0] // stride, input_size[1] // stride))
            cores.append(np.asarray(rows, dtype=np.float32).T.reshape(channel, bottom - top, right - left))
        yield tile, cores


def stitch_features(tile_features: Iterable[tuple[Tile, list[np.ndarray]]], input_size: tuple[int, int],
                    strides: tuple[int, ...], channels: tuple[int, ...]) -> list[np.ndarray]:
    """A training image's pyramid [(C_l, H / s_l, W / s_l)] float32 stitched from its tiles' cores (what fit
    stores: the same cells a test tile's core is made of)."""
    full = [np.zeros((channel, input_size[0] // stride, input_size[1] // stride), dtype=np.float32)
            for channel, stride in zip(channels, strides)]
    for tile, cores in tile_features:
        for target, cells, stride in zip(full, cores, strides):
            top, left, bottom, right = (v // stride for v in tile.core)
            target[:, top:bottom, left:right] = cells
    return full
