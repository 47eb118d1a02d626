"""Running the service: the model loaded from a private copy of its file, and uvicorn with time and size limits.

The model's training features are memory-mapped from its file. Served straight from the user's file, copying
another model over it would change a running service's answers, and truncating it would kill the process (SIGBUS).
So `run_server` copies the file to a private temporary file (mode 0600, in TMPDIR), loads the model from the copy,
and removes the copy's name at once: the memory maps keep its data (the disk space is freed when the service ends,
however it ends), and no other process can open, change or truncate it. The model file can be replaced while the
service runs; a restart serves the new one.

Connections are timed at the HTTP layer too (`timed_protocol`): the request line and headers must arrive within
`header_timeout` seconds (from the connection's start, or the end of the previous answer), and a body within
`read_timeout` (+ `BODY_GRACE`) seconds of its headers, whatever route it is for; otherwise the connection is closed.
The predict route's own deadline (`read_timeout`) answers 408 first; this is the backstop for bodies no route reads.

Every log line starts with the local time in ISO 8601 (`2026-12-06T15:04:05+0000 INFO: ...`), so a journal or a log
file read later says when. At start-up the service logs the record it opened and each model as it loads (its file,
then the time it took, its backbone, good images and threshold): a start of many seconds shows where it is.
"""

from __future__ import annotations

import asyncio
import copy
import logging.config
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .app import create_app
from .config import MAX_HEADER_BYTES, ServiceSettings
from .context import logger

__all__ = ["BODY_GRACE", "load_private_copy", "run_server", "timed_protocol"]

BODY_GRACE = 2.0
"""Seconds the HTTP layer waits for a body beyond `read_timeout` (the predict route answers 408 before that)."""
_TIMEOUT_ANSWER = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


def load_private_copy(
    model_path: str | os.PathLike[str], *, weights: str | os.PathLike[str] | None = None, device: str | None = None,
    engine: str | None = None,
) -> Any:
    """The model (`spade_ad.estimators.opening.open_model`: a model file on torch, or a bundle folder on the torch-free
    runtime) from a private copy of `model_path` whose name is removed once loaded (see the module's description).
    Errors name `model_path`, not the copy."""
    from ...errors import ModelFileError
    from ...estimators.opening import open_model
    from ...estimators.runtime.bundle import is_bundle

    if is_bundle(model_path):
        folder = tempfile.mkdtemp(prefix="spade-ad-serve-")
        try:
            copy = shutil.copytree(model_path, os.path.join(folder, "bundle"))
            try:
                return open_model(copy, weights=weights, device=device, engine=engine)
            except ModelFileError as exc:
                raise ModelFileError(str(exc).replace(copy, os.fspath(model_path))) from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # open memory maps keep their data
    if not Path(model_path).is_file():
        return open_model(model_path, weights=weights, device=device, engine=engine)  # the library's "not found"
    handle, name = tempfile.mkstemp(prefix="spade-ad-serve-", suffix=".safetensors")
    try:
        with open(model_path, "rb") as source, os.fdopen(handle, "wb") as target:
            shutil.copyfileobj(source, target, 2**20)
        try:
            return open_model(name, weights=weights, device=device, engine=engine)
        except ModelFileError as exc:
            raise ModelFileError(str(exc).replace(name, os.fspath(model_path))) from None
    finally:
        try:
            os.unlink(name)
        except OSError:  # pragma: no cover - a system that cannot remove a mapped file: remove it at exit
            import atexit

            atexit.register(lambda: Path(name).unlink(missing_ok=True))


def timed_protocol(header_timeout: float, body_timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol with a deadline on each request's head and body (see the module's description)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _phase: str | None = None
        _timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._watch()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel()
            super().connection_lost(exc)

        def _cancel(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _watch(self) -> None:
            """Start the deadline of the part of a request now awaited (head or body); stop it once it is in."""
            state = self.conn.their_state
            phase = "head" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None
            if self.transport.is_closing():
                phase = None
            if phase == self._phase:
                return
            self._cancel()
            self._phase = phase
            if phase is not None:
                delay = header_timeout if phase == "head" else body_timeout
                self._timer = self.loop.call_later(delay, self._expired, phase)

        def _expired(self, phase: str) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            if phase == "head" and self.conn.trailing_data[0]:  # part of a request came: say why it ends
                self.transport.write(_TIMEOUT_ANSWER)
            logger.info("closing a connection from %s: the request %s did not arrive in time",
                        self.client[0] if self.client else "?", "head" if phase == "head" else "body")
            self.transport.close()

    return TimedH11Protocol


LOG_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"
"""The time at the start of every log line (local time, ISO 8601 with its UTC offset)."""


def _log_config() -> dict[str, Any]:
    """uvicorn's logging set-up with the time on every line, plus the service's own logger (start-up, internal
    errors with their request ids)."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    for formatter in config["formatters"].values():
        formatter["fmt"] = "%(asctime)s " + formatter["fmt"]
        formatter["datefmt"] = LOG_TIME_FORMAT
    config["loggers"][logger.name] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


def _describe(model: Any) -> str:
    """A loaded model in a few words for the start-up log: backbone, good images, image threshold."""
    parts = []
    if getattr(model, "backbone", None):
        parts.append(f"backbone {model.backbone}")
    names = getattr(model, "train_names_", None)
    if names is not None:
        parts.append(f"{len(names)} good images")
    threshold = getattr(model, "image_threshold_", None)
    parts.append(f"image threshold {threshold:.4g}" if threshold is not None else "no threshold")
    return ", ".join(parts)


def run_server(
    model_path: str | os.PathLike[str] | None,
    settings: ServiceSettings | None = None,
    *,
    weights: str | os.PathLike[str] | None = None,
    device: str | None = None,
    engine: str | None = None,
    record: str | None = None,
    record_files: str | os.PathLike[str] | None = None,
    products: Sequence[tuple[str, str | os.PathLike[str]]] = (),
    publish: Sequence[str] = (),
    publish_outbox: str | os.PathLike[str] | None = None,
) -> None:
    """Load the model once (from a private copy of its file, or of its bundle folder: then without torch) and serve
    it with uvicorn until interrupted. `products`: (name, path) of several models instead of `model_path`, each
    loaded once. `record`: the inspection record (a SQLite file or a database URL; `spade_ad.apps.service.review`),
    `record_files`: where the recorded uploads are kept."""
    import uvicorn

    from ...errors import SettingError
    from ...estimators.runtime.bundle import is_bundle
    from .app import ServedModel

    logging.config.dictConfig(_log_config())  # the start-up lines below already carry the time
    settings = settings or ServiceSettings()
    paths = list(products) or [("default", model_path)]
    for _, path in paths:
        if settings.allow_add and is_bundle(path):
            raise SettingError("allow_add", f"needs a model file: a bundle cannot learn new good images ({path})",
                               True, "serve the model file, or leave out --allow-add")
    review = None
    if record is not None:
        from .review import ReviewStore

        review = ReviewStore(record, record_files)  # before the models load: a bad record costs nothing
        logger.info("inspection record: %s (schema %s; uploads kept in %s)", review.record.shown,
                    review.record.schema_version, review.files)
    # `POST /v1/good` (with allow_add) saves the model to the user's file, not to the private copy; the record
    # identifies it by the user's file's content.
    served = []
    for number, (name, path) in enumerate(paths, 1):
        shown = f"model {number}/{len(paths)}" + (f" {name!r}" if products else "")
        logger.info("loading %s from %s ...", shown, path)
        started = time.perf_counter()
        model = load_private_copy(path, weights=weights, device=device, engine=engine)
        logger.info("loaded %s in %.1f s: %s", shown, time.perf_counter() - started, _describe(model))
        served.append(ServedModel(name, model, model_file=os.path.basename(os.fspath(path)),
                                  save_to=path if settings.allow_add else None, identity_file=path))
    publisher = None
    if publish:  # every prediction published (spade_ad.apps.publish); the outboxes beside the record's files
        from ..publish import Publishers

        outboxes = publish_outbox if publish_outbox is not None else review.files if review is not None else "."
        publisher = Publishers.open(publish, outboxes, log=logger.warning)
    if products:
        app = create_app(None, settings, review=review, products=served, publisher=publisher)
    else:
        [only] = served
        app = create_app(only.model, settings, model_file=only.model_file, save_to=only.save_to, review=review,
                         identity_file=only.identity_file, publisher=publisher)
    try:
        uvicorn.run(
            app, host=settings.host, port=settings.port, limit_concurrency=settings.max_connections,
            http=timed_protocol(settings.header_timeout, settings.read_timeout + BODY_GRACE), ws="none",
            h11_max_incomplete_event_size=MAX_HEADER_BYTES, timeout_keep_alive=settings.keep_alive_timeout,
            timeout_graceful_shutdown=5, server_header=False, log_config=_log_config(),
        )
    finally:
        if publisher is not None:
            publisher.close()  # up to 10 s more of sending; what is left waits in the outbox for the next start
