"""Regions of interest (issue 29): false alarms and recall with and without the ROI on the generated product whose
good parts carry a printed code that changes on every test part (`spade_ad.data.synthetic.make_printed_dataset`).

    python benchmarks/bench_roi.py [--train 30 --good 40 --defect 8 --size 160]

Results: benchmarks/results/roi.json and roi.md; docs/roi.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/spade-bench-roi"))
    parser.add_argument("--train", type=int, default=30)
    parser.add_argument("--good", type=int, default=40)
    parser.add_argument("--defect", type=int, default=8, help="defective test parts per type (scratch, spot)")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    from spade_ad import Spade
    from spade_ad.apps.evaluation.metrics import image_auroc
    from spade_ad.data.synthetic import make_printed_dataset

    root = make_printed_dataset(args.data / "printed", n_train=args.train, n_test_good=args.good,
                                n_test_defect=args.defect, size=(args.size, args.size), seed=args.seed)
    goods = sorted((root / "test" / "good").glob("*.png"))
    defects = sorted(p for kind in ("scratch", "spot") for p in (root / "test" / kind).glob("*.png"))
    rows = {}
    for name, roi in (("without ROI", None), ("with ROI", root / "roi.png")):
        start = time.perf_counter()
        model = Spade(k_gallery=10, device="cpu", progress=False).fit(root / "train" / "good", roi=roi)
        good = model.predict(goods)
        bad = model.predict(defects)
        scores = [p.score for p in good + bad]
        rows[name] = {
            "false_alarms": sum(bool(p.is_anomalous) for p in good), "goods": len(good),
            "recall": float(np.mean([bool(p.is_anomalous) for p in bad])), "defects": len(bad),
            "image_auroc": image_auroc(scores, [0] * len(good) + [1] * len(bad)),
            "false_alarm_rate": model.false_alarm_rate, "guaranteed_rate": model.calibration_.guaranteed_rate,
            "seconds": time.perf_counter() - start,
        }
        print(name, json.dumps(rows[name]), flush=True)
    result = {"settings": vars(args) | {"data": str(args.data)}, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "roi.json").write_text(json.dumps(result, indent=1))
    lines = ["| model | false alarms (good parts) | recall (defects inside the ROI) | image AUROC |",
             "|---|---|---|---|"]
    lines += [f"| {name} | {r['false_alarms']} / {r['goods']} | {r['recall']:.3f} ({r['defects']} defects) | "
              f"{r['image_auroc']:.3f} |" for name, r in rows.items()]
    (RESULTS / "roi.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
