"""Capture sessions in the training folder (`spade_ad.data.sessions`): found from EXIF or file times, and
calibration that scores each training image without its whole session (leave-one-session-out)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spade_ad import Spade, load
from spade_ad.data.inputs import ImageItem, collect_images
from spade_ad.data.sessions import capture_sessions, capture_time
from spade_ad.data.synthetic import make_line_dataset, make_synthetic_dataset, read_variants

HOUR = 3600.0


def _files(folder: Path, times: list[float]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, stamp in enumerate(times):
        path = folder / f"{i:03d}.png"
        Image.new("RGB", (8, 8), (i, i, i)).save(path)
        os.utime(path, (stamp, stamp))
        paths.append(path)
    return paths


def test_sessions_split_at_gaps_of_capture_time(tmp_path: Path) -> None:
    """Files three hours apart in two runs are two sessions, in capture order whatever the names; a gap shorter
    than `gap_minutes` is not; a lone image joins its neighbouring session; gap 0 or images in memory: none."""
    base = 1.7e9
    times = [base + 2 * HOUR + 60 * i for i in range(3)] + [base + 60 * i for i in range(4)]
    items = collect_images(_files(tmp_path / "a", times))
    sessions = capture_sessions(items, 60)
    assert sessions is not None and sessions.sizes == (4, 3)
    assert sessions.labels.tolist() == [1, 1, 1, 0, 0, 0, 0]  # the first captured are session 0
    assert "2 capture sessions (4, 3 images" in sessions.describe()
    assert capture_sessions(items, 180) is None  # two hours apart: one session at a three-hour gap
    assert capture_sessions(items, 0) is None
    lone = [base + 60 * i for i in range(4)] + [base + 5 * HOUR]  # one image alone in the evening
    assert capture_sessions(collect_images(_files(tmp_path / "b", lone)), 60) is None
    # a short session (under a fifth of the images) joins its neighbour: 20 images are not judged against 3
    short = [base + 60 * i for i in range(20)] + [base + 5 * HOUR + 60 * i for i in range(3)]
    assert capture_sessions(collect_images(_files(tmp_path / "c", short)), 60) is None
    three = [base + 60 * i for i in range(12)] + [base + 5 * HOUR + 60 * i for i in range(2)] + \
        [base + 9 * HOUR + 60 * i for i in range(6)]  # 12, 2, 6: the 2 join the 12 before them
    found = capture_sessions(collect_images(_files(tmp_path / "d", three)), 60)
    assert found is not None and found.sizes == (14, 6)
    in_memory = [ImageItem(f"image_{i}", image=Image.new("RGB", (8, 8))) for i in range(6)]
    assert capture_sessions(in_memory, 60) is None


def test_exif_then_the_name_then_the_file_time(tmp_path: Path) -> None:
    """A camera's EXIF DateTimeOriginal is the capture time even when the file's time says otherwise (a copy);
    without EXIF, a date and time in the name as line cameras write them; else the file's time."""
    path = tmp_path / "shot.jpg"
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9003] = "2026:03:04 05:06:07"
    Image.new("RGB", (8, 8)).save(path, exif=exif)
    os.utime(path, (1.0, 1.0))
    assert capture_time(ImageItem("shot.jpg", path=path)) == pytest.approx(1772600767.0)
    png = tmp_path / "shot.png"  # a PNG's EXIF chunk, read from its header (without decoding the pixels)
    exif = Image.Exif()
    exif[0x0132] = "2026:03:04 05:06:07"
    Image.new("RGB", (8, 8)).save(png, exif=exif)
    os.utime(png, (1.0, 1.0))
    assert capture_time(ImageItem("shot.png", path=png)) == pytest.approx(1772600767.0)
    named = tmp_path / "cam1_20261201_083015.png"  # a line camera's name: its date and time
    Image.new("RGB", (8, 8)).save(named)
    os.utime(named, (1.0, 1.0))
    assert capture_time(ImageItem(named.name, path=named)) == pytest.approx(1796113815.0)
    for name in ("part-2026-12-01T08-30-15.png", "2026-12-01 08:30:15.png"):
        (tmp_path / name).write_bytes(named.read_bytes())
        assert capture_time(ImageItem(name, path=tmp_path / name)) == pytest.approx(1796113815.0)
    not_a_date = tmp_path / "20261345_996677.png"  # digits that are no date: the file's time
    not_a_date.write_bytes(named.read_bytes())
    os.utime(not_a_date, (5.0, 5.0))
    assert capture_time(ImageItem(not_a_date.name, path=not_a_date)) == 5.0
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    os.utime(plain, (123.0, 123.0))
    assert capture_time(ImageItem("plain.png", path=plain)) == 123.0


def test_leave_one_out_with_groups_never_uses_an_image_of_the_same_group(tmp_path: Path) -> None:
    """`scoring.leave_one_out(groups=...)`: every image's kNN, gallery and density neighbours come from other
    groups; without groups only the image itself is left out."""
    from spade_ad.core.feature_store import FeatureStoreWriter
    from spade_ad.core.scoring import kept_neighbours, leave_one_out

    rng = np.random.default_rng(0)
    writer = FeatureStoreWriter(tmp_path, "float16")
    writer.add([torch.from_numpy(rng.normal(size=(8, 4, 3, 3)).astype(np.float32))],
               torch.from_numpy(rng.normal(size=(8, 5)).astype(np.float32)), coreset=False)
    store = writer.build()
    groups = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    for index, _, _, _, near in leave_one_out(store, 8, k_image=1, k_gallery=3, density_k=3, groups=groups):
        assert len(near) == 3 and not (groups[near] == groups[index]).any()
    everything = torch.arange(8)
    assert kept_neighbours(everything, 4, groups).tolist() == [True] * 3 + [False] * 2 + [True] * 3
    assert kept_neighbours(everything, 4, None).tolist() == [True] * 4 + [False] + [True] * 3


def test_fit_calibrates_leave_one_session_out_and_says_so(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Training images from two capture sessions (their own light, file times three hours apart): `fit` says so in
    one line, scores each image without its session, so the threshold allows for the change between sessions, and
    the model file keeps the sessions; `session_gap 0` is leave-one-out. Good parts from a third session: leave-one-
    out flags 3 of 12, leave-one-session-out 1, and the good parts lie further below the threshold on average.
    Images added later are one more session. Through the command line, as a user meets it."""
    from spade_ad.apps.cli import main

    root = make_synthetic_dataset(tmp_path / "data", n_train=16, n_test_good=12, n_test_defect=0, size=(160, 224),
                                  seed=4, train_sessions=2, second_session=True)
    assert read_variants(root)["session"]["train"] == "2 sessions"
    common = ["--k-gallery", "5", "--device", "cpu"]
    main(["fit", str(root / "train" / "good"), "-o", str(tmp_path / "s.safetensors"), *common])
    out = capsys.readouterr().out
    assert "the training images come from 2 capture sessions (8, 8 images" in out
    assert "leave-one-session-out scores of 16 good images" in out
    main(["fit", str(root / "train" / "good"), "-o", str(tmp_path / "o.safetensors"), *common, "--session-gap", "0"])
    out = capsys.readouterr().out
    assert "capture sessions" not in out and "leave-one-out scores of 16 good images" in out
    by_session, by_image = load(tmp_path / "s.safetensors"), load(tmp_path / "o.safetensors")
    assert by_session.calibration_.sessions == [0] * 8 + [1] * 8 and by_image.calibration_.sessions == []
    assert by_session.sessions_ is not None and by_image.sessions_ is None
    assert by_session.calibration_.session_sizes == [8, 8] and by_image.calibration_.session_sizes == []
    goods = sorted((root / "test" / "good").glob("*.png"))
    margins = {name: np.array([p.score - model.image_threshold_ for p in model.predict(goods)])
               for name, model in (("session", by_session), ("image", by_image))}
    assert (margins["session"] > 0).sum() < (margins["image"] > 0).sum()
    assert margins["session"].mean() < margins["image"].mean()
    by_session.add(sorted((root / "train" / "good").glob("*.png"))[:2])
    assert by_session.calibration_.sessions == [0] * 8 + [1] * 8 + [2] * 2


def test_a_model_file_with_a_wrong_sessions_list_is_refused_in_one_line(tmp_path: Path) -> None:
    """`calibration.sessions` edited to the wrong length or to a text: one clear refusal naming the field; a file
    from before sessions existed (no field) loads with none."""
    from spade_ad.data.modelfile import read_model_file, write_safetensors
    from spade_ad.errors import ModelFileError

    root = make_line_dataset(tmp_path / "line", n_train=8, n_test_good=0, n_test_defect=0, size=(96, 96),
                             train_defects=0, train_sessions=2)
    path = Spade(k_gallery=3, device="cpu", progress=False, image_size=96).fit(root / "train" / "good").save(
        tmp_path / "m.safetensors")
    header, arrays = read_model_file(path)
    arrays = {key: np.asarray(value) for key, value in arrays.items()}
    assert header["calibration"]["sessions"] == [0] * 4 + [1] * 4
    for value, words in (([0, 1], "calibration.sessions has 2 values for 8 training images"),
                         ("two", "calibration.sessions is a str")):
        edited = dict(header, calibration=dict(header["calibration"], sessions=value))
        write_safetensors(tmp_path / "edited.safetensors", arrays, json.dumps(edited))
        with pytest.raises(ModelFileError, match=words.replace(".", r"\.")) as refused:
            load(tmp_path / "edited.safetensors")
        assert "\n" not in str(refused.value)
    old = dict(header, calibration={k: v for k, v in header["calibration"].items() if k != "sessions"})
    write_safetensors(tmp_path / "old.safetensors", arrays, json.dumps(old))
    assert load(tmp_path / "old.safetensors").sessions_ is None
