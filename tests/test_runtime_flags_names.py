"""Warnings of variables that look like ours but are not: a mistyped prefix is warned about
like an unknown ``TRADE_CANVAS_*`` variable, and a suggestion is only made for a typo."""

from __future__ import annotations

from tradecanvas.runtime_flags import (
    KNOWN_VARIABLES,
    build_runtime_flags,
    closest_variable,
    unknown_variable_warnings,
)


def test_a_mistyped_prefix_is_warned_about_naming_the_variable() -> None:
    loaded = build_runtime_flags(
        {
            "TRADECANVAS_SERIES": "binance:futures:ETH/USDT:1m",
            "trade_canvas_db_path": "elsewhere.sqlite3",
            "Trade_Canvas_Log_Level": "DEBUG",
            "TRADE-CANVAS-WS-PORT": "1",
        }
    )
    assert loaded.warnings == (
        "TRADE-CANVAS-WS-PORT: unknown variable, ignored; did you mean TRADE_CANVAS_WS_PORT?",
        "TRADECANVAS_SERIES: unknown variable, ignored; did you mean TRADE_CANVAS_SERIES?",
        "Trade_Canvas_Log_Level: unknown variable, ignored; did you mean TRADE_CANVAS_LOG_LEVEL?",
        "trade_canvas_db_path: unknown variable, ignored; did you mean TRADE_CANVAS_DB_PATH?",
    )
    assert loaded.flags.log_level == "INFO"  # ignored, as the warning says


def test_other_programs_variables_are_left_alone() -> None:
    environ = {"TRADECANVAS_HOME": "/x", "PATH": "/bin", "TRADE_CANVAS_SERIES": "x"}
    assert unknown_variable_warnings(environ) == ()


def test_a_suggestion_is_only_made_for_a_typo() -> None:
    # an older release, without HTTP_SEND_TIMEOUT_S: it is not a typo of HTTP_BODY_TIMEOUT_S
    older = KNOWN_VARIABLES - {"TRADE_CANVAS_HTTP_SEND_TIMEOUT_S"}
    assert "TRADE_CANVAS_HTTP_BODY_TIMEOUT_S" in older
    assert closest_variable("TRADE_CANVAS_HTTP_SEND_TIMEOUT_S", older) is None
    assert unknown_variable_warnings({"TRADE_CANVAS_HTTP_SENDER_S": "5"}) == (
        "TRADE_CANVAS_HTTP_SENDER_S: unknown variable, ignored (not a variable of this release)",
    )
    for typo, meant in (
        ("TRADE_CANVAS_SERIEZ", "TRADE_CANVAS_SERIES"),
        ("TRADE_CANVAS_LOGLEVEL", "TRADE_CANVAS_LOG_LEVEL"),
        ("TRADE_CANVAS_DB_PAHT", "TRADE_CANVAS_DB_PATH"),
        ("TRADE_CANVAS_INITIAL_BACKFIL_CANDLES", "TRADE_CANVAS_INITIAL_BACKFILL_CANDLES"),
    ):
        assert closest_variable(typo, KNOWN_VARIABLES) == meant
    assert closest_variable("TRADE_CANVAS_FOO", KNOWN_VARIABLES) is None
