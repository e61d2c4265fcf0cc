"""Batch work on nights already on disk: ``nightshift reduce`` (the daemon's pipeline over a folder, once) and
``nightshift reprocess`` (recalibrate chosen lights with the current best masters)."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from nightshift.daemon.archive import now_iso
from nightshift.daemon.pipeline import Pipeline
from nightshift.daemon.report import write_reports
from nightshift.daemon.watcher import is_wanted

__all__ = ["Progress", "nights_of", "reduce_folders", "reprocess", "scan_folder"]

log = logging.getLogger("nightshift.batch")


class Progress:
    """A progress line on stderr for long batch work: at most one line every ``every`` seconds."""

    def __init__(self, label: str, total: int | None = None, every: float = 2.0) -> None:
        self.label, self.total, self.every = label, total, every
        self.done = 0
        self._last = 0.0
        self._start = time.monotonic()

    def step(self) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self._last >= self.every or (self.total is not None and self.done == self.total):
            self._last = now
            of = f"/{self.total}" if self.total else ""
            print(f"[{self.label}] {self.done}{of} ({now - self._start:.1f} s)", file=sys.stderr, flush=True)


def scan_folder(folder: Path, include: list[str], exclude: list[str]) -> list[Path]:
    """Every wanted file below ``folder``, sorted by path (the order a capture program wrote them, usually)."""
    out: list[Path] = []
    folder = folder.absolute()
    for dirpath, dirs, files in os.walk(folder):
        rel_dir = Path(dirpath).relative_to(folder)
        dirs[:] = sorted(d for d in dirs if is_wanted(rel_dir / d / "x.fits", ["*"], exclude))
        for f in sorted(files):
            if is_wanted(rel_dir / f, include, exclude):
                out.append(Path(dirpath) / f)
    return out


def reduce_folders(
    pipeline: Pipeline, folders: list[Path], *, show_progress: bool = True, reports: bool = True
) -> dict[str, Any]:
    """Ingest every wanted file of ``folders``, run the pipeline to the end of each night, write the report of
    each night the files belong to (``reports``; summary key ``reports``: {night: path}), and summarise.

    Every stack is finalised at the end, so no running mean is redrawn after each light (``Stacker.live``)."""
    pipeline.stacker.live = False
    w = pipeline.config.watch
    files: list[Path] = []
    for folder in folders:
        if not folder.is_dir():
            raise NotADirectoryError(f"not a folder: {folder}")
        files += scan_folder(folder, w.include, w.exclude)
    files.sort(key=lambda p: (p.stat().st_mtime if p.exists() else 0.0, str(p)))
    pipeline.check_storage(files, folders)
    log.info("reduce: %d file(s) in %s", len(files), ", ".join(map(str, folders)))
    t0 = time.monotonic()
    progress = Progress("ingest", len(files)) if show_progress else None
    pipeline.ingest_many(files, progress=progress.step if progress else None)
    t_ingest = time.monotonic() - t0
    progress = Progress("process") if show_progress else None
    pipeline.end_night(progress=progress.step if progress else None)
    summary = pipeline.summary()
    if reports:
        summary["reports"] = write_reports(pipeline.archive, nights_of(pipeline, files))
    summary["files"] = len(files)
    summary["seconds"] = {"ingest": round(t_ingest, 3), "total": round(time.monotonic() - t0, 3)}
    return summary


def nights_of(pipeline: Pipeline, files: list[Path]) -> list[str]:
    """The observing nights of the archived frames at ``files`` (absolute paths, as ingested)."""
    nights: set[str] = set()
    paths = [str(f) for f in files]
    for i in range(0, len(paths), 500):  # SQLite's limit on query parameters
        chunk = paths[i : i + 500]
        rows = pipeline.archive.query(
            f"SELECT DISTINCT night FROM frames WHERE path IN ({','.join('?' * len(chunk))})", chunk
        )
        nights.update(r["night"] for r in rows if r["night"])
    return sorted(nights)


def reprocess(
    pipeline: Pipeline,
    *,
    night: str | None = None,
    obj: str | None = None,
    frame_id: int | None = None,
    show_progress: bool = True,
) -> int:
    """Send the chosen lights back to calibration with the current best masters; returns how many."""
    where, args = ["kind = 'light'", "status IN ('pending', 'calibrated', 'stacked', 'rejected')"], []
    if night:
        where.append("night = ?")
        args.append(night)
    if obj:
        where.append("object = ?")
        args.append(obj)
    if frame_id is not None:
        where.append("id = ?")
        args.append(frame_id)
    a = pipeline.archive
    rows = a.query(f"SELECT id, path, stack_id, night FROM frames WHERE {' AND '.join(where)}", args)
    ids = [r["id"] for r in rows]
    if not ids:
        return 0
    pipeline.check_storage([Path(r["path"]) for r in rows])
    marks = ",".join("?" * len(ids))
    with a.transaction():
        stacks = {r["stack_id"] for r in rows if r["stack_id"]}
        a.execute(f"DELETE FROM stack_frames WHERE frame_id IN ({marks})", ids)
        a.execute(f"DELETE FROM frame_sources WHERE frame_id IN ({marks})", ids)
        a.execute(
            f"UPDATE frames SET status = 'ingested', reason = NULL, stack_id = NULL, n_stars = NULL, fwhm = NULL, "
            f"elongation = NULL, background = NULL, background_rms = NULL, transparency = NULL, "
            f"aligned_path = NULL, tries = 0, updated_at = ? WHERE id IN ({marks})",
            [now_iso(), *ids],
        )
        for sid in stacks:
            a.execute("UPDATE stacks SET state = 'live', updated_at = ? WHERE id = ?", [now_iso(), sid])
            a.event("reprocess", "reopened", f"{len(ids)} frame(s) sent back to calibration", stack_id=sid)
    for fid in ids:
        a.event("reprocess", "requeued", "recalibrate with the current best masters", frame_id=fid)
    pipeline.forget()
    log.info("reprocess: %d light(s) sent back to calibration", len(ids))
    progress = Progress("reprocess", None) if show_progress else None
    for n in sorted({r["night"] for r in rows}):
        pipeline.end_night(n, progress=progress.step if progress else None)
    return len(ids)
