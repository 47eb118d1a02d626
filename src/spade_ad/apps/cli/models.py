"""The commands that make and use a model: fit, add, calibrate, predict, evaluate and demo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ... import settings as settings_table
from .options import (
    SettingType,
    check_record,
    engine_option,
    given_settings,
    number,
    open_recorder,
    outputs_option,
    ray_options,
    record_option,
    report_skip,
    report_unrecorded,
    setting_options,
    skip_bad_option,
)


@click.command()
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
@click.option("--exclude", "exclude", metavar="PATTERN", multiple=True,
              help="Leave out the training images whose name or file name matches (shell pattern, repeatable): "
              "the ones fit names as scoring like defects, without moving files.")
@click.option("--defect", type=click.Path(path_type=Path, exists=True), default=None,
              help="A few labelled defective images (folder or file): they choose the fused score's part weights "
              "(map_weight, coarse_weight) when they clearly support another share; the thresholds keep the "
              "false-alarm rates.")
@skip_bad_option
@ray_options
@setting_options
def fit(train_dir: str, output: Path, validation: Path | None, preset: str, roi: Path | None, exclude: tuple[str, ...],
        defect: Path | None, skip_bad: bool, ray_address: str | None, ray_workers: int, **options: Any) -> None:
    """Fit a model on a folder of good images and save it."""
    settings = {**settings_table.PRESETS[preset], **given_settings(options)}
    on_skip = report_skip if skip_bad else None
    if ray_address is not None and roi is not None:
        raise click.UsageError("--roi is not available with --ray-address yet: fit here, or set the ROI afterwards "
                               "with `spade-ad calibrate MODEL --good DIR --roi MASK`")
    if ray_address is not None and exclude:
        raise click.UsageError("--exclude is not available with --ray-address yet: remove the images from the "
                               "training folder, or fit here")
    training: Any = train_dir
    if exclude:
        from ...data.inputs import collect_images, exclude_images

        training, left_out = exclude_images(collect_images(train_dir), exclude)
        click.echo(f"left out {len(left_out)} training images: {', '.join(item.name for item in left_out)}")
    if ray_address is not None:
        from ..distributed import fit as fit_on_ray

        model = fit_on_ray(train_dir, address=ray_address, workers=ray_workers, validation=validation,
                           skip_bad=skip_bad, on_skip=on_skip, defect=defect, **settings)
    else:
        from ...estimators.spade import Spade

        model = Spade(**settings).fit(training, validation=validation, roi=roi, skip_bad=skip_bad, on_skip=on_skip,
                                      defect=defect)
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
    sessions = getattr(model, "sessions_", None)
    if cal.source == "leave_one_out" and sessions is not None:
        where = "leave-one-session-out scores of"
        click.echo(sessions.describe())
    click.echo(f"image threshold {cal.image_threshold:.4g} from {where} {cal.n} good images "
               f"(false-alarm rate asked {cal.false_alarm_rate:g}, guaranteed <= {cal.guaranteed_rate:.3g}); "
               f"pixel threshold {cal.pixel_threshold:.4g} (share of good pixels flagged: "
               f"{cal.pixel_false_alarm_rate:g})".replace("  ", " "))
    if cal.note:
        click.echo(f"note: {cal.note}", err=True)
    from ...core.calibration import suspects_warning

    _warn(cal.warning)
    _warn(suspects_warning(cal))  # "" when fit named no training image


@click.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.argument("inputs", metavar="INPUT...", nargs=-1, required=True, type=click.Path())  # URIs stay URIs
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--save-maps", is_flag=True, help="Also write raw float32 maps at the original size (maps/*.tiff), "
              "mirroring each input's path relative to its folder (the same as adding 'map' to --outputs).")
@outputs_option
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="Backbone weights file, if not where it was at fit time.")
@click.option("--device", type=SettingType(settings_table.BY_NAME["device"]), default=None,
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
    from ...core.shift import ShiftMonitor
    from ...estimators.opening import open_model
    from ...outputs.image_files import parse_outputs
    from ...outputs.writers import PredictionWriter, check_output_dir

    check_output_dir(output, overwrite=overwrite)  # before the model loads: a refusal costs nothing
    chosen = parse_outputs(outputs, save_maps=save_maps)
    if ray_address is not None and outputs != "default":
        raise click.UsageError("--outputs does not apply with --ray yet (the Ray workers write the default files); "
                               "leave it out")
    if record_target is not None and ray_address is not None:
        raise click.UsageError("--record does not apply with --ray (the Ray workers write Parquet); leave one out")
    check_record(record_target)
    if ray_address is not None:
        from ..distributed import predict as predict_on_ray

        run = predict_on_ray(
            model_path, inputs[0] if len(inputs) == 1 else list(inputs), output, address=ray_address,
            workers=ray_workers, save_maps=save_maps, weights=weights, device=device, engine=engine,
            threshold=threshold, false_alarm_rate=false_alarm_rate, pixel_threshold=pixel_threshold,
            pixel_false_alarm_rate=pixel_false_alarm_rate, overwrite=overwrite, explain=explain, skip_bad=skip_bad,
            on_skip=report_skip,
        )
        click.echo(f"scored {run.count} images ({len(run.skipped)} skipped) on {run.workers} Ray workers: "
                   f"{run.scores} and {run.parquet.name}")
        return
    model = open_model(model_path, weights=weights, device=device, engine=engine)
    if any(v is not None for v in (threshold, false_alarm_rate, pixel_threshold, pixel_false_alarm_rate)):
        model.set_thresholds(image=threshold, false_alarm_rate=false_alarm_rate, pixel=pixel_threshold,
                             pixel_false_alarm_rate=pixel_false_alarm_rate)
    recorder = open_recorder(record_target, model, model_path, "predict", output=output)
    writer = PredictionWriter.for_model(model, output, overwrite=overwrite, explain=explain, outputs=chosen)
    if recorder is not None:
        recorder.follow(writer)
    shift = ShiftMonitor()  # do these images score above the good images the threshold came from?
    writer.subscribe(lambda prediction, _: _warn(shift.add(model.calibration_, prediction.score)))
    try:
        with writer:
            def on_skip(item: object, error: Exception) -> None:
                writer.skip(getattr(item, "name", str(item)), error)
                report_skip(item, error)

            source = inputs[0] if len(inputs) == 1 else list(inputs)  # one folder: names relative to it
            writer.write_all(
                model.iter_predict(source, original_size=True, keep_images=True, skip_bad=skip_bad,
                                   on_skip=on_skip, explain=explain)
            )
    finally:
        if recorder is not None:  # what was predicted before a failure is recorded too
            recorder.close()
    _warn(shift.finish(model.calibration_))
    click.echo(f"scored {writer.count} images ({len(writer.skipped)} skipped): {output / 'scores.csv'}")
    report_unrecorded(recorder, output)


def _warn(warning: str | None) -> None:
    if warning:
        click.echo(f"warning: {warning}", err=True)


@click.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--good", type=click.Path(path_type=Path), default=None,
              help="Folder of good images (not the training images) to calibrate the thresholds on (or --record).")
@click.option("--defect", type=click.Path(path_type=Path), default=None,
              help="Folder of a few defective images: the image threshold moves to the best F1 (no rate guarantee; "
              "see --keep-rate), and the part weights to the share these defects clearly support (see "
              "--keep-weights).")
@click.option("--recall", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="With --defect: the highest image threshold that flags this share of the defects (e.g. 0.95); "
              "the recall and false-alarm rate it gives on these images are reported.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Model file to write [default: overwrite MODEL].")
@click.option("--false-alarm-rate", "false_alarm_rate", type=SettingType(settings_table.BY_NAME["false_alarm_rate"]),
              default=None, help="Share of good parts allowed to be flagged [default: the model's].")
@click.option("--pixel-false-alarm-rate", "pixel_false_alarm_rate", default=None,
              type=SettingType(settings_table.BY_NAME["pixel_false_alarm_rate"]),
              help="Share of good pixels allowed to be flagged [default: the model's].")
@click.option("--roi", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="A new region of interest (mask image, white = inspect) stored in the model; the thresholds are "
              "recomputed inside it.")
@skip_bad_option
@click.option("--record", "record_target", metavar="DB", default=None,
              help="Also (or instead of --good/--defect) the images labelled good and defect in this inspection "
              "record for this model (the review page's buttons). Their scores are added to the model's calibration "
              "scores, unless --replace.")
@click.option("--keep-rate", is_flag=True, default=False,
              help="With --defect or --record: the defects choose the part weights only; the image threshold stays "
              "at the false-alarm rate (guaranteed) instead of moving to the best F1 on them.")
@click.option("--keep-weights", is_flag=True, default=False,
              help="With --defect: keep the model's part weights (map_weight, coarse_weight) instead of moving them "
              "to the share these defects clearly support.")
@click.option("--replace/--combine", default=None,
              help="Replace the model's calibration scores with the new good images' (the default with --good), or "
              "add the new ones to them (the default with --record, where a few labelled images would otherwise "
              "set the threshold alone).")
def calibrate(model_path: Path, good: Path | None, defect: Path | None, recall: float | None, output: Path | None,
              false_alarm_rate: float | None, pixel_false_alarm_rate: float | None, roi: Path | None, skip_bad: bool,
              keep_rate: bool, keep_weights: bool, record_target: str | None, replace: bool | None) -> None:
    """Rewrite a model's thresholds from other good images (and optionally a few defective ones)."""
    from ...estimators.spade_file import load

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
    if recall is not None and keep_rate:
        raise click.UsageError("--recall sets the image threshold and --keep-rate keeps it at the false-alarm rate: "
                               "give one of them")
    model.calibrate(good, defect=defect, recall=recall, skip_bad=skip_bad, on_skip=report_skip if skip_bad else None,
                    combine=combine, roi=roi, choose_weights=not keep_weights, keep_rate=keep_rate)
    target = model.save(output or model_path)
    click.echo(f"thresholds rewritten in {target}")
    cal = model.calibration_
    repeated = cal.check.get("repeated", 0)
    click.echo(f"calibration {'added to' if combine else 'REPLACED'}: {before[0]} -> {cal.n} good scores"
               + (f" ({repeated} good {'image was' if repeated == 1 else 'images were'} counted already: not counted "
                  f"twice)" if repeated else "")
               + f", image threshold {number(before[1])} -> {number(cal.image_threshold)}, guaranteed false-alarm "
               f"rate {number(before[2])} -> {number(cal.guaranteed_rate)}"
               + ("" if combine else " (--combine keeps the earlier scores and adds these)"))
    _echo_calibration(model)


@click.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.argument("images", metavar="GOOD...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Model file to write (may be MODEL itself).")
@skip_bad_option
def add(model_path: Path, images: tuple[Path, ...], output: Path, skip_bad: bool) -> None:
    """Add good images (e.g. good parts that were flagged) to a fitted model without refitting the rest; the
    leave-one-out thresholds are refreshed."""
    from ...estimators.spade_file import load

    model = load(model_path)
    before = model.store_.n_images
    model.add(images[0] if len(images) == 1 else list(images), skip_bad=skip_bad,
              on_skip=report_skip if skip_bad else None)
    model.save(output)
    click.echo(f"added {model.store_.n_images - before} good images ({model.store_.n_images} in all): {output}")
    _echo_calibration(model)


@click.command()
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
    from ..evaluation import evaluate as run_evaluation
    from ..evaluation import format_table

    report = run_evaluation(
        root, categories=list(categories) or None,
        settings={**settings_table.PRESETS[preset], **given_settings(options)},
        eval_size=eval_size if eval_size is not None else settings_table.PRESET_EVAL_SIZE[preset],
        pro_limit=pro_limit, out_dir=out, save_models=save_models, plots=plots, save_maps=save_maps,
        log=lambda message: click.echo(message, err=True),
    )
    click.echo(format_table(report))
    click.echo(f"metrics at {report['resolution']}; report: {out / 'report.md'}")


@click.command()
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("demo_out"), show_default=True,
              help="Output folder.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the generated data and the model.")
@click.option("--device", type=SettingType(settings_table.BY_NAME["device"]), default="auto", show_default=True,
              help="auto, cpu or cuda[:N].")
def demo(output: Path, seed: int, device: str) -> None:
    """The built-in job: make a synthetic product dataset, fit, predict, print AUROCs, write overlays."""
    from ..demo import run_demo

    result = run_demo(output, seed=seed, device=device, log=click.echo)
    click.echo(
        f"image AUROC {result['image_auroc']:.3f}  pixel AUROC {result['pixel_auroc']:.3f}  "
        f"({result['n_test']:.0f} test images; overlays in {output / 'predictions' / 'overlays'})"
    )


def _labelled_inputs(record_target: str, model: Any, model_path: Path, good: Path | None,
                     defect: Path | None) -> tuple[Any, Any]:
    """The --good/--defect inputs of `calibrate` with the record's labelled images added."""
    from ...record import RecordError, open_record
    from ...record.recorder import labelled_images

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
