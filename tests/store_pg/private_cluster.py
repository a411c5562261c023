"""A PostgreSQL cluster of a test's own (``initdb`` in a temporary folder, a free port), which
the test may crash and restart (``pg_ctl stop -m immediate``): the shared server is never
stopped. As root, the cluster runs as the ``postgres`` user (the server refuses root).
Missing binaries skip the test, or fail it with ``CI=true`` (the rule for the shared one)."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Final, final

import pytest

# the WAL writer waits 10 s between rounds and no autovacuum runs: what a transaction that
# has not committed wrote stays in the server's memory, so a crash loses it and its id
_SETTINGS: Final = (
    "-c listen_addresses=127.0.0.1 -c wal_writer_delay=10000 -c autovacuum=off"
    " -c shared_buffers=16MB -c max_connections=30"
)


def _bindir() -> Path | None:
    found = shutil.which("initdb")
    if found is not None:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(candidates[-1]).parent if candidates else None


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@final
class PrivateCluster:
    def __init__(self, bindir: Path, folder: Path, as_user: list[str]) -> None:
        self._bindir = bindir
        self._folder = folder
        self._data = folder / "data"
        self._as_user = as_user
        self.port = _free_port()

    def _run(self, tool: str, *args: str) -> None:
        command = [*self._as_user, str(self._bindir / tool), *args]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self._folder} {_SETTINGS}"
        log = str(self._folder / "server.log")
        self._run("pg_ctl", "-D", str(self._data), "-o", options, "-l", log, "-w", "start")

    def crash(self) -> None:
        """Stop the server at once, as a crash: no checkpoint, nothing flushed."""
        self._run("pg_ctl", "-D", str(self._data), "-m", "immediate", "-w", "stop")


@contextlib.contextmanager
def private_cluster() -> Iterator[PrivateCluster]:
    bindir = _bindir()
    reason = None
    if bindir is None or not (bindir / "pg_ctl").exists():
        reason = "no PostgreSQL server binaries (initdb, pg_ctl) for a private cluster"
    elif os.geteuid() == 0 and (shutil.which("runuser") is None or not _has_user("postgres")):
        reason = "as root, a private cluster needs runuser and a postgres user"
    if reason is not None or bindir is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: a missing service is a failure)")
        pytest.skip(str(reason))
    folder = Path(tempfile.mkdtemp(prefix="tc-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    cluster = PrivateCluster(bindir, folder, as_user)
    try:
        cluster._run("initdb", "-D", str(folder / "data"), "-A", "trust", "-U", "postgres")
        cluster.start()
        try:
            yield cluster
        finally:
            with contextlib.suppress(subprocess.SubprocessError):
                cluster.crash()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
