"""``tradecanvas import`` at storage speed (issue 16): a year of one symbol's 1m klines,
generated in Binance's archive layout (12 monthly zips with their ``.CHECKSUM``), imported
into a fresh store.

- ``import_ratio_vs_bare_sqlite``: the import's time (checksums, unzip, parse, validate,
  commit in 4,000-candle transactions — the store being fresh, by the import's short way,
  which stores what the pipeline's commit step would — 5m…1d derived, the ``import``
  events) ÷ a bare ``executemany`` of the same rows into the same schema
  (the same PRAGMAs, the same transaction size; the rows split from the unzipped CSV text
  inside the clock, the unzipping outside it). Target ≤ 2.0.
- ``import_candles_per_s``: 1m candles imported per second into SQLite (recorded).
- ``import_candles_per_s_postgres``: the same into a scratch PostgreSQL database (recorded).

Also ``.venv/bin/python -m bench.bench_import [--smoke] [--profile FILE]``: the same figures,
and with ``--profile`` a cProfile of one SQLite import written to FILE — of every thread: the
event loop's, the file reader's (the parse) and the store writer's (the commit).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import psycopg
import trio
from psycopg import sql

from bench.common import Figure, alternate, median
from bench.micro import bare_executemany
from bench.sizes import FULL, SMOKE, Sizes
from tradecanvas.errors import ExitCode
from tradecanvas.model import Timeframe
from tradecanvas.tools.importer import DEFAULT_BATCH, ImportFile, run_import
from tradecanvas.tools.importer.files import find_files, plan_file
from tradecanvas.tools.progress import Progress

ADMIN_URL: Final = "postgresql://postgres@127.0.0.1:5432/postgres"
SID: Final = "binance:spot:BTC/USDT:1m"
DERIVED: Final = tuple(Timeframe.parse(t) for t in ("5m", "15m", "1h", "4h", "1d"))
BATCH: Final = DEFAULT_BATCH  # the import's own transaction size, for both sides
YEAR_START: Final = 1_672_531_200  # 2023-01-01 00:00 UTC: 365 days, 525,600 minutes
SMOKE_DAYS: Final = 2


def _lines(start: int, minutes: int) -> str:
    """Archive rows (spot, ms, no header): a walk of prices with 8-decimal text."""
    out = []
    price = 1_650_000  # cents
    for i in range(minutes):
        t = (start + 60 * i) * 1000
        step = (i * 7919) % 201 - 100
        o, c = price, price + step
        h, lo = max(o, c) + (i % 13), min(o, c) - (i % 11)
        price = c
        volume = 10 + (i * 31) % 5000
        out.append(
            f"{t},{o / 100:.8f},{h / 100:.8f},{lo / 100:.8f},{c / 100:.8f},{volume / 1000:.8f},"
            f"{t + 59_999},{volume * o / 100_000:.8f},{50 + i % 400},{volume / 2000:.8f},"
            f"{volume * o / 200_000:.8f},0\n"
        )
    return "".join(out)


def make_archive(folder: Path, smoke: bool) -> list[Path]:
    """Monthly zips of 2023 (smoke: two daily zips), each with its ``.CHECKSUM``."""
    spot = folder / "spot"
    spot.mkdir(parents=True)
    periods: list[tuple[str, int, int]] = []
    if smoke:
        for day in range(SMOKE_DAYS):
            start = YEAR_START + 86_400 * day
            periods.append((f"2023-01-{day + 1:02d}", start, 1440))
    else:
        for month in range(1, 13):
            start = int(datetime(2023, month, 1, tzinfo=UTC).timestamp())
            end = int(datetime(2023 + month // 12, month % 12 + 1, 1, tzinfo=UTC).timestamp())
            periods.append((f"2023-{month:02d}", start, (end - start) // 60))
    for label, start, minutes in periods:
        name = f"BTCUSDT-1m-{label}"
        path = spot / f"{name}.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(f"{name}.csv", _lines(start, minutes))
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        (spot / f"{name}.zip.CHECKSUM").write_text(f"{digest}  {path.name}\n")
    return sorted(spot.glob("*.zip"))


def _plan(zips: Sequence[Path]) -> list[ImportFile]:
    return [plan_file(p, None, None) for p in find_files(zips)]


async def _import(location: str | Path, files: Sequence[ImportFile]) -> float:
    progress = Progress(io.StringIO(), log=logging.getLogger("bench"), verb="import", tty=False)
    start = time.perf_counter()
    code, tally, error = await run_import(files, location, DERIVED, "bench", progress, batch=BATCH)
    elapsed = time.perf_counter() - start
    if code != ExitCode.OK or tally.series[SID].unchanged:
        raise RuntimeError(f"import failed ({code}): {error}")
    return elapsed


def _rows_of(text: str) -> list[tuple[object, ...]]:
    """The ``candles`` rows of an archive CSV's text, split as a hand-written importer would."""
    rows: list[tuple[object, ...]] = []
    for line in text.splitlines():
        p = line.split(",")
        rows.append(
            (SID, int(p[0]) // 1000, p[1], p[2], p[3], p[4], p[5], p[7], int(p[8]), p[9], p[10],
             "rest", 1)
        )  # fmt: skip
    return rows


def sqlite_import_s(files: Sequence[ImportFile]) -> float:
    with tempfile.TemporaryDirectory() as d:
        return trio.run(_import, Path(d) / "m.sqlite3", files)


def _transactions(texts: Sequence[str]) -> Iterator[list[tuple[object, ...]]]:
    """The rows of ``texts`` in lists of BATCH (the import's transaction size), split as the
    generator is read."""
    pending: list[tuple[object, ...]] = []
    for text in texts:
        pending += _rows_of(text)
        while len(pending) >= BATCH:
            yield pending[:BATCH]
            del pending[:BATCH]
    if pending:
        yield pending


def bare_sqlite_s(zips: Sequence[Path]) -> float:
    """The same rows by the commit benchmark's bare ``executemany``
    (:func:`bench.micro.bare_executemany`) in transactions of BATCH rows, as many as the
    import's (before, a month's file went in one); unzipped outside the clock, split from
    the text inside it."""
    texts = []
    for path in zips:
        with zipfile.ZipFile(path) as archive:
            texts.append(archive.read(archive.namelist()[0]).decode())
    return bare_executemany(lambda: _transactions(texts))


def postgres_import_s(files: Sequence[ImportFile]) -> float:
    name = f"tc_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        return trio.run(_import, f"postgresql://postgres@127.0.0.1:5432/{name}", files)
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def bench_import(sizes: Sizes, rounds: int | None) -> list[Figure]:
    smoke = sizes == SMOKE
    rounds = rounds or (1 if smoke else 2)
    with tempfile.TemporaryDirectory(prefix="bench-import-") as d:
        zips = make_archive(Path(d), smoke)
        files = _plan(zips)
        candles = SMOKE_DAYS * 1440 if smoke else 525_600
        ours, bare = alternate(rounds, lambda: sqlite_import_s(files), lambda: bare_sqlite_s(zips))
        pg = [postgres_import_s(files) for _ in range(1 if smoke else rounds)]
    ours_s, bare_s, pg_s = median(ours), median(bare), median(pg)
    raw: dict[str, object] = {
        "candles": candles,
        "files": len(zips),
        "transaction_candles": BATCH,
        "derived": [t.text for t in DERIVED],
        "import_s": ours_s,
        "bare_sqlite_s": bare_s,
        "postgres_import_s": pg_s,
        "import_rounds_s": ours,
        "bare_rounds_s": bare,
        "postgres_rounds_s": pg,
    }
    return [
        Figure(
            "import_ratio_vs_bare_sqlite",
            ours_s / bare_s,
            "max",
            2.0,
            "tradecanvas import of a year of 1m archive zips ÷ bare executemany of the rows",
            raw,
        ),
        Figure(
            "import_candles_per_s",
            candles / ours_s,
            "record",
            None,
            "1m candles imported per second into SQLite (5m…1d derived)",
            {"import_s": ours_s, "candles": candles},
        ),
        Figure(
            "import_candles_per_s_postgres",
            candles / pg_s,
            "record",
            None,
            "1m candles imported per second into PostgreSQL (5m…1d derived)",
            {"import_s": pg_s, "candles": candles},
        ),
    ]


def profile_threads(run: Callable[[], object], out: Path) -> None:
    """cProfile ``run()`` in this thread and in every thread it starts, their stats merged
    into ``out`` (``pstats``). The import's work is on worker threads (the parse, the
    commit), which a cProfile of this thread alone does not see."""
    import cProfile
    import pstats
    import threading

    started: list[cProfile.Profile] = []

    def start(frame: object, event: str, arg: object) -> None:
        """A new thread's first profile event: its own profiler from here on."""
        profile = cProfile.Profile()
        started.append(profile)
        profile.enable()

    main = cProfile.Profile()
    threading.setprofile(start)
    try:
        main.enable()
        run()
    finally:
        main.disable()
        threading.setprofile(None)
    stats = pstats.Stats(main)
    for profile in started:
        stats.add(profile)
    stats.dump_stats(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_import")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--profile", type=Path, help="cProfile one SQLite import into FILE")
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    if args.profile is not None:
        with tempfile.TemporaryDirectory(prefix="bench-import-") as d:
            files = _plan(make_archive(Path(d), args.smoke))
            profile_threads(lambda: sqlite_import_s(files), args.profile)
        return 0
    for figure in bench_import(sizes, args.rounds):
        sys.stdout.write(figure.line(judged=not args.smoke) + "\n")
        sys.stdout.write(f"     {json.dumps(figure.raw, default=str)[:600]}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
