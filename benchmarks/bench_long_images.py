"""Long images: default predict vs image-only scoring (decode + backbone on the network input + global kNN) of the
same 4096 x 256 AITEX fabric images, interleaved in one process (median of 3 rounds), so the ratio holds on a noisy
machine. The baseline keeps global_view="input": with the default square view, kNN-only scoring would never run the
network on the strip itself (it is then about 30 ms per image), and the ratio would no longer measure what the pixel
stage costs on top of the network.
`--busy N` runs N spinning processes during the timed rounds: a line PC whose cores other jobs share.

    .venv/bin/python benchmarks/bench_long_images.py [--category aitex_fabric01] [--images 10] [--busy 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.synchronize
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from spade_ad import Spade
from spade_ad.data.datasets import load_mvtec_category

AITEX = Path(__file__).resolve().parents[2] / "shared" / "data" / "aitex"


def _spin(stop: multiprocessing.synchronize.Event) -> None:
    while not stop.is_set():
        sum(range(10_000))


@contextmanager
def busy(processes: int, seconds: float = 600.0):
    """`processes` spinning processes for the duration of the block (each stops by itself after `seconds`)."""
    stop = multiprocessing.Event()
    workers = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True) for _ in range(processes)]
    for worker in workers:
        worker.start()
    timer = threading.Timer(seconds, stop.set)
    timer.start()
    try:
        yield
    finally:
        stop.set()
        timer.cancel()
        for worker in workers:
            worker.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", default="aitex_fabric01")
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", type=int, default=0, help="spinning processes during the timed rounds")
    args = parser.parse_args()
    data = load_mvtec_category(AITEX / args.category)
    paths = [s.path for s in data.test][:args.images]
    model = Spade(progress=False).fit(data.train)
    image_only = Spade(progress=False, image_score="knn", global_view="input", calibration="none").fit(data.train)
    model.predict(paths[:1])  # warm-up: first-call costs are not per-image costs
    image_only.score(paths[:1])
    times: dict[str, list[float]] = {"predict": [], "image_only": []}
    with busy(args.busy):
        for _ in range(args.rounds):
            start = time.perf_counter()
            model.predict(paths, original_size=True)
            times["predict"].append((time.perf_counter() - start) / len(paths))
            start = time.perf_counter()
            image_only.score(paths)
            times["image_only"].append((time.perf_counter() - start) / len(paths))
    predict, only = float(np.median(times["predict"])), float(np.median(times["image_only"]))
    print(f"{args.category}: predict {1000 * predict:.0f} ms / image, image-only scoring {1000 * only:.0f} ms / "
          f"image, ratio {predict / only:.2f}" + (f" ({args.busy} busy processes)" if args.busy else ""))


if __name__ == "__main__":
    main()
