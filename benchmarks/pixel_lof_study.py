"""Patch-level density study (issue 27, item 2): a pixel's distance divided by the matched training feature's own
leave-one-out distance (its distance to the nearest feature of its own K nearest other training images), as LOF
does per position, so that a rare good surface or print, whose training features are far from everything, is
measured against its own sparseness. Only the image score's parts are changed here; the map kept for localisation is
the plain one.

Per product: fit with the default settings, then score every training image without itself and every test image
with the model's own search (`max_search_pairs` reduced galleries included), keeping each position's matched stored
row. The density of a stored row is its image's leave-one-out distance at that position; `beta` softens the division:
d / (r + beta * median(r)) * (1 + beta) * median(r) (beta large: the plain distance, up to a factor).

    .venv/bin/python benchmarks/pixel_lof_study.py                     # every dev product

Writes benchmarks/results/pixel_lof_study.{md,json}.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from image_score_study import evaluate, study_main  # noqa: E402
from replayed_search import gallery_rows, leave_one_out, predicted  # noqa: E402

from spade_ad import Spade  # noqa: E402
from spade_ad.core import score_parts, search_numpy  # noqa: E402
from spade_ad.core.maps_numpy import fuse, map_score, smooth, upsample  # noqa: E402

BETAS = (0.5, 2.0, 5.0)


def level_search(model: Spade, query: np.ndarray, neighbours: np.ndarray, level: int) -> tuple[np.ndarray, np.ndarray]:
    """(Euclidean distance (h*w,), matched stored row (h*w,)) of a query map (C, h, w) against the gallery."""
    rows = gallery_rows(model, level, query.shape[1] * query.shape[2], neighbours)
    bank = np.asarray(model.store_.levels[level][rows])
    squared, index = search_numpy.topk_squared_distances(query.reshape(query.shape[0], -1).T, bank, 1)
    return np.sqrt(np.maximum(squared[:, 0], 0)), rows[index[:, 0]]


def image_levels(model: Spade, maps: list[np.ndarray], neighbours: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    return [level_search(model, m, neighbours, level) for level, m in enumerate(maps)]


def parts_of(levels: list[tuple[np.ndarray, np.ndarray]], shapes: list[tuple[int, int]], size: tuple[int, int],
             density: list[np.ndarray] | None, beta: float, sigma: float) -> tuple[float, float]:
    """(map top 1%, coarse level top 1%) of one image, plain (density None) or density-divided."""
    grids = []
    for level, ((d, matched), shape) in enumerate(zip(levels, shapes)):
        if density is not None:
            r = density[level][matched]
            m = float(np.median(density[level]))
            d = d / (r + beta * m) * (1 + beta) * m
        grids.append(d.reshape(shape))
    fused = smooth(fuse(grids, size), sigma)
    coarse = smooth(upsample(grids[-1], size), sigma)
    return map_score(fused, "map_top"), map_score(coarse, "map_top")


def study(category: Any) -> dict[str, Any]:
    model = Spade(progress=False).fit(category.train)
    store = model.store_
    sigma, k = model.sigma, model.k_gallery
    train_levels, train_shapes, train_sizes, train_knn, train_near = [], [], [], [], []
    for d, nb, maps, size in leave_one_out(model):
        train_levels.append(image_levels(model, maps, nb[:k]))
        train_shapes.append([m.shape[1:] for m in maps])
        train_sizes.append(size)
        train_knn.append(float(d[:model.k_image].mean()))
        train_near.append(nb[:3])
    density = [np.zeros(level.shape[0], np.float32) for level in store.levels]
    for i, levels in enumerate(train_levels):
        for level, (d, _) in enumerate(levels):
            density[level][store._offsets[i, level]:store._offsets[i + 1, level]] = d
    test_levels, test_shapes, test_sizes, test_knn, test_near = [], [], [], [], []
    for maps, distances, neighbours, geometry in predicted(model, [s.path for s in category.test]):
        test_levels.append(image_levels(model, maps, neighbours))
        test_shapes.append([m.shape[1:] for m in maps])
        test_sizes.append(geometry.input_size)
        test_knn.append(float(distances[:model.k_image].mean()))
        test_near.append(neighbours[:3])
    labels = np.array([s.is_anomalous for s in category.test], bool)

    def parts(levels: list[Any], shapes: list[Any], sizes: list[Any], knn: list[float], beta: float | None
              ) -> np.ndarray:
        rows = [(*parts_of(lv, sh, sz, None if beta is None else density, beta or 0.0, sigma), kn)
                for lv, sh, sz, kn in zip(levels, shapes, sizes, knn)]
        return np.array(rows)

    plain_loo = parts(train_levels, train_shapes, train_sizes, train_knn, None)
    plain_test = parts(test_levels, test_shapes, test_sizes, test_knn, None)
    variants = {"default (plain map, plain coarse)": (plain_loo, plain_test)}
    for beta in BETAS:
        lof_loo = parts(train_levels, train_shapes, train_sizes, train_knn, beta)
        lof_test = parts(test_levels, test_shapes, test_sizes, test_knn, beta)
        variants[f"pixel-LOF map, plain coarse (beta {beta})"] = (
            np.stack([lof_loo[:, 0], plain_loo[:, 1], plain_loo[:, 2]], 1),
            np.stack([lof_test[:, 0], plain_test[:, 1], plain_test[:, 2]], 1))
        variants[f"pixel-LOF map and coarse (beta {beta})"] = (lof_loo, lof_test)
    out = {}
    near_loo, near_test = np.array(train_near), np.array(test_near)
    for name, (loo, test) in variants.items():
        norm_loo = score_parts.density_normalised(loo, near_loo, loo, near_loo.shape[1])
        norm_test = score_parts.density_normalised(test, near_test, loo, near_test.shape[1])
        scale = {p: score_parts.robust_scale(norm_loo[:, i]) for i, p in enumerate(score_parts.PARTS)}

        def combine(x: np.ndarray, scale: dict[str, tuple[float, float]] = scale) -> np.ndarray:
            return score_parts.combine_scores("fused", scale, x[:, 0], x[:, 2], 1 / 3, x[:, 1], 1 / 3)

        out[name] = evaluate(combine(norm_loo), combine(norm_test), labels)
        print(category.name, name, {k: round(v, 3) for k, v in out[name].items()}, file=sys.stderr, flush=True)
    return out


def main() -> None:
    study_main(__doc__ or "", study, "image score parts", "pixel_lof_study")

if __name__ == "__main__":
    main()
