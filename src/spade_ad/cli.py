"""Command-line interface: a thin layer over the library (`spade_ad.model`, `spade_ad.writers`, `spade_ad.evaluation`,
`spade_ad.service`). It holds no policy: settings, validation, image checks, scores and outputs all come from the
library.

The model options of `fit` and `evaluate` are generated from the settings table (`spade_ad.settings`), so a new
setting appears here, with its help and its checks, by being declared there. Heavy modules (torch, timm, FastAPI)
are imported inside the commands only: `spade-ad --help` loads none of them.

Over 300 lines: one function per command (fit, predict, calibrate, add, evaluate, demo, serve) with its
options; each holds no policy, only argument handling and calls into the library.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import settings as settings_table
from .errors import SettingError, SpadeError


class _SettingType(click.ParamType):
    """A click type that parses and validates one setting with the table's rules."""

    def __init__(self, setting: settings_table.Setting) -> None:
        self.setting = setting
        self.name = setting.kind

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self.setting.validate(self.setting.parse(value))
        except (ValueError, SettingError) as exc:
            problem = exc.problem if isinstance(exc, SettingError) else "has the wrong type"
            self.fail(f"{problem} (got {value!r}); allowed: {self.setting.allowed()}", param, ctx)


def setting_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add one option per CLI setting of the table (in reverse, so they show in table order)."""
    for setting in reversed([s for s in settings_table.SETTINGS if s.cli]):
        command = click.option(
            setting.option, setting.name, type=_SettingType(setting), default=None, metavar=setting.kind.upper(),
            help=f"{setting.help} [default: {setting.display_default()}]",
        )(command)
    return command


def _given_settings(options: dict[str, Any]) -> dict[str, Any]:
    """The model settings among a command's options that were given on the command line."""
    return {name: value for name, value in options.items() if name in settings_table.BY_NAME and value is not None}


def _report_skip(item: object, error: Exception) -> None:
    click.echo(f"skipped: {error}", err=True)


skip_bad_option = click.option("--skip-bad", is_flag=True, help="Skip unreadable images (listed on stderr and in the "
                               "output) instead of stopping at the first one.")


# The engines of `spade_ad.runtime.engines.ENGINES`, spelled out: importing it would load numpy for `--help`.
engine_option = click.option("--engine", type=click.Choice(["onnxruntime", "openvino"]), default=None,
                             help="Inference engine for a bundle [default: onnxruntime]; model files run on torch.")


outputs_option = click.option(
    "--outputs", default="default", show_default=True, metavar="LIST",
    help="Per-image files, separated by commas: overlay (overlays/*.png), mask (masks/*.png), heatmap "
    "(heatmaps/*.png), map (maps/*.tiff); 'default' is overlay,mask, 'all' every one, 'none' only scores.csv and "
    "regions.jsonl.")


record_option = click.option(
    "--record", "record_target", metavar="DB", default=None,
    help="Also write every prediction to this inspection record: a SQLite file (created when missing) or a "
    "postgresql://user@host/db URL (pip install 'spade-ad[record]').")


def _check_publish(_ctx: click.Context, _param: click.Parameter, urls: tuple[str, ...]) -> tuple[str, ...]:
    # --publish URLs are checked before anything loads (a bad one: a one-line usage error)
    if not urls:
        return urls
    from .publish import PublishError, parse_target

    for url in urls:
        try:
            parse_target(url)
        except PublishError as exc:
            raise click.BadParameter(str(exc).removeprefix("--publish "), param_hint="--publish") from None
    return urls


publish_option = click.option(
    "--publish", "publish", multiple=True, metavar="URL", callback=_check_publish,
    help="Publish each inspection to an MQTT broker (mqtt://host[:port]/topic, QoS 1), a webhook (http(s)://...) or "
    "an OPC UA server of the latest one (opc.tcp://host:port), through an outbox that survives outages and restarts "
    "(repeatable; pip install 'spade-ad[publish]'; docs/publish.md).")


def _stamped(line: str) -> None:
    """A line on stderr with the local time: what a long-running command says, read later in a log."""
    import datetime as dt

    click.echo(f"{dt.datetime.now().astimezone().isoformat(timespec='seconds')} {line}", err=True)


def _recorder(record_target: str | None, model: Any, model_path: Path | None, origin: str,
              name: str | None = None, output: Path | None = None) -> Any:
    """A `spade_ad.recording.Recorder` on the record at `record_target` (None without one), whose rows wait in
    OUTPUT/record-outbox.jsonl while the record does not answer; a problem with the record at the start is a
    `RecordError` (one line, exit 2)."""
    if record_target is None:
        return None
    from .record import open_record
    from .recording import OUTBOX_FILE, Recorder

    outbox = None
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        outbox = output / OUTBOX_FILE
    return Recorder(open_record(record_target), model, model_path, origin=origin, name=name, outbox=outbox,
                    on_failure=lambda message: _stamped(f"warning: {message}"), on_resume=_stamped)


def _report_unrecorded(recorder: Any, output: Path) -> None:
    """After a run with --record: how much was recorded; exit 1 (names listed in OUT) if some rows are not in the
    record (waiting in OUT's outbox, written at the next start or by `spade-ad record backfill`)."""
    if recorder is None:
        return
    listed = recorder.write_unrecorded(output)
    click.echo(recorder.summary() + (f"; their names: {listed}" if listed else ""), err=listed is not None)
    if listed is not None:
        sys.exit(1)


def _check_record(record_target: str | None) -> None:
    """Open and close the record once, before a model loads: a bad record is refused at no cost."""
    if record_target is not None:
        from .record import open_record

        open_record(record_target).close()


def ray_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--ray [ADDRESS] and --ray-workers N: run the command on Ray (`spade_ad.distributed`)."""
    command = click.option("--ray-workers", type=click.IntRange(min=1), default=2, show_default=True,
                           help="With --ray: actors, each holding the model once (one CPU each, a GPU when the "
                           "cluster has GPUs).")(command)
    return click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None,
                        metavar="[ADDRESS]", help="Run on Ray: alone (put it last), on this machine; with an "
                        "address (--ray=host:port, ray://host:port, auto), on that cluster. Inputs may then be "
                        "URIs (s3://, gs://, ...).")(command)


@click.group(no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def app() -> None:
    """SPADE anomaly detection: fit on good images, then score and localise defects in new ones."""


@app.command()
@click.argument("train_dir", type=click.Path())  # a str: a URI (s3://...) stays one with --ray
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Model file to write.")
@click.option("--holdout-good", "--validation", "validation", type=click.Path(path_type=Path), default=None,
              help="Folder of other good images (never in the gallery) to calibrate the thresholds on; the "
              "training images' leave-one-out scores are checked against them and a shift is reported.")
@click.option("--preset", type=click.Choice(list(settings_table.PRESETS)), default="default", show_default=True,
              help="Named settings (fast, default, quality, objects, paper); options below override it.")
@click.option("--roi", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Region of interest: a mask image in the images' pixels, white = inspect, black = ignore (fixtured "
              "parts only); stored in the model, the maps, scores and thresholds see only the white pixels.")
@skip_bad_option
@ray_options
@setting_options
def fit(train_dir: str, output: Path, validation: Path | None, preset: str, roi: Path | None, skip_bad: bool,
        ray_address: str | None, ray_workers: int, **options: Any) -> None:
    """Fit a model on a folder of good images and save it."""
    settings = {**settings_table.PRESETS[preset], **_given_settings(options)}
    on_skip = _report_skip if skip_bad else None
    if ray_address is not None and roi is not None:
        raise click.UsageError("--roi is not available with --ray-address yet: fit here, or set the ROI afterwards "
                               "with `spade-ad calibrate MODEL --good DIR --roi MASK`")
    if ray_address is not None:
        from .distributed import fit as fit_on_ray

        model = fit_on_ray(train_dir, address=ray_address, workers=ray_workers, validation=validation,
                           skip_bad=skip_bad, on_skip=on_skip, **settings)
    else:
        from .model import Spade

        model = Spade(**settings).fit(train_dir, validation=validation, roi=roi, skip_bad=skip_bad, on_skip=on_skip)
    model.save(output)
    click.echo(f"fitted on {len(model.train_names_)} images ({len(model.skipped_)} skipped); model: {output}")
    _echo_calibration(model)


def _echo_calibration(model: Any) -> None:
    """The thresholds in words: what they were computed from and the false-alarm rate they guarantee."""
    cal = model.calibration_
    if cal.image_threshold is None:
        click.echo(f"no thresholds ({cal.note or 'calibration=none'})")
        return
    where = {"leave_one_out": "leave-one-out scores of", "validation": "", "holdout": "held-out"}.get(cal.source, "")
    click.echo(f"image threshold {cal.image_threshold:.4g} from {where} {cal.n} good images "
               f"(false-alarm rate asked {cal.false_alarm_rate:g}, guaranteed <= {cal.guaranteed_rate:.3g}); "
               f"pixel threshold {cal.pixel_threshold:.4g} (share of good pixels flagged: "
               f"{cal.pixel_false_alarm_rate:g})".replace("  ", " "))
    if cal.note:
        click.echo(f"note: {cal.note}", err=True)
    if cal.warning:
        click.echo(f"warning: {cal.warning}", err=True)
    if getattr(cal, "suspects", None):
        from .calibration import suspects_warning

        click.echo(f"warning: {suspects_warning(cal)}", err=True)


@app.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.argument("inputs", metavar="INPUT...", nargs=-1, required=True, type=click.Path())  # URIs stay URIs
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--save-maps", is_flag=True, help="Also write raw float32 maps at the original size (maps/*.tiff), "
              "mirroring each input's path relative to its folder (the same as adding 'map' to --outputs).")
@outputs_option
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="Backbone weights file, if not where it was at fit time.")
@click.option("--device", type=_SettingType(settings_table.BY_NAME["device"]), default=None,
              help="Override the device stored in the model (cpu, cuda[:N], auto).")
@click.option("--threshold", type=float, default=None, help="Image threshold (raw score) for this run's verdicts.")
@click.option("--false-alarm-rate", "false_alarm_rate", type=float, default=None,
              help="Image threshold at this share of good parts flagged (from the model's good scores).")
@click.option("--pixel-threshold", type=float, default=None, help="Pixel threshold for this run's defect masks.")
@click.option("--pixel-false-alarm-rate", "pixel_false_alarm_rate", type=float, default=None,
              help="Pixel threshold at this share of good pixels flagged.")
@click.option("--overwrite", is_flag=True, help="Replace the results of an earlier run in the output folder.")
@click.option("--explain", is_flag=True,
              help="For each flagged image, explain/<name>.png: its strongest region next to the nearest good "
              "training image with the matched area boxed (and the match in regions.jsonl).")
@skip_bad_option
@engine_option
@record_option
@ray_options
def predict(model_path: Path, inputs: tuple[str, ...], output: Path, save_maps: bool, weights: Path | None,
            device: str | None, threshold: float | None, false_alarm_rate: float | None,
            pixel_threshold: float | None, pixel_false_alarm_rate: float | None, overwrite: bool, explain: bool,
            skip_bad: bool, engine: str | None, record_target: str | None, ray_address: str | None,
            ray_workers: int, outputs: str) -> None:
    """Score images with a model file or an exported bundle (`spade-ad export`: no torch needed): OUT/scores.csv
    (row by row, with is_anomalous when the model has a threshold), regions.jsonl, and per image the files of
    --outputs (by default an overlay and the predicted defect mask). An output folder holding an earlier run's
    scores.csv is refused unless --overwrite; inputs with the same name get numbered files (x.png, x~2.png)."""
    from .loading import open_model
    from .writers import PredictionWriter, check_output_dir, parse_outputs

    check_output_dir(output, overwrite=overwrite)  # before the model loads: a refusal costs nothing
    chosen = parse_outputs(outputs, save_maps=save_maps)
    if ray_address is not None and outputs != "default":
        raise click.UsageError("--outputs does not apply with --ray yet (the Ray workers write the default files); "
                               "leave it out")
    if record_target is not None and ray_address is not None:
        raise click.UsageError("--record does not apply with --ray (the Ray workers write Parquet); leave one out")
    _check_record(record_target)
    if ray_address is not None:
        from .distributed import predict as predict_on_ray

        run = predict_on_ray(
            model_path, inputs[0] if len(inputs) == 1 else list(inputs), output, address=ray_address,
            workers=ray_workers, save_maps=save_maps, weights=weights, device=device, engine=engine,
            threshold=threshold, false_alarm_rate=false_alarm_rate, pixel_threshold=pixel_threshold,
            pixel_false_alarm_rate=pixel_false_alarm_rate, overwrite=overwrite, explain=explain, skip_bad=skip_bad,
            on_skip=_report_skip,
        )
        click.echo(f"scored {run.count} images ({len(run.skipped)} skipped) on {run.workers} Ray workers: "
                   f"{run.scores} and {run.parquet.name}")
        return
    model = open_model(model_path, weights=weights, device=device, engine=engine)
    if any(v is not None for v in (threshold, false_alarm_rate, pixel_threshold, pixel_false_alarm_rate)):
        model.set_thresholds(image=threshold, false_alarm_rate=false_alarm_rate, pixel=pixel_threshold,
                             pixel_false_alarm_rate=pixel_false_alarm_rate)
    recorder = _recorder(record_target, model, model_path, "predict", output=output)
    writer = PredictionWriter.for_model(model, output, overwrite=overwrite, explain=explain, outputs=chosen)
    if recorder is not None:
        recorder.follow(writer)
    try:
        with writer:
            def on_skip(item: object, error: Exception) -> None:
                writer.skip(getattr(item, "name", str(item)), error)
                _report_skip(item, error)

            source = inputs[0] if len(inputs) == 1 else list(inputs)  # one folder: names relative to it
            writer.write_all(
                model.iter_predict(source, original_size=True, keep_images=True, skip_bad=skip_bad,
                                   on_skip=on_skip, explain=explain)
            )
    finally:
        if recorder is not None:  # what was predicted before a failure is recorded too
            recorder.close()
    click.echo(f"scored {writer.count} images ({len(writer.skipped)} skipped): {output / 'scores.csv'}")
    _report_unrecorded(recorder, output)


@app.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--good", type=click.Path(path_type=Path), default=None,
              help="Folder of good images (not the training images) to calibrate the thresholds on (or --record).")
@click.option("--defect", type=click.Path(path_type=Path), default=None,
              help="Folder of a few defective images: the image threshold moves to the best F1 (no rate guarantee).")
@click.option("--recall", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="With --defect: the highest image threshold that flags this share of the defects (e.g. 0.95); "
              "the recall and false-alarm rate it gives on these images are reported.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Model file to write [default: overwrite MODEL].")
@click.option("--false-alarm-rate", "false_alarm_rate", type=_SettingType(settings_table.BY_NAME["false_alarm_rate"]),
              default=None, help="Share of good parts allowed to be flagged [default: the model's].")
@click.option("--pixel-false-alarm-rate", "pixel_false_alarm_rate", default=None,
              type=_SettingType(settings_table.BY_NAME["pixel_false_alarm_rate"]),
              help="Share of good pixels allowed to be flagged [default: the model's].")
@click.option("--roi", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="A new region of interest (mask image, white = inspect) stored in the model; the thresholds are "
              "recomputed inside it.")
@skip_bad_option
@click.option("--record", "record_target", metavar="DB", default=None,
              help="Also (or instead of --good/--defect) the images labelled good and defect in this inspection "
              "record for this model (the review page's buttons). Their scores are added to the model's calibration "
              "scores, unless --replace.")
@click.option("--replace/--combine", default=None,
              help="Replace the model's calibration scores with the new good images' (the default with --good), or "
              "add the new ones to them (the default with --record, where a few labelled images would otherwise "
              "set the threshold alone).")
def calibrate(model_path: Path, good: Path | None, defect: Path | None, recall: float | None, output: Path | None,
              false_alarm_rate: float | None, pixel_false_alarm_rate: float | None, roi: Path | None, skip_bad: bool,
              record_target: str | None, replace: bool | None) -> None:
    """Rewrite a model's thresholds from other good images (and optionally a few defective ones)."""
    from .model import load

    if good is None and record_target is None:
        raise click.UsageError("give the good images: --good FOLDER, or --record DB (its images labelled good)")
    model = load(model_path)
    combine = (record_target is not None) if replace is None else not replace
    cal = model.calibration_
    before = (cal.n, cal.image_threshold, cal.guaranteed_rate)
    if record_target is not None:
        good, defect = _labelled_inputs(record_target, model, model_path, good, defect)
    rates = {k: v for k, v in (("false_alarm_rate", false_alarm_rate),
                                ("pixel_false_alarm_rate", pixel_false_alarm_rate)) if v is not None}
    model.set_params(**rates)
    if recall is not None and defect is None:
        raise click.UsageError("--recall needs --defect DIR: the defects whose share it sets")
    model.calibrate(good, defect=defect, recall=recall, skip_bad=skip_bad, on_skip=_report_skip if skip_bad else None,
                    combine=combine, roi=roi)
    target = model.save(output or model_path)
    click.echo(f"thresholds rewritten in {target}")
    cal = model.calibration_
    click.echo(f"calibration {'added to' if combine else 'REPLACED'}: {before[0]} -> {cal.n} good scores, image "
               f"threshold {_number(before[1])} -> {_number(cal.image_threshold)}, guaranteed false-alarm rate "
               f"{_number(before[2])} -> {_number(cal.guaranteed_rate)}"
               + ("" if combine else " (--combine keeps the earlier scores and adds these)"))
    _echo_calibration(model)


@app.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.argument("images", metavar="GOOD...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Model file to write (may be MODEL itself).")
@skip_bad_option
def add(model_path: Path, images: tuple[Path, ...], output: Path, skip_bad: bool) -> None:
    """Add good images (e.g. good parts that were flagged) to a fitted model without refitting the rest; the
    leave-one-out thresholds are refreshed."""
    from .model import load

    model = load(model_path)
    before = model.store_.n_images
    model.add(images[0] if len(images) == 1 else list(images), skip_bad=skip_bad,
              on_skip=_report_skip if skip_bad else None)
    model.save(output)
    click.echo(f"added {model.store_.n_images - before} good images ({model.store_.n_images} in all): {output}")
    _echo_calibration(model)


@app.command()
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
    from .export import describe, export_bundle

    if single_graph:
        from .export_graph import export_single_graph

        if format_ != "onnx":
            raise click.UsageError("--single-graph writes ONNX only: drop --format openvino")
        graph = export_single_graph(model_path, output, overwrite=overwrite, weights=weights)
        click.echo(f"wrote single graph {graph}: {graph.stat().st_size / 2**20:.1f} MB")
        return
    bundle = export_bundle(model_path, output, format=format_, overwrite=overwrite, weights=weights)
    sizes = ", ".join(f"{name} {size / 2**20:.1f} MB" for name, size in describe(bundle).items())
    click.echo(f"wrote bundle {bundle}: {sizes}")


@app.command()
@click.argument("root", type=click.Path(path_type=Path))
@click.option("-c", "--category", "categories", multiple=True, help="Category to evaluate (repeatable; default all).")
@click.option("--preset", type=click.Choice(list(settings_table.PRESETS)), default="default", show_default=True,
              help="Named settings (paper: WRN50, 256 -> 224 crop, metrics at 256); options below override it.")
@click.option("--eval-size", type=click.IntRange(min=1), default=None,
              help="Compute metrics at NxN (paper: 256) instead of the original size.")
@click.option("--pro-limit", type=click.FloatRange(min=0, max=1, min_open=True), default=0.3, show_default=True,
              help="AU-PRO integration limit (FPR).")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("eval_out"), show_default=True,
              help="Report folder.")
@click.option("--save-models", is_flag=True, help="Also save each category's model.")
@click.option("--save-maps", is_flag=True,
              help="Write raw maps in the official MVTec AD layout: maps/<category>/test/<defect>/<id>.tiff.")
@click.option("--plots/--no-plots", default=True, show_default=True, help="Write the plots.")
@setting_options
def evaluate(root: Path, categories: tuple[str, ...], preset: str, eval_size: int | None, pro_limit: float, out: Path,
             save_models: bool, save_maps: bool, plots: bool, **options: Any) -> None:
    """Fit and score each category; print a table against the paper; write metrics.json/csv, report.md, plots."""
    from .evaluation import evaluate as run_evaluation
    from .evaluation import format_table

    report = run_evaluation(
        root, categories=list(categories) or None,
        settings={**settings_table.PRESETS[preset], **_given_settings(options)},
        eval_size=eval_size if eval_size is not None else settings_table.PRESET_EVAL_SIZE[preset],
        pro_limit=pro_limit, out_dir=out, save_models=save_models, plots=plots, save_maps=save_maps,
        log=lambda message: click.echo(message, err=True),
    )
    click.echo(format_table(report))
    click.echo(f"metrics at {report['resolution']}; report: {out / 'report.md'}")


@app.command()
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("demo_out"), show_default=True,
              help="Output folder.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the generated data and the model.")
@click.option("--device", type=_SettingType(settings_table.BY_NAME["device"]), default="auto", show_default=True,
              help="auto, cpu or cuda[:N].")
def demo(output: Path, seed: int, device: str) -> None:
    """The built-in job: make a synthetic product dataset, fit, predict, print AUROCs, write overlays."""
    from .demo import run_demo

    result = run_demo(output, seed=seed, device=device, log=click.echo)
    click.echo(
        f"image AUROC {result['image_auroc']:.3f}  pixel AUROC {result['pixel_auroc']:.3f}  "
        f"({result['n_test']:.0f} test images; overlays in {output / 'predictions' / 'overlays'})"
    )


@app.command()
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
@click.option("--device", type=_SettingType(settings_table.BY_NAME["device"]), default=None,
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
    from .service import ServiceSettings, run_server

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
        from .runtime.bundle import is_bundle

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


@app.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.argument("folder", metavar="DIR", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Output folder (scores.csv, overlays, ... appended across runs; watch-state.jsonl).")
@record_option
@click.option("--record-files", type=click.Path(path_type=Path), default=None,
              help="With --record: folder for the kept copy of every image scored (by its SHA-256: what the record "
              "shows and learns from is the image inspected, even when a file name is reused) [default: DB.files "
              "beside a SQLite record, ./spade-ad-record-files for a URL].")
@click.option("--keep-days", type=click.FloatRange(min=0, min_open=True), default=None,
              help="With --record: remove kept images older than this many days [default: keep all].")
@click.option("--keep-gb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="With --record: remove the oldest kept images beyond this many GB [default: no limit].")
@click.option("--move-to", type=click.Path(path_type=Path), default=None,
              help="Move each scored file to DIR/good, DIR/defect or DIR/error (its folder below DIR kept).")
@click.option("--poll", is_flag=True, help="Only scan the folder (network shares, where file events do not arrive).")
@click.option("--poll-interval", type=click.FloatRange(min=0.01), default=0.5, show_default=True,
              help="Seconds between scans of the folder.")
@click.option("--settle", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="A file not renamed into place is complete once its size has not changed for this many seconds.")
@click.option("--save-maps", is_flag=True, help="Also write raw float32 maps (maps/*.tiff).")
@outputs_option
@click.option("--explain", is_flag=True, help="For each flagged image, explain/<name>.png (see predict --explain).")
@click.option("--max-images", type=click.IntRange(min=1), default=None,
              help="Stop after this many files (scored or refused).")
@publish_option
@click.option("--idle-exit", type=click.FloatRange(min=0), default=None,
              help="Stop once nothing new has arrived for this many seconds.")
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="Backbone weights file, if not where it was at fit time.")
@click.option("--device", type=_SettingType(settings_table.BY_NAME["device"]), default=None,
              help="Override the device stored in the model (cpu, cuda[:N], auto).")
@engine_option
def watch(model_path: Path, folder: Path, output: Path, record_target: str | None, record_files: Path | None,
          keep_days: float | None, keep_gb: float | None, move_to: Path | None, poll: bool,
          poll_interval: float, settle: float, save_maps: bool, outputs: str, explain: bool, max_images: int | None,
          idle_exit: float | None, weights: Path | None, device: str | None, engine: str | None,
          publish: tuple[str, ...] = ()) -> None:
    """Score images as they appear in a folder (a camera's), each once it is complete, in arrival order, exactly
    once across restarts (the record, or OUT/watch-state.jsonl, knows what was scored). Ctrl-C or SIGTERM finishes
    the current image and exits; a broken file is logged and recorded as an error, and watching goes on."""
    from .loading import open_model
    from .watch import Watcher

    if not folder.is_dir():
        raise click.BadParameter(f"{folder} is not a folder; give the folder the camera writes into",
                                 param_hint="DIR")
    from .writers import parse_outputs

    chosen = parse_outputs(outputs, save_maps=save_maps)
    if record_target is None and (record_files, keep_days, keep_gb) != (None, None, None):
        raise click.UsageError("--record-files, --keep-days and --keep-gb need --record DB")
    _check_record(record_target)
    evidence = None
    if record_target is not None:
        from .record import EvidenceStore, default_files_dir

        evidence = EvidenceStore(record_files or default_files_dir(record_target), max_days=keep_days,
                                 max_bytes=None if keep_gb is None else int(keep_gb * 1e9))
    model = open_model(model_path, weights=weights, device=device, engine=engine)
    model.set_params(progress=False)
    recorder = _recorder(record_target, model, model_path, "watch", output=output)
    publisher = None
    if publish:  # the outboxes live in OUT
        from .publish import Publishers

        publisher = Publishers.for_model(publish, output, model, model_path, log=_stamped)
    try:
        watcher = Watcher(model, folder, output, recorder=recorder, move_to=move_to, poll=poll,
                          poll_interval=poll_interval, settle=settle, outputs=chosen, explain=explain,
                          max_images=max_images, idle_exit=idle_exit, evidence=evidence, publisher=publisher,
                          log=_stamped)
        result = watcher.run()
    finally:
        if publisher is not None:
            publisher.close()  # up to 10 s more of sending; what is left waits in OUT for the next run
    click.echo(f"scored {result.scored} images ({result.flagged} flagged, {result.errors} unreadable, "
               f"{result.already} already scored before): {output / 'scores.csv'}")
    _report_unrecorded(recorder, output)


@app.command()
@click.argument("record_target", metavar="DB")
@click.option("--model", "model_id", default=None,
              help="Model id (or its first characters) or name [default: the newest model with inspections].")
@click.option("--window", type=click.IntRange(min=1), default=500, show_default=True,
              help="The last this many inspections of the model.")
@click.option("--alpha", type=click.FloatRange(min=0, max=1, min_open=True, max_open=True), default=0.01,
              show_default=True, help="Significance level of both tests.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the figures as JSON on stdout (the verdict line, also in the JSON, goes to stderr).")
def drift(record_target: str, model_id: str | None, window: int, alpha: float, as_json: bool) -> None:
    """Has the line drifted? The flag rate of the last WINDOW inspections against the calibrated false-alarm rate
    (beta-binomial test), and their good-looking scores against the model's calibration scores (Mann-Whitney);
    inspections labelled defect (real defects, not false alarms) are left out and counted. One line; exit code 1
    when drifted, 0 when not, 2 for a bad record or model. The record is opened read-only (a read-only file, folder
    or mount is fine)."""
    import json

    from .drift import check_drift
    from .record import open_record

    with open_record(record_target, readonly=True) as record:
        report = check_drift(record, model_id, window=window, alpha=alpha)
    click.echo(report.verdict, err=as_json)  # --json: stdout holds the JSON only, for scripts
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    if report.drifted:
        sys.exit(1)


@app.group("record")
def record_group() -> None:
    """The inspection record: write back what waited in an outbox (backfill), and read the record."""


@record_group.command("backfill")
@click.argument("record_target", metavar="DB")
@click.argument("outbox", metavar="OUTBOX", type=click.Path(path_type=Path))
def record_backfill(record_target: str, outbox: Path) -> None:
    """Write the inspections that waited in OUTBOX (OUT/record-outbox.jsonl of `watch` or `predict`, left when the
    record did not answer) into the record DB, each once (a row the record holds already is skipped), then remove
    OUTBOX."""
    from .record import RecordError, open_record
    from .recording import backfill

    if not outbox.is_file():
        raise RecordError(f"outbox {outbox} does not exist (nothing waits, or it was written already); give the "
                          f"record-outbox.jsonl that watch or predict named")
    with open_record(record_target) as record:
        count = backfill(record, outbox)
    click.echo(f"wrote {count} inspection{'s' if count != 1 else ''} from {outbox} into {record.shown}")


def _selection_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The filters of `record list` and `record export` (`spade_ad.record.export.Selection`)."""
    from_to = "ISO date or time, UTC unless an offset is given (2026-12-03, 2026-12-03T14:00, ...+01:00)"
    for option in reversed([
        click.option("--verdict", type=click.Choice(["defect", "good", "error", "none"]), default=None,
                     help="Only this verdict (error: files that could not be scored; none: no threshold)."),
        click.option("--label", type=click.Choice(["good", "defect", "none"]), default=None,
                     help="Only this latest review label (none: not labelled)."),
        click.option("--since", default=None, metavar="WHEN", help=f"Inspected at or after this {from_to}."),
        click.option("--until", default=None, metavar="WHEN", help=f"Inspected before this {from_to}."),
        click.option("--model", "model_id", default=None, help="Only this model: id, its first characters, or name."),
    ]):
        command = option(command)
    return command


def _selection(verdict: str | None, label: str | None, since: str | None, until: str | None, model_id: str | None,
               limit: int | None = None, newest_first: bool = False) -> Any:
    from .record.export import Selection, parse_time

    return Selection(verdict=verdict, label=label, since_ms=parse_time(since, "--since"),
                     until_ms=parse_time(until, "--until"), model=model_id, limit=limit, newest_first=newest_first)


@record_group.command("list")
@click.argument("record_target", metavar="DB")
@_selection_options
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True,
              help="The newest this many inspections.")
@click.option("--json", "as_json", is_flag=True, help="Every column as JSON (one list) instead of the table.")
def record_list(record_target: str, verdict: str | None, label: str | None, since: str | None, until: str | None,
                model_id: str | None, limit: int, as_json: bool) -> None:
    """List the newest inspections of the record DB (read-only), newest first: a table, or --json."""
    import json

    from .record import open_record
    from .record.export import format_table, iter_rows, plain

    selection = _selection(verdict, label, since, until, model_id, limit=limit, newest_first=True)
    with open_record(record_target, readonly=True) as record:
        rows = list(iter_rows(record, selection))
    if as_json:
        click.echo(json.dumps([plain(row) for row in rows], indent=2))
    elif rows:
        click.echo(format_table(rows))
    else:
        click.echo("no inspection matches", err=True)


@record_group.command("export")
@click.argument("record_target", metavar="DB")
@click.option("--format", "format_", type=click.Choice(["csv", "parquet"]), default="csv", show_default=True,
              help="csv (text, regions as JSON) or parquet (typed columns; needs pyarrow).")
@_selection_options
@click.option("-o", "--output", required=True, metavar="FILE",
              help="File to write (replaced when it exists; written whole or not at all); - : stdout (csv).")
def record_export(record_target: str, format_: str, verdict: str | None, label: str | None, since: str | None,
                  until: str | None, model_id: str | None, output: str) -> None:
    """Export the inspections of the record DB (read-only), oldest first, every column (times also in ISO 8601
    UTC: at, label_at), to a CSV or Parquet file."""
    from .record import open_record
    from .record.export import write_csv, write_parquet

    if format_ == "parquet" and output == "-":
        raise click.UsageError("--format parquet needs a file (-o FILE), not stdout")
    selection = _selection(verdict, label, since, until, model_id)
    with open_record(record_target, readonly=True) as record:
        write = write_parquet if format_ == "parquet" else write_csv
        count = write(record, output, selection)
    click.echo(f"exported {count} inspection{'s' if count != 1 else ''} to {output}", err=output == "-")


def _labelled_inputs(record_target: str, model: Any, model_path: Path, good: Path | None,
                     defect: Path | None) -> tuple[Any, Any]:
    """The --good/--defect inputs of `calibrate` with the record's labelled images added."""
    from .record import RecordError, open_record
    from .recording import labelled_images

    with open_record(record_target, readonly=True) as record:  # only reads: a read-only record is fine
        goods, defects, refused = labelled_images(record, model, model_path)
    for line in refused:
        click.echo(f"left out: {line}", err=True)
    if not goods and good is None:
        raise RecordError(f"record {record_target} holds no usable image labelled good for {model_path.name} (that "
                          f"is not already a training image, and whose image is the one inspected); label some on "
                          f"the review page, or give --good FOLDER")
    click.echo(f"from the record: {len(goods)} good and {len(defects)} defect images"
               + (f" ({len(refused)} labelled inspections left out: their image changed or is gone)" if refused
                  else ""))
    good_inputs = ([good] if good is not None else []) + goods
    defect_inputs = ([defect] if defect is not None else []) + defects
    return good_inputs, defect_inputs or None


def _number(value: float | None) -> str:
    return "none" if value is None else f"{value:.4g}"


def _setting_message(exc: SettingError) -> str:
    """A SettingError in the CLI's words: the option's name rather than the library's setting name."""
    setting = settings_table.BY_NAME.get(exc.name)
    if setting is None:
        return str(exc)
    shown = "" if exc.value is None else f" (got {exc.value!r})"
    return f"{setting.option} {exc.problem}{shown}; allowed: {exc.allowed}"


#: The optional extra that brings each heavy dependency (pyproject.toml), for the message when it is missing.
_EXTRAS = {"torch": "fit", "torchvision": "fit", "timm": "fit", "sklearn": "fit", "onnxruntime": "runtime",
           "onnx": "export", "onnxscript": "export", "openvino": "openvino", "fastapi": "serve", "uvicorn": "serve",
           "ray": "ray"}


def main(argv: list[str] | None = None) -> None:
    """Entry point: usage errors and bad input become one line on stderr and exit code 2, I/O faults one line and
    exit code 1; never a traceback."""
    try:
        _run(argv)
    finally:
        if argv is None:  # the process ends here: its last garbage collection would walk every object torch and
            gc.freeze()   # timm made, 1.2 s of a 5 s run (docs/outputs.md); freezing them skips that walk only


def _run(argv: list[str] | None) -> None:
    try:
        app.main(args=argv, prog_name="spade-ad", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:
        where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        click.echo(f"error: {exc.format_message()}{where}", err=True)
        sys.exit(2)
    except SettingError as exc:
        click.echo(f"error: {_setting_message(exc)}", err=True)
        sys.exit(2)
    except SpadeError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except ModuleNotFoundError as exc:  # a light install (runtime extra only) asked for the torch path
        extra = _EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        click.echo(f"error: this needs {exc.name}, which is not installed: pip install 'spade-ad[{extra}]' "
                   f"(or score an exported bundle: `spade-ad predict BUNDLE`)", err=True)
        sys.exit(2)
    except OSError as exc:
        target = f" {exc.filename}" if exc.filename else ""
        click.echo(f"error: cannot access{target}: {exc.strerror or exc}", err=True)
        sys.exit(1)
