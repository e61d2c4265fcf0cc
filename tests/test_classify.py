"""service.classify: frame-type words of every capture program, and the normalised header."""

from __future__ import annotations

import os

import pytest
from astropy.io import fits
from nightshift.service.classify import DEFAULT_SYNONYMS, ClassifyOptions, classify_kind, normalise
from nightshift.service.frame import KINDS, FrameError

PLAIN = ClassifyOptions()


def header(cards: dict | None = None, **more) -> fits.Header:
    h = fits.Header()
    for key, value in {**(cards or {}), **more}.items():
        h[key.replace("_", "-")] = value
    return h


def frame_header(**cards) -> fits.Header:
    """A light as a camera writes it: uint16 with BZERO, a date and an exposure, plus ``cards``."""
    base = {
        "BITPIX": 16,
        "NAXIS": 2,
        "NAXIS1": 80,
        "NAXIS2": 64,
        "BZERO": 32768,
        "BSCALE": 1,
        "IMAGETYP": "LIGHT",
        "EXPTIME": 30.0,
        "DATE-OBS": "2024-06-15T03:00:00.000",
    }
    base.update({k.replace("_", "-"): v for k, v in cards.items()})
    h = fits.Header()
    for key, value in base.items():
        if value is not None:
            h[key] = value
    return h


def meta_of(h: fits.Header, options: ClassifyOptions = PLAIN, path: str = "/data/raw/frame.fits"):
    return normalise(h, path=path, sha256="0" * 64, size_bytes=1234, options=options)


def error_of(func, *args, **kwargs) -> FrameError:
    with pytest.raises(FrameError) as info:
        func(*args, **kwargs)
    return info.value


# -- frame types -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cards", "kind", "dialect"),
    [
        # MaxIm DL
        ({"IMAGETYP": "Light Frame", "SWCREATE": "MaxIm DL Version 6.40"}, "light", "maxim"),
        ({"IMAGETYP": "Dark Frame"}, "dark", "maxim"),
        ({"IMAGETYP": "Bias Frame"}, "bias", "maxim"),
        ({"IMAGETYP": "Flat Field"}, "flat", "maxim"),
        ({"IMAGETYP": "Flat Frame"}, "flat", "maxim"),
        # N.I.N.A.
        ({"IMAGETYP": "LIGHT", "SWCREATE": "N.I.N.A. 3.1.2.9001 (x64)"}, "light", "nina"),
        ({"IMAGETYP": "DARK"}, "dark", "nina"),
        ({"IMAGETYP": "BIAS"}, "bias", "nina"),
        ({"IMAGETYP": "FLAT"}, "flat", "nina"),
        ({"IMAGETYP": "DARKFLAT"}, "darkflat", "nina"),
        # INDI / Ekos: FRAME is the truth, IMAGETYP = 'Light Frame' is often wrong
        ({"FRAME": "Dark", "IMAGETYP": "Light Frame"}, "dark", "ekos"),
        ({"FRAME": "Flat", "IMAGETYP": "Light Frame", "SWCREATE": "KStars 3.7.4 Ekos"}, "flat", "ekos"),
        ({"FRAME": "Bias", "IMAGETYP": "Light Frame"}, "bias", "ekos"),
        ({"FRAME": "Light", "IMAGETYP": "Light Frame"}, "light", "ekos"),
        # SharpCap, SGP, APT, ASIAIR
        ({"IMAGETYP": "Dark", "SWCREATE": "SharpCap v4.1.12367.0, 64 bit"}, "dark", "sharpcap"),
        ({"IMAGETYP": "Flat Frame", "CREATOR": "Sequence Generator Pro v4.3"}, "flat", "sgp"),
        ({"IMAGETYP": "Bias", "SWCREATE": "Astro Photography Tool - APT v.4.30"}, "bias", "apt"),
        ({"IMAGETYP": "Light", "SWCREATE": "ASIAIR Plus 2.2"}, "light", "asiair"),
        # IRAF and observatories
        ({"IMAGETYP": "zero"}, "bias", "iraf"),
        ({"IMAGETYP": "object"}, "light", "iraf"),
        ({"IMAGETYP": "science"}, "light", "iraf"),
        ({"OBSTYPE": "OBJECT"}, "light", None),
        ({"OBSTYPE": "dome flat"}, "flat", None),
        # case, spacing and punctuation
        ({"IMAGETYP": "light frame   "}, "light", None),
        ({"IMAGETYP": "  Dark  "}, "dark", None),
        ({"IMAGETYP": "FLAT-FIELD"}, "flat", None),
        ({"IMAGETYP": "Sky  Flat"}, "flat", None),
        ({"IMAGETYP": "twilight_flat"}, "flat", None),
        ({"IMAGETYP": "Dark Flat"}, "darkflat", None),
        ({"IMAGETYP": "Flat Dark"}, "darkflat", None),
        ({"IMAGETYP": "offset"}, "bias", None),
    ],
)
def test_dialect_words(cards, kind, dialect):
    got_kind, got_dialect = classify_kind(header(cards), "/raw/x.fits", PLAIN)
    assert got_kind == kind
    if dialect is not None:
        assert got_dialect == dialect


def test_every_builtin_word_maps_to_a_kind():
    assert set(DEFAULT_SYNONYMS.values()) == set(KINDS)


def test_frame_that_is_a_coordinate_frame_is_passed_over():
    assert classify_kind(header(FRAME="FK5", IMAGETYP="Bias Frame"), "x.fits", PLAIN) == ("bias", "maxim")


def test_unknown_word_is_quoted():
    error = error_of(classify_kind, header(IMAGETYP="SNAPSHOT", FRAME="ICRS"), "x.fits", PLAIN)
    assert error.reason == "unknown_type"
    assert "'SNAPSHOT'" in error.message and "IMAGETYP" in error.message and "'ICRS'" in error.message


def test_no_type_keyword_at_all():
    error = error_of(classify_kind, header(OBJECT="M 31"), "/raw/img_0001.fits", PLAIN)
    assert error.reason == "unknown_type"
    assert "IMAGETYP" in error.message and "img_0001.fits" in error.message


def test_user_synonyms_are_case_and_space_insensitive_and_win():
    options = ClassifyOptions(synonyms={"  Snap Shot ": "light", "LIGHT": "flat"})
    assert classify_kind(header(IMAGETYP="snap   shot"), "x.fits", options) == ("light", "user")
    assert classify_kind(header(IMAGETYP="Light"), "x.fits", options)[0] == "flat"


def test_filename_overrides():
    options = ClassifyOptions(
        overrides=[("*/flats/*.fits", "flat"), ("bias_*.fit", "bias"), ("/mnt/cam/darks/*", "dark"), ("*", "light")]
    )
    nothing = header(OBJECT="M 31")
    assert classify_kind(nothing, "/data/2024/flats/a.fits", options) == ("flat", "override")
    assert classify_kind(nothing, "/data/BIAS_001.FIT", options)[0] == "bias"  # case-insensitive, on the name
    assert classify_kind(nothing, "/mnt/cam/darks/d1.fits", options)[0] == "dark"  # on the full path
    assert classify_kind(nothing, "/mnt/cam/other.fits", options)[0] == "light"  # first match wins
    relative = ClassifyOptions(overrides=[("flats/*.fits", "flat")])
    assert classify_kind(nothing, "/data/night/flats/a.fits", relative)[0] == "flat"
    # an override also beats what the header says
    assert classify_kind(header(IMAGETYP="Light Frame"), "/x/flats/b.fits", options)[0] == "flat"


def test_options_refuse_unknown_kinds():
    with pytest.raises(ValueError):
        ClassifyOptions(synonyms={"snap": "snapshot"})
    with pytest.raises(ValueError):
        ClassifyOptions(overrides=[("*.fits", "science")])


# -- exposure --------------------------------------------------------------------------------------------------


def test_exptime_and_exposure():
    assert meta_of(frame_header(EXPTIME=30.0, EXPOSURE=30.0)).exptime == 30.0
    only = meta_of(frame_header(EXPTIME=None, EXPOSURE=120))
    assert only.exptime == 120.0
    both = meta_of(frame_header(EXPTIME=30.0, EXPOSURE=60.0))
    assert both.exptime == 30.0 and "disagree" in both.extra["exposure_note"]
    assert meta_of(frame_header(EXPTIME="  45.5 ")).exptime == 45.5


def test_bias_without_exposure_is_zero_others_refused():
    assert meta_of(frame_header(IMAGETYP="Bias Frame", EXPTIME=None)).exptime == 0.0
    for word in ("Dark Frame", "Flat Field", "Light Frame", "DARKFLAT"):
        error = error_of(meta_of, frame_header(IMAGETYP=word, EXPTIME=None))
        assert error.reason == "missing_exposure"


def test_unparsable_exposure_names_key_and_value():
    error = error_of(meta_of, frame_header(EXPTIME="abc"))
    assert error.reason == "bad_header_value" and "EXPTIME" in error.message and "abc" in error.message
    assert error_of(meta_of, frame_header(EXPTIME=-5.0)).reason == "bad_header_value"
    rescued = meta_of(frame_header(EXPTIME="abc", EXPOSURE=30))
    assert rescued.exptime == 30.0 and "EXPTIME" in rescued.extra["exposure_note"]


def test_unparsable_card_is_a_bad_header_value():
    raw = "".join(
        card.ljust(80)
        for card in ("SIMPLE  = T", "BITPIX  = 16", "NAXIS   = 0", "IMAGETYP= 'LIGHT'", "EXPTIME = 3x0s", "END")
    )
    error = error_of(meta_of, fits.Header.fromstring(raw))
    assert error.reason == "bad_header_value" and "EXPTIME" in error.message


# -- the rest of the header ------------------------------------------------------------------------------------


def test_full_normalisation():
    h = frame_header(
        FILTER="  Green ",
        OBJECT="  NGC 6939 ",
        XBINNING=2,
        YBINNING=2,
        CCD_TEMP=-10.2,
        SET_TEMP=-10,
        GAIN=139,
        OFFSET=21,
        READOUTM="High Gain ",
        INSTRUME="ZWO ASI294MM Pro",
        TELESCOP="RC 16",
        BAYERPAT="rggb",
        SWCREATE="N.I.N.A. 3.0",
    )
    meta = meta_of(h, ClassifyOptions(filter_aliases={"green": "G"}, timezone="America/Santiago"))
    assert (meta.kind, meta.exptime, meta.filter, meta.object) == ("light", 30.0, "G", "NGC 6939")
    assert (meta.xbin, meta.ybin, meta.ccd_temp, meta.set_temp) == (2, 2, -10.2, -10.0)
    assert (meta.gain, meta.offset, meta.readout_mode) == (139.0, 21.0, "High Gain")
    assert (meta.camera, meta.telescope, meta.bayerpat) == ("ZWO ASI294MM Pro", "RC 16", "RGGB")
    assert meta.date_obs == "2024-06-15T03:00:00.000000"
    assert meta.night == "2024-06-14"
    assert (meta.naxis1, meta.naxis2, meta.dtype) == (80, 64, "uint16")
    assert meta.dialect == "nina" and meta.extra["software"] == "N.I.N.A. 3.0"
    assert (meta.path, meta.sha256, meta.size_bytes) == ("/data/raw/frame.fits", "0" * 64, 1234)
    assert meta.extra["imagetyp"] == "LIGHT"


def test_keyword_variants_and_defaults():
    meta = meta_of(frame_header(SET_TEMP=None, SETTEMP=-15, TEMPERAT=-14.8, READMODE="Fast", FILTER="Lum"))
    assert (meta.set_temp, meta.ccd_temp, meta.readout_mode, meta.filter) == (-15.0, -14.8, "Fast", "Lum")
    assert meta_of(frame_header()).set_temp is None
    h = frame_header()
    h["SET_TEMP"] = -20.0  # underscore spelling
    assert meta_of(h).set_temp == -20.0
    plain = meta_of(frame_header())
    assert (plain.xbin, plain.ybin, plain.filter, plain.object, plain.gain) == (1, 1, None, None, None)
    assert meta_of(frame_header(CCDSUM="2 2")).xbin == 2
    assert meta_of(frame_header(FILTER="   ")).filter is None


def test_alias_exact_match_before_case_insensitive():
    options = ClassifyOptions(filter_aliases={"Green": "G", "Lum": "L"})
    assert meta_of(frame_header(FILTER="Green"), options).filter == "G"
    assert meta_of(frame_header(FILTER="LUM"), options).filter == "L"
    assert meta_of(frame_header(FILTER="Red"), options).filter == "Red"


@pytest.mark.parametrize(
    ("key", "value"),
    [("CCD-TEMP", "cold"), ("GAIN", "high"), ("XBINNING", 1.5), ("XBINNING", 0), ("CCDSUM", "2x2"), ("OFFSET", True)],
)
def test_bad_numbers_name_key_and_value(key, value):
    h = frame_header()
    h[key] = value
    error = error_of(meta_of, h)
    assert error.reason == "bad_header_value"
    assert key in error.message and str(value) in error.message


@pytest.mark.parametrize(
    ("bitpix", "bzero", "bscale", "dtype"),
    [
        (16, 32768, 1, "uint16"),
        (16, None, None, "int16"),
        (8, None, None, "uint8"),
        (32, 2147483648, 1, "uint32"),
        (-32, None, None, "float32"),
        (-64, None, None, "float64"),
        (16, 100, 0.5, "float32"),
    ],
)
def test_dtype_from_bitpix_and_scaling(bitpix, bzero, bscale, dtype):
    assert meta_of(frame_header(BITPIX=bitpix, BZERO=bzero, BSCALE=bscale)).dtype == dtype


def test_missing_date_uses_the_file_time(tmp_path):
    path = tmp_path / "f.fits"
    path.write_bytes(b"x")
    os.utime(path, (1718420400, 1718420400))  # 2024-06-15T03:00:00 UTC
    meta = normalise(frame_header(DATE_OBS=None), path=str(path), sha256="x", size_bytes=1, options=ClassifyOptions())
    assert meta.date_obs == "2024-06-15T03:00:00.000000"
    assert meta.night == "2024-06-14"
    assert meta.extra["date_source"] == "mtime"
    given = normalise(
        frame_header(DATE_OBS=None), path="/nowhere.fits", sha256="x", size_bytes=1, options=PLAIN, mtime=0.0
    )
    assert given.date_obs == "1970-01-01T00:00:00.000000"


def test_bad_date_is_a_bad_header_value():
    error = error_of(meta_of, frame_header(DATE_OBS="yesterday"))
    assert error.reason == "bad_header_value" and "yesterday" in error.message
