"""The one settings class. Every process reads its configuration here and nowhere else.

Environment variables use the prefix ``SYNTH_`` (``SYNTH_REDIS_URL``, ``SYNTH_AXON_PORT``...), and a
``.env`` file in the working directory is read too. CLI flags override by constructing ``Settings``
with keyword arguments.
"""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.assets import ASSETS, Provider

ProviderChoice = Literal["auto", "pyth", "binance", "hyperliquid", "replay"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SYNTH_", env_file=".env", extra="ignore")

    # --- wiring ---------------------------------------------------------------------------------
    redis_url: str | None = Field(None, description="Redis for the Celery pool; unset = embedded mode")
    local: bool = Field(False, description="no chain: static metagraph, no registration")
    axon_host: str = "0.0.0.0"
    axon_port: int = 8091
    axon_external_ip: str | None = None
    axon_external_port: int | None = None
    wallet_path: str = "~/.bittensor/wallets"
    wallet_name: str = "default"
    wallet_hotkey: str = "default"
    netuid: int = 50
    network: str = "finney"

    # --- access -------------------------------------------------------------------------------------
    allowed_hotkeys: list[str] = Field(default_factory=list,
                                       description="validators allowed in --local mode; empty = any signed")
    metagraph_file: Path | None = Field(None, description="static metagraph JSON for --local mode")
    min_validator_stake: float = 65_000.0
    force_validator_permit: bool = True
    rate_limit_per_minute: int = 120

    # --- storage ------------------------------------------------------------------------------------
    artifacts_dir: Path = Path("artifacts")
    data_dir: Path = Path("data")

    # --- prices -------------------------------------------------------------------------------------
    price_provider: ProviderChoice = Field(
        "auto", description="auto = the source the UPSTREAM validator scores each asset against")
    provider_overrides: dict[str, Provider] = Field(default_factory=dict)
    replay_dir: Path | None = None
    pyth_benchmarks_url: str = "https://benchmarks.pyth.network"
    pyth_hermes_url: str = "https://hermes.pyth.network"
    binance_url: str = "https://api.binance.com"
    hyperliquid_url: str = "https://api.hyperliquid.xyz"
    http_timeout_s: float = 10.0
    http_retries: int = 4
    http_concurrency_per_host: int = 4
    max_price_age_s: float = 180.0
    cache_days_hf: float = 3.0
    cache_days_lf: float = 14.0
    http_backoff_s: float = Field(0.25, description="base of the jittered exponential retry backoff")
    http_backoff_max_s: float = Field(5.0, description="longest wait between two attempts")
    refresh_lock_s: float = Field(120.0, description="a refresh holds its per-asset Redis lock at most this long")

    # --- deadlines ------------------------------------------------------------------------------------
    reply_margin_s: float = Field(2.0, description="time kept back before the deadline to send the reply")
    fallback_budget_s: float = Field(1.0, description="time kept for the in-process fallback")
    max_wait_s: float = Field(30.0, description="longest wait for the pool, even if the deadline is later")
    result_ttl_s: int = 120

    # --- queues -------------------------------------------------------------------------------------
    queue_infer_hf: str = "infer.hf"
    queue_infer_lf: str = "infer.lf"
    queue_cpu: str = "cpu"

    # --- requests and engines -----------------------------------------------------------------------
    max_num_simulations: int = 10_000
    engine: str = "ewma_t"
    seed: int | None = Field(None, description="fix the RNG (tests, backtests); None = fresh entropy")
    batch_lookback_days: float = Field(
        14.0, gt=0, description="history before the cut that forecast-batch and backtests give an engine "
                                "(the rolling cache's default window, so offline runs see what production sees)")

    # --- periodic jobs (Celery beat) -----------------------------------------------------------------
    beat_refresh_s: float = Field(60.0, description="cache refresh period")
    beat_calibrate_s: float = Field(3600.0, description="calibration period")
    beat_retrain_s: float = Field(7 * 86_400.0, description="retraining period")
    beat_compact_s: float = Field(86_400.0, description="history-store compaction period")
    beat_lock_ttl_s: float = Field(30.0, description="leader lock of the one beat allowed to schedule")
    flower_user: str = "admin"
    flower_password: str | None = Field(None, description="Flower basic-auth password; Flower refuses to start without")

    # --- calibration, artifacts, champion/challenger (core.calibration, core.artifacts, core.champion) -
    calibration_alpha_hf: float = Field(0.4, gt=0, le=1, description="log-space EMA weight of a new 1 h target")
    calibration_alpha_lf: float = Field(0.2, gt=0, le=1, description="log-space EMA weight of a new 24 h target")
    calibration_scale_min: float = Field(0.5, gt=0, description="sigma_scale never goes below this")
    calibration_scale_max: float = Field(2.0, gt=0, description="sigma_scale never goes above this")
    calibration_max_move_hf: float = Field(0.10, gt=0, lt=1, description="largest relative move per run, 1 h")
    calibration_max_move_lf: float = Field(0.07, gt=0, lt=1, description="largest relative move per run, 24 h")
    calibration_min_samples_hf: int = Field(150, ge=1, description="scored 1 h windows needed to move at all")
    calibration_min_samples_lf: int = Field(120, ge=1, description="scored 24 h windows needed to move at all")
    calibration_windows_hf: int = Field(180, ge=1, description="recent 1 h windows scored per run")
    calibration_windows_lf: int = Field(140, ge=1, description="recent 24 h windows scored per run")
    calibration_spacing_hf_s: int = Field(900, ge=60, description="one 1 h window per this many seconds")
    calibration_spacing_lf_s: int = Field(3600, ge=60, description="one 24 h window per this many seconds")
    calibration_paths: int = Field(200, ge=10, description="paths per window in the search (1000 live)")
    calibration_search_tol: float = Field(0.01, gt=0, description="golden-section stop, in log scale")
    calibration_seed: int = Field(20_260_526, description="window picks and common random numbers")
    calibration_rules: Literal["head", "upstream"] = Field("upstream", description="validator rule set scored")
    champion_tolerance: float = Field(0.005, ge=0, description="challenger promoted if its mean CRPS <= "
                                                               "champion * (1 + this)")
    artifacts_keep: int = Field(5, ge=2, description="published versions kept (the current one always is)")

    # --- observability ------------------------------------------------------------------------------
    log_level: str = "INFO"
    log_json: bool = False
    metrics_port: int | None = None

    @field_validator("provider_overrides")
    @classmethod
    def _known_assets(cls, value: dict[str, Provider]) -> dict[str, Provider]:
        unknown = sorted(set(value) - set(ASSETS))
        if unknown:
            raise ValueError(f"provider_overrides names unknown assets: {unknown}")
        return value

    def provider_for(self, asset: str) -> Provider:
        """The price source for one asset: per-asset override, then the global choice."""
        if asset in self.provider_overrides:
            return self.provider_overrides[asset]
        if self.price_provider == "auto":
            spec = ASSETS.get(asset)
            return spec.upstream_source if spec else "pyth"
        return self.price_provider

    @property
    def embedded(self) -> bool:
        """No Redis configured: forecasts run in this process."""
        return not self.redis_url

    def infer_queue(self, time_increment: int) -> str:
        return self.queue_infer_hf if time_increment < 300 else self.queue_infer_lf


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings from the environment, read once per process."""
    return Settings()
