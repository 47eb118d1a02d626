"""Image-score study: fit once per product, keep every image's per-level distance maps (leave-one-out for the
training images, plain for the test images) and global features, then compare image-score variants offline on the
same numbers: image AUROC, recall at 1% / 5% false alarms on the good test images, and the verdict at the
conformal threshold from the leave-one-out scores (recall and false alarms at the 1% rate).

    .venv/bin/python benchmarks/image_score_study.py collect                 # writes benchmarks/results/study/*.npz
    .venv/bin/python benchmarks/image_score_study.py compare                 # the table of variants

Every product of ../shared/data plus the synthetic sets (see bench_accuracy.categories). Caches are per product
and settings tag (benchmarks/results/study/TAG/, not committed: about 10 MB), so `collect --tag radius2 --set
search_radius:2` adds another feature configuration; `compare --tag radius2` scores it. The image-score
table in docs/accuracy.md is `compare` on the default tag.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_accuracy import categories, parse_config  # noqa: E402

from spade_ad import Spade
from spade_ad.apps.evaluation.metrics import verdict_metrics  # noqa: E402
from spade_ad.core import scoring  # noqa: E402
from spade_ad.core.calibration import conformal_threshold, tail_threshold  # noqa: E402
from spade_ad.core.maps_numpy import fuse, smooth  # noqa: E402
from spade_ad.core.score_parts import robust_scale  # noqa: E402

CACHE = Path(__file__).resolve().parent / "results" / "study"


def collect(category: Any, settings: dict[str, Any], path: Path) -> None:
    captured: list[list[np.ndarray]] = []
    original = scoring.fuse

    def capture(level_maps: list[np.ndarray], input_size: tuple[int, int]) -> np.ndarray:
        captured.append([np.asarray(m, np.float32) for m in level_maps])
        return original(level_maps, input_size)

    scoring.fuse = capture
    try:
        model = Spade(progress=False, **settings).fit(category.train)
        loo = list(captured)
        captured.clear()
        queries: list[np.ndarray] = []
        nearest = model.store_.nearest_images

        def record(q: Any, k: int) -> Any:
            queries.append(q.float().cpu().numpy())
            return nearest(q, k)

        model.store_.nearest_images = record
        test_paths = [s.path for s in category.test]
        sizes = []
        for part in model._predict_parts(test_paths, full=True):
            sizes.append(part.geometry.input_size)
        test = list(captured)
    finally:
        scoring.fuse = original
    train_sizes = [scoring.training_input_size(model.store_, i, model.backbone_.strides[0])
                   for i in range(model.store_.n_images)]
    arrays: dict[str, np.ndarray] = {
        "train_global": model.store_.global_features.float().numpy(),
        "test_global": np.concatenate(queries),
        "labels": np.array([s.is_anomalous for s in category.test], bool),
        "train_sizes": np.array(train_sizes), "test_sizes": np.array(sizes),
    }
    for name, levels in (("loo", loo), ("test", test)):
        for i, image_levels in enumerate(levels):
            for level, grid in enumerate(image_levels):
                arrays[f"{name}_{i}_{level}"] = grid
    arrays["n_loo"], arrays["n_test"] = np.array(len(loo)), np.array(len(test))
    arrays["n_levels"] = np.array(len(loo[0]))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)


# ---------------------------------------------------------------- offline variants


def knn_scores(train: np.ndarray, queries: np.ndarray, k: int, exclude_self: bool) -> np.ndarray:
    d = ((queries[:, None, :] - train[None]) ** 2).sum(-1)
    if exclude_self:
        np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, :k].mean(1)


def top_mean(m: np.ndarray, share: float) -> float:
    flat = m.ravel()
    count = max(1, int(flat.size * share))
    return float(np.partition(flat, flat.size - count)[flat.size - count:].mean())


class Product:
    def __init__(self, path: Path, sigma: float = 4.0) -> None:
        z = np.load(path)
        self.name = path.stem
        self.labels = z["labels"]
        n_levels = int(z["n_levels"])
        self.loo_levels = [[z[f"loo_{i}_{lv}"] for lv in range(n_levels)] for i in range(int(z["n_loo"]))]
        self.test_levels = [[z[f"test_{i}_{lv}"] for lv in range(n_levels)] for i in range(int(z["n_test"]))]
        self.train_sizes = [tuple(s) for s in z["train_sizes"]]
        self.test_sizes = [tuple(s) for s in z["test_sizes"]]
        self.train_global, self.test_global = z["train_global"], z["test_global"]
        self.sigma = sigma
        self._maps: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}

    def maps(self, variant: str = "plain") -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Smoothed fused maps (loo, test) for a level treatment: "plain" (today's map), "levelnorm" (each level
        over its good median), "levelJ" (level J alone: "level1" is the stride-16 level with layers 2, 3)."""
        if variant not in self._maps:
            weights = None
            only = int(variant[5:]) if variant.startswith("level") and variant[5:].isdigit() else None
            if variant == "levelnorm":  # each level divided by its median over the good (leave-one-out) maps
                weights = [1.0 / float(np.median(np.concatenate([lv[j].ravel() for lv in self.loo_levels])))
                           for j in range(len(self.loo_levels[0]))]
            def build(levels: list[list[np.ndarray]], sizes: list[tuple[int, int]]) -> list[np.ndarray]:
                out = []
                for image_levels, size in zip(levels, sizes):
                    if weights is not None:
                        image_levels = [g * w for g, w in zip(image_levels, weights)]
                    if only is not None:
                        image_levels = [image_levels[only]]
                    out.append(smooth(fuse(image_levels, size), self.sigma))
                return out
            self._maps[variant] = (build(self.loo_levels, self.train_sizes), build(self.test_levels, self.test_sizes))
        return self._maps[variant]

    def part(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """(leave-one-out scores, test scores) of one score part. Prefixes: "lofK:" divides the part by the mean
        leave-one-out part of the image's K nearest training images by global feature (itself left out): an
        image-level local-density normalisation, as LOF does, so that a rare good part whose nearest training
        images are rare too is measured against them; "TAG=" takes the part from another cache (same product),
        e.g. "p3=plain:0.01" from `collect --tag p3 --set patch_size:3`."""
        if kind.startswith("lof"):
            k_text, _, inner = kind.partition(":")
            k = int(k_text[3:] or 3)
            loo, test = self.part(inner)
            train_d = ((self.train_global[:, None] - self.train_global[None]) ** 2).sum(-1)
            np.fill_diagonal(train_d, np.inf)
            test_d = ((self.test_global[:, None] - self.train_global[None]) ** 2).sum(-1)
            loo_near = np.argsort(train_d, axis=1)[:, :k]
            test_near = np.argsort(test_d, axis=1)[:, :k]
            floor = 1e-6 * max(float(np.abs(loo).max()), 1e-12)
            return (loo / np.maximum(loo[loo_near].mean(1), floor),
                    test / np.maximum(loo[test_near].mean(1), floor))
        if "=" in kind.partition(":")[0]:
            tag, _, inner = kind.partition("=")
            other = _other(self, tag)
            return other.part(inner)
        if kind.startswith("knn"):
            k = int(kind[3:] or 3)
            return (knn_scores(self.train_global, self.train_global, k, True),
                    knn_scores(self.train_global, self.test_global, k, False))
        treatment, _, what = kind.partition(":")
        loo, test = self.maps(treatment)
        if what == "max":
            f = lambda m: float(m.max())  # noqa: E731
        else:
            share = float(what)
            f = lambda m: top_mean(m, share)  # noqa: E731
        return np.array([f(m) for m in loo]), np.array([f(m) for m in test])


_OTHERS: dict[tuple[str, str], Product] = {}


def _other(product: Product, tag: str) -> Product:
    """The same product's cache under another tag (loaded once)."""
    key = (product.name, tag)
    if key not in _OTHERS:
        _OTHERS[key] = Product(CACHE / tag / f"{product.name}.npz", product.sigma)
    return _OTHERS[key]


#: The normal quantile of each upper-tail scale: (q-quantile - median) / z is a standard deviation for normal data.
TAIL_SCALES = {"q90": (0.90, 1.2816), "q95": (0.95, 1.645), "q99": (0.99, 2.326)}


def part_scale(loo: np.ndarray, scale: str = "iqr") -> tuple[float, float]:
    """(median, spread) that puts a part's scores on the common scale: "iqr" is today's (`robust_scale`), "mad" the
    median absolute deviation, "q90" / "q95" / "q99" how far the good scores reach above their median (a part
    with a long upper tail of good scores then weighs less)."""
    if scale == "iqr":
        return robust_scale(loo)
    median = float(np.median(loo))
    if scale == "mad":
        return median, max(1.4826 * float(np.median(np.abs(loo - median))), 1e-12)
    quantile, z = TAIL_SCALES[scale]
    return median, max((float(np.quantile(loo, quantile)) - median) / z, 1e-12)


def combine(product: Product, parts: list[tuple[str, float]], how: str = "mean", scale: str = "iqr"
            ) -> tuple[np.ndarray, np.ndarray]:
    loo_sum, test_sum, total = 0.0, 0.0, 0.0
    loo_list, test_list = [], []
    for kind, weight in parts:
        loo, test = product.part(kind)
        if len(parts) == 1:
            return loo, test
        median, spread = part_scale(loo, scale)
        loo_list.append((loo - median) / spread)
        test_list.append((test - median) / spread)
        loo_sum = loo_sum + weight * loo_list[-1]
        test_sum = test_sum + weight * test_list[-1]
        total += weight
    if how == "max":
        return np.max(loo_list, 0), np.max(test_list, 0)
    return loo_sum / total, test_sum / total


def previous_threshold(loo: np.ndarray, rate: float) -> float:
    """The threshold rule before issue 27: the conformal quantile wherever alpha (n + 1) >= 1, else the tail point
    fitted to all scores (suspects included), never above the largest."""
    values = np.sort(np.asarray(loo, dtype=np.float64))
    n = len(values)
    allowed = int(np.floor(rate * (n + 1) + 1e-9)) - 1
    if allowed >= 0:
        return float(values[n - 1 - allowed])
    tail = tail_threshold(values, rate)
    return float(values[-1]) if tail is None or tail >= values[-1] else tail


def evaluate(loo: np.ndarray, test: np.ndarray, labels: np.ndarray, rate: float = 0.01) -> dict[str, float]:
    threshold, _ = conformal_threshold(loo, rate)
    verdict = verdict_metrics(test, labels, threshold)  # the evaluator's figures
    before = test > previous_threshold(loo, rate)
    return {
        "auroc": verdict["image_auroc"], "r1": verdict["recall_at_1_percent"], "r5": verdict["recall_at_5_percent"],
        "recall_thr": verdict["at_threshold"]["recall"], "fa_thr": verdict["false_alarm_rate_measured"],
        "recall_thr_before": float(before[labels].mean()), "fa_thr_before": float(before[~labels].mean()),
        # what any threshold catches at the false-alarm rate ours measured
        "recall_best_same_fa": verdict["recall_best_at_measured_rate"],
    }


def variant_table(results: dict[str, dict[str, dict[str, float]]], label: str) -> str:
    """The Markdown table of {product: {variant: `evaluate`'s figures}}: a row per variant, a cell per product (image
    AUROC / recall at 1% / at 5% FPR / recall at the 1% threshold (false alarms)), then the mean and the worst."""
    products = list(results)
    lines = ["Image AUROC / recall at 1% FPR / at 5% FPR / recall at the 1% threshold (false alarms %)", "",
             f"| {label} | " + " | ".join(products) + " | mean | worst |", "|---|" + "---|" * (len(products) + 2)]
    for variant in results[products[0]]:
        rows = [results[p][variant] for p in products]
        cells = [_cell(r) for r in rows] + _summary_cells(rows, false_alarms=True)
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(r: dict[str, float]) -> str:
    """One product's figures: image AUROC / recall at 1% / at 5% FPR / recall at the threshold (false alarms %)."""
    return (f"{100 * r['auroc']:.1f} / {100 * r['r1']:.0f} / {100 * r['r5']:.0f} / {100 * r['recall_thr']:.0f} "
            f"({100 * r['fa_thr']:.0f})")


def _summary_cells(rows: list[dict[str, float]], false_alarms: bool) -> list[str]:
    """The mean (with its false alarms at the threshold when asked) and the worst cell of a row of products."""
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    worst = {k: float(np.min([r[k] for r in rows])) for k in rows[0]}
    tail = f" ({100 * mean['fa_thr']:.1f})" if false_alarms else ""
    return [f"{100 * mean['auroc']:.2f} / {100 * mean['r1']:.0f} / {100 * mean['r5']:.0f} / "
            f"{100 * mean['recall_thr']:.0f}{tail}",
            f"{100 * worst['auroc']:.1f} / {100 * worst['r1']:.0f} / {100 * worst['r5']:.0f}"]


def write_results(text: str, results: dict[str, Any], name: str) -> None:
    """Print a study's table and keep it with its figures: benchmarks/results/NAME.md and NAME.json."""
    print(text)
    out = Path(__file__).resolve().parent / "results"
    (out / f"{name}.md").write_text(text + "\n")
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))


def study_main(doc: str, study: Any, label: str, name: str) -> None:
    """The command line of a per-product study (`augment_study.py`, `pixel_lof_study.py`): `--category` (repeatable)
    and `--out`; runs `study(category) -> {variant: figures}` on every dev product and writes its table."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", action="append")
    parser.add_argument("--out", default=name)
    args = parser.parse_args()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for category in categories(args.category, Path(tmp)):
            results[category.name] = study(category)
    write_results(variant_table(results, label), results, args.out)


VARIANTS: dict[str, tuple[list[tuple[str, float]], str]] = {
    "map_top (1%)": ([("plain:0.01", 1)], "mean"),
    "map_top 0.1%": ([("plain:0.001", 1)], "mean"),
    "map_top 0.3%": ([("plain:0.003", 1)], "mean"),
    "map_max": ([("plain:max", 1)], "mean"),
    "knn3": ([("knn3", 1)], "mean"),
    "knn1": ([("knn1", 1)], "mean"),
    "fused (today)": ([("plain:0.01", 1), ("knn3", 1)], "mean"),
    "fused max": ([("plain:0.01", 1), ("knn3", 1)], "max"),
    "fused map 2:1": ([("plain:0.01", 2), ("knn3", 1)], "mean"),
    "multi-top (max, 0.1%, 1%)": ([("plain:max", 1), ("plain:0.001", 1), ("plain:0.01", 1)], "mean"),
    "multi-top + knn": ([("plain:max", 1), ("plain:0.001", 1), ("plain:0.01", 1), ("knn3", 1)], "mean"),
    "0.1% + knn": ([("plain:0.001", 1), ("knn3", 1)], "mean"),
    "0.1% + 1% + knn": ([("plain:0.001", 1), ("plain:0.01", 1), ("knn3", 1)], "mean"),
    "map_top 2%": ([("plain:0.02", 1)], "mean"),
    "map_top 5%": ([("plain:0.05", 1)], "mean"),
    "1% + knn1": ([("plain:0.01", 1), ("knn1", 1)], "mean"),
    "1% + knn1 (2:1)": ([("plain:0.01", 2), ("knn1", 1)], "mean"),
    "1% + knn1 (3:1)": ([("plain:0.01", 3), ("knn1", 1)], "mean"),
    "1% + knn3 (3:1)": ([("plain:0.01", 3), ("knn3", 1)], "mean"),
    "2% + knn1 (2:1)": ([("plain:0.02", 2), ("knn1", 1)], "mean"),
    "1% + 5% + knn1": ([("plain:0.01", 1), ("plain:0.05", 1), ("knn1", 1)], "mean"),
    "levelnorm map_top": ([("levelnorm:0.01", 1)], "mean"),
    "levelnorm fused": ([("levelnorm:0.01", 1), ("knn3", 1)], "mean"),
    "levelnorm 0.1% + 1% + knn": ([("levelnorm:0.001", 1), ("levelnorm:0.01", 1), ("knn3", 1)], "mean"),
    # issue 27: the default today, and the candidates measured against it
    "default (1% + knn1, 2:1)": ([("plain:0.01", 2), ("knn1", 1)], "mean"),
    "+ stride-16 top 1% (1:1:1)": ([("plain:0.01", 1), ("level1:0.01", 1), ("knn1", 1)], "mean"),
    "+ stride-16 top 1% (2:1:1)": ([("plain:0.01", 2), ("level1:0.01", 1), ("knn1", 1)], "mean"),
    "lof3 map + knn1 (2:1)": ([("lof3:plain:0.01", 2), ("knn1", 1)], "mean"),
    "map + lof3 knn1 (2:1)": ([("plain:0.01", 2), ("lof3:knn1", 1)], "mean"),
    "lof3 both (2:1)": ([("lof3:plain:0.01", 2), ("lof3:knn1", 1)], "mean"),
    "lof5 both (2:1)": ([("lof5:plain:0.01", 2), ("lof5:knn1", 1)], "mean"),
    "lof3 both + stride-16 (1:1:1)": ([("lof3:plain:0.01", 1), ("lof3:level1:0.01", 1), ("lof3:knn1", 1)], "mean"),
    "lof5 both + stride-16 (1:1:1)": ([("lof5:plain:0.01", 1), ("lof5:level1:0.01", 1), ("lof5:knn1", 1)], "mean"),
    "lof3 map, stride-16 + plain knn1 (1:1:1)": ([("lof3:plain:0.01", 1), ("lof3:level1:0.01", 1), ("knn1", 1)],
                                                  "mean"),
    "p3 map + knn1 (2:1)": ([("p3=plain:0.01", 2), ("knn1", 1)], "mean"),
    "p3 map + plain map + knn1 (1:1:1)": ([("p3=plain:0.01", 1), ("plain:0.01", 1), ("knn1", 1)], "mean"),
    "p3 stride-16 + plain map + knn1 (1:1:1)": ([("plain:0.01", 1), ("p3=level1:0.01", 1), ("knn1", 1)], "mean"),
    "lof3: plain map, p3 stride-16, knn1 (1:1:1)": ([("lof3:plain:0.01", 1), ("lof3:p3=level1:0.01", 1),
                                                     ("lof3:knn1", 1)], "mean"),
    "lof3: plain map, p3 stride-16, knn1 (2:1:1)": ([("lof3:plain:0.01", 2), ("lof3:p3=level1:0.01", 1),
                                                     ("lof3:knn1", 1)], "mean"),
    "lof3: plain map, p3 stride-16, knn1 (1:2:1)": ([("lof3:plain:0.01", 1), ("lof3:p3=level1:0.01", 2),
                                                     ("lof3:knn1", 1)], "mean"),
    "lof3: plain map, plain + p3 stride-16, knn1 (1:1:1:1)": ([("lof3:plain:0.01", 1), ("lof3:level1:0.01", 1),
                                                               ("lof3:p3=level1:0.01", 1), ("lof3:knn1", 1)], "mean"),
    "lof3: p3 map, plain map, knn1 (1:1:1)": ([("lof3:p3=plain:0.01", 1), ("lof3:plain:0.01", 1),
                                               ("lof3:knn1", 1)], "mean"),
    "lof3: p3 map, p3 stride-16, knn1 (1:1:1)": ([("lof3:p3=plain:0.01", 1), ("lof3:p3=level1:0.01", 1),
                                                  ("lof3:knn1", 1)], "mean"),
}


def compare(paths: list[Path], names: list[str] | None, show_before: bool = False, scale: str = "iqr"
            ) -> tuple[str, list[dict[str, Any]]]:
    """The Markdown table of the variants (or those `names`) over the cached products, and its rows; with
    `show_before`, each cell also gives [recall (false alarms)] at the previous threshold rule; `scale`: how each
    part is put on the common scale (`part_scale`)."""
    products = [Product(p) for p in paths]
    rows = []
    header = "| variant | " + " | ".join(p.name for p in products) + " | mean | worst |"
    lines = ["Image AUROC / recall at 1% FPR / recall at 5% FPR / recall at the 1% threshold (false alarms)", "",
             header, "|" + "---|" * (len(products) + 3)]
    for variant, (parts, how) in VARIANTS.items():
        if names and variant not in names:
            continue
        results = [evaluate(*combine(p, parts, how, scale), p.labels) for p in products]
        cells = [_cell(r) for r in results]
        if show_before:  # the same score at the previous threshold rule
            cells = [f"{c} [{100 * r['recall_thr_before']:.0f} ({100 * r['fa_thr_before']:.0f})]"
                     for c, r in zip(cells, results)]
        cells += _summary_cells(results, false_alarms=False)
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        rows.append({"variant": variant, "results": results})
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> None:
    """The command line, or `argv` (studies that change the library for one process run it with their own)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["collect", "compare"])
    parser.add_argument("--category", action="append")
    parser.add_argument("--tag", default="default")
    parser.add_argument("--set", default="", help="setting:value,... on top of the defaults")
    parser.add_argument("--variant", action="append")
    parser.add_argument("--before", action="store_true", help="also the verdict at the previous threshold rule")
    parser.add_argument("--scale", default="iqr", choices=["iqr", "mad", *TAIL_SCALES],
                        help="how each part is scaled before the parts are averaged (default: today's)")
    args = parser.parse_args(argv)
    if args.action == "collect":
        _, settings = parse_config(f"x={args.set}")
        with tempfile.TemporaryDirectory() as tmp:
            for category in categories(args.category, Path(tmp)):
                path = CACHE / args.tag / f"{category.name}.npz"
                if path.exists():
                    continue
                print("collect", category.name, file=sys.stderr, flush=True)
                collect(category, settings, path)
        return
    paths = sorted((CACHE / args.tag).glob("*.npz"))
    if args.category:
        paths = [p for p in paths if p.stem in args.category]
    text, rows = compare(paths, args.variant, args.before, args.scale)
    print(text)
    (CACHE / args.tag / "compare.md").write_text(text + "\n")
    (CACHE / args.tag / "compare.json").write_text(json.dumps(
        {"products": [p.stem for p in paths], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
