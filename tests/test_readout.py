"""service.readout and the overscan+trim reduction: sections from headers and settings, multi-amplifier frames
refused, the overscan level measured per row, and a night whose bias level drifts calibrated against the
simulator's truth with the overscan (<= 0.05 sigma) and without it (measurably worse)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.stats import mad_std
from nightshift.service.calibrate import CalibrationError, calibrate
from nightshift.service.fitsio import read_image
from nightshift.service.frame import FrameError, Image
from nightshift.service.masters import make_master_bias, make_master_dark, make_master_flat
from nightshift.service.readout import Readout, overscan_level, parse_section, readout_of
from nightshift.service.simulate import SimConfig, simulate_night

# -- sections ------------------------------------------------------------------------------------------------------


def test_sections_from_the_header_as_a_university_ccd_writes_them():
    """The SAAO 1.0m header of the reference headers: padded sections, overscan before the data."""
    header = fits.Header({"TRIMSEC": "[  17: 528,   1: 520]", "BIASSEC": "[   4:  13,   1: 520]"})
    plan = readout_of(header, (520, 536))
    assert (plan.overscan, plan.trim) == ("[4:13,1:520]", "[17:528,1:520]")
    assert plan.shape == (520, 512)
    assert plan.describe() == "overscan [4:13,1:520], trim [17:528,1:520]: 512x520"
    parsed = Readout.parse(plan.describe(), (520, 536))
    assert parsed == Readout((520, 536), "[4:13,1:520]", "[17:528,1:520]", "archive")
    assert parse_section("[4:13,1:520]", (520, 536)) == (slice(0, 520), slice(3, 13))


def test_settings_auto_off_section_and_keyword():
    header = fits.Header({"DATASEC": "[3:62,1:40]", "BIASSEC": "[63:64,1:40]", "OSCAN": "[1:2,1:40]"})
    assert readout_of(header, (40, 64)).trim == "[3:62,1:40]"  # DATASEC when there is no TRIMSEC
    assert readout_of(header, (40, 64), overscan="off", trim="off").is_raw
    assert readout_of(header, (40, 64), overscan="OSCAN", trim="[5:60,2:40]").describe() == (
        "overscan [1:2,1:40], trim [5:60,2:40]: 56x39"
    )
    assert readout_of(fits.Header(), (40, 64)).describe() == "raw"  # auto without sections: nothing
    with pytest.raises(FrameError, match="TRIMSEC"):
        readout_of(header, (40, 64), trim="TRIMSEC")  # a keyword named by the site but absent
    with pytest.raises(FrameError) as info:
        readout_of(fits.Header({"BIASSEC": "[60:70,1:40]"}), (40, 64))
    assert info.value.reason == "bad_header_value" and "outside" in info.value.message


@pytest.mark.parametrize(
    "cards",
    [
        {"BIASSEC1": "[1:8,1:40]", "BIASSEC2": "[57:64,1:40]"},
        {"TRIMSECA": "[9:32,1:40]"},
        {"ASEC11": "[1:32,1:20]"},
        {"NAMPS": 2},
        {"AMPSEC": "[1:32,1:40]", "TRIMSEC": "[1:64,1:40]"},
    ],
)
def test_frames_read_by_several_amplifiers_are_refused(cards):
    with pytest.raises(FrameError) as info:
        readout_of(fits.Header(cards), (40, 64))
    assert info.value.reason == "multiple_amplifiers"
    readout_of(fits.Header({"AMPSEC": "[1:64,1:40]", "NAMPS": 1}), (40, 64))  # one amplifier covering it all


def test_overscan_level_is_fitted_along_the_rows():
    """A smooth level under 12 ADU of read noise in 16 columns: the fit follows it to a fraction of an ADU."""
    rng = np.random.default_rng(5)
    rows = 400
    truth = 950.0 + 6.0 * np.sin(np.linspace(0, 2.5, rows)) + np.linspace(0, 4, rows)
    strip = truth[:, None] + rng.normal(0, 12.0, (rows, 16))
    strip[37, 3] += 3000  # a cosmic ray in the overscan
    level = overscan_level(strip.astype(np.float32), (slice(0, rows), slice(100, 116)), (rows, 116))
    assert level.shape == (rows, 1)
    assert float(np.max(np.abs(level[:, 0] - truth))) < 1.5
    assert float(np.std(level[:, 0] - truth)) < 0.6  # per-row means alone scatter by 12/4 = 3 ADU


# -- the science against the simulator's truth ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def drifting(tmp_path_factory) -> tuple:
    """A night with 24 overscan and 8 prescan columns and a bias level drifting 40 ADU through it."""
    camera = tmp_path_factory.mktemp("drift") / "camera"
    config = SimConfig(
        size=192,
        dialect="observatory",
        overscan=24,
        prescan=8,
        bias_drift=40.0,
        filters=("V",),
        light_exptimes=(60.0,),
        dark_exptimes=(60.0,),
        n_light=3,
        cosmic_rays=0.0,
        meridian_flip=False,
    )
    return simulate_night(camera, config), camera


def _reduce(plan, camera: Path, overscan: str) -> list[tuple[Image, np.ndarray]]:
    def paths(kind: str) -> list[Path]:
        return [camera / f.name for f in plan.by_kind(kind)]

    bias = make_master_bias(paths("bias"), overscan=overscan)
    dark = make_master_dark(paths("dark"), bias=bias, overscan=overscan)
    flat = make_master_flat(paths("flat"), bias=bias, dark=dark, overscan=overscan)
    out = []
    for frame in plan.by_kind("light"):
        light = calibrate(read_image(camera / frame.name), bias=bias, dark=dark, flat=flat, overscan=overscan)
        out.append((light, plan.truth_signal(frame)))
    return out


def _offset_in_sigma(light: Image, truth: np.ndarray) -> float:
    """The calibrated frame's level error against the truth, in units of its own pixel noise."""
    residual = (light.data - truth)[~light.mask]
    return float(np.median(residual) / mad_std(residual))


def test_overscan_and_trim_by_default_follow_a_drifting_bias(drifting):
    plan, camera = drifting
    assert plan.raw_shape == (192, 224) and plan.sections()["TRIMSEC"] == "[9:200,1:192]"
    with_overscan = _reduce(plan, camera, "auto")
    without = _reduce(plan, camera, "off")
    for light, truth in with_overscan:
        assert light.data.shape == (192, 192)  # the TRIMSEC shape
        assert light.header["TRIM"] == "[9:200,1:192]" and light.header["OSCANSUB"] is True
        assert abs(_offset_in_sigma(light, truth)) <= 0.05
    errors_on = [abs(_offset_in_sigma(light, truth)) for light, truth in with_overscan]
    errors_off = [abs(_offset_in_sigma(light, truth)) for light, truth in without]
    assert all(light.data.shape == (192, 192) for light, _ in without)  # trimmed all the same
    assert max(errors_off) > 0.3 and max(errors_off) > 5 * max(errors_on), (errors_on, errors_off)


def test_masters_made_otherwise_are_refused(drifting):
    plan, camera = drifting
    biases = [camera / f.name for f in plan.by_kind("bias")]
    bias_raw_level = make_master_bias(biases, overscan="off")
    bias_overscan = make_master_bias(biases)
    assert bias_overscan.header["OSCANSUB"] is True and bias_overscan.data.shape == (192, 192)
    assert abs(float(np.median(bias_overscan.data))) < 2.0  # the level went with the overscan
    light = read_image(camera / plan.by_kind("light")[0].name)
    with pytest.raises(CalibrationError, match="removed twice"):
        calibrate(light, bias=bias_raw_level)
    with pytest.raises(CalibrationError, match="would stay"):
        calibrate(light, bias=bias_overscan, overscan="off")
    with pytest.raises(CalibrationError, match="removed twice"):
        make_master_dark([camera / f.name for f in plan.by_kind("dark")], bias=bias_raw_level)
