"""One series on one connection: its cursor and what it has queued, and the cursor rules —
which closed candles go out, where a gap is, where a hole still needs a store read.
Plain data and functions, no I/O; :mod:`tradecanvas.serve.subscriber_queue` (its module
docstring has the rules in full) owns the subscriptions and counts what they hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, final

from tradecanvas.model import Candle
from tradecanvas.serve.outgoing import ClosedCandles, Gap, Outgoing

# the cursor of a ``since: null`` subscription whose catch-up found the store empty
EMPTY_STORE_CURSOR: Final = -1


@final
class Subscription:
    """One series on one connection: its cursor and its part of the subscriber's queue."""

    __slots__ = (
        "active",
        "anchored",
        "batch",
        "cursor",
        "event_cursor",
        "events_after",
        "forming",
        "forming_verified",
        "heal_target",
        "needs_events",
        "needs_sync",
        "pending",
        "pending_events",
        "probe_anchor",
        "series_id",
        "tf_seconds",
        "use_tail",
        "verified_upto",
    )

    def __init__(
        self,
        series_id: str,
        tf_seconds: int,
        since: int | None,
        batch: bool,
        events_after: int | None = None,
    ) -> None:
        self.series_id = series_id
        self.tf_seconds = tf_seconds
        self.batch = batch
        # last closed candle_time sent; None until the first one for ``since: null``
        self.cursor: int | None = since
        # gaps are only reported relative to a cursor that is a real stored/sent candle
        self.anchored = False
        # the first read of a ``since`` subscription looks for a stored candle AT the cursor
        self.probe_anchor = since is not None
        self.use_tail = since is None
        self.pending: dict[int, Candle] = {}
        self.forming: Candle | None = None
        self.needs_sync = True
        # lagging: the newest closed candle dropped from the queue (the store has it)
        self.heal_target: int | None = None
        # the newest buffered candle that a store read started after
        self.verified_upto = -1
        # the newest forming candle_time a store read started after (forming_follows)
        self.forming_verified = -1
        # the event-log cursor: the last event_id sent; None: live events only, none skipped
        self.events_after = events_after
        self.event_cursor: int | None = events_after
        # stored events after the cursor are still to be read and sent (before anything else)
        self.needs_events = events_after is not None
        # live events published while that read is pending, by event_id (encoded)
        self.pending_events: dict[int, str] = {}
        # False once unsubscribed or replaced
        self.active = True


def plan_closed(sub: Subscription, candles: Sequence[Candle]) -> list[Outgoing]:
    """The messages for ``candles`` (ascending) above the cursor, with a gap at each hole
    after an anchored cursor; moves the cursor to the last one."""
    messages: list[Outgoing] = []
    run: list[Candle] = []
    tf = sub.tf_seconds
    for candle in candles:
        t = candle.candle_time
        cursor = sub.cursor
        if cursor is not None and t <= cursor:
            continue
        if sub.anchored and cursor is not None and t > cursor + tf:
            if run:
                messages.append(ClosedCandles(sub.series_id, tuple(run), sub.batch))
                run = []
            messages.append(Gap(sub.series_id, cursor + tf, t))
        run.append(candle)
        sub.cursor = t
        sub.anchored = True
    if run:
        messages.append(ClosedCandles(sub.series_id, tuple(run), sub.batch))
    return messages


def caught_up(sub: Subscription) -> bool:
    """Is nothing owed to ``sub`` before what comes next: no catch-up, heal or stored events
    to read, nothing queued?"""
    return (
        sub.active
        and not sub.needs_sync
        and not sub.needs_events
        and sub.heal_target is None
        and not sub.pending
        and sub.forming is None
        and sub.cursor is not None
    )


def in_step(sub: Subscription, candles: Sequence[Candle]) -> bool:
    """Can ``candles`` (ascending) go to ``sub`` as they are, at once: it is caught up and
    each candle follows the one before it from the cursor, without a hole (so no store read,
    no gap, nothing at or below the cursor). The messages are then exactly one
    :class:`~tradecanvas.serve.outgoing.ClosedCandles` of them; :func:`sent_in_step`."""
    if not candles or not caught_up(sub):
        return False
    previous = sub.cursor
    assert previous is not None  # caught_up
    tf = sub.tf_seconds
    for candle in candles:
        t = candle.candle_time
        if t <= previous or t > previous + tf:
            return False
        previous = t
    return True


def sent_in_step(sub: Subscription, candles: Sequence[Candle]) -> None:
    """``candles`` that were :func:`in_step` went out: the cursor moves to the last one."""
    sub.cursor = candles[-1].candle_time
    sub.anchored = True


def forming_in_step(sub: Subscription, candle: Candle) -> bool:
    """Can this forming candle go to ``sub`` at once: caught up, above its cursor, and
    :func:`forming_follows`?"""
    return (
        caught_up(sub)
        and sub.cursor is not None
        and candle.candle_time > sub.cursor
        and forming_follows(sub, candle)
    )


def forming_follows(sub: Subscription, candle: Candle) -> bool:
    """Is no closed candle owed before this forming one: the bar before it is at or below
    the cursor, or a store read that started after it was offered left the hole (the
    store's own: every close before a forming candle is committed before it is offered).
    A hole under a forming candle otherwise means closes the live path never published —
    stored by another process, an import, and found already there — so it is read first."""
    if sub.cursor is None:
        return False
    t = candle.candle_time
    return t - sub.tf_seconds <= sub.cursor or t <= sub.forming_verified


def split_at_unverified_hole(
    sub: Subscription, candles: list[Candle]
) -> tuple[list[Candle], list[Candle]]:
    """``candles`` (ascending) up to the first hole that no store read has covered yet."""
    previous = sub.cursor
    for index, candle in enumerate(candles):
        t = candle.candle_time
        if previous is not None and t <= previous:
            continue
        if previous is not None and t > previous + sub.tf_seconds and t > sub.verified_upto:
            return candles[:index], candles[index:]
        previous = t
    return candles, []


def has_hole(sub: Subscription) -> bool:
    """Would the buffered candles leave a hole after the cursor? (Healing does not need an
    anchored cursor: ``since`` asks for everything after it; only a gap does.)"""
    if sub.cursor is None or not sub.pending:
        return False
    previous = sub.cursor
    for t in sorted(sub.pending):
        if t <= previous:
            continue
        if t > previous + sub.tf_seconds:
            return True
        previous = t
    return False


__all__ = [
    "EMPTY_STORE_CURSOR",
    "Subscription",
    "caught_up",
    "forming_follows",
    "forming_in_step",
    "has_hole",
    "in_step",
    "plan_closed",
    "sent_in_step",
    "split_at_unverified_hole",
]
