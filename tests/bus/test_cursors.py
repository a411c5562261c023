"""An edge's cursors: runs between holes, exactly once in order, the forming gate."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import candle
from tradecanvas.bus.cursors import CandleGap, EdgeCursors, EventGap, Run
from tradecanvas.bus.ids import StreamId
from tradecanvas.model import Candle

S1 = "binance:futures:BTC/USDT:1m"
S5 = "binance:futures:BTC/USDT:5m"


def bar(t: int, price: str = "1") -> Candle:
    return candle(t, price, price, price, price)


def test_runs_split_at_holes_and_skip_what_was_delivered() -> None:
    cursors = EdgeCursors({S1: 120}, events_after=0)
    got = cursors.runs(S1, [bar(60), bar(120), bar(180), bar(240), bar(420), bar(480)])
    assert got == [
        Run(None, (bar(180), bar(240))),
        Run(CandleGap(S1, 240, 420), (bar(420), bar(480))),
    ]


def test_a_hole_before_the_first_candle_read() -> None:
    cursors = EdgeCursors({S5: 0}, events_after=0)
    assert cursors.runs(S5, [bar(900)]) == [Run(CandleGap(S5, 0, 900), (bar(900),))]
    # nothing delivered yet: nothing is owed before the first one
    fresh = EdgeCursors({S5: None}, events_after=0)
    assert fresh.runs(S5, [bar(900)]) == [Run(None, (bar(900),))]


def test_accept_moves_the_cursor_and_never_goes_back() -> None:
    cursors = EdgeCursors({S1: 60}, events_after=0)
    assert cursors.accept(S1, [bar(180), bar(60), bar(120)]) == [bar(120), bar(180)]
    assert cursors.cursor(S1) == 180
    assert cursors.accept(S1, [bar(120), bar(180)]) == []
    # a fill stops below the candle that showed the hole
    assert cursors.accept(S1, [bar(240), bar(300)], before=300) == [bar(240)]


def test_read_positions_pass_the_cursor_and_what_was_read() -> None:
    cursors = EdgeCursors({S1: 60}, events_after=5)
    assert cursors.read_positions() == {S1: StreamId(60_000)}
    cursors.note_read(S1, StreamId(240_000))  # a malformed entry, not delivered
    assert cursors.read_positions() == {S1: StreamId(240_000)} and cursors.cursor(S1) == 60
    cursors.accept(S1, [bar(300)])  # a fill went further
    assert cursors.read_positions() == {S1: StreamId(300_000)}
    assert cursors.events_position() == StreamId(5)
    cursors.note_read(None, StreamId(9))
    assert cursors.events_position() == StreamId(9)


def test_pass_over_moves_by_the_id_and_owes_no_hole() -> None:
    cursors = EdgeCursors({S1: 60, S5: None}, events_after=0)
    cursors.moved_positions()
    # the entries up to bar 300 (a trimmed hole among them) read, nobody following S1
    assert cursors.pass_over(S1, StreamId(300_000))
    assert cursors.cursor(S1) == 300 and cursors.moved_positions() == {S1: StreamId(300_000)}
    assert cursors.runs(S1, [bar(360)]) == [Run(None, (bar(360),))]  # no gap to fill
    assert cursors.pass_over(S5, StreamId(600_000)) and cursors.cursor(S5) == 600
    assert cursors.pass_over(S1, StreamId(240_000)) and cursors.cursor(S1) == 300  # never back
    # an ID that stands for no bar: nothing moves, the feed decodes the entries instead
    assert not cursors.pass_over(S1, StreamId(420_000, 1))
    assert not cursors.pass_over(S1, StreamId(420_500))
    assert cursors.read_position(S1) == StreamId(300_000)
    assert cursors.moved_positions() == {S5: StreamId(600_000)}


def test_moved_positions_name_every_stream_once_then_only_those_that_moved() -> None:
    cursors = EdgeCursors({S1: 60, S5: None}, events_after=5)
    assert cursors.moved_positions() == {S1: StreamId(60_000), S5: StreamId(0), None: StreamId(5)}
    assert cursors.moved_positions() == {}
    cursors.note_read(S1, StreamId(240_000))  # read past (a malformed entry)
    cursors.note_read(S1, StreamId(180_000))  # not past what was read: no move
    assert cursors.moved_positions() == {S1: StreamId(240_000)}
    cursors.accept(S5, [bar(300)])
    cursors.accept_events([6])
    assert cursors.moved_positions() == {S5: StreamId(300_000), None: StreamId(6)}
    assert cursors.accept(S5, [bar(300)]) == []  # nothing new: no move
    assert cursors.moved_positions() == {}
    # whatever moved, the positions said so far are read_positions() and events_position()
    assert cursors.read_positions() == {S1: StreamId(240_000), S5: StreamId(300_000)}


def test_event_runs_and_resync() -> None:
    cursors = EdgeCursors({S1: None}, events_after=3)
    runs = cursors.event_runs([2, 3, 4, 7, 8])
    assert [(r.gap, r.event_ids) for r in runs] == [(None, (4,)), (EventGap(4, 7), (7, 8))]
    assert cursors.accept_events([8, 4, 7]) == [4, 7, 8]
    assert cursors.resync_events() == EventGap(8, None)
    assert cursors.resync() == [CandleGap(S1, None, None)]


@given(
    count=st.integers(1, 60),
    on_stream=st.lists(st.booleans(), min_size=60, max_size=60),
    reads=st.lists(st.integers(1, 10), min_size=1, max_size=20),
    start=st.integers(0, 5),
)
def test_every_candle_exactly_once_in_order_whatever_the_stream_lost(
    count: int, on_stream: list[bool], reads: list[int], start: int
) -> None:
    """The stream holds any subset of the committed bars (trimmed, lost, dropped); read in
    any chunks, with each hole filled from the store, the edge delivers every bar after its
    cursor once, ascending."""
    store = [bar(60 * i) for i in range(count + start)]
    stream = [c for c, kept in zip(store, on_stream, strict=False) if kept]
    cursors = EdgeCursors({S1: 60 * (start - 1) if start else None}, events_after=0)
    delivered: list[Candle] = []
    position = 0
    turn = 0
    while position < len(stream):
        chunk = stream[position : position + reads[turn % len(reads)]]
        position += len(chunk)
        turn += 1
        for run in cursors.runs(S1, chunk):
            if run.gap is not None:
                after, before = run.gap.after, run.gap.before
                assert before is not None
                hole = [
                    c
                    for c in store
                    if (after is None or c.candle_time > after) and c.candle_time < before
                ]
                delivered += cursors.accept(S1, hole, before=before)
            delivered += cursors.accept(S1, run.candles)
    for gap in cursors.resync():  # the tail the stream lost
        delivered += cursors.accept(
            S1, [c for c in store if gap.after is None or c.candle_time > gap.after]
        )
    owed = store[start:] if start else store
    if not start:
        # with no cursor, bars before the first one read are the catch-up's, not the feed's
        first = stream[0].candle_time if stream else None
        owed = [c for c in store if first is None or c.candle_time >= first]
    assert delivered == owed


def test_forming_waits_for_the_close_before_it() -> None:
    cursors = EdgeCursors({S1: 60, S5: None}, events_after=0)
    assert cursors.offer_forming(S1, bar(120)) == bar(120)  # the bar after the cursor
    assert cursors.offer_forming(S1, bar(60)) is None  # stale
    assert cursors.offer_forming(S1, bar(240)) is None  # 120 and 180 are owed first
    assert cursors.offer_forming(S1, bar(180, "2")) is None  # an older one does not replace it
    cursors.accept(S1, [bar(120)])
    assert cursors.release_forming(S1) is None  # 180 still owed
    cursors.accept(S1, [bar(180)])
    assert cursors.release_forming(S1) == bar(240)
    assert cursors.release_forming(S1) is None
    cursors.offer_forming(S1, bar(360))
    cursors.accept(S1, [bar(360)])
    assert cursors.release_forming(S1) is None  # closed meanwhile: stale, dropped
    assert cursors.offer_forming(S5, bar(300)) == bar(300)  # nothing owed yet
    assert cursors.offer_forming("binance:spot:ETH/USDT:1m", bar(60)) is None
