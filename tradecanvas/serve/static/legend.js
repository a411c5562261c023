// The chart page's legend (docs/chart.md), loaded before chart.js: the line under the
// controls that reads the bar under the cursor, a finger or the keyboard's choice, else the
// newest bar; or, with no bar, what the chart waits for.
"use strict";

window.tradecanvasLegend = (page) => {
  const F = window.tradecanvasFormat;
  const FIELDS = [["open", "O"], ["high", "H"], ["low", "L"], ["close", "C"], ["volume", "V"]];
  const PERIOD = { m: "bar", h: "bar", d: "day", w: "week", M: "month" };
  const DAY = 86400;

  // a price as the chart's axis shows it: the decimals the series' prices need
  const price = (x) => x.toFixed(page.view.decimals);
  const amount = (x) => x.toFixed(page.view.volumeDecimals);
  const shown = (word, x) => (word === "volume" ? amount(x) : price(x));

  // A derived series with no bar whose first bucket began before its base series' first
  // stored minute: the daemon gives that bucket no bar (its Binance bar holds minutes the
  // store never had), so the first bar is the next bucket's. Null when that is not so.
  function firstBarNote() {
    const { view } = page;
    if (view.baseFirstTime === null || view.timeframe === null) return null;
    const first = F.firstBucketFrom(view.baseFirstTime, view.timeframe);
    if (first === null) return phasedFirstBarNote();
    if (first === view.baseFirstTime) return null;
    const when = F.intraday(view.timeframe) ? F.barTime(first, view.timeframe) : F.day(first);
    return (
      `the first ${view.timeframe.text} bar is ${when} ` +
      `(this ${PERIOD[view.timeframe.unit]} began before the stored history)`
    );
  }

  // A grid of several days (3d) opens at a midnight (UTC) of the symbol's own phase, which
  // the series list does not say: the first bar opens within its length of the stored
  // history's start, so by the last midnight of that span; and a start that is not a
  // midnight is inside a bucket that began before it.
  function phasedFirstBarNote() {
    const { view } = page;
    const tf = view.timeframe;
    if (tf.unit !== "d") return null;
    const by = F.day(view.baseFirstTime + F.timeframeSeconds(tf) - 1);
    const inside = view.baseFirstTime % DAY !== 0;
    return (
      `the first ${tf.text} bar opens by ${by} ` +
      (inside
        ? `(this ${tf.count}-day period began before the stored history)`
        : `(${tf.text} bars open on the symbol's own ${tf.count}-day grid)`)
    );
  }

  // What the legend says with no bar to read: loading, or why there is none
  function emptyText() {
    const { view } = page;
    if (view.loading) return `${view.seriesId} — ${view.loading}`;
    const lost = page.sourceNote();
    const first = firstBarNote();
    const why = [first, lost ? lost.empty : null].filter(Boolean).join("; ");
    return `${view.seriesId} — no candles yet${why ? `: ${why}` : ""}`;
  }

  // The legend for the point at `time` (null: the newest bar), in groups that never break
  // inside (a label stays with its value on a narrow screen); the chart's time scale holds
  // the bars' times and the shaded holes', so a time without a bar is a hole. A group is a
  // list of parts: a text, or a label {word, abbr}, shown as its letter (its word a tooltip)
  // and read by a screen reader as its word. The timeframe comes first: the button pressed
  // may not look pressed (forced colours).
  function legendGroups(time) {
    const { view } = page;
    if (!view.seriesId) return [];
    const bar =
      time === null ? view.bars[view.bars.length - 1] : view.bars.find((b) => b.time === time);
    if (!bar && (time === null || view.bars.length === 0)) return [[emptyText()]];
    const groups = [[{ word: "timeframe", abbr: null }, view.timeframe.text]];
    if (!bar) {
      return [...groups, [F.barTime(time, view.timeframe)], ["no candle: a hole in the series"]];
    }
    groups.push([F.barTime(bar.time, view.timeframe)]);
    for (const [word, abbr] of FIELDS) groups.push([{ word, abbr }, shown(word, bar[word])]);
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

  // the legend for `time` (omitted: the point read now, else the newest bar)
  function showLegend(time = page.hovered()) {
    const el = document.getElementById("legend");
    if (el.textContent === legendText(time)) return;
    // the double spaces between the groups are for textContent: the CSS sets them apart
    el.replaceChildren(
      ...legendGroups(time).flatMap((parts, i) => (i === 0 ? [] : ["  "]).concat(legendGroup(parts))),
    );
  }

  return { showLegend, legendText, spokenText, price };
};
