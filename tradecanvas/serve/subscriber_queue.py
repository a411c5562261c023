"""One subscriber's queue without I/O: what it holds, what it drops, what it sends next
(DESIGN §3, §6). No trio, no sockets: time is passed in, store reads and sends are asked for.

The Hub (``tradecanvas.serve.hub``) is the trio shell around it: it owns the wake-up events,
the cancel scopes, the publish task, the store reads, the encoding, the sends and their
deadlines. It puts work on a queue with the ``offer_*`` methods (synchronous, never blocking:
the Hub's ``send_nowait``) and its publish task carries out the :class:`Plan` that
:meth:`SubscriberQueue.drain` returns.

What the queue holds
--------------------
Per subscription (one series on one connection): the pending closed candles keyed by time and
the newest forming candle; plus an insertion-ordered "ready" list of subscriptions and whole
messages (system, pong, error) that fixes the order in which they go out. Its size is counted
in messages as a non-batch client would get them — one per closed candle, one per forming
candle, one per other message — and never exceeds ``queue_max``.

Draining and coalescing
-----------------------
A drain takes everything ready and, per subscription, asks for the closed candles as ONE
``ClosedCandles`` message (split only at a ``Gap``; the encoding splits a batch every
``catchup_limit`` candles) then the newest ``FormingCandle`` if it is still above the
cursor. A whole message goes out in its place in the ready list, so a system message for a
series never overtakes the candles published before it.

Cursors, catch-up and healing
-----------------------------
A subscription's cursor is the last closed ``candle_time`` sent; it only moves forward and a
forming candle is sent only above it (one at or below it is not even queued), and only once
no close is owed before it: when its bar does not follow the cursor, the drain reads the
store first (closes another process stored — an import — which the live path found already
there and did not publish; a hole the read leaves is the store's own, and later updates of
that bar go without a read). Subscribing
registers the subscription at once (live candles from then on are buffered) and marks it
ready for its catch-up: the drain asks the store (``ReadStore``: ``since`` exclusive, at
most ``catchup_limit`` a read and a message; ``since: null`` means the newest
``catchup_limit``), sends that, and then the buffered live candles, dropping anything at or
below the cursor. Every candle is committed before it is published, so a candle is either in
a store read that started after registration, or in the buffer: no loss, no duplicate.

The event log
-------------
A subscription made with ``events_after`` (an event_id) first gets the stored system events of
its series after that cursor (``ReadEvents``, at most ``catchup_limit`` a read), preceded by
one ``EventsTruncated`` when the retention has dropped events after the cursor; live events
published meanwhile wait in the subscription and follow, minus any the reads had. From then on
a system event goes out in its place in the ready list and moves the subscription's event
cursor; one at or below the cursor is skipped. Without ``events_after`` only live events are
sent. Every event is committed before it is published, so none is lost or doubled.

A hole in what a subscriber would receive (next time > cursor + timeframe, once the cursor is
anchored on a real candle) is first healed from the store (``since`` = the cursor); only a
hole the store itself has is reported as a gap, and delivery continues after it.

Slow consumers
--------------
When an offer would overflow the queue, its queued forming candles are dropped first. If that
is not enough the subscriber starts **lagging**: its queued closed candles are dropped (they
are in the store) and, per subscription, the highest dropped time is remembered as the heal
target; further closed candles for a lagging subscription are not queued but only raise its
target. The drain heals each such subscription from the store up to its target, and the
subscriber stops lagging when none is left to heal. The subscriber is to be closed with 4008
(a :class:`CloseDecision`) when it has been lagging for ``max_lag_s`` (the shell's clock
reaches :attr:`SubscriberQueue.lag_deadline`: :meth:`SubscriberQueue.lagged_out`), or when
even the dropping leaves no room for a whole message (:meth:`SubscriberQueue.offer_message`).
The send timeout is the shell's.

The plan's vocabulary (:class:`~tradecanvas.serve.outgoing.ReadStore`, ``Send`` and the
outgoing messages) is in :mod:`tradecanvas.serve.outgoing`; the cursor rules of one
subscription in :mod:`tradecanvas.serve.subscription`.

Only misuse raises: the constructor (ValueError for a bound below 1), a plan resumed without
the candles it asked for (TypeError). The callbacks ``wake`` (something became ready) and
``lag_changed`` (the lag deadline, ``math.inf`` once healed) must not raise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Final, final

import attrs

from tradecanvas.model import Candle
from tradecanvas.serve.drain import drain_plan
from tradecanvas.serve.outgoing import (
    Plan,
    WholeMessage,
)
from tradecanvas.serve.subscription import (
    Subscription,
)
from tradecanvas.serve.ws_protocol import CLOSE_SLOW_CONSUMER

SLOW_CONSUMER: Final = "slow_consumer"  # the disconnect reason of every 4008
# why a subscriber was closed with 4008 (tradecanvas_slow_consumer_closes_total{cause}):
# stalled — nothing it was sent read for subscriber_stall_timeout_s (the session);
# send_timeout — a send waited longer than subscriber_send_timeout_s (the publish task);
# lagging — lagging for max_lag_s; queue_full — no room even after dropping (here)
SLOW_CONSUMER_CAUSES: Final = ("stalled", "send_timeout", "lagging", "queue_full")


@attrs.frozen
class CloseDecision:
    """Close the subscriber with ``code`` and ``reason``; ``disconnect_reason`` labels
    ``tradecanvas_subscriber_disconnects_total``, ``cause`` (a 4008's, one of
    :data:`SLOW_CONSUMER_CAUSES`) ``tradecanvas_slow_consumer_closes_total``."""

    code: int
    reason: str
    disconnect_reason: str
    cause: str | None = None


def _nothing() -> None:
    pass


def _ignore_deadline(deadline: float) -> None:
    pass


# --- the queue --------------------------------------------------------------------------


@final
class SubscriberQueue:
    """One subscriber's bounded queue and slow-consumer policy (see the module docstring).

    Owns its :class:`Subscription` objects (:attr:`subscriptions`, by series id). ``wake``
    is called whenever something becomes ready to drain; ``lag_changed(deadline)`` when the
    subscriber starts lagging (the time it must be healed by) and when it stops (``inf``).
    """

    __slots__ = (
        "_lag_changed",
        "_queued",
        "_ready",
        "_wake",
        "catchup_limit",
        "closing",
        "high_water",
        "lagging_since",
        "max_lag_s",
        "queue_max",
        "subscriptions",
    )

    def __init__(
        self,
        *,
        queue_max: int,
        max_lag_s: float,
        catchup_limit: int,
        wake: Callable[[], None] = _nothing,
        lag_changed: Callable[[float], None] = _ignore_deadline,
    ) -> None:
        if queue_max < 1 or catchup_limit < 1:
            raise ValueError("queue_max and catchup_limit must be >= 1")
        self.queue_max = queue_max
        self.max_lag_s = max_lag_s
        self.catchup_limit = catchup_limit
        self._wake = wake
        self._lag_changed = lag_changed
        self.subscriptions: dict[str, Subscription] = {}
        self._ready: dict[Subscription | WholeMessage, None] = {}
        self._queued = 0
        # the most messages held at once since the Hub last took it (take_high_water)
        self.high_water = 0
        self.lagging_since: float | None = None
        # set by a close decision here or the shell's (a closing queue takes nothing more)
        self.closing = False

    # --- state ----------------------------------------------------------------------

    def take_high_water(self) -> int:
        """The most messages held at once since the last take; from now on, counted from
        what is held now (``serve/high_water.py``)."""
        peak, self.high_water = self.high_water, self._queued
        return peak

    @property
    def idle(self) -> bool:
        """Nothing is ready, nothing is held, not lagging, not closing: what comes next may
        go out at once, ahead of nothing (``subscription.in_step`` decides per series)."""
        return (
            not self._ready
            and self._queued == 0
            and self.lagging_since is None
            and not self.closing
        )

    @property
    def queued(self) -> int:
        """Messages held, counted as a non-batch client would get them."""
        return self._queued

    @property
    def lag_deadline(self) -> float:
        """When a lagging subscriber is to be closed with 4008; ``inf`` when not lagging."""
        if self.lagging_since is None:
            return math.inf
        return self.lagging_since + self.max_lag_s

    def mark_closing(self) -> None:
        """The subscriber is being closed: offers are ignored and the drain stops."""
        self.closing = True

    def lagged_out(self) -> CloseDecision:
        """The 4008 decision for lagging too long: the shell's clock reached
        :attr:`lag_deadline` while lagging (closing even if the lag ended meanwhile, since
        the publish task was cancelled for it)."""
        return self._decide(
            f"slow consumer: lagging for more than {self.max_lag_s:g}s", cause="lagging"
        )

    def _decide(self, reason: str, *, cause: str) -> CloseDecision:
        self.closing = True
        return CloseDecision(CLOSE_SLOW_CONSUMER, reason, SLOW_CONSUMER, cause)

    # --- subscriptions --------------------------------------------------------------

    def subscribe(
        self,
        series_id: str,
        tf_seconds: int,
        since: int | None,
        batch: bool,
        events_after: int | None = None,
    ) -> None:
        """Register (or replace) a subscription at once and make its catch-up ready (with
        ``events_after``, the stored events after it come first)."""
        old = self.subscriptions.get(series_id)
        if old is not None:
            self._drop(old)
        sub = Subscription(series_id, tf_seconds, since, batch, events_after)
        self.subscriptions[series_id] = sub
        self._mark(sub)

    def unsubscribe(self, series_id: str) -> bool:
        """Drop a subscription and what it has queued; False when there was none."""
        sub = self.subscriptions.pop(series_id, None)
        if sub is None:
            return False
        self._drop(sub)
        return True

    def drop_all(self) -> None:
        """Drop every subscription (the connection ended)."""
        for sub in list(self.subscriptions.values()):
            self._drop(sub)
        self.subscriptions.clear()

    def _drop(self, sub: Subscription) -> None:
        sub.active = False
        sub.heal_target = None
        self._queued -= len(sub.pending) + (sub.forming is not None) + len(sub.pending_events)
        sub.pending.clear()
        sub.pending_events.clear()
        sub.forming = None
        self._ready.pop(sub, None)
        self._end_lagging_if_healed()

    # --- offers (synchronous, never blocking) ---------------------------------------

    def _mark(self, key: Subscription | WholeMessage) -> None:
        if key not in self._ready:
            self._ready[key] = None
        self._wake()

    def offer_message(self, text: str, now: float) -> CloseDecision | None:
        """Queue a whole message (system, pong, error). With no room even after dropping
        forming and closed candles: the 4008 decision (and nothing is queued)."""
        if self.closing:
            return None
        decision = self._room_for_one(now)
        if decision is None:
            self._queued += 1
            self.high_water = max(self.high_water, self._queued)
            self._mark(WholeMessage(text))
        return decision

    def _room_for_one(self, now: float) -> CloseDecision | None:
        """Make room for one whole message: drop forming, then lag; else decide 4008."""
        if self._queued + 1 > self.queue_max:
            self._make_room(1)
            if self._queued + 1 > self.queue_max:
                self._start_lagging(now)
            if self._queued + 1 > self.queue_max:
                return self._decide("slow consumer: queue full", cause="queue_full")
        return None

    def offer_event(
        self, series_id: str, event_id: int | None, text: str, now: float
    ) -> CloseDecision | None:
        """Queue a system event of ``series_id`` (already encoded). While the subscription's
        stored events are still to be read it waits in the subscription (sent after them,
        unless the read had it); else it goes out as a whole message in its place, skipped
        when the event cursor is already past it. No room: as :meth:`offer_message`."""
        sub = self.subscriptions.get(series_id)
        if sub is None or self.closing:
            return None
        # (while the stored events are read the cursor may yet move back — a cursor above
        # the log's newest id — so the read's end filters those queued meanwhile)
        if (
            event_id is not None
            and sub.event_cursor is not None
            and event_id <= sub.event_cursor
            and not sub.needs_events
        ):
            return None
        decision = self._room_for_one(now)
        if decision is not None:
            return decision
        self._queued += 1
        self.high_water = max(self.high_water, self._queued)
        if sub.needs_events and event_id is not None:
            sub.pending_events[event_id] = text
            self._mark(sub)
        else:
            self._mark(WholeMessage(text, series_id, event_id))
        return None

    def offer_closed(self, series_id: str, candles: Sequence[Candle], now: float) -> None:
        """Queue closed candles above the cursor, or lag and raise the heal target."""
        sub = self.subscriptions.get(series_id)
        if sub is None or self.closing:
            return
        cursor = sub.cursor
        fresh = [c for c in candles if cursor is None or c.candle_time > cursor]
        if not fresh:
            return
        newest = max(c.candle_time for c in fresh)
        if sub.heal_target is not None:
            # lagging: the store has them; raise the target instead of queueing
            sub.heal_target = max(sub.heal_target, newest)
            self._mark(sub)
            return
        added = sum(1 for c in fresh if c.candle_time not in sub.pending)
        if self._queued + added > self.queue_max:
            self._make_room(added)
            if self._queued + added > self.queue_max:
                self._start_lagging(now)
                sub.heal_target = max(sub.heal_target or newest, newest)
                sub.needs_sync = True
                self._mark(sub)
                return
        for c in fresh:
            sub.pending[c.candle_time] = c
        self._queued += added
        self.high_water = max(self.high_water, self._queued)
        self._mark(sub)

    def offer_forming(self, series_id: str, candle: Candle) -> None:
        """Keep the newest forming candle above the cursor; with no room it is dropped
        (forming goes first; never worth lagging for)."""
        sub = self.subscriptions.get(series_id)
        if sub is None or self.closing:
            return
        if sub.cursor is not None and candle.candle_time <= sub.cursor:
            return
        if sub.forming is None:
            if self._queued + 1 > self.queue_max:
                return
            self._queued += 1
            self.high_water = max(self.high_water, self._queued)
        sub.forming = candle
        self._mark(sub)

    def _make_room(self, needed: int) -> None:
        """Drop queued forming candles (the first thing a full queue gives up)."""
        for sub in self.subscriptions.values():
            if sub.forming is not None:
                sub.forming = None
                self._queued -= 1
                if self._queued + needed <= self.queue_max:
                    return

    def _start_lagging(self, now: float) -> None:
        """Drop every queued closed candle; each subscription heals from the store later."""
        if self.lagging_since is None:
            self.lagging_since = now
            self._lag_changed(self.lag_deadline)
        for sub in self.subscriptions.values():
            if sub.pending:
                top = max(sub.pending)
                sub.heal_target = top if sub.heal_target is None else max(sub.heal_target, top)
                sub.needs_sync = True
                self._queued -= len(sub.pending)
                sub.pending.clear()
                self._mark(sub)

    def _end_lagging_if_healed(self) -> None:
        if self.lagging_since is not None and all(
            s.heal_target is None for s in self.subscriptions.values() if s.active
        ):
            self.lagging_since = None
            self._lag_changed(math.inf)

    # --- the drain --------------------------------------------------------------------

    def drain(self) -> Plan:
        """Take everything ready now; the plan that sends it (see the module docstring).

        The publish task answers each :class:`ReadStore` with the candles read and resumes
        after each :class:`Send`; offers may come in between. The plan ends early once the
        queue is closing; a subscription dropped meanwhile is skipped.
        """
        items = list(self._ready)
        self._ready.clear()
        return drain_plan(self, items)

    def take_whole(self, message: WholeMessage) -> bool:
        """The drain reached ``message``: True to send it now. A system event waits instead
        when its subscription was replaced since and waits for its stored events (it joins
        the live ones buffered behind them), and is skipped when its subscription is gone or
        its event cursor is past it; sending it moves that cursor."""
        if self._defer_event(message):
            return False
        self._queued -= 1
        return self._event_is_due(message)

    def take_pending_events(self, sub: Subscription) -> list[tuple[int, str]]:
        """The live events buffered while ``sub``'s stored events were read (taken)."""
        live = sorted(sub.pending_events.items())
        self._queued -= len(sub.pending_events)
        sub.pending_events.clear()
        return live

    def take_forming(self, sub: Subscription) -> Candle | None:
        forming = sub.forming
        if forming is not None:
            sub.forming = None
            self._queued -= 1
        return forming

    def requeue_forming(self, sub: Subscription, candle: Candle) -> None:
        """Put back a forming candle taken by a drain, unless a newer one came meanwhile."""
        if sub.forming is None and sub.active:
            self.offer_forming(sub.series_id, candle)

    def end_lagging_if_healed(self) -> None:
        """Every subscription has healed: the subscriber stops lagging."""
        self._end_lagging_if_healed()

    def _defer_event(self, message: WholeMessage) -> bool:
        """A system event queued for a subscription that was replaced since, and now waits
        for its stored events, joins the live ones buffered behind them (stored first)."""
        if message.series_id is None or message.event_id is None:
            return False
        sub = self.subscriptions.get(message.series_id)
        if sub is None or not sub.needs_events:
            return False
        sub.pending_events[message.event_id] = message.text
        self._mark(sub)
        return True

    def _event_is_due(self, message: WholeMessage) -> bool:
        """A system event goes out unless its subscription is gone or already past it; it
        moves the subscription's event cursor."""
        if message.series_id is None:
            return True  # pong, error
        sub = self.subscriptions.get(message.series_id)
        if sub is None:
            return False
        if message.event_id is None:
            return True
        if sub.event_cursor is not None and message.event_id <= sub.event_cursor:
            return False
        sub.event_cursor = message.event_id
        return True

    # --- what the drain takes (tradecanvas.serve.drain) -----------------------------

    def take_pending(self, sub: Subscription) -> list[Candle]:
        """The closed candles buffered for ``sub`` above its cursor, ascending (taken)."""
        taken = [sub.pending[t] for t in sorted(sub.pending)]
        self._queued -= len(sub.pending)
        sub.pending.clear()
        cursor = sub.cursor
        return [c for c in taken if cursor is None or c.candle_time > cursor]


__all__ = [
    "SLOW_CONSUMER",
    "SLOW_CONSUMER_CAUSES",
    "CloseDecision",
    "SubscriberQueue",
]
