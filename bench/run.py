"""The nightshift benchmark: nightshift's batch reduction and daemon against the plain ccdproc + astroalign way.

One run simulates a night, then measures, each phase in its own process (so one phase's memory peak does not
hide another's):

- ``nightshift``: ``nightshift.daemon.batch.reduce_folders`` on a fresh archive, exactly what ``nightshift reduce`` does
  (ingest, masters, calibration, grading, alignment, live and final stacks, previews, the SQLite archive), with
  the per-stage times of its Prometheus histogram ``nightshift_stage_duration_seconds``;
- ``baseline_calibrate``: the same calibration the plain way, with ``CCDData`` and ccdproc (the method of
  ``/work/shared/reference/ccd-reduction-notebook.txt``);
- ``baseline_align``: the plain way of aligning and stacking: ``astroalign.register`` per frame, then average;
- ``siril``: Siril (``siril-cli -s``), the open-source tool users would otherwise pick, on the same night with
  its standard script (bench/siril.py); and the sharpness of every side's stacks measured with one yardstick;
- ``nightshift_align``: nightshift's own science for the same step in isolation (stars, transform, warp, add);
- ``calibrate_one``: ``nightshift.service.calibrate.calibrate`` on one light with masters already in memory;
- ``daemon`` (``--daemon``): the real daemon (``nightshift run``) watching a folder that a writer fills frame by
  frame; the latency from a light's file being closed to its calibrated row in the archive.

It prints one JSON summary on stdout (progress goes to stderr). Speed targets are checked here, never by tests.
Usage: ``python bench/run.py --size 2048 --lights 8 --calibrations 5 [--daemon] [--out FILE]``; see
bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

__all__ = ["PHASES", "main", "percentile", "run_phase"]

#: Phases in the order they run; ``daemon`` only with ``--daemon``.
PHASES = (
    "simulate",
    "nightshift",
    "baseline_calibrate",
    "baseline_align",
    "siril",
    "nightshift_align",
    "calibrate_one",
    "daemon",
)

#: Targets of the issues: batch reduce >= 5x the plain ccdproc way, align+stack >= 2x astroalign.register and
#: <= 0.5 s per 2k frame, one 2k light calibrated in <= 0.1 s.
TARGET_END_TO_END = 5.0
TARGET_ALIGN_RATIO = 2.0
TARGET_ALIGN_PER_2K_FRAME_S = 0.5
TARGET_CALIBRATE_ONE_2K_S = 0.1
#: Issue 9: the whole night >= 5x the plain way with every good light stacked; per 2k frame star detection
#: <= 0.08 s, matching <= 0.05 s, warping <= 0.05 s; aligned FWHM <= 1.02x calibrated.
TARGET_WHOLE_NIGHT = 5.0
TARGET_DETECT_2K_S = 0.08
TARGET_MATCH_S = 0.05
TARGET_WARP_2K_S = 0.05
TARGET_FWHM_RATIO = 1.02


def say(message: str) -> None:
    """One progress line on stderr."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, linearly interpolated; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _r(x: float | None, digits: int = 4) -> float | None:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return round(float(x), digits)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return round(a / b, 2)


def _epoch(iso_utc: str) -> float:
    """Unix seconds of a naive-UTC ISO time as the archive writes it."""
    return datetime.fromisoformat(iso_utc).replace(tzinfo=UTC).timestamp()


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


# -- the night -----------------------------------------------------------------------------------------------------
def _sim_config(p: dict[str, Any]) -> Any:
    from nightshift.service.simulate import SimConfig

    n = p["calibrations"]
    return SimConfig(
        size=p["size"],
        n_bias=n,
        n_dark=n,
        n_flat=n,
        n_light=p["lights"],
        dialect=p["dialect"],
        seed=p["seed"],
        max_offset=p.get("max_offset", 25.0),
        max_rotation=p.get("max_rotation", 0.8),
        trailed=p.get("trailed", 1),
    )


def phase_simulate(work: Path, p: dict[str, Any]) -> dict[str, Any]:
    """Write the night to ``work/camera`` and a manifest of what each file truly is."""
    from nightshift.service.simulate import simulate_night

    camera = work / "camera"
    t0 = time.perf_counter()
    plan = simulate_night(camera, _sim_config(p))
    seconds = time.perf_counter() - t0
    manifest = [
        {
            "path": str((camera / f.name).absolute()),
            "kind": f.kind,
            "filter": f.filter,
            "exptime": f.exptime,
            "object": f.object,
            "cloudy": f.cloudy,
            "trailed": f.trailed,
            "good": f.kind == "light" and not (f.cloudy or f.trailed),
            "transform": plan.transform(f).tolist() if f.kind == "light" else None,
        }
        for f in plan.frames
    ]
    _write_json(work / "manifest.json", manifest)
    counts: dict[str, int] = {}
    for m in manifest:
        counts[m["kind"]] = counts.get(m["kind"], 0) + 1
    size_mb = sum(Path(m["path"]).stat().st_size for m in manifest) / 2**20
    return {"seconds": seconds, "counts": counts, "files": len(manifest), "raw_mb": size_mb}


# -- nightshift batch reduce ---------------------------------------------------------------------------------------
def _stage_histograms(metrics: Any) -> dict[str, dict[str, float]]:
    """Sum and count of nightshift_stage_duration_seconds, by stage."""
    out: dict[str, dict[str, float]] = {}
    for family in metrics.stage_duration_seconds.collect():
        for s in family.samples:
            stage = s.labels.get("stage")
            if s.name.endswith("_sum"):
                out.setdefault(stage, {})["sum_s"] = s.value
            elif s.name.endswith("_count"):
                out.setdefault(stage, {})["count"] = int(s.value)
    return {k: v for k, v in out.items() if v.get("count")}


def _save_profile(profiler: Any, path: Path) -> None:
    """Dump the profile to ``path`` and its top functions (by cumulative time) to ``path``.txt and stderr."""
    import io
    import pstats

    profiler.dump_stats(path)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(45)
    path.with_suffix(".txt").write_text(text.getvalue())
    print(text.getvalue(), file=sys.stderr)


def phase_nightshift(work: Path, p: dict[str, Any]) -> dict[str, Any]:
    """``nightshift reduce camera`` on a fresh archive, timed, with its stage histograms."""
    from nightshift.daemon.archive import Archive
    from nightshift.daemon.batch import reduce_folders
    from nightshift.daemon.config import load_config
    from nightshift.daemon.logs import setup_logging
    from nightshift.daemon.pipeline import Pipeline

    root = work / "archive-reduce"
    shutil.rmtree(root, ignore_errors=True)
    config = load_config(None, overrides={"archive": {"path": str(root)}, "metrics": {"listen": "off"}})
    setup_logging("warning", "text")  # `nightshift reduce` logs at info; the lines cost nothing measurable
    wall0 = time.time()
    t0 = time.perf_counter()
    archive = Archive(config.archive_path, create=True)
    pipeline = Pipeline(config, archive, workers=os.cpu_count() or 1)  # as `nightshift reduce` does
    profiler = None
    if p.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        summary = reduce_folders(pipeline, [(work / "camera").absolute()], show_progress=True)
    finally:
        total = time.perf_counter() - t0
        if profiler is not None:
            profiler.disable()
            _save_profile(profiler, work / "nightshift.prof")
        wall1 = time.time()
        stages = _stage_histograms(pipeline.metrics)
        rows = archive.query("SELECT at FROM events WHERE stage = 'calibrate' AND decision = 'calibrated' ORDER BY at")
        lights = archive.query("SELECT status, COUNT(*) AS n FROM frames WHERE kind = 'light' GROUP BY status")
        status = {r["path"]: r["status"] for r in archive.query("SELECT path, status FROM frames")}
        archive.close()
    good = [m["path"] for m in _read_json(work / "manifest.json") if m["good"]]
    last_calibrated = _epoch(rows[-1]["at"]) - wall0 if rows else None
    return {
        "total_s": total,
        "wall_start": wall0,
        "wall_end": wall1,
        "stages": stages,
        "calibrated_at_s": last_calibrated,
        "lights_calibrated": len(rows),
        "lights_by_status": {r["status"]: r["n"] for r in lights},
        "good_lights": len(good),
        "good_lights_stacked": sum(status.get(path) == "stacked" for path in good),
        "files": summary.get("files"),
        "summary_seconds": summary.get("seconds"),
        "stacks": [{k: s[k] for k in ("object", "filter", "exptime", "n_frames", "state")} for s in summary["stacks"]],
    }


# -- the plain ccdproc way -----------------------------------------------------------------------------------------
def _inv_median(a: Any) -> float:
    import numpy as np

    return 1.0 / float(np.ma.median(a))


def _subtract_dark(ccd: Any, dark: Any) -> Any:
    """ccdproc.subtract_dark scaled by exposure from EXPTIME (EXPOSURE when a capture program writes only that)."""
    import astropy.units as u
    import ccdproc

    if "EXPTIME" in ccd.header and "EXPTIME" in dark.header:
        return ccdproc.subtract_dark(ccd, dark, scale=True, exposure_time="EXPTIME", exposure_unit=u.s)

    def exposure(h: Any) -> float:
        return float(h.get("EXPTIME", h.get("EXPOSURE")))

    return ccdproc.subtract_dark(
        ccd, dark, scale=True, data_exposure=exposure(ccd.header) * u.s, dark_exposure=exposure(dark.header) * u.s
    )


def phase_baseline_calibrate(work: Path, p: dict[str, Any]) -> dict[str, Any]:
    """Masters and calibrated lights with CCDData and ccdproc, as the reference notebook does it."""
    import ccdproc
    import numpy as np
    from astropy.nddata import CCDData

    manifest = _read_json(work / "manifest.json")
    out = work / "baseline"
    shutil.rmtree(out, ignore_errors=True)
    (out / "calibrated").mkdir(parents=True)

    def read(m: dict[str, Any]) -> CCDData:
        return CCDData.read(m["path"], unit="adu")

    times: dict[str, float] = {}
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    bias = ccdproc.combine(
        [read(m) for m in manifest if m["kind"] == "bias"],
        method="average",
        sigma_clip=True,
        sigma_clip_low_thresh=3,
        sigma_clip_high_thresh=3,
        sigma_clip_func=np.ma.median,
        sigma_clip_dev_func=np.ma.std,
    )
    bias.meta["IMAGETYP"] = "MASTER BIAS"
    bias.write(out / "master_bias.fits", overwrite=True)
    times["bias_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    darks: dict[float, CCDData] = {}
    for t in sorted({m["exptime"] for m in manifest if m["kind"] == "dark"}):
        frames = [ccdproc.subtract_bias(read(m), bias) for m in manifest if m["kind"] == "dark" and m["exptime"] == t]
        darks[t] = ccdproc.combine(frames, method="median")
        darks[t].meta["IMAGETYP"] = "MASTER DARK"
        darks[t].write(out / f"master_dark_{t:g}s.fits", overwrite=True)
    times["darks_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    flats: dict[str, CCDData] = {}
    for f in sorted({m["filter"] for m in manifest if m["kind"] == "flat"}):
        frames = [ccdproc.subtract_bias(read(m), bias) for m in manifest if m["kind"] == "flat" and m["filter"] == f]
        flat = ccdproc.combine(
            frames,
            method="average",
            scale=_inv_median,
            sigma_clip=True,
            sigma_clip_low_thresh=3,
            sigma_clip_high_thresh=3,
            sigma_clip_func=np.ma.median,
            sigma_clip_dev_func=np.ma.std,
        )
        flat = flat.divide(np.median(flat.data) * flat.unit)  # normalised to median 1, like nightshift's
        flat.meta["IMAGETYP"] = "MASTER FLAT"
        flat.write(out / f"master_flat_{f}.fits", overwrite=True)
        flats[f] = flat
    times["flats_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    lights = [m for m in manifest if m["kind"] == "light"]
    written = []
    for i, m in enumerate(lights):
        ccd = read(m)
        ccd = ccdproc.subtract_bias(ccd, bias)
        dark = darks[min(darks, key=lambda t: abs(t - m["exptime"]))]
        ccd = _subtract_dark(ccd, dark)
        ccd = ccdproc.flat_correct(ccd, flats[m["filter"]], norm_value=1.0)
        path = out / "calibrated" / f"{i:04d}_{Path(m['path']).stem}.fits"
        ccd.write(path, overwrite=True)
        written.append({**m, "calibrated": str(path)})
        if (i + 1) % 8 == 0 or i + 1 == len(lights):
            say(f"baseline calibrate: {i + 1}/{len(lights)} lights")
    times["lights_s"] = time.perf_counter() - t0
    times["total_s"] = time.perf_counter() - t_all
    _write_json(work / "baseline_lights.json", written)
    return {**times, "lights": len(lights), "masters": 1 + len(darks) + len(flats)}


def _groups(items: list[dict[str, Any]]) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    out: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for m in items:
        out.setdefault((m["object"], m["filter"], m["exptime"]), []).append(m)
    return out


def phase_baseline_align(work: Path, p: dict[str, Any]) -> dict[str, Any]:
    """The notebook's image_stack: astroalign.register(frame, reference) per frame, then the average."""
    import astroalign
    from astropy.io import fits

    lights = _read_json(work / "baseline_lights.json")
    out = work / "baseline" / "stacks"
    out.mkdir(parents=True, exist_ok=True)
    register_times: list[float] = []
    failed = 0
    good = {m["path"] for m in _read_json(work / "manifest.json") if m["good"]}
    good_stacked = 0
    t0 = time.perf_counter()
    for (obj, filt, exptime), members in _groups(lights).items():
        good_stacked += members[0]["path"] in good
        ref, ref_header = fits.getdata(members[0]["calibrated"], header=True)
        ref = ref.astype("float")
        total = ref.copy()
        n = 1
        for m in members[1:]:
            image = fits.getdata(m["calibrated"]).astype("float")
            t = time.perf_counter()
            try:
                aligned, _footprint = astroalign.register(image, ref)
            except Exception as exc:  # the plain way has no grading: a frame it cannot match is left out
                failed += 1
                say(f"astroalign could not register {Path(m['path']).name}: {type(exc).__name__}: {exc}")
                continue
            finally:
                register_times.append(time.perf_counter() - t)
            total += aligned
            n += 1
            good_stacked += m["path"] in good
        total /= n
        fits.writeto(out / f"{obj}_{filt}_{exptime:g}s.fits".replace(" ", "_"), total, ref_header, overwrite=True)
    seconds = time.perf_counter() - t0
    return {
        "total_s": seconds,
        "frames": len(lights),
        "registered": len(register_times) - failed,
        "failed": failed,
        "good_lights": len(good),
        "good_lights_stacked": good_stacked,
        "per_frame_s": seconds / max(1, len(lights)),
        "register_per_frame_s": statistics.fmean(register_times) if register_times else None,
        "register_median_s": statistics.median(register_times) if register_times else None,
    }


# -- nightshift's align + stack science alone ----------------------------------------------------------------------
def phase_nightshift_align(work: Path, p: dict[str, Any]) -> dict[str, Any]:
    """service.grade (stars) + service.register + service.stack on nightshift's calibrated lights, per frame.

    Each light goes onto the first light of its (object, filter, exposure), as the plain way does. Per light:
    star detection, matching and warping (Lanczos, the default; bicubic timed too) are timed alone; for the good
    lights (not cloudy, not trailed) the aligned frame's FWHM is compared with the calibrated frame's and the
    transform with the simulator's true one at the frame's corners. The process keeps freed memory for the next
    frame, as nightshift's compute slots do.
    """
    import numpy as np
    from astropy.io import fits
    from nightshift.daemon.archive import Archive
    from nightshift.daemon.executor import keep_freed_memory
    from nightshift.service.fitsio import read_flags, read_image, write_fits_atomic
    from nightshift.service.grade import grade_frame
    from nightshift.service.register import AlignError, apply_transform, find_transform
    from nightshift.service.simulate import corner_error
    from nightshift.service.stack import LiveStack

    keep_freed_memory()  # as nightshift's compute slots run (daemon/executor.py)
    root = work / "archive-reduce"
    archive = Archive(root, create=False)
    try:
        rows = archive.query(
            "SELECT object, filter, exptime, calibrated_path, path FROM frames "
            "WHERE kind = 'light' AND calibrated_path IS NOT NULL ORDER BY date_obs, id"
        )
    finally:
        archive.close()
    manifest = {m["path"]: m for m in _read_json(work / "manifest.json")}
    out = work / "nightshift-align"
    out.mkdir(parents=True, exist_ok=True)
    parts = {"read_s": 0.0, "stars_s": 0.0, "transform_s": 0.0, "warp_s": 0.0, "add_s": 0.0, "write_s": 0.0}
    per: dict[str, list[float]] = {"detect": [], "match": [], "warp": [], "warp_cubic": []}
    fwhm_ratio: list[float] = []
    corner_px: list[float] = []
    failed = 0

    @contextmanager
    def timed(key: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            parts[key] += time.perf_counter() - t

    def clock(fn: Any, *args: Any, **kw: Any) -> tuple[Any, float]:
        t = time.perf_counter()
        value = fn(*args, **kw)
        return value, time.perf_counter() - t

    t0 = time.perf_counter()
    for (obj, filt, exptime), members in _groups(rows).items():
        ref_grade = live = ref_truth = None
        stack_path = out / f"{obj}_{filt}_{exptime:g}s.fits".replace(" ", "_")
        for m in members:
            path = root / m["calibrated_path"]
            truth = manifest[m["path"]]
            with timed("read_s"):
                img = read_image(path)
                img.mask, img.saturated = read_flags(path)
            with timed("stars_s"):
                grade, seconds = clock(grade_frame, img)
            per["detect"].append(seconds)
            if live is None:
                ref_grade, live, ref_truth = grade, LiveStack(img.data.shape), truth
                with timed("add_s"):
                    live.add(img)
                continue
            try:
                with timed("transform_s"):
                    transform, seconds = clock(find_transform, grade.stars, ref_grade.stars)
                per["match"].append(seconds)
            except AlignError as exc:
                failed += 1
                say(f"nightshift could not align {Path(m['path']).name}: {exc}")
                continue
            with timed("warp_s"):
                aligned, seconds = clock(apply_transform, img, transform, live.shape)
            per["warp"].append(seconds)
            per["warp_cubic"].append(clock(apply_transform, img, transform, live.shape, interpolation="cubic")[1])
            with timed("add_s"):
                live.add(aligned)
            with timed("write_s"):  # as the daemon does: the aligned frame and the current stack, every frame
                write_fits_atomic(out / "aligned.fits", aligned)
                write_fits_atomic(stack_path, live.image(fits.Header()))
            if truth["good"] and ref_truth["good"]:
                fwhm_ratio.append(grade_frame(aligned).fwhm / grade.fwhm)
                true = np.array(ref_truth["transform"]) @ np.linalg.inv(np.array(truth["transform"]))
                corner_px.append(corner_error(transform.matrix, true, img.data.shape))
    seconds = time.perf_counter() - t0
    n = max(1, len(rows))
    return {
        "total_s": seconds,
        "frames": len(rows),
        "failed": failed,
        "per_frame_s": seconds / n,
        "per_frame_parts_s": {k: v / n for k, v in parts.items()},
        "per_frame_median_s": {k: statistics.median(v) if v else None for k, v in per.items()},
        "aligned_fwhm_ratio": {
            "median": statistics.median(fwhm_ratio) if fwhm_ratio else None,
            "max": max(fwhm_ratio) if fwhm_ratio else None,
            "frames": len(fwhm_ratio),
        },
        "registration_corner_px": {
            "median": statistics.median(corner_px) if corner_px else None,
            "max": max(corner_px) if corner_px else None,
            "frames": len(corner_px),
        },
        "agreement": _agreement(work, {r["path"]: root / r["calibrated_path"] for r in rows}),
    }


def _agreement(work: Path, nightshift: dict[str, Path], n: int = 4) -> dict[str, Any]:
    """How close the two sides' calibrated lights are: median |difference| over median |value| (not timed)."""
    import numpy as np
    from astropy.io import fits

    baseline = _read_json(work / "baseline_lights.json")
    picks = [m for m in baseline if m["path"] in nightshift]
    picks = picks[:: max(1, len(picks) // n)][:n]
    worst_abs = worst_rel = 0.0
    for m in picks:
        a = fits.getdata(nightshift[m["path"]]).astype(np.float64)
        b = fits.getdata(m["calibrated"]).astype(np.float64)
        diff = float(np.nanmedian(np.abs(a - b)))
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / max(float(np.nanmedian(np.abs(b))), 1e-9))
    return {"lights_compared": len(picks), "max_median_abs_diff_adu": worst_abs, "max_relative_diff": worst_rel}


# -- one light, calibrated alone -----------------------------------------------------------------------------------
def phase_calibrate_one(work: Path, p: dict[str, Any]) -> dict[str, Any]:
    """service.calibrate.calibrate on one light with its masters in memory; and read + calibrate + write."""
    import astropy.units as u
    import ccdproc
    from astropy.nddata import CCDData
    from nightshift.daemon.archive import Archive
    from nightshift.daemon.mastercache import MasterCache, combined_mask
    from nightshift.service.calibrate import calibrate
    from nightshift.service.fitsio import read_image, write_fits_atomic

    root = work / "archive-reduce"
    archive = Archive(root, create=False)
    try:
        light = archive.one(
            "SELECT * FROM frames WHERE kind = 'light' AND bias_id IS NOT NULL AND dark_id IS NOT NULL "
            "AND flat_id IS NOT NULL ORDER BY exptime DESC, id LIMIT 1"
        )
        if light is None:
            raise RuntimeError("no light was calibrated with bias, dark and flat by the nightshift phase")
        masters = {
            k: archive.one("SELECT * FROM masters WHERE id = ?", [light[f"{k}_id"]]) for k in ("bias", "dark", "flat")
        }
    finally:
        archive.close()
    cache = MasterCache()
    bias, dark, flat = (cache.get(root / masters[k]["path"]) for k in ("bias", "dark", "flat"))
    mask = combined_mask(dark, flat)
    raw_path = Path(light["path"])
    raw = read_image(raw_path)
    n = p["repeats"]

    def run() -> Any:
        return calibrate(raw, bias=bias, dark=dark, flat=flat, dark_factor=light["dark_scale"], mask=mask)

    run()  # warm-up: first-touch page faults of the masters
    alone = []
    for _ in range(n):
        t = time.perf_counter()
        run()
        alone.append(time.perf_counter() - t)

    out = work / "calibrate-one"
    out.mkdir(exist_ok=True)
    io_times: dict[str, list[float]] = {"read_s": [], "calibrate_s": [], "write_s": [], "total_s": []}
    for _ in range(n):
        t0 = time.perf_counter()
        img = read_image(raw_path)
        t1 = time.perf_counter()
        result = calibrate(img, bias=bias, dark=dark, flat=flat, dark_factor=light["dark_scale"], mask=mask)
        t2 = time.perf_counter()
        write_fits_atomic(out / "calibrated.fits", result)
        t3 = time.perf_counter()
        for key, v in zip(io_times, (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True):
            io_times[key].append(v)

    # the same light the plain way, its masters already in memory (from the baseline phase)
    base = work / "baseline"
    plain = None
    flat_file = base / f"master_flat_{light['filter']}.fits"
    dark_file = base / f"master_dark_{light['exptime']:g}s.fits"
    if flat_file.exists() and dark_file.exists():
        m_bias = CCDData.read(base / "master_bias.fits", unit="adu")
        m_dark = CCDData.read(dark_file, unit="adu")
        m_flat = CCDData.read(flat_file, unit=u.dimensionless_unscaled)
        ccd_raw = CCDData.read(raw_path, unit="adu")
        plain = []
        for _ in range(max(3, n // 3)):
            t = time.perf_counter()
            ccd = ccdproc.subtract_bias(ccd_raw, m_bias)
            ccd = _subtract_dark(ccd, m_dark)
            ccdproc.flat_correct(ccd, m_flat, norm_value=1.0)
            plain.append(time.perf_counter() - t)
    return {
        "light": raw_path.name,
        "shape": list(raw.data.shape),
        "runs": n,
        "calibrate_median_s": statistics.median(alone),
        "calibrate_min_s": min(alone),
        "read_calibrate_write_median_s": {k: statistics.median(v) for k, v in io_times.items()},
        "ccdproc_in_memory_median_s": statistics.median(plain) if plain else None,
    }


# -- the daemon, live ----------------------------------------------------------------------------------------------
_DAEMON_CONFIG = """\
[watch]
paths = [{camera}]
quiet_seconds = {quiet}
rescan_interval_seconds = 300.0

[archive]
path = {archive}
min_free_mb = 100

[calibration]
set_quiet_seconds = 2.0

[stacking]
final_after_seconds = 3600.0

[metrics]
listen = "off"

[logging]
level = "info"
"""


def _ro_db(root: Path) -> sqlite3.Connection | None:
    db = root / "nightshift.db"
    if not db.exists():
        return None
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5.0)
        con.row_factory = sqlite3.Row
        con.execute("SELECT 1 FROM events LIMIT 1")
        return con
    except sqlite3.Error:
        return None


def _events(con: sqlite3.Connection, stage: str, decision: str) -> dict[str, float]:
    """path -> time (Unix seconds) of the first ``stage``/``decision`` event of each frame."""
    out: dict[str, float] = {}
    try:
        rows = con.execute(
            "SELECT f.path AS path, MIN(e.at) AS at FROM events e JOIN frames f ON f.id = e.frame_id "
            "WHERE e.stage = ? AND e.decision = ? GROUP BY f.path",
            [stage, decision],
        ).fetchall()
    except sqlite3.OperationalError:  # busy or locked for a moment: try again on the next poll
        return out
    for r in rows:
        out[r["path"]] = _epoch(r["at"])
    return out


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def phase_daemon(work: Path, p: dict[str, Any]) -> dict[str, Any]:
    """``nightshift run`` on an empty folder; a writer writes calibrations, then lights one by one."""
    from nightshift.service.simulate import plan_night, write_frame

    camera = (work / "daemon-camera").absolute()
    root = (work / "archive-daemon").absolute()
    for d in (camera, root):
        shutil.rmtree(d, ignore_errors=True)
    camera.mkdir(parents=True)
    config = work / "daemon.toml"
    config.write_text(
        _DAEMON_CONFIG.format(camera=json.dumps(str(camera)), archive=json.dumps(str(root)), quiet=p["quiet_seconds"])
    )
    plan = plan_night(_sim_config(p))
    calibrations = [f for f in plan.frames if f.kind != "light"]
    lights = [f for f in plan.frames if f.kind == "light"][: p["daemon_lights"]]
    n_masters = 1 + len({f.exptime for f in calibrations if f.kind == "dark"})
    n_masters += len({f.filter for f in calibrations if f.kind == "flat"})
    interval = p["daemon_interval"]

    log_path = work / "daemon.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    argv = [
        sys.executable,
        "-c",
        "import sys; from nightshift.daemon.cli import main; sys.exit(main(sys.argv[1:]))",
        "run",
        "--config",
        str(config),
        "--watch",
        str(camera),
        "--archive",
        str(root),
        "--metrics",
        "off",
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    con: sqlite3.Connection | None = None
    try:

        def alive() -> None:
            if proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {proc.returncode}:\n{_tail(log_path)}")

        deadline = time.monotonic() + 60
        while "watching" not in log_path.read_text(errors="replace"):
            alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start within 60 s:\n{_tail(log_path)}")
            time.sleep(0.1)
        say(f"daemon: started (pid {proc.pid}); writing {len(calibrations)} calibration frames")
        for f in calibrations:
            write_frame(plan, f, camera)
            time.sleep(0.2)
        t_masters = time.monotonic()
        deadline = t_masters + 180
        while True:
            alive()
            con = con or _ro_db(root)
            if con is not None:
                try:
                    built = con.execute("SELECT COUNT(*) FROM masters").fetchone()[0]
                except sqlite3.OperationalError:
                    built = 0
                if built >= n_masters:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {built} of {n_masters} masters after 180 s:\n{_tail(log_path)}")
            time.sleep(0.2)
        masters_s = time.monotonic() - t_masters
        say(f"daemon: {n_masters} masters built {masters_s:.1f} s after the last calibration frame")

        say(f"daemon: writing {len(lights)} lights, one every {interval:g} s")
        closed: dict[str, float] = {}
        start = time.monotonic()
        for i, f in enumerate(lights):
            wait = start + i * interval - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            path = write_frame(plan, f, camera)  # returns once the file is closed
            closed[str(path.absolute())] = time.time()
        deadline = time.monotonic() + max(120.0, 10 * interval)
        calibrated: dict[str, float] = {}
        while True:
            alive()
            calibrated = _events(con, "calibrate", "calibrated")
            if all(k in calibrated for k in closed) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        ingested = _events(con, "ingest", "ingested")
    finally:
        if con is not None:
            con.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    try:
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        daemon_rss_mb = usage.ru_maxrss / 1024
    except ChildProcessError:
        daemon_rss_mb = None
    latencies = [calibrated[k] - t for k, t in closed.items() if k in calibrated]
    to_ingest = [ingested[k] - t for k, t in closed.items() if k in ingested]
    return {
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "max": max(latencies) if latencies else None,
        "quiet_seconds": p["quiet_seconds"],
        "ingested_p50": percentile(to_ingest, 50),
        "lights": len(closed),
        "calibrated": len(latencies),
        "interval_s": interval,
        "masters_built_s": masters_s,
        "daemon_exit": proc.returncode,
        "daemon_peak_rss_mb": daemon_rss_mb,
    }


_PHASE_FUNCTIONS: dict[str, Callable[[Path, dict[str, Any]], dict[str, Any]]] = {
    "simulate": phase_simulate,
    "nightshift": phase_nightshift,
    "baseline_calibrate": phase_baseline_calibrate,
    "baseline_align": phase_baseline_align,
    "siril": lambda work, p: __import__("siril").phase_siril(work, p),
    "nightshift_align": phase_nightshift_align,
    "calibrate_one": phase_calibrate_one,
    "daemon": phase_daemon,
}


# -- running phases in their own processes -------------------------------------------------------------------------
def run_phase(name: str, work: Path) -> dict[str, Any]:
    """Run phase ``name`` in a fresh ``python bench/run.py --phase`` process; its result plus its peak RSS.

    The peak is the child's own (and its children's, for the daemon) from ``wait4``: the rusage of that one
    process, so the phases' peaks stay apart. ``RUSAGE_CHILDREN`` of this process is checked to agree.
    """
    import resource

    result_path = work / f"result-{name}.json"
    result_path.unlink(missing_ok=True)
    argv = [sys.executable, str(Path(__file__).resolve()), "--phase", name, "--work", str(work)]
    say(f"phase {name} ...")
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, stdout=sys.stderr)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or not result_path.exists():
        raise RuntimeError(f"phase {name} failed (exit {proc.returncode}); its traceback is above on stderr")
    result = _read_json(result_path)
    result["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)
    result["process_s"] = round(seconds, 2)
    children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result["children_peak_rss_so_far_mb"] = round(children_peak, 1)
    say(f"phase {name}: {seconds:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB")
    return result


def _child(name: str, work: Path) -> int:
    import warnings

    from astropy.wcs import FITSFixedWarning

    # CCDData.read notes for every raw that it set MJD-OBS from DATE-OBS: a line per file on stderr, no news
    warnings.simplefilter("ignore", FITSFixedWarning)
    params = _read_json(work / "params.json")
    result = _PHASE_FUNCTIONS[name](work, params)
    _write_json(work / f"result-{name}.json", result)
    return 0


# -- the summary ---------------------------------------------------------------------------------------------------
def summarise(params: dict[str, Any], r: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The one JSON object the benchmark prints."""
    sim, ns, bc, ba = r["simulate"], r["nightshift"], r["baseline_calibrate"], r["baseline_align"]
    na, one = r["nightshift_align"], r["calibrate_one"]
    files = sim["files"]
    lights = sim["counts"].get("light", 0)
    stages = {k: {"sum_s": _r(v["sum_s"]), "count": v["count"]} for k, v in ns["stages"].items()}
    cal_only = sum(ns["stages"].get(k, {}).get("sum_s", 0.0) for k in ("ingest", "master", "calibrate"))
    cal_wall = ns["calibrated_at_s"]
    post_cal = ns["total_s"] - cal_wall if cal_wall is not None else None
    ns_align_pipeline = post_cal / lights if post_cal is not None and lights else None
    parts = na["per_frame_parts_s"]
    # align + stack update: what the daemon does per light once grading has found its stars (the star list is
    # grading's, reused: a frame is searched for stars once), against astroalign.register, which searches both
    # images at every call. Both sides include reading the frame.
    ns_update = sum(parts[k] for k in ("read_s", "transform_s", "warp_s", "add_s", "write_s"))
    baseline_total = bc["total_s"] + ba["total_s"]
    size_factor = (params["size"] / 2048) ** 2

    out: dict[str, Any] = {
        "size": params["size"],
        "frames": {**sim["counts"], "files": files, "raw_mb": _r(sim["raw_mb"], 1)},
        "params": {
            k: params.get(k)
            for k in (
                "lights",
                "calibrations",
                "dialect",
                "seed",
                "max_offset",
                "max_rotation",
                "trailed",
                "repeats",
                "profile",
            )
        },
        "simulate_s": _r(sim["seconds"], 2),
        "nightshift": {
            "total_s": _r(ns["total_s"], 2),
            "calibration_only_s": _r(cal_only, 2),
            "calibration_wall_s": _r(cal_wall, 2),
            "align_stack_wall_s": _r(post_cal, 2),
            "stages": stages,
            "fps": _r(files / ns["total_s"], 3),
            "calibration_fps": _r(files / cal_only, 3) if cal_only else None,
            "lights_by_status": ns["lights_by_status"],
            "peak_rss_mb": ns["peak_rss_mb"],
            "includes": "ingest (sha256, header classification, archive rows), masters with bad-pixel masks, "
            "calibration + side-by-side preview per light, grading, alignment (aligned FITS written), live "
            "stack rewritten + preview per light, final sigma-clipped combine, SQLite archive",
            "stages_note": "sums of nightshift_stage_duration_seconds; 'stack' contains the nested 'preview' of "
            "each stack write; sha256 hashing in ingest and archive work fall outside every stage. "
            "calibration_only_s = ingest + master + calibrate sums; calibration_wall_s = wall time from the "
            "start to the last light's 'calibrated' event (the batch calibrates every light before grading).",
        },
        "baseline_ccdproc": {
            "total_s": _r(baseline_total, 2),
            "calibration_s": _r(bc["total_s"], 2),
            "stages": {k: _r(bc[k], 2) for k in ("bias_s", "darks_s", "flats_s", "lights_s")},
            "align_stack_s": _r(ba["total_s"], 2),
            "fps": _r(files / baseline_total, 3),
            "calibration_fps": _r(files / bc["total_s"], 3),
            "peak_rss_mb": max(bc["peak_rss_mb"], ba["peak_rss_mb"]),
            "peak_rss_mb_by_phase": {"calibrate": bc["peak_rss_mb"], "align_stack": ba["peak_rss_mb"]},
            "includes": "CCDData.read(unit='adu') of every raw; master bias (average, sigma clip), darks "
            "(subtract_bias, median), flats (subtract_bias, sigma-clipped average with scale=1/median, "
            "normalised), masters written; per light subtract_bias, subtract_dark(scale=True, EXPTIME), "
            "flat_correct, write; then per (object, filter, exposure) astroalign.register(frame, first) and "
            "the average written. Knows each file's kind from the simulator (no classification, no archive).",
        },
        "ratio_end_to_end": _ratio(bc["total_s"], cal_wall),
        "calibrated_agreement": {k: (_r(v, 6) if isinstance(v, float) else v) for k, v in na["agreement"].items()},
        "ratio_calibration_stages": _ratio(bc["total_s"], cal_only),
        "ratio_whole_night": _ratio(baseline_total, ns["total_s"]),
        "ratios_note": "ratio_end_to_end: raw files to calibrated lights on disk, wall clock on both sides "
        "(baseline calibration_s / nightshift calibration_wall_s); ratio_calibration_stages: the same against "
        "nightshift's ingest + master + calibrate stage sums; ratio_whole_night: everything (calibration, "
        "alignment, stacks) on both sides, baseline total_s / nightshift total_s.",
        "calibrate_one_2k_s" if params["size"] == 2048 else "calibrate_one_s": _r(one["calibrate_median_s"]),
        "calibrate_one": {
            "median_s": _r(one["calibrate_median_s"]),
            "min_s": _r(one["calibrate_min_s"]),
            "runs": one["runs"],
            "read_calibrate_write_median_s": {k: _r(v) for k, v in one["read_calibrate_write_median_s"].items()},
            "ccdproc_in_memory_median_s": _r(one["ccdproc_in_memory_median_s"]),
            "peak_rss_mb": one["peak_rss_mb"],
        },
        "align_stack": {
            "nightshift_per_frame_s": _r(ns_update),
            "nightshift_after_calibration_per_frame_s": _r(ns_align_pipeline),
            "nightshift_service_per_frame_s": _r(na["per_frame_s"]),
            "nightshift_service_parts_s": {k: _r(v) for k, v in na["per_frame_parts_s"].items()},
            "astroalign_register_per_frame_s": _r(ba["register_per_frame_s"]),
            "astroalign_plain_per_frame_s": _r(ba["per_frame_s"]),
            "ratio": _ratio(ba["per_frame_s"], ns_update),
            "ratio_with_grading": _ratio(ba["per_frame_s"], na["per_frame_s"]),
            "frames": lights,
            "astroalign_failed": ba["failed"],
            "nightshift_service_failed": na["failed"],
            "peak_rss_mb": {"nightshift_service": na["peak_rss_mb"], "astroalign": ba["peak_rss_mb"]},
            "note": "nightshift_per_frame_s: align + stack update per light as the daemon does it: read + "
            "transform from grading's star list + warp + add + write the aligned frame and the current stack. "
            "ratio = astroalign_plain / that; ratio_with_grading also counts nightshift's star detection, which "
            "grading does anyway. nightshift_after_calibration_per_frame_s: the batch reduce's wall time after "
            "the last light was calibrated "
            "(grading, judging, alignment, aligned FITS, live stack FITS + preview per light, re-alignment when "
            "a better reference arrives, final sigma-clipped combine, archive) / lights. "
            "nightshift_service_per_frame_s: read + stars + transform + warp + add, per light, in isolation. "
            "astroalign_plain_per_frame_s: read + register (detects the stars of both images at each call) + "
            "add, with the average written, / lights; ratio = astroalign_plain / nightshift.",
        },
    }
    med = na["per_frame_median_s"]
    out["registration"] = {
        "whole_night_s": {"nightshift": _r(ns["total_s"], 2), "ccdproc_astroalign": _r(baseline_total, 2)},
        "ratio_whole_night": out["ratio_whole_night"],
        "good_lights_stacked": {
            "nightshift": f"{ns['good_lights_stacked']} of {ns['good_lights']}",
            "ccdproc_astroalign": f"{ba['good_lights_stacked']} of {ba['good_lights']}",
        },
        "per_frame_median_s": {
            "detect": _r(med["detect"]),
            "match": _r(med["match"]),
            "warp_lanczos": _r(med["warp"]),
            "warp_cubic": _r(med["warp_cubic"]),
            "astroalign_register": _r(ba["register_median_s"]),
        },
        "aligned_fwhm_over_calibrated": {k: _r(v) for k, v in na["aligned_fwhm_ratio"].items()},
        "registration_error_corner_px": {k: _r(v) for k, v in na["registration_corner_px"].items()},
        "note": "each light onto the first light of its (object, filter, exposure) on both sides; detection = "
        "grade_frame (sky, stars, shapes), match = find_transform from the two star lists, warp = apply_transform "
        "(mask and saturation flags included); medians per light. FWHM ratio and corner error (against the "
        "simulator's true transforms) over the good lights (not cloudy, not trailed).",
    }
    if "siril" in r and "total_s" in r["siril"]:
        out["versus_siril"] = _versus_siril(r["siril"], ns["total_s"], baseline_total)
    targets = {
        "end_to_end_5x": _ge(out["ratio_end_to_end"], TARGET_END_TO_END),
        "align_stack_2x": _ge(out["align_stack"]["ratio"], TARGET_ALIGN_RATIO),
        "align_stack_per_frame": _le(ns_update, TARGET_ALIGN_PER_2K_FRAME_S * size_factor),
        "calibrate_one": _le(one["calibrate_median_s"], TARGET_CALIBRATE_ONE_2K_S * size_factor),
        "whole_night_5x": _ge(out["ratio_whole_night"], TARGET_WHOLE_NIGHT),
        "every_good_light_stacked": ns["good_lights_stacked"] == ns["good_lights"],
        "detect_per_frame": _le(med["detect"], TARGET_DETECT_2K_S * size_factor),
        "match_per_frame": _le(med["match"], TARGET_MATCH_S),
        "warp_per_frame": _le(med["warp"], TARGET_WARP_2K_S * size_factor),
        "aligned_fwhm_ratio": _le(na["aligned_fwhm_ratio"]["max"], TARGET_FWHM_RATIO),
    }
    if "daemon" in r:
        d = r["daemon"]
        out["daemon_latency_s"] = {
            "p50": _r(d["p50"], 3),
            "p95": _r(d["p95"], 3),
            "max": _r(d["max"], 3),
            "quiet_seconds": d["quiet_seconds"],
            "ingested_p50": _r(d["ingested_p50"], 3),
            "lights": d["lights"],
            "calibrated": d["calibrated"],
            "interval_s": d["interval_s"],
            "masters_built_s": _r(d["masters_built_s"], 2),
            "daemon_peak_rss_mb": _r(d["daemon_peak_rss_mb"], 1),
            "note": "file closed by the writer -> its 'calibrate'/'calibrated' event in the archive; includes "
            "the watcher's quiet_seconds settle time (ingested_p50: closed -> 'ingested' event).",
        }
    out["targets"] = {
        "limits": {
            "end_to_end_ratio_min": TARGET_END_TO_END,
            "align_stack_ratio_min": TARGET_ALIGN_RATIO,
            "align_stack_per_frame_max_s": round(TARGET_ALIGN_PER_2K_FRAME_S * size_factor, 3),
            "calibrate_one_max_s": round(TARGET_CALIBRATE_ONE_2K_S * size_factor, 3),
            "whole_night_ratio_min": TARGET_WHOLE_NIGHT,
            "detect_per_frame_max_s": round(TARGET_DETECT_2K_S * size_factor, 3),
            "match_per_frame_max_s": TARGET_MATCH_S,
            "warp_per_frame_max_s": round(TARGET_WARP_2K_S * size_factor, 3),
            "aligned_fwhm_ratio_max": TARGET_FWHM_RATIO,
            "scaled_from_2k_by_pixels": params["size"] != 2048,
        },
        "met": targets,
    }
    out["peak_rss_mb_by_phase"] = {k: v["peak_rss_mb"] for k, v in r.items()}
    out["host"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0], **params.get("host", {})}
    return out


def _versus_siril(si: dict[str, Any], nightshift_s: float, baseline_s: float) -> dict[str, Any]:
    """Whole night and stack sharpness: nightshift, the plain ccdproc + astroalign way, and Siril."""
    from siril import median_sharpness

    others = si["sharpness_of_others"]
    fwhm = {
        "nightshift": median_sharpness(others["nightshift"]),
        "baseline": median_sharpness(others["baseline"]),
        "siril": median_sharpness(si["stacks"]),
    }

    def by_stack(stacks: dict[str, Any]) -> dict[str, float]:
        """FWHM per stack, keyed alike on every side (``NGC_6939_B_300s``)."""
        out = {}
        for name, value in stacks.items():
            fwhm = (value or {}).get("fwhm_px")
            if fwhm:
                out[name.removesuffix(".fits").replace("__", "_")] = fwhm
        return out

    ours = by_stack(others["nightshift"])
    per_stack_ratio = {}
    for side, stacks in (("baseline", others["baseline"]), ("siril", si["stacks"])):
        theirs = by_stack(stacks)
        ratios = [ours[k] / theirs[k] for k in sorted(set(ours) & set(theirs))]
        per_stack_ratio[side] = {
            "mean": _r(sum(ratios) / len(ratios)) if ratios else None,
            "worst": _r(max(ratios)) if ratios else None,
            "stacks": len(ratios),
        }
    return {
        "siril_version": si["version"],
        "siril_finished": si["finished"],
        "whole_night_s": {
            "nightshift": _r(nightshift_s, 2),
            "baseline": _r(baseline_s, 2),
            "siril": _r(si["total_s"], 2),
        },
        "ratio_whole_night_vs_siril": _ratio(si["total_s"], nightshift_s),
        "stack_fwhm_px_median": fwhm,
        "sharper_than_siril": None
        if None in (fwhm["nightshift"], fwhm["siril"])
        else fwhm["nightshift"] < fwhm["siril"],
        "fwhm_ratio_nightshift_over": per_stack_ratio,
        "stack_fwhm_px": {
            "nightshift": {k: v["fwhm_px"] for k, v in others["nightshift"].items()},
            "baseline": {k: v["fwhm_px"] for k, v in others["baseline"].items()},
            "siril": {k: (v or {}).get("fwhm_px") for k, v in si["stacks"].items()},
        },
        "siril_lights_stacked": f"{si['stacked_frames']} of {si['lights']}",
        "siril_stacks_failed": {name: si["why_failed"].get(name, "") for name in si["scripts_failed"]},
        "note": "Siril 1.0 standard script per stack (bias, dark per exposure, flat per filter, preprocess, "
        "register with global star alignment, stack rej 3 3 -norm=addscale), one siril-cli script for the masters "
        "and one per stack, wall times summed; a stack Siril cannot register is listed in siril_stacks_failed. "
        "Siril keeps every light it can register (no grading), nightshift rejects the cloudy one. "
        "fwhm_ratio_nightshift_over: nightshift's stack FWHM over the other side's, stack by stack (below 1: "
        "nightshift sharper), mean and worst. FWHM: median half-flux diameter of isolated unsaturated stars "
        "with sep, the same yardstick for every "
        "side (bench/siril.py).",
    }


def side_by_side(summary: dict[str, Any]) -> str:
    """The registration figures of one run as a small table (on stderr; the JSON on stdout has them all)."""
    reg = summary.get("registration")
    if not reg:
        return ""
    per = reg["per_frame_median_s"]
    rows = [
        ("whole night (s)", reg["whole_night_s"]["nightshift"], reg["whole_night_s"]["ccdproc_astroalign"]),
        (
            "good lights stacked",
            reg["good_lights_stacked"]["nightshift"],
            reg["good_lights_stacked"]["ccdproc_astroalign"],
        ),
        ("per frame: star detection (s)", per["detect"], "-"),
        ("per frame: matching (s)", per["match"], "-"),
        ("per frame: warp, Lanczos (s)", per["warp_lanczos"], "-"),
        ("per frame: warp, bicubic (s)", per["warp_cubic"], "-"),
        ("per frame: astroalign.register (s)", "-", per["astroalign_register"]),
        (
            "aligned FWHM / calibrated (median, max)",
            tuple(reg["aligned_fwhm_over_calibrated"][k] for k in ("median", "max")),
            "-",
        ),
        (
            "corner error vs truth, px (median, max)",
            tuple(reg["registration_error_corner_px"][k] for k in ("median", "max")),
            "-",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  {'nightshift':>22}  {'ccdproc + astroalign':>22}"]
    lines += [f"{name:{width}}  {a!s:>22}  {b!s:>22}" for name, a, b in rows]
    lines.append(f"{'whole night ratio':{width}}  {str(reg['ratio_whole_night']) + 'x':>22}")
    return "\n".join(lines)


def _ge(x: float | None, limit: float) -> bool | None:
    return None if x is None else bool(x >= limit)


def _le(x: float | None, limit: float) -> bool | None:
    return None if x is None else bool(x <= limit)


def _commit() -> str | None:
    """The repository's commit, with ``+dirty`` when the work tree has changes; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        status = ["git", "status", "--porcelain", "--untracked-files=no"]
        dirty = subprocess.run(status, cwd=REPO, capture_output=True, text=True)
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


# -- command line --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description="nightshift benchmark: batch reduce and daemon against the plain ccdproc + astroalign way. "
        "Prints one JSON summary on stdout; progress on stderr.",
    )
    parser.add_argument("--size", type=int, default=2048, help="frame size in pixels, square (2048, 4096, ...)")
    parser.add_argument("--lights", type=int, default=8, help="lights per object, filter and exposure (2x2 groups)")
    parser.add_argument("--calibrations", type=int, default=5, help="bias frames, and darks/flats per set")
    parser.add_argument(
        "--dialect", default="nina", help="capture program's header words (simulate's --dialect; 'mixed' too)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-offset", type=float, default=25.0, help="lights' pointing offsets, up to this (px)")
    parser.add_argument("--max-rotation", type=float, default=0.8, help="lights' field rotation, up to this (deg)")
    parser.add_argument("--trailed", type=int, default=1, help="lights trailed by a tracking failure")
    parser.add_argument("--repeats", type=int, default=15, help="runs of the one-light calibration (median)")
    parser.add_argument("--daemon", action="store_true", help="also measure the live daemon's latency")
    parser.add_argument("--daemon-lights", type=int, default=16, help="lights written live in --daemon")
    parser.add_argument(
        "--daemon-interval",
        type=float,
        default=None,
        help="seconds between lights in --daemon (default 4 s per 2k frame, scaled by pixels)",
    )
    parser.add_argument("--quiet-seconds", type=float, default=1.0, help="the daemon's [watch] quiet_seconds")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run the nightshift phase under cProfile (slower); stats in <work>/nightshift.prof and .txt",
    )
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary folder, removed after)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    parser.add_argument("--out", type=Path, help="also write the JSON summary to this file")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.phase:
        if args.work is None:
            raise SystemExit("--phase needs --work")
        return _child(args.phase, args.work)
    if args.size < 64 or args.lights < 1 or args.calibrations < 3:
        raise SystemExit("need --size >= 64, --lights >= 1 and --calibrations >= 3")
    interval = args.daemon_interval
    if interval is None:
        interval = max(1.0, 4.0 * (args.size / 2048) ** 2)
    params = {
        "size": args.size,
        "lights": args.lights,
        "calibrations": args.calibrations,
        "dialect": args.dialect,
        "seed": args.seed,
        "max_offset": args.max_offset,
        "max_rotation": args.max_rotation,
        "trailed": args.trailed,
        "repeats": max(1, args.repeats),
        "daemon_lights": max(1, args.daemon_lights),
        "daemon_interval": interval,
        "quiet_seconds": args.quiet_seconds,
        "profile": args.profile,
    }
    temporary = args.work is None
    work = Path(tempfile.mkdtemp(prefix="nightshift-bench-")) if temporary else args.work
    work = work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    params["host"] = {"commit": _commit(), "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    _write_json(work / "params.json", params)
    say(f"work folder {work}; {json.dumps(params)}")
    t0 = time.perf_counter()
    try:
        results = {}
        for name in PHASES:
            if name == "daemon" and not args.daemon:
                continue
            results[name] = run_phase(name, work)
        params["host"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        summary = summarise(params, results)
        summary["bench_s"] = round(time.perf_counter() - t0, 1)
    finally:
        if temporary and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"work folder kept: {work}")
    text = json.dumps(summary, indent=2)
    print(side_by_side(summary), file=sys.stderr, flush=True)
    print(text, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
