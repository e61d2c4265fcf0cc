"""Colour cameras, the science: Bayer layouts, masters per channel, calibration on the mosaic, debayering,
debayered cubes and colour pictures, all checked against the simulator's truth.

Simulated one-shot-colour nights (two patterns, both row orders) are written once per module; the truth is the
simulator's: where each colour sits (:meth:`NightPlan.colour_map`), the channels' response, and the signal each
channel of a perfect calibration holds (:meth:`NightPlan.calibrated_rgb`).
"""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
from astropy.io import fits
from conftest import colour_night_config, paths_of
from nightshift.service.calibrate import CalibrationError, calibrate, colour_layout
from nightshift.service.cfa import (
    CfaError,
    array_pattern,
    fill_from_same_colour,
    flip_rows,
    header_layout,
    normalise_per_position,
    shift_pattern,
)
from nightshift.service.classify import ClassifyOptions
from nightshift.service.colour import develop, luminance
from nightshift.service.colour_preview import colour_preview_png
from nightshift.service.debayer import debayer
from nightshift.service.fitsio import read_image, write_fits_atomic
from nightshift.service.frame import FrameError, Image
from nightshift.service.inspect import inspect_frame
from nightshift.service.masters import bad_pixel_mask, make_master_bias, make_master_dark, make_master_flat
from nightshift.service.simulate import COLOUR_CAMERA, SimConfig, plan_night, simulate_night
from PIL import Image as PILImage

pytestmark = pytest.mark.filterwarnings("ignore::astropy.wcs.FITSFixedWarning")

SIZE = 384
#: Two patterns and both row orders (the issue asks for at least that).
LAYOUTS = [("RGGB", "TOP-DOWN"), ("GBRG", "BOTTOM-UP")]


def colour_config(pattern: str, row_order: str, **more) -> SimConfig:
    settings = {
        "size": SIZE,
        "n_light": 2,
        "meridian_flip": False,
        "cosmic_rays": 0.0,
        "dialect": "nina",
        "subfolders": False,
    }
    return colour_night_config(pattern, row_order, **{**settings, **more})


def make_masters(night):
    bias = make_master_bias(paths_of(night, "bias"))
    dark = make_master_dark(paths_of(night, "dark"), bias=bias)
    dark.mask = bad_pixel_mask(dark=dark)
    flat = make_master_flat(paths_of(night, "flat"), bias=bias)
    flat.mask = bad_pixel_mask(flat=flat)
    return bias, dark, flat


@pytest.fixture(scope="module", params=LAYOUTS, ids=lambda p: f"{p[0]}-{p[1]}")
def colour_night(request, tmp_path_factory):
    """(plan, folder, (bias, dark, flat)) of a small colour night and its masters."""
    pattern, row_order = request.param
    folder = tmp_path_factory.mktemp(f"colour-{pattern}-{row_order}")
    night = (simulate_night(folder, colour_config(pattern, row_order)), folder)
    return (*night, make_masters(night))


def masters_bias(night):
    return night[2][0]


def calibrated_colour(plan, folder, masters, frame):
    bias, dark, flat = masters
    raw = read_image(folder / frame.name)
    mask = dark.mask | flat.mask
    return develop(calibrate(raw, bias=bias, dark=dark, flat=flat, mask=mask))


def block_ratios(data: np.ndarray, truth: np.ndarray, sky: np.ndarray, mask: np.ndarray, blocks: int = 3):
    """Median of data / truth over the star-free pixels of each block of a blocks x blocks grid."""
    h, w = data.shape
    out = []
    for by in range(blocks):
        for bx in range(blocks):
            sl = (slice(by * h // blocks, (by + 1) * h // blocks), slice(bx * w // blocks, (bx + 1) * w // blocks))
            good = sky[sl] & ~mask[sl]
            out.append(np.median(data[sl][good]) / np.median(truth[sl][good]))
    return np.array(out)


# -- Bayer layouts ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["RGGB", "GRBG", "GBRG", "BGGR"])
@pytest.mark.parametrize("row_order", ["TOP-DOWN", "BOTTOM-UP"])
@pytest.mark.parametrize("offset", [(0, 0), (1, 0), (1, 1)])
@pytest.mark.parametrize("height", [64, 63])
def test_the_header_gives_the_pattern_of_the_first_stored_pixel(pattern, row_order, offset, height):
    """What BAYERPAT, XBAYROFF/YBAYROFF and ROWORDER say, as every capture program writes them, comes out as the
    simulator's own idea of which colour sits at data[0, 0] (computed there independently)."""
    for dialect in ("nina", "ekos", "maxim", "sharpcap", "asiair", "apt"):
        config = colour_config(pattern, row_order, bayer_offset=offset, dialect=dialect, width=64, height=height)
        plan = plan_night(config)
        light = plan.by_kind("light")[0]
        header = plan.header(light)
        header["NAXIS"], header["NAXIS1"], header["NAXIS2"] = 2, 64, height
        stated, rows, found = header_layout(header)
        assert found == plan.stored_pattern(), (dialect, stated, rows)
        cmap = plan.colour_map()
        assert "".join("RGB"[c] for c in cmap[:2, :2].ravel()) == found


def test_pattern_arithmetic():
    assert shift_pattern("RGGB", 1, 0) == "GRBG"
    assert shift_pattern("RGGB", 0, 1) == "GBRG"
    assert shift_pattern("RGGB", 1, 1) == "BGGR"
    assert flip_rows("RGGB", 2822) == "GBRG"  # an even number of rows: the first stored row is the other kind
    assert flip_rows("RGGB", 2821) == "RGGB"
    assert array_pattern("RGGB", row_order=None, height=100) == "GBRG"  # no ROWORDER: FITS bottom-up
    with pytest.raises(CfaError):
        header_layout(fits.Header({"BAYERPAT": "XTRANS", "NAXIS": 2, "NAXIS2": 10}))
    with pytest.raises(CfaError):
        header_layout(fits.Header({"BAYERPAT": "RGGB", "ROWORDER": "SIDEWAYS", "NAXIS": 2, "NAXIS2": 10}))
    assert header_layout(fits.Header({"ROWORDER": "SIDEWAYS", "NAXIS": 2, "NAXIS2": 10})) == (None, None, None)


def test_camera_setting_supplies_or_overrides_the_pattern():
    header = fits.Header({"INSTRUME": "My Cam", "NAXIS": 2, "NAXIS2": 10, "ROWORDER": "TOP-DOWN"})
    assert header_layout(header) == (None, "TOP-DOWN", None)
    assert header_layout(header, configured={"my cam": "GRBG"}) == ("GRBG", "TOP-DOWN", "GRBG")
    header["BAYERPAT"] = "RGGB"
    assert header_layout(header, configured={"My Cam": "GRBG"})[2] == "RGGB"  # the header wins when it speaks
    assert header_layout(header, configured={"MY CAM": "mono"}) == (None, "TOP-DOWN", None)


# -- debayering ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["RGGB", "GRBG", "GBRG", "BGGR"])
def test_debayer_puts_each_colour_where_it_belongs_up_to_the_edges(pattern):
    cell = {"R": 1000.0, "G": 400.0, "B": 50.0}
    mosaic = np.empty((32, 48), dtype=np.float32)
    for dy in range(2):
        for dx in range(2):
            mosaic[dy::2, dx::2] = cell[pattern[2 * dy + dx]]
    rgb = debayer(mosaic, pattern)
    for c, colour in enumerate("RGB"):
        np.testing.assert_allclose(rgb[c], cell[colour], rtol=1e-6)


@pytest.mark.parametrize("pattern", ["RGGB", "BGGR"])
def test_debayer_keeps_each_channels_star_light(pattern):
    """Debayering is linear and right to the edges: the starlight of each channel of a perfect mosaic of the
    simulator's sky comes out whole (to 1 %), so the stars' colours are kept (one frame samples each star's red
    and blue on a quarter of its pixels; dithered frames average that out in a stack)."""
    plan = plan_night(colour_config(pattern, "TOP-DOWN", size=256, n_light=1))
    light = plan.by_kind("light")[0]
    stars = plan.calibrated_rgb(light) - plan.calibrated_rgb(replace(light, transparency=0.0))
    mosaic = np.take_along_axis(stars, plan.colour_map()[None].astype(np.intp), axis=0)[0]
    rgb = debayer(mosaic, plan.stored_pattern())
    totals, truth = rgb.sum(axis=(1, 2)), stars.sum(axis=(1, 2))
    np.testing.assert_allclose(totals, truth, rtol=0.01)
    assert truth[0] / truth[2] != pytest.approx(1.0, abs=0.1)  # the channels really differ


def test_bad_pixels_are_filled_from_their_own_colour():
    rng = np.random.default_rng(3)
    pattern = "GRBG"
    level = {"R": 800.0, "G": 300.0, "B": 90.0}
    mosaic = np.empty((40, 40), dtype=np.float32)
    for dy in range(2):
        for dx in range(2):
            mosaic[dy::2, dx::2] = level[pattern[2 * dy + dx]]
    mosaic += rng.normal(0, 2.0, mosaic.shape).astype(np.float32)
    bad = np.zeros(mosaic.shape, dtype=bool)
    spots = [(0, 0), (5, 7), (10, 10), (11, 11), (39, 38), (20, 21)]
    for y, x in spots:
        bad[y, x] = True
        mosaic[y, x] = 60000.0
    bad[12, 12] = True
    mosaic[12, 12] = np.nan
    assert fill_from_same_colour(mosaic, bad, pattern) == len(spots) + 1
    for y, x in [*spots, (12, 12)]:
        assert abs(mosaic[y, x] - level[pattern[2 * (y % 2) + x % 2]]) < 10.0


# -- masters -----------------------------------------------------------------------------------------------------
def test_master_flat_is_normalised_per_cfa_position(colour_night):
    """Each of the four CFA positions has median 1, and the flat is the truth's shape of each channel: the
    flat lamp's colour and the channels' sensitivities are not in it."""
    plan, folder, (_, _, flat) = colour_night
    assert flat.header["FLATNORM"] == "median per CFA position"
    for dy in range(2):
        for dx in range(2):
            assert abs(np.median(flat.data[dy::2, dx::2]) - 1.0) < 1e-4
    truth = plan.true_response(None) / plan.channel_qe()[plan.colour_map()]
    ratio = flat.data / truth
    assert np.median(np.abs(ratio - 1)) < 0.01
    # the same flats normalised by one median keep the lamp's colour and the channels' sensitivity (2x apart)
    single = make_master_flat(paths_of((plan, folder), "flat"), bias=masters_bias(colour_night), mosaic=False)
    assert single.header["FLATNORM"] == "median"
    levels = [np.median(single.data[dy::2, dx::2]) for dy in range(2) for dx in range(2)]
    assert max(levels) / min(levels) > 1.5


def test_master_bias_dark_and_flat_keep_the_colour_words(colour_night):
    plan, _folder, masters = colour_night
    light_header = plan.header(plan.by_kind("light")[0])
    for master in masters:
        assert master.header["BAYERPAT"] == light_header["BAYERPAT"]
        assert master.header["ROWORDER"] == plan.config.row_order
        assert colour_layout(master) == ("mosaic", plan.stored_pattern(), plan.config.row_order)


def test_master_flat_of_headers_that_say_nothing(colour_night, tmp_path):
    """A colour camera configured by name (no BAYERPAT): ``mosaic=True`` still normalises per CFA position."""
    plan, folder, (bias, _, _) = colour_night
    paths = []
    for i, p in enumerate(paths_of((plan, folder), "flat")):
        with fits.open(p) as hdul:
            hdu = hdul[0].copy()
        del hdu.header["BAYERPAT"]
        paths.append(tmp_path / f"f{i}.fits")
        hdu.writeto(paths[-1])
    assert make_master_flat(paths, bias=bias).header["FLATNORM"] == "median"
    flat = make_master_flat(paths, bias=bias, mosaic=True)
    assert flat.header["FLATNORM"] == "median per CFA position"


# -- calibration and debayering ----------------------------------------------------------------------------------
def test_calibrated_debayered_background_is_flat_in_every_channel(colour_night):
    """After bias, dark and a flat normalised per CFA position on the mosaic, then debayering, the sky of each
    channel follows the truth to 1 % everywhere (the corners are vignetted 25-45 % in the raw frames), and each
    channel's level is the truth's: the flat changed no colour balance."""
    plan, folder, masters = colour_night
    light = plan.by_kind("light")[0]
    rgb = calibrated_colour(plan, folder, masters, light)
    assert rgb.data.shape == (3, SIZE, SIZE) and rgb.mask.shape == (SIZE, SIZE)
    assert "BAYERPAT" not in rgb.header and rgb.header["DEBAYER"] == "bilinear"
    truth = plan.calibrated_rgb(light)
    sky_only = plan.calibrated_rgb(replace(light, transparency=0.0))
    for c in range(3):
        sky = (truth[c] - sky_only[c]) < 0.5
        ratios = block_ratios(rgb.data[c], truth[c], sky, rgb.mask)
        assert np.max(np.abs(ratios / np.median(ratios) - 1)) < 0.01, ("RGB"[c], ratios)
        assert abs(np.median(ratios) - 1) < 0.01, ("RGB"[c], np.median(ratios))
    response, blue = plan.true_response(None), plan.colour_map() == 2
    corner, centre = response[:48, :48][blue[:48, :48]], response[168:216, 168:216][blue[168:216, 168:216]]
    assert np.median(corner) < 0.75 * np.median(centre)  # the raw frames really were vignetted


def test_hot_pixels_do_not_bleed_into_the_colours(colour_night):
    """Hot pixels are masked and filled from their own colour before debayering: none of their neighbours'
    interpolated colours is far from the truth."""
    plan, folder, masters = colour_night
    light = plan.by_kind("light")[0]
    rgb = calibrated_colour(plan, folder, masters, light)
    truth = plan.calibrated_rgb(light)
    sky = ((truth - plan.calibrated_rgb(replace(light, transparency=0.0))) < 0.5).all(axis=0)
    hot = plan.hot_pixels() & (plan.true_dark_rate() * light.exptime > 500) & sky
    assert hot.sum() >= 3
    ys, xs = np.nonzero(hot)
    ok = (ys > 1) & (ys < SIZE - 2) & (xs > 1) & (xs < SIZE - 2)
    for y, x in zip(ys[ok], xs[ok], strict=True):
        assert rgb.mask[y, x]
        near = rgb.data[:, y - 1 : y + 2, x - 1 : x + 2] - truth[:, y - 1 : y + 2, x - 1 : x + 2]
        assert np.abs(near).max() < 150, (y, x, np.abs(near).max())


def test_a_mono_flat_never_calibrates_a_colour_light(colour_night):
    plan, folder, (bias, dark, flat) = colour_night
    light = read_image(folder / plan.by_kind("light")[0].name)
    mono_flat = Image(flat.data, flat.header.copy())
    for key in ("BAYERPAT", "XBAYROFF", "YBAYROFF"):
        mono_flat.header.remove(key, ignore_missing=True)
    with pytest.raises(CalibrationError, match="flat is mono, the light is colour"):
        calibrate(light, bias=bias, dark=dark, flat=mono_flat)
    other = Image(flat.data, flat.header.copy())
    other.header["BAYERPAT"] = shift_pattern(flat.header["BAYERPAT"], 1, 0)
    with pytest.raises(CalibrationError, match="colour layout"):
        calibrate(light, bias=bias, dark=dark, flat=other)
    flipped = Image(flat.data, flat.header.copy())
    flipped.header["ROWORDER"] = "BOTTOM-UP" if plan.config.row_order == "TOP-DOWN" else "TOP-DOWN"
    with pytest.raises(CalibrationError, match="colour layout"):
        calibrate(light, bias=bias, dark=dark, flat=flipped)
    mono_light = Image(light.data, light.header.copy())
    del mono_light.header["BAYERPAT"]
    with pytest.raises(CalibrationError, match="the light is mono"):
        calibrate(mono_light, bias=bias, dark=dark, flat=flat)


def test_cosmic_rays_are_found_per_colour(colour_night):
    """L.A.Cosmic on the mosaic with its CFA positions brought to one sky level: the hits planted are found, and
    the colour pattern inside stars is not taken for cosmic rays."""
    plan, folder, (bias, dark, flat) = colour_night
    light = read_image(folder / plan.by_kind("light")[0].name)
    planted = [(50, 60), (200, 101), (300, 333)]
    data = light.data.copy()
    for y, x in planted:
        data[y, x] += 3000.0
    light = Image(data, light.header)
    out = calibrate(light, bias=bias, dark=dark, flat=flat, cosmic_rays=True)
    for y, x in planted:
        assert out.mask[y, x]
    frame = plan.by_kind("light")[0]
    stars = (plan.truth_signal(frame) > 5 * frame.level) & (light.data < 50000)
    assert (out.mask & stars).sum() < 0.1 * stars.sum()


def test_luminance_is_the_mean_of_the_planes(colour_night):
    plan, folder, masters = colour_night
    rgb = calibrated_colour(plan, folder, masters, plan.by_kind("light")[0])
    lum = luminance(rgb)
    assert lum.data.shape == (SIZE, SIZE)
    np.testing.assert_array_equal(lum.mask, rgb.mask)
    np.testing.assert_allclose(lum.data, rgb.data.mean(axis=0), rtol=1e-5)


# -- debayered cubes -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cube_night(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cube")
    config = colour_config("RGGB", "TOP-DOWN", debayered=True, dialect="sharpcap", size=256)
    return simulate_night(folder, config), folder


def test_a_cube_is_a_colour_light_and_other_cubes_are_refused(cube_night, tmp_path):
    plan, folder = cube_night
    light = folder / plan.by_kind("light")[0].name
    meta = inspect_frame(light, options=ClassifyOptions())
    assert (meta.kind, meta.naxis3, meta.naxis1, meta.naxis2, meta.cfa) == ("light", 3, 256, 256, None)
    for planes in (2, 4):
        odd = tmp_path / f"cube{planes}.fits"
        data = np.ones((planes, 64, 64), dtype=np.float32) * np.arange(64, dtype=np.float32)
        fits.PrimaryHDU(data, header=plan.header(plan.by_kind("light")[0])).writeto(odd)
        with pytest.raises(FrameError) as err:
            inspect_frame(odd, options=ClassifyOptions())
        assert err.value.reason == "unsupported_dimensions"
        assert f"{planes} planes" in err.value.message


def test_cubes_are_calibrated_plane_by_plane(cube_night):
    """Masters of cubes are cubes (the flat normalised per plane) and a cube light calibrated with them has each
    plane's sky flat to 1 % and at its true level."""
    plan, folder = cube_night
    bias, dark, flat = make_masters(cube_night)
    assert flat.data.shape == (3, 256, 256) and flat.header["FLATNORM"] == "median per plane"
    for c in range(3):
        assert abs(np.median(flat.data[c]) - 1) < 1e-4
    light = plan.by_kind("light")[0]
    raw = read_image(folder / light.name)
    assert raw.is_colour
    rgb = develop(calibrate(raw, bias=bias, dark=dark, flat=flat, mask=dark.mask | flat.mask))
    assert rgb.mask.shape == (256, 256)
    truth = plan.calibrated_rgb(light)
    sky_only = plan.calibrated_rgb(replace(light, transparency=0.0))
    inner = np.zeros((256, 256), dtype=bool)
    inner[2:-2, 2:-2] = True  # the capture program's own debayer is poor on the outermost pixels
    for c in range(3):
        sky = ((truth[c] - sky_only[c]) < 0.5) & inner
        ratios = block_ratios(rgb.data[c], truth[c], sky, rgb.mask, blocks=2)
        assert np.max(np.abs(ratios - 1)) < 0.01, ("RGB"[c], ratios)
    with pytest.raises(CalibrationError, match="cube"):
        calibrate(raw, bias=bias, trim="[1:100,1:100]")


# -- classification ---------------------------------------------------------------------------------------------
def test_classify_records_the_colour_layout(colour_night):
    plan, folder, _ = colour_night
    meta = inspect_frame(folder / plan.by_kind("light")[0].name, options=ClassifyOptions())
    assert meta.bayerpat == plan.config.bayer
    assert meta.roworder == plan.config.row_order
    assert meta.cfa == plan.stored_pattern()
    assert meta.naxis3 is None


def test_classify_takes_the_camera_setting(tmp_path):
    folder = tmp_path / "silent"
    plan = simulate_night(folder, colour_config("GRBG", "TOP-DOWN", size=64, bayer_header=False, n_light=1))
    path = folder / plan.by_kind("light")[0].name
    assert inspect_frame(path, options=ClassifyOptions()).cfa is None
    configured = ClassifyOptions(bayer_patterns={COLOUR_CAMERA.upper(): "GRBG"})
    meta = inspect_frame(path, options=configured)
    assert (meta.bayerpat, meta.cfa) == ("GRBG", plan.stored_pattern())
    assert "from the camera's setting" in meta.header_note
    with pytest.raises(ValueError):
        ClassifyOptions(bayer_patterns={"x": "XTRANS"})


# -- pictures ---------------------------------------------------------------------------------------------------
def test_colour_preview_has_a_neutral_background_and_coloured_stars(colour_night):
    """The sky of each channel differs by 2x in the data (sky colour, channel sensitivity); in the picture it is
    grey. The reddest and the bluest bright stars keep their colour."""
    plan, folder, masters = colour_night
    light = plan.by_kind("light")[0]
    rgb = calibrated_colour(plan, folder, masters, light)
    png = colour_preview_png(rgb.data, mask=rgb.mask, max_width=SIZE, title="test")
    picture = np.asarray(PILImage.open(io.BytesIO(png)))
    assert picture.ndim == 3 and picture.shape[2] == 3
    shown = np.flipud(picture[14:]).astype(float)  # row 0 at the bottom, below a 14-pixel caption
    sky_only = plan.calibrated_rgb(replace(light, transparency=0.0))
    sky = ((plan.calibrated_rgb(light) - sky_only) < 0.5).all(axis=0) & ~rgb.mask
    levels = [np.median(shown[..., c][sky]) for c in range(3)]
    assert max(levels) - min(levels) <= 3, levels
    assert np.median(rgb.data[0][sky]) > 1.8 * np.median(rgb.data[2][sky])  # the data's sky is far from grey
    colours = plan.star_colours(light.object)
    pos = plan.star_positions(light)
    flux = plan.star_fluxes(light)
    inside = (pos[:, 0] > 5) & (pos[:, 0] < SIZE - 5) & (pos[:, 1] > 5) & (pos[:, 1] < SIZE - 5)
    usable = np.flatnonzero(inside & (flux > 5000) & (flux < 60000))
    red = usable[np.argmax(colours[usable, 0] / colours[usable, 2])]
    blue = usable[np.argmin(colours[usable, 0] / colours[usable, 2])]
    assert colours[red, 0] / colours[red, 2] > 1.5 * colours[blue, 0] / colours[blue, 2]

    def tint(i):
        x, y = np.rint(pos[i]).astype(int)
        patch = shown[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).mean(axis=0)
        return patch[0] - patch[2]

    assert tint(red) > tint(blue) + 10


def test_colour_frames_are_written_as_three_planes(colour_night, tmp_path):
    plan, folder, masters = colour_night
    rgb = calibrated_colour(plan, folder, masters, plan.by_kind("light")[0])
    write_fits_atomic(tmp_path / "c.fits", rgb)
    with fits.open(tmp_path / "c.fits") as hdul:
        assert hdul[0].header["NAXIS"] == 3 and hdul[0].header["NAXIS3"] == 3
        assert hdul["MASK"].data.shape == (SIZE, SIZE)
    back = read_image(tmp_path / "c.fits")
    np.testing.assert_array_equal(back.data, rgb.data)


def test_normalise_per_position_refuses_an_empty_position():
    flat = np.ones((8, 8), dtype=np.float32)
    flat[1::2, 1::2] = 0.0
    with pytest.raises(CfaError):
        normalise_per_position(flat)
