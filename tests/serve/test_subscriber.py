"""A connection's trio half: close decisions, failures, the lag scope's deadline following
the queue, control messages. No sockets: the socket is never sent to here."""

from __future__ import annotations

import math
from typing import Final

import trio

from tests.conftest import flat_minutes
from tradecanvas.serve.subscriber import Subscriber

SID: Final = "binance:futures:BTC/USDT:1m"
T0: Final = 1751760000


class NeverSends:
    async def send_message(self, message: str) -> None:
        raise AssertionError("nothing is sent in these tests")


def make_subscriber(queue_max: int = 4, max_lag_s: float = 3.0) -> Subscriber:
    return Subscriber(
        NeverSends(), "peer:1", 8, queue_max=queue_max, max_lag_s=max_lag_s, catchup_limit=10
    )


async def test_the_first_close_decision_wins_and_cancels_the_connection() -> None:
    subscriber = make_subscriber()
    assert (subscriber.closing, subscriber.close_code) == (False, None)
    subscriber.close(1008, "abuse", disconnect_reason="rate_limited")
    subscriber.close(1001, "server shutdown", disconnect_reason="shutdown")
    subscriber.fail("connection lost", disconnect_reason="connection_lost")
    assert (subscriber.close_code, subscriber.close_reason) == (1008, "abuse")
    assert (subscriber.disconnect_reason, subscriber.failure) == ("rate_limited", None)
    assert subscriber.closing and subscriber.queue.closing
    assert subscriber.cancel_scope.cancel_called


async def test_a_failure_is_kept_and_a_later_close_ignored() -> None:
    subscriber = make_subscriber()
    subscriber.fail("connection lost", disconnect_reason="connection_lost")
    subscriber.close(1001, "server shutdown", disconnect_reason="shutdown")
    subscriber.mark_client_closed()
    assert (subscriber.failure, subscriber.close_code) == ("connection lost", None)
    assert subscriber.disconnect_reason == "connection_lost"
    assert subscriber.closing and subscriber.cancel_scope.cancel_called


async def test_a_client_close_is_a_normal_end() -> None:
    subscriber = make_subscriber()
    subscriber.mark_client_closed()
    assert subscriber.disconnect_reason == "client_closed"
    assert not subscriber.closing


async def test_the_lag_scope_deadline_follows_the_queue() -> None:
    subscriber = make_subscriber(queue_max=2, max_lag_s=3.0)
    subscriber.queue.subscribe(SID, 60, T0 - 60, batch=True)
    assert subscriber.lag_scope.deadline == math.inf
    now = trio.current_time()
    subscriber.queue.offer_closed(SID, list(flat_minutes(T0, 3)), now)
    assert subscriber.lag_scope.deadline == now + 3.0
    subscriber.queue.unsubscribe(SID)  # nothing left to heal
    assert subscriber.lag_scope.deadline == math.inf


async def test_a_control_message_without_room_closes_4008() -> None:
    subscriber = make_subscriber(queue_max=1)
    subscriber.send_control({"type": "pong"})
    assert (subscriber.close_code, subscriber.queue.queued) == (None, 1)
    subscriber.send_control({"type": "pong"})
    assert (subscriber.close_code, subscriber.close_reason) == (4008, "slow consumer: queue full")
    assert subscriber.disconnect_reason == "slow_consumer"
    assert subscriber.cancel_scope.cancel_called
