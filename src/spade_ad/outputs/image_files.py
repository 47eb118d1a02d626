"""The per-image files of predictions (overlays, masks, heat maps, raw maps, explanations): which ones are asked for
(`parse_outputs`), how each is drawn and written (`ImageFiles`), and the pool of threads that writes them off the
scoring thread (`FilePool`).

`ImageFiles` holds no open file and can be built wherever the image was scored (a Ray actor writes the files of the
images it scored, the driver only the rows: `spade_ad.apps.distributed`). Each file is written under a temporary name
beside it (`.<name>.<pid>-<random>.partial`) and renamed into place (`os.replace`, `write_whole`), so a file by its
own name is always whole, and writing it again (a retried batch) replaces it whole; `remove_partials` clears what a
killed writer left. PNG files are deflated by ISA-L at `PNG_LEVEL`, chosen by measurement (docs/outputs.md).
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import OutputError
from ..estimators.detector import Detector
from ..estimators.prediction import Prediction
from .png import save_png
from .visualize import heatmap, overlay_picture, threshold_color_range, why_picture

#: Writes one per-image file: (save(path), folder, stem, suffix).
Saver = Callable[[Callable[[Path], object], str, str, str], None]


#: The folders of per-image files, and how a file being written is named until it is renamed into place.
IMAGE_FOLDERS = ("heatmaps", "overlays", "masks", "maps", "explain")


PARTIAL_SUFFIX = ".partial"


#: The per-image files one may ask for, and the folder each is written to (table in the module docstring).
OUTPUT_FOLDERS = {"overlay": "overlays", "mask": "masks", "heatmap": "heatmaps", "map": "maps"}


#: What a person looks at and what a machine reads, nothing twice (the overlay shows the heat).
DEFAULT_OUTPUTS = ("overlay", "mask")


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
        with naming_errors(target):
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


class FilePool:
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


def named_error(exc: OSError, filename: object) -> OSError:
    """`exc` itself when it names its file, else the same error naming `filename` (a failed flush names none)."""
    if exc.filename is not None or filename is None:
        return exc
    named = OSError(exc.errno, exc.strerror or str(exc), str(filename))  # the errno's subclass, e.g. ENOSPC
    named.__cause__ = exc
    return named


@contextmanager
def naming_errors(filename: object) -> Iterator[None]:
    """An OSError raised inside names `filename` (see `named_error`)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise named_error(exc, filename) from exc
