"""A real full disk for the SQLite store: a 4 MiB tmpfs, mounted in a mount namespace of its
own (``unshare -m``) around one child process, so nothing can leave the mount behind — it
goes with the child, however that ends. Needs root (or CAP_SYS_ADMIN); :func:`on_full_disk`
skips the test, saying so, without it.

The child runs one scenario of :func:`main` (``python -m tests.store.full_disk SCENARIO
DIR``) and prints its findings as one JSON line:

- ``outage``: a store whose WAL was checkpointed (SQLite then reuses it from its start),
  a disk filled to the last byte, and the ingest failing with ``database or disk is full``:
  does :class:`StoreOutage` stay in the outage for a minute of probes (``ended_while_full``)
  though a small write still goes through (``small_write_fits``), and does it end once the
  disk has room again (``ended_after``)?
- ``open``: a store closed cleanly (no ``-wal``), the disk filled: what does opening it say?
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import pytest
import trio
import trio.testing

from tests.conftest import flat_minutes
from tradecanvas.errors import StoreError
from tradecanvas.ingest.store_outage import StoreOutage
from tradecanvas.store.sqlite import CandleStore

SIZE: Final = "4m"
S: Final = "binance:futures:BTC/USDT:1m"
T0: Final = 1_751_760_000
MOUNT: Final = 'mount -t tmpfs -o size=4m tmpfs "$0" && exec "$@"'


def on_full_disk(scenario: str, folder: Path) -> dict[str, Any]:
    """Run ``scenario`` in a child on a tmpfs mounted at ``folder`` (skips without mounts)."""
    folder.mkdir()
    if not shutil.which("unshare") or os.geteuid() != 0:
        pytest.skip("a tmpfs needs root and unshare: no real full disk here")
    probe = ["unshare", "-m", "--propagation", "private", "sh", "-c", MOUNT, str(folder), "true"]
    if subprocess.run(probe, capture_output=True, check=False).returncode != 0:
        pytest.skip("mounting a tmpfs in a mount namespace is not permitted here")
    child = [sys.executable, "-m", "tests.store.full_disk", scenario, str(folder)]
    wrap = ["unshare", "-m", "--propagation", "private", "sh", "-c", MOUNT, str(folder)]
    done = subprocess.run([*wrap, *child], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    found: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return found


def fill(folder: Path) -> Path:
    """Take every byte left on the file system of ``folder``."""
    filler = folder / "filler"
    with filler.open("ab", buffering=0) as f:
        for chunk in (65536, 4096, 512, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                pass
    return filler


async def _filled_store(folder: Path) -> CandleStore:
    store = await CandleStore.open(folder / "market.sqlite3")
    for day in range(4):
        await store.upsert(S, list(flat_minutes(T0 + day * 86_400, 1440)), "ws")
    # the WAL copied into the file (as the checkpointer does between live batches): the
    # next write goes to the WAL's start, into room the file already has. The store's own
    # checkpointer may be running one after those writes: a second at once is "busy"
    assert await trio.to_thread.run_sync(store._checkpointer.wait_idle, 60)
    await trio.to_thread.run_sync(_checkpoint, store.path)
    return store


def _checkpoint(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert busy == 0


def count_probes(store: CandleStore, seen: Callable[[int], None]) -> None:
    """Call ``seen`` with the number of looks the outage took at the store so far (its room,
    its probe write), whichever it takes (old code or new)."""
    rounds = [0]
    # getattr: the test must fail on the code before disk_space, not break
    set_meta, disk_space = store.set_meta, getattr(store, "disk_space", None)

    def note() -> None:
        rounds[0] += 1
        seen(rounds[0])

    async def counted_set_meta(key: str, value: str) -> None:
        try:
            await set_meta(key, value)
        finally:
            note()

    def counted_disk_space() -> Any:
        assert disk_space is not None
        try:
            return disk_space()
        finally:
            trio.from_thread.run_sync(note)

    setattr(store, "set_meta", counted_set_meta)  # noqa: B010 (a method, on one instance)
    setattr(store, "disk_space", counted_disk_space)  # noqa: B010


async def _outage(folder: Path) -> dict[str, Any]:
    store = await _filled_store(folder)
    filler = fill(folder)
    found: dict[str, Any] = {}
    try:
        try:
            await store.set_meta("fits", "1")
            found["small_write_fits"] = True
        except StoreError:
            found["small_write_fits"] = False
        full = StoreError("candle store write failed: OperationalError: database or disk is full")
        ended = trio.Event()
        failures: list[str] = []
        probed = trio.Event()
        count_probes(store, lambda n: probed.set() if n >= 5 else None)

        async def failing(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            task_status.started()
            raise full

        async def run() -> None:
            try:
                await StoreOutage(store).run_ingest(failing)
            except StoreError as exc:
                failures.append(str(exc))
            ended.set()
            probed.set()  # probes or not: it is over

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            # what counts is how many probes ran (the clock jumps over their waits)
            await probed.wait()
            found["ended_while_full"] = ended.is_set()
            filler.unlink()
            await ended.wait()  # the parent's timeout bounds this
            found["ended_after"] = failures
    finally:
        filler.unlink(missing_ok=True)
        await store.aclose()
    return found


async def _open(folder: Path) -> dict[str, Any]:
    store = await _filled_store(folder)
    await store.aclose()  # a clean stop: no -wal, no -shm
    fill(folder)
    try:
        again = await CandleStore.open(folder / "market.sqlite3")
    except StoreError as exc:
        return {"error": str(exc)}
    await again.aclose()
    return {"error": None}


def main() -> None:
    scenario, folder = sys.argv[1], Path(sys.argv[2])
    run = {"outage": _outage, "open": _open}[scenario]
    clock = trio.testing.MockClock(autojump_threshold=0)  # the probes' minutes, at once
    found = trio.run(run, folder, clock=clock)
    sys.stdout.write(json.dumps(found) + "\n")


if __name__ == "__main__":
    main()
