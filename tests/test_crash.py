"""Crash safety: the daemon is killed with SIGKILL again and again while a night is being written, restarted
each time, and in the end nothing is lost, nothing is doubled and no temp file is left behind."""

from __future__ import annotations

import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path

from conftest import wait_until, write_config_file
from nightshift.daemon.archive import Archive
from nightshift.service.simulate import SimConfig, plan_night, write_frame


def test_sigkill_during_a_night_loses_and_doubles_nothing(tmp_path: Path, start_nightshift) -> None:
    camera, archive_dir = tmp_path / "camera", tmp_path / "archive"
    camera.mkdir()
    cfg = write_config_file(tmp_path / "n.toml", camera, archive_dir, calibration={"set_quiet_seconds": 1.0})
    plan = plan_night(
        SimConfig(
            size=256,
            n_bias=3,
            n_dark=3,
            n_flat=3,
            n_light=4,
            dark_exptimes=(300.0,),
            light_exptimes=(300.0,),
            cloudy=0,
            dialect="nina",
        )
    )
    done = threading.Event()

    def camera_writes() -> None:
        try:
            for i, f in enumerate(plan.frames):
                write_frame(plan, f, camera, slow=(i % 3 == 0), chunk_bytes=8192, chunk_delay=0.03, rename=(i % 2 == 1))
                time.sleep(0.15)
        finally:
            done.set()

    writer = threading.Thread(target=camera_writes)
    writer.start()
    rng = random.Random(42)
    kills = 0
    while not done.is_set() or kills < 4:
        proc = start_nightshift("run", "--config", str(cfg))
        proc.wait_for_log("watching", timeout=60)
        time.sleep(rng.uniform(0.3, 1.5))
        proc.signal(signal.SIGKILL)
        proc.p.wait(10)
        kills += 1
    writer.join()
    assert kills >= 4

    final = start_nightshift("run", "--config", str(cfg))
    final.wait_for_log("watching", timeout=60)

    def finished() -> bool:
        a = Archive(archive_dir, create=False)
        try:
            n = a.scalar("SELECT COUNT(*) FROM frames")
            open_work = a.scalar(
                "SELECT COUNT(*) FROM frames WHERE (kind = 'light' AND status IN ('ingested', 'calibrated')) "
                "OR (kind != 'light' AND status = 'ingested')"
            )
            return n == len(plan.frames) and open_work == 0
        finally:
            a.close()

    wait_until(finished, 120, "the night to be processed after the last restart")
    assert final.stop() == 0

    a = Archive(archive_dir, create=False)
    try:
        rows = a.query("SELECT * FROM frames")
        paths = Counter(r["path"] for r in rows)
        assert len(paths) == len(plan.frames) and max(paths.values()) == 1, "every file exactly once"
        truth = {str(camera / f.name): f.kind for f in plan.frames}
        for r in rows:
            assert r["kind"] == truth[r["path"]], r["path"]
            assert r["status"] not in ("quarantined", "duplicate"), (r["path"], r["reason"])
        assert {r["status"] for r in rows if r["kind"] == "light"} == {"stacked"}
        # products: one file per row, one row per file, no two rows naming the same product
        calibrated = [r["calibrated_path"] for r in rows if r["calibrated_path"]]
        assert len(calibrated) == len(set(calibrated)) == sum(1 for r in rows if r["kind"] == "light")
        on_disk = {p.relative_to(archive_dir).as_posix() for p in (archive_dir / "calibrated").rglob("*.fits")}
        assert on_disk == set(calibrated)
        masters = a.query("SELECT * FROM masters")
        assert {p.relative_to(archive_dir).as_posix() for p in (archive_dir / "masters").rglob("*.fits")} == {
            m["path"] for m in masters
        }
        current = Counter(m["set_key"] for m in masters if m["superseded_by"] is None)
        assert max(current.values()) == 1, "one current master per calibration set"
        stacks = a.query("SELECT night, object, filter, exptime, n_frames FROM stacks")
        assert len(stacks) == 2 and all(s["n_frames"] == 4 for s in stacks)
        links = a.query("SELECT frame_id, COUNT(*) AS n FROM stack_frames GROUP BY frame_id")
        assert len(links) == 8 and all(link["n"] == 1 for link in links)
        assert not [p for p in archive_dir.rglob("*") if p.name.endswith(".tmp")], "no orphan temp files"
        assert a.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        a.close()
