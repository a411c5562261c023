"""The Redis boundary: which errors are Redis failures, and a cancellation stays one."""

from __future__ import annotations

import pytest
import trio
from coredis.exceptions import ConnectionError

from tradecanvas.bus.redis_io import describe, failure_or_raise, redis_failure


def test_redis_failures_are_found_inside_groups() -> None:
    lost = ConnectionError("Connection lost")
    assert redis_failure(lost) is lost
    assert redis_failure(ExceptionGroup("g", [ExceptionGroup("h", [lost])])) is lost
    assert redis_failure(OSError("refused")) is not None
    assert redis_failure(ValueError("a bug")) is None
    assert describe(lost) == "ConnectionError: Connection lost"


def test_anything_else_is_raised_again() -> None:
    bug = ValueError("a bug")
    with pytest.raises(ValueError, match="a bug"):
        failure_or_raise(bug)
    lost = ConnectionError("x")
    assert failure_or_raise(lost) is lost


async def test_a_cancellation_with_a_failed_clean_up_stays_a_cancellation() -> None:
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.lowlevel.checkpoint()
        except trio.Cancelled as cancelled:
            group = BaseExceptionGroup("clean-up", [cancelled, ConnectionError("closed")])
            with pytest.raises(BaseExceptionGroup) as raised:
                failure_or_raise(group)
            assert raised.value.split(trio.Cancelled)[1] is None
            raise
    assert scope.cancelled_caught
