"""Colour frames: nightshift against the plain way, per light of a one-shot-colour camera, side by side in one run.

One simulated colour night (default 4144 x 2822, a common sensor; RGGB, N.I.N.A. headers, top-down) is written;
masters are built once on each side (not timed). Then, per light, with the masters in memory:

- ``nightshift``: ``read_image`` -> ``calibrate`` on the raw mosaic -> ``develop`` (same-colour filling, OpenCV
  bilinear debayer) -> ``grade_frame`` on the luminance -> ``find_transform`` on the graded stars ->
  ``apply_transform`` (one transform warps the three planes; ``[stacking] colour_interpolation``, bicubic by
  default, or ``--interpolation lanczos``) -> ``LiveStack.add``; and the same plus the products the daemon
  writes (the calibrated and aligned 3-plane FITS), ``with_writes``;
- ``plain``: ``CCDData.read`` -> ccdproc ``subtract_bias``, ``subtract_dark`` (scaled), ``flat_correct`` -> a
  library debayer (OpenCV ``cvtColor`` on the frame as uint16) -> ``astroalign.register`` per channel onto the
  reference's channel -> a running sum per channel.

Each side runs in its own process (peak memory per side). Prints one JSON object: per-frame seconds of every step
(median over the lights after the reference), nightshift's light throughput with two worker threads (as
``nightshift reduce`` computes), the ratio plain / nightshift (one light at a time on both sides), and the
targets (<= 1 s per 4k colour frame, >= 3x the plain way); the table on stderr.
Usage: ``python bench/colour.py [--width 4144 --height 2822] [--lights 5] [--interpolation cubic|lanczos]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TARGET_PER_FRAME_S = 1.0
TARGET_RATIO = 3.0


def _night(work: Path, width: int, height: int, lights: int, calibrations: int) -> dict[str, Any]:
    from nightshift.service.simulate import COLOUR_CAMERA, SimConfig, simulate_night

    config = SimConfig(
        width=width,
        height=height,
        bayer="RGGB",
        row_order="TOP-DOWN",
        camera=COLOUR_CAMERA,
        filters=(None,),
        n_bias=calibrations,
        n_dark=calibrations,
        dark_exptimes=(120.0,),
        n_flat=calibrations,
        n_light=lights,
        light_exptimes=(120.0,),
        cloudy=0,
        dialect="nina",
        subfolders=False,
        cosmic_rays=0.0,
    )
    t = time.perf_counter()
    plan = simulate_night(work / "camera", config)
    names = {kind: [f.name for f in plan.by_kind(kind)] for kind in ("bias", "dark", "flat", "light")}
    return {"names": names, "seconds": round(time.perf_counter() - t, 1)}


def _times(per_frame: list[dict[str, float]]) -> dict[str, float]:
    keys = per_frame[0].keys()
    return {k: round(statistics.median(f[k] for f in per_frame), 4) for k in keys}


def side_nightshift(work: Path, names: dict[str, list[str]], interpolation: str = "cubic") -> dict[str, Any]:
    from nightshift.daemon.executor import keep_freed_memory
    from nightshift.service.calibrate import calibrate
    from nightshift.service.colour import develop
    from nightshift.service.fitsio import read_image, write_fits_atomic
    from nightshift.service.grade import grade_frame
    from nightshift.service.masters import bad_pixel_mask, make_master_bias, make_master_dark, make_master_flat
    from nightshift.service.register import apply_transform, find_transform
    from nightshift.service.stack import LiveStack

    keep_freed_memory()  # as nightshift's compute slots run (daemon/executor.py)
    camera = work / "camera"
    paths = {k: [camera / n for n in v] for k, v in names.items()}
    bias = make_master_bias(paths["bias"])
    dark = make_master_dark(paths["dark"], bias=bias)
    dark.mask = bad_pixel_mask(dark=dark)
    flat = make_master_flat(paths["flat"], bias=bias)
    flat.mask = bad_pixel_mask(flat=flat)
    mask = dark.mask | flat.mask
    out = work / "nightshift"
    frames: list[dict[str, float]] = []
    ref_stars = live = shape = None
    for i, path in enumerate(paths["light"]):
        t: dict[str, float] = {}
        t0 = time.perf_counter()
        raw = read_image(path)
        t1 = time.perf_counter()
        cal = calibrate(raw, bias=bias, dark=dark, flat=flat, mask=mask)
        t2 = time.perf_counter()
        rgb = develop(cal)
        t3 = time.perf_counter()
        grade = grade_frame(rgb)
        t4 = time.perf_counter()
        if ref_stars is None:
            ref_stars, shape = grade.stars, rgb.plane_shape
            aligned = rgb
        else:
            aligned = apply_transform(rgb, find_transform(grade.stars, ref_stars), shape, interpolation=interpolation)
        t5 = time.perf_counter()
        if live is None:
            live = LiveStack(aligned.data.shape)
        live.add(aligned)
        t6 = time.perf_counter()
        write_fits_atomic(out / "calibrated" / f"{i:03d}.fits", rgb)
        write_fits_atomic(out / "aligned" / f"{i:03d}.fits", aligned)
        t7 = time.perf_counter()
        if i == 0:
            continue  # the reference: no alignment to time
        t.update(
            read=t1 - t0,
            calibrate=t2 - t1,
            debayer=t3 - t2,
            grade=t4 - t3,
            align=t5 - t4,
            stack=t6 - t5,
            writes=t7 - t6,
        )
        t["per_frame"] = t6 - t0
        t["with_writes"] = t7 - t0
        frames.append(t)

    # the same lights again, two at a time on worker threads as `nightshift reduce` computes them (the archive
    # and the running stack stay on one thread): light throughput on both cores
    def compute(path: Path) -> Any:
        rgb = develop(calibrate(read_image(path), bias=bias, dark=dark, flat=flat, mask=mask))
        grade = grade_frame(rgb)
        return apply_transform(rgb, find_transform(grade.stars, ref_stars), shape, interpolation=interpolation)

    live2 = LiveStack(live.shape)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        for aligned in pool.map(compute, paths["light"][1:]):
            live2.add(aligned)
    two_workers = (time.perf_counter() - t0) / max(1, len(paths["light"]) - 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "per_frame_s": _times(frames),
        "per_frame_two_workers_s": round(two_workers, 4),
        "frames": len(frames),
        "interpolation": interpolation,
        "peak_rss_mb": round(peak, 1),
    }


def side_plain(work: Path, names: dict[str, list[str]]) -> dict[str, Any]:
    import astroalign
    import astropy.units as u
    import ccdproc
    import cv2
    import numpy as np
    from astropy.nddata import CCDData

    camera = work / "camera"
    paths = {k: [camera / n for n in v] for k, v in names.items()}

    def read(p: Path) -> CCDData:
        return CCDData.read(p, unit="adu")

    mbias = ccdproc.combine([read(p) for p in paths["bias"]], method="average", sigma_clip=True)
    darks = [ccdproc.subtract_bias(read(p), mbias) for p in paths["dark"]]
    mdark = ccdproc.combine(darks, method="median")
    mdark.header["EXPTIME"] = darks[0].header["EXPTIME"]
    flats = [ccdproc.subtract_bias(read(p), mbias) for p in paths["flat"]]
    mflat = ccdproc.combine(flats, method="average", sigma_clip=True, scale=lambda a: 1.0 / np.median(a))
    frames: list[dict[str, float]] = []
    ref = total = None
    for path in paths["light"]:
        t0 = time.perf_counter()
        ccd = read(path)
        t1 = time.perf_counter()
        ccd = ccdproc.subtract_bias(ccd, mbias)
        ccd = ccdproc.subtract_dark(ccd, mdark, exposure_time="EXPTIME", exposure_unit=u.s, scale=True)
        ccd = ccdproc.flat_correct(ccd, mflat)
        t2 = time.perf_counter()
        mosaic = np.clip(np.asarray(ccd.data), 0, 65535).astype(np.uint16)
        rgb = cv2.cvtColor(mosaic, getattr(cv2, f"COLOR_Bayer{ccd.header['BAYERPAT']}2RGB")).astype(np.float32)
        t3 = time.perf_counter()
        if ref is None:
            ref, total = rgb, rgb.astype(np.float64)
            continue
        aligned = np.empty_like(rgb)
        for c in range(3):
            aligned[..., c], _ = astroalign.register(
                np.ascontiguousarray(rgb[..., c]), np.ascontiguousarray(ref[..., c])
            )
        t4 = time.perf_counter()
        total += aligned
        t5 = time.perf_counter()
        frames.append(
            {
                "read": t1 - t0,
                "calibrate": t2 - t1,
                "debayer": t3 - t2,
                "align": t4 - t3,
                "stack": t5 - t4,
                "per_frame": t5 - t0,
            }
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"per_frame_s": _times(frames), "frames": len(frames), "peak_rss_mb": round(peak, 1)}


def _run_side(side: str, work: Path, interpolation: str, cv_threads: int) -> dict[str, Any]:
    out = subprocess.run(
        [
            *(sys.executable, __file__, "--side", side, "--work", str(work)),
            *("--interpolation", interpolation, "--cv-threads", str(cv_threads)),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=4144)
    ap.add_argument("--height", type=int, default=2822)
    ap.add_argument("--lights", type=int, default=5, help="lights; the first is the reference (not timed)")
    ap.add_argument("--calibrations", type=int, default=3, help="bias frames, darks and flats")
    ap.add_argument("--work", type=Path, help="work folder (default: a temporary one, removed at the end)")
    ap.add_argument(
        "--interpolation", choices=["cubic", "lanczos"], default="cubic", help="nightshift's colour resampling"
    )
    ap.add_argument("--cv-threads", type=int, default=0, help="OpenCV threads (cv2.setNumThreads; 0: its default)")
    ap.add_argument("--side", choices=["nightshift", "plain"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    if args.side:
        if args.cv_threads:
            import cv2

            cv2.setNumThreads(args.cv_threads)
        names = json.loads((args.work / "night.json").read_text())["names"]
        if args.side == "nightshift":
            print(json.dumps(side_nightshift(args.work, names, args.interpolation)))
        else:
            print(json.dumps(side_plain(args.work, names)))
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="nightshift-colour-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        night = _night(work, args.width, args.height, args.lights, args.calibrations)
        (work / "night.json").write_text(json.dumps(night))
        result: dict[str, Any] = {
            "frame": [args.width, args.height],
            "lights": args.lights,
            "cores": os.cpu_count(),
            "cv_threads": args.cv_threads or "default",
            "simulate_s": night["seconds"],
        }
        for side in ("nightshift", "plain"):
            print(f"[bench colour] {side} ...", file=sys.stderr, flush=True)
            result[side] = _run_side(side, work, args.interpolation, args.cv_threads)
        ns, plain = result["nightshift"]["per_frame_s"], result["plain"]["per_frame_s"]
        ratio = plain["per_frame"] / ns["per_frame"] if ns["per_frame"] > 0 else None
        result["ratio"] = round(ratio, 2) if ratio else None
        result["targets"] = {
            "per_frame_s": TARGET_PER_FRAME_S,
            "per_frame_met": ns["per_frame"] <= TARGET_PER_FRAME_S,
            "ratio": TARGET_RATIO,
            "ratio_met": bool(ratio and ratio >= TARGET_RATIO),
        }
        rows = ["read", "calibrate", "debayer", "grade", "align", "stack", "per_frame"]
        table = [f"{'step':12s} {'nightshift s':>13s} {'plain s':>9s}"]
        for key in rows:
            a, b = ns.get(key), plain.get(key)
            table.append(f"{key:12s} {a if a is not None else '-':>13} {b if b is not None else '-':>9}")
        table.append(f"{'with writes':12s} {ns['with_writes']:>13} {'-':>9}")
        two = result["nightshift"]["per_frame_two_workers_s"]
        table.append(f"{'2 workers':12s} {two:>13} {'-':>9}  (light throughput, both cores)")
        print("\n".join(table), file=sys.stderr)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
