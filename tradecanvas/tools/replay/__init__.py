"""``tradecanvas replay FILE…``: a loopback stand-in for Binance (DESIGN §8).

Serves, from recorded combined-stream JSONL frames or kline CSVs (either layout
:func:`~tradecanvas.wire.kline_csv.read_kline_csv` reads):

- WebSocket combined streams ``/stream?streams=a/b`` and ``/market/stream?…`` (the routed
  futures path), raw ``/ws/<stream>`` and ``/market/ws/<stream>``, and ``SUBSCRIBE`` /
  ``UNSUBSCRIBE`` / ``LIST_SUBSCRIPTIONS`` messages with Binance's acks;
- REST ``/fapi/v1/klines`` and ``/api/v3/klines`` (Binance's paging rules and limits 1500 and
  1000) for 1m and every longer Binance interval (3m … 1M, summed from the 1m bars by
  Binance's rule; 3d on the symbol's grid: ``--phase-3d DAYS``, by default the documented
  phase of a known symbol, else 0), ``…/time`` and ``…/exchangeInfo``, with
  ``X-MBX-USED-WEIGHT-1M``.

The WebSocket streams have their own listener (:mod:`~tradecanvas.tools.replay.ws`, trio and
wsproto: each frame framed once for every client, a client's queued frames written at once,
so ``--speed max`` is not held back by the replay); a Starlette app on Hypercorn's trio worker
serves REST. ``--port`` (``--ws-port``) is the WebSocket port, REST is on ``--rest-port``,
by default the port above ``--port`` (any free one when ``--port`` is 0).

Time: the replay has one exchange clock, the event time ``E`` of the last frame sent. CSV
bars become ``forming_per_bar`` forming frames at ``E = open + k·60/(n+1) s`` and a closed
frame at ``E = close time + 201 ms`` (real closes arrive 0.2–2 s late). REST serves only bars
that have closed by that clock, so a daemon sees exactly what it would have seen live, at any
``--speed``. At a ``--speed`` the frames go out on a schedule, each at its exchange-time
distance from the first ÷ speed (a replay held back by a slow client catches up after);
``--speed max`` sends as fast as the slowest client reads; the timeline waits while no
client is connected, so runs are deterministic.

Faults (bar indices count the data's distinct open times from 0):
``--drop-at I --skip N`` closes every connection just before bar I's close and skips bars
I..I+N on the WebSocket (they stay in REST, as at Binance); ``--omit-close I`` and
``--duplicate-close I`` drop or double bar I's closed frame; ``--exchange-hole I:N`` removes
bars I..I+N-1 from WebSocket and REST (a hole at the exchange); ``--rest-429-first`` answers
the first klines call with 429 and ``Retry-After``. The last bar's close is always sent, and a
client that connects after the data is over gets each stream's last closed frame, so it
learns where the exchange stands and can backfill what it missed.

``--paused`` holds the timeline (no frame, the clock stands at ``--start-at``; REST answers
from there) until SIGUSR1 or :meth:`ReplayHandle.resume`: a daemon can be started and its
subscribers attached before the first candle exists, so they see everything it publishes.
Meanwhile the timeline builds and frames its first frames (at most 50,000), so that
sending them costs no JSON work once resumed.

Exit codes (:data:`~tradecanvas.tools.replay.cli.EXIT_CODES`, also in ``--help``): 0 when
SIGINT (Ctrl-C) or SIGTERM stops it, the normal end of a replay; 1 when it cannot serve (a
port in use); 2 for a bad option, or a file that is missing, unreadable or holds no klines.

The modules, none with sockets but ``server`` and ``ws``: ``data`` names and reads the files
(:func:`load_data`); ``core`` is what the exchange does with them (the frames in exchange
time, the fault plan, the REST view of the bars, the answers to WebSocket requests);
``server`` is the trio shell (the timeline task, the Starlette REST app,
:func:`serve_replay`), ``ws`` its WebSocket listener; ``cli`` the command line and its exit codes
(:data:`~tradecanvas.tools.replay.cli.EXIT_CODES`).
"""

from __future__ import annotations

from tradecanvas.tools.replay.cli import (
    EXIT_CODES,
    config_from_args,
    configure_parser,
    main,
    run_replay,
)
from tradecanvas.tools.replay.core import (
    FaultPlan,
    ReplayFrame,
    Step,
    answer_request,
    closed_bars,
    forming_steps,
    interval_bars,
    phase_3d,
    timeline_frames,
)
from tradecanvas.tools.replay.data import (
    ReplayConfig,
    ReplayData,
    ReplayError,
    ReplayFile,
    infer_market,
    infer_series,
    load_data,
    parse_file_argument,
    resolve_path,
)
from tradecanvas.tools.replay.server import (
    ReplayHandle,
    ReplayServer,
    ReplayStatistics,
    serve_replay,
    serve_replay_data,
)

__all__ = [
    "EXIT_CODES",
    "FaultPlan",
    "ReplayConfig",
    "ReplayData",
    "ReplayError",
    "ReplayFile",
    "ReplayFrame",
    "ReplayHandle",
    "ReplayServer",
    "ReplayStatistics",
    "Step",
    "answer_request",
    "closed_bars",
    "config_from_args",
    "configure_parser",
    "forming_steps",
    "infer_market",
    "infer_series",
    "interval_bars",
    "load_data",
    "main",
    "parse_file_argument",
    "phase_3d",
    "resolve_path",
    "run_replay",
    "serve_replay",
    "serve_replay_data",
    "timeline_frames",
]
