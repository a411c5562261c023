"""A subscriber queue's drain plan (DESIGN §3): what the publish task does, step by step, to
send what is ready — store reads for catch-up, healing and the event log, then the messages.
Plain generators, no I/O: the plan yields ``ReadStore``/``ReadEvents`` (answered with what was
read) and ``Send`` (resumed after the messages went out); offers may land between any two
steps. The rules are in :mod:`tradecanvas.serve.subscriber_queue`'s docstring; the queue keeps
the counts (``take_*``) and this module the order.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable
from typing import TYPE_CHECKING

from tradecanvas.model import Candle
from tradecanvas.serve.outgoing import (
    Action,
    Answer,
    EventsRead,
    EventsTruncated,
    FormingCandle,
    Outgoing,
    Plan,
    ReadEvents,
    ReadStore,
    Send,
    WholeMessage,
)
from tradecanvas.serve.subscription import (
    EMPTY_STORE_CURSOR,
    Subscription,
    forming_follows,
    has_hole,
    plan_closed,
    split_at_unverified_hole,
)

if TYPE_CHECKING:
    from tradecanvas.serve.subscriber_queue import SubscriberQueue


def drain_plan(queue: SubscriberQueue, items: Iterable[Subscription | WholeMessage]) -> Plan:
    for item in items:
        if queue.closing:
            return
        if isinstance(item, WholeMessage):
            if queue.take_whole(item):
                yield Send((item,))
        elif item.active:
            yield from _flush(queue, item)


def _stale(queue: SubscriberQueue, sub: Subscription) -> bool:
    """After a yield: was the subscription replaced/dropped, or the queue closed?"""
    return not sub.active or queue.closing


def _flush(queue: SubscriberQueue, sub: Subscription) -> Plan:
    if sub.needs_events:
        yield from _sync_events(queue, sub)
        if _stale(queue, sub):
            return
    carry: list[Candle] = []
    while True:
        if carry or sub.needs_sync or has_hole(sub):
            yield from _sync(queue, sub, carry[-1].candle_time if carry else -1)
            if _stale(queue, sub):
                return
        pending = {c.candle_time: c for c in carry}
        pending.update((c.candle_time, c) for c in queue.take_pending(sub))
        # a hole before a candle a store read has already covered is the store's own
        # (a gap); one before a newer candle needs another read first
        ready, carry = split_at_unverified_hole(sub, [pending[t] for t in sorted(pending)])
        messages = plan_closed(sub, ready)
        del ready, pending
        if messages:
            yield _sending(messages)
            if _stale(queue, sub):
                return
        if not carry:
            break
    forming = queue.take_forming(sub) if sub.active else None
    if forming is None:
        return
    if not forming_follows(sub, forming):
        if sub.pending:
            # closes published while the drain was sending: they go first, and may be all
            # it was owed (no read for what is in memory)
            queue.requeue_forming(sub, forming)
            return
        # closes owed before it that were never published (stored by another process):
        # the store has them, since they were committed before the forming was offered
        yield from _sync(queue, sub, -1)
        if _stale(queue, sub):
            return
        sub.forming_verified = max(sub.forming_verified, forming.candle_time)
        if sub.pending:  # closes published during the read go first; it follows them
            queue.requeue_forming(sub, forming)
            return
    if sub.cursor is None or forming.candle_time > sub.cursor:
        yield Send((FormingCandle(sub.series_id, forming),))


def _sync_events(queue: SubscriberQueue, sub: Subscription) -> Plan:
    """Send the stored events after the subscription's event cursor, then the live ones
    published meanwhile that the reads did not have. Every event is committed before it is
    published, so each one is in a read that started after the subscription was made, or
    buffered: none is lost, none sent twice (the cursor skips what was sent)."""
    limit = queue.catchup_limit
    first = True
    while True:
        cursor = sub.event_cursor or 0
        answer = yield from _read_events(ReadEvents(sub.series_id, cursor, limit))
        if _stale(queue, sub):
            return
        messages: list[WholeMessage | EventsTruncated] = []
        after = sub.events_after
        if first and after is not None and answer.newest is not None and after > answer.newest:
            # a cursor from another log: start over from this one's newest id
            messages.append(EventsTruncated(sub.series_id, after, answer.newest, ahead=True))
            sub.event_cursor = cursor = answer.newest
        elif first and after is not None and answer.pruned_upto > after:
            messages.append(EventsTruncated(sub.series_id, after, answer.pruned_upto))
        first = False
        for stored in answer.events:
            if stored.event_id > cursor:
                messages.append(WholeMessage(stored.text, sub.series_id, stored.event_id))
                cursor = stored.event_id
        sub.event_cursor = cursor
        if messages:
            yield Send(tuple(messages))
            if _stale(queue, sub):
                return
        if len(answer.events) < limit:
            break
    sub.needs_events = False
    live = queue.take_pending_events(sub)
    fresh = [
        WholeMessage(text, sub.series_id, event_id)
        for event_id, text in live
        if event_id > (sub.event_cursor or 0)
    ]
    if fresh:
        sub.event_cursor = fresh[-1].event_id
        yield Send(tuple(fresh))


def _sync(queue: SubscriberQueue, sub: Subscription, carried_upto: int) -> Plan:
    """Send from the store what the subscription is missing: its catch-up, a heal after
    lagging, or a hole. Live candles published meanwhile wait in the pending buffer (or
    raise the heal target while lagging); the caller sends them afterwards.

    Sets ``sub.verified_upto``: every candle published before the last read started
    (the pending ones, and ``carried_upto`` the caller holds) was committed before it,
    so a hole below them that the read did not fill is the store's own."""
    limit = queue.catchup_limit
    while True:
        target_before_read = sub.heal_target
        sub.verified_upto = max(carried_upto, max(sub.pending, default=-1))
        if sub.use_tail or sub.cursor is None:
            sub.use_tail = False
            chunk = yield from _read(ReadStore(sub.series_id, None, limit))
            complete = True
            if not chunk and sub.cursor is None:
                # nothing stored yet: everything committed from now on is live for this
                # subscriber, so a later hole heals from the very start of the store
                sub.cursor = EMPTY_STORE_CURSOR
        elif sub.probe_anchor:
            sub.probe_anchor = False
            # read from just below the cursor: a stored candle AT the cursor anchors gaps
            raw = yield from _read(ReadStore(sub.series_id, sub.cursor - 1, limit + 1))
            complete = len(raw) <= limit
            if raw and raw[0].candle_time == sub.cursor:
                sub.anchored = True
                raw = raw[1:]
            chunk = raw[:limit]
            del raw
        else:
            chunk = yield from _read(ReadStore(sub.series_id, sub.cursor, limit))
            complete = len(chunk) < limit
        if _stale(queue, sub):
            return
        read_any = bool(chunk)
        messages = plan_closed(sub, chunk)
        # the read's candles are in the messages now: no reference here while they are
        # written (a client that does not read holds them for up to the send timeout)
        del chunk
        if messages:
            yield _sending(messages)
            if _stale(queue, sub):
                return
        target = sub.heal_target
        if complete and (
            target is None
            or (sub.cursor is not None and sub.cursor >= target)
            # the store ends below a target that a read started after it was set: a
            # candle that was never committed cannot be healed (defensive; not expected)
            or (not read_any and target == target_before_read)
        ):
            break
    sub.heal_target = None
    sub.needs_sync = False
    queue.end_lagging_if_healed()


def _sending(messages: list[Outgoing]) -> Send:
    """A Send of ``messages``, which is emptied: the plan keeps no reference to what the
    publish task writes (it drops them as they go out), so a catch-up held up by a client
    that does not read holds only the bytes not yet written."""
    send = Send(tuple(messages))
    messages.clear()
    return send


def _read(read: ReadStore) -> Generator[Action, Answer, list[Candle]]:
    rows = yield read
    if rows is None or isinstance(rows, EventsRead):
        raise TypeError("a ReadStore is answered with the candles read")
    return list(rows)


def _read_events(read: ReadEvents) -> Generator[Action, Answer, EventsRead]:
    answer = yield read
    if not isinstance(answer, EventsRead):
        raise TypeError("a ReadEvents is answered with an EventsRead")
    return answer
