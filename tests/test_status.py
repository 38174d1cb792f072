"""`synth-miner status` (``synth_miner.status`` collects, ``synth_miner.status_view`` renders): what an operator
reads off the table (the collection runs for real in test_topology against a live stack)."""

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from rich.console import Console

from core.cache_redis import RedisHistoryCache
from core.constants import HEARTBEAT_TTL_S, JOB_RUNS_KEPT, JOB_RUNS_KEY, WORKER_HEARTBEAT_KEY
from core.prices import PriceHistory
from core.settings import Settings
from core.sources.holds import LocalHostHolds, RedisHostHolds, hold_key
from synth_miner.status import collect, exit_code, redacted
from synth_miner.status_view import render
from tests.conftest import RedisServer, free_port
from workers.jobs import record_run


def test_render_shows_each_workers_device_and_models_and_flags_problems() -> None:
    now = time.time()
    report = {
        "artifact_version": "v7",
        "workers": [{"name": "gpu-0:11", "queues": "infer.hf,infer.lf", "engine": "patchtst", "device": "cuda",
                     "models": {"hf": "/srv/artifacts/versions/v7/hf.pt", "lf_crypto": "/srv/models/lf_crypto.pt"},
                     "artifact_version": "v7", "seen": "4s"},
                    {"name": "old:12", "queues": "cpu", "engine": "ewma_t", "artifact_version": None, "seen": "9s"}],
        "queues": {"infer.hf": 0, "infer.lf": 3, "cpu": 1},
        "jobs": [{"job": "calibrate", "slot": int(now) - 60, "status": "ok", "seconds": 2.5, "started": now - 60}],
        "cache": {"BTC": {"step": 60, "first": now - 86_400, "last": now - 120, "freshness_s": 60.0}, "SPYX": None},
        "errors": ["redis: connection refused"],
    }
    console = Console(record=True, width=160)
    render(report, console)
    text = console.export_text()
    assert "v7" in text and "patchtst" in text and "cuda" in text
    assert "?" in text.split("old:12")[1].splitlines()[0]  # a heartbeat from before devices were announced
    assert "hf:v7 lf_crypto:committed" in text  # the retrained 1 h model serves, the 24 h one is committed
    assert "empty" in text and "! redis: connection refused" in text and "last calibration" in text


def test_render_without_a_published_version_says_what_is_served() -> None:
    report: dict[str, Any] = {
        "artifact_version": None,
        "workers": [{"name": "cpu@host:7", "queues": "cpu", "engine": "jobs", "device": "cpu", "models": {},
                     "artifact_version": None, "seen": "3s"}],
        "queues": {}, "jobs": [], "cache": {}, "errors": []}
    console = Console(record=True, width=160)
    render(report, console)
    text = console.export_text()
    assert "none published (workers serve the committed checkpoints in models/)" in text
    row = text.split("cpu@host:7")[1].splitlines()[0]
    assert "None" not in row and "jobs" in row  # no Python None in the artifact column


def test_last_calibration_is_found_behind_a_stream_of_minute_jobs(redis_url: str, tmp_path: Path) -> None:
    """The cache refresh records a run every minute: an hourly calibration 30 minutes ago is 30 runs deep."""
    client = redis.Redis.from_url(redis_url)
    now = time.time()
    client.lpush(JOB_RUNS_KEY, json.dumps({"job": "calibrate", "slot": int(now) - 1800, "status": "ok",
                                           "started": now - 1800, "seconds": 40.0}))
    for minute in range(29, -1, -1):
        client.lpush(JOB_RUNS_KEY, json.dumps({"job": "refresh-cache", "slot": int(now) - 60 * minute, "status": "ok",
                                               "started": now - 60 * minute, "seconds": 0.5}))
    client.rpush(JOB_RUNS_KEY, json.dumps({"job": "calibrate", "slot": int(now) - 9000, "status": "error",
                                           "started": now - 9000, "seconds": 1.0}))  # an older run, kept deeper
    report = collect(Settings(_env_file=None, redis_url=redis_url, artifacts_dir=tmp_path))
    assert report["last_calibration"] is not None and report["last_calibration"]["status"] == "ok"  # the newest
    console = Console(record=True, width=160)
    render(report, console)
    line = next(x for x in console.export_text().splitlines() if x.startswith("last calibration"))
    assert "30m ago" in line and "never" not in line, line


def test_a_weekly_retrain_verdict_outlives_the_minute_jobs_that_push_it_off_the_run_list(
        redis_url: str, tmp_path: Path) -> None:
    """500 runs kept are about 8 hours of minute refreshes: each job's newest run is kept apart."""
    client = redis.Redis.from_url(redis_url)
    now = time.time()
    gate = {"published": "20261206-lf_crypto", "reason": "challenger 0.3% better"}
    record_run(client, {"job": "retrain", "slot": int(now) - 3 * 86_400, "status": "ok", "started": now - 3 * 86_400,
                        "seconds": 1980.0, "result": {"models": {"hf": "skipped: no history in the store",
                                                                 "lf_crypto": {"seconds": 1900.0, "gate": gate}}}})
    record_run(client, {"job": "calibrate", "slot": int(now) - 7200, "status": "error", "started": now - 7200,
                        "seconds": 3.0, "error": "ArtifactError: disk full"})
    for minute in range(JOB_RUNS_KEPT, 0, -1):
        record_run(client, {"job": "refresh-cache", "slot": int(now) - 60 * minute, "status": "ok",
                            "started": now - 60 * minute, "seconds": 0.5, "result": {"assets": 9, "failed": 0}})
    report = collect(Settings(_env_file=None, redis_url=redis_url, artifacts_dir=tmp_path))
    assert all(j["job"] == "refresh-cache" for j in report["jobs"])
    assert list(report["last_runs"]) == ["calibrate", "refresh-cache", "retrain"]
    assert report["last_calibration"]["error"] == "ArtifactError: disk full"
    console = Console(record=True, width=200)
    render(report, console)
    text = console.export_text()
    retrain = next(x for x in text.splitlines() if "retrain" in x and "72.0h ago" in x)
    assert "hf: skipped: no history in the store; lf_crypto: published 20261206-lf_crypto" in retrain
    assert "disk full" in next(x for x in text.splitlines() if x.lstrip("│ ").startswith("calibrate"))


def test_json_report_never_shows_the_redis_password(tmp_path: Path) -> None:
    report = collect(Settings(_env_file=None, redis_url="redis://:s3cret@127.0.0.1:1/0",
                              artifacts_dir=tmp_path))
    assert "s3cret" not in json.dumps(report, default=str)
    assert report["redis_url"] == "redis://:***@127.0.0.1:1/0"
    assert redacted("redis://user:pw@host:6380/1?password=pw2&db=1") == "redis://user:***@host:6380/1?password=***&db=1"
    assert redacted("unix:///run/redis.sock") == "unix:///run/redis.sock" and redacted(None) is None


def test_a_password_holding_an_at_sign_is_masked_whole() -> None:
    """The URL parser splits the host off at the last "@": a password with one must not leak its tail."""
    assert redacted("redis://:p@ss@10.0.0.5:6379/0") == "redis://:***@10.0.0.5:6379/0"
    assert redacted("redis://default:a@b:c@host/1") == "redis://default:***@host/1"


def test_an_unreadable_fleet_is_not_drawn_as_an_idle_one(tmp_path: Path) -> None:
    """Redis down (or no URL): five empty tables and "last calibration: never" read as a fleet with no workers
    that never calibrated; only what is known is shown, then why nothing else is."""
    for url in (f"redis://127.0.0.1:{free_port()}/0", None):
        report = collect(Settings(_env_file=None, redis_url=url, artifacts_dir=tmp_path))
        console = Console(record=True, width=160)
        render(report, console)
        text = console.export_text()
        assert "artifact version: none published" in text and "! redis: " in text, text
        assert text.rstrip().endswith("the fleet could not be read (exit 1)"), text
        assert "workers (heartbeats)" not in text and "last calibration" not in text and "┏" not in text, text


def test_a_current_link_whose_version_is_gone_is_flagged(tmp_path: Path) -> None:
    """status printed the link's version as the one served, while every process loaded none."""
    (tmp_path / "versions").mkdir()
    (tmp_path / "current").symlink_to("versions/v009")
    report = collect(Settings(_env_file=None, redis_url=None, artifacts_dir=tmp_path))
    assert report["artifact_version"] == "v009"
    assert f"artifacts: {tmp_path / 'current'} points at v009, which {tmp_path / 'versions'} does not hold: no " \
           "artifact loads from it (`synth-miner artifacts rollback`, or a publish, points it at a set that loads)" \
           in report["errors"]


def test_a_url_that_is_not_redis_is_a_redis_error_not_a_crash(tmp_path: Path) -> None:
    report = collect(Settings(_env_file=None, redis_url="http://127.0.0.1:1/0", artifacts_dir=tmp_path))
    assert len(report["errors"]) == 1 and report["errors"][0].startswith("redis: "), report["errors"]
    assert "scheme" in report["errors"][0] and report["workers"] == []


def test_cache_rows_prefer_minute_bars_and_age_from_the_last_bars_close(redis_url: str, tmp_path: Path) -> None:
    """Freshness counts from the end of the newest bar; an asset replayed with only 5-minute bars shows those,
    one with nothing cached reads empty."""
    client = redis.Redis.from_url(redis_url)
    cache = RedisHistoryCache(client)
    last = int(time.time()) // 300 * 300 - 600  # the newest bar of each series opens here
    cache.write("BTC", PriceHistory.from_arrays(60, last - 60 * np.arange(120)[::-1], np.full(120, 1e5)))
    cache.write("BTC", PriceHistory.from_arrays(300, last - 300 * np.arange(24)[::-1], np.full(24, 1e5)))
    cache.write("XAU", PriceHistory.from_arrays(300, last - 300 * np.arange(24)[::-1], np.full(24, 2e3)))
    before = time.time()
    report = collect(Settings(_env_file=None, redis_url=redis_url, artifacts_dir=tmp_path))
    after = time.time()
    btc, xau = report["cache"]["BTC"], report["cache"]["XAU"]
    assert (btc["step"], btc["first"], btc["last"]) == (60, last - 60 * 119, last)
    assert before - (last + 60) <= btc["freshness_s"] <= after - (last + 60)
    assert (xau["step"], xau["first"], xau["last"]) == (300, last - 300 * 23, last)
    assert before - (last + 300) <= xau["freshness_s"] <= after - (last + 300)
    assert report["cache"]["ETH"] is None and not any(e.startswith("redis:") for e in report["errors"])


def test_status_without_a_redis_url_exits_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It cannot see the fleet at all: a monitor running `status || alert` must hear of it."""
    from typer.testing import CliRunner

    from synth_miner.cli import app

    monkeypatch.delenv("SYNTH_REDIS_URL", raising=False)
    monkeypatch.setenv("SYNTH_ARTIFACTS_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["status", "--json"])
    assert result.exit_code == 1 and "SYNTH_REDIS_URL is not set" in result.output, result.output
    # The same keys whether Redis was read or not: a dashboard reading --json finds each one.
    assert set(json.loads(result.output)) == {"redis_url", "artifact_version", "workers", "queues", "expired", "jobs",
                                              "last_runs", "last_calibration", "cache", "provider_holds", "errors",
                                              "unread_queues", "inference_queues"}


def test_a_stopped_worker_is_flagged_not_listed_as_serving(redis_url: str, tmp_path: Path) -> None:
    """A worker's heartbeat key outlives it by up to two minutes (TTL 120 s, re-sent every 30 s): a stopped
    one must not read as a healthy fleet, and a queue nobody reads any more is said out loud."""
    client = redis.Redis.from_url(redis_url)
    now = time.time()
    for name, queues, at in (("hf@host:1", "infer.hf", now - 5), ("lf@host:2", "infer.lf", now - 90)):
        client.set(WORKER_HEARTBEAT_KEY.format(name=name), json.dumps(
            {"name": name, "queues": queues, "engine": "patchtst", "device": "cpu", "models": {},
             "artifact_version": None, "pid": 1, "at": at}), ex=120)
    report = collect(Settings(_env_file=None, redis_url=redis_url, artifacts_dir=tmp_path))
    alive = {w["name"]: w["alive"] for w in report["workers"]}
    assert alive == {"hf@host:1": True, "lf@host:2": False}
    assert any(e.startswith("worker lf@host:2: no heartbeat for 90s") for e in report["errors"]), report["errors"]
    assert "no live worker reads queue infer.lf" in report["errors"]
    assert "no live worker reads queue cpu" in report["errors"]
    assert not any("infer.hf" in e for e in report["errors"])
    assert not any(e.startswith("redis:") for e in report["errors"])  # the exit code still means "Redis unreadable"
    console = Console(record=True, width=160)
    render(report, console)
    assert "(gone?)" in console.export_text().split("lf@host:2")[1].splitlines()[0]


def test_a_calibration_that_published_nothing_shows_why() -> None:
    """The README promises each job's last run with "what it published, or why not": a calibration that
    published nothing used to read only "nothing published", whatever the cause."""
    from synth_miner.status_view import job_detail

    now = time.time()
    reason = "prices are replayed: the history store is not filled, nothing to calibrate on"
    run = {"job": "calibrate", "slot": int(now) - 600, "status": "ok", "started": now - 600, "seconds": 0.2,
           "result": {"end": int(now) - 600, "outcomes": [], "published": None, "reason": reason}}
    assert job_detail(run) == reason
    report = {"artifact_version": None, "workers": [], "queues": {}, "jobs": [run], "cache": {}, "errors": [],
              "last_runs": {"calibrate": run}, "last_calibration": run}
    console = Console(record=True, width=200)
    render(report, console)
    assert reason in console.export_text()
    # Published, and the older summaries without a reason, read as before.
    assert job_detail({**run, "result": {"published": "v8", "outcomes": []}}) == "published v8"
    assert job_detail({**run, "result": {"published": None, "outcomes": []}}) == "nothing published"


def test_a_refresh_whose_providers_fail_for_some_assets_says_which() -> None:
    """The refresh runs "ok" while a provider fails for some assets: the table read "ok" and nothing else."""
    from synth_miner.status_view import job_detail

    run = {"job": "refresh-cache", "slot": 0, "status": "ok", "started": 0.0, "seconds": 68.5,
           "result": {"assets": 14, "failed": {"NVDAX": ["history 60s: TimeoutError"], "AAPLX": ["latest: stale"]}}}
    assert job_detail(run) == "2 of 14 assets not refreshed: AAPLX, NVDAX"
    assert job_detail({**run, "result": {"assets": 14, "failed": {}}}) == ""


def test_status_shows_the_provider_hosts_that_asked_the_fleet_to_wait(redis_url: str, tmp_path: Path) -> None:
    """A Retry-After one process heard holds the whole fleet off that host: the operator sees which host, who was
    told, how long it asked for and how long is left (418: Binance banned the IP). A hold key holding something
    else is named, not a crash."""
    client = redis.Redis.from_url(redis_url)
    binance, hermes = "https://api.binance.com:443", "https://hermes.pyth.network:443"
    asyncio.run(RedisHostHolds(client, LocalHostHolds({})).hold(binance, 120.0, 418, "binance"))
    client.set(hold_key(hermes), b"garbage", px=60_000)
    report = collect(Settings(_env_file=None, redis_url=redis_url, artifacts_dir=tmp_path))
    [hold] = report["provider_holds"]
    assert {k: hold[k] for k in ("origin", "by", "status", "asked_s")} == {
        "origin": binance, "by": "binance", "status": 418, "asked_s": 120.0}
    assert 110 < hold["left_s"] <= 120
    assert [e for e in report["errors"] if "host-hold" in e] == [
        f"{hold_key(hermes)} is no Retry-After hold (its value b'garbage' is no hold): ignored"]
    json.dumps(report)  # what --json prints
    console = Console(record=True, width=200)
    render(report, console)
    row = next(x for x in console.export_text().splitlines() if binance in x)
    assert "binance" in row and "HTTP 418 (IP banned)" in row and "120s" in row, row

    client.delete(hold_key(binance), hold_key(hermes))
    console = Console(record=True, width=200)
    render(collect(Settings(_env_file=None, redis_url=redis_url, artifacts_dir=tmp_path)), console)
    assert "provider holds (Retry-After): none" in console.export_text()
    client.close()


def announce(client: "redis.Redis", name: str, queues: str, at: float | None = None, written_s_ago: float = 0) -> None:
    """The heartbeat a worker process writes (workers.metrics.Heartbeat's document, its TTL), as if written
    ``written_s_ago`` by Redis's clock; ``at`` is the worker's clock when it wrote it."""
    client.set(WORKER_HEARTBEAT_KEY.format(name=name), json.dumps(
        {"name": name, "queues": queues, "engine": "ewma_t", "device": "cpu", "models": {},
         "artifact_version": None, "pid": 1, "at": time.time() - written_s_ago if at is None else at}),
        px=int((HEARTBEAT_TTL_S - written_s_ago) * 1000))


def run_status(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redis_url: str, *args: str) -> Any:
    from typer.testing import CliRunner

    from synth_miner.cli import app

    monkeypatch.setenv("SYNTH_REDIS_URL", redis_url)
    monkeypatch.setenv("SYNTH_ARTIFACTS_DIR", str(tmp_path))
    return CliRunner().invoke(app, ["status", *args])


def test_status_exits_3_when_no_live_worker_reads_an_inference_queue(
        redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`status || alert` is the operators' health check: a fleet with no live worker on an inference queue
    answers those requests only from the miner's in-process fallback, and must not read as healthy (it exited
    0). Exit 1 still means Redis could not be read."""
    client = redis.Redis.from_url(redis_url)
    result = run_status(monkeypatch, tmp_path, redis_url, "--json")
    assert result.exit_code == 3, result.output
    report = json.loads(result.output)
    assert report["unread_queues"] == ["cpu", "infer.hf", "infer.lf"]
    assert set(report) == set(collect(Settings(_env_file=None, redis_url=None, artifacts_dir=tmp_path)))  # one schema
    announce(client, "hf@host:1", "infer.hf")
    assert run_status(monkeypatch, tmp_path, redis_url).exit_code == 3  # infer.lf still unread
    announce(client, "lf@host:2", "infer.lf", written_s_ago=40)  # a dead one does not count
    result = run_status(monkeypatch, tmp_path, redis_url)
    assert result.exit_code == 3 and "exit 3" in result.output, result.output
    announce(client, "lf@host:3", "infer.lf")
    result = run_status(monkeypatch, tmp_path, redis_url, "--json")
    # The cpu queue unread is flagged (no cache refresh, no calibration) but forecasts are served.
    assert result.exit_code == 0 and json.loads(result.output)["unread_queues"] == ["cpu"], result.output
    server_gone = f"redis://127.0.0.1:{free_port()}/0"
    assert run_status(monkeypatch, tmp_path, server_gone).exit_code == 1


def test_status_help_documents_its_exit_codes() -> None:
    from typer.testing import CliRunner

    from synth_miner.cli import app

    text = " ".join(CliRunner().invoke(app, ["status", "--help"], env={"COLUMNS": "200"}).output.split())
    assert "Exit 1: Redis cannot be read" in text and "Exit 3: no live worker reads an inference queue" in text, text


def strict_json(text: str) -> Any:
    """JSON as a strict consumer reads it: NaN and Infinity are not JSON."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} in --json output")

    return json.loads(text, parse_constant=refuse)


def test_foreign_or_garbled_heartbeat_keys_neither_hide_the_fleet_nor_crash_status(
        redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key of another type under the heartbeat prefix made status report Redis unreadable (WRONGTYPE, exit 1,
    no queues, jobs or cache read); a heartbeat without a name or engine, or with models that are not a mapping,
    crashed the table with a traceback; a NaN or infinite time read "nanh ago" or alive forever, and NaN went
    out as invalid JSON."""
    client = redis.Redis.from_url(redis_url)
    announce(client, "hf@host:1", "infer.hf")
    announce(client, "lf@host:2", "infer.lf")
    now = time.time()
    garbled = {"noname": {"at": now, "queues": "infer.hf"}, "models": {"name": "m", "at": now, "models": ["hf.pt"]},
               "nan": {"name": "n", "at": float("nan"), "queues": "infer.lf"},
               "inf": {"name": "i", "at": "inf", "queues": "infer.lf"}, "list": [1, 2]}
    for name, doc in garbled.items():
        client.set(WORKER_HEARTBEAT_KEY.format(name=name), json.dumps(doc), ex=60)
    client.set(WORKER_HEARTBEAT_KEY.format(name="text"), "not json", ex=60)
    client.hset(WORKER_HEARTBEAT_KEY.format(name="a-hash"), "at", now)  # another tool's key under the prefix
    client.lpush(JOB_RUNS_KEY, "{truncated")  # a record that is not JSON
    client.lpush(JOB_RUNS_KEY, json.dumps({"job": "calibrate", "slot": "soon", "started": None, "status": "[/]"}))
    announce(client, "odd[/]name", "cpu")  # rich markup in a name or a status is shown, not parsed
    result = run_status(monkeypatch, tmp_path, redis_url, "--json")
    assert result.exit_code == 0, result.output
    report = strict_json(result.output)
    assert not any(e.startswith("redis:") for e in report["errors"]), report["errors"]
    assert set(report["queues"]) == {"infer.hf", "infer.lf", "cpu"} and len(report["cache"]) > 0
    names = {w["name"] for w in report["workers"]}
    assert {"hf@host:1", "lf@host:2", "m"} <= names and "i" not in names and "n" not in names, report["workers"]
    assert all(isinstance(w["engine"], str) for w in report["workers"])
    assert next(w for w in report["workers"] if w["name"] == "m")["models"] is None  # shown "?", not a crash
    assert any("synth:worker:a-hash" in e for e in report["errors"]), report["errors"]
    assert any("synth:worker:nan" in e for e in report["errors"]), report["errors"]
    # The record that is no JSON is counted, not dropped without a word (the run recorded by hand is shown).
    assert f"{JOB_RUNS_KEY}: 1 record(s) that are no job run: ignored" in report["errors"], report["errors"]
    assert [run["slot"] for run in report["jobs"]] == ["soon"], report["jobs"]
    table = run_status(monkeypatch, tmp_path, redis_url)
    assert table.exit_code == 0 and "Traceback" not in table.output, table.output
    assert "odd[/]name" in table.output
    assert "nans" not in table.output and "nanh" not in table.output and "-inf" not in table.output


def test_a_worker_whose_clock_is_off_is_named_as_such_not_as_stopped(redis_url: str, tmp_path: Path) -> None:
    """Heartbeats carry the worker's own clock: one an hour behind read "no heartbeat for 3600s (stopped or
    stuck)" while it beat every 10 s, and one an hour ahead read "-3600s ago". The key's age in Redis (its TTL
    left) tells the two apart: the clock is named, with how far off it is."""
    client = redis.Redis.from_url(redis_url)
    announce(client, "behind@host:1", "infer.hf", at=time.time() - 3600)
    announce(client, "ahead@host:2", "infer.lf", at=time.time() + 3600)
    announce(client, "dead@host:3", "infer.lf", written_s_ago=40)
    report = collect(Settings(_env_file=None, redis_url=redis_url, artifacts_dir=tmp_path))
    errors = "\n".join(report["errors"])
    assert "worker behind@host:1: its clock is 3600s behind this host's" in errors, errors
    assert "worker ahead@host:2: its clock is 3600s ahead of this host's" in errors, errors
    assert "no heartbeat for 3600s" not in errors and "-3600s ago" not in json.dumps(report)
    assert "worker dead@host:3: no heartbeat for 40s (stopped or stuck)" in errors and "dead@host:3: its" not in errors
    skew = {w["name"]: w["clock_skew_s"] for w in report["workers"]}
    assert skew["behind@host:1"] == pytest.approx(-3600, abs=3) and skew["ahead@host:2"] == pytest.approx(3600, abs=3)
    assert skew["dead@host:3"] is None
    seen = {w["name"]: w["seen"] for w in report["workers"]}
    assert seen["behind@host:1"] == seen["ahead@host:2"] == "0s ago", seen  # by Redis's clock
    # Alive as the miner judges it (by the key's age): the one behind serves infer.hf, so status must not say
    # the miner answers those from its fallback (exit 3).
    alive = {w["name"]: w["alive"] for w in report["workers"]}
    assert alive == {"behind@host:1": True, "ahead@host:2": True, "dead@host:3": False}, alive
    assert report["unread_queues"] == ["cpu"] and exit_code(report) == 0, report["errors"]
    assert "the miner sends it no request with less than 3600s left" in errors, errors


def test_hundreds_of_dead_heartbeats_on_a_full_database_read_fast_and_flag_briefly(
        redis_url: str, tmp_path: Path) -> None:
    """A fleet restarted over and over leaves a key per dead process for a minute: one error line each buried the
    rest; and SCAN's default 10 keys a step took thousands of round trips on a database holding the cache."""
    client = redis.Redis.from_url(redis_url)
    with client.pipeline(transaction=False) as pipe:
        for i in range(50_000):
            pipe.set(f"synth:filler:{i}", 1)
        pipe.execute()
    for i in range(300):
        announce(client, f"old{i:03d}@host:{i}", "infer.hf", written_s_ago=40)
    announce(client, "live@host:1", "infer.hf,infer.lf")
    client.config_resetstat()
    report = collect(Settings(_env_file=None, redis_url=redis_url, artifacts_dir=tmp_path))
    scans = client.info("commandstats")["cmdstat_scan"]["calls"]
    assert scans < 200, f"{scans} SCAN calls for 50k keys"
    assert len(report["workers"]) == 301 and report["unread_queues"] == ["cpu"]
    silent = [e for e in report["errors"] if "no heartbeat" in e or "more workers" in e]
    assert len(silent) <= 11 and "and 290 more workers silent" in silent[-1], silent
    console = Console(record=True, width=160)
    render(report, console)
    text = console.export_text()
    assert text.count("(gone?)") == 10 and "... 290 more gone" in text, text


@pytest.mark.parametrize("password", ["Zq7/Xk9", "Zq7#Xk9", "Zq7?Xk9", "Zq7@Xk9/Yw4"])
def test_a_password_holding_a_url_delimiter_is_never_shown(tmp_path: Path, password: str) -> None:
    """A generated password (base64 holds "/") that was not percent-encoded: the URL parser cut the host off at the
    "/", "#" or "?", found no password to mask, and --json printed the URL whole; the error quoted a piece of the
    password as the port it could not read, or as the host it could not reach."""
    report = collect(Settings(_env_file=None, redis_url=f"redis://:{password}@127.0.0.1:6379/0",
                              artifacts_dir=tmp_path))
    text = json.dumps(report, default=str)
    assert not any(piece in text for piece in ("Zq7", "Xk9", "Yw4")), text
    assert report["redis_url"] == "redis://:***@127.0.0.1:6379/0"
    assert len(report["errors"]) == 1 and report["errors"][0].startswith("redis: "), report["errors"]
    assert "percent-encode" in report["errors"][0]
    assert redacted("redis://h:6379/0?password=a@b&db=1") == "redis://h:6379/0?password=***&db=1"


def test_a_wrong_or_missing_redis_password_says_to_check_the_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis with requirepass (as deployed): a wrong password or none read only "invalid username-password pair" or
    "Authentication required", not where the password comes from."""
    server = RedisServer(tmp_path, password="right").start()
    try:
        for url in (server.url.replace(":right@", ":wrong@"), server.url.replace(":right@", "")):
            result = run_status(monkeypatch, tmp_path, url, "--json")
            assert result.exit_code == 1, result.output
            error = json.loads(result.output)["errors"][-1]
            assert error.startswith("redis: ") and "check the password in SYNTH_REDIS_URL" in error, error
        assert run_status(monkeypatch, tmp_path, server.url).exit_code == 3  # read: no worker
    finally:
        server.stop()
