"""Master calibration frames from raw files: bias, dark, darkflat, flat, and the bad-pixel mask.

Each maker takes the raw paths of one calibration set, combines them with
:func:`service.combine.combine_files` (bounded memory), and returns an :class:`~nightshift.service.frame.Image` whose
header says what it is and how it was made: IMAGETYP 'MASTER ...', the matching keys of the set, NCOMBINE,
COMBMETH, BIASSUB/DARKSUB/FLATNORM, OSCANSUB/OVERSCAN/TRIM, the inputs and the steps as HISTORY. Every
input, biases included, first has its own overscan level subtracted and is trimmed when its header (or the
setting) says so (:mod:`nightshift.service.readout`), so masters have the trimmed shape. Bias is a sigma-clipped
average; darks are bias-subtracted, then median-combined; flats are bias- (and dark-) subtracted, scaled by their
own median, combined and normalised to median 1: a colour camera's flat (a Bayer mosaic) per CFA position and
a debayered cube's per plane, so that dividing by it changes no colour balance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.stats import mad_std
from nightshift.service.calibrate import (
    CalibrationError,
    check_dark_bias,
    check_overscan,
    dark_scale,
    exposure_of,
    is_bias_subtracted,
)
from nightshift.service.cfa import CfaError, header_layout, normalise_per_position
from nightshift.service.combine import DEFAULT_MEM_LIMIT, combine_files, read_header
from nightshift.service.filters import filter_key, header_filter
from nightshift.service.frame import FrameError, Image
from nightshift.service.night import parse_date_obs
from nightshift.service.provenance import add_history, logged
from nightshift.service.readout import AUTO, OFF, OVERSCAN_ORDER, Readout, readout_of

__all__ = [
    "MATCH_KEYS",
    "bad_pixel_mask",
    "make_master_bias",
    "make_master_dark",
    "make_master_darkflat",
    "make_master_flat",
]

#: Keys copied from the first input: what a light must match to use the master.
MATCH_KEYS = (
    "INSTRUME",
    "TELESCOP",
    "XBINNING",
    "YBINNING",
    "GAIN",
    "OFFSET",
    "READOUTM",
    "SET-TEMP",
    "BAYERPAT",
    "XBAYROFF",
    "YBAYROFF",
    "ROWORDER",
)
_EXPTIME_RTOL = 1e-4
_EXPTIME_ATOL = 1e-3


def _start_time(header: fits.Header) -> datetime | None:
    """The exposure's UTC start as :func:`nightshift.service.night.parse_date_obs` reads it; None if unknown."""
    try:
        return parse_date_obs(header, exposure_of(header))
    except FrameError:
        return None


def _mean_date(headers: Sequence[fits.Header]) -> str | None:
    """Mean start time of the inputs, ISO 8601 without timezone; None when no DATE-OBS parses."""
    stamps = [s for s in (_start_time(h) for h in headers) if s is not None]
    if not stamps:
        return None
    base = stamps[0]
    mean = base + sum((s - base for s in stamps), timedelta()) / len(stamps)
    return mean.isoformat(timespec="microseconds")


def _mean_number(headers: Sequence[fits.Header], key: str) -> float | None:
    values = [
        float(h[key])
        for h in headers
        if isinstance(h.get(key), (int, float)) and not isinstance(h.get(key), bool) and math.isfinite(h[key])
    ]
    return float(np.mean(values)) if values else None


def _common_exposure(paths: Sequence[Path], headers: Sequence[fits.Header], what: str) -> float:
    """The one exposure time of a set of darks; refuse a set that mixes exposures or lacks them."""
    times = []
    for path, header in zip(paths, headers, strict=True):
        exptime = exposure_of(header)
        if exptime is None:
            raise CalibrationError(f"{Path(path).name}: a {what} without EXPTIME/EXPOSURE")
        times.append(exptime)
    if not all(math.isclose(t, times[0], rel_tol=_EXPTIME_RTOL, abs_tol=_EXPTIME_ATOL) for t in times):
        raise CalibrationError(f"{what} set mixes exposure times {sorted(set(times))}: one master per exposure")
    return times[0]


def _headers(paths: Sequence[Path | str]) -> list[fits.Header]:
    if not paths:
        raise ValueError("a master needs at least one input frame")
    return [read_header(p) for p in paths]


def _readout(
    paths: Sequence[Path | str], headers: Sequence[fits.Header], overscan: str | None, trim: str | None
) -> Readout:
    """The one readout of a set's frames (overscan and region kept); refuse a set whose frames differ."""
    plans = []
    for path, header in zip(paths, headers, strict=True):
        shape = (int(header.get("NAXIS2", 0)), int(header.get("NAXIS1", 0)))
        try:
            plans.append(readout_of(header, shape, overscan=overscan, trim=trim))
        except FrameError as exc:
            raise CalibrationError(f"{Path(path).name}: {exc.message}") from None
    texts = {(p.raw_shape, p.describe()) for p in plans}
    if len(texts) > 1:
        raise CalibrationError(f"the set's frames are read differently: {sorted(t[1] for t in texts)}")
    return plans[0]


def _check_master(master: Image | None, readout: Readout, what: str) -> None:
    """A master used on a set: of the set's trimmed shape, its bias level treated as the set's is."""
    if master is None:
        return
    if master.data.shape[-2:] != readout.shape:  # a colour cube's master has 3 planes of that shape
        raise CalibrationError(f"{what} has shape {master.data.shape}, the frames are {readout.shape} once trimmed")


def _combine(paths, readout: Readout, **options) -> tuple[np.ndarray, dict]:
    return combine_files(paths, overscan=readout.overscan or OFF, trim=readout.trim or OFF, **options)


def _readout_cards(readout: Readout) -> dict[str, tuple]:
    cards: dict[str, tuple] = {
        "OSCANSUB": (readout.overscan is not None, "each input's overscan level subtracted"),
    }
    if readout.overscan:
        cards["OVERSCAN"] = (readout.overscan, "overscan region of the raw inputs")
    if readout.trim:
        cards["TRIM"] = (readout.trim, "region of the raw inputs kept")
    return cards


def _readout_step(readout: Readout, stats: dict) -> list[str]:
    steps = []
    levels = [v for v in stats.get("overscan_levels") or [] if v is not None]
    if readout.overscan and levels:
        steps.append(
            f"overscan {readout.overscan} of each input subtracted per row (sigma-clipped mean, Legendre degree "
            f"{OVERSCAN_ORDER}); levels {min(levels):.2f} to {max(levels):.2f} ADU"
        )
    if readout.trim:
        steps.append(f"each input trimmed to {readout.trim}")
    return steps


def _master(
    kind: str,
    data: np.ndarray,
    headers: Sequence[fits.Header],
    stats: dict,
    inputs_note: Sequence[str],
    steps: Sequence[str],
    cards: dict[str, tuple],
) -> Image:
    """A master's Image: IMAGETYP, the first input's matching keys, ``cards``, means, stats, inputs, steps."""
    first = headers[0]
    header = fits.Header()
    header["IMAGETYP"] = (f"MASTER {kind.upper()}", "nightshift master calibration frame")
    for key in MATCH_KEYS:
        if key in first:
            header[key] = (first[key], first.comments[key])
    if kind == "flat":
        name, source = header_filter(first)
        if name is not None:
            header["FILTER"] = (name, f"filter of the inputs (from {source})")
    for key, card in cards.items():
        header[key] = card
    temp = _mean_number(headers, "CCD-TEMP")
    if temp is not None:
        header["CCD-TEMP"] = (round(temp, 4), "[C] mean sensor temperature of the inputs")
    date = _mean_date(headers)
    if date is not None:
        header["DATE-OBS"] = (date, "mean start time of the inputs (UTC)")
    header["NCOMBINE"] = (stats["n"], "number of frames combined")
    header["COMBMETH"] = (stats["method"], "how the frames were combined")
    for note in inputs_note:
        add_history(header, "NSINPUT", note)
    for step in steps:
        add_history(header, "NSSTEP", step)
    return Image(data=data, header=header)


def _combined(stats: dict) -> str:
    return f"combined {stats['n']} frames: {stats['method']}, {stats['rejected_fraction']:.4%} rejected"


def _subtracted(biassub: bool, darksub: bool) -> dict[str, tuple]:
    return {
        "BIASSUB": (biassub, "master bias subtracted from the inputs"),
        "DARKSUB": (darksub, "dark subtracted from the inputs"),
    }


@logged
def make_master_bias(
    paths: Sequence[Path | str],
    *,
    inputs_note: Sequence[str] = (),
    sigma: float = 3.0,
    mem_limit_bytes: int = DEFAULT_MEM_LIMIT,
    overscan: str | None = AUTO,
    trim: str | None = AUTO,
) -> Image:
    """Master bias: the sigma-clipped average of raw bias frames, each overscan-subtracted and trimmed first.

    Parameters
    ----------
    paths : sequence of path
        Raw bias files of one camera setting.
    inputs_note : sequence of str
        One line per input (file name, sha256 prefix) for the HISTORY.
    sigma : float
        Clipping threshold (standard deviations about the median of each pixel's stack).
    mem_limit_bytes : int
        Working memory for the combine.
    overscan, trim : str
        ``"auto"`` (the header's BIASSEC, TRIMSEC/DATASEC), ``"off"``, a section or a keyword name: see
        :func:`nightshift.service.readout.readout_of`. Every frame of the set must be read the same way.

    Returns
    -------
    Image
        float32 of the trimmed shape, IMAGETYP 'MASTER BIAS', BIASSUB = F, OSCANSUB.
    """
    headers = _headers(paths)
    readout = _readout(paths, headers, overscan, trim)
    data, stats = _combine(paths, readout, method="average", sigma=sigma, mem_limit_bytes=mem_limit_bytes)
    steps = [*_readout_step(readout, stats), _combined(stats)]
    cards = {**_subtracted(False, False), **_readout_cards(readout)}
    return _master("bias", data, headers, stats, inputs_note, steps, cards)


def _make_dark_like(
    kind: str,
    paths: Sequence[Path | str],
    bias: Image | None,
    method: str,
    sigma: float,
    inputs_note: Sequence[str],
    mem_limit_bytes: int,
    overscan: str | None,
    trim: str | None,
) -> Image:
    headers = _headers(paths)
    exptime = _common_exposure(list(paths), headers, kind)
    readout = _readout(paths, headers, overscan, trim)
    _check_master(bias, readout, "master bias")
    check_overscan(readout.overscan is not None, readout.raw_shape, bias, None, trimmed=True)
    subtract = [(bias.data, 1.0)] if bias is not None else []
    data, stats = _combine(
        paths, readout, method=method, sigma=sigma, subtract=subtract, mem_limit_bytes=mem_limit_bytes
    )
    steps = _readout_step(readout, stats)
    if bias is not None:
        steps.append(f"master bias subtracted from each input ({bias.header.get('NCOMBINE', '?')} frames)")
    steps.append(_combined(stats))
    cards = {
        "EXPTIME": (exptime, "[s] exposure time of the inputs"),
        **_subtracted(bias is not None, False),
        **_readout_cards(readout),
    }
    return _master(kind, data, headers, stats, inputs_note, steps, cards)


@logged
def make_master_dark(
    paths: Sequence[Path | str],
    *,
    bias: Image | None,
    method: str = "median",
    sigma: float = 3.0,
    inputs_note: Sequence[str] = (),
    mem_limit_bytes: int = DEFAULT_MEM_LIMIT,
    overscan: str | None = AUTO,
    trim: str | None = AUTO,
) -> Image:
    """Master dark of one exposure: inputs bias-subtracted with the master bias, then combined.

    Parameters
    ----------
    paths : sequence of path
        Raw darks, all of the same exposure time.
    bias : Image or None
        Master bias. Given: the master is BIASSUB = T and can be scaled to other exposures; None: the master
        still holds the bias (BIASSUB = F) and is only valid for lights of its own exposure.
    method : {"median", "average"}
        Median (removes cosmic rays with any number of frames) or sigma-clipped average (``sigma``; needs
        roughly ten or more frames before clipping can reject a cosmic ray).
    sigma : float
        Clipping threshold for ``"average"``.
    inputs_note : sequence of str
        One line per input for the HISTORY.
    mem_limit_bytes : int
        Working memory for the combine.
    overscan, trim : str
        How each input is read first, as for :func:`make_master_bias`; the bias must be made the same way.

    Returns
    -------
    Image
        float32, IMAGETYP 'MASTER DARK', EXPTIME of the inputs, BIASSUB, OSCANSUB.

    Raises
    ------
    CalibrationError
        Inputs of different exposures or without one; a bias of another shape or readout.
    """
    return _make_dark_like("dark", paths, bias, method, sigma, inputs_note, mem_limit_bytes, overscan, trim)


@logged
def make_master_darkflat(
    paths: Sequence[Path | str],
    *,
    bias: Image | None = None,
    method: str = "median",
    sigma: float = 3.0,
    inputs_note: Sequence[str] = (),
    mem_limit_bytes: int = DEFAULT_MEM_LIMIT,
    overscan: str | None = AUTO,
    trim: str | None = AUTO,
) -> Image:
    """Master darkflat (darks at the flats' exposure, N.I.N.A. DARKFLAT): combined like darks.

    Without ``bias`` (the usual case) it still holds the bias and replaces bias and dark for flats of its
    exposure. Parameters and result as :func:`make_master_dark`, IMAGETYP 'MASTER DARKFLAT'.
    """
    return _make_dark_like("darkflat", paths, bias, method, sigma, inputs_note, mem_limit_bytes, overscan, trim)


def _flat_terms(
    paths: Sequence[Path | str],
    headers: Sequence[fits.Header],
    bias: Image | None,
    dark: Image | None,
    darkflat: Image | None,
    readout: Readout,
) -> tuple[list, list[str], bool, bool]:
    """What to subtract from each flat: (array, per-flat factors) terms, step lines, BIASSUB, DARKSUB."""
    steps: list[str] = []
    if darkflat is not None:
        if dark is not None or (bias is not None and not is_bias_subtracted(darkflat)):
            steps.append("darkflat replaces the master bias and dark for these flats")
        dark, bias = darkflat, (bias if is_bias_subtracted(darkflat) else None)
    check_dark_bias(bias, dark)
    _check_master(bias, readout, "master bias")
    _check_master(dark, readout, "master darkflat" if darkflat is not None else "master dark")
    check_overscan(readout.overscan is not None, readout.raw_shape, bias, dark, trimmed=True)
    terms: list = []
    if bias is not None:
        terms.append((bias.data, 1.0))
        steps.append(f"master bias subtracted ({bias.header.get('NCOMBINE', '?')} frames)")
    if dark is not None:
        factors = []
        for path, header in zip(paths, headers, strict=True):
            exptime = exposure_of(header)
            if exptime is None:
                raise CalibrationError(f"{Path(path).name}: a flat without EXPTIME/EXPOSURE cannot take a dark")
            factors.append(dark_scale(exptime, dark))
        terms.append((dark.data, factors))
        kind = str(dark.header.get("IMAGETYP", "MASTER DARK")).lower()
        scaled = sorted({round(f, 6) for f in factors})
        steps.append(f"{kind} subtracted, {exposure_of(dark.header):g} s scaled by {scaled}")
    biassub = bias is not None or (dark is not None and not is_bias_subtracted(dark))
    return terms, steps, biassub, dark is not None


def _normalise(data: np.ndarray, mosaic: bool) -> tuple[str, str, str]:
    """Normalise a combined flat in place: per plane (cube), per CFA position (mosaic) or by one median.

    Returns the FLATNORM value, its comment and the step line."""
    if data.ndim == 3:
        levels = []
        for plane in data:
            level = float(np.median(plane))
            if not math.isfinite(level) or level <= 0:
                raise CalibrationError(f"combined flat has a plane of median {level:g}; cannot normalise")
            plane /= np.float32(level)
            levels.append(level)
        shown = ", ".join(f"{c} {v:.6g}" for c, v in zip("RGB", levels, strict=True))
        return "median per plane", "each colour plane divided by its median", f"normalised per plane ({shown})"
    if mosaic:
        try:
            levels = normalise_per_position(data)
        except CfaError as exc:
            raise CalibrationError(f"combined flat: {exc}") from None
        shown = ", ".join(f"{v:.6g}" for v in levels)
        return (
            "median per CFA position",
            "each Bayer position to median 1",
            f"normalised per CFA position, medians (0,0) (0,1) (1,0) (1,1): {shown}",
        )
    norm = float(np.median(data))
    if not math.isfinite(norm) or norm <= 0:
        raise CalibrationError(f"combined flat has median {norm:g}; cannot normalise")
    data /= np.float32(norm)
    return "median", "master divided by its median: median = 1", f"normalised by its median {norm:.6g}"


@logged
def make_master_flat(
    paths: Sequence[Path | str],
    *,
    bias: Image | None,
    dark: Image | None = None,
    darkflat: Image | None = None,
    method: str = "average",
    sigma: float = 3.0,
    inputs_note: Sequence[str] = (),
    mem_limit_bytes: int = DEFAULT_MEM_LIMIT,
    overscan: str | None = AUTO,
    trim: str | None = AUTO,
    mosaic: bool | None = None,
) -> Image:
    """Master flat of one filter, normalised so its median is 1 (FLATNORM = 'median').

    Each flat is bias-subtracted (and dark-subtracted when a dark is given: a bias-subtracted dark is
    scaled to each flat's exposure), scaled by 1 / its own median, the stack combined, and the result
    divided by its median. A colour camera's flat is normalised per colour instead, so the flat lamp's colour
    and the channels' sensitivities are not imprinted on the lights: a Bayer mosaic per CFA position
    (FLATNORM = 'median per CFA position', each of the four positions of the 2x2 cell to median 1), a debayered
    3-plane cube per plane (FLATNORM = 'median per plane').

    Parameters
    ----------
    paths : sequence of path
        Raw flats of one filter.
    bias : Image or None
        Master bias.
    dark : Image, optional
        Master dark (BIASSUB = T to be scaled; one still holding the bias only at the flats' exposure and
        without ``bias``).
    darkflat : Image, optional
        Master darkflat at the flats' exposure; replaces bias and dark (which are then not used).
    method : {"average", "median"}
        Sigma-clipped average (``sigma``) or median of the scaled flats.
    sigma : float
        Clipping threshold for ``"average"``.
    inputs_note : sequence of str
        One line per input for the HISTORY.
    mem_limit_bytes : int
        Working memory for the combine.
    overscan, trim : str
        How each input is read first, as for :func:`make_master_bias`; the masters must be made the same way.
    mosaic : bool, optional
        The flats are Bayer mosaics. None: when the first flat's header states a Bayer pattern (BAYERPAT);
        True for a colour camera whose headers say nothing (the camera's configured pattern).

    Returns
    -------
    Image
        float32 with median 1 (per CFA position or plane for colour), IMAGETYP 'MASTER FLAT', FILTER, BIASSUB,
        DARKSUB, FLATNORM, OSCANSUB.

    Raises
    ------
    CalibrationError
        Flats of different filters; masters that do not fit (see :func:`service.calibrate.dark_scale` and
        :func:`service.calibrate.check_dark_bias`).
    """
    headers = _headers(paths)
    filters = {filter_key(header_filter(h)[0]) or "" for h in headers}
    if len(filters) > 1:
        raise CalibrationError(f"flat set mixes filters {sorted(filters)}: one master per filter")
    readout = _readout(paths, headers, overscan, trim)
    terms, steps, biassub, darksub = _flat_terms(paths, headers, bias, dark, darkflat, readout)
    data, stats = _combine(
        paths, readout, method=method, sigma=sigma, scale="median", subtract=terms, mem_limit_bytes=mem_limit_bytes
    )
    steps[:0] = _readout_step(readout, stats)
    levels = stats["medians"]
    steps.append(f"each flat scaled by 1/its median (levels {min(levels):.6g} to {max(levels):.6g})")
    steps.append(_combined(stats))
    if mosaic is None:
        try:
            mosaic = header_layout(headers[0])[2] is not None
        except CfaError as exc:
            raise CalibrationError(f"{Path(paths[0]).name}: {exc}") from None
    flatnorm, comment, step = _normalise(data, mosaic)
    steps.append(step)
    cards = {
        **_subtracted(biassub, darksub),
        "FLATNORM": (flatnorm, comment),
        "FLATLVL": (float(np.median(levels)), "[ADU] median level of the inputs"),
        **_readout_cards(readout),
    }
    return _master("flat", data, headers, stats, inputs_note, steps, cards)


def bad_pixel_mask(
    *,
    dark: Image | None = None,
    flat: Image | None = None,
    hot_sigma: float = 8.0,
    low: float = 0.5,
    high: float = 1.5,
) -> np.ndarray:
    """Bad pixels (True = bad) from a master dark (hot) and a master flat (dead or over-responsive).

    Parameters
    ----------
    dark : Image, optional
        Master dark: a pixel is hot when its value is above the median by more than ``hot_sigma`` robust
        standard deviations (MAD-based), which is the same test on the dark rate.
    flat : Image, optional
        Master flat: bad where the response, relative to its median, is below ``low`` or above ``high``.
    hot_sigma, low, high : float
        Thresholds.

    Returns
    -------
    numpy.ndarray of bool
        True where the pixel is bad, including non-finite values.
    """
    if dark is None and flat is None:
        raise ValueError("bad_pixel_mask needs a dark, a flat or both")
    if dark is not None and flat is not None and dark.data.shape != flat.data.shape:
        raise ValueError(f"dark shape {dark.data.shape} differs from flat shape {flat.data.shape}")
    shape = (dark if dark is not None else flat).data.shape
    bad = np.zeros(shape, dtype=bool)
    if dark is not None:
        values = dark.data
        finite = np.isfinite(values)
        level = float(np.median(values[finite])) if finite.any() else 0.0
        spread = float(mad_std(values[finite])) if finite.any() else 0.0
        if spread == 0.0 and finite.any():
            spread = float(np.std(values[finite]))
        bad |= ~finite
        if spread > 0:
            bad |= values > level + hot_sigma * spread
    if flat is not None:
        values = flat.data
        finite = np.isfinite(values)
        norm = float(np.median(values[finite])) if finite.any() else 1.0
        if not norm > 0:
            raise ValueError(f"flat median {norm:g}: not a flat")
        relative = values / np.float32(norm)
        bad |= ~((relative >= low) & (relative <= high))  # NaN compares False: bad
    return bad
