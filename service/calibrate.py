"""Calibrate a light frame with master bias, dark and flat: the hot path, on plain float32 arrays.

``calibrate`` chains the steps of ccdproc's ``ccd_process`` (overscan, trim, bias, dark scaled by exposure,
flat, cosmic rays) in place on one float32 copy of the light, and says in the header what it did. The rules
that keep a reduction correct are enforced here and refused with :class:`CalibrationError`: a dark still
holding the bias is never scaled, a bias-subtracted dark is never used without the bias, the bias is never
taken out twice, a flat of another filter is never used.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
from astropy.io import fits
from nightshift.service.frame import Image
from nightshift.service.provenance import add_history, logged

__all__ = [
    "MIN_FLAT",
    "CalibrationError",
    "calibrate",
    "check_dark_bias",
    "dark_scale",
    "exposure_of",
    "is_bias_subtracted",
    "parse_section",
]

#: Flat values at or below this (or not finite) are not divided by: the pixel is flagged instead.
MIN_FLAT = 1e-3
#: Relative and absolute tolerance (s) within which two exposure times count as equal.
_EXPTIME_RTOL = 1e-4
_EXPTIME_ATOL = 1e-3
_SECTION = re.compile(r"^\s*\[\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*\]\s*$")


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
    value = image.header.get("BIASSUB", False)
    if isinstance(value, str):
        return value.strip().upper() in ("T", "TRUE", "Y", "YES")
    return value is True


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


def parse_section(section: str, shape: tuple[int, int]) -> tuple[slice, slice]:
    """numpy slices (rows, columns) for a FITS section ``'[x1:x2,y1:y2]'`` (1-based, inclusive).

    A flipped range (``x1 > x2``) selects the same pixels, in order.

    Raises
    ------
    CalibrationError
        If the text is not a section or it reaches outside ``shape``.
    """
    found = _SECTION.match(section)
    if found is None:
        raise CalibrationError(f"not a FITS section: {section!r}")
    x1, x2, y1, y2 = (int(g) for g in found.groups())
    (x1, x2), (y1, y2) = sorted((x1, x2)), sorted((y1, y2))
    if x1 < 1 or y1 < 1 or x2 > shape[1] or y2 > shape[0]:
        raise CalibrationError(f"section {section} reaches outside the {shape[1]}x{shape[0]} image")
    return slice(y1 - 1, y2), slice(x1 - 1, x2)


def _section_text(value: str, header: fits.Header, what: str) -> str:
    """A section given directly (``'[...]'``) or by the name of the header keyword holding it."""
    if value.strip().startswith("["):
        return value.strip()
    found = header.get(value.strip().upper())
    if not isinstance(found, str):
        raise CalibrationError(f"{what}: header has no section in {value.strip().upper()}")
    return found.strip()


def _overscan_level(data: np.ndarray, rows: slice, cols: slice) -> tuple[np.ndarray | np.float32, str]:
    """Median of the overscan: per row for a column strip, per column for a row strip, else one value."""
    region = data[rows, cols]
    height, width = data.shape
    if region.shape[0] == height and region.shape[1] < width:
        return np.median(region, axis=1, keepdims=True).astype(np.float32), "median per row"
    if region.shape[1] == width and region.shape[0] < height:
        return np.median(region, axis=0, keepdims=True).astype(np.float32), "median per column"
    return np.float32(np.median(region)), "median"


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


def _subtract_overscan(
    work: np.ndarray, overscan: str, light_header: fits.Header, bias: Image | None, header: fits.Header
) -> str:
    """Subtract the overscan level from ``work`` in place (relative to the bias's own); return the step line."""
    text = _section_text(overscan, light_header, "overscan")
    rows, cols = parse_section(text, work.shape)
    level, how = _overscan_level(work, rows, cols)
    note = f"overscan {text} subtracted ({how})"
    if bias is not None:
        if bias.data.shape != work.shape:
            raise CalibrationError("overscan subtraction needs the master bias untrimmed, with its overscan")
        level = level - _overscan_level(bias.data, rows, cols)[0]
        note += ", relative to the master bias's own overscan"
    work -= level
    header["OVERSCAN"] = (text, "overscan region subtracted")
    return note


def _trim_region(
    trim: str, light_header: fits.Header, shape: tuple[int, int], header: fits.Header
) -> tuple[tuple[slice, slice], str]:
    """The region to keep; shifts CRPIX and drops the raw frame's sections in ``header``."""
    text = _section_text(trim, light_header, "trim")
    region = parse_section(text, shape)
    for key, offset in (("CRPIX1", region[1].start), ("CRPIX2", region[0].start)):
        if isinstance(header.get(key), (int, float)):
            header[key] = header[key] - offset
    for key in ("TRIMSEC", "BIASSEC", "DATASEC"):
        header.remove(key, ignore_missing=True)
    header["TRIM"] = (text, "region of the raw frame kept")
    return region, f"trimmed to {text}"


@logged
def calibrate(
    light: Image,
    *,
    bias: Image | None = None,
    dark: Image | None = None,
    flat: Image | None = None,
    dark_factor: float | None = None,
    mask: np.ndarray | None = None,
    overscan: str | None = None,
    trim: str | None = None,
    saturation: float | None = 65535.0,
    cosmic_rays: bool = False,
    provenance: Sequence[str] = (),
) -> Image:
    """Calibrate one light: overscan, trim, bias, scaled dark, flat, cosmic rays; flag unusable pixels.

    Parameters
    ----------
    light : Image
        The raw light (float32 pixels as read). Never modified.
    bias, dark, flat : Image, optional
        Masters; None skips the step. Masters of the raw frame's shape are trimmed like the light; masters
        already of the trimmed shape are used as they are. Where the flat is <= MIN_FLAT or not finite the
        pixel is left undivided and flagged.
    dark_factor : float, optional
        Multiplier of the dark; None computes it with :func:`dark_scale` from the light's EXPTIME/EXPOSURE.
    mask : numpy.ndarray of bool, optional
        Bad-pixel mask (True = bad) to carry into the output mask. Masks on the masters are carried too.
    overscan : str, optional
        Overscan region to subtract, a FITS section ``'[x1:x2,y1:y2]'`` or the name of the header keyword
        holding one (``"BIASSEC"``). Its median per row (column strip) or per column (row strip) is
        subtracted; with a master bias, the bias's own overscan level is put back, so the bias pattern is
        removed relative to its level and the light's level drift is followed.
    trim : str, optional
        Region to keep, a section or a keyword name (``"TRIMSEC"``). WCS CRPIX is shifted to match.
    saturation : float, optional
        Raw values at or above it are flagged in the output mask. None: no check.
    cosmic_rays : bool
        Clean cosmic rays with ``ccdproc.cosmicray_lacosmic`` (gain from EGAIN, else 1) and flag them.
    provenance : sequence of str
        Lines naming the masters used (path, sha256) written to HISTORY as NSMASTER.

    Returns
    -------
    Image
        float32 calibrated pixels, the light's header with CALSTAT ('B', 'D', 'F' for the steps done),
        DARKSCAL, HISTORY of each step, and a bool mask (True = saturated, masked or flat unusable).

    Raises
    ------
    CalibrationError
        A combination of masters that would give a wrong result (see :func:`dark_scale`,
        :func:`check_dark_bias`), a flat of another filter, mismatched shapes, bad sections.
    """
    check_dark_bias(bias, dark)
    if dark is not None:
        dark_factor = _dark_factor(light, dark, dark_factor)
    if flat is not None and _filters_differ(light, flat):
        raise CalibrationError(
            f"flat is for filter {flat.header.get('FILTER')!r}, the light for {light.header.get('FILTER')!r}"
        )
    header = light.header.copy()
    for key in ("BZERO", "BSCALE", "BLANK"):
        header.remove(key, ignore_missing=True, remove_all=True)
    raw_shape = light.data.shape
    steps: list[str] = []
    calstat = ""

    work = np.array(light.data, dtype=np.float32, copy=True)
    flags = np.zeros(raw_shape, dtype=bool)
    if saturation is not None:
        np.greater_equal(light.data, saturation, out=flags)
        if flags.any():
            steps.append(f"{int(flags.sum())} pixels at or above saturation {saturation:g} flagged")
    if overscan is not None:
        steps.append(_subtract_overscan(work, overscan, light.header, bias, header))
    region = None
    if trim is not None:
        region, note = _trim_region(trim, light.header, raw_shape, header)
        work, flags = work[region], flags[region]
        steps.append(note)

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
    if flat is not None:
        flat_view = _view(flat.data, raw_shape, region, "master flat")
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
    if cosmic_rays:
        work, hits, note = _clean_cosmic_rays(work, light.header, saturation)
        flags |= hits
        steps.append(note)

    if calstat:
        header["CALSTAT"] = (calstat, "calibration applied: B bias, D dark, F flat")
    for line in provenance:
        add_history(header, "NSMASTER", line)
    for line in steps:
        add_history(header, "NSSTEP", line)
    return Image(data=np.ascontiguousarray(work), header=header, mask=np.ascontiguousarray(flags))
