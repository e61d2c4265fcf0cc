"""The whole pipeline on simulated nights, through ``reduce_folders`` (what ``nightshift reduce`` runs), against
a real SQLite archive: statuses and reasons, master choice, order independence, idempotence, the library of
earlier nights, rebuilt masters, duplicates and hostile header values."""

from __future__ import annotations

import shutil
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
from astropy.io import fits
from conftest import make_config, reduce_night
from nightshift.daemon.archive import GOOD_STATUSES, Archive
from nightshift.daemon.batch import reduce_folders, reprocess
from nightshift.daemon.pipeline import Pipeline
from nightshift.service.simulate import BROKEN_FILES, SimConfig, plan_night, simulate_night, write_frame


def _lights(archive: Archive) -> list[dict]:
    return archive.query("SELECT * FROM frames WHERE kind = 'light' ORDER BY id")


def test_every_file_recorded_once_with_its_true_kind(night, reduced: Archive) -> None:
    plan, camera = night
    rows = {Path(r["path"]).relative_to(camera).as_posix(): r for r in reduced.query("SELECT * FROM frames")}
    assert len(rows) == len(plan.frames)
    for f in plan.frames:
        row = rows[f.name]
        if f.broken:
            assert row["status"] == "quarantined", f.name
            assert row["reason"].startswith(f.broken + ":"), (f.name, row["reason"])
        else:
            assert row["kind"] == f.kind, f.name


def test_every_row_not_in_a_good_state_has_a_reason(reduced: Archive) -> None:
    bad = reduced.query(
        f"SELECT path, status FROM frames WHERE status NOT IN ({','.join('?' * len(GOOD_STATUSES))}) "
        "AND (reason IS NULL OR reason = '')",
        list(GOOD_STATUSES),
    )
    assert bad == []


def test_quarantine_notes_are_written_and_raw_files_untouched(night, reduced: Archive) -> None:
    plan, camera = night
    notes = list((reduced.root / "quarantine").rglob("*.json"))
    assert len(notes) == sum(1 for f in plan.frames if f.broken) == len(BROKEN_FILES)
    for f in plan.frames:
        assert (camera / f.name).exists(), f"raw file {f.name} was moved or deleted"


def test_masters_built_for_every_set(reduced: Archive) -> None:
    masters = reduced.query("SELECT kind, filter, exptime, n_frames, bias_subtracted FROM masters ORDER BY id")
    kinds = sorted((m["kind"], m["filter"], m["exptime"]) for m in masters)
    assert kinds == [
        ("bias", None, 0.0),
        ("dark", None, 30.0),
        ("dark", None, 300.0),
        ("flat", "B", 2.0),
        ("flat", "V", 2.0),
    ]
    assert all(m["n_frames"] == 5 for m in masters)
    assert all(m["bias_subtracted"] for m in masters if m["kind"] != "bias")
    for m in reduced.query("SELECT * FROM masters"):
        header = fits.getheader(reduced.root / m["path"])
        assert header["NCOMBINE"] == 5
        links = reduced.scalar("SELECT COUNT(*) FROM master_frames WHERE master_id = ?", [m["id"]])
        assert links == 5


def test_lights_calibrated_with_the_right_masters(reduced: Archive) -> None:
    lights = [r for r in _lights(reduced) if r["calibrated_path"]]
    assert len(lights) >= 16
    for r in lights:
        flat = reduced.one("SELECT * FROM masters WHERE id = ?", [r["flat_id"]])
        dark = reduced.one("SELECT * FROM masters WHERE id = ?", [r["dark_id"]])
        assert flat["filter"] == r["filter"]
        assert dark["exptime"] == r["exptime"] and r["dark_scale"] == 1.0
        assert r["bias_id"] is not None
        assert "flat: master flat" in r["calibration_note"]
        data = fits.getdata(reduced.root / r["calibrated_path"])
        assert data.dtype.kind == "f" and data.dtype.itemsize == 4
        header = fits.getheader(reduced.root / r["calibrated_path"])
        history = "\n".join(str(h) for h in header.get("HISTORY", []))
        assert flat["sha256"][:16] in history, "calibrated header names the flat's checksum"


def test_cloudy_frame_rejected_and_good_frames_stacked(night, reduced: Archive) -> None:
    plan, camera = night
    cloudy = [f for f in plan.frames if f.cloudy]
    assert len(cloudy) == 1
    row = reduced.frame_by_path(str(camera / cloudy[0].name))
    assert row["status"] == "rejected" and row["reason"].startswith("cloudy"), row["reason"]
    good = [f for f in plan.frames if f.kind == "light" and not f.cloudy and not f.broken and f.object == "NGC 6939"]
    statuses = {reduced.frame_by_path(str(camera / f.name))["status"] for f in good}
    assert statuses == {"stacked"}
    stacks = reduced.query("SELECT * FROM stacks ORDER BY filter, exptime")
    assert [(s["filter"], s["exptime"]) for s in stacks] == [("B", 30), ("B", 300), ("V", 30), ("V", 300)]
    for s in stacks:
        n = reduced.scalar("SELECT COUNT(*) FROM stack_frames WHERE stack_id = ?", [s["id"]])
        assert n == s["n_frames"]
        header = fits.getheader(reduced.root / s["path"])
        assert header["NCOMBINE"] == n and header["EXPTOTAL"] == n * s["exptime"]
        assert s["state"] == "final"
        assert (reduced.root / s["preview_path"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hostile_header_values_stay_inside_the_archive(night, reduced: Archive) -> None:
    _plan, camera = night
    row = reduced.frame_by_path(str(camera / "odd" / "hostile.fits"))
    assert row["object"] == "../../etc/passwd"
    assert row["status"] == "pending" and "no flat for filter B/V" in row["reason"]
    root = reduced.root.resolve()
    for path in root.rglob("*"):
        assert path.resolve().is_relative_to(root)
    assert not (root.parent / "etc").exists()


def test_products_safe_names_for_path_traversal(tmp_path: Path) -> None:
    """An OBJECT/FILTER of ``../../etc``, slashes, NUL or 1000 characters never writes outside the archive."""
    from nightshift.daemon.products import Layout

    layout = Layout(tmp_path / "archive")
    for obj in ("../../etc", "a/b/../../..", "x\x00y", "é" * 1000, "/etc/passwd", ".."):
        frame = {"id": 1, "path": "/cam/../x.fits", "night": "2026-11-25", "object": obj, "filter": obj}
        for path in (layout.calibrated(frame), layout.stack("2026-11-25", obj, obj, 30.0), layout.frame_preview(frame)):
            assert path.resolve().is_relative_to((tmp_path / "archive").resolve()), path
            assert len(path.name) < 255


def test_reduce_twice_changes_nothing(night, tmp_path: Path) -> None:
    _plan, camera = night
    archive = reduce_night(camera, tmp_path / "archive")
    before = archive.query("SELECT id, path, status, calibrated_path, sha256 FROM frames ORDER BY id")
    masters = archive.query("SELECT id, path, version FROM masters ORDER BY id")
    files = sorted(p.relative_to(archive.root) for p in archive.root.rglob("*.fits"))
    reduce_folders(Pipeline(make_config(camera, tmp_path / "archive"), archive), [camera], show_progress=False)
    assert archive.query("SELECT id, path, status, calibrated_path, sha256 FROM frames ORDER BY id") == before
    assert archive.query("SELECT id, path, version FROM masters ORDER BY id") == masters
    assert sorted(p.relative_to(archive.root) for p in archive.root.rglob("*.fits")) == files
    assert not list(archive.root.rglob(".*.tmp"))
    archive.close()


def test_lights_first_night_ends_fully_calibrated(tmp_path: Path) -> None:
    camera = tmp_path / "camera"
    simulate_night(camera, SimConfig(size=384, n_light=3, order="lights-first", cloudy=0, dialect="nina"))
    archive = reduce_night(camera, tmp_path / "archive")
    lights = _lights(archive)
    assert lights and {r["status"] for r in lights} == {"stacked"}, {(r["status"], r["reason"]) for r in lights}
    for r in lights:
        assert archive.one("SELECT filter FROM masters WHERE id = ?", [r["flat_id"]])["filter"] == r["filter"]
        assert archive.one("SELECT exptime FROM masters WHERE id = ?", [r["dark_id"]])["exptime"] == r["exptime"]
    archive.close()


def test_scaled_dark_when_no_dark_of_the_light_exposure(tmp_path: Path) -> None:
    camera = tmp_path / "camera"
    simulate_night(
        camera,
        SimConfig(
            size=384, n_light=2, light_exptimes=(60.0,), dark_exptimes=(30.0, 300.0), cloudy=0, meridian_flip=False
        ),
    )
    archive = reduce_night(camera, tmp_path / "archive")
    for r in _lights(archive):
        dark = archive.one("SELECT * FROM masters WHERE id = ?", [r["dark_id"]])
        assert dark["exptime"] == 300.0 and dark["bias_subtracted"] == 1, "closest longer bias-subtracted dark"
        assert abs(r["dark_scale"] - 60.0 / 300.0) < 1e-9
        assert "scaled by 0.2" in r["calibration_note"]
    archive.close()


def test_library_masters_from_an_earlier_night(tmp_path: Path) -> None:
    """A night with no flats of its own uses the most recent matching flats within their age, and says so."""
    cam1, cam2 = tmp_path / "night1", tmp_path / "night2"
    simulate_night(cam1, SimConfig(size=384, n_light=2, cloudy=0, start="2026-11-20T19:00:00"))
    plan2 = plan_night(SimConfig(size=384, n_light=2, cloudy=0, start="2026-11-25T19:00:00"))
    for f in plan2.frames:
        if f.kind != "flat":
            write_frame(plan2, f, cam2)
    archive = reduce_night(cam1, tmp_path / "archive")
    reduce_folders(Pipeline(make_config(cam2, tmp_path / "archive"), archive), [cam2], show_progress=False)
    lights2 = archive.query("SELECT * FROM frames WHERE kind = 'light' AND night = '2026-11-25'")
    assert lights2
    for r in lights2:
        flat = archive.one("SELECT * FROM masters WHERE id = ?", [r["flat_id"]])
        assert flat["night"] == "2026-11-20"
        assert "from the library: night 2026-11-20" in r["calibration_note"]
    archive.close()


def test_flats_older_than_their_age_are_not_used(tmp_path: Path) -> None:
    cam1, cam2 = tmp_path / "night1", tmp_path / "night2"
    simulate_night(cam1, SimConfig(size=256, n_light=1, cloudy=0, start="2026-09-01T19:00:00"))
    plan2 = plan_night(SimConfig(size=256, n_light=1, cloudy=0, start="2026-11-25T19:00:00"))
    for f in plan2.frames:
        if f.kind != "flat":
            write_frame(plan2, f, cam2)
    archive = reduce_night(cam1, tmp_path / "archive")
    reduce_folders(Pipeline(make_config(cam2, tmp_path / "archive"), archive), [cam2], show_progress=False)
    lights2 = archive.query("SELECT * FROM frames WHERE kind = 'light' AND night = '2026-11-25'")
    assert lights2 and all(r["status"] == "pending" and "no flat" in r["reason"] for r in lights2)
    assert all("(night ended)" in r["reason"] for r in lights2)
    archive.close()


def test_more_frames_later_rebuild_the_master_as_a_new_version(tmp_path: Path) -> None:
    camera = tmp_path / "camera"
    plan = plan_night(SimConfig(size=256, n_bias=6, n_dark=3, n_flat=3, n_light=1, cloudy=0))
    biases = plan.by_kind("bias")
    for f in biases[:3]:
        write_frame(plan, f, camera)
    archive = reduce_night(camera, tmp_path / "archive")
    v1 = archive.one("SELECT * FROM masters WHERE kind = 'bias'")
    assert v1["n_frames"] == 3 and v1["version"] == 1
    for f in biases[3:]:
        write_frame(plan, f, camera)
    reduce_folders(Pipeline(make_config(camera, tmp_path / "archive"), archive), [camera], show_progress=False)
    rows = archive.query("SELECT * FROM masters WHERE kind = 'bias' ORDER BY version")
    assert [(r["version"], r["n_frames"]) for r in rows] == [(1, 3), (2, 6)]
    assert rows[0]["superseded_by"] == rows[1]["id"] and rows[1]["superseded_by"] is None
    assert (archive.root / rows[0]["path"]).exists() and (archive.root / rows[1]["path"]).exists()
    archive.close()


def test_same_content_under_another_name_is_a_duplicate(tmp_path: Path) -> None:
    camera = tmp_path / "camera"
    plan = plan_night(
        SimConfig(size=256, n_bias=3, n_dark=0, n_flat=0, n_light=0, dark_exptimes=(), light_exptimes=(), filters=())
    )
    first = write_frame(plan, plan.frames[0], camera)
    shutil.copy(first, camera / "copy_of_bias.fits")
    archive = reduce_night(camera, tmp_path / "archive")
    dup = archive.frame_by_path(str(camera / "copy_of_bias.fits"))
    orig = archive.frame_by_path(str(first))
    assert dup["status"] == "duplicate" and dup["duplicate_of"] == orig["id"]
    assert str(first) in dup["reason"]
    assert orig["status"] in GOOD_STATUSES
    archive.close()


def test_reprocess_recalibrates_with_the_current_best_masters(tmp_path: Path) -> None:
    camera = tmp_path / "camera"
    plan = plan_night(
        SimConfig(
            size=384,
            n_light=2,
            cloudy=0,
            meridian_flip=False,
            filters=("V",),
            light_exptimes=(30.0,),
            dark_exptimes=(30.0,),
        )
    )
    for f in plan.frames:
        write_frame(plan, f, camera)
    archive = reduce_night(camera, tmp_path / "archive")
    old_flat = {r["flat_id"] for r in _lights(archive)}
    # more flats arrive after the night was reduced: a new flat master version, then reprocess
    more = plan_night(
        SimConfig(
            size=384,
            n_flat=3,
            n_bias=0,
            n_dark=0,
            n_light=0,
            filters=("V",),
            light_exptimes=(),
            dark_exptimes=(),
            seed=7,
            start="2026-11-25T19:00:00",
        )
    )
    for f in more.frames:
        write_frame(more, f, camera / "more")
    pipe = Pipeline(make_config(camera, tmp_path / "archive"), archive)
    reduce_folders(pipe, [camera], show_progress=False)
    newest = archive.scalar("SELECT id FROM masters WHERE kind = 'flat' AND superseded_by IS NULL")
    assert newest not in old_flat
    n = reprocess(pipe, night="2026-11-25", show_progress=False)
    assert n == 2
    lights = _lights(archive)
    assert {r["flat_id"] for r in lights} == {newest}
    assert {r["status"] for r in lights} == {"stacked"}
    archive.close()


def test_night_ends_at_local_noon(tmp_path: Path) -> None:
    archive = Archive(tmp_path / "a")
    chile = Pipeline(make_config(tmp_path, tmp_path / "a", site={"timezone": "America/Santiago"}), archive)
    assert chile.night_end_utc("2026-11-25").isoformat() == "2026-11-26T15:00:00"
    west = Pipeline(make_config(tmp_path, tmp_path / "a", site={"longitude": -70.5}), archive)
    assert west.night_end_utc("2026-11-25").isoformat() == "2026-11-26T16:42:00"
    utc = Pipeline(make_config(tmp_path, tmp_path / "a"), archive)
    assert utc.night_end_utc("2026-11-25").isoformat() == "2026-11-26T12:00:00"
    archive.close()


def test_night_ends_at_the_local_noon_of_the_longitude_the_headers_state(tmp_path: Path) -> None:
    """No site in the config: the night's frames state LONGITUD (as they found their night), so it ends at that
    meridian's noon, not UTC noon (which would be 04:30 local, before dawn, at 112.5 W)."""
    camera = tmp_path / "camera"
    simulate_night(camera, SimConfig(size=64, n_bias=3, n_dark=0, n_flat=0, n_light=0, longitude=-112.5))
    archive = reduce_night(camera, tmp_path / "a")
    pipe = Pipeline(make_config(camera, tmp_path / "a"), archive)
    night = archive.scalar("SELECT night FROM frames LIMIT 1")
    noon_local = datetime.combine(date.fromisoformat(night) + timedelta(days=1), datetime.min.time()).replace(hour=12)
    assert pipe.night_end_utc(night) == noon_local + timedelta(hours=7.5)
    archive.close()


def test_a_past_night_is_closed_by_the_daemon_clock(tmp_path: Path) -> None:
    """Lights of a night whose local noon has passed stop waiting: reported as never calibrated."""
    camera = tmp_path / "camera"
    plan = plan_night(SimConfig(size=256, n_light=1, cloudy=0, start="2026-09-01T19:00:00", filters=("V",),
                                light_exptimes=(30.0,), dark_exptimes=(30.0,)))
    for f in plan.frames:
        if f.kind != "flat":
            write_frame(plan, f, camera)
    archive = Archive(tmp_path / "archive")
    pipe = Pipeline(make_config(camera, tmp_path / "archive"), archive)
    for f in plan.frames:
        if f.kind != "flat":
            pipe.ingest(camera / f.name)
    pipe.run_until_idle()
    light = archive.one("SELECT * FROM frames WHERE kind = 'light'")
    assert light["status"] == "pending" and "(night ended)" not in light["reason"]
    assert pipe.finished_nights() == ["2026-09-01"]
    pipe.end_night("2026-09-01")
    light = archive.one("SELECT * FROM frames WHERE kind = 'light'")
    assert light["status"] == "pending" and light["reason"].endswith("(night ended)")
    assert pipe.finished_nights() == []
    archive.close()


def test_an_incomplete_file_is_quarantined_once_and_again_only_if_it_changes(tmp_path: Path) -> None:
    camera = tmp_path / "camera"
    camera.mkdir()
    cut = camera / "cut.fits"
    plan = plan_night(SimConfig(size=128, n_bias=1, n_dark=0, n_flat=0, n_light=0, dark_exptimes=(),
                                light_exptimes=(), filters=()))
    whole = write_frame(plan, plan.frames[0], tmp_path)
    cut.write_bytes(whole.read_bytes()[:10000])
    archive = Archive(tmp_path / "archive")
    pipe = Pipeline(make_config(camera, tmp_path / "archive"), archive)
    pipe.quarantine_incomplete(cut, "still incomplete after 600 s")
    pipe.quarantine_incomplete(cut, "still incomplete after 600 s")  # a rescan, or a restart, reports it again
    row = archive.frame_by_path(str(cut))
    assert row["status"] == "quarantined" and row["reason"].startswith("incomplete:")
    assert archive.known(str(cut), row["size_bytes"], row["mtime"])
    assert archive.scalar("SELECT COUNT(*) FROM events WHERE frame_id = ?", [row["id"]]) == 1
    cut.write_bytes(whole.read_bytes())  # the file finally became whole: taken as a frame
    pipe.ingest(cut)
    assert archive.frame_by_path(str(cut))["status"] == "ingested"
    archive.close()


def test_workers_give_the_same_archive_as_one(night, reduced: Archive, tmp_path: Path) -> None:
    """``reduced`` ran with two worker threads; one worker must give the same decisions and the same pixels."""
    _plan, camera = night
    serial = reduce_night(camera, tmp_path / "archive", workers=1)
    cols = "path, kind, status, reason, bias_id, dark_id, flat_id, dark_scale, stack_id IS NOT NULL AS stacked"
    assert serial.query(f"SELECT {cols} FROM frames ORDER BY path") == reduced.query(
        f"SELECT {cols} FROM frames ORDER BY path"
    )
    for row in serial.query("SELECT path, calibrated_path FROM frames WHERE calibrated_path IS NOT NULL"):
        other = reduced.frame_by_path(row["path"])
        a = fits.getdata(serial.root / row["calibrated_path"])
        b = fits.getdata(reduced.root / other["calibrated_path"])
        assert np.array_equal(a, b, equal_nan=True)
    serial.close()


def test_calibrated_lights_and_stacks_keep_the_world_coordinates(tmp_path: Path) -> None:
    """Plate-solved lights (N.I.N.A. writes a WCS) keep it when calibrated; a stack carries its reference's."""
    camera = tmp_path / "camera"
    simulate_night(camera, SimConfig(size=384, n_light=3, cloudy=0, dialect="nina", filters=("V",),
                                     light_exptimes=(300.0,), dark_exptimes=(300.0,)))
    archive = reduce_night(camera, tmp_path / "archive")
    wcs_keys = ("CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2", "CD1_1", "CD1_2", "CD2_1", "CD2_2")
    for r in _lights(archive):
        raw = fits.getheader(r["path"])
        cal = fits.getheader(archive.root / r["calibrated_path"])
        assert {k: cal[k] for k in wcs_keys} == {k: raw[k] for k in wcs_keys}
    stack = archive.one("SELECT * FROM stacks")
    ref = archive.frame(stack["reference_frame_id"])
    stacked = fits.getheader(archive.root / stack["path"])
    ref_raw = fits.getheader(ref["path"])
    assert {k: stacked[k] for k in wcs_keys} == {k: ref_raw[k] for k in wcs_keys}
    archive.close()


def test_two_cameras_on_one_target_each_get_their_stacks(tmp_path: Path) -> None:
    """A dual rig: two cameras take the same object, filters and exposures in one night. Their
    pixels differ, so each camera has its own masters, alignment reference and stacks; every good light of both
    is stacked (before stacks had a setup, the second camera's lights were rejected as unaligned)."""
    camera = tmp_path / "camera"
    common = {"size": 192, "n_bias": 3, "n_dark": 3, "n_flat": 3, "n_light": 2, "cloudy": 0, "filters": ("V",)}
    simulate_night(camera / "main", SimConfig(**common, camera="SBIG STL-11000M", seed=1))
    simulate_night(camera / "guide", SimConfig(**common, camera="ZWO ASI183MM", seed=2, start="2026-11-25T18:45:00"))
    archive = reduce_night(camera, tmp_path / "a")
    try:
        lights = archive.query("SELECT * FROM frames WHERE kind = 'light'")
        assert len(lights) == 8
        assert all(r["status"] == "stacked" for r in lights), [(r["path"], r["reason"]) for r in lights]
        stacks = archive.query("SELECT * FROM stacks ORDER BY id")
        assert len(stacks) == 4  # (30 s, 300 s) x two cameras
        by_id = {s["id"]: s for s in stacks}
        for r in lights:
            stack = by_id[r["stack_id"]]
            assert stack["camera"] == r["camera"]
            ref = archive.frame(stack["reference_frame_id"])
            assert ref["camera"] == r["camera"]
        assert len({s["path"] for s in stacks}) == 4
        assert sum("ZWO" in s["path"] or "SBIG" in s["path"] for s in stacks) == 2  # the second setup is named
    finally:
        archive.close()
