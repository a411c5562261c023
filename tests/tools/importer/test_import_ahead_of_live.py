"""``tradecanvas import`` storing minutes the running daemon's live stream has not reached
yet (a daemon catching up while the operator imports the same days): when the stream gets
there, its closes are already stored, unchanged, and not published again. A subscriber
must still get every one of them, once and in order, and no forming candle before the
closes under it (the Hub reads them from the store: ``forming_follows``). Real CLI
processes on real data, the package's WS client."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Final

import pytest
import trio

from tests.bus.roles_rig import BASE, FIVE, HISTORY_BARS, WAIT_S, same, source
from tests.cli_rig import cli_env, exit_code_within, run_cli, wait_for_line
from tests.recording_subscriber import OBJ, Subscriber

READY: Final = r"tradecanvas ready ws=(\S+) http=(\S+)"
IMPORTED: Final = 200  # of the 300 minutes: the stream's closes after them are new


def forming_overtakes(sub: Subscriber, series: str, step: int) -> list[int]:
    """Forming candles received while a close below their bar was still to come."""
    sent_up_to: int | None = None
    wrong: list[int] = []
    for m in sub.messages:
        if m.get("series_id") != series:
            continue
        if m["type"] == "candles_batch":
            sent_up_to = m["candles"][-1]["candle_time"]
        elif m["type"] == "candle_closed":
            sent_up_to = m["candle"]["candle_time"]
        elif m["type"] == "candle_forming":
            t = m["candle"]["candle_time"]
            if sent_up_to is None or t - step > sent_up_to:
                wrong.append(t)
    return wrong


@pytest.mark.e2e
async def test_closes_an_import_stored_ahead_of_the_stream_reach_subscribers(
    tmp_path: Path,
) -> None:
    data = source(tmp_path)
    db = tmp_path / "market.sqlite3"
    with run_cli(
        ["replay", str(data.csv), "--port", "0", "--speed", "3000", "--forming-per-bar", "2",
         "--paused", "--start-at", str(HISTORY_BARS)],
        cli_env(),
        tmp_path / "replay.log",
    ) as replay:  # fmt: skip
        found = await wait_for_line(tmp_path / "replay.log", r"replay ws=(\S+) rest=(\S+)", replay)
        env = cli_env(
            TRADE_CANVAS_DB_PATH=str(db),
            TRADE_CANVAS_BINANCE_FUTURES_WS_URL=found.group(1),
            TRADE_CANVAS_BINANCE_FUTURES_REST_URL=found.group(2),
            TRADE_CANVAS_INITIAL_BACKFILL_CANDLES=str(HISTORY_BARS),
            TRADE_CANVAS_DERIVED_TIMEFRAMES="5m",
        )
        with run_cli(["serve"], env, tmp_path / "serve.log") as serve:
            ws = (await wait_for_line(tmp_path / "serve.log", READY, serve)).group(1)
            sub = Subscriber()
            both: list[OBJ] = [
                {"type": "subscribe", "series_id": s, "since": 0} for s in (BASE, FIVE)
            ]
            async with trio.open_nursery() as nursery:
                await nursery.start(sub.run, ws, both)
                # the first IMPORTED minutes stored beside the daemon before its stream starts
                lines = data.csv.read_text().splitlines()
                ahead = tmp_path / "ahead.csv"
                ahead.write_text("\n".join(lines[: IMPORTED + 1]) + "\n")  # the header too
                with run_cli(
                    ["import", "--series", BASE, str(ahead)], env, tmp_path / "import.log"
                ) as importer:
                    assert await exit_code_within(importer, WAIT_S) == 0
                replay.send_signal(signal.SIGUSR1)
                last, last5 = data.minutes[-1].candle_time, data.fives[-1].candle_time
                assert await sub.wait_until(
                    lambda: last in sub.times(BASE) and last5 in sub.times(FIVE), WAIT_S
                ), (sub.times(BASE)[-3:], sub.times(FIVE)[-3:])
                nursery.cancel_scope.cancel()
    assert same(sub.closed(BASE), data.minutes)
    assert same(sub.closed(FIVE), data.fives)
    assert not sub.of_type("gap") and not sub.of_type("error")
    assert sub.of_type("candle_forming"), "the stream sent forming candles"
    assert forming_overtakes(sub, BASE, 60) == []
    assert forming_overtakes(sub, FIVE, 300) == []
