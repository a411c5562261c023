// The tradecanvas chart page (docs/chart.md). Plain script, no build step: it talks only to
// the origin it was served from — GET /api/market/series, /api/market/events and
// /api/market/candles, and the /ws/market WebSocket on the same port — and draws with the
// vendored TradingView lightweight-charts (window.LightweightCharts).
//
// One series is shown at a time. Its closed candles come from HTTP (the newest HISTORY_BARS,
// older pages when the chart is scrolled back) and then from /ws/market, subscribed with
// `since` = the newest closed candle_time held, so nothing is missed or doubled; the forming
// bar is drawn over the newest. Holes are shaded (a `gap` message, a stored `gap` event, or
// missing bars in what HTTP returned). A `factor.rebuild` reloads its range over HTTP. When
// the socket drops, the page reconnects with backoff and resubscribes with `since` and
// `events_after` (the last event_id received), and shows the connection state.
//
// window.tradecanvasChart exposes what the chart holds (for tests and the console): they read
// OHLC values, not pixels.
"use strict";

(() => {
  const LWC = window.LightweightCharts;
  const HISTORY_BARS = 1000; // loaded when a series is shown
  const PAGE_BARS = 1000; // one scroll-back page
  const MAX_LIMIT = 5000; // the API's largest `limit`
  const SCROLL_BACK_MARGIN = 20; // load older bars when fewer than this are left of the view
  const MAX_SHADED_PER_HOLE = 5000; // a hole wider than this is shaded at its start only
  // a series whose loading failed (the daemon down, say) is loaded again this often
  const RELOAD_RETRY_MS = 2000;
  // a live page whose series has had no market message for this long says so on the badge
  const STALE_AFTER_MS = 90_000;
  const FRESHNESS_CHECK_MS = 5_000;
  const BAR_SPACING = 6; // px a bar when a series is shown (lightweight-charts' default)
  const MAX_BAR_SPACING = 40; // a few bars fitted to the width are drawn at most this wide
  const SCROLL_MS = 400; // an animated scroll back to the newest bars
  const UNITS = { m: 60, h: 3600, d: 86400, w: 604800 };
  const COLORS = { up: "#26a69a", down: "#ef5350", gap: "rgba(255, 152, 0, 0.22)" };

  const $ = (id) => document.getElementById(id);
  // the user asked for less motion: no animated scrolling, no kinetic scroll after a swipe
  const reducedMotion = window.matchMedia("(prefers-reduced-motion: reduce)");

  // --- time frames ------------------------------------------------------------------------

  function parseTimeframe(text) {
    const m = /^(\d+)([mhdwM])$/.exec(text);
    if (!m) return null;
    return { text, count: Number(m[1]), unit: m[2] };
  }

  // seconds of a bar; months (`1M`) are calendar months, ordered as 31 days
  function timeframeSeconds(tf) {
    return tf.unit === "M" ? tf.count * 31 * 86400 : tf.count * UNITS[tf.unit];
  }

  // the open time of the bar after the one opening at `t`
  function nextOpen(t, tf) {
    if (tf.unit !== "M") return t + timeframeSeconds(tf);
    const d = new Date(t * 1000);
    return Date.UTC(d.getUTCFullYear(), d.getUTCMonth() + tf.count, 1) / 1000;
  }

  // --- what is shown ----------------------------------------------------------------------

  const view = {
    generation: 0, // bumped on every select(): answers for an older selection are dropped
    seriesId: null,
    timeframe: null,
    firstTime: null, // the oldest stored candle_time, from /api/market/series
    baseFirstTime: null, // the oldest stored minute of the series it is derived from
    bars: [], // ascending {time, open, high, low, close, volume}; the last may be forming
    lastClosed: null, // the newest closed candle_time held: the `since` cursor
    lastEventId: null, // the newest event_id received: the `events_after` cursor
    gapTimes: new Set(), // bar times shaded as holes
    ready: false, // history loaded; the subscription may be sent
    loadingOlder: null, // the pending scroll-back, if any
    rebuilds: [], // every factor.rebuild applied: {reason, from_time, to_time}
    errors: [], // `error` messages the daemon sent
  };
  let seriesList = [];

  const chart = LWC.createChart($("chart"), {
    autoSize: true,
    layout: {
      background: { type: "solid", color: "#131722" },
      textColor: "#d1d4dc",
      attributionLogo: false, // the footer carries the attribution (and the CSP stays strict)
    },
    grid: { vertLines: { color: "#1f2430" }, horzLines: { color: "#1f2430" } },
    timeScale: {
      timeVisible: true,
      secondsVisible: false,
      rightOffset: 5,
      barSpacing: BAR_SPACING,
      maxBarSpacing: MAX_BAR_SPACING,
    },
    crosshair: { mode: LWC.CrosshairMode.Normal },
    kineticScroll: { mouse: false, touch: !reducedMotion.matches },
    // a vertical swipe on the chart scrolls the page (a phone's short screen), not the prices
    handleScroll: { vertTouchDrag: false },
  });
  // a full-height column behind each missing (or incomplete) bar
  const gapSeries = chart.addSeries(LWC.HistogramSeries, {
    priceScaleId: "gaps",
    color: COLORS.gap,
    lastValueVisible: false,
    priceLineVisible: false,
    base: 0,
  });
  chart.priceScale("gaps").applyOptions({ visible: false, scaleMargins: { top: 0, bottom: 0 } });
  const volumeSeries = chart.addSeries(LWC.HistogramSeries, {
    priceScaleId: "volume",
    priceFormat: { type: "volume" },
    lastValueVisible: false,
    priceLineVisible: false,
  });
  chart.priceScale("volume").applyOptions({ scaleMargins: { top: 0.8, bottom: 0 } });
  const candleSeries = chart.addSeries(LWC.CandlestickSeries, {
    upColor: COLORS.up,
    downColor: COLORS.down,
    borderVisible: false,
    wickUpColor: COLORS.up,
    wickDownColor: COLORS.down,
  });
  candleSeries.priceScale().applyOptions({ scaleMargins: { top: 0.08, bottom: 0.25 } });
  reducedMotion.addEventListener("change", () => {
    chart.applyOptions({ kineticScroll: { mouse: false, touch: !reducedMotion.matches } });
  });

  const toBar = (c) => ({
    time: c.candle_time,
    open: c.open,
    high: c.high,
    low: c.low,
    close: c.close,
    volume: c.volume,
  });
  const candlePoint = (b) => ({ time: b.time, open: b.open, high: b.high, low: b.low, close: b.close });
  const volumePoint = (b) => ({
    time: b.time,
    value: b.volume,
    color: b.close >= b.open ? "rgba(38, 166, 154, 0.45)" : "rgba(239, 83, 80, 0.45)",
  });

  // the time slots between held bars that have no bar (fixed-length frames only: a month's
  // length varies, and its holes come from `gap` messages and events)
  function holesInBars() {
    const found = [];
    if (view.timeframe.unit === "M") return found;
    const step = timeframeSeconds(view.timeframe);
    for (let i = 1; i < view.bars.length; i++) {
      let t = view.bars[i - 1].time + step;
      for (let n = 0; t < view.bars[i].time && n < MAX_SHADED_PER_HOLE; n++, t += step) found.push(t);
    }
    return found;
  }

  // the HTTP read marks a derived bar with minutes missing (`complete: false`): shaded as
  // the `gap` event of it would be — that event may be pruned from the log by now — and a
  // bar read back complete (a hole filled by a repair or an import) is shaded no more
  function markCompleteness(candles) {
    for (const c of candles) {
      if (c.complete === false) view.gapTimes.add(c.candle_time);
      else view.gapTimes.delete(c.candle_time);
    }
  }

  function shade(from, toExclusive) {
    let t = from;
    for (let n = 0; t < toExclusive && n < MAX_SHADED_PER_HOLE; n++, t = nextOpen(t, view.timeframe)) {
      view.gapTimes.add(t);
    }
  }

  // the shaded times (each a point of the time scale too); returned for loadOlder
  function renderGaps() {
    const oldest = view.bars.length ? view.bars[0].time : Infinity;
    const times = [...view.gapTimes, ...holesInBars()].filter((t) => t >= oldest);
    const unique = [...new Set(times)].sort((a, b) => a - b);
    gapSeries.setData(unique.map((time) => ({ time, value: 1 })));
    return unique;
  }

  function render() {
    candleSeries.setData(view.bars.map(candlePoint));
    volumeSeries.setData(view.bars.map(volumePoint));
    const gaps = renderGaps();
    showLegend(hovered);
    placeCrosshair();
    return gaps;
  }

  // a candle from the socket: appended, or replacing the newest bar; an older one (never
  // sent by the daemon: its cursor only moves forward) replaces in place
  function upsert(bar) {
    const bars = view.bars;
    const last = bars.length ? bars[bars.length - 1] : null;
    let newHole = false;
    if (last === null || bar.time > last.time) {
      newHole = last !== null && bar.time > nextOpen(last.time, view.timeframe);
      bars.push(bar);
    } else if (bar.time === last.time) {
      bars[bars.length - 1] = bar;
    } else {
      const i = bars.findIndex((b) => b.time >= bar.time);
      bars.splice(i, bars[i].time === bar.time ? 1 : 0, bar);
      render();
      return;
    }
    candleSeries.update(candlePoint(bar));
    volumeSeries.update(volumePoint(bar));
    if (newHole) renderGaps();
    showLegend(hovered);
    placeCrosshair();
  }

  // A forming bar the daemon went past without closing it was never stored — a derived
  // bucket that began before the stored history, a minute Binance does not have — and a
  // reload would not show it: dropped (the daemon sends a bar's close before any later bar)
  function dropUnclosedBefore(time) {
    const last = view.bars[view.bars.length - 1];
    if (!last || last.time >= time || (view.lastClosed !== null && last.time <= view.lastClosed)) {
      return false;
    }
    view.bars.pop();
    view.gapTimes.delete(last.time);
    return true;
  }

  function applyClosed(candle) {
    if (view.lastClosed !== null && candle.candle_time <= view.lastClosed) return;
    const dropped = dropUnclosedBefore(candle.candle_time);
    view.lastClosed = candle.candle_time;
    upsert(toBar(candle));
    if (dropped) render();
  }

  function applyForming(candle) {
    if (view.lastClosed !== null && candle.candle_time <= view.lastClosed) return;
    const dropped = dropUnclosedBefore(candle.candle_time);
    // a derived bucket that began before the first stored minute is built from part of it
    if (view.baseFirstTime !== null && candle.candle_time < view.baseFirstTime) {
      view.gapTimes.add(candle.candle_time);
    }
    upsert(toBar(candle));
    if (dropped || view.gapTimes.has(candle.candle_time)) render();
  }

  // --- the legend and the notice ----------------------------------------------------------

  const fmt = (x) => (Math.abs(x) >= 1 ? x.toFixed(2) : x.toPrecision(4));

  const utc = (time) => new Date(time * 1000).toISOString().replace("T", " ").slice(0, 16);

  const FIELDS = [["open", "O"], ["high", "H"], ["low", "L"], ["close", "C"], ["volume", "V"]];

  // The legend for the point at `time` (null: the newest bar), in groups that never break
  // inside (a label stays with its value on a narrow screen); the chart's time scale holds
  // the bars' times and the shaded holes', so a time without a bar is a hole. A group is a
  // list of parts: a text, or a label {word, abbr}, shown as its letter (its word a tooltip)
  // and read by a screen reader as its word. The timeframe comes first: the button pressed
  // may not look pressed (forced colours).
  function legendGroups(time) {
    const bar =
      time === null
        ? view.bars[view.bars.length - 1]
        : view.bars.find((b) => b.time === time);
    if (!view.seriesId) return [];
    if (!bar && (time === null || view.bars.length === 0)) {
      // what it waits for, when /readyz said its source does not deliver (freshness, below)
      const lost = SOURCE_NOTE[fresh.source];
      return [[`${view.seriesId} — no candles yet${lost ? `; ${lost.empty}` : ""}`]];
    }
    const groups = [[{ word: "timeframe", abbr: null }, view.timeframe.text]];
    if (!bar) return [...groups, [`${utc(time)} UTC`], ["no candle: a hole in the series"]];
    groups.push([`${utc(bar.time)} UTC`]);
    for (const [word, abbr] of FIELDS) groups.push([{ word, abbr }, fmt(bar[word])]);
    // a bar shaded as a hole is a derived bar some of whose minutes do not exist
    if (view.gapTimes.has(bar.time)) groups.push(["· incomplete: some of its minutes are missing"]);
    if (bar === view.bars[0] && view.firstTime !== null && bar.time <= view.firstTime) {
      groups.push(["· the first stored bar"]);
    }
    return groups;
  }

  // the legend's text as its element holds it (each label's word, then its letter)
  const legendText = (time) =>
    legendGroups(time)
      .map((parts) =>
        parts
          .map((p) => (typeof p === "string" ? p : `${p.word} ${p.abbr ? `${p.abbr} ` : ""}`))
          .join(""),
      )
      .join("  ");

  // the legend in words, as a screen reader is told it
  const spokenText = (time) =>
    legendGroups(time)
      .map((parts) => parts.map((p) => (typeof p === "string" ? p : `${p.word} `)).join(""))
      .join(", ");

  function legendGroup(parts) {
    const group = document.createElement("span");
    for (const part of parts) {
      if (typeof part === "string") {
        group.append(part);
        continue;
      }
      const word = document.createElement("span");
      word.className = "visually-hidden";
      word.textContent = `${part.word} `;
      group.append(word);
      if (part.abbr) {
        const abbr = document.createElement("abbr");
        abbr.title = part.word;
        abbr.setAttribute("aria-hidden", "true");
        abbr.textContent = part.abbr;
        group.append(abbr, " ");
      }
    }
    return group;
  }

  function showLegend(time) {
    const el = $("legend");
    if (el.textContent === legendText(time)) return;
    // the double spaces between the groups are for textContent: the CSS sets them apart
    el.replaceChildren(
      ...legendGroups(time).flatMap((parts, i) => (i === 0 ? [] : ["  "]).concat(legendGroup(parts))),
    );
  }

  // a live region's text, left alone when it says the same (a rewrite may be announced again)
  function say(el, text) {
    if (el.textContent !== text) el.textContent = text;
  }

  // the tab's title: the newest close, then the series
  function showTitle() {
    const last = view.bars[view.bars.length - 1];
    document.title = `${last ? fmt(last.close) + " · " : ""}${view.seriesId} — tradecanvas`;
  }

  // a series just loaded: its newest bars at the usual spacing, or, when they don't fill
  // the width at it (a 1d series of a few days), all of them fitted to it
  function showNewest() {
    const scale = chart.timeScale();
    scale.applyOptions({ barSpacing: BAR_SPACING });
    if (view.bars.length * BAR_SPACING < scale.width()) scale.fitContent();
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
  // the pointer rests, live bars move the bars under it: the crosshair moves without a
  // `sourceEvent`, and the legend stays on the bar the pointer chose. A finger lifted ends
  // the reading: the crosshair goes (the library would leave it where the finger was) and
  // the legend shows the newest bar again, as when the mouse leaves.
  let hovered = null;
  let touching = false; // a finger (or pen) is down on the chart
  let keyed = false; // `hovered` was chosen from the keyboard (keyboard.js)
  chart.subscribeCrosshairMove((param) => {
    const moved = param.sourceEvent !== undefined; // by the pointer, not by new bars
    if (!moved && hovered !== null && (touching || keyed || param.time !== undefined)) return;
    if (moved) keyed = false;
    hovered = param.time === undefined ? null : param.time;
    showLegend(hovered);
  });
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
    chart.clearCrosshairPosition();
    hovered = null;
    showLegend(null);
  };
  $("chart").addEventListener("pointerup", lifted);
  $("chart").addEventListener("pointercancel", lifted);

  // `kind` "socket": the notice of a socket that cannot connect, cleared when one opens
  let noticeKind = null;
  // (a live region: always there, empty when there is nothing to say)
  function notice(text, kind = "page") {
    say($("notice"), text || "");
    noticeKind = text ? kind : null;
  }

  // the keyboard's reading (keyboard.js): the legend, the crosshair, and the reading in words
  // for a screen reader
  function readFromKeys(time) {
    cancelAnimationFrame(scrolling);
    keyed = true;
    hovered = time;
    showLegend(time);
    placeCrosshair();
    say($("reading"), spokenText(time));
  }

  function backToNewest() {
    keyed = false;
    hovered = null;
    chart.clearCrosshairPosition();
    showLegend(null);
    scrollToNewest();
    say($("reading"), view.bars.length ? `newest bar, ${spokenText(null)}` : "");
  }

  // the crosshair on the point read from the keyboard (again after new bars moved the view)
  function placeCrosshair() {
    if (!keyed || hovered === null) return;
    const bar = view.bars.find((b) => b.time === hovered);
    if (bar) chart.setCrosshairPosition(bar.close, hovered, candleSeries);
    else if (gapSeries.data().some((p) => p.time === hovered)) {
      chart.setCrosshairPosition(0.5, hovered, gapSeries); // a hole's slot: its shaded column
    }
  }

  // the time scale's points, ascending: the bars' times and the shaded holes'
  const timePoints = () =>
    [...new Set([...view.bars.map((b) => b.time), ...gapSeries.data().map((p) => p.time)])].sort(
      (a, b) => a - b,
    );

  // --- HTTP -------------------------------------------------------------------------------

  async function getJSON(path) {
    const response = await fetch(path, { headers: { Accept: "application/json" } });
    const body = await response.json();
    if (!response.ok) throw new Error(`${path}: ${response.status} ${body.message || body.error}`);
    return body;
  }

  const candlesUrl = (sid, since, limit, before = null) =>
    `/api/market/candles?series_id=${encodeURIComponent(sid)}&limit=${limit}` +
    (since === null ? "" : `&since=${since}`) +
    (before === null ? "" : `&before=${before}`);

  // closed candles with from <= candle_time <= to, over as many pages as it takes
  async function candlesBetween(sid, from, to) {
    const found = [];
    let since = from - 1;
    for (;;) {
      const page = (await getJSON(candlesUrl(sid, since, MAX_LIMIT))).candles;
      for (const c of page) if (c.candle_time <= to) found.push(c);
      if (page.length < MAX_LIMIT || page[page.length - 1].candle_time >= to) return found;
      since = page[page.length - 1].candle_time;
    }
  }

  async function refreshSeriesList() {
    seriesList = (await getJSON("/api/market/series")).series;
    const shown = seriesList.find((s) => s.series_id === view.seriesId);
    if (shown) view.firstTime = shown.first_time;
  }

  // --- choosing a series ------------------------------------------------------------------

  // a base series in the menu: the symbol first (a narrow menu cuts the end off), then the
  // market, and the exchange when the daemon serves more than one
  function seriesLabel(base, exchanges) {
    const parts = base.split(":");
    if (parts.length < 4) return base;
    const [exchange, market] = parts;
    const symbol = parts.slice(2, -1).join(":");
    return `${symbol} · ${market}${exchanges > 1 ? ` · ${exchange}` : ""}`;
  }

  // the series menu and the timeframe buttons: updated in place when they stand for the same
  // series (a rebuilt button would take the keyboard's focus with it)
  function fillPickers() {
    const picker = $("series");
    const bases = [...new Set(seriesList.map((s) => s.base_series_id))];
    const exchanges = new Set(bases.map((b) => b.split(":")[0])).size;
    const current = seriesList.find((s) => s.series_id === view.seriesId);
    const chosenBase = current !== undefined ? current.base_series_id : null;
    if ([...picker.options].map((o) => o.value).join("\n") !== bases.join("\n")) {
      picker.replaceChildren(...bases.map((base) => new Option(seriesLabel(base, exchanges), base)));
    }
    for (const option of picker.options) {
      option.textContent = seriesLabel(option.value, exchanges);
      option.selected = option.value === chosenBase;
    }
    const frames = seriesList
      .filter((s) => s.base_series_id === chosenBase)
      .sort((a, b) => timeframeSeconds(parseTimeframe(a.timeframe)) - timeframeSeconds(parseTimeframe(b.timeframe)));
    const box = $("timeframes");
    const held = [...box.children];
    const same = held.map((b) => b.dataset.seriesId).join("\n") === frames.map((s) => s.series_id).join("\n");
    if (!same) {
      // another base series: its buttons; the focus, when on a button, on the same timeframe
      const focused = held.includes(document.activeElement)
        ? document.activeElement.textContent
        : null;
      box.replaceChildren(
        ...frames.map((s) => {
          const button = document.createElement("button");
          button.type = "button";
          button.textContent = s.timeframe;
          button.dataset.seriesId = s.series_id;
          button.addEventListener("click", () => select(s.series_id));
          return button;
        }),
      );
      const again = [...box.children].find((b) => b.textContent === focused);
      if (again) again.focus();
    }
    for (const button of box.children) {
      const pressed = String(button.dataset.seriesId === view.seriesId);
      if (button.getAttribute("aria-pressed") !== pressed) button.setAttribute("aria-pressed", pressed);
    }
  }

  $("series").addEventListener("change", (event) => {
    const base = event.target.value;
    const tf = view.timeframe ? view.timeframe.text : null;
    const same = seriesList.find((s) => s.base_series_id === base && s.timeframe === tf);
    select(same ? same.series_id : base);
  });

  async function select(seriesId) {
    const generation = ++view.generation;
    const entry = seriesList.find((s) => s.series_id === seriesId);
    if (!entry) {
      notice(`${seriesId} is not served by this daemon`);
      return;
    }
    if (view.ready && view.seriesId !== seriesId) {
      link.send({ type: "unsubscribe", series_id: view.seriesId }); // subscribed once ready
    }
    const base = seriesList.find((s) => s.series_id === entry.base_series_id);
    Object.assign(view, {
      seriesId,
      timeframe: parseTimeframe(entry.timeframe),
      firstTime: entry.first_time,
      baseFirstTime: base && base.series_id !== seriesId ? base.first_time : null,
      bars: [],
      lastClosed: null,
      lastEventId: null,
      gapTimes: new Set(),
      ready: false,
      loadingOlder: null,
      rebuilds: [],
      errors: [],
    });
    // a reading of the series shown before means nothing now
    hovered = null;
    keyed = false;
    chart.clearCrosshairPosition();
    const url = new URL(location.href);
    url.searchParams.set("series", seriesId);
    history.replaceState(null, "", url);
    showTitle();
    fillPickers();
    render();
    if (link.isOpen()) setState("syncing");
    fresh.askOnCatchUp = true; // its first catch-up asks /readyz
    try {
      // the event log first: its cursor, and the holes it recorded (events after the cursor
      // come over the socket, subscribed with events_after)
      let after = 0;
      for (;;) {
        const page = await getJSON(
          `/api/market/events?series_id=${encodeURIComponent(seriesId)}&after=${after}&limit=${MAX_LIMIT}`,
        );
        if (generation !== view.generation) return;
        for (const event of page.events) noteEvent(event);
        after = page.next_after;
        if (!page.more) break;
      }
      view.lastEventId = after;
      const loaded = (await getJSON(candlesUrl(seriesId, null, HISTORY_BARS))).candles;
      if (generation !== view.generation) return;
      view.bars = loaded.map(toBar);
      markCompleteness(loaded);
      view.lastClosed = loaded.length ? loaded[loaded.length - 1].candle_time : null;
    } catch (error) {
      if (generation !== view.generation) return;
      notice(`loading ${seriesId} failed: ${error.message}; trying again`);
      // the daemon may be restarting: load it again until it answers or another is chosen
      setTimeout(() => {
        if (generation === view.generation) select(seriesId);
      }, RELOAD_RETRY_MS);
      return;
    }
    notice("");
    render();
    showNewest();
    showTitle();
    view.ready = true;
    subscribe();
  }

  // older bars when the chart is scrolled back to the oldest one held
  async function loadOlder() {
    if (view.loadingOlder) return view.loadingOlder;
    if (!view.ready || view.bars.length === 0) return;
    const generation = view.generation;
    const run = async () => {
      await refreshSeriesList();
      if (view.firstTime === null || view.bars[0].time <= view.firstTime) return;
      // the PAGE_BARS stored before the oldest held, across any hole, in one request
      const held = view.bars[0].time;
      const page = (await getJSON(candlesUrl(view.seriesId, null, PAGE_BARS, held))).candles;
      if (generation !== view.generation || view.bars.length === 0) return;
      const older = page.filter((c) => c.candle_time < view.bars[0].time);
      if (older.length === 0) return;
      const range = chart.timeScale().getVisibleLogicalRange();
      view.bars = [...older.map(toBar), ...view.bars];
      markCompleteness(older);
      const gaps = render();
      if (range) {
        // the points now before the bars held: the older bars and the shaded hole slots
        // among them (each a point of the time scale), so the bars in view stay put
        const added = new Set([...older.map((c) => c.candle_time), ...gaps.filter((t) => t < held)]).size;
        chart.timeScale().setVisibleLogicalRange({ from: range.from + added, to: range.to + added });
      }
    };
    view.loadingOlder = run()
      .catch((error) => notice(`loading older candles failed: ${error.message}`))
      .finally(() => {
        if (generation === view.generation) view.loadingOlder = null;
      });
    return view.loadingOlder;
  }
  chart.timeScale().subscribeVisibleLogicalRangeChange((range) => {
    if (range && range.from < SCROLL_BACK_MARGIN) loadOlder();
  });

  // --- events -----------------------------------------------------------------------------

  // an event of the log (stored or live): remember its id, shade what it says is missing
  function noteEvent(event) {
    if (typeof event.event_id === "number") {
      view.lastEventId = Math.max(view.lastEventId || 0, event.event_id);
    }
    if (event.event === "gap" && event.data) {
      shade(event.data.from_time, nextOpen(event.data.to_time, view.timeframe));
    }
  }

  // factor.rebuild: the stored history in [from_time, to_time] changed; reload the part held
  async function rebuild(data) {
    const generation = view.generation;
    view.rebuilds.push({ reason: data.reason, from_time: data.from_time, to_time: data.to_time });
    if (view.bars.length === 0) {
      // nothing on screen yet (an import into an empty series): load the newest bars, as
      // select() does; bars that arrived live meanwhile are newer and win
      let loaded;
      try {
        loaded = (await getJSON(candlesUrl(view.seriesId, null, HISTORY_BARS))).candles;
      } catch (error) {
        notice(`reloading after factor.rebuild failed: ${error.message}`);
        return;
      }
      if (generation !== view.generation) return;
      markCompleteness(loaded);
      const byTime = new Map(loaded.map((c) => [c.candle_time, toBar(c)]));
      for (const bar of view.bars) byTime.set(bar.time, bar);
      view.bars = [...byTime.values()].sort((a, b) => a.time - b.time);
      if (loaded.length && (view.lastClosed === null || view.lastClosed < loaded[loaded.length - 1].candle_time)) {
        view.lastClosed = loaded[loaded.length - 1].candle_time;
      }
      render();
      showNewest();
      return;
    }
    if (data.to_time < view.bars[0].time) return;
    const from = Math.max(data.from_time, view.bars[0].time);
    let read;
    try {
      read = await candlesBetween(view.seriesId, from, data.to_time);
    } catch (error) {
      notice(`reloading after factor.rebuild failed: ${error.message}`);
      return;
    }
    if (generation !== view.generation) return;
    markCompleteness(read);
    const fresh = read.map(toBar);
    const kept = view.bars.filter((b) => b.time < from || b.time > data.to_time);
    view.bars = [...kept, ...fresh].sort((a, b) => a.time - b.time);
    render();
  }

  // --- the socket -------------------------------------------------------------------------

  // connecting, syncing, live, reconnecting or offline (connection.js says which)
  let connState = "connecting";

  // the badge: the connection's state, or `stale` while it is live but no market data came
  function setState(state, detail) {
    connState = state;
    showBadge(state, detail);
  }

  // what each state means, for the badge's title and the line a tap on it shows
  const EXPLAIN = {
    connecting: "Opening the stream from the daemon.",
    syncing: "Connected; catching up with what the daemon sent meanwhile.",
    live: "Connected and up to date.",
    reconnecting: "The stream dropped: the page reconnects and goes on where it stopped.",
    offline: "This device has no network: the page reconnects when it is back.",
    waiting: "Connected; the series has no candles yet and its source does not deliver.",
  };

  // The badge shows the state and its detail (an age, a retry's count and delay) and tells a
  // screen reader the state only when it changes: the badge is a button (its name the state,
  // the detail aria-hidden: it changes every few seconds), and #announce, a live region, is
  // written only when the state (or `note`, what is known of the source) changes. Nothing is
  // rewritten that says the same.
  // `cause`: the detail is a cause, put first after a colon (a long text is cut at its end)
  function showBadge(shown, detail, why = EXPLAIN[shown], note = "", cause = false) {
    const el = $("state");
    if (el.dataset.state !== shown) el.dataset.state = shown;
    const rest = detail ? (cause ? `: ${detail}` : ` (${detail})`) : "";
    if (el.textContent !== shown + rest) {
      let [word, more] = el.children;
      if (el.children.length !== 2 || el.childNodes.length !== 2) {
        word = document.createElement("span");
        more = document.createElement("span");
        more.setAttribute("aria-hidden", "true");
        el.replaceChildren(word, more);
      }
      if (word.textContent !== shown) word.textContent = shown;
      if (more.textContent !== rest) more.textContent = rest;
    }
    if (el.title !== (why || "")) el.title = why || "";
    const spoken = `connection: ${shown}${note}`;
    if (el.getAttribute("aria-label") !== spoken) el.setAttribute("aria-label", spoken);
    say($("announce"), spoken);
    if (!$("why").hidden) explainBadge();
  }

  // a tap or a click on the badge (its title is a hover tooltip, which a phone cannot show)
  // opens a line with its whole text and what it means; another, or Escape, closes it
  function explainBadge() {
    const el = $("state");
    say($("why"), `${el.textContent}: ${el.title}`);
  }
  function toggleExplanation(open = $("why").hidden) {
    $("why").hidden = !open;
    $("state").setAttribute("aria-expanded", String(open));
    if (open) explainBadge();
  }
  $("state").addEventListener("click", () => toggleExplanation());
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !$("why").hidden) toggleExplanation(false);
  });

  // --- freshness --------------------------------------------------------------------------

  // Binance closes a bar every minute and sends a forming update every few seconds while
  // there are trades, so a live series with no market message for STALE_AFTER_MS is a quiet
  // market or a daemon that lost the exchange: the badge says `stale` with the age, and
  // with what /readyz says of Binance: the daemon's own upstream check, or on an edge (no
  // Binance connection of its own) what the ingest node holding the lease reports, null
  // there when no ingest node runs. Times are the page's clock since the last message
  // (history may be replayed: the bars' own times say nothing of now).
  // The page also asks /readyz when a series is shown (its first catch-up) and every
  // FRESHNESS_CHECK_MS while the series has no candles, so an empty chart or one the source
  // will not add to says why at once (`waiting` / `stale: Binance unreachable`) instead of
  // a green `live` for STALE_AFTER_MS; and while the source is known lost, to see it back.
  // fromCatchUp: the sync ping awaited is a new subscription's (its catch-up resets the age)
  // askOnCatchUp: a series was just shown (its first catch-up asks /readyz)
  const fresh = {
    at: Date.now(),
    source: null,
    asking: false,
    fromCatchUp: false,
    askOnCatchUp: false,
  };
  // a source that does not deliver: the badge's cause (put first: a long text is cut at its
  // end), what its title adds, and what an empty chart's legend says
  const SOURCE_NOTE = {
    lost: {
      cause: "Binance unreachable",
      why: "The daemon is not connected to Binance (/readyz: upstream_connected false).",
      empty: "waiting for Binance: not connected (see /readyz)",
    },
    no_ingest: {
      cause: "no ingest node running",
      why: "This edge hears from no ingest node: none holds the lease (/readyz: ingest null).",
      empty: "waiting for an ingest node: none is running (see /readyz)",
    },
  };

  // "connected", "lost", "no_ingest", or null when /readyz does not say
  function sourceOf(body) {
    const checks = (body && body.checks) || {};
    let connected = checks.upstream_connected;
    if (typeof connected !== "boolean" && body && "ingest" in body) {
      if (body.ingest === null) return "no_ingest";
      connected = body.ingest.upstream_connected;
    }
    return typeof connected === "boolean" ? (connected ? "connected" : "lost") : null;
  }

  // a market message: the source delivers (whatever /readyz said last), and it is fresh
  function marketMessage() {
    fresh.at = Date.now();
    if (fresh.source !== "connected") fresh.source = null;
    const shown = $("state").dataset.state;
    if (connState === "live" && (shown === "stale" || shown === "waiting")) showBadge("live");
  }

  function duration(ms) {
    const s = Math.floor(ms / 1000);
    if (s < 60) return `${s} s`;
    const m = Math.floor(s / 60);
    return m < 60 ? `${m} min ${s % 60} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
  }

  async function askUpstream() {
    if (fresh.asking) return;
    fresh.asking = true;
    try {
      // 503 while a check fails: its body still lists the checks
      fresh.source = sourceOf(await (await fetch("/readyz", { cache: "no-store" })).json());
    } catch (error) {
      fresh.source = null;
    } finally {
      fresh.asking = false;
    }
    if (view.bars.length === 0) showLegend(hovered); // an empty chart says what it waits for
    checkFreshness(false);
  }

  function checkFreshness(ask = true) {
    if (connState !== "live") return;
    const age = Date.now() - fresh.at;
    const quiet = age >= STALE_AFTER_MS;
    const empty = view.bars.length === 0;
    const lost = SOURCE_NOTE[fresh.source];
    if (ask && (quiet || empty || lost)) askUpstream();
    if (lost) {
      // nothing will come: said at once, the cause first, the age once it is stale
      const what = empty ? "This series has no candles yet; none" : "No new candle";
      showBadge(
        empty ? "waiting" : "stale",
        quiet ? `${lost.cause} · ${duration(age)}` : lost.cause,
        `${lost.why} ${what} will come until that changes.`,
        `; ${lost.cause}`,
        true,
      );
      return;
    }
    if (!quiet) {
      const shown = $("state").dataset.state;
      if (shown === "stale" || shown === "waiting") showBadge("live");
      return;
    }
    // the age is in the badge's text only (its title is its description: no counting there)
    showBadge(
      "stale",
      `no data for ${duration(age)}`,
      `No market message for this series for ${STALE_AFTER_MS / 1000} s or more. The` +
        " connection answers: a quiet market, or the daemon's source is down (see /readyz).",
    );
  }
  setInterval(checkFreshness, FRESHNESS_CHECK_MS);

  // (re)subscribe the shown series from the cursors held, then a `sync` ping: the daemon
  // answers in order, so its pong means the catch-up is in
  function subscribe() {
    if (!view.ready) return;
    const subscribed = link.send({
      type: "subscribe",
      series_id: view.seriesId,
      since: view.lastClosed,
      events_after: view.lastEventId,
      supports_batch: true,
    });
    if (subscribed && link.sync()) fresh.fromCatchUp = true;
  }

  // the last `sync` ping answered: everything sent before it is in
  function caughtUp() {
    // a new subscription's age counts from now; after a check of a sleeping page's
    // connection, from the last market message still
    if (fresh.fromCatchUp) fresh.at = Date.now();
    fresh.fromCatchUp = false;
    setState("live");
    checkFreshness();
    // a series just shown: is its source delivering? (an empty chart asked already)
    if (fresh.askOnCatchUp) askUpstream();
    fresh.askOnCatchUp = false;
  }

  function handle(message) {
    if (message.type === "error") {
      view.errors.push(message);
      notice(`the daemon refused a message: ${message.code}: ${message.message}`);
      // a message it ignored may be a subscribe or a ping: start again from the cursors
      if (message.code === "rate_limited") link.restart("resync");
      return;
    }
    if (message.series_id !== view.seriesId || !view.ready) return;
    switch (message.type) {
      case "candles_batch":
        for (const candle of message.candles) applyClosed(candle);
        marketMessage();
        break;
      case "candle_closed":
        applyClosed(message.candle);
        marketMessage();
        break;
      case "candle_forming":
        applyForming(message.candle);
        marketMessage();
        break;
      case "gap":
        shade(message.expected_next_time, message.actual_time);
        renderGaps();
        break;
      case "system":
        noteEvent(message);
        if (message.event === "factor.rebuild") rebuild(message.data);
        else if (message.event === "gap") renderGaps();
        break;
      case "events_truncated":
        select(view.seriesId); // events were lost: reload the series
        break;
      default:
        break;
    }
    showTitle();
  }

  const link = window.tradecanvasConnect({
    opened: subscribe,
    message: handle,
    caughtUp,
    state: setState,
    live: () => connState === "live",
    // the socket's notice (cannot connect), cleared when one opens: only its own
    notice: (text) => {
      if (text) notice(text, "socket");
      else if (noticeKind === "socket") notice("");
    },
  });

  window.tradecanvasKeyboard($("chart"), {
    points: timePoints,
    reading: () => hovered,
    read: readFromKeys,
    newest: backToNewest,
    loadOlder,
    timeScale: () => chart.timeScale(),
  });

  // --- start ------------------------------------------------------------------------------

  window.tradecanvasChart = {
    chart, // the lightweight-charts API (scrolling, screenshots)
    seriesId: () => view.seriesId,
    // the bars held for `seriesId` (empty when another series is shown), ascending
    data: (seriesId) => (seriesId === view.seriesId ? view.bars.map((b) => ({ ...b })) : []),
    lastClosed: () => view.lastClosed,
    lastEventId: () => view.lastEventId,
    gaps: (seriesId) =>
      seriesId === view.seriesId ? gapSeries.data().map((p) => p.time) : [],
    rebuilds: () => view.rebuilds.map((r) => ({ ...r })),
    errors: () => view.errors.map((e) => ({ ...e })),
    // the badge's state: connecting, syncing, live, waiting (live, an empty series whose
    // source /readyz says is down), stale (live, no market data for STALE_AFTER_MS, or a
    // source /readyz says is down), reconnecting or offline; badge() its whole text
    state: () => $("state").dataset.state,
    badge: () => $("state").textContent,
    // the legend's text for the bar at `time` (omitted: the newest), and the notice shown
    legend: (time) => legendText(time === undefined ? null : time),
    notice: () => $("notice").textContent,
    ready: () => view.ready,
    // the times at the edges of the view ({from, to}), null before any bar
    visibleTimes: () => chart.timeScale().getVisibleRange(),
    select,
    loadOlder,
  };

  (async () => {
    try {
      await refreshSeriesList();
    } catch (error) {
      notice(`cannot read the series list: ${error.message}`);
      return;
    }
    const wanted = new URL(location.href).searchParams.get("series");
    const first = seriesList.find((s) => s.series_id === wanted) || seriesList[0];
    link.start();
    if (first) await select(first.series_id);
    else notice("this daemon serves no series");
    if (first && wanted !== null && wanted !== first.series_id) {
      notice(`${wanted} is not served by this daemon: showing ${first.series_id}`);
    }
  })();
})();
