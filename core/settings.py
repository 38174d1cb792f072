"""The one settings class. Every process reads its configuration here and nowhere else.

Environment variables use the prefix ``SYNTH_`` (``SYNTH_REDIS_URL``, ``SYNTH_AXON_PORT``...), and a
``.env`` file in the working directory is read too. CLI flags override by constructing ``Settings``
with keyword arguments.
"""

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.assets import ASSETS, Provider
from core.constants import HF_INCREMENT, LF_INCREMENT
from core.devices import DeviceChoice

LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"  # what a worker started by hand without SYNTH_REDIS_URL meets on


def default_models_dir() -> Path:
    """``./models`` when the working directory has one (Docker, a checkout), else the checkout's own."""
    local = Path("models")
    return local if local.is_dir() else Path(__file__).resolve().parents[1] / "models"


ProviderChoice = Literal["auto", "pyth", "binance", "hyperliquid", "replay"]
EngineChoice = Literal["patchtst", "ewma_t", "gbm"]  # core.engines_registry builds these
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class Settings(BaseSettings):
    # No inf or nan: every float here is a duration, a size or a limit (SYNTH_BATCH_LOOKBACK_DAYS=inf
    # passed "greater than 0", then crashed in int()).
    model_config = SettingsConfigDict(env_prefix="SYNTH_", env_file=".env", extra="ignore", allow_inf_nan=False)

    # --- wiring ---------------------------------------------------------------------------------
    redis_url: str | None = Field(None, description="Redis for the Celery pool; unset = embedded mode")
    local: bool = Field(False, description="no chain: static metagraph, no registration")
    axon_host: str = "0.0.0.0"
    # bittensor's Axon asserts 1024 < port < 65535 (both ports) as it is built: outside that, the start ended on
    # an AssertionError traceback after the models had loaded.
    axon_port: int = Field(8091, gt=1024, lt=65_535)
    axon_external_ip: str | None = Field(None, description="IP address published on the chain; unset = looked up")
    axon_external_port: int | None = Field(None, gt=1024, lt=65_535)
    # A connection must deliver a whole request this soon after it opens (or after its next one began): a
    # validator sends its ~1 KB at once, a slowloris never finishes. The wait for the reply is not counted.
    # Also: a peer must read some of a reply queued for it within this time, or it is cut.
    axon_request_timeout_s: float = Field(10.0, gt=0)
    # How long a connection kept alive after a reply may stay idle before its next request starts. Longer than
    # clients keep theirs (aiohttp, the dendrite's client: 15 s): closed first by us, a connection the client's
    # busy loop had not yet seen closed took its next request, which failed unanswered.
    axon_keep_alive_s: float = Field(20.0, gt=0)
    # Connections holding no request in progress (arriving, or kept alive idle) beyond this many: the one
    # waiting longest is closed. Never more than half the process's file descriptor limit.
    axon_max_waiting_connections: int = Field(512, ge=1)
    wallet_path: str = "~/.bittensor/wallets"
    wallet_name: str = "default"
    wallet_hotkey: str = "default"
    netuid: int = 50
    network: str = "finney"

    # --- access -------------------------------------------------------------------------------------
    allowed_hotkeys: list[str] = Field(default_factory=list,
                                       description="the only validator hotkeys served (on chain too); empty = no list")
    metagraph_file: Path | None = Field(None, description="static metagraph JSON for --local mode")
    min_validator_stake: float = 65_000.0
    force_validator_permit: bool = True
    rate_limit_per_minute: int = Field(120, ge=1, description="requests per validator hotkey and minute")

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
    # Constrained as core.sources.http.HttpConfig refuses them: a bad value is refused at start, not at the
    # first refresh (a zero age limit made every price stale: every request answered 503).
    http_timeout_s: float = Field(10.0, gt=0)
    http_retries: int = Field(4, ge=0, description="extra attempts after the first")
    http_concurrency_per_host: int = Field(4, ge=1)
    max_price_age_s: float = Field(180.0, gt=0, description="an older latest price is refused as stale")
    # The 1 h model reads 24 h of open-market 5-minute returns: gold's files close Friday 16:50 to Sunday
    # 18:05 New York, so on Sunday evening 3 days held under 24 h of them and XAU 1 h fell back to EWMA-t.
    cache_days_hf: float = Field(4.0, gt=0)
    cache_days_lf: float = Field(14.0, gt=0)
    http_backoff_s: float = Field(0.25, ge=0, description="base of the jittered exponential retry backoff")
    http_backoff_max_s: float = Field(5.0, ge=0, description="longest wait between two attempts")
    refresh_lock_s: float = Field(120.0, gt=0, description="a refresh holds its per-asset Redis lock at most this long")
    price_max_jump: float = Field(0.3, gt=0, description="log move from the last accepted close beyond which a "
                                  "new bar or latest print needs confirmation (core.price_checks)")
    price_confirm_bars: int = Field(2, ge=1, description="following bars that must stay near a jumped bar to accept it")

    # --- deadlines ------------------------------------------------------------------------------------
    reply_margin_s: float = Field(2.0, ge=0, description="time kept back before the deadline to send the reply")
    fallback_budget_s: float = Field(1.0, gt=0, description="time kept for the in-process fallback")
    max_wait_s: float = Field(30.0, gt=0, description="longest wait for the pool, even if the deadline is later")
    shutdown_grace_s: float = Field(
        40.0, ge=0, description="on SIGTERM/SIGINT the miner stops listening and gives the requests in flight this "
                                "long to be answered (a pool wait, max_wait_s, then the fallback) before it exits")
    result_ttl_s: int = Field(120, ge=1)  # EXPIRE 0 would delete a result before the miner reads it
    worker_proc_alive_timeout_s: float = Field(
        60.0, gt=0, description="how long Celery lets a new worker process start (it loads torch and the models) "
                                "before killing it; Celery's 4 s default killed it on busy CPUs")

    # --- queues -------------------------------------------------------------------------------------
    queue_infer_hf: str = "infer.hf"
    queue_infer_lf: str = "infer.lf"
    queue_cpu: str = "cpu"

    # --- requests and engines -----------------------------------------------------------------------
    max_num_simulations: int = Field(10_000, ge=1)
    engine: EngineChoice = Field("patchtst", description="served engine; falls back to ewma_t if its models do not load")
    seed: int | None = Field(None, ge=0, description="fix the RNG (tests, backtests); None = fresh entropy")
    batch_lookback_days: float | None = Field(
        None, gt=0, description="history before the cut that forecast-batch, backtests and tuning give an "
                                "engine; unset = each grid's live cache window (cache_days_hf for 1-minute "
                                "grids, cache_days_lf otherwise), so offline runs see what production sees")
    models_dir: Path = Field(default_factory=lambda: default_models_dir(),
                             description="PatchTST checkpoints: hf.pt, lf_crypto.pt, lf_equity.pt")
    device: DeviceChoice = Field("auto", description="where PatchTST inference runs: auto = cuda when torch "
                                                     "sees one (a GPU worker), else cpu")

    # --- periodic jobs (Celery beat) -----------------------------------------------------------------
    # A job runs once per slot, and slots are whole seconds: under a second apart, two fell on one second and
    # every other run was skipped as a duplicate.
    beat_refresh_s: float = Field(60.0, ge=1, description="cache refresh period")
    beat_calibrate_s: float = Field(3600.0, ge=1, description="calibration period")
    beat_retrain_s: float = Field(7 * 86_400.0, ge=1, description="retraining period")
    beat_compact_s: float = Field(86_400.0, ge=1, description="history-store compaction period")
    # Redis refuses a lock TTL under 1 ms ("invalid expire time"): with 0 no beat ever became leader, and
    # none scheduled a job, with only a warning per tick.
    beat_lock_ttl_s: float = Field(30.0, ge=1, description="leader lock of the one beat allowed to schedule")
    # Beat's last-run times must survive restarts (pm2 changes the pid, docker the hostname): a fresh
    # file restarts every period, so the weekly retrain would wait a week again after each restart.
    beat_schedule_file: Path | None = Field(None, description="beat's state file; unset = <data_dir>/beat-schedule.db")
    job_lease_s: float = Field(30.0, gt=0, description="a running periodic job renews its slot claim for this "
                               "long; a claim whose owner died (OOM, SIGKILL) lapses after it and the job may rerun")
    # Ten years: everything the store holds. Walk-forward (pre-cut data), a 1 h model trained on only the
    # last 60 days scored 1.0047x [1.0018, 1.0077] the one trained on all history.
    retrain_days: float = Field(3650.0, gt=0, description="history (from the store) the weekly retraining uses")
    retrain_crps_epochs: int | None = Field(None, ge=0, description="sample-CRPS fine-tune epochs of the weekly "
                                            "retraining (unset: the train command's per-model default)")
    retrain_members: int = Field(3, ge=1, description="ensemble members (seeds) per retrained model")
    retrain_gate_days: float = Field(3.0, gt=1.05, description="newest history the retraining holds back: a "
                                     "model is trained before it and must not lose its prompts to the served one")
    retrain_gate_paths: int = Field(1000, ge=10, description="paths per prompt when the gate scores both models")
    # At the default 3-day gate the 24 h models get ~47 prompts per asset, the 1 h model ~280; at 1.1 days the 24 h
    # ones got 2, and a verdict on 2 overlapping prompts is a coin toss.
    retrain_gate_min_prompts: int = Field(24, ge=1, description="gate prompts each asset of a model needs; with "
                                          "fewer the retrained model is not published (the report says why)")
    retrain_publish: bool = Field(True, description="publish a retrained model that passes the gate "
                                  "(false: stage it with the verdict for an operator)")
    retrain_tolerance: float = Field(0.0, ge=0, description="publish if gate CRPS <= served model's x (1 + this)")
    flower_user: str = "admin"
    flower_password: str | None = Field(None, description="Flower basic-auth password; Flower refuses to start without")

    # --- calibration, artifacts, champion/challenger (core.calibration, core.artifacts, core.champion) -
    # Annotated fields: mypy checks the defaults without the pydantic plugin.
    calibration_engine: EngineChoice = Field(
        "ewma_t", description="the engine whose sigma_scale the hourly job fits and the forecaster applies "
                              "(others serve unscaled). Not patchtst: replaying the job walk-forward on pre-cut "
                              "validation, the scaled model scored 1.0006x (1 h), 1.0017x (24 h crypto) and 1.0007x "
                              "(24 h equities) the raw one; the fallback EWMA-t gains 0.25 % at 1 h")
    calibration_alpha_hf: Annotated[float, Field(gt=0, le=1, description="log-space EMA weight, 1 h")] = 0.4
    calibration_alpha_lf: Annotated[float, Field(gt=0, le=1, description="log-space EMA weight, 24 h")] = 0.2
    calibration_scale_min: Annotated[float, Field(gt=0, le=1, description="sigma_scale floor")] = 0.5
    calibration_scale_max: Annotated[float, Field(ge=1, le=100, description="sigma_scale ceiling")] = 2.0
    calibration_max_move_hf: Annotated[float, Field(gt=0, lt=1, description="largest move per run, 1 h")] = 0.10
    calibration_max_move_lf: Annotated[float, Field(gt=0, lt=1, description="largest move per run, 24 h")] = 0.07
    calibration_min_samples_hf: Annotated[int, Field(ge=1, description="scored 1 h prompts to move")] = 150
    calibration_min_samples_lf: Annotated[int, Field(ge=1, description="scored 24 h prompts to move")] = 120
    calibration_windows_hf: Annotated[int, Field(ge=1, description="recent 1 h prompts per run")] = 180
    calibration_windows_lf: Annotated[int, Field(ge=1, description="recent 24 h prompts per run")] = 140
    calibration_spacing_hf_s: Annotated[int, Field(ge=60, description="one 1 h prompt per slot of this")] = 900
    calibration_spacing_lf_s: Annotated[int, Field(ge=60, description="one 24 h prompt per slot of this")] = 3600
    calibration_paths: Annotated[int, Field(ge=10, description="paths per prompt in the search")] = 200
    calibration_search_tol: Annotated[float, Field(gt=0, description="golden-section stop, log scale")] = 0.01
    calibration_seed: Annotated[int, Field(ge=0, description="prompt picks and common random numbers")] = 20_260_526
    calibration_rules: Annotated[Literal["head", "upstream"], Field(description="validator rules")] = "upstream"
    champion_tolerance: Annotated[float, Field(ge=0, description="promote if CRPS <= champion*(1+tol)")] = 0.005
    artifacts_keep: Annotated[int, Field(ge=2, description="published versions kept, plus the current")] = 5

    # --- observability ------------------------------------------------------------------------------
    log_level: LogLevel = "INFO"
    log_json: bool = False
    metrics_port: int | None = Field(None, ge=1, le=65_535)
    worker_metrics_port: int | None = Field(None, ge=1, le=65_535, description="Prometheus port of a worker process")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("metrics_port", "worker_metrics_port", "axon_external_port", mode="before")
    @classmethod
    def _zero_port_is_unset(cls, value: object) -> object:
        """0 has always meant "off" (metrics) or "the axon's own port" (external port): kept so."""
        return None if value in (0, "0") else value

    @field_validator("axon_external_ip", mode="before")
    @classmethod
    def _ip_address(cls, value: object) -> object:
        """The chain stores an IP as an integer: a host name was dropped by bittensor without a word (the
        axon never published). An empty value (``SYNTH_AXON_EXTERNAL_IP=`` in .env) means unset."""
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if isinstance(value, str):
            from ipaddress import ip_address

            try:
                return str(ip_address(value.strip()))
            except ValueError:
                raise ValueError(f"{value!r} is not an IP address (the chain publishes an IP, not a host name)") \
                    from None
        return value

    @field_validator("provider_overrides")
    @classmethod
    def _known_assets(cls, value: dict[str, Provider]) -> dict[str, Provider]:
        unknown = sorted(set(value) - set(ASSETS))
        if unknown:
            raise ValueError(f"provider_overrides names unknown assets: {unknown}")
        return value

    def cache_window_s(self, time_increment: int) -> int:
        """Seconds of history the live cache gives a forecast on this grid (1-minute grids: cache_days_hf)."""
        return int((self.cache_days_hf if time_increment < LF_INCREMENT else self.cache_days_lf) * 86_400)

    def offline_lookback_s(self) -> dict[int, int]:
        """time_increment -> seconds of history an offline forecast gets before its start."""
        if self.batch_lookback_days is not None:
            both = int(self.batch_lookback_days * 86_400)
            return {HF_INCREMENT: both, LF_INCREMENT: both}
        return {inc: self.cache_window_s(inc) for inc in (HF_INCREMENT, LF_INCREMENT)}

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

    @property
    def pool_redis_url(self) -> str:
        """The Redis a worker or beat process meets the miner in: this host's when unset (``celery -A workers.app``
        started by hand), the same one for the broker, the jobs and the heartbeats."""
        return self.redis_url or LOCAL_REDIS_URL

    def infer_queue(self, time_increment: int) -> str:
        return self.queue_infer_hf if time_increment < 300 else self.queue_infer_lf


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings from the environment, read once per process."""
    return Settings()


class InsecureRedisError(ValueError):
    """A Redis URL that would reach a server beyond this host without a password, or no Redis URL at all."""


def redis_url_problem(url: str) -> str | None:
    """Why the URL cannot be read as the operator meant it, without quoting any of it (a password may be in it)."""
    userinfo = url.partition("://")[2].rpartition("@")[0]
    if any(c in userinfo for c in "/?#"):  # the parser ends the host at the first of them: a piece of the password
        return ("SYNTH_REDIS_URL holds '/', '?' or '#' before its last '@': percent-encode them in the password "
                "(%2F, %3F, %23)")
    return None


def check_redis_url(url: str | None) -> None:
    """Refuse a password-less Redis URL unless it stays on this host (loopback or a unix socket).

    Redis carries the work queue and the price cache: an open one on a network lets anyone feed
    the workers forged tasks or poison the prices the forecasts start from.
    """
    if not url:
        return
    from ipaddress import ip_address
    from urllib.parse import parse_qs, urlsplit

    problem = redis_url_problem(url)
    if problem is not None:  # "redis://u:p@x/y@host" parses as host "x": a connection to the wrong place
        raise InsecureRedisError(problem)
    parts = urlsplit(url)
    try:
        _ = parts.port  # raises on a port that is not a number
        valid = parts.scheme == "unix" or (parts.scheme in ("redis", "rediss") and bool(parts.netloc))
    except ValueError:
        valid = False
    if not valid:
        # Never echo the URL: a typo ("redis//:PASSWORD@host") leaves the password in what would be printed.
        raise InsecureRedisError("SYNTH_REDIS_URL is not a Redis URL (redis://:PASSWORD@host:6379/0, rediss://... "
                                 "or unix:///path): check its scheme and port")
    if parts.scheme == "unix":
        return
    host = (parts.hostname or "").lower()
    try:
        loopback = host == "localhost" or ip_address(host).is_loopback
    except ValueError:  # a host name
        loopback = False
    if loopback or parts.password or parse_qs(parts.query).get("password"):
        return
    database = parts.path if parts.path.strip("/").isdigit() else ""  # nothing else of the URL is shown
    shown = f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{database}"
    raise InsecureRedisError(
        f"SYNTH_REDIS_URL {shown} has no password and {host or 'its host'} is not loopback: run Redis with "
        "requirepass and put the password in the URL (redis://:PASSWORD@host:6379/0)")
