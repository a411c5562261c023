"""BinanceRestClient over real HTTP (Hypercorn on 127.0.0.1).

Happy paths run against ``tradecanvas replay`` serving real Binance klines; the failure
paths against a small scripted Binance that answers in Binance's formats (status codes,
``Retry-After``, ``X-MBX-USED-WEIGHT-1M``, kline rows).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import cast

import httpx
import hypercorn.config
import hypercorn.trio
import hypercorn.typing
import pytest
import trio
import trio.testing
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tradecanvas.errors import UpstreamError, WireError
from tradecanvas.model import Candle, SeriesId, Timeframe
from tradecanvas.ops.metrics import Metrics
from tradecanvas.store.records import StoreBanMemory
from tradecanvas.store.sqlite import CandleStore
from tradecanvas.tools.replay import ReplayConfig, ReplayHandle, parse_file_argument, serve_replay
from tradecanvas.upstream.rest import BinanceRestClient, RestPolicy, klines_weight
from tradecanvas.wire.binance_rest import candle_to_rest_row
from tradecanvas.wire.json import dumps
from tradecanvas.wire.kline_csv import read_kline_csv

FUTURES = SeriesId.parse("binance:futures:BTC/USDT:1m")
SPOT = SeriesId.parse("binance:spot:BTC/USDT:1m")
ONE_MINUTE = Timeframe.parse("1m")
T0 = 1_751_760_000  # first bar of the 7-day futures file
# fast retries: the scripted failures must not make the suite slow
FAST = RestPolicy(backoff_base_s=0.01, backoff_cap_s=0.05)


@pytest.fixture
def futures_csv(data_dir: Path) -> Path:
    return data_dir / "klines_1m_5m" / "futures_um" / "BTCUSDT-1m-2025-07-06_2025-07-12.csv"


@pytest.fixture
def spot_dump(data_dir: Path) -> Path:
    return data_dir / "klines_1m_daily_dump" / "spot" / "BTCUSDT-1m-2020-01-01.csv"


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0)) as client:
        yield client


async def start_history(nursery: trio.Nursery, *files: Path) -> ReplayHandle:
    """A replay serving ``files`` on REST only (all of it has closed)."""
    config = ReplayConfig(
        files=tuple(parse_file_argument(str(f), None, stream=False) for f in files)
    )
    handle: ReplayHandle = await nursery.start(serve_replay, config)
    return handle


class ScriptedBinance:
    """Answers each klines call with the next scripted reply and records when it came."""

    def __init__(self, replies: list[Callable[[Request], Response]]) -> None:
        self.replies = replies
        self.calls: list[tuple[float, dict[str, str]]] = []

    async def klines(self, request: Request) -> Response:
        self.calls.append((trio.current_time(), dict(request.query_params)))
        reply = self.replies[min(len(self.calls), len(self.replies)) - 1]
        return reply(request)

    async def start(self, nursery: trio.Nursery) -> str:
        app = Starlette(
            routes=[
                Route(path, self.klines)
                for path in ("/fapi/v1/klines", "/fapi/v1/time", "/fapi/v1/exchangeInfo")
            ]
        )
        config = hypercorn.config.Config()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        config.include_date_header = False  # the replies carry Binance's own Date
        config.graceful_timeout = 0.5
        binds: list[str] = await nursery.start(
            functools.partial(
                hypercorn.trio.serve, cast(hypercorn.typing.ASGIFramework, app), config
            )
        )
        return binds[0]


def rows_reply(
    status: int = 200, weight: int = 1, date: str | None = None, retry_after: str | None = None
) -> Callable[[Request], Response]:
    def reply(request: Request) -> Response:
        start = int(request.query_params.get("startTime", T0 * 1000)) // 1000
        candles = read_kline_csv_rows()
        body = [candle_to_rest_row(c, ONE_MINUTE) for c in candles if c.candle_time >= start][:2]
        headers = {"X-MBX-USED-WEIGHT-1M": str(weight)}
        if date:
            headers["Date"] = date
        if retry_after:
            headers["Retry-After"] = retry_after
        content = dumps(body) if status == 200 else dumps({"code": -1003, "msg": "Too many"})
        return Response(content, status, headers, media_type="application/json")

    return reply


@functools.cache
def read_kline_csv_rows() -> tuple[Candle, ...]:
    from tests.conftest import binance_data_dir

    path = binance_data_dir() / "klines_1m_5m" / "futures_um" / "BTCUSDT-1m-2023-08-16.csv"
    return tuple(read_kline_csv(path))


def test_klines_weight_follows_binance_tables() -> None:
    assert [klines_weight("futures", n) for n in (99, 100, 499, 500, 1000, 1001, 1500)] == [
        1,
        2,
        2,
        5,
        5,
        10,
        10,
    ]
    assert klines_weight("spot", 1000) == 2


async def test_futures_paging_1500_per_call_returns_binance_bars(
    futures_csv: Path, http: httpx.AsyncClient
) -> None:
    expected = read_kline_csv(futures_csv)[:3000]
    async with trio.open_nursery() as nursery:
        replay = await start_history(nursery, futures_csv)
        metrics = Metrics()
        client = BinanceRestClient(http, {"futures": replay.rest_url}, metrics=metrics)
        got = await client.klines(FUTURES, T0, T0 + 3000 * 60)
        assert [c.candle_time for c in got] == [c.candle_time for c in expected]
        assert all(a.same_values(b) for a, b in zip(got, expected, strict=True))
        assert replay.statistics().rest_requests == 2  # 1500 + 1500
        stats = client.statistics()
        assert stats.requests == 2 and stats.used_weight["futures"] == 20
        assert b'tradecanvas_rest_requests_total{status="200"} 2.0' in metrics.render()
        # a range below and beyond the data: nothing, in one call
        assert await client.klines(FUTURES, T0 - 600, T0) == []
        nursery.cancel_scope.cancel()


async def test_spot_paging_1000_per_call_keeps_the_12_columns(
    spot_dump: Path, http: httpx.AsyncClient
) -> None:
    expected = read_kline_csv(spot_dump)
    start = expected[0].candle_time
    async with trio.open_nursery() as nursery:
        replay = await start_history(nursery, spot_dump)
        client = BinanceRestClient(http, {"spot": replay.rest_url})
        got = await client.klines(SPOT, start, start + 86400)
        assert len(got) == 1440 and replay.statistics().rest_requests == 2  # 1000 + 440
        assert got == expected  # every column, trades and taker volumes included
        nursery.cancel_scope.cancel()


async def test_exchange_holes_are_simply_absent(futures_csv: Path, http: httpx.AsyncClient) -> None:
    async with trio.open_nursery() as nursery:
        config = ReplayConfig(
            files=(parse_file_argument(str(futures_csv), None, stream=False),),
            exchange_holes=((10, 5),),
        )
        replay: ReplayHandle = await nursery.start(serve_replay, config)
        client = BinanceRestClient(http, {"futures": replay.rest_url})
        got = [c.candle_time for c in await client.klines(FUTURES, T0, T0 + 20 * 60)]
        assert got == [T0 + 60 * i for i in range(20) if not 10 <= i < 15]
        nursery.cancel_scope.cancel()


async def test_exchange_info_and_server_time(futures_csv: Path, http: httpx.AsyncClient) -> None:
    async with trio.open_nursery() as nursery:
        replay = await start_history(nursery, futures_csv)
        client = BinanceRestClient(http, {"futures": replay.rest_url})
        assert await client.load_rate_limits("futures") == 2400
        await replay.finished.wait()
        assert await client.server_time_ms("futures") == (T0 + 10080 * 60) * 1000
        nursery.cancel_scope.cancel()


async def test_429_waits_for_retry_after_then_succeeds(
    autojump_clock: trio.testing.MockClock, http: httpx.AsyncClient
) -> None:
    binance = ScriptedBinance([rows_reply(429, retry_after="7"), rows_reply()])
    async with trio.open_nursery() as nursery:
        base = await binance.start(nursery)
        client = BinanceRestClient(http, {"futures": base}, policy=FAST)
        got = await client.klines(FUTURES, 1692144000, 1692144000 + 120)
        assert len(got) == 2
        (first, _), (second, _) = binance.calls
        assert 7.0 <= second - first < 7.5
        assert client.statistics().rate_limited == 1
        nursery.cancel_scope.cancel()


async def test_a_long_ban_fails_fast_for_every_caller_until_it_ends(
    autojump_clock: trio.testing.MockClock, http: httpx.AsyncClient
) -> None:
    binance = ScriptedBinance([rows_reply(418, retry_after="7200"), rows_reply()])
    async with trio.open_nursery() as nursery:
        base = await binance.start(nursery)
        client = BinanceRestClient(http, {"futures": base}, policy=FAST)
        with pytest.raises(UpstreamError, match="stay away"):
            await client.klines(FUTURES, 1692144000, 1692144120)
        with pytest.raises(UpstreamError, match="stay away"):
            await client.klines(FUTURES, 1692144000, 1692144120)
        assert len(binance.calls) == 1  # nobody knocked again during the ban
        assert client.statistics().banned == 1
        await trio.sleep(7200)
        assert len(await client.klines(FUTURES, 1692144000, 1692144120)) == 2
        nursery.cancel_scope.cancel()


async def test_5xx_is_retried_with_backoff_and_gives_up_in_the_end(
    autojump_clock: trio.testing.MockClock, http: httpx.AsyncClient
) -> None:
    flaky = ScriptedBinance([rows_reply(503), rows_reply(502), rows_reply()])
    broken = ScriptedBinance([rows_reply(500)])
    async with trio.open_nursery() as nursery:
        client = BinanceRestClient(http, {"futures": await flaky.start(nursery)}, policy=FAST)
        assert len(await client.klines(FUTURES, 1692144000, 1692144120)) == 2
        assert client.statistics().retries == 2
        client = BinanceRestClient(http, {"futures": await broken.start(nursery)}, policy=FAST)
        with pytest.raises(UpstreamError, match="gave up after 6 attempts: HTTP 500"):
            await client.klines(FUTURES, 1692144000, 1692144120)
        assert len(broken.calls) == 6
        # after the last attempt it gives up at once, without a backoff wait
        once = BinanceRestClient(
            http,
            {"futures": await broken.start(nursery)},
            policy=RestPolicy(max_attempts=1, backoff_base_s=1000, backoff_cap_s=1000),
        )
        before = trio.current_time()
        with pytest.raises(UpstreamError, match="gave up after 1 attempts"):
            await once.klines(FUTURES, 1692144000, 1692144120)
        assert trio.current_time() - before < 1
        nursery.cancel_scope.cancel()


async def test_timeouts_are_retried_then_reported(autojump_clock: trio.testing.MockClock) -> None:
    class Slow(ScriptedBinance):
        async def klines(self, request: Request) -> Response:
            self.calls.append((trio.current_time(), dict(request.query_params)))
            await trio.sleep(3600)
            raise AssertionError("the client gave up long before")

    binance = Slow([])
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(5.0)) as http,
        trio.open_nursery() as nursery,
    ):
        base = await binance.start(nursery)
        policy = RestPolicy(max_attempts=3, backoff_base_s=0.01, backoff_cap_s=0.01)
        client = BinanceRestClient(http, {"futures": base}, policy=policy)
        with pytest.raises(UpstreamError, match="timed out"):
            await client.klines(FUTURES, 1692144000, 1692144120)
        assert len(binance.calls) == 3
        nursery.cancel_scope.cancel()


async def test_other_4xx_is_not_retried_and_bad_bodies_are_wire_errors(
    http: httpx.AsyncClient,
) -> None:
    def bad_symbol(request: Request) -> Response:
        return Response(dumps({"code": -1121, "msg": "Invalid symbol."}), 400)

    def garbage(request: Request) -> Response:
        return Response(b'[[1692144000000, "x"]]', 200, media_type="application/json")

    async with trio.open_nursery() as nursery:
        refused = ScriptedBinance([bad_symbol])
        client = BinanceRestClient(http, {"futures": await refused.start(nursery)})
        with pytest.raises(UpstreamError, match="Invalid symbol"):
            await client.klines(FUTURES, 1692144000, 1692144120)
        assert len(refused.calls) == 1
        broken = ScriptedBinance([garbage])
        client = BinanceRestClient(http, {"futures": await broken.start(nursery)})
        with pytest.raises(WireError):
            await client.klines(FUTURES, 1692144000, 1692144120)
        with pytest.raises(UpstreamError, match="no REST base URL"):
            await client.klines(SPOT, 1692144000, 1692144120)
        nursery.cancel_scope.cancel()


async def test_a_200_that_is_not_json_is_a_wire_error_on_every_call(
    http: httpx.AsyncClient,
) -> None:
    """A proxy or maintenance page answering 200 with HTML must not escape as a bare
    ValueError: the supervisor's best-effort exchangeInfo read catches WireError only."""

    def maintenance(request: Request) -> Response:
        return Response(b"<html>maintenance</html>", 200, media_type="text/html")

    async with trio.open_nursery() as nursery:
        binance = ScriptedBinance([maintenance])
        client = BinanceRestClient(http, {"futures": await binance.start(nursery)})
        with pytest.raises(WireError, match="not_json"):
            await client.load_rate_limits("futures")
        with pytest.raises(WireError, match="not_json"):
            await client.server_time_ms("futures")
        with pytest.raises(WireError, match="not_json"):
            await client.klines(FUTURES, 1692144000, 1692144120)
        assert len(binance.calls) == 3  # a bad body is not retried
        assert client.statistics().weight_limit == {"futures": 2400}
        nursery.cancel_scope.cancel()


async def test_weight_near_the_limit_waits_for_binances_next_minute(
    autojump_clock: trio.testing.MockClock, http: httpx.AsyncClient
) -> None:
    # 2000 used of 2400 is past our 80 % budget; Binance's clock says second 50
    heavy = rows_reply(weight=2000, date="Wed, 16 Aug 2023 00:00:50 GMT")
    binance = ScriptedBinance([heavy, rows_reply(weight=5)])
    async with trio.open_nursery() as nursery:
        client = BinanceRestClient(http, {"futures": await binance.start(nursery)})
        await client.klines(FUTURES, 1692144000, 1692144120)
        await client.klines(FUTURES, 1692144000, 1692144120)
        (first, _), (second, _) = binance.calls
        assert 10.0 <= second - first <= 11.5  # 60 - 50 s, plus a second of rounding
        assert client.statistics().weight_waits == 1
        nursery.cancel_scope.cancel()


async def test_a_ban_is_remembered_across_a_restart(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """BINANCE.md: asking again during a 418 ban lengthens it, so a restarted daemon must
    not. The ban's end lives in the store; a new client honours it before any request."""
    binance = ScriptedBinance([rows_reply(418, retry_after="7200"), rows_reply()])
    store = await CandleStore.open(tmp_path / "m.sqlite3")
    async with trio.open_nursery() as nursery:
        base = await binance.start(nursery)
        first = BinanceRestClient(http, {"futures": base}, policy=FAST, bans=StoreBanMemory(store))
        with pytest.raises(UpstreamError, match="stay away"):
            await first.klines(FUTURES, 1692144000, 1692144120)
        assert len(binance.calls) == 1
        # "restart": a new client on the same store
        second = BinanceRestClient(http, {"futures": base}, policy=FAST, bans=StoreBanMemory(store))
        await second.restore_bans()
        with pytest.raises(UpstreamError, match="stay away"):
            await second.klines(FUTURES, 1692144000, 1692144120)
        assert len(binance.calls) == 1  # the restarted client did not knock
        # an expired ban is ignored
        await StoreBanMemory(store).save("futures", 1.0)
        third = BinanceRestClient(http, {"futures": base}, policy=FAST, bans=StoreBanMemory(store))
        await third.restore_bans()
        assert len(await third.klines(FUTURES, 1692144000, 1692144120)) == 2
        nursery.cancel_scope.cancel()
    await store.aclose()


async def test_a_429s_retry_after_is_remembered_across_a_restart(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """BINANCE.md: asking again inside a 429's Retry-After earns a 418. A daemon restarted
    within it waits for the rest of it before its first request, as after a ban."""
    binance = ScriptedBinance([rows_reply(429, retry_after="60"), rows_reply()])
    store = await CandleStore.open(tmp_path / "m.sqlite3")
    async with trio.open_nursery() as nursery:
        base = await binance.start(nursery)
        first = BinanceRestClient(http, {"futures": base}, policy=FAST, bans=StoreBanMemory(store))
        with trio.move_on_after(1):  # the first run stops inside the wait
            await first.klines(FUTURES, 1692144000, 1692144120)
        (rate_limited_at, _), *retried = binance.calls
        assert retried == []
        second = BinanceRestClient(http, {"futures": base}, policy=FAST, bans=StoreBanMemory(store))
        await second.restore_bans()
        assert len(await second.klines(FUTURES, 1692144000, 1692144120)) == 2
        (_, _), (asked_again_at, _) = binance.calls
        # the wall clock moved a little in between: the rest of the minute, give or take
        assert asked_again_at - rate_limited_at >= 59
        nursery.cancel_scope.cancel()
    await store.aclose()


async def test_klines_drop_the_bar_still_forming_at_the_answers_time(
    autojump_clock: trio.testing.MockClock, http: httpx.AsyncClient
) -> None:
    """Binance's answer ends with the bar still forming when the range reaches it (its
    partial values): it is no closed candle, and a fill must never store it as one. Its
    ``Date`` (Binance's clock) tells: a bar that ends after it is dropped."""
    day = 1692144000
    forming = "Wed, 16 Aug 2023 00:01:30 GMT"  # the second bar ends at 00:02:00
    ended = "Wed, 16 Aug 2023 00:02:00 GMT"
    binance = ScriptedBinance([rows_reply(date=forming), rows_reply(date=ended)])
    async with trio.open_nursery() as nursery:
        base = await binance.start(nursery)
        client = BinanceRestClient(http, {"futures": base}, policy=FAST)
        got = await client.klines(FUTURES, day, day + 120)
        assert [c.candle_time for c in got] == [day]
        got = await client.klines(FUTURES, day, day + 120)
        assert [c.candle_time for c in got] == [day, day + 60]
        nursery.cancel_scope.cancel()
