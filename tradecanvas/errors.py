"""The project's error tree. Third-party errors are translated once, where they enter.

::

    TradeCanvasError
    ├── FlagError          a RuntimeFlags variable does not parse (exit code 2)
    ├── BadInputError      input we refuse; nothing is changed
    │   ├── SeriesIdError  a malformed series_id / timeframe (names the bad part)
    │   ├── CandleError    a candle that is misaligned, inverted or negative
    │   └── WireError      a malformed upstream (Binance) frame or REST row
    ├── StoreError         SQLite failed (disk full, read-only, corrupt): fatal for the daemon
    │   ├── StoreRecovered the end of a store outage: exit 3 so the restart repairs the gap
    │   ├── StoreInUse     another daemon ingests into the store (its lock): exit 3
    │   └── StoreTooNew    the store's schema is newer than this code writes: exit 4
    ├── PublishError       a strict publish had a failing step (candles are committed)
    ├── ListenError        a port of the daemon's cannot be listened on (in use, bad host)
    └── UpstreamError      Binance REST/WS failed in a way retries did not cure

Also here: :class:`ExitCode`, the exit status of every ``tradecanvas`` command, and the two
helpers that look inside trio's exception groups (:func:`first_leaf`, :func:`find_in_group`).
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Callable
from typing import Final, TypeVar

E = TypeVar("E", bound=BaseException)


class ExitCode(enum.IntEnum):
    """Exit status of every ``tradecanvas`` command (documented in docs/operations.md)."""

    OK = 0
    FAILED = 1  # the command could not do its job (Binance failed for good, a bug)
    USAGE = 2  # bad flags or arguments; nothing was changed
    STORE_FAILURE = 3  # the store failed (disk full, read-only, corrupt); systemd restarts serve
    STORE_TOO_NEW = 4  # the store's schema is newer than this release writes (a rollback)
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
    TERMINATED = 143  # SIGTERM (128 + SIGTERM) for the one-shot tools

    @classmethod
    def for_signal(cls, signum: int) -> ExitCode:
        """The shell's convention, 128 + the signal: SIGINT 130, SIGTERM 143."""
        return cls(128 + signum)

    @classmethod
    def for_store_error(cls, exc: BaseException) -> ExitCode:
        """A store failure's code: 4 for a store newer than this release (a rollback: no
        rerun helps), else 3."""
        return cls.STORE_TOO_NEW if isinstance(exc, StoreTooNew) else cls.STORE_FAILURE


def first_leaf(exc: BaseException) -> BaseException:
    """The first exception inside (nested) exception groups, or ``exc`` itself."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def expected_restart(raised: BaseException) -> bool:
    """Is what stopped ``serve`` (its first leaf, which its line names) a restart that is
    part of normal operation — the end of a store outage, an ingest node deposed — logged
    as a warning rather than a failure?"""
    return isinstance(first_leaf(raised), StoreRecovered | IngestFenced)


def start_failure(raised: BaseException) -> tuple[ExitCode, str, bool] | None:
    """What ``serve`` says of what stopped it, and its exit code: (code, one log line, whether
    the traceback goes with it); None: re-raise ``raised`` (a bug outside any task group).
    A store failure is 3 (a store another daemon holds: 3, said as a refusal); a store newer
    than this release (:class:`StoreTooNew`) 4; a flag refused at start-up
    (:class:`FlagError`) 2; a port not listened on (:class:`ListenError`, or an OSError
    alone) 1; anything else in a task group 1 with its traceback."""
    grouped = isinstance(raised, BaseExceptionGroup)
    group = BaseExceptionGroup("", [raised])
    leaf = first_leaf(group)
    refusals = ((StoreTooNew, ExitCode.STORE_TOO_NEW), (StoreInUse, ExitCode.STORE_FAILURE))
    for refusal, code in refusals:
        if group.split(refusal)[1] is None:
            what = "stopping" if getattr(leaf, "running", False) else "cannot start"
            return code, f"{what} (exit code {code:d}): {leaf}", False
    if group.split(StoreError)[1] is None:
        code = ExitCode.STORE_FAILURE
        if isinstance(leaf, StoreRecovered):
            return code, f"store outage over, restarting (exit code {code:d}): {leaf}", False
        if isinstance(leaf, IngestFenced):
            return code, f"deposed, restarting to stand by (exit code {code:d}): {leaf}", False
        return code, f"store failure, stopping (exit code {code:d}): {leaf}", False
    listen = ListenError if grouped else OSError
    for refused, code in ((FlagError, ExitCode.USAGE), (listen, ExitCode.FAILED)):
        if group.split(refused)[1] is None:
            return code, f"cannot start: {leaf}", False
    return (ExitCode.FAILED, "tradecanvas failed", True) if grouped else None


def find_in_group(exc: BaseException, kind: type[E]) -> E | None:
    """The first ``kind`` exception in ``exc`` or anywhere inside its groups, else None."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        matched, _ = exc.split(kind)
        if matched is not None:
            leaf = first_leaf(matched)
            assert isinstance(leaf, kind)
            return leaf
    return None


class TradeCanvasError(Exception):
    """Base of every error tradecanvas raises on purpose."""


class FlagError(TradeCanvasError):
    """A flag (environment variable or ``serve`` option) has a bad value.

    ``str(err)`` is ``TRADE_CANVAS_X: <what is wrong, what is allowed>``.
    """

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


class BadInputError(TradeCanvasError, ValueError):
    """Input that is refused with a clear message; nothing is changed."""


class SeriesIdError(BadInputError):
    """A series_id or timeframe that does not parse; the message names the bad part."""


class CandleError(BadInputError):
    """A candle that is not aligned to its timeframe, has high < low, or a negative volume."""


class WireError(BadInputError):
    """A malformed upstream frame or REST row; ``reason`` is a short kind for counting."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class StoreError(TradeCanvasError):
    """The candle store failed. The batch in flight was rolled back; the daemon stops."""


class StoreUnreachable(StoreError):
    """The store's server did not answer (PostgreSQL restarting, a network cut): a read
    raising it may succeed when tried again later. Logged as a warning by readers, whose
    failure the store's own lines about the outage already explain."""


class StoreRecovered(StoreError):
    """The store takes writes again after an outage: the daemon exits 3 so that the
    restart repairs what was missed (logged as a warning, not as a failure)."""


class IngestFenced(StoreError):
    """Another ingest node took over (this one was told it lost the lease, or the store's
    fence refused its write: it stalled past the lease's TTL): this one must not write any
    more. It exits 3 and, restarted, stands by (a warning, not a failure)."""


class StoreInUse(StoreError):
    """Another daemon ingests into this store (it holds the store's single-writer lock):
    this one does not start (exit 3; systemd tries again, so a daemon started while the old
    one still stops comes up once it is gone). ``running``: lost while the daemon ran (a
    PostgreSQL restart ended its session and another daemon took the lock meanwhile).
    ``quiet_s``: PostgreSQL, how long the holder's session has run no statement (a running
    daemon checks its lock every 2 s; None when not known)."""

    running = False
    quiet_s: float | None = None


class StoreTooNew(StoreError):
    """The store's schema is newer than this release writes (a rollback without restoring
    the backup): exit 4, which systemd does not restart."""


class store_errors_from:
    """Translate a backend's errors (``kind``: ``sqlite3.Error``, ``psycopg.Error``) raised
    inside the ``with`` into :class:`StoreError` naming ``what`` was done (the message's
    first line: libpq's run on over several); :class:`StoreUnreachable` when ``lost``
    says the error is the connection's, not the statement's."""

    __slots__ = ("kind", "lost", "what")

    def __init__(
        self,
        kind: type[BaseException],
        what: str,
        lost: Callable[[BaseException], bool] | None = None,
    ) -> None:
        self.kind = kind
        self.what = what
        self.lost = lost

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if isinstance(exc, self.kind):
            text = str(exc).strip()
            message = text.splitlines()[0] if text else ""
            error = StoreUnreachable if self.lost is not None and self.lost(exc) else StoreError
            what = f"candle store {self.what} failed"
            raise error(f"{what}: {type(exc).__name__}: {message}") from exc


class PublishError(TradeCanvasError):
    """A strict publish (``best_effort=False``) had a failing step.

    The candles are committed already; healthy subscribers heal from the store.
    """

    def __init__(self, failures: list[str]) -> None:
        super().__init__("publish failed: " + "; ".join(failures))
        self.failures = failures


class ListenError(TradeCanvasError, OSError):
    """``serve`` cannot listen on one of its ports: it is in use, or its host does not
    resolve or is not this machine's. The message names the port's role and address (raise
    it ``from`` the OSError)."""

    @classmethod
    def of(cls, what: str, host: str, port: int, exc: OSError) -> ListenError:
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        line = f"cannot listen for {what} on {address}: {exc.strerror or exc}"
        flag = _PORT_FLAGS.get(what)
        if exc.errno == errno.EADDRINUSE and flag is not None:
            line += f" (another tradecanvas serve, or another program? give this one {flag})"
        return cls(line)


_PORT_FLAGS: Final = {"HTTP": "TRADE_CANVAS_HTTP_PORT", "WebSocket clients": "TRADE_CANVAS_WS_PORT"}


class UpstreamError(TradeCanvasError):
    """Binance answered in a way our retries could not cure."""


# the most of a refused series_id an error message echoes back
ECHO_MAX: Final = 200


class ClientMessageError(BadInputError):
    """A client message we answer with an ``error``; ``code`` is the protocol code."""

    def __init__(self, code: str, message: str, series_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.series_id = series_id

    def to_wire(self) -> dict[str, object]:
        wire: dict[str, object] = {"type": "error", "code": self.code, "message": self.message}
        if self.series_id is not None:
            # the echo lets a client match the refusal to its message; no valid id is longer
            wire["series_id"] = self.series_id[:ECHO_MAX]
        return wire
