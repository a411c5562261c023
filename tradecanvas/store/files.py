"""What the SQLite store checks of its files and their file system, apart from SQLite: the
room left on the disk, which of its files or its folder this process may not write, whether
another user could replace them (:func:`exposed_folder`), and which file a path names now
(its device and inode).

SQLite's own words for these cases mislead: a clean store opened on a full disk fails with
``disk I/O error`` (the ``-shm`` file cannot grow), a folder it may not create the
``-wal`` in with ``attempt to write a readonly database``, and a write into room left in
an old WAL goes through on a disk with no byte free. :func:`short_of_room` and
:func:`unwritable_part` say what is wrong instead; both are plain functions of what they
are given or of one ``stat``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Final, NamedTuple

# The room a store needs on its file system to be called writable after an outage: what
# the restart's repair batch (the missed minutes of every series, and their derived bars)
# and the WAL's growth take, with room to spare. SQLite reuses an old WAL from its start,
# so a small write can go through on a disk with no byte free, and the restart after it
# failed again at once (three restarts in 20 s in the review, and systemd gave up).
ROOM_BYTES: Final = 8 * 1024 * 1024
# ... but never more than this share of a small file system (a test's tmpfs, a 4 MiB
# partition), which could otherwise never hold enough
ROOM_SHARE: Final = 4
WAL_SUFFIX: Final = "-wal"
SHM_SUFFIX: Final = "-shm"


class DiskSpace(NamedTuple):
    """Bytes free for this process on a file system (``free``: root may use the blocks
    kept back for it), and its size."""

    free: int
    size: int


def disk_space(folder: Path) -> DiskSpace:
    """The file system holding ``folder`` (raises OSError)."""
    st = os.statvfs(folder)
    free_blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail
    return DiskSpace(free_blocks * st.f_frsize, st.f_blocks * st.f_frsize)


def room_needed(space: DiskSpace) -> int:
    return min(ROOM_BYTES, space.size // ROOM_SHARE)


def short_of_room(space: DiskSpace) -> str | None:
    """Why ``space`` is too little for the store's writes, None when it is enough."""
    needed = room_needed(space)
    if space.free >= needed:
        return None
    return f"{_size(space.free)} free on the store's file system, {_size(needed)} needed"


def full_disk(folder: Path) -> str | None:
    """``short_of_room`` of the file system holding ``folder``, said as a full disk; None
    when there is room or it cannot be asked."""
    try:
        short = short_of_room(disk_space(folder))
    except OSError:
        return None
    return None if short is None else f"the disk is full ({short}): free space there"


def unwritable_part(path: Path) -> str | None:
    """What of a store at ``path`` this process may not write, besides the file itself:
    its folder (SQLite creates the ``-wal`` and ``-shm`` files there, and deletes them at
    close), or a ``-wal`` / ``-shm`` file left there. None when all of it may be written."""
    for suffix in (WAL_SUFFIX, SHM_SUFFIX):
        part = Path(f"{path}{suffix}")
        if part.exists() and not os.access(part, os.W_OK):
            return f"its {suffix} file {part}"
    if not os.access(path.parent, os.W_OK):
        return f"its folder {path.parent} (where SQLite creates the -wal and -shm files)"
    return None


def exposed_folder(folder: Path) -> str | None:
    """Why another user could replace or remove the store's files in ``folder``: it is owned
    by a user other than this process's (root is trusted), or writable by every user
    without the sticky bit. None when neither (or it cannot be asked)."""
    try:
        st = os.stat(folder)
    except OSError:
        return None
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in (os.geteuid(), 0):
        return (
            f"is owned by uid {st.st_uid}, not this process's (uid {os.geteuid()}): that user"
            " can replace or remove the store's files; give the folder to the daemon's user"
        )
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        return (
            f"is writable by every user (mode {mode:04o}, no sticky bit): anyone can replace"
            " or remove the store's files; chmod o-w it"
        )
    return None


def identity(path: Path | str) -> tuple[int, int]:
    """The (device, inode) ``path`` names now (raises OSError)."""
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def _size(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.1f} MiB"
    return f"{n // 1024} KiB"


__all__ = [
    "ROOM_BYTES",
    "ROOM_SHARE",
    "DiskSpace",
    "disk_space",
    "exposed_folder",
    "full_disk",
    "identity",
    "room_needed",
    "short_of_room",
    "unwritable_part",
]
