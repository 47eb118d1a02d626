"""Operating points from a few labelled defects (`calibrate --defect`): the threshold at the best F1 or at a recall
asked (`best_f1_threshold`, `recall_threshold`; the false-alarm rate is then measured, not guaranteed), and the
fused score's part weights those defects clearly support (`choose_weights`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .calibration import conformal_threshold
from .score_parts import fused_of_scaled


def recall_threshold(good_scores: Sequence[float], defect_scores: Sequence[float], recall: float) -> float:
    """The highest threshold t (flag s > t) that flags at least a share `recall` of the labelled defects: midway
    between the defect score that must still be flagged and the next lower score of either kind."""
    defects = np.sort(np.asarray(defect_scores, dtype=np.float64))[::-1]
    if defects.size == 0:
        raise ValueError("a recall needs labelled defect scores")
    needed = defects[max(0, math.ceil(recall * defects.size - 1e-9) - 1)]  # the weakest defect still flagged
    others = np.concatenate([np.asarray(good_scores, dtype=np.float64), defects])
    below = others[others < needed]
    return float((needed + below.max()) / 2) if below.size else float(needed - 1.0)


def best_f1_threshold(good_scores: Sequence[float], defect_scores: Sequence[float]) -> float:
    """The threshold t (flag s > t) with the best F1 on labelled good and defective scores: midway between the
    last score left unflagged and the next one, so that it is not tied to a sample."""
    scores = np.concatenate([np.asarray(good_scores, float), np.asarray(defect_scores, float)])
    labels = np.concatenate([np.zeros(len(good_scores), bool), np.ones(len(defect_scores), bool)])
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    true_pos = np.cumsum(labels)
    flagged = np.arange(1, len(scores) + 1)
    f1 = 2 * true_pos / (flagged + labels.sum())
    distinct = np.r_[scores[:-1] != scores[1:], True]  # a threshold can only fall between distinct scores
    best = int(np.argmax(np.where(distinct, f1, -1)))
    below = scores[best + 1] if best + 1 < len(scores) else scores[best] - 1.0
    return float((scores[best] + below) / 2)


#: `choose_weights` tries every (map, coarse, kNN) share of the fused score in steps of 1 / WEIGHT_STEPS.
WEIGHT_STEPS = 6
#: ... and leaves the model's weights unless another share catches at least this many more of the defects.
WEIGHT_MARGIN = 2


def choose_weights(good: np.ndarray, defect: np.ndarray, current: tuple[float, float, float], *, rate: float,
                   coarse: bool = True, margin: int = WEIGHT_MARGIN, max_share: float = 0.0
                   ) -> tuple[tuple[float, float, float], dict[str, Any]]:
    """The fused score's part weights (map, coarse, kNN) that a user's few labelled defects support: `good` (n, 3) and
    `defect` (m, 3) are scaled parts [map, coarse, kNN] (each part's density-normalised value less its good median, over
    its spread: what `combine_scores` weighs, with `max_share` of the largest). Every share in steps of 1 / WEIGHT_STEPS
    (coarse 0 without the coarse part) is judged by how many defects score above the good scores' threshold at `rate`
    (`conformal_threshold`), then by their AUROC against the good scores; the best replaces `current` only when it
    catches at least `margin` more defects: a choice made on a handful of defects moves only on clear evidence
    (benchmarks/weights_study.py measures the margins). Returns the weights and the figures behind the choice."""
    good, defect = np.asarray(good, dtype=np.float64), np.asarray(defect, dtype=np.float64)

    def judged(weights: tuple[float, float, float]) -> tuple[int, float]:
        g, d = fused_of_scaled(good, weights, max_share), fused_of_scaled(defect, weights, max_share)
        threshold, _ = conformal_threshold(g.tolist(), rate)
        auroc = float(((d[:, None] > g[None]) + 0.5 * (d[:, None] == g[None])).mean()) if len(g) and len(d) else 0.5
        return int((d > threshold).sum()), auroc

    shares = [(m / WEIGHT_STEPS, c / WEIGHT_STEPS, (WEIGHT_STEPS - m - c) / WEIGHT_STEPS)
              for m in range(WEIGHT_STEPS + 1) for c in range(WEIGHT_STEPS + 1 - m) if coarse or c == 0]
    before = judged(current)
    best = max(shares, key=judged)
    found = judged(best)
    chosen = best if found[0] - before[0] >= margin else current
    return chosen, {"n_defect": len(defect), "n_good": len(good), "caught": judged(chosen)[0],
                    "caught_before": before[0], "auroc": judged(chosen)[1], "auroc_before": before[1],
                    "weights_before": list(current), "weights": list(chosen)}
