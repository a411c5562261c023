"""Frames ahead of this machine's clock, or of another symbol than their stream's, are
refused by the ingest core before they change anything (pure: no trio, no sockets).

Found by a hostile-input review: one forming frame with ``E`` in the year 2100 moved the
exchange clock there (thousands of ``gap`` events and REST calls); one closed bar of 2100
became its series' head; a ``btcusdt@kline_1m`` frame carrying ETHUSDT was stored as BTC."""

from __future__ import annotations

from collections.abc import Sequence

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.ingest.driver import BTC, ETH, T0, Driver, bar, close_of, forming_of, kline, truth_of
from tests.ingest.driver import make_core as make_plain_core
from tradecanvas.ingest.core import IngestCore
from tradecanvas.ingest.frame_bounds import SKEW_MS, ClockBound, ahead_problem, vouched_ms
from tradecanvas.model import Candle
from tradecanvas.wire.binance import KlineEvent, decode_frame
from tradecanvas.wire.json import dumps

YEAR_2100_MS = 4_102_444_800_000
# the machine's clock in these tests: a day after the data (a replay of the past)
WALL_S = T0 + 86_400


def make_core(wall_s: float = WALL_S, **kwargs: object) -> IngestCore:
    core = make_plain_core(**kwargs)  # type: ignore[arg-type]
    core.clock_bound = ClockBound(lambda: wall_s)
    return core


def event_of(raw: str) -> KlineEvent:
    event = decode_frame(raw)
    assert isinstance(event, KlineEvent)
    return event


def with_data(raw: str, **changes: object) -> str:
    doc = orjson.loads(raw)
    for key, value in changes.items():
        if key.startswith("k_"):
            doc["data"]["k"][key[2:]] = value
        else:
            doc["data"][key] = value
    return dumps(doc)


def far_forming(t: int) -> str:
    """A forming frame of bar ``t`` with an event time of 2100 (the review's D1)."""
    return with_data(forming_of(BTC, bar(t)), E=YEAR_2100_MS)


def far_closed() -> str:
    """A closed frame of the bar opening at 2100-01-01, its E and T consistent (D2)."""
    return close_of(BTC, bar(YEAR_2100_MS // 1000), late_ms=50)


def other_symbol(t: int) -> str:
    """A closed frame of stream btcusdt@kline_1m whose s and k.s say ETHUSDT (D3)."""
    return with_data(close_of(BTC, bar(t, price=2500)), s="ETHUSDT", k_s="ETHUSDT")


# --- the rule ----------------------------------------------------------------------------


times_ms = st.integers(min_value=0, max_value=2**62)


@st.composite
def events(draw: st.DrawFn) -> KlineEvent:
    t_ms = draw(times_ms) // 60_000 * 60_000
    closed = draw(st.booleans())
    raw = kline(BTC, bar(t_ms // 1000), closed=closed, event_time_ms=draw(times_ms))
    event = event_of(raw)
    return event._replace(close_time_ms=t_ms + draw(st.sampled_from((59_999, 0, 10**15))))


@given(events(), times_ms)
@settings(max_examples=500, deadline=None)
def test_a_frame_is_refused_exactly_when_it_vouches_for_the_future(
    event: KlineEvent, now_ms: int
) -> None:
    problem = ahead_problem(event, now_ms)
    ends = max(event.close_time_ms + 1, event.open_time_ms + 60_000)
    latest = max(event.event_time_ms, ends if event.closed else event.open_time_ms)
    assert vouched_ms(event) == latest
    assert (problem is None) == (latest <= now_ms + SKEW_MS)
    if problem is not None:
        assert "more than 60 s after this machine's clock" in problem
    # the cheap test every frame takes lets every refusal through to the full one
    bound = ClockBound()
    bound.limit_ms = now_ms + SKEW_MS
    assert bound.may_refuse(event) or problem is None


@given(events(), st.integers(min_value=0, max_value=10**6))
@settings(max_examples=300, deadline=None)
def test_the_past_is_never_refused(event: KlineEvent, later_ms: int) -> None:
    """A replay of old data at any speed: every frame's times lie before the wall clock."""
    assert ahead_problem(event, vouched_ms(event) + later_ms - SKEW_MS) is None


def test_the_clock_is_read_only_when_a_frame_is_past_the_last_bound() -> None:
    readings: list[float] = []

    def clock() -> float:
        readings.append(WALL_S)
        return WALL_S

    bound = ClockBound(clock)
    frames = [event_of(close_of(BTC, bar(T0 + 60 * i))) for i in range(100)]
    assert [bound.problem(e) for e in frames] == [None] * 100
    assert len(readings) == 1  # all of them long before the clock
    assert bound.problem(event_of(far_forming(T0))) is not None
    assert bound.problem(event_of(far_closed())) is not None
    assert len(readings) == 3
    # one within the skew: read again, and taken
    edge = event_of(kline(BTC, bar(WALL_S), closed=False, event_time_ms=WALL_S * 1000 + SKEW_MS))
    assert bound.problem(edge) is None
    late = event_of(kline(BTC, bar(WALL_S), closed=True, event_time_ms=WALL_S * 1000))
    assert bound.problem(late) is None  # ends at WALL_S + 60 s: just inside
    early = event_of(kline(BTC, bar(WALL_S + 60), closed=True, event_time_ms=WALL_S * 1000))
    assert bound.problem(early) is not None  # a bar that has not ended is not closed


# --- the core: refused, and nothing changes ----------------------------------------------


def test_a_far_future_event_time_moves_no_clock_and_asks_rest_for_nothing() -> None:
    driver = Driver(make_core(), {BTC: truth_of(10)})
    for t in (T0, T0 + 60):
        driver.send(close_of(BTC, bar(t, 100 + (t - T0) // 60)))
    outcome = driver.send(far_forming(T0 + 120))
    assert outcome.malformed is not None and outcome.malformed.reason == "ahead_of_clock"
    assert "E=4102444800000 (2100-01-01 00:00:00 UTC)" in outcome.malformed.detail
    assert outcome.forming == () and not outcome.wake_fills
    tracker = driver.core.trackers[BTC]
    assert tracker._exchange_ms == (T0 + 120) * 1000  # the last close's end, not 2100
    driver.settle()
    assert driver.fills == [] and driver.absent == 0 and driver.absent_runs() == []
    assert driver.times() == [T0, T0 + 60]
    assert [s.time for s in driver.sent if s.series_id == str(BTC)] == [T0, T0 + 60]
    # the machine's clock up to 60 s behind Binance's: a live feed is still taken whole
    live = Driver(make_core(wall_s=T0), {BTC: truth_of(3)})
    live.send(forming_of(BTC, bar(T0), into_ms=59_000))
    live.send(close_of(BTC, bar(T0)))  # ends at T0 + 60: the clock + 60 s
    live.settle()
    assert live.malformed == [] and live.times() == [T0]


def test_a_far_future_closed_bar_is_not_stored_nor_made_the_head() -> None:
    driver = Driver(make_core(), {BTC: truth_of(10)})
    driver.send(close_of(BTC, bar(T0)))
    outcome = driver.send(far_closed())
    assert outcome.malformed is not None and outcome.malformed.reason == "ahead_of_clock"
    assert not outcome.wake_committer and not outcome.wake_fills
    assert driver.core.trackers[BTC].head == T0 and driver.core.trackers[BTC].held_count() == 0
    driver.send(close_of(BTC, bar(T0 + 60, 101)))
    driver.settle()
    assert driver.times() == [T0, T0 + 60] and driver.fills == [] and driver.absent == 0


def test_a_frame_of_another_symbol_on_a_stream_is_refused() -> None:
    driver = Driver(make_core(), {BTC: truth_of(10)})
    driver.send(close_of(BTC, bar(T0)))
    outcome = driver.send(other_symbol(T0 + 60))
    assert outcome.malformed is not None and outcome.malformed.reason == "symbol_mismatch"
    assert outcome.malformed.detail == ("stream btcusdt@kline_1m carries a kline of 'ETHUSDT'")
    # only k.s differing from s: the decoder refuses it
    only_k = with_data(close_of(BTC, bar(T0 + 60, 2500)), k_s="ETHUSDT")
    assert driver.send(only_k).malformed.reason == "symbol_mismatch"  # type: ignore[union-attr]
    # only s: the stream is BTC's, the frame ETH's
    only_s = with_data(close_of(BTC, bar(T0 + 60, 2500)), s="ETHUSDT")
    assert driver.send(only_s).malformed.reason == "symbol_mismatch"  # type: ignore[union-attr]
    driver.settle()
    assert driver.times() == [T0] and driver.core.trackers[BTC].head == T0
    # ETH's frames on ETH's own stream are taken
    both = Driver(make_core(series=(BTC, ETH)), {BTC: truth_of(2), ETH: truth_of(2)})
    both.send(close_of(ETH, bar(T0, 2500)))
    both.send(close_of(BTC, bar(T0)))
    both.settle()
    assert both.malformed == [] and both.times(ETH) == [T0] and both.times() == [T0]


POISONS = ("far_forming", "far_closed", "far_t_forming", "far_t_closed", "late_T", "other_symbol")


def poison(kind: str, t: int) -> str:
    if kind == "far_forming":
        return far_forming(t)
    if kind == "far_closed":
        return far_closed()
    if kind == "far_t_forming":  # a forming bar of 2100, E honest
        return kline(BTC, bar(YEAR_2100_MS // 1000), closed=False, event_time_ms=t * 1000)
    if kind == "far_t_closed":  # a closed bar of 2100, E honest
        return kline(BTC, bar(YEAR_2100_MS // 1000), closed=True, event_time_ms=t * 1000)
    if kind == "late_T":  # an honest bar claiming to end in 2100
        return with_data(close_of(BTC, bar(t)), k_T=YEAR_2100_MS)
    return other_symbol(t)


def run(frames: Sequence[str]) -> Driver:
    driver = Driver(make_core(), {BTC: truth_of(12, missing=(4,))})
    for raw in frames:
        known = driver.exchange_ms
        if driver.send(raw).malformed:  # the stand-in REST's clock: frames taken only
            driver.exchange_ms = known
        driver.answer()
        driver.commit_due()
    driver.settle()
    return driver


@given(
    closes=st.lists(st.tuples(st.integers(0, 11), st.booleans()), max_size=20),
    poisons=st.lists(st.tuples(st.integers(0, 20), st.sampled_from(POISONS)), max_size=4),
)
@settings(max_examples=150, deadline=None)
def test_refused_frames_change_nothing(
    closes: list[tuple[int, bool]], poisons: list[tuple[int, str]]
) -> None:
    """Any honest sequence of frames, with poisoned ones slipped in anywhere: what is
    stored, published, fetched and called absent is what the honest frames alone give."""
    truth: dict[int, Candle] = truth_of(12, missing=(4,))
    honest = [
        close_of(BTC, truth[t]) if closed else forming_of(BTC, truth[t])
        for i, closed in closes
        if (t := T0 + 60 * i) in truth
    ]
    mixed = list(honest)
    for at, kind in sorted(poisons, reverse=True):
        mixed.insert(min(at, len(mixed)), poison(kind, T0 + 60 * min(at, 11)))
    clean, poisoned = run(honest), run(mixed)
    assert sorted(poisoned.malformed) == sorted(
        "symbol_mismatch" if kind == "other_symbol" else "ahead_of_clock" for _, kind in poisons
    )
    assert poisoned.committed == clean.committed
    assert poisoned.sent == clean.sent
    assert poisoned.fills == clean.fills
    assert poisoned.absent == clean.absent
    assert poisoned.core.trackers[BTC].head == clean.core.trackers[BTC].head
