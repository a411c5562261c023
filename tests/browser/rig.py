"""The browser tests' rig: a real ``tradecanvas replay`` of real Binance candles, a real
``tradecanvas serve`` against it, and headless Chromium (the distribution's ``chromium``
package, driven by Playwright for Python; Playwright's own browsers are never downloaded).

Everything here is synchronous: Playwright's sync API drives the browser, the CLI runs in
subprocesses (``tests.cli_rig``), and the waits are on a child's log line or on the chart's
own data (``page.wait_for_function``), never on a sleep."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Final

import attrs
import httpx
from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright, sync_playwright

from tests.cli_rig import cli_env, run_cli
from tests.conftest import REPO, binance_data_dir

WEEK: Final = "klines_1m_5m/futures_um/BTCUSDT-1m-2025-07-06_2025-07-12.csv"
WEEK_5M: Final = "klines_1m_5m/futures_um/BTCUSDT-5m-2025-07-06_2025-07-12.csv"
BASE: Final = "binance:futures:BTC/USDT:1m"
FIVE: Final = "binance:futures:BTC/USDT:5m"
HOUR: Final = "binance:futures:BTC/USDT:1h"
TOKEN: Final = "browser-test-ingest-token-0123456789"
# the distribution's Chromium (Debian: apt-get install chromium; .ci/run installs it)
CHROMIUM: Final = os.environ.get("TRADECANVAS_TEST_CHROMIUM", "/usr/bin/chromium")
# screenshots of the pages under test, kept for a person to look at (gitignored)
ARTIFACTS: Final = REPO / "test-artifacts"
WAIT_S: Final = 60.0  # a wait for the daemon or the page; a healthy run needs a few seconds
WAIT_MS: Final = WAIT_S * 1000
HISTORY: Final = 1440  # the first UTC day: REST history the daemon backfills
STREAMED: Final = 30  # then streamed, live to the page
TC: Final = "window.tradecanvasChart"  # the page's test hooks (docs/chart.md)
# what #announce says, and whether a change of the badge was inside its aria-hidden detail
WATCH: Final = """() => {
  window.said = []; window.badgeChanges = [];
  const announce = document.getElementById('announce');
  new MutationObserver(() => window.said.push(announce.textContent))
    .observe(announce, {childList: true, characterData: true, subtree: true});
  const inHidden = (n) =>
    (n.nodeType === 1 ? n : n.parentElement).closest('[aria-hidden="true"]') !== null;
  new MutationObserver((records) => records.forEach(
      (r) => window.badgeChanges.push(inHidden(r.target))))
    .observe(document.getElementById('state'),
             {childList: true, characterData: true, subtree: true});
}"""
# the badge shows its whole text (a long one is cut at its end, with an ellipsis)
WHOLE: Final = (
    "() => { const b = document.getElementById('state'); return b.scrollWidth <= b.clientWidth; }"
)


@attrs.frozen
class Bar:
    time: int
    open: float
    high: float
    low: float
    close: float
    volume: float

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Bar:
        time_ = d["time"] if "time" in d else d["candle_time"]
        return cls(time_, d["open"], d["high"], d["low"], d["close"], d["volume"])


def read_bars(path: Path, count: int | None = None) -> list[Bar]:
    """The bars of a data.binance.vision kline CSV (prices as the nearest double, which is
    what the daemon's JSON carries)."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))[:count]
    return [
        Bar(
            int(r["open_time"]) // 1000,
            float(r["open"]),
            float(r["high"]),
            float(r["low"]),
            float(r["close"]),
            float(r["volume"]),
        )
        for r in rows
    ]


def trimmed_week(tmp_path: Path, bars: int) -> tuple[Path, list[Bar]]:
    """The first ``bars`` rows of the real futures week, as a test input in tmp_path."""
    with (binance_data_dir() / WEEK).open(newline="") as f:
        rows = list(csv.reader(f))
    path = tmp_path / "BTCUSDT-1m-trimmed.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([rows[0], *rows[1 : bars + 1]])
    return path, read_bars(path)


def wait_for_line(log: Path, pattern: str, proc: subprocess.Popen[bytes]) -> re.Match[str]:
    """Wait for a line in a child's log file (polled: a child must never block on a pipe)."""
    deadline = time.monotonic() + WAIT_S
    while (match := re.search(pattern, log.read_text())) is None:
        assert proc.poll() is None, f"{log.name} exited {proc.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no {pattern!r} in {log.name}:\n{log.read_text()}"
        time.sleep(0.02)  # polling the log file for the line, not waiting out a race
    return match


def free_port() -> int:
    """A loopback port nobody listens on (for a daemon that must come back on the same one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports() -> tuple[int, int]:
    """Two distinct loopback ports nobody listens on, found together: the daemon's WS port
    on 0 could otherwise be given the HTTP port picked a moment before (it was, once)."""
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        return int(a.getsockname()[1]), int(b.getsockname()[1])


@attrs.define
class Market:
    """A replay and a daemon serving it; ``http_url`` is the page's origin."""

    tmp_path: Path
    stack: ExitStack
    replay: subprocess.Popen[bytes]
    replay_ws: str
    replay_rest: str
    publish: str
    http_port: int
    ws_port: int
    extra_env: dict[str, str] = attrs.Factory(dict)
    serve: subprocess.Popen[bytes] | None = None
    http_url: str = ""
    starts: int = 0

    def start_serve(self) -> None:
        self.starts += 1
        log = self.tmp_path / f"serve-{self.starts}.log"
        defaults = {
            "TRADE_CANVAS_DB_PATH": str(self.tmp_path / "market.sqlite3"),
            "TRADE_CANVAS_HTTP_PORT": str(self.http_port),
            "TRADE_CANVAS_WS_PORT": str(self.ws_port),
            "TRADE_CANVAS_BINANCE_FUTURES_WS_URL": self.replay_ws,
            "TRADE_CANVAS_BINANCE_FUTURES_REST_URL": self.replay_rest,
            "TRADE_CANVAS_BINANCE_SPOT_WS_URL": self.replay_ws,
            "TRADE_CANVAS_BINANCE_SPOT_REST_URL": self.replay_rest,
            "TRADE_CANVAS_ENABLE_INGEST_WS_PIPELINE_PUBLISH": self.publish,
            "TRADE_CANVAS_INITIAL_BACKFILL_CANDLES": "1440",
            "TRADE_CANVAS_DERIVED_TIMEFRAMES": "5m,1h",
            "TRADE_CANVAS_INGEST_TOKEN": TOKEN,
        }
        env = cli_env(**(defaults | self.extra_env))  # a test's own settings win
        self.serve = self.stack.enter_context(run_cli(["serve"], env, log))
        ready = wait_for_line(log, r"tradecanvas ready ws=\S+ http=(\S+)", self.serve)
        self.http_url = ready.group(1)

    def stop_serve(self) -> int:
        assert self.serve is not None
        self.serve.send_signal(signal.SIGTERM)
        return self.serve.wait(timeout=WAIT_S)

    def resume_replay(self) -> None:
        self.replay.send_signal(signal.SIGUSR1)
        wait_for_line(self.tmp_path / "replay.log", r"replay resumed", self.replay)

    def get(self, path: str, **params: str | int) -> Any:
        answer = httpx.get(f"{self.http_url}{path}", params=params, timeout=WAIT_S)
        answer.raise_for_status()
        return answer.json()

    def stored(self, series_id: str) -> list[Bar]:
        """Every stored closed candle of a series, ascending: paged forward from ``since=0``
        (without ``since`` the API answers the newest ``limit`` only)."""
        found: list[Bar] = []
        since = 0
        while True:
            page = self.get("/api/market/candles", series_id=series_id, limit=5000, since=since)[
                "candles"
            ]
            found += [Bar.from_json(c) for c in page]
            if len(page) < 5000:
                return found
            since = page[-1]["candle_time"]

    def ingest(self, series_id: str, bar: Bar) -> None:
        """The HTTP write path (the page has none): one closed candle, committed and published."""
        answer = httpx.post(
            f"{self.http_url}/api/market/ingest/candle_closed",
            json={"series_id": series_id, "candle": {"candle_time": bar.time, **_ohlcv(bar)}},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=WAIT_S,
        )
        assert answer.status_code == 200, answer.text


def _ohlcv(bar: Bar) -> dict[str, str]:
    return {k: repr(getattr(bar, k)) for k in ("open", "high", "low", "close", "volume")}


@contextmanager
def market(
    tmp_path: Path, data: Path | str, *replay_args: str, publish: str = "1", **serve_env: str
) -> Iterator[Market]:
    """``tradecanvas replay DATA --paused`` and ``tradecanvas serve`` against it (with
    ``serve_env`` added to its environment; DATA may be ``SERIES_ID=FILE``)."""
    with ExitStack() as stack:
        replay = stack.enter_context(
            run_cli(
                ["replay", str(data), "--paused", "--speed", "max", *replay_args],
                cli_env(),
                tmp_path / "replay.log",
            )
        )
        found = wait_for_line(tmp_path / "replay.log", r"replay ws=(\S+) rest=(\S+)", replay)
        m = Market(
            tmp_path,
            stack,
            replay,
            found.group(1),
            found.group(2),
            publish,
            *free_ports(),
            serve_env,
        )
        m.start_serve()
        yield m


@contextmanager
def replayed_day(
    tmp_path: Path,
    *replay_args: str,
    minutes: int = HISTORY + STREAMED,
    start_at: int | None = HISTORY,
    publish: str = "1",
    **serve_env: str,
) -> Iterator[tuple[Market, list[Bar]]]:
    """``market`` over the first ``minutes`` of the real week, the replay paused at
    ``start_at`` (the daemon backfills the minutes before it; None: no ``--start-at``), and
    the bars the replay holds."""
    data, bars = trimmed_week(tmp_path, minutes)
    start = () if start_at is None else ("--start-at", str(start_at))
    with market(tmp_path, data, *start, *replay_args, publish=publish, **serve_env) as m:
        yield m, bars


@attrs.define
class ChartPage:
    """The chart page in a browser tab, with what the tab logged and requested."""

    page: Page
    origin: str
    console_errors: list[str] = attrs.Factory(list)
    requests: list[str] = attrs.Factory(list)

    def open(self, series_id: str | None = None) -> None:
        query = "" if series_id is None else f"?series={series_id}"
        self.page.goto(f"{self.origin}/{query}")
        self.wait_until("() => window.tradecanvasChart && window.tradecanvasChart.ready()")

    def wait_until(self, predicate: str, arg: Any = None) -> Any:
        """Wait until a JS predicate (over window.tradecanvasChart) holds; its value."""
        return self.page.wait_for_function(predicate, arg=arg, timeout=WAIT_MS).json_value()

    def wait_live(self) -> None:
        self.wait_until("() => window.tradecanvasChart.state() === 'live'")

    def bars(self, series_id: str) -> list[Bar]:
        raw = self.page.evaluate("(sid) => window.tradecanvasChart.data(sid)", series_id)
        return [Bar.from_json(b) for b in raw]

    def call(self, expression: str, arg: Any = None) -> Any:
        return self.page.evaluate(expression, arg)

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path


@contextmanager
def chromium() -> Iterator[Browser]:
    """Headless Chromium from the distribution's package."""
    if shutil.which(CHROMIUM) is None:
        raise RuntimeError(
            f"no Chromium at {CHROMIUM}: apt-get install chromium (.ci/run does), or set"
            " TRADECANVAS_TEST_CHROMIUM to its path"
        )
    with sync_playwright() as p:
        browser = launch(p)
        try:
            yield browser
        finally:
            browser.close()


def launch(p: Playwright) -> Browser:
    return p.chromium.launch(executable_path=CHROMIUM, headless=True)


@contextmanager
def chart_page(
    browser: Browser, origin: str, *, timing: dict[str, int] | None = None, **device: Any
) -> Iterator[ChartPage]:
    """A tab on ``origin``; ``device`` are Playwright context options (a phone's viewport,
    ``has_touch``, …; a 1280×720 desktop window without), ``timing`` the page's connection
    timings in ms (``window.tradecanvasTiming``: ``heartbeatMs``, ``pongTimeoutMs``, …)."""
    context = browser.new_context(**({"viewport": {"width": 1280, "height": 720}} | device))
    if timing is not None:
        context.add_init_script(f"window.tradecanvasTiming = {json.dumps(timing)};")
    page = context.new_page()
    chart = ChartPage(page, origin)

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            chart.console_errors.append(f"{message.text} ({message.location})")

    page.on("console", on_console)
    page.on("pageerror", lambda exc: chart.console_errors.append(f"uncaught: {exc}"))
    page.on("request", lambda request: chart.requests.append(request.url))
    try:
        yield chart
    finally:
        context.close()


@contextmanager
def live_chart(
    tmp_path: Path,
    browser: Browser,
    *replay_args: str,
    minutes: int = HISTORY + STREAMED,
    start_at: int | None = HISTORY,
    series: str = BASE,
    streamed: bool = True,
    newest: bool = False,
    clock: bool = False,
    timing: dict[str, int] | None = None,
    device: dict[str, Any] | None = None,
    serve_env: dict[str, str] | None = None,
) -> Iterator[tuple[Market, ChartPage, list[Bar]]]:
    """``replayed_day`` and a tab (``chart_page`` with ``timing`` and ``device``) showing
    ``series`` live.

    ``streamed``: the replay is resumed before the page opens; without it the replay stays
    paused (no market data) and the test resumes it. ``newest``: also wait until the page
    holds the replay's last bar. ``clock``: the page's clock is Playwright's, installed before
    the page opens (it runs as the real one until the test moves it)."""
    with (
        replayed_day(
            tmp_path, *replay_args, minutes=minutes, start_at=start_at, **(serve_env or {})
        ) as (m, bars),
        chart_page(browser, m.http_url, timing=timing, **(device or {})) as chart,
    ):
        if clock:
            chart.page.clock.install()
        if streamed:
            m.resume_replay()
        chart.open(series)
        chart.wait_live()
        if newest:
            chart.wait_until(f"(t) => {TC}.lastClosed() === t", bars[-1].time)
        yield m, chart, bars


# the first minute a chart opened by ``late_history_chart`` has stored: 2025-07-06 08:00, a
# Sunday, inside a day, a week, a month and a 3-day bar of any phase
LATE_HISTORY_START: Final = 1_751_788_800


@contextmanager
def late_history_chart(tmp_path: Path, browser: Browser, derived: str) -> Iterator[ChartPage]:
    """``live_chart`` of a store whose history starts at 08:00 (12 hours of REST history
    before 20:00), deriving ``derived``, once the day's last streamed bar is shown (the
    stream ends before the next day)."""
    with live_chart(
        tmp_path,
        browser,
        minutes=1260,
        start_at=1200,
        streamed=False,
        serve_env={
            "TRADE_CANVAS_INITIAL_BACKFILL_CANDLES": "720",
            "TRADE_CANVAS_DERIVED_TIMEFRAMES": derived,
        },
    ) as (m, chart, bars):
        m.resume_replay()
        chart.wait_until(f"(t) => {TC}.lastClosed() === t", bars[-1].time)
        assert m.stored(BASE)[0].time == LATE_HISTORY_START
        yield chart
