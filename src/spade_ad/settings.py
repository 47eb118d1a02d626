"""The settings table: the single source of truth for every setting of the estimator.

Each `Setting` declares its name, default, kind, allowed values or range, a one-line help and its group. Everything
else reads this table: `Spade.__init__` (which only stores), `validate` (used by `Spade.fit`, `set_params` and when a
model file is loaded), the CLI options of `fit` and `evaluate` (generated from it), the service's `/v1/model`, the
model-file header, `help(Spade)` (`numpydoc_parameters`) and the settings table of docs/settings.md (`markdown_table`,
checked by a test).

This module is pure Python on purpose: the CLI imports it to build `--help` without torch or numpy.

Over 300 lines: the table itself, one declaration per setting with its help text, is most of it.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import SettingError

GROUPS = ("backbone", "pyramid", "search", "scoring", "calibration", "runtime")


@dataclass(frozen=True)
class Setting:
    """One setting. `kind`: "int", "float", "str", "bool", "path" or "levels" (a tuple of stage indices).

    `low` / `high` bound numbers (inclusive; `high_open` makes the upper bound exclusive), `choices` lists the
    allowed strings, `nullable` admits None, `odd` asks for odd integers. `stored` settings are written to model
    files (and validated when one is loaded); `runtime` settings may be overridden at load time. `cli` settings are
    options of `spade-ad fit` and `spade-ad evaluate`. `check` adds a rule the others cannot express."""

    name: str
    default: Any
    kind: str
    help: str
    group: str
    choices: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None
    high_open: bool = False
    nullable: bool = False
    odd: bool = False
    stored: bool = True
    runtime: bool = False
    cli: bool = True
    check: Callable[[Any], str | None] | None = None
    #: The value a model file written before this setting existed behaves as (absent: such a file is refused).
    before: Any = ...

    @property
    def option(self) -> str:
        """The command-line option (`k_gallery` -> `--k-gallery`)."""
        return "--" + self.name.replace("_", "-")

    def allowed(self) -> str:
        """What values are allowed, in words (for messages and the docs)."""
        if self.choices is not None:
            text = " | ".join(self.choices)
        elif self.kind == "levels":
            text = "distinct stage indices 1-4, e.g. 2,3"
        elif self.kind in ("int", "float"):
            word = "integer" if self.kind == "int" else "number"
            if self.odd:
                word = "odd " + word
            if self.low is not None and self.high is not None:
                text = f"{word} in [{_num(self.low)}, {_num(self.high)}{')' if self.high_open else ']'}"
            elif self.low is not None:
                text = f"{word} >= {_num(self.low)}"
            else:
                text = word
        elif self.kind == "bool":
            text = "true | false"
        elif self.kind == "path":
            text = "a file or folder path"
        else:
            text = "a name"
        return text + (" or none" if self.nullable else "")

    def validate(self, value: Any) -> Any:
        """The value in canonical form (ints as int, levels as a tuple), or SettingError naming the setting."""
        if value is None:
            if self.nullable:
                return None
            raise SettingError(self.name, "must be set", value, self.allowed())
        try:
            result = _CONVERTERS[self.kind](value)
        except (TypeError, ValueError) as exc:
            raise SettingError(self.name, "has the wrong type", value, self.allowed()) from exc
        problem = self._problem(result)
        if problem is None and self.check is not None:
            problem = self.check(result)
        if problem is not None:
            raise SettingError(self.name, problem, value, self.allowed())
        return result

    def parse(self, text: str) -> Any:
        """A command-line string -> a value for `validate` ("none" means None for nullable settings)."""
        if self.nullable and text.strip().lower() in ("none", "null", ""):
            return None
        if self.kind == "levels":
            return tuple(int(part) for part in text.split(",") if part.strip())
        if self.kind == "bool":
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if self.kind == "int":
            return int(text)
        if self.kind == "float":
            return float(text)
        return text

    def _problem(self, value: Any) -> str | None:
        if self.choices is not None and value not in self.choices:
            return "is not allowed"
        if self.kind in ("int", "float"):
            if isinstance(value, float) and not math.isfinite(value):
                return "must be finite"
            if self.low is not None and value < self.low:
                return "is too small"
            if self.high is not None and (value >= self.high if self.high_open else value > self.high):
                return "is too large"
            if self.odd and value % 2 == 0:
                return "must be odd"
        if self.kind == "levels":
            if not value:
                return "must name at least one level"
            if len(set(value)) != len(value) or any(not 1 <= v <= 4 for v in value):
                return "must be distinct stage indices between 1 and 4"
        if self.kind == "str" and not value:
            return "must not be empty"
        return None

    def display_default(self) -> str:
        if self.default is None:
            return "none"
        if self.kind == "levels":
            return ",".join(str(v) for v in self.default)
        if isinstance(self.default, bool):
            return str(self.default).lower()
        return _num(self.default) if isinstance(self.default, float) else str(self.default)


def _num(value: float) -> str:
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    short = f"{value:.4g}"
    return short if abs(float(short) - value) <= 1e-9 * max(1.0, abs(value)) or len(repr(value)) > 12 else repr(value)


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError("a bool is not an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("not an integer")
        return int(value)
    if isinstance(value, str):
        return int(value)
    return int(value.__index__())  # ints and numpy integers


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError("a bool is not a number")
    return float(value)


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise TypeError("not a bool")


def _to_str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("not a string")
    return value


def _to_path(value: Any) -> str:
    import os

    return os.fspath(value)


def _to_levels(value: Any) -> tuple[int, ...]:
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    return tuple(_to_int(v) for v in value)


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "int": _to_int, "float": _to_float, "bool": _to_bool, "str": _to_str, "path": _to_path, "levels": _to_levels,
}


def _device_check(value: str) -> str | None:
    head, _, index = value.partition(":")
    if head not in ("auto", "cpu", "cuda") or (index and (head != "cuda" or not index.isdigit())):
        return "is not a device"
    return None


# The table. Defaults are chosen by measurement; docs/accuracy.md says why each is what it is.
SETTINGS: tuple[Setting, ...] = (
    # backbone
    Setting("backbone", "efficientnet_lite0", "str", "ImageNet backbone: efficientnet_lite0/1/2, wide_resnet50_2, "
            "resnet18, or any timm name with `weights`", "backbone"),
    Setting("weights", None, "path", "local backbone weights file (.pth / .safetensors state_dict); needed offline "
            "for torchvision backbones", "backbone", nullable=True),
    Setting("image_size", 224, "int", "short side (keep_aspect) or side (squash, paper_crop) of the network input",
            "backbone", low=32, high=4096),
    Setting("resize", "keep_aspect", "str", "keep_aspect: whole image, aspect kept; squash; paper_crop: 256 -> 224 "
            "centre crop", "backbone", choices=("keep_aspect", "squash", "paper_crop")),
    Setting("global_view", "square", "str", "the view whose pooled feature picks the gallery and gives the kNN "
            "score: square: the image squashed to image_size x image_size (a long strip seen whole; the input "
            "itself for square inputs); input: the network input", "backbone", choices=("square", "input")),
    Setting("tile_size", None, "int", "tiled mode, for small defects on large images: the image at its own "
            "resolution cut into tiles of this many pixels (a multiple of 32), each searched against the same region "
            "of the gallery images (docs/tiles.md); none: the whole image resized to image_size", "backbone",
            low=64, high=4096, nullable=True, check=lambda v: None if v % 32 == 0 else "must be a multiple of 32",
            before=None),
    Setting("tile_overlap", 64, "int", "pixels shared by neighbouring tiles (a multiple of 32, below tile_size): "
            "each position is scored by the tile it sits deepest in", "backbone", low=0, high=4064,
            check=lambda v: None if v % 32 == 0 else "must be a multiple of 32", before=64),
    Setting("tile_margin", 32, "int", "pixels around a tile's region searched in each gallery image (how far a "
            "part may sit from where the training parts sat)", "backbone", low=0, high=4096, before=32),
    # pyramid
    Setting("layers", (2, 3), "levels", "pyramid levels as stage indices: 1, 2, 3 = strides 4, 8, 16 (paper: 1,2,3)",
            "pyramid"),
    Setting("patch_size", 1, "int", "average each feature over a patch_size x patch_size neighbourhood first "
            "(PatchCore's local aggregation); 1 = plain SPADE", "pyramid", low=1, high=15, odd=True),
    # search
    Setting("k_gallery", 50, "int", "K: nearest training images whose feature maps form the pixel gallery "
            "(paper: 50)", "search", low=1),
    Setting("kappa", 1, "int", "gallery neighbours averaged per pixel (paper: 1)", "search", low=1, high=1000),
    Setting("search_radius", None, "int", "none: each position searches the whole gallery (SPADE); r: only gallery "
            "features within r cells of the same position (aligned products, one image size)", "search",
            low=0, nullable=True),
    Setting("max_search_pairs", 100_000_000, "int", "queries x gallery vectors searched exactly per pyramid level; "
            "above (long or large images), each gallery image's coreset prefix is searched; none: always exact",
            "search", low=10_000, nullable=True),
    Setting("feature_dtype", "float16", "str", "dtype of the stored pyramid features (distances are always "
            "accumulated in float32)", "search", choices=("float16", "float32")),
    Setting("memory_budget", None, "int", "bytes of one tile of distances; none: per device (4 MiB CPU, 1 GiB GPU)",
            "search", low=2**16, nullable=True, runtime=True, cli=False),
    # scoring
    Setting("fusion", "mean", "str", "mean: per-level distance maps upsampled and averaged; concat: one search over "
            "concatenated features (the paper's text)", "scoring", choices=("mean", "concat")),
    Setting("distance", "euclidean", "str", "pixel distances before the levels are fused; squared is the paper's",
            "scoring", choices=("euclidean", "squared")),
    Setting("image_score", "fused", "str", "fused: map_top, the coarsest level's own top 1% and knn, each "
            "divided by its local density (density_k) and scaled by its spread on the good images' calibration "
            "scores, then weighted by map_weight and coarse_weight, max_share of it the strongest part (needs "
            "calibration); map_top: mean of the "
            "highest 1% of the smoothed map; map_max: its maximum; knn: the paper's mean squared distance to the "
            "k_image nearest global features", "scoring",
            choices=("fused", "map_top", "map_max", "knn")),
    Setting("map_weight", 1 / 3, "float", "share of the map part in the fused image score (the kNN part has what "
            "map_weight and coarse_weight leave): 1/3 with coarse_weight 1/3 weighs the three parts equally; "
            "fit or calibrate with labelled defects (--defect, --record) moves both when the defects clearly support "
            "another share",
            "scoring", low=0, high=1, before=0.5),
    Setting("coarse_weight", 1 / 3, "float", "share in the fused image score of the coarsest pyramid level's own "
            "map (upsampled and smoothed like the map, its top 1%); 0: two parts only, as before", "scoring",
            low=0, high=1, before=0.0),
    Setting("max_share", 0.25, "float", "share of the fused image score given to the largest of its scaled parts "
            "(the rest is their weighted average), so that a defect one part sees is not diluted by the others; "
            "0: the weighted average alone, as before", "scoring", low=0, high=1, before=0.0),
    Setting("density_k", 3, "int", "fused score: each part divided by the mean leave-one-out part of the image's "
            "density_k nearest training images by global feature, so a rare good part is measured against the "
            "rare parts like it (LOF); 0: off", "scoring", low=0, high=50, before=0),
    Setting("k_image", 1, "int", "neighbours of the global kNN image score (paper: 3 in its public code)",
            "scoring", low=1),
    Setting("sigma", 4.0, "float", "Gaussian smoothing of the map, in input pixels (0: none)", "scoring",
            low=0, high=64),
    # calibration
    Setting("calibration", "leave_one_out", "str", "where the good scores behind the thresholds come from: "
            "leave_one_out (every training image scored without itself), holdout (calibration_fraction of the "
            "images set aside), none (no thresholds); fit(..., validation=...) overrides", "calibration",
            choices=("leave_one_out", "holdout", "none")),
    Setting("calibration_fraction", 0.1, "float", "share of the good images held out (by seed) with "
            "calibration=holdout", "calibration", low=0, high=1, high_open=True),
    Setting("session_gap", 60.0, "float", "minutes between two training images' capture times (EXIF, a date in "
            "the name, else the file's time) that start a new capture session; with two or more sessions (each at "
            "least a fifth of the images), leave-one-out scores each image without its whole session, so the "
            "thresholds allow for the change from one session to the next; 0: off", "calibration", low=0,
            before=0.0),
    Setting("false_alarm_rate", 0.01, "float", "share of good parts allowed to be flagged: the image threshold is "
            "the conformal quantile of the good scores at this rate", "calibration", low=1e-6, high=0.5),
    Setting("pixel_false_alarm_rate", 0.001, "float", "share of good pixels allowed above the pixel threshold "
            "(defect masks and regions)", "calibration", low=1e-6, high=0.5),
    # runtime
    Setting("device", "auto", "str", "cpu, cuda[:N], or auto (cuda when available)", "runtime", runtime=True,
            check=_device_check),
    Setting("batch_size", 8, "int", "images per backbone forward pass", "runtime", low=1, high=4096, runtime=True),
    Setting("thumbnail_size", 96, "int", "short side of the small training-image thumbnails kept in the model for "
            "explanations (predict --explain, the web page's why); 0: keep none", "runtime", low=0, high=512),
    Setting("seed", 0, "int", "seed for anything random (results are reproducible)", "runtime", low=0),
    Setting("feature_dir", None, "path", "folder for the pyramid features written during fit (default: a "
            "temporary folder)", "runtime", nullable=True, stored=False, runtime=True, cli=False),
    Setting("progress", None, "bool", "progress bars; none: only when stderr is a terminal", "runtime",
            nullable=True, stored=False, runtime=True, cli=False),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
#: Settings of earlier versions that no longer exist; model files holding them are refused with a clear message.
RETIRED = {"threshold_margin": "replaced by false_alarm_rate (conformal thresholds)"}
NAMES: tuple[str, ...] = tuple(BY_NAME)
DEFAULTS: dict[str, Any] = {s.name: s.default for s in SETTINGS}


@dataclass(frozen=True)
class SearchSettings:
    """The settings of the pixel search and of the map maths after it, which travel together through every path
    (the torch search, the numpy search of the runtime, the device pipeline, leave-one-out, the tiled mode): one
    value object, made from a fitted model's settings by `of`. Defaults are the table's."""

    kappa: int = 1
    fusion: str = "mean"
    distance: str = "euclidean"
    memory_budget: int | None = None
    search_radius: int | None = None
    max_pairs: int | None = None
    sigma: float = 4.0
    image_score: str = "fused"
    #: Whether the coarsest level's own map is made too (its top 1% is the fused score's third part).
    coarse: bool = False

    @classmethod
    def of(cls, model: Any) -> SearchSettings:
        """From an estimator's settings (`Spade` or `Runtime`: attributes named as in the table)."""
        return cls(kappa=int(model.kappa), fusion=model.fusion, distance=model.distance,
                   memory_budget=model.memory_budget, search_radius=model.search_radius,
                   max_pairs=model.max_search_pairs, sigma=float(model.sigma), image_score=model.image_score,
                   coarse=uses_coarse(model))


def uses_coarse(model: Any) -> bool:
    """Whether a model's image score has the coarse part: "fused" with coarse_weight > 0."""
    return model.image_score == "fused" and float(model.coarse_weight) > 0


def density_k(model: Any) -> int:
    """The density normalisation's K for a model's image score: density_k for "fused", else 0 (off)."""
    return int(model.density_k) if model.image_score == "fused" else 0


def validate(params: Mapping[str, Any], *, partial: bool = False) -> dict[str, Any]:
    """Check settings against the table; returns them in canonical form. Unknown names and bad values raise
    SettingError naming the setting and what is allowed. With `partial`, missing settings are not filled in."""
    unknown = sorted(set(params) - set(BY_NAME))
    retired = [name for name in unknown if name in RETIRED]
    if retired:
        raise SettingError(retired[0], f"was retired ({RETIRED[retired[0]]})", None, "refit with this version")
    if unknown:
        raise SettingError(unknown[0], "is not a setting", None, "one of " + ", ".join(NAMES))
    values = {name: BY_NAME[name].validate(value) for name, value in params.items()}
    if not partial:
        values = {**{n: d for n, d in DEFAULTS.items() if n not in values}, **values}
    if "map_weight" in values and "coarse_weight" in values and \
            values["map_weight"] + values["coarse_weight"] > 1 + 1e-9:
        raise SettingError("coarse_weight", f"and map_weight ({_num(values['map_weight'])}) add up to more than 1",
                           values["coarse_weight"], "shares whose sum is at most 1 (the kNN part has the rest)")
    return values


def stored(params: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a model file records, as JSON-friendly values (levels as lists)."""
    out = {}
    for name, value in params.items():
        if BY_NAME[name].stored:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def grouped(settings: Iterable[Setting] = SETTINGS) -> dict[str, list[Setting]]:
    groups: dict[str, list[Setting]] = {g: [] for g in GROUPS}
    for setting in settings:
        groups[setting.group].append(setting)
    return groups


def markdown_table() -> str:
    """The settings table of docs/settings.md, generated from this module (a test keeps the page in step)."""
    lines = ["| setting | group | default | allowed | meaning |", "|---|---|---|---|---|"]
    for s in SETTINGS:
        cells = [f"`{s.name}`", s.group, f"`{s.display_default()}`", s.allowed(), s.help]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


_DOC_TYPES = {"int": "int", "float": "float", "str": "str", "bool": "bool", "path": "str or Path",
              "levels": "tuple of int"}


def numpydoc_parameters(width: int = 116) -> str:
    """The numpydoc "Parameters" section of `Spade`, generated from the table (so `help(Spade)` cannot drift)."""
    lines = ["Parameters", "----------"]
    for s in SETTINGS:
        kind = _DOC_TYPES[s.kind] + (" or None" if s.nullable else "")
        default = _num(s.default) if isinstance(s.default, float) else repr(s.default)
        lines.append(f"{s.name} : {kind}, default={default}")
        text = f"{s.help}. Allowed: {s.allowed().replace(' | ', ', ')}. Group: {s.group}."
        lines += textwrap.wrap(text, width, initial_indent="    ", subsequent_indent="    ", break_on_hyphens=False)
    return "\n".join(lines)


#: Named settings for `fit --preset` and `evaluate --preset` (benchmarks/bench_accuracy.py measures each; docs):
#: "fast": a gallery of the 10 nearest images instead of 50 (about 3x less search); "default": the library's own
#: defaults; "quality": the stride-4 level too (the paper's three levels), searched exactly up to 1e9 pairs (a
#: 900 x 900 image is exact: 4.9e8 at stride 4); "objects": PatchCore's 3 x 3 local aggregation, for assembled
#: objects in many poses (pixel AUROC up on the objects, AU-PRO down on bottle and on textures; under today's image
#: score no longer their image AUROC or verdicts: docs/settings.md); "paper": the published configuration (needs the
#: WRN50 ImageNet weights file offline), evaluated at 256 x 256.
PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"k_gallery": 10},
    "default": {},
    "quality": {"layers": (1, 2, 3), "max_search_pairs": 1_000_000_000},
    "objects": {"patch_size": 3},
    "paper": {
        "backbone": "wide_resnet50_2", "layers": (1, 2, 3), "k_image": 3, "k_gallery": 50, "kappa": 1,
        "fusion": "mean", "distance": "squared", "image_score": "knn", "sigma": 4.0, "image_size": 224,
        "resize": "paper_crop", "max_search_pairs": None, "coarse_weight": 0.0, "density_k": 0,
        "max_share": 0.0,
    },
}
#: Resolution metrics are computed at for each preset (None: the original image size).
PRESET_EVAL_SIZE: dict[str, int | None] = {"fast": None, "default": None, "quality": None, "objects": None,
                                           "paper": 256}
