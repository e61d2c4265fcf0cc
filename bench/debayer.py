"""Which demosaicing method: every method of ``service.debayer.METHODS`` against the simulator's colour truth.

For each method, on a simulated colour light (noise-free, so only the interpolation is judged, and with noise):

- ``star_flux_err_pct``: median |error| of the stars' aperture flux per channel, against the truth's;
- ``star_colour_err_pct``: median and 95th percentile |error| of the stars' R/G and B/G flux ratios;
- ``rms_err_star_pct``: RMS pixel error over star pixels, in % of the stars' peak;
- ``nyquist_ratio``: the largest spike at a Nyquist frequency (checker, row or column stripes) in each debayered
  channel of a noisy sky: its power over the median power around it (about 1 for noise, >> 1 for a pattern);
- ``seconds_4k``: median seconds to debayer one 4144 x 2822 frame (3 runs).

Usage: ``python bench/debayer.py [--size 1024] [--methods bilinear,opencv,...] [--no-4k]``. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _apertures(rgb: np.ndarray, xy: np.ndarray, radius: float) -> np.ndarray:
    import sep

    out = []
    for c in range(3):
        plane = np.ascontiguousarray(rgb[c], dtype=np.float32)
        flux, _, _ = sep.sum_circle(plane, xy[:, 0], xy[:, 1], radius, subpix=5)
        out.append(flux)
    return np.stack(out, axis=1)


def _nyquist_ratio(plane: np.ndarray, half: int = 8) -> float:
    """The largest spike at a Nyquist frequency (checker, row or column stripes): the power there over the median
    power of the frequencies around it (about 1 for noise, much more for a pattern)."""
    p = np.fft.fftshift(np.abs(np.fft.fft2(plane - plane.mean())) ** 2)
    h, w = p.shape
    cy, cx = h // 2, w // 2
    worst = 0.0
    for y, x in ((0, 0), (0, cx), (cy, 0)):  # after the shift, Nyquist sits at index 0 of each axis
        ys = np.arange(y - half, y + half + 1) % h
        xs = np.arange(x - half, x + half + 1) % w
        window = p[np.ix_(ys, xs)].copy()
        window[half, half] = np.nan
        worst = max(worst, float(p[y, x] / np.nanmedian(window)))
    return worst


def measure(size: int, methods: list[str], do_4k: bool) -> dict:
    from nightshift.service.debayer import debayer
    from nightshift.service.simulate import SimConfig, plan_night

    plan = plan_night(
        SimConfig(size=size, bayer="RGGB", filters=(None,), n_light=1, light_exptimes=(300.0,), dialect="nina")
    )
    frame = plan.by_kind("light")[0]
    truth = plan.calibrated_rgb(frame)
    cmap = plan.colour_map()
    mosaic = np.take_along_axis(truth, cmap[None].astype(np.intp), axis=0)[0]
    pattern = plan.stored_pattern()
    pos = plan.star_positions(frame)
    flux_g = plan.star_fluxes(frame) * plan.channel_qe()[1]
    radius = 2.0 * frame.fwhm
    inside = (pos[:, 0] > 10) & (pos[:, 0] < size - 10) & (pos[:, 1] > 10) & (pos[:, 1] < size - 10)
    good = inside & (flux_g > 2000) & (flux_g < 4e5)
    # isolated stars only: no brighter neighbour within 4 apertures
    xy = pos[good]
    ref = _apertures(truth, xy, radius)
    stars_px = truth[1] > frame.level * 1.5
    peak = float(np.percentile(truth[1][stars_px], 99)) if stars_px.any() else 1.0

    rng = np.random.default_rng(1)
    sky = np.full((size, size), 300.0, dtype=np.float32) + rng.normal(0, 12.0, (size, size)).astype(np.float32)

    results: dict = {"size": size, "stars": int(good.sum()), "pattern": pattern}
    big = None
    if do_4k:
        big = np.random.default_rng(2).normal(500.0, 30.0, (2822, 4144)).astype(np.float32)
    for name in methods:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rgb = debayer(mosaic, pattern, method=name)
        got = _apertures(rgb, xy, radius)
        flux_err = np.abs(got / ref - 1.0) * 100
        colour_got = np.stack([got[:, 0] / got[:, 1], got[:, 2] / got[:, 1]], axis=1)
        colour_ref = np.stack([ref[:, 0] / ref[:, 1], ref[:, 2] / ref[:, 1]], axis=1)
        colour_err = np.abs(colour_got / colour_ref - 1.0) * 100
        rms = float(np.sqrt(np.mean((rgb[:, stars_px] - truth[:, stars_px]) ** 2))) / peak * 100
        noisy = debayer(sky, pattern, method=name)
        entry = {
            "star_flux_err_pct": [round(float(np.median(flux_err[:, c])), 3) for c in range(3)],
            "star_colour_err_pct": {
                "median": round(float(np.median(colour_err)), 3),
                "p95": round(float(np.percentile(colour_err, 95)), 3),
            },
            "rms_err_star_pct": round(rms, 3),
            "nyquist_ratio": [round(_nyquist_ratio(noisy[c]), 2) for c in range(3)],
            "noise_ratio": [round(float(np.std(noisy[c]) / np.std(sky)), 3) for c in range(3)],
        }
        if big is not None:
            times = []
            for _ in range(3):
                t = time.perf_counter()
                debayer(big, pattern, method=name)
                times.append(time.perf_counter() - t)
            entry["seconds_4k"] = round(statistics.median(times), 3)
        results[name] = entry
        print(f"{name}: {entry}", file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    from nightshift.service.debayer import METHODS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--no-4k", action="store_true", help="skip the 4k timing")
    args = ap.parse_args(argv)
    print(json.dumps(measure(args.size, args.methods.split(","), not args.no_4k), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
