"""The ingest lease's trio shell (the rules: ``bus/lease.py``): which of the ingest nodes
ingests, the fencing of its writes, its metrics and log lines.

- :class:`IngestLeader` asks Redis for the lease every quarter TTL while standing by and
  renews it every third while holding it. On taking it over it takes the next fencing token
  from the store and calls ``on_leader`` (the daemon starts the ingest supervisor, which
  loads the store's heads and repairs from them through REST as after any restart). A
  renewal answered "held by another node" raises :class:`IngestFenced`; so does a write
  the fence refuses. Both end the daemon with exit code 3 (a StoreError): systemd restarts
  the node, which stands by.
- :class:`FencedStore` is the store as the ingest's pipeline sees it: every write first checks,
  in the same transaction, that the store's fencing token is this node's.

Errors: Redis failures never escape :meth:`IngestLeader.run` (logged, shown as
``tradecanvas_dependency_up{dependency="redis_lease"}``); store errors do.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar, final

import trio
from coredis import PureToken, Redis
from prometheus_client import Counter, Gauge

from tradecanvas.bus.ids import StreamKeys
from tradecanvas.bus.ingest_report import IngestReport
from tradecanvas.bus.lease import (
    FENCE_KEY,
    FENCE_NODE_KEY,
    HELD_BY_OTHER,
    LeaseCore,
    LeaseTiming,
    Verdict,
    fence_allows,
    next_fence,
)
from tradecanvas.bus.outage_log import OutageLog
from tradecanvas.bus.redis_io import describe, failure_or_raise, open_redis
from tradecanvas.errors import IngestFenced
from tradecanvas.ingest.supervisor import ConnectionState
from tradecanvas.ops.metrics import Metrics
from tradecanvas.service_urls import url_without_password
from tradecanvas.store.interface import MarketStore, WriteTxn
from tradecanvas.store.wrapped import WrappedStore

log = logging.getLogger(__name__)
T = TypeVar("T")

COMMAND_TIMEOUT_S: Final = 5.0
# extend the lease if it is ours, set it again if it is gone, else say who holds it
_RENEW: Final = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, v}
elseif not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {2, ARGV[1]}
end
return {0, v}
"""
# let the lease go, if it is still ours, and the report to the edges with it
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# the report is advisory: its write never holds the lease's exchange up for long
REPORT_TIMEOUT_S: Final = 1.0


def node_name() -> str:
    """This process among the ingest nodes: host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _text(value: object) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


@final
class IngestLeader:
    """Holds, renews and releases the ingest lease (module docstring)."""

    def __init__(
        self,
        url: str,
        keys: StreamKeys,
        store: FencedStore,
        metrics: Metrics,
        *,
        timing: LeaseTiming | None = None,
        node: str | None = None,
    ) -> None:
        self.url = url
        self.key = keys.lease
        self.report_key = keys.ingest_report
        # whether Binance is connected, for the report written with each renewal (the
        # daemon sets it once the supervisor exists; bus/ingest_report.py)
        self.upstream_connected: Callable[[], bool] = lambda: False
        # and each connection, for an edge's /healthz?series_id= (None: not told)
        self.connections: Callable[[], tuple[ConnectionState, ...] | None] = lambda: None
        self.store = store
        self.core = LeaseCore(node or node_name(), timing)
        self._connected: bool | None = None  # None: Redis not asked yet
        self._outage = OutageLog(log)
        self._became_leader = trio.Event()
        registry = metrics.registry
        Gauge(
            "tradecanvas_ingest_leader",
            "1 while this ingest node holds the lease and ingests, 0 while it stands by",
            registry=registry,
        ).set_function(lambda: float(self.core.leader))
        self._takeovers = Counter(
            "tradecanvas_ingest_takeovers",
            "Times this ingest node took the lease over (its first start included)",
            registry=registry,
        )
        metrics.dependency_up.labels(dependency="redis_lease").set_function(
            lambda: float(self.redis_answers)
        )

    @property
    def node(self) -> str:
        return self.core.node

    @property
    def leader(self) -> bool:
        return self.core.leader

    @property
    def redis_answers(self) -> bool:
        """Redis answered the lease's last exchange (False before the first):
        ``/readyz``'s ``bus_lease_connected`` (``bus/roles.py``)."""
        return bool(self._connected)

    async def wait_leader(self) -> None:
        await self._became_leader.wait()

    async def run(
        self,
        on_leader: Callable[[], Awaitable[None]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Stand by or lead until cancelled. Raises IngestFenced when deposed."""
        log.info(
            "ingest lease: node %s stands by for %s (TTL %d ms)",
            self.node,
            self.key,
            self.core.timing.ttl_ms,
        )
        task_status.started()
        while True:
            await trio.sleep_until(self.core.next_at())
            verdict = await self._ask()
            if verdict is Verdict.TAKE_OVER:
                await self._take_over(on_leader)
            elif verdict is Verdict.DEPOSED:
                raise IngestFenced(
                    f"ingest lease: node {self.core.holder} holds the lease now; node "
                    f"{self.node} stops ingesting (restarted, it stands by)"
                )

    async def _ask(self) -> Verdict:
        """One exchange with Redis: acquire (standby) or renew (holder)."""
        core, ttl = self.core, self.core.timing.ttl_ms
        try:
            async with open_redis(self.url) as client:
                with trio.fail_after(COMMAND_TIMEOUT_S):
                    if core.leader:
                        got = await client.eval(_RENEW, keys=[self.key], args=[self.node, ttl])
                        assert isinstance(got, list)
                        answer, holder = int(str(got[0])), _text(got[1])
                        if answer != HELD_BY_OTHER:  # still ours: tell the edges of Binance
                            await self._report(client, ttl)
                    elif core.probing:  # after a failure: look only (LeaseCore.on_failure)
                        taken, holder = False, _text(await client.get(self.key))
                    else:
                        taken = await client.set(
                            self.key, self.node, condition=PureToken.NX, px=ttl
                        )
                        holder = None if taken else _text(await client.get(self.key))
                        if taken:
                            await self._report(client, ttl)
        except BaseException as exc:
            failure = failure_or_raise(exc)
            # the first failure of an outage (at start-up too: "stands by" alone read as if
            # another node held the lease), then a summary a minute (OutageLog)
            doing = "still ingesting (the store's fence guards the writes)"
            line = f"ingest lease: Redis failed ({describe(failure)}); "
            self._outage.failed(
                trio.current_time(), line + (doing if core.leader else "standing by")
            )
            self._connected = False
            return core.on_failure(trio.current_time())
        if not self._connected:
            took = self._outage.recovered(trio.current_time())
            log.info("ingest lease: Redis answers at %s%s", url_without_password(self.url), took)
        self._connected = True
        now = trio.current_time()
        if core.leader:
            if answer == 2:
                log.warning("ingest lease: the lease was gone (Redis restarted?); set it again")
            return core.on_renew(answer, holder, now)
        previous = core.holder
        if core.probing:
            verdict = core.on_probe(holder, now)
        else:
            verdict = core.on_acquire(bool(taken), holder, now)
        if verdict is Verdict.STANDBY and holder != previous:
            log.info("ingest lease: node %s ingests; this node stands by", holder)
        return verdict

    async def _report(self, client: Redis[bytes], ttl_ms: int) -> None:
        """The holder's report to the edges, expiring with the lease (bus/ingest_report.py).
        Advisory: a failure is logged, never taken for the lease's (its verdict stands)."""
        report = IngestReport(self.node, self.upstream_connected(), self.connections())
        try:
            with trio.move_on_after(REPORT_TIMEOUT_S) as scope:
                await client.set(self.report_key, report.encode(), px=ttl_ms)
        except BaseException as exc:
            log.debug("ingest report not written (%s)", describe(failure_or_raise(exc)))
            return
        if scope.cancelled_caught:
            log.debug("ingest report not written within %.1f s", REPORT_TIMEOUT_S)

    async def _take_over(self, on_leader: Callable[[], Awaitable[None]]) -> None:
        token, previous = await self.store.take_fence(self.node)
        self._takeovers.inc()
        # a takeover from another node is worth a look; the store's first holder is not
        log.log(
            logging.WARNING if previous else logging.INFO,
            "ingest lease: node %s took the lease over (fence %d, previous holder %s); "
            "ingesting, repairing from the store's last candles",
            self.node,
            token,
            previous or "none",
        )
        self._became_leader.set()
        await on_leader()

    async def release(self) -> None:
        """Let the lease go at a clean shutdown, after the ingest stopped: a standby takes
        over at its next poll instead of a TTL later. Bounded; a failure is only logged."""
        if not self.core.leader:
            return
        self.core.stepped_down()
        try:
            with trio.move_on_after(COMMAND_TIMEOUT_S):
                async with open_redis(self.url) as client:
                    await client.eval(_RELEASE, keys=[self.key, self.report_key], args=[self.node])
                    log.info("ingest lease: released by node %s", self.node)
        except BaseException as exc:
            failure = failure_or_raise(exc)
            log.warning("ingest lease: not released (%s); it expires", describe(failure))


@final
class FencedStore(WrappedStore):
    """A MarketStore whose writes check the fencing token first (module docstring). All
    else is the wrapped store's."""

    def __init__(self, store: MarketStore) -> None:
        super().__init__(store)
        self.token: int | None = None  # None: not a holder (a standby's HTTP write)

    async def take_fence(self, node: str) -> tuple[int, str | None]:
        """The next fencing token, written with this node's name; (token, previous node)."""

        def take(txn: WriteTxn) -> tuple[int, str | None]:
            token = next_fence(txn.get_meta(FENCE_KEY))
            previous = txn.get_meta(FENCE_NODE_KEY)
            txn.set_meta(FENCE_KEY, str(token))
            txn.set_meta(FENCE_NODE_KEY, node)
            return token, previous

        token, previous = await self.inner.write(take)
        self.token = token
        return token, previous

    async def write(self, fn: Callable[[WriteTxn], T], *, quick: bool = False) -> T:
        token = self.token

        def fenced(txn: WriteTxn) -> T:
            stored = txn.get_meta(FENCE_KEY)
            if not fence_allows(stored, token):
                raise IngestFenced(
                    f"ingest fence: the store's token is {stored} (node "
                    f"{txn.get_meta(FENCE_NODE_KEY)}), this node's {token}: another node took "
                    "over; this one stops writing (restarted, it stands by)"
                )
            return fn(txn)

        return await self.inner.write(fenced, quick=quick)
