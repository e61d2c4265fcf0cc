"""Where every product lives in the archive folder, and the clean-up of temp files a crash left behind.

All names are built from header values made safe (``nightshift.service.safepath``), so no OBJECT or FILTER can point a
write outside the archive.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from nightshift.service.readout import Readout
from nightshift.service.safepath import safe_component, safe_join

__all__ = ["COMPUTED_FOLDERS", "FOLDERS", "Layout", "product_shape"]

log = logging.getLogger("nightshift.products")

#: Endings of raw file names dropped from product names (compared in lower case; longest first).
_RAW_SUFFIXES = (
    ".fits.fz",
    ".fit.fz",
    ".fts.fz",
    ".fits.gz",
    ".fit.gz",
    ".fts.gz",
    ".fits",
    ".fit",
    ".fts",
    ".fz",
    ".xisf",
)

FOLDERS = ("masters", "calibrated", "aligned", "stacks", "previews", "quarantine", "reports")
#: The folders compute steps write to, wherever they run (a Dask worker too); the archive's owner writes the rest.
COMPUTED_FOLDERS = ("masters", "calibrated", "aligned", "stacks", "previews")


def _exp(exptime: float | None) -> str:
    if exptime is None:
        return "unknown"
    return f"{exptime:g}s"


def product_shape(frame: dict[str, Any]) -> tuple[int, int]:
    """(rows, columns) of a frame's calibrated, aligned and stacked products: its raw shape (``naxis2``,
    ``naxis1``) trimmed as its ``readout`` says."""
    raw = (int(frame["naxis2"]), int(frame["naxis1"]))
    return Readout.parse(frame.get("readout"), raw).shape


class Layout:
    """Paths of the archive's products, organised by night."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def make_folders(self) -> None:
        for name in FOLDERS:
            (self.root / name).mkdir(parents=True, exist_ok=True)

    def relative(self, path: Path) -> str:
        """What the archive stores: the product's path relative to the archive folder."""
        return Path(path).relative_to(self.root).as_posix()

    def absolute(self, stored: str) -> Path:
        return safe_join(self.root, *Path(stored).parts)

    @staticmethod
    def _stem(frame: dict[str, Any]) -> str:
        name = Path(frame["path"]).name
        for suffix in _RAW_SUFFIXES:
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
                break
        return f"{frame['id']:06d}_{safe_component(name, max_len=80)}"

    def master(self, kind: str, set_key_slug: str, night: str, version: int) -> Path:
        return safe_join(self.root, "masters", night, kind, f"{kind}_{set_key_slug}_v{version}.fits")

    def calibrated(self, frame: dict[str, Any]) -> Path:
        return safe_join(
            self.root,
            "calibrated",
            frame["night"],
            safe_component(frame.get("object")),
            safe_component(frame.get("filter"), default="nofilter"),
            self._stem(frame) + ".fits",
        )

    def aligned(self, frame: dict[str, Any]) -> Path:
        return safe_join(
            self.root,
            "aligned",
            frame["night"],
            safe_component(frame.get("object")),
            safe_component(frame.get("filter"), default="nofilter"),
            self._stem(frame) + ".fits",
        )

    def frame_preview(self, frame: dict[str, Any]) -> Path:
        return safe_join(self.root, "previews", frame["night"], "frames", self._stem(frame) + ".png")

    def stack(
        self, night: str, obj: str | None, filt: str | None, exptime: float | None, *, setup: str | None = None
    ) -> Path:
        """``stacks/<night>/<object>/<object>_<filter>_<exposure>[_<setup>].fits``: ``setup`` (camera and binning)
        names the stack of a second camera setup for the same object, filter and exposure."""
        o = safe_component(obj)
        f = safe_component(filt, default="nofilter")
        tail = f"_{safe_component(setup, max_len=40)}" if setup else ""
        return safe_join(self.root, "stacks", night, o, f"{o}_{f}_{_exp(exptime)}{tail}.fits")

    def stack_preview(self, stack: dict[str, Any]) -> Path:
        """The picture of a stack row: ``previews/<night>/stacks/<the stack file's name>.png``."""
        return safe_join(self.root, "previews", stack["night"], "stacks", Path(stack["path"]).stem + ".png")

    def thumbnail(self, stored_preview: str) -> Path:
        """The small JPEG of the preview at archive path ``stored_preview``: ``thumbs/<name>.jpg`` beside it."""
        preview = Path(stored_preview)
        return safe_join(self.root, *preview.parent.parts, "thumbs", preview.stem + ".jpg")

    def quarantine_note(self, frame: dict[str, Any]) -> Path:
        night = frame.get("night") or "undated"
        return safe_join(self.root, "quarantine", night, self._stem(frame) + ".json")

    def report(self, night: str) -> Path:
        return safe_join(self.root, "reports", f"night-{safe_component(night)}.html")

    def sweep_temp_files(self) -> int:
        """Remove temp files an interrupted atomic write left in the product folders; returns how many."""
        removed = 0
        for name in FOLDERS:
            top = self.root / name
            if not top.exists():
                continue
            for dirpath, _dirs, files in os.walk(top):
                for f in files:
                    if f.startswith(".") and f.endswith(".tmp"):
                        try:
                            os.unlink(os.path.join(dirpath, f))
                            removed += 1
                        except OSError as exc:  # pragma: no cover - a permissions problem worth a line
                            log.warning("could not remove temp file %s: %s", f, exc)
        if removed:
            log.info("removed %d temp file(s) left by an interrupted write", removed)
        return removed
