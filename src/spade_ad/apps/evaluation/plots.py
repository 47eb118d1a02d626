"""Evaluation plots written as PNG files: ROC curves, the PRO curve, score histograms and example cases.

Figures are built with `matplotlib.figure.Figure` and rendered by the Agg canvas directly, so no pyplot
state, GUI backend or display is involved and nothing needs closing. Every function takes plain arrays,
writes one PNG (creating parent folders) and returns its path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve

from ...outputs.visualize import contour, overlay
from .metrics import image_auroc

__all__ = [
    "plot_cases",
    "plot_image_roc",
    "plot_low_false_alarm_roc",
    "plot_pixel_roc",
    "plot_pro_curve",
    "plot_score_histogram",
    "select_cases",
]

CASE_SIZE = 256  # longest side, in pixels, of each image in the case grid
_DPI = 100


def plot_image_roc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, path: str | Path,
                   title: str = "") -> Path:
    """ROC curve of image scores (defective = label 1 is positive), with the AUROC in the legend."""
    auroc = image_auroc(scores, labels)  # also checks the inputs and that both classes are present
    fpr, tpr, _ = roc_curve(np.asarray(labels, dtype=bool), np.asarray(scores, dtype=np.float64))
    fig, ax = _roc_axes(title or "Image-level ROC")
    ax.plot(fpr, tpr, lw=2, label=f"AUROC = {auroc:.4f}")
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_low_false_alarm_roc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray,
                             path: str | Path, threshold: float | None = None, rate: float | None = None,
                             title: str = "") -> Path:
    """The image ROC where a line works: recall against the false-alarm rate on a log axis (from one good image in
    the set to 100%), the calibrated operating point (`threshold`: its measured false-alarm rate and recall) and
    the rate asked (`rate`), and the recall any threshold reaches at 1% and 5% false alarms. No false alarm at all
    is drawn at the left edge."""
    from .metrics import recall_at_false_alarm_rate

    image_auroc(scores, labels)  # checks the inputs and that both classes are present
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    fpr, tpr, _ = roc_curve(y, s)
    floor = min(1.0 / (2 * (~y).sum()), 0.002)  # a false-alarm rate of 0 is drawn here, left of the 1% line
    fig = _figure(6.0, 4.5)
    ax = fig.add_subplot()
    ax.step(np.maximum(fpr, floor), tpr, where="post", lw=2, color="tab:blue", label="ROC")
    for level, style in ((0.01, ":"), (0.05, "-.")):
        recall = recall_at_false_alarm_rate(s, y, level)
        ax.axvline(level, color="grey", ls=style, lw=1, label=f"{100 * level:g}% false alarms: recall {recall:.0%}")
    if rate is not None:
        ax.axvline(rate, color="tab:orange", ls="--", lw=1.2, label=f"rate asked: {100 * rate:g}%")
    if threshold is not None:
        measured, recall = float((s[~y] > threshold).mean()), float((s[y] > threshold).mean())
        ax.plot([max(measured, floor)], [recall], "o", color="black", ms=8,
                label=f"threshold: {measured:.1%} false alarms, recall {recall:.0%}")
    ax.set_xscale("log")
    ax.set(xlim=(floor * 0.8, 1.0), ylim=(0, 1.02), xlabel="false-alarm rate on good images (log)",
           ylabel="recall (defects caught)", title=title or "Recall at low false-alarm rates")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_pixel_roc(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], path: str | Path, title: str = "",
                   max_points: int = 2_000_000, seed: int = 0, auroc: float | None = None) -> Path:
    """ROC curve over the scored (non-NaN) pixels of all maps, defect pixels (mask > 0) being positive.

    If there are more than `max_points` scored pixels, the curve is drawn from a uniform random sample of
    `max_points` of them (deterministic for a given `seed`), and the legend says so. The legend shows
    `auroc` when given (pass the exact `metrics.pixel_auroc`), else the AUROC of the plotted pixels.
    """
    if len(maps) != len(masks) or not maps:
        raise ValueError(f"need one mask per score map and at least one map, got {len(maps)} and {len(masks)}")
    maps = [np.asarray(m) for m in maps]
    for i, (score_map, mask) in enumerate(zip(maps, masks)):
        if score_map.ndim != 2 or score_map.shape != np.shape(mask):
            raise ValueError(f"image {i}: score map shape {score_map.shape} != mask shape {np.shape(mask)}")
    counts = np.array([np.count_nonzero(~np.isnan(m)) for m in maps])
    total = int(counts.sum())
    subsampled = total > max_points
    picks = np.sort(np.random.default_rng(seed).choice(total, max_points, replace=False)) if subsampled else None
    offsets = np.concatenate(([0], np.cumsum(counts)))
    score_parts, defect_parts = [], []
    for i, (score_map, mask) in enumerate(zip(maps, masks)):
        scored = ~np.isnan(score_map)
        values, defect = score_map[scored], np.asarray(mask)[scored] > 0
        if picks is not None:
            local = picks[np.searchsorted(picks, offsets[i]):np.searchsorted(picks, offsets[i + 1])] - offsets[i]
            values, defect = values[local], defect[local]
        score_parts.append(values)
        defect_parts.append(defect)
    values, defect = np.concatenate(score_parts), np.concatenate(defect_parts)
    if defect.all() or not defect.any():
        raise ValueError("pixel ROC needs both defect and good scored pixels")
    fpr, tpr, _ = roc_curve(defect, values)
    if auroc is None:
        auroc = float(roc_auc_score(defect, values))
        label = f"AUROC {'≈' if subsampled else '='} {auroc:.4f}"
    else:
        label = f"AUROC = {auroc:.4f}"
    if subsampled:
        label += f"\n(curve from {max_points:,} of {total:,} pixels)"
    fig, ax = _roc_axes(title or "Pixel-level ROC")
    ax.plot(fpr, tpr, lw=2, label=label)
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_pro_curve(fpr: np.ndarray, pro: np.ndarray, path: str | Path, limit: float = 0.3,
                   au_pro: float | None = None, title: str = "") -> Path:
    """PRO against FPR for FPR in [0, `limit`], as returned by `metrics.pro_curve`.

    The legend shows `au_pro` when given, else the normalised area of the given curve up to `limit`
    (as `metrics.au_pro` computes it) when the curve reaches `limit`.
    """
    fpr, pro = np.asarray(fpr, dtype=np.float64), np.asarray(pro, dtype=np.float64)
    if au_pro is None and fpr.size and fpr[-1] >= limit:
        keep = fpr <= limit
        x = np.append(fpr[keep], limit)
        y = np.append(pro[keep], np.interp(limit, fpr, pro))
        au_pro = float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2 / limit)
    label = "PRO" if au_pro is None else f"AU-PRO (FPR ≤ {limit:g}) = {au_pro:.4f}"
    fig = _figure(5.0, 4.5)
    ax = fig.add_subplot()
    ax.plot(fpr, pro, lw=2, label=label)
    ax.set(xlim=(0, limit), ylim=(0, 1.02), xlabel="false positive rate (good pixels)",
           ylabel="per-region overlap", title=title or "PRO curve")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_score_histogram(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray,
                         path: str | Path, threshold: float | None = None, title: str = "") -> Path:
    """Overlapping histograms (shared bins) of the image scores of good (0) and defective (1) images.

    A dashed vertical line marks `threshold` when given.
    """
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    if s.ndim != 1 or s.shape != y.shape or s.size == 0:
        raise ValueError(f"scores and labels must be non-empty, 1-D and of equal length, got {s.shape}, {y.shape}")
    bins = np.histogram_bin_edges(s, bins=min(40, max(10, s.size // 4)))
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot()
    for name, chosen, colour in (("good", ~y, "tab:green"), ("defective", y, "tab:red")):
        ax.hist(s[chosen], bins=bins, alpha=0.55, color=colour, edgecolor="white", label=f"{name} (n={chosen.sum()})")
    if threshold is not None:
        ax.axvline(threshold, color="black", ls="--", lw=1.5, label=f"threshold = {threshold:.4g}")
    ax.set(xlabel="image anomaly score", ylabel="images", title=title or "Image scores")
    ax.legend()
    return _save(fig, path)


def select_cases(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray,
                 n: int = 4) -> tuple[list[int], list[int]]:
    """Indices of up to `n` best and up to `n` worst cases: `(best, worst)`.

    Best: the `n - n // 2` highest-scored defective images, then the `n // 2` lowest-scored good ones (the
    clearest calls). Worst: the `n - n // 2` lowest-scored defective images (likely misses), then the
    `n // 2` highest-scored good ones (likely false alarms). Each group is ordered from the most extreme
    score. A class with few images gives fewer indices, and best and worst may then share indices.
    """
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    if s.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"scores and labels must be 1-D and of equal length, got {s.shape}, {y.shape}")
    n_defect, n_good = n - n // 2, n // 2
    order = np.argsort(s, kind="stable")
    defect = [int(i) for i in order if y[i]]  # ascending score
    good = [int(i) for i in order if not y[i]]
    best = defect[::-1][:n_defect] + good[:n_good]
    worst = defect[:n_defect] + good[::-1][:n_good]
    return best, worst


def plot_cases(images: Sequence[Image.Image], maps: Sequence[np.ndarray], masks: Sequence[np.ndarray | None],
               titles: Sequence[str], path: str | Path, vmin: float | None = None,
               vmax: float | None = None) -> Path:
    """A grid with one row per case: the image, its anomaly-map overlay, and the ground-truth outline.

    Images are shrunk to at most `CASE_SIZE` pixels a side. The colour scale is shared by all rows (so
    scores compare across cases) and shown as a colour bar; `vmin`/`vmax` default to the smallest/largest
    finite score over all maps. A `None` mask (a good image) shows the image alone in the last column.
    """
    if not len(images) == len(maps) == len(masks) == len(titles) or not images:
        raise ValueError("need at least one case and as many maps, masks and titles as images")
    finite = np.concatenate([m[np.isfinite(m)] for m in (np.asarray(a, dtype=np.float64) for a in maps)])
    low = vmin if vmin is not None else float(finite.min()) if finite.size else 0.0
    high = vmax if vmax is not None else float(finite.max()) if finite.size else 1.0
    fig = _figure(9.6, 3.2 * len(images))
    axes = fig.subplots(len(images), 3, squeeze=False)
    for row, (image, score_map, mask, name) in zip(axes, zip(images, maps, masks, titles)):
        small = image.convert("RGB")
        small.thumbnail((CASE_SIZE, CASE_SIZE), Image.Resampling.LANCZOS)
        panels = (
            (small, name),
            (overlay(small, score_map, vmin=low, vmax=high), "anomaly map"),
            (small if mask is None else contour(small, mask), "no defect" if mask is None else "ground truth"),
        )
        for ax, (picture, heading) in zip(row, panels):
            ax.imshow(picture)
            ax.set_title(heading, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    colours = ScalarMappable(Normalize(low, high), cmap="jet")
    fig.colorbar(colours, ax=axes[:, 1].tolist(), location="bottom", shrink=0.9, label="anomaly score")
    return _save(fig, path)


def _figure(width: float, height: float) -> Figure:
    """A new figure (inches) with constrained layout, rendered by Agg."""
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _roc_axes(title: str) -> tuple[Figure, Axes]:
    """A square ROC figure with labelled axes and the chance diagonal."""
    fig = _figure(5.0, 5.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as PNG at `path`, creating parent folders; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
