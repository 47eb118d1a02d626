"""Part weights chosen from a user's few labelled defects (`calibrate --defect`, `labelled_defects.choose_weights`):
would they beat the fixed 1:1:1 on the defects the user did not label?

For each dev product (the image-score study's `default` cache: every image's density-normalised parts, so no fit
here), 30 times: K of its test defects play the user's labelled ones, the training images' leave-one-out parts the
good side; `choose_weights` picks the weights; the remaining test images are scored with the fixed and the chosen
weights. Reported per product and K: image AUROC and recall at 1% / 5% false alarms, means over the trials, the
worst trial, and how often the weights moved; and the verdict `fit --defect` gives, at the good (leave-one-out)
scores' threshold at 1% (`conformal_threshold` at those weights): the recall on the defects not labelled and the
share of good test images flagged.

    .venv/bin/python benchmarks/image_score_study.py collect     # the cache, once (long)
    .venv/bin/python benchmarks/weights_study.py                  # K = 3, 5, 10
    .venv/bin/python benchmarks/weights_study.py --margin 1       # move for one defect more
    .venv/bin/python benchmarks/weights_study.py --max-share 0    # the score without its strongest part's share

Results: benchmarks/results/weights_study.json and weights_study.md; docs/detection.md quotes them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from image_score_study import CACHE, Product, write_results  # noqa: E402

from spade_ad.apps.evaluation.metrics import image_auroc, recall_at_false_alarm_rate  # noqa: E402
from spade_ad.core import score_parts  # noqa: E402
from spade_ad.core.calibration import conformal_threshold  # noqa: E402
from spade_ad.core.labelled_defects import WEIGHT_MARGIN, choose_weights  # noqa: E402
from spade_ad.core.score_parts import robust_scale  # noqa: E402
from spade_ad.settings import DEFAULTS  # noqa: E402

#: The default score's parts in the study's terms: the map's top 1%, the stride-16 level's top 1%, the 1-NN kNN,
#: each density-normalised over the 3 nearest training images.
PARTS = ("lof3:plain:0.01", "lof3:level1:0.01", "lof3:knn1")
FIXED = (1 / 3, 1 / 3, 1 / 3)
TRIALS = 30


def scaled_parts(product: Product, kinds: tuple[str, ...] = PARTS) -> tuple[np.ndarray, np.ndarray]:
    """(leave-one-out (n, 3), test (t, 3)) parts (the study's `kinds`, default the default score's), each less its
    good median over its spread (`robust_scale` of the leave-one-out parts, `score_parts.scaled_parts`)."""
    pairs = [product.part(kind) for kind in kinds]
    loo, test = np.stack([good for good, _ in pairs], 1), np.stack([tested for _, tested in pairs], 1)
    scale = {name: robust_scale(loo[:, j]) for j, name in enumerate(score_parts.PARTS)}
    return score_parts.scaled_parts(loo, scale), score_parts.scaled_parts(test, scale)


def study(product: Product, k: int, margin: int, max_share: float, seed: int = 0) -> dict[str, float]:
    good, test = scaled_parts(product)
    labels = product.labels
    defects = np.flatnonzero(labels)
    rng = np.random.default_rng(seed)
    figures: dict[str, list[float]] = {name: [] for name in (
        "fixed", "chosen", "fixed_r1", "chosen_r1", "fixed_r5", "chosen_r5", "moved", "fixed_thr", "chosen_thr",
        "fixed_fa", "chosen_fa")}
    moves: list[float] = []
    for _ in range(TRIALS):
        labelled = rng.choice(defects, size=min(k, len(defects) - 1), replace=False)
        rest = np.setdiff1d(np.arange(len(labels)), labelled)
        weights, _ = choose_weights(good, test[labelled], FIXED, rate=0.01, margin=margin, max_share=max_share)
        figures["moved"].append(float(weights != FIXED))
        for name, w in (("fixed", FIXED), ("chosen", weights)):
            scores, y = score_parts.fused_of_scaled(test[rest], w, max_share), labels[rest]
            figures[name].append(image_auroc(scores, y))
            figures[f"{name}_r1"].append(recall_at_false_alarm_rate(scores, y, 0.01))
            figures[f"{name}_r5"].append(recall_at_false_alarm_rate(scores, y, 0.05))
            good_scores = score_parts.fused_of_scaled(good, w, max_share)
            threshold, _ = conformal_threshold(good_scores.tolist(), 0.01)  # fit --defect's threshold
            figures[f"{name}_thr"].append(float(np.mean(scores[y == 1] > threshold)))
            figures[f"{name}_fa"].append(float(np.mean(scores[y == 0] > threshold)))
        if weights != FIXED:  # a draw where the weights moved: better or worse than the fixed ones (0.5 points)
            change = figures["chosen"][-1] - figures["fixed"][-1]
            moves.append(change)
    out = {name: float(np.mean(values)) for name, values in figures.items()}
    out["moves"] = moves
    out["chosen_worst_trial"] = float(np.min(figures["chosen"]))
    out["fixed_worst_trial"] = float(np.min(figures["fixed"]))
    return out


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["Image AUROC / recall at 1% / at 5% false alarms on the test images not labelled, means over "
             f"{TRIALS} draws of K labelled defects (worst draw's AUROC); weights moved in that share of draws. "
             "Verdict at the leave-one-out 1% threshold (fit --defect's): recall on the defects not labelled "
             "(good test images flagged).", "",
             "| product | K | fixed 1:1:1 | chosen | moved | verdict: fixed | verdict: chosen |",
             "|---|---|---|---|---|---|---|"]
    ks = sorted({int(k) for rows in results.values() for k in rows})
    for product, rows in results.items():
        for k in ks:
            r = rows[str(k)]
            lines.append(f"| {product} | {k} | {100 * r['fixed']:.2f} / {100 * r['fixed_r1']:.0f} / "
                         f"{100 * r['fixed_r5']:.0f} ({100 * r['fixed_worst_trial']:.1f}) | {100 * r['chosen']:.2f} / "
                         f"{100 * r['chosen_r1']:.0f} / {100 * r['chosen_r5']:.0f} "
                         f"({100 * r['chosen_worst_trial']:.1f}) | {100 * r['moved']:.0f}% | "
                         f"{100 * r['fixed_thr']:.1f} ({100 * r['fixed_fa']:.1f}%) | {100 * r['chosen_thr']:.1f} "
                         f"({100 * r['chosen_fa']:.1f}%) |")
    for k in ks:
        rows = [results[p][str(k)] for p in results]
        cell = {name: 100 * np.mean([r[name] for r in rows]) for name in rows[0] if name != "moves"}
        worst = {name: 100 * min(r[name] for r in rows) for name in ("fixed", "chosen")}
        lines.append(f"| **mean (worst product)** | {k} | {cell['fixed']:.2f} ({worst['fixed']:.2f}) / "
                     f"{cell['fixed_r1']:.1f} / {cell['fixed_r5']:.1f} | {cell['chosen']:.2f} ({worst['chosen']:.2f}) "
                     f"/ {cell['chosen_r1']:.1f} / {cell['chosen_r5']:.1f} | {cell['moved']:.0f}% | "
                     f"{cell['fixed_thr']:.1f} ({cell['fixed_fa']:.1f}%) | {cell['chosen_thr']:.1f} "
                     f"({cell['chosen_fa']:.1f}%) |")
    moves = np.array([m for rows in results.values() for r in rows.values() for m in r["moves"]])
    draws = TRIALS * len(ks) * len(results)
    if len(moves):
        lines += ["", f"The weights moved in {len(moves)} of {draws} draws: the unlabelled images' AUROC rose by "
                  f"more than 0.5 points in {int((moves > 0.005).sum())} and fell by more in "
                  f"{int((moves < -0.005).sum())}; mean change {100 * moves.mean():+.2f}, worst "
                  f"{100 * moves.min():+.2f}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--margin", type=int, default=WEIGHT_MARGIN, help="defects more a share must catch to move")
    parser.add_argument("--max-share", type=float, default=DEFAULTS["max_share"],
                        help="share of the strongest scaled part in the score (0: the weighted mean alone)")
    args = parser.parse_args()
    paths = sorted((CACHE / "default").glob("*.npz"))
    if not paths:
        sys.exit(f"no study cache in {CACHE / 'default'}: run benchmarks/image_score_study.py collect first")
    results = {}
    for path in paths:
        product = Product(path)
        results[product.name] = {str(k): study(product, k, args.margin, args.max_share) for k in (3, 5, 10)}
    name = "weights_study" if args.margin == WEIGHT_MARGIN else f"weights_study_margin{args.margin}"
    if args.max_share != DEFAULTS["max_share"]:
        name += f"_max_share{args.max_share:g}"
    write_results(table(results), results, name)


if __name__ == "__main__":
    main()
