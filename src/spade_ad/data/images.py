"""Reading images robustly: decoding, checks and conversion, the one place the CLI, service and library use.

Every image leaves this module as an 8-bit PIL image in mode "RGB", whatever the file held:
grayscale is replicated to three channels, alpha is dropped, 16-bit data is scaled by its full
range (65535 -> 255) rather than clipped, and float data from files is stretched from its own
min..max to 0..255 (a file holding NaN or infinite pixels is refused: it has no meaningful range).
Every failure to read a file becomes an `ImageReadError` naming the file, with a `kind` ("empty", "too_large",
"unsupported", "corrupt", ...) that programs can act on. Files on disk are read by `read_image`; bytes received from
elsewhere (the HTTP service's uploads) by `decode_bytes`, after the header-only `check_bytes`. Both run the same
checks and decoders.

Over 300 lines: every way an image file can be odd (16-bit, float, palette, EXIF, TIFF fallbacks, NaN,
bombs, truncation, uploads) is handled here and nowhere else, so that every front door refuses the same files alike.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageReadError, NoImagesError

__all__ = [
    "IMAGE_EXTENSIONS",
    "UPLOAD_FORMATS",
    "array_to_rgb",
    "check_bytes",
    "decode_bytes",
    "list_images",
    "read_image",
    "to_rgb",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
UPLOAD_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
"""Formats `decode_bytes` accepts by default (Pillow names; the formats of IMAGE_EXTENSIONS): bytes in any other
format are not even parsed."""


_UINT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# ---------------------------------------------------------------- pixel conversion


def _minmax_to_uint8(a: np.ndarray) -> np.ndarray:
    """Stretch the finite values of `a` from their own min..max to 0..255 (constant images become 0)."""
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, np.uint8)
    lo, hi = a[finite].min(), a[finite].max()
    scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.round(np.clip(np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0), 0, 255)).astype(
        np.uint8
    )


class NonFinitePixelsError(ValueError):
    """Float pixel data from a file with NaN or infinite values; `_decode` names the file (kind "corrupt")."""

    def __init__(self, bad: int, total: int) -> None:
        super().__init__(f"contains NaN/inf pixels ({bad:,} of {total:,}): float image data must be finite")


def _to_uint8(a: np.ndarray, *, from_file: bool) -> np.ndarray:
    """Turn pixel data of any usual dtype into uint8.

    uint8 is kept, bool becomes 0/255 and uint16 is scaled by its full range (>> 8, so 65535 -> 255).
    Data read from a file has no declared range, so floats are stretched min..max (NaN or inf raise
    NonFinitePixelsError) and other integers are treated as 16-bit when they fit, else stretched min..max.
    Arrays handed over in memory follow the usual convention instead: floats are in [0, 1] (clipped), other
    integers must be in 0..255.
    """
    kind, size = a.dtype.kind, a.dtype.itemsize
    if kind == "u" and size == 1:
        return a
    if kind == "b":
        return a.astype(np.uint8) * 255
    if kind == "u" and size == 2:
        return (a >> 8).astype(np.uint8)
    if kind == "f":
        if from_file:
            finite = np.isfinite(a)
            if not finite.all():
                raise NonFinitePixelsError(int(a.size - finite.sum()), int(a.size))
            return _minmax_to_uint8(a)
        return np.round(np.clip(np.nan_to_num(a, nan=0.0), 0.0, 1.0) * 255.0).astype(np.uint8)
    if kind in "iu":
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if not from_file:
            if lo < 0 or hi > 255:
                raise ValueError(
                    f"integer arrays of dtype {a.dtype} must hold values in 0..255 (got {lo}..{hi}); "
                    "pass uint8, uint16, or floats in [0, 1]"
                )
            return a.astype(np.uint8)
        if lo >= 0 and hi <= 65535:
            return (a >> 8).astype(np.uint8)
        return _minmax_to_uint8(a)
    raise TypeError(f"unsupported pixel dtype {a.dtype}; pass uint8, uint16, or floats")


def array_to_rgb(a: np.ndarray, *, from_file: bool) -> Image.Image:
    """Make an RGB image from (H,W), (H,W,1), (H,W,2: gray+alpha), (H,W,3) or (H,W,4: RGBA) data."""
    if a.ndim == 3 and a.shape[-1] in (1, 2):
        a = a[..., 0]
    elif a.ndim == 3 and a.shape[-1] == 4:
        a = a[..., :3]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 3)):
        raise ValueError(f"an image array must have shape (H,W) or (H,W,3), got {a.shape}")
    return Image.fromarray(np.ascontiguousarray(_to_uint8(a, from_file=from_file))).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a loaded PIL image of any mode to "RGB" (returns `img` itself if it already is)."""
    if img.mode == "RGB":
        return img
    if img.mode in _UINT16_MODES or img.mode in ("I", "F"):
        # Pillow's own convert() clips these to 0..255 instead of scaling them.
        return array_to_rgb(np.asarray(img), from_file=True)
    if "transparency" in img.info:
        # Going through RGBA avoids Pillow's warning about palette transparency given as bytes.
        img = img.convert("RGBA")
    return img.convert("RGB")


# ---------------------------------------------------------------- reading files


def _check_pixels(path: object, width: int, height: int, limit: int | None = None) -> None:
    """Refuse empty images and images over `limit` pixels (default: Pillow's decompression-bomb limit,
    PIL.Image.MAX_IMAGE_PIXELS), before decoding them."""
    if width <= 0 or height <= 0:
        raise ImageReadError(path, "image has zero size", kind="empty")
    if limit is not None:
        if width * height > limit:
            raise ImageReadError(
                path, f"image too large: {width} x {height} = {width * height:,} pixels; the limit is {limit:,}",
                kind="too_large",
            )
        return
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ImageReadError(
            path,
            f"image too large: {width} x {height} pixels (the limit is {limit} pixels; "
            "raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file)",
            kind="too_large",
        )


def _bomb_error(path: object, limit: int | None) -> ImageReadError:
    """The error for Pillow's own decompression-bomb refusal (raised by Image.open, before any pixel is decoded)."""
    if limit is not None:
        reason = f"image too large: its header claims over {Image.MAX_IMAGE_PIXELS:,} pixels; the limit is {limit:,}"
    else:
        reason = (
            f"image too large: over {Image.MAX_IMAGE_PIXELS} pixels "
            "(raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file)"
        )
    return ImageReadError(path, reason, kind="too_large")


def _open_error(path: object, exc: Exception, formats: Sequence[str] | None, corrupt: str) -> ImageReadError:
    """The error for a file Pillow could not open or decode: not an image (in `formats`), or `corrupt`."""
    if not isinstance(exc, UnidentifiedImageError):
        return ImageReadError(path, corrupt, kind="corrupt")
    if formats is None:
        return ImageReadError(path, "not an image file", kind="unsupported")
    return ImageReadError(path, f"not an image in a supported format ({', '.join(formats)})", kind="unsupported")


_Source = Path | io.BytesIO
"""Where image data is read from: a file, or bytes in memory."""


def _tiff_fallback(source: _Source, formats: Sequence[str] | None) -> bool:
    """Whether `source` starts with a TIFF or BigTIFF signature (and TIFF is accepted): tifffile may read it."""
    if formats is not None and "TIFF" not in formats:
        return False
    if isinstance(source, io.BytesIO):
        return bytes(source.getbuffer()[:4]) in _TIFF_MAGIC
    try:
        with open(source, "rb") as fh:
            return fh.read(4) in _TIFF_MAGIC
    except OSError:
        return False


def _tiff_size(source: io.BytesIO) -> tuple[int, int]:
    """(width, height) of the first page of TIFF bytes, from its header, with tifffile."""
    import tifffile

    source.seek(0)  # tifffile reads from the current position
    with tifffile.TiffFile(source) as tif:
        page = tif.pages.first
        return page.imagewidth, page.imagelength


def _read_tiff(source: _Source, path: object, limit: int | None = None) -> Image.Image:
    """Read the first page of a TIFF that Pillow cannot handle (float RGB, unusual bit depths) with tifffile."""
    import tifffile

    if isinstance(source, io.BytesIO):
        source.seek(0)  # tifffile reads from the current position
    with tifffile.TiffFile(source) as tif:
        page = tif.pages.first
        _check_pixels(path, page.imagewidth, page.imagelength, limit)
        a = page.asarray()
        if a.ndim == 3 and page.axes.startswith("S"):  # planar storage: channels first
            a = np.moveaxis(a, 0, -1)
    try:
        return array_to_rgb(a, from_file=True)
    except NonFinitePixelsError as exc:
        raise ImageReadError(path, str(exc), kind="corrupt") from exc


def _decode(source: _Source, path: object, limit: int | None, formats: Sequence[str] | None) -> Image.Image:
    """Decode `source` completely into an "RGB" image (read_image and decode_bytes); `path` names it in errors."""
    try:
        with Image.open(source, formats=formats) as img:
            _check_pixels(path, *img.size, limit)
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Raised by Image.open before any pixel is decoded (the warning only when warnings are errors).
        raise _bomb_error(path, limit) from exc
    except MemoryError:
        raise
    except Exception as exc:  # Pillow's decoders raise many types on bad data
        error = _open_error(path, exc, formats, "file is truncated or corrupt")
        if not _tiff_fallback(source, formats):
            raise error from exc
        try:
            return _read_tiff(source, path, limit)
        except ImageReadError:
            raise
        except Exception as tiff_exc:  # tifffile cannot read it either: report what Pillow said
            raise error from tiff_exc

    try:
        return to_rgb(img)
    except NonFinitePixelsError as exc:
        raise ImageReadError(path, str(exc), kind="corrupt") from exc
    except Exception as exc:
        raise ImageReadError(path, f"unsupported image mode {img.mode}", kind="unsupported") from exc


def read_image(path: str | os.PathLike[str]) -> Image.Image:
    """Read an image file fully and return it as an 8-bit "RGB" PIL image.

    The file is decoded completely here, so a truncated or corrupt file fails now rather than halfway
    through a fit. EXIF orientation is applied. TIFFs that Pillow cannot read are read with tifffile.
    Pillow's decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS) is enforced. See `_to_uint8`
    for how 16-bit and float data are scaled. Raises ImageReadError on any failure.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ImageReadError(p, "file not found", kind="missing") from None
    except OSError as exc:
        raise ImageReadError(p, f"cannot access file ({exc.strerror or exc})") from exc
    if stat.S_ISDIR(st.st_mode):
        raise ImageReadError(p, "is a folder, not an image file")
    if st.st_size == 0:
        raise ImageReadError(p, "file is empty", kind="empty")
    return _decode(p, p, None, None)


def check_bytes(
    data: bytes, name: str, *, max_pixels: int | None, formats: Sequence[str] | None = UPLOAD_FORMATS
) -> tuple[int, int]:
    """Check image bytes from their header alone, decoding no pixel; return (width, height).

    The cheap first look at an upload: refuses empty data, data that is not an image in one of `formats`
    (None: any format Pillow reads), a corrupt header, a zero size, and more than `max_pixels` pixels (None:
    Pillow's limit, as `read_image`; Pillow itself always refuses over twice PIL.Image.MAX_IMAGE_PIXELS).
    Raises ImageReadError naming `name`, with `kind` "empty", "unsupported", "corrupt" or "too_large".
    """
    if not data:
        raise ImageReadError(name, "file is empty", kind="empty")
    source = io.BytesIO(data)
    try:
        with Image.open(source, formats=formats) as img:
            size = img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb_error(name, max_pixels) from exc
    except MemoryError:
        raise
    except Exception as exc:  # Pillow's header parsers raise many types on bad data
        error = _open_error(name, exc, formats, "the image header is corrupt")
        if not _tiff_fallback(source, formats):
            raise error from exc
        try:
            size = _tiff_size(source)
        except Exception as tiff_exc:  # tifffile cannot read it either: report what Pillow said
            raise error from tiff_exc
    _check_pixels(name, *size, max_pixels)
    return size


def decode_bytes(
    data: bytes, name: str, *, max_pixels: int | None, formats: Sequence[str] | None = UPLOAD_FORMATS
) -> Image.Image:
    """Decode image bytes completely into an 8-bit "RGB" PIL image, as `read_image` does for a file.

    The checks of `check_bytes` come first (so a decompression bomb is refused before any pixel is decoded); then
    truncated or corrupt data is refused too. EXIF orientation is applied; TIFFs that Pillow cannot read are read
    with tifffile. Raises ImageReadError naming `name`, with `kind` "empty", "unsupported", "corrupt" or "too_large".
    """
    if not data:
        raise ImageReadError(name, "file is empty", kind="empty")
    return _decode(io.BytesIO(data), name, max_pixels, formats)


def list_images(folder: str | os.PathLike[str], recursive: bool = True) -> list[Path]:
    """Image files under `folder`, by extension (case-insensitive), sorted by relative path.

    Hidden files and folders (name starting with ".") are skipped, so .git, .ipynb_checkpoints and
    macOS "._" files never sneak in. Symlinked folders are not followed (no cycles).
    """
    root = Path(folder)
    if not root.exists():
        raise NoImagesError(f"folder not found: {root}")
    if not root.is_dir():
        raise NoImagesError(f"not a folder: {root} (expected a folder of images)")
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(
            Path(dirpath, name)
            for name in filenames
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
        )
        if not recursive:
            break
    if not found:
        where = f"{root} or its subfolders" if recursive else str(root)
        raise NoImagesError(
            f"no images found in {where}; accepted extensions: {', '.join(sorted(IMAGE_EXTENSIONS))} "
            "(hidden files and folders are skipped)"
        )
    found.sort(key=lambda f: f.relative_to(root).parts)
    return found
