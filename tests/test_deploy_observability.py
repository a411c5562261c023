"""The operators' files: deploy/grafana/tradecanvas.json and deploy/prometheus/*.yml use only
metric names a running daemon exposes on /metrics (the real ``tradecanvas serve``, against a
paused ``tradecanvas replay``), the dashboard is well-formed, and the watchdog alert sits
below the unit's WatchdogSec. promtool checks the rules themselves (make deploy-check)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Final

import httpx
import pytest

from tests.cli_rig import cli_env, run_cli, wait_for_line
from tests.conftest import REPO, binance_data_dir

DASHBOARD: Final = REPO / "deploy" / "grafana" / "tradecanvas.json"
RULES: Final = REPO / "deploy" / "prometheus" / "tradecanvas.rules.yml"
RULES_TEST: Final = REPO / "deploy" / "prometheus" / "tradecanvas.rules.test.yml"
UNIT: Final = REPO / "deploy" / "tradecanvas.service"
DAY: Final = "klines_1m_5m/futures_um/BTCUSDT-1m-2023-08-16.csv"
# the delivery and watchdog metrics the operators' panels and alerts are built around
DELIVERY_AND_WATCHDOG: Final = frozenset(
    {
        "tradecanvas_delivery_latency_seconds",
        "tradecanvas_subscriber_queue_high_water",
        "tradecanvas_watchdog_last_ping_age_seconds",
    }
)
HISTOGRAM_SUFFIXES: Final = ("_bucket", "_sum", "_count")
# registered only by a role this test does not run (role ingest's lease, bus/leader.py:
# tests/bus/test_failover.py reads it on a real ingest node)
ROLE_ONLY: Final = frozenset({"tradecanvas_ingest_leader"})


def names_used(*paths: Path) -> set[str]:
    return {name for p in paths for name in re.findall(r"\btradecanvas_[a-z0-9_]+", p.read_text())}


def family_of(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def exposed_names(exposition: str) -> set[str]:
    """Every metric name a scrape of this text can match: each family (counters under their
    ``_total`` name, as prometheus_client writes them) and a histogram's series."""
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.M):
        names.add(name)
        if kind == "histogram":
            names.update(name + s for s in HISTOGRAM_SUFFIXES)
    return names


@pytest.mark.e2e
async def test_every_metric_the_dashboard_and_the_rules_use_is_on_metrics(
    tmp_path: Path,
) -> None:
    with run_cli(
        ["replay", str(binance_data_dir() / DAY), "--paused", "--start-at", "1000"],
        cli_env(),
        tmp_path / "replay.log",
    ) as replay:
        found = await wait_for_line(tmp_path / "replay.log", r"replay ws=(\S+) rest=(\S+)", replay)
        env = cli_env(
            TRADE_CANVAS_DB_PATH=str(tmp_path / "market.sqlite3"),
            TRADE_CANVAS_BINANCE_FUTURES_WS_URL=found.group(1),
            TRADE_CANVAS_BINANCE_FUTURES_REST_URL=found.group(2),
        )
        with run_cli(["serve"], env, tmp_path / "serve.log") as serve:
            ready = await wait_for_line(
                tmp_path / "serve.log", r"tradecanvas ready ws=\S+ http=(\S+)", serve
            )
            async with httpx.AsyncClient() as client:
                answer = await client.get(f"{ready.group(1)}/metrics")
    assert answer.status_code == 200
    exposed = exposed_names(answer.text)
    assert "tradecanvas_candles_committed_total" in exposed  # the parse itself works
    used = names_used(DASHBOARD, RULES, RULES_TEST)
    missing = {n for n in used - ROLE_ONLY if n not in exposed}
    assert missing == set(), f"used by deploy/ but not on /metrics: {sorted(missing)}"
    assert {family_of(n) for n in used} >= DELIVERY_AND_WATCHDOG
    # TradecanvasRestarted, and the role the rules join on
    assert "process_start_time_seconds" in exposed
    assert 'tradecanvas_role_info{role="all"} 1.0' in answer.text


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_the_dashboard_is_well_formed_and_covers_what_operators_watch() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "tradecanvas" and dashboard["title"] == "tradecanvas"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "instance"}
    exprs: dict[str, str] = {}
    for panel in _panels(dashboard):
        assert panel["title"] and panel["description"], panel
        assert panel["targets"], panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert 'instance=~"$instance"' in target["expr"], target["expr"]
            exprs[panel["title"]] = exprs.get(panel["title"], "") + target["expr"]
            assert target["expr"].count("(") == target["expr"].count(")")
    covered = {
        "Ingest rate": "tradecanvas_candles_committed_total",
        "Commit latency": "tradecanvas_ingest_latency_seconds_bucket",
        "Delivery latency histogram": "tradecanvas_delivery_latency_seconds_bucket",
        "Subscribers": "tradecanvas_subscribers",
        "Subscriber queue high-water marks": "tradecanvas_subscriber_queue_high_water",
        "Upstream reconnects by reason": "tradecanvas_upstream_reconnects_total",
        "REST weight used": "tradecanvas_rest_used_weight_1m",
        "Gaps": "tradecanvas_exchange_missing_minutes_total",
    }
    for title, metric in covered.items():
        assert metric in exprs.get(title, ""), title
    heatmap = next(p for p in _panels(dashboard) if p["type"] == "heatmap")
    assert heatmap["targets"][0]["format"] == "heatmap"


def test_the_watchdog_alert_fires_before_systemd_kills_the_unit() -> None:
    watchdog_s = int(re.search(r"^WatchdogSec=(\d+)$", UNIT.read_text(), re.M).group(1))  # type: ignore[union-attr]
    rule = re.search(r"tradecanvas_watchdog_last_ping_age_seconds\) > (\d+)", RULES.read_text())
    assert rule is not None
    threshold = int(rule.group(1))
    # above the normal ping period (half of WatchdogSec), below the kill
    assert watchdog_s / 2 < threshold < watchdog_s


def test_every_alert_has_a_unit_test() -> None:
    alerts = set(re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), re.M))
    tested = set(re.findall(r"alertname: (\w+)$", RULES_TEST.read_text(), re.M))
    assert alerts == {
        "TradecanvasUpstreamStale",
        "TradecanvasUpstreamStaleReconnects",
        "TradecanvasGapsOpen",
        "TradecanvasSlowSubscriberClosesRising",
        "TradecanvasWatchdogNearLimit",
        "TradecanvasDown",
        "TradecanvasRestarted",
        "TradecanvasNoIngestLeader",
        "TradecanvasTwoIngestLeaders",
        "TradecanvasDependencyDown",
        "TradecanvasBusBacklogGrowing",
    }
    assert tested == alerts
