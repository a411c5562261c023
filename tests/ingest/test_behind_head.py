"""Closed klines at or below a series' head: a run of them is said (ingest/behind_head.py),
once, then at most once a minute, and when it ends; over real sockets, a replay started
again on the store it filled says so instead of stalling without a word (the README's
tour run twice)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from tests.ingest.rig import BTC, DAY, WAIT_S, day_replay, ingest_rig
from tradecanvas.ingest.behind_head import EVERY_S, STREAK_MIN, BehindHead
from tradecanvas.model import SeriesId

ETH = SeriesId.parse("binance:futures:ETH/USDT:1m")
HEAD = 1_751_846_400  # 2025-07-07 00:00 UTC
BEHIND = "closed klines at or below the store's head"


def test_a_run_of_closes_at_or_below_the_head_is_said_at_the_third_then_once_a_minute() -> None:
    behind = BehindHead()
    for i in range(STREAK_MIN - 1):
        behind.note(BTC, HEAD - 600 + 60 * i, HEAD, now=float(i))
        assert behind.take_lines() == []
    behind.note(BTC, HEAD, HEAD, now=2.0)  # at the head counts too
    (line,) = behind.take_lines()
    assert line == (
        f"3 {BEHIND} (2025-07-07 00:00 UTC) ignored for {BTC} (is the source behind the"
        " store? a replay restarted?); bars past the head are stored as they come"
    )
    for i in range(10):  # within the minute: counted, not said
        behind.note(BTC, HEAD - 60 * i, HEAD, now=3.0 + i)
    assert behind.take_lines() == []
    behind.note(BTC, HEAD - 60, HEAD, now=2.0 + EVERY_S)
    (line,) = behind.take_lines()
    assert line.startswith(f"11 {BEHIND} ")
    assert behind.take_lines() == []  # taken once


def test_the_end_of_a_reported_run_is_said_with_what_was_not_yet() -> None:
    behind = BehindHead()
    for i in range(STREAK_MIN + 4):
        behind.note(BTC, HEAD - 60 * i, HEAD, now=float(i))
    assert len(behind.take_lines()) == 1
    behind.note(BTC, HEAD + 60, HEAD, now=10.0)
    assert behind.take_lines() == [
        f"{BTC}: closed klines are past the store's head again (4 more ignored before);"
        " stored as they come"
    ]
    behind.note(BTC, HEAD + 120, HEAD + 60, now=11.0)
    assert behind.take_lines() == []


def test_a_single_repeated_close_says_nothing_and_series_count_apart() -> None:
    """A reconnect's repeated close (one, then the stream goes on) is no run."""
    behind = BehindHead()
    for minute in range(50):
        t = HEAD + 60 * minute
        behind.note(BTC, t - 60, t - 60, now=float(minute))  # the last close, again
        behind.note(BTC, t, t - 60, now=float(minute))  # then the next one
        behind.note(ETH, t - 60, t, now=float(minute))  # ETH behind all along
    lines = behind.take_lines()
    assert [line for line in lines if str(BTC) in line] == []
    assert len(lines) == 1 and f"3 {BEHIND}" in lines[0] and str(ETH) in lines[0]
    behind.note(BTC, HEAD, None, now=60.0)  # an empty store has no head: nothing is behind it
    assert behind.take_lines() == []


class _Said(logging.Handler):
    """Sets ``event`` once a WARNING with ``text`` is logged (in trio's thread)."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.WARNING)
        self.text = text
        self.lines: list[str] = []
        self.event = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.text in message:
            self.lines.append(message)
            self.event.set()


async def test_a_replay_started_again_on_its_store_is_said_not_silent(
    tmp_path: Path, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The README's tour run twice on one store: the second replay starts below the
    store's head, so none of its first closes is new. The log says so at the third (it
    said nothing and the chart stalled), and says when the replay passes the head; the
    bars after it are stored."""
    caplog.set_level(logging.WARNING, logger="tradecanvas.ingest")
    # ten bars a second, stopped at about bar 1400 (of 1439)
    first = day_replay(data_dir, start_at=1380, speed=600.0)
    async with ingest_rig(tmp_path, replay=first) as rig:
        await rig.hub.wait_closed(str(BTC), DAY + 1400 * 60)
        await rig.stop_ingest()
        head = await rig.store.head_time(str(BTC))
    assert head is not None and head < DAY + 1439 * 60
    assert not [r for r in caplog.records if BEHIND in r.getMessage()]
    said, passed = _Said(BEHIND), _Said("past the store's head again")
    ingest_log = logging.getLogger("tradecanvas.ingest")
    ingest_log.addHandler(said)
    ingest_log.addHandler(passed)
    try:
        async with ingest_rig(tmp_path, replay=day_replay(data_dir, start_at=1380)) as rig:
            with trio.fail_after(WAIT_S):
                await said.event.wait()
                await passed.event.wait()
            await rig.hub.wait_closed(str(BTC), head + 60)
            assert min(rig.hub.closed_times(str(BTC))) == head + 60  # nothing below it again
    finally:
        ingest_log.removeHandler(said)
        ingest_log.removeHandler(passed)
    behind = (head - (DAY + 1380 * 60)) // 60 + 1  # closes 1380 … the head
    assert said.lines[0].startswith(f"{STREAK_MIN} {BEHIND} (")
    assert (
        f"ignored for {BTC} (is the source behind the store? a replay restarted?)"
        in (said.lines[0])
    )
    assert passed.lines == [
        f"{BTC}: closed klines are past the store's head again"
        f" ({behind - STREAK_MIN} more ignored before); stored as they come"
    ]
