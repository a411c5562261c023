"""The start of a PostgreSQL write transaction (``store/postgres.py``), sent in one go on a
connection in pipeline mode: take the store's write lock, record the transaction's commit
token (``store/pg_commit_token.py``), number the transaction, read the event counter, and the
meta table unless the number says that nobody else wrote.

:func:`send_start` only sends it; :meth:`Start.result` waits for the answers. The store
sends the start and, when it knows what the answers will be (its own last transaction was
the last one), runs the transaction's work before asking for them: the work's statements
follow the start on the connection, so the server runs them under the write lock, and the
round trip of the start overlaps the work's Python instead of preceding it. The answers,
read before the ``COMMIT`` is sent, confirm the guess or the transaction is rolled back
(:class:`StaleStart`) and run again from what the answers said.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, final

import attrs

if TYPE_CHECKING:
    from psycopg import Cursor

    from tradecanvas.store.pg_commit_token import CommitTokens
    from tradecanvas.store.pg_txn import Conn

_LOCK: Final = "SELECT pg_advisory_xact_lock(%s)"
_NUMBER: Final = (
    "UPDATE write_counter SET last_sequence = last_sequence + %s RETURNING last_sequence"
)
_EVENTS: Final = "SELECT last_id FROM event_counter"
_META_UNLESS: Final = (
    "SELECT key, value FROM meta WHERE (SELECT last_sequence FROM write_counter) <> %s"
)


class StaleStart(Exception):
    """The start's answers were not the ones the transaction's work assumed (another
    writer committed in between): the transaction is rolled back and run again."""


@attrs.frozen
class StartAnswers:
    """What a write transaction's start found: its number, the event counter, and the meta
    table (None: the number was the one expected, so the table is as the caller's last
    transaction left it)."""

    sequence: int
    last_event_id: int
    meta: dict[str, str] | None


@attrs.frozen
class LastWrite:
    """What a store's last write transaction left: its number, the meta table (the store's
    copy, read from and written through) and the event counter: the guess of the next."""

    sequence: int
    meta: dict[str, str]
    last_event_id: int


def confirm(answers: StartAnswers, last: LastWrite) -> StartAnswers:
    """The start's answers if they are what a guess from ``last`` assumed (nobody else
    wrote since), else StaleStart."""
    if answers.sequence != last.sequence + 1 or answers.last_event_id != last.last_event_id:
        raise StaleStart
    return answers


@final
class Start:
    """A start sent and not yet answered (its four statements' cursors); ``token``: the
    commit token it recorded (known at once)."""

    def __init__(
        self, conn: Conn, lock_key: int, step: int, expected: int, tokens: CommitTokens
    ) -> None:
        self._expected = expected
        self._answers: StartAnswers | None = None
        self._lock = conn.execute(_LOCK, (lock_key,))
        # after the lock: the row is this writer's, but a pruning writer deletes stale
        # rows under the lock (a row lock taken before it could deadlock with that)
        self.token = tokens.record(conn)
        self._number = conn.execute(_NUMBER, (step,))
        self._events = conn.execute(_EVENTS)
        self._meta: Cursor[tuple[object, ...]] = conn.execute(_META_UNLESS, (expected,))
        # the server answers these at once, not after the statements that follow (it sends
        # answers at a flush or a sync): they are back while the work runs. No answer of
        # its own, so psycopg's pipeline bookkeeping is untouched (its own fetches do this).
        conn.pgconn.send_flush_request()
        conn.pgconn.flush()

    def result(self) -> StartAnswers:
        """The answers (waits for all four, in one round trip; the same answers again
        when asked again)."""
        if self._answers is None:
            self._answers = self._read()
        return self._answers

    def _read(self) -> StartAnswers:
        meta_rows = self._meta.fetchall()
        got, number, last = self._lock.fetchone(), self._number.fetchone(), self._events.fetchone()
        assert got is not None and number is not None and last is not None
        sequence = int(str(number[0]))
        meta = None if sequence == self._expected else {str(k): str(v) for k, v in meta_rows}
        return StartAnswers(sequence, int(str(last[0])), meta)


def send_start(conn: Conn, lock_key: int, step: int, expected: int, tokens: CommitTokens) -> Start:
    """Send the start of a write transaction (``conn`` in pipeline mode, in a transaction):
    the write lock, the next of ``tokens``, the number ``step`` above the last one, the
    event counter, and the meta table unless the number is ``expected``. Nothing is waited
    for."""
    return Start(conn, lock_key, step, expected, tokens)
