"""Calibrate a light frame with master bias, dark and flat: the hot path, on plain float32 arrays.

``calibrate`` chains the steps of ccdproc's ``ccd_process`` (overscan, trim, bias, dark scaled by exposure,
flat, cosmic rays) in place on one float32 copy of the light, and says in the header what it did. The rules
that keep a reduction correct are enforced here and refused with :class:`CalibrationError`: a dark still
holding the bias is never scaled, a bias-subtracted dark is never used without the bias, the bias is never
taken out twice, a flat of another filter is never used, and a flat never crosses colour layouts (a mono flat on
a colour light, a colour flat on a mono light, a flat of another Bayer pattern or row order).

Colour frames are calibrated the same way, pixel by pixel: a Bayer mosaic before any interpolation (cosmic rays
are looked for with the CFA positions brought to one level), a debayered 3-plane cube plane by plane.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from astropy.io import fits
from nightshift.service import readout
from nightshift.service.cfa import CfaError, flip_rows, header_layout, shift_pattern
from nightshift.service.frame import FrameError, Image
from nightshift.service.provenance import add_history, logged
from nightshift.service.saturation import calibrated_level, raw_level

__all__ = [
    "MIN_FLAT",
    "CalibrationError",
    "calibrate",
    "check_colour",
    "check_dark_bias",
    "check_overscan",
    "colour_layout",
    "dark_scale",
    "exposure_of",
    "is_bias_subtracted",
    "is_overscan_subtracted",
    "parse_section",
]

#: Flat values at or below this (or not finite) are not divided by: the pixel is flagged instead.
MIN_FLAT = 1e-3
#: Relative and absolute tolerance (s) within which two exposure times count as equal.
_EXPTIME_RTOL = 1e-4
_EXPTIME_ATOL = 1e-3


class CalibrationError(ValueError):
    """A calibration that would give a wrong result and is refused; the archive records the message."""


def exposure_of(header: fits.Header) -> float | None:
    """Exposure time in seconds from EXPTIME or EXPOSURE, or None when neither holds a number."""
    for key in ("EXPTIME", "EXPOSURE"):
        value = header.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def is_bias_subtracted(image: Image) -> bool:
    """True when the frame's header says BIASSUB = T."""
    return _flag(image.header, "BIASSUB")


def _kind(image: Image) -> str:
    text = str(image.header.get("IMAGETYP", "dark")).lower()
    return text.removeprefix("master ").strip() or "dark"


def dark_scale(light_exptime: float, dark: Image) -> float:
    """The factor a master dark is multiplied by before it is subtracted from a frame of ``light_exptime``.

    Parameters
    ----------
    light_exptime : float
        Exposure of the frame to calibrate, seconds.
    dark : Image
        The master dark (EXPTIME in its header).

    Returns
    -------
    float
        ``light_exptime / dark EXPTIME``, exactly 1.0 when the two are equal.

    Raises
    ------
    CalibrationError
        If the dark has no usable exposure, or the exposures differ and the dark still contains the bias
        (BIASSUB is not T): scaling would scale the bias too.
    """
    dark_exptime = exposure_of(dark.header)
    if dark_exptime is None or dark_exptime <= 0:
        raise CalibrationError(f"the {_kind(dark)} has no usable exposure time (EXPTIME={dark_exptime})")
    if light_exptime is None or not math.isfinite(light_exptime) or light_exptime < 0:
        raise CalibrationError(f"cannot scale a dark to exposure time {light_exptime}")
    if math.isclose(light_exptime, dark_exptime, rel_tol=_EXPTIME_RTOL, abs_tol=_EXPTIME_ATOL):
        return 1.0
    if not is_bias_subtracted(dark):
        raise CalibrationError(
            f"refusing to scale a {dark_exptime:g} s {_kind(dark)} that still contains the bias to {light_exptime:g} s"
        )
    return light_exptime / dark_exptime


def check_dark_bias(bias: Image | None, dark: Image | None) -> None:
    """Refuse a bias/dark pair that would leave the bias in, or take it out twice.

    Raises
    ------
    CalibrationError
        A bias-subtracted dark without the master bias, or a dark still holding the bias together with
        the master bias.
    """
    if dark is None:
        return
    if is_bias_subtracted(dark) and bias is None:
        raise CalibrationError(f"bias-subtracted {_kind(dark)} needs the master bias")
    if not is_bias_subtracted(dark) and bias is not None:
        raise CalibrationError(
            f"the {_kind(dark)} still contains the bias; subtracting the master bias as well would remove it twice"
        )


def colour_layout(image: Image) -> tuple[str, ...] | None:
    """A frame's colour layout from its header and shape: None for mono, ``("cube",)`` for a 3-plane colour cube,
    ``("mosaic", pattern, row_order)`` for a Bayer mosaic (the pattern at its first stored pixel; the row order
    as stated, bottom-up when not stated).

    Raises
    ------
    CalibrationError
        A header whose BAYERPAT, ROWORDER or offsets cannot be understood.
    """
    if image.is_colour:
        return ("cube",)
    try:
        _, row_order, pattern = header_layout(image.header, height=image.data.shape[0])
    except CfaError as exc:
        raise CalibrationError(str(exc)) from None
    if pattern is None:
        return None
    return ("mosaic", pattern, row_order or "BOTTOM-UP")


def _describe_layout(layout: tuple[str, ...] | None) -> str:
    if layout is None:
        return "mono"
    if layout[0] == "cube":
        return "colour (debayered cube)"
    return f"colour (Bayer {layout[1]} at the first pixel, rows {layout[2].lower()})"


def check_colour(light: Image, master: Image, what: str = "flat") -> None:
    """Refuse a master whose colour layout is not the light's: a mono flat on a colour light, a colour flat on a
    mono light, a flat of another Bayer pattern or row order, a cube's master on a mosaic.

    Raises
    ------
    CalibrationError
        Naming both layouts.
    """
    mine, theirs = colour_layout(light), colour_layout(master)
    if mine != theirs:
        raise CalibrationError(
            f"the {what} is {_describe_layout(theirs)}, the light is {_describe_layout(mine)}: "
            "a flat must have the light's colour layout"
        )


def parse_section(section: str, shape: tuple[int, int]) -> tuple[slice, slice]:
    """numpy slices (rows, columns) for a FITS section ``'[x1:x2,y1:y2]'`` (1-based, inclusive).

    :func:`nightshift.service.readout.parse_section`, raising :class:`CalibrationError`.
    """
    try:
        return readout.parse_section(section, shape)
    except readout.SectionError as exc:
        raise CalibrationError(str(exc)) from None


def _flag(header: fits.Header, key: str) -> bool:
    value = header.get(key, False)
    if isinstance(value, str):
        return value.strip().upper() in ("T", "TRUE", "Y", "YES")
    return value is True


def is_overscan_subtracted(image: Image) -> bool:
    """True when the frame's header says OSCANSUB = T (a master made of overscan-subtracted frames)."""
    return _flag(image.header, "OSCANSUB")


def check_overscan(
    done: bool, raw_shape: tuple[int, int], bias: Image | None, dark: Image | None, *, trimmed: bool = False
) -> None:
    """Refuse masters whose bias level was treated otherwise than the frame's: it would stay, or go twice.

    Parameters
    ----------
    done : bool
        Whether the frame's own overscan level is (to be) subtracted.
    raw_shape : (int, int)
        The frame's raw shape.
    bias, dark : Image or None
        The masters to use; a dark that is bias-subtracted holds no level and is not checked.
    trimmed : bool
        True when an untrimmed master bias cannot be taken relative to its own overscan (building masters).

    Raises
    ------
    CalibrationError
        A master made without overscan subtraction for an overscan-subtracted frame (except, when not
        ``trimmed``, an untrimmed master bias with its own overscan), or the other way round.
    """
    holders = [("master bias", bias)]
    if dark is not None and not is_bias_subtracted(dark):
        holders.append((_kind(dark), dark))
    for what, master in holders:
        if master is None:
            continue
        subtracted = is_overscan_subtracted(master)
        relative = not trimmed and what == "master bias" and master.data.shape == tuple(raw_shape)
        if done and not subtracted and not relative:
            raise CalibrationError(
                f"the {what} was made without overscan subtraction and still holds the bias level, but the "
                "light's overscan is subtracted: the level would be removed twice"
            )
        if not done and subtracted:
            raise CalibrationError(
                f"the {what} was made of overscan-subtracted frames, but the light's overscan is not subtracted: "
                "the light's bias level would stay"
            )


def _apply_readout(
    light: Image, overscan: str | None, trim: str | None, bias: Image | None, header: fits.Header
) -> tuple[np.ndarray, readout.Readout, list[str]]:
    """The light overscan-subtracted and trimmed (a new array), what was done, and the step lines.

    With an untrimmed master bias that kept its overscan columns, the bias's own overscan level is put back, so
    the bias pattern is removed relative to its level (masters made by nightshift are overscan-subtracted).
    """
    raw_shape = light.data.shape
    try:
        plan = readout.readout_of(light.header, raw_shape, overscan=overscan, trim=trim)
    except FrameError as exc:
        raise CalibrationError(exc.message) from None
    level = None
    notes = []
    region = plan.overscan_region
    if region is not None:
        level = readout.overscan_level(light.data[region], region, raw_shape)
        if bias is not None and bias.data.shape == raw_shape and not is_overscan_subtracted(bias):
            level = level - readout.overscan_level(bias.data[region], region, raw_shape)
            notes.append("overscan taken relative to the master bias's own overscan")
        header["OVERSCAN"] = (plan.overscan, "overscan region subtracted (per row, fitted)")
        header["OSCANSUB"] = (True, "overscan level subtracted")
    work, steps = readout.apply_readout(light.data, plan, level=level)
    trim_region = plan.trim_region
    if trim_region is not None:
        for key, offset in (("CRPIX1", trim_region[1].start), ("CRPIX2", trim_region[0].start)):
            if isinstance(header.get(key), (int, float)) and not isinstance(header.get(key), bool):
                header[key] = header[key] - offset
        header["TRIM"] = (plan.trim, "region of the raw frame kept")
    if not plan.is_raw:
        for key in ("TRIMSEC", "BIASSEC", "DATASEC"):
            header.remove(key, ignore_missing=True)
    return work, plan, steps + notes


def _view(array: np.ndarray, raw_shape, trim, what: str) -> np.ndarray:
    """``array`` on the output grid: trimmed when it has the raw frame's shape, as is when already trimmed."""
    out_shape = (trim[0].stop - trim[0].start, trim[1].stop - trim[1].start) if trim else raw_shape
    if array.shape == tuple(raw_shape):
        return array[trim] if trim else array
    if array.shape == out_shape:
        return array
    raise CalibrationError(f"{what} has shape {array.shape}, the light has {tuple(raw_shape)}")


def _summary(master: Image) -> str:
    head = master.header
    parts = [str(head.get("IMAGETYP", "?"))]
    for key in ("EXPTIME", "FILTER", "NCOMBINE", "COMBMETH"):
        if key in head:
            parts.append(f"{key}={head[key]}")
    return ", ".join(parts)


def _filters_differ(light: Image, flat: Image) -> bool:
    a, b = light.header.get("FILTER"), flat.header.get("FILTER")
    if a is None or b is None:
        return False
    return str(a).strip().lower() != str(b).strip().lower()


def _clean_cosmic_rays(
    work: np.ndarray, header: fits.Header, saturation: float | None
) -> tuple[np.ndarray, np.ndarray, str]:
    """L.A.Cosmic (ccdproc/astroscrappy) with a noise model fitted to this frame.

    The gain is EGAIN (e-/ADU, else 1). The read noise is not the camera's: after calibration the
    background noise also holds the masters' noise, so it is set so the model's noise at the sky level
    equals the measured (MAD) background scatter.
    """
    from astropy.stats import mad_std
    from ccdproc import cosmicray_lacosmic

    gain = header.get("EGAIN")
    gain = float(gain) if isinstance(gain, (int, float)) and 0 < gain < 1000 else 1.0
    sample = work[:: max(1, work.shape[0] // 512), :: max(1, work.shape[1] // 512)]
    sky = max(float(np.median(sample)), 0.0)
    scatter = float(mad_std(sample))
    readnoise = math.sqrt(max((scatter * gain) ** 2 - sky * gain, 1.0))
    cleaned, hits = cosmicray_lacosmic(
        work,
        gain=gain,
        readnoise=readnoise,
        gain_apply=False,
        satlevel=saturation if saturation is not None else 1e30,
    )
    note = (
        f"cosmic rays cleaned (L.A.Cosmic, gain {gain:g} e-/ADU, noise model {readnoise:.3g} e-): "
        f"{int(hits.sum())} pixels"
    )
    return np.asarray(cleaned, dtype=np.float32), np.asarray(hits, dtype=bool), note


def _dark_factor(light: Image, dark: Image, dark_factor: float | None) -> float:
    """The given factor, checked, or :func:`dark_scale` from the light's exposure."""
    if dark_factor is None:
        exptime = exposure_of(light.header)
        if exptime is None:
            raise CalibrationError("the light has no EXPTIME/EXPOSURE to scale the dark to")
        return dark_scale(exptime, dark)
    if not math.isclose(dark_factor, 1.0) and not is_bias_subtracted(dark):
        raise CalibrationError(
            f"refusing to scale a {exposure_of(dark.header) or 0:g} s {_kind(dark)} that still contains "
            f"the bias by {dark_factor:g}"
        )
    return float(dark_factor)


def _retag_mosaic(header: fits.Header, layout: tuple[str, ...], region: tuple[slice, slice]) -> None:
    """After a trim, state the Bayer pattern of the trimmed mosaic (it starts at another pixel of the cell)."""
    pattern = shift_pattern(layout[1], region[1].start, region[0].start)
    height = region[0].stop - region[0].start
    stated = pattern if layout[2] == "TOP-DOWN" else flip_rows(pattern, height)
    header["BAYERPAT"] = (stated, "Bayer color pattern of the trimmed frame")
    for key in ("XBAYROFF", "YBAYROFF"):
        header.remove(key, ignore_missing=True)


def _cosmic_rays_by_colour(
    work: np.ndarray, header: fits.Header, saturation: float | None, layout: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray, str]:
    """L.A.Cosmic on a colour frame: a cube plane by plane; a mosaic at full resolution with each CFA position
    first scaled to a common sky level, so the colour pattern is not fine structure (a star then shows on all four
    positions, a cosmic ray on one pixel), and the cleaned values scaled back to their own colour. (L.A.Cosmic on
    each CFA position's half-resolution pixels alone would take the undersampled stars for cosmic rays.)"""
    if layout[0] == "cube":
        hits = np.zeros(work.shape, dtype=bool)
        for p in range(3):
            work[p], hits[p], _ = _clean_cosmic_rays(np.ascontiguousarray(work[p]), header, saturation)
        return work, hits, f"cosmic rays cleaned (L.A.Cosmic on each plane): {int(hits.sum())} pixels"
    scales = np.ones((2, 2), dtype=np.float32)
    for dy in range(2):
        for dx in range(2):
            level = float(np.median(work[dy::2, dx::2]))
            scales[dy, dx] = level if math.isfinite(level) and level > 0 else 1.0
    scales /= np.float32(scales.mean())
    tile = np.tile(scales, (work.shape[0] // 2 + 1, work.shape[1] // 2 + 1))[: work.shape[0], : work.shape[1]]
    cleaned, hits, _ = _clean_cosmic_rays(work / tile, header, None if saturation is None else saturation)
    work = cleaned * tile
    shown = ", ".join(f"{v:.3f}" for v in scales.ravel())
    return (
        work,
        hits,
        (
            f"cosmic rays cleaned (L.A.Cosmic on the mosaic, CFA positions scaled by {shown} to one sky level): "
            f"{int(hits.sum())} pixels"
        ),
    )


@logged
def calibrate(
    light: Image,
    *,
    bias: Image | None = None,
    dark: Image | None = None,
    flat: Image | None = None,
    dark_factor: float | None = None,
    mask: np.ndarray | None = None,
    overscan: str | None = readout.AUTO,
    trim: str | None = readout.AUTO,
    saturation: float | None = 65535.0,
    cosmic_rays: bool = False,
    provenance: Sequence[str] = (),
) -> Image:
    """Calibrate one light: overscan, trim, bias, scaled dark, flat, cosmic rays; flag unusable pixels.

    Parameters
    ----------
    light : Image
        The raw light (float32 pixels as read): a 2-D frame (mono or a Bayer mosaic, as its header says) or a
        3-plane colour cube (calibrated plane by plane with masters of the same shape). Never modified.
    bias, dark, flat : Image, optional
        Masters; None skips the step. Masters of the raw frame's shape are trimmed like the light; masters
        already of the trimmed shape are used as they are. Where the flat is <= MIN_FLAT or not finite the
        pixel is left undivided and flagged.
    dark_factor : float, optional
        Multiplier of the dark; None computes it with :func:`dark_scale` from the light's EXPTIME/EXPOSURE.
    mask : numpy.ndarray of bool, optional
        Bad-pixel mask (True = bad) to carry into the output mask. Masks on the masters are carried too.
    overscan : str, optional
        ``"auto"`` (default): the header's BIASSEC, if any; ``"off"`` or None: none; a FITS section
        ``'[x1:x2,y1:y2]'``; or the name of the header keyword holding one. The level of the light's own
        readout is measured in it per row (sigma-clipped mean, a polynomial fitted along the rows, see
        :mod:`nightshift.service.readout`) and subtracted. Masters holding the bias level must have been made
        of overscan-subtracted frames (OSCANSUB = T) exactly when the light's overscan is subtracted; an
        untrimmed master bias with its own overscan is taken relative to that overscan.
    trim : str, optional
        ``"auto"`` (default): the header's TRIMSEC, else DATASEC; ``"off"`` or None; a section; or a keyword
        name. WCS CRPIX is shifted to match.
    saturation : float, optional
        The raw saturation level when the light's header does not state one (``SATURATE``, ``DATAMAX``) and its
        data type does not imply one (65535 for unsigned 16-bit): see
        :func:`nightshift.service.saturation.raw_level`. Raw values at or above the level are flagged in the
        output mask and in ``saturated``; the header's SATURATE becomes the calibrated equivalent. None with no
        level in the header or data type: no check.
    cosmic_rays : bool
        Clean cosmic rays with ``ccdproc.cosmicray_lacosmic`` (gain from EGAIN, else 1) and flag them.
    provenance : sequence of str
        Lines naming the masters used (path, sha256) written to HISTORY as NSMASTER.

    Returns
    -------
    Image
        float32 calibrated pixels, the light's header with CALSTAT ('B', 'D', 'F' for the steps done),
        DARKSCAL, SATURATE (the calibrated level at which pixels saturate), HISTORY of each step, a bool mask
        (True = saturated, masked or flat unusable) and ``saturated`` (True = the raw pixel reached saturation).

    Raises
    ------
    CalibrationError
        A combination of masters that would give a wrong result (see :func:`dark_scale`,
        :func:`check_dark_bias`), a flat of another filter or colour layout (:func:`check_colour`), mismatched
        shapes, bad sections, an overscan or trim asked of a cube.
    """
    check_dark_bias(bias, dark)
    if dark is not None:
        dark_factor = _dark_factor(light, dark, dark_factor)
    if flat is not None and _filters_differ(light, flat):
        raise CalibrationError(
            f"flat is for filter {flat.header.get('FILTER')!r}, the light for {light.header.get('FILTER')!r}"
        )
    if flat is not None:
        check_colour(light, flat)
    layout = colour_layout(light)
    if layout is not None and layout[0] == "cube" and {overscan, trim} - {None, readout.AUTO, readout.OFF}:
        raise CalibrationError("a debayered colour cube has no overscan to subtract or trim")
    header = light.header.copy()
    for key in ("BZERO", "BSCALE", "BLANK"):
        header.remove(key, ignore_missing=True, remove_all=True)
    raw_shape = light.data.shape
    steps: list[str] = []
    calstat = ""

    flags = np.zeros(raw_shape, dtype=bool)
    saturation = raw_level(light.header, saturation)
    saturated = None
    if saturation is not None:
        np.greater_equal(light.data, saturation, out=flags)
        saturated = flags.copy()
        if flags.any():
            steps.append(f"{int(flags.sum())} pixels at or above saturation {saturation:g} flagged")
    if layout is not None and layout[0] == "cube":
        work, region = np.array(light.data, dtype=np.float32, copy=True), None  # no overscan, nothing to trim
    else:
        work, plan, done = _apply_readout(light, overscan, trim, bias, header)
        steps += done
        check_overscan(plan.overscan is not None, raw_shape, bias, dark)
        region = plan.trim_region
        if region is not None:
            flags = np.ascontiguousarray(flags[region])
            saturated = np.ascontiguousarray(saturated[region]) if saturated is not None else None
            if layout is not None:
                _retag_mosaic(header, layout, region)
    raw_view = light.data[region] if region is not None else light.data

    if bias is not None:
        work -= _view(bias.data, raw_shape, region, "master bias")
        calstat += "B"
        steps.append(f"bias subtracted ({_summary(bias)})")
    if dark is not None:
        dark_view = _view(dark.data, raw_shape, region, "master dark")
        if dark_factor == 1.0:
            work -= dark_view
        else:
            work -= np.float32(dark_factor) * dark_view
        calstat += "D"
        header["DARKSCAL"] = (float(dark_factor), "factor the master dark was multiplied by")
        steps.append(f"dark subtracted x{dark_factor:.6g} ({_summary(dark)})")
    sample = (slice(None, None, max(1, min(work.shape) // 256)),) * 2
    offset_sample = raw_view[sample] - work[sample]  # what bias, dark and overscan took away
    flat_sample = None
    if flat is not None:
        flat_view = _view(flat.data, raw_shape, region, "master flat")
        flat_sample = flat_view[sample]
        usable = flat_view > MIN_FLAT  # False for NaN too
        np.divide(work, flat_view, out=work, where=usable)
        unusable = np.logical_not(usable, out=usable)
        flags |= unusable
        calstat += "F"
        steps.append(f"divided by flat ({_summary(flat)}); {int(unusable.sum())} pixels left, flat <= {MIN_FLAT:g}")

    carried = [(mask, "given")]
    carried += [(m.mask, str(m.header.get("IMAGETYP", "master"))) for m in (bias, dark, flat) if m is not None]
    for given, what in carried:
        if given is not None:
            flags |= _view(np.asarray(given, dtype=bool), raw_shape, region, f"{what} mask")
    if cosmic_rays and layout is not None:
        work, hits, note = _cosmic_rays_by_colour(work, light.header, saturation, layout)
        flags |= hits
        steps.append(note)
    elif cosmic_rays:
        work, hits, note = _clean_cosmic_rays(work, light.header, saturation)
        flags |= hits
        steps.append(note)

    if saturation is not None:
        header["SATURATE"] = (
            round(calibrated_level(saturation, offset_sample, flat_sample), 1),
            f"[ADU] calibrated level where pixels saturate (raw {saturation:g})",
        )
    if calstat:
        header["CALSTAT"] = (calstat, "calibration applied: B bias, D dark, F flat")
    for line in provenance:
        add_history(header, "NSMASTER", line)
    for line in steps:
        add_history(header, "NSSTEP", line)
    return Image(
        data=np.ascontiguousarray(work),
        header=header,
        mask=np.ascontiguousarray(flags),
        saturated=np.ascontiguousarray(saturated) if saturated is not None else None,
    )
