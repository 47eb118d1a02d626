"""How the fused score's three scaled parts are combined: the weighted mean against rules that let the strongest part
count more (a defect seen by one part only, e.g. a missing hole on the coarse level, is diluted by the mean).

For each dev product (the image-score study's `default` cache: every image's density-normalised parts, so no fit
here): the parts scaled as the model scales them (`weights_study.scaled_parts`), combined by each rule, judged by
image AUROC, recall at 1% / 5% false alarms, and the verdict at the leave-one-out 1% threshold (recall, good test
images flagged).

    .venv/bin/python benchmarks/image_score_study.py collect     # the cache, once (long)
    .venv/bin/python benchmarks/combine_study.py
    .venv/bin/python benchmarks/image_score_study.py collect --tag p3 --set patch_size:3
    .venv/bin/python benchmarks/feature_norm_study.py --mode coarse --collect
    .venv/bin/python benchmarks/combine_study.py --aggregated     # those parts, mean against 1/4 max

Results: benchmarks/results/combine_study.json and combine_study.md (with --aggregated:
combine_study_aggregated.*); docs/detection.md quotes them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from image_score_study import CACHE, Product, write_results  # noqa: E402
from weights_study import scaled_parts  # noqa: E402

from spade_ad.apps.evaluation.metrics import verdict_metrics  # noqa: E402
from spade_ad.core.calibration import conformal_threshold  # noqa: E402

Rule = Callable[[np.ndarray], np.ndarray]


def _blend(share: float) -> Rule:
    """`share` of the largest scaled part plus the rest of their mean."""
    return lambda parts: share * parts.max(1) + (1 - share) * parts.mean(1)


def _softmax(t: float) -> Rule:
    """A smooth maximum of the scaled parts (log-sum-exp at temperature 1 / t)."""
    return lambda parts: np.logaddexp.reduce(t * parts, axis=1) / t


RULES: dict[str, Rule] = {
    "mean (max_share 0)": _blend(0.0),
    "1/4 max + 3/4 mean (max_share 1/4, the default)": _blend(0.25),
    "1/2 max + 1/2 mean": _blend(0.5),
    "3/4 max + 1/4 mean": _blend(0.75),
    "max": _blend(1.0),
    "smooth max (t = 3)": _softmax(3.0),
    "mean of the two largest": lambda parts: np.sort(parts, 1)[:, 1:].mean(1),
}


#: With --aggregated: the part sets of the image-score study's aggregated candidates (`p3=`: the `patch_size=3`
#: cache), each combined by the mean and by a quarter of the strongest part.
AGGREGATED = {
    "default parts": ("lof3:plain:0.01", "lof3:level1:0.01", "lof3:knn1"),
    "aggregated coarse level": ("lof3:plain:0.01", "lof3:p3=level1:0.01", "lof3:knn1"),
    "aggregated map beside the plain one": ("lof3:p3=plain:0.01", "lof3:plain:0.01", "lof3:knn1"),
    # the coarse level's features L2-normalised (feature_norm_study.py --mode coarse --collect), the map plain
    "L2-normalised coarse level": ("lof3:plain:0.01", "lof3:l2_coarse=level1:0.01", "lof3:knn1"),
}


def _tags(kinds: tuple[str, ...]) -> set[str]:
    """The study caches a part set reads besides the default one ("p3=plain:0.01" -> "p3")."""
    return {kind.split(":", 1)[-1].partition("=")[0] for kind in kinds if "=" in kind}


def judged(product: Product, rule: Rule, kinds: tuple[str, ...] | None = None) -> dict[str, float]:
    good, test = scaled_parts(product) if kinds is None else scaled_parts(product, kinds)
    y = product.labels
    scores, threshold = rule(test), conformal_threshold(rule(good).tolist(), 0.01)[0]
    verdict = verdict_metrics(scores, y, threshold)  # the evaluator's figures
    return {"auroc": verdict["image_auroc"], "r1": verdict["recall_at_1_percent"],
            "r5": verdict["recall_at_5_percent"], "thr": verdict["at_threshold"]["recall"],
            "fa": verdict["false_alarm_rate_measured"]}


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    products = list(next(iter(results.values())))
    lines = ["Image AUROC / recall at 1% / at 5% FPR / recall at the leave-one-out 1% threshold (good test images "
             "flagged, %) per product; mean and worst image AUROC, mean recalls and flagged share over the products.",
             "", "| rule | " + " | ".join(products) + " | mean | worst |",
             "|---|" + "---|" * (len(products) + 2)]
    for rule, rows in results.items():
        cells = [f"{100 * r['auroc']:.1f} / {100 * r['r1']:.0f} / {100 * r['r5']:.0f} / {100 * r['thr']:.0f} "
                 f"({100 * r['fa']:.0f})" for r in rows.values()]
        mean = {k: 100 * np.mean([r[k] for r in rows.values()]) for k in ("auroc", "r1", "r5", "thr", "fa")}
        worst = 100 * min(r["auroc"] for r in rows.values())
        lines.append(f"| {rule} | " + " | ".join(cells) + f" | {mean['auroc']:.2f} / {mean['r1']:.1f} / "
                     f"{mean['r5']:.1f} / {mean['thr']:.1f} ({mean['fa']:.2f}) | {worst:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aggregated", action="store_true", help="the aggregated and L2 candidates' parts "
                        "(each needs its cache), mean against 1/4 max")
    args = parser.parse_args()
    paths = sorted((CACHE / "default").glob("*.npz"))
    if not paths:
        sys.exit(f"no study cache in {CACHE / 'default'}: run benchmarks/image_score_study.py collect first")
    products = [Product(path) for path in paths]
    if not args.aggregated:
        results = {rule: {p.name: judged(p, f) for p in products} for rule, f in RULES.items()}
        write_results(table(results), results, "combine_study")
        return
    sets = {name: kinds for name, kinds in AGGREGATED.items() if all((CACHE / tag).is_dir() for tag in _tags(kinds))}
    for name in AGGREGATED.keys() - sets.keys():
        print(f"skipped {name}: no study cache {sorted(_tags(AGGREGATED[name]))} (see the docstring)", file=sys.stderr)
    results = {f"{name}, {label}": {p.name: judged(p, _blend(share), kinds) for p in products}
               for name, kinds in sets.items() for label, share in (("mean", 0.0), ("1/4 max", 0.25))}
    write_results(table(results), results, "combine_study_aggregated")


if __name__ == "__main__":
    main()
