"""Colour frames after calibration: a calibrated Bayer mosaic becomes three colour planes, and colour frames give
the luminance that grading and registration work on.

The order is the careful one: :func:`nightshift.service.calibrate.calibrate` takes bias, dark and flat out pixel by
pixel on the raw mosaic (its master flat normalised per CFA position); :func:`develop` then fills the mosaic's bad
pixels from neighbours of their own colour and debayers it (:mod:`nightshift.service.debayer`). Stars are found
and matched on :func:`luminance`, and one transform warps the three planes. A mosaic is never warped:
interpolating it would mix colours.
"""

from __future__ import annotations

import cv2
import numpy as np
from astropy.io import fits
from nightshift.service.calibrate import CalibrationError, colour_layout
from nightshift.service.cfa import fill_from_same_colour
from nightshift.service.debayer import DEFAULT_METHOD, debayer
from nightshift.service.frame import Image
from nightshift.service.provenance import add_history, logged

__all__ = ["FILLED_KEY", "develop", "is_colour", "luminance", "plane_mask"]

#: Header word of a developed colour frame: its masked (not saturated) pixels already hold estimates from
#: neighbours of their own colour, so a resampling need not fill them again.
FILLED_KEY = "BADFILL"

#: Header words that describe a mosaic and no longer apply once it is debayered.
_MOSAIC_KEYS = ("BAYERPAT", "XBAYROFF", "YBAYROFF", "COLORTYP")


def is_colour(image: Image) -> bool:
    """True for a colour frame: three planes, or a Bayer mosaic (as its header says)."""
    return image.is_colour or colour_layout(image) is not None


def plane_mask(image: Image, flags: str = "mask") -> np.ndarray | None:
    """The frame's mask (or its ``saturated`` flags) as one (rows, columns) array: set where any plane has it."""
    given = getattr(image, flags)
    if given is None:
        return None
    given = np.asarray(given, dtype=bool)
    return given.any(axis=0) if given.ndim == 3 else given


def _two_d_wcs(header: fits.Header) -> None:
    """A celestial WCS in a cube's header describes its two image axes, not the colour planes."""
    if "CTYPE1" in header and "CTYPE2" in header:
        header["WCSAXES"] = (2, "WCS of the image axes, not the planes")


@logged
def develop(image: Image, *, method: str = DEFAULT_METHOD) -> Image:
    """A calibrated frame as three colour planes (R, G, B): a Bayer mosaic is filled and debayered, a cube kept.

    Parameters
    ----------
    image : Image
        A calibrated frame: a Bayer mosaic (its header states BAYERPAT and, if any, ROWORDER and offsets), a
        3-plane cube, or a mono frame (returned as it is). Not modified.
    method : str
        Demosaicing method (:data:`nightshift.service.debayer.METHODS`).

    Returns
    -------
    Image
        float32 (3, rows, columns) and one (rows, columns) mask. A mosaic's masked pixels (hot, dead, cosmic rays)
        are first replaced by the median of their good same-colour neighbours so that no bad value leaks into the
        neighbours' interpolated colours; they stay masked. Saturated pixels keep their values (a star's top) and
        their flags grow to the 3x3 pixels whose colours are interpolated from them (flagged bad too). The header
        loses BAYERPAT and the Bayer offsets, gains DEBAYER (the method) and a step line saying which pattern was
        used.

    Raises
    ------
    CalibrationError
        A header whose Bayer words cannot be understood.
    """
    layout = colour_layout(image)
    if layout is None:
        return image
    header = image.header.copy()
    mask, saturated = plane_mask(image), plane_mask(image, "saturated")
    if layout[0] == "cube":
        _two_d_wcs(header)
        return Image(data=image.data, header=header, mask=mask, saturated=saturated)
    pattern = layout[1]
    mosaic = np.array(image.data, dtype=np.float32, copy=True)
    bad = ~np.isfinite(mosaic)
    if mask is not None:
        bad |= mask
    # a saturated pixel keeps its value (the star's top, a lower bound); other bad pixels take their colour's
    fill = bad & ~saturated if saturated is not None else bad
    filled = fill_from_same_colour(mosaic, fill, pattern) if fill.any() else 0
    left = ~np.isfinite(mosaic)
    if left.any():  # no good neighbour of its colour: a value is needed, the mask says it is not real
        mosaic[left] = np.float32(np.nanmedian(mosaic))
    try:
        rgb = debayer(mosaic, pattern, method=method)
    except ValueError as exc:
        raise CalibrationError(f"cannot debayer: {exc}") from None
    stated = image.header.get("BAYERPAT")
    for key in _MOSAIC_KEYS:
        header.remove(key, ignore_missing=True, remove_all=True)
    header["DEBAYER"] = (method, "demosaicing method")
    header[FILLED_KEY] = (True, "masked pixels hold estimates from their colour")
    _two_d_wcs(header)
    add_history(
        header,
        "NSSTEP",
        f"debayered ({method}) with pattern {pattern} at the first pixel (BAYERPAT {stated!r}, ROWORDER "
        f"{layout[2]}); {filled} bad pixels first filled from same-colour neighbours",
    )
    if saturated is not None and saturated.any():
        # every colour interpolated from a saturated sample is a lower bound too: the 3x3 the debayer reaches
        saturated = cv2.dilate(saturated.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        bad |= saturated
    return Image(data=rgb, header=header, mask=bad, saturated=saturated)


def luminance(image: Image) -> Image:
    """The frame to find and measure stars on: the mean of a colour frame's planes (a mono frame as it is).

    The header is the frame's; the mask and saturation flags are the frame's, one (rows, columns) array each.
    """
    if not image.is_colour:
        return image
    lum = np.mean(image.data, axis=0, dtype=np.float32)
    return Image(data=lum, header=image.header, mask=plane_mask(image), saturated=plane_mask(image, "saturated"))
