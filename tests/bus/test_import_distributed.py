"""``tradecanvas import`` into the store of a distributed topology (DESIGN §10): the import
writes only to the store; the ingest node holding the lease reads it from the event log and
publishes it on the events stream, and an edge's subscriber gets the ``factor.rebuild``
(reason ``import``, the exact range) once. Real processes on real Redis and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Final

import httpx
import pytest
import trio

from tests.bus.cluster import cluster
from tests.bus.roles_rig import BASE, FIVE, OBJ, TOKEN, WAIT_S, source
from tests.cli_rig import exit_code_within, run_cli
from tests.recording_subscriber import Subscriber
from tests.tools.importer.rig import real_zips
from tradecanvas.bus.ids import StreamKeys

DAY0: Final = 1577836800  # 2020-01-01T00:00Z, the first minute of the shared zips
LAST: Final = DAY0 + 3 * 86_400 - 60


@pytest.mark.e2e
async def test_an_import_reaches_an_edges_subscriber_once(
    tmp_path: Path, redis_url: str, keys: StreamKeys, pg_url: str
) -> None:
    async with cluster(
        tmp_path,
        source(tmp_path),
        redis_url=redis_url,
        prefix=keys.prefix,
        database_url=pg_url,
        TRADE_CANVAS_INGEST_TOKEN=TOKEN,
    ) as topology:
        subscriber = Subscriber()
        async with trio.open_nursery() as nursery:
            await nursery.start(
                subscriber.run,
                topology.edges[0].ws,
                [{"type": "subscribe", "series_id": sid} for sid in (BASE, FIVE)],
            )
            log = tmp_path / "import.log"
            args = ["import", "--series", BASE, *map(str, real_zips())]
            with run_cli(args, topology.env, log) as importer:
                assert await exit_code_within(importer, within=120) == 0, log.read_text()

            def system(reason: str | None) -> list[OBJ]:
                return [
                    m
                    for m in subscriber.messages
                    if m["type"] == "system" and reason in (None, m["data"]["reason"])
                ]

            assert await subscriber.wait_until(lambda: len(system("import")) == 2, WAIT_S)
            # then an event of the topology's own: the edge's HTTP write revises a minute
            async with httpx.AsyncClient(base_url=topology.edges[0].http) as client:
                candle = {"candle_time": DAY0, "open": 1, "high": 1, "low": 1, "close": 1}
                answer = await client.post(
                    "/api/market/ingest/candle_closed",
                    json={"series_id": BASE, "candle": {**candle, "volume": 1}},
                    headers={"Authorization": f"Bearer {TOKEN}"},
                )
                assert answer.status_code == 200, answer.text
            assert await subscriber.wait_until(lambda: len(system("revision")) == 2, WAIT_S)
            nursery.cancel_scope.cancel()
    # each once (an import event doubled would have come before the revisions)
    reasons = [m["data"]["reason"] for m in system(None)]
    assert sorted(reasons[:2]) == ["import", "import"] and reasons[2:] == ["revision"] * 2
    got = {m["series_id"]: m for m in system("import")}
    assert set(got) == {BASE, FIVE}
    assert (got[BASE]["data"]["from_time"], got[BASE]["data"]["to_time"]) == (DAY0, LAST)
    assert (got[FIVE]["data"]["from_time"], got[FIVE]["data"]["to_time"]) == (DAY0, LAST - 240)
    assert "from another process published" in topology.ingest.log.read_text()
