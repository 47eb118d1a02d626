"""SPADE in one ONNX graph (`spade-ad export --single-graph`) against the torch-free Python runtime
(`spade_ad.estimators.runtime`, a bundle scored with numpy + ONNX Runtime) on MVTec AD bottle, in one run.

1. Same answers: 20 bottle test images (5 of every kind) scored by the Python runtime and by the Node.js client
   (examples/node/score.mjs: onnxruntime-node, PNG decoding and Pillow's resize in JavaScript) and by the graph in
   Python's ONNX Runtime: the largest relative score difference, the largest map difference as a share of the
   map's range, verdicts that differ.
2. Speed, per image from the PNG file to score, verdict and map at the input size, rounds interleaved, median of
   `--rounds`: the Python runtime's `predict` (its default threads), the single graph in Python's ONNX Runtime
   (decode and resize by spade-ad, then one `session.run`), and the Node.js client (its own "ms" per image: decode,
   resize, run; the process start and the session's creation are stated apart). Ratios to the Python runtime.
3. Size: the graph file against the bundle's files.

    .venv/bin/python benchmarks/bench_single_graph.py [--model bottle.safetensors] [--rounds 3]

Without --model a default-settings model is fitted on bottle's 209 training images first (minutes). Writes
benchmarks/results/single_graph.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image

from spade_ad import Spade
from spade_ad.core.geometry import global_view_geometry, image_to_array, plan_geometry
from spade_ad.estimators.runtime import load_bundle
from spade_ad.export.bundle import export_bundle
from spade_ad.export.single_graph import export_single_graph, read_contract

ROOT = Path(__file__).resolve().parents[1]
BOTTLE = ROOT.parent / "shared" / "data" / "mvtec_ad" / "bottle"
RESULTS = ROOT / "benchmarks" / "results"
NODE_CLIENT = ROOT / "examples" / "node" / "score.mjs"


def test_images(per_kind: int = 5) -> list[Path]:
    return [p for kind in sorted((BOTTLE / "test").iterdir()) for p in sorted(kind.glob("*.png"))[:per_kind]]


class GraphInPython:
    """The single graph in Python's ONNX Runtime, fed as the runtime feeds its network (spade-ad's decode/resize)."""

    def __init__(self, graph: Path) -> None:
        self.session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        self.contract = read_contract(graph)

    def __call__(self, path: Path) -> list[np.ndarray]:
        image = Image.open(path).convert("RGB")
        c = self.contract
        geometry = plan_geometry((image.height, image.width), c["image_size"], c["resize"])
        feeds = {"image": _uint8(image_to_array(image, geometry))}
        view = global_view_geometry(geometry, c["image_size"], c["global_view"])
        if view is not None:
            feeds["global_image"] = _uint8(image_to_array(image, view))
        return self.session.run(None, feeds)


def _uint8(array: np.ndarray) -> np.ndarray:
    return np.round(array.transpose(1, 2, 0) * 255).astype(np.uint8)[None]


def run_node(graph: Path, images: list[Path], maps: Path | None = None) -> tuple[list[dict], float]:
    args = ["node", str(NODE_CLIENT), str(graph), *map(str, images)] + (["--maps", str(maps)] if maps else [])
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    return [json.loads(line) for line in done.stdout.splitlines()], time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="a fitted bottle model file (default: fit one)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("node") is None or not (NODE_CLIENT.parent / "node_modules" / "onnxruntime-node").is_dir():
        raise SystemExit("needs node and `npm install --ignore-scripts` in examples/node")
    work = Path(tempfile.mkdtemp(prefix="bench_single_graph."))
    model_path = args.model
    if model_path is None:
        model_path = work / "bottle.safetensors"
        Spade(device="cpu", progress=False).fit(BOTTLE / "train" / "good").save(model_path)
    started = time.perf_counter()
    bundle = export_bundle(model_path, work / "bottle.bundle")
    bundle_seconds = time.perf_counter() - started
    started = time.perf_counter()
    graph = export_single_graph(model_path, work / "bottle.onnx")
    graph_seconds = time.perf_counter() - started
    images = test_images()
    runtime = load_bundle(bundle)
    in_python = GraphInPython(graph)

    # 1. answers
    expected = runtime.predict(images)
    lines, _ = run_node(graph, images, work / "maps")
    python_outputs = [in_python(p) for p in images]
    agreement = {}
    for name, scores, maps, verdicts in (
        ("node", [line["score"] for line in lines], [np.load(line["map"]) for line in lines],
         [line["is_anomalous"] for line in lines]),
        ("graph_in_python", [float(o[0][0]) for o in python_outputs], [o[3][0] for o in python_outputs],
         [bool(o[1][0]) for o in python_outputs]),
    ):
        agreement[name] = {
            "max_relative_score_difference": max(abs(s - p.score) / abs(p.score) for s, p in zip(scores, expected)),
            "max_map_difference_share_of_range": max(
                float(np.abs(m - p.anomaly_map).max()) / float(p.anomaly_map.max() - p.anomaly_map.min())
                for m, p in zip(maps, expected)),
            "verdicts_differing": sum(v != p.is_anomalous for v, p in zip(verdicts, expected)),
            "images": len(images),
        }

    # 2. speed, interleaved rounds
    times: dict[str, list[float]] = {"python_runtime": [], "graph_in_python": [], "node": []}
    node_walls = []
    for _ in range(args.rounds):
        started = time.perf_counter()
        runtime.predict(images)
        times["python_runtime"].append((time.perf_counter() - started) / len(images))
        started = time.perf_counter()
        for p in images:
            in_python(p)
        times["graph_in_python"].append((time.perf_counter() - started) / len(images))
        lines, wall = run_node(graph, images)
        times["node"].append(float(np.mean([line["ms"] for line in lines])) / 1000)
        node_walls.append(wall)
    per_image = {name: float(np.median(values)) for name, values in times.items()}
    base = per_image["python_runtime"]
    node_overhead = float(np.median(node_walls)) - per_image["node"] * len(images)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads(),
                    "load_average_1min": round(os.getloadavg()[0], 1),
                    "onnxruntime_python": ort.__version__,
                    "node": subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()},
        "images": len(images), "rounds": args.rounds,
        "agreement": agreement,
        "seconds_per_image": per_image,
        "ratio_to_python_runtime": {name: value / base for name, value in per_image.items()},
        "node_start_and_session_seconds": node_overhead,
        "export_seconds": {"bundle": bundle_seconds, "single_graph": graph_seconds},
        "bytes": {"single_graph": graph.stat().st_size,
                  **{f"bundle/{p.name}": p.stat().st_size for p in sorted(bundle.iterdir())}},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "single_graph.json").write_text(json.dumps(result, indent=2) + "\n")
    md = ["# SPADE in one ONNX graph vs the Python runtime (bottle, default settings)", "",
          f"{len(images)} bottle test images, {args.rounds} interleaved rounds (median), {result['machine']}.", "",
          "| path | s / image | ratio to the Python runtime |", "|---|---|---|"]
    md += [f"| {name} | {value:.3f} | {result['ratio_to_python_runtime'][name]:.2f} |"
           for name, value in per_image.items()]
    md += ["", f"Node.js process start + session creation: {node_overhead:.2f} s (once per run).", "",
           "| compared with the Python runtime | max relative score diff | max map diff / range | verdicts differing |",
           "|---|---|---|---|"]
    md += [f"| {name} | {a['max_relative_score_difference']:.2e} | {a['max_map_difference_share_of_range']:.2e} | "
           f"{a['verdicts_differing']} |" for name, a in agreement.items()]
    md += ["", "| file | MB |", "|---|---|"]
    md += [f"| {name} | {size / 2**20:.1f} |" for name, size in result["bytes"].items()]
    (RESULTS / "single_graph.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
