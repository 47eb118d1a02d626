"""Which stored rows make up a test image's gallery, in numpy only (shared by the torch store and the runtime).

Stored pyramid levels are flat (n_vectors, C_l) matrices, image after image; `offsets` says where each image's rows
start. A gallery is the rows of the K nearest training images at one level: all of them, or for long and large
images (`max_search_pairs`) the same share of every image's rows, taken in that image's coreset order.
"""

from __future__ import annotations

import numpy as np


def image_offsets(shapes: np.ndarray) -> np.ndarray:
    """Row offsets (N + 1, L) of each image's vectors at each level, from the per-image map shapes (N, L, 2)."""
    sizes = shapes[..., 0] * shapes[..., 1]
    return np.concatenate([np.zeros((1, sizes.shape[1]), dtype=np.int64), sizes.cumsum(0)], 0)


def gallery_fraction(query_positions: int, gallery_shapes: np.ndarray, max_pairs: int | None) -> float:
    """Share of each gallery image's vectors to search so that queries x gallery vectors stay within `max_pairs`
    (1.0: exact search). `gallery_shapes`: the gallery images' (h, w) at this level, (K, 2)."""
    if max_pairs is None:
        return 1.0
    pairs = query_positions * int((gallery_shapes[:, 0] * gallery_shapes[:, 1]).sum())
    return min(1.0, max_pairs / pairs)


def gallery_row_indices(offsets: np.ndarray, order: np.ndarray | None, level: int, images: np.ndarray,
                        fraction: float) -> np.ndarray | None:
    """Sorted row indices of a reduced gallery (the first ceil(fraction * h * w) rows of each image's coreset
    order), or None for the whole images' rows (fraction 1, or a store without orders)."""
    if fraction >= 1.0 or order is None:
        return None
    starts, stops = offsets[images, level], offsets[images + 1, level]
    rows = np.concatenate([start + order[start:start + max(1, int(np.ceil(fraction * (stop - start))))]
                           for start, stop in zip(starts, stops)]).astype(np.int64)
    rows.sort()  # a memory map reads fastest in file order; the gallery's order does not matter
    return rows


def all_row_indices(offsets: np.ndarray, level: int, images: np.ndarray) -> np.ndarray:
    """Every row index of the given images at `level`, image after image."""
    return np.concatenate([np.arange(offsets[i, level], offsets[i + 1, level]) for i in images])


def gallery_rows(level_rows: np.ndarray, offsets: np.ndarray, order: np.ndarray | None, level: int,
                 images: np.ndarray, fraction: float = 1.0) -> np.ndarray:
    """The gallery's vectors at `level` as stored (float16 or float32), from a (possibly memory-mapped) level."""
    rows = gallery_row_indices(offsets, order, level, images, fraction)
    if rows is not None:
        return np.asarray(level_rows[rows])
    starts, stops = offsets[images, level], offsets[images + 1, level]
    return np.concatenate([level_rows[a:b] for a, b in zip(starts, stops)], 0)


def image_map(level_rows: np.ndarray, offsets: np.ndarray, shapes: np.ndarray, level: int, index: int) -> np.ndarray:
    """Training image `index`'s stored map at `level` as float32 (C, h, w)."""
    h, w = (int(v) for v in shapes[index, level])
    start = int(offsets[index, level])
    return np.asarray(level_rows[start:start + h * w], dtype=np.float32).T.reshape(-1, h, w)
