"""Colour cameras in the daemon: masters chosen by colour layout, calibration sets kept apart, colour lights
calibrated on their mosaic and debayered, on real archive files."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits
from conftest import colour_night_config, one_exposure_config, reduce_night
from nightshift.daemon.archive import Archive
from nightshift.daemon.calsets import set_key
from nightshift.daemon.choose import choose_for_light, find_master
from nightshift.daemon.config import CalibrationConfig
from nightshift.service.register import Transform
from nightshift.service.simulate import COLOUR_CAMERA, NightPlan, simulate_night
from PIL import Image as PILImage

pytestmark = pytest.mark.filterwarnings("ignore::astropy.wcs.FITSFixedWarning")

NIGHT = "2026-11-25"


def master_row(archive: Archive, kind: str, **layout: Any) -> int:
    row = {
        "kind": kind,
        "path": f"masters/{kind}-{len(archive.query('SELECT id FROM masters'))}.fits",
        "sha256": "0" * 64,
        "n_frames": 5,
        "set_key": f"{kind}|{layout}",
        "version": 1,
        "night": NIGHT,
        "date_obs": f"{NIGHT}T19:00:00.000000",
        "camera": "ZWO ASI2600MC Pro",
        "xbin": 1,
        "ybin": 1,
        "naxis1": 512,
        "naxis2": 512,
        "filter": None,
        "exptime": 300.0 if kind == "dark" else (2.0 if kind == "flat" else 0.0),
        "bias_subtracted": int(kind != "bias"),
        "method": "test",
        "created_at": f"{NIGHT}T19:00:00.000",
        **layout,
    }
    return archive.put("masters", row)


def light_row(**layout: Any) -> dict[str, Any]:
    return {
        "kind": "light",
        "night": NIGHT,
        "date_obs": f"{NIGHT}T21:00:00.000000",
        "camera": "ZWO ASI2600MC Pro",
        "xbin": 1,
        "ybin": 1,
        "naxis1": 512,
        "naxis2": 512,
        "filter": None,
        "exptime": 300.0,
        "naxis3": None,
        "roworder": None,
        "cfa": None,
        **layout,
    }


@pytest.fixture
def archive(tmp_path: Path) -> Archive:
    archive = Archive(tmp_path / "archive")
    yield archive
    archive.close()


def test_a_colour_light_never_takes_a_mono_flat_nor_another_layout(archive: Archive) -> None:
    """Whatever the match keys say (none of them is about colour), each light gets the flat of its own layout,
    and a light with none waits, saying which layout it needs."""
    rules = CalibrationConfig()
    mono = master_row(archive, "flat")
    rggb_td = master_row(archive, "flat", cfa="RGGB", roworder="TOP-DOWN", bayerpat="RGGB")
    gbrg_bu = master_row(archive, "flat", cfa="GBRG", roworder="BOTTOM-UP", bayerpat="RGGB")
    cube = master_row(archive, "flat", naxis3=3, roworder="TOP-DOWN")
    for kind in ("bias", "dark"):
        master_row(archive, kind)
        master_row(archive, kind, cfa="RGGB", roworder="TOP-DOWN")
        master_row(archive, kind, naxis3=3, roworder="TOP-DOWN")
    cases = [
        (light_row(), mono),
        (light_row(cfa="RGGB", roworder="TOP-DOWN", bayerpat="RGGB"), rggb_td),
        (light_row(cfa="GBRG", roworder="BOTTOM-UP", bayerpat="RGGB"), gbrg_bu),
        (light_row(cfa="GBRG", roworder=None, bayerpat="RGGB"), gbrg_bu),  # no ROWORDER: bottom-up
        (light_row(naxis3=3, roworder="TOP-DOWN"), cube),
    ]
    for light, flat_id in cases:
        choice = choose_for_light(archive, rules, light)
        assert choice.flat is not None and choice.flat["id"] == flat_id, light
        assert choice.dark["naxis3"] == light["naxis3"] and choice.bias["naxis3"] == light["naxis3"]
    lonely = light_row(cfa="GRBG", roworder="TOP-DOWN", bayerpat="GRBG")
    choice = choose_for_light(archive, rules, lonely)
    assert choice.flat is None
    assert "Bayer GRBG at the first pixel, rows top-down" in choice.reason_missing
    flipped = light_row(cfa="RGGB", roworder="BOTTOM-UP", bayerpat="GBRG")
    assert find_master(archive, rules, "flat", flipped) is None
    # a mono light with the colour camera's name still takes only the mono flat
    archive.execute("DELETE FROM masters WHERE id = ?", [mono])
    assert find_master(archive, rules, "flat", light_row()) is None


def test_calibration_sets_of_other_layouts_are_kept_apart() -> None:
    keys = CalibrationConfig().match_keys
    base = {"kind": "flat", "night": NIGHT, "camera": "Cam", "xbin": 1, "ybin": 1, "exptime": 2.0, "filter": None}
    mono = set_key(dict(base), keys)
    colour = set_key({**base, "cfa": "RGGB", "roworder": "TOP-DOWN"}, keys)
    other = set_key({**base, "cfa": "GBRG", "roworder": "BOTTOM-UP"}, keys)
    cube = set_key({**base, "naxis3": 3, "roworder": "TOP-DOWN"}, keys)
    assert len({mono[0], colour[0], other[0], cube[0]}) == 4
    assert len({mono[1], colour[1], other[1], cube[1]}) == 4  # the master files' names differ too


def _nightshift(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nightshift.daemon.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_simulate_writes_a_colour_night_from_the_command_line(tmp_path: Path) -> None:
    camera = tmp_path / "camera"
    result = _nightshift(
        "simulate",
        str(camera),
        "--size",
        "64",
        "--lights",
        "1",
        "--calibrations",
        "1",
        "--dialect",
        "nina",
        "--bayer",
        "GRBG",
        "--row-order",
        "BOTTOM-UP",
    )
    assert result.returncode == 0, result.stderr
    files = sorted(camera.rglob("*.fits"))
    assert files
    for path in files:
        header = fits.getheader(path)
        assert (header["BAYERPAT"], header["ROWORDER"], header["NAXIS"]) == ("GRBG", "BOTTOM-UP", 2)
        assert "FILTER" not in header
    result = _nightshift(
        "simulate",
        str(tmp_path / "cubes"),
        "--size",
        "64",
        "--lights",
        "1",
        "--calibrations",
        "1",
        "--bayer",
        "RGGB",
        "--debayered",
    )
    assert result.returncode == 0, result.stderr
    assert all(fits.getheader(p)["NAXIS3"] == 3 for p in (tmp_path / "cubes").rglob("*.fit*"))
    refused = _nightshift("simulate", str(tmp_path / "x"), "--debayered")
    assert refused.returncode == 2 and "--bayer" in refused.stderr


# -- colour nights through the real reduce ----------------------------------------------------------------------
LAYOUTS = [("RGGB", "TOP-DOWN"), ("GBRG", "BOTTOM-UP")]
SIZE = 384


def _colour_night(camera: Path, pattern: str, row_order: str, **more: Any) -> NightPlan:
    return simulate_night(
        camera, colour_night_config(pattern, row_order, **{"size": SIZE, "n_light": 6, "meridian_flip": True, **more})
    )


def _mono_flats_of_the_same_camera(plan: NightPlan, camera: Path) -> None:
    """Copies of the colour flats with no Bayer words, taken just before the first light: a mono flat set of the
    same camera, nearer in time to the lights than the colour flats, that must never calibrate them."""
    first_light = min(f.date_obs for f in plan.by_kind("light"))
    for i, f in enumerate(plan.by_kind("flat")):
        with fits.open(camera / f.name) as hdul:
            hdu = hdul[0].copy()
        for key in ("BAYERPAT", "XBAYROFF", "YBAYROFF"):
            hdu.header.remove(key, ignore_missing=True)
        hdu.header["DATE-OBS"] = (first_light - timedelta(seconds=120 - 10 * i)).isoformat()
        out = camera / "mono" / f"MonoFlat_{i:04d}.fits"
        out.parent.mkdir(parents=True, exist_ok=True)
        hdu.writeto(out)


@pytest.fixture(scope="module", params=LAYOUTS, ids=lambda p: f"{p[0]}-{p[1]}")
def reduced_colour(request, tmp_path_factory):
    """A colour night (mixed capture programs, a meridian flip, cosmic rays) plus a mono flat set of the same
    camera, reduced by the real pipeline: (plan, camera, archive)."""
    pattern, row_order = request.param
    root = tmp_path_factory.mktemp(f"reduced-{pattern}-{row_order}")
    camera = root / "camera"
    plan = _colour_night(camera, pattern, row_order)
    _mono_flats_of_the_same_camera(plan, camera)
    archive = reduce_night(camera, root / "archive", workers=2)
    yield plan, camera, archive
    archive.close()


def _sim_frame(plan: NightPlan, camera: Path, row: dict[str, Any]):
    name = Path(row["path"]).relative_to(camera).as_posix()
    return next(f for f in plan.frames if f.name == name)


def test_a_colour_night_is_stacked_in_colour(reduced_colour) -> None:
    plan, _camera, archive = reduced_colour
    lights = archive.query("SELECT * FROM frames WHERE kind = 'light' ORDER BY id")
    assert len(lights) == len(plan.by_kind("light"))
    assert all(r["status"] == "stacked" for r in lights), [(r["status"], r["reason"]) for r in lights]
    assert {r["cfa"] for r in lights} == {plan.stored_pattern()}
    stack = archive.one("SELECT * FROM stacks")
    with fits.open(archive.root / stack["path"]) as hdul:
        head = hdul[0].header
        assert (head["NAXIS"], head["NAXIS3"], head["NAXIS1"], head["NAXIS2"]) == (3, 3, SIZE, SIZE)
        assert hdul["MASK"].data.shape == (SIZE, SIZE)
        assert "each colour plane on its own" in head["COMBINE"]
        assert "BAYERPAT" not in head and head["DEBAYER"] == "bilinear"
        assert head["NCOMBINE"] == len(lights)
    picture = PILImage.open(archive.root / stack["preview_path"])
    assert picture.mode == "RGB"
    for r in lights:  # each light's own picture is in colour too
        assert PILImage.open(archive.root / r["preview_path"]).mode == "RGB"


def test_colour_lights_never_take_the_mono_flat(reduced_colour) -> None:
    plan, _camera, archive = reduced_colour
    flats = archive.query("SELECT * FROM masters WHERE kind = 'flat'")
    assert {f["cfa"] for f in flats} == {None, plan.stored_pattern()}  # the mono flat was built, on its own
    colour_flat = next(f for f in flats if f["cfa"] is not None)
    mono_flat = next(f for f in flats if f["cfa"] is None)
    with fits.open(archive.root / colour_flat["path"]) as hdul:
        assert hdul[0].header["FLATNORM"] == "median per CFA position"
    with fits.open(archive.root / mono_flat["path"]) as hdul:
        assert hdul[0].header["FLATNORM"] == "median"
    for r in archive.query("SELECT * FROM frames WHERE kind = 'light'"):
        assert r["flat_id"] == colour_flat["id"], r["calibration_note"]


def test_registration_on_the_luminance_is_as_good_as_mono(reduced_colour) -> None:
    """Every light's transform onto the reference, found on the luminance's stars, puts the true star positions
    within 0.1 px RMS of the reference's (the mono criterion), the meridian-flipped ones included."""
    plan, camera, archive = reduced_colour
    stack = archive.one("SELECT * FROM stacks")
    ref = _sim_frame(plan, camera, archive.frame(stack["reference_frame_id"]))
    flipped = 0
    for row in archive.query("SELECT * FROM frames WHERE kind = 'light' AND status = 'stacked'"):
        frame = _sim_frame(plan, camera, row)
        if frame.name == ref.name:
            continue
        t = Transform.from_dict(json.loads(row["align_transform"]))
        src, dst = plan.star_positions(frame), plan.star_positions(ref)
        inside = np.all((dst >= 0) & (dst <= SIZE - 1), axis=1) & np.all((src >= 0) & (src <= SIZE - 1), axis=1)
        error = np.sqrt(np.mean(np.sum((t.apply(src[inside]) - dst[inside]) ** 2, axis=1)))
        assert error < 0.1, (frame.name, error)
        flipped += frame.flipped != ref.flipped
    assert flipped >= 2


def _stack_planes(archive: Archive) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    stack = archive.one("SELECT * FROM stacks")
    with fits.open(archive.root / stack["path"]) as hdul:
        return np.asarray(hdul[0].data, dtype=np.float32), np.asarray(hdul["MASK"].data) != 0, stack


def test_stack_star_colours_match_the_truth(reduced_colour) -> None:
    """R/G and B/G of the well-exposed isolated stars of the stack (40k-300k ADU a frame, unsaturated) are the
    simulator's true star colours (each star's B-V through the camera's channels) to 3 %."""
    import sep

    plan, camera, archive = reduced_colour
    rgb, mask, stack = _stack_planes(archive)
    ref = _sim_frame(plan, camera, archive.frame(stack["reference_frame_id"]))
    pos = plan.star_positions(ref)
    flux = plan.star_fluxes(ref)
    inside = np.all((pos >= 20) & (pos <= SIZE - 21), axis=1)
    distance = np.hypot(*(pos[:, None, :] - pos[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(distance, np.inf)
    crowded = ((distance < 16) & (flux[None, :] > 0.01 * flux[:, None])).any(axis=1)
    chosen = np.flatnonzero(inside & ~crowded & (flux > 4e4) & (flux < 3e5))
    assert len(chosen) >= 5
    xy = pos[chosen]
    fluxes = []
    for plane in rgb:
        data = np.ascontiguousarray(np.where(mask, np.nanmedian(plane), plane))
        sky = sep.Background(data, mask=mask, bw=64, bh=64).back()
        fluxes.append(sep.sum_circle(data - sky, xy[:, 0], xy[:, 1], 8.0, subpix=5)[0])
    r, g, b = fluxes
    truth = plan.star_colours(ref.object)[chosen]
    error = np.concatenate([r / g / truth[:, 0] - 1, b / g / truth[:, 2] - 1])
    assert np.max(np.abs(error)) < 0.03, np.round(error, 4)
    assert np.ptp(truth[:, 0] / truth[:, 2]) > 0.5  # the stars chosen really differ in colour


def _nyquist_spike(plane: np.ndarray, half: int = 6) -> float:
    """The largest spike at a Nyquist frequency (checker, row or column stripes): its power over the median power
    of the frequencies around it (about 1 for noise)."""
    p = np.fft.fftshift(np.abs(np.fft.fft2(plane - plane.mean())) ** 2)
    h, w = p.shape
    worst = 0.0
    for y, x in ((0, 0), (0, w // 2), (h // 2, 0)):
        ys, xs = np.arange(y - half, y + half + 1) % h, np.arange(x - half, x + half + 1) % w
        window = p[np.ix_(ys, xs)].copy()
        window[half, half] = np.nan
        worst = max(worst, float(p[y, x] / np.nanmedian(window)))
    return worst


def test_no_checker_pattern_in_any_channel(reduced_colour) -> None:
    """No excess power at the Nyquist frequencies in any channel of the stack (noise gives about 1-2); a checker
    of 1 % of the sky added to it stands out a hundred times over (the measure can see one)."""
    _plan, _camera, archive = reduced_colour
    rgb, mask, _ = _stack_planes(archive)
    inner = (slice(16, SIZE - 16), slice(16, SIZE - 16))
    yy, xx = np.mgrid[0 : SIZE - 32, 0 : SIZE - 32]
    checker = np.where((yy + xx) % 2 == 0, 1.0, -1.0).astype(np.float32)
    for c, plane in enumerate(rgb):
        part = np.where(mask[inner], np.nanmedian(plane), plane[inner])
        assert _nyquist_spike(part) < 10, ("RGB"[c], _nyquist_spike(part))
        sky = float(np.nanmedian(part))
        assert _nyquist_spike(part + 0.01 * sky * checker) > 100


def test_the_night_report_shows_the_colour_stack(reduced_colour) -> None:
    _plan, _camera, archive = reduced_colour
    stack = archive.one("SELECT * FROM stacks")
    report = next((archive.root / "reports").glob("night-*.html")).read_text()
    assert Path(stack["preview_path"]).stem in report


@pytest.mark.slow
def test_a_night_of_debayered_cubes_is_stacked_in_colour(tmp_path: Path) -> None:
    """SharpCap-style 3-plane cubes (calibration frames too): masters of cubes, lights calibrated plane by plane,
    a colour stack; a cube of 4 planes is quarantined with its reason."""
    camera = tmp_path / "camera"
    plan = _colour_night(camera, "RGGB", "TOP-DOWN", debayered=True, dialect="sharpcap", n_light=3, meridian_flip=False)
    odd = camera / "odd" / "four_planes.fits"
    odd.parent.mkdir()
    fits.PrimaryHDU(np.ones((4, 64, 64), dtype=np.uint16), header=plan.header(plan.by_kind("light")[0])).writeto(odd)
    archive = reduce_night(camera, tmp_path / "archive")
    try:
        lights = archive.query("SELECT * FROM frames WHERE kind = 'light' AND path NOT LIKE '%four_planes%'")
        assert all(r["status"] == "stacked" and r["naxis3"] == 3 for r in lights), [r["reason"] for r in lights]
        for m in archive.query("SELECT * FROM masters"):
            assert m["naxis3"] == 3
            with fits.open(archive.root / m["path"]) as hdul:
                assert hdul[0].data.shape == (3, SIZE, SIZE)
                if m["kind"] == "flat":
                    assert hdul[0].header["FLATNORM"] == "median per plane"
        refused = archive.one("SELECT * FROM frames WHERE path LIKE '%four_planes%'")
        assert refused["status"] == "quarantined" and refused["reason"].startswith("unsupported_dimensions")
        rgb, _, _ = _stack_planes(archive)
        assert rgb.shape == (3, SIZE, SIZE)
    finally:
        archive.close()


def test_a_camera_whose_headers_say_nothing_is_set_by_the_configuration(tmp_path: Path) -> None:
    """No BAYERPAT in any header: taken as mono by default (its flat normalised by one median, and the mosaic's
    pattern makes its stars look trailed: nothing is stacked), in colour with the camera's [classify]
    bayer_pattern (the flat normalised per CFA position, every light stacked in colour)."""
    camera = tmp_path / "camera"
    plan = _colour_night(camera, "GRBG", "TOP-DOWN", bayer_header=False, n_light=3, meridian_flip=False, size=256)
    mono = reduce_night(camera, tmp_path / "mono")
    try:
        assert {r["cfa"] for r in mono.query("SELECT cfa FROM frames")} == {None}
        with fits.open(mono.root / mono.one("SELECT * FROM masters WHERE kind = 'flat'")["path"]) as hdul:
            assert hdul[0].header["FLATNORM"] == "median"
        assert mono.scalar("SELECT COUNT(*) FROM frames WHERE status = 'stacked'") == 0
    finally:
        mono.close()
    colour = reduce_night(camera, tmp_path / "colour", classify={"bayer_pattern": {COLOUR_CAMERA.lower(): "GRBG"}})
    try:
        lights = colour.query("SELECT * FROM frames WHERE kind = 'light'")
        assert {r["cfa"] for r in lights} == {plan.stored_pattern()}
        assert all(r["status"] == "stacked" for r in lights)
        flat = colour.one("SELECT * FROM masters WHERE kind = 'flat'")
        with fits.open(colour.root / flat["path"]) as hdul:
            assert hdul[0].header["FLATNORM"] == "median per CFA position"
            assert hdul[0].header["BAYERPAT"] == "GRBG"
        with fits.open(colour.root / colour.one("SELECT * FROM stacks")["path"]) as hdul:
            assert hdul[0].header["NAXIS3"] == 3
    finally:
        colour.close()


def test_a_mono_camera_on_the_same_target_gets_its_own_stack(tmp_path: Path) -> None:
    """A mono camera's lights of the same object, filter (none) and exposure as a colour camera's (a dual rig):
    their pixels differ, so they get their own reference and stack beside the colour one; none is lost."""
    camera = tmp_path / "camera"
    _colour_night(camera, "RGGB", "TOP-DOWN", n_light=2, meridian_flip=False, size=256, dialect="nina")
    simulate_night(
        camera,
        one_exposure_config(
            size=256,
            n_light=2,
            meridian_flip=False,
            dialect="maxim",
            camera="ZWO ASI1600MM",
            start="2026-11-25T23:00:00",
        ),
    )
    archive = reduce_night(camera, tmp_path / "archive")
    try:
        lights = archive.query("SELECT * FROM frames WHERE kind = 'light' ORDER BY date_obs")
        colour = [r for r in lights if r["cfa"] is not None]
        mono = [r for r in lights if r["cfa"] is None]
        assert len(colour) == len(mono) == 2
        assert all(r["status"] == "stacked" for r in lights), [(r["path"], r["reason"]) for r in lights]
        stacks = {s["id"]: s for s in archive.query("SELECT * FROM stacks")}
        assert len(stacks) == 2
        assert {stacks[r["stack_id"]]["planes"] for r in colour} == {3}
        assert {stacks[r["stack_id"]]["planes"] for r in mono} == {1}
        assert {stacks[r["stack_id"]]["camera"] for r in mono} == {"ZWO ASI1600MM"}
        assert len({s["path"] for s in stacks.values()}) == 2  # the second setup's stack is named after its camera
        for s in stacks.values():
            with fits.open(archive.root / s["path"]) as hdul:
                assert hdul[0].header["NAXIS"] == (3 if s["planes"] == 3 else 2)
    finally:
        archive.close()
