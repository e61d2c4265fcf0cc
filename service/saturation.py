"""Where a camera stops counting light: the saturation level of a raw frame and of its calibrated product.

A raw frame's level comes from its header (``SATURATE``, else ``DATAMAX``), else from the data type it was stored
in (an unsigned 16-bit image, BITPIX 16 with BZERO 32768, tops out at 65535), else from configuration.
:func:`nightshift.service.calibrate.calibrate` flags the raw pixels at or above it and writes the calibrated
equivalent into the calibrated frame's ``SATURATE`` (:func:`calibrated_level`), so grading knows which stars
reached it, or came close enough to be non-linear.
"""

from __future__ import annotations

import math

import numpy as np
from astropy.io import fits

__all__ = ["NONLINEAR_FRACTION", "calibrated_level", "header_level", "raw_level"]

#: A star whose peak exceeds this fraction of the saturation level is treated as saturated: the top of a CCD's or
#: CMOS sensor's range is where its response stops being linear (and anti-blooming gates start draining charge).
NONLINEAR_FRACTION = 0.8
#: The calibrated level is this percentile of the per-pixel levels (low: vignetted corners saturate later).
_LEVEL_PERCENTILE = 1.0


def header_level(header: fits.Header) -> float | None:
    """The level the header states (``SATURATE``, else ``DATAMAX``), or None."""
    for key in ("SATURATE", "DATAMAX"):
        value = header.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
            return float(value)
    return None


def raw_level(header: fits.Header, fallback: float | None = None) -> float | None:
    """The saturation level of a raw frame, in its physical units (after BZERO/BSCALE).

    Parameters
    ----------
    header : astropy.io.fits.Header
        The raw frame's header as stored (with BITPIX, BZERO, BSCALE).
    fallback : float, optional
        The level to use when neither the header nor the data type tells (a floating-point raw frame).

    Returns
    -------
    float or None
        ``SATURATE`` or ``DATAMAX`` when present; else the largest value an integer BITPIX can hold through
        BZERO/BSCALE (65535 for the usual unsigned 16-bit camera frame); else ``fallback``.
    """
    stated = header_level(header)
    if stated is not None:
        return stated
    bitpix = header.get("BITPIX")
    if isinstance(bitpix, int) and bitpix in (8, 16, 32, 64):
        stored_max = 255 if bitpix == 8 else 2 ** (bitpix - 1) - 1
        bzero, bscale = header.get("BZERO", 0.0), header.get("BSCALE", 1.0)
        if isinstance(bzero, (int, float)) and isinstance(bscale, (int, float)) and bscale > 0:
            return float(bzero + bscale * stored_max)
    return fallback


def calibrated_level(saturation: float, offset: np.ndarray, flat: np.ndarray | None = None) -> float:
    """The calibrated value at which pixels saturate: ``(saturation - offset) / flat``, a low percentile of it.

    Parameters
    ----------
    saturation : float
        The raw level.
    offset : ndarray
        What calibration subtracted from those pixels (bias, scaled dark, overscan): a sample of the frame.
    flat : ndarray, optional
        The flat the same pixels were divided by (None: not flat-fielded).

    Returns
    -------
    float
        The 1st percentile over the sampled pixels: pixels are saturated at or above it, practically everywhere
        (vignetted corners, divided by a flat below 1, saturate a little higher).
    """
    level = saturation - np.asarray(offset, dtype=np.float64)
    if flat is not None:
        flat = np.asarray(flat, dtype=np.float64)
        usable = np.isfinite(flat) & (flat > 1e-3)
        level = level[usable] / flat[usable]
    level = level[np.isfinite(level)]
    if level.size == 0:
        return float(saturation)
    return float(np.percentile(level, _LEVEL_PERCENTILE))
