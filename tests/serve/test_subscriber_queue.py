"""The subscriber queue's rules, synchronously: catch-up, healing, gaps, coalescing, cursors and
the slow-consumer policy (focused examples), then hypothesis over random offers, drains and
stalls. No trio, no sockets: the tests answer the plan's store reads from a dict."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Final

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import flat_minutes
from tests.serve.test_ws_server import SID_1M, SID_5M, real_candles
from tradecanvas.model import Candle
from tradecanvas.serve.outgoing import (
    Action,
    Answer,
    ClosedCandles,
    EventsRead,
    EventsTruncated,
    FormingCandle,
    Gap,
    Outgoing,
    Plan,
    ReadEvents,
    ReadStore,
    Send,
    StoredEventText,
    WholeMessage,
)
from tradecanvas.serve.subscriber_queue import CloseDecision, SubscriberQueue

T0: Final = 1751760000  # 2025-07-06 00:00 UTC, the first candle of the real futures week
TF: Final = {SID_1M: 60, SID_5M: 300}


@attrs.define
class MemoryStore:
    """Committed candles per series; answers a plan's ReadStore like CandleStore would."""

    rows: dict[str, dict[int, Candle]] = attrs.field(factory=dict)
    reads: list[ReadStore] = attrs.field(factory=list)
    # the event log: (event_id, series_id, text), and the highest id the retention dropped
    events: list[tuple[int, str, str]] = attrs.field(factory=list)
    pruned_upto: int = 0

    def upsert(self, series_id: str, candles: Iterable[Candle]) -> None:
        self.rows.setdefault(series_id, {}).update((c.candle_time, c) for c in candles)

    def times(self, series_id: str) -> list[int]:
        return sorted(self.rows.get(series_id, {}))

    def log_event(self, series_id: str, text: str) -> int:
        event_id = (self.events[-1][0] if self.events else self.pruned_upto) + 1
        self.events.append((event_id, series_id, text))
        return event_id

    def read_events(self, read: ReadEvents) -> EventsRead:
        found = [
            StoredEventText(i, text)
            for i, sid, text in self.events
            if i > read.after and sid == read.series_id
        ]
        newest = self.events[-1][0] if self.events else self.pruned_upto
        return EventsRead(tuple(found[: read.limit]), self.pruned_upto, newest)

    def read(self, read: ReadStore) -> list[Candle]:
        self.reads.append(read)
        stored = self.rows.get(read.series_id, {})
        ordered = [stored[t] for t in sorted(stored)]
        if read.since is None:
            return ordered[-read.limit :] if ordered else []
        return [c for c in ordered if c.candle_time > read.since][: read.limit]


@attrs.define
class Rig:
    """A queue, its store and its wake-ups; :meth:`drain` runs plans like the publish task."""

    queue_max: int = 1024
    catchup_limit: int = 5000
    max_lag_s: float = 30.0
    store: MemoryStore = attrs.field(factory=MemoryStore)
    woken: bool = False
    lag_deadlines: list[float] = attrs.field(factory=list)
    queue: SubscriberQueue = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.queue = SubscriberQueue(
            queue_max=self.queue_max,
            max_lag_s=self.max_lag_s,
            catchup_limit=self.catchup_limit,
            wake=self.wake,
            lag_changed=self.lag_deadlines.append,
        )

    def wake(self) -> None:
        self.woken = True

    def drain(self) -> list[Outgoing]:
        """Run drains until nothing is ready, with no offer in between; what was sent."""
        sent: list[Outgoing] = []
        while self.woken:
            self.woken = False
            plan = self.queue.drain()
            answer: Answer = None
            while True:
                try:
                    action = plan.send(answer)
                except StopIteration:
                    break
                if isinstance(action, ReadStore):
                    answer = self.store.read(action)
                elif isinstance(action, ReadEvents):
                    answer = self.store.read_events(action)
                else:
                    answer = None
                    sent.extend(action.messages)
        return sent


def subscribe(rig: Rig, series_id: str, since: int | None, batch: bool = True) -> None:
    rig.queue.subscribe(series_id, TF[series_id], since, batch)


def summary(sent: Sequence[Outgoing]) -> list[tuple[object, ...]]:
    """Outgoing messages as comparable tuples (candles by time)."""
    out: list[tuple[object, ...]] = []
    for m in sent:
        if isinstance(m, ClosedCandles):
            out.append(("closed", m.series_id, [c.candle_time for c in m.candles], m.batch))
        elif isinstance(m, Gap):
            out.append(("gap", m.series_id, m.expected_next_time, m.actual_time))
        elif isinstance(m, FormingCandle):
            out.append(("forming", m.series_id, m.candle.candle_time))
        elif isinstance(m, EventsTruncated):
            out.append(("truncated", m.series_id, m.events_after, m.pruned_upto))
        else:
            out.append(("message", m.text))
    return out


def closed_times(sent: Sequence[Outgoing], series_id: str | None = None) -> list[int]:
    return [
        c.candle_time
        for m in sent
        if isinstance(m, ClosedCandles) and series_id in (None, m.series_id)
        for c in m.candles
    ]


def gaps(sent: Sequence[Outgoing]) -> list[tuple[int, int]]:
    return [(m.expected_next_time, m.actual_time) for m in sent if isinstance(m, Gap)]


def minutes(start: int, count: int, price: str = "100") -> list[Candle]:
    return list(flat_minutes(start, count, price=price))


def caught_up(count: int) -> tuple[Rig, list[Candle]]:
    """A rig whose 1m subscription is caught up at the last of ``count`` stored minutes."""
    rig = Rig()
    history = minutes(T0, count)
    rig.store.upsert(SID_1M, history)
    subscribe(rig, SID_1M, since=history[-1].candle_time)
    assert rig.drain() == []
    return rig, history


# --- purity ---------------------------------------------------------------------------


def test_the_core_imports_neither_trio_nor_a_socket_library() -> None:
    code = (
        "import sys, tradecanvas.serve.subscriber_queue, tradecanvas.serve.ws_protocol,"
        " tradecanvas.serve.http_validation\n"
        "bad = {'trio', 'trio_websocket', 'socket', 'starlette', 'hypercorn', 'httpx'}\n"
        "assert not bad & set(sys.modules), bad & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- catch-up -------------------------------------------------------------------------


def test_catch_up_is_exclusive_and_split_by_catchup_limit() -> None:
    # replaces the socket test of the same name (the encoding: tests/serve/test_outgoing.py)
    rig = Rig(catchup_limit=7)
    candles = real_candles()[:25]
    t = [c.candle_time for c in candles]
    rig.store.upsert(SID_1M, candles)
    subscribe(rig, SID_1M, since=t[4])
    sent = rig.drain()
    # 20 candles after the cursor: 7 + 7 + 6, every one exactly once, in order
    assert [len(m.candles) for m in sent if isinstance(m, ClosedCandles)] == [7, 7, 6]
    assert closed_times(sent) == t[5:]
    assert sent[0] == ClosedCandles(SID_1M, tuple(candles[5:12]), True)
    # the first read looks for a stored candle at the cursor; then `since` reads
    assert rig.store.reads[:2] == [
        ReadStore(SID_1M, t[4] - 1, 8),
        ReadStore(SID_1M, t[11], 7),
    ]
    # one message of closed candles, not a batch, for a plain subscriber
    subscribe(rig, SID_1M, since=t[20], batch=False)
    assert summary(rig.drain()) == [("closed", SID_1M, t[21:], False)]
    # since beyond the head: nothing yet
    subscribe(rig, SID_1M, since=t[24])
    assert rig.drain() == []


def test_since_null_sends_the_newest_catchup_limit_then_live() -> None:
    rig = Rig(catchup_limit=8)
    candles = real_candles()[:30]
    rig.store.upsert(SID_1M, candles[:20])
    subscribe(rig, SID_1M, since=None)
    assert closed_times(rig.drain()) == [c.candle_time for c in candles[12:20]]
    assert rig.store.reads == [ReadStore(SID_1M, None, 8)]
    rig.store.upsert(SID_1M, candles[20:22])
    rig.queue.offer_closed(SID_1M, candles[20:22], now=0.0)
    assert summary(rig.drain()) == [
        ("closed", SID_1M, [c.candle_time for c in candles[20:22]], True)
    ]


def test_since_null_on_an_empty_store_heals_from_the_first_stored_candle() -> None:
    rig = Rig()
    candles = real_candles()[:6]
    subscribe(rig, SID_1M, since=None)
    assert rig.drain() == []
    assert rig.queue.subscriptions[SID_1M].cursor == -1
    # committed but never published (a strict publish aborted before this series) …
    rig.store.upsert(SID_1M, candles[:3])
    # … then the next publish: the hole is healed from the store, no gap
    rig.store.upsert(SID_1M, candles[3:])
    rig.queue.offer_closed(SID_1M, candles[3:], now=0.0)
    sent = rig.drain()
    assert closed_times(sent) == [c.candle_time for c in candles]
    assert gaps(sent) == []


def test_catch_up_of_a_derived_series() -> None:
    rig = Rig()
    fives = real_candles("5m")[:12]
    rig.store.upsert(SID_5M, fives)
    subscribe(rig, SID_5M, since=fives[2].candle_time, batch=False)
    sent = rig.drain()
    assert sent == [ClosedCandles(SID_5M, tuple(fives[3:]), False)]


# --- gaps and healing -----------------------------------------------------------------


def test_holes_are_healed_from_the_store_and_only_store_holes_are_gaps() -> None:
    rig = Rig()
    candles = real_candles()[:12]
    t = [c.candle_time for c in candles]
    rig.store.upsert(SID_1M, candles[:3])
    subscribe(rig, SID_1M, since=t[1])
    assert closed_times(rig.drain()) == [t[2]]
    # 3 and 4 committed but their publish never came; 5 is published: healed, no gap
    rig.store.upsert(SID_1M, candles[3:6])
    rig.queue.offer_closed(SID_1M, candles[5:6], now=0.0)
    healed = rig.drain()
    assert closed_times(healed) == t[3:6]
    assert gaps(healed) == []
    # 6 and 7 are missing at the exchange (not in the store either): one gap, then 8
    rig.store.upsert(SID_1M, candles[8:9])
    rig.queue.offer_closed(SID_1M, candles[8:9], now=0.0)
    assert rig.drain() == [
        Gap(SID_1M, t[6], t[8]),
        ClosedCandles(SID_1M, (candles[8],), True),
    ]
    # a late 6 is below the cursor now: never sent (the factor.rebuild tells about it)
    rig.store.upsert(SID_1M, candles[6:7])
    rig.queue.offer_closed(SID_1M, candles[6:7], now=0.0)
    assert rig.drain() == []
    assert not rig.woken


def test_a_gap_after_the_client_cursor_is_reported_on_catch_up() -> None:
    rig = Rig()
    candles = real_candles()[:6]
    t = [c.candle_time for c in candles]
    rig.store.upsert(SID_1M, [candles[0], candles[1], candles[4], candles[5]])
    # the client's cursor is a stored candle: the hole after it is real
    subscribe(rig, SID_1M, since=t[1])
    sent = rig.drain()
    assert gaps(sent) == [(t[2], t[4])]
    assert closed_times(sent) == [t[4], t[5]]
    # a cursor the store does not have (before its history): no gap, just the candles
    subscribe(rig, SID_1M, since=t[0] - 3600)
    sent = rig.drain()
    assert gaps(sent) == [(t[2], t[4])]  # the hole inside the history is still one
    assert closed_times(sent) == [t[0], t[1], t[4], t[5]]


def test_derived_series_holes_use_their_own_timeframe() -> None:
    rig = Rig()
    fives = real_candles("5m")[:4]
    rig.store.upsert(SID_5M, fives[:2])
    subscribe(rig, SID_5M, since=fives[0].candle_time)
    assert closed_times(rig.drain()) == [fives[1].candle_time]
    rig.store.upsert(SID_5M, fives[3:])
    rig.queue.offer_closed(SID_5M, fives[3:], now=0.0)
    assert gaps(rig.drain()) == [(fives[2].candle_time, fives[3].candle_time)]


# --- forming, system, coalescing -------------------------------------------------------


def test_coalescing_one_message_per_series_per_drain() -> None:
    rig = Rig()
    candles = real_candles()[:8]
    t = [c.candle_time for c in candles]
    rig.store.upsert(SID_1M, candles)
    subscribe(rig, SID_1M, since=t[0])
    assert closed_times(rig.drain()) == t[1:]
    more = minutes(t[7] + 60, 6, price="108000")
    rig.store.upsert(SID_1M, more)
    # six publishes and three forming updates before the publish task runs: one drain
    for c in more:
        rig.queue.offer_closed(SID_1M, [c], now=0.0)
    later = more[-1].candle_time + 60
    forming = [attrs.evolve(more[-1], candle_time=later, close=Decimal(p)) for p in (1, 2, 3)]
    for f in forming:
        rig.queue.offer_forming(SID_1M, f)
    assert rig.queue.offer_message("system", now=0.0) is None
    assert rig.queue.queued == 6 + 1 + 1
    sent = rig.drain()
    assert sent[:2] == [
        ClosedCandles(SID_1M, tuple(more), True),
        FormingCandle(SID_1M, forming[-1]),
    ]
    assert summary(sent[2:]) == [("message", "system")]
    assert rig.queue.queued == 0


def test_forming_is_sent_only_above_the_cursor() -> None:
    rig = Rig()
    candles = real_candles()[:4]
    rig.store.upsert(SID_1M, candles)
    subscribe(rig, SID_1M, since=candles[0].candle_time)
    assert len(closed_times(rig.drain())) == 3
    rig.queue.offer_forming(SID_1M, candles[3])  # at the cursor: already closed
    assert rig.queue.queued == 0 and rig.drain() == []
    nxt = attrs.evolve(candles[3], candle_time=candles[3].candle_time + 60)
    rig.store.upsert(SID_1M, [nxt])
    # the close of that minute overtakes its still queued forming update
    rig.queue.offer_forming(SID_1M, nxt)
    rig.queue.offer_closed(SID_1M, [nxt], now=0.0)
    assert summary(rig.drain()) == [("closed", SID_1M, [nxt.candle_time], True)]
    assert rig.queue.queued == 0


def test_a_forming_candle_above_unpublished_closes_brings_them_from_the_store_first() -> None:
    # closes another process stored (an import) that the live path found already there and
    # never published: the forming candle after them must not overtake them
    rig, history = caught_up(5)
    imported = minutes(T0 + 300, 5)
    rig.store.upsert(SID_1M, imported)  # committed, never offered
    reads = len(rig.store.reads)
    forming = minutes(T0 + 600, 1)[0]
    rig.queue.offer_forming(SID_1M, forming)
    assert summary(rig.drain()) == [
        ("closed", SID_1M, [c.candle_time for c in imported], True),
        ("forming", SID_1M, forming.candle_time),
    ]
    assert rig.store.reads[reads:] == [ReadStore(SID_1M, history[-1].candle_time, 5000)]
    # the next forming update of that minute follows the cursor: no read
    rig.queue.offer_forming(SID_1M, attrs.evolve(forming, close=Decimal(101)))
    assert summary(rig.drain()) == [("forming", SID_1M, forming.candle_time)]
    assert len(rig.store.reads) == reads + 1


def test_a_forming_candle_after_a_hole_at_the_exchange_reads_once_then_goes() -> None:
    rig, _history = caught_up(5)
    reads = len(rig.store.reads)
    after_hole = minutes(T0 + 900, 1)[0]  # ten minutes the exchange never had
    for price in ("100", "101", "102"):
        rig.queue.offer_forming(SID_1M, attrs.evolve(after_hole, close=Decimal(price)))
        assert summary(rig.drain()) == [("forming", SID_1M, after_hole.candle_time)]
    # one read showed the hole is the store's own; the later updates go without one
    assert len(rig.store.reads) == reads + 1
    # its close is reported as a gap, as any hole after an anchored cursor
    rig.store.upsert(SID_1M, [after_hole])
    rig.queue.offer_closed(SID_1M, [after_hole], now=0.0)
    assert summary(rig.drain()) == [
        ("gap", SID_1M, T0 + 300, after_hole.candle_time),
        ("closed", SID_1M, [after_hole.candle_time], True),
    ]


def test_closes_published_during_the_read_go_before_the_forming_candle() -> None:
    rig, _history = caught_up(3)
    imported = minutes(T0 + 180, 3)
    rig.store.upsert(SID_1M, imported)
    forming = minutes(T0 + 420, 1)[0]
    rig.queue.offer_forming(SID_1M, forming)
    rig.woken = False
    plan = rig.queue.drain()
    read = plan.send(None)
    assert isinstance(read, ReadStore)
    answer: Answer = rig.store.read(read)
    # while the read's answer is on its way, the minute before the forming one closes
    closing = minutes(T0 + 360, 1)
    rig.store.upsert(SID_1M, closing)
    rig.queue.offer_closed(SID_1M, closing, now=0.0)
    sent: list[Outgoing] = []
    while True:
        try:
            action = plan.send(answer)
        except StopIteration:
            break
        assert isinstance(action, Send)
        sent.extend(action.messages)
        answer = None
    sent.extend(rig.drain())
    assert summary(sent) == [
        ("closed", SID_1M, [c.candle_time for c in imported], True),
        ("closed", SID_1M, [closing[0].candle_time], True),
        ("forming", SID_1M, forming.candle_time),
    ]
    assert rig.queue.queued == 0


def test_system_messages_follow_the_candles_published_before_them() -> None:
    rig = Rig()
    ones, fives = real_candles()[:5], real_candles("5m")[:1]
    subscribe(rig, SID_1M, since=T0 - 60)
    subscribe(rig, SID_5M, since=T0 - 300)
    assert rig.drain() == []
    rig.store.upsert(SID_1M, ones)
    rig.store.upsert(SID_5M, fives)
    rig.queue.offer_closed(SID_1M, ones, now=0.0)
    rig.queue.offer_message("rebuild 1m", now=0.0)
    rig.queue.offer_closed(SID_5M, fives, now=0.0)
    rig.queue.offer_message("rebuild 5m", now=0.0)
    assert [s[0] for s in summary(rig.drain())] == ["closed", "message", "closed", "message"]


def test_cursors_only_move_forward() -> None:
    rig = Rig()
    candles = minutes(T0, 6)
    rig.store.upsert(SID_1M, candles)
    subscribe(rig, SID_1M, since=candles[3].candle_time)
    assert closed_times(rig.drain()) == [candles[4].candle_time, candles[5].candle_time]
    # candles at or below the cursor are not even queued
    rig.queue.offer_closed(SID_1M, candles, now=0.0)
    assert rig.queue.queued == 0 and rig.drain() == []
    assert rig.queue.subscriptions[SID_1M].cursor == candles[5].candle_time


def test_subscribing_again_replaces_the_subscription_and_what_it_queued() -> None:
    rig = Rig()
    candles = minutes(T0, 6)
    rig.store.upsert(SID_1M, candles)
    subscribe(rig, SID_1M, since=candles[3].candle_time, batch=False)
    rig.drain()
    nxt = minutes(T0 + 360, 1)
    rig.store.upsert(SID_1M, nxt)
    rig.queue.offer_closed(SID_1M, nxt, now=0.0)
    rig.queue.offer_forming(SID_1M, minutes(T0 + 420, 1)[0])
    assert rig.queue.queued == 2
    subscribe(rig, SID_1M, since=candles[1].candle_time)
    assert rig.queue.queued == 0
    assert summary(rig.drain()) == [
        ("closed", SID_1M, [c.candle_time for c in [*candles[2:], *nxt]], True)
    ]
    assert rig.queue.unsubscribe(SID_1M) and not rig.queue.unsubscribe(SID_1M)


# --- slow consumers -------------------------------------------------------------------


def test_a_full_queue_drops_forming_first_then_lags_and_heals_from_the_store() -> None:
    # the rule half of tests/serve/test_hub.py's socket test of the same scenario
    rig = Rig(queue_max=4)
    candles = minutes(T0, 40, price="108000")
    rig.store.upsert(SID_1M, candles[:2])
    subscribe(rig, SID_1M, since=T0)
    assert closed_times(rig.drain()) == [candles[1].candle_time]
    rig.store.upsert(SID_1M, candles[2:])
    rig.queue.offer_forming(SID_1M, candles[3])
    for c in candles[2:5]:
        rig.queue.offer_closed(SID_1M, [c], now=7.0)
    # full with 3 closed and 1 forming: the forming goes first, no lag yet
    assert rig.queue.queued == 4
    rig.queue.offer_closed(SID_1M, [candles[5]], now=7.0)
    sub = rig.queue.subscriptions[SID_1M]
    assert (sub.forming, rig.queue.lagging_since, rig.queue.queued) == (None, None, 4)
    # the next one does not fit: lagging; the four that fitted are dropped too
    rig.queue.offer_closed(SID_1M, [candles[6]], now=7.0)
    assert (rig.queue.lagging_since, rig.lag_deadlines) == (7.0, [37.0])
    assert rig.queue.queued == 0 and sub.pending == {}
    assert sub.heal_target == candles[6].candle_time
    # further candles for a lagging subscription only raise its heal target
    for c in candles[7:]:
        rig.queue.offer_closed(SID_1M, [c], now=8.0)
    assert rig.queue.queued == 0 and sub.heal_target == candles[-1].candle_time
    sent = rig.drain()
    assert closed_times(sent) == [c.candle_time for c in candles[2:]]
    assert gaps(sent) == []
    assert (rig.queue.lagging_since, rig.lag_deadlines) == (None, [37.0, math.inf])
    # healed: live again
    nxt = minutes(candles[-1].candle_time + 60, 1)
    rig.store.upsert(SID_1M, nxt)
    rig.queue.offer_closed(SID_1M, nxt, now=9.0)
    assert closed_times(rig.drain()) == [nxt[0].candle_time]


def test_a_forming_candle_without_room_is_dropped_without_lagging() -> None:
    rig = Rig(queue_max=1)
    subscribe(rig, SID_1M, since=T0)
    rig.drain()
    assert rig.queue.offer_message("pong", now=0.0) is None
    rig.queue.offer_forming(SID_1M, minutes(T0 + 60, 1)[0])
    assert rig.queue.queued == 1 and rig.queue.lagging_since is None
    assert summary(rig.drain()) == [("message", "pong")]


def test_unsubscribing_from_the_lagging_series_ends_the_lag() -> None:
    rig = Rig(queue_max=2)
    candles = minutes(T0, 10)
    rig.store.upsert(SID_1M, candles)
    subscribe(rig, SID_1M, since=T0 + 60 * 9, batch=False)
    subscribe(rig, SID_5M, since=None)
    assert rig.drain() == []
    for c in candles:  # below the cursor: nothing to do
        rig.queue.offer_closed(SID_1M, [c], now=1.0)
    assert rig.queue.lagging_since is None
    more = minutes(T0 + 600, 3)
    rig.store.upsert(SID_1M, more)
    for c in more:
        rig.queue.offer_closed(SID_1M, [c], now=1.0)
    assert rig.queue.lag_deadline == 31.0 and rig.lag_deadlines == [31.0]
    assert rig.queue.unsubscribe(SID_1M)
    # nothing left to heal: no 4008 coming for it
    assert rig.queue.lagging_since is None and rig.queue.lag_deadline == math.inf
    assert rig.lag_deadlines == [31.0, math.inf]
    assert rig.drain() == []


def test_lagging_for_max_lag_s_is_a_4008() -> None:
    rig = Rig(queue_max=1, max_lag_s=5.0)
    subscribe(rig, SID_1M, since=T0 - 60)
    rig.drain()
    rig.store.upsert(SID_1M, minutes(T0, 2))
    rig.queue.offer_closed(SID_1M, minutes(T0, 2), now=10.0)
    assert (rig.queue.lagging_since, rig.queue.lag_deadline) == (10.0, 15.0)
    decision = rig.queue.lagged_out()
    assert decision == CloseDecision(
        4008, "slow consumer: lagging for more than 5s", "slow_consumer", "lagging"
    )
    assert rig.queue.closing
    # a closing queue takes nothing more and its drain stops
    rig.queue.offer_forming(SID_1M, minutes(T0 + 120, 1)[0])
    queued, rig.woken = rig.queue.queued, False
    rig.queue.offer_closed(SID_1M, minutes(T0 + 120, 1), now=15.0)
    rig.queue.offer_forming(SID_1M, minutes(T0 + 180, 1)[0])
    assert rig.queue.offer_message("late", now=15.0) is None
    assert rig.queue.queued == queued and not rig.woken
    rig.woken = True
    assert rig.drain() == []


def test_no_room_for_a_control_message_is_a_4008() -> None:
    rig = Rig(queue_max=2)
    subscribe(rig, SID_1M, since=T0 - 60)
    rig.drain()
    rig.store.upsert(SID_1M, minutes(T0, 1))
    rig.queue.offer_closed(SID_1M, minutes(T0, 1), now=0.0)
    rig.queue.offer_forming(SID_1M, minutes(T0 + 60, 1)[0])
    # full: the forming candle makes room
    assert rig.queue.offer_message("one", now=0.0) is None
    assert (rig.queue.subscriptions[SID_1M].forming, rig.queue.lagging_since) == (None, None)
    # full again: the closed candle is dropped (lagging), the message fits
    assert rig.queue.offer_message("two", now=0.0) is None
    assert rig.queue.lagging_since == 0.0 and rig.queue.queued == 2
    # only whole messages left: no room at all
    decision = rig.queue.offer_message("three", now=0.0)
    assert decision == CloseDecision(
        4008, "slow consumer: queue full", "slow_consumer", "queue_full"
    )
    assert rig.queue.closing and rig.queue.queued == 2


# --- hypothesis: random offers, drains and stalls ---------------------------------------


SERIES: Final = (SID_1M, SID_5M)


@attrs.define
class Model:
    """Drives one queue through random operations, checking its rules as it goes.

    The publish task is modelled one step at a time — start a drain, take a store read's
    snapshot, answer it, carry out a Send — so that offers and time land between any two
    of them, as they do between the publish task's awaits."""

    rig: Rig
    since: dict[str, int | None]
    max_lag_s: float
    now: float = 0.0
    next_time: dict[str, int] = attrs.field(factory=dict)
    held: dict[str, list[Candle]] = attrs.field(factory=dict)
    published: dict[str, set[int]] = attrs.field(factory=dict)
    sent: dict[str, list[int]] = attrs.field(factory=dict)
    cursor: dict[str, int | None] = attrs.field(factory=dict)
    messages: list[Outgoing] = attrs.field(factory=list)
    accepted: list[str] = attrs.field(factory=list)
    emitted: list[str] = attrs.field(factory=list)
    # a system message's text → the closed candles it must not overtake
    owed_before: dict[str, tuple[str, set[int]]] = attrs.field(factory=dict)
    lag_start: float | None = None
    decision: CloseDecision | None = None
    plan: Plan | None = None
    action: Action | None = None
    snapshot: list[Candle] | None = None
    counter: itertools.count[int] = attrs.field(factory=itertools.count)

    @property
    def queue(self) -> SubscriberQueue:
        return self.rig.queue

    # --- operations -------------------------------------------------------------------

    def make(self, sid: str, count: int) -> list[Candle]:
        start = self.next_time[sid]
        made = [
            Candle(start + TF[sid] * i, *(Decimal(start % 97 + i),) * 4, Decimal(1))
            for i in range(count)
        ]
        self.next_time[sid] = start + TF[sid] * count
        return made

    def publish(self, sid: str, candles: list[Candle]) -> None:
        if not candles:
            return
        sub = self.queue.subscriptions[sid]
        fresh = [c for c in candles if sub.cursor is None or c.candle_time > sub.cursor]
        added = sum(1 for c in fresh if c.candle_time not in sub.pending)
        formings = sum(s.forming is not None for s in self.queue.subscriptions.values())
        room = self.queue.queue_max - (self.queue.queued - formings)
        must_lag = bool(fresh) and sub.heal_target is None and added > room
        was_lagging = self.queue.lagging_since is not None
        fits = self.queue.queued + added <= self.queue.queue_max or sub.heal_target is not None
        before = {s: x.forming for s, x in self.queue.subscriptions.items()}
        self.published[sid].update(c.candle_time for c in candles)
        self.queue.offer_closed(sid, candles, self.now)
        assert (self.queue.lagging_since is not None) == (was_lagging or must_lag)
        if fits:
            # no room needed (or lagging already: not queued): the forming candles stay
            assert {s: x.forming for s, x in self.queue.subscriptions.items()} == before

    def outstanding(self) -> int:
        """Whole messages accepted and not yet taken out by the plan (a Send being carried
        out has left the queue)."""
        in_flight = self.action.messages if isinstance(self.action, Send) else ()
        taken = sum(isinstance(m, WholeMessage) for m in in_flight)
        return len(self.accepted) - len(self.emitted) - taken

    def offer_message(self, text: str, sid: str | None) -> None:
        outstanding = self.outstanding()
        decision = self.queue.offer_message(text, self.now)
        # forming and closed candles can all be dropped; whole messages cannot
        assert (decision is not None) == (outstanding + 1 > self.queue.queue_max)
        if decision is not None:
            assert decision.code == 4008
            self.decision = decision
            return
        self.accepted.append(text)
        if sid is not None:
            self.owed_before[text] = (sid, set(self.published[sid]))

    def run(self, op: tuple[str, int, int]) -> None:
        kind, index, n = op
        sid = SERIES[index]
        if kind == "publish":
            candles = self.make(sid, n)
            self.rig.store.upsert(sid, candles)
            self.publish(sid, candles)
        elif kind == "commit":  # its publish comes late (or a strict publish aborted)
            candles = self.make(sid, n)
            self.rig.store.upsert(sid, candles)
            self.held[sid].extend(candles)
        elif kind == "publish_late":
            self.publish(sid, self.held[sid])
            self.held[sid] = []
        elif kind == "skip":  # missing at the exchange: a hole in the store too
            self.next_time[sid] += TF[sid] * n
        elif kind == "forming":
            candle = self.make(sid, 1)[0]
            self.next_time[sid] -= TF[sid]
            self.queue.offer_forming(sid, candle)
        elif kind == "system":
            self.offer_message(f"system {sid} {next(self.counter)}", sid)
        elif kind == "control":
            self.offer_message(f"pong {next(self.counter)}", None)
        elif kind == "step":
            for _ in range(n):
                self.step()
        else:  # stall: time passes without the publish task running
            self.now += n
            # lagging for max_lag_s: the shell's lag deadline fires
            expect = self.lag_start is not None and self.now >= self.lag_start + self.max_lag_s
            assert (self.now >= self.queue.lag_deadline) == expect
            if expect:
                self.decision = self.queue.lagged_out()
                assert (self.decision.code, self.queue.closing) == (4008, True)

    # --- the publish task, one step at a time -------------------------------------------

    def step(self) -> None:
        if self.plan is None:
            if not self.rig.woken:
                return
            self.rig.woken = False
            self.plan = self.queue.drain()
            self.resume(None)
        elif isinstance(self.action, ReadStore) and self.snapshot is None:
            self.snapshot = self.rig.store.read(self.action)
        elif isinstance(self.action, ReadStore):
            rows, self.snapshot = self.snapshot, None
            self.resume(rows)
        else:
            assert isinstance(self.action, Send)
            for message in self.action.messages:
                self.emit(message)
            self.resume(None)

    def resume(self, answer: Sequence[Candle] | None) -> None:
        assert self.plan is not None
        try:
            self.action = self.plan.send(answer)
        except StopIteration:
            self.plan = self.action = None

    def emit(self, message: Outgoing) -> None:
        self.messages.append(message)
        if isinstance(message, ClosedCandles):
            sid = message.series_id
            times = [c.candle_time for c in message.candles]
            assert times == sorted(set(times))
            cursor = self.cursor[sid]
            assert cursor is None or times[0] > cursor, "at or below the cursor"
            assert not set(times) & set(self.sent[sid]), "sent twice"
            self.sent[sid].extend(times)
            self.cursor[sid] = times[-1]
        elif isinstance(message, Gap):
            cursor = self.cursor[message.series_id]
            assert (
                cursor is not None and message.expected_next_time == cursor + TF[message.series_id]
            )
        elif isinstance(message, FormingCandle):
            self.check_forming(message)
        elif isinstance(message, WholeMessage):
            self.emitted.append(message.text)
            assert self.emitted == self.accepted[: len(self.emitted)], "messages reordered"
            owed = self.owed_before.get(message.text)
            if owed is not None:
                sid, published = owed
                since = self.since[sid]
                # since: null: the catch-up was the newest catchup_limit
                floor = min(self.sent[sid], default=math.inf) - 1 if since is None else since
                missing = {t for t in published if t > floor} - set(self.sent[sid])
                assert not missing, f"{message.text} overtook closed candles {missing}"

    def check_forming(self, message: FormingCandle) -> None:
        sid, t = message.series_id, message.candle.candle_time
        cursor = self.cursor[sid]
        assert cursor is None or t > cursor
        # every close stored before it is sent first, published or not (committed by
        # "commit" and published late: another process's writes, say)
        since = self.since[sid]
        floor = min(self.sent[sid], default=t) - 1 if since is None else since
        owed = {s for s in self.rig.store.times(sid) if floor < s < t} - set(self.sent[sid])
        assert not owed, f"forming {t} overtook {owed}"

    # --- invariants ---------------------------------------------------------------------

    def check(self) -> None:
        queue = self.queue
        subs = queue.subscriptions.values()
        assert queue.queued <= queue.queue_max
        held = sum(len(s.pending) + (s.forming is not None) for s in subs)
        assert queue.queued == held + self.outstanding()
        lagging = queue.lagging_since is not None
        if self.lag_start is None and lagging:
            self.lag_start = self.now
        elif not lagging:
            self.lag_start = None
        assert queue.lagging_since == self.lag_start
        assert lagging == any(s.heal_target is not None for s in subs)
        if self.plan is None:
            for sid, sub in queue.subscriptions.items():
                self.check_covered(sid, sub.pending, sub.heal_target)

    def check_covered(self, sid: str, pending: dict[int, Candle], target: int | None) -> None:
        """Everything owed is sent, queued, or below a hole or heal target still to come
        from the store: a candle dropped for lag is under its subscription's heal target."""
        since = self.since[sid]
        if since is None or not self.published[sid]:
            return
        newest = max(self.published[sid])
        owed = {t for t in self.rig.store.times(sid) if since < t <= newest}
        for t in sorted(owed - set(self.sent[sid])):
            covered = (
                t in pending or (target is not None and t <= target) or t < max(pending, default=-1)
            )
            assert covered, f"{sid} {t} neither sent, queued nor to be healed"
            assert self.rig.woken, "owed candles but no drain to come"

    def finish(self) -> None:
        """Publish what was held and one more candle per series, drain until idle, and
        compare what was sent with the store."""
        for index in range(len(SERIES)):
            self.run(("publish_late", index, 0))
            self.check()
            self.run(("publish", index, 1))
            self.check()
        while self.decision is None and (self.plan is not None or self.rig.woken):
            self.step()
            self.check()
        if self.decision is not None:
            return
        assert self.accepted == self.emitted
        for sid in SERIES:
            stored, times, since = self.rig.store.times(sid), self.sent[sid], self.since[sid]
            if since is None:
                assert times, "the final publish must arrive"
                assert times == [t for t in stored if t >= times[0]]
                anchored: list[int] = []
            else:
                assert times == [t for t in stored if t > since]
                anchored = [since] if since in stored else []
            delivered = anchored + times
            expected = [
                (a + TF[sid], b) for a, b in itertools.pairwise(delivered) if b - a > TF[sid]
            ]
            got = [
                (m.expected_next_time, m.actual_time)
                for m in self.messages
                if isinstance(m, Gap) and m.series_id == sid
            ]
            assert got == expected


OPS: Final = st.one_of(
    st.tuples(st.just("publish"), st.integers(0, 1), st.integers(1, 4)),
    st.tuples(st.just("commit"), st.integers(0, 1), st.integers(1, 3)),
    st.tuples(st.just("publish_late"), st.integers(0, 1), st.just(0)),
    st.tuples(st.just("skip"), st.integers(0, 1), st.integers(1, 2)),
    st.tuples(st.just("forming"), st.integers(0, 1), st.just(0)),
    st.tuples(st.just("system"), st.integers(0, 1), st.just(0)),
    st.tuples(st.just("control"), st.just(0), st.just(0)),
    st.tuples(st.just("step"), st.just(0), st.integers(1, 6)),
    st.tuples(st.just("stall"), st.just(0), st.integers(1, 3)),
)


@settings(max_examples=300, deadline=None)
@given(
    history=st.tuples(st.integers(0, 8), st.integers(0, 3)),
    since_choice=st.tuples(*[st.sampled_from(["stored", "before", "null", "head"])] * 2),
    batch=st.tuples(st.booleans(), st.booleans()),
    queue_max=st.sampled_from([1, 2, 3, 5, 8, 1000]),
    catchup_limit=st.sampled_from([1, 2, 3, 50]),
    ops=st.lists(OPS, max_size=40),
)
def test_random_offers_drains_and_stalls_keep_every_rule(
    history: tuple[int, int],
    since_choice: tuple[str, str],
    batch: tuple[bool, bool],
    queue_max: int,
    catchup_limit: int,
    ops: list[tuple[str, int, int]],
) -> None:
    max_lag_s = 3.0
    rig = Rig(queue_max=queue_max, catchup_limit=catchup_limit, max_lag_s=max_lag_s)
    model = Model(rig, {}, max_lag_s)
    for index, sid in enumerate(SERIES):
        model.next_time[sid] = T0
        model.held[sid], model.published[sid], model.sent[sid] = [], set(), []
        stored = model.make(sid, history[index])
        rig.store.upsert(sid, stored)
        times = [c.candle_time for c in stored]
        since = {
            "stored": times[len(times) // 2] if times else None,
            "before": T0 - 10 * TF[sid],
            "null": None,
            "head": times[-1] if times else None,
        }[since_choice[index]]
        model.since[sid] = model.cursor[sid] = since
        rig.queue.subscribe(sid, TF[sid], since, batch[index])
    model.check()
    for op in ops:
        model.run(op)
        if model.decision is not None:
            return
        model.check()
    model.finish()


# --- the event-log cursor (events_after) -----------------------------------------------


def _event(rig: Rig, sid: str, name: str) -> int:
    """Log an event (as the pipeline does in its transaction); its id."""
    return rig.store.log_event(sid, f"event {name}")


def _messages(sent: Sequence[Outgoing]) -> list[object]:
    return [
        ("truncated", m.events_after, m.pruned_upto)
        if isinstance(m, EventsTruncated)
        else m.text
        if isinstance(m, WholeMessage)
        else ("closed", closed_times([m]))
        if isinstance(m, ClosedCandles)
        else type(m).__name__
        for m in sent
    ]


def test_stored_events_come_first_then_catch_up_then_live_with_no_doubles() -> None:
    rig = Rig()
    rig.store.upsert(SID_1M, flat_minutes(T0, 3))
    _event(rig, SID_1M, "a")
    second = _event(rig, SID_1M, "b")
    _event(rig, SID_5M, "other series")
    rig.queue.subscribe(SID_1M, 60, T0, True, events_after=0)
    # published while the subscription waits for its stored events: one the read has too,
    # and a newer one
    rig.queue.offer_event(SID_1M, second, "event b", 0.0)
    third = _event(rig, SID_1M, "c")
    rig.queue.offer_event(SID_1M, third, "event c", 0.0)
    assert _messages(rig.drain()) == [
        "event a",
        "event b",
        "event c",
        ("closed", [T0 + 60, T0 + 120]),
    ]
    # a live event the cursor is past is not sent again; a new one is
    rig.queue.offer_event(SID_1M, second, "event b", 0.0)
    fourth = _event(rig, SID_1M, "d")
    rig.queue.offer_event(SID_1M, fourth, "event d", 0.0)
    assert _messages(rig.drain()) == ["event d"]
    assert rig.queue.queued == 0


def test_a_cursor_older_than_the_retention_gets_events_truncated_once() -> None:
    rig = Rig()
    rig.store.pruned_upto = 7
    kept = _event(rig, SID_1M, "kept")
    rig.queue.subscribe(SID_1M, 60, None, True, events_after=3)
    assert _messages(rig.drain())[:2] == [("truncated", 3, 7), "event kept"]
    assert kept == 8
    # a cursor at the retention's edge lost nothing
    rig.queue.subscribe(SID_1M, 60, None, True, events_after=7)
    assert "truncated" not in str(_messages(rig.drain()))


def test_closes_published_during_a_send_go_before_the_forming_candle_without_a_read() -> None:
    # a busy moment (a replay at speed, a REST repair): the next close and the forming
    # candle after it are offered while the drain sends; what is owed is in memory
    rig, _history = caught_up(3)
    reads = len(rig.store.reads)
    sent: list[Outgoing] = []
    for i in range(3, 40, 2):
        close, nxt, forming = minutes(T0 + 60 * i, 3)
        rig.store.upsert(SID_1M, [close])
        rig.queue.offer_closed(SID_1M, [close], now=0.0)
        rig.woken = False
        plan = rig.queue.drain()
        action = plan.send(None)
        assert isinstance(action, Send)
        sent.extend(action.messages)
        # while that send is out, the next minute closes and the one after it forms
        rig.store.upsert(SID_1M, [nxt])
        rig.queue.offer_closed(SID_1M, [nxt], now=0.0)
        rig.queue.offer_forming(SID_1M, forming)
        for _ in plan:
            raise AssertionError("nothing more in this plan")
        sent.extend(rig.drain())
    assert len(rig.store.reads) == reads  # no read: every close owed was published
    assert closed_times(sent) == sorted(set(closed_times(sent)))
    overtaken = [
        m.candle.candle_time
        for k, m in enumerate(sent)
        if isinstance(m, FormingCandle)
        and m.candle.candle_time - 60 > max(closed_times(sent[:k]), default=0)
    ]
    assert overtaken == []


def test_an_event_published_while_the_stored_ones_are_read_is_not_lost() -> None:
    # the cursor may move back (above the log's newest id): one queued meanwhile must stay
    rig = Rig()
    for name in ("a", "b", "c", "d"):
        _event(rig, SID_1M, name)
    rig.queue.subscribe(SID_1M, 60, None, True, events_after=10)
    rig.woken = False
    plan = rig.queue.drain()
    read = plan.send(None)
    assert isinstance(read, ReadEvents)
    answer = rig.store.read_events(read)
    live = _event(rig, SID_1M, "live")
    rig.queue.offer_event(SID_1M, live, "event live", now=0.0)
    sent: list[Outgoing] = []
    step: Answer = answer
    while True:
        try:
            action = plan.send(step)
        except StopIteration:
            break
        if isinstance(action, ReadStore):  # the candles' catch-up (none stored)
            step = rig.store.read(action)
            continue
        assert isinstance(action, Send)
        sent.extend(action.messages)
        step = None
    sent.extend(rig.drain())
    assert _messages(sent) == [("truncated", 10, 4), "event live"]


def test_a_cursor_above_the_newest_event_starts_over_from_it() -> None:
    # a store restored from an older backup gives ids again that a client already passed
    rig = Rig()
    for name in ("a", "b", "c"):
        _event(rig, SID_1M, name)
    rig.queue.subscribe(SID_1M, 60, None, True, events_after=10)
    sent = rig.drain()
    [truncated] = [m for m in sent if isinstance(m, EventsTruncated)]
    assert (truncated.events_after, truncated.pruned_upto, truncated.ahead) == (10, 3, True)
    # the next event of this log (id 4, below the old cursor) reaches the client
    new = _event(rig, SID_1M, "after the restore")
    rig.queue.offer_event(SID_1M, new, "event after the restore", now=0.0)
    assert _messages(rig.drain()) == ["event after the restore"]


def test_without_events_after_only_live_events_and_no_read() -> None:
    rig = Rig()
    _event(rig, SID_1M, "old")
    rig.queue.subscribe(SID_1M, 60, None, True)
    rig.drain()
    live = _event(rig, SID_1M, "live")
    rig.queue.offer_event(SID_1M, live, "event live", 0.0)
    assert _messages(rig.drain()) == ["event live"]


def test_stored_events_are_read_in_pages_of_catchup_limit() -> None:
    rig = Rig(catchup_limit=2)
    names = [str(i) for i in range(5)]
    for name in names:
        _event(rig, SID_1M, name)
    rig.queue.subscribe(SID_1M, 60, None, True, events_after=0)
    assert [m for m in _messages(rig.drain()) if isinstance(m, str)] == [
        f"event {n}" for n in names
    ]


def test_resubscribing_with_a_cursor_keeps_stored_events_before_queued_live_ones() -> None:
    rig = Rig()
    rig.queue.subscribe(SID_1M, 60, None, True)
    rig.drain()
    first = _event(rig, SID_1M, "1")
    second = _event(rig, SID_1M, "2")
    rig.queue.offer_event(SID_1M, second, "event 2", 0.0)  # queued for the old subscription
    rig.queue.subscribe(SID_1M, 60, None, True, events_after=0)
    sent = [m for m in _messages(rig.drain()) if isinstance(m, str)]
    assert sent == ["event 1", "event 2"]
    assert first < second
