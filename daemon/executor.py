"""Where compute runs: on this process's threads (the default), or on the workers of a Dask cluster.

The pipeline plans on the archive's thread, hands each compute step (plain data in, plain data out; it writes
only its own products, atomically, under names fixed by the plan) to an :class:`Executor`, and records every
result on the archive's thread as it comes back. Both executors offer the same map,
:meth:`Executor.as_completed`: it keeps a window of tasks running (so workers never wait while the archive
records) and yields each :class:`Done` in completion order; :func:`in_order` gives them back in the order of the
items, each as soon as those before it are back, where the archive's ids must follow that order.

:class:`LocalExecutor` runs on a thread pool (one worker: inline, in order). :class:`DaskExecutor` submits to a
``dask.distributed`` scheduler (``tcp://host:8786``) or to a ``LocalCluster`` of worker processes it starts
(``local:N``). A worker lost mid-run costs only its tasks: the scheduler runs them again on another worker (up to
``distributed.scheduler.allowed-failures`` times, then the task fails with ``KilledWorker`` and the pipeline's
guard counts it like any other failure). Tasks are not retried on exceptions (``retries`` stays 0): an exception
is a decision (a refused calibration, a quarantined file) or a bug that the pipeline counts and records itself.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, NamedTuple

from nightshift.daemon.storagecheck import SharedStorageError, StorageProbe, check_storage, remove_probe

__all__ = [
    "DaskExecutor",
    "Done",
    "Executor",
    "ExecutorError",
    "LocalExecutor",
    "in_order",
    "parse_dask_address",
    "start_local_cluster",
]

log = logging.getLogger("nightshift.executor")

#: ``local:N`` or ``scheme://host:port``.
_LOCAL = re.compile(r"^local:(\d+)$")
_REMOTE = re.compile(r"^[a-z][a-z0-9+]*://\S+:\d+$")
#: How long a client waits for the scheduler to answer, and for a first worker to join it.
CONNECT_SECONDS = 30.0
WORKER_WAIT_SECONDS = 60.0
#: Set by Dask's nanny in its workers' environment by default; unset for the workers of ``local:N`` (and overridden
#: in every worker by :func:`keep_freed_memory`).
MALLOC_TRIM = "MALLOC_TRIM_THRESHOLD_"
#: Short calls (``small``) sent to a Dask worker in one task: a round trip costs a few milliseconds.
SMALL_PER_TASK = 8
SHARED_STORAGE_HINT = "every worker must reach the raw folders and the archive at the same paths (shared storage)"


class ExecutorError(RuntimeError):
    """The executor cannot run: Dask not installed, no scheduler at the address, no worker joined."""


class Done(NamedTuple):
    """One finished task: the item's position in the map, the item, and its result or its exception."""

    index: int
    item: Any
    value: Any
    error: Exception | None


def parse_dask_address(address: str) -> tuple[str, int | None]:
    """``"local:N"`` -> ("local", N); ``"tcp://host:port"`` -> (address, None); anything else: ValueError."""
    text = address.strip()
    m = _LOCAL.match(text)
    if m:
        n = int(m.group(1))
        if not 1 <= n <= 256:
            raise ValueError(f"local:N needs N from 1 to 256, got {n}")
        return "local", n
    if _REMOTE.match(text):
        return text, None
    raise ValueError(f'expected "local:N" or a scheduler address like "tcp://host:8786", got {address!r}')


def _run(fn: Callable[[Any], Any], item: Any) -> tuple[Any, Exception | None]:
    """Call ``fn(item)`` and hand back its result or its exception (one failure does not hide the others)."""
    try:
        return fn(item), None
    except Exception as exc:
        return None, exc


def in_order(done: Iterable[Done]) -> Iterator[Done]:
    """``done`` (indices 0..n-1, in any order) in the order of the items, each as soon as those before it are."""
    waiting: dict[int, Done] = {}
    nxt = 0
    for d in done:
        waiting[d.index] = d
        while nxt in waiting:
            yield waiting.pop(nxt)
            nxt += 1


class Executor:
    """Runs compute steps. ``slots``: how many run at once; ``in_flight_per_slot``: tasks handed out per slot (the
    ones behind the running one hide the round trip of a result); :attr:`batch`: the work the pipeline takes in
    one step. ``remote`` when steps run in other processes, maybe on other machines, which must share storage."""

    slots: int = 1
    in_flight_per_slot: int = 2
    batch_per_slot: int = 4
    remote: bool = False

    @property
    def batch(self) -> int:
        """Lights the pipeline plans and calibrates in one step."""
        return self.batch_per_slot * self.slots

    def as_completed(self, fn: Callable[[Any], Any], items: list[Any], *, small: bool = False) -> Iterator[Done]:
        """``fn(item)`` for every item; each :class:`Done` as it finishes (results or exceptions, never raised).
        ``small``: each call is short (tens of milliseconds), so a remote executor sends several per task."""
        raise NotImplementedError

    def check_storage(self, probe: StorageProbe) -> None:
        """Stop with :class:`SharedStorageError` unless every worker reaches what ``probe`` names."""

    def describe(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        """Release the workers (and a cluster this executor started)."""


def one_opencv_thread() -> None:
    """OpenCV (warps, filters) on the calling slot's own thread: the slots are the parallelism. Its default pool
    of one thread per core, under every slot, would oversubscribe the cores, and `[processing] workers = 1` would
    no longer leave the other cores to the capture program."""
    import cv2

    cv2.setNumThreads(1)


#: glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
#: Freed memory a process keeps for the next frame's arrays (beyond it, the top of the heap goes back).
KEEP_FREED_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Let this process reuse the memory of the last frame's arrays for the next one (glibc; elsewhere nothing).

    By default glibc maps every array above 32 MB afresh and unmaps it when freed, and worker threads get heaps
    of their own that map anything above 64 MB: each frame's pixels then land on pages new to the process, which
    the kernel must find and zero (on a virtual machine whose freed memory goes back to the host, several ms per
    MB: a 140 MB colour cube took 1-2 s to first touch on this project's VM, 0.02 s reused). Here arrays come
    from one heap shared by the threads and up to :data:`KEEP_FREED_BYTES` of freed memory stays with it:
    resident memory stays near the night's peak instead of falling between frames. Must run before the
    compute threads start. Returns whether glibc took the settings.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_ARENA_MAX, 1),
            (_M_MMAP_THRESHOLD, KEEP_FREED_BYTES),
            (_M_TRIM_THRESHOLD, KEEP_FREED_BYTES),
        )
    )


class LocalExecutor(Executor):
    """Threads of this process (numpy, FITS I/O, hashing and PNG encoding release the GIL); 1 = inline."""

    def __init__(self, workers: int = 1) -> None:
        keep_freed_memory()
        one_opencv_thread()
        self.slots = max(1, workers)
        self._pool = ThreadPoolExecutor(self.slots, thread_name_prefix="worker") if self.slots > 1 else None

    def describe(self) -> str:
        return f"{self.slots} thread(s) of this process"

    def as_completed(self, fn: Callable[[Any], Any], items: list[Any], *, small: bool = False) -> Iterator[Done]:
        if self._pool is None or len(items) < 2:
            for i, item in enumerate(items):
                yield Done(i, item, *_run(fn, item))
            return
        pool, todo = self._pool, iter(enumerate(items))
        running: dict[Future, tuple[int, Any]] = {}

        def top_up() -> None:
            while len(running) < self.in_flight_per_slot * self.slots and (nxt := next(todo, None)) is not None:
                running[pool.submit(_run, fn, nxt[1])] = nxt

        try:
            top_up()
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in sorted(finished, key=lambda f: running[f][0]):
                    i, item = running.pop(fut)
                    top_up()
                    yield Done(i, item, *fut.result())
        finally:
            for fut in running:
                fut.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _task(probe: StorageProbe | None, fn: Callable[[Any], Any], items: list[Any]) -> list[tuple[Any, Any]]:
    """What a Dask worker runs: check once that it reaches the shared storage, then ``fn(item)`` for each item,
    each result or exception kept apart (one item's failure is not its neighbours')."""
    if probe is not None:
        why = check_storage(probe)
        if why is not None:
            from distributed import get_worker

            raise SharedStorageError(f"dask worker {get_worker().address} {why}: {SHARED_STORAGE_HINT}")
    return [_run(fn, item) for item in items]


def start_local_cluster(n: int, **options: Any) -> Any:
    """A ``LocalCluster`` of ``n`` worker processes with one thread each (``local:N``), their environment without
    ``MALLOC_TRIM_THRESHOLD_`` (see :func:`keep_freed_memory`); the dashboard on a free port."""
    import dask
    from distributed import LocalCluster

    with dask.config.set({f"distributed.nanny.pre-spawn-environ.{MALLOC_TRIM}": None}):
        return LocalCluster(n_workers=n, threads_per_worker=1, processes=True, **{"dashboard_address": ":0", **options})


def _import_compute_steps() -> bool:
    """Import every step the pipeline composes on a worker, once, when the executor connects (astropy, scipy,
    sep: a few seconds that would otherwise delay each worker's first task); one OpenCV thread per worker thread;
    freed memory kept for the next frame (returns whether it is, see :func:`keep_freed_memory`)."""
    importlib.import_module("nightshift.daemon.pipeline")
    one_opencv_thread()
    return keep_freed_memory()


def _quiet_dask_logs() -> None:
    """Dask's own loggers through nightshift's handler (its format, text or JSON), at warning: a scheduler's and
    its workers' start and stop are not news; a worker lost is."""
    for name in ("distributed", "dask"):
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            logger.removeHandler(h)
        logger.propagate = True
        logger.setLevel(max(logging.WARNING, logging.getLogger().getEffectiveLevel()))


class DaskExecutor(Executor):
    """Tasks on a ``dask.distributed`` cluster; the client (this process) keeps the archive.

    Use :meth:`connect`. ``client`` is a connected ``distributed.Client``; ``cluster`` a ``LocalCluster`` this
    executor started and closes.
    """

    remote = True
    # a result travels worker -> scheduler -> client before the next task is submitted: more in flight (queued by
    # the scheduler, which hands each worker its next task at once), and bigger steps between the archive's plans
    in_flight_per_slot = 4
    batch_per_slot = 16

    def __init__(self, client: Any, cluster: Any = None, *, address: str = "") -> None:
        self.client = client
        self.cluster = cluster
        self.address = address or client.scheduler.address
        self.probe: StorageProbe | None = None
        self._slots = 1
        self._counted = 0.0
        self._count_threads()

    @classmethod
    def connect(
        cls, address: str, *, timeout: float = CONNECT_SECONDS, wait_seconds: float = WORKER_WAIT_SECONDS
    ) -> DaskExecutor:
        """Connect to the scheduler at ``address`` (waiting ``timeout`` seconds for it to answer and
        ``wait_seconds`` for a first worker), or start ``local:N`` (N worker processes, one thread each)."""
        try:
            from distributed import Client
        except ImportError:
            raise ExecutorError("--dask needs Dask's distributed scheduler: pip install 'nightshift[dask]'") from None
        _quiet_dask_logs()
        where, n = parse_dask_address(address)
        cluster = None
        try:
            if n is not None:
                cluster = start_local_cluster(n)
                client = Client(cluster)
            else:
                client = Client(where, timeout=timeout)
        except (OSError, TimeoutError) as exc:
            if cluster is not None:
                cluster.close()
            raise ExecutorError(f"cannot reach the Dask scheduler at {address}: {exc}") from None
        try:
            client.wait_for_workers(1, timeout=wait_seconds)
        except TimeoutError:
            client.close()
            if cluster is not None:
                cluster.close()
            raise ExecutorError(f"no Dask worker joined the scheduler at {address} within {wait_seconds:g} s") from None
        executor = cls(client, cluster, address=client.scheduler.address)
        plain = sorted(w for w, kept in client.run(_import_compute_steps).items() if not kept)
        if plain:
            log.warning(
                "%d Dask worker(s) could not be set to keep freed memory (not glibc): frame work there may take "
                "up to twice as long: %s",
                len(plain),
                ", ".join(plain),
            )
        return executor

    # -- the cluster ---------------------------------------------------------------------------------------------
    def _count_threads(self) -> None:
        self._slots = max(1, sum(self.client.nthreads().values()))
        self._counted = time.monotonic()

    @property
    def slots(self) -> int:  # type: ignore[override]
        """Threads of the workers now (counted again every few seconds: workers come and go)."""
        if time.monotonic() - self._counted > 5.0:
            self._count_threads()
        return self._slots

    def workers(self) -> list[str]:
        return sorted(self.client.nthreads())

    def dashboard(self) -> str | None:
        """The scheduler's dashboard, when it serves one (it needs bokeh on the scheduler's machine)."""
        try:
            services = self.client.scheduler_info().get("services", {})
        except Exception:  # pragma: no cover - a scheduler that does not answer: no link, the work still fails
            return None
        return self.client.dashboard_link if "dashboard" in services else None

    def describe(self) -> str:
        nthreads = self.client.nthreads()
        text = f"Dask scheduler {self.address}: {len(nthreads)} worker(s), {sum(nthreads.values())} thread(s)"
        if self.cluster is not None:
            text += " (a LocalCluster of worker processes)"
        link = self.dashboard()
        return text + (f"; dashboard {link}" if link else "; no dashboard (install bokeh where the scheduler runs)")

    # -- shared storage ------------------------------------------------------------------------------------------
    def check_storage(self, probe: StorageProbe) -> None:
        """Ask every worker now connected to reach ``probe``'s paths; every later task checks it too (once per
        worker process), so a worker that joins later cannot quietly read nothing or write elsewhere."""
        if self.probe is not None and self.probe != probe:
            remove_probe(self.probe)
        self.probe = probe
        answers = self.client.run(check_storage, probe)
        for worker, why in sorted(answers.items()):
            if why is not None:
                raise SharedStorageError(f"dask worker {worker} {why}: {SHARED_STORAGE_HINT}")

    # -- the map -------------------------------------------------------------------------------------------------
    def as_completed(self, fn: Callable[[Any], Any], items: list[Any], *, small: bool = False) -> Iterator[Done]:
        from distributed import as_completed

        if not items:
            return
        per_task = max(1, min(SMALL_PER_TASK, len(items) // (self.in_flight_per_slot * self.slots))) if small else 1
        numbered = list(enumerate(items))
        groups = iter([numbered[i : i + per_task] for i in range(0, len(numbered), per_task)])
        running: dict[str, tuple[Any, list[tuple[int, Any]]]] = {}  # key -> (future, [(index, item)])
        futures = as_completed()
        name = getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", "task")

        def top_up() -> None:
            while len(running) < self.in_flight_per_slot * self.slots and (group := next(groups, None)) is not None:
                work = [item for _, item in group]
                fut = self.client.submit(_task, self.probe, fn, work, key=f"{name}-{uuid.uuid4().hex}", pure=False)
                running[fut.key] = (fut, group)
                futures.add(fut)

        try:
            top_up()
            for fut in futures:
                _, group = running.pop(fut.key)
                if fut.status == "error":  # the task failed as a whole (its workers died: KilledWorker)
                    error = fut.exception()
                    if isinstance(error, SharedStorageError):
                        raise error
                    outcomes = [(None, error)] * len(group)
                elif fut.status == "finished":  # a failure to fetch the result is the cluster's: raised
                    outcomes = fut.result()
                else:
                    raise ExecutorError(f"the Dask cluster dropped task {fut.key} ({fut.status}): scheduler lost?")
                fut.release()
                top_up()
                for (i, item), (value, error) in zip(group, outcomes, strict=True):
                    yield Done(i, item, value, error)
        finally:
            futures.clear()
            if running:  # the caller stopped early (or failed): nobody wants these any more
                self.client.cancel([f for f, _ in running.values()])

    def close(self) -> None:
        if self.probe is not None:
            remove_probe(self.probe)
            self.probe = None
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()
