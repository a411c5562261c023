"""``python -m bench.fsync [--dir DIR] [--n N] [--every-ms MS]``: this disk's fsync, alone.

What one commit of the daemon costs at least, with nothing else of the daemon around it
(docs/benchmarks.md, "What limits each figure"): in a scratch folder on the filesystem the
benchmarks' stores live on (the system's temporary folder, unless ``--dir``),

- ``fdatasync``: a 4 KiB append to a file, then ``os.fdatasync`` — the disk's own flush;
- ``sqlite_commit``: the ``COMMIT`` of a 25-row transaction (the size of a live group at
  5,000 closes/s) into a WAL database with ``synchronous=FULL``, as the store's writer
  commits — the WAL's write and its fsync.

``--every-ms``: a pause between two operations (default 5 ms: about the daemon's commit
cadence at 5,000 closes/s); 0 runs them back to back. Prints the percentiles in ms.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

PERCENTILES = (0.5, 0.9, 0.99, 0.999)


def _percentiles(ms: Sequence[float]) -> str:
    ordered = sorted(ms)
    cells = [
        f"p{q * 100:g} {ordered[min(len(ordered) - 1, int(q * len(ordered)))]:.2f}"
        for q in PERCENTILES
    ]
    return f"n {len(ordered)}, " + ", ".join(cells) + f", max {ordered[-1]:.2f} ms"


def _timed(n: int, every_s: float, op: Callable[[int], Callable[[], None]]) -> list[float]:
    out = []
    for i in range(n):
        finish = op(i)  # the work before the clock (a write, the transaction's rows)
        start = time.perf_counter()
        finish()
        out.append((time.perf_counter() - start) * 1e3)
        if every_s:
            time.sleep(every_s)
    return out


def fdatasync(folder: Path, n: int, every_s: float) -> list[float]:
    fd = os.open(folder / "probe.bin", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    block = os.urandom(4096)
    try:

        def op(_: int) -> Callable[[], None]:
            os.write(fd, block)
            return lambda: os.fdatasync(fd)

        return _timed(n, every_s, op)
    finally:
        os.close(fd)


def sqlite_commit(folder: Path, n: int, every_s: float, rows: int = 25) -> list[float]:
    conn = sqlite3.connect(folder / "probe.sqlite3", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(
        "CREATE TABLE c (series TEXT, t INTEGER, o TEXT, h TEXT, l TEXT, cl TEXT, v TEXT,"
        " PRIMARY KEY (series, t)) WITHOUT ROWID"
    )
    try:

        def op(i: int) -> Callable[[], None]:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO c VALUES (?, ?, '1.0', '2.0', '0.5', '1.5', '123.456')",
                [(f"binance:futures:S{s}/USDT", i * 60) for s in range(i, i + rows)],
            )
            return commit

        def commit() -> None:
            conn.execute("COMMIT")

        return _timed(n, every_s, op)
    finally:
        conn.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fsync", description=__doc__)
    parser.add_argument("--dir", type=Path, help="where the scratch files go (default: $TMPDIR)")
    parser.add_argument("--n", type=int, default=2000, help="operations of each kind")
    parser.add_argument("--every-ms", type=float, default=5.0, help="pause between operations")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-fsync-", dir=args.dir) as d:
        folder = Path(d)
        every = args.every_ms / 1e3
        print(f"{folder} ({os.statvfs(folder).f_bsize} B blocks), a pause of {args.every_ms:g} ms")
        print("fdatasync     ", _percentiles(fdatasync(folder, args.n, every)))
        print("sqlite_commit ", _percentiles(sqlite_commit(folder, args.n, every)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
