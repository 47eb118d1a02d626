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
from spade_ad.prediction import Prediction
from spade_ad.visualize import BOX_COLOR, overlay, threshold_color_range
from spade_ad.writers import (
    PARTIAL_SUFFIX,
    REGIONS_FILE,
    SCORE_COLUMNS,
    VERDICT_COLUMNS,
    ImageFiles,
    PredictionWriter,
    check_output_dir,
    output_stems,
    read_regions,
    remove_partials,
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


def test_overlay_of_an_anomalous_image_shows_its_boxes(written: Path, predictions: list[Prediction]) -> None:
    prediction = next(p for p in predictions if p.regions)
    assert prediction.original_map is not None and prediction.image is not None
    vmin, vmax = threshold_color_range(prediction.pixel_threshold)  # type: ignore[misc]
    plain = np.asarray(overlay(prediction.image, prediction.original_map, vmin, vmax, mask=prediction.defect_mask))
    saved = np.asarray(Image.open((written / "overlays" / prediction.name).with_suffix(".png")).convert("RGB"))
    assert saved.shape == plain.shape
    left, top, right, bottom = prediction.regions[0].box
    corner = (bottom - 1, right - 1)  # the box's bottom-right corner: drawn, and far from the texts
    assert tuple(saved[corner]) == BOX_COLOR and tuple(plain[corner]) != BOX_COLOR
    differs = np.any(saved != plain, axis=-1)
    assert differs[top:bottom, left:right].any()
    marked = np.zeros_like(differs)
    marked[:20, :120] = True  # the corner label ("DEFECT 1.23")
    for region in prediction.regions:  # each box, with its peak score above it (or just inside it)
        left, top, right, bottom = region.box
        marked[max(0, top - 20):bottom, left:max(right, left + 60)] = True
    assert differs[~marked].sum() == 0  # elsewhere the overlay is untouched


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
    with PredictionWriter(tmp_path, verdicts=True, save_maps=True) as writer:
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

    from spade_ad import writers

    files = ImageFiles(tmp_path, verdicts=True, save_maps=True)
    first, second = predictions[0], predictions[-1]
    files.write(first, "x")
    before = {p.name: p.read_bytes() for p in tmp_path.rglob("x.*")}
    assert set(before) == {"x.png", "x.tiff"} and len(list(tmp_path.rglob("x.*"))) == 4
    files.write(second, "x")  # replaced whole: the second prediction's map
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "maps" / "x.tiff"), second.original_map)
    replaced = (tmp_path / "heatmaps" / "x.png").read_bytes()
    real = writers.save_png

    def half_then_full_disk(image: Any, path: Path) -> None:
        Path(path).write_bytes(real(image, path).read_bytes()[:100])  # half a PNG on disk, then the disk fills
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writers, "save_png", half_then_full_disk)
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
