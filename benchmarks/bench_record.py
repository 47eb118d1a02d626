"""The inspection record's costs and drift on real data; figures to benchmarks/results/record.json.

1. Recording overhead: predict on real images (bottle test images) with a `PredictionWriter` that a `Recorder`
   follows (outputs on disk and every prediction in a SQLite record), in one run, timing the recording itself
   (SHA-256 of the file, the row, the batched transactions) against the whole per-image time; and the same images
   without a record, in alternating runs, for the throughput ratio.
2. A 1-million-row synthetic record on SQLite (30 days of a line, 1.5 % flagged): the review queue's first page
   (unfiltered, flagged only, from a date), a labelled-queue page, and the drift figure (`check_drift`, window 500),
   each the median of repeated calls after a first (cold) one; and the history view's queries (per hour over the
   last 7 days, as the page asks by default; per day over all 30 days; the latest 2000 scores).
3. Drift on bottle: the 20 good test images as they are, brightened by 20 %, and blurred (Gaussian, radius 2), each
   scored and recorded as a line's window, then `check_drift` (window 20).
4. With --screenshot: the review view of a served bottle model with a few flagged images, in headless Chromium,
   saved to docs/review.png.

    python benchmarks/bench_record.py [--model bottle.safetensors] [--images 40] [--rows 1000000] [--screenshot]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # child_server, for the screenshot
BOTTLE = ROOT.parent / "shared" / "data" / "mvtec_ad" / "bottle"
RESULTS = ROOT / "benchmarks" / "results" / "record.json"


def _model(path: Path | None, cache: Path) -> Path:
    if path is not None:
        return path
    target = cache / "bottle.safetensors"
    if not target.exists():
        from spade_ad import Spade

        print("fitting bottle (default settings) ...", flush=True)
        Spade(device="cpu", progress=False).fit(BOTTLE / "train" / "good").save(target)
    return target


def overhead(model_path: Path, n_images: int, rounds: int) -> dict[str, object]:
    from spade_ad.estimators.opening import open_model
    from spade_ad.outputs.writers import PredictionWriter
    from spade_ad.record import open_record
    from spade_ad.record.recorder import Recorder

    images = sorted((BOTTLE / "test").rglob("*.png"))
    random.Random(0).shuffle(images)
    images = images[:n_images]
    model = open_model(model_path, device="cpu")
    model.set_params(progress=False)
    list(model.iter_predict(images[:2], original_size=True, keep_images=True))  # warm up
    plain_runs, recorded_runs, record_shares = [], [], []
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(rounds):
            for recorded in (False, True):
                out = Path(folder) / f"out{round_}{int(recorded)}"
                record_seconds = 0.0
                if recorded:
                    record = open_record(Path(folder) / f"r{round_}.db")
                    recorder = Recorder(record, model, model_path, origin="predict")
                    writer = recorder.follow(PredictionWriter.for_model(model, out))
                    add, flush = recorder.add, recorder.flush

                    def timed_add(*args: object, _add=add, **kwargs: object) -> None:
                        nonlocal record_seconds
                        started = time.perf_counter()
                        _add(*args, **kwargs)
                        record_seconds += time.perf_counter() - started

                    recorder.add = timed_add  # type: ignore[method-assign]
                else:
                    writer = PredictionWriter.for_model(model, out)
                started = time.perf_counter()
                with writer:
                    writer.write_all(model.iter_predict(images, original_size=True, keep_images=True))
                if recorded:
                    tail = time.perf_counter()
                    flush()
                    record_seconds += time.perf_counter() - tail
                    assert record.count() == len(images)
                    record.close()
                seconds = time.perf_counter() - started
                (recorded_runs if recorded else plain_runs).append(len(images) / seconds)
                if recorded:
                    record_shares.append(record_seconds / seconds)
                print(f"round {round_}: {'with' if recorded else 'without'} record: {len(images) / seconds:.3f} "
                      f"images/s" + (f", recording {100 * record_seconds / seconds:.2f} % of the run" if recorded
                                     else ""), flush=True)
    plain, recorded = statistics.median(plain_runs), statistics.median(recorded_runs)
    return {
        "images": len(images), "rounds": rounds, "images_per_s_without_record": plain,
        "images_per_s_with_record": recorded, "throughput_ratio": recorded / plain,
        "recording_share_of_run": statistics.median(record_shares),
        "note": "recording_share_of_run: time inside the recorder (SHA-256 of the file, the row, the batched "
                "transactions) over the whole run, measured in the same run; throughput_ratio: medians of "
                "alternating runs with and without a record (noisy on a shared machine)",
    }


def million(rows: int, folder: Path) -> dict[str, object]:
    from spade_ad.record import open_record
    from spade_ad.record.drift import check_drift

    target = folder / "million.db"
    rng = np.random.default_rng(0)
    calibration = np.sort(rng.normal(1.0, 0.2, 209))
    threshold = float(calibration[-2])
    model_id = "f" * 64
    record = open_record(target)
    record.register_model({"id": model_id, "name": "bottle.safetensors", "kind": "model file",
                           "settings_digest": "0" * 64, "image_threshold": threshold, "pixel_threshold": 1.0,
                           "false_alarm_rate": 0.01, "calibration_source": "leave_one_out",
                           "calibration_scores": json.dumps(calibration.tolist())})
    start_ms = 1_790_000_000_000
    started = time.perf_counter()
    chunk = 50_000
    for first in range(0, rows, chunk):
        n = min(chunk, rows - first)
        flagged = rng.random(n) < 0.015
        scores = np.where(flagged, threshold + rng.exponential(0.5, n), rng.normal(1.0, 0.2, n))
        at = start_ms + (np.arange(first, first + n) * (30 * 86_400_000 // rows))
        record.add([{"origin": "watch", "source": f"cam/{first + i:07d}.png", "sha256": f"{first + i:064x}",
                     "width": 900, "height": 900, "model_id": model_id, "model_name": "bottle.safetensors",
                     "score": float(scores[i]), "normalized_score": float(scores[i] / threshold),
                     "p_value": 0.5, "image_threshold": threshold, "pixel_threshold": 1.0,
                     "verdict": "defect" if scores[i] > threshold else "good",
                     "regions": "[]", "overlay_path": f"/line/out/overlays/{first + i:07d}.png",
                     "at_ms": int(at[i]), "label": ("good" if i % 997 == 0 else None)} for i in range(n)])
    fill = time.perf_counter() - started
    print(f"{rows} rows written in {fill:.1f} s", flush=True)
    record.close()
    record = open_record(target)

    def timed(call, repeat: int = 7) -> dict[str, float]:
        started = time.perf_counter()
        call()
        cold = time.perf_counter() - started
        warm = []
        for _ in range(repeat):
            started = time.perf_counter()
            call()
            warm.append(time.perf_counter() - started)
        return {"first_ms": 1000 * cold, "median_ms": 1000 * statistics.median(warm)}

    since = start_ms + 20 * 86_400_000
    figures = {
        "rows": rows, "fill_seconds": fill, "file_mb": target.stat().st_size / 2**20,
        "review_queue_first_page": timed(lambda: record.queue(limit=50)),
        "review_queue_flagged_only": timed(lambda: record.queue(verdict="defect", limit=50)),
        "review_queue_from_a_date": timed(lambda: record.queue(since_ms=since, until_ms=since + 86_400_000,
                                                               limit=50)),
        "review_queue_labelled": timed(lambda: record.queue(labelled=True, limit=50)),
        "drift_window_500": timed(lambda: check_drift(record, window=500)),
        "history_per_hour_last_7_days": timed(lambda: record.history(model_id, bucket="hour",
                                                                     since_ms=start_ms + 23 * 86_400_000)),
        "history_per_day_all_30_days": timed(lambda: record.history(model_id, bucket="day"), repeat=2),
        "history_latest_2000_scores": timed(lambda: record.scores(model_id, limit=2000)),
    }
    figures["drift_verdict"] = check_drift(record, window=500).verdict
    record.close()
    for name, value in figures.items():
        print(f"  {name}: {value}", flush=True)
    return figures


def drift_on_bottle(model_path: Path, folder: Path) -> dict[str, object]:
    from spade_ad.estimators.opening import open_model
    from spade_ad.record import open_record
    from spade_ad.record.drift import check_drift
    from spade_ad.record.recorder import Recorder

    model = open_model(model_path, device="cpu")
    model.set_params(progress=False)
    goods = sorted((BOTTLE / "test" / "good").glob("*.png"))
    variants = {
        "unchanged": lambda image: image,
        "brightened_20pct": lambda image: ImageEnhance.Brightness(image).enhance(1.2),
        "blurred_radius_2": lambda image: image.filter(ImageFilter.GaussianBlur(2)),
    }
    found: dict[str, object] = {}
    for name, change in variants.items():
        images = [change(Image.open(path).convert("RGB")) for path in goods]
        with open_record(folder / f"drift-{name}.db") as record:
            recorder = Recorder(record, model, model_path, origin="predict")
            for path, prediction in zip(goods, model.iter_predict(images), strict=True):
                recorder.add(prediction, source=path.name, path=None)
            recorder.close()
            report = check_drift(record, window=len(goods))
        found[name] = {"drifted": report.drifted, "flagged": report.flagged, "n": report.n,
                       "flag_p_value": report.flag_p_value, "score_p_value": report.score_p_value,
                       "median_good_score": report.median_good_score,
                       "median_calibration_score": report.median_calibration_score, "verdict": report.verdict}
        print(f"  {name}: {report.verdict}", flush=True)
    return found


def screenshot(model_path: Path, folder: Path, target: Path) -> None:
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from child_server import serve_in_subprocess

    model_copy = Path(shutil.copy(model_path, folder / "bottle.safetensors"))
    picks = [BOTTLE / "test" / kind / f"{n:03d}.png" for kind, n in
             (("broken_large", 0), ("contamination", 3), ("broken_small", 1), ("good", 0))]
    with serve_in_subprocess(model_copy, "--allow-add", "--record", str(folder / "shot.db"), "--device", "cpu",
                             timeout=180) as child:
        import requests

        for path in picks:
            answer = requests.post(f"{child.url}/v1/predict", files=[("files", (path.name, path.read_bytes()))],
                                   timeout=300)
            answer.raise_for_status()
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,1100",
                     "--disable-dev-shm-usage", f"--user-data-dir={folder / 'profile'}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
        try:
            driver.get(child.url)
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: d.find_element(By.ID, "view-tabs").is_displayed())
            driver.find_element(By.CSS_SELECTOR, '#view-tabs [data-view="review"]').click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#review-list .review-item")) >= 3)
            wait.until(lambda d: d.execute_script(
                "return [...document.querySelectorAll('#review-list img.overlay')].every(i => i.complete)"))
            first = driver.find_element(By.CSS_SELECTOR, "#review-list .review-item details.why summary")
            first.click()
            time.sleep(0.5)
            driver.save_screenshot(str(target))
        finally:
            driver.quit()
    print(f"screenshot: {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="A bottle model [default: fit one, cached]")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "spade-record-bench")
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--skip", nargs="*", default=[], choices=["overhead", "million", "drift"])
    parser.add_argument("--screenshot", type=Path, nargs="?", const=ROOT / "docs" / "review.png", default=None)
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    model_path = _model(args.model, args.cache)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        if "million" not in args.skip:
            results["million_rows_sqlite"] = million(args.rows, folder)
        if "drift" not in args.skip:
            results["drift_on_bottle"] = drift_on_bottle(model_path, folder)
        if "overhead" not in args.skip:
            results["recording_overhead"] = overhead(model_path, args.images, args.rounds)
        if args.screenshot is not None:
            screenshot(model_path, folder, args.screenshot)
    results["machine"] = "2 shared CPU cores, no GPU (torch CPU)"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
