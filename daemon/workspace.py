"""What the daemon's steps share: the archive (its one writer), where products go, and the metrics.

The step modules (``intake``, ``calsets``, ``calibrating``, ``stacking``) take a :class:`Workspace` and the rules
they apply, never the :class:`~nightshift.daemon.pipeline.Pipeline` that composes them. A step that can run away
from the archive (on a worker thread, or a Dask worker) is split in three: *plan* reads the archive and returns
plain data, *compute* takes that plain data and returns plain data (it writes only its own products), *record*
writes the result into the archive. :class:`Timings` carries a compute step's stage durations back to the metrics.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from nightshift.daemon.archive import Archive
from nightshift.daemon.metrics import Metrics
from nightshift.daemon.products import Layout

__all__ = ["Timings", "Workspace"]


@dataclass
class Workspace:
    """The archive, the product layout of its folder, and the metrics: what every step writes to."""

    archive: Archive
    layout: Layout
    metrics: Metrics

    def observe(self, timings: Timings) -> None:
        """Put a compute step's stage durations into ``nightshift_stage_duration_seconds``."""
        for stage, seconds in timings.seconds:
            self.metrics.stage_duration_seconds.labels(stage=stage).observe(seconds)


@dataclass
class Timings:
    """Stage durations measured where the work ran, observed later by the archive's owner (plain data)."""

    seconds: list[tuple[str, float]] = field(default_factory=list)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds.append((name, time.perf_counter() - start))
