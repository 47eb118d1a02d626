"""PredictionWriter: scores.csv columns and values, the regions file, annotated overlays, and what survives a crash."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from PIL import Image

from spade_ad import Spade
from spade_ad.errors import ImageReadError, OutputError
from spade_ad.estimators.prediction import Prediction
from spade_ad.outputs.image_files import DEFAULT_OUTPUTS, PARTIAL_SUFFIX, ImageFiles, parse_outputs, remove_partials
from spade_ad.outputs.visualize import BOX_COLOR, heat_level, legend_box, overlay_picture
from spade_ad.outputs.writers import (
    REGIONS_FILE,
    SCORE_COLUMNS,
    VERDICT_COLUMNS,
    PredictionWriter,
    check_output_dir,
    output_stems,
    read_regions,
)


@pytest.fixture(scope="module")
def predictions(fitted_model: Spade, synthetic_root: Path) -> list[Prediction]:
    """Every synthetic test image, with its original-size map and decoded image (as `spade-ad predict` asks)."""
    return list(fitted_model.iter_predict(synthetic_root / "test", original_size=True, keep_images=True))


@pytest.fixture(scope="module")
def written(fitted_model: Spade, predictions: list[Prediction], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("writer") / "out"
    with PredictionWriter.for_model(fitted_model, out) as writer:
        writer.write_all(predictions)
    return out


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _six(value: float) -> float:
    return float(f"{value:.6g}")


def test_csv_columns_and_values_match_the_predictions(written: Path, predictions: list[Prediction]) -> None:
    rows = _rows(written / "scores.csv")
    assert list(rows[0]) == SCORE_COLUMNS + VERDICT_COLUMNS == [
        "path", "score", "normalized_score", "p_value", "is_anomalous", "regions", "largest_region_area",
    ]
    assert [r["path"] for r in rows] == [p.name for p in predictions]
    for row, prediction in zip(rows, predictions):
        assert float(row["score"]) == _six(prediction.score)
        assert prediction.normalized_score is not None and prediction.p_value is not None
        assert float(row["normalized_score"]) == _six(prediction.normalized_score)
        assert float(row["p_value"]) == _six(prediction.p_value)
        assert row["is_anomalous"] == str(int(bool(prediction.is_anomalous)))
        assert int(row["regions"]) == len(prediction.regions)
        assert int(row["largest_region_area"]) == max((r.area for r in prediction.regions), default=0)
        assert (float(row["normalized_score"]) > 1) == (row["is_anomalous"] == "1")  # 1 = the threshold
    assert any(int(r["regions"]) > 0 for r in rows)  # some defects were found and boxed


def test_regions_file_round_trips(written: Path, predictions: list[Prediction]) -> None:
    lines = (written / REGIONS_FILE).read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(predictions)  # one line per image, in scores.csv order
    first = json.loads(lines[0])
    assert set(first) == {"path", "regions"} and first["path"] == predictions[0].name
    regions = read_regions(written)
    assert regions == {p.name: [r.to_json() for r in p.regions] for p in predictions}
    assert read_regions(written / REGIONS_FILE) == regions
    for found in regions.values():
        for region in found:
            assert set(region) == {"box", "area", "peak", "mean"}
            left, top, right, bottom = region["box"]
            assert 0 <= left < right <= 224 and 0 <= top < bottom <= 160  # original-image pixels (224 x 160)


def test_overlay_of_an_anomalous_image_shows_heat_only_where_it_matters(written: Path,
                                                                       predictions: list[Prediction]) -> None:
    """The file is `overlay_picture`'s pixels: the image untouched below the heat level, heat above it, the region
    boxes with their peaks, the verdict label and the scale legend."""
    prediction = next(p for p in predictions if p.regions)
    assert prediction.original_map is not None and prediction.image is not None
    saved = np.asarray(Image.open((written / "overlays" / prediction.name).with_suffix(".png")).convert("RGB"))
    np.testing.assert_array_equal(saved, np.asarray(overlay_picture(prediction)))
    photo = np.asarray(prediction.image.convert("RGB"))
    assert saved.shape == photo.shape
    left, top, right, bottom = prediction.regions[0].box
    assert tuple(saved[bottom - 1, right - 1]) == BOX_COLOR  # the box's bottom-right corner
    marked = np.zeros(photo.shape[:2], dtype=bool)
    marked[:20, :120] = True  # the corner label ("DEFECT 1.23")
    for region in prediction.regions:  # each box, with its peak score above it (or just inside it)
        left, top, right, bottom = region.box
        marked[max(0, top - 20):bottom, left:max(right, left + 60)] = True
    legend_left, legend_top, legend_right, legend_bottom = legend_box(prediction.image.size)
    marked[legend_top:legend_bottom, legend_left:legend_right] = True
    level = heat_level(prediction.pixel_threshold)
    assert level is not None
    cool = np.nan_to_num(prediction.original_map, nan=-np.inf) < level
    differs = np.any(saved != photo, axis=-1)
    assert cool.any() and not differs[cool & ~marked].any()  # below the level: the part as it is
    hot = ~cool & ~marked
    assert hot.any() and differs[hot].mean() > 0.9  # above it: heat


def test_no_thresholds_means_score_column_only(predictions: list[Prediction], tmp_path: Path) -> None:
    with PredictionWriter(tmp_path) as writer:
        writer.write(predictions[0])
    rows = _rows(tmp_path / "scores.csv")
    assert list(rows[0]) == ["path", "score"]
    assert not (tmp_path / REGIONS_FILE).exists()


def test_missing_values_are_empty_cells(predictions: list[Prediction], tmp_path: Path) -> None:
    bare = dataclasses.replace(predictions[0], p_value=None, normalized_score=None, original_map=None, image=None)
    with PredictionWriter(tmp_path, verdicts=True) as writer:
        writer.write(bare)
    [row] = _rows(tmp_path / "scores.csv")
    assert row["p_value"] == "" and row["normalized_score"] == "" and row["score"] != ""


def test_rows_and_regions_are_on_disk_before_the_writer_closes(
    fitted_model: Spade, predictions: list[Prediction], tmp_path: Path
) -> None:
    with PredictionWriter.for_model(fitted_model, tmp_path) as writer:
        writer.write(predictions[-1])
        assert len(_rows(tmp_path / "scores.csv")) == 1  # flushed: a crash now keeps it
        assert list(read_regions(tmp_path)) == [predictions[-1].name]
        with open(tmp_path / REGIONS_FILE, "a", encoding="utf-8") as handle:
            handle.write('{"path": "cut sho')  # a line cut short by a crash is skipped when reading
        assert list(read_regions(tmp_path)) == [predictions[-1].name]


def test_every_input_gets_its_own_files(predictions: list[Prediction], tmp_path: Path) -> None:
    """Same relative name from two folders, same stem with another extension, names differing only in case, the same
    file twice: numbered suffixes in scores.csv order, never one input's images over another's."""
    names = ["/data/a/x.png", "/data/b/x.png", "x.tif", "X.png", "/data/a/x.png", "sub/img.v2.png", "sub/img.v2.png"]
    shown = [dataclasses.replace(predictions[i % len(predictions)], name=name) for i, name in enumerate(names)]
    with PredictionWriter(tmp_path, verdicts=True, outputs="all") as writer:
        writer.write_all(shown)
    expected = ["x", "x~2", "x~3", "X~4", "x~5", "sub/img.v2", "sub/img.v2~2"]
    for folder, suffix in (("heatmaps", ".png"), ("overlays", ".png"), ("masks", ".png"), ("maps", ".tiff")):
        written = sorted(p.relative_to(tmp_path / folder).as_posix() for p in (tmp_path / folder).rglob("*.*"))
        assert written == sorted(stem + suffix for stem in expected), folder
    for stem, prediction in zip(expected, shown):  # each file holds its own input's map
        assert prediction.original_map is not None
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "maps" / f"{stem}.tiff"), prediction.original_map)
    assert [r["path"] for r in _rows(tmp_path / "scores.csv")] == names


def test_earlier_results_are_refused_without_overwrite(predictions: list[Prediction], tmp_path: Path) -> None:
    with PredictionWriter(tmp_path) as writer:
        writer.write(predictions[0])
        writer.skip("bad.png", ImageReadError("bad.png", "file is empty", kind="empty"))
    before = (tmp_path / "scores.csv").read_bytes()
    with pytest.raises(OutputError, match=f"{tmp_path}.*--overwrite"):
        with PredictionWriter(tmp_path, overwrite=False):
            pass
    with pytest.raises(OutputError, match="--overwrite"):
        check_output_dir(tmp_path, overwrite=False)
    assert (tmp_path / "scores.csv").read_bytes() == before  # the first run's results are untouched
    with PredictionWriter(tmp_path, overwrite=True) as writer:
        writer.write(predictions[1])
    assert [r["path"] for r in _rows(tmp_path / "scores.csv")] == [predictions[1].name]
    assert not (tmp_path / "skipped.csv").exists()  # the earlier run's list is not this run's


def test_output_folder_that_is_a_file_is_refused(tmp_path: Path) -> None:
    a_file = tmp_path / "out"
    a_file.write_text("not a folder")
    for target in (a_file, a_file / "below"):
        with pytest.raises(OutputError, match="is a file"):
            with PredictionWriter(target):
                pass
    assert a_file.read_text() == "not a folder"


# ---------------------------------------------------------------- per-image files written where the image was scored


def test_image_files_written_apart_from_the_rows_are_the_writer_s_files(
        fitted_model: Spade, predictions: list[Prediction], written: Path, tmp_path: Path) -> None:
    """Rows from one writer (`write_row`), pictures from a pickled `ImageFiles` (as a Ray actor holds it) under the
    stems `output_stems` plans: the same files, byte for byte, as one PredictionWriter writing both."""
    import pickle

    out = tmp_path / "split"
    names = [p.name for p in predictions]
    with PredictionWriter.for_model(fitted_model, out) as writer:
        files = pickle.loads(pickle.dumps(ImageFiles.for_model(fitted_model, out)))
        for prediction, stem in zip(predictions, output_stems(names)):
            writer.write_row(prediction)
            files.write(prediction, stem)
    assert (out / "scores.csv").read_bytes() == (written / "scores.csv").read_bytes()
    assert (out / REGIONS_FILE).read_bytes() == (written / REGIONS_FILE).read_bytes()
    mine = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    theirs = sorted(p.relative_to(written).as_posix() for p in written.rglob("*") if p.is_file())
    assert mine == theirs and any(name.startswith("overlays/") for name in mine)
    for name in mine:
        assert (out / name).read_bytes() == (written / name).read_bytes(), name


def test_output_stems_number_names_as_the_writer_does() -> None:
    names = ["/data/a/x.png", "/data/b/x.png", "x.tif", "X.png", "x~2.png", "sub/img.v2.png", "sub/img.v2.png"]
    assert output_stems(names) == ["x", "x~2", "x~3", "X~4", "x~2~2", "sub/img.v2", "sub/img.v2~2"]


def test_a_file_is_replaced_whole_or_not_at_all(predictions: list[Prediction], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Writing a stem again (a retried batch) replaces its files; a write that fails half-way leaves the earlier
    file as it was and no temporary file, and names the file it was writing."""
    import errno

    from spade_ad.outputs import image_files

    files = ImageFiles(tmp_path, verdicts=True, outputs=["heatmap", "mask", "overlay", "map"])
    first, second = predictions[0], predictions[-1]
    files.write(first, "x")
    before = {p.name: p.read_bytes() for p in tmp_path.rglob("x.*")}
    assert set(before) == {"x.png", "x.tiff"} and len(list(tmp_path.rglob("x.*"))) == 4
    files.write(second, "x")  # replaced whole: the second prediction's map
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "maps" / "x.tiff"), second.original_map)
    replaced = (tmp_path / "heatmaps" / "x.png").read_bytes()
    real = image_files.save_png

    def half_then_full_disk(image: Any, path: Path, **kwargs: Any) -> None:
        Path(path).write_bytes(real(image, path, **kwargs).read_bytes()[:100])  # half a PNG, then the disk fills
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(image_files, "save_png", half_then_full_disk)
    with pytest.raises(OSError, match="No space left") as raised:
        files.write(first, "x")
    assert raised.value.filename == str(tmp_path / "heatmaps" / "x.png")
    assert (tmp_path / "heatmaps" / "x.png").read_bytes() == replaced  # untouched
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(PARTIAL_SUFFIX)]


def test_partials_left_by_a_killed_writer_are_removed(tmp_path: Path) -> None:
    for name in ("heatmaps/.a.png.1-ab.partial", "overlays/sub/.b.png.2-cd.partial", "heatmaps/a.png",
                 ".kept.partial", "other/.c.partial"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert remove_partials(tmp_path) == 2
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert left == [".kept.partial", "heatmaps/a.png", "other/.c.partial"]  # only the image folders' leftovers


# ---------------------------------------------------------------- outputs, the pool, subscribers, appending


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_outputs_choose_the_files(fitted_model: Spade, predictions: list[Prediction], tmp_path: Path) -> None:
    """By default what a person looks at and what a machine reads (overlay, mask), nothing twice; "none" leaves
    scores and regions only; "all" adds the heat map and the raw map; an unknown name names the choices."""
    prediction = predictions[-1]
    expected = {
        None: ["masks/x.png", "overlays/x.png"],
        "none": [],
        "all": ["heatmaps/x.png", "maps/x.tiff", "masks/x.png", "overlays/x.png"],
        "overlay, heatmap": ["heatmaps/x.png", "overlays/x.png"],
    }
    for outputs, files in expected.items():
        out = tmp_path / str(outputs).replace(",", "").replace(" ", "_")
        with PredictionWriter.for_model(fitted_model, out, outputs=outputs) as writer:
            writer.write(dataclasses.replace(prediction, name="x.png"))
        assert _files(out) == sorted(["regions.jsonl", "scores.csv", *files]), outputs
    assert parse_outputs(None) == DEFAULT_OUTPUTS == parse_outputs("default") == ("overlay", "mask")
    assert parse_outputs("none", save_maps=True) == ("map",) and parse_outputs([]) == ()
    with pytest.raises(OutputError, match="'heat'.*--outputs.*overlay, mask, heatmap, map"):
        parse_outputs("overlay,heat")


def test_the_pool_writes_the_same_files_as_the_caller_s_thread(
        fitted_model: Spade, predictions: list[Prediction], written: Path, tmp_path: Path) -> None:
    """Files drawn and written by the pool are byte for byte those written one after the other on the caller's
    thread; rows in input order; no temporary file left."""
    with PredictionWriter.for_model(fitted_model, tmp_path, workers=0) as writer:
        writer.write_all(predictions)
    assert _files(tmp_path) == _files(written) and any(name.startswith("masks/") for name in _files(written))
    for name in _files(written):
        assert (tmp_path / name).read_bytes() == (written / name).read_bytes(), name
    assert [r["path"] for r in _rows(written / "scores.csv")] == [p.name for p in predictions]
    assert not [p for p in written.rglob("*") if p.name.endswith(PARTIAL_SUFFIX)]


def test_a_file_failing_on_the_pool_is_raised_naming_it(predictions: list[Prediction], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails on the pool is raised by a later `write` or when the writer closes, naming its file; the
    rows written stay, in input order, every other file is whole and no temporary file is left."""
    import errno

    from spade_ad.outputs import image_files

    real = image_files.save_png
    failing = predictions[1].name

    def full_for_one(image: Any, path: Path, **kwargs: Any) -> Path:
        if Path(path).parent == (tmp_path / "overlays" / failing).parent and \
                Path(path).name.startswith(f".{Path(failing).name}."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(image, path, **kwargs)

    monkeypatch.setattr(image_files, "save_png", full_for_one)
    with pytest.raises(OSError, match="No space left") as raised:
        with PredictionWriter(tmp_path, verdicts=True) as writer:
            writer.write_all(predictions)
    assert raised.value.filename == str((tmp_path / "overlays" / failing).with_suffix(".png"))
    names = [r["path"] for r in _rows(tmp_path / "scores.csv")]
    assert names == [p.name for p in predictions][:len(names)] and len(names) >= 2
    assert not (tmp_path / "overlays" / failing).with_suffix(".png").exists()
    for name in names[:1]:
        Image.open((tmp_path / "overlays" / name).with_suffix(".png")).load()  # whole
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(PARTIAL_SUFFIX)]


def test_subscribers_learn_every_file_and_every_skip(fitted_model: Spade, predictions: list[Prediction],
                                                     tmp_path: Path) -> None:
    seen: list[tuple[str, dict[str, Path]]] = []
    skipped: list[tuple[str, str]] = []
    with PredictionWriter.for_model(fitted_model, tmp_path, outputs="all", explain=True) as writer:
        writer.subscribe(lambda prediction, paths: seen.append((prediction.name, paths)),
                         on_skipped=lambda name, error: skipped.append((name, error.reason)))
        writer.skip("bad.png", ImageReadError("bad.png", "file is empty", kind="empty"))
        for prediction in predictions:
            writer.write(prediction)
            assert len(_rows(tmp_path / "scores.csv")) == len(seen)  # told after its row
    assert [name for name, _ in seen] == [p.name for p in predictions] and skipped == [("bad.png", "file is empty")]
    told = sorted(path.relative_to(tmp_path).as_posix() for _, paths in seen for path in paths.values())
    assert told == [name for name in _files(tmp_path) if "/" in name]  # every file, each once, all on disk now
    name, paths = seen[0]
    assert set(paths) == {"overlays", "masks", "heatmaps", "maps"} | ({"explain"} if "explain" in paths else set())
    assert paths["overlays"] == (tmp_path / "overlays" / name).with_suffix(".png")


def test_a_subclass_overriding_save_still_sees_every_path(predictions: list[Prediction], tmp_path: Path) -> None:
    """The old way to learn the paths (RecordingWriter's, until it subscribes): `_save` is still called for every
    file, on the caller's thread, before `write` returns."""

    class Noting(PredictionWriter):
        def _save(self, save: Any, folder: str, stem: str, suffix: str = ".png") -> None:
            super()._save(save, folder, stem, suffix)
            self.noted.append(f"{folder}/{stem}{suffix}")

    with Noting(tmp_path, verdicts=True) as writer:
        writer.noted = []
        writer.write(predictions[0])
        assert len(writer.noted) == 2
    assert sorted(writer.noted) == [name for name in _files(tmp_path) if "/" in name]


def test_append_mode_goes_on_from_an_earlier_run(predictions: list[Prediction], tmp_path: Path) -> None:
    """mode="a" (a watch run after an earlier one): rows, regions and skipped inputs appended, the header not
    written again, the earlier output names kept taken; an empty folder gets its header."""
    first, second = (dataclasses.replace(p, name="x.png") for p in predictions[:2])
    with PredictionWriter(tmp_path, verdicts=True, mode="a") as writer:  # nothing there yet: a new run
        writer.write(first)
        writer.skip("bad.png", ImageReadError("bad.png", "file is empty", kind="empty"))
    with PredictionWriter(tmp_path, verdicts=True, overwrite=False, mode="a") as writer:
        writer.write(second)
        writer.skip("worse.png", ImageReadError("worse.png", "not an image", kind="unreadable"))
    text = (tmp_path / "scores.csv").read_text(encoding="utf-8")
    assert text.count("path,score") == 1 and [r["path"] for r in _rows(tmp_path / "scores.csv")] == ["x.png"] * 2
    assert len((tmp_path / REGIONS_FILE).read_text(encoding="utf-8").splitlines()) == 2
    assert [r["path"] for r in _rows(tmp_path / "skipped.csv")] == ["bad.png", "worse.png"]
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == ["x.png", "x~2.png"]  # never over x.png
    with pytest.raises(ValueError, match="mode"):
        PredictionWriter(tmp_path, mode="r")


@pytest.mark.parametrize("calibrated", [True, False], ids=["calibrated", "uncalibrated"])
def test_the_service_shows_the_same_overlay_as_the_files(calibrated: bool, fitted_model: Spade,
                                                        synthetic_root: Path, tmp_path: Path) -> None:
    """One render for files and HTTP: an image's overlay from `POST /v1/predict` is the pixels of its
    overlays/<name>.png from the writer, for a calibrated model and one without thresholds."""
    import base64
    import io

    from fastapi.testclient import TestClient

    from spade_ad.apps.service import ServiceSettings, create_app

    model = fitted_model if calibrated else Spade(k_gallery=5, device="cpu", progress=False, image_score="map_top",
                                                  calibration="none").fit(synthetic_root / "train" / "good")
    assert (model.pixel_threshold_ is not None) is calibrated
    image = sorted((synthetic_root / "test").rglob("*.png"))[-1]  # a defective one
    with PredictionWriter.for_model(model, tmp_path) as writer:
        writer.write_all(model.iter_predict([image], original_size=True, keep_images=True))
    from_file = np.asarray(Image.open(tmp_path / "overlays" / f"{image.stem}.png").convert("RGB"))
    with TestClient(create_app(model, ServiceSettings()), base_url="http://127.0.0.1:8000") as client:
        response = client.post("/v1/predict", files=[("files", (image.name, image.read_bytes()))])
    assert response.status_code == 200, response.text
    data = response.json()["results"][0]["overlay"].split(",", 1)[1]
    from_http = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
    np.testing.assert_array_equal(from_http, from_file)


def test_a_writer_that_starts_clears_what_a_killed_run_left(tmp_path: Path) -> None:
    """A run killed while writing left temporary files; the next run into the folder removes them (its own and a
    running process's are kept), in both modes."""
    import subprocess
    import sys

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    dead = int(ended.stdout)  # a pid whose process has ended
    for mode in ("w", "a"):
        out = tmp_path / mode
        left = out / "overlays" / f".x.png.{dead}-ab12cd34{PARTIAL_SUFFIX}"
        live = out / "masks" / f".y.png.{os.getppid()}-ef56ab78{PARTIAL_SUFFIX}"
        for path in (left, live):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"half")
        with PredictionWriter(out, mode=mode, overwrite=True):
            pass
        assert not left.exists(), mode
        assert live.exists(), mode
