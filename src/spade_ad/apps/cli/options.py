"""The command line's shared parts: setting options generated from the settings table, the options
several commands share (--skip-bad, --engine, --outputs, --record, --publish, --ray), and the helpers behind them
(the recorder of a run, stamped log lines).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ... import settings as settings_table
from ...errors import SettingError


class SettingType(click.ParamType):
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
            setting.option, setting.name, type=SettingType(setting), default=None, metavar=setting.kind.upper(),
            help=f"{setting.help} [default: {setting.display_default()}]",
        )(command)
    return command


def given_settings(options: dict[str, Any]) -> dict[str, Any]:
    """The model settings among a command's options that were given on the command line."""
    return {name: value for name, value in options.items() if name in settings_table.BY_NAME and value is not None}


def report_skip(item: object, error: Exception) -> None:
    click.echo(f"skipped: {error}", err=True)


skip_bad_option = click.option("--skip-bad", is_flag=True, help="Skip unreadable images (listed on stderr and in the "
                               "output) instead of stopping at the first one.")


# The engines of `spade_ad.estimators.runtime.engines.ENGINES`, spelled out: importing it would load numpy for `--help`.
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


def check_publish(_ctx: click.Context, _param: click.Parameter, urls: tuple[str, ...]) -> tuple[str, ...]:
    # --publish URLs are checked before anything loads (a bad one: a one-line usage error)
    if not urls:
        return urls
    from ..publish import PublishError, parse_target

    for url in urls:
        try:
            parse_target(url)
        except PublishError as exc:
            raise click.BadParameter(str(exc).removeprefix("--publish "), param_hint="--publish") from None
    return urls


publish_option = click.option(
    "--publish", "publish", multiple=True, metavar="URL", callback=check_publish,
    help="Publish each inspection to an MQTT broker (mqtt://host[:port]/topic, QoS 1), a webhook (http(s)://...) or "
    "an OPC UA server of the latest one (opc.tcp://host:port), through an outbox that survives outages and restarts "
    "(repeatable; pip install 'spade-ad[publish]'; docs/publish.md).")


def stamped(line: str) -> None:
    """A line on stderr with the local time: what a long-running command says, read later in a log."""
    import datetime as dt

    click.echo(f"{dt.datetime.now().astimezone().isoformat(timespec='seconds')} {line}", err=True)


def open_recorder(record_target: str | None, model: Any, model_path: Path | None, origin: str,
              name: str | None = None, output: Path | None = None) -> Any:
    """A `spade_ad.record.recorder.Recorder` on the record at `record_target` (None without one), whose rows wait in
    OUTPUT/record-outbox.jsonl while the record does not answer; a problem with the record at the start is a
    `RecordError` (one line, exit 2)."""
    if record_target is None:
        return None
    from ...record import open_record
    from ...record.recorder import OUTBOX_FILE, Recorder

    outbox = None
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        outbox = output / OUTBOX_FILE
    return Recorder(open_record(record_target), model, model_path, origin=origin, name=name, outbox=outbox,
                    on_failure=lambda message: stamped(f"warning: {message}"), on_resume=stamped)


def report_unrecorded(recorder: Any, output: Path) -> None:
    """After a run with --record: how much was recorded; exit 1 (names listed in OUT) if some rows are not in the
    record (waiting in OUT's outbox, written at the next start or by `spade-ad record backfill`)."""
    if recorder is None:
        return
    listed = recorder.write_unrecorded(output)
    click.echo(recorder.summary() + (f"; their names: {listed}" if listed else ""), err=listed is not None)
    if listed is not None:
        sys.exit(1)


def check_record(record_target: str | None) -> None:
    """Open and close the record once, before a model loads: a bad record is refused at no cost."""
    if record_target is not None:
        from ...record import open_record

        open_record(record_target).close()


def ray_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--ray [ADDRESS] and --ray-workers N: run the command on Ray (`spade_ad.apps.distributed`)."""
    command = click.option("--ray-workers", type=click.IntRange(min=1), default=2, show_default=True,
                           help="With --ray: actors, each holding the model once (one CPU each, a GPU when the "
                           "cluster has GPUs).")(command)
    return click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None,
                        metavar="[ADDRESS]", help="Run on Ray: alone (put it last), on this machine; with an "
                        "address (--ray=host:port, ray://host:port, auto), on that cluster. Inputs may then be "
                        "URIs (s3://, gs://, ...).")(command)


def number(value: float | None) -> str:
    return "none" if value is None else f"{value:.4g}"
