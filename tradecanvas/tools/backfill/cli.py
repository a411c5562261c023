"""``tradecanvas backfill``'s trio shell and command line: fetch, commit, signals, exit codes.

:func:`run_backfill` checks the arguments (:func:`~tradecanvas.tools.backfill.plan.plan_backfill`),
then :func:`run_import` opens the store and a REST client, ends the range at Binance's clock
(:func:`cap_at_exchange`), learns the symbol's 3d grid when 3d is derived
(:func:`~tradecanvas.upstream.phases.learn_phase`, as the daemon does) and
:func:`import_history` commits page after page through an
:class:`~tradecanvas.pipeline.IngestPipeline` — with the exchange holes each page shows
(:class:`~tradecanvas.tools.backfill.plan.HoleFinder`) as ``gap`` events — updating the tally
and the progress display.

Ctrl-C or SIGTERM stops the import after the page being committed (the one being fetched is
dropped); a second one exits at once, and SQLite rolls back a commit it interrupts. Every
exit code is one of :data:`EXIT_CODES`.
"""

from __future__ import annotations

import argparse
import functools
import logging
import time
from collections.abc import Sequence
from typing import Final, TextIO, final

import attrs
import trio

from tradecanvas.errors import BadInputError, ExitCode, StoreError, UpstreamError
from tradecanvas.model import MINUTE, MS, Candle
from tradecanvas.ops.logs import configure_logging
from tradecanvas.pipeline.commit import IngestBatch, IngestPipeline, PipelineResult
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.runtime_flags import RuntimeFlags
from tradecanvas.store.open import describe_location, open_store, store_location
from tradecanvas.store.records import StoreBanMemory
from tradecanvas.tools.backfill.plan import (
    TIME_EXAMPLES,
    BackfillPlan,
    BackfillTally,
    HoleFinder,
    page_alignment,
    plan_backfill,
    unrecorded,
)
from tradecanvas.tools.backfill.progress import ClearProgressFilter, Progress
from tradecanvas.tools.command import FlagCommand
from tradecanvas.tools.exit_codes import ExitCodeTable
from tradecanvas.tools.importer.settings import (
    Derivation,
    DerivationConflict,
    add_rebuild_option,
    choose,
    from_flags,
    recorded_fingerprints,
)
from tradecanvas.tools.signals import StopOnSignal
from tradecanvas.tools.tally import iso_minute
from tradecanvas.upstream.phases import learn_phase
from tradecanvas.upstream.rest import BinanceRestClient, RestPolicy, open_rest_client

# the command's one logger: its lines name ``tradecanvas.tools.backfill``
log = logging.getLogger(__package__)
# Ctrl-C/SIGTERM: stop after the page in flight; a second one: at once
_SIGNALS: Final = StopOnSignal("backfill", "the page", log)

# Of Binance's per-minute request weight: the daemon keeps to 80%, so a bulk import beside it
# stops at half and leaves the daemon room for its own repairs.
BACKFILL_WEIGHT_BUDGET: Final = 0.5
EXIT_CODES: Final[ExitCodeTable] = (
    (ExitCode.OK, "done"),
    (ExitCode.FAILED, "Binance REST failed for good or sent data we refuse (pages done stay)"),
    (ExitCode.USAGE, "bad arguments or flags, a range after Binance's clock (no change)"),
    (ExitCode.STORE_FAILURE, "the store failed (disk full, read-only, corrupt), as for serve"),
    (ExitCode.STORE_TOO_NEW, "the store's schema is newer than this release (a rollback)"),
    (ExitCode.INTERRUPTED, "Ctrl-C: the page being committed is finished, the rest is not"),
    (ExitCode.TERMINATED, "SIGTERM, as Ctrl-C"),
)
# the exit code of a stop by signal


@final
class _NoSubscribers:
    """The pipeline's publish target in this process: there is nobody to tell. The import
    never calls ``IngestPipeline.publish``; this only satisfies the constructor."""

    def publish_closed(self, series_id: str, candles: Sequence[Candle]) -> Sequence[str]:
        return ()

    def publish_system(self, event: SystemEvent) -> Sequence[str]:
        return ()


async def import_history(
    plan: BackfillPlan,
    pipeline: IngestPipeline,
    rest: BinanceRestClient,
    tally: BackfillTally,
    progress: Progress,
    holes: HoleFinder | None = None,
    *,
    refetch: bool = False,
) -> None:
    """Fetch and commit each page of ``plan`` in order, updating ``tally`` after each page;
    the minutes a page lacks that ``holes`` says are exchange holes are committed with it
    (``gap`` events, each hole once; None: the store's history decides, see
    :func:`find_holes`).

    Resumable: a page whose every minute the store already holds is skipped without a REST
    call (``refetch`` fetches it anyway, to pick up revisions), so a run after an
    interruption continues where the last one stopped, and a second identical run fetches
    only the pages with minutes missing at the exchange and changes nothing.

    Raises UpstreamError, WireError (REST) and CandleError (a row we refuse: the page is not
    stored), StoreError. Cancellation stops it between commits: a fetch is dropped, a commit
    that started runs to its end.
    """
    if holes is None:
        holes = await find_holes(plan, pipeline)
    tally.candle_below = holes.candle_below
    sid = str(plan.series)
    for start, end in plan.chunks():
        stored = {s.candle.candle_time for s in await pipeline.store.range(sid, start, end)}
        if not refetch and len(stored) == (end - start) // MINUTE:
            holes.page(start, end, sorted(stored))  # its holes were recorded with it
            tally.skip(start, end)
            progress.update(tally, trio.current_time())
            continue
        candles = await rest.klines(plan.series, start, end)
        present = [c.candle_time for c in candles]
        absent = unrecorded(holes.page(start, end, present), present, stored)
        result: PipelineResult | None = None
        if candles or absent:
            batch = IngestBatch(
                tuple((plan.series, c) for c in candles),
                "rest",
                absent=tuple((plan.series, a, b) for a, b in absent),
            )
            # store.write shields the transaction already; the shield here also keeps the
            # tally in step with what was committed
            with trio.CancelScope(shield=True):
                result = await pipeline.run(batch)
        tally.record(start, end, candles, result, holes_recorded=len(absent))
        progress.update(tally, trio.current_time())


async def find_holes(plan: BackfillPlan, pipeline: IngestPipeline) -> HoleFinder:
    """A HoleFinder for ``plan``: does the store hold a candle of the series below it?"""
    earliest = await pipeline.store.since(str(plan.series), -1, 1)
    return HoleFinder(candle_below=bool(earliest) and earliest[0].candle_time < plan.start)


async def learn_phases(
    plan: BackfillPlan, pipeline: IngestPipeline, rest: BinanceRestClient
) -> None:
    """The symbol's grid phase for each phased timeframe derived (3d), learned as the daemon
    learns it (Binance, else the store's memory, else the documented table); without it
    those bars are not derived (learn_phase warns). Raises StoreError."""
    for timeframe in pipeline.derived_timeframes:
        if timeframe.phased:
            phase = await learn_phase(plan.series, timeframe, rest, pipeline.store)
            if phase is not None:
                pipeline.set_phase(plan.series, phase)


async def cap_at_exchange(plan: BackfillPlan, rest: BinanceRestClient) -> BackfillPlan | None:
    """End the range at Binance's current minute (its ``/time``), so the forming minute is
    never requested; None when the whole range lies at or after it."""
    server_s = await rest.server_time_ms(plan.series.market) // MS
    exchange_minute = server_s - server_s % MINUTE
    capped = plan.capped_at(exchange_minute)
    if capped is None or capped.end == plan.end:
        return capped
    # a default --to one minute ahead is only this machine's clock running a little fast
    level = (
        logging.WARNING if plan.to_given or plan.end - exchange_minute > MINUTE else logging.INFO
    )
    log.log(
        level,
        "Binance's clock is at %s: importing up to it, not up to %s (the forming minute is"
        " never imported)",
        iso_minute(exchange_minute),
        iso_minute(plan.end),
    )
    return capped


async def _load_rate_limits(rest: BinanceRestClient, plan: BackfillPlan) -> None:
    """Best effort, as the daemon: Binance's usual limits stay in use if it fails."""
    market = plan.series.market
    try:
        limit = await rest.load_rate_limits(market)
    except (UpstreamError, BadInputError) as exc:
        log.warning("binance %s: exchangeInfo rate limits unavailable (%s)", market, exc)
    else:
        log.debug("binance %s: request weight limit %d/min", market, limit)


@attrs.frozen
class BackfillOutcome:
    """How the import ended: the exit code, the tally, and the one-line error if any."""

    code: ExitCode
    tally: BackfillTally
    error: str | None = None


async def _open_and_import(
    tally: BackfillTally,
    flags: RuntimeFlags,
    policy: RestPolicy,
    progress: Progress,
    *,
    refetch: bool,
    given: Derivation,
) -> tuple[ExitCode, str] | None:
    """The import proper; returns (exit code, error line) for the failures the exit codes
    cover, None when it is done (or was cancelled)."""
    try:
        # the daemon's store: PostgreSQL with TRADE_CANVAS_DATABASE_URL
        store = await open_store(store_location(flags.db_path, flags.database_url))
    except StoreError as exc:
        return ExitCode.for_store_error(exc), f"store failure: {exc}"
    try:
        async with open_rest_client(flags, policy=policy, bans=StoreBanMemory(store)) as rest:
            plan = await cap_at_exchange(tally.plan, rest)
            if plan is None:
                return ExitCode.USAGE, (
                    f"--from: {iso_minute(tally.plan.start)} is not before Binance's current"
                    " minute (its /time); nothing to import"
                )
            # the store's recorded derived timeframes, as import (tools/importer/settings.py)
            own, others = await recorded_fingerprints(store, [plan.series])
            chosen = choose(given, own, others, "backfill")
            plan = attrs.evolve(
                plan, align=page_alignment(chosen.timeframes, plan.page_minutes * MINUTE)
            )
            tally.plan = plan
            await _load_rate_limits(rest, plan)
            derived = (chosen.timeframes, chosen.fingerprint)
            pipeline = IngestPipeline.from_flags(store, _NoSubscribers(), flags, derived)
            await learn_phases(plan, pipeline, rest)
            pages = len(list(plan.chunks()))
            log.info(
                "backfill %s: %d minutes in %d REST page%s into %s",
                plan.describe(),
                plan.minutes,
                pages,
                "" if pages == 1 else "s",
                describe_location(store_location(flags.db_path, flags.database_url)),
            )
            await import_history(plan, pipeline, rest, tally, progress, refetch=refetch)
    except DerivationConflict as exc:
        return ExitCode.USAGE, str(exc)
    except UpstreamError as exc:
        return ExitCode.FAILED, f"Binance REST failed: {exc}; {tally.committed_text()}"
    except BadInputError as exc:  # WireError, CandleError: the page was not stored
        return ExitCode.FAILED, f"Binance sent data we refuse: {exc}; {tally.committed_text()}"
    except StoreError as exc:
        return ExitCode.for_store_error(exc), f"store failure: {exc}; {tally.committed_text()}"
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()
    return None


async def run_import(
    plan: BackfillPlan,
    flags: RuntimeFlags,
    policy: RestPolicy,
    progress: Progress,
    *,
    refetch: bool = False,
    given: Derivation | None = None,
) -> BackfillOutcome:
    """Import ``plan`` with Ctrl-C/SIGTERM handled (``refetch``: see :func:`import_history`);
    raises nothing the exit codes cover. The tally says how long it took."""
    tally = BackfillTally(plan)
    began = trio.current_time()
    caught: list[int] = []
    work = trio.CancelScope()
    failure: tuple[ExitCode, str] | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(_SIGNALS.watch, work, caught)
        try:
            with work:
                failure = await _open_and_import(
                    tally,
                    flags,
                    policy,
                    progress,
                    refetch=refetch,
                    given=given or from_flags(flags, option_given=True, rebuild=True),
                )
        finally:
            tally.elapsed_s = trio.current_time() - began
            progress.finish()
            nursery.cancel_scope.cancel()
    if failure is not None:
        return BackfillOutcome(failure[0], tally, failure[1])
    if caught:
        return BackfillOutcome(
            ExitCode.for_signal(caught[0]),
            tally,
            f"interrupted; {tally.committed_text()}",
        )
    return BackfillOutcome(ExitCode.OK, tally)


# --- command line --------------------------------------------------------------------


def _attempts_arg(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{value} is out of range; allowed: 1..100")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``backfill`` arguments to ``parser`` (the flag options are added by the CLI)."""
    parser.add_argument(
        "series",
        metavar="SERIES",
        help="base 1m series_id, such as binance:futures:BTC/USDT:1m",
    )
    parser.add_argument(
        "--from",
        dest="from_time",
        required=True,
        metavar="T",
        help=f"first minute to import: {TIME_EXAMPLES}",
    )
    parser.add_argument(
        "--to",
        dest="to_time",
        default=None,
        metavar="T",
        help="end of the range, exclusive (default: now, floored to the minute)",
    )
    parser.add_argument(
        "--attempts",
        type=_attempts_arg,
        default=RestPolicy().max_attempts,
        metavar="N",
        help="REST attempts per request before giving up; timeouts, 5xx and 429/418 waits"
        f" count (default {RestPolicy().max_attempts})",
    )
    parser.add_argument(
        "--refetch",
        action="store_true",
        help="fetch every page, even one the store holds whole (by default such a page is"
        " skipped: that is how a run resumes); picks up candles Binance revised",
    )
    add_rebuild_option(parser)


@FlagCommand
def run_backfill(args: argparse.Namespace, flags: RuntimeFlags, out: TextIO, err: TextIO) -> int:
    """Run the ``backfill`` command with the arguments from :func:`configure_parser`;
    returns one of :data:`EXIT_CODES`."""
    configure_logging(flags, stream=err)
    try:
        plan = plan_backfill(args.series, args.from_time, args.to_time, time.time())
    except BadInputError as exc:
        err.write(f"tradecanvas backfill: {exc}\n")
        return ExitCode.USAGE
    if plan.series not in flags.series:
        log.warning(
            "%s is not in TRADE_CANVAS_SERIES: the daemon does not serve it until it is",
            plan.series,
        )
    progress = Progress(err, tty=err.isatty())
    if progress.tty:
        for handler in logging.getLogger().handlers:
            handler.addFilter(ClearProgressFilter(progress))
    policy = RestPolicy(max_attempts=args.attempts, weight_budget=BACKFILL_WEIGHT_BUDGET)
    given = from_flags(
        flags,
        option_given=getattr(args, "flag_derived_timeframes", None) is not None,
        rebuild=args.rebuild_derived,
    )
    try:
        outcome = trio.run(
            functools.partial(
                run_import, plan, flags, policy, progress, refetch=args.refetch, given=given
            )
        )
    except KeyboardInterrupt:  # before the signal handler was installed: nothing started
        progress.finish()
        err.write("tradecanvas backfill: interrupted; nothing committed\n")
        return ExitCode.INTERRUPTED
    if outcome.code != ExitCode.USAGE:  # a range wholly after Binance's clock: nothing was tried
        for line in outcome.tally.summary_lines():
            out.write(line + "\n")
        out.flush()
    if outcome.error is not None:
        err.write(f"tradecanvas backfill: {outcome.error}\n")
    return outcome.code
