"""Getting the record out: `record export` (CSV, Parquet) and `record list` on a synthetic SQLite record of N rows
(default 200 000: a week of a line at one part every 3 s), against a bare `sqlite3` SELECT of the same rows in the
same run (the floor: reading the rows at all). Also the file sizes and the read-only open (drift on a read-only
copy of the file in a read-only folder).

    python benchmarks/bench_export.py [--rows 200000] [--out benchmarks/results/export.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def fill(target: Path, rows: int) -> None:
    from spade_ad.record import open_record

    rng = np.random.default_rng(0)
    calibration = np.sort(rng.normal(1.0, 0.2, 209))
    threshold = float(calibration[-2])
    model_id = "f" * 64
    with open_record(target) as record:
        record.register_model({"id": model_id, "name": "bottle.safetensors", "kind": "model file",
                               "settings_digest": "0" * 64, "image_threshold": threshold, "pixel_threshold": 1.0,
                               "false_alarm_rate": 0.01, "calibration_source": "leave_one_out",
                               "calibration_scores": json.dumps(calibration.tolist())})
        start_ms = 1_790_000_000_000
        chunk = 50_000
        for first in range(0, rows, chunk):
            n = min(chunk, rows - first)
            scores = np.where(rng.random(n) < 0.015, threshold + rng.exponential(0.5, n), rng.normal(1.0, 0.2, n))
            record.add([{"origin": "watch", "source": f"cam/{first + i:07d}.png", "sha256": f"{first + i:064x}",
                         "width": 900, "height": 900, "model_id": model_id, "model_name": "bottle.safetensors",
                         "score": float(scores[i]), "normalized_score": float(scores[i] / threshold),
                         "p_value": 0.5, "image_threshold": threshold, "pixel_threshold": 1.0,
                         "verdict": "defect" if scores[i] > threshold else "good", "regions": "[]",
                         "overlay_path": f"/line/out/overlays/{first + i:07d}.png",
                         "at_ms": start_ms + (first + i) * 3000} for i in range(n)])


def timed(call, repeat: int = 3) -> float:
    """The median wall time of `call` in seconds."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from spade_ad.record import open_record
    from spade_ad.record.drift import check_drift
    from spade_ad.record.export import Selection, format_table, iter_rows, write_csv, write_parquet

    with tempfile.TemporaryDirectory(prefix="bench-export-") as name:
        folder = Path(name)
        target = folder / "line.db"
        started = time.perf_counter()
        fill(target, args.rows)
        print(f"{args.rows} rows written in {time.perf_counter() - started:.1f} s", flush=True)

        def bare() -> None:
            connection = sqlite3.connect(f"file:{target}?mode=ro", uri=True)
            cursor = connection.execute("SELECT * FROM spade_inspections ORDER BY at_ms, id")
            while cursor.fetchmany(5000):
                pass
            connection.close()

        def export(kind: str) -> None:
            with open_record(target, readonly=True) as record:
                write = write_csv if kind == "csv" else write_parquet
                write(record, folder / f"out.{kind}")

        def listing() -> None:
            with open_record(target, readonly=True) as record:
                format_table(list(iter_rows(record, Selection(verdict="defect", limit=50, newest_first=True))))

        baseline = timed(bare)
        csv_s, parquet_s, list_s = timed(lambda: export("csv")), timed(lambda: export("parquet")), timed(listing)
        locked = folder / "ro"
        locked.mkdir()
        shutil.copy(target, locked / "line.db")
        os.chmod(locked / "line.db", 0o444)
        os.chmod(locked, 0o555)
        with open_record(locked / "line.db", readonly=True) as record:
            drift_s = timed(lambda: check_drift(record, window=500))
        os.chmod(locked, 0o755)
        figures = {
            "rows": args.rows, "record_mb": target.stat().st_size / 2**20,
            "bare_sqlite_select_s": baseline,
            "export_csv_s": csv_s, "export_csv_over_bare": csv_s / baseline,
            "csv_mb": (folder / "out.csv").stat().st_size / 2**20,
            "export_parquet_s": parquet_s, "export_parquet_over_bare": parquet_s / baseline,
            "parquet_mb": (folder / "out.parquet").stat().st_size / 2**20,
            "list_newest_50_flagged_s": list_s, "drift_read_only_window_500_s": drift_s,
        }
    for key, value in figures.items():
        print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
    if args.out is not None:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
