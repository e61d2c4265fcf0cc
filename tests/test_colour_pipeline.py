"""Colour cameras in the daemon: masters chosen by colour layout, calibration sets kept apart, colour lights
calibrated on their mosaic and debayered, on real archive files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from astropy.io import fits
from nightshift.daemon.archive import Archive
from nightshift.daemon.calsets import set_key
from nightshift.daemon.choose import choose_for_light, find_master
from nightshift.daemon.config import CalibrationConfig

pytestmark = pytest.mark.filterwarnings("ignore::astropy.wcs.FITSFixedWarning")

NIGHT = "2026-11-25"


def master_row(archive: Archive, kind: str, **layout: Any) -> int:
    row = {
        "kind": kind,
        "path": f"masters/{kind}-{len(archive.query('SELECT id FROM masters'))}.fits",
        "sha256": "0" * 64,
        "n_frames": 5,
        "set_key": f"{kind}|{layout}",
        "version": 1,
        "night": NIGHT,
        "date_obs": f"{NIGHT}T19:00:00.000000",
        "camera": "ZWO ASI2600MC Pro",
        "xbin": 1,
        "ybin": 1,
        "naxis1": 512,
        "naxis2": 512,
        "filter": None,
        "exptime": 300.0 if kind == "dark" else (2.0 if kind == "flat" else 0.0),
        "bias_subtracted": int(kind != "bias"),
        "method": "test",
        "created_at": f"{NIGHT}T19:00:00.000",
        **layout,
    }
    return archive.put("masters", row)


def light_row(**layout: Any) -> dict[str, Any]:
    return {
        "kind": "light",
        "night": NIGHT,
        "date_obs": f"{NIGHT}T21:00:00.000000",
        "camera": "ZWO ASI2600MC Pro",
        "xbin": 1,
        "ybin": 1,
        "naxis1": 512,
        "naxis2": 512,
        "filter": None,
        "exptime": 300.0,
        "naxis3": None,
        "roworder": None,
        "cfa": None,
        **layout,
    }


@pytest.fixture
def archive(tmp_path: Path) -> Archive:
    archive = Archive(tmp_path / "archive")
    yield archive
    archive.close()


def test_a_colour_light_never_takes_a_mono_flat_nor_another_layout(archive: Archive) -> None:
    """Whatever the match keys say (none of them is about colour), each light gets the flat of its own layout,
    and a light with none waits, saying which layout it needs."""
    rules = CalibrationConfig()
    mono = master_row(archive, "flat")
    rggb_td = master_row(archive, "flat", cfa="RGGB", roworder="TOP-DOWN", bayerpat="RGGB")
    gbrg_bu = master_row(archive, "flat", cfa="GBRG", roworder="BOTTOM-UP", bayerpat="RGGB")
    cube = master_row(archive, "flat", naxis3=3, roworder="TOP-DOWN")
    for kind in ("bias", "dark"):
        master_row(archive, kind)
        master_row(archive, kind, cfa="RGGB", roworder="TOP-DOWN")
        master_row(archive, kind, naxis3=3, roworder="TOP-DOWN")
    cases = [
        (light_row(), mono),
        (light_row(cfa="RGGB", roworder="TOP-DOWN", bayerpat="RGGB"), rggb_td),
        (light_row(cfa="GBRG", roworder="BOTTOM-UP", bayerpat="RGGB"), gbrg_bu),
        (light_row(cfa="GBRG", roworder=None, bayerpat="RGGB"), gbrg_bu),  # no ROWORDER: bottom-up
        (light_row(naxis3=3, roworder="TOP-DOWN"), cube),
    ]
    for light, flat_id in cases:
        choice = choose_for_light(archive, rules, light)
        assert choice.flat is not None and choice.flat["id"] == flat_id, light
        assert choice.dark["naxis3"] == light["naxis3"] and choice.bias["naxis3"] == light["naxis3"]
    lonely = light_row(cfa="GRBG", roworder="TOP-DOWN", bayerpat="GRBG")
    choice = choose_for_light(archive, rules, lonely)
    assert choice.flat is None
    assert "Bayer GRBG at the first pixel, rows top-down" in choice.reason_missing
    flipped = light_row(cfa="RGGB", roworder="BOTTOM-UP", bayerpat="GBRG")
    assert find_master(archive, rules, "flat", flipped) is None
    # a mono light with the colour camera's name still takes only the mono flat
    archive.execute("DELETE FROM masters WHERE id = ?", [mono])
    assert find_master(archive, rules, "flat", light_row()) is None


def test_calibration_sets_of_other_layouts_are_kept_apart() -> None:
    keys = CalibrationConfig().match_keys
    base = {"kind": "flat", "night": NIGHT, "camera": "Cam", "xbin": 1, "ybin": 1, "exptime": 2.0, "filter": None}
    mono = set_key(dict(base), keys)
    colour = set_key({**base, "cfa": "RGGB", "roworder": "TOP-DOWN"}, keys)
    other = set_key({**base, "cfa": "GBRG", "roworder": "BOTTOM-UP"}, keys)
    cube = set_key({**base, "naxis3": 3, "roworder": "TOP-DOWN"}, keys)
    assert len({mono[0], colour[0], other[0], cube[0]}) == 4
    assert len({mono[1], colour[1], other[1], cube[1]}) == 4  # the master files' names differ too


def _nightshift(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nightshift.daemon.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_simulate_writes_a_colour_night_from_the_command_line(tmp_path: Path) -> None:
    camera = tmp_path / "camera"
    result = _nightshift(
        "simulate",
        str(camera),
        "--size",
        "64",
        "--lights",
        "1",
        "--calibrations",
        "1",
        "--dialect",
        "nina",
        "--bayer",
        "GRBG",
        "--row-order",
        "BOTTOM-UP",
    )
    assert result.returncode == 0, result.stderr
    files = sorted(camera.rglob("*.fits"))
    assert files
    for path in files:
        header = fits.getheader(path)
        assert (header["BAYERPAT"], header["ROWORDER"], header["NAXIS"]) == ("GRBG", "BOTTOM-UP", 2)
        assert "FILTER" not in header
    result = _nightshift(
        "simulate",
        str(tmp_path / "cubes"),
        "--size",
        "64",
        "--lights",
        "1",
        "--calibrations",
        "1",
        "--bayer",
        "RGGB",
        "--debayered",
    )
    assert result.returncode == 0, result.stderr
    assert all(fits.getheader(p)["NAXIS3"] == 3 for p in (tmp_path / "cubes").rglob("*.fit*"))
    refused = _nightshift("simulate", str(tmp_path / "x"), "--debayered")
    assert refused.returncode == 2 and "--bayer" in refused.stderr
