"""Writing predictions to a folder as they are made: scores.csv row by row, the defect regions of each image
(regions.jsonl), and the per-image files asked for (`outputs`): by default the annotated overlay a person looks at
and the defect mask a machine reads; on request the full-field heat map and the raw float32 map at the original
size as a TIFF (what the official MVTec evaluation reads). `outputs=()` (the CLI's `--outputs none`) writes the
scores and regions only.

| output    | file                   | what it is                                                                  |
|-----------|------------------------|-----------------------------------------------------------------------------|
| `overlay` | overlays/<name>.png    | the image with heat where it matters, regions boxed, verdict label (default) |
| `mask`    | masks/<name>.png       | pixels above the pixel threshold, 0/255 (default; calibrated models only)    |
| `heatmap` | heatmaps/<name>.png    | the whole map in colour, on the overlay's scale                              |
| `map`     | maps/<name>.tiff       | the raw float32 map at the original size (`save_maps`, `--save-maps`)        |

Per-image files are rendered, encoded and written off the scoring thread by `PredictionWriter`'s bounded pool of
threads (PNG encoding releases the GIL), so that scoring the next image goes on while the last one's pictures are
drawn; at most a few images wait, so a slow disk slows scoring down rather than filling memory. PNG files are written
at zlib level `PNG_LEVEL`, chosen by measurement (docs/outputs.md). Rows are written on the caller's thread, in input
order, before the image's files; closing the writer (leaving the `with` block, also on an error) waits for every
file under way.

scores.csv: `path,score` for every model; a model with thresholds adds
`normalized_score,p_value,is_anomalous,regions,largest_region_area`. Floats have 6 significant digits,
`is_anomalous` is 0/1, `regions` the number of defect regions and `largest_region_area` the largest one's area in
original-image pixels (0 when none); a value the model does not have (e.g. a p-value without calibration scores) is
an empty cell.

regions.jsonl (models with thresholds): JSON Lines, one object per scored image in the order of scores.csv,
`{"path": <the scores.csv path>, "regions": [<Region.to_json()>, ...]}`, each region
`{"box": [left, top, right, bottom], "area": ..., "peak": ..., "mean": ...}` with the box in original-image pixels
(right and bottom exclusive; in the network-input map's pixels for a Prediction without `original_map`), strongest
peak first; `[]` for an image that is not flagged. JSON Lines rather than
one JSON document so that it can be appended and flushed per image like scores.csv; `read_regions` turns it into a
{path: regions} mapping.

Rows and lines are flushed one at a time, so a crash at image 900 keeps the first 899 results; a write that fails
(disk full, no permission) raises an OSError naming the file, and every row written before it stays in scores.csv.

Per-image files (overlays, masks, heat maps, maps, explanations) are written by `ImageFiles`, which holds no open
file and can be built wherever the image was scored (a Ray actor writes the files of the images it scored, the
driver only the rows: `spade_ad.distributed`). Each file is written under a temporary name beside it
(`.<name>.<pid>-<random>.partial`) and renamed into place (`os.replace`), so a file by its own name is always whole,
and writing it again (a retried batch) replaces it whole; `remove_partials` clears what a killed writer left.

Output names: each input's images are written under its name relative to the folder it was found in (an absolute
name, or one climbing out with "..", keeps only its file name). Every input gets its own files: when that name is
already taken in this run (two inputs `x.png` from different folders, `x.png` and `x.tif`, the same file given
twice, or names differing only in case, which would collide on Windows or macOS), the later input, in scores.csv
order, gets a numbered suffix before its extension: `x~2.png`, `x~3.png`, ...

An output folder holding a scores.csv is an earlier run's: `overwrite=False` (the CLI's default, `--overwrite` to
allow it) refuses it, so that a second run into the same folder never empties the first run's results. With
overwrite, scores.csv, regions.jsonl and skipped.csv are replaced; image files of the earlier run that this run does
not write again are left in place. `mode="a"` appends to them instead (a watch run going on from an earlier one):
the header is written only to a new or empty scores.csv, and the output names the earlier rows used stay taken.

Who else needs to know what was written (the inspection record) subscribes: `writer.subscribe(on_written,
on_skipped=...)` calls `on_written(prediction, paths)` once per written prediction, after its row, with the final
path of each of its files by folder ("overlays", "masks", "heatmaps", "maps", "explain"), and `on_skipped(name,
error)` for each input that could not be read.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO

import numpy as np
from PIL import Image

from .detector import Detector
from .errors import ImageReadError, OutputError
from .prediction import Prediction
from .visualize import heatmap, overlay_picture, save_png, threshold_color_range, why_picture

SCORE_COLUMNS = ["path", "score"]
VERDICT_COLUMNS = ["normalized_score", "p_value", "is_anomalous", "regions", "largest_region_area"]
REGIONS_FILE = "regions.jsonl"
SCORES_FILE = "scores.csv"
SKIPPED_FILE = "skipped.csv"
#: Writes one per-image file: (save(path), folder, stem, suffix).
Saver = Callable[[Callable[[Path], object], str, str, str], None]
#: The folders of per-image files, and how a file being written is named until it is renamed into place.
IMAGE_FOLDERS = ("heatmaps", "overlays", "masks", "maps", "explain")
PARTIAL_SUFFIX = ".partial"
#: The per-image files one may ask for, and the folder each is written to (table in the module docstring).
OUTPUT_FOLDERS = {"overlay": "overlays", "mask": "masks", "heatmap": "heatmaps", "map": "maps"}
#: What a person looks at and what a machine reads, nothing twice (the overlay shows the heat).
DEFAULT_OUTPUTS = ("overlay", "mask")
#: Callbacks of `PredictionWriter.subscribe`.
OnWritten = Callable[[Prediction, dict[str, Path]], None]
OnSkipped = Callable[[str, ImageReadError], None]


def parse_outputs(outputs: str | Iterable[str] | None, *, save_maps: bool = False) -> tuple[str, ...]:
    """The per-image outputs asked for, in the order of `OUTPUT_FOLDERS`: None or "default" gives
    `DEFAULT_OUTPUTS`, "none" (or an empty list) none, "all" every one; else names separated by commas (or a list of
    names). `save_maps` adds "map". An unknown name is an OutputError naming the choices."""
    if outputs is None:
        names = list(DEFAULT_OUTPUTS)
    else:
        given = outputs.split(",") if isinstance(outputs, str) else list(outputs)
        names = []
        for raw in given:
            name = raw.strip().lower()
            if name in ("", "none"):
                continue
            if name == "all":
                names.extend(OUTPUT_FOLDERS)
            elif name == "default":
                names.extend(DEFAULT_OUTPUTS)
            elif name in OUTPUT_FOLDERS:
                names.append(name)
            else:
                raise OutputError(f"unknown output {raw.strip()!r} in --outputs (outputs=); choose from "
                                  f"{', '.join(OUTPUT_FOLDERS)}, separated by commas, or default, all, none")
    if save_maps:
        names.append("map")
    return tuple(name for name in OUTPUT_FOLDERS if name in names)


def check_output_dir(out_dir: str | Path, *, overwrite: bool) -> Path:
    """Refuse an output folder that is a file (or lies under one), or that holds an earlier run's scores.csv unless
    `overwrite`: an OutputError naming the folder. Cheap: the CLI calls it before loading the model."""
    out_dir = Path(out_dir)
    for folder in (out_dir, *out_dir.parents):
        if folder.exists() and not folder.is_dir():
            what = "is a file" if folder == out_dir else f"lies under {folder}, which is a file"
            raise OutputError(f"output folder {out_dir} {what}; give a folder for the results (-o / --output)")
    if not overwrite and (out_dir / SCORES_FILE).exists():
        raise OutputError(f"output folder {out_dir} already holds results ({SCORES_FILE}); choose another folder or "
                          f"pass --overwrite to replace them")
    return out_dir


class ImageFiles:
    """The per-image files of predictions in `out_dir`, those of `outputs` (see `parse_outputs`; `save_maps` adds
    the raw map): overlays/<stem>.png (`visualize.overlay_picture`), masks/<stem>.png (with `verdicts`),
    heatmaps/<stem>.png, maps/<stem>.tiff, and explain/<stem>.png (with `thumbnails`, for flagged images), each
    written whole (a temporary file renamed into place). Holds no open file: one can be made in every process that
    scores images, and `write` may be called again for the same stem (the files are replaced whole)."""

    def __init__(self, out_dir: str | Path, *, save_maps: bool = False, value_range: tuple[float, float] | None = None,
                 verdicts: bool = False, thumbnails: list[np.ndarray] | None = None,
                 outputs: str | Iterable[str] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.outputs = parse_outputs(outputs, save_maps=save_maps)
        self.value_range = value_range
        self.verdicts = verdicts
        self.thumbnails = thumbnails  # the model's training thumbnails: explain/<stem>.png when given

    @property
    def save_maps(self) -> bool:
        return "map" in self.outputs

    @classmethod
    def for_model(cls, model: Detector, out_dir: str | Path, *, save_maps: bool = False,
                  explain: bool = False, outputs: str | Iterable[str] | None = None) -> ImageFiles:
        """Files set up for `model` (as `PredictionWriter.for_model` sets them up)."""
        return cls(out_dir, save_maps=save_maps, value_range=threshold_color_range(model.pixel_threshold_),
                   verdicts=model.image_threshold_ is not None, thumbnails=model.thumbnails_ if explain else None,
                   outputs=outputs)

    def write(self, prediction: Prediction, stem: str, *, saver: Saver | None = None) -> None:
        """The files of one prediction under `stem` (nothing without its original-size map). A failed write raises
        an OSError naming the file, and leaves no file by that name half-written. `saver(save, folder, stem,
        suffix)` writes each file instead of `self._save` (a writer that writes them on its pool, or also notes
        where they went); each `save(path)` draws its picture itself, so a pool draws them off the caller's thread."""
        for save, folder, suffix in self.plan(prediction):
            (saver or self._save)(save, folder, stem, suffix)

    def plan(self, prediction: Prediction) -> list[tuple[Callable[[Path], object], str, str]]:
        """The files of one prediction: (save(path), folder, suffix) each, in the order they are written; nothing
        is drawn until `save` is called."""
        full_map = prediction.original_map
        if full_map is None:
            return []
        files: list[tuple[Callable[[Path], object], str, str]] = []
        if "map" in self.outputs:
            files.append((lambda target: _write_tiff(target, full_map), "maps", ".tiff"))
        if "heatmap" in self.outputs:
            vmin, vmax = self.value_range if self.value_range else (None, None)
            files.append((lambda target: save_png(heatmap(full_map, vmin, vmax), target), "heatmaps", ".png"))
        if "mask" in self.outputs and self.verdicts and prediction.pixel_threshold is not None:
            files.append((lambda target: save_png(_mask_image(prediction), target), "masks", ".png"))
        if prediction.image is not None:
            if "overlay" in self.outputs:
                files.append((lambda target: save_png(overlay_picture(prediction), target), "overlays", ".png"))
            if prediction.is_anomalous and self.thumbnails and prediction.explanation is not None:
                thumbnails = self.thumbnails
                files.append((lambda target: save_png(why_picture(prediction, thumbnails), target), "explain",
                              ".png"))
        return files

    def path(self, folder: str, stem: str, suffix: str = ".png") -> Path:
        """Where the file of `folder` for `stem` goes."""
        return self.out_dir / folder / f"{stem}{suffix}"

    def _save(self, save: Callable[[Path], object], folder: str, stem: str, suffix: str = ".png") -> None:
        """Write one file OUT/folder/<stem><suffix> whole (its folders made first); an OSError names the file."""
        target = self.path(folder, stem, suffix)
        with _naming(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            write_whole(target, save)


def _write_tiff(target: Path, full_map: np.ndarray) -> None:
    import tifffile  # deferred: only --save-maps needs it (start-up time)

    tifffile.imwrite(target, full_map.astype(np.float32))


def _mask_image(prediction: Prediction) -> Image.Image:
    """The defect mask as a 0/255 greyscale image."""
    mask = prediction.defect_mask
    assert mask is not None
    return Image.fromarray(mask.astype(np.uint8) * 255)


class _FilePool:
    """Writes files on `workers` background threads, at most `depth` jobs queued or running (`submit` waits for a
    place: a slow disk slows the caller rather than filling memory). The first failure is raised by the next
    `submit`, `wait` or `close`; later jobs still run, so every file that can be written is."""

    def __init__(self, workers: int, depth: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="spade-files")
        self._places = threading.Semaphore(depth)
        self._lock = threading.Lock()
        self._running: set[Future[None]] = set()
        self._failure: BaseException | None = None

    def submit(self, job: Callable[[], None]) -> None:
        self.raise_failure()
        self._places.acquire()
        try:
            future = self._executor.submit(job)
        except BaseException:
            self._places.release()
            raise
        with self._lock:
            self._running.add(future)
        future.add_done_callback(self._done)

    def _done(self, future: Future[None]) -> None:
        self._places.release()
        with self._lock:
            self._running.discard(future)
            failure = None if future.cancelled() else future.exception()
            if failure is not None and self._failure is None:
                self._failure = failure

    def wait(self) -> None:
        """Wait until every job submitted so far is done; raise the first failure."""
        with self._lock:
            running = list(self._running)
        for future in running:
            try:
                future.result()
            except BaseException:  # kept by `_done`, raised below
                pass
        self.raise_failure()

    def raise_failure(self) -> None:
        with self._lock:
            failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def close(self) -> None:
        """Finish every job, stop the threads; raise the first failure not yet raised."""
        self._executor.shutdown(wait=True)
        self.raise_failure()


def write_whole(target: Path, save: Callable[[Path], object]) -> None:
    """`save(path)` to a temporary file beside `target`, then renamed onto it: `target` is never half-written, and
    a file already there is replaced whole. On failure the temporary file is removed and the OSError names
    `target` (not the temporary name)."""
    partial = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}{PARTIAL_SUFFIX}")
    try:
        save(partial)
        os.replace(partial, target)
    except BaseException as exc:
        partial.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is not None and Path(exc.filename) == partial:
            named = OSError(exc.errno, exc.strerror or str(exc), str(target))
            raise named from exc
        raise


def remove_partials(out_dir: str | Path, *, keep_live: bool = False) -> int:
    """Remove the temporary files a killed writer left in the per-image folders of `out_dir`; how many. With
    `keep_live`, those of a process still running on this machine (the pid in their name) are kept: a writer that
    starts clears what a killed one left, never what another one is writing."""
    removed = 0
    for folder in IMAGE_FOLDERS:
        root = Path(out_dir) / folder
        if root.is_dir():
            for leftover in root.rglob(f".*{PARTIAL_SUFFIX}"):
                if keep_live and _writer_alive(leftover.name):
                    continue
                leftover.unlink(missing_ok=True)
                removed += 1
    return removed


def _writer_alive(partial_name: str) -> bool:
    """Whether the process that names the temporary file `partial_name` (see `write_whole`) is running here."""
    pid_part = partial_name[: -len(PARTIAL_SUFFIX)].rsplit(".", 1)[-1].split("-", 1)[0]
    if not pid_part.isdigit():
        return False
    pid = int(pid_part)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def output_stems(names: Iterable[str]) -> list[str]:
    """The stem (relative path without extension) each of `names` gets when written in this order by one
    `PredictionWriter`: its safe relative name, numbered when an earlier one took it (see the module docstring)."""
    taken: set[str] = set()
    return [_next_stem(name, taken) for name in names]


def _next_stem(name: str, taken: set[str]) -> str:
    relative = _safe_relative(name)
    base = (relative.parent / relative.stem).as_posix()
    stem, number = base, 1
    while stem.casefold() in taken:
        number += 1
        stem = f"{base}~{number}"
    taken.add(stem.casefold())
    return stem


class PredictionWriter:
    """Streams predictions into `out_dir`. Use as a context manager; `write` one Prediction at a time.

    Layout (formats in the module docstring): scores.csv, regions.jsonl (with `verdicts`), skipped.csv (inputs that
    could not be read, when any), and the per-image files of `outputs` (see `parse_outputs`; by default
    overlays/<name>.png, annotated with region boxes, their peak scores and a verdict label, and masks/<name>.png,
    the predicted defect pixels, with `verdicts`; `save_maps` adds maps/<name>.tiff). `<name>` is the input's path
    relative to the folder it was found in, so the output mirrors the input tree; every input gets its own files
    (numbered suffixes, see the module docstring). `value_range` fixes the heat maps' colour scale (see
    `threshold_color_range`). A folder holding an earlier run's scores.csv is refused unless `overwrite` (True by
    default here; the CLI's --overwrite is off by default); `mode="a"` appends to it instead.

    The rows are this writer's, written on the caller's thread; the per-image files are its `images`
    (`ImageFiles`), drawn and written by a pool of `workers` threads (0: on the caller's thread), which another
    process may write instead (`write_row` then writes the rows only). `subscribe` tells others what was written.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        save_maps: bool = False,
        value_range: tuple[float, float] | None = None,
        verdicts: bool = False,
        overwrite: bool = True,
        thumbnails: list[np.ndarray] | None = None,
        outputs: str | Iterable[str] | None = None,
        mode: str = "w",
        workers: int | None = None,
    ) -> None:
        if mode not in ("w", "a"):
            raise ValueError(f"mode must be 'w' (a new run) or 'a' (append to an earlier run's files), got {mode!r}")
        self.out_dir = Path(out_dir)
        self.images = ImageFiles(out_dir, save_maps=save_maps, value_range=value_range, verdicts=verdicts,
                                 thumbnails=thumbnails, outputs=outputs)
        self.overwrite = overwrite
        self.mode = mode
        self.workers = default_workers() if workers is None else workers
        self._taken: set[str] = set()
        self.verdicts = verdicts
        self.count = 0
        self.skipped: list[tuple[str, str]] = []
        self._csv_file: IO[str] | None = None
        self._regions_file: IO[str] | None = None
        self._skip_file: IO[str] | None = None
        self._pool: _FilePool | None = None
        self._paths: dict[str, Path] = {}
        self._on_written: list[OnWritten] = []
        self._on_skipped: list[OnSkipped] = []

    @classmethod
    def for_model(cls, model: Detector, out_dir: str | Path, *, save_maps: bool = False,
                  overwrite: bool = True, explain: bool = False, outputs: str | Iterable[str] | None = None,
                  mode: str = "w", workers: int | None = None) -> PredictionWriter:
        """A writer set up for `model`: verdict and region columns, regions.jsonl, annotated overlays and masks when
        it has thresholds; its shared heat-map scale; with `explain`, the "why" pictures from its training
        thumbnails; `outputs`, `mode` and `workers` as for the writer itself."""
        return cls(
            out_dir, save_maps=save_maps, value_range=threshold_color_range(model.pixel_threshold_),
            verdicts=model.image_threshold_ is not None, overwrite=overwrite,
            thumbnails=model.thumbnails_ if explain else None, outputs=outputs, mode=mode, workers=workers,
        )

    def subscribe(self, on_written: OnWritten | None = None, *, on_skipped: OnSkipped | None = None) -> None:
        """Be told what this writer writes: `on_written(prediction, paths)` once per written prediction, after its
        row, with `paths` the final path of each of its files by folder ("overlays", "masks", "heatmaps", "maps",
        "explain"; a file may still be being written by the pool: it appears whole under that name, or not at
        all); `on_skipped(name, error)` for each input recorded in skipped.csv. Callbacks run on the caller's thread,
        in the order they subscribed."""
        if on_written is not None:
            self._on_written.append(on_written)
        if on_skipped is not None:
            self._on_skipped.append(on_skipped)

    def __enter__(self) -> PredictionWriter:
        if self.out_dir.is_dir():  # what a killed run left half-written
            remove_partials(self.out_dir, keep_live=True)
        if self.mode == "a":
            self._open_appending()
        else:
            check_output_dir(self.out_dir, overwrite=self.overwrite)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / SKIPPED_FILE).unlink(missing_ok=True)  # an earlier run's list would read as this run's
            if not self.verdicts:
                (self.out_dir / REGIONS_FILE).unlink(missing_ok=True)
            self._csv_file = open(self.out_dir / SCORES_FILE, "w", newline="", encoding="utf-8")
            self._csv = csv.writer(self._csv_file)
            self._csv.writerow(SCORE_COLUMNS + (VERDICT_COLUMNS if self.verdicts else []))
            self._csv_file.flush()
            if self.verdicts:
                self._regions_file = open(self.out_dir / REGIONS_FILE, "w", encoding="utf-8")
        if self.workers > 0 and self.images.outputs + (("explain",) if self.images.thumbnails else ()):
            self._pool = _FilePool(self.workers, depth=2 * self.workers + 2)
        return self

    def _open_appending(self) -> None:
        """mode "a": append to an earlier run's scores.csv (its header written only when the file is new or empty),
        regions.jsonl and skipped.csv, and keep the output names of its rows taken."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        scores = self.out_dir / SCORES_FILE
        earlier: list[str] = []
        if scores.exists():
            with open(scores, newline="", encoding="utf-8") as handle:
                earlier = [row[0] for row in list(csv.reader(handle))[1:] if row]
        self._csv_file = open(scores, "a", newline="", encoding="utf-8")
        self._csv = csv.writer(self._csv_file)
        if not earlier and scores.stat().st_size == 0:
            self._csv.writerow(SCORE_COLUMNS + (VERDICT_COLUMNS if self.verdicts else []))
            self._csv_file.flush()
        if self.verdicts:
            self._regions_file = open(self.out_dir / REGIONS_FILE, "a", encoding="utf-8")
        skipped = self.out_dir / SKIPPED_FILE
        if skipped.exists():
            self._skip_file = open(skipped, "a", newline="", encoding="utf-8")
            self._skip_writer = csv.writer(self._skip_file)
        for name in earlier:
            self._output_stem(name)

    def __exit__(self, *exc_info: object) -> None:
        """Finish the files under way (also on an error: what was scored is kept), then close every file, even
        when closing one fails (e.g. a disk full while flushing); the first such error is raised unless an error is
        already on its way out."""
        failure: BaseException | None = None
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                pool.close()
            except Exception as exc:
                failure = exc
        for handle in (self._csv_file, self._regions_file, self._skip_file):
            if handle is not None:
                try:
                    handle.close()
                except OSError as exc:
                    failure = failure or _named(exc, handle.name)
        if failure is not None and exc_info[0] is None:
            raise failure

    def write(self, prediction: Prediction) -> None:
        """Append one result: its CSV row and regions line first (flushed), then its images (on the pool). A failed
        write raises an OSError naming the file (a file of an earlier image that failed on the pool: here, or when
        the writer closes)."""
        if self._pool is not None:
            self._pool.raise_failure()
        self.write_row(prediction)
        self._paths = {}
        if prediction.original_map is not None:
            # a copy: the caller may let go of the image or map once `write` returns (the Ray actors do)
            shown = copy.copy(prediction) if self._pool is not None else prediction
            self.images.write(shown, self._output_stem(prediction.name), saver=self._save)
        paths, self._paths = self._paths, {}
        for on_written in self._on_written:
            on_written(prediction, paths)

    def wait(self) -> None:
        """Wait until every file of the predictions written so far is on disk (a failure is raised here)."""
        if self._pool is not None:
            self._pool.wait()

    def _save(self, save: Callable[[Path], object], folder: str, stem: str, suffix: str = ".png") -> None:
        """Write one per-image file whole (`ImageFiles`), on the pool when there is one; its path is reported to
        the subscribers. (Overriding it to learn the paths is the old way: use `subscribe`.)"""
        self._paths[folder] = self.images.path(folder, stem, suffix)
        if self._pool is None:
            self.images._save(save, folder, stem, suffix)
        else:
            images = self.images
            self._pool.submit(lambda: images._save(save, folder, stem, suffix))

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.images.outputs

    @property
    def save_maps(self) -> bool:
        return self.images.save_maps

    @property
    def value_range(self) -> tuple[float, float] | None:
        return self.images.value_range

    @property
    def thumbnails(self) -> list[np.ndarray] | None:
        return self.images.thumbnails

    def write_row(self, prediction: Prediction) -> None:
        """Append one result's CSV row and regions line (flushed), without its images (written elsewhere)."""
        assert self._csv_file is not None, "use PredictionWriter as a context manager"
        with _naming(self._csv_file.name):
            self._csv.writerow(self.row(prediction))
            self._csv_file.flush()
        if self._regions_file is not None:
            with _naming(self._regions_file.name):
                line = {"path": prediction.name, "regions": [region.to_json() for region in prediction.regions]}
                if prediction.explanation is not None and prediction.is_anomalous:
                    line["explanation"] = prediction.explanation.to_json()
                self._regions_file.write(json.dumps(line) + "\n")
                self._regions_file.flush()
        self.count += 1

    def row(self, prediction: Prediction) -> list[str]:
        """The scores.csv row of `prediction` (columns as in the header this writer wrote)."""
        row = [prediction.name, _number(prediction.score)]
        if self.verdicts:
            regions = prediction.regions
            row += [
                _number(prediction.normalized_score), _number(prediction.p_value),
                "" if prediction.is_anomalous is None else str(int(prediction.is_anomalous)),
                str(len(regions)), str(max((r.area for r in regions), default=0)),
            ]
        return row

    def _output_stem(self, name: str) -> str:
        """Where the input's images go (a relative path without extension): its safe relative name, numbered when
        this run already used it (compared ignoring case)."""
        return _next_stem(name, self._taken)

    def skip(self, name: str, error: ImageReadError) -> None:
        """Record an input that could not be read (skipped.csv in the output folder)."""
        with _naming(self.out_dir / SKIPPED_FILE):
            if self._skip_file is None:
                self._skip_file = open(self.out_dir / SKIPPED_FILE, "w", newline="", encoding="utf-8")
                self._skip_writer = csv.writer(self._skip_file)
                self._skip_writer.writerow(["path", "reason"])
            self._skip_writer.writerow([name, error.reason])
            self._skip_file.flush()
        self.skipped.append((name, error.reason))
        for on_skipped in self._on_skipped:
            on_skipped(name, error)

    def write_all(self, predictions: Iterable[Prediction]) -> int:
        for prediction in predictions:
            self.write(prediction)
        return self.count


def default_workers() -> int:
    """Threads that draw and write per-image files: one on a machine of up to two cores (it keeps up: the files of
    a 900 x 900 image take a fifth of its scoring, and a second thread would only take the backbone's cores), two on
    a bigger one (one draws while the other waits on the disk)."""
    return 1 if (os.cpu_count() or 1) <= 2 else 2


def read_regions(path: str | Path) -> dict[str, list[dict[str, object]]]:
    """The regions file of an output folder (or the file itself) as {path: [region JSON, ...]}; a line cut short by
    a crash is ignored."""
    path = Path(path)
    if path.is_dir():
        path = path / REGIONS_FILE
    regions: dict[str, list[dict[str, object]]] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue
            regions[item["path"]] = item["regions"]
    return regions


def _named(exc: OSError, filename: object) -> OSError:
    """`exc` itself when it names its file, else the same error naming `filename` (a failed flush names none)."""
    if exc.filename is not None or filename is None:
        return exc
    named = OSError(exc.errno, exc.strerror or str(exc), str(filename))  # the errno's subclass, e.g. ENOSPC
    named.__cause__ = exc
    return named


@contextmanager
def _naming(filename: object) -> Iterator[None]:
    """An OSError raised inside names `filename` (see `_named`)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise _named(exc, filename) from exc


def _number(value: float | None) -> str:
    """A CSV cell: 6 significant digits, empty for None."""
    return "" if value is None else f"{value:.6g}"


def _safe_relative(name: str) -> Path:
    """A relative output path for an input name, never escaping the output folder: names relative to an input
    folder are mirrored; absolute paths or paths that climb out (..) keep only the file name."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts:
        return Path(path.name or "image")
    parts = [p for p in path.parts if p not in ("", ".")]
    return Path(*parts) if parts else Path("image")
