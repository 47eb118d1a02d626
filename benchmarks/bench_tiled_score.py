"""The fused image score of tiled models: two parts as tiled models had them before (the map and the kNN, map
weight 1/3, no density normalisation) against today's default (three parts, the stitched coarsest level's own map
the third, each part divided by its local density, a quarter of the score the strongest part: `max_share`), on
products scored in tiled mode.

One tiled fit per product; its training images' leave-one-out parts and its test images' parts are computed once
with every part present, then each variant is calibrated on the same leave-one-out parts and scores the same test
parts through the model's own calibration code (`_calibrate`, `_scores_of`), as a fit with those settings would:
the maps do not depend on the image score, so neither do the parts. Reported: image AUROC, recall at 1% / 5% false
alarms, and the verdict at the calibrated 1% threshold (recall, good parts flagged).

    .venv/bin/python benchmarks/bench_tiled_score.py                  # every product below
    .venv/bin/python benchmarks/bench_tiled_score.py --only mpdd_metal_plate

Results: benchmarks/results/tiled_score.json and tiled_score.md; docs/tiles.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_accuracy import SHARED  # noqa: E402

from spade_ad import Spade  # noqa: E402
from spade_ad.apps.evaluation.metrics import image_auroc, recall_at_false_alarm_rate  # noqa: E402
from spade_ad.data.datasets import load_mvtec_category  # noqa: E402
from spade_ad.data.synthetic import make_large_dataset, make_line_dataset, make_synthetic_dataset  # noqa: E402
from spade_ad.data.synthetic_drawing import OBJECT_DEFECT_TYPES  # noqa: E402
from spade_ad.settings import DEFAULTS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TILES = {"tile_size": 256, "tile_overlap": 64, "tile_margin": 32}
VARIANTS = {
    "two parts (tiled models before)": {"coarse_weight": 0.0, "density_k": 0, "max_share": 0.0},
    "two parts, density-normalised": {"coarse_weight": 0.0, "max_share": 0.0},
    "three parts, no density": {"density_k": 0, "max_share": 0.0},
    "three parts, density-normalised, their mean": {"max_share": 0.0},
    "three parts, density-normalised, 1/4 the strongest (default)": {},
}


def products(root: Path, only: list[str]) -> list[tuple[str, Path, dict[str, Any]]]:
    """(name, MVTec-layout folder, tile settings): generated large plates (768 x 768 with 4-12 px defects, 1024 x
    1024 with 2-5 px defects), MVTec AD bottle at its own 900 x 900 and the AITEX fabrics at their own 4096 x 256 in
    tiles of 256; MPDD's metal plates and the three generated dev products at their own 256 x 256 in tiles of 128."""
    small = {"tile_size": 128, "tile_overlap": 32, "tile_margin": 16}
    makers = {
        "large_768": lambda: make_large_dataset(root / "large_768", n_train=20, n_test_good=15, n_test_defect=15,
                                                size=(768, 768), defect_size=(4, 12), seed=3),
        "large_1024_small_defects": lambda: make_large_dataset(
            root / "large_1024", n_train=20, n_test_good=15, n_test_defect=15, size=(1024, 1024), defect_size=(2, 5),
            seed=4),
        "synthetic": lambda: make_synthetic_dataset(root / "synthetic", seed=0),
        "synthetic_objects": lambda: make_synthetic_dataset(root / "synthetic_objects", seed=0,
                                                            defect_types=OBJECT_DEFECT_TYPES),
        "synthetic_line": lambda: make_line_dataset(root / "synthetic_line", seed=0),
    }
    shared = {"bottle": (SHARED / "mvtec_ad" / "bottle", TILES),
              "mpdd_metal_plate": (SHARED / "mpdd_metal_plate", small),
              **{f.name: (f, TILES) for f in sorted((SHARED / "aitex").glob("aitex_fabric*"))}}
    found = []
    for name in [*makers, *shared]:
        if only and name not in only:
            continue
        if name in makers:
            found.append((name, makers[name](), TILES if name.startswith("large") else small))
        elif shared[name][0].is_dir():
            found.append((name, *shared[name]))
    return found


def collect(folder: Path, tiles: dict[str, Any]) -> tuple[Spade, list[Any], list[Any], np.ndarray, float]:
    """A tiled default model of `folder`, its training images' leave-one-out parts and its test images' parts
    (maps dropped), the test labels, and the seconds it took."""
    category = load_mvtec_category(folder)
    start = time.perf_counter()
    model = Spade(device="cpu", progress=False, **tiles).fit(category.train)
    tiny = np.zeros((1, 1), np.float32)  # the image variants need no pixel threshold: no maps kept
    loo = [part._replace(anomaly_map=tiny) for part in model._leave_one_out_scores()]
    test = [part._replace(anomaly_map=tiny) for part in model._predict_parts([s.path for s in category.test])]
    labels = np.array([s.is_anomalous for s in category.test], bool)
    return model, loo, test, labels, time.perf_counter() - start


def evaluate(model: Spade, loo: list[Any], test: list[Any], labels: np.ndarray, settings: dict[str, Any]
             ) -> dict[str, float]:
    """One variant: calibrated on the leave-one-out parts as its fit would be, then the test parts scored."""
    model.set_params(**{"coarse_weight": 1 / 3, "density_k": 3, "max_share": DEFAULTS["max_share"], **settings})
    model._calibrate(loo, "leave_one_out")
    scores = model._scores_of(test)
    threshold = model.calibration_.image_threshold
    flagged = scores > threshold
    return {"image_auroc": image_auroc(scores, labels),
            "recall_at_1": recall_at_false_alarm_rate(scores, labels, 0.01),
            "recall_at_5": recall_at_false_alarm_rate(scores, labels, 0.05),
            "recall_at_threshold": float(flagged[labels].mean()), "good_flagged": int(flagged[~labels].sum()),
            "n_good": int((~labels).sum()), "n_defect": int(labels.sum())}


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| product | score | image AUROC | recall at 1% / 5% false alarms | recall at the threshold | "
             "good parts flagged |", "|---|---|---|---|---|---|"]
    for product, rows in results.items():
        for variant in VARIANTS:
            r = rows[variant]
            lines.append(f"| {product} | {variant} | {100 * r['image_auroc']:.2f} | {100 * r['recall_at_1']:.0f}% / "
                         f"{100 * r['recall_at_5']:.0f}% | {100 * r['recall_at_threshold']:.0f}% | "
                         f"{r['good_flagged']} of {r['n_good']} |")
    for variant in VARIANTS:
        rows = [results[p][variant] for p in results]
        lines.append(f"| **mean** | {variant} | {100 * np.mean([r['image_auroc'] for r in rows]):.2f} | "
                     f"{100 * np.mean([r['recall_at_1'] for r in rows]):.0f}% / "
                     f"{100 * np.mean([r['recall_at_5'] for r in rows]):.0f}% | "
                     f"{100 * np.mean([r['recall_at_threshold'] for r in rows]):.0f}% | "
                     f"{sum(r['good_flagged'] for r in rows)} of {sum(r['n_good'] for r in rows)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=[], help="product names (default: all)")
    parser.add_argument("--out", default="tiled_score")
    args = parser.parse_args()
    path = RESULTS / f"{args.out}.json"
    results: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.exists() and args.only else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder, tiles in products(Path(tmp), args.only):
            model, loo, test, labels, seconds = collect(folder, tiles)
            results[name] = {variant: evaluate(model, loo, test, labels, settings)
                             for variant, settings in VARIANTS.items()}
            results[name]["seconds"] = seconds
            print(f"{name}: {seconds:.0f} s", {v: round(r["image_auroc"], 4) for v, r in results[name].items()
                                               if v in VARIANTS}, flush=True)
            path.write_text(json.dumps(results, indent=1))
            (RESULTS / f"{args.out}.md").write_text(table(results))


if __name__ == "__main__":
    main()
