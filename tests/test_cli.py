"""The command line, run in-process through its real entry point (`spade_ad.apps.cli.main`)."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from spade_ad.apps.cli import main


def run_cli(args: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys, "argv", ["spade-ad", *args])
    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.fixture(scope="module")
def model_file(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "model.safetensors"
    with pytest.MonkeyPatch.context() as monkeypatch:
        code = run_cli(["fit", str(synthetic_root / "train" / "good"), "-o", str(out), "--k-gallery", "4",
                        "--search-radius", "100", "--device", "cpu"], monkeypatch)
    assert code == 0 and out.is_file()
    from spade_ad import load

    settings = load(out).get_params()
    assert settings["k_gallery"] == 4 and settings["device"] == "cpu" and settings["layers"] == (2, 3)
    assert settings["search_radius"] == 100  # covers the map: the same answers as the whole search
    return out


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_predict_writes_scores_images_and_mirrored_maps(
    model_file: Path, synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    code = run_cli(["predict", str(model_file), str(synthetic_root / "test"), "-o", str(out), "--save-maps"],
                   monkeypatch)
    assert code == 0
    rows = _rows(out / "scores.csv")
    assert len(rows) == 12 and list(rows[0]) == [
        "path", "score", "normalized_score", "p_value", "is_anomalous", "regions", "largest_region_area"]
    assert all(float(r["score"]) >= 0 and r["is_anomalous"] in ("0", "1") for r in rows)
    defect_verdicts = [r["is_anomalous"] == "1" for r in rows if not r["path"].startswith("good/")]
    assert sum(defect_verdicts) >= len(defect_verdicts) / 2
    first = rows[0]["path"]  # relative to the INPUT folder, e.g. "good/000.png"
    assert (out / "overlays" / first).with_suffix(".png").is_file()
    assert not (out / "heatmaps").exists()  # the overlay shows the heat: not written twice (--outputs heatmap)
    mask = np.asarray(Image.open((out / "masks" / first).with_suffix(".png")))
    assert mask.shape == (160, 224) and set(np.unique(mask)) <= {0, 255}
    raw = tifffile.imread((out / "maps" / first).with_suffix(".tiff"))
    assert raw.dtype == np.float32 and raw.shape == (160, 224)


def test_predict_accepts_files_and_several_inputs(
    model_file: Path, synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = sorted((synthetic_root / "test" / "spot").glob("*.png"))[:2]
    out = tmp_path / "out"
    code = run_cli(["predict", str(model_file), *map(str, files), str(synthetic_root / "test" / "good"),
                    "-o", str(out)], monkeypatch)
    assert code == 0
    assert len(_rows(out / "scores.csv")) == 2 + 4


def _good_images_with_one_bad(synthetic_root: Path, folder: Path, name: str, content: bytes) -> Path:
    """A copy of the synthetic good test images in which file `name` is replaced by `content`."""
    shutil.copytree(synthetic_root / "test" / "good", folder)
    (folder / name).write_bytes(content)
    return folder


def test_bad_image_stops_with_one_clear_line(
    model_file: Path, synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    truncated = (synthetic_root / "test" / "good" / "001.png").read_bytes()[:100]
    folder = _good_images_with_one_bad(synthetic_root, tmp_path / "in", "001.png", truncated)
    out = tmp_path / "out"
    code = run_cli(["predict", str(model_file), str(folder), "-o", str(out)], monkeypatch)
    err = capsys.readouterr().err
    assert code == 2
    assert "001.png" in err and "Traceback" not in err
    assert len(_rows(out / "scores.csv")) == 1  # the row computed before the bad file is kept


def test_skip_bad_goes_on_and_lists_what_it_skipped(
    model_file: Path, synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = _good_images_with_one_bad(synthetic_root, tmp_path / "in", "000.png", b"not an image")
    out = tmp_path / "out"
    code = run_cli(["predict", str(model_file), str(folder), "-o", str(out), "--skip-bad"], monkeypatch)
    assert code == 0
    assert "000.png" in capsys.readouterr().err
    assert [r["path"] for r in _rows(out / "skipped.csv")] == ["000.png"]
    assert len(_rows(out / "scores.csv")) == 3


def test_fit_on_empty_folder_and_bad_model_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(["fit", str(empty), "-o", str(tmp_path / "m.safetensors")], monkeypatch) == 2
    assert "empty" in capsys.readouterr().err
    fake = tmp_path / "fake.safetensors"
    fake.write_text("nope")
    assert run_cli(["predict", str(fake), str(empty), "-o", str(tmp_path / "o")], monkeypatch) == 2
    assert "fake.safetensors" in capsys.readouterr().err


def test_help_documents_every_command(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for command in ([], ["fit"], ["predict"], ["demo"]):
        assert run_cli([*command, "--help"], monkeypatch) == 0
        assert "Usage" in capsys.readouterr().out
    run_cli(["predict", "--help"], monkeypatch)
    assert "--save-maps" in capsys.readouterr().out


def test_module_entry_point_runs() -> None:
    result = subprocess.run([sys.executable, "-m", "spade_ad", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "predict" in result.stdout
