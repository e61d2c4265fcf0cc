"""Taking one file into the archive: hash, inspect, and record it as a frame, a duplicate, set aside, or quarantined.

A raw file is only read, never changed. Everything that goes wrong becomes a row with a reason and a note in
``quarantine/``; nothing here raises for bad input. A frame that is neither imaging calibration nor science (focus,
test, pointing, arc, comparison) is recorded as ``ignored`` with its reason: kept apart from broken files. Filter
names are filed under one spelling per filter (:class:`FilterNames`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nightshift.daemon.archive import Archive
from nightshift.daemon.workspace import Timings, Workspace
from nightshift.service.classify import ClassifyOptions
from nightshift.service.filters import filter_key, most_used_spelling
from nightshift.service.fitsio import sha256_file, write_bytes_atomic
from nightshift.service.frame import OTHER_KIND, FrameError, FrameMeta
from nightshift.service.inspect import inspect_frame

__all__ = ["Examined", "FileJob", "FilterNames", "examine", "quarantine", "record", "settled"]

log = logging.getLogger("nightshift.ingest")


def quarantine(ws: Workspace, row: dict[str, Any], error: FrameError) -> int:
    """Record ``row`` as quarantined with the error's reason, and write the note beside the archive."""
    row = {**row, "status": "quarantined", "reason": f"{error.reason}: {error.message}"}
    frame_id = ws.archive.record_frame(row)
    frame = ws.archive.frame(frame_id)
    note_path = ws.layout.quarantine_note(frame)
    note = {
        "path": frame["path"],
        "sha256": frame.get("sha256"),
        "reason": error.reason,
        "message": error.message,
        "frame_id": frame_id,
        "note": "The raw file was left where it is, untouched. Fix or remove it; nightshift took nothing from it.",
    }
    write_bytes_atomic(note_path, json.dumps(note, indent=2).encode())
    ws.archive.event("ingest", "quarantined", str(error), frame_id=frame_id)
    ws.metrics.frames_quarantined.labels(reason=error.reason).inc()
    log.warning("quarantined %s: %s", frame["path"], error)
    return frame_id


@dataclass
class FileJob:
    """One settled file to examine, as plain data: where it is, its size and time, and the header words."""

    path: Path
    size: int
    mtime: float
    options: ClassifyOptions


@dataclass
class Examined:
    """What reading one file found: its metadata, or why it cannot be used. Made without the archive."""

    path: Path
    size: int
    mtime: float
    sha256: str | None = None
    meta: FrameMeta | None = None
    error: FrameError | None = None
    timings: Timings = field(default_factory=Timings)


def examine(job: FileJob) -> Examined:
    """Hash and inspect one file (only reads it; a worker thread or a Dask worker can run it). Never raises for
    bad input."""
    ex = Examined(job.path, job.size, job.mtime)
    with ex.timings.stage("ingest"):
        try:
            ex.sha256 = sha256_file(job.path)
        except OSError as exc:
            ex.error = FrameError("unreadable", f"cannot read the file: {exc.strerror or exc}")
            return ex
        try:
            ex.meta = inspect_frame(job.path, options=job.options, sha256=ex.sha256)
        except FrameError as exc:
            ex.error = exc
    return ex


def settled(ws: Workspace, path: Path, size: int | None = None, mtime: float | None = None) -> tuple[int, float] | None:
    """(size, mtime) of ``path`` if it needs ingesting; None when the archive holds it unchanged or it vanished
    (a file that cannot even be stat'ed is quarantined here)."""
    spath = str(path)
    try:
        st = path.stat()
    except OSError as exc:
        if ws.archive.frame_by_path(spath) is None:
            quarantine(ws, {"path": spath}, FrameError("unreadable", f"cannot stat the file: {exc.strerror or exc}"))
        return None
    size = st.st_size if size is None else size
    mtime = st.st_mtime if mtime is None else mtime
    if ws.archive.known(spath, size, mtime):
        return None
    ws.metrics.files_seen.inc()
    return size, mtime


@dataclass
class FilterNames:
    """One spelling per filter: names that compare equal (``V``, ``v``, `` V ``: spaces dropped, case folded
    unless ``keep_case``) are filed under the spelling the archive already uses, else under the most used
    spelling of the batch being taken in (:meth:`prefer`), else as written."""

    keep_case: bool = False
    preferred: dict[str, str] = field(default_factory=dict)

    def key(self, name: str | None) -> str | None:
        return filter_key(name, keep_case=self.keep_case)

    def prefer(self, names: Iterable[str | None]) -> None:
        """Remember the most used spelling of each filter among ``names`` (a batch about to be recorded)."""
        groups: dict[str, list[str]] = {}
        for name in names:
            if name is not None:
                groups.setdefault(self.key(name) or "", []).append(name)
        self.preferred = {k: most_used_spelling(v) or v[0] for k, v in groups.items()}

    def file(self, archive: Archive, meta: FrameMeta) -> None:
        """Set ``meta.filter`` to its filter's one spelling, and say so in its note when it changes."""
        if meta.filter is None:
            return
        key = self.key(meta.filter)
        known = [r["filter"] for r in archive.query("SELECT DISTINCT filter FROM frames WHERE filter IS NOT NULL")]
        spelled = next((f for f in known if self.key(f) == key), None) or self.preferred.get(key or "", meta.filter)
        if spelled != meta.filter:
            note = f"filter {meta.filter!r} filed as {spelled!r}"
            meta.header_note = f"{meta.header_note}; {note}" if meta.header_note else note
            meta.filter = spelled


def record(ws: Workspace, ex: Examined, names: FilterNames | None = None) -> int | None:
    """Record what ``examine`` found: a frame, a duplicate, a frame set aside (``ignored``), or a quarantined file.
    Returns the frame id, or None when the archive already held this content at this path."""
    ws.observe(ex.timings)
    spath = str(ex.path)
    base = {"path": spath, "size_bytes": ex.size, "mtime": ex.mtime, "sha256": ex.sha256}
    existing = ws.archive.frame_by_path(spath)
    if existing is not None and ex.sha256 is not None and existing.get("sha256") == ex.sha256:
        ws.archive.update_frame(existing["id"], size_bytes=ex.size, mtime=ex.mtime)
        return None
    if existing is not None:
        log.warning("%s changed on disk after it was recorded; recording its new content", spath)
        ws.archive.event("ingest", "changed", "content changed on disk; re-ingested", frame_id=existing["id"])
    if ex.error is not None or ex.meta is None:
        return quarantine(ws, base, ex.error or FrameError("processing_error", "inspection gave no result"))
    meta = ex.meta
    (names or FilterNames()).file(ws.archive, meta)
    row = {**meta.row(), "mtime": ex.mtime, "reason": None, "duplicate_of": None}
    original = ws.archive.frame_by_sha(ex.sha256 or "", exclude_path=spath)
    if original is not None:
        row.update(
            status="duplicate",
            reason=f"same content as {original['path']} (frame {original['id']})",
            duplicate_of=original["id"],
        )
        frame_id = ws.archive.record_frame(row)
        ws.archive.event("ingest", "duplicate", row["reason"], frame_id=frame_id)
        ws.metrics.frames_duplicate.inc()
        log.info("duplicate %s: %s", spath, row["reason"])
        return frame_id
    if meta.kind == OTHER_KIND:
        row.update(status="ignored", reason=meta.extra.get("set_aside") or "not a frame nightshift reduces")
        frame_id = ws.archive.record_frame(row)
        ws.archive.event("ingest", "ignored", row["reason"], frame_id=frame_id)
        log.info("set aside %s: %s", spath, row["reason"])
        return frame_id
    row["status"] = "ingested"
    frame_id = ws.archive.record_frame(row)
    note = f"{meta.kind} {meta.exptime:g}s" if meta.exptime is not None else meta.kind
    if meta.filter:
        note += f" filter {meta.filter}"
    detail = f"{note} (night {meta.night}, header words: {meta.dialect})"
    if meta.header_note:
        detail += f"; {meta.header_note}"
    ws.archive.event("ingest", "ingested", detail, frame_id=frame_id)
    if meta.extra.get("looks_like"):
        log.warning("%s: %s", spath, meta.header_note)
    ws.metrics.frames_ingested.labels(kind=meta.kind).inc()
    # the file time, not DATE-OBS: a camera clock set in the future must not hide a stall
    ws.metrics.set_newest_frame(min(ex.mtime, time.time()))
    log.info("ingested %s: %s, night %s", spath, note, meta.night)
    return frame_id
