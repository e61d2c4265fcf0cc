"""Calibrating one light: choose its masters, apply them, write the product and its picture, record the choice.

*plan* (:func:`plan_light`) chooses the masters on the archive's thread, *compute* (:func:`compute_light`) reads,
calibrates (a colour light on its raw mosaic, then debayered) and writes from plain data only (a worker thread or
a Dask worker can run it), *record* (:func:`record_light`, :func:`refuse_light`) writes the outcome. A light whose
masters do not exist yet waits as ``pending`` with the reason; the pipeline retries it whenever a new master
appears.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nightshift.daemon.choose import Choice, choose_for_light, readout_settings
from nightshift.daemon.config import CalibrationConfig
from nightshift.daemon.mastercache import MASTERS, combined_mask
from nightshift.daemon.workspace import Timings, Workspace
from nightshift.service.calibrate import calibrate
from nightshift.service.cfa import state_pattern
from nightshift.service.colour import develop
from nightshift.service.colour_preview import colour_side_by_side_png
from nightshift.service.fitsio import read_image, write_bytes_atomic, write_fits_atomic
from nightshift.service.preview import side_by_side_png

__all__ = ["LightJob", "LightResult", "compute_light", "plan_light", "record_light", "refuse_light"]

log = logging.getLogger("nightshift.calibrate")


@dataclass
class LightJob:
    """Everything needed to calibrate one light, as plain data: the light's row, the masters chosen (rows and
    absolute paths), where the products go, and the rules."""

    frame: dict[str, Any]
    choice: Choice
    masters: dict[str, str]  # kind -> absolute path of the master file
    calibrated: Path
    preview: Path
    rules: CalibrationConfig


@dataclass
class LightResult:
    calibrated: Path
    preview: Path
    timings: Timings = field(default_factory=Timings)


def plan_light(
    ws: Workspace, rules: CalibrationConfig, frame: dict[str, Any], *, end_of_night: bool
) -> LightJob | None:
    """The job for ``frame``; None (and the light set pending with the reason) when a master is missing."""
    choice = choose_for_light(ws.archive, rules, frame, end_of_night=end_of_night)
    if choice.missing:
        reason = choice.reason_missing + (" (night ended)" if end_of_night else "")
        if frame["status"] != "pending" or frame.get("reason") != reason:
            ws.archive.set_status(frame["id"], "pending", reason)
            ws.archive.event("calibrate", "pending", reason, frame_id=frame["id"])
            log.info("pending %s: %s", frame["path"], reason)
        return None
    masters = {
        kind: str(ws.layout.root / row["path"])
        for kind, row in (("bias", choice.bias), ("dark", choice.dark), ("flat", choice.flat))
        if row is not None
    }
    return LightJob(frame, choice, masters, ws.layout.calibrated(frame), ws.layout.frame_preview(frame), rules)


def compute_light(job: LightJob) -> LightResult:
    """Read, calibrate and write one light and its picture. Touches no database.

    Raises CalibrationError when the science refuses the masters."""
    rules, choice = job.rules, job.choice
    overscan, trim = readout_settings(job.frame, rules)
    result = LightResult(job.calibrated, job.preview)
    frame = job.frame
    colour = frame.get("cfa") is not None or frame.get("naxis3") is not None
    with result.timings.stage("calibrate"):
        raw = read_image(Path(frame["path"]))
        state_pattern(raw.header, frame.get("bayerpat") if frame.get("naxis3") is None else None)
        bias, dark, flat = (MASTERS.get(job.masters[k]) if k in job.masters else None for k in ("bias", "dark", "flat"))
        provenance = [
            f"{m['kind']}: {m['path']} sha256:{m['sha256'][:16]}" for m in (choice.bias, choice.dark, choice.flat) if m
        ]
        out = calibrate(
            raw,
            bias=bias,
            dark=dark,
            flat=flat,
            dark_factor=choice.dark_scale if dark is not None else None,
            mask=combined_mask(dark, flat),
            overscan=overscan,
            trim=trim,
            saturation=rules.saturation,
            cosmic_rays=rules.cosmic_rays,
            provenance=provenance,
        )
        if colour:  # calibrated on the mosaic (or plane by plane); now its three colour planes
            out = develop(out)
        write_fits_atomic(job.calibrated, out)
    with result.timings.stage("preview"):
        shown = out.mask if out.saturated is None else out.mask & ~out.saturated  # a saturated core is no hole
        if colour:
            picture = colour_side_by_side_png(raw.data, out.data, mask=shown)
        else:
            picture = side_by_side_png(raw.data, out.data, mask=shown)
        write_bytes_atomic(job.preview, picture)
    return result


def record_light(ws: Workspace, job: LightJob, result: LightResult) -> None:
    frame, choice = job.frame, job.choice
    ws.observe(result.timings)
    ws.archive.set_status(
        frame["id"],
        "calibrated",
        calibrated_path=ws.layout.relative(result.calibrated),
        preview_path=ws.layout.relative(result.preview),
        bias_id=choice.bias["id"] if choice.bias else None,
        dark_id=choice.dark["id"] if choice.dark else None,
        flat_id=choice.flat["id"] if choice.flat else None,
        dark_scale=choice.dark_scale if choice.dark else None,
        calibration_note=choice.note,
    )
    ws.archive.event("calibrate", "calibrated", choice.note, frame_id=frame["id"])
    ws.metrics.frames_calibrated.inc()
    log.info("calibrated %s: %s", frame["path"], choice.note)


def refuse_light(ws: Workspace, frame: dict[str, Any], exc: Exception) -> None:
    ws.archive.set_status(frame["id"], "pending", f"calibration refused: {exc}")
    ws.archive.event("calibrate", "refused", str(exc), frame_id=frame["id"])
    log.warning("calibration of %s refused: %s", frame["path"], exc)
