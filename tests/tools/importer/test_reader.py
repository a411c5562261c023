"""The reading process of a large import (``tools/importer/reader.py`` and ``child.py``): its
answers, its refusals and failures reaching the caller with the file named, a killed child
as an error and not a hang, and the child ended with its block, cancelled or not."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio

from tests.tools.importer.rig import DAYS, SPOT_1M, dump_dir, plan, real_zips
from tradecanvas.tools.importer.child import frame
from tradecanvas.tools.importer.files import ArchiveFileError, read_file
from tradecanvas.tools.importer.reader import (
    CHILD_MIN_ROWS,
    ReadingProcessError,
    build_checked,
    expected_rows,
    open_reading_process,
)


async def test_the_child_reads_the_same_candles_as_this_process() -> None:
    files = plan(real_zips())
    async with open_reading_process() as reader:
        for f in files:
            await reader.request(f)
        for f in files:
            checked = await reader.receive(f)
            read, here = build_checked(checked), read_file(f)
            assert (read.file, read.checksum, read.holes) == (here.file, True, [])
            assert read.candles == here.candles
            assert [str(c.volume) for c in read.candles] == [str(c.volume) for c in here.candles]
    assert reader.process.returncode == 0  # its stdin closed, it ended by itself


async def test_a_refused_file_reaches_the_caller_with_its_name_and_line(tmp_path: Path) -> None:
    lines = (dump_dir() / f"BTCUSDT-1m-{DAYS[1]}.csv").read_text().splitlines()
    lines[700] = lines[700].replace(",", ",x", 1)
    bad = tmp_path / "spot" / f"BTCUSDT-1m-{DAYS[1]}.csv"
    bad.parent.mkdir()
    bad.write_text("\n".join(lines) + "\n")
    [good] = plan(real_zips()[:1])
    [refused] = plan([bad])
    async with open_reading_process() as reader:
        await reader.request(refused)
        await reader.request(good)
        with pytest.raises(ArchiveFileError) as caught:
            await reader.receive(refused)
        assert not isinstance(caught.value, ReadingProcessError)
        assert str(caught.value) == (
            f"{bad}: line 701: a field is not a number; nothing of this file stored"
        )
        # the process goes on with the next file
        assert len(build_checked(await reader.receive(good)).candles) == 1440


async def test_a_killed_child_is_an_error_naming_the_file_not_a_hang() -> None:
    [f] = plan(real_zips()[:1])
    async with open_reading_process() as reader:
        reader.process.kill()
        await reader.process.wait()
        await reader.request(f)  # (its pipe is closed: the receive says why)
        with trio.fail_after(10), pytest.raises(ReadingProcessError) as caught:
            await reader.receive(f)
    assert str(caught.value) == (
        f"{f.path}: the reading process was killed by signal {int(signal.SIGKILL)} while"
        " reading it; nothing of this file stored"
    )


async def test_an_error_inside_the_child_is_an_error_naming_the_file() -> None:
    [f] = plan(real_zips()[:1])
    async with open_reading_process() as reader:
        assert reader.process.stdin is not None
        await reader.process.stdin.send_all(frame("not a file"))  # check_file fails on it
        with pytest.raises(ReadingProcessError) as caught:
            await reader.receive(f)
        assert str(caught.value).startswith(f"{f.path}: the reading process failed: ")
        assert "AttributeError" in str(caught.value)
        # it is still there for the next file
        await reader.request(f)
        assert len(build_checked(await reader.receive(f)).candles) == 1440


async def test_a_cancel_ends_the_child_at_once() -> None:
    [f] = plan(real_zips()[:1])
    with trio.CancelScope() as scope:
        async with open_reading_process() as reader:
            await reader.request(f)
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert reader.process.returncode == -signal.SIGKILL


async def test_an_error_in_the_block_ends_the_child_at_once() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        async with open_reading_process() as reader:
            raise RuntimeError("boom")
    assert reader.process.returncode == -signal.SIGKILL


async def test_the_child_ignores_the_terminal_ctrl_c() -> None:
    """A Ctrl-C reaches the whole process group: the parent stops after its transaction
    and ends the child; the child does not die under it first."""
    [f] = plan(real_zips()[:1])
    async with open_reading_process() as reader:
        await reader.request(f)
        build_checked(await reader.receive(f))  # it has started and installed its handlers
        os.kill(reader.process.pid, signal.SIGINT)
        os.kill(reader.process.pid, signal.SIGTERM)
        await reader.request(f)
        assert len(build_checked(await reader.receive(f)).candles) == 1440
    assert reader.process.returncode == 0


def test_a_small_import_reads_on_a_thread_a_large_one_in_a_child(tmp_path: Path) -> None:
    assert expected_rows(plan(real_zips())) == 3 * 1440 < CHILD_MIN_ROWS
    # a month by its name; a CSV without an archive name by its size
    month = tmp_path / "spot" / "BTCUSDT-1m-2020-01.zip"
    month.parent.mkdir()
    month.write_bytes(b"")
    assert expected_rows(plan([month])) == 31 * 1440
    csv = tmp_path / "rows.csv"
    csv.write_bytes(b"x" * 130 * 1000)
    assert expected_rows(plan([csv], series=SPOT_1M)) == 1000
