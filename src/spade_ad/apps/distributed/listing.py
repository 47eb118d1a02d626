"""Listing and reading the inputs of a distributed run: listed once on the driver (local paths as a plain run lists
them, URIs and filesystems with pyarrow.fs), their bytes decoded by Ray tasks with the library's own checks."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from ...data.images import IMAGE_EXTENSIONS, decode_bytes
from ...data.inputs import ImageItem, collect_images
from ...errors import ImageReadError, NoImagesError
from .session import ClusterError


@dataclass
class _Listing:
    """The inputs, listed once: items named as a plain run names them, each with `keys[i]`, the path Ray reads
    (absolute for local files, a path inside `filesystem` otherwise), and `shown[i]`, how errors name it (the path
    as a plain run has it, or the URI)."""

    items: list[ImageItem]
    keys: list[str]
    filesystem: Any
    local: bool
    shown: list[str]

    def subset(self, items: list[ImageItem]) -> _Listing:
        """The listing of some of its items (the same objects), in their order."""
        position = {id(item): index for index, item in enumerate(self.items)}
        chosen = [position[id(item)] for item in items]
        return _Listing(items, [self.keys[i] for i in chosen], self.filesystem, self.local,
                        [self.shown[i] for i in chosen])


def _is_uri(value: object) -> bool:
    return isinstance(value, str) and "://" in value


def _list_inputs(inputs: Any, filesystem: Any = None) -> _Listing:
    """List `inputs` (a path, a URI, or a list of them) once. Local paths: `collect_images`, exactly as a plain run
    lists them (one input as given, several as a list). URIs, or paths inside `filesystem` (a pyarrow FileSystem
    or an fsspec one): listed with pyarrow.fs, by the rules of `spade_ad.data.images.list_images` (image extensions,
    hidden files and folders skipped, sorted by relative path)."""
    many = isinstance(inputs, (list, tuple))
    given = list(inputs) if many else [inputs]
    if filesystem is None and not any(_is_uri(x) for x in given):
        items = collect_images(given if many else given[0])
        if any(item.path is None for item in items):
            raise TypeError("distributed runs read image files: give folders, files or URIs, not images in memory")
        return _Listing(items, [os.path.abspath(item.path) for item in items], _local_filesystem(), True,
                        [str(item.path) for item in items])
    if not given:
        raise NoImagesError("no images given: the list is empty")
    items, keys, shown = [], [], []
    chosen = _pyarrow_filesystem(filesystem) if filesystem is not None else None
    for value in given:
        fs, path = (chosen, str(value)) if filesystem is not None else _from_uri(str(value))
        if chosen is not None and fs.type_name != chosen.type_name:
            raise ClusterError(f"inputs on different filesystems ({chosen.type_name}, {fs.type_name}): give the "
                               f"inputs of one run on one filesystem")
        chosen = fs
        for name, key, where in _remote_files(fs, path, str(value), prefixed=many):
            items.append(ImageItem(name, path=PurePosixPath(key)))  # a path inside `fs`, read by Ray only
            keys.append(key)
            shown.append(where)
    return _Listing(items, keys, chosen, False, shown)


def _local_filesystem() -> Any:
    from pyarrow import fs

    return fs.LocalFileSystem()


def _pyarrow_filesystem(filesystem: Any) -> Any:
    """A pyarrow FileSystem as is; an fsspec filesystem wrapped in one."""
    from pyarrow import fs

    if isinstance(filesystem, fs.FileSystem):
        return filesystem
    return fs.PyFileSystem(fs.FSSpecHandler(filesystem))


def _from_uri(uri: str) -> tuple[Any, str]:
    from pyarrow import fs

    try:
        return fs.FileSystem.from_uri(uri)
    except (ValueError, OSError, ImportError) as exc:
        raise ClusterError(f"cannot open {uri}: {exc}") from exc


def _remote_files(fs: Any, path: str, shown: str, *, prefixed: bool) -> list[tuple[str, str, str]]:
    """(name, path, shown) of the image at `path`, or of every image under the folder `path`, named relative to it
    (under the folder's own name when it is one input among several, as `collect_images` names them); `shown` is
    the input as given (`shown`), followed by the path relative to it."""
    from pyarrow.fs import FileSelector, FileType

    info = fs.get_file_info(path)
    if info.type == FileType.NotFound:
        raise ImageReadError(shown, "file not found")
    if info.type != FileType.Directory:
        return [(shown, path, shown)]
    root = PurePosixPath(path.rstrip("/") or "/")
    found = []
    for entry in fs.get_file_info(FileSelector(path, recursive=True)):
        relative = PurePosixPath(entry.path).relative_to(root)
        if (entry.type == FileType.File and not any(part.startswith(".") for part in relative.parts)
                and os.path.splitext(relative.name)[1].lower() in IMAGE_EXTENSIONS):
            found.append((relative, entry.path))
    if not found:
        raise NoImagesError(f"no images found in {shown} or its subfolders; accepted extensions: "
                            f"{', '.join(sorted(IMAGE_EXTENSIONS))} (hidden files and folders are skipped)")
    found.sort(key=lambda pair: pair[0].parts)
    prefix = PurePosixPath(root.name or "root") if prefixed else PurePosixPath()
    return [((prefix / relative).as_posix(), key, f"{shown.rstrip('/')}/{relative.as_posix()}")
            for relative, key in found]


def _decode_row(row: dict[str, Any]) -> dict[str, Any]:
    """A Ray task: one file's bytes -> its RGB pixels, or the reason it cannot be read (as `read_image` says it)."""
    path = row["path"]
    try:
        image = decode_bytes(row["bytes"], path, max_pixels=None, formats=None)
    except ImageReadError as err:
        return {"path": path, "pixels": b"", "height": 0, "width": 0, "error_kind": err.kind,
                "error_reason": err.reason}
    pixels = np.asarray(image, dtype=np.uint8)
    return {"path": path, "pixels": pixels.tobytes(), "height": pixels.shape[0], "width": pixels.shape[1],
            "error_kind": "", "error_reason": ""}


def _batch_items(batch: dict[str, np.ndarray]) -> tuple[list[ImageItem], dict[str, tuple[str, str]]]:
    """A decoded batch as in-memory items named by path, and {path: (kind, reason)} of the unreadable ones."""
    items, failed = [], {}
    for path, pixels, height, width, kind, reason in zip(batch["path"], batch["pixels"], batch["height"],
                                                         batch["width"], batch["error_kind"], batch["error_reason"]):
        if kind:
            failed[str(path)] = (str(kind), str(reason))
        else:
            array = np.frombuffer(pixels, dtype=np.uint8).reshape(int(height), int(width), 3)
            items.append(ImageItem(str(path), image=Image.fromarray(array)))
    return items, failed
