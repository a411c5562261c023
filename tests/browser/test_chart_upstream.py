"""The chart's badge judges the Binance connection of the series it shows (docs/chart.md, Stale
data): with spot and futures configured and only futures unreachable, a spot chart flipped
between ``live`` and ``stale: Binance unreachable`` every poll (13 changes in 20 s), and a
quiet one stayed "unreachable" for ever, because ``/healthz`` answered for every connection
of the daemon. A real replay of spot minutes, a real daemon whose futures URLs name a port
nobody listens on, headless Chromium."""

from __future__ import annotations

from pathlib import Path
from typing import Final

import pytest
from playwright.sync_api import Browser, Response

from tests.browser.rig import WAIT_MS, chart_page
from tests.serve.test_healthz_upstream import ADA, ETH, spot_up_futures_down, wait_healthz

pytestmark = pytest.mark.browser

TC: Final = "window.tradecanvasChart"
# the page asks /healthz every 300 ms once its series has been quiet 500 ms (3 s and 5 s
# unless a test lowers them): several polls in a second or two
TIMING: Final = {"sourcePollMs": 300, "quietAskAfterMs": 500}
POLLS: Final = 6
# every text and state the badge shows, recorded by the page itself from its first script
RECORD_BADGE: Final = """
window.badgeSeen = [];
document.addEventListener("DOMContentLoaded", () => {
  const el = document.getElementById("state");
  const note = () => window.badgeSeen.push(`${el.dataset.state}|${el.textContent}`);
  new MutationObserver(note).observe(el, {
    attributes: true, childList: true, subtree: true, characterData: true,
  });
  note();
});
"""


def test_a_spot_chart_stays_live_while_only_the_futures_connection_is_down(
    tmp_path: Path, browser: Browser
) -> None:
    with (
        spot_up_futures_down(tmp_path) as m,
        chart_page(browser, m.http_url, timing=TIMING) as chart,
    ):
        # the daemon's spot connection is open (futures never is): what the page will hear
        wait_healthz(m, lambda b: b["upstream"] == "connected", series_id=ADA)
        answers: list[Response] = []
        chart.page.on("response", lambda r: answers.append(r) if "/healthz" in r.url else None)
        chart.page.add_init_script(RECORD_BADGE)
        chart.open(ADA)
        chart.wait_live()
        # the replay is paused: the series is quiet, so the page asks for its source every
        # poll; each answer (its own series' connection) keeps the badge `live`
        while len(answers) < POLLS:
            chart.page.wait_for_event("response", timeout=WAIT_MS)
        assert all("series_id=" in r.url for r in answers), [r.url for r in answers]
        assert {r.json()["upstream"] for r in answers} == {"connected"}
        seen = chart.call("() => window.badgeSeen")
        assert seen and not [s for s in seen if "stale" in s or "waiting" in s], seen
        assert chart.call(f"() => {TC}.state()") == "live"
        assert chart.call(f"() => {TC}.badge()") == "live"
        # the futures series, whose connection is down, says so (the page does ask)
        chart.open(ETH)
        chart.wait_until(f"() => {TC}.badge() === 'waiting: Binance unreachable'")
        assert chart.console_errors == []
        chart.screenshot("chart-spot-live-futures-down")
