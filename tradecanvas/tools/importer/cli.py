"""``tradecanvas import``'s trio shell and command line: read, commit, signals, exit codes."""

from __future__ import annotations

import argparse
import collections
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final, TextIO, final

import attrs
import trio

from tradecanvas.errors import (
    BadInputError,
    CandleError,
    ExitCode,
    StoreError,
    TradeCanvasError,
    find_in_group,
)
from tradecanvas.model import Candle, SeriesId, Timeframe
from tradecanvas.ops.logs import configure_logging
from tradecanvas.pipeline.commit import IngestPipeline
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.runtime_flags import RuntimeFlags
from tradecanvas.store.interface import MarketStore
from tradecanvas.store.open import describe_location, open_store, store_location
from tradecanvas.tools.command import FlagCommand
from tradecanvas.tools.exit_codes import ExitCodeTable
from tradecanvas.tools.importer.commit import ArchiveCommitter
from tradecanvas.tools.importer.cuts import transaction_end
from tradecanvas.tools.importer.files import (
    ArchiveFileError,
    ImportFile,
    ReadFile,
    WrongFileError,
    plan_import,
    read_file,
)
from tradecanvas.tools.importer.settings import (
    Derivation,
    DerivationConflict,
    add_rebuild_option,
    choose,
    from_flags,
    recorded_fingerprints,
)
from tradecanvas.tools.importer.tally import ImportTally
from tradecanvas.tools.progress import Progress
from tradecanvas.tools.signals import StopOnSignal
from tradecanvas.upstream.phases import learn_phase
from tradecanvas.wire.kline_columns import KlineColumns

log = logging.getLogger("tradecanvas.tools.importer")
# Ctrl-C/SIGTERM: stop after the transaction in flight; a second one: at once
_SIGNALS: Final = StopOnSignal("import", "the transaction", log)

# candles per transaction: large, yet under the pipeline's step for one derivation (4,096 source
# bars), past which it trims its recent bars and reads its own rows back
DEFAULT_BATCH: Final = 4_000
# after Ctrl-C or SIGTERM, how long the owed factor.rebuild event may wait for the store
FINISH_AFTER_SIGNAL_S: Final = 10.0
# files read ahead of the one being committed
READ_AHEAD: Final = 1
EXIT_CODES: Final[ExitCodeTable] = (
    (ExitCode.OK, "every file imported (again: nothing changed, and the summary says so)"),
    (ExitCode.FAILED, "a file refused (checksum, corrupt zip, bad row): the files before it"
     " stay imported, nothing of it is stored; a file of another interval than 1m is refused"
     " before any file is read: nothing imported"),
    (ExitCode.USAGE, "bad arguments: no such file, a bad --series, a series not inferable,"
     " --market against the path, derived timeframes other than the store's (nothing imported)"),
    (ExitCode.STORE_FAILURE, "the store failed (disk full, read-only, corrupt), as for serve"),
    (ExitCode.STORE_TOO_NEW, "the store's schema is newer than this release (a rollback)"),
    (ExitCode.INTERRUPTED, "Ctrl-C: the transaction in flight is finished; run it again"),
    (ExitCode.TERMINATED, "SIGTERM, as Ctrl-C"),
)  # fmt: skip


@final
class _NoSubscribers:
    """The pipeline's publish target here: nothing is published by this process."""

    def publish_closed(self, series_id: str, candles: Sequence[Candle]) -> Sequence[str]:
        return ()

    def publish_system(self, event: SystemEvent) -> Sequence[str]:
        return ()


@final
class _Offline:
    """No Binance here: a 3d grid phase comes from the store's memory or the known table."""

    async def latest_open_time(self, series: SeriesId) -> int | None:
        raise TradeCanvasError(
            "not asked: import reads files only; a daemon on this store learns the phase"
        )


async def _learn_phases(pipeline: IngestPipeline, series: Sequence[SeriesId]) -> None:
    for sid in series:
        for timeframe in pipeline.derived_timeframes:
            if timeframe.phased:
                phase = await learn_phase(sid, timeframe, _Offline(), pipeline.store)
                if phase is not None:
                    pipeline.set_phase(sid, phase)


@attrs.define
class _Waiting:
    """A series' candles read and not yet committed, and the files they came from."""

    candles: KlineColumns = attrs.field(factory=KlineColumns.empty)
    # each file not yet committed whole, after how many candles added its last comes
    files: collections.deque[tuple[int, ReadFile]] = attrs.field(factory=collections.deque)
    added: int = 0
    taken: int = 0

    def add(self, read: ReadFile) -> None:
        self.candles.extend(read.columns)
        self.added += len(read.columns)
        self.files.append((self.added, read))

    def take(self, count: int) -> KlineColumns:
        """The first ``count`` candles, taken out to be committed."""
        chunk = self.candles.take(count)
        self.taken += len(chunk)
        return chunk

    def finished(self) -> Iterator[ReadFile]:
        """The files all of whose candles have been taken, taken out."""
        while self.files and self.files[0][0] <= self.taken:
            yield self.files.popleft()[1]


async def import_files(
    files: Sequence[ImportFile],
    committer: ArchiveCommitter,
    tally: ImportTally,
    progress: Progress,
    *,
    batch: int = DEFAULT_BATCH,
) -> None:
    """Read each file (on a worker thread) and commit them through ``committer``, in
    transactions of about ``batch`` candles of a series (a file is read and checked whole
    before any of it is committed), each ending where no derived bucket goes on
    (:func:`~tradecanvas.tools.importer.cuts.transaction_end`: with the default timeframes,
    the last midnight before the ``batch``-th candle). A file's last candles wait for the next
    file of the series and go in one transaction with its first (the end of the last file
    goes alone), so the transactions do not follow the files' sizes. Raises
    ArchiveFileError (the files before it are committed first), StoreError."""
    totals: dict[str, int | None] = {}
    for f in files:
        sid, rows = str(f.series), f.expected_rows
        if sid in totals and totals[sid] is None:
            continue
        totals[sid] = None if rows is None else (totals.get(sid) or 0) + rows
    for sid, total in totals.items():
        progress.start(sid, total)
    waiting: dict[SeriesId, _Waiting] = {}
    done: dict[str, int] = {}

    async def flush(series: SeriesId, *, rest: bool) -> None:
        """Commit ``series``' full transactions; ``rest``: also what is left."""
        queue = waiting[series]
        sid = str(series)
        levels = committer.levels_of(series)
        while len(queue.candles) >= batch or (rest and len(queue.candles)):
            end = transaction_end(queue.candles.times, batch, levels, rest=rest)
            if not end:
                break  # a derived bucket goes on in the next file
            chunk = queue.take(end)
            with trio.CancelScope(shield=True):  # what is committed is counted
                result = await committer.commit(series, chunk, checked=True)
            tally.record_commit(sid, result.received, result.updates)
            done[sid] = done.get(sid, 0) + len(chunk)
            progress.update(sid, done[sid])
            for read in queue.finished():
                tally.record_file(
                    sid,
                    verified=read.checksum,
                    holes=read.holes,
                    candles=len(read.columns),
                    cut=read.cut,
                )
        for read in queue.finished():  # a file of no candle
            tally.record_file(sid, verified=read.checksum, holes=read.holes)

    # the next file is read (a worker thread) while the one before is committed (another)
    send, receive = trio.open_memory_channel[ReadFile | ArchiveFileError](READ_AHEAD)
    refused: ArchiveFileError | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_ahead, files, send)
            async with receive:
                async for read in receive:
                    if isinstance(read, ArchiveFileError):
                        refused = read  # raised below, outside the nursery (not in a group)
                        break
                    waiting.setdefault(read.file.series, _Waiting()).add(read)
                    await flush(read.file.series, rest=False)
            for series in list(waiting):
                await flush(series, rest=True)
    except BaseExceptionGroup as group:
        failure = find_in_group(group, StoreError) or find_in_group(group, CandleError)
        if failure is None:
            raise
        raise failure from None
    # the files are read: the total is what they held; a file refused: the bars on a terminal
    # end at what was committed (the log lines say no 100% then)
    for sid in totals if refused is None or progress.tty else ():
        count = done.get(sid, 0)
        progress.start(sid, count)
        progress.update(sid, count)
    if refused is not None:
        raise refused


async def _read_ahead(
    files: Sequence[ImportFile],
    send: trio.MemorySendChannel[ReadFile | ArchiveFileError],
) -> None:
    """Read the files in order into ``send``; a refused one is sent as its error, last."""
    async with send:
        for f in files:
            try:
                read = await trio.to_thread.run_sync(read_file, f)
            except ArchiveFileError as exc:
                await send.send(exc)
                return
            await send.send(read)


@attrs.define
class _Finishing:
    """The shielded scope the ``factor.rebuild`` events owed are logged in: bounded to
    FINISH_AFTER_SIGNAL_S from its start once interrupted, or from the signal when one
    comes while it waits (a store that is away is not waited out)."""

    scope: trio.CancelScope = attrs.field(factory=lambda: trio.CancelScope(shield=True))
    started: bool = False
    signalled: bool = False

    def start(self) -> None:
        self.started = True
        if self.signalled:
            self._bound()

    def signal(self) -> None:
        self.signalled = True
        if self.started:
            self._bound()

    def _bound(self) -> None:
        self.scope.deadline = min(self.scope.deadline, trio.current_time() + FINISH_AFTER_SIGNAL_S)


async def _relay(
    signalled: trio.CancelScope,
    work: trio.CancelScope,
    finishing: _Finishing,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The first signal (the watcher cancels ``signalled``) stops ``work`` and bounds the
    finish, also one already waiting for the store."""
    with signalled:
        task_status.started()
        await trio.sleep_forever()
    work.cancel(reason="interrupted")
    finishing.signal()


async def _finish(committer: ArchiveCommitter, tally: ImportTally, finishing: _Finishing) -> None:
    """Log the ``factor.rebuild`` events owed for what was committed: within
    FINISH_AFTER_SIGNAL_S of the signal once interrupted (:class:`_Finishing`)."""
    finishing.start()
    with finishing.scope:
        finished = await committer.finish()
        tally.events = committer.rebuilds_logged + len(finished)
    if finishing.scope.cancelled_caught:
        log.warning(
            "import: the store did not take the factor.rebuild event within %g s of the"
            " signal; the next import into it logs it",
            FINISH_AFTER_SIGNAL_S,
        )


async def run_import(
    files: Sequence[ImportFile],
    location: str | Path,
    derived: Sequence[Timeframe],
    fingerprint: str,
    progress: Progress,
    *,
    batch: int = DEFAULT_BATCH,
    explicit: bool = True,
    rebuild: bool = True,
) -> tuple[ExitCode, ImportTally, str | None]:
    """Import ``files`` into the store at ``location``: (exit code, tally, error line).
    ``derived``/``fingerprint`` are checked against the store's recorded ones
    (:mod:`~tradecanvas.tools.importer.settings`): with ``rebuild`` (as a caller that means
    them) they are used whatever the store records; else not ``explicit`` ones give way to the
    store's, and explicit ones that differ are refused (exit 2, nothing imported)."""
    tally = ImportTally(files_total=len(files))
    try:
        store: MarketStore = await open_store(location)
    except StoreError as exc:
        return ExitCode.for_store_error(exc), tally, f"store failure: {exc}"
    caught: list[int] = []
    failure: tuple[ExitCode, str] | None = None
    work, signalled, finishing = trio.CancelScope(), trio.CancelScope(), _Finishing()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(_relay, signalled, work, finishing)
            await nursery.start(_SIGNALS.watch, signalled, caught)
            try:
                with work:
                    given = Derivation(tuple(derived), fingerprint, explicit, rebuild)
                    own, others = await recorded_fingerprints(
                        store, sorted({f.series for f in files})
                    )
                    chosen = choose(given, own, others)  # DerivationConflict: nothing done
                    pipeline = IngestPipeline(
                        store, _NoSubscribers(), chosen.timeframes, chosen.fingerprint
                    )
                    committer = ArchiveCommitter(pipeline)
                    tally.pending_before = bool(await committer.load_pending())
                    await _learn_phases(pipeline, sorted({f.series for f in files}))
                    log.info(
                        "import: %d file%s into %s",
                        len(files),
                        "" if len(files) == 1 else "s",
                        describe_location(location),
                    )
                    try:
                        await import_files(files, committer, tally, progress, batch=batch)
                    except ArchiveFileError as exc:
                        failure = (ExitCode.FAILED, str(exc))
                    finally:
                        # also when interrupted (Ctrl-C, SIGTERM): what was committed has
                        # changed the history, and its consumers are told now; a crash, or
                        # a store away for longer than FINISH_AFTER_SIGNAL_S after a
                        # signal (before the finish or while it waits), leaves the event
                        # owed to the next run
                        await _finish(committer, tally, finishing)
            except DerivationConflict as exc:
                failure = (ExitCode.USAGE, str(exc))
            except StoreError as exc:
                failure = (ExitCode.for_store_error(exc), f"store failure: {exc}")
            finally:
                progress.finish()
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()
    if failure is not None:
        return failure[0], tally, failure[1]
    if caught:
        return (
            ExitCode.for_signal(caught[0]),
            tally,
            f"interrupted after {tally.files_done} of {tally.files_total} files; what was"
            " committed stays, run the same command again to finish",
        )
    return ExitCode.OK, tally, None


# --- command line --------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``import`` arguments (the flag options are added by the CLI)."""
    parser.add_argument(
        "paths",
        metavar="FILE|DIR",
        nargs="+",
        type=Path,
        help="archive kline files (.zip with .CHECKSUM beside, or .csv), or folders of them",
    )
    parser.add_argument(
        "--series",
        default=None,
        metavar="SERIES",
        help="the base 1m series every file holds (default: from each file's name)",
    )
    parser.add_argument(
        "--market",
        choices=("spot", "futures"),
        default=None,
        help="the market of files named by symbol whose path names none (default: from the"
        " path, e.g. …/spot/…, …/um/…; one the path contradicts is refused)",
    )
    add_rebuild_option(parser)
    parser.add_argument(
        "--batch",
        type=int,
        default=DEFAULT_BATCH,
        metavar="N",
        help=f"about this many candles per transaction, each ending at a derived bucket's"
        f" end (default {DEFAULT_BATCH:,})",
    )


@FlagCommand
def run_import_command(
    args: argparse.Namespace, flags: RuntimeFlags, out: TextIO, err: TextIO
) -> int:
    """Run ``import`` with :func:`configure_parser`'s arguments; one of :data:`EXIT_CODES`."""
    configure_logging(flags, stream=err)
    started = time.monotonic()
    try:
        files = plan_import(args)
    except WrongFileError as exc:  # a file refused (exit 1), found before anything is read
        err.write(f"tradecanvas import: {exc}\n")
        return ExitCode.FAILED
    except BadInputError as exc:
        err.write(f"tradecanvas import: {exc}\n")
        return ExitCode.USAGE
    progress = Progress(err, log=log, verb="import")
    location = store_location(flags.db_path, flags.database_url)
    given = from_flags(
        flags,
        option_given=getattr(args, "flag_derived_timeframes", None) is not None,
        rebuild=args.rebuild_derived,
    )
    try:
        with progress.capture_logs():
            code, tally, error = trio.run(
                lambda: run_import(
                    files,
                    location,
                    given.timeframes,
                    given.fingerprint,
                    progress,
                    batch=args.batch,
                    explicit=given.explicit,
                    rebuild=given.rebuild,
                )
            )
    except KeyboardInterrupt:
        progress.finish()
        err.write("tradecanvas import: interrupted; nothing committed\n")
        return ExitCode.INTERRUPTED
    for line in tally.summary_lines(time.monotonic() - started):
        out.write(line + "\n")
    out.flush()
    if error is not None:
        err.write(f"tradecanvas import: {error}\n")
    return code


__all__ = [
    "DEFAULT_BATCH",
    "EXIT_CODES",
    "configure_parser",
    "import_files",
    "plan_import",
    "run_import",
    "run_import_command",
]
