"""The chart page for a keyboard, a screen reader, high contrast and a zoomed or narrow screen
(an accessibility review of the page, 2026-12-05; docs/chart.md, Keyboard and accessibility).
Headless Chromium against a real ``tradecanvas serve`` fed by ``tradecanvas replay`` of real
Binance candles; the keys are Playwright's key presses, the tests wait on the page's own state
(``window.tradecanvasChart``, the DOM), never on a sleep."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import attrs
import pytest
from playwright.sync_api import Browser

from tests.browser.rig import (
    BASE,
    FIVE,
    HISTORY,
    TC,
    WATCH,
    Bar,
    ChartPage,
    Market,
    chart_page,
    live_chart,
)

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

LEGEND: Final = "document.getElementById('legend').textContent"
NARROW: Final[dict[str, Any]] = {"viewport": {"width": 320, "height": 568}}
# the stale badge's age counts up without a heartbeat ping (whose pong a jumped clock would
# miss) and without a wake-up check (the timers run in order, never late)
NO_HEARTBEAT: Final = {"heartbeatMs": 3_600_000}


@contextmanager
def live(
    tmp_path: Path, browser: Browser, *replay_args: str, **device: Any
) -> Iterator[tuple[Market, ChartPage, list[Bar]]]:
    """The replayed day and its streamed half hour stored, and a page opened on BASE after
    that (the newest 1,000 bars from the store), live."""
    with live_chart(
        tmp_path,
        browser,
        *replay_args,
        newest=True,
        device=device,
    ) as (m, chart, bars):
        chart.open(BASE)
        chart.wait_live()
        yield m, chart, bars


def _reads(chart: ChartPage, time_: int | None) -> str:
    """Wait until the legend reads the point at ``time_`` (None: the newest bar); its text."""
    if time_ is None:
        return str(chart.wait_until(f"() => {LEGEND} === {TC}.legend() && {LEGEND}"))
    return str(chart.wait_until(f"(t) => {LEGEND} === {TC}.legend(t) && {LEGEND}", time_))


def _tab_to_chart(chart: ChartPage) -> None:
    for _ in range(12):
        chart.page.keyboard.press("Tab")
        if chart.call("() => document.activeElement.id") == "chart":
            return
    raise AssertionError("the chart is not in the tab order")


def test_the_chart_is_read_and_scrolled_back_from_the_keyboard(
    tmp_path: Path, browser: Browser
) -> None:
    hole_at, hole_len = HISTORY + 12, 5  # five minutes of the streamed half hour
    with live(tmp_path, browser, "--exchange-hole", f"{hole_at}:{hole_len}") as (m, chart, bars):
        missing = [b.time for b in bars[hole_at : hole_at + hole_len]]
        present = [b for b in bars if b.time not in missing]
        assert chart.bars(BASE) == present[-1000:]
        # the time scale's points: the bars held and the shaded slots of the hole
        points = sorted({b.time for b in present[-1000:]} | set(missing))
        el = chart.page.locator("#chart")
        assert el.get_attribute("aria-label") == "price chart"
        assert "legend" in (el.get_attribute("aria-describedby") or "").split()
        _tab_to_chart(chart)
        keys = chart.page.keyboard

        at = len(points) - 1  # the newest
        keys.press("ArrowLeft")
        at -= 1
        _reads(chart, points[at])
        bar = present[-2]
        assert f"close {bar.close:.1f}" in chart.call(
            "() => document.getElementById('reading').textContent"
        )
        # back over the newest bars to the hole: the legend says there is no candle there
        while points[at] != missing[-1]:
            keys.press("ArrowLeft")
            at -= 1
        assert _reads(chart, missing[-1]).endswith("no candle: a hole in the series")
        keys.press("ArrowRight")
        at += 1
        _reads(chart, points[at])
        # a live bar arrives: the legend stays on the bar chosen
        newer = attrs.evolve(bars[-1], time=bars[-1].time + 60, close=bars[-1].close + 1)
        m.ingest(BASE, newer)
        points.append(newer.time)
        chart.wait_until(f"(t) => {TC}.lastClosed() === t", newer.time)
        _reads(chart, points[at])

        # a screenful back and forward: the bars in view
        range_ = f"{TC}.chart.timeScale().getVisibleLogicalRange()"
        width = chart.call(f"() => {{ const r = {range_}; return Math.floor(r.to - r.from); }}")
        assert width > 50
        keys.press("PageUp")
        _reads(chart, points[at - width])
        keys.press("PageDown")
        _reads(chart, points[at])

        # Home: the oldest bar held; the view scrolled to it loads the page before, as a drag
        keys.press("Home")
        chart.wait_until(f"(n) => {TC}.data({BASE!r}).length === n", len(m.stored(BASE)))
        _reads(chart, points[0])
        keys.press("ArrowLeft")
        _reads(chart, present[-1001].time)
        keys.press("Home")
        assert _reads(chart, present[0].time).endswith("· the first stored bar")
        keys.press("ArrowLeft")  # nothing older: it stays
        keys.press("ArrowRight")
        _reads(chart, present[1].time)

        # Escape: the newest bar, the view on it and following the live bars again
        keys.press("Escape")
        _reads(chart, None)
        chart.wait_until(
            f"""(sid) => {{
              const n = new Set([...{TC}.data(sid).map((b) => b.time), ...{TC}.gaps(sid)]).size;
              return {range_}.to >= n - 1; }}""",
            BASE,
        )
        assert chart.call("() => document.getElementById('reading').textContent").startswith(
            "newest bar, "
        )
        keys.press("ArrowLeft")
        _reads(chart, points[-2])
        keys.press("End")
        _reads(chart, None)
        assert chart.console_errors == []


def test_a_timeframe_chosen_from_the_keyboard_keeps_the_focus(
    tmp_path: Path, browser: Browser
) -> None:
    with live(tmp_path, browser) as (_, chart, _):
        chart.page.get_by_role("button", name="5m", exact=True).focus()
        chart.page.keyboard.press("Enter")
        chart.wait_until(f"() => {TC}.seriesId() === {FIVE!r} && {TC}.ready()")
        focused = chart.call(
            "() => [document.activeElement.dataset.seriesId,"
            " document.activeElement.getAttribute('aria-pressed')]"
        )
        assert focused == [FIVE, "true"]
        # and on with the keyboard: Space on the next one
        chart.page.keyboard.press("Tab")
        chart.page.keyboard.press("Space")
        chart.wait_until(f"() => {TC}.seriesId().endsWith(':1h') && {TC}.ready()")
        assert chart.call("() => document.activeElement.textContent") == "1h"


def test_the_badge_tells_a_screen_reader_changes_of_state_only(
    tmp_path: Path, browser: Browser
) -> None:
    # the replay stays paused: no market data
    with live_chart(
        tmp_path,
        browser,
        streamed=False,
        clock=True,
        timing=NO_HEARTBEAT,
    ) as (m, chart, _):
        state = chart.page.locator("#state")
        # the badge is no live region: its text counts
        assert state.get_attribute("role") is None and state.get_attribute("aria-live") is None
        chart.call(WATCH)
        assert chart.call("() => document.getElementById('announce').getAttribute('role')") == (
            "status"
        )
        # live, and the freshness checks every 5 s find nothing new: nothing rewritten
        chart.page.clock.run_for(60_000)
        assert chart.call("() => [window.said, window.badgeChanges]") == [[], []]
        chart.page.clock.run_for(35_000)
        chart.wait_until(f"() => {TC}.state() === 'stale'")
        assert chart.call("() => window.said") == ["connection: stale"]
        assert state.get_attribute("aria-label") == "connection: stale"
        chart.call("() => { window.badgeChanges = []; }")
        # the age counts up on the badge, in its aria-hidden detail only; nothing said
        for _ in range(3):
            before = chart.call(f"() => {TC}.badge()")
            chart.page.clock.run_for(5_000)
            chart.wait_until(f"(b) => {TC}.badge() !== b", before)
        # 95 s, then three times 5 s more
        assert re.fullmatch(
            r"stale \(no data for 1 min [45]\d s\)", chart.call(f"() => {TC}.badge()")
        )
        changes = chart.call("() => window.badgeChanges")
        assert changes and all(changes), changes
        assert chart.call("() => window.said") == ["connection: stale"]
        assert "no data for" not in (state.get_attribute("title") or "")
        # market data again: said once
        m.resume_replay()
        chart.wait_until(f"() => {TC}.state() === 'live'")
        assert chart.call("() => window.said") == ["connection: stale", "connection: live"]


def test_the_badge_is_a_disclosure_button_that_escape_closes(
    tmp_path: Path, browser: Browser
) -> None:
    with live(tmp_path, browser) as (_, chart, _):
        badge = chart.page.get_by_role("button", name="connection: live")
        assert badge.get_attribute("aria-controls") == "why"
        assert badge.get_attribute("aria-expanded") == "false"
        why = chart.page.locator("#why")
        badge.focus()
        chart.page.keyboard.press("Enter")
        assert badge.get_attribute("aria-expanded") == "true" and why.is_visible()
        assert why.inner_text().startswith("live: Connected")
        chart.page.keyboard.press("Escape")
        assert badge.get_attribute("aria-expanded") == "false" and why.is_hidden()
        chart.page.keyboard.press("Space")
        assert why.is_visible()
        chart.page.keyboard.press("Space")
        assert why.is_hidden()


# the WCAG contrast ratio of each text against the background it is drawn on (the nearest
# ancestor's opaque one), from the computed styles
CONTRASTS: Final = """(selectors) => {
  const rgb = (s) => s.match(/[\\d.]+/g).map(Number);
  const lum = ([r, g, b]) => [r, g, b].map((c) => {
    c /= 255; return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
  }).reduce((sum, c, i) => sum + c * [0.2126, 0.7152, 0.0722][i], 0);
  const background = (el) => {
    for (; el; el = el.parentElement) {
      const c = rgb(getComputedStyle(el).backgroundColor);
      if (c.length < 4 || c[3] > 0) return c;
    }
    return [255, 255, 255];
  };
  const ratio = (el) => {
    const [a, b] = [lum(rgb(getComputedStyle(el).color)), lum(background(el))];
    return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
  };
  return Object.fromEntries(selectors.flatMap((s) =>
    [...document.querySelectorAll(s)].map((el, i) => [`${s} #${i}`, ratio(el)])));
}"""


def test_every_text_has_a_contrast_of_at_least_4_5(tmp_path: Path, browser: Browser) -> None:
    with live(tmp_path, browser) as (_, chart, _):
        chart.page.locator("#state").click()  # the explanation's line, shown
        chart.call("() => { document.getElementById('notice').textContent = 'a notice'; }")
        texts = [
            "#legend > span", "#why", "#notice", "footer", "footer a", "#timeframes button",
            "#series", "h1",
        ]  # fmt: skip
        ratios = chart.call(CONTRASTS, texts)
        for shown in (
            "connecting",
            "syncing",
            "live",
            "waiting",
            "stale",
            "reconnecting",
            "offline",
        ):
            chart.call("(s) => { document.getElementById('state').dataset.state = s; }", shown)
            ratios[f"badge {shown}"] = chart.call(CONTRASTS, ["#state"])["#state #0"]
        low = {where: round(r, 2) for where, r in ratios.items() if r < 4.5}
        assert low == {}, low
        assert len(ratios) > 15


def test_forced_colours_mark_the_chosen_timeframe(tmp_path: Path, browser: Browser) -> None:
    with live(tmp_path, browser, forced_colors="active") as (_, chart, _):
        assert chart.call("() => matchMedia('(forced-colors: active)').matches")
        looks = chart.call(
            """() => [...document.querySelectorAll('#timeframes button')].map((b) => {
              const s = getComputedStyle(b);
              return [b.getAttribute('aria-pressed'), [s.borderTopWidth, s.borderTopStyle,
                s.borderTopColor, s.outlineStyle, s.outlineWidth, s.textDecorationLine,
                s.fontWeight].join(' ')];
            })"""
        )
        pressed = [look for p, look in looks if p == "true"]
        others = {look for p, look in looks if p == "false"}
        assert len(pressed) == 1 and len(others) == 1 and pressed[0] not in others, looks
        # and the legend names it
        assert chart.call(f"() => {LEGEND}").startswith("timeframe 1m  ")


def test_a_narrow_screen_shows_the_symbol_first_and_keeps_a_heading(
    tmp_path: Path, browser: Browser
) -> None:
    with live(tmp_path, browser, **NARROW) as (_, chart, _):
        option = chart.page.locator("#series option:checked")
        assert option.get_attribute("value") == BASE
        assert option.text_content() == "BTC/USDT · futures"
        # the title is hidden from sight on a small screen, not from a screen reader
        heading = chart.page.get_by_role("heading", name="tradecanvas", level=1)
        assert heading.count() == 1
        assert chart.call("() => getComputedStyle(document.querySelector('h1')).display") != (
            "none"
        )


def test_the_legend_labels_the_notice_and_the_timeframes_for_assistive_technology(
    tmp_path: Path, browser: Browser
) -> None:
    with live(tmp_path, browser) as (_, chart, _):
        legend = chart.page.locator("#legend")
        # each letter is an abbreviation whose word a screen reader reads instead
        titles = legend.locator("abbr").evaluate_all(
            "(els) => els.map((e) => [e.textContent, e.title, e.getAttribute('aria-hidden')])"
        )
        assert [t[:2] for t in titles] == [
            ["O", "open"], ["H", "high"], ["L", "low"], ["C", "close"], ["V", "volume"]
        ]  # fmt: skip
        assert all(t[2] == "true" for t in titles)
        words = legend.locator(".visually-hidden").all_text_contents()
        assert words == ["timeframe ", "open ", "high ", "low ", "close ", "volume "]
        # the groups apart by a gap, not a space that collapses
        gaps = chart.call(
            """() => { const r = [...document.querySelectorAll('#legend > span')]
              .map((s) => s.getBoundingClientRect());
              return r.slice(1).filter((b, i) => b.top === r[i].top)
                .map((b, i) => b.left - r[i].right); }"""
        )
        assert len(gaps) >= 5 and min(gaps) >= 8, gaps
        # the notice: a live region inside a landmark
        notice = chart.page.locator("#notice")
        assert notice.get_attribute("aria-live") == "polite" or notice.get_attribute("role") in (
            "alert",
            "status",
        )
        assert chart.call("() => document.getElementById('notice').closest('main') !== null")
        # the timeframe buttons: a named group
        group = chart.page.get_by_role("group", name="timeframe")
        assert group.get_by_role("button").count() == 3


# End pressed with the view 300 bars back: the right edges of the view on the way to the
# newest bar, between where it was and where it arrives
SCROLLED_TO_THE_END: Final = """async () => {
  const scale = window.tradecanvasChart.chart.timeScale();
  scale.scrollToPosition(-300, false);
  await new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)));
  const start = scale.getVisibleLogicalRange().to;
  const n = window.tradecanvasChart.data(window.tradecanvasChart.seriesId()).length;
  const edges = [start];
  const arrived = new Promise((resolve) => scale.subscribeVisibleLogicalRangeChange((r) => {
    if (r.to > start + 1 && r.to < n - 1) edges.push(r.to);
    if (r.to >= n - 1) resolve();
  }));
  document.getElementById('chart').focus();
  document.getElementById('chart').dispatchEvent(new KeyboardEvent('keydown', {key: 'End'}));
  await arrived;
  return edges;
}"""


def test_reduced_motion_scrolls_at_once_and_without_kinetic_scroll(
    tmp_path: Path, browser: Browser
) -> None:
    with live(tmp_path, browser, reduced_motion="reduce", has_touch=True) as (m, chart, _):
        assert chart.call(f"() => {TC}.chart.options().kineticScroll.touch") is False
        # no animation: at the newest bars in one step
        edges = chart.call(SCROLLED_TO_THE_END)
        assert len(edges) == 1 and edges[0] < 800, edges
        # the same page for a user who did not ask for less motion: animated, kinetic
        with chart_page(browser, m.http_url, has_touch=True) as moving:
            moving.open(BASE)
            moving.wait_live()
            assert moving.call(f"() => {TC}.chart.options().kineticScroll.touch") is True
            edges = moving.call(SCROLLED_TO_THE_END)
            assert len(edges) >= 3 and edges[0] < 800, edges
