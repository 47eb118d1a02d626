"""Writing predictions to a folder as they are made: scores.csv row by row, the defect regions of each image
(regions.jsonl), a heat map and an annotated overlay PNG per image, and optionally the raw float32 map at the
original size as a TIFF (what the official MVTec evaluation reads).

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

Per-image files (heat maps, overlays, masks, maps, explanations) are written by `ImageFiles`, which holds no open
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
not write again are left in place.
"""

from __future__ import annotations

import csv
import json
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO

import numpy as np
import tifffile
from PIL import Image

from .detector import Detector
from .errors import ImageReadError, OutputError
from .prediction import Prediction
from .visualize import annotate, heatmap, overlay, save_png, threshold_color_range, verdict_label, why_picture

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
    """The per-image files of predictions in `out_dir`: heatmaps/<stem>.png, overlays/<stem>.png (annotated with
    region boxes and a verdict label with `verdicts`), masks/<stem>.png (with `verdicts`), maps/<stem>.tiff (with
    `save_maps`) and explain/<stem>.png (with `thumbnails`, for flagged images), each written whole (a temporary
    file renamed into place). Holds no open file: one can be made in every process that scores images, and
    `write` may be called again for the same stem (the files are replaced whole)."""

    def __init__(self, out_dir: str | Path, *, save_maps: bool = False, value_range: tuple[float, float] | None = None,
                 verdicts: bool = False, thumbnails: list[np.ndarray] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.save_maps = save_maps
        self.value_range = value_range
        self.verdicts = verdicts
        self.thumbnails = thumbnails  # the model's training thumbnails: explain/<stem>.png when given

    @classmethod
    def for_model(cls, model: Detector, out_dir: str | Path, *, save_maps: bool = False,
                  explain: bool = False) -> ImageFiles:
        """Files set up for `model` (as `PredictionWriter.for_model` sets them up)."""
        return cls(out_dir, save_maps=save_maps, value_range=threshold_color_range(model.pixel_threshold_),
                   verdicts=model.image_threshold_ is not None, thumbnails=model.thumbnails_ if explain else None)

    def write(self, prediction: Prediction, stem: str, *, saver: Saver | None = None) -> None:
        """The files of one prediction under `stem` (nothing without its original-size map). A failed write raises
        an OSError naming the file, and leaves no file by that name half-written. `saver(save, folder, stem,
        suffix)` writes each file instead of `self._save` (a writer that also notes where the files went)."""
        full_map = prediction.original_map
        if full_map is None:
            return
        save_file = saver or self._save
        if self.save_maps:
            save_file(lambda target: tifffile.imwrite(target, full_map.astype(np.float32)), "maps", stem, ".tiff")
        vmin, vmax = self.value_range if self.value_range else (None, None)
        save_file(lambda target: save_png(heatmap(full_map, vmin, vmax), target), "heatmaps", stem)
        mask = prediction.defect_mask if self.verdicts else None
        if mask is not None:
            mask_png = Image.fromarray(mask.astype(np.uint8) * 255)
            save_file(lambda target: save_png(mask_png, target), "masks", stem)
        if prediction.image is not None:
            shown = overlay(prediction.image, full_map, vmin, vmax, mask=mask)
            if self.verdicts:
                shown = annotate(
                    shown, prediction.regions, verdict_label(prediction.is_anomalous, prediction.normalized_score),
                    anomalous=prediction.is_anomalous, map_shape=full_map.shape,
                )
            save_file(lambda target: save_png(shown, target), "overlays", stem)
            if prediction.is_anomalous and self.thumbnails:
                why = why_picture(prediction, self.thumbnails)
                save_file(lambda target: save_png(why, target), "explain", stem)

    def _save(self, save: Callable[[Path], object], folder: str, stem: str, suffix: str = ".png") -> None:
        """Write one file OUT/folder/<stem><suffix> whole (its folders made first); an OSError names the file."""
        target = self.out_dir / folder / f"{stem}{suffix}"
        with _naming(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            write_whole(target, save)


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


def remove_partials(out_dir: str | Path) -> int:
    """Remove the temporary files a killed writer left in the per-image folders of `out_dir`; how many."""
    removed = 0
    for folder in IMAGE_FOLDERS:
        root = Path(out_dir) / folder
        if root.is_dir():
            for leftover in root.rglob(f".*{PARTIAL_SUFFIX}"):
                leftover.unlink(missing_ok=True)
                removed += 1
    return removed


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

    Layout (formats in the module docstring): scores.csv, regions.jsonl (with `verdicts`), heatmaps/<name>.png,
    overlays/<name>.png (annotated: region boxes with their peak scores and a verdict label, with `verdicts`),
    masks/<name>.png (predicted defect pixels, with `verdicts`), maps/<name>.tiff (with `save_maps`), skipped.csv
    (inputs that could not be read, when any). `<name>` is the input's path relative to the folder it was found in,
    so the output mirrors the input tree; every input gets its own files (numbered suffixes, see the module docstring).
    `value_range` fixes the heat maps' colour scale (see `threshold_color_range`). A folder holding an earlier run's
    scores.csv is refused unless `overwrite` (True by default here; the CLI's --overwrite is off by default).
    The rows are this writer's; the per-image files are its `images` (`ImageFiles`), which another process may
    write instead (`write_row` then writes the rows only).
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
    ) -> None:
        self.out_dir = Path(out_dir)
        self.images = ImageFiles(out_dir, save_maps=save_maps, value_range=value_range, verdicts=verdicts,
                                 thumbnails=thumbnails)
        self.overwrite = overwrite
        self._taken: set[str] = set()
        self.verdicts = verdicts
        self.count = 0
        self.skipped: list[tuple[str, str]] = []
        self._csv_file: IO[str] | None = None
        self._regions_file: IO[str] | None = None
        self._skip_file: IO[str] | None = None

    @classmethod
    def for_model(cls, model: Detector, out_dir: str | Path, *, save_maps: bool = False,
                  overwrite: bool = True, explain: bool = False) -> PredictionWriter:
        """A writer set up for `model`: verdict and region columns, regions.jsonl and annotated overlays when it has
        thresholds; its shared heat-map scale; with `explain`, the "why" pictures from its training thumbnails."""
        return cls(
            out_dir, save_maps=save_maps, value_range=threshold_color_range(model.pixel_threshold_),
            verdicts=model.image_threshold_ is not None, overwrite=overwrite,
            thumbnails=model.thumbnails_ if explain else None,
        )

    def __enter__(self) -> PredictionWriter:
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
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close every file, even when closing one fails (e.g. a disk full while flushing); the first such error is
        raised unless an error is already on its way out."""
        failure: OSError | None = None
        for handle in (self._csv_file, self._regions_file, self._skip_file):
            if handle is not None:
                try:
                    handle.close()
                except OSError as exc:
                    failure = failure or _named(exc, handle.name)
        if failure is not None and exc_info[0] is None:
            raise failure

    def write(self, prediction: Prediction) -> None:
        """Append one result: its CSV row and regions line first (flushed), then its images. A failed write raises
        an OSError naming the file."""
        self.write_row(prediction)
        if prediction.original_map is not None:
            self.images.write(prediction, self._output_stem(prediction.name), saver=self._save)

    def _save(self, save: Callable[[Path], object], folder: str, stem: str, suffix: str = ".png") -> None:
        """Write one per-image file whole (`ImageFiles`); a subclass may note where it went."""
        self.images._save(save, folder, stem, suffix)

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

    def write_all(self, predictions: Iterable[Prediction]) -> int:
        for prediction in predictions:
            self.write(prediction)
        return self.count


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
