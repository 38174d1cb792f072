"""Source stretches of the history store: who wrote which bars, and where training must split."""

import logging
from pathlib import Path

import numpy as np
import pytest

from core.datasets import histories_from_cache, split_pieces
from core.history_store import HistoryStore
from core.prices import PriceHistory
from core.retraining import ResampledStore
from core.store_sources import SOURCES_FILE, Stretch, edges, read_stretches, write_stretches, written

T0 = 1_750_000_000 // 86_400 * 86_400


def bars(start: int, n: int, level: float = 100.0, step: int = 60) -> PriceHistory:
    return PriceHistory(step, start + step * np.arange(n, dtype=np.int64), np.full(n, level))


def test_one_source_appending_is_one_stretch_and_a_switch_is_a_join() -> None:
    s = written([], "binance", 0, 60)
    s = written(s, "binance", 120, 180)
    assert s == [Stretch("binance", 0, 180)] and edges(s, 60) == [0, 240]
    s = written(s, "hyperliquid", 240, 240)
    assert edges(s, 60) == [0, 240, 300]
    s = written(s, "hyperliquid", 300, 600)  # the new provider goes on: no further join
    assert s == [Stretch("binance", 0, 180), Stretch("hyperliquid", 240, 600)] and edges(s, 60) == [0, 240, 660]


def test_a_backfill_and_an_overwrite_keep_the_stretches_in_time_order() -> None:
    live = written([], "pyth", 1000, 2000)
    older = written(live, "btc_1m.csv.gz#0", 0, 900)  # an import of older history, after the live start
    assert edges(older, 60) == [0, 960, 1000, 2060]
    middle = written(older, "binance", 1200, 1400)  # a sync over part of the live bars
    assert middle == [Stretch("btc_1m.csv.gz#0", 0, 900), Stretch("pyth", 1000, 1199),
                      Stretch("binance", 1200, 1400), Stretch("pyth", 1401, 2000)]
    assert edges(middle, 60) == [0, 960, 1000, 1200, 1259, 1401, 1460, 2060]
    assert written(middle, "pyth", 1200, 1400) == [Stretch("btc_1m.csv.gz#0", 0, 900), Stretch("pyth", 1000, 2000)]


def test_a_garbled_sources_file_is_forgotten_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_stretches(tmp_path, [Stretch("a", 0, 60), Stretch("b", 120, 180)])
    assert read_stretches(tmp_path) == [Stretch("a", 0, 60), Stretch("b", 120, 180)]
    (tmp_path / SOURCES_FILE).write_text('[["a", 0]]')
    with caplog.at_level(logging.WARNING, logger="core.store_sources"):
        assert read_stretches(tmp_path) == []
    assert "source joins are forgotten" in caplog.text
    assert read_stretches(tmp_path / "absent") == []


def test_the_store_records_joins_and_training_from_it_splits_there(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path, durable=False)
    store.append("BTC", bars(T0, 600))  # bars of unknown source (a store older than sources.json): no join
    store.merge("BTC", bars(T0 + 600 * 60, 600), "binance")
    assert store.joins("BTC") == (T0 + 600 * 60, T0 + 1200 * 60)  # the feed's stretch begins and ends there
    switch = T0 + 1200 * 60 + 3 * 60  # three minutes into a 5-minute bar
    store.merge("BTC", bars(T0 + 1200 * 60, 3, 100.0), "binance")
    store.merge("BTC", bars(switch, 900, 100.05), "hyperliquid")  # another feed, another level
    store.merge("BTC", bars(T0, 12, step=300), "btc_5m.csv.gz")  # a native 5-minute import of the start
    assert store.joins("BTC") == (T0, T0 + 12 * 300, T0 + 600 * 60, switch, switch + 900 * 60)
    assert store.joins("ETH") == ()

    cut = T0 + 3 * 86_400
    for step in (60, 300):
        piece_of = histories_from_cache(ResampledStore(store), ["BTC"], step, T0, cut)["BTC"]
        pieces = split_pieces(piece_of, step)
        split_at = switch - switch % step  # the 5-minute bar the switch falls in closes on the new feed
        ends = [int(p.ts[-1]) for p in pieces]
        assert split_at - step in ends, (step, ends)
        for p in pieces:  # no piece holds both feeds' levels
            assert np.ptp(p.close) == 0.0, (step, p.first_ts)
