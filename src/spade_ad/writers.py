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

Rows and lines are flushed one at a time, so a crash at image 900 keeps the first 899 results.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import IO

import numpy as np
import tifffile
from PIL import Image

from .errors import ImageReadError
from .model import Spade
from .prediction import Prediction
from .visualize import annotate, heatmap, overlay, save_png, threshold_color_range, verdict_label

SCORE_COLUMNS = ["path", "score"]
VERDICT_COLUMNS = ["normalized_score", "p_value", "is_anomalous", "regions", "largest_region_area"]
REGIONS_FILE = "regions.jsonl"


class PredictionWriter:
    """Streams predictions into `out_dir`. Use as a context manager; `write` one Prediction at a time.

    Layout (formats in the module docstring): scores.csv, regions.jsonl (with `verdicts`), heatmaps/<name>.png,
    overlays/<name>.png (annotated: region boxes with their peak scores and a verdict label, with `verdicts`),
    masks/<name>.png (predicted defect pixels, with `verdicts`), maps/<name>.tiff (with `save_maps`), skipped.csv
    (inputs that could not be read, when any). `<name>` is the input's path relative to the folder it was found in,
    so the output mirrors the input tree. `value_range` fixes the heat maps' colour scale (see `threshold_color_range`).
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        save_maps: bool = False,
        value_range: tuple[float, float] | None = None,
        verdicts: bool = False,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.save_maps = save_maps
        self.value_range = value_range
        self.verdicts = verdicts
        self.count = 0
        self.skipped: list[tuple[str, str]] = []
        self._csv_file: IO[str] | None = None
        self._regions_file: IO[str] | None = None
        self._skip_file: IO[str] | None = None

    @classmethod
    def for_model(cls, model: Spade, out_dir: str | Path, *, save_maps: bool = False) -> PredictionWriter:
        """A writer set up for `model`: verdict and region columns, regions.jsonl and annotated overlays when it has
        thresholds; its shared heat-map scale."""
        return cls(
            out_dir, save_maps=save_maps, value_range=threshold_color_range(model.pixel_threshold_),
            verdicts=model.image_threshold_ is not None,
        )

    def __enter__(self) -> PredictionWriter:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._csv_file = open(self.out_dir / "scores.csv", "w", newline="", encoding="utf-8")
        self._csv = csv.writer(self._csv_file)
        self._csv.writerow(SCORE_COLUMNS + (VERDICT_COLUMNS if self.verdicts else []))
        self._csv_file.flush()
        if self.verdicts:
            self._regions_file = open(self.out_dir / REGIONS_FILE, "w", encoding="utf-8")
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in (self._csv_file, self._regions_file, self._skip_file):
            if handle is not None:
                handle.close()

    def write(self, prediction: Prediction) -> None:
        """Append one result: its CSV row and regions line first (flushed), then its images."""
        assert self._csv_file is not None, "use PredictionWriter as a context manager"
        self._csv.writerow(self.row(prediction))
        self._csv_file.flush()
        if self._regions_file is not None:
            line = {"path": prediction.name, "regions": [region.to_json() for region in prediction.regions]}
            self._regions_file.write(json.dumps(line) + "\n")
            self._regions_file.flush()
        self.count += 1
        full_map = prediction.original_map
        if full_map is None:
            return
        relative = _safe_relative(prediction.name)
        if self.save_maps:
            target = self.out_dir / "maps" / relative.with_suffix(".tiff")
            target.parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(target, full_map.astype(np.float32))
        vmin, vmax = self.value_range if self.value_range else (None, None)
        save_png(heatmap(full_map, vmin, vmax), self.out_dir / "heatmaps" / relative.with_suffix(".png"))
        mask = prediction.defect_mask if self.verdicts else None
        if mask is not None:
            mask_png = Image.fromarray(mask.astype(np.uint8) * 255)
            save_png(mask_png, self.out_dir / "masks" / relative.with_suffix(".png"))
        if prediction.image is not None:
            shown = overlay(prediction.image, full_map, vmin, vmax, mask=mask)
            if self.verdicts:
                shown = annotate(
                    shown, prediction.regions, verdict_label(prediction.is_anomalous, prediction.normalized_score),
                    anomalous=prediction.is_anomalous, map_shape=full_map.shape,
                )
            save_png(shown, self.out_dir / "overlays" / relative.with_suffix(".png"))

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

    def skip(self, name: str, error: ImageReadError) -> None:
        """Record an input that could not be read (skipped.csv in the output folder)."""
        if self._skip_file is None:
            self._skip_file = open(self.out_dir / "skipped.csv", "w", newline="", encoding="utf-8")
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
