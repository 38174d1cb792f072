"""The one small interface every price source implements."""

from typing import Protocol

from core.prices import LatestPrice, PriceHistory


class ProviderError(RuntimeError):
    """A price source failed or answered something we refuse to trust."""


class PriceSource(Protocol):
    name: str

    async def history(self, asset: str, start: int, end: int, step: int = 60) -> PriceHistory:
        """Bars with start <= ts < end at ``step`` seconds (60 for every live provider)."""
        ...

    async def latest(self, asset: str) -> LatestPrice:
        """The newest price with its publish time."""
        ...

    async def close(self) -> None:
        ...
