"""Shared fixtures: simulated nights written by the project's own simulator, archives reduced by the real
pipeline, and a real ``nightshift`` process to start and kill."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nightshift.daemon.archive import Archive
from nightshift.daemon.batch import reduce_folders
from nightshift.daemon.config import Config, config_from_dict
from nightshift.daemon.pipeline import Pipeline
from nightshift.service.simulate import COLOUR_CAMERA, NightPlan, SimConfig, simulate_night

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str) -> str:
    """The path of a system tool the test needs: in CI a missing tool fails, elsewhere it skips."""
    path = shutil.which(name)
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is not installed (CI installs it with .ci/install-system-deps)")
        pytest.skip(f"{name} is not installed")
    return path


def make_config(camera: Path, archive_dir: Path, **sections: dict[str, Any]) -> Config:
    raw: dict[str, Any] = {"watch": {"paths": [str(camera)]}, "archive": {"path": str(archive_dir), "min_free_mb": 10}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_from_dict(raw, source="test")


def write_config_file(path: Path, camera: Path, archive_dir: Path, **sections: dict[str, Any]) -> Path:
    """A TOML file for a real ``nightshift`` process (fast settle times for tests)."""
    base: dict[str, dict[str, Any]] = {
        "watch": {
            "paths": [str(camera)],
            "quiet_seconds": 0.3,
            "incomplete_timeout_seconds": 4.0,
            "rescan_interval_seconds": 5.0,
        },
        "archive": {"path": str(archive_dir), "min_free_mb": 10},
        "calibration": {"set_quiet_seconds": 2.0},
        "metrics": {"listen": "off"},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        for k, v in values.items():
            if isinstance(v, str):
                lines.append(f'{k} = "{v}"')
            elif isinstance(v, bool):
                lines.append(f"{k} = {'true' if v else 'false'}")
            elif isinstance(v, list):
                lines.append(f"{k} = [" + ", ".join(f'"{x}"' for x in v) + "]")
            else:
                lines.append(f"{k} = {v}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def reduce_night(camera: Path, archive_dir: Path, *, workers: int = 1, **sections: dict[str, Any]) -> Archive:
    cfg = make_config(camera, archive_dir, **sections)
    archive = Archive(archive_dir)
    pipeline = Pipeline(cfg, archive, workers=workers)
    try:
        reduce_folders(pipeline, [camera], show_progress=False)
    finally:
        pipeline.close()
    return archive


@pytest.fixture(scope="session")
def night(tmp_path_factory: pytest.TempPathFactory) -> tuple[NightPlan, Path]:
    """A small natural-order night with every broken kind, written once for the session."""
    camera = tmp_path_factory.mktemp("night") / "camera"
    plan = simulate_night(camera, SimConfig(size=384, n_light=4, broken=True))
    return plan, camera


@pytest.fixture(scope="session")
def reduced(night: tuple[NightPlan, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    """That night reduced once by ``reduce_folders`` with two workers (what ``nightshift reduce`` runs)."""
    _plan, camera = night
    archive = reduce_night(camera, tmp_path_factory.mktemp("reduced") / "archive", workers=2)
    yield archive
    archive.close()


def paths_of(night: tuple[NightPlan, Path], kind: str, **match: Any) -> list[Path]:
    """Files of a simulated night (plan, folder) of one kind whose SimFrame fields equal ``match``."""
    plan, folder = night
    return [folder / f.name for f in plan.by_kind(kind) if all(getattr(f, k) == v for k, v in match.items())]


class Proc:
    """A real ``nightshift`` process with its stderr captured to a file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - kept open for the life of the process
        self.p = subprocess.Popen(
            [sys.executable, "-m", "nightshift.daemon.cli", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.p.poll() is not None:
                raise AssertionError(f"nightshift exited ({self.p.returncode}) before {text!r}:\n{self.log()}")
            time.sleep(0.1)
        raise AssertionError(f"no {text!r} in the log within {timeout} s:\n{self.log()[-4000:]}")

    def signal(self, sig: int) -> None:
        self.p.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        self.p.kill()
        self.p.wait(10)
        self._log.close()


@pytest.fixture
def start_nightshift(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    procs: list[Proc] = []
    counter = iter(range(1000))

    def start(*args: str, env: dict[str, str] | None = None) -> Proc:
        proc = Proc(list(args), tmp_path / f"nightshift-{next(counter)}.log", env=env)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.p.poll() is None:
            proc.kill()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def calibrated_light(plan: NightPlan, frame: Any) -> Any:
    """A simulated light as written (uint16 with BZERO, its capture program's header), calibrated by the real
    ``calibrate`` with perfect masters: the simulator's true bias, dark current and flat response."""
    import numpy as np
    from astropy.io import fits
    from nightshift.service.calibrate import calibrate
    from nightshift.service.frame import Image

    data, header = plan.render(frame)
    stored = fits.PrimaryHDU(data=data, header=header).header  # BITPIX 16, BZERO 32768 as in the file
    light = Image(data.astype(np.float32), stored)
    bias = Image(np.array(plan.true_bias()), fits.Header({"IMAGETYP": "MASTER BIAS"}))
    dark_header = fits.Header({"IMAGETYP": "MASTER DARK", "EXPTIME": frame.exptime, "BIASSUB": True})
    dark = Image(plan.true_dark_rate() * np.float32(frame.exptime), dark_header)
    flat = Image(
        np.array(plan.true_response(frame.filter)), fits.Header({"IMAGETYP": "MASTER FLAT", "FILTER": frame.filter})
    )
    return calibrate(light, bias=bias, dark=dark, flat=flat)


def one_exposure_config(**settings: Any) -> SimConfig:
    """A small night of 300 s lights without filter, 3 frames of each calibration, none cloudy; ``settings``
    (camera, size, lights, ...) on top."""
    base: dict[str, Any] = {
        "filters": (None,),
        "n_bias": 3,
        "n_dark": 3,
        "dark_exptimes": (300.0,),
        "n_flat": 3,
        "light_exptimes": (300.0,),
        "cloudy": 0,
    }
    return SimConfig(**{**base, **settings})


def colour_night_config(pattern: str, row_order: str, **settings: Any) -> SimConfig:
    """:func:`one_exposure_config` from the simulator's one-shot-colour camera, with this Bayer pattern and row
    order."""
    colour = {"bayer": pattern, "row_order": row_order, "camera": COLOUR_CAMERA}
    return one_exposure_config(**{**colour, **settings})
