"""The ingest through a store that takes no writes (``ingest/store_outage.py``): which
failures are waited out and which go through at once. The wait itself runs in
``tests/reliability/test_store_faults.py``: a real daemon over a file-size limit keeps
serving with /readyz false, then restarts (exit 3) once the limit is lifted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tests.store.full_disk import on_full_disk
from tradecanvas.bus.roles import watch_dependencies
from tradecanvas.errors import StoreError, StoreRecovered
from tradecanvas.ingest.store_outage import StoreOutage, waits_out
from tradecanvas.ops.metrics import Metrics
from tradecanvas.store.files import ROOM_BYTES, DiskSpace, short_of_room
from tradecanvas.store.sqlite import CandleStore

FULL = StoreError("candle store write failed: OperationalError: database or disk is full")
STORE_DOWN = 'tradecanvas_dependency_up{dependency="store"} 0.0'


@pytest.mark.parametrize(
    ("text", "waited"),
    [
        ("candle store write failed: OperationalError: database or disk is full", True),
        ("candle store write failed: OperationalError: disk I/O error", True),
        ("attempt to write a readonly database", True),
        ("candle store write failed: OperationalError: database is locked", True),
        ('could not extend file "base/1/2": No space left on device', True),
        ("database disk image is malformed", False),
        ("ingest fence: the store's token is 4 (node b), this node's 3", False),
    ],
)
def test_which_failures_are_waited_out(text: str, waited: bool) -> None:
    assert waits_out(StoreError(text)) is waited


def failing(exc: BaseException, *, start: bool = True) -> Any:
    """An ingest that starts (or not) and then fails with ``exc``."""

    async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if start:
            task_status.started()
        await trio.lowlevel.checkpoint()
        raise exc

    return run


async def ended_with(outage: StoreOutage, run: Any) -> BaseException:
    """What the ingest run through ``outage`` ended with (out of its task group)."""
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(outage.run_ingest, run)
    except BaseExceptionGroup as group:
        [only] = group.exceptions
        return only
    except BaseException as exc:
        return exc
    raise AssertionError("the ingest ended without a failure")


async def test_other_failures_and_failures_at_start_up_go_through_at_once(
    tmp_path: Path,
) -> None:
    store = await CandleStore.open(tmp_path / "m.sqlite3")
    try:
        outage = StoreOutage(store, probe_interval_s=0.01)
        for exc in (StoreError("database disk image is malformed"), ValueError("a bug")):
            assert await ended_with(outage, failing(exc)) is exc
        # before the ingest started (the daemon is not up yet): no wait either
        assert await ended_with(outage, failing(FULL, start=False)) is FULL
        assert outage.writable()
    finally:
        await store.aclose()


async def test_a_full_disk_keeps_the_outage_though_a_small_write_fits(tmp_path: Path) -> None:
    """Review of the disk-full day: SQLite reuses a checkpointed WAL from its start, so the
    outage's one-page probe went through on a disk with no byte free; the daemon restarted
    (exit 3), failed again at once, three times in 20 s, and systemd gave up. A real 4 MiB
    tmpfs, filled to the last byte."""
    found = on_full_disk("outage", tmp_path / "mnt")
    assert found["small_write_fits"], found  # what fooled the probe
    assert not found["ended_while_full"], found
    [ended] = found["ended_after"]
    assert "this restart is the recovery" in ended and "full" not in ended


def test_a_store_short_of_room_is_not_writable() -> None:
    mib = 1024 * 1024
    assert short_of_room(DiskSpace(free=0, size=100_000 * mib)) is not None
    assert short_of_room(DiskSpace(free=ROOM_BYTES - 1, size=100_000 * mib)) is not None
    assert short_of_room(DiskSpace(free=ROOM_BYTES, size=100_000 * mib)) is None
    # a small file system needs a share of itself, not more than it holds
    assert short_of_room(DiskSpace(free=mib, size=4 * mib)) is None
    assert short_of_room(DiskSpace(free=mib - 1, size=4 * mib)) == (
        "1023 KiB free on the store's file system, 1.0 MiB needed"
    )


async def test_the_outage_waits_for_room_then_restarts_saying_it_recovers(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The same with the disk's room given (a SQLite store on any disk): the probe write
    goes through, and still the outage holds until there is room; /metrics' store gauge
    follows."""
    store = await CandleStore.open(tmp_path / "m.sqlite3")
    space = [DiskSpace(free=0, size=10 * ROOM_BYTES)]
    outage = StoreOutage(store, disk_space=lambda: space[0])
    metrics = Metrics()
    watch_dependencies(metrics, store, None, None, outage.writable)
    try:
        async with trio.open_nursery() as nursery:
            ended: list[BaseException] = []
            done = trio.Event()

            async def run() -> None:
                ended.append(await ended_with(outage, failing(FULL)))
                done.set()

            nursery.start_soon(run)
            await trio.sleep(600)  # 120 probe intervals
            assert not ended and not outage.writable()
            assert STORE_DOWN in metrics.render().decode()  # read when scraped
            space[0] = DiskSpace(free=ROOM_BYTES, size=10 * ROOM_BYTES)
            await done.wait()  # the clock jumps over the probe's wait (pytest's timeout)
            [failure] = ended
            assert isinstance(failure, StoreRecovered) and failure.__cause__ is FULL
            assert str(failure).startswith("the store takes writes again after the outage")
    finally:
        await store.aclose()
