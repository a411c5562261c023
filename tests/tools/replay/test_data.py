"""The replay's files: naming and reading them, without sockets."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from tests.tools.replay.conftest import DAY, STREAM, config_for
from tradecanvas.model import Candle
from tradecanvas.runtime_flags import DATA_DIR_VARIABLE, OLD_DATA_DIR_VARIABLE, data_dir_candidates
from tradecanvas.tools.replay import (
    ReplayError,
    infer_market,
    infer_series,
    load_data,
    parse_file_argument,
)


def test_series_and_market_come_from_the_file_name_and_path(day_csv: Path) -> None:
    assert str(parse_file_argument(str(day_csv), None).series) == "binance:futures:BTC/USDT:1m"
    spot = Path("spot/ETHBTC-1m-2020-01-01.csv")
    assert str(infer_series(spot, "spot")) == "binance:spot:ETH/BTC:1m"
    named = parse_file_argument(f"binance:spot:BTC/USDT:USDT:1m={day_csv}", None)
    assert named.market == "spot" and named.series is not None
    assert named.series.stream_name == STREAM
    with pytest.raises(ReplayError, match="1m klines"):
        infer_series(Path("BTCUSDT-5m-2023-08-16.csv"), "futures")
    with pytest.raises(ReplayError, match="no such file"):
        parse_file_argument("nowhere/BTCUSDT-1m.csv", None)


def test_the_market_is_the_nearest_named_folder() -> None:
    assert infer_market(Path("data/spot/futures_um/X-1m.csv")) == "futures"
    assert infer_market(Path("futures/spot_2020/X-1m.csv")) == "spot"
    assert infer_market(Path("data/X-1m.csv")) is None
    with pytest.raises(ReplayError, match="cannot tell the symbol"):
        infer_series(Path("XYZ-1m.csv"), "futures")


def test_a_relative_name_is_found_under_the_data_dir(day_csv: Path) -> None:
    relative = "klines_1m_5m/futures_um/BTCUSDT-1m-2023-08-16.csv"
    assert parse_file_argument(relative, None).path.samefile(day_csv)
    with pytest.raises(ReplayError, match=r"binance:futures:BTC/USDT:7x"):
        parse_file_argument(f"binance:futures:BTC/USDT:7x={day_csv}", None)


def test_a_file_not_found_names_every_folder_tried_and_make_test_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's tour names its file relative to the data folder: when it is nowhere,
    the error lists each place looked at and how to get the data."""
    relative = "klines_1m_5m/futures_um/BTCUSDT-1m-1999-01-01.csv"
    monkeypatch.setenv(DATA_DIR_VARIABLE, str(tmp_path))
    with pytest.raises(ReplayError) as raised:
        parse_file_argument(relative, None)
    message = str(raised.value)
    for root in [Path.cwd(), *data_dir_candidates()]:
        assert str(root / relative) in message
    assert str(tmp_path / relative) in message and "is not set" not in message
    assert "`make test-data`" in message and "data.binance.vision" in message
    monkeypatch.delenv(DATA_DIR_VARIABLE)
    monkeypatch.delenv(OLD_DATA_DIR_VARIABLE, raising=False)
    with pytest.raises(ReplayError, match=r"\$TRADE_CANVAS_DATA_DIR is not set"):
        parse_file_argument(relative, None)
    with pytest.raises(ReplayError, match=r"^/nowhere/X-1m\.csv: no such file$"):
        parse_file_argument("/nowhere/X-1m.csv", None)


def test_csv_bars_are_rest_bars_and_an_exchange_hole_leaves_rest_too(
    day_csv: Path, day_rows: list[Candle]
) -> None:
    data = load_data(config_for(day_csv, exchange_holes=((100, 3),)))
    assert data.minutes == [c.candle_time for c in day_rows]  # the bar indices keep the hole
    bars = data.bars[("futures", "BTCUSDT")]
    assert [c.candle_time for c in bars] == [
        c.candle_time for i, c in enumerate(day_rows) if not 100 <= i < 103
    ]
    ((order, series, streamed),) = data.csv_series
    assert order == 0 and str(series) == "binance:futures:BTC/USDT:1m"
    assert len(streamed) == len(day_rows)


def test_a_history_file_is_rest_only(day_csv: Path) -> None:
    config = config_for(day_csv, files=(parse_file_argument(str(day_csv), None, stream=False),))
    data = load_data(config)
    assert data.csv_series == [] and len(data.bars[("futures", "BTCUSDT")]) == 1440


def test_recorded_closed_klines_become_rest_bars(frames_jsonl: Path) -> None:
    data = load_data(config_for(frames_jsonl))
    lines = [line for line in frames_jsonl.read_text().splitlines() if line.strip()]
    (frames,) = data.jsonl_items
    assert [f.text for f in frames] == lines
    closed = [orjson.loads(line)["data"] for line in lines if '"x":true' in line]
    ctk = [k["k"]["t"] // 1000 for k in closed if k["s"] == "CTKUSDT"]
    assert [c.candle_time for c in data.bars[("futures", "CTKUSDT")]] == ctk
    assert data.minutes == sorted({f.open_time for f in frames})


def test_an_unreadable_file_is_a_replay_error(tmp_path: Path) -> None:
    bad = tmp_path / "BTCUSDT-1m-2023-08-16.csv"
    bad.write_text(f"{DAY * 1000},1,2,0.5,oops,3\n")
    with pytest.raises(ReplayError, match="bad_csv_row"):
        load_data(config_for(bad))
