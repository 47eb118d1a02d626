"""Predict throughput: images per second and the ratio to the network alone, in one run.

In-process, per device (CPU; CUDA when there is one) and batch size (1, 8, 32): on the same N bottle test images
(900 x 900 PNG, cycled to N), in interleaved rounds (median of `--rounds`):

- network alone: the backbone (pyramid and global view) on batches already decoded, resized and on the device;
- predict from decoded images: `iter_predict` of in-memory images with original-size maps (what writing needs);
- predict from files: the same from the PNG files (decoding in the loader threads included).

On the CPU the same configurations also run the code before issue 23 (`--old REV`, default the commit before it:
its `src` exported by `git archive` into a temporary folder and imported first) in the same rounds, so that "not
slower" is read from one run; and the batched device pipeline forced on the CPU (`Spade._device_pipeline`), which
shows why the CPU keeps its numpy search. On CUDA the maps are compared with the CPU path's (largest difference
over the range) and the verdicts counted.

With `--ray`, `benchmarks/bench_ray.py` runs plain predict and Ray with 1 and 2 actors on 200 images with
--save-maps (each in its own process; the pictures written by the actors), and the scores.csv files are compared
byte for byte (with the plain run at the actors' thread count, one; and at its default).

    python benchmarks/bench_throughput.py [--model M] [--images 24] [--device cpu cuda] [--ray] [--out FILE]

Results: benchmarks/results/throughput.json (`--out` for another file; `benchmarks/gpu_check.sh` writes its own).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "bottle"
RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
#: The commit before issue 23's changes: the CPU path's "old code".
OLD_REV = "12dcc4b"


# ---------------------------------------------------------------- child: one round of every configuration


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_round(model_path: Path, files: list[Path], device: str, batch_sizes: list[int],
              forced: bool = False) -> dict[str, dict[str, float]]:
    """Seconds per image of each configuration (network / decoded / files), once, after a warm-up."""
    from PIL import Image

    import spade_ad
    from spade_ad import load
    from spade_ad.core.features import extract, iter_batches
    from spade_ad.data.inputs import ImageItem

    model = load(model_path, device=device)
    model.progress = False
    if forced:
        model._device_pipeline = True
    images = [Image.open(f).convert("RGB") for f in files]
    decoded = [ImageItem(f"{i:04d}.png", image=image) for i, image in enumerate(images)]
    paths = [ImageItem(f"{i:04d}.png", path=f) for i, f in enumerate(files)]
    out: dict[str, dict[str, float]] = {}
    for batch_size in batch_sizes:
        model.batch_size = batch_size
        batches = list(iter_batches(decoded, image_size=model.image_size, resize=model.resize,
                                    global_view=model.global_view, batch_size=batch_size, device=model.device_,
                                    progress=False))
        for batch in batches:  # warm-up (cuDNN's algorithm choice, the store's device copy, the pools)
            extract(model.backbone_, batch, model.patch_size)
        list(model.iter_predict(decoded[:2 * batch_size], original_size=True))
        _sync(model.device_)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        for batch in batches:
            extract(model.backbone_, batch, model.patch_size)
        _sync(model.device_)
        timings["network"] = (time.perf_counter() - start) / len(files)
        for name, items in (("decoded", decoded), ("files", paths)):
            start = time.perf_counter()
            for _ in model.iter_predict(items, original_size=True):
                pass
            _sync(model.device_)
            timings[name] = (time.perf_counter() - start) / len(files)
        out[str(batch_size)] = timings
    out["_code"] = {"spade_ad": str(Path(spade_ad.__file__).parent)}  # type: ignore[dict-item]
    return out


def old_package(rev: str, folder: Path) -> Any:
    """The spade_ad of commit `rev`, imported beside this one as `spade_ad_old` (its few absolute imports renamed)."""
    import importlib

    source = Path(_old_source(rev, folder)) / "spade_ad"
    target = folder / "packages" / "spade_ad_old"
    target.parent.mkdir(parents=True, exist_ok=True)
    source.rename(target)
    for module in target.rglob("*.py"):
        text = module.read_text()
        module.write_text(text.replace("from spade_ad.", "from spade_ad_old.").replace("from spade_ad import",
                                                                                     "from spade_ad_old import"))
    sys.path.insert(0, str(target.parent))
    return importlib.import_module("spade_ad_old")


def cpu_old_and_new(model_new: Path, model_old: Path, files: list[Path], batch_sizes: list[int], rounds: int,
                    old: Any) -> dict[str, Any]:
    """The CPU path before and after, in this one process, alternating (new, old / old, new) batch size by batch
    size in every round, so that both meet the same load: seconds per image from decoded images and from files
    (median and best of the rounds) and the network alone once per round."""
    import importlib

    from PIL import Image

    new = importlib.import_module("spade_ad")
    packages = {"new": (new, model_new), "old": (old, model_old)}
    images = [Image.open(f).convert("RGB") for f in files]
    setups = {}
    for name, (package, path) in packages.items():
        from importlib.util import find_spec

        moved = find_spec(f"{package.__name__}.core") is not None  # an old checkout has the flat layout
        inputs = importlib.import_module(f"{package.__name__}.{'data.inputs' if moved else 'inputs'}")
        pyramid = importlib.import_module(f"{package.__name__}.{'core.features' if moved else 'pyramid'}")
        model = package.load(path, device="cpu")
        model.progress = False
        setups[name] = (model, pyramid, [inputs.ImageItem(f"{i:04d}.png", image=im) for i, im in enumerate(images)],
                        [inputs.ImageItem(f"{i:04d}.png", path=f) for i, f in enumerate(files)])
        list(model.iter_predict(setups[name][2][:8], original_size=True))  # warm-up
    times: dict[str, dict[str, dict[str, list[float]]]] = {
        name: {str(b): {"network": [], "decoded": [], "files": []} for b in batch_sizes} for name in packages}
    for round_ in range(rounds):
        for batch_size in batch_sizes:
            for name in (("new", "old") if round_ % 2 == 0 else ("old", "new")):
                model, pyramid, decoded, paths = setups[name]
                model.batch_size = batch_size
                batches = list(pyramid.iter_batches(decoded, image_size=model.image_size, resize=model.resize,
                                                    global_view=model.global_view, batch_size=batch_size,
                                                    device=model.device_, progress=False))
                start = time.perf_counter()
                for batch in batches:
                    pyramid.extract(model.backbone_, batch, model.patch_size)
                times[name][str(batch_size)]["network"].append((time.perf_counter() - start) / len(files))
                for source, items in (("decoded", decoded), ("files", paths)):
                    start = time.perf_counter()
                    for _ in model.iter_predict(items, original_size=True):
                        pass
                    times[name][str(batch_size)][source].append((time.perf_counter() - start) / len(files))
        print(f"cpu old and new, round {round_ + 1} of {rounds}", flush=True)
    report: dict[str, Any] = {}
    for name, by_batch in times.items():
        report[name] = {batch: {source: {"median_ms": round(statistics.median(v) * 1000, 1),
                                         "best_ms": round(min(v) * 1000, 1),
                                         "images_per_s_median": round(1 / statistics.median(v), 2)}
                                for source, v in row.items()} for batch, row in by_batch.items()}
    report["new_over_old_images_per_s"] = {
        batch: {source: {"median": round(statistics.median(times["old"][batch][source])
                                         / statistics.median(times["new"][batch][source]), 3),
                         "best": round(min(times["old"][batch][source]) / min(times["new"][batch][source]), 3)}
                for source in ("decoded", "files")} for batch in map(str, batch_sizes)}
    report["code"] = {"new": str(Path(new.__file__).parent), "old": str(Path(old.__file__).parent)}
    return report


def compare_maps(model_path: Path, files: list[Path], device: str) -> dict[str, Any]:
    """Maps on `device` against the CPU path's: largest |difference| / range, and verdicts that differ."""
    import numpy as np

    from spade_ad import load

    cpu = load(model_path, device="cpu").predict(files)
    other = load(model_path, device=device).predict(files)
    worst = max(float(np.abs(a.anomaly_map - b.anomaly_map).max()) / (float(np.ptp(b.anomaly_map)) or 1.0)
                for a, b in zip(other, cpu))
    return {"max_map_difference_over_range": float(f"{worst:.3g}"),
            "verdicts_differing": sum(a.is_anomalous != b.is_anomalous for a, b in zip(other, cpu)),
            "images": len(files)}


# ---------------------------------------------------------------- parent


def _child(code: str | None, args: list[str]) -> dict[str, Any]:
    """This script as a child process, importing spade_ad from `code` (a src folder) when given."""
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = code + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"child failed: {args}\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _old_source(rev: str, folder: Path) -> str:
    """The src folder of commit `rev`, exported into `folder`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return str(folder / "src")


def _summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over rounds: ms per image, images/s and the ratio to the network, per batch size and source."""
    table: dict[str, Any] = {}
    for batch in (k for k in rounds[0] if not k.startswith("_")):
        row: dict[str, Any] = {}
        for name in ("network", "decoded", "files"):
            seconds = statistics.median(r[batch][name] for r in rounds)
            row[name] = {"ms_per_image": round(seconds * 1000, 2), "images_per_s": round(1 / seconds, 1)}
        for name in ("decoded", "files"):
            row[name]["ratio_to_network"] = round(row[name]["ms_per_image"] / row["network"]["ms_per_image"], 2)
        table[batch] = row
    table["code"] = rounds[0]["_code"]["spade_ad"]
    return table


def bench_inprocess(model: Path, files: list[Path], devices: list[str], batch_sizes: list[int], rounds: int,
                    old_rev: str | None, work: Path, train: Path) -> dict[str, Any]:
    listed = [str(f) for f in files]
    report: dict[str, Any] = {}
    for device in devices:
        variants: dict[str, str | None] = {"new": None}
        models = {"new": model}
        if device == "cpu" and old_rev:
            variants["old"] = _old_source(old_rev, work)
            # The old code's own model file (its settings table may lack a setting added since), fitted by it on
            # the same images with its defaults.
            models["old"] = work / "old_model.safetensors"
            print(f"fitting the old code's model ({old_rev}) ...", flush=True)
            _child(variants["old"], ["--child", "fit", "--train", str(train), "--model", str(models["old"])])
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
        forced: list[dict[str, Any]] = []
        for round_ in range(rounds):
            for name, code in variants.items():  # interleaved: new, old, new, old, ...
                print(f"{device} round {round_ + 1}: {name} ...", flush=True)
                runs[name].append(_child(code, ["--child", "round", "--model", str(models[name]), "--device", device,
                                                "--batch-sizes", *map(str, batch_sizes), "--files", *listed]))
            if device == "cpu":
                forced.append(_child(None, ["--child", "forced", "--model", str(model), "--device", device,
                                            "--batch-sizes", "8", "--files", *listed]))
        report[device] = {name: _summary(found) for name, found in runs.items()}
        if forced:
            report[device]["batched_torch_pipeline_forced"] = _summary(forced)
        if "old" in report[device]:
            report[device]["new_over_old_images_per_s"] = {
                batch: {source: round(report[device]["new"][batch][source]["images_per_s"]
                                      / report[device]["old"][batch][source]["images_per_s"], 3)
                        for source in ("network", "decoded", "files")}
                for batch in map(str, batch_sizes)}
        if device != "cpu":
            report[device]["against_cpu"] = _child(None, ["--child", "compare", "--model", str(model),
                                                          "--device", device, "--files", *listed])
    return report


def bench_ray(model: Path, images: int) -> dict[str, Any]:
    """bench_ray.py's runs with --save-maps (plain, plain on one torch thread, Ray x1, Ray x2), pictures only."""
    subprocess.run([sys.executable, str(Path(__file__).with_name("bench_ray.py")), "--model", str(model),
                    "--images", str(images), "--save-maps", "--no-scores-only", "--plain-one-thread",
                    "--no-stages", "--results", "ray_save_maps"], check=True)
    return json.loads((RESULTS / "ray_save_maps.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--test", type=Path, default=BOTTLE / "test", help="Folder of test images (PNG).")
    parser.add_argument("--train", type=Path, default=BOTTLE / "train" / "good",
                        help="Good images to fit a model on when no --model is given.")
    parser.add_argument("--device", nargs="+", default=None, help="Default: cpu, and cuda when available.")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--old", default=OLD_REV, help="Commit whose CPU path is measured alongside ('' for none).")
    parser.add_argument("--ray", action="store_true", help="Also the Ray runs (bench_ray.py, --save-maps).")
    parser.add_argument("--cpu-old-and-new", type=Path, default=None, metavar="OLD_MODEL",
                        help="Only the CPU comparison of old and new code in one process (the old code's model file "
                        "is fitted into OLD_MODEL when missing); merged into --out.")
    parser.add_argument("--ray-images", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS / "throughput.json")
    parser.add_argument("--child", choices=["round", "forced", "compare", "fit"], default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("--files", nargs="+", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "fit":
        from spade_ad import Spade

        Spade(device="cpu", progress=False).fit(args.train).save(args.model)
        print(json.dumps({"model": str(args.model)}))
        return
    if args.child:
        device = args.device[0]
        if args.child == "compare":
            print(json.dumps(compare_maps(args.model, args.files, device)))
        else:
            print(json.dumps(one_round(args.model, args.files, device, args.batch_sizes, args.child == "forced")))
        return
    import torch

    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    sources = sorted(args.test.rglob("*.png"))
    if not sources:
        raise SystemExit(f"no PNG images under {args.test}")
    files = [sources[i % len(sources)] for i in range(args.images)]
    if args.cpu_old_and_new is not None:
        with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
            old = old_package(args.old, Path(tmp))
            if not args.cpu_old_and_new.exists():
                print(f"fitting the old code's model ({args.old}) ...", flush=True)
                old.Spade(device="cpu", progress=False).fit(args.train).save(args.cpu_old_and_new)
            found = cpu_old_and_new(args.model, args.cpu_old_and_new, files, args.batch_sizes, args.rounds, old)
        report = json.loads(args.out.read_text()) if args.out.exists() else {}
        report["cpu_old_and_new_one_process"] = {"images": args.images, "rounds": args.rounds, "old_code": args.old,
                                                 **found}
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(found["new_over_old_images_per_s"], indent=1))
        return
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        work = Path(tmp)
        model = args.model
        if model is None:
            from spade_ad import Spade

            print(f"fitting a default-settings model on {args.train} ...", flush=True)
            model = Spade(device="cpu", progress=False).fit(args.train).save(work / "model.safetensors")
        report: dict[str, Any] = {
            "images": args.images, "test_images": str(args.test), "batch_sizes": args.batch_sizes,
            "rounds": args.rounds, "old_code": args.old or None,
            "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
                       + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
            "torch": torch.__version__,
            "inprocess": bench_inprocess(model, files, devices, args.batch_sizes, args.rounds, args.old, work,
                                         args.train),
        }
        if args.ray:
            report["ray"] = bench_ray(model, args.ray_images)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["inprocess"], indent=1))


if __name__ == "__main__":
    main()
