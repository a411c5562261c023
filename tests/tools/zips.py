"""Hostile zips for the tests of ``import`` and ``fetch-archive``, built with ``zipfile``:
bombs made cheaply of a highly compressible member, members that lie about their size, and
a measure of the memory a read takes."""

from __future__ import annotations

import contextlib
import hashlib
import struct
import tracemalloc
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import attrs

T0 = 1_577_836_800  # 2020-01-01 00:00 UTC
DAY_NAME = "BTCUSDT-1m-2020-01-01"
# the bound of a daily 1m file's CSV: 1,440 rows of 512 bytes and 4,096 (wire/archive.py)
DAILY_1M_BOUND = 1440 * 512 + 4096
_CHUNK = b"0" * (1 << 20)


def row(t: int, *, minutes: int = 1, price: str = "1.5") -> str:
    """An archive row (12 columns, ms) of a bar opening at ``t`` lasting ``minutes``."""
    close = (t + 60 * minutes) * 1000 - 1
    return f"{t * 1000},{price},{price},{price},{price},2,{close},3,4,1,1.5,0\n"


def day_rows(count: int = 1440, start: int = T0) -> str:
    return "".join(row(start + 60 * i) for i in range(count))


def put_zip(
    path: Path,
    members: Mapping[str, str | bytes],
    *,
    method: int = zipfile.ZIP_DEFLATED,
    checksum: bool = True,
) -> Path:
    """A zip of ``members`` at ``path`` and (``checksum``) its ``.CHECKSUM`` as Binance
    writes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    if checksum:
        write_checksum(path)
    return path


def bomb(path: Path, member: str, size: int, *, method: int = zipfile.ZIP_DEFLATED) -> Path:
    """A zip holding one member of ``size`` zero digits (streamed: a MiB at a time), with a
    matching ``.CHECKSUM``. Deflated, 8 MiB take 8 KB."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", method) as archive, archive.open(member, "w") as out:
        left = size
        while left:
            out.write(_CHUNK[: min(left, len(_CHUNK))])
            left -= min(left, len(_CHUNK))
    write_checksum(path)
    return path


def declare_size(path: Path, size: int) -> None:
    """Make the (only) member of the zip at ``path`` declare ``size`` bytes, in its local and
    central headers, whatever it inflates to; the ``.CHECKSUM`` is written again."""
    data = bytearray(path.read_bytes())
    local = data.index(b"PK\x03\x04")
    struct.pack_into("<I", data, local + 22, size)
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, size)
    path.write_bytes(bytes(data))
    write_checksum(path)


def set_flag_bits(path: Path, bits: int) -> None:
    """Set general-purpose flag bits of the only member (0x1: encrypted) in both headers."""
    data = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.index(signature) + offset
        struct.pack_into("<H", data, at, struct.unpack_from("<H", data, at)[0] | bits)
    path.write_bytes(bytes(data))
    write_checksum(path)


def write_checksum(path: Path) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_name(path.name + ".CHECKSUM").write_text(f"{digest}  {path.name}\n")


@attrs.define
class Peak:
    """The most memory Python held above the start of a :func:`measured` block, in bytes."""

    bytes: int = 0


@contextlib.contextmanager
def measured() -> Iterator[Peak]:
    """Measure the peak of the memory allocated inside the block (tracemalloc: every
    allocation through Python's allocators, zlib's and bz2's buffers included)."""
    peak = Peak()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        yield peak
    finally:
        peak.bytes = tracemalloc.get_traced_memory()[1] - start
        tracemalloc.stop()
