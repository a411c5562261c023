"""What the daemon has built by start-up, kept out of the cyclic collector's full walks.

CPython's cyclic collector walks *every* tracked object in a full (oldest-generation)
collection, and runs one after enough younger ones, at whatever point of the event loop an
allocation triggers it. Most of a fresh daemon's objects are made at start-up and live as
long as it does: the modules of trio, Hypercorn, Starlette, coredis, psycopg and the
Prometheus client, their classes and tables, the open store, the listeners. In issue 14's
latency benchmark (5,000 closes/s) each full collection of the daemon took 54–83 ms, two or
three a round (``gc.callbacks``), and stopped the loop for that long: the closes behind
it queued, and their delivery was the round's p99.

:func:`freeze_startup_heap`, called once when the daemon is ready, collects what start-up
left as garbage and then moves every object alive to the permanent generation
(:func:`gc.freeze`): later full collections walk only what the daemon made since.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect once, then freeze every object alive (never collected, never walked again);
    the count of objects frozen in all."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


__all__ = ["freeze_startup_heap"]
