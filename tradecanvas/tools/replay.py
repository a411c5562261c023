"""``tradecanvas replay FILE…``: a loopback stand-in for Binance (DESIGN §8).

Serves, from recorded combined-stream JSONL frames or kline CSVs (either layout
:func:`~tradecanvas.codec.read_kline_csv` reads):

- WebSocket combined streams ``/stream?streams=a/b`` and ``/market/stream?…`` (the routed
  futures path), raw ``/ws/<stream>`` and ``/market/ws/<stream>``, and ``SUBSCRIBE`` /
  ``UNSUBSCRIBE`` / ``LIST_SUBSCRIPTIONS`` messages with Binance's acks;
- REST ``/fapi/v1/klines`` and ``/api/v3/klines`` (Binance's paging rules and limits 1500 and
  1000), ``…/time`` and ``…/exchangeInfo``, with ``X-MBX-USED-WEIGHT-1M``.

One Starlette app on Hypercorn's trio worker serves both; ``--ws-port`` and ``--rest-port``
bind it twice when they differ.

Time: the replay has one exchange clock, the event time ``E`` of the last frame sent. CSV
bars become ``forming_per_bar`` forming frames at ``E = open + k·60/(n+1) s`` and a closed
frame at ``E = close time + 201 ms`` (real closes arrive 0.2–2 s late). REST serves only bars
that have closed by that clock, so a daemon sees exactly what it would have seen live, at any
``--speed``. ``--speed max`` sends as fast as the slowest client reads; the timeline waits
while no client is connected, so runs are deterministic.

Faults (bar indices count the data's distinct open times from 0):
``--drop-at I --skip N`` closes every connection just before bar I's close and skips bars
I..I+N on the WebSocket (they stay in REST, as at Binance); ``--omit-close I`` and
``--duplicate-close I`` drop or double bar I's closed frame; ``--exchange-hole I:N`` removes
bars I..I+N-1 from WebSocket and REST (a hole at the exchange); ``--rest-429-first`` answers
the first klines call with 429 and ``Retry-After``. The last bar's close is always sent, and a
client that connects after the data is over gets each stream's last closed frame, so it
learns where the exchange stands and can backfill what it missed.

``--paused`` holds the timeline (no frame, the clock stands at ``--start-at``; REST answers
from there) until SIGUSR1 or :meth:`ReplayHandle.resume`: a daemon can be started and its
subscribers attached before the first candle exists, so they see everything it publishes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import heapq
import logging
import math
import signal
import sys
from collections.abc import Iterator, Sequence
from decimal import ROUND_DOWN, Decimal
from pathlib import Path
from typing import Any, Final, Literal, final

import attrs
import orjson
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from tradecanvas.errors import ExitCode, TradeCanvasError, WireError
from tradecanvas.model import MARKETS, MINUTE, MINUTE_MS, MS, Candle, Market, SeriesId, Timeframe
from tradecanvas.runtime_flags import DATA_DIR_VARIABLE, data_dir_candidates
from tradecanvas.serve.http_server import hypercorn_config, serve_asgi
from tradecanvas.upstream.rest import DEFAULT_WEIGHT_LIMIT, KLINES_LIMIT, klines_weight
from tradecanvas.wire.binance import KlineEvent, candle_to_rest_row, decode_frame, kline_frame
from tradecanvas.wire.kline_csv import read_kline_csv

log = logging.getLogger(__name__)

ONE_MINUTE: Final = Timeframe.parse("1m")
CLOSE_DELAY_MS: Final = 201  # a closed frame's E after the bar's close time T
REST_DEFAULT_LIMIT: Final = 500
# frames queued per client; at --speed max the timeline waits for the slowest client
CLIENT_BUFFER: Final = 256
KNOWN_QUOTES: Final = ("FDUSD", "USDT", "USDC", "BUSD", "TUSD", "BTC", "ETH", "BNB", "EUR", "TRY")
DROP_CLOSE_CODE: Final = 1001

FrameKind = Literal["forming", "closed", "other"]


class ReplayError(TradeCanvasError):
    """A replay file or option that cannot be used; the message names it."""


@attrs.frozen
class ReplayFile:
    path: Path
    market: Market
    series: SeriesId | None = None  # CSV: the series it holds; JSONL: named by its frames
    stream: bool = True  # False: REST history only (``--history``)


@attrs.frozen
class ReplayConfig:
    files: tuple[ReplayFile, ...]
    host: str = "127.0.0.1"
    port: int = 0
    ws_port: int | None = None  # None: ``port``
    rest_port: int | None = None  # None: ``port``
    speed: float | None = None  # a multiple of real time; None: as fast as clients read
    forming_per_bar: int = 3
    start_at: int = 0
    drop_at: tuple[int, ...] = ()
    skip: int = 0
    omit_closes: frozenset[int] = frozenset()
    omit_close_every: int | None = None
    duplicate_closes: frozenset[int] = frozenset()
    duplicate_close_every: int | None = None
    exchange_holes: tuple[tuple[int, int], ...] = ()
    rest_429_first: bool = False
    retry_after_s: int = 1
    weight_limit: int | None = None  # exchangeInfo's REQUEST_WEIGHT/min; None: Binance's usual
    paused: bool = False  # hold the timeline until resume()


@attrs.frozen
class ReplayStatistics:
    bars: int
    frames_sent: int
    closes_omitted: int
    closes_duplicated: int
    drops: int
    ws_connections: int
    clients: int
    rest_requests: int
    rest_429: int
    now_ms: int
    finished: bool


@attrs.frozen
class _Item:
    event_ms: int
    order: int  # file index: ties between files break the same way every run
    minute: int  # bar index of the kline's open time
    kind: FrameKind
    stream: str
    text: str  # the combined-stream frame

    def raw_text(self) -> str:
        doc = orjson.loads(self.text)
        data = doc.get("data", doc) if isinstance(doc, dict) else doc
        return orjson.dumps(data).decode()


@attrs.define(eq=False)
class _Client:
    streams: set[str]
    raw: bool
    send: trio.MemorySendChannel[str | None]


# --- reading the data ----------------------------------------------------------------


def infer_market(path: Path) -> Market | None:
    for part in reversed(path.parts):
        lowered = part.lower()
        if lowered.startswith("spot"):
            return "spot"
        if lowered.startswith(("futures", "fapi", "um")):
            return "futures"
    return None


def infer_series(path: Path, market: Market) -> SeriesId:
    """``BTCUSDT-1m-….csv`` → ``binance:{market}:BTC/USDT:1m``."""
    parts = path.stem.split("-")
    symbol = parts[0].upper()
    interval = parts[1] if len(parts) > 1 else "1m"
    if interval != "1m":
        raise ReplayError(f"{path}: replay serves 1m klines; this file holds {interval}")
    for quote in KNOWN_QUOTES:
        if symbol.endswith(quote) and len(symbol) > len(quote):
            return SeriesId.parse(f"binance:{market}:{symbol[: -len(quote)]}/{quote}:1m")
    raise ReplayError(
        f"{path}: cannot tell the symbol from the file name; name it: SERIES_ID=FILE,"
        " such as binance:futures:BTC/USDT:1m=data.csv"
    )


def resolve_path(text: str) -> Path:
    """As given, else under ``$TRADE_CANVAS_DATA_DIR``, else ``../shared/data/binance``
    beside the checkout."""
    path = Path(text)
    if path.exists():
        return path
    for root in data_dir_candidates():
        if (root / text).exists():
            return root / text
    raise ReplayError(f"{text}: no such file (also looked under ${DATA_DIR_VARIABLE})")


def parse_file_argument(
    text: str, default_market: Market | None, *, stream: bool = True
) -> ReplayFile:
    series: SeriesId | None = None
    if "=" in text:
        name, _, rest = text.partition("=")
        try:
            series = SeriesId.parse(name)
        except TradeCanvasError as exc:
            raise ReplayError(f"{text}: {exc}") from None
        text = rest
    path = resolve_path(text)
    market = series.market if series else default_market or infer_market(path) or "futures"
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return ReplayFile(path, market, None, stream)
    if series is None:
        series = infer_series(path, market)
    return ReplayFile(path, market, series, stream)


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


@attrs.define
class _Data:
    """Everything the files hold: REST bars per (market, symbol) and the frame timeline."""

    bars: dict[tuple[str, str], list[Candle]] = attrs.Factory(dict)
    minutes: list[int] = attrs.Factory(list)  # distinct open times, ascending
    csv_series: list[tuple[int, SeriesId, list[Candle]]] = attrs.Factory(list)
    jsonl_items: list[list[tuple[int, FrameKind, str, int, str]]] = attrs.Factory(list)


def load_data(config: ReplayConfig) -> _Data:
    data = _Data()
    open_times: set[int] = set()
    for index, item in enumerate(config.files):
        if item.series is not None:
            try:
                candles = read_kline_csv(item.path)
            except (OSError, WireError) as exc:
                raise ReplayError(f"{item.path}: {exc}") from None
            candles.sort(key=lambda c: c.candle_time)
            if item.stream:
                data.csv_series.append((index, item.series, candles))
            data.bars.setdefault((item.market, item.series.rest_symbol), []).extend(candles)
            open_times.update(c.candle_time for c in candles)
        else:
            frames = _read_jsonl(item, data)
            if item.stream:
                data.jsonl_items.append(frames)
            open_times.update(t for _, _, _, t, _ in frames if t >= 0)
    data.minutes = sorted(open_times)
    holes = _hole_times(config, data.minutes)
    for key, candles in data.bars.items():
        unique = {c.candle_time: c for c in candles if c.candle_time not in holes}
        data.bars[key] = [unique[t] for t in sorted(unique)]
    return data


def _read_jsonl(item: ReplayFile, data: _Data) -> list[tuple[int, FrameKind, str, int, str]]:
    """(E, kind, stream, open time s, text) per line; an unparsable line keeps the previous
    times and is sent as it is (recorded garbage stays garbage)."""
    frames: list[tuple[int, FrameKind, str, int, str]] = []
    last_e, last_t = 0, -1
    try:
        lines = item.path.read_text().splitlines()
    except OSError as exc:
        raise ReplayError(f"{item.path}: {exc}") from None
    for line in lines:
        if not line.strip():
            continue
        kind: FrameKind = "other"
        stream = ""
        try:
            doc: Any = orjson.loads(line)
            stream = str(doc["stream"])
            payload = doc["data"]
            last_e = int(payload["E"])
            last_t = int(payload["k"]["t"]) // MS
            kind = "closed" if payload["k"]["x"] is True else "forming"
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            pass
        frames.append((last_e, kind, stream, last_t, line))
        if kind == "closed":
            try:
                event = decode_frame(line)
            except WireError:
                continue
            if isinstance(event, KlineEvent):
                key = (item.market, event.symbol)
                data.bars.setdefault(key, []).append(event.kline.to_candle())
    return frames


def _hole_times(config: ReplayConfig, minutes: Sequence[int]) -> set[int]:
    times: set[int] = set()
    for start, count in config.exchange_holes:
        times.update(minutes[i] for i in range(start, min(start + count, len(minutes))))
    return times


# --- the timeline --------------------------------------------------------------------


def _chosen(bar: int, listed: frozenset[int], every: int | None) -> bool:
    """Is ``bar`` listed, or every ``every``-th bar (bars every-1, 2·every-1, …)?"""
    return bar in listed or (every is not None and bar % every == every - 1)


@final
class ReplayServer:
    """Owns the replay's exchange clock, its WebSocket clients and its REST answers."""

    def __init__(self, config: ReplayConfig, data: _Data) -> None:
        self.config = config
        self.data = data
        self.finished = trio.Event()
        self.resumed = trio.Event()
        if not config.paused:
            self.resumed.set()
        self._index_of = {t: i for i, t in enumerate(data.minutes)}
        self._holes = _hole_times(config, data.minutes)
        self._clients: set[_Client] = set()
        self._client_arrived = trio.Event()
        self._last_closed: dict[str, _Item] = {}
        start = min(config.start_at, len(data.minutes))
        self.now_ms = data.minutes[start] * MS if start < len(data.minutes) else 0
        self._frames_sent = 0
        self._omitted = 0
        self._duplicated = 0
        self._drops = 0
        self._ws_connections = 0
        self._rest_requests = 0
        self._rest_429 = 0
        self._answered_429 = False
        self._weight_window = -1
        self._weight_used = 0

    def statistics(self) -> ReplayStatistics:
        return ReplayStatistics(
            bars=len(self.data.minutes),
            frames_sent=self._frames_sent,
            closes_omitted=self._omitted,
            closes_duplicated=self._duplicated,
            drops=self._drops,
            ws_connections=self._ws_connections,
            clients=len(self._clients),
            rest_requests=self._rest_requests,
            rest_429=self._rest_429,
            now_ms=self.now_ms,
            finished=self.finished.is_set(),
        )

    def _items(self) -> Iterator[_Item]:
        streams: list[Iterator[_Item]] = [
            self._csv_items(order, series, candles)
            for order, series, candles in self.data.csv_series
        ]
        for order, frames in enumerate(self.data.jsonl_items, start=len(self.config.files)):
            streams.append(
                _Item(e, order, self._index_of.get(t, -1), kind, stream, text)
                for e, kind, stream, t, text in frames
            )
        return heapq.merge(*streams, key=lambda i: (i.event_ms, i.order))

    def _csv_items(
        self, order: int, series: SeriesId, candles: Sequence[Candle]
    ) -> Iterator[_Item]:
        n = self.config.forming_per_bar
        stream = series.stream_name
        for candle in candles:
            if candle.candle_time in self._holes:
                continue
            minute = self._index_of[candle.candle_time]
            open_ms = candle.candle_time * MS
            for k, step in enumerate(forming_steps(candle, n)):
                e = open_ms + (k + 1) * MINUTE_MS // (n + 1) + order
                frame = kline_frame(series, step, closed=False, event_time_ms=e)
                yield _Item(e, order, minute, "forming", stream, orjson.dumps(frame).decode())
            e = open_ms + MINUTE_MS - 1 + CLOSE_DELAY_MS + order
            frame = kline_frame(series, candle, closed=True, event_time_ms=e)
            yield _Item(e, order, minute, "closed", stream, orjson.dumps(frame).decode())

    async def run_timeline(self) -> None:
        config = self.config
        last_minute = len(self.data.minutes) - 1
        drops = sorted(i for i in config.drop_at if i < last_minute)
        skip_below = -1  # bars below this index are skipped (after a drop)
        previous_e: int | None = None
        await self.resumed.wait()
        for item in self._items():
            if item.minute < config.start_at or item.minute < skip_below:
                continue
            if item.kind == "closed" and drops and item.minute >= drops[0]:
                drop_at = drops.pop(0)
                resume = drop_at + config.skip + 1
                await self._drop_clients()
                self._drops += 1
                skip_below = resume
                if resume <= last_minute:
                    self.now_ms = max(self.now_ms, self.data.minutes[resume] * MS)
                previous_e = None
                if item.minute < skip_below:
                    continue
            if (
                item.kind == "closed"
                and item.minute != last_minute
                and _chosen(item.minute, config.omit_closes, config.omit_close_every)
            ):
                self._omitted += 1
                continue
            while not self._clients:
                await self._client_arrived.wait()
                self._client_arrived = trio.Event()
            if config.speed is not None and previous_e is not None and item.event_ms > previous_e:
                await trio.sleep((item.event_ms - previous_e) / MS / config.speed)
            previous_e = item.event_ms
            self.now_ms = max(self.now_ms, item.event_ms)
            await self._broadcast(item)
            if item.kind == "closed" and _chosen(
                item.minute, config.duplicate_closes, config.duplicate_close_every
            ):
                self._duplicated += 1
                await self._broadcast(item)
        self.now_ms = max(
            self.now_ms, (self.data.minutes[-1] + MINUTE) * MS if self.data.minutes else 0
        )
        self.finished.set()

    async def _broadcast(self, item: _Item) -> None:
        self._frames_sent += 1
        if item.kind == "closed":
            self._last_closed[item.stream] = item
        for client in list(self._clients):
            if item.stream not in client.streams and (item.stream or item.kind != "other"):
                continue  # a frame without a stream (serverShutdown, …) goes to everyone
            try:
                await client.send.send(item.raw_text() if client.raw else item.text)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._clients.discard(client)

    async def _drop_clients(self) -> None:
        for client in list(self._clients):
            self._clients.discard(client)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await client.send.send(None)  # after the frames already queued
        self._client_arrived = trio.Event()

    # --- WebSocket ---------------------------------------------------------------------

    async def websocket(self, websocket: WebSocket) -> None:
        path = websocket.url.path.removeprefix("/market")
        streams: set[str] = set()
        raw = False
        if path.startswith("/ws/"):
            streams.add(path.removeprefix("/ws/"))
            raw = True
        elif path == "/ws":
            raw = True
        else:
            query = websocket.query_params.get("streams", "")
            streams.update(s for s in query.split("/") if s)
        await websocket.accept()
        send, receive = trio.open_memory_channel[str | None](CLIENT_BUFFER)
        client = _Client(streams, raw, send)
        if self.finished.is_set():
            # the data is over: a late joiner gets each stream's last close, so that it
            # learns where the exchange is (and backfills what it missed from REST)
            for stream in sorted(streams):
                last = self._last_closed.get(stream)
                if last is not None:
                    send.send_nowait(last.raw_text() if raw else last.text)
        self._ws_connections += 1
        self._clients.add(client)
        self._client_arrived.set()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._client_requests, websocket, client, nursery.cancel_scope)
                async with receive:
                    async for text in receive:
                        if text is None:
                            await websocket.close(DROP_CLOSE_CODE, "replay: connection dropped")
                            break
                        await websocket.send_text(text)
                nursery.cancel_scope.cancel()
        except (WebSocketDisconnect, OSError, RuntimeError):
            pass  # the client went away
        finally:
            self._clients.discard(client)
            send.close()

    async def _client_requests(
        self, websocket: WebSocket, client: _Client, scope: trio.CancelScope
    ) -> None:
        """SUBSCRIBE / UNSUBSCRIBE / LIST_SUBSCRIPTIONS, answered as Binance does."""
        try:
            while True:
                text = await websocket.receive_text()
                try:
                    doc = orjson.loads(text)
                    method, ident = doc["method"], doc.get("id")
                    params = [str(p) for p in doc.get("params", [])]
                except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
                    await websocket.send_text(
                        orjson.dumps({"error": {"code": 2, "msg": "Invalid request"}}).decode()
                    )
                    continue
                result: object = None
                if method == "SUBSCRIBE":
                    client.streams.update(params)
                elif method == "UNSUBSCRIBE":
                    client.streams.difference_update(params)
                elif method == "LIST_SUBSCRIPTIONS":
                    result = sorted(client.streams)
                else:
                    await websocket.send_text(
                        orjson.dumps(
                            {"error": {"code": 1, "msg": "Invalid method"}, "id": ident}
                        ).decode()
                    )
                    continue
                await websocket.send_text(orjson.dumps({"result": result, "id": ident}).decode())
        except (WebSocketDisconnect, RuntimeError, OSError):
            scope.cancel()

    # --- REST ----------------------------------------------------------------------------

    def _weigh(self, weight: int) -> int:
        window = int(trio.current_time() // 60)
        if window != self._weight_window:
            self._weight_window, self._weight_used = window, 0
        self._weight_used += weight
        return self._weight_used

    def _json(self, doc: object, status: int = 200, weight: int = 1) -> Response:
        return Response(
            orjson.dumps(doc),
            status_code=status,
            media_type="application/json",
            headers={"X-MBX-USED-WEIGHT-1M": str(self._weigh(weight))},
        )

    def _error(self, code: int, msg: str, status: int = 400) -> Response:
        return self._json({"code": code, "msg": msg}, status)

    async def klines(self, request: Request) -> Response:
        market: Market = "futures" if request.url.path.startswith("/fapi") else "spot"
        self._rest_requests += 1
        if self.config.rest_429_first and not self._answered_429:
            self._answered_429 = True
            self._rest_429 += 1
            response = self._error(-1003, "Too many requests; please use the websocket.", 429)
            response.headers["Retry-After"] = str(self.config.retry_after_s)
            return response
        q = request.query_params
        symbol = q.get("symbol", "")
        if q.get("interval") != "1m":
            return self._error(-1120, "Invalid interval.")
        bars = self.data.bars.get((market, symbol))
        if bars is None:
            return self._error(-1121, "Invalid symbol.")
        try:
            limit = int(q.get("limit", REST_DEFAULT_LIMIT))
            start = int(q["startTime"]) if "startTime" in q else None
            end = int(q["endTime"]) if "endTime" in q else None
        except ValueError:
            return self._error(-1100, "Illegal characters found in a parameter.")
        if not 1 <= limit <= KLINES_LIMIT[market]:
            return self._error(-1130, "Data sent for parameter 'limit' is not valid.")
        available = [
            c
            for c in bars
            if (c.candle_time + MINUTE) * MS <= self.now_ms
            and (start is None or c.candle_time * MS >= start)
            and (end is None or c.candle_time * MS <= end)
        ]
        rows = available[:limit] if start is not None else available[-limit:]
        return self._json(
            [candle_to_rest_row(c, ONE_MINUTE) for c in rows], weight=klines_weight(market, limit)
        )

    async def server_time(self, request: Request) -> Response:
        return self._json({"serverTime": self.now_ms})

    async def exchange_info(self, request: Request) -> Response:
        market: Market = "futures" if request.url.path.startswith("/fapi") else "spot"
        symbols = sorted(s for m, s in self.data.bars if m == market)
        return self._json(
            {
                "timezone": "UTC",
                "serverTime": self.now_ms,
                "rateLimits": [
                    {
                        "rateLimitType": "REQUEST_WEIGHT",
                        "interval": "MINUTE",
                        "intervalNum": 1,
                        "limit": self.config.weight_limit or DEFAULT_WEIGHT_LIMIT[market],
                    }
                ],
                "symbols": [{"symbol": s, "status": "TRADING"} for s in symbols],
            }
        )

    def app(self) -> Starlette:
        ws_paths = (
            "/stream",
            "/market/stream",
            "/ws",
            "/ws/{name}",
            "/market/ws",
            "/market/ws/{name}",
        )
        routes: list[Route | WebSocketRoute] = [WebSocketRoute(p, self.websocket) for p in ws_paths]
        for prefix in ("/fapi/v1", "/api/v3"):
            routes.append(Route(f"{prefix}/klines", self.klines))
            routes.append(Route(f"{prefix}/time", self.server_time))
            routes.append(Route(f"{prefix}/exchangeInfo", self.exchange_info))
        return Starlette(routes=routes)


@attrs.frozen
class ReplayHandle:
    """What :func:`serve_replay` reports once it listens."""

    ws_url: str
    rest_url: str
    server: ReplayServer

    @property
    def finished(self) -> trio.Event:
        return self.server.finished

    def statistics(self) -> ReplayStatistics:
        return self.server.statistics()

    def resume(self) -> bool:
        """Start a ``paused`` timeline; False if it was running already."""
        if self.server.resumed.is_set():
            return False
        self.server.resumed.set()
        return True


def _port_of(bind: str) -> int:
    return int(bind.rsplit(":", 1)[1])


async def serve_replay(
    config: ReplayConfig, *, task_status: trio.TaskStatus[ReplayHandle] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve ``config`` until cancelled; ``started(ReplayHandle)`` once listening.
    Raises ReplayError (before ``started``) for unusable files."""
    data = await trio.to_thread.run_sync(load_data, config)
    await _serve(config, data, task_status)


async def _serve(
    config: ReplayConfig, data: _Data, task_status: trio.TaskStatus[ReplayHandle]
) -> None:
    if not data.minutes:
        raise ReplayError("the replay files hold no klines")
    server = ReplayServer(config, data)
    ws_port = config.ws_port if config.ws_port is not None else config.port
    rest_port = config.rest_port if config.rest_port is not None else config.port
    binds = [f"{config.host}:{ws_port}"]
    if rest_port != ws_port:
        binds.append(f"{config.host}:{rest_port}")
    hconfig = hypercorn_config(binds, drain_s=1.0)
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(functools.partial(serve_asgi, server.app(), hconfig))
        ws = _port_of(binds[0])
        rest = _port_of(binds[1]) if len(binds) > 1 else ws
        host = config.host
        nursery.start_soon(server.run_timeline)
        task_status.started(ReplayHandle(f"ws://{host}:{ws}", f"http://{host}:{rest}", server))


# --- command line --------------------------------------------------------------------


def _indices(values: Sequence[str]) -> frozenset[int]:
    result: set[int] = set()
    for value in values:
        for part in value.split(","):
            if part.strip():
                result.add(int(part))
    return frozenset(result)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """The ``tradecanvas replay`` options."""
    parser.add_argument(
        "files",
        nargs="*",
        metavar="FILE",
        help="kline CSV (data.binance.vision or open_time,open,high,low,close,volume) or"
        " combined-stream JSONL; SERIES_ID=FILE names a CSV's series",
    )
    parser.add_argument(
        "--history",
        action="append",
        default=[],
        metavar="FILE",
        help="like FILE, but served on REST only (history before the stream, or a REST-only"
        " stand-in)",
    )
    parser.add_argument(
        "--market",
        choices=MARKETS,
        help="market of the files (default: from the path, else futures)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address (loopback)")
    parser.add_argument("--port", type=int, default=0, help="port for WS and REST (0 = any free)")
    parser.add_argument("--ws-port", type=int, help="WebSocket port (default: --port)")
    parser.add_argument("--rest-port", type=int, help="REST port (default: --port)")
    parser.add_argument("--speed", default="1", help="a multiple of real time, or max (default 1)")
    parser.add_argument("--forming-per-bar", type=int, default=3, help="forming frames per CSV bar")
    parser.add_argument(
        "--start-at",
        type=int,
        default=0,
        metavar="BAR",
        help="stream from this bar; earlier ones are REST history",
    )
    parser.add_argument(
        "--drop-at",
        type=int,
        action="append",
        default=[],
        metavar="BAR",
        help="drop every connection before this bar's close",
    )
    parser.add_argument(
        "--skip",
        type=int,
        default=0,
        metavar="N",
        help="after a drop, also skip the N following bars on the WS",
    )
    parser.add_argument(
        "--omit-close",
        action="append",
        default=[],
        metavar="BAR[,BAR]",
        help="never send these bars' closed frames",
    )
    parser.add_argument(
        "--omit-close-every", type=int, metavar="N", help="omit the close of every Nth bar"
    )
    parser.add_argument(
        "--duplicate-close",
        action="append",
        default=[],
        metavar="BAR[,BAR]",
        help="send these bars' closed frames twice",
    )
    parser.add_argument(
        "--duplicate-close-every",
        type=int,
        metavar="N",
        help="duplicate the close of every Nth bar",
    )
    parser.add_argument(
        "--exchange-hole",
        action="append",
        default=[],
        metavar="BAR:N",
        help="N bars missing at the exchange (WS and REST)",
    )
    parser.add_argument(
        "--rest-429-first", action="store_true", help="answer the first klines call with 429"
    )
    parser.add_argument(
        "--retry-after", type=int, default=1, metavar="S", help="Retry-After of that 429"
    )
    parser.add_argument(
        "--paused",
        action="store_true",
        help="send nothing until SIGUSR1 (attach consumers first); REST answers meanwhile",
    )
    parser.add_argument(
        "--weight-limit",
        type=int,
        metavar="N",
        help="REQUEST_WEIGHT per minute that exchangeInfo reports (default: Binance's usual)",
    )


def config_from_args(args: argparse.Namespace) -> ReplayConfig:
    """Raises ReplayError naming the bad option."""
    speed: float | None
    if str(args.speed).lower() == "max":
        speed = None
    else:
        try:
            speed = float(args.speed)
        except ValueError:
            raise ReplayError(f"--speed {args.speed!r}: a positive number or max") from None
        if not (speed > 0 and math.isfinite(speed)):
            raise ReplayError(f"--speed {args.speed!r}: a positive number or max")
    files = tuple(parse_file_argument(f, args.market) for f in args.files) + tuple(
        parse_file_argument(f, args.market, stream=False) for f in args.history
    )
    if not files:
        raise ReplayError("no files: give at least one FILE or --history FILE")
    try:
        omit = set(_indices(args.omit_close))
        duplicate = set(_indices(args.duplicate_close))
        holes = []
        for text in args.exchange_hole:
            start, _, count = text.partition(":")
            holes.append((int(start), int(count or 1)))
    except ValueError as exc:
        raise ReplayError(f"bad bar index: {exc}") from None
    for name, value in (
        ("--omit-close-every", args.omit_close_every),
        ("--duplicate-close-every", args.duplicate_close_every),
    ):
        if value is not None and value < 1:
            raise ReplayError(f"{name} must be at least 1")
    if args.forming_per_bar < 0 or args.skip < 0 or args.start_at < 0:
        raise ReplayError("--forming-per-bar, --skip and --start-at must not be negative")
    if args.weight_limit is not None and args.weight_limit < 1:
        raise ReplayError("--weight-limit must be at least 1")
    return ReplayConfig(
        files=files,
        host=args.host,
        port=args.port,
        ws_port=args.ws_port,
        rest_port=args.rest_port,
        speed=speed,
        forming_per_bar=args.forming_per_bar,
        start_at=args.start_at,
        drop_at=tuple(args.drop_at),
        skip=args.skip,
        omit_closes=frozenset(omit),
        omit_close_every=args.omit_close_every,
        duplicate_closes=frozenset(duplicate),
        duplicate_close_every=args.duplicate_close_every,
        exchange_holes=tuple(holes),
        rest_429_first=args.rest_429_first,
        retry_after_s=args.retry_after,
        weight_limit=args.weight_limit,
        paused=args.paused,
    )


async def _serve_until_signalled(config: ReplayConfig, data: _Data) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGUSR1) as signals:
        async with trio.open_nursery() as nursery:
            handle: ReplayHandle = await nursery.start(_serve, config, data)
            paused = " paused (SIGUSR1 starts it)" if config.paused else ""
            sys.stdout.write(f"replay ws={handle.ws_url} rest={handle.rest_url}{paused}\n")
            sys.stdout.flush()

            async def report_finish() -> None:
                await handle.finished.wait()
                stats = handle.statistics()
                sys.stdout.write(f"replay finished bars={stats.bars} frames={stats.frames_sent}\n")
                sys.stdout.flush()

            nursery.start_soon(report_finish)
            async for signum in signals:
                if signum != signal.SIGUSR1:
                    nursery.cancel_scope.cancel()
                    break
                if handle.resume():
                    sys.stdout.write("replay resumed\n")
                    sys.stdout.flush()


def run_replay(args: argparse.Namespace) -> int:
    """``tradecanvas replay``: serve until SIGINT/SIGTERM (SIGUSR1 resumes ``--paused``);
    exit 0, or 2 for bad input."""
    try:
        config = config_from_args(args)
        data = load_data(config)  # bad files are reported before anything listens
        if not data.minutes:
            raise ReplayError("the replay files hold no klines")
        trio.run(_serve_until_signalled, config, data)
    except ReplayError as exc:
        sys.stderr.write(f"tradecanvas replay: {exc}\n")
        return ExitCode.USAGE
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tradecanvas replay", description=__doc__.split("\n")[0])
    configure_parser(parser)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_replay(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
