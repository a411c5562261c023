"""The ingest through a store that takes no writes (``ingest/store_outage.py``): which
failures are waited out and which go through at once. The wait itself runs in
``tests/reliability/test_store_faults.py``: a real daemon over a file-size limit keeps
serving with /readyz false, then restarts (exit 3) once the limit is lifted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from tradecanvas.errors import StoreError
from tradecanvas.ingest.store_outage import StoreOutage, waits_out
from tradecanvas.store.sqlite import CandleStore

FULL = StoreError("candle store write failed: OperationalError: database or disk is full")


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
