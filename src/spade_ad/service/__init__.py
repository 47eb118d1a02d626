"""HTTP service: a fitted model behind a JSON API and a small web page (`spade-ad serve MODEL`).

Endpoints: `POST /v1/predict` (multipart field `files`, one or several images; optional `?threshold=` or
`?false_alarm_rate=` to judge that request by another image threshold, without changing the shared model; each result
has the raw and normalised score, the conformal p-value, the verdict, the defect regions and the nearest good training
images), `GET /v1/model` (also how the thresholds were calibrated), `GET /healthz`,
the web page at `/` (plain files from `spade_ad/service/static`, no CDN) and OpenAPI docs at `/docs` (Swagger UI
from the `fastapi-offline` package, also without a CDN).

Resources are bounded. The model is loaded once and shared. Inference runs in a pool of `workers` threads; at most
`workers + max_queue` predict requests are admitted at a time (running or waiting), and any further one gets 503 with
`Retry-After` before its body is read, so the memory held by uploads is at most that many times `max_upload_bytes`.
The body is counted while it streams in (413 past the limit, whatever Content-Length says). Image headers are checked
against `max_pixels` before any pixel is decoded (decompression bombs), and each worker decodes, scores and renders
one image at a time. With `workers > 1`, decoding and PNG rendering run in parallel but the model itself is called
under a lock: one shared model, one forward pass at a time (torch already spreads one pass over the CPU cores).

The service holds no library policy: images are checked and decoded by `spade_ad.images` (`check_bytes`,
`decode_bytes`; the service only maps each error's `kind` to an HTTP status), heat-map colour scales come from
`spade_ad.visualize.color_range` and region boxes and verdict labels from `spade_ad.visualize.annotate`, per-request
thresholds from `spade_ad.calibration`, and the settings shown by `/v1/model` from the settings table.

Modules, each using only those below it: `app` (application factory, routes, `run_server`), `predictor` (scoring
uploads in the worker pool), `uploads` (reading multipart bodies within limits, admission), `schemas` (response
bodies), `errors` (refusals as HTTP answers), `config` (`ServiceSettings`).
"""

from __future__ import annotations

from .app import create_app, run_server
from .config import ServiceSettings

__all__ = ["ServiceSettings", "create_app", "run_server"]
