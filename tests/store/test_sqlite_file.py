"""The SQLite store's file under an operator's hands (review of day-2 faults): a damaged file
is refused at open, a new empty store is said out loud, and a file deleted or replaced under
a running store is noticed before anything more is committed to it."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import pytest
import trio

from tests.conftest import flat_minutes
from tests.store.full_disk import on_full_disk
from tradecanvas.errors import StoreError
from tradecanvas.store.sqlite import CandleStore

S = "binance:futures:BTC/USDT:1m"
T0 = 1_751_760_000


async def _filled(path: Path, minutes: int = 3000) -> None:
    store = await CandleStore.open(path)
    try:
        await store.upsert(S, list(flat_minutes(T0, minutes)), "ws")
    finally:
        await store.aclose()


@pytest.mark.parametrize("daemon", [True, False])
async def test_a_new_store_is_announced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, daemon: bool
) -> None:
    """A daemon (it takes the lock) warns, with advice for lost history; a one-shot tool
    filling a new store (import, backfill) says it at INFO, without that advice."""
    path = tmp_path / "m.sqlite3"
    with caplog.at_level(logging.INFO):
        store = await CandleStore.open(path, lock=daemon)
        await store.aclose()
        store = await CandleStore.open(path, lock=daemon)  # there now: nothing said
        await store.aclose()
    said = [r for r in caplog.records if "created a new, empty store" in r.getMessage()]
    assert len(said) == 1 and str(path) in said[0].getMessage()
    assert said[0].levelno == (logging.WARNING if daemon else logging.INFO)
    assert ("restore a backup" in said[0].getMessage()) is daemon


async def test_a_damaged_page_is_refused_at_open_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m.sqlite3"
    await _filled(path)
    size = path.stat().st_size
    assert size > 20 * 4096
    with path.open("r+b") as f:  # a page in the middle of the candles' tree
        f.seek((size // 4096 // 2) * 4096)
        f.write(b"\xa5" * 4096)
    with pytest.raises(StoreError, match="failed its integrity check") as info:
        await CandleStore.open(path)
    assert str(path) in str(info.value) and ".recover" in str(info.value)


async def test_a_file_deleted_or_replaced_under_the_store_stops_it(tmp_path: Path) -> None:
    path = tmp_path / "m.sqlite3"
    store = await CandleStore.open(path)
    try:
        assert store.file_problem() is None
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(f"{path}{suffix}")
        assert store.file_problem() == "was deleted while the daemon had it open"
        with pytest.raises(StoreError, match=r"m\.sqlite3 was deleted .*stopping before"):
            with trio.fail_after(10):
                await store.watch_file(interval_s=0.01)
    finally:
        await store.aclose()
    # a restore while running: another file moved over the path
    store = await CandleStore.open(path)
    try:
        other = tmp_path / "backup.sqlite3"
        await _filled(other, 10)
        os.replace(other, path)
        assert store.file_problem() == "was replaced by another file while the daemon had it open"
    finally:
        await store.aclose()


async def test_a_file_this_process_cannot_write_is_refused_at_open(tmp_path: Path) -> None:
    """SQLite opens it read-only without a word, and the first commit failed instead. An
    immutable file (chattr +i) stands for one owned by another user: root is refused too."""
    path = tmp_path / "m.sqlite3"
    await _filled(path, 10)
    chattr = await trio.run_process(["chattr", "+i", str(path)], check=False, capture_stderr=True)
    if chattr.returncode != 0:
        pytest.skip("chattr +i does not work on this file system")
    try:
        with pytest.raises(StoreError, match="cannot be written by this process") as info:
            await CandleStore.open(path)
        assert str(path) in str(info.value)
        # a reader (export) is not refused
        reader = await CandleStore.open(path, writes=False)
        assert len(await reader.tail(S, 100)) == 10
        await reader.aclose()
    finally:
        await trio.run_process(["chattr", "-i", str(path)])
    store = await CandleStore.open(path)  # writable again
    await store.aclose()


async def test_a_deleted_or_replaced_wal_stops_the_store_too(tmp_path: Path) -> None:
    """What was committed since the last checkpoint lives in the -wal: deleted under a
    running store it went unnoticed (the check looked at the main file only)."""
    path = tmp_path / "m.sqlite3"
    wal = Path(f"{path}-wal")
    for replace in (False, True):
        store = await CandleStore.open(path)
        try:
            await store.upsert(S, list(flat_minutes(T0, 10)), "ws")
            assert store.file_problem() is None
            if replace:
                os.replace(tmp_path / "other-wal", wal)
            else:
                os.rename(wal, tmp_path / "other-wal")
            problem = store.file_problem()
            assert (
                problem
                == f"lost its -wal file: {wal} was "
                + ("replaced by another file" if replace else "deleted")
                + " while the daemon had it open"
            )
            with pytest.raises(StoreError, match=r"m\.sqlite3 lost its -wal file: .*stopping"):
                with trio.fail_after(10):
                    await store.watch_file(interval_s=0.01)
        finally:
            await store.aclose()


async def test_a_folder_or_wal_this_process_cannot_write_is_refused_naming_it(
    tmp_path: Path,
) -> None:
    """SQLite said only "attempt to write a readonly database". Immutable (chattr +i) stands
    for another owner's: root is refused too."""
    folder = tmp_path / "data"
    folder.mkdir()
    path = folder / "m.sqlite3"
    await _filled(path, 10)
    for target, named in (
        (folder, f"its folder {folder} (where SQLite creates the -wal and -shm files)"),
        (Path(f"{path}-wal"), f"its -wal file {path}-wal"),
    ):
        target.touch()
        chattr = await trio.run_process(
            ["chattr", "+i", str(target)], check=False, capture_stderr=True
        )
        if chattr.returncode != 0:
            pytest.skip("chattr +i does not work on this file system")
        try:
            with pytest.raises(StoreError) as info:
                await CandleStore.open(path)
            assert str(info.value) == (
                f"candle store {path}: {named} cannot be written by this process (uid"
                f" {os.getuid()}): give the file and its folder to the user the daemon runs as"
            )
        finally:
            await trio.run_process(["chattr", "-i", str(target)])
        if target != folder:
            target.unlink()


async def test_a_store_opened_on_a_full_disk_says_the_disk_is_full(tmp_path: Path) -> None:
    """SQLite said "disk I/O error" of a store closed cleanly (its -shm cannot grow), which
    reads as failing hardware. A real 4 MiB tmpfs, filled to the last byte."""
    found = on_full_disk("open", tmp_path / "mnt")
    assert found["error"] is not None
    assert "failed: the disk is full (0 KiB free on the store's file system" in found["error"]
    assert "free space there" in found["error"]
