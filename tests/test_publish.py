"""Verdicts out (spade_ad.apps.publish): real inspections published to a real Mosquitto broker that is stopped mid-run
and to a local webhook that refuses for a while; every message arrives once by id, nothing is left in the outbox."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import publish_targets
from publish_targets import TOPIC, Subscriber, Webhook
from spade_ad.apps.publish import (
    SCHEMA_FILE,
    Outbox,
    Publisher,
    PublishError,
    Publishers,
    error_message,
    inspection_message,
    message_id,
    outbox_file,
    parse_target,
)
from spade_ad.record import file_sha256


@pytest.fixture(scope="module")
def inspections(fitted_model: Any, synthetic_root: Path) -> list[tuple[Any, str, str]]:
    """Real predictions of the fitted synthetic model on its test images: (prediction, source, sha256)."""
    paths = sorted((synthetic_root / "test").rglob("*.png"))
    predictions = list(fitted_model.iter_predict(paths, original_size=True, keep_images=True))
    return [(p, path.relative_to(synthetic_root).as_posix(), file_sha256(path)) for p, path in zip(predictions, paths)]


@pytest.fixture
def broker(tmp_path: Path):
    started = publish_targets.start_broker(tmp_path / "broker")
    if isinstance(started, str):
        pytest.skip(started)
    yield started
    started.stop()


def _messages(inspections: list[tuple[Any, str, str]], n: int, model_id: str = "m" * 64,
              first: int = 0) -> list[dict[str, Any]]:
    """n messages of distinct inspections: the real predictions, each image seen under several camera names."""
    out = []
    for i in range(first, first + n):
        prediction, source, sha256 = inspections[i % len(inspections)]
        out.append(inspection_message(prediction, source=f"cam{i // len(inspections)}/{source}", sha256=sha256,
                                      model_name="widget.safetensors", model_id=model_id, at=1_800_000_000 + i))
    return out


# -- the message ---------------------------------------------------------------------------------------------------
def test_messages_of_real_predictions_follow_the_schema(inspections: list[tuple[Any, str, str]]) -> None:
    import jsonschema

    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    verdicts = Counter()
    for prediction, source, sha256 in inspections:
        message = inspection_message(prediction, source=source, sha256=sha256, model_name="widget.safetensors",
                                     model_id="a" * 64, at=1_800_000_000.25)
        validator.validate(json.loads(json.dumps(message, allow_nan=False)))
        assert message["id"] == message_id(source, sha256, "a" * 64)
        assert message["time"] == "2027-01-15T08:00:00.250Z"
        assert message["score"] == pytest.approx(prediction.score)
        assert message["verdict"] == ("defect" if prediction.is_anomalous else "good")
        assert (message["width"], message["height"]) == (prediction.image.width, prediction.image.height)
        assert message["map_size"] == [prediction.image.width, prediction.image.height]  # boxes in image pixels
        assert len(message["regions"]) == message["regions_total"] == len(prediction.regions)
        if message["regions"]:
            assert message["regions"][0]["box"] == list(prediction.regions[0].box)
        verdicts[message["verdict"]] += 1
    assert verdicts["defect"] >= 1 and verdicts["good"] >= 1, verdicts
    validator.validate(error_message(source="x.png", sha256="b" * 64, reason="not an image", model_name="m",
                                     model_id=None))
    # the id: stable, and different for another file content, another model, another recorded inspection
    ids = {message_id("a.png", "1" * 64, "m"), message_id("a.png", "2" * 64, "m"), message_id("a.png", "1" * 64, "n"),
           message_id("a.png", "1" * 64, "m", inspection_id=7), message_id("b.png", "1" * 64, "m")}
    assert len(ids) == 5 and message_id("a.png", "1" * 64, "m") == message_id("a.png", "1" * 64, "m")


def test_bad_targets_are_one_line_errors(tmp_path: Path) -> None:
    assert parse_target("mqtt://user:secret@broker.local/spade/line1").shown == "mqtt://user@broker.local/spade/line1"
    assert parse_target("mqtt://broker.local/spade/line1").port == 1883
    assert parse_target("https://plc.example/hook").port == 443
    assert parse_target("opc.tcp://0.0.0.0/spade-ad").url == "opc.tcp://0.0.0.0:4840/spade-ad"
    with pytest.raises(PublishError, match="server of the latest inspection"):
        Publisher.open("opc.tcp://0.0.0.0:4840", tmp_path)  # no outbox: Publishers.open serves it
    for url, says in [("ftp://x/y", "unknown scheme"), ("mqtt://broker.local", "no topic"),
                      ("mqtt://broker.local/a/#", "wildcard"), ("http:///hook", "no host"),
                      ("mqtt://broker.local:99999/t", "port")]:
        with pytest.raises(PublishError, match=says) as caught:
            Publisher.open(url, tmp_path)
        assert "\n" not in str(caught.value)
    assert not list(tmp_path.iterdir())  # nothing created for a bad URL


def test_outbox_is_bounded_keeps_the_oldest_and_refuses_repeats(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.sqlite", target="t", max_messages=3)
    assert [outbox.add(f"id{i}", "{}") for i in range(4)] == ["queued", "queued", "queued", "full"]
    assert outbox.add("id0", "{}") == "duplicate"
    assert [row[1] for row in outbox.oldest(10)] == ["id0", "id1", "id2"]  # the oldest kept
    outbox.remove([(seq, i) for seq, i, _ in outbox.oldest(1)])
    assert outbox.add("id0", "{}") == "duplicate"  # delivered lately: not sent again
    assert outbox.add("id3", "{}") == "queued"
    outbox.close()
    reopened = Outbox(tmp_path / "o.sqlite", target="t", max_messages=3)  # what a new run finds
    assert [row[1] for row in reopened.oldest(10)] == ["id1", "id2", "id3"]
    reopened.close()


def test_a_full_outbox_warns_once_and_keeps_the_oldest(tmp_path: Path) -> None:
    lines: list[str] = []
    # a port nothing listens on: every message stays in the outbox
    publisher = Publisher.open(f"mqtt://127.0.0.1:{publish_targets.free_port()}/t", tmp_path, max_messages=5,
                               log=lines.append)
    outcomes = [publisher.publish({"id": f"{i:032x}", "n": i}) for i in range(8)]
    assert outcomes == ["queued"] * 5 + ["full"] * 3
    assert publisher.close(timeout=0) == 5
    full = [line for line in lines if "outbox full" in line]
    assert len(full) == 1 and "oldest are kept" in full[0]
    assert any("5 messages not delivered, kept in" in line for line in lines)


# -- MQTT ----------------------------------------------------------------------------------------------------------
def _outage_run(broker: publish_targets.Broker, inspections: list[tuple[Any, str, str]], tmp_path: Path,
                capfd: pytest.CaptureFixture[str], *, outage: float, n: int) -> None:
    """Publish n real inspections, a third before, a third during and a third after a broker outage of `outage`
    seconds; every id arrives (exactly once after deduplication by id), the outbox ends empty, no traceback."""
    subscriber = Subscriber(broker.port)
    out = tmp_path / "out"
    publisher = Publisher.open(f"mqtt://127.0.0.1:{broker.port}/{TOPIC}", out, max_backoff=1.0)  # log: stderr
    messages = _messages(inspections, n)
    third = n // 3
    try:
        for message in messages[:third]:
            assert publisher.publish(message) == "queued"
        assert subscriber.wait_for({m["id"] for m in messages[:third]}, 20) >= {m["id"] for m in messages[:third]}
        broker.stop()
        stopped_at = time.monotonic()
        for message in messages[third:2 * third]:
            assert publisher.publish(message) == "queued"  # never blocks, never raises while the broker is down
            time.sleep(outage / third / 2)
        time.sleep(max(0.0, outage - (time.monotonic() - stopped_at)))
        assert publisher.waiting >= third  # everything published during the outage waits in the outbox
        broker.start()
        for message in messages[2 * third:]:
            publisher.publish(message)
        assert publisher.close(timeout=30) == 0
        expected = {m["id"] for m in messages}
        got = subscriber.wait_for(expected, 30)
    finally:
        subscriber.close()
    assert got == expected
    ids = subscriber.ids()
    assert len(ids) - len(set(ids)) <= 50  # QoS 1 may repeat the unacknowledged batch at most; the id dedups it
    assert all(key == payload["id"] for key, payload in subscriber.received)  # the id is the user property too
    by_id = {payload["id"]: payload for _, payload in subscriber.received}
    assert [by_id[m["id"]] for m in messages] == messages  # payloads intact
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = captured.err.splitlines()
    stopped = [line for line in lines if ": stopped (" in line]
    resumed = [line for line in lines if ": resumed after " in line]
    assert len(stopped) == 1 and len(resumed) == 1, lines
    for line in stopped + resumed:  # timestamped: 2026-12-06T15:40:01+00:00 publish mqtt://...
        assert datetime.fromisoformat(line.split()[0]).tzinfo is not None and " publish mqtt://" in line
    waited = int(resumed[0].split("; ")[1].split()[0])
    assert waited >= third
    assert Outbox(outbox_file(out, parse_target(f"mqtt://127.0.0.1:{broker.port}/{TOPIC}")), target="").count() == 0


def test_mqtt_broker_stopped_mid_run_loses_and_doubles_nothing(
        broker: publish_targets.Broker, inspections: list[tuple[Any, str, str]], tmp_path: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    _outage_run(broker, inspections, tmp_path, capfd, outage=3.0, n=30)


@pytest.mark.slow
def test_mqtt_broker_stopped_for_30_seconds(broker: publish_targets.Broker, inspections: list[tuple[Any, str, str]],
                                            tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    _outage_run(broker, inspections, tmp_path, capfd, outage=30.0, n=60)


def test_a_new_run_sends_what_the_old_one_left(broker: publish_targets.Broker, inspections: list[tuple[Any, str, str]],
                                               tmp_path: Path) -> None:
    url = f"mqtt://127.0.0.1:{broker.port}/{TOPIC}"
    subscriber = Subscriber(broker.port)
    broker.stop()
    lines: list[str] = []
    messages = _messages(inspections, 7)
    first = Publishers.open([url], tmp_path, log=lines.append)
    for message in messages[:6]:
        assert first.publish(message) == ["queued"]
    assert first.close(timeout=0.5) == 6  # the broker is down: all left in the outbox, said in one line
    assert any("6 messages not delivered" in line for line in lines)
    assert first.publish(messages[6]) == ["queued"]  # a request finishing after close: kept for the next run
    assert any("came after closing" in line for line in lines)
    broker.start()
    second = Publisher.open(url, tmp_path, log=lines.append)
    assert any("7 messages left by an earlier run" in line for line in lines)
    again = second.publish(messages[0])  # the same inspection published again waits once
    assert second.close(timeout=20) == 0
    try:
        got = subscriber.wait_for({m["id"] for m in messages}, 20)
    finally:
        subscriber.close()
    assert again == "duplicate" or again == "queued" and Counter(subscriber.ids())[messages[0]["id"]] <= 2
    assert got == {m["id"] for m in messages}


# -- the webhook ---------------------------------------------------------------------------------------------------
def test_webhook_refusing_for_a_while_gets_every_message_once(inspections: list[tuple[Any, str, str]],
                                                              tmp_path: Path) -> None:
    hook = Webhook()
    lines: list[str] = []
    messages = _messages(inspections, 20)
    try:
        publisher = Publisher.open(hook.url, tmp_path, max_backoff=0.5, log=lines.append)
        for message in messages[:10]:
            publisher.publish(message)
        deadline = time.monotonic() + 10
        while hook.refused < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hook.refused >= 3 and not hook.accepted
        hook.accept.set()
        for message in messages[10:]:
            publisher.publish(message)
        assert publisher.close(timeout=20) == 0
    finally:
        hook.close()
    assert [payload for _, payload in hook.accepted] == messages  # each once, in order
    assert all(key == payload["id"] for key, payload in hook.accepted)
    assert any(": stopped (HTTP 503" in line for line in lines) and any(": resumed after" in line for line in lines)


# -- OPC UA ----------------------------------------------------------------------------------------------------------
def test_opcua_server_shows_the_latest_inspection(inspections: list[tuple[Any, str, str]], tmp_path: Path) -> None:
    pytest.importorskip("asyncua", reason="asyncua is not installed (pip install 'spade-ad[opcua]')")
    from asyncua.sync import Client

    from spade_ad.apps.publish.opcua import NAMESPACE

    endpoint = f"opc.tcp://127.0.0.1:{publish_targets.free_port()}/spade-ad"
    lines: list[str] = []
    publishers = Publishers.open([endpoint], tmp_path, log=lines.append)
    messages = _messages(inspections, len(inspections))
    defect = next(m for m in messages if m["verdict"] == "defect")
    ordered = [m for m in messages if m is not defect] + [defect]  # the last one shown is a flagged image
    try:
        for message in ordered:
            assert publishers.publish(message) == ["served"]
        with Client(endpoint) as client:
            ns = client.get_namespace_index(NAMESPACE)

            def read(*path: str) -> Any:
                return client.nodes.objects.get_child([f"{ns}:{p}" for p in ("SpadeAD", *path)]).read_value()

            assert read("LastInspection", "Sequence") == len(ordered)
            assert json.loads(read("LastInspection", "Message")) == defect
            assert read("LastInspection", "Id") == defect["id"] and read("LastInspection", "File") == defect["file"]
            assert read("LastInspection", "Verdict") == "defect" and read("LastInspection", "Reject") is True
            assert read("LastInspection", "Score") == pytest.approx(defect["score"])
            assert read("LastInspection", "Regions") == defect["regions_total"]
            assert read("Counters", "Inspections") == len(ordered)
            assert read("Counters", "Defects") == sum(m["verdict"] == "defect" for m in ordered)
    finally:
        assert publishers.close() == 0
    assert not list(tmp_path.glob("*.sqlite"))  # latest value only: no outbox
    assert len(lines) == 1 and "OPC UA server listening" in lines[0]


def test_a_redirect_is_not_a_delivery(tmp_path: Path) -> None:
    """A POST redirected would arrive as a GET without its body: a 3xx waits in the outbox, and the line says so."""
    gets = []

    class Redirecting(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(302)
            self.send_header("Location", "/elsewhere")
            self.end_headers()

        def do_GET(self) -> None:  # noqa: N802
            gets.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    lines: list[str] = []
    try:
        publisher = Publisher.open(f"http://127.0.0.1:{server.server_address[1]}/hook", tmp_path, log=lines.append)
        publisher.publish({"id": "0" * 32})
        assert publisher.close(timeout=1) == 1
    finally:
        server.shutdown()
        server.server_close()
    assert not gets and any("stopped (HTTP 302 Found)" in line for line in lines)


def test_a_full_disk_under_the_outbox_is_said_not_raised(small_disk: Path) -> None:
    """The disk holding the outbox fills up: publish() says so once and returns "failed" (the inspection goes on);
    once there is room, messages are queued again and the line says how many were not published."""
    lines: list[str] = []
    publisher = Publisher.open(f"mqtt://127.0.0.1:{publish_targets.free_port()}/t", small_disk, log=lines.append)
    assert publisher.publish({"id": "0" * 32}) == "queued"
    filler = small_disk / "filler"
    try:
        with open(filler, "wb") as handle:  # fill the disk to the last block
            while True:
                handle.write(b"\0" * 4096)
                handle.flush()
    except OSError:
        pass
    outcomes = [publisher.publish({"id": f"{i:032x}", "padding": "x" * 8192}) for i in range(1, 4)]
    assert "failed" in outcomes, outcomes
    assert len([line for line in lines if "cannot write the outbox" in line]) == 1
    filler.unlink()
    assert publisher.publish({"id": "f" * 32}) == "queued"
    assert any("can be written again" in line for line in lines)
    publisher.close(timeout=0)


# -- the front doors: watch and serve ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A quick model on 64 x 64 images, saved to a file, and its test images."""
    from spade_ad import Spade
    from spade_ad.data.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path_factory.mktemp("publish") / "part", n_train=8, n_test_good=4,
                                  n_test_defect=3, size=(64, 64), seed=5)
    model = Spade(k_gallery=3, image_size=64, device="cpu", progress=False).fit(root / "train" / "good")
    model.save(root / "model.safetensors")
    return root / "model.safetensors", sorted((root / "test").rglob("*.png"))


def _count_lines(path: Path) -> int:
    return max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0


def test_watch_publishes_every_inspection_once_across_a_broker_outage(
        small_model: tuple[Path, list[Path]], broker: publish_targets.Broker, tmp_path: Path) -> None:
    """`spade-ad watch ... --publish mqtt://...`: files arrive before, during and after a broker outage; every
    inspection is delivered once by id (the file, its SHA-256, the model file's hash), the outbox ends empty, the
    log has one "stopped" and one "resumed" line and no traceback; a second run publishes nothing again."""
    import shutil
    import subprocess
    import sys

    from child_server import wait_until
    from cli_run import run_cli

    pytest.importorskip("watchdog")
    model_path, images = small_model
    camera, out = tmp_path / "camera", tmp_path / "out"
    camera.mkdir()
    url = f"mqtt://127.0.0.1:{broker.port}/{TOPIC}"
    subscriber = Subscriber(broker.port)
    arguments = ["watch", str(model_path), str(camera), "-o", str(out), "--publish", url, "--settle", "0.1",
                 "--poll-interval", "0.1"]
    command = [sys.executable, "-m", "spade_ad", *arguments]
    process = subprocess.Popen([*command, "--idle-exit", "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    names = [f"{i:02d}_{images[i % len(images)].name}" for i in range(15)]
    try:
        for name in names[:5]:
            shutil.copy(images[names.index(name) % len(images)], camera / name)
        wait_until(lambda: _count_lines(out / "scores.csv") == 5 and len(set(subscriber.ids())) == 5
                   or process.poll() is not None, timeout=120, what="the first 5 published")
        broker.stop()
        stopped = time.monotonic()
        for name in names[5:10]:
            shutil.copy(images[names.index(name) % len(images)], camera / name)
        wait_until(lambda: _count_lines(out / "scores.csv") == 10 or process.poll() is not None, timeout=60,
                   what="5 more scored while the broker is down")
        time.sleep(max(0.0, 3.0 - (time.monotonic() - stopped)))
        assert len(set(subscriber.ids())) == 5
        broker.start()
        for name in names[10:]:
            shutil.copy(images[names.index(name) % len(images)], camera / name)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    model_id = file_sha256(model_path)
    expected = {message_id(name, file_sha256(camera / name), model_id) for name in names}
    try:
        got = subscriber.wait_for(expected, 30)
        ids_before_rerun = list(subscriber.ids())
        again = run_cli([*arguments, "--idle-exit", "0.5"])  # in-process: the second run needs no new interpreter
        time.sleep(1.0)
        ids_after_rerun = list(subscriber.ids())
    finally:
        subscriber.close()
    assert got == expected  # every inspection, by id
    by_id = {payload["id"]: payload for _, payload in subscriber.received}
    scores = {row.split(",")[0]: float(row.split(",")[1]) for row in (out / "scores.csv").read_text().splitlines()[1:]}
    assert {by_id[i]["file"] for i in expected} == set(names) == set(scores)
    assert all(by_id[i]["score"] == pytest.approx(scores[by_id[i]["file"]], rel=1e-5) for i in expected)
    assert all(by_id[i]["model"] == {"name": "model.safetensors", "id": model_id} for i in expected)
    assert "Traceback" not in stderr and again == 0
    assert ids_after_rerun == ids_before_rerun  # the second run found nothing new: published nothing again
    lines = stderr.splitlines()
    assert len([line for line in lines if f"publish {url}: stopped (" in line]) == 1, stderr
    assert len([line for line in lines if f"publish {url}: resumed after " in line]) == 1, stderr
    assert Outbox(outbox_file(out, parse_target(url)), target="").count() == 0


def test_serve_publishes_each_prediction_with_its_record_row(small_model: tuple[Path, list[Path]],
                                                             tmp_path: Path) -> None:
    """The service publishes each /v1/predict result to a webhook, with the record's row id, the upload's name and
    SHA-256 and the model file's hash; without a record, with no row id."""
    pytest.importorskip("sqlalchemy")
    from fastapi.testclient import TestClient

    from spade_ad import load
    from spade_ad.apps.service import ServiceSettings, create_app
    from spade_ad.apps.service.review import ReviewStore

    model_path, images = small_model
    hook = Webhook()
    hook.accept.set()
    try:
        for recorded in (True, False):
            publisher = Publishers.open([hook.url], tmp_path / f"outbox{recorded}", log=lambda _: None)
            review = ReviewStore(str(tmp_path / "r.db"), tmp_path / "files") if recorded else None
            app = create_app(load(model_path, device="cpu"), ServiceSettings(), model_file=model_path.name,
                             review=review, identity_file=model_path, publisher=publisher)
            results = []
            with TestClient(app, base_url="http://127.0.0.1:8000") as client:
                for path in images[:3]:
                    answer = client.post("/v1/predict", files=[("files", (path.name, path.read_bytes()))])
                    assert answer.status_code == 200, answer.text
                    results.extend(answer.json()["results"])
            assert publisher.close(timeout=10) == 0
            got = [payload for _, payload in hook.accepted[-3:]]
            for result, path, message in zip(results, images[:3], got, strict=True):
                assert message["file"] == path.name and message["sha256"] == file_sha256(path)
                assert message["inspection_id"] == result["inspection_id"]
                assert (result["inspection_id"] is not None) == recorded
                assert message["verdict"] == ("defect" if result["is_anomalous"] else "good")
                assert message["score"] == pytest.approx(result["score"])
                assert message["model"]["id"] == file_sha256(model_path)
    finally:
        hook.close()


def test_publish_options_are_checked_before_anything_loads(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from cli_run import run_cli

    camera = tmp_path / "camera"
    camera.mkdir()
    missing = tmp_path / "missing.safetensors"  # never reached: the option is refused first
    code = run_cli(["watch", missing, camera, "-o", tmp_path / "out", "--publish", "ftp://plc/verdicts"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--publish" in err and "unknown scheme 'ftp'" in err and len(err.splitlines()) == 1, err
    code = run_cli(["serve", missing, "--publish", "mqtt://broker.local/spade/line1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--publish-outbox DIR" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
