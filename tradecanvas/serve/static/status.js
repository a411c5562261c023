// The chart page's connection badge and what it knows of the market's source (docs/chart.md),
// loaded before chart.js: the badge's text, title and explanation line, what a screen reader
// is told of it, and whether the series is fresh.
//
// Freshness. The page asks `GET /healthz?series_id=` (its series) every SOURCE_POLL_MS
// while it is live and shown and its series has been quiet for QUIET_ASK_AFTER_MS (a
// source that delivers needs no asking: a thousand open charts of a trading market send
// no requests): its `upstream` says whether the Binance connection that carries this
// series is open (on an edge, what the ingest node holding the lease reports, or that no
// ingest node runs) — not whether every connection of the daemon is: a futures connection
// down says nothing of a spot chart. So a chart whose source went away says so within
// seconds (`stale: Binance unreachable`; an empty one `waiting: …`) instead of a green
// `live` over bars that no longer come. A series that delivered a market message within
// QUIET_ASK_AFTER_MS is never called unreachable, whatever an answer said (an older daemon
// answers for all its connections; an answer may be a moment old). (/readyz says it
// too, but it names the lease holder and is kept off a public proxy.) A /healthz that does
// not say (a proxy that blocks it) is asked once a minute only, and the page falls back on
// the data's age: a live series with no market message for STALE_AFTER_MS — Binance closes
// a bar every minute and sends forming updates every few seconds while there are trades —
// is `stale` with its age. The age is the page's clock since the last market message or the
// catch-up (history may be replayed: the bars' own times say nothing of now).
"use strict";

window.tradecanvasStatus = (page) => {
  const $ = (id) => document.getElementById(id);
  const STALE_AFTER_MS = 90_000;
  const FRESHNESS_CHECK_MS = 5_000; // the age's steps
  // (both can be lowered for tests, as connection.js's: window.tradecanvasTiming)
  const { sourcePollMs: SOURCE_POLL_MS, quietAskAfterMs: QUIET_ASK_AFTER_MS } = {
    sourcePollMs: 3_000,
    quietAskAfterMs: 5_000,
    ...(window.tradecanvasTiming || {}),
  };
  // a /healthz that does not say (blocked by a proxy, an older daemon): asked this seldom
  const SOURCE_BLOCKED_POLL_MS = 60_000;
  const SOURCE_TIMEOUT_MS = 5_000;

  // connecting, syncing, live, reconnecting or offline (connection.js says which)
  let connState = "connecting";

  // what each state means, for the badge's title and the line a tap on it shows
  const EXPLAIN = {
    connecting: "Opening the stream from the daemon.",
    syncing: "Connected; catching up with what the daemon sent meanwhile.",
    live: "Connected and up to date.",
    reconnecting: "The stream from the daemon stopped: the page connects again and goes on where it stopped.",
    offline: "This device has no network: the page reconnects when it is back.",
    waiting: "Connected; the series has no candles yet and its source does not deliver.",
  };

  // The badge shows the state and its detail (an age, a cause, a retry's count and delay)
  // and tells a screen reader the state only when it changes: the badge is a button (its
  // name the state, the detail aria-hidden: it changes every few seconds), and #announce, a
  // live region, is written only when the state (or `note`, what is known of the source)
  // changes. Nothing is rewritten that says the same.
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
    page.say($("announce"), spoken);
    if (!$("why").hidden) explainBadge();
  }

  // a tap or a click on the badge (its title is a hover tooltip, which a phone cannot show)
  // opens a line with its whole text and what it means; another, or Escape, closes it
  function explainBadge() {
    const el = $("state");
    page.say($("why"), `${el.textContent}: ${el.title}`);
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

  // the connection's state; a reconnect's detail is its cause (the cause first: a badge too
  // narrow for its text cuts the end, the retry's count)
  function setState(state, detail) {
    connState = state;
    const cause = state === "reconnecting" || state === "offline";
    showBadge(state, detail, EXPLAIN[state], "", cause);
  }

  // fromCatchUp: the sync ping awaited is a new subscription's (its catch-up resets the age)
  const fresh = {
    at: Date.now(),
    source: null, // "connected", "lost", "no_ingest", or null: not known
    sourceFor: null, // the series `source` was answered for
    messageAt: 0, // the last market message's time, and its series
    messageFor: null,
    asking: false,
    askedAt: 0,
    blocked: false, // /healthz did not say: the data's age only
    fromCatchUp: false,
  };
  // a source that does not deliver: the badge's cause (put first: a long text is cut at its
  // end), what its title adds, and what an empty chart's legend says
  const SOURCE_NOTE = {
    lost: {
      cause: "Binance unreachable",
      why: "The daemon says it is not connected to Binance.",
      empty: "waiting for Binance: the daemon is not connected to it",
    },
    no_ingest: {
      cause: "no ingest node running",
      why: "This server hears from no ingest node: none is running, so nothing new is stored.",
      empty: "waiting for an ingest node: none is running",
    },
  };
  // /healthz's `upstream` (docs/api.md)
  const SOURCE_OF = { connected: "connected", disconnected: "lost", no_ingest: "no_ingest" };

  // what is known of the shown series' source (an answer for another series is not)
  const sourceNow = () => (fresh.sourceFor === page.view.seriesId ? fresh.source : null);
  // the shown series delivered a market message within QUIET_ASK_AFTER_MS
  const delivering = () =>
    fresh.messageFor === page.view.seriesId && Date.now() - fresh.messageAt < QUIET_ASK_AFTER_MS;

  // a market message: the source delivers (whatever /healthz said last), and it is fresh
  function marketMessage() {
    fresh.at = Date.now();
    fresh.messageAt = fresh.at;
    fresh.messageFor = page.view.seriesId;
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
    fresh.askedAt = Date.now();
    const asked = page.view.seriesId;
    let source = null;
    try {
      // a connection that died without a word would hold the request for minutes
      const signal = AbortSignal.timeout(SOURCE_TIMEOUT_MS);
      const query = asked ? `?series_id=${encodeURIComponent(asked)}` : "";
      const response = await fetch(`/healthz${query}`, { cache: "no-store", signal });
      let body = null;
      try {
        body = response.ok ? await response.json() : null;
      } catch (error) {
        body = null; // not JSON: a proxy's page
      }
      // a proxy that blocks it: the data's age only, asked again seldom
      fresh.blocked = !(body && typeof body === "object" && "upstream" in body);
      if (!fresh.blocked) source = SOURCE_OF[body.upstream] || null;
    } catch (error) {
      // no answer (the daemon went away: the socket says so; a dead connection): what was
      // known stays
      source = fresh.sourceFor === asked ? fresh.source : null;
    } finally {
      fresh.asking = false;
    }
    const was = sourceNow();
    fresh.source = source;
    fresh.sourceFor = asked;
    if (was !== source && page.bars().length === 0) page.showLegend(); // says what it waits for
    checkFreshness();
  }

  function poll() {
    if (connState !== "live" || document.visibilityState === "hidden") return;
    if (fresh.blocked && Date.now() - fresh.askedAt < SOURCE_BLOCKED_POLL_MS) return;
    if (delivering()) return; // its source is there
    const recent = Date.now() - fresh.at < QUIET_ASK_AFTER_MS; // (a catch-up, just now)
    if (recent && sourceNow() === "connected") return;
    askUpstream();
  }
  setInterval(poll, SOURCE_POLL_MS);

  function checkFreshness() {
    if (connState !== "live") return;
    const age = Date.now() - fresh.at;
    const quiet = age >= STALE_AFTER_MS;
    const empty = page.bars().length === 0;
    // a series that delivers is not cut off, whatever the last answer said
    const lost = delivering() ? undefined : SOURCE_NOTE[sourceNow()];
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
      `No market message for this series for ${STALE_AFTER_MS / 1000} s or more: a quiet` +
        " market, or the daemon's source is down.",
    );
  }
  setInterval(checkFreshness, FRESHNESS_CHECK_MS);

  return {
    setState,
    showBadge,
    state: () => connState,
    marketMessage,
    // what is known of a source that does not deliver (SOURCE_NOTE), or undefined
    sourceNote: () => SOURCE_NOTE[sourceNow()],
    // a subscription was sent with its sync ping: its catch-up resets the age
    subscribed: () => {
      fresh.fromCatchUp = true;
    },
    // the last `sync` ping answered: everything sent before it is in
    caughtUp: () => {
      // a new subscription's age counts from now; after a check of a sleeping page's
      // connection, from the last market message still
      if (fresh.fromCatchUp) fresh.at = Date.now();
      fresh.fromCatchUp = false;
      setState("live");
      checkFreshness();
      askUpstream(); // is its source delivering? said at once, not at the next poll
    },
  };
};
