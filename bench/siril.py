"""Siril, the open-source tool users would otherwise pick, on the benchmark's night; and one yardstick of stack
sharpness for every side.

``phase_siril`` lays the simulated night out the way Siril's standard scripts expect (one folder per set: biases,
darks per exposure, flats per filter, lights per object, filter and exposure), writes one Siril script that does
what its own "standard preprocessing" script does for each stack (master bias, master dark per exposure, flats
calibrated with the bias and combined with multiplicative normalisation, lights calibrated with dark and flat,
global star alignment, rejection stacking) and runs it with ``siril-cli -s``, timed as a whole.

``stack_sharpness`` measures a stack's stars the same way whoever made it: the median half-flux diameter (the
FWHM of a Gaussian star) of isolated, unsaturated stars with a good signal, with sep, independently of nightshift's
own star measurement. Smaller is sharper.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

__all__ = ["median_sharpness", "phase_siril", "stack_sharpness"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "x"


def stack_sharpness(path: Path) -> dict[str, Any]:
    """Median FWHM (pixels) and count of the isolated, unsaturated, bright stars of a stack (any FITS image; a
    colour cube is measured on its mean plane)."""
    import numpy as np
    import sep
    from astropy.io import fits
    from scipy.spatial import cKDTree

    data = fits.getdata(path).astype(np.float32)
    if data.ndim == 3:
        data = data.mean(axis=0)
    data = np.ascontiguousarray(data)
    bad = ~np.isfinite(data)
    data[bad] = np.nanmedian(data)
    bkg = sep.Background(data, mask=bad, bw=64, bh=64)
    work = data - bkg.back()
    rms = float(bkg.globalrms)
    objects = sep.extract(work, 10.0, err=rms, mask=bad, minarea=5, deblend_cont=0.005)
    if len(objects) < 3:
        return {"fwhm_px": None, "stars": 0}
    top = float(np.percentile(work[~bad], 99.999))
    xy = np.column_stack([objects["x"], objects["y"]])
    dist, _ = cKDTree(xy).query(xy, k=2)
    h, w = data.shape
    keep = (
        (objects["flag"] == 0)
        & (objects["peak"] < 0.5 * top)  # well below the stack's brightest (saturated) values
        & (dist[:, 1] > 15.0)
        & (objects["x"] > 20)
        & (objects["y"] > 20)
        & (objects["x"] < w - 21)
        & (objects["y"] < h - 21)
        & (objects["flux"] > 50.0 * rms)
    )
    obj = objects[keep]
    if len(obj) < 3:
        return {"fwhm_px": None, "stars": len(obj)}
    r50, flag = sep.flux_radius(work, obj["x"], obj["y"], 6.0 * obj["a"], 0.5, subpix=5)
    good = (flag == 0) & np.isfinite(r50)
    return {"fwhm_px": round(float(2.0 * np.median(r50[good])), 4), "stars": int(good.sum())}


def _siril_scripts(groups: dict[str, list[str]]) -> dict[str, str]:
    """Siril 1.0 scripts: one building the masters, then one per stack (a group Siril cannot register stops only
    its own script, as a user running Siril per target would see)."""
    head = ["requires 0.99.4", "setext fits", "set32bits"]
    masters = [*head, "cd biases", "convert bias -out=../process", "cd ../process", "stack bias rej 3 3 -nonorm"]
    for folder in groups["darks"]:
        tag = folder.removeprefix("darks_")
        masters += [
            f"cd ../{folder}",
            f"convert dark_{tag} -out=../process",
            "cd ../process",
            f"stack dark_{tag} rej 3 3 -nonorm -out=master_dark_{tag}",
        ]
    for folder in groups["flats"]:
        tag = folder.removeprefix("flats_")
        masters += [
            f"cd ../{folder}",
            f"convert flat_{tag} -out=../process",
            "cd ../process",
            f"preprocess flat_{tag} -bias=bias_stacked",
            f"stack pp_flat_{tag} rej 3 3 -norm=mul -out=master_flat_{tag}",
        ]
    scripts = {"masters": "\n".join(masters) + "\n"}
    for folder in groups["lights"]:
        tag = folder.removeprefix("lights_")
        filt, exp = _light_keys(folder)
        lines = [
            *head,
            f"cd {folder}",
            f"convert light_{tag} -out=../process",
            "cd ../process",
            f"preprocess light_{tag} -dark=master_dark_{exp} -flat=master_flat_{filt}",
            f"register pp_light_{tag}",
            f"stack r_pp_light_{tag} rej 3 3 -norm=addscale -output_norm -out=../stack_{tag}",
        ]
        scripts[tag] = "\n".join(lines) + "\n"
    return scripts


def _light_keys(folder: str) -> tuple[str, str]:
    """(filter, exposure) of a lights folder ``lights_<object>__<filter>__<exposure>``."""
    rest, exp = folder.rsplit("__", 1)
    return rest.split("__")[-1], exp


def phase_siril(work: Path, p: dict[str, Any]) -> dict[str, Any]:
    """The whole night through ``siril-cli -s``: masters, calibration, registration and stacking per group."""
    import json

    siril = shutil.which("siril-cli")
    if siril is None:
        return {"skipped": "siril-cli is not installed (Debian package siril)"}
    manifest = json.loads((work / "manifest.json").read_text())
    sound = [m for m in manifest if m["kind"] in ("bias", "dark", "flat", "light") and Path(m["path"]).exists()]
    root = work / "siril"
    shutil.rmtree(root, ignore_errors=True)
    (root / "process").mkdir(parents=True)
    groups: dict[str, list[str]] = {"darks": [], "flats": [], "lights": []}
    members: dict[str, int] = {}
    for m in sound:
        if m["kind"] == "bias":
            folder = "biases"
        elif m["kind"] == "dark":
            folder = f"darks_{m['exptime']:g}s"
            groups["darks"].append(folder)
        elif m["kind"] == "flat":
            folder = f"flats_{_slug(m['filter'])}"
            groups["flats"].append(folder)
        else:
            if "/" in (m["filter"] or "") or ".." in (m["object"] or ""):
                continue  # the simulator's hostile file: no flat for its filter
            folder = f"lights_{_slug(m['object'])}__{_slug(m['filter'])}__{m['exptime']:g}s"
            groups["lights"].append(folder)
        (root / folder).mkdir(exist_ok=True)
        link = root / folder / Path(m["path"]).name
        if not link.exists():
            link.symlink_to(m["path"])
        members[folder] = members.get(folder, 0) + 1
    groups = {k: sorted(set(v)) for k, v in groups.items()}
    # lights of a filter with no flat or an exposure with no dark: Siril's script would stop; leave them out
    exps = {f.removeprefix("darks_") for f in groups["darks"]}
    filts = {f.removeprefix("flats_") for f in groups["flats"]}
    groups["lights"] = [f for f in groups["lights"] if _light_keys(f)[1] in exps and _light_keys(f)[0] in filts]

    seconds = 0.0
    logs: dict[str, str] = {}
    stacks: dict[str, dict[str, Any] | None] = {}
    stacked = 0
    for name, script in _siril_scripts(groups).items():
        (root / f"{name}.ssf").write_text(script)
        t0 = time.perf_counter()
        proc = subprocess.run(
            [siril, "-d", str(root), "-s", str(root / f"{name}.ssf")], capture_output=True, text=True, errors="replace"
        )
        seconds += time.perf_counter() - t0
        logs[name] = proc.stdout + proc.stderr
        (root / f"{name}.log").write_text(logs[name])
        if name == "masters":
            if "Script execution finished successfully" not in proc.stdout:
                break
            continue
        found = re.findall(r"(\d+) images have been stacked", proc.stdout)
        stacked += int(found[-1]) if found else 0
        path = root / f"stack_{name}.fits"
        stacks[name] = {"frames": members.get(f"lights_{name}", 0), **stack_sharpness(path)} if path.exists() else None
    failed = [name for name, log in logs.items() if "Script execution finished successfully" not in log]
    others = {
        "nightshift": {
            q.name: stack_sharpness(q) for q in sorted((work / "archive-reduce" / "stacks").rglob("*.fits"))
        },
        "baseline": {q.name: stack_sharpness(q) for q in sorted((work / "baseline" / "stacks").glob("*.fits"))},
    }
    return {
        "total_s": seconds,
        "version": subprocess.run([siril, "--version"], capture_output=True, text=True).stdout.strip(),
        "finished": "masters" in logs and "masters" not in failed,
        "scripts_failed": failed,
        "lights": sum(members.get(f, 0) for f in groups["lights"]),
        "stacked_frames": stacked,
        "stacks": stacks,
        "why_failed": {name: _why(logs[name]) for name in failed},
        "sharpness_of_others": others,
    }


def _why(log: str) -> str:
    """The last lines of a Siril log that say what went wrong."""
    lines = [ln for ln in log.splitlines() if re.search(r"(?i)fail|error|not enough|skipped", ln)]
    return " | ".join(lines[-4:])[-600:]


def median_sharpness(stacks: dict[str, dict[str, Any] | None]) -> float | None:
    """The median FWHM over a side's stacks (None without any measured)."""
    values = [s["fwhm_px"] for s in stacks.values() if s and s.get("fwhm_px")]
    if not values:
        return None
    values.sort()
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])
