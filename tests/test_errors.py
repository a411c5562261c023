"""What ``serve`` says of what stopped it (:func:`start_failure`)."""

from __future__ import annotations

from tradecanvas.errors import (
    ExitCode,
    FlagError,
    IngestFenced,
    ListenError,
    StoreError,
    StoreRecovered,
    expected_restart,
    first_leaf,
    start_failure,
)


def test_a_store_failure_is_exit_3_and_says_stopping() -> None:
    failed = BaseExceptionGroup("", [StoreError("disk I/O error")])
    assert start_failure(failed) == (
        ExitCode.STORE_FAILURE,
        "store failure, stopping (exit code 3): disk I/O error",
        False,
    )


def test_the_end_of_an_outage_is_exit_3_and_says_it_restarts() -> None:
    ended = BaseExceptionGroup("", [BaseExceptionGroup("", [StoreRecovered("writes again")])])
    code, line, traceback = start_failure(ended) or (None, "", True)
    assert code == ExitCode.STORE_FAILURE and not traceback
    assert line == "store outage over, restarting (exit code 3): writes again"


def test_flags_ports_and_bugs() -> None:
    flag = BaseExceptionGroup("", [FlagError("TRADE_CANVAS_X", "bad")])
    assert start_failure(flag) == (ExitCode.USAGE, "cannot start: TRADE_CANVAS_X: bad", False)
    port = BaseExceptionGroup("", [ListenError("port 1 in use")])
    assert start_failure(port) == (ExitCode.FAILED, "cannot start: port 1 in use", False)
    assert start_failure(OSError("address in use")) == (
        ExitCode.FAILED,
        "cannot start: address in use",
        False,
    )
    bug = BaseExceptionGroup("", [RuntimeError("bug")])
    assert start_failure(bug) == (ExitCode.FAILED, "tradecanvas failed", True)
    assert start_failure(RuntimeError("bug")) is None


def test_a_group_says_and_is_logged_as_its_first_leaf() -> None:
    """``serve`` logs the line at WARNING only when it is the recovery's (its first leaf):
    a failure beside a recovery is a failure (review: diffrev)."""
    mixed = BaseExceptionGroup("", [StoreError("disk I/O error"), StoreRecovered("writes")])
    _, line, _ = start_failure(mixed) or (None, "", True)
    assert line.startswith("store failure, stopping") and not isinstance(
        first_leaf(mixed), StoreRecovered
    )
    recovered = BaseExceptionGroup("", [StoreRecovered("writes"), StoreError("disk I/O error")])
    _, line, _ = start_failure(recovered) or (None, "", True)
    assert line.startswith("store outage over") and isinstance(
        first_leaf(recovered), StoreRecovered
    )


def test_a_deposed_ingest_node_says_so_and_is_an_expected_restart() -> None:
    """Not "store failure, stopping" at CRITICAL with a healthy store (review: soak2)."""
    deposed = BaseExceptionGroup("", [IngestFenced("node b holds the lease now")])
    assert start_failure(deposed) == (
        ExitCode.STORE_FAILURE,
        "deposed, restarting to stand by (exit code 3): node b holds the lease now",
        False,
    )
    assert expected_restart(deposed)
    assert expected_restart(BaseExceptionGroup("", [StoreRecovered("writes")]))
    assert not expected_restart(BaseExceptionGroup("", [StoreError("disk I/O error")]))
