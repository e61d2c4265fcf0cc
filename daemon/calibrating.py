"""Calibrating one light: choose its masters, apply them, write the product and its picture, record the choice.

A light whose masters do not exist yet waits as ``pending`` with the reason; the pipeline retries it whenever a
new master appears.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from daemon.choose import choose_for_light
from service.calibrate import CalibrationError, calibrate
from service.fitsio import read_image, read_mask, write_bytes_atomic, write_fits_atomic
from service.frame import Image
from service.preview import side_by_side_png

if TYPE_CHECKING:
    from daemon.pipeline import Pipeline

__all__ = ["MasterCache", "calibrate_light"]

log = logging.getLogger("nightshift.calibrate")


class MasterCache:
    """The few masters in use, kept in memory (a night uses a handful; each is read once)."""

    def __init__(self, root: Path, size: int = 8) -> None:
        self.root = root
        self.size = size
        self._cache: OrderedDict[int, Image] = OrderedDict()

    def get(self, master: dict[str, Any]) -> Image:
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
        self._cache.clear()


def _combined_mask(*images: Image | None) -> np.ndarray | None:
    masks = [im.mask for im in images if im is not None and im.mask is not None]
    if not masks:
        return None
    out = masks[0].copy()
    for m in masks[1:]:
        out |= m
    return out


def calibrate_light(p: Pipeline, frame: dict[str, Any]) -> bool:
    """Calibrate ``frame`` if its masters exist; returns True when calibrated, False when it waits."""
    cfg = p.config.calibration
    end_of_night = p.night_ended(frame["night"])
    choice = choose_for_light(p.archive, cfg, frame, end_of_night=end_of_night)
    if choice.missing:
        reason = choice.reason_missing + (" (night ended)" if end_of_night else "")
        if frame["status"] != "pending" or frame.get("reason") != reason:
            p.archive.set_status(frame["id"], "pending", reason)
            p.archive.event("calibrate", "pending", reason, frame_id=frame["id"])
            log.info("pending %s: %s", frame["path"], reason)
        return False
    with p.metrics.stage("calibrate"):
        raw = read_image(Path(frame["path"]))
        bias = p.masters.get(choice.bias) if choice.bias else None
        dark = p.masters.get(choice.dark) if choice.dark else None
        flat = p.masters.get(choice.flat) if choice.flat else None
        provenance = [
            f"{m['kind']}: {m['path']} sha256:{m['sha256'][:16]}" for m in (choice.bias, choice.dark, choice.flat) if m
        ]
        try:
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
        except CalibrationError as exc:
            p.archive.set_status(frame["id"], "pending", f"calibration refused: {exc}")
            p.archive.event("calibrate", "refused", str(exc), frame_id=frame["id"])
            log.warning("calibration of %s refused: %s", frame["path"], exc)
            return False
        path = p.layout.calibrated(frame)
        write_fits_atomic(path, out)
    with p.metrics.stage("preview"):
        preview = p.layout.frame_preview(frame)
        write_bytes_atomic(preview, side_by_side_png(raw.data, out.data))
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
    return True
