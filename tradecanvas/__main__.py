"""``python -m tradecanvas`` is the ``tradecanvas`` command."""

from __future__ import annotations

from tradecanvas.cli import main

raise SystemExit(main())
