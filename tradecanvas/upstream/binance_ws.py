"""One Binance combined-stream connection slot, kept open (the trio shell of upstream.plan).

Task tree of :func:`run_binance_ws_connections`::

    run_binance_ws_connections       connect (paced) / reconnect with backoff / rotate
                                     make-before-break
    └─ reader (one per open socket)  get_message → frames channel; stale → replace

Channel contract: every reader puts :class:`FrameBurst` on ``frames`` (bounded; the caller owns
both ends and the capacity) and never awaits anything else — the store, REST and
subscribers are never reached from here — so a reader waits only while the consumer is busy,
and trio-websocket keeps answering Binance's pings. ``frames`` is never closed here.

A connection ends when Binance closes it, when it is silent for ``stale_timeout_s`` (the
reader replaces it), or when it is rotated: before Binance's 24 h cut, or once Binance
announced ``serverShutdown`` — noticed by the reader itself, since Binance may close right
after it, before the consumer reaches the frame. A rotation opens the new connection first
and closes the old one once the new one delivered a frame (or ``overlap_max_s`` passed).

Reconnects back off (:func:`~tradecanvas.upstream.plan.failures_after_end`): only a
connection that lived ``healthy_after_s`` is replaced at once, so an endpoint announcing
``serverShutdown`` right after every connect is backed off like one that drops it (the old
connection, still open, keeps delivering meanwhile). Every connection attempt also waits
for its turn at the host's :class:`~tradecanvas.upstream.plan.ConnectPacer`, shared by all
the slots of the process (:func:`connect_pacer`): Binance limits attempts per IP. A slot
whose connections keep going stale without ever delivering a frame says what is likely
wrong (:func:`~tradecanvas.upstream.plan.silent_slot_warning`).

Every replacement, and every connect that failed, is counted by reason
(``tradecanvas_upstream_reconnects_total``, :data:`~tradecanvas.upstream.plan.RECONNECT_REASONS`).
Each failed connect is logged; after :data:`UNREACHABLE_AFTER` in a row, one line more
(once per outage) says what it means — no data until the exchange answers, and that the
README's tour runs offline with ``tradecanvas replay`` — and the next connection that
opens says the outage is over.

Every socket is closed when the function is cancelled; it never returns otherwise and
raises nothing but what trio raises for bugs.
"""

from __future__ import annotations

import itertools
import logging
from datetime import UTC, datetime
from typing import Final, final

import attrs
import trio
import trio_websocket

from tradecanvas.ops.metrics import Metrics
from tradecanvas.upstream.plan import (
    ConnectionEnd,
    ConnectionPolicy,
    ConnectPacer,
    announces_server_shutdown,
    failures_after_end,
    reconnect_reason,
    silent_slot_warning,
)
from tradecanvas.upstream.ws_client import (
    get_message_nowait,
    open_websocket_client,
    parse_ws_url,
)

log = logging.getLogger(__name__)

_CONNECT_ERRORS: Final = (trio_websocket.HandshakeError, OSError)
# Messages trio-websocket's reader task may queue for ours, and bytes per socket read: a
# whole read of a burst is parsed and queued at once (``queue_at_once``: one wake-up of our
# reader for many frames, not a hand-over per frame), and trio-websocket keeps reading —
# and answering Binance's pings — while our reader waits for the processor. 200 streams
# push 800 frames/s; a minute boundary's burst of 200 closes is about 80 KiB.
READER_QUEUE: Final = 1024
READ_BYTES: Final = 64 << 10
# Frames one FrameBurst carries at most: what the reader found queued at one wake-up goes to
# the processor as one item (one hand-over, not one per frame), up to this many; so a
# frames channel of N items holds at most N × BURST_MAX frames.
BURST_MAX: Final = 64
# failed connects in a row before the log says, once, that the exchange is unreachable (the
# first ones may be a blip; each is logged on its own line anyway)
UNREACHABLE_AFTER: Final = 3


_PACERS: trio.lowlevel.RunVar[dict[str, ConnectPacer]] = trio.lowlevel.RunVar(
    "tradecanvas_connect_pacers"
)


def connect_pacer(url: str) -> ConnectPacer:
    """The pacer this ``trio.run`` (the daemon's process) shares for ``url``'s host, whatever
    the port or path: every connection slot to a host takes its turns from it without the
    slots being wired together."""
    try:
        pacers = _PACERS.get()
    except LookupError:
        pacers = {}
        _PACERS.set(pacers)
    return pacers.setdefault(parse_ws_url(url).host.lower(), ConnectPacer())


@final
@attrs.define
class FrameBurst:
    """Raw frames as received, oldest first (1 to BURST_MAX): from which connection
    (``generation``, counting up from 1 per call) and when (``received_at``, monotonic; the
    reader's wake-up that found them queued). Never changed once built.

    Not frozen, unlike the other attrs classes: a frozen one builds in about three times
    the time (0.8 against 0.25 µs), and at ``replay --speed max`` one per frame was 5 % of
    the daemon's CPU before frames went in bursts."""

    generation: int
    raws: list[str | bytes]
    received_at: float


@attrs.define
class ConnectionCounters:
    """Live state of one connection slot, read by IngestSupervisor."""

    connected: int = 0  # sockets open now (two for a moment during a rotation)
    reconnects: int = 0


async def run_binance_ws_connections(
    url: str,
    frames: trio.MemorySendChannel[FrameBurst],
    *,
    policy: ConnectionPolicy,
    stale_timeout_s: float,
    metrics: Metrics,
    counters: ConnectionCounters,
    name: str,
    pacer: ConnectPacer | None = None,
) -> None:
    """Keep one connection to ``url`` open until cancelled, its frames going to ``frames``
    (see the module docstring). ``name`` prefixes the log lines. Every connection attempt
    waits for its turn at ``pacer`` (default: the one this ``trio.run`` shares for the
    host, :func:`~tradecanvas.upstream.pacing.connect_pacer`)."""
    pacer = connect_pacer(url) if pacer is None else pacer
    slot = _ConnectionSlot(url, frames, policy, stale_timeout_s, metrics, counters, name, pacer)
    await slot.maintain()


@attrs.define(eq=False)
class _Connection:
    generation: int
    cancel_scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    first_frame: trio.Event = attrs.Factory(trio.Event)
    replace_wanted: trio.Event = attrs.Factory(trio.Event)
    ended: trio.Event = attrs.Factory(trio.Event)
    connected_at: float = 0.0
    end_reason: str = ""  # for the log
    end: ConnectionEnd | None = None  # how it ended on its own (None: open, or rotated)
    shutdown_announced: bool = False  # Binance sent serverShutdown on this connection


@final
class _ConnectionSlot:
    def __init__(
        self,
        url: str,
        frames: trio.MemorySendChannel[FrameBurst],
        policy: ConnectionPolicy,
        stale_timeout_s: float,
        metrics: Metrics,
        counters: ConnectionCounters,
        name: str,
        pacer: ConnectPacer,
    ) -> None:
        self.url = url
        self.frames = frames
        self.policy = policy
        self.stale_timeout_s = stale_timeout_s
        self.metrics = metrics
        self.counters = counters
        self.name = name
        self._generations = itertools.count(1)
        self._open: set[int] = set()  # generations with an open socket
        self.pacer = pacer
        self._framed = False  # some connection of this slot delivered a frame
        self._silent_stale_ends = 0  # stale ends while none ever did
        self._connect_failures = 0  # failed connects since the last one that opened
        self._unreachable_since = ""  # the wall clock (HH:MMZ) of the first of them

    async def maintain(self) -> None:
        policy = self.policy
        async with trio.open_nursery() as nursery:
            failures = 0
            previous: _Connection | None = None
            while True:
                if failures:
                    await trio.sleep(policy.reconnect_backoff.delay(failures))
                # every slot to the host waits for its turn (a checkpoint even when it is now)
                now = trio.current_time()
                await trio.sleep_until(self.pacer.reserve(now, policy.min_connect_interval_s))
                if previous is not None and previous.ended.is_set():
                    previous = None
                conn = _Connection(next(self._generations))
                try:
                    await nursery.start(self._run_connection, conn)
                except _CONNECT_ERRORS as exc:
                    failures += 1
                    self._count_reconnect("error")
                    log.warning("%s: connect failed (%s): %s", self.name, failures, exc)
                    self._note_connect_failed()
                    continue
                self._note_connected()
                if previous is not None:
                    with trio.move_on_after(policy.overlap_max_s):
                        await conn.first_frame.wait()
                    previous.cancel_scope.cancel()
                    previous = None
                with trio.move_on_after(policy.rotate_after_s):
                    await conn.replace_wanted.wait()
                ended = conn.ended.is_set()
                end = conn.end if ended else None
                self._count_reconnect(
                    reconnect_reason(end, shutdown_announced=conn.shutdown_announced)
                )
                lived_s = trio.current_time() - conn.connected_at
                failures = failures_after_end(
                    failures,
                    lived_s=lived_s,
                    healthy_after_s=policy.healthy_after_s,
                    shutdown_announced=conn.shutdown_announced,
                    still_open=not ended,
                )
                if end == "stale":
                    self._note_stale_end()
                if ended and conn.shutdown_announced:
                    log.info("%s: closed after serverShutdown; reconnecting", self.name)
                elif ended:
                    log.warning(
                        "%s: connection ended (%s); reconnecting", self.name, conn.end_reason
                    )
                else:
                    # Binance's 24 h cut is near, or it announced serverShutdown: open the
                    # new connection first (at once if this one proved healthy, else after
                    # the backoff; it keeps delivering meanwhile) and close this one once
                    # the new one delivers
                    previous = conn
                    log.info(
                        "%s: rotating the connection (%s)", self.name, conn.end_reason or "age"
                    )
                if failures and lived_s < policy.healthy_after_s:
                    log.info(
                        "%s: the connection lived %.1f s only; backing off (step %d)",
                        self.name,
                        lived_s,
                        failures,
                    )

    def _note_connect_failed(self) -> None:
        """Count a failed connect; at the UNREACHABLE_AFTER-th in a row, say once what it
        means (every failure has its own line already)."""
        self._connect_failures += 1
        if self._connect_failures == 1:
            self._unreachable_since = datetime.now(UTC).strftime("%H:%MZ")
        if self._connect_failures == UNREACHABLE_AFTER:
            target = parse_ws_url(self.url)
            log.warning(
                "%s: Binance unreachable since %s (%s:%d): no data will arrive until it"
                " answers (offline? the README's tour uses `tradecanvas replay`)",
                self.name,
                self._unreachable_since,
                target.host,
                target.port,
            )

    def _note_connected(self) -> None:
        if self._connect_failures >= UNREACHABLE_AFTER:
            log.info(
                "%s: connected again (unreachable since %s, %d failed connects)",
                self.name,
                self._unreachable_since,
                self._connect_failures,
            )
        self._connect_failures = 0

    def _note_stale_end(self) -> None:
        """Count a stale end of a slot that never received a frame, and say, now and then,
        what the likely cause is (:func:`~tradecanvas.upstream.plan.silent_slot_warning`)."""
        if self._framed:
            return
        self._silent_stale_ends += 1
        warning = silent_slot_warning(self.url, self._silent_stale_ends)
        if warning is not None:
            log.warning("%s: %s", self.name, warning)

    def _count_reconnect(self, reason: str) -> None:
        self.counters.reconnects += 1
        self.metrics.upstream_reconnects_total.labels(reason=reason).inc()

    async def _run_connection(
        self, conn: _Connection, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        started = False
        try:
            async with open_websocket_client(
                self.url,
                connect_timeout=self.policy.connect_timeout_s,
                disconnect_timeout=self.policy.disconnect_timeout_s,
                message_queue_size=READER_QUEUE,
                receive_buffer_size=READ_BYTES,
                queue_at_once=True,
                fast_frames=True,
            ) as ws:
                started = True
                conn.connected_at = trio.current_time()
                self._open.add(conn.generation)
                self.counters.connected = len(self._open)
                task_status.started()
                with conn.cancel_scope:
                    conn.end, conn.end_reason = await self._read_frames(ws, conn)
        except Exception as exc:
            if not started:
                raise
            conn.end, conn.end_reason = "error", f"{type(exc).__name__}: {exc}"
        finally:
            self._open.discard(conn.generation)
            self.counters.connected = len(self._open)
            conn.ended.set()
            conn.replace_wanted.set()

    async def _read_frames(
        self, ws: trio_websocket.WebSocketConnection, conn: _Connection
    ) -> tuple[ConnectionEnd, str]:
        """Read until the connection closes or goes stale (how it ended, and why in words).
        Never waits on anything but the frames channel (see the module docstring).

        Only the wait for Binance counts towards staleness, never the wait for the
        consumer. One cancel scope per quiet period, not one deadline move per frame: when
        it expires, the connection is stale only if nothing came since ``listening_since``
        (the last frame, or the end of a wait for the consumer)."""
        stale_s = self.stale_timeout_s
        frames = self.frames
        generation = conn.generation
        listening_since = trio.current_time()
        blocked: FrameBurst | None = None  # a burst the full channel did not take yet
        while True:
            if blocked is not None:
                await frames.send(blocked)
                blocked = None
                listening_since = trio.current_time()
            with trio.move_on_at(listening_since + stale_s):
                while True:
                    try:
                        message = await ws.get_message()
                    except trio_websocket.ConnectionClosed as exc:
                        return "drop", _closed_by(exc.reason)
                    listening_since = now = trio.current_time()
                    if not conn.first_frame.is_set():
                        conn.first_frame.set()
                        self._framed = True
                    # this message and every one already queued, without a checkpoint in
                    # between, in bursts: the processor wakes once for them all
                    raws = [message]
                    while True:
                        full = _take_queued(ws, raws)
                        if not raws:
                            break
                        for raw in raws:
                            if announces_server_shutdown(raw):
                                self._note_server_shutdown(conn)
                        burst = FrameBurst(generation, raws, now)
                        try:
                            frames.send_nowait(burst)
                        except trio.WouldBlock:
                            blocked = burst
                            break
                        if not full:
                            break
                        raws = []
                    if blocked is not None:
                        break
            if blocked is None and trio.current_time() >= listening_since + stale_s:
                return "stale", f"stale: no frame for {stale_s:g} s"

    def _note_server_shutdown(self, conn: _Connection) -> None:
        if not conn.shutdown_announced:
            log.info("%s: Binance announced serverShutdown", self.name)
        conn.shutdown_announced = True
        conn.end_reason = "serverShutdown"
        conn.replace_wanted.set()


def _take_queued(ws: trio_websocket.WebSocketConnection, raws: list[str | bytes]) -> bool:
    """Append the messages already queued to ``raws`` until it holds BURST_MAX; True when
    it does (more may be queued), False when none is left (a close is seen by the next
    ``get_message``)."""
    while len(raws) < BURST_MAX:
        try:
            raws.append(get_message_nowait(ws))
        except (trio.WouldBlock, trio_websocket.ConnectionClosed):
            return False
    return True


def _closed_by(reason: trio_websocket.CloseReason | None) -> str:
    """Who ended the connection, for its log line: 1009 is trio-websocket's own close of a
    frame over the size limit (Binance sends none), anything else Binance's."""
    if reason is not None and reason.code == 1009:
        return f"closed by this daemon: a frame over the size limit ({reason.reason})"
    return f"closed by Binance: {reason}"
