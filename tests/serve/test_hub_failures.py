"""The Hub's reports of failed subscribers after they are gone: a failed connection's queue is
freed at detach, yet the next closed/system publish of one of its series reports it, once,
even when that series has no subscribers left; and a flood of failed clients on a series
that never publishes again keeps only a bounded few reports.

Real Hub, subscribers and queues on a fake connection (the helpers of tests/serve/test_hub.py).
"""

from __future__ import annotations

import gc
import tracemalloc
import weakref

from tests.conftest import flat_minutes
from tests.serve.test_hub import T0, FakeSocket, MemoryReader, connected, make_hub, metric, settled
from tests.serve.test_ws_server import SERIES_1M, SERIES_5M, SID_1M, SID_5M, real_candles
from tradecanvas.model import Candle
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.serve.hub import MAX_FAILURES_LISTED, Hub
from tradecanvas.serve.subscriber import Subscriber
from tradecanvas.serve.subscriber_queue import SubscriberQueue

REPORT = "subscriber fake:1: connection lost"


def _alive(kind: type) -> int:
    """How many objects of exactly ``kind`` exist (slotted: no weak references to them)."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is kind)


def _one_minute(index: int = 0) -> list[Candle]:
    return list(flat_minutes(T0 + 60 * index, 1))


def _fail_and_detach(hub: Hub, peer: str, *, also_5m: bool = False) -> None:
    """A connection on the 1m series (and the 5m one) whose delivery failed, then ended (no
    publish task: detach is what frees it)."""
    subscriber = hub.attach(FakeSocket(), peer=peer, max_subscriptions=64)
    hub.subscribe(subscriber, SERIES_1M, T0 - 60, batch=True)
    if also_5m:
        hub.subscribe(subscriber, SERIES_5M, None, batch=True)
    subscriber.fail("connection lost", disconnect_reason="connection_lost")
    hub.detach(subscriber)


async def test_a_failed_subscriber_is_freed_at_detach_and_reported_once() -> None:
    hub = make_hub(MemoryReader(list(flat_minutes(T0, 3))))
    healthy_socket = FakeSocket()
    async with connected(hub, healthy_socket) as healthy:
        hub.subscribe(healthy, SERIES_1M, T0 - 60, batch=True)
        victim_socket = FakeSocket()
        socket_gone = weakref.ref(victim_socket)
        async with connected(hub, victim_socket) as victim:
            hub.subscribe(victim, SERIES_1M, T0 - 60, batch=True)
            hub.subscribe(victim, SERIES_5M, None, batch=True)
            await settled()
            victim.fail("connection lost", disconnect_reason="connection_lost")
            queues, subscribers = _alive(SubscriberQueue), _alive(Subscriber)
        del victim, victim_socket
        await hub.wait_subscribers(1)
        # freed at detach, not at the report: its connection, its queue, the Subscriber
        assert (_alive(SubscriberQueue), _alive(Subscriber)) == (queues - 1, subscribers - 1)
        assert socket_gone() is None
        assert hub.statistics().subscribers == 1
        assert metric(hub.metrics, "tradecanvas_subscribers") == 1.0
        # forming publishes never report, and leave the report to the next closed one
        hub.publish_forming(SID_1M, _one_minute(3)[0])
        event = SystemEvent(SID_1M, "revision", T0, T0)
        assert hub.publish_system(event) == [REPORT]
        assert hub.publish_system(event) == []
        # reported once for the subscriber: its other series does not report it again
        assert hub.publish_closed(SID_5M, real_candles("5m")[:1]) == []
        await settled()
        assert healthy_socket.sent[-2:] == [event.to_wire(), event.to_wire()]


async def test_a_series_with_no_subscribers_left_still_reports_its_failed_one() -> None:
    hub = make_hub(MemoryReader())
    victim_socket = FakeSocket()
    socket_gone = weakref.ref(victim_socket)
    async with connected(hub, victim_socket) as victim:
        hub.subscribe(victim, SERIES_1M, T0 - 60, batch=True)
        hub.subscribe(victim, SERIES_5M, None, batch=True)
        await settled()
        victim.fail("connection lost", disconnect_reason="connection_lost")
    del victim, victim_socket
    gc.collect()
    assert socket_gone() is None  # the Subscriber holding it is gone
    assert hub.statistics().subscribers == 0
    assert metric(hub.metrics, "tradecanvas_subscribers") == 0.0
    assert hub.publish_closed(SID_1M, []) == ()  # nothing published: nothing reported
    # the 5m series publishes first this time; the 1m one then has nothing to report
    assert hub.publish_closed(SID_5M, real_candles("5m")[:1]) == [REPORT]
    assert hub.publish_closed(SID_1M, _one_minute()) == []
    assert hub.publish_system(SystemEvent(SID_5M, "revision", T0, T0)) == []


async def test_ten_thousand_failed_subscribers_on_a_silent_series_keep_a_bounded_report() -> None:
    hub = make_hub(MemoryReader())
    tracemalloc.start()
    try:
        for i in range(1000):
            _fail_and_detach(hub, f"peer:{i}")
        gc.collect()
        after_a_thousand = tracemalloc.get_traced_memory()[0]
        for i in range(1000, 10_000):
            _fail_and_detach(hub, f"peer:{i}")
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - after_a_thousand
    finally:
        tracemalloc.stop()
    # 9,000 more failed clients: no more retained (each queue alone is kilobytes)
    assert grown < 64 * 1024, grown
    assert hub.statistics().subscribers == 0
    failures = hub.publish_closed(SID_1M, _one_minute())
    listed = [f"subscriber peer:{i}: connection lost" for i in range(MAX_FAILURES_LISTED)]
    assert failures == [*listed, f"and {10_000 - MAX_FAILURES_LISTED} more subscriber(s)"]
    assert hub.publish_closed(SID_1M, _one_minute(1)) == []


async def test_reports_of_gone_and_attached_failed_subscribers_share_one_bound() -> None:
    hub = make_hub(MemoryReader())
    queues = _alive(SubscriberQueue)
    for i in range(MAX_FAILURES_LISTED - 1):
        _fail_and_detach(hub, f"gone:{i}")
    assert _alive(SubscriberQueue) == queues  # the gone ones are freed, their reports kept
    # failed but not detached yet (its session has not ended): the fan-out reports it
    attached = [hub.attach(FakeSocket(), peer=f"here:{i}", max_subscriptions=64) for i in range(2)]
    for subscriber in attached:
        hub.subscribe(subscriber, SERIES_1M, T0 - 60, batch=True)
        subscriber.fail("connection lost", disconnect_reason="connection_lost")
    failures = hub.publish_closed(SID_1M, _one_minute())
    assert failures[: MAX_FAILURES_LISTED - 1] == [
        f"subscriber gone:{i}: connection lost" for i in range(MAX_FAILURES_LISTED - 1)
    ]
    assert failures[MAX_FAILURES_LISTED - 1 :] == [
        "subscriber here:0: connection lost",
        "and 1 more subscriber(s)",
    ]
    for subscriber in attached:
        hub.detach(subscriber)  # already reported: nothing left to report
    assert hub.publish_closed(SID_1M, _one_minute(1)) == []


async def test_failed_subscribers_beyond_the_listed_are_counted_by_each_of_their_series() -> None:
    hub = make_hub(MemoryReader())
    for i in range(MAX_FAILURES_LISTED + 5):
        _fail_and_detach(hub, f"peer:{i}", also_5m=True)
    listed = [f"subscriber peer:{i}: connection lost" for i in range(MAX_FAILURES_LISTED)]
    assert hub.publish_closed(SID_1M, _one_minute()) == [*listed, "and 5 more subscriber(s)"]
    # reports made by the 1m publish leave room on the 5m series for new ones
    for i in range(3):
        subscriber = hub.attach(FakeSocket(), peer=f"late:{i}", max_subscriptions=64)
        hub.subscribe(subscriber, SERIES_5M, None, batch=True)
        subscriber.fail("connection lost", disconnect_reason="connection_lost")
        hub.detach(subscriber)
    # only a count is kept beyond the listed, so the 5m series (which cannot tell which of
    # them the 1m one counted) counts them again
    assert hub.publish_closed(SID_5M, real_candles("5m")[:1]) == [
        *(f"subscriber late:{i}: connection lost" for i in range(3)),
        "and 5 more subscriber(s)",
    ]
    assert hub.publish_closed(SID_5M, real_candles("5m")[1:2]) == []
