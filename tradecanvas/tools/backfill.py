"""``tradecanvas backfill SERIES --from T [--to T]``: REST history import (DESIGN §8).

Imports the closed 1m candles of one base series for ``[from, to)`` from Binance REST klines
into the store, a page at a time (futures 1500 minutes, spot 1000), each page committed
through the same :class:`~tradecanvas.pipeline.IngestPipeline` the daemon uses — with the
flags' derived timeframes and derivation fingerprint — so the derived bars of every touched
bucket are recomputed from the stored minutes, and a second run of the same range stores
nothing new. Nothing is published: this process has no subscribers. A running daemon's
subscribers get the imported history from the store when they (re)subscribe; running beside
the daemon is safe (one SQLite file in WAL mode, each writer waits up to the store's
``busy_timeout`` for the other's short transaction).

Time: ``--to`` defaults to now (wall clock) floored to the minute, and the end is then capped
at Binance's own current minute (``/time``, DESIGN §1.2), so the forming minute is never
requested even when the local clock runs ahead; every minute of the range has closed at the
exchange, so a minute the REST answer lacks is missing at the exchange and reported as such.

Progress goes to stderr: one ``\\r``-rewritten line on a terminal, else a log line at most
every :data:`PROGRESS_LOG_INTERVAL_S` and one at the end. The summary (minutes requested,
candles fetched, new, already stored, revised, missing at the exchange) goes to stdout.

Exit codes: 0 done; 1 Binance REST failed for good (UpstreamError) or sent something we refuse
(WireError, CandleError) — the pages committed before stay committed; 2 bad arguments or
flags (nothing is changed); 3 the store failed (as ``serve``); 130 on Ctrl-C (143 on SIGTERM):
the page being committed is finished, the one being fetched is dropped. A second Ctrl-C exits
at once; SQLite rolls back a commit it interrupts.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Final, TextIO, final

import attrs
import trio

from tradecanvas.errors import (
    BadInputError,
    ExitCode,
    SeriesIdError,
    StoreError,
    UpstreamError,
)
from tradecanvas.model import MINUTE, MS, Candle, SeriesId, Timeframe
from tradecanvas.ops.logs import configure_logging
from tradecanvas.pipeline import IngestBatch, IngestPipeline, PipelineResult, SystemEvent
from tradecanvas.runtime_flags import RuntimeFlags
from tradecanvas.store.records import StoreBanMemory
from tradecanvas.store.sqlite import CandleStore
from tradecanvas.upstream.rest import KLINES_LIMIT, BinanceRestClient, RestPolicy, open_rest_client

log = logging.getLogger(__name__)

# A unix time above this is surely milliseconds (it would be the year 5138 in seconds).
MAX_UNIX_SECONDS: Final = 99_999_999_999
# Of Binance's per-minute request weight: the daemon keeps to 80%, so a bulk import beside it
# stops at half and leaves the daemon room for its own repairs.
BACKFILL_WEIGHT_BUDGET: Final = 0.5
PROGRESS_LOG_INTERVAL_S: Final = 5.0
PROGRESS_BAR_WIDTH: Final = 20
MISSING_RANGES_SHOWN: Final = 5
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_TIME_EXAMPLES: Final = "unix seconds or ISO-8601 UTC such as 2025-07-06, 2025-07-06T12:00Z"


def iso_minute(t: int) -> str:
    """``2025-07-06T12:00Z``: how times are shown to the user."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%MZ")


def parse_time(option: str, text: str) -> int:
    """``--from``/``--to``: unix seconds or ISO-8601 (UTC unless an offset is given), on a
    minute boundary. Raises BadInputError naming ``option``."""
    value = text.strip()
    if re.fullmatch(r"[0-9]+", value):
        seconds = int(value)
        if seconds > MAX_UNIX_SECONDS:
            raise BadInputError(
                f"{option}: {text!r} looks like milliseconds; give {_TIME_EXAMPLES}"
            )
    else:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise BadInputError(
                f"{option}: {text!r} is not a time; give {_TIME_EXAMPLES}"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        delta = moment - _EPOCH
        if delta < timedelta(0):
            raise BadInputError(f"{option}: {text!r} is before 1970; give {_TIME_EXAMPLES}")
        if delta % timedelta(seconds=1):
            raise BadInputError(f"{option}: {text!r} is not on a minute boundary")
        seconds = delta // timedelta(seconds=1)
    if seconds % MINUTE:
        floor = seconds - seconds % MINUTE
        raise BadInputError(
            f"{option}: {text!r} is not on a minute boundary; use {iso_minute(floor)}"
            f" or {iso_minute(floor + MINUTE)}"
        )
    return seconds


@attrs.frozen
class BackfillPlan:
    """The base series and the half-open range ``[start, end)`` to import, in seconds."""

    series: SeriesId
    start: int
    end: int
    to_given: bool = True  # False: ``--to`` defaulted to now
    # pages end on multiples of this (seconds), so a derived bucket is seldom split across two
    # commits (see page_alignment)
    align: int = MINUTE

    @property
    def minutes(self) -> int:
        return max(0, (self.end - self.start) // MINUTE)

    @property
    def page_minutes(self) -> int:
        """One REST page per chunk: Binance's klines limit for the market."""
        return KLINES_LIMIT[self.series.market]

    def chunks(self) -> Iterator[tuple[int, int]]:
        """The pages: at most one REST call each, ending on a multiple of ``align`` when one
        lies inside the page."""
        step = self.page_minutes * MINUTE
        cursor = self.start
        while cursor < self.end:
            stop = cursor + step
            aligned = stop - stop % self.align
            if aligned > cursor:
                stop = aligned
            yield cursor, min(self.end, stop)
            cursor = stop

    def describe(self) -> str:
        return f"{self.series} [{iso_minute(self.start)}, {iso_minute(self.end)})"


def plan_backfill(
    series_text: str, from_text: str, to_text: str | None, now: float
) -> BackfillPlan:
    """Check the command's arguments (no I/O); ``now`` is the wall clock in unix seconds,
    used only for the default ``--to``. An explicit ``--to`` after the current minute is kept:
    :func:`cap_at_exchange` ends the range at Binance's current minute.
    Raises BadInputError whose message names the argument.
    """
    try:
        series = SeriesId.parse(series_text)
    except SeriesIdError as exc:
        raise BadInputError(f"SERIES: {exc}") from None
    if series.timeframe.seconds != MINUTE:
        base = series.with_timeframe(Timeframe.parse("1m"))
        raise BadInputError(
            f"SERIES: {series} is not a base series; only 1m candles are imported (derived"
            f" timeframes are recomputed from them): use {base}"
        )
    start = parse_time("--from", from_text)
    current_minute = int(now) - int(now) % MINUTE
    to_given = to_text is not None
    if to_text is None:
        end = current_minute
        to_shown = f"{iso_minute(end)}, now"
    else:
        # kept as given: only Binance's clock (cap_at_exchange) says which minute is forming,
        # and this machine's clock may run behind it
        end = parse_time("--to", to_text)
        to_shown = iso_minute(end)
    if start >= end:
        raise BadInputError(
            f"--from: {iso_minute(start)} is not before --to ({to_shown}); the range is [from, to)"
        )
    return BackfillPlan(series, start, end, to_given=to_given)


def page_alignment(derived: Sequence[Timeframe], page_s: int) -> int:
    """Where pages should end so that each derived bucket is committed whole, in one page:
    a multiple of every derived timeframe if such a page fits (``1d`` covers 5m…4h, and one
    day fits a futures page), else of the longest one that fits. A bucket still split across
    two pages is finalised from its first part and corrected by the second (the store keeps
    the last write)."""
    lengths = [tf.seconds for tf in derived]
    common = math.lcm(MINUTE, *lengths)
    if common <= page_s:
        return common
    return max((s for s in lengths if s <= page_s), default=MINUTE)


@final
@attrs.define
class BackfillTally:
    """What the import did so far; updated after each committed page."""

    plan: BackfillPlan
    done_minutes: int = 0
    fetched: int = 0
    new: int = 0
    unchanged: int = 0
    revised: int = 0
    missing: int = 0
    missing_ranges: list[tuple[int, int]] = attrs.Factory(list)  # first, last open time
    derived: dict[str, int] = attrs.Factory(dict)  # derived series → distinct bars written
    # derived series → open time of the last bar written: a bucket split across two pages
    # is written twice but counted once
    _last_derived: dict[str, int] = attrs.Factory(dict)
    committed_up_to: int | None = None  # end (exclusive) of the last page done

    @property
    def stored(self) -> int:
        return self.new + self.revised

    @property
    def complete(self) -> bool:
        return self.done_minutes >= self.plan.minutes

    def _count_derived(self, sid: str, times: Sequence[int]) -> None:
        if not times:
            return
        again = 1 if self._last_derived.get(sid) == times[0] else 0
        self.derived[sid] = self.derived.get(sid, 0) + len(times) - again
        self._last_derived[sid] = times[-1]

    def record(
        self,
        start: int,
        end: int,
        fetched: Sequence[Candle],
        result: PipelineResult | None,
    ) -> None:
        """Account for the page ``[start, end)``: ``fetched`` from REST, ``result`` of the
        commit (None: nothing to commit)."""
        sid = str(self.plan.series)
        changed = revised = 0
        if result is not None:
            for update in result.updates:
                if update.derived:
                    self._count_derived(update.series_id, [c.candle_time for c in update.candles])
                elif update.series_id == sid:
                    changed += len(update.candles)
                    revised += update.revised
        self.fetched += len(fetched)
        self.new += changed - revised
        self.revised += revised
        self.unchanged += len(fetched) - changed
        present = {c.candle_time for c in fetched}
        for t in range(start, end, MINUTE):
            if t not in present:
                self._add_missing(t)
        self.done_minutes += (end - start) // MINUTE
        self.committed_up_to = end

    def _add_missing(self, t: int) -> None:
        self.missing += 1
        if self.missing_ranges and self.missing_ranges[-1][1] == t - MINUTE:
            self.missing_ranges[-1] = (self.missing_ranges[-1][0], t)
        else:
            self.missing_ranges.append((t, t))

    def summary_lines(self) -> list[str]:
        """The summary printed on stdout."""
        head = f"{self.plan.describe()}: {self.plan.minutes:,} minutes requested"
        if not self.complete:
            head += f", {self.done_minutes:,} done"
        lines = [
            f"{head}, {self.fetched:,} fetched, {self.new:,} new,"
            f" {self.unchanged:,} already stored (unchanged), {self.revised:,} revised,"
            f" {self.missing:,} missing at the exchange"
        ]
        for sid in sorted(self.derived):
            lines.append(f"{sid}: {self.derived[sid]:,} derived bars written")
        if self.missing_ranges:
            shown = [
                f"{iso_minute(a)}..{iso_minute(b)} ({(b - a) // MINUTE + 1})"
                if b > a
                else iso_minute(a)
                for a, b in self.missing_ranges[:MISSING_RANGES_SHOWN]
            ]
            more = len(self.missing_ranges) - MISSING_RANGES_SHOWN
            lines.append(
                "missing at the exchange: "
                + ", ".join(shown)
                + (f" and {more} more ranges" if more > 0 else "")
            )
        if self.done_minutes and self.stored == 0:
            lines.append(
                "nothing new: the store already held every candle Binance has for"
                + (" this range" if self.complete else " the part done")
            )
        return lines

    def committed_text(self) -> str:
        """For a stop before the end: how far the import got."""
        if self.committed_up_to is None:
            return "nothing committed"
        return (
            f"committed up to {iso_minute(self.committed_up_to)} (from"
            f" {iso_minute(self.plan.start)}); that stays stored, run the same command again"
            " to finish"
        )


def render_bar(series_id: str, done: int, total: int, stored: int) -> str:
    """``binance:futures:BTC/USDT:1m  [#########-----------]  45%  4320/9600 min  3,950
    stored``"""
    fraction = done / total if total else 1.0
    filled = min(PROGRESS_BAR_WIDTH, int(fraction * PROGRESS_BAR_WIDTH))
    bar = "#" * filled + "-" * (PROGRESS_BAR_WIDTH - filled)
    return f"{series_id}  [{bar}]  {int(fraction * 100):3d}%  {done}/{total} min  {stored:,} stored"


@final
class Progress:
    """Reports the tally on stderr: on a terminal one line rewritten in place, otherwise a
    log line at most every :data:`PROGRESS_LOG_INTERVAL_S` and one when done."""

    def __init__(self, stream: TextIO, *, tty: bool) -> None:
        self.stream = stream
        self.tty = tty
        self._drawn = False
        self._last_log: float | None = None

    def update(self, tally: BackfillTally, now: float) -> None:
        sid, total = str(tally.plan.series), tally.plan.minutes
        if self.tty:
            line = render_bar(sid, tally.done_minutes, total, tally.stored)
            self.stream.write(f"\r{line}\x1b[K")
            self.stream.flush()
            self._drawn = True
        elif (
            tally.complete
            or self._last_log is None
            or (now - self._last_log >= PROGRESS_LOG_INTERVAL_S)
        ):
            self._last_log = now
            log.info(
                "backfill %s: %d/%d min (%d%%), %d stored",
                sid,
                tally.done_minutes,
                total,
                100 * tally.done_minutes // total if total else 100,
                tally.stored,
            )

    def clear(self) -> None:
        """Take the bar off the line (before a log line, and at the end)."""
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False

    def finish(self) -> None:
        """Leave the last state of the bar on its own line."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


class _ClearProgressFilter(logging.Filter):
    """On a terminal, a log line must not be written into the middle of the bar."""

    def __init__(self, progress: Progress) -> None:
        super().__init__()
        self.progress = progress

    def filter(self, record: logging.LogRecord) -> bool:
        self.progress.clear()
        return True


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
) -> None:
    """Fetch and commit each page of ``plan`` in order, updating ``tally`` after each commit.

    Raises UpstreamError, WireError (REST) and CandleError (a row we refuse: the page is not
    stored), StoreError. Cancellation stops it between commits: a fetch is dropped, a commit
    that started runs to its end.
    """
    for start, end in plan.chunks():
        candles = await rest.klines(plan.series, start, end)
        result: PipelineResult | None = None
        if candles:
            # store.write shields the transaction already; the shield here also keeps the
            # tally in step with what was committed
            with trio.CancelScope(shield=True):
                result = await pipeline.run(IngestBatch.of(plan.series, candles, "rest"))
        tally.record(start, end, candles, result)
        progress.update(tally, trio.current_time())


async def _stop_on_signal(
    work: trio.CancelScope,
    caught: list[int],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Ctrl-C/SIGTERM: stop the import after the commit in flight; a second one: at once."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            if caught:
                sys.stderr.write("\ntradecanvas backfill: second signal, exiting at once\n")
                sys.stderr.flush()
                os._exit(128 + signum)
            caught.append(signum)
            log.warning(
                "%s: stopping after the page in flight (again to exit at once)",
                signal.Signals(signum).name,
            )
            work.cancel(reason="interrupted")


async def cap_at_exchange(plan: BackfillPlan, rest: BinanceRestClient) -> BackfillPlan | None:
    """End the range at Binance's current minute (its ``/time``), so the forming minute is
    never requested; None when the whole range lies at or after it."""
    server_s = await rest.server_time_ms(plan.series.market) // MS
    exchange_minute = server_s - server_s % MINUTE
    if plan.end <= exchange_minute:
        return plan
    if plan.start >= exchange_minute:
        return None
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
    return attrs.evolve(plan, end=exchange_minute)


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

    code: int
    tally: BackfillTally
    error: str | None = None


async def _open_and_import(
    tally: BackfillTally, flags: RuntimeFlags, policy: RestPolicy, progress: Progress
) -> tuple[int, str] | None:
    """The import proper; returns (exit code, error line) for the failures the exit codes
    cover, None when it is done (or was cancelled)."""
    try:
        store = await CandleStore.open(flags.db_path)
    except StoreError as exc:
        return ExitCode.STORE_FAILURE, f"store failure: {exc}"
    try:
        async with open_rest_client(flags, policy=policy, bans=StoreBanMemory(store)) as rest:
            plan = await cap_at_exchange(tally.plan, rest)
            if plan is None:
                return ExitCode.USAGE, (
                    f"--from: {iso_minute(tally.plan.start)} is not before Binance's current"
                    " minute (its /time); nothing to import"
                )
            plan = attrs.evolve(
                plan, align=page_alignment(flags.derived_timeframes, plan.page_minutes * MINUTE)
            )
            tally.plan = plan
            await _load_rate_limits(rest, plan)
            pipeline = IngestPipeline.from_flags(store, _NoSubscribers(), flags)
            pages = len(list(plan.chunks()))
            log.info(
                "backfill %s: %d minutes in %d REST page%s into %s",
                plan.describe(),
                plan.minutes,
                pages,
                "" if pages == 1 else "s",
                flags.db_path,
            )
            await import_history(plan, pipeline, rest, tally, progress)
    except UpstreamError as exc:
        return ExitCode.FAILED, f"Binance REST failed: {exc}; {tally.committed_text()}"
    except BadInputError as exc:  # WireError, CandleError: the page was not stored
        return ExitCode.FAILED, f"Binance sent data we refuse: {exc}; {tally.committed_text()}"
    except StoreError as exc:
        return ExitCode.STORE_FAILURE, f"store failure: {exc}; {tally.committed_text()}"
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()
    return None


async def run_import(
    plan: BackfillPlan, flags: RuntimeFlags, policy: RestPolicy, progress: Progress
) -> BackfillOutcome:
    """Import ``plan`` with Ctrl-C/SIGTERM handled; raises nothing the exit codes cover."""
    tally = BackfillTally(plan)
    caught: list[int] = []
    work = trio.CancelScope()
    failure: tuple[int, str] | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(_stop_on_signal, work, caught)
        try:
            with work:
                failure = await _open_and_import(tally, flags, policy, progress)
        finally:
            progress.finish()
            nursery.cancel_scope.cancel()
    if failure is not None:
        return BackfillOutcome(failure[0], tally, failure[1])
    if caught:
        return BackfillOutcome(128 + caught[0], tally, f"interrupted; {tally.committed_text()}")
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
        help=f"first minute to import: {_TIME_EXAMPLES}",
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


def run_backfill(
    args: argparse.Namespace,
    flags: RuntimeFlags,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run the ``backfill`` command with the arguments from :func:`configure_parser`."""
    out = out or sys.stdout
    err = err or sys.stderr
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
            handler.addFilter(_ClearProgressFilter(progress))
    policy = RestPolicy(max_attempts=args.attempts, weight_budget=BACKFILL_WEIGHT_BUDGET)
    try:
        outcome = trio.run(run_import, plan, flags, policy, progress)
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
