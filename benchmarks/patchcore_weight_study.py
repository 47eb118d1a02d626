"""Issue 27's item 2 candidate "PatchCore's reweighting (the nearest gallery feature's own neighbourhood)".

PatchCore (Roth et al. 2022, eq. 7; anomalib's `compute_anomaly_score`) scales an image's score s* (its largest
patch distance) by w = 1 - exp(||q - m*||) / sum over m in N_b(m*) of exp(||q - m||): q is the patch with the
largest distance, m* its nearest stored feature, N_b(m*) the b = 9 stored features nearest to m* (m* among them). When
m* sits in a dense cluster w is about 1 - 1/b; when m* is isolated (a rare feature) w is about 1, so the score rises:
the paper's intent is to score higher an anomaly whose nearest normal feature is itself rare. w lies in
(1 - 1/b, 1): at most a b-th of the score moves.

Here, per product (default fit; training images without themselves, test images as predicted, both on the model's
own gallery of each image's `k_gallery` nearest images): at each pyramid level the position with the largest
distance, its matched stored row and that row's 9 nearest rows in the same gallery give the level's w. Variants of
the default image score (lof3 parts, equal weights, a quarter the strongest part):

- the coarse part times the coarsest level's w;
- the map part times the mean of the levels' w, and the coarse part times the coarsest level's w.

    .venv/bin/python benchmarks/patchcore_weight_study.py                # every dev product

Writes benchmarks/results/patchcore_weight_study.{md,json}; docs/detection.md quotes it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from derived_map_study import Banks  # noqa: E402
from image_score_study import evaluate, study_main  # noqa: E402
from replayed_search import gallery_rows, leave_one_out, predicted  # noqa: E402

from spade_ad import Spade  # noqa: E402
from spade_ad.core import score_parts, search_numpy  # noqa: E402
from spade_ad.core.maps_numpy import coarse_map, fuse, map_score, smooth  # noqa: E402

SUPPORT = 9  # anomalib's num_neighbors


def level_weight(banks: Banks, plain: np.ndarray, level: int, neighbours: np.ndarray) -> tuple[np.ndarray, float]:
    """One level's (h, w) distance grid of a query map (C, h, w) and PatchCore's w at its largest distance."""
    h, w = plain.shape[1:]
    rows = gallery_rows(banks.model, level, h * w, neighbours)
    bank = banks.plain[level][rows]
    queries = plain.reshape(plain.shape[0], -1).T
    squared, index = search_numpy.topk_squared_distances(queries, bank, 1)
    distances = np.sqrt(np.maximum(squared[:, 0], 0))
    worst = int(np.argmax(distances))
    matched = bank[index[worst, 0]]
    _, support = search_numpy.topk_squared_distances(matched[None], bank, min(SUPPORT, len(bank)))
    to_support = np.sqrt(((queries[worst][None] - bank[support[0]]) ** 2).sum(1)).astype(np.float64)
    shares = np.exp(to_support - to_support.max())
    weight = 1.0 - float(shares[np.argmin(to_support)] / shares.sum())  # the matched row: the nearest of them
    return distances.reshape(h, w), weight


def image_parts(banks: Banks, maps: list[np.ndarray], neighbours: np.ndarray, size: tuple[int, int],
                sigma: float) -> tuple[float, float, list[float]]:
    """(map part, coarse part, each level's w) of one image."""
    grids, weights = zip(*(level_weight(banks, m, level, neighbours) for level, m in enumerate(maps)))
    fused = smooth(fuse(list(grids), size), sigma)
    return (map_score(fused, "map_top"), map_score(coarse_map(grids[-1], size, sigma), "map_top"), list(weights))


def study(category: Any) -> dict[str, Any]:
    model = Spade(progress=False).fit(category.train)
    sigma, k = model.sigma, model.k_gallery
    banks = Banks(model)
    loo, test, loo_w, test_w, loo_near, test_near = [], [], [], [], [], []
    for d, nb, levels, size in leave_one_out(model):
        map_part, coarse, weights = image_parts(banks, levels, nb[:k], size, sigma)
        loo.append((map_part, coarse, float(d[:model.k_image].mean())))
        loo_w.append(weights)
        loo_near.append(nb[:3])
    for levels, distances, neighbours, geometry in predicted(model, [s.path for s in category.test]):
        map_part, coarse, weights = image_parts(banks, levels, neighbours, geometry.input_size, sigma)
        test.append((map_part, coarse, float(distances[:model.k_image].mean())))
        test_w.append(weights)
        test_near.append(neighbours[:3])
    labels = np.array([s.is_anomalous for s in category.test], bool)
    loo_a, test_a, lw, tw = np.array(loo), np.array(test), np.array(loo_w), np.array(test_w)
    variants = {
        "today (no weight)": (np.ones_like(lw), np.ones_like(tw), False),
        "coarse part x coarsest level's w": (lw, tw, False),
        "map part x mean w, coarse part x coarsest w": (lw, tw, True),
    }
    out: dict[str, Any] = {}
    near_loo, near_test = np.array(loo_near), np.array(test_near)
    for name, (wl, wt, on_map) in variants.items():
        def weighted(parts: np.ndarray, w: np.ndarray, on_map: bool = on_map) -> np.ndarray:
            parts = parts.copy()
            parts[:, 1] *= w[:, -1]
            if on_map:
                parts[:, 0] *= w.mean(1)
            return parts

        good, tested = weighted(loo_a, wl), weighted(test_a, wt)
        norm_loo = score_parts.density_normalised(good, near_loo, good, 3)
        norm_test = score_parts.density_normalised(tested, near_test, good, 3)
        scale = {part: score_parts.robust_scale(norm_loo[:, j]) for j, part in enumerate(score_parts.PARTS)}

        def combined(x: np.ndarray, scale: dict[str, tuple[float, float]] = scale) -> np.ndarray:
            return score_parts.combine_scores("fused", scale, x[:, 0], x[:, 2], 1 / 3, x[:, 1], 1 / 3, 0.25)

        out[name] = evaluate(combined(norm_loo), combined(norm_test), labels)
    coarse_w = tw[:, -1]  # the range of w, printed: (min, median) on good and on defective test images
    good_w, defect_w = coarse_w[~labels], coarse_w[labels]
    print(category.name, "coarsest level's w: good", np.round([good_w.min(), np.median(good_w)], 4),
          "defective", np.round([defect_w.min(), np.median(defect_w)], 4), file=sys.stderr, flush=True)
    print(category.name, out, file=sys.stderr, flush=True)
    return out


def main() -> None:
    study_main(__doc__ or "", study, "image score", "patchcore_weight_study")


if __name__ == "__main__":
    main()
