"""The ``tradecanvas`` command line (DESIGN §8)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from tradecanvas.errors import ExitCode, FlagError
from tradecanvas.runtime_flags import (
    FLAG_SPECS,
    LoadedFlags,
    describe_flags,
    load_runtime_flags,
)
from tradecanvas.tools import backfill, replay
from tradecanvas.tools import subscribe as subscribe_client

log = logging.getLogger("tradecanvas")


def _add_flag_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("flags (each overrides its TRADE_CANVAS_* variable)")
    for spec in FLAG_SPECS:
        group.add_argument(
            spec.option,
            dest=f"flag_{spec.field}",
            metavar="VALUE",
            help=f"{spec.help} [{spec.variable}]",
        )


def _load_flags(args: argparse.Namespace) -> LoadedFlags:
    overrides = {
        spec.field: value
        for spec in FLAG_SPECS
        if (value := getattr(args, f"flag_{spec.field}", None)) is not None
    }
    return load_runtime_flags(overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tradecanvas",
        description="Binance kline ingest daemon with a /ws/market re-publisher.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the daemon")
    _add_flag_options(serve)
    flags = sub.add_parser("flags", help="print the effective RuntimeFlags and exit")
    _add_flag_options(flags)
    replay_parser = sub.add_parser(
        "replay", help="serve recorded Binance data on loopback (a stand-in for Binance)"
    )
    replay.configure_parser(replay_parser)
    subscribe_parser = sub.add_parser(
        "subscribe", help="subscribe to /ws/market and print the messages"
    )
    subscribe_client.configure_parser(subscribe_parser)
    backfill_parser = sub.add_parser(
        "backfill", help="import a series' history from Binance REST, with a progress bar"
    )
    backfill.configure_parser(backfill_parser)
    _add_flag_options(backfill_parser)
    return parser


def _cmd_flags(loaded: LoadedFlags) -> int:
    width = max(len(name) for name, _ in describe_flags(loaded.flags))
    for name, value in describe_flags(loaded.flags):
        sys.stdout.write(f"{name.ljust(width)}  {value}\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command in ("serve", "flags", "backfill"):
        try:
            loaded = _load_flags(args)
        except FlagError as exc:
            sys.stderr.write(f"tradecanvas: {exc}\n")
            return ExitCode.USAGE
        for warning in loaded.warnings:
            log.warning("%s", warning)
        if args.command == "flags":
            return _cmd_flags(loaded)
        if args.command == "backfill":
            return backfill.run_backfill(args, loaded.flags)
        from tradecanvas.daemon import serve

        return serve(loaded.flags)
    if args.command == "replay":
        return replay.run_replay(args)
    if args.command == "subscribe":
        return subscribe_client.run_subscribe(args)
    parser.error(f"unknown command {args.command}")
