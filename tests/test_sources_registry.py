"""build_source / sources_for: the right client per provider, one shared instance each."""

import json
from pathlib import Path

import pytest

from core.csv_history import read_csv, write_csv
from core.fake_providers import FakeMarket, FakeServerThread
from core.settings import Settings
from core.sources.binance import BinanceSource
from core.sources.hyperliquid import HyperliquidSource
from core.sources.pyth import PythSource
from core.sources.registry import UnknownProviderError, build_source, sources_for
from core.sources.replay import ReplaySource


def test_build_source_per_provider(tmp_path: Path) -> None:
    settings = Settings(binance_url="http://b.local/", pyth_benchmarks_url="http://bm.local",
                        pyth_hermes_url="http://h.local", hyperliquid_url="http://hl.local", replay_dir=tmp_path,
                        http_timeout_s=3.0, max_price_age_s=60.0)
    binance = build_source("binance", settings)
    assert isinstance(binance, BinanceSource) and binance.base_url == "http://b.local"
    assert binance.config.timeout_s == 3.0 and binance.config.max_price_age_s == 60.0
    pyth = build_source("pyth", settings)
    assert isinstance(pyth, PythSource) and (pyth.benchmarks_url, pyth.hermes_url) == ("http://bm.local",
                                                                                          "http://h.local")
    assert isinstance(build_source("hyperliquid", settings), HyperliquidSource)
    assert isinstance(build_source("replay", settings), ReplaySource)
    with pytest.raises(UnknownProviderError, match="known: pyth"):
        build_source("coinbase", settings)
    with pytest.raises(UnknownProviderError, match="SYNTH_REPLAY_DIR"):
        build_source("replay", Settings(replay_dir=None))


def test_sources_for_follows_provider_for_and_shares_instances() -> None:
    registry = sources_for(Settings(price_provider="auto", provider_overrides={"ETH": "pyth"}))
    assert registry("BTC") is registry("SOL")  # both binance upstream: one client, one session
    assert isinstance(registry("BTC"), BinanceSource)
    assert isinstance(registry("ETH"), PythSource)
    assert isinstance(registry("XAU"), HyperliquidSource)
    assert registry("WTIOIL") is registry("XAU")


def test_registry_sources_talk_to_the_configured_hosts(tmp_path: Path, shared_data: Path) -> None:
    """End to end through settings: the registry's Binance client against a local Binance server."""
    import asyncio

    cut = json.loads((shared_data / "manifest.json").read_text())["btc_1m"]["eval_start_ts"]
    write_csv(tmp_path / "btc_1m.csv.gz", read_csv(shared_data / "btc_1m.csv.gz", 60).between(cut - 86_400, cut))
    with FakeServerThread("binance", FakeMarket(tmp_path)) as fake:
        registry = sources_for(Settings(binance_url=fake.url))

        async def latest_twice() -> tuple[float, float]:
            try:
                first = await registry("BTC").latest("BTC")
                second = await registry("BTC").latest("BTC")
                return first.price, second.price
            finally:
                await registry.close()

        first, second = asyncio.run(latest_twice())
    assert first == second > 0
    assert fake.faults.requests == 2


async def test_closing_the_registry_closes_every_source_even_when_one_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """It stopped at the first close that raised, leaving the other providers' HTTP sessions open."""
    closed: list[str] = []

    async def failing(self: BinanceSource) -> None:
        closed.append("binance")
        raise RuntimeError("session already gone")

    async def replay_close(self: ReplaySource) -> None:
        closed.append("replay")

    monkeypatch.setattr(BinanceSource, "close", failing)
    monkeypatch.setattr(ReplaySource, "close", replay_close)
    registry = sources_for(Settings(price_provider="replay", replay_dir=tmp_path,
                                    provider_overrides={"ETH": "binance"}))
    registry("ETH"), registry("BTC")
    await registry.close()
    assert sorted(closed) == ["binance", "replay"]
    assert "closing the binance price source failed: RuntimeError: session already gone" in caplog.text
