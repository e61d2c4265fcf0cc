"""The file formats capture systems write: tile-compressed FITS (.fits.fz), gzip (.fits.gz), XISF (mono and
colour mosaics), every BITPIX with BSCALE/BZERO, upper-case names; whole-file checks for each, and a night in
each format reduced into the same archive as plain FITS."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from conftest import reduce_night
from nightshift.daemon.config import DEFAULT_INCLUDE
from nightshift.daemon.watcher import is_wanted
from nightshift.service.classify import ClassifyOptions
from nightshift.service.fitsio import check_complete, read_image
from nightshift.service.frame import FrameError
from nightshift.service.inspect import inspect_frame
from nightshift.service.simulate import SimConfig, _fz_bytes, _xisf_bytes, plan_night, simulate_night

OPTIONS = ClassifyOptions()


def fits_file(stored: np.ndarray, cards: dict) -> bytes:
    """A FITS file written card by card: the stored integers or floats as they are, whatever BZERO/BSCALE say."""
    bitpix = {"u1": 8, "i2": 16, "i4": 32, "f4": -32, "f8": -64}[stored.dtype.kind + str(stored.dtype.itemsize)]
    header = fits.Header()
    header["SIMPLE"], header["BITPIX"], header["NAXIS"] = True, bitpix, 2
    header["NAXIS1"], header["NAXIS2"] = stored.shape[1], stored.shape[0]
    header.update(cards)
    text = header.tostring()
    data = stored.astype(stored.dtype.newbyteorder(">")).tobytes()
    return text.encode() + data + b"\0" * (-len(data) % 2880)


@pytest.mark.parametrize(
    ("dtype", "bzero", "bscale"),
    [
        ("u1", 0, 1),
        ("i2", 32768, 1),
        ("i2", 100.0, 2.0),
        ("i4", 2**31, 1),
        ("i4", 0, 1),
        ("f4", 0, 1),
        ("f8", 0, 1),
    ],
)
@pytest.mark.parametrize("gzipped", [False, True])
def test_every_bitpix_with_scaling(tmp_path, dtype, bzero, bscale, gzipped):
    # unsigned cameras store value - BZERO (BZERO = 2**15 for uint16, 2**31 for uint32)
    physical = np.random.default_rng(0).integers(0, 4000, (20, 24))
    stored = (physical - (bzero if bscale == 1 else 0)).astype(dtype)
    cards = {"IMAGETYP": "LIGHT", "EXPTIME": 5.0, "DATE-OBS": "2024-03-15T03:00:00"}
    if (bzero, bscale) != (0, 1):
        cards.update(BZERO=bzero, BSCALE=bscale)
    content = fits_file(stored, cards)
    path = tmp_path / ("f.fits.gz" if gzipped else "F.FTS")
    path.write_bytes(gzip.compress(content) if gzipped else content)
    expected = stored.astype(np.float64) * bscale + bzero
    np.testing.assert_allclose(read_image(path).data, expected, rtol=1e-7, atol=0)
    assert inspect_frame(path, options=OPTIONS).kind == "light"


def test_compressed_and_xisf_files_are_checked_whole(tmp_path):
    plan = plan_night(SimConfig(size=64, n_bias=1, n_dark=0, n_flat=0, n_light=0, dark_exptimes=(), filters=()))
    frame = plan.frames[0]
    data, header = plan.render(frame)
    plain = plan.frame_bytes(frame)
    files = {
        "a.fits.gz": gzip.compress(plain),
        "d.fits.fz": _fz_bytes(data, header),
        "b.xisf": _xisf_bytes(data, header),
        "c.xisf": _xisf_bytes(data, header, codec="zlib"),
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        check_complete(tmp_path / name)
        np.testing.assert_array_equal(read_image(tmp_path / name).data, data.astype(np.float32))
        cut = tmp_path / f"cut-{name}"
        cut.write_bytes(content[: len(content) * 2 // 3])
        with pytest.raises(FrameError) as info:
            check_complete(cut)
        assert info.value.reason == "truncated", name
    (tmp_path / "junk.fits.gz").write_bytes(b"\x1f\x8b" + b"not gzip at all" * 10)
    with pytest.raises(FrameError) as info:
        check_complete(tmp_path / "junk.fits.gz")
    assert info.value.reason == "not_fits"


def test_xisf_mono_mosaic_and_colour(tmp_path):
    data = np.random.default_rng(1).integers(800, 3000, (40, 48)).astype(np.uint16)
    header = fits.Header({"IMAGETYP": "LIGHT", "EXPTIME": 10.0, "DATE-OBS": "2024-03-15T03:00:00", "BAYERPAT": "RGGB"})
    header["OBJECT"] = "M 42"
    (tmp_path / "osc.xisf").write_bytes(_xisf_bytes(data, header))
    meta = inspect_frame(tmp_path / "osc.xisf", options=OPTIONS)
    assert (meta.kind, meta.bayerpat, meta.naxis1, meta.naxis2, meta.dtype) == ("light", "RGGB", 48, 40, "uint16")
    assert meta.extra["format"] == "xisf"
    image = read_image(tmp_path / "osc.xisf")
    assert image.header["ROWORDER"] == "TOP-DOWN"  # XISF stores the top row first
    rgb = np.stack([data, data, data], axis=-1)
    from xisf import XISF

    XISF.write(str(tmp_path / "rgb.xisf"), rgb, image_metadata={"FITSKeywords": {}})
    with pytest.raises(FrameError) as info:
        inspect_frame(tmp_path / "rgb.xisf", options=OPTIONS)
    assert info.value.reason == "unsupported_dimensions" and "RGB" in info.value.message


def test_the_default_globs_take_every_format():
    for name in ("a.fits", "B.FIT", "c.fts", "d.fits.fz", "E.FITS.FZ", "f.fit.gz", "g.fits.gz", "h.xisf", "I.XISF"):
        assert is_wanted(Path(name), DEFAULT_INCLUDE, ["*.tmp"]), name
    for name in ("notes.txt", "archive.tar.gz", "frame.fits.tmp"):
        assert not is_wanted(Path(name), DEFAULT_INCLUDE, ["*.tmp"]), name


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in (".fits.fz", ".fits.gz", ".fits", ".xisf"):
        name = name.removesuffix(suffix)
    return str(Path(path).parent.name) + "/" + name


@pytest.mark.slow
def test_a_night_in_each_format_gives_the_same_archive(tmp_path):
    base = {
        "size": 96,
        "n_bias": 3,
        "n_dark": 3,
        "n_flat": 3,
        "n_light": 2,
        "filters": ("V",),
        "light_exptimes": (30.0,),
        "dark_exptimes": (30.0,),
        "dialect": "nina",
        "overscan": 12,
        "prescan": 4,
        "bias_drift": 10.0,
        "stars": 900.0,
    }
    formats = {"fits": {}, "fz": {"compress": "fz"}, "gz": {"compress": "gz"}, "xisf": {"file_format": "xisf"}}
    results = {}
    for name, extra in formats.items():
        camera = tmp_path / name / "camera"
        simulate_night(camera, SimConfig(**base, **extra))
        archive = reduce_night(camera, tmp_path / name / "archive")
        frames = {
            _stem(r["path"]): r
            for r in archive.query(
                "SELECT path, kind, object, filter, exptime, date_obs, night, status, readout, naxis1, naxis2, "
                "calibrated_path FROM frames"
            )
        }
        masters = archive.query("SELECT kind, filter, exptime, n_frames, readout FROM masters ORDER BY kind, exptime")
        stacks = archive.query("SELECT object, filter, exptime, n_frames, state FROM stacks ORDER BY id")
        results[name] = (archive, frames, masters, stacks)
        archive.close()
    reference_archive, reference, ref_masters, ref_stacks = results["fits"]
    assert all(r["status"] in ("used", "stacked", "rejected") for r in reference.values())
    for name, (archive, frames, masters, stacks) in results.items():
        assert frames.keys() == reference.keys(), name
        for key, row in frames.items():
            same = {k: v for k, v in row.items() if k not in ("path", "calibrated_path")}
            assert same == {k: v for k, v in reference[key].items() if k not in ("path", "calibrated_path")}, name
            if row["calibrated_path"]:
                mine = read_image(archive.root / row["calibrated_path"]).data
                theirs = read_image(reference_archive.root / reference[key]["calibrated_path"]).data
                np.testing.assert_array_equal(mine, theirs)
        assert masters == ref_masters and stacks == ref_stacks, name
    assert ref_masters[0]["readout"] == "overscan [103:112,1:96], trim [5:100,1:96]: 96x96"
