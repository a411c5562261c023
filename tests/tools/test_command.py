"""``FlagCommand``: a command's ``run(args, flags, out, err)`` called with the process's
streams, or with the ones a caller gives."""

from __future__ import annotations

import argparse
import io
from typing import TextIO

import pytest

from tradecanvas.runtime_flags import RuntimeFlags, build_runtime_flags
from tradecanvas.tools.command import FlagCommand


@FlagCommand
def echo(args: argparse.Namespace, flags: RuntimeFlags, out: TextIO, err: TextIO) -> int:
    """Writes its word to ``out`` and the store path to ``err``."""
    out.write(f"{args.word}\n")
    err.write(f"{flags.db_path}\n")
    return 7


def test_the_streams_are_the_process_own_unless_given(capsys: pytest.CaptureFixture[str]) -> None:
    flags = build_runtime_flags({"TRADE_CANVAS_DB_PATH": "x.sqlite3"}).flags
    args = argparse.Namespace(word="hello")
    assert echo(args, flags) == 7
    assert capsys.readouterr() == ("hello\n", "x.sqlite3\n")
    out, err = io.StringIO(), io.StringIO()
    assert echo(args, flags, out=out, err=err) == 7
    assert (out.getvalue(), err.getvalue()) == ("hello\n", "x.sqlite3\n")
    assert capsys.readouterr() == ("", "")
    assert echo.__doc__ == "Writes its word to ``out`` and the store path to ``err``."
