"""``synth-miner serve`` as an operator meets it: what it logs when it starts, and how it refuses to.

Every start failure is one clear line and a non-zero exit, found before the models load. The chain
is reached only at a closed loopback port and the public-IP lookup is patched: nothing leaves the
machine, whatever the code under test does.
"""

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from bittensor.utils import networking
from typer.testing import CliRunner

import core.engines_registry
from core.settings import Settings
from miner.access import MetagraphView
from miner.fallback import StatisticalForecaster, fallback_source
from miner.runtime import StartupError, build_app, serve
from synth_miner.cli import app
from synth_miner.devstack import free_port, make_wallet

ROOT = Path(__file__).resolve().parents[1]


# serve() installs its own root handler (on the stream of the moment): every test puts the old ones back.
pytestmark = pytest.mark.usefixtures("restored_root")


@pytest.fixture
def no_models(tmp_path: Path) -> Path:
    """A models folder without checkpoints: PatchTST cannot load, as on a box asked for a missing GPU."""
    folder = tmp_path / "no-models"
    folder.mkdir()
    return folder


def local_settings(tmp_path: Path, models_dir: Path, replay_dir: Path, **extra: Any) -> Settings:
    return Settings(_env_file=None, local=True, axon_host="127.0.0.1", axon_port=free_port(),
                    wallet_path=str(tmp_path / "wallets"), wallet_name="miner", data_dir=tmp_path / "data",
                    artifacts_dir=tmp_path / "artifacts", models_dir=models_dir, price_provider="replay",
                    replay_dir=replay_dir, engine="patchtst", log_level="INFO", **extra)


# ------------------------------------------------------------------ 1. the engine named at start-up


def test_startup_line_names_the_engine_actually_served(tmp_path: Path, no_models: Path, shared_data: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    stop = asyncio.Event()
    stop.set()  # start fully (axon on loopback included), then stop at once
    asyncio.run(serve(local_settings(tmp_path, no_models, shared_data), stop))
    text = capsys.readouterr().err
    line = next(x for x in text.splitlines() if "miner serving:" in x)
    assert "engine ewma_t (patchtst unavailable)" in line, line
    assert "engine patchtst," not in line


# ------------------------------------------------------------------ 6. the models are loaded once


def test_models_are_loaded_once_per_start(tmp_path: Path, shared_data: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[Path | None] = []
    real = core.engines_registry.engines_over

    def counting(settings: Settings, models_dir: Path | None) -> Any:
        loads.append(models_dir)
        return real(settings, models_dir)

    monkeypatch.setattr(core.engines_registry, "engines_over", counting)
    built = build_app(local_settings(tmp_path, ROOT / "models", shared_data))
    assert len(loads) == 1, "the fallback loaded every engine (PatchTST included) a second time"
    assert built.forecaster is not None
    pool, fallback = built.forecaster.current(), built.service.fallback.current()
    assert fallback.default == "ewma_t"
    assert fallback.engines["ewma_t"] is pool.engines["ewma_t"]  # shared, not a copy
    assert fallback.scale is pool.scale  # and the same calibration


def test_a_celery_miner_loads_no_model_for_its_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core.engines_registry, "engines_over", lambda *a: pytest.fail("models loaded"))
    settings = Settings(_env_file=None, artifacts_dir=tmp_path / "artifacts")
    source = fallback_source(settings, None)
    assert isinstance(source, StatisticalForecaster)
    assert source.current().default == "ewma_t" and "patchtst" not in source.current().engines


# ------------------------------------------------------------------ 2-4. refusals: one line, non-zero exit


def run_serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """The real command in its own process (rich tracebacks and bittensor's __del__ noise included)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SYNTH_")}
    clean.update({"PYTHONPATH": str(ROOT), "COLUMNS": "250", "SYNTH_DATA_DIR": str(tmp_path / "data"),
                  "SYNTH_ARTIFACTS_DIR": str(tmp_path / "artifacts"), "SYNTH_MODELS_DIR": str(tmp_path / "no-models"),
                  "SYNTH_WALLET_PATH": str(tmp_path / "wallets"), "SYNTH_LOG_LEVEL": "WARNING", **(env or {})})
    (tmp_path / "no-models").mkdir(exist_ok=True)
    try:
        done = subprocess.run([sys.executable, "-m", "synth_miner.cli", "serve", "--port", str(free_port()), *args],
                              env=clean, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)  # no terminal, as under docker or pm2
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else str(exc.stderr)
        pytest.fail(f"serve did not refuse to start: still running after 60 s\n{err[-3000:]}")
    return done.returncode, done.stdout + done.stderr


def flat(text: str) -> str:
    """The output with rich's box drawing and line wrapping removed."""
    return " ".join(text.replace("│", " ").replace("╭", " ").replace("╰", " ").split())


def assert_short(text: str) -> None:
    assert "Traceback" not in text and "Exception ignored" not in text, text[-3000:]
    assert len(text.strip().splitlines()) <= 8, text[-3000:]


def test_missing_wallet_is_named_before_anything_else(tmp_path: Path) -> None:
    chain = f"ws://127.0.0.1:{free_port()}"  # closed: nothing leaves the machine, fixed or not
    code, text = run_serve(tmp_path, "--wallet-name", "nobody", "--external-ip", "10.0.0.1", "--network", chain)
    assert code == 1, text
    assert_short(text)
    assert f"no hotkey at {tmp_path / 'wallets' / 'nobody' / 'hotkeys' / 'default'}" in text, text


def test_unreachable_chain_is_one_line(tmp_path: Path) -> None:
    make_wallet(tmp_path / "wallets", "miner")
    chain = f"ws://127.0.0.1:{free_port()}"
    code, text = run_serve(tmp_path, "--wallet-name", "miner", "--external-ip", "10.0.0.1", "--network", chain)
    assert code == 1, text
    assert_short(text)
    assert f"refusing to start: cannot reach the chain {chain} (ConnectionError" in text, text


def test_unknown_public_ip_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline() -> str:
        raise networking.ExternalIPNotFound()

    make_wallet(tmp_path / "wallets", "miner")
    monkeypatch.setattr(networking, "get_external_ip", offline)
    monkeypatch.chdir(tmp_path)
    for key in [k for k in os.environ if k.startswith("SYNTH_")]:
        monkeypatch.delenv(key)
    result = CliRunner().invoke(app, ["serve", "--wallet-path", str(tmp_path / "wallets"), "--wallet-name", "miner",
                                      "--network", f"ws://127.0.0.1:{free_port()}", "--log-level", "WARNING"],
                                env={"SYNTH_MODELS_DIR": str(tmp_path), "SYNTH_DATA_DIR": str(tmp_path / "data"),
                                     "SYNTH_ARTIFACTS_DIR": str(tmp_path / "artifacts")})
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "refusing to start: cannot determine the public IP (ExternalIPNotFound): pass --external-ip" \
        in result.output, result.output


@pytest.mark.parametrize("content", [None, "not json", '{"hotkey": "5abc"}', '["5abc"]', '[{"stake": 1}]'])
def test_bad_metagraph_file_is_a_usage_error(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "metagraph.json"
    if content is not None:
        path.write_text(content)
    code, text = run_serve(tmp_path, "--local", "--metagraph-file", str(path))
    assert code == 2, text
    assert_short(text)
    assert f"Invalid value for --metagraph-file / SYNTH_METAGRAPH_FILE: metagraph file {path} is not a JSON list" \
        in flat(text), text


def test_a_metagraph_file_must_hold_a_list(tmp_path: Path) -> None:
    path = tmp_path / "metagraph.json"
    path.write_text("{}")  # iterates as an empty list: it used to load as an empty metagraph
    with pytest.raises(ValueError, match="not a JSON list"):
        MetagraphView.from_file(path)
    path.write_text(json.dumps([{"hotkey": "5vali", "stake": 1.0, "validator_permit": True}]))
    assert MetagraphView.from_file(path).get("5vali") is not None


@pytest.mark.parametrize("folder", ["missing", "empty", "file"])
def test_replay_folder_without_prices_is_refused(tmp_path: Path, folder: str) -> None:
    path = tmp_path / folder
    if folder == "empty":
        path.mkdir()
        (path / "notes.txt").write_text("no prices here")
    if folder == "file":  # a price file given for the folder holding it: it exists, so "does not exist" misled
        path.write_text("timestamp,close\n")
    code, text = run_serve(tmp_path, "--local", "--replay-dir", str(path))
    assert code == 2, text
    assert_short(text)
    expected = {"missing": "does not exist", "empty": "holds no price file for any replayed asset",
                "file": "is a file, not a folder"}[folder]
    assert f"Invalid value for --replay-dir / SYNTH_REPLAY_DIR: replay folder {path} {expected}" in flat(text), text


def test_a_replay_folder_no_asset_reads_is_said_at_start(tmp_path: Path) -> None:
    """SYNTH_REPLAY_DIR alone (the variable the README gives the workers) leaves the provider 'auto': the miner
    read live prices while the operator believed it offline. The start says so (then stops here on the missing
    metagraph file, which comes after the replay check)."""
    code, text = run_serve(tmp_path, "--local", "--metagraph-file", str(tmp_path / "missing.json"),
                           env={"SYNTH_REPLAY_DIR": str(tmp_path)})
    assert code == 2, text
    assert f"SYNTH_REPLAY_DIR {tmp_path} is not replayed: no asset's price provider is 'replay' " \
           "(SYNTH_PRICE_PROVIDER=auto)" in flat(text), text


@pytest.mark.parametrize("port", ["1024", "65535"])
def test_a_port_bittensor_refuses_is_a_usage_error(tmp_path: Path, port: str) -> None:
    """bittensor's Axon asserts 1024 < port < 65535 once the models are loaded: --port 80 ended on an
    AssertionError traceback and an "Exception ignored" one from the half-built axon."""
    code, text = run_serve(tmp_path, "--local", "--port", port)
    assert code == 2, text
    assert_short(text)
    bound = "greater than 1024" if port == "1024" else "less than 65535"
    assert f"SYNTH_AXON_PORT: Input should be {bound}" in flat(text), text


def test_unexpected_error_is_one_line_and_non_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    async def broken(settings: Settings, stop: asyncio.Event | None = None) -> None:
        raise RuntimeError("disk\non fire")

    monkeypatch.setattr("miner.runtime.serve", broken)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["serve", "--local"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output.strip() == "miner stopped: RuntimeError: disk on fire", result.output
    # A bug, unlike a refused configuration, keeps its traceback: in the log.
    logged = [r for r in caplog.records if r.getMessage() == "the miner stopped on an unexpected error"]
    assert len(logged) == 1 and logged[0].exc_info is not None


# ------------------------------------------------------------------ 5. the bind address under --local


def recorded_serves(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Settings]:
    """`serve` records the settings it would run with instead of serving, in a folder and an environment
    without SYNTH_ variables."""
    seen: list[Settings] = []

    async def record(settings: Settings, stop: asyncio.Event | None = None) -> None:
        seen.append(settings)

    monkeypatch.setattr("miner.runtime.serve", record)
    monkeypatch.chdir(tmp_path)
    for key in [k for k in os.environ if k.startswith("SYNTH_")]:
        monkeypatch.delenv(key)
    return seen


@pytest.mark.parametrize(("args", "env", "dotenv", "host"), [
    (["--local"], {}, None, "127.0.0.1"),  # the local default
    (["--local", "--host", "0.0.0.0"], {}, None, "0.0.0.0"),  # an explicit flag wins
    (["--local"], {"SYNTH_AXON_HOST": "0.0.0.0"}, None, "0.0.0.0"),  # and so does the environment
    (["--local"], {}, "SYNTH_AXON_HOST=10.1.2.3\n", "10.1.2.3"),  # or .env
    ([], {"SYNTH_LOCAL": "true"}, None, "127.0.0.1"),  # local mode from the environment: same default
    ([], {}, None, "0.0.0.0"),  # production: every interface
])
def test_local_binds_loopback_unless_a_host_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     args: list[str], env: dict[str, str], dotenv: str | None,
                                                     host: str) -> None:
    """Where each source of the address leads, read from the settings handed to the miner (cheap: nothing
    starts); test_the_real_axon_listens_where_the_flags_say checks the socket the real axon opens."""
    seen = recorded_serves(monkeypatch, tmp_path)
    if dotenv:
        (tmp_path / ".env").write_text(dotenv)
    result = CliRunner().invoke(app, ["serve", *args], env=env)
    assert result.exit_code == 0, result.output
    assert [s.axon_host for s in seen] == [host]


def tcp_listeners(port: int) -> list[str]:
    """The addresses a socket listens on at ``port``, as the kernel reports them (IPv4 and IPv6)."""
    found: list[str] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            if len(address) == 8:  # IPv4, host byte order (little-endian)
                found.append(".".join(str(b) for b in reversed(bytes.fromhex(address))))
            else:
                found.append(f"ipv6:{address}")
    return found


async def connects(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the kernel's socket table (Linux)")
@pytest.mark.parametrize(("args", "bound", "other_loopback"), [
    (["--local"], "127.0.0.1", False),  # the local default: loopback only
    (["--local", "--host", "0.0.0.0"], "0.0.0.0", True),  # an explicit flag: every interface
])
def test_the_real_axon_listens_where_the_flags_say(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   shared_data: Path, args: list[str], bound: str,
                                                   other_loopback: bool) -> None:
    """The real command and the real axon: the kernel's listening socket, not the settings, is checked.
    127.0.0.2 is a loopback address that a socket bound to 127.0.0.1 does not answer and one bound to
    0.0.0.0 does, so the check needs no network interface beyond lo."""
    port = free_port()
    seen: dict[str, Any] = {}

    async def probed(settings: Settings, stop: asyncio.Event | None = None) -> None:
        stop = asyncio.Event()

        async def probe() -> None:
            try:
                for _ in range(600):  # up to 30 s for the models and the axon thread
                    if tcp_listeners(port):
                        break
                    await asyncio.sleep(0.05)
                seen["listeners"] = tcp_listeners(port)
                seen["127.0.0.1"] = await connects("127.0.0.1", port)
                seen["127.0.0.2"] = await connects("127.0.0.2", port)
            finally:
                stop.set()

        task = asyncio.create_task(probe())
        try:
            await serve(settings, stop)
        finally:
            task.cancel()
        for _ in range(200):  # axon.stop() only asks uvicorn's thread to exit: give it up to 10 s
            if not tcp_listeners(port):
                break
            await asyncio.sleep(0.05)
        seen["after"] = tcp_listeners(port)

    (tmp_path / "no-models").mkdir()
    monkeypatch.setattr("miner.runtime.serve", probed)
    monkeypatch.chdir(tmp_path)
    for key in [k for k in os.environ if k.startswith("SYNTH_")]:
        monkeypatch.delenv(key)
    env = {"SYNTH_WALLET_PATH": str(tmp_path / "wallets"), "SYNTH_DATA_DIR": str(tmp_path / "data"),
           "SYNTH_ARTIFACTS_DIR": str(tmp_path / "artifacts"), "SYNTH_MODELS_DIR": str(tmp_path / "no-models"),
           "SYNTH_LOG_LEVEL": "WARNING"}
    result = CliRunner().invoke(app, ["serve", *args, "--port", str(port), "--replay-dir", str(shared_data)],
                                env=env)
    assert result.exit_code == 0, result.output
    assert seen["listeners"] == [bound], seen  # the kernel's word: loopback only, or every interface
    assert seen["127.0.0.1"] is True, seen
    assert seen["127.0.0.2"] is other_loopback, seen
    assert seen["after"] == [], seen  # and the axon stopped with the miner


def test_bench_without_its_price_folder_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["bench", "--data-dir", str(tmp_path / "missing"), "--repeat", "1"])
    assert result.exit_code == 2 and "--data-dir" in result.output, result.output
    result = CliRunner().invoke(app, ["bench", "--data-dir", str(tmp_path), "--repeat", "1"])  # no btc_1m file
    assert result.exit_code == 2 and "btc_1m" in flat(result.output), result.output
    for option in ("--repeat", "--per-lane", "--concurrency"):  # 0 ran ~11 s, then a StatisticsError traceback
        result = CliRunner().invoke(app, ["bench", "--data-dir", str(tmp_path), option, "0"])
        assert result.exit_code == 2 and option in result.output, result.output


def test_a_host_that_is_no_address_is_blamed_not_the_port(tmp_path: Path, shared_data: Path) -> None:
    code, text = run_serve(tmp_path, "--local", "--host", "999.1.1.1", "--replay-dir", str(shared_data))
    assert code == 2 and "--host" in flat(text) and "--port" not in flat(text), text[-3000:]
    assert_short(text)


def test_a_port_already_taken_is_refused_in_one_line(tmp_path: Path, shared_data: Path) -> None:
    """bittensor binds the axon in a thread that dies silently: without the check the miner logged
    "miner serving" and ran on with nothing listening."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, text = run_serve(tmp_path, "--local", "--port", str(port), "--replay-dir", str(shared_data))
    assert code == 2, text[-3000:]
    assert f"cannot listen on 127.0.0.1:{port}" in flat(text) and "--port" in flat(text), text[-3000:]
    assert_short(text)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # uvicorn's thread exits
def test_an_axon_that_never_binds_is_not_reported_as_serving(tmp_path: Path, shared_data: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The port taken between the check and uvicorn's bind (another process was quicker): serve refuses
    instead of running on with a dead axon."""
    settings = local_settings(tmp_path, tmp_path, shared_data)  # no checkpoints there: EWMA-t, fast to start
    monkeypatch.setattr("miner.runtime.check_port", lambda host, port: None)  # the race: free when checked...
    monkeypatch.setattr("miner.runtime.AXON_START_S", 2.0)
    with socket.socket() as holder:
        holder.bind((settings.axon_host, settings.axon_port))  # ...taken when uvicorn binds
        holder.listen()
        with pytest.raises(StartupError, match=f"not listening on 127.0.0.1:{settings.axon_port}"):
            asyncio.run(serve(settings, asyncio.Event()))
    assert "miner serving:" not in capsys.readouterr().err


# ------------------------------------------------------------------ 7. the metrics port, chain publication, options


@pytest.mark.parametrize("same_as_axon", [False, True])
def test_a_taken_metrics_port_is_refused_before_serving(tmp_path: Path, shared_data: Path, same_as_axon: bool,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The metrics port was bound only after "miner serving" was logged: taken, the miner stopped on an
    OSError traceback (its axon left running in the process), with no word of which port or option."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        settings = local_settings(tmp_path, tmp_path, shared_data, metrics_port=taken)
        if same_as_axon:
            settings = settings.model_copy(update={"metrics_port": settings.axon_port})
        with pytest.raises(StartupError) as caught:
            asyncio.run(serve(settings, asyncio.Event()))
    assert caught.value.option == "--metrics-port / SYNTH_METRICS_PORT"
    expected = "is the axon's port" if same_as_axon else f"cannot listen on 127.0.0.1:{taken}"
    assert expected in str(caught.value), caught.value
    assert "miner serving:" not in capsys.readouterr().err


def test_a_refused_start_after_the_models_load_stops_what_it_started(tmp_path: Path, shared_data: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused chain publication (or any start failure once the app is built) left the pool (its threads)
    and the axon running in the process."""
    import miner.chain
    from miner.pool import EmbeddedPool

    make_wallet(tmp_path / "wallets", "miner")
    closed: list[str] = []
    real_close = EmbeddedPool.close

    async def close(self: EmbeddedPool) -> None:
        closed.append("pool")
        await real_close(self)

    def refused(settings: Settings, axon: Any, subtensor: Any) -> None:
        raise StartupError("cannot publish the axon (rate limited)")

    monkeypatch.setattr(EmbeddedPool, "close", close)
    monkeypatch.setattr(miner.chain, "connect_chain", lambda settings, wallet: object())
    monkeypatch.setattr(miner.chain, "publish_axon", refused)
    settings = local_settings(tmp_path, tmp_path, shared_data, axon_external_ip="127.0.0.1")
    settings = settings.model_copy(update={"local": False})
    with pytest.raises(StartupError, match="rate limited"):
        asyncio.run(serve(settings, asyncio.Event()))
    assert closed == ["pool"]


def test_replay_dir_with_a_live_provider_is_a_usage_error(tmp_path: Path, shared_data: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """--replay-dir beside --provider binance was dropped without a word: live prices were served."""
    seen = recorded_serves(monkeypatch, tmp_path)
    result = CliRunner().invoke(app, ["serve", "--local", "--replay-dir", str(shared_data), "--provider", "binance"])
    assert result.exit_code == 2 and not seen, result.output
    assert "--replay-dir" in result.output and "binance" in result.output
    for extra, env in ((["--provider", "replay"], {}), ([], {"SYNTH_PRICE_PROVIDER": "binance"}),
                       (["--provider", "binance"], {"SYNTH_PROVIDER_OVERRIDES": '{"BTC": "replay"}'})):
        result = CliRunner().invoke(app, ["serve", "--local", "--replay-dir", str(shared_data), *extra], env=env)
        assert result.exit_code == 0, (extra, env, result.output)
    assert [s.provider_for("ETH") for s in seen] == ["replay", "replay", "binance"]


def test_a_password_protected_hotkey_without_a_terminal_is_named(tmp_path: Path) -> None:
    """Without a terminal bittensor prompted anyway and refused with "Wrong password for decryption", for a
    password nobody was asked."""
    import bittensor as bt

    wallet = bt.Wallet(name="miner", hotkey="default", path=str(tmp_path / "wallets"))
    wallet.create_new_coldkey(use_password=False, overwrite=True, suppress=True)
    keypair = bt.Keypair.create_from_mnemonic(bt.Keypair.generate_mnemonic())
    wallet.hotkey_file.set_keypair(keypair, encrypt=True, overwrite=True, password="a-long-password-1")
    code, text = run_serve(tmp_path, "--wallet-name", "miner", "--external-ip", "10.0.0.1",
                           "--network", f"ws://127.0.0.1:{free_port()}")
    assert code == 1, text
    assert_short(text)
    assert f"the hotkey at {wallet.hotkey_file.path} is password-protected and there is no terminal" in flat(text), text
    assert "Wrong password" not in text


def test_shutdown_closes_every_price_source_even_when_one_close_fails(
        tmp_path: Path, no_models: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The miner never closed its price sources (their aiohttp sessions) at shutdown; closing them, the
    first that fails must not leave the others open."""
    import miner.runtime
    from core.sources.binance import BinanceSource
    from core.sources.replay import ReplaySource

    closed: list[str] = []

    def closing(name: str) -> Any:
        async def close(self: Any) -> None:
            closed.append(name)
            if len(closed) == 1:  # whichever is closed first fails
                raise RuntimeError(f"{name}: close failed")
        return close

    real_build_app = miner.runtime.build_app

    def build_app(settings: Settings, metagraph: MetagraphView | None = None) -> miner.runtime.MinerApp:
        built = real_build_app(settings, metagraph)
        for asset in ("BTC", "ETH"):  # what the first requests do: each provider's source is built
            built.data.shared.sources(asset)
        return built

    monkeypatch.setattr(ReplaySource, "close", closing("replay"))
    monkeypatch.setattr(BinanceSource, "close", closing("binance"))
    monkeypatch.setattr(miner.runtime, "build_app", build_app)
    settings = local_settings(tmp_path, no_models, shared_data, provider_overrides={"ETH": "binance"},
                              binance_url=f"http://127.0.0.1:{free_port()}")  # never asked: nothing is served
    stop = asyncio.Event()
    stop.set()  # start fully, then stop at once
    asyncio.run(serve(settings, stop))
    assert sorted(closed) == ["binance", "replay"]
    assert f"closing the {closed[0]} price source failed: RuntimeError" in capsys.readouterr().err


def test_a_miner_on_chain_starts_serving_only_once_its_first_metagraph_is_read(
        tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Until the first metagraph read every validator is refused ("metagraph not read yet"): the axon starts
    listening only after that read (here 0.5 s in), not as soon as the read is sent off."""
    import miner.chain
    import miner.runtime
    from miner.access import Neuron

    make_wallet(tmp_path / "wallets", "miner")
    views: list[MetagraphView] = []
    loaded_when_listening: list[bool] = []
    real_listening = miner.runtime.listening

    async def first_read_after_half_a_second(settings: Settings, view: MetagraphView, subtensor: Any,
                                             **kwargs: Any) -> None:
        views.append(view)
        await asyncio.sleep(0.5)
        view.replace({"validator": Neuron("validator", 1e6, True)})
        await asyncio.Event().wait()  # refreshes, until cancelled at shutdown

    async def listening(axon: Any) -> bool:
        loaded_when_listening.append(views[0].loaded)
        return await real_listening(axon)

    monkeypatch.setattr(miner.chain, "connect_chain", lambda settings, wallet: object())
    monkeypatch.setattr(miner.chain, "publish_axon", lambda settings, axon, subtensor: None)
    monkeypatch.setattr(miner.chain, "keep_metagraph_fresh", first_read_after_half_a_second)
    monkeypatch.setattr(miner.runtime, "listening", listening)
    settings = local_settings(tmp_path, tmp_path, shared_data, axon_external_ip="127.0.0.1")
    settings = settings.model_copy(update={"local": False})

    async def serve_then_stop() -> None:
        stop = asyncio.Event()
        serving = asyncio.create_task(serve(settings, stop))
        while not loaded_when_listening and not serving.done():
            await asyncio.sleep(0.05)
        stop.set()
        await serving

    asyncio.run(serve_then_stop())
    assert loaded_when_listening == [True]
