"""The Prometheus metrics of nightshift: the catalogue, its bounded labels, and the endpoint that serves it.

Metric names are a public contract (dashboards and alerts use them). Every metric lives on the ``Metrics``
object's own ``CollectorRegistry``, never the global one, so tests and several pipelines in one process do not
collide. Each metric is an attribute named after it without the ``nightshift_`` prefix and ``_total`` suffix
(``metrics.frames_ingested`` is ``nightshift_frames_ingested_total``).

Labels are bounded: ``kind`` and ``stage`` take a fixed vocabulary (anything else is a programming error
and raises ValueError); ``reason`` takes a short code, and a sentence such as ``"cloudy: 3 stars < 5"`` is
reduced to its code (``cloudy``), with codes outside the vocabulary counted as ``other``. File names, header
values and free text never become label values. The one label keyed by an archive id, ``stack_id`` of
``nightshift_stack_frames``, holds the current night's stacks only and is cleared by ``new_night()``.
"""

from __future__ import annotations

import logging
import math
import platform
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from nightshift.daemon.config import parse_listen
from nightshift.service.frame import KINDS, QUARANTINE_REASONS
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from prometheus_client.metrics import MetricWrapperBase

__all__ = [
    "CATALOGUE",
    "MASTER_KINDS",
    "OTHER",
    "REJECT_REASONS",
    "STAGES",
    "MetricSpec",
    "Metrics",
    "reason_code",
]

log = logging.getLogger(__name__)

#: Pipeline stages, in order; the ``stage`` label.
STAGES = ("ingest", "master", "calibrate", "grade", "align", "stack", "preview")
#: Kinds a master is built for; the ``kind`` label of nightshift_masters_built_total.
MASTER_KINDS = ("bias", "dark", "flat", "darkflat")
#: Why a light is kept out of the stack; the ``reason`` label of rejections. The codes are the words before the
#: colon of the archive's reasons: service.grade.judge's sentences, and "unaligned: ..." for alignment failures.
REJECT_REASONS = (
    "bright_sky",  # sky far above the group's (twilight, moon)
    "cloudy",  # too few stars, or stars too faint
    "trailed",  # elongated stars (tracking, wind)
    "blurred",  # FWHM far above the group's (focus, seeing)
    "unaligned",  # no transform to the stack's reference (too few stars, no matching pattern)
)
#: The ``reason`` value for a code outside the vocabulary.
OTHER = "other"
#: Stage durations from 10 ms (a header read) to minutes (a big stack).
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)


@dataclass(frozen=True)
class MetricSpec:
    """One metric of the catalogue: full name, type, help text and, per label, its vocabulary.

    A vocabulary of None means the label is not a fixed word list (only ``stack_id``, bounded by the night).
    """

    name: str
    type: str  # counter, gauge, histogram
    help: str
    labels: dict[str, tuple[str, ...] | None] = field(default_factory=dict)

    @property
    def attribute(self) -> str:
        """The ``Metrics`` attribute holding this metric."""
        return self.name.removeprefix("nightshift_").removesuffix("_total")


#: The catalogue: every nightshift metric (besides nightshift_build_info and the process_/python_ collectors).
CATALOGUE: tuple[MetricSpec, ...] = (
    MetricSpec("nightshift_files_seen_total", "counter", "Files noticed in the watched folders."),
    MetricSpec(
        "nightshift_frames_ingested_total",
        "counter",
        "Frames read and recorded in the archive, by kind.",
        {"kind": KINDS},
    ),
    MetricSpec(
        "nightshift_frames_quarantined_total",
        "counter",
        "Files kept aside as unusable input, by reason.",
        {"reason": QUARANTINE_REASONS},
    ),
    MetricSpec(
        "nightshift_frames_rejected_total",
        "counter",
        "Lights kept out of the stack by grading or alignment, by reason.",
        {"reason": REJECT_REASONS},
    ),
    MetricSpec(
        "nightshift_frames_duplicate_total",
        "counter",
        "Files with the same content as a frame already archived.",
    ),
    MetricSpec(
        "nightshift_masters_built_total",
        "counter",
        "Master calibration frames built, by kind.",
        {"kind": MASTER_KINDS},
    ),
    MetricSpec("nightshift_frames_calibrated_total", "counter", "Lights calibrated."),
    MetricSpec("nightshift_frames_aligned_total", "counter", "Lights aligned to their stack's reference."),
    MetricSpec("nightshift_frames_stacked_total", "counter", "Lights added to a stack."),
    MetricSpec(
        "nightshift_stage_errors_total",
        "counter",
        "Unexpected failures of a pipeline stage, by stage.",
        {"stage": STAGES},
    ),
    MetricSpec("nightshift_lights_pending", "gauge", "Lights waiting for a master they need."),
    MetricSpec("nightshift_queue_depth", "gauge", "Files and lights waiting to be processed."),
    MetricSpec(
        "nightshift_stage_duration_seconds",
        "histogram",
        "Time spent in one run of a pipeline stage, by stage.",
        {"stage": STAGES},
    ),
    MetricSpec(
        "nightshift_newest_frame_timestamp_seconds",
        "gauge",
        "File time (mtime, Unix seconds, never in the future) of the newest frame ingested; 0 before the first.",
    ),
    MetricSpec(
        "nightshift_newest_frame_age_seconds",
        "gauge",
        "Seconds since the newest frame ingested was written, at scrape time; NaN before the first.",
    ),
    MetricSpec("nightshift_stacks_active", "gauge", "Stacks of the newest observing night in the archive."),
    MetricSpec(
        "nightshift_stack_frames",
        "gauge",
        "Frames in each stack of the current observing night, by archive stack id.",
        {"stack_id": None},
    ),
    MetricSpec(
        "nightshift_archive_free_bytes",
        "gauge",
        "Free bytes on the file system holding the archive; NaN if unknown.",
    ),
    MetricSpec(
        "nightshift_processing_paused",
        "gauge",
        "1 while processing is paused because the archive disk is low.",
    ),
    MetricSpec("nightshift_watcher_alive", "gauge", "1 while the folder watcher is running, 0 when it is down."),
    MetricSpec(
        "nightshift_last_scan_timestamp_seconds",
        "gauge",
        "Time (Unix seconds) the last full sweep of the watched folders ended.",
    ),
)

_BUILD_INFO_HELP = "nightshift version and Python version; the value is always 1."


def reason_code(reason: str, vocabulary: tuple[str, ...]) -> str:
    """The bounded label value for ``reason``: a code, or the code before the colon of a sentence.

    ``"bright sky: background 900 > 2 x group median 300"`` gives ``bright_sky``; a code outside
    ``vocabulary`` gives ``other``.
    """
    code = reason.split(":", 1)[0].strip().lower().replace(" ", "_").replace("-", "_")
    return code if code in vocabulary else OTHER


class _BoundedLabels(MetricWrapperBase):
    """A metric whose label values are checked against the catalogue's vocabulary in ``labels()``."""

    _vocabulary: dict[str, tuple[str, ...] | None]
    _warned: set[str]

    def labels(self, *labelvalues: Any, **labelkwargs: Any) -> Any:
        vocab = getattr(self, "_vocabulary", None)
        if vocab is None:
            return super().labels(*labelvalues, **labelkwargs)
        values = dict(zip(self._labelnames, labelvalues, strict=True)) if labelvalues else dict(labelkwargs)
        for name, value in values.items():
            values[name] = self._bounded(name, value, vocab.get(name))
        return super().labels(**values)

    def _bounded(self, name: str, value: Any, allowed: tuple[str, ...] | None) -> str:
        if allowed is None:
            if name == "stack_id" and not str(value).isdigit():
                raise ValueError(f"{self._name}: stack_id must be an archive integer id, got {value!r}")
            return str(value)
        if name == "reason":
            code = reason_code(str(value), allowed)
            if code == OTHER and str(value) != OTHER and str(value) not in self._warned:
                self._warned.add(str(value))
                log.warning("%s: reason %r is not in the vocabulary; counted as %r", self._name, value, OTHER)
            return code
        if value not in allowed:
            raise ValueError(f"{self._name}: {name}={value!r} is not one of {', '.join(allowed)}")
        return str(value)


class _Counter(_BoundedLabels, Counter):
    pass


class _Gauge(_BoundedLabels, Gauge):
    pass


class _Histogram(_BoundedLabels, Histogram):
    pass


def _package_version() -> str:
    try:
        return metadata.version("nightshift")
    except metadata.PackageNotFoundError:
        return "unknown"


class Metrics:
    """Every nightshift metric on one private registry, with the helpers the daemon needs.

    Labelled series of a fixed vocabulary are created at zero up front, so rates and alerts work before the
    first event. Attributes are the metrics themselves, named as in the module docstring.
    """

    files_seen: Counter
    frames_ingested: Counter
    frames_quarantined: Counter
    frames_rejected: Counter
    frames_duplicate: Counter
    masters_built: Counter
    frames_calibrated: Counter
    frames_aligned: Counter
    frames_stacked: Counter
    stage_errors: Counter
    lights_pending: Gauge
    queue_depth: Gauge
    stage_duration_seconds: Histogram
    newest_frame_timestamp_seconds: Gauge
    newest_frame_age_seconds: Gauge
    stacks_active: Gauge
    stack_frames: Gauge
    archive_free_bytes: Gauge
    processing_paused: Gauge
    watcher_alive: Gauge
    last_scan_timestamp_seconds: Gauge
    build_info: Info

    def __init__(self) -> None:
        # No *_created series: they double the series count and no dashboard or alert of ours reads them.
        # (A process-wide switch of prometheus_client; nightshift has no other metrics.)
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self._lock = threading.Lock()
        self._newest_frame = 0.0
        self._server: Any = None
        self._thread: threading.Thread | None = None
        for spec in CATALOGUE:
            setattr(self, spec.attribute, self._make(spec))
        self.build_info = Info("nightshift_build", _BUILD_INFO_HELP, registry=self.registry)
        self.build_info.info({"version": _package_version(), "python": platform.python_version()})
        self.newest_frame_timestamp_seconds.set_function(lambda: self._newest_frame)
        self.newest_frame_age_seconds.set_function(self._newest_frame_age)
        self.archive_free_bytes.set(math.nan)

    def _make(self, spec: MetricSpec) -> MetricWrapperBase:
        cls = {"counter": _Counter, "gauge": _Gauge, "histogram": _Histogram}[spec.type]
        extra = {"buckets": DURATION_BUCKETS} if spec.type == "histogram" else {}
        metric = cls(spec.name, spec.help, labelnames=tuple(spec.labels), registry=self.registry, **extra)
        metric._vocabulary = dict(spec.labels)
        metric._warned = set()
        if len(spec.labels) == 1:
            (vocab,) = spec.labels.values()
            for value in vocab or ():
                metric.labels(value)
        return metric

    # --- helpers -------------------------------------------------------------------------------------------

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time one run of stage ``name`` into nightshift_stage_duration_seconds (failed runs too).

        Only times: a failure is counted in ``stage_errors`` by the code that handles it, which knows whether
        it was the stage's fault or the input's (a quarantine).
        """
        histogram = self.stage_duration_seconds.labels(stage=name)
        start = time.perf_counter()
        try:
            yield
        finally:
            histogram.observe(time.perf_counter() - start)

    def set_newest_frame(self, timestamp: float) -> None:
        """Record the file time of an ingested frame (Unix seconds); the newest one is kept."""
        with self._lock:
            self._newest_frame = max(self._newest_frame, float(timestamp))

    def _newest_frame_age(self) -> float:
        newest = self._newest_frame
        return time.time() - newest if newest > 0 else math.nan

    def set_stack_frames(self, stack_id: int, frames: int) -> None:
        """Frames now in stack ``stack_id`` (its archive id) of the current night."""
        self.stack_frames.labels(stack_id=int(stack_id)).set(frames)

    def new_night(self) -> None:
        """The observing night changed: forget the previous night's per-stack series."""
        self.stack_frames.clear()

    def watch_archive_free(self, path: str | Path) -> None:
        """Report free bytes of the file system holding ``path`` at each scrape (NaN if it cannot be read)."""

        def free() -> float:
            try:
                return float(shutil.disk_usage(path).free)
            except OSError:
                return math.nan

        self.archive_free_bytes.set_function(free)

    # --- exposition ----------------------------------------------------------------------------------------

    def render(self) -> bytes:
        """The registry in the Prometheus text format, as a scrape would see it."""
        return generate_latest(self.registry)

    def exported_names(self) -> frozenset[str]:
        """Every metric name a scrape can contain (series names, with ``_total``/``_bucket``/... suffixes)."""
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_count", "_sum"),
            "info": ("_info",),
        }
        names: set[str] = set()
        for family in self.registry.collect():
            names.update(family.name + s for s in suffixes.get(family.type, ("",)))
            names.update(s.name for s in family.samples)
        return frozenset(names)

    def start_server(self, listen: str) -> tuple[str, int] | None:
        """Serve /metrics on ``listen`` (``"host:port"``); ``"off"`` or port 0 serve nothing: returns None.

        Returns the (host, port) the server is bound to.
        """
        where = parse_listen(listen)
        if where is None:
            return None
        if self._server is not None:
            raise RuntimeError("the metrics server is already running")
        host, port = where
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        bound_host, bound_port = self._server.server_address[:2]
        log.info("metrics on http://%s:%d/metrics", host, bound_port)
        return bound_host, bound_port

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the metrics server, if running."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout)
        self._server = self._thread = None
