"""Installs anywhere: a wheel built from the checkout, installed into a fresh virtual environment beside
python-daemon, works from an empty folder outside the repository, and the two import names do not collide."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str | Path], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    assert result.returncode == 0, (
        f"{cmd} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


@pytest.mark.slow
def test_wheel_works_outside_the_checkout_beside_python_daemon(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", wheels, REPO], cwd=tmp_path)
    (wheel,) = wheels.glob("nightshift-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=tmp_path)
    bin_ = venv / "bin"
    _run(
        [bin_ / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check", wheel, "python-daemon"],
        tmp_path,
    )

    elsewhere = tmp_path / "empty"
    elsewhere.mkdir()
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert _run([bin_ / "nightshift", "--version"], elsewhere).stdout.strip() == f"nightshift {version}"
    assert "configuration OK" in _run([bin_ / "nightshift", "check-config"], elsewhere).stdout
    assert "--watch" in _run([bin_ / "nightshift", "run", "--help"], elsewhere).stdout
    # the shipped files come from the installed package, identical to the checkout's
    default = _run([bin_ / "nightshift", "config", "--print-default"], elsewhere).stdout
    assert default == (REPO / "config" / "nightshift.toml").read_text()
    unit = _run([bin_ / "nightshift", "config", "--unit", "nightshift.service"], elsewhere).stdout
    assert unit == (REPO / "systemd" / "nightshift.service").read_text()

    # python-daemon's `daemon` and nightshift's modules live side by side, and each is the right one
    probe = (
        "import daemon, daemon.pidfile, nightshift.daemon.cli, nightshift.service.calibrate as c\n"
        "assert hasattr(daemon, 'DaemonContext'), daemon.__file__\n"
        "assert 'site-packages/daemon/' in daemon.__file__, daemon.__file__\n"
        "assert 'site-packages/nightshift/service/' in c.__file__, c.__file__\n"
        "print('ok')\n"
    )
    assert _run([bin_ / "python", "-c", probe], elsewhere).stdout.strip() == "ok"

    demo = _run([bin_ / "nightshift", "demo", "--out", "night", "--size", "256"], elsewhere)
    assert "demo finished" in demo.stdout
    assert "stacks: 4" in demo.stdout, demo.stdout
    assert (elsewhere / "night" / "archive" / "nightshift.db").is_file()
    assert str(REPO) not in demo.stdout + demo.stderr  # nothing was taken from the checkout
