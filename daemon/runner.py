"""The daemon's life: start, watch, work, report, reload, and stop cleanly.

Signals only set flags (SIGTERM/SIGINT: stop after the current step; SIGHUP: reload the configuration, keeping
the old one if the new one is bad). The main loop is the only place work happens, and the only place the
systemd watchdog is fed from, so a hung loop stops the pings and gets the service restarted.
"""

from __future__ import annotations

import logging
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from nightshift.daemon.archive import Archive
from nightshift.daemon.config import Config, ConfigError, load_config
from nightshift.daemon.metrics import Metrics
from nightshift.daemon.pipeline import Pipeline
from nightshift.daemon.report import NightReports
from nightshift.daemon.sdnotify import Notifier, WatchdogGate
from nightshift.daemon.watcher import FolderWatcher, Incomplete, WatchOptions

__all__ = ["Daemon", "watch_options"]

log = logging.getLogger("nightshift.daemon")

GAUGE_PERIOD = 2.0  # seconds between refreshes of the gauges and the systemd STATUS line
DISK_PERIOD = 5.0  # seconds between free-space checks
NIGHT_PERIOD = 60.0  # seconds between checks for nights that have ended


def watch_options(config: Config) -> WatchOptions:
    w = config.watch
    return WatchOptions(
        paths=[Path(p) for p in w.paths],
        include=list(w.include),
        exclude=list(w.exclude),
        quiet_seconds=w.quiet_seconds,
        incomplete_timeout=w.incomplete_timeout_seconds,
        polling=w.observer == "polling",
        poll_interval=w.poll_interval_seconds,
        rescan_interval=w.rescan_interval_seconds,
    )


class Daemon:
    """``nightshift run``: one archive, one or more watched folders, one main loop."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: Path | None = None,
        overrides: dict | None = None,
        metrics_listen: str | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.overrides = overrides or {}
        self.metrics_listen = metrics_listen
        self.stop_event = threading.Event()
        self.reload_requested = False
        self.paused = False
        self.notifier = Notifier()
        self.metrics_address: tuple[str, int] | None = None
        self.reports: NightReports | None = None  # the night reports, kept up to date while running

    # -- signals --------------------------------------------------------------------------------------------------
    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: finishing the current step, then stopping", signal.Signals(signum).name)
        self.stop_event.set()

    def _on_hup(self, _signum: int, _frame: FrameType | None) -> None:
        self.reload_requested = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)

    def _reload(self, pipeline: Pipeline, watcher: FolderWatcher) -> FolderWatcher:
        self.reload_requested = False
        self.notifier.reloading()
        try:
            new = load_config(self.config_path, overrides=self.overrides)
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            self.notifier.ready(f"reload failed: {exc}")
            return watcher
        if Path(new.archive.path).resolve() != Path(self.config.archive.path).resolve():
            log.warning("reload: the archive path cannot change while running; restart to move it")
            new.archive.path = self.config.archive.path
        old_watch = watch_options(self.config)
        self.config = new
        pipeline.apply_config(new)
        if watch_options(new) != old_watch:
            watcher.stop()
            watcher = FolderWatcher(watch_options(new), known=pipeline.archive.known)
            watcher.start()
        log.info("configuration reloaded from %s", new.source)
        self.notifier.ready("configuration reloaded")
        return watcher

    # -- the loop -------------------------------------------------------------------------------------------------
    def _disk_low(self, root: Path, metrics: Metrics) -> bool:
        limit = self.config.archive.min_free_mb * 2**20
        try:
            free = shutil.disk_usage(root).free
        except OSError as exc:
            log.error("cannot read free space of %s: %s", root, exc)
            return self.paused
        low = free < limit
        if low and not self.paused:
            log.warning(
                "archive disk low: %.0f MB free < %.0f MB; processing paused (raw files are safe where they are)",
                free / 2**20,
                limit / 2**20,
            )
        elif not low and self.paused:
            log.info("archive disk has %.0f MB free again; processing resumes", free / 2**20)
        metrics.processing_paused.set(1 if low else 0)
        return low

    def run(self, *, until: Callable[[Pipeline], bool] | None = None) -> int:
        """Run until SIGTERM/SIGINT (or ``until(pipeline)`` is true); returns the exit code."""
        root = Path(self.config.archive.path)
        archive = Archive(root)
        metrics = Metrics()
        metrics.watch_archive_free(root)
        listen = self.metrics_listen if self.metrics_listen is not None else self.config.metrics.listen
        pipeline = Pipeline(self.config, archive, metrics, workers=self.config.processing.workers)
        self.reports = NightReports(archive)
        watcher = FolderWatcher(watch_options(self.config), known=archive.known)
        try:
            self.metrics_address = metrics.start_server(listen)
            watcher.start()
            metrics.watcher_alive.set(1)
            log.info(
                "watching %s; archive %s (schema v%d)",
                ", ".join(self.config.watch.paths),
                root,
                archive.schema_version,
            )
            self.notifier.ready(f"watching {len(self.config.watch.paths)} folder(s)")
            self._loop(pipeline, watcher, metrics, until)
            if not self.paused:
                self.reports.refresh()  # the pages show the nights as they are when the daemon stops
        finally:
            self.notifier.stopping("stopping")
            watcher.stop()
            pipeline.close()
            metrics.stop()
            archive.close()
            log.info("stopped; archive closed")
        return 0

    def _loop(
        self,
        pipeline: Pipeline,
        watcher: FolderWatcher,
        metrics: Metrics,
        until: Callable[[Pipeline], bool] | None,
    ) -> None:
        gate = WatchdogGate(self.notifier.ping_period)
        next_gauges = next_disk = next_nights = next_watcher_check = 0.0
        root = Path(self.config.archive.path)
        next_report = time.monotonic() + self.config.report.interval_seconds
        while not self.stop_event.is_set():
            now = time.monotonic()
            if self.reload_requested:
                watcher = self._reload(pipeline, watcher)
                next_disk = 0.0
            if now >= next_disk:
                next_disk = now + DISK_PERIOD
                self.paused = self._disk_low(root, metrics)
            if not self.paused:  # while paused the watcher keeps its events; the raw files wait where they are
                for item in watcher.poll():
                    if isinstance(item, Incomplete):
                        pipeline.quarantine_incomplete(item.path, item.reason)
                    else:
                        pipeline.ingest(item.path, size=item.size, mtime=item.mtime)
            if now >= next_watcher_check:
                next_watcher_check = now + 5.0
                metrics.watcher_alive.set(1 if watcher.alive else 0)
                if watcher.last_scan:
                    metrics.last_scan_timestamp_seconds.set(watcher.last_scan)
                if not watcher.alive:
                    log.error("the folder watcher stopped; restarting it")
                    watcher.stop()
                    watcher = FolderWatcher(watch_options(self.config), known=pipeline.archive.known)
                    try:
                        watcher.start()
                    except OSError as exc:
                        log.error("cannot restart the watcher: %s", exc)
            did = False
            if not self.paused:
                did = pipeline.work()
                if now >= next_nights:
                    next_nights = now + NIGHT_PERIOD
                    for night in pipeline.finished_nights():
                        log.info("night %s is over: final masters, calibrations and stacks", night)
                        pipeline.end_night(night)
                        metrics.new_night()
                        self.reports.write(night)
                interval = self.config.report.interval_seconds
                if interval > 0 and now >= next_report:
                    next_report = now + interval
                    self.reports.refresh()
            gate.progress()
            gate.maybe_ping(self.notifier)
            if now >= next_gauges:
                next_gauges = now + GAUGE_PERIOD
                queue, pending = pipeline.refresh_gauges(watcher_pending=watcher.pending)
                last = pipeline.archive.one("SELECT path FROM frames ORDER BY id DESC LIMIT 1")
                self.notifier.status(
                    f"{'PAUSED (disk low); ' if self.paused else ''}queue {queue}, pending lights {pending}, "
                    f"last frame {Path(last['path']).name if last else '-'}"
                )
            if until is not None and not did and watcher.pending == 0 and until(pipeline):
                break
            if self.paused:
                self.stop_event.wait(DISK_PERIOD)  # not watcher.wait: its unread events would wake it at once
            elif not did:
                watcher.wait(1.0)
