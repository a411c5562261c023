"""IngestCore: every decision of one Binance ingest loop, without I/O (pure).

Nothing here imports trio, a socket or an HTTP library; the trio shell
(:mod:`tradecanvas.ingest.loop`) passes in the raw frames, the REST answers and the time,
and carries out what the core returns. Two clocks appear and are never mixed (DESIGN §1.2):
*exchange time* (the frames' ``E`` and kline times) decides which minutes are missing and
when a close is late; *monotonic time* (``now``, ``received_at``) only times batches, the
forming throttle, REST retries and how long held candles wait.

One candle's path through the core::

    on_frame(raw) ─ decode ─┬─ control frame: nothing (serverShutdown is the reader's)
                            ├─ forming ─ FormingGate ─ FormingThrottle ─▶ FrameOutcome.forming
                            │            (forming_updates adds the derived ones, MinuteCache)
                            └─ closed ─ SeriesTracker ─ Released ─▶ ClosedBatcher
    next_fills(now) ─▶ FillPlan: REST ranges to fetch, when to look again, forced releases
    on_fill_result / on_fill_failed ─ SeriesTracker ─ Released, absent runs ─▶ ClosedBatcher
    take_batch() ─▶ CommitBatch ─▶ (shell: IngestPipeline.run, publish) ─▶ on_committed(items)
                                                         ─▶ held forming candles to publish

The frames of all series on one connection share one exchange clock, so a quiet symbol's
late close is noticed from the other streams' frames. A frame is dropped as malformed before
it changes anything (that clock included) when it does not decode, when its stream is not
ours, when it carries another symbol than its stream's, or when it is ahead of this
machine's clock (:mod:`~tradecanvas.ingest.frame_bounds`: one ``E`` of the year 2100 would
make every minute up to 2100 late).

**Order per subscription** (DESIGN §10, :mod:`~tradecanvas.ingest.ordering`): a forming
candle of bar ``t`` is held (the newest only) while anything before ``t`` of its series is
owed — its tracker's head is below ``t - 60``, or something of the series is queued for a
commit or in the batch being committed — and released by :meth:`IngestCore.on_committed`,
which the shell calls *after* publishing that commit, so the closed candles always reach
the hub first. Derived forming bars are built with their base candle and held with it.

**Exchange holes and derived bars.** A derived bucket whose last minutes are missing at the
exchange is finalised (stored incomplete, with a ``gap``) by the pipeline run that settles
its last minute. When the tracker confirms a run of minutes absent, the run goes into the
batcher as an entry of its own, in time order with the series' candles; the commit that
takes it passes it as ``IngestBatch.absent`` (a ``gap`` event, and the pipeline counts the
run as settled, so the bucket it ends is finalised in that same transaction). Usually the
candle above the hole is released by the same REST answer and shares the commit; at the
live edge (the minutes before the next close are confirmed absent by exchange time) the run
is committed on its own. Either way it is owed like a close, so the next bucket's forming
bar waits for it. This keeps the rule in one place — the pipeline finalises a bucket when
its last minute is settled — instead of holding derived forming bars for a whole minute
until the first candle above the hole closes.

**Flushes (group commit).** With ``binance_ws_flush_s`` 0 (the default) a batch is due as
soon as anything is queued: the committer task takes everything queued whenever it is idle,
so the closes that arrive during a commit form the next group. Above 0, a batch is due at
once when nothing else is pending for the group
(:func:`~tradecanvas.ingest.ordering.group_settled`: every live series has settled the newest
minute), else once the oldest entry is ``binance_ws_flush_s`` old — the longest a close waits
for the rest of its minute's closes. Either way at most ``batch_max`` go in one commit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Final, final

import attrs

from tradecanvas.errors import WireError
from tradecanvas.ingest.batcher import BatchItem, ClosedBatcher, FormingThrottle, Holes, MinuteCache
from tradecanvas.ingest.behind_head import BehindHead
from tradecanvas.ingest.forming import derived_forming
from tradecanvas.ingest.frame_bounds import ClockBound
from tradecanvas.ingest.ordering import FormingGate, group_settled
from tradecanvas.ingest.outcomes import (
    PLAIN_OUTCOMES,
    CommitBatch,
    FillOutcome,
    FillPlan,
    FrameOutcome,
    Malformed,
)
from tradecanvas.ingest.policy import IngestPolicy
from tradecanvas.ingest.tracker import REPAIR_REASONS, FillRequest, Released, SeriesTracker
from tradecanvas.model import MINUTE, MINUTE_MS, MS, Candle, SeriesId, Timeframe
from tradecanvas.runtime_flags import RuntimeFlags
from tradecanvas.wire.binance import ControlFrame, KlineEvent, decode_frame

# the shortest pause before a failed REST fill is asked for again (the backoff's full
# jitter may draw 0, and a REST that fails at once must not be hammered)
FILL_RETRY_MIN_S: Final = 0.1


@final
@attrs.define
class _Live:
    """What a frame of one stream needs, in one lookup by stream name (several SeriesId
    lookups a frame, each hashing it, were a few % of the daemon's CPU at full speed)."""

    sid: SeriesId
    interval: str
    symbol: str  # Binance's (``BTCUSDT``): a frame of its stream carrying another is refused
    tracker: SeriesTracker
    generation: int = 0  # the newest connection a frame of it came on
    last_open: int | None = None  # the newest kline open time seen


@final
class IngestCore:
    """The state of one loop's series: a SeriesTracker each, the ClosedBatcher, the forming
    gate and throttle, the recent minutes, the exchange clock and the REST fills in flight.

    Serves one market, 1m series only (ValueError otherwise). Call :meth:`load_series`
    for every series before the first frame. Raises nothing else: bad frames come back as
    :class:`Malformed`, and so do frames ahead of ``wall_clock`` (unix seconds; the only
    clock the core reads itself, rarely: :class:`~tradecanvas.ingest.frame_bounds.ClockBound`).
    """

    def __init__(
        self,
        series: Sequence[SeriesId],
        *,
        flags: RuntimeFlags,
        policy: IngestPolicy,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        markets = {s.market for s in series}
        if len(markets) != 1:
            raise ValueError(f"one loop serves one market, got {sorted(markets)}")
        for sid in series:
            if sid.timeframe.seconds != MINUTE:
                raise ValueError(f"{sid}: only 1m series are ingested")
        self.series = tuple(series)
        self.derived: tuple[Timeframe, ...] = tuple(flags.derived_timeframes)
        self.initial_backfill = flags.initial_backfill_candles
        self.late_close_ms = round(flags.late_close_s * MS)
        self.policy = policy
        self.trackers: dict[SeriesId, SeriesTracker] = {}
        self.batcher = ClosedBatcher(flags.binance_ws_batch_max, flags.binance_ws_flush_s)
        self.throttle: FormingThrottle[SeriesId] = FormingThrottle(
            flags.market_forming_min_interval_ms / MS
        )
        span = max((tf.seconds for tf in self.derived), default=MINUTE) + MINUTE
        self.minutes = MinuteCache(span)
        self.gate = FormingGate()
        self._live: dict[str, _Live] = {}  # stream name → its series (load_series)
        self.clock_bound = ClockBound(wall_clock)
        self._exchange_time_ms = 0
        self._exchange_minute = -1  # (E - late_close) // 60 s last applied to the trackers
        self._fill_minutes_in_flight = 0
        self._reported: set[str] = set()
        self.behind = BehindHead()  # closed klines at or below a head, in runs (behind_head.py)

    # --- start-up ------------------------------------------------------------------------

    @property
    def recent_span_s(self) -> int:
        """How far below the head the shell loads stored minutes for :meth:`load_series`."""
        return self.minutes.span_s

    def load_series(
        self,
        sid: SeriesId,
        *,
        head: int | None,
        first: int | None,
        unresolved: Holes,
        recent: Sequence[Candle],
        listing: int | None = None,
    ) -> None:
        """The store's state of ``sid``: head, first minute (where its history starts),
        holes, minutes :attr:`recent_span_s` below the head, its recorded listing."""
        self.trackers[sid] = tracker = SeriesTracker(
            head=head,
            initial_backfill=self.initial_backfill,
            late_close_ms=self.late_close_ms,
            unresolved=unresolved,
            stored=(c.candle_time for c in recent),
        )
        self._live[sid.stream_name] = _Live(sid, sid.timeframe.text, sid.rest_symbol, tracker)
        self.minutes.start_history(sid, first)
        self.minutes.set_listing(sid, listing)
        self.minutes.add(sid, recent)

    # --- frames --------------------------------------------------------------------------

    def on_frame(
        self, raw: str | bytes, *, generation: int, received_at: float, now: float
    ) -> FrameOutcome:
        """One raw frame of connection ``generation`` (counting up), received at
        ``received_at`` and processed at ``now``."""
        try:
            decoded = decode_frame(raw)
        except WireError as exc:
            return FrameOutcome(malformed=self.malformed(exc.reason, exc.detail))
        if isinstance(decoded, ControlFrame):
            # acks and other events change nothing; serverShutdown was acted on by the
            # connection's reader (upstream.binance_ws)
            return PLAIN_OUTCOMES[False, False]
        live = self._live.get(decoded.stream_name)
        if live is None or decoded.interval != live.interval:
            return FrameOutcome(malformed=self.malformed("unknown_stream", decoded.stream_name))
        if decoded.symbol != live.symbol:  # a combined frame of another symbol's stream
            detail = f"stream {decoded.stream_name} carries a kline of {decoded.symbol!r}"
            return FrameOutcome(malformed=self.malformed("symbol_mismatch", detail))
        bound = self.clock_bound  # refused before it moves any clock
        if bound.may_refuse(decoded) and (ahead := bound.problem(decoded)) is not None:
            return FrameOutcome(malformed=self.malformed("ahead_of_clock", ahead))
        return self._on_kline(live, decoded, generation, received_at, now)

    def malformed(self, reason: str, detail: str) -> Malformed:
        """A malformed input of kind ``reason`` (also a candle the store refused)."""
        return Malformed(reason, detail, self.first_report(reason))

    def first_report(self, kind: str) -> bool:
        """True the first time ``kind`` is reported on this loop (log once per kind)."""
        if kind in self._reported:
            return False
        self._reported.add(kind)
        return True

    def _on_kline(
        self, live: _Live, event: KlineEvent, generation: int, received_at: float, now: float
    ) -> FrameOutcome:
        sid, tracker = live.sid, live.tracker
        candle = event.candle
        # the first frame of this series on a newer connection: nothing is replayed after
        # a disconnect, so the tracker asks REST for what the old one missed
        new_connection = live.generation < generation
        if new_connection:
            live.generation = generation
        had_head = tracker.head is not None
        t = candle.candle_time
        if live.last_open is None or t > live.last_open:
            live.last_open = t
        tracker.on_live_frame(t, new_connection=new_connection)
        wake_fills = new_connection or not had_head
        wake_fills |= self._advance_exchange_time(event.event_time_ms)
        if event.closed:
            self.throttle.discard(sid, t)
            self.gate.drop(sid, t)
            self.behind.note(sid, t, tracker.head, received_at)  # a run of old closes: said
            released = tracker.on_closed(candle, now=received_at, received_at=received_at)
            queued = self._enqueue(sid, released, now)
            return PLAIN_OUTCOMES[wake_fills or tracker.held_count() > 0, queued]
        head = tracker.head
        if head is None or t > head:  # never a bar already closed
            forming = self._offer_forming(sid, candle, head, received_at)
            if forming:
                return FrameOutcome(forming=forming, wake_fills=wake_fills)
        return PLAIN_OUTCOMES[wake_fills, False]

    def _offer_forming(
        self, sid: SeriesId, candle: Candle, head: int | None, now: float
    ) -> tuple[tuple[SeriesId, Candle], ...]:
        """Through the gate (held while something before it is owed), then the throttle."""
        if not self.gate.allows(sid, candle.candle_time, head):
            self.gate.hold(sid, candle)
            self.throttle.discard(sid, candle.candle_time)  # superseded by the held one
            return ()
        self.gate.drop(sid)  # an older held one is superseded
        emit = self.throttle.offer(sid, candle, now)
        return () if emit is None else ((sid, emit),)

    def _release_forming(self, now: float) -> tuple[tuple[SeriesId, Candle], ...]:
        """Held forming candles nothing is owed for any more (publish them now; they pass
        the throttle, which counts them as sent)."""
        if not len(self.gate):
            return ()
        released = self.gate.release({sid: tr.head for sid, tr in self.trackers.items()})
        for sid, _ in released:
            self.throttle.note_sent(sid, now)
        return tuple(released)

    def _advance_exchange_time(self, event_time_ms: int) -> bool:
        """Move the connection's exchange clock; True when it entered a new late-close
        minute (the trackers then may want a ``late_close`` fill)."""
        self._exchange_time_ms = max(self._exchange_time_ms, event_time_ms)
        minute = (self._exchange_time_ms - self.late_close_ms) // MINUTE_MS
        if minute <= self._exchange_minute:
            return False
        self._exchange_minute = minute
        for tracker in self.trackers.values():
            tracker.on_exchange_time(self._exchange_time_ms)
        return True

    # --- forming -------------------------------------------------------------------------

    def next_forming_due(self) -> float | None:
        """Monotonic time a throttled forming update is due, None when none waits."""
        return self.throttle.next_due()

    def due_forming(self, now: float) -> list[tuple[SeriesId, Candle]]:
        """Throttled forming updates now due (publish them); held if something was queued since."""
        due: list[tuple[SeriesId, Candle]] = []
        for sid, candle in self.throttle.due(now):
            if self.gate.allows(sid, candle.candle_time, self.trackers[sid].head):
                due.append((sid, candle))
            else:
                self.gate.hold(sid, candle)
        return due

    def forming_updates(
        self, sid: SeriesId, candle: Candle, phase: int | None = None
    ) -> Iterator[tuple[str, Candle]]:
        """The forming messages of one forming base candle: ``(series_id, candle)`` of the
        base series, then of each derived timeframe, built from the bucket's minutes
        (closed ones still waiting for their commit included). Never stored. A phased
        timeframe (3d) needs the symbol's ``phase`` (seconds): without it, none is built;
        nor for a bucket begun before the series' stored history (:mod:`.forming`)."""
        yield str(sid), candle
        yield from derived_forming(self.minutes, sid, self.derived, candle, phase)

    # --- REST fills ----------------------------------------------------------------------

    def backlogged(self) -> bool:
        """Closed candles waiting for a commit, plus the minutes of the fills in flight,
        have reached IngestPolicy.backlog_max: no fill starts."""
        queued = len(self.batcher) + self._fill_minutes_in_flight
        return queued >= self.policy.backlog_max

    def next_fills(self, now: float) -> FillPlan:
        """The REST fills to start now, and held candles that waited ``hold_max_s`` for a
        REST that keeps failing, which are queued over their hole (retried later)."""
        start: list[tuple[SeriesId, FillRequest]] = []
        forced: list[tuple[SeriesId, int]] = []
        wake_at = math.inf
        for sid, tracker in self.trackers.items():
            # backlogged: the commits wake the fill task up as they drain the batcher
            backlogged = self.backlogged()
            request = None if backlogged else tracker.next_fill(now)
            if request is not None:
                self._fill_minutes_in_flight += request.minutes
                start.append((sid, request))
            elif tracker.wants_fill() and not backlogged:
                wake_at = min(wake_at, tracker.retry_at)
            if tracker.held_since is not None and tracker.failures:
                release_at = tracker.held_since + self.policy.hold_max_s
                if now >= release_at:
                    forced.append((sid, tracker.held_count()))
                    self._enqueue(sid, tracker.release_held(), now)
                else:
                    wake_at = min(wake_at, release_at)
        return FillPlan(tuple(start), wake_at, tuple(forced))

    def on_fill_failed(self, sid: SeriesId, request: FillRequest, now: float) -> None:
        """REST failed for ``request`` (from :meth:`next_fills`): retry after a backoff."""
        self._fill_minutes_in_flight -= request.minutes
        tracker = self.trackers[sid]
        delay = self.policy.fill_backoff.delay(tracker.failures + 1)
        tracker.on_fill_failed(request, now, max(delay, FILL_RETRY_MIN_S))

    def on_fill_result(
        self,
        sid: SeriesId,
        request: FillRequest,
        candles: Iterable[Candle],
        now: float,
        listing_at: int | None = None,
    ) -> FillOutcome:
        """REST answered ``request`` (from :meth:`next_fills`) with ``candles``;
        ``listing_at``: SeriesTracker.on_fill_result's."""
        self._fill_minutes_in_flight -= request.minutes
        tracker = self.trackers[sid]
        absent_before = tracker.absent_minutes
        holes_before = tracker.unresolved
        released = tracker.on_fill_result(request, candles, now=now, listing_at=listing_at)
        save_holes = None
        if request.reason == "retry":
            # candles queued before this retry must not store the holes it settled again
            self.batcher.forget_holes(sid, tracker.last_absent)
            queued = self._enqueue(sid, released, now, holes_until_last=holes_before)
            save_holes = self.holes_to_save(sid)
        else:
            queued = self._enqueue(sid, released, now)
        return FillOutcome(
            rest_released=sum(r.source == "rest" for r in released),
            repaired=sum(r.reason in REPAIR_REASONS for r in released),
            absent=tracker.absent_minutes - absent_before,
            wake_committer=queued,
            save_holes=save_holes,
            forming=self._release_forming(now),
        )

    def holes_to_save(self, sid: SeriesId) -> Holes | None:
        """The series' unresolved holes to store on their own, or None when an entry of the
        series queued or being committed will carry them into the store (or its commit
        failed: what the store holds is then unknown)."""
        if self.gate.owes(sid):
            return None
        return self.trackers[sid].unresolved

    def held_count(self) -> int:
        """Closed candles held above a hole, in all series."""
        return sum(t.held_count() for t in self.trackers.values())

    # --- commits -------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Closed candles waiting for a commit."""
        return len(self.batcher)

    def batch_due_at(self) -> float | None:
        """Monotonic time the next commit is due (``-inf``: now), None when none waits.

        Ask when the committer is idle: with ``binance_ws_flush_s`` 0, at once (a group
        commit); else at once when every live series of the group has settled the newest
        minute (:func:`~tradecanvas.ingest.ordering.group_settled`), else by size, else by
        age."""
        due = self.batcher.due_at()
        if due is None or due == -math.inf:
            return due
        heads = {sid: tracker.head for sid, tracker in self.trackers.items()}
        last_open = {v.sid: v.last_open for v in self._live.values() if v.last_open is not None}
        if group_settled(heads, last_open):
            return -math.inf
        return due

    def take_batch(self) -> CommitBatch | None:
        """The next closed candles to commit, or None."""
        backlogged = self.backlogged()
        items = self.batcher.take()
        if not items:
            return None
        return CommitBatch(tuple(items), wake_fills=backlogged)

    def on_committed(
        self, items: Sequence[BatchItem], now: float
    ) -> tuple[tuple[SeriesId, Candle], ...]:
        """``items`` (from :meth:`take_batch`) were committed *and published*: returns the
        held forming candles that may go out now (publish them with forming_updates)."""
        by_series: dict[SeriesId, list[BatchItem]] = {}
        for item in items:
            by_series.setdefault(item.series, []).append(item)
        for sid, mine in by_series.items():
            self.minutes.add(sid, [c for i in mine if (c := i.candle) is not None])
            self.gate.settle(sid, len(mine))
        return self._release_forming(now)

    def release_all_held(self, now: float) -> None:
        """Shutdown: queue every held candle over its hole (the hole stays unresolved and
        is retried after the restart)."""
        for sid, tracker in self.trackers.items():
            self._enqueue(sid, tracker.release_held(), now)

    def _enqueue(
        self,
        sid: SeriesId,
        released: Sequence[Released],
        now: float,
        *,
        holes_until_last: Holes | None = None,
    ) -> bool:
        """Queue ``released`` and the runs the tracker confirmed absent meanwhile, in time
        order, for commit with the series' unresolved holes to store with them;
        ``holes_until_last``: what to keep stored until the last of them commits (the holes
        before a retry, which its candles fill). True when anything was queued."""
        tracker = self.trackers[sid]
        holes = tracker.unresolved
        listing = tracker.listing
        items = [
            BatchItem(sid, r, now, holes, listed=r.candle.candle_time == listing) for r in released
        ]
        if listing is not None and any(i.listed for i in items):
            tracker.listing = None  # (committed with its candle)
            self.minutes.set_listing(sid, listing)
        items += [BatchItem(sid, None, now, holes, run) for run in tracker.take_absent()]
        if not items:
            return False
        items.sort(key=lambda item: item.time)  # a run sorts before the candles above it
        if holes_until_last is not None:
            items = [attrs.evolve(i, holes=holes_until_last) for i in items[:-1]] + items[-1:]
        # forming derived candles need these minutes now, not after the batch is flushed
        # (else a 5m forming bar's volume dips until the batch is committed)
        self.minutes.add(sid, [r.candle for r in released])
        self.batcher.add_items(items)
        self.gate.owe(sid, len(items))
        return True
