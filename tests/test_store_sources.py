"""Source stretches of the history store: who wrote which bars, and where training must split."""

import logging
from pathlib import Path

import numpy as np
import pytest

from core.datasets import histories_from_cache, split_pieces
from core.history_store import HistoryStore, StoreUnreadableError
from core.prices import PriceHistory
from core.retraining import ResampledStore
from core.store_sources import SOURCES_FILE, Stretch, changes, owners, read_stretches, write_stretches, written

T0 = 1_750_000_000 // 86_400 * 86_400
DAY = 86_400


def bars(start: int, n: int, level: float = 100.0, step: int = 60) -> PriceHistory:
    return PriceHistory(step, start + step * np.arange(n, dtype=np.int64), np.full(n, level))


def test_one_source_appending_is_one_stretch_and_a_switch_is_a_join() -> None:
    s = written([], "binance", 0, 60, 60)
    s = written(s, "binance", 120, 180, 60)
    assert s == [Stretch("binance", 0, 180)]
    s = written(s, "hyperliquid", 240, 240, 60)
    assert s == [Stretch("binance", 0, 180), Stretch("hyperliquid", 240, 240)]
    s = written(s, "hyperliquid", 300, 600, 60)  # the new provider goes on: no further join
    assert s == [Stretch("binance", 0, 180), Stretch("hyperliquid", 240, 600)]
    ts = np.arange(0, 720, 60, dtype=np.int64)  # bar by bar: one join, and the bar after the last is no one's
    assert changes(ts, owners(s, ts)) == (240, 660)


def test_a_backfill_and_an_overwrite_keep_the_stretches_in_time_order_and_on_the_grid() -> None:
    live = written([], "pyth", 1020, 1980, 60)
    older = written(live, "btc_1m.csv.gz", 0, 900, 60)  # an import of older history, after the live start
    assert older == [Stretch("btc_1m.csv.gz", 0, 900), Stretch("pyth", 1020, 1980)]
    middle = written(older, "binance", 1200, 1380, 60)  # a sync over part of the live bars
    assert middle == [Stretch("btc_1m.csv.gz", 0, 900), Stretch("pyth", 1020, 1140),
                      Stretch("binance", 1200, 1380), Stretch("pyth", 1440, 1980)]
    assert written(middle, "pyth", 1200, 1380, 60) == [Stretch("btc_1m.csv.gz", 0, 900), Stretch("pyth", 1020, 1980)]


def test_a_garbled_sources_file_is_forgotten_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_stretches(tmp_path, [Stretch("a", 0, 60), Stretch("b", 120, 180)])
    assert read_stretches(tmp_path) == [Stretch("a", 0, 60), Stretch("b", 120, 180)]
    for garbled in ('[["a", 0]]', '{"a": [0, 60]}', '[["a", 1.5, 60]]', '[["a", true, 60]]', '[[null, 0, 60]]',
                    '[["a", 120, 60]]', "not json"):
        (tmp_path / SOURCES_FILE).write_text(garbled)
        with caplog.at_level(logging.WARNING, logger="core.store_sources"):
            assert read_stretches(tmp_path) == [], garbled
        assert "source joins are forgotten" in caplog.text
        caplog.clear()
    assert read_stretches(tmp_path / "absent") == []


@pytest.mark.parametrize("garbled", [
    b"\xff\xfe\x00\x01torn",
    b"[" * 100_000,
    b'[["a", 0, 100000000000000000000000]]',
    b'[["a", 0, 1800000000], ["b", 600, 1200]]',
], ids=["not utf-8", "nested too deep", "a time beyond int64", "overlapping stretches"])
def test_a_sources_file_the_store_could_not_have_written_is_forgotten_not_fatal(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, garbled: bytes) -> None:
    """Before: UnicodeDecodeError and RecursionError escaped every merge with a source (after its bars were
    written: the refresh then never updated the cache) and read_sourced; a time past int64 raised OverflowError
    from read_sourced; overlapping stretches gave the overlap's bars to the later one."""
    store = HistoryStore(tmp_path, durable=False)
    store.merge("BTC", bars(T0, 10), "a")
    (store.folder("BTC", 60) / SOURCES_FILE).write_bytes(garbled)
    with caplog.at_level(logging.WARNING, logger="core.store_sources"):
        assert read_stretches(store.folder("BTC", 60)) == []
        assert store.read_sourced("BTC", 60, 0, 2 ** 40)[1] == ()
        assert store.merge("BTC", bars(T0 + 600, 10), "b").new == 10
    assert "source joins are forgotten" in caplog.text
    assert store.stretches("BTC", 60) == [Stretch("b", T0 + 600, T0 + 1140)]  # recorded afresh from here on
    assert joins(store, 60) == (T0 + 600,)


def test_an_unreadable_sources_file_is_not_written_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A read error is no garbled file: writing one stretch over it would lose every join it records."""
    store = HistoryStore(tmp_path, durable=False)
    store.merge("BTC", bars(T0, 10), "a")
    store.merge("BTC", bars(T0 + 600, 10), "b")
    path = store.folder("BTC", 60) / SOURCES_FILE
    kept = path.read_bytes()
    path.unlink()
    path.mkdir()  # reading it now fails with IsADirectoryError
    with caplog.at_level(logging.WARNING, logger="core.history_store"):
        assert store.merge("BTC", bars(T0 + 1200, 10), "c").new == 10  # the bars are stored all the same
    assert "sources not recorded" in caplog.text
    with pytest.raises(StoreUnreadableError, match="sources unreadable"):
        store.read_sourced("BTC", 60, 0, 2 ** 40)  # training is told, not given pieces spanning joins
    path.rmdir()
    path.write_bytes(kept)
    assert store.read_sourced("BTC", 60, 0, 2 ** 40)[1] == (T0 + 600, T0 + 1200)


def joins(store: HistoryStore, step: int) -> tuple[int, ...]:
    return store.read_sourced("BTC", step, 0, 2 ** 40)[1]


def test_the_store_records_joins_and_training_from_it_splits_there(tmp_path: Path) -> None:
    """Through the retrain's reader (both steps merged) and through the store itself (one step)."""
    store = HistoryStore(tmp_path, durable=False)
    store.append("BTC", bars(T0, 600))  # bars of unknown source (a store older than sources.json)
    store.merge("BTC", bars(T0 + 600 * 60, 600), "binance")
    assert joins(store, 60) == (T0 + 600 * 60,)  # the feed's stretch begins after bars of no known source
    switch = T0 + 1200 * 60 + 3 * 60  # three minutes into a 5-minute bar
    store.merge("BTC", bars(T0 + 1200 * 60, 3, 100.0), "binance")
    store.merge("BTC", bars(switch, 900, 100.05), "hyperliquid")  # another feed, another level
    store.merge("BTC", bars(T0, 12, step=300), "btc_5m.csv.gz")  # a native 5-minute import of the start
    assert joins(store, 60) == (T0 + 600 * 60, switch)
    assert joins(store, 300) == ()  # the store's own 5-minute bars: the import alone
    eth, eth_joins = store.read_sourced("ETH", 60, 0, 2 ** 40)
    assert len(eth) == 0 and eth_joins == ()

    cut = T0 + 3 * DAY
    reader = ResampledStore(store)
    one_minute = histories_from_cache(reader, ["BTC"], 60, T0, cut)["BTC"]
    assert T0 + 12 * 300 not in one_minute.segment_starts  # a 5-minute import splits no 1-minute data
    native = histories_from_cache(store, ["BTC"], 300, T0, cut)["BTC"]  # the store alone: the import, one source
    assert native.segment_starts == () and [len(p) for p in split_pieces(native, 300)] == [12]
    for step in (60, 300):
        pieces = split_pieces(histories_from_cache(reader, ["BTC"], step, T0, cut)["BTC"], step)
        split_at = switch - switch % step  # the 5-minute bar the switch falls in closes on the new feed
        ends = [int(p.ts[-1]) for p in pieces]
        assert split_at - step in ends, (step, ends)
        for p in pieces:  # no piece holds both feeds' levels
            assert np.ptp(p.close) == 0.0, (step, p.first_ts)


def test_a_gap_in_a_native_import_filled_from_another_feed_is_two_joins(tmp_path: Path) -> None:
    """The 5-minute import's stretch spans its own gap, where the retrain's reader fills in 5-minute bars
    resampled from the live feed's 1-minute bars: the feed changes twice inside the stretch."""
    store = HistoryStore(tmp_path, durable=False)
    store.merge("BTC", bars(T0, 1440, 100.0), "binance")
    for first, n in ((0, 100), (120, 168)):  # bars 100 to 119 missing from the file
        store.merge("BTC", bars(T0 + first * 300, n, 100.05, step=300), "btc_5m.csv.gz")
    assert store.stretches("BTC", 300) == [Stretch("btc_5m.csv.gz", T0, T0 + 287 * 300)]  # a gap is no join
    files = histories_from_cache(ResampledStore(store), ["BTC"], 300, T0, T0 + 2 * DAY)
    assert files["BTC"].segment_starts == (T0 + 100 * 300, T0 + 120 * 300)
    pieces = split_pieces(files["BTC"], 300)
    assert [len(p) for p in pieces] == [100, 20, 168] and all(np.ptp(p.close) == 0.0 for p in pieces)

    # The same feed at both steps (a sync that stored both): the fill is no join.
    same = HistoryStore(tmp_path / "same", durable=False)
    same.merge("BTC", bars(T0, 1440, 100.0), "binance")
    for first, n in ((0, 100), (120, 168)):
        same.merge("BTC", bars(T0 + first * 300, n, 100.0, step=300), "binance")
    one = histories_from_cache(ResampledStore(same), ["BTC"], 300, T0, T0 + 2 * DAY)["BTC"]
    assert one.segment_starts == () and [len(p) for p in split_pieces(one, 300)] == [288]


def test_bars_owed_from_days_before_claim_only_their_own_days(tmp_path: Path) -> None:
    """The refresh also stores cached bars of a day the store lost (a torn day set aside): one stretch from
    that day to now would claim the imported days between, and lose their joins."""
    store = HistoryStore(tmp_path, durable=False)
    store.merge("BTC", bars(T0, 3 * 1440), "btc_1m.csv.gz")
    store.merge("BTC", bars(T0 + 3 * DAY, 1440), "binance")
    owed_and_new = bars(T0, 1440).merge(bars(T0 + 4 * DAY, 60))  # day 0 rewritten, and the newest hour
    store.merge("BTC", owed_and_new, "binance")
    assert store.stretches("BTC", 60) == [Stretch("binance", T0, T0 + DAY - 60),
                                          Stretch("btc_1m.csv.gz", T0 + DAY, T0 + 3 * DAY - 60),
                                          Stretch("binance", T0 + 3 * DAY, T0 + 4 * DAY + 59 * 60)]
