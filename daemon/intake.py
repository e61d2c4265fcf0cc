"""Taking one file into the archive: hash, inspect, and record it as a frame, a duplicate, or quarantined.

A raw file is only read, never changed. Everything that goes wrong becomes a row with a reason and a note in
``quarantine/``; nothing here raises for bad input.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nightshift.daemon.workspace import Workspace
from nightshift.service.classify import ClassifyOptions
from nightshift.service.fitsio import sha256_file, write_bytes_atomic
from nightshift.service.frame import FrameError, FrameMeta
from nightshift.service.inspect import inspect_frame

__all__ = ["Examined", "examine", "quarantine", "record", "settled"]

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
class Examined:
    """What reading one file found: its metadata, or why it cannot be used. Made without the archive."""

    path: Path
    size: int
    mtime: float
    sha256: str | None = None
    meta: FrameMeta | None = None
    error: FrameError | None = None


def examine(path: Path, size: int, mtime: float, options: ClassifyOptions) -> Examined:
    """Hash and inspect one file (only reads it; safe to run on a worker thread). Never raises for bad input."""
    ex = Examined(path, size, mtime)
    try:
        ex.sha256 = sha256_file(path)
    except OSError as exc:
        ex.error = FrameError("unreadable", f"cannot read the file: {exc.strerror or exc}")
        return ex
    try:
        ex.meta = inspect_frame(path, options=options, sha256=ex.sha256)
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


def record(ws: Workspace, ex: Examined) -> int | None:
    """Record what ``examine`` found: a frame, a duplicate, or a quarantined file. Returns the frame id, or None
    when the archive already held this content at this path."""
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
    row["status"] = "ingested"
    frame_id = ws.archive.record_frame(row)
    note = f"{meta.kind} {meta.exptime:g}s" if meta.exptime is not None else meta.kind
    if meta.filter:
        note += f" filter {meta.filter}"
    ws.archive.event(
        "ingest", "ingested", f"{note} (night {meta.night}, header words: {meta.dialect})", frame_id=frame_id
    )
    ws.metrics.frames_ingested.labels(kind=meta.kind).inc()
    # the file time, not DATE-OBS: a camera clock set in the future must not hide a stall
    ws.metrics.set_newest_frame(min(ex.mtime, time.time()))
    log.info("ingested %s: %s, night %s", spath, note, meta.night)
    return frame_id
