"""The in-process benchmarks: commit, derive, parse. No sockets; each side runs the same
work on the same data, rounds interleaved, medians compared.

- commit: ``IngestPipeline.run`` (upsert + derive 5m + events, one store transaction, WAL,
  ``synchronous=FULL``) on batches of 400 candles — one minute of 400 series, the shape of
  the minute-boundary burst, each candle with the extras a Binance kline carries — vs. a
  bare ``executemany`` of the same rows into the same schema (a store file made by
  ``CandleStore.open``, the same PRAGMAs), one transaction a batch.
  The figure without derivation is recorded beside it.
- derive: ``pipeline.derive.derive_series`` (Binance's rule) vs. a naive first/max/min/
  last/sum loop over the same week of 1m candles, 1m → 5m.
- parse: ``wire.binance.decode_frame`` vs. cryptofeed's Binance handler
  (``message_handler`` → ``_candle``, the path a cryptofeed user gets) on the same captured
  combined-stream kline frames.
"""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import attrs
import trio

from bench.common import BTC_WEEK, WS_FRAMES, Figure, alternate, data_file, median, timed
from tradecanvas.model import Candle, SeriesId, Timeframe
from tradecanvas.pipeline.commit import IngestBatch, IngestPipeline
from tradecanvas.pipeline.derive import derive_series
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.store.sqlite import WRITER_CACHE_KIB, CandleStore
from tradecanvas.wire.binance import decode_frame
from tradecanvas.wire.kline_csv import read_kline_csv

BATCH_SERIES: Final = 400
FIVE: Final = Timeframe.parse("5m")
INSERT: Final = (
    "INSERT INTO candles (series_id, candle_time, open, high, low, close, volume, quote_volume,"
    " trades, taker_buy_base, taker_buy_quote, source, complete)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def synthetic_series(count: int) -> list[SeriesId]:
    """``count`` futures series with three-letter bases (AAA, AAB, …) quoted in USDT."""
    out = []
    for i in range(count):
        base = "".join(chr(ord("A") + (i // 26**p) % 26) for p in (2, 1, 0))
        out.append(SeriesId.parse(f"binance:futures:{base}/USDT:1m"))
    return out


def _week() -> list[Candle]:
    return read_kline_csv(data_file(BTC_WEEK))


# --- commit ----------------------------------------------------------------------------


class _NullTarget:
    def publish_closed(self, series_id: str, candles: object) -> list[str]:
        return []

    def publish_system(self, event: SystemEvent) -> list[str]:
        return []


def with_extras(candle: Candle) -> Candle:
    """``candle`` with the four fields a Binance kline also carries (the week's CSV has
    OHLCV only): quote volume, trades, taker buy base and quote, in Binance's forms."""
    quote = (candle.volume * candle.close).quantize(Decimal("0.00001"))
    return attrs.evolve(
        candle,
        quote_volume=quote,
        trades=int(candle.volume * 10) + 1,
        taker_buy_base=(candle.volume / 2).quantize(Decimal("0.001")),
        taker_buy_quote=(quote / 2).quantize(Decimal("0.00001")),
    )


def _batches(minutes: int) -> list[IngestBatch]:
    """One minute of every series a batch, each candle as Binance sends it (with extras)."""
    series = synthetic_series(BATCH_SERIES)
    week = [with_extras(c) for c in _week()[:minutes]]
    return [IngestBatch(tuple((s, m) for s in series), "ws") for m in week]


def _pipeline_commit(batches: Sequence[IngestBatch], derived: Sequence[Timeframe]) -> float:
    """Seconds to run every batch (the store opened before, closed after the clock)."""

    async def go() -> float:
        with tempfile.TemporaryDirectory() as d:
            store = await CandleStore.open(Path(d) / "b.sqlite3")
            try:
                pipeline = IngestPipeline(store, _NullTarget(), derived, "bench")
                # the first batch of a series raises new_series events: not the steady state
                await pipeline.run(batches[0])
                start = trio.current_time()
                for batch in batches[1:]:
                    await pipeline.run(batch)
                return trio.current_time() - start
            finally:
                await store.aclose()

    return trio.run(go)


def _rows(batch: IngestBatch) -> list[tuple[object, ...]]:
    return [
        (str(s), c.candle_time, str(c.open), str(c.high), str(c.low), str(c.close),
         str(c.volume), str(c.quote_volume), c.trades, str(c.taker_buy_base),
         str(c.taker_buy_quote), "ws", 1)
        for s, c in batch.candles
    ]  # fmt: skip


Rows = list[tuple[object, ...]]


def bare_executemany(
    transactions: Callable[[], Iterable[Rows]], warmup: Sequence[Rows] = ()
) -> float:
    """The bare baseline of the commit and the import: seconds to write each list of
    ``candles`` rows that ``transactions()`` yields in a transaction of its own (``BEGIN``,
    one ``executemany`` of :data:`INSERT`, ``COMMIT``) into a fresh store file's schema
    (made by ``CandleStore.open``) with the store writer's PRAGMAs (WAL, ``synchronous=FULL``,
    its page cache).
    The rows are built inside the clock, as the generator yields them (the pipeline and the
    import convert their input inside theirs); ``warmup``'s transactions go first, outside
    it."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "b.sqlite3"

        async def make_schema() -> None:
            await (await CandleStore.open(path)).aclose()

        trio.run(make_schema)
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute(f"PRAGMA cache_size = -{WRITER_CACHE_KIB}")

            def write(all_rows: Iterable[Rows]) -> None:
                for rows in all_rows:
                    conn.execute("BEGIN")
                    conn.executemany(INSERT, rows)
                    conn.execute("COMMIT")

            write(warmup)
            return timed(lambda: write(transactions()))
        finally:
            conn.close()


def _bare_commit(batches: Sequence[IngestBatch]) -> float:
    """The same rows as the pipeline commits, a batch a transaction (the first batch, the
    pipeline's warm-up, outside the clock)."""
    return bare_executemany(lambda: map(_rows, batches[1:]), warmup=[_rows(batches[0])])


def bench_commit(rounds: int, minutes: int) -> Figure:
    batches = _batches(minutes + 1)
    ours, bare, no_derive = alternate(
        rounds,
        lambda: _pipeline_commit(batches, [FIVE]),
        lambda: _bare_commit(batches),
        lambda: _pipeline_commit(batches, []),
    )
    candles = BATCH_SERIES * minutes
    ours_s, bare_s, plain_s = median(ours), median(bare), median(no_derive)
    return Figure(
        "commit_ratio_vs_bare_sqlite",
        ours_s / bare_s,
        "max",
        2.0,
        "IngestPipeline.run (+5m derive) ÷ bare executemany, batches of 400 (one minute × 400"
        " series)",
        {
            "batches": minutes,
            "candles": candles,
            "pipeline_s": ours_s,
            "pipeline_us_per_candle": ours_s / candles * 1e6,
            "bare_sqlite_s": bare_s,
            "bare_sqlite_us_per_candle": bare_s / candles * 1e6,
            "pipeline_without_derive_s": plain_s,
            "ratio_without_derive": plain_s / bare_s,
            "pipeline_rounds_s": ours,
            "bare_rounds_s": bare,
        },
    )


# --- derive ----------------------------------------------------------------------------


def _naive_derive(minutes: Sequence[Candle]) -> None:
    for i in range(0, len(minutes), 5):
        group = minutes[i : i + 5]
        Candle(
            group[0].candle_time,
            group[0].open,
            max(c.high for c in group),
            min(c.low for c in group),
            group[-1].close,
            sum((c.volume for c in group), Decimal(0)),
        )


def bench_derive(rounds: int, minutes: int) -> Figure:
    week = _week()[:minutes]
    ours, naive = alternate(
        rounds,
        lambda: timed(lambda: derive_series(FIVE, week)),
        lambda: timed(lambda: _naive_derive(week)),
    )
    ours_s, naive_s = median(ours), median(naive)
    return Figure(
        "derive_ratio_vs_naive",
        ours_s / naive_s,
        "max",
        1.5,
        "derive_series 1m→5m ÷ a naive first/max/min/last/sum loop, same minutes",
        {
            "minutes": len(week),
            "derive_s": ours_s,
            "derive_us_per_minute": ours_s / len(week) * 1e6,
            "naive_s": naive_s,
            "naive_us_per_minute": naive_s / len(week) * 1e6,
            "rounds": rounds,
            "min_ratio": min(ours) / min(naive),
        },
    )


# --- parse -----------------------------------------------------------------------------


def _frames() -> list[str]:
    return [line for line in data_file(WS_FRAMES).read_text().splitlines() if line.strip()]


def _cryptofeed_handler(frames: Sequence[str]) -> Callable[[str], None]:
    """cryptofeed's BinanceFutures feed, its symbol table filled from the frames (no
    network), its candle callback counting; returns a plain function that runs
    ``message_handler`` on one frame. The coroutine never suspends (the callback awaits
    nothing), so it is driven by hand: no event loop."""
    from cryptofeed.defines import BINANCE_FUTURES, CANDLES
    from cryptofeed.exchanges import BinanceFutures
    from cryptofeed.symbols import Symbols

    raw = sorted({f.split('"s":"', 1)[1].split('"', 1)[0] for f in frames})
    mapping = {f"{s.removesuffix('USDT')}-USDT-PERP": s for s in raw}
    Symbols.set(BINANCE_FUTURES, mapping, {})
    got: list[object] = []

    async def on_candle(candle: object, receipt: float) -> None:
        got.append(candle)

    feed = BinanceFutures(
        symbols=list(mapping),
        channels=[CANDLES],
        callbacks={CANDLES: on_candle},
        candle_closed_only=False,
    )

    def handle(frame: str) -> None:
        coro = feed.message_handler(frame, None, 0.0)
        try:
            coro.send(None)
        except StopIteration:
            return
        coro.close()
        raise RuntimeError("cryptofeed's handler suspended")

    handle(frames[0])
    if not got:
        raise RuntimeError("cryptofeed produced no candle")
    return handle


def _decode_all(frames: Sequence[str], fn: Callable[[str], Any], repeat: int) -> float:
    def run() -> None:
        for _ in range(repeat):
            for frame in frames:
                fn(frame)

    return timed(run)


def bench_parse(rounds: int, repeat: int) -> Figure:
    frames = _frames()
    theirs = _cryptofeed_handler(frames)
    ours, base = alternate(
        rounds,
        lambda: _decode_all(frames, decode_frame, repeat),
        lambda: _decode_all(frames, theirs, repeat),
    )
    count = len(frames) * repeat
    ours_fps, theirs_fps = count / median(ours), count / median(base)
    return Figure(
        "parse_ratio_vs_cryptofeed",
        ours_fps / theirs_fps,
        "min",
        1.0,
        "frames/s of wire.binance.decode_frame ÷ cryptofeed BinanceFutures.message_handler,"
        " the same captured kline frames",
        {
            "frames": count,
            "distinct_frames": len(frames),
            "ours_frames_per_s": ours_fps,
            "cryptofeed_frames_per_s": theirs_fps,
            "rounds": rounds,
            "min_ratio": min(base) / min(ours),
        },
    )
