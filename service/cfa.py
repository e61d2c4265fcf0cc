"""Bayer mosaics: which colour each stored pixel saw, and the few operations done on the raw mosaic.

A one-shot-colour sensor has a 2x2 colour filter pattern. Headers state it as ``BAYERPAT`` (``RGGB``, ``GRBG``,
``GBRG``, ``BGGR``: the top row's two pixels, then the next row's), read from the top-left of the picture,
possibly shifted by ``XBAYROFF``/``YBAYROFF`` (the stated pattern starts that many columns/rows in), and
``ROWORDER`` says which way the rows are stored: ``TOP-DOWN`` (first stored row = top of the picture, as
N.I.N.A., INDI and most drivers write) or ``BOTTOM-UP`` (the FITS convention, also what an absent ROWORDER
means). This module turns all of that into one answer, the **array pattern**: the 2x2 pattern that starts at
the first stored pixel (``data[0, 0]``), which is what demosaicing and every per-colour operation need.

Everything else here works on that array pattern: the CFA positions of a colour, a flat normalised per
CFA position, and bad pixels filled from neighbours of their own colour (never from a pixel that saw
another colour).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import numpy as np
from astropy.io import fits

__all__ = [
    "PATTERNS",
    "ROW_ORDERS",
    "CfaError",
    "array_pattern",
    "channel_of",
    "colour_positions",
    "fill_from_same_colour",
    "flip_rows",
    "header_layout",
    "normalise_per_position",
    "parse_pattern",
    "parse_row_order",
    "shift_pattern",
    "state_pattern",
]

#: The four Bayer patterns, named by their 2x2 cell read row by row.
PATTERNS = ("RGGB", "GRBG", "GBRG", "BGGR")
#: How rows are stored; an absent ROWORDER means the FITS convention, bottom-up.
ROW_ORDERS = ("TOP-DOWN", "BOTTOM-UP")
#: Plane index of each colour in a colour frame (R, G, B).
_PLANE = {"R": 0, "G": 1, "B": 2}
#: Same-colour neighbours (dy, dx): red and blue see their own colour two pixels away; green also diagonally.
_RB_NEIGHBOURS = ((-2, -2), (-2, 0), (-2, 2), (0, -2), (0, 2), (2, -2), (2, 0), (2, 2))
_G_NEIGHBOURS = ((-1, -1), (-1, 1), (1, -1), (1, 1), (-2, 0), (2, 0), (0, -2), (0, 2))


class CfaError(ValueError):
    """A header or setting that does not describe a Bayer mosaic nightshift can use."""


def parse_pattern(text: object) -> str | None:
    """``BAYERPAT`` text as one of :data:`PATTERNS`; None for an empty value or ``NONE``.

    Raises
    ------
    CfaError
        Anything else (an X-Trans matrix, a typo).
    """
    if text is None:
        return None
    word = str(text).strip().upper()
    if word in ("", "NONE", "MONO"):
        return None
    if word not in PATTERNS:
        raise CfaError(f"Bayer pattern {str(text).strip()!r} is not one of {', '.join(PATTERNS)}")
    return word


def parse_row_order(text: object) -> str | None:
    """``ROWORDER`` text as ``"TOP-DOWN"``/``"BOTTOM-UP"``; None when absent or blank.

    Raises
    ------
    CfaError
        Any other word.
    """
    if text is None:
        return None
    word = str(text).strip().upper().replace("_", "-").replace(" ", "-")
    if not word:
        return None
    if word not in ROW_ORDERS:
        raise CfaError(f"ROWORDER {str(text).strip()!r} is not TOP-DOWN or BOTTOM-UP")
    return word


def shift_pattern(pattern: str, dx: int, dy: int) -> str:
    """The pattern that starts ``dx`` columns right and ``dy`` rows down of where ``pattern`` starts."""
    cell = (pattern[0:2], pattern[2:4])
    rows = [cell[(dy + i) % 2] for i in range(2)]
    return "".join(row[(dx + j) % 2] for row in rows for j in range(2))


def flip_rows(pattern: str, height: int) -> str:
    """The pattern at the first row of the mosaic turned upside down (``height`` rows)."""
    # the last row (height - 1) becomes the first; the row above it, of the other parity, the second
    return shift_pattern(pattern, 0, height - 1)


def array_pattern(stated: str, *, row_order: str | None, height: int, xoff: int = 0, yoff: int = 0) -> str:
    """The pattern at the first stored pixel, from what a header states.

    Parameters
    ----------
    stated : str
        ``BAYERPAT``: the pattern read from the top-left of the picture, rows top to bottom.
    row_order : {"TOP-DOWN", "BOTTOM-UP"} or None
        ``ROWORDER``; None means bottom-up, the FITS convention.
    height : int
        Rows of the stored mosaic (a bottom-up mosaic's top row is its last stored row).
    xoff, yoff : int
        ``XBAYROFF``/``YBAYROFF``: the stated pattern starts at this column and row of the picture (counted
        from its top-left), so the picture's own top-left pixel is ``shift_pattern(stated, -xoff, -yoff)``.

    Returns
    -------
    str
        One of :data:`PATTERNS`.
    """
    top_left = shift_pattern(stated, -int(xoff), -int(yoff))
    if (row_order or "BOTTOM-UP") == "TOP-DOWN":
        return top_left
    return flip_rows(top_left, height)


def _int_card(header: fits.Header, key: str) -> int:
    value = header.get(key, 0)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CfaError(f"{key} = {value!r} is not a whole number") from None
    if not math.isfinite(number) or not number.is_integer():
        raise CfaError(f"{key} = {value!r} is not a whole number")
    return int(number)


def header_layout(
    header: fits.Header,
    *,
    height: int | None = None,
    configured: Mapping[str, str] | None = None,
    camera: str | None = None,
) -> tuple[str | None, str | None, str | None]:
    """What a raw frame's header (and the camera's setting) says about its mosaic.

    Parameters
    ----------
    header : astropy.io.fits.Header
        The frame's header.
    height : int, optional
        Stored rows; NAXIS2 when not given.
    configured : mapping, optional
        Per camera the pattern to use when the header states none, or ``"mono"`` to treat the camera as
        monochrome whatever its header says (``[classify] bayer_pattern`` of the configuration).
    camera : str, optional
        The camera's name to look up in ``configured``; INSTRUME when not given.

    Returns
    -------
    (stated, row_order, array) : tuple of str or None
        The stated (or configured) pattern, ROWORDER as stated, and the pattern at the first stored pixel
        (:func:`array_pattern`); all None for a monochrome frame. A 3-plane cube (NAXIS3 = 3) is already
        debayered: its array pattern is None.

    Raises
    ------
    CfaError
        A pattern, row order or offset that cannot be understood (a mono frame's row order is not needed: one
        that cannot be understood is left out).
    """
    camera = str(camera if camera is not None else header.get("INSTRUME", "") or "").strip()
    setting = None
    if configured:
        folded = {str(k).strip().lower(): v for k, v in configured.items()}
        setting = folded.get(camera.lower())
    mono = setting is not None and str(setting).strip().lower() == "mono"
    stated = None if mono else parse_pattern(header.get("BAYERPAT"))
    if stated is None and setting is not None and not mono:
        stated = parse_pattern(setting)
    if stated is None:  # a mono frame: a ROWORDER nightshift cannot read changes nothing
        try:
            return None, parse_row_order(header.get("ROWORDER")), None
        except CfaError:
            return None, None, None
    row_order = parse_row_order(header.get("ROWORDER"))
    if int(header.get("NAXIS", 2) or 2) == 3:
        return stated, row_order, None
    rows = int(height if height is not None else header.get("NAXIS2", 0) or 0)
    xoff, yoff = _int_card(header, "XBAYROFF"), _int_card(header, "YBAYROFF")
    return stated, row_order, array_pattern(stated, row_order=row_order, height=rows, xoff=xoff, yoff=yoff)


def state_pattern(header: fits.Header, stated: str | None) -> None:
    """Make ``header`` state the Bayer pattern decided for its frame (in place).

    A frame's pattern can come from the camera's setting rather than its header, and a camera set to mono has its
    header's BAYERPAT set aside; the frame's archive row holds the decision (``bayerpat``). Given that pattern
    (as read from the picture's top-left), BAYERPAT is written when the header states none; given None, BAYERPAT
    and the Bayer offsets are removed. A header that already states the pattern is left as it is.
    """
    if stated is None:
        for key in ("BAYERPAT", "XBAYROFF", "YBAYROFF"):
            header.remove(key, ignore_missing=True, remove_all=True)
    elif parse_pattern(header.get("BAYERPAT")) is None:
        header["BAYERPAT"] = (stated, "Bayer pattern of the camera (nightshift setting)")


def channel_of(pattern: str) -> np.ndarray:
    """2x2 array of plane indices (0 R, 1 G, 2 B) of the pattern's cell, indexed [dy, dx]."""
    return np.array([[_PLANE[pattern[0]], _PLANE[pattern[1]]], [_PLANE[pattern[2]], _PLANE[pattern[3]]]])


def colour_positions(pattern: str) -> dict[str, list[tuple[int, int]]]:
    """The CFA positions (dy, dx) in the 2x2 cell of each colour: one for R and B, two for G."""
    out: dict[str, list[tuple[int, int]]] = {"R": [], "G": [], "B": []}
    for dy in range(2):
        for dx in range(2):
            out[pattern[2 * dy + dx]].append((dy, dx))
    return out


def normalise_per_position(data: np.ndarray) -> list[float]:
    """Divide each of the four CFA positions of a flat mosaic by its own median, in place.

    Each colour's pixels end with median 1 (green's two positions each on their own), so dividing a light by
    the flat changes no colour balance: neither the flat lamp's colour nor the channels' different sensitivity
    is imprinted on the lights. This does not depend on which colour sits where, only on the 2x2 cell.

    Returns
    -------
    list of float
        The four medians, in the order (0, 0), (0, 1), (1, 0), (1, 1).

    Raises
    ------
    CfaError
        A position whose median is not a positive number.
    """
    medians = []
    for dy in range(2):
        for dx in range(2):
            view = data[dy::2, dx::2]
            level = float(np.nanmedian(view))
            if not math.isfinite(level) or level <= 0:
                raise CfaError(f"CFA position ({dy}, {dx}) of the flat has median {level:g}; cannot normalise")
            view *= np.float32(1.0 / level)
            medians.append(level)
    return medians


def fill_from_same_colour(data: np.ndarray, bad: np.ndarray, pattern: str) -> int:
    """Replace bad pixels of a mosaic, in place, by the median of their good neighbours of the same colour.

    Red and blue pixels take their eight same-colour neighbours two pixels away; green pixels their four
    diagonal neighbours and the four greens two pixels away. A pixel with no good same-colour neighbour is left
    as it is (its mask keeps saying it is bad).

    Parameters
    ----------
    data : ndarray
        2-D float mosaic, changed in place.
    bad : ndarray of bool
        Pixels to replace.
    pattern : str
        The array pattern (:func:`array_pattern`).

    Returns
    -------
    int
        Pixels replaced.
    """
    ys, xs = np.nonzero(bad)
    if ys.size == 0:
        return 0
    h, w = data.shape
    green = channel_of(pattern)[ys % 2, xs % 2] == 1
    filled = 0
    for is_green, offsets in ((False, _RB_NEIGHBOURS), (True, _G_NEIGHBOURS)):
        pick = green == is_green
        if not pick.any():
            continue
        y, x = ys[pick], xs[pick]
        values = np.full((len(offsets), y.size), np.nan, dtype=np.float32)
        for k, (dy, dx) in enumerate(offsets):
            ny, nx = y + dy, x + dx
            inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
            ny, nx = ny[inside], nx[inside]
            good = ~bad[ny, nx] & np.isfinite(data[ny, nx])
            row = np.full(y.size, np.nan, dtype=np.float32)
            row[np.flatnonzero(inside)[good]] = data[ny[good], nx[good]]
            values[k] = row
        has = np.isfinite(values).any(axis=0)
        if has.any():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                data[y[has], x[has]] = np.nanmedian(values[:, has], axis=0)
            filled += int(has.sum())
    return filled
