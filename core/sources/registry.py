"""Build price sources from settings: one instance (and one HTTP session) per provider.

Their Retry-After holds are the fleet's (kept in Redis) when the settings name a Redis, else this process's."""

import asyncio
import logging
import time

from core.assets import Provider
from core.settings import Settings
from core.sources.base import PriceSource, ProviderError
from core.sources.binance import BinanceSource
from core.sources.holds import HostHolds, host_holds
from core.sources.http import Clock, HttpClient, HttpConfig
from core.sources.hyperliquid import HyperliquidSource
from core.sources.pyth import PythSource
from core.sources.replay import ReplaySource

log = logging.getLogger(__name__)

PROVIDERS: tuple[Provider, ...] = ("pyth", "binance", "hyperliquid", "replay")


class UnknownProviderError(ProviderError):
    """A provider name no client exists for, or one missing its configuration."""


def build_source(provider: str, settings: Settings, clock: Clock = time.time,
                 holds: HostHolds | None = None) -> PriceSource:
    """The client of ``provider``; its Retry-After holds are ``holds`` (this process's when None)."""
    config = HttpConfig.from_settings(settings)
    http = HttpClient(provider, config, holds=holds)
    if provider == "pyth":
        return PythSource(settings.pyth_benchmarks_url, settings.pyth_hermes_url, config, clock, http)
    if provider == "binance":
        return BinanceSource(settings.binance_url, config, clock, http)
    if provider == "hyperliquid":
        return HyperliquidSource(settings.hyperliquid_url, config, clock, http)
    if provider == "replay":
        if settings.replay_dir is None:
            raise UnknownProviderError("price provider 'replay' needs SYNTH_REPLAY_DIR")
        return ReplaySource(settings.replay_dir, clock)
    raise UnknownProviderError(f"unknown price provider {provider!r}; known: {', '.join(PROVIDERS)}")


class SourceRegistry:
    """asset -> its provider's source, built on first use and shared by every asset of that provider.

    Every source keeps its Retry-After holds in ``holds``: the fleet's, in Redis, when the settings name one."""

    def __init__(self, settings: Settings, clock: Clock = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self.holds = host_holds(settings.redis_url)
        self._built: dict[str, PriceSource] = {}

    def source(self, provider: str) -> PriceSource:
        if provider not in self._built:
            self._built[provider] = build_source(provider, self.settings, self.clock, self.holds)
        return self._built[provider]

    def __call__(self, asset: str) -> PriceSource:
        return self.source(self.settings.provider_for(asset))

    async def close(self) -> None:
        """Close every source built (its HTTP session): one that fails is logged, the others still close."""
        built, self._built = list(self._built.values()), {}
        results = await asyncio.gather(*(source.close() for source in built), return_exceptions=True)
        for source, result in zip(built, results, strict=True):
            if isinstance(result, Exception):
                log.warning("closing the %s price source failed: %s: %s", source.name, type(result).__name__,
                            result)
        self.holds.close()


def sources_for(settings: Settings, clock: Clock = time.time) -> SourceRegistry:
    """A callable asset -> PriceSource (with ``close()`` for shutdown)."""
    return SourceRegistry(settings, clock)
