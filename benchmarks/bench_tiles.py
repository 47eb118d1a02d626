"""Tiled mode against the default 224 resize (issue 29): recall at 1% false alarms, AU-PRO, image AUROC, time and
peak memory per image, on a generated large product with small defects (2048 x 2048, 5-20 px defects), on MVTec AD
bottle at its own 900 x 900, and the peak memory of one 20-megapixel image.

Each fit and each predict runs in its own process, so the peak resident memory it reports (`ru_maxrss`) is that of
the predict alone (with torch and the loaded model: the process's memory before the first image is reported too).

    python benchmarks/bench_tiles.py                      # everything (about an hour on 2 busy cores)
    python benchmarks/bench_tiles.py --only large --train 4 --good 4 --defect 4   # a smaller run

Results: benchmarks/results/tiles.json and tiles.md; docs/tiles.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "bottle"
CONFIGS = {
    "default 224": {},
    "tiled 256": {"tile_size": 256, "tile_overlap": 64, "tile_margin": 32},
}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_seconds() -> float:
    """CPU time of this process so far (user + system, all threads): what the work costs on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _fit(data: Path, model: Path, settings: dict, train: int) -> None:
    from spade_ad import Spade

    files = sorted((data / "train" / "good").glob("*.png"))[:train]
    start = time.perf_counter()
    Spade(**settings, device="cpu", progress=False).fit(files).save(model)
    print(json.dumps({"fit_seconds": time.perf_counter() - start, "fit_peak_rss_mib": _rss_mib()}))


def _test_files(data: Path, good: int, defect: int) -> list[Path]:
    goods = sorted((data / "test" / "good").glob("*.png"))[:good]
    defects = sorted(p for p in (data / "test").glob("*/*.png") if p.parent.name != "good")
    step = max(1, len(defects) // max(1, defect))
    return goods + defects[::step][:defect]


def _predict(data: Path, model: Path, good: int, defect: int) -> None:
    from PIL import Image

    from spade_ad import load
    from spade_ad.apps.evaluation.metrics import au_pro, image_auroc, recall_at_false_alarm_rate

    spade = load(model, device="cpu")
    files = _test_files(data, good, defect)
    before = _rss_mib()
    scores, labels, maps, masks, seconds, pixels = [], [], [], [], [], 0
    cpu = _cpu_seconds()
    start = time.perf_counter()
    for prediction in spade.iter_predict(files, original_size=True):
        seconds.append(time.perf_counter() - start)
        path = Path(prediction.path)
        defective = path.parent.name != "good"
        mask_path = data / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
        height, width = prediction.original_map.shape
        pixels += height * width
        mask = np.asarray(Image.open(mask_path)) > 0 if defective else np.zeros((height, width), bool)
        scores.append(prediction.score)
        labels.append(int(defective))
        maps.append(np.nan_to_num(prediction.original_map).astype(np.float16))
        masks.append(mask)
        start = time.perf_counter()
    per_image = float(np.mean(seconds[1:] if len(seconds) > 1 else seconds))
    cpu = (_cpu_seconds() - cpu) / len(files)
    print(json.dumps({
        "cpu_seconds_per_image": cpu, "cpu_seconds_per_megapixel": cpu / (pixels / len(files) / 1e6),
        "images": len(files), "recall_at_1pct": recall_at_false_alarm_rate(scores, labels, 0.01),
        "image_auroc": image_auroc(scores, labels),
        "au_pro": au_pro([m.astype(np.float32) for m in maps], masks),
        "seconds_per_image": per_image, "seconds_per_megapixel": per_image / (pixels / len(files) / 1e6),
        "rss_before_mib": before, "peak_rss_mib": _rss_mib(),
    }))


def _memory(data: Path, model: Path) -> None:
    """One 20-megapixel image through a tiled model: time and peak memory of the predict."""
    from spade_ad import load

    spade = load(model, device="cpu")
    files = sorted((data / "test").glob("*/*.png"))[:1]
    before = _rss_mib()
    cpu = _cpu_seconds()
    start = time.perf_counter()
    prediction = spade.predict(files, original_size=True)[0]
    seconds = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu
    height, width = prediction.original_map.shape
    print(json.dumps({"megapixels": height * width / 1e6, "seconds": seconds, "cpu_seconds": cpu,
                      "cpu_seconds_per_megapixel": cpu / (height * width / 1e6),
                      "seconds_per_megapixel": seconds / (height * width / 1e6), "rss_before_mib": before,
                      "peak_rss_mib": _rss_mib()}))


def _merge(out: Path, new: dict) -> dict:
    """The results file with `new` merged in (read again first: runs of other products may have written it)."""
    results = json.loads(out.read_text()) if out.exists() else {}
    for key, value in new.items():
        if isinstance(value, dict) and "peak_rss_mib" not in value:
            results.setdefault(key, {}).update(value)
        else:
            results[key] = value
    out.write_text(json.dumps(results, indent=1))
    return results


def _cached(root: Path, **kwargs: object) -> Path:
    """The generated data set at `root`, made once (generating 2048 x 2048 images takes a while)."""
    from spade_ad.data.synthetic import make_large_dataset

    done = root / "done"
    if not done.exists():
        make_large_dataset(root, **kwargs)  # type: ignore[arg-type]
        done.write_text("")
    return root


def _child(*args: object) -> dict:
    out = subprocess.run([sys.executable, __file__, *map(str, args)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("fit", "predict", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, default=Path("/tmp/spade-bench-tiles"))
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--settings", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=("large", "bottle", "memory"), action="append")
    parser.add_argument("--train", type=int, default=10)
    parser.add_argument("--good", type=int, default=10)
    parser.add_argument("--defect", type=int, default=10)
    parser.add_argument("--k-gallery", type=int, default=10)
    parser.add_argument("--config", choices=list(CONFIGS), action="append", help="only these modes")
    parser.add_argument("--table", action="store_true", help="only write tiles.md from tiles.json")
    args = parser.parse_args()
    if args.stage == "fit":
        _fit(args.data, args.model, json.loads(args.settings), args.train)
        return
    if args.stage == "predict":
        _predict(args.data, args.model, args.good, args.defect)
        return
    if args.stage == "memory":
        _memory(args.data, args.model)
        return

    only = set(args.only or ("large", "bottle", "memory"))
    args.data.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "tiles.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    if args.table:
        only = set()
    products = {}
    if "large" in only:
        products["large 2048 (5-20 px defects)"] = _cached(
            args.data / f"large-{args.train}-{args.good}-{args.defect}", n_train=args.train, n_test_good=args.good,
            n_test_defect=args.defect, size=(2048, 2048), defect_size=(5, 20), seed=0)
    if "bottle" in only and BOTTLE.is_dir():
        products["bottle 900"] = BOTTLE
    for product, data in products.items():
        for name, config in CONFIGS.items():
            if args.config and name not in args.config:
                continue
            model = args.data / f"{product.split()[0]}-{name.replace(' ', '-')}.safetensors"
            settings = {**config, "k_gallery": args.k_gallery}
            row = _child("--stage", "fit", "--data", data, "--model", model, "--settings", json.dumps(settings),
                         "--train", args.train)
            row.update(_child("--stage", "predict", "--data", data, "--model", model, "--good", args.good,
                              "--defect", args.defect))
            row.update(train=args.train, settings=settings)
            results = _merge(out, {product: {name: row}})
            print(product, name, json.dumps(row), flush=True)
    if "memory" in only:
        data = _cached(args.data / "large20", n_train=2, n_test_good=0, n_test_defect=1, size=(3648, 5472),
                       defect_size=(5, 20), seed=0)
        model = args.data / "large20.safetensors"
        settings = {**CONFIGS["tiled 256"], "calibration": "none", "image_score": "map_max", "k_gallery": 2}
        row = _child("--stage", "fit", "--data", data, "--model", model, "--settings", json.dumps(settings),
                     "--train", 2)
        row.update(_child("--stage", "memory", "--data", data, "--model", model))
        results = _merge(out, {"20 MP (3648 x 5472), tiled 256": row})
        print("20 MP", json.dumps(row), flush=True)
    lines = ["| product | mode | recall at 1% false alarms | AU-PRO | image AUROC | s / image | s / MP | peak RSS MiB "
             "(before the first image) |", "|---|---|---|---|---|---|---|---|"]
    for product, rows in results.items():
        if "peak_rss_mib" in rows:  # the 20 MP row
            lines.append(f"| {product} | tiled 256 | | | | {rows['seconds']:.1f} | "
                         f"{rows['seconds_per_megapixel']:.2f} | {rows['peak_rss_mib']:.0f} "
                         f"({rows['rss_before_mib']:.0f}) |")
            continue
        for name, row in rows.items():
            lines.append(f"| {product} | {name} | {row['recall_at_1pct']:.3f} | {row['au_pro']:.3f} | "
                         f"{row['image_auroc']:.3f} | {row['seconds_per_image']:.2f} | "
                         f"{row['seconds_per_megapixel']:.2f} | {row['peak_rss_mib']:.0f} "
                         f"({row['rss_before_mib']:.0f}) |")
    (RESULTS / "tiles.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
