"""`spade-ad watch` (spade_ad.apps.watch): files scored once complete, in arrival order, exactly once across restarts,
broken files recorded as errors, sorting by verdict, and a clean stop on SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from child_server import wait_until
from spade_ad import Spade
from spade_ad.apps.watch import STATE_FILE, Watcher
from spade_ad.data.synthetic import make_synthetic_dataset
from spade_ad.record import file_sha256, open_record
from spade_ad.record.recorder import Recorder

pytest.importorskip("watchdog")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Spade, Path, Path]:
    """A quick model on 64 x 64 images (200 of them must score in seconds), its file, and the test images."""
    root = make_synthetic_dataset(tmp_path_factory.mktemp("watch") / "part", n_train=8, n_test_good=4,
                                  n_test_defect=3, size=(64, 64), seed=5)
    model = Spade(k_gallery=3, image_size=64, device="cpu", progress=False).fit(root / "train" / "good")
    path = root / "model.safetensors"
    model.save(path)
    return model, path, root / "test"


def _images(test_root: Path) -> list[Path]:
    return sorted(test_root.rglob("*.png"))


@pytest.fixture
def camera(tmp_path: Path) -> Path:
    folder = tmp_path / "camera"
    folder.mkdir()
    return folder


def _run(watcher: Watcher) -> tuple[threading.Thread, list]:
    results: list = []
    thread = threading.Thread(target=lambda: results.append(watcher.run()), daemon=True)
    thread.start()
    return thread, results


def _scored(out: Path) -> list[str]:
    lines = (out / "scores.csv").read_text().splitlines()[1:] if (out / "scores.csv").exists() else []
    return [line.split(",")[0] for line in lines]


def test_a_file_written_in_chunks_is_scored_once_complete(small, camera: Path, tmp_path: Path) -> None:
    model, _, test_root = small
    source = _images(test_root)[-1]
    data = source.read_bytes()
    watcher = Watcher(model, camera, tmp_path / "out", poll_interval=0.05, settle=1.0, log=lambda _: None)
    thread, results = _run(watcher)
    with open(camera / "part.png", "wb") as handle:  # a camera writing slowly, flushing each chunk
        for start in range(0, len(data), len(data) // 6 + 1):
            handle.write(data[start:start + len(data) // 6 + 1])
            handle.flush()
            time.sleep(0.15)
    wait_until(lambda: _scored(tmp_path / "out"), timeout=30, what="the file scored")
    time.sleep(0.5)
    watcher.stop()
    thread.join(timeout=30)
    assert results[0].scored == 1 and results[0].errors == 0 and _scored(tmp_path / "out") == ["part.png"]
    [expected] = model.score([source])
    score = float((tmp_path / "out" / "scores.csv").read_text().splitlines()[1].split(",")[1])
    assert score == pytest.approx(float(expected), rel=1e-4)  # scored complete, not a truncated prefix


def test_a_rename_into_place_is_complete_at_once(small, camera: Path, tmp_path: Path) -> None:
    model, _, test_root = small
    watcher = Watcher(model, camera, tmp_path / "out", poll_interval=0.05, settle=30.0, max_images=1,
                      log=lambda _: None)
    thread, results = _run(watcher)
    time.sleep(0.3)
    shutil.copy(_images(test_root)[0], camera / "frame.png.part")  # a temporary name is left alone
    os.rename(camera / "frame.png.part", camera / "frame.png")
    thread.join(timeout=20)  # long before the 30 s settle time
    assert not thread.is_alive() and results[0].scored == 1


@pytest.mark.parametrize("with_record", [True, False])
def test_200_files_at_once_each_scored_exactly_once_and_a_restart_scores_only_new_ones(
        small, camera: Path, tmp_path: Path, with_record: bool) -> None:
    model, model_path, test_root = small
    images = _images(test_root)
    for index in range(200):
        shutil.copy(images[index % len(images)], camera / f"{index:03d}.png")
        os.utime(camera / f"{index:03d}.png", ns=(10**18 + index, 10**18 + index))  # arrival order = file times
    out, db = tmp_path / "out", tmp_path / "line.db"

    def watch(**limits) -> object:
        recorder = Recorder(open_record(db), model, model_path, origin="watch") if with_record else None
        return Watcher(model, camera, out, recorder=recorder, poll=True, poll_interval=0.05, settle=0.1,
                       log=lambda _: None, **limits).run()

    first = watch(idle_exit=0.5)
    assert first.scored == 200 and first.names == [f"{i:03d}.png" for i in range(200)]  # in arrival order
    assert _scored(out) == first.names
    for index in range(200, 203):
        shutil.copy(images[0], camera / f"{index:03d}.png")
    second = watch(idle_exit=0.5)
    assert second.scored == 3 and second.already == 200
    assert sorted(_scored(out)) == [f"{i:03d}.png" for i in range(203)]  # appended, nothing twice
    assert len((out / STATE_FILE).read_text().splitlines()) == 203
    if with_record:
        with open_record(db) as record:
            rows = record.inspections()
        assert sorted(r["source"] for r in rows) == [f"{i:03d}.png" for i in range(203)]
        assert rows[0]["sha256"] == file_sha256(camera / "000.png")
        assert {r["origin"] for r in rows} == {"watch"}
    if with_record:  # the record alone knows (a new output folder, no state file): still nothing twice
        out = tmp_path / "out2"
        third = watch(idle_exit=0.3)
        assert third.scored == 0 and third.already == 203


def test_broken_files_are_recorded_and_watching_goes_on(small, camera: Path, tmp_path: Path) -> None:
    model, model_path, test_root = small
    (camera / "notes.png").write_text("not pixels")
    (camera / "empty.png").write_bytes(b"")
    shutil.copy(_images(test_root)[0], camera / "ok.png")
    for index, name in enumerate(("notes.png", "empty.png", "ok.png")):
        os.utime(camera / name, ns=(10**18 + index, 10**18 + index))
    (camera / ".hidden.png").write_text("ignored")
    record = open_record(tmp_path / "r.db")
    recorder = Recorder(record, model, model_path, origin="watch")
    result = Watcher(model, camera, tmp_path / "out", recorder=recorder, poll=True, poll_interval=0.05,
                     settle=0.1, idle_exit=0.5, move_to=tmp_path / "sorted", log=lambda _: None).run()
    assert (result.scored, result.errors) == (1, 2)
    rows = {r["source"]: r for r in record.inspections()}
    assert set(rows) == {"notes.png", "empty.png", "ok.png"}
    assert rows["notes.png"]["verdict"] == "error" and "not an image" in rows["notes.png"]["error"]
    assert rows["ok.png"]["verdict"] in ("good", "defect")
    moved = tmp_path / "sorted" / rows["ok.png"]["verdict"] / "ok.png"
    assert moved.is_file() and rows["ok.png"]["path"] == str(moved)
    assert (tmp_path / "sorted" / "error" / "notes.png").is_file()
    assert sorted(p.name for p in camera.iterdir()) == [".hidden.png"]
    assert "notes.png" in (tmp_path / "out" / "skipped.csv").read_text()


def test_an_output_folder_of_another_run_is_refused(small, camera: Path, tmp_path: Path) -> None:
    from spade_ad.errors import OutputError

    model, _, _ = small
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "scores.csv").write_text("path,score\na.png,0.5\n")
    with pytest.raises(OutputError, match="holds another run's results"):
        Watcher(model, camera, tmp_path / "out")


@pytest.fixture
def watching(small, camera: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    _, model_path, _ = small
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "spade_ad", "watch", str(model_path), str(camera), "-o", str(out), "--record",
         str(tmp_path / "r.db"), "--settle", "0.2", "--poll-interval", "0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        yield process, out
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sigterm_finishes_the_current_image_and_exits_cleanly(watching, small, camera: Path,
                                                              tmp_path: Path) -> None:
    process, out = watching
    _, _, test_root = small
    shutil.copy(_images(test_root)[0], camera / "a.png")
    wait_until(lambda: _scored(out) == ["a.png"] or process.poll() is not None, timeout=90, what="a.png scored")
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "scored 1 images" in stdout and "Traceback" not in stderr
    with open_record(tmp_path / "r.db") as record:
        assert [r["source"] for r in record.inspections()] == ["a.png"]  # the waiting batch was written


@pytest.mark.slow
def test_bottle_images_dropped_while_watching_match_predict(bottle_root: Path, tmp_path: Path) -> None:
    """100 real bottle images copied into the folder while the watcher runs: each scored exactly once, in the
    record, with the scores `predict` gives them; a restart records nothing twice."""
    from cli_run import run_cli

    train = sorted((bottle_root / "train" / "good").glob("*.png"))
    model = Spade(k_gallery=5, image_size=128, device="cpu", progress=False).fit(train[:10])
    model_path = tmp_path / "bottle.safetensors"
    model.save(model_path)
    images = (sorted((bottle_root / "test").rglob("*.png")) + train[10:])[:100]
    camera, out, db = tmp_path / "camera", tmp_path / "out", tmp_path / "line.db"
    camera.mkdir()

    def watcher() -> Watcher:
        recorder = Recorder(open_record(db), model, model_path, origin="watch")
        return Watcher(model, camera, out, recorder=recorder, poll_interval=0.1, settle=0.3, log=lambda _: None)

    running = watcher()
    thread, results = _run(running)
    names = []
    for index, path in enumerate(images):
        name = f"{index:03d}-{path.parent.name}-{path.name}"
        shutil.copy(path, camera / f".{name}")  # written under a hidden name, then renamed into place
        os.rename(camera / f".{name}", camera / name)
        names.append(name)
    wait_until(lambda: len(_scored(out)) == 100, timeout=600, what="100 images scored")
    running.stop()
    thread.join(timeout=60)
    assert results[0].scored == 100 and sorted(_scored(out)) == sorted(names)
    with open_record(db) as record:
        watched = {r["source"]: r["score"] for r in record.inspections()}
    assert sorted(watched) == sorted(names)

    assert run_cli(["predict", model_path, camera, "-o", tmp_path / "predicted"]) == 0
    lines = (tmp_path / "predicted" / "scores.csv").read_text().splitlines()[1:]
    predicted = {line.split(",")[0]: float(line.split(",")[1]) for line in lines}
    assert predicted.keys() == watched.keys()
    for name, score in watched.items():
        assert score == pytest.approx(predicted[name], rel=1e-4, abs=1e-5), name  # scores near 0: batch vs one

    again = watcher()
    again.idle_exit = 0.5
    assert again.run().scored == 0
    with open_record(db) as record:
        assert record.count() == 100


def test_watch_cli_refuses_a_missing_folder_and_a_bad_record(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from cli_run import run_cli

    assert run_cli(["watch", "m.safetensors", tmp_path / "nowhere", "-o", tmp_path / "out"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "nowhere is not a folder" in err
    (tmp_path / "camera").mkdir()
    (tmp_path / "bad.db").write_text("not a database, only text " * 4)
    assert run_cli(["watch", "m.safetensors", tmp_path / "camera", "-o", tmp_path / "out", "--record",
                    tmp_path / "bad.db"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "bad.db is not a database" in err


def test_watch_writes_the_outputs_asked_for(small, camera: Path, tmp_path: Path) -> None:
    """--outputs as predict's: 'none' keeps scores.csv and regions only, 'heatmap' adds heat maps."""
    model, _, test_root = small
    shutil.copy(_images(test_root)[0], camera / "a.png")
    for outputs, folders in (("none", set()), ("overlay,heatmap", {"overlays", "heatmaps"})):
        out = tmp_path / f"out-{outputs}"
        result = Watcher(model, camera, out, poll=True, settle=0.05, idle_exit=0.3, outputs=outputs,
                         log=lambda _: None).run()
        assert result.scored == 1 and _scored(out) == ["a.png"]
        assert {p.name for p in out.iterdir() if p.is_dir()} == folders
