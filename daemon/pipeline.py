"""The work queue: what to do next, decided from the archive alone, one small step at a time.

Every frame's state lives in the ``frames`` table, so after a crash or restart the same questions give the same
answers and processing resumes where it stopped; each step writes its product atomically before it records it,
so doing a step twice gives the same result as once. Each step runs inside its own guard: one bad frame or set
is recorded and set aside, never stopping the rest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from nightshift.daemon.archive import Archive
from nightshift.daemon.calibrating import compute_light, plan_light, record_light, refuse_light
from nightshift.daemon.calsets import CAL_KINDS, CalibrationSets, compute_master
from nightshift.daemon.config import Config
from nightshift.daemon.executor import Done, Executor, LocalExecutor, in_order
from nightshift.daemon.intake import FileJob, FilterNames, examine, quarantine, record, settled
from nightshift.daemon.mastercache import MASTERS
from nightshift.daemon.metrics import Metrics
from nightshift.daemon.products import COMPUTED_FOLDERS, Layout
from nightshift.daemon.stacking import AlignJob, Stacker, compute_align, compute_final, compute_grade
from nightshift.daemon.storagecheck import make_probe
from nightshift.daemon.workspace import Workspace
from nightshift.service.calibrate import CalibrationError
from nightshift.service.classify import ClassifyOptions
from nightshift.service.fitsio import read_frame_header
from nightshift.service.frame import FrameError
from nightshift.service.night import header_longitude
from nightshift.service.register import AlignError

__all__ = ["MAX_TRIES", "Pipeline"]


log = logging.getLogger("nightshift.pipeline")

#: A frame whose step fails unexpectedly this many times is quarantined as a processing error.
MAX_TRIES = 3


class Pipeline:
    """The science applied to the archive: ingest files, build masters, calibrate, grade, align and stack."""

    def __init__(
        self,
        config: Config,
        archive: Archive,
        metrics: Metrics | None = None,
        *,
        workers: int = 1,
        executor: Executor | None = None,
    ) -> None:
        """Compute steps (reading, hashing, combining, calibrating) run on ``executor`` (the caller closes it), or
        else on ``workers`` threads of this process; the archive is only ever touched from the calling thread."""
        self.config = config
        self.executor = executor if executor is not None else LocalExecutor(workers)
        self._owns_executor = executor is None
        self.archive = archive
        self.metrics = metrics or Metrics()
        self.layout = Layout(archive.root)
        self.layout.make_folders()
        self.layout.sweep_temp_files()
        self.ws = Workspace(archive, self.layout, self.metrics)
        self.sets = CalibrationSets(self.ws, config.calibration, self.night_ended)
        self.stacker = Stacker(self.ws, config.grading, config.stacking)
        self.masters_changed = True  # retry pending lights once at start
        self._ended: set[str] | None = set()  # nights being closed by end_night (None: every night)
        self._night_longitude: dict[str, float | None] = {}
        self.apply_config(config)

    def apply_config(self, config: Config) -> None:
        """Take a new configuration (SIGHUP): classification words, rules and thresholds."""
        self.config = config
        self.sets.rules = config.calibration
        self.stacker.grading, self.stacker.rules = config.grading, config.stacking
        c = config.classify
        self.classify_options = ClassifyOptions(
            synonyms=dict(c.synonyms),
            overrides=[(r["glob"], r["kind"]) for r in c.overrides],
            filter_aliases=dict(c.filter_aliases),
            longitude=config.site.longitude,
            timezone=config.site.timezone or None,
            untyped_lights=c.untyped_lights,
            filter_keep_case=c.filter_case == "keep",
            overscan=config.calibration.overscan or "off",
            trim=config.calibration.trim or "off",
            bayer_patterns=dict(c.bayer_pattern),
        )
        self.filter_names = FilterNames(keep_case=c.filter_case == "keep")
        self.masters_changed = True

    # -- intake ---------------------------------------------------------------------------------------------------
    def ingest(self, path: Path, *, size: int | None = None, mtime: float | None = None) -> int | None:
        """Take one settled file into the archive (never raises for bad input)."""
        path = Path(path).absolute()
        try:
            found = settled(self.ws, path, size, mtime)
            if found is None:
                return None
            return record(self.ws, examine(FileJob(path, *found, self.classify_options)), self.filter_names)
        except Exception as exc:
            return self._ingest_failed(path, exc)

    def _ingest_failed(self, path: Path, exc: BaseException) -> int:
        """A bug or an I/O failure while taking ``path`` in: recorded against the file; the night goes on."""
        log.error("ingest of %s failed", path, exc_info=exc)
        self.metrics.stage_errors.labels(stage="ingest").inc()
        return quarantine(
            self.ws, {"path": str(path)}, FrameError("processing_error", f"ingest failed: {type(exc).__name__}: {exc}")
        )

    def quarantine_incomplete(self, path: Path, reason: str) -> None:
        """A file that never became a whole FITS file: kept aside, with its size and time so that a rescan
        does not report it again (a later change to it makes it new again)."""
        spath = str(Path(path).absolute())
        row: dict[str, Any] = {"path": spath}
        try:
            st = Path(path).stat()
            row.update(size_bytes=st.st_size, mtime=st.st_mtime)
        except OSError:
            pass
        existing = self.archive.frame_by_path(spath)
        if existing is not None and (
            existing["status"] != "quarantined"
            or self.archive.known(spath, row.get("size_bytes", -1), row.get("mtime", -1.0))
        ):
            return
        quarantine(self.ws, row, FrameError("incomplete", reason))

    # -- guarded steps --------------------------------------------------------------------------------------------
    @contextmanager
    def _guard(self, stage: str, frames: list[dict[str, Any]]) -> Iterator[None]:
        """Isolate one step: an unexpected failure is counted, logged and, after MAX_TRIES, quarantined."""
        try:
            yield
        except Exception as exc:
            self.metrics.stage_errors.labels(stage=stage).inc()
            log.exception("%s failed for %s", stage, ", ".join(Path(f["path"]).name for f in frames))
            for f in frames:
                tries = (self.archive.scalar("SELECT tries FROM frames WHERE id = ?", [f["id"]]) or 0) + 1
                if tries >= MAX_TRIES:
                    err = FrameError("processing_error", f"{stage} failed {tries} times: {type(exc).__name__}: {exc}")
                    self.archive.update_frame(f["id"], tries=tries)
                    quarantine(self.ws, {"path": f["path"]}, err)
                else:
                    self.archive.update_frame(f["id"], tries=tries)
                    self.archive.event(stage, "error", f"{type(exc).__name__}: {exc} (try {tries})", frame_id=f["id"])

    def night_ended(self, night: str | None) -> bool:
        """True while ``end_night`` closes ``night``: sets build with what they have, lights stop waiting."""
        return self._ended is None or night in self._ended

    def work(self) -> bool:
        """Do the next unit of work; False when there was nothing to do."""
        if self.build_masters():
            return True
        lights = self.archive.query(
            "SELECT * FROM frames WHERE kind = 'light' AND status = 'ingested' ORDER BY date_obs, id LIMIT ?",
            [self.executor.batch],
        )
        if lights:
            self.calibrate_lights(lights)
            return True
        if self.masters_changed:
            self.masters_changed = False
            pending = self.archive.query(
                "SELECT * FROM frames WHERE kind = 'light' AND status = 'pending' ORDER BY date_obs, id"
            )
            if self.calibrate_lights(pending):
                return True
        calibrated = self.archive.query(  # as many as a local run with as many threads takes: the same decisions
            "SELECT * FROM frames WHERE kind = 'light' AND status = 'calibrated' ORDER BY date_obs, id LIMIT ?",
            [4 * self.executor.slots],
        )
        if calibrated:
            self.stack_lights(calibrated)
            return True
        for stack in self.stacker.quiet_stacks(self.config.stacking.final_after_seconds):
            with self._guard("stack", []):
                self.stacker.finalize_stack(stack)
            return True
        return False

    def build_masters(self) -> int:
        """Build the masters of the complete sets of the first kind that can be built now (bias, then
        darkflats, darks, flats: later kinds use earlier ones), on the workers if any; returns how many."""
        ready = list(self.sets.ready())
        for kind in CAL_KINDS:
            plans = []
            for s, why in ready:
                if s.kind == kind:
                    with self._guard("master", s.new_frames):
                        plan = self.sets.plan(s, why)
                        if plan is not None:
                            plans.append(plan)
            if plans:
                done = 0
                # in plan order: the masters' ids (named in the notes of what they calibrate) do not depend on
                # which worker finished first, and the next kind waits for this one anyway
                for d in self._map(compute_master, plans, ordered=True):
                    with self._guard("master", d.item.calset.new_frames):
                        if d.error is not None:
                            raise d.error
                        self.sets.record(d.item, d.value)
                        self.masters_changed = True
                        done += 1
                return done
        return 0

    def _map(
        self, fn: Callable[[Any], Any], items: list[Any], *, ordered: bool = False, small: bool = False
    ) -> Iterator[Done]:
        """``fn(item)`` for each item on the executor; each result (or error) as it comes back, or with
        ``ordered`` in the items' order, each as soon as those before it are back (``small``: short calls)."""
        done = self.executor.as_completed(fn, items, small=small)
        return in_order(done) if ordered else done

    def calibrate_lights(self, lights: list[dict[str, Any]]) -> int:
        """Calibrate the lights whose masters exist (on the workers, if any); returns how many were calibrated."""
        jobs = []
        for light in lights:
            with self._guard("calibrate", [light]):
                job = plan_light(self.ws, self.config.calibration, light, end_of_night=self.night_ended(light["night"]))
                if job is not None:
                    jobs.append(job)
        done = 0
        for d in self._map(compute_light, jobs):
            with self._guard("calibrate", [d.item.frame]):
                if isinstance(d.error, CalibrationError):
                    refuse_light(self.ws, d.item.frame, d.error)
                elif d.error is not None:
                    raise d.error
                else:
                    record_light(self.ws, d.item, d.value)
                    done += 1
        return done

    def stack_lights(self, lights: list[dict[str, Any]]) -> None:
        """Grade, judge, align and stack calibrated lights in time order: grading and aligning (reading, star
        detection, matching, warping, writing) on the workers, if any; judging, choosing references and
        recording on this thread."""
        jobs = []
        for light in lights:
            with self._guard("stack", [light]):
                job = self.stacker.grade_job(light)
                if job is not None:
                    jobs.append((light, job))
        for d in self._map(compute_grade, [j for _, j in jobs], ordered=True):
            light = jobs[d.index][0]
            with self._guard("stack", [light]):
                if d.error is not None:
                    raise d.error
                self.stacker.record_grade(light, d.value)
        accepted = []
        for light in lights:
            with self._guard("stack", [light]):
                row = self.archive.frame(light["id"])
                if row["status"] == "calibrated" and self.stacker.place(row):
                    accepted.append(row)
        aligns = []
        for light in accepted:
            with self._guard("stack", [light]):
                aligns.append((light, *self.stacker.align_job(light)))
        missed = self._align_and_record(aligns, last_try=False)
        if missed:  # once more, through the members aligned meanwhile (this batch's included)
            retry = []
            for light in missed:
                with self._guard("stack", [light]):
                    retry.append((light, *self.stacker.align_job(light, bridges=True)))
            self._align_and_record(retry, last_try=True)

    def _align_and_record(
        self, aligns: list[tuple[dict[str, Any], dict[str, Any], AlignJob]], *, last_try: bool
    ) -> list[dict[str, Any]]:
        """Align on the workers and record; the lights that matched nothing (rejected as unaligned on the last
        try, returned otherwise)."""
        missed = []
        for d in self._map(compute_align, [job for _, _, job in aligns], ordered=True):
            light, ref, _ = aligns[d.index]
            with self._guard("stack", [light]):
                if isinstance(d.error, AlignError):
                    if last_try:
                        self.stacker.unaligned(light, d.error)
                    else:
                        missed.append(light)
                elif d.error is not None:
                    raise d.error
                else:
                    self.stacker.record_placed(light, ref, d.value)
        return missed

    def ingest_many(self, paths: list[Path], *, progress: Callable[[], None] | None = None) -> None:
        """Ingest files in order, reading and hashing them on the executor's workers, then recording each in the
        order given (frame ids follow it, as the daemon's follow the order of arrival); a filter written several
        ways is filed under the batch's most used spelling (unless the archive already has one)."""
        todo = []
        for path in paths:
            path = Path(path).absolute()
            try:
                found = settled(self.ws, path)
            except Exception as exc:
                self._ingest_failed(path, exc)
                continue
            if found is not None:
                todo.append(FileJob(path, *found, self.classify_options))
        examined = list(self._map(examine, todo, ordered=True, small=True))
        names = FilterNames(keep_case=self.filter_names.keep_case)
        names.prefer(d.value.meta.filter for d in examined if d.value is not None and d.value.meta is not None)
        for d in examined:
            try:
                if d.error is not None:
                    raise d.error
                record(self.ws, d.value, names)
            except Exception as exc:
                self._ingest_failed(d.item.path, exc)
            if progress is not None:
                progress()

    def check_storage(self, raw_files: list[Path], raw_folders: list[Path] | None = None) -> None:
        """Stop (``SharedStorageError``) unless the executor's workers read the raw files and folders and read and
        write the archive's product folders at the same paths as this process (nothing to check for threads)."""
        if not self.executor.remote:
            return
        writable = [self.layout.root / name for name in COMPUTED_FOLDERS]
        self.executor.check_storage(make_probe(self.layout.root, raw_files, raw_folders or [], writable))

    def forget(self) -> None:
        """Drop what is held in memory (live stacks, masters): after the archive changed under us (reprocess)."""
        self.stacker.forget()
        MASTERS.clear()

    def close(self) -> None:
        """Release the threads this pipeline started (an executor given to it is the caller's to close)."""
        if self._owns_executor:
            self.executor.close()

    def run_until_idle(self, *, progress: Callable[[], None] | None = None) -> int:
        steps = 0
        while self.work():
            steps += 1
            if progress is not None:
                progress()
        return steps

    def end_night(self, night: str | None = None, *, progress: Callable[[], None] | None = None) -> None:
        """``night`` (None: every night) is over: build what can be built, calibrate what can be, final stacks."""
        self.run_until_idle(progress=progress)
        self._ended = None if night is None else {night}
        self.masters_changed = True
        try:
            self.run_until_idle(progress=progress)
            if night is None:
                nights = [
                    r["night"] for r in self.archive.query("SELECT DISTINCT night FROM stacks WHERE state = 'live'")
                ]
            else:
                nights = [night]
            for n in nights:
                jobs = []
                for stack in self.stacker.night_stacks(n):
                    with self._guard("stack", []):
                        job = self.stacker.plan_final(stack)
                        if job is not None:
                            jobs.append(job)
                for d in self._map(compute_final, jobs, ordered=True):
                    with self._guard("stack", []):
                        if d.error is not None:
                            raise d.error
                        self.stacker.record_final(d.item, d.value)
                    if progress is not None:
                        progress()
        finally:
            self._ended = set()

    # -- the clock of the night -----------------------------------------------------------------------------------
    def night_end_utc(self, night: str) -> datetime:
        """Local noon after the night began, in UTC (naive): the site of the config, else the longitude the
        night's frames state in their headers (as their night was found), else UTC."""
        noon = datetime.combine(date.fromisoformat(night) + timedelta(days=1), datetime.min.time()).replace(hour=12)
        site = self.config.site
        if site.timezone:
            return noon.replace(tzinfo=ZoneInfo(site.timezone)).astimezone(UTC).replace(tzinfo=None)
        lon = site.longitude if site.longitude is not None else self._header_longitude(night)
        if lon is not None:
            lon = (lon + 180.0) % 360.0 - 180.0
            return noon - timedelta(hours=lon / 15.0)
        return noon

    def _header_longitude(self, night: str) -> float | None:
        """The site longitude a frame of ``night`` states in its header (read once per night), or None."""
        if night not in self._night_longitude:
            row = self.archive.one(
                "SELECT path FROM frames WHERE night = ? AND kind IS NOT NULL AND status != 'quarantined' "
                "ORDER BY id LIMIT 1",
                [night],
            )
            found = None
            if row is not None:
                try:
                    found = header_longitude(read_frame_header(Path(row["path"])))
                except (OSError, FrameError, ValueError):
                    found = None
            self._night_longitude[night] = found[0] if found else None
        return self._night_longitude[night]

    def finished_nights(self) -> list[str]:
        """Nights with unfinished work whose local noon has passed."""
        now = datetime.now(UTC).replace(tzinfo=None)
        rows = self.archive.query(
            "SELECT DISTINCT night FROM stacks WHERE state = 'live' UNION "
            "SELECT DISTINCT night FROM frames WHERE status = 'pending' AND (reason NOT LIKE '%(night ended)')"
        )
        return [r["night"] for r in rows if r["night"] and self.night_end_utc(r["night"]) <= now]

    # -- gauges ---------------------------------------------------------------------------------------------------
    def queue_depth(self) -> int:
        return int(
            self.archive.scalar(
                "SELECT COUNT(*) FROM frames WHERE (kind = 'light' AND status IN ('ingested', 'calibrated'))"
            )
            or 0
        )

    def refresh_gauges(self, *, watcher_pending: int = 0) -> tuple[int, int]:
        """Set the queue and pending gauges; returns (queue depth, pending lights)."""
        queue = self.queue_depth() + watcher_pending
        pending = int(self.archive.scalar("SELECT COUNT(*) FROM frames WHERE status = 'pending'") or 0)
        self.metrics.queue_depth.set(queue)
        self.metrics.lights_pending.set(pending)
        newest = self.archive.scalar("SELECT MAX(night) FROM stacks")
        self.metrics.stacks_active.set(
            self.archive.scalar("SELECT COUNT(*) FROM stacks WHERE night = ?", [newest]) or 0 if newest else 0
        )
        return queue, pending

    def summary(self) -> dict[str, Any]:
        return {
            "frames": self.archive.counts(),
            "masters": {
                r["kind"]: r["n"] for r in self.archive.query("SELECT kind, COUNT(*) AS n FROM masters GROUP BY kind")
            },
            "stacks": self.archive.query(
                "SELECT object, filter, exptime, night, n_frames, state, path FROM stacks ORDER BY id"
            ),
            "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
