"""What a /ws/market connection has in flight, and how long it has been stalled (DESIGN §6).

The kernel's socket buffers used to be the only bound on a subscriber that stops reading: the
daemon noticed it only once they were full (minutes with remote-like 64 KiB buffers, never
with loopback's auto-tuned megabytes), and the 4008 close frame then no longer fitted. Here
the bound is the daemon's own, the same on every network:

- **A capped send buffer.** Every accepted /ws/market socket gets ``SO_SNDBUF`` =
  :data:`SEND_BUFFER_BYTES` (which also turns the kernel's auto-tuning off), so a stuck
  subscriber holds a bounded amount of kernel memory.
- **An in-flight budget.** Data is written only while the bytes written and not yet
  acknowledged by the peer (``SIOCOUTQ``) stay within :data:`IN_FLIGHT_MAX_BYTES` — far
  below what the send buffer holds — so the close frame always fits behind them. A write
  bigger than the budget goes alone into an empty queue, with the send buffer raised to hold
  all of it (:meth:`InFlight.wait_room`). What is not written waits in the subscriber's own
  bounded queue (``subscriber_queue``), which lags and heals from the store.
- **Room for the close frame.** trio's SocketStream sets ``TCP_NOTSENT_LOWAT`` (16 KiB),
  and Linux then refuses writes while that much is unsent — to a peer that stopped reading,
  everything beyond its window is unsent, so even a 50-byte close frame would wait.
  :meth:`InFlight.release_for_close` lifts it before the close frame is written: the send
  buffer, far from full, takes the frame (and the rest of a frame a cancelled write began).
- **A stall clock.** :class:`StallClock` turns samples of (bytes proven read, bytes not yet)
  into "seconds behind": the age of the oldest byte written and not yet proven read. The
  endpoint's stall watch (``stall_watch``) closes a subscriber with 4008 once that reaches
  ``subscriber_stall_timeout_s``.
- **Proof of reading.** A TCP acknowledgement says only that the bytes reached the client's
  kernel: a client with a 4 MB receive buffer that stops reading keeps acknowledging until
  those 4 MB are full — at a trickle of live data, hours. So both ports ping
  (:meth:`InFlight.prove_reads`; on the HTTP port the connection writes the pings and reads
  the pongs itself, ``http_server.ServedConnection``): a byte counts as read once the pong to
  a ping written after it has come back, since a client's WebSocket library answers a ping
  only when it has read the frames before it. That clock is the same whatever the buffers on
  either side. A transport without pings keeps the TCP acknowledgements instead.

Linux only (``SIOCOUTQ``, ``TCP_INFO``); elsewhere :func:`unacknowledged_bytes` and
:func:`acknowledged_bytes` answer None and the budget and the TCP stall clock see nothing
in flight (the read proof, the send timeout and the queue's lag deadline still apply).
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import math
import socket
import struct
import termios
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final, Protocol, final

import trio

# SO_SNDBUF asked for on accepted /ws/market sockets (Linux doubles it for its bookkeeping):
# the budget, a write of WRITE_CHUNK_BYTES beyond it and the close frame fit with room left
SEND_BUFFER_BYTES: Final = 128 * 1024
# bytes written and not yet acknowledged before the next write waits
IN_FLIGHT_MAX_BYTES: Final = 128 * 1024
# what a write bigger than the budget needs besides itself: the close frame, pongs
CLOSE_RESERVE_BYTES: Final = 4 * 1024
# how often a write waiting for room looks again (the kernel signals no such mark); backs off
ROOM_POLL_FIRST_S: Final = 0.002
ROOM_POLL_MAX_S: Final = 0.1
# TIOCOUTQ is SIOCOUTQ on Linux: bytes in the send queue (unsent + sent, unacknowledged)
_SIOCOUTQ: Final = termios.TIOCOUTQ
# struct tcp_info: tcpi_bytes_acked (u64, Linux ≥ 4.1)
_TCP_INFO: Final = getattr(socket, "TCP_INFO", None)
_TCP_NOTSENT_LOWAT: Final = getattr(socket, "TCP_NOTSENT_LOWAT", None)
# no limit on unsent bytes (what the send buffer holds is the only limit)
_NO_LOWAT: Final = 2**31 - 1
# a read-proof ping's payload (a serial number); its frame from the server is 2 bytes more
# (RFC 6455 §5.2: unmasked, payload under 126 bytes)
PING_PAYLOAD_BYTES: Final = 8
PING_FRAME_BYTES: Final = 2 + PING_PAYLOAD_BYTES
# read-proof pings per stall timeout, at most: a client that reads is never more than about
# half the timeout behind by the proofs, and one that stops is closed between about half the
# timeout and the timeout after it stopped. Few, because a client that closes while a ping is
# on its way may trip over it (trio-websocket answers it in its closing state and fails:
# python-trio/trio-websocket#184)
PINGS_PER_STALL: Final = 2
_BYTES_ACKED_OFFSET: Final = 120
_TCP_INFO_LEN: Final = 128


def limit_send_buffer(sock: trio.socket.SocketType, size: int = SEND_BUFFER_BYTES) -> None:
    """Cap ``sock``'s kernel send buffer (best effort: a socket that refuses keeps its own)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def unacknowledged_bytes(sock: trio.socket.SocketType) -> int | None:
    """Bytes written to ``sock`` that the peer has not acknowledged; None when unknown."""
    fd = sock.fileno()
    if fd == -1:
        return None
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(fd, _SIOCOUTQ, buf, True)
    except OSError:
        return None
    return buf[0]


def acknowledged_bytes(sock: trio.socket.SocketType) -> int | None:
    """Bytes the peer has acknowledged since the connection began; None when unknown."""
    if _TCP_INFO is None or sock.fileno() == -1:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return None
    if len(info) < _BYTES_ACKED_OFFSET + 8:
        return None
    acked: int = struct.unpack_from("Q", info, _BYTES_ACKED_OFFSET)[0]
    return acked


class SendWatch(Protocol):
    """What enforces the deadlines of a connection's writes (``stall_watch.StallWatch``)."""

    def wake_by(self, deadline: float) -> None:
        """Look at the writes in progress no later than ``deadline`` (called for each write:
        O(1))."""
        ...


@final
class StallClock:
    """Seconds behind from samples, without I/O: the age of the oldest byte written and not
    yet acknowledged, as an upper bound: never below the truth, and above it by at most the
    time between two samples (a subscriber is closed early rather than late).

    Each :meth:`observe` takes the sample's time, the bytes acknowledged so far and the
    bytes unacknowledged now. Bytes first seen unacknowledged at a sample were written
    after the sample before it: that time is remembered as their mark.
    """

    __slots__ = ("_last_sample", "_marks")

    def __init__(self, now: float) -> None:
        # (written after this time, written total up to here), oldest first
        self._marks: deque[tuple[float, int]] = deque()
        self._last_sample = now

    def skip(self, gap_s: float) -> None:
        """Count ``gap_s`` just gone by as not elapsed: the daemon did not run then (paused,
        or its loop starved), so it could neither write nor read the client's answers."""
        self._marks = deque((t + gap_s, n) for t, n in self._marks)
        self._last_sample += gap_s

    def observe(self, now: float, acked: int, unacked: int) -> float:
        """Seconds behind at ``now`` (0.0 when everything written is acknowledged)."""
        written = acked + unacked
        if not self._marks or written > self._marks[-1][1]:
            self._marks.append((self._last_sample, written))
        self._last_sample = now
        while self._marks and self._marks[0][1] <= acked:
            self._marks.popleft()
        if unacked <= 0 or not self._marks:
            self._marks.clear()
            return 0.0
        return now - self._marks[0][0]


@final
class InFlight:
    """One connection's in-flight budget and stall clock (see the module docstring).

    The writers call :meth:`fits` (the Hub's write at once) or :meth:`wait_room` (the
    publish task) before a data write and :meth:`note_written` after every write; the
    stall watch's sweep (``stall_watch``) calls :meth:`behind` and :meth:`want_proof`
    at each tick. Between measurements the bytes in flight
    are bounded from above by the last measurement plus what was written since, so a
    subscriber far from its budget costs no system call per write. A transport that can
    ping runs :meth:`prove_reads` beside them, which pings when the sweep asks.

    The publish task's writes: :meth:`start_send` when one begins, :meth:`end_send` when it
    is done; while a stall watch watches the connection (``send_watch``) it cuts a write past
    its ``send_deadline``, shifted past a pause of the daemon (:meth:`skip_send`).
    """

    __slots__ = (
        "_bound",
        "_buffer",
        "_clock",
        "_proof_asked",
        "_proof_wanted",
        "_proving",
        "behind_s",
        "budget",
        "in_flight",
        "proven",
        "read_proof",
        "send_deadline",
        "send_started",
        "send_watch",
        "sock",
        "written",
    )

    def __init__(
        self, sock: trio.socket.SocketType, now: float, *, budget: int = IN_FLIGHT_MAX_BYTES
    ) -> None:
        self.sock = sock
        self.budget = budget
        self._bound = 0
        self._buffer = SEND_BUFFER_BYTES
        self._clock = StallClock(now)
        # the last measurements (for /metrics)
        self.in_flight = 0
        self.behind_s = 0.0
        # bytes written in all, and of them proven read (while read_proof: prove_reads)
        self.written = 0
        self.proven = 0
        self.read_proof = False
        # the read proofs' state (want_proof asks, prove_reads pings)
        self._proof_wanted = trio.Event()
        self._proof_asked = now
        self._proving = False
        # the publish task's write in progress, begun at send_started, must end by
        # send_deadline (inf: none) — enforced by the stall watch that watches this
        # connection (send_watch), which shifts both past a pause of the daemon
        self.send_deadline = math.inf
        self.send_started = now
        self.send_watch: SendWatch | None = None

    def note_written(self, n: int) -> None:
        self._bound += n
        self.written += n

    def skip(self, gap_s: float) -> None:
        """The stall clock skips ``gap_s`` in which the daemon did not run
        (:meth:`StallClock.skip`)."""
        self._clock.skip(gap_s)

    def start_send(self, now: float, timeout_s: float) -> bool:
        """A write of the publish task begins at ``now`` and must end within ``timeout_s``:
        True when the stall watch enforces that (it is told to wake by the deadline), False
        when no watch watches this connection (the caller must)."""
        watch = self.send_watch
        if watch is None:
            self.send_deadline = math.inf
            return False
        self.send_started = now
        self.send_deadline = now + timeout_s
        watch.wake_by(self.send_deadline)
        return True

    def hurry_send(self, deadline: float) -> bool:
        """The write in progress, if any, must end by ``deadline`` if not sooner: True when
        the stall watch enforces that, False when no watch watches this connection."""
        watch = self.send_watch
        if watch is None:
            return False
        if self.send_deadline != math.inf and deadline < self.send_deadline:
            self.send_deadline = deadline
            watch.wake_by(deadline)
        return True

    def end_send(self) -> None:
        """The write in progress is done."""
        self.send_deadline = math.inf

    def skip_send(self, gap_s: float) -> None:
        """The write in progress skips ``gap_s`` in which the daemon did not run: its start
        and deadline move on by that much."""
        self.send_started += gap_s
        self.send_deadline += gap_s

    def want_proof(self, now: float, every_s: float) -> None:
        """Ask :meth:`prove_reads` for a ping if one is due at ``now``: something written is
        not yet proven read, no ping is waiting for its pong, and the last was asked for
        ``every_s`` or more ago (the stall watch's sweep calls it at each tick)."""
        if (
            not self.read_proof
            or self._proving
            or self.written <= self.proven
            or now - self._proof_asked < every_s
        ):
            return
        self._proving = True
        self._proof_asked = now
        self._proof_wanted.set()

    async def prove_reads(
        self, ping: Callable[[bytes], Awaitable[None]], *, ping_bytes: int
    ) -> None:
        """Send a ping each time :meth:`want_proof` asks for one (``ping(payload)`` writes
        it through this connection and returns once its pong is back) and count everything
        written before it, and the ping (``ping_bytes``: what :meth:`note_written` is told
        of a ping's frame), as read. From the call on, :meth:`behind` counts from these
        proofs instead of TCP acknowledgements. Runs until cancelled, or until ``ping``
        raises (the connection closed): the proof stops there, and the stall clock runs on.
        One ping at a time: a client that does not answer is sent no more. Waits on an
        event between pings, not a timer (a thousand connections, a thousand timers)."""
        self.read_proof = True
        serial = 0
        while True:
            await self._proof_wanted.wait()
            self._proof_wanted = trio.Event()
            serial += 1
            # what another task writes before the ping, after this, is left unproven: the
            # proof errs low (the clock early), never high
            covered = self.written + ping_bytes
            await ping(serial.to_bytes(PING_PAYLOAD_BYTES, "big"))
            self.proven = max(self.proven, covered)
            self._proving = False

    def _measure(self) -> int:
        unacked = unacknowledged_bytes(self.sock)
        self._bound = 0 if unacked is None else unacked
        self.in_flight = self._bound
        return self._bound

    def fits(self, n: int) -> bool:
        """A data write of ``n`` bytes may begin now: it stays within the budget, or it is
        the only thing in flight (then the send buffer is raised to hold all of it)."""
        if self._bound + n <= self.budget:
            return True
        unacked = self._measure()
        if unacked + n <= self.budget:
            return True
        if unacked == 0:
            self._hold(n)
            return True
        return False

    def _hold(self, n: int) -> None:
        """Raise the send buffer to hold a write of ``n`` bytes and the close frame."""
        needed = n + CLOSE_RESERVE_BYTES
        if needed > self._buffer:
            limit_send_buffer(self.sock, needed)
            self._buffer = needed

    async def wait_room(self, n: int) -> None:
        """Wait until :meth:`fits` (a checkpoint either way). The caller bounds the wait
        (the publish task's send timeout)."""
        await trio.lowlevel.checkpoint()
        delay = ROOM_POLL_FIRST_S
        while not self.fits(n):
            await trio.sleep(delay)
            delay = min(delay * 2, ROOM_POLL_MAX_S)

    def release_for_close(self) -> None:
        """Let the kernel take the close frame now, whatever is unsent before it (see the
        module docstring); only the send buffer limits the writes from here on."""
        if _TCP_NOTSENT_LOWAT is not None and self.sock.fileno() != -1:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, _NO_LOWAT)

    def behind(self, now: float) -> float:
        """Seconds behind (see :class:`StallClock`): from the read proofs when there are
        any (:meth:`prove_reads`), else from a sample of the socket; 0.0 when unknown."""
        if self.read_proof:
            if self._bound != 0:
                self._measure()  # for /metrics
            self.behind_s = self._clock.observe(now, self.proven, self.written - self.proven)
            return self.behind_s
        if self._bound == 0:  # nothing written since nothing was in flight: no system call
            self.behind_s = self._clock.observe(now, 0, 0)
            return self.behind_s
        acked = acknowledged_bytes(self.sock)
        unacked = self._measure()
        if acked is None:
            self.behind_s = 0.0
        else:
            self.behind_s = self._clock.observe(now, acked, unacked)
        return self.behind_s


__all__ = [
    "CLOSE_RESERVE_BYTES",
    "IN_FLIGHT_MAX_BYTES",
    "PINGS_PER_STALL",
    "PING_FRAME_BYTES",
    "SEND_BUFFER_BYTES",
    "InFlight",
    "SendWatch",
    "StallClock",
    "acknowledged_bytes",
    "limit_send_buffer",
    "unacknowledged_bytes",
]
