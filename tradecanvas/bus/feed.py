"""EdgeFeed: an edge's reader of the bus, feeding its Hub as the pipeline feeds it in the
single process.

:meth:`EdgeFeed.run` owns two tasks, each with its own Redis connection:

- **closed**: the series streams and the events stream, read with ``XREAD`` from the edge's
  own positions (:class:`~tradecanvas.bus.cursors.EdgeCursors`, started from the cursors it
  was given — normally the store's heads and the event log's last id when the edge starts).
  It blocks on one stream only, the batch notices (``bus/ids.py``: the publisher adds one
  per batch in the same script, naming the streams the batch appended to and carrying the
  entries it appended), and delivers the entries the notices carry: one read per batch,
  not an XREAD over every series (600 streams for 100 series × 6 timeframes, whose
  arguments the edge built and Redis parsed, and registered as blocked on, for each read)
  nor a second round trip for the streams named. A notice without entries (a writer of an
  older version) has the edge read the streams it names, without blocking. Every stream is
  read once after each (re)connect, when a notice's number shows that some were missed
  (trimmed while the edge was behind, or Redis's counter reset), and when no notice came
  for ``block_ms`` (a writer that sends none). What a notice carries is what its streams
  got, so the same cursors apply: per reply, the candles of the series the sink follows
  (``sink.follows``) go first (``sink.publish_closed``, ascending, each exactly once; by
  timeframe, shortest first, each timeframe's corked: ``bus/cork.py``), then the events
  (``sink.publish_system``) — the events only when no series' reply
  was cut by ``COUNT`` (the cut streams and the events are read again at once), so an event
  never overtakes the candles its commit published. A hole
  in a stream (trimmed away, lost in a Redis restart, dropped from a full outbox) is filled
  through ``fill_candles`` / ``fill_events`` — store reads — before the candles after it;
  after every (re)connect each series and the events are read from the store past their
  cursors, since a lost tail shows no hole until the next bar. The entries of a series
  nobody on this edge follows are passed over by their IDs, not decoded (:meth:`_deliver`).
- **forming**: a ``get_message`` loop on the forming channel (at most once); a forming
  candle is passed on only after the closes before it (see the cursors' docstring).

Faults: a Redis failure is logged, shown in :meth:`EdgeFeed.health`, and followed by a
reconnect with backoff; nothing is lost (the positions survive, holes are filled from the
store) and nothing doubles (the cursors only move forward). A malformed entry is logged and
counted, and its candle comes from the store. Errors of the fill callbacks (StoreError) and
of the sink propagate: they are not the bus's to cure.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Final, Protocol, TypeVar, final

import attrs
import coredis
import trio
from coredis.commands.constants import CommandName

from tradecanvas.bus.cork import HeldCork
from tradecanvas.bus.cursors import CandleGap, EdgeCursors, EventGap
from tradecanvas.bus.ids import StreamId, StreamKeys
from tradecanvas.bus.ingest_report import IngestReportWatch
from tradecanvas.bus.outage_log import OutageLog
from tradecanvas.bus.redis_io import BusHealth, as_sent, describe, reconnecting
from tradecanvas.bus.replies import (
    NOTICES_TOP,
    RawEntry,
    candle_of,
    entry_id_of,
    event_of,
    notice_of,
    notices_top,
    xread_entries,
)
from tradecanvas.errors import WireError
from tradecanvas.model import Candle
from tradecanvas.ops.metrics import DeliveryTimer
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.pipeline.publish import MarketSink
from tradecanvas.service_urls import url_without_password
from tradecanvas.upstream.backoff import Backoff
from tradecanvas.wire.bus import CANDLE_FIELD, EVENT_FIELD, decode_forming

log = logging.getLogger(__name__)

# candles → store reads: (series_id, after, before) → ascending candles with
# after < candle_time < before (no bound for None); a page may be short, it is asked again
FillCandles = Callable[[str, int | None, int | None], Awaitable[Sequence[Candle]]]
# events → event log reads: (after, before) → ascending events with after < id < before
FillEvents = Callable[[int, int | None], Awaitable[Sequence[SystemEvent]]]

# how long one XREAD blocks (ms): short enough that a dead connection is noticed soon
DEFAULT_BLOCK_MS: Final = 5_000
# entries per stream per XREAD
DEFAULT_COUNT: Final = 1_000
DEFAULT_BACKOFF: Final = Backoff(base_s=0.1, cap_s=5.0)
DEFAULT_COMMAND_TIMEOUT_S: Final = 10.0


@attrs.frozen
class FeedSettings:
    keys: StreamKeys = attrs.field(factory=StreamKeys)
    block_ms: int = DEFAULT_BLOCK_MS
    count: int = DEFAULT_COUNT
    backoff: Backoff = DEFAULT_BACKOFF
    command_timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S


@attrs.frozen
class FeedStatistics:
    candles: int
    events: int
    forming: int
    candle_gaps: int
    event_gaps: int
    filled_candles: int
    filled_events: int
    malformed: int
    reconnects: int
    passed_over: int  # closed candles of series nobody followed, read and not decoded


class EdgeSink(MarketSink, Protocol):
    """The edge's Hub as its feed sees it: a MarketSink that says whether anyone follows a
    series (``serve.hub.Hub.follows``)."""

    def follows(self, series_id: str) -> bool: ...


_T = TypeVar("_T")


@final
class EdgeFeed:
    """Owns an edge's cursors on the bus and the two reading tasks (module docstring).

    Channel contract: it calls the sink's publish methods, which only queue (the Hub's never
    block); each closed candle of each series once, ascending; each event once, ascending.
    """

    def __init__(
        self,
        url: str,
        *,
        series: Mapping[str, int | None],
        events_after: int,
        fill_candles: FillCandles,
        fill_events: FillEvents,
        settings: FeedSettings | None = None,
    ) -> None:
        self.url = url
        self.settings = settings or FeedSettings()
        self.cursors = EdgeCursors(series, events_after)
        keys = self.settings.keys
        self._stream_of = {sid: keys.series(sid).encode() for sid in series}
        self._series_of = {key: sid for sid, key in self._stream_of.items()}
        # a stream's timeframe length: a read is delivered shortest first (_deliver)
        self._length_of = {
            key: self.cursors.timeframe(sid).seconds for sid, key in self._stream_of.items()
        }
        self._events_key = keys.events.encode()
        # every stream's read position, kept between reads: each read updates only the
        # streams that moved (EdgeCursors.moved_positions), not all of them
        self._xread_streams: dict[bytes, str] = {}
        self._fill_candles = fill_candles
        self._fill_events = fill_events
        self._connected = {"closed": False, "forming": False}
        self._ready = {"closed": trio.Event(), "forming": trio.Event()}
        self._health_changed = trio.Event()
        self._last_error: str | None = None
        self._counts = dict.fromkeys(attrs.fields_dict(FeedStatistics), 0)
        # what the ingest lease holder says of Binance, for /readyz (bus/ingest_report.py)
        self.ingest_report = IngestReportWatch(url, keys)
        self._delivery: DeliveryTimer | None = None

    def health(self) -> BusHealth:
        return BusHealth(all(self._connected.values()), self._last_error, 0)

    def statistics(self) -> FeedStatistics:
        return FeedStatistics(**self._counts)

    async def wait_connected(self, connected: bool = True) -> None:
        """Wait until both tasks are connected to Redis (or, with False, one is not)."""
        while self.health().connected is not connected:
            await self._health_changed.wait()
        await trio.lowlevel.checkpoint()

    def _set_connected(self, name: str, connected: bool) -> None:
        self._connected[name] = connected
        self._health_changed.set()
        self._health_changed = trio.Event()

    async def wait_ready(self) -> None:
        """Wait until both tasks have connected once (the stores' tails are delivered and
        the forming channel is subscribed)."""
        for event in self._ready.values():
            await event.wait()

    async def run(
        self,
        sink: EdgeSink,
        *,
        delivery: DeliveryTimer | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Feed ``sink`` until cancelled. Started at once; :meth:`health` tells whether Redis
        is there (an edge still serves its store's history without it). With ``delivery``,
        each read's candles are timed from the read to their last subscriber's send."""
        self._delivery = delivery
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._reconnecting, "closed", self._read_closed, sink)
            nursery.start_soon(self._reconnecting, "forming", self._read_forming, sink)
            nursery.start_soon(self.ingest_report.run)
            task_status.started()

    async def _reconnecting(
        self,
        name: str,
        body: Callable[[coredis.Redis[bytes], EdgeSink], Awaitable[None]],
        sink: EdgeSink,
    ) -> None:
        outage = OutageLog(log)

        def connected(reconnect: bool) -> None:
            if reconnect:
                self._counts["reconnects"] += 1
                url, took = url_without_password(self.url), outage.recovered(trio.current_time())
                log.info("edge feed (%s): reconnected to Redis at %s%s", name, url, took)
            self._set_connected(name, True)

        def failed(failure: BaseException) -> None:
            self._last_error = describe(failure)
            self._set_connected(name, False)
            line = f"edge feed ({name}): Redis failed ({self._last_error}), retrying"
            outage.failed(trio.current_time(), line)

        # the bodies read until a failure: they never return
        await reconnecting(
            self.url,
            lambda client: body(client, sink),
            command_timeout_s=self.settings.command_timeout_s,
            backoff=self.settings.backoff,
            on_connected=connected,
            on_failure=failed,
        )

    # --- closed candles and events -----------------------------------------------------

    async def _read_closed(self, client: coredis.Redis[bytes], sink: EdgeSink) -> None:
        for gap in self.cursors.resync():
            await self._fill_candle_gap(gap, sink)
        await self._fill_event_gap(self.cursors.resync_events(), sink)
        self._ready["closed"].set()
        keys = self.settings.keys
        notices_key = keys.batches.encode()
        # where the notices stand before the first read of every stream: a batch appended
        # after it has a notice after it, one appended before is in that read
        with trio.fail_after(self.settings.command_timeout_s):
            top = await as_sent(
                client, CommandName.EVAL, NOTICES_TOP, 2, keys.batches, keys.batches_count
            )
        position, last = notices_top(top)
        number: int | None = last
        # the streams to read without waiting: None, every stream; else the ones notices
        # named (or a read cut short by COUNT) that were not read yet
        unread: set[bytes] | None = None
        timeout = self.settings.block_ms / 1000 + self.settings.command_timeout_s
        streams = self._xread_streams
        while True:
            for sid, at in self.cursors.moved_positions().items():
                streams[self._events_key if sid is None else self._stream_of[sid]] = str(at)
            if unread is None or unread:
                wanted = streams if unread is None else {k: streams[k] for k in unread}
                with trio.fail_after(self.settings.command_timeout_s):
                    raw = await self._xread(client, wanted)
                reply = xread_entries(raw)
                with self._timed():
                    unread = await self._deliver(reply, sink) if reply else set()
                continue
            # nothing to read: wait for the next notice (one key, whatever the streams)
            with trio.fail_after(timeout):
                raw = await self._xread(
                    client, {notices_key: str(position)}, self.settings.block_ms
                )
            notices = xread_entries(raw).get(notices_key, ())
            if not notices:
                # no notice for block_ms: every stream once, in case a writer that sends
                # none (an older version) appended something
                unread = None
                continue
            # what the notices carry, stream by stream in their order (None: one carried
            # nothing, so the streams they name are read instead)
            carried: dict[bytes, list[RawEntry]] | None = {}
            for entry in notices:
                position = entry_id_of(entry)
                try:
                    n, named, entries = notice_of(entry)
                except WireError as exc:
                    self._malformed(notices_key, position, exc)
                    unread, number = None, None
                    continue
                if number is None or n != number + 1:
                    unread = None  # notices missed (trimmed, or the counter was reset)
                number = n
                if unread is not None:
                    unread.update(k for k in named if k in streams)
                if entries is None:
                    carried = None
                elif carried is not None:
                    for key, entry_id, payload in entries:
                        field = EVENT_FIELD if key == self._events_key else CANDLE_FIELD
                        carried.setdefault(key, []).append([entry_id, [field, payload]])
            if unread is not None and carried is not None:
                # every notice read carries its batch: deliver it, no read of the streams
                reply = {k: v for k, v in carried.items() if k in streams}
                with self._timed():
                    unread = await self._deliver(reply, sink, whole=True) if reply else set()

    def _timed(self) -> AbstractContextManager[None]:
        """Brackets one read's delivery for ``tradecanvas_delivery_latency_seconds``."""
        if self._delivery is None:
            return nullcontext()
        return self._delivery.publishing(trio.current_time(), trio.current_time)

    async def _xread(
        self, client: coredis.Redis[bytes], streams: Mapping[bytes, str], block_ms: int = -1
    ) -> object:
        """XREAD of ``streams`` from their positions (blocking ``block_ms`` if not -1),
        answered as Redis sent it: coredis's xread() checks its arguments and turns every
        entry into a StreamEntry with a dict of its fields, which cost more than the rest of
        the read (:func:`xread_entries` reads it)."""
        block = () if block_ms < 0 else (b"BLOCK", block_ms)
        count = (b"COUNT", self.settings.count)
        return await as_sent(
            client, CommandName.XREAD, *block, *count, b"STREAMS", *streams, *streams.values()
        )

    async def _deliver(
        self, reply: Mapping[bytes, Sequence[RawEntry]], sink: EdgeSink, *, whole: bool = False
    ) -> set[bytes]:
        """Deliver what an XREAD returned (``whole``: what batch notices carried, which
        nothing cut short); the streams to read again at once: those cut short by COUNT, and
        the events stream when its entries wait for them.

        A series nobody on this edge follows is passed over (``EdgeCursors.pass_over``):
        its entries are not decoded nor published (the Hub would drop them), and its cursor
        moves past them by their IDs. A client that subscribes later still gets each of
        them once: ``Hub.subscribe`` registers at once, and its catch-up reads the store
        after that (the seamless catch-up, whose cursor drops what both bring); nothing is
        awaited between ``follows`` and the pass-over, so a candle passed over was on its
        stream before the registration, and every entry is committed to the store before
        it is added. A followed series is decoded, its holes filled, as before."""
        keys = self.settings.keys
        events_key = self._events_key
        limit = None if whole else self.settings.count
        cut: set[bytes] = set()
        # the streams by timeframe, shortest first (a minute's 1m closes before the derived
        # bars it completed), each timeframe's candles written out (uncorked) before the
        # next one's are decoded; corked within one (bus/cork.py): a subscriber gets what it
        # is owed of it in one write. Each stream's own order is kept; events come last.
        length_of = self._length_of
        streams = sorted((k for k in reply if k != events_key), key=lambda k: length_of.get(k, 0))
        with HeldCork(sink) as cork:
            length: int | None = None
            for key in streams:
                entries = reply[key]
                if limit is not None and len(entries) >= limit:
                    cut.add(key)
                series_id = self._series_of.get(key) or keys.series_of(key)
                if (
                    entries
                    and not sink.follows(series_id)
                    and self.cursors.pass_over(series_id, entry_id_of(entries[-1]))
                ):
                    self._counts["passed_over"] += len(entries)
                    self._publish_closed(sink, series_id, ())  # a forming candle now allowed
                    continue
                if length != length_of.get(key, 0):
                    cork.release()
                    length = length_of.get(key, 0)
                candles = self._decoded(key, series_id, entries, candle_of)
                for run in self.cursors.runs(series_id, candles):
                    if run.gap is not None:
                        cork.release()
                        await self._fill_candle_gap(run.gap, sink)
                    cork.hold()
                    accepted = self.cursors.accept(series_id, run.candles)
                    self._publish_closed(sink, series_id, accepted)
            entries = reply.get(events_key, ())
            if not entries:
                return cut
            if cut:
                return cut | {events_key}  # the events wait for the candles before them
            if limit is not None and len(entries) >= limit:
                cut.add(events_key)
            events = dict(self._decoded(events_key, None, entries, event_of))
            for event_run in self.cursors.event_runs(sorted(events)):
                if event_run.gap is not None:
                    cork.release()
                    await self._fill_event_gap(event_run.gap, sink)
                cork.hold()
                for event_id in self.cursors.accept_events(event_run.event_ids):
                    self._publish_system(sink, events[event_id])
            return cut

    def _decoded(
        self,
        key: bytes,
        series_id: str | None,
        entries: Sequence[RawEntry],
        decode: Callable[[RawEntry, StreamId], _T],
    ) -> list[_T]:
        """``decode`` of each entry of stream ``key`` (a series' or, with None, the events'),
        each noted as read; a malformed one is counted and left out (the store fills it)."""
        out: list[_T] = []
        for entry in entries:
            entry_id = entry_id_of(entry)
            self.cursors.note_read(series_id, entry_id)
            try:
                out.append(decode(entry, entry_id))
            except WireError as exc:
                self._malformed(key, entry_id, exc)
        return out

    def _malformed(self, key: bytes, entry_id: StreamId, exc: WireError) -> None:
        self._counts["malformed"] += 1
        log.warning(
            "edge feed: malformed entry %s in %s (%s); filled from the store", entry_id, key, exc
        )

    def _publish_closed(self, sink: EdgeSink, series_id: str, candles: Sequence[Candle]) -> None:
        if candles:
            self._counts["candles"] += len(candles)
            sink.publish_closed(series_id, candles)
        forming = self.cursors.release_forming(series_id)
        if forming is not None:
            self._counts["forming"] += 1
            sink.publish_forming(series_id, forming)

    def _publish_system(self, sink: EdgeSink, event: SystemEvent) -> None:
        self._counts["events"] += 1
        sink.publish_system(event)

    async def _fill_candle_gap(self, gap: CandleGap, sink: EdgeSink) -> None:
        """Read the hole from the store, page by page, until it gives nothing new."""
        sid = gap.series_id
        timeframe = self.cursors.timeframe(sid)
        if gap.before is not None:
            self._counts["candle_gaps"] += 1
        while True:
            cursor = self.cursors.cursor(sid)
            if (
                cursor is not None
                and gap.before is not None
                and timeframe.next_open(cursor) >= gap.before
            ):
                return  # nothing can lie between
            filled = self.cursors.accept(
                sid, await self._fill_candles(sid, cursor, gap.before), before=gap.before
            )
            if not filled:
                return
            self._counts["filled_candles"] += len(filled)
            self._publish_closed(sink, sid, filled)

    async def _fill_event_gap(self, gap: EventGap, sink: EdgeSink) -> None:
        if gap.before is not None:
            self._counts["event_gaps"] += 1
        while True:
            after = self.cursors.events_after
            if gap.before is not None and after + 1 >= gap.before:
                return
            got = {e.event_id: e for e in await self._fill_events(after, gap.before) if e.event_id}
            fresh = self.cursors.accept_events(list(got), before=gap.before)
            if not fresh:
                return
            self._counts["filled_events"] += len(fresh)
            for event_id in fresh:
                self._publish_system(sink, got[event_id])

    # --- forming -----------------------------------------------------------------------

    async def _read_forming(self, client: coredis.Redis[bytes], sink: EdgeSink) -> None:
        async with client.pubsub(
            channels=[self.settings.keys.forming], retry_policy=None, ignore_subscribe_messages=True
        ) as pubsub:
            self._ready["forming"].set()
            while True:
                message = await pubsub.get_message()
                if message is None or message["type"] != "message":
                    continue
                data = message["data"]
                try:
                    if not isinstance(data, bytes | str):
                        raise WireError("bus", f"forming message data {data!r}")
                    series_id, candle = decode_forming(data)
                except WireError as exc:
                    self._counts["malformed"] += 1
                    log.warning("edge feed: malformed forming message (%s)", exc)
                    continue
                forming = self.cursors.offer_forming(series_id, candle)
                if forming is not None:
                    self._counts["forming"] += 1
                    sink.publish_forming(series_id, forming)
