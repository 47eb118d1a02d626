"""Deployment: the torch path vs the torch-free runtime (ONNX Runtime, OpenVINO) on MVTec AD bottle, in one run.

1. Same answers: every bottle test image scored by the torch model and by the bundle on each engine; the largest
   relative image-score difference, the largest map difference as a share of the map's range, verdicts that differ.
2. Speed: predict per image (decode to verdict and map at the original size) on each path, rounds interleaved
   (median of `--rounds`), and the backbone alone (224 x 224, batch 1) on torch, ONNX Runtime and OpenVINO, as
   ratios to torch measured in the same run.
3. Footprint (`--venv`): a fresh venv with `pip install spade-ad[runtime]` only: its size on disk, `spade-ad
   predict BUNDLE` on one image (wall time from the command's start), and `spade-ad serve BUNDLE` idle RSS.

    .venv/bin/python benchmarks/bench_runtime.py [--images 83] [--rounds 3] [--venv]

Writes benchmarks/results/runtime.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from spade_ad import Spade
from spade_ad.data.datasets import load_mvtec_category
from spade_ad.estimators.runtime import load_bundle
from spade_ad.export.bundle import export_bundle

ROOT = Path(__file__).resolve().parents[1]
BOTTLE = ROOT.parent / "shared" / "data" / "mvtec_ad" / "bottle"
RESULTS = ROOT / "benchmarks" / "results"


def agreement(expected: list, got: list) -> dict[str, float]:
    score = max(abs(b.score - a.score) / abs(a.score) for a, b in zip(expected, got))
    maps = max(float(np.nanmax(np.abs(a.original_map - b.original_map))) /
               float(np.nanmax(a.original_map) - np.nanmin(a.original_map)) for a, b in zip(expected, got))
    verdicts = sum(a.is_anomalous != b.is_anomalous for a, b in zip(expected, got))
    return {"max_relative_score_difference": score, "max_map_difference_share_of_range": maps,
            "verdicts_differing": int(verdicts), "images": len(expected)}


def backbone_speed(model: Spade, bundle: Path, repeats: int) -> dict[str, float]:
    """Seconds per 224 x 224 image (batch 1) of the backbone alone, interleaved, median."""
    from spade_ad.estimators.runtime.engines import OnnxRuntimeBackbone, OpenVinoBackbone

    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    engines = {"torch": lambda: model.backbone_(x), "onnxruntime": OnnxRuntimeBackbone(bundle / "backbone.onnx"),
               "openvino": OpenVinoBackbone(bundle / "backbone.xml")}
    array = x.numpy()
    calls = {name: (engine if name == "torch" else (lambda e=engine: e(array))) for name, engine in engines.items()}
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def runtime_venv(bundle: Path, image: Path, work: Path) -> dict[str, float]:
    """Size of a runtime-only venv, a one-image predict's wall time, and the service's idle RSS on the bundle."""
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "*.egg-info", "demo_out",
                                                                "__pycache__", "benchmarks", "tests"))
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{source}[runtime,serve]"],
                   check=True)
    size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())
    start = time.perf_counter()
    subprocess.run([str(venv / "bin" / "spade-ad"), "predict", str(bundle), str(image), "-o", str(work / "out")],
                   check=True, capture_output=True)
    one_image = time.perf_counter() - start
    port = free_port()
    server = subprocess.Popen([str(venv / "bin" / "spade-ad"), "serve", str(bundle), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import requests

        for _ in range(600):
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
        time.sleep(2)
        status = Path(f"/proc/{server.pid}/status").read_text()
        rss = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) * 1024
    finally:
        server.terminate()
        server.wait(10)
    return {"venv_mb": size / 2**20, "predict_one_image_s": one_image, "service_idle_rss_mb": rss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=83)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--venv", action="store_true", help="Also measure a fresh runtime-only venv.")
    args = parser.parse_args()
    data = load_mvtec_category(BOTTLE)
    paths = [s.path for s in data.test][:args.images]
    work = Path(tempfile.mkdtemp(prefix="bench-runtime-"))
    try:
        start = time.perf_counter()
        model = Spade(progress=False, device="cpu").fit(data.train)
        fit_s = time.perf_counter() - start
        model.save(work / "bottle.safetensors")
        start = time.perf_counter()
        bundle = export_bundle(work / "bottle.safetensors", work / "bottle.bundle", format="openvino")
        export_s = time.perf_counter() - start
        predictors = {"torch": model, "onnxruntime": load_bundle(bundle),
                      "openvino": load_bundle(bundle, engine="openvino")}
        paths_by_name = {name: (lambda p=p: p.predict(paths, original_size=True)) for name, p in predictors.items()}
        results, times = {}, {name: [] for name in paths_by_name}
        for round_ in range(args.rounds):
            for name, run in paths_by_name.items():
                start = time.perf_counter()
                predictions = run()
                times[name].append((time.perf_counter() - start) / len(paths))
                if round_ == 0:
                    results[name] = predictions
        per_image = {name: float(np.median(t)) for name, t in times.items()}
        report = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
            "images": len(paths), "fit_s": fit_s, "export_s": export_s,
            "bundle_mb": {p.name: p.stat().st_size / 2**20 for p in sorted(bundle.iterdir())},
            "agreement": {name: agreement(results["torch"], results[name]) for name in ("onnxruntime", "openvino")},
            "predict_ms_per_image": {name: 1000 * v for name, v in per_image.items()},
            "predict_ratio_to_torch": {name: v / per_image["torch"] for name, v in per_image.items()},
            "backbone_ms": {name: 1000 * v for name, v in backbone_speed(model, bundle, 30).items()},
        }
        report["backbone_ratio_to_torch"] = {name: v / report["backbone_ms"]["torch"]
                                             for name, v in report["backbone_ms"].items()}
        if args.venv:
            report["runtime_venv"] = runtime_venv(bundle, paths[0], work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "runtime.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| path | predict ms / image | ratio to torch | backbone ms (224x224) | ratio | max score diff (rel) | "
             "max map diff (share of range) | verdicts differing |", "|---|---|---|---|---|---|---|---|"]
    for name in ("torch", "onnxruntime", "openvino"):
        agree = report["agreement"].get(name, {})
        lines.append(
            f"| {name} | {report['predict_ms_per_image'][name]:.0f} | {report['predict_ratio_to_torch'][name]:.2f} | "
            f"{report['backbone_ms'][name]:.1f} | {report['backbone_ratio_to_torch'][name]:.2f} | "
            f"{agree.get('max_relative_score_difference', 0):.1e} | "
            f"{agree.get('max_map_difference_share_of_range', 0):.1e} | {agree.get('verdicts_differing', 0)} |")
    if "runtime_venv" in report:
        v = report["runtime_venv"]
        lines.append(f"\nRuntime-only venv: {v['venv_mb']:.0f} MB; `spade-ad predict BUNDLE` on one image "
                     f"{v['predict_one_image_s']:.1f} s from the command's start; `spade-ad serve BUNDLE` idle RSS "
                     f"{v['service_idle_rss_mb']:.0f} MB.")
    (RESULTS / "runtime.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
