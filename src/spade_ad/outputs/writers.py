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
drawn; at most a few images wait, so a slow disk slows scoring down rather than filling memory. Rows are written on
the caller's thread, in input order, before the image's files; closing the writer (leaving the `with` block, also
on an error) waits for every file under way.

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

Per-image files (overlays, masks, heat maps, maps, explanations) are drawn and written whole by
`spade_ad.outputs.image_files.ImageFiles`, which the writer holds as `images`.

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
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import IO

import numpy as np

from ..errors import ImageReadError, OutputError
from ..estimators.detector import Detector
from ..estimators.prediction import Prediction
from .image_files import FilePool, ImageFiles, named_error, naming_errors, remove_partials
from .visualize import threshold_color_range

SCORE_COLUMNS = ["path", "score"]


VERDICT_COLUMNS = ["normalized_score", "p_value", "is_anomalous", "regions", "largest_region_area"]


REGIONS_FILE = "regions.jsonl"


SCORES_FILE = "scores.csv"


SKIPPED_FILE = "skipped.csv"


#: Callbacks of `PredictionWriter.subscribe`.
OnWritten = Callable[[Prediction, dict[str, Path]], None]


OnSkipped = Callable[[str, ImageReadError], None]


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
        self._pool: FilePool | None = None
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
            self._pool = FilePool(self.workers, depth=2 * self.workers + 2)
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
                    failure = failure or named_error(exc, handle.name)
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
        with naming_errors(self._csv_file.name):
            self._csv.writerow(self.row(prediction))
            self._csv_file.flush()
        if self._regions_file is not None:
            with naming_errors(self._regions_file.name):
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
        with naming_errors(self.out_dir / SKIPPED_FILE):
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
