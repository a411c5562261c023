"""``tradecanvas subscribe SERIES… [--since T] [--events-after ID] [--batch] [--pretty]``
(DESIGN §8, §10).

A /ws/market client: it subscribes to each SERIES and prints every message the daemon sends,
one JSON object per line exactly as received (``--pretty``: a readable table instead). It
answers nothing and never sends more than the subscribes and its final close, so what it
prints is what any plain WebSocket client would get.

It keeps its cursors across reconnects (:mod:`tradecanvas.tools.subscribe_cursors`): when
the connection drops or the daemon restarts, it reconnects with backoff
(:data:`RECONNECT_BACKOFF`) and resubscribes each series with ``since`` (the last closed
candle received) and ``events_after`` (the last event received), so its output has nothing
lost or doubled. ``--no-reconnect`` ends at the first close instead.

Exit codes (:data:`EXIT_CODES`, also in ``--help``): 0 after ``--count`` messages, or (with
``--no-reconnect``) when the daemon closes normally (1000/1001); 1 when it cannot connect
the first time, the daemon refuses every requested series or the connection for good, or
closes with a code no reconnect can help (the code and reason go to stderr); 2 for bad
arguments; 130 on Ctrl-C.

A refusal with 404 at a URL whose path is not ``/ws/market`` says the path to use; the first
message without a ``type`` (the URL is Binance's stream, or ``tradecanvas replay``'s, not a
daemon's ``/ws/market``) is warned of on stderr, once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final, TextIO, final
from urllib.parse import urlsplit, urlunsplit

import attrs
import trio
import trio_websocket

from tradecanvas.errors import ExitCode, SeriesIdError, find_in_group
from tradecanvas.model import SeriesId
from tradecanvas.tools.exit_codes import HELP_FORMATTER, ExitCodeTable, exit_codes_epilog
from tradecanvas.tools.subscribe_cursors import SubscribeCursors
from tradecanvas.upstream.backoff import Backoff
from tradecanvas.upstream.ws_client import open_websocket_client, parse_ws_url
from tradecanvas.wire.json import dumps, loads

WS_PATH: Final = "/ws/market"
DEFAULT_URL: Final = f"ws://127.0.0.1:8765{WS_PATH}"
CONNECT_TIMEOUT_S: Final = 10.0
NORMAL_CLOSE_CODES: Final = (1000, 1001)
# closes a reconnect continues from: normal, going away (a restart), lost, server error,
# service restart, try again later, slow consumer
RESUMABLE_CLOSE_CODES: Final = (None, 1000, 1001, 1006, 1011, 1012, 1013, 4008)
# refused upgrades worth trying again: the daemon is shutting down, or a proxy's upstream is
RETRY_STATUSES: Final = (502, 503, 504)
# a restarting daemon is back within seconds; a longer outage is polled every 5 s at most
RECONNECT_BACKOFF: Final = Backoff(base_s=0.5, cap_s=5.0)
MAX_EVENT_ID: Final = 2**63 - 1
EXIT_CODES: Final[ExitCodeTable] = (
    (ExitCode.OK, "after --count messages; with --no-reconnect, a normal close too"),
    (ExitCode.FAILED, "cannot connect, every series refused, or a close no reconnect can help"),
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


def _event_id_arg(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an event_id (a whole number)") from None
    if not 0 <= value <= MAX_EVENT_ID:
        raise argparse.ArgumentTypeError(f"{value} is not an event_id: 0 up to 2**63-1")
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
        "--events-after",
        type=_event_id_arg,
        default=None,
        metavar="ID",
        help="event-log cursor, the last event_id you have: the stored events of each series"
        " after it first, then live ones (default: live events only; 0: every stored event)",
    )
    parser.add_argument(
        "--reconnect",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="when the connection drops or the daemon restarts, reconnect with backoff and"
        " resume each series from the last candle and event received (default: on)",
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
    if kind == "events_truncated":
        return [f"{'':<19}  {'truncated':<8}  {sid!s:<30}  {message.get('message', '')}"]
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
    events_after: int | None = None,
    reconnect: bool = True,
    backoff: Backoff = RECONNECT_BACKOFF,
) -> int:
    """Subscribe to ``series`` at ``url`` and print what arrives; returns the exit code.

    With ``reconnect``, a dropped connection (or a daemon restart) is reopened after
    ``backoff`` and every series resubscribed from its cursors. The client owns its TCP
    stream and closes it whoever ends the connection."""
    try:
        parse_ws_url(url)
    except ValueError as exc:
        err.write(f"tradecanvas subscribe: {exc}; expected ws://host:port/ws/market\n")
        return ExitCode.USAGE
    cursors = SubscribeCursors(
        [str(s) for s in series], since=since, events_after=events_after, batch=batch
    )
    printer = _Printer(pretty=pretty, count=count, out=out, err=err)
    failures = 0  # connection attempts in a row that delivered nothing
    while True:
        try:
            async with open_websocket_client(
                url, connect_timeout=CONNECT_TIMEOUT_S, disconnect_timeout=CONNECT_TIMEOUT_S
            ) as ws:
                end = await _follow(ws, cursors, printer, url)
        except trio_websocket.ConnectionRejected as exc:
            why = f"{url} refused the connection: HTTP {exc.status_code}{_path_hint(url, exc)}"
            if not printer.connected or exc.status_code not in RETRY_STATUSES:
                err.write(f"tradecanvas subscribe: {why}\n")
                return ExitCode.FAILED
        except (trio_websocket.ConnectionTimeout, trio_websocket.HandshakeError) as exc:
            why = f"cannot connect to {url}: {exc or 'timed out'}"
            if not printer.connected:
                err.write(f"tradecanvas subscribe: {why}\n")
                return ExitCode.FAILED
        else:
            if isinstance(end, int):
                return end
            why = f"connection closed: {end}"
            if not reconnect or end.code not in RESUMABLE_CLOSE_CODES:
                return _closed(end, err)
            if end.delivered:
                failures = 0
        failures += 1
        delay = backoff.delay(failures)
        err.write(f"tradecanvas subscribe: {why}; reconnecting in {delay:.1f}s\n")
        err.flush()
        await trio.sleep(delay)


def _path_hint(url: str, rejected: trio_websocket.ConnectionRejected) -> str:
    """After a 404 at another path: the path that serves the stream."""
    parts = urlsplit(url)
    if rejected.status_code != 404 or parts.path == WS_PATH:
        return ""
    return f" (the path is {WS_PATH}: {urlunsplit(parts._replace(path=WS_PATH))})"


@attrs.frozen
class _Closed:
    """How one connection ended: the daemon's close code and reason (None: lost), and
    whether it delivered any message."""

    code: int | None
    reason: str
    delivered: bool

    def __str__(self) -> str:
        return f"{self.code}{' ' + self.reason if self.reason else ''}"


@final
class _Printer:
    """Prints the messages of every connection in one output, and counts them."""

    def __init__(self, *, pretty: bool, count: int | None, out: TextIO, err: TextIO) -> None:
        self.pretty = pretty
        self.count = count
        self.out = out
        self.err = err
        self.printed = 0
        self.connected = False  # a connection has been opened before
        self.warned_untyped = False  # a message without a "type" was warned of

    def check_type(self, message: object, text: str, url: str) -> None:
        """Warn once of a message without a ``type``: not a /ws/market message."""
        if self.warned_untyped or (isinstance(message, dict) and "type" in message):
            return
        self.warned_untyped = True
        self.err.write(
            f'tradecanvas subscribe: warning: a message without a "type" ({text[:100]}):'
            f" is {url} a tradecanvas daemon's {WS_PATH}? (Binance's streams and"
            " `tradecanvas replay` send other messages; the daemon is on"
            f" ws://127.0.0.1:8765{WS_PATH} by default)\n"
        )
        self.err.flush()

    def print(self, text: str, message: object) -> None:
        if self.pretty:
            for row in format_pretty(message):
                self.out.write(row + "\n")
        else:
            self.out.write(text + "\n")
        self.out.flush()
        self.printed += 1

    @property
    def done(self) -> bool:
        return self.count is not None and self.printed >= self.count


async def _follow(
    ws: trio_websocket.WebSocketConnection, cursors: SubscribeCursors, printer: _Printer, url: str
) -> int | _Closed:
    """One connection: send the subscribes from the cursors, print what comes back. An
    exit code, or how the connection closed."""
    if printer.pretty and not printer.connected:
        printer.out.write(_TABLE_HEADER + "\n")
        printer.out.flush()
    if printer.connected:
        printer.err.write(
            f"tradecanvas subscribe: reconnected; resuming {len(cursors.active)} series\n"
        )
    printer.connected = True
    delivered = False
    try:
        for request in cursors.subscribe_messages():
            await ws.send_message(dumps(request))
        while True:
            raw = await ws.get_message()
            delivered = True
            end = _take(raw, cursors, printer, url)
            if end is not None:
                return end
    except trio_websocket.ConnectionClosed as exc:
        reason = exc.reason
        if reason is None:
            return _Closed(None, "", delivered)
        return _Closed(reason.code, reason.reason or "", delivered)


def _take(raw: str | bytes, cursors: SubscribeCursors, printer: _Printer, url: str) -> int | None:
    """Print one message unless it is a repeat; an exit code when the run is over."""
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    message = _parse(text)
    printer.check_type(message, text, url)
    if not cursors.take(message):
        return None  # a repeat the resubscription was bound to send (a gap)
    printer.print(text, message)
    if isinstance(message, dict) and message.get("type") == "error":
        sid, code, why = message.get("series_id"), message.get("code"), message.get("message")
        if sid in cursors.refused:
            printer.err.write(f"tradecanvas subscribe: {sid}: {code}: {why}\n")
            if not cursors.active:
                return ExitCode.FAILED
    return ExitCode.OK if printer.done else None


def _parse(text: str) -> object:
    try:
        return loads(text)
    except ValueError:
        return text


def _closed(end: _Closed, err: TextIO) -> int:
    if end.code in NORMAL_CLOSE_CODES:
        err.write(f"tradecanvas subscribe: the daemon closed the connection ({end})\n")
        return ExitCode.OK
    err.write(f"tradecanvas subscribe: connection closed: {end}\n")
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
                events_after=args.events_after,
                reconnect=args.reconnect,
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
