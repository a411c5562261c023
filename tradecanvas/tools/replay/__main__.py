"""``python -m tradecanvas.tools.replay``: the replay without the ``tradecanvas`` CLI."""

from __future__ import annotations

import sys

from tradecanvas.tools.replay.cli import main

sys.exit(main())
