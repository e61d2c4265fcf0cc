"""The night report at the size of a real night: how big it is and how fast a browser opens it.

A small night is simulated at ``--size`` and reduced by the real pipeline (so its previews are real), then its
archive is grown to ``--lights`` lights, each with a preview of its own (a copy of a real one, so every light
gets its own thumbnail made). The report is written cold (thumbnails made) and warm (thumbnails there, as when
the daemon refreshes it), linked and embedded, and headless chromium opens each in a 1280 x 1000 frame of a small
harness page that times, in the browser, from asking for the page to its load event (HTML parsed, laid out, and
every picture it loads decoded). Prints one JSON summary on stdout; progress on stderr.

    python bench/report.py --size 4096 --lights 200      # the target: under 10 MB, opens in under 2 s
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

from nightshift.daemon.archive import Archive
from nightshift.daemon.batch import reduce_folders
from nightshift.daemon.config import config_from_dict
from nightshift.daemon.pipeline import Pipeline
from nightshift.daemon.products import Layout
from nightshift.daemon.report import write_report
from nightshift.service.simulate import SimConfig, simulate_night


def say(message: str) -> None:
    print(f"[report bench] {message}", file=sys.stderr, flush=True)


def reduced_night(work: Path, size: int) -> Archive:
    camera, root = work / "camera", work / "archive"
    simulate_night(camera, SimConfig(size=size, n_light=2, n_bias=3, n_dark=3, n_flat=3))
    config = config_from_dict({"watch": {"paths": [str(camera)]}, "archive": {"path": str(root), "min_free_mb": 10}})
    archive = Archive(root)
    pipeline = Pipeline(config, archive, workers=2)
    try:
        reduce_folders(pipeline, [camera], show_progress=False, reports=False)
    finally:
        pipeline.close()
    return archive


def grow(archive: Archive, lights: int) -> str:
    """Add lights until the night has ``lights``, each with its own copy of a real preview; returns the night."""
    real = archive.query("SELECT * FROM frames WHERE kind = 'light' AND preview_path IS NOT NULL ORDER BY id")
    night = real[0]["night"]
    start = datetime.fromisoformat(max(r["date_obs"] for r in real))
    layout = Layout(archive.root)
    with archive.transaction():
        for i in range(lights - len(real)):
            model = real[i % len(real)]
            stored = Path(model["preview_path"])
            copy = stored.with_name(f"{900000 + i:06d}_grown.png")
            shutil.copyfile(layout.absolute(str(stored)), archive.root / copy)
            row = {k: v for k, v in model.items() if k not in ("id", "sha256")}
            row.update(
                path=f"/camera/grown/L_{i:04d}.fits",
                date_obs=(start + timedelta(seconds=60 * (i + 1))).isoformat(),
                preview_path=copy.as_posix(),
                status="rejected" if i % 25 == 0 else model["status"],
                reason="cloudy: transparency 0.2 < 0.5" if i % 25 == 0 else model["reason"],
            )
            archive.record_frame(row)
    return night


#: Opens the page named after ``#`` in a frame and writes the milliseconds to its load event into the DOM.
HARNESS = """<!DOCTYPE html><html><body><script>
const t0 = performance.now();
const frame = document.createElement("iframe");
frame.style.width = "1280px";
frame.style.height = "1000px";
frame.onload = () => document.body.setAttribute("data-ms", (performance.now() - t0).toFixed(0));
frame.src = decodeURIComponent(location.hash.slice(1));
document.body.appendChild(frame);
</script></body></html>
"""


def open_seconds(page: Path, work: Path, repeats: int) -> float | None:
    """Median seconds headless chromium takes from asking for ``page`` to its load event; None without chromium."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        return None
    harness = work / "harness.html"
    harness.write_text(HARNESS)
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={work / 'chromium-profile'}",
        "--window-size=1280,1000",
        "--dump-dom",
        f"{harness.absolute().as_uri()}#{page.absolute()}",
    ]
    times = []
    for _ in range(repeats):
        dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
        found = re.search(r'data-ms="(\d+)"', dom)
        if found is None:
            raise RuntimeError(f"the harness did not see {page} load")
        times.append(int(found.group(1)) / 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="frame size in pixels (square)")
    parser.add_argument("--lights", type=int, default=200, help="lights of the night")
    parser.add_argument("--repeats", type=int, default=3, help="chromium loads per page; the median is reported")
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="nightshift-report-bench-"))
    try:
        say(f"simulating and reducing a night of 8 lights at {args.size} px in {work}")
        archive = reduced_night(work, args.size)
        night = grow(archive, args.lights)
        n_lights = archive.scalar("SELECT COUNT(*) FROM frames WHERE kind = 'light' AND night = ?", [night])
        say(f"night {night}: {n_lights} lights; writing reports")
        t0 = time.perf_counter()
        page = write_report(archive, night)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        write_report(archive, night)
        warm = time.perf_counter() - t0
        mail = write_report(archive, night, out=work / "mail" / "night.html", embed=True)
        thumbs = [p for p in (archive.root / "previews").rglob("thumbs/*.jpg")]
        previews = [p for p in (archive.root / "previews").rglob("*.png")]
        say("loading the pages in headless chromium")
        linked_s = open_seconds(page, work, args.repeats)
        embedded_s = open_seconds(mail, work, args.repeats)
        archive.close()
        summary = {
            "size": args.size,
            "lights": n_lights,
            "report_bytes": page.stat().st_size,
            "thumbnails": len(thumbs),
            "thumbnail_bytes": sum(p.stat().st_size for p in thumbs),
            "thumbnail_bytes_max": max(p.stat().st_size for p in thumbs),
            "report_with_thumbnails_bytes": page.stat().st_size + sum(p.stat().st_size for p in thumbs),
            "previews_png_bytes": sum(p.stat().st_size for p in previews),
            "embedded_report_bytes": mail.stat().st_size,
            "write_seconds_cold": round(cold, 3),
            "write_seconds_warm": round(warm, 3),
            "open_seconds_report": linked_s,
            "open_seconds_embedded_report": embedded_s,
        }
        print(json.dumps(summary, indent=2))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
