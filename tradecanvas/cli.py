"""The ``tradecanvas`` command line (DESIGN §8).

Each command's ``--help`` ends with the exit codes it uses, all :class:`ExitCode` members:
``serve`` and ``flags`` here (:data:`SERVE_EXIT_CODES`, :data:`FLAGS_EXIT_CODES`), the tools
in their modules (``EXIT_CODES``). ``serve`` imports the daemon only when it runs, so the
one-shot tools start without loading it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Final

from tradecanvas.errors import ExitCode, FlagError
from tradecanvas.ops.build import VERSION
from tradecanvas.ops.logs import configure_logging
from tradecanvas.runtime_flags import (
    FLAG_SPECS,
    LoadedFlags,
    describe_flags,
    load_runtime_flags,
)
from tradecanvas.store.pg_schema import SCHEMA_VERSION as PG_SCHEMA
from tradecanvas.store.schema import SCHEMA_VERSION as SQLITE_SCHEMA
from tradecanvas.tools import archive_fetch, backfill, export, importer, migrate_store, replay
from tradecanvas.tools import subscribe as subscribe_client
from tradecanvas.tools.exit_codes import HELP_FORMATTER, ExitCodeTable, exit_codes_epilog

log = logging.getLogger("tradecanvas")

SERVE_EXIT_CODES: Final[ExitCodeTable] = (
    (ExitCode.OK, "stopped by SIGTERM or SIGINT after a clean drain"),
    (ExitCode.FAILED, "could not start (such as a port in use) or failed unexpectedly"),
    (ExitCode.USAGE, "a bad flag; nothing was started"),
    (ExitCode.STORE_FAILURE, "the store failed, is another daemon's, or is half migrated"),
    (ExitCode.STORE_TOO_NEW, "the store's schema is newer than this release (a rollback)"),
    (ExitCode.INTERRUPTED, "a second SIGINT during the drain: exits at once"),
    (ExitCode.TERMINATED, "a second SIGTERM during the drain: exits at once"),
)
FLAGS_EXIT_CODES: Final[ExitCodeTable] = (
    (ExitCode.OK, "the flags were printed"),
    (ExitCode.USAGE, "a bad flag (the message names it)"),
)


def _add_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help_text: str,
    exit_codes: ExitCodeTable,
) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=help_text,
        description=f"tradecanvas {name}: {help_text}.",
        epilog=exit_codes_epilog(exit_codes),
        formatter_class=HELP_FORMATTER,
    )


# the flags the store tools take as options (the rest come from the environment only)
STORE_FLAGS: Final = ("derived_timeframes", "db_path", "database_url", "log_level")
# backfill's: the store's, the series the daemon serves (it warns of one outside them), the
# REST base URLs and the log format (serve's listeners, limits and bus are not its business)
BACKFILL_FLAGS: Final = (
    *STORE_FLAGS,
    "series",
    "binance_futures_rest_url",
    "binance_spot_rest_url",
    "log_format",
)


def _add_flag_options(parser: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
    group = parser.add_argument_group("flags (each overrides its TRADE_CANVAS_* variable)")
    for spec in FLAG_SPECS:
        if only is not None and spec.field not in only:
            continue
        group.add_argument(
            spec.option,
            dest=f"flag_{spec.field}",
            metavar="VALUE",
            help=f"{spec.help} [{spec.variable}"
            + ("]" if spec.default is None else f"; default {spec.default or 'empty'}]"),
        )


def _load_flags(args: argparse.Namespace) -> LoadedFlags:
    overrides = {
        spec.field: value
        for spec in FLAG_SPECS
        if (value := getattr(args, f"flag_{spec.field}", None)) is not None
    }
    return load_runtime_flags(overrides)


def _as_typed(exc: FlagError, args: argparse.Namespace) -> str:
    """The refusal of a flag, named as the user gave it: the option when it came from one."""
    for spec in FLAG_SPECS:
        if spec.variable == exc.variable and getattr(args, f"flag_{spec.field}", None) is not None:
            return f"{spec.option} (over {spec.variable}): {exc.problem}"
    return str(exc)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tradecanvas",
        description="Binance kline ingest daemon with a /ws/market re-publisher.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"tradecanvas {VERSION} (candle store schema: SQLite {SQLITE_SCHEMA},"
        f" PostgreSQL {PG_SCHEMA})",
        help="print the release and the candle store schema it writes, and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = _add_command(sub, "serve", "run the daemon", SERVE_EXIT_CODES)
    _add_flag_options(serve)
    flags = _add_command(
        sub, "flags", "print the effective RuntimeFlags and exit", FLAGS_EXIT_CODES
    )
    _add_flag_options(flags)
    replay_parser = _add_command(
        sub,
        "replay",
        "serve recorded Binance data on loopback (a stand-in for Binance)",
        replay.EXIT_CODES,
    )
    replay.configure_parser(replay_parser)
    subscribe_parser = _add_command(
        sub,
        "subscribe",
        "subscribe to /ws/market and print the messages",
        subscribe_client.EXIT_CODES,
    )
    subscribe_client.configure_parser(subscribe_parser)
    backfill_parser = _add_command(
        sub,
        "backfill",
        "import a series' history from Binance REST, with a progress bar",
        backfill.EXIT_CODES,
    )
    backfill.configure_parser(backfill_parser)
    _add_flag_options(backfill_parser, BACKFILL_FLAGS)
    migrate_parser = _add_command(
        sub,
        "migrate-store",
        "copy a SQLite store into PostgreSQL (idempotent, with progress)",
        migrate_store.EXIT_CODES,
    )
    migrate_store.configure_parser(migrate_parser)
    archive_fetch.configure_parser(
        _add_command(
            sub,
            "fetch-archive",
            "download Binance archive days, SHA-256 verified",
            archive_fetch.EXIT_CODES,
        )
    )
    import_parser = _add_command(
        sub,
        "import",
        "import Binance archive kline zips/CSVs (.CHECKSUM verified), with progress",
        importer.EXIT_CODES,
    )
    importer.configure_parser(import_parser)
    _add_flag_options(import_parser, STORE_FLAGS)
    export_parser = _add_command(
        sub,
        "export",
        "write a series' stored candles in the archive's CSV layout",
        export.EXIT_CODES,
    )
    export.configure_parser(export_parser)
    _add_flag_options(export_parser, STORE_FLAGS)
    return parser


def _cmd_flags(loaded: LoadedFlags) -> int:
    width = max(len(name) for name, _ in describe_flags(loaded.flags))
    for name, value in describe_flags(loaded.flags):
        sys.stdout.write(f"{name.ljust(width)}  {value}\n")
    return ExitCode.OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit code (argparse exits with 2 for bad usage). A
    reader of its output that goes away (``tradecanvas flags | head``) ends it quietly."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(parser, args)
    except (BrokenPipeError, BaseExceptionGroup) as exc:
        if isinstance(exc, BaseExceptionGroup) and exc.split(BrokenPipeError)[1] is not None:
            raise
        # the rest of the output has nowhere to go, the flush at exit included
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.OK


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command in ("serve", "flags", "backfill", "import", "export"):
        try:
            loaded = _load_flags(args)
        except FlagError as exc:
            sys.stderr.write(f"tradecanvas: {_as_typed(exc, args)}\n")
            return ExitCode.USAGE
        if args.command == "serve":  # its warnings below in the format it logs in
            configure_logging(loaded.flags)
        for warning in loaded.warnings:
            log.warning("%s", warning)
        if args.command == "flags":
            return _cmd_flags(loaded)
        if args.command == "backfill":
            return backfill.run_backfill(args, loaded.flags)
        if args.command == "import":
            return importer.run_import_command(args, loaded.flags)
        if args.command == "export":
            return export.run_export(args, loaded.flags)
        from tradecanvas.daemon import serve

        return serve(loaded.flags)
    if args.command == "replay":
        return replay.run_replay(args)
    if args.command == "subscribe":
        return subscribe_client.run_subscribe(args)
    if args.command == "migrate-store":
        return migrate_store.run_migrate_store(args)
    if args.command == "fetch-archive":
        return archive_fetch.run_fetch_archive(args)
    parser.error(f"unknown command {args.command}")
