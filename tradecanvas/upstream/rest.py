"""Binance REST: klines (paged), server time and rate limits, over one shared httpx client.

Every request to a host goes through that host's gate, which keeps the request weight
under Binance's per-minute limit (``X-MBX-USED-WEIGHT-1M``) and holds every caller while a
``Retry-After`` from a 429 or 418 runs. Errors are translated once, here::

    httpx.TimeoutException, httpx.TransportError ─ retried with backoff ─▶ UpstreamError
    HTTP 5xx (outcome unknown at Binance)        ─ retried with backoff ─▶ UpstreamError
    HTTP 429 / 418                               ─ wait Retry-After, retry; a ban longer than
                                                   RestPolicy.max_wait_s ─▶ UpstreamError at
                                                   once (every caller, until it ends); its
                                                   end kept across restarts (BanMemory)
    any other HTTP status (400 bad symbol, 403 WAF, …)              ─▶ UpstreamError at once
    a body that is not Binance's JSON                                ─▶ WireError (codec)

Waiting uses trio's clock (a timeout, not exchange time); the weight window's end is taken
from the response's ``Date`` header, which is Binance's clock.
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Final, Protocol, final

import attrs
import httpx
import trio

from tradecanvas.errors import TradeCanvasError, UpstreamError, WireError
from tradecanvas.model import CLOCK_SKEW_S, MS, Candle, Market, SeriesId
from tradecanvas.ops.metrics import Metrics
from tradecanvas.runtime_flags import RuntimeFlags
from tradecanvas.upstream.backoff import Backoff
from tradecanvas.wire.binance import decode_wire_json
from tradecanvas.wire.binance_rest import decode_rest_klines

log = logging.getLogger(__name__)

KLINES_PATH: Final[Mapping[Market, str]] = {"futures": "/fapi/v1/klines", "spot": "/api/v3/klines"}
TIME_PATH: Final[Mapping[Market, str]] = {"futures": "/fapi/v1/time", "spot": "/api/v3/time"}
EXCHANGE_INFO_PATH: Final[Mapping[Market, str]] = {
    "futures": "/fapi/v1/exchangeInfo",
    "spot": "/api/v3/exchangeInfo",
}
KLINES_LIMIT: Final[Mapping[Market, int]] = {"futures": 1500, "spot": 1000}
# REQUEST_WEIGHT per minute Binance commonly grants; refined by load_rate_limits()
DEFAULT_WEIGHT_LIMIT: Final[Mapping[Market, int]] = {"futures": 2400, "spot": 6000}
WEIGHT_HEADER: Final = "x-mbx-used-weight-1m"
# Binance's defaults when a 429/418 comes without a usable Retry-After
DEFAULT_RETRY_AFTER_S: Final[Mapping[int, float]] = {429: 60.0, 418: 120.0}
EXCHANGE_INFO_WEIGHT: Final[Mapping[Market, int]] = {"futures": 1, "spot": 20}
TIME_WEIGHT: Final = 1


def klines_weight(market: Market, limit: int) -> int:
    """The request weight of one klines call (BINANCE.md)."""
    if market == "spot":
        return 2
    if limit < 100:
        return 1
    if limit < 500:
        return 2
    if limit <= 1000:
        return 5
    return 10


@attrs.frozen
class RestPolicy:
    """Retry and pacing settings (constants, not flags: Binance's rules, not the user's)."""

    max_attempts: int = 6  # per request; 429/418 waits count too
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    concurrency: int = 2  # requests in flight per host
    weight_budget: float = 0.8  # of the per-minute limit; the rest is for other tools on the IP
    max_wait_s: float = 300.0  # a longer Retry-After is a ban: fail fast until it ends

    @property
    def backoff(self) -> Backoff:
        return Backoff(self.backoff_base_s, self.backoff_cap_s)


@attrs.frozen
class RestStatistics:
    requests: int
    retries: int
    rate_limited: int  # 429 answers
    banned: int  # 418 answers
    weight_waits: int  # times a request waited for the weight window to roll over
    used_weight: Mapping[str, int]  # last X-MBX-USED-WEIGHT-1M per market
    weight_limit: Mapping[str, int]  # REQUEST_WEIGHT per minute in use, per market


@attrs.define
class _HostGate:
    """Weight and ban bookkeeping for one Binance host (per IP at Binance)."""

    weight_limit: int
    limiter: trio.CapacityLimiter
    used: int = 0
    reserved: int = 0
    window_resets_at: float | None = None  # trio time the server's minute rolls over
    blocked_until: float = 0.0  # trio time a Retry-After ends


def _seconds_left_in_minute(date_header: str | None) -> float:
    """Seconds until Binance's next minute, from its ``Date`` header (1 s resolution, so
    rounded up)."""
    if date_header:
        try:
            second = email.utils.parsedate_to_datetime(date_header).second
        except (TypeError, ValueError):
            return 60.0
        return float(60 - second) + 1.0
    return 60.0


def closed_by(response: httpx.Response) -> float:
    """Unix seconds a kline must have ended by to be closed, for rows of ``response``:
    Binance's clock, its ``Date`` header (whole seconds, rounded down; bars end on whole
    seconds, so one that had ended when Binance answered has ended by it). Without a
    usable ``Date``, this machine's clock plus CLOCK_SKEW_S (only bars ahead of it are
    then told apart)."""
    date = response.headers.get("date")
    if date:
        try:
            return email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError, OverflowError):
            pass
    return time.time() + CLOCK_SKEW_S


def _retry_after(response: httpx.Response) -> float:
    text = response.headers.get("retry-after", "")
    try:
        value = float(text)
    except ValueError:
        return DEFAULT_RETRY_AFTER_S[response.status_code]
    return max(0.0, value)


class BanMemory(Protocol):
    """Where the end (unix seconds) of a Retry-After survives a restart (the store's meta
    table): a 418 ban's, and a 429's, since asking again inside a 429 earns a 418."""

    async def load(self) -> Mapping[Market, float]: ...

    async def save(self, market: Market, until_unix: float) -> None: ...


HTTP_TIMEOUT_S: Final = 10.0


@contextlib.asynccontextmanager
async def open_rest_client(
    flags: RuntimeFlags,
    *,
    metrics: Metrics | None = None,
    policy: RestPolicy | None = None,
    bans: BanMemory | None = None,
) -> AsyncIterator[BinanceRestClient]:
    """The daemon's and the tools' Binance REST client: one ``httpx.AsyncClient`` (closed on
    exit) for the flags' REST base URLs, with any ban a previous run was given restored."""
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(HTTP_TIMEOUT_S), headers={"user-agent": "tradecanvas"}
    ) as http:
        client = BinanceRestClient.from_flags(
            http, flags, metrics=metrics, policy=policy, bans=bans
        )
        await client.restore_bans()
        yield client


@final
class BinanceRestClient:
    """Owns Binance REST access for the daemon: one shared ``httpx.AsyncClient`` (passed in;
    the caller owns its lifetime), one gate per market host.

    Raises UpstreamError when retries do not cure a failure and WireError for a malformed
    body; never raises httpx errors.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        base_urls: Mapping[Market, str],
        *,
        metrics: Metrics | None = None,
        policy: RestPolicy | None = None,
        bans: BanMemory | None = None,
    ) -> None:
        self.http = http
        self.bans = bans
        self.base_urls = {m: url.rstrip("/") for m, url in base_urls.items()}
        self.metrics = metrics
        self.policy = policy or RestPolicy()
        self._gates: dict[Market, _HostGate] = {}
        self._requests = 0
        self._retries = 0
        self._rate_limited = 0
        self._banned = 0
        self._weight_waits = 0

    @classmethod
    def from_flags(
        cls,
        http: httpx.AsyncClient,
        flags: RuntimeFlags,
        *,
        metrics: Metrics | None = None,
        policy: RestPolicy | None = None,
        bans: BanMemory | None = None,
    ) -> BinanceRestClient:
        return cls(
            http,
            {"futures": flags.binance_futures_rest_url, "spot": flags.binance_spot_rest_url},
            metrics=metrics,
            policy=policy,
            bans=bans,
        )

    async def restore_bans(self) -> None:
        """Honour a Retry-After (a 418 ban, or a 429) a previous run of the daemon was given
        and that still runs: asking again inside a 429 earns a ban, inside a ban lengthens
        it."""
        if self.bans is None:
            return
        for market, until_unix in (await self.bans.load()).items():
            left = until_unix - time.time()  # a ban ends in wall-clock time
            if left > 0:
                gate = self._gate(market)
                gate.blocked_until = max(gate.blocked_until, trio.current_time() + left)
                log.warning(
                    "Binance %s REST: a Retry-After (429/418) from a previous run lasts"
                    " %.0f s more; not calling it until then",
                    market,
                    left,
                )

    def statistics(self) -> RestStatistics:
        return RestStatistics(
            requests=self._requests,
            retries=self._retries,
            rate_limited=self._rate_limited,
            banned=self._banned,
            weight_waits=self._weight_waits,
            used_weight={m: g.used for m, g in self._gates.items()},
            weight_limit={m: g.weight_limit for m, g in self._gates.items()},
        )

    # --- public calls ------------------------------------------------------------------

    async def klines(self, series: SeriesId, start: int, end: int) -> list[Candle]:
        """Closed candles of ``series`` with ``start <= open time < end`` (seconds), paged
        (futures 1500, spot 1000 per call), ascending and unique. Minutes missing from the
        answer are missing at the exchange — but for the newest: Binance's answer ends with
        the bar still forming when the range reaches it, which is dropped here (a row that
        ends after the answer's time, :func:`closed_by`), so a fill never stores an open
        bar as closed."""
        market = series.market
        tf = series.timeframe
        page_max = KLINES_LIMIT[market]
        by_time: dict[int, Candle] = {}
        cursor = start
        while cursor < end:
            limit = min(page_max, -(-(end - cursor) // tf.seconds))
            response = await self._get(
                market,
                KLINES_PATH[market],
                {
                    "symbol": series.rest_symbol,
                    "interval": tf.text,
                    "startTime": cursor * MS,
                    "endTime": end * MS - 1,
                    "limit": limit,
                },
                weight=klines_weight(market, limit),
            )
            rows = decode_rest_klines(response.content, tf)
            ended_by = closed_by(response)
            for candle in rows:
                if (
                    cursor <= candle.candle_time < end
                    and tf.next_open(candle.candle_time) <= ended_by
                ):
                    by_time[candle.candle_time] = candle
            if len(rows) < limit:
                break  # the range is exhausted
            following = rows[-1].candle_time + tf.seconds
            if following <= cursor:
                raise WireError("rest_paging", f"page at {cursor} did not move forward")
            cursor = following
        return [by_time[t] for t in sorted(by_time)]

    async def latest_open_time(self, series: SeriesId) -> int | None:
        """The open time (seconds) of the newest ``series`` bar Binance has (one klines call,
        ``limit=1``), None when it has none: how a multi-day grid's phase is learned."""
        market = series.market
        response = await self._get(
            market,
            KLINES_PATH[market],
            {"symbol": series.rest_symbol, "interval": series.timeframe.text, "limit": 1},
            weight=klines_weight(market, 1),
        )
        rows = decode_rest_klines(response.content, series.timeframe)
        return rows[-1].candle_time if rows else None

    async def first_open_time(self, series: SeriesId) -> int | None:
        """The open time (seconds) of the oldest ``series`` bar Binance has (one klines
        call from ``startTime`` 0, ``limit=1``): the series' listing; None when it has none."""
        market = series.market
        response = await self._get(
            market,
            KLINES_PATH[market],
            {
                "symbol": series.rest_symbol,
                "interval": series.timeframe.text,
                "startTime": 0,
                "limit": 1,
            },
            weight=klines_weight(market, 1),
        )
        rows = decode_rest_klines(response.content, series.timeframe)
        return rows[0].candle_time if rows else None

    async def server_time_ms(self, market: Market) -> int:
        response = await self._get(market, TIME_PATH[market], {}, weight=TIME_WEIGHT)
        doc = decode_wire_json(response.content)
        value = doc.get("serverTime") if isinstance(doc, dict) else None
        if isinstance(value, bool) or not isinstance(value, int):
            raise WireError("bad_server_time", f"{response.text[:120]!r}")
        return value

    async def load_rate_limits(self, market: Market) -> int:
        """Read REQUEST_WEIGHT per minute from exchangeInfo and use it from now on
        (IngestSupervisor calls it once per market at start-up)."""
        response = await self._get(
            market, EXCHANGE_INFO_PATH[market], {}, weight=EXCHANGE_INFO_WEIGHT[market]
        )
        doc = decode_wire_json(response.content)
        limits = doc.get("rateLimits") if isinstance(doc, dict) else None
        for item in limits if isinstance(limits, list) else []:
            if (
                isinstance(item, dict)
                and item.get("rateLimitType") == "REQUEST_WEIGHT"
                and item.get("interval") == "MINUTE"
                and isinstance(item.get("limit"), int)
                and isinstance(item.get("intervalNum"), int)
                and item["intervalNum"] > 0
            ):
                limit = int(item["limit"]) // int(item["intervalNum"])
                self._gate(market).weight_limit = limit
                return limit
        raise WireError("bad_exchange_info", "no REQUEST_WEIGHT per MINUTE in rateLimits")

    # --- the one request path ----------------------------------------------------------

    async def _remember_wait(self, market: Market, left_s: float) -> None:
        """Keep the end of a Retry-After (429 or 418) in the ban memory, so that a restart
        inside it waits for the rest of it. Best effort: the wait holds in this run anyway."""
        if self.bans is None:
            return
        try:
            await self.bans.save(market, time.time() + left_s)  # it ends in wall-clock time
        except TradeCanvasError as exc:
            log.error("could not remember Binance's Retry-After: %s", exc)

    def _gate(self, market: Market) -> _HostGate:
        gate = self._gates.get(market)
        if gate is None:
            gate = _HostGate(
                weight_limit=DEFAULT_WEIGHT_LIMIT[market],
                limiter=trio.CapacityLimiter(self.policy.concurrency),
            )
            self._gates[market] = gate
        return gate

    async def _wait_for_turn(self, gate: _HostGate, weight: int, what: str) -> None:
        while True:
            now = trio.current_time()
            if gate.blocked_until > now:
                wait = gate.blocked_until - now
                if wait > self.policy.max_wait_s:
                    raise UpstreamError(
                        f"{what}: Binance asked us to stay away for {wait:.0f} s more"
                        " (429/418 Retry-After); not waiting that long"
                    )
                await trio.sleep_until(gate.blocked_until)
                continue
            if gate.window_resets_at is not None and now >= gate.window_resets_at:
                gate.used = 0
                gate.window_resets_at = None
            budget = gate.weight_limit * self.policy.weight_budget
            if gate.used + gate.reserved > 0 and gate.used + gate.reserved + weight > budget:
                self._weight_waits += 1
                if gate.window_resets_at is None:
                    gate.window_resets_at = now + 60.0
                log.info("%s: request weight %d near the limit; waiting", what, gate.used)
                await trio.sleep_until(gate.window_resets_at)
                continue
            gate.reserved += weight
            return

    def _observe(self, gate: _HostGate, response: httpx.Response, weight: int) -> None:
        header = response.headers.get(WEIGHT_HEADER)
        try:
            gate.used = int(header) if header is not None else gate.used + weight
        except ValueError:
            gate.used += weight
        gate.window_resets_at = trio.current_time() + _seconds_left_in_minute(
            response.headers.get("date")
        )
        if self.metrics is not None:
            self.metrics.rest_used_weight.set(gate.used)
            self.metrics.rest_requests_total.labels(status=str(response.status_code)).inc()

    async def _get(
        self, market: Market, path: str, params: Mapping[str, str | int], *, weight: int
    ) -> httpx.Response:
        base = self.base_urls.get(market)
        if base is None:
            raise UpstreamError(f"no REST base URL configured for {market}")
        url = base + path
        what = f"GET {url}"  # the host too: which of the configured URLs failed
        gate = self._gate(market)
        problem = "no attempt made"
        for attempt in range(self.policy.max_attempts):
            if attempt:
                self._retries += 1
            await self._wait_for_turn(gate, weight, what)
            try:
                async with gate.limiter:
                    self._requests += 1
                    response = await self.http.get(url, params=dict(params))
            except httpx.TimeoutException as exc:
                problem = f"timed out ({type(exc).__name__})"
            except httpx.TransportError as exc:
                problem = f"transport error: {type(exc).__name__}: {exc}"
            except httpx.HTTPError as exc:  # decoding, redirects: not worth a retry
                raise UpstreamError(f"{what}: {type(exc).__name__}: {exc}") from exc
            else:
                self._observe(gate, response, weight)
                status = response.status_code
                if status == 200:
                    return response
                problem = f"HTTP {status}: {response.text[:200]!r}"
                if status in (429, 418):
                    wait = _retry_after(response)
                    if status == 429:
                        self._rate_limited += 1
                    else:
                        self._banned += 1
                    now = trio.current_time()
                    gate.blocked_until = max(gate.blocked_until, now + wait)
                    log.warning("%s: %s; every request waits %.0f s", what, problem, wait)
                    # a 429's wait too: asking again inside it earns a 418 (BINANCE.md)
                    await self._remember_wait(market, gate.blocked_until - now)
                    continue
                if status < 500:
                    raise UpstreamError(f"{what} {dict(params)}: {problem}")
            finally:
                gate.reserved -= weight
            if attempt + 1 == self.policy.max_attempts:
                break  # no point waiting before giving up
            delay = self.policy.backoff.delay(attempt + 1)
            log.warning("%s: %s; retrying in %.2f s", what, problem, delay)
            await trio.sleep(delay)
        raise UpstreamError(f"{what}: gave up after {self.policy.max_attempts} attempts: {problem}")
