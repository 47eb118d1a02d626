"""Batch predict on one process vs on Ray Data with 1 and 2 workers, in one run, on the same images.

Each configuration runs in its own process, one after the other, on the same N images (the MVTec AD bottle test
images, 900 x 900 PNG, cycled to N and copied under distinct names): the plain `spade-ad predict` path (`load`,
`iter_predict`, `PredictionWriter`) and `spade_ad.apps.distributed.predict` with W workers on a local Ray cluster (W + 1
logical CPUs); then the same three writing scores and regions only, without the per-image pictures
(`distributed.predict(images=False)`; the plain run drops the same parts), which is where the cost moves when the
pictures are not wanted. Measured from outside each process:

- wall time from process start to every result on disk (imports, model load, Ray's start and stop included);
- steady throughput: rows per second written to scores.csv from a quarter of the rows to the last one;
- peak memory per process: RSS, and USS (its own pages, without the shared libraries every process maps), of the
  driver, of each actor, and of Ray's other processes together (raylet, GCS, agents, idle workers);
- the scores of every Ray run against the plain run's (same answers: largest relative difference, verdicts);
- the cost of each stage per image on one thread (decode, resize, backbone, search and maps, writing the files),
  in-process on 16 of the images: the figures behind the scale note in docs/deployment.md.

With `--save-maps` every run also writes maps/*.tiff (and the Ray actors write the pictures and maps of the images
they scored; the driver the rows). With `--plain-one-thread` the plain run is repeated with one torch thread (the
actors' count), against which the Ray runs' scores.csv must be byte-identical (CPU convolutions sum in a
thread-count-dependent order, so with another count a 6-digit score can differ in its last digit).

Results: benchmarks/results/ray.json and ray.md (`--results NAME` for NAME.json and NAME.md).

    python benchmarks/bench_ray.py [--images 200] [--workers 1 2] [--model MODEL] [--no-scores-only] [--save-maps]
                                   [--plain-one-thread] [--no-stages]

Without --model, a default-settings CPU model is fitted on bottle train/good first (minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "bottle"
RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20


# ---------------------------------------------------------------- child: one configuration


def run_child(mode: str, model: Path, inputs: Path, out: Path, workers: int, images: bool,
              save_maps: bool = False, threads: int | None = None) -> None:
    """One configuration. Without `images`, only scores.csv and regions.jsonl (regions at the original size, as
    `distributed.predict(images=False)` writes them). `threads`: the plain run's torch threads."""
    if mode == "plain":
        import torch

        from spade_ad import load
        from spade_ad.outputs.writers import PredictionWriter

        if threads:
            torch.set_num_threads(threads)
        loaded = load(model, device="cpu")
        with PredictionWriter.for_model(loaded, out, overwrite=True, save_maps=save_maps) as writer:
            for prediction in loaded.iter_predict(inputs, original_size=True, keep_images=images):
                if not images:  # regions at the original size, then the picture-making parts dropped
                    prediction = prediction.without_pixels()
                writer.write(prediction)
    else:
        from spade_ad.apps import distributed

        distributed.predict(model, inputs, out, workers=workers, device="cpu", overwrite=True, progress=False,
                            images=images, save_maps=save_maps)


def run_stages(model_path: Path, inputs: Path, out: Path, count: int = 16) -> dict[str, float]:
    """Seconds per image of each stage, on one torch thread (a worker's share), in this process."""
    import torch

    from spade_ad import load
    from spade_ad.core.features import extract, iter_batches
    from spade_ad.data.images import decode_bytes
    from spade_ad.data.inputs import ImageItem
    from spade_ad.outputs.writers import PredictionWriter

    torch.set_num_threads(1)
    model = load(model_path, device="cpu")
    files = sorted(inputs.iterdir())[:count]
    count = len(files)
    data = [f.read_bytes() for f in files]
    start = time.perf_counter()
    images = [decode_bytes(raw, f.name, max_pixels=None, formats=None) for raw, f in zip(data, files)]
    decode = time.perf_counter() - start
    items = [ImageItem(f.name, image=image) for f, image in zip(files, images)]
    list(model.iter_predict(items[:2], original_size=True, keep_images=True))  # warm-up
    start = time.perf_counter()
    batches = list(iter_batches(items, image_size=model.image_size, resize=model.resize,
                                batch_size=model.batch_size, device=torch.device("cpu"), progress=False))
    resize = time.perf_counter() - start
    start = time.perf_counter()
    for batch in batches:
        extract(model.backbone_, batch, model.patch_size)
    backbone = time.perf_counter() - start
    start = time.perf_counter()
    predictions = list(model.iter_predict(items, original_size=True, keep_images=True))
    scored = time.perf_counter() - start
    costs = {"decode": decode, "resize": resize, "backbone": backbone,
             "search_and_maps": max(0.0, scored - resize - backbone)}
    for name, save_maps in (("write_pngs", False), ("write_pngs_and_tiff", True)):
        with PredictionWriter.for_model(model, out / name, save_maps=save_maps) as writer:
            start = time.perf_counter()
            writer.write_all(predictions)
            costs[name] = time.perf_counter() - start
    return {name: round(seconds / count, 4) for name, seconds in costs.items()}


# ---------------------------------------------------------------- parent: measuring from outside


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def _descendants(root: int) -> list[int]:
    tree, found, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(tree.get(pid, []))
    return found


def _memory(pid: int) -> tuple[str, float, float] | None:
    """(command line, RSS MiB, USS MiB) of a process; None when it has gone."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        fields = {}
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            name, value = line.split(":", 1)
            fields[name] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return title, fields.get("Rss", 0) / MIB, uss / MIB


def _rows(scores: Path) -> int:
    try:
        with open(scores, "rb") as handle:
            return max(0, sum(1 for _ in handle) - 1)
    except OSError:
        return 0


def measure(mode: str, workers: int, model: Path, inputs: Path, out: Path, images: int,
            pictures: bool, save_maps: bool = False, threads: int | None = None) -> dict[str, Any]:
    """Run one configuration in a child process and watch it: rows as they appear, memory of its process tree."""
    command = [sys.executable, __file__, "--child", mode, "--model", str(model), "--inputs", str(inputs),
               "--out", str(out), "--workers", str(workers)] + ([] if pictures else ["--scores-only"]) + (
                   ["--save-maps"] if save_maps else []) + (["--threads", str(threads)] if threads else [])
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = last = quarter = None  # when the first row, the last row and a quarter of the rows were on disk
    seen = rows_at_quarter = 0
    peaks: dict[int, tuple[str, float, float]] = {}
    next_memory = 0.0
    while child.poll() is None:
        now = time.perf_counter() - start
        rows = _rows(out / "scores.csv")
        if rows > seen:
            first = now if first is None else first
            if quarter is None and rows >= images / 4:
                quarter, rows_at_quarter = now, rows
            last, seen = now, rows
        if now >= next_memory:
            for pid in _descendants(child.pid):
                sample = _memory(pid)
                if sample is not None:
                    title, rss, uss = sample
                    old = peaks.get(pid, (title, 0.0, 0.0))
                    peaks[pid] = (title if "ray::" in title or not old[0] else old[0], max(rss, old[1]),
                                  max(uss, old[2]))
            next_memory = now + 1.0
        time.sleep(0.2)
    wall = time.perf_counter() - start
    if child.returncode != 0:
        raise SystemExit(f"{mode} x{workers} failed:\n{child.stderr.read().decode(errors='replace')[-3000:]}")
    rows = _rows(out / "scores.csv")
    if rows != images:
        raise SystemExit(f"{mode} x{workers} wrote {rows} rows for {images} images")
    actors = [(rss, uss) for title, rss, uss in peaks.values() if "MapBatches(_Scorer)" in title]
    driver = peaks.get(child.pid, ("", 0.0, 0.0))
    others = [(rss, uss) for pid, (title, rss, uss) in peaks.items()
              if pid != child.pid and "MapBatches(_Scorer)" not in title]
    # Steady: from a quarter of the rows to the last one (the first rows come in a burst: work done while the
    # first result waited for the actors to start).
    steady_rows = rows - rows_at_quarter
    steady_s = (last - quarter) if last is not None and quarter is not None else 0.0
    return {
        "config": ("plain" if mode == "plain" else f"ray x{workers}") + ("" if pictures else ", scores only")
        + (f", {threads} torch thread" if threads else ""),
        "workers": workers if mode == "ray" else 0, "pictures": pictures, "threads": threads,
        "images": rows, "wall_s": round(wall, 1), "images_per_s": round(rows / wall, 3),
        "first_row_s": round(first or 0.0, 1), "steady_s": round(steady_s, 1),
        "steady_images_per_s": round(steady_rows / steady_s, 3) if steady_s > 0 else None,
        "driver_rss_mib": round(driver[1]), "driver_uss_mib": round(driver[2]),
        "actor_rss_mib": [round(rss) for rss, _ in actors], "actor_uss_mib": [round(uss) for _, uss in actors],
        "ray_other_rss_mib": round(sum(rss for rss, _ in others)),
        "ray_other_uss_mib": round(sum(uss for _, uss in others)),
    }


def compare(plain: Path, other: Path) -> dict[str, Any]:
    """The largest relative score difference and the verdicts that differ, row by row."""
    def read(out: Path) -> list[dict[str, str]]:
        with open(out / "scores.csv", newline="") as handle:
            return list(csv.DictReader(handle))

    a, b = read(plain), read(other)
    assert [r["path"] for r in a] == [r["path"] for r in b], "rows differ in order or names"
    worst = max(abs(float(x["score"]) - float(y["score"])) / abs(float(x["score"])) for x, y in zip(a, b))
    verdicts = sum(x.get("is_anomalous") != y.get("is_anomalous") for x, y in zip(a, b))
    return {"max_relative_score_difference": float(f"{worst:.3g}"), "verdicts_differing": verdicts,
            "scores_csv_byte_identical": (plain / "scores.csv").read_bytes() == (other / "scores.csv").read_bytes()}


def _ratios(run: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, float]:
    """Throughput of a Ray run over the plain run that writes the same files."""
    plain = next(r for r in runs if r["workers"] == 0 and r["pictures"] == run["pictures"] and not r["threads"])
    return {"wall": round(run["images_per_s"] / plain["images_per_s"], 3),
            "steady": round((run["steady_images_per_s"] or 0) / (plain["steady_images_per_s"] or 1), 3)}


def prepare_inputs(folder: Path, images: int) -> Path:
    """N copies of the bottle test images (cycled), under distinct names, in one folder."""
    sources = sorted((BOTTLE / "test").rglob("*.png"))
    if not sources:
        raise SystemExit(f"no bottle test images under {BOTTLE / 'test'}")
    folder.mkdir(parents=True)
    for i in range(images):
        source = sources[i % len(sources)]
        shutil.copy(source, folder / f"{i:04d}_{source.parent.name}_{source.name}")
    return folder


def markdown(report: dict[str, Any]) -> str:
    runs = report["runs"]
    lines = [
        "# Batch predict: one process vs Ray Data", "",
        f"{report['images']} bottle test images (900 x 900 PNG, the 83 test images cycled), model: "
        f"{report['model']}; {report['machine']}. Generated by `benchmarks/bench_ray.py`; each configuration in its "
        f"own process, one after the other, in one run.", "",
        "Each configuration is compared with the plain run that writes the same files (with or without the "
        "per-image pictures).", "",
        "| configuration | wall s | images/s (wall) | vs plain | first row s | images/s (steady) | vs plain | "
        "driver RSS / USS MiB | per actor RSS / USS MiB | other Ray processes RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        plain = next(r for r in runs if r["workers"] == 0 and r["pictures"] == run["pictures"] and not r["threads"])
        actors = ", ".join(f"{r} / {u}" for r, u in zip(run["actor_rss_mib"], run["actor_uss_mib"])) or "-"
        steady = run["steady_images_per_s"]
        lines.append(
            f"| {run['config']} | {run['wall_s']} | {run['images_per_s']} | "
            f"{run['images_per_s'] / plain['images_per_s']:.2f}x | {run['first_row_s']} | {steady} | "
            f"{(steady or 0) / (plain['steady_images_per_s'] or 1):.2f}x | {run['driver_rss_mib']} / "
            f"{run['driver_uss_mib']} | {actors} | {run['ray_other_rss_mib'] or '-'} |"
        )
    lines += ["", "Same answers (scores.csv of each Ray run against the plain run's):", ""]
    lines += [f"- {name}: largest relative score difference {c['max_relative_score_difference']}, verdicts "
              f"differing: {c['verdicts_differing']}, scores.csv byte-identical: {c['scores_csv_byte_identical']}"
              for name, c in report["same_answers"].items()]
    stages = report["seconds_per_image_one_thread"]
    if stages:
        lines += ["", "Seconds per image of each stage on one thread (16 images, in-process):", "",
                  "| " + " | ".join(stages) + " |", "|" + "---|" * len(stages),
                  "| " + " | ".join(str(v) for v in stages.values()) + " |"]
    lines += ["", "Wall time includes imports, the model load and, for Ray, starting and stopping the local cluster "
              "and its actors (the fixed cost: wall time minus images / steady rate). Steady throughput counts the "
              "rows written from a quarter of them to the last one (a Ray run's first rows come in a burst). "
              "USS: memory that is the process's own (RSS less the shared libraries, e.g. torch's, that every "
              "process maps).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--no-scores-only", dest="scores_only_runs", action="store_false",
                        help="Skip the runs that write scores and regions only (no per-image pictures).")
    parser.add_argument("--save-maps", action="store_true", help="Every run also writes maps/*.tiff.")
    parser.add_argument("--plain-one-thread", action="store_true",
                        help="Also the plain run on one torch thread (the actors' count): the byte-identity check.")
    parser.add_argument("--no-stages", dest="stages", action="store_false", help="Skip the per-stage costs.")
    parser.add_argument("--results", default="ray", help="Write benchmarks/results/NAME.json and NAME.md.")
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--scores-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=["plain", "ray", "stages"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--inputs", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "stages":
        print(json.dumps(run_stages(args.model, args.inputs, args.out)))
        return
    if args.child:
        run_child(args.child, args.model, args.inputs, args.out, args.workers[0], not args.scores_only,
                  args.save_maps, args.threads)
        return
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        work = Path(tmp)
        model = args.model
        if model is None:
            from spade_ad import Spade

            print("fitting a model on bottle train/good ...", flush=True)
            model = Spade(device="cpu").fit(BOTTLE / "train" / "good").save(work / "bottle.safetensors")
        inputs = prepare_inputs(work / "images", args.images)
        runs = []
        configs = [("plain", 1, None)] + [("ray", w, None) for w in args.workers]
        if args.plain_one_thread:
            configs.insert(1, ("plain", 1, 1))
        for pictures in (True, False) if args.scores_only_runs else (True,):
            for mode, workers, threads in configs:
                print(f"{mode} x{workers}{'' if pictures else ' scores only'} ...", flush=True)
                out = work / f"out_{mode}_{workers}_{int(pictures)}{'_t1' if threads else ''}"
                runs.append(measure(mode, workers, model, inputs, out, args.images, pictures, args.save_maps,
                                    threads))
                print(json.dumps(runs[-1]), flush=True)
        stages: dict[str, float] = {}
        if args.stages:
            print("stages ...", flush=True)
            stages = json.loads(subprocess.run(
                [sys.executable, __file__, "--child", "stages", "--model", str(model), "--inputs", str(inputs),
                 "--out", str(work / "stages")], check=True, capture_output=True, text=True
            ).stdout.strip().splitlines()[-1])
        same = {run["config"]: compare(work / f"out_plain_1_{int(run['pictures'])}",
                                       work / f"out_ray_{run['workers']}_{int(run['pictures'])}")
                for run in runs if run["workers"]}
        if args.plain_one_thread:
            same.update({f"{run['config']} vs plain on 1 torch thread": compare(
                work / f"out_plain_1_{int(run['pictures'])}_t1",
                work / f"out_ray_{run['workers']}_{int(run['pictures'])}") for run in runs if run["workers"]})
        report = {
            "images": args.images, "save_maps": args.save_maps,
            "model": f"default settings (efficientnet_lite0, layers 2,3), "
            f"{model.stat().st_size / MIB:.0f} MB file" if args.model is None else str(args.model.name),
            "seconds_per_image_one_thread": stages,
            "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, Python "
            f"{platform.python_version()}", "runs": runs, "same_answers": same,
            "ratios_vs_plain": {run["config"]: _ratios(run, runs) for run in runs if run["workers"]},
        }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.results}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{args.results}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
