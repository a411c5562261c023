"""XADD throughput: one awaited XADD per candle vs the BusPublisher's batches (one EVAL each).

Not a test (nothing asserts a speed): ``.venv/bin/python -m tests.bus.xadd_throughput``
against the Redis at 127.0.0.1:6379 (or ``--url``); it prints candles per second for both,
over the same candles (``--series`` streams of ``--candles`` bars each), under a prefix of
its own that it deletes afterwards.
"""

from __future__ import annotations

import argparse
import sys
import time

import trio
from coredis import PureToken

from tests.bus.conftest import delete_prefix, new_prefix
from tests.bus.rig import T0, minutes
from tradecanvas.bus.ids import StreamKeys, candle_entry_id
from tradecanvas.bus.publisher import DEFAULT_MAXLEN, BusPublisher, PublisherSettings
from tradecanvas.bus.redis_io import open_redis
from tradecanvas.wire.bus import CANDLE_FIELD, encode_candle


async def measure(url: str, series: int, count: int) -> tuple[float, float]:
    ids = [f"binance:futures:S{i}/USDT:1m" for i in range(series)]
    bars = minutes(T0, count)
    total = series * count
    # one awaited XADD per candle, as a naive publisher does
    keys = StreamKeys(new_prefix("tcbench"))
    async with open_redis(url) as client:
        start = time.perf_counter()
        for bar in bars:
            for sid in ids:
                await client.xadd(
                    keys.series(sid),
                    {CANDLE_FIELD: encode_candle(bar)},
                    identifier=str(candle_entry_id(bar.candle_time)),
                    trim_strategy=PureToken.MAXLEN,
                    trim_operator=PureToken.APPROXIMATELY,
                    threshold=DEFAULT_MAXLEN,
                )
        single = total / (time.perf_counter() - start)
    await delete_prefix(url, keys.prefix)
    # the publisher: each minute's closes of every series handed over at once, as a commit does
    keys = StreamKeys(new_prefix("tcbench"))
    publisher = BusPublisher(url, PublisherSettings(keys=keys))
    async with trio.open_nursery() as nursery:
        await nursery.start(publisher.run)
        await publisher.wait_connected()
        start = time.perf_counter()
        for bar in bars:
            for sid in ids:
                publisher.publish_closed(sid, (bar,))
            await trio.lowlevel.checkpoint()  # the ingest yields between commits
        await publisher.wait_drained()
        batched = total / (time.perf_counter() - start)
        nursery.cancel_scope.cancel()
    assert publisher.statistics().outbox.appended == total
    await delete_prefix(url, keys.prefix)
    return single, batched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--series", type=int, default=100)
    parser.add_argument("--candles", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    for run in range(args.runs):
        single, batched = trio.run(measure, args.url, args.series, args.candles)
        sys.stdout.write(
            f"run {run + 1}: {args.series * args.candles} candles: single awaited XADD"
            f" {single:,.0f}/s, BusPublisher {batched:,.0f}/s"
            f" ({batched / single:.1f}x)\n"
        )


if __name__ == "__main__":
    main()
