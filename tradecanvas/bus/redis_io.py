"""The bus's Redis boundary (coredis on anyio's trio backend): clients, the one place Redis's
errors are recognised, and the health both bus services report.

coredis raises :class:`coredis.exceptions.RedisError` subclasses, anyio stream errors and
``OSError`` when Redis goes away, sometimes inside the exception groups of its own task
groups; :func:`redis_failure` finds them, so the publisher and the feed catch a Redis failure
(log it, report it in their health, back off, reconnect: :func:`reconnecting`) and let
everything else through. Every client is made with coredis's retries off: the bus services
own their reconnects.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

import anyio
import attrs
import coredis
import trio
from coredis.commands.constants import CommandName
from coredis.exceptions import RedisError, ResponseError
from coredis.response._callbacks import NoopCallback
from coredis.retry import NoRetryPolicy

from tradecanvas.errors import find_in_group
from tradecanvas.upstream.backoff import Backoff

CONNECT_TIMEOUT_S: Final = 5.0
# Redis's answer to an XADD whose ID is not above the stream's top (bus/publisher.py)
XADD_REFUSAL: Final = "equal or smaller than the target stream top item"
_FAILURES: Final = (
    RedisError,
    OSError,
    TimeoutError,
    trio.TooSlowError,
    trio.BrokenResourceError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
)


@attrs.frozen
class BusHealth:
    """For /readyz and logs: ``connected`` to Redis now, the ``last_error`` seen (kept after a
    reconnect, for the operator), ``backlog`` entries waiting for Redis (the publisher's
    outbox; a feed has none)."""

    connected: bool
    last_error: str | None
    backlog: int


_AS_SENT: Final = NoopCallback[object]()


async def as_sent(
    client: coredis.Redis[bytes], command: CommandName, *args: str | bytes | int
) -> object:
    """``command`` with ``args``, answered as Redis sent it (no coredis conversion)."""
    return await client.create_request(command, *args, callback=_AS_SENT)


def open_redis(url: str) -> coredis.Redis[bytes]:
    """A client for ``url`` (``redis://host:port/db``); use it as ``async with``."""
    return coredis.Redis.from_url(
        url,
        decode_responses=False,
        retry_policy=NoRetryPolicy(),
        connect_timeout=CONNECT_TIMEOUT_S,
    )


async def refused_settings(url: str) -> str | None:
    """Why the Redis at ``url`` refuses the URL's own settings — its database index, its user
    and password, a command its ACL denies — which no retry cures; None when it takes them,
    or cannot be reached now (the bus services wait for it and say so). Redis answers such a
    refusal with an error reply (:class:`ResponseError`) to the connection's handshake or
    to PING; a server still loading its data answers ``BusyLoadingError``, a connection
    failure, not that."""
    try:
        async with open_redis(url) as client:
            with trio.fail_after(CONNECT_TIMEOUT_S):
                await client.ping()
    except BaseException as exc:
        refusal = find_in_group(exc, ResponseError)
        if refusal is None:
            failure_or_raise(exc)  # anything but a Redis failure goes through
            return None
        return str(refusal) or type(refusal).__name__
    return None


def redis_failure(exc: BaseException) -> BaseException | None:
    """The Redis failure in ``exc`` (or in its exception groups), else None."""
    for kind in _FAILURES:
        found = find_in_group(exc, kind)
        if found is not None:
            return found
    return None


def failure_or_raise(exc: BaseException) -> BaseException:
    """The Redis failure in ``exc``, to retry after; re-raises ``exc`` when it holds none,
    and only the cancellation when it holds one too (coredis's clean-up of a connection can
    fail while it is being cancelled: the cancellation is what happened)."""
    failure = redis_failure(exc)
    if failure is None:
        raise exc
    if isinstance(exc, BaseExceptionGroup):
        cancelled, _ = exc.split(trio.Cancelled)
        if cancelled is not None:
            raise cancelled from None
    return failure


def describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):  # a command's deadline (command_timeout_s)
        return "no answer in time (TooSlowError)"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def reconnecting(
    url: str,
    session: Callable[[coredis.Redis[bytes]], Awaitable[None]],
    *,
    command_timeout_s: float,
    backoff: Backoff,
    on_connected: Callable[[bool], None],
    on_failure: Callable[[BaseException], None],
) -> None:
    """Run ``session`` on a client of ``url`` until it returns, through Redis failures.

    Each connection is checked with a PING (within ``command_timeout_s``), then reported to
    ``on_connected`` (True when it follows a failure: a reconnect). A Redis failure
    (:func:`failure_or_raise`; anything else goes through) is reported to ``on_failure``, and
    the next connection is tried after ``backoff``'s delay.
    """
    attempt = 0
    while True:
        try:
            async with open_redis(url) as client:
                with trio.fail_after(command_timeout_s):
                    await client.ping()
                on_connected(attempt > 0)
                attempt = 0
                await session(client)
                return
        except BaseException as exc:
            on_failure(failure_or_raise(exc))
        attempt += 1
        await trio.sleep(backoff.delay(attempt))
