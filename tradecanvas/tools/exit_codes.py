"""How each command names its exit codes in ``--help``.

The numbers and their general meaning are :class:`~tradecanvas.errors.ExitCode`'s; each
command keeps a table of the codes it uses and what each means for it (``EXIT_CODES`` in
its module), and :func:`exit_codes_epilog` prints that table as the ``--help`` epilog.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Final

from tradecanvas.errors import ExitCode

ExitCodeTable = Sequence[tuple[ExitCode, str]]

# the epilog is a table: argparse must not reflow it
HELP_FORMATTER: Final = argparse.RawDescriptionHelpFormatter


def exit_codes_epilog(table: ExitCodeTable) -> str:
    """``exit codes:`` and one ``  N  meaning`` line per code, in the table's order."""
    return "\n".join(["exit codes:", *(f"  {int(code):<3}  {meaning}" for code, meaning in table)])
