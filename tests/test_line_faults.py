"""The line station under faults, as a user meets them (issue: "no inspection lost, no defect taught as good, no
watcher that dies"): a camera reusing a file name, the SQLite record locked past its busy timeout, the record file
deleted, PostgreSQL stopped and restarted under a running watcher, two watchers on one folder, a restart after a run
that scored nothing, and `calibrate --record` adding to the calibration rather than replacing it, each image once."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import spade_ad
from child_server import wait_until
from cli_run import run_cli
from spade_ad import Spade
from spade_ad.apps.watch import Watcher
from spade_ad.data.synthetic import make_synthetic_dataset
from spade_ad.errors import OutputError
from spade_ad.record import EvidenceChanged, EvidenceStore, file_sha256, open_record, verified_image
from spade_ad.record.recorder import OUTBOX_FILE, Recorder, labelled_images

pytest.importorskip("watchdog")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Spade, Path, list[Path], list[Path]]:
    """A quick model on 64 x 64 images, its file, good test images and defective ones."""
    root = make_synthetic_dataset(tmp_path_factory.mktemp("faults") / "part", n_train=8, n_test_good=6,
                                  n_test_defect=4, size=(64, 64), seed=11)
    model = Spade(k_gallery=3, image_size=64, device="cpu", progress=False).fit(root / "train" / "good")
    path = root / "model.safetensors"
    model.save(path)
    goods = sorted((root / "test" / "good").glob("*.png"))
    defects = sorted(p for p in (root / "test").rglob("*.png") if p.parent.name != "good")
    return model, path, goods, defects


def _drop(source: Path, target: Path) -> None:
    """A camera writing a file: a temporary name, then renamed into place (complete at once)."""
    shutil.copy(source, target.with_name(target.name + ".part"))
    target.with_name(target.name + ".part").replace(target)


class _Running:
    """A Watcher on a thread, with its log lines."""

    def __init__(self, model: Spade, camera: Path, out: Path, recorder: Recorder | None, **options: object) -> None:
        self.lines: list[str] = []
        self.watcher = Watcher(model, camera, out, recorder=recorder, poll=True, poll_interval=0.05, settle=0.1,
                               log=self.lines.append, **options)
        self.results: list = []
        self.thread = threading.Thread(target=lambda: self.results.append(self.watcher.run()), daemon=True)
        self.thread.start()

    def finish(self) -> object:
        self.watcher.stop()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()
        return self.results[0]


def _recorder(target: str | Path, model: Spade, model_path: Path, out: Path, messages: list[str]) -> Recorder:
    out.mkdir(parents=True, exist_ok=True)
    return Recorder(open_record(target), model, model_path, origin="watch", outbox=out / OUTBOX_FILE,
                    retry_after=0.3, retry_max=1.0, retry_wait=0.2, max_wait=0.2,
                    on_failure=messages.append, on_resume=messages.append)


def _sources(target: str | Path) -> list[str]:
    with open_record(target) as record:
        return sorted(r["source"] for r in record.inspections())


def test_a_reused_file_name_never_changes_what_an_inspection_shows_or_teaches(small, tmp_path: Path) -> None:
    """cam/a1.png good, later a defect under the same name: the first inspection keeps its own (good) image for the
    review page, the Good label with --allow-add and calibrate --record; a file changed under a row without a kept
    copy is refused, not used."""
    model, model_path, goods, defects = small
    camera, out, db = tmp_path / "cam", tmp_path / "out", tmp_path / "line.db"
    camera.mkdir()
    evidence = EvidenceStore(tmp_path / "line.db.files")
    running = _Running(model, camera, out, _recorder(db, model, model_path, out, []), evidence=evidence)
    _drop(goods[0], camera / "a1.png")
    wait_until(lambda: len(running.watcher.result.names) == 1, timeout=60, what="the good a1.png scored")
    _drop(defects[0], camera / "a1.png")
    wait_until(lambda: len(running.watcher.result.names) == 2, timeout=60, what="the defect a1.png scored")
    running.finish()
    with open_record(db) as record:
        first, second = record.inspections()
        assert first["source"] == second["source"] == "a1.png"
        assert (first["sha256"], second["sha256"]) == (file_sha256(goods[0]), file_sha256(defects[0]))
        # what the review page, the label and calibrate get is the image inspected, not the file there now
        assert file_sha256(verified_image(first)) == file_sha256(goods[0])
        assert file_sha256(verified_image(second)) == file_sha256(defects[0])
        record.set_label(first["id"], "good", "operator")
        good, defect, refused = labelled_images(record, model, model_path)
        assert [file_sha256(p) for p in good] == [file_sha256(goods[0])] and not defect and not refused

    from spade_ad.apps.service.review import ReviewStore

    store = ReviewStore(str(db), files=tmp_path / "line.db.files")
    added: list[str] = []
    store.label(first["id"], "good", "operator", lambda path: added.append(file_sha256(path)) or {"added": 1})
    assert added == [file_sha256(goods[0])]  # the good image, never the defect now at cam/a1.png
    assert file_sha256(store.file(first["id"], "image")) == file_sha256(goods[0])
    store.close()

    # a row without a kept copy (predict --record) whose file was replaced: refused everywhere
    with open_record(db) as record:
        [row_id] = record.add([{"origin": "predict", "source": "b.png", "path": str(camera / "a1.png"),
                                "sha256": file_sha256(goods[1]), "verdict": "good", "score": 0.1,
                                "model_id": first["model_id"]}])
        with pytest.raises(EvidenceChanged, match="another image than the one inspected"):
            verified_image(record.get(row_id))


def test_sqlite_locked_past_its_busy_timeout_loses_nothing(small, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process holds the record's write lock longer than the busy timeout: the files dropped during and
    after the lock are all in the record soon after it is released, each once; the watcher never stops."""
    import spade_ad.record.connection as connection
    import spade_ad.record.database as store

    for module in (connection, store):  # the engine's busy timeout, and the one a retried write restores
        monkeypatch.setattr(module, "BUSY_TIMEOUT_MS", 500)
    model, model_path, goods, _ = small
    camera, out, db = tmp_path / "cam", tmp_path / "out", tmp_path / "line.db"
    camera.mkdir()
    messages: list[str] = []
    running = _Running(model, camera, out, _recorder(db, model, model_path, out, messages))
    locker = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sqlite3, sys, time
        connection = sqlite3.connect({str(db)!r}, isolation_level=None)
        connection.execute("BEGIN EXCLUSIVE")
        print("locked", flush=True)
        time.sleep(4)
        connection.execute("ROLLBACK")
    """)], stdout=subprocess.PIPE, text=True)
    assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
    for index in range(3):
        _drop(goods[index], camera / f"during{index}.png")
    wait_until(lambda: len(running.watcher.result.names) == 3, timeout=60, what="3 files scored under the lock")
    locker.wait(timeout=30)
    released = time.monotonic()
    _drop(goods[3], camera / "after.png")
    wait_until(lambda: len(_sources(db)) == 4, timeout=60, what="every file in the record after the lock")
    assert time.monotonic() - released < 60
    result = running.finish()
    assert result.scored == 4
    assert _sources(db) == ["after.png", "during0.png", "during1.png", "during2.png"]  # each once
    assert any("recording stopped" in m and "locked" in m for m in messages)
    assert any("recording resumed" in m for m in messages)
    assert not (out / OUTBOX_FILE).exists()


def test_a_deleted_record_file_is_noticed_and_its_rows_wait_for_backfill(small, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    model, model_path, goods, _ = small
    camera, out, db = tmp_path / "cam", tmp_path / "out", tmp_path / "del.db"
    camera.mkdir()
    messages: list[str] = []
    recorder = _recorder(db, model, model_path, out, messages)
    running = _Running(model, camera, out, recorder)
    _drop(goods[0], camera / "before.png")
    wait_until(lambda: _sources(db) == ["before.png"], timeout=60, what="before.png recorded")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    _drop(goods[1], camera / "gone1.png")
    _drop(goods[2], camera / "gone2.png")
    wait_until(lambda: len(running.watcher.result.names) == 3, timeout=60, what="the files after the deletion")
    running.finish()
    assert any("was deleted" in m for m in messages)
    assert not db.exists()  # nothing was written into the void, nor a new record made behind the user's back
    assert "2 WAITING" in recorder.summary() and (out / OUTBOX_FILE).exists()
    # the operator puts a record back (here: a new one) and writes what waited, each once
    capsys.readouterr()
    assert run_cli(["record", "backfill", str(db), str(out / OUTBOX_FILE)]) == 0
    assert "wrote 2 inspections" in capsys.readouterr().out
    assert _sources(db) == ["gone1.png", "gone2.png"] and not (out / OUTBOX_FILE).exists()
    assert run_cli(["record", "backfill", str(db), str(out / OUTBOX_FILE)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_postgres_stopped_and_restarted_under_a_running_watcher(postgres_cluster, small, tmp_path: Path) -> None:
    import pg_cluster

    cluster = pg_cluster.start_cluster()  # its own cluster: this test stops it
    assert not isinstance(cluster, str), cluster
    try:
        url = cluster.database("line")
        model, model_path, goods, _ = small
        camera, out = tmp_path / "cam", tmp_path / "out"
        camera.mkdir()
        messages: list[str] = []
        running = _Running(model, camera, out, _recorder(url, model, model_path, out, messages))
        _drop(goods[0], camera / "up.png")
        wait_until(lambda: _sources(url) == ["up.png"], timeout=60, what="up.png recorded")
        cluster.stop()
        for index in range(1, 4):
            _drop(goods[index], camera / f"down{index}.png")
        wait_until(lambda: len(running.watcher.result.names) == 4, timeout=60, what="files scored while down")
        assert running.thread.is_alive()  # the watcher did not die
        cluster.start()
        back = time.monotonic()
        _drop(goods[4], camera / "back.png")
        wait_until(lambda: len(_sources(url)) == 5, timeout=60, what="every file in the record after the restart")
        assert time.monotonic() - back < 60
        running.finish()
        assert _sources(url) == ["back.png", "down1.png", "down2.png", "down3.png", "up.png"]
        assert any("recording stopped" in m for m in messages) and any("resumed" in m for m in messages)
    finally:
        pg_cluster.remove(cluster)


def test_a_second_watcher_on_one_folder_and_record_is_refused(small, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    model, model_path, goods, _ = small
    camera, db = tmp_path / "cam", tmp_path / "line.db"
    camera.mkdir()
    first = _Running(model, camera, tmp_path / "out1", _recorder(db, model, model_path, tmp_path / "out1", []))
    with pytest.raises(OutputError, match=r"another watcher \(pid \d+\) is already watching"):
        Watcher(model, camera, tmp_path / "out2", recorder=_recorder(db, model, model_path, tmp_path / "out2", []))
    with pytest.raises(OutputError, match="another watcher"):  # nor into its output folder
        Watcher(model, tmp_path, tmp_path / "out1")
    # through the front door: one line, exit 2
    capsys.readouterr()
    assert run_cli(["watch", str(model_path), str(camera), "-o", str(tmp_path / "out3"), "--record", str(db),
                    "--max-images", "1"]) == 2
    err = capsys.readouterr().err
    assert "another watcher" in err and len(err.strip().splitlines()) == 1
    for index in range(3):
        _drop(goods[index], camera / f"{index}.png")
    wait_until(lambda: len(first.watcher.result.names) == 3, timeout=60, what="3 files scored")
    first.finish()
    assert _sources(db) == ["0.png", "1.png", "2.png"]  # each once
    again = Watcher(model, camera, tmp_path / "out1", log=lambda _: None)  # the lock went with the first
    again.release()


def test_a_watch_that_scored_nothing_restarts(small, tmp_path: Path) -> None:
    model, _, goods, _ = small
    camera, out = tmp_path / "cam", tmp_path / "out"
    camera.mkdir()
    Watcher(model, camera, out, poll=True, idle_exit=0.2, log=lambda _: None).run()
    assert (out / "scores.csv").read_text().count("\n") <= 1
    _drop(goods[0], camera / "x.png")
    result = Watcher(model, camera, out, poll=True, settle=0.1, idle_exit=0.5, log=lambda _: None).run()
    assert result.scored == 1


def test_calibrate_record_adds_to_the_calibration(small, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A few labelled good images refine the threshold; they do not replace the training images' scores (unless
    --replace, which says so)."""
    model, model_path, goods, _ = small
    work = tmp_path / "m.safetensors"
    shutil.copy(model_path, work)
    db = tmp_path / "line.db"
    recorder = Recorder(open_record(db), model, work, origin="predict")
    for prediction in model.iter_predict(goods[:3], original_size=True, keep_images=True):
        recorder.add(prediction)
    recorder.close()
    with open_record(db) as record:
        for row in record.inspections():
            record.set_label(row["id"], "good", "qa")
    n_before = model.calibration_.n
    capsys.readouterr()
    assert run_cli(["calibrate", str(work), "--record", str(db), "-o", str(tmp_path / "combined.safetensors")]) == 0
    out = capsys.readouterr().out
    assert f"calibration added to: {n_before} -> {n_before + 3} good scores" in out
    assert run_cli(["calibrate", str(work), "--record", str(db), "--replace", "-o",
                    str(tmp_path / "r.safetensors")]) == 0
    out = capsys.readouterr().out
    assert f"calibration REPLACED: {n_before} -> 3 good scores" in out and "guaranteed false-alarm rate" in out


def test_calibrate_record_again_counts_each_image_once(small, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The line recalibrates from its growing record in place, week after week: the images labelled before are in
    the calibration already and are not added twice (that would shrink the threshold and overstate the guarantee);
    only the newly labelled one is added."""
    model, model_path, goods, _ = small
    work = tmp_path / "m.safetensors"
    shutil.copy(model_path, work)
    db = tmp_path / "line.db"

    def label(images: list[Path]) -> None:
        recorder = Recorder(open_record(db), model, work, origin="predict")
        for prediction in model.iter_predict(images, original_size=True, keep_images=True):
            recorder.add(prediction)
        recorder.close()
        with open_record(db) as record:
            for row in record.inspections():
                if not row.get("label"):
                    record.set_label(row["id"], "good", "qa")

    label(goods[:3])
    n_before = model.calibration_.n
    assert run_cli(["calibrate", str(work), "--record", str(db)]) == 0
    first = spade_ad.load(work).calibration_
    assert first.n == n_before + 3 and len(first.added_images) == 3 and len(first.parts) == first.n
    capsys.readouterr()
    assert run_cli(["calibrate", str(work), "--record", str(db)]) == 0
    said = capsys.readouterr().out
    assert f"{n_before + 3} -> {n_before + 3} good scores (3 good images were counted already" in said
    again = spade_ad.load(work).calibration_
    assert again.scores == first.scores and again.image_threshold == first.image_threshold
    label(goods[3:4])
    assert run_cli(["calibrate", str(work), "--record", str(db), "--false-alarm-rate", "0.2"]) == 0
    latest = spade_ad.load(work).calibration_
    assert latest.n == n_before + 4 and latest.false_alarm_rate == 0.2  # the rate asked now, not the earlier one


def test_calibrate_record_with_labelled_defects_reweighs_every_good_score(small, tmp_path: Path) -> None:
    """`calibrate --record` adds to the calibration (the default there) and still lets the labelled defects choose
    the part weights: every good score, the training images' and the added ones', is re-weighed from its kept
    parts, so the added images' scores are what the model now gives them."""
    model, model_path, goods, defects = small
    work = tmp_path / "m.safetensors"
    shutil.copy(model_path, work)
    db = tmp_path / "line.db"
    recorder = Recorder(open_record(db), model, work, origin="predict")
    for prediction in model.iter_predict(goods[:4] + defects, original_size=True, keep_images=True):
        recorder.add(prediction)
    recorder.close()
    with open_record(db) as record:
        for row in record.inspections():
            record.set_label(row["id"], "good" if "good" in row["path"] else "defect", "qa")
    assert run_cli(["calibrate", str(work), "--record", str(db)]) == 0
    recalibrated = spade_ad.load(work)
    cal = recalibrated.calibration_
    assert cal.source == "leave_one_out+labelled" and cal.n == model.calibration_.n + 4
    assert cal.note.startswith("part weights ") and cal.check["weights"]["n_defect"] == len(defects)
    for score in recalibrated.score(goods[:4]):
        assert min(abs(np.asarray(cal.scores) - score)) < 1e-9
    weights = (recalibrated.map_weight, recalibrated.coarse_weight)
    assert list(weights) == pytest.approx(cal.check["weights"]["weights"][:2])


def test_weights_moved_under_combine_rescore_the_earlier_scores(small, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the defects move the weights, the earlier good scores (training leave-one-out and added images alike)
    are re-weighed from their kept parts: they are then what the model gives those images at the new weights."""
    from spade_ad.core import labelled_defects

    model, _, goods, defects = small
    fitted = spade_ad.load(small[1])
    fitted.calibrate(goods[:3], combine=True)
    monkeypatch.setattr(labelled_defects, "choose_weights",
                        lambda good, defect, current, rate, coarse=True, **_: ((0.5, 1 / 6, 1 / 3), {
                            "weights": [0.5, 1 / 6, 1 / 3], "caught": 3, "caught_before": 1,
                            "n_defect": len(defect)}))
    fitted.calibrate(goods[3:5], defect=defects, combine=True)
    cal = fitted.calibration_
    assert (fitted.map_weight, fitted.coarse_weight) == (0.5, 1 / 6) and cal.note.startswith("part weights chosen")
    assert cal.n == model.calibration_.n + 5 and cal.scores == sorted(cal.scores)
    rescored = fitted.score(goods[:5])
    assert max(min(abs(np.asarray(cal.scores) - s)) for s in rescored) < 1e-9
    loo = list(fitted._leave_one_out_scores())  # the training images' scores at the new weights
    for score in fitted._scores_of(loo):
        assert min(abs(np.asarray(cal.scores) - score)) < 1e-9
    older = spade_ad.load(small[1])  # a file from before the parts were kept: its weights stay, and it says why
    older.calibration_.parts = []
    older.calibrate(goods[:3], defect=defects, combine=True)
    assert "parts are not in this model file" in older.calibration_.note
    assert older.calibration_.n == model.calibration_.n + 3 and older.map_weight == model.map_weight


def test_an_unreadable_file_is_never_labelled(small, tmp_path: Path) -> None:
    model, model_path, _, _ = small
    from spade_ad.record import RecordError

    with open_record(tmp_path / "r.db") as record:
        recorder = Recorder(record, model, model_path, origin="watch")
        recorder.add_error("notes.txt", "not an image file")
        recorder.close()
        [row] = record.inspections()
        with pytest.raises(RecordError, match="nothing to label"):
            record.set_label(row["id"], "good", "qa")


def test_retried_rows_are_written_once(small, tmp_path: Path) -> None:
    """A batch written again (its commit was not acknowledged) is kept once: rows carry a uid."""
    model, model_path, goods, _ = small
    with open_record(tmp_path / "r.db") as record:
        recorder = Recorder(record, model, model_path, origin="predict")
        [prediction] = model.predict(goods[:1])
        rows = [recorder.row(prediction)]
        first = record.add(rows)
        assert record.add(rows) == first and record.count() == 1
    connection = sqlite3.connect(tmp_path / "r.db")
    assert connection.execute("SELECT count(*) FROM spade_inspections").fetchone() == (1,)
    connection.close()


def test_a_full_disk_under_the_record_loses_nothing(small, small_disk: Path, tmp_path: Path) -> None:
    """The disk holding the record fills up mid-watch, then space is freed: the files dropped meanwhile are in the
    record soon after, each once."""
    model, model_path, goods, _ = small
    camera, out, db = tmp_path / "cam", tmp_path / "out", small_disk / "line.db"
    camera.mkdir()
    messages: list[str] = []
    running = _Running(model, camera, out, _recorder(db, model, model_path, out, messages))
    _drop(goods[0], camera / "first.png")
    wait_until(lambda: _sources(db) == ["first.png"], timeout=60, what="first.png recorded")
    filler = small_disk / "filler"
    with open(filler, "wb") as handle, pytest.raises(OSError):
        while True:
            handle.write(b"\0" * 65536)
            handle.flush()
    for index in range(1, 4):
        _drop(goods[index], camera / f"full{index}.png")
    wait_until(lambda: len(running.watcher.result.names) == 4, timeout=60, what="files scored on a full disk")
    wait_until(lambda: any("recording stopped" in m for m in messages), timeout=30, what="the outage said")
    filler.unlink()
    wait_until(lambda: len(_sources(db)) == 4, timeout=60, what="every file in the record once space is back")
    running.finish()
    assert _sources(db) == ["first.png", "full1.png", "full2.png", "full3.png"]


def _two_sessions(tmp_path: Path) -> tuple[Spade, dict[str, Path]]:
    """A model fitted on 40 generated parts, and two folders of its 30 good test parts: "same" (as captured) and
    "brighter" (a new session: the same parts lit 1.6x)."""
    from PIL import Image, ImageEnhance

    root = make_synthetic_dataset(tmp_path / "part", n_train=40, n_test_good=30, n_test_defect=1, size=(64, 64),
                                  seed=3)
    model = Spade(k_gallery=3, image_size=64, device="cpu", progress=False).fit(root / "train" / "good")
    goods = sorted((root / "test" / "good").glob("*.png"))
    folders = {}
    for name, factor in (("same", 1.0), ("brighter", 1.6)):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        for index, source in enumerate(goods):
            ImageEnhance.Brightness(Image.open(source).convert("RGB")).enhance(factor).save(
                folders[name] / f"{index}.png")
    return model, folders


def test_a_line_unlike_the_calibration_is_warned_about_after_30_images(tmp_path: Path) -> None:
    """A new session (the same parts, lit brighter): after 30 images the watcher warns, with the false-alarm rate
    that implies, without any held-out folder; on the calibration's own kind of images it says nothing."""
    model, folders = _two_sessions(tmp_path)
    for name, camera in folders.items():
        lines: list[str] = []
        result = Watcher(model, camera, tmp_path / f"out-{name}", poll=True, settle=0.05, idle_exit=0.3,
                         log=lines.append).run()
        assert result.scored == 30
        if name == "same":
            assert not result.warnings
        else:
            [warning] = result.warnings
            assert "false-alarm rate" in warning and any(line.startswith("warning:") for line in lines)


def test_predict_warns_when_its_images_score_above_the_calibration(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The batch front door says it too: `predict` on 30 good parts lit brighter warns (during the run, on its
    stderr) with the false-alarm rate the shift implies; on good parts like the training ones it says nothing."""
    from spade_ad.apps.cli import main

    model, folders = _two_sessions(tmp_path)
    model_path = model.save(tmp_path / "m.safetensors")
    for name, folder in folders.items():
        main(["predict", str(model_path), str(folder), "-o", str(tmp_path / f"out-{name}"), "--outputs", "none"])
        err = capsys.readouterr().err
        if name == "same":
            assert "warning" not in err
        else:
            assert err.count("warning:") == 1 and "false-alarm rate" in err


def test_the_shift_monitor_checks_at_its_checkpoints_only(small) -> None:
    """The service and watch share one schedule: a warning can come at the 30th, 100th and 300th score, then every
    1000th, never in between (each check costs a Mann-Whitney test)."""
    from spade_ad.core.shift import ShiftMonitor

    model, _, _, _ = small
    calibration = model.calibration_
    high = max(calibration.scores) * 10 + 10  # every score flagged: unlike the calibration at any checkpoint
    monitor = ShiftMonitor()
    said = [index for index in range(1, 1101) if monitor.add(calibration, high) is not None]
    assert said == [30, 100, 300, 1000] and len(monitor.warnings) == 4 and len(monitor.scores) == 1000


def test_the_shift_monitor_checks_what_is_left_at_the_end_of_a_batch(small) -> None:
    """`finish` (the end of a `predict` run) checks the scores since the last checkpoint, never the same ones
    twice."""
    from spade_ad.core.shift import ShiftMonitor

    model, _, _, _ = small
    calibration = model.calibration_
    high = max(calibration.scores) * 10 + 10
    for count, expected in ((25, True), (30, False), (45, True)):
        monitor = ShiftMonitor()
        for _ in range(count):
            monitor.add(calibration, high)
        assert (monitor.finish(calibration) is not None) is expected, count
    quiet = ShiftMonitor()
    for score in sorted(calibration.scores)[: len(calibration.scores) // 2] * 2:
        quiet.add(calibration, score)
    assert quiet.finish(calibration) is None  # good scores like the calibration's: nothing to say


def test_retention_removes_old_kept_copies_only(tmp_path: Path) -> None:
    """--keep-days prunes the kept copies; the outboxes and uploads beside them are never touched."""
    import os

    store = EvidenceStore(tmp_path / "files")
    old_image = tmp_path / "old.png"
    old_image.write_bytes(b"old pixels")
    kept, _ = store.keep(old_image)
    outbox = tmp_path / "files" / "record-outbox-default.jsonl"
    outbox.write_text('{"row": {}}\n')
    week_ago = time.time() - 7 * 86400
    for path in (kept, outbox):
        os.utime(path, (week_ago, week_ago))
    pruned = EvidenceStore(tmp_path / "files", max_days=3)
    assert not kept.exists() and outbox.exists()
    fresh, _ = pruned.keep(tmp_path / "old.png")
    assert fresh.exists()
