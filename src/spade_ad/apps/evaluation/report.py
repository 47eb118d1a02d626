"""The evaluation report: the metrics.json content, the per-category table (console, CSV, Markdown) and the files
metrics.json / metrics.csv / report.md. Plain data in, text and files out: nothing here fits or scores."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TABLE_HEADER", "build_report", "format_table", "resolution_label", "table_rows", "write_report"]


def resolution_label(eval_size: int | None) -> str:
    return "original image size" if eval_size is None else f"{eval_size}x{eval_size} (area-resized maps and masks)"


def build_report(
    results: dict[str, dict[str, Any]], params: dict[str, Any], *, pro_limit: float, eval_size: int | None
) -> dict[str, Any]:
    """The metrics.json content: {"settings", "resolution", "categories": {name: metrics}, "mean"}, JSON-ready.

    `params` are the estimator's full settings (`Spade.get_params()`); `results` each category's metrics.
    """
    return {
        "settings": _jsonable({**params, "pro_limit": pro_limit}),
        "resolution": resolution_label(eval_size),
        "categories": _jsonable(results),
        "mean": _jsonable(_mean_row(results)),
    }


_MEAN_KEYS = ("image_auroc", "pixel_auroc", "au_pro", "recall_at_1_percent", "recall_at_5_percent", "fit_seconds",
              "predict_ms_per_image")


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


def _fmt(value: float | None, percent: bool = True) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if percent else f"{value:.1f}"


TABLE_HEADER = ["category", "image AUROC", "pixel AUROC", "AU-PRO", "paper pixel AUROC", "diff", "paper PRO", "diff",
                "recall @ 1% FPR", "recall @ 5% FPR", "F1 @ threshold", "best F1", "recall @ threshold",
                "best @ its FPR", "false alarms asked", "measured", "good flagged", "ms / image"]


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
            _fmt(diff_pix), _fmt(paper_pro), _fmt(diff_pro), _fmt(m.get("recall_at_1_percent")),
            _fmt(m.get("recall_at_5_percent")), _fmt(at["f1"]) if at else "-",
            _fmt(m["best_f1"]["f1"]) if m.get("best_f1") else "-", _fmt(at["recall"]) if at else "-",
            _fmt(m.get("recall_best_at_measured_rate")), _fmt(m.get("false_alarm_rate_asked")),
            _fmt(m.get("false_alarm_rate_measured")),
            f"{m['good_flagged']} of {m['n_good']}" if m.get("good_flagged") is not None else "-",
            _fmt(m.get("predict_ms_per_image"), False),
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
    warnings = [(name, m["threshold_check"]["warning"]) for name, m in report["categories"].items()
                if (m.get("threshold_check") or {}).get("warning")]
    if warnings:
        lines += ["", "## Warnings: thresholds that will not hold", ""]
        lines += [f"- **{name}**: {text}" for name, text in warnings]
    lines += ["", "recall @ 1% / 5% FPR: the share of defective images any threshold catches while flagging at most "
              "1% / 5% of the good test images (with n good images, below 1/n that means none). best @ its FPR: "
              "what the best threshold catches while flagging no more good test images than the calibrated one "
              "(good flagged); recall @ threshold against it is what the calibration gives away (with a few dozen "
              "good test images this flatters the best threshold, which is chosen on those very images)."]
    if any(m.get("pixel_auroc") is None for m in report["categories"].values()):
        lines += ["", "Some categories have no ground-truth masks: only image-level metrics are reported for them."]
    lines += ["", "## Settings", "", "```json", json.dumps(report["settings"], indent=2), "```", ""]
    for name in report["categories"]:
        if (out / name / "image_roc.png").exists():
            lines += [f"## {name}", ""]
            plots = ("image_roc", "low_false_alarm_roc", "pixel_roc", "pro_curve", "score_histogram", "cases")
            lines += [f"![{plot}]({name}/{plot}.png)" for plot in plots if (out / name / f"{plot}.png").exists()]
            lines.append("")
    (out / "report.md").write_text("\n".join(lines))
