"""service.fitsio: whole-file checks, float32 reading of camera frames, atomic writing."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from nightshift.service.fitsio import (
    BLOCK,
    check_complete,
    read_image,
    read_mask,
    scan_hdus,
    sha256_file,
    write_bytes_atomic,
    write_fits_atomic,
)
from nightshift.service.frame import FrameError, Image


def camera_file(path: Path, data: np.ndarray, **cards) -> Path:
    """A frame as a camera writes it: uint16 pixels stored as int16 with BZERO = 32768."""
    hdu = fits.PrimaryHDU(np.asarray(data).astype(np.uint16))
    for key, value in cards.items():
        hdu.header[key.replace("_", "-")] = value
    hdu.writeto(path)
    return path


def pixels(shape=(64, 80), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 65536, size=shape).astype(np.uint16)


def reason_of(func, *args) -> FrameError:
    with pytest.raises(FrameError) as info:
        func(*args)
    return info.value


# -- reading ---------------------------------------------------------------------------------------------------


def test_camera_file_really_is_int16_with_bzero(tmp_path):
    path = camera_file(tmp_path / "a.fits", pixels())
    raw = fits.getheader(path)
    assert raw["BITPIX"] == 16 and raw["BZERO"] == 32768


def test_uint16_with_bzero_reads_exactly_as_float32(tmp_path):
    data = pixels()
    data[0, 0], data[0, 1] = 0, 65535
    image = read_image(camera_file(tmp_path / "a.fits", data, IMAGETYP="Light Frame"))
    assert image.data.dtype == np.float32
    assert image.data.shape == (64, 80)
    np.testing.assert_array_equal(image.data, data.astype(np.float32))
    assert image.header["IMAGETYP"] == "Light Frame"
    assert image.mask is None


def test_signed_float_and_scaled_images(tmp_path):
    signed = np.arange(-500, 500, dtype=np.int16).reshape(20, 50)
    fits.PrimaryHDU(signed).writeto(tmp_path / "s.fits")
    np.testing.assert_array_equal(read_image(tmp_path / "s.fits").data, signed.astype(np.float32))

    floats = np.linspace(-1, 1, 400, dtype=np.float32).reshape(20, 20)
    fits.PrimaryHDU(floats).writeto(tmp_path / "f.fits")
    np.testing.assert_array_equal(read_image(tmp_path / "f.fits").data, floats)

    doubles = np.linspace(0, 5, 400).reshape(20, 20)
    fits.PrimaryHDU(doubles).writeto(tmp_path / "d.fits")
    assert read_image(tmp_path / "d.fits").data.dtype == np.float32

    hdu = fits.PrimaryHDU(np.array([[1, 2], [3, -32768]], dtype=np.int16), do_not_scale_image_data=True)
    hdu.header["BSCALE"], hdu.header["BZERO"], hdu.header["BLANK"] = 2.0, 10.0, -32768
    hdu.writeto(tmp_path / "scaled.fits")
    got = read_image(tmp_path / "scaled.fits").data
    np.testing.assert_array_equal(got[0], [12.0, 14.0])
    assert got[1, 0] == 16.0 and np.isnan(got[1, 1])


def test_image_in_an_extension_inherits_primary_keywords(tmp_path):
    primary = fits.PrimaryHDU()
    primary.header["DATE-OBS"] = "2024-05-01T01:02:03"
    primary.header["OBJECT"] = "M 31"
    ext = fits.ImageHDU(pixels((32, 32)), name="SCI")
    ext.header["OBJECT"] = "M 33"
    fits.HDUList([primary, ext]).writeto(tmp_path / "mef.fits")
    image = read_image(tmp_path / "mef.fits")
    assert image.data.shape == (32, 32)
    assert image.header["DATE-OBS"] == "2024-05-01T01:02:03"
    assert image.header["OBJECT"] == "M 33"  # the extension's own value wins


def test_tile_compressed_image(tmp_path):
    data = pixels((40, 48))
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data)]).writeto(tmp_path / "c.fits")
    check_complete(tmp_path / "c.fits")
    np.testing.assert_array_equal(read_image(tmp_path / "c.fits").data, data.astype(np.float32))


def test_cube_with_a_single_plane_reads_as_2d(tmp_path):
    data = pixels((1, 30, 40))
    fits.PrimaryHDU(data).writeto(tmp_path / "plane.fits")
    assert read_image(tmp_path / "plane.fits").data.shape == (30, 40)


def test_rgb_cube_is_read_other_cubes_and_headers_without_image_are_refused(tmp_path):
    rgb = pixels((3, 30, 40))
    fits.PrimaryHDU(rgb).writeto(tmp_path / "rgb.fits")
    image = read_image(tmp_path / "rgb.fits")
    assert image.is_colour and image.data.shape == (3, 30, 40)
    np.testing.assert_array_equal(image.data, rgb.astype(np.float32))
    fits.PrimaryHDU(pixels((4, 30, 40))).writeto(tmp_path / "four.fits")
    error = reason_of(read_image, tmp_path / "four.fits")
    assert error.reason == "unsupported_dimensions" and "4 planes" in error.message and "3 planes" in error.message
    fits.PrimaryHDU().writeto(tmp_path / "none.fits")
    assert reason_of(read_image, tmp_path / "none.fits").reason == "no_image_data"


def test_read_image_does_not_keep_the_file_open(tmp_path):
    path = camera_file(tmp_path / "a.fits", pixels())
    before = set(os.listdir("/proc/self/fd"))
    read_image(path)
    after = set(os.listdir("/proc/self/fd"))
    assert after <= before


def test_sha256_file(tmp_path):
    path = tmp_path / "x.bin"
    content = os.urandom(3 * 1024 + 7)
    path.write_bytes(content)
    assert sha256_file(path, chunk=1000) == hashlib.sha256(content).hexdigest()


# -- is the file whole -----------------------------------------------------------------------------------------


def test_whole_file_passes_and_is_described(tmp_path):
    path = camera_file(tmp_path / "a.fits", pixels((64, 80)))
    check_complete(path)
    (info,) = scan_hdus(path)
    assert info.data_offset == BLOCK and info.data_size == 64 * 80 * 2 and info.shape == (64, 80)


@pytest.mark.parametrize(
    ("cut", "reason"),
    [
        (0, "empty"),
        (4, "truncated"),  # "SIMP": a camera that has just started writing
        (100, "truncated"),  # mid-card of the first header block
        (BLOCK - 80, "truncated"),  # header block not yet finished
        (BLOCK, "truncated"),  # header complete, no data yet
        (BLOCK + 1000, "truncated"),  # data mid-way
        (BLOCK + 64 * 80 * 2 - 1, "truncated"),  # one byte of data missing
    ],
)
def test_file_cut_short_is_not_complete(tmp_path, cut, reason):
    whole = camera_file(tmp_path / "whole.fits", pixels((64, 80))).read_bytes()
    cut_file = tmp_path / "cut.fits"
    cut_file.write_bytes(whole[:cut])
    error = reason_of(check_complete, cut_file)
    assert error.reason == reason
    if cut > BLOCK:
        assert str(cut) in error.message and str(BLOCK + 64 * 80 * 2) in error.message


def test_missing_final_padding_is_accepted_because_all_data_is_there(tmp_path):
    whole = camera_file(tmp_path / "whole.fits", pixels((64, 80))).read_bytes()
    short = tmp_path / "short.fits"
    short.write_bytes(whole[: BLOCK + 64 * 80 * 2])
    check_complete(short)
    np.testing.assert_array_equal(read_image(short).data, read_image(tmp_path / "whole.fits").data)


def test_multi_extension_file_cut_in_the_extension(tmp_path):
    hdul = fits.HDUList([fits.PrimaryHDU(pixels((32, 32))), fits.ImageHDU(pixels((32, 32), seed=1))])
    hdul.writeto(tmp_path / "mef.fits")
    whole = (tmp_path / "mef.fits").read_bytes()
    check_complete(tmp_path / "mef.fits")
    assert len(scan_hdus(tmp_path / "mef.fits")) == 2
    for cut in (len(whole) - 2000, 2 * BLOCK + 4, 2 * BLOCK + 100):
        (tmp_path / "cut.fits").write_bytes(whole[:cut])
        assert reason_of(check_complete, tmp_path / "cut.fits").reason == "truncated", cut


def test_not_fits(tmp_path):
    text = tmp_path / "log.fits"
    text.write_text("Observing log\nclouds at 22:00\n" * 200)
    error = reason_of(check_complete, text)
    assert error.reason == "not_fits" and "Observing log" in error.message
    png = tmp_path / "p.fits"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 5000)
    assert reason_of(check_complete, png).reason == "not_fits"


def test_broken_mandatory_keywords_are_not_fits(tmp_path):
    card = lambda text: text.ljust(80).encode()  # noqa: E731
    header = card("SIMPLE  =                    T") + card("BITPIX  =                   13") + card("NAXIS   = 0")
    header += card("END")
    (tmp_path / "b.fits").write_bytes(header.ljust(BLOCK, b" "))
    error = reason_of(check_complete, tmp_path / "b.fits")
    assert error.reason == "not_fits" and "BITPIX" in error.message


def test_unreadable_paths(tmp_path):
    (tmp_path / "x.fits").mkdir()
    error = reason_of(check_complete, tmp_path / "x.fits")
    assert error.reason == "unreadable" and "directory" in error.message
    assert reason_of(check_complete, tmp_path / "vanished.fits").reason == "unreadable"
    assert reason_of(read_image, tmp_path / "vanished.fits").reason == "unreadable"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_permission_denied_is_unreadable(tmp_path):
    path = camera_file(tmp_path / "a.fits", pixels())
    path.chmod(0)
    try:
        assert reason_of(check_complete, path).reason == "unreadable"
    finally:
        path.chmod(0o644)


# -- writing ---------------------------------------------------------------------------------------------------


def test_write_read_round_trip_drops_the_cameras_scaling(tmp_path):
    data = pixels()
    image = read_image(camera_file(tmp_path / "raw.fits", data, OBJECT="M 31", EXPTIME=30.0))
    assert image.header["BZERO"] == 32768  # still says how the raw file was stored
    image.mask = image.data > 60000
    out = tmp_path / "deep" / "er" / "cal.fits"
    write_fits_atomic(out, image)
    header = fits.getheader(out)
    assert header["BITPIX"] == -32 and "BZERO" not in header and "BSCALE" not in header
    back = read_image(out)
    np.testing.assert_array_equal(back.data, data.astype(np.float32))  # not shifted by 32768
    assert back.header["OBJECT"] == "M 31" and back.header["EXPTIME"] == 30.0
    np.testing.assert_array_equal(read_mask(out), data > 60000)
    assert read_mask(tmp_path / "raw.fits") is None
    assert sorted(p.name for p in out.parent.iterdir()) == ["cal.fits"]  # no temp file left
    assert (out.stat().st_mode & 0o777) == 0o644


def test_write_overwrites_and_appends_extra_hdus(tmp_path):
    out = tmp_path / "o.fits"
    write_fits_atomic(out, Image(np.zeros((8, 8), np.float32), fits.Header()))
    table = fits.BinTableHDU.from_columns([fits.Column(name="x", format="E", array=np.arange(3.0))], name="STARS")
    write_fits_atomic(out, Image(np.ones((8, 8), np.float32), fits.Header()), extra_hdus=[table])
    with fits.open(out) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "STARS"]
        assert hdul[0].data.sum() == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.fits"]


def test_write_header_from_an_extension_becomes_a_primary(tmp_path):
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(pixels((16, 16)), name="SCI")]).writeto(tmp_path / "m.fits")
    image = read_image(tmp_path / "m.fits")
    write_fits_atomic(tmp_path / "o.fits", image)
    assert "XTENSION" not in fits.getheader(tmp_path / "o.fits")
    np.testing.assert_array_equal(read_image(tmp_path / "o.fits").data, image.data)


def test_write_bytes_atomic(tmp_path):
    target = tmp_path / "r" / "report.html"
    write_bytes_atomic(target, b"<html>1</html>")
    write_bytes_atomic(target, b"<html>2</html>")
    assert target.read_bytes() == b"<html>2</html>"
    assert [p.name for p in target.parent.iterdir()] == ["report.html"]
