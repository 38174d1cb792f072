"""ReplaySource: a CSV folder shifted once per asset, so replayed time moves on with the clock."""

from pathlib import Path

import numpy as np
import pytest

from core.cache import MemoryHistoryCache
from core.csv_history import read_csv, write_csv
from core.fake_providers import ManualClock
from core.market_calendar import in_regular_session
from core.refresh import refresh_asset
from core.settings import Settings
from core.sources.base import ProviderError
from core.sources.http import UnsupportedAssetError
from core.sources.replay import ReplaySource
from tests.provider_fixtures import T0, fake_provider_fixtures, write_held_in

csv_dir, clock, market, server = fake_provider_fixtures("binance", ["btc"], days=2, with_5m=True)


async def test_the_shift_is_fixed_so_bars_keep_their_timestamps(csv_dir: Path, clock: ManualClock) -> None:
    replay = ReplaySource(csv_dir, clock)
    before = await replay.history("BTC", T0 - 3600, T0)
    first = await replay.latest("BTC")
    clock.advance(900)
    after = await replay.history("BTC", T0 - 3600, T0 + 900)
    np.testing.assert_array_equal(after.ts, before.ts)  # nothing new in the file: nothing new served
    np.testing.assert_array_equal(after.close, before.close)
    assert await replay.latest("BTC") == first


async def test_refreshing_a_replay_never_repeats_the_file_tail(csv_dir: Path, clock: ManualClock) -> None:
    replay = ReplaySource(csv_dir, clock)
    settings = Settings(cache_days_hf=1.0, cache_days_lf=1.0)
    cache = MemoryHistoryCache()
    await refresh_asset("BTC", replay, cache, None, settings, now=int(clock()), steps=(60,))
    span = cache.span("BTC", 60)
    assert span is not None
    for _ in range(3):
        clock.advance(300)
        await refresh_asset("BTC", replay, cache, None, settings, now=int(clock()), steps=(60,))
    newest = cache.span("BTC", 60)
    assert newest is not None and newest[1] == span[1]  # before the fix, each refresh appended the tail again


async def test_steps_other_than_1m_and_5m_are_refused(csv_dir: Path, clock: ManualClock) -> None:
    """Like every live client: before the fix, step=900 (or 120) served the 5-minute rows labelled 900 s."""
    replay = ReplaySource(csv_dir, clock)
    assert (await replay.history("BTC", T0 - 7200, T0, step=300)).step == 300
    for step in (120, 900):
        with pytest.raises(ProviderError, match=f"step {step}"):
            await replay.history("BTC", T0 - 7200, T0, step=step)


async def test_an_unreadable_replay_file_is_a_provider_error(tmp_path: Path, clock: ManualClock) -> None:
    """Sources fail with ProviderError (what the refresh and the miner catch). A bad CSV leaked the reader's
    PriceDataError: ``latest`` raised it straight out of ``refresh_asset``, which reports failures instead."""
    (tmp_path / "btc_1m.csv").write_text("time,price\n60,1.0\n")
    replay = ReplaySource(tmp_path, clock)
    with pytest.raises(ProviderError, match="btc_1m"):
        await replay.history("BTC", T0 - 3600, T0)
    with pytest.raises(ProviderError):
        await replay.latest("BTC")
    report = await refresh_asset("BTC", replay, MemoryHistoryCache(), None, Settings(), now=T0, steps=(60, 300))
    assert not report.ok and report.latest is None and any(e.startswith("latest:") for e in report.errors)


async def test_an_asset_without_a_file_is_unsupported(csv_dir: Path, clock: ManualClock) -> None:
    """A permanent "no data for this asset" (UnsupportedAssetError, as a live provider without the symbol):
    the refresh reports it once instead of three warnings per asset every minute."""
    replay = ReplaySource(csv_dir, clock)
    with pytest.raises(UnsupportedAssetError, match="no replay file for XRP"):
        await replay.history("XRP", T0 - 3600, T0)
    with pytest.raises(UnsupportedAssetError, match="XRP"):
        await replay.latest("XRP")


async def test_a_step_without_a_file_is_unsupported(tmp_path: Path, shared_data: Path, clock: ManualClock) -> None:
    """A folder with 5-minute rows only has no 1-minute history: permanent too."""
    m1 = read_csv(write_held_in(tmp_path, shared_data, ["btc"], days=1) / "btc_1m.csv.gz", 60)
    (tmp_path / "m5").mkdir()
    write_csv(tmp_path / "m5" / "btc_5m.csv.gz", m1.resample(300))
    replay = ReplaySource(tmp_path / "m5", clock)
    assert len(await replay.history("BTC", 0, 2 ** 40, step=300))
    with pytest.raises(UnsupportedAssetError, match="no 60s replay history for BTC"):
        await replay.history("BTC", 0, 2 ** 40, step=60)


@pytest.fixture
def spy_dir(tmp_path: Path, shared_data: Path) -> Path:
    """Three weeks of SPY's regular-session 5-minute bars before its held-out boundary."""
    return write_held_in(tmp_path, shared_data, ["spy"], days=21, with_5m=True)


# Tuesday 2026-10-20, 12:00 UTC: the three weeks before it hold no NYSE holiday and no DST switch (a
# whole-week shift cannot keep the session across one: bars before the switch land an hour off).
OCT_20 = 1_792_497_630


async def test_an_equity_replay_keeps_its_sessions_and_plays_its_last_week_as_the_clock_moves(
        spy_dir: Path) -> None:
    """Before the fix, a 5-minute shift moved the session bars into the New York night: the equity model's
    session filter kept none of them and every SPYX forecast fell back to EWMA-t."""
    clock = ManualClock(OCT_20)
    replay = ReplaySource(spy_dir, clock)
    file_bars = read_csv(spy_dir / "spy_5m.csv.gz", 300)
    served = await replay.history("SPYX", 0, OCT_20, step=300)
    assert 0 < len(served) < len(file_bars)  # the file's tail past "now" is not served yet
    assert bool(in_regular_session(served.ts + 150).all())  # and every session bar is still a session bar
    assert served.last_close_time is not None and served.last_close_time <= OCT_20
    assert (await replay.latest("SPYX")).publish_time <= OCT_20
    clock.advance(7 * 86_400)  # a week on, the rest of the file has been played, each row once
    later = await replay.history("SPYX", 0, int(clock()), step=300)
    np.testing.assert_array_equal(later.ts[:len(served)], served.ts)
    assert len(later) == len(file_bars) and len(np.unique(later.ts)) == len(later)


async def test_a_short_equity_file_keeps_the_five_minute_shift(tmp_path: Path, shared_data: Path,
                                                              clock: ManualClock) -> None:
    """Under two weeks of rows, a whole-week shift could hide most of the file: it is served whole."""
    replay = ReplaySource(write_held_in(tmp_path, shared_data, ["spy"], days=5, with_5m=True), clock)
    served = await replay.history("SPYX", 0, T0, step=300)
    assert served.last_close_time is not None and T0 - 300 < served.last_close_time <= T0
