"""Smoke test of the colour benchmarks: they run end to end at a tiny size and their JSON has every figure, sane.

Timings are not checked here (machines are noisy); the benchmarks report them against the targets.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_colour_bench_runs_both_sides(tmp_path: Path) -> None:
    argv = [sys.executable, str(REPO / "bench" / "colour.py"), "--width", "320", "--height", "256", "--lights", "3"]
    out = subprocess.run([*argv, "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["frame"] == [320, 256]
    steps = ("read", "calibrate", "debayer", "grade", "align", "stack", "per_frame", "with_writes")
    assert all(_positive(result["nightshift"]["per_frame_s"][k]) for k in steps)
    assert all(_positive(result["plain"]["per_frame_s"][k]) for k in ("calibrate", "debayer", "align", "per_frame"))
    assert result["nightshift"]["frames"] == result["plain"]["frames"] == 2
    assert _positive(result["ratio"]) and set(result["targets"]) >= {"per_frame_met", "ratio_met"}
    assert "per_frame" in out.stderr  # the table


def test_debayer_bench_measures_every_method(tmp_path: Path) -> None:
    argv = [sys.executable, str(REPO / "bench" / "debayer.py"), "--size", "256", "--no-4k", "--methods"]
    out = subprocess.run([*argv, "bilinear,opencv"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    for method in ("bilinear", "opencv"):
        entry = result[method]
        assert len(entry["star_flux_err_pct"]) == 3 and len(entry["nyquist_ratio"]) == 3
    assert result["bilinear"]["star_colour_err_pct"]["p95"] < 1.0  # the chosen method keeps colours
