"""``tradecanvas subscribe``: in-process against a real server, and as a real subprocess
(``e2e``); across a restart of the server, in both ways, with nothing lost or doubled."""

from __future__ import annotations

import argparse
import functools
import io
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Final, Protocol, TextIO, cast, final

import attrs
import pytest
import trio
import trio_websocket

from tests.pipeline.test_commit import RecordingTarget
from tests.serve.test_ws_server import (
    SERIES_1M,
    SID_1M,
    SID_5M,
    closed_times,
    real_candles,
    running_market,
)
from tradecanvas.model import Candle, SeriesId
from tradecanvas.pipeline.commit import IngestBatch, IngestPipeline
from tradecanvas.store.sqlite import CandleStore
from tradecanvas.tools.subscribe import (
    configure_parser,
    format_pretty,
    interrupted,
    run_subscribe,
    subscribe_and_print,
)
from tradecanvas.upstream.backoff import Backoff
from tradecanvas.upstream.ws_client import parse_ws_url
from tradecanvas.wire.json import loads

T0: Final = 1751760000
REPO: Final = Path(__file__).resolve().parents[2]
WAIT_S: Final = 30  # an upper bound; a hang fails instead of blocking


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[CandleStore]:
    opened = await CandleStore.open(tmp_path / "market.sqlite3")
    await opened.upsert(SID_1M, real_candles()[:10], "ws")
    await opened.upsert(SID_5M, real_candles("5m")[:2], "derived")
    yield opened
    await opened.aclose()


async def run_client(
    url: str,
    series: list[str],
    *,
    since: int | None = None,
    batch: bool = False,
    pretty: bool = False,
    count: int | None = None,
    reconnect: bool = True,
) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with trio.fail_after(10):
        code = await subscribe_and_print(
            url,
            [SeriesId.parse(s) for s in series],
            since=since,
            batch=batch,
            pretty=pretty,
            count=count,
            out=out,
            err=err,
            reconnect=reconnect,
        )
    return code, out.getvalue(), err.getvalue()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tradecanvas subscribe")
    configure_parser(parser)
    return parser.parse_args(argv)


def test_arguments() -> None:
    args = parse_args([SID_1M, SID_5M, "--since", "1751760000", "--batch", "--count", "3"])
    assert args.series == [SID_1M, SID_5M]
    assert (args.since, args.batch, args.pretty, args.count) == (1751760000, True, False, 3)
    assert args.url == "ws://127.0.0.1:8765/ws/market"
    assert (args.events_after, args.reconnect) == (None, True)
    args = parse_args([SID_1M, "--events-after", "0", "--no-reconnect"])
    assert (args.events_after, args.reconnect) == (0, False)
    bad_ids = (["--events-after", "-1"], ["--events-after", str(2**63)], ["--events-after", "x"])
    for bad in (["--since", "1.5"], ["--since", "-1"], ["--count", "0"], *bad_ids, []):
        with pytest.raises(SystemExit):
            parse_args([SID_1M, *bad] if bad else bad)


def test_bad_series_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_subscribe(parse_args(["binance:futures:BTC/USDT:7x"])) == 2
    assert "bad timeframe '7x'" in capsys.readouterr().err


def test_parse_ws_url() -> None:
    target = parse_ws_url("ws://127.0.0.1:8765/ws/market?x=1")
    assert (target.host, target.port, target.resource, target.secure) == (
        "127.0.0.1",
        8765,
        "/ws/market?x=1",
        False,
    )
    assert parse_ws_url("wss://example.org/ws/market").port == 443
    for bad in ("http://127.0.0.1/ws/market", "ws:///ws/market", "ws://h:notaport/"):
        with pytest.raises(ValueError, match=r"ws://|host|port"):
            parse_ws_url(bad)


def test_pretty_rows_for_every_message_type() -> None:
    c = real_candles()[0]
    row = format_pretty({"type": "candle_closed", "series_id": SID_1M, "candle": c.to_wire()})
    assert row == [
        "2025-07-06 00:00:00  closed    binance:futures:BTC/USDT:1m   "
        "      108153.4        108167      108153.3        108167          20.406"
    ]
    batch = {"type": "candles_batch", "series_id": SID_1M, "candles": [c.to_wire()] * 2}
    assert len(format_pretty(batch)) == 2
    forming = format_pretty({"type": "candle_forming", "series_id": SID_1M, "candle": c.to_wire()})
    assert "forming" in forming[0]
    gap = {"type": "gap", "series_id": SID_1M, "expected_next_time": T0, "actual_time": T0 + 120}
    assert "missing 2025-07-06 00:00:00 up to 2025-07-06 00:02:00" in format_pretty(gap)[0]
    system = {"type": "system", "series_id": SID_1M, "event": "factor.rebuild", "message": "m"}
    assert format_pretty(system)[0].endswith("  m")
    error = {"type": "error", "code": "bad_request", "message": "why"}
    assert "bad_request: why" in format_pretty(error)[0]
    truncated = {"type": "events_truncated", "series_id": SID_1M, "message": "reload it"}
    assert format_pretty(truncated)[0].endswith("truncated  " + f"{SID_1M:<30}  reload it")
    assert "pong" in format_pretty({"type": "pong"})[0]


async def test_prints_one_json_message_per_line(store: CandleStore) -> None:
    async with running_market(store) as market:
        code, out, err = await run_client(
            market.url, [SID_1M, SID_5M], since=T0 + 60 * 4, batch=True, count=2
        )
    assert code == 0, err
    lines = out.splitlines()
    assert [loads(line)["type"] for line in lines] == ["candles_batch", "candles_batch"]
    first = loads(lines[0])
    assert first["series_id"] == SID_1M
    assert [c["candle_time"] for c in first["candles"]] == [T0 + 60 * i for i in range(5, 10)]
    assert loads(lines[1]) == {
        "type": "candles_batch",
        "series_id": SID_5M,
        "candles": [real_candles("5m")[1].to_wire()],
    }


async def test_pretty_prints_a_table(store: CandleStore) -> None:
    async with running_market(store) as market:
        code, out, _ = await run_client(
            market.url, [SID_1M], since=T0 + 60 * 7, pretty=True, count=2
        )
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("TIME (UTC)") and "VOLUME" in lines[0]
    assert lines[1].startswith("2025-07-06 00:08:00  closed    binance:futures:BTC/USDT:1m")
    assert lines[2].startswith("2025-07-06 00:09:00  closed")


async def test_live_candles_follow_the_catch_up_whatever_the_timing(store: CandleStore) -> None:
    result: list[tuple[int, str, str]] = []
    async with running_market(store) as market, trio.open_nursery() as nursery:

        async def client() -> None:
            result.append(await run_client(market.url, [SID_1M], since=T0 + 60 * 8, count=2))

        nursery.start_soon(client)
        await market.hub.wait_subscribers(1)
        # committed then published, before or after the subscription is registered: it
        # arrives exactly once, after the catch-up
        nxt = real_candles()[10]
        await store.upsert(SID_1M, [nxt], "ws")
        market.hub.publish_closed(SID_1M, [nxt])
    code, out, _ = result[0]
    assert code == 0
    lines = [loads(line) for line in out.splitlines()]
    assert [m["candle"]["candle_time"] for m in lines] == [T0 + 540, T0 + 600]


async def test_refused_series_exit_1_and_say_why(store: CandleStore) -> None:
    async with running_market(store) as market:
        code, out, err = await run_client(market.url, ["binance:spot:ETH/USDT:1m"])
    assert code == 1
    assert loads(out.splitlines()[0])["code"] == "unknown_series"
    assert "binance:spot:ETH/USDT:1m: unknown_series: " in err


async def test_without_reconnect_a_daemon_shutdown_ends_the_client_with_0(
    store: CandleStore,
) -> None:
    result: list[tuple[int, str, str]] = []
    async with trio.open_nursery() as nursery, running_market(store) as market:

        async def client() -> None:
            result.append(
                await run_client(market.url, [SID_1M], since=T0 + 60 * 9, reconnect=False)
            )

        nursery.start_soon(client)
        await market.hub.wait_subscribers(1)
    code, _, err = result[0]
    assert code == 0
    assert "closed the connection (1001 server shutdown)" in err


async def test_connection_problems_exit_1(store: CandleStore) -> None:
    async with running_market(store) as market:
        port = market.port
        code, _, err = await run_client(f"ws://127.0.0.1:{port}/elsewhere", [SID_1M])
        assert code == 1 and "refused the connection: HTTP 404" in err
        # the path to use, when another was given (the HTTP port's URL without it, say)
        assert f"(the path is /ws/market: ws://127.0.0.1:{port}/ws/market)" in err
        code, _, err = await run_client(f"ws://127.0.0.1:{port}", [SID_1M])
        assert code == 1 and err.endswith(
            f"refused the connection: HTTP 404 (the path is /ws/market:"
            f" ws://127.0.0.1:{port}/ws/market)\n"
        )
    code, _, err = await run_client(f"ws://127.0.0.1:{port}/ws/market", [SID_1M])
    assert code == 1 and "cannot connect" in err
    code, _, err = await run_client("http://127.0.0.1/ws/market", [SID_1M])
    assert code == 2 and "not a ws:// or wss:// URL" in err


async def test_messages_without_a_type_are_warned_of_once() -> None:
    """Pointed at Binance's stream (or the replay's) rather than a daemon's /ws/market,
    every message lacks a ``type``: printed as received, and stderr says why, once."""
    frame = '{"stream":"btcusdt@kline_1m","data":{"e":"kline","E":1751760060000}}'

    async def binance_like(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.get_message()  # the subscribe, which Binance's streams do not know
        for _ in range(3):
            await ws.send_message(frame)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            functools.partial(
                trio_websocket.serve_websocket, binance_like, "127.0.0.1", 0, ssl_context=None
            )
        )
        url = f"ws://127.0.0.1:{server.port}/market"
        code, out, err = await run_client(url, [SID_1M], count=3)
        nursery.cancel_scope.cancel()
    assert code == 0 and out.splitlines() == [frame] * 3
    assert err.count("warning") == 1
    assert err.startswith(
        'tradecanvas subscribe: warning: a message without a "type" ({"stream":"btcusdt@kline_1m"'
    )
    assert f"is {url} a tradecanvas daemon's /ws/market?" in err


@pytest.mark.e2e
async def test_the_client_as_a_subprocess(store: CandleStore) -> None:
    async with running_market(store) as market:
        done = await trio.run_process(
            [
                sys.executable,
                "-m",
                "tradecanvas.tools.subscribe",
                SID_1M,
                "--since",
                str(T0 + 60 * 7),
                "--count",
                "2",
                "--url",
                market.url,
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=REPO,
        )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode().splitlines()
    assert [loads(line)["candle"]["candle_time"] for line in lines] == [T0 + 480, T0 + 540]


def test_ctrl_c_is_recognised_alone_and_grouped_with_other_errors() -> None:
    assert interrupted(KeyboardInterrupt())
    grouped = BaseExceptionGroup("reader", [RuntimeError("cancelled"), KeyboardInterrupt()])
    assert interrupted(BaseExceptionGroup("outer", [grouped]))
    assert not interrupted(ExceptionGroup("reader", [RuntimeError("boom")]))
    assert not interrupted(SystemExit(1))


@pytest.mark.e2e
async def test_ctrl_c_exits_130_without_a_traceback(store: CandleStore) -> None:
    async with running_market(store) as market:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "tradecanvas", "subscribe", SID_1M, "--url", market.url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
        )
        assert proc.stdout is not None and proc.stderr is not None
        try:
            with trio.fail_after(WAIT_S):
                seen = b""
                while b"\n" not in seen:  # subscribed: the catch-up has arrived
                    seen += await proc.stdout.receive_some()
                proc.send_signal(signal.SIGINT)
                err = b""
                while chunk := await proc.stderr.receive_some():
                    err += chunk
                code = await proc.wait()
        finally:
            proc.kill()
    assert code == 130, err.decode()
    assert b"Traceback" not in err


@pytest.mark.e2e
async def test_tradecanvas_subscribe_cli(store: CandleStore) -> None:
    async with running_market(store) as market:
        done = await trio.run_process(
            [
                sys.executable,
                "-m",
                "tradecanvas",
                "subscribe",
                SID_1M,
                "--since",
                str(T0 + 60 * 8),
                "--batch",
                "--count",
                "1",
                "--url",
                market.url,
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=REPO,
        )
    assert done.returncode == 0, done.stderr
    message = loads(done.stdout)
    assert message["type"] == "candles_batch"
    assert [c["candle_time"] for c in message["candles"]] == [T0 + 540]


# --- across a restart of the daemon -----------------------------------------------------


@final
class Printed:
    """Lines a client prints, with a wait for the next one (in-process: its ``out``; a
    subprocess: a reader task feeds it)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._more = trio.Event()
        self._partial = ""

    def write(self, text: str) -> int:
        *complete, self._partial = (self._partial + text).split("\n")
        if complete:
            self.lines.extend(complete)
            self._more.set()
            self._more = trio.Event()
        return len(text)

    def flush(self) -> None:
        pass

    async def wait_for(self, condition: Callable[[list[Any]], bool]) -> None:
        with trio.fail_after(WAIT_S):
            while not condition([loads(line) for line in self.lines]):
                await self._more.wait()


def closed_of(messages: list[Any]) -> list[int]:
    return closed_times([m for m in messages if isinstance(m, dict)])


def event_ids_of(messages: list[Any]) -> list[int]:
    return [m["event_id"] for m in messages if m.get("type") == "system"]


async def _restart_scenario(tmp_path: Path, client: RestartClient) -> None:
    """Candles and events arrive before, during and after the daemon is down; the client's
    output has each exactly once, in order (``client`` runs it and feeds ``Printed``)."""
    minutes = list(real_candles()[:17])
    t = [c.candle_time for c in minutes]
    store = await CandleStore.open(tmp_path / "restart.sqlite3")
    printed = Printed()

    def pipeline_to(target: Any) -> IngestPipeline:
        return IngestPipeline(store, target, [], "fp")

    async def commit(target: Any, candles: list[Candle], publish: bool) -> list[int]:
        pipeline = pipeline_to(target)
        result = await pipeline.run(IngestBatch.of(SERIES_1M, candles, "ws"))
        if publish:
            pipeline.publish(result, best_effort=False)
        return [e.event_id for e in result.events if e.event_id is not None]

    def revised(c: Candle) -> Candle:
        return attrs.evolve(c, volume=c.volume + 1)

    try:
        (new_series,) = await commit(RecordingTarget(), minutes[:10], publish=False)
        async with trio.open_nursery() as nursery:
            async with running_market(store) as first:
                port = first.port
                done = await nursery.start(client, first.url, printed)
                # the catch-up: the stored event first, then the candles after since
                await printed.wait_for(lambda m: len(closed_of(m)) == 5)
                (live_revision,) = await commit(first.hub, [revised(minutes[3])], publish=True)
                await printed.wait_for(lambda m: event_ids_of(m) == [new_series, live_revision])
            # the daemon is down: candles and a revision are committed meanwhile
            (missed_revision,) = await commit(RecordingTarget(), [revised(minutes[4])], False)
            await commit(RecordingTarget(), minutes[10:15], publish=False)
            async with running_market(store, ws_port=port) as second:
                await printed.wait_for(lambda m: len(closed_of(m)) == 10)
                await commit(second.hub, minutes[15:], publish=True)
                with trio.fail_after(WAIT_S):
                    await done.wait()
    finally:
        await store.aclose()
    messages = [loads(line) for line in printed.lines]
    assert closed_of(messages) == t[5:]
    assert event_ids_of(messages) == [new_series, live_revision, missed_revision]
    assert [m for m in messages if m["type"] not in ("candle_closed", "system")] == []


class RestartClient(Protocol):
    async def __call__(
        self, url: str, printed: Printed, *, task_status: trio.TaskStatus[trio.Event]
    ) -> None: ...


async def test_the_cursor_survives_a_daemon_restart(tmp_path: Path) -> None:
    errors = io.StringIO()

    async def client(
        url: str, printed: Printed, *, task_status: trio.TaskStatus[trio.Event]
    ) -> None:
        done = trio.Event()
        task_status.started(done)
        code = await subscribe_and_print(
            url,
            [SERIES_1M],
            since=T0 + 60 * 4,
            events_after=0,
            batch=False,
            pretty=False,
            count=15,  # 12 candles and 3 events
            out=cast("TextIO", printed),
            err=errors,
            backoff=Backoff(base_s=0.05, cap_s=0.2),
        )
        assert code == 0, errors.getvalue()
        done.set()

    await _restart_scenario(tmp_path, client)
    assert "connection closed: 1001 server shutdown; reconnecting" in errors.getvalue()
    assert "reconnected; resuming 1 series" in errors.getvalue()


@pytest.mark.e2e
async def test_the_cli_keeps_its_cursor_across_a_daemon_restart(tmp_path: Path) -> None:
    async def client(
        url: str, printed: Printed, *, task_status: trio.TaskStatus[trio.Event]
    ) -> None:
        done = trio.Event()
        args = [SID_1M, "--since", str(T0 + 60 * 4), "--events-after", "0", "--count", "15"]
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "tradecanvas", "subscribe", *args, "--url", url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
        )
        assert proc.stdout is not None
        task_status.started(done)
        try:
            while chunk := await proc.stdout.receive_some():
                printed.write(chunk.decode())
            assert await proc.wait() == 0
        finally:
            proc.kill()
        done.set()

    await _restart_scenario(tmp_path, client)
