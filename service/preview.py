"""Quick-look PNGs: how a person checks a frame at a glance.

Frames are block-averaged down to a screen width, stretched to 8-bit grayscale (zscale, or a percentile range as
in the reference notebook), shown with FITS row 0 at the bottom (as ``imshow(origin="lower")`` does) and encoded
with Pillow. The functions return PNG bytes; writing them (atomically) is the caller's job.
:func:`thumbnail_jpeg` makes a small JPEG of such a preview for pages that show many of them (the night report).
"""

from __future__ import annotations

import io
import math

import numpy as np
from astropy.visualization import ZScaleInterval
from PIL import Image as PILImage
from PIL import ImageDraw

__all__ = ["downsample", "preview_png", "side_by_side_png", "stretch", "thumbnail_jpeg"]

#: Values sampled to choose the stretch limits (a strided subset of the frame).
_STRETCH_SAMPLES = 250_000
#: Height (pixels) of the caption strip above a titled preview.
_CAPTION = 14
#: Gap (pixels) between the panels of a side-by-side preview.
_GAP = 4
#: Longer side (pixels) of a thumbnail: a side-by-side preview of 1200 px becomes two panels of ~240 px.
THUMBNAIL_SIZE = 480
#: JPEG quality of a thumbnail: a noisy sky of 480 x 246 px is ~30 kB, stars and clouds still plain to see.
THUMBNAIL_QUALITY = 70


def downsample(
    data: np.ndarray, factor: int, *, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Block-average ``data`` by an integer ``factor`` (trailing rows/columns that do not fill a block are dropped).

    Masked and non-finite pixels are left out of each block's mean; a block with no good pixel is NaN and, when a
    mask was given or NaN present, masked in the returned mask.
    """
    if factor <= 1:
        return np.asarray(data, dtype=np.float32), mask
    h, w = (data.shape[0] // factor) * factor, (data.shape[1] // factor) * factor
    block = np.asarray(data[:h, :w], dtype=np.float32)
    good = np.isfinite(block)
    if mask is not None:
        good &= ~np.asarray(mask[:h, :w], dtype=bool)
    # summing the factor x factor strided views is ~10x faster than a mean over reshaped block axes
    views = [(i, j) for i in range(factor) for j in range(factor)]
    if good.all():
        acc = np.zeros((h // factor, w // factor), dtype=np.float32)
        for i, j in views:
            acc += block[i::factor, j::factor]
        acc *= np.float32(1.0 / (factor * factor))
        return acc, None
    clean = np.where(good, block, np.float32(0.0))
    summed = np.zeros((h // factor, w // factor), dtype=np.float32)
    count = np.zeros(summed.shape, dtype=np.int32)
    for i, j in views:
        summed += clean[i::factor, j::factor]
        count += good[i::factor, j::factor]
    small = np.full(summed.shape, np.nan, dtype=np.float32)
    np.divide(summed, count, out=small, where=count > 0)
    return small, count == 0


def _limits(values: np.ndarray, method: str) -> tuple[float, float]:
    if method == "zscale":
        lo, hi = ZScaleInterval().get_limits(values)
    elif method == "percentile":
        lo, hi = np.percentile(values, [1.0, 99.5])
    else:
        raise ValueError(f"unknown stretch {method!r} (use 'zscale' or 'percentile')")
    lo, hi = float(lo), float(hi)
    if not (hi > lo):  # flat image or a degenerate fit: fall back to the full range
        lo, hi = float(values.min()), float(values.max())
    return lo, hi


def stretch(data: np.ndarray, *, method: str = "zscale", mask: np.ndarray | None = None) -> np.ndarray:
    """Map an image to 8-bit grayscale.

    Parameters
    ----------
    data : ndarray
        2-D image, any real dtype.
    method : {"zscale", "percentile"}
        zscale (IRAF's, from astropy.visualization) or the 1st to 99.5th percentile of the good pixels.
    mask : ndarray of bool, optional
        True where a pixel is bad: left out of the limits and shown black (as are NaN pixels).

    Returns
    -------
    ndarray of uint8
        Same shape as ``data``; all zeros when there is no good pixel or no contrast at all.
    """
    data = np.asarray(data)
    step = max(1, math.isqrt(max(1, data.size // _STRETCH_SAMPLES)))
    sample = np.asarray(data[::step, ::step], dtype=np.float32)
    good = np.isfinite(sample)
    if mask is not None:
        good &= ~np.asarray(mask[::step, ::step], dtype=bool)
    values = sample[good]
    out = np.zeros(data.shape, dtype=np.uint8)
    if values.size == 0:
        return out
    lo, hi = _limits(values, method)
    if not (hi > lo):
        return out
    scaled = (np.asarray(data, dtype=np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    np.clip(scaled, 0.0, 255.0, out=scaled)
    bad = ~np.isfinite(scaled)
    if mask is not None:
        bad |= np.asarray(mask, dtype=bool)
    scaled[bad] = 0.0
    np.rint(scaled, out=scaled)
    return scaled.astype(np.uint8)


def _panel(data: np.ndarray, mask: np.ndarray | None, max_width: int, method: str) -> np.ndarray:
    """Downsampled, stretched, display-oriented (row 0 at the bottom) 8-bit image."""
    factor = max(1, math.ceil(data.shape[1] / max(1, max_width)))
    small, small_mask = downsample(data, factor, mask=mask)
    return np.flipud(stretch(small, method=method, mask=small_mask))


def _caption(width: int, text: str) -> np.ndarray:
    strip = PILImage.new("L", (width, _CAPTION), 0)
    ImageDraw.Draw(strip).text((2, 1), text, fill=255)
    return np.asarray(strip)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def preview_png(
    data: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    max_width: int = 1024,
    title: str | None = None,
    method: str = "zscale",
) -> bytes:
    """A grayscale PNG quick-look of one image (a light or a stack).

    The image is block-averaged by the smallest integer factor that makes it at most ``max_width`` pixels wide,
    stretched (see :func:`stretch`) and shown with FITS row 0 at the bottom. With ``title``, a caption strip of
    14 pixels is added above it.
    """
    pixels = _panel(data, mask, max_width, method)
    if title:
        pixels = np.vstack([_caption(pixels.shape[1], title), pixels])
    return _png(pixels)


def side_by_side_png(
    raw: np.ndarray,
    calibrated: np.ndarray,
    *,
    max_width: int = 1200,
    mask: np.ndarray | None = None,
    method: str = "zscale",
) -> bytes:
    """Raw and calibrated versions of a light next to each other, each stretched on its own, captioned.

    The whole PNG is at most ``max_width`` pixels wide; ``mask`` applies to the calibrated frame.
    """
    panel_width = max(1, (max_width - _GAP) // 2)
    left = _panel(raw, None, panel_width, method)
    right = _panel(calibrated, mask, panel_width, method)
    height = max(left.shape[0], right.shape[0])
    canvas = np.zeros((_CAPTION + height, left.shape[1] + _GAP + right.shape[1]), dtype=np.uint8)
    canvas[:_CAPTION, : left.shape[1]] = _caption(left.shape[1], "raw")
    canvas[:_CAPTION, left.shape[1] + _GAP :] = _caption(right.shape[1], "calibrated")
    canvas[_CAPTION : _CAPTION + left.shape[0], : left.shape[1]] = left
    canvas[_CAPTION : _CAPTION + right.shape[0], left.shape[1] + _GAP :] = right
    return _png(pixels=canvas)


def thumbnail_jpeg(image: bytes, *, max_size: int = THUMBNAIL_SIZE, quality: int = THUMBNAIL_QUALITY) -> bytes:
    """A small JPEG of a preview, for a page that shows many.

    Parameters
    ----------
    image : bytes
        The preview, PNG (or any format Pillow reads); grayscale stays grayscale, anything else becomes RGB.
    max_size : int
        The thumbnail's longer side at most, in pixels; a smaller image is not enlarged.
    quality : int
        JPEG quality, 1 to 95.

    Returns
    -------
    bytes
        The JPEG file.
    """
    with PILImage.open(io.BytesIO(image)) as im:
        small = im.convert("L" if im.mode in ("1", "L", "LA") else "RGB")
    small.thumbnail((max_size, max_size), PILImage.Resampling.LANCZOS)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()
