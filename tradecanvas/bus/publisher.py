"""BusPublisher: the ingest role's pipeline sink that puts what was committed on Redis Streams.

It implements ``pipeline.MarketSink`` — ``publish_closed``, ``publish_system`` and
``publish_forming`` only queue into the :class:`~tradecanvas.bus.outbox.Outbox` and never
block — so it stands where the Hub stands in the single process (or beside it, behind a
tee). Its one task, :meth:`BusPublisher.run`, takes each tick's batch and sends it in one
round trip: one EVAL of :data:`XADD_ALL`, which runs an ``XADD key MAXLEN ~ n <open_ms>-0``
per closed candle (one stream per series) and an XADD per system event on the events stream
(``<event_id>-0``), in the batch's order, and answers for each; when anything was appended,
the same script adds the batch's notice (its number and the streams appended to) to the
notices stream, which is what edges wait on (``bus/ids.py``, ``bus/feed.py``); then, in the
same pipeline (no MULTI), a PUBLISH per forming candle. One script instead of a pipeline of
XADDs: coredis's work per command was most of the publisher's CPU (docs/distributed.md,
"Throughput"), and an edge wakes once per batch. Redis refusing an ID at or below a stream's
top means "already published" when that top is one of ours; a top no writer of ours made
blocks the stream, which is logged once at ERROR, counted and shown (``bus/refusals.py``).

Faults: a Redis failure (connection refused or lost, a command not answered within
``command_timeout_s``) is logged, shown in :meth:`BusPublisher.health`, and followed by a
reconnect with capped exponential backoff and jitter; the batch in flight was not settled,
so it is sent again — the entries Redis had appended before the failure are refused then,
never duplicated. The committed candles never wait for Redis: the outbox holds them (bounded,
see its docstring; edges heal anything dropped from the store).

Shutdown: drain by closing — :meth:`BusPublisher.close` (after the ingest stopped) lets
:meth:`run` return once the outbox is empty; the caller bounds that with a deadline.
Errors: nothing of Redis's escapes :meth:`run`; any other exception is a bug and propagates.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Final, final

import attrs
import coredis
import trio
from coredis.commands.constants import CommandName
from coredis.exceptions import ResponseError
from coredis.response._callbacks import NoopCallback

from tradecanvas.bus.events_ahead import EventsAhead
from tradecanvas.bus.ids import (
    NOTICE_ENTRIES_FIELD,
    NOTICE_KEYS_FIELD,
    NOTICE_NUMBER_FIELD,
    StreamId,
    StreamKeys,
    candle_entry_id,
    event_entry_id,
    event_id_of,
)
from tradecanvas.bus.outage_log import OutageLog
from tradecanvas.bus.outbox import (
    DEFAULT_MAX_BACKLOG,
    Answer,
    Batch,
    Entry,
    Outbox,
    OutboxStatistics,
)
from tradecanvas.bus.redis_io import (
    XADD_REFUSAL,
    BusHealth,
    as_sent,
    describe,
    failure_or_raise,
    open_redis,
    reconnecting,
)
from tradecanvas.bus.refusals import TOP_OF, BlockedStreams, StreamTop, foreign_top
from tradecanvas.bus.replies import entry_id_of
from tradecanvas.errors import WireError
from tradecanvas.model import Candle
from tradecanvas.pipeline.commit import PipelineResult
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.service_urls import url_without_password
from tradecanvas.upstream.backoff import Backoff
from tradecanvas.wire.bus import (
    CANDLE_FIELD,
    EVENT_FIELD,
    encode_candle,
    encode_event,
    encode_forming,
)

log = logging.getLogger(__name__)

# a week of 1m bars per series stream; an edge further behind fills from the store
DEFAULT_MAXLEN: Final = 10_080
DEFAULT_EVENTS_MAXLEN: Final = 100_000
# batch notices (one per batch that appended anything, carrying its entries): an edge further
# behind reads every stream once instead. 200 notices of a live tick's few hundred entries
# (about 150 bytes each) are some 10 MB; at 50 batches/s they are 4 s of an edge's lag
DEFAULT_BATCHES_MAXLEN: Final = 200
# entries per pipeline: large enough to amortise the round trip, small enough that one
# batch's reply stays a few MB
DEFAULT_BATCH_MAX: Final = 2_000
DEFAULT_BACKOFF: Final = Backoff(base_s=0.1, cap_s=5.0)
DEFAULT_COMMAND_TIMEOUT_S: Final = 10.0
# how long a node taking the lease over waits for the events stream's last id: its first
# commits wait for its event tail, which waits for this (published_event_id)
EVENTS_TOP_TIMEOUT_S: Final = 2.0
_AS_IS: Final = NoopCallback[object]()
# One batch's XADDs, run by Redis in one go: KEYS are the streams, then the batch notices
# stream and its counter; ARGV the series streams' MAXLEN, the events stream's, the notices'
# and the entries, one string: per entry ``<id>\n<field>\n<payload length>\n<payload>``
# (the length ends a payload, which may hold any byte; one argument instead of four per
# entry: coredis's work per argument was most of the publisher's). It answers {answers,
# tops}: per entry 1 appended, {k} when the stream refused the ID as at or below its top,
# ``tops[k]`` (bus/refusals.py: already published, or a stream blocked by a foreign ID; each
# stream's top once, however many entries it refused), or the error's text. Each
# XADD's own error is caught (pcall): one failing entry does not stop the others, as in a
# pipeline. When anything was appended, one notice goes on the notices
# stream in the same script: its number ``n``, the streams appended to (``keys``, one per
# line), and the entries appended (``entries``: per entry its stream, ID, payload length and
# payload, joined by newlines), so that an edge that reads the notice has the entries
# without reading the streams (bus/ids.py).
_XADD_ALL: Final = """
TOP_OF
local answers, moved, seen, carried = {}, {}, {}, {}
local entries, blob, at = #KEYS - 2, ARGV[4], 1
for i = 1, entries do
  local e1 = string.find(blob, '\\n', at, true)
  local e2 = string.find(blob, '\\n', e1 + 1, true)
  local e3 = string.find(blob, '\\n', e2 + 1, true)
  local id = string.sub(blob, at, e1 - 1)
  local field = string.sub(blob, e1 + 1, e2 - 1)
  local length = tonumber(string.sub(blob, e2 + 1, e3 - 1))
  local payload = string.sub(blob, e3 + 1, e3 + length)
  at = e3 + length + 1
  local maxlen = ARGV[1]
  if field == 'EVENT_FIELD' then
    maxlen = ARGV[2]
  end
  local r = redis.pcall('XADD', KEYS[i], 'MAXLEN', '~', maxlen, id, field, payload)
  if type(r) == 'table' and r.err then
    if string.find(r.err, 'XADD_REFUSAL', 1, true) then
      answers[i] = {top_of(KEYS[i])}
    else
      answers[i] = r.err
    end
  else
    answers[i] = 1
    if not seen[KEYS[i]] then
      seen[KEYS[i]] = true
      moved[#moved + 1] = KEYS[i]
    end
    local c = #carried
    carried[c + 1] = KEYS[i]
    carried[c + 2] = id
    carried[c + 3] = length
    carried[c + 4] = payload
  end
end
if #moved > 0 then
  local n = redis.call('INCR', KEYS[entries + 2])
  redis.call('XADD', KEYS[entries + 1], 'MAXLEN', '~', ARGV[3], '*',
    'NOTICE_NUMBER', n, 'NOTICE_KEYS', table.concat(moved, '\\n'),
    'NOTICE_ENTRIES', table.concat(carried, '\\n'))
end
return {answers, tops}
"""
XADD_ALL: Final = (
    _XADD_ALL.replace("TOP_OF", TOP_OF)
    .replace("XADD_REFUSAL", XADD_REFUSAL)
    .replace("NOTICE_NUMBER", NOTICE_NUMBER_FIELD.decode())
    .replace("NOTICE_KEYS", NOTICE_KEYS_FIELD.decode())
    .replace("NOTICE_ENTRIES", NOTICE_ENTRIES_FIELD.decode())
    .replace("EVENT_FIELD", EVENT_FIELD.decode())
)


@attrs.frozen
class PublisherSettings:
    keys: StreamKeys = attrs.field(factory=StreamKeys)
    maxlen: int = DEFAULT_MAXLEN
    events_maxlen: int = DEFAULT_EVENTS_MAXLEN
    batches_maxlen: int = DEFAULT_BATCHES_MAXLEN
    batch_max: int = DEFAULT_BATCH_MAX
    max_backlog: int = DEFAULT_MAX_BACKLOG
    backoff: Backoff = DEFAULT_BACKOFF
    command_timeout_s: float = DEFAULT_COMMAND_TIMEOUT_S


@attrs.frozen
class PublisherStatistics:
    outbox: OutboxStatistics
    batches: int
    reconnects: int
    events_without_id: int


@final
class BusPublisher:
    """Owns the outbox and the one task that sends it to Redis (see the module docstring).

    Channel contract: the publish calls never block and never fail (they return no failure
    descriptions); what Redis does with the entries shows in :meth:`health` and
    :meth:`statistics`.
    """

    def __init__(self, url: str, settings: PublisherSettings | None = None) -> None:
        self.url = url
        self.settings = settings or PublisherSettings()
        if min(self.settings.maxlen, self.settings.events_maxlen, self.settings.batches_maxlen) < 1:
            raise ValueError("maxlen, events_maxlen and batches_maxlen must be >= 1")
        if self.settings.batch_max < 1:
            raise ValueError("batch_max must be >= 1")
        self._outbox = Outbox(self.settings.max_backlog)
        self._work = trio.Event()
        self._settled = trio.Event()  # set (and replaced) after every batch is answered
        self._connected = False
        self._health_changed = trio.Event()
        self._last_error: str | None = None
        self._closing = False
        self._batches = 0
        self._reconnects = 0
        self._outage = OutageLog(log)
        self._events_without_id = 0
        self._blocked = BlockedStreams()
        self.events_ahead = EventsAhead(self.settings.keys)  # checked by the event tail

    # --- the sink (pipeline.MarketSink) ------------------------------------------------

    def publish_closed(self, series_id: str, candles: Sequence[Candle]) -> Sequence[str]:
        stream = self.settings.keys.series(series_id)
        for candle in candles:
            self._outbox.add(
                Entry(stream, candle_entry_id(candle.candle_time), encode_candle(candle))
            )
        self._work.set()
        return ()

    def publish_system(self, event: SystemEvent) -> Sequence[str]:
        if event.event_id is None:
            # not in the event log, so it has no place on the events stream (a bug upstream)
            self._events_without_id += 1
            log.warning("bus: system event without an event_id not published: %s", event)
            return ()
        self._outbox.add(
            Entry(
                self.settings.keys.events,
                event_entry_id(event.event_id),
                encode_event(event),
                events=True,
            )
        )
        self._work.set()
        return ()

    def publish_forming(self, series_id: str, candle: Candle) -> None:
        self._outbox.add_forming(series_id, encode_forming(series_id, candle))
        self._work.set()

    def corked(self) -> contextlib.AbstractContextManager[None]:
        """Nothing to hold: the outbox already sends a tick's entries in one batch."""
        return contextlib.nullcontext()

    def publish_result(self, result: PipelineResult) -> None:
        """A pipeline result as ``IngestPipeline.publish`` sends it: series in ``series_id``
        order, then the events."""
        for update in result.in_series_id_order():
            self.publish_closed(update.series_id, update.candles)
        for event in result.events:
            self.publish_system(event)

    # --- state -------------------------------------------------------------------------

    def health(self) -> BusHealth:
        return BusHealth(self._connected, self._last_error, self._outbox.backlog)

    def blocked_streams(self) -> dict[str, StreamId]:
        """The streams blocked by a foreign top now (``bus/refusals.py``) → that top's ID."""
        return dict(self._blocked.streams)

    def readiness(self, *, streams: bool) -> dict[str, bool]:
        """``/readyz``'s checks of the bus publisher: connected to Redis and, with
        ``streams`` (role ingest: the bus is what it is for), no stream blocked and the
        events stream not ahead of the store's log (``bus/events_ahead.py``). An edge's
        publisher carries HTTP writes only: a blocked stream there is logged and counted,
        but does not take the edge out of its balancer."""
        checks = {"bus_publisher_connected": self._connected}
        if streams:
            checks["bus_streams_writable"] = not self._blocked.streams
            checks["bus_events_match_store"] = self.events_ahead.found is None
        return checks

    async def published_event_id(self, timeout_s: float = EVENTS_TOP_TIMEOUT_S) -> int | None:
        """The last event id on the events stream (0: none), asked on a connection of its own;
        None when Redis does not answer within ``timeout_s`` or the stream's last entry is
        no event's. An ingest node taking the lease over starts its event-log tail there
        (``serve/event_tail.py``): what is on the stream, the previous holder published."""
        events = self.settings.keys.events
        try:
            with trio.fail_after(timeout_s):
                async with open_redis(self.url) as client:
                    raw = await as_sent(client, CommandName.XREVRANGE, events, "+", "-", "COUNT", 1)
        except BaseException as exc:
            failure = describe(failure_or_raise(exc))
            log.warning("bus publisher: the events stream's last id not read (%s)", failure)
            return None
        if not isinstance(raw, list) or not raw:
            return 0
        try:
            return event_id_of(entry_id_of(raw[0]))
        except WireError as exc:
            log.warning("bus publisher: the events stream's last entry is no event's (%s)", exc)
            return None

    def statistics(self) -> PublisherStatistics:
        return PublisherStatistics(
            self._outbox.statistics(), self._batches, self._reconnects, self._events_without_id
        )

    async def wait_connected(self, connected: bool = True) -> None:
        """Wait until the publisher is connected to Redis (or, with False, is not)."""
        while self._connected is not connected:
            await self._health_changed.wait()
        await trio.lowlevel.checkpoint()

    def _set_connected(self, connected: bool) -> None:
        self._connected = connected
        self._health_changed.set()
        self._health_changed = trio.Event()

    async def wait_drained(self) -> None:
        """Wait until every entry queued so far is answered by Redis (tests, shutdown)."""
        while self._outbox.backlog:
            await self._settled.wait()
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        """No more publishes: :meth:`run` returns once the outbox is empty."""
        self._closing = True
        self._work.set()

    # --- the task ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send the outbox to Redis until closed and drained. Started at once: the ingest
        never waits for Redis (``health().connected`` says whether it is there)."""
        task_status.started()
        await reconnecting(
            self.url,
            self._send_until_closed,
            command_timeout_s=self.settings.command_timeout_s,
            backoff=self.settings.backoff,
            on_connected=self._on_connected,
            on_failure=self._on_failure,
        )

    def _on_connected(self, reconnect: bool) -> None:
        if reconnect:
            self._reconnects += 1
            log.info(
                "bus publisher: reconnected to Redis at %s%s",
                url_without_password(self.url),
                self._outage.recovered(trio.current_time()),
            )
        self._set_connected(True)

    def _on_failure(self, failure: BaseException) -> None:
        self._last_error = describe(failure)
        self._set_connected(False)
        line = (
            f"bus publisher: Redis failed ({self._last_error});"
            f" {self._outbox.backlog} entries wait, retrying"
        )
        self._outage.failed(trio.current_time(), line)

    async def _send_until_closed(self, client: coredis.Redis[bytes]) -> None:
        while True:
            if not self._outbox.has_work():
                if self._closing:
                    return
                self._work = trio.Event()
                await self._work.wait()
                continue
            batch = self._outbox.take(self.settings.batch_max)
            with trio.fail_after(self.settings.command_timeout_s):
                answers = await self._send(client, batch)
            self._outbox.settle(batch, answers)
            self._batches += 1
            self._settled.set()
            self._settled = trio.Event()

    async def _send(self, client: coredis.Redis[bytes], batch: Batch) -> list[Answer]:
        settings = self.settings
        keys = [entry.stream for entry in batch.entries]
        # the entries as the script reads them (its comment): one argument
        blob = b"".join(
            b"%s\n%s\n%d\n%s"
            % (
                str(entry.entry_id).encode(),
                EVENT_FIELD if entry.events else CANDLE_FIELD,
                len(entry.payload),
                entry.payload,
            )
            for entry in batch.entries
        )
        # every XADD of the batch in one EVAL (module docstring), with its notice; made
        # directly: coredis's eval() validates its arguments per call
        xadds: tuple[str | bytes | int, ...] = (
            XADD_ALL,
            len(keys) + 2,
            *keys,
            settings.keys.batches,
            settings.keys.batches_count,
            settings.maxlen,
            settings.events_maxlen,
            settings.batches_maxlen,
            blob,
        )
        answer: object
        if not batch.forming:
            if not keys:
                return []
            try:
                answer = await client.create_request(CommandName.EVAL, *xadds, callback=_AS_IS)
            except ResponseError as exc:
                answer = exc  # the script refused as a whole, as in the pipeline below
        else:
            async with client.pipeline(transaction=False, raise_on_error=False) as pipe:
                if keys:
                    pipe.create_request(CommandName.EVAL, *xadds, callback=_AS_IS)
                for payload in batch.forming:
                    pipe.publish(settings.keys.forming, payload)
            if not keys:
                return []
            results = pipe.results or ()
            answer = results[0] if results else TimeoutError("no answer to the batch's XADDs")
        if isinstance(answer, TimeoutError):
            raise answer  # the connection's state is unknown: reconnect, send again
        if isinstance(answer, BaseException):
            # the script as a whole was refused (out of memory, a busy server): as if each
            # XADD had been
            self._last_error = describe(answer)
            log.warning("bus publisher: %d XADDs failed: %s", len(keys), self._last_error)
            return [Answer.FAILED] * len(keys)
        per_entry, tops = answer if isinstance(answer, list) and len(answer) == 2 else (None, None)
        if not isinstance(per_entry, list) or len(per_entry) != len(keys):
            raise TimeoutError("the batch's XADDs were answered for fewer entries than sent")
        answers: list[Answer] = []
        # per stream, why its top is foreign (None: ours), judged once a batch
        foreign: dict[str, str | None] = {}
        for entry, one in zip(batch.entries, per_entry, strict=True):
            if one == 1:
                self._blocked.appended(entry.stream)
                answers.append(Answer.OK)
            elif one == 0:  # (a refusal without the top: nothing sends that now)
                answers.append(Answer.REFUSED)
            elif isinstance(one, list):
                answers.append(self._refused(entry, _top_named(one, tops), foreign))
            else:
                text = one.decode("utf-8", "replace") if isinstance(one, bytes) else str(one)
                self._last_error = f"XADD refused: {text}"
                log.warning(
                    "bus publisher: XADD %s %s failed: %s", entry.stream, entry.entry_id, text
                )
                answers.append(Answer.FAILED)
        return answers

    def _refused(self, entry: Entry, raw: list[object], foreign: dict[str, str | None]) -> Answer:
        """An entry refused at or below the stream's top (``raw``: as the script says it,
        :func:`_top_named`): already published, or blocked by a top no writer of ours made
        (``bus/refusals.py``)."""
        try:
            top = StreamTop.parse(raw)
        except WireError as exc:  # not what the script sends: as another error for it
            self._last_error = f"XADD refused: {exc}"
            log.warning("bus publisher: XADD %s %s: %s", entry.stream, entry.entry_id, exc)
            return Answer.FAILED
        if top.last_id == entry.entry_id:
            return Answer.REFUSED
        stream = entry.stream
        if stream not in foreign:
            foreign[stream] = foreign_top(self.settings.keys, stream, top, time.time())
        why = foreign[stream]
        if why is None:
            return Answer.REFUSED
        self._blocked.blocked(stream, top.last_id, why)
        return Answer.BLOCKED


def _top_named(one: list[object], tops: object) -> list[object]:
    """The top a refusal's answer ``{k}`` names: ``tops[k]`` (1-based, as in Lua); what is
    not one goes to :meth:`StreamTop.parse` as it is, which refuses it."""
    at = one[0] if len(one) == 1 else None
    if isinstance(at, int) and isinstance(tops, list) and 1 <= at <= len(tops):
        top = tops[at - 1]
        if isinstance(top, list):
            return top
    return one
