"""``import_files``' transactions: about ``batch`` candles each across file boundaries,
ending where no derived bucket goes on (history behind a stored series then logs no
``incomplete`` gap and counts nothing revised), a file counted done once all its candles are
committed, the files before a refused one committed."""

from __future__ import annotations

import io
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import pytest

from tests.tools.importer.rig import (
    FLAGS,
    SPOT_1M,
    SPOT_5M,
    Nobody,
    dump_dir,
    events,
    identical,
    plan,
    real_zips,
    rows,
)
from tradecanvas.model import Candle, SeriesId
from tradecanvas.pipeline.commit import IngestPipeline
from tradecanvas.pipeline.levels import Level
from tradecanvas.store.open import open_store
from tradecanvas.tools.importer import ArchiveCommitter, ArchiveFileError, ImportTally
from tradecanvas.tools.importer.cli import import_files
from tradecanvas.tools.importer.commit import ImportCommit
from tradecanvas.tools.progress import Progress


class _Sizes:
    """A real committer, and the size of each transaction it was given."""

    def __init__(self, inner: ArchiveCommitter, tally: ImportTally) -> None:
        self.inner = inner
        self.tally = tally
        self.sizes: list[int] = []
        self.files_done: list[int] = []  # files counted done before each transaction

    def levels_of(self, series: SeriesId) -> list[tuple[Level, int]]:
        return self.inner.levels_of(series)

    async def commit(
        self, series: SeriesId, candles: Sequence[Candle], *, checked: bool = False
    ) -> ImportCommit:
        self.sizes.append(len(candles))
        self.files_done.append(self.tally.files_done)
        return await self.inner.commit(series, candles, checked=checked)


async def _import(db: Path, zips: Sequence[Path], batch: int) -> tuple[_Sizes, ImportTally, bool]:
    """The transactions, the tally, and whether a file was refused."""
    store = await open_store(db)
    tally = ImportTally(files_total=len(zips))
    refused = False
    try:
        committer = _Sizes(
            ArchiveCommitter(IngestPipeline.from_flags(store, Nobody(), FLAGS)), tally
        )
        progress = Progress(io.StringIO(), log=logging.getLogger("test"), verb="import", tty=False)
        try:
            await import_files(
                plan(zips), cast(ArchiveCommitter, committer), tally, progress, batch=batch
            )
        except ArchiveFileError:
            refused = True
    finally:
        await store.aclose()
    return committer, tally, refused


async def test_transactions_are_full_across_the_files(tmp_path: Path) -> None:
    """Three days in transactions of about 2,000 candles, across the files: into a store
    that holds the series (behind day 3), each ends at the last midnight before its 2,000th
    candle (the 1d bucket's end); into an empty one, the first does, and the others (the
    short way, which carries a bucket over) are 2,000 each. A file is done once its last
    candle is committed."""
    zips = real_zips()
    db = tmp_path / "m.sqlite3"
    await _import(db, zips[2:], 2000)
    committer, tally, refused = await _import(db, zips[:2], 2000)
    assert not refused and committer.sizes == [1440, 1440]
    assert committer.files_done == [0, 1]
    committer, tally, refused = await _import(tmp_path / "n.sqlite3", zips, 2000)
    assert committer.sizes == [1440, 2000, 880]
    assert committer.files_done == [0, 1, 2]
    assert tally.files_done == 3 and tally.series[SPOT_1M].verified == 3
    assert tally.series[SPOT_1M].new == 4320
    assert len(await rows(tmp_path / "n.sqlite3", SPOT_1M)) == 4320


async def test_history_behind_a_stored_series_is_whole_buckets(tmp_path: Path) -> None:
    """Days 1 and 2 imported behind day 3 (history behind the live edge), in transactions
    of 1,000 (smaller than the 1d bucket): no ``incomplete`` gap event, no derived bar
    counted revised (each is new), and the same rows as one import of the three days.
    Cut at every 1,000th candle, each transaction derived the bucket it ended inside from
    its first part, logged it as incomplete, and the next one revised it."""
    behind, whole = tmp_path / "behind.sqlite3", tmp_path / "whole.sqlite3"
    zips = real_zips()
    await _import(behind, zips[2:], 1000)
    committer, tally, _ = await _import(behind, zips[:2], 1000)
    assert committer.sizes == [1440, 1440]
    assert [e.event for e in await events(behind)].count("gap") == 0
    derived = {sid: t for sid, t in tally.series.items() if t.derived}
    assert derived and all(t.revised == 0 for t in derived.values())
    assert tally.series[SPOT_5M].new == 576
    await _import(whole, zips, 1000)
    for sid in (SPOT_1M, *derived):
        assert identical(await rows(behind, sid), await rows(whole, sid)), sid


async def test_the_rest_before_a_refused_file_is_committed(tmp_path: Path) -> None:
    folder = tmp_path / "spot"
    folder.mkdir()
    for path in real_zips():
        for name in (path.name, path.name + ".CHECKSUM"):
            shutil.copyfile(dump_dir() / name, folder / name)
    zips = sorted(folder.glob("*.zip"))
    zips[1].with_name(zips[1].name + ".CHECKSUM").write_text("0" * 64 + "\n")
    db = tmp_path / "m.sqlite3"
    committer, tally, refused = await _import(db, zips, 1000)
    assert refused
    assert committer.sizes == [1440] and tally.files_done == 1
    assert len(await rows(db, SPOT_1M)) == 1440


@pytest.mark.parametrize("batch", [1440, 5000])
async def test_a_batch_the_size_of_a_file_or_more(tmp_path: Path, batch: int) -> None:
    committer, tally, _ = await _import(tmp_path / "m.sqlite3", real_zips(), batch)
    assert committer.sizes == ([1440] * 3 if batch == 1440 else [4320])
    assert tally.files_done == 3
