"""The entry point of each command that reads the flags beside ``serve`` (``backfill``,
``import``, ``export``): written as ``run(args, flags, out, err)``, called as
``run(args, flags)`` by the CLI, with ``out=``/``err=`` where a caller wants other streams."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from typing import TextIO, final

from tradecanvas.runtime_flags import RuntimeFlags

Run = Callable[[argparse.Namespace, RuntimeFlags, TextIO, TextIO], int]


@final
class FlagCommand:
    """``@FlagCommand`` on a command's ``run(args, flags, out, err) -> exit code``: ``out``
    and ``err`` become keyword arguments, the process's stdout and stderr unless given."""

    def __init__(self, run: Run) -> None:
        self._run = run
        functools.update_wrapper(self, run)

    def __call__(
        self,
        args: argparse.Namespace,
        flags: RuntimeFlags,
        *,
        out: TextIO | None = None,
        err: TextIO | None = None,
    ) -> int:
        return self._run(args, flags, out or sys.stdout, err or sys.stderr)


__all__ = ["FlagCommand"]
