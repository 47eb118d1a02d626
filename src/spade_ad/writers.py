"""Writing predictions to a folder as they are made: scores.csv row by row, a heat map and an overlay PNG per image,
and optionally the raw float32 map at the original size as a TIFF (what the official MVTec evaluation reads).

Rows are flushed one at a time, so a crash at image 900 keeps the first 899 results.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import IO

import numpy as np
import tifffile
from PIL import Image

from .errors import ImageReadError
from .model import Prediction, Spade
from .visualize import heatmap, overlay, save_png, threshold_color_range


class PredictionWriter:
    """Streams predictions into `out_dir`. Use as a context manager; `write` one Prediction at a time.

    Layout: scores.csv (path,score[,is_anomalous]), heatmaps/<name>.png, overlays/<name>.png, masks/<name>.png
    (predicted defect pixels, with `verdicts`), maps/<name>.tiff (with `save_maps`), skipped.csv (inputs that could
    not be read, when any). `<name>` is the input's path relative to the folder it was found in, so the output
    mirrors the input tree. `value_range` fixes the heat maps' colour scale (see `threshold_color_range`).
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
        self._skip_file: IO[str] | None = None

    @classmethod
    def for_model(cls, model: Spade, out_dir: str | Path, *, save_maps: bool = False) -> PredictionWriter:
        """A writer set up for `model`: its verdict column when it has thresholds, its shared heat-map scale."""
        return cls(
            out_dir, save_maps=save_maps, value_range=threshold_color_range(model.pixel_threshold_),
            verdicts=model.image_threshold_ is not None,
        )

    def __enter__(self) -> PredictionWriter:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._csv_file = open(self.out_dir / "scores.csv", "w", newline="", encoding="utf-8")
        self._csv = csv.writer(self._csv_file)
        self._csv.writerow(["path", "score"] + (["is_anomalous"] if self.verdicts else []))
        self._csv_file.flush()
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in (self._csv_file, self._skip_file):
            if handle is not None:
                handle.close()

    def write(self, prediction: Prediction) -> None:
        """Append one result: its CSV row first (flushed), then its images."""
        assert self._csv_file is not None, "use PredictionWriter as a context manager"
        row: list[object] = [prediction.name, f"{prediction.score:.6g}"]
        if self.verdicts:
            row.append(int(bool(prediction.is_anomalous)))
        self._csv.writerow(row)
        self._csv_file.flush()
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
            save_png(
                overlay(prediction.image, full_map, vmin, vmax, mask=mask),
                self.out_dir / "overlays" / relative.with_suffix(".png"),
            )

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


def _safe_relative(name: str) -> Path:
    """A relative output path for an input name, never escaping the output folder: names relative to an input
    folder are mirrored; absolute paths or paths that climb out (..) keep only the file name."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts:
        return Path(path.name or "image")
    parts = [p for p in path.parts if p not in ("", ".")]
    return Path(*parts) if parts else Path("image")
