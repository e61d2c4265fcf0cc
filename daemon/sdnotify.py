"""Tell systemd how the daemon is doing: READY, RELOADING, STOPPING, STATUS and watchdog pings (sd_notify(3)).

A few lines of stdlib: the message is one datagram of ``KEY=value`` lines sent to the socket named by
``NOTIFY_SOCKET``. Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op, so the daemon runs the same
from a terminal. ``WatchdogGate`` makes the watchdog honest: a ping goes out only if the main loop really
completed an iteration since the previous ping, so a hung loop stops the pings and systemd restarts it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

__all__ = ["Notifier", "WatchdogGate", "watchdog_interval"]

log = logging.getLogger(__name__)


def _socket_address(value: str) -> str | bytes | None:
    """The address to send to, from a ``NOTIFY_SOCKET`` value; None if it names no unix socket."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout systemd expects pings within, in seconds, or None if the watchdog is off.

    Read from ``WATCHDOG_USEC``; ``WATCHDOG_PID``, when set, must be this process. Ping every half of it
    (``Notifier.ping_period``), as sd_watchdog_enabled(3) advises.
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 1_000_000


class Notifier:
    """Sends sd_notify messages to the socket in ``NOTIFY_SOCKET``; does nothing when it is unset.

    Parameters
    ----------
    environ
        Where to read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``; ``os.environ`` by default.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self.address = _socket_address(raw) if raw else None
        if raw and self.address is None:
            log.warning("NOTIFY_SOCKET=%r is not a unix socket; systemd notifications are off", raw)
        self.watchdog_timeout = watchdog_interval(env)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """True when there is a socket to notify."""
        return self.address is not None

    @property
    def ping_period(self) -> float | None:
        """Seconds between watchdog pings (half the timeout), or None if systemd set no watchdog."""
        return None if self.watchdog_timeout is None else self.watchdog_timeout / 2

    def send(self, **fields: object) -> bool:
        """Send one message of ``KEY=value`` lines; returns True if it was sent.

        A failure to send is logged, never raised: a notification must not take the daemon down.
        """
        if self.address is None or not fields:
            return False
        message = "".join(f"{key}={value}\n" for key, value in fields.items()).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(message, self.address)
            except OSError as exc:
                log.warning("systemd notification %s failed: %s", ",".join(fields), exc)
                return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Startup (or a reload) is finished: the archive is migrated and the watcher is up."""
        return self.send(READY=1, **_status(status))

    def reloading(self) -> bool:
        """A reload has begun; follow it with ``ready()`` when done."""
        return self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun."""
        return self.send(STOPPING=1, **_status(status))

    def status(self, text: str) -> bool:
        """A one-line status shown by ``systemctl status``."""
        return self.send(**_status(text))

    def watchdog(self) -> bool:
        """One watchdog ping. Prefer ``WatchdogGate.maybe_ping``, which pings only after real progress."""
        return self.send(WATCHDOG=1)

    def close(self) -> None:
        """Close the socket (it is reopened by the next ``send``)."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _status(text: str | None) -> dict[str, str]:
    # The protocol is line based: a newline in the text would start a new field.
    return {} if text is None else {"STATUS": " ".join(text.splitlines())}


class WatchdogGate:
    """Lets a watchdog ping through only after the main loop made progress.

    The loop calls ``progress()`` each time it really completes an iteration (an idle wait that timed out
    counts; a step that never returns does not). ``maybe_ping`` sends ``WATCHDOG=1`` only if there was
    progress since the last ping and at least ``period`` seconds passed, so a stuck loop goes silent.

    Parameters
    ----------
    period
        Minimum seconds between pings (``Notifier.ping_period``); None or 0 pings on every call with progress.
    clock
        Monotonic clock in seconds.
    """

    def __init__(self, period: float | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.period = period or 0.0
        self._clock = clock
        self._progressed = threading.Event()
        self._last_ping: float | None = None

    def progress(self) -> None:
        """The loop completed one iteration."""
        self._progressed.set()

    def maybe_ping(self, notifier: Notifier) -> bool:
        """Send ``WATCHDOG=1`` if the loop progressed since the last ping and the period has passed.

        Returns True if a ping was sent.
        """
        now = self._clock()
        if self._last_ping is not None and now - self._last_ping < self.period:
            return False
        if not self._progressed.is_set():
            return False
        self._progressed.clear()
        if not notifier.watchdog():
            self._progressed.set()  # not sent: the progress still counts for the next try
            return False
        self._last_ping = now
        return True
