"""``tradecanvas export --out`` against another local user (security review): a symbolic
link another user could have put there is not written through (run as root, a link to
any file replaced that file), and the new file is made beside the target under a name
nobody can take first, without a set-id bit. Real files, the command run in this process;
"another user" is a link chowned away when the tests run as root, else this process
playing another uid (its effective uid seen as one more)."""

from __future__ import annotations

import argparse
import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.conftest import flat_minutes
from tests.store.test_writer_lock_files import VICTIM, another_users
from tradecanvas.errors import ExitCode
from tradecanvas.runtime_flags import build_runtime_flags
from tradecanvas.store.sqlite import CandleStore
from tradecanvas.tools.export import cli

S = "binance:spot:BTC/USDT:1m"
T0 = 1_577_836_800  # 2020-01-01


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "m.sqlite3"

    async def fill() -> None:
        store = await CandleStore.open(path)
        try:
            await store.upsert(S, list(flat_minutes(T0, 5)), "rest")
        finally:
            await store.aclose()

    trio.run(fill)
    return path


def export(db: Path, out: Path) -> tuple[int, str]:
    """``tradecanvas export S --from … --to … --out OUT``: its exit code and stderr."""
    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    args = parser.parse_args([S, "--from", str(T0), "--to", str(T0 + 600), "--out", str(out)])
    flags = build_runtime_flags({"TRADE_CANVAS_DB_PATH": str(db)}).flags
    err = io.StringIO()
    code = cli.run_export(args, flags, out=io.StringIO(), err=err)
    return code, err.getvalue()


def _linked(folder: Path, victim: Path) -> Path:
    folder.mkdir(exist_ok=True)
    link = folder / "out.csv"
    link.symlink_to(victim)
    return link


def _secret(tmp_path: Path) -> Path:
    """``private/secret.txt``, a file in a folder only its owner may enter."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    secret = private / "secret.txt"
    secret.write_text(VICTIM)
    return secret


def test_a_link_in_a_folder_every_user_may_write_is_not_written_through(
    db: Path, tmp_path: Path
) -> None:
    """As in the system's temporary folder: another user may have made the link (sticky),
    or swap it (not sticky)."""
    victim = tmp_path / "victim"
    victim.write_text(VICTIM)
    for mode in (0o1777, 0o777):
        shared = tmp_path / f"shared-{mode:o}"
        link = _linked(shared, victim)
        shared.chmod(mode)
        code, said = export(db, link)
        assert code == ExitCode.STORE_FAILURE
        assert said == (
            f"tradecanvas export: --out {link}: not written through the symbolic link {link},"
            f" in {shared}, a folder every user may write: give the file's own path\n"
        )
        assert victim.read_text() == VICTIM and link.is_symlink()
        assert os.listdir(shared) == ["out.csv"]  # no partial file left either


def test_another_users_link_is_not_written_through(
    db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    victim = tmp_path / "victim"
    victim.write_text(VICTIM)
    link = _linked(tmp_path / "theirs", victim)
    owner = another_users(link, monkeypatch)
    code, said = export(db, link)
    assert code == ExitCode.STORE_FAILURE
    assert said.startswith(
        f"tradecanvas export: --out {link}: not written through the symbolic link {link},"
        f" owned by uid {owner}, not this process's (uid "
    )
    assert victim.read_text() == VICTIM


def test_a_chain_of_links_is_checked_link_by_link(db: Path, tmp_path: Path) -> None:
    """Own link → a link in a shared folder → the victim: the second one is refused."""
    victim = tmp_path / "victim"
    victim.write_text(VICTIM)
    shared = tmp_path / "shared"
    planted = _linked(shared, victim)
    shared.chmod(0o1777)
    mine = tmp_path / "mine.csv"
    mine.symlink_to(planted)
    code, said = export(db, mine)
    assert code == ExitCode.STORE_FAILURE
    assert f"not written through the symbolic link {planted}, in {shared}" in said
    assert victim.read_text() == VICTIM


def test_own_link_is_written_through_and_the_file_keeps_its_mode_without_set_id_bits(
    db: Path, tmp_path: Path
) -> None:
    target = tmp_path / "data" / "btc.csv"
    target.parent.mkdir()
    target.write_text("old\n")
    target.chmod(0o2640)
    link = tmp_path / "btc.csv"
    link.symlink_to(target)
    code, said = export(db, link)
    assert (code, said) == (ExitCode.OK, f"tradecanvas export: 5 candles of {S}\n")
    assert link.is_symlink() and target.read_text().count("\n") == 5
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(os.listdir(target.parent)) == ["btc.csv"]


def test_the_partial_file_is_never_anothers(db: Path, tmp_path: Path) -> None:
    """The partial file's name was ``.NAME.PID.partial``: one made there first (a link to
    a victim) failed the export. Now it has a part nobody can guess."""
    victim, out = tmp_path / "victim", tmp_path / "out.csv"
    victim.write_text(VICTIM)
    (tmp_path / f".out.csv.{os.getpid()}.partial").symlink_to(victim)
    code, said = export(db, out)
    assert (code, said) == (ExitCode.OK, f"tradecanvas export: 5 candles of {S}\n")
    assert out.read_text().count("\n") == 5 and victim.read_text() == VICTIM


def test_another_users_folder_link_on_the_way_is_not_written_through(
    db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the last name was checked: ``--out EVIL/secret.txt`` with ``EVIL`` another
    user's link to a private folder followed it (realpath) and replaced the file there."""
    secret = _secret(tmp_path)
    private = secret.parent
    evil = tmp_path / "evil"
    evil.symlink_to(private)
    owner = another_users(evil, monkeypatch)
    code, said = export(db, evil / "secret.txt")
    assert code == ExitCode.STORE_FAILURE
    assert said.startswith(
        f"tradecanvas export: --out {evil}/secret.txt: not written through the symbolic link"
        f" {evil}, owned by uid {owner}, not this process's (uid "
    )
    assert secret.read_text() == VICTIM and os.listdir(private) == ["secret.txt"]


def test_a_folder_link_in_a_folder_every_user_may_write_is_not_written_through(
    db: Path, tmp_path: Path
) -> None:
    """``/tmp/evil/secret.txt``: a link to a folder in the sticky shared folder, reached
    through an own link and a ``..`` after it (walked as the kernel walks it)."""
    secret = _secret(tmp_path)
    private = secret.parent
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "evil").symlink_to(private)
    (shared / "sub").mkdir()
    shared.chmod(0o1777)
    mine = tmp_path / "mine"
    mine.symlink_to(shared / "sub")
    code, said = export(db, mine / ".." / "evil" / "secret.txt")
    assert code == ExitCode.STORE_FAILURE
    assert (
        f"not written through the symbolic link {shared}/evil, in {shared}, a folder every"
        " user may write" in said
    )
    assert secret.read_text() == VICTIM and os.listdir(private) == ["secret.txt"]


def test_own_folder_links_on_the_way_are_followed(db: Path, tmp_path: Path) -> None:
    """Own links in own folders, relative and absolute, with ``..`` after one: the file
    the kernel's walk reaches is the one replaced, beside it the partial file."""
    data = tmp_path / "a" / "data"
    data.mkdir(parents=True)
    (tmp_path / "a" / "out.csv").write_text("old\n")
    (tmp_path / "to-data").symlink_to("a/data")  # relative
    (tmp_path / "abs").symlink_to(tmp_path / "to-data")  # absolute, to a link
    code, said = export(db, tmp_path / "abs" / ".." / "out.csv")
    assert (code, said) == (ExitCode.OK, f"tradecanvas export: 5 candles of {S}\n")
    assert (tmp_path / "a" / "out.csv").read_text().count("\n") == 5
    assert sorted(os.listdir(tmp_path / "a")) == ["data", "out.csv"]
    assert not (tmp_path / "out.csv").exists()


def test_a_folder_swapped_for_a_link_after_the_walk_changes_nothing(
    db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk checked every link by its path, then the file was made by its path: a
    folder on the way swapped for a link in between (by a user who may rename it) led
    the new file wherever the link pointed. Now the walk holds the folder open and the
    file is made in it: it lands in the folder that was checked."""
    secret = _secret(tmp_path)
    private = secret.parent
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    real_open = os.open
    swapped: list[bool] = []

    def swap_then_open(file: object, flags: int, *args: object, **kwargs: object) -> int:
        if flags & os.O_EXCL and not swapped:  # the new file, after the walk
            theirs.rename(tmp_path / "moved")
            theirs.symlink_to(private)
            swapped.append(True)
        return real_open(file, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", swap_then_open)
    code, said = export(db, theirs / "secret.txt")
    monkeypatch.undo()
    assert swapped and (code, said) == (ExitCode.OK, f"tradecanvas export: 5 candles of {S}\n")
    assert secret.read_text() == VICTIM and os.listdir(private) == ["secret.txt"]
    assert (tmp_path / "moved" / "secret.txt").read_text().count("\n") == 5


def test_a_missing_folder_on_the_way_is_named_whole(db: Path, tmp_path: Path) -> None:
    code, said = export(db, tmp_path / "nowhere" / "out.csv")
    assert code == ExitCode.STORE_FAILURE
    assert said == (
        f"tradecanvas export: [Errno 2] No such file or directory: '{tmp_path}/nowhere'\n"
    )
    assert os.listdir(tmp_path) == ["m.sqlite3"]


def test_a_folder_the_user_may_pass_through_but_not_list_is_written_into(
    db: Path, tmp_path: Path
) -> None:
    """Mode 0311 on the way (search and write, no read): the kernel's own walk lets this
    user write there, and so does ``--out`` (the walk opened each folder to read it, and
    was refused). The real command in a subprocess; as root, without the capabilities that
    pass over permission bits."""
    passage = tmp_path / "passage"
    passage.mkdir()
    out = passage / "out.csv"
    command = [sys.executable, "-m", "tradecanvas", "export", S, "--from", str(T0)]
    command += ["--to", str(T0 + 600), "--db-path", str(db), "--out", str(out)]
    if os.geteuid() == 0:
        command = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *command]
    passage.chmod(0o311)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    finally:
        passage.chmod(0o755)
    assert (done.returncode, done.stderr) == (
        ExitCode.OK,
        f"tradecanvas export: 5 candles of {S}\n",
    )
    assert out.read_text().count("\n") == 5
