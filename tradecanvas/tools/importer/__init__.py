"""``tradecanvas import FILE|DIR…``: Binance's public kline archive into the store (DESIGN §8).

Reads ``data.binance.vision`` kline files — daily or monthly zips with their ``.CHECKSUM``
beside them, or the CSVs inside (12 columns, spot without a header and USDⓈ-M with one,
millisecond or microsecond times; also the 6-column ``open_time,open,high,low,close,volume``
layout) — and commits their 1m candles through the pipeline's commit step in large
transactions, so every touched bucket of the derived timeframes is recomputed from the stored
minutes. The series comes from each file's name (``BTCUSDT-1m-2020-01-01.zip`` →
``binance:<market>:BTC/USDT:1m``, the market from the path or ``--market``) or ``--series``.

A zip's SHA-256 is checked against its ``.CHECKSUM`` before anything of it is read; a
mismatch, a corrupt or truncated zip, a malformed row (the file and line are named), a row
outside the file's day or month is refused: nothing of that file is stored, the files before
it stay imported, and the command exits 1; a file of another interval than 1m is refused
before any file is read (exit 1, nothing imported). The derived timeframes are the store's
recorded ones unless given (``settings``).

Events: one ``factor.rebuild`` with reason ``import`` per series whose stored history changed,
with the exact ``candle_time`` range changed, logged at the end (see
:mod:`~tradecanvas.tools.importer.commit`). Nothing is published by this process: a daemon on
the same store sends the event to its live subscribers (``serve/event_tail.py``); resuming
ones read it from the event log (``events_after``, ``GET /api/market/events``).

Idempotent and resumable: candles are upserted by (series, open time), so a second run of the
same files stores nothing, logs no event and says so; an interrupted run (Ctrl-C, SIGTERM, a
crash) keeps every transaction it committed, and running the same command again goes on: the
files already stored are read again and come out unchanged. A run stopped by a signal logs the
``import`` event for what it committed as it ends; a crashed one leaves the range it changed
recorded (meta ``import_pending``), and the next run's one event covers both runs.

Modules: ``files`` (finding, planning, verifying and reading files), ``settings`` (the
derived timeframes against the store's recorded ones), ``commit`` (the transactions and
the event), ``tally`` (the summary), ``cli`` (the trio shell and the command line); the pure
parser is :mod:`tradecanvas.wire.archive`.
"""

from __future__ import annotations

from tradecanvas.tools.importer.cli import (
    DEFAULT_BATCH,
    EXIT_CODES,
    configure_parser,
    import_files,
    plan_import,
    run_import,
    run_import_command,
)
from tradecanvas.tools.importer.commit import IMPORT_REASON, PENDING_KEY, ArchiveCommitter
from tradecanvas.tools.importer.files import ArchiveFileError, ImportFile, read_file
from tradecanvas.tools.importer.tally import ImportTally

__all__ = [
    "DEFAULT_BATCH",
    "EXIT_CODES",
    "IMPORT_REASON",
    "PENDING_KEY",
    "ArchiveCommitter",
    "ArchiveFileError",
    "ImportFile",
    "ImportTally",
    "configure_parser",
    "import_files",
    "plan_import",
    "read_file",
    "run_import",
    "run_import_command",
]
