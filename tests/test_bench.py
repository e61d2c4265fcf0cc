"""Smoke test of the benchmark: it runs end to end at a tiny size and its JSON has every figure, sane.

Timings are not checked here (machines are noisy); the benchmark itself reports them against the targets.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "bench" / "run.py"

STAGES = ("ingest", "master", "calibrate", "grade", "align", "stack", "preview")
PHASES = (
    "simulate",
    "nightshift",
    "baseline_calibrate",
    "baseline_align",
    "siril",
    "nightshift_align",
    "calibrate_one",
)


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, Path]:
    """One tiny run with the daemon phase: (printed JSON, --out JSON, work folder)."""
    tmp = tmp_path_factory.mktemp("bench")
    work, out = tmp / "work", tmp / "summary.json"
    argv = [
        sys.executable,
        str(RUN),
        "--size",
        "256",
        "--lights",
        "2",
        "--calibrations",
        "3",
        "--repeats",
        "3",
        "--max-offset",  # a mild night: Siril must register sparse 256 px frames too (the 2k bench night is harder)
        "4",
        "--max-rotation",
        "0.3",
        "--trailed",
        "0",
        "--daemon",
        "--daemon-lights",
        "4",
        "--daemon-interval",
        "0.5",
        "--quiet-seconds",
        "0.5",
        "--work",
        str(work),
        "--out",
        str(out),
    ]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    printed = json.loads(proc.stdout)  # stdout is the JSON summary and nothing else
    return printed, json.loads(out.read_text()), work


def test_prints_one_json_summary_and_saves_it(bench: tuple[dict, dict, Path]) -> None:
    printed, saved, _ = bench
    assert printed == saved
    for key in (
        "size",
        "frames",
        "nightshift",
        "baseline_ccdproc",
        "ratio_end_to_end",
        "ratio_calibration_stages",
        "ratio_whole_night",
        "calibrate_one",
        "align_stack",
        "daemon_latency_s",
        "targets",
        "peak_rss_mb_by_phase",
    ):
        assert key in printed, key
    assert printed["size"] == 256
    assert "calibrate_one_s" in printed  # named calibrate_one_2k_s only for a 2k night


def test_frame_counts_match_the_night(bench: tuple[dict, dict, Path]) -> None:
    frames = bench[0]["frames"]
    # 3 bias, 3 darks x 2 exposures, 3 flats x 2 filters, 2 lights x 2 filters x 2 exposures
    assert (frames["bias"], frames["dark"], frames["flat"], frames["light"]) == (3, 6, 6, 8)
    assert frames["files"] == 23


def test_nightshift_figures_are_sane(bench: tuple[dict, dict, Path]) -> None:
    ns = bench[0]["nightshift"]
    assert set(ns["stages"]) == set(STAGES)
    assert ns["stages"]["ingest"]["count"] == 23
    assert ns["stages"]["master"]["count"] == 5  # bias, 2 darks, 2 flats
    assert ns["stages"]["calibrate"]["count"] == 8
    for v in ns["stages"].values():
        assert _positive(v["sum_s"])
    for key in ("total_s", "calibration_only_s", "calibration_wall_s", "fps", "peak_rss_mb"):
        assert _positive(ns[key]), key
    # with worker threads, stage sums may exceed the wall time they overlap in
    assert ns["calibration_wall_s"] <= ns["total_s"]
    assert ns["calibration_only_s"] <= 2 * ns["calibration_wall_s"] * (os.cpu_count() or 1)
    assert sum(ns["lights_by_status"].values()) == 8
    assert ns["lights_by_status"].get("stacked", 0) >= 6  # one cloudy frame may be rejected


def test_baseline_and_ratios_are_consistent(bench: tuple[dict, dict, Path]) -> None:
    s = bench[0]
    base, ns = s["baseline_ccdproc"], s["nightshift"]
    for key in ("total_s", "calibration_s", "align_stack_s", "fps", "peak_rss_mb"):
        assert _positive(base[key]), key
    assert set(base["stages"]) == {"bias_s", "darks_s", "flats_s", "lights_s"}
    assert s["ratio_end_to_end"] == pytest.approx(base["calibration_s"] / ns["calibration_wall_s"], rel=0.05)
    assert s["ratio_calibration_stages"] == pytest.approx(base["calibration_s"] / ns["calibration_only_s"], rel=0.05)
    assert s["ratio_whole_night"] == pytest.approx(base["total_s"] / ns["total_s"], rel=0.05)
    # both sides did the same science: their calibrated lights agree
    agreement = s["calibrated_agreement"]
    assert agreement["lights_compared"] >= 1
    assert agreement["max_relative_diff"] < 1e-3
    assert set(s["targets"]["met"]) == {
        "end_to_end_5x",
        "align_stack_2x",
        "align_stack_per_frame",
        "calibrate_one",
        "whole_night_5x",
        "every_good_light_stacked",
        "detect_per_frame",
        "match_per_frame",
        "warp_per_frame",
        "aligned_fwhm_ratio",
    }


def test_registration_figures(bench: tuple[dict, dict, Path]) -> None:
    """The issue-9 table: whole night, good lights stacked on both sides, per-frame parts, sharpness, accuracy."""
    reg = bench[0]["registration"]
    assert reg["good_lights_stacked"]["nightshift"] == "7 of 7"  # 8 lights, one cloudy
    for key in ("detect", "match", "warp_lanczos", "warp_cubic", "astroalign_register"):
        assert _positive(reg["per_frame_median_s"][key]), key
    fwhm = reg["aligned_fwhm_over_calibrated"]
    assert 0.95 < fwhm["median"] < 1.05 and fwhm["median"] <= fwhm["max"] < 1.2  # few stars per 256 px frame
    assert reg["registration_error_corner_px"]["max"] < 0.2
    assert bench[0]["targets"]["met"]["every_good_light_stacked"] is True


def test_align_stack_and_one_light(bench: tuple[dict, dict, Path]) -> None:
    s = bench[0]
    a = s["align_stack"]
    for key in (
        "nightshift_per_frame_s",
        "nightshift_service_per_frame_s",
        "astroalign_register_per_frame_s",
        "astroalign_plain_per_frame_s",
        "ratio",
    ):
        assert _positive(a[key]), key
    assert a["frames"] == 8
    assert a["ratio"] == pytest.approx(a["astroalign_plain_per_frame_s"] / a["nightshift_per_frame_s"], rel=0.05)
    one = s["calibrate_one"]
    assert one["runs"] == 3
    assert _positive(one["median_s"]) and one["min_s"] <= one["median_s"]
    parts = one["read_calibrate_write_median_s"]
    assert _positive(parts["total_s"]) and parts["total_s"] >= parts["calibrate_s"]


def test_siril_ran_on_the_same_night_and_every_side_is_measured(bench: tuple[dict, dict, Path]) -> None:
    v = bench[0]["versus_siril"]
    assert v["siril_version"].startswith("siril ")
    assert v["siril_finished"], "siril-cli did not finish its script"
    for side in ("nightshift", "baseline", "siril"):
        assert _positive(v["whole_night_s"][side]), side
        assert len(v["stack_fwhm_px"][side]) == 4, side  # 2 filters x 2 exposures
    assert v["ratio_whole_night_vs_siril"] == pytest.approx(
        v["whole_night_s"]["siril"] / v["whole_night_s"]["nightshift"], rel=0.05
    )
    for side in ("baseline", "siril"):
        ratio = v["fwhm_ratio_nightshift_over"][side]
        assert ratio["stacks"] >= 1 and 0.5 < ratio["mean"] <= ratio["worst"] < 2.0, (side, ratio)
    # stars of a 3 px seeing night: any side's stack far outside this range was measured wrong
    for side, fwhm in v["stack_fwhm_px_median"].items():
        assert fwhm is not None and 2.0 < fwhm < 6.0, (side, fwhm)


def test_daemon_latency(bench: tuple[dict, dict, Path]) -> None:
    d = bench[0]["daemon_latency_s"]
    assert d["lights"] == 4 and d["calibrated"] == 4
    assert d["quiet_seconds"] == 0.5
    # a light cannot be calibrated before it has settled for quiet_seconds
    assert d["quiet_seconds"] <= d["p50"] <= d["p95"] <= d["max"]
    assert d["daemon_peak_rss_mb"] > 0


def test_each_phase_ran_in_its_own_process_with_a_peak(bench: tuple[dict, dict, Path]) -> None:
    s, _, work = bench
    assert set(s["peak_rss_mb_by_phase"]) == {*PHASES, "daemon"}
    assert all(_positive(v) for v in s["peak_rss_mb_by_phase"].values())
    for name in (*PHASES, "daemon"):
        assert (work / f"result-{name}.json").exists()
    # the products both sides made
    assert len(list((work / "baseline" / "calibrated").glob("*.fits"))) == 8
    assert len(list((work / "baseline" / "stacks").glob("*.fits"))) == 4
    assert (work / "archive-reduce" / "nightshift.db").exists()


def test_bad_arguments_are_refused() -> None:
    proc = subprocess.run(
        [sys.executable, str(RUN), "--size", "32"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert proc.stdout == ""
