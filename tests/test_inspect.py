"""service.inspect: one test per reason a raw file is quarantined, a good frame, and a simulated night."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from nightshift.service import simulate
from nightshift.service.classify import ClassifyOptions
from nightshift.service.frame import QUARANTINE_REASONS, FrameError
from nightshift.service.inspect import inspect_frame

OPTIONS = ClassifyOptions()
GOOD_CARDS = {"IMAGETYP": "Light Frame", "EXPTIME": 30.0, "DATE-OBS": "2024-06-15T03:00:00.5", "FILTER": "V"}


def camera_file(path: Path, data=None, *, remove=(), **cards) -> Path:
    """A frame as a camera writes it (uint16 stored as int16 with BZERO = 32768) with a good header."""
    if data is None:
        data = np.random.default_rng(1).integers(900, 5000, size=(48, 64))
    data = np.asarray(data)
    hdu = fits.PrimaryHDU(data.astype(np.uint16) if data.dtype.kind in "iu" else data)
    for key, value in {**GOOD_CARDS, **{k.replace("_", "-"): v for k, v in cards.items()}}.items():
        hdu.header[key] = value
    for key in remove:
        hdu.header.remove(key)
    hdu.writeto(path)
    return path


def reason(path: Path) -> FrameError:
    with pytest.raises(FrameError) as info:
        inspect_frame(path, options=OPTIONS)
    return info.value


# -- bad input, one kind at a time -----------------------------------------------------------------------------


def make_empty(tmp: Path) -> Path:
    (tmp / "empty.fits").write_bytes(b"")
    return tmp / "empty.fits"


def make_not_fits(tmp: Path) -> Path:
    (tmp / "notes.fits").write_text("seeing 3 arcsec\n" * 300)
    return tmp / "notes.fits"


def make_truncated(tmp: Path) -> Path:
    whole = camera_file(tmp / "whole.fits").read_bytes()
    (tmp / "cut.fits").write_bytes(whole[: len(whole) // 2])
    return tmp / "cut.fits"


def make_directory(tmp: Path) -> Path:
    (tmp / "x.fits").mkdir()
    return tmp / "x.fits"


def make_vanished(tmp: Path) -> Path:
    path = camera_file(tmp / "gone.fits")
    path.unlink()
    return path


def make_no_image(tmp: Path) -> Path:
    hdu = fits.PrimaryHDU()
    hdu.header.update(GOOD_CARDS)
    hdu.writeto(tmp / "header_only.fits")
    return tmp / "header_only.fits"


def make_cube(tmp: Path) -> Path:
    """Four planes: a 3-plane cube is a colour frame (R, G, B); any other cube is not a frame."""
    return camera_file(tmp / "cube.fits", np.random.default_rng(0).integers(0, 100, size=(4, 32, 32)))


def make_row(tmp: Path) -> Path:
    return camera_file(tmp / "row.fits", np.arange(1000))


def make_tiny(tmp: Path) -> Path:
    return camera_file(tmp / "tiny.fits", np.arange(64).reshape(8, 8))


def make_unknown_type(tmp: Path) -> Path:
    return camera_file(tmp / "mystery.fits", IMAGETYP="Mystery")


def make_missing_exposure(tmp: Path) -> Path:
    return camera_file(tmp / "noexp.fits", remove=("EXPTIME",))


def make_bad_exptime(tmp: Path) -> Path:
    return camera_file(tmp / "badexp.fits", EXPTIME="abc")


def make_bad_date(tmp: Path) -> Path:
    return camera_file(tmp / "baddate.fits", DATE_OBS="yesterday")


def make_constant(tmp: Path) -> Path:
    return camera_file(tmp / "constant.fits", np.full((32, 32), 1000))


def make_all_nan(tmp: Path) -> Path:
    return camera_file(tmp / "nan.fits", np.full((32, 32), np.nan, dtype=np.float32))


def make_mostly_inf(tmp: Path) -> Path:
    data = np.random.default_rng(0).normal(100, 5, size=(32, 32)).astype(np.float32)
    data[:20] = np.inf
    return camera_file(tmp / "inf.fits", data)


def make_per_amplifier_sections(tmp: Path) -> Path:
    return camera_file(tmp / "quad.fits", BIASSEC1="[1:8,1:24]", BIASSEC2="[57:64,1:24]", TRIMSEC1="[9:32,1:24]")


def make_one_extension_per_amplifier(tmp: Path) -> Path:
    primary = fits.PrimaryHDU()
    primary.header.update(GOOD_CARDS)
    rng = np.random.default_rng(2)
    amps = [fits.ImageHDU(rng.integers(900, 5000, (32, 40)).astype(np.uint16), name=f"AMP{i}") for i in (1, 2)]
    fits.HDUList([primary, *amps]).writeto(tmp / "mef.fits")
    return tmp / "mef.fits"


CASES = [
    (make_empty, "empty", "0 bytes"),
    (make_not_fits, "not_fits", "seeing"),
    (make_truncated, "truncated", "missing"),
    (make_directory, "unreadable", "directory"),
    (make_vanished, "unreadable", "gone.fits"),
    (make_no_image, "no_image_data", "NAXIS=0"),
    (make_cube, "unsupported_dimensions", "3-D cube of 4 planes"),
    (make_row, "unsupported_dimensions", "1-D"),
    (make_tiny, "unsupported_dimensions", "8 x 8"),
    (make_unknown_type, "unknown_type", "Mystery"),
    (make_missing_exposure, "missing_exposure", "EXPTIME"),
    (make_bad_exptime, "bad_header_value", "abc"),
    (make_bad_date, "bad_header_value", "yesterday"),
    (make_constant, "constant_data", "1000"),
    (make_all_nan, "nan_data", "all 1024"),
    (make_mostly_inf, "nan_data", "640 of 1024"),
    (make_per_amplifier_sections, "multiple_amplifiers", "BIASSEC1"),
    (make_one_extension_per_amplifier, "multiple_amplifiers", "AMP2"),
]


def test_every_reason_ingest_gives_is_covered():
    owned_by_the_daemon = {"incomplete", "processing_error"}
    assert {case[1] for case in CASES} == set(QUARANTINE_REASONS) - owned_by_the_daemon


@pytest.mark.parametrize(("make", "expected", "words"), CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_input_is_refused_with_its_reason(tmp_path, make, expected, words):
    error = reason(make(tmp_path))
    assert error.reason == expected
    assert words in error.message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_permission_denied_is_unreadable(tmp_path):
    path = camera_file(tmp_path / "locked.fits")
    path.chmod(0)
    try:
        assert reason(path).reason == "unreadable"
    finally:
        path.chmod(0o644)


def test_a_few_bad_pixels_are_fine(tmp_path):
    data = np.random.default_rng(0).normal(100, 5, size=(32, 32)).astype(np.float32)
    data[:10] = np.nan
    meta = inspect_frame(camera_file(tmp_path / "some_nan.fits", data), options=OPTIONS)
    assert meta.extra["nonfinite"] == 320 and meta.dtype == "float32"


def test_unexpected_failures_become_processing_error(tmp_path):
    path = camera_file(tmp_path / "good.fits")
    with pytest.raises(FrameError) as info:
        inspect_frame(path, options=None)  # type: ignore[arg-type]
    assert info.value.reason == "processing_error"
    assert "AttributeError" in info.value.message


# -- a good frame ----------------------------------------------------------------------------------------------


def test_good_frame(tmp_path):
    data = np.random.default_rng(2).integers(900, 60000, size=(40, 56))
    path = camera_file(tmp_path / "M31_V_30s.fits", data, OBJECT="M 31", CCD_TEMP=-10.1, XBINNING=2, YBINNING=2)
    meta = inspect_frame(path, options=ClassifyOptions(timezone="America/Santiago"))
    assert (meta.kind, meta.exptime, meta.filter, meta.object) == ("light", 30.0, "V", "M 31")
    assert (meta.naxis1, meta.naxis2, meta.dtype) == (56, 40, "uint16")
    assert (meta.xbin, meta.ybin, meta.ccd_temp) == (2, 2, -10.1)
    assert meta.date_obs == "2024-06-15T03:00:00.500000" and meta.night == "2024-06-14"
    assert meta.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert meta.size_bytes == path.stat().st_size and meta.path == str(path)
    assert (meta.extra["pixel_min"], meta.extra["pixel_max"]) == (float(data.min()), float(data.max()))
    assert inspect_frame(path, options=OPTIONS, sha256="given").sha256 == "given"


def test_raw_file_is_not_modified(tmp_path):
    path = camera_file(tmp_path / "raw.fits")
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    inspect_frame(path, options=OPTIONS)
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


def test_frame_without_date_uses_mtime(tmp_path):
    path = camera_file(tmp_path / "nodate.fits", remove=("DATE-OBS",))
    os.utime(path, (1718420400, 1718420400))  # 2024-06-15T03:00:00 UTC
    meta = inspect_frame(path, options=OPTIONS)
    assert meta.date_obs == "2024-06-15T03:00:00.000000" and meta.extra["date_source"] == "mtime"


def test_hostile_header_values_are_kept_as_text(tmp_path):
    path = camera_file(tmp_path / "h.fits", OBJECT="../../etc/passwd", FILTER="B/V")
    meta = inspect_frame(path, options=OPTIONS)
    assert (meta.object, meta.filter) == ("../../etc/passwd", "B/V")  # making paths of them is safepath's job


# -- a simulated night -----------------------------------------------------------------------------------------


def test_simulated_night_every_file_gets_its_truth(tmp_path):
    config = simulate.SimConfig(size=96, broken=True, n_bias=2, n_dark=2, n_flat=2, n_light=2, dialect="mixed")
    plan = simulate.simulate_night(tmp_path, config)
    broken = [f for f in plan.frames if f.broken]
    assert {f.broken for f in broken} == set(simulate.BROKEN_FILES.values())
    dialects_seen = set()
    for frame in plan.frames:
        path = tmp_path / frame.name
        if frame.broken:
            error = reason(path)
            assert error.reason == frame.broken, (frame.name, error)
            continue
        meta = inspect_frame(path, options=OPTIONS)
        assert meta.kind == frame.kind, frame.name
        assert meta.exptime == (0.0 if frame.kind == "bias" else frame.exptime), frame.name
        assert meta.date_obs == frame.date_obs.isoformat(timespec="microseconds"), frame.name
        assert meta.dtype == "uint16" and (meta.naxis2, meta.naxis1) == plan.shape
        if frame.kind in ("flat", "light"):
            assert meta.filter == frame.filter, frame.name
        if frame.kind == "light":
            assert meta.object == frame.object, frame.name
        assert meta.dialect == frame.dialect, frame.name
        dialects_seen.add(frame.dialect)
    assert dialects_seen == set(simulate.DIALECTS)
