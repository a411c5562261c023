"""What the replayed exchange does, synchronously: frame order, faults, REST paging, acks."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import attrs
import orjson
from hypothesis import given
from hypothesis import strategies as st

from tests.tools.replay.conftest import DAY, STREAM, config_for, faults_config
from tradecanvas.model import Candle, SeriesId, Timeframe, validate_candle
from tradecanvas.tools.replay import (
    FaultPlan,
    ReplayConfig,
    ReplayData,
    answer_request,
    closed_bars,
    forming_steps,
    interval_bars,
    load_data,
    phase_3d,
    timeline_frames,
)
from tradecanvas.tools.replay.core import Schedule
from tradecanvas.wire.kline_csv import read_kline_csv

SID = SeriesId.parse("binance:futures:BTC/USDT:1m")


def test_forming_steps_are_valid_growing_states_of_the_bar(day_rows: list[Candle]) -> None:
    bar = day_rows[100]
    steps = forming_steps(bar, 3)
    assert [s.candle_time for s in steps] == [bar.candle_time] * 3
    assert steps[-1].close == bar.close and all(s.open == bar.open for s in steps)
    assert [s.volume for s in steps] == sorted(s.volume for s in steps)
    assert all(s.volume <= bar.volume and s.low <= s.close <= s.high for s in steps)


prices = st.decimals(min_value=Decimal("0.01"), max_value=Decimal(10**6), places=2)


@given(open_=prices, close=prices, volume=prices, count=st.integers(0, 8))
def test_forming_steps_of_any_bar_are_valid_candles(
    open_: Decimal, close: Decimal, volume: Decimal, count: int
) -> None:
    bar = Candle(DAY, open_, max(open_, close), min(open_, close), close, volume, volume, 40)
    steps = forming_steps(bar, count)
    assert len(steps) == count
    for step in steps:
        validate_candle(step, Timeframe.parse("1m"))
        assert step.open == bar.open and step.volume <= bar.volume
    assert [s.volume for s in steps] == sorted(s.volume for s in steps)
    if steps:
        assert steps[-1].close == bar.close


def test_csv_bars_become_forming_and_closed_frames_in_exchange_time(day_csv: Path) -> None:
    config = config_for(day_csv, forming_per_bar=3)
    frames = list(timeline_frames(config, load_data(config)))
    assert len(frames) == 4 * 1440
    assert all(f.stream == STREAM for f in frames)
    assert [f.event_ms - DAY * 1000 for f in frames[:5]] == [15000, 30000, 45000, 60200, 75000]
    assert [(f.minute, f.kind) for f in frames[:4]] == [(0, "forming")] * 3 + [(0, "closed")]
    assert orjson.loads(frames[3].raw_text())["k"]["x"] is True  # the payload without wrapper


def test_two_files_interleave_in_exchange_time_the_same_way_every_run(day_csv: Path) -> None:
    config = config_for(day_csv, forming_per_bar=0)
    config = ReplayConfig(files=config.files * 2, speed=None, forming_per_bar=0)
    frames = list(timeline_frames(config, load_data(config)))
    assert [f.order for f in frames[:4]] == [0, 1, 0, 1]
    assert frames[1].event_ms == frames[0].event_ms + 1


def _sent(config: ReplayConfig, data: ReplayData) -> list[tuple[int, bool] | str]:
    """What the faults let through: (bar, closed) per frame sent, ``drop`` per drop."""
    plan = FaultPlan.of(config, data.minutes)
    out: list[tuple[int, bool] | str] = []
    for frame in timeline_frames(config, data):
        step = plan.step(frame)
        if step.drop:
            out.append("drop")
        out += [(frame.minute, frame.kind == "closed")] * step.sends
    return out


def test_faults_omit_duplicate_drop_and_skip(day_csv: Path) -> None:
    config = faults_config(day_csv)
    sent = _sent(config, load_data(config))
    assert sent[:12] == [
        (1420, False),
        (1420, True),
        (1421, False),  # 1421's close omitted
        (1422, False),
        (1422, True),
        (1422, True),  # duplicated
        (1423, False),
        (1423, True),
        (1424, False),
        "drop",  # before 1424's close; 1425 and 1426 skipped
        (1427, False),
        (1427, True),
    ]


def test_a_drop_moves_the_clock_past_the_skipped_bars(day_csv: Path) -> None:
    config = config_for(day_csv, start_at=1420, drop_at=(1424,), skip=2)
    data = load_data(config)
    plan = FaultPlan.of(config, data.minutes)
    steps = [plan.step(f) for f in timeline_frames(config, data)]
    (drop,) = [s for s in steps if s.drop]
    assert drop.clock_ms == data.minutes[1427] * 1000 and drop.sends == 0


def _minutes_data(count: int, per_bar: int = 0) -> tuple[ReplayConfig, ReplayData]:
    candles = [
        Candle(DAY + 60 * i, Decimal(1), Decimal(1), Decimal(1), Decimal(1), Decimal(1))
        for i in range(count)
    ]
    data = ReplayData(minutes=[c.candle_time for c in candles], csv_series=[(0, SID, candles)])
    return ReplayConfig(files=(), forming_per_bar=per_bar), data


@given(
    omit=st.frozensets(st.integers(0, 29)),
    every=st.none() | st.integers(1, 5),
    duplicate=st.frozensets(st.integers(0, 29)),
)
def test_the_last_close_is_always_sent_and_every_other_close_as_configured(
    omit: frozenset[int], every: int | None, duplicate: frozenset[int]
) -> None:
    _, data = _minutes_data(30)
    config = ReplayConfig(
        files=(),
        forming_per_bar=0,
        omit_closes=omit,
        omit_close_every=every,
        duplicate_closes=duplicate,
    )
    sent = _sent(config, data)
    for bar in range(30):
        omitted = bar != 29 and (bar in omit or (every is not None and bar % every == every - 1))
        expected = 0 if omitted else 2 if bar in duplicate else 1
        assert sent.count((bar, True)) == expected, bar


def test_rest_serves_only_closed_bars_with_binance_paging() -> None:
    _, data = _minutes_data(10)
    ((_, _, bars),) = data.csv_series
    now_ms = (DAY + 6 * 60) * 1000  # bar 6 is forming
    assert [c.candle_time for c in closed_bars(bars, now_ms, DAY * 1000, None, 100)] == [
        DAY + 60 * i for i in range(6)
    ]
    # from startTime: the first `limit`; without it: the last `limit` up to endTime
    assert closed_bars(bars, now_ms, DAY * 1000, None, 2) == bars[:2]
    assert closed_bars(bars, now_ms, None, (DAY + 240) * 1000, 2) == bars[3:5]
    assert closed_bars(bars, now_ms - 1, None, None, 100) == bars[:5]


def test_subscription_requests_are_answered_as_binance_does() -> None:
    streams: set[str] = set()
    subscribe = '{"method":"SUBSCRIBE","params":["a@kline_1m","b@kline_1m"],"id":7}'
    assert orjson.loads(answer_request(subscribe, streams)) == {"result": None, "id": 7}
    unsubscribe = '{"method":"UNSUBSCRIBE","params":["a@kline_1m"],"id":8}'
    assert orjson.loads(answer_request(unsubscribe, streams)) == {"result": None, "id": 8}
    listing = orjson.loads(answer_request('{"method":"LIST_SUBSCRIPTIONS","id":9}', streams))
    assert listing == {"result": ["b@kline_1m"], "id": 9}
    assert orjson.loads(answer_request('{"method":"PING","id":1}', streams)) == {
        "error": {"code": 1, "msg": "Invalid method"},
        "id": 1,
    }
    for bad in ("not json", "[1]", '{"id":1}', '{"method":"SUBSCRIBE","params":5}'):
        assert orjson.loads(answer_request(bad, streams)) == {
            "error": {"code": 2, "msg": "Invalid request"}
        }
    assert streams == {"b@kline_1m"}


def test_longer_intervals_are_binances_own_bars(data_dir: Path) -> None:
    """The REST view of 15m … 1d summed from the futures week's 1m bars is bit-equal to
    Binance's own bars of that week; paging by open time as for 1m."""
    folder = data_dir / "klines_1m_5m" / "futures_um"
    minutes = read_kline_csv(folder / "BTCUSDT-1m-2025-07-06_2025-07-12.csv")
    now_ms = (minutes[-1].candle_time + 60) * 1000
    for interval in ("15m", "1h", "4h", "1d"):
        tf = Timeframe.parse(interval)
        theirs = read_kline_csv(
            data_dir
            / "klines_higher"
            / "futures_um"
            / f"BTCUSDT-{interval}-2025-07-06_2025-07-12.csv"
        )
        ours = interval_bars(minutes, tf, 0, now_ms, minutes[0].candle_time * 1000, None, 1500)
        assert len(ours) == len(theirs) and all(
            a.same_values(b) for a, b in zip(ours, theirs, strict=True)
        ), interval
        newest = interval_bars(minutes, tf, 0, now_ms, None, None, 2)
        assert all(a.same_values(b) for a, b in zip(newest, theirs[-2:], strict=True)), interval
    # at an earlier exchange time the newest 1d bar is the one forming
    day = Timeframe.parse("1d")
    (forming,) = interval_bars(
        minutes, day, 0, (minutes[0].candle_time + 600) * 1000, None, None, 1
    )
    assert forming.candle_time == minutes[0].candle_time
    assert forming.volume == sum((m.volume for m in minutes[:10]), Decimal(0))


def test_the_3d_phase_is_the_option_else_the_documented_one_else_0() -> None:
    config = ReplayConfig(files=())
    assert phase_3d(config, "futures", "BTCUSDT") == 2 * 86_400
    assert phase_3d(config, "spot", "BTCUSDT") == 86_400
    assert phase_3d(config, "spot", "DOGEUSDT") == 0
    assert phase_3d(attrs.evolve(config, phase_3d_days=0), "futures", "BTCUSDT") == 0


def test_the_schedule_does_not_add_up_the_time_spent_sending() -> None:
    """At speed 2 a frame 1,000 exchange ms after the first goes 0.5 s after it; a frame
    sent late does not push the ones after it back, a pause does, a restart starts over."""
    schedule = Schedule(2.0)
    e = 1_700_000_000_000
    assert schedule.send_at(e, now=10.0) == 10.0  # the first frame starts the schedule
    assert schedule.send_at(e + 1000, now=10.1) == 10.5
    # sending took long: this one is due already (sent at once) ...
    assert schedule.send_at(e + 2000, now=12.0) == 11.0
    # ... and the next one is on the schedule again, not 0.5 s after the late one
    assert schedule.send_at(e + 5000, now=12.1) == 12.5
    schedule.pause(3.0)  # waited for a client, or a stall
    assert schedule.send_at(e + 6000, now=15.6) == 16.0
    schedule.restart()  # a drop
    assert schedule.send_at(e + 60_000, now=20.0) == 20.0
    assert schedule.send_at(e + 61_000, now=20.0) == 20.5
