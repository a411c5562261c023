"""The replay's files: naming them (series, market, where they lie) and reading them.

:func:`load_data` reads kline CSVs and recorded JSONL frames into :class:`ReplayData` (the
REST bars per market and symbol, and what each streamed file sends); no sockets, no trio.
Raises :class:`ReplayError` (a file or option that cannot be used) and nothing else. What
the exchange does with the data is :mod:`~tradecanvas.tools.replay.core`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, Literal

import attrs
import orjson

from tradecanvas.errors import TradeCanvasError, WireError
from tradecanvas.model import BASE_TIMEFRAME, MS, Candle, Market, SeriesId
from tradecanvas.runtime_flags import DATA_DIR_VARIABLE, data_dir_candidates
from tradecanvas.wire.binance import KlineEvent, decode_frame
from tradecanvas.wire.kline_csv import read_kline_csv

# the replay streams the base timeframe only; REST sums it into Binance's longer intervals
ONE_MINUTE: Final = BASE_TIMEFRAME
KNOWN_QUOTES: Final = ("FDUSD", "USDT", "USDC", "BUSD", "TUSD", "BTC", "ETH", "BNB", "EUR", "TRY")

FrameKind = Literal["forming", "closed", "other"]


class ReplayError(TradeCanvasError):
    """A replay file or option that cannot be used; the message names it."""


@attrs.frozen
class ReplayFile:
    """One FILE (or ``--history`` FILE) argument, named and located."""

    path: Path
    market: Market
    series: SeriesId | None = None  # CSV: the series it holds; JSONL: named by its frames
    stream: bool = True  # False: REST history only (``--history``)


@attrs.frozen
class ReplayConfig:
    """What to serve, where, how fast, and with which faults (bar indices count the data's
    distinct open times from 0)."""

    files: tuple[ReplayFile, ...]
    host: str = "127.0.0.1"
    port: int = 0
    ws_port: int | None = None  # None: ``port``
    rest_port: int | None = None  # None: ``port`` + 1 (any free when ``port`` is 0)
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
    # faults without command-line options (tests/reliability): the timeline goes silent for
    # ``stall_s`` before the first close at or after each ``stall_at`` bar (connections stay
    # open); a ``delay_closes`` (BAR, N) close is sent after bar BAR+N's close instead (late
    # and out of order); the first klines calls are answered, in turn, with ``rest_faults``
    # statuses (429 or 418, with ``retry_after_s``; 0: no answer for ``rest_hang_s``, then 504)
    stall_at: tuple[int, ...] = ()
    stall_s: float = 0.0
    delay_closes: tuple[tuple[int, int], ...] = ()
    rest_faults: tuple[int, ...] = ()
    rest_hang_s: float = 12.0  # past the REST client's timeout
    # the 3d grid's phase in days (0, 1 or 2: its open day modulo 3); None: the documented
    # phase of a known symbol (upstream.phases.KNOWN_PHASES), else 0
    phase_3d_days: int | None = None


@attrs.frozen
class RecordedFrame:
    """One line of a JSONL recording; an unparsable line keeps the previous line's times."""

    event_ms: int  # E
    kind: FrameKind
    stream: str
    open_time: int  # the kline's open time in seconds (k.t), -1 before any kline
    text: str  # the line as recorded


@attrs.define
class ReplayData:
    """Everything the files hold: REST bars per (market, symbol) and the frame timeline."""

    bars: dict[tuple[str, str], list[Candle]] = attrs.Factory(dict)
    minutes: list[int] = attrs.Factory(list)  # distinct open times, ascending
    csv_series: list[tuple[int, SeriesId, list[Candle]]] = attrs.Factory(list)
    jsonl_items: list[list[RecordedFrame]] = attrs.Factory(list)


# --- naming the files -----------------------------------------------------------------


def infer_market(path: Path) -> Market | None:
    """``spot…`` or ``futures…``/``fapi…``/``um…`` in a folder or file name, nearest first."""
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
    interval = parts[1] if len(parts) > 1 else ONE_MINUTE.text
    if interval != ONE_MINUTE.text:
        raise ReplayError(f"{path}: replay serves 1m klines; this file holds {interval}")
    for quote in KNOWN_QUOTES:
        if symbol.endswith(quote) and len(symbol) > len(quote):
            base = symbol[: -len(quote)]
            return SeriesId.parse(f"binance:{market}:{base}/{quote}:{ONE_MINUTE}")
    raise ReplayError(
        f"{path}: cannot tell the symbol from the file name; name it: SERIES_ID=FILE,"
        " such as binance:futures:BTC/USDT:1m=data.csv"
    )


def resolve_path(text: str) -> Path:
    """As given, else (a relative path) under each folder of
    :func:`~tradecanvas.runtime_flags.data_dir_candidates` (``$TRADE_CANVAS_DATA_DIR``, the
    shared data beside the checkout, ``.cache/binance``). Raises ReplayError naming every
    place looked at, and ``make test-data`` (which fills ``.cache/binance``)."""
    path = Path(text)
    if path.exists():
        return path
    tried = [str(path.absolute())]
    if path.is_absolute():
        raise ReplayError(f"{text}: no such file")
    roots = data_dir_candidates()
    for root in roots:
        if (root / text).exists():
            return root / text
        tried.append(str(root / text))
    if roots == data_dir_candidates({}):  # the defaults only
        tried.append(f"(${DATA_DIR_VARIABLE} is not set)")
    raise ReplayError(
        f"{text}: no such file; looked at: {', '.join(tried)}. No data folder? Run"
        " `make test-data` once in the checkout (it downloads Binance's public archive from"
        " data.binance.vision into .cache/binance)"
    )


def parse_file_argument(
    text: str, default_market: Market | None, *, stream: bool = True
) -> ReplayFile:
    """``FILE`` or ``SERIES_ID=FILE``: the market from the series, else ``default_market``,
    else the path, else futures. Raises ReplayError."""
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


# --- reading the files ----------------------------------------------------------------


def load_data(config: ReplayConfig) -> ReplayData:
    """Read every file of ``config``; bars inside ``exchange_holes`` are left out of REST.
    Raises ReplayError for a file that cannot be read."""
    data = ReplayData()
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
            open_times.update(f.open_time for f in frames if f.open_time >= 0)
    data.minutes = sorted(open_times)
    holes = hole_times(config, data.minutes)
    for key, candles in data.bars.items():
        unique = {c.candle_time: c for c in candles if c.candle_time not in holes}
        data.bars[key] = [unique[t] for t in sorted(unique)]
    return data


def _read_jsonl(item: ReplayFile, data: ReplayData) -> list[RecordedFrame]:
    """The recording's frames; its closed klines also become REST bars in ``data``. An
    unparsable line keeps the previous times and is sent as it is (recorded garbage stays
    garbage)."""
    frames: list[RecordedFrame] = []
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
        frames.append(RecordedFrame(last_e, kind, stream, last_t, line))
        if kind == "closed":
            try:
                event = decode_frame(line)
            except WireError:
                continue
            if isinstance(event, KlineEvent):
                key = (item.market, event.symbol)
                data.bars.setdefault(key, []).append(event.candle)
    return frames


def hole_times(config: ReplayConfig, minutes: Sequence[int]) -> set[int]:
    """The open times ``--exchange-hole`` removes from the WebSocket and REST."""
    times: set[int] = set()
    for start, count in config.exchange_holes:
        times.update(minutes[i] for i in range(start, min(start + count, len(minutes))))
    return times
