"""The images an inspection record stands on: what an inspection shows, what a label is given to and what `add` or
`calibrate --record` learn from is the image that was inspected, never whatever file lies at its path now.

- `EvidenceStore` keeps a copy of each inspected image by its content (`<folder>/sha256/ab/<sha256><suffix>`,
  written whole under a temporary name, then renamed), so that a camera reusing a file name cannot change an earlier
  inspection's image. `watch --record` keeps one of every image it scores; the service keeps every upload (by
  their content too). Retention: copies older than `max_days`, and the oldest ones beyond `max_bytes`, are removed
  (`prune`, run when the store opens and every few hundred copies); an inspection whose copy is gone says so.
- `verified_image(row)` is the only way the record's users get an inspection's image: the kept copy, else the file
  at its recorded path, each only when its SHA-256 is the recorded one; otherwise an `EvidenceChanged` naming the
  inspection and what to do (the service answers 409, the command line one line and exit 2).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .connection import RecordError
from .identity import file_sha256

__all__ = ["EvidenceChanged", "EvidenceStore", "default_files_dir", "verified_image"]

_PRUNE_EVERY = 200


class EvidenceChanged(RecordError):
    """An inspection's image is no longer the one inspected (or no longer kept): nothing may be learnt from it."""


def default_files_dir(target: str) -> Path:
    """Where a record's kept images live by default: `<record file>.files/` beside a SQLite record,
    `./spade-ad-record-files` for a server URL."""
    if "://" in target:
        return Path("spade-ad-record-files")
    return Path(f"{target}.files")


class EvidenceStore:
    """Content-addressed copies of inspected images under `folder` (see the module's description)."""

    def __init__(self, folder: str | os.PathLike[str], *, max_days: float | None = None,
                 max_bytes: int | None = None) -> None:
        self.folder = Path(folder)
        self.max_days = max_days
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._since_prune = 0
        try:
            (self.folder / "sha256").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RecordError(f"record files folder {self.folder}: {exc.strerror or exc}; give another with "
                              f"--record-files") from None
        self.prune()

    def path_of(self, sha256: str, suffix: str) -> Path:
        return self.folder / "sha256" / sha256[:2] / f"{sha256}{suffix.lower()}"

    def keep(self, source: str | os.PathLike[str]) -> tuple[Path, str]:
        """Copy `source` into the store; (the kept copy, its SHA-256). The hash is of the bytes copied, so the copy
        is exactly what was hashed even if the file changes meanwhile."""
        source = Path(source)
        staging = self.folder / "sha256" / f".incoming-{os.getpid()}-{secrets.token_hex(4)}.partial"
        digest = hashlib.sha256()
        try:
            with open(source, "rb") as reader, open(staging, "wb") as writer:
                while chunk := reader.read(2**20):
                    digest.update(chunk)
                    writer.write(chunk)
            sha256 = digest.hexdigest()
            target = self.path_of(sha256, source.suffix)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                staging.unlink()
                os.utime(target)  # kept again: young again for the retention
            else:
                os.replace(staging, target)
        except BaseException:
            staging.unlink(missing_ok=True)
            raise
        with self._lock:
            self._since_prune += 1
            due = self._since_prune >= _PRUNE_EVERY
            if due:
                self._since_prune = 0
        if due:
            self.prune()
        return target, sha256

    def prune(self) -> tuple[int, int]:
        """Apply the retention (see the module's description); (files removed, bytes freed)."""
        if self.max_days is None and self.max_bytes is None:
            return 0, 0
        files = []
        # only the kept copies: the folder also holds the service's uploads and the outboxes, never pruned here
        for root, _, names in os.walk(self.folder / "sha256"):
            for name in names:
                if name.endswith(".partial"):
                    continue
                path = Path(root) / name
                try:
                    info = path.stat()
                except OSError:
                    continue
                files.append((info.st_mtime, info.st_size, path))
        files.sort()
        now = time.time()
        total = sum(size for _, size, _ in files)
        removed = freed = 0
        for mtime, size, path in files:
            too_old = self.max_days is not None and now - mtime > self.max_days * 86400
            too_much = self.max_bytes is not None and total > self.max_bytes
            if not (too_old or too_much):
                continue
            if now - mtime < 60:  # never what is being written or shown now
                continue
            path.unlink(missing_ok=True)
            total -= size
            removed += 1
            freed += size
        return removed, freed


def verified_image(row: Mapping[str, Any]) -> Path:
    """The image inspection `row` (a record row) was made from: its kept copy, else the file at its recorded path,
    each only if its SHA-256 is the recorded one; an `EvidenceChanged` otherwise (see the module's description)."""
    expected = row.get("sha256")
    ident = row.get("id", row.get("source"))
    if not expected:
        raise EvidenceChanged(f"inspection {ident} has no recorded SHA-256 (its file could not be read when it was "
                              f"inspected): its image cannot be verified, so it is not used")
    seen_other = None
    for column in ("kept_path", "path"):
        value = row.get(column)
        if not value:
            continue
        path = Path(value)
        try:
            if file_sha256(path) == expected:
                return path
        except OSError:
            continue
        seen_other = path
    if seen_other is not None:
        raise EvidenceChanged(f"inspection {ident}: {seen_other} now holds another image than the one inspected (a "
                              f"file name reused?); nothing is taken from it. Label or add the image it shows as a "
                              f"new inspection instead")
    raise EvidenceChanged(f"inspection {ident}: its image is no longer on disk (moved, deleted, or past the record "
                          f"files' retention)")
