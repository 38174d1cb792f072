"""The local stack the end-to-end tests stand on: nothing it starts outlives the process that started it or
reaches the machine's own Redis, and its verdict on a reply is both validators'."""

import math
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import redis

from core.prompts import parse_start_time
from miner.protocol import Simulation, SimulationInput
from synth_miner.devstack import (
    ROOT,
    RedisServer,
    assert_valid_reply,
    free_port,
    spawn,
    start_time_in,
    wait_port,
)

STARTER = """
import sys, time
from pathlib import Path
from synth_miner.devstack import RedisServer
server = RedisServer(Path(sys.argv[1])).start()
print(server.port, flush=True)
time.sleep(120)
"""


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is a Linux prctl")
def test_a_redis_server_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    """A test run killed by a timeout (its fixtures never torn down) left its private Redis servers running
    for good: three were found alive an hour later. They now get SIGKILL when their starter dies."""
    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                               cwd=ROOT)
    try:
        assert starter.stdout is not None
        port = int(starter.stdout.readline())
        assert answers(port)
    finally:
        starter.kill()
        starter.wait(10)
    deadline = time.monotonic() + 10
    while answers(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    outlived = answers(port)
    if outlived:  # leave no server behind for the next run
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"SHUTDOWN NOSAVE\r\n")
    assert not outlived, "the Redis server outlived the process that started it"


def test_a_redis_server_listens_on_loopback_only_and_never_on_the_machines_6379(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    try:
        assert server.port != 6379 and answers(server.port)
        client = redis.Redis.from_url(server.url)
        assert client.config_get("bind") == {"bind": "127.0.0.1"}
        client.close()
    finally:
        server.stop()


def test_a_redis_server_with_a_password_refuses_clients_without_it(tmp_path: Path) -> None:
    """What the password-protected fleet's Redis does: a worker tested against it must really authenticate."""
    server = RedisServer(tmp_path, password="s3cret-pw").start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            assert sock.recv(64).startswith(b"-NOAUTH")
        assert ":s3cret-pw@" in server.url
        client = redis.Redis.from_url(server.url)
        assert client.ping() is True
        client.close()
    finally:
        server.stop()


def test_a_stopped_redis_server_is_gone_and_frees_its_port(tmp_path: Path) -> None:
    """A restart (stop, then start on the same port) must meet a new server, not the old one still running."""
    server = RedisServer(tmp_path).start()
    server.stop()
    assert server.proc is not None and server.proc.poll() is not None
    assert not answers(server.port)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", server.port))


def alive(pid: int) -> bool:
    """Running, not a zombie no one reaped (an orphan's parent may be a PID 1 that never waits)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_stopping_a_process_also_stops_the_processes_it_started(tmp_path: Path) -> None:
    """A Celery worker's pool children or a shell's commands: the whole process group gets the signal, none
    is left behind holding a port or a queue."""
    log = tmp_path / "parent.log"
    proc = spawn(["bash", "-c", "sleep 300 & echo $!; wait"], {}, log)
    try:
        deadline = time.monotonic() + 10
        while not log.read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(log.read_text().split()[0])
        assert alive(child)
    finally:
        proc.stop()
    assert proc.proc.poll() is not None
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = alive(child)
    if left:
        os.kill(child, signal.SIGKILL)
    assert not left, "the child outlived its stopped parent"


def test_a_process_gets_the_environment_it_is_given_over_the_callers(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A SYNTH_REDIS_URL left in the shell must never point a stack's worker at the machine's own Redis."""
    monkeypatch.setenv("SYNTH_REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("DEVSTACK_TEST_INHERITED", "from-the-caller")
    script = ("import os; print(os.environ['SYNTH_REDIS_URL'], os.environ['DEVSTACK_TEST_INHERITED'], "
              "os.environ['PYTHONUNBUFFERED'], os.getcwd())")
    proc = spawn([sys.executable, "-c", script], {"SYNTH_REDIS_URL": "redis://127.0.0.1:1/0"},
                 tmp_path / "env.log")
    try:
        assert proc.proc.wait(30) == 0, proc.text()
    finally:
        proc.stop()
    assert proc.text().split() == ["redis://127.0.0.1:1/0", "from-the-caller", "1", str(ROOT)]


def test_waiting_for_a_port_fails_at_once_with_the_log_when_the_process_exits(tmp_path: Path) -> None:
    """A miner that dies while starting is reported with its last words, not after a minute of waiting."""
    proc = spawn([sys.executable, "-c", "import sys; print('cannot bind: boom'); sys.exit(3)"], {},
                 tmp_path / "dies.log")
    began = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="exited with 3") as raised:
            wait_port(free_port(), proc.proc, proc.log, timeout=20)
    finally:
        proc.stop()
    assert "cannot bind: boom" in str(raised.value)
    assert time.monotonic() - began < 10


def test_a_start_time_is_a_whole_minute_ahead_as_the_validators_send_it() -> None:
    before = datetime.now(timezone.utc)
    text = start_time_in(120)
    after = datetime.now(timezone.utc)
    moment = datetime.fromisoformat(text)
    assert moment.tzinfo is not None and moment.utcoffset() == timedelta(0)
    assert moment.second == 0 and moment.microsecond == 0, text
    assert before + timedelta(seconds=60) < moment <= after + timedelta(seconds=120), (before, text)


def reply_with(point: float) -> Simulation:
    """A 2-path reply to a high-frequency BTC prompt, every point 100.5 but the last, as the dendrite hands it."""
    start_time = "2025-01-01T00:00:00+00:00"
    paths = [[100.5] * 61, [100.5] * 60 + [point]]
    reply = Simulation(simulation_input=SimulationInput(asset="BTC", start_time=start_time, time_increment=60,
                                                        time_length=3_600, num_simulations=2),
                       simulation_output=(parse_start_time(start_time), 60, *paths))
    assert reply.dendrite is not None
    reply.dendrite.status_code = 200
    return reply


def test_a_reply_either_validator_rule_set_rejects_is_not_valid() -> None:
    """The end-to-end tests' verdict: NaN passes HEAD's digit count but not UPSTREAM; -1234567.8 has 8
    significant digits for UPSTREAM but 9 characters for HEAD."""
    assert_valid_reply(reply_with(101.25))
    for point in (math.nan, -1234567.8):
        with pytest.raises(AssertionError):
            assert_valid_reply(reply_with(point))


def test_a_call_no_miner_answers_says_so(tmp_path: Path) -> None:
    """The README's check against a port nothing listens on failed with "AssertionError: (None, None)": the
    axon's status, which a reply that never came has not. It names the dendrite's now."""
    import asyncio

    from synth_miner.devstack import Validator, make_wallet

    port = free_port()

    async def ask() -> Simulation:
        validator = Validator(make_wallet(tmp_path / "wallets", "validator"), "5F" + "1" * 46, port)
        try:
            reply, _ = await validator.ask(timeout=5.0)
        finally:
            await validator.close()
        return reply

    reply = asyncio.run(ask())
    with pytest.raises(AssertionError, match=f"503, 'Service unavailable at 127.0.0.1:{port}/Simulation'"):
        assert_valid_reply(reply)
