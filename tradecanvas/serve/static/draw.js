// The chart page's drawing (docs/chart.md), loaded before chart.js: the lightweight-charts
// chart and its series — the candles, their volumes, and the shaded columns of the holes —
// drawn from the bars held (`view.bars`), with the decimals their prices need.
"use strict";

window.tradecanvasDraw = (page) => {
  const LWC = window.LightweightCharts;
  const F = window.tradecanvasFormat;
  const MAX_SHADED_PER_HOLE = 5000; // a hole wider than this is shaded at its start only
  const MAX_BAR_SPACING = 40; // a few bars fitted to the width are drawn at most this wide
  const COLORS = { up: "#26a69a", down: "#ef5350", gap: "rgba(255, 152, 0, 0.22)" };
  const { reducedMotion, view } = page;

  const chart = LWC.createChart(document.getElementById("chart"), {
    autoSize: true,
    layout: {
      background: { type: "solid", color: "#131722" },
      textColor: "#d1d4dc",
      attributionLogo: false, // the footer carries the attribution (and the CSP stays strict)
    },
    // the times in UTC, written as the legend writes them whatever the browser's locale and
    // time zone (a ja-JP browser showed `06 7月 '25`): the crosshair's label is the bar's
    // time as the legend says it (`2025-07-06 16:46 UTC`), the tick marks `Jul`, `6 Jul`, `16:45`
    localization: {
      locale: "en-US",
      timeFormatter: (time) => F.barTime(time, view.timeframe),
    },
    grid: { vertLines: { color: "#1f2430" }, horzLines: { color: "#1f2430" } },
    timeScale: {
      timeVisible: true,
      secondsVisible: false,
      rightOffset: 5,
      barSpacing: 6,
      maxBarSpacing: MAX_BAR_SPACING,
      tickMarkFormatter: (time, type) => F.tickMark(time, type),
    },
    crosshair: { mode: LWC.CrosshairMode.Normal },
    kineticScroll: { mouse: false, touch: !reducedMotion.matches },
    // a vertical swipe on the chart scrolls the page (a phone's short screen), not the prices
    handleScroll: { vertTouchDrag: false },
  });
  // `UTC` in the corner under the price axis, right of the time axis: the axis' hours are UTC
  const zone = document.getElementById("utc");
  chart.timeScale().subscribeSizeChange((width, height) => {
    zone.style.width = `${Math.max(0, document.getElementById("chart").clientWidth - width)}px`;
    zone.style.height = `${height}px`;
    zone.style.lineHeight = `${height}px`;
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
    // the library labels the close of the newest bar in view, not the last price (in 5.2.1
    // whatever priceLineSource says): the label is `lastPrice`'s, below
    lastValueVisible: false,
  });
  // the price axis' coloured label: the last price, also with the chart scrolled back (the
  // series' dashed line marks it across the chart)
  const lastPrice = candleSeries.createPriceLine({
    price: 0,
    lineVisible: false,
    axisLabelVisible: false,
    title: "",
  });
  candleSeries.priceScale().applyOptions({ scaleMargins: { top: 0.08, bottom: 0.25 } });
  reducedMotion.addEventListener("change", () => {
    chart.applyOptions({ kineticScroll: { mouse: false, touch: !reducedMotion.matches } });
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
    const step = F.timeframeSeconds(view.timeframe);
    for (let i = 1; i < view.bars.length; i++) {
      let t = view.bars[i - 1].time + step;
      for (let n = 0; t < view.bars[i].time && n < MAX_SHADED_PER_HOLE; n++, t += step) found.push(t);
    }
    return found;
  }

  function shade(from, toExclusive) {
    let t = from;
    for (let n = 0; t < toExclusive && n < MAX_SHADED_PER_HOLE; n++, t = F.nextOpen(t, view.timeframe)) {
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

  // The prices' axis and the legend show the decimals the prices need: the fewest that show
  // every price held exactly (ADA/BTC at 0.0000061: 8; BTC futures, tick 0.1: 1), never
  // fewer than a bar shown needs. Recounted over the bars held (all), raised by a live bar.
  function showPrecision(decimals, volumeDecimals) {
    view.volumeDecimals = volumeDecimals;
    if (decimals === view.decimals) return;
    view.decimals = decimals;
    candleSeries.applyOptions({
      priceFormat: { type: "price", precision: decimals, minMove: 10 ** -decimals },
    });
  }

  // the last price's label on the price axis, coloured as the newest bar (none: no bar)
  function showLastPrice() {
    const last = view.bars[view.bars.length - 1];
    if (!last) {
      lastPrice.applyOptions({ axisLabelVisible: false });
      return;
    }
    const color = last.close >= last.open ? COLORS.up : COLORS.down;
    lastPrice.applyOptions({ price: last.close, color, axisLabelVisible: true });
  }

  // the price the axis' coloured label marks (for tests): the series' own label, when shown,
  // is the close of the newest bar in view
  function priceLabel() {
    if (candleSeries.options().lastValueVisible) {
      const range = chart.timeScale().getVisibleRange();
      const inView = range ? view.bars.filter((b) => b.time <= range.to) : [];
      return inView.length ? inView[inView.length - 1].close : null;
    }
    const options = lastPrice.options();
    return options.axisLabelVisible ? options.price : null;
  }

  function render() {
    if (view.bars.length) showPrecision(F.priceDecimals(view.bars), F.volumeDecimals(view.bars));
    candleSeries.setData(view.bars.map(candlePoint));
    volumeSeries.setData(view.bars.map(volumePoint));
    // no prices: no price axis (it would go on showing the series shown before)
    const axis = view.bars.length > 0;
    if (candleSeries.priceScale().options().visible !== axis) {
      candleSeries.priceScale().applyOptions({ visible: axis });
    }
    showLastPrice();
    const gaps = renderGaps();
    page.showLegend();
    page.placeCrosshair();
    return gaps;
  }

  // a candle from the socket: appended, or replacing the newest bar; an older one (never
  // sent by the daemon: its cursor only moves forward) replaces in place
  function upsert(bar) {
    const bars = view.bars;
    const last = bars.length ? bars[bars.length - 1] : null;
    let newHole = false;
    if (last === null || bar.time > last.time) {
      newHole = last !== null && bar.time > F.nextOpen(last.time, view.timeframe);
      bars.push(bar);
    } else if (bar.time === last.time) {
      bars[bars.length - 1] = bar;
    } else {
      const i = bars.findIndex((b) => b.time >= bar.time);
      bars.splice(i, bars[i].time === bar.time ? 1 : 0, bar);
      render();
      return;
    }
    if (last === null) {
      render(); // the first bar: its decimals, its axis
      return;
    }
    const decimals = Math.max(view.decimals, F.priceDecimals([bar]));
    showPrecision(decimals, Math.max(view.volumeDecimals, F.volumeDecimals([bar])));
    candleSeries.update(candlePoint(bar));
    volumeSeries.update(volumePoint(bar));
    showLastPrice();
    if (newHole) renderGaps();
    page.showLegend();
    page.placeCrosshair();
  }

  return {
    chart,
    candleSeries,
    gapSeries,
    render,
    renderGaps,
    upsert,
    shade,
    drawn: () => candleSeries.data().length,
    priceLabel,
    axisPrice: (x) => candleSeries.priceFormatter().format(x),
  };
};
