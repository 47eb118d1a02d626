"""The commands of the inspection line: watch (a camera folder), drift and record (backfill, list, export).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ... import settings as settings_table
from .options import (
    SettingType,
    check_record,
    engine_option,
    open_recorder,
    outputs_option,
    publish_option,
    record_option,
    report_unrecorded,
    stamped,
)


@click.command()
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
@click.option("--device", type=SettingType(settings_table.BY_NAME["device"]), default=None,
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
    from ...estimators.opening import open_model
    from ..watch import Watcher

    if not folder.is_dir():
        raise click.BadParameter(f"{folder} is not a folder; give the folder the camera writes into",
                                 param_hint="DIR")
    from ...outputs.image_files import parse_outputs

    chosen = parse_outputs(outputs, save_maps=save_maps)
    if record_target is None and (record_files, keep_days, keep_gb) != (None, None, None):
        raise click.UsageError("--record-files, --keep-days and --keep-gb need --record DB")
    check_record(record_target)
    evidence = None
    if record_target is not None:
        from ...record import EvidenceStore, default_files_dir

        evidence = EvidenceStore(record_files or default_files_dir(record_target), max_days=keep_days,
                                 max_bytes=None if keep_gb is None else int(keep_gb * 1e9))
    model = open_model(model_path, weights=weights, device=device, engine=engine)
    model.set_params(progress=False)
    recorder = open_recorder(record_target, model, model_path, "watch", output=output)
    publisher = None
    if publish:  # the outboxes live in OUT
        from ..publish import Publishers

        publisher = Publishers.for_model(publish, output, model, model_path, log=stamped)
    try:
        watcher = Watcher(model, folder, output, recorder=recorder, move_to=move_to, poll=poll,
                          poll_interval=poll_interval, settle=settle, outputs=chosen, explain=explain,
                          max_images=max_images, idle_exit=idle_exit, evidence=evidence, publisher=publisher,
                          log=stamped)
        result = watcher.run()
    finally:
        if publisher is not None:
            publisher.close()  # up to 10 s more of sending; what is left waits in OUT for the next run
    click.echo(f"scored {result.scored} images ({result.flagged} flagged, {result.errors} unreadable, "
               f"{result.already} already scored before): {output / 'scores.csv'}")
    report_unrecorded(recorder, output)


@click.command()
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

    from ...record import open_record
    from ...record.drift import check_drift

    with open_record(record_target, readonly=True) as record:
        report = check_drift(record, model_id, window=window, alpha=alpha)
    click.echo(report.verdict, err=as_json)  # --json: stdout holds the JSON only, for scripts
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    if report.drifted:
        sys.exit(1)


@click.group("record")
def record_group() -> None:
    """The inspection record: write back what waited in an outbox (backfill), and read the record."""


@record_group.command("backfill")
@click.argument("record_target", metavar="DB")
@click.argument("outbox", metavar="OUTBOX", type=click.Path(path_type=Path))
def record_backfill(record_target: str, outbox: Path) -> None:
    """Write the inspections that waited in OUTBOX (OUT/record-outbox.jsonl of `watch` or `predict`, left when the
    record did not answer) into the record DB, each once (a row the record holds already is skipped), then remove
    OUTBOX."""
    from ...record import RecordError, open_record
    from ...record.recorder import backfill

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
    from ...record.export import Selection, parse_time

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

    from ...record import open_record
    from ...record.export import format_table, iter_rows, plain

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
    from ...record import open_record
    from ...record.export import write_csv, write_parquet

    if format_ == "parquet" and output == "-":
        raise click.UsageError("--format parquet needs a file (-o FILE), not stdout")
    selection = _selection(verdict, label, since, until, model_id)
    with open_record(record_target, readonly=True) as record:
        write = write_parquet if format_ == "parquet" else write_csv
        count = write(record, output, selection)
    click.echo(f"exported {count} inspection{'s' if count != 1 else ''} to {output}", err=output == "-")
