"""What a light's pixels look like when they do not look like a light: a flat (smooth, bright, no stars) or a bias
(no exposure, no signal).

Capture programs label frames wrongly (a flat sequence run with the light preset writes ``IMAGETYP = 'Light
Frame'``). nightshift keeps a frame as its header says, but says what its pixels look like and how to file it
otherwise: :func:`looks_like` is the judgement, :func:`override_hint` the filename override that would fix it.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import PurePath

import numpy as np
from astropy.stats import mad_std

__all__ = ["Lookalike", "looks_like", "override_hint"]

#: A flat's level is at least this share of the camera's full scale.
FLAT_LEVEL = 0.1
#: A flat's pixel-to-pixel scatter about its smooth background is under this share of its level.
FLAT_ROUGHNESS = 0.05
#: Sources above 5 sigma (4 connected binned pixels) a frame may hold and still look like a flat.
MAX_STARS = 3
_FULL_SCALE = {"uint8": 255.0, "int8": 255.0, "uint16": 65535.0, "int16": 65535.0}


@dataclass(frozen=True)
class Lookalike:
    """``kind`` the frame looks like (``"flat"`` or ``"bias"``), and ``why``, in numbers."""

    kind: str
    why: str


def _binned(data: np.ndarray, target: int = 1024) -> np.ndarray:
    """Block-averaged to at most ~``target`` pixels a side (stars stay blobs, hot pixels fade)."""
    factor = max(1, int(np.ceil(max(data.shape) / target)))
    h, w = (data.shape[0] // factor) * factor, (data.shape[1] // factor) * factor
    block = data[:h, :w].reshape(h // factor, factor, w // factor, factor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a block all NaN stays NaN
        return np.ascontiguousarray(np.nanmean(block, axis=(1, 3)), dtype=np.float32)


def _sources(data: np.ndarray) -> tuple[int, float, float]:
    """(sources above 5 sigma, background level, pixel-to-pixel scatter) of a binned frame.

    The scatter is that of differences between neighbouring pixels (divided by sqrt 2): vignetting and other
    large-scale structure do not count, noise and stars do.
    """
    import sep

    mesh = max(16, min(64, min(data.shape) // 8))
    bkg = sep.Background(data, bw=mesh, bh=mesh)
    residual = data - bkg.back()
    scatter = float(mad_std(np.diff(data, axis=1), ignore_nan=True)) / np.sqrt(2.0)
    try:
        found = sep.extract(residual, 5.0, err=max(scatter, 1e-3), minarea=4)
        n = len(found)
    except Exception:  # sep's pixel-buffer limit on a frame full of structure: it is no flat
        n = 1000
    return n, float(bkg.globalback), scatter


def looks_like(data: np.ndarray, *, exptime: float | None, dtype: str = "uint16") -> Lookalike | None:
    """What a frame labelled light looks like, when that is not a light; None when it may well be one.

    Parameters
    ----------
    data : numpy.ndarray
        The raw pixels (never modified).
    exptime : float or None
        Exposure in seconds from the header.
    dtype : str
        The stored pixel type (sets the full scale: 65535 for 16-bit).

    Returns
    -------
    Lookalike or None
        ``"bias"`` for a zero exposure whose pixels hold no signal (scatter like read noise, no sources);
        ``"flat"`` for a bright (at least :data:`FLAT_LEVEL` of full scale), smooth (scatter under
        :data:`FLAT_ROUGHNESS` of the level) frame with no stars.
    """
    finite = np.isfinite(data)
    if not finite.any():
        return None
    sample = data[:: max(1, data.shape[0] // 256), :: max(1, data.shape[1] // 256)]
    level = float(np.nanmedian(sample))
    zero = exptime is not None and exptime <= 0
    full = _FULL_SCALE.get(dtype, float(np.nanmax(sample)) or 1.0)
    if not zero and level < FLAT_LEVEL * full:
        return None
    binned = _binned(np.where(finite, data, np.nan).astype(np.float32, copy=False))
    binned = np.where(np.isfinite(binned), binned, np.float32(level))
    n, background, scatter = _sources(binned)
    if zero and n <= MAX_STARS:
        return Lookalike("bias", f"zero exposure, level {level:.0f} ADU, scatter {scatter:.1f} ADU, no sources")
    if not zero and n <= MAX_STARS and scatter < FLAT_ROUGHNESS * max(background, 1.0):
        share = level / full
        return Lookalike(
            "flat",
            f"smooth and bright: median {level:.0f} ADU ({share:.0%} of full scale), scatter {scatter:.1f} ADU, "
            f"{n} sources",
        )
    return None


def override_hint(path: str, kind: str) -> str:
    """A ``[classify] overrides`` line that would file this frame (and its numbered siblings) as ``kind``."""
    name = PurePath(path).name
    glob = re.sub(r"\d+", "*", name)
    glob = re.sub(r"\*+", "*", glob)
    return f'[classify] overrides = [{{ glob = "{glob}", kind = "{kind}" }}]'
