"""The asset registry: validator asset name -> market type, model route and provider symbols.

Sources: ../shared/docs/synth-protocol.md §3, §5, §6 (HEAD and UPSTREAM validators).
"""

from dataclasses import dataclass
from typing import Literal

MarketType = Literal["crypto", "commodity", "equity"]
Provider = Literal["pyth", "binance", "hyperliquid", "replay"]
LfRoute = Literal["lf_crypto", "lf_equity"]


@dataclass(frozen=True)
class AssetSpec:
    name: str
    market: MarketType
    lf_route: LfRoute
    upstream_source: Provider  # where the UPSTREAM validator reads its ground truth
    hourly_sigma: float  # the reference miner's SIGMA_MAP (GBM baseline)
    coefficient: float  # validator ASSET_COEFFICIENTS (leaderboard weight)
    pyth_symbol: str | None = None  # TradingView shim symbol (Benchmarks history)
    hermes_id: str | None = None  # Pyth Hermes feed id (latest price)
    binance_symbol: str | None = None
    hyperliquid_coin: str | None = None
    data_stem: str | None = None  # file stem in ../shared/data style folders when not the asset name
    us_session: bool = False  # trades like a US equity (session features, weekend behaviour)
    # Its files close for the weekend and a daily break (CME gold: Friday 16:50 to Sunday 18:05, and 16:50
    # to 18:05 each day, New York; core.market_calendar) while the live token trades through them.
    weekend_closed: bool = False

    @property
    def file_stems(self) -> tuple[str, ...]:
        """Stems to look for in a CSV folder, the asset's own name first."""
        own = self.name.lower()
        return (own,) if self.data_stem in (None, own) else (own, str(self.data_stem))


def _crypto(name: str, sigma: float, coef: float, hermes: str, binance: str | None,
            hl: str | None, source: Provider) -> AssetSpec:
    return AssetSpec(name=name, market="crypto", lf_route="lf_crypto", upstream_source=source,
                     hourly_sigma=sigma, coefficient=coef, pyth_symbol=f"Crypto.{name}/USD",
                     hermes_id=hermes, binance_symbol=binance, hyperliquid_coin=hl)


def _equity(name: str, sigma: float, coef: float, hermes: str | None, hl: str | None,
            stem: str | None, source: Provider = "hyperliquid", pyth: bool = True) -> AssetSpec:
    return AssetSpec(name=name, market="equity", lf_route="lf_equity", upstream_source=source,
                     hourly_sigma=sigma, coefficient=coef,
                     pyth_symbol=f"Crypto.{name}/USD" if pyth else None, hermes_id=hermes,
                     hyperliquid_coin=hl, data_stem=stem, us_session=True)


ASSETS: dict[str, AssetSpec] = {a.name: a for a in (
    _crypto("BTC", 0.00541, 1.0,
            "e62df6c8b4a85fe1a67db44dc12de5db330f7ac66b72dc658afedf0f4a415b43", "BTCUSDT", None, "binance"),
    _crypto("ETH", 0.00766, 0.7064,
            "ff61491a931112ddf1bd8147cd1b641375f79f5825126d665480874634fd0ace", "ETHUSDT", None, "binance"),
    _crypto("SOL", 0.00858, 0.6310,
            "ef0d8b6fda2ceba41da15d4095d1da392a0d2f8ed0c6c7bc0f4cfac8c280b56d", "SOLUSDT", None, "binance"),
    _crypto("XRP", 0.00956, 0.5658,
            "ec5d399846a9209f3fe5881d70aae9268c94339ff9817e8d18ff19fa05eea1c8", "XRPUSDT", None, "binance"),
    _crypto("HYPE", 0.01131, 0.4785,
            "4279e31cc369bbcc2faf022b382b080e32a8e689ff20fbc530d2a603eb6cd98b", None, "@107", "hyperliquid"),
    # Gold: the validators price tokenised gold (XAUT) 24/7, so it is routed with crypto.
    AssetSpec(name="XAU", market="commodity", lf_route="lf_crypto", upstream_source="hyperliquid",
              hourly_sigma=0.00312, coefficient=1.7371, pyth_symbol="Crypto.XAUT/USD",
              hermes_id="44465e17d2e9d390e70c999d5a11fda4f092847fcd2e3e5aa089d96c98a30e67",
              hyperliquid_coin="xyz:GOLD", weekend_closed=True),
    AssetSpec(name="WTIOIL", market="commodity", lf_route="lf_equity", upstream_source="hyperliquid",
              hourly_sigma=0.00639, coefficient=0.8475,
              hermes_id="67784f72e95ac01337edb7d7bd5bbd1c03669101b7068a620df228ed4e52ef14",
              hyperliquid_coin="xyz:CL", us_session=True),
    _equity("SPYX", 0.00157, 3.4379, "2817b78438c769357182c04346fddaad1178c82f4048828fe0997c3c64624e14",
            None, "spy", source="pyth"),
    _equity("SP500", 0.00157, 3.4379, None, "xyz:SP500", "spy", pyth=False),
    _equity("SPCX", 0.005, 0.43293, None, "xyz:SPCX", None, pyth=False),
    _equity("NVDAX", 0.00338, 1.6028, "4244d07890e4610f46bbde67de8f43a4bf8b569eebe904f136b469f148503b7f",
            "xyz:NVDA", "nvda"),
    _equity("TSLAX", 0.00337, 1.6069, "47a156470288850a440df3a6ce85a55917b813a19bb5b31128a33a986566a362",
            "xyz:TSLA", "tsla"),
    _equity("AAPLX", 0.00259, 2.0916, "978e6cc68a119ce066aa830017318563a9ed04ec3a0a6439010fc11296a58675",
            "xyz:AAPL", "aapl"),
    _equity("GOOGLX", 0.00322, 1.6827, "b911b0329028cd0283e4259c33809d62942bd2716a58084e5f31d64c00b5424e",
            "xyz:GOOGL", "googl"),
)}

DEFAULT_HOURLY_SIGMA = 0.005  # the reference miner's default for assets missing from its table



def spec_for_any(name: str) -> AssetSpec:
    """A spec for any asset name: engines must serve assets they were never configured for."""
    if name in ASSETS:
        return ASSETS[name]
    return AssetSpec(name=name, market="crypto", lf_route="lf_crypto", upstream_source="replay",
                     hourly_sigma=DEFAULT_HOURLY_SIGMA, coefficient=1.0)
