"""The acceptance replay behind scripts/e2e_acceptance.sh (see there).

Per kill-switch value (0 = legacy publish, 1 = pipeline publish):

1. ``tradecanvas replay`` serves the real USDⓈ-M BTCUSDT 1m week: the first UTC day as REST
   history (the daemon's initial backfill), the other six days on the WebSocket at full speed,
   with a dropped connection and skipped bars, omitted closes and duplicated closes.
2. ``tradecanvas serve`` ingests it; real subscribers (trio-websocket clients) watch: a batch
   subscriber from the start, a per-candle 5m subscriber connected through the HTTP port's
   /ws/market (one origin), a mid-way joiner with ``since``, a subscriber that never reads, a
   client sending garbage, and one that follows the event log and leaves half-way.
3. The HTTP write path, /metrics, SIGTERM, and a restart on the same database are checked;
   after the restart, the one that left resumes with ``events_after`` and gets exactly the
   events it missed.

Each check prints one line; the run ends with ``N passed, M failed``. ``--topology
distributed`` runs scripts/e2e_distributed.py instead (1 ingest + 2 edges + Redis +
PostgreSQL).
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import tempfile
from pathlib import Path

import e2e_distributed
import httpx
import orjson
import trio
from e2e_common import (
    BASE,
    FIVE,
    OBJ,
    PROGRAM,
    READY,
    TOKEN,
    WAIT_ALL_S,
    FlagRun,
    Report,
    equal_candle,
    five_floor,
    metric,
    run_each_flag,
    same_schemas,
    schema,
    schema_report,
    sqlite_counts,
    stop,
    terminated_on_signals,
)

from tests.cli_rig import Children, wait_for_line
from tests.recording_subscriber import Subscriber
from tradecanvas.upstream.ws_client import open_websocket_client

# how long the events_after check waits for the subscriber and the event log to agree
SETTLE_S = 10.0


async def idle_subscriber(
    url: str, subscribe: OBJ, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """A subscriber that sends ``subscribe`` and then never reads anything, until cancelled
    (its socket is then just closed)."""
    async with open_websocket_client(url, message_queue_size=0) as ws:
        await ws.send_message(orjson.dumps(subscribe).decode())
        task_status.started()
        await trio.sleep_forever()


def _more_events(sub: Subscriber, than: int) -> bool:
    return len(sub.event_ids(BASE)) > than


class Run(FlagRun):
    def __init__(self, report: Report, procs: Children, work: Path, flag: str) -> None:
        super().__init__(report, procs, work, flag)
        self.db = work / f"market-{flag}.sqlite3"
        self.schemas: dict[str, tuple[str, ...]] = {}

    def serve_env(self, *, token: bool, rest: str, ws: str) -> dict[str, str]:
        env = self.env(ws=ws, rest=rest)
        env.update(
            TRADE_CANVAS_DB_PATH=str(self.db),
            TRADE_CANVAS_SUBSCRIBER_SEND_TIMEOUT_S="2",
        )
        if token:
            env["TRADE_CANVAS_INGEST_TOKEN"] = TOKEN
        return env

    async def start_serve(
        self, env: dict[str, str], log: Path
    ) -> tuple[subprocess.Popen[bytes], str, str]:
        proc = self.procs.start(["serve"], log, env)
        match = await wait_for_line(log, READY, proc)
        return proc, match.group(1), match.group(2)

    async def main(self) -> None:
        replay = await self.start_replay()
        serve_log = self.work / f"serve-{self.flag}.log"
        env = self.serve_env(token=True, rest=replay.rest, ws=replay.ws)
        serve, ws_url, http_url = await self.start_serve(env, serve_log)
        self.check("serve starts against the replay and reports ready", True, ws_url)
        # one origin: /ws/market answers on the HTTP port as well
        http_ws_url = http_url.replace("http://", "ws://", 1) + "/ws/market"

        first, last = self.minutes[0].candle_time, self.minutes[-1].candle_time
        # the server's close is one of the checks (1001 on SIGTERM), not an error
        batch_sub, five_sub, midway, garbage, leaver = (
            Subscriber(name, expect_loss=True)
            for name in ("batch", "five", "midway", "garbage", "leaver")
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(
                batch_sub.run,
                ws_url,
                [{"type": "subscribe", "series_id": BASE, "since": first - 60,
                  "supports_batch": True}],
            )  # fmt: skip
            await nursery.start(
                five_sub.run,
                http_ws_url,
                [{"type": "subscribe", "series_id": FIVE, "since": first - 300}],
            )
            # follows BASE's event log from the start (no candles: its cursor is past them)
            await nursery.start(
                leaver.run,
                http_ws_url,
                [{"type": "subscribe", "series_id": BASE, "since": last + 10**6,
                  "events_after": 0}],
            )  # fmt: skip
            # a subscriber that never reads anything
            await nursery.start(idle_subscriber, ws_url, {"type": "subscribe",
                                "series_id": BASE, "since": first - 60})  # fmt: skip
            # only now the market starts: these subscribers see every event from the first
            await replay.resume()
            # a mid-way joiner, once live candles flow, with a cursor in the past
            await batch_sub.wait_until(lambda: len(batch_sub.times(BASE)) > 5000, 120)
            cursor = first + 60 * 3000
            await nursery.start(
                midway.run,
                ws_url,
                [{"type": "subscribe", "series_id": BASE, "since": cursor,
                  "supports_batch": True}],
            )  # fmt: skip
            got_all = await batch_sub.wait_until(
                lambda: bool(batch_sub.times(BASE)) and batch_sub.times(BASE)[-1] >= last,
                WAIT_ALL_S,
            )
            await five_sub.wait_until(lambda: len(five_sub.times(FIVE)) >= len(self.fives), 30)
            await midway.wait_until(
                lambda: bool(midway.times(BASE)) and midway.times(BASE)[-1] >= last,
                30,
            )
            self.check_stream(batch_sub, five_sub, midway, got_all, cursor)
            # the leaver goes away with the events so far; what follows it must resume
            await leaver.wait_until(lambda: bool(leaver.event_ids(BASE)), 10)
            leaver.leave()
            left_at = max(leaver.event_ids(BASE), default=-1)

            await self.check_garbage(nursery, garbage, ws_url)
            await self.check_metrics_and_http(http_url, batch_sub, five_sub, last)
            self.schemas = schema(batch_sub.messages + five_sub.messages + garbage.messages)

            code, took = await stop(serve)
            await batch_sub.wait_until(lambda: batch_sub.closed_code is not None, 5)
            self.check(
                "SIGTERM: exit 0 within 10 s and subscribers closed with 1001",
                code == 0 and took < 10 and batch_sub.closed_code == 1001
                and five_sub.closed_code == 1001,
                f"exit={code} in {took:.1f}s, close={batch_sub.closed_code}/{five_sub.closed_code}",
            )  # fmt: skip
            nursery.cancel_scope.cancel()

        missed = [i for i in batch_sub.event_ids(BASE) if i > left_at]
        await self.check_restart(replay.rest, replay.ws, last, left_at, missed)

    def check_stream(
        self,
        batch_sub: Subscriber,
        five_sub: Subscriber,
        midway: Subscriber,
        got_all: bool,
        cursor: int,
    ) -> None:
        times = batch_sub.times(BASE)
        expected = [m.candle_time for m in self.minutes]
        self.check(
            "1m closed candles arrive exactly once, in order, for the whole week",
            got_all and times == expected,
            f"{len(times)} received, {len(expected)} expected, "
            f"{len(times) - len(set(times))} duplicates",
        )
        got = batch_sub.closed_candles(BASE).get
        bad = [m.candle_time for m in self.minutes if not equal_candle(got(m.candle_time), m)]
        self.check("1m candles equal the Binance data", not bad, f"{len(bad)} differ")
        fives = five_sub.times(FIVE)
        got5 = five_sub.closed_candles(FIVE)
        bad5 = [
            f.candle_time
            for f in self.fives
            if f.candle_time not in got5 or not equal_candle(got5[f.candle_time], f)
        ]
        self.check(
            "derived 5m candles equal Binance's own 5m bars, once each, in order"
            " (to a subscriber on the HTTP port's /ws/market)",
            not bad5 and fives == [f.candle_time for f in self.fives],
            f"{len(fives)} received, {len(bad5)} differ",
        )
        self.check(
            "per-candle subscriber gets candle_closed, never candles_batch",
            bool(five_sub.of_type("candle_closed")) and not five_sub.of_type("candles_batch"),
        )
        gaps = batch_sub.of_type("gap") + five_sub.of_type("gap")
        self.check("no gap: the dropped connection and omitted closes were repaired", not gaps,
                   f"{len(gaps)} gaps")  # fmt: skip
        mid = midway.times(BASE)
        want = [t for t in expected if t > cursor]
        self.check(
            "a subscriber joining mid-way with since gets a seamless stream",
            mid == want and not midway.of_type("gap"),
            f"{len(mid)} received from since={cursor}, {len(want)} expected",
        )

    async def check_garbage(self, nursery: trio.Nursery, garbage: Subscriber, ws_url: str) -> None:
        ws = await nursery.start(garbage.run, ws_url, [])
        bad = [
            "not json",
            "[1, 2]",
            '{"type": "dance"}',
            '{"type": "subscribe", "series_id": "binance:futures:BTC/USDT:1m", "since": true}',
            '{"type": "subscribe", "series_id": "binance:futures:DOGE/USDT:1m"}',
            '{"type": "subscribe", "series_id": "nonsense"}',
        ]
        for text in bad:
            await ws.send_message(text)
        await ws.send_message('{"type": "ping"}')
        ok = await garbage.wait_until(lambda: bool(garbage.of_type("pong")), 10)
        errors = garbage.of_type("error")
        codes = [e.get("code") for e in errors]
        self.check(
            "garbage messages get error replies and the connection stays up",
            ok and len(errors) == len(bad) and garbage.closed_code is None
            and codes.count("unknown_series") == 1,
            ", ".join(str(c) for c in codes),
        )  # fmt: skip

    async def check_metrics_and_http(
        self, http_url: str, sub: Subscriber, five_sub: Subscriber, last: int
    ) -> None:
        async with httpx.AsyncClient(base_url=http_url, timeout=10) as client:
            text = (await client.get("/metrics")).text
            legacy = metric(text, "tradecanvas_publish_total", '{path="legacy"}')
            pipeline = metric(text, "tradecanvas_publish_total", '{path="pipeline"}')
            counts = f"legacy={legacy} pipeline={pipeline}"
            if self.flag == "0":
                self.check(
                    "kill-switch 0: the legacy path publishes, the pipeline path never",
                    legacy > 0 and pipeline == 0,
                    counts,
                )
            else:
                self.check(
                    "kill-switch 1: the pipeline path publishes, the legacy path never",
                    pipeline > 0 and legacy == 0,
                    counts,
                )
            t = last + 60
            body = {"series_id": BASE, "candle": {"candle_time": t, "open": "100",
                    "high": "101", "low": "99", "close": "100.5", "volume": "2"}}  # fmt: skip
            refused = await client.post("/api/market/ingest/candle_closed", json=body)
            wrong = await client.post(
                "/api/market/ingest/candle_closed", json=body,
                headers={"Authorization": "Bearer not-the-token-at-all"},
            )  # fmt: skip
            ok = await client.post(
                "/api/market/ingest/candle_closed", json=body,
                headers={"Authorization": f"Bearer {TOKEN}"},
            )  # fmt: skip
            arrived = await sub.wait_until(lambda: t in sub.times(BASE), 10)
            text = (await client.get("/metrics")).text
            http_count = metric(text, "tradecanvas_publish_total", '{path="http"}')
            self.check(
                "HTTP write with the token publishes strictly and reaches subscribers",
                ok.status_code == 200 and arrived and http_count == 1,
                f"status={ok.status_code} arrived={arrived} publish_total(http)={http_count}",
            )
            self.check(
                "HTTP write without a valid token is refused",
                refused.status_code == 401 and wrong.status_code == 401,
                f"{refused.status_code}/{wrong.status_code}",
            )
            # a corrected bar (a revision) must reach subscribers as factor.rebuild events
            # for the base series and the 5m bar above it
            ref = self.minutes[-1]
            body = {"series_id": BASE, "candle": {"candle_time": ref.candle_time,
                    "open": str(ref.open), "high": str(ref.high + 1), "low": str(ref.low),
                    "close": str(ref.close), "volume": str(ref.volume)}}  # fmt: skip
            revised = await client.post(
                "/api/market/ingest/candle_closed", json=body,
                headers={"Authorization": f"Bearer {TOKEN}"},
            )  # fmt: skip

            def reasons() -> set[tuple[str, str]]:
                return {
                    (m["series_id"], m["data"]["reason"])
                    for m in sub.of_type("system") + five_sub.of_type("system")
                    if m.get("event") == "factor.rebuild"
                }

            await sub.wait_until(lambda: (BASE, "revision") in reasons(), 10)
            await five_sub.wait_until(
                lambda: any(m["data"]["reason"] == "revision" for m in five_sub.of_type("system")),
                10,
            )
            five_events = [
                m for m in five_sub.of_type("system") if m["data"]["reason"] == "revision"
            ]
            self.check(
                "factor.rebuild system events arrive (new_series on start, revision on a"
                " corrected bar, for 1m and 5m)",
                revised.status_code == 200
                and {(BASE, "new_series"), (BASE, "revision"), (FIVE, "new_series")} <= reasons()
                and bool(five_events)
                and five_events[0]["data"]["from_time"] == five_floor(ref.candle_time),
                ", ".join(sorted(f"{s.split(':')[-1]}:{r}" for s, r in reasons())),
            )

    async def check_restart(
        self, rest: str, ws: str, last: int, left_at: int, missed: list[int]
    ) -> None:
        log = self.work / f"serve-{self.flag}-restart.log"
        serve, ws_url, http_url = await self.start_serve(
            self.serve_env(token=False, rest=rest, ws=ws), log
        )
        since = last - 600
        resumed = Subscriber("resumed", expect_loss=True)
        async with trio.open_nursery() as nursery:
            await self.check_events_resume(nursery, (ws_url, http_url), last, left_at, missed)
            await nursery.start(
                resumed.run,
                ws_url,
                [{"type": "subscribe", "series_id": BASE, "since": since, "supports_batch": True}],
            )
            want = [t for t in range(since + 60, last + 61, 60)] + [last + 60]
            want = sorted(set(want))
            await resumed.wait_until(lambda: len(resumed.times(BASE)) >= len(want), 20)
            got = resumed.times(BASE)
            self.check(
                "after a restart on the same database a resuming subscriber gets exactly"
                " the candles after its since",
                got == want,
                f"{len(got)} received, {len(want)} expected",
            )
            async with httpx.AsyncClient(base_url=http_url, timeout=10) as client:
                body = {"series_id": BASE, "candle": {"candle_time": last + 120, "open": 1,
                        "high": 1, "low": 1, "close": 1, "volume": 1}}  # fmt: skip
                answer = await client.post(
                    "/api/market/ingest/candle_closed", json=body,
                    headers={"Authorization": f"Bearer {TOKEN}"},
                )  # fmt: skip
            self.check(
                "HTTP write with no token configured is refused (403)",
                answer.status_code == 403,
                str(answer.status_code),
            )
            code, took = await stop(serve)
            self.check("second SIGTERM run exits 0", code == 0, f"exit={code} in {took:.1f}s")
            nursery.cancel_scope.cancel()
        counts = sqlite_counts(self.db)
        self.check(
            "the store holds every 1m and 5m bar exactly once",
            # +1: the HTTP-written minute after the data (its 5m bucket is still open)
            counts.get(BASE) == len(self.minutes) + 1 and counts.get(FIVE) == len(self.fives),
            f"{counts}",
        )

    async def check_events_resume(
        self,
        nursery: trio.Nursery,
        urls: tuple[str, str],
        last: int,
        left_at: int,
        missed: list[int],
    ) -> None:
        """The subscriber that left before the revision resumes from its last event_id: it
        gets the events it missed — the ones the event log holds after its cursor (those the
        batch subscriber saw live first, then any the restarted daemon logged, such as the
        replay's own last close reverting the HTTP correction) — once each, in order."""
        ws_url, http_url = urls
        back = Subscriber("back", expect_loss=True)
        await nursery.start(
            back.run,
            ws_url,
            [{"type": "subscribe", "series_id": BASE, "since": last + 10**6,
              "events_after": left_at}],
        )  # fmt: skip
        # The restarted daemon may log one more event (the replay's last close reverting the
        # HTTP correction) after any one read of the log: compare the subscriber with the log
        # until both have settled (each read is fresh; events are only ever appended).
        deadline = trio.current_time() + SETTLE_S
        async with httpx.AsyncClient(base_url=http_url, timeout=10) as client:
            while True:
                page = (
                    await client.get(
                        "/api/market/events", params={"after": left_at, "series_id": BASE}
                    )
                ).json()
                stored = [e["event_id"] for e in page["events"]]
                got = back.event_ids(BASE)
                if got == stored or trio.current_time() > deadline:
                    break
                await back.wait_until(functools.partial(_more_events, back, len(got)), 0.5)
        self.check(
            "a subscriber resuming with events_after after the restart gets exactly the events"
            " it missed",
            left_at > 0 and bool(missed) and got == stored and got[: len(missed)] == missed,
            f"after {left_at}: got {got}, missed live {missed}, stored {stored}",
        )
        back.leave()


def single() -> int:
    report = Report()
    procs = Children(PROGRAM)
    with terminated_on_signals(procs), tempfile.TemporaryDirectory(prefix="tc-e2e-") as tmp:
        runs = run_each_flag(functools.partial(Run, report, procs, Path(tmp)), procs, Path(tmp))
        schemas = {flag: run.schemas for flag, run in runs.items()}
        report.check(
            "payload schemas (candles_batch, candle_closed, system, error, pong) are identical"
            " in both modes",
            same_schemas(schemas["0"], schemas["1"]),
            schema_report(schemas["0"], schemas["1"]),
        )
    print(f"{report.passed} passed, {report.failed} failed")
    return 1 if report.failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--topology",
        choices=("single", "distributed"),
        default="single",
        help="single: one `serve` (the default); distributed: 1 ingest + 2 edges + Redis +"
        " PostgreSQL",
    )
    args = parser.parse_args(argv)
    return e2e_distributed.main() if args.topology == "distributed" else single()


if __name__ == "__main__":
    raise SystemExit(main())
