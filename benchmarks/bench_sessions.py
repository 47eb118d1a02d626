"""Capture sessions in the training folder (issue 27, item 4): two generated products, the line
(`make_line_dataset`: rare good parts, subtle defects) and the plain part (`make_synthetic_dataset`: 40 training and
40 good test images, scratches and spots), with their training images captured in 1, 2 or 3 sessions (each its own
light, file times three hours apart) and every test image in yet another session, fitted with leave-one-out
(`session_gap=0`) and with the default (leave-one-session-out when `fit` finds sessions). Image AUROC, recall at
1% / 5% false alarms, and at the calibrated 1% threshold: recall and false alarms on the 40 good test images, the
threshold, fit seconds.

    .venv/bin/python benchmarks/bench_sessions.py

Writes benchmarks/results/sessions.{md,json}. Everything goes through the library (`Spade`).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from spade_ad import Spade
from spade_ad.apps.evaluation.metrics import verdict_metrics
from spade_ad.data.datasets import load_mvtec_category
from spade_ad.data.synthetic import make_line_dataset, make_synthetic_dataset

RESULTS = Path(__file__).resolve().parent / "results"


def run(root: Path, session_gap: float) -> dict[str, Any]:
    category = load_mvtec_category(root)
    start = time.perf_counter()
    model = Spade(progress=False, session_gap=session_gap).fit(category.train)
    fit_s = time.perf_counter() - start
    scores = [p.score for p in model.predict([s.path for s in category.test])]
    verdict = verdict_metrics(scores, [s.is_anomalous for s in category.test], model.image_threshold_)
    return {
        "sessions": [] if model.sessions_ is None else list(model.sessions_.sizes),
        "auroc": verdict["image_auroc"], "r1": verdict["recall_at_1_percent"], "r5": verdict["recall_at_5_percent"],
        "recall_thr": verdict["at_threshold"]["recall"], "fa_thr": verdict["false_alarm_rate_measured"],
        "false_alarms": verdict["good_flagged"], "good": verdict["n_good"],
        "threshold": float(model.image_threshold_), "fit_s": fit_s,
    }


def main() -> None:
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for product in ("part", "line"):
            for sessions in (1, 2, 3):
                where = Path(tmp) / f"{product}{sessions}"
                root = make_line_dataset(where, train_sessions=sessions) if product == "line" else \
                    make_synthetic_dataset(where, n_train=40, n_test_good=40, n_test_defect=10,
                                           train_sessions=sessions, second_session=True)
                for name, gap in (("leave-one-out (session_gap 0)", 0.0), ("default (session_gap 60)", 60.0)):
                    key = f"{product}|{sessions}|{name}"
                    results[key] = run(root, gap)
                    print(key, results[key], flush=True)
    lines = ["| product | training sessions | calibration | sessions found | image AUROC | recall at 1% / 5% FPR | "
             "threshold | at the threshold: recall, false alarms | fit s |", "|---|---|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        product, sessions, name = key.split("|")
        lines.append(f"| {product} | {sessions} | {name} | {', '.join(map(str, r['sessions'])) or 'none'} | "
                     f"{100 * r['auroc']:.1f} | {100 * r['r1']:.0f} / {100 * r['r5']:.0f} | {r['threshold']:.3f} | "
                     f"{100 * r['recall_thr']:.0f}%, {r['false_alarms']} of {r['good']} | {r['fit_s']:.0f} |")
    text = "\n".join(lines)
    print(text)
    (RESULTS / "sessions.md").write_text(text + "\n")
    (RESULTS / "sessions.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
