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
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter, gaussian_filter1d

__all__ = ["DEFECT_TYPES", "OBJECT_DEFECT_TYPES", "make_synthetic_dataset"]

DEFECT_TYPES: tuple[str, ...] = ("scratch", "spot")
OBJECT_DEFECT_TYPES: tuple[str, ...] = ("missing_hole", "extra_hole", "foreign_part")

# Seed-stream tags, so that e.g. train image 3 is the same whatever the other counts are.
_STREAM = {"train": 0, "good": 1, "scratch": 2, "spot": 3, "missing_hole": 4, "extra_hole": 5, "foreign_part": 6}
_OWN_FILE = re.compile(r"^\d{3,}(_mask)?\.png$")
_MIN_SIDE = 32


@dataclass(frozen=True)
class _Part:
    """Where the disc lies in one image, so that defects can be placed on it."""

    cy: float
    cx: float
    radius: float
    scale: float  # min(height, width): the unit every size is expressed in


def make_synthetic_dataset(
    root: str | Path,
    *,
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_defect: int = 10,
    size: tuple[int, int] = (256, 256),
    seed: int = 0,
    defect_types: Sequence[str] = DEFECT_TYPES,
) -> Path:
    """Write a synthetic dataset under `root` in the MVTec AD layout and return `root`.

    Layout: ``train/good/000.png…``, ``test/good/…``, ``test/<defect>/…`` (``n_test_defect`` per type in
    `defect_types`: any of `DEFECT_TYPES` and `OBJECT_DEFECT_TYPES`) and ``ground_truth/<defect>/000_mask.png…``
    (uint8 0/255 single-channel masks).
    `size` is (height, width).  The same arguments give byte-identical files; numbered PNGs left in these
    folders by an earlier, larger run are removed so that the layout is exact.
    """
    height, width = (int(v) for v in size)
    if min(height, width) < _MIN_SIDE:
        raise ValueError(f"size must be at least {_MIN_SIDE}x{_MIN_SIDE} pixels, got {height}x{width}")
    if n_train < 1 or n_test_good < 0 or n_test_defect < 0:
        raise ValueError(
            f"need n_train >= 1 and n_test_good, n_test_defect >= 0; "
            f"got {n_train}, {n_test_good}, {n_test_defect}"
        )
    unknown = [d for d in defect_types if d not in DEFECT_TYPES + OBJECT_DEFECT_TYPES]
    if unknown or len(set(defect_types)) != len(defect_types):
        raise ValueError(f"defect_types must be distinct names from {DEFECT_TYPES + OBJECT_DEFECT_TYPES}, "
                         f"got {tuple(defect_types)}")
    root = Path(root)
    grid = _Grid(height, width)

    def write_good(folder: Path, stream: str, count: int) -> None:
        _prepare(folder)
        for i in range(count):
            rng = np.random.default_rng([seed, _STREAM[stream], i])
            image, _ = _render_part(rng, grid)
            _save_rgb(_finish(rng, image), folder / f"{_name(i, count)}.png")

    write_good(root / "train" / "good", "train", n_train)
    write_good(root / "test" / "good", "good", n_test_good)
    for defect in defect_types:
        image_dir, mask_dir = root / "test" / defect, root / "ground_truth" / defect
        _prepare(image_dir)
        _prepare(mask_dir)
        for i in range(n_test_defect):
            rng = np.random.default_rng([seed, _STREAM[defect], i])
            if defect in OBJECT_DEFECT_TYPES:
                image, mask = _object_defect(rng, grid, defect)
            else:
                image, part = _render_part(rng, grid)
                draw = _draw_scratch if defect == "scratch" else _draw_spot
                alpha, colour = draw(rng, grid, part)
                image = image * (1.0 - alpha[..., None]) + colour * alpha[..., None]
                mask = alpha > 0
            name = _name(i, n_test_defect)
            _save_rgb(_finish(rng, image), image_dir / f"{name}.png")
            Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(
                mask_dir / f"{name}_mask.png", compress_level=1
            )
    return root


def _object_defect(rng: np.random.Generator, g: _Grid, defect: str) -> tuple[np.ndarray, np.ndarray]:
    """A part with a missing hole, an extra hole or a washer lying on it, and the mask of where it differs."""
    if defect == "foreign_part":
        image, part = _render_part(rng, g)
        cy, cx = _point_on_disc(rng, part, 0.7)
        outer = rng.uniform(0.09, 0.14) * part.radius
        ring = _norm(g.y - cy, g.x - cx)
        coverage = np.clip(outer - ring + 0.5, 0.0, 1.0) * np.clip(ring - 0.45 * outer + 0.5, 0.0, 1.0)
        tone = 200.0 + 40.0 * np.clip((g.x - cx - (g.y - cy)) / outer, -1.0, 1.0)  # lit from the upper left
        image = image * (1.0 - coverage[..., None]) + (tone * coverage)[..., None] * np.ones(3, np.float32)
        return image, coverage > 0
    if defect == "missing_hole":
        gone = int(rng.integers(4))
        holes = tuple(h for k, h in enumerate(_HOLES) if k != gone)
    else:  # extra_hole: between two of the four, nearer the hub or the rim
        holes = (*_HOLES, (int(rng.integers(4)) * np.pi / 2, float(rng.choice([0.35, 0.78]))))
    state = rng.bit_generator.state
    good, _ = _render_part(rng, g)  # the good part in the same pose, to compare against
    rng.bit_generator.state = state
    image, _ = _render_part(rng, g, holes)
    mask = np.abs(image - good).max(axis=2) > 8.0
    return image, mask


class _Grid:
    """Pixel-centre coordinates of an image, computed once per dataset."""

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width
        self.scale = float(min(height, width))
        self.y, self.x = np.mgrid[0:height, 0:width].astype(np.float32)


#: The bolt holes of a good part: (angle from the part's orientation, distance from the centre / radius).
_HOLES: tuple[tuple[float, float], ...] = tuple((np.pi / 4 + k * np.pi / 2, 0.6) for k in range(4))


def _render_part(rng: np.random.Generator, g: _Grid,
                 holes: tuple[tuple[float, float], ...] = _HOLES) -> tuple[np.ndarray, _Part]:
    """One product image as float RGB in [0, 255] (before sensor noise), and where its disc lies; good with the
    default `holes`."""
    s = g.scale
    cy = g.height / 2 + rng.uniform(-0.03, 0.03) * s
    cx = g.width / 2 + rng.uniform(-0.03, 0.03) * s
    theta = np.deg2rad(rng.uniform(-12.0, 12.0))
    radius = 0.36 * s * rng.uniform(0.98, 1.02)
    light = np.deg2rad(225.0 + rng.uniform(-10.0, 10.0))  # light from the upper left, slightly varying

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
    for offset, distance in holes:
        angle = theta + offset
        hy, hx = cy + distance * radius * np.sin(angle), cx + distance * radius * np.cos(angle)
        win = np.s_[max(int(hy) - reach, 0) : int(hy) + reach, max(int(hx) - reach, 0) : int(hx) + reach]
        rh = _norm(g.y[win] - hy, g.x[win] - hx)
        hole = np.clip(0.065 * radius - rh + 0.5, 0.0, 1.0)
        metal[win] = metal[win] * (1.0 - 0.75 * hole) + 45.0 * _bump(rh - 0.075 * radius, 1.8)

    on_disc = np.clip(radius - r + 0.5, 0.0, 1.0)
    gain = rng.uniform(0.9, 1.1) * rng.uniform(0.97, 1.03, size=3).astype(np.float32)
    belt_rgb, metal_rgb = gain * np.array([[62.0, 70.0, 80.0], [1.0, 1.01, 1.04]], np.float32)
    image = (belt * (1.0 - on_disc))[..., None] * belt_rgb + (metal * on_disc)[..., None] * metal_rgb
    return image, _Part(cy=cy, cx=cx, radius=radius, scale=s)


def _draw_scratch(rng: np.random.Generator, g: _Grid, part: _Part) -> tuple[np.ndarray, np.ndarray]:
    """Coverage (0..1, anti-aliased) and colour of a thin polyline scratch on the disc face."""
    s = part.scale
    start = _point_on_disc(rng, part, 0.7)
    heading = rng.uniform(0.0, 2 * np.pi)
    n_segments = int(rng.integers(1, 4))
    points = [start]
    for length in rng.uniform(0.18, 0.32) * s * rng.dirichlet(np.ones(n_segments)):
        heading += rng.uniform(-0.6, 0.6)
        points.append(points[-1] + length * np.array([np.sin(heading), np.cos(heading)]))
    dist = np.full((g.height, g.width), np.inf)
    for (y0, x0), (y1, x1) in itertools.pairwise(points):
        dist = np.minimum(dist, _segment_distance(g, y0, x0, y1, x1))
    half_width = rng.uniform(0.8, 1.4)
    fade = 0.8 + 0.2 * _smooth_noise(rng, g, sigma=0.03 * s).clip(-1, 1)
    alpha = np.clip(half_width + 0.5 - dist, 0.0, 1.0) * fade * _on_part(g, part)
    tone = rng.uniform(35.0, 70.0) if rng.random() < 0.6 else rng.uniform(235.0, 255.0)
    return alpha, np.full(3, tone) * rng.uniform(0.95, 1.05, size=3)


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
