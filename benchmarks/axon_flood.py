"""Floods and hostile clients against a real miner's axon, with a signed validator asking throughout.

    python -m benchmarks.axon_flood                                   # every kind, ~1.5 min on 2 cores
    python -m benchmarks.axon_flood --kinds unsigned,never-read --requests 500 --connections 100

Starts ``synth-miner serve --local`` (embedded pool, no Redis) replaying ../shared/data on a free loopback
port, with the axon's production settings except a rate limit no validator reaches (the honest validator
asks four times a second for the whole run). Then, kind after kind, an attacker process sends N requests
over C concurrent connections while the validator asks a signed 1 h BTC prompt (100 paths) every 0.25 s,
always the same one, starting 10 minutes after the run began: its answer is computed once and shared, so
the miner's CPU per honest ask stays the same from kind to kind.

Kinds:

    unsigned     a stranger's request without its signature (keep-alive lanes; 403 expected)
    stranger     signed by a hotkey the miner does not serve (403)
    forged       the validator's hotkey with a wrong signature (401)
    no-nonce     the validator's signed headers less the nonce (401)
    oversized    Content-Length 100 MB, then the body streamed until the miner closes (413)
    chunked      an endless chunked body (413)
    big-header   a 1 MB header line (400)
    never-read   a served hotkey asks a 24 h prompt (1000 paths, ~2.8 MB) and never reads the reply
    slow-read    the same, reading one byte a second

Default N: 10000 for the first four (keep-alive lanes); one request per connection for the others, 1000
for the body and header kinds, C for the readers; the readers sign each request afresh, one dendrite per connection.

Printed per kind: the miner's CPU per attack request (utime + stime from /proc/<pid>/stat, less the
honest asks' share as measured in a quiet baseline first), its RSS and open descriptors before / peak /
after (1 s after the attacker is done), how long it held more descriptors than before ("held s": a
never-reading client cannot see the miner let go of it), the validator's ok / total and p50 / p99
(as its dendrite sees them, client-side bookkeeping included), the statuses or outcomes the attacker
saw, and forecasts the miner answered to the attacker. A table, then one JSON line.
"""

import argparse
import asyncio
import contextlib
import json
import os
import re
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
HOST = "127.0.0.1"
FLOODS = ("unsigned", "stranger", "forged", "no-nonce")
BODIES = ("oversized", "chunked", "big-header")
READERS = ("never-read", "slow-read")
KINDS = FLOODS + BODIES + READERS
DEFAULT_REQUESTS = {**dict.fromkeys(FLOODS, 10_000), **dict.fromkeys(BODIES, 1000)}  # readers: --connections
ANSWER_S = 30.0  # an attack request with no answer (or a connection not closed) within this counts as such
# How long a reader holds its connection: twice the miner's request timeout. The miner may let go sooner
# without the reader seeing it (a FIN queued behind the unread reply): "held s" shows when it did.
READER_HOLD_S = 20.0
BASELINE_S = 6.0
HONEST = {"asset": "BTC", "time_increment": 60, "time_length": 3_600, "num_simulations": 100}
HONEST_TIMEOUT_S = 15.0
HONEST_PERIOD_S = 0.25  # the validator asks at this pace (not back to back: its own load would swamp N small)


# --- the attacker (its own process: imports bittensor only for the readers) ---------------------------------


def raw_post(headers: dict[str, str], body: bytes, length: int | None = None) -> bytes:
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items() if k.lower() not in ("content-length", "host"))
    size = len(body) if length is None else length
    return f"POST /Simulation HTTP/1.1\r\nHost: {HOST}\r\n{head}Content-Length: {size}\r\n\r\n".encode() + body


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """One reply's status, and whether the miner closes the connection after it."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    await reader.readexactly(int(length.group(1)) if length else 0)
    return int(head.split(b" ", 2)[1]), re.search(rb"(?i)\r\nconnection: *close", head) is not None


async def flood(port: int, request: bytes, n: int, c: int, seen: Counter[str]) -> None:
    """``n`` requests over ``c`` keep-alive lanes; a lane reconnects when the miner closes."""
    left = n

    async def lane() -> None:
        nonlocal left
        writer: asyncio.StreamWriter | None = None
        while left > 0:
            left -= 1
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(HOST, port)
                writer.write(request)
                status, close = await asyncio.wait_for(read_reply(reader), ANSWER_S)
                seen[str(status)] += 1
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError) as exc:
                seen[type(exc).__name__] += 1
                close = True
            if close and writer is not None:
                writer.close()
                writer = None
        if writer is not None:
            writer.close()

    await asyncio.gather(*(lane() for _ in range(c)))


async def push_until_closed(port: int, head: bytes, chunk: bytes, chunks: int) -> str:
    """Sends ``head`` then ``chunks`` chunks (-1: without end) while reading the answer; the outcome. Raw
    sockets: asyncio's StreamReader raises a reset before handing over what it had already received."""
    loop = asyncio.get_running_loop()
    began = time.monotonic()
    sock = socket.socket()
    sock.setblocking(False)

    async def push() -> None:
        await loop.sock_sendall(sock, head)
        sent = 0
        while sent != chunks:
            await loop.sock_sendall(sock, chunk)
            sent += 1

    answer, ending = b"", f"open after {ANSWER_S:.0f} s"
    try:
        await loop.sock_connect(sock, (HOST, port))
        pusher = asyncio.create_task(push())
        try:
            async with asyncio.timeout(ANSWER_S):
                while data := await loop.sock_recv(sock, 65_536):
                    answer = (answer + data)[:64]  # the status line is all we keep
            ending = "closed"
        except ConnectionError:
            ending = "reset"
        except TimeoutError:
            pass
        finally:
            pusher.cancel()
            await asyncio.gather(pusher, return_exceptions=True)  # its ConnectionResetError is expected
    finally:
        sock.close()
    status = answer.split(b" ", 2)[1].decode(errors="replace") if answer.startswith(b"HTTP/") else "no answer"
    return f"{status}, {ending} in {bucket(time.monotonic() - began)}"


def bucket(seconds: float) -> str:
    """Coarse enough that outcomes count up: < 1 s, < 5 s, or the whole seconds rounded to five."""
    return "<1 s" if seconds < 1 else "<5 s" if seconds < 5 else f"~{5 * round(seconds / 5):.0f} s"


async def read_slowly(port: int, request: bytes, sip: bool) -> str:
    """A connection with a small receive buffer that sends ``request`` and then reads nothing (or a byte a
    second); the outcome: the reply's status (peeked, not read) and whether the miner cut it."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    began = time.monotonic()
    status, ending = "no answer", f"nothing seen in {READER_HOLD_S:.0f} s"
    try:
        await loop.sock_connect(sock, (HOST, port))
        await loop.sock_sendall(sock, request)
        while time.monotonic() - began < READER_HOLD_S:
            await asyncio.sleep(1.0 if sip else 0.25)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):  # a reset from the miner
                ending = f"cut in {bucket(time.monotonic() - began)}"
                break
            try:
                if status == "no answer":
                    head = sock.recv(12, socket.MSG_PEEK)
                    status = head[9:12].decode(errors="replace") if len(head) == 12 else status
                if sip and status != "no answer" and sock.recv(1) == b"":
                    ending = f"closed in {bucket(time.monotonic() - began)}"
                    break
            except BlockingIOError:
                pass
    except ConnectionError:
        ending = f"cut in {bucket(time.monotonic() - began)}"
    finally:
        sock.close()
    return f"{status}, {ending}"


def reader_lanes(spec: dict[str, Any]) -> list[Any]:
    """A dendrite per lane (its own nonces), made before the attack: imports bittensor, off the clock."""
    from synth_miner.devstack import Validator, make_wallet

    wallet = make_wallet(Path(spec["wallets"]), spec["insider"])
    return [Validator(wallet, spec["miner_hotkey"], spec["port"]) for _ in range(spec["connections"])]


async def readers(spec: dict[str, Any], lanes: list[Any], seen: Counter[str]) -> None:
    """Each lane: a freshly signed 24 h request on a new connection, held READER_HOLD_S (or until cut), then
    the next."""
    from miner.protocol import Simulation, SimulationInput
    from synth_miner.devstack import start_time_in

    left = spec["requests"]

    async def lane(validator: Any) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            synapse = Simulation(simulation_input=SimulationInput(
                asset="BTC", start_time=start_time_in(120), time_increment=300, time_length=86_400,
                num_simulations=1000))
            prepared = validator.dendrite.preprocess_synapse_for_request(validator.axon_info(), synapse, 60.0)
            headers = {k: str(v) for k, v in prepared.to_headers().items()}
            headers["Content-Type"] = "application/json"
            request = raw_post(headers, json.dumps(prepared.model_dump(mode="json")).encode())
            seen[await read_slowly(spec["port"], request, spec["kind"] == "slow-read")] += 1

    await asyncio.gather(*(lane(v) for v in lanes))


async def attack(spec: dict[str, Any]) -> dict[str, Any]:
    kind, port, n, c = spec["kind"], spec["port"], spec["requests"], spec["connections"]
    seen: Counter[str] = Counter()
    lanes = reader_lanes(spec) if kind in READERS else []
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    began = time.monotonic()
    if kind in FLOODS:
        await flood(port, raw_post(spec["headers"][kind], spec["body"].encode()), n, c, seen)
    elif kind in READERS:
        await readers(spec, lanes, seen)
    else:
        semaphore = asyncio.Semaphore(c)
        forged = spec["headers"]["forged"]

        async def one() -> None:
            async with semaphore:
                try:
                    if kind == "oversized":
                        outcome = await push_until_closed(port, raw_post(forged, b"", 100 * 2**20), b"x" * 65_536, 1600)
                    elif kind == "chunked":
                        head = raw_post(forged, b"").replace(b"Content-Length: 0\r\n", b"Transfer-Encoding: chunked\r\n")
                        outcome = await push_until_closed(port, head, b"10000\r\n" + b"x" * 65_536 + b"\r\n", -1)
                    else:
                        head = b"POST /Simulation HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2**20 + b"\r\n\r\n"
                        outcome = await push_until_closed(port, head, b"", 0)
                except OSError as exc:
                    outcome = type(exc).__name__
                seen[outcome] += 1

        await asyncio.gather(*(one() for _ in range(n)))
    return {"statuses": dict(seen.most_common()), "attack_s": round(time.monotonic() - began, 2)}


# --- the miner, the validator and the figures ----------------------------------------------------------------


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Row:
    kind: str
    requests: int
    connections: int
    wall_s: float
    miner_cpu_s: float
    cpu_ms_per_request: float | None  # the honest asks' share taken out
    rss_mb: tuple[float, float, float]  # before, peak, after
    fds: tuple[int, int, int]  # before, peak, after
    fds_held_s: float  # from the attack's start to the last moment the miner had more descriptors than before
    honest_ok: int
    honest_total: int
    honest_p50_ms: float | None
    honest_p99_ms: float | None
    answered_to_attacker: int  # forecasts the miner sent that the honest validator did not ask for
    statuses: dict[str, int]


async def run_kind(kind: str, args: argparse.Namespace, ctx: dict[str, Any], honest_cpu_s: float) -> Row:
    """One kind: the attacker started and ready, then figures from its "go" to 1 s after its result."""
    import numpy as np

    pid, validator, miner = ctx["pid"], ctx["validator"], ctx["miner"]
    n = args.requests or DEFAULT_REQUESTS.get(kind, args.connections)
    spec = ctx["tmp"] / f"attack-{kind}.json"
    spec.write_text(json.dumps({**ctx["spec"], "kind": kind, "requests": n, "connections": args.connections}))
    attacker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.axon_flood", "--attack", str(spec), cwd=ROOT,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert attacker.stdin is not None and attacker.stdout is not None
    async with asyncio.timeout(120):  # bittensor may print its own lines first
        while (line := await attacker.stdout.readline()).strip() != b"ready":
            if not line:
                raise RuntimeError(f"the attacker for {kind} exited before it was ready")
    answered_before = miner.text().count(" answered ")
    cpu_before, rss_before, fds_before = cpu_s(pid), rss_mb(pid), descriptors(pid)
    peak = [rss_before, float(fds_before), 0.0]  # RSS, descriptors, the last time they were above before
    done = asyncio.Event()
    asks: list[float | None] = []  # seconds of each valid reply, None for a failed ask

    async def sample() -> None:
        while not done.is_set():
            fds = descriptors(pid)
            peak[0], peak[1] = max(peak[0], rss_mb(pid)), max(peak[1], fds)
            if fds > fds_before:
                peak[2] = time.monotonic() - began
            await asyncio.sleep(0.1)

    began = time.monotonic()
    tasks = [asyncio.create_task(sample()), asyncio.create_task(honest(validator, ctx["honest"], done, asks))]
    attacker.stdin.write(b"go\n")
    await attacker.stdin.drain()
    result = {"statuses": {"attacker died": 1}}
    while line := await attacker.stdout.readline():
        if line.startswith(b"{"):
            result = json.loads(line)
    await attacker.wait()
    done.set()
    await asyncio.gather(*tasks)
    wall = time.monotonic() - began
    await asyncio.sleep(1.0)
    cpu = cpu_s(pid) - cpu_before
    ok = [s * 1e3 for s in asks if s is not None]
    return Row(
        kind=kind, requests=n, connections=args.connections, wall_s=round(wall, 1), miner_cpu_s=round(cpu, 2),
        cpu_ms_per_request=round((cpu - honest_cpu_s * len(asks)) / n * 1e3, 3) if n else None,
        rss_mb=(round(rss_before), round(peak[0]), round(rss_mb(pid))),
        fds=(fds_before, int(peak[1]), descriptors(pid)), fds_held_s=round(peak[2], 1), honest_ok=len(ok),
        honest_total=len(asks),
        honest_p50_ms=round(float(np.percentile(ok, 50))) if ok else None,
        honest_p99_ms=round(float(np.percentile(ok, 99))) if ok else None,
        answered_to_attacker=miner.text().count(" answered ") - answered_before - len(ok),
        statuses=result["statuses"])


async def honest(validator: Any, prompt: dict[str, Any], done: asyncio.Event, asks: list[float | None]) -> None:
    """The validator's signed asks every HONEST_PERIOD_S until ``done``: seconds of each valid reply, or
    None for any failure (a refusal, a timeout, an invalid reply: all count against the miner)."""
    from synth_miner.devstack import assert_valid_reply

    due = time.monotonic()
    while not done.is_set():
        try:
            reply, seconds = await validator.ask(**prompt, timeout=HONEST_TIMEOUT_S)
            assert_valid_reply(reply)
            asks.append(seconds)
        except Exception:
            asks.append(None)
        due = max(due + HONEST_PERIOD_S, time.monotonic())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), due - time.monotonic())


async def baseline(ctx: dict[str, Any]) -> tuple[float, Row]:
    """The validator alone for BASELINE_S: the miner's CPU per honest ask, and its latencies."""
    import numpy as np

    pid, validator = ctx["pid"], ctx["validator"]
    cpu_before, rss_before, fds_before = cpu_s(pid), rss_mb(pid), descriptors(pid)
    began, asks, done = time.monotonic(), list[float | None](), asyncio.Event()
    asking = asyncio.create_task(honest(validator, ctx["honest"], done, asks))
    await asyncio.sleep(BASELINE_S)
    done.set()
    await asking
    cpu = cpu_s(pid) - cpu_before
    ok = [s * 1e3 for s in asks if s is not None]
    if len(ok) < len(asks):
        raise RuntimeError(f"the validator alone got {len(asks) - len(ok)} failed replies of {len(asks)}")
    row = Row(kind="(validator alone)", requests=0, connections=0, wall_s=round(time.monotonic() - began, 1),
              miner_cpu_s=round(cpu, 2), cpu_ms_per_request=None,
              rss_mb=(round(rss_before), round(rss_before), round(rss_mb(pid))),
              fds=(fds_before, fds_before, descriptors(pid)), fds_held_s=0.0, honest_ok=len(ok),
              honest_total=len(ok),
              honest_p50_ms=round(float(np.percentile(ok, 50))), honest_p99_ms=round(float(np.percentile(ok, 99))),
              answered_to_attacker=0, statuses={})
    return cpu / len(ok), row


def signed_headers(validator: Any, synapse: Any) -> tuple[dict[str, str], str]:
    prepared = validator.dendrite.preprocess_synapse_for_request(validator.axon_info(), synapse, 12.0)
    headers = {k: str(v) for k, v in prepared.to_headers().items()}
    headers["Content-Type"] = "application/json"
    return headers, json.dumps(prepared.model_dump(mode="json"))


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from miner.protocol import Simulation, SimulationInput
    from synth_miner.devstack import (
        Validator,
        assert_valid_reply,
        cli,
        free_port,
        make_wallet,
        spawn,
        start_time_in,
        wait_port,
    )

    tmp = Path(tempfile.mkdtemp(prefix="bench-axon-flood-"))
    root = tmp / "wallets"
    wallets = {name: make_wallet(root, name) for name in ("miner", "validator", "insider", "stranger")}
    port = free_port()
    env = {"SYNTH_WALLET_PATH": str(root), "SYNTH_WALLET_NAME": "miner", "SYNTH_PRICE_PROVIDER": "replay",
           "SYNTH_REPLAY_DIR": str(args.data), "SYNTH_REDIS_URL": "", "SYNTH_DATA_DIR": str(tmp / "data"),
           "SYNTH_ARTIFACTS_DIR": str(tmp / "artifacts"), "SYNTH_LOG_LEVEL": "INFO",
           "SYNTH_ALLOWED_HOTKEYS": json.dumps([wallets[n].hotkey.ss58_address for n in ("validator", "insider")]),
           "SYNTH_RATE_LIMIT_PER_MINUTE": "1000000"}
    miner = spawn(cli("serve", "--local", "--port", str(port)), env, tmp / "miner.log")
    hotkey = wallets["miner"].hotkey.ss58_address
    validator, stranger = Validator(wallets["validator"], hotkey, port), Validator(wallets["stranger"], hotkey, port)
    try:
        wait_port(port, miner.proc, miner.log)
        prompt: dict[str, Any] = {**HONEST, "start_time": start_time_in(600)}
        readers_prompt: dict[str, Any] = {"asset": "BTC", "time_increment": 300, "time_length": 86_400,
                                          "num_simulations": 1000}
        for asked in (prompt, readers_prompt):  # warm-up, not measured
            reply, _ = await validator.ask(**asked, timeout=60)
            assert_valid_reply(reply)
        synapse = Simulation(simulation_input=SimulationInput(asset="BTC", start_time=start_time_in(120),
                                                              time_increment=60, time_length=3_600,
                                                              num_simulations=100))
        mine, body = signed_headers(validator, synapse)
        strange, _ = signed_headers(stranger, synapse)
        headers = {"unsigned": {k: v for k, v in strange.items() if k != "bt_header_dendrite_signature"},
                   "stranger": strange, "forged": {**mine, "bt_header_dendrite_signature": "0x" + "ab" * 64},
                   "no-nonce": {k: v for k, v in mine.items() if k != "bt_header_dendrite_nonce"}}
        ctx = {"pid": miner.proc.pid, "validator": validator, "miner": miner, "tmp": tmp, "honest": prompt,
               "spec": {"port": port, "body": body, "headers": headers, "wallets": str(root), "insider": "insider",
                        "miner_hotkey": hotkey}}
        honest_cpu_s, quiet = await baseline(ctx)
        rows = [quiet]
        for kind in args.kinds:
            rows.append(await run_kind(kind, args, ctx, honest_cpu_s))
            print(f"{kind}: {rows[-1].wall_s} s, {rows[-1].statuses}", file=sys.stderr, flush=True)
        if miner.proc.poll() is not None:
            raise RuntimeError(f"the miner died:\n{miner.text()[-3000:]}")
        log = miner.text()
        return {"rows": [asdict(r) for r in rows], "honest_cpu_ms_per_ask": round(honest_cpu_s * 1e3, 2),
                "log_lines": log.count("\n"), "tracebacks": log.count("Traceback")}
    finally:
        await validator.close()
        await stranger.close()
        miner.stop()


def print_table(report: dict[str, Any]) -> None:
    print(f"axon flood: a miner on loopback, its validator asking a 1 h prompt throughout "
          f"(miner CPU {report['honest_cpu_ms_per_ask']} ms per honest ask, taken out of CPU/req)")
    print(f"{'kind':18} {'N':>5} {'C':>4} {'wall s':>6} {'CPU ms/req':>10} {'RSS MB b/peak/a':>16} "
          f"{'fds b/peak/a':>11} {'held s':>6} {'honest':>7} {'p50 ms':>6} {'p99 ms':>6} {'fcast':>5}  statuses")
    for r in report["rows"]:
        cpu = "" if r["cpu_ms_per_request"] is None else f"{r['cpu_ms_per_request']:.2f}"
        rss = "/".join(str(v) for v in r["rss_mb"])
        statuses = ", ".join(f"{k}: {v}" for k, v in r["statuses"].items())
        print(f"{r['kind']:18} {r['requests']:>5} {r['connections']:>4} {r['wall_s']:>6} {cpu:>10} {rss:>16} "
              f"{'/'.join(str(v) for v in r['fds']):>11} {r['fds_held_s']:>6} {r['honest_ok']:>3}/{r['honest_total']:<3} "
              f"{r['honest_p50_ms'] or '':>6} {r['honest_p99_ms'] or '':>6} {r['answered_to_attacker']:>5}  {statuses}")
    print(f"miner log: {report['log_lines']} lines, {report['tracebacks']} tracebacks")


def kinds(text: str) -> list[str]:
    chosen = [k.strip() for k in text.split(",") if k.strip()]
    unknown = sorted(set(chosen) - set(KINDS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown kind(s) {unknown}: choose from {', '.join(KINDS)}")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", type=kinds, default=list(KINDS), help=f"comma-separated, of: {', '.join(KINDS)}")
    parser.add_argument("--requests", type=int, default=None,
                        help="N per kind (default: 10000 for the floods, 1000 for bodies and headers, C for readers)")
    parser.add_argument("--connections", type=int, default=50, help="C, concurrent attacker connections")
    parser.add_argument("--data", type=Path, default=SHARED, help="the replayed CSV folder")
    parser.add_argument("--attack", type=Path, help=argparse.SUPPRESS)  # the attacker process's own entry
    args = parser.parse_args()
    if args.attack:
        print(json.dumps(asyncio.run(attack(json.loads(args.attack.read_text())))), flush=True)
        return
    if args.connections < 1 or (args.requests is not None and args.requests < 1):
        parser.error("--requests and --connections must be at least 1")
    if not args.data.is_dir():
        parser.error(f"no data folder {args.data}")
    report = asyncio.run(main_async(args))
    print_table(report)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
