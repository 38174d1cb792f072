"""Build price sources from settings (one shared instance per provider)."""

from collections.abc import Callable

from core.assets import Provider
from core.settings import Settings
from core.sources.base import PriceSource, ProviderError
from core.sources.replay import ReplaySource


def build_source(provider: Provider, settings: Settings) -> PriceSource:
    if provider == "replay":
        if settings.replay_dir is None:
            raise ProviderError("price provider 'replay' needs SYNTH_REPLAY_DIR")
        return ReplaySource(settings.replay_dir)
    raise ProviderError(f"price provider {provider!r} is not available yet")


def sources_for(settings: Settings) -> Callable[[str], PriceSource]:
    """asset -> its source, built lazily and shared."""
    built: dict[str, PriceSource] = {}

    def source(asset: str) -> PriceSource:
        provider = settings.provider_for(asset)
        if provider not in built:
            built[provider] = build_source(provider, settings)
        return built[provider]

    return source
