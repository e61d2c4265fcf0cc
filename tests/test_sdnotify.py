"""sd_notify messages arrive at a real unix datagram socket, and watchdog pings stop when the loop is stuck."""

from __future__ import annotations

import os
import queue
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from nightshift.daemon.sdnotify import Notifier, WatchdogGate, watchdog_interval


class Listener:
    """The systemd side: a bound datagram socket that reads what the notifier sends."""

    def __init__(self, address: str | bytes, sock: socket.socket) -> None:
        self.address = address
        self.sock = sock

    def receive(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        assert data.endswith("\n"), data
        return dict(line.split("=", 1) for line in data.splitlines())

    def nothing_pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(5)
        return False


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    path = tmp_path / "notify.sock"
    if len(os.fsencode(path)) > 100:  # sun_path holds 108 bytes
        path = Path(tempfile.mkdtemp(prefix="ns")) / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield Listener(str(path), sock)
    sock.close()


def notifier_for(listener: Listener, **env: str) -> Notifier:
    return Notifier(environ={"NOTIFY_SOCKET": str(listener.address), **env})


def test_ready_with_status(listener: Listener) -> None:
    notifier = notifier_for(listener)
    assert notifier.enabled
    assert notifier.ready("watching /srv/camera")
    assert listener.receive() == {"READY": "1", "STATUS": "watching /srv/camera"}


def test_status_stays_one_line(listener: Listener) -> None:
    notifier = notifier_for(listener)
    assert notifier.status("3 lights pending\nwaiting for flats")
    assert listener.receive() == {"STATUS": "3 lights pending waiting for flats"}


def test_send_arbitrary_fields(listener: Listener) -> None:
    notifier = notifier_for(listener)
    assert notifier.send(STATUS="ok", ERRNO=0)
    assert listener.receive() == {"STATUS": "ok", "ERRNO": "0"}


def test_stopping(listener: Listener) -> None:
    notifier = notifier_for(listener)
    assert notifier.stopping("shutting down")
    assert listener.receive() == {"STOPPING": "1", "STATUS": "shutting down"}


def test_reload_sends_reloading_with_monotonic_time_then_ready(listener: Listener) -> None:
    notifier = notifier_for(listener)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.ready()
    first, second = listener.receive(), listener.receive()
    assert first["RELOADING"] == "1"
    assert before <= int(first["MONOTONIC_USEC"]) <= after
    assert second == {"READY": "1"}


def test_abstract_socket() -> None:
    name = f"nightshift-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    try:
        notifier = Notifier(environ={"NOTIFY_SOCKET": "@" + name})
        assert notifier.address == b"\0" + name.encode()
        assert notifier.ready()
        assert sock.recv(4096) == b"READY=1\n"
    finally:
        sock.close()


def test_no_notify_socket_is_a_no_op() -> None:
    notifier = Notifier(environ={})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()
    assert notifier.ping_period is None


def test_send_to_a_vanished_socket_fails_quietly(tmp_path: Path) -> None:
    notifier = Notifier(environ={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.enabled
    assert notifier.ready() is False


def test_watchdog_interval_from_environment() -> None:
    me = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": me}) == 60.0
    assert watchdog_interval({"WATCHDOG_USEC": "60000000"}) == 60.0
    assert watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}) is None  # not for us
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({}) is None
    notifier = Notifier(environ={"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "60000000", "WATCHDOG_PID": me})
    assert notifier.ping_period == 30.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_gate_pings_only_after_progress_and_period(listener: Listener) -> None:
    notifier = notifier_for(listener)
    clock = FakeClock()
    gate = WatchdogGate(30.0, clock=clock)
    assert not gate.maybe_ping(notifier)  # no iteration completed yet
    gate.progress()
    assert gate.maybe_ping(notifier)
    assert listener.receive() == {"WATCHDOG": "1"}
    gate.progress()
    clock.now += 10
    assert not gate.maybe_ping(notifier)  # progress, but too soon after the last ping
    clock.now += 20
    assert gate.maybe_ping(notifier)
    assert listener.receive() == {"WATCHDOG": "1"}
    assert listener.nothing_pending()


def test_pings_stop_while_the_loop_is_stuck_and_resume_after(listener: Listener) -> None:
    """A real loop thread: it completes iterations, then hangs in one step; pings stop until it returns."""
    notifier = notifier_for(listener)
    clock = FakeClock()
    gate = WatchdogGate(30.0, clock=clock)
    work: queue.Queue[str] = queue.Queue()
    done: queue.Queue[str] = queue.Queue()
    hung, unhang = threading.Event(), threading.Event()

    def loop() -> None:
        while (item := work.get()) != "quit":
            if item == "hang":
                hung.set()
                unhang.wait(30)  # a step that does not return (a dead NFS read, a deadlock)
            gate.progress()
            done.put(item)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        for item in ("frame-1", "frame-2"):
            work.put(item)
            assert done.get(timeout=5) == item
            clock.now += 30
            assert gate.maybe_ping(notifier)
            assert listener.receive() == {"WATCHDOG": "1"}

        work.put("hang")
        assert hung.wait(5)
        for _ in range(4):  # two minutes of a stuck loop: no ping, so systemd's WatchdogSec=60 fires
            clock.now += 30
            assert not gate.maybe_ping(notifier)
        assert listener.nothing_pending()

        unhang.set()
        assert done.get(timeout=5) == "hang"
        clock.now += 30
        assert gate.maybe_ping(notifier)
        assert listener.receive() == {"WATCHDOG": "1"}
    finally:
        unhang.set()
        work.put("quit")
        thread.join(5)


def test_progress_survives_a_failed_ping(tmp_path: Path) -> None:
    path = tmp_path / "late.sock"
    notifier = Notifier(environ={"NOTIFY_SOCKET": str(path)})
    gate = WatchdogGate()
    gate.progress()
    assert not gate.maybe_ping(notifier)  # nobody listening yet
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    try:
        assert gate.maybe_ping(notifier)  # the progress made before still counts
        assert sock.recv(4096) == b"WATCHDOG=1\n"
    finally:
        sock.close()
