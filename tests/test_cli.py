"""The command line as a person uses it: real ``nightshift`` processes, their exit codes and what they print;
and the configuration's one clear message per mistake."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tomllib
from dataclasses import asdict
from pathlib import Path

import pytest
from nightshift.daemon.archive import Archive
from nightshift.daemon.config import Config, ConfigError, load_config
from nightshift.service.simulate import TRUTH_FILE

REPO = Path(__file__).resolve().parent.parent
COMMANDS = [
    "run",
    "reduce",
    "status",
    "frames",
    "quarantine",
    "masters",
    "stacks",
    "reprocess",
    "report",
    "check-config",
    "simulate",
    "demo",
]


def nightshift(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nightshift.daemon.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_documented_default_config_equals_the_built_in_defaults() -> None:
    documented = load_config(REPO / "config" / "nightshift.toml")
    builtin = Config()
    documented.source = builtin.source = "-"
    assert asdict(documented) == asdict(builtin)


@pytest.mark.parametrize(
    ("toml", "key", "expected"),
    [
        ("[watch]\nquiet_seconds = 'soon'", "[watch] quiet_seconds", "a number"),
        ("[watch]\nobserver = 'fanotify'", "[watch] observer", '"native" or "polling"'),
        ("[watch]\npaths = []", "[watch] paths", "at least one folder"),
        (
            "[watch]\nquiet_seconds = 5\nincomplete_timeout_seconds = 3",
            "[watch] incomplete_timeout_seconds",
            "more than quiet_seconds",
        ),
        ("[archive]\npaht = '/x'", "[archive] paht", "unknown key"),
        ("[archve]\npath = '/x'", "[archve]", "unknown section"),
        ("[site]\ntimezone = 'Mars/Olympus'", "[site] timezone", "IANA time zone"),
        ("[classify]\nsynonyms = { 'Mystery' = 'science' }", "[classify] synonyms.Mystery", "one of bias"),
        ("[calibration]\nmin_frames = { bias = 0 }", "[calibration] min_frames.bias", "at least 1"),
        ("[calibration]\nmatch_keys = ['colour']", "[calibration] match_keys", "names from"),
        ("[metrics]\nlisten = 'localhost'", "[metrics] listen", "HOST:PORT"),
        ("[processing]\ndask = 'localhost:8786'", "[processing] dask", '"local:N" or a scheduler address'),
        ("[logging]\nlevel = 'loud'", "[logging] level", "debug, info"),
        ("[watch\n", "not valid TOML", ""),
    ],
)
def test_bad_config_names_the_key_and_exits_2(tmp_path: Path, toml: str, key: str, expected: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert key in str(err.value) and expected in str(err.value)
    result = nightshift("check-config", "--config", str(cfg))
    assert result.returncode == 2
    assert key in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_check_config_accepts_the_documented_default() -> None:
    result = nightshift("check-config", "--config", str(REPO / "config" / "nightshift.toml"))
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout


def test_documented_default_parses_as_toml_with_every_section() -> None:
    raw = tomllib.loads((REPO / "config" / "nightshift.toml").read_text())
    assert set(raw) == {f for f in Config.__dataclass_fields__ if f != "source"}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = nightshift(command, "--help")
    assert result.returncode == 0 and "usage: nightshift " + command in result.stdout


def test_usage_errors_exit_2() -> None:
    assert nightshift().returncode == 2
    assert nightshift("frobnicate").returncode == 2
    assert nightshift("frames", "--kind", "comet").returncode == 2


def test_missing_archive_and_watch_folder_fail_clearly(tmp_path: Path) -> None:
    result = nightshift("status", "--archive", str(tmp_path / "nowhere"))
    assert result.returncode == 1 and "no archive at" in result.stderr
    result = nightshift(
        "run", "--watch", str(tmp_path / "no-camera"), "--archive", str(tmp_path / "a"), "--metrics", "off"
    )
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_simulate_reduce_and_listings(tmp_path: Path) -> None:
    camera, archive = tmp_path / "camera", tmp_path / "archive"
    result = nightshift("simulate", str(camera), "--size", "256", "--lights", "2", "--calibrations", "3", "--broken")
    assert result.returncode == 0, result.stderr
    n_files = sum(1 for p in camera.rglob("*") if p.is_file() and p.name != TRUTH_FILE)
    assert f"wrote {n_files} files" in result.stdout
    result = nightshift("reduce", str(camera), "--archive", str(archive))
    assert result.returncode == 0, result.stderr
    assert f"reduced {n_files} file(s)" in result.stdout
    assert "[ingest]" in result.stderr, "long batch work shows progress"
    # the report of the night it reduced (the simulated night starts in the evening of its date)
    report = archive / "reports" / "night-2026-11-25.html"
    assert f"report of night 2026-11-25: {report}" in result.stdout.splitlines()
    lights = [p.name for p in camera.rglob("*Light*") if "broken" not in str(p)]
    assert lights and all(name in report.read_text(encoding="utf-8") for name in lights)
    result = nightshift("frames", "--archive", str(archive), "--json")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == n_files
    result = nightshift("frames", "--archive", str(archive), "--kind", "bias", "--json")
    assert {json.loads(line)["kind"] for line in result.stdout.splitlines()} == {"bias"}
    result = nightshift("quarantine", "--archive", str(archive), "--json")
    reasons = {json.loads(line)["reason"].split(":")[0] for line in result.stdout.splitlines()}
    assert {"empty", "not_fits", "truncated", "nan_data", "constant_data", "unknown_type"} <= reasons
    result = nightshift("quarantine", "--archive", str(archive))
    assert result.returncode == 0 and "not_fits:" in result.stdout
    result = nightshift("status", "--archive", str(archive), "--json")
    status = json.loads(result.stdout)
    assert status["schema_version"] >= 1 and status["queue_depth"] == 0
    assert sum(sum(v.values()) for v in status["frames"].values()) == n_files
    result = nightshift("status", "--archive", str(archive))
    assert "frames by kind and status" in result.stdout
    result = nightshift("stacks", "--archive", str(archive), "--json")
    assert result.returncode == 0 and len(result.stdout.splitlines()) >= 1
    result = nightshift("masters", "--archive", str(archive))
    assert result.returncode == 0 and "bias" in result.stdout
    result = nightshift("reprocess", "--archive", str(archive))
    assert result.returncode == 2


def test_log_format_json_gives_one_object_per_line(tmp_path: Path) -> None:
    camera = tmp_path / "camera"
    nightshift("simulate", str(camera), "--size", "128", "--lights", "0", "--calibrations", "1")
    result = nightshift("reduce", str(camera), "--archive", str(tmp_path / "a"), "--log-format", "json", "--json")
    assert result.returncode == 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("{")]
    assert lines
    for line in lines:
        entry = json.loads(line)
        assert {"time", "level", "logger", "message"} <= set(entry)


def test_readme_tells_every_command_config_key_and_table() -> None:
    """The README is a contract: every command, every configuration key and every archive table is in it."""
    readme = (REPO / "README.md").read_text()
    for command in COMMANDS:
        assert f"nightshift {command}" in readme, command
    for section, fields in asdict(Config()).items():
        if section == "source":
            continue
        assert f"[{section}]" in readme, section
        for key in fields:
            assert f"`{key}`" in readme, f"[{section}] {key}"
    from nightshift.daemon.archive import FRAME_STATUSES, migrations

    for status in FRAME_STATUSES:
        assert f"`{status}`" in readme, status
    for table in ("frames", "masters", "master_frames", "stacks", "stack_frames", "events", "frame_sources"):
        assert f"**`{table}`**" in readme, table
    import sqlite_utils

    names = [m.name for m in migrations.pending(sqlite_utils.Database(memory=True))]
    assert names and all(f"`{name}`" in readme for name in names), "every migration is noted in the README"


# -- in a pipe ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def long_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An archive with more rows than a pipe holds (64 kB), so a reader that stops early really goes away."""
    root = tmp_path_factory.mktemp("long") / "archive"
    a = Archive(root)
    try:
        with a.transaction():
            for i in range(2000):
                a.record_frame(
                    {
                        "path": f"/camera/2026-11-25/frame_{i:05d}.fits",
                        "night": "2026-11-25",
                        "status": "quarantined",
                        "reason": f"not_fits: frame_{i:05d}.fits does not start with SIMPLE = T",
                    }
                )
                a.put("masters", {"kind": "bias", "path": f"masters/2026-11-25/bias/bias_{i:05d}_v1.fits"})
                stack = {"object": f"object {i}", "filter": "V", "exptime": 30.0, "night": "2026-11-25"}
                a.put("stacks", {**stack, "path": f"stacks/{i}.fits", "n_frames": 4, "state": "final"})
    finally:
        a.close()
    return root


@pytest.mark.parametrize(
    ("command", "first"),
    [
        (["frames"], "id night kind object filter exptime status reason path"),
        (["frames", "--json"], '{"id": 1, "path": "/camera/2026-11-25/frame_00000.fits"'),
        (["quarantine"], "id night reason path"),
        (["masters"], "id night kind filter exptime n_frames version superseded_by path"),
        (["stacks", "--json"], '{"id": 1,'),
        (["status"], "archive "),
    ],
)
def test_listings_stop_quietly_when_the_reader_goes_away(
    long_archive: Path, tmp_path: Path, command: list[str], first: str
) -> None:
    """``nightshift frames | head -1`` in a real shell: the first line, then a quiet stop (0 or 141 = SIGPIPE)."""
    err, status = tmp_path / "stderr", tmp_path / "status"
    args = shlex.join([sys.executable, "-m", "nightshift.daemon.cli", *command, "--archive", str(long_archive)])
    script = f'{args} 2>{shlex.quote(str(err))} | head -1; echo "${{PIPESTATUS[0]}}" >{shlex.quote(str(status))}'
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 1, done
    assert " ".join(done.stdout.split()).startswith(first), done.stdout
    assert err.read_text() == ""
    assert int(status.read_text()) in (0, 141)


def test_summary_names_a_stack_without_filter_as_such() -> None:
    """A colour camera's stack usually has no filter: the summary says so instead of printing None."""
    from nightshift.daemon.summary import summary_lines

    stack = {"object": "NGC 6939", "filter": None, "exptime": 30.0, "night": "2026-11-25", "n_frames": 4}
    lines = summary_lines({"frames": {}, "masters": {}, "stacks": [{**stack, "state": "final", "path": "s.fits"}]})
    assert "  NGC 6939 no filter 30s night 2026-11-25: 4 frames, final  -> s.fits" in lines
    assert not any("None" in line for line in lines)
