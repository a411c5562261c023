"""HeldCork: a sink's cork (``MarketSink.corked``) held across the synchronous stretches of
an edge's delivery of one read, and let go before each await (a hole filled from the store).

Corked, the Hub writes what each subscriber gets of a whole read in one write at the end
(one system call and one wake-up of the client per subscriber, not one per series), as the
single process's committer does for a committed batch. A cork is never held across an
await: other tasks (the forming channel's reader, a catch-up) would publish into it, and the
frames before a hole would wait for the store read that fills it.
"""

from __future__ import annotations

import contextlib
from typing import final

from tradecanvas.pipeline.publish import MarketSink


@final
class HeldCork:
    """Use as a context manager around a delivery; :meth:`hold` before publishing,
    :meth:`release` before awaiting. Leaving the block releases it (writes what it held)."""

    def __init__(self, sink: MarketSink) -> None:
        self._sink = sink
        self._held: contextlib.AbstractContextManager[None] | None = None

    def hold(self) -> None:
        if self._held is None:
            held = self._sink.corked()
            held.__enter__()
            self._held = held

    def release(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.__exit__(None, None, None)

    def __enter__(self) -> HeldCork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
