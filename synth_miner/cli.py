"""``synth-miner``: one command for every process and job of the miner."""

import asyncio
import os
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer

from core.settings import Settings
from synth_miner.cli_settings import load_settings

app = typer.Typer(help="Synth subnet (SN50) miner: PatchTST + Student-t price paths.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)


def require_redis(redis_url: str | None) -> None:
    """Workers and beat exist only to meet the miner in Redis: without a URL they would quietly use
    whatever Redis listens on this host's default port."""
    if not load_settings(redis_url=redis_url).redis_url:
        raise typer.BadParameter("workers and beat meet the miner in Redis: set SYNTH_REDIS_URL or --redis-url "
                                 "(the miner without one runs its embedded pool and needs neither)")


def export_env(**overrides: Any) -> None:
    """Pass CLI flags to code that reads settings itself (Celery workers import the app at load time)."""
    for key, value in overrides.items():
        if value is not None:
            os.environ[f"SYNTH_{key.upper()}"] = str(value)


@app.command()
def serve(
    local: Annotated[bool, typer.Option("--local", help="no chain: static metagraph, no registration; binds "
                                        "127.0.0.1 unless --host or SYNTH_AXON_HOST says otherwise")] = False,
    redis_url: Annotated[Optional[str], typer.Option(help="Redis of the worker pool; unset = embedded")] = None,
    host: Annotated[Optional[str], typer.Option(help="axon bind address (SYNTH_AXON_HOST; default 0.0.0.0, "
                                                "127.0.0.1 with --local)")] = None,
    port: Annotated[Optional[int], typer.Option(help="axon port (SYNTH_AXON_PORT)")] = None,
    external_ip: Annotated[Optional[str], typer.Option(help="address published for the axon (SYNTH_AXON_EXTERNAL_IP; "
                                                       "unset: looked up on outside web services)")] = None,
    provider: Annotated[Optional[str], typer.Option(help="auto|pyth|binance|hyperliquid|replay")] = None,
    replay_dir: Annotated[Optional[Path], typer.Option(help="CSV folder to replay (sets provider=replay)")] = None,
    allow: Annotated[Optional[list[str]], typer.Option(help="validator hotkey allowed (repeatable)")] = None,
    metagraph_file: Annotated[Optional[Path], typer.Option(help="static metagraph JSON for --local")] = None,
    wallet_path: Annotated[Optional[str], typer.Option(help="SYNTH_WALLET_PATH")] = None,
    wallet_name: Annotated[Optional[str], typer.Option(help="SYNTH_WALLET_NAME")] = None,
    wallet_hotkey: Annotated[Optional[str], typer.Option(help="SYNTH_WALLET_HOTKEY")] = None,
    netuid: Annotated[Optional[int], typer.Option(help="SYNTH_NETUID")] = None,
    network: Annotated[Optional[str], typer.Option(help="SYNTH_NETWORK (finney, test, ws://...)")] = None,
    engine: Annotated[Optional[str], typer.Option(help="engine to serve: patchtst, ewma_t, gbm")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(help="Prometheus metrics port")] = None,
    log_level: Annotated[Optional[str], typer.Option(help="DEBUG, INFO, WARNING")] = None,
) -> None:
    """Run the miner: the bittensor axon answering Simulation requests."""
    from miner.runtime import StartupError
    from miner.runtime import serve as run

    settings = load_settings(
        local=local or None, redis_url=redis_url, axon_host=host, axon_port=port, axon_external_ip=external_ip,
        price_provider="replay" if replay_dir and not provider else provider, replay_dir=replay_dir,
        allowed_hotkeys=allow, metagraph_file=metagraph_file, wallet_path=wallet_path, wallet_name=wallet_name,
        wallet_hotkey=wallet_hotkey, netuid=netuid, network=network, engine=engine, metrics_port=metrics_port,
        log_level=log_level)
    settings = local_host_default(settings)
    if replay_dir and provider and provider != "replay" and not replays_any(settings):
        # The folder would be ignored without a word: the operator asked for offline prices and got live ones.
        raise typer.BadParameter(f"--replay-dir replays prices but --provider {provider} reads live ones: drop one "
                                 "(or send assets to 'replay' with SYNTH_PROVIDER_OVERRIDES)",
                                 param_hint="--replay-dir")
    try:
        asyncio.run(run(settings))
    except StartupError as exc:
        if exc.option:
            raise typer.BadParameter(str(exc), param_hint=exc.option) from None
        fail(f"refusing to start: {exc}")
    except Exception as exc:  # a bug, not a configuration: its traceback goes to the log, then one line
        import logging

        from core.logs import reason

        logging.getLogger("miner").error("the miner stopped on an unexpected error", exc_info=True)
        fail(f"miner stopped: {reason(exc)}")


def replays_any(settings: Settings) -> bool:
    """Whether any asset's prices come from the replay folder."""
    from core.assets import ASSETS

    return any(settings.provider_for(asset) == "replay" for asset in ASSETS)


def local_host_default(settings: Settings) -> Settings:
    """A local miner binds loopback unless the operator chose an address (--host, SYNTH_AXON_HOST, .env):
    a field given by any of those is in ``model_fields_set``; the class default is not."""
    if settings.local and "axon_host" not in settings.model_fields_set:
        return settings.model_copy(update={"axon_host": "127.0.0.1"})
    return settings


def fail(message: str) -> NoReturn:
    """One line on stderr and exit status 1."""
    typer.echo(message, err=True)
    raise typer.Exit(1)


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="comma-separated queues: infer.hf,infer.lf,cpu")] = "infer.hf,infer.lf",
    concurrency: Annotated[int, typer.Option(help="processes (one per GPU for inference)")] = 1,
    pool: Annotated[str, typer.Option(help="prefork or solo")] = "prefork",
    redis_url: Annotated[Optional[str], typer.Option(help="SYNTH_REDIS_URL")] = None,
    hostname: Annotated[Optional[str], typer.Option(help="Celery node name")] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level")] = "INFO",
) -> None:
    """Start a Celery worker (inference on infer.* queues, data/calibration/training on cpu)."""
    require_redis(redis_url)
    export_env(redis_url=redis_url)
    from workers.app import app as celery_app

    argv = ["worker", f"--queues={queues}", f"--concurrency={concurrency}", f"--pool={pool}",
            f"--loglevel={loglevel}", "--without-gossip", "--without-mingle", "-E"]
    if hostname:
        argv.append(f"--hostname={hostname}")
    celery_app.worker_main(argv)


@app.command()
def beat(
    redis_url: Annotated[Optional[str], typer.Option(help="SYNTH_REDIS_URL")] = None,
    schedule_file: Annotated[Optional[Path], typer.Option(help="beat state file (default: data dir)")] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level")] = "INFO",
) -> None:
    """Start Celery beat (cache refresh, calibration, retraining, compaction). Only one schedules at a time."""
    require_redis(redis_url)
    export_env(redis_url=redis_url)
    from core.constants import BEAT_SCHEDULE_FILE
    from core.settings import get_settings
    from workers.app import app as celery_app

    settings = get_settings()
    # One name across restarts: the file holds each job's last run (a new one would delay the weekly retrain).
    state = schedule_file or settings.beat_schedule_file or settings.data_dir / BEAT_SCHEDULE_FILE
    try:
        state.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only mount: the scheduler says so and keeps the last runs in memory and Redis
        pass
    celery_app.start(["beat", f"--loglevel={loglevel}", f"--schedule={state}"])


@app.command()
def flower(
    port: Annotated[int, typer.Option(help="Flower port")] = 5555,
    address: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    redis_url: Annotated[Optional[str], typer.Option(help="SYNTH_REDIS_URL")] = None,
) -> None:
    """Start Flower with basic auth (SYNTH_FLOWER_USER / SYNTH_FLOWER_PASSWORD; refuses to run without)."""
    settings = load_settings(redis_url=redis_url)  # a bad SYNTH_ variable is a usage error, not a traceback
    require_redis(redis_url)  # else Flower would quietly watch whatever Redis listens on this host's 6379
    if not settings.flower_password:  # refused before anything is set up
        raise typer.BadParameter("set SYNTH_FLOWER_PASSWORD: Flower is never served without authentication")
    export_env(redis_url=redis_url)
    from workers.app import app as celery_app

    celery_app.start(["flower", f"--port={port}", f"--address={address}",
                      f"--basic-auth={settings.flower_user}:{settings.flower_password}"])


@app.command()
def status(
    redis_url: Annotated[Optional[str], typer.Option(help="SYNTH_REDIS_URL")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False,
) -> None:
    """The fleet at a glance: workers, queues, artifact version, last calibration, cache freshness.

    Exit 0: Redis was read and a live worker reads every inference queue.

    Exit 1: Redis cannot be read, or SYNTH_REDIS_URL is not set (embedded mode has no fleet to check).

    Exit 2: a usage error (a bad option or SYNTH_ setting).

    Exit 3: no live worker reads an inference queue: the miner answers it from its in-process fallback."""
    import json as jsonlib

    from rich.console import Console

    from synth_miner.status import collect, exit_code
    from synth_miner.status_view import render

    report = collect(load_settings(redis_url=redis_url))
    if as_json:
        print(jsonlib.dumps(report, default=str))
    else:
        render(report, Console())
    code = exit_code(report)  # `status || alert`: monitoring must see a fleet it cannot read or that cannot serve
    if code:
        raise typer.Exit(code)


@app.command()
def bench(
    data_dir: Annotated[Path, typer.Option(help="CSV folder replayed by the stack")] = Path("../shared/data"),
    artifacts_dir: Annotated[Optional[Path], typer.Option(help="artifacts to serve (default: none)")] = None,
    concurrency: Annotated[list[int], typer.Option(help="concurrent validators (repeatable)", min=1)] = [1, 8, 32],
    per_lane: Annotated[int, typer.Option(help="sequential requests per validator", min=1)] = 3,
    repeat: Annotated[int, typer.Option(help="repetitions per stage timing", min=1)] = 20,
) -> None:
    """Benchmark every stage and the whole path (1 h and 24 h, several concurrencies) beside the floor axon."""
    if not data_dir.is_dir():
        raise typer.BadParameter(f"{data_dir} is not a folder of price CSV files", param_hint="--data-dir")
    if not any(data_dir.glob("btc_1m.csv*")):  # the benchmark replays BTC's 1-minute file
        raise typer.BadParameter(f"{data_dir} has no btc_1m.csv(.gz): the benchmark replays BTC",
                                 param_hint="--data-dir")
    from synth_miner.bench import print_report, run_bench

    print_report(run_bench(data_dir, artifacts_dir, list(concurrency), per_lane, repeat))


def mount_subcommands() -> None:
    """Sub-apps living in their own modules (imported lazily by their commands)."""
    from synth_miner import cli_artifacts, cli_data, cli_eval, cli_model

    app.add_typer(cli_data.app, name="data")
    cli_artifacts.register(app)
    cli_eval.register(app)
    cli_model.register(app)


mount_subcommands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
