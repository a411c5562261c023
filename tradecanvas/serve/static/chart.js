// The tradecanvas chart page (docs/chart.md). Plain scripts, no build step: it talks only to
// the origin it was served from — GET /api/market/series, /api/market/events,
// /api/market/candles and /healthz, and the /ws/market WebSocket on the same port — and
// draws with the vendored TradingView lightweight-charts (window.LightweightCharts).
//
// One series is shown at a time. Its closed candles come from HTTP (the newest HISTORY_BARS,
// older pages when the chart is scrolled back: history.js) and then from /ws/market,
// subscribed with `since` = the newest closed candle_time held, so nothing is missed or
// doubled; the forming bar is drawn over the newest. Holes are shaded (a `gap` message, a
// stored `gap` event, or missing bars in what HTTP returned). When the socket drops, the page
// reconnects with backoff (connection.js), reads the series list again and resubscribes with
// `since` and `events_after` (the last event_id received). The other files, each loaded
// before this one, hold a part: format.js (timeframes, decimals, times), legend.js,
// status.js (the badge, the source's freshness), picker.js (the series list, the menu and
// the buttons), reading.js (the pointer's and the keys' reading, the scroll), draw.js (the
// chart, its series, the decimals) and history.js (the HTTP reads).
// They share `page`, the object this file fills.
//
// window.tradecanvasChart exposes what the chart holds (for tests and the console): they read
// OHLC values, not pixels.
"use strict";

(() => {
  const F = window.tradecanvasFormat;
  const HISTORY_BARS = 1000; // loaded when a series is shown
  // a series (or the series list) whose loading failed (the daemon down, say) is loaded
  // again this often
  const RELOAD_RETRY_MS = 2000;
  // the series list read again after a reconnect is given up after this long
  const LIST_TIMEOUT_MS = 5000;

  const $ = (id) => document.getElementById(id);
  // the user asked for less motion: no animated scrolling, no kinetic scroll after a swipe
  const reducedMotion = window.matchMedia("(prefers-reduced-motion: reduce)");

  // --- what is shown ----------------------------------------------------------------------

  const view = {
    generation: 0, // bumped on every select(): answers for an older selection are dropped
    seriesId: null,
    timeframe: null,
    firstTime: null, // the oldest stored candle_time, from /api/market/series
    baseFirstTime: null, // the oldest stored minute of the series it is derived from
    bars: [], // ascending {time, open, high, low, close, volume}; the last may be forming
    decimals: 2, // the prices' decimals (format.js: the fewest that show each held exactly)
    volumeDecimals: 0,
    lastClosed: null, // the newest closed candle_time held: the `since` cursor
    lastEventId: null, // the newest event_id received: the `events_after` cursor
    gapTimes: new Set(), // bar times shaded as holes
    loading: null, // what the legend says while the series loads (the old chart stays)
    unserved: false, // the daemon refused its subscribe: it does not serve it (any more)
    ready: false, // history loaded; the subscription may be sent
    loadingOlder: null, // the pending scroll-back, if any
    rebuilds: [], // every factor.rebuild applied: {reason, from_time, to_time}
    errors: [], // `error` messages the daemon sent
  };

  // a live region's text, left alone when it says the same (a rewrite may be announced again)
  function say(el, text) {
    if (el.textContent !== text) el.textContent = text;
  }

  // `kind` "socket": the notice of a socket that cannot connect, cleared when one opens
  let noticeKind = null;
  // (a live region: always there, empty when there is nothing to say)
  function notice(text, kind = "page") {
    say($("notice"), text || "");
    noticeKind = text ? kind : null;
  }

  // the parts of the page (the other files) share this object
  const page = {
    view,
    reducedMotion,
    bars: () => view.bars,
    say,
    notice,
    HISTORY_BARS,
  };
  Object.assign(page, window.tradecanvasDraw(page));
  const { chart, render } = page;
  Object.assign(page, window.tradecanvasHistory(page));
  Object.assign(page, window.tradecanvasLegend(page));
  const status = window.tradecanvasStatus(page);
  page.sourceNote = status.sourceNote;
  Object.assign(page, window.tradecanvasPicker(page));
  Object.assign(page, window.tradecanvasReading(page));
  const { showLegend } = page;

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
    page.upsert(page.toBar(candle));
    if (dropped) render();
  }

  function applyForming(candle) {
    if (view.lastClosed !== null && candle.candle_time <= view.lastClosed) return;
    const dropped = dropUnclosedBefore(candle.candle_time);
    page.upsert(page.toBar(candle));
    if (dropped) render();
  }

  // The tab's title: the newest close, then the series; while not live the badge's state
  // first, with a warning sign when the price may be old (a trader glancing at the tab sees
  // that the number stopped): `⚠ reconnecting · 108208.7 · …`
  const WARN_STATES = new Set(["reconnecting", "offline", "stale"]);
  function showTitle() {
    if (view.seriesId === null) return;
    const last = view.bars[view.bars.length - 1];
    const state = $("state").dataset.state;
    const mark = state === "live" ? "" : `${WARN_STATES.has(state) ? "⚠ " : ""}${state} · `;
    const title = `${mark}${last ? page.price(last.close) + " · " : ""}${view.seriesId} — tradecanvas`;
    if (document.title !== title) document.title = title;
  }
  page.showTitle = showTitle;
  // the badge's state (status.js writes it): every change, the socket's or the source's
  new MutationObserver(showTitle).observe($("state"), {
    attributes: true,
    attributeFilter: ["data-state"],
  });

  // --- choosing a series ------------------------------------------------------------------

  // show `seriesId`: its history, then its live bars. The chart shown before stays (dimmed)
  // until the new one is loaded: a daemon that does not answer leaves it on the screen.
  async function select(seriesId) {
    const generation = ++view.generation;
    const entry = page.entry(seriesId);
    if (!entry) {
      notice(`${seriesId} is not served by this daemon`);
      return;
    }
    if (view.ready && view.seriesId !== seriesId) {
      link.send({ type: "unsubscribe", series_id: view.seriesId }); // subscribed once ready
    }
    const base = page.entry(entry.base_series_id);
    Object.assign(view, {
      seriesId,
      timeframe: F.parseTimeframe(entry.timeframe),
      firstTime: entry.first_time,
      baseFirstTime: base && base.series_id !== seriesId ? base.first_time : null,
      bars: [],
      lastClosed: null,
      lastEventId: null,
      gapTimes: new Set(),
      loading: "loading…",
      unserved: false,
      ready: false,
      loadingOlder: null,
      rebuilds: [],
      errors: [],
    });
    page.forget();
    $("chart").classList.add("loading");
    page.showInAddress(seriesId);
    showTitle();
    page.fillPickers();
    showLegend();
    if (link.isOpen()) status.setState("syncing");
    let loaded;
    try {
      loaded = await page.loadSeries(seriesId, generation);
    } catch (error) {
      if (generation !== view.generation) return;
      const why = error instanceof TypeError ? "the daemon does not answer" : error.message;
      view.loading = `loading… (${why}; trying again)`;
      showLegend();
      notice(`cannot load ${seriesId}: ${why}; trying again every ${RELOAD_RETRY_MS / 1000} s`);
      // the daemon may be restarting: load it again until it answers or another is chosen
      setTimeout(() => {
        if (generation === view.generation) select(seriesId);
      }, RELOAD_RETRY_MS);
      return;
    }
    if (loaded === null) return; // another series was chosen meanwhile
    if (loaded.length === 0) {
      // no bar: where its base series' history starts says why (the list may predate it)
      await page.refreshSeriesList().catch(() => {});
      if (generation !== view.generation) return;
    }
    view.bars = loaded.map(page.toBar);
    page.markCompleteness(loaded);
    view.lastClosed = loaded.length ? loaded[loaded.length - 1].candle_time : null;
    view.loading = null;
    if (noticeKind === "page") notice("");
    $("chart").classList.remove("loading");
    // the time axis: hours and minutes for intraday bars, days, months and years else
    chart.applyOptions({ timeScale: { timeVisible: F.intraday(view.timeframe) } });
    render();
    page.showNewest();
    showTitle();
    view.ready = true;
    subscribe();
  }
  page.select = select;

  // --- the socket -------------------------------------------------------------------------

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
    if (subscribed && link.sync()) status.subscribed();
  }

  // The shown series is not served (any more): a daemon restarted with other timeframes
  // refused its subscribe (`unknown_series`, before the pong of its sync: never `live` over
  // it). The series list read again, the page shows the nearest served one and says so.
  async function notServed() {
    const gone = view.seriesId;
    view.unserved = true;
    try {
      await page.refreshSeriesList(LIST_TIMEOUT_MS);
    } catch (error) {
      return; // the daemon went away again: the next connection subscribes again
    }
    if (view.seriesId !== gone) return;
    if (page.served(gone)) {
      view.unserved = false; // served after all (the daemon was restarting): again
      page.fillPickers();
      subscribe();
      return;
    }
    const instead = page.fallbackFor(gone);
    view.ready = false; // nothing to unsubscribe: the daemon serves it no more
    if (instead === null) {
      notice("this daemon serves no series");
      return;
    }
    await select(instead);
    notice(`${gone} is no longer served by this daemon: showing ${instead}`);
  }

  // a connection opened (the first, or again after a drop): subscribed from the cursors at
  // once, and after a drop the series list read again (a restarted daemon may serve other
  // timeframes: their buttons)
  let connections = 0;
  function opened() {
    subscribe();
    if (connections++ === 0) return; // the list was just read
    page
      .refreshSeriesList(LIST_TIMEOUT_MS)
      .then(() => {
        if (page.served(view.seriesId)) page.fillPickers(); // else its `unknown_series` comes
      })
      .catch(() => {}); // the daemon went away again, or the connection is dead: no buttons
  }

  function handle(message) {
    if (message.type === "error") {
      view.errors.push(message);
      if (message.code === "unknown_series") {
        // the series shown is served no more; another (an unsubscribe's) is of no concern
        if (message.series_id === view.seriesId) notServed();
        return;
      }
      notice(`the daemon refused a message: ${message.code}: ${message.message}`);
      // a message it ignored may be a subscribe or a ping: start again from the cursors
      if (message.code === "rate_limited") link.restart("resync");
      return;
    }
    if (message.series_id !== view.seriesId || !view.ready) return;
    switch (message.type) {
      case "candles_batch":
        for (const candle of message.candles) applyClosed(candle);
        status.marketMessage();
        break;
      case "candle_closed":
        applyClosed(message.candle);
        status.marketMessage();
        break;
      case "candle_forming":
        applyForming(message.candle);
        status.marketMessage();
        break;
      case "gap":
        page.shade(message.expected_next_time, message.actual_time);
        page.renderGaps();
        break;
      case "system":
        page.noteEvent(message);
        if (message.event === "factor.rebuild") page.rebuild(message.data);
        else if (message.event === "gap") page.renderGaps();
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
    opened,
    message: handle,
    caughtUp: () => {
      // never `live` over a series the daemon does not serve
      if (!view.unserved) status.caughtUp();
    },
    state: status.setState,
    live: () => status.state() === "live",
    // the socket's notice (cannot connect), cleared when one opens: only its own
    notice: (text) => {
      if (text) notice(text, "socket");
      else if (noticeKind === "socket") notice("");
    },
  });

  // --- start ------------------------------------------------------------------------------

  window.tradecanvasChart = {
    chart, // the lightweight-charts API (scrolling, screenshots)
    seriesId: () => view.seriesId,
    // the bars held for `seriesId` (empty when another series is shown), ascending
    data: (seriesId) => (seriesId === view.seriesId ? view.bars.map((b) => ({ ...b })) : []),
    // the bars drawn (the chart shown before stays drawn while a series loads)
    drawn: page.drawn,
    lastClosed: () => view.lastClosed,
    lastEventId: () => view.lastEventId,
    gaps: (seriesId) =>
      seriesId === view.seriesId ? page.gapSeries.data().map((p) => p.time) : [],
    rebuilds: () => view.rebuilds.map((r) => ({ ...r })),
    errors: () => view.errors.map((e) => ({ ...e })),
    // the badge's state: connecting, syncing, live, waiting (live, an empty series whose
    // source does not deliver), stale (live, no market data for 90 s, or a source that does
    // not deliver), reconnecting or offline; badge() its whole text
    state: () => $("state").dataset.state,
    badge: () => $("state").textContent,
    // the legend's text for the bar at `time` (omitted: the newest), and the notice shown
    legend: (time) => page.legendText(time === undefined ? null : time),
    notice: () => $("notice").textContent,
    // the prices' decimals, and a price as the price axis writes it
    decimals: () => view.decimals,
    axisPrice: page.axisPrice,
    // the price the price axis' coloured label marks (null: none)
    priceLabel: page.priceLabel,
    ready: () => view.ready,
    // the times at the edges of the view ({from, to}), null before any bar
    visibleTimes: () => chart.timeScale().getVisibleRange(),
    // the point the legend reads (null: the newest bar) and the time the crosshair is on
    // (null: none shown)
    reading: () => ({ legend: page.hovered(), crosshair: page.crosshairAt() }),
    select,
    loadOlder: page.loadOlder,
  };

  // the series list, then the series the address names (else the first served); the list
  // is read again every RELOAD_RETRY_MS until it loads
  async function start() {
    try {
      await page.refreshSeriesList();
    } catch (error) {
      const why = error instanceof TypeError ? "the daemon does not answer" : error.message;
      notice(`cannot read the series list: ${why}; trying again every ${RELOAD_RETRY_MS / 1000} s`);
      setTimeout(start, RELOAD_RETRY_MS);
      return;
    }
    notice("");
    const wanted = new URL(location.href).searchParams.get("series") || null;
    // the series named, also in another case (`btc/usdt`, `1H`), else the nearest served
    const named = page.served(wanted) ? wanted : page.matching(wanted);
    const served = named !== null;
    const first = served ? named : page.fallbackFor(wanted);
    link.start();
    if (first === null) {
      notice("this daemon serves no series");
      return;
    }
    await select(first);
    if (wanted !== null && !served) notice(`${wanted} is not served by this daemon: showing ${first}`);
  }
  start();
})();
