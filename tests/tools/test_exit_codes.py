"""Every command names its exit codes, all ExitCode members, the same in ``--help`` and in
its module docstring."""

from __future__ import annotations

import argparse
import re
from types import ModuleType

import pytest

from tradecanvas import cli
from tradecanvas.errors import ExitCode
from tradecanvas.tools import archive_fetch, backfill, migrate_store, replay, subscribe
from tradecanvas.tools.exit_codes import ExitCodeTable, exit_codes_epilog

TOOLS: dict[str, tuple[ModuleType, ExitCodeTable]] = {
    "replay": (replay, replay.EXIT_CODES),
    "backfill": (backfill, backfill.EXIT_CODES),
    "subscribe": (subscribe, subscribe.EXIT_CODES),
    "migrate-store": (migrate_store, migrate_store.EXIT_CODES),
    "fetch-archive": (archive_fetch, archive_fetch.EXIT_CODES),
}
COMMANDS: dict[str, ExitCodeTable] = {
    "serve": cli.SERVE_EXIT_CODES,
    "flags": cli.FLAGS_EXIT_CODES,
    **{name: table for name, (_, table) in TOOLS.items()},
}


def test_the_epilog_is_one_line_per_code() -> None:
    table = ((ExitCode.OK, "done"), (ExitCode.INTERRUPTED, "Ctrl-C"))
    assert exit_codes_epilog(table) == "exit codes:\n  0    done\n  130  Ctrl-C"


def _help(command: str) -> str:
    parser = cli.build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return str(action.choices[command].format_help())


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_ends_with_the_command_exit_codes(command: str) -> None:
    table = COMMANDS[command]
    assert all(isinstance(code, ExitCode) for code, _ in table)
    assert [int(code) for code, _ in table] == sorted(int(code) for code, _ in table)
    epilog = exit_codes_epilog(table)
    assert _help(command).rstrip().endswith(epilog)
    assert max(len(line) for line in epilog.splitlines()) < 80  # not reflowed: keep it short


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_the_docstring_names_the_same_codes(tool: str) -> None:
    module, table = TOOLS[tool]
    assert module.__doc__ is not None
    paragraph = module.__doc__.split("Exit codes")[1].split("\n\n")[0]
    named = {int(n) for n in re.findall(r"\b\d+\b", paragraph)} & {int(c) for c in ExitCode}
    assert named == {int(code) for code, _ in table}
