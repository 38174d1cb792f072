"""ReplaySource: a CSV folder shifted once per asset, so replayed time moves on with the clock."""

from pathlib import Path

import numpy as np
import pytest

from core.cache import MemoryHistoryCache
from core.fake_providers import ManualClock
from core.refresh import refresh_asset
from core.settings import Settings
from core.sources.base import ProviderError
from core.sources.replay import ReplaySource
from tests.provider_fixtures import T0, fake_provider_fixtures

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
