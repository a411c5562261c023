"""RuntimeFlags: every setting, read once from the environment before ``trio.run``.

This is the only module that reads ``os.environ`` (DESIGN §1.5). Each flag is one row of
:data:`FLAG_SPECS`, which drives the environment parsing, the ``serve`` options, ``tradecanvas
flags`` and the documentation audit. A bad value raises :class:`FlagError`
(``TRADE_CANVAS_X: <what is wrong, what is allowed>``); the CLI turns it into exit code 2.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from tradecanvas.errors import FlagError, SeriesIdError
from tradecanvas.model import BINANCE_INTERVALS, SeriesId, Timeframe, derivation_sources
from tradecanvas.service_urls import parse_database_url, parse_redis_url, url_without_password

log = logging.getLogger(__name__)

PREFIX: Final = "TRADE_CANVAS_"
DEFAULT_ALLOWED_ORIGINS: Final = (
    "http://localhost",
    "http://127.0.0.1",
    "https://localhost",
    "https://127.0.0.1",
)
_TRUE: Final = ("1", "true", "yes", "on")
_FALSE: Final = ("0", "false", "no", "off")
LOG_FORMATS: Final = ("text", "json")
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# DESIGN §10: the single process, or the ingest | edge halves joined by Redis Streams
ROLES: Final = ("all", "ingest", "edge")


def _redacted(value: str | None) -> str:
    return "<unset>" if value is None else "<redacted>"


@attrs.frozen
class RuntimeFlags:
    """The daemon's settings (DESIGN §7). Frozen: a change means restarting the unit."""

    series: tuple[SeriesId, ...]
    derived_timeframes: tuple[Timeframe, ...]
    db_path: Path
    database_url: str | None = attrs.field(repr=url_without_password)
    ws_host: str
    ws_port: int
    http_host: str
    http_port: int
    http_body_timeout_s: float
    http_send_timeout_s: float
    binance_futures_ws_url: str = attrs.field(repr=url_without_password)
    binance_spot_ws_url: str = attrs.field(repr=url_without_password)
    binance_futures_rest_url: str = attrs.field(repr=url_without_password)
    binance_spot_rest_url: str = attrs.field(repr=url_without_password)
    enable_ingest_ws_pipeline_publish: bool
    binance_ws_batch_max: int
    binance_ws_flush_s: float
    market_forming_min_interval_ms: int
    market_ws_catchup_limit: int
    initial_backfill_candles: int
    late_close_s: float
    stale_timeout_s: float
    subscriber_queue_max: int
    subscriber_send_timeout_s: float
    subscriber_stall_timeout_s: float
    max_subscriptions: int
    max_connections: int
    ws_allowed_origins: tuple[str, ...]
    event_retention_days: float
    event_retention_max: int
    ingest_token: str | None = attrs.field(repr=_redacted)
    log_format: str
    log_level: str
    role: str
    redis_url: str | None = attrs.field(repr=url_without_password)
    bus_prefix: str
    bus_maxlen: int
    # the ingest lease (issue 15, two ingest nodes; bus/lease.py)
    ingest_lease_ms: int
    # systemd's own variables, read here so that no other module touches the environment
    notify_socket: str | None = None
    watchdog_usec: int | None = None

    def derived_series(self) -> tuple[SeriesId, ...]:
        """Every derived series: for each base series, each derived timeframe in order."""
        return tuple(
            base.with_timeframe(tf) for base in self.series for tf in self.derived_timeframes
        )

    def all_series(self) -> tuple[SeriesId, ...]:
        return self.series + self.derived_series()

    def derivation_fingerprint(self) -> str:
        """What the store was built with; a change emits ``factor.rebuild`` (fingerprint)."""
        tfs = ",".join(tf.text for tf in sorted(self.derived_timeframes))
        return f"binance-exact-v1;derived={tfs}"


# --- parsers: each returns the value or raises ValueError with "what is allowed" ----------


def _parse_int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            raise ValueError(f"{text!r} is not an integer; allowed: {lo}..{hi}") from None
        if not lo <= value <= hi:
            raise ValueError(f"{value} is out of range; allowed: {lo}..{hi}")
        return value

    return parse


def _parse_float(lo: float, hi: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise ValueError(f"{text!r} is not a number; allowed: {lo}..{hi} seconds") from None
        if not lo <= value <= hi:  # also rejects nan
            raise ValueError(f"{text.strip()} is out of range; allowed: {lo}..{hi}")
        return value

    return parse


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a boolean; allowed: 1/true/yes/on or 0/false/no/off")


def _parse_series(text: str) -> tuple[SeriesId, ...]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError("no series given; allowed: comma-separated series_ids")
    result: list[SeriesId] = []
    for item in items:
        try:
            sid = SeriesId.parse(item)
        except SeriesIdError as exc:
            raise ValueError(str(exc)) from None
        if sid.timeframe.text != "1m":
            raise ValueError(f"{item}: base series must be 1m (higher ones are derived)")
        if sid in result:
            raise ValueError(f"{item} is listed twice")
        result.append(sid)
    return tuple(result)


# a derived bar is summed from at most this many bars of its source at each commit
MAX_PARTS_PER_BAR: Final = 1440


def _parse_timeframes(text: str) -> tuple[Timeframe, ...]:
    """The timeframes to derive, ``none`` for none; empty is refused (a blanked line)."""
    if text.strip().lower() == "none":
        return ()
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError("empty; list the timeframes to derive (5m,15m,…), or none")
    result: list[Timeframe] = []
    for item in items:
        try:
            tf = Timeframe.parse(item)
        except SeriesIdError as exc:
            raise ValueError(str(exc)) from None
        if tf.text not in BINANCE_INTERVALS[1:]:  # 60m: a second 1h series; 10m: no Binance's
            same = [t for t in BINANCE_INTERVALS[1:] if Timeframe.parse(t).same_bars(tf)]
            raise ValueError(
                f"{item} is written {same[0]} (Binance's name for it)"
                if same
                else f"{item} is not a Binance interval that can be derived from 1m bars;"
                f" allowed: {', '.join(BINANCE_INTERVALS[1:])}"
            )
        if tf in result:
            raise ValueError(f"{item} is listed twice")
        result.append(tf)
    for tf, source in derivation_sources(result).items():
        parts = tf.seconds // source.seconds
        if parts > MAX_PARTS_PER_BAR:
            raise ValueError(
                f"{tf} would be summed from {parts} {source} bars at every commit; add 1d (or"
                f" another timeframe dividing a day, such as 4h) to the list: {tf} is built"
                " from it"
            )
    return tuple(result)  # configured order: the legacy publish sends derived series in it


def _parse_ws_url(text: str) -> str:
    text = text.strip().rstrip("/")
    if not text.startswith(("wss://", "ws://", "https://", "http://")):
        shown = url_without_password(text)
        raise ValueError(f"{shown!r} is not a WebSocket URL; allowed: wss://, ws://, http(s)://")
    return text


def _parse_http_url(text: str) -> str:
    text = text.strip().rstrip("/")
    if not text.startswith(("https://", "http://")):
        shown = url_without_password(text)
        raise ValueError(f"{shown!r} is not an HTTP URL; allowed: https:// or http://")
    return text


def _parse_host(text: str) -> str:
    text = text.strip()
    if not text or any(c.isspace() for c in text):
        raise ValueError(f"{text!r} is not a host; allowed: an IP address or host name")
    return text


def _parse_origins(text: str) -> tuple[str, ...]:
    items = tuple(item.strip().rstrip("/") for item in text.split(",") if item.strip())
    for item in items:
        if item != "*" and not item.startswith(("http://", "https://")):
            raise ValueError(f"{item!r} is not an origin; allowed: http(s)://host[:port] or *")
    return items


def _parse_choice(choices: tuple[str, ...], *, upper: bool = False) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().upper() if upper else text.strip().lower()
        if value not in choices:
            raise ValueError(f"{text!r} is not allowed; allowed: {', '.join(choices)}")
        return value

    return parse


def _parse_token(text: str) -> str:
    token = text.strip()
    if len(token) < 16:
        raise ValueError("the token is too short; allowed: at least 16 characters")
    if not all("!" <= c <= "~" for c in token):
        # a header carries bytes: a client could never send other characters as configured
        raise ValueError(
            "the token has a character a header cannot carry; allowed: printable ASCII, no spaces"
        )
    return token


_ANY_HOST: Final = frozenset({"", "0.0.0.0", "::", "*"})


def _check_ports_differ(values: Mapping[str, Any]) -> None:
    """The WS and HTTP listeners on one address and port would refuse each other at start-up
    (it said "address already in use", as if another program held it)."""
    port, hosts = values["http_port"], {values["ws_host"], values["http_host"]}
    if port and port == values["ws_port"] and (len(hosts) == 1 or hosts & _ANY_HOST):
        raise FlagError(
            "TRADE_CANVAS_HTTP_PORT",
            f"{port} is TRADE_CANVAS_WS_PORT too; allowed: another port (the HTTP API serves"
            " /ws/market as well, on its own listener)",
        )


def _parse_bus_prefix(text: str) -> str:
    text = text.strip().rstrip(":")
    if not re.fullmatch(r"[A-Za-z0-9_.:-]+", text):
        raise ValueError(f"{text!r}; allowed: letters, digits and _ . : -")
    return text


def _parse_path(text: str) -> Path:
    if not text.strip():
        raise ValueError("empty path; allowed: a file path")
    return Path(text.strip())


@attrs.frozen
class FlagSpec:
    """One flag: its field on RuntimeFlags, its variable, its default (as text) and parser."""

    field: str
    default: str | None
    parse: Callable[[str], Any]
    help: str

    @property
    def variable(self) -> str:
        return PREFIX + self.field.upper()

    @property
    def option(self) -> str:
        return "--" + self.field.replace("_", "-")


FLAG_SPECS: Final[tuple[FlagSpec, ...]] = (
    FlagSpec("series", "binance:futures:BTC/USDT:1m", _parse_series, "comma-separated base 1m series"),
    FlagSpec("derived_timeframes", "5m,15m,1h,4h,1d", _parse_timeframes, "timeframes derived from 1m (any of 3m … 1M; none for none)"),
    FlagSpec("db_path", None, _parse_path, "SQLite file (default $STATE_DIRECTORY/market.sqlite3, else ./var/market.sqlite3)"),
    FlagSpec("database_url", None, parse_database_url, "PostgreSQL store (postgresql://…) instead of the SQLite file; migrated at start-up"),
    FlagSpec("ws_host", "127.0.0.1", _parse_host, "/ws/market listen address"),
    FlagSpec("ws_port", "8765", _parse_int(0, 65535), "/ws/market listen port (0 = any)"),
    FlagSpec("http_host", "127.0.0.1", _parse_host, "HTTP API (and /ws/market) listen address"),
    FlagSpec("http_port", "8766", _parse_int(0, 65535), "HTTP API (and /ws/market) listen port (0 = any)"),
    FlagSpec("http_body_timeout_s", "10", _parse_float(0.1, 3600.0), "answer 408 and close a connection whose request body is not in within this many seconds of its headers"),
    FlagSpec("http_send_timeout_s", "30", _parse_float(0.1, 3600.0), "close an HTTP connection whose client takes less than the next 64 KiB of an answer in this many seconds"),
    FlagSpec("binance_futures_ws_url", "wss://fstream.binance.com/market", _parse_ws_url, "USDⓈ-M futures WS base (routed /market path)"),
    FlagSpec("binance_spot_ws_url", "wss://stream.binance.com:9443", _parse_ws_url, "spot WS base"),
    FlagSpec("binance_futures_rest_url", "https://fapi.binance.com", _parse_http_url, "USDⓈ-M futures REST base"),
    FlagSpec("binance_spot_rest_url", "https://api.binance.com", _parse_http_url, "spot REST base"),
    FlagSpec("enable_ingest_ws_pipeline_publish", "0", parse_bool, "kill-switch: 1 = publish through IngestPipeline.publish, 0 = legacy loop publish"),
    FlagSpec("binance_ws_batch_max", "200", _parse_int(1, 100_000), "closed klines per flush at most while the committer keeps up (behind: up to 1,000)"),
    FlagSpec("binance_ws_flush_s", "0", _parse_float(0.0, 60.0), "longest a close waits for the rest of its minute's closes; 0 = none: group commit (closes go as soon as the previous commit is done)"),
    FlagSpec("market_forming_min_interval_ms", "250", _parse_int(0, 60_000), "forming updates per series at most every N ms"),
    FlagSpec("market_ws_catchup_limit", "5000", _parse_int(1, 100_000), "candles per catch-up message; the null-since catch-up size"),
    FlagSpec("initial_backfill_candles", "1440", _parse_int(0, 1_000_000), "REST history fetched for an empty store"),
    FlagSpec("late_close_s", "10", _parse_float(0.0, 3600.0), "exchange seconds after a minute before its close is fetched from REST"),
    FlagSpec("stale_timeout_s", "60", _parse_float(1.0, 3600.0), "replace an upstream connection silent this long"),
    FlagSpec("subscriber_queue_max", "1024", _parse_int(1, 1_000_000), "messages queued per subscriber"),
    FlagSpec("subscriber_send_timeout_s", "10", _parse_float(0.01, 3600.0), "close a subscriber whose send takes longer (4008), at most a tenth of this later whatever the stall timeout; time the daemon did not run does not count"),
    FlagSpec("subscriber_stall_timeout_s", "30", _parse_float(0.1, 3600.0), "close a subscriber that has read nothing sent to it for this long, by its answers to pings (4008)"),
    FlagSpec("max_subscriptions", "64", _parse_int(1, 10_000), "subscriptions per connection"),
    FlagSpec("max_connections", "10000", _parse_int(1, 1_000_000), "/ws/market connections at once, both ports together, counted from the admitted upgrade (before the 101); more are refused with 503"),
    FlagSpec("ws_allowed_origins", ",".join(DEFAULT_ALLOWED_ORIGINS), _parse_origins, "allowed Origin headers on both ports (any port of these hosts); * allows all"),
    FlagSpec("event_retention_days", "7", _parse_float(0.01, 3650.0), "keep system events (the event log) this many days at most"),
    FlagSpec("event_retention_max", "100000", _parse_int(100, 100_000_000), "keep at most this many system events"),
    FlagSpec("ingest_token", None, _parse_token, "bearer token of POST /api/market/ingest/candle_closed (or $CREDENTIALS_DIRECTORY/ingest-token)"),
    FlagSpec("log_format", "text", _parse_choice(LOG_FORMATS), "text or json"),
    FlagSpec("log_level", "INFO", _parse_choice(LOG_LEVELS, upper=True), "DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    FlagSpec("role", "all", _parse_choice(ROLES), "all = one process; ingest = Binance → store → Redis Streams; edge = Redis Streams + store → subscribers"),
    FlagSpec("redis_url", None, parse_redis_url, "Redis of the bus (redis://host:port/db); required by the ingest and edge roles, not used by all (but checked)"),
    FlagSpec("bus_prefix", "tradecanvas", _parse_bus_prefix, "key prefix of the bus's streams and channel in Redis (<prefix>:candles:<series>, …)"),
    FlagSpec("bus_maxlen", "10080", _parse_int(100, 100_000_000), "entries kept per series stream (MAXLEN ~); an edge further behind reads the store"),
    # the ingest lease (issue 15: two ingest nodes, hot standby; docs/distributed.md)
    FlagSpec("ingest_lease_ms", "5000", _parse_int(500, 600_000), "TTL of the ingest lease in Redis (role ingest): the node holding it ingests, the others stand by and take over within about this long after it stopped"),
)  # fmt: skip

# not flags of the daemon, but read from the environment by the tools and tests
TOOL_VARIABLES: Final = ("TRADE_CANVAS_DATA_DIR",)
KNOWN_VARIABLES: Final = frozenset(spec.variable for spec in FLAG_SPECS) | set(TOOL_VARIABLES)


@attrs.frozen
class LoadedFlags:
    flags: RuntimeFlags
    warnings: tuple[str, ...]


SUGGEST_MAX_EDITS: Final = 3  # a suggestion is a typo's: so far apart at most, not SEND/BODY


def _compact(name: str) -> str:  # what a mistyped prefix keeps: no case, no separators
    return re.sub(r"[^A-Z0-9]", "", name.upper())


def closest_variable(name: str, known: Collection[str] = KNOWN_VARIABLES) -> str | None:
    """The known variable ``name`` is a typo of, if any (compared after the prefix)."""
    n, edits = len(_compact(PREFIX)), []
    for variable in sorted(known):
        a, b = _compact(name)[n:], _compact(variable)[n:]
        same = sum(m.size for m in difflib.SequenceMatcher(None, a, b).get_matching_blocks())
        edits.append((len(a) + len(b) - 2 * same, variable))
    best = min(edits, default=(SUGGEST_MAX_EDITS + 1, ""))
    return best[1] if best[0] <= SUGGEST_MAX_EDITS else None


def unknown_variable_warnings(environ: Mapping[str, str]) -> tuple[str, ...]:
    """A warning per unknown or prefix-mistyped (TRADECANVAS_X, lowercase) variable of ours."""
    by_compact, warnings = {_compact(v): v for v in KNOWN_VARIABLES}, []
    for name in sorted(environ):
        compact = _compact(name)
        if name not in KNOWN_VARIABLES and (name.startswith(PREFIX) or compact in by_compact):
            close = by_compact.get(compact) or closest_variable(name)
            hint = f"; did you mean {close}?" if close else " (not a variable of this release)"
            old = name == OLD_DATA_DIR_VARIABLE  # still read where data is (replay, tests)
            hint = f": the deprecated name of {DATA_DIR_VARIABLE}" if old else hint
            warnings.append(f"{name}: unknown variable, ignored{hint}")
    return tuple(warnings)


def build_runtime_flags(
    environ: Mapping[str, str], overrides: Mapping[str, str] | None = None
) -> LoadedFlags:
    """Parse flags from ``environ`` with ``overrides`` (``serve`` options, by field) on top.

    Raises FlagError naming the first bad variable.
    """
    overrides = overrides or {}
    values: dict[str, Any] = {}
    for spec in FLAG_SPECS:
        text = overrides.get(spec.field, environ.get(spec.variable))
        if text is None:
            text = spec.default
        if text is None:
            values[spec.field] = None
            continue
        try:
            values[spec.field] = spec.parse(text)
        except ValueError as exc:
            raise FlagError(spec.variable, str(exc)) from None
    if values["db_path"] is None:
        state_dir = environ.get("STATE_DIRECTORY")
        base = Path(state_dir.split(":")[0]) if state_dir else Path("var")
        values["db_path"] = base / "market.sqlite3"
    if values["ingest_token"] is None and environ.get("CREDENTIALS_DIRECTORY"):
        token_file = Path(environ["CREDENTIALS_DIRECTORY"]) / "ingest-token"
        # a blank credential (the unit's SetCredential= fallback) means "no token"
        if token_file.is_file() and token_file.read_text().strip():
            try:
                values["ingest_token"] = _parse_token(token_file.read_text())
            except (OSError, ValueError) as exc:
                raise FlagError("TRADE_CANVAS_INGEST_TOKEN", f"{token_file}: {exc}") from None
    if values["role"] != "all" and values["redis_url"] is None:
        raise FlagError(
            "TRADE_CANVAS_REDIS_URL",
            f"required by role {values['role']} (the bus); allowed: redis://host:port/db",
        )
    _check_ports_differ(values)
    notify_socket = environ.get("NOTIFY_SOCKET") or None
    watchdog_usec: int | None = None
    if environ.get("WATCHDOG_USEC"):
        try:
            watchdog_usec = int(environ["WATCHDOG_USEC"])
        except ValueError:
            raise FlagError("WATCHDOG_USEC", "not an integer (set by systemd)") from None
        watchdog_pid = environ.get("WATCHDOG_PID")
        if watchdog_pid and watchdog_pid != str(os.getpid()):
            watchdog_usec = None  # the watchdog is meant for another process
    flags = RuntimeFlags(notify_socket=notify_socket, watchdog_usec=watchdog_usec, **values)
    return LoadedFlags(flags, unknown_variable_warnings(environ))


def load_runtime_flags(overrides: Mapping[str, str] | None = None) -> LoadedFlags:
    """Build RuntimeFlags from this process's environment (the one place that reads it)."""
    return build_runtime_flags(os.environ, overrides)


DATA_DIR_VARIABLE: Final = PREFIX + "DATA_DIR"
# the name used before the one prefix; still read, with a deprecation warning
OLD_DATA_DIR_VARIABLE: Final = "TRADECANVAS_DATA_DIR"
# the checkout (or the installed package's parent): the shared data lies beside it
PROJECT_ROOT: Final = Path(__file__).resolve().parent.parent
_warned_old_data_dir = False


def data_dir_candidates(environ: Mapping[str, str] | None = None) -> list[Path]:
    """Where real Binance data is looked for, in order (DESIGN §9): ``$TRADE_CANVAS_DATA_DIR``
    (or the deprecated ``$TRADECANVAS_DATA_DIR``), ``../shared/data/binance`` beside the
    checkout, ``.cache/binance`` (``make test-data``)."""
    global _warned_old_data_dir
    env = os.environ if environ is None else environ
    explicit = env.get(DATA_DIR_VARIABLE)
    if not explicit and env.get(OLD_DATA_DIR_VARIABLE):
        explicit = env[OLD_DATA_DIR_VARIABLE]
        if not _warned_old_data_dir:
            _warned_old_data_dir = True
            log.warning(
                "%s is deprecated; use %s instead", OLD_DATA_DIR_VARIABLE, DATA_DIR_VARIABLE
            )
    candidates = [Path(explicit)] if explicit else []
    candidates += [
        PROJECT_ROOT.parent / "shared" / "data" / "binance",
        PROJECT_ROOT / ".cache" / "binance",
    ]
    return candidates


def binance_data_dir(environ: Mapping[str, str] | None = None) -> Path | None:
    """The first existing folder of :func:`data_dir_candidates`, or None."""
    return next((c for c in data_dir_candidates(environ) if c.is_dir()), None)


def describe_flags(flags: RuntimeFlags) -> list[tuple[str, str]]:
    """(variable, effective value) rows for ``tradecanvas flags``; the token redacted."""
    rows: list[tuple[str, str]] = []
    for spec in FLAG_SPECS:
        value = getattr(flags, spec.field)
        if spec.field == "ingest_token":
            text = _redacted(value)
        elif spec.field.endswith("_url"):  # the services' and Binance's
            text = url_without_password(value)
        elif spec.field == "derived_timeframes" and not value:
            text = "none"  # (as it is given: an empty value is refused)
        elif isinstance(value, tuple):
            text = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            text = "1" if value else "0"
        else:
            text = str(value)
        rows.append((spec.variable, text))
    return rows
