// The chart page's reads over HTTP (docs/chart.md), loaded before chart.js: a series' event
// log and newest bars when it is shown, the page before the oldest bar when the chart is
// scrolled back to it, and the range a `factor.rebuild` says changed.
"use strict";

window.tradecanvasHistory = (page) => {
  const F = window.tradecanvasFormat;
  const PAGE_BARS = 1000; // one scroll-back page
  const MAX_LIMIT = 5000; // the API's largest `limit`
  const SCROLL_BACK_MARGIN = 20; // load older bars when fewer than this are left of the view
  const { view } = page;

  // `timeoutMs`: given up after it (a request on a connection that died without a word — a
  // phone that changed networks — would wait minutes)
  async function getJSON(path, timeoutMs = null) {
    const signal = timeoutMs === null ? undefined : AbortSignal.timeout(timeoutMs);
    const response = await fetch(path, { headers: { Accept: "application/json" }, signal });
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
      const page_ = (await getJSON(candlesUrl(sid, since, MAX_LIMIT))).candles;
      for (const c of page_) if (c.candle_time <= to) found.push(c);
      if (page_.length < MAX_LIMIT || page_[page_.length - 1].candle_time >= to) return found;
      since = page_[page_.length - 1].candle_time;
    }
  }

  const toBar = (c) => ({
    time: c.candle_time,
    open: c.open,
    high: c.high,
    low: c.low,
    close: c.close,
    volume: c.volume,
  });

  // the HTTP read marks a derived bar with minutes missing (`complete: false`): shaded as
  // the `gap` event of it would be — that event may be pruned from the log by now — and a
  // bar read back complete (a hole filled by a repair or an import) is shaded no more
  function markCompleteness(candles) {
    for (const c of candles) {
      if (c.complete === false) view.gapTimes.add(c.candle_time);
      else view.gapTimes.delete(c.candle_time);
    }
  }

  // an event of the log (stored or live): remember its id, shade what it says is missing
  function noteEvent(event) {
    if (typeof event.event_id === "number") {
      view.lastEventId = Math.max(view.lastEventId || 0, event.event_id);
    }
    if (event.event === "gap" && event.data) {
      page.shade(event.data.from_time, F.nextOpen(event.data.to_time, view.timeframe));
    }
  }

  // A series being shown: the event log first — its cursor, and the holes it recorded
  // (events after the cursor come over the socket, subscribed with events_after) — then its
  // newest candles; null when another series was chosen meanwhile
  async function loadSeries(seriesId, generation) {
    let after = 0;
    for (;;) {
      const found = await getJSON(
        `/api/market/events?series_id=${encodeURIComponent(seriesId)}&after=${after}&limit=${MAX_LIMIT}`,
      );
      if (generation !== view.generation) return null;
      for (const event of found.events) noteEvent(event);
      after = found.next_after;
      if (!found.more) break;
    }
    view.lastEventId = after;
    const loaded = (await getJSON(candlesUrl(seriesId, null, page.HISTORY_BARS))).candles;
    return generation === view.generation ? loaded : null;
  }

  // older bars when the chart is scrolled back to the oldest one held
  async function loadOlder() {
    if (view.loadingOlder) return view.loadingOlder;
    if (!view.ready || view.bars.length === 0) return;
    const generation = view.generation;
    const run = async () => {
      await page.refreshSeriesList();
      if (view.firstTime === null || view.bars[0].time <= view.firstTime) return;
      // the PAGE_BARS stored before the oldest held, across any hole, in one request
      const held = view.bars[0].time;
      const older = (await getJSON(candlesUrl(view.seriesId, null, PAGE_BARS, held))).candles.filter(
        (c) => c.candle_time < held,
      );
      if (generation !== view.generation || view.bars.length === 0 || older.length === 0) return;
      const range = page.chart.timeScale().getVisibleLogicalRange();
      view.bars = [...older.map(toBar), ...view.bars];
      markCompleteness(older);
      const gaps = page.render();
      if (range) {
        // the points now before the bars held: the older bars and the shaded hole slots
        // among them (each a point of the time scale), so the bars in view stay put
        const added = new Set([...older.map((c) => c.candle_time), ...gaps.filter((t) => t < held)]).size;
        page.chart.timeScale().setVisibleLogicalRange({ from: range.from + added, to: range.to + added });
      }
    };
    view.loadingOlder = run()
      .catch((error) => page.notice(`loading older candles failed: ${error.message}`))
      .finally(() => {
        if (generation === view.generation) view.loadingOlder = null;
      });
    return view.loadingOlder;
  }
  page.chart.timeScale().subscribeVisibleLogicalRangeChange((range) => {
    if (range && range.from < SCROLL_BACK_MARGIN) loadOlder();
  });

  // factor.rebuild: the stored history in [from_time, to_time] changed; reload the part held
  async function rebuild(data) {
    const generation = view.generation;
    view.rebuilds.push({ reason: data.reason, from_time: data.from_time, to_time: data.to_time });
    if (view.bars.length === 0) {
      // nothing on screen yet (an import into an empty series): load the newest bars, as
      // select() does; bars that arrived live meanwhile are newer and win
      let loaded;
      try {
        loaded = (await getJSON(candlesUrl(view.seriesId, null, page.HISTORY_BARS))).candles;
      } catch (error) {
        page.notice(`reloading after factor.rebuild failed: ${error.message}`);
        return;
      }
      if (generation !== view.generation) return;
      markCompleteness(loaded);
      const byTime = new Map(loaded.map((c) => [c.candle_time, toBar(c)]));
      for (const bar of view.bars) byTime.set(bar.time, bar);
      view.bars = [...byTime.values()].sort((a, b) => a.time - b.time);
      const newest = loaded.length ? loaded[loaded.length - 1].candle_time : null;
      if (newest !== null && (view.lastClosed === null || view.lastClosed < newest)) {
        view.lastClosed = newest;
      }
      page.render();
      page.showNewest();
      return;
    }
    if (data.to_time < view.bars[0].time) return;
    const from = Math.max(data.from_time, view.bars[0].time);
    let read;
    try {
      read = await candlesBetween(view.seriesId, from, data.to_time);
    } catch (error) {
      page.notice(`reloading after factor.rebuild failed: ${error.message}`);
      return;
    }
    if (generation !== view.generation) return;
    markCompleteness(read);
    const kept = view.bars.filter((b) => b.time < from || b.time > data.to_time);
    view.bars = [...kept, ...read.map(toBar)].sort((a, b) => a.time - b.time);
    page.render();
  }

  return { getJSON, toBar, markCompleteness, noteEvent, loadSeries, loadOlder, rebuild };
};
