"""Hardening of the HTTP service against hostile or broken clients and a changing model file: slow clients (raw
sockets against a child-process server), the Host header and cross-origin POSTs (uvicorn in a thread), no internals
in answers and the request id (in-process), what /v1/model shows, and the model file changed under a running
service (child process)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import requests
from fastapi.testclient import TestClient

from child_server import ChildServer, serve_in_subprocess, serve_in_thread, wait_until
from spade_ad import Spade, load
from spade_ad.apps.cli import main as cli_main
from spade_ad.apps.service import ServiceSettings, create_app
from spade_ad.apps.service.guard import HostPolicy
from spade_ad.data.synthetic import make_synthetic_dataset

READ_TIMEOUT = HEADER_TIMEOUT = 3.0  # the slow-client server's --read-timeout and --header-timeout
MAX_UPLOADS, MAX_CONNECTIONS = 12, 24
DROP_BOUND = READ_TIMEOUT + 2 + 8  # read timeout + the HTTP layer's grace + slack for a loaded machine
BOUNDARY = "hardeningboundary"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(model A, model B fitted on other images, a good test image)."""
    folder = tmp_path_factory.mktemp("hardening")
    paths = []
    for seed, n_train in ((0, 12), (1, 10)):
        root = make_synthetic_dataset(folder / f"disc{seed}", n_train=n_train, n_test_good=1, n_test_defect=1,
                                      size=(128, 128), seed=seed)
        paths.append(Spade(k_gallery=4, device="cpu", progress=False).fit(root / "train" / "good").save(
            folder / f"model{seed}.safetensors"))
    return paths[0], paths[1], folder / "disc0" / "test" / "good" / "000.png"


def predict(url: str, image: Path, **kwargs: object) -> requests.Response:
    return requests.post(f"{url}/v1/predict", files=[("files", (image.name, image.read_bytes()))], timeout=60,
                         **kwargs)


def health(url: str) -> dict:
    return requests.get(f"{url}/healthz", timeout=10).json()


# -- 1. slow clients: raw sockets against a child-process server -------------------------------------------------
@pytest.fixture(scope="module")
def slow_server(models: tuple[Path, Path, Path]) -> Iterator[ChildServer]:
    with serve_in_subprocess(
        models[0], "--read-timeout", str(READ_TIMEOUT), "--header-timeout", str(HEADER_TIMEOUT),
        "--max-uploads", str(MAX_UPLOADS), "--max-connections", str(MAX_CONNECTIONS),
    ) as child:
        yield child


@pytest.fixture
def url(slow_server: ChildServer) -> str:
    wait_until(lambda: health(slow_server.url)["uploads"] == 0, what="earlier tests' uploads to end")
    return slow_server.url


def connect(url: str, head: str = "") -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    try:
        sock.sendall(head.replace("HOST", f"{host}:{port}").encode())
    except OSError:  # the server already refused it: its answer is read next
        pass
    return sock


UPLOAD_HEAD = (f"POST /v1/predict HTTP/1.1\r\nHost: HOST\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}"
               "\r\nContent-Length: {length}\r\n\r\n" f"--{BOUNDARY}\r\nContent-Disposition: form-data; "
               'name="files"; filename="slow.png"\r\nContent-Type: image/png\r\n\r\n\x89PNG')


@contextmanager
def trickling(socks: list[socket.socket], byte: bytes = b"\0", interval: float = 0.2) -> Iterator[None]:
    """Send `byte` on each socket every `interval` seconds (a slow client) until the block ends or the server
    closes it."""
    stop = threading.Event()

    def run() -> None:
        alive = list(socks)
        while alive and not stop.wait(interval):
            for sock in list(alive):
                try:
                    sock.send(byte)
                except OSError:
                    alive.remove(sock)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


def dropped_within(sock: socket.socket, bound: float) -> bytes:
    """What the server sent before closing `sock`; fails unless it closes it within `bound` seconds."""
    deadline, received = time.monotonic() + bound, b""
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            break
        except TimeoutError:
            pytest.fail(f"the server still holds a slow connection after {bound:g} s (got {received[:60]!r})")
        if not chunk:
            break
        received += chunk
    sock.close()
    return received


def test_slow_uploads_do_not_take_the_workers_places(url: str, models: tuple[Path, Path, Path]) -> None:
    """9 slow uploads (as many as workers + queue) are held as uploads, not scoring places: a normal client is
    answered at once, and the slow ones are dropped after the read timeout."""
    socks = [connect(url, UPLOAD_HEAD.format(length=200_000)) for _ in range(9)]
    with trickling(socks):
        wait_until(lambda: health(url)["uploads"] == 9, what="9 uploads being received")
        started = time.monotonic()
        response = predict(url, models[2])
        assert response.status_code == 200, response.text  # was 503: the slow bodies held every place
        assert time.monotonic() - started < DROP_BOUND
        for sock in socks:
            dropped_within(sock, DROP_BOUND)
    assert health(url)["uploads"] == 0 and health(url)["in_flight"] == 0


def test_too_many_uploads_are_refused_until_the_read_timeout_frees_them(url: str, models: tuple[Path, Path, Path]):
    socks = [connect(url, UPLOAD_HEAD.format(length=200_000)) for _ in range(MAX_UPLOADS)]
    with trickling(socks):
        wait_until(lambda: health(url)["uploads"] == MAX_UPLOADS, what="every upload place taken")
        busy = predict(url, models[2])
        assert busy.status_code == 503 and "uploads" in busy.json()["error"] and int(busy.headers["Retry-After"]) >= 1
        started = time.monotonic()
        wait_until(lambda: predict(url, models[2]).status_code == 200, timeout=DROP_BOUND, what="a free place")
        assert time.monotonic() - started < DROP_BOUND
        for sock in socks:
            dropped_within(sock, DROP_BOUND)


@pytest.mark.parametrize("case", ["trickled-multipart", "trickled-oversize-drain", "stalled", "trickled-404"])
def test_slow_body_is_dropped(url: str, case: str) -> None:
    head = {
        "trickled-multipart": UPLOAD_HEAD.format(length=200_000),
        "trickled-oversize-drain": UPLOAD_HEAD.format(length=25 * 2**20),  # over 20 MB: read and dropped, then 413
        "stalled": UPLOAD_HEAD.format(length=200_000),
        "trickled-404": "POST /v1/nowhere HTTP/1.1\r\nHost: HOST\r\nContent-Length: 100000\r\n\r\nabc",
    }[case]
    sock = connect(url, head)
    with trickling([] if case == "stalled" else [sock]):
        answer = dropped_within(sock, 3 if case == "trickled-404" else DROP_BOUND)
    if case == "stalled":  # nothing more sent: the 408 answer is read whole
        status, _, rest = answer.partition(b"\r\n")
        assert status.startswith(b"HTTP/1.1 408") and b"x-request-id" in rest.lower()
        assert "read timeout" in json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    if case == "trickled-404":  # answered at once, and closed: the unread body is not waited for
        assert answer.startswith(b"HTTP/1.1 404") and b"connection: close" in answer.lower()


@pytest.mark.parametrize("case", ["idle", "trickled-head", "slow-second-request"])
def test_slow_request_head_is_dropped(url: str, case: str) -> None:
    sock = connect(url, "" if case == "idle" else "GET /healthz HTTP/1.1\r\nHost: HOST\r\n")
    if case == "slow-second-request":  # a kept-alive connection: the next head is timed too
        sock.sendall(b"\r\n")
        first = b""
        while b"\r\n\r\n" not in first or not first.endswith(b"}"):  # the whole first answer (JSON)
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
    with trickling([] if case == "idle" else [sock], b"a"):
        answer = dropped_within(sock, HEADER_TIMEOUT + 8)
    assert answer == b"" if case == "idle" else answer.startswith(b"HTTP/1.1 408")


def test_slow_heads_on_every_connection_are_dropped_and_service_resumes(url: str) -> None:
    socks = [connect(url, "POST /v1/predict HTTP/1.1\r\nHost: HOST\r\n") for _ in range(MAX_CONNECTIONS // 2)]
    socks += [connect(url) for _ in range(MAX_CONNECTIONS - len(socks))]  # and idle ones
    opened = time.monotonic()
    with trickling(socks[: MAX_CONNECTIONS // 2], b"a"):
        time.sleep(0.3)
        locked_out = requests.get(f"{url}/healthz", timeout=10).status_code
        assert locked_out == 503 or time.monotonic() - opened > HEADER_TIMEOUT  # every connection taken
        wait_until(lambda: requests.get(f"{url}/healthz", timeout=10).status_code == 200, timeout=HEADER_TIMEOUT + 8,
                   what="the slow connections to be dropped")
        for sock in socks:
            dropped_within(sock, HEADER_TIMEOUT + 8)


@pytest.mark.parametrize("pieces", [1, 2])
def test_oversized_head_is_refused(url: str, pieces: int) -> None:
    """Over 16 KiB of headers: refused by h11 while it arrives (400), or by the service once in (431)."""
    head = "GET /healthz HTTP/1.1\r\nHost: HOST\r\nX-Big: " + "a" * 40_000 + "\r\n\r\n"
    sock = connect(url, head[:20_000] if pieces == 2 else head)
    if pieces == 2:
        time.sleep(0.3)
        try:
            sock.sendall(head[20_000:].encode())
        except OSError:
            pass
    assert dropped_within(sock, 10).startswith(b"HTTP/1.1 400" if pieces == 2 else b"HTTP/1.1 431")
    assert health(url)["status"] == "ok"


# -- 2. Host header and cross-origin requests: uvicorn in a thread ----------------------------------------------
@pytest.fixture(scope="module")
def model_a(models: tuple[Path, Path, Path]) -> Spade:
    return load(models[0], device="cpu")


@contextmanager
def guarded(model: Spade, **settings: object) -> Iterator[tuple[str, int]]:
    with serve_in_thread(create_app(model, ServiceSettings(**settings))) as base:  # type: ignore[arg-type]
        yield base, int(base.rsplit(":", 1)[1])


def host_status(base: str, host: str) -> int:
    response = requests.get(f"{base}/healthz", headers={"Host": host}, timeout=10)
    if response.status_code == 400:
        assert "Host" in response.json()["error"]
    return response.status_code


def test_host_header_names_the_service_or_is_refused(model_a: Spade) -> None:
    with guarded(model_a) as (base, port):
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}"):
            assert host_status(base, host) == 200, host
        refused = [
            f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}", "127.0.0.1", "localhost",
            f"localhost.evil.example:{port}", f"127.0.0.1.evil.example:{port}", f"evil@127.0.0.1:{port}",
            f"127.0.0.1:{port}:1", f"[::1:{port}", f"[127.0.0.1]:{port}", f"127.0.0.1:+{port}", "",
            f"0.0.0.0:{port}", f"10.0.0.1:{port}", f"localhost:{port}/x",
        ]
        for host in refused:
            assert host_status(base, host) == 400, host
        for raw in (b"GET /healthz HTTP/1.0\r\n\r\n",  # no Host at all
                    f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nHost: evil.example\r\n\r\n".encode()):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(raw)
                assert sock.recv(65536).startswith(b"HTTP/1.1 400")


def test_allow_host_opens_up(model_a: Spade) -> None:
    hosts = ("spade.example.com", "*.corp.example", "pinned.example:9000")
    with guarded(model_a, allow_hosts=hosts) as (base, port):
        for host in ("spade.example.com", f"spade.example.com:{port}", "SPADE.example.com:1", f"a.corp.example:{port}",
                     "pinned.example:9000", f"127.0.0.1:{port}"):
            assert host_status(base, host) == 200, host
        for host in ("corp.example", "evilcorp.example", f"pinned.example:{port}", "pinned.example",
                     f"spade.example.com.evil:{port}"):
            assert host_status(base, host) == 400, host
    with guarded(model_a, allow_hosts=("*",)) as (base, port):
        assert host_status(base, "anything.example") == 200


@pytest.mark.parametrize(("bound", "host", "local_ip", "accepted"), [
    ("::", "127.0.0.1:8000", "::ffff:127.0.0.1", True),  # dual-stack socket, IPv4 client
    ("::", "localhost:8000", "::1", True),
    ("0.0.0.0", "192.168.1.5:8000", "192.168.1.5", True),  # the address the client connected to
    ("0.0.0.0", "localhost:8000", "192.168.1.5", False),  # not a loopback connection
    ("0.0.0.0", "evil.example:8000", "192.168.1.5", False),
    ("192.168.1.5", "127.0.0.1:8000", "192.168.1.5", False),
    ("192.168.1.5", "192.168.1.5:8001", "192.168.1.5", False),
    ("localhost", "[::1]:8000", "::1", True),
])
def test_host_policy_for_other_bindings(bound: str, host: str, local_ip: str, accepted: bool) -> None:
    assert HostPolicy(ServiceSettings(host=bound)).allows(host, (local_ip, 8000), "http") is accepted


def test_behind_a_reverse_proxy_the_page_origin_is_its_own(model_a: Spade) -> None:
    """SECURITY.md's nginx set-up: Host and X-Forwarded-Proto passed on from loopback, --allow-host the public name."""
    proxied = {"Host": "spade.example.com", "X-Forwarded-Proto": "https", "Origin": "https://spade.example.com"}
    with guarded(model_a, allow_hosts=("spade.example.com",)) as (base, _):
        assert origin_status(base, proxied) == 415  # the page's own POST passes
        assert origin_status(base, {**proxied, "X-Forwarded-Proto": "http"}) == 403  # not the https origin
        assert origin_status(base, {**proxied, "Origin": "https://evil.example"}) == 403


def origin_status(base: str, headers: dict[str, str]) -> int:
    """Status of a POST to /v1/predict with `headers` and a JSON body: 415 once past the origin check, 403 if not."""
    response = requests.post(f"{base}/v1/predict", json={}, headers=headers, timeout=10)
    if response.status_code == 403:
        assert "refused" in response.json()["error"]
    return response.status_code


def test_cross_origin_posts_are_refused(model_a: Spade) -> None:
    with guarded(model_a) as (base, port):
        own = f"http://127.0.0.1:{port}"
        local = {"Origin": f"http://localhost:{port}", "Host": f"localhost:{port}"}
        for headers in ({}, {"Origin": own}, {"Origin": own + "/"}, {"Sec-Fetch-Site": "same-origin"},
                        {"Sec-Fetch-Site": "none"}, local):
            assert origin_status(base, headers) == 415, headers  # past the check: refused for its body only
        for origin in ("http://evil.example", "null", f"http://127.0.0.1:{port + 1}", f"https://127.0.0.1:{port}",
                       f"http://localhost:{port}", f"http://127.0.0.1:{port}.evil.example", "file://", "",
                       f"http://127.0.0.1:{port}/page", f"http://user@127.0.0.1:{port}", "javascript:alert(1)"):
            assert origin_status(base, {"Origin": origin}) == 403, origin
        for site in ("cross-site", "same-site"):  # no Origin, but a browser says where it comes from
            assert origin_status(base, {"Sec-Fetch-Site": site}) == 403
        foreign = {"Origin": "http://evil.example"}
        read = requests.get(f"{base}/v1/model", headers=foreign, timeout=10)  # reads: the browser's SOP keeps them
        assert read.status_code == 200 and "access-control-allow-origin" not in read.headers


def test_allow_origin_opens_up_with_cors(model_a: Spade) -> None:
    with guarded(model_a, allow_origins=("https://app.example:443", "http://127.0.0.1:3000")) as (base, _):
        for origin in ("https://app.example", "http://127.0.0.1:3000"):
            assert origin_status(base, {"Origin": origin}) == 415
            preflight = requests.options(f"{base}/v1/predict", timeout=10, headers={
                "Origin": origin, "Access-Control-Request-Method": "POST"})
            assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == origin
        assert origin_status(base, {"Origin": "https://evil.example"}) == 403


@pytest.mark.parametrize("option", [("--allow-origin", "not-an-origin"), ("--allow-origin", "ftp://x.example"),
                                    ("--allow-host", "bad host"), ("--allow-host", "x.example:99999")])
def test_bad_allow_options_are_usage_errors(option: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        cli_main(["serve", "no-such-model.safetensors", *option])
    assert stop.value.code == 2 and "allow_" in capsys.readouterr().err


# -- 3. no internals in answers; a request id on every answer: in-process ---------------------------------------
def client(model: Spade, **kwargs: object) -> TestClient:
    return TestClient(create_app(model, ServiceSettings(), **kwargs), base_url="http://127.0.0.1:8000")  # type: ignore


SECRET = "/home/alice/secret-models/cracks.safetensors"


@pytest.mark.parametrize("where", ["model-in-worker", "route", "threshold-check"])
def test_internal_error_shows_only_a_request_id(models: tuple[Path, Path, Path], where: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    model = load(models[0], device="cpu")

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"cannot map {SECRET}")

    if where == "model-in-worker":
        model.iter_predict = boom  # type: ignore[method-assign]
    elif where == "threshold-check":
        model.calibration_ = None  # the per-request threshold code meets an attribute error
    with client(model) as http, caplog.at_level(logging.ERROR, logger="spade_ad.apps.service"):
        if where == "route":
            model.train_names_ = None  # type: ignore[assignment]  # len(None) in /v1/model
            response = http.get("/v1/model")
        else:
            response = http.post("/v1/predict", files=[("files", ("a.png", models[2].read_bytes()))])
    assert response.status_code == 500
    request_id = response.headers["x-request-id"]
    assert response.json() == {"error": "internal error", "request_id": request_id}
    for leak in ("secret", "Error", "Traceback", "/home", "NoneType", "spade_ad"):
        assert leak not in response.text
    logged = "\n".join(record.getMessage() + str(record.exc_info) for record in caplog.records)
    assert request_id in logged and ("Error" in logged)


def test_every_answer_carries_a_request_id(model_a: Spade) -> None:
    with client(model_a) as http:
        answers = [http.get(path) for path in ("/", "/healthz", "/v1/model", "/docs", "/openapi.json",
                                               "/static/app.js", "/docs-assets/swagger-ui.css", "/nowhere")]
        answers += [http.post("/v1/predict?threshold=abc"), http.post("/v1/predict", json={}),
                    http.get("/healthz", headers={"Host": "evil.example"}),
                    http.post("/v1/predict", headers={"Origin": "http://evil.example"})]
        ids = [answer.headers["x-request-id"] for answer in answers]
        assert len(set(ids)) == len(ids) and all(len(i) == 32 for i in ids)
        assert [a.status_code for a in answers] == [200] * 7 + [404, 422, 415, 400, 403]
        assert all(a.headers["x-content-type-options"] == "nosniff" for a in answers)
        assert http.get("/healthz", headers={"X-Request-ID": "proxy-7f3a.1"}).headers["x-request-id"] == "proxy-7f3a.1"
        for bad in (b"a b", b"x" * 65, "id\u00e9".encode(), b"<script>", b"a\tb"):
            given = http.get("/healthz", headers={"X-Request-ID": bad}).headers["x-request-id"]
            assert given.encode() != bad and len(given) == 32


def test_model_info_shows_names_not_paths(models: tuple[Path, Path, Path], tmp_path: Path) -> None:
    model = load(models[0], device="cpu")
    model.train_names_ = [f"{tmp_path}/train/{i:03d}.png" for i in range(len(model.train_names_))]
    model.metrics_ = {"image_auroc": np.float64(0.75), "pixel_auroc": float("nan"), "n_test": np.int64(10),
                      "dataset": f"{tmp_path}/bottle", "curve": [0.1, 0.2], "image_threshold": -1.0}
    with client(model, model_file=f"{tmp_path}/deep/model.safetensors") as http:
        info = http.get("/v1/model")
        [result] = http.post("/v1/predict", files=[("files", ("a.png", models[2].read_bytes()))]).json()["results"]
    assert info.status_code == 200 and str(tmp_path) not in info.text
    body = info.json()
    assert body["model_file"] == "model.safetensors"
    metrics = body["metrics"]
    assert metrics["image_auroc"] == 0.75 and metrics["pixel_auroc"] is None and metrics["n_test"] == 10
    assert metrics["dataset"] == "bottle" and "curve" not in metrics  # single values only
    assert metrics["image_threshold"] == body["image_threshold"] != -1.0  # the model's own values win
    assert result["neighbours"] and all("/" not in n["name"] for n in result["neighbours"])


# -- 5. the model file changed under a running service: child process -------------------------------------------
def test_running_service_keeps_its_model_when_the_file_changes(models: tuple[Path, Path, Path], tmp_path: Path):
    served = tmp_path / "served" / "model.safetensors"
    served.parent.mkdir()
    shutil.copyfile(models[0], served)
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    other = models[1].read_bytes()
    with serve_in_subprocess(served, env={"TMPDIR": str(private_tmp)}) as child:
        def answers() -> tuple[list[float], dict]:
            response = predict(child.url, models[2])
            assert response.status_code == 200, response.text
            info = requests.get(f"{child.url}/v1/model", timeout=10).json()
            return [r["score"] for r in response.json()["results"]], info

        before = answers()
        assert before[1]["model_file"] == "model.safetensors"
        assert list(private_tmp.iterdir()) == []  # the private copy has no name left to open
        steps = {
            "overwritten in place": lambda: served.open("r+b").write(other),
            "truncated": lambda: os.truncate(served, 100),
            "replaced by cp": lambda: served.write_bytes(other),
            "emptied": lambda: os.truncate(served, 0),
            "removed": served.unlink,
        }
        for step, change in steps.items():
            change()
            assert answers() == before, step
            assert child.process.poll() is None, f"the service died after the file was {step}"


def test_unloadable_model_is_reported_by_its_own_path(models: tuple[Path, Path, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken-model.safetensors"
    broken.write_bytes(models[0].read_bytes()[:5000])
    with pytest.raises(RuntimeError, match="exited with") as failure:
        with serve_in_subprocess(broken, timeout=60):
            pass
    assert "broken-model.safetensors" in str(failure.value) and "spade-ad-serve-" not in str(failure.value)
