"""Shared storage: does a worker see the raw files and the archive at the same paths as the client?

Workers of a Dask cluster read raw files and write products straight to storage they share with the client (NFS,
a cluster file system): no pixel goes through the scheduler. A worker on a machine that does not mount the same
storage at the same paths would read nothing, or write products the client never sees. :class:`StorageProbe`
says what the client needs a worker to reach; :func:`check_storage`, run on the worker, tries it: list every raw
folder, read the first block of some raw files and compare it with what the client read, read a marker file the
client wrote into the archive (the same archive, not one with the same name), and write and remove a file in
each product folder. Its answer is one sentence naming the first path the worker could not reach.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SharedStorageError", "StorageProbe", "check_storage", "make_probe", "remove_probe"]

#: Bytes of a raw file compared between client and worker: one FITS block.
SAMPLE_BYTES = 2880
#: Raw files sampled (the first of each folder, spread evenly when there are more folders).
MAX_SAMPLES = 50
MARKER_PREFIX = ".nightshift-probe-"

#: Tokens of the probes this process has passed: a worker checks once per run, not per task.
_PASSED: set[str] = set()


class SharedStorageError(RuntimeError):
    """A worker cannot reach a path the work needs (the message names the worker and the path)."""


@dataclass(frozen=True)
class StorageProbe:
    """What a worker must reach, as plain data: folders to list, raw file samples (path, digest of the first
    block as the client read it), the client's marker file and its token, and the folders to write in."""

    token: str
    marker: str
    folders: tuple[str, ...]
    samples: tuple[tuple[str, str], ...]
    writable: tuple[str, ...]


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(SAMPLE_BYTES)).hexdigest()


def _spread(items: list[Path], n: int) -> list[Path]:
    if len(items) <= n:
        return items
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def make_probe(
    archive_root: Path, raw_files: list[Path], raw_folders: list[Path], writable: list[Path]
) -> StorageProbe:
    """Write the marker into ``archive_root`` and describe what a worker must reach (on the client)."""
    token = secrets.token_hex(8)
    marker = Path(archive_root) / f"{MARKER_PREFIX}{token}"
    for stale in Path(archive_root).glob(f"{MARKER_PREFIX}*"):  # left by a run that was killed
        stale.unlink(missing_ok=True)
    marker.write_text(token)
    firsts: dict[Path, Path] = {}
    for f in raw_files:
        firsts.setdefault(Path(f).parent, Path(f))
    samples = []
    for f in _spread(sorted(firsts.values()), MAX_SAMPLES):
        try:
            samples.append((str(f), _digest(f)))
        except OSError:
            continue  # unreadable here too: ingest quarantines it, it says nothing about the worker
    folders = sorted({str(Path(p)) for p in raw_folders} | {str(p) for p in firsts})
    return StorageProbe(token, str(marker), tuple(folders), tuple(samples), tuple(str(p) for p in writable))


def remove_probe(probe: StorageProbe) -> None:
    Path(probe.marker).unlink(missing_ok=True)


def _why(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def check_storage(probe: StorageProbe) -> str | None:
    """Try everything ``probe`` asks for (on a worker); None when all is reachable, else what is not.

    Passing is remembered for the life of the process, so every task can call this at no cost."""
    if probe.token in _PASSED:
        return None
    for folder in probe.folders:
        try:
            os.listdir(folder)
        except OSError as exc:
            return f"cannot read the raw folder {folder} ({_why(exc)})"
    for path, digest in probe.samples:
        try:
            seen = _digest(Path(path))
        except OSError as exc:
            return f"cannot read the raw file {path} ({_why(exc)})"
        if seen != digest:
            return f"reads other content than the client at {path} (not the same storage)"
    root = str(Path(probe.marker).parent)
    try:
        seen_token: str | None = Path(probe.marker).read_text()
    except FileNotFoundError:
        seen_token = None
    except OSError as exc:
        return f"cannot read the archive folder {root} ({_why(exc)})"
    if seen_token != probe.token:
        return f"sees another folder at {root} than the client (the client's marker file is not in it)"
    for folder in probe.writable:
        test = Path(folder) / f"{MARKER_PREFIX}{probe.token}-{os.getpid()}.tmp"
        try:
            with open(test, "xb") as f:
                f.write(b"nightshift")
            test.unlink()
        except OSError as exc:
            return f"cannot write the archive folder {folder} ({_why(exc)})"
    _PASSED.add(probe.token)
    return None
