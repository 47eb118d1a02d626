"""The commands that put a model to work elsewhere: export (a bundle for the runtime) and serve (the HTTP service).
"""

from __future__ import annotations

from pathlib import Path

import click

from ... import settings as settings_table
from .options import SettingType, engine_option, publish_option, record_option


@click.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Bundle folder to write (backbone.onnx, model.safetensors, bundle.json); with --single-graph, "
              "the .onnx file.")
@click.option("--format", "format_", type=click.Choice(["onnx", "openvino"]), default="onnx", show_default=True,
              help="onnx: the graph for ONNX Runtime (and OpenVINO, which reads it too); openvino: also the graph "
              "in OpenVINO's own format.")
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="Backbone weights file, if not where it was at fit time.")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle folder.")
@click.option("--single-graph", is_flag=True,
              help="Write the whole pipeline (network, searches, map, score, verdict) as ONE ONNX model to -o "
              "GRAPH.onnx, for any ONNX Runtime binding (docs/single-graph.md).")
def export(model_path: Path, output: Path, format_: str, weights: Path | None, overwrite: bool,
           single_graph: bool) -> None:
    """Export a model file as a deployment bundle: `spade-ad predict` and `spade-ad serve` score it with numpy and
    ONNX Runtime only (`pip install spade-ad[runtime]`, no torch), with the same scores and verdicts. With
    --single-graph, as one ONNX model instead (an image in; score, verdict and map out)."""
    from ...export.bundle import describe, export_bundle

    if single_graph:
        from ...export.single_graph import export_single_graph

        if format_ != "onnx":
            raise click.UsageError("--single-graph writes ONNX only: drop --format openvino")
        graph = export_single_graph(model_path, output, overwrite=overwrite, weights=weights)
        click.echo(f"wrote single graph {graph}: {graph.stat().st_size / 2**20:.1f} MB")
        return
    bundle = export_bundle(model_path, output, format=format_, overwrite=overwrite, weights=weights)
    sizes = ", ".join(f"{name} {size / 2**20:.1f} MB" for name, size in describe(bundle).items())
    click.echo(f"wrote bundle {bundle}: {sizes}")


@click.command()
@click.argument("model_path", metavar="[MODEL]", required=False, type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (loopback by default: not reachable from elsewhere).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Inference threads sharing the one loaded model.")
@click.option("--max-queue", type=click.IntRange(min=0), default=8, show_default=True,
              help="Requests that may wait for a worker; beyond that: 503.")
@click.option("--max-upload-mb", type=click.FloatRange(min=0, min_open=True), default=20.0, show_default=True,
              help="Largest accepted upload per request, in MB.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=40_000_000, show_default=True,
              help="Largest accepted image, in pixels (decompression-bomb guard).")
@click.option("--max-uploads", type=click.IntRange(min=1), default=16, show_default=True,
              help="Predict requests holding a body at once (received, waiting or scored); beyond that: 503.")
@click.option("--max-connections", type=click.IntRange(min=1), default=64, show_default=True,
              help="Open connections; beyond that: 503.")
@click.option("--read-timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="Seconds to receive a request's body; beyond that: 408 and the connection is closed.")
@click.option("--header-timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Seconds to receive a request's line and headers; beyond that the connection is closed.")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="HOST",
              help="Also answer requests for this Host (name, name:port, *.domain; * for any). Repeatable. "
                   "By default only the bound address (and localhost names on loopback).")
@click.option("--allow-origin", "allow_origins", multiple=True, metavar="ORIGIN",
              help="Also accept POSTs (with CORS) from pages of this origin (https://site[:port]; * for any). "
                   "Repeatable. By default only the service's own page.")
@click.option("--allow-add", is_flag=True, default=False,
              help="Let clients add images to the model as good ones (POST /v1/good, the page's \"This one is "
                   "good\" button); the model is then saved back to MODEL. Off by default.")
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="Backbone weights file, if not where it was at fit time.")
@click.option("--device", type=SettingType(settings_table.BY_NAME["device"]), default=None,
              help="Override the device stored in the model (cpu, cuda[:N], auto).")
@engine_option
@record_option
@click.option("--record-files", type=click.Path(path_type=Path), default=None,
              help="With --record: folder for the recorded uploads, overlays and why pictures [default: DB.files "
              "beside a SQLite record, ./spade-ad-record-files for a URL].")
@click.option("--models", "models_dir", type=click.Path(path_type=Path), default=None,
              help="Serve every model file (*.safetensors) and bundle folder in this folder, one per product, named "
              "by its file name without extension: /v1/models/NAME/predict; the page lets the user choose.")
@click.option("--model", "named_models", multiple=True, metavar="NAME=PATH",
              help="Serve this model as product NAME (repeatable); instead of MODEL or --models.")
@publish_option
@click.option("--publish-outbox", type=click.Path(path_type=Path), default=None,
              help="Folder of the --publish outboxes [default: the record's files folder; needed without --record].")
def serve(model_path: Path, host: str, port: int, workers: int, max_queue: int, max_upload_mb: float,
          max_pixels: int, max_uploads: int, max_connections: int, read_timeout: float, header_timeout: float,
          allow_hosts: tuple[str, ...], allow_origins: tuple[str, ...], allow_add: bool, weights: Path | None,
          device: str | None, engine: str | None, record_target: str | None, record_files: Path | None,
          models_dir: Path | None, named_models: tuple[str, ...], publish: tuple[str, ...] = (),
          publish_outbox: Path | None = None) -> None:
    """Serve a model file or an exported bundle (no torch needed) over HTTP: JSON API at /v1, a web page at /,
    OpenAPI docs at /docs. Several products: --models DIR or --model NAME=PATH (repeatable). With --record, every
    prediction is recorded and the page gets its review queue, history and drift. See SECURITY.md."""
    from ..service import ServiceSettings, run_server

    products = _served_products(model_path, models_dir, named_models)
    try:
        settings = ServiceSettings(
            host=host, port=port, workers=workers, max_queue=max_queue, max_upload_bytes=int(max_upload_mb * 2**20),
            max_pixels=max_pixels, max_uploads=max_uploads, max_connections=max_connections,
            read_timeout=read_timeout, header_timeout=header_timeout, allow_hosts=allow_hosts,
            allow_origins=allow_origins, allow_add=allow_add,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    if record_files is not None and record_target is None:
        raise click.UsageError("--record-files needs --record DB")
    if record_target is None and publish_outbox is None and any(not u.startswith("opc.tcp:") for u in publish):
        raise click.UsageError("--publish keeps its outbox beside the record's files: give --record DB, or "
                               "--publish-outbox DIR")
    run_server(model_path, settings, weights=weights, device=device, engine=engine, record=record_target,
               record_files=record_files, products=products, publish=publish, publish_outbox=publish_outbox)


def _served_products(model_path: Path | None, models_dir: Path | None,
                     named_models: tuple[str, ...]) -> list[tuple[str, Path]]:
    """(name, path) per product of `serve --models DIR` / `--model NAME=PATH`; [] for the one MODEL."""
    given = sum(x is not None and x != () for x in (model_path, models_dir, named_models))
    if given != 1:
        raise click.UsageError("give one of MODEL, --models DIR or --model NAME=PATH (repeatable)")
    if model_path is not None:
        return []
    if models_dir is not None:
        from ...estimators.runtime.bundle import is_bundle

        if not models_dir.is_dir():
            raise click.BadParameter(f"{models_dir} is not a folder of models", param_hint="--models")
        found = sorted((p.stem if p.is_file() else p.name, p) for p in models_dir.iterdir()
                       if (p.is_file() and p.suffix == ".safetensors") or (p.is_dir() and is_bundle(p)))
        if not found:
            raise click.BadParameter(f"{models_dir} holds no model file (*.safetensors) nor bundle folder",
                                     param_hint="--models")
        return found
    products: list[tuple[str, Path]] = []
    for item in named_models:
        name, equals, path = item.partition("=")
        if not equals or not name or not path or not all(c.isalnum() or c in "-_." for c in name):
            raise click.BadParameter(f"{item!r} is not NAME=PATH (NAME: letters, digits, - _ .)",
                                     param_hint="--model")
        if name in dict(products):
            raise click.BadParameter(f"product {name!r} given twice", param_hint="--model")
        products.append((name, Path(path)))
    return products
