"""Colour quick-looks: a colour frame or stack as an RGB PNG with an automatic stretch and a neutral background.

Each plane is block-averaged to the screen width (:func:`nightshift.service.preview.downsample`); the sky of each
plane is measured (median, MAD noise) and subtracted, so the background is neutral grey whatever the sky's or the
camera's colour; then one stretch is applied to all three planes through their common intensity (an arcsinh
stretch in the manner of Lupton et al. 2004), which keeps each star's colour (its R:G:B ratios) instead of
stretching the channels apart. Row 0 is shown at the bottom, as the grey previews do.
"""

from __future__ import annotations

import math

import numpy as np
from astropy.stats import mad_std
from nightshift.service.preview import _caption, _png, downsample

__all__ = ["colour_preview_png", "colour_side_by_side_png", "colour_stretch"]

#: Values sampled per plane to measure its sky.
_SAMPLES = 250_000
#: Display level of the (neutral) sky, so the noise around it stays visible.
_PEDESTAL = 0.12
#: The intensity (in sky noise) where the stretch turns from linear to logarithmic.
_SOFTENING = 3.0
_GAP = 4


def _sky(plane: np.ndarray, bad: np.ndarray | None) -> tuple[float, float]:
    step = max(1, math.isqrt(max(1, plane.size // _SAMPLES)))
    sample = plane[::step, ::step]
    good = np.isfinite(sample)
    if bad is not None:
        good &= ~bad[::step, ::step]
    values = sample[good]
    if values.size == 0:
        return 0.0, 1.0
    level = float(np.median(values))
    noise = float(mad_std(values))
    return level, noise if noise > 0 else max(float(np.std(values)), 1e-6)


def colour_stretch(rgb: np.ndarray, *, mask: np.ndarray | None = None) -> np.ndarray:
    """Map three planes to an 8-bit RGB picture with a neutral background.

    Parameters
    ----------
    rgb : ndarray
        (3, rows, columns) R, G, B, any real dtype.
    mask : ndarray of bool, optional
        (rows, columns), True where a pixel is bad: left out of the sky and shown black (as are NaN pixels).

    Returns
    -------
    ndarray of uint8
        (rows, columns, 3).
    """
    rgb = np.asarray(rgb, dtype=np.float32)
    bad = None if mask is None else np.asarray(mask, dtype=bool)
    work = np.empty_like(rgb)
    noises = []
    for c in range(3):
        level, noise = _sky(rgb[c], bad)
        work[c] = rgb[c] - np.float32(level)  # every plane's sky at 0: a neutral background
        noises.append(noise)
    intensity = work.mean(axis=0)
    sigma = float(np.mean(noises)) / math.sqrt(3.0)
    finite = np.isfinite(intensity) if bad is None else np.isfinite(intensity) & ~bad
    top = float(np.percentile(intensity[finite], 99.95)) if finite.any() else 1.0
    soft = np.float32(1.0 / (_SOFTENING * max(sigma, 1e-6)))
    scale = np.float32(1.0 / max(math.asinh(float(soft) * max(top, 1e-6)), 1e-6))
    # gain(I) = asinh(soft I) / (I asinh(soft top)), continuous through I = 0 where it is soft / asinh(soft top)
    with np.errstate(invalid="ignore", divide="ignore"):
        arg = soft * intensity
        gain = np.where(np.abs(arg) > 1e-4, np.arcsinh(arg) / np.where(arg == 0, 1, arg), np.float32(1.0))
    gain = gain * soft * scale
    shown = work * gain[None]
    shown *= np.float32(1.0 - _PEDESTAL)
    shown += np.float32(_PEDESTAL)
    brightest = shown.max(axis=0)
    over = brightest > 1.0
    if over.any():  # keep the hue of a star brighter than white: scale its three planes together
        shown[:, over] /= brightest[over]
    np.clip(shown, 0.0, 1.0, out=shown)
    out = np.rint(shown * np.float32(255.0))
    out[:, ~np.isfinite(out).all(axis=0)] = 0.0
    if bad is not None:
        out[:, bad] = 0.0
    return np.ascontiguousarray(np.moveaxis(out, 0, -1).astype(np.uint8))


def _panel(rgb: np.ndarray, mask: np.ndarray | None, max_width: int) -> np.ndarray:
    factor = max(1, math.ceil(rgb.shape[-1] / max(1, max_width)))
    planes, small_mask = [], None
    for c in range(3):
        small, m = downsample(rgb[c], factor, mask=mask)
        planes.append(small)
        small_mask = m if small_mask is None or m is None else (small_mask | m)
    return np.flipud(colour_stretch(np.stack(planes), mask=small_mask))


def _rgb_caption(width: int, text: str) -> np.ndarray:
    return np.repeat(_caption(width, text)[:, :, None], 3, axis=2)


def colour_preview_png(
    rgb: np.ndarray, *, mask: np.ndarray | None = None, max_width: int = 1024, title: str | None = None
) -> bytes:
    """An RGB PNG quick-look of a colour frame or stack (3, rows, columns), at most ``max_width`` pixels wide.

    See :func:`colour_stretch`; with ``title`` a 14-pixel caption strip is added above it.
    """
    pixels = _panel(rgb, mask, max_width)
    if title:
        pixels = np.vstack([_rgb_caption(pixels.shape[1], title), pixels])
    return _png(pixels)


def colour_side_by_side_png(
    raw: np.ndarray, rgb: np.ndarray, *, mask: np.ndarray | None = None, max_width: int = 1200
) -> bytes:
    """A raw frame (the mosaic as recorded, grey) beside its calibrated colour version, each stretched on its own."""
    from nightshift.service.preview import _panel as grey_panel

    panel_width = max(1, (max_width - _GAP) // 2)
    raw2d = raw if raw.ndim == 2 else np.mean(raw, axis=0)
    left = np.repeat(grey_panel(raw2d, None, panel_width, "zscale")[:, :, None], 3, axis=2)
    right = _panel(rgb, mask, panel_width)
    height = max(left.shape[0], right.shape[0])
    canvas = np.zeros((14 + height, left.shape[1] + _GAP + right.shape[1], 3), dtype=np.uint8)
    canvas[:14, : left.shape[1]] = _rgb_caption(left.shape[1], "raw")
    canvas[:14, left.shape[1] + _GAP :] = _rgb_caption(right.shape[1], "calibrated")
    canvas[14 : 14 + left.shape[0], : left.shape[1]] = left
    canvas[14 : 14 + right.shape[0], left.shape[1] + _GAP :] = right
    return _png(canvas)
