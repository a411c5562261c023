// The chart page's /ws/market connection (docs/chart.md), loaded before chart.js: it opens
// the socket, paces what the page sends, reconnects with backoff after a drop, and finds a
// connection that died without a word — a phone that changed networks, a NAT entry that
// expired: no FIN, no RST, nothing arrives and nothing says so. For that it pings: after
// HEARTBEAT_MS with nothing heard it sends a `ping`, and when neither the `pong` nor any
// other message comes within PONG_TIMEOUT_MS it drops the socket and connects again at once
// (chart.js resubscribes from its cursors). A page that wakes — shown again after being
// hidden, thawed after being frozen, its timers late by seconds (a laptop that slept), the
// network back (`online`) — checks at once rather than at the next heartbeat; so does a
// page whose browser says the network is gone (`offline`), and its badge says `offline` at
// once: `live` again only when the check's pong comes (the socket may still work: a
// daemon on this machine, another interface).
//
// The timings can be lowered for tests: window.tradecanvasTiming = {heartbeatMs: 500, …},
// set before the page's scripts run (Playwright's add_init_script).
"use strict";

window.tradecanvasConnect = (hooks) => {
  const T = {
    reconnectMinMs: 250,
    reconnectMaxMs: 5000,
    // silence before a heartbeat ping; the daemon allows 20 messages a second, this is one
    // every 15 s at most, and none while market messages flow
    heartbeatMs: 15_000,
    // no answer (the pong or anything else) this long after a ping: the connection is dead
    pongTimeoutMs: 10_000,
    // a socket still opening after this long (a SYN into a dead network) is given up
    connectTimeoutMs: 10_000,
    // a page hidden (or its timers stopped) at least this long checks when it comes back
    wakeAfterMs: 5_000,
    tickMs: 1_000,
    ...(window.tradecanvasTiming || {}),
  };
  // what is sent goes out at most SEND_PER_S a second (bursts of SEND_BURST): half the
  // daemon's limit (20/s, bursts of 40), so quick clicking never has a message ignored
  const SEND_PER_S = 10;
  const SEND_BURST = 20;

  const conn = {
    socket: null,
    attempt: 0, // failed attempts in a row
    retry: null, // the timer of the next attempt
    openedAt: 0,
    heardAt: Date.now(), // the last message of any kind
    pings: [], // sent, unanswered: {kind, at}, oldest first (the daemon answers in order)
    hiddenAt: null,
    tickAt: Date.now(),
  };
  // What waits to be sent: {message, kind}; `kind` of a ping: "sync" (its pong means the
  // catch-up before it is in) or "beat" (the connection is alive)
  const outbox = [];
  const pace = { tokens: SEND_BURST, at: Date.now(), timer: null };

  const isOpen = () => conn.socket !== null && conn.socket.readyState === WebSocket.OPEN;
  const seconds = (ms) => `${Math.round(ms / 100) / 10} s`;

  function pump() {
    pace.timer = null;
    const now = Date.now();
    pace.tokens = Math.min(SEND_BURST, pace.tokens + ((now - pace.at) / 1000) * SEND_PER_S);
    pace.at = now;
    while (outbox.length && pace.tokens >= 1 && isOpen()) {
      const { message, kind } = outbox.shift();
      conn.socket.send(JSON.stringify(message));
      pace.tokens -= 1;
      if (message.type === "ping") conn.pings.push({ kind, at: now });
    }
    if (outbox.length && conn.socket) pace.timer = setTimeout(pump, 1000 / SEND_PER_S);
  }

  // queue a message; false when no connection is open (the next one resubscribes). An
  // unsubscribe takes back its series' subscribe not sent yet, and the ping after it.
  function send(message, kind = null) {
    if (!isOpen()) return false;
    if (message.type === "unsubscribe") {
      const i = outbox.findIndex(
        (m) => m.message.type === "subscribe" && m.message.series_id === message.series_id,
      );
      if (i !== -1) {
        outbox.splice(i, outbox[i + 1] && outbox[i + 1].message.type === "ping" ? 2 : 1);
        return true;
      }
    }
    outbox.push({ message, kind });
    if (pace.timer === null) pump();
    return true;
  }

  const syncPending = () =>
    conn.pings.some((p) => p.kind === "sync") || outbox.some((m) => m.kind === "sync");

  // a ping whose pong says the page has everything sent before it: the badge says
  // `syncing` (or `state`: `offline`, the network gone) until it comes
  function sync(detail = "", state = "syncing") {
    if (!send({ type: "ping" }, "sync")) return false;
    hooks.state(state, detail);
    return true;
  }

  function pong() {
    const answered = conn.pings.shift();
    if (answered && answered.kind === "sync" && !syncPending()) hooks.caughtUp();
  }

  // Why a connection closed, in plain words (the badge's cause): the daemon's close codes
  // (docs/api.md), else the code. An attempt that never opened says why the last one
  // closed, while that was the daemon stopping or restarting (it is still away)
  const CLOSED = {
    1001: "daemon stopped",
    1006: "connection lost",
    1008: "refused by the daemon",
    1011: "daemon error",
    1012: "daemon restarting",
    4008: "too slow: the daemon dropped it",
  };
  let lastCause = null;
  function closeCause(code, opened) {
    if (!opened) {
      return lastCause === CLOSED[1001] || lastCause === CLOSED[1012]
        ? lastCause
        : "cannot reach the daemon";
    }
    lastCause = CLOSED[code] || `connection closed (code ${code})`;
    return lastCause;
  }

  // An attempt that never opened, while the daemon answers over HTTP at this same origin:
  // it refused the socket itself (this page's origin is not allowed), or a proxy between
  // does not pass WebSocket upgrades. Asked of /healthz, which reads nothing.
  const REFUSED =
    "the daemon refused /ws/market: this page's origin is not allowed" +
    " (TRADE_CANVAS_WS_ALLOWED_ORIGINS), or a proxy does not pass WebSocket upgrades";
  async function answersOverHttp() {
    try {
      const controller = new AbortController();
      const timer = setTimeout(() => controller.abort(), T.connectTimeoutMs);
      const answer = await fetch("/healthz", { cache: "no-store", signal: controller.signal });
      clearTimeout(timer);
      return answer.ok;
    } catch (error) {
      return false;
    }
  }

  function scheduleRetry(why, refused = false) {
    conn.attempt += 1;
    const delay = Math.min(T.reconnectMaxMs, T.reconnectMinMs * 2 ** (conn.attempt - 1));
    const offline = navigator.onLine === false;
    hooks.state(
      offline ? "offline" : "reconnecting",
      `${offline ? "no network" : why} · retry ${conn.attempt} in ${seconds(delay)}`,
    );
    if (offline) hooks.notice("");
    else if (refused) hooks.notice(REFUSED);
    conn.retry = setTimeout(connect, delay);
  }

  // forget the socket (its events are ignored from now on) and close it
  function drop(socket, code, reason) {
    conn.socket = null;
    outbox.length = 0;
    conn.pings = [];
    try {
      socket.close(code, reason);
    } catch (error) {
      // closing a socket that never opened may throw; it is gone either way
    }
  }

  // a connection that stopped answering: closed by us, another opened at once
  function lost(why) {
    drop(conn.socket, 4000, "no answer");
    const offline = navigator.onLine === false;
    hooks.state(offline ? "offline" : "reconnecting", `connection lost: ${why}`);
    connect();
  }

  function connect() {
    clearTimeout(conn.retry);
    conn.retry = null;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(`${scheme}://${location.host}/ws/market`);
    conn.socket = socket;
    conn.openedAt = Date.now();
    conn.pings = [];
    outbox.length = 0; // what the last connection had not sent: the resubscribe sends it anew
    let opened = false;
    socket.addEventListener("open", () => {
      if (conn.socket !== socket) return;
      opened = true;
      lastCause = null;
      conn.attempt = 0;
      conn.heardAt = Date.now();
      hooks.notice("");
      hooks.state("syncing", "");
      hooks.opened();
    });
    socket.addEventListener("message", (event) => {
      if (conn.socket !== socket) return;
      conn.heardAt = Date.now();
      const message = JSON.parse(event.data);
      if (message.type === "pong") pong();
      else hooks.message(message);
    });
    socket.addEventListener("close", async (event) => {
      if (conn.socket !== socket) return;
      drop(socket);
      const cause = closeCause(event.code, opened);
      // never opened, and not while the daemon is known to be stopping or restarting: ask
      // whether it answers over HTTP (then the socket itself was refused)
      const away = cause === CLOSED[1001] || cause === CLOSED[1012];
      const refused = !opened && !away && (await answersOverHttp());
      if (conn.socket !== null || conn.retry !== null) return; // a check reconnected meanwhile
      scheduleRetry(refused ? "refused by the daemon" : cause, refused);
    });
    // an error is always followed by close, which reconnects
  }

  // now: a connection waiting to retry tries at once; an open one checks it is alive —
  // with `state` on the badge (`syncing`; `offline` when the network went away) when the
  // page was live (it may have missed messages, or be cut off), else with a heartbeat
  function checkNow(why, state = "syncing") {
    if (navigator.onLine === false) [why, state] = ["no network · checking", "offline"];
    if (conn.socket === null) {
      if (conn.retry !== null) {
        conn.attempt = 0;
        connect();
      }
      return;
    }
    if (!isOpen()) return;
    if (syncPending()) {
      // a check (or a catch-up) already waits for its pong: the badge says what is known now
      hooks.state(state, why);
      return;
    }
    if (!(hooks.live() && sync(why, state))) send({ type: "ping" }, "beat");
  }

  function tick() {
    const now = Date.now();
    const late = now - conn.tickAt;
    conn.tickAt = now;
    // timers that ran this late were stopped: the machine slept, or the page was frozen
    if (late > Math.max(T.wakeAfterMs, 3 * T.tickMs)) checkNow("checking after a pause");
    const socket = conn.socket;
    if (socket === null) return;
    if (socket.readyState === WebSocket.CONNECTING && now - conn.openedAt > T.connectTimeoutMs) {
      drop(socket);
      scheduleRetry(`no answer from the daemon in ${seconds(T.connectTimeoutMs)}`);
      return;
    }
    if (socket.readyState !== WebSocket.OPEN) return;
    const waiting = conn.pings[0];
    if (waiting && now - Math.max(waiting.at, conn.heardAt) > T.pongTimeoutMs) {
      lost(`no answer in ${seconds(T.pongTimeoutMs)}`);
    } else if (!waiting && now - conn.heardAt >= T.heartbeatMs && !outbox.length) {
      send({ type: "ping" }, "beat");
    }
  }
  setInterval(tick, T.tickMs);

  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "hidden") {
      conn.hiddenAt = Date.now();
    } else if (conn.hiddenAt !== null) {
      const hidden = Date.now() - conn.hiddenAt;
      conn.hiddenAt = null;
      if (hidden >= T.wakeAfterMs) checkNow("checking after a pause");
    }
  });
  // a frozen page (a phone's background tab) thawed: its socket may be long dead
  document.addEventListener("resume", () => checkNow("checking after a pause"));
  window.addEventListener("online", () => checkNow("network back"));
  // `offline` on the badge at once, not `live` until the pong's timeout; the socket may
  // still work (a daemon on this machine, another interface): the pong says so, and the
  // page is `live` again without reconnecting
  window.addEventListener("offline", () => checkNow("no network · checking", "offline"));

  return {
    // open the first connection
    start: () => {
      hooks.state("connecting", "");
      connect();
    },
    isOpen,
    send,
    sync,
    // close and start again from the cursors (a message the daemon ignored)
    restart: (reason) => {
      if (conn.socket) conn.socket.close(4000, reason);
    },
    // for tests: the pings sent and not answered yet
    pending: () => conn.pings.map((p) => p.kind),
  };
};
