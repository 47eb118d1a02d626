"""`spade-ad predict` (and `fit`) against hostile inputs and a hostile disk: one line and an exit code, never a
traceback, and nothing written before a fault is lost.

Images whose network input would be huge (thin strips), NaN pixels, an output folder holding an earlier run, an
output path that is a file, inputs with the same name, a folder that cannot be written, a disk that fills up while
scores or images are written, and a model file that cannot be renamed into place.
"""

from __future__ import annotations

import builtins
import csv
import errno
import functools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from PIL import Image

from cli_run import run_cli
from spade_ad import Spade
from spade_ad.data.synthetic import make_synthetic_dataset
from spade_ad.estimators import spade as model_module


@pytest.fixture(scope="module", autouse=True)
def _one_backbone() -> Iterator[None]:
    """Every `load` in this module reuses one built backbone (building it takes seconds; it is what these tests
    do not exercise)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(model_module, "build_backbone", functools.cache(model_module.build_backbone))
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model file, folder of 9 readable images) from a tiny synthetic dataset (64 x 64, image_size 64)."""
    base = tmp_path_factory.mktemp("hardening")
    root = make_synthetic_dataset(base / "data", n_train=6, n_test_good=1, n_test_defect=1, size=(64, 64), seed=0)
    model = Spade(k_gallery=2, device="cpu", progress=False, image_size=64).fit(root / "train" / "good")
    images = base / "images"
    images.mkdir()
    sources = sorted(p for p in root.rglob("*.png") if "ground_truth" not in p.relative_to(root).parts)
    for i, path in enumerate(sources):
        shutil.copy(path, images / f"img_{i:02d}.png")
    assert len(list(images.iterdir())) == 9
    return model.save(base / "model.safetensors"), images


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """Exit code and stderr lines of `spade-ad ARGS` run in-process."""
    capsys.readouterr()
    code = run_cli(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.strip().splitlines()


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _images_with(tiny: tuple[Path, Path], folder: Path, extra: dict[str, Any]) -> Path:
    """A copy of the 9 readable images plus `extra` {name: PIL image, or bytes}."""
    shutil.copytree(tiny[1], folder)
    for name, content in extra.items():
        if isinstance(content, Image.Image):
            content.save(folder / name)
        else:
            (folder / name).write_bytes(content)
    return folder


THIN = {"thin_2000x8.png": Image.new("RGB", (2000, 8), (90, 90, 90)),
        "thin_20000x8.png": Image.new("RGB", (20000, 8), (90, 90, 90))}


# ---------------------------------------------------------------- 1. thin and huge images


def test_thin_images_stop_with_one_line(tiny: tuple[Path, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A 153-byte 2000 x 8 PNG would be a 64 x 16,000 input here (224 x 56,000 at the default size): refused."""
    assert len(_png_bytes(THIN["thin_2000x8.png"])) < 400
    folder = _images_with(tiny, tmp_path / "in", THIN)
    code, err = run(["predict", tiny[0], folder, "-o", tmp_path / "out"], capsys)
    assert code == 2 and len(err) == 1
    assert "thin_20000x8.png" in err[0] and "network input" in err[0] and "squash" in err[0]
    assert len(rows(tmp_path / "out" / "scores.csv")) == 9  # the images read before it are scored and kept
    only = tmp_path / "only"
    only.mkdir()
    THIN["thin_2000x8.png"].save(only / "strip.png")
    code, err = run(["predict", tiny[0], only / "strip.png", "-o", tmp_path / "out2"], capsys)
    assert code == 2 and len(err) == 1 and "strip.png" in err[0] and "250:1" in err[0]


def test_thin_images_are_skipped_and_listed_with_skip_bad(tiny: tuple[Path, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    folder = _images_with(tiny, tmp_path / "in", THIN)
    code, err = run(["predict", tiny[0], folder, "-o", tmp_path / "out", "--skip-bad"], capsys)
    assert code == 0
    skipped = rows(tmp_path / "out" / "skipped.csv")
    assert sorted(r["path"] for r in skipped) == sorted(THIN)
    assert all("network input" in r["reason"] for r in skipped)
    assert sum("skipped:" in line for line in err) == 2
    scored = rows(tmp_path / "out" / "scores.csv")
    assert len(scored) == 9 and not any(r["path"].startswith("thin") for r in scored)


def test_fit_refuses_a_thin_training_image(tiny: tuple[Path, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    folder = _images_with(tiny, tmp_path / "train", {"thin_2000x8.png": THIN["thin_2000x8.png"]})
    code, err = run(["fit", folder, "-o", tmp_path / "m.safetensors", "--image-size", "64", "--device", "cpu"],
                    capsys)
    assert code == 2 and len(err) == 1 and "thin_2000x8.png" in err[0]
    assert not (tmp_path / "m.safetensors").exists()


# ---------------------------------------------------------------- 2. NaN pixels


def test_nan_tiff_stops_or_is_skipped(tiny: tuple[Path, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    buffer = tmp_path / "nan.tif"
    pixels = np.ones((64, 64), np.float32)
    pixels[10, 10] = np.nan
    tifffile.imwrite(buffer, pixels)
    folder = _images_with(tiny, tmp_path / "in", {"nan.tif": buffer.read_bytes()})
    code, err = run(["predict", tiny[0], folder, "-o", tmp_path / "out"], capsys)
    assert code == 2 and len(err) == 1 and "nan.tif" in err[0] and "NaN/inf" in err[0]
    code, _ = run(["predict", tiny[0], folder, "-o", tmp_path / "out2", "--skip-bad"], capsys)
    assert code == 0 and [r["path"] for r in rows(tmp_path / "out2" / "skipped.csv")] == ["nan.tif"]


# ---------------------------------------------------------------- 3. output folder safety


def test_second_run_into_the_same_folder_keeps_the_first_runs_scores(
    tiny: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert run(["predict", tiny[0], tiny[1], "-o", out], capsys)[0] == 0
    first = (out / "scores.csv").read_bytes()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "000.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")  # a run that would fail at once
    code, err = run(["predict", tiny[0], broken, "-o", out], capsys)
    assert code == 2 and len(err) == 1 and str(out) in err[0] and "--overwrite" in err[0]
    assert (out / "scores.csv").read_bytes() == first
    code, err = run(["predict", tiny[0], broken, "-o", out, "--overwrite", "--skip-bad"], capsys)
    assert code == 0 and rows(out / "scores.csv") == [] and len(rows(out / "skipped.csv")) == 1
    code, _ = run(["predict", tiny[0], tiny[1], "-o", out, "--overwrite"], capsys)
    assert code == 0 and len(rows(out / "scores.csv")) == 9 and not (out / "skipped.csv").exists()


def test_output_path_that_is_a_file(tiny: tuple[Path, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep me")
    for target in (a_file, a_file / "sub"):
        code, err = run(["predict", tiny[0], tiny[1], "-o", target], capsys)
        assert code == 2 and len(err) == 1 and "is a file" in err[0] and str(a_file) in err[0]
    assert a_file.read_text() == "keep me"


def _two_x_png(tmp_path: Path, tiny: tuple[Path, Path]) -> tuple[Path, Path]:
    """a/x.png and b/x.png: two different images with the same file name."""
    sources = sorted(tiny[1].iterdir())
    for folder, source in (("a", sources[0]), ("b", sources[-1])):
        (tmp_path / folder).mkdir()
        shutil.copy(source, tmp_path / folder / "x.png")
    return tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"


def test_same_file_names_from_different_folders_keep_their_own_outputs(
    tiny: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = _two_x_png(tmp_path, tiny)
    out = tmp_path / "out"
    assert run(["predict", tiny[0], a, b, "-o", out, "--save-maps"], capsys)[0] == 0  # absolute paths: file names
    assert [r["path"] for r in rows(out / "scores.csv")] == [a.as_posix(), b.as_posix()]
    for folder, suffix in (("overlays", ".png"), ("masks", ".png"), ("maps", ".tiff")):
        assert sorted(p.name for p in (out / folder).iterdir()) == [f"x{suffix}", f"x~2{suffix}"]
    assert not np.array_equal(tifffile.imread(out / "maps" / "x.tiff"), tifffile.imread(out / "maps" / "x~2.tiff"))
    monkeypatch.chdir(tmp_path)  # relative paths: mirrored
    assert run(["predict", tiny[0], "a/x.png", "b/x.png", "-o", "rel"], capsys)[0] == 0
    assert sorted(p.relative_to(tmp_path / "rel" / "overlays").as_posix()
                  for p in (tmp_path / "rel" / "overlays").rglob("*.png")) == ["a/x.png", "b/x.png"]
    assert run(["predict", tiny[0], "a", "b", "-o", "folders"], capsys)[0] == 0  # folders: under their names
    assert sorted(p.name for p in (tmp_path / "folders" / "overlays").iterdir()) == ["a", "b"]


# ---------------------------------------------------------------- 4. I/O faults


def test_unwritable_output_folder_is_one_line(tiny: tuple[Path, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """chmod 0o500 does not stop root (the tests' user): the writer's open() is refused instead."""
    out = tmp_path / "out"

    def refused(file: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(file).parent == out:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr("spade_ad.outputs.writers.open", refused, raising=False)
    code, err = run(["predict", tiny[0], tiny[1], "-o", out], capsys)
    assert code == 1 and len(err) == 1 and "scores.csv" in err[0] and "Permission denied" in err[0]


class _FullDisk:
    """A text file on a disk that fills up: `room` flushes reach the disk, later ones fail with ENOSPC (naming no
    file, as a real flush does) and what they held stays pending; closing with data pending fails too."""

    def __init__(self, handle: Any, room: int) -> None:
        self._handle, self._room, self._pending = handle, room, ""
        self.name = handle.name

    def write(self, text: str) -> int:
        self._pending += text
        return len(text)

    def flush(self) -> None:
        if self._room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= 1
        self._handle.write(self._pending)
        self._handle.flush()
        self._pending = ""

    def close(self) -> None:
        self._handle.close()
        if self._pending:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_writing_scores_keeps_every_row_before_it(
    tiny: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def filling(file: Any, *args: Any, **kwargs: Any) -> Any:
        handle = builtins.open(file, *args, **kwargs)
        return _FullDisk(handle, room=1 + 3) if Path(file).name == "scores.csv" else handle  # header + 3 rows

    monkeypatch.setattr("spade_ad.outputs.writers.open", filling, raising=False)
    out = tmp_path / "out"
    code, err = run(["predict", tiny[0], tiny[1], "-o", out], capsys)
    assert code == 1 and len(err) == 1
    assert str(out / "scores.csv") in err[0] and "No space left on device" in err[0]
    assert [r["path"] for r in rows(out / "scores.csv")] == [f"img_{i:02d}.png" for i in range(3)]


def test_disk_full_while_writing_images_keeps_every_row_before_it(
    tiny: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from spade_ad.outputs import image_files

    real = image_files.save_png

    def filling(image: Any, path: Path, **kwargs: Any) -> None:
        # the 3rd image's mask (its temporary name, .img_02.png.<pid>-<random>.partial) finds the disk full: a PIL
        # write with no file name on it. Files are written by the writer's pool, so the file is told by its name.
        if Path(path).parent.name == "masks" and Path(path).name.startswith(".img_02.png."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(image, path, **kwargs)

    monkeypatch.setattr(image_files, "save_png", filling)
    out = tmp_path / "out"
    code, err = run(["predict", tiny[0], tiny[1], "-o", out], capsys)
    assert code == 1 and len(err) == 1 and "No space left on device" in err[0] and ".png" in err[0]
    assert str(out / "masks" / "img_02.png") in err[0]
    written = [r["path"] for r in rows(out / "scores.csv")]
    # every row before it is kept, in input order (the rows of images scored while its files were being written,
    # on the pool, may follow it: their scores are whole)
    assert written == [f"img_{i:02d}.png" for i in range(len(written))] and len(written) >= 3


def test_model_that_cannot_be_renamed_into_place(tiny: tuple[Path, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "models" / "m.safetensors"

    def refused(source: Any, destination: Any) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(source), None, str(destination))

    monkeypatch.setattr("spade_ad.data.modelfile.os.replace", refused)
    code, err = run(["fit", tiny[1], "-o", target, "--image-size", "64", "--k-gallery", "2", "--device", "cpu"],
                    capsys)
    assert code == 1 and len(err) == 1 and "Permission denied" in err[0]
    assert list(target.parent.iterdir()) == []  # neither the model nor a partial file


def _png_bytes(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
