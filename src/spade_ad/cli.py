"""Command-line interface: a thin layer over the library (`spade_ad.Spade`, `spade_ad.load`, the writers)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from .backbones import available_backbones
from .errors import ImageReadError, SpadeError

app = typer.Typer(
    help="SPADE anomaly detection: fit on good images, then score and localise defects in new ones.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Model settings shared by `fit` and `evaluate`. Unset options keep the library's defaults (or the preset's).
BackboneOpt = Annotated[
    str | None,
    typer.Option(help=f"Backbone [default: efficientnet_lite0]: {', '.join(available_backbones())}, "
                 "or any timm name with --weights."),
]
WeightsOpt = Annotated[
    Path | None, typer.Option(help="Local backbone weights file (.pth/.safetensors state_dict); needed offline.")
]
LayersOpt = Annotated[
    str | None, typer.Option(help="Pyramid levels, stage indices (1=stride 4, 2=8, 3=16) [default: 2,3].")
]
KImageOpt = Annotated[int | None, typer.Option(help="Neighbours of the global kNN image score [default: 3].")]
KGalleryOpt = Annotated[int | None, typer.Option(help="Nearest training images in the pixel gallery [default: 50].")]
KappaOpt = Annotated[int | None, typer.Option(help="Gallery neighbours averaged per pixel [default: 1].")]
PatchOpt = Annotated[int | None, typer.Option(help="Average features over NxN neighbourhoods first [default: 1].")]
SearchRadiusOpt = Annotated[
    int | None, typer.Option(help="Search only gallery features within N cells of each position (aligned products).")
]
FusionOpt = Annotated[str | None, typer.Option(help="Pyramid fusion: mean or concat [default: mean].")]
DistanceOpt = Annotated[str | None, typer.Option(help="Pixel distance: euclidean or squared [default: euclidean].")]
ImageScoreOpt = Annotated[str | None, typer.Option(help="Image score: map_max or knn (paper) [default: map_max].")]
SigmaOpt = Annotated[float | None, typer.Option(help="Gaussian smoothing of the map, input pixels [default: 4].")]
ImageSizeOpt = Annotated[int | None, typer.Option(help="Network input short side (or side) [default: 224].")]
ResizeOpt = Annotated[str | None, typer.Option(help="keep_aspect, squash or paper_crop [default: keep_aspect].")]
CalibrationOpt = Annotated[
    float | None, typer.Option(help="Share of good images held out to calibrate thresholds [default: 0.1].")
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
BatchOpt = Annotated[int, typer.Option(help="Images per backbone pass.")]
SeedOpt = Annotated[int, typer.Option(help="Seed for anything random.")]
SkipBadOpt = Annotated[
    bool, typer.Option("--skip-bad", help="Skip unreadable images (listed on stderr and in the output).")
]


def _settings(options: dict[str, object]) -> dict[str, object]:
    """Model settings from a command's options: those that name a `Spade` setting and were given (not None)."""
    from .model import Spade

    given = {name: options[name] for name in Spade.SETTING_NAMES if options.get(name) is not None}
    if "layers" in given:
        try:
            given["layers"] = tuple(int(x) for x in str(given["layers"]).split(",") if x.strip())
        except ValueError as exc:
            raise typer.BadParameter(f"--layers must be comma-separated integers, got {given['layers']!r}") from exc
    return given


def _report_skip(item: object, error: ImageReadError) -> None:
    typer.echo(f"skipped: {error}", err=True)


@app.command()
def fit(
    train_dir: Annotated[Path, typer.Argument(help="Folder of good images (searched recursively).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Model file to write (.safetensors).")],
    backbone: BackboneOpt = None,
    weights: WeightsOpt = None,
    layers: LayersOpt = None,
    k_image: KImageOpt = None,
    k_gallery: KGalleryOpt = None,
    kappa: KappaOpt = None,
    patch_size: PatchOpt = None,
    fusion: FusionOpt = None,
    search_radius: SearchRadiusOpt = None,
    distance: DistanceOpt = None,
    image_score: ImageScoreOpt = None,
    sigma: SigmaOpt = None,
    image_size: ImageSizeOpt = None,
    resize: ResizeOpt = None,
    calibration_fraction: CalibrationOpt = None,
    validation: Annotated[
        Path | None, typer.Option(help="Folder of other good images to calibrate thresholds on (none held out).")
    ] = None,
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = 8,
    seed: SeedOpt = 0,
    skip_bad: SkipBadOpt = False,
) -> None:
    """Fit a model on a folder of good images and save it."""
    from .model import Spade

    settings = _settings(locals())
    model = Spade(**settings).fit(
        train_dir, validation=validation, skip_bad=skip_bad, on_skip=_report_skip if skip_bad else None
    )
    model.save(output)
    typer.echo(f"fitted on {len(model.train_names_)} images ({len(model.skipped_)} skipped); model: {output}")
    if model.image_threshold_ is not None:
        typer.echo(f"thresholds from {len(model.calibration_scores_)} held-out good images: "
                   f"image {model.image_threshold_:.4g}, pixel {model.pixel_threshold_:.4g}")


@app.command()
def predict(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="Model file written by `spade-ad fit`.")],
    inputs: Annotated[list[Path], typer.Argument(metavar="INPUT...", help="Image files or folders (recursed).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")],
    save_maps: Annotated[
        bool, typer.Option("--save-maps", help="Also write raw float32 maps at the original size (maps/*.tiff).")
    ] = False,
    weights: WeightsOpt = None,
    device: Annotated[str | None, typer.Option(help="Override the device stored in the model.")] = None,
    skip_bad: SkipBadOpt = False,
) -> None:
    """Score images: OUT/scores.csv (row by row, with is_anomalous when the model has a threshold), heat maps,
    overlays and predicted defect masks per image."""
    from .export import PredictionWriter
    from .persistence import load

    model = load(model_path, weights=weights, device=device)
    with PredictionWriter.for_model(model, output, save_maps=save_maps) as writer:
        def on_skip(item: object, error: ImageReadError) -> None:
            writer.skip(getattr(item, "name", str(item)), error)
            _report_skip(item, error)

        source = inputs[0] if len(inputs) == 1 else list(inputs)  # one folder: names relative to it
        writer.write_all(
            model.iter_predict(source, original_size=True, keep_images=True, skip_bad=skip_bad, on_skip=on_skip)
        )
    typer.echo(f"scored {writer.count} images ({len(writer.skipped)} skipped): {output / 'scores.csv'}")


@app.command()
def evaluate(
    root: Annotated[Path, typer.Argument(help="MVTec AD root (or one category folder, or the generic layout).")],
    category: Annotated[
        list[str] | None, typer.Option("--category", "-c", help="Category to evaluate (repeatable; default all).")
    ] = None,
    preset: Annotated[str, typer.Option(help="default, or paper (WRN50, 256->224 crop, metrics at 256).")] = "default",
    eval_size: Annotated[
        int | None, typer.Option(help="Compute metrics at NxN (paper: 256) instead of the original size.")
    ] = None,
    pro_limit: Annotated[float, typer.Option(help="AU-PRO integration limit (FPR).")] = 0.3,
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder.")] = Path("eval_out"),
    save_models: Annotated[bool, typer.Option("--save-models", help="Also save each category's model.")] = False,
    plots: Annotated[bool, typer.Option(help="Write the plots.")] = True,
    backbone: BackboneOpt = None,
    weights: WeightsOpt = None,
    layers: LayersOpt = None,
    k_image: KImageOpt = None,
    k_gallery: KGalleryOpt = None,
    kappa: KappaOpt = None,
    patch_size: PatchOpt = None,
    fusion: FusionOpt = None,
    search_radius: SearchRadiusOpt = None,
    distance: DistanceOpt = None,
    image_score: ImageScoreOpt = None,
    sigma: SigmaOpt = None,
    image_size: ImageSizeOpt = None,
    resize: ResizeOpt = None,
    calibration_fraction: CalibrationOpt = None,
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = 8,
    seed: SeedOpt = 0,
) -> None:
    """Fit and score each category; print a table against the paper; write metrics.json/csv, report.md, plots."""
    from .evaluate import PRESET_EVAL_SIZE, PRESETS, format_table
    from .evaluate import evaluate as run_evaluation

    if preset not in PRESETS:
        raise typer.BadParameter(f"--preset must be one of {', '.join(PRESETS)}")
    settings = {**PRESETS[preset], **_settings(locals())}
    report = run_evaluation(
        root, categories=category, settings=settings,
        eval_size=eval_size if eval_size is not None else PRESET_EVAL_SIZE[preset],
        pro_limit=pro_limit, out_dir=out, save_models=save_models, plots=plots, log=lambda m: typer.echo(m, err=True),
    )
    typer.echo(format_table(report))
    typer.echo(f"metrics at {report['resolution']}; report: {out / 'report.md'}")


@app.command()
def demo(
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")] = Path("demo_out"),
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
) -> None:
    """The built-in job: make a synthetic product dataset, fit, predict, print AUROCs, write overlays."""
    from .demo import run_demo

    result = run_demo(output, seed=seed, device=device, log=typer.echo)
    typer.echo(
        f"image AUROC {result['image_auroc']:.3f}  pixel AUROC {result['pixel_auroc']:.3f}  "
        f"({result['n_test']:.0f} test images; overlays in {output / 'predictions' / 'overlays'})"
    )


@app.command()
def serve(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="Model file written by `spade-ad fit`.")],
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default: not reachable from elsewhere).")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(help="Inference threads sharing the one loaded model.")] = 1,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait for a worker; beyond that: 503.")] = 8,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted upload per request, in MB.")] = 20.0,
    max_pixels: Annotated[int, typer.Option(help="Largest accepted image, in pixels (decompression-bomb guard).")]
    = 40_000_000,
    weights: WeightsOpt = None,
    device: Annotated[str | None, typer.Option(help="Override the device stored in the model.")] = None,
) -> None:
    """Serve a model over HTTP: JSON API at /v1, a web page at /, OpenAPI docs at /docs."""
    from .service import ServiceSettings, run_server

    run_server(
        model_path,
        ServiceSettings(
            host=host, port=port, workers=workers, max_queue=max_queue,
            max_upload_bytes=int(max_upload_mb * 2**20), max_pixels=max_pixels,
        ),
        weights=weights,
        device=device,
    )


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        app()
    except SpadeError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
