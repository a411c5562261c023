"""Reading the files of ``tradecanvas import`` ahead of the commit: on a worker thread, or,
for a large import, in a child process (:mod:`~tradecanvas.tools.importer.child`).

The parse (verify, unzip, split, check every row, build the Decimals and ``Candle``\\ s) held
the GIL the commit's Python needs: the commit's thread waited for it a fifth of the time, and
the reading cost the import about as much CPU as the bare baseline's whole run
(docs/benchmarks.md, Import). A large import reads in a child process instead, which checks
each file and sends its candles as columns of text (``wire.columns.CandleColumns``); this
process only builds the candles from them, between two commits. A small one (under
:data:`CHILD_MIN_ROWS`) reads on a thread: a process costs its start.

Errors: a refused file is an :class:`ArchiveFileError` naming it (and the line, for a bad
row), as on a thread; a reading process that fails or ends while reading a file is a
:class:`ReadingProcessError` naming the file (nothing of it is stored). The process lives in
:func:`open_reading_process`' block: it is ended (killed, if need be) when the block ends,
cancelled or not.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final, final

import trio

from tradecanvas.pipeline.commit import collector_paused
from tradecanvas.tools.importer.child import FRAME_HEADER, frame
from tradecanvas.tools.importer.files import (
    ArchiveFileError,
    CheckedFile,
    ImportFile,
    ReadFile,
    read_file,
)

log = logging.getLogger("tradecanvas.tools.importer")
# the rows an import must hold to be read in a child process (about 70 days of 1m): the
# child's start (an interpreter, the parser's imports and its first answer: ~0.13 s of CPU)
# against what it takes off this process (~2.3 µs of CPU a row, and the GIL the commit no
# longer waits for); a few daily files are read sooner on a thread
CHILD_MIN_ROWS: Final = 100_000
# a file without an archive name: its rows guessed from its size (a row is ~130 bytes of CSV)
_BYTES_PER_ROW: Final = {".csv": 130, ".zip": 30}
# files the child is asked for before its answer for the first is received: while this
# process builds and commits one, the next waits in the channel and the child reads another
CHILD_AHEAD: Final = 2
# after its stdin is closed, the child ends at once; past this it is killed
CHILD_EXIT_S: Final = 5.0
_RECEIVE_CHUNK: Final = 1 << 20
# the reading process' command: this interpreter, the same tradecanvas as this process
_PACKAGE_ROOT: Final = str(Path(__file__).resolve().parents[3])  # (tradecanvas/tools/importer)
_CHILD_CODE: Final = (
    f"import sys; sys.path.insert(0, {_PACKAGE_ROOT!r}); "
    "from tradecanvas.tools.importer.child import serve; serve()"
)


class ReadingProcessError(ArchiveFileError):
    """The reading process failed or ended while reading a file (not the file's fault)."""


def expected_rows(files: Sequence[ImportFile]) -> int:
    """About how many rows ``files`` hold (by name; by size for a file without one)."""
    total = 0
    for f in files:
        rows = f.expected_rows
        if rows is None:
            try:
                size = f.path.stat().st_size
            except OSError:
                size = 0  # refused when read
            rows = size // _BYTES_PER_ROW.get(f.path.suffix.lower(), 130)
        total += rows
    return total


@final
class ReadingProcess:
    """The child process reading files: :meth:`request` a file, :meth:`receive` the
    answers in the order asked. Owns the process' pipes, not its lifetime (that is
    :func:`open_reading_process`'). Not for concurrent use."""

    def __init__(self, process: trio.Process) -> None:
        assert process.stdin is not None and process.stdout is not None
        self.process = process
        self._requests = process.stdin
        self._answers = process.stdout
        self._buffer = bytearray()

    async def request(self, file: ImportFile) -> None:
        """Ask for ``file``. To a process that has ended, nothing: the :meth:`receive` of
        the answer says how it ended."""
        with contextlib.suppress(trio.BrokenResourceError):
            await self._requests.send_all(frame(file))

    async def _receive_exactly(self, size: int) -> bytes | None:
        buffer = self._buffer
        while len(buffer) < size:
            chunk = await self._answers.receive_some(max(_RECEIVE_CHUNK, size - len(buffer)))
            if not chunk:
                return None
            buffer += chunk
        taken = bytes(buffer[:size])
        del buffer[:size]
        return taken

    async def receive(self, file: ImportFile) -> CheckedFile:
        """The answer to the request for ``file`` (the oldest not yet received). Raises
        ArchiveFileError, ReadingProcessError."""
        header = await self._receive_exactly(FRAME_HEADER.size)
        body = (
            None if header is None else await self._receive_exactly(FRAME_HEADER.unpack(header)[0])
        )
        if body is None:
            raise ReadingProcessError(file.path, await self._ended())
        kind, detail = await trio.to_thread.run_sync(pickle.loads, body)
        if kind == "read":
            assert isinstance(detail, CheckedFile)
            return detail
        if kind == "refused":
            raise ArchiveFileError(file.path, str(detail))
        log.error("the reading process failed on %s:\n%s", file.path, detail)
        last = str(detail).strip().splitlines()[-1:] or ["?"]
        raise ReadingProcessError(
            file.path, f"the reading process failed: {last[0]}; nothing of this file stored"
        )

    async def _ended(self) -> str:
        with trio.move_on_after(CHILD_EXIT_S):
            await self.process.wait()
        code = self.process.returncode
        how = (
            "closed its pipe"
            if code is None
            else f"was killed by signal {-code}"
            if code < 0
            else f"exited with status {code}"
        )
        return f"the reading process {how} while reading it; nothing of this file stored"


def build_checked(checked: CheckedFile) -> ReadFile:
    """A checked file's candles (a worker thread's work: ~2.5 µs a row)."""
    # the candles make no reference cycle (see _read_paused)
    with collector_paused():
        return checked.read()


@asynccontextmanager
async def open_reading_process() -> AsyncIterator[ReadingProcess]:
    """A reading process for the block. At its end the process' stdin is closed and it
    exits (killed after :data:`CHILD_EXIT_S`); on an error or a cancel it is killed at
    once. The ending is shielded and bounded."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", _CHILD_CODE], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    clean = False
    try:
        yield ReadingProcess(process)
        clean = True
    finally:
        with trio.CancelScope(shield=True):
            if clean:
                assert process.stdin is not None
                await process.stdin.aclose()
                with trio.move_on_after(CHILD_EXIT_S):
                    await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
            for pipe in (process.stdin, process.stdout):
                if pipe is not None:
                    await pipe.aclose()


def _read_paused(file: ImportFile) -> ReadFile:
    # the rows make no reference cycle: the collector's walks over them (and over the
    # candles read before, still waiting) were a seventh of the parse
    with collector_paused():
        return read_file(file)


async def read_ahead(
    files: Sequence[ImportFile],
    send: trio.MemorySendChannel[ReadFile | CheckedFile | ArchiveFileError],
    *,
    child_min_rows: int = CHILD_MIN_ROWS,
) -> None:
    """Read ``files`` in order into ``send``; a refused one is sent as its error, last. In a
    child process when they hold ``child_min_rows`` rows or more, else on a worker thread.
    From the child a file comes as its :class:`CheckedFile`, whose candles the receiver
    builds (:func:`build_checked`) while no commit is in flight: built here, beside the
    commit, the two threads took turns at the GIL, and the commit waited for it about as
    long as the building took."""
    async with send:
        if files and expected_rows(files) >= child_min_rows:
            await _read_in_child(files, send)
        else:
            await _read_on_thread(files, send)


async def _read_in_child(
    files: Sequence[ImportFile],
    send: trio.MemorySendChannel[ReadFile | CheckedFile | ArchiveFileError],
) -> None:
    async with open_reading_process() as reader:
        for f in files[:CHILD_AHEAD]:
            await reader.request(f)
        for index, f in enumerate(files):
            try:
                checked = await reader.receive(f)
            except ArchiveFileError as exc:
                await send.send(exc)
                return
            if index + CHILD_AHEAD < len(files):
                await reader.request(files[index + CHILD_AHEAD])
            await send.send(checked)


async def _read_on_thread(
    files: Sequence[ImportFile],
    send: trio.MemorySendChannel[ReadFile | CheckedFile | ArchiveFileError],
) -> None:
    for f in files:
        try:
            read = await trio.to_thread.run_sync(_read_paused, f)
        except ArchiveFileError as exc:
            await send.send(exc)
            return
        await send.send(read)


__all__ = [
    "CHILD_MIN_ROWS",
    "ReadingProcess",
    "ReadingProcessError",
    "build_checked",
    "expected_rows",
    "open_reading_process",
    "read_ahead",
]
