"""Tests of daemon.watcher with a real watchdog observer on real folders and real FITS files."""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from nightshift.daemon.watcher import FolderWatcher, Incomplete, Offer, WatchOptions, is_wanted
from nightshift.service.simulate import SimConfig, plan_night, write_frame

QUIET = 0.3
MODES = [pytest.param(False, id="native"), pytest.param(True, id="polling")]


def fits_bytes(seed: int = 0, size: int = 256) -> bytes:
    """A whole FITS file as a camera writes it: uint16 pixels stored with BZERO=32768."""
    data = np.random.default_rng(seed).integers(0, 65535, size=(size, size), dtype=np.uint16)
    hdu = fits.PrimaryHDU(data)
    hdu.header["IMAGETYP"] = "Light Frame"
    hdu.header["EXPTIME"] = 30.0
    buf = io.BytesIO()
    hdu.writeto(buf)
    raw = buf.getvalue()
    assert fits.Header.fromstring(raw[:2880])["BZERO"] == 32768
    return raw


def write_slowly(path: Path, raw: bytes, *, chunk=4096, delay=0.05, pause_at: int | None = None) -> None:
    """Write ``raw`` in chunks like a slow camera; ``pause_at`` adds one pause longer than the quiet time."""
    with open(path, "wb") as f:
        for i in range(0, len(raw), chunk):
            f.write(raw[i : i + chunk])
            f.flush()
            time.sleep(3 * QUIET if pause_at is not None and i == pause_at else delay)


def options(tmp_path: Path, **kw) -> WatchOptions:
    kw.setdefault("quiet_seconds", QUIET)
    kw.setdefault("incomplete_timeout", 60.0)
    kw.setdefault("poll_interval", 0.1)
    kw.setdefault("rescan_interval", 0)
    return WatchOptions(paths=[tmp_path], **kw)


def run_until(watcher: FolderWatcher, done, *, limit: float = 30.0, on_result=None) -> list:
    """Poll the watcher like the daemon's loop until ``done(results)``; fail after ``limit`` seconds."""
    results: list = []
    end = time.monotonic() + limit
    while not done(results):
        assert time.monotonic() < end, f"gave up waiting; got {results}"
        watcher.wait(0.2)
        for r in watcher.poll():
            if on_result is not None:
                on_result(r)
            results.append(r)
    return results


def offered(results, path: Path) -> list[Offer]:
    return [r for r in results if isinstance(r, Offer) and r.path == path]


@pytest.fixture
def started():
    watchers = []

    def start(opts, **kw) -> FolderWatcher:
        w = FolderWatcher(opts, **kw)
        w.start()
        watchers.append(w)
        return w

    yield start
    for w in watchers:
        w.stop()


@pytest.mark.parametrize("polling", MODES)
def test_slow_write_is_offered_once_and_only_when_whole(tmp_path, started, polling):
    raw = fits_bytes()
    target = tmp_path / "light_001.fits"
    watcher = started(options(tmp_path, polling=polling))
    assert watcher.alive
    # a pause longer than the quiet time half-way: the half file is quiet but truncated, and is not offered
    writer = threading.Thread(target=write_slowly, args=(target, raw), kwargs={"pause_at": 64 * 1024})
    writer.start()
    sizes_at_offer = []
    results = run_until(
        watcher,
        lambda rs: offered(rs, target),
        on_result=lambda r: sizes_at_offer.append(os.stat(r.path).st_size),
    )
    writer.join()
    assert sizes_at_offer == [len(raw)]
    assert results[0].size == len(raw)
    assert results[0].mtime == os.stat(target).st_mtime
    # nothing more comes for it: a later file is offered and the first one is not offered again
    later = tmp_path / "light_002.fits"
    later.write_bytes(fits_bytes(1))
    results = run_until(watcher, lambda rs: offered(rs, later))
    assert offered(results, target) == []
    assert watcher.pending == 0


@pytest.mark.parametrize("polling", MODES)
def test_write_then_rename_is_caught_by_the_rename(tmp_path, started, polling):
    raw = fits_bytes()
    watcher = started(options(tmp_path, polling=polling))
    tmp = tmp_path / "flat_R_001.fits.tmp"
    final = tmp_path / "flat_R_001.fits"
    write_slowly(tmp, raw, delay=0.02)
    os.rename(tmp, final)
    results = run_until(watcher, lambda rs: offered(rs, final))
    assert [r.path for r in results] == [final]
    assert results[0].size == len(raw)


# watchdog's inotify emitter warns about its own callbacks when folders are created in quick succession
@pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")
@pytest.mark.parametrize("polling", MODES)
def test_files_in_nested_folders_created_after_start(tmp_path, started, polling):
    watcher = started(options(tmp_path, polling=polling))
    folder = tmp_path / "2024-03-08" / "M31" / "LIGHT"
    folder.mkdir(parents=True)
    a = folder / "M31_L_001.fits"
    a.write_bytes(fits_bytes(1))
    deeper = folder / "sub"
    deeper.mkdir()
    b = deeper / "M31_L_002.FIT"  # upper case extension taken too
    b.write_bytes(fits_bytes(2))
    results = run_until(watcher, lambda rs: offered(rs, a) and offered(rs, b))
    assert sorted(str(r.path) for r in results) == sorted([str(a), str(b)])


@pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")
@pytest.mark.parametrize("polling", MODES)
def test_simulated_night_written_slowly_and_by_rename(tmp_path, started, polling):
    config = SimConfig(size=256, n_bias=2, n_dark=1, n_flat=1, n_light=1, filters=("V",))
    plan = plan_night(config)
    frames = plan.frames[:6]
    sizes = {tmp_path / f.name: len(plan.frame_bytes(f)) for f in frames}
    watcher = started(options(tmp_path, polling=polling))

    def camera() -> None:
        for i, frame in enumerate(frames):
            renamed = i % 2 == 1
            write_frame(plan, frame, tmp_path, slow=True, chunk_bytes=16384, chunk_delay=0.05, rename=renamed)

    writer = threading.Thread(target=camera)
    writer.start()
    at_offer = []
    results = run_until(
        watcher,
        lambda rs: len(rs) >= len(frames),
        on_result=lambda r: at_offer.append((r.path, os.stat(r.path).st_size)),
    )
    writer.join()
    assert all(isinstance(r, Offer) for r in results)
    assert sorted(at_offer) == sorted(sizes.items())  # each once, and whole when offered
    assert sorted((r.path, r.size) for r in results) == sorted(sizes.items())


def test_simulated_broken_files(tmp_path, started):
    plan = plan_night(SimConfig(size=64, n_bias=1, n_dark=1, n_flat=1, n_light=1, broken=True))
    broken = [f for f in plan.frames if f.broken]
    assert {"empty", "not_fits", "truncated"} <= {f.broken for f in broken}
    for frame in broken:
        write_frame(plan, frame, tmp_path)
    watcher = started(options(tmp_path, incomplete_timeout=1.5))
    results = run_until(watcher, lambda rs: len(rs) == len(broken))
    kinds = {r.path: type(r) for r in results}
    # only a file cut short waits and is given up on; every other broken file goes to ingest to be quarantined
    assert kinds == {tmp_path / f.name: Incomplete if f.broken == "truncated" else Offer for f in broken}


def test_initial_scan_finds_existing_files_and_known_ones_are_skipped(tmp_path, started):
    old = tmp_path / "2024-03-07" / "bias"
    old.mkdir(parents=True)
    archived = old / "bias_001.fits"
    fresh = old / "bias_002.fits"
    top = tmp_path / "dark_300s.fts"
    for i, p in enumerate((archived, fresh, top)):
        p.write_bytes(fits_bytes(i))
    st = os.stat(archived)
    calls = []

    def known(path: str, size: int, mtime: float) -> bool:
        calls.append((path, size, mtime))
        return path == str(archived) and size == st.st_size and mtime == st.st_mtime

    watcher = started(options(tmp_path), known=known)
    assert watcher.last_scan is not None
    assert (str(archived), st.st_size, st.st_mtime) in calls
    results = run_until(watcher, lambda rs: offered(rs, fresh) and offered(rs, top))
    assert sorted(str(r.path) for r in results) == sorted([str(fresh), str(top)])
    # a forced rescan offers nothing again: neither the archived file nor the ones already offered
    watcher.rescan()
    assert watcher.pending == 0
    assert watcher.poll() == []


def test_a_file_changed_after_its_offer_is_offered_again(tmp_path, started):
    path = tmp_path / "light.fits"
    path.write_bytes(fits_bytes(1, size=128))
    watcher = started(options(tmp_path))
    first = run_until(watcher, lambda rs: offered(rs, path))
    path.write_bytes(fits_bytes(2, size=256))
    second = run_until(watcher, lambda rs: offered(rs, path))
    assert [r.size for r in first + second] == [len(fits_bytes(1, size=128)), len(fits_bytes(2, size=256))]


def test_rescan_catches_a_file_whose_events_were_missed(tmp_path):
    path = tmp_path / "missed.fits"
    watcher = FolderWatcher(options(tmp_path, rescan_interval=0.5))
    watcher.start()
    watcher.stop()  # no observer any more: only the periodic rescan can see the new file
    path.write_bytes(fits_bytes())
    first_scan = watcher.last_scan
    results = run_until(watcher, lambda rs: offered(rs, path))
    assert watcher.last_scan > first_scan
    assert results[0].size == len(fits_bytes())


def test_truncated_file_is_reported_incomplete_after_the_timeout(tmp_path, started):
    raw = fits_bytes()
    stuck = tmp_path / "stuck.fits"
    stuck.write_bytes(raw[: len(raw) // 2])
    watcher = started(options(tmp_path, incomplete_timeout=1.5))
    results = run_until(watcher, lambda rs: rs)
    assert len(results) == 1
    assert isinstance(results[0], Incomplete)
    assert results[0].path == stuck
    assert results[0].reason.startswith("still incomplete after 1.5 s: ")
    assert str(len(raw) // 2) in results[0].reason
    assert watcher.pending == 0


def test_truncated_file_gives_up_by_the_clock(tmp_path):
    """The same by a hand-driven clock: nothing is offered before the timeout, however often it is polled."""
    raw = fits_bytes()
    stuck = tmp_path / "stuck.fits"
    stuck.write_bytes(raw[:5000])
    now = [1000.0]
    watcher = FolderWatcher(options(tmp_path, quiet_seconds=2, incomplete_timeout=600), clock=lambda: now[0])
    watcher.start()
    watcher.stop()  # only scans from here on, so that no event interferes with the hand-driven clock
    try:
        for _ in range(60):
            assert watcher.poll() == []
            now[0] += 9.9
        assert watcher.pending == 1
        now[0] += 10
        results = watcher.poll()
        assert [type(r) for r in results] == [Incomplete]
        assert "600 s" in results[0].reason
        # reported once: a rescan does not bring it back while it stays the same
        watcher.rescan()
        now[0] += 10
        assert watcher.poll() == []
        # but if it grows to a whole file it is offered
        stuck.write_bytes(raw)
        watcher.rescan()
        now[0] += 1
        assert watcher.poll() == []  # not quiet yet by the clock
        now[0] += 1
        assert [(type(r), r.size) for r in watcher.poll()] == [(Offer, len(raw))]
        assert watcher.pending == 0
    finally:
        watcher.stop()


def test_not_fits_and_empty_files_are_offered_once_quiet(tmp_path, started):
    junk = tmp_path / "junk.fits"
    empty = tmp_path / "empty.fit"
    watcher = started(options(tmp_path))
    junk.write_bytes(b"this is not a FITS file\n" * 100)
    empty.write_bytes(b"")
    results = run_until(watcher, lambda rs: offered(rs, junk) and offered(rs, empty))
    assert sorted(r.size for r in results) == [0, 2400]


def test_ignored_names_and_folders_are_never_offered(tmp_path, started):
    watcher = started(options(tmp_path))
    ignored = [
        tmp_path / ".hidden.fits",
        tmp_path / "light.fits.part",
        tmp_path / "light.fits~",
        tmp_path / "light.fits.tmp",
        tmp_path / "notes.txt",
        tmp_path / ".thumbnails" / "light.fits",
    ]
    (tmp_path / ".thumbnails").mkdir()
    for p in ignored:
        p.write_bytes(fits_bytes())
    sentinel = tmp_path / "sentinel.fits"
    sentinel.write_bytes(fits_bytes())
    results = run_until(watcher, lambda rs: offered(rs, sentinel))
    assert [r.path for r in results] == [sentinel]
    watcher.rescan()  # the scan ignores them too
    assert watcher.pending == 0


def test_file_deleted_before_settling_is_dropped(tmp_path, started):
    raw = fits_bytes()
    watcher = started(options(tmp_path))
    doomed = tmp_path / "doomed.fits"
    doomed.write_bytes(raw[:10000])  # truncated: it waits
    run_until(watcher, lambda rs: watcher.pending == 1)
    doomed.unlink()
    sentinel = tmp_path / "sentinel.fits"
    sentinel.write_bytes(raw)
    results = run_until(watcher, lambda rs: offered(rs, sentinel) and watcher.pending == 0)
    assert [r.path for r in results] == [sentinel]


def test_wait_wakes_on_an_event(tmp_path, started):
    watcher = started(options(tmp_path))
    path = tmp_path / "light.fits"
    timer = threading.Timer(0.2, path.write_bytes, args=(fits_bytes(),))
    timer.start()
    t0 = time.monotonic()
    watcher.wait(60)  # idle: nothing due, so only the event can end this wait early
    timer.join()
    assert time.monotonic() - t0 < 60
    watcher.poll()
    assert watcher.pending == 1


@pytest.mark.parametrize("polling", MODES)
def test_alive_turns_false_when_the_watched_folder_goes(tmp_path, started, polling):
    camera = tmp_path / "camera"
    camera.mkdir()
    watcher = started(WatchOptions(paths=[camera], quiet_seconds=QUIET, poll_interval=0.1, polling=polling))
    assert watcher.alive
    camera.rmdir()  # an unmounted share or a deleted folder: the daemon must be able to tell
    end = time.monotonic() + 30
    while watcher.alive:
        assert time.monotonic() < end, "the watcher still claims to be alive"
        watcher.wait(0.1)
        watcher.poll()


def test_stop_and_missing_folder(tmp_path):
    watcher = FolderWatcher(options(tmp_path))
    assert not watcher.alive
    watcher.start()
    assert watcher.alive
    watcher.stop()
    watcher.stop()
    assert not watcher.alive
    with pytest.raises(FileNotFoundError):
        FolderWatcher(options(tmp_path / "absent")).start()


@pytest.mark.parametrize(
    ("relative", "wanted"),
    [
        ("a.fits", True),
        ("A.FITS", True),
        ("night/M31/a.Fit", True),
        ("a.fts", True),
        ("a.fits.tmp", False),
        ("a.fits.part", False),
        ("a.fits~", False),
        (".a.fits", False),
        (".cache/a.fits", False),
        ("night/.trash/sub/a.fits", False),
        ("a.xisf", True),
        ("a.fits.fz", True),
        ("a.FIT.GZ", True),
        ("a.fits.gz.part", False),
        ("notes.txt", False),
    ],
)
def test_is_wanted(relative, wanted):
    opts = WatchOptions(paths=[Path("/x")])
    assert is_wanted(Path(relative), opts.include, opts.exclude) is wanted
