"""The ingest lease's rules (``bus/lease.py``), without Redis: who ingests, when to ask
Redis again, and the fence."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tradecanvas.bus.lease import (
    HELD_BY_OTHER,
    RENEWED,
    RESET,
    LeaseCore,
    LeaseTiming,
    Verdict,
    fence_allows,
    next_fence,
)

TIMING = LeaseTiming(3_000)


def test_a_standby_takes_over_when_the_lease_is_free() -> None:
    core = LeaseCore("b", TIMING)
    assert core.next_at() == 0.0  # asks at once
    assert core.on_acquire(False, "a", 0.0) is Verdict.STANDBY
    assert (core.leader, core.holder, core.takeovers) == (False, "a", 0)
    assert core.next_at() == pytest.approx(0.75)  # a quarter of the TTL
    assert core.on_acquire(True, None, 0.75) is Verdict.TAKE_OVER
    assert (core.leader, core.holder, core.takeovers) == (True, "b", 1)
    assert core.next_at() == pytest.approx(1.75)  # renews every third


def test_the_holder_renews_and_is_deposed_by_another_holder() -> None:
    core = LeaseCore("a", TIMING)
    core.on_acquire(True, None, 0.0)
    assert core.on_renew(RENEWED, "a", 1.0) is Verdict.KEEP
    # Redis restarted: the script set it again
    assert core.on_renew(RESET, "a", 2.0) is Verdict.KEEP
    assert core.unrenewed_for(2.5) == pytest.approx(0.5)
    assert core.on_renew(HELD_BY_OTHER, "b", 3.0) is Verdict.DEPOSED
    assert (core.leader, core.holder) == (False, "b")
    assert core.unrenewed_for(4.0) == 0.0


def test_redis_away_keeps_the_holder_ingesting_and_a_standby_waiting_a_ttl() -> None:
    holder, standby = LeaseCore("a", TIMING), LeaseCore("b", TIMING)
    holder.on_acquire(True, None, 0.0)
    assert holder.on_failure(1.0) is Verdict.KEEP
    assert holder.leader and holder.next_at() == pytest.approx(2.0)
    assert standby.on_failure(1.0) is Verdict.STANDBY
    # after a failure the standby only looks; it asks for the lease a TTL after Redis
    # answered it, by when the holder, renewing every third of the TTL, has set it again
    assert [standby.probing, standby.next_at()] == [True, 1.75]
    assert standby.on_probe(None, 1.75) is Verdict.STANDBY
    assert [standby.probing, standby.next_at()] == [False, 4.75]
    assert standby.next_at() > holder.next_at() + TIMING.renew_s


@given(st.floats(TIMING.poll_s, 3 * TIMING.ttl_s), st.floats(0, TIMING.poll_s - 0.01))
def test_redis_back_empty_gives_the_lease_back_to_its_holder_first(
    down_s: float, phase_s: float
) -> None:
    """Redis restarts empty (down ``down_s`` from t=1, at least the standby's poll interval:
    one of its asks fails); the standby's asks fall anywhere between the holder's renewals
    (``phase_s``). The holder's renewal sets the lease again before the standby asks for it
    (a soak saw the standby take it: its wait counted from its own last failed ask). A
    restart shorter than the poll interval that no ask of the standby meets can still let
    it take the lease (docs/distributed.md)."""
    holder, standby = LeaseCore("a", TIMING), LeaseCore("b", TIMING)
    holder.on_acquire(True, None, 0.0)
    standby.on_acquire(False, "a", phase_s)
    down, back = 1.0, 1.0 + down_s
    lease: str | None = "a"
    while True:
        now = min(holder.next_at(), standby.next_at())
        if down <= now < back:  # Redis away; it comes back without the lease
            lease = None
            (holder if now == holder.next_at() else standby).on_failure(now)
        elif now == holder.next_at():
            assert holder.on_renew(RENEWED if lease else RESET, None, now) is Verdict.KEEP
            lease = "a"
            if now >= back:
                break
        elif standby.probing:
            standby.on_probe(lease, now)
        else:
            assert lease is not None, "the standby took the lease from its healthy holder"
            standby.on_acquire(False, lease, now)
    assert holder.leader and not standby.leader


def test_wrong_calls_are_refused() -> None:
    core = LeaseCore("a", TIMING)
    with pytest.raises(ValueError, match="acquire instead"):
        core.on_renew(RENEWED, "a", 0.0)
    core.on_acquire(True, None, 0.0)
    with pytest.raises(ValueError, match="renew instead"):
        core.on_acquire(True, None, 0.0)
    with pytest.raises(ValueError, match="unknown renewal answer"):
        core.on_renew(7, "a", 0.0)
    with pytest.raises(ValueError, match="at least 100 ms"):
        LeaseTiming(50)


def test_a_clean_step_down() -> None:
    core = LeaseCore("a", TIMING)
    core.on_acquire(True, None, 0.0)
    core.stepped_down()
    assert not core.leader and core.holder is None


def test_the_fence() -> None:
    assert next_fence(None) == 1
    assert next_fence("41") == 42
    assert fence_allows(None, None) and fence_allows("3", None)  # not a holder: not fenced
    assert fence_allows("3", 3)
    assert not fence_allows("4", 3)  # a newer holder wrote its token
    assert not fence_allows(None, 3)
    with pytest.raises(ValueError, match="not a number"):
        fence_allows("x", 1)
    with pytest.raises(ValueError, match="negative"):
        next_fence("-1")


@given(st.lists(st.sampled_from(["a", "b"]), min_size=1, max_size=30))
def test_tokens_make_only_the_newest_holder_write(takeovers: list[str]) -> None:
    """Whatever the order of takeovers, only the last one's token passes the fence."""
    stored: str | None = None
    tokens: list[int] = []
    for _ in takeovers:
        token = next_fence(stored)
        stored = str(token)
        tokens.append(token)
    assert tokens == sorted(set(tokens))
    assert [fence_allows(stored, t) for t in tokens] == [False] * (len(tokens) - 1) + [True]


@given(st.lists(st.tuples(st.sampled_from(["ok", "lost", "fail"]), st.floats(0, 10)), max_size=40))
def test_two_nodes_never_both_believe_they_lead_after_answers_from_redis(
    steps: list[tuple[str, float]],
) -> None:
    """Redis decides: a node believes it leads only after Redis gave or renewed it the lease,
    and a renewal answered for another node deposes it."""
    core = LeaseCore("a", TIMING)
    now = 0.0
    for outcome, dt in steps:
        now += dt
        was = core.leader
        if outcome == "fail":
            assert core.on_failure(now) is (Verdict.KEEP if was else Verdict.STANDBY)
            assert core.leader is was
        elif was:
            verdict = core.on_renew(RENEWED if outcome == "ok" else HELD_BY_OTHER, "b", now)
            assert core.leader is (verdict is Verdict.KEEP)
        else:
            verdict = core.on_acquire(outcome == "ok", None if outcome == "ok" else "b", now)
            assert core.leader is (verdict is Verdict.TAKE_OVER)
        assert core.next_at() > now
