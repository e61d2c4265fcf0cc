"""Stack aligned frames: a live running mean that is always current, and a final outlier-rejecting combine.

The live stack holds a float32 sum and an int32 count per pixel (plus one flag byte: did the pixel saturate in any
frame), so memory does not grow with the number of frames and a restarted daemon resumes from a saved state. The
final combine reads the aligned frames back from disk in bands of rows, sigma-clips every pixel's values along the
frame axis (satellites, planes, cosmic rays) and averages what remains, within a memory budget.

Stars stay whole: a pixel that saturated in a frame is no measurement there (its true value is at least the
saturation level), so it is left out of the mean, and the stack holds at least the saturation level (the frames'
SATURATE) wherever any frame saturated, flagged saturated in the MASK extension, never a hole.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.stats import mad_std, sigma_clip
from astropy.utils.exceptions import AstropyUserWarning
from nightshift.service.combine import BAND_BYTES
from nightshift.service.fitsio import MASK_BAD, MASK_SATURATED
from nightshift.service.frame import Image

__all__ = ["LiveStack", "final_combine"]

#: Bytes of working memory per pixel per frame in the final combine (the band cube and sigma_clip's copies).
_BYTES_PER_SAMPLE = 24
#: Rows sampled per frame to measure its sky level before combining.
_SKY_ROWS = 32


def _exptime(header: fits.Header) -> float | None:
    for key in ("EXPTIME", "EXPOSURE"):
        try:
            value = float(header[key])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(value) and value >= 0:
            return value
    return None


def _stack_header(
    header: fits.Header, *, n: int, exptotal: float, frames: Iterable[str], method: str, history: bool
) -> fits.Header:
    out = header.copy()
    out["NCOMBINE"] = (int(n), "number of frames stacked")
    out["EXPTOTAL"] = (round(float(exptotal), 3), "[s] total exposure of the frames stacked")
    out["COMBINE"] = (method, "how the frames were combined")
    if history:
        for name in frames:
            if name:
                out.add_history(f"stacked {name}")
    return out


class LiveStack:
    """A running mean of aligned frames, updated one frame at a time.

    Parameters
    ----------
    shape : (int, int) or (3, int, int)
        (rows, columns) of the reference every added frame is aligned to; (3, rows, columns) for colour frames
        (R, G, B planes, one count and one saturation flag per pixel for all three).

    Attributes
    ----------
    sum : ndarray of float32
        Sum of the good pixel values added.
    count : ndarray of int32
        How many good values each pixel received.
    n : int
        Frames added.
    exptime_total : float
        Summed exposure (seconds) of the frames added.
    frames : list of str
        Names of the frames added, in order ("" where no name was known).
    saturated : ndarray of bool
        Pixels that saturated in at least one frame added.
    saturation_levels : list of float
        The SATURATE of each frame added that had one.
    """

    def __init__(self, shape: tuple[int, ...]) -> None:
        if len(shape) not in (2, 3) or (len(shape) == 3 and int(shape[0]) != 3):
            raise ValueError(f"a stack is (rows, columns) or (3, rows, columns), got {tuple(shape)}")
        self.shape = tuple(int(n) for n in shape)
        plane = self.shape[-2:]
        self.sum = np.zeros(self.shape, dtype=np.float32)
        self.count = np.zeros(plane, dtype=np.int32)
        self.saturated = np.zeros(plane, dtype=bool)
        self.saturation_levels: list[float] = []
        self.n = 0
        self.exptime_total = 0.0
        self.frames: list[str] = []

    def add(self, image: Image, *, name: str | None = None) -> None:
        """Add an aligned frame; masked and non-finite pixels are left out. The image is not modified.

        ``name`` (default: the header's FILENAME, if any) is listed in the stack's HISTORY.
        """
        data = image.data
        if data.shape != self.shape:
            raise ValueError(f"frame shape {data.shape} differs from the stack's {self.shape}")
        good = np.isfinite(data) if data.ndim == 2 else np.isfinite(data).all(axis=0)  # a pixel: all planes
        if image.mask is not None:
            good &= ~_plane_flags(image.mask)
        np.add(self.sum, data, out=self.sum, where=good, casting="same_kind")
        self.count += good
        if image.saturated is not None:
            self.saturated |= _plane_flags(image.saturated)
        level = _saturation(image.header)
        if level is not None:
            self.saturation_levels.append(level)
        self.n += 1
        self.exptime_total += _exptime(image.header) or 0.0
        self.frames.append(name or str(image.header.get("FILENAME", "")))

    def image(self, header: fits.Header, *, history: bool = True) -> Image:
        """The current mean, with ``header`` (the reference's) plus NCOMBINE, EXPTOTAL and COMBINE.

        The named frames are listed in HISTORY unless ``history`` is False (when the caller writes its own).

        Pixels no frame covered are NaN and masked; pixels that saturated in a frame hold at least the saturation
        level and are flagged in ``saturated``.
        """
        empty = self.count == 0
        mean = np.full(self.shape, np.nan, dtype=np.float32)
        np.divide(self.sum, self.count, out=mean, where=np.broadcast_to(~empty, self.shape))
        out_header = _stack_header(
            header, n=self.n, exptotal=self.exptime_total, frames=self.frames, method="mean", history=history
        )
        saturated = _fill_saturated(mean, empty, self.saturated, self.saturation_levels, out_header)
        return Image(data=mean, header=out_header, mask=empty, saturated=saturated)

    def save_state(self, path: str | os.PathLike[str]) -> None:
        """Write the stack to ``path`` (npz), atomically, so a restarted daemon can resume it."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    sum=self.sum,
                    count=self.count,
                    saturated=self.saturated,
                    saturation_levels=np.array(self.saturation_levels, dtype=np.float64),
                    n=np.int64(self.n),
                    exptime_total=np.float64(self.exptime_total),
                    frames=np.array(self.frames, dtype=str),
                )
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    @classmethod
    def load_state(cls, path: str | os.PathLike[str]) -> LiveStack:
        """Read a stack written by :meth:`save_state`."""
        with np.load(path, allow_pickle=False) as z:
            stack = cls(z["sum"].shape)
            stack.sum = z["sum"].astype(np.float32, copy=False)
            stack.count = z["count"].astype(np.int32, copy=False)
            stack.n = int(z["n"])
            stack.exptime_total = float(z["exptime_total"])
            stack.frames = [str(f) for f in z["frames"]]
            if "saturated" in z:  # states saved before saturation was tracked have none
                stack.saturated = z["saturated"].astype(bool, copy=False)
                stack.saturation_levels = [float(v) for v in z["saturation_levels"]]
        return stack


def _saturation(header: fits.Header) -> float | None:
    value = header.get("SATURATE")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    return None


def _plane_flags(flags: np.ndarray) -> np.ndarray:
    """A frame's flags as one (rows, columns) array: set where any plane of a colour frame has them."""
    flags = np.asarray(flags, dtype=bool)
    return flags.any(axis=0) if flags.ndim == 3 else flags


def _fill_saturated(
    data: np.ndarray, empty: np.ndarray, saturated: np.ndarray, levels: Sequence[float], header: fits.Header
) -> np.ndarray | None:
    """Raise pixels that saturated in any frame to at least the frames' median saturation level, in place
    (each plane of a colour stack).

    Those pixels are then no longer empty (``empty`` is cleared there); the level goes to the header's SATURATE.
    Returns the saturated flags, or None when nothing saturated or no frame said its level.
    """
    if not levels or not saturated.any():
        return None
    level = np.float32(np.median(levels))
    for plane in data if data.ndim == 3 else [data]:
        with np.errstate(invalid="ignore"):
            low = saturated & ~(plane >= level)  # NaN (no unsaturated value) compares False: raised too
        plane[low] = level
    empty &= ~saturated
    header["SATURATE"] = (round(float(level), 1), "[ADU] saturation level; pixels at it are flagged in MASK")
    return saturated.copy()


def _image_hdus(hdul: fits.HDUList) -> tuple[Any, Any]:
    """The image HDU of an aligned frame (primary or first image extension; 2-D, or a 3-plane colour cube) and
    its MASK extension (2-D) or None."""
    data_hdu = mask_hdu = None
    for hdu in hdul:
        naxis = hdu.header.get("NAXIS", 0)
        if str(hdu.header.get("EXTNAME", "")).upper() == "MASK" and naxis == 2:
            mask_hdu = hdu
        elif data_hdu is None and (naxis == 2 or (naxis == 3 and hdu.header.get("NAXIS3") == 3)):
            data_hdu = hdu
    if data_hdu is None:
        raise ValueError(f"{hdul.filename()}: no 2-D image nor 3-plane colour cube")
    return data_hdu, mask_hdu


def _read_band(
    data_hdu: Any,
    mask_hdu: Any,
    rows: slice,
    out: np.ndarray,
    saturated: np.ndarray | None = None,
    plane: int | None = None,
) -> None:
    """Read rows of a frame (of one ``plane`` of a colour frame) into ``out`` (float32), NaN where masked; OR its
    saturated pixels into ``saturated``."""
    out[...] = data_hdu.section[rows, :] if plane is None else data_hdu.section[plane, rows, :]
    if mask_hdu is not None:
        flags = np.asarray(mask_hdu.section[rows, :])
        out[(flags & MASK_BAD) != 0] = np.nan
        if saturated is not None:
            saturated |= (flags & MASK_SATURATED) != 0


def _sky_stats(data_hdu: Any, mask_hdu: Any, n_rows: int, plane: int | None = None) -> tuple[float, float]:
    """Sky level and pixel noise of a frame (of one plane of a colour frame), from a few rows spread over it."""
    height, width = data_hdu.shape[-2:]
    rows = np.unique(np.linspace(0, height - 1, min(n_rows, height)).astype(int))
    sample = np.empty((len(rows), width), dtype=np.float32)
    for i, r in enumerate(rows):
        _read_band(data_hdu, mask_hdu, slice(r, r + 1), sample[i : i + 1], plane=plane)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        level = float(np.nanmedian(sample))
        # differences of pixels two apart: free of gradients and of the resampling's neighbour correlation
        noise = float(mad_std(sample[:, 2:] - sample[:, :-2], ignore_nan=True)) / math.sqrt(2.0)
    return (level if math.isfinite(level) else 0.0), (noise if math.isfinite(noise) else 0.0)


def _clipped_mean(cube: np.ndarray, sigma: float, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean and count along axis 0 of the values within ``sigma`` robust deviations of each pixel's median.

    astropy's sigma_clip (its fast C path: median centre, MAD-based spread, iterated) gives the bounds; the
    spread is then never allowed below the frames' sky noise ``floor``: with a handful of frames the MAD of a
    pixel is itself noisy, and where it comes out low, clipping would throw good values away.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyUserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        _, lo, hi = sigma_clip(
            cube,
            sigma=sigma,
            maxiters=5,
            cenfunc="median",
            stdfunc="mad_std",
            axis=0,
            masked=True,
            copy=False,
            return_bounds=True,
        )
    centre = (lo + hi) * np.float32(0.5)
    half_width = np.maximum((hi - lo) * np.float32(0.5), np.float32(sigma * floor))
    with np.errstate(invalid="ignore"):
        keep = np.abs(cube - centre) <= half_width  # NaN (masked) compares False
    count = np.count_nonzero(keep, axis=0).astype(np.int32)
    np.logical_not(keep, out=keep)
    cube[keep] = 0.0  # the band buffer is ours: zero what is rejected, then sum
    total = cube.sum(axis=0, dtype=np.float32)
    mean = np.full(total.shape, np.nan, dtype=np.float32)
    np.divide(total, count, out=mean, where=count > 0)
    return mean, count


def _combine_plane(
    hdus: list,
    plane: int | None,
    result: np.ndarray,
    empty: np.ndarray,
    saturated: np.ndarray,
    sigma: float,
    mem_limit_bytes: int,
    match_background: bool,
) -> np.ndarray:
    """Sigma-clipped mean of one plane of the frames (``plane`` None for mono frames) into ``result``, in bands
    of rows; ``empty`` and ``saturated`` get the pixels no frame covered and those saturated in a frame (ORed).

    Returns the sky offset taken off each frame."""
    height, width = result.shape
    n = len(hdus)
    stats = np.array([_sky_stats(d, m, _SKY_ROWS, plane) for d, m, _ in hdus])
    levels, noise_floor = stats[:, 0], float(np.median(stats[:, 1]))
    offsets = np.zeros(n, dtype=np.float32)
    if match_background:
        offsets = (levels - np.median(levels)).astype(np.float32)
    band = max(1, min(height, int(min(mem_limit_bytes, BAND_BYTES) // (n * width * _BYTES_PER_SAMPLE))))
    cube = np.empty((n, band, width), dtype=np.float32)
    for y0 in range(0, height, band):
        y1 = min(height, y0 + band)
        part = cube[:, : y1 - y0]
        for i, (data_hdu, mask_hdu, _) in enumerate(hdus):
            _read_band(data_hdu, mask_hdu, slice(y0, y1), part[i], saturated[y0:y1], plane)
            if offsets[i]:
                part[i] -= offsets[i]
        result[y0:y1], counts = _clipped_mean(part, sigma, noise_floor)
        empty[y0:y1] |= counts == 0
    return offsets


def final_combine(
    paths: Sequence[str | os.PathLike[str]],
    *,
    header: fits.Header,
    sigma: float = 3.0,
    mem_limit_bytes: int = 512 * 2**20,
    match_background: bool = True,
    history: bool = True,
) -> Image:
    """Combine aligned frames on disk into a sigma-clipped mean.

    Parameters
    ----------
    paths : sequence of path
        Aligned frames: FITS with a float32 image (primary HDU or first image extension; 2-D, or 3 colour planes)
        and optionally a ``MASK`` extension (bits: 1 bad, 2 saturated). NaN pixels count as masked too.
    header : astropy.io.fits.Header
        The reference's header (with its WCS); the result carries it plus NCOMBINE, EXPTOTAL and the frames in
        HISTORY.
    sigma : float, default 3.0
        Clipping threshold around each pixel's median, in robust standard deviations: MAD-based, so one bright
        satellite trail among a few frames cannot hide by inflating the spread, and never below the frames'
        sky noise, so few frames do not clip good values.
    mem_limit_bytes : int, default 512 MiB
        Working memory budget; the frames are read in bands of rows sized to fit it.
    match_background : bool, default True
        Shift each frame's sky to the frames' median sky before clipping, so a sky that changed through the night
        does not look like an outlier.
    history : bool, default True
        List the frames' file names in HISTORY (False when the caller's header already lists them).

    Returns
    -------
    Image
        float32 mean; pixels with no good value are NaN and masked, except those that saturated in a frame:
        they hold at least the frames' saturation level (SATURATE) and are flagged in ``saturated``. Colour frames
        (3 planes, one MASK each) give a colour stack: each plane sky-matched, clipped and averaged on its own
        (rejection per channel), one mask for the three planes.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("final_combine needs at least one frame")
    with contextlib.ExitStack() as stack:
        hdus = []
        for p in paths:
            hdul = stack.enter_context(fits.open(p, memmap=False, lazy_load_hdus=True))
            hdus.append((*_image_hdus(hdul), hdul[0].header))
        shape = tuple(hdus[0][0].shape)
        for p, (data_hdu, _, _) in zip(paths, hdus, strict=True):
            if tuple(data_hdu.shape) != shape:
                raise ValueError(f"{p.name}: shape {tuple(data_hdu.shape)} differs from {shape}")
        n = len(paths)
        result = np.empty(shape, dtype=np.float32)
        saturated = np.zeros(shape[-2:], dtype=bool)
        empty = np.zeros(shape[-2:], dtype=bool)
        levels: list[float] = []
        # a colour frame's planes are combined one after the other, each with its own sky and clipping
        for plane in range(shape[0]) if len(shape) == 3 else [None]:
            out = result if plane is None else result[plane]
            offsets = _combine_plane(hdus, plane, out, empty, saturated, sigma, mem_limit_bytes, match_background)
            if plane in (None, 1):  # the saturation levels of the mono frames, of the green plane of colour ones
                # each frame's level, moved with its sky as the frame was
                levels = [
                    v - float(o) for (d, _, _), o in zip(hdus, offsets, strict=True) if (v := _saturation(d.header))
                ]
        exptotal = sum(_exptime(h) or 0.0 for _, _, h in hdus)
    for out in result if len(shape) == 3 else [result]:
        out[empty] = np.nan
    out_header = _stack_header(
        header,
        n=n,
        exptotal=exptotal,
        frames=[p.name for p in paths],
        method=f"sigma-clipped mean ({sigma:g} sigma)" + (", each colour plane on its own" if len(shape) == 3 else ""),
        history=history,
    )
    flags = _fill_saturated(result, empty, saturated, levels, out_header)
    return Image(data=result, header=out_header, mask=empty, saturated=flags)
