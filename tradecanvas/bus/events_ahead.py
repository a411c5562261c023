"""An events stream ahead of the store's event log: the store was restored from an older
backup, or the bus is another store's (DESIGN §10; docs/distributed.md, "A restored store").

Every entry on the events stream was committed before it was added, so the stream's last
event id is at most the store's event counter (``MarketStore.events_newest_id``: the highest
id ever given, which pruning does not lower) when the top is read *before* the counter. A top
above the counter means the log lost events that the stream has: the store was restored
from a backup (or failed over to a replica that had not got the last commits), or this Redis
prefix serves another store. The log then hands out again the ids the stream holds; Redis
refuses those XADDs, and as the top is an entry of ours the publisher takes each refusal for
"already published" (``bus/refusals.py``): no edge gets those events live, and nothing said
so.

:class:`EventsAhead` is the ingest's record of it: the lease holder's event-log tail
(``serve/event_tail.py``) checks when it starts and, while the stream is ahead, every
:data:`RECHECK_S`. A finding is logged once at ERROR with both ids and the repair, shown by
``tradecanvas_bus_events_stream_ahead`` and by the ingest's ``/readyz``
(``bus_events_match_store`` false). It is cleared (INFO) only when the stream's top goes
below the top found — the stream was deleted (the repair) — not when the log's ids pass it:
the events between were refused all the same.

Detection only, no repair by the ingest: edges that read the old stream since the restore
have moved their event cursors past the log's newest id (they skip the ids it hands out
again, from the stream and from the store alike) and must be restarted; a prefix shared with
another store must not have its streams deleted under that store's nodes.
"""

from __future__ import annotations

import logging
from typing import Final, final

import attrs

from tradecanvas.bus.ids import StreamKeys

log = logging.getLogger("tradecanvas.bus.publisher")

# while the stream is ahead, how often the tail reads its top again (to see the repair)
RECHECK_S: Final = 5.0


@attrs.frozen
class Ahead:
    """The events stream's last event id and the store's newest when it was found ahead."""

    top: int
    newest: int


@final
class EventsAhead:
    """Whether the events stream runs ahead of the event log (module docstring)."""

    def __init__(self, keys: StreamKeys) -> None:
        self.keys = keys
        self.found: Ahead | None = None
        self.findings = 0  # since start

    def ids_ahead(self) -> int:
        """By how many ids the stream's top was above the log when found (0: not ahead)."""
        return 0 if self.found is None else self.found.top - self.found.newest

    def check(self, top: int, newest: int) -> bool:
        """The stream's last event id ``top`` (read first) against the store's event counter
        ``newest`` (read after it); True while the stream is ahead."""
        found = self.found
        if found is not None and top >= found.top:
            return True  # not deleted: the log passing the top repairs nothing
        if found is not None:
            self.found = None
            log.info(
                "bus publisher: the events stream %s no longer runs ahead of the event log"
                " (its last event %d, below %d; the store's newest %d): new events are"
                " published again. Restart each edge that ran since the restore",
                self.keys.events,
                top,
                found.top,
                newest,
            )
        if top <= newest:
            return False
        self.found = Ahead(top, newest)
        self.findings += 1
        log.error(
            "bus publisher: the events stream %s runs ahead of the store's event log: its last"
            " entry is event %d, the store's newest event %d. The store was restored from an"
            " older backup (or the Redis prefix %s serves another store): the log hands out"
            " ids %d..%d again, Redis refuses their entries as already published, and no edge"
            " gets those events live. Repair: stop every node, delete the bus keys"
            " (redis-cli --scan --pattern '%s*' | xargs -r redis-cli DEL), start the nodes"
            " (docs/operations.md, troubleshooting)",
            self.keys.events,
            top,
            newest,
            self.keys.prefix,
            newest + 1,
            top,
            self.keys.prefix,
        )
        return True


__all__ = ["RECHECK_S", "Ahead", "EventsAhead"]
