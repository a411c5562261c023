"""What the replayed exchange does, as plain functions: no sockets, no trio, no clock.

:func:`timeline_frames` turns :class:`~tradecanvas.tools.replay.data.ReplayData` into every
frame the exchange would send, in event-time order; :class:`FaultPlan` decides, frame by
frame, what the configured faults do with it; :func:`closed_bars` is the REST view of the
bars at a given exchange time, :func:`interval_bars` the same summed into a longer interval
(on the symbol's 3d grid: :func:`phase_3d`); :func:`answer_request` answers a WebSocket
client's ``SUBSCRIBE`` / ``UNSUBSCRIBE`` / ``LIST_SUBSCRIPTIONS`` as Binance does.
:mod:`~tradecanvas.tools.replay.server` runs them on real sockets.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Iterator, Sequence
from decimal import ROUND_DOWN, Decimal
from typing import Final, final

import attrs
import orjson

from tradecanvas.model import DAY, MINUTE, MINUTE_MS, MS, Candle, Market, SeriesId, Timeframe
from tradecanvas.pipeline.derive import derive_series
from tradecanvas.tools.replay.data import FrameKind, ReplayConfig, ReplayData, hole_times
from tradecanvas.upstream.phases import KNOWN_PHASES
from tradecanvas.wire.binance import kline_frame

CLOSE_DELAY_MS: Final = 201  # a closed frame's E after the bar's close time T


@attrs.frozen
class ReplayFrame:
    """One frame of the timeline, as the exchange sends it on a combined stream."""

    event_ms: int
    order: int  # file index: ties between files break the same way every run
    minute: int  # bar index of the kline's open time
    kind: FrameKind
    stream: str
    text: str  # the combined-stream frame

    def raw_text(self) -> str:
        """The frame as a raw stream (``/ws/<stream>``) sends it: the payload alone."""
        doc = orjson.loads(self.text)
        data = doc.get("data", doc) if isinstance(doc, dict) else doc
        return orjson.dumps(data).decode()


def _scaled(value: Decimal, fraction: Decimal) -> Decimal:
    exponent = value.as_tuple().exponent
    quantum = Decimal(1).scaleb(exponent if isinstance(exponent, int) else 0)
    return (value * fraction).quantize(quantum, rounding=ROUND_DOWN)


def forming_steps(candle: Candle, count: int) -> list[Candle]:
    """``count`` forming states of a bar: open at first, the final close last, the volume
    growing; each a valid candle (low <= open, close <= high)."""
    steps: list[Candle] = []
    for k in range(count):
        fraction = Decimal(k + 1) / Decimal(count + 1)
        close = candle.close if k == count - 1 else candle.open
        steps.append(
            Candle(
                candle_time=candle.candle_time,
                open=candle.open,
                high=max(candle.open, close),
                low=min(candle.open, close),
                close=close,
                volume=_scaled(candle.volume, fraction),
                quote_volume=None
                if candle.quote_volume is None
                else _scaled(candle.quote_volume, fraction),
                trades=None if candle.trades is None else int(candle.trades * fraction),
            )
        )
    return steps


def _csv_frames(
    order: int,
    series: SeriesId,
    candles: Sequence[Candle],
    *,
    forming_per_bar: int,
    index_of: dict[int, int],
    holes: set[int],
) -> Iterator[ReplayFrame]:
    """A CSV bar's forming frames at ``E = open + k·60/(n+1) s`` and its closed frame at
    ``E = close time + CLOSE_DELAY_MS`` (``order`` ms later per file, so files interleave)."""
    n = forming_per_bar
    stream = series.stream_name
    for candle in candles:
        if candle.candle_time in holes:
            continue
        minute = index_of[candle.candle_time]
        open_ms = candle.candle_time * MS
        for k, step in enumerate(forming_steps(candle, n)):
            e = open_ms + (k + 1) * MINUTE_MS // (n + 1) + order
            frame = kline_frame(series, step, closed=False, event_time_ms=e)
            yield ReplayFrame(e, order, minute, "forming", stream, orjson.dumps(frame).decode())
        e = open_ms + MINUTE_MS - 1 + CLOSE_DELAY_MS + order
        frame = kline_frame(series, candle, closed=True, event_time_ms=e)
        yield ReplayFrame(e, order, minute, "closed", stream, orjson.dumps(frame).decode())


def timeline_frames(config: ReplayConfig, data: ReplayData) -> Iterator[ReplayFrame]:
    """Every streamed file's frames merged in exchange time (E, then file order), lazily."""
    index_of = {t: i for i, t in enumerate(data.minutes)}
    holes = hole_times(config, data.minutes)
    streams: list[Iterator[ReplayFrame]] = [
        _csv_frames(
            order,
            series,
            candles,
            forming_per_bar=config.forming_per_bar,
            index_of=index_of,
            holes=holes,
        )
        for order, series, candles in data.csv_series
    ]
    for order, frames in enumerate(data.jsonl_items, start=len(config.files)):
        streams.append(
            ReplayFrame(f.event_ms, order, index_of.get(f.open_time, -1), f.kind, f.stream, f.text)
            for f in frames
        )
    return heapq.merge(*streams, key=lambda f: (f.event_ms, f.order))


@final
@attrs.define
class Schedule:
    """When each frame goes out at a ``speed``: at its exchange-time distance from the
    schedule's first frame ÷ ``speed``, whatever the sending of the frames before it took
    (a frame whose time has passed goes at once, and the ones after it are on time again).

    :meth:`pause` moves the schedule on (the replay waited for a client, or stalled);
    after :meth:`restart` the next frame starts a new one."""

    speed: float
    _anchor: tuple[float, int] | None = None  # (clock s, exchange ms) it counts from

    def send_at(self, event_ms: int, now: float) -> float:
        """The clock time to send a frame of exchange time ``event_ms`` at (``now``
        starts the schedule if nothing did)."""
        if self._anchor is None:
            self._anchor = (now, event_ms)
        start, start_ms = self._anchor
        return start + (event_ms - start_ms) / MS / self.speed

    def pause(self, seconds: float) -> None:
        if self._anchor is not None:
            self._anchor = (self._anchor[0] + seconds, self._anchor[1])

    def restart(self) -> None:
        self._anchor = None


def chosen(bar: int, listed: frozenset[int], every: int | None) -> bool:
    """Is ``bar`` listed, or every ``every``-th bar (bars every-1, 2·every-1, …)?"""
    return bar in listed or (every is not None and bar % every == every - 1)


@attrs.frozen
class Step:
    """What the timeline does with one frame."""

    sends: int  # 0: not sent (before --start-at, skipped or an omitted close); 2: duplicated
    drop: bool = False  # close every connection first
    clock_ms: int | None = None  # after the drop the exchange clock is at least this
    omitted: bool = False  # an ``--omit-close`` close


# the steps without a drop, shared (Step is frozen): the timeline asks for one per frame
_SKIP: Final = Step(sends=0)
_SEND: Final = Step(sends=1)
_SEND_TWICE: Final = Step(sends=2)


@final
@attrs.define
class FaultPlan:
    """Decides, frame by frame in timeline order, what the faults of a ReplayConfig do:
    ``--start-at``, ``--drop-at``/``--skip``, ``--omit-close`` and ``--duplicate-close``.

    A drop comes just before the first closed frame at or after its bar; the bars it skips
    stay in REST, so the clock moves on to the first bar after them. The last bar's close is
    never omitted (a client must learn where the exchange stands)."""

    config: ReplayConfig
    minutes: Sequence[int]
    _drops: list[int]
    _skip_below: int = -1  # bars below this index are skipped (after a drop)

    @classmethod
    def of(cls, config: ReplayConfig, minutes: Sequence[int]) -> FaultPlan:
        last = len(minutes) - 1
        return cls(config, minutes, sorted(i for i in config.drop_at if i < last))

    def step(self, frame: ReplayFrame) -> Step:
        config = self.config
        last = len(self.minutes) - 1
        if frame.minute < config.start_at or frame.minute < self._skip_below:
            return _SKIP
        drop = False
        clock_ms: int | None = None
        closed = frame.kind == "closed"
        if closed and self._drops and frame.minute >= self._drops[0]:
            resume = self._drops.pop(0) + config.skip + 1
            drop, self._skip_below = True, resume
            if resume <= last:
                clock_ms = self.minutes[resume] * MS
            if frame.minute < self._skip_below:
                return Step(sends=0, drop=drop, clock_ms=clock_ms)
        if (
            closed
            and frame.minute != last
            and chosen(frame.minute, config.omit_closes, config.omit_close_every)
        ):
            return Step(sends=0, drop=drop, clock_ms=clock_ms, omitted=True)
        duplicated = closed and chosen(
            frame.minute, config.duplicate_closes, config.duplicate_close_every
        )
        if drop:
            return Step(sends=2 if duplicated else 1, drop=drop, clock_ms=clock_ms)
        return _SEND_TWICE if duplicated else _SEND


def closed_bars(
    bars: Sequence[Candle], now_ms: int, start_ms: int | None, end_ms: int | None, limit: int
) -> list[Candle]:
    """REST klines at exchange time ``now_ms``: only bars closed by then, within
    ``[start_ms, end_ms]`` by open time; the first ``limit`` from ``start_ms``, else the
    last ``limit`` (Binance's paging)."""
    available = [
        c
        for c in bars
        if (c.candle_time + MINUTE) * MS <= now_ms
        and (start_ms is None or c.candle_time * MS >= start_ms)
        and (end_ms is None or c.candle_time * MS <= end_ms)
    ]
    return available[:limit] if start_ms is not None else available[-limit:]


def phase_3d(config: ReplayConfig, market: Market, rest_symbol: str) -> int:
    """The phase (seconds) of a symbol's 3d grid: ``--phase-3d``, else the documented one
    of a known symbol, else 0."""
    if config.phase_3d_days is not None:
        return config.phase_3d_days * DAY
    for (known_market, symbol), phase in KNOWN_PHASES.items():
        if known_market == market and symbol.split(":")[0].replace("/", "") == rest_symbol:
            return phase
    return 0


def interval_bars(
    bars: Sequence[Candle],
    timeframe: Timeframe,
    phase: int,
    now_ms: int,
    start_ms: int | None,
    end_ms: int | None,
    limit: int,
) -> list[Candle]:
    """REST klines of a longer ``timeframe`` at exchange time ``now_ms``: the 1m ``bars``
    (ascending) closed by then, summed by Binance's rule (``pipeline.derive``) on its grid
    (``phase``: of a phased one, seconds). The newest may still be forming, as Binance's
    is. Paged as :func:`closed_bars`, by open time."""
    times = [c.candle_time for c in bars]
    hi = bisect.bisect_right(times, now_ms // MS - MINUTE)  # closed by now
    if end_ms is not None:
        end = timeframe.next_open(timeframe.floor(end_ms // MS, phase))
        hi = min(hi, bisect.bisect_left(times, end))
    lo = 0
    if start_ms is not None:
        lo = bisect.bisect_left(times, timeframe.floor(start_ms // MS, phase))
    elif timeframe.fixed and hi:  # only the newest ``limit`` buckets are asked for
        newest = timeframe.floor(times[hi - 1], phase)
        lo = bisect.bisect_left(times, newest - (limit - 1) * timeframe.seconds)
    if lo >= hi:
        return []
    first = timeframe.floor(times[lo], phase)
    # from one minute before: the close an all-empty first bucket is flat at
    derived = derive_series(timeframe, bars[max(lo - 1, 0) : hi], complete_only=False, phase=phase)
    rows = [
        d.candle
        for d in derived
        if d.candle.candle_time >= first
        and (start_ms is None or d.candle.candle_time * MS >= start_ms)
        and (end_ms is None or d.candle.candle_time * MS <= end_ms)
    ]
    return rows[:limit] if start_ms is not None else rows[-limit:]


def answer_request(text: str, streams: set[str]) -> str:
    """The answer to one client message: ``SUBSCRIBE`` and ``UNSUBSCRIBE`` change
    ``streams`` (the client's own set) and are acked with ``result: null``,
    ``LIST_SUBSCRIPTIONS`` lists them; anything else is Binance's error object."""
    try:
        doc = orjson.loads(text)
        method, ident = doc["method"], doc.get("id")
        params = [str(p) for p in doc.get("params", [])]
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return orjson.dumps({"error": {"code": 2, "msg": "Invalid request"}}).decode()
    result: object = None
    if method == "SUBSCRIBE":
        streams.update(params)
    elif method == "UNSUBSCRIBE":
        streams.difference_update(params)
    elif method == "LIST_SUBSCRIPTIONS":
        result = sorted(streams)
    else:
        return orjson.dumps({"error": {"code": 1, "msg": "Invalid method"}, "id": ident}).decode()
    return orjson.dumps({"result": result, "id": ident}).decode()
