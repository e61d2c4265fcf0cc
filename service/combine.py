"""Combine a stack of frames into one, a band of rows at a time, so memory stays bounded.

Each input is opened once (:func:`nightshift.service.fitsio.open_frame`: FITS, compressed or not, or XISF) and
read by row bands through astropy's ``hdu.section`` (which applies BZERO/BSCALE and reads only the rows asked
for). An input with an overscan has its own readout level measured once (:mod:`nightshift.service.readout`) and
subtracted from every band, which is trimmed to the region kept. Per band: cast to float32, subtract the given
calibration arrays, scale, then combine along the stack axis with a median or an (astropy) sigma-clipped
average, into a float32 result. This is what ``ccdproc.combine(..., mem_limit=...)`` does, without CCDData,
units or uncertainty.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.stats import sigma_clip
from nightshift.service.fitsio import FrameSource, open_frame, read_frame_header
from nightshift.service.frame import FrameError
from nightshift.service.readout import OFF, Readout, overscan_level, readout_of

__all__ = ["DEFAULT_MEM_LIMIT", "METHODS", "SCALES", "combine_files", "describe_method", "read_header"]

METHODS = ("average", "median")
SCALES = ("none", "median")
DEFAULT_MEM_LIMIT = 512 * 2**20
#: Working bytes per stacked float32 value: the band itself, the clip mask and comparison temporaries.
_BYTES_PER_VALUE = 4 * 2

SubtractTerm = tuple[np.ndarray, float | Sequence[float]]


def describe_method(method: str, sigma: float | None) -> str:
    """The COMBMETH text for a method: ``'median'``, ``'average'`` or ``'sigclip-average 3.0'``."""
    if method == "average" and sigma:
        return f"sigclip-average {float(sigma)!r}"
    return method


def read_header(path: Path | str) -> fits.Header:
    """The header of a file's frame (FITS: the first 2-D image HDU, primary keywords included; XISF)."""
    return read_frame_header(Path(path))


#: Rows read at a time to measure an input's overscan.
_STRIP_ROWS = 512


def _size(region: tuple[slice, slice]) -> tuple[int, int]:
    return region[0].stop - region[0].start, region[1].stop - region[1].start


class _Input:
    """One input of a combine: its rows, overscan-subtracted and trimmed as its readout says."""

    def __init__(self, source: FrameSource, overscan: str | None, trim: str | None) -> None:
        self.source = source
        try:
            self.readout: Readout = readout_of(source.header, source.shape, overscan=overscan, trim=trim)
        except FrameError as exc:
            raise ValueError(f"{source.path.name}: {exc.message}") from None
        self.level: np.ndarray | None = None
        height, width = source.shape
        region = self.readout.overscan_region
        if region is not None:
            strip = np.empty(_size(region), dtype=np.float32)
            for y0 in range(region[0].start, region[0].stop, _STRIP_ROWS):
                y1 = min(region[0].stop, y0 + _STRIP_ROWS)
                strip[y0 - region[0].start : y1 - region[0].start] = self._rows(y0, y1)[:, region[1]]
            self.level = overscan_level(strip, region, source.shape)
        self.rows, self.cols = self.readout.trim_region or (slice(0, height), slice(0, width))
        self.full_width = (self.cols.start, self.cols.stop) == (0, width)
        self.shape = self.readout.shape

    def _rows(self, r0: int, r1: int) -> np.ndarray:
        # whole rows: astropy reads a band of whole rows in one go, but a column range row by row (20x slower)
        return self.source.section[r0:r1, :]

    def read(self, y0: int, y1: int, dest: np.ndarray) -> None:
        """Rows y0:y1 of the (trimmed) frame into ``dest``, the overscan level taken off."""
        r0, r1 = self.rows.start + y0, self.rows.start + y1
        dest[...] = self._rows(r0, r1) if self.full_width else self._rows(r0, r1)[:, self.cols]
        if self.level is not None:
            if self.level.shape[1] == 1:
                dest -= self.level[r0:r1]
            else:
                dest -= self.level[:, self.cols]


def _terms(subtract: Sequence[SubtractTerm], n: int, shape: tuple[int, ...]) -> list[tuple[np.ndarray, list]]:
    terms = []
    for array, factor in subtract:
        if array.ndim == 3 and array.size == np.prod(shape):
            array = array.reshape(shape)  # a colour cube's master, planes one under the other as the frames are read
        if array.shape != shape:
            raise ValueError(f"subtracted array has shape {array.shape}, frames have {shape}")
        factors = [float(f) for f in factor] if np.iterable(factor) else [float(factor)] * n
        if len(factors) != n:
            raise ValueError(f"{len(factors)} subtraction factors for {n} frames")
        terms.append((array, factors))
    return terms


def _load_band(source: _Input, y0: int, y1: int, dest: np.ndarray, terms, index: int) -> None:
    """Read rows y0:y1 of one input into ``dest`` (float32) and subtract its calibration terms."""
    source.read(y0, y1, dest)
    for array, factors in terms:
        factor = factors[index]
        if factor == 1.0:
            dest -= array[y0:y1]
        elif factor != 0.0:
            dest -= np.float32(factor) * array[y0:y1]


def _frame_medians(hdus, paths, terms, shape, rows: int) -> list[float]:
    """Median of each input after subtraction, one frame in memory at a time."""
    frame = np.empty(shape, dtype=np.float32)
    medians = []
    for i, (hdu, path) in enumerate(zip(hdus, paths, strict=True)):
        for y0 in range(0, shape[0], rows):
            y1 = min(shape[0], y0 + rows)
            _load_band(hdu, y0, y1, frame[y0:y1], terms, i)
        level = float(np.median(frame, overwrite_input=True))
        if not np.isfinite(level) or level <= 0:
            raise ValueError(f"{path.name}: median level {level:g} after subtraction, cannot scale by it")
        medians.append(level)
    return medians


#: Working-set size of one band of the stack (the memory limit still caps it).
BAND_BYTES = 32 * 2**20


def _combine_band(
    band: np.ndarray, out: np.ndarray, method: str, sigma: float | None, cenfunc: str, stdfunc: str, maxiters
) -> int:
    """Combine ``band`` (n, rows, width) along axis 0 into ``out``; return how many values were rejected.

    ``band`` is working memory: it is overwritten.
    """
    n = band.shape[0]
    if method == "median":
        np.median(band, axis=0, overwrite_input=True, out=out)
        return 0
    if not sigma:
        out[...] = band.sum(axis=0, dtype=np.float64) / n
        return 0
    mask = sigma_clip(
        band,
        sigma=sigma,
        axis=0,
        maxiters=maxiters,
        cenfunc=cenfunc,
        stdfunc=stdfunc,
        masked=True,
        copy=False,
    ).mask
    if mask is np.ma.nomask or not mask.any():
        out[...] = band.sum(axis=0, dtype=np.float64) / n
        return 0
    kept = n - mask.sum(axis=0)
    everything_rejected = kept == 0  # only where every input is NaN/inf
    np.putmask(band, mask, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out[...] = band.sum(axis=0, dtype=np.float64) / kept
    out[everything_rejected] = np.nan
    return int(mask.sum())


def combine_files(
    paths: Sequence[Path | str],
    *,
    method: str = "average",
    sigma: float | None = 3.0,
    scale: str = "none",
    subtract: Sequence[SubtractTerm] = (),
    mem_limit_bytes: int = DEFAULT_MEM_LIMIT,
    cenfunc: str = "median",
    stdfunc: str = "std",
    maxiters: int | None = 1,
    overscan: str | None = OFF,
    trim: str | None = OFF,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Combine frames pixel by pixel, reading them in row bands so memory stays under a limit.

    Parameters
    ----------
    paths : sequence of path
        Input files (FITS, compressed or not, or XISF), all of the same 2-D shape once trimmed, all with the
        same readout; or all 3-plane colour cubes of one shape (each plane combined on its own into a cube).
        They are only read.
    method : {"average", "median"}
        ``"average"`` is a sigma-clipped mean when ``sigma`` is set (astropy ``sigma_clip`` along the
        stack, centre ``cenfunc``, deviation ``stdfunc``, ``maxiters`` iterations: the defaults match
        ``ccdproc.combine(sigma_clip=True, sigma_clip_func=np.ma.median)``), a plain mean when ``sigma``
        is None or 0. ``"median"`` is the plain median (``sigma`` ignored).
    sigma : float or None
        Clipping threshold in standard deviations, both sides.
    scale : {"none", "median"}
        ``"median"`` multiplies each frame (after subtraction) by 1 / its own median, as flats need.
    subtract : sequence of (array, factor)
        float32 arrays of the frames' shape (a cube for cubes), each multiplied by ``factor`` and subtracted from
        every input
        before scaling (master bias with factor 1, a dark scaled by exposure). ``factor`` may also be a
        sequence with one factor per input.
    mem_limit_bytes : int
        Working memory for the band stack; sets the band height. The output, the subtracted arrays and, for
        ``scale="median"``, one frame are held besides.
    cenfunc, stdfunc : str
        ``"median"``/``"mean"`` and ``"std"``/``"mad_std"``, as astropy's ``sigma_clip`` takes them.
    maxiters : int or None
        Clipping iterations (None: until nothing more is rejected).
    overscan, trim : str
        What to do to each input before anything else (see :func:`nightshift.service.readout.readout_of`):
        ``"off"`` (the default), ``"auto"`` (the header's sections), a section or a keyword name. Each input's
        overscan is measured in that input; the subtracted arrays are of the trimmed shape.

    Returns
    -------
    data : numpy.ndarray
        float32 combined frame.
    stats : dict
        ``n``, ``method`` (COMBMETH text), ``sigma``, ``rejected_fraction``, ``band_rows``, ``n_bands``,
        ``medians`` (each input's level when scaled, else None), ``shape``, ``readout`` (the inputs' common
        :class:`~nightshift.service.readout.Readout`), ``overscan_levels`` (each input's mean overscan level, or
        None).
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("nothing to combine")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    n = len(paths)
    with contextlib.ExitStack() as stack:
        hdus = []
        for p in paths:
            try:
                source = stack.enter_context(open_frame(p))
                cube = source.planes > 1  # a debayered colour cube has no overscan
                hdus.append(_Input(source, OFF if cube else overscan, OFF if cube else trim))
            except FrameError as exc:
                raise ValueError(f"{p.name}: {exc.message}") from None
        shape = tuple(hdus[0].shape)
        planes = hdus[0].source.planes
        readout = hdus[0].readout
        raw = tuple(hdus[0].source.shape)
        for path, hdu in zip(paths, hdus, strict=True):
            if tuple(hdu.source.shape) != raw or hdu.source.planes != planes:
                raise ValueError(f"{path.name} has shape {hdu.source.shape}, {paths[0].name} has {raw}")
            if hdu.readout.describe() != readout.describe():
                raise ValueError(
                    f"{path.name} is read as {hdu.readout.describe()}, {paths[0].name} as {readout.describe()}"
                )
        height, width = shape
        terms = _terms(subtract, n, shape)
        # bands of a few tens of MB, even when the limit allows more: the buffers stay in reused memory and in
        # cache, which makes the clipping 2x faster than on one whole-frame band
        budget = min(mem_limit_bytes, BAND_BYTES)
        rows = int(min(height, max(1, budget // (_BYTES_PER_VALUE * n * width))))
        medians = _frame_medians(hdus, paths, terms, shape, rows) if scale == "median" else None
        out = np.empty(shape, dtype=np.float32)
        buffer = np.empty((n, rows, width), dtype=np.float32)
        rejected = 0
        n_bands = 0
        for y0 in range(0, height, rows):
            y1 = min(height, y0 + rows)
            band = buffer[:, : y1 - y0]
            for i, hdu in enumerate(hdus):
                _load_band(hdu, y0, y1, band[i], terms, i)
                if medians is not None:
                    band[i] *= np.float32(1.0 / medians[i])
            rejected += _combine_band(band, out[y0:y1], method, sigma, cenfunc, stdfunc, maxiters)
            n_bands += 1
    if planes > 1:
        shape = (planes, height // planes, width)
        out = out.reshape(shape)
    stats = {
        "n": n,
        "method": describe_method(method, sigma),
        "sigma": sigma if method == "average" else None,
        "rejected_fraction": rejected / (n * height * width),
        "band_rows": rows,
        "n_bands": n_bands,
        "medians": medians,
        "shape": shape,
        "readout": readout,
        "overscan_levels": [float(np.mean(h.level)) if h.level is not None else None for h in hdus],
    }
    return out, stats
