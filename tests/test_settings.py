"""Settings refuse values the miner cannot serve with, and the CLI says so in one line."""

from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import SettingsError
from typer.testing import CliRunner

from core.settings import InsecureRedisError, Settings, check_redis_url
from synth_miner.cli import app


@pytest.mark.parametrize("bad", [{"engine": "bogus"}, {"axon_port": 99_999}, {"log_level": "LOUD"},
                                 {"seed": -1}, {"calibration_engine": "nope"},
                                 # A rate limit of 0 refused every validator; a zero wait or budget no answer in time.
                                 {"rate_limit_per_minute": 0}, {"max_wait_s": 0}, {"fallback_budget_s": 0},
                                 {"reply_margin_s": -1}, {"max_num_simulations": 0}, {"beat_refresh_s": 0},
                                 {"refresh_lock_s": 0}, {"http_backoff_s": -0.1},
                                 # No beat ever became leader (Redis refuses a 0 ms lock); no history, every
                                 # price stale, or no request sent: each refused at start, not once running.
                                 {"beat_lock_ttl_s": 0}, {"cache_days_hf": 0}, {"cache_days_lf": -1},
                                 {"max_price_age_s": 0}, {"http_timeout_s": 0}, {"http_retries": -1},
                                 {"http_concurrency_per_host": 0},
                                 # keep 1 leaves no rollback target (the artifact store refuses it only when a
                                 # job first opens it); a zero lease lapses at once: a live job could run twice.
                                 {"artifacts_keep": 1}, {"job_lease_s": 0},
                                 # Slots are whole seconds: two sends within one second shared a slot, and
                                 # every other run was skipped as a duplicate.
                                 {"beat_refresh_s": 0.5}, {"beat_compact_s": 0.999},
                                 # A gate shorter than a day holds no 24 h prompt; one asking no prompt per asset
                                 # gates nothing.
                                 {"retrain_gate_days": 1.0}, {"retrain_gate_min_prompts": 0}])
def test_unservable_values_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Settings(_env_file=None, **bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "value"), [("SYNTH_BATCH_LOOKBACK_DAYS", "inf"), ("SYNTH_MAX_WAIT_S", "Infinity"),
                                             ("SYNTH_MIN_VALIDATOR_STAKE", "nan"), ("SYNTH_MIN_VALIDATOR_STAKE", "-inf")])
def test_inf_and_nan_are_refused_even_where_no_bound_would_catch_them(monkeypatch: pytest.MonkeyPatch, name: str,
                                                                       value: str) -> None:
    """Every float setting is a duration, a size or a limit: SYNTH_BATCH_LOOKBACK_DAYS=inf passed "greater than 0"
    and crashed later in int(), and a NaN stake (no bound at all) would compare false with every validator's."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name.removeprefix("SYNTH_").lower()):
        Settings(_env_file=None)  # type: ignore[call-arg]


def test_log_level_is_case_insensitive() -> None:
    assert Settings(_env_file=None, log_level="debug").log_level == "DEBUG"  # type: ignore[call-arg,arg-type]


def test_cli_turns_a_bad_setting_into_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNTH_ENGINE", "bogus")
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    # The variable the operator sets, not the field name ("engine: ..." matched neither it nor a flag).
    assert "SYNTH_ENGINE: Input should be 'patchtst', 'ewma_t' or 'gbm'" in " ".join(result.output.split()), \
        result.output


def test_a_bad_flag_names_the_variable_its_help_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """retrain --gate-days 1 read "retrain_gate_days: ..."; its help names SYNTH_RETRAIN_GATE_DAYS."""
    monkeypatch.delenv("SYNTH_RETRAIN_GATE_DAYS", raising=False)
    result = CliRunner().invoke(app, ["retrain", "--gate-days", "1"])
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "SYNTH_RETRAIN_GATE_DAYS: Input should be greater than 1.05" in text, text


@pytest.mark.parametrize("port", [80, 1024, 65_535])
def test_ports_bittensors_axon_refuses_are_refused_here(port: int) -> None:
    """bittensor's Axon asserts 1024 < port < 65535 (the external port too), after the models have loaded."""
    for field in ("axon_port", "axon_external_port"):
        with pytest.raises(ValidationError):
            Settings(_env_file=None, **{field: port})  # type: ignore[arg-type]
    edges = Settings(_env_file=None, axon_port=1025, axon_external_port=65_534)  # type: ignore[call-arg]
    assert (edges.axon_port, edges.axon_external_port) == (1025, 65_534)


def test_workers_and_beat_need_a_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SYNTH_REDIS_URL", raising=False)
    for command in ("worker", "beat"):
        result = CliRunner().invoke(app, [command])
        assert result.exit_code == 2 and "SYNTH_REDIS_URL" in result.output, result.output


def test_status_fails_when_the_fleet_cannot_be_read() -> None:
    down = CliRunner().invoke(app, ["status", "--redis-url", "redis://127.0.0.1:1/0"])
    assert down.exit_code == 1 and "redis" in down.output
    garbage = CliRunner().invoke(app, ["status", "--redis-url", "notaurl"])
    assert garbage.exit_code == 1 and "Traceback" not in garbage.output


@pytest.mark.parametrize(("name", "value"), [("SYNTH_ALLOWED_HOTKEYS", "5abc"),
                                             ("SYNTH_PROVIDER_OVERRIDES", "{XAU: pyth}")])
def test_a_setting_that_is_not_json_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                     name: str, value: str) -> None:
    """pydantic-settings raises its own SettingsError, not a ValidationError, for a list or dict variable
    that is not JSON: serve ended on a traceback."""
    monkeypatch.setattr("miner.runtime.serve", lambda *a, **k: pytest.fail("served"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(name, value)
    result = CliRunner().invoke(app, ["serve", "--local"])
    assert result.exit_code == 2 and not isinstance(result.exception, SettingsError), result.output
    field = name.removeprefix("SYNTH_").lower()
    assert f'error parsing value for field "{field}"' in result.output and "JSON" in result.output, result.output


@pytest.mark.parametrize("url", ["rediss//:s3cretpw@10.0.0.5/0", "redis://:s3cretpw@10.0.0.5:abc/0",
                                 "http://:s3cretpw@10.0.0.5:6380/0", "redis:/:s3cretpw@127.0.0.1/0"])
def test_a_malformed_redis_url_is_refused_without_its_password(url: str) -> None:
    """A typo in the scheme put the whole URL, password included, in the refusal printed at start."""
    with pytest.raises(InsecureRedisError, match="is not a Redis URL") as caught:
        check_redis_url(url)
    assert "s3cretpw" not in str(caught.value)


@pytest.mark.parametrize("url", ["redis://user:pw@x/y@10.0.0.5:6379/0", "redis://:Ab3?Zq@10.0.0.5:6379/0",
                                 "rediss://:Ab3#Zq@cache.internal/0", "redis://:12/Zq@10.0.0.5/0"])
def test_a_password_holding_slash_question_mark_or_hash_unencoded_is_refused(url: str) -> None:
    """The URL parser ends the host at the first '/', '?' or '#': "redis://user:pw@x/y@10.0.0.5" was taken as
    host "x" with password "pw", and the workers and miner went to the wrong place. Refused, quoting none of it."""
    with pytest.raises(InsecureRedisError, match="percent-encode") as caught:
        check_redis_url(url)
    assert "Zq" not in str(caught.value) and "pw" not in str(caught.value)
    check_redis_url(url.replace("/y@", "%2Fy@").replace("?Zq", "%3FZq").replace("#Zq", "%23Zq").replace("/Zq", "%2FZq"))


def test_ports_and_the_published_address_are_checked() -> None:
    """A host name as the external IP made bittensor drop the publication without a word, and a metrics
    port out of range stopped the miner only after it had said it was serving."""
    for bad in ({"metrics_port": 99_999}, {"axon_external_port": -1}, {"worker_metrics_port": 70_000},
                {"axon_external_ip": "miner.example.com"}):
        with pytest.raises(ValidationError):
            Settings(_env_file=None, **bad)  # type: ignore[arg-type]
    published = Settings(_env_file=None, axon_external_ip=" 203.0.113.7 ")  # type: ignore[call-arg]
    assert published.axon_external_ip == "203.0.113.7"
    assert Settings(_env_file=None, axon_external_ip="").axon_external_ip is None  # type: ignore[call-arg]


def test_port_zero_still_means_off_and_results_must_live() -> None:
    """0 turned metrics off and meant "the axon's own port" before the ports were range-checked."""
    settings = Settings(_env_file=None, metrics_port=0, worker_metrics_port="0", axon_external_port=0)  # type: ignore[arg-type]
    assert settings.metrics_port is None and settings.worker_metrics_port is None
    assert settings.axon_external_port is None
    with pytest.raises(ValidationError):
        Settings(_env_file=None, result_ttl_s=0)  # type: ignore[call-arg]


def test_only_a_password_in_the_query_makes_an_outside_redis_acceptable() -> None:
    """A query string with other options (TLS, timeouts) is not a password: such an open Redis beyond this
    host must still be refused at start."""
    for url in ("redis://10.0.0.7:6379/0?socket_timeout=5", "rediss://cache.internal/0?ssl_cert_reqs=none"):
        with pytest.raises(InsecureRedisError, match="no password"):
            check_redis_url(url)
    check_redis_url("redis://10.0.0.7:6379/0?password=s3cret")
