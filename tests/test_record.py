"""The inspection record (spade_ad.record, spade_ad.record.recorder): schema and migrations, writes and reads, the bad
records the command line refuses in one line, two writers on one SQLite file, a crash mid-batch, and the database
going away mid-run. Run against SQLite and PostgreSQL (`record_target`)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sqlalchemy as sa

from cli_run import run_cli
from spade_ad.outputs.writers import PredictionWriter
from spade_ad.record import SCHEMA_VERSION, RecordError, file_sha256, open_record
from spade_ad.record import schema as record_schema
from spade_ad.record.recorder import Recorder

pytest.importorskip("sqlalchemy")
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _row(source: str, verdict: str = "good", score: float = 1.0, **extra: object) -> dict[str, object]:
    return {"origin": "test", "source": source, "verdict": verdict, "score": score, **extra}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory, fitted_model) -> Path:
    path = tmp_path_factory.mktemp("record-model") / "widget.safetensors"
    fitted_model.save(path)
    return path


def test_fresh_record_has_the_latest_schema_and_an_old_one_is_migrated(record_target: str) -> None:
    """A release-1 record (built by the first migration only) is brought to the latest schema on opening, keeping
    its rows; its tables then match a fresh record's."""
    engine = sa.create_engine(record_target.replace("postgresql://", "postgresql+psycopg://")
                              if "://" in record_target else f"sqlite:///{record_target}")
    with engine.begin() as connection:
        record_schema.MIGRATIONS[0][1](connection)
        connection.execute(record_schema.versions.insert().values(version=1, applied_ms=0, release="0.1"))
        connection.execute(sa.text("INSERT INTO spade_inspections (at_ms, origin, source, verdict, score, label, "
                                   "label_by, label_ms) VALUES (5, 'predict', 'old.png', 'good', 0.5, 'defect', "
                                   "'ann', 7)"))
    engine.dispose()
    with open_record(record_target) as record:
        assert record.schema_version == SCHEMA_VERSION == 3
        [old] = record.inspections()
        assert (old["source"], old["score"], old["why_path"], old["uid"]) == ("old.png", 0.5, None, None)
        migrated = record.table_info()
        assert {"why_path", "uid", "kept_path"} <= set(migrated["spade_inspections"]["columns"])
        assert len(migrated["spade_inspections"]["indexes"]) == len(record_schema.INDEXES) + 1  # + the uid's
        # the label given before the history existed is its first entry; a new one is added after it
        assert record.label_history(old["id"]) == [{"label": "defect", "label_by": "ann", "label_ms": 7}]
        record.set_label(old["id"], "good", "bob")
        assert [h["label_by"] for h in record.label_history(old["id"])] == ["ann", "bob"]
        assert record.get(old["id"])["label"] == "good"
        with record.engine.connect() as connection:
            applied = connection.execute(sa.select(record_schema.versions.c.version)).scalars().all()
        assert sorted(applied) == [1, 2, 3]
    if "://" not in record_target:
        fresh = Path(record_target).with_name("fresh.db")
        with open_record(fresh) as record:
            assert record.table_info() == migrated


def test_rows_queue_labels_and_history(record_target: str) -> None:
    with open_record(record_target) as record:
        ids = record.add([_row("a.png", "good", 1.0, normalized_score=0.2, at_ms=1_000),
                          _row("b.png", "defect", 5.0, normalized_score=2.5, at_ms=2_000,
                               regions=[{"box": [1, 2, 3, 4], "area": 4, "peak": 9.0, "mean": 8.0}]),
                          _row("c.png", "good", 2.0, normalized_score=0.9, at_ms=3_000),
                          _row("d.png", "error", None, error="not an image file", at_ms=4_000)])
        assert len(ids) == 4 and ids == sorted(ids)
        queue = record.queue()
        assert [r["source"] for r in queue] == ["c.png", "b.png"]  # newest first; a.png is clearly good, d.png an error
        assert [r["source"] for r in record.queue(verdict="error")] == ["d.png"]  # errors: their own filter
        assert [r["source"] for r in record.queue(verdict="defect")] == ["b.png"]
        assert [r["source"] for r in record.queue(verdict="good")] == ["c.png"]  # borderline
        assert [r["source"] for r in record.queue(since_ms=2_500)] == ["c.png"]
        assert json.loads(record.get(ids[1])["regions"])[0]["box"] == [1, 2, 3, 4]
        labelled = record.set_label(ids[1], "good", "ann")
        assert (labelled["label"], labelled["label_by"]) == ("good", "ann") and labelled["label_ms"] > 0
        assert "b.png" not in [r["source"] for r in record.queue()]
        assert [r["source"] for r in record.labelled()["good"]] == ["b.png"]
        with pytest.raises(RecordError, match="label must be one of good, defect"):
            record.set_label(ids[0], "maybe", "ann")
        [hour] = record.history(None)
        assert (hour["n"], hour["flagged"], hour["start_ms"]) == (3, 1, 0)  # the error is not an inspection result
        assert record.was_scored("a.png", "x" * 64) is False


def test_a_record_of_a_newer_schema_is_refused(record_target: str) -> None:
    with open_record(record_target) as record:
        with record.engine.begin() as connection:
            connection.execute(record_schema.versions.insert().values(version=99, applied_ms=0, release="9"))
    with pytest.raises(RecordError, match=r"schema version 99, newer than this spade-ad .* upgrade spade-ad"):
        open_record(record_target)


@pytest.mark.parametrize("case", ["not_a_database", "newer_schema", "read_only", "other_tables", "folder"])
def test_bad_record_file_is_one_line_and_exit_2(case: str, tmp_path: Path, model_file: Path, synthetic_root: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "inspections.db"
    if case == "not_a_database":
        target.write_text("these are notes, not a database\n" * 10)
    elif case == "newer_schema":
        with open_record(target) as record, record.engine.begin() as connection:
            connection.execute(record_schema.versions.insert().values(version=7, applied_ms=0, release="9"))
    elif case == "read_only":
        open_record(target).close()
        target.chmod(0o444)
    elif case == "other_tables":
        with sqlite3.connect(target) as connection:
            connection.execute("CREATE TABLE invoices (n INTEGER)")
    else:
        target.mkdir()
    code = run_cli(["predict", model_file, synthetic_root / "test" / "good", "-o", tmp_path / "out",
                    "--record", target])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: record ") and str(target) in err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "scores.csv").exists()  # refused before anything was scored
    expected = {"not_a_database": "is not a database", "newer_schema": "newer than this spade-ad",
                "read_only": "is read-only", "other_tables": "holds other tables", "folder": "is a folder"}[case]
    assert expected in err


def test_drift_on_a_missing_record_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["drift", tmp_path / "nowhere.db"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "nowhere.db").exists()


def test_predict_record_writes_every_prediction(record_target: str, model_file: Path, synthetic_root: Path,
                                                tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = run_cli(["predict", model_file, synthetic_root / "test", "-o", out, "--record", record_target,
                    "--explain"])
    assert code == 0
    assert "recorded 12 inspections" in capsys.readouterr().out
    scores = (out / "scores.csv").read_text().splitlines()[1:]
    with open_record(record_target) as record:
        rows = record.inspections()
        [model_row] = record.models()
    assert [r["source"] for r in rows] == [line.split(",")[0] for line in scores]
    assert model_row["id"] == file_sha256(model_file) and model_row["name"] == "widget.safetensors"
    assert len(model_row["calibration_scores"]) == 12  # the leave-one-out scores, for drift
    for row, line in zip(rows, scores, strict=True):
        cells = line.split(",")
        assert row["score"] == pytest.approx(float(cells[1]), rel=1e-5)
        assert row["verdict"] == ("defect" if cells[4] == "1" else "good")
        assert row["sha256"] == file_sha256(synthetic_root / "test" / row["source"])
        assert (row["width"], row["height"]) == (224, 160)
        assert Path(row["overlay_path"]).is_file() and row["map_path"] is None  # default outputs: no heat map
        assert row["model_id"] == model_row["id"] and row["origin"] == "predict"
        assert row["image_threshold"] == pytest.approx(model_row["image_threshold"])
        assert (row["why_path"] is not None) == (row["verdict"] == "defect")
        assert len(json.loads(row["regions"])) == int(cells[5])


def test_skipped_files_are_recorded_as_errors(tmp_path: Path, model_file: Path, synthetic_root: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "ok.png").write_bytes((synthetic_root / "test" / "good" / "000.png").read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert run_cli(["predict", model_file, folder, "-o", tmp_path / "out", "--record", tmp_path / "r.db",
                    "--skip-bad"]) == 0
    with open_record(tmp_path / "r.db") as record:
        rows = {r["source"]: r for r in record.inspections()}
    assert rows["broken.png"]["verdict"] == "error" and rows["broken.png"]["error"]
    assert rows["broken.png"]["sha256"] == file_sha256(folder / "broken.png")
    assert rows["ok.png"]["verdict"] in ("good", "defect")


def test_two_processes_write_one_sqlite_file(tmp_path: Path) -> None:
    target = tmp_path / "shared.db"
    open_record(target).close()
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {SRC!r})
        from spade_ad.record import open_record
        record = open_record(sys.argv[1])
        for batch in range(20):
            record.add([{{"origin": "test", "source": f"{{sys.argv[2]}}-{{batch}}-{{i}}.png", "verdict": "good",
                         "score": 1.0}} for i in range(10)])
    """)
    writers = [subprocess.Popen([sys.executable, "-c", script, str(target), name]) for name in ("a", "b")]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    with open_record(target) as record:
        rows = record.inspections()
    assert len(rows) == 400 and len({r["source"] for r in rows}) == 400
    assert len({r["id"] for r in rows}) == 400


def test_a_crash_loses_at_most_the_unfinished_batch(tmp_path: Path, fitted_model) -> None:
    """A process killed between batches leaves every finished batch, and a sound file."""
    target = tmp_path / "crash.db"
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {SRC!r})
        from spade_ad.record import open_record
        record = open_record(sys.argv[1])
        for batch in range(3):
            record.add([{{"origin": "test", "source": f"{{batch}}-{{i}}", "verdict": "good", "score": 1.0}}
                        for i in range(4)])
        os._exit(9)  # killed: no close, no checkpoint
    """)
    assert subprocess.run([sys.executable, "-c", script, str(target)], timeout=120).returncode == 9
    with sqlite3.connect(target) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with open_record(target) as record:
        assert record.count() == 12


def test_batches_are_written_whole(tmp_path: Path, fitted_model) -> None:
    """The Recorder writes its rows in batches: none before the batch is full, all of it at once."""
    with open_record(tmp_path / "b.db") as record:
        recorder = Recorder(record, fitted_model, None, origin="test", batch_size=3, max_wait=3600)
        for name in "abcd":
            recorder.add_error(f"{name}.png", "not an image file")
            assert record.count() == (3 if name in "cd" else 0)
        recorder.close()
        assert record.count() == 4 and recorder.recorded == 4 and not recorder.unrecorded


def test_database_going_away_mid_run(postgres_cluster, fitted_model, synthetic_root: Path, tmp_path: Path) -> None:
    """PostgreSQL stopped mid-run: what was written stays, the rest waits in the outbox (listed by name), the
    outputs on disk are complete, and once the server is back the waiting rows are written, each once."""
    import pg_cluster

    cluster = pg_cluster.start_cluster()  # its own cluster: this test stops it
    assert not isinstance(cluster, str), cluster
    try:
        url = cluster.database("going_away")
        record = open_record(url)
        failures: list[str] = []
        outbox = tmp_path / "outbox.jsonl"
        recorder = Recorder(record, fitted_model, None, origin="predict", batch_size=2, max_wait=3600,
                            outbox=outbox, on_failure=failures.append)
        writer = recorder.follow(PredictionWriter.for_model(fitted_model, tmp_path / "out"))

        def predictions():
            for index, prediction in enumerate(fitted_model.iter_predict(synthetic_root / "test", original_size=True,
                                                                         keep_images=True)):
                if index == 4:
                    cluster.stop()
                yield prediction

        with writer:
            writer.write_all(predictions())
        recorder.close()
        assert writer.count == 12 and len((tmp_path / "out" / "scores.csv").read_text().splitlines()) == 13
        assert len(list((tmp_path / "out" / "overlays").rglob("*.png"))) == 12
        assert recorder.recorded == 4 and recorder.waiting == 8
        assert failures and "recording stopped" in failures[0] and "not written" in failures[0]
        assert "8 WAITING" in recorder.summary()
        listed = recorder.write_unrecorded(tmp_path / "out")
        assert listed is not None and len(listed.read_text().splitlines()) == 8
        assert sum('"row"' in line for line in outbox.read_text().splitlines()) == 8
        cluster.start()
        assert recorder.poll(force=True) and recorder.recorded == 12 and not outbox.exists()
        assert recorder.write_unrecorded(tmp_path / "out") is None
        record.close()
        with open_record(url) as again:
            assert sorted(r["source"] for r in again.inspections()) == sorted(
                line.split(",")[0] for line in (tmp_path / "out" / "scores.csv").read_text().splitlines()[1:])
    finally:
        pg_cluster.remove(cluster)


def test_postgres_url_without_server_is_one_line(tmp_path: Path, model_file: Path, synthetic_root: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("psycopg")
    from child_server import free_port

    url = f"postgresql://spade:secret@127.0.0.1:{free_port()}/nothing"
    code = run_cli(["predict", model_file, synthetic_root / "test" / "good", "-o", tmp_path / "o", "--record", url])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "record postgresql://spade:***@127.0.0.1" in err and "secret" not in err




def test_two_processes_opening_one_new_record_build_it_once(record_target: str) -> None:
    """Both migrate under the back end's write lock (BEGIN IMMEDIATE; an advisory lock on PostgreSQL): no error,
    one set of tables, each version applied once."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {SRC!r})
        from spade_ad.record import open_record
        open_record(sys.argv[1]).add([{{"origin": "test", "source": sys.argv[2], "verdict": "good"}}])
    """)
    openers = [subprocess.Popen([sys.executable, "-c", script, record_target, name]) for name in "abc"]
    assert [p.wait(timeout=120) for p in openers] == [0, 0, 0]
    with open_record(record_target) as record:
        assert sorted(r["source"] for r in record.inspections()) == ["a", "b", "c"]
        with record.engine.connect() as connection:
            applied = connection.execute(sa.select(record_schema.versions.c.version)).scalars().all()
        assert sorted(applied) == [1, 2, 3]
