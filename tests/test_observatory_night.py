"""Observatory nights through the whole pipeline (``reduce_folders``, a real archive): overscan and trim by
default on a tile-compressed night whose bias level drifts, filters written in mixed case, a night without type
keywords whose dates carry a zone offset, frames set aside, and the readout a master must share with its light."""

from __future__ import annotations

import shutil
from collections import Counter
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.stats import mad_std
from conftest import reduce_night
from nightshift.daemon.archive import Archive
from nightshift.daemon.report import write_report
from nightshift.service.classify import UNTYPED_NOTE
from nightshift.service.filters import tidy
from nightshift.service.fitsio import read_image, read_mask
from nightshift.service.simulate import NightPlan, SimConfig, simulate_night

SITE = -70.85


@pytest.fixture(scope="module")
def observatory(tmp_path_factory) -> tuple[NightPlan, Path, Archive]:
    """Tile-compressed, 24 overscan + 8 prescan columns, a 30 ADU bias drift, filters in mixed case, LONGITUD."""
    camera = tmp_path_factory.mktemp("observatory") / "camera"
    config = SimConfig(
        size=160,
        dialect="observatory",
        overscan=24,
        prescan=8,
        bias_drift=30.0,
        compress="fz",
        filter_case="mixed",
        longitude=SITE,
        n_bias=5,
        n_dark=3,
        n_flat=5,
        n_light=3,
        light_exptimes=(60.0,),
        dark_exptimes=(60.0,),
        stars=900.0,
    )
    plan = simulate_night(camera, config)
    archive = reduce_night(camera, tmp_path_factory.mktemp("observatory") / "archive", workers=2)
    yield plan, camera, archive
    archive.close()


def _rows(archive: Archive, camera: Path) -> dict[str, dict]:
    return {Path(r["path"]).relative_to(camera).as_posix(): r for r in archive.query("SELECT * FROM frames")}


def test_every_frame_read_and_every_light_calibrated_to_the_trimsec_shape(observatory):
    plan, camera, archive = observatory
    rows = _rows(archive, camera)
    assert len(rows) == len(plan.frames)
    readout = "overscan [171:192,1:160], trim [9:168,1:160]: 160x160"
    for frame in plan.frames:
        row = rows[frame.name]
        assert row["kind"] == frame.kind and row["readout"] == readout, frame.name
        assert row["status"] in ("used", "stacked", "rejected"), (frame.name, row["status"], row["reason"])
        assert row["camera"] == "SBIG ST-8300M"  # from DETECTOR
        assert row["date_source"] == "DATE-OBS+UTC-OBS" and row["night"] == "2026-11-25"
        assert abs((datetime.fromisoformat(row["date_obs"]) - frame.date_obs).total_seconds()) < 1e-3
        if frame.kind == "light":
            image = read_image(archive.root / row["calibrated_path"])
            assert image.data.shape == (160, 160) and image.header["TRIM"] == "[9:168,1:160]"
    masters = archive.query("SELECT kind, readout, naxis1, naxis2 FROM masters")
    assert {m["readout"] for m in masters} == {readout} and {m["naxis1"] for m in masters} == {192}


def test_calibrated_lights_match_the_truth_despite_the_drift(observatory):
    plan, camera, archive = observatory
    rows = _rows(archive, camera)
    for frame in plan.by_kind("light"):
        row = rows[frame.name]
        path = archive.root / row["calibrated_path"]
        residual = (read_image(path).data - plan.truth_signal(frame))[~read_mask(path)]
        assert abs(float(np.median(residual) / mad_std(residual))) <= 0.05, frame.name


def test_filters_in_mixed_case_are_one_set_under_the_most_used_spelling(observatory):
    plan, camera, archive = observatory
    written = Counter()
    for frame in plan.frames:
        if frame.filter:
            cards = fits.getheader(camera / frame.name, 1)
            written[tidy(cards["FILTER1"] if cards["FILTER1"] != "Clear" else cards["FILTER2"])] += 1
    assert written["b"] and written["B"] > written["b"]  # both spellings were written; B the most
    flats = archive.query("SELECT filter, n_frames FROM masters WHERE kind = 'flat' ORDER BY filter")
    assert flats == [{"filter": "B", "n_frames": 5}, {"filter": "V", "n_frames": 5}]
    assert {r["filter"] for r in archive.query("SELECT filter FROM frames WHERE filter IS NOT NULL")} == {"B", "V"}
    assert archive.scalar("SELECT COUNT(*) FROM frames WHERE header_note LIKE '%filter ''b'' filed as ''B''%'") > 0


@pytest.fixture(scope="module")
def untyped(tmp_path_factory) -> tuple[NightPlan, Path]:
    """Issue 14's camera: no frame-type keyword at all, DATE-OBS local at UTC-7 beside a UTC UT-OBS."""
    camera = tmp_path_factory.mktemp("untyped") / "camera"
    config = SimConfig(
        size=128,
        dialect="maxim",
        untyped="all",
        time_keys="offset",
        utc_offset=-7.0,
        n_bias=3,
        n_dark=3,
        n_flat=3,
        n_light=3,
        filters=("V",),
        light_exptimes=(30.0,),
        dark_exptimes=(30.0,),
        stars=900.0,
    )
    plan = simulate_night(camera, config)
    focus = fits.open(camera / plan.by_kind("light")[0].name)
    focus[0].header["IMAGETYP"] = "FOCUS"
    focus.writeto(camera / "focus_0001.fit")
    return plan, camera


OVERRIDES = [
    {"glob": "*/CALIB/BIAS/*", "kind": "bias"},
    {"glob": "*/CALIB/DARK/*", "kind": "dark"},
    {"glob": "*/CALIB/FLAT/*", "kind": "flat"},
]


def test_a_night_without_type_keywords_and_with_offset_dates_is_calibrated_and_stacked(untyped, tmp_path):
    plan, camera = untyped
    archive = reduce_night(camera, tmp_path / "archive", classify={"overrides": OVERRIDES})
    rows = _rows(archive, camera)
    for frame in plan.frames:
        row = rows[frame.name]
        assert row["kind"] == frame.kind, frame.name
        assert abs((datetime.fromisoformat(row["date_obs"]) - frame.date_obs).total_seconds()) < 1e-3  # UTC
        assert "UT-OBS agrees" in row["header_note"]
        if frame.kind == "light":
            assert row["dialect"] == "untyped" and UNTYPED_NOTE in row["header_note"]
            assert row["status"] in ("stacked", "rejected") and row["calibrated_path"], (frame.name, row["reason"])
    assert archive.scalar("SELECT COUNT(*) FROM frames WHERE status = 'stacked'") >= 2
    assert archive.query("SELECT n_frames FROM stacks")[0]["n_frames"] >= 2
    focus = rows["focus_0001.fit"]
    assert focus["status"] == "ignored" and "a focus frame" in focus["reason"] and focus["kind"] == "other"
    # the night's report lists the frame set aside, with its reason
    page = write_report(archive, focus["night"]).read_text()
    assert "focus_0001.fit" in page and "set aside" in page
    archive.close()


def test_strict_sites_keep_untyped_frames_in_quarantine(untyped, tmp_path):
    plan, camera = untyped
    only_lights = tmp_path / "camera"
    for frame in plan.by_kind("light")[:2]:
        (only_lights / frame.name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(camera / frame.name, only_lights / frame.name)
    archive = reduce_night(only_lights, tmp_path / "archive", classify={"untyped_lights": False})
    reasons = [r["reason"] for r in archive.query("SELECT status, reason FROM frames")]
    assert len(reasons) == 2 and all(r.startswith("unknown_type:") and "override" in r for r in reasons)
    archive.close()


def test_overscan_off_keeps_the_raw_frame(tmp_path):
    camera = tmp_path / "camera"
    plan = simulate_night(
        camera,
        SimConfig(size=64, dialect="observatory", overscan=12, n_light=1, filters=("V",), light_exptimes=(30.0,)),
    )
    archive = reduce_night(camera, tmp_path / "archive", calibration={"overscan": "off", "trim": "off"})
    rows = archive.query("SELECT readout, calibrated_path FROM frames WHERE kind = 'light'")
    assert {r["readout"] for r in rows} == {"raw"}
    assert read_image(archive.root / rows[0]["calibrated_path"]).data.shape == plan.raw_shape == (64, 76)
    archive.close()
