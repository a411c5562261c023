"""The SQLite store's lock file and folder against another local user (security review):
the lock file is this process's own regular file or refused (a symbolic or hard link put
there had its target truncated to a pid; another user's file let them keep the daemon
out; a FIFO hung the start), one store reached by two paths has one lock, a lock file
deleted under the daemon is said, and a folder others may write is warned of. Real files;
"another user" is a file chowned away when the tests run as root, else this process
playing another uid (its effective uid seen as one more)."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
import trio
import trio.testing

from tradecanvas.errors import StoreError, StoreInUse
from tradecanvas.store.sqlite import CandleStore
from tradecanvas.store.writer_lock import FileLock, lock_path

OTHER_UID = 54_321
VICTIM = "a file of another's, which the daemon must not touch\n"


def another_users(path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """Make ``path`` another user's; returns that user's uid."""
    if os.geteuid() == 0:
        os.chown(path, OTHER_UID, -1, follow_symlinks=False)
        return OTHER_UID
    uid = os.lstat(path).st_uid
    monkeypatch.setattr(os, "geteuid", lambda: uid + 1)
    return uid


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.write_text(VICTIM)
    return victim


def test_a_symbolic_link_as_the_lock_file_is_refused_and_its_target_left_alone(
    tmp_path: Path,
) -> None:
    db, victim = tmp_path / "m.sqlite3", _victim(tmp_path)
    Path(f"{db}.lock").symlink_to(victim)
    with pytest.raises(StoreError) as refused:
        FileLock.take(db)
    assert str(refused.value) == (
        f"candle store {db}: its lock file {db}.lock is a symbolic link; refused (remove it:"
        " serve makes its own, mode 0600)"
    )
    assert victim.read_text() == VICTIM  # was truncated to the daemon's pid


def test_a_hard_link_as_the_lock_file_is_refused_and_its_file_left_alone(
    tmp_path: Path,
) -> None:
    db, victim = tmp_path / "m.sqlite3", _victim(tmp_path)
    os.link(victim, f"{db}.lock")
    with pytest.raises(StoreError, match=r"m\.sqlite3\.lock has 2 hard links"):
        FileLock.take(db)
    assert victim.read_text() == VICTIM


async def test_a_fifo_as_the_lock_file_is_refused_at_once(tmp_path: Path) -> None:
    """Opened read-only (the fallback for a lock file this process may not write), a FIFO
    waited for a writer forever."""
    db = tmp_path / "m.sqlite3"
    os.mkfifo(f"{db}.lock")
    with trio.fail_after(10), pytest.raises(StoreError) as refused:
        await trio.to_thread.run_sync(FileLock.take, db, abandon_on_cancel=True)
    assert "lock file" in str(refused.value)
    assert str(refused.value).endswith(
        "is not a regular file (a FIFO); refused (remove it: serve makes its own, mode 0600)"
    )


def test_the_lock_file_is_private_and_another_users_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lock file every user may open (0644, or the read-only fallback) is one any of them
    may flock, keeping the daemon out for good."""
    db = tmp_path / "m.sqlite3"
    lock = FileLock.take(db)
    lock.release()
    assert stat.S_IMODE(lock_path(db).stat().st_mode) == 0o600
    lock_path(db).chmod(0o644)  # an older release's
    FileLock.take(db).release()
    assert stat.S_IMODE(lock_path(db).stat().st_mode) == 0o600
    owner = another_users(lock_path(db), monkeypatch)
    with pytest.raises(StoreError) as refused:
        FileLock.take(db)
    assert f"its lock file {db}.lock is owned by uid {owner}, not this process's (uid " in str(
        refused.value
    )


async def test_a_second_path_to_the_store_takes_the_same_lock(tmp_path: Path) -> None:
    """A symbolic link to the store had a lock file of its own: two daemons ingested."""
    db, link = tmp_path / "m.sqlite3", tmp_path / "link.sqlite3"
    first = await CandleStore.open(db, lock=True)
    try:
        link.symlink_to(db)
        with pytest.raises(StoreInUse) as refused:
            await CandleStore.open(link, lock=True)
        assert str(refused.value).startswith(
            f"candle store {link} (the file {db}) is in use by another tradecanvas serve (pid"
            f" {os.getpid()}), which holds {db}.lock"
        )
    finally:
        await first.aclose()
    assert [n for n in os.listdir(tmp_path) if n.endswith(".lock")] == ["m.sqlite3.lock"]


async def test_a_lock_file_deleted_under_the_daemon_is_warned_of_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    db = tmp_path / "m.sqlite3"
    store = await CandleStore.open(db, lock=True)
    try:
        assert store.lock is not None and store.lock.problem() is None
        lock_path(db).unlink()
        with caplog.at_level(logging.WARNING), trio.move_on_after(1):
            await store.watch_file(interval_s=0.01)  # 100 checks
    finally:
        await store.aclose()
    said = [r.getMessage() for r in caplog.records if "lock file" in r.getMessage()]
    assert said == [
        f"candle store {db}: its lock file {db}.lock was deleted while the daemon holds it:"
        " another serve could start on this store (restart this one to make it again)"
    ]


@pytest.mark.parametrize(
    ("mode", "warned"), [(0o777, "mode 0777, no sticky bit"), (0o1777, None), (0o755, None)]
)
async def test_a_store_folder_every_user_may_write_is_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int, warned: str | None
) -> None:
    folder = tmp_path / "var"
    folder.mkdir()
    folder.chmod(mode)
    with caplog.at_level(logging.WARNING):
        await (await CandleStore.open(folder / "m.sqlite3")).aclose()
    said = [r.getMessage() for r in caplog.records if "its folder" in r.getMessage()]
    if warned is None:
        assert said == []
    else:
        assert said == [
            f"candle store {folder / 'm.sqlite3'}: its folder {folder} is writable by every"
            f" user ({warned}): anyone can replace or remove the store's files; chmod o-w it"
        ]


async def test_a_store_folder_of_another_user_is_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "var"
    folder.mkdir()
    owner = another_users(folder, monkeypatch)
    with caplog.at_level(logging.WARNING):
        await (await CandleStore.open(folder / "m.sqlite3")).aclose()
    said = [r.getMessage() for r in caplog.records if "its folder" in r.getMessage()]
    assert len(said) == 1
    assert said[0].startswith(
        f"candle store {folder / 'm.sqlite3'}: its folder {folder} is owned by uid {owner},"
        " not this process's (uid "
    )


async def test_the_folder_checked_is_the_real_store_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Through a symbolic link the store (its lock, -wal and -shm) is in the folder the link
    leads to: that one was not checked, the link's own was (review rev36)."""
    shared, safe = tmp_path / "shared", tmp_path / "safe"
    for folder in (shared, safe):
        folder.mkdir()
    shared.chmod(0o777)
    (safe / "m.sqlite3").symlink_to(shared / "m.sqlite3")
    with caplog.at_level(logging.WARNING):
        await (await CandleStore.open(safe / "m.sqlite3")).aclose()
    said = [r.getMessage() for r in caplog.records if "its folder" in r.getMessage()]
    assert said == [
        f"candle store {safe / 'm.sqlite3'}: its folder {shared} is writable by every user"
        " (mode 0777, no sticky bit): anyone can replace or remove the store's files; chmod"
        " o-w it"
    ]
    assert (shared / "m.sqlite3").is_file() and (safe / "m.sqlite3").is_symlink()
