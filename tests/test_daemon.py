"""The real daemon: a ``nightshift run`` process on a real folder, with a camera writing into it slowly and by
renames, a real HTTP scrape of its metrics, SIGHUP reloads, the low-disk pause, and a clean SIGTERM."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path

from conftest import require_tool, wait_until, write_config_file
from nightshift.daemon.archive import Archive
from nightshift.service.simulate import SimConfig, plan_night, write_frame


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        return r.read().decode()


def _value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
            found = True
    assert found, f"{name}{labels} not in the scrape"
    return total


def _db(archive_dir: Path) -> Archive:
    return Archive(archive_dir, create=False)


def test_daemon_processes_a_live_night_and_metrics_match_the_archive(tmp_path: Path, start_nightshift) -> None:
    camera, archive_dir = tmp_path / "camera", tmp_path / "archive"
    camera.mkdir()
    port = _free_port()
    cfg = write_config_file(
        tmp_path / "n.toml",
        camera,
        archive_dir,
        metrics={"listen": f"127.0.0.1:{port}"},
        processing={"workers": 2},
        report={"interval_seconds": 1},
    )
    proc = start_nightshift("run", "--config", str(cfg))
    proc.wait_for_log("watching")
    plan = plan_night(
        SimConfig(
            size=256,
            n_bias=3,
            n_dark=3,
            n_flat=3,
            n_light=2,
            dark_exptimes=(30.0,),
            light_exptimes=(30.0,),
            broken=True,
            dialect="mixed",
        )
    )

    def camera_writes() -> None:
        for i, f in enumerate(plan.frames):
            write_frame(plan, f, camera, slow=(i % 4 == 0), chunk_bytes=16384, chunk_delay=0.02, rename=(i % 3 == 1))

    writer = threading.Thread(target=camera_writes)
    writer.start()
    text_during = _scrape(port)  # the endpoint answers while the night is being written
    assert "nightshift_frames_ingested_total" in text_during
    writer.join()
    n_files = len(plan.frames)

    def all_in() -> bool:
        a = _db(archive_dir)
        try:
            n = a.scalar("SELECT COUNT(*) FROM frames")
            busy = a.scalar(
                "SELECT COUNT(*) FROM frames WHERE status IN ('calibrated') OR (kind = 'light' AND status = 'ingested')"
            )
            return n == n_files and busy == 0
        finally:
            a.close()

    wait_until(all_in, 90, "every file in the archive and processed")
    time.sleep(2.5)  # one gauge period
    text = _scrape(port)
    a = _db(archive_dir)
    try:
        for kind in ("bias", "dark", "flat", "light"):
            n = a.scalar("SELECT COUNT(*) FROM frames WHERE kind = ? AND status != 'quarantined'", [kind])
            assert _value(text, "nightshift_frames_ingested_total", kind=kind) == n, kind
        quarantined = a.query("SELECT reason FROM frames WHERE status = 'quarantined'")
        assert _value(text, "nightshift_frames_quarantined_total") == len(quarantined)
        assert _value(text, "nightshift_frames_quarantined_total", reason="incomplete") == 1  # the truncated file
        assert _value(text, "nightshift_masters_built_total") == a.scalar("SELECT COUNT(*) FROM masters")
        assert _value(text, "nightshift_frames_calibrated_total") == a.scalar(
            "SELECT COUNT(*) FROM frames WHERE calibrated_path IS NOT NULL"
        )
        assert _value(text, "nightshift_frames_stacked_total") == a.scalar(
            "SELECT COUNT(*) FROM frames WHERE status = 'stacked'"
        )
        assert _value(text, "nightshift_lights_pending") == a.scalar(
            "SELECT COUNT(*) FROM frames WHERE status = 'pending'"
        )
        assert _value(text, "nightshift_watcher_alive") == 1
        assert _value(text, "nightshift_archive_free_bytes") > 0
        # a partially written file was never read: no frame was quarantined as truncated or not FITS
        good = [f for f in plan.frames if not f.broken]
        for f in good:
            row = a.frame_by_path(str(camera / f.name))
            assert row is not None and row["status"] != "quarantined", (f.name, row and row["reason"])
        assert not list(camera.rglob("*.tmp"))
    finally:
        a.close()
    promtool = require_tool("promtool")
    import subprocess

    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    # the night's report, kept up to date while the daemon runs: every light of the night is in it
    report = archive_dir / "reports" / f"night-{plan.config.start[:10]}.html"  # an evening start: that night
    lights = [Path(f.name).name for f in plan.frames if f.kind == "light" and not f.broken]
    assert lights
    wait_until(lambda: report.is_file() and all(n in report.read_text() for n in lights), 30, "an up-to-date report")
    assert proc.stop() == 0
    assert "archive closed" in proc.log()


def test_sigterm_stops_cleanly_and_a_restart_catches_up(tmp_path: Path, start_nightshift) -> None:
    camera, archive_dir = tmp_path / "camera", tmp_path / "archive"
    camera.mkdir()
    cfg = write_config_file(tmp_path / "n.toml", camera, archive_dir)
    plan = plan_night(
        SimConfig(size=256, n_bias=3, n_dark=0, n_flat=0, n_light=0, dark_exptimes=(), light_exptimes=(), filters=())
    )
    proc = start_nightshift("run", "--config", str(cfg))
    proc.wait_for_log("watching")
    write_frame(plan, plan.frames[0], camera)
    proc.wait_for_log("ingested")
    proc.signal(signal.SIGTERM)
    assert proc.p.wait(30) == 0
    assert "stopped; archive closed" in proc.log()
    # files that arrive while the daemon is down are caught up by the start-up scan
    for f in plan.frames[1:]:
        write_frame(plan, f, camera)
    proc2 = start_nightshift("run", "--config", str(cfg))
    proc2.wait_for_log("watching")
    wait_until(lambda: _count(archive_dir) == len(plan.frames), 30, "catch-up scan")
    proc2.signal(signal.SIGINT)
    assert proc2.p.wait(30) == 0


def _count(archive_dir: Path) -> int:
    a = _db(archive_dir)
    try:
        return a.scalar("SELECT COUNT(*) FROM frames")
    finally:
        a.close()


def test_sighup_reload_bad_config_keeps_running_and_low_disk_pauses(tmp_path: Path, start_nightshift) -> None:
    camera, archive_dir = tmp_path / "camera", tmp_path / "archive"
    camera.mkdir()
    cfg = tmp_path / "n.toml"
    # an absurd free-space threshold: processing pauses from the start
    write_config_file(cfg, camera, archive_dir, archive={"min_free_mb": 10**12})
    proc = start_nightshift("run", "--config", str(cfg))
    proc.wait_for_log("processing paused")
    plan = plan_night(
        SimConfig(size=256, n_bias=3, n_dark=0, n_flat=0, n_light=0, dark_exptimes=(), light_exptimes=(), filters=())
    )
    write_frame(plan, plan.frames[0], camera)
    time.sleep(2.0)
    assert _count(archive_dir) == 0, "nothing is processed while paused"
    # a broken config on SIGHUP: logged, old config kept, still running
    cfg.write_text(cfg.read_text().replace("[watch]", "[watch]\nquiet_seconds = 'soon'"))
    proc.signal(signal.SIGHUP)
    proc.wait_for_log("reload failed, keeping the running configuration")
    assert proc.p.poll() is None
    # a good config with a sane threshold: resumes by itself and processes the waiting file
    write_config_file(cfg, camera, archive_dir, archive={"min_free_mb": 10})
    proc.signal(signal.SIGHUP)
    proc.wait_for_log("configuration reloaded")
    proc.wait_for_log("processing resumes")
    wait_until(lambda: _count(archive_dir) == 1, 30, "the waiting file to be ingested")
    assert proc.stop() == 0


def test_idle_daemon_sleeps(tmp_path: Path, start_nightshift) -> None:
    """No busy loop: an idle daemon's CPU time over a few seconds is a small fraction of one core."""
    camera, archive_dir = tmp_path / "camera", tmp_path / "archive"
    camera.mkdir()
    cfg = write_config_file(tmp_path / "n.toml", camera, archive_dir)
    proc = start_nightshift("run", "--config", str(cfg))
    proc.wait_for_log("watching")
    time.sleep(1.0)

    def cpu_seconds() -> float:
        fields = Path(f"/proc/{proc.p.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime in clock ticks (USER_HZ = 100)

    c0, t0 = cpu_seconds(), time.monotonic()
    time.sleep(5.0)
    used = (cpu_seconds() - c0) / (time.monotonic() - t0)
    assert used < 0.05, f"idle daemon used {used:.1%} of a core"
    assert proc.stop() == 0


def test_lights_first_wait_as_pending_and_calibrate_when_masters_appear(tmp_path: Path, start_nightshift) -> None:
    camera, archive_dir = tmp_path / "camera", tmp_path / "archive"
    camera.mkdir()
    cfg = write_config_file(tmp_path / "n.toml", camera, archive_dir, calibration={"set_quiet_seconds": 1.0})
    plan = plan_night(
        SimConfig(
            size=256,
            n_bias=3,
            n_dark=3,
            n_flat=3,
            n_light=2,
            filters=("V",),
            dark_exptimes=(300.0,),
            light_exptimes=(300.0,),
            cloudy=0,
            meridian_flip=False,
            order="lights-first",
            dialect="nina",
        )
    )
    proc = start_nightshift("run", "--config", str(cfg))
    proc.wait_for_log("watching")
    lights = [f for f in plan.frames if f.kind == "light"]
    for f in lights:
        write_frame(plan, f, camera)

    def pending() -> list[dict]:
        a = _db(archive_dir)
        try:
            return a.query("SELECT status, reason FROM frames WHERE kind = 'light'")
        finally:
            a.close()

    wait_until(lambda: len(pending()) == 2 and all(r["status"] == "pending" for r in pending()), 30, "lights pending")
    assert all("no flat for filter V, binning 1x1" in r["reason"] for r in pending())
    for f in plan.frames:
        if f.kind != "light":
            write_frame(plan, f, camera)
    wait_until(lambda: {r["status"] for r in pending()} == {"stacked"}, 60, "lights calibrated and stacked")
    a = _db(archive_dir)
    try:
        events = a.query("SELECT decision FROM events WHERE stage = 'calibrate' ORDER BY id")
        assert [e["decision"] for e in events][:2] == ["pending", "pending"] and events[-1]["decision"] == "calibrated"
    finally:
        a.close()
    assert proc.stop() == 0


def test_systemd_notify_protocol_from_the_real_daemon(tmp_path: Path, start_nightshift) -> None:
    """READY after the start-up scan, STATUS lines, WATCHDOG pings, STOPPING on SIGTERM, over a real socket."""
    camera, archive_dir = tmp_path / "camera", tmp_path / "archive"
    camera.mkdir()
    cfg = write_config_file(tmp_path / "n.toml", camera, archive_dir)
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(1.0)
    proc = start_nightshift(
        "run", "--config", str(cfg), env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "2000000"}
    )
    received: list[str] = []
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline and not (
        any("READY=1" in m for m in received)
        and sum("WATCHDOG=1" in m for m in received) >= 2
        and any(m.startswith("STATUS=") or "\nSTATUS=" in m for m in received)
    ):
        with contextlib.suppress(TimeoutError):
            received.append(sock.recv(4096).decode())
    assert any("READY=1" in m for m in received), received
    assert sum("WATCHDOG=1" in m for m in received) >= 2, received
    assert any("queue" in m for m in received), "a STATUS line with the queue depth"
    proc.signal(signal.SIGTERM)
    assert proc.p.wait(30) == 0
    tail = []
    try:
        while True:
            tail.append(sock.recv(4096).decode())
    except TimeoutError:
        pass
    assert any("STOPPING=1" in m for m in tail), tail
    sock.close()


def test_several_watch_folders_from_the_command_line(tmp_path: Path, start_nightshift) -> None:
    cam1, cam2, archive_dir = tmp_path / "cam1", tmp_path / "cam2", tmp_path / "archive"
    cam1.mkdir()
    cam2.mkdir()
    cfg = write_config_file(tmp_path / "n.toml", tmp_path / "elsewhere", archive_dir)
    (tmp_path / "elsewhere").mkdir()
    proc = start_nightshift("run", "--config", str(cfg), "--watch", str(cam1), "--watch", str(cam2),
                            "--archive", str(archive_dir), "--metrics", "off")
    proc.wait_for_log("watching")
    plan = plan_night(SimConfig(size=128, n_bias=2, n_dark=0, n_flat=0, n_light=0, dark_exptimes=(),
                                light_exptimes=(), filters=()))
    write_frame(plan, plan.frames[0], cam1 / "night" / "deep")
    write_frame(plan, plan.frames[1], cam2)
    wait_until(lambda: _count(archive_dir) == 2, 30, "a frame from each folder")
    a = _db(archive_dir)
    try:
        paths = sorted(r["path"] for r in a.query("SELECT path FROM frames"))
    finally:
        a.close()
    assert paths[0].startswith(str(cam1)) and paths[1].startswith(str(cam2))
    assert proc.stop() == 0
