"""The service's inspection record (`serve MODEL --record DB`): every prediction recorded, the review queue, labels
("good" adds the image to the model with `--allow-add`, as `spade-ad add` does), the history and drift.

Each upload the service scores is kept on disk, in `files` (default: `<record file>.files/` beside a SQLite record,
`spade-ad-record-files/` in the working folder for a server URL), as `<day>/<time>-<sha256 prefix>.<ext>` with its
overlay and, for a flagged image, its "why" picture beside it; the record row names them, so the review page shows
them and "good" can add the very image to the model. Rows are written with `spade_ad.record.recorder.Recorder` (the one
`predict --record` and `watch` use), one transaction per request.

Routes (all answer 404 without a record): `GET /v1/review` (the queue: flagged and borderline images not yet
labelled, newest first; `verdict`, `since`, `until` (ISO dates or times, UTC), `model`, `labelled`, `limit`,
`before` for the next page; error rows, the files that could not be scored, only with `verdict=error`, and they take
no label), `GET /v1/inspections/{id}/image|overlay|why` (the files), `POST
/v1/inspections/{id}/label` (JSON `{"label": "good"|"defect", "by": "..."}`), `GET /v1/history` (per hour or day:
inspections, flag rate against the calibrated rate; the recent scores with their thresholds), `GET /v1/drift`
(`spade_ad.record.drift.check_drift`) and `GET /v1/record/models`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from PIL import Image
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from ...outputs.png import save_png
from ...record import EvidenceChanged, RecordError, default_files_dir, now_ms, open_record, verified_image
from ...record.recorder import Recorder
from .errors import ApiError
from .schemas import public_name

if TYPE_CHECKING:
    from ...estimators.prediction import Prediction

__all__ = ["NO_RECORD", "LabelBody", "ReviewStore", "add_review_routes", "default_files_dir", "parse_time"]

NO_RECORD = "this service keeps no inspection record: start it with --record DB"
MAX_ID = 2**63 - 1
"""The largest inspection id a record holds (SQL's BIGINT): larger ids (and ids below 1) are refused (422)."""
InspectionId = Annotated[int, PathParam(ge=1, le=MAX_ID, description="The inspection's id")]
_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,5}$")


def parse_time(value: str | None, name: str) -> int | None:
    """An ISO date or date-time (UTC unless it says otherwise) as milliseconds; a 422 naming `name` if malformed."""
    if value is None or value == "":
        return None
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ApiError(422, f"bad query parameter {name}: not an ISO date or time (got {value!r}); e.g. 2026-12-03 "
                            f"or 2026-12-03T14:00") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return int(moment.timestamp() * 1000)


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc).isoformat(timespec="seconds")


class ReviewStore:
    """The record of one service: its `Record`, one `Recorder` per served model, and the uploads' folder."""

    def __init__(self, target: str, files: str | os.PathLike[str] | None = None) -> None:
        self.record = open_record(target)
        self.files = Path(files) if files is not None else default_files_dir(target)
        try:
            self.files.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self.record.close()
            raise RecordError(f"record files folder {self.files}: {exc.strerror or exc}; give another with "
                              f"--record-files") from None
        self.recorders: dict[str, Recorder] = {}
        self._count = 0
        self._lock = threading.Lock()
        self.problem: str | None = None

    def recorder(self, name: str, model: Any, model_file: str | os.PathLike[str] | None) -> Recorder:
        """The recorder of the served model `name` (made on first use); while the record does not answer, its rows
        wait in `files`/record-outbox-<name>.jsonl and are written when it answers again."""
        if name not in self.recorders:
            from .context import logger

            def failed(problem: str) -> None:
                self.problem = problem
                logger.error("%s", problem)

            def resumed(message: str) -> None:
                self.problem = None
                logger.info("%s", message)

            self.recorders[name] = Recorder(self.record, model, model_file, origin="serve",
                                            name=name if name != "default" else None, batch_size=64,
                                            max_wait=3600, outbox=self.files / f"record-outbox-{name}.jsonl",
                                            on_failure=failed, on_resume=resumed)
        return self.recorders[name]

    # -- writing (worker threads) -----------------------------------------------------------------------------------
    def keep(self, recorder: Recorder, name: str, data: bytes, prediction: Prediction, overlay: Image.Image,
             why: Image.Image | None) -> dict[str, Any]:
        """Keep one scored upload: its bytes, overlay and why picture on disk; its record row (to write)."""
        sha = hashlib.sha256(data).hexdigest()
        now = dt.datetime.now(dt.timezone.utc)
        with self._lock:
            self._count += 1
            serial = self._count
        folder = self.files / now.strftime("%Y-%m-%d")
        folder.mkdir(parents=True, exist_ok=True)
        suffix = _SUFFIX.search(name)
        stem = f"{now.strftime('%H%M%S%f')}-{serial}-{sha[:12]}"
        image_path = folder / f"{stem}{suffix.group(0).lower() if suffix else '.img'}"
        image_path.write_bytes(data)
        overlay_path = folder / f"{stem}-overlay.png"
        save_png(overlay, overlay_path)
        why_path = None
        if why is not None:
            why_path = folder / f"{stem}-why.png"
            save_png(why, why_path)
        return recorder.row(prediction, source=public_name(name), path=image_path, sha256=sha,
                            overlay_path=overlay_path, why_path=why_path, map_path=None, kept_path=image_path)

    def flush(self) -> None:
        for recorder in self.recorders.values():
            recorder.flush()

    def close(self) -> None:
        self.flush()
        self.record.close()

    # -- reading (routes) -------------------------------------------------------------------------------------------
    def item(self, row: dict[str, Any]) -> dict[str, Any]:
        """A row as the page shows it: times in ISO, regions decoded, links to its files (not their paths)."""
        base = f"/v1/inspections/{row['id']}"
        return {
            "id": row["id"], "at": _iso(row["at_ms"]), "at_ms": row["at_ms"], "origin": row["origin"],
            "source": public_name(row["source"]), "verdict": row["verdict"], "score": row["score"],
            "normalized_score": row["normalized_score"], "p_value": row["p_value"],
            "threshold": row["image_threshold"], "width": row["width"], "height": row["height"],
            "regions": json.loads(row["regions"]) if row.get("regions") else [], "error": row["error"],
            "model_id": row["model_id"], "model_name": row["model_name"], "label": row["label"],
            "label_by": row["label_by"], "label_at": _iso(row["label_ms"]),
            "image": f"{base}/image" if row["path"] else None,
            "overlay": f"{base}/overlay" if row["overlay_path"] else None,
            "why": f"{base}/why" if row.get("why_path") else None,
        }

    def queue(self, *, verdict: str | None, since: str | None, until: str | None, model: str | None,
              labelled: bool, limit: int, before: int | None) -> dict[str, Any]:
        if verdict not in (None, "", "defect", "good", "error"):
            raise ApiError(422, f"bad query parameter verdict: must be defect, good (borderline) or error "
                                f"(got {verdict!r})")
        self.flush()
        rows = self.record.queue(verdict=verdict or None, model=model or None, since_ms=parse_time(since, "since"),
                                 until_ms=parse_time(until, "until"), labelled=labelled, limit=limit + 1,
                                 before_id=before)  # one more than shown: is there a next page?
        items = [self.item(row) for row in rows[:limit]]
        return {"items": items, "next_before": items[-1]["id"] if len(rows) > limit else None}

    def row(self, inspection_id: int) -> dict[str, Any]:
        self.flush()
        row = self.record.get(inspection_id)
        if row is None:
            raise ApiError(404, f"no inspection {inspection_id} in the record")
        return row

    def file(self, inspection_id: int, kind: str) -> Path:
        column = {"image": "path", "overlay": "overlay_path", "why": "why_path"}.get(kind)
        if column is None:
            raise ApiError(404, f"no such file: {kind} (image, overlay or why)")
        row = self.row(inspection_id)
        if kind == "image":  # the image inspected, never what lies at its path now
            try:
                return verified_image(row)
            except EvidenceChanged as exc:
                raise ApiError(409 if "another image" in str(exc) else 410, str(exc)) from None
        value = row.get(column)
        if not value or not Path(value).is_file():
            raise ApiError(404, f"inspection {inspection_id} has no {kind} file (any more)")
        return Path(value)

    def label(self, inspection_id: int, label: str, by: str,
              add_good: Callable[[Path], dict[str, Any]] | None) -> dict[str, Any]:
        """Label one inspection; "good" with `add_good` (the service allows adding) also adds its image to the
        model first (so a failure to add leaves it unlabelled). An error row (a file that could not be scored) is
        not labelled (409): there is no inspection result to confirm or correct."""
        row = self.row(inspection_id)
        if row.get("verdict") == "error":
            raise ApiError(409, f"inspection {inspection_id} is an error row (the file could not be scored: "
                                f"{row.get('error') or 'unreadable'}); there is nothing to label")
        added = None
        if label == "good" and add_good is not None:
            if row.get("verdict") == "error":
                raise ApiError(409, f"inspection {inspection_id} could not be scored (an unreadable file): there is "
                                    f"nothing to label")
            try:
                path = verified_image(row)  # only the very image inspected is added to the model
            except EvidenceChanged as exc:
                raise ApiError(409, f"{exc}: labelled nothing, added nothing") from None
            added = add_good(path)
        try:
            updated = self.record.set_label(inspection_id, label, by)
        except RecordError as exc:
            raise ApiError(422, str(exc)) from None
        return {"inspection": self.item(updated), "added": added}

    def history(self, model: str | None, bucket: str, limit: int, days: float | None = None) -> dict[str, Any]:
        """The history view's figures: per `bucket` over the last `days` (default 7 per hour, 90 per day, counted
        back from the model's latest inspection), and its latest `limit` scores."""
        if bucket not in ("hour", "day"):
            raise ApiError(422, f"bad query parameter bucket: must be hour or day (got {bucket!r})")
        self.flush()
        try:
            row = self.record.model(model or None)
        except RecordError as exc:
            raise ApiError(404, str(exc)) from None
        scores = row["calibration_scores"]
        threshold = row["image_threshold"]
        rate = None
        if threshold is not None and scores:
            rate = (1 + sum(1 for s in scores if s > threshold)) / (len(scores) + 1)
        points = self.record.scores(row["id"], limit=limit)
        latest = points[-1]["at_ms"] if points else now_ms()
        span = days if days is not None else (7 if bucket == "hour" else 90)
        buckets = self.record.history(row["id"], bucket=bucket, since_ms=int(latest - span * 86_400_000))
        for item in buckets:
            item["start"] = _iso(item["start_ms"])
        points = [{"id": p["id"], "at": _iso(p["at_ms"]), "at_ms": p["at_ms"], "score": p["score"],
                   "threshold": p["image_threshold"], "verdict": p["verdict"], "label": p["label"]} for p in points]
        versions = [{"id": m["id"], "name": m["name"], "inspections": m["inspections"],
                     "first_seen": _iso(m["first_seen_ms"]), "image_threshold": m["image_threshold"]}
                    for m in self.record.models()]
        return {"model": {"id": row["id"], "name": row["name"], "image_threshold": threshold,
                          "false_alarm_rate": row["false_alarm_rate"]},
                "calibrated_rate": rate, "bucket": bucket, "days": span, "buckets": buckets, "scores": points,
                "models": versions, "now": _iso(now_ms())}


class LabelBody(BaseModel):
    """`POST /v1/inspections/{id}/label`: the label, and who gives it (free text, e.g. a name or a badge number)."""

    label: Literal["good", "defect"]
    by: str = Field("", max_length=200)


def add_review_routes(app: FastAPI, review: ReviewStore | None, served: dict[str, tuple[Any, Any]]) -> None:
    """The record's routes (see the module's description) on `app`; `served`: name -> (ServedModel, Predictor)."""

    def need() -> ReviewStore:
        if review is None:
            raise ApiError(404, NO_RECORD)
        return review

    def predictor_of(row: dict[str, Any]) -> Any:
        """The served model's predictor that made this row (by model id, then name), None if none is served."""
        for _, predictor in served.values():
            recorder = predictor.recorder
            if recorder is not None and recorder.model_id == row["model_id"]:
                return predictor
        for _, predictor in served.values():
            if predictor.recorder is not None and predictor.recorder.model_name == row["model_name"]:
                return predictor
        return next(iter(served.values()))[1] if len(served) == 1 else None

    @app.get("/v1/review", summary="The review queue: flagged and borderline inspections not yet labelled")
    async def review_queue(
        verdict: str | None = Query(None, description="defect, good (the borderline ones) or error"),
        since: str | None = Query(None, description="From this ISO date or time (UTC)"),
        until: str | None = Query(None, description="Before this ISO date or time (UTC)"),
        model: str | None = Query(None, description="Only this model id"),
        labelled: bool = Query(False, description="The labelled ones instead"),
        limit: int = Query(50, ge=1, le=500),
        before: int | None = Query(None, ge=1, le=MAX_ID, description="The next page: ids below this one "
                                   "(the previous answer's next_before)"),
    ) -> dict[str, Any]:
        store = need()
        return await run_in_threadpool(store.queue, verdict=verdict, since=since, until=until, model=model,
                                       labelled=labelled, limit=limit, before=before)

    @app.get("/v1/inspections/{inspection_id}", summary="One recorded inspection")
    async def inspection(inspection_id: InspectionId) -> dict[str, Any]:
        store = need()
        return store.item(await run_in_threadpool(store.row, inspection_id))

    @app.get("/v1/inspections/{inspection_id}/{kind}", summary="A recorded inspection's image, overlay or why "
             "picture", response_class=FileResponse)
    async def inspection_file(inspection_id: InspectionId, kind: str) -> FileResponse:
        store = need()
        path = await run_in_threadpool(store.file, inspection_id, kind)
        return FileResponse(path, headers={"Cache-Control": "private, max-age=86400"})

    @app.post("/v1/inspections/{inspection_id}/label", summary="Label an inspection good or defect; \"good\" also "
              "adds its image to the model with --allow-add")
    async def label(inspection_id: InspectionId, body: LabelBody, request: Request) -> dict[str, Any]:
        store = need()
        row = await run_in_threadpool(store.row, inspection_id)
        who = body.by.strip() or f"web page ({request.client.host if request.client else 'unknown'})"
        predictor = predictor_of(row)
        if body.label == "good" and predictor is not None and predictor.can_add:
            def add(path: Path) -> dict[str, Any]:
                return dict(predictor.add_images([path]).model_dump())

            future = predictor.executor.submit(store.label, inspection_id, "good", who, add)
            answer = await asyncio.wrap_future(future)
        else:
            answer = await run_in_threadpool(store.label, inspection_id, body.label, who, None)
            if body.label == "good":
                answer["note"] = ("labelled good; not added to the model (start the service with --allow-add to "
                                  "add good images)")
        return answer

    @app.get("/v1/history", summary="Per hour or day: inspections and flag rate against the calibrated rate; "
             "the recent scores with their thresholds")
    async def history(model: str | None = Query(None, description="Model id or name [default: the newest used]"),
                      bucket: str = Query("hour", description="hour or day"),
                      limit: int = Query(2000, ge=1, le=20000, description="The latest this many scores"),
                      days: float | None = Query(None, gt=0, le=3660, description="Buckets over the last this "
                                                 "many days [default: 7 per hour, 90 per day]")) -> dict[str, Any]:
        store = need()
        return await run_in_threadpool(store.history, model, bucket, limit, days)

    @app.get("/v1/drift", summary="Has the line drifted? (the figures of `spade-ad drift`)")
    async def drift(model: str | None = Query(None, description="Model id or name [default: the newest used]"),
                    window: int = Query(500, ge=1, le=100000),
                    alpha: float = Query(0.01, gt=0, lt=1)) -> dict[str, Any]:
        store = need()
        from ...record.drift import check_drift

        def report() -> dict[str, Any]:
            store.flush()
            try:
                return check_drift(store.record, model or None, window=window, alpha=alpha).to_json()
            except RecordError as exc:
                raise ApiError(404, str(exc)) from None

        return await run_in_threadpool(report)

    @app.get("/v1/record/models", summary="The models in the record, newest first")
    async def record_models() -> list[dict[str, Any]]:
        store = need()

        def models() -> list[dict[str, Any]]:
            return [{"id": m["id"], "name": m["name"], "kind": m["kind"], "inspections": m["inspections"],
                     "first_seen": _iso(m["first_seen_ms"]), "image_threshold": m["image_threshold"]}
                    for m in store.record.models()]

        return await run_in_threadpool(models)
