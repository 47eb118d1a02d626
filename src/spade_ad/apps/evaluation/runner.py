"""Benchmark evaluation: fit on each category's good training images, score its test set, compute image AUROC,
pixel AUROC and AU-PRO, compare with the paper's table, and write metrics.json / metrics.csv / report.md / plots
(and, on request, the raw anomaly maps as TIFF in the official MVTec AD evaluation layout).

Resolution: by default metrics are computed on maps at the original image size against the original masks (what
the official MVTec AD evaluation does). `eval_size=256` gives the paper's protocol: maps and masks are area-resized
to 256 x 256 (masks then thresholded at 0.5).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch
import torch.nn.functional as F

from ...core.calibration import compare_good_scores
from ...data.datasets import CategoryData, TestSample, load_dataset
from ...data.images import read_image
from ...estimators.spade import Spade
from .metrics import au_pro, pixel_auroc, pro_curve, verdict_metrics
from .report import build_report, write_report

__all__ = ["PAPER_PIXEL_RESULTS", "CategoryResult", "evaluate", "evaluate_category"]

#: The paper's per-class pixel AUROC and PRO on MVTec AD (WRN50), as fractions.
PAPER_PIXEL_RESULTS: dict[str, tuple[float, float]] = {
    "bottle": (0.984, 0.955), "cable": (0.972, 0.909), "capsule": (0.990, 0.937), "carpet": (0.975, 0.947),
    "grid": (0.937, 0.867), "hazelnut": (0.991, 0.954), "leather": (0.976, 0.972), "metal_nut": (0.981, 0.944),
    "pill": (0.965, 0.946), "screw": (0.989, 0.960), "tile": (0.874, 0.759), "toothbrush": (0.979, 0.935),
    "transistor": (0.941, 0.874), "wood": (0.885, 0.874), "zipper": (0.965, 0.926),
}


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


def evaluate_category(
    category: CategoryData,
    settings: dict[str, Any],
    *,
    eval_size: int | None = None,
    pro_limit: float = 0.3,
    maps_dir: Path | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> tuple[CategoryResult, Spade]:
    """Fit on `category.train`, predict its test set, and compute every metric the data allows.

    With `maps_dir`, each test image's raw float32 map at its original size is also written to
    `<maps_dir>/test/<defect type>/<image stem>.tiff` (the official MVTec AD evaluation layout), whatever `eval_size`.
    """
    samples = category.test
    map_paths = _map_paths(samples, maps_dir) if maps_dir is not None else None
    start = time.perf_counter()
    model = Spade(**settings).fit(category.train)
    fit_seconds = time.perf_counter() - start
    log(f"{category.name}: fitted on {len(model.train_names_)} images in {fit_seconds:.1f} s")
    scores, maps, masks = [], [], []
    start = time.perf_counter()
    for i, (sample, prediction) in enumerate(
        zip(samples, model.iter_predict([s.path for s in samples], original_size=True))
    ):
        scores.append(prediction.score)
        full_map = prediction.original_map
        if map_paths is not None:
            map_paths[i].parent.mkdir(parents=True, exist_ok=True)
            # The official evaluation cannot skip unscored pixels (NaN outside the paper crop): they get the map's
            # lowest score there, "certainly normal".
            finite = np.nan_to_num(full_map, nan=float(np.nanmin(full_map)) if np.isfinite(full_map).any() else 0.0)
            tifffile.imwrite(map_paths[i], finite.astype(np.float32))
        mask = sample.load_mask(full_map.shape) if category.has_masks else None
        if eval_size is not None:
            full_map, mask = resize_for_eval(full_map, mask, eval_size)
        maps.append(full_map)
        masks.append(mask)
    predict_ms = 1000 * (time.perf_counter() - start) / len(samples)
    labels = np.array([s.is_anomalous for s in samples], dtype=bool)
    score_array = np.asarray(scores, dtype=np.float64)
    metrics: dict[str, Any] = {
        **verdict_metrics(score_array, labels, model.image_threshold_),
        "pixel_auroc": None,
        "au_pro": None,
        "n_train": len(model.train_names_),
        "n_calibration": len(model.calibration_scores_),
        "n_test": len(samples),
        "fit_seconds": round(fit_seconds, 3),
        "predict_ms_per_image": round(predict_ms, 1),
        "image_threshold": model.image_threshold_,
        "false_alarm_rate_asked": model.calibration_.false_alarm_rate if model.image_threshold_ is not None else None,
        "false_alarm_rate_guaranteed": model.calibration_.guaranteed_rate,
        "calibration": model.calibration_.source,
        "threshold_check": {},
    }
    if model.image_threshold_ is not None and (~labels).sum() >= 2:
        # do the good test images score like the good images behind the threshold? if not, it will not hold
        check = compare_good_scores(
            model.calibration_.scores, score_array[~labels].tolist(), threshold=model.image_threshold_,
            rate=model.calibration_.false_alarm_rate, reference_name="calibration scores",
            new_name="good test images", advice="the threshold will not hold on them: calibrate on good images "
            "from the line (spade-ad calibrate MODEL --good DIR) or fit with --holdout-good DIR")
        metrics["threshold_check"] = check
        if check.get("warning"):
            log(f"warning: {category.name}: {check['warning']}")
    if model.calibration_.warning:
        log(f"warning: {category.name}: {model.calibration_.warning}")
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


def _map_paths(samples: Sequence[TestSample], maps_dir: Path) -> list[Path]:
    """Where each sample's TIFF map goes; two images that would share one file (same stem) are an error."""
    paths = [maps_dir / "test" / s.defect / f"{s.path.stem}.tiff" for s in samples]
    seen: dict[Path, Path] = {}
    for sample, path in zip(samples, paths):
        if path in seen:
            raise ValueError(f"{sample.path} and {seen[path]} would both be saved as {path}: rename one of them")
        seen[path] = sample.path
    return paths


def resize_for_eval(
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
    save_maps: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Evaluate every (selected) category under `root`; write the report files into `out_dir` if given.

    `save_models` writes `<out_dir>/<category>/model.safetensors`; `save_maps` writes every test image's raw
    float32 anomaly map at its original size to `<out_dir>/maps/<category>/test/<defect type>/<image stem>.tiff`,
    the layout the official MVTec AD evaluation code reads (it needs `out_dir`).
    Returns the metrics.json content: {"settings", "resolution", "categories": {name: metrics}, "mean"}.
    """
    if save_maps and out_dir is None:
        raise ValueError("save_maps needs an out_dir to write the maps into")
    settings = dict(settings or {})
    data = load_dataset(Path(root), categories)
    out = Path(out_dir) if out_dir is not None else None
    results: dict[str, dict[str, Any]] = {}
    for index, category in enumerate(data, 1):
        log(f"[{index}/{len(data)}] {category.name}: {len(category.train)} train, {len(category.test)} test images")
        maps_dir = out / "maps" / category.name if out is not None and save_maps else None
        result, model = evaluate_category(
            category, settings, eval_size=eval_size, pro_limit=pro_limit, maps_dir=maps_dir, log=log
        )
        results[category.name] = result.metrics
        if out is not None:
            if plots:
                _write_plots(result, out / category.name, model, pro_limit)
            if save_models:
                model.save(out / category.name / "model.safetensors")
        del result, model
    report = build_report(results, Spade(**settings).get_params(), pro_limit=pro_limit, eval_size=eval_size)
    if out is not None:
        write_report(report, out)
    return report


def _write_plots(result: CategoryResult, folder: Path, model: Spade, pro_limit: float) -> None:
    from .plots import (
        plot_cases,
        plot_image_roc,
        plot_low_false_alarm_roc,
        plot_pixel_roc,
        plot_pro_curve,
        plot_score_histogram,
        select_cases,
    )

    name = result.name
    plot_image_roc(result.scores, result.labels, folder / "image_roc.png", title=f"{name}: image ROC")
    plot_low_false_alarm_roc(result.scores, result.labels, folder / "low_false_alarm_roc.png",
                             threshold=model.image_threshold_, rate=result.metrics.get("false_alarm_rate_asked"),
                             title=f"{name}: recall at low false-alarm rates")
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
