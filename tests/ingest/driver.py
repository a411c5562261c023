"""A synchronous stand-in for the ingest loop's shell around IngestCore (pure: no trio, no
sockets): Driver feeds raw Binance frames, answers the REST fills the core asks for from a
"truth" of minutes, commits what the core queues and records, per series, what the hub
would have been handed, in order. Shared by test_core.py and test_ordering.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from decimal import Decimal

import attrs

from tradecanvas.errors import WireError
from tradecanvas.ingest.batcher import BatchItem, Holes
from tradecanvas.ingest.core import IngestCore
from tradecanvas.ingest.outcomes import FrameOutcome
from tradecanvas.ingest.policy import IngestPolicy
from tradecanvas.ingest.tracker import FillRequest
from tradecanvas.model import MINUTE, Candle, SeriesId
from tradecanvas.runtime_flags import build_runtime_flags
from tradecanvas.wire.binance import KlineEvent, decode_frame, kline_frame
from tradecanvas.wire.json import dumps

BTC = SeriesId.parse("binance:futures:BTC/USDT:1m")
ETH = SeriesId.parse("binance:futures:ETH/USDT:1m")
T0 = 1_751_760_000  # 2025-07-06 00:00 UTC, a 5m (and day) boundary
LATE_S = 10


def bar(t: int, price: int = 100, volume: str = "1") -> Candle:
    """A minute whose every field survives a trip through a Binance frame unchanged."""
    p = Decimal(price)
    return Candle(
        t, p, p + 1, p - 1, p, Decimal(volume), Decimal("2"), 3, Decimal("0.5"), Decimal("1")
    )


def truth_of(count: int, missing: Iterable[int] = (), start: int = T0) -> dict[int, Candle]:
    gone = set(missing)
    return {start + 60 * i: bar(start + 60 * i, 100 + i) for i in range(count) if i not in gone}


def kline(sid: SeriesId, candle: Candle, *, closed: bool, event_time_ms: int) -> str:
    return dumps(kline_frame(sid, candle, closed=closed, event_time_ms=event_time_ms))


def close_of(sid: SeriesId, candle: Candle, late_ms: int = 0) -> str:
    """The close frame Binance sends as the minute ends (``late_ms`` after, if delayed)."""
    return kline(sid, candle, closed=True, event_time_ms=(candle.candle_time + 60) * 1000 + late_ms)


def forming_of(sid: SeriesId, candle: Candle, into_ms: int = 30_000) -> str:
    return kline(sid, candle, closed=False, event_time_ms=candle.candle_time * 1000 + into_ms)


def make_core(
    series: Sequence[SeriesId] = (BTC,),
    *,
    head: int | None = T0 - 60,
    first: int | None = None,
    unresolved: Holes = (),
    policy: IngestPolicy | None = None,
    **env: str,
) -> IngestCore:
    environ = {
        "TRADE_CANVAS_LATE_CLOSE_S": str(LATE_S),
        "TRADE_CANVAS_INITIAL_BACKFILL_CANDLES": "0",
        "TRADE_CANVAS_DERIVED_TIMEFRAMES": "5m",
        "TRADE_CANVAS_MARKET_FORMING_MIN_INTERVAL_MS": "0",
    }
    environ.update({f"TRADE_CANVAS_{k.upper()}": v for k, v in env.items()})
    flags = build_runtime_flags(environ).flags
    core = IngestCore(series, flags=flags, policy=policy or IngestPolicy())
    for sid in series:
        # the store's history starts at ``first`` (default: at its head)
        start = head if first is None else first
        core.load_series(sid, head=head, first=start, unresolved=unresolved, recent=())
    return core


@attrs.frozen
class Sent:
    """One thing handed to the hub: a published closed candle or a forming one."""

    series_id: str
    kind: str  # "closed" or "forming"
    time: int


@attrs.define
class Driver:
    """The shell's part, synchronously: frames in, REST answered from ``truth``, commits.

    REST knows a minute once exchange time (the newest ``E`` sent) is ``rest_lag_ms`` past
    its end; ``rest_up`` False fails every fill. ``sent`` is what the hub was handed, in
    order: the base candles each commit publishes, the derived bars the pipeline would
    publish with them (a bucket once its last minute is settled: stored or confirmed
    absent), and the forming candles the core let out (base and derived).
    """

    core: IngestCore
    truth: dict[SeriesId, dict[int, Candle]]
    now: float = 0.0
    rest_lag_ms: int = 0
    rest_up: bool = True
    exchange_ms: int = 0
    pending: list[tuple[SeriesId, FillRequest]] = attrs.Factory(list)
    fills: list[FillRequest] = attrs.Factory(list)
    committed: list[BatchItem] = attrs.Factory(list)
    forming: list[tuple[str, Candle]] = attrs.Factory(list)
    sent: list[Sent] = attrs.Factory(list)
    malformed: list[str] = attrs.Factory(list)
    absent: int = 0
    rest_released: int = 0
    repaired: int = 0
    forced: int = 0
    saved_holes: dict[SeriesId, Holes] = attrs.Factory(dict)
    # per series: committed minutes, how far it is settled, derived bars published
    _stored: dict[SeriesId, set[int]] = attrs.Factory(dict)
    _settled: dict[SeriesId, int] = attrs.Factory(dict)
    _derived_sent: set[tuple[str, int]] = attrs.Factory(set)

    def send(self, raw: str, generation: int = 1) -> FrameOutcome:
        with contextlib.suppress(WireError):
            decoded = decode_frame(raw)
            if isinstance(decoded, KlineEvent):
                self.exchange_ms = max(self.exchange_ms, decoded.event_time_ms)
        outcome = self.core.on_frame(raw, generation=generation, received_at=self.now, now=self.now)
        if outcome.malformed is not None:
            self.malformed.append(outcome.malformed.reason)
        self.emit(outcome.forming)
        self.emit(self.core.due_forming(self.now))
        self.plan()
        return outcome

    def emit(self, forming: Iterable[tuple[SeriesId, Candle]]) -> None:
        for sid, candle in forming:
            # never a forming update for a bar at or below the released head
            head = self.core.trackers[sid].head
            assert head is None or candle.candle_time > head
            for series_id, update in self.core.forming_updates(sid, candle):
                self.forming.append((series_id, update))
                self.sent.append(Sent(series_id, "forming", update.candle_time))

    def plan(self) -> None:
        plan = self.core.next_fills(self.now)
        self.pending.extend(plan.start)
        self.fills.extend(request for _, request in plan.start)
        self.forced += len(plan.forced)

    def answer(self) -> None:
        """REST answers every fill in flight (and those they lead to)."""
        while self.pending:
            sid, request = self.pending.pop(0)
            if not self.rest_up:
                self.core.on_fill_failed(sid, request, self.now)
                continue
            known = [
                c
                for t, c in self.truth[sid].items()
                if request.start <= t < request.end
                and (t + 60) * 1000 + self.rest_lag_ms <= self.exchange_ms
            ]
            outcome = self.core.on_fill_result(sid, request, known, self.now)
            self.absent += outcome.absent
            self.rest_released += outcome.rest_released
            self.repaired += outcome.repaired
            if outcome.save_holes is not None:
                self.saved_holes[sid] = outcome.save_holes
            self.emit(outcome.forming)
            self.plan()

    def commit(self) -> None:
        """Commit (and publish) every queued batch, as the committer task does."""
        while (batch := self.core.take_batch()) is not None:
            self.publish(batch.items)
            self.emit(self.core.on_committed(batch.items, self.now))

    def commit_due(self) -> None:
        """Commit what the core says is due now (the committer task is idle)."""
        while (due := self.core.batch_due_at()) is not None and due <= self.now:
            batch = self.core.take_batch()
            assert batch is not None
            self.publish(batch.items)
            self.emit(self.core.on_committed(batch.items, self.now))

    def take(self) -> Sequence[BatchItem] | None:
        """Start committing the next batch if one is due (the committer is then busy until
        :meth:`finish`)."""
        due = self.core.batch_due_at()
        if due is None or due > self.now:
            return None
        batch = self.core.take_batch()
        return None if batch is None else batch.items

    def finish(self, items: Sequence[BatchItem]) -> None:
        """The commit of ``items`` (from :meth:`take`) is done: publish, then the core."""
        self.publish(items)
        self.emit(self.core.on_committed(items, self.now))

    def publish(self, items: Sequence[BatchItem]) -> None:
        self.committed.extend(items)
        for item in items:
            stored = self._stored.setdefault(item.series, set())
            settled = self._settled.get(item.series, -1)
            if item.candle is not None:
                self.sent.append(Sent(str(item.series), "closed", item.time))
                stored.add(item.time)
                settled = max(settled, item.time)
            elif item.absent is not None:
                settled = max(settled, item.absent[1] - MINUTE)
            self._settled[item.series] = settled
        for sid in {item.series for item in items}:
            self._publish_derived(sid)

    def _publish_derived(self, sid: SeriesId) -> None:
        """The derived bars the pipeline publishes with this commit: every bucket with a
        stored minute whose last minute is settled (complete or, after a hole, not)."""
        settled = self._settled[sid]
        for tf in self.core.derived:
            series_id = str(sid.with_timeframe(tf))
            for bucket in sorted({tf.floor(t) for t in self._stored[sid]}):
                if (series_id, bucket) in self._derived_sent:
                    continue
                if tf.next_open(bucket) - MINUTE <= settled:
                    self._derived_sent.add((series_id, bucket))
                    self.sent.append(Sent(series_id, "closed", bucket))

    def settle(self) -> None:
        """Time passes (REST retries are due), REST answers, everything is committed."""
        for _ in range(50):
            self.now += 100.0
            self.plan()
            if not self.pending:
                break
            self.answer()
        self.commit()

    def times(self, sid: SeriesId = BTC) -> list[int]:
        return [c.candle_time for c in self.candles(sid)]

    def candles(self, sid: SeriesId = BTC) -> list[Candle]:
        return [c for i in self.committed if i.series == sid and (c := i.candle) is not None]

    def absent_runs(self, sid: SeriesId = BTC) -> list[tuple[int, int]]:
        return [r for i in self.committed if i.series == sid and (r := i.absent) is not None]


def overtaken(sent: Sequence[Sent]) -> list[tuple[Sent, Sent]]:
    """Per series, each closed candle handed to the hub after a forming candle of a later
    bar: (the forming one, the closed one). A charting client keeps its newest bar and
    drops such a close, so this must stay empty (DESIGN §10)."""
    newest: dict[str, Sent] = {}
    found: list[tuple[Sent, Sent]] = []
    for item in sent:
        forming = newest.get(item.series_id)
        if item.kind == "forming":
            if forming is None or item.time >= forming.time:
                newest[item.series_id] = item
        elif forming is not None and item.time < forming.time:
            found.append((forming, item))
    return found
