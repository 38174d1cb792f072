"""``synth-miner data ...`` through typer's CliRunner, against real files, a real Redis and a local server."""

import json
import re
import socket
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import redis
from typer.testing import CliRunner

from core.cache_redis import RedisHistoryCache
from core.constants import LATEST_PRICE_KEY, SECONDS_PER_DAY
from core.csv_history import read_csv, write_csv
from core.fake_providers import FakeMarket, FakeServerThread
from core.history_store import HistoryStore
from core.prices import PriceHistory
from synth_miner.cli_data import app, assets_for_stem, parse_time
from tests.conftest import free_port

runner = CliRunner()


@pytest.fixture(scope="module")
def csv_dir(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """Real rows from before each file's held-out boundary, in the shared-data format."""
    out = tmp_path_factory.mktemp("cli_csv")
    manifest = json.loads((shared_data / "manifest.json").read_text())
    cut = manifest["btc_1m"]["eval_start_ts"]
    write_csv(out / "btc_1m.csv.gz", read_csv(shared_data / "btc_1m.csv.gz", 60).between(cut - 3 * 86_400, cut))
    cut = manifest["spy_5m"]["eval_start_ts"]
    write_csv(out / "spy_5m.csv.gz", read_csv(shared_data / "spy_5m.csv.gz", 300).between(cut - 5 * 86_400, cut))
    (out / "README.md").write_text("not a price file\n")
    return out


def test_import_then_status(csv_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["import", str(csv_dir), "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    store = HistoryStore(tmp_path / "history")
    btc = read_csv(csv_dir / "btc_1m.csv.gz", 60)
    np.testing.assert_array_equal(store.read("BTC", 60, 0, 2 ** 40).close, btc.close)
    spy = read_csv(csv_dir / "spy_5m.csv.gz", 300)
    for asset in ("SPYX", "SP500"):  # both registry assets priced from the spy files
        assert len(store.read(asset, 300, 0, 2 ** 40)) == len(spy)
    assert "btc_1m.csv.gz" in result.output and "README" not in result.output

    again = runner.invoke(app, ["import", str(csv_dir), "--data-dir", str(tmp_path), "--asset", "btc"])
    assert again.exit_code == 0 and "btc_1m" in again.output and "SPYX" not in again.output
    assert "had another close" not in again.output

    # Bars a live provider stored with other closes: the import replaces them and says how many.
    store.append("BTC", type(btc)(60, btc.ts[:7], btc.close[:7] * 1.001))
    over = runner.invoke(app, ["import", str(csv_dir), "--data-dir", str(tmp_path), "--asset", "btc"])
    assert over.exit_code == 0 and "7 stored bar(s) had another close" in over.output, over.output
    np.testing.assert_array_equal(store.read("BTC", 60, 0, 2 ** 40).close, btc.close)

    status = runner.invoke(app, ["status", "--data-dir", str(tmp_path)])
    assert status.exit_code == 0, status.output
    row = next(line for line in status.output.splitlines() if "BTC" in line)
    assert str(len(btc)) in row and " 60 " in row
    assert "SP500" in status.output and "SPYX" in status.output


def test_import_refuses_a_file_with_rows_after_now_and_leaves_out_a_bar_in_progress(
        csv_dir: Path, tmp_path: Path) -> None:
    """Rows stamped after now (a replay file shifted to end in the future, local times written as UTC) were
    stored: once their time came, the refresh served them and fetched only after them, so the real bars never
    replaced them. The file is refused whole, by name; the folder's other files are imported."""
    btc = read_csv(csv_dir / "btc_1m.csv.gz", 60)
    spy = read_csv(csv_dir / "spy_5m.csv.gz", 300)
    now = int(time.time()) // 60 * 60
    folder = tmp_path / "shifted"
    folder.mkdir()
    write_csv(folder / "btc_1m.csv.gz", PriceHistory(60, btc.ts - btc.ts[-1] + now + 7200, btc.close))
    write_csv(folder / "spy_5m.csv.gz", spy)
    result = runner.invoke(app, ["import", str(folder), "--data-dir", str(tmp_path)])
    said = one_line(result.output)
    assert result.exit_code == 1 and "120 row(s) start after now" in said and "nothing of it imported" in said, said
    store = HistoryStore(tmp_path / "history")
    assert len(store.read("BTC", 60, 0, 2 ** 41)) == 0
    assert len(store.read("SPYX", 300, 0, 2 ** 41)) == len(spy)

    # Ending in the minute under way: that bar's close is not final yet, the others are imported.
    write_csv(folder / "btc_1m.csv.gz", PriceHistory(60, btc.ts - btc.ts[-1] + now, btc.close))
    result = runner.invoke(app, ["import", str(folder), "--data-dir", str(tmp_path), "--asset", "BTC"])
    assert result.exit_code == 0, result.output
    stored = store.read("BTC", 60, 0, 2 ** 41)
    assert len(stored) == len(btc) - 1 and int(stored.ts[-1]) == now - 60


def test_import_leaves_the_held_out_rows_out_unless_asked(shared_data: Path, tmp_path: Path) -> None:
    """The store is what the weekly retrain trains on: `data import ../shared/data` must not hand it the
    held-out windows (rows from each file's eval_start_ts), which only the final measurement may read."""
    cut = json.loads((shared_data / "manifest.json").read_text())["btc_1m"]["eval_start_ts"]
    folder = tmp_path / "csv"
    folder.mkdir()
    rows = read_csv(shared_data / "btc_1m.csv.gz", 60).between(cut - 86_400, cut + 86_400)
    write_csv(folder / "btc_1m.csv.gz", rows)
    (folder / "manifest.json").write_text(json.dumps({"btc_1m": {"eval_start_ts": cut}}))
    result = runner.invoke(app, ["import", str(folder), "--data-dir", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    stored = HistoryStore(tmp_path / "a" / "history").read("BTC", 60, 0, 2 ** 40)
    assert stored.last_ts == cut - 60 and len(stored) == len(rows.between(0, cut))
    assert "1440 rows from" in one_line(result.output), result.output
    everything = runner.invoke(app, ["import", str(folder), "--data-dir", str(tmp_path / "b"), "--include-held-out"])
    assert everything.exit_code == 0, everything.output
    assert len(HistoryStore(tmp_path / "b" / "history").read("BTC", 60, 0, 2 ** 40)) == len(rows)
    (folder / "manifest.json").write_text("{ not json")  # unreadable: nothing is imported past a cut it may name
    bad = runner.invoke(app, ["import", str(folder), "--data-dir", str(tmp_path / "c")])
    assert bad.exit_code == 2 and "unreadable" in one_line(bad.output), bad.output
    assert not (tmp_path / "c" / "history").exists()


def test_import_stores_each_manifest_segment_as_a_source_and_training_splits_at_its_start(
        shared_data: Path, tmp_path: Path) -> None:
    """A file joins several sources (the manifest's segments): training from the file splits at each join,
    and training from the store it was imported into must too."""
    from core.datasets import histories_from_cache
    from core.retraining import ResampledStore

    cut = json.loads((shared_data / "manifest.json").read_text())["btc_1m"]["eval_start_ts"]
    folder = tmp_path / "csv"
    folder.mkdir()
    write_csv(folder / "btc_1m.csv.gz", read_csv(shared_data / "btc_1m.csv.gz", 60).between(cut - 2 * 86_400, cut))
    joined = cut - 86_400 + 7 * 60

    def utc(ts: int) -> str:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")

    segments = [{"src": "feed a", "start": utc(cut - 2 * 86_400)}, {"src": "feed b", "start": utc(joined)}]
    (folder / "manifest.json").write_text(json.dumps({"btc_1m": {"eval_start_ts": cut, "segments": segments}}))
    result = runner.invoke(app, ["import", str(folder), "--data-dir", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    store = HistoryStore(tmp_path / "a" / "history")
    assert joined in store.read_sourced("BTC", 60, 0, 2 ** 40)[1]
    for step in (60, 300):
        files = histories_from_cache(ResampledStore(store), ["BTC"], step, 0, cut)
        assert joined - joined % step in files["BTC"].segment_starts
    status = runner.invoke(app, ["status", "--data-dir", str(tmp_path / "a")])
    assert status.exit_code == 0, status.output
    assert f"btc_1m.csv.gz@{utc(joined)[:16]} (+1 earlier)" in one_line(status.output), status.output
    sources = store.folder("BTC", 60) / "sources.json"
    kept = sources.read_bytes()
    sources.unlink()
    sources.mkdir()  # unreadable: the row says so, no traceback
    unreadable = runner.invoke(app, ["status", "--data-dir", str(tmp_path / "a")])
    assert unreadable.exit_code == 0 and "sources unreadable" in one_line(unreadable.output), unreadable.output
    sources.rmdir()
    sources.write_bytes(kept)

    # A later import of the file without its first segment's rows: the segment keeps its name, so it does
    # not merge with the first one's stored stretch (the join stays).
    write_csv(folder / "btc_1m.csv.gz", read_csv(shared_data / "btc_1m.csv.gz", 60).between(joined, cut))
    assert runner.invoke(app, ["import", str(folder), "--data-dir", str(tmp_path / "a")]).exit_code == 0
    assert joined in store.read_sourced("BTC", 60, 0, 2 ** 40)[1]

    # A segment start that is no time: one line in the table, no traceback, nothing stored.
    segments[1]["start"] = "2025-13-01 00:00:00"
    (folder / "manifest.json").write_text(json.dumps({"btc_1m": {"eval_start_ts": cut, "segments": segments}}))
    bad = runner.invoke(app, ["import", str(folder), "--data-dir", str(tmp_path / "b")])
    assert bad.exit_code == 1 and "is not a time" in one_line(bad.output), bad.output
    assert not HistoryStore(tmp_path / "b" / "history").assets()


def test_import_stores_every_segment_around_a_day_it_cannot_write(shared_data: Path, tmp_path: Path) -> None:
    """One corrupt day in the store: the file's other days, in its other segments too, are stored."""
    cut = json.loads((shared_data / "manifest.json").read_text())["btc_1m"]["eval_start_ts"]
    folder = tmp_path / "csv"
    folder.mkdir()
    rows = read_csv(shared_data / "btc_1m.csv.gz", 60).between(cut - 4 * 86_400, cut)
    write_csv(folder / "btc_1m.csv.gz", rows)
    day = datetime.fromtimestamp(cut - 2 * 86_400, UTC).strftime("%Y-%m-%d %H:%M:%S")  # segment 2 from day 2
    segments = [{"src": "a", "start": datetime.fromtimestamp(cut - 4 * 86_400, UTC).strftime("%Y-%m-%d %H:%M:%S")},
                {"src": "b", "start": day}]
    (folder / "manifest.json").write_text(json.dumps({"btc_1m": {"eval_start_ts": cut, "segments": segments}}))
    store = HistoryStore(tmp_path / "data" / "history")
    first_day = (cut - 4 * 86_400) // 86_400
    store.partition("BTC", 60, first_day).parent.mkdir(parents=True)
    store.partition("BTC", 60, first_day).write_bytes(b"torn")  # day 0: unreadable, so not written
    result = runner.invoke(app, ["import", str(folder), "--data-dir", str(tmp_path / "data")])
    assert result.exit_code == 1 and "4 bytes, expected" in one_line(result.output), result.output
    stored = store.read("BTC", 60, cut - 3 * 86_400, cut)
    assert len(stored) == len(rows.between(cut - 3 * 86_400, cut))  # days 1..3, both segments


def test_import_cuts_an_assets_files_at_their_earliest_boundary_and_refuses_files_without_one(
        shared_data: Path, tmp_path: Path) -> None:
    """The retrain resamples 5-minute bars from stored 1-minute ones: spy_1m, cut a week after spy_5m,
    brought spy_5m's held-out week back into training that way; and tsla_1m, whose manifest entry gives no
    boundary (training refuses it), was imported whole, held-out days included."""
    from core.retraining import ResampledStore

    manifest = json.loads((shared_data / "manifest.json").read_text())
    cut_1m, cut_5m = manifest["spy_1m"]["eval_start_ts"], manifest["spy_5m"]["eval_start_ts"]
    assert cut_5m < cut_1m and manifest["tsla_1m"]["eval_start_ts"] is None  # the shared folder's facts
    folder = tmp_path / "csv"
    folder.mkdir()
    for name in ("spy_1m", "spy_5m", "tsla_1m"):
        (folder / f"{name}.csv.gz").write_bytes((shared_data / f"{name}.csv.gz").read_bytes())
    (folder / "manifest.json").write_text(json.dumps({k: manifest[k] for k in ("spy_1m", "spy_5m", "tsla_1m")}))
    result = runner.invoke(app, ["import", str(folder), "--data-dir", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "refused: no eval_start_ts" in one_line(result.output) and "tsla_1m" in result.output
    store = HistoryStore(tmp_path / "a" / "history")
    assert store.read("TSLAX", 60, 0, 2 ** 40).first_ts is None  # nothing of it
    assert store.read("SPYX", 60, 0, 2 ** 40).last_ts < cut_5m  # the asset's earliest boundary
    resampled = ResampledStore(store).read("SPYX", 300, 0, 2 ** 40)
    assert len(resampled) and int(resampled.ts[-1]) + 300 <= cut_5m
    only_refused = runner.invoke(app, ["import", str(folder), "--asset", "TSLAX", "--data-dir", str(tmp_path / "b")])
    assert only_refused.exit_code == 1 and "refused" in one_line(only_refused.output)


def test_status_shows_the_cache_when_redis_is_given(csv_dir: Path, tmp_path: Path, redis_url: str) -> None:
    runner.invoke(app, ["import", str(csv_dir), "--data-dir", str(tmp_path), "--asset", "BTC"])
    client = redis.Redis.from_url(redis_url)
    RedisHistoryCache(client).write("BTC", read_csv(csv_dir / "btc_1m.csv.gz", 60).tail(3600))
    client.close()
    result = runner.invoke(app, ["status", "--data-dir", str(tmp_path), "--redis-url", redis_url])
    assert result.exit_code == 0, result.output
    assert "Redis cache" in result.output
    cache_rows = [line for line in result.output.split("Redis cache", 1)[1].splitlines() if "BTC" in line]
    assert cache_rows and " 60 " in cache_rows[0]


def test_status_says_to_check_the_password_when_redis_refuses_it(csv_dir: Path, tmp_path: Path) -> None:
    """As `synth-miner status` does: redis-py's "invalid username-password pair" or "HELLO must be called with the
    client already authenticated" said nothing of where the password comes from."""
    from tests.conftest import RedisServer

    runner.invoke(app, ["import", str(csv_dir), "--data-dir", str(tmp_path), "--asset", "BTC"])
    server = RedisServer(tmp_path, password="right").start()
    try:
        for url in (server.url.replace(":right@", ":wrong@"), server.url.replace(":right@", "")):
            result = runner.invoke(app, ["status", "--data-dir", str(tmp_path), "--redis-url", url])
            text = one_line(result.output)
            assert result.exit_code == 0 and "history store" in text, text  # the store's table is still shown
            assert "cache unavailable:" in text and "(check the password in SYNTH_REDIS_URL)" in text, text
    finally:
        server.stop()


def test_status_shows_a_damaged_cache_entry_as_its_assets_row(csv_dir: Path, tmp_path: Path, redis_url: str) -> None:
    """Before: a day string of the wrong size (and a span or latest price that is no number, which the cache now
    refuses too) ended `data status` in a CacheError traceback, no cache row printed."""
    runner.invoke(app, ["import", str(csv_dir), "--data-dir", str(tmp_path), "--asset", "BTC"])
    client = redis.Redis.from_url(redis_url)
    cache = RedisHistoryCache(client)
    hist = read_csv(csv_dir / "btc_1m.csv.gz", 60).tail(3600)
    cache.write("BTC", hist)
    cache.write("ETH", hist)
    client.hset(LATEST_PRICE_KEY.format(asset="BTC"), mapping={"price": b"nan", "publish_time": 1, "confidence": b""})
    client.set(cache.day_key("ETH", 60, int(hist.ts[-1]) // SECONDS_PER_DAY), b"x" * 13)
    # A day of another type read as a day of gaps: SOL's row showed the hour as 0 rows, nothing damaged.
    cache.write("SOL", hist)
    sol_day = cache.day_key("SOL", 60, int(hist.ts[-1]) // SECONDS_PER_DAY)
    client.delete(sol_day)
    client.hset(sol_day, "0", b"100.0")
    client.close()
    result = runner.invoke(app, ["status", "--data-dir", str(tmp_path), "--redis-url", redis_url, "--asset", "BTC",
                                 "--asset", "ETH", "--asset", "SOL"])
    assert result.exit_code == 0, result.output
    rows = result.output.split("Redis cache", 1)[1].splitlines()
    assert any("synth:latest:BTC" in line for line in rows) and any("synth:cache:ETH" in line for line in rows)
    table = one_line(result.output.split("Redis cache", 1)[1])  # the cell wraps: its halves are apart
    assert f"SOL 60 - - - - {sol_day} is a Redis" in table and "hash, not a day of bars" in table
    assert [line for line in rows if "BTC" in line and " 60 " in line]  # its bars are still shown


def test_sync_backfills_the_store_from_a_provider(csv_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    market = FakeMarket(csv_dir)
    with FakeServerThread("binance", market) as fake:
        monkeypatch.setenv("SYNTH_BINANCE_URL", fake.url)
        now = int(time.time())
        since = str(now - 2 * SECONDS_PER_DAY)
        result = runner.invoke(app, ["sync", "--asset", "BTC", "--since", since, "--provider", "binance",
                                     "--data-dir", str(tmp_path), "--chunk-days", "0.5"])
        assert result.exit_code == 0, result.output
        stored = HistoryStore(tmp_path / "history").read("BTC", 60, 0, 2 ** 40)
        expected = market.bars("BTC", 60).between(int(since), now).known_at(now)
        assert abs(len(stored) - len(expected)) <= 1  # the clock may tick over a minute during the run
        np.testing.assert_array_equal(stored.ts[: len(expected) - 1], expected.ts[: len(expected) - 1])
        assert f"{len(stored)} new" in result.output

        fake.faults.status = 500
        monkeypatch.setenv("SYNTH_HTTP_RETRIES", "0")
        failed = runner.invoke(app, ["sync", "--asset", "BTC", "--since", since, "--provider", "binance",
                                     "--data-dir", str(tmp_path)])
    assert failed.exit_code == 1 and "ProviderUnavailable" in failed.output


def test_sync_from_a_provider_whose_clock_runs_ahead_stores_nothing(csv_dir: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Its bars are stamped an hour later than they closed: `data sync` stored two days of them as dated, for
    good (training and calibration read the store). It now says by how much the clock runs ahead, and stops."""
    with FakeServerThread("binance", FakeMarket(csv_dir, lambda: time.time() + 3600)) as fake:
        monkeypatch.setenv("SYNTH_BINANCE_URL", fake.url)
        result = runner.invoke(app, ["sync", "--asset", "BTC", "--since", str(int(time.time()) - 2 * SECONDS_PER_DAY),
                                     "--provider", "binance", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert re.search(r"binance clock runs 3[45]\d\d s ahead of our clock: nothing synced", one_line(result.output))
    assert HistoryStore(tmp_path / "history").span("BTC", 60) is None


def test_sync_stores_the_pages_before_a_failed_one_then_stops_and_a_rerun_resumes(
        csv_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One chunk of two Binance pages whose second answers 503 on every attempt: the first page's bars are
    stored (they were all lost before), the command stops on one line with a non-zero exit, and the
    rerun it names, the page healthy again, fills the rest with no gap and no duplicate."""
    now = int(time.time()) // 60 * 60
    since = now - SECONDS_PER_DAY
    monkeypatch.setenv("SYNTH_HTTP_RETRIES", "0")
    market = FakeMarket(csv_dir)
    args = ["sync", "--asset", "BTC", "--provider", "binance", "--data-dir", str(tmp_path), "--chunk-days", "1"]
    store = HistoryStore(tmp_path / "history")
    with FakeServerThread("binance", market) as fake:
        monkeypatch.setenv("SYNTH_BINANCE_URL", fake.url)
        fake.faults.set(down_from=(since + 1000 * 60,))  # the second page
        failed = runner.invoke(app, [*args, "--since", str(since)])
        assert failed.exit_code == 1, failed.output
        lines = failed.output.strip().splitlines()
        assert len(lines) == 1 and "PartialHistoryError" in lines[0] and "503" in lines[0], failed.output
        first_page = market.bars("BTC", 60).between(since, since + 1000 * 60)
        stored = store.read("BTC", 60, 0, 2 ** 40)
        np.testing.assert_array_equal(stored.ts, first_page.ts)
        np.testing.assert_array_equal(stored.close, first_page.close)
        resume = lines[0].rsplit("--since ", 1)[1].split()[0]
        assert int(resume) == since + 1000 * 60  # right after the stored bars

        fake.faults.reset()
        until = str(now - 60)  # a fixed end: the clock may tick over a minute during the run
        again = runner.invoke(app, [*args, "--since", resume, "--until", until])
    assert again.exit_code == 0, again.output
    expected = market.bars("BTC", 60).between(since, int(until))
    stored = store.read("BTC", 60, 0, 2 ** 40)
    assert len(expected) > 1400
    np.testing.assert_array_equal(stored.ts, expected.ts)  # no gap, no duplicate
    np.testing.assert_array_equal(stored.close, expected.close)


def test_sync_goes_on_past_a_damaged_partition_and_says_so(csv_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A torn day in the range (compaction runs daily; before the workers run, never): the sync stored the
    days before it, then stopped, and its rerun stopped at the same day, so no later day was ever backfilled.
    Now every other day is fetched and stored, and the command fails naming the damaged partition."""
    now = int(time.time()) // 60 * 60
    # From an hour into the day three days back, to a fixed end (the clock may tick during the run): the torn
    # day is a whole UTC day with a whole one after it at any time of day (counted from now, the day after it
    # held under 24 h from 23:00 UTC on).
    since, until = (now // SECONDS_PER_DAY - 3) * SECONDS_PER_DAY + 3600, now - 60
    torn_day = since // SECONDS_PER_DAY + 1
    store = HistoryStore(tmp_path / "history")
    market = FakeMarket(csv_dir)
    truth = market.bars("BTC", 60).between(since, until)
    store.append("BTC", truth.between(torn_day * SECONDS_PER_DAY, (torn_day + 1) * SECONDS_PER_DAY))
    part = store.partition("BTC", 60, torn_day)
    raw = bytearray(part.read_bytes())
    raw[-1] ^= 0xFF
    part.write_bytes(bytes(raw))
    with FakeServerThread("binance", market) as fake:
        monkeypatch.setenv("SYNTH_BINANCE_URL", fake.url)
        result = runner.invoke(app, ["sync", "--asset", "BTC", "--since", str(since), "--until", str(until),
                                     "--provider", "binance", "--data-dir", str(tmp_path), "--chunk-days", "0.25"])
    said = one_line(result.output)
    assert result.exit_code == 1 and "checksum mismatch" in said and part.name in said, result.output
    assert part.read_bytes() == raw  # left for compaction to set aside
    after = truth.between((torn_day + 1) * SECONDS_PER_DAY, until)
    assert len(after) > 1400  # a whole day at least (the replayed minutes have a few gaps)
    stored = store.read("BTC", 60, (torn_day + 1) * SECONDS_PER_DAY, until)
    np.testing.assert_array_equal(stored.ts, after.ts)  # the days after the torn one (were not fetched)
    np.testing.assert_array_equal(stored.close, after.close)
    before = truth.between(since, torn_day * SECONDS_PER_DAY)
    np.testing.assert_array_equal(store.read("BTC", 60, since, torn_day * SECONDS_PER_DAY).ts, before.ts)
    assert f"{len(before) + len(after)} new bar(s) stored" in said, result.output


def test_sync_screens_bars_like_the_refresh_so_a_lone_bad_print_never_reaches_the_store(
        csv_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A provider's x100 print (a wrong exponent) is dropped, across chunk joins too; the good bars are stored."""
    market = FakeMarket(csv_dir)
    with FakeServerThread("binance", market) as fake:
        monkeypatch.setenv("SYNTH_BINANCE_URL", fake.url)
        fake.faults.set(spike_every=97)
        now = int(time.time())
        since = now - SECONDS_PER_DAY
        result = runner.invoke(app, ["sync", "--asset", "BTC", "--since", str(since), "--provider", "binance",
                                     "--data-dir", str(tmp_path), "--chunk-days", "0.25"])
    assert result.exit_code == 0, result.output
    stored = HistoryStore(tmp_path / "history").read("BTC", 60, 0, 2 ** 40)
    truth = market.bars("BTC", 60).between(since, now)
    spikes = truth.ts[truth.ts // 60 % 97 == 0]
    assert len(spikes) > 10 and not np.isin(spikes, stored.ts).any()
    assert np.isin(truth.ts, stored.ts).sum() >= len(truth) - len(spikes) - 2  # the clock may tick a minute
    np.testing.assert_array_equal(stored.close, truth.close[np.isin(truth.ts, stored.ts)])  # no x100 close
    assert "implausible bar(s) dropped" in result.output


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    assert runner.invoke(app, ["sync", "--asset", "NOPE", "--since", "2026-01-01"]).exit_code == 2
    assert runner.invoke(app, ["sync", "--asset", "BTC", "--since", "yesterday"]).exit_code == 2
    assert runner.invoke(app, ["sync", "--asset", "BTC", "--since", "2026-01-02", "--until", "2026-01-01"]
                         ).exit_code == 2
    assert runner.invoke(app, ["import", str(tmp_path / "missing")]).exit_code == 2
    assert runner.invoke(app, ["serve-fake", "--provider", "nope", "--port", "1", "--data-dir", str(tmp_path)]
                         ).exit_code == 2


def one_line(output: str) -> str:
    """rich and typer wrap long lines, typer's errors inside a box."""
    return " ".join(output.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())


def test_unknown_assets_are_refused_and_nothing_matched_fails(csv_dir: Path, tmp_path: Path) -> None:
    for command in (["import", str(csv_dir)], ["status"]):
        unknown = runner.invoke(app, [*command, "--data-dir", str(tmp_path), "--asset", "FOO"])
        said = one_line(unknown.output)
        assert unknown.exit_code == 2 and "unknown asset(s) FOO" in said and "BTC" in said, unknown.output
    assert not (tmp_path / "history").exists()

    # Nothing to import: a known asset without a file in the folder, or a folder with no price file.
    none = runner.invoke(app, ["import", str(csv_dir), "--data-dir", str(tmp_path), "--asset", "ETH"])
    assert none.exit_code == 1 and "nothing imported" in one_line(none.output) and "ETH" in one_line(none.output)
    (tmp_path / "empty").mkdir()
    empty = runner.invoke(app, ["import", str(tmp_path / "empty"), "--data-dir", str(tmp_path)])
    assert empty.exit_code == 1 and "nothing imported" in one_line(empty.output)

    # Nothing in the store, or nothing for the asset asked: a non-zero exit, not an empty table.
    blank = runner.invoke(app, ["status", "--data-dir", str(tmp_path)])
    assert blank.exit_code == 1 and "no history in the store at" in one_line(blank.output), blank.output
    assert runner.invoke(app, ["import", str(csv_dir), "--data-dir", str(tmp_path), "--asset", "btc"]).exit_code == 0
    eth = runner.invoke(app, ["status", "--data-dir", str(tmp_path), "--asset", "eth"])
    assert eth.exit_code == 1 and "no history for ETH in the store" in one_line(eth.output), eth.output
    both = runner.invoke(app, ["status", "--data-dir", str(tmp_path), "--asset", "btc", "--asset", "ETH"])
    assert both.exit_code == 0 and "no history for ETH" in one_line(both.output), both.output


def test_a_file_stem_outside_the_registry_can_still_be_named(csv_dir: Path, tmp_path: Path) -> None:
    """doge_1m.csv imports as DOGE (assets_for_stem): naming it is no error, in import and in status."""
    folder = tmp_path / "csv"
    folder.mkdir()
    write_csv(folder / "doge_1m.csv.gz", read_csv(csv_dir / "btc_1m.csv.gz", 60).tail(600))
    imported = runner.invoke(app, ["import", str(folder), "--data-dir", str(tmp_path), "--asset", "doge"])
    assert imported.exit_code == 0 and "DOGE" in imported.output, imported.output
    status = runner.invoke(app, ["status", "--data-dir", str(tmp_path), "--asset", "DOGE"])
    assert status.exit_code == 0 and "DOGE" in status.output, status.output


def test_serve_fake_answers_in_the_provider_format(csv_dir: Path) -> None:
    port = free_port()
    replies: list[object] = []

    def client() -> None:
        url = f"http://127.0.0.1:{port}/api/v3/klines?symbol=BTCUSDT&interval=1m&limit=3"
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    replies.append(json.loads(resp.read()))
                    return
            except OSError:
                time.sleep(0.1)

    thread = threading.Thread(target=client)
    thread.start()
    result = runner.invoke(app, ["serve-fake", "--provider", "binance", "--port", str(port), "--data-dir",
                                 str(csv_dir), "--lead-s", "0", "--duration", "2.5"])
    thread.join()
    assert result.exit_code == 0, result.output
    assert f"127.0.0.1:{port}" in result.output
    assert replies and isinstance(replies[0], list) and len(replies[0]) == 3 and len(replies[0][0]) == 12


def test_helpers() -> None:
    assert parse_time("2026-01-01") == 1_767_225_600
    assert parse_time("2026-01-01T01:00:00+01:00") == 1_767_225_600
    assert parse_time("1767225600") == 1_767_225_600
    assert assets_for_stem("spy") == ["SPYX", "SP500"] and assets_for_stem("btc") == ["BTC"]
    assert assets_for_stem("doge") == ["DOGE"]


def test_a_bad_redis_url_or_port_is_a_usage_error_not_a_traceback(csv_dir: Path, tmp_path: Path) -> None:
    assert runner.invoke(app, ["import", str(csv_dir), "--data-dir", str(tmp_path)]).exit_code == 0
    bad_url = runner.invoke(app, ["status", "--data-dir", str(tmp_path), "--redis-url", "http://127.0.0.1:1"])
    assert bad_url.exit_code == 2, bad_url.output
    assert "--redis-url" in one_line(bad_url.output) and "redis://" in one_line(bad_url.output), bad_url.output

    too_big = runner.invoke(app, ["serve-fake", "--provider", "binance", "--port", "99999", "--data-dir",
                                  str(csv_dir), "--duration", "0.1"])
    assert too_big.exit_code == 2 and "--port" in one_line(too_big.output), too_big.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = runner.invoke(app, ["serve-fake", "--provider", "binance", "--port", str(taken.getsockname()[1]),
                                   "--data-dir", str(csv_dir), "--duration", "0.1"])
    assert busy.exit_code == 1 and not isinstance(busy.exception, OSError), busy.output
    assert "address already in use" in one_line(busy.output), busy.output


def test_a_bad_setting_in_the_environment_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNTH_RATE_LIMIT_PER_MINUTE", "abc")
    result = runner.invoke(app, ["status", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "SYNTH_RATE_LIMIT_PER_MINUTE" in one_line(result.output), result.output


def test_an_unreadable_csv_folder_is_one_line_not_a_traceback(csv_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    listing = Path.iterdir

    def denied(self: Path) -> object:  # chmod 000 does not stop root, which runs the tests in CI
        if self == csv_dir:
            raise PermissionError(13, "Permission denied", str(self))
        return listing(self)

    monkeypatch.setattr(Path, "iterdir", denied)
    result = runner.invoke(app, ["import", str(csv_dir), "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and not isinstance(result.exception, OSError), result.exception
    assert "cannot be read: Permission denied" in one_line(result.output), result.output


def test_sync_takes_a_lower_case_asset_like_every_other_command(csv_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeServerThread("binance", FakeMarket(csv_dir)) as fake:
        monkeypatch.setenv("SYNTH_BINANCE_URL", fake.url)
        result = runner.invoke(app, ["sync", "--asset", "btc", "--since", str(int(time.time()) - 3600),
                                     "--provider", "binance", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert HistoryStore(tmp_path / "history").assets() == ["BTC"] and "BTC via binance" in result.output


def test_sync_refuses_replayed_prices(csv_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shifted old rows (held-out ones too, from ../shared/data) passed for real history in the store the
    retrain trains on; the refresh job never stores them either."""
    monkeypatch.setenv("SYNTH_REPLAY_DIR", str(csv_dir))
    for how in (["--provider", "replay"], []):
        if not how:
            monkeypatch.setenv("SYNTH_PRICE_PROVIDER", "replay")  # the README's offline fleet
        result = runner.invoke(app, ["sync", "--asset", "BTC", "--since", str(int(time.time()) - 3600), *how,
                                     "--data-dir", str(tmp_path)])
        assert result.exit_code == 2 and "never written to the history store" in " ".join(result.output.split())
    assert not (tmp_path / "history").exists() or HistoryStore(tmp_path / "history").assets() == []


def test_an_unreadable_store_is_one_line_not_a_traceback(csv_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    assert runner.invoke(app, ["import", str(csv_dir), "--data-dir", str(tmp_path)]).exit_code == 0
    listing = Path.iterdir
    denied_at = {tmp_path / "history"}

    def denied(self: Path) -> object:
        if self in denied_at:
            raise PermissionError(13, "Permission denied", str(self))
        return listing(self)

    monkeypatch.setattr(Path, "iterdir", denied)
    result = runner.invoke(app, ["status", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and not isinstance(result.exception, OSError), result.exception
    assert "cannot be read: Permission denied" in one_line(result.output), result.output

    denied_at = {tmp_path / "history" / "BTC"}  # one asset's folder: the others are still shown
    result = runner.invoke(app, ["status", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0 and not isinstance(result.exception, OSError), result.exception
    btc = next(line for line in result.output.splitlines() if "BTC" in line)
    assert "unreadable" in btc and "SPYX" in result.output


def test_serve_fake_refuses_a_folder_without_price_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not prices\n")
    result = runner.invoke(app, ["serve-fake", "--provider", "binance", "--port", "0", "--data-dir", str(tmp_path),
                                 "--duration", "0.1"])
    assert result.exit_code == 2 and "holds no" in one_line(result.output), result.output


def table_rows(output: str, title: str) -> list[dict[str, str]]:
    """The rows of the rich table printed under ``title``, each as {column header: cell text}."""
    lines = output.split(title, 1)[1].splitlines()
    header = next(line for line in lines if line.startswith("┃"))
    names = [cell.strip() for cell in header.strip("┃").split("┃")]
    rows = []
    for line in lines[lines.index(header) + 1:]:
        if line.startswith("└"):
            break
        if line.startswith("│"):
            rows.append(dict(zip(names, (cell.strip() for cell in line.strip("│").split("│")), strict=True)))
    return rows


def test_status_shows_rows_gaps_missing_bars_and_freshness_each_in_its_own_column(
        tmp_path: Path, redis_url: str) -> None:
    """The figures that tell an operator whether to backfill: 187 rows with 2 gaps that miss 13 bars, the
    newest bar closed at the start of this minute (its age counts from its close, not its open), for the
    store and for the cache alike."""
    close_of_last = int(time.time()) // 60 * 60
    ts = close_of_last - 60 * np.arange(200, 0, -1)
    ts = np.delete(ts, [*range(50, 53), *range(100, 110)])  # 3 bars, then 10, absent
    bars = PriceHistory.from_arrays(60, ts, 100.0 + np.arange(len(ts)) * 0.01)
    HistoryStore(tmp_path / "history").append("BTC", bars)
    client = redis.Redis.from_url(redis_url)
    RedisHistoryCache(client).write("BTC", bars)
    client.close()
    before = time.time()
    result = runner.invoke(app, ["status", "--data-dir", str(tmp_path), "--redis-url", redis_url])
    after = time.time()
    assert result.exit_code == 0, result.output
    [stored] = table_rows(result.output, "history store")
    [cached] = table_rows(result.output, "Redis cache")
    assert (stored["rows"], stored["gaps"], stored["missing"]) == ("187", "2", "13"), stored
    assert stored["days"] == str(len(set((ts // SECONDS_PER_DAY).tolist())))
    assert (cached["rows"], cached["gaps"]) == ("187", "2"), cached
    for age in (stored["fresh"], cached["fresh"]):
        seconds, unit = age.split()
        assert unit == "s" and before - close_of_last - 1 <= int(seconds) <= after - close_of_last + 1, age


def test_sync_refuses_an_empty_range_and_a_step_other_than_60_or_300(tmp_path: Path) -> None:
    """Refused before any provider is asked: --since equal to --until (nothing to fetch, yet it "succeeded"),
    and a bar length the store has no files for."""
    same = runner.invoke(app, ["sync", "--asset", "BTC", "--since", "2026-01-01", "--until", "2026-01-01T00:00",
                               "--provider", "binance", "--data-dir", str(tmp_path)])
    assert same.exit_code == 2 and "--since must be before --until" in one_line(same.output), same.output
    odd = runner.invoke(app, ["sync", "--asset", "BTC", "--since", "2026-01-01", "--until", "2026-01-02",
                              "--step", "120", "--provider", "binance", "--data-dir", str(tmp_path)],
                        env={"SYNTH_BINANCE_URL": "http://127.0.0.1:1"})  # never the real one, whatever happens
    assert odd.exit_code == 2 and "step must be 60 or 300" in one_line(odd.output), odd.output
    assert not (tmp_path / "history").exists()


@pytest.mark.parametrize("days", ["inf", "nan", "0", "-1"])
def test_sync_refuses_a_chunk_that_is_not_a_number_of_days(tmp_path: Path, days: str) -> None:
    """inf and nan were tracebacks from int(); 0 and -1 quietly fetched a minute per round."""
    result = runner.invoke(app, ["sync", "--asset", "BTC", "--since", "2026-01-01", "--until", "2026-01-02",
                                 "--chunk-days", days, "--provider", "binance", "--data-dir", str(tmp_path)],
                           env={"SYNTH_BINANCE_URL": "http://127.0.0.1:1"})  # never the real one, whatever happens
    assert result.exit_code == 2 and "--chunk-days" in one_line(result.output), result.output
    assert not (tmp_path / "history").exists()


@pytest.mark.parametrize("duration", ["nan", "-1"])
def test_serve_fake_refuses_a_duration_that_is_no_time(csv_dir: Path, duration: str) -> None:
    """Both stopped at once and exited 0, as if the server had run."""
    result = runner.invoke(app, ["serve-fake", "--provider", "binance", "--port", "0", "--data-dir", str(csv_dir),
                                 "--duration", duration])
    assert result.exit_code == 2 and "--duration" in one_line(result.output), result.output


def test_a_sync_stopped_by_a_failed_page_resumes_at_the_bar_it_held_back(
        csv_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last bar before the failed page jumps and no later bar confirms it, so it is not stored: the rerun
    the command names must start at that bar, not at the failed page, or the bar is never fetched again."""
    minute = int(time.time()) // 60
    held = (minute - 441) // 1000 * 1000 * 60  # the 1000th bar of the first page, the only x100 one in it
    since = held - 999 * 60
    monkeypatch.setenv("SYNTH_HTTP_RETRIES", "0")
    market = FakeMarket(csv_dir)
    args = ["sync", "--asset", "BTC", "--provider", "binance", "--data-dir", str(tmp_path), "--chunk-days", "1"]
    store = HistoryStore(tmp_path / "history")
    with FakeServerThread("binance", market) as fake:
        monkeypatch.setenv("SYNTH_BINANCE_URL", fake.url)
        fake.faults.set(down_from=(since + 1000 * 60,), spike_every=1000)
        failed = runner.invoke(app, [*args, "--since", str(since)])
        assert failed.exit_code == 1 and "PartialHistoryError" in failed.output, failed.output
        resume = int(one_line(failed.output).rsplit("--since ", 1)[1].split()[0])
        assert resume == held, failed.output
        first_page = market.bars("BTC", 60).between(since, held)
        np.testing.assert_array_equal(store.read("BTC", 60, 0, 2 ** 40).ts, first_page.ts)

        fake.faults.reset()  # the page is back and the bar's real close is served
        until = since + 1440 * 60
        again = runner.invoke(app, [*args, "--since", str(resume), "--until", str(until)])
    assert again.exit_code == 0, again.output
    expected = market.bars("BTC", 60).between(since, until)
    stored = store.read("BTC", 60, 0, 2 ** 40)
    np.testing.assert_array_equal(stored.ts, expected.ts)  # no gap where the held-back bar was
    np.testing.assert_array_equal(stored.close, expected.close)


def test_include_held_out_imports_a_file_the_manifest_gives_no_boundary_for(csv_dir: Path, tmp_path: Path) -> None:
    """Refused by default (it may be all held out), imported whole with --include-held-out, which imports every
    row regardless of the manifest."""
    folder = tmp_path / "csv"
    folder.mkdir()
    rows = read_csv(csv_dir / "btc_1m.csv.gz", 60).tail(600)
    write_csv(folder / "tsla_1m.csv.gz", rows)
    (folder / "manifest.json").write_text(json.dumps({"tsla_1m": {"eval_start_ts": None}}))
    refused = runner.invoke(app, ["import", str(folder), "--data-dir", str(tmp_path / "a")])
    assert refused.exit_code == 1 and "refused: no eval_start_ts" in one_line(refused.output), refused.output
    everything = runner.invoke(app, ["import", str(folder), "--data-dir", str(tmp_path / "b"), "--include-held-out"])
    assert everything.exit_code == 0, everything.output
    np.testing.assert_array_equal(HistoryStore(tmp_path / "b" / "history").read("TSLAX", 60, 0, 2 ** 40).ts, rows.ts)
