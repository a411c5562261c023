"""What ``tradecanvas subscribe`` remembers across reconnects (DESIGN §3, §10): per series, the
last closed ``candle_time`` and the last ``event_id`` it received, so that resubscribing with
``since`` and ``events_after`` continues the stream with nothing lost or doubled.

Plain data and rules, no I/O: :class:`SubscribeCursors` reads each message the daemon sends
(:meth:`~SubscribeCursors.take`) and writes the subscribe messages of a (re)connection
(:meth:`~SubscribeCursors.subscribe_messages`). The daemon does the rest: a ``since`` cursor
gets exactly the closed candles after it, an ``events_after`` cursor exactly the stored
events after it, then live ones.

Two messages a resubscription may legitimately repeat are recognised here: the ``gap`` just
before a candle that the dropped connection did not deliver (it is sent again before that
candle), and ``events_truncated`` (its cursor moves to the retention's mark, so it is not
asked again). An event cursor starts from ``--events-after`` or the first ``event_id``
received: before either, a resubscription asks for live events only, as the first
subscription did.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final, final

# error codes that refuse a subscription for good (the series is not served, or the request
# itself is bad): such a series is not asked for again on a reconnect
REFUSAL_CODES: Final = ("bad_request", "unknown_series", "too_many_subscriptions")


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _last_closed_time(message: Mapping[str, object]) -> int | None:
    kind = message.get("type")
    if kind == "candle_closed":
        candle = message.get("candle")
        return _int(candle.get("candle_time")) if isinstance(candle, Mapping) else None
    if kind == "candles_batch":
        candles = message.get("candles")
        times = [
            _int(c.get("candle_time"))
            for c in (candles if isinstance(candles, list) else [])
            if isinstance(c, Mapping)
        ]
        return max((t for t in times if t is not None), default=None)
    return None


@final
class SubscribeCursors:
    """The per-series cursors of one ``tradecanvas subscribe`` run (see the module
    docstring). ``since`` and ``events_after`` are the starting cursors of every series."""

    def __init__(
        self,
        series: Sequence[str],
        *,
        since: int | None,
        events_after: int | None,
        batch: bool,
    ) -> None:
        self.series = list(dict.fromkeys(series))
        self.batch = batch
        self.since: dict[str, int | None] = dict.fromkeys(self.series, since)
        self.events_after: dict[str, int | None] = dict.fromkeys(self.series, events_after)
        self.refused: set[str] = set()
        self._last_gap: dict[str, tuple[object, object]] = {}

    @property
    def active(self) -> list[str]:
        """The series still asked for: every one the daemon has not refused."""
        return [sid for sid in self.series if sid not in self.refused]

    def subscribe_messages(self) -> list[dict[str, object]]:
        """The subscribe message of each active series, from its cursors."""
        messages: list[dict[str, object]] = []
        for sid in self.active:
            message: dict[str, object] = {
                "type": "subscribe",
                "series_id": sid,
                "since": self.since[sid],
                "supports_batch": self.batch,
            }
            if self.events_after[sid] is not None:
                message["events_after"] = self.events_after[sid]
            messages.append(message)
        return messages

    def take(self, message: object) -> bool:
        """Move the cursors past ``message``; False when it repeats one already taken (to
        be left out of the output)."""
        if not isinstance(message, Mapping):
            return True
        sid = message.get("series_id")
        if not isinstance(sid, str) or sid not in self.since:
            return True
        kind = message.get("type")
        closed = _last_closed_time(message)
        if closed is not None:
            previous = self.since[sid]
            self.since[sid] = closed if previous is None else max(previous, closed)
        elif kind == "gap":
            gap = (message.get("expected_next_time"), message.get("actual_time"))
            if self._last_gap.get(sid) == gap:
                return False
            self._last_gap[sid] = gap
        elif kind == "system":
            self._advance_events(sid, _int(message.get("event_id")))
        elif kind == "events_truncated":
            self._advance_events(sid, _int(message.get("pruned_upto")))
        elif kind == "error" and message.get("code") in REFUSAL_CODES:
            self.refused.add(sid)
        return True

    def _advance_events(self, sid: str, event_id: int | None) -> None:
        if event_id is not None:
            previous = self.events_after[sid]
            self.events_after[sid] = event_id if previous is None else max(previous, event_id)


__all__ = ["REFUSAL_CODES", "SubscribeCursors"]
