"""A small synthetic "product" anomaly dataset in the MVTec AD layout.

The demo and the tests need data that exists offline, is generated in a couple of seconds and is reproducible
(same seed, same bytes). Each image shows a lathe-turned metal disc (rim, hub, four bolt holes) lying on a
woven conveyor belt; good images differ by small shifts, rotations, lighting/brightness jitter and fresh
noise, so that a detector has normal variation to learn. Defect images add a scratch (thin polyline) or a spot
(irregular stain) to the disc, and the ground-truth mask is exactly the set of pixels the defect was drawn on.

`OBJECT_DEFECT_TYPES` are the defects of an assembled object rather than of a surface: a bolt hole that is missing
(the face is smooth where it should be), one drilled in the wrong place, and a foreign part (a washer) lying on the
face. Each looks locally like something a good image has elsewhere (a hole, a plain face, a bright ring), which is
what separates detectors that compare a part with similar good parts as a whole from those that only look for
unusual texture. The mask is the area where the image differs from the good part.

`make_line_dataset` is the third generated product, made to show what a production line shows and the other two
do not (issue 27): rare good variants (a few percent of the good parts, in training and test, turned 45 degrees, of
another alloy's colour, or printed with a batch label: good parts a kNN score finds in a sparse region), subtle
defects (`SUBTLE_DEFECT_TYPES`: a faint scratch, a shallow dent, an undersized bolt hole), two defective parts
slipped into its training folder, and a second capture session (the light turned a little, dimmer, warmer) for
every test image. `variants.json` at its root names the rare, the defective training images and the session.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter, gaussian_filter1d

__all__ = ["DEFECT_TYPES", "LINE_DEFECT_TYPES", "OBJECT_DEFECT_TYPES", "RARE_KINDS", "SUBTLE_DEFECT_TYPES",
           "make_line_dataset", "make_synthetic_dataset", "read_variants"]

DEFECT_TYPES: tuple[str, ...] = ("scratch", "spot")
OBJECT_DEFECT_TYPES: tuple[str, ...] = ("missing_hole", "extra_hole", "foreign_part")
#: Defects a little above the good parts' own variation: low-contrast scratch, a dent seen only by its shading, a
#: bolt hole drilled about 30% too small.
SUBTLE_DEFECT_TYPES: tuple[str, ...] = ("faint_scratch", "dent", "small_hole")
#: The line product's test defects: the subtle ones and one object defect.
LINE_DEFECT_TYPES: tuple[str, ...] = (*SUBTLE_DEFECT_TYPES, "missing_hole")
#: Rare good variants: an unusual pose (turned 45 degrees, off centre), colour (brass) and print (a batch label).
RARE_KINDS: tuple[str, ...] = ("pose", "colour", "print")
_ALL_DEFECTS = DEFECT_TYPES + OBJECT_DEFECT_TYPES + SUBTLE_DEFECT_TYPES
#: One good part in `_RARE_CYCLE` of each rare kind, at these positions of the cycle (2.5% each, 7.5% in all).
_RARE_CYCLE = 40
_RARE_AT = {7: "pose", 19: "colour", 31: "print"}
#: The defects slipped into a training folder, in turn.
_SLIPPED = ("spot", "foreign_part")

# Seed-stream tags, so that e.g. train image 3 is the same whatever the other counts are.
_STREAM = {"train": 0, "good": 1, "scratch": 2, "spot": 3, "missing_hole": 4, "extra_hole": 5, "foreign_part": 6,
           "faint_scratch": 7, "dent": 8, "small_hole": 9, "print": 10}
_OWN_FILE = re.compile(r"^\d{3,}(_mask)?\.png$")
_MIN_SIDE = 32


@dataclass(frozen=True)
class _Part:
    """Where the disc lies in one image, so that defects can be placed on it."""

    cy: float
    cx: float
    radius: float
    scale: float  # min(height, width): the unit every size is expressed in
    theta: float = 0.0  # its orientation (radians)


@dataclass(frozen=True)
class _Look:
    """How one image departs from the usual good part and capture: extra turn (radians) and shift (share of the
    image) of the part, the metal's colour, the light's direction (degrees) and the overall brightness and tint."""

    turn: float = 0.0
    shift: float = 0.0
    metal: tuple[float, float, float] = (1.0, 1.01, 1.04)
    light: float = 0.0


_USUAL = _Look()
_RARE_LOOKS = {"pose": _Look(turn=float(np.deg2rad(45.0)), shift=0.06), "colour": _Look(metal=(1.12, 0.93, 0.62)),
               "print": _USUAL}
#: The second capture session: the light turned 12 degrees, 5% dimmer and a little warmer.
_SESSION_TWO = {"light": 12.0, "gain": (0.97, 0.95, 0.92)}


def make_synthetic_dataset(
    root: str | Path,
    *,
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_defect: int = 10,
    size: tuple[int, int] = (256, 256),
    seed: int = 0,
    defect_types: Sequence[str] = DEFECT_TYPES,
    rare_goods: bool = False,
    train_defects: int = 0,
    second_session: bool = False,
) -> Path:
    """Write a synthetic dataset under `root` in the MVTec AD layout and return `root`.

    Layout: ``train/good/000.png…``, ``test/good/…``, ``test/<defect>/…`` (``n_test_defect`` per type in
    `defect_types`: any of `DEFECT_TYPES`, `OBJECT_DEFECT_TYPES` and `SUBTLE_DEFECT_TYPES`) and
    ``ground_truth/<defect>/000_mask.png…`` (uint8 0/255 single-channel masks).
    `size` is (height, width).  The same arguments give byte-identical files; numbered PNGs left in these
    folders by an earlier, larger run are removed so that the layout is exact.

    `rare_goods`: one good part in 40 of each `RARE_KINDS` (turned, brass-coloured, printed), in training and test
    alike. `train_defects`: that many training images are defective parts (a spot, a washer, in turn) slipped in
    among the good ones. `second_session`: every test image is captured in a second session (light turned 12
    degrees, dimmer and warmer). With any of them, ``variants.json`` names the rare and defective images.
    """
    height, width = (int(v) for v in size)
    if min(height, width) < _MIN_SIDE:
        raise ValueError(f"size must be at least {_MIN_SIDE}x{_MIN_SIDE} pixels, got {height}x{width}")
    if n_train < 1 or n_test_good < 0 or n_test_defect < 0:
        raise ValueError(
            f"need n_train >= 1 and n_test_good, n_test_defect >= 0; "
            f"got {n_train}, {n_test_good}, {n_test_defect}"
        )
    unknown = [d for d in defect_types if d not in _ALL_DEFECTS]
    if unknown or len(set(defect_types)) != len(defect_types):
        raise ValueError(f"defect_types must be distinct names from {_ALL_DEFECTS}, got {tuple(defect_types)}")
    if not 0 <= train_defects <= n_train // 2:
        raise ValueError(f"train_defects must be between 0 and half of n_train ({n_train // 2}), got {train_defects}")
    root = Path(root)
    grid = _Grid(height, width)
    slipped = _slipped_positions(n_train, train_defects, rare_goods)
    session = _SESSION_TWO if second_session else {}
    manifest: dict[str, dict[str, str]] = {"train": {}, "test": {}}

    def write_good(folder: Path, stream: str, count: int, split: str, look: dict[str, Any]) -> None:
        _prepare(folder)
        for i in range(count):
            name = _name(i, count)
            rng = np.random.default_rng([seed, _STREAM[stream], i])
            if split == "train" and i in slipped:  # a defective part in the good folder
                defect = _SLIPPED[slipped.index(i) % len(_SLIPPED)]
                pixels, _ = _defect_image(np.random.default_rng([seed, _STREAM[defect], 1000 + i]), grid, defect,
                                          look)
                _save_rgb(pixels, folder / f"{name}.png")
                manifest[split][f"{split}/good/{name}.png"] = f"defect:{defect}"
                continue
            kind = _RARE_AT.get(i % _RARE_CYCLE) if rare_goods else None
            image, part = _render_part(rng, grid, look=_looks(kind, look))
            if kind == "print":
                image = _draw_print(np.random.default_rng([seed, _STREAM["print"], i]), grid, part, image)
            if kind is not None:
                manifest[split][f"{split}/good/{name}.png"] = f"rare:{kind}"
            _save_rgb(_finish(rng, _captured(image, look)), folder / f"{name}.png")

    write_good(root / "train" / "good", "train", n_train, "train", {})
    write_good(root / "test" / "good", "good", n_test_good, "test", session)
    for defect in defect_types:
        image_dir, mask_dir = root / "test" / defect, root / "ground_truth" / defect
        _prepare(image_dir)
        _prepare(mask_dir)
        for i in range(n_test_defect):
            pixels, mask = _defect_image(np.random.default_rng([seed, _STREAM[defect], i]), grid, defect, session)
            name = _name(i, n_test_defect)
            _save_rgb(pixels, image_dir / f"{name}.png")
            Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(
                mask_dir / f"{name}_mask.png", compress_level=1
            )
    notes = root / "variants.json"
    if rare_goods or train_defects or second_session:
        manifest["session"] = {"train": "first", "test": "second" if second_session else "first"}
        notes.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    elif notes.is_file():
        notes.unlink()
    return root


def make_line_dataset(root: str | Path, *, n_train: int = 80, n_test_good: int = 40, n_test_defect: int = 10,
                      size: tuple[int, int] = (256, 256), seed: int = 0, train_defects: int = 2) -> Path:
    """The third generated product (`bench_accuracy`'s ``synthetic_line``): the disc as a line sees it. Rare good
    variants in training and test, `LINE_DEFECT_TYPES` (subtle defects and a missing hole), `train_defects`
    defective parts in the training folder and every test image from a second capture session; see
    `make_synthetic_dataset`. 80 training and 40 good test images, so that 1% and 5% false alarms differ."""
    return make_synthetic_dataset(root, n_train=n_train, n_test_good=n_test_good, n_test_defect=n_test_defect,
                                  size=size, seed=seed, defect_types=LINE_DEFECT_TYPES, rare_goods=True,
                                  train_defects=train_defects, second_session=True)


def read_variants(root: str | Path) -> dict[str, Any]:
    """The ``variants.json`` of a dataset made with rare goods, slipped defects or a second session ({} if none)."""
    notes = Path(root) / "variants.json"
    return json.loads(notes.read_text()) if notes.is_file() else {}


def _slipped_positions(n_train: int, count: int, rare_goods: bool) -> list[int]:
    """Training indices that hold a defective part: evenly spread, never on a rare good variant."""
    taken: list[int] = []
    for j in range(count):
        index = int((j + 1) * n_train / (count + 1))
        while index in taken or (rare_goods and index % _RARE_CYCLE in _RARE_AT):
            index = (index + 1) % n_train
        taken.append(index)
    return taken


def _looks(kind: str | None, session: dict[str, Any]) -> _Look:
    """The look of a good part of rare `kind` (None: usual) captured in `session`."""
    base = _RARE_LOOKS[kind] if kind else _USUAL
    return _Look(base.turn, base.shift, base.metal, session.get("light", 0.0))


def _defect_image(rng: np.random.Generator, g: _Grid, defect: str, session: dict[str, Any]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """A defective part of type `defect` (finished: noise and uint8) and its mask."""
    look = _looks(None, session)
    if defect in OBJECT_DEFECT_TYPES or defect in ("dent", "small_hole"):
        image, mask = _object_defect(rng, g, defect, look)
    else:
        image, part = _render_part(rng, g, look=look)
        if defect == "spot":
            alpha, colour = _draw_spot(rng, g, part)
        else:
            alpha, colour = _draw_scratch(rng, g, part, faint=defect == "faint_scratch")
        image = image * (1.0 - alpha[..., None]) + colour * alpha[..., None]
        mask = alpha > 0
    return _finish(rng, _captured(image, session)), mask


def _captured(image: np.ndarray, session: dict[str, Any]) -> np.ndarray:
    """The image as the camera of `session` sees it: its brightness and tint (the light's turn is rendered)."""
    if "gain" not in session:
        return image
    return image * np.asarray(session["gain"], np.float32)


def _object_defect(rng: np.random.Generator, g: _Grid, defect: str,
                   look: _Look = _USUAL) -> tuple[np.ndarray, np.ndarray]:
    """A part with a missing hole, an extra hole, a washer lying on it, a dent or an undersized hole, and the mask
    of where it differs from the good part in the same pose."""
    if defect == "foreign_part":
        image, part = _render_part(rng, g, look=look)
        cy, cx = _point_on_disc(rng, part, 0.7)
        outer = rng.uniform(0.09, 0.14) * part.radius
        ring = _norm(g.y - cy, g.x - cx)
        coverage = np.clip(outer - ring + 0.5, 0.0, 1.0) * np.clip(ring - 0.45 * outer + 0.5, 0.0, 1.0)
        tone = 200.0 + 40.0 * np.clip((g.x - cx - (g.y - cy)) / outer, -1.0, 1.0)  # lit from the upper left
        image = image * (1.0 - coverage[..., None]) + (tone * coverage)[..., None] * np.ones(3, np.float32)
        return image, coverage > 0
    if defect == "dent":
        state = rng.bit_generator.state
        good, part = _render_part(rng, g, look=look)
        rng.bit_generator.state = state
        image, _ = _render_part(rng, g, look=look)
        cy, cx = _point_on_disc(rng, part, 0.72)
        size = rng.uniform(0.03, 0.045) * part.scale
        bump = np.exp(-0.5 * _norm(g.y - cy, g.x - cx) ** 2 / size**2)
        # a dent is seen by its shading: darker on the side facing the light, brighter on the other
        light = np.deg2rad(225.0 + look.light)
        slope = ((g.x - cx) * np.cos(light) + (g.y - cy) * np.sin(light)) / size
        shade = rng.uniform(55.0, 75.0) * slope * bump * _on_part(g, part)
        image = image + shade[..., None]
        return image, np.abs(image - good).max(axis=2) > 5.0
    if defect == "missing_hole":
        gone = int(rng.integers(4))
        holes = tuple(h for k, h in enumerate(_HOLES) if k != gone)
    elif defect == "small_hole":
        which = int(rng.integers(4))
        factor = float(rng.uniform(0.6, 0.75))
        holes = tuple((a, d, factor if k == which else 1.0) for k, (a, d, *_) in enumerate(_HOLES))
    else:  # extra_hole: between two of the four, nearer the hub or the rim
        holes = (*_HOLES, (int(rng.integers(4)) * np.pi / 2, float(rng.choice([0.35, 0.78]))))
    state = rng.bit_generator.state
    good, _ = _render_part(rng, g, look=look)  # the good part in the same pose, to compare against
    rng.bit_generator.state = state
    image, _ = _render_part(rng, g, holes, look=look)
    mask = np.abs(image - good).max(axis=2) > 8.0
    return image, mask


class _Grid:
    """Pixel-centre coordinates of an image, computed once per dataset."""

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width
        self.scale = float(min(height, width))
        self.y, self.x = np.mgrid[0:height, 0:width].astype(np.float32)


#: The bolt holes of a good part: (angle from the part's orientation, distance from the centre / radius[, size
#: factor of the hole]).
_HOLES: tuple[tuple[float, ...], ...] = tuple((np.pi / 4 + k * np.pi / 2, 0.6) for k in range(4))


def _render_part(rng: np.random.Generator, g: _Grid, holes: tuple[tuple[float, ...], ...] = _HOLES, *,
                 look: _Look = _USUAL) -> tuple[np.ndarray, _Part]:
    """One product image as float RGB in [0, 255] (before sensor noise), and where its disc lies; good with the
    default `holes`. `look`: a rare variant's pose or colour, another session's light."""
    s = g.scale
    cy = g.height / 2 + rng.uniform(-0.03, 0.03) * s
    cx = g.width / 2 + rng.uniform(-0.03, 0.03) * s
    theta = np.deg2rad(rng.uniform(-12.0, 12.0))
    radius = 0.36 * s * rng.uniform(0.98, 1.02)
    light = np.deg2rad(225.0 + rng.uniform(-10.0, 10.0))  # light from the upper left, slightly varying
    if look is not _USUAL:
        theta, light = theta + look.turn, light + np.deg2rad(look.light)
        cy, cx = cy + look.shift * s, cx - look.shift * s

    dy, dx = g.y - cy, g.x - cx
    cos_t, sin_t = np.cos(theta), np.sin(theta)
    u, v = cos_t * dx + sin_t * dy, -sin_t * dx + cos_t * dy  # part-fixed coordinates
    r = _norm(dx, dy)
    phi = np.arctan2(dy, dx)
    lit = (dx * np.cos(light) + dy * np.sin(light)) / radius  # -1..1 across the disc, +1 towards the light

    # Background: a basket-woven conveyor belt with slow brightness drift and the disc's drop shadow.
    cu, cv = u / (s / 24), v / (s / 24)  # in weave cells
    fu, fv = np.floor(cu), np.floor(cv)
    cell_parity = (fu + fv).astype(np.int32) & 1
    thread = np.sin(np.pi * np.where(cell_parity == 0, cv - fv, cu - fu))
    belt = 0.55 + 0.45 * thread + 0.06 * _smooth_noise(rng, g, sigma=s / 10)
    belt *= 1.0 - 0.55 * _bump(
        _norm(dx - 0.025 * s, dy - 0.03 * s) - radius + 0.04 * s, 0.08 * s, plateau=True
    )

    # Disc: turned metal with concentric tool marks, a bevelled knurled rim, a hub and four bolt holes.
    marks = gaussian_filter1d(rng.normal(size=int(radius) + 4), sigma=0.8)
    marks = np.interp(r, np.arange(marks.size), marks / (marks.std() + 1e-9)).astype(np.float32)
    metal = 172.0 * (1.0 + 0.10 * lit) + 7.0 * marks + 4.0 * _smooth_noise(rng, g, sigma=0.015 * s)
    bevel = 1.0 + 0.32 * np.cos(phi - light) + 0.05 * np.sin(72 * (phi - theta))
    metal = np.where(r > 0.86 * radius, 165.0 * bevel + 3.0 * marks, metal)
    metal -= 70.0 * _bump(r - 0.86 * radius, 1.6)  # groove between face and rim
    hub = 0.14 * radius
    metal = np.where(r < hub, 95.0 + 50.0 * np.clip(lit * (radius / hub), -1.0, 1.0), metal)
    metal -= 60.0 * _bump(r - hub, 1.5)
    reach = int(0.075 * radius + 4)
    for offset, distance, *size in holes:
        angle = theta + offset
        factor = size[0] if size else 1.0
        bore = 0.065 * radius * factor
        hy, hx = cy + distance * radius * np.sin(angle), cx + distance * radius * np.cos(angle)
        win = np.s_[max(int(hy) - reach, 0) : int(hy) + reach, max(int(hx) - reach, 0) : int(hx) + reach]
        rh = _norm(g.y[win] - hy, g.x[win] - hx)
        hole = np.clip(bore - rh + 0.5, 0.0, 1.0)
        metal[win] = metal[win] * (1.0 - 0.75 * hole) + 45.0 * _bump(rh - 0.075 * radius * factor, 1.8)

    on_disc = np.clip(radius - r + 0.5, 0.0, 1.0)
    gain = rng.uniform(0.9, 1.1) * rng.uniform(0.97, 1.03, size=3).astype(np.float32)
    belt_rgb, metal_rgb = gain * np.array([[62.0, 70.0, 80.0], look.metal], np.float32)
    image = (belt * (1.0 - on_disc))[..., None] * belt_rgb + (metal * on_disc)[..., None] * metal_rgb
    return image, _Part(cy=cy, cx=cx, radius=radius, scale=s, theta=float(theta))


def _draw_scratch(rng: np.random.Generator, g: _Grid, part: _Part,
                  faint: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Coverage (0..1, anti-aliased) and colour of a thin polyline scratch on the disc face; a `faint` one is
    shorter, thinner and close to the metal's own tone."""
    s = part.scale
    start = _point_on_disc(rng, part, 0.7)
    heading = rng.uniform(0.0, 2 * np.pi)
    n_segments = int(rng.integers(1, 4))
    points = [start]
    for length in rng.uniform(0.18, 0.32) * (0.5 if faint else 1.0) * s * rng.dirichlet(np.ones(n_segments)):
        heading += rng.uniform(-0.6, 0.6)
        points.append(points[-1] + length * np.array([np.sin(heading), np.cos(heading)]))
    dist = np.full((g.height, g.width), np.inf)
    for (y0, x0), (y1, x1) in itertools.pairwise(points):
        dist = np.minimum(dist, _segment_distance(g, y0, x0, y1, x1))
    half_width = rng.uniform(0.8, 1.4) * (0.6 if faint else 1.0)
    fade = 0.8 + 0.2 * _smooth_noise(rng, g, sigma=0.03 * s).clip(-1, 1)
    alpha = np.clip(half_width + 0.5 - dist, 0.0, 1.0) * fade * _on_part(g, part)
    tone = rng.uniform(35.0, 70.0) if rng.random() < 0.6 else rng.uniform(235.0, 255.0)
    if faint:  # a third of the way from the metal's tone to a clear scratch's
        tone = 172.0 + (tone - 172.0) / 3.0
    return alpha, np.full(3, tone) * rng.uniform(0.95, 1.05, size=3)


def _draw_print(rng: np.random.Generator, g: _Grid, part: _Part, image: np.ndarray) -> np.ndarray:
    """A printed batch label on the face between two bolt holes: a dark ink frame with rows of code marks, turned
    with the part (a good part: some batches are printed)."""
    cos_t, sin_t = np.cos(part.theta), np.sin(part.theta)
    dy, dx = g.y - part.cy, g.x - part.cx
    u, v = cos_t * dx + sin_t * dy, -sin_t * dx + cos_t * dy  # part-fixed coordinates
    r0 = 0.42 * part.radius  # the label's centre, between the hub and the holes, on the part's own x axis
    half_u, half_v = 0.2 * part.radius, 0.08 * part.radius
    inside = (np.abs(u - r0) < half_u) & (np.abs(v) < half_v)
    frame = inside & ((np.abs(u - r0) > half_u - 1.5) | (np.abs(v) > half_v - 1.5))
    cells = int(rng.integers(5, 9))
    code = rng.random((2, cells)) < 0.6
    row = np.clip(((v + half_v) / (2 * half_v) * 2).astype(int), 0, 1)
    column = np.clip(((u - r0 + half_u) / (2 * half_u) * cells).astype(int), 0, cells - 1)
    marks = inside & code[row, column] & (np.abs(((u - r0 + half_u) / (2 * half_u) * cells) % 1 - 0.5) < 0.3)
    ink = (frame | marks).astype(np.float32) * _on_part(g, part)
    return image * (1.0 - 0.7 * ink[..., None]) + (0.7 * 30.0) * ink[..., None]


def _draw_spot(rng: np.random.Generator, g: _Grid, part: _Part) -> tuple[np.ndarray, np.ndarray]:
    """Coverage (soft-edged, irregular blob) and textured colour of a stain on the disc face."""
    s = part.scale
    cy, cx = _point_on_disc(rng, part, 0.65)
    size = rng.uniform(0.035, 0.07) * s
    dy, dx = g.y - cy, g.x - cx
    dist, phi = _norm(dy, dx), np.arctan2(dy, dx)
    wobble = sum(rng.uniform(0.0, 0.15) * np.cos(k * phi + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4, 5))
    edge = size * (1.0 + wobble)
    ring = rng.uniform(0.0, 0.5)  # dried stains are darker at their border
    alpha = np.clip((edge - dist) / 1.5 + 0.5, 0.0, 1.0)
    alpha *= rng.uniform(0.7, 0.9) * (1.0 - ring + ring * np.clip(dist / edge, 0.0, 1.0) ** 2)
    alpha *= _on_part(g, part)
    palette = np.array([[150.0, 78.0, 35.0], [38.0, 36.0, 44.0], [80.0, 128.0, 72.0], [60.0, 84.0, 150.0]])
    texture = 1.0 + 0.2 * _smooth_noise(rng, g, sigma=1.2)
    colour = palette[rng.integers(len(palette))] * rng.uniform(0.85, 1.15)
    return alpha, texture[..., None] * colour


def _point_on_disc(rng: np.random.Generator, part: _Part, max_fraction: float) -> np.ndarray:
    """A random (y, x) on the disc face, between the hub and `max_fraction` of the radius."""
    rr = part.radius * rng.uniform(0.25, max_fraction)
    angle = rng.uniform(0.0, 2 * np.pi)
    return np.array([part.cy + rr * np.sin(angle), part.cx + rr * np.cos(angle)])


def _norm(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Euclidean length, elementwise (faster than np.hypot for float32)."""
    return np.sqrt(dx * dx + dy * dy)


def _on_part(g: _Grid, part: _Part) -> np.ndarray:
    """1 on the disc, 0 off it, so that defects never spill onto the belt."""
    return (_norm(g.y - part.cy, g.x - part.cx) < part.radius - 1.0).astype(np.float32)


def _segment_distance(g: _Grid, y0: float, x0: float, y1: float, x1: float) -> np.ndarray:
    """Distance of every pixel centre to the segment (y0, x0)-(y1, x1)."""
    vy, vx = y1 - y0, x1 - x0
    t = np.clip(((g.y - y0) * vy + (g.x - x0) * vx) / max(vy * vy + vx * vx, 1e-12), 0.0, 1.0)
    return _norm(g.y - (y0 + t * vy), g.x - (x0 + t * vx))


def _smooth_noise(rng: np.random.Generator, g: _Grid, sigma: float) -> np.ndarray:
    """Gaussian-blurred white noise rescaled to unit standard deviation.

    Wide blurs are done on a coarser grid and interpolated up: same look, a fraction of the cost.
    """
    step = max(1, int(sigma // 2))
    coarse = (-(-g.height // step), -(-g.width // step))
    noise = gaussian_filter(rng.normal(size=coarse).astype(np.float32), sigma=sigma / step)
    if step > 1:
        noise = np.asarray(Image.fromarray(noise).resize((g.width, g.height), Image.Resampling.BILINEAR))
    return noise / (noise.std() + 1e-12)


def _bump(d: np.ndarray, width: float, plateau: bool = False) -> np.ndarray:
    """Smooth 1 → 0 profile over |d| < width (a cheap stand-in for exp(-d²)); `plateau` keeps 1 for d < 0."""
    t = np.clip(1.0 - (np.maximum(d, 0.0) if plateau else np.abs(d)) / width, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _finish(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Add sensor noise and quantise to uint8."""
    noisy = image + 2.0 * rng.standard_normal(size=image.shape[:2], dtype=np.float32)[..., None]
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _save_rgb(pixels: np.ndarray, path: Path) -> None:
    Image.fromarray(pixels).save(path, compress_level=1)


def _name(index: int, count: int) -> str:
    return f"{index:0{max(3, len(str(count - 1)))}d}"


def _prepare(folder: Path) -> None:
    """Create `folder` and remove numbered PNGs an earlier run left there (and nothing else)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        if old.is_file() and _OWN_FILE.match(old.name):
            old.unlink()


def make_printed_dataset(root: str | Path, *, n_train: int = 20, n_test_good: int = 20, n_test_defect: int = 10,
                         size: tuple[int, int] = (224, 224), seed: int = 0, train_codes: int = 1) -> Path:
    """The generated product (`make_synthetic_dataset`, scratch and spot defects on the part) with a printed lot
    code on a label in its top-left corner, away from the part: a code of dark cells that differs on every test
    part (a date or serial number), while the training parts carry only `train_codes` codes (the lots they came
    from). Writes ``roi.png`` at `root`: white = inspect, black over the label and a margin around it. For the
    regions-of-interest tests and docs/roi.md: without the ROI, new codes raise false alarms."""
    root = make_synthetic_dataset(root, n_train=n_train, n_test_good=n_test_good, n_test_defect=n_test_defect,
                                  size=size, seed=seed, defect_types=("scratch", "spot"))
    height, width = (int(v) for v in size)
    cell = max(2, min(height, width) // 32)
    rows, cols = 3, 7
    top, left = cell, cell
    label = (slice(top, top + (rows + 2) * cell), slice(left, left + (cols + 2) * cell))
    rng = np.random.default_rng([seed, 29])
    lots = [rng.random((rows, cols)) < 0.5 for _ in range(max(1, train_codes))]
    for index, path in enumerate(sorted(p for p in root.glob("t*/*/*.png") if _OWN_FILE.match(p.name)
                                        and p.parent.parent.name in ("train", "test"))):
        code = lots[index % len(lots)] if path.parent.parent.name == "train" else rng.random((rows, cols)) < 0.5
        pixels = np.asarray(Image.open(path).convert("RGB")).copy()
        pixels[label] = 235  # the label
        ink = np.kron(code, np.ones((cell, cell), dtype=bool))
        box = pixels[top + cell:top + (rows + 1) * cell, left + cell:left + (cols + 1) * cell]
        box[ink] = 25
        _save_rgb(pixels, path)
    roi = np.full((height, width), 255, dtype=np.uint8)
    margin = 4 * cell
    roi[:label[0].stop + margin, :label[1].stop + margin] = 0
    Image.fromarray(roi).save(root / "roi.png")
    return root


def make_large_dataset(root: str | Path, *, n_train: int = 10, n_test_good: int = 10, n_test_defect: int = 10,
                       size: tuple[int, int] = (2048, 2048), defect_size: tuple[int, int] = (5, 20),
                       seed: int = 0) -> Path:
    """A fixtured flat part filmed by a large camera, with small defects: a machined plate (a grid of holes and
    milled slots, a brushed texture that differs on every part, a shift of a few pixels, light that varies) whose
    defects are dark pits and short scratches `defect_size` pixels across (5-20 px on a 2048 x 2048 image: one
    pixel or less at the default 224). MVTec layout: ``train/good``, ``test/good``, ``test/pit``,
    ``test/scratch`` (``n_test_defect`` in all, alternating) and ``ground_truth/<type>/NNN_mask.png``. For the
    tiled mode's tests and benchmarks (docs/tiles.md)."""
    root = Path(root)
    height, width = (int(v) for v in size)
    rng = np.random.default_rng([seed, 2048])
    holes = [(y, x) for y in np.linspace(0.15, 0.85, 5) for x in np.linspace(0.15, 0.85, 5)]
    hole_radius = 0.025 * min(height, width)
    slots = [(rng.uniform(0.1, 0.8), rng.uniform(0.1, 0.8), rng.uniform(0.08, 0.2)) for _ in range(6)]

    def plate(part: np.random.Generator) -> np.ndarray:
        dy, dx = part.uniform(-3, 3, size=2)
        y = np.arange(height, dtype=np.float32)[:, None] - dy
        x = np.arange(width, dtype=np.float32)[None, :] - dx
        light = part.uniform(0.9, 1.1)
        image = (150 + 20 * (x / width) + 10 * (y / height)) * light
        image = image + 6 * gaussian_filter1d(part.standard_normal((height, width)).astype(np.float32), 6, axis=1)
        image = np.ascontiguousarray(np.broadcast_to(image, (height, width)), dtype=np.float32)
        reach = int(hole_radius + 8)
        for cy, cx in holes:  # each drawn in its own box: the cost grows with the pixels, not pixels x holes
            top, left = max(0, int(cy * height + dy) - reach), max(0, int(cx * width + dx) - reach)
            box = image[top:top + 2 * reach, left:left + 2 * reach]
            d = np.sqrt((y[top:top + box.shape[0]] - cy * height) ** 2 + (x[:, left:left + box.shape[1]] - cx * width)
                        ** 2)
            box[...] = np.where(d < hole_radius, 40.0, np.where(d < hole_radius + 3, 110.0, box))
        for sy, sx, length in slots:
            top, bottom = max(0, int((sy - 0.01) * height + dy) - 2), int((sy + 0.01) * height + dy) + 2
            box = image[top:bottom]
            inside = (np.abs(y[top:bottom] - sy * height) < 0.01 * height) & (x > sx * width) & \
                (x < (sx + length) * width)
            box[...] = np.where(inside, 90.0, box)
        return image

    def finish(image: np.ndarray, part: np.random.Generator) -> np.ndarray:
        noisy = image + 2.0 * part.standard_normal(image.shape, dtype=np.float32)
        gray = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)

    def defect(image: np.ndarray, kind: str, part: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        extent = part.uniform(*defect_size)
        for _ in range(100):  # on the plate's flat surface, away from holes
            cy, cx = part.uniform(0.05, 0.95) * height, part.uniform(0.05, 0.95) * width
            if min(np.hypot(cy - hy * height, cx - hx * width) for hy, hx in holes) > hole_radius + extent + 8:
                break
        y, x = np.ogrid[:height, :width]
        if kind == "pit":
            mask = (y - cy) ** 2 + (x - cx) ** 2 <= (extent / 2) ** 2
            image = np.where(mask, image * 0.45, image)
        else:
            angle = part.uniform(0, np.pi)
            ey, ex = np.sin(angle) * extent / 2, np.cos(angle) * extent / 2
            t = np.clip(((y - cy + ey) * 2 * ey + (x - cx + ex) * 2 * ex) / max(extent ** 2, 1e-6), 0, 1)
            d = np.hypot(y - (cy - ey + t * 2 * ey), x - (cx - ex + t * 2 * ex))
            mask = d <= max(1.0, extent / 8)
            image = np.where(mask, image * 0.55, image)
        return image, mask

    streams = np.random.SeedSequence([seed, 2049]).spawn(n_train + n_test_good + n_test_defect)
    for split, count, offset in (("train/good", n_train, 0), ("test/good", n_test_good, n_train)):
        folder = root / split
        _prepare(folder)
        for i in range(count):
            part = np.random.default_rng(streams[offset + i])
            _save_rgb(finish(plate(part), part), folder / f"{_name(i, count)}.png")
    kinds = ("pit", "scratch")
    for kind in kinds:
        _prepare(root / "test" / kind)
        _prepare(root / "ground_truth" / kind)
    counters = dict.fromkeys(kinds, 0)
    for i in range(n_test_defect):
        part = np.random.default_rng(streams[n_train + n_test_good + i])
        kind = kinds[i % 2]
        image, mask = defect(plate(part), kind, part)
        name = _name(counters[kind], n_test_defect)
        counters[kind] += 1
        _save_rgb(finish(image, part), root / "test" / kind / f"{name}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(root / "ground_truth" / kind / f"{name}_mask.png")
    return root
