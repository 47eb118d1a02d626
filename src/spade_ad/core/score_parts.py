"""The image score's parts and how they are combined: the map's top share, the coarsest level's own top share and
the global kNN distance (`PARTS`), each divided by its local density over the image's nearest training images
(`density_normalised`, as LOF does), put on one scale by its spread on good images (`robust_scale`,
`scaled_parts`) and weighted into the fused score (`combine_scores`, with a share of the strongest part:
`with_strongest`; from parts already scaled: `fused_of_scaled`). The thresholds on those scores are
`spade_ad.core.calibration`'s."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import SettingError


def robust_scale(values: np.ndarray | Sequence[float]) -> tuple[float, float]:
    """(median, spread) of good scores: the spread is the interquartile range over 1.349 (a standard deviation for
    normal data), or the standard deviation, or 1, whichever is first positive. Used to put scores of different units
    on one scale before they are fused."""
    array = np.asarray(values, dtype=np.float64)
    median = float(np.median(array))
    q75, q25 = np.percentile(array, [75, 25])
    for spread in ((q75 - q25) / 1.349, float(array.std())):
        if spread > 1e-12:
            return median, float(spread)
    return median, 1.0


#: The columns of a score-parts array (n, 3): the map's top 1%, the coarsest level's own top 1%, the global kNN.
PARTS = ("map", "coarse", "knn")


def density_floor(train_parts: np.ndarray) -> np.ndarray:
    """The smallest divisor of each part (3,): 1e-6 of its largest training value, so that a neighbourhood of
    duplicates (leave-one-out parts 0) cannot divide by zero."""
    return 1e-6 * np.maximum(np.abs(train_parts).max(0), 1e-12)


def density_normalised(parts: np.ndarray, near: np.ndarray, train_parts: np.ndarray | Sequence[Sequence[float]],
                       k: int) -> np.ndarray:
    """Image-level local-density normalisation (as LOF does): each score part (n, 3) divided by the mean
    leave-one-out value of that part over the image's `k` nearest training images by global feature (`near`:
    (n, >= k) stored indices, nearest first; for a training image's own leave-one-out parts, itself left out).
    A rare good part's nearest training images are the other rare parts, whose own leave-one-out scores are high,
    so it is measured against them; a defect on a usual part is measured against usual parts. `k` 0 or no
    `train_parts`: the parts unchanged."""
    parts = np.asarray(parts, dtype=np.float64)
    train = np.asarray(train_parts, dtype=np.float64).reshape(-1, len(PARTS))
    if k <= 0 or not len(train):
        return parts
    near = np.asarray(near, dtype=np.int64).reshape(len(parts), -1)[:, :k]
    return parts / np.maximum(train[near].mean(1), density_floor(train))


def combine_scores(image_score: str, scale: dict[str, tuple[float, float]], map_part: np.ndarray,
                   knn: np.ndarray, map_weight: float = 0.5, coarse: np.ndarray | None = None,
                   coarse_weight: float = 0.0, max_share: float = 0.0) -> np.ndarray:
    """The image score from its parts: the map's part (the mean of its top values, or with "map_max" its
    maximum: `spade_ad.core.maps_numpy.map_score`), the global kNN score, or ("fused") their weighted average after each
    is scaled by its (median, spread) on good images: `map_weight` for the map, `coarse_weight` for the coarsest
    level's own top 1% (`coarse`; 0: not used), the rest for the kNN; with `max_share` > 0, that share of the score
    is the largest of the scaled parts weighed (`with_strongest`)."""
    map_part, knn = np.asarray(map_part, dtype=np.float64), np.asarray(knn, dtype=np.float64)
    if image_score in ("map_max", "map_top"):
        return map_part
    if image_score == "knn":
        return knn
    if "map" not in scale or "knn" not in scale or (coarse_weight > 0 and "coarse" not in scale):
        raise SettingError("image_score", "needs a calibrated model to scale its parts", image_score,
                           "calibrate the model on good images (spade-ad calibrate --good DIR), or map_top")
    (m1, s1), (m2, s2) = scale["map"], scale["knn"]
    if coarse_weight <= 0:  # two parts: exactly the formula of the files written before the coarse part
        weighted = map_weight * (map_part - m1) / s1 + (1.0 - map_weight) * (knn - m2) / s2
        return with_strongest(weighted, [(map_part - m1) / s1, (knn - m2) / s2], (map_weight, 1.0 - map_weight),
                              max_share)
    (m3, s3) = scale["coarse"]
    coarse = np.asarray(coarse, dtype=np.float64)
    weighted = (map_weight * (map_part - m1) / s1 + coarse_weight * (coarse - m3) / s3
                + (1.0 - map_weight - coarse_weight) * (knn - m2) / s2)
    return with_strongest(weighted, [(map_part - m1) / s1, (coarse - m3) / s3, (knn - m2) / s2],
                          (map_weight, coarse_weight, 1.0 - map_weight - coarse_weight), max_share)


def with_strongest(weighted: np.ndarray, scaled: Sequence[np.ndarray], weights: Sequence[float],
                   max_share: float) -> np.ndarray:
    """The fused score with `max_share` of it the strongest of the `scaled` parts and the rest the `weighted`
    average: a defect that one part sees and the others do not (a missing hole on the coarse level, a thin scratch
    in the map) is not diluted by the mean. Each part with a weight counts in the maximum times its weight over the
    largest weight (equal weights: the largest scaled part), so that weights chosen from labelled defects steer both
    halves. `max_share` 0: `weighted` itself, as the files written before it."""
    if max_share <= 0:
        return weighted
    top = max(weights)
    strongest = np.max(np.stack([(w / top) * np.asarray(part, dtype=np.float64)
                                 for part, w in zip(scaled, weights) if w > 0]), axis=0)
    return (1.0 - max_share) * weighted + max_share * strongest


def fused_of_scaled(parts: np.ndarray, weights: Sequence[float], max_share: float) -> np.ndarray:
    """The fused score of parts already scaled (n, 3) [map, coarse, knn] (`scaled_parts`) at part `weights`, with
    `max_share` of it the strongest part (`with_strongest`): what `combine_scores` gives from the unscaled parts."""
    parts = np.asarray(parts, dtype=np.float64)
    return with_strongest(parts @ np.asarray(weights), list(parts.T), weights, max_share)


def scaled_parts(parts: np.ndarray, scale: dict[str, tuple[float, float]]) -> np.ndarray:
    """Score parts (n, 3) [map, coarse, knn], each less its good median over its spread (`scale`, as
    `robust_scale` gives it; a part without a scale is left as it is): what `combine_scores` weighs."""
    parts = np.asarray(parts, dtype=np.float64).reshape(-1, len(PARTS))
    medians, spreads = zip(*(scale.get(name, (0.0, 1.0)) for name in PARTS))
    return (parts - np.asarray(medians)) / np.asarray(spreads)
