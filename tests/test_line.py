"""Running at the line: `spade-ad record list` and `record export` (CSV and Parquet, filters, a read-only record),
`serve`'s start-up log (times, the record, each model as it loads), and the systemd units in deploy/systemd
(checked with `systemd-analyze verify` where it is installed)."""

from __future__ import annotations

import configparser
import csv
import json
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from cli_run import run_cli
from spade_ad.record import open_record

pytest.importorskip("sqlalchemy")

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "deploy" / "systemd"
DAY = 1_764_979_200_000  # 2025-12-06T00:00Z in ms
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:?\d\d ")  # ISO 8601, local time


def _fill(target: Path) -> list[int]:
    """A record of six inspections an hour apart from DAY (two models; a defect labelled, an error row)."""
    with open_record(target) as record:
        for model, name in (("a" * 64, "bottle.safetensors"), ("b" * 64, "plate.safetensors")):
            record.register_model({"id": model, "name": name, "kind": "model file", "settings_digest": "d" * 64})
        verdicts = ["good", "defect", "good", "error", "defect", "good"]
        ids = record.add([{
            "origin": "watch", "source": f"cam/{i}.png", "verdict": verdict, "at_ms": DAY + i * 3_600_000,
            "model_id": "b" * 64 if i == 5 else "a" * 64, "model_name": "plate" if i == 5 else "bottle",
            "score": None if verdict == "error" else 1.5 + i,
            "normalized_score": None if verdict == "error" else 0.25 * i,
            "regions": [{"box": [1, 2, 3, 4], "area": 4}] if verdict == "defect" else None,
            "error": "not an image file" if verdict == "error" else None,
        } for i, verdict in enumerate(verdicts)])
        record.set_label(ids[1], "defect", "ann")
        record.set_label(ids[2], "good", "bob")
    return ids


def test_record_list_filters_and_shows_a_table_or_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = _fill(tmp_path / "r.db")
    assert run_cli(["record", "list", tmp_path / "r.db"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["id", "at", "source", "model", "verdict", "score", "normalised", "label", "label_by"]
    assert [int(line.split()[0]) for line in lines[1:]] == ids[::-1]  # newest first
    assert "2025-12-06 01:00:00  cam/1.png" in lines[-2] and lines[-2].split()[-2:] == ["defect", "ann"]

    assert run_cli(["record", "list", tmp_path / "r.db", "--verdict", "defect", "--label", "none", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["id"], row["source"], row["regions"][0]["box"]) == (ids[4], "cam/4.png", [1, 2, 3, 4])
    assert row["at"] == "2025-12-06T04:00:00.000Z"
    cases = {("--since", "2025-12-06T02:00", "--until", "2025-12-06T04:00"): ids[2:4],
             ("--since", "2025-12-06T03:00+01:00"): ids[2:],  # 02:00 UTC
             ("--label", "good"): ids[2:3], ("--verdict", "error"): ids[3:4], ("--model", "plate.safetensors"): ids[5:],
             ("--model", "aaaa", "--limit", "2"): ids[3:5]}
    for options, expected in cases.items():
        assert run_cli(["record", "list", tmp_path / "r.db", *options, "--json"]) == 0, options
        assert [r["id"] for r in json.loads(capsys.readouterr().out)] == expected[::-1], options
    assert run_cli(["record", "list", tmp_path / "r.db", "--since", "2999-01-01"]) == 0
    assert capsys.readouterr().err.strip() == "no inspection matches"
    for options, message in ((["--since", "yesterday"], "--since: not an ISO date or time (got 'yesterday')"),
                             (["--model", "nope"], "has no model 'nope'; known: "),
                             (["--verdict", "maybe"], "Invalid value for '--verdict'")):
        assert run_cli(["record", "list", tmp_path / "r.db", *options]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        if options[0] == "--model":  # both, newest first; the two were registered within a millisecond or two
            assert "plate.safetensors (bbbbbbbbbbbb)" in err and "bottle.safetensors (aaaaaaaaaaaa)" in err, err
    assert run_cli(["record", "list", tmp_path / "missing.db"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "missing.db").exists()  # reading never creates a record


def test_record_export_csv_and_parquet_from_a_read_only_record(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    ids = _fill(folder / "r.db")
    with open_record(folder / "r.db") as record:
        rows = {r["id"]: r for r in record.inspections()}
    (folder / "r.db").chmod(0o444)
    folder.chmod(0o555)
    try:
        assert run_cli(["record", "export", folder / "r.db", "-o", tmp_path / "all.csv"]) == 0
        assert capsys.readouterr().out.strip() == f"exported 6 inspections to {tmp_path / 'all.csv'}"
        with open(tmp_path / "all.csv", newline="") as handle:
            exported = list(csv.DictReader(handle))
        assert [int(r["id"]) for r in exported] == ids  # oldest first, every row
        for line in exported:
            row = rows[int(line["id"])]
            for name in ("source", "verdict", "model_id", "label", "label_by", "error"):
                assert line[name] == (row[name] or ""), name
            assert line["score"] == ("" if row["score"] is None else repr(row["score"]))
            assert int(line["at_ms"]) == row["at_ms"] and line["at"].startswith("2025-12-06T0")
        assert json.loads(exported[1]["regions"])[0]["box"] == [1, 2, 3, 4]
        assert exported[1]["label_at"].endswith("Z")

        pq = pytest.importorskip("pyarrow.parquet")
        assert run_cli(["record", "export", folder / "r.db", "--format", "parquet", "--since", "2025-12-06T01:00",
                        "--model", "bottle.safetensors", "--label", "none", "-o", tmp_path / "x.parquet"]) == 0
        assert capsys.readouterr().out.strip().startswith("exported 2 inspections to ")
        table = pq.read_table(tmp_path / "x.parquet")
        assert table.column("id").to_pylist() == [ids[3], ids[4]]
        assert str(table.schema.field("score").type) == "double" and str(table.schema.field("at_ms").type) == "int64"
        assert table.column("verdict").to_pylist() == ["error", "defect"]
        assert run_cli(["record", "export", folder / "r.db", "--format", "parquet", "--since", "2999-01-01",
                        "-o", tmp_path / "none.parquet"]) == 0  # nothing selected: a file with the columns, 0 rows
        assert pq.read_table(tmp_path / "none.parquet").num_rows == 0
    finally:
        folder.chmod(0o755)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.csv", "none.parquet", "ro", "x.parquet"]  # no .part


def test_parquet_without_pyarrow_says_which_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _fill(tmp_path / "r.db")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as on an install without it: the import fails
    assert run_cli(["record", "export", tmp_path / "r.db", "--format", "parquet", "-o", tmp_path / "x.parquet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pip install 'spade-ad[parquet]'" in err
    assert not list(tmp_path.glob("*parquet*"))
    assert run_cli(["record", "export", tmp_path / "r.db", "-o", "-", "--verdict", "error"]) == 0  # csv to stdout
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("at,id,at_ms,") and len(lines) == 2 and ",error," in lines[1]


def test_serve_logs_the_record_and_each_model_with_times(tmp_path: Path) -> None:
    from child_server import serve_in_subprocess
    from spade_ad import Spade
    from spade_ad.data.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path / "disc", n_train=8, n_test_good=1, n_test_defect=1, size=(96, 96),
                                  seed=0)
    Spade(k_gallery=4, device="cpu", progress=False).fit(root / "train" / "good").save(tmp_path / "disc.safetensors")
    db = tmp_path / "inspections.db"
    with serve_in_subprocess(tmp_path / "disc.safetensors", "--record", str(db)) as child:
        with urllib.request.urlopen(f"{child.url}/healthz") as answer:
            assert answer.status == 200
        log = child.log.read_text()
    lines = [line for line in log.splitlines() if re.search(r"\b(INFO|WARNING|ERROR):", line)]  # the log's lines
    assert len(lines) >= 4 and all(STAMP.match(line) for line in lines), log  # each starts with its time
    assert f"inspection record: {db} (schema " in log
    loading = next(i for i, line in enumerate(lines) if "loading model 1/1 from " in line)
    assert str(tmp_path / "disc.safetensors") in lines[loading]
    assert re.search(r"loaded model 1/1 in \d+\.\d s: backbone \S+, 8 good images, image threshold ", log)
    assert any('"GET /healthz HTTP/1.1" 200' in line for line in lines[loading:])  # access lines too


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keys as written
    parser.read(UNITS / name)
    return parser


@pytest.mark.parametrize("name", ["spade-ad-watch.service", "spade-ad-serve.service"])
def test_systemd_units_restart_and_read_their_settings(name: str, tmp_path: Path) -> None:
    unit = _unit(name)
    service = unit["Service"]
    assert service["Restart"] == "on-failure" and service["RestartSec"].rstrip("s").isdigit()
    assert service["User"] == "spade-ad" and service["WorkingDirectory"] == "/var/lib/spade-ad"
    assert unit["Install"]["WantedBy"] == "multi-user.target" and unit["Unit"]["StartLimitIntervalSec"] == "0"
    command = service["ExecStart"].split()
    assert command[:2] == ["/opt/spade-ad/bin/spade-ad", name.split("-")[2].split(".")[0]]
    settings = {line.split("=", 1)[0] for line in (UNITS / "spade-ad.env").read_text().splitlines()
                if line and not line.startswith("#")}
    assert service["EnvironmentFile"].endswith("/spade-ad.env")
    used = set(re.findall(r"\$\{?([A-Z_]+)\}?", service["ExecStart"]))
    assert used and used <= settings, used - settings  # every variable the command uses is in the example file
    from spade_ad.apps.cli import app

    subcommand = app.commands[command[1]]  # the options the unit passes exist
    given = {word for word in command if word.startswith("-")}
    known = {opt for param in subcommand.params for opt in (*param.opts, *param.secondary_opts)}
    assert given <= known, given - known
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: the units were checked by their keys only")
    executable = shutil.which("spade-ad") or str(Path(sys.executable).with_name("spade-ad"))
    (tmp_path / name).write_text((UNITS / name).read_text().replace("/opt/spade-ad/bin/spade-ad", executable))
    done = subprocess.run([analyze, "verify", str(tmp_path / name)], capture_output=True, text=True)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_review_queue_pages_by_keyset_even_when_times_and_ids_disagree(record_target: str) -> None:
    """Rows recorded out of time order (a backfilled outbox, a watcher's clock): walking the queue page by page
    (before = the last id shown) gives every row once, newest first by time, and no next page after the last."""
    times = [5, 1, 7, 3, 3, 9, 2, 8]
    with open_record(record_target) as record:
        ids = record.add([{"origin": "watch", "source": f"{i}.png", "verdict": "defect", "at_ms": DAY + t}
                          for i, t in enumerate(times)])
        seen, before = [], None
        while True:
            page = record.queue(limit=3, before_id=before)
            seen += [row["id"] for row in page]
            if len(page) < 3:
                break
            before = page[-1]["id"]
    expected = [i for _, i in sorted(zip(times, ids), key=lambda pair: (-pair[0], -pair[1]))]
    assert seen == expected


def test_a_read_only_opening_writes_nothing(record_target: str, capsys: pytest.CaptureFixture[str]) -> None:
    """SQLite (mode=ro) and PostgreSQL (read-only transactions) alike: the commands that only read list the record,
    and a write through a read-only opening is refused by the database itself."""
    from spade_ad.record import RecordUnavailable

    ids = _fill(record_target)
    assert run_cli(["record", "list", record_target, "--json"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == ids[::-1]
    with open_record(record_target, readonly=True) as record:
        assert record.readonly and record.count() == 6
        with pytest.raises(RecordUnavailable, match="read-only|readonly"):
            record.add([{"origin": "test", "source": "x.png", "verdict": "good"}])
    with open_record(record_target) as record:
        assert record.count() == 6


def test_watch_log_lines_carry_their_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from spade_ad import Spade
    from spade_ad.data.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path / "disc", n_train=8, n_test_good=1, n_test_defect=1, size=(96, 96),
                                  seed=0)
    Spade(k_gallery=4, device="cpu", progress=False).fit(root / "train" / "good").save(tmp_path / "m.safetensors")
    camera = tmp_path / "camera"
    camera.mkdir()
    shutil.copy(root / "test" / "good" / "000.png", camera / "a.png")
    (camera / "notes.txt").write_text("not an image")
    assert run_cli(["watch", tmp_path / "m.safetensors", camera, "-o", tmp_path / "out", "--record",
                    tmp_path / "r.db", "--poll", "--settle", "0", "--max-images", "2"]) == 0
    logged = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert any("a.png: good" in line for line in logged) and any("notes.txt" in line for line in logged), logged
    assert all(STAMP.match(line) for line in logged), logged
