"""sd_notify against a real unix datagram socket standing in for systemd's NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import math
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from tradecanvas.ops.metrics import Metrics
from tradecanvas.ops.sd_notify import SdNotifier, notify_address, run_watchdog
from tradecanvas.runtime_flags import build_runtime_flags


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET: a bound, non-blocking SOCK_DGRAM socket."""

    def __init__(self, sock: socket.socket, notify_socket: str) -> None:
        self.sock = sock
        self.notify_socket = notify_socket

    def messages(self) -> list[str]:
        """Every datagram received so far (never waits: sendto is synchronous)."""
        out: list[str] = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return out


@pytest.fixture
def abstract_systemd() -> Iterator[FakeSystemd]:
    name = f"tradecanvas-test-{os.getpid()}-{os.urandom(4).hex()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.setblocking(False)
        yield FakeSystemd(sock, "@" + name)


@pytest.fixture
def path_systemd() -> Iterator[FakeSystemd]:
    # a short directory: unix socket paths are limited to 107 bytes, tmp_path can be longer
    with tempfile.TemporaryDirectory(prefix="tcsd") as directory:
        path = str(Path(directory) / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.setblocking(False)
            yield FakeSystemd(sock, path)


def test_path_socket_gets_ready_status_watchdog_and_stopping(path_systemd: FakeSystemd) -> None:
    n = SdNotifier(path_systemd.notify_socket)
    assert n.enabled
    assert n.ready(status="ingesting 1 series")
    assert n.status("flushed 12 candles")
    assert n.watchdog()
    assert n.stopping()
    assert path_systemd.messages() == [
        "READY=1\nSTATUS=ingesting 1 series",
        "STATUS=flushed 12 candles",
        "WATCHDOG=1",
        "STOPPING=1",
    ]
    stats = n.statistics()
    assert (stats.sent, stats.failed, stats.last_status) == (4, 0, "flushed 12 candles")


def test_abstract_socket_names_start_with_at(abstract_systemd: FakeSystemd) -> None:
    assert notify_address(abstract_systemd.notify_socket) == (
        b"\0" + abstract_systemd.notify_socket[1:].encode()
    )
    n = SdNotifier(abstract_systemd.notify_socket)
    assert n.ready()
    assert n.stopping(status="draining")
    assert abstract_systemd.messages() == ["READY=1", "STOPPING=1\nSTATUS=draining"]


def test_status_text_cannot_inject_other_assignments(abstract_systemd: FakeSystemd) -> None:
    n = SdNotifier(abstract_systemd.notify_socket)
    n.status("upstream down\nREADY=1\r\nWATCHDOG=1")
    assert abstract_systemd.messages() == ["STATUS=upstream down READY=1 WATCHDOG=1"]


def test_nothing_happens_without_notify_socket() -> None:
    for value in (None, ""):
        n = SdNotifier(value, watchdog_usec=30_000_000)
        assert not n.enabled
        assert n.watchdog_interval_s is None
        assert not n.ready()
        assert not n.status("x")
        assert not n.watchdog()
        assert not n.stopping()
        assert n.statistics().sent == n.statistics().failed == 0


@pytest.mark.parametrize("value", ["vsock:2:1234", "relative/path", "@"])
def test_unusable_notify_socket_values_disable_notification(
    value: str, caplog: pytest.LogCaptureFixture
) -> None:
    n = SdNotifier(value)
    assert not n.enabled
    assert not n.ready()
    assert "not notifying" in caplog.text


def test_a_missing_listener_is_logged_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = SdNotifier(str(tmp_path / "nobody-listens"))
    assert n.enabled
    for _ in range(3):
        assert not n.watchdog()
    assert n.statistics().failed == 3
    assert len([r for r in caplog.records if "systemd notify failed" in r.message]) == 1


def test_from_flags_uses_half_the_watchdog_period(abstract_systemd: FakeSystemd) -> None:
    flags = build_runtime_flags(
        {
            "NOTIFY_SOCKET": abstract_systemd.notify_socket,
            "WATCHDOG_USEC": "30000000",
            "WATCHDOG_PID": str(os.getpid()),
        }
    ).flags
    n = SdNotifier.from_flags(flags)
    assert n.enabled
    assert n.watchdog_interval_s == 15.0
    # no WATCHDOG_USEC: no watchdog
    assert SdNotifier(abstract_systemd.notify_socket).watchdog_interval_s is None
    # the watchdog is meant for another process
    other = build_runtime_flags(
        {"NOTIFY_SOCKET": abstract_systemd.notify_socket, "WATCHDOG_USEC": "30000000",
         "WATCHDOG_PID": "1"}
    ).flags  # fmt: skip
    assert SdNotifier.from_flags(other).watchdog_interval_s is None


async def test_watchdog_pings_only_while_progressing(
    abstract_systemd: FakeSystemd,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    n = SdNotifier(abstract_systemd.notify_socket, watchdog_usec=30_000_000)
    interval = n.watchdog_interval_s
    assert interval == 15.0
    progressing = True
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(run_watchdog, n, interval_s=interval, is_progressing=lambda: progressing)
        )
        assert abstract_systemd.messages() == ["WATCHDOG=1"]  # at start
        await trio.sleep(3 * interval + 1)
        assert abstract_systemd.messages() == ["WATCHDOG=1"] * 3

        progressing = False  # e.g. a flush pending for too long
        await trio.sleep(4 * interval)
        assert abstract_systemd.messages() == []
        stuck_logs = [r for r in caplog.records if "withholding" in r.message]
        assert len(stuck_logs) == 1  # logged once per stall, not per tick
        assert stuck_logs[0].levelno == logging.ERROR

        progressing = True
        await trio.sleep(2 * interval)
        assert abstract_systemd.messages() == ["WATCHDOG=1"] * 2
        assert "pings resumed" in caplog.text
        nursery.cancel_scope.cancel()


async def test_watchdog_does_not_ping_at_start_when_not_progressing(
    abstract_systemd: FakeSystemd, autojump_clock: trio.testing.MockClock
) -> None:
    n = SdNotifier(abstract_systemd.notify_socket)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_watchdog, n, interval_s=1.0, is_progressing=lambda: False))
        await trio.sleep(10)
        assert abstract_systemd.messages() == []
        nursery.cancel_scope.cancel()


async def test_a_blocked_event_loop_sends_no_pings(abstract_systemd: FakeSystemd) -> None:
    """Real clock: the pings come from a trio task, so blocking the loop stops them."""
    n = SdNotifier(abstract_systemd.notify_socket)
    interval = 0.02
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(run_watchdog, n, interval_s=interval, is_progressing=lambda: True)
        )
        abstract_systemd.messages()
        time.sleep(15 * interval)  # noqa: ASYNC251 -- deliberately block the event loop
        assert abstract_systemd.messages() == []  # a thread-based pinger would have sent ~15
        # the loop runs again: the overdue tick pings at once
        await trio.testing.wait_all_tasks_blocked()
        assert abstract_systemd.messages() == ["WATCHDOG=1"]
        nursery.cancel_scope.cancel()


async def test_a_late_tick_is_reported_as_a_blocked_loop(
    abstract_systemd: FakeSystemd,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    n = SdNotifier(abstract_systemd.notify_socket)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_watchdog, n, interval_s=15.0, is_progressing=lambda: True))
        # time passes without the loop running a single task: what a blocked loop looks like
        autojump_clock.jump(60)
        assert abstract_systemd.messages() == ["WATCHDOG=1"]  # only the one at start
        await trio.testing.wait_all_tasks_blocked()
        assert abstract_systemd.messages() == ["WATCHDOG=1"]  # the late tick pings once
        assert "event loop was blocked: watchdog tick 45.0 s late" in caplog.text
        nursery.cancel_scope.cancel()


async def test_watchdog_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        await run_watchdog(SdNotifier(None), interval_s=0, is_progressing=lambda: True)


def ping_age(metrics: Metrics) -> float:
    for line in metrics.render().decode().splitlines():
        if line.startswith("tradecanvas_watchdog_last_ping_age_seconds "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no tradecanvas_watchdog_last_ping_age_seconds")


async def test_the_watchdog_ping_age_gauge_grows_while_pings_are_withheld(
    abstract_systemd: FakeSystemd, autojump_clock: trio.testing.MockClock
) -> None:
    n = SdNotifier(abstract_systemd.notify_socket)
    metrics = Metrics()
    assert math.isnan(ping_age(metrics))  # no watchdog yet
    progressing = True
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(
                run_watchdog,
                n,
                interval_s=2.0,
                is_progressing=lambda: progressing,
                metrics=metrics,
            )
        )
        assert ping_age(metrics) == 0
        await trio.sleep(2.5)
        assert ping_age(metrics) == 0.5  # pinged at 2.0
        progressing = False
        await trio.sleep(6)
        assert ping_age(metrics) == 6.5  # withheld at 4.0, 6.0 and 8.0
        progressing = True
        await trio.sleep(2)
        assert ping_age(metrics) == 0.5
        nursery.cancel_scope.cancel()
