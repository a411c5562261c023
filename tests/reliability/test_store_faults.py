"""Issue 17 item 6: the SQLite store fails under ``tradecanvas serve`` while the replay
streams — the file system is full, or turns read-only — and a restart recovers.

- ``full``: the daemon runs with a file-size limit (``RLIMIT_FSIZE``, SIGXFSZ ignored, so a
  write past it fails with EFBIG as on a full disk) 256 KiB above the database's size.
- ``read-only``: the daemon starts in its own mount namespace with the database's folder
  bind-mounted onto itself read-only (as after a kernel's remount-ro on disk errors and a
  restart); nothing in the folder may change. It needs mount namespaces (root or
  CAP_SYS_ADMIN) and skips, saying so, without them. (Turning the folder read-only under a
  running daemon cannot be staged: the kernel refuses a read-only remount while files are
  open for writing.)

Each time: exit status :data:`ExitCode.STORE_FAILURE` and exactly one error line, the
daemon's critical ``store failure, stopping (exit code 3): …``, ``PRAGMA integrity_check`` ok and
nothing half-committed (every stored 5m bar has its five stored minutes and every full
5-minute bucket its 5m bar: derived bars commit in their base candles' transaction), every
stored candle equal to the source; then a restart without the fault ends with every candle
stored once, equal to the source, and a subscriber resuming across the runs got each once,
in order.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import resource
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Final

import httpx
import pytest
import trio

from tests.cli_rig import children, exit_code_within, wait_for_line
from tests.reliability.record import ReliabilityRecord, report, sized
from tests.reliability.rig import (
    START,
    WAIT_S,
    Subscriber,
    csv_files,
    db_connect,
    duplicates,
    integrity,
    market_files,
    serve_env,
    start_replay,
    start_serve,
    stored_differences,
)
from tradecanvas.errors import ExitCode

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SEED = 1706
ERROR_LINE: Final = re.compile(r"^(CRITICAL|ERROR)\b")
STORE_LINE: Final = re.compile(
    r"CRITICAL tradecanvas\.daemon: store failure, stopping \(exit code 3\): \S"
)
RECOVERY_LINE: Final = re.compile(
    r"^WARNING tradecanvas\.daemon: store outage over, restarting \(exit code 3\): the store"
    r" takes writes again after the outage: this restart is the recovery"
)
OUTAGE_LINE: Final = r"CRITICAL tradecanvas\.ingest\.store_outage: store failure, ingest stopped"
BIND_RO: Final = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" && exec "$@"'


def size_limit(limit: int) -> Callable[[], None]:
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, as ENOSPC, not a core dump
        # the soft limit only: the test lifts it again (prlimit) as freeing space would
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return preexec


async def outage_is_shown(http: str, series: str) -> None:
    """/readyz is 503 with store_writable false, and stored candles are still served."""
    async with httpx.AsyncClient(base_url=http, timeout=WAIT_S) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["store_writable"] is False
        read = await client.get("/api/market/candles", params={"series_id": series})
        assert read.status_code == 200 and read.json()["candles"], read.text


def need_namespaces() -> None:
    if shutil.which("unshare") and shutil.which("nsenter"):
        probe = ["unshare", "-m", "--propagation", "private", "true"]
        if subprocess.run(probe, capture_output=True, check=False).returncode == 0:
            return
    pytest.skip("no mount namespaces here (unshare -m needs CAP_SYS_ADMIN): no read-only case")


def half_committed(db: Path, series: str) -> list[int]:
    """5m buckets whose stored bar and stored minutes disagree (one without the other)."""
    five = series.removesuffix(":1m") + ":5m"
    with contextlib.closing(db_connect(db)) as conn:
        query = "SELECT candle_time FROM candles WHERE series_id = ? AND complete = 1"
        minutes = [r[0] for r in conn.execute(query, (series,))]
        bars = {r[0] for r in conn.execute(query, (five,))}
    per_bucket: dict[int, int] = {}
    for t in minutes:
        per_bucket[t - t % 300] = per_bucket.get(t - t % 300, 0) + 1
    full = {b for b, n in per_bucket.items() if n == 5}
    return sorted(full ^ bars)


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("kind", ["full", "read-only"])
async def test_a_store_failure_exits_3_cleanly_and_a_restart_recovers(
    tmp_path: Path, kind: str
) -> None:
    if kind.startswith("read-only"):
        need_namespaces()
    count = sized(600, 2500)
    source = market_files(tmp_path, SEED, count)
    series = sorted(source)
    data = tmp_path / "data"
    data.mkdir()
    db = data / "market.sqlite3"
    log = tmp_path / "serve.log"
    sub = Subscriber(series, START)
    with children() as kids:
        _, ws, rest = await start_replay(kids, tmp_path, csv_files(tmp_path), "--speed", "12000")
        env = serve_env(db, ws, rest, series)
        # run 1: candles flow into a fresh store; a clean stop
        proc, url, _ = await start_serve(kids, log, env)
        async with trio.open_nursery() as nursery:
            await nursery.start(sub.session, url)
            await sub.wait_until(lambda: sub.total() >= 40)
            proc.send_signal(signal.SIGTERM)
            assert await exit_code_within(proc, WAIT_S) == 0
        # run 2: the store fails under the daemon
        before = len((await trio.Path(log).read_text()).splitlines())
        if kind == "full":
            limit = max(p.stat().st_size for p in data.iterdir()) + 256 * 1024
            proc, url, http = await start_serve(kids, log, env, size_limit(limit))
        else:
            untouched = digest(data)
            wrap = ["unshare", "-m", "--propagation", "private", "sh", "-c", BIND_RO, str(data)]
            proc = kids.start(["serve"], log, env, prefix=wrap)
            url = ""
        async with trio.open_nursery() as nursery:
            if url:
                await nursery.start(sub.session, url)
            if kind == "full":
                # the ingest stops, the daemon stays up serving what is stored, /readyz says
                # why; once the disk takes writes again, it restarts (exit 3) to repair
                await wait_for_line(log, OUTAGE_LINE, proc, within=WAIT_S)
                await outage_is_shown(http, series[0])
                infinity = resource.RLIM_INFINITY
                resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (infinity, infinity))
            code = await exit_code_within(proc, WAIT_S)
            await sub.wait_until(lambda: not url or sub.close_code is not None)
        lines = (await trio.Path(log).read_text()).splitlines()[before:]
        errors = [line for line in lines if ERROR_LINE.match(line)]
        assert code == ExitCode.STORE_FAILURE, "\n".join(lines[-30:])
        if kind == "full":
            # one error line, the outage's; its end is a warning that says it is the
            # recovery, not a failure
            assert len(errors) == 1 and re.search(OUTAGE_LINE, errors[0]), errors
            assert sum(bool(RECOVERY_LINE.match(line)) for line in lines) == 1, lines[-30:]
        else:  # one error line: the daemon's stop, naming the failure and the exit code
            assert len(errors) == 1 and STORE_LINE.search(errors[0]), errors
        if kind == "read-only":
            assert digest(data) == untouched
        assert integrity(db) == "ok"
        for sid in series:
            assert half_committed(db, sid) == [], sid
            _, _, different = stored_differences(db, sid, source[sid])
            assert different == 0, sid
        # run 3: no fault; the daemon catches up from REST and the subscriber resumes
        proc, url, _ = await start_serve(kids, log, env)
        async with trio.open_nursery() as nursery:
            await nursery.start(sub.session, url)
            await sub.wait_until(lambda: sub.total() >= len(series) * count)
            proc.send_signal(signal.SIGTERM)
            assert await exit_code_within(proc, WAIT_S) == 0

    lost = dup = stored = 0
    for sid in series:
        expected = [c.candle_time for c in source[sid]]
        dup += duplicates(sub.times[sid])
        lost += len(set(expected) - set(sub.times[sid]))
        assert sub.times[sid] == expected, sid
        n, missing, different = stored_differences(db, sid, source[sid])
        stored += n
        assert (n, missing, different) == (count, 0, 0), sid
        assert half_committed(db, sid) == [], sid
    assert integrity(db) == "ok"
    assert not sub.gaps
    report(
        ReliabilityRecord(
            test=f"store_faults[{kind}]",
            seed=SEED,
            faults=1,
            attempted=len(series) * count,
            stored=stored,
            delivered=sum(len(t) for t in sub.times.values()),
            lost=lost,
            duplicated=dup,
        )
    )
