"""Watching a camera folder: `spade-ad watch MODEL|BUNDLE DIR -o OUT [--record DB] [--move-to DIR]`.

Each file that appears in DIR (or a folder below it) is scored once it is complete, in arrival order, with the same
predict path and writers as `spade-ad predict` (`iter_predict`, `PredictionWriter`): OUT/scores.csv, regions.jsonl,
overlays/, heat maps and masks, appended across runs; with a record, every prediction in the record too.

- Complete: a file renamed into place (a move event) is complete at once; any other file once its size and
  modification time have not changed for `settle` seconds. Hidden files and temporary names (`.tmp`, `.part`,
  `.partial`, `~`, `.crdownload`) are left alone until they are renamed.
- Events come from watchdog (inotify, FSEvents, ...); the folder is also scanned every `poll_interval` seconds, and
  with `poll=True` (network shares, where events do not arrive) only scanned.
- Exactly once: a file (its name relative to DIR and its SHA-256) is scored once, across restarts: the record knows
  what it holds, and OUT/watch-state.jsonl (one line per file handled, written after its outputs) knows it without
  a record. A file replaced by other content under the same name is a new part and is scored.
- One watcher: a second watcher of the same folder and record, or into the same output folder, is refused in one
  line (a lock held while it runs; the lock goes with the process, so a killed watcher never blocks its restart).
- Evidence: with a record, each image is copied into the record's files (`spade_ad.record.EvidenceStore`, by its
  SHA-256) before it is scored, and scored from that copy: what the record shows, labels and learns from is the
  image inspected, even when the camera later reuses the file name.
- Outages of the record: rows wait in OUT/record-outbox.jsonl and are written when the record answers again
  (`spade_ad.record.recorder.Recorder`); scoring never stops for the record.
- A file that cannot be read (broken, not an image) is logged, listed in OUT/skipped.csv, recorded as an error, and
  the watcher goes on.
- `move_to`: each handled file is moved to MOVE_TO/good, MOVE_TO/defect or MOVE_TO/error (its folder below DIR kept).
- Shift: after the first 30, 100 and 300 images (then every 1000) the run's good-looking scores are compared with
  the calibration's (`spade_ad.core.shift.check_shift`); a line that scores above what the threshold came from
  is warned about with the false-alarm rate that implies.
- `publisher` (`--publish`, `spade_ad.apps.publish`): each inspection (an unreadable file too) is published after its
  outputs are written and before the file is marked done, through the publisher's durable outbox.
- Stopping: Ctrl-C or SIGTERM (`stop()`) lets the image being scored finish, writes what is waiting in the record
  and returns; `max_images` and `idle_exit` stop after that many files, or after that many idle seconds.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.shift import ShiftMonitor
from ..errors import ImageReadError, OutputError
from ..estimators.detector import FittedModel
from ..outputs.writers import SCORES_FILE, PredictionWriter
from ..record import EvidenceStore, RecordUnavailable, file_sha256
from ..record.recorder import Recorder

if TYPE_CHECKING:
    from .publish import Publishers

__all__ = ["STATE_FILE", "WatchResult", "Watcher"]

STATE_FILE = "watch-state.jsonl"
_TEMPORARY = (".tmp", ".part", ".partial", ".crdownload", ".filepart", "~", ".swp")


@dataclass
class WatchResult:
    scored: int = 0
    errors: int = 0
    already: int = 0  # files found that an earlier run had handled
    flagged: int = 0
    names: list[str] = field(default_factory=list)  # handled this run, in order
    warnings: list[str] = field(default_factory=list)  # the shift check's, when the line looks unlike calibration


@dataclass
class _Candidate:
    path: Path
    first_seen: float
    size: int
    mtime_ns: int
    stable_since: float
    renamed: bool = False


class Watcher:
    """Scores the files that appear in `folder` (see the module's description). `run()` until stopped."""

    def __init__(self, model: FittedModel, folder: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                 recorder: Recorder | None = None, move_to: str | os.PathLike[str] | None = None,
                 poll: bool = False, poll_interval: float = 0.5, settle: float = 1.0, save_maps: bool = False,
                 outputs: str | Iterable[str] | None = None,
                 explain: bool = False, max_images: int | None = None, idle_exit: float | None = None,
                 evidence: EvidenceStore | None = None, publisher: Publishers | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.model = model
        self.folder = Path(folder).resolve()
        self.out_dir = Path(out_dir)
        self.recorder = recorder
        self.move_to = Path(move_to).resolve() if move_to is not None else None
        self.poll = poll
        self.poll_interval = poll_interval
        self.settle = settle
        self.max_images = max_images
        self.idle_exit = idle_exit
        self.log = log
        self.explain = explain
        self.publisher = publisher
        if not self.folder.is_dir():
            raise OutputError(f"watch folder {folder} is not a folder; give the folder the camera writes into")
        self.evidence = evidence
        state = self.out_dir / STATE_FILE
        if (self.out_dir / SCORES_FILE).exists() and not state.exists() and _has_rows(self.out_dir / SCORES_FILE):
            raise OutputError(f"output folder {out_dir} holds another run's results ({SCORES_FILE} without "
                              f"{STATE_FILE}); give watch its own output folder")
        self._locks = self._claim(folder)
        self._excluded = [p.resolve() for p in (self.out_dir, self.move_to) if p is not None]
        self._done: set[tuple[str, str]] = set()
        if state.exists():
            with open(state, encoding="utf-8") as handle:
                for line in handle:
                    with suppress(json.JSONDecodeError, KeyError):
                        item = json.loads(line)
                        self._done.add((item["source"], item["sha256"]))
        self._handled: dict[Path, tuple[int, int]] = {}  # this run: path -> (size, mtime) when handled
        self._candidates: dict[Path, _Candidate] = {}
        self._renamed_paths: set[Path] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.writer = PredictionWriter.for_model(model, self.out_dir, save_maps=save_maps, explain=explain,
                                                 outputs=outputs, mode="a")
        self._fields: dict[str, Any] = {}  # the row fields of the file being handled (its path, hash, kept copy)
        if recorder is not None:
            recorder.follow(self.writer, lambda _: self._fields)
        self.result = WatchResult()
        self._shift = ShiftMonitor()  # is the line like what the threshold came from?

    # -- one watcher ----------------------------------------------------------------------------------------------
    def _claim(self, shown_folder: str | os.PathLike[str]) -> list[Any]:
        """Lock the output folder, and the watched folder for this record (or, with --move-to, for anyone), for as
        long as this watcher lives; an OutputError naming the other watcher when one holds a lock."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = self.recorder.record.target if self.recorder is not None else ""
        key = f"{self.folder}\0{'' if self.move_to is not None else record}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        folder_lock = Path(tempfile.gettempdir()) / f"spade-ad-watch-{digest}.lock"
        locks = []
        for path, what in ((self.out_dir / ".watch.lock", f"into {self.out_dir}"),
                           (folder_lock, f"{shown_folder}" + (f" for record {self.recorder.record.shown}"
                                                              if self.recorder is not None and not self.move_to
                                                              else ""))):
            handle = open(path, "a+", encoding="utf-8")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                other = handle.read().strip() or "unknown"
                handle.close()
                for held in locks:
                    held.close()
                raise OutputError(f"another watcher (pid {other}) is already watching {what}; stop it first, or "
                                  f"give this one another folder") from None
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            locks.append(handle)
        return locks

    def release(self) -> None:
        """Give up the watcher's locks (at the end of `run`; a killed process gives them up by itself)."""
        for handle in self._locks:
            with suppress(OSError):
                fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
        self._locks = []

    # -- control --------------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Finish the image being scored, then return from `run` (thread- and signal-safe)."""
        self._stop.set()
        self._wake.set()

    @contextmanager
    def _signals(self) -> Iterator[None]:
        """Ctrl-C and SIGTERM stop the watcher after the current image (a second Ctrl-C interrupts at once)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, _: Any) -> None:
            if self._stop.is_set() and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.log("stopping: finishing the current image (Ctrl-C again to interrupt)")
            self.stop()

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _observer(self) -> Any:
        """A started watchdog observer that wakes the loop on any event in the folder; None with `poll` or when
        events cannot be had (then the folder is only scanned)."""
        if self.poll:
            return None
        try:
            from watchdog.events import FileSystemEvent, FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:
            self.log("watchdog is not installed (pip install 'spade-ad[record]'): scanning the folder instead")
            return None
        watcher = self

        class Wake(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type == "moved" and not event.is_directory:
                    watcher._renamed(Path(os.fsdecode(event.dest_path)))
                watcher._wake.set()

        logging.getLogger("watchdog").setLevel(logging.ERROR)  # its stop-time chatter is not the user's
        observer = Observer()
        try:
            observer.schedule(Wake(), str(self.folder), recursive=True)
            observer.start()
        except OSError as exc:
            self.log(f"no file events for {self.folder} ({exc}): scanning it every {self.poll_interval:g} s")
            return None
        return observer

    def _renamed(self, path: Path) -> None:
        candidate = self._candidates.get(path)
        if candidate is not None:
            candidate.renamed = True
        else:
            self._renamed_paths.add(path)

    # -- finding files ----------------------------------------------------------------------------------------------
    def _wanted(self, path: Path) -> bool:
        relative = path.relative_to(self.folder)
        if any(part.startswith(".") for part in relative.parts):
            return False
        if path.name.lower().endswith(_TEMPORARY):
            return False
        return not any(path == ex or ex in path.parents for ex in self._excluded)

    def _scan(self) -> None:
        now = time.monotonic()
        present: set[Path] = set()
        for root, dirs, files in os.walk(self.folder):
            root_path = Path(root)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and self._wanted(root_path / d))
            for name in files:
                path = root_path / name
                if not self._wanted(path):
                    continue
                try:
                    info = path.stat()
                except OSError:
                    continue
                present.add(path)
                key = (info.st_size, info.st_mtime_ns)
                if self._handled.get(path) == key:
                    continue
                candidate = self._candidates.get(path)
                if candidate is None or (candidate.size, candidate.mtime_ns) != key:
                    renamed = path in self._renamed_paths
                    self._renamed_paths.discard(path)
                    self._candidates[path] = _Candidate(path, candidate.first_seen if candidate else now,
                                                        info.st_size, info.st_mtime_ns, now, renamed)
        for gone in set(self._candidates) - present:
            del self._candidates[gone]
        for gone in set(self._handled) - present:
            del self._handled[gone]

    def _ready(self) -> list[_Candidate]:
        now = time.monotonic()
        ready = [c for c in self._candidates.values() if c.renamed or now - c.stable_since >= self.settle]
        return sorted(ready, key=lambda c: (c.first_seen, c.mtime_ns, str(c.path)))

    # -- handling one file ----------------------------------------------------------------------------------------
    def _already(self, source: str, sha256: str) -> bool:
        if (source, sha256) in self._done:
            return True
        if self.recorder is None or self.recorder.waiting:
            return False  # in an outage the state file alone knows (it holds every file this folder's runs handled)
        try:
            return self.recorder.record.was_scored(source, sha256)
        except RecordUnavailable:
            return False

    def _handle(self, candidate: _Candidate) -> None:
        path = candidate.path
        source = path.relative_to(self.folder).as_posix()
        del self._candidates[path]
        kept: Path | None = None
        try:
            if self.evidence is not None:  # scored from the kept copy: the image scored is the image recorded
                kept, sha256 = self.evidence.keep(path)
            else:
                sha256 = file_sha256(path)
        except OSError as exc:
            self.log(f"cannot read {path}: {exc.strerror or exc}; will try again")
            return
        self._handled[path] = (candidate.size, candidate.mtime_ns)
        if self._already(source, sha256):
            self.result.already += 1
            if self.move_to is not None:  # an earlier run stopped before moving it: its verdict is in the state
                self._move(path, self._destination(source, self._earlier_verdict(source)))
            return
        verdict = "error"
        try:
            [prediction] = self.model.iter_predict([kept or path], original_size=True, keep_images=True,
                                                   explain=self.explain)
        except ImageReadError as exc:
            error = ImageReadError(path, exc.reason, kind=exc.kind)
            target = self._destination(source, verdict)
            self._fields = {"path": target or path, "sha256": sha256}
            self.writer.skip(source, error)
            if self.publisher is not None:
                self.publisher.error(source=source, sha256=sha256, reason=exc.reason)
            if kept is not None and kept != path:
                with suppress(OSError):
                    kept.unlink()  # not an image: nothing to keep
            self.log(f"error: {source}: {exc.reason} (recorded, going on)")
            self.result.errors += 1
        else:
            prediction = prediction.with_(name=source)
            verdict = prediction.verdict
            target = self._destination(source, verdict)
            # the row names where the file will be (moved once its outputs are written and it is marked done)
            self._fields = {"path": target or path, "sha256": sha256, "kept_path": kept}
            self.writer.write(prediction)
            if self.publisher is not None:  # in the outbox before the file is marked done: a crash loses nothing
                self.publisher.inspection(prediction, source=source, sha256=sha256)
            self.result.scored += 1
            self.result.flagged += verdict == "defect"
            self._check_shift(prediction.score)
            self.log(f"{source}: {verdict} (score {prediction.score:.4g}"
                     + (f", normalised {prediction.normalized_score:.3g})" if prediction.normalized_score is not None
                        else ")"))
        self._mark_done(source, sha256, verdict)
        self.result.names.append(source)
        if target is not None:
            self._move(path, target)

    def _check_shift(self, score: float) -> None:
        """Does this run look like what the threshold came from (a new session, new lighting)? A warning with the
        false-alarm rate that implies (`spade_ad.core.shift.ShiftMonitor`), so nobody learns it from the reject
        bin."""
        warning = self._shift.add(self.model.calibration_, score)
        if warning is not None:
            self.log(f"warning: {warning}")
            self.result.warnings.append(warning)

    def _mark_done(self, source: str, sha256: str, verdict: str) -> None:
        self._done.add((source, sha256))
        with open(self.out_dir / STATE_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"source": source, "sha256": sha256, "verdict": verdict,
                                     "at": time.time()}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _earlier_verdict(self, source: str) -> str:
        verdict = "good"
        with suppress(OSError), open(self.out_dir / STATE_FILE, encoding="utf-8") as handle:
            for line in handle:
                with suppress(json.JSONDecodeError, KeyError):
                    item = json.loads(line)
                    if item["source"] == source:
                        verdict = item.get("verdict", verdict)
        return verdict

    def _destination(self, source: str, verdict: str) -> Path | None:
        """Where `move_to` puts the file (MOVE_TO/good|defect|error/<source>, numbered when taken); None without."""
        if self.move_to is None:
            return None
        target = self.move_to / {"defect": "defect", "error": "error"}.get(verdict, "good") / source
        candidate, number = target, 1
        while candidate.exists():
            number += 1
            candidate = target.with_name(f"{target.stem}~{number}{target.suffix}")
        return candidate

    def _move(self, path: Path, target: Path | None) -> None:
        if target is None:
            return
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), str(target))
        except OSError as exc:
            self.log(f"cannot move {path} to {target}: {exc.strerror or exc}")
            return
        self._handled.pop(path, None)

    # -- the loop -------------------------------------------------------------------------------------------------
    def run(self) -> WatchResult:
        """Watch until stopped (`stop`, Ctrl-C, SIGTERM, `max_images`, `idle_exit`); the counts of this run."""
        (self.out_dir / STATE_FILE).touch()  # this folder is a watch's from now on, even if nothing is scored
        observer = self._observer()
        idle_since = time.monotonic()
        self.log(f"watching {self.folder} ({'polling' if observer is None else 'file events'}); outputs in "
                 f"{self.out_dir}" + (f", record {self.recorder.record.shown}" if self.recorder else ""))
        try:
            with self._signals(), self.writer:
                while not self._stop.is_set():
                    self._wake.clear()
                    self._scan()
                    for candidate in self._ready():
                        if self._stop.is_set() or self._limit_reached():
                            break
                        self._handle(candidate)
                        idle_since = time.monotonic()
                        if self.recorder is not None:
                            self.recorder.poll()  # an outage: retried when its pause is over
                    if self._limit_reached():
                        break
                    if not self._candidates:
                        if self.recorder is not None:
                            self.recorder.flush()  # idle: the record catches up
                        if self.idle_exit is not None and time.monotonic() - idle_since >= self.idle_exit:
                            break
                    else:
                        idle_since = time.monotonic()
                    self._wake.wait(self.poll_interval)
        finally:
            if observer is not None:
                observer.stop()
                observer.join(timeout=5)
            if self.recorder is not None:
                self.recorder.close()
            self.release()
        return self.result

    def _limit_reached(self) -> bool:
        return self.max_images is not None and len(self.result.names) >= self.max_images


def _has_rows(scores: Path) -> bool:
    """Whether a scores.csv holds a result row (a watch killed before its first image leaves only the header)."""
    with suppress(OSError), open(scores, encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip()) > 1
    return False

