"""An import stopped by Ctrl-C logs the factor.rebuild event it owes within
FINISH_AFTER_SIGNAL_S, or leaves it owed to the next run: a store that is away (a PostgreSQL
restart: PostgresStore.write waits a lost connection out) kept the stopped command running
until the store came back, however long (review: diffrev)."""

from __future__ import annotations

import io
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.tools.importer.rig import FLAGS, plan, real_zips
from tradecanvas.errors import ExitCode
from tradecanvas.store.open import open_store
from tradecanvas.tools.importer import cli, run_import
from tradecanvas.tools.importer.commit import ArchiveCommitter
from tradecanvas.tools.progress import Progress

OUTAGE_S = 3600.0


class _AwayAfterSignal:
    """A store that goes away (for OUTAGE_S) when told; its write waits the outage out as
    PostgresStore.write does (a retry every 5 s)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.down_until: float | None = None
        self.attempts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def write(self, fn: Callable[..., Any], **kw: Any) -> Any:
        while self.down_until is not None and trio.current_time() < self.down_until:
            self.attempts += 1
            await trio.sleep(5.0)
        return await self._inner.write(fn, **kw)


async def test_ctrl_c_during_a_store_outage_returns_without_waiting_for_the_store(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    autojump_clock: trio.abc.Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    holder: list[_AwayAfterSignal] = []

    async def opened(location: Any, **kw: Any) -> Any:
        holder.append(_AwayAfterSignal(await open_store(location, **kw)))
        return holder[0]

    monkeypatch.setattr(cli, "open_store", opened)

    class Interrupt(io.StringIO):
        sent = False

        def write(self, text: str) -> int:
            if not self.sent and "candles" in text:
                self.sent = True
                os.kill(os.getpid(), signal.SIGINT)
            return super().write(text)

    finish = ArchiveCommitter.finish

    async def finish_while_away(self: ArchiveCommitter) -> Any:
        # the transaction in flight at the signal is finished (a second Ctrl-C exits at
        # once); the store goes away after it, as the owed event is written
        holder[0].down_until = trio.current_time() + OUTAGE_S
        return await finish(self)

    monkeypatch.setattr(ArchiveCommitter, "finish", finish_while_away)

    progress = Progress(Interrupt(), log=None, verb="import", tty=False)
    started = trio.current_time()
    code, _, _ = await run_import(
        plan(real_zips()),
        tmp_path / "m.sqlite3",
        FLAGS.derived_timeframes,
        FLAGS.derivation_fingerprint(),
        progress,
        batch=1440,
    )
    took = trio.current_time() - started
    assert code == ExitCode.INTERRUPTED
    # a bounded wait for the store, then the event is left owed as after a crash
    assert took < cli.FINISH_AFTER_SIGNAL_S + 10, f"the stopped import waited {took:.0f} s"
    assert "the next import into it logs it" in caplog.text


async def test_a_signal_while_the_finish_waits_for_the_store_bounds_that_wait(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    autojump_clock: trio.abc.Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every file imported, then the store goes away as the owed event is written, and
    Ctrl-C comes while the finish waits: its deadline was fixed at its start (none, not
    interrupted then), so it waited the outage out, until a second signal (review: rev36)."""
    holder: list[_AwayAfterSignal] = []

    class _SignalWhileAway(_AwayAfterSignal):
        async def write(self, fn: Callable[..., Any], **kw: Any) -> Any:
            if self.down_until is not None and self.attempts == 0:
                os.kill(os.getpid(), signal.SIGINT)
            return await super().write(fn, **kw)

    async def opened(location: Any, **kw: Any) -> Any:
        holder.append(_SignalWhileAway(await open_store(location, **kw)))
        return holder[0]

    monkeypatch.setattr(cli, "open_store", opened)
    finish = ArchiveCommitter.finish
    finishing_at: list[float] = []

    async def finish_while_away(self: ArchiveCommitter) -> Any:
        finishing_at.append(trio.current_time())
        holder[0].down_until = trio.current_time() + OUTAGE_S
        return await finish(self)

    monkeypatch.setattr(ArchiveCommitter, "finish", finish_while_away)
    files = plan(real_zips())
    code, tally, said = await run_import(
        files,
        tmp_path / "m.sqlite3",
        FLAGS.derived_timeframes,
        FLAGS.derivation_fingerprint(),
        Progress(io.StringIO(), log=None, verb="import", tty=False),
        batch=1440,
    )
    took = trio.current_time() - finishing_at[0]
    assert tally.files_done == len(files) and holder[0].attempts >= 1
    assert took < cli.FINISH_AFTER_SIGNAL_S + 5, f"the finish waited {took:.0f} s"
    assert "the next import into it logs it" in caplog.text
    assert code == ExitCode.INTERRUPTED, said
