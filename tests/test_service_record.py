"""The service with an inspection record (`serve MODEL --record DB`): every prediction recorded with its files, the
review queue and its filters, labels ("good" adds the image with --allow-add: the next prediction of it passes),
history and drift; `calibrate --record` from the labels; several products in one service (`--models`,
`--model NAME=PATH`). In-process (FastAPI's TestClient) on a small synthetic model; SQLite and PostgreSQL."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cli_run import run_cli
from spade_ad import Spade, load
from spade_ad.apps.service import ServiceSettings, create_app
from spade_ad.apps.service.app import ServedModel
from spade_ad.apps.service.review import NO_RECORD, ReviewStore
from spade_ad.data.synthetic import make_synthetic_dataset
from spade_ad.record import file_sha256, open_record

pytest.importorskip("sqlalchemy")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_synthetic_dataset(tmp_path_factory.mktemp("review") / "disc", n_train=12, n_test_good=3,
                                  n_test_defect=2, size=(128, 128), seed=0)
    Spade(k_gallery=4, device="cpu", progress=False).fit(root / "train" / "good").save(root / "model.safetensors")
    return root


@pytest.fixture
def model_file(fitted: Path, tmp_path: Path) -> Path:
    return Path(shutil.copy(fitted / "model.safetensors", tmp_path / "model.safetensors"))


def _client(model_file: Path, target: str | None, tmp_path: Path, allow_add: bool = True) -> TestClient:
    review = ReviewStore(target, tmp_path / "files") if target is not None else None
    app = create_app(load(model_file, device="cpu"), ServiceSettings(allow_add=allow_add),
                     model_file=model_file.name, save_to=model_file, review=review, identity_file=model_file)
    return TestClient(app, base_url="http://127.0.0.1:8000")


def _predict(client: TestClient, path: Path, route: str = "/v1/predict") -> dict:
    answer = client.post(route, files=[("files", (path.name, path.read_bytes()))])
    assert answer.status_code == 200, answer.text
    [result] = answer.json()["results"]
    return result


def test_review_label_good_and_the_next_prediction_passes(record_target: str, model_file: Path, fitted: Path,
                                                          tmp_path: Path) -> None:
    spot = fitted / "test" / "spot" / "000.png"
    with _client(model_file, record_target, tmp_path) as client:
        assert client.get("/v1/model").json()["record"] is True
        flagged = _predict(client, spot)
        assert flagged["is_anomalous"] is True and flagged["inspection_id"] is not None
        for good in sorted((fitted / "test" / "good").glob("*.png")):
            _predict(client, good)
        queue = client.get("/v1/review").json()["items"]
        assert queue[-1]["id"] == flagged["inspection_id"]  # newest first: the flagged one came first
        item = next(i for i in queue if i["id"] == flagged["inspection_id"])
        assert (item["source"], item["verdict"], item["label"]) == ("000.png", "defect", None)
        assert item["regions"] and item["threshold"] == pytest.approx(flagged["threshold"])
        for kind in ("image", "overlay", "why"):
            answer = client.get(item[kind])
            assert answer.status_code == 200 and answer.content[:4] in (b"\x89PNG",), kind
        assert client.get(item["image"]).content == spot.read_bytes()  # the very upload, kept
        assert [i["verdict"] for i in client.get("/v1/review?verdict=defect").json()["items"]] == ["defect"]
        assert client.get("/v1/review?since=2999-01-01").json()["items"] == []
        assert client.get("/v1/review?since=yesterday").status_code == 422

        labelled = client.post(f"/v1/inspections/{item['id']}/label", json={"label": "good", "by": "ann"})
        assert labelled.status_code == 200, labelled.text
        body = labelled.json()
        assert body["inspection"]["label"] == "good" and body["inspection"]["label_by"] == "ann"
        assert body["added"]["added"] == 1 and body["added"]["n_train_images"] == 13
        assert item["id"] not in [i["id"] for i in client.get("/v1/review").json()["items"]]
        assert [i["id"] for i in client.get("/v1/review?labelled=true").json()["items"]] == [item["id"]]

        again = _predict(client, spot)
        assert again["is_anomalous"] is False  # the same image passes now
        history = client.get("/v1/history").json()
        assert history["calibrated_rate"] is not None and sum(b["n"] for b in history["buckets"]) >= 1
        assert [p["score"] for p in history["scores"]][-1] == pytest.approx(again["score"])
        drift = client.get("/v1/drift?window=50").json()
        assert drift["n"] >= 1 and drift["verdict"].startswith("not enough inspections")
        versions = client.get("/v1/record/models").json()
        assert len(versions) == 2  # the model before and after the image was added
    with open_record(record_target) as record:
        rows = record.inspections()
        assert len(rows) == 5 and {r["origin"] for r in rows} == {"serve"}
        assert rows[0]["sha256"] == file_sha256(spot) and rows[0]["label"] == "good"
        assert rows[-1]["model_id"] == file_sha256(model_file) != rows[0]["model_id"]  # the saved model's hash


def test_label_defect_and_good_without_allow_add(model_file: Path, fitted: Path, tmp_path: Path) -> None:
    target = str(tmp_path / "r.db")
    with _client(model_file, target, tmp_path, allow_add=False) as client:
        spot = _predict(client, fitted / "test" / "spot" / "000.png")
        scratch = _predict(client, fitted / "test" / "scratch" / "000.png")
        answer = client.post(f"/v1/inspections/{spot['inspection_id']}/label", json={"label": "defect"}).json()
        assert answer["inspection"]["label"] == "defect" and answer["inspection"]["label_by"].startswith("web page")
        answer = client.post(f"/v1/inspections/{scratch['inspection_id']}/label", json={"label": "good"}).json()
        assert answer["added"] is None and "--allow-add" in answer["note"]
        assert client.post(f"/v1/inspections/{spot['inspection_id']}/label", json={"label": "maybe"}).status_code \
            == 422
        assert client.post("/v1/inspections/999/label", json={"label": "good"}).status_code == 404
        assert client.get("/v1/inspections/999/overlay").status_code == 404
    assert len(load(model_file).train_names_) == 12  # nothing added


def test_calibrate_from_the_record_labels(model_file: Path, fitted: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    target = str(tmp_path / "r.db")
    with _client(model_file, target, tmp_path, allow_add=False) as client:
        for path in sorted((fitted / "test").rglob("*.png")):
            result = _predict(client, path)
            label = "good" if path.parent.name == "good" else "defect"
            client.post(f"/v1/inspections/{result['inspection_id']}/label", json={"label": label})
    assert run_cli(["calibrate", model_file, "--record", target, "-o", tmp_path / "new.safetensors"]) == 0
    out = capsys.readouterr().out
    assert "from the record: 3 good and 4 defect images" in out
    calibration = load(tmp_path / "new.safetensors").calibration_  # the labelled good scores added to the model's
    assert calibration.n == load(model_file).calibration_.n + 3 and calibration.threshold_source == "best_f1"
    assert run_cli(["calibrate", model_file, "--record", target, "--replace", "-o", tmp_path / "r.safetensors"]) == 0
    assert "calibration REPLACED" in capsys.readouterr().out
    assert load(tmp_path / "r.safetensors").calibration_.n == 3
    assert run_cli(["calibrate", model_file]) == 2
    assert "--good FOLDER, or --record DB" in capsys.readouterr().err


def test_without_a_record_the_review_routes_say_how_to_get_one(model_file: Path, tmp_path: Path) -> None:
    with _client(model_file, None, tmp_path) as client:
        assert client.get("/v1/model").json()["record"] is False
        for route in ("/v1/review", "/v1/history", "/v1/drift", "/v1/record/models"):
            answer = client.get(route)
            assert answer.status_code == 404 and answer.json()["error"] == NO_RECORD


def test_several_products(fitted: Path, tmp_path: Path) -> None:
    shutil.copy(fitted / "model.safetensors", tmp_path / "plate.st")  # routing is the point: one model, two names
    plate_model = load(tmp_path / "plate.st")
    plate_model.set_thresholds(image=-1e6)  # everything flagged: tells the products apart
    products = [ServedModel("disc", load(fitted / "model.safetensors"), "model.safetensors",
                            identity_file=fitted / "model.safetensors"),
                ServedModel("plate", plate_model, "plate.st", identity_file=tmp_path / "plate.st")]
    review = ReviewStore(str(tmp_path / "r.db"), tmp_path / "files")
    app = create_app(None, ServiceSettings(), review=review, products=products)
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        listed = client.get("/v1/models").json()
        assert [m["name"] for m in listed] == ["disc", "plate"]
        assert client.get("/v1/models/plate").json()["model_file"] == "plate.st"
        image = fitted / "test" / "good" / "000.png"
        plate = _predict(client, image, "/v1/models/plate/predict")
        disc = _predict(client, image, "/v1/models/disc/predict")
        first = _predict(client, image)  # the single-model route: the first product
        assert plate["is_anomalous"] is True and plate["threshold"] == -1e6
        assert disc["is_anomalous"] is False and disc["threshold"] > -1e6
        assert first["threshold"] == pytest.approx(disc["threshold"]) and first["score"] == pytest.approx(disc["score"])
        missing = client.post("/v1/models/nothing/predict", files=[("files", ("a.png", image.read_bytes()))])
        assert missing.status_code == 404 and "served: disc, plate" in missing.json()["error"]
    with open_record(tmp_path / "r.db") as record:
        assert [r["model_name"] for r in record.inspections()] == ["plate", "disc", "disc"]


def test_serve_cli_refuses_bad_product_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["serve"]) == 2
    assert "give one of MODEL, --models DIR or --model NAME=PATH" in capsys.readouterr().err
    assert run_cli(["serve", "--model", "no-equals-sign"]) == 2
    assert "is not NAME=PATH" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run_cli(["serve", "--models", tmp_path / "empty"]) == 2
    assert "holds no model file" in capsys.readouterr().err
    notes = tmp_path / "notes.db"
    notes.write_text("not a database at all, just some notes " * 5)
    assert run_cli(["serve", "m.safetensors", "--record", notes]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"record {notes} is not a database" in err


def test_models_folder_lists_each_model_file_by_name(tmp_path: Path, fitted: Path) -> None:
    from spade_ad.apps.cli.deploy import _served_products

    for name in ("bottle", "plate"):
        shutil.copy(fitted / "model.safetensors", tmp_path / f"{name}.safetensors")
    (tmp_path / "notes.txt").write_text("not a model")
    assert _served_products(None, tmp_path, ()) == [("bottle", tmp_path / "bottle.safetensors"),
                                                    ("plate", tmp_path / "plate.safetensors")]
    assert _served_products(None, None, ("a=x.safetensors", "b=y")) == [("a", Path("x.safetensors")), ("b", Path("y"))]
    assert _served_products(Path("m.safetensors"), None, ()) == []


def _client_with_rows(model_file: Path, tmp_path: Path, verdicts: list[str]) -> tuple[TestClient, list[int]]:
    """A service on a record holding one row per verdict (as a watcher writes them: errors are files that could not
    be scored), oldest first; their ids."""
    review = ReviewStore(str(tmp_path / "r.db"), tmp_path / "files")
    ids = review.record.add([{"origin": "watch", "source": f"{i}.png", "verdict": verdict, "at_ms": 1_000 + i,
                              "score": None if verdict == "error" else 5.0, "normalized_score": 2.0,
                              "error": "not an image file" if verdict == "error" else None}
                             for i, verdict in enumerate(verdicts)])
    app = create_app(load(model_file, device="cpu"), ServiceSettings(), model_file=model_file.name, review=review)
    return TestClient(app, base_url="http://127.0.0.1:8000"), ids


def test_ids_outside_sql_integers_are_refused_not_internal_errors(model_file: Path, tmp_path: Path) -> None:
    client, [only] = _client_with_rows(model_file, tmp_path, ["defect"])
    with client:
        for bad in (2**63, 2**64 + 5, -1, 0):
            for answer in (client.get(f"/v1/inspections/{bad}"), client.get(f"/v1/inspections/{bad}/image"),
                           client.post(f"/v1/inspections/{bad}/label", json={"label": "good"}),
                           client.get(f"/v1/review?before={bad}")):
                assert answer.status_code == 422, (bad, answer.text)
                assert "parameter" in answer.json()["error"] and "internal" not in answer.json()["error"]
        assert client.get(f"/v1/inspections/{2**63 - 1}").status_code == 404  # the largest id: none such
        assert client.get(f"/v1/inspections/{only}").json()["id"] == only
        wrong = client.post(f"/v1/inspections/{only}/label", json={"label": "maybe"})
        assert wrong.status_code == 422 and wrong.json()["error"].startswith("bad request body field label: ")
        assert "'maybe'" in wrong.json()["error"] and "query parameter" not in wrong.json()["error"]
        broken = client.post(f"/v1/inspections/{only}/label", content=b"{not json",
                             headers={"Content-Type": "application/json"})
        assert broken.status_code == 422 and broken.json()["error"].startswith("bad request body: ")
        assert client.get("/v1/review?limit=x").json()["error"].startswith("bad query parameter limit: ")


def test_review_pages_end_and_error_rows_have_their_own_filter(model_file: Path, tmp_path: Path) -> None:
    verdicts = ["defect", "error", "defect", "defect", "error", "defect"]
    client, ids = _client_with_rows(model_file, tmp_path, verdicts)
    defects = [i for i, v in zip(ids, verdicts) if v == "defect"][::-1]  # newest first
    errors = [i for i, v in zip(ids, verdicts) if v == "error"][::-1]
    with client:
        first = client.get("/v1/review?limit=2").json()
        assert [i["id"] for i in first["items"]] == defects[:2] and first["next_before"] == defects[1]
        second = client.get(f"/v1/review?limit=2&before={first['next_before']}").json()
        assert [i["id"] for i in second["items"]] == defects[2:]
        assert second["next_before"] is None  # exactly a page left: no "More" after it
        assert client.get(f"/v1/review?limit=2&before={defects[-1]}").json() == {"items": [], "next_before": None}
        assert [i["id"] for i in client.get("/v1/review?limit=10").json()["items"]] == defects  # errors left out
        listed = client.get("/v1/review?verdict=error").json()["items"]
        assert [i["id"] for i in listed] == errors and listed[0]["error"] == "not an image file"
        for label in ("good", "defect"):
            refused = client.post(f"/v1/inspections/{errors[0]}/label", json={"label": label})
            assert refused.status_code == 409, refused.text
            assert "error row" in refused.json()["error"] and len(refused.json()["error"].splitlines()) == 1
        assert client.get(f"/v1/inspections/{errors[0]}").json()["label"] is None
    with open_record(tmp_path / "r.db") as record:
        assert record.labelled() == {"good": [], "defect": []}
