"""deploy/prometheus: the alerting rules and the scrape config, checked against what they watch.

Every metric an expression names is exported by the miner's or the inference workers' registry, with the
labels it matches on or aggregates by: renaming a metric or a label breaks this test, not the alert on the night
it should fire. The stale-price rules cover every asset of core/assets.py, and the scrape targets are the
docker-compose services and their metrics ports. promtool, where installed, parses the PromQL itself.
"""

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

import workers.metrics as worker_metrics
from core.assets import ASSETS
from core.settings import Settings
from miner.metrics import MinerMetrics
from synth_miner.cli import app as cli_app

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "prometheus"
TARGET_LABELS = frozenset({"job", "instance"})  # Prometheus adds them to every series it scrapes
SEVERITIES = {"critical", "warning"}
DURATION = re.compile(r"(\d+(ms|s|m|h|d|w|y))+")
SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"\s*')
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SYNTH_METRIC = re.compile(r"\bsynth_[a-z0-9_]+\b")
THRESHOLD = re.compile(r"\s>\s*([0-9.]+)")


def load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / name).read_text())
    return doc


def rules() -> list[dict[str, Any]]:
    return [rule for group in load("alerts.yml")["groups"] for rule in group["rules"]]


def scrape_jobs() -> dict[str, set[str]]:
    """job name -> its static targets."""
    return {job["job_name"]: {t for config in job["static_configs"] for t in config["targets"]}
            for job in load("prometheus.yml")["scrape_configs"]}


def sample_names(family: str, kind: str) -> list[str]:
    """The series a metric family is exposed as."""
    if kind == "counter":
        return [f"{family}_total", f"{family}_created"]
    if kind == "histogram":
        return [f"{family}_bucket", f"{family}_sum", f"{family}_count", f"{family}_created"]
    return [family]


def exported_by(registry: CollectorRegistry, owner: dict[str, object]) -> dict[str, frozenset[str]]:
    """Series name -> label names of every metric in ``registry``, whose metric objects are ``owner``'s values.

    prometheus_client names a metric's labels only on the metric object (``_labelnames``): the registry shows
    them on samples, and a labelled metric has none until a value is recorded."""
    labels = {m._name: frozenset(m._labelnames) for m in owner.values() if isinstance(m, MetricWrapperBase)}
    series: dict[str, frozenset[str]] = {}
    for family in registry.collect():
        assert family.name in labels, f"{family.name} is registered but not found among the metric objects"
        for name in sample_names(family.name, family.type):
            series[name] = labels[family.name] | ({"le"} if name.endswith("_bucket") else frozenset())
    return series


def exported() -> dict[str, frozenset[str]]:
    miner = MinerMetrics()
    series = exported_by(miner.registry, vars(miner))
    series |= exported_by(worker_metrics.REGISTRY, vars(worker_metrics))
    return series


def test_the_registries_are_read_whole() -> None:
    """The reading below sees the series Prometheus scrapes (a mistake here would pass every expression)."""
    series = exported()
    assert series["synth_fallbacks_total"] == {"reason"}
    assert series["synth_deadline_margin_seconds_bucket"] == {"prompt", "le"}
    assert series["synth_price_age_seconds"] == {"asset"}
    assert series["synth_worker_model_info"] == {"version", "engine"}
    assert "synth_requests" not in series and "synth_invalid_replies_total" in series


def test_every_rule_is_complete_and_says_why() -> None:
    """alert, expr, for, a severity and a summary and description an operator can act on; and above its expr a
    comment saying why its numbers are what they are."""
    text = (DEPLOY / "alerts.yml").read_text()
    doc = load("alerts.yml")
    assert set(doc) == {"groups"} and doc["groups"]
    names = []
    for group in doc["groups"]:
        assert group["name"] and group["rules"], group
        for rule in group["rules"]:
            name = rule.get("alert")
            assert name and set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert isinstance(rule["expr"], str) and rule["expr"].strip(), name
            assert DURATION.fullmatch(str(rule["for"])), (name, rule["for"])
            assert rule["labels"]["severity"] in SEVERITIES, name
            for field in ("summary", "description"):
                assert isinstance(rule["annotations"][field], str) and rule["annotations"][field].strip(), (name, field)
            expr = rule["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), name
            assert expr.count('"') % 2 == 0, name
            block = text.split(f"- alert: {name}\n", 1)[1].split("expr:", 1)[0]
            assert re.search(r"^\s*#", block, re.M), f"{name}: no comment on why before its expr"
            names.append(name)
    assert len(names) == len(set(names)), names


def check_selector(metric: str, body: str, series: dict[str, frozenset[str]], jobs: set[str]) -> None:
    matchers = [part for part in body.split(",") if part.strip()]
    allowed = TARGET_LABELS | series.get(metric, frozenset())
    assert metric == "up" or metric in series, f"{metric} is exported by neither the miner nor the workers"
    for part in matchers:
        match = MATCHER.fullmatch(part)
        assert match, f"{metric}{{{body}}}: cannot read {part!r}"
        label, op, value = match.groups()
        assert label in allowed, f"{metric} has no label {label!r} (it has {sorted(allowed)})"
        if label == "job":
            assert op == "=" and value in jobs, f"{metric}: job {value!r} is not scraped (jobs: {sorted(jobs)})"
        if label == "asset":
            unknown = set(value.split("|")) - set(ASSETS) if op in ("=~", "!~") else {value} - set(ASSETS)
            assert not unknown, f"{metric}: unknown assets {sorted(unknown)}"


@pytest.mark.parametrize("rule", rules(), ids=lambda rule: rule["alert"])
def test_every_metric_and_label_an_expression_uses_exists(rule: dict[str, Any]) -> None:
    series, jobs = exported(), set(scrape_jobs())
    expr = rule["expr"]
    names = set(SYNTH_METRIC.findall(expr))
    assert names or re.search(r"\bup\s*\{", expr), "the expression watches nothing of the fleet"
    unknown = names - set(series)
    assert not unknown, f"not exported: {sorted(unknown)} (counters end in _total, histograms in _bucket/_sum/_count)"
    for metric, body in SELECTOR.findall(expr):
        check_selector(metric, body, series, jobs)
    used = TARGET_LABELS.union(*(series[name] for name in names))
    for keyword, labels in GROUPING.findall(expr):
        for label in (x.strip() for x in labels.split(",") if x.strip()):
            assert label in used, f"{keyword} ({label}): no metric of the expression has that label"


def test_a_misnamed_metric_or_label_is_caught() -> None:
    """The checks above fail on what they are there for."""
    series, jobs = exported(), set(scrape_jobs())
    for metric, body in (("synth_fallbacks_total", 'cause="timeout"'), ("synth_fallback_total", 'reason="timeout"'),
                         ("up", 'job="synth-minr"'), ("synth_price_age_seconds", 'asset=~"BTC|DOGE"')):
        with pytest.raises(AssertionError):
            check_selector(metric, body, series, jobs)


def price_rules() -> list[tuple[frozenset[str], float, str]]:
    """(assets, age threshold, expr) of each rule on synth_price_age_seconds."""
    found = []
    for rule in rules():
        expr = rule["expr"]
        if "synth_price_age_seconds" not in expr:
            continue
        body = dict(SELECTOR.findall(expr))["synth_price_age_seconds"]
        match = MATCHER.fullmatch(body)
        threshold = THRESHOLD.search(expr)
        assert match and match[1] == "asset" and match[2] == "=~" and threshold, rule["alert"]
        found.append((frozenset(match[3].split("|")), float(threshold[1]), expr))
    return found


def test_the_stale_price_rules_cover_every_asset_by_how_it_trades() -> None:
    """Crypto trades every minute around the clock (and fills the 1 h prompt): the tightest threshold, at any
    hour. Gold, oil and the equities (thin perps outside the US session and at weekends): a tight threshold in
    the session only, and a loose one at any hour. A new asset in core/assets.py must be placed in them."""
    found = price_rules()
    crypto = frozenset(name for name, spec in ASSETS.items() if spec.market == "crypto")
    others = frozenset(ASSETS) - crypto
    assert {assets for assets, _, _ in found} == {crypto, others}, found
    crypto_limit = max(limit for assets, limit, _ in found if assets == crypto)
    other_limits = [(limit, "day_of_week()" in expr) for assets, limit, expr in found if assets == others]
    assert crypto_limit < min(limit for limit, _ in other_limits)
    assert sorted(in_session for _, in_session in other_limits) == [False, True], other_limits
    assert min(other_limits)[1], "the tighter threshold of the thin markets must hold in the session only"


def services() -> dict[str, dict[str, Any]]:
    spec: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    found: dict[str, dict[str, Any]] = spec["services"]
    return found


def test_the_scrape_targets_are_the_compose_services_and_their_metrics_ports() -> None:
    """The miner at its --metrics-port; every inference worker service at its SYNTH_WORKER_METRICS_PORT (a cpu
    worker serves none); each on a network Prometheus shares; the rules loaded from beside the config."""
    fleet, jobs = services(), scrape_jobs()
    miner = [str(arg) for arg in fleet["miner"]["command"]]
    assert jobs["synth-miner"] == {f"miner:{miner[miner.index('--metrics-port') + 1]}"}
    settings = Settings(_env_file=None)
    infer = {settings.queue_infer_hf, settings.queue_infer_lf}
    workers = {name: service for name, service in fleet.items() if service.get("command", [""])[0] == "worker"}
    inference = {name: service for name, service in workers.items()
                 if set(service["command"][service["command"].index("--queues") + 1].split(",")) & infer}
    assert inference and set(workers) - set(inference) == {"worker-cpu"}
    assert jobs["synth-workers"] == {f"{name}:{service['environment']['SYNTH_WORKER_METRICS_PORT']}"
                                     for name, service in inference.items()}
    assert set(jobs) == {"synth-miner", "synth-workers"}
    for name in ("miner", *inference):
        assert set(fleet[name]["networks"]) & set(fleet["prometheus"]["networks"]), name
    config = load("prometheus.yml")
    assert [DEPLOY / path for path in config["rule_files"]] == [DEPLOY / "alerts.yml"]


def test_the_commands_the_alerts_tell_operators_to_run_exist() -> None:
    group = typer.main.get_command(cli_app)
    assert isinstance(group, typer.core.TyperGroup)
    named = {m for rule in rules() for m in re.findall(r"`synth-miner ([a-z-]+)", rule["annotations"]["description"])}
    assert named, "no command named"
    with group.make_context("synth-miner", ["status"]) as ctx:
        for command in named:
            assert group.get_command(ctx, command) is not None, command


# --- the rules evaluated by Prometheus's own engine (promtool), where it is installed -----------------------

def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool not installed: Prometheus's own PromQL engine not run on alerts.yml (the structure, "
                    "metric, label, asset and target checks above did run); install Prometheus's promtool to run it")
    return found


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    """An input series of a promtool test: values one a minute ('0+1x30': 0, 1, ... 30; '5x10': 5 eleven times)."""
    return {"series": name + "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}", "values": values}


def fires(at: str, alert: str, *alerts: dict[str, str]) -> dict[str, Any]:
    """At ``at``, ``alert`` fires once per labels dict given (none given: it is quiet)."""
    return {"eval_time": at, "alertname": alert, "exp_alerts": [{"exp_labels": labels} for labels in alerts]}


MINER = {"job": "synth-miner", "instance": "miner:9100"}
WORKER = {"job": "synth-workers", "instance": "worker-gpu0:9101"}
WARN, CRIT = {"severity": "warning"}, {"severity": "critical"}
# Minute 0 is Thursday 1970-01-01 00:00 UTC: 16h is Thursday 16:00 (US session), 64h Saturday 16:00.
SCENARIOS: list[dict[str, Any]] = [
    {"name": "a frozen crypto feed, beside a live one", "input_series": [
        series("synth_price_age_seconds", "60+60x40", asset="BTC"),
        series("synth_price_age_seconds", "60x40", asset="ETH")],
     "alert_rule_test": [fires("12m", "SynthPricesStale"),  # over 300 s from minute 5, held 10 min
                         fires("20m", "SynthPricesStale", {**CRIT, "asset": "BTC"}),
                         fires("20m", "SynthPricesStaleOffHours")]},
    {"name": "a quiet equity: stale in the session only; a thin market frozen for hours", "input_series": [
        series("synth_price_age_seconds", "1200x4500", asset="NVDAX"),
        series("synth_price_age_seconds", "0+60x4500", asset="SPCX")],
     "alert_rule_test": [fires("16h", "SynthPricesStaleInSession", {**WARN, "asset": "NVDAX"},
                               {**WARN, "asset": "SPCX"}),
                         fires("26h", "SynthPricesStaleInSession"),  # Friday 02:00: night
                         fires("64h", "SynthPricesStaleInSession"),  # Saturday 16:00: weekend
                         fires("5h", "SynthPricesStaleOffHours"),
                         fires("7h", "SynthPricesStaleOffHours", {**WARN, "asset": "SPCX"}),
                         fires("64h", "SynthPricesStale")]},
    {"name": "a fleet answering, one fallback in ten (timeouts), validators refused and flooded", "input_series": [
        series("up", "1x30", **MINER),
        series("synth_requests_total", "0+9x30", asset="BTC", prompt="high", outcome="pool"),
        series("synth_requests_total", "0+1x30", asset="BTC", prompt="high", outcome="fallback"),
        series("synth_requests_total", "0+0.3x30", asset="ETH", prompt="low", outcome="no_price"),
        series("synth_requests_total", "0+0.05x30", asset="-", prompt="-", outcome="rate_limited"),
        series("synth_requests_total", "0+1000x30", asset="-", prompt="-", outcome="refused"),
        series("synth_fallbacks_total", "0+1x30", reason="timeout"),
        series("synth_fallbacks_total", "0x30", reason="no_worker")],
     "alert_rule_test": [fires("20m", "SynthFallbackShareHigh", {**WARN, "reason": "timeout"}),
                         fires("20m", "SynthFallbackAnswersMost"),
                         fires("20m", "SynthMinerNoAnswers"),
                         fires("20m", "SynthMinerDown"),
                         fires("20m", "SynthRequestsFailing", {**WARN, "outcome": "no_price"}),
                         fires("20m", "SynthRefusalFlood", WARN)]},
    {"name": "the model fleet gone: every answer from the fallback", "input_series": [
        series("synth_requests_total", "0+5x20", asset="BTC", prompt="high", outcome="fallback"),
        series("synth_fallbacks_total", "0+5x20", reason="no_worker")],
     "alert_rule_test": [fires("12m", "SynthFallbackAnswersMost", CRIT),
                         fires("20m", "SynthFallbackShareHigh", {**WARN, "reason": "no_worker"})]},
    {"name": "a miner down, then one up that nobody asks", "input_series": [
        series("up", "0x10 1x30", **MINER)],
     "alert_rule_test": [fires("5m", "SynthMinerDown", {**CRIT, **MINER}),
                         fires("20m", "SynthMinerDown"),
                         fires("20m", "SynthMinerNoAnswers", CRIT)]},
    {"name": "the first lost worker and the first invalid reply after a restart (series exported at 0)",
     "input_series": [
        series("synth_lost_forecasts_total", "0 0 0 0 1 1 1", answered_by="fallback"),
        series("synth_lost_forecasts_total", "0x6", answered_by="resent"),
        series("synth_invalid_replies_total", "0 0 0 0 1 1 1"),
        series("synth_expired_tasks", "0 0 0 0 2 2 2", queue="cpu"),
        series("synth_expired_tasks", "3x6", queue="infer.hf")],
     "alert_rule_test": [fires("3m", "SynthForecastWorkerLost"), fires("3m", "SynthInvalidReply"),
                         fires("3m", "SynthTasksExpiring"),
                         fires("5m", "SynthForecastWorkerLost", {**WARN, "answered_by": "fallback"}),
                         fires("5m", "SynthInvalidReply", CRIT),
                         fires("5m", "SynthTasksExpiring", {**WARN, "queue": "cpu"})]},
    {"name": "1 h answers near the deadline, 24 h ones in time", "input_series": [
        series("synth_deadline_margin_seconds_bucket", "0x20", prompt="high", le="2"),
        series("synth_deadline_margin_seconds_bucket", "0+10x20", prompt="high", le="5"),
        series("synth_deadline_margin_seconds_bucket", "0+100x20", prompt="high", le="10"),
        series("synth_deadline_margin_seconds_bucket", "0+100x20", prompt="high", le="+Inf"),
        series("synth_deadline_margin_seconds_bucket", "0x20", prompt="low", le="20"),
        series("synth_deadline_margin_seconds_bucket", "0+100x20", prompt="low", le="40"),
        series("synth_deadline_margin_seconds_bucket", "0+100x20", prompt="low", le="+Inf")],
     "alert_rule_test": [fires("15m", "SynthDeadlineMarginLow", {**WARN, "prompt": "high"})]},
    {"name": "a queue nobody reads, and the workers' model standing aside", "input_series": [
        series("synth_queue_depth", "12x10", queue="infer.lf"),
        series("synth_queue_depth", "0x10", queue="infer.hf"),
        series("synth_answers_by_engine_total", "0+3x40", prompt="high", source="pool", engine="ewma_t"),
        series("synth_answers_by_engine_total", "0+7x40", prompt="high", source="pool", engine="patchtst")],
     "alert_rule_test": [fires("6m", "SynthQueueBacklog", {**WARN, "queue": "infer.lf"}),
                         fires("40m", "SynthModelStandingIn", WARN)]},
    {"name": "a worker down and no worker metrics, then a worker serving", "input_series": [
        series("up", "0x12 1x10", **WORKER),
        series("synth_worker_model_info", "_x12 1x10", version="v1", engine="patchtst")],
     "alert_rule_test": [fires("11m", "SynthWorkerDown", {**WARN, **WORKER}),
                         fires("11m", "SynthWorkerMetricsAbsent", WARN),
                         fires("20m", "SynthWorkerDown"), fires("20m", "SynthWorkerMetricsAbsent")]},
]


def test_every_rule_has_a_scenario_that_fires_it() -> None:
    fired = {test["alertname"] for scenario in SCENARIOS for test in scenario["alert_rule_test"] if test["exp_alerts"]}
    assert fired == {rule["alert"] for rule in rules()}


def test_promtool_accepts_the_rules_and_the_config() -> None:
    tool = promtool()
    for args in (["check", "rules", str(DEPLOY / "alerts.yml")], ["check", "config", str(DEPLOY / "prometheus.yml")]):
        result = subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (args, result.stdout, result.stderr)


def test_the_rules_fire_on_each_fault_and_stay_quiet_without_one(tmp_path: Path) -> None:
    """Each rule, on series as the miner and workers export them, fires (labels and severity) where it should,
    after its `for`, and not before, off hours or beside a healthy series. promtool compares annotations whole:
    they are left out of the copy tested here (what is tested is when the rules fire)."""
    tool = promtool()
    doc = load("alerts.yml")
    for group in doc["groups"]:
        for rule in group["rules"]:
            del rule["annotations"]
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(doc))
    tests = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m",
             "tests": [{"interval": "1m", **scenario} for scenario in SCENARIOS]}
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run([tool, "test", "rules", str(tmp_path / "alerts_test.yml")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
