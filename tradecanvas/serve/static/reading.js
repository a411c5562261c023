// What the chart page reads and where its view is (docs/chart.md), loaded before chart.js:
// the bar under the cursor, a finger or chosen from the keyboard (keyboard.js), the
// crosshair on it, and the scroll back to the newest bars.
"use strict";

window.tradecanvasReading = (page) => {
  const $ = (id) => document.getElementById(id);
  const BAR_SPACING = 6; // px a bar when a series is shown (lightweight-charts' default)
  const SCROLL_MS = 400; // an animated scroll back to the newest bars
  const { chart, reducedMotion } = page;

  // a series just loaded: its newest bars at the usual spacing, or, when they don't fill
  // the width at it (a 1d series of a few days), all of them fitted to it
  function showNewest() {
    const scale = chart.timeScale();
    scale.applyOptions({ barSpacing: BAR_SPACING });
    if (page.view.bars.length * BAR_SPACING < scale.width()) scale.fitContent();
    else scrollToNewest();
  }

  // The newest bars in view, the view following the live bars again: scrolled there in
  // SCROLL_MS, or at once for a user who asked for less motion. (The library's own animated
  // scroll, scrollToRealTime, skips its last frame and can stop bars short of the edge.)
  let scrolling = 0; // the animation frame of a scroll under way
  function scrollToNewest() {
    const scale = chart.timeScale();
    const target = scale.options().rightOffset;
    const from = scale.scrollPosition();
    cancelAnimationFrame(scrolling);
    if (reducedMotion.matches || !(Math.abs(target - from) > 1)) {
      scale.scrollToPosition(target, false);
      return;
    }
    const start = performance.now();
    const step = (now) => {
      const t = Math.min(1, Math.max(0, now - start) / SCROLL_MS);
      scale.scrollToPosition(from + (target - from) * (1 - (1 - t) ** 3), false);
      if (t < 1) scrolling = requestAnimationFrame(step);
    };
    scrolling = requestAnimationFrame(step);
  }

  // The bar under the cursor or the finger (null: none, the legend shows the newest). While
  // the pointer rests, live bars move the bars under it: the library moves the crosshair
  // with them (a move without a `sourceEvent`), and the legend stays on the bar the pointer
  // chose — so the crosshair is put back on that bar, at the price the pointer was at: the
  // legend and the crosshair always name the same bar. A finger lifted ends the reading:
  // the crosshair goes (the library would leave it where the finger was) and the legend
  // shows the newest bar again, as when the mouse leaves.
  let hovered = null;
  let hoveredPrice = null; // the price at the pointer when it chose `hovered` (null: keys)
  let crosshairAt = null; // the time the crosshair is on (null: none shown)
  let touching = false; // a finger (or pen) is down on the chart
  let keyed = false; // `hovered` was chosen from the keyboard (keyboard.js)
  chart.subscribeCrosshairMove((param) => {
    crosshairAt = param.time === undefined ? null : param.time;
    const moved = param.sourceEvent !== undefined; // by the pointer, not by new bars
    if (!moved && hovered !== null && (touching || keyed || param.time !== undefined)) {
      if (param.time !== hovered) placeCrosshair(); // (its own move comes back on `hovered`)
      return;
    }
    if (moved) keyed = false;
    hovered = param.time === undefined ? null : param.time;
    hoveredPrice =
      hovered === null || !param.point ? null : page.candleSeries.coordinateToPrice(param.point.y);
    page.showLegend(hovered);
  });
  // (the library's clearCrosshairPosition reports no move)
  function clearCrosshair() {
    chart.clearCrosshairPosition();
    crosshairAt = null;
  }
  $("chart").addEventListener("pointerdown", (event) => {
    touching = event.pointerType !== "mouse";
    cancelAnimationFrame(scrolling); // the user's own drag wins
  });
  // the library blurs what has the focus when the chart is pressed: a click keeps the
  // chart's keys at hand (no focus ring: it was not the keyboard)
  $("chart").addEventListener("click", () => $("chart").focus({ preventScroll: true }));
  const lifted = (event) => {
    if (event.pointerType === "mouse") return;
    touching = false;
    keyed = false;
    clearCrosshair();
    hovered = null;
    page.showLegend(null);
  };
  $("chart").addEventListener("pointerup", lifted);
  $("chart").addEventListener("pointercancel", lifted);

  // the keyboard's reading (keyboard.js): the legend, the crosshair, and the reading in words
  // for a screen reader
  function readFromKeys(time) {
    cancelAnimationFrame(scrolling);
    keyed = true;
    hovered = time;
    hoveredPrice = null;
    page.showLegend(time);
    placeCrosshair();
    page.say($("reading"), page.spokenText(time));
  }

  function backToNewest() {
    keyed = false;
    hovered = null;
    clearCrosshair();
    page.showLegend(null);
    scrollToNewest();
    page.say($("reading"), page.view.bars.length ? `newest bar, ${page.spokenText(null)}` : "");
  }

  // the crosshair on the point read (again after new bars moved the view): at the pointer's
  // price for a pointer's reading, at the bar's close for the keys'
  function placeCrosshair() {
    if (hovered === null) return;
    const bar = page.view.bars.find((b) => b.time === hovered);
    if (bar) {
      const price = !keyed && hoveredPrice !== null ? hoveredPrice : bar.close;
      chart.setCrosshairPosition(price, hovered, page.candleSeries);
    } else if (page.gapSeries.data().some((p) => p.time === hovered)) {
      chart.setCrosshairPosition(0.5, hovered, page.gapSeries); // a hole's slot: its column
    }
  }

  // a reading of the series shown before means nothing now
  function forget() {
    hovered = null;
    keyed = false;
    clearCrosshair();
  }

  // the time scale's points, ascending: the bars' times and the shaded holes'
  const timePoints = () =>
    [
      ...new Set([...page.view.bars.map((b) => b.time), ...page.gapSeries.data().map((p) => p.time)]),
    ].sort((a, b) => a - b);

  window.tradecanvasKeyboard($("chart"), {
    points: timePoints,
    reading: () => hovered,
    read: readFromKeys,
    newest: backToNewest,
    loadOlder: () => page.loadOlder(),
    timeScale: () => chart.timeScale(),
  });

  return {
    showNewest,
    hovered: () => hovered,
    crosshairAt: () => crosshairAt,
    placeCrosshair,
    forget,
    BAR_SPACING,
  };
};
