"""The metrics catalogue, scraped over real HTTP, linted by promtool; the dashboard and alerts use only its names."""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import require_tool
from nightshift.daemon.metrics import CATALOGUE, REJECT_REASONS, STAGES, Metrics, reason_code
from nightshift.service.frame import KINDS, QUARANTINE_REASONS, FrameError
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "config" / "grafana-dashboard.json"
ALERTS = ROOT / "config" / "alerts.yml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a scrape."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def served() -> Iterator[tuple[Metrics, str]]:
    metrics = Metrics()
    port = free_port()
    assert metrics.start_server(f"127.0.0.1:{port}") == ("127.0.0.1", port)
    yield metrics, f"http://127.0.0.1:{port}/metrics"
    metrics.stop()


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


def test_scrape_over_http_reports_what_happened(served: tuple[Metrics, str]) -> None:
    metrics, url = served
    metrics.files_seen.inc(5)
    metrics.frames_ingested.labels(kind="light").inc(3)
    metrics.frames_ingested.labels(kind="bias").inc()
    metrics.frames_quarantined.labels(reason="truncated").inc()
    metrics.frames_rejected.labels(reason="cloudy: transparency 0.21 < 0.5").inc()
    metrics.frames_rejected.labels(reason="bright sky: background 900 > 2 x group median 300").inc()
    metrics.masters_built.labels(kind="dark").inc()
    metrics.queue_depth.set(4)
    metrics.lights_pending.set(2)
    metrics.watcher_alive.set(1)
    metrics.set_stack_frames(17, 12)
    metrics.set_newest_frame(1_700_000_000.0)
    with metrics.stage("grade"):
        pass

    got = samples(scrape(url))
    assert got[("nightshift_files_seen_total", ())] == 5
    assert got[("nightshift_frames_ingested_total", (("kind", "light"),))] == 3
    assert got[("nightshift_frames_ingested_total", (("kind", "bias"),))] == 1
    assert got[("nightshift_frames_ingested_total", (("kind", "flat"),))] == 0  # created at zero up front
    assert got[("nightshift_frames_quarantined_total", (("reason", "truncated"),))] == 1
    assert got[("nightshift_frames_rejected_total", (("reason", "cloudy"),))] == 1
    assert got[("nightshift_frames_rejected_total", (("reason", "bright_sky"),))] == 1
    assert got[("nightshift_masters_built_total", (("kind", "dark"),))] == 1
    assert got[("nightshift_queue_depth", ())] == 4
    assert got[("nightshift_lights_pending", ())] == 2
    assert got[("nightshift_watcher_alive", ())] == 1
    assert got[("nightshift_processing_paused", ())] == 0
    assert got[("nightshift_stack_frames", (("stack_id", "17"),))] == 12
    assert got[("nightshift_newest_frame_timestamp_seconds", ())] == 1_700_000_000.0
    assert got[("nightshift_newest_frame_age_seconds", ())] >= time.time() - 1_700_000_000.0 - 1
    assert got[("nightshift_stage_duration_seconds_count", (("stage", "grade"),))] == 1
    assert got[("nightshift_stage_duration_seconds_bucket", (("le", "+Inf"), ("stage", "grade")))] == 1
    assert got[("nightshift_stage_errors_total", (("stage", "grade"),))] == 0
    build = [labels for (name, labels) in got if name == "nightshift_build_info"]
    assert len(build) == 1 and {k for k, _ in build[0]} == {"version", "python"}
    assert ("process_start_time_seconds", ()) in got  # process collector: start time, memory, CPU


def test_scrape_passes_promtool_lint(served: tuple[Metrics, str]) -> None:
    promtool = require_tool("promtool")
    metrics, url = served
    metrics.frames_ingested.labels(kind="light").inc()
    metrics.set_stack_frames(3, 7)
    metrics.watch_archive_free(ROOT)
    with pytest.raises(RuntimeError), metrics.stage("stack"):
        raise RuntimeError("boom")
    text = scrape(url)
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""


def test_every_metric_has_help_and_a_conventional_name() -> None:
    metrics = Metrics()
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    for spec in CATALOGUE:
        assert spec.name.startswith("nightshift_")
        assert re.fullmatch(r"[a-z][a-z0-9_]*", spec.name)
        assert spec.name.endswith("_total") == (spec.type == "counter"), spec.name
        family = families[spec.name.removesuffix("_total")]
        assert family.type == spec.type
        assert family.documentation == spec.help and len(spec.help) > 10
        assert getattr(metrics, spec.attribute) is not None
    assert set(Metrics.__annotations__) == {spec.attribute for spec in CATALOGUE} | {"build_info"}


def test_own_registry_not_the_global_one() -> None:
    first, second = Metrics(), Metrics()  # two in one process do not collide
    first.files_seen.inc()
    assert b"nightshift_files_seen_total 1.0" in first.render()
    assert b"nightshift_files_seen_total 0.0" in second.render()
    assert not any(f.name.startswith("nightshift_") for f in REGISTRY.collect())


def test_labels_are_bounded() -> None:
    metrics = Metrics()
    with pytest.raises(ValueError, match="kind"):
        metrics.frames_ingested.labels(kind="science")
    with pytest.raises(ValueError, match="kind"):
        metrics.masters_built.labels(kind="light")  # no master of lights
    with pytest.raises(ValueError, match="stage"), metrics.stage("frobnicate"):
        pass
    with pytest.raises(ValueError, match="stack_id"):
        metrics.stack_frames.labels(stack_id="M31 Ha 300s")
    metrics.frames_rejected.labels(reason="/srv/camera/M31_0001.fits looked odd").inc()
    metrics.frames_rejected.labels(reason="other").inc()
    metrics.frames_quarantined.labels(reason="IMAGETYP='Bias Frame'").inc()
    got = samples(metrics.render().decode())
    assert got[("nightshift_frames_rejected_total", (("reason", "other"),))] == 2
    assert got[("nightshift_frames_quarantined_total", (("reason", "other"),))] == 1
    allowed = {
        "kind": set(KINDS),
        "stage": set(STAGES),
        "reason": set(REJECT_REASONS) | set(QUARANTINE_REASONS) | {"other"},
    }
    for name, labels in got:
        if name.startswith("nightshift_"):
            for key, value in labels:
                if key in allowed:
                    assert value in allowed[key], (name, key, value)


def test_reason_code() -> None:
    assert reason_code("cloudy: 3 stars < 5", REJECT_REASONS) == "cloudy"
    assert reason_code("bright sky: background 900 > 2 x 300", REJECT_REASONS) == "bright_sky"
    assert reason_code("trailed", REJECT_REASONS) == "trailed"
    assert reason_code("unaligned: no matching star pattern between frame and reference", REJECT_REASONS) == "unaligned"
    assert reason_code("a very strange frame", REJECT_REASONS) == "other"
    assert reason_code("other", REJECT_REASONS) == "other"


def test_stage_times_every_run_and_leaves_error_counting_to_the_caller() -> None:
    metrics = Metrics()
    with metrics.stage("calibrate"):
        pass
    with pytest.raises(FrameError), metrics.stage("ingest"):
        raise FrameError("truncated", "data shorter than NAXIS promises")
    with pytest.raises(ZeroDivisionError), metrics.stage("stack"):
        raise ZeroDivisionError
    got = samples(metrics.render().decode())
    for stage in ("ingest", "calibrate", "stack"):  # failed runs are timed too
        assert got[("nightshift_stage_duration_seconds_count", (("stage", stage),))] == 1
        assert got[("nightshift_stage_errors_total", (("stage", stage),))] == 0
    assert got[("nightshift_stage_duration_seconds_count", (("stage", "grade"),))] == 0


def test_new_night_forgets_the_stacks() -> None:
    metrics = Metrics()
    metrics.set_stack_frames(1, 10)
    metrics.set_stack_frames(2, 4)
    metrics.set_stack_frames(2, 5)
    got = samples(metrics.render().decode())
    assert got[("nightshift_stack_frames", (("stack_id", "1"),))] == 10
    assert got[("nightshift_stack_frames", (("stack_id", "2"),))] == 5
    metrics.new_night()
    got = samples(metrics.render().decode())
    assert not [k for k in got if k[0] == "nightshift_stack_frames"]
    metrics.set_stack_frames(3, 1)
    assert [k for k in samples(metrics.render().decode()) if k[0] == "nightshift_stack_frames"] == [
        ("nightshift_stack_frames", (("stack_id", "3"),))
    ]


def test_newest_frame_keeps_the_newest_and_age_is_nan_before_one() -> None:
    metrics = Metrics()
    got = samples(metrics.render().decode())
    assert got[("nightshift_newest_frame_timestamp_seconds", ())] == 0
    assert math.isnan(got[("nightshift_newest_frame_age_seconds", ())])
    now = time.time()
    metrics.set_newest_frame(now - 100)
    metrics.set_newest_frame(now - 5000)  # an older frame found by a sweep does not go back in time
    got = samples(metrics.render().decode())
    assert got[("nightshift_newest_frame_timestamp_seconds", ())] == pytest.approx(now - 100)
    assert got[("nightshift_newest_frame_age_seconds", ())] >= 100


def test_archive_free_bytes_read_at_scrape(tmp_path: Path) -> None:
    metrics = Metrics()
    assert math.isnan(samples(metrics.render().decode())[("nightshift_archive_free_bytes", ())])
    metrics.watch_archive_free(tmp_path)
    free = samples(metrics.render().decode())[("nightshift_archive_free_bytes", ())]
    assert 0 < free <= shutil.disk_usage(tmp_path).total
    metrics.watch_archive_free(tmp_path / "missing")
    assert math.isnan(samples(metrics.render().decode())[("nightshift_archive_free_bytes", ())])


@pytest.mark.parametrize("listen", ["off", "OFF", "127.0.0.1:0", "0"])
def test_off_or_port_zero_serves_nothing(listen: str) -> None:
    metrics = Metrics()
    assert metrics.start_server(listen) is None
    metrics.stop()  # nothing to stop


def test_stop_closes_the_port() -> None:
    metrics = Metrics()
    port = free_port()
    metrics.start_server(f"127.0.0.1:{port}")
    assert "nightshift_files_seen_total" in scrape(f"http://127.0.0.1:{port}/metrics")
    metrics.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


# --- what reads the catalogue: the Grafana dashboard and the alert rules --------------------------------------

_PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def metric_names_in(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, labels and strings left out)."""
    text = re.sub(r"\$\{[^}]*\}|\$\w+", "", expr)  # Grafana variables
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', "", text)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        word, call = match.groups()
        if not call and word.lower() not in _PROMQL_WORDS:
            names.add(word)
    return names


def test_metric_names_in() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, stage) (rate(nightshift_stage_duration_seconds_bucket{job=~"$job"}'
        "[$__rate_interval]))) > bool 1 and on (instance) up offset 5m or time() - foo_total{a='b'}"
    )
    assert metric_names_in(expr) == {"nightshift_stage_duration_seconds_bucket", "up", "foo_total"}


def dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                found.append((panel["title"], target["expr"]))

    walk(dashboard["panels"])
    return found


def test_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
            assert panel["targets"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
    wanted = {
        "nightshift_frames_ingested_total",
        "nightshift_queue_depth",
        "nightshift_stage_duration_seconds_bucket",
        "nightshift_frames_rejected_total",
        "nightshift_frames_quarantined_total",
        "nightshift_lights_pending",
        "nightshift_archive_free_bytes",
        "nightshift_newest_frame_timestamp_seconds",
        "nightshift_stack_frames",
        "nightshift_watcher_alive",
        "nightshift_processing_paused",
    }
    used = set().union(*(metric_names_in(expr) for _, expr in dashboard_exprs()))
    assert wanted <= used


def test_dashboard_uses_only_exported_metrics() -> None:
    exported = Metrics().exported_names() | {"up"}
    dashboard = json.loads(DASHBOARD.read_text())
    for title, expr in dashboard_exprs():
        names = metric_names_in(expr)
        assert names, (title, expr)
        assert names <= exported, (title, names - exported)
    for variable in dashboard["templating"]["list"]:
        (metric,) = re.findall(r"label_values\((\w+)", variable["definition"])
        assert metric in exported


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    rules = [
        {"record": f"dashboard:panel_{i}", "expr": expr.replace("$__rate_interval", "5m")}
        for i, (_, expr) in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_use_only_exported_metrics() -> None:
    exported = Metrics().exported_names() | {"up"}
    rules = [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]
    assert rules
    for rule in rules:
        names = metric_names_in(rule["expr"])
        assert names, rule["alert"]
        assert names <= exported, (rule["alert"], names - exported)


def test_unknown_reason_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    with caplog.at_level("WARNING", logger="nightshift.daemon.metrics"):
        for _ in range(3):
            metrics.frames_rejected.labels(reason="gremlins: in the optics").inc()
        metrics.frames_rejected.labels(reason="other").inc()
    assert len(caplog.records) == 1
    assert "gremlins" in caplog.records[0].getMessage()
