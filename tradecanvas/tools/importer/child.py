"""The reading process of a large ``tradecanvas import``: a child that verifies, unpacks and
checks each file it is asked for and sends back its candles as columns, so that the parse
runs on another core than the commit, outside its GIL (docs/benchmarks.md, Import).

Started by :mod:`~tradecanvas.tools.importer.reader` as ``python -c`` of :func:`serve`, with
pipes for its stdin and stdout; it imports no trio, pipeline or store. Both ways a message
is a frame: 8 bytes of length (big-endian), then a pickle. Asked an
:class:`~tradecanvas.tools.importer.files.ImportFile`, it answers one of:

- ``("read", CheckedFile)``: every check passed;
- ``("refused", problem)``: the file is refused (checksum, zip, a row and its line): the
  text of the :class:`~tradecanvas.tools.importer.files.ArchiveFileError` after its path;
- ``("failed", traceback)``: reading it raised anything else (a bug, no memory).

It ends when its stdin ends (the parent closed it, or died); it ignores SIGINT and SIGTERM
(a Ctrl-C in the terminal reaches the whole process group: the parent decides, and ends
it). Pickles come only from the parent that started it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import signal
import struct
import sys
import traceback
from typing import BinaryIO, Final

from tradecanvas.tools.importer.files import ArchiveFileError, ImportFile, check_file

FRAME_HEADER: Final = struct.Struct(">Q")


def frame(message: object) -> bytes:
    """``message`` as one frame."""
    blob = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return FRAME_HEADER.pack(len(blob)) + blob


def _read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    """``size`` bytes, or None at the end of the stream before any (EOFError mid-way)."""
    chunks: list[bytes] = []
    left = size
    while left:
        chunk = stream.read(left)
        if not chunk:
            if left == size:
                return None
            raise EOFError(f"the stream ended {left} bytes short of a frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def answer(file: ImportFile) -> tuple[str, object]:
    """The answer to a request for ``file``."""
    try:
        return "read", check_file(file)
    except ArchiveFileError as exc:
        return "refused", exc.problem
    except Exception:  # (the parent reports it, naming the file)
        return "failed", traceback.format_exc()


def serve_requests(requests: BinaryIO, answers: BinaryIO) -> None:
    """Answer each request of ``requests`` on ``answers``, until ``requests`` ends."""
    while True:
        header = _read_exactly(requests, FRAME_HEADER.size)
        if header is None:
            return
        (size,) = FRAME_HEADER.unpack(header)
        body = _read_exactly(requests, size)
        if body is None:
            raise EOFError("the stream ended inside a frame")
        file = pickle.loads(body)  # noqa: S301 (from the parent that started this process)
        answers.write(frame(answer(file)))
        answers.flush()


def serve() -> None:
    """The reading process' main: requests on stdin, answers on stdout."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # the rows make no reference cycle, and the process lives for one import
    gc.disable()
    # the answers get the pipe the parent reads; anything printed goes to stderr instead
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        serve_requests(sys.stdin.buffer, answers)
    except (BrokenPipeError, EOFError):
        pass  # the parent is gone, or ended it mid-way: nothing is owed to anyone
    finally:
        with contextlib.suppress(BrokenPipeError):
            answers.close()


__all__ = ["FRAME_HEADER", "answer", "frame", "serve", "serve_requests"]
