"""Notice files in the camera folder(s) and hand over only files that are complete.

A watchdog observer (inotify, or polling for network mounts) reports paths; its handler only puts them in
an inbox and wakes the daemon's main loop. The main loop calls :meth:`FolderWatcher.poll`, which turns the
inbox into *candidates* and settles them: a candidate is offered once its size and mtime have not changed for
``quiet_seconds`` and ``nightshift.service.fitsio.check_complete`` finds a whole frame file in it (FITS, a gzip stream
that decompresses to the end, or an XISF file with every data block present). A folder scan at start
and every ``rescan_interval`` catches files whose events were never seen.

How a file settles (the same with inotify and with polling):

- Every created, modified or moved-in event, and every observed change of (size, mtime), restarts the quiet
  time. A close-write event is only a reason to look at the file: it does not shorten the quiet time, because
  some capture programs and network clients close and reopen a file while writing it.
- A quiet file is checked with ``check_complete`` (headers only; a gzip file is decompressed). Whole: offered.
  ``truncated``: kept waiting for more data, and reported :class:`Incomplete` once ``incomplete_timeout`` has
  passed since it was first seen. Any other failure (``not_fits``, ``empty``, ``unreadable``): offered anyway, so
  that ingest quarantines it with its exact reason.
- A path is offered once per (size, mtime); a file that changes after being offered becomes a candidate
  again.
- A file that vanishes before it settles is dropped silently.

Files are only ever opened read-only, by ``check_complete``.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from nightshift.daemon.config import DEFAULT_INCLUDE
from nightshift.service.fitsio import check_complete
from nightshift.service.frame import FrameError
from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

__all__ = ["FolderWatcher", "Incomplete", "Offer", "WatchOptions", "is_wanted"]

log = logging.getLogger(__name__)

# watchdog's inotify observer warns when a folder and its sub-folder are created in quick succession (a capture
# program filing "<date>/<target>/LIGHT/"): it re-registers the same callback for the new watch and says so.
# Nothing is lost; the warning is noise in the journal.
warnings.filterwarnings("ignore", message="Callback with id .* already exists", category=RuntimeWarning)

#: Longest wait between two looks at a file that is quiet but not yet whole (events usually come sooner).
MAX_RECHECK_SECONDS = 30.0

#: Events the observer delivers; opens and read-only closes (our own reads, ingest's reads) are left out.
_EVENT_FILTER: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileClosedEvent,
    FileDeletedEvent,
    FileAttribEvent,
    DirCreatedEvent,
    DirMovedEvent,
]


@dataclass
class WatchOptions:
    """What to watch and how long to wait.

    Parameters
    ----------
    paths : list of Path
        Folders watched recursively.
    include : list of str
        Globs on the file name, case-insensitive; a file must match one of them.
    exclude : list of str
        Globs, case-insensitive, on the file name and on every folder name below a watched folder.
    quiet_seconds : float
        How long size and mtime must stay unchanged before a file is checked.
    incomplete_timeout : float
        Seconds after a file is first seen after which a file that never became whole is reported incomplete.
    polling : bool
        Use the polling observer (network mounts, where inotify sees nothing) instead of the native one.
    poll_interval : float
        Seconds between two snapshots of the polling observer.
    rescan_interval : float
        Seconds between two full scans of the folders; 0 scans only at start.
    """

    paths: list[Path]
    include: list[str] = field(default_factory=lambda: list(DEFAULT_INCLUDE))
    exclude: list[str] = field(default_factory=lambda: ["*.tmp", "*.part", ".*", "*~"])
    quiet_seconds: float = 2.0
    incomplete_timeout: float = 600.0
    polling: bool = False
    poll_interval: float = 1.0
    rescan_interval: float = 300.0

    def __post_init__(self) -> None:
        self.paths = [Path(p) for p in self.paths]
        if not self.paths:
            raise ValueError("no folder to watch")
        if self.quiet_seconds < 0 or self.poll_interval <= 0 or self.rescan_interval < 0:
            raise ValueError("quiet_seconds and rescan_interval must be >= 0, poll_interval > 0")
        if self.incomplete_timeout <= self.quiet_seconds:
            log.warning(
                "incomplete_timeout (%g s) is not longer than quiet_seconds (%g s): every file will be reported "
                "incomplete",
                self.incomplete_timeout,
                self.quiet_seconds,
            )


@dataclass
class Offer:
    """A file that is complete now: ingest it."""

    path: Path
    size: int
    mtime: float


@dataclass
class Incomplete:
    """A file that never became whole within the timeout: quarantine it as ``incomplete``."""

    path: Path
    reason: str


#: What the watcher remembers of a file: (size, mtime in ns).
_Signature = tuple[int, int]


@dataclass
class _Candidate:
    first_seen: float
    last_change: float
    signature: _Signature
    next_check: float
    truncated: str | None = None  # check_complete's message for this signature, when it said "truncated"
    recheck: float = 0.0  # current wait between looks while truncated


def is_wanted(relative: Path, include: Iterable[str], exclude: Iterable[str]) -> bool:
    """Whether a file, given by its path below a watched folder, is one to take.

    Parameters
    ----------
    relative : Path
        The file's path relative to the watched folder.
    include, exclude : iterable of str
        Case-insensitive globs. The file name must match an ``include`` glob; neither the file name nor any
        folder name in ``relative`` may match an ``exclude`` glob.

    Returns
    -------
    bool
    """
    parts = [p.lower() for p in relative.parts]
    if not parts:
        return False
    exclude = [g.lower() for g in exclude]
    if any(fnmatchcase(part, g) for part in parts for g in exclude):
        return False
    return any(fnmatchcase(parts[-1], g.lower()) for g in include)


def _signature(st: os.stat_result) -> _Signature:
    return (st.st_size, st.st_mtime_ns)


class _Inbox(FileSystemEventHandler):
    """Runs in the observer thread: records which paths to look at, wakes the main loop, does nothing else."""

    def __init__(self, wanted: Callable[[str], bool], dir_wanted: Callable[[str], bool]) -> None:
        self._wanted = wanted
        self._dir_wanted = dir_wanted
        self._lock = threading.Lock()
        self._paths: dict[str, bool] = {}  # path -> whether an event said it changed
        self._dirs: set[str] = set()
        self.wake = threading.Event()

    def _put(self, path: bytes | str, changed: bool) -> None:
        path = os.fsdecode(path)
        if not path or not self._wanted(path):
            return
        with self._lock:
            self._paths[path] = self._paths.get(path, False) or changed
        self.wake.set()

    def _put_dir(self, path: bytes | str) -> None:
        path = os.fsdecode(path)
        if not path or not self._dir_wanted(path):
            return
        with self._lock:
            self._dirs.add(path)
        self.wake.set()

    def on_created(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            self._put_dir(event.src_path)
        else:
            self._put(event.src_path, True)

    def on_modified(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._put(event.src_path, True)

    def on_moved(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            self._put_dir(event.dest_path)
        else:
            self._put(event.src_path, False)  # gone from there
            self._put(event.dest_path, True)

    def on_closed(self, event: FileSystemEvent) -> None:
        self._put(event.src_path, False)

    def on_deleted(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._put(event.src_path, False)

    def on_attrib(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._put(event.src_path, False)

    def take(self) -> tuple[dict[str, bool], set[str]]:
        """Everything put in since the last call (main loop)."""
        with self._lock:
            paths, dirs = self._paths, self._dirs
            self._paths, self._dirs = {}, set()
        return paths, dirs


class FolderWatcher:
    """Watches folders and returns, from :meth:`poll`, the files that have become complete.

    Parameters
    ----------
    options : WatchOptions
        Folders, patterns and timings.
    known : callable (path, size, mtime) -> bool, optional
        True when the archive already holds this file unchanged; a scan then does not offer it again.
    clock : callable, optional
        Monotonic seconds, for every wait.

    Notes
    -----
    The observer thread only fills an inbox. :meth:`poll`, :meth:`wait`, :meth:`rescan` and the ``known``
    hook run on the caller's thread (the daemon's main loop); they are not meant to be called from several
    threads.
    """

    def __init__(
        self,
        options: WatchOptions,
        *,
        known: Callable[[str, int, float], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = options
        self._known = known
        self._clock = clock
        self._roots = [os.path.abspath(os.fspath(p)) for p in options.paths]
        self._include = [g.lower() for g in options.include]
        self._exclude = [g.lower() for g in options.exclude]
        self._inbox = _Inbox(self._wanted, self._dir_wanted)
        self._observer: BaseObserver | None = None
        self._candidates: dict[str, _Candidate] = {}
        # what was last offered or reported and is not yet known to the archive
        self._offered: dict[str, _Signature] = {}
        self._next_rescan: float | None = None
        self.last_scan: float | None = None

    # -- life ------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the observer, then scan the folders: files not known to the archive become candidates.

        Raises
        ------
        FileNotFoundError, NotADirectoryError
            A watched folder does not exist or is not a folder.
        OSError
            The observer could not watch a folder (e.g. the inotify watch limit is reached: raise
            ``fs.inotify.max_user_watches`` or use polling).
        """
        if self._observer is not None:
            raise RuntimeError("the watcher is already started")
        for root in self._roots:
            if not os.path.exists(root):
                raise FileNotFoundError(errno.ENOENT, "watched folder does not exist", root)
            if not os.path.isdir(root):
                raise NotADirectoryError(errno.ENOTDIR, "watched path is not a folder", root)
        if self.options.polling:
            observer: BaseObserver = PollingObserver(timeout=self.options.poll_interval)
        else:
            observer = Observer()
        for root in self._roots:
            observer.schedule(self._inbox, root, recursive=True, event_filter=_EVENT_FILTER)
        try:
            observer.start()
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EMFILE):
                raise OSError(
                    exc.errno,
                    f"cannot watch {', '.join(self._roots)}: inotify limit reached ({exc.strerror}); "
                    "raise fs.inotify.max_user_watches / max_user_instances or set polling",
                ) from exc
            raise
        self._observer = observer
        how = "polling" if self.options.polling else "native events"
        log.info("watching %s with %s", ", ".join(self._roots), how)
        try:
            self.rescan()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the observer and wait for its thread to end. Safe to call more than once."""
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            if observer.is_alive():
                observer.join(timeout=max(5.0, 2 * self.options.poll_interval))
        self._inbox.wake.set()

    @property
    def alive(self) -> bool:
        """Whether the observer thread, and each folder's watch, is running."""
        observer = self._observer
        if observer is None or not observer.is_alive():
            return False
        try:
            emitters = tuple(observer.emitters)
        except RuntimeError:  # the observer changed its set while we copied it: ask again next time
            return True
        return all(e.is_alive() for e in emitters)

    @property
    def pending(self) -> int:
        """Number of candidates not settled yet."""
        return len(self._candidates)

    # -- main loop -------------------------------------------------------------------------------------------

    def wait(self, timeout: float) -> None:
        """Block until an event arrives, a check or rescan is due, or ``timeout`` seconds have passed."""
        due = self._next_due()
        if due is not None:
            timeout = min(timeout, due - self._clock())
        if timeout > 0:
            self._inbox.wake.wait(timeout)

    def poll(self) -> list[Offer | Incomplete]:
        """Take queued events, rescan when due, and return the files that are ready now.

        Returns
        -------
        list of Offer or Incomplete
            Each (path, size, mtime) at most once.
        """
        self._inbox.wake.clear()
        paths, dirs = self._inbox.take()
        now = self._clock()
        for path, changed in paths.items():
            self._look(path, now, changed=changed)
        for folder in dirs:
            self._scan_tree(folder, now, seen=None)
        if self._next_rescan is not None and now >= self._next_rescan:
            self.rescan()
            now = self._clock()
        ready: list[Offer | Incomplete] = []
        for path in [p for p, c in self._candidates.items() if c.next_check <= now]:
            result = self._settle(path, now)
            if result is not None:
                ready.append(result)
        return ready

    def rescan(self) -> None:
        """Scan the folders now; files neither offered yet nor known to the archive become candidates."""
        now = self._clock()
        seen: set[str] = set()
        complete = all([self._scan_tree(root, now, seen=seen) for root in self._roots])
        if complete:  # forget what was offered and has since disappeared
            self._offered = {p: s for p, s in self._offered.items() if p in seen}
        self.last_scan = time.time()
        if self.options.rescan_interval > 0:
            self._next_rescan = self._clock() + self.options.rescan_interval
        log.debug("scanned %s: %d candidates pending", ", ".join(self._roots), len(self._candidates))

    # -- internals -------------------------------------------------------------------------------------------

    def _relative(self, path: str) -> Path | None:
        for root in self._roots:
            rel = os.path.relpath(path, root)
            if rel != os.curdir and not rel.startswith(os.pardir + os.sep) and rel != os.pardir:
                return Path(rel)
        return None

    def _wanted(self, path: str) -> bool:
        rel = self._relative(path)
        return rel is not None and is_wanted(rel, self._include, self._exclude)

    def _dir_wanted(self, path: str) -> bool:
        rel = self._relative(path)
        return rel is not None and not any(fnmatchcase(part.lower(), g) for part in rel.parts for g in self._exclude)

    def _next_due(self) -> float | None:
        dues = [c.next_check for c in self._candidates.values()]
        if self._next_rescan is not None:
            dues.append(self._next_rescan)
        return min(dues, default=None)

    def _stat(self, path: str) -> os.stat_result | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st if stat.S_ISREG(st.st_mode) else None

    def _look(self, path: str, now: float, *, changed: bool, st: os.stat_result | None = None) -> None:
        """Note what a path is like now; ``changed`` when an event said it was written to."""
        st = st or self._stat(path)
        cand = self._candidates.get(path)
        if st is None:
            if cand is not None:
                log.debug("%s vanished before it settled", path)
                del self._candidates[path]
            self._offered.pop(path, None)
            return
        sig = _signature(st)
        if cand is None:
            if self._offered.get(path) == sig:
                return  # a late event about what was already offered
            if self._is_known(path, st):
                self._offered.pop(path, None)
                return
            self._candidates[path] = _Candidate(
                first_seen=now, last_change=now, signature=sig, next_check=now + self.options.quiet_seconds
            )
        elif changed or sig != cand.signature:
            self._changed(cand, sig, now)

    def _is_known(self, path: str, st: os.stat_result) -> bool:
        if self._known is None:
            return False
        try:
            return bool(self._known(path, st.st_size, st.st_mtime))
        except Exception:  # the archive could not say: offer it, ingest decides
            log.exception("known(%r) failed; treating the file as new", path)
            return False

    def _changed(self, cand: _Candidate, sig: _Signature, now: float) -> None:
        cand.signature = sig
        cand.last_change = now
        cand.truncated = None
        cand.recheck = 0.0
        # capped so that a file written to without pause is still given up on at the timeout
        deadline = cand.first_seen + self.options.incomplete_timeout
        cand.next_check = min(now + self.options.quiet_seconds, deadline)

    def _scan_tree(self, top: str, now: float, *, seen: set[str] | None) -> bool:
        """Look at every wanted file below ``top``; False when part of it could not be read."""
        errors: list[OSError] = []
        for folder, dirnames, filenames in os.walk(top, onerror=errors.append):
            dirnames[:] = [d for d in dirnames if self._dir_wanted(os.path.join(folder, d))]
            for name in filenames:
                path = os.path.join(folder, name)
                if not self._wanted(path):
                    continue
                if seen is not None:
                    seen.add(path)
                if path not in self._candidates:
                    st = self._stat(path)
                    if st is not None:
                        self._look(path, now, changed=False, st=st)
        for exc in errors:
            log.warning("cannot scan %s: %s", exc.filename or top, exc.strerror or exc)
        return not errors

    def _settle(self, path: str, now: float) -> Offer | Incomplete | None:
        cand = self._candidates[path]
        st = self._stat(path)
        if st is None:
            log.debug("%s vanished before it settled", path)
            del self._candidates[path]
            return None
        sig = _signature(st)
        timeout = self.options.incomplete_timeout
        overdue = now - cand.first_seen >= timeout
        changing = f"still changing after {timeout:g} s (now {st.st_size} bytes)"
        if sig != cand.signature:
            self._changed(cand, sig, now)
            return self._give_up(path, sig, changing) if overdue else None
        if now - cand.last_change < self.options.quiet_seconds:
            cand.next_check = cand.last_change + self.options.quiet_seconds
            return self._give_up(path, sig, changing) if overdue else None
        if cand.truncated is None:
            try:
                check_complete(Path(path))
            except FrameError as exc:
                if exc.reason == "truncated":
                    cand.truncated = exc.message
                elif exc.reason == "unreadable" and self._stat(path) is None:
                    log.debug("%s vanished before it settled", path)
                    del self._candidates[path]
                    return None
                else:
                    return self._offer(path, st)  # ingest quarantines it with this reason
            except Exception:  # let ingest meet whatever this is and quarantine it with its own reason
                log.exception("checking %s failed; offering it to ingest", path)
                return self._offer(path, st)
            else:
                st_after = self._stat(path)
                if st_after is not None and _signature(st_after) == sig:
                    return self._offer(path, st)
                self._look(path, now, changed=True, st=st_after)  # written to while we read it
                return None
        if overdue:
            return self._give_up(path, sig, f"still incomplete after {timeout:g} s: {cand.truncated}")
        cand.recheck = min(MAX_RECHECK_SECONDS, max(self.options.quiet_seconds, 2 * cand.recheck))
        cand.next_check = min(now + cand.recheck, cand.first_seen + timeout)
        return None

    def _offer(self, path: str, st: os.stat_result) -> Offer:
        del self._candidates[path]
        self._offered[path] = _signature(st)
        return Offer(path=Path(path), size=st.st_size, mtime=st.st_mtime)

    def _give_up(self, path: str, sig: _Signature, reason: str) -> Incomplete:
        del self._candidates[path]
        self._offered[path] = sig
        log.info("%s: %s", path, reason)
        return Incomplete(path=Path(path), reason=reason)
