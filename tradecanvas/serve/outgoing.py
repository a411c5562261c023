"""What a subscriber's drain plan asks of the publish task, and the wire text of each message
(DESIGN §3). Plain data and functions, no I/O.

A plan (:mod:`tradecanvas.serve.subscriber_queue`) yields :class:`ReadStore` (answer with
the candles read) and :class:`Send` (send these messages in order); the Hub carries them out
and turns each :data:`Outgoing` into wire texts with :func:`encode`.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence

import attrs

from tradecanvas.model import Candle
from tradecanvas.wire.json import dumps


@attrs.frozen
class ReadStore:
    """Read closed candles of ``series_id``: with ``since`` None the newest ``limit``
    (``CandleStore.tail``), else at most ``limit`` after ``since`` (``CandleStore.since``).
    The publish task answers with the candles read, ascending."""

    series_id: str
    since: int | None
    limit: int


@attrs.frozen
class ReadEvents:
    """Read the event log of ``series_id`` after ``after`` (at most ``limit`` events). The
    publish task answers with an :class:`EventsRead`."""

    series_id: str
    after: int
    limit: int


@attrs.frozen
class StoredEventText:
    event_id: int
    text: str


@attrs.frozen
class EventsRead:
    """The answer to :class:`ReadEvents`: the events (ascending, encoded) and the highest
    event_id the retention has dropped."""

    events: tuple[StoredEventText, ...]
    pruned_upto: int
    # the highest event_id ever given (None: not read): a cursor above it is from another log
    newest: int | None = None


@attrs.frozen(eq=False)
class WholeMessage:
    """A queued system, pong or error message, already encoded; identity is its place. A
    system event carries its series and ``event_id`` (it moves that subscription's event
    cursor, and is skipped when the cursor is past it)."""

    text: str
    series_id: str | None = None
    event_id: int | None = None


@attrs.frozen
class EventsTruncated:
    """The event cursor is older than the retention (events after it were dropped), or
    ``ahead`` of the log's newest id (a store restored from an older backup): either way the
    client reloads the series and goes on after ``pruned_upto``."""

    series_id: str
    events_after: int
    pruned_upto: int
    ahead: bool = False


@attrs.frozen
class ClosedCandles:
    """Closed candles of one series (ascending): ``candles_batch`` messages of at most
    ``catchup_limit`` candles for a ``batch`` subscription, else one ``candle_closed`` each."""

    series_id: str
    candles: tuple[Candle, ...]
    batch: bool


@attrs.frozen
class Gap:
    """A hole the store has too: the time expected next and the time that came."""

    series_id: str
    expected_next_time: int
    actual_time: int


@attrs.frozen
class FormingCandle:
    series_id: str
    candle: Candle


Outgoing = WholeMessage | ClosedCandles | Gap | FormingCandle | EventsTruncated


@attrs.frozen
class Send:
    """Send these messages in this order; the publish task resumes the plan with None."""

    messages: tuple[Outgoing, ...]


Action = ReadStore | ReadEvents | Send
# the publish task resumes a plan with the candles a ReadStore asked for, the EventsRead a
# ReadEvents asked for, None after a Send
Answer = Sequence[Candle] | EventsRead | None
Plan = Generator[Action, Answer, None]


def encode(message: Outgoing, catchup_limit: int) -> list[str]:
    """The wire texts of one message (a batch of closed candles may take several)."""
    if isinstance(message, WholeMessage):
        return [message.text]
    sid = message.series_id
    if isinstance(message, Gap):
        return [
            dumps(
                {
                    "type": "gap",
                    "series_id": sid,
                    "expected_next_time": message.expected_next_time,
                    "actual_time": message.actual_time,
                }
            )
        ]
    if isinstance(message, EventsTruncated):
        return [
            dumps(
                {
                    "type": "events_truncated",
                    "series_id": sid,
                    "events_after": message.events_after,
                    "pruned_upto": message.pruned_upto,
                    "message": (
                        f"events_after {message.events_after} is above this store's newest"
                        f" event {message.pruned_upto} (restored from an older backup?): reload"
                        " the series"
                        if message.ahead
                        else f"events after {message.events_after} up to {message.pruned_upto}"
                        " are older than the retention and no longer stored: reload the series"
                    ),
                }
            )
        ]
    if isinstance(message, FormingCandle):
        return [
            dumps({"type": "candle_forming", "series_id": sid, "candle": message.candle.to_wire()})
        ]
    candles = message.candles
    if not message.batch:
        return [
            dumps({"type": "candle_closed", "series_id": sid, "candle": c.to_wire()})
            for c in candles
        ]
    return [
        dumps(
            {
                "type": "candles_batch",
                "series_id": sid,
                "candles": [c.to_wire() for c in candles[start : start + catchup_limit]],
            }
        )
        for start in range(0, len(candles), catchup_limit)
    ]


__all__ = [
    "Action",
    "Answer",
    "ClosedCandles",
    "EventsRead",
    "EventsTruncated",
    "FormingCandle",
    "Gap",
    "Outgoing",
    "Plan",
    "ReadEvents",
    "ReadStore",
    "Send",
    "StoredEventText",
    "WholeMessage",
    "encode",
]
