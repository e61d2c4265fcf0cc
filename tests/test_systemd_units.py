"""The systemd units pass `systemd-analyze verify` and score 2.0 or better in `systemd-analyze security`.

Both run offline against a temporary root: the host's unit directory copied in (for sysinit.target and
friends), our units in its /etc/systemd/system, and an executable stand-in at every ExecStart/ExecReload path,
so the check does not depend on nightshift being installed (or systemd running) on the test machine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import IN_CI, require_tool
from nightshift.daemon.config import Config

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "systemd"
MAIN, TEMPLATE = UNITS / "nightshift.service", UNITS / "nightshift@.service"
#: Unit names checked: the plain unit, and one instance of the template.
CHECKED = ["nightshift.service", "nightshift@cam1.service"]
#: The console script the units start; anything else they run must exist on the host.
CONSOLE_SCRIPT = "/usr/local/bin/nightshift"
MAX_EXPOSURE = 2.0


def parse_unit(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order (a unit may repeat a key)."""
    entries, section = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def values(path: Path, key: str) -> list[str]:
    return [v for _, k, v in parse_unit(path) if k == key]


def commands(path: Path) -> set[str]:
    """Executables named by the Exec*= lines (prefixes such as '-' or '+' removed)."""
    return {v.lstrip("-@:+!").split()[0] for _, k, v in parse_unit(path) if k.startswith("Exec")}


def host_unit_dir() -> Path:
    for candidate in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if (candidate / "sysinit.target").exists():
            return candidate
    if IN_CI:
        pytest.fail("no systemd unit directory with sysinit.target on this machine")
    pytest.skip("no systemd unit directory with sysinit.target on this machine")


def add_executable(root: Path, command: str) -> None:
    shim = root / command.lstrip("/")
    shim.parent.mkdir(parents=True, exist_ok=True)
    shim.write_text("#!/bin/sh\nexit 0\n")
    shim.chmod(0o755)


@pytest.fixture(scope="module")
def analyze() -> str:
    return require_tool("systemd-analyze")


@pytest.fixture(scope="module")
def unit_root(tmp_path_factory: pytest.TempPathFactory, analyze: str) -> Path:
    root = tmp_path_factory.mktemp("root")
    shutil.copytree(host_unit_dir(), root / "usr/lib/systemd/system", symlinks=True)
    (root / "lib").symlink_to("usr/lib")  # host units' absolute /lib/... links resolve inside the root
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    for unit in (MAIN, TEMPLATE):
        shutil.copy(unit, etc)
        for command in commands(unit):
            assert command.startswith("/"), command
            if command != CONSOLE_SCRIPT:
                assert os.access(command, os.X_OK), f"{unit.name} runs {command}, which this machine lacks"
            add_executable(root, command)
    return root


def verify(analyze: str, root: Path, unit: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [analyze, "verify", "--man=no", "--recursive-errors=no", f"--root={root}", unit],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""},
    )


@pytest.mark.parametrize("unit", CHECKED)
def test_verify_is_clean(analyze: str, unit_root: Path, unit: str) -> None:
    result = verify(analyze, unit_root, unit)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "nightshift" not in output, output  # no warning about our unit, even a non-fatal one


def test_verify_would_catch_a_broken_unit(analyze: str, unit_root: Path) -> None:
    text = MAIN.read_text().replace("ProtectClock=yes", "ProtectClok=yes").replace("WatchdogSec=300", "WatchdogSec=6x")
    (unit_root / "etc/systemd/system/nightshift-broken.service").write_text(text)
    result = verify(analyze, unit_root, "nightshift-broken.service")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "ProtectClok" in output and "6x" in output


@pytest.mark.parametrize("unit", CHECKED)
def test_security_exposure_at_most_2(analyze: str, unit_root: Path, unit: str) -> None:
    result = subprocess.run(
        [analyze, "security", "--offline=yes", f"--root={unit_root}", f"--threshold={int(MAX_EXPOSURE * 10)}", unit],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C"},
    )
    found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert found, result.stdout + result.stderr
    exposure = float(found.group(1))
    assert exposure <= MAX_EXPOSURE, result.stdout
    assert result.returncode == 0, result.stdout + result.stderr


def test_template_differs_from_the_unit_only_per_instance() -> None:
    """The two files repeat the same sandbox; only what names the instance may differ."""
    per_instance = {"Description", "ExecStart", "StateDirectory", "Environment", "ReadOnlyPaths"}
    main = [(s, k, v) for s, k, v in parse_unit(MAIN) if k not in per_instance]
    template = [(s, k, v) for s, k, v in parse_unit(TEMPLATE) if k not in per_instance]
    assert main == template
    for key in per_instance - {"Description"}:
        (instance_value,) = values(TEMPLATE, key)
        assert "%i" in instance_value, key


def test_units_match_the_daemon() -> None:
    """What the daemon relies on: notify with a watchdog, reload by SIGHUP, the default paths of the config."""
    defaults = Config()
    for unit in (MAIN, TEMPLATE):
        assert values(unit, "Type") == ["notify"]
        assert values(unit, "NotifyAccess") == ["main"]
        assert int(values(unit, "WatchdogSec")[0]) > 0
        assert values(unit, "ExecReload") == ["/bin/kill -HUP $MAINPID"]
        (start,) = values(unit, "ExecStart")
        assert re.fullmatch(rf"{CONSOLE_SCRIPT} run --config /etc/nightshift/(nightshift|%i)\.toml", start)
        families = values(unit, "RestrictAddressFamilies")[0].split()
        assert "AF_UNIX" in families and "AF_INET" in families  # sd_notify and the metrics listener
    (state,) = values(MAIN, "StateDirectory")
    assert defaults.archive.path == f"/var/lib/{state}"
    assert values(MAIN, "ReadOnlyPaths") == [f"-{path}" for path in defaults.watch.paths]
    assert defaults.metrics.listen.startswith("127.0.0.1:")  # IPAddressAllow=localhost lets it be scraped
    assert values(MAIN, "IPAddressAllow") == ["localhost"]
