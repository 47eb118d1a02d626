"""What the per-image files cost against scoring, and where the start-up goes (issue 30).

1. Per image, in one run (in rounds; medians): the library's `model.predict(images, original_size=True)` in this
   process, against `spade-ad predict` on the same images with each output set (`--outputs none`, the default
   `overlay,mask`, `all`), each a fresh process; for the command, the time to its first scored image (the first
   row of scores.csv, polled every 5 ms) and the time per image after it ((end - first row) / (n - 1): the rest of
   the run, the wait for the last files and the exit included). With `--baseline-src DIR` (a source tree of an
   earlier commit, e.g. from `git archive`), the command as it was there is run too, on the same images and in the
   same run.
2. `--startup`: where the time before the first result goes, in a fresh interpreter: the imports (the CLI; numpy and
   Pillow; torch; timm; scikit-learn; the rest of the model), opening the model file, the first image and a second
   one.
3. `--in-process`: the same without the command's start-up: the library against `PredictionWriter` in this
   process, with each output set and with the default set written on the caller's thread (no pool), interleaved.
4. `--levels`: PNG encoders and zlib levels, size against encoding time, on the overlays, masks and heat maps of
   real predictions: Pillow's and `spade_ad.outputs.png.encode_png` (what chose it and `PNG_LEVEL`).

The machine is shared: compare the figures of one run only (ratios); the load average is printed before and after.
Results: benchmarks/results/outputs.json and outputs.md.

    python benchmarks/bench_outputs.py [--images 20] [--rounds 2] [--startup] [--in-process] [--levels]
        [--baseline-src DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("/work/shared/data")
PRODUCTS = {  # name: (training images, test images)
    "bottle": (DATA / "mvtec_ad" / "bottle" / "train" / "good", DATA / "mvtec_ad" / "bottle" / "test"),
    "metal_plate": (DATA / "mpdd_metal_plate" / "train" / "good", DATA / "mpdd_metal_plate" / "test"),
}
OUTPUT_SETS = ("none", "default", "all")
RESULTS = ROOT / "benchmarks" / "results"


def _model(name: str, cache: Path) -> Path:
    target = cache / f"{name}.safetensors"
    if not target.exists():
        from spade_ad import Spade

        print(f"fitting {name} (default settings) ...", flush=True)
        Spade(device="cpu", progress=False).fit(PRODUCTS[name][0]).save(target)
    return target


def _images(name: str, count: int) -> list[Path]:
    """`count` test images spread over the defect kinds and the good ones (sorted, every k-th)."""
    found = sorted(p for p in PRODUCTS[name][1].rglob("*.png"))
    step = max(1, len(found) // count)
    return found[::step][:count]


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _library(model_path: Path, images: list[Path]) -> float:
    """Seconds per image of `predict(original_size=True)` after a warm-up."""
    from spade_ad.estimators.opening import open_model

    model = open_model(model_path)
    model.set_params(progress=False)
    model.predict(images[:2], original_size=True)
    started = time.perf_counter()
    model.predict(images, original_size=True)
    return (time.perf_counter() - started) / len(images)


def _command(model_path: Path, images: list[Path], out: Path, outputs: str | None,
             src: Path | None = None) -> dict[str, float]:
    """One `spade-ad predict` run: seconds to its first row of scores.csv, seconds per image after it, total."""
    command = [sys.executable, "-m", "spade_ad", "predict", str(model_path), *map(str, images), "-o", str(out),
               "--overwrite"]
    if outputs is not None:
        command += ["--outputs", outputs]
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    scores = out / "scores.csv"
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    while process.poll() is None:
        if first is None and scores.is_file():
            with open(scores, "rb") as handle:
                if handle.read().count(b"\n") >= 2:
                    first = time.perf_counter() - started
        time.sleep(0.005)
    total = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"spade-ad predict failed: {process.stderr.read() if process.stderr else ''}")
    first = total if first is None else first
    return {"first_result_s": first, "per_image_s": (total - first) / max(1, len(images) - 1), "total_s": total}


def bench_per_image(model_path: Path, images: list[Path], baseline_src: Path | None,
                    rounds: int = 2) -> dict[str, object]:
    """`rounds` rounds of: the library, then the command with each output set (and the baseline's); each figure is
    the median over the rounds, so that a busy moment of the shared machine weighs on no run alone."""
    rows: dict[str, object] = {"load_before": _load(), "images": len(images), "rounds": rounds}
    runs = [(f"--outputs {name}", name, None) for name in OUTPUT_SETS]
    if baseline_src is not None:
        runs.insert(0, ("before (baseline)", None, baseline_src))
    library: list[float] = []
    measured: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(rounds):
            library.append(_library(model_path, images))
            print(f"  round {round_ + 1}: library {library[-1]:.3f} s per image (load {_load()})", flush=True)
            for label, outputs, src in runs:
                out = Path(tmp) / f"{label.replace(' ', '_').replace('(', '').replace(')', '')}-{round_}"
                run = _command(model_path, images, out, outputs, src)
                run["files_mb"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
                measured[label].append(run)
                print(f"  round {round_ + 1}: {label:18s} first result {run['first_result_s']:6.2f} s, per image "
                      f"{run['per_image_s']:.3f} s, {run['files_mb']:.1f} MB", flush=True)
    rows["library_per_image_s"] = statistics.median(library)
    rows["library_rounds_s"] = library
    for label, found in measured.items():
        run = {key: statistics.median(r[key] for r in found) for key in found[0]}
        run["ratio_to_library"] = run["per_image_s"] / rows["library_per_image_s"]  # type: ignore[operator]
        run["rounds"] = found  # type: ignore[assignment]
        rows[label] = run
        print(f"  {label:22s} first result {run['first_result_s']:6.2f} s, per image {run['per_image_s']:.3f} s "
              f"= {run['ratio_to_library']:.2f} x the library ({rows['library_per_image_s']:.3f} s), "
              f"{run['files_mb']:.1f} MB (medians)", flush=True)
    rows["load_after"] = _load()
    return rows


def bench_in_process(model_path: Path, images: list[Path], rounds: int = 3) -> dict[str, object]:
    """The per-image cost of the files without the command's start-up, in this process: the library's predict
    against `PredictionWriter` with each output set (pool of the default size) and the default set written on the
    caller's thread (`workers=0`), interleaved for `rounds` rounds; the fastest round of each (the one least
    disturbed by the other users of a shared machine) and the median."""
    from spade_ad.estimators.opening import open_model
    from spade_ad.outputs.writers import PredictionWriter

    model = open_model(model_path)
    model.set_params(progress=False)
    model.predict(images[:2], original_size=True)

    def writing(outputs: str, workers: int | None = None) -> Any:
        def run() -> None:
            with tempfile.TemporaryDirectory() as tmp:
                with PredictionWriter.for_model(model, tmp, outputs=outputs, workers=workers) as writer:
                    writer.write_all(model.iter_predict(images, original_size=True, keep_images=True))
        return run

    runs: dict[str, Any] = {"library": lambda: model.predict(images, original_size=True)}
    runs.update({f"writer, --outputs {name}": writing(name) for name in OUTPUT_SETS})
    runs["writer, --outputs default, no pool"] = writing("default", workers=0)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    rows: dict[str, object] = {"load_before": _load(), "images": len(images), "rounds": rounds}
    for _ in range(rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            seconds[name].append((time.perf_counter() - started) / len(images))
    fastest_library, median_library = min(seconds["library"]), statistics.median(seconds["library"])
    for name, found in seconds.items():
        rows[name] = {"fastest_s": min(found), "median_s": statistics.median(found), "rounds_s": found,
                      "fastest_ratio": min(found) / fastest_library,
                      "median_ratio": statistics.median(found) / median_library}
        print(f"  {name:36s} fastest {min(found):.3f} s = {min(found) / fastest_library:.2f} x, median "
              f"{statistics.median(found):.3f} s = {statistics.median(found) / median_library:.2f} x", flush=True)
    rows["load_after"] = _load()
    return rows


_PHASES = r"""
import json, sys, time
t = [time.perf_counter()]
import spade_ad.apps.cli; t.append(time.perf_counter())
import numpy, PIL.Image; t.append(time.perf_counter())
import torch; t.append(time.perf_counter())
import timm; t.append(time.perf_counter())
import sklearn.base; t.append(time.perf_counter())
import spade_ad.estimators.spade, spade_ad.outputs.writers; t.append(time.perf_counter())
from spade_ad.estimators.opening import open_model
model = open_model(sys.argv[1]); model.set_params(progress=False); t.append(time.perf_counter())
next(model.iter_predict([sys.argv[2]], original_size=True, keep_images=True)); t.append(time.perf_counter())
next(model.iter_predict([sys.argv[2]], original_size=True, keep_images=True)); t.append(time.perf_counter())
names = ["import the CLI", "import numpy, Pillow", "import torch", "import timm (torchvision)",
         "import scikit-learn", "import the rest", "open the model", "first image", "second image"]
print(json.dumps(dict(zip(names, [b - a for a, b in zip(t, t[1:])]))))
"""


def bench_startup(model_path: Path, image: Path, src: Path | None = None) -> dict[str, float]:
    """Where the time before the first result goes, in a fresh interpreter (after one run to warm the disk)."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import spade_ad.estimators.spade"], env=env, check=True, capture_output=True)
    interpreter = time.perf_counter() - started
    done = subprocess.run([sys.executable, "-c", _PHASES, str(model_path), str(image)], env=env, check=True,
                          capture_output=True, text=True)
    phases = json.loads(done.stdout.strip().splitlines()[-1])
    for name, seconds in phases.items():
        print(f"  {name:26s} {seconds:6.2f} s", flush=True)
    phases["(warm-up run: python -c 'import spade_ad.estimators.spade')"] = interpreter
    return phases


def bench_levels(model_path: Path, images: list[Path], rounds: int = 5) -> dict[str, dict[str, list[float]]]:
    """Per encoder and zlib level: the fastest of `rounds` encodings (ms, interleaved, so that a busy moment of the
    shared machine hurts none more than another) and the mean kB, over the overlays, masks and heat maps of
    `images`: Pillow's encoder and `spade_ad.outputs.png.encode_png`."""
    import numpy as np
    from PIL import Image

    from spade_ad.estimators.opening import open_model
    from spade_ad.outputs.png import encode_png
    from spade_ad.outputs.visualize import heatmap, overlay_picture, threshold_color_range

    model = open_model(model_path)
    model.set_params(progress=False)
    pictures: dict[str, list[Image.Image]] = {"overlay": [], "mask": [], "heatmap": []}
    for prediction in model.iter_predict(images, original_size=True, keep_images=True):
        pictures["overlay"].append(overlay_picture(prediction))
        mask = prediction.defect_mask
        if mask is not None:
            pictures["mask"].append(Image.fromarray(mask.astype("uint8") * 255))
        vmin, vmax = threshold_color_range(prediction.pixel_threshold) or (None, None)
        pictures["heatmap"].append(heatmap(prediction.original_map, vmin, vmax))

    def pillow(picture: Image.Image, level: int) -> int:
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG", compress_level=level)
        return buffer.tell()

    encoders = {f"Pillow {level}": (lambda p, lv=level: pillow(p, lv)) for level in (1, 6)}
    encoders.update({f"encode_png {level}": (lambda p, lv=level: len(encode_png(np.asarray(p), lv)))
                     for level in (0, 1, 2, 3)})  # ISA-L levels
    table: dict[str, dict[str, list[float]]] = {}
    for kind, shown in pictures.items():
        best = {name: [float("inf")] * len(shown) for name in encoders}
        sizes = {name: [0] * len(shown) for name in encoders}
        for _ in range(rounds):
            for name, encode in encoders.items():
                for i, picture in enumerate(shown):
                    started = time.perf_counter()
                    sizes[name][i] = encode(picture)
                    best[name][i] = min(best[name][i], time.perf_counter() - started)
        table[kind] = {name: [1000 * sum(best[name]) / len(shown), sum(sizes[name]) / len(shown) / 1000]
                       for name in encoders}
        print(f"  {kind:8s} " + "  ".join(f"{name}: {ms:5.1f} ms {kb:5.0f} kB"
                                          for name, (ms, kb) in table[kind].items()), flush=True)
    return table


def _markdown(results: dict[str, object]) -> str:
    lines = ["# Outputs benchmark (benchmarks/bench_outputs.py)", "",
             f"Machine: {os.cpu_count()} cores; compare figures within this run only.", ""]
    for name, rows in results.get("per_image", {}).items():  # type: ignore[union-attr]
        lines += [f"## {name} ({rows['images']} images; load {rows['load_before']} -> {rows['load_after']})", "",
                  f"library predict(original_size=True): {rows['library_per_image_s']:.3f} s per image (median of "
                  f"{', '.join(f'{v:.3f}' for v in rows['library_rounds_s'])}); the runs' figures are medians "
                  f"over {rows['rounds']} rounds", "",
                  "| run | first result (s) | per image after it (s) | x library | files (MB) |",
                  "|---|---|---|---|---|"]
        for label, run in rows.items():
            if isinstance(run, dict):
                lines.append(f"| {label} | {run['first_result_s']:.2f} | {run['per_image_s']:.3f} | "
                             f"{run['ratio_to_library']:.2f} | {run['files_mb']:.1f} |")
        lines.append("")
    for name, rows in results.get("in_process", {}).items():  # type: ignore[union-attr]
        lines += [f"## {name}, in process ({rows['images']} images, {rows['rounds']} rounds; load "
                  f"{rows['load_before']} -> {rows['load_after']})", "",
                  "| run | fastest round (s per image) | x library | median (s per image) | x library |",
                  "|---|---|---|---|---|"]
        for label, run in rows.items():
            if isinstance(run, dict):
                lines.append(f"| {label} | {run['fastest_s']:.3f} | {run['fastest_ratio']:.2f} | "
                             f"{run['median_s']:.3f} | {run['median_ratio']:.2f} |")
        lines.append("")
    for label, phases in results.get("startup", {}).items():  # type: ignore[union-attr]
        lines += [f"## Start-up: {label}", "", "| phase | seconds |", "|---|---|"]
        lines += [f"| {name} | {seconds:.2f} |" for name, seconds in phases.items()]
        lines.append("")
    for name, table in results.get("levels", {}).items():  # type: ignore[union-attr]
        lines += [f"## PNG encoders and zlib levels: {name} (ms to encode, fastest of 5 / kB)", "", "| file | " +
                  " | ".join(next(iter(table.values()))) + " |",
                  "|---|" + "---|" * len(next(iter(table.values())))]
        for kind, levels in table.items():
            lines.append(f"| {kind} | " + " | ".join(f"{ms:.1f} ms / {kb:.0f} kB" for ms, kb in levels.values()) +
                         " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20, help="images per product [default: 20]")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the per-image comparison [default: 2]")
    parser.add_argument("--products", nargs="+", default=list(PRODUCTS), choices=list(PRODUCTS))
    parser.add_argument("--baseline-src", type=Path, default=None,
                        help="a source folder (holding spade_ad/) of an earlier commit to run the command from too")
    parser.add_argument("--startup", action="store_true", help="also split the start-up into its phases")
    parser.add_argument("--levels", action="store_true", help="also measure the PNG levels")
    parser.add_argument("--no-per-image", action="store_true", help="skip the per-image comparison")
    parser.add_argument("--in-process", action="store_true",
                        help="also compare the library with the writer in this process (no start-up)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "spade-outputs-bench",
                        help="where the fitted models are kept between runs")
    parser.add_argument("--out", type=Path, default=RESULTS / "outputs", help="results file stem")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, object]] = {"per_image": {}, "in_process": {}, "startup": {}, "levels": {}}
    for name in args.products:
        model_path = _model(name, args.cache)
        images = _images(name, args.images)
        if not args.no_per_image:
            print(f"{name}: per image ({len(images)} images, load {_load()})", flush=True)
            results["per_image"][name] = bench_per_image(model_path, images, args.baseline_src, args.rounds)
        if args.in_process:
            print(f"{name}: in process ({len(images)} images, load {_load()})", flush=True)
            results["in_process"][name] = bench_in_process(model_path, images, max(3, args.rounds))
        if args.startup:
            print(f"{name}: start-up (load {_load()})", flush=True)
            results["startup"][f"{name}, this tree"] = bench_startup(model_path, images[0])
            if args.baseline_src is not None:
                print(f"{name}: start-up of the baseline (load {_load()})", flush=True)
                results["startup"][f"{name}, baseline"] = bench_startup(model_path, images[0], args.baseline_src)
        if args.levels:
            print(f"{name}: PNG levels (load {_load()})", flush=True)
            results["levels"][name] = bench_levels(model_path, images[:6])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(_markdown(results), encoding="utf-8")
    print(f"written {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
