"""Scale-out on a real ``dask.distributed`` cluster of worker processes: ``reduce`` on the cluster gives the archive
of the local run, every worker works, a worker killed mid-run costs only its tasks, a worker that cannot reach the
archive stops the run with one clear message, and what crosses the process boundary survives the trip.

The cluster is a ``LocalCluster`` of two worker processes with one thread each (what ``--dask local:2`` starts),
shared by the tests of this module; frames are small (the session's 384-pixel night).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits
from conftest import make_config, wait_until
from nightshift.daemon.archive import Archive
from nightshift.daemon.batch import reduce_folders, reprocess
from nightshift.daemon.executor import DaskExecutor, ExecutorError, parse_dask_address, start_local_cluster
from nightshift.daemon.intake import Examined
from nightshift.daemon.pipeline import Pipeline
from nightshift.daemon.storagecheck import SharedStorageError
from nightshift.service.calibrate import CalibrationError
from nightshift.service.frame import FrameError
from nightshift.service.register import AlignError
from nightshift.service.simulate import NightPlan, SimConfig, simulate_night

distributed = pytest.importorskip("distributed")

F32 = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    """Two worker processes, one thread each (``processes=True``: no threads-only cluster)."""
    cluster = start_local_cluster(2, silence_logs=40)
    client = distributed.Client(cluster)
    client.wait_for_workers(2, timeout=120)
    yield client
    client.close()
    cluster.close()


def _reduce_on(client: Any, camera: Path, archive_dir: Path, **progress: Any) -> Archive:
    archive = Archive(archive_dir)
    pipeline = Pipeline(make_config(camera, archive_dir), archive, executor=DaskExecutor(client))
    try:
        reduce_folders(pipeline, [camera], show_progress=False)
    finally:
        pipeline.close()
    return archive


@pytest.fixture(scope="module")
def on_dask(night: tuple[NightPlan, Path], client: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The session's night reduced on the cluster, with Dask's own record of which worker ran each task."""
    _plan, camera = night
    with distributed.get_task_stream(client) as stream:
        archive = _reduce_on(client, camera, tmp_path_factory.mktemp("dask") / "archive")
    yield archive, stream.data
    archive.close()


def _members(archive: Archive, link: str, owner: str, row_id: int) -> list[str]:
    return [
        r["path"]
        for r in archive.query(
            f"SELECT f.path FROM {link} l JOIN frames f ON f.id = l.frame_id WHERE l.{owner} = ? ORDER BY f.path",
            [row_id],
        )
    ]


def _assert_pixels_close(a_path: Path, b_path: Path) -> None:
    a, b = fits.getdata(a_path).astype(np.float64), fits.getdata(b_path).astype(np.float64)
    assert a.shape == b.shape
    scale = float(np.nanmedian(np.abs(b))) or 1.0
    assert np.allclose(a, b, rtol=F32, atol=F32 * scale, equal_nan=True), (a_path, float(np.nanmax(np.abs(a - b))))


def assert_same_archive(got: Archive, want: Archive) -> None:
    """The same frames (kinds, statuses, reasons, masters chosen), masters and stacks with the same members, and
    products whose pixels agree to float32 rounding."""
    cols = "id, path, kind, status, reason, bias_id, dark_id, flat_id, dark_scale, stack_id IS NOT NULL AS stacked"
    frames = got.query(f"SELECT {cols} FROM frames ORDER BY path")
    assert frames == want.query(f"SELECT {cols} FROM frames ORDER BY path")
    mcols = "id, kind, filter, exptime, version, superseded_by, n_frames, path"
    masters = got.query(f"SELECT {mcols} FROM masters ORDER BY path")
    assert masters == want.query(f"SELECT {mcols} FROM masters ORDER BY path")
    for m in masters:
        mine = _members(got, "master_frames", "master_id", m["id"])
        assert mine == _members(want, "master_frames", "master_id", m["id"])
        _assert_pixels_close(got.root / m["path"], want.root / m["path"])
    scols = "object, filter, exptime, night, state, n_frames, path"
    stacks = got.query(f"SELECT id, {scols} FROM stacks ORDER BY path")
    theirs = want.query(f"SELECT id, {scols} FROM stacks ORDER BY path")
    assert [{k: s[k] for k in s if k != "id"} for s in stacks] == [{k: s[k] for k in s if k != "id"} for s in theirs]
    for s, t in zip(stacks, theirs, strict=True):
        assert _members(got, "stack_frames", "stack_id", s["id"]) == _members(want, "stack_frames", "stack_id", t["id"])
        _assert_pixels_close(got.root / s["path"], want.root / t["path"])
    calibrated = got.query("SELECT path, calibrated_path FROM frames WHERE calibrated_path IS NOT NULL")
    assert calibrated
    for row in calibrated:
        other = want.frame_by_path(row["path"])
        assert other["calibrated_path"] == row["calibrated_path"]
        _assert_pixels_close(got.root / row["calibrated_path"], want.root / other["calibrated_path"])


def assert_every_file_once_with_its_true_kind(archive: Archive, night: tuple[NightPlan, Path]) -> None:
    plan, camera = night
    rows = archive.query("SELECT path, kind, status, reason FROM frames")
    by_path = {Path(r["path"]).relative_to(camera).as_posix(): r for r in rows}
    assert len(rows) == len(by_path) == len(plan.frames)
    for f in plan.frames:
        row = by_path[f.name]
        if f.broken:
            assert row["status"] == "quarantined" and row["reason"].startswith(f.broken + ":"), (f.name, row)
        else:
            assert row["kind"] == f.kind, f.name


def test_reduce_on_dask_gives_the_archive_of_the_local_run(night, reduced: Archive, on_dask) -> None:
    archive, _tasks = on_dask
    assert_every_file_once_with_its_true_kind(archive, night)
    plan, camera = night
    cloudy = archive.frame_by_path(str(camera / next(f.name for f in plan.frames if f.cloudy)))
    assert cloudy["status"] == "rejected" and cloudy["reason"].startswith("cloudy")
    assert_same_archive(archive, reduced)


def test_workers_keep_freed_memory_for_the_next_frame(client) -> None:
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_ (every large array mapped afresh: frame work twice as long); each
    worker sets glibc to keep freed memory instead, and runs one thread of numerical libraries."""
    from nightshift.daemon.executor import _import_compute_steps

    assert client.run(os.environ.get, "OMP_NUM_THREADS") == dict.fromkeys(client.nthreads(), "1")
    assert client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_") == dict.fromkeys(client.nthreads())
    assert client.run(_import_compute_steps) == dict.fromkeys(client.nthreads(), True)


def test_every_worker_ran_tasks_of_every_step(client, on_dask) -> None:
    _archive, tasks = on_dask
    workers = set(client.nthreads())
    assert len(workers) == 2
    assert {t["worker"] for t in tasks} == workers
    steps = {str(t["key"]).rsplit("-", 1)[0] for t in tasks}
    assert {"examine", "compute_master", "compute_light", "compute_grade", "compute_align", "compute_final"} <= steps


def test_reprocess_on_dask_gives_the_same_products(night, client, on_dask, tmp_path: Path) -> None:
    """A step done twice gives the same result: recalibrating the night's lights on the cluster."""
    archive, _ = on_dask
    copy = tmp_path / "archive"
    shutil.copytree(archive.root, copy)
    before = archive.query("SELECT path, status, reason, flat_id FROM frames WHERE kind = 'light' ORDER BY path")
    again = Archive(copy, create=False)
    _plan, camera = night
    pipeline = Pipeline(make_config(camera, copy), again, executor=DaskExecutor(client))
    try:
        n = reprocess(pipeline, night=archive.scalar("SELECT MAX(night) FROM frames"), show_progress=False)
    finally:
        pipeline.close()
    assert n == archive.scalar("SELECT COUNT(*) FROM frames WHERE kind = 'light' AND status != 'quarantined'")
    assert again.query("SELECT path, status, reason, flat_id FROM frames WHERE kind = 'light' ORDER BY path") == before
    for row in again.query("SELECT path, calibrated_path FROM frames WHERE calibrated_path IS NOT NULL"):
        _assert_pixels_close(copy / row["calibrated_path"], archive.root / row["calibrated_path"])
    again.close()


def _pids(client: Any) -> dict[str, int]:
    return client.run(os.getpid)


@pytest.mark.slow
def test_a_worker_killed_mid_run_costs_only_its_tasks(night, reduced: Archive, client, tmp_path: Path) -> None:
    """SIGKILL the process of a worker holding tasks (while files are read, masters combined, lights calibrated,
    lights aligned): the run completes and the archive is the one of the local run, every frame in it once."""
    _plan, camera = night
    stages = ["examine", "compute_master", "compute_light", "compute_align"]
    kills: list[tuple[str, int, list[str]]] = []
    stop = threading.Event()

    def killer() -> None:
        while stages and not stop.is_set():
            busy = {
                w: [str(k) for k in keys]
                for w, keys in client.processing().items()
                if any(str(k).startswith(tuple(stages)) for k in keys)
            }
            if busy:
                worker = sorted(busy)[0]
                pid = _pids(client)[worker]
                os.kill(pid, signal.SIGKILL)
                kills.append((worker, pid, busy[worker]))
                stage = next(s for s in stages if any(k.startswith(s) for k in busy[worker]))
                del stages[: stages.index(stage) + 1]
            time.sleep(0.005)

    thread = threading.Thread(target=killer, daemon=True)
    archive = Archive(tmp_path / "archive")
    pipeline = Pipeline(make_config(camera, archive.root), archive, executor=DaskExecutor(client))
    try:
        thread.start()
        reduce_folders(pipeline, [camera], show_progress=False)
    finally:
        stop.set()
        thread.join(10)
        pipeline.close()
    assert len(kills) >= 2, kills
    assert any(k.startswith(("compute_master", "compute_light")) for _, _, keys in kills for k in keys), kills
    wait_until(lambda: len(client.nthreads()) == 2, 60, "the nannies to restart the killed workers")
    assert not {pid for _, pid, _ in kills} & set(_pids(client).values()), "the killed processes are gone"
    assert_every_file_once_with_its_true_kind(archive, night)
    assert_same_archive(archive, reduced)
    archive.close()


def test_a_worker_that_cannot_reach_the_archive_stops_the_run(client, tmp_path: Path) -> None:
    """A third worker process that may not enter the archive folder (root without its capabilities, the folder
    another user's): ``reduce --dask`` stops before ingesting anything, one message naming the worker and the
    path, exit code 1."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux) to start a worker without file-permission overrides")
    base = Path(tempfile.mkdtemp(prefix="nightshift-dask-", dir="/tmp"))
    worker = None
    try:
        os.chmod(base, 0o755)
        camera, archive_dir, scratch = base / "camera", base / "archive", base / "scratch"
        simulate_night(camera, SimConfig(size=64, n_bias=3, n_dark=3, n_flat=3, n_light=1))
        scratch.mkdir()
        archive_dir.mkdir()
        os.chown(archive_dir, 65534, 65534)  # nobody's, 0700: a root without CAP_DAC_OVERRIDE cannot enter
        os.chmod(archive_dir, 0o700)
        before = set(client.nthreads())
        address = client.scheduler.address
        worker = subprocess.Popen(
            ["setpriv", "--bounding-set=-all", "--inh-caps=-all", sys.executable, "-m", "distributed.cli.dask_worker",
             address, "--nthreads", "1", "--no-nanny", "--local-directory", str(scratch)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_until(lambda: len(client.nthreads()) == 3, 60, "the restricted worker to join")
        (restricted,) = set(client.nthreads()) - before
        result = subprocess.run(
            [sys.executable, "-m", "nightshift.daemon.cli", "reduce", str(camera), "--archive", str(archive_dir),
             "--dask", address],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 1, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("nightshift:")]
        assert len(errors) == 1, result.stderr
        assert f"dask worker {restricted} cannot read the archive folder {archive_dir}" in errors[0], errors[0]
        assert "Permission denied" in errors[0] and "shared storage" in errors[0]
        archive = Archive(archive_dir, create=False)
        assert archive.scalar("SELECT COUNT(*) FROM frames") == 0, "nothing was taken in"
        archive.close()
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(30)
        shutil.rmtree(base, ignore_errors=True)
    wait_until(lambda: len(client.nthreads()) == 2, 60, "the restricted worker to leave")


@pytest.mark.slow
def test_cli_reduce_on_a_local_cluster(tmp_path: Path) -> None:
    """``nightshift reduce --dask local:2``: two worker processes started and stopped by the command; the dashboard
    link on stderr; every file of the night in the archive."""
    camera = tmp_path / "camera"
    plan = simulate_night(camera, SimConfig(size=256, n_bias=3, n_dark=3, n_flat=3, n_light=2, broken=True))
    result = subprocess.run(
        [sys.executable, "-m", "nightshift.daemon.cli", "reduce", str(camera), "--archive", str(tmp_path / "a"),
         "--dask", "local:2", "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "[dask] Dask scheduler tcp://127.0.0.1:" in result.stderr
    assert "2 worker(s), 2 thread(s)" in result.stderr and "dashboard http://" in result.stderr
    archive = Archive(tmp_path / "a", create=False)
    assert archive.scalar("SELECT COUNT(*) FROM frames") == len(plan.frames)
    assert archive.scalar("SELECT COUNT(*) FROM frames WHERE status = 'quarantined'") == sum(
        1 for f in plan.frames if f.broken
    )
    assert archive.scalar("SELECT COUNT(*) FROM stacks WHERE state = 'final'") >= 1
    archive.close()


def test_no_scheduler_at_the_address_fails_clearly() -> None:
    with pytest.raises(ExecutorError, match=r"cannot reach the Dask scheduler at tcp://127\.0\.0\.1:9"):
        DaskExecutor.connect("tcp://127.0.0.1:9", timeout=2)


@pytest.mark.parametrize(
    ("address", "expected"),
    [("local:2", ("local", 2)), ("tcp://10.0.0.5:8786", ("tcp://10.0.0.5:8786", None))],
)
def test_dask_addresses(address: str, expected: tuple[str, int | None]) -> None:
    assert parse_dask_address(address) == expected


@pytest.mark.parametrize("address", ["local", "local:0", "10.0.0.5:8786", "tcp://host", ""])
def test_bad_dask_addresses(address: str) -> None:
    with pytest.raises(ValueError):
        parse_dask_address(address)


def test_what_a_worker_sends_back_survives_the_trip() -> None:
    """Results and errors cross a process boundary pickled; each must come back with what it says."""
    for exc in (
        FrameError("truncated", "short by 4 bytes"),
        CalibrationError("the dark still holds the bias"),
        AlignError("too few stars"),
        SharedStorageError("dask worker x cannot read y"),
    ):
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc)
    ex = Examined(Path("/x.fits"), 10, 1.0, error=FrameError("empty", "x.fits is empty"))
    back = pickle.loads(pickle.dumps(ex))
    assert back.error.reason == "empty" and back.error.message == "x.fits is empty"


@pytest.mark.slow
def test_scale_bench_prints_its_figures(tmp_path: Path) -> None:
    """bench/scale.py at a tiny size, one repeat of a thread run and a one-worker cluster: one JSON summary with
    the figures of both runs and the 4k-year projection (timings are not checked here)."""
    bench = Path(__file__).resolve().parents[1] / "bench" / "scale.py"
    argv = [sys.executable, str(bench), "--size", "128", "--lights", "1", "--calibrations", "3", "--repeats", "1"]
    result = subprocess.run(
        [*argv, "--runs", "threads:1,local:1", "--work", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    files = sum(1 for p in (tmp_path / "camera").rglob("*.fits"))
    for run in ("threads:1", "local:1"):
        r = summary["runs"][run]
        assert r["files"] == files and r["fps"] > 0 and r["total_s"] > 0
    assert summary["runs"]["threads:1"]["statuses"] == summary["runs"]["local:1"]["statuses"]
    assert sum(w["tasks"] for w in summary["runs"]["local:1"]["workers"].values()) > 0
    assert "dask_overhead_one_worker" in summary["ratios"]
    assert set(summary["projection_4k_year"]) >= {"1_workers_hours", "8_workers_hours", "64_workers_hours"}
