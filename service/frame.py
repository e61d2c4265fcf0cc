"""The shared vocabulary of the science: what a frame is, what its normalised header says, and how a frame fails.

Every module of ``service/`` speaks in these types; ``daemon/`` stores them. Nothing here reads files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from astropy.io import fits

__all__ = ["KINDS", "OTHER_KIND", "QUARANTINE_REASONS", "FrameError", "FrameMeta", "Image"]

#: Frame kinds nightshift knows. ``darkflat`` is a dark taken at a flat's exposure (N.I.N.A. writes DARKFLAT).
KINDS = ("bias", "dark", "flat", "light", "darkflat")

#: The kind of a frame that is neither imaging calibration nor science (focus, test, pointing, arc, comparison):
#: set aside with status ``ignored``, never quarantined (it is not broken) and never processed.
OTHER_KIND = "other"

#: Bounded vocabulary of reasons a file is kept aside; used as a metrics label, so never free text.
QUARANTINE_REASONS = (
    "empty",  # zero bytes
    "not_fits",  # does not start with a FITS primary header
    "truncated",  # header or data shorter than the header promises
    "unreadable",  # the operating system refused to read it (permissions, a directory, vanished)
    "incomplete",  # never stopped growing / never became whole within the timeout
    "no_image_data",  # a header with no image
    "unsupported_dimensions",  # not a 2-D image nor a 3-plane colour cube (other cubes, 1-D), or absurdly small
    "multiple_amplifiers",  # read by several amplifiers (per-amplifier sections or extensions): not reduced
    "unknown_type",  # no header word or override says bias/dark/flat/light
    "missing_exposure",  # a dark, flat or light with no EXPTIME/EXPOSURE
    "bad_header_value",  # a header value that cannot be parsed (EXPTIME='abc', DATE-OBS='yesterday')
    "constant_data",  # every pixel has the same value
    "nan_data",  # NaN or infinite pixels (all or most of them)
    "processing_error",  # a step failed on it unexpectedly; the message says which and why
)


class FrameError(Exception):
    """A frame cannot be used. ``reason`` is one of QUARANTINE_REASONS; ``message`` is for a person."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in QUARANTINE_REASONS:
            raise ValueError(f"unknown quarantine reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __reduce__(self) -> tuple[type[FrameError], tuple[str, str]]:
        # pickled with both arguments: a frame's error travels back from a worker process
        return (FrameError, (self.reason, self.message))

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


@dataclass
class FrameMeta:
    """The normalised header of one raw frame: what nightshift knows about it before touching its pixels.

    Column names of the archive's ``frames`` table are these field names.
    """

    path: str
    sha256: str
    size_bytes: int
    kind: str  # one of KINDS
    exptime: float | None  # seconds; 0.0 for bias
    date_obs: str  # ISO 8601 UTC, "YYYY-MM-DDTHH:MM:SS.ffffff" (no timezone suffix)
    night: str  # observing night "YYYY-MM-DD": the local date of the evening the night began
    naxis1: int  # width (x, columns)
    naxis2: int  # height (y, rows)
    dtype: str  # numpy dtype of the stored pixels after BZERO/BSCALE ("uint16", "float32", ...)
    object: str | None = None
    filter: str | None = None
    xbin: int = 1
    ybin: int = 1
    ccd_temp: float | None = None
    set_temp: float | None = None
    gain: float | None = None
    offset: float | None = None
    readout_mode: str | None = None
    camera: str | None = None
    telescope: str | None = None
    bayerpat: str | None = None  # BAYERPAT as stated (or the camera's configured pattern), upper case
    dialect: str | None = None  # which capture program's words were recognised (e.g. "maxim", "nina", "ekos")
    date_source: str | None = None  # the keywords date_obs came from ("DATE-OBS+UTC-OBS", "DATE-OBS (date only)")
    readout: str | None = None  # overscan subtracted and region kept ("raw" or sections and shape): must match
    header_note: str | None = None  # what reading the header decided that a person should know
    naxis3: int | None = None  # 3 for a colour cube (R, G, B planes, already debayered), None for a 2-D frame
    roworder: str | None = None  # ROWORDER as stated: "TOP-DOWN" or "BOTTOM-UP" (None: not stated)
    cfa: str | None = None  # Bayer pattern at the first stored pixel (row 0, column 0); None: not a mosaic
    extra: dict[str, Any] = field(default_factory=dict)  # anything else worth keeping (not stored as columns)

    def row(self) -> dict[str, Any]:
        """The archive row for this frame (without ``extra``)."""
        d = asdict(self)
        d.pop("extra")
        return d


@dataclass
class Image:
    """A frame in memory: float32 pixels, its header, a bad-pixel mask (True = bad) or None, and which pixels
    reached the camera's saturation (True = saturated) or None.

    In a calibrated light a saturated pixel is also bad (its value is only a lower bound); in a stack a pixel
    saturated in every frame holds the saturation level, flagged saturated but not bad.

    ``data`` is 2-D (rows, columns), or a colour frame of three planes (3, rows, columns) in the order R, G, B, the
    layout of a FITS cube with NAXIS3 = 3. A colour frame's mask and saturation flags are one (rows, columns)
    array for all three planes (a pixel is good or bad as a whole), or per plane with the data's own shape.
    """

    data: np.ndarray
    header: fits.Header
    mask: np.ndarray | None = None
    saturated: np.ndarray | None = None

    def __post_init__(self) -> None:
        shape = self.data.shape
        if self.data.ndim != 2 and not (self.data.ndim == 3 and shape[0] == 3):
            raise ValueError(f"an Image is 2-D or 3 colour planes (3, rows, columns), got shape {shape}")
        for name in ("mask", "saturated"):
            flags = getattr(self, name)
            if flags is not None and flags.shape not in (shape, shape[-2:]):
                raise ValueError(f"{name} shape {flags.shape} differs from data shape {shape}")

    @property
    def is_colour(self) -> bool:
        """True for a colour frame of three planes (R, G, B)."""
        return self.data.ndim == 3

    @property
    def plane_shape(self) -> tuple[int, int]:
        """(rows, columns) of one plane."""
        return (int(self.data.shape[-2]), int(self.data.shape[-1]))
