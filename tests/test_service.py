"""The HTTP service: API tests against a real `spade-ad serve` on loopback (a child process, real HTTP requests),
and the capacity logic (503 + Retry-After) in-process with a model that blocks until released."""

from __future__ import annotations

import base64
import io
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from child_server import serve_in_subprocess, serve_in_thread, wait_until
from spade_ad import Spade, load
from spade_ad.apps.service import ServiceSettings, create_app
from spade_ad.apps.service.app import model_settings
from spade_ad.core.calibration import conformal_threshold
from spade_ad.data.synthetic import make_synthetic_dataset
from spade_ad.settings import SETTINGS

SIZE = (128, 128)
UPLOAD_LIMIT = 2**20  # the test server's --max-upload-mb 1
PIXEL_LIMIT = 1_000_000  # the test server's --max-pixels
HEALTHY = {"status": "ok", "in_flight": 0, "capacity": 9, "uploads": 0, "max_uploads": 16}  # defaults, at rest


@pytest.fixture(scope="session")
def service_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset and a calibrated model fitted on it (model.safetensors in the dataset folder)."""
    root = make_synthetic_dataset(
        tmp_path_factory.mktemp("service") / "disc", n_train=12, n_test_good=2, n_test_defect=2, size=SIZE, seed=0
    )
    Spade(k_gallery=4, device="cpu", progress=False).fit(root / "train" / "good").save(root / "model.safetensors")
    return root


@pytest.fixture(scope="module")
def server(service_data: Path) -> Iterator[str]:
    """Base URL of a server with small limits, so that oversized uploads are cheap to make."""
    with serve_in_subprocess(
        service_data / "model.safetensors", "--max-upload-mb", "1", "--max-pixels", str(PIXEL_LIMIT)
    ) as child:
        yield child.url


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_data_url(url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(url[len(prefix):])))


def png_claiming(width: int, height: int) -> bytes:
    """A small, valid-looking PNG whose header claims width x height pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(
        b"IEND", b""
    )


def predict(server: str, *files: tuple[str, bytes], field: str = "files") -> requests.Response:
    return requests.post(f"{server}/v1/predict", files=[(field, (name, data)) for name, data in files], timeout=60)


def test_default_settings_bind_to_loopback() -> None:
    settings = ServiceSettings()
    assert settings.host == "127.0.0.1" and settings.port == 8000
    assert (settings.workers, settings.max_queue, settings.max_upload_bytes) == (1, 8, 20 * 2**20)
    assert settings.max_pixels == 40_000_000
    assert (settings.max_uploads, settings.read_timeout, settings.header_timeout) == (16, 30.0, 10.0)
    assert settings.allow_hosts == settings.allow_origins == ()  # only the service itself, by default
    assert {"max_uploads", "read_timeout", "header_timeout"} <= set(settings.limits)
    assert "allow_hosts" not in settings.limits and "host" not in settings.limits
    with pytest.raises(ValueError, match="workers"):
        ServiceSettings(workers=0)
    for bad, words in [({"read_timeout": 0}, "read_timeout"), ({"max_uploads": 0}, "max_uploads"),
                       ({"allow_origins": ("example.com",)}, "allow_origins"),
                       ({"allow_hosts": ("a b",)}, "allow_hosts")]:
        with pytest.raises(ValueError, match=words):
            ServiceSettings(**bad)


def test_health(server: str) -> None:
    response = requests.get(f"{server}/healthz", timeout=10)
    assert response.status_code == 200
    assert response.json() == HEALTHY


def test_model_info(server: str) -> None:
    info = requests.get(f"{server}/v1/model", timeout=10).json()
    assert info["backbone"] == "efficientnet_lite0"
    assert info["settings"]["k_gallery"] == 4 and info["settings"]["layers"] == [2, 3]
    assert set(info["settings"]) == {s.name for s in SETTINGS if s.stored}  # from the settings table
    assert info["image_threshold"] > 0 and info["pixel_threshold"] > 0
    assert info["color_scale"] == {"vmin": 0.0, "vmax": 1.5 * info["pixel_threshold"], "fixed": True}
    assert info["model_file"] == "model.safetensors"  # its name, not a path (nor the private copy's)
    assert info["allow_add"] is False  # started without --allow-add
    assert info["n_train_images"] == 12  # all stored; calibrated by leave-one-out
    metrics = info["metrics"]  # what the model knows about itself, flat
    assert metrics["n_train_images"] == 12
    for key in ("image_threshold", "pixel_threshold"):
        assert metrics[key] == info[key]
    assert metrics["calibration_source"] == "leave_one_out" and metrics["calibration_n"] == 12
    assert metrics["false_alarm_rate_asked"] == 0.01 and metrics["false_alarm_rate_guaranteed"] >= 1 / 13
    assert metrics["median_good_score"] == info["calibration"]["median"]
    assert info["limits"]["max_upload_bytes"] == UPLOAD_LIMIT and info["limits"]["max_pixels"] == PIXEL_LIMIT
    calibration = info["calibration"]
    assert set(calibration) == {"source", "n", "false_alarm_rate", "guaranteed_rate", "pixel_false_alarm_rate",
                                "median", "threshold_source", "note", "warning", "sessions"}  # not the scores
    assert calibration["source"] == "leave_one_out" and calibration["n"] == 12
    assert calibration["guaranteed_rate"] >= 1 / 13  # 12 good images: at best 1 / (n + 1)
    assert calibration["false_alarm_rate"] == 0.01 and "1/13" in calibration["note"] and calibration["warning"] == ""
    assert calibration["median"] < info["image_threshold"] and calibration["threshold_source"] == "false_alarm_rate"
    assert calibration["sessions"] == []  # one capture session: leave-one-out


def test_model_settings_show_weights_as_a_file_name_only(tmp_path: Path) -> None:
    weights = tmp_path / "secret-folder" / "backbone.pth"
    shown = model_settings(Spade(weights=weights, k_gallery=7, progress=False))
    assert shown["weights"] == "backbone.pth"
    assert shown["k_gallery"] == 7 and "progress" not in shown and "feature_dir" not in shown
    assert model_settings(Spade())["weights"] is None


def test_predict_one_image(server: str, service_data: Path) -> None:
    threshold = requests.get(f"{server}/v1/model", timeout=10).json()["image_threshold"]
    response = predict(server, ("spot.png", (service_data / "test" / "spot" / "000.png").read_bytes()))
    assert response.status_code == 200, response.text
    [result] = response.json()["results"]
    assert result["file"] == "spot.png"
    assert (result["width"], result["height"]) == SIZE
    assert result["threshold"] == threshold
    assert result["is_anomalous"] == (result["score"] > threshold)
    for key in ("heatmap", "overlay"):
        image = decode_data_url(result[key])
        assert image.format == "PNG" and image.size == SIZE and image.mode == "RGB"


def test_predict_explains_the_verdict(server: str, service_data: Path) -> None:
    """Normalised score, p-value, defect regions (in the image's pixels) and the nearest good training images."""
    response = predict(server, ("spot.png", (service_data / "test" / "spot" / "000.png").read_bytes()))
    body = response.json()
    [result] = body["results"]
    assert body["threshold_source"] == "model" and body["threshold"] == result["threshold"]
    assert result["is_anomalous"] is True  # a clear spot on the synthetic disc
    assert result["normalized_score"] > 1  # 1 = the threshold
    assert 0 < result["p_value"] <= 1 / 13 + 1e-9  # above every good calibration score: the smallest p-value
    assert result["regions"], "an anomalous image lists its defect regions"
    for region in result["regions"]:
        assert set(region) == {"box", "area", "peak", "mean"}
        left, top, right, bottom = region["box"]
        assert 0 <= left < right <= SIZE[0] and 0 <= top < bottom <= SIZE[1]
        assert 0 < region["area"] <= (right - left) * (bottom - top)
        assert region["peak"] >= region["mean"] > result["pixel_threshold"]
    assert [r["peak"] for r in result["regions"]] == sorted((r["peak"] for r in result["regions"]), reverse=True)
    train_names = {p.name for p in (service_data / "train" / "good").glob("*.png")}
    assert result["neighbours"] and all(set(n) == {"name", "distance"} for n in result["neighbours"])
    assert {n["name"] for n in result["neighbours"]} <= train_names
    distances = [n["distance"] for n in result["neighbours"]]
    assert distances == sorted(distances) and distances[0] >= 0
    explanation = result["explanation"]  # where the strongest region matched in the nearest good image
    assert set(explanation) == {"normal", "normal_input_size", "region_box", "matches"}
    assert explanation["normal"] in train_names and explanation["matches"]
    why = decode_data_url(result["why"])  # the image and the nearest good one, side by side
    assert why.width > why.height
    [good] = predict(server, ("good.png", (service_data / "test" / "good" / "000.png").read_bytes())).json()["results"]
    assert good["is_anomalous"] is False and good["regions"] == [] and good["normalized_score"] < 1
    assert good["p_value"] > result["p_value"]
    assert good["explanation"] is not None and good["why"] is None  # the picture only for flagged images


def test_adding_good_images_is_off_without_allow_add(server: str, service_data: Path) -> None:
    image = ("spot.png", (service_data / "test" / "spot" / "000.png").read_bytes())
    refused = requests.post(f"{server}/v1/good", files=[("files", image)], timeout=60)
    assert refused.status_code == 403
    assert refused.json()["error"] == "adding good images is off: start the service with --allow-add"
    assert requests.get(f"{server}/v1/model", timeout=10).json()["n_train_images"] == 12


def test_per_request_threshold_leaves_the_model_alone(server: str, service_data: Path) -> None:
    before = requests.get(f"{server}/v1/model", timeout=10).json()
    image = ("good.png", (service_data / "test" / "good" / "000.png").read_bytes())
    low = requests.post(f"{server}/v1/predict?threshold=-1000", files=[("files", image)], timeout=60).json()
    assert low["threshold"] == -1000 and low["threshold_source"] == "threshold"
    [flagged] = low["results"]
    assert flagged["is_anomalous"] is True and flagged["threshold"] == -1000
    high = requests.post(f"{server}/v1/predict?threshold=1e9", files=[("files", image)], timeout=60).json()
    [passed] = high["results"]
    assert passed["is_anomalous"] is False and passed["regions"] == [] and passed["normalized_score"] < 1
    assert passed["score"] == flagged["score"] and passed["p_value"] == flagged["p_value"]
    after = requests.get(f"{server}/v1/model", timeout=10).json()
    for key in ("image_threshold", "pixel_threshold", "calibration"):
        assert after[key] == before[key]
    [again] = predict(server, image).json()["results"]  # the next request is judged by the model's threshold again
    assert again["threshold"] == before["image_threshold"] and again["is_anomalous"] is False


def test_per_request_false_alarm_rate(server: str, service_data: Path) -> None:
    scores = load(service_data / "model.safetensors", device="cpu").calibration_.scores
    expected, _ = conformal_threshold(scores, 0.3)
    image = ("good.png", (service_data / "test" / "good" / "000.png").read_bytes())
    body = requests.post(f"{server}/v1/predict?false_alarm_rate=0.3", files=[("files", image)], timeout=60).json()
    assert body["threshold_source"] == "false_alarm_rate" and body["threshold"] == pytest.approx(expected)
    [result] = body["results"]
    assert result["threshold"] == pytest.approx(expected)
    assert result["is_anomalous"] == (result["score"] > expected)
    assert (result["normalized_score"] > 1) == result["is_anomalous"]


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("false_alarm_rate=2", "false_alarm_rate"),
        ("false_alarm_rate=0", "false_alarm_rate"),
        ("threshold=abc", "threshold"),
        ("threshold=nan", "finite"),
        ("threshold=1&false_alarm_rate=0.1", "at most one"),
    ],
)
def test_bad_per_request_threshold_is_refused(server: str, service_data: Path, query: str, words: str) -> None:
    image = ("good.png", (service_data / "test" / "good" / "000.png").read_bytes())
    response = requests.post(f"{server}/v1/predict?{query}", files=[("files", image)], timeout=60)
    assert response.status_code == 422, response.text
    body = response.json()
    assert set(body) == {"error", "file"} and words in body["error"] and body["file"] is None
    assert requests.get(f"{server}/healthz", timeout=10).json() == HEALTHY


def test_predict_several_images_in_order(server: str, service_data: Path) -> None:
    names = ["good/000.png", "spot/000.png", "scratch/001.png"]
    response = predict(server, *[(name, (service_data / "test" / name).read_bytes()) for name in names])
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["file"] for r in body["results"]] == names
    assert body["seconds"] > 0
    scores = {r["file"]: r["score"] for r in body["results"]}
    assert scores["spot/000.png"] > scores["good/000.png"]


def test_non_square_image_keeps_its_size(server: str) -> None:
    image = Image.new("RGB", (200, 90), (90, 90, 90))
    [result] = predict(server, ("wide.png", png_bytes(image))).json()["results"]
    assert decode_data_url(result["overlay"]).size == (200, 90)
    assert decode_data_url(result["heatmap"]).size == (200, 90)


def test_docs_and_openapi(server: str) -> None:
    docs = requests.get(f"{server}/docs", timeout=10).text
    assert "swagger" in docs.lower()
    assert "cdn" not in docs and "https://" not in docs  # works offline: Swagger UI comes from this server
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert requests.get(f"{server}/docs-assets/{asset}", timeout=10).status_code == 200
    schema = requests.get(f"{server}/openapi.json", timeout=10).json()
    body = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["files"]
    assert {"/v1/model", "/v1/good", "/healthz"} <= set(schema["paths"])


def test_page_is_served_without_external_resources(server: str) -> None:
    response = requests.get(f"{server}/", timeout=10)
    assert response.status_code == 200
    assert 'id="file-input"' in response.text and 'id="threshold"' in response.text
    assert "default-src 'self'" in response.headers["content-security-policy"]
    for asset in ("app.js", "app.css"):
        text = requests.get(f"{server}/static/{asset}", timeout=10).text
        assert "http://" not in text and "https://" not in text


def _truncated_png(service_data: Path) -> bytes:
    data = (service_data / "test" / "good" / "000.png").read_bytes()
    return data[: len(data) // 2]


def _noise_png(width: int, height: int) -> bytes:
    """A PNG that does not compress (random pixels)."""
    rng = np.random.default_rng(0)
    return png_bytes(Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)))


BAD_FILES = {
    # name: (file bytes (a function of the dataset folder), status, words the error must contain)
    "empty": (lambda d: b"", 400, "empty"),
    "not-an-image": (lambda d: b"just some text, not pixels\n" * 10, 415, "not an image"),
    "truncated": (_truncated_png, 400, "truncated"),
    "bomb-30000x30000": (lambda d: png_claiming(30_000, 30_000), 413, "too large"),
    "over-pixel-limit": (lambda d: png_bytes(Image.new("RGB", (1100, 1000))), 413, "1,000,000"),
    "over-size-limit": (lambda d: _noise_png(800, 600), 413, "larger than the limit"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_is_refused_and_server_keeps_serving(server: str, service_data: Path, case: str) -> None:
    make, status, words = BAD_FILES[case]
    response = predict(server, (f"{case}.png", make(service_data)))
    assert response.status_code == status, response.text
    body = response.json()
    assert words in body["error"]
    assert body["file"] == (None if case == "over-size-limit" else f"{case}.png")  # that one is the whole body
    assert requests.get(f"{server}/healthz", timeout=10).status_code == 200


def test_bad_file_among_good_ones_names_it(server: str, service_data: Path) -> None:
    good = (service_data / "test" / "good" / "000.png").read_bytes()
    response = predict(server, ("a.png", good), ("b.png", _truncated_png(service_data)), ("c.png", good))
    assert response.status_code == 400
    assert response.json()["file"] == "b.png"


def test_upload_over_limit_without_content_length(server: str) -> None:
    """A chunked body declares no size: the limit is enforced while counting the bytes that arrive."""
    boundary = "spadeboundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode()

    def body() -> Iterator[bytes]:
        yield head
        for _ in range(24):
            yield b"\0" * 65536  # 1.5 MB in all
        yield f"\r\n--{boundary}--\r\n".encode()

    response = requests.post(
        f"{server}/v1/predict", data=body(), timeout=60,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert response.status_code == 413
    assert "larger than the limit" in response.json()["error"]
    assert requests.get(f"{server}/healthz", timeout=10).status_code == 200


@pytest.mark.parametrize(
    ("kwargs", "status", "words"),
    [
        ({"files": [("image", ("a.png", b"\x89PNG"))]}, 422, "field 'files'"),
        ({"files": [("other", (None, "text only"))]}, 422, "no images"),
        ({"files": [("files", (None, "text, no filename"))]}, 422, "not a file"),
        ({"json": {"files": []}}, 415, "multipart/form-data"),
        ({"data": b"--x\r\n", "headers": {"Content-Type": "multipart/form-data"}}, 400, "multipart"),
    ],
    ids=["wrong-field-name", "no-file", "text-in-files", "json-body", "malformed-multipart"],
)
def test_bad_request_shape(server: str, kwargs: dict, status: int, words: str) -> None:
    response = requests.post(f"{server}/v1/predict", timeout=30, **kwargs)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]
    assert requests.get(f"{server}/healthz", timeout=10).status_code == 200


def test_unknown_path_is_json_404(server: str) -> None:
    response = requests.get(f"{server}/v2/nothing", timeout=10)
    assert response.status_code == 404 and "error" in response.json()


# -- capacity, in-process (uvicorn in a thread) ------------------------------------------------------------------
class _Gate:
    """Makes a model's `iter_predict` wait until `open()`; `entered` counts the calls that reached it."""

    def __init__(self, model: Spade) -> None:
        self.model, self.release, self.entered = model, threading.Event(), 0
        self._predict = model.iter_predict

    def __call__(self, *args: object, **kwargs: object) -> Iterator:
        self.entered += 1
        assert self.release.wait(30), "the test never released the model"
        return self._predict(*args, **kwargs)


def test_capacity_queue_then_503_with_retry_after(service_data: Path) -> None:
    """workers=1, max_queue=1: one request runs, one waits, the third is refused at once; then both finish."""
    model = load(service_data / "model.safetensors", device="cpu")
    gate = _Gate(model)
    model.iter_predict = gate  # type: ignore[method-assign]
    image = (service_data / "test" / "good" / "000.png").read_bytes()
    with serve_in_thread(create_app(model, ServiceSettings(workers=1, max_queue=1))) as url:
        answers: list[requests.Response] = []
        threads = [threading.Thread(target=lambda: answers.append(predict(url, ("a.png", image)))) for _ in range(2)]
        for thread in threads:
            thread.start()
        wait_until(lambda: requests.get(f"{url}/healthz", timeout=10).json()["in_flight"] == 2 and gate.entered == 1)
        busy = predict(url, ("a.png", image))
        assert busy.status_code == 503
        assert int(busy.headers["Retry-After"]) >= 1
        assert "busy" in busy.json()["error"]
        gate.release.set()
        for thread in threads:
            thread.join(60)
        assert [a.status_code for a in answers] == [200, 200]
        assert requests.get(f"{url}/healthz", timeout=10).json()["in_flight"] == 0
        assert predict(url, ("a.png", image)).status_code == 200
