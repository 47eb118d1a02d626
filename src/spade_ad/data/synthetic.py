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

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter1d

from .synthetic_drawing import (
    DEFECT_TYPES,
    LINE_DEFECT_TYPES,
    OBJECT_DEFECT_TYPES,
    SESSION_TWO,
    SUBTLE_DEFECT_TYPES,
    TRAIN_SESSIONS,
    Grid,
    captured,
    defect_image,
    draw_print,
    finish,
    looks,
    render_part,
)

__all__ = ["make_large_dataset", "make_line_dataset", "make_printed_dataset", "make_synthetic_dataset", "read_variants"]




_ALL_DEFECTS = DEFECT_TYPES + OBJECT_DEFECT_TYPES + SUBTLE_DEFECT_TYPES
#: The first training session's capture time with `train_sessions` (2026-01-05 06:00 UTC): fixed, so runs agree.
_SESSION_EPOCH = 1767592800


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
    train_sessions: int = 1,
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
    degrees, dimmer and warmer). `train_sessions` (1 to 3): the training images are captured in that many sessions
    (`TRAIN_SESSIONS`: each its own light), in equal runs, and their file times are set three hours apart from one
    session to the next (`spade_ad.data.sessions` finds them). With any of them, ``variants.json`` names the rare and
    defective images and the sessions.
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
    if not 1 <= train_sessions <= len(TRAIN_SESSIONS) or train_sessions > n_train:
        raise ValueError(f"train_sessions must be between 1 and {min(len(TRAIN_SESSIONS), n_train)}, "
                         f"got {train_sessions}")
    if not 0 <= train_defects <= n_train // 2:
        raise ValueError(f"train_defects must be between 0 and half of n_train ({n_train // 2}), got {train_defects}")
    root = Path(root)
    grid = Grid(height, width)
    slipped = _slipped_positions(n_train, train_defects, rare_goods)
    session = SESSION_TWO if second_session else {}
    manifest: dict[str, dict[str, str]] = {"train": {}, "test": {}}

    def write_good(folder: Path, stream: str, count: int, split: str, session_look: dict[str, Any]) -> None:
        _prepare(folder)
        for i in range(count):
            name = _name(i, count)
            look = TRAIN_SESSIONS[i * train_sessions // count] if split == "train" and train_sessions > 1 \
                else session_look
            rng = np.random.default_rng([seed, _STREAM[stream], i])
            if split == "train" and i in slipped:  # a defective part in the good folder
                defect = _SLIPPED[slipped.index(i) % len(_SLIPPED)]
                pixels, _ = defect_image(np.random.default_rng([seed, _STREAM[defect], 1000 + i]), grid, defect,
                                          look)
                _save_rgb(pixels, folder / f"{name}.png")
                manifest[split][f"{split}/good/{name}.png"] = f"defect:{defect}"
                continue
            kind = _RARE_AT.get(i % _RARE_CYCLE) if rare_goods else None
            image, part = render_part(rng, grid, look=looks(kind, look))
            if kind == "print":
                image = draw_print(np.random.default_rng([seed, _STREAM["print"], i]), grid, part, image)
            if kind is not None:
                manifest[split][f"{split}/good/{name}.png"] = f"rare:{kind}"
            _save_rgb(finish(rng, captured(image, look)), folder / f"{name}.png")
        if split == "train" and train_sessions > 1:  # capture times: sessions three hours apart
            for i in range(count):
                stamp = _SESSION_EPOCH + 3 * 3600 * (i * train_sessions // count) + 10 * i
                os.utime(folder / f"{_name(i, count)}.png", (stamp, stamp))

    write_good(root / "train" / "good", "train", n_train, "train", {})
    write_good(root / "test" / "good", "good", n_test_good, "test", session)
    for defect in defect_types:
        image_dir, mask_dir = root / "test" / defect, root / "ground_truth" / defect
        _prepare(image_dir)
        _prepare(mask_dir)
        for i in range(n_test_defect):
            pixels, mask = defect_image(np.random.default_rng([seed, _STREAM[defect], i]), grid, defect, session)
            name = _name(i, n_test_defect)
            _save_rgb(pixels, image_dir / f"{name}.png")
            Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(
                mask_dir / f"{name}_mask.png", compress_level=1
            )
    notes = root / "variants.json"
    if rare_goods or train_defects or second_session or train_sessions > 1:
        manifest["session"] = {"train": "first" if train_sessions == 1 else f"{train_sessions} sessions",
                               "test": "second" if second_session else "first"}
        notes.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    elif notes.is_file():
        notes.unlink()
    return root


def make_line_dataset(root: str | Path, *, n_train: int = 80, n_test_good: int = 40, n_test_defect: int = 10,
                      size: tuple[int, int] = (256, 256), seed: int = 0, train_defects: int = 2,
                      train_sessions: int = 1) -> Path:
    """The third generated product (`bench_accuracy`'s ``synthetic_line``): the disc as a line sees it. Rare good
    variants in training and test, `LINE_DEFECT_TYPES` (subtle defects and a missing hole), `train_defects`
    defective parts in the training folder and every test image from a second capture session; see
    `make_synthetic_dataset`. 80 training and 40 good test images, so that 1% and 5% false alarms differ."""
    return make_synthetic_dataset(root, n_train=n_train, n_test_good=n_test_good, n_test_defect=n_test_defect,
                                  size=size, seed=seed, defect_types=LINE_DEFECT_TYPES, rare_goods=True,
                                  train_defects=train_defects, second_session=True,
                                  train_sessions=train_sessions)


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
