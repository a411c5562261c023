"""IngestPolicy: the ingest's timing and memory constants (pure; not flags)."""

from __future__ import annotations

import attrs

from tradecanvas.upstream.backoff import Backoff
from tradecanvas.upstream.plan import ConnectionPolicy


@attrs.frozen
class IngestPolicy:
    """Timing constants of the ingest loop (wall-clock timeouts only; never exchange time).

    Not flags: they follow Binance's connection rules. Tests pass smaller values.
    ``connection`` goes to the connection slot (``connection.healthy_after_s`` also resets
    the supervisor's restart backoff), the fill and backlog values to ``IngestCore``, the
    rest to the loop shell and the supervisor.
    """

    connection: ConnectionPolicy = attrs.Factory(ConnectionPolicy)  # reconnects, rotation
    fill_retry_base_s: float = 1.0
    fill_retry_cap_s: float = 60.0
    hold_max_s: float = 120.0  # held candles wait this long for a REST fill that keeps failing
    flush_deadline_s: float = 5.0  # the shutdown flush
    restart_base_s: float = 1.0  # supervisor: a crashed loop restarts after this (doubling)
    restart_cap_s: float = 60.0
    # closed candles waiting for a commit plus the minutes of the REST fills in flight; no
    # fill starts while they reach this, so a slow disk bounds the candles in memory at
    # this plus one fill chunk (FILL_CHUNK_MINUTES)
    backlog_max: int = 50_000
    # the longest a due commit waits for the rest of a burst still being read (see
    # ingest.loop.SETTLE_QUIET_ROUNDS); a close that misses its group waits a commit more
    burst_settle_s: float = 0.002

    @property
    def fill_backoff(self) -> Backoff:
        return Backoff(self.fill_retry_base_s, self.fill_retry_cap_s)

    @property
    def restart_backoff(self) -> Backoff:
        return Backoff(self.restart_base_s, self.restart_cap_s)
