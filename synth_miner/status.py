"""`synth-miner status`: the fleet at a glance (workers, queues, artifacts, calibration, cache, provider holds)."""

import json
import math
import re
import time
from dataclasses import asdict
from typing import Any

import redis

from core.assets import ASSETS
from core.constants import (
    CLOCK_SKEW_WARN_S,
    EXPIRED_TASKS_KEY,
    HEARTBEAT_STALE_AFTER_S,
    JOB_LAST_RUN_KEY,
    JOB_RUNS_KEPT,
    JOB_RUNS_KEY,
)
from core.heartbeats import HEARTBEAT_PATTERN, Reading, key_age, live_readers, parse_heartbeat, queues_of
from core.settings import Settings, redis_url_problem
from core.sources.holds import read_holds

JOBS_SHOWN = 20  # the newest runs listed; the last calibration is looked for in every kept run
DEAD_LISTED = 10  # silent workers named one by one; a fleet restarted over and over leaves hundreds for a minute
SCAN_COUNT = 1000  # keys per SCAN step: Redis's default of 10 took thousands of round trips on a full database

REPAIR_CURRENT = "`synth-miner artifacts rollback`, or a publish, points it at a set that loads"

# Exit codes, for `status || alert` and container health checks (2 is the CLI's own usage error).
EXIT_OK = 0  # Redis read, and a live worker reads every inference queue
EXIT_REDIS = 1  # Redis cannot be read (or no SYNTH_REDIS_URL: embedded mode has no fleet to check)
EXIT_NO_INFERENCE = 3  # Redis read, but no live worker reads an inference queue: the miner answers those from
# its in-process fallback (EWMA-t), not the fleet's models


def age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def finite(value: Any) -> float | None:
    """A number a record holds, or None for anything else (a record written by hand or by another version)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def redacted(url: str | None) -> str | None:
    """The Redis URL with its password masked: ``status --json`` output ends up in logs and dashboards. Everything
    up to the last "@" is the user and password: a password holding "/", "?" or "#" (not percent-encoded) cut
    the URL parser's host short, and it found no password to mask."""
    if not url:
        return url
    masked = re.sub(r"([?&]password=)[^&]*", r"\1***", url)
    scheme, sep, rest = masked.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if sep and at and ":" in userinfo:
        masked = f"{scheme}://{userinfo.split(':', 1)[0]}:***@{hostpart}"
    return masked


def collect(settings: Settings) -> dict[str, Any]:
    """Everything status shows, as plain data (also printed with --json)."""
    now = time.time()
    report: dict[str, Any] = {"redis_url": redacted(settings.redis_url), "artifact_version": None, "workers": [],
                              "queues": {}, "expired": {}, "jobs": [], "last_runs": {}, "last_calibration": None, "cache": {},
                              "provider_holds": [], "errors": [], "unread_queues": [], "inference_queues": []}
    try:
        from core.artifacts import ArtifactStore

        store = ArtifactStore(settings.artifacts_dir)
        report["artifact_version"] = store.current_version()
        problem = store.current_problem()  # a dangling link read as a version served while none loads
        if problem:
            report["errors"].append(f"artifacts: {problem}: no artifact loads from it ({REPAIR_CURRENT})")
    except Exception as exc:
        report["errors"].append(f"artifacts: {exc}")
    if not settings.redis_url:
        # A "redis:" error, so `status` exits 1: on a host whose .env lacks the URL, `status || alert` never fired.
        report["errors"].append("redis: SYNTH_REDIS_URL is not set: embedded mode has no fleet to show "
                                 "(its miner forecasts in-process: watch its metrics instead)")
        return report
    problem = redis_url_problem(settings.redis_url)
    if problem is not None:
        report["errors"].append(f"redis: {problem}")
        return report
    try:
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
    except ValueError:  # redis-py's message may quote the URL (its port): it is not repeated
        report["errors"].append("redis: SYNTH_REDIS_URL is not a Redis URL: check its scheme (redis://, rediss://, "
                                "unix://) and port, and percent-encode a password holding '/', '?', '#' or '%'")
        return report
    try:
        read = set(live_readers(read_heartbeats(client, report)))
        report["inference_queues"] = [settings.queue_infer_hf, settings.queue_infer_lf]
        for queue in (settings.queue_infer_hf, settings.queue_infer_lf, settings.queue_cpu):
            report["queues"][queue] = int(client.llen(queue))
            if queue not in read:  # an empty worker table alone is easy to read as "all well"
                report["errors"].append(f"no live worker reads queue {queue}")
                report["unread_queues"].append(queue)
        report["unread_queues"].sort()
        # Tasks discarded unrun, past their expiry, since Redis was last emptied: requests the fleet was too
        # slow for (a backlog, too few processes), each answered by the miner's fallback or not in time.
        expired = {(k.decode() if isinstance(k, bytes) else k): int(v)
                   for k, v in client.hgetall(EXPIRED_TASKS_KEY).items()}
        report["expired"] = {queue: expired.pop(queue, 0) for queue in report["queues"]} | dict(sorted(expired.items()))
        # The cache refresh records a run every minute: an hourly calibration soon falls out of the newest
        # few, so it is looked for in every kept run.
        runs = job_records(client.lrange(JOB_RUNS_KEY, 0, JOB_RUNS_KEPT - 1), JOB_RUNS_KEY, report["errors"])
        report["jobs"] = runs[:JOBS_SHOWN]
        last = {run["job"]: run for run in job_records(client.hvals(JOB_LAST_RUN_KEY), JOB_LAST_RUN_KEY,
                                                      report["errors"])}
        for run in runs:  # records from before the per-job key: the list is newest first
            last.setdefault(run["job"], run)
        report["last_runs"] = dict(sorted(last.items()))
        report["last_calibration"] = last.get("calibrate")
        from core.cache_redis import RedisHistoryCache

        cache = RedisHistoryCache(client)
        for asset in sorted(ASSETS):
            for step in (60, 300):  # replayed folders may hold only 5-minute bars for an asset
                span = cache.span(asset, step)
                if span is not None:
                    report["cache"][asset] = {"step": step, "first": span[0], "last": span[1],
                                              "freshness_s": now - (span[1] + step)}
                    break
            else:
                report["cache"][asset] = None
        # Hosts that asked the fleet, with a Retry-After, to send nothing for a while (Binance: 418 = IP banned).
        holds, unreadable = read_holds(client, SCAN_COUNT)
        report["provider_holds"] = [asdict(hold) for hold in holds]
        report["errors"].extend(unreadable)
    except redis.RedisError as exc:
        report["errors"].append(f"redis: {redis_failure(exc)}")
    return report


def redis_failure(exc: "redis.RedisError") -> str:
    """A Redis error with what to check when it is the password's (wrong, or missing for a server with
    requirepass): redis-py's own words say nothing of where the password comes from."""
    # A server with requirepass answers a client without a password with a plain error reply, not an auth error.
    if isinstance(exc, (redis.AuthenticationError, redis.AuthenticationWrongNumberOfArgsError)) or \
            str(exc).startswith("Authentication required"):
        return f"{exc} (check the password in SYNTH_REDIS_URL)"
    return str(exc)


def worker_entry(reading: Reading, key: str) -> dict[str, Any]:
    """A heartbeat's fields as status shows them, each of its type whatever the document held (a hand-written or
    foreign one crashed the table), and nothing else (no NaN in --json)."""
    beat = reading.beat
    models, version, pid = beat.get("models"), beat.get("artifact_version"), beat.get("pid")
    return {
        "name": str(beat.get("name") or key.removeprefix(HEARTBEAT_PATTERN[:-1])),
        "queues": ",".join(sorted(queues_of(beat))), "engine": str(beat.get("engine") or "?"),
        "device": str(beat.get("device") or "?"),
        "models": {str(k): str(v) for k, v in models.items()} if isinstance(models, dict) else None,
        "artifact_version": None if version is None else str(version),
        "pid": pid if isinstance(pid, int) and not isinstance(pid, bool) else None, "at": float(beat["at"]),
        # By the key's age in Redis, as the miner judges it (core.heartbeats), not by the worker's clock.
        "seen": age(reading.silent_s), "alive": reading.alive}


def read_heartbeats(client: "redis.Redis", report: dict[str, Any]) -> list[Reading]:
    """Every process's heartbeat into ``report["workers"]``, and returned as read; a key under the prefix that
    holds none is named in the errors and skipped (it made status read as "Redis unreadable"). One pipelined read
    for them all."""
    keys = list(client.scan_iter(HEARTBEAT_PATTERN, count=SCAN_COUNT))
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.get(key)
            pipe.pttl(key)
        replies = pipe.execute(raise_on_error=False)
    now = time.time()  # as the ages were read: one taken before (collect's) put every skew off by the wait
    readings: list[Reading] = []
    silent: list[str] = []
    for raw_key, raw, pttl in zip(keys, replies[::2], replies[1::2]):
        key = raw_key.decode(errors="replace") if isinstance(raw_key, bytes) else str(raw_key)
        if raw is None:
            continue  # expired between SCAN and GET
        beat = None if isinstance(raw, Exception) else parse_heartbeat(raw)
        if beat is None:
            report["errors"].append(f"{key} holds no worker heartbeat (not a JSON document with a finite time "
                                    f"\"at\"): ignored")
            continue
        reading = Reading(beat, key_age(pttl), now)
        worker = worker_entry(reading, key)
        skew = reading.skew_s
        worker["clock_skew_s"] = None if skew is None or abs(skew) <= CLOCK_SKEW_WARN_S else round(skew, 1)
        if worker["clock_skew_s"] is not None and skew is not None:  # its age is Redis's: the clock is what to fix
            effect = (f"it discards as expired a task sent with less than that left, so the miner sends it no request "
                      f"with less than {skew:.0f}s left" if skew > 0 else
                      "it runs tasks past their expiry by as much, after the miner stopped waiting")
            report["errors"].append(
                f"worker {worker['name']}: its clock is {abs(skew):.0f}s {'ahead of' if skew > 0 else 'behind'} this "
                f"host's ({effect}): sync the clocks (NTP)")
        if not worker["alive"]:  # a worker that stopped or died keeps its key for up to HEARTBEAT_TTL_S
            silent.append(f"worker {worker['name']}: no heartbeat for {reading.silent_s:.0f}s (stopped or stuck)")
        report["workers"].append(worker)
        readings.append(reading)
    report["errors"].extend(sorted(silent)[:DEAD_LISTED])
    if len(silent) > DEAD_LISTED:
        report["errors"].append(f"... and {len(silent) - DEAD_LISTED} more workers silent for over "
                                f"{HEARTBEAT_STALE_AFTER_S:.0f}s (all in --json)")
    return readings


def job_records(raws: list[Any], key: str, errors: list[str]) -> list[dict[str, Any]]:
    """The job runs recorded under ``key``; one that is not a run's JSON record is counted in the errors."""
    runs, unreadable = [], 0
    for raw in raws:
        try:
            run = json.loads(raw)
        except ValueError:
            run = None
        if isinstance(run, dict) and isinstance(run.get("job"), str):
            runs.append(run)
        else:
            unreadable += 1
    if unreadable:
        errors.append(f"{key}: {unreadable} record(s) that are no job run: ignored")
    return runs


def exit_code(report: dict[str, Any]) -> int:
    """What `status` exits with: Redis unreadable first (nothing else is known then), then an inference queue
    with no live reader."""
    if any(error.startswith("redis:") for error in report["errors"]):
        return EXIT_REDIS
    if set(report.get("unread_queues", ())) & set(report.get("inference_queues", ())):
        return EXIT_NO_INFERENCE
    return EXIT_OK


