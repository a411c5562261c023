"""Metrics: the delivery timing rules without I/O, and the real ``tradecanvas serve`` showing
the delivery latency, the queue high-water mark and the watchdog ping age on /metrics after
traffic on both ports."""

from __future__ import annotations

import math
import re
import signal
import socket
from pathlib import Path
from typing import Final

import httpx
import pytest
import trio

from tests.cli_rig import cli_env, run_cli, wait_for_line
from tests.conftest import REPO, binance_data_dir
from tests.serve.test_ws_server import closed_times, connect, until_pong
from tradecanvas.ops.metrics import DISCONNECT_REASONS, DeliveryTimer, Metrics, SubscriberSample
from tradecanvas.wire.json import dumps, loads

WEEK: Final = "klines_1m_5m/futures_um/BTCUSDT-1m-2025-07-06_2025-07-12.csv"
BASE: Final = "binance:futures:BTC/USDT:1m"
# --start-at 30: the first bar the replay streams (the ones before it are REST history)
LIVE_FROM: Final = 1751760000 + 30 * 60


def samples(metrics_text: str, name: str) -> dict[str, float]:
    """The unlabelled samples of ``name`` (its _count, _sum or itself) in an exposition."""
    found = {}
    for line in metrics_text.splitlines():
        if line.startswith(name) and not line.startswith("#") and "{" not in line:
            key, value = line.rsplit(" ", 1)
            found[key] = float(value)
    return found


def observed(metrics: Metrics) -> tuple[float, float]:
    found = samples(metrics.render().decode(), "tradecanvas_delivery_latency_seconds")
    return (
        found["tradecanvas_delivery_latency_seconds_count"],
        found["tradecanvas_delivery_latency_seconds_sum"],
    )


def test_a_batch_is_timed_when_its_last_owing_subscriber_has_sent_it() -> None:
    metrics = Metrics()
    timer: DeliveryTimer = metrics.delivery
    clock = iter([10.0, 20.0, 30.0]).__next__
    with timer.publishing(1.0, clock):
        batch = timer.current
        assert batch is not None
        timer.sent_at_once(batch, 2.0)
        batch.owed = 2  # two subscribers queued it
    assert observed(metrics) == (0, 0)  # still owed
    timer.settle([batch], 4.0)
    assert observed(metrics) == (0, 0)
    timer.settle([batch], 6.0)
    assert observed(metrics) == (1, 5.0)  # received at 1.0, the last send at 6.0
    assert timer.current is None


def test_an_abandoned_subscriber_does_not_hold_the_figure_up() -> None:
    metrics = Metrics()
    timer = metrics.delivery
    with timer.publishing(1.0, lambda: 2.0):
        batch = timer.current
        assert batch is not None
        batch.owed = 2
    timer.settle([batch], 3.0)
    timer.abandon([batch])  # closed before it sent: the figure is the others' last send
    assert observed(metrics) == (1, 2.0)


def test_a_batch_that_reached_nobody_or_came_from_no_frame_is_not_timed() -> None:
    metrics = Metrics()
    timer = metrics.delivery
    with timer.publishing(1.0, lambda: 2.0):
        pass  # no subscriber
    with timer.publishing(None, lambda: 2.0):
        untimed = timer.current
    assert untimed is None
    with timer.publishing(1.0, lambda: 2.0):
        batch = timer.current
        assert batch is not None
        batch.owed = 1
    timer.abandon([batch])
    assert observed(metrics) == (0, 0)


def test_written_at_once_it_is_timed_at_the_end_of_the_publish() -> None:
    metrics = Metrics()
    timer = metrics.delivery
    with timer.publishing(1.0, lambda: 1.5):
        batch = timer.current
        assert batch is not None
        timer.sent_at_once(batch, 1.25)
    assert observed(metrics) == (1, 0.5)


def test_the_new_metrics_are_exposed_before_any_traffic() -> None:
    text = Metrics().render().decode()
    assert "# TYPE tradecanvas_delivery_latency_seconds histogram" in text
    assert samples(text, "tradecanvas_subscriber_queue_high_water") == {
        "tradecanvas_subscriber_queue_high_water": 0.0
    }
    age = samples(text, "tradecanvas_watchdog_last_ping_age_seconds")
    assert math.isnan(age["tradecanvas_watchdog_last_ping_age_seconds"])


def test_the_disconnect_reasons_the_alerts_count_are_there_before_the_first_one() -> None:
    """increase() does not count a series' first sample: a reason that appears only with
    its first disconnect would hide that one (and a whole first burst) from the alert."""
    text = Metrics().render().decode()
    for reason in DISCONNECT_REASONS:
        assert f'tradecanvas_subscriber_disconnects_total{{reason="{reason}"}} 0.0' in text
    passed = {
        reason
        for path in (REPO / "tradecanvas" / "serve").glob("*.py")
        for reason in re.findall(r'disconnect_reason="(\w+)"', path.read_text())
    }
    assert "slow_consumer" in passed  # the source pattern still matches
    assert passed <= set(DISCONNECT_REASONS)


def test_process_start_time_and_role_info_are_exposed() -> None:
    metrics = Metrics()
    metrics.role_info.labels(role="edge").set(1)
    text = metrics.render().decode()
    assert samples(text, "process_start_time_seconds")["process_start_time_seconds"] > 0
    assert 'tradecanvas_role_info{role="edge"} 1.0' in text


def buckets(text: str, name: str) -> dict[str, float]:
    """``le`` → value of a (gauge) histogram's buckets in an exposition."""
    found = {}
    for line in text.splitlines():
        if match := re.fullmatch(name + r'_bucket\{le="([^"]+)"\} (\S+)', line):
            found[match.group(1)] = float(match.group(2))
    return found


def test_subscriber_statistics_are_gauge_histograms_over_the_subscribers_at_a_scrape() -> None:
    metrics = Metrics()
    assert "tradecanvas_subscriber_queue_depth" not in metrics.render().decode()  # no source
    metrics.subscriber_statistics.source = lambda: [
        SubscriberSample(queued=0, lagging=False, in_flight_bytes=0, behind_s=0.0),
        SubscriberSample(queued=3, lagging=False, in_flight_bytes=70_000, behind_s=0.4),
        SubscriberSample(queued=900, lagging=True, in_flight_bytes=131_072, behind_s=12.0),
    ]
    text = metrics.render().decode()
    depth = buckets(text, "tradecanvas_subscriber_queue_depth")
    assert (depth["0"], depth["4"], depth["1024"], depth["+Inf"]) == (1, 2, 3, 3)
    in_flight = buckets(text, "tradecanvas_subscriber_in_flight_bytes")
    assert (in_flight["0"], in_flight["65536"], in_flight["131072"]) == (1, 1, 3)
    behind = buckets(text, "tradecanvas_subscriber_behind_seconds")
    assert (behind["0"], behind["0.5"], behind["10"], behind["30"]) == (1, 2, 2, 3)
    assert samples(text, "tradecanvas_subscriber_queue_depth_gsum") == {
        "tradecanvas_subscriber_queue_depth_gsum": 903.0
    }
    assert samples(text, "tradecanvas_subscribers_lagging") == {
        "tradecanvas_subscribers_lagging": 1.0
    }
    assert 'tradecanvas_slow_consumer_closes_total{cause="stalled"} 0.0' in text


@pytest.mark.e2e
async def test_serve_shows_delivery_queue_and_watchdog_metrics_after_traffic(
    tmp_path: Path,
) -> None:
    notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await notify.bind(str(tmp_path / "notify.sock"))
    csv = binance_data_dir() / WEEK
    with (
        notify,
        run_cli(
            ["replay", "--speed", "120", "--start-at", "30", "--paused", str(csv)],
            cli_env(),
            tmp_path / "replay.log",
        ) as replay,
    ):
        found = await wait_for_line(tmp_path / "replay.log", r"replay ws=(\S+) rest=(\S+)", replay)
        env = cli_env(
            TRADE_CANVAS_DB_PATH=str(tmp_path / "m.sqlite3"),
            TRADE_CANVAS_BINANCE_FUTURES_WS_URL=found.group(1),
            TRADE_CANVAS_BINANCE_FUTURES_REST_URL=found.group(2),
            TRADE_CANVAS_INITIAL_BACKFILL_CANDLES="30",
            NOTIFY_SOCKET=str(tmp_path / "notify.sock"),
            WATCHDOG_USEC="2000000",
        )
        with run_cli(["serve"], env, tmp_path / "serve.log") as serve:
            match = await wait_for_line(
                tmp_path / "serve.log",
                r"ready ws=ws://[\d.]+:(\d+)/ws/market http=http://[\d.]+:(\d+)",
                serve,
            )
            ws_port, http_port = int(match.group(1)), int(match.group(2))
            subscribe = dumps({"type": "subscribe", "series_id": BASE, "since": None})
            async with (
                connect(ws_port) as ws,
                connect(http_port) as via_http,
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as http,
            ):
                for client in (ws, via_http):
                    await client.send_message(subscribe)
                    await until_pong(client)  # caught up
                replay.send_signal(signal.SIGUSR1)
                for client in (ws, via_http):
                    with trio.fail_after(30):
                        newest = 0
                        while newest < LIVE_FROM + 4 * 60:  # 5 live closes (the WS ones)
                            message = loads(await client.get_message())
                            newest = max([newest, *closed_times([message])])
                text = (await http.get("/metrics")).text
    delivery = samples(text, "tradecanvas_delivery_latency_seconds")
    assert delivery["tradecanvas_delivery_latency_seconds_count"] >= 5
    assert delivery["tradecanvas_delivery_latency_seconds_sum"] > 0
    buckets = re.findall(r'tradecanvas_delivery_latency_seconds_bucket\{le="\+Inf"\} (\S+)', text)
    assert float(buckets[0]) == delivery["tradecanvas_delivery_latency_seconds_count"]
    # the catch-up was queued: each subscriber's queue held at least one message
    high = samples(text, "tradecanvas_subscriber_queue_high_water")
    assert high["tradecanvas_subscriber_queue_high_water"] >= 1
    age = samples(text, "tradecanvas_watchdog_last_ping_age_seconds")
    assert 0 <= age["tradecanvas_watchdog_last_ping_age_seconds"] <= 2.0
