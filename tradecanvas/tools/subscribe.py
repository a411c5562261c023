"""``tradecanvas subscribe SERIES… [--since T] [--batch] [--pretty]`` (DESIGN §8).

A /ws/market client: it subscribes to each SERIES and prints every message the daemon sends,
one JSON object per line exactly as received (``--pretty``: a readable table instead). It
answers nothing and never sends more than the subscribes and its final close, so what it
prints is what any plain WebSocket client would get.

Exit codes (:data:`EXIT_CODES`, also in ``--help``): 0 after ``--count`` messages or when
the daemon closes normally (1000/1001); 1 when it cannot connect, the daemon refuses every
requested series, or closes with another code (the code and reason go to stderr); 2 for bad
arguments; 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final, TextIO, final

import trio
import trio_websocket

from tradecanvas.errors import ExitCode, SeriesIdError, find_in_group
from tradecanvas.model import SeriesId
from tradecanvas.tools.exit_codes import HELP_FORMATTER, ExitCodeTable, exit_codes_epilog
from tradecanvas.upstream.ws_client import open_websocket_client, parse_ws_url
from tradecanvas.wire.json import dumps, loads

DEFAULT_URL: Final = "ws://127.0.0.1:8765/ws/market"
CONNECT_TIMEOUT_S: Final = 10.0
NORMAL_CLOSE_CODES: Final = (1000, 1001)
REFUSAL_CODES: Final = ("bad_request", "unknown_series", "too_many_subscriptions")
EXIT_CODES: Final[ExitCodeTable] = (
    (ExitCode.OK, "after --count messages, or the daemon closed normally (1000/1001)"),
    (ExitCode.FAILED, "cannot connect, every series refused, or another close code"),
    (ExitCode.USAGE, "bad arguments (a series_id or URL)"),
    (ExitCode.INTERRUPTED, "Ctrl-C"),
)


def _since_arg(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an integer candle_time in unix seconds"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give unix seconds")
    return value


def _count_arg(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("--count must be at least 1")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``subscribe`` arguments to ``parser``."""
    parser.add_argument(
        "series",
        nargs="+",
        metavar="SERIES",
        help="series_id to subscribe to, such as binance:futures:BTC/USDT:1m (or …:5m)",
    )
    parser.add_argument(
        "--since",
        type=_since_arg,
        default=None,
        metavar="T",
        help="exclusive cursor, a candle_time in unix seconds: closed candles after T,"
        " then live (default: the newest catchup_limit candles, then live)",
    )
    parser.add_argument(
        "--batch",
        action="store_true",
        help="ask for candles_batch messages instead of one candle_closed per candle",
    )
    parser.add_argument(
        "--pretty", action="store_true", help="print a readable table instead of JSON lines"
    )
    parser.add_argument(
        "--url", default=DEFAULT_URL, help=f"the daemon's /ws/market URL (default {DEFAULT_URL})"
    )
    parser.add_argument(
        "--count",
        type=_count_arg,
        default=None,
        metavar="N",
        help="exit after printing N messages (for scripts)",
    )


# --- printing -------------------------------------------------------------------------

_TABLE_HEADER: Final = (
    f"{'TIME (UTC)':<19}  {'TYPE':<8}  {'SERIES':<30}  {'OPEN':>12}  {'HIGH':>12}"
    f"  {'LOW':>12}  {'CLOSE':>12}  {'VOLUME':>14}"
)


def _utc(t: object) -> str:
    if isinstance(t, int) and not isinstance(t, bool):
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")
    return f"{t!s:<19}"


def _num(value: object, width: int) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:>{width}.10g}"
    return f"{value!s:>{width}}"


def _candle_row(kind: str, series_id: object, candle: object) -> str:
    c = candle if isinstance(candle, dict) else {}
    return (
        f"{_utc(c.get('candle_time'))}  {kind:<8}  {series_id!s:<30}  {_num(c.get('open'), 12)}"
        f"  {_num(c.get('high'), 12)}  {_num(c.get('low'), 12)}  {_num(c.get('close'), 12)}"
        f"  {_num(c.get('volume'), 14)}"
    )


def format_pretty(message: object) -> list[str]:
    """The table rows for one server message."""
    if not isinstance(message, dict):
        return [f"{'':<19}  {'?':<8}  {dumps(message)}"]
    kind = message.get("type")
    sid = message.get("series_id", "")
    if kind == "candles_batch":
        candles = message.get("candles")
        return [_candle_row("closed", sid, c) for c in candles] if isinstance(candles, list) else []
    if kind == "candle_closed":
        return [_candle_row("closed", sid, message.get("candle"))]
    if kind == "candle_forming":
        return [_candle_row("forming", sid, message.get("candle"))]
    if kind == "gap":
        expected, actual = message.get("expected_next_time"), message.get("actual_time")
        return [
            f"{_utc(expected)}  {'gap':<8}  {sid!s:<30}  missing {_utc(expected)}"
            f" up to {_utc(actual)} (not at the exchange)"
        ]
    if kind == "system":
        return [f"{'':<19}  {'system':<8}  {sid!s:<30}  {message.get('message', '')}"]
    if kind == "error":
        return [
            f"{'':<19}  {'error':<8}  {sid!s:<30}  {message.get('code')}: {message.get('message')}"
        ]
    return [f"{'':<19}  {kind!s:<8}  {sid!s:<30}  {dumps(message)}"]


# --- the client -----------------------------------------------------------------------


async def subscribe_and_print(
    url: str,
    series: Sequence[SeriesId],
    *,
    since: int | None,
    batch: bool,
    pretty: bool,
    count: int | None,
    out: TextIO,
    err: TextIO,
) -> int:
    """Subscribe to ``series`` at ``url`` and print what arrives; returns the exit code.

    The client owns its TCP stream and closes it whoever ends the connection."""
    try:
        parse_ws_url(url)
    except ValueError as exc:
        err.write(f"tradecanvas subscribe: {exc}; expected ws://host:port/ws/market\n")
        return ExitCode.USAGE
    session = _Session(
        series, since=since, batch=batch, pretty=pretty, count=count, out=out, err=err
    )
    try:
        async with open_websocket_client(
            url, connect_timeout=CONNECT_TIMEOUT_S, disconnect_timeout=CONNECT_TIMEOUT_S
        ) as ws:
            return await session.run(ws)
    except trio_websocket.ConnectionRejected as exc:
        err.write(f"tradecanvas subscribe: {url} refused the connection: HTTP {exc.status_code}\n")
    except trio_websocket.ConnectionTimeout:
        err.write(f"tradecanvas subscribe: cannot connect to {url}: timed out\n")
    except trio_websocket.HandshakeError as exc:
        err.write(f"tradecanvas subscribe: cannot connect to {url}: {exc}\n")
    return ExitCode.FAILED


@final
class _Session:
    """Sends the subscribes, prints what comes back, decides the exit code."""

    def __init__(
        self,
        series: Sequence[SeriesId],
        *,
        since: int | None,
        batch: bool,
        pretty: bool,
        count: int | None,
        out: TextIO,
        err: TextIO,
    ) -> None:
        self.series = list(dict.fromkeys(str(s) for s in series))
        self.since = since
        self.batch = batch
        self.pretty = pretty
        self.count = count
        self.out = out
        self.err = err

    async def run(self, ws: trio_websocket.WebSocketConnection) -> int:
        wanted = set(self.series)
        refused: set[str] = set()
        printed = 0
        if self.pretty:
            self.out.write(_TABLE_HEADER + "\n")
            self.out.flush()
        for sid in self.series:
            request = {
                "type": "subscribe",
                "series_id": sid,
                "since": self.since,
                "supports_batch": self.batch,
            }
            await ws.send_message(dumps(request))
        while True:
            try:
                raw = await ws.get_message()
            except trio_websocket.ConnectionClosed as exc:
                return _closed(exc.reason, self.err)
            text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
            message = _parse(text)
            if self.pretty:
                for row in format_pretty(message):
                    self.out.write(row + "\n")
            else:
                self.out.write(text + "\n")
            self.out.flush()
            printed += 1
            if isinstance(message, dict) and _is_refusal(message, wanted):
                refused.add(str(message.get("series_id")))
                self.err.write(
                    f"tradecanvas subscribe: {message.get('series_id')}:"
                    f" {message.get('code')}: {message.get('message')}\n"
                )
                if refused >= wanted:
                    return ExitCode.FAILED
            if self.count is not None and printed >= self.count:
                return ExitCode.OK


def _parse(text: str) -> object:
    try:
        return loads(text)
    except ValueError:
        return text


def _is_refusal(message: dict[str, object], wanted: set[str]) -> bool:
    return (
        message.get("type") == "error"
        and message.get("code") in REFUSAL_CODES
        and message.get("series_id") in wanted
    )


def _closed(reason: trio_websocket.CloseReason | None, err: TextIO) -> int:
    code = reason.code if reason is not None else None
    why = f" {reason.reason}" if reason is not None and reason.reason else ""
    if code in NORMAL_CLOSE_CODES:
        err.write(f"tradecanvas subscribe: the daemon closed the connection ({code}{why})\n")
        return ExitCode.OK
    err.write(f"tradecanvas subscribe: connection closed: {code}{why}\n")
    return ExitCode.FAILED


def run_subscribe(args: argparse.Namespace) -> int:
    """Run the ``subscribe`` command with the arguments from :func:`configure_parser`;
    returns one of :data:`EXIT_CODES`."""
    try:
        series = [SeriesId.parse(text) for text in args.series]
    except SeriesIdError as exc:
        sys.stderr.write(f"tradecanvas subscribe: {exc}\n")
        return ExitCode.USAGE
    try:
        return trio.run(
            lambda: subscribe_and_print(
                args.url,
                series,
                since=args.since,
                batch=args.batch,
                pretty=args.pretty,
                count=args.count,
                out=sys.stdout,
                err=sys.stderr,
            )
        )
    except (KeyboardInterrupt, BaseExceptionGroup) as exc:
        if interrupted(exc):
            return ExitCode.INTERRUPTED
        raise


def interrupted(exc: BaseException) -> bool:
    """Is ``exc`` Ctrl-C, alone or grouped? Ctrl-C raised inside trio-websocket's nursery
    arrives grouped with the cancellation of its reader task."""
    return find_in_group(exc, KeyboardInterrupt) is not None


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (``python -m tradecanvas.tools.subscribe``)."""
    parser = argparse.ArgumentParser(
        prog="tradecanvas subscribe",
        description="Print what /ws/market sends.",
        epilog=exit_codes_epilog(EXIT_CODES),
        formatter_class=HELP_FORMATTER,
    )
    configure_parser(parser)
    return run_subscribe(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
