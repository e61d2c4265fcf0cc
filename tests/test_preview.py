"""Quick-look PNGs: they decode, have the promised size and orientation, and show contrast."""

from __future__ import annotations

import io

import numpy as np
import pytest
from nightshift.service.preview import (
    THUMBNAIL_SIZE,
    downsample,
    preview_png,
    side_by_side_png,
    stretch,
    thumbnail_jpeg,
)
from PIL import Image as PILImage


def _decode(png: bytes) -> np.ndarray:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with PILImage.open(io.BytesIO(png)) as im:
        assert im.mode == "L"
        return np.asarray(im)


def _sky(shape=(300, 512), level=1000.0, noise=5.0, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(level, noise, shape).astype(np.float32)


def test_preview_decodes_with_expected_size():
    pixels = _decode(preview_png(_sky(), max_width=128))
    assert pixels.shape == (75, 128)  # 512 / 4 wide, 300 / 4 tall
    assert _decode(preview_png(_sky(), max_width=1024)).shape == (300, 512)  # small frames are not enlarged


def test_big_frame_is_block_averaged_below_max_width():
    data = _sky(shape=(60, 2100))
    pixels = _decode(preview_png(data))
    assert pixels.shape == (20, 700)  # factor 3: the smallest integer that fits 1024
    small, _ = downsample(data, 3)
    assert small[0, 0] == pytest.approx(data[:3, :3].mean(), rel=1e-6)


def test_title_adds_a_caption_strip():
    pixels = _decode(preview_png(_sky(), max_width=256, title="NGC 6939 V 300s stack"))
    assert pixels.shape == (150 + 14, 256)
    assert pixels[:14].max() > 200  # text drawn


def test_zscale_is_not_degenerate_on_a_flat_ish_image():
    data = _sky()
    out = stretch(data, method="zscale")
    assert out.dtype == np.uint8 and out.shape == data.shape
    assert out.std() > 30
    assert np.mean((out == 0) | (out == 255)) < 0.1  # noise spread over the grey levels, not saturated
    assert np.corrcoef(out.ravel().astype(float), data.ravel())[0, 1] > 0.9  # brighter stays brighter


def test_percentile_stretch_clips_the_extremes():
    data = np.tile(np.arange(1000, dtype=np.float32), (20, 1))
    out = stretch(data, method="percentile")
    assert out[0, 0] == 0 and out[0, -1] == 255
    assert 100 < out[0, 500] < 155
    with pytest.raises(ValueError):
        stretch(data, method="asinh-magic")


def test_masked_nan_and_constant_pixels():
    data = _sky()
    data[10:20, 10:20] = 1e9  # a masked blob must not flatten the stretch
    mask = np.zeros(data.shape, dtype=bool)
    mask[10:20, 10:20] = True
    data[50, 50] = np.nan
    out = stretch(data, mask=mask)
    assert (out[10:20, 10:20] == 0).all() and out[50, 50] == 0
    assert out[100:200].std() > 30
    assert (stretch(np.full((32, 32), 7.0)) == 0).all()
    assert (stretch(np.full((32, 32), np.nan)) == 0).all()


def test_fits_row_zero_is_shown_at_the_bottom():
    data = _sky(shape=(64, 64))
    data[0, :] = 5000.0
    pixels = _decode(preview_png(data))
    assert (pixels[-1] == 255).all() and pixels[0].mean() < 255


def test_side_by_side_fits_max_width_and_shows_both():
    raw = np.random.default_rng(1).integers(900, 1100, (400, 600)).astype(np.uint16)
    calibrated = _sky(shape=(400, 600))
    calibrated[200:, :] += 50.0  # a step only the calibrated panel has
    pixels = _decode(side_by_side_png(raw, calibrated, max_width=600))
    assert pixels.shape[1] <= 600
    assert pixels.shape == (14 + 133, 200 + 4 + 200)  # each panel downsampled by 3, captioned
    left, right = pixels[14:, :200], pixels[14:, 204:]
    assert abs(left[:67].mean() - left[67:].mean()) < 20
    assert right[:60].mean() > right[-60:].mean() + 100  # the brighter half (high rows) shown on top


def test_thumbnail_is_a_small_jpeg_of_the_preview():
    calibrated = _sky(shape=(1024, 1024), noise=20.0)
    calibrated[700:720, 300:320] += 5000.0  # a bright star, high in the frame (shown near the top)
    preview = side_by_side_png(calibrated, calibrated)  # 1200 px wide, noisy: a hard case for JPEG
    thumb = thumbnail_jpeg(preview)
    with PILImage.open(io.BytesIO(preview)) as big, PILImage.open(io.BytesIO(thumb)) as small:
        assert small.format == "JPEG" and small.mode == "L"
        assert max(small.size) == THUMBNAIL_SIZE
        assert abs(small.size[0] / small.size[1] - big.size[0] / big.size[1]) < 0.01
        scale = small.size[0] / big.size[0]
        pixels = np.asarray(small)
    assert len(thumb) < 60_000 < len(preview)
    # the star, where the preview has it: panels of 512 px (block averages of 2), row 0 at the bottom, captioned
    y, x = round((14 + (1024 - 710) / 2) * scale), round(310 / 2 * scale)
    assert pixels[y - 2 : y + 3, x - 2 : x + 3].mean() > 200
    assert np.median(pixels) < 200


def test_thumbnail_keeps_colour_and_never_enlarges():
    rgb = np.zeros((100, 150, 3), dtype=np.uint8)
    rgb[..., 0] = 200  # red
    buffer = io.BytesIO()
    PILImage.fromarray(rgb).save(buffer, format="PNG")
    with PILImage.open(io.BytesIO(thumbnail_jpeg(buffer.getvalue()))) as small:
        assert small.mode == "RGB" and small.size == (150, 100)
        r, g, b = np.asarray(small).reshape(-1, 3).mean(axis=0)
    assert r > 180 and g < 20 and b < 20
