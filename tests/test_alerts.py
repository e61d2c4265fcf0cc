"""The Prometheus alert rules are valid, and their promtool unit tests pass and cover every alert both ways.

(That the rules read only metrics nightshift exports is checked with the catalogue, in test_metrics.py.)
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml
from conftest import require_tool

CONFIG = Path(__file__).resolve().parents[1] / "config"
ALERTS = CONFIG / "alerts.yml"
ALERT_TESTS = CONFIG / "alerts.test.yml"
EXPECTED_ALERTS = {
    "NightshiftDown",
    "NightshiftQueueNotDraining",
    "NightshiftNoNewFrames",
    "NightshiftQuarantineSpike",
    "NightshiftLightsPendingTooLong",
    "NightshiftDiskAlmostFull",
    "NightshiftWatcherDead",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("promtool"), *args], capture_output=True, text=True, check=False, cwd=CONFIG)


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", ALERTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", ALERT_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_unit_tests_would_catch_a_broken_rule(tmp_path: Path) -> None:
    """A watcher alert that never fires must fail the unit tests (so they are not vacuous)."""
    broken = ALERTS.read_text().replace("nightshift_watcher_alive == 0", "nightshift_watcher_alive == 2")
    assert broken != ALERTS.read_text()
    (tmp_path / ALERTS.name).write_text(broken)
    shutil.copy(ALERT_TESTS, tmp_path)
    result = subprocess.run(
        [require_tool("promtool"), "test", "rules", ALERT_TESTS.name],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "NightshiftWatcherDead" in result.stdout + result.stderr


def test_the_expected_alerts_with_severity_and_text() -> None:
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} == EXPECTED_ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_every_alert_is_tested_firing_and_quiet() -> None:
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    assert tests["rule_files"] == [ALERTS.name]
    fires, quiet = set(), set()
    for group in tests["tests"]:
        for case in group["alert_rule_test"]:
            (fires if case["exp_alerts"] else quiet).add(case["alertname"])
    assert fires == EXPECTED_ALERTS
    assert quiet == EXPECTED_ALERTS
