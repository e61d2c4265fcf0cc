"""service.combine, service.masters, service.provenance: master frames from simulated raw files.

A small simulated night (256 px, N.I.N.A. headers, uint16 with BZERO) is written once per module; masters are
checked against the simulator's true bias, dark rate and flat response, and against ccdproc on the same files.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import ccdproc
import numpy as np
import pytest
from astropy.io import fits
from conftest import paths_of
from nightshift.service.calibrate import CalibrationError, calibrate, dark_scale
from nightshift.service.combine import combine_files, read_header
from nightshift.service.fitsio import read_image, write_fits_atomic
from nightshift.service.frame import Image
from nightshift.service.masters import (
    bad_pixel_mask,
    make_master_bias,
    make_master_dark,
    make_master_darkflat,
    make_master_flat,
)
from nightshift.service.provenance import add_history, describe, logged, read_history
from nightshift.service.simulate import BIAS_LEVEL, READ_NOISE, SimConfig, simulate_night
from scipy.ndimage import uniform_filter

pytestmark = pytest.mark.filterwarnings("ignore::astropy.wcs.FITSFixedWarning")

SIZE = 256


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    """(plan, folder) of a simulated night: 12 bias, 5 darks of 30 s and 300 s, 5 V flats, a few lights."""
    folder = tmp_path_factory.mktemp("night")
    config = SimConfig(
        size=SIZE,
        n_bias=12,
        n_dark=5,
        n_flat=5,
        filters=("V",),
        n_light=1,
        cloudy=0,
        dialect="nina",
        subfolders=False,
        broken=False,
    )
    return simulate_night(folder, config), folder


def camera_file(path: Path, data: np.ndarray, header: fits.Header) -> Path:
    """Write a frame as a camera does: uint16 stored as int16 with BZERO = 32768."""
    fits.PrimaryHDU(np.clip(np.rint(data), 0, 65535).astype(np.uint16), header=header).writeto(path)
    return path


def raw(path: Path) -> tuple[np.ndarray, fits.Header]:
    with fits.open(path) as hdul:
        return hdul[0].data.astype(np.float32), hdul[0].header.copy()


@pytest.fixture(scope="module")
def master_bias(night):
    return make_master_bias(paths_of(night, "bias"))


# -- bias ----------------------------------------------------------------------------------------------------
def test_master_bias_level_and_scatter_fall_with_number_of_frames(night):
    plan, _ = night
    truth = plan.true_bias()
    pattern = float(truth.std())
    bias_paths = paths_of(night, "bias")
    single, _ = raw(bias_paths[0])
    assert abs(single.std() - np.hypot(READ_NOISE, pattern)) < 0.05 * single.std()

    scatter = {}
    for n in (3, 12):
        master = make_master_bias(bias_paths[:n])
        assert master.data.dtype == np.float32
        assert abs(float(master.data.mean()) - BIAS_LEVEL) < 0.5
        # What is left after the fixed pattern: read noise averaged down by sqrt(N).
        noise = float((master.data - truth).std())
        assert noise == pytest.approx(READ_NOISE / np.sqrt(n), rel=0.1)
        # The notebook's figure: the master's own scatter is read noise/sqrt(N) plus the fixed pattern.
        scatter[n] = float(master.data.std())
        assert scatter[n] == pytest.approx(np.hypot(READ_NOISE / np.sqrt(n), pattern), rel=0.1)
    assert single.std() > scatter[3] > scatter[12] > pattern


def test_master_bias_header(night, master_bias):
    head = master_bias.header
    inputs = [read_header(p) for p in paths_of(night, "bias")]
    assert head["IMAGETYP"] == "MASTER BIAS"
    assert head["NCOMBINE"] == 12
    assert head["COMBMETH"] == "sigclip-average 3.0"
    assert head["BIASSUB"] is False and head["DARKSUB"] is False
    for key in ("INSTRUME", "XBINNING", "YBINNING", "GAIN", "OFFSET", "READOUTM", "SET-TEMP"):
        assert head[key] == inputs[0][key]
    assert head["CCD-TEMP"] == pytest.approx(np.mean([h["CCD-TEMP"] for h in inputs]), abs=1e-3)
    first, last = inputs[0]["DATE-OBS"], inputs[-1]["DATE-OBS"]
    assert first < head["DATE-OBS"] < last
    assert "FLATNORM" not in head and "EXPTIME" not in head


def test_master_bias_equals_ccdproc_combine_with_rejections(night, tmp_path):
    """Outliers in 3 of 12 frames are rejected the same way ccdproc.combine rejects them."""
    plan, _ = night
    paths = []
    hit_rows, hit_cols = np.divmod(np.random.default_rng(5).choice(SIZE * SIZE, 300, replace=False), SIZE)
    for i, path in enumerate(paths_of(night, "bias")):
        data, header = raw(path)
        if i < 3:
            data[hit_rows[i::3], hit_cols[i::3]] += 800.0
        paths.append(camera_file(tmp_path / f"bias_{i}.fits", data, header))

    master = make_master_bias(paths)
    reference = ccdproc.combine(
        [str(p) for p in paths], method="average", sigma_clip=True, sigma_clip_func=np.ma.median, unit="adu"
    )
    np.testing.assert_allclose(master.data, reference.data, rtol=0, atol=1e-3)
    assert np.abs(master.data[hit_rows, hit_cols] - plan.true_bias()[hit_rows, hit_cols]).max() < 20

    # ccdproc's own defaults (mean centre) are matched too when asked for.
    mean_centred, stats = combine_files(paths, method="average", sigma=3.0, cenfunc="mean")
    default = ccdproc.combine([str(p) for p in paths], method="average", sigma_clip=True, unit="adu")
    np.testing.assert_allclose(mean_centred, default.data, rtol=0, atol=1e-3)
    assert stats["rejected_fraction"] > 0


# -- darks ---------------------------------------------------------------------------------------------------
def test_master_dark_subtracts_bias_keeps_hot_pixels_and_rejects_cosmic_rays(night, master_bias, tmp_path):
    plan, _ = night
    rate = plan.true_dark_rate()
    hot = plan.hot_pixels()
    rng = np.random.default_rng(7)
    paths, hits = [], []
    for i, path in enumerate(paths_of(night, "dark", exptime=300.0)):
        data, header = raw(path)
        y, x = rng.integers(10, SIZE - 10, 2, endpoint=False)
        while hot[y, x]:
            y, x = rng.integers(10, SIZE - 10, 2, endpoint=False)
        data[y, x] += 4000.0  # a cosmic ray in this frame only
        hits.append((y, x))
        paths.append(camera_file(tmp_path / f"dark_{i}.fits", data, header))
    bias_before = master_bias.data.copy()

    dark = make_master_dark(paths, bias=master_bias)

    np.testing.assert_array_equal(master_bias.data, bias_before)
    assert dark.header["IMAGETYP"] == "MASTER DARK"
    assert dark.header["BIASSUB"] is True
    assert dark.header["EXPTIME"] == 300.0
    assert dark.header["COMBMETH"] == "median"
    expected = rate * np.float32(300.0)
    # Bias gone: the level is the dark current alone (tens of ADU, not ~949).
    assert abs(float(np.median(dark.data)) - float(np.median(expected))) < 1.0
    for y, x in hits:
        assert abs(dark.data[y, x] - expected[y, x]) < 40.0
    assert np.all(np.abs(dark.data[hot] - expected[hot]) < 40.0 + 0.05 * expected[hot])
    assert dark.data[hot].min() > np.median(dark.data) + 100


def test_master_dark_without_bias_says_so_and_darks_of_mixed_exposures_are_refused(night):
    dark = make_master_dark(paths_of(night, "dark", exptime=30.0), bias=None)
    assert dark.header["BIASSUB"] is False
    assert float(np.median(dark.data)) == pytest.approx(BIAS_LEVEL, abs=10)
    mixed = paths_of(night, "dark", exptime=30.0)[:2] + paths_of(night, "dark", exptime=300.0)[:2]
    with pytest.raises(CalibrationError, match="mixes exposure times"):
        make_master_dark(mixed, bias=None)


def test_sigma_clipped_dark_option(night, master_bias):
    dark = make_master_dark(paths_of(night, "dark", exptime=30.0), bias=master_bias, method="average")
    assert dark.header["COMBMETH"] == "sigclip-average 3.0"
    assert dark.header["BIASSUB"] is True


# -- flats ---------------------------------------------------------------------------------------------------
def donut_depth(image: np.ndarray, donut: np.ndarray) -> float:
    """How much darker the donut pixels are than their surroundings (0 = not there)."""
    local = image / uniform_filter(image.astype(np.float64), 41)
    return float(np.median(1.0 - local[donut]))


def test_master_flat_is_normalised_holds_the_donuts_and_flattens(night, master_bias):
    plan, _ = night
    truth = plan.true_response("V")
    donut = truth / uniform_filter(truth.astype(np.float64), 41) < 0.97
    assert donut.sum() > 200

    flat = make_master_flat(paths_of(night, "flat"), bias=master_bias)

    assert flat.data.dtype == np.float32
    assert abs(float(np.median(flat.data)) - 1.0) < 1e-6
    assert flat.header["IMAGETYP"] == "MASTER FLAT"
    assert flat.header["FLATNORM"] == "median"
    assert flat.header["FILTER"] == "V"
    assert flat.header["BIASSUB"] is True and flat.header["DARKSUB"] is False
    assert flat.header["NCOMBINE"] == 5
    # The master is the true response: vignetting, donuts and pixel-to-pixel grain, to the flats' noise.
    assert float((flat.data / truth - 1.0).std()) < 0.004
    assert donut_depth(flat.data, donut) == pytest.approx(donut_depth(truth, donut), abs=0.004)
    assert donut_depth(flat.data, donut) > 0.02

    # A fresh flat exposure (new noise) calibrated with it is flat: the donuts are gone.
    frame = replace(plan.by_kind("flat")[0], index=9000)
    data, header = plan.render(frame)
    light = Image(data.astype(np.float32), header)
    before = light.data - master_bias.data
    assert donut_depth(before, donut) > 0.02
    calibrated = calibrate(light, bias=master_bias, flat=flat)
    assert abs(donut_depth(calibrated.data, donut)) < 0.003
    relative = calibrated.data / np.median(calibrated.data)
    assert relative.std() < 0.3 * (before / np.median(before)).std()


def test_flat_with_a_scaled_dark_and_with_a_darkflat(night, master_bias, tmp_path):
    plan, _ = night
    truth = plan.true_response("V")
    flats = paths_of(night, "flat")
    dark = make_master_dark(paths_of(night, "dark", exptime=300.0), bias=master_bias)
    with_dark = make_master_flat(flats, bias=master_bias, dark=dark)
    assert with_dark.header["DARKSUB"] is True
    assert any("scaled by" in text for _, text in read_history(with_dark.header, "NSSTEP"))
    assert float((with_dark.data / truth - 1.0).std()) < 0.004

    # Darkflats: darks at the flats' exposure, N.I.N.A. IMAGETYP 'DARKFLAT'; they hold the bias.
    template = plan.by_kind("dark")[0]
    darkflat_paths = []
    for i in range(5):
        frame = replace(template, exptime=plan.by_kind("flat")[0].exptime, index=8000 + i)
        data, header = plan.render(frame)
        header["IMAGETYP"] = "DARKFLAT"
        darkflat_paths.append(camera_file(tmp_path / f"darkflat_{i}.fits", data, header))
    darkflat = make_master_darkflat(darkflat_paths)
    assert darkflat.header["IMAGETYP"] == "MASTER DARKFLAT"
    assert darkflat.header["BIASSUB"] is False

    flat = make_master_flat(flats, bias=master_bias, dark=dark, darkflat=darkflat)
    assert flat.header["BIASSUB"] is True and flat.header["DARKSUB"] is True
    assert any("darkflat replaces" in text for _, text in read_history(flat.header, "NSSTEP"))
    assert abs(float(np.median(flat.data)) - 1.0) < 1e-6
    assert float((flat.data / truth - 1.0).std()) < 0.004


def test_flat_refuses_mixed_filters_and_an_unscalable_dark(night, master_bias, tmp_path):
    flats = paths_of(night, "flat")
    data, header = raw(flats[0])
    header["FILTER"] = "B"
    odd = camera_file(tmp_path / "flat_b.fits", data, header)
    with pytest.raises(CalibrationError, match="mixes filters"):
        make_master_flat([*flats[1:], odd], bias=master_bias)
    dark_with_bias = make_master_dark(paths_of(night, "dark", exptime=30.0), bias=None)
    with pytest.raises(CalibrationError, match="still contains the bias"):
        make_master_flat(flats, bias=None, dark=dark_with_bias)


def test_master_written_and_read_back_keeps_its_words(night, master_bias, tmp_path):
    dark = make_master_dark(paths_of(night, "dark", exptime=300.0), bias=master_bias)
    write_fits_atomic(tmp_path / "master_dark_300s.fits", dark)
    back = read_image(tmp_path / "master_dark_300s.fits")
    np.testing.assert_array_equal(back.data, dark.data)
    for key in ("IMAGETYP", "EXPTIME", "BIASSUB", "DARKSUB", "NCOMBINE", "COMBMETH", "DATE-OBS", "NSVERS"):
        assert back.header[key] == dark.header[key]
    assert read_history(back.header) == read_history(dark.header)
    assert dark_scale(30.0, back) == pytest.approx(0.1)


def test_dates_of_every_dialect_are_averaged(tmp_path):
    dates = [
        {"DATE-OBS": "2026-11-25", "TIME-OBS": "18:30:00.0"},  # IRAF: the time in its own card
        {"DATE-OBS": "2026-11-25T18:30:10Z"},
        {"DATE-OBS": "2026-11-25T18:30:20.000000"},
        {"DATE-OBS": "yesterday"},  # ignored
    ]
    paths = [
        camera_file(tmp_path / f"bias_{i}.fits", np.full((16, 16), 900 + i), fits.Header(cards))
        for i, cards in enumerate(dates)
    ]
    master = make_master_bias(paths)
    assert master.header["DATE-OBS"] == "2026-11-25T18:30:10.000000"
    assert master.header["NCOMBINE"] == 4


# -- bad pixels ----------------------------------------------------------------------------------------------
def test_bad_pixel_mask_finds_hot_and_dead_pixels(night, master_bias):
    plan, _ = night
    dark = make_master_dark(paths_of(night, "dark", exptime=300.0), bias=master_bias)
    hot = plan.hot_pixels()
    mask = bad_pixel_mask(dark=dark)
    assert mask.dtype == bool and mask.shape == (SIZE, SIZE)
    assert mask[hot].mean() > 0.95
    assert mask[~hot].mean() < 1e-3

    flat_data = plan.true_response("V").copy()
    flat_data[10, 20] = 0.1
    flat_data[30, 40] = 1.8
    flat_data[50, 60] = np.nan
    flat = Image(flat_data, fits.Header({"IMAGETYP": "MASTER FLAT"}))
    dead = bad_pixel_mask(flat=flat)
    assert dead[10, 20] and dead[30, 40] and dead[50, 60]
    assert dead.sum() == 3
    both = bad_pixel_mask(dark=dark, flat=flat)
    np.testing.assert_array_equal(both, mask | dead)
    with pytest.raises(ValueError):
        bad_pixel_mask()


# -- the tiled combiner --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [
        {"method": "average"},
        {"method": "median"},
        {"method": "average", "sigma": None},
        {"method": "average", "scale": "median", "subtract": "bias+dark"},
    ],
)
def test_combine_in_small_bands_equals_combine_in_one(night, master_bias, options):
    paths = paths_of(night, "flat") if "scale" in options else paths_of(night, "dark", exptime=300.0)
    options = dict(options)
    if options.get("subtract") == "bias+dark":
        dark_rate = night[0].true_dark_rate()
        options["subtract"] = [(master_bias.data, 1.0), (dark_rate, [2.0, 2.0, 2.0, 2.0, 2.0])]
    whole, whole_stats = combine_files(paths, **options)
    banded, banded_stats = combine_files(paths, mem_limit_bytes=20_000, **options)
    assert whole_stats["n_bands"] == 1
    assert banded_stats["n_bands"] > 20
    assert banded_stats["band_rows"] * len(paths) * SIZE * 4 <= 20_000
    np.testing.assert_array_equal(banded, whole)
    assert whole.dtype == np.float32


def test_combine_refuses_frames_of_different_shapes(night, tmp_path):
    small = camera_file(tmp_path / "small.fits", np.zeros((32, 32)), fits.Header())
    with pytest.raises(ValueError, match="shape"):
        combine_files([*paths_of(night, "bias")[:2], small])
    with pytest.raises(ValueError):
        combine_files([])


# -- provenance ----------------------------------------------------------------------------------------------
def test_masters_record_their_call_inputs_and_version(night):
    paths = paths_of(night, "bias")[:3]
    notes = [f"{p.name} sha256:{i:08x}" for i, p in enumerate(paths)]
    master = make_master_bias(paths, inputs_note=notes, sigma=2.5)
    calls = read_history(master.header, "NSHIST")
    assert len(calls) == 1
    assert calls[0][1].startswith("make_master_bias: ")
    assert "sigma=2.5" in calls[0][1] and "mem_limit_bytes=" in calls[0][1]
    assert [text for _, text in read_history(master.header, "NSINPUT")] == notes
    assert master.header["NSVERS"] == "0.1.0"
    assert master.header["COMBMETH"] == "sigclip-average 2.5"


def test_history_lines_wrap_and_read_back():
    header = fits.Header()
    header.add_history("written by the capture program")
    long_text = "calibrate: " + ", ".join(f"argument_{i}={i * 1.5}" for i in range(20))
    add_history(header, "NSHIST", long_text)
    add_history(header, "NSSTEP", "short step")
    assert all(len(str(card)) <= 72 for card in header["HISTORY"])
    assert read_history(header) == [("NSHIST", long_text), ("NSSTEP", "short step")]
    assert read_history(header, "NSSTEP") == [("NSSTEP", "short step")]
    with pytest.raises(ValueError):
        add_history(header, "OTHER", "text")


def test_logged_decorator_records_arguments_and_leaves_inputs_alone():
    @logged
    def brighten(frame: Image, *, by: float = 1.0, note: str = "x") -> Image:
        return Image(frame.data + np.float32(by), frame.header.copy())

    frame = Image(np.zeros((4, 5), np.float32), fits.Header({"IMAGETYP": "LIGHT"}))
    out = brighten(frame, by=2.5)
    assert read_history(out.header) == [("NSHIST", "brighten: frame=<Image 4x5 LIGHT>, by=2.5, note='x'")]
    assert "HISTORY" not in frame.header and "NSVERS" not in frame.header
    np.testing.assert_array_equal(frame.data, 0)
    assert describe(np.zeros((3, 2), np.float32)) == "<ndarray 3x2 float32>"
    assert describe([Path("/a/b.fits")] * 5) == "<5 items>"

    @logged
    def not_a_frame() -> int:
        return 1

    with pytest.raises(TypeError):
        not_a_frame()
