"""The model's own walks, replayed for the studies that change one step of the score (derived_map_study,
patchcore_weight_study, pixel_lof_study): every training image as its leave-one-out sees it, every test image as
`predict` extracts it, and a level's gallery rows as the model's search takes them (whole images, or the reduced
gallery of `max_search_pairs`). Not a benchmark of its own."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spade_ad import Spade
from spade_ad.core.features import extract
from spade_ad.core.gallery import all_row_indices, gallery_fraction, gallery_row_indices
from spade_ad.core.scoring import training_input_size
from spade_ad.data.inputs import collect_images


def leave_one_out(model: Spade) -> Iterator[tuple[np.ndarray, np.ndarray, list[np.ndarray], tuple[int, int]]]:
    """Each training image as the fit's leave-one-out sees it: (its global distances and nearest other training
    images, nearest first, its own pyramid levels (C, h, w), its input size)."""
    store, n, k = model.store_, model.store_.n_images, model.k_gallery
    for i in range(n):
        d, nb = store.nearest_images(store.global_features[i:i + 1], min(n, k + 1))
        keep = nb[0] != i
        levels = [store.image_map(level, i).numpy() for level in range(len(store.levels))]
        yield (d[0][keep].numpy(), nb[0][keep].numpy(), levels,
               training_input_size(store, i, model.backbone_.strides[0]))


def predicted(model: Spade, paths: Sequence[str | Path]) -> Iterator[tuple[list[np.ndarray], torch.Tensor,
                                                                          np.ndarray, Any]]:
    """Each image of `paths` as `predict` extracts it: (its pyramid levels (C, h, w), its global distances to its
    `k_gallery` nearest training images and their indices, nearest first, its geometry)."""
    for batch in model._batches(collect_images(list(paths)), False, None, "predict"):
        pyramid, global_features = extract(model.backbone_, batch, model.patch_size)
        distances, neighbours = model.store_.nearest_images(global_features, model.k_gallery)
        for b, geometry in enumerate(batch.geometries):
            yield [level[b].numpy() for level in pyramid], distances[b], neighbours[b].numpy(), geometry


def gallery_rows(model: Spade, level: int, positions: int, neighbours: np.ndarray) -> np.ndarray:
    """The store's row indices at `level` that a query of `positions` positions is searched against, among the
    images `neighbours`: whole images, or the model's reduced gallery."""
    store = model.store_
    fraction = gallery_fraction(positions, store.shapes[neighbours, level], model.max_search_pairs)
    rows = gallery_row_indices(store._offsets, store.orders[level], level, neighbours, fraction)
    return all_row_indices(store._offsets, level, neighbours) if rows is None else rows
