"""Overscan and trim: which part of a raw frame saw light, and the bias level of that very readout.

Observatory CCDs read columns (sometimes rows) that never saw light: a prescan before the image and an overscan
after it. The header says where, as FITS sections ``[x1:x2,y1:y2]`` (IRAF/NOAO convention: 1-based, inclusive,
x first): ``BIASSEC`` the overscan, ``TRIMSEC`` (else ``DATASEC``) the light-sensitive part. :func:`readout_of`
decides, from the header and the site's setting (``"auto"``, ``"off"``, a section, or a keyword name), what is done
to a frame, as a :class:`Readout`; :func:`overscan_level` measures the overscan the way
``ccdproc.subtract_overscan(..., model=Polynomial1D(3))`` does (a robust mean across the overscan per row, a
low-order polynomial fitted along the rows so the overscan's own noise stays out of the frame); and
:func:`apply_readout` subtracts it and trims. Frames read by several amplifiers are refused
(:func:`check_single_readout`): each amplifier has its own level and sections, and nightshift reduces one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from astropy.stats import sigma_clip
from nightshift.service.frame import FrameError

__all__ = [
    "AUTO",
    "OFF",
    "OVERSCAN_ORDER",
    "Readout",
    "apply_readout",
    "check_single_readout",
    "format_section",
    "overscan_level",
    "parse_section",
    "readout_of",
]

AUTO = "auto"
OFF = "off"
#: Degree of the polynomial fitted along the rows to the overscan's per-row level.
OVERSCAN_ORDER = 3
_SECTION = re.compile(r"^\s*\[\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*\]\s*$")
_KEYWORD = re.compile(r"^[A-Z0-9_-]{1,8}$")
#: Keywords that exist only when a frame is read by several amplifiers (one section per amplifier).
_PER_AMP = re.compile(r"^(BIASSEC|TRIMSEC|DATASEC|AMPSEC|CCDSEC|DETSEC)([0-9]{1,2}|[A-H])$|^[ABCDT]SEC[0-9]{2}$")
_AMP_COUNT = ("NAMPS", "NAMPLIFS", "NUMAMPS", "NAMPLIF", "AMPCOUNT")


class SectionError(ValueError):
    """A section that is not ``[x1:x2,y1:y2]`` or reaches outside the image."""


def parse_section(section: str, shape: tuple[int, int]) -> tuple[slice, slice]:
    """numpy slices (rows, columns) for a FITS section ``'[x1:x2,y1:y2]'`` (1-based, inclusive).

    A flipped range (``x1 > x2``) selects the same pixels, in order.

    Raises
    ------
    SectionError
        If the text is not a section or it reaches outside ``shape`` (rows, columns).
    """
    found = _SECTION.match(section)
    if found is None:
        raise SectionError(f"not a FITS section: {section!r}")
    x1, x2, y1, y2 = (int(g) for g in found.groups())
    (x1, x2), (y1, y2) = sorted((x1, x2)), sorted((y1, y2))
    if x1 < 1 or y1 < 1 or x2 > shape[1] or y2 > shape[0]:
        raise SectionError(f"section {section.strip()} reaches outside the {shape[1]}x{shape[0]} image")
    return slice(y1 - 1, y2), slice(x1 - 1, x2)


def format_section(region: tuple[slice, slice]) -> str:
    """The FITS section text of numpy slices (rows, columns): the inverse of :func:`parse_section`."""
    rows, cols = region
    return f"[{cols.start + 1}:{cols.stop},{rows.start + 1}:{rows.stop}]"


def _size(region: tuple[slice, slice]) -> tuple[int, int]:
    return region[0].stop - region[0].start, region[1].stop - region[1].start


@dataclass(frozen=True)
class Readout:
    """What is done to a raw frame before calibration: the overscan subtracted and the region kept.

    ``overscan`` and ``trim`` are normalised section texts (``"[18:1382,1:1370]"``) or None; ``raw_shape`` is
    (rows, columns) of the raw frame; ``source`` says where the sections came from, for a person.
    """

    raw_shape: tuple[int, int]
    overscan: str | None = None
    trim: str | None = None
    source: str = ""

    @property
    def overscan_region(self) -> tuple[slice, slice] | None:
        return parse_section(self.overscan, self.raw_shape) if self.overscan else None

    @property
    def trim_region(self) -> tuple[slice, slice] | None:
        return parse_section(self.trim, self.raw_shape) if self.trim else None

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of the frame after trimming."""
        region = self.trim_region
        return _size(region) if region else tuple(self.raw_shape)  # type: ignore[return-value]

    @property
    def is_raw(self) -> bool:
        """True when nothing is done (no overscan, no trim)."""
        return self.overscan is None and self.trim is None

    def describe(self) -> str:
        """The archive's ``readout`` text: ``"raw"``, or the sections and the shape kept.

        ``"overscan [1388:1432,1:1370], trim [18:1382,1:1370]: 1365x1370"``; frames and masters match only
        when these texts are equal.
        """
        if self.is_raw:
            return "raw"
        parts = []
        if self.overscan:
            parts.append(f"overscan {self.overscan}")
        if self.trim:
            parts.append(f"trim {self.trim}")
        rows, cols = self.shape
        return ", ".join(parts) + f": {cols}x{rows}"

    @classmethod
    def parse(cls, text: str | None, raw_shape: tuple[int, int]) -> Readout:
        """The Readout of a :meth:`describe` text (None or ``"raw"``: nothing done)."""
        if not text or text.strip() == "raw":
            return cls(tuple(raw_shape))  # type: ignore[arg-type]
        overscan = re.search(r"overscan (\[[^\]]*\])", text)
        trim = re.search(r"trim (\[[^\]]*\])", text)
        if overscan is None and trim is None:
            raise SectionError(f"not a readout description: {text!r}")
        for found in (overscan, trim):
            if found is not None:
                parse_section(found.group(1), raw_shape)
        return cls(
            tuple(raw_shape),  # type: ignore[arg-type]
            overscan=overscan.group(1) if overscan else None,
            trim=trim.group(1) if trim else None,
            source="archive",
        )


def _header_text(header, key: str) -> str | None:
    try:
        value = header.get(key)
    except Exception:
        return None
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip()


def _one(
    setting: str | None, header, keys: tuple[str, ...], shape: tuple[int, int], what: str
) -> tuple[str | None, str]:
    """(normalised section or None, where it came from) for one setting."""
    text = (setting or OFF).strip()
    if text.lower() == OFF or not text:
        return None, "off"
    if text.lower() == AUTO:
        for key in keys:
            found = _header_text(header, key)
            if found is None:
                continue
            try:
                region = parse_section(found, shape)
            except SectionError as exc:
                raise FrameError("bad_header_value", f"{key} = {found!r}: {exc}") from None
            return format_section(region), key
        return None, "header has none"
    if text.startswith("["):
        try:
            return format_section(parse_section(text, shape)), "config"
        except SectionError as exc:
            raise FrameError("bad_header_value", f"configured {what} {text}: {exc}") from None
    key = text.upper()
    if not _KEYWORD.match(key):
        raise ValueError(f"{what} setting {setting!r}: expected 'auto', 'off', a section '[x1:x2,y1:y2]' or a keyword")
    found = _header_text(header, key)
    if found is None:
        raise FrameError("bad_header_value", f"no section in {key}, which the {what} setting names")
    try:
        return format_section(parse_section(found, shape)), key
    except SectionError as exc:
        raise FrameError("bad_header_value", f"{key} = {found!r}: {exc}") from None


def readout_of(header, shape: tuple[int, int], *, overscan: str | None = AUTO, trim: str | None = AUTO) -> Readout:
    """What to do to a raw frame of ``shape`` (rows, columns) with ``header``, under the site's settings.

    Parameters
    ----------
    header : astropy.io.fits.Header or mapping
        The raw frame's header.
    shape : (int, int)
        The raw image's (rows, columns).
    overscan : str
        ``"auto"`` (the default): the header's ``BIASSEC``; ``"off"`` (or None, ``""``): none; a section
        ``"[x1:x2,y1:y2]"``; or the name of the header keyword holding one.
    trim : str
        ``"auto"``: the header's ``TRIMSEC``, else ``DATASEC``; ``"off"``; a section; or a keyword name.

    Returns
    -------
    Readout

    Raises
    ------
    FrameError
        ``multiple_amplifiers`` (see :func:`check_single_readout`); ``bad_header_value`` for a header section
        that is not one or lies outside the image.
    """
    check_single_readout(header, shape)
    oscan, oscan_from = _one(overscan, header, ("BIASSEC",), shape, "overscan")
    kept, trim_from = _one(trim, header, ("TRIMSEC", "DATASEC"), shape, "trim")
    if oscan and kept:
        o, t = parse_section(oscan, shape), parse_section(kept, shape)
        rows = max(o[0].start, t[0].start) < min(o[0].stop, t[0].stop)
        cols = max(o[1].start, t[1].start) < min(o[1].stop, t[1].stop)
        if rows and cols:
            raise FrameError("bad_header_value", f"the overscan {oscan} overlaps the region kept {kept}")
    source = f"overscan: {oscan_from}; trim: {trim_from}"
    return Readout(tuple(shape), overscan=oscan, trim=kept, source=source)  # type: ignore[arg-type]


def check_single_readout(header, shape: tuple[int, int] | None = None) -> None:
    """Refuse a frame read through several amplifiers.

    Signs: per-amplifier sections (``BIASSEC1``, ``TRIMSECA``, ``ASEC11``...), an amplifier count above one
    (``NAMPS``...), or an ``AMPSEC`` smaller than the image it belongs to.

    Raises
    ------
    FrameError
        ``multiple_amplifiers``, naming what the header says.
    """
    keys = [k for k in dict.fromkeys(header.keys()) if isinstance(k, str)]
    per_amp = [k for k in keys if _PER_AMP.match(k)]
    if per_amp:
        raise FrameError(
            "multiple_amplifiers",
            f"the header has per-amplifier sections ({', '.join(per_amp[:4])}): a frame read by several amplifiers, "
            "each with its own bias level; nightshift reduces frames read by one",
        )
    for key in _AMP_COUNT:
        try:
            value = header.get(key)
            count = int(value) if value is not None and not isinstance(value, bool) else 1
        except (TypeError, ValueError):
            continue
        if count > 1:
            raise FrameError(
                "multiple_amplifiers",
                f"{key} = {count}: read by {count} amplifiers, each with its own bias level; "
                "nightshift reduces frames read by one",
            )
    ampsec = _header_text(header, "AMPSEC")
    if ampsec and shape is not None:
        found = _SECTION.match(ampsec)
        data = _header_text(header, "TRIMSEC") or _header_text(header, "DATASEC")
        full = _SECTION.match(data) if data else None
        if found:
            x1, x2, y1, y2 = (int(g) for g in found.groups())
            amp = (abs(y2 - y1) + 1) * (abs(x2 - x1) + 1)
            if full:
                a1, a2, b1, b2 = (int(g) for g in full.groups())
                image = (abs(b2 - b1) + 1) * (abs(a2 - a1) + 1)
            else:
                image = shape[0] * shape[1]
            if amp < image * 0.9:
                raise FrameError(
                    "multiple_amplifiers",
                    f"AMPSEC = {ampsec!r} covers only part of the image: one of several amplifiers; "
                    "nightshift reduces frames read by one",
                )


def _robust_mean(region: np.ndarray, axis: int) -> np.ndarray:
    """Sigma-clipped (3 sigma about the median) mean along ``axis``."""
    clipped = sigma_clip(region, sigma=3.0, maxiters=3, axis=axis, cenfunc="median", stdfunc="std", masked=True)
    mean = np.ma.mean(clipped, axis=axis)
    return np.ma.filled(mean.astype(np.float64), np.nan)


def _fit(values: np.ndarray, where: np.ndarray, n: int, order: int) -> np.ndarray:
    """A polynomial of degree ``order`` fitted to ``values`` at indices ``where`` (3-sigma clipped), at 0..n-1."""
    good = np.isfinite(values)
    x, y = where[good].astype(np.float64), values[good]
    if x.size == 0:
        raise SectionError("the overscan holds no finite pixel")
    degree = max(0, min(order, x.size // 8))
    keep = np.ones(x.size, dtype=bool)
    fit = None
    for _ in range(3):
        fit = np.polynomial.Legendre.fit(x[keep], y[keep], degree, domain=[0, max(n - 1, 1)])
        residual = y - fit(x)
        spread = 1.4826 * np.median(np.abs(residual[keep] - np.median(residual[keep])))
        if spread == 0:
            break
        new = np.abs(residual) <= 3.0 * spread
        if new.sum() <= degree + 1 or np.array_equal(new, keep):
            break
        keep = new
    return fit(np.arange(n, dtype=np.float64)).astype(np.float32)


def overscan_level(
    strip: np.ndarray, region: tuple[slice, slice], raw_shape: tuple[int, int], *, order: int = OVERSCAN_ORDER
) -> np.ndarray:
    """The bias level of a readout, measured in its overscan, for every row (or column) of the raw frame.

    Parameters
    ----------
    strip : numpy.ndarray
        The overscan pixels, ``raw[region]``.
    region : (slice, slice)
        Where the strip lies in the raw frame.
    raw_shape : (int, int)
        The raw frame's (rows, columns).
    order : int
        Degree of the polynomial fitted along the strip.

    Returns
    -------
    numpy.ndarray
        float32 of shape (rows, 1) for a column strip (taller than wide: one level per row, as a CCD read
        row by row has), or (1, columns) for a row strip; broadcastable against the raw frame.
    """
    strip = np.asarray(strip, dtype=np.float32)
    height, width = strip.shape
    if height >= width:
        per_row = _robust_mean(strip, axis=1)
        where = np.arange(region[0].start, region[0].stop)
        return _fit(per_row, where, raw_shape[0], order)[:, None]
    per_col = _robust_mean(strip, axis=0)
    where = np.arange(region[1].start, region[1].stop)
    return _fit(per_col, where, raw_shape[1], order)[None, :]


def apply_readout(
    data: np.ndarray, readout: Readout, *, level: np.ndarray | None = None
) -> tuple[np.ndarray, list[str]]:
    """Subtract the overscan level and trim: a new float32 array of ``readout.shape``, and the step lines.

    Parameters
    ----------
    data : numpy.ndarray
        The raw frame (never modified).
    readout : Readout
        What to do.
    level : numpy.ndarray, optional
        The overscan level to subtract instead of measuring it (broadcastable against ``data``).
    """
    if data.shape != tuple(readout.raw_shape):
        raise SectionError(f"the frame is {data.shape[1]}x{data.shape[0]}, its readout is for {readout.raw_shape}")
    steps = []
    region = readout.overscan_region
    if region is not None and level is None:
        level = overscan_level(data[region], region, data.shape)
    trim = readout.trim_region or (slice(0, data.shape[0]), slice(0, data.shape[1]))
    if region is not None:
        assert level is not None
        per_row = np.ndim(level) == 2 and np.shape(level)[1] == 1
        cut = level[trim[0]] if per_row else level[:, trim[1]]
        work = np.subtract(data[trim], cut, dtype=np.float32)  # one pass: subtract and trim
        steps.append(
            f"overscan {readout.overscan} subtracted ({'per row' if per_row else 'per column'}: sigma-clipped mean, "
            f"Legendre degree {OVERSCAN_ORDER} fitted; level {float(np.mean(level)):.2f} ADU)"
        )
    else:
        work = np.array(data[trim], dtype=np.float32, copy=True)
    if readout.trim_region is not None:
        steps.append(f"trimmed to {readout.trim}")
    return work, steps
