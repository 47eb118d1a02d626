"""How the generated products are drawn (`spade_ad.data.synthetic` makes the data sets from them): the metal part on its
belt (`Grid`, `render_part`), its looks (the rare good variants, the second capture session), the defects drawn on
it with their exact masks (`defect_image`: scratches, spots, dents, holes and parts; the defect kinds it draws) and
the camera's noise.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter, gaussian_filter1d

DEFECT_TYPES: tuple[str, ...] = ("scratch", "spot")
OBJECT_DEFECT_TYPES: tuple[str, ...] = ("missing_hole", "extra_hole", "foreign_part")

#: Defects a little above the good parts' own variation: low-contrast scratch, a dent seen only by its shading, a
#: bolt hole drilled about 30% too small.
SUBTLE_DEFECT_TYPES: tuple[str, ...] = ("faint_scratch", "dent", "small_hole")

#: The line product's test defects: the subtle ones and one object defect.
LINE_DEFECT_TYPES: tuple[str, ...] = (*SUBTLE_DEFECT_TYPES, "missing_hole")

#: Rare good variants: an unusual pose (turned 45 degrees, off centre), colour (brass) and print (a batch label).
RARE_KINDS: tuple[str, ...] = ("pose", "colour", "print")


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
SESSION_TWO = {"light": 12.0, "gain": (0.97, 0.95, 0.92)}
#: Further capture sessions of the training images (`make_synthetic_dataset(train_sessions=...)`): the light turned
#: the other way or further, a little brighter or dimmer, cooler or warmer.
TRAIN_SESSIONS = ({}, {"light": -8.0, "gain": (1.02, 1.01, 0.97)}, {"light": 5.0, "gain": (0.98, 0.99, 1.02)})


def looks(kind: str | None, session: dict[str, Any]) -> _Look:
    """The look of a good part of rare `kind` (None: usual) captured in `session`."""
    base = _RARE_LOOKS[kind] if kind else _USUAL
    return _Look(base.turn, base.shift, base.metal, session.get("light", 0.0))


def defect_image(rng: np.random.Generator, g: Grid, defect: str, session: dict[str, Any]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """A defective part of type `defect` (finished: noise and uint8) and its mask."""
    look = looks(None, session)
    if defect in OBJECT_DEFECT_TYPES or defect in ("dent", "small_hole"):
        image, mask = _object_defect(rng, g, defect, look)
    else:
        image, part = render_part(rng, g, look=look)
        if defect == "spot":
            alpha, colour = _draw_spot(rng, g, part)
        else:
            alpha, colour = _draw_scratch(rng, g, part, faint=defect == "faint_scratch")
        image = image * (1.0 - alpha[..., None]) + colour * alpha[..., None]
        mask = alpha > 0
    return finish(rng, captured(image, session)), mask


def captured(image: np.ndarray, session: dict[str, Any]) -> np.ndarray:
    """The image as the camera of `session` sees it: its brightness and tint (the light's turn is rendered)."""
    if "gain" not in session:
        return image
    return image * np.asarray(session["gain"], np.float32)


def _object_defect(rng: np.random.Generator, g: Grid, defect: str,
                   look: _Look = _USUAL) -> tuple[np.ndarray, np.ndarray]:
    """A part with a missing hole, an extra hole, a washer lying on it, a dent or an undersized hole, and the mask
    of where it differs from the good part in the same pose."""
    if defect == "foreign_part":
        image, part = render_part(rng, g, look=look)
        cy, cx = _point_on_disc(rng, part, 0.7)
        outer = rng.uniform(0.09, 0.14) * part.radius
        ring = _norm(g.y - cy, g.x - cx)
        coverage = np.clip(outer - ring + 0.5, 0.0, 1.0) * np.clip(ring - 0.45 * outer + 0.5, 0.0, 1.0)
        tone = 200.0 + 40.0 * np.clip((g.x - cx - (g.y - cy)) / outer, -1.0, 1.0)  # lit from the upper left
        image = image * (1.0 - coverage[..., None]) + (tone * coverage)[..., None] * np.ones(3, np.float32)
        return image, coverage > 0
    if defect == "dent":
        state = rng.bit_generator.state
        good, part = render_part(rng, g, look=look)
        rng.bit_generator.state = state
        image, _ = render_part(rng, g, look=look)
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
    good, _ = render_part(rng, g, look=look)  # the good part in the same pose, to compare against
    rng.bit_generator.state = state
    image, _ = render_part(rng, g, holes, look=look)
    mask = np.abs(image - good).max(axis=2) > 8.0
    return image, mask


class Grid:
    """Pixel-centre coordinates of an image, computed once per dataset."""

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width
        self.scale = float(min(height, width))
        self.y, self.x = np.mgrid[0:height, 0:width].astype(np.float32)


#: The bolt holes of a good part: (angle from the part's orientation, distance from the centre / radius[, size
#: factor of the hole]).
_HOLES: tuple[tuple[float, ...], ...] = tuple((np.pi / 4 + k * np.pi / 2, 0.6) for k in range(4))


def render_part(rng: np.random.Generator, g: Grid, holes: tuple[tuple[float, ...], ...] = _HOLES, *,
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


def _draw_scratch(rng: np.random.Generator, g: Grid, part: _Part,
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


def draw_print(rng: np.random.Generator, g: Grid, part: _Part, image: np.ndarray) -> np.ndarray:
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


def _draw_spot(rng: np.random.Generator, g: Grid, part: _Part) -> tuple[np.ndarray, np.ndarray]:
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


def _on_part(g: Grid, part: _Part) -> np.ndarray:
    """1 on the disc, 0 off it, so that defects never spill onto the belt."""
    return (_norm(g.y - part.cy, g.x - part.cx) < part.radius - 1.0).astype(np.float32)


def _segment_distance(g: Grid, y0: float, x0: float, y1: float, x1: float) -> np.ndarray:
    """Distance of every pixel centre to the segment (y0, x0)-(y1, x1)."""
    vy, vx = y1 - y0, x1 - x0
    t = np.clip(((g.y - y0) * vy + (g.x - x0) * vx) / max(vy * vy + vx * vx, 1e-12), 0.0, 1.0)
    return _norm(g.y - (y0 + t * vy), g.x - (x0 + t * vx))


def _smooth_noise(rng: np.random.Generator, g: Grid, sigma: float) -> np.ndarray:
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


def finish(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Add sensor noise and quantise to uint8."""
    noisy = image + 2.0 * rng.standard_normal(size=image.shape[:2], dtype=np.float32)[..., None]
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
