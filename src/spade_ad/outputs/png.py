"""PNG files written fast: `encode_png` (8-bit greyscale or RGB, every row "Up"-filtered by numpy, deflated by Intel
ISA-L, about six times Pillow's speed) and `save_png` (an image to a file, by `encode_png` where it can). The files
of `predict`, `watch` and the Ray actors and the service's pictures are all encoded here, at `PNG_LEVEL`."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["PNG_LEVEL", "encode_png", "save_png"]

#: ISA-L's deflate level for the PNGs (0-3): level 1 gives zlib level 2's size at a third of its time (an overlay of
#: bottle, 900 x 900: 4.6 ms and 697 kB against 30 ms and 696 kB; docs/outputs.md).
PNG_LEVEL = 1
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def save_png(img: Image.Image, path: str | Path, *, compress_level: int = PNG_LEVEL) -> Path:
    """Save `img` as PNG at `path` (deflate level `compress_level`, 0-3), creating parent folders; return the path.
    8-bit greyscale and RGB images are encoded by `encode_png`, others by Pillow (at zlib's level 1)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if img.mode in ("L", "RGB"):
        path.write_bytes(encode_png(np.asarray(img), compress_level))
    else:
        img.save(path, format="PNG", compress_level=1)
    return path


def encode_png(pixels: np.ndarray, level: int = PNG_LEVEL) -> bytes:
    """The PNG file of an 8-bit greyscale (H, W) or RGB (H, W, 3) array, every row "Up"-filtered (its difference to
    the row above, computed by numpy for the whole image at once) and deflated by Intel ISA-L (`isal`) at `level`
    (0-3; it releases the GIL, so the file pool encodes beside the scoring). About six times Pillow's speed for the
    same size (docs/outputs.md): Pillow tries all five PNG filters on every row and deflates with zlib."""
    from isal import isal_zlib  # deferred: only pictures need it

    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)) or pixels.size == 0:
        raise ValueError(f"encode_png takes a non-empty (H, W) or (H, W, 3) array, got shape {pixels.shape}")
    height, width = pixels.shape[:2]
    rows = pixels.reshape(height, -1)
    raw = np.empty((height, rows.shape[1] + 1), dtype=np.uint8)
    raw[:, 0] = 2  # filter type Up; the first row's "row above" is zeros
    raw[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])  # modulo 256, as PNG wants
    header = struct.pack(">IIBBBBB", width, height, 8, 0 if pixels.ndim == 2 else 2, 0, 0, 0)
    return b"".join((_PNG_SIGNATURE, _png_chunk(b"IHDR", header), _png_chunk(b"IDAT", isal_zlib.compress(raw, level)),
                     _png_chunk(b"IEND", b"")))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
