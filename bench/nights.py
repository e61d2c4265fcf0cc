"""Whole simulated nights through ``nightshift reduce``, scored on the simulator's truth file, one size after another.

For each size: a night of 30 s and 300 s lights in B and V (a meridian flip in every group, pointing offsets and
field rotation, one cloudy and one trailed light) is written with ``service.simulate.simulate_night``, reduced by
``daemon.batch.reduce_folders`` exactly as ``nightshift reduce`` does, and scored against ``truth.json``: the good
lights stacked out of the good lights, the lights rejected and why, and the registration error of every stacked
light (its recorded transform against the true one, largest distance at the frame's four corners).

Usage: ``python bench/nights.py --sizes 256 512 1024 2048 [--max-offset PX] [--max-rotation DEG] [--seed N]``.
Prints one JSON object per size on stdout and a table on stderr.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

__all__ = ["main", "score_night"]


def score_night(work: Path, size: int, *, max_offset: float, max_rotation: float, seed: int) -> dict[str, Any]:
    """Simulate, reduce and score one night in ``work``."""
    import numpy as np
    from nightshift.daemon.archive import Archive
    from nightshift.daemon.batch import reduce_folders
    from nightshift.daemon.config import load_config
    from nightshift.daemon.pipeline import Pipeline
    from nightshift.service.simulate import TRUTH_FILE, SimConfig, corner_error, simulate_night

    camera, root = work / "camera", work / "archive"
    config = SimConfig(size=size, n_light=4, trailed=1, max_offset=max_offset, max_rotation=max_rotation, seed=seed)
    simulate_night(camera, config)
    truth = json.loads((camera / TRUTH_FILE).read_text())
    lights = {n: t for n, t in truth["frames"].items() if t["kind"] == "light" and not t["broken"]}
    cfg = load_config(None, overrides={"archive": {"path": str(root)}, "metrics": {"listen": "off"}})
    archive = Archive(root)
    pipeline = Pipeline(cfg, archive, workers=2)
    t0 = time.perf_counter()
    try:
        reduce_folders(pipeline, [camera.absolute()], show_progress=False)
    finally:
        pipeline.close()
    seconds = time.perf_counter() - t0
    try:
        rows = {
            Path(r["path"]).relative_to(camera.absolute()).as_posix(): r
            for r in archive.query("SELECT * FROM frames WHERE kind = 'light'")
        }
    finally:
        archive.close()
    names = {r["id"]: n for n, r in rows.items()}
    errors = []
    for name, row in rows.items():
        if row["status"] == "stacked" and row["align_ref_id"] != row["id"]:
            ref = lights[names[row["align_ref_id"]]]
            true = np.array(ref["transform"]) @ np.linalg.inv(np.array(lights[name]["transform"]))
            estimate = np.array(json.loads(row["align_transform"])["matrix"])
            errors.append(corner_error(estimate, true, tuple(truth["shape"])))
    good = [n for n, t in lights.items() if t["good"]]
    return {
        "size": size,
        "lights": len(lights),
        "good_lights": len(good),
        "good_stacked": sum(rows[n]["status"] == "stacked" for n in good),
        "rejected": {Path(n).name: rows[n]["reason"] for n in lights if rows[n]["status"] == "rejected"},
        "corner_error_px": {
            "median": round(float(np.median(errors)), 4) if errors else None,
            "worst": round(max(errors), 4) if errors else None,
            "aligned": len(errors),
        },
        "reduce_s": round(seconds, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/nights.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--max-offset", type=float, default=25.0)
    parser.add_argument("--max-rotation", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    results = []
    for size in args.sizes:
        work = Path(tempfile.mkdtemp(prefix=f"nightshift-night{size}-"))
        try:
            results.append(
                score_night(work, size, max_offset=args.max_offset, max_rotation=args.max_rotation, seed=args.seed)
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(json.dumps(results[-1]), flush=True)
    header = f"{'size':>5}  {'good lights stacked':>20}  {'median corner px':>16}  {'worst corner px':>15}"
    print(header, file=sys.stderr)
    for r in results:
        e = r["corner_error_px"]
        stacked = f"{r['good_stacked']} of {r['good_lights']} ({r['lights']} lights)"
        print(f"{r['size']:>5}  {stacked:>20}  {e['median']!s:>16}  {e['worst']!s:>15}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
