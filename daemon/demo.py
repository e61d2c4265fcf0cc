"""``nightshift demo``: the daemon on a simulated night, written live into a camera folder, then a summary.

The camera is a thread writing the simulator's frames the way capture programs do (some slowly in chunks, some
as name.tmp then renamed, some broken); the daemon is the real one, with its real watcher and archive.
"""

from __future__ import annotations

import logging
import shutil
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from nightshift.daemon.archive import Archive
from nightshift.daemon.config import load_config
from nightshift.daemon.pipeline import Pipeline
from nightshift.daemon.runner import Daemon
from nightshift.daemon.summary import summary_lines
from nightshift.service.simulate import SimConfig, plan_night

__all__ = ["run_demo"]

log = logging.getLogger("nightshift.demo")

MARKER = ".nightshift-demo"


def _camera(plan, camera: Path, done: threading.Event, stop: threading.Event) -> None:
    from nightshift.service.simulate import write_frame

    try:
        for i, frame in enumerate(plan.frames):
            if stop.is_set():
                return
            write_frame(plan, frame, camera, slow=(i % 7 == 3), chunk_delay=0.02, rename=(i % 3 == 1))
            time.sleep(0.05)
    finally:
        done.set()


def _command() -> str:
    """How to call nightshift again from this shell: its name if it is on PATH, else its full path (a make
    demo runs it from .venv/bin, which is not on the user's PATH)."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "nightshift" and shutil.which("nightshift") != str(argv0.absolute()):
        return str(argv0.absolute())
    return "nightshift"


def run_demo(out: Path, sim: SimConfig, *, config_path: Path | None = None, metrics: str = "off") -> int:
    """Write the night ``sim`` into ``out/camera`` while the daemon fills ``out/archive``; print the summary.

    ``config_path`` is a base configuration (the demo sets its folders and timings); ``metrics`` the endpoint."""
    out = out.absolute()
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        print(f"nightshift demo: {out} exists and is not a demo folder; choose another --out")
        return 2
    for sub in ("camera", "archive"):
        shutil.rmtree(out / sub, ignore_errors=True)
    camera, archive_dir = out / "camera", out / "archive"
    camera.mkdir(parents=True)
    (out / MARKER).write_text("made by nightshift demo; camera/ and archive/ are replaced on each run\n")
    sim = replace(sim, broken=True)
    plan = plan_night(sim)
    config = load_config(
        config_path,
        overrides={
            "watch": {
                "paths": [str(camera)],
                "quiet_seconds": 0.5,
                "incomplete_timeout_seconds": 5.0,
                "rescan_interval_seconds": 30.0,
            },
            "archive": {"path": str(archive_dir), "min_free_mb": 50},
            "calibration": {"set_quiet_seconds": 3.0},
            "metrics": {"listen": metrics},
        },
    )
    print(
        f"demo: a simulated night of {len(plan.frames)} files ({sim.shape[1]}x{sim.shape[0]} px) is being written to "
        f"{camera}; the daemon watches it and fills {archive_dir}",
        flush=True,
    )
    done, stop = threading.Event(), threading.Event()
    writer = threading.Thread(target=_camera, args=(plan, camera, done, stop), name="camera", daemon=True)
    finished_at: list[float] = []

    def until(_pipeline: Pipeline) -> bool:
        if not done.is_set():
            return False
        if not finished_at:
            finished_at.append(time.monotonic())
        return time.monotonic() - finished_at[0] > 2.0

    t0 = time.monotonic()
    daemon = Daemon(config)
    daemon.install_signal_handlers()
    writer.start()
    try:
        daemon.run(until=until)
    finally:
        stop.set()
        writer.join(timeout=30)
    archive = Archive(archive_dir)
    try:
        pipeline = Pipeline(config, archive)
        pipeline.end_night()
        summary = pipeline.summary()
        report = None
        try:
            from nightshift.daemon.report import write_report

            for night in sorted({r["night"] for r in archive.query("SELECT DISTINCT night FROM frames")} - {None}):
                report = write_report(archive, night)
        except ImportError:  # pragma: no cover - the report module is optional at this stage
            pass
    finally:
        archive.close()
    print(f"\ndemo finished in {time.monotonic() - t0:.1f} s: {len(plan.frames)} files written, archive {archive_dir}")
    print("\n".join(summary_lines(summary)))
    if report:
        print(f"night report: {report}")
    cmd = _command()
    print(f"try: {cmd} status --archive {archive_dir}   |   {cmd} quarantine --archive {archive_dir}")
    return 0
