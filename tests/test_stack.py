"""Stacking: the live mean, its saved state, and the final sigma-clipped combine from aligned frames on disk."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.stats import sigma_clipped_stats
from nightshift.service.frame import Image
from nightshift.service.simulate import GAIN, READ_NOISE, SimConfig, plan_night
from nightshift.service.stack import LiveStack, final_combine

SHAPE = (128, 160)


def _frames(n: int, *, sky: float = 200.0, noise: float = 10.0, seed: int = 0) -> list[Image]:
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        data = rng.normal(sky, noise, SHAPE).astype(np.float32)
        frames.append(Image(data, fits.Header({"EXPTIME": 60.0, "FILENAME": f"light_{i:03d}.fits"})))
    return frames


def _write(image: Image, path) -> None:
    """An aligned frame as the daemon writes it: float32 primary image, uint8 MASK extension."""
    hdus = [fits.PrimaryHDU(image.data.astype(np.float32), image.header)]
    if image.mask is not None:
        hdus.append(fits.ImageHDU(image.mask.astype(np.uint8), name="MASK"))
    fits.HDUList(hdus).writeto(path)


def _reference_header() -> fits.Header:
    return fits.Header({"OBJECT": "NGC 6939", "EXPTIME": 60.0, "CTYPE1": "RA---TAN", "CRPIX1": 80.0})


def test_live_stack_is_the_mean_of_good_pixels():
    frames = _frames(4)
    frames[1].mask = np.zeros(SHAPE, dtype=bool)
    frames[1].mask[10:20, 30:40] = True
    frames[1].data[10:20, 30:40] = 1e6  # garbage under the mask
    frames[2].data[5, 5] = np.nan  # a non-finite pixel counts as masked
    for f in frames[1:]:
        f.mask = np.zeros(SHAPE, dtype=bool) if f.mask is None else f.mask
        f.mask[0, :3] = True  # a pixel no frame covers: (0, 0..2) also masked in frame 0 below
    frames[0].mask = np.zeros(SHAPE, dtype=bool)
    frames[0].mask[0, :3] = True
    stack = LiveStack(SHAPE)
    for f in frames:
        stack.add(f)
    cube = np.ma.masked_array([f.data for f in frames], mask=[f.mask | ~np.isfinite(f.data) for f in frames])
    expected = cube.mean(axis=0)
    result = stack.image(_reference_header())
    assert result.data.dtype == np.float32
    assert np.allclose(result.data[~result.mask], expected.filled(np.nan)[~result.mask], rtol=1e-6)
    assert result.mask[0, :3].all() and np.isnan(result.data[0, :3]).all()
    assert result.mask.sum() == 3
    assert stack.count[15, 35] == 3 and stack.count[5, 5] == 3 and stack.count[50, 50] == 4
    assert stack.n == 4 and stack.exptime_total == 240.0
    h = result.header
    assert h["NCOMBINE"] == 4 and h["EXPTOTAL"] == 240.0 and h["CTYPE1"] == "RA---TAN"
    assert [str(c) for c in h["HISTORY"]] == [f"stacked light_{i:03d}.fits" for i in range(4)]
    assert "HISTORY" not in stack.image(_reference_header(), history=False).header  # the caller writes its own


def test_live_stack_refuses_a_frame_of_another_shape():
    stack = LiveStack(SHAPE)
    with pytest.raises(ValueError, match="shape"):
        stack.add(Image(np.zeros((10, 10), dtype=np.float32), fits.Header()))
    assert stack.n == 0


def test_live_stack_state_round_trip(tmp_path):
    stack = LiveStack(SHAPE)
    for f in _frames(3):
        stack.add(f)
    path = tmp_path / "live.npz"
    stack.save_state(path)
    assert [p.name for p in tmp_path.iterdir()] == ["live.npz"]  # no temporary file left behind
    back = LiveStack.load_state(path)
    assert back.shape == SHAPE and back.n == 3 and back.exptime_total == 180.0
    assert back.frames == stack.frames
    assert back.sum.dtype == np.float32 and back.count.dtype == np.int32
    assert np.array_equal(back.sum, stack.sum) and np.array_equal(back.count, stack.count)
    more = _frames(1, seed=9)[0]
    back.add(more)
    stack.add(more)
    assert np.array_equal(back.image(fits.Header()).data, stack.image(fits.Header()).data)


def test_stack_noise_falls_as_sqrt_n(tmp_path):
    """Same sky and stars, independent noise: the stack's background noise is single / sqrt(N) within 10%."""
    plan = plan_night(SimConfig(size=256, n_light=1, filters=("V",), light_exptimes=(300.0,), cloudy=0))
    frame = plan.by_kind("light")[0]
    signal = plan.truth_signal(frame)
    sigma = np.sqrt(np.maximum(signal, 0) / GAIN + READ_NOISE**2)
    n = 9
    rng = np.random.default_rng(4)
    stack = LiveStack(signal.shape)
    paths = []
    for i in range(n):
        data = (signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)).astype(np.float32)
        image = Image(data, fits.Header({"EXPTIME": 300.0}))
        stack.add(image)
        paths.append(tmp_path / f"aligned_{i}.fits")
        _write(image, paths[-1])
        if i == 0:
            single = sigma_clipped_stats(data - signal)[2]
    live = sigma_clipped_stats(stack.image(fits.Header()).data - signal)[2]
    final = sigma_clipped_stats(final_combine(paths, header=fits.Header()).data - signal)[2]
    assert live == pytest.approx(single / np.sqrt(n), rel=0.10)
    assert final == pytest.approx(single / np.sqrt(n), rel=0.10)


def test_final_combine_removes_a_satellite_trail_the_live_mean_keeps(tmp_path):
    frames = _frames(8, seed=1)
    for i, f in enumerate(frames):
        f.data += np.float32(10.0 * i)  # the sky brightens through the night
    rows = np.arange(SHAPE[0])
    trail_cols = (rows * 0.7 + 20).astype(int)
    frames[3].data[rows, trail_cols] += 3000.0
    frames[3].data[rows, trail_cols + 1] += 3000.0
    stack = LiveStack(SHAPE)
    paths = []
    for i, f in enumerate(frames):
        stack.add(f)
        paths.append(tmp_path / f"aligned_{i}.fits")
        _write(f, paths[-1])
    live = stack.image(_reference_header())
    final = final_combine(paths, header=_reference_header())
    sky = float(np.median(final.data))
    noise = 10.0 / np.sqrt(8)
    assert np.median(live.data[rows, trail_cols]) > sky + 300  # 3000 / 8 left in the mean
    assert abs(np.median(final.data[rows, trail_cols]) - sky) < 2 * noise
    assert np.max(final.data[rows, trail_cols]) < sky + 6 * noise
    assert sky == pytest.approx(200.0 + 35.0, abs=1.0)  # the frames' median sky level is kept
    h = final.header
    assert h["NCOMBINE"] == 8 and h["EXPTOTAL"] == 480.0 and h["CRPIX1"] == 80.0
    assert [str(c) for c in h["HISTORY"]] == [f"stacked aligned_{i}.fits" for i in range(8)]


def test_final_combine_excludes_masked_pixels_and_works_in_bands(tmp_path):
    frames = _frames(5, seed=2)
    for i, f in enumerate(frames):
        f.mask = np.zeros(SHAPE, dtype=bool)
        f.mask[:, :4] = True  # out of field in every frame
        f.mask[40 + i, 50:60] = True
        f.data[40 + i, 50:60] = 1e6
    frames[0].data[70, 70] = np.nan  # NaN without a mask bit is also excluded
    paths = []
    for i, f in enumerate(frames):
        paths.append(tmp_path / f"aligned_{i}.fits")
        _write(f, paths[-1])
    whole = final_combine(paths, header=fits.Header())
    banded = final_combine(paths, header=fits.Header(), mem_limit_bytes=1)  # one row at a time
    assert np.array_equal(whole.data, banded.data, equal_nan=True)
    assert np.array_equal(whole.mask, banded.mask)
    assert whole.mask[:, :4].all() and np.isnan(whole.data[:, :4]).all()
    assert whole.mask.sum() == 4 * SHAPE[0]
    assert np.all(np.abs(whole.data[40:45, 50:60] - 200.0) < 30)
    assert np.isfinite(whole.data[70, 70])


def test_final_combine_refuses_mismatched_frames(tmp_path):
    _write(Image(np.zeros((10, 10), dtype=np.float32), fits.Header()), tmp_path / "a.fits")
    _write(Image(np.zeros((10, 12), dtype=np.float32), fits.Header()), tmp_path / "b.fits")
    with pytest.raises(ValueError, match="shape"):
        final_combine([tmp_path / "a.fits", tmp_path / "b.fits"], header=fits.Header())
    with pytest.raises(ValueError):
        final_combine([], header=fits.Header())


def test_a_star_saturated_in_every_frame_stays_whole(tmp_path):
    """Its core is no measurement in any frame, yet the stack holds the saturation level there, flagged, never a
    hole; where only some frames saturated, the stack never dips below the level either."""
    from nightshift.service.fitsio import read_flags, write_fits_atomic

    frames = _frames(3)
    level = 60000.0
    for i, f in enumerate(frames):
        f.header["SATURATE"] = level
        f.saturated = np.zeros(SHAPE, dtype=bool)
        f.saturated[50:54, 60:64] = True  # every frame
        f.saturated[20, 20 + i] = True  # one frame each
        f.mask = f.saturated.copy()
        f.data[20, 20:23] = 40000.0  # the frames that did not saturate there saw a bright, unsaturated value
        f.data[f.saturated] = np.nan  # an aligned frame's saturated pixels carry no value
    live = LiveStack(SHAPE)
    paths = []
    for i, f in enumerate(frames):
        live.add(f)
        paths.append(tmp_path / f"a{i}.fits")
        write_fits_atomic(paths[-1], f)
    for result in (live.image(_reference_header()), final_combine(paths, header=_reference_header())):
        assert np.isfinite(result.data).all() and not result.mask.any()
        assert np.all(result.data[50:54, 60:64] == pytest.approx(level))
        assert np.all(result.data[20, 20:23] >= level)
        assert result.saturated.sum() == 16 + 3 and result.header["SATURATE"] == pytest.approx(level)
    out = tmp_path / "stack.fits"
    write_fits_atomic(out, result)
    mask, saturated = read_flags(out)
    assert not mask.any() and np.array_equal(saturated, result.saturated)
    live.save_state(tmp_path / "live.npz")
    back = LiveStack.load_state(tmp_path / "live.npz")
    assert np.array_equal(back.saturated, live.saturated) and back.saturation_levels == [level] * 3
