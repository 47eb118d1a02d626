"""How fit time, peak memory and predict latency scale with the number of training images.

For each N (default 200, 1,000 and 10,000) a fresh process generates N synthetic good images on disk, fits the
default model on them and scores a fixed set of test images. Each N runs in its own process so that its peak RSS is
its own. Prints one row per N and the latency ratio against the smallest N.

    .venv/bin/python benchmarks/bench_scale.py [--sizes 200 1000 10000] [--n-test 10]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(n_train: int, n_test: int, workdir: Path, device: str) -> dict[str, float]:
    """Runs inside the child process: generate data, fit, predict; report timings and peak RSS."""
    from spade_ad import Spade
    from spade_ad.data.images import list_images
    from spade_ad.data.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(workdir / f"n{n_train}", n_train=n_train, n_test_good=n_test // 2,
                                  n_test_defect=max(1, n_test // 4), size=(224, 224), seed=0)
    start = time.perf_counter()
    model = Spade(progress=False, device=device, calibration_fraction=0.0,
                  feature_dir=str(workdir)).fit(root / "train" / "good")
    fit_seconds = time.perf_counter() - start
    test = list_images(root / "test")[:n_test]
    model.predict(test[:1])  # warm-up
    start = time.perf_counter()
    model.predict(test)
    predict_ms = 1000 * (time.perf_counter() - start) / len(test)
    return {"n_train": n_train, "fit_seconds": fit_seconds, "predict_ms": predict_ms,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def global_search_ms(n_features: int = 100_000, dim: int = 320, queries: int = 20) -> tuple[float, float | None]:
    """Image-level kNN (the first stage of every prediction) over `n_features` stored global features, through the
    feature store (exact, torch) and through faiss's exact flat index (None where faiss is not installed), in ms
    per query."""
    import numpy as np
    import torch

    from spade_ad.core.feature_store import FeatureStore

    bank = torch.randn(n_features, dim)
    store = FeatureStore(bank, [np.zeros((n_features, 1), np.float16)], np.ones((n_features, 1, 2), np.int64))
    query = torch.randn(1, dim)
    searches = [lambda: store.nearest_images(query, 50)]
    try:
        import faiss
    except ImportError:
        faiss = None
    if faiss is not None:
        index = faiss.IndexFlatL2(dim)
        index.add(bank.numpy())
        searches.append(lambda: index.search(query.numpy(), 50))
    timings = []
    for search in searches:
        search()
        start = time.perf_counter()
        for _ in range(queries):
            search()
        timings.append(1000 * (time.perf_counter() - start) / queries)
    return timings[0], (timings[1] if faiss is not None else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 1000, 10000])
    parser.add_argument("--n-test", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.n_test, args.workdir, args.device)))
        return
    ours, flat = global_search_ms()
    faiss_note = f"faiss IndexFlatL2: {flat:.1f} ms" if flat is not None else "faiss not installed"
    print(f"image-level kNN over 100,000 global features (320-d), k=50: {ours:.1f} ms per image ({faiss_note})",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="spade-bench-scale-") as workdir:
        for n in args.sizes:
            output = subprocess.run(
                [sys.executable, __file__, "--child", str(n), "--n-test", str(args.n_test), "--workdir", workdir,
                 "--device", args.device],
                check=True, capture_output=True, text=True,
            ).stdout
            rows.append(json.loads(output.strip().splitlines()[-1]))
            row = rows[-1]
            print(f"N={n:6d}  fit {row['fit_seconds']:8.1f} s  peak RSS {row['peak_rss_mb']:7.0f} MB  "
                  f"predict {row['predict_ms']:6.0f} ms/image  "
                  f"(latency x{row['predict_ms'] / rows[0]['predict_ms']:.2f} of N={rows[0]['n_train']})",
                  flush=True)


if __name__ == "__main__":
    main()
