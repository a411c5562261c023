"""``tradecanvas replay``'s command line: options → ReplayConfig, signals, exit codes.

It reads the files before anything listens (a bad file is a usage error, exit 2), prints
``replay ws=… rest=…`` once listening, ``replay finished bars=… frames=…`` when the data is
over and ``replay resumed`` when SIGUSR1 starts a ``--paused`` timeline; SIGINT or SIGTERM
stops it (exit 0: that is how a replay ends). Exit codes: :data:`EXIT_CODES`.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
from collections.abc import Sequence
from typing import Final

import trio

from tradecanvas.errors import ExitCode, first_leaf
from tradecanvas.model import MARKETS
from tradecanvas.tools.exit_codes import HELP_FORMATTER, ExitCodeTable, exit_codes_epilog
from tradecanvas.tools.replay.data import (
    ReplayConfig,
    ReplayData,
    ReplayError,
    load_data,
    parse_file_argument,
)
from tradecanvas.tools.replay.server import ReplayHandle, listen_ports, serve_replay_data

SUMMARY: Final = "``tradecanvas replay FILE…``: a loopback stand-in for Binance (DESIGN §8)."
EXIT_CODES: Final[ExitCodeTable] = (
    (ExitCode.OK, "stopped by SIGINT (Ctrl-C) or SIGTERM, the normal end of a replay"),
    (ExitCode.FAILED, "it could not serve (such as a port in use; one line says why)"),
    (ExitCode.USAGE, "a bad option, or a file that is missing, unreadable or holds no klines"),
)


def _indices(values: Sequence[str]) -> frozenset[int]:
    result: set[int] = set()
    for value in values:
        for part in value.split(","):
            if part.strip():
                result.add(int(part))
    return frozenset(result)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """The ``tradecanvas replay`` options."""
    parser.add_argument(
        "files",
        nargs="*",
        metavar="FILE",
        help="kline CSV (data.binance.vision or open_time,open,high,low,close,volume) or"
        " combined-stream JSONL; SERIES_ID=FILE names a CSV's series",
    )
    parser.add_argument(
        "--history",
        action="append",
        default=[],
        metavar="FILE",
        help="like FILE, but served on REST only (history before the stream, or a REST-only"
        " stand-in)",
    )
    parser.add_argument(
        "--market",
        choices=MARKETS,
        help="market of the files (default: from the path, else futures)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address (loopback)")
    parser.add_argument(
        "--port", type=int, default=0, help="WebSocket port; REST on the one above (0 = any free)"
    )
    parser.add_argument("--ws-port", type=int, help="WebSocket port (default: --port)")
    parser.add_argument(
        "--rest-port", type=int, help="REST port (default: --port + 1; any free if --port is 0)"
    )
    parser.add_argument("--speed", default="1", help="a multiple of real time, or max (default 1)")
    parser.add_argument("--forming-per-bar", type=int, default=3, help="forming frames per CSV bar")
    parser.add_argument(
        "--start-at",
        type=int,
        default=0,
        metavar="BAR",
        help="stream from this bar; earlier ones are REST history",
    )
    parser.add_argument(
        "--drop-at",
        type=int,
        action="append",
        default=[],
        metavar="BAR",
        help="drop every connection before this bar's close",
    )
    parser.add_argument(
        "--skip",
        type=int,
        default=0,
        metavar="N",
        help="after a drop, also skip the N following bars on the WS",
    )
    parser.add_argument(
        "--omit-close",
        action="append",
        default=[],
        metavar="BAR[,BAR]",
        help="never send these bars' closed frames",
    )
    parser.add_argument(
        "--omit-close-every", type=int, metavar="N", help="omit the close of every Nth bar"
    )
    parser.add_argument(
        "--duplicate-close",
        action="append",
        default=[],
        metavar="BAR[,BAR]",
        help="send these bars' closed frames twice",
    )
    parser.add_argument(
        "--duplicate-close-every",
        type=int,
        metavar="N",
        help="duplicate the close of every Nth bar",
    )
    parser.add_argument(
        "--exchange-hole",
        action="append",
        default=[],
        metavar="BAR:N",
        help="N bars missing at the exchange (WS and REST)",
    )
    parser.add_argument(
        "--rest-429-first", action="store_true", help="answer the first klines call with 429"
    )
    parser.add_argument(
        "--retry-after", type=int, default=1, metavar="S", help="Retry-After of that 429"
    )
    parser.add_argument(
        "--paused",
        action="store_true",
        help="send nothing until SIGUSR1 (attach consumers first); REST answers meanwhile",
    )
    parser.add_argument(
        "--phase-3d",
        type=int,
        choices=(0, 1, 2),
        metavar="DAYS",
        help="3d bars open on days with (days since 1970) mod 3 = DAYS (0, 1 or 2; default:"
        " the documented phase of a known symbol, else 0)",
    )
    parser.add_argument(
        "--weight-limit",
        type=int,
        metavar="N",
        help="REQUEST_WEIGHT per minute that exchangeInfo reports (default: Binance's usual)",
    )


def config_from_args(args: argparse.Namespace) -> ReplayConfig:
    """Raises ReplayError naming the bad option (or file)."""
    speed: float | None
    if str(args.speed).lower() == "max":
        speed = None
    else:
        try:
            speed = float(args.speed)
        except ValueError:
            raise ReplayError(f"--speed {args.speed!r}: a positive number or max") from None
        if not (speed > 0 and math.isfinite(speed)):
            raise ReplayError(f"--speed {args.speed!r}: a positive number or max")
    files = tuple(parse_file_argument(f, args.market) for f in args.files) + tuple(
        parse_file_argument(f, args.market, stream=False) for f in args.history
    )
    if not files:
        raise ReplayError("no files: give at least one FILE or --history FILE")
    try:
        omit = set(_indices(args.omit_close))
        duplicate = set(_indices(args.duplicate_close))
        holes = []
        for text in args.exchange_hole:
            start, _, count = text.partition(":")
            holes.append((int(start), int(count or 1)))
    except ValueError as exc:
        raise ReplayError(f"bad bar index: {exc}") from None
    for name, value in (
        ("--omit-close-every", args.omit_close_every),
        ("--duplicate-close-every", args.duplicate_close_every),
    ):
        if value is not None and value < 1:
            raise ReplayError(f"{name} must be at least 1")
    if args.forming_per_bar < 0 or args.skip < 0 or args.start_at < 0:
        raise ReplayError("--forming-per-bar, --skip and --start-at must not be negative")
    if args.weight_limit is not None and args.weight_limit < 1:
        raise ReplayError("--weight-limit must be at least 1")
    return ReplayConfig(
        files=files,
        host=args.host,
        port=args.port,
        ws_port=args.ws_port,
        rest_port=args.rest_port,
        speed=speed,
        forming_per_bar=args.forming_per_bar,
        start_at=args.start_at,
        drop_at=tuple(args.drop_at),
        skip=args.skip,
        omit_closes=frozenset(omit),
        omit_close_every=args.omit_close_every,
        duplicate_closes=frozenset(duplicate),
        duplicate_close_every=args.duplicate_close_every,
        exchange_holes=tuple(holes),
        rest_429_first=args.rest_429_first,
        retry_after_s=args.retry_after,
        weight_limit=args.weight_limit,
        paused=args.paused,
        phase_3d_days=args.phase_3d,
    )


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _serve_until_signalled(config: ReplayConfig, data: ReplayData) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGUSR1) as signals:
        async with trio.open_nursery() as nursery:
            handle: ReplayHandle = await nursery.start(serve_replay_data, config, data)
            paused = " paused (SIGUSR1 starts it)" if config.paused else ""
            _say(f"replay ws={handle.ws_url} rest={handle.rest_url}{paused}")

            async def report_finish() -> None:
                await handle.finished.wait()
                stats = handle.statistics()
                _say(f"replay finished bars={stats.bars} frames={stats.frames_sent}")

            nursery.start_soon(report_finish)
            async for signum in signals:
                if signum != signal.SIGUSR1:
                    nursery.cancel_scope.cancel()
                    break
                if handle.resume():
                    _say("replay resumed")


def run_replay(args: argparse.Namespace) -> int:
    """``tradecanvas replay``: serve until SIGINT/SIGTERM (SIGUSR1 resumes ``--paused``);
    returns :data:`EXIT_CODES`' OK, or USAGE for bad input."""
    try:
        config = config_from_args(args)
        data = load_data(config)  # bad files are reported before anything listens
        if not data.minutes:
            raise ReplayError("the replay files hold no klines")
        trio.run(_serve_until_signalled, config, data)
    except ReplayError as exc:
        sys.stderr.write(f"tradecanvas replay: {exc}\n")
        return ExitCode.USAGE
    except (OSError, BaseExceptionGroup) as exc:
        # a port in use or an address not this machine's: one line, not nested groups
        group = BaseExceptionGroup("", [exc])
        if group.split(OSError)[1] is not None:
            raise
        ws_port, rest_port = listen_ports(config)
        where = f"{config.host}, ports {ws_port} (WebSocket) and {rest_port} (REST)"
        sys.stderr.write(f"tradecanvas replay: cannot listen on {where}: {first_leaf(group)}\n")
        return ExitCode.FAILED
    return ExitCode.OK


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (``python -m tradecanvas.tools.replay``)."""
    parser = argparse.ArgumentParser(
        prog="tradecanvas replay",
        description=SUMMARY,
        epilog=exit_codes_epilog(EXIT_CODES),
        formatter_class=HELP_FORMATTER,
    )
    configure_parser(parser)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_replay(parser.parse_args(argv))
