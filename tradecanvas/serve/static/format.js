// The chart page's pure helpers (docs/chart.md), loaded before chart.js: timeframes, the
// decimals a price is shown with, and the times the legend and the time axis show. No DOM,
// no chart: plain functions of their arguments.
"use strict";

window.tradecanvasFormat = (() => {
  const UNITS = { m: 60, h: 3600, d: 86400, w: 604800 };
  const DAY = 86400;
  // 1970-01-05, the first Monday after the epoch: weeks open on Mondays (as Binance's 1w)
  const MONDAY = 4 * DAY;
  // a price is never shown with more decimals than this (a double's noise, were one sent)
  const MAX_DECIMALS = 12;
  const PRICE_FIELDS = ["open", "high", "low", "close"];

  function parseTimeframe(text) {
    const m = /^(\d+)([mhdwM])$/.exec(text);
    if (!m) return null;
    return { text, count: Number(m[1]), unit: m[2] };
  }

  // seconds of a bar; months (`1M`) are calendar months, ordered as 31 days
  function timeframeSeconds(tf) {
    return tf.unit === "M" ? tf.count * 31 * DAY : tf.count * UNITS[tf.unit];
  }

  // the open time of the bar after the one opening at `t`
  function nextOpen(t, tf) {
    if (tf.unit !== "M") return t + timeframeSeconds(tf);
    const d = new Date(t * 1000);
    return Date.UTC(d.getUTCFullYear(), d.getUTCMonth() + tf.count, 1) / 1000;
  }

  const intraday = (tf) => tf.unit === "m" || tf.unit === "h";

  // The open time of the first bucket of `tf` that begins at or after `t`, or null where
  // the grid is not known here (3d opens on the symbol's own phase; docs/api.md)
  function firstBucketFrom(t, tf) {
    let start;
    if (tf.unit === "M") {
      if (tf.count !== 1) return null;
      const d = new Date(t * 1000);
      start = Date.UTC(d.getUTCFullYear(), d.getUTCMonth(), 1) / 1000;
    } else if (tf.unit === "w") {
      if (tf.count !== 1) return null;
      start = t - ((((t - MONDAY) % UNITS.w) + UNITS.w) % UNITS.w);
    } else {
      const step = timeframeSeconds(tf);
      if (DAY % step !== 0) return null;
      start = t - (t % step);
    }
    return start === t ? t : nextOpen(start, tf);
  }

  // The decimals of the shortest decimal that reads back as `x`: Binance's string without
  // its trailing zeros (the daemon sends the nearest double of it, and a double prints as
  // the shortest decimal that reads back as itself: 6.1e-7, 0.0000061, 108966.1)
  function decimalsOf(x) {
    if (!Number.isFinite(x)) return 0;
    const [mantissa, exponent] = Math.abs(x).toString().split("e");
    const dot = mantissa.indexOf(".");
    const digits = dot === -1 ? 0 : mantissa.length - dot - 1;
    return Math.min(MAX_DECIMALS, Math.max(0, digits - Number(exponent || 0)));
  }

  // the fewest decimals that show every price of `bars` exactly
  function priceDecimals(bars) {
    let most = 0;
    for (const b of bars) for (const f of PRICE_FIELDS) most = Math.max(most, decimalsOf(b[f]));
    return most;
  }

  // likewise for the volumes
  function volumeDecimals(bars) {
    let most = 0;
    for (const b of bars) most = Math.max(most, decimalsOf(b.volume));
    return most;
  }

  const iso = (time) => new Date(time * 1000).toISOString();

  // a bar's time as the legend says it: its minute (UTC) for an intraday bar, its day for
  // days and weeks, its month for months
  function barTime(time, tf) {
    const text = iso(time);
    if (!tf || intraday(tf)) return `${text.slice(0, 10)} ${text.slice(11, 16)} UTC`;
    return tf.unit === "M" ? text.slice(0, 7) : text.slice(0, 10);
  }

  // a day, `2025-08-01`
  const day = (time) => iso(time).slice(0, 10);

  const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
  // lightweight-charts' TickMarkType: Year, Month, DayOfMonth, Time, TimeWithSeconds
  const TICK_MARK = [
    (d) => String(d.getUTCFullYear()),
    (d) => MONTHS[d.getUTCMonth()],
    (d) => `${d.getUTCDate()} ${MONTHS[d.getUTCMonth()]}`,
    (d) => d.toISOString().slice(11, 16),
    (d) => d.toISOString().slice(11, 19),
  ];

  // a tick mark of the time axis, in UTC with English month names whatever the browser's
  // locale and time zone (`2025`, `Jul`, `6 Jul`, `16:45`), as the legend writes times
  function tickMark(time, type) {
    const format = TICK_MARK[type];
    return format ? format(new Date(time * 1000)) : iso(time);
  }

  return {
    parseTimeframe,
    timeframeSeconds,
    nextOpen,
    intraday,
    firstBucketFrom,
    decimalsOf,
    priceDecimals,
    volumeDecimals,
    barTime,
    day,
    tickMark,
  };
})();
