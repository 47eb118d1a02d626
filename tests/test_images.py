"""Tests for spade_ad.data.images and spade_ad.data.inputs: robust image reading, folder listing, input collection,
loading."""

from __future__ import annotations

import io
import random
import struct
import threading
import time
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image, features

from spade_ad.data import images as data
from spade_ad.data.images import IMAGE_EXTENSIONS, list_images, read_image
from spade_ad.data.inputs import ImageItem, collect_images, iter_loaded
from spade_ad.errors import ImageReadError, ImageTooLargeError, NoImagesError


def _rgb_array(h: int = 5, w: int = 7, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path: Path, img: Image.Image, **kwargs: object) -> Path:
    img.save(path, **kwargs)
    return path


def _channels_equal(img: Image.Image) -> bool:
    a = np.asarray(img)
    return bool((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all())


# ---------------------------------------------------------------- read_image: formats and modes


def test_image_extensions() -> None:
    assert {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"} == IMAGE_EXTENSIONS
    assert all(ext == ext.lower() for ext in IMAGE_EXTENSIONS)


@pytest.mark.parametrize(
    ("suffix", "lossless"), [(".png", True), (".jpg", False), (".bmp", True), (".tif", True), (".webp", True)]
)
def test_format_round_trip(tmp_path: Path, suffix: str, lossless: bool) -> None:
    if suffix == ".webp" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    a = _rgb_array()
    options = {"lossless": True} if suffix == ".webp" else {}
    path = _save(tmp_path / f"img{suffix}", Image.fromarray(a), **options)
    img = read_image(path)
    assert img.mode == "RGB"
    assert img.size == (7, 5)
    if lossless:
        np.testing.assert_array_equal(np.asarray(img), a)


def test_read_accepts_str_path(tmp_path: Path) -> None:
    path = _save(tmp_path / "a.png", Image.fromarray(_rgb_array()))
    assert read_image(str(path)).size == (7, 5)


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grayscale_becomes_rgb_with_equal_channels(tmp_path: Path, mode: str) -> None:
    gray = Image.fromarray(np.arange(35, dtype=np.uint8).reshape(5, 7) * 7).convert(mode)
    img = read_image(_save(tmp_path / "g.png", gray))
    assert img.mode == "RGB"
    assert img.size == (7, 5)
    assert _channels_equal(img)
    np.testing.assert_array_equal(np.asarray(img)[..., 0], np.asarray(gray.convert("L")))


def test_rgba_drops_alpha(tmp_path: Path) -> None:
    a = np.zeros((2, 3, 4), np.uint8)
    a[..., 0], a[..., 1], a[..., 2], a[..., 3] = 10, 20, 30, 0
    img = read_image(_save(tmp_path / "rgba.png", Image.fromarray(a)))
    assert img.mode == "RGB"
    assert (np.asarray(img) == [10, 20, 30]).all()


def test_la_drops_alpha(tmp_path: Path) -> None:
    la = Image.merge("LA", (Image.new("L", (3, 2), 77), Image.new("L", (3, 2), 0)))
    img = read_image(_save(tmp_path / "la.png", la))
    assert (np.asarray(img) == 77).all()


@pytest.mark.parametrize("transparency", [None, 0, bytes([0, 128, 255])])
def test_palette_with_and_without_transparency_no_warning(tmp_path: Path, transparency: object) -> None:
    pal = Image.new("P", (4, 2))
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (253 * 3))
    pal.putdata([0, 1, 2, 0, 1, 2, 0, 1])
    kwargs = {} if transparency is None else {"transparency": transparency}
    path = _save(tmp_path / "p.png", pal, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img = read_image(path)
    assert img.mode == "RGB"
    assert tuple(np.asarray(img)[0, 0]) == (255, 0, 0)
    assert tuple(np.asarray(img)[0, 1]) == (0, 255, 0)


def test_16bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    a = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    path = _save(tmp_path / "a16.png", Image.fromarray(a))
    with Image.open(path) as raw:
        assert raw.mode == "I;16"
    img = read_image(path)
    assert img.mode == "RGB"
    out = np.asarray(img)
    assert _channels_equal(img)
    assert out[0, 3, 0] == 255
    assert abs(int(out[0, 2, 0]) - 128) <= 1
    assert out[0, 1, 0] == 1
    assert out[0, 0, 0] == 0


def test_16bit_rgb_tiff(tmp_path: Path) -> None:
    a = np.random.default_rng(1).integers(0, 65536, (6, 5, 3), dtype=np.uint16)
    a[0, 0] = (65535, 32768, 0)
    path = tmp_path / "rgb16.tif"
    tifffile.imwrite(path, a, photometric="rgb")
    img = read_image(path)
    assert img.mode == "RGB"
    assert img.size == (5, 6)
    out = np.asarray(img).astype(int)
    assert np.abs(out - (a >> 8)).max() <= 1
    assert out[0, 0, 0] == 255
    assert out[0, 0, 2] == 0


def test_float_tiff_is_stretched_min_to_max(tmp_path: Path) -> None:
    a = np.linspace(-2.0, 3.0, 12, dtype=np.float32).reshape(3, 4)
    path = tmp_path / "f.tif"
    tifffile.imwrite(path, a)
    with Image.open(path) as raw:
        assert raw.mode == "F"
    out = np.asarray(read_image(path))
    assert out.shape == (3, 4, 3)
    assert out.min() == 0
    assert out.max() == 255
    assert (np.diff(out[..., 0].ravel().astype(int)) >= 0).all()


def test_constant_float_tiff_is_black(tmp_path: Path) -> None:
    path = tmp_path / "c.tif"
    tifffile.imwrite(path, np.full((2, 2), 7.5, np.float32))
    assert (np.asarray(read_image(path)) == 0).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("channels", [1, 3])  # one channel: Pillow reads it (mode F); three: tifffile does
def test_float_tiff_with_nan_or_inf_is_refused(tmp_path: Path, bad: float, channels: int) -> None:
    """A stretch from min..max has no meaning with NaN/inf pixels: refused naming the file, never scored silently."""
    a = np.linspace(0.0, 1.0, 4 * 5 * channels, dtype=np.float32).reshape((4, 5, channels)[: 2 + (channels > 1)])
    a[(1, 2)] = bad
    path = tmp_path / "nan.tif"
    tifffile.imwrite(path, a, photometric="rgb" if channels == 3 else "minisblack")
    for read in (lambda: read_image(path), lambda: data.decode_bytes(path.read_bytes(), str(path), max_pixels=None)):
        with pytest.raises(ImageReadError, match="nan.tif: contains NaN/inf pixels") as info:
            read()
        assert info.value.kind == "corrupt"


def test_in_memory_float_image_with_nan_is_refused_naming_it() -> None:
    image = Image.fromarray(np.array([[0.0, np.nan], [1.0, 2.0]], dtype=np.float32))
    with pytest.raises(ImageReadError, match="image_0003: contains NaN/inf pixels") as info:
        ImageItem("image_0003", image=image).load()
    assert info.value.kind == "corrupt"


def test_float_rgb_tiff_read_with_tifffile(tmp_path: Path) -> None:
    a = np.linspace(0.0, 10.0, 4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)
    path = tmp_path / "frgb.tif"
    tifffile.imwrite(path, a, photometric="rgb")
    img = read_image(path)
    assert img.mode == "RGB"
    assert img.size == (5, 4)
    out = np.asarray(img)
    assert out[0, 0, 0] == 0
    assert out[-1, -1, -1] == 255


def test_planar_tiff(tmp_path: Path) -> None:
    a = _rgb_array(4, 6)
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, np.moveaxis(a, -1, 0), photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(np.asarray(read_image(path)), a)


def test_exif_orientation_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    path = _save(tmp_path / "rot.jpg", Image.new("RGB", (40, 20), (200, 10, 10)), exif=exif)
    assert read_image(path).size == (20, 40)


# ---------------------------------------------------------------- read_image: failures


def test_truncated_png(tmp_path: Path) -> None:
    path = _save(tmp_path / "cut.png", Image.fromarray(_rgb_array(64, 64)))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ImageReadError, match="truncated or corrupt") as info:
        read_image(path)
    assert str(path) in str(info.value)
    assert info.value.path == str(path)


def test_truncated_tiff(tmp_path: Path) -> None:
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint16), photometric="rgb")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ImageReadError, match="truncated or corrupt"):
        read_image(path)


def test_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageReadError, match="not an image file") as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.touch()
    with pytest.raises(ImageReadError, match="file is empty"):
        read_image(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="file not found"):
        read_image(tmp_path / "nope.png")


def test_folder_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="folder"):
        read_image(tmp_path)


def _png_with_header_size(path: Path, width: int, height: int) -> Path:
    """A real 1x1 PNG whose IHDR claims another size (CRC fixed), so nothing large is ever written."""
    Image.new("RGB", (1, 1)).save(path)
    raw = bytearray(path.read_bytes())
    assert raw[12:16] == b"IHDR"
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    path.write_bytes(bytes(raw))
    return path


def test_decompression_bomb_is_refused_quickly(tmp_path: Path) -> None:
    path = _png_with_header_size(tmp_path / "bomb.png", 30000, 30000)
    start = time.perf_counter()
    with pytest.raises(ImageReadError, match="image too large") as info:
        read_image(path)
    assert time.perf_counter() - start < 1.0
    assert str(path) in str(info.value)


@pytest.mark.parametrize("action", ["ignore", "error"])
def test_image_over_pixel_limit_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, action: str
) -> None:
    path = _save(tmp_path / "big.png", Image.new("RGB", (8, 8)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # 64 pixels: Pillow only warns (< 2 x limit)
    with warnings.catch_warnings():
        warnings.simplefilter(action)
        with pytest.raises(ImageReadError, match="image too large"):
            read_image(path)


# ---------------------------------------------------------------- list_images


def _touch_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2)).save(path, format="PNG")
    return path


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for rel in [
        "b.png",
        "a.JPG",
        "sub/c.tif",
        "sub/deeper/e.bmp",
        ".hidden.png",
        ".git/d.png",
        "sub/.x/f.png",
    ]:
        _touch_image(root / rel)
    (root / "notes.txt").write_text("x")
    (root / "sub" / "folder.png").mkdir()  # a folder with an image-like name is not an image
    return root


def _rel(paths: list[Path], root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in paths]


def test_list_images_recursive_sorted_hidden_skipped(image_tree: Path) -> None:
    assert _rel(list_images(image_tree), image_tree) == ["a.JPG", "b.png", "sub/c.tif", "sub/deeper/e.bmp"]


def test_list_images_not_recursive(image_tree: Path) -> None:
    assert _rel(list_images(str(image_tree), recursive=False), image_tree) == ["a.JPG", "b.png"]


def test_list_images_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(NoImagesError) as info:
        list_images(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert ".png" in str(info.value)


def test_list_images_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(NoImagesError, match="folder not found"):
        list_images(tmp_path / "missing")


def test_list_images_on_a_file(tmp_path: Path) -> None:
    path = _touch_image(tmp_path / "a.png")
    with pytest.raises(NoImagesError, match="not a folder"):
        list_images(path)


# ---------------------------------------------------------------- collect_images


def test_collect_folder(image_tree: Path) -> None:
    for arg in (image_tree, str(image_tree)):
        items = collect_images(arg)
        assert [it.name for it in items] == ["a.JPG", "b.png", "sub/c.tif", "sub/deeper/e.bmp"]
        assert all(it.path is not None and it.image is None for it in items)
        assert items[2].path == image_tree / "sub" / "c.tif"


def test_collect_single_file(tmp_path: Path) -> None:
    path = _touch_image(tmp_path / "one.png")
    (item,) = collect_images(str(path))
    assert item.path == path
    assert item.name == path.as_posix()
    assert item.load().size == (2, 2)


def test_collect_mixed_list(image_tree: Path, tmp_path: Path) -> None:
    file = _touch_image(tmp_path / "single.png")
    pil = Image.new("L", (3, 3), 9)
    items = collect_images([file, pil, image_tree / "sub"])
    assert [it.name for it in items] == [
        file.as_posix(),
        "image_0001",
        "sub/c.tif",
        "sub/deeper/e.bmp",
    ]
    assert items[1].image is pil
    loaded = items[1].load()
    assert loaded.mode == "RGB"
    assert pil.mode == "L"  # the caller's image is not modified


def test_collect_tuple_of_arrays() -> None:
    items = collect_images((np.zeros((4, 5), np.uint8), np.zeros((4, 5, 3), np.uint8)))
    assert [it.name for it in items] == ["image_0000", "image_0001"]
    assert all(it.load().size == (5, 4) for it in items)


@pytest.mark.parametrize(
    ("shape", "count"),
    [((3, 4, 5, 3), 3), ((3, 4, 5), 3), ((4, 5, 3), 1), ((4, 5), 1), ((2, 4, 5, 1), 2)],
)
def test_collect_numpy_shapes(shape: tuple[int, ...], count: int) -> None:
    a = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    items = collect_images(a)
    assert [it.name for it in items] == [f"image_{i:04d}" for i in range(count)]
    first = items[0].load()
    assert first.mode == "RGB"
    assert first.size == (5, 4)
    expected = a if count == 1 else a[0]
    if expected.ndim == 3 and expected.shape[-1] == 1:
        expected = expected[..., 0]
    if expected.ndim == 2:
        expected = np.repeat(expected[..., None], 3, axis=-1)
    np.testing.assert_array_equal(np.asarray(first), expected)


def test_collect_numpy_uint16_and_float() -> None:
    u16 = np.array([[[0, 256, 32768, 65535]]], dtype=np.uint16)  # (N=1, H=1, W=4) gray batch
    assert np.asarray(collect_images(u16)[0].load())[0, :, 0].tolist() == [0, 1, 128, 255]
    f = np.array([[-0.5, 0.5, 2.0]], dtype=np.float32)  # (H, W) gray image
    assert np.asarray(collect_images(f)[0].load())[0, :, 0].tolist() == [0, 128, 255]


def test_collect_numpy_bad_input() -> None:
    with pytest.raises(ValueError, match="0..255"):
        collect_images(np.full((4, 4), 300, dtype=np.int64))
    with pytest.raises(ValueError, match="shape"):
        collect_images(np.zeros((2, 4, 5, 7), np.uint8))
    with pytest.raises(NoImagesError):
        collect_images(np.zeros((0, 4, 5, 3), np.uint8))


def test_collect_torch_tensors() -> None:
    torch = pytest.importorskip("torch")
    batch = torch.rand(2, 3, 4, 5)
    items = collect_images(batch)
    assert [it.name for it in items] == ["image_0000", "image_0001"]
    expected = np.round(batch[1].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(items[1].load()), expected)
    (single,) = collect_images(torch.ones(3, 4, 5))
    assert single.load().size == (5, 4)
    assert (np.asarray(single.load()) == 255).all()
    gray = collect_images(torch.zeros(2, 1, 4, 5))
    assert len(gray) == 2
    assert gray[0].load().size == (5, 4)


def test_collect_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="file not found"):
        collect_images(tmp_path / "missing.png")
    with pytest.raises(ImageReadError, match="file not found"):
        collect_images([str(tmp_path / "missing.png")])


def test_collect_empty_inputs(tmp_path: Path) -> None:
    with pytest.raises(NoImagesError):
        collect_images([])
    with pytest.raises(NoImagesError):
        collect_images(())
    with pytest.raises(NoImagesError):
        collect_images(tmp_path)


@pytest.mark.parametrize("bad", [42, {"a": 1}, b"bytes", None, [[Image.new("RGB", (1, 1))]]])
def test_collect_unknown_type(bad: object) -> None:
    with pytest.raises(TypeError, match="PIL image"):
        collect_images(bad)  # type: ignore[arg-type]


def test_image_item_needs_exactly_one_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        ImageItem("x")
    with pytest.raises(ValueError, match="exactly one"):
        ImageItem("x", path=tmp_path, image=Image.new("RGB", (1, 1)))


def test_image_item_in_memory_16bit_and_int() -> None:
    i16 = Image.fromarray(np.array([[0, 65535]], dtype=np.uint16))
    assert np.asarray(ImageItem("a", image=i16).load())[0, :, 0].tolist() == [0, 255]
    i32 = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32))
    assert i32.mode == "I"
    assert np.asarray(ImageItem("b", image=i32).load())[0, :, 0].tolist() == [0, 128, 255]


# ---------------------------------------------------------------- iter_loaded


def _memory_items(n: int) -> list[ImageItem]:
    return [ImageItem(f"m{i}", image=Image.new("L", (2, 2), i % 256)) for i in range(n)]


def test_iter_loaded_preserves_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = [_touch_image(tmp_path / f"{i:02d}.png") for i in range(20)]
    real_read = data.read_image
    rng = random.Random(0)
    delays = [rng.uniform(0, 0.01) for _ in files]

    def slow_read(path: Path) -> Image.Image:
        time.sleep(delays[int(Path(path).stem)])
        return real_read(path)

    monkeypatch.setattr(data, "read_image", slow_read)
    items = [ImageItem(f.name, path=f) for f in files] + _memory_items(5)
    got = list(iter_loaded(items, workers=4, prefetch=3))
    assert [it.name for it, _ in got] == [it.name for it in items]
    assert all(img.mode == "RGB" for _, img in got)
    assert np.asarray(got[-1][1])[0, 0].tolist() == [4, 4, 4]


def test_iter_loaded_prefetch_is_bounded() -> None:
    consumed = 0

    def lazy_items() -> Iterator[ImageItem]:
        nonlocal consumed
        for i in range(100_000):
            consumed += 1
            yield ImageItem(f"m{i}", image=Image.new("L", (2, 2)))

    gen = iter_loaded(lazy_items(), workers=2, prefetch=4)
    next(gen)
    assert consumed <= 5
    next(gen)
    assert consumed <= 6
    gen.close()


def test_iter_loaded_skip_bad(tmp_path: Path) -> None:
    good1 = _touch_image(tmp_path / "1.png")
    bad = tmp_path / "2.png"
    bad.write_text("not an image")
    good2 = _touch_image(tmp_path / "3.png")
    items = collect_images([good1, bad, good2])
    skipped: list[tuple[ImageItem, ImageReadError]] = []
    got = list(iter_loaded(items, skip_bad=True, on_skip=lambda it, err: skipped.append((it, err))))
    assert [it.path for it, _ in got] == [good1, good2]
    assert len(skipped) == 1
    assert skipped[0][0].path == bad
    assert isinstance(skipped[0][1], ImageReadError)
    assert skipped[0][1].path == str(bad)


def test_iter_loaded_prepare_errors_are_skipped_or_raised_like_bad_files() -> None:
    """A check on the decoded image in `prepare` (the network input's size) is handled like an unreadable file."""
    def prepare(item: ImageItem, image: Image.Image) -> tuple[str, tuple[int, int]]:
        if image.width > 100:
            raise ImageTooLargeError(item.name, "far too wide")
        return item.name, image.size

    items = [ImageItem("small", image=Image.new("L", (4, 4))), ImageItem("wide", image=Image.new("L", (2000, 8))),
             ImageItem("small2", image=Image.new("L", (4, 4)))]
    skipped: list[tuple[str, str]] = []
    got = list(iter_loaded(items, skip_bad=True, on_skip=lambda it, err: skipped.append((it.name, err.kind)),
                           prepare=prepare))
    assert [value for _, value in got] == [("small", (4, 4)), ("small2", (4, 4))]
    assert skipped == [("wide", "too_large")]
    with pytest.raises(ImageReadError, match="wide: far too wide"):
        list(iter_loaded(items, prepare=prepare))


def test_iter_loaded_skip_bad_without_callback_warns(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_text("x")
    with pytest.warns(UserWarning, match="bad.png"):
        got = list(iter_loaded([ImageItem("bad", path=bad)] + _memory_items(1), skip_bad=True))
    assert [it.name for it, _ in got] == ["m0"]


def _new_threads(before: set[threading.Thread]) -> set[threading.Thread]:
    """Threads alive now that were not before: a count would also move with threads of earlier tests ending
    meanwhile (seen in a full run: 7 threads before, 5 after)."""
    return set(threading.enumerate()) - before


def test_iter_loaded_raises_the_bad_file_error(tmp_path: Path) -> None:
    baseline = set(threading.enumerate())
    bad = tmp_path / "bad.png"
    bad.write_text("x")
    items = _memory_items(3) + [ImageItem("bad.png", path=bad)] + _memory_items(20)
    seen = []
    with pytest.raises(ImageReadError, match="not an image file") as info:
        for item, _ in iter_loaded(items, workers=3, prefetch=5):
            seen.append(item.name)
    assert info.value.path == str(bad)
    assert seen == ["m0", "m1", "m2"]
    assert not _new_threads(baseline)


def test_iter_loaded_early_break_leaves_no_threads() -> None:
    baseline = set(threading.enumerate())
    for _ in iter_loaded(_memory_items(50), workers=4, prefetch=8):
        assert _new_threads(baseline)
        break
    assert not _new_threads(baseline)


def test_iter_loaded_consumer_error_leaves_no_threads() -> None:
    baseline = set(threading.enumerate())
    with pytest.raises(RuntimeError, match="consumer"):
        for _ in iter_loaded(_memory_items(50), workers=4, prefetch=8):
            raise RuntimeError("consumer failed")
    assert not _new_threads(baseline)


def test_iter_loaded_empty_and_bad_settings() -> None:
    assert list(iter_loaded([])) == []
    with pytest.raises(ValueError, match="at least 1"):
        next(iter_loaded(_memory_items(1), workers=0))


# ---------------------------------------------------------------- decode_bytes / check_bytes (uploads)


def _png_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def _bytes_error(data_: bytes, max_pixels: int | None = 1_000_000, **kwargs: object) -> ImageReadError:
    """The error decode_bytes raises for `data_` (check_bytes must raise the same kind, or pass)."""
    with pytest.raises(ImageReadError) as info:
        data.decode_bytes(data_, "upload.png", max_pixels=max_pixels, **kwargs)
    assert info.value.path == "upload.png"
    return info.value


def test_decode_bytes_ok_is_rgb_like_read_image(tmp_path: Path) -> None:
    a = _rgb_array(12, 9)
    raw = _png_bytes(Image.fromarray(a))
    img = data.decode_bytes(raw, "a.png", max_pixels=1_000)
    assert img.mode == "RGB" and img.size == (9, 12)
    np.testing.assert_array_equal(np.asarray(img), a)
    assert data.check_bytes(raw, "a.png", max_pixels=1_000) == (9, 12)
    path = tmp_path / "g16.png"
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(path)
    np.testing.assert_array_equal(
        np.asarray(data.decode_bytes(path.read_bytes(), "g16.png", max_pixels=None)), np.asarray(read_image(path))
    )


def test_decode_bytes_float_rgb_tiff_read_with_tifffile() -> None:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.linspace(0.0, 1.0, 4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3), photometric="rgb")
    raw = buffer.getvalue()
    assert data.check_bytes(raw, "f.tif", max_pixels=100) == (5, 4)
    img = data.decode_bytes(raw, "f.tif", max_pixels=100)
    assert img.mode == "RGB" and img.size == (5, 4)
    assert _bytes_error(raw, max_pixels=10).kind == "too_large"


def test_decode_bytes_empty() -> None:
    error = _bytes_error(b"")
    assert error.kind == "empty" and "empty" in error.reason
    with pytest.raises(ImageReadError, match="empty"):
        data.check_bytes(b"", "upload.png", max_pixels=10)


def test_decode_bytes_not_an_image() -> None:
    error = _bytes_error(b"just some text, not pixels\n" * 10)
    assert error.kind == "unsupported" and "not an image" in error.reason
    assert "PNG" in error.reason  # names the accepted formats


def test_decode_bytes_format_not_accepted() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="GIF")
    assert _bytes_error(buffer.getvalue()).kind == "unsupported"
    assert data.decode_bytes(buffer.getvalue(), "a.gif", max_pixels=100, formats=None).size == (4, 4)


def test_decode_bytes_truncated_passes_the_header_check_only() -> None:
    raw = _png_bytes(Image.fromarray(_rgb_array(64, 64)))
    cut = raw[: len(raw) // 2]
    assert data.check_bytes(cut, "upload.png", max_pixels=10_000) == (64, 64)
    error = _bytes_error(cut)
    assert error.kind == "corrupt" and "truncated" in error.reason


def test_decode_bytes_too_many_pixels() -> None:
    raw = _png_bytes(Image.new("RGB", (110, 100)))
    for check in (data.check_bytes, data.decode_bytes):
        with pytest.raises(ImageReadError, match="10,000") as info:
            check(raw, "big.png", max_pixels=10_000)
        assert info.value.kind == "too_large"
        assert "11,000" in info.value.reason
    assert data.check_bytes(raw, "big.png", max_pixels=11_000) == (110, 100)


def test_decode_bytes_bomb_header_is_refused_quickly(tmp_path: Path) -> None:
    raw = _png_with_header_size(tmp_path / "bomb.png", 30000, 30000).read_bytes()
    start = time.perf_counter()
    for check in (data.check_bytes, data.decode_bytes):
        with pytest.raises(ImageReadError, match="too large") as info:
            check(raw, "bomb.png", max_pixels=40_000_000)
        assert info.value.kind == "too_large"
    assert time.perf_counter() - start < 1.0


def test_image_read_error_kinds() -> None:
    error = ImageReadError("x.png", "something odd")  # the two-argument form keeps working
    assert error.kind == "unreadable" and str(error) == "cannot read image x.png: something odd"
    with pytest.raises(ImageReadError) as info:
        read_image(Path("no-such-file.png"))
    assert info.value.kind == "missing"


def test_exclude_images_by_name_or_file_name_and_refuses_a_pattern_that_matches_nothing(tmp_path: Path) -> None:
    from spade_ad.data.inputs import collect_images, exclude_images
    from spade_ad.errors import NoImagesError, SpadeError

    for name in ("a/001.png", "a/002.png", "b/003.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    items = collect_images(tmp_path)
    kept, excluded = exclude_images(items, ["002.png", "b/*"])
    assert [i.name for i in kept] == ["a/001.png"] and [i.name for i in excluded] == ["a/002.png", "b/003.png"]
    with pytest.raises(SpadeError, match="'00x.png' matches none of the 3 training images"):
        exclude_images(items, ["002.png", "00x.png"])
    with pytest.raises(NoImagesError, match="leaves none of the 3"):
        exclude_images(items, ["*.png"])
