"""``tradecanvas backfill SERIES --from T [--to T]``: REST history import (DESIGN §8).

Imports the closed 1m candles of one base series for ``[from, to)`` from Binance REST klines
into the store, a page at a time (futures 1500 minutes, spot 1000), each page committed
through the same :class:`~tradecanvas.pipeline.IngestPipeline` the daemon uses — with the
flags' derived timeframes and derivation fingerprint (3d on the symbol's grid, learned as
the daemon learns it) — so the derived bars of every touched bucket are recomputed from the
stored minutes, and a second run of the same range stores nothing new. Minutes missing at
the exchange inside the series' history are stored as ``gap`` events with the first candle
above them. Nothing is published: this process has no subscribers. A running daemon on the
same store sends its events to its subscribers (``serve/event_tail.py``), who reload the
range, and the history comes from the store when they (re)subscribe; running beside
the daemon is safe (one SQLite file in WAL mode, each writer waits up to the store's
``busy_timeout`` for the other's short transaction).

Time: ``--to`` defaults to now (wall clock) floored to the minute, and the end is then capped
at Binance's own current minute (``/time``, DESIGN §1.2), so the forming minute is never
requested even when the local clock runs ahead; every minute of the range has closed at the
exchange, so a minute the REST answer lacks is missing at the exchange and reported as such.

Resumable and idempotent: a page the store already holds whole (every minute) is skipped
without a REST call (``--refetch`` fetches it anyway), so a run after an interruption continues
where the last one stopped, and a second identical run fetches only the pages with exchange
holes, writes nothing and says ``nothing changed``; a hole whose first candle above was stored
already is not recorded again.

Progress goes to stderr (the shared :mod:`tradecanvas.tools.progress`): a rich bar with the
rate and the time left on a terminal, else a log line at most every
:data:`~tradecanvas.tools.progress.PROGRESS_LOG_INTERVAL_S` and one at the end.
The summary goes to stdout: minutes requested, candles fetched, new, already stored
(unchanged), revised, missing at the exchange; derived bars written per derived series; the
missing minutes as ranges — holes (``gap`` events), after the last candle, before the first;
pages skipped; time taken.

Exit codes (:data:`~tradecanvas.tools.backfill.cli.EXIT_CODES`, also in ``--help``): 0 done;
1 Binance REST failed for good (UpstreamError) or sent something we refuse (WireError,
CandleError) — the pages committed before stay committed; 2 bad arguments or flags (nothing is
changed); 3 the store failed (as ``serve``); 4 the store's schema is newer than this release;
130 on Ctrl-C (143 on SIGTERM): the page being committed is finished, the one being fetched is
dropped. A second Ctrl-C exits at once; SQLite rolls back a commit it interrupts.

The modules: ``plan`` is the pure part (arguments, pages, holes, the tally and its summary;
the counting itself is :mod:`tradecanvas.tools.tally`'s),
``progress`` the display on stderr, ``cli`` the trio shell and the command line.
"""

from __future__ import annotations

from tradecanvas.tools.backfill.cli import (
    BACKFILL_WEIGHT_BUDGET,
    EXIT_CODES,
    BackfillOutcome,
    cap_at_exchange,
    configure_parser,
    find_holes,
    import_history,
    learn_phases,
    run_backfill,
    run_import,
)
from tradecanvas.tools.backfill.plan import (
    BackfillPlan,
    BackfillTally,
    HoleFinder,
    page_alignment,
    parse_time,
    plan_backfill,
    unrecorded,
)
from tradecanvas.tools.backfill.progress import Progress
from tradecanvas.tools.tally import iso_minute

__all__ = [
    "BACKFILL_WEIGHT_BUDGET",
    "EXIT_CODES",
    "BackfillOutcome",
    "BackfillPlan",
    "BackfillTally",
    "HoleFinder",
    "Progress",
    "cap_at_exchange",
    "configure_parser",
    "find_holes",
    "import_history",
    "iso_minute",
    "learn_phases",
    "page_alignment",
    "parse_time",
    "plan_backfill",
    "run_backfill",
    "run_import",
    "unrecorded",
]
