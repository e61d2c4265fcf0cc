"""service.calibrate: calibrated lights against the simulator's truth and a plain ccdproc reduction; refusals.

A small simulated night (256 px, N.I.N.A. headers, uint16 with BZERO) is written once per module and its
masters built once; each light is read from its file as the daemon reads it.
"""

from __future__ import annotations

import astropy.units as u
import ccdproc
import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import CCDData
from astropy.stats import sigma_clipped_stats
from conftest import paths_of
from nightshift.service.calibrate import (
    CalibrationError,
    calibrate,
    check_dark_bias,
    dark_scale,
    parse_section,
)
from nightshift.service.fitsio import read_image
from nightshift.service.frame import Image
from nightshift.service.masters import bad_pixel_mask, make_master_bias, make_master_dark, make_master_flat
from nightshift.service.provenance import read_history
from nightshift.service.simulate import SimConfig, simulate_night

pytestmark = pytest.mark.filterwarnings("ignore::astropy.wcs.FITSFixedWarning")


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    """(plan, folder) of a simulated night: 5 bias, 5 darks of 30 s and 300 s, 5 V flats, V lights 30/300 s."""
    folder = tmp_path_factory.mktemp("night")
    config = SimConfig(
        size=256,
        n_bias=5,
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


def light_of(night, exptime: float):
    plan, folder = night
    frame = next(f for f in plan.by_kind("light") if f.exptime == exptime)
    return frame, folder / frame.name


@pytest.fixture(scope="module")
def masters(night):
    bias = make_master_bias(paths_of(night, "bias"))
    darks = {t: make_master_dark(paths_of(night, "dark", exptime=t), bias=bias) for t in (30.0, 300.0)}
    flat = make_master_flat(paths_of(night, "flat"), bias=bias)
    return {"bias": bias, "dark": darks, "flat": flat, "mask": bad_pixel_mask(dark=darks[300.0])}


@pytest.fixture(scope="module")
def ccdproc_masters(night):
    """The notebook's method, all in ccdproc, on the same files."""

    def read(path):
        return CCDData.read(path, unit="adu")

    bias = ccdproc.combine([str(p) for p in paths_of(night, "bias")], method="average", sigma_clip=True, unit="adu")
    darks = {}
    for t in (30.0, 300.0):
        subtracted = [ccdproc.subtract_bias(read(p), bias) for p in paths_of(night, "dark", exptime=t)]
        darks[t] = ccdproc.combine(subtracted, method="median")
    flats = [ccdproc.subtract_bias(read(p), bias) for p in paths_of(night, "flat")]
    flat = ccdproc.combine(flats, method="average", sigma_clip=True, scale=lambda a: 1.0 / np.median(a))
    return {"bias": bias, "dark": darks, "flat": flat}


def residual_stats(calibrated: np.ndarray, truth: np.ndarray, good: np.ndarray) -> tuple[float, float]:
    """Mean and scatter of calibrated - truth over good pixels (5-sigma clip drops the light's cosmic rays)."""
    mean, _, std = sigma_clipped_stats((calibrated - truth)[good], sigma=5.0, maxiters=3)
    return float(mean), float(std)


@pytest.mark.parametrize(("light_exptime", "dark_exptime"), [(30.0, 30.0), (300.0, 300.0), (30.0, 300.0)])
def test_calibrated_light_recovers_the_truth_as_well_as_ccdproc(
    night, masters, ccdproc_masters, light_exptime, dark_exptime
):
    plan, _ = night
    frame, path = light_of(night, light_exptime)
    truth = plan.truth_signal(frame)
    dark = masters["dark"][dark_exptime]

    out = calibrate(read_image(path), bias=masters["bias"], dark=dark, flat=masters["flat"], mask=masters["mask"])

    assert out.data.dtype == np.float32 and out.mask.dtype == bool
    assert out.header["DARKSCAL"] == pytest.approx(light_exptime / dark_exptime)
    good = ~out.mask
    assert good.mean() > 0.99
    mean, std = residual_stats(out.data, truth, good)
    assert abs(mean) < 0.05 * std

    cm = ccdproc_masters
    reference = ccdproc.subtract_bias(CCDData.read(path, unit="adu"), cm["bias"])
    reference = ccdproc.subtract_dark(
        reference, cm["dark"][dark_exptime], scale=True, exposure_time="EXPTIME", exposure_unit=u.s
    )
    # flat_correct normalises by the flat's mean unless told; the truth is relative to the median response.
    reference = ccdproc.flat_correct(reference, cm["flat"], norm_value=np.median(cm["flat"].data))
    _, reference_std = residual_stats(reference.data, truth, good)
    assert std <= 1.01 * reference_std


def test_scaling_a_dark_that_still_holds_the_bias_is_refused(night, masters):
    dark_with_bias = make_master_dark(paths_of(night, "dark", exptime=300.0), bias=None)
    _, path = light_of(night, 30.0)
    light = read_image(path)
    with pytest.raises(CalibrationError, match="refusing to scale a 300 s dark that still contains the bias to 30 s"):
        calibrate(light, dark=dark_with_bias)
    with pytest.raises(CalibrationError, match="refusing to scale"):
        calibrate(light, dark=dark_with_bias, dark_factor=0.1)
    # Same exposure: a dark with the bias in it replaces bias and dark, and that is fine.
    same = make_master_dark(paths_of(night, "dark", exptime=30.0), bias=None)
    out = calibrate(light, dark=same, flat=masters["flat"])
    assert out.header["CALSTAT"] == "DF"
    assert out.header["DARKSCAL"] == 1.0


def test_bias_and_dark_must_agree(night, masters):
    _, path = light_of(night, 30.0)
    light = read_image(path)
    with pytest.raises(CalibrationError, match="bias-subtracted dark needs the master bias"):
        calibrate(light, dark=masters["dark"][30.0])
    dark_with_bias = make_master_dark(paths_of(night, "dark", exptime=30.0), bias=None)
    with pytest.raises(CalibrationError, match="twice"):
        calibrate(light, bias=masters["bias"], dark=dark_with_bias)
    check_dark_bias(masters["bias"], masters["dark"][30.0])
    check_dark_bias(None, None)


def test_flat_of_another_filter_is_refused(night, masters):
    _, path = light_of(night, 30.0)
    light = read_image(path)
    light.header["FILTER"] = "B"
    with pytest.raises(CalibrationError, match="filter"):
        calibrate(light, bias=masters["bias"], flat=masters["flat"])


def test_dark_scale():
    def dark(exptime, biassub):
        return Image(np.zeros((2, 2), np.float32), fits.Header({"EXPTIME": exptime, "BIASSUB": biassub}))

    assert dark_scale(300.0, dark(300.0, False)) == 1.0
    assert dark_scale(300.0000001, dark(300.0, False)) == 1.0
    assert dark_scale(30.0, dark(300.0, True)) == pytest.approx(0.1)
    assert dark_scale(600.0, dark(300.0, True)) == pytest.approx(2.0)
    with pytest.raises(CalibrationError):
        dark_scale(30.0, dark(300.0, False))
    no_exposure = Image(np.zeros((2, 2), np.float32), fits.Header({"BIASSUB": True}))
    with pytest.raises(CalibrationError, match="exposure"):
        dark_scale(30.0, no_exposure)


def test_header_records_the_calibration_and_keeps_wcs(night, masters):
    _, path = light_of(night, 30.0)
    light = read_image(path)
    light.header["CTYPE1"], light.header["CTYPE2"] = "RA---TAN", "DEC--TAN"
    light.header["CRPIX1"], light.header["CRPIX2"] = 128.0, 100.0
    light.header["CRVAL1"], light.header["CRVAL2"] = 307.875, 60.65
    provenance = ["bias /masters/bias.fits sha256:0123abcd", "flat /masters/flat_V.fits sha256:89abcdef"]

    out = calibrate(
        light,
        bias=masters["bias"],
        dark=masters["dark"][300.0],
        flat=masters["flat"],
        provenance=provenance,
    )

    head = out.header
    assert head["CALSTAT"] == "BDF"
    assert head["DARKSCAL"] == pytest.approx(0.1)
    for key in ("CTYPE1", "CRPIX1", "CRVAL2", "OBJECT", "DATE-OBS", "EXPTIME", "FILTER"):
        assert head[key] == light.header[key]
    assert head["NSVERS"] == "0.1.0"
    assert [t for _, t in read_history(head, "NSMASTER")] == provenance
    steps = " | ".join(t for _, t in read_history(head, "NSSTEP"))
    assert "MASTER BIAS, NCOMBINE=5" in steps
    assert "MASTER DARK, EXPTIME=300.0, NCOMBINE=5" in steps and "x0.1" in steps
    assert "MASTER FLAT, FILTER=V, NCOMBINE=5" in steps
    (call,) = read_history(head, "NSHIST")
    assert call[1].startswith("calibrate: light=<Image 256x256 LIGHT>, bias=<Image 256x256 MASTER BIAS>")
    assert "dark_factor=None" in call[1] and "cosmic_rays=False" in call[1]
    assert "CALSTAT" not in light.header and "HISTORY" not in light.header


def test_inputs_are_never_modified(night, masters):
    _, path = light_of(night, 30.0)
    light = read_image(path)
    mask = masters["mask"]
    inputs = [light, masters["bias"], masters["dark"][300.0], masters["flat"]]
    before = [(i.data.copy(), str(i.header)) for i in inputs]
    mask_before = mask.copy()
    calibrate(light, bias=inputs[1], dark=inputs[2], flat=inputs[3], mask=mask, cosmic_rays=True)
    for image, (data, header) in zip(inputs, before, strict=True):
        np.testing.assert_array_equal(image.data, data)
        assert str(image.header) == header
    np.testing.assert_array_equal(mask, mask_before)


def test_saturated_masked_and_unusable_flat_pixels_are_flagged():
    shape = (20, 30)
    light = Image(np.full(shape, 1000.0, np.float32), fits.Header({"EXPTIME": 10.0}))
    light.data[3, 4] = 65535.0
    flat_data = np.ones(shape, np.float32)
    flat_data[5, 6] = 0.0
    flat_data[7, 8] = np.nan
    flat = Image(flat_data, fits.Header({"IMAGETYP": "MASTER FLAT"}))
    bad = np.zeros(shape, bool)
    bad[9, 10] = True

    out = calibrate(light, flat=flat, mask=bad)

    assert out.mask[3, 4] and out.mask[5, 6] and out.mask[7, 8] and out.mask[9, 10]
    assert out.mask.sum() == 4
    assert np.isfinite(out.data).all()
    assert out.header["CALSTAT"] == "F"
    assert calibrate(light, saturation=None).mask.sum() == 0


def test_overscan_and_trim_from_header_sections():
    """A frame with an 8-column overscan strip whose level drifted 7 ADU since the master bias."""
    rng = np.random.default_rng(3)
    height, width, data_width = 64, 80, 72
    bias_data = np.full((height, width), 1000.0, np.float32)
    bias_data[:, :data_width] += rng.normal(0, 5, data_width).astype(np.float32)  # column pattern
    bias_data[:, :data_width] += rng.normal(0, 1, (height, 1)).astype(np.float32)  # row pattern
    signal = rng.uniform(50, 500, (height, data_width)).astype(np.float32)
    drift = np.float32(7.0) + np.linspace(0, 2, height, dtype=np.float32)[:, None]
    raw = bias_data + drift
    raw[:, :data_width] += signal
    header = fits.Header({"EXPTIME": 10.0, "BIASSEC": "[73:80,1:64]", "TRIMSEC": "[3:72,2:64]"})
    header["CRPIX1"], header["CRPIX2"] = 40.0, 30.0
    light = Image(raw, header)
    bias = Image(bias_data, fits.Header({"IMAGETYP": "MASTER BIAS", "NCOMBINE": 9}))

    out = calibrate(light, bias=bias, overscan="BIASSEC", trim="TRIMSEC")

    assert out.data.shape == (63, 70)
    np.testing.assert_allclose(out.data, signal[1:, 2:], atol=1e-3)
    assert out.header["CRPIX1"] == 38.0 and out.header["CRPIX2"] == 29.0
    assert "TRIMSEC" not in out.header and "BIASSEC" not in out.header
    assert out.header["TRIM"] == "[3:72,2:64]"
    without = calibrate(light, bias=bias, overscan="off", trim="[3:72,2:64]")
    assert float(np.mean(without.data - signal[1:, 2:])) == pytest.approx(8.0, abs=0.1)
    # A master already trimmed is used as it is.
    flat = Image(np.full((63, 70), 2.0, np.float32), fits.Header({"IMAGETYP": "MASTER FLAT"}))
    halved = calibrate(light, bias=bias, flat=flat, overscan="[73:80,1:64]", trim="TRIMSEC")
    np.testing.assert_allclose(halved.data, signal[1:, 2:] / 2, atol=1e-3)
    with pytest.raises(CalibrationError, match="shape"):
        calibrate(light, flat=Image(np.ones((10, 10), np.float32), fits.Header()))
    with pytest.raises(CalibrationError, match="no section"):
        calibrate(light, trim="DATASEC")


def test_parse_section():
    assert parse_section("[1:10,3:20]", (30, 40)) == (slice(2, 20), slice(0, 10))
    assert parse_section(" [10:1, 20:3] ", (30, 40)) == (slice(2, 20), slice(0, 10))
    for bad in ("[0:10,1:5]", "[1:41,1:5]", "1:10,1:5", "[a:b,1:2]"):
        with pytest.raises(CalibrationError):
            parse_section(bad, (30, 40))


def test_cosmic_ray_cleaning_is_optional(night, masters):
    plan, _ = night
    frame, path = light_of(night, 30.0)
    light = read_image(path)
    truth = plan.truth_signal(frame)
    hits = [(40, 50), (120, 200), (210, 33)]
    for y, x in hits:
        light.data[y, x] += 3000.0
    options = {"bias": masters["bias"], "dark": masters["dark"][30.0], "flat": masters["flat"]}

    kept = calibrate(light, **options)
    cleaned = calibrate(light, cosmic_rays=True, **options)

    for y, x in hits:
        assert kept.data[y, x] - truth[y, x] > 2000
        assert not kept.mask[y, x]
        assert cleaned.mask[y, x]
        assert abs(cleaned.data[y, x] - truth[y, x]) < 100
    assert cleaned.mask.mean() < 0.01
    assert any("cosmic rays" in t for _, t in read_history(cleaned.header, "NSSTEP"))


def test_saturation_level_from_header_then_data_type_then_config():
    from nightshift.service.saturation import raw_level

    uint16 = fits.PrimaryHDU(np.zeros((4, 4), dtype=np.uint16)).header  # BITPIX 16, BZERO 32768 as written
    assert raw_level(uint16, 1000.0) == 65535.0
    assert raw_level(fits.PrimaryHDU(np.zeros((4, 4), dtype=np.int16)).header, 1000.0) == 32767.0
    assert raw_level(fits.PrimaryHDU(np.zeros((4, 4), dtype=np.float32)).header, 1000.0) == 1000.0
    stated = uint16.copy()
    stated["DATAMAX"] = 60000
    assert raw_level(stated, 1000.0) == 60000.0
    stated["SATURATE"] = 50000.0
    assert raw_level(stated, 1000.0) == 50000.0


def test_saturated_pixels_flagged_and_the_calibrated_level_written():
    header = fits.PrimaryHDU(np.zeros((8, 8), dtype=np.uint16)).header
    raw = np.full((64, 64), 1000.0, dtype=np.float32)
    raw[10:13, 20:23] = 65535.0
    raw[40, 40] = 65534.0
    flat = np.ones((64, 64), dtype=np.float32)
    flat[:, 32:] = 0.8
    out = calibrate(
        Image(raw, header),
        bias=Image(np.full((64, 64), 900.0, dtype=np.float32), fits.Header({"IMAGETYP": "MASTER BIAS"})),
        flat=Image(flat, fits.Header({"IMAGETYP": "MASTER FLAT"})),
        saturation=1e9,  # only a fallback: the uint16 header says 65535
    )
    assert out.saturated.sum() == 9 and out.saturated[10:13, 20:23].all() and not out.saturated[40, 40]
    assert out.mask[out.saturated].all(), "a saturated pixel is no measurement"
    assert out.header["SATURATE"] == pytest.approx(65535 - 900, abs=1)  # the lowest per-pixel level (flat 1)
