"""The local stack's process handling: nothing it starts outlives the process that started it."""

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synth_miner.devstack import ROOT

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
    assert not answers(port), "the Redis server outlived the process that started it"
