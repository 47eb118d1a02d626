"""Bounded load test of `spade-ad serve` on loopback: N concurrent clients post one image each, in a loop, for a
fixed time. Prints throughput, p50/p99 latency, the error count and the server's RSS before and after the run
(measured after a warm-up, so one-time allocations such as the first forward pass do not count as growth).

Exits 1 if any request failed or the server's RSS grew by more than --max-rss-growth (10%).

    python benchmarks/bench_service.py [--seconds 30] [--clients 8] [--model MODEL] [--image IMAGE]

Without --model, a small calibrated model is fitted on generated images first (a few seconds). The image defaults
to an MVTec AD bottle test image (900 x 900) when ../shared holds it, else a generated one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

# The child-process server helper is a test helper (tests/child_server.py), not part of the library: import it from
# the repository's tests folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from child_server import serve_in_subprocess  # noqa: E402

BOTTLE_IMAGE = Path(__file__).resolve().parents[2] / "shared/data/mvtec_ad/bottle/test/broken_large/000.png"


def rss_mib(pid: int) -> float:
    """Resident memory of process `pid` in MiB (Linux: VmRSS in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def make_model(folder: Path) -> tuple[Path, Path]:
    """Fit a small calibrated model on generated images; return (model file, a defect test image)."""
    from spade_ad import Spade
    from spade_ad.data.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(folder, n_train=12, n_test_good=1, n_test_defect=1, size=(256, 256), seed=0)
    model = Spade(k_gallery=4, device="cpu", progress=False).fit(root / "train" / "good")
    return model.save(folder / "model.safetensors"), next((root / "test").glob("[!g]*/*.png"))


def post(session: requests.Session, url: str, image: bytes, name: str) -> str | None:
    """Post the image once; return None on success, else what went wrong."""
    try:
        response = session.post(f"{url}/v1/predict", files=[("files", (name, image))], timeout=120)
        if response.status_code == 200 and len(response.json()["results"]) == 1:
            return None
        return f"HTTP {response.status_code}: {response.text[:200]}"
    except (requests.RequestException, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"


def client(url: str, image: bytes, name: str, deadline: float, latencies: list[float], errors: list[str]) -> None:
    """Post the image in a loop until `deadline`; record each success's latency (s) and each failure."""
    with requests.Session() as session:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            failure = post(session, url, image, name)
            if failure is None:
                latencies.append(time.perf_counter() - started)
            else:
                errors.append(failure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the measured run")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--model", type=Path, help="model file (default: fit a small one on generated images)")
    parser.add_argument("--image", type=Path, help="image to post (default: a bottle image, else a generated one)")
    parser.add_argument("--workers", type=int, default=1, help="server inference threads")
    parser.add_argument("--max-queue", type=int, default=8, help="server queue places")
    parser.add_argument("--warmup", type=int, default=10, help="requests before the RSS baseline")
    parser.add_argument("--max-rss-growth", type=float, default=0.10, help="allowed RSS growth (fraction)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-service-") as folder:
        model, generated_image = (args.model, None) if args.model else make_model(Path(folder))
        image_path = args.image or (BOTTLE_IMAGE if BOTTLE_IMAGE.is_file() else generated_image)
        if image_path is None:
            parser.error("--image is needed with --model when the bottle data is absent")
        image = image_path.read_bytes()
        server_args = ("--workers", str(args.workers), "--max-queue", str(args.max_queue))
        with serve_in_subprocess(model, *server_args) as server:
            with requests.Session() as session:
                warmup = [post(session, server.url, image, image_path.name) for _ in range(args.warmup)]
            rss_before = rss_mib(server.process.pid)

            latencies: list[float] = []
            errors: list[str] = [failure for failure in warmup if failure is not None]
            deadline = time.monotonic() + args.seconds
            threads = [
                threading.Thread(target=client, args=(server.url, image, image_path.name, deadline, latencies, errors))
                for _ in range(args.clients)
            ]
            started = time.monotonic()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.monotonic() - started
            rss_after = rss_mib(server.process.pid)

    growth = rss_after / rss_before - 1
    p50, p99 = (np.percentile(latencies, [50, 99]) * 1000) if latencies else (float("nan"), float("nan"))
    print(f"image: {image_path.name} ({len(image) / 1024:.0f} KiB); {args.clients} clients, {elapsed:.1f} s, "
          f"server workers={args.workers} max_queue={args.max_queue}")
    print(f"requests: {len(latencies)} ok, {len(errors)} errors; throughput {len(latencies) / elapsed:.2f} req/s")
    print(f"latency: p50 {p50:.0f} ms, p99 {p99:.0f} ms")
    print(f"server RSS: {rss_before:.0f} MiB before, {rss_after:.0f} MiB after ({growth:+.1%})")
    for error in errors[:5]:
        print(f"error: {error}", file=sys.stderr)
    failed = bool(errors) or growth > args.max_rss_growth
    if failed:
        print(f"FAILED: errors must be 0 and RSS growth at most {args.max_rss_growth:.0%}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
