"""What the Hub's publishes report: a client gone (its connection broke) is freed at detach
and reported by no publish — it is no publish failure, however many leave; an exception
while queueing for a subscriber is, listed up to ``MAX_FAILURES_LISTED`` and the rest counted.

Real Hub, subscribers and queues on a fake connection (the helpers of tests/serve/test_hub.py).
"""

from __future__ import annotations

import gc
import tracemalloc
import weakref

import pytest

from tests.conftest import flat_minutes
from tests.serve.test_hub import T0, FakeSocket, MemoryReader, connected, make_hub, metric, settled
from tests.serve.test_ws_server import SERIES_1M, SERIES_5M, SID_1M, SID_5M, real_candles
from tradecanvas.model import Candle
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.serve.hub import MAX_FAILURES_LISTED, Hub
from tradecanvas.serve.subscriber import Subscriber
from tradecanvas.serve.subscriber_queue import SubscriberQueue


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


async def test_a_gone_subscriber_is_freed_at_detach_and_reported_by_no_publish() -> None:
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
        hub.publish_forming(SID_1M, _one_minute(3)[0])
        event = SystemEvent(SID_1M, "revision", T0, T0)
        assert hub.publish_system(event) == []
        assert hub.publish_system(event) == []
        assert not hub.publish_closed(SID_5M, real_candles("5m")[:1])  # none subscribed
        await settled()
        assert healthy_socket.sent[-2:] == [event.to_wire(), event.to_wire()]


async def test_a_series_with_no_subscribers_left_reports_nothing() -> None:
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
    assert hub.publish_closed(SID_1M, []) == ()
    assert hub.publish_closed(SID_5M, real_candles("5m")[:1]) == []
    assert hub.publish_closed(SID_1M, _one_minute()) == []
    assert hub.publish_system(SystemEvent(SID_5M, "revision", T0, T0)) == []


async def test_ten_thousand_gone_subscribers_on_a_silent_series_retain_nothing() -> None:
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
    # 9,000 more clients gone: nothing more retained (each queue alone is kilobytes)
    assert grown < 64 * 1024, grown
    assert hub.statistics().subscribers == 0
    assert hub.publish_closed(SID_1M, _one_minute()) == []


async def test_queueing_errors_beyond_the_listed_are_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hub = make_hub(MemoryReader())
    attached = [
        hub.attach(FakeSocket(), peer=f"peer:{i}", max_subscriptions=64)
        for i in range(MAX_FAILURES_LISTED + 3)
    ]
    for subscriber in attached:
        hub.subscribe(subscriber, SERIES_1M, T0 - 60, batch=True)
    gone = hub.attach(FakeSocket(), peer="gone", max_subscriptions=64)
    hub.subscribe(gone, SERIES_1M, T0 - 60, batch=True)
    gone.fail("connection lost", disconnect_reason="connection_lost")

    def broken(*args: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(SubscriberQueue, "offer_closed", broken)  # slotted instances
    listed = [f"subscriber peer:{i}: RuntimeError: bug" for i in range(MAX_FAILURES_LISTED)]
    # the gone one is not among them: only the daemon's own failures are
    assert hub.publish_closed(SID_1M, _one_minute()) == [*listed, "and 3 more subscriber(s)"]
    assert all(s.disconnect_reason == "internal_error" for s in attached)
