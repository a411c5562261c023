"""SeriesTracker: one series' closed candles in time order without holes (pure).

Nothing here imports trio or does I/O; times are passed in. Two clocks appear and are never
mixed (DESIGN §1.2):

- *exchange time* (kline open times, frame event times ``E``) decides which minutes are
  missing and when a close is late — :class:`SeriesTracker` only ever sees those;
- *monotonic time* (``now``, from ``trio.current_time()`` in the shell) is used only for
  timeouts: the pause after a failed REST fill and how long held candles have waited.

Data flow (one :class:`SeriesTracker` per series, driven by ``ingest.core.IngestCore``)::

    closed kline ─▶ SeriesTracker.on_closed ─▶ Released (in time order, no holes)
                         │  a hole below it?                       │
                         ▼                                         ▼
                    held + FillRequest ──REST──▶ on_fill_result   ClosedBatcher ─▶ pipeline
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Final, Literal, final

import attrs

from tradecanvas.ingest.minute_ranges import missing_below, runs, subtract_ranges
from tradecanvas.model import MINUTE, MINUTE_MS, MS, Candle

# a reconnect after a long outage is fetched in chunks of this many minutes, so one REST
# answer confirms (or fills) a bounded range and memory stays bounded
FILL_CHUNK_MINUTES: Final = 10_000
# REST may lag the exchange (closes can come 10-30 s late, REST with them): a minute called
# absent on exchange time alone (no later minute in the same answer proved it) is asked for
# once more this long after its end, and stored if REST has it by then
REST_LAG_MAX_MS: Final = 120_000
# rechecks die with the process: at start-up, minutes missing among the stored ones this
# close below the head are asked for once more (one more REST request if already asked)
RECHECK_AT_START_S: Final = 3 * REST_LAG_MAX_MS // MS
# released candles remembered per series to drop repeated closes (renewal overlaps,
# duplicated frames) without a store round trip; a few minutes of history is plenty
RECENT_KEEP: Final = 64

IngestSource = Literal["ws", "rest"]
FillReason = Literal["initial", "reconnect", "late_close", "hole", "retry", "recheck"]
# fills that repair a close that did not arrive while the connection was up
REPAIR_REASONS: Final = frozenset({"late_close", "hole"})


@attrs.frozen
class Released:
    """A closed candle cleared for commit, in time order for its series."""

    candle: Candle
    source: IngestSource
    received_at: float | None = None  # monotonic time the frame arrived (ws only)
    reason: FillReason | None = None  # why REST was asked (rest only)


@attrs.frozen
class FillRequest:
    """Fetch the base minutes with ``start <= open time < end`` from REST."""

    start: int
    end: int
    reason: FillReason

    @property
    def minutes(self) -> int:
        return (self.end - self.start) // MINUTE


@final
class SeriesTracker:
    """Keeps one series' closed candles in time order without holes.

    ``head`` is the open time up to which everything is settled: released for commit, or
    confirmed absent at the exchange by REST. A closed candle at ``head + 60`` is released at
    once; one above it is *held* while REST fills the hole below it (:meth:`next_fill`); once
    REST has answered for the range, the REST candles and the held ones are released in
    order, and minutes REST did not have are skipped (a real exchange hole: the store keeps
    it and the Hub reports ``gap``).

    REST is asked for ``[head + 60, want_upto)`` where ``want_upto`` is raised by: the first
    frame of a new connection (``reconnect``: nothing is replayed after a disconnect), an
    empty store's first frame (``initial``), exchange time passing ``late_close`` seconds
    after a minute's end without its close (``late_close``), and a held candle (``hole``).

    A minute missing from a REST answer counts as absent at the exchange only when REST
    cannot merely be behind: it is below a minute the same answer returned (a fill asks up
    to the newest held close, for that proof), or it ended at least ``late_close`` ago in
    exchange time. A just-closed minute REST does not have yet stays unsettled, and is asked
    for again once it is that old (or its close arrives). A minute called absent on exchange
    time alone is asked for once more (``recheck``) ``REST_LAG_MAX_MS`` after its end: REST
    may have lagged, and what it has then is stored below the head (a backfill).

    Holes left under candles committed without them (:meth:`release_held`) are *unresolved*
    and retried (``retry`` fills, in chunks of FILL_CHUNK_MINUTES) by the same rule: the part
    of a range a retry could not settle stays unresolved and is asked for again once exchange
    time makes its first minute old enough.

    Every run of minutes confirmed absent is also kept, as ``[start, end)``, until
    :meth:`take_absent` (the store records it as a ``gap``) — except the minutes an empty
    store's first backfill finds before the symbol's first bar: they are no hole, the
    series' history simply starts later.
    """

    def __init__(
        self,
        *,
        head: int | None,
        initial_backfill: int,
        late_close_ms: int,
        unresolved: Iterable[tuple[int, int]] = (),
        stored: Iterable[int] = (),
    ) -> None:
        """``stored``: stored minutes below ``head`` (rechecks of those missing among them)."""
        self.head = head
        self.initial_backfill = initial_backfill
        self.late_close_ms = late_close_ms
        # minutes REST confirmed missing at the exchange, in all (a metric counts them)
        self.absent_minutes = 0
        self.held_since: float | None = None
        self.retry_at = 0.0
        self.failures = 0
        self._held: dict[int, Released] = {}
        self._want_upto = 0
        self._want_reason: FillReason = "late_close"
        self._exchange_ms: int | None = None
        # REST answered without the minute at ``head + 60`` while it was too recent to call
        # absent; the next fill waits until exchange time makes it old enough
        self._unsettled: int | None = None
        self._inflight: FillRequest | None = None
        # holes left under candles committed by release_held, to retry (kept by the shell
        # across restarts)
        self._unresolved: list[tuple[int, int]] = sorted(set(unresolved))
        # unresolved ranges a retry answered while their first minute was too recent to
        # call absent: asked for again once it is late (see _retry_range)
        self._retry_waiting: set[tuple[int, int]] = set()
        # runs called absent on exchange time alone, asked for once more (recheck) when
        # exchange time passes the third value
        self._recheck: list[tuple[int, int, int]] = [
            (start, end, end * MS + REST_LAG_MAX_MS)
            for start, end in subtract_ranges(
                missing_below(head, stored, RECHECK_AT_START_S), self._unresolved
            )
        ]
        # the minutes the last retry confirmed absent at the exchange, as [start, end) runs
        self.last_absent: tuple[tuple[int, int], ...] = ()
        # runs confirmed absent since the last take_absent(), ascending
        self._absent_runs: list[tuple[int, int]] = []
        # an empty store: minutes absent before the first candle released are before the
        # series' history, not a hole in it
        self._before_history = head is None
        # the series' first minute at Binance when an empty store's backfill found nothing
        # before it (its listing): the candle at it is committed as the listing
        self.listing: int | None = None
        # a fill's first minute that REST said is the series' first ever (loop: _listing)
        self._listing_at: int | None = None
        self._recent: OrderedDict[int, Candle] = OrderedDict()

    # --- inputs ------------------------------------------------------------------------

    def on_live_frame(self, open_time: int, *, new_connection: bool) -> None:
        """A kline frame (forming or closed) for ``open_time`` arrived.

        The shell calls this before :meth:`on_closed`, with ``new_connection`` true for the
        first frame of this series on a connection.
        """
        if self.head is None:
            # empty store: the history before the first live minute comes from REST
            self.head = open_time - MINUTE * (self.initial_backfill + 1)
            self._raise_want(open_time, "initial")
        elif new_connection:
            self._raise_want(open_time, "reconnect")

    def on_exchange_time(self, event_time_ms: int) -> None:
        """Exchange time reached ``event_time_ms``: closes due ``late_close`` ago are late."""
        self._note_exchange_time(event_time_ms)
        if self.head is None:
            return
        self._raise_want(self._late_upto(), "late_close")

    def on_closed(
        self,
        candle: Candle,
        *,
        now: float,
        source: IngestSource = "ws",
        received_at: float | None = None,
    ) -> list[Released]:
        """A closed kline arrived at ``now`` (monotonic); returns the candles now cleared,
        ascending."""
        if self.head is None:
            self.on_live_frame(candle.candle_time, new_connection=True)
        assert self.head is not None
        t = candle.candle_time
        if t <= self.head:
            if self._is_recent_duplicate(candle):
                return []
            # a late copy below the head (a revision, or a minute REST did not have):
            # the pipeline stores it and tells consumers (factor.rebuild)
            self._remember(candle)
            self._recheck = [
                (start, end, due_ms)
                for first, last, due_ms in self._recheck
                for start, end in subtract_ranges([(first, last)], [(t, t + MINUTE)])
            ]  # this minute came: no recheck brings it again
            return [Released(candle, source, received_at)]
        # a close for this minute means exchange time has passed its end
        self._note_exchange_time((t + MINUTE) * MS)
        held = self._held.get(t)
        if held is not None and held.candle.same_values(candle):
            return []  # a repeated close of a held minute
        self._held[t] = Released(candle, source, received_at)
        released = self._advance(confirmed_upto=0)
        if self._held:
            self._raise_want(min(self._held), "hole")
            if self.held_since is None:
                self.held_since = now
        return released

    def held_count(self) -> int:
        return len(self._held)

    def take_absent(self) -> tuple[tuple[int, int], ...]:
        """The runs of minutes confirmed absent at the exchange since the last call, as
        ascending ``[start, end)`` ranges (each one is to be stored as a ``gap``)."""
        runs, self._absent_runs = tuple(self._absent_runs), []
        return runs

    @property
    def unresolved(self) -> tuple[tuple[int, int], ...]:
        """Holes under force-released candles that REST has not answered for yet."""
        return tuple(self._unresolved)

    # --- REST fills --------------------------------------------------------------------

    def wants_fill(self) -> bool:
        if self._inflight is not None or self.head is None:
            return False
        return (
            self._wants_forward_fill()
            or self._retry_range() is not None
            or self._due_recheck() is not None
        )

    def _wants_forward_fill(self) -> bool:
        assert self.head is not None
        start = self.head + MINUTE
        if start >= self._want_upto:
            return False
        if self._unsettled is not None:
            if start == self._unsettled and self._late_upto() <= start:
                return False  # REST did not have it yet, and it is not late yet
            self._unsettled = None
        return True

    def next_fill(self, now: float) -> FillRequest | None:
        """The next REST range to fetch (marked in flight), or None."""
        if not self.wants_fill() or now < self.retry_at:
            return None
        assert self.head is not None
        start = self.head + MINUTE
        if self._wants_forward_fill():
            # up to the newest held close: REST returning it proves what it lacks below
            upto = max(self._want_upto, max(self._held, default=0) + MINUTE)
            end = min(upto, start + FILL_CHUNK_MINUTES * MINUTE)
            request = FillRequest(start, end, self._want_reason)
        elif (retry := self._retry_range()) is not None:
            start = retry[0]
            end = min(retry[1], start + FILL_CHUNK_MINUTES * MINUTE)
            request = FillRequest(start, end, "retry")
        else:
            recheck = self._due_recheck()
            assert recheck is not None
            request = FillRequest(recheck[0], recheck[1], "recheck")
        self._inflight = request
        return request

    @property
    def before_history(self) -> bool:
        """An empty store's series: nothing released yet (minutes absent now are before
        its history, not a hole in it)."""
        return self._before_history

    def on_fill_result(
        self,
        request: FillRequest,
        candles: Iterable[Candle],
        *,
        now: float,
        listing_at: int | None = None,
    ) -> list[Released]:
        """REST answered ``request``: release what is now in order.

        Minutes of the range REST did not return are absent at the exchange, and skipped
        (the hole is real), when REST cannot just be behind (see the class docstring);
        the rest of the range is asked for again later. ``listing_at``: the answer's first
        minute, which REST also said is the series' first at Binance (its listing).
        """
        assert self.head is not None
        self._inflight = None
        self._listing_at = listing_at
        self.failures = 0
        self.retry_at = 0.0
        in_range = sorted(
            (c for c in candles if request.start <= c.candle_time < request.end),
            key=lambda c: c.candle_time,
        )
        released: list[Released] = []
        if request.reason == "recheck":
            # asked once more; what REST has now goes below the head, the rest stays absent
            self._recheck = [r for r in self._recheck if r[:2] != (request.start, request.end)]
            for c in in_range:
                if c.candle_time <= self.head and c.candle_time not in self._recent:
                    self._remember(c)
                    released.append(Released(c, "rest", reason="recheck"))
            return released
        if request.reason == "retry":
            self._settle_retry(request, in_range)
            for c in in_range:
                if c.candle_time <= self.head and c.candle_time not in self._recent:
                    self._remember(c)
                    released.append(Released(c, "rest", reason="retry"))
            return released
        for c in in_range:
            t = c.candle_time
            if t <= self.head:
                # the live close came while REST was busy; keep the live copy
                if t not in self._recent:
                    self._remember(c)
                    released.append(Released(c, "rest", reason=request.reason))
            elif t not in self._held:
                self._held[t] = Released(c, "rest", reason=request.reason)
        proven = in_range[-1].candle_time if in_range else request.start
        settled = max(self._late_upto(), proven)
        runs_before = len(self._absent_runs)
        released.extend(self._advance(confirmed_upto=min(request.end, settled)))
        self._to_recheck(self._absent_runs[runs_before:], proven)
        if self.head + MINUTE < request.end:
            self._unsettled = self.head + MINUTE
        if self._held and self.held_since is None:
            self.held_since = now
        return released

    def on_fill_failed(self, request: FillRequest, now: float, retry_after_s: float) -> None:
        """REST failed for ``request``; ask again after ``retry_after_s`` (monotonic)."""
        if self._inflight == request:
            self._inflight = None
        self.failures += 1
        self.retry_at = now + retry_after_s

    def release_held(self) -> list[Released]:
        """Release every held candle now, recording the holes under them as unresolved.

        Used when REST keeps failing for too long, and at shutdown: a candle that reached
        the daemon is committed, and the hole below it is retried later (``retry`` fills
        insert below the head, which consumers learn as ``factor.rebuild``/backfill).
        """
        if not self._held:
            return []
        assert self.head is not None
        released: list[Released] = []
        for t in sorted(self._held):
            if t > self.head + MINUTE and (self.head + MINUTE, t) not in self._unresolved:
                self._unresolved.append((self.head + MINUTE, t))
            item = self._held.pop(t)
            self._remember(item.candle)
            released.append(item)
            self.head = t
        self.held_since = None
        return released

    # --- internals ---------------------------------------------------------------------

    def _note_exchange_time(self, event_time_ms: int) -> None:
        if self._exchange_ms is None or event_time_ms > self._exchange_ms:
            self._exchange_ms = event_time_ms

    def _late_upto(self) -> int:
        """Open times below this ended ``late_close`` ago in exchange time (a close still
        missing is late; a minute REST does not have is absent)."""
        if self._exchange_ms is None:
            return -1
        return (self._exchange_ms - self.late_close_ms) // MINUTE_MS * MINUTE

    def _retry_range(self) -> tuple[int, int] | None:
        """The first unresolved range a retry may ask for now."""
        late_upto = self._late_upto()
        for entry in self._unresolved:
            if entry not in self._retry_waiting or entry[0] < late_upto:
                return entry
        return None

    def _settle_retry(self, request: FillRequest, in_range: Sequence[Candle]) -> None:
        """Shrink the unresolved range ``request`` was cut from to what REST could not
        settle: minutes below the last one returned, or old enough, are present or absent
        for good; the rest stays for a later retry."""
        settled = self._late_upto()
        if in_range:
            settled = max(settled, in_range[-1].candle_time + MINUTE)
        settled = max(request.start, min(settled, request.end))
        returned = {c.candle_time for c in in_range}
        absent = [t for t in range(request.start, settled, MINUTE) if t not in returned]
        self.absent_minutes += len(absent)
        self.last_absent = runs(absent)
        self._absent_runs.extend(self.last_absent)
        self._to_recheck(self.last_absent, in_range[-1].candle_time if in_range else 0)
        index = next(
            (i for i, entry in enumerate(self._unresolved) if entry[0] == request.start), None
        )
        if index is None:
            return
        entry = self._unresolved[index]
        self._retry_waiting.discard(entry)
        if settled >= entry[1]:
            del self._unresolved[index]
            return
        remaining = (settled, entry[1])
        self._unresolved[index] = remaining
        if settled < request.end:
            self._retry_waiting.add(remaining)  # REST may be behind: wait until it is late

    def _to_recheck(self, runs: Iterable[tuple[int, int]], proven: int) -> None:
        """Keep for one more ask the minutes of ``runs`` at or above ``proven``: called
        absent on exchange time alone (no minute REST returned lies above them)."""
        for start, end in runs:
            start = max(start, proven)
            if start < end:
                self._recheck.append((start, end, end * MS + REST_LAG_MAX_MS))

    def _due_recheck(self) -> tuple[int, int] | None:
        if self._exchange_ms is None:
            return None
        for start, end, due_ms in self._recheck:
            if self._exchange_ms >= due_ms:
                return start, end
        return None

    def _raise_want(self, upto: int, reason: FillReason) -> None:
        if upto > self._want_upto:
            self._want_upto = upto
            self._want_reason = reason

    def _advance(self, *, confirmed_upto: int) -> list[Released]:
        """Release held candles contiguous with the head, skipping confirmed-absent
        minutes below ``confirmed_upto``."""
        assert self.head is not None
        released: list[Released] = []
        while True:
            nxt = self.head + MINUTE
            item = self._held.pop(nxt, None)
            if item is not None:
                self._remember(item.candle)
                released.append(item)
                self.head = nxt
                continue
            if nxt < confirmed_upto:
                above = [t for t in self._held if t > nxt]
                limit = min(confirmed_upto, min(above)) if above else confirmed_upto
                if not self._before_history:  # else no hole: the history starts later
                    self.absent_minutes += (limit - nxt) // MINUTE
                    self._absent_runs.append((nxt, limit))
                elif limit == self._listing_at:
                    self.listing = limit  # Binance has nothing before: the listing
                self.head = limit - MINUTE
                continue
            break
        if not self._held:
            self.held_since = None
        return released

    def _remember(self, candle: Candle) -> None:
        self._before_history = False
        self._recent[candle.candle_time] = candle
        self._recent.move_to_end(candle.candle_time)
        while len(self._recent) > RECENT_KEEP:
            self._recent.popitem(last=False)

    def _is_recent_duplicate(self, candle: Candle) -> bool:
        known = self._recent.get(candle.candle_time)
        return known is not None and known.same_values(candle)
