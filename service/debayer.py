"""Debayer a calibrated mosaic into three colour planes (R, G, B), with OpenCV.

Demosaicing comes after calibration (bias, dark and flat are taken out pixel by pixel on the mosaic) and after
the mosaic's bad pixels were filled from neighbours of their own colour
(:func:`nightshift.service.cfa.fill_from_same_colour`). The pattern passed here is the *array* pattern, the one
that starts at ``data[0, 0]`` (:func:`nightshift.service.cfa.array_pattern` works it out from BAYERPAT, the
offsets and ROWORDER).

Methods (``bench/debayer.py`` measures them against the simulator's truth):

``"bilinear"`` (the default)
    Bilinear interpolation as two normalised convolutions per plane with OpenCV's ``filter2D`` on float32: exact
    for float data (no rounding, negative values kept), linear (a star's flux and colour are kept, which
    photometry and stacking need), and the fastest.
``"opencv"``, ``"opencv-ea"``, ``"opencv-vng"``
    OpenCV's own ``cvtColor`` Bayer conversions: bilinear, edge-aware, variable number of gradients. They take only
    8- or 16-bit integers (VNG only 8-bit), so the frame is mapped onto that range and back: a quantisation
    step of (max - min) / 65535 (or / 255) ADU.
``"cd-bilinear"``, ``"malvar"``, ``"menon"``
    ``colour-demosaicing``'s bilinear, Malvar (2004) and Menon (2007) methods on float64 data, when that package
    is installed (optional, for comparison; not a dependency of nightshift).
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
from nightshift.service.cfa import PATTERNS, channel_of

__all__ = ["DEFAULT_METHOD", "METHODS", "debayer"]

DEFAULT_METHOD = "bilinear"
#: Bilinear kernels: a red or blue sample fills its 3x3 neighbourhood, a green sample its 4 neighbours.
_RB_KERNEL = np.array([[0.25, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 0.25]], dtype=np.float32)
_G_KERNEL = np.array([[0.0, 0.25, 0.0], [0.25, 1.0, 0.25], [0.0, 0.25, 0.0]], dtype=np.float32)


def _bilinear(mosaic: np.ndarray, pattern: str) -> np.ndarray:
    h, w = mosaic.shape
    out = np.empty((3, h, w), dtype=np.float32)
    sparse = np.empty((h, w), dtype=np.float32)  # one plane's samples, zeros elsewhere
    cell = channel_of(pattern)
    for plane, kernel in ((0, _RB_KERNEL), (1, _G_KERNEL), (2, _RB_KERNEL)):
        sparse.fill(0.0)
        for dy in range(2):
            for dx in range(2):
                if cell[dy, dx] == plane:
                    sparse[dy::2, dx::2] = mosaic[dy::2, dx::2]
        # reflecting about the edge pixel keeps the CFA's parity, so edges are interpolated like the inside;
        # a separate destination (not in place) lets OpenCV's threads work without a hidden copy
        cv2.filter2D(sparse, cv2.CV_32F, kernel, dst=out[plane], borderType=cv2.BORDER_REFLECT_101)
    return out


def _opencv(mosaic: np.ndarray, pattern: str, suffix: str, bits: int) -> np.ndarray:
    code = getattr(cv2, f"COLOR_Bayer{pattern}2RGB{suffix}")
    lo, hi = float(mosaic.min()), float(mosaic.max())
    top = float(2**bits - 1)
    scale = top / (hi - lo) if hi > lo else 1.0
    work = (mosaic - np.float32(lo)) * np.float32(scale)
    np.rint(work, out=work)
    np.clip(work, 0.0, top, out=work)
    rgb = cv2.cvtColor(work.astype(np.uint16 if bits == 16 else np.uint8), code)
    out = np.moveaxis(rgb, -1, 0).astype(np.float32)
    out *= np.float32(1.0 / scale)
    out += np.float32(lo)
    return out


def _colour_demosaicing(name: str) -> Callable[[np.ndarray, str], np.ndarray]:
    def run(mosaic: np.ndarray, pattern: str) -> np.ndarray:
        import colour_demosaicing as cd  # optional: only for comparing methods

        func = {
            "cd-bilinear": cd.demosaicing_CFA_Bayer_bilinear,
            "malvar": cd.demosaicing_CFA_Bayer_Malvar2004,
            "menon": cd.demosaicing_CFA_Bayer_Menon2007,
        }[name]
        rgb = func(mosaic.astype(np.float64), pattern)
        return np.ascontiguousarray(np.moveaxis(rgb, -1, 0), dtype=np.float32)

    return run


#: Every method by name: function(mosaic float32 2-D, array pattern) -> (3, rows, columns) float32.
METHODS: dict[str, Callable[[np.ndarray, str], np.ndarray]] = {
    "bilinear": _bilinear,
    "opencv": lambda m, p: _opencv(m, p, "", 16),
    "opencv-ea": lambda m, p: _opencv(m, p, "_EA", 16),
    "opencv-vng": lambda m, p: _opencv(m, p, "_VNG", 8),
    "cd-bilinear": _colour_demosaicing("cd-bilinear"),
    "malvar": _colour_demosaicing("malvar"),
    "menon": _colour_demosaicing("menon"),
}


def debayer(mosaic: np.ndarray, pattern: str, *, method: str = DEFAULT_METHOD) -> np.ndarray:
    """Three colour planes from a calibrated mosaic.

    Parameters
    ----------
    mosaic : ndarray
        2-D mosaic, any real dtype (used as float32), without NaN: fill bad pixels first. Not modified.
    pattern : str
        The array pattern, one of ``RGGB``, ``GRBG``, ``GBRG``, ``BGGR``: the colours of ``mosaic[0, 0]``,
        ``[0, 1]``, ``[1, 0]``, ``[1, 1]``.
    method : str
        One of :data:`METHODS` (default :data:`DEFAULT_METHOD`).

    Returns
    -------
    ndarray
        float32 (3, rows, columns): R, G, B.

    Raises
    ------
    ValueError
        An unknown pattern or method, a mosaic that is not 2-D, or one with non-finite pixels.
    """
    if pattern not in PATTERNS:
        raise ValueError(f"Bayer pattern {pattern!r} is not one of {', '.join(PATTERNS)}")
    if method not in METHODS:
        raise ValueError(f"debayer method {method!r} is not one of {', '.join(METHODS)}")
    mosaic = np.asarray(mosaic, dtype=np.float32)
    if mosaic.ndim != 2:
        raise ValueError(f"a mosaic is 2-D, got shape {mosaic.shape}")
    if not np.isfinite(mosaic).all():
        raise ValueError("the mosaic has NaN or infinite pixels: fill them before debayering")
    return METHODS[method](np.ascontiguousarray(mosaic), pattern)
