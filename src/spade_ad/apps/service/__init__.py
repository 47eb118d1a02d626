"""HTTP service: a fitted model behind a JSON API and a small web page (`spade-ad serve MODEL`).

Endpoints: `POST /v1/predict` (multipart field `files`, one or several images; optional `?threshold=` or
`?false_alarm_rate=` to judge that request by another image threshold, without changing the shared model; each result
has the raw and normalised score, the conformal p-value, the verdict, the defect regions and the nearest good training
images, and where the strongest region matched in the nearest good image, with the "why" picture for flagged ones),
`POST /v1/good` (only with `allow_add`, `--allow-add`: add the uploaded images to the model as good ones and save it
back to the file the service was started with; else 403), `GET /v1/model` (also how the thresholds were calibrated),
`GET /healthz`,
the web page at `/` (plain files from `spade_ad/apps/service/static`, no CDN) and OpenAPI docs at `/docs` (Swagger UI
from the `fastapi-offline` package, also without a CDN).

Resources are bounded. The model is loaded once, from a private copy of its file (so replacing or truncating the
file does not touch a running service), and shared. Inference runs in a pool of `workers` threads; at most
`workers + max_queue` predict requests are admitted at a time (running or waiting), and when they are all taken a
further one gets 503 with `Retry-After` before its body is read. At most `max_uploads` predict requests hold a body
(being received, waiting or scored; 503 beyond), so the memory held by uploads is at most `max_uploads` times
`max_upload_bytes`; a body must arrive within `read_timeout` seconds (408 and the connection closed, so slow clients
cannot hold the workers' places) and a request's head within `header_timeout` seconds (`server.timed_protocol`).
The body is counted while it streams in (413 past the limit, whatever Content-Length says). Image headers are checked
against `max_pixels` before any pixel is decoded (decompression bombs), and each worker decodes, scores and renders
one image at a time. With `workers > 1`, decoding and PNG rendering run in parallel but the model itself is called
under a lock: one shared model, one forward pass at a time (torch already spreads one pass over the CPU cores).

The service holds no library policy: images are checked and decoded by `spade_ad.data.images` (`check_bytes`,
`decode_bytes`; the service only maps each error's `kind` to an HTTP status), heat-map colour scales come from
`spade_ad.outputs.visualize.color_range` and region boxes and verdict labels from `spade_ad.outputs.visualize.annotate`,
per-request thresholds from `spade_ad.core.calibration`, and the settings shown by `/v1/model` from the settings table.

Whom it answers: only requests whose Host header names the service (DNS-rebinding guard; `--allow-host` to add
names), and state-changing requests only from its own origin (`--allow-origin` to add sites, with CORS); see
`guard`. Every answer carries an `X-Request-ID`; an internal error is logged with it and answered with it alone
(`context`). `/v1/model` shows file names, never paths. See SECURITY.md for what this does and does not protect.

Modules, each using only those below it: `server` (`run_server`: the private model copy, uvicorn and its timed
protocol), `app` (application factory, routes), `context` (request ids, internal errors), `guard` (Host and
origin), `predictor` (scoring uploads in the worker pool), `uploads` (reading multipart bodies within limits and
time, admission), `schemas` (response bodies), `errors` (refusals as HTTP answers), `config` (`ServiceSettings`).
"""

from __future__ import annotations

from .app import create_app
from .config import ServiceSettings
from .server import run_server

__all__ = ["ServiceSettings", "create_app", "run_server"]
