"""Headers as observatories and capture programs really write them (tests/data/real-headers.txt, copied from the
shared reference) and as the simulator writes each convention: the start time from whichever keyword holds it,
zone offsets, the night from the header's longitude, filter wheels and filter case, set-aside frame types, lights
without a type keyword, the camera from DETECTOR, and lights whose pixels look like something else."""

from __future__ import annotations

import warnings
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from nightshift.service.classify import UNTYPED_NOTE, ClassifyOptions, classify_kind, normalise
from nightshift.service.filters import filter_key, header_filter
from nightshift.service.frame import FrameError
from nightshift.service.inspect import inspect_frame
from nightshift.service.lookalike import looks_like, override_hint
from nightshift.service.night import header_longitude, night_of_date, observation_time, observing_night
from nightshift.service.simulate import TIME_CONVENTIONS, SimConfig, plan_night, simulate_night, write_frame

REAL_HEADERS = Path(__file__).parent / "data" / "real-headers.txt"
OPTIONS = ClassifyOptions()


def real_headers() -> dict[str, fits.Header]:
    """The reference file's headers by title (cards as written; a continuation line without a key is skipped)."""
    out: dict[str, fits.Header] = {}
    title = None
    for line in REAL_HEADERS.read_text().splitlines():
        if line.startswith("# "):
            title = line[2:].strip()
            out[title] = fits.Header()
        elif title and line[:8].strip() and not line.startswith("===="):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                card = fits.Card.fromstring(line.ljust(80)[:80])
                card.verify("silentfix")
                out[title].append(card)
    return out


def meta_of(header: fits.Header, name: str = "frame.fits", options: ClassifyOptions = OPTIONS):
    header = header.copy()
    for key, value in (("BITPIX", 16), ("NAXIS1", 64), ("NAXIS2", 48)):
        header.setdefault(key, value)
    return normalise(header, path=f"/camera/{name}", sha256="0" * 64, size_bytes=1, options=options, mtime=0.0)


def header(**cards) -> fits.Header:
    return fits.Header({k.replace("_", "-"): v for k, v in cards.items()})


# -- the reference headers ----------------------------------------------------------------------------------------


def test_every_reference_header_is_read():
    headers = real_headers()
    assert len(headers) == 6
    seen = {title.split(" ")[1] if title.startswith("a ") else title: meta_of(h) for title, h in headers.items()}
    qhy = next(m for t, m in seen.items() if "robotic" in t)
    assert (qhy.kind, qhy.exptime, qhy.xbin, qhy.filter) == ("flat", 2.0, 4, "B")
    assert qhy.date_obs == "2023-01-06T00:17:06.584517"  # 7 digits of a second, kept to the microsecond
    assert qhy.night == "2023-01-05"  # 21:17 local at -70.85 degrees east (LONGITUD = '-70 51 11.9')
    assert "LONGITUD" in qhy.header_note
    saao = next(m for t, m in seen.items() if "university" in t)
    assert saao.date_obs == "2013-07-13T00:57:33.000000" and saao.date_source == "DATE-OBS+UT"  # MJD-OBS = 56486.0
    assert saao.readout == "overscan [4:13,1:520], trim [17:528,1:520]: 512x520"
    assert saao.camera == "STE3 CCD" and saao.filter == "48" and saao.kind == "light"
    maxim = next(m for t, m in seen.items() if t == "MaxIm DL 6.18 header")
    assert maxim.date_obs == "2018-08-23T08:49:30.000000" and maxim.filter == "r" and maxim.camera == "AspenCG16"
    assert maxim.night == "2018-08-22"  # SITELONG = '-96 27 12': 02:03 local


def test_sexagesimal_and_decimal_longitudes():
    assert header_longitude(header(LONGITUD="-70 51 11.9"))[0] == pytest.approx(-70.85331, abs=1e-5)
    assert header_longitude(header(SITELONG="-96:27:11.8008"))[0] == pytest.approx(-96.45328, abs=1e-5)
    assert header_longitude(header(LONG_OBS=-98.453275))[0] == pytest.approx(-98.453275)
    assert header_longitude(header(SITELONG="70 51 12 W"))[0] == pytest.approx(-70.85333, abs=1e-5)
    west = fits.Header()
    west["LONGITUD"] = (111.6, "west longitude")
    assert header_longitude(west)[0] == pytest.approx(-111.6)
    assert header_longitude(header(OBSERVAT="x")) is None
    with pytest.raises(FrameError):
        header_longitude(header(LONGITUD="somewhere"))


# -- times ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("convention", [t for t in TIME_CONVENTIONS if t not in ("", "date-only")])
def test_every_time_convention_gives_the_start_to_the_second_and_the_night(convention, tmp_path):
    plan = plan_night(
        SimConfig(size=32, n_bias=1, n_dark=1, n_flat=1, n_light=1, dialect="observatory", time_keys=convention)
    )
    for frame in plan.frames:
        path = write_frame(plan, frame, tmp_path)
        meta = inspect_frame(path, options=ClassifyOptions(longitude=-70.85))
        got = datetime.fromisoformat(meta.date_obs)
        assert abs((got - frame.date_obs).total_seconds()) < 1.0, (convention, frame.name, meta.date_source)
        assert meta.night == observing_night(frame.date_obs, longitude=-70.85) == "2026-11-25"


def test_a_date_alone_is_said_and_its_night_is_still_right():
    meta = meta_of(header(IMAGETYP="LIGHT", EXPTIME=30.0, DATE_OBS="2024-03-15"), options=ClassifyOptions())
    assert meta.date_obs == "2024-03-15T00:00:00.000000" and "(date only)" in meta.date_source
    assert "holds only the date" in meta.header_note
    # a UTC date of a night in Chile is mostly the morning after the evening that names the night
    assert night_of_date(datetime(2024, 3, 15).date(), longitude=-70.7) == "2024-03-14"
    assert night_of_date(datetime(2024, 3, 15).date(), longitude=151.2) == "2024-03-15"  # Sydney: the evening
    # Berlin: the local midnight within the UTC date 15 March is at 23:00 UTC, the start of the 16th
    assert night_of_date(datetime(2024, 3, 15).date(), timezone="Europe/Berlin") == "2024-03-15"


def test_zone_offset_converted_and_checked_against_the_utc_key():
    """The transit night of issue 14: local DATE-OBS at UTC-7 beside a UTC UT-OBS."""
    agreeing = observation_time(header(DATE_OBS="2017-12-19T18:33:43.317-0700", UT_OBS="01:33:43.317"))
    assert agreeing.start == datetime(2017, 12, 20, 1, 33, 43, 317000)
    assert "UTC-7" in agreeing.note and "UT-OBS agrees" in agreeing.note
    wrong_zone = observation_time(header(DATE_OBS="2017-12-19T18:33:43.317-0600", UT_OBS="01:33:43.317"))
    assert wrong_zone.start == datetime(2017, 12, 20, 1, 33, 43, 317000) and wrong_zone.source == "UT-OBS"
    assert "UT-OBS used" in wrong_zone.note and "3600 s" not in wrong_zone.note  # an hour apart, said as 1:00:00
    assert observation_time(header(DATE_OBS="2024-03-15T05:04:05+02:00")).start == datetime(2024, 3, 15, 3, 4, 5)
    assert observation_time(header(DATE_OBS="2024-03-15T03:04:05Z")).start == datetime(2024, 3, 15, 3, 4, 5)


def test_mid_exposure_keys_give_the_start():
    assert observation_time(header(DATE_AVG="2024-03-15T03:05:05"), 120.0).start == datetime(2024, 3, 15, 3, 4, 5)
    mjd = observation_time(header(MJD_AVG=60384.5), 60.0)
    assert mjd.start == datetime(2024, 3, 15, 12) - timedelta(seconds=30)
    assert observation_time(header(DATE_OBS="2024-03-15", JD=2460384.625)).start == datetime(2024, 3, 15, 3)


def test_an_offset_night_with_untyped_lights(tmp_path):
    """Simulated: no type keyword on the lights, DATE-OBS local at UTC-7 with UT-OBS: lights with UTC times."""
    config = SimConfig(size=32, n_bias=1, n_dark=1, n_flat=1, n_light=1, untyped="lights", time_keys="offset")
    plan = simulate_night(tmp_path, config)
    for frame in plan.frames:
        meta = inspect_frame(tmp_path / frame.name, options=OPTIONS)
        assert meta.kind == frame.kind
        assert abs((datetime.fromisoformat(meta.date_obs) - frame.date_obs).total_seconds()) < 1e-3
        if frame.kind == "light":
            assert meta.dialect == "untyped" and UNTYPED_NOTE in meta.header_note
            assert "-0700" not in meta.date_obs and "UT-OBS agrees" in meta.header_note


# -- frame types ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "kind"),
    [
        *[("ZERO", "bias"), ("SKYFLAT", "flat"), ("DOMEFLAT", "flat"), ("TWILIGHT", "flat"), ("SFLAT", "flat")],
        *[("DFLAT", "flat"), ("OBJECT", "light"), ("SCIENCE", "light"), ("FOCUS", "other"), ("TEST", "other")],
        *[("POINTING", "other"), ("ARC", "other"), ("COMPARISON", "other")],
    ],
)
def test_observatory_frame_types(word, kind):
    assert classify_kind(header(OBSTYPE=word), "/c/x.fits", OPTIONS)[0] == kind


def test_set_aside_frames_say_why():
    meta = meta_of(header(IMAGETYP="FOCUS", EXPTIME=2.0, DATE_OBS="2024-03-15T03:00:00"))
    assert meta.kind == "other" and "a focus frame" in meta.extra["set_aside"]


def test_no_type_keyword():
    light = meta_of(header(OBJECT="HAT-P-7", EXPTIME=30.0, DATE_OBS="2024-03-15T03:00:00"), "hatp7-0042.fits")
    assert (light.kind, light.dialect, light.header_note) == ("light", "untyped", UNTYPED_NOTE)
    strict = ClassifyOptions(untyped_lights=False)
    for cards, why in [
        ({"OBJECT": "HAT-P-7", "EXPTIME": 30.0}, "untyped_lights is off"),
        ({"OBJECT": "HAT-P-7", "EXPTIME": 0.0}, "exposure of 0 s"),
        ({"EXPTIME": 30.0}, "no OBJECT"),
    ]:
        options = strict if "off" in why else OPTIONS
        with pytest.raises(FrameError) as info:
            meta_of(header(DATE_OBS="2024-03-15T03:00:00", **cards), "hatp7-0042.fits", options)
        assert info.value.reason == "unknown_type" and why in info.value.message
        assert 'glob = "hatp*-*.fits"' in info.value.message  # the filename override that would file it


# -- filters and cameras ----------------------------------------------------------------------------------------


def test_filter_wheels_and_names():
    assert header_filter(header(FILTER1="V", FILTER2="Open")) == ("V", "FILTER1+FILTER2")
    assert header_filter(header(FILTER1="clear", FILTER2="Ha")) == ("Ha", "FILTER1+FILTER2")
    assert header_filter(header(FILTER1="B", FILTER2="ND1")) == ("B+ND1", "FILTER1+FILTER2")
    assert header_filter(header(FILTER1="open", FILTER2="EMPTY")) == (None, "FILTER1+FILTER2")
    assert header_filter(header(FILTER="R", FILTER2="open")) == ("R", "FILTER+FILTER2")
    assert header_filter(header(FILTNAME="Sloan  r")) == ("Sloan r", "FILTNAME")
    assert header_filter(header(FILTERS="V,open")) == ("V", "FILTERS")
    assert header_filter(header(FILTERS=48)) == ("48", "FILTERS")
    assert filter_key(" V ") == filter_key("v") == "v" and filter_key("R", keep_case=True) != filter_key("r")
    aliased = ClassifyOptions(filter_aliases={"Green": "G"})
    assert meta_of(header(IMAGETYP="FLAT", EXPTIME=1.0, FILTER1="green", FILTER2="open"), options=aliased).filter == "G"


def test_camera_from_detector_or_camera():
    base = {"IMAGETYP": "BIAS", "DATE_OBS": "2024-03-15T03:00:00"}
    assert meta_of(header(DETECTOR="e2v 42-40", **base)).camera == "e2v 42-40"
    assert meta_of(header(CAMERA="ZWO ASI1600MM", **base)).camera == "ZWO ASI1600MM"
    assert meta_of(header(INSTRUME="STX-16803", DETECTOR="KAF-16803", **base)).camera == "STX-16803"


# -- lights that look like something else -------------------------------------------------------------------------


def test_a_flat_labelled_light_is_kept_and_says_what_it_looks_like(tmp_path):
    plan = plan_night(SimConfig(size=128, n_bias=1, n_dark=1, n_flat=1, n_light=1, dialect="nina", filters=("V",)))
    flat = next(f for f in plan.frames if f.kind == "flat")
    data, hdr = plan.render(flat)
    hdr["IMAGETYP"] = "Light Frame"  # the capture program's light preset
    path = tmp_path / "flat-001.fits"
    fits.PrimaryHDU(data, hdr).writeto(path)
    meta = inspect_frame(path, options=OPTIONS)
    assert meta.kind == "light" and meta.extra["looks_like"] == "flat"
    assert 'overrides = [{ glob = "flat-*.fits", kind = "flat" }]' in meta.header_note
    light = next(f for f in plan.frames if f.kind == "light")
    assert looks_like(plan.render(light)[0].astype(np.float32), exptime=light.exptime) is None
    bias = next(f for f in plan.frames if f.kind == "bias")
    seen = looks_like(plan.render(bias)[0].astype(np.float32), exptime=0.0)
    assert seen is not None and seen.kind == "bias"
    hint = '[classify] overrides = [{ glob = "Light_*.fit", kind = "bias" }]'
    assert override_hint("/c/Light_0012.fit", "bias") == hint
