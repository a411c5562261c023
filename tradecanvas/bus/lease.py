"""Which ingest node ingests: a lease in Redis and a fencing token in the store, decided here
without I/O (the shell, ``bus/leader.py``, talks to Redis and the store; docs/architecture.md,
"Two ingest nodes").

Hot standby. Every ingest node runs; the one holding the lease (``SET key node NX PX ttl``)
owns the Binance connections and commits, the others wait. The holder renews every third of
the TTL (a script: extend it if the value is ours, set it again if it is gone — Redis
restarted — and answer who holds it otherwise). A standby asks for the lease every quarter of
the TTL, so it takes over at most about a TTL after the holder stopped renewing (SIGKILL, a
lost machine), then repairs from the store's last candle through the ingest's usual REST
repair.

The lease alone cannot stop a holder that stalled past its TTL and woke up again, so every
takeover also takes the next **fencing token** from the store (``ingest_fence`` in its meta,
in one write transaction) and every write of the holder checks, inside its own transaction and
under the store's write lock, that the stored token is still its own (:func:`fence_allows`):
once a newer holder has written its token, an older holder's commit is refused and that node
stops. Tokens come from the store, not from Redis, so they keep increasing across a Redis
restart.

While Redis is away the holder keeps ingesting (it cannot know whether anyone took over; the
fence keeps the store right either way), and a standby that saw Redis fail waits a whole TTL
before asking again, so that the holder, which renews every third of it, gets the lease back
first after a Redis restart.
"""

from __future__ import annotations

import enum
from typing import Final, final

import attrs

# the store's meta key holding the newest fencing token, and the node it was given to
FENCE_KEY: Final = "ingest_fence"
FENCE_NODE_KEY: Final = "ingest_fence_node"
DEFAULT_TTL_MS: Final = 5_000

# the renewal script's answers
RENEWED: Final = 1  # the value was ours: extended
RESET: Final = 2  # the key was gone (expired, or Redis restarted): set to ours again
HELD_BY_OTHER: Final = 0


class Verdict(enum.Enum):
    TAKE_OVER = "take_over"  # this node got the lease: take the fence, start ingesting
    STANDBY = "standby"  # someone else holds it (or Redis is away): keep waiting
    KEEP = "keep"  # still the holder
    DEPOSED = "deposed"  # another node holds the lease now: stop ingesting


@attrs.frozen
class LeaseTiming:
    ttl_ms: int = DEFAULT_TTL_MS

    def __attrs_post_init__(self) -> None:
        if self.ttl_ms < 100:
            raise ValueError("the lease TTL must be at least 100 ms")

    @property
    def ttl_s(self) -> float:
        return self.ttl_ms / 1000

    @property
    def renew_s(self) -> float:
        return self.ttl_s / 3

    @property
    def poll_s(self) -> float:
        return self.ttl_s / 4


@final
class LeaseCore:
    """One node's view of the lease. Times are the shell's clock (seconds)."""

    def __init__(self, node: str, timing: LeaseTiming | None = None) -> None:
        self.node = node
        self.timing = timing or LeaseTiming()
        self.leader = False
        self.holder: str | None = None  # as Redis last answered
        self.takeovers = 0
        self.last_renewed: float | None = None
        # a standby that saw Redis fail only looks (GET) at its next ask: Redis may have
        # restarted empty, and the holder must get the lease back first (on_probe)
        self.probing = False
        self._next_at = 0.0

    def next_at(self) -> float:
        """When to talk to Redis next: acquire (standby) or renew (holder)."""
        return self._next_at

    def on_acquire(self, got: bool, holder: str | None, now: float) -> Verdict:
        """The answer to ``SET key node NX PX ttl`` (and, when refused, who holds it)."""
        if self.leader:
            raise ValueError("on_acquire while holding the lease: renew instead")
        self.probing = False
        if got:
            self.leader = True
            self.holder = self.node
            self.takeovers += 1
            self.last_renewed = now
            self._next_at = now + self.timing.renew_s
            return Verdict.TAKE_OVER
        self.holder = holder
        self._next_at = now + self.timing.poll_s
        return Verdict.STANDBY

    def on_renew(self, answer: int, holder: str | None, now: float) -> Verdict:
        """The renewal script's answer: RENEWED, RESET or HELD_BY_OTHER (with the holder)."""
        if not self.leader:
            raise ValueError("on_renew without the lease: acquire instead")
        if answer in (RENEWED, RESET):
            self.last_renewed = now
            self._next_at = now + self.timing.renew_s
            return Verdict.KEEP
        if answer != HELD_BY_OTHER:
            raise ValueError(f"unknown renewal answer {answer!r}")
        self.leader = False
        self.holder = holder
        self._next_at = now + self.timing.poll_s
        return Verdict.DEPOSED

    def on_failure(self, now: float) -> Verdict:
        """Redis did not answer. The holder keeps ingesting (the fence protects the store)
        and retries at its renewal pace; a standby only looks at its next ask (``probing``)
        and tries to take the lease a whole TTL after Redis answered again
        (:meth:`on_probe`), so the holder — renewing every third of a TTL — gets the lease
        back first after a Redis restart that lost it. (A wait counted from the standby's
        last failed ask let it take the lease from a healthy holder when Redis came back
        between the two nodes' asks: half the restarts of about a TTL, in a soak.)"""
        if self.leader:
            self._next_at = now + self.timing.renew_s
            return Verdict.KEEP
        self.probing = True
        self._next_at = now + self.timing.poll_s
        return Verdict.STANDBY

    def on_probe(self, holder: str | None, now: float) -> Verdict:
        """Redis answered a probing standby's look (``holder``: who holds the lease, None:
        nobody): it asks for the lease a TTL from now."""
        if self.leader:
            raise ValueError("on_probe while holding the lease: renew instead")
        self.probing = False
        self.holder = holder
        self._next_at = now + self.timing.ttl_s
        return Verdict.STANDBY

    def unrenewed_for(self, now: float) -> float:
        """Seconds since the holder's last successful renewal (0 for a standby)."""
        if not self.leader or self.last_renewed is None:
            return 0.0
        return now - self.last_renewed

    def stepped_down(self) -> None:
        """The node let the lease go (a clean shutdown)."""
        self.leader = False
        self.holder = None


def next_fence(stored: str | None) -> int:
    """The fencing token a takeover writes: one above the stored one (1 for none)."""
    return parse_fence(stored) + 1


def parse_fence(stored: str | None) -> int:
    if stored is None:
        return 0
    try:
        value = int(stored)
    except ValueError as exc:
        raise ValueError(f"{FENCE_KEY} in the store is not a number: {stored!r}") from exc
    if value < 0:
        raise ValueError(f"{FENCE_KEY} in the store is negative: {stored!r}")
    return value


def fence_allows(stored: str | None, mine: int | None) -> bool:
    """May a node holding token ``mine`` write, the store holding ``stored``? A node that
    never took the lease (``None``: a standby's HTTP write) is not fenced."""
    return mine is None or parse_fence(stored) == mine
