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

# Model settings shared by `fit`, `demo` and `evaluate` (defaults are the library's).
BackboneOpt = Annotated[
    str, typer.Option(help=f"Backbone: {', '.join(available_backbones())}, or any timm name with --weights.")
]
WeightsOpt = Annotated[
    Path | None, typer.Option(help="Local backbone weights file (.pth/.safetensors state_dict); needed offline.")
]
LayersOpt = Annotated[str, typer.Option(help="Pyramid levels as stage indices, e.g. 1,2,3 (strides 4/8/16).")]
KImageOpt = Annotated[int, typer.Option(help="Neighbours of the global kNN image score.")]
KGalleryOpt = Annotated[int, typer.Option(help="Nearest training images whose features form the pixel gallery (K).")]
KappaOpt = Annotated[int, typer.Option(help="Gallery neighbours averaged per pixel.")]
FusionOpt = Annotated[str, typer.Option(help="Pyramid fusion: mean (per-level maps averaged) or concat.")]
DistanceOpt = Annotated[str, typer.Option(help="Pixel distance: euclidean or squared (the paper's).")]
ImageScoreOpt = Annotated[str, typer.Option(help="Image score: map_max (max of the map) or knn (the paper's).")]
SigmaOpt = Annotated[float, typer.Option(help="Gaussian smoothing of the map, input pixels (0 = none).")]
ImageSizeOpt = Annotated[int, typer.Option(help="Network input: short side (keep_aspect) or side.")]
ResizeOpt = Annotated[str, typer.Option(help="keep_aspect (whole image), squash, or paper_crop (256->224 crop).")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
BatchOpt = Annotated[int, typer.Option(help="Images per backbone pass.")]
SeedOpt = Annotated[int, typer.Option(help="Seed for anything random.")]
SkipBadOpt = Annotated[
    bool, typer.Option("--skip-bad", help="Skip unreadable images (listed on stderr and in the output).")
]


def _settings(**values: object) -> dict[str, object]:
    layers = values.pop("layers")
    try:
        values["layers"] = tuple(int(x) for x in str(layers).split(",") if x.strip())
    except ValueError as exc:
        raise typer.BadParameter(f"--layers must be comma-separated integers, got {layers!r}") from exc
    return values


def _report_skip(item: object, error: ImageReadError) -> None:
    typer.echo(f"skipped: {error}", err=True)


@app.command()
def fit(
    train_dir: Annotated[Path, typer.Argument(help="Folder of good images (searched recursively).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Model file to write (.safetensors).")],
    backbone: BackboneOpt = "efficientnet_lite0",
    weights: WeightsOpt = None,
    layers: LayersOpt = "1,2,3",
    k_image: KImageOpt = 3,
    k_gallery: KGalleryOpt = 50,
    kappa: KappaOpt = 1,
    fusion: FusionOpt = "mean",
    distance: DistanceOpt = "euclidean",
    image_score: ImageScoreOpt = "map_max",
    sigma: SigmaOpt = 4.0,
    image_size: ImageSizeOpt = 224,
    resize: ResizeOpt = "keep_aspect",
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = 8,
    seed: SeedOpt = 0,
    skip_bad: SkipBadOpt = False,
) -> None:
    """Fit a model on a folder of good images and save it."""
    from .model import Spade

    settings = _settings(
        backbone=backbone, weights=weights, layers=layers, k_image=k_image, k_gallery=k_gallery, kappa=kappa,
        fusion=fusion, distance=distance, image_score=image_score, sigma=sigma, image_size=image_size,
        resize=resize, device=device, batch_size=batch_size, seed=seed,
    )
    model = Spade(**settings).fit(train_dir, skip_bad=skip_bad, on_skip=_report_skip if skip_bad else None)
    model.save(output)
    typer.echo(f"fitted on {len(model.train_names_)} images ({len(model.skipped_)} skipped); model: {output}")


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
    """Score images: OUT/scores.csv (row by row), heat maps and overlays per image."""
    from .export import PredictionWriter
    from .persistence import load

    model = load(model_path, weights=weights, device=device)
    with PredictionWriter(output, save_maps=save_maps) as writer:
        def on_skip(item: object, error: ImageReadError) -> None:
            writer.skip(getattr(item, "name", str(item)), error)
            _report_skip(item, error)

        source = inputs[0] if len(inputs) == 1 else list(inputs)  # one folder: names relative to it
        writer.write_all(
            model.iter_predict(source, original_size=True, keep_images=True, skip_bad=skip_bad, on_skip=on_skip)
        )
    typer.echo(f"scored {writer.count} images ({len(writer.skipped)} skipped): {output / 'scores.csv'}")


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


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        app()
    except SpadeError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
