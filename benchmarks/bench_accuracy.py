"""Accuracy benchmark: every category of ../shared/data/mvtec_ad and ../shared/data/aitex (and the synthetic sets),
one grid of presets / settings, one table: image AUROC, pixel AUROC and AU-PRO at the original size and at 256 x 256,
F1 at the calibrated threshold vs the best F1, recall, false alarms asked vs measured on good test images, ms per
image, fit seconds. Written to benchmarks/results/accuracy.{json,md}; docs/accuracy.md and docs/detection.md keep
the latest tables.

    .venv/bin/python benchmarks/bench_accuracy.py                     # presets fast, default, quality
    .venv/bin/python benchmarks/bench_accuracy.py --config fused=image_score:fused --category bottle

Everything goes through the library (`Spade`, `spade_ad.apps.evaluation`): the same code users run.
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

from spade_ad import Spade
from spade_ad import settings as table
from spade_ad.apps.evaluation.metrics import au_pro, pixel_auroc, verdict_metrics
from spade_ad.apps.evaluation.runner import resize_for_eval
from spade_ad.data.datasets import CategoryData, load_dataset, load_mvtec_category
from spade_ad.data.synthetic import make_line_dataset, make_synthetic_dataset
from spade_ad.data.synthetic_drawing import OBJECT_DEFECT_TYPES

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"


def parse_config(text: str) -> tuple[str, dict[str, Any]]:
    """"name=setting:value,setting:value" or a preset name."""
    if "=" not in text:
        return text, dict(table.PRESETS[text])
    name, body = text.split("=", 1)
    settings: dict[str, Any] = {}
    for pair in filter(None, body.split(",")):
        key, value = pair.split(":", 1)
        if key in table.PRESETS and value == "":
            settings.update(table.PRESETS[key])
            continue
        setting = table.BY_NAME[key]
        settings[key] = setting.validate(setting.parse(value.replace(";", ",")))
    return name, settings


def categories(names: list[str] | None, synthetic_root: Path) -> list[CategoryData]:
    found = []
    for root in (SHARED / "mvtec_ad", SHARED / "aitex", SHARED / "mpdd_metal_plate"):
        if root.is_dir():
            found.extend(load_dataset(root))
    found.append(load_mvtec_category(make_synthetic_dataset(synthetic_root / "synthetic", seed=0)))
    found.append(load_mvtec_category(make_synthetic_dataset(  # an assembled object: missing, extra, foreign parts
        synthetic_root / "synthetic_objects", seed=0, defect_types=OBJECT_DEFECT_TYPES)))
    # the line: rare good variants, subtle defects, two defective parts in the training folder, a second session
    found.append(load_mvtec_category(make_line_dataset(synthetic_root / "synthetic_line", seed=0)))
    return [c for c in found if not names or c.name in names]


def run(category: CategoryData, settings: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    model = Spade(progress=False, **settings).fit(category.train)
    fit_s = time.perf_counter() - start
    scores, labels, maps, masks, maps256, masks256 = [], [], [], [], [], []
    start = time.perf_counter()
    for sample, p in zip(category.test, model.iter_predict([s.path for s in category.test], original_size=True)):
        scores.append(p.score)
        labels.append(sample.is_anomalous)
        if category.has_masks:
            mask = sample.load_mask(p.original_map.shape)
            maps.append(p.original_map)
            masks.append(mask)
            small_map, small_mask = resize_for_eval(p.original_map, mask, 256)
            maps256.append(small_map)
            masks256.append(small_mask)
    ms = 1000 * (time.perf_counter() - start) / len(category.test)
    verdict = verdict_metrics(scores, labels, model.image_threshold_)  # the evaluator's figures
    at = verdict["at_threshold"] or {}
    row = {
        "image_auroc": verdict["image_auroc"], "f1_at_threshold": at.get("f1"), "best_f1": verdict["best_f1"]["f1"],
        "recall": at.get("recall"), "far_asked": model.false_alarm_rate,
        "far_guaranteed": model.calibration_.guaranteed_rate, "far_measured": verdict["false_alarm_rate_measured"],
        "recall_at_1": verdict["recall_at_1_percent"], "recall_at_5": verdict["recall_at_5_percent"],
        # what any threshold catches at the false-alarm rate ours measured: ours should reach most of it
        "recall_best_same_far": verdict["recall_best_at_measured_rate"],
        "ms_per_image": ms, "fit_s": fit_s, "n_train": model.store_.n_images,
    }
    if category.has_masks:
        row.update(pixel_auroc=pixel_auroc(maps, masks), au_pro=au_pro(maps, masks),
                   pixel_auroc_256=pixel_auroc(maps256, masks256), au_pro_256=au_pro(maps256, masks256))
    return row


#: Columns averaged over products in the "mean" and "worst" rows of each config.
SUMMARY = ("image_auroc", "pixel_auroc", "au_pro", "pixel_auroc_256", "au_pro_256", "recall_at_1", "recall_at_5",
           "f1_at_threshold", "best_f1", "recall", "far_measured")


def summary(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The mean and the worst product of each column (worst: lowest, highest for false alarms), over the products
    that have the column."""
    mean: dict[str, Any] = {}
    worst: dict[str, Any] = {}
    for key in SUMMARY:
        values = [r[key] for r in rows.values() if r.get(key) is not None]
        if values:
            mean[key] = float(np.mean(values))
            worst[key] = float(np.max(values) if key == "far_measured" else np.min(values))
    return {"mean": mean, "worst": worst}


def markdown(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    head = ("| config | category | image AUROC | pixel AUROC | AU-PRO | pixel AUROC @256 | AU-PRO @256 "
            "| recall @1% / @5% FPR | F1 @ thr | best F1 | recall @ thr (best at same FPR) "
            "| false alarms asked / measured | ms / image | fit s |")
    lines = [head, "|" + "---|" * 14]
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    for config, rows in results.items():
        for name, r in rows.items():
            lines.append(
                f"| {config} | {name} | {pct(r['image_auroc'])} | {pct(r.get('pixel_auroc'))} | {pct(r.get('au_pro'))} "
                f"| {pct(r.get('pixel_auroc_256'))} | {pct(r.get('au_pro_256'))} "
                f"| {pct(r.get('recall_at_1'))} / {pct(r.get('recall_at_5'))} | {pct(r['f1_at_threshold'])} "
                f"| {pct(r['best_f1'])} | {pct(r['recall'])} ({pct(r.get('recall_best_same_far'))}) "
                f"| {pct(r['far_asked'])} / {pct(r['far_measured'])} | {r['ms_per_image']:.0f} | {r['fit_s']:.1f} |"
            )
        for label, row in summary(rows).items():
            lines.append(
                f"| {config} | **{label}** | {pct(row.get('image_auroc'))} | {pct(row.get('pixel_auroc'))} "
                f"| {pct(row.get('au_pro'))} | {pct(row.get('pixel_auroc_256'))} | {pct(row.get('au_pro_256'))} "
                f"| {pct(row.get('recall_at_1'))} / {pct(row.get('recall_at_5'))} | {pct(row.get('f1_at_threshold'))} "
                f"| {pct(row.get('best_f1'))} | {pct(row.get('recall'))} | - / {pct(row.get('far_measured'))} | | |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """The command line, or `argv` (studies that change the library for one process run it with their own)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", help="preset name or name=setting:value,... (repeatable)")
    parser.add_argument("--category", action="append", help="only these categories (repeatable)")
    parser.add_argument("--out", type=Path, default=RESULTS / "accuracy")
    args = parser.parse_args(argv)
    configs = [parse_config(c) for c in (args.config or ["fast", "default", "quality"])]
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = categories(args.category, Path(tmp))
        for config, settings in configs:
            results[config] = {}
            for category in data:
                results[config][category.name] = run(category, settings)
                print(config, category.name, json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                         for k, v in results[config][category.name].items()}),
                      file=sys.stderr, flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.with_suffix(".json").write_text(json.dumps(
                    {"configs": dict(configs), "results": results}, indent=1, default=list))
                args.out.with_suffix(".md").write_text(markdown(results) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
