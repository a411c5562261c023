"""``tradecanvas serve``: market_runtime_builder and the daemon's nursery tree (DESIGN §4)."""

from __future__ import annotations

import logging

from tradecanvas.runtime_flags import RuntimeFlags

log = logging.getLogger(__name__)


def serve(flags: RuntimeFlags) -> int:
    """Run the daemon until SIGTERM/SIGINT. (Being wired: ingest, hub and servers.)"""
    log.error("tradecanvas serve: the daemon is not wired up in this build yet")
    return 1
