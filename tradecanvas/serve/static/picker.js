// The chart page's choice of series (docs/chart.md), loaded before chart.js: the series list
// the daemon serves (`GET /api/market/series`), the series menu and the timeframe buttons,
// the choice kept in the address, and a served series to fall back on when the one shown is
// served no more (a daemon restarted with other timeframes).
"use strict";

window.tradecanvasPicker = (page) => {
  const $ = (id) => document.getElementById(id);
  const F = window.tradecanvasFormat;
  let seriesList = [];

  const entry = (seriesId) => seriesList.find((s) => s.series_id === seriesId);
  const seconds = (s) => F.timeframeSeconds(F.parseTimeframe(s.timeframe));

  async function refreshSeriesList(timeoutMs = null) {
    seriesList = (await page.getJSON("/api/market/series", timeoutMs)).series;
    const shown = entry(page.view.seriesId);
    if (shown) {
      page.view.firstTime = shown.first_time;
      const base = entry(shown.base_series_id);
      if (base && base !== shown) page.view.baseFirstTime = base.first_time;
    }
  }

  // a timeframe as the daemon writes it: `1H` is `1h` (and D, W), but `1M` (a month) and `1m`
  // (a minute) are two timeframes, never folded
  const foldTimeframe = (text) => text.replace(/[HDW]$/, (unit) => unit.toLowerCase());
  // a series id's parts: its base (exchange, market, symbol: any case) and its timeframe
  function partsOf(seriesId) {
    const parts = (seriesId || "").split(":");
    return {
      head: parts.slice(0, -1).join(":").toLowerCase(),
      timeframe: foldTimeframe(parts[parts.length - 1] || ""),
    };
  }

  // the served series `seriesId` names but for its case (`btc/usdt`, `1H`), when just one
  // is; else null
  function matching(seriesId) {
    const wanted = partsOf(seriesId);
    const found = seriesList.filter((s) => {
      const served = partsOf(s.series_id);
      return served.head === wanted.head && s.timeframe === wanted.timeframe;
    });
    return found.length === 1 ? found[0].series_id : null;
  }

  // a served series in place of `seriesId` (not served, or no longer): its symbol (any case),
  // else the first one served, in the timeframe nearest its own (the same when served);
  // null when none is
  function fallbackFor(seriesId) {
    if (seriesList.length === 0) return null;
    const wanted = partsOf(seriesId);
    const bases = [...new Set(seriesList.map((s) => s.base_series_id))];
    const base = bases.find((b) => partsOf(b).head === wanted.head) || bases[0];
    const same = seriesList.filter((s) => s.base_series_id === base);
    const tf = F.parseTimeframe(wanted.timeframe);
    if (!tf) return same[0].series_id; // (the list has each base series before the derived)
    const want = Math.log(F.timeframeSeconds(tf));
    const distance = (s) => Math.abs(Math.log(seconds(s)) - want);
    return same.reduce((a, b) => (distance(b) < distance(a) ? b : a)).series_id;
  }

  // the address of a series, readable (`:` and `/` are allowed in a query)
  function showInAddress(seriesId) {
    const query = encodeURIComponent(seriesId).replace(/%3A/gi, ":").replace(/%2F/gi, "/");
    const url = new URL(location.href);
    url.search = `?series=${query}`;
    if (url.href !== location.href) history.replaceState(null, "", url.href);
  }

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
    const current = entry(page.view.seriesId);
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
      .sort((a, b) => seconds(a) - seconds(b));
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
          button.addEventListener("click", () => page.select(s.series_id));
          return button;
        }),
      );
      const again = [...box.children].find((b) => b.textContent === focused);
      if (again) again.focus();
    }
    for (const button of box.children) {
      const pressed = String(button.dataset.seriesId === page.view.seriesId);
      if (button.getAttribute("aria-pressed") !== pressed) button.setAttribute("aria-pressed", pressed);
    }
    showPressed();
  }

  // a strip that scrolls sideways (a small screen, docs/chart.md): the chosen timeframe in
  // view, and the one the keyboard's focus is on, each with half a neighbour beside it
  // (there are more that way); the strip alone is scrolled, never the page
  function showPressed(shown = $("timeframes").querySelector('[aria-pressed="true"]')) {
    const box = $("timeframes");
    if (!shown || box.scrollWidth <= box.clientWidth) return;
    const strip = box.getBoundingClientRect();
    const button = shown.getBoundingClientRect();
    const room = Math.min(button.width / 2, (strip.width - button.width) / 2);
    if (button.left - room < strip.left) box.scrollLeft -= strip.left - button.left + room;
    else if (button.right + room > strip.right) box.scrollLeft += button.right + room - strip.right;
  }
  // turned on its side, or a window resized: the strip's width changed
  window.addEventListener("resize", () => showPressed());
  $("timeframes").addEventListener("focusin", (event) => showPressed(event.target));

  $("series").addEventListener("change", (event) => {
    const base = event.target.value;
    const tf = page.view.timeframe ? page.view.timeframe.text : null;
    const same = seriesList.find((s) => s.base_series_id === base && s.timeframe === tf);
    page.select(same ? same.series_id : base);
  });

  return {
    seriesList: () => seriesList,
    entry,
    served: (seriesId) => entry(seriesId) !== undefined,
    matching,
    refreshSeriesList,
    fallbackFor,
    showInAddress,
    fillPickers,
  };
};
