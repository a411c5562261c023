from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tradecanvas import runtime_flags
from tradecanvas.errors import FlagError
from tradecanvas.runtime_flags import (
    FLAG_SPECS,
    KNOWN_VARIABLES,
    build_runtime_flags,
    describe_flags,
)

TOKEN = "s3cret-token-0123456789"


def test_defaults_match_design() -> None:
    flags = build_runtime_flags({}).flags
    assert [str(s) for s in flags.series] == ["binance:futures:BTC/USDT:1m"]
    assert [tf.text for tf in flags.derived_timeframes] == ["5m", "15m", "1h", "4h", "1d"]
    assert flags.db_path == Path("var/market.sqlite3")
    assert (flags.ws_host, flags.ws_port, flags.http_host, flags.http_port) == (
        "127.0.0.1",
        8765,
        "127.0.0.1",
        8766,
    )
    assert flags.binance_futures_ws_url == "wss://fstream.binance.com/market"
    assert flags.binance_spot_ws_url == "wss://stream.binance.com:9443"
    assert flags.binance_futures_rest_url == "https://fapi.binance.com"
    assert flags.binance_spot_rest_url == "https://api.binance.com"
    assert flags.enable_ingest_ws_pipeline_publish is False
    assert (flags.binance_ws_batch_max, flags.binance_ws_flush_s) == (200, 0.0)
    assert flags.market_forming_min_interval_ms == 250
    assert flags.market_ws_catchup_limit == 5000
    assert flags.initial_backfill_candles == 1440
    assert flags.late_close_s == 10
    assert flags.stale_timeout_s == 60
    assert (flags.subscriber_queue_max, flags.subscriber_send_timeout_s) == (1024, 10)
    assert flags.subscriber_stall_timeout_s == 30
    assert (flags.http_body_timeout_s, flags.http_send_timeout_s) == (10, 30)
    assert flags.max_subscriptions == 64
    assert "http://localhost" in flags.ws_allowed_origins
    assert flags.ingest_token is None
    assert (flags.log_format, flags.log_level) == ("text", "INFO")
    assert flags.notify_socket is None
    assert (flags.role, flags.redis_url, flags.bus_prefix, flags.bus_maxlen) == (
        "all",
        None,
        "tradecanvas",
        10_080,
    )


def test_every_design_variable_is_known() -> None:
    design = (Path(__file__).resolve().parents[2] / "shared" / "DESIGN.md").read_text()
    section = design.split("## 7.")[1].split("## 8.")[0]

    names = set(re.findall(r"TRADE_CANVAS_[A-Z_]+", section))
    names |= {
        f"TRADE_CANVAS_BINANCE_{m}_{k}_URL" for m in ("SPOT", "FUTURES") for k in ("WS", "REST")
    }
    names -= {"TRADE_CANVAS_BINANCE_"}  # the "..._SPOT_WS_URL" abbreviation in the table
    names = {n for n in names if not n.endswith("_")}
    assert names <= KNOWN_VARIABLES, names - KNOWN_VARIABLES


PARSE_ERROR_CASES: list[tuple[str, str, str]] = [
    ("TRADE_CANVAS_SERIES", "binance:futures:BTCUSDT:1m", "bad symbol"),
    ("TRADE_CANVAS_SERIES", "binance:futures:BTC/USDT:5m", "must be 1m"),
    ("TRADE_CANVAS_SERIES", "kraken:spot:BTC/USD:1m", "unknown exchange"),
    ("TRADE_CANVAS_DERIVED_TIMEFRAMES", "5x", "bad timeframe"),
    ("TRADE_CANVAS_DERIVED_TIMEFRAMES", "7m", "7m is not a Binance interval"),
    ("TRADE_CANVAS_DERIVED_TIMEFRAMES", "10m", "10m is not a Binance interval"),
    ("TRADE_CANVAS_DERIVED_TIMEFRAMES", "5m,3h", "3h is not a Binance interval"),
    ("TRADE_CANVAS_DERIVED_TIMEFRAMES", "1h,60m", "60m is written 1h"),
    ("TRADE_CANVAS_DERIVED_TIMEFRAMES", "24h", "24h is written 1d"),
    ("TRADE_CANVAS_DERIVED_TIMEFRAMES", "72h", "72h is written 3d"),
    # the same length, not the same bars: epoch weeks start on Thursdays, months vary
    ("TRADE_CANVAS_DERIVED_TIMEFRAMES", "7d", "7d is not a Binance interval"),
    ("TRADE_CANVAS_DERIVED_TIMEFRAMES", "31d", "31d is not a Binance interval"),
    ("TRADE_CANVAS_DERIVED_TIMEFRAMES", "1m", "1m is not a Binance interval that can be derived"),
    ("TRADE_CANVAS_DERIVED_TIMEFRAMES", "", "empty; list the timeframes to derive"),
    ("TRADE_CANVAS_DERIVED_TIMEFRAMES", " , ", "empty; list the timeframes to derive"),
    ("TRADE_CANVAS_DERIVED_TIMEFRAMES", "2w", "the only week length is 1w"),
    ("TRADE_CANVAS_DERIVED_TIMEFRAMES", "5m,1w", "add 1d"),
    ("TRADE_CANVAS_WS_PORT", "http", "not an integer"),
    ("TRADE_CANVAS_WS_PORT", "70000", "out of range"),
    ("TRADE_CANVAS_HTTP_PORT", "-1", "out of range"),
    ("TRADE_CANVAS_BINANCE_FUTURES_WS_URL", "fstream.binance.com", "not a WebSocket URL"),
    ("TRADE_CANVAS_BINANCE_SPOT_REST_URL", "ftp://x", "not an HTTP URL"),
    ("TRADE_CANVAS_BINANCE_FUTURES_REST_URL", "wss://x", "not an HTTP URL"),
    ("TRADE_CANVAS_BINANCE_SPOT_WS_URL", "stream.binance.com", "not a WebSocket URL"),
    ("TRADE_CANVAS_ENABLE_INGEST_WS_PIPELINE_PUBLISH", "2", "not a boolean"),
    ("TRADE_CANVAS_BINANCE_WS_BATCH_MAX", "0", "out of range"),
    ("TRADE_CANVAS_BINANCE_WS_FLUSH_S", "abc", "not a number"),
    ("TRADE_CANVAS_BINANCE_WS_FLUSH_S", "nan", "out of range"),
    ("TRADE_CANVAS_MARKET_FORMING_MIN_INTERVAL_MS", "1.5", "not an integer"),
    ("TRADE_CANVAS_MARKET_WS_CATCHUP_LIMIT", "0", "out of range"),
    ("TRADE_CANVAS_INITIAL_BACKFILL_CANDLES", "-5", "out of range"),
    ("TRADE_CANVAS_LATE_CLOSE_S", "soon", "not a number"),
    ("TRADE_CANVAS_STALE_TIMEOUT_S", "0", "out of range"),
    ("TRADE_CANVAS_HTTP_BODY_TIMEOUT_S", "0", "out of range"),
    ("TRADE_CANVAS_HTTP_SEND_TIMEOUT_S", "0", "out of range"),
    ("TRADE_CANVAS_SUBSCRIBER_QUEUE_MAX", "0", "out of range"),
    ("TRADE_CANVAS_SUBSCRIBER_SEND_TIMEOUT_S", "-1", "out of range"),
    ("TRADE_CANVAS_SUBSCRIBER_STALL_TIMEOUT_S", "0", "out of range"),
    ("TRADE_CANVAS_MAX_SUBSCRIPTIONS", "0", "out of range"),
    ("TRADE_CANVAS_MAX_CONNECTIONS", "0", "out of range"),
    ("TRADE_CANVAS_EVENT_RETENTION_DAYS", "0", "out of range"),
    ("TRADE_CANVAS_EVENT_RETENTION_MAX", "10", "out of range"),
    ("TRADE_CANVAS_WS_ALLOWED_ORIGINS", "localhost", "not an origin"),
    ("TRADE_CANVAS_INGEST_TOKEN", "short", "too short"),
    ("TRADE_CANVAS_INGEST_TOKEN", "pässwörd-0123456789ab", "printable ASCII"),
    ("TRADE_CANVAS_INGEST_TOKEN", "two words 0123456789ab", "printable ASCII"),
    ("TRADE_CANVAS_LOG_FORMAT", "xml", "allowed: text, json"),
    ("TRADE_CANVAS_LOG_LEVEL", "loud", "allowed: DEBUG"),
    ("TRADE_CANVAS_DB_PATH", " ", "empty path"),
    ("TRADE_CANVAS_DATABASE_URL", "mysql://127.0.0.1/market", "not a PostgreSQL URL"),
    # libpq would take the user's name: the tables in the server's own "postgres"
    ("TRADE_CANVAS_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/", "no database name"),
    ("TRADE_CANVAS_DATABASE_URL", "postgresql://127.0.0.1:99999/market", "a bad port"),
    ("TRADE_CANVAS_ROLE", "relay", "allowed: all, ingest, edge"),
    ("TRADE_CANVAS_REDIS_URL", "http://127.0.0.1:6379", "not a Redis URL"),
    ("TRADE_CANVAS_REDIS_URL", "redis://127.0.0.1:99999/0", "a bad port"),
    ("TRADE_CANVAS_REDIS_URL", "redis://127.0.0.1:6379/abc", "/abc' is not a number"),
    ("TRADE_CANVAS_BUS_PREFIX", "a b", "allowed: letters"),
    ("TRADE_CANVAS_BUS_MAXLEN", "10", "out of range"),
    ("TRADE_CANVAS_INGEST_LEASE_MS", "100", "out of range"),
]


@pytest.mark.parametrize(("variable", "value", "fragment"), PARSE_ERROR_CASES)
def test_parse_errors_name_the_variable(variable: str, value: str, fragment: str) -> None:
    with pytest.raises(FlagError) as info:
        build_runtime_flags({variable: value})
    assert info.value.variable == variable
    assert str(info.value).startswith(f"{variable}: ")
    assert fragment in str(info.value)


def test_every_flag_has_a_parse_error_case() -> None:
    tested = {
        "TRADE_CANVAS_" + spec.field.upper()
        for spec in FLAG_SPECS
        if spec.field not in ("ws_host", "http_host")  # only whitespace is refused there
    }
    cases = {variable for variable, _, _ in PARSE_ERROR_CASES}
    assert tested <= cases, tested - cases


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0", False), ("1", True), ("true", True), ("YES", True), ("on", True), ("off", False)],
)
def test_kill_switch_values(text: str, expected: bool) -> None:
    flags = build_runtime_flags({"TRADE_CANVAS_ENABLE_INGEST_WS_PIPELINE_PUBLISH": text}).flags
    assert flags.enable_ingest_ws_pipeline_publish is expected


def test_unknown_variable_warns_with_closest_name() -> None:
    loaded = build_runtime_flags({"TRADE_CANVAS_SERIEZ": "x", "OTHER": "y"})
    assert loaded.warnings == (
        "TRADE_CANVAS_SERIEZ: unknown variable, ignored; did you mean TRADE_CANVAS_SERIES?",
    )


def test_overrides_beat_environment_and_lists_parse() -> None:
    flags = build_runtime_flags(
        {
            "TRADE_CANVAS_WS_PORT": "9000",
            "TRADE_CANVAS_SERIES": "binance:futures:BTC/USDT:1m, binance:spot:ETH/USDT:1m",
            "TRADE_CANVAS_DERIVED_TIMEFRAMES": "1d,15m,1h,4h,5m",
        },
        {"ws_port": "0"},
    ).flags
    assert flags.ws_port == 0
    assert [str(s) for s in flags.series] == [
        "binance:futures:BTC/USDT:1m",
        "binance:spot:ETH/USDT:1m",
    ]
    # configured order (the legacy publish order); the fingerprint does not depend on it
    assert [tf.text for tf in flags.derived_timeframes] == ["1d", "15m", "1h", "4h", "5m"]
    assert str(flags.derived_series()[0]) == "binance:futures:BTC/USDT:1d"
    assert flags.derivation_fingerprint() == "binance-exact-v1;derived=5m,15m,1h,4h,1d"


def test_state_directory_and_credentials(tmp_path: Path) -> None:
    (tmp_path / "ingest-token").write_text(TOKEN + "\n")
    flags = build_runtime_flags(
        {"STATE_DIRECTORY": "/var/lib/tradecanvas", "CREDENTIALS_DIRECTORY": str(tmp_path)}
    ).flags
    assert flags.db_path == Path("/var/lib/tradecanvas/market.sqlite3")
    assert flags.ingest_token == TOKEN
    assert TOKEN not in repr(flags)
    assert ("TRADE_CANVAS_INGEST_TOKEN", "<redacted>") in describe_flags(flags)


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TRADE_CANVAS_")}
    return subprocess.run(
        [sys.executable, "-m", "tradecanvas", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.e2e
def test_none_derives_nothing() -> None:
    flags = build_runtime_flags({"TRADE_CANVAS_DERIVED_TIMEFRAMES": " None "}, {}).flags
    assert flags.derived_timeframes == ()
    assert not flags.derived_series()
    assert ("TRADE_CANVAS_DERIVED_TIMEFRAMES", "none") in describe_flags(flags)


def test_cli_flags_bad_value_exits_2() -> None:
    proc = _cli({"TRADE_CANVAS_BINANCE_WS_FLUSH_S": "abc"}, "flags")
    assert proc.returncode == 2
    assert "TRADE_CANVAS_BINANCE_WS_FLUSH_S:" in proc.stderr
    assert proc.stdout == ""


def test_a_bad_option_is_named_as_typed() -> None:
    # given as --series it is named so; the same value in the environment names the variable
    typed = _cli({}, "flags", "--series", "foo")
    assert typed.returncode == 2
    named = "tradecanvas: --series (over TRADE_CANVAS_SERIES): bad series_id"
    assert typed.stderr.startswith(named)
    from_env = _cli({"TRADE_CANVAS_SERIES": "foo"}, "flags")
    assert from_env.stderr.startswith("tradecanvas: TRADE_CANVAS_SERIES: bad series_id")


@pytest.mark.e2e
def test_cli_flags_prints_effective_values_token_redacted() -> None:
    proc = _cli({"TRADE_CANVAS_INGEST_TOKEN": TOKEN, "TRADE_CANVAS_TYPO": "1"}, "flags")
    assert proc.returncode == 0, proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr
    assert "TRADE_CANVAS_INGEST_TOKEN" in proc.stdout and "<redacted>" in proc.stdout
    assert "TRADE_CANVAS_TYPO: unknown variable" in proc.stderr
    assert len(proc.stdout.splitlines()) == len(FLAG_SPECS)


@pytest.mark.e2e
def test_cli_option_overrides_variable() -> None:
    proc = _cli({"TRADE_CANVAS_WS_PORT": "1234"}, "flags", "--ws-port", "4321")
    assert proc.returncode == 0
    assert any(
        line.split() == ["TRADE_CANVAS_WS_PORT", "4321"] for line in proc.stdout.splitlines()
    )


def test_blank_credential_means_no_token(tmp_path: Path) -> None:
    """The unit's SetCredential= fallback is a blank file: the write endpoint stays off."""
    (tmp_path / "ingest-token").write_text(" ")
    flags = build_runtime_flags({"CREDENTIALS_DIRECTORY": str(tmp_path)}).flags
    assert flags.ingest_token is None
    (tmp_path / "ingest-token").write_text("short\n")
    with pytest.raises(FlagError, match=r"TRADE_CANVAS_INGEST_TOKEN: .*too short"):
        build_runtime_flags({"CREDENTIALS_DIRECTORY": str(tmp_path)})


def test_data_dir_prefers_the_new_variable_and_reads_the_old_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    new, old = tmp_path / "new", tmp_path / "old"
    new.mkdir()
    old.mkdir()
    both = {"TRADE_CANVAS_DATA_DIR": str(new), "TRADECANVAS_DATA_DIR": str(old)}
    assert runtime_flags.binance_data_dir(both) == new
    runtime_flags._warned_old_data_dir = False
    with caplog.at_level("WARNING"):
        assert runtime_flags.binance_data_dir({"TRADECANVAS_DATA_DIR": str(old)}) == old
    assert "TRADECANVAS_DATA_DIR is deprecated; use TRADE_CANVAS_DATA_DIR" in caplog.text
    # a missing explicit folder falls through to the defaults beside the checkout
    assert runtime_flags.data_dir_candidates({"TRADE_CANVAS_DATA_DIR": str(tmp_path / "x")})[
        1:
    ] == runtime_flags.data_dir_candidates({})


def test_the_data_dir_variable_is_not_an_unknown_flag() -> None:
    assert runtime_flags.unknown_variable_warnings({"TRADE_CANVAS_DATA_DIR": "/x"}) == ()
    # its old name is ignored by serve, said as what it is (not "did you mean")
    assert runtime_flags.unknown_variable_warnings({"TRADECANVAS_DATA_DIR": "/x"}) == (
        "TRADECANVAS_DATA_DIR: unknown variable, ignored: the deprecated name of"
        " TRADE_CANVAS_DATA_DIR",
    )


@pytest.mark.parametrize("role", ["ingest", "edge"])
def test_the_split_roles_need_redis(role: str) -> None:
    with pytest.raises(FlagError) as info:
        build_runtime_flags({"TRADE_CANVAS_ROLE": role})
    assert info.value.variable == "TRADE_CANVAS_REDIS_URL"
    assert f"required by role {role}" in str(info.value)
    url = "redis://:secret@127.0.0.1:6379/0"
    flags = build_runtime_flags({"TRADE_CANVAS_ROLE": role, "TRADE_CANVAS_REDIS_URL": url}).flags
    assert (flags.role, flags.redis_url) == (role, url)
    assert "secret" not in repr(flags)
    assert ("TRADE_CANVAS_REDIS_URL", "redis://:<redacted>@127.0.0.1:6379/0") in describe_flags(
        flags
    )


def test_role_all_ignores_redis_and_serve_takes_role() -> None:
    flags = build_runtime_flags(
        {"TRADE_CANVAS_REDIS_URL": "redis://127.0.0.1:6379/0"}, {"role": "all"}
    ).flags
    assert flags.role == "all"
    assert build_runtime_flags({"TRADE_CANVAS_BUS_PREFIX": "tc:"}).flags.bus_prefix == "tc"


def test_the_ws_and_http_ports_on_one_address_must_differ() -> None:
    """Both listeners on 127.0.0.1:18997 refused each other at start-up with "address already
    in use", as if another program held the port."""
    same = {"TRADE_CANVAS_WS_PORT": "18997", "TRADE_CANVAS_HTTP_PORT": "18997"}
    with pytest.raises(FlagError) as info:
        build_runtime_flags(same)
    assert info.value.variable == "TRADE_CANVAS_HTTP_PORT"
    assert "18997 is TRADE_CANVAS_WS_PORT too" in str(info.value)
    with pytest.raises(FlagError):
        build_runtime_flags({**same, "TRADE_CANVAS_HTTP_HOST": "0.0.0.0"})
    apart = build_runtime_flags({**same, "TRADE_CANVAS_HTTP_HOST": "127.0.0.2"}).flags
    assert (apart.ws_port, apart.http_port) == (18997, 18997)
    assert build_runtime_flags({"TRADE_CANVAS_WS_PORT": "0", "TRADE_CANVAS_HTTP_PORT": "0"})


def test_every_line_of_the_env_file_uncommented_as_written_starts() -> None:
    """deploy/tradecanvas.env says each line shows its default (or, unset by default, an
    example), to uncomment and edit; the lines of the flags unset by default were
    ``#TRADE_CANVAS_DATABASE_URL=``, the Redis URL and the ingest token with nothing after
    the ``=``, and uncommented as they were refused (exit 2: not a PostgreSQL URL, the token
    too short). Every line now starts as written."""
    text = (Path(__file__).resolve().parents[1] / "deploy" / "tradecanvas.env").read_text()
    env = dict(re.findall(r"^#(TRADE_CANVAS_[A-Z0-9_]+)=(.*)$", text, re.M))
    assert len(env) >= 30 and all(env.values()), [k for k, v in env.items() if not v]
    flags = build_runtime_flags(env).flags
    assert flags.database_url is not None and flags.ingest_token is not None
