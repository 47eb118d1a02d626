"""Benchmark evaluation: fit on each category's good training images, score its test set, compute image AUROC,
pixel AUROC and AU-PRO, compare with the paper's table, and write metrics.json / metrics.csv / report.md / plots.

Resolution: by default metrics are computed on maps at the original image size against the original masks (what
the official MVTec AD evaluation does). `eval_size=256` gives the paper's protocol: maps and masks are area-resized
to 256 x 256 (masks then thresholded at 0.5).
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .data import read_image
from .datasets import CategoryData, load_dataset
from .metrics import au_pro, best_f1, f1_at_threshold, image_auroc, pixel_auroc, pro_curve
from .model import Spade

#: The paper's per-class pixel AUROC and PRO on MVTec AD (WRN50), as fractions.
PAPER_PIXEL_RESULTS: dict[str, tuple[float, float]] = {
    "bottle": (0.984, 0.955), "cable": (0.972, 0.909), "capsule": (0.990, 0.937), "carpet": (0.975, 0.947),
    "grid": (0.937, 0.867), "hazelnut": (0.991, 0.954), "leather": (0.976, 0.972), "metal_nut": (0.981, 0.944),
    "pill": (0.965, 0.946), "screw": (0.989, 0.960), "tile": (0.874, 0.759), "toothbrush": (0.979, 0.935),
    "transistor": (0.941, 0.874), "wood": (0.885, 0.874), "zipper": (0.965, 0.926),
}

#: Named settings. "default" is the library's own defaults (chosen by measurement, see README); "paper" is the
#: published configuration (needs the WRN50 ImageNet weights file offline) and is evaluated at 256 x 256.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": {
        "backbone": "wide_resnet50_2", "layers": (1, 2, 3), "k_image": 3, "k_gallery": 50, "kappa": 1,
        "fusion": "mean", "distance": "squared", "image_score": "knn", "sigma": 4.0, "image_size": 224,
        "resize": "paper_crop",
    },
}
PRESET_EVAL_SIZE: dict[str, int | None] = {"default": None, "paper": 256}


@dataclass
class CategoryResult:
    """Metrics and the data behind the plots for one category."""

    name: str
    metrics: dict[str, Any]
    scores: np.ndarray
    labels: np.ndarray
    maps: list[np.ndarray] = field(repr=False)
    masks: list[np.ndarray] | None = field(repr=False)
    paths: list[Path] = field(repr=False)
    pro: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)


def resolution_label(eval_size: int | None) -> str:
    return "original image size" if eval_size is None else f"{eval_size}x{eval_size} (area-resized maps and masks)"


def evaluate_category(
    category: CategoryData,
    settings: dict[str, Any],
    *,
    eval_size: int | None = None,
    pro_limit: float = 0.3,
    log: Callable[[str], None] = lambda message: None,
) -> tuple[CategoryResult, Spade]:
    """Fit on `category.train`, predict its test set, and compute every metric the data allows."""
    start = time.perf_counter()
    model = Spade(**settings).fit(category.train)
    fit_seconds = time.perf_counter() - start
    log(f"{category.name}: fitted on {len(model.train_names_)} images in {fit_seconds:.1f} s")
    samples = category.test
    scores, maps, masks = [], [], []
    start = time.perf_counter()
    for sample, prediction in zip(samples, model.iter_predict([s.path for s in samples], original_size=True)):
        scores.append(prediction.score)
        full_map = prediction.original_map
        mask = sample.load_mask(full_map.shape) if category.has_masks else None
        if eval_size is not None:
            full_map, mask = _resize_for_eval(full_map, mask, eval_size)
        maps.append(full_map)
        masks.append(mask)
    predict_ms = 1000 * (time.perf_counter() - start) / len(samples)
    labels = np.array([s.is_anomalous for s in samples], dtype=bool)
    score_array = np.asarray(scores, dtype=np.float64)
    metrics: dict[str, Any] = {
        "image_auroc": image_auroc(score_array, labels),
        "pixel_auroc": None,
        "au_pro": None,
        "n_train": len(model.train_names_),
        "n_calibration": len(model.calibration_scores_),
        "n_test": len(samples),
        "fit_seconds": round(fit_seconds, 3),
        "predict_ms_per_image": round(predict_ms, 1),
        "best_f1": best_f1(score_array, labels),
        "image_threshold": model.image_threshold_,
        "at_threshold": (
            f1_at_threshold(score_array, labels, model.image_threshold_) if model.image_threshold_ is not None else None
        ),
    }
    pro = None
    if category.has_masks:
        metrics["pixel_auroc"] = pixel_auroc(maps, masks)
        pro = pro_curve(maps, masks, limit=pro_limit)
        metrics["au_pro"] = au_pro(maps, masks, limit=pro_limit)
    paper = PAPER_PIXEL_RESULTS.get(category.name)
    if paper is not None:
        metrics["paper_pixel_auroc"], metrics["paper_pro"] = paper
    model.metrics_ = {k: v for k, v in metrics.items() if k not in ("best_f1", "at_threshold")}
    result = CategoryResult(
        category.name, metrics, score_array, labels, maps, masks if category.has_masks else None,
        [s.path for s in samples], pro,
    )
    return result, model


def _resize_for_eval(
    anomaly_map: np.ndarray, mask: np.ndarray | None, size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Area-resize a map (NaN stays NaN where any source pixel was unscored) and a mask (then > 0.5)."""
    def area(array: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
        return F.interpolate(tensor, size=(size, size), mode="area")[0, 0].numpy()

    resized_mask = area(mask.astype(np.float32)) > 0.5 if mask is not None else None
    return area(anomaly_map), resized_mask


def evaluate(
    root: str | Path,
    *,
    categories: Sequence[str] | None = None,
    settings: dict[str, Any] | None = None,
    eval_size: int | None = None,
    pro_limit: float = 0.3,
    out_dir: str | Path | None = None,
    save_models: bool = False,
    plots: bool = True,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Evaluate every (selected) category under `root`; write the report files into `out_dir` if given.

    Returns the metrics.json content: {"settings", "resolution", "categories": {name: metrics}, "mean"}.
    """
    settings = dict(settings or {})
    data = load_dataset(Path(root), categories)
    out = Path(out_dir) if out_dir is not None else None
    results: dict[str, dict[str, Any]] = {}
    for index, category in enumerate(data, 1):
        log(f"[{index}/{len(data)}] {category.name}: {len(category.train)} train, {len(category.test)} test images")
        result, model = evaluate_category(category, settings, eval_size=eval_size, pro_limit=pro_limit, log=log)
        results[category.name] = result.metrics
        if out is not None:
            if plots:
                _write_plots(result, out / category.name, model, pro_limit)
            if save_models:
                model.save(out / category.name / "model.safetensors")
        del result, model
    report = {
        "settings": _jsonable({**Spade(**settings).get_params(), "pro_limit": pro_limit}),
        "resolution": resolution_label(eval_size),
        "categories": _jsonable(results),
        "mean": _jsonable(_mean_row(results)),
    }
    if out is not None:
        write_report(report, out)
    return report


_MEAN_KEYS = ("image_auroc", "pixel_auroc", "au_pro", "fit_seconds", "predict_ms_per_image")


def _mean_row(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    mean: dict[str, float | None] = {}
    for key in _MEAN_KEYS:
        values = [r[key] for r in results.values() if r.get(key) is not None]
        mean[key] = float(np.mean(values)) if values else None
    return mean


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def _write_plots(result: CategoryResult, folder: Path, model: Spade, pro_limit: float) -> None:
    from .plots import plot_cases, plot_image_roc, plot_pixel_roc, plot_pro_curve, plot_score_histogram, select_cases

    name = result.name
    plot_image_roc(result.scores, result.labels, folder / "image_roc.png", title=f"{name}: image ROC")
    plot_score_histogram(
        result.scores, result.labels, folder / "score_histogram.png", threshold=model.image_threshold_,
        title=f"{name}: image scores",
    )
    if result.masks is not None and result.pro is not None:
        plot_pixel_roc(result.maps, result.masks, folder / "pixel_roc.png", title=f"{name}: pixel ROC",
                       auroc=result.metrics["pixel_auroc"])
        plot_pro_curve(*result.pro, folder / "pro_curve.png", limit=pro_limit, au_pro=result.metrics["au_pro"],
                       title=f"{name}: PRO curve")
    best, worst = select_cases(result.scores, result.labels)
    chosen = best + worst
    finite = np.concatenate([m[np.isfinite(m)].ravel() for m in result.maps])
    vmin, vmax = float(np.percentile(finite, 1)), float(np.percentile(finite, 99.9))
    plot_cases(
        [read_image(result.paths[i]) for i in chosen],
        [result.maps[i] for i in chosen],
        [result.masks[i] if result.masks is not None else None for i in chosen],
        [f"{'best' if n < len(best) else 'worst'}: {result.paths[i].parent.name}/{result.paths[i].name} "
         f"score {result.scores[i]:.3g}" for n, i in enumerate(chosen)],
        folder / "cases.png", vmin=vmin, vmax=vmax,
    )


def _fmt(value: float | None, percent: bool = True) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if percent else f"{value:.1f}"


TABLE_HEADER = ["category", "image AUROC", "pixel AUROC", "AU-PRO", "paper pixel AUROC", "diff", "paper PRO", "diff",
                "F1 @ threshold", "best F1", "ms / image"]


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """Rows of the per-category table (percentages), with a mean row; shared by the console, CSV and Markdown."""
    rows = []
    for name, m in [*report["categories"].items(), ("mean", report["mean"])]:
        paper_pix, paper_pro = m.get("paper_pixel_auroc"), m.get("paper_pro")
        diff_pix = m["pixel_auroc"] - paper_pix if paper_pix is not None and m.get("pixel_auroc") is not None else None
        diff_pro = m["au_pro"] - paper_pro if paper_pro is not None and m.get("au_pro") is not None else None
        at = m.get("at_threshold")
        rows.append([
            name, _fmt(m.get("image_auroc")), _fmt(m.get("pixel_auroc")), _fmt(m.get("au_pro")), _fmt(paper_pix),
            _fmt(diff_pix), _fmt(paper_pro), _fmt(diff_pro), _fmt(at["f1"]) if at else "-",
            _fmt(m["best_f1"]["f1"]) if m.get("best_f1") else "-", _fmt(m.get("predict_ms_per_image"), False),
        ])
    return rows


def format_table(report: dict[str, Any]) -> str:
    rows = [TABLE_HEADER, *table_rows(report)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEADER))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                     for row in rows)


def write_report(report: dict[str, Any], out: Path) -> None:
    """metrics.json (fractions), metrics.csv and report.md (percentages) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    with open(out / "metrics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(TABLE_HEADER)
        writer.writerows(table_rows(report))
    lines = [
        "# spade-ad evaluation",
        "",
        f"Metrics computed at: **{report['resolution']}**. Values in percent; AU-PRO integrated up to FPR "
        f"{report['settings']['pro_limit']}. Paper: Cohen & Hoshen 2020, WRN50 (pixel AUROC / PRO per class).",
        "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "---|" * len(TABLE_HEADER),
        *("| " + " | ".join(row) + " |" for row in table_rows(report)),
        "",
        "F1 @ threshold: image-level F1 at the threshold calibrated on held-out good images only; best F1: the best "
        "achievable image-level F1 over all thresholds (an upper bound that peeks at the labels).",
    ]
    if any(m.get("pixel_auroc") is None for m in report["categories"].values()):
        lines += ["", "Some categories have no ground-truth masks: only image-level metrics are reported for them."]
    lines += ["", "## Settings", "", "```json", json.dumps(report["settings"], indent=2), "```", ""]
    for name in report["categories"]:
        if (out / name / "image_roc.png").exists():
            lines += [f"## {name}", ""]
            plots = ("image_roc", "pixel_roc", "pro_curve", "score_histogram", "cases")
            lines += [f"![{plot}]({name}/{plot}.png)" for plot in plots if (out / name / f"{plot}.png").exists()]
            lines.append("")
    (out / "report.md").write_text("\n".join(lines))
