"""Tests of the night simulator: its files look like a real camera's and its truth matches its pixels."""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import Counter
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import astroalign
import numpy as np
import pytest
import sep
from astropy.io import fits
from nightshift.service.frame import QUARANTINE_REASONS
from nightshift.service.simulate import (
    BIAS_LEVEL,
    BROKEN_FILES,
    DIALECTS,
    GAIN,
    READ_NOISE,
    SATURATION,
    NightPlan,
    SimConfig,
    plan_night,
    simulate_night,
    write_frame,
)


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, NightPlan]:
    """A small written night with broken files, in mixed dialects."""
    out = tmp_path_factory.mktemp("night")
    plan = simulate_night(out, SimConfig(size=256, n_bias=3, n_dark=3, n_flat=3, n_light=2, broken=True, seed=3))
    return out, plan


@pytest.fixture(scope="module")
def plan512() -> NightPlan:
    """A 512-pixel night, planned only (frames are rendered in memory)."""
    return plan_night(SimConfig(size=512, seed=7))


def _raw_cards(path: Path) -> dict[str, str]:
    """The primary header's cards (every block up to END) as raw text, without astropy's interpretation."""
    raw = path.read_bytes()
    cards: list[str] = []
    for i in range(0, len(raw), 80):
        card = raw[i : i + 80].decode("ascii")
        if card.startswith("END "):
            break
        cards.append(card)
    return {c[:8].strip(): c[10:].split(" /")[0].strip() for c in cards if c[8:10] == "= "}


def _header_date(h: fits.Header) -> datetime:
    text = h["DATE-OBS"] + ("T" + h["TIME-OBS"] if "TIME-OBS" in h else "")
    text = re.sub(r"(\.\d{6})\d+$", r"\1", text)  # 7-digit fractions (SharpCap) to microseconds
    return datetime.fromisoformat(text)


def _f32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32)


def _calibrated(plan: NightPlan, frame) -> np.ndarray:
    raw, _ = plan.render(frame)
    dark = plan.true_dark_rate() * np.float32(frame.exptime)
    return (_f32(raw) - plan.true_bias() - dark) / plan.true_response(frame.filter)


def _detect(image: np.ndarray, thresh: float = 5.0) -> np.ndarray:
    data = np.ascontiguousarray(image, dtype=np.float32)
    bkg = sep.Background(data)
    return sep.extract(data - bkg.back(), thresh, err=bkg.globalrms)


# -- files on disk -------------------------------------------------------------------------------------------
def test_every_sound_file_is_uint16_with_bzero_on_disk(night):
    out, plan = night
    sound = [f for f in plan.frames if f.broken is None]
    assert len(sound) == sum(v for k, v in plan.counts().items() if k != "broken")
    for f in sound:
        path = out / f.name
        cards = _raw_cards(path)
        assert cards["BITPIX"] == "16", f.name
        assert float(cards["BZERO"]) == 32768.0, f.name
        with fits.open(path) as hdul:
            assert hdul[0].data.dtype == np.uint16
            assert hdul[0].data.shape == (256, 256)


def test_files_are_filed_in_capture_program_subfolders(night):
    out, plan = night
    for f in plan.frames:
        assert (out / f.name).is_file()
        assert "\\" not in f.name and not f.name.startswith("/")
        if f.broken is None and f.object != "../../etc/passwd":
            date, group, kind_folder, _ = f.name.split("/")
            assert date == "2026-11-25"
            assert kind_folder == f.kind.upper()
            assert group == ("CALIB" if f.kind != "light" else "NGC_6939")
    flat = plan_night(SimConfig(size=64, subfolders=False, n_light=1, dialect="nina"))
    assert all("/" not in f.name for f in flat.frames)
    assert len({f.name for f in flat.frames}) == len(flat.frames)


def test_counts_and_plan_shape():
    plan = plan_night(SimConfig(size=64, n_bias=2, n_dark=3, n_flat=4, n_light=2, broken=True))
    counts = plan.counts()
    # 2 filters x 2 exposures x 2 repeats, plus the hostile light; 11 broken files.
    assert counts == {"bias": 2, "dark": 6, "flat": 8, "light": 9, "broken": len(BROKEN_FILES)}
    assert [f.index for f in plan.frames] == list(range(len(plan.frames)))


def test_config_rejects_unknown_words():
    with pytest.raises(ValueError):
        SimConfig(dialect="photoshop")
    with pytest.raises(ValueError):
        SimConfig(order="random")


# -- the camera ----------------------------------------------------------------------------------------------
def test_bias_level_read_noise_and_fixed_pattern(plan512):
    biases = [_f32(plan512.render(f)[0]) for f in plan512.by_kind("bias")[:3]]
    single = biases[0]
    assert abs(single.mean() - BIAS_LEVEL) < 2.0
    assert 11.5 < single.std() < 14.5  # read noise 12 plus the fixed pattern
    master = np.mean(biases, axis=0)
    # The notebook: 12.5 for one bias, 8.4 for a master of 3, above the 7.2 that read noise alone would give.
    assert READ_NOISE / np.sqrt(3) + 0.3 < master.std() < single.std() - 2
    residual = single - plan512.true_bias()
    assert abs(residual.mean()) < 0.5
    assert abs(residual.std() - READ_NOISE) < 0.5
    column_pattern = plan512.true_bias().mean(axis=0)
    assert column_pattern.std() > 3.0


def test_dark_current_and_hot_pixels_scale_with_exposure(plan512):
    darks = {f.exptime: f for f in plan512.by_kind("dark")}
    bias = plan512.true_bias()
    d30 = _f32(plan512.render(darks[30.0])[0]) - bias
    d300 = _f32(plan512.render(darks[300.0])[0]) - bias
    assert 5.0 < d300.mean() < 50.0  # "a 300 s dark holds under ~50 ADU of dark current"
    assert d30.mean() < d300.mean() / 5
    hot = plan512.hot_pixels()
    assert 20 < hot.sum() < 0.01 * hot.size
    assert (d300[hot] > 1000).sum() > hot.sum() / 3  # far above the dark current
    assert (d300 > 1000).sum() <= hot.sum() + 30  # nothing else is (a few cosmic rays at most)
    rate = plan512.true_dark_rate()
    usable = hot & (rate * 300 < 50000) & (rate * 30 > 300)
    assert usable.sum() > 5
    ratio = np.median(d300[usable] / d30[usable])
    assert 9.0 < ratio < 11.0


def test_flats_show_vignetting_and_dust_per_filter(plan512):
    for filt in ("B", "V"):
        resp = plan512.true_response(filt)
        assert np.median(resp) == pytest.approx(1.0, abs=1e-6)
        assert resp.dtype == np.float32
    b, v = plan512.true_response("B"), plan512.true_response("V")
    assert np.abs(b - v).max() > 0.01  # each filter has its own dust
    flat = next(f for f in plan512.by_kind("flat") if f.filter == "V")
    raw = _f32(plan512.render(flat)[0]) - plan512.true_bias()
    centre = np.median(raw[236:276, 236:276])
    corners = np.median(np.concatenate([raw[:40, :40].ravel(), raw[-40:, -40:].ravel()]))
    assert corners < 0.85 * centre
    assert 15000 < centre < 35000
    normalised = raw / flat.level / plan512.true_response("V")
    assert np.median(normalised) == pytest.approx(1.0, abs=0.01)


def test_render_matches_truth_plus_noise():
    plan = plan_night(SimConfig(size=256, cosmic_rays=0.0, seed=11))
    for frame in (plan.by_kind("light")[1], plan.by_kind("flat")[0]):
        raw, _ = plan.render(frame)
        resp = plan.true_response(frame.filter)
        dark = plan.true_dark_rate() * np.float32(frame.exptime)
        truth = plan.truth_signal(frame)
        residual = (_f32(raw) - plan.true_bias() - dark) / resp - truth
        expected = resp * truth + dark
        ok = raw < SATURATION
        z = (residual * resp / np.sqrt(expected / GAIN + READ_NOISE**2))[ok]
        assert abs(z.mean()) < 0.03
        assert 0.95 < z.std() < 1.05


def test_exact_poisson_gives_the_same_statistics():
    plan = plan_night(SimConfig(size=128, cosmic_rays=0.0, exact_poisson=True))
    frame = plan.by_kind("flat")[0]
    raw, _ = plan.render(frame)
    expected = plan.true_response(frame.filter) * frame.level
    z = (_f32(raw) - plan.true_bias() - expected) / np.sqrt(expected / GAIN + READ_NOISE**2)
    assert abs(z.mean()) < 0.05
    assert 0.95 < z.std() < 1.05


def test_rendering_is_deterministic_per_seed():
    a = plan_night(SimConfig(size=128, seed=5))
    b = plan_night(SimConfig(size=128, seed=5))
    c = plan_night(SimConfig(size=128, seed=6))
    frame = a.by_kind("light")[0]
    assert a.frame_bytes(frame) == b.frame_bytes(b.frames[frame.index])
    assert a.frame_bytes(frame) != c.frame_bytes(c.frames[frame.index])
    assert [f.name for f in a.frames] == [f.name for f in b.frames]
    # A frame's pixels do not depend on what else was rendered before it.
    fresh = plan_night(SimConfig(size=128, seed=5))
    assert np.array_equal(fresh.render(fresh.frames[frame.index])[0], a.render(frame)[0])


# -- stars, pointing, cloud and the meridian flip ------------------------------------------------------------
def test_thirty_second_light_has_enough_stars_where_the_plan_says(plan512):
    frame = next(f for f in plan512.by_kind("light") if f.exptime == 30.0 and f.filter == "B" and not f.cloudy)
    raw = _f32(plan512.render(frame)[0])
    found = _detect(raw)
    assert len(found) >= 30
    pos = plan512.star_positions(frame)
    inside = (pos[:, 0] > 10) & (pos[:, 0] < 501) & (pos[:, 1] > 10) & (pos[:, 1] < 501)
    brightest = pos[inside][:15]
    detected = np.stack([found["x"], found["y"]], axis=1)
    dist = np.linalg.norm(brightest[:, None, :] - detected[None, :, :], axis=2).min(axis=1)
    assert np.median(dist) < 0.2
    assert (dist < 0.5).sum() >= 13  # (a blend or two may pull a centroid)


def test_lights_have_small_offsets_and_rotations(plan512):
    lights = plan512.by_kind("light")
    offsets = np.array([f.offset for f in lights])
    assert np.abs(offsets).max() <= 4.0
    assert np.abs(offsets).max() > 0.5
    assert all(abs(f.rotation) < 0.5 for f in lights)
    assert all(2.5 < f.fwhm < 4.0 for f in lights)


def test_cloudy_frame_sits_in_the_largest_group_with_faint_stars_and_bright_sky(plan512):
    lights = plan512.by_kind("light")
    cloudy = [f for f in lights if f.cloudy]
    assert len(cloudy) == 1
    c = cloudy[0]
    group = [f for f in lights if (f.object, f.filter, f.exptime) == (c.object, c.filter, c.exptime)]
    assert len(group) == max(Counter((f.object, f.filter, f.exptime) for f in lights).values())
    clear = next(f for f in group if not f.cloudy)
    assert c.level > 2 * clear.level
    ratio = plan512.star_fluxes(c) / plan512.star_fluxes(clear)
    assert 0.15 < np.median(ratio) < 0.25
    n_cloudy = len(_detect(_calibrated(plan512, c)))
    n_clear = len(_detect(_calibrated(plan512, clear)))
    assert n_cloudy < 0.6 * n_clear


def test_meridian_flip_turns_the_second_half_of_each_objects_lights(plan512):
    lights = sorted(plan512.by_kind("light"), key=lambda f: f.date_obs)
    flips = [f.flipped for f in lights]
    half = len(lights) // 2
    assert flips == [False] * half + [True] * (len(lights) - half)
    for group in {(f.filter, f.exptime) for f in lights}:
        members = {f.flipped for f in lights if (f.filter, f.exptime) == group}
        assert members == {False, True}
    assert not any(f.flipped for f in plan_night(SimConfig(size=64, meridian_flip=False)).by_kind("light"))


def test_flipped_star_positions_are_the_180_degree_rotation(plan512):
    frame = next(f for f in plan512.by_kind("light") if f.flipped)
    cx, cy = plan512.centre
    assert (cx, cy) == (255.5, 255.5)
    unflipped = replace(frame, flipped=False)
    off = np.array(frame.offset)
    p_flip = plan512.star_positions(frame) - off
    p_plain = plan512.star_positions(unflipped) - off
    assert np.allclose(p_flip - [cx, cy], -(p_plain - [cx, cy]))
    # The pixels too: the noise-free stars of a flipped frame are the unflipped ones turned by 180 degrees.
    still = {"offset": (0.0, 0.0), "rotation": 0.0, "sky_gradient": (0.0, 0.0)}
    turned = plan512.truth_signal(replace(frame, **still))
    upright = plan512.truth_signal(replace(frame, flipped=False, **still))
    assert np.allclose(turned, upright[::-1, ::-1], rtol=1e-4, atol=1e-2)


def test_astroalign_recovers_the_planned_transform_across_the_flip(plan512):
    lights = [f for f in plan512.by_kind("light") if f.exptime == 30.0 and f.filter == "V"]
    before = next(f for f in lights if not f.flipped)
    after = next(f for f in lights if f.flipped)
    found, _ = astroalign.find_transform(_calibrated(plan512, before), _calibrated(plan512, after))
    planned = plan512.transform(after) @ np.linalg.inv(plan512.transform(before))
    probe = np.array([[50.0, 50.0, 1.0], [256.0, 256.0, 1.0], [460.0, 400.0, 1.0]]).T
    assert np.abs(found.params @ probe - planned @ probe).max() < 0.5


# -- headers -------------------------------------------------------------------------------------------------
_TYPES = {
    "maxim": (
        "IMAGETYP",
        {"bias": "Bias Frame", "dark": "Dark Frame", "flat": "Flat Field", "light": "Light Frame"},
    ),
    "nina": ("IMAGETYP", {"bias": "BIAS", "dark": "DARK", "flat": "FLAT", "light": "LIGHT"}),
    "ekos": ("FRAME", {"bias": "Bias", "dark": "Dark", "flat": "Flat", "light": "Light"}),
    "sharpcap": ("IMAGETYP", {"bias": "Bias", "dark": "Dark", "flat": "Flat", "light": "Light"}),
    "sgp": (
        "IMAGETYP",
        {"bias": "Bias Frame", "dark": "Dark Frame", "flat": "Flat Frame", "light": "Light Frame"},
    ),
    "apt": ("IMAGETYP", {"bias": "Bias", "dark": "Dark", "flat": "Flat", "light": "Light"}),
    "asiair": ("IMAGETYP", {"bias": "Bias", "dark": "Dark", "flat": "Flat", "light": "Light"}),
    "iraf": ("IMAGETYP", {"bias": "zero", "dark": "dark", "flat": "flat", "light": "object"}),
}
_EXPOSURE_WORDS = {
    "maxim": {"EXPTIME", "EXPOSURE"},
    "nina": {"EXPTIME", "EXPOSURE"},
    "ekos": {"EXPTIME"},
    "sharpcap": {"EXPTIME"},
    "sgp": {"EXPTIME", "EXPOSURE"},
    "apt": {"EXPOSURE"},
    "asiair": {"EXPTIME", "EXPOSURE"},
    "iraf": {"EXPTIME"},
}


@pytest.mark.parametrize("dialect", DIALECTS)
def test_each_dialect_writes_its_own_words(tmp_path, dialect):
    config = SimConfig(
        size=64,
        n_bias=1,
        n_dark=1,
        dark_exptimes=(30.0,),
        n_flat=1,
        filters=("V",),
        light_exptimes=(30.0,),
        n_light=1,
        dialect=dialect,
        meridian_flip=False,
        cloudy=0,
    )
    plan = simulate_night(tmp_path, config)
    key, words = _TYPES[dialect]
    assert {f.dialect for f in plan.frames} == {dialect}
    for f in plan.frames:
        path = tmp_path / f.name
        h = fits.getheader(path)
        assert h[key] == words[f.kind], (dialect, f.kind)
        if dialect == "ekos":
            assert h["IMAGETYP"] == "Light Frame"  # misleading on every frame: FRAME must win
        else:
            assert "FRAME" not in h
        present = {k for k in ("EXPTIME", "EXPOSURE") if k in h}
        assert present == _EXPOSURE_WORDS[dialect]
        assert all(h[k] == f.exptime for k in present)
        assert _header_date(h) == f.date_obs
        assert h["INSTRUME"] == "SBIG ST-8300M"
        assert h["CCD-TEMP"] == pytest.approx(-10.0, abs=0.5)
        if f.kind in ("flat", "light"):
            assert h["FILTER"] == "V"  # astropy drops trailing blanks
        else:
            assert "FILTER" not in h
        if f.kind == "light":
            assert h["OBJECT"] == "NGC 6939"
    if dialect == "iraf":
        assert re.fullmatch(r"\d{4}-\d\d-\d\d", h["DATE-OBS"]) and re.fullmatch(r"[\d:]+\.\d", h["TIME-OBS"])
        assert h["CCDSUM"] == "1 1"
    elif dialect in ("sgp", "apt"):
        assert re.fullmatch(r"[\d-]+T[\d:]+", h["DATE-OBS"])  # no fraction of a second
    else:
        assert re.fullmatch(r"[\d-]+T[\d:]+\.\d+", h["DATE-OBS"])
    if dialect == "sharpcap":
        assert len(h["DATE-OBS"].split(".")[1]) == 7
    if dialect == "nina":
        assert {"GAIN", "OFFSET", "READOUTM", "SET-TEMP"} <= set(h)
    if dialect in ("sgp", "apt"):
        light = next(f for f in plan.frames if f.kind == "light")
        assert re.fullmatch(r"'V {11}'", _raw_cards(tmp_path / light.name)["FILTER"])


def test_mixed_dialect_cycles_through_all(night):
    _, plan = night
    sound = [f for f in plan.frames if f.broken is None]
    assert {f.dialect for f in sound} == set(DIALECTS)
    assert {Path(f.name).suffix for f in sound} == {".fits", ".fit"}


def test_dates_follow_the_night_in_writing_order(night):
    _, plan = night
    dates = [f.date_obs for f in plan.frames]
    assert dates == sorted(dates)
    assert dates[0] == datetime(2026, 11, 25, 18, 30)
    assert all(d.tzinfo is None for d in dates)


# -- orders --------------------------------------------------------------------------------------------------
def test_orders():
    base = {"size": 64, "n_light": 2, "dialect": "nina"}
    natural = plan_night(SimConfig(**base))
    kinds = [f.kind for f in natural.frames]
    assert kinds == sorted(kinds, key=["bias", "dark", "flat", "light"].index)
    first = plan_night(SimConfig(order="lights-first", **base))
    kinds = [f.kind for f in first.frames]
    assert kinds == sorted(kinds, key=["light", "flat", "dark", "bias"].index)
    assert [f.date_obs for f in first.frames] == sorted(f.date_obs for f in first.frames)
    shuffled = plan_night(SimConfig(order="shuffled", **base))
    assert [f.name for f in shuffled.frames] != [f.name for f in natural.frames]
    by_name = {f.name: f for f in natural.frames}
    assert sorted(by_name) == sorted(f.name for f in shuffled.frames)
    for f in shuffled.frames:  # same night, written in another order
        twin = by_name[f.name]
        assert (f.kind, f.exptime, f.filter, f.date_obs, f.flipped) == (
            twin.kind,
            twin.exptime,
            twin.filter,
            twin.date_obs,
            twin.flipped,
        )


# -- broken and hostile files --------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:File may have been truncated")
def test_broken_files_fail_in_the_stated_ways(night):
    out, plan = night
    broken = {Path(f.name).stem: f for f in plan.frames if f.broken}
    assert set(broken) == set(BROKEN_FILES)
    assert all(f.broken in QUARANTINE_REASONS and f.name.startswith("broken/") for f in broken.values())
    path = {stem: out / f.name for stem, f in broken.items()}

    assert path["empty"].stat().st_size == 0
    assert not path["not_fits"].read_bytes().startswith(b"SIMPLE")
    with pytest.raises(Exception):  # noqa: B017 - astropy raises TypeError or OSError depending on version
        fits.getdata(path["truncated"])
    assert path["truncated"].stat().st_size < 2880 + 256 * 256 * 2
    assert fits.getheader(path["truncated"])["NAXIS1"] == 256  # the header itself is whole
    assert fits.getheader(path["no_image_data"])["NAXIS"] == 0
    assert fits.getdata(path["cube"]).ndim == 3

    unknown = fits.getheader(path["unknown_type"])
    assert unknown["IMAGETYP"] == "Mystery" and "FRAME" not in unknown
    missing = fits.getheader(path["missing_exposure"])
    assert "EXPTIME" not in missing and "EXPOSURE" not in missing and missing["IMAGETYP"] == "LIGHT"
    bad = fits.getheader(path["bad_exptime"])
    assert bad["EXPTIME"] == "abc" and "EXPOSURE" not in bad
    assert fits.getheader(path["bad_date"])["DATE-OBS"] == "yesterday"

    constant = fits.getdata(path["constant"])
    assert constant.min() == constant.max()
    nan = fits.getdata(path["nan"])
    assert _raw_cards(path["nan"])["BITPIX"] == "-32" and np.isnan(nan).all()

    with pytest.raises(ValueError):
        plan.render(broken["truncated"])


def test_hostile_light_is_a_valid_frame_with_dangerous_words(night):
    out, plan = night
    hostile = [f for f in plan.frames if f.object == "../../etc/passwd"]
    assert len(hostile) == 1
    f = hostile[0]
    assert f.broken is None and f.kind == "light"
    with fits.open(out / f.name) as hdul:
        h = hdul[0].header
        assert h["OBJECT"] == "../../etc/passwd"
        assert "/" in h["FILTER"]
        assert hdul[0].data.dtype == np.uint16 and hdul[0].data.std() > 5


# -- writing like a camera -----------------------------------------------------------------------------------
def test_slow_write_grows_the_file_in_chunks(tmp_path):
    plan = plan_night(SimConfig(size=256, n_bias=1, n_dark=0, n_flat=0, n_light=0))
    frame = plan.frames[0]
    final = tmp_path / frame.name
    payload = plan.frame_bytes(frame)
    writer = threading.Thread(
        target=write_frame, args=(plan, frame, tmp_path), kwargs={"slow": True, "chunk_bytes": 16384}
    )
    sizes = set()
    writer.start()
    while writer.is_alive():
        if final.exists():
            sizes.add(final.stat().st_size)
        time.sleep(0.002)
    writer.join()
    assert len({s for s in sizes if 0 < s < len(payload)}) >= 2
    assert final.read_bytes() == payload


def test_rename_writes_a_temporary_then_the_final_name(tmp_path):
    plan = plan_night(SimConfig(size=128, n_bias=1, n_dark=0, n_flat=0, n_light=0))
    frame = plan.frames[0]
    path = write_frame(plan, frame, tmp_path, rename=True, slow=True, chunk_bytes=8192, chunk_delay=0.0)
    assert path == tmp_path / frame.name
    assert path.read_bytes() == plan.frame_bytes(frame)
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_4k_benchmark_night_can_be_planned():
    plan = plan_night(SimConfig(size=4096, n_light=10, objects=("NGC 6939", "M 31")))
    assert plan.shape == (4096, 4096)
    assert plan.counts()["light"] == 2 * 10 * 2 * 2
    assert len(plan.star_catalogue("M 31")["x"]) > 10000


def test_truth_file_says_what_every_file_is(tmp_path: Path) -> None:
    from nightshift.service.simulate import TRUTH_FILE

    plan = simulate_night(tmp_path, SimConfig(size=96, n_bias=3, n_dark=3, n_flat=3, n_light=3, trailed=1))
    truth = json.loads((tmp_path / TRUTH_FILE).read_text())
    assert truth["shape"] == [96, 96] and truth["saturation"] == SATURATION
    assert set(truth["frames"]) == {f.name for f in plan.frames}
    for f in plan.frames:
        t = truth["frames"][f.name]
        assert t["kind"] == f.kind and t["exptime"] == f.exptime and (tmp_path / f.name).is_file()
        if f.kind == "light":
            assert np.allclose(t["transform"], plan.transform(f))
            assert (t["cloudy"], t["trailed"], t["flipped"]) == (f.cloudy, f.trailed, f.flipped)
            assert t["good"] == (not f.cloudy and not f.trailed)
    lights = [t for t in truth["frames"].values() if t["kind"] == "light"]
    assert sum(t["trailed"] for t in lights) == 1 and sum(t["cloudy"] for t in lights) == 1
    assert not any(t["trailed"] and t["cloudy"] for t in lights)


def test_a_trailed_light_is_streaked_around_its_true_positions() -> None:
    plan = plan_night(SimConfig(size=256, n_light=2, filters=("V",), light_exptimes=(300.0,), cloudy=0, trailed=1))
    trailed = next(f for f in plan.by_kind("light") if f.trailed)
    length = math.hypot(*trailed.trail)
    assert 9.0 <= length <= 14.0
    steady = replace(trailed, trail=(0.0, 0.0))
    streak, star = plan.truth_signal(trailed), plan.truth_signal(steady)
    assert streak.sum() == pytest.approx(star.sum(), rel=1e-3), "the drift moves light, it does not lose it"
    # around the brightest star: the light keeps its centroid (the drift is centred on the pointing) and spreads
    x, y = plan.star_positions(trailed)[0]
    cut = (slice(int(y) - 25, int(y) + 26), slice(int(x) - 25, int(x) + 26))
    yy, xx = np.mgrid[cut]
    sky = np.median(star)
    centroids = []
    for img in (streak, star):
        w = np.clip(img[cut] - sky, 0, None)
        centroids.append(((w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()))
    assert np.allclose(centroids[0], centroids[1], atol=0.05)
    assert streak[cut].max() < 0.5 * star[cut].max()


def test_long_exposures_saturate_and_a_fainter_field_goes_deeper() -> None:
    plan = plan_night(SimConfig(size=256, n_light=1, filters=("V",), cloudy=0))
    raw = {f.exptime: plan.render(f)[0] for f in plan.by_kind("light")}
    assert (raw[300.0] == SATURATION).sum() > 10 * max(1, (raw[30.0] == SATURATION).sum())
    plain, deep = (plan_night(SimConfig(size=256, faintest=v)).star_catalogue("NGC 6939") for v in (8.0, 2.0))
    assert len(deep["x"]) > 2 * len(plain["x"]) and deep["flux_v"].min() < 8.0 <= plain["flux_v"].min()
