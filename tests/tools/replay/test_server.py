"""The replay on real sockets: the WebSocket streams, REST, faults, speed and pause."""

from __future__ import annotations

import contextlib
import itertools
from decimal import Decimal
from pathlib import Path

import attrs
import httpx
import orjson
import pytest
import trio
import trio.testing
import trio_websocket

from tests.tools.replay.conftest import DAY, STREAM, config_for, faults_config, read_events
from tradecanvas.model import Candle
from tradecanvas.tools.replay import ReplayConfig, ReplayHandle, serve_replay, server
from tradecanvas.upstream.ws_client import open_websocket_client


async def test_csv_bars_become_forming_and_closed_frames_in_exchange_time(
    day_csv: Path, day_rows: list[Candle]
) -> None:
    async with trio.open_nursery() as nursery:
        replay: ReplayHandle = await nursery.start(
            serve_replay, config_for(day_csv, start_at=1436, forming_per_bar=3)
        )
        url = f"{replay.ws_url}/market/stream?streams={STREAM}"
        async with open_websocket_client(url) as ws:
            events = await read_events(ws, 4 * 4)
        assert [e.stream for e in events] == [STREAM] * 16
        first = day_rows[1436]
        t_ms = first.candle_time * 1000
        assert [e.event_time_ms - t_ms for e in events[:5]] == [15000, 30000, 45000, 60200, 75000]
        assert [e.closed for e in events[:4]] == [False, False, False, True]
        closed = [e.candle for e in events if e.closed]
        assert all(
            c.same_values(r) for c, r in zip(closed, day_rows[1436:], strict=True)
        )  # the closed frames carry Binance's bars exactly
        await replay.finished.wait()
        assert replay.statistics().frames_sent == 16
        nursery.cancel_scope.cancel()


async def test_raw_streams_and_subscribe_acks(day_csv: Path) -> None:
    async with trio.open_nursery() as nursery:
        replay: ReplayHandle = await nursery.start(serve_replay, config_for(day_csv, start_at=1438))
        # a raw stream carries the payload without the combined wrapper
        async with open_websocket_client(f"{replay.ws_url}/ws/{STREAM}") as raw:
            doc = orjson.loads(await raw.get_message())
            assert doc["e"] == "kline" and "stream" not in doc
        async with open_websocket_client(f"{replay.ws_url}/ws") as ws:
            await ws.send_message('{"method":"SUBSCRIBE","params":["btcusdt@kline_1m"],"id":7}')
            assert orjson.loads(await ws.get_message()) == {"result": None, "id": 7}
            await ws.send_message('{"method":"LIST_SUBSCRIPTIONS","id":8}')
            assert orjson.loads(await ws.get_message()) == {"result": [STREAM], "id": 8}
            await ws.send_message("not json")
            assert "error" in orjson.loads(await ws.get_message())
        nursery.cancel_scope.cancel()


async def test_rest_serves_only_closed_bars_with_binance_paging(
    day_csv: Path, day_rows: list[Candle]
) -> None:
    async with trio.open_nursery() as nursery:
        replay: ReplayHandle = await nursery.start(serve_replay, config_for(day_csv, start_at=600))
        async with httpx.AsyncClient(base_url=replay.rest_url) as http:

            async def klines(**params: str | int) -> httpx.Response:
                query = {"symbol": "BTCUSDT", "interval": "1m", **params}
                return await http.get("/fapi/v1/klines", params=query)

            # nothing streamed yet: the exchange clock is at bar 600
            rows = (await klines(startTime=DAY * 1000, limit=1500)).json()
            assert len(rows) == 600 and rows[0][0] == DAY * 1000
            assert rows[0][1:6] == [
                str(day_rows[0].open),
                str(day_rows[0].high),
                str(day_rows[0].low),
                str(day_rows[0].close),
                str(day_rows[0].volume),
            ]
            assert rows[0][6] == DAY * 1000 + 59_999
            # no startTime: the latest `limit` rows up to endTime
            rows = (await klines(endTime=(DAY + 3000) * 1000, limit=3)).json()
            assert [r[0] // 1000 for r in rows] == [DAY + 2880, DAY + 2940, DAY + 3000]
            response = await klines(limit=1501)
            assert response.status_code == 400 and response.json()["code"] == -1130
            assert (await klines(symbol="ETHUSDT")).json()["code"] == -1121
            assert (await klines(interval="7m")).json()["code"] == -1120
            assert (await klines(interval="1s")).json()["code"] == -1120
            spot = await http.get("/api/v3/klines", params={"symbol": "BTCUSDT", "interval": "1m"})
            assert spot.json()["code"] == -1121  # the file is futures
            assert int(response.headers["x-mbx-used-weight-1m"]) > 0
            time = (await http.get("/fapi/v1/time")).json()
            assert time == {"serverTime": (DAY + 600 * 60) * 1000}
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("phase_days", "expected"), [(None, 2), (0, 0), (1, 1)])
async def test_rest_serves_longer_intervals_summed_from_the_1m_bars(
    day_csv: Path, day_rows: list[Candle], phase_days: int | None, expected: int
) -> None:
    """``interval=3d&limit=1`` (how the daemon learns a symbol's grid) opens on the symbol's
    3d grid: futures BTCUSDT's documented phase (day mod 3 = 2) unless --phase-3d says
    otherwise; the newest bar is the one still forming, as at Binance."""
    config = config_for(day_csv, start_at=700, phase_3d_days=phase_days)
    async with trio.open_nursery() as nursery:
        replay: ReplayHandle = await nursery.start(serve_replay, config)
        async with httpx.AsyncClient(base_url=replay.rest_url) as http:

            async def klines(**params: str | int) -> list[list[object]]:
                query = {"symbol": "BTCUSDT", **params}
                rows: list[list[object]] = (await http.get("/fapi/v1/klines", params=query)).json()
                return rows

            (bar,) = await klines(interval="3d", limit=1)
            open_s = int(str(bar[0])) // 1000
            assert open_s % (3 * 86_400) == expected * 86_400
            assert open_s <= DAY < open_s + 3 * 86_400
            # the forming 3d bar holds the 700 closed minutes so far
            assert Decimal(str(bar[5])) == sum((r.volume for r in day_rows[:700]), Decimal(0))
            five = await klines(interval="5m", startTime=DAY * 1000, limit=3)
            assert [int(str(r[0])) // 1000 for r in five] == [DAY, DAY + 300, DAY + 600]
            assert [r[4] for r in five] == [str(day_rows[4 + 5 * i].close) for i in range(3)]
            assert int(str(five[0][6])) == (DAY + 300) * 1000 - 1
            hours = await klines(interval="1h", limit=2)
            assert [int(str(r[0])) // 1000 for r in hours] == [DAY + 36_000, DAY + 39_600]
        nursery.cancel_scope.cancel()


async def test_faults_omit_duplicate_drop_and_skip(day_csv: Path) -> None:
    config = faults_config(day_csv, rest_429_first=True, retry_after_s=3)
    async with trio.open_nursery() as nursery:
        replay: ReplayHandle = await nursery.start(serve_replay, config)
        url = f"{replay.ws_url}/stream?streams={STREAM}"
        seen: list[tuple[int, bool]] = []

        async def read_until_closed(ws: trio_websocket.WebSocketConnection) -> None:
            while True:
                event = (await read_events(ws, 1))[0]
                seen.append(((event.open_time_ms // 1000 - DAY) // 60, event.closed))

        async with open_websocket_client(url) as ws:
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await read_until_closed(ws)
        assert closed.value.reason is not None and closed.value.reason.code == 1001
        assert seen == [
            (1420, False),
            (1420, True),
            (1421, False),  # 1421's close omitted
            (1422, False),
            (1422, True),
            (1422, True),  # duplicated
            (1423, False),
            (1423, True),
            (1424, False),  # dropped before 1424's close
        ]
        async with open_websocket_client(url) as ws:
            event = (await read_events(ws, 1))[0]
            assert event.open_time_ms // 1000 == DAY + 1427 * 60  # 1425, 1426 skipped
        async with httpx.AsyncClient(base_url=replay.rest_url) as http:
            params: dict[str, str | int] = {
                "symbol": "BTCUSDT",
                "interval": "1m",
                "startTime": (DAY + 1420 * 60) * 1000,
            }
            first = await http.get("/fapi/v1/klines", params=params)
            assert first.status_code == 429 and first.headers["retry-after"] == "3"
            rows = (await http.get("/fapi/v1/klines", params=params)).json()
            # the skipped bars (and whatever closed since) exist at the exchange
            minutes = [(r[0] // 1000 - DAY) // 60 for r in rows]
            assert minutes == list(range(1420, 1420 + len(minutes))) and len(minutes) >= 7
        stats = replay.statistics()
        assert (stats.closes_omitted, stats.closes_duplicated, stats.drops) == (1, 1, 1)
        assert stats.ws_connections == 2 and stats.rest_429 == 1
        nursery.cancel_scope.cancel()


async def test_exchange_hole_is_missing_on_ws_and_rest(day_csv: Path) -> None:
    config = config_for(day_csv, start_at=1430, forming_per_bar=0, exchange_holes=((1432, 2),))
    async with trio.open_nursery() as nursery:
        replay: ReplayHandle = await nursery.start(serve_replay, config)
        async with open_websocket_client(f"{replay.ws_url}/stream?streams={STREAM}") as ws:
            events = await read_events(ws, 8)
        minutes = [(e.open_time_ms // 1000 - DAY) // 60 for e in events]
        assert minutes == [1430, 1431, 1434, 1435, 1436, 1437, 1438, 1439]
        await replay.finished.wait()
        async with httpx.AsyncClient(base_url=replay.rest_url) as http:
            params: dict[str, str | int] = {
                "symbol": "BTCUSDT",
                "interval": "1m",
                "startTime": (DAY + 1430 * 60) * 1000,
            }
            rows = (await http.get("/fapi/v1/klines", params=params)).json()
        assert [(r[0] // 1000 - DAY) // 60 for r in rows] == minutes
        nursery.cancel_scope.cancel()


async def test_recorded_jsonl_frames_are_sent_verbatim(frames_jsonl: Path) -> None:
    text = await trio.Path(frames_jsonl).read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    streams = sorted({orjson.loads(line)["stream"] for line in lines})
    async with trio.open_nursery() as nursery:
        replay: ReplayHandle = await nursery.start(serve_replay, config_for(frames_jsonl))
        url = f"{replay.ws_url}/market/stream?streams={'/'.join(streams)}"
        async with open_websocket_client(url) as ws:
            got = [await ws.get_message() for _ in lines]
        assert got == lines
        async with httpx.AsyncClient(base_url=replay.rest_url) as http:
            params: dict[str, str | int] = {"symbol": "CTKUSDT", "interval": "1m", "startTime": 0}
            rows = (await http.get("/fapi/v1/klines", params=params)).json()
        closed = [orjson.loads(line)["data"]["k"] for line in lines if '"x":true' in line]
        ctk = [k for k in closed if k["s"] == "CTKUSDT"]
        assert [r[:6] for r in rows] == [
            [k["t"], k["o"], k["h"], k["l"], k["c"], k["v"]] for k in ctk
        ]
        nursery.cancel_scope.cancel()


async def test_speed_is_a_multiple_of_exchange_time(
    day_csv: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = config_for(day_csv, start_at=1437, speed=4.0, forming_per_bar=3)
    async with trio.open_nursery() as nursery:
        replay: ReplayHandle = await nursery.start(serve_replay, config)
        async with open_websocket_client(f"{replay.ws_url}/stream?streams={STREAM}") as ws:
            arrivals: list[tuple[float, int]] = []
            for _ in range(12):
                event = (await read_events(ws, 1))[0]
                arrivals.append((trio.current_time(), event.event_time_ms))
        for (t1, e1), (t2, e2) in itertools.pairwise(arrivals):
            assert t2 - t1 == pytest.approx((e2 - e1) / 1000 / 4.0, abs=0.01)
        nursery.cancel_scope.cancel()


async def test_a_paused_replay_sends_nothing_until_resumed_and_loses_no_bar(
    day_csv: Path, day_rows: list[Candle]
) -> None:
    async with trio.open_nursery() as nursery:
        replay: ReplayHandle = await nursery.start(
            serve_replay, config_for(day_csv, start_at=1436, paused=True)
        )
        async with open_websocket_client(f"{replay.ws_url}/stream?streams={STREAM}") as ws:
            # the answer to a request sent after connecting comes first: no frame went out
            await ws.send_message('{"method":"LIST_SUBSCRIPTIONS","id":1}')
            assert orjson.loads(await ws.get_message()) == {"result": [STREAM], "id": 1}
            stats = replay.statistics()
            assert stats.clients == 1 and stats.frames_sent == 0
            assert stats.now_ms == day_rows[1436].candle_time * 1000
            async with httpx.AsyncClient(base_url=replay.rest_url) as http:
                query: dict[str, str | int] = {"symbol": "BTCUSDT", "interval": "1m", "limit": 2}
                rows = (await http.get("/fapi/v1/klines", params=query)).json()
            assert [r[0] // 1000 for r in rows] == [t.candle_time for t in day_rows[1434:1436]]
            replay.resume()
            events = await read_events(ws, 4 * 4)
        closed = [e.candle for e in events if e.closed]
        assert [c.candle_time for c in closed] == [r.candle_time for r in day_rows[1436:]]
        assert not events[0].closed and events[0].open_time_ms // 1000 == DAY + 1436 * 60
        nursery.cancel_scope.cancel()


async def _all_frames(config: ReplayConfig, *, paused: bool) -> tuple[list[str], list[str]]:
    """Every frame a combined client of STREAM gets from ``config`` (--speed max), and a
    raw one too when ``paused`` (resumed once both are connected and the timeline prepared
    what it would; unpaused, the first client to connect starts the timeline)."""
    async with trio.open_nursery() as nursery:
        replay: ReplayHandle = await nursery.start(
            serve_replay, attrs.evolve(config, paused=paused)
        )
        async with contextlib.AsyncExitStack() as stack:
            urls = [f"{replay.ws_url}/stream?streams={STREAM}"]
            if paused:
                urls.append(f"{replay.ws_url}/ws/{STREAM}")
            clients = [await stack.enter_async_context(open_websocket_client(u)) for u in urls]
            if paused:
                await trio.testing.wait_all_tasks_blocked()  # preparing never blocks
                replay.resume()
            await replay.finished.wait()
            count = replay.statistics().frames_sent
            got = [[str(await ws.get_message()) for _ in range(count)] for ws in clients]
        nursery.cancel_scope.cancel()
    return got[0], got[1] if paused else []


@pytest.mark.parametrize("prepare_max", [server.PREPARE_MAX, 300])
async def test_a_paused_replay_sends_what_it_prepared_as_it_would_have(
    day_csv: Path, prepare_max: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A paused replay builds and frames its first frames before it is resumed (all of
    them, or the first 300 and the rest on the way): the clients get the very frames, in
    the same order, faults included, as from a replay that never paused."""
    monkeypatch.setattr(server, "PREPARE_MAX", prepare_max)
    config = config_for(
        day_csv,
        start_at=1200,
        forming_per_bar=2,
        omit_closes=frozenset({1300}),
        duplicate_closes=frozenset({1301}),
        delay_closes=((1302, 2),),
    )
    expected, _ = await _all_frames(config, paused=False)
    assert len(expected) > 600  # more than PREPARE_CHUNK and than 300
    combined, raw = await _all_frames(config, paused=True)
    assert combined == expected
    assert raw == [orjson.dumps(orjson.loads(m)["data"]).decode() for m in expected]
