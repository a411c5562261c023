"""Who holds ``serve``'s PostgreSQL lock (``store/writer_lock.py``) when it is refused, and
what the refusal says.

The lock is one advisory key in two modes: role ``all`` takes it exclusive (it ingests
alone), role ``ingest`` shared (every ingest node of the split topology, leader and
standby: the Redis lease picks the writer among them). So a role ``all`` daemon is refused
while any ingest node runs on the database, and an ingest node while a role ``all`` daemon
does, whichever started first: the two topologies never ingest into one store side by side
(each event ingested twice, twice the Binance connections and REST weight). Which role a
holder is comes from its lock's mode in ``pg_locks``; who it is from ``pg_stat_activity``
(its ``application_name``, ``tradecanvas serve pid N on HOST``, and client address).
"""

from __future__ import annotations

from typing import Final, Literal

import attrs
import psycopg

# pg_locks' mode of an advisory lock taken by pg_try_advisory_lock_shared (the exclusive
# one's is 'ExclusiveLock')
SHARED: Final = "ShareLock"

# the holders that keep a taker of the given mode out (shared: only an exclusive holder),
# the one that ran a statement last first (a live daemon, if any, before a quiet session),
# with how many there are
_HOLDERS: Final = (
    "SELECT l.pid, a.backend_start, a.application_name, host(a.client_addr),"
    " extract(epoch FROM clock_timestamp() - a.state_change)::float8, l.mode,"
    " count(*) OVER ()"
    " FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
    " WHERE l.locktype = 'advisory' AND l.granted"
    " AND l.classid = %(classid)s AND l.objid = %(objid)s AND l.objsubid = 1"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND (NOT %(shared)s OR l.mode = 'ExclusiveLock')"
    " ORDER BY 5 ASC NULLS FIRST LIMIT 1"
)


@attrs.frozen
class LockHolder:
    """A session holding the lock in a mode that keeps the taker out (the least quiet of
    them), and how many such sessions there are."""

    session: tuple[object, object]  # backend pid, backend_start
    who: str
    quiet_s: float | None  # how long it has run no statement (None: unknown)
    role: Literal["all", "ingest"]
    sessions: int


def key_parts(key: int) -> tuple[int, int]:
    """pg_locks' (classid, objid) of a bigint advisory key."""
    return key >> 32, key & 0xFFFF_FFFF


def find_holder(
    conn: psycopg.Connection[tuple[object, ...]], key: int, *, shared: bool
) -> LockHolder | None:
    """The holder that keeps a taker (``shared`` or exclusive) of ``key`` out; None when
    nobody does now (its session ended since the try)."""
    classid, objid = key_parts(key)
    row = conn.execute(_HOLDERS, {"classid": classid, "objid": objid, "shared": shared}).fetchone()
    if row is None:
        return None
    backend, started, name, addr, quiet, mode, sessions = row
    quiet_s = quiet if isinstance(quiet, float) else None
    who = f"{name or 'no application_name'} from {addr or 'a local socket'}"
    if quiet_s is not None:
        who += f", its session quiet for {quiet_s:.0f} s"
    count = int(str(sessions))
    if count > 1:
        who += f"; {count} sessions hold it"
    role: Literal["all", "ingest"] = "ingest" if mode == SHARED else "all"
    return LockHolder((backend, started), who, quiet_s, role, count)


def refusal(where: str, holder: LockHolder, *, shared: bool) -> str:
    """The StoreInUse message of a taker (``shared``: role ingest) refused by ``holder``:
    the store, who holds it, why the two do not run together, and the way out."""
    taker = "ingest" if shared else "all"
    said = (
        f"candle store {where} is in use by another tradecanvas serve of role {holder.role}"
        f" ({holder.who}), which holds its serve lock"
    )
    if holder.role == "all" and taker == "all":
        return (
            f"{said}: one such daemon ingests into a database at a time (several nodes:"
            " roles ingest and edge); stop that one first"
        )
    if holder.role == "all":
        return (
            f"{said}: a daemon of role ingest does not run beside the single process of"
            " role all (both would ingest every event); stop that one first (its unit:"
            " systemctl disable --now tradecanvas)"
        )
    return (
        f"{said} (shared by the ingest nodes): a daemon of role all does not run beside"
        " the split topology's ingest nodes (both would ingest every event); stop them"
        " first (their units: tradecanvas@<instance>), or run this one with --role"
        " ingest or edge"
    )
