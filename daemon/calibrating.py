"""Calibrating one light: choose its masters, apply them, write the product and its picture, record the choice.

A light whose masters do not exist yet waits as ``pending`` with the reason; the pipeline retries it whenever a
new master appears.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from nightshift.daemon.choose import Choice, choose_for_light
from nightshift.service.calibrate import CalibrationError, calibrate
from nightshift.service.fitsio import read_image, read_mask, write_bytes_atomic, write_fits_atomic
from nightshift.service.frame import Image
from nightshift.service.preview import side_by_side_png

if TYPE_CHECKING:
    from nightshift.daemon.pipeline import Pipeline

__all__ = ["MasterCache", "calibrate_light", "compute_light", "plan_light", "record_light", "refuse_light"]

log = logging.getLogger("nightshift.calibrate")


class MasterCache:
    """The few masters in use, kept in memory (a night uses a handful; each is read once)."""

    def __init__(self, root: Path, size: int = 8) -> None:
        self.root = root
        self.size = size
        self._cache: OrderedDict[int, Image] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, master: dict[str, Any]) -> Image:
        with self._lock:  # workers calibrating lights share the cache
            return self._get(master)

    def _get(self, master: dict[str, Any]) -> Image:
        mid = master["id"]
        if mid in self._cache:
            self._cache.move_to_end(mid)
            return self._cache[mid]
        path = self.root / master["path"]
        img = read_image(path)
        mask = read_mask(path)
        if mask is not None:
            img.mask = mask
        self._cache[mid] = img
        while len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return img

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()


def _combined_mask(*images: Image | None) -> np.ndarray | None:
    masks = [im.mask for im in images if im is not None and im.mask is not None]
    if not masks:
        return None
    out = masks[0].copy()
    for m in masks[1:]:
        out |= m
    return out


def plan_light(p: Pipeline, frame: dict[str, Any]) -> Choice | None:
    """The masters for ``frame``; None (and the light set pending with the reason) when one is missing."""
    end_of_night = p.night_ended(frame["night"])
    choice = choose_for_light(p.archive, p.config.calibration, frame, end_of_night=end_of_night)
    if not choice.missing:
        return choice
    reason = choice.reason_missing + (" (night ended)" if end_of_night else "")
    if frame["status"] != "pending" or frame.get("reason") != reason:
        p.archive.set_status(frame["id"], "pending", reason)
        p.archive.event("calibrate", "pending", reason, frame_id=frame["id"])
        log.info("pending %s: %s", frame["path"], reason)
    return None


def compute_light(p: Pipeline, frame: dict[str, Any], choice: Choice) -> tuple[Path, Path]:
    """Read, calibrate and write one light and its picture; touches no database (runs on a worker thread).

    Raises CalibrationError when the science refuses the masters."""
    cfg = p.config.calibration
    with p.metrics.stage("calibrate"):
        raw = read_image(Path(frame["path"]))
        bias = p.masters.get(choice.bias) if choice.bias else None
        dark = p.masters.get(choice.dark) if choice.dark else None
        flat = p.masters.get(choice.flat) if choice.flat else None
        provenance = [
            f"{m['kind']}: {m['path']} sha256:{m['sha256'][:16]}" for m in (choice.bias, choice.dark, choice.flat) if m
        ]
        out = calibrate(
            raw,
            bias=bias,
            dark=dark,
            flat=flat,
            dark_factor=choice.dark_scale if dark is not None else None,
            mask=_combined_mask(dark, flat),
            overscan=cfg.overscan or None,
            trim=cfg.trim or None,
            saturation=cfg.saturation,
            cosmic_rays=cfg.cosmic_rays,
            provenance=provenance,
        )
        path = p.layout.calibrated(frame)
        write_fits_atomic(path, out)
    with p.metrics.stage("preview"):
        preview = p.layout.frame_preview(frame)
        write_bytes_atomic(preview, side_by_side_png(raw.data, out.data, mask=out.mask))
    return path, preview


def record_light(p: Pipeline, frame: dict[str, Any], choice: Choice, path: Path, preview: Path) -> None:
    p.archive.set_status(
        frame["id"],
        "calibrated",
        calibrated_path=p.layout.relative(path),
        preview_path=p.layout.relative(preview),
        bias_id=choice.bias["id"] if choice.bias else None,
        dark_id=choice.dark["id"] if choice.dark else None,
        flat_id=choice.flat["id"] if choice.flat else None,
        dark_scale=choice.dark_scale if choice.dark else None,
        calibration_note=choice.note,
    )
    p.archive.event("calibrate", "calibrated", choice.note, frame_id=frame["id"])
    p.metrics.frames_calibrated.inc()
    log.info("calibrated %s: %s", frame["path"], choice.note)


def refuse_light(p: Pipeline, frame: dict[str, Any], exc: CalibrationError) -> None:
    p.archive.set_status(frame["id"], "pending", f"calibration refused: {exc}")
    p.archive.event("calibrate", "refused", str(exc), frame_id=frame["id"])
    log.warning("calibration of %s refused: %s", frame["path"], exc)


def calibrate_light(p: Pipeline, frame: dict[str, Any]) -> bool:
    """Calibrate ``frame`` if its masters exist; returns True when calibrated, False when it waits."""
    choice = plan_light(p, frame)
    if choice is None:
        return False
    try:
        path, preview = compute_light(p, frame, choice)
    except CalibrationError as exc:
        refuse_light(p, frame, exc)
        return False
    record_light(p, frame, choice, path, preview)
    return True
