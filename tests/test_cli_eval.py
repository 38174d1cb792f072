"""The evaluation CLI (synth_miner.cli_eval) through typer's CliRunner."""

import inspect
import json
from pathlib import Path

import orjson
import pytest
import typer
from typer.testing import CliRunner, Result

from core.csv_history import read_csv, write_csv
from core.evaluation import iso
from synth_miner.cli_eval import app, register

DAY = 86_400
SPAN = 1_772_323_200  # 2026-03-01


@pytest.fixture(scope="module")
def prices(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("prices")
    write_csv(folder / "btc_1m.csv.gz", read_csv(shared_data / "btc_1m.csv.gz", 60).between(SPAN, SPAN + 4 * DAY))
    return folder


def lines(*rows: dict[str, object]) -> bytes:
    return b"\n".join(orjson.dumps(r) for r in rows) + b"\n"


def req(rid: str, start: int, inc: int = 60, n: int = 20) -> dict[str, object]:
    return {"id": rid, "asset": "BTC", "start_time": iso(start), "time_increment": inc,
            "time_length": 3600 if inc == 60 else 86_400, "num_simulations": n}


def one_request(tmp_path: Path) -> Path:
    requests = tmp_path / "r.jsonl"
    requests.write_bytes(lines(req("a", SPAN + 2 * DAY)))
    return requests


def batch(requests: Path, prices: Path, out: Path, *options: str) -> Result:
    return CliRunner().invoke(app, ["forecast-batch", "--requests", str(requests), "--prices-dir", str(prices),
                                    "--out", str(out), *options])

def test_forecast_batch_writes_a_line_per_request(prices: Path, tmp_path: Path) -> None:
    requests = tmp_path / "r.jsonl"
    requests.write_bytes(lines(req("a", SPAN + 2 * DAY), req("b", SPAN + 2 * DAY + 60, 300), {"id": "bad"}))
    out = tmp_path / "o.jsonl"
    result = CliRunner().invoke(app, ["forecast-batch", "--requests", str(requests), "--prices-dir", str(prices),
                                      "--out", str(out), "--seed", "3", "--engine", "ewma_t", "--no-calibration"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "bad"]
    assert rows[0]["response"][:2] == [SPAN + 2 * DAY, 60] and len(rows[0]["response"]) == 22
    assert len(rows[1]["response"][2]) == 289 and "missing field" in rows[2]["error"]
    assert "3 requests: 2 answered, 1 errors" in result.output
    again = tmp_path / "o2.jsonl"
    CliRunner().invoke(app, ["forecast-batch", "--requests", str(requests), "--prices-dir", str(prices),
                             "--out", str(again), "--seed", "3", "--engine", "ewma_t", "--no-calibration"])
    assert again.read_bytes() == out.read_bytes()


def test_forecast_batch_refuses_unknown_engines_and_missing_inputs(prices: Path, tmp_path: Path) -> None:
    requests, out = one_request(tmp_path), tmp_path / "o.jsonl"
    bad_engine = batch(requests, prices, out, "--seed", "1", "--engine", "nope")
    assert bad_engine.exit_code == 2 and "unknown engine" in bad_engine.output
    assert batch(tmp_path / "absent.jsonl", prices, out, "--seed", "1").exit_code == 2
    no_seed = batch(requests, prices, out)
    assert no_seed.exit_code == 2 and "--seed" in no_seed.output
    assert batch(requests, prices, out, "--seed", "-5", "--engine", "ewma_t").exit_code == 2
    assert not out.exists()


def test_forecast_batch_refuses_a_prices_dir_without_price_files(tmp_path: Path) -> None:
    """A mistyped folder answered every request with an error line and exited 0."""
    empty = tmp_path / "prices"
    empty.mkdir()
    (empty / "notes.txt").write_text("not prices\n")
    out = tmp_path / "o.jsonl"
    result = batch(one_request(tmp_path), empty, out, "--seed", "1", "--engine", "ewma_t", "--no-calibration")
    assert result.exit_code == 2 and "holds no" in flat(result.output) and "--prices-dir" in result.output, result.output
    assert not out.exists()


def test_backtest_command_tiny_run(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "reports" / "tiny"
    result = CliRunner().invoke(app, ["backtest", "--data-dir", str(shared_data), "--out", str(out),
                                      "--engines", "gbm,ewma_t", "--lf-assets", "BTC", "--hf-assets", "SOL",
                                      "--max-prompts", "2", "--paths", "100", "--bootstrap", "100"])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "scores.json").read_text())
    assert len(doc["prompts"]) == 4 and doc["config"]["engines"] == ["gbm", "ewma_t"]
    assert {w["asset"] for w in doc["config"]["windows"]} == {"BTC", "SOL"}
    assert (out / "table.md").exists() and (out / "pit_1h.png").exists() and (out / "fan_BTC_24h.png").exists()
    assert "scored in" in result.output


def test_backtest_command_rejects_bad_options(shared_data: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    for args, fragment in ((["--rules", "latest"], "upstream or head"), (["--mode", "later"], "walkforward"),
                           (["--engines", "gbm,oracle"], "unknown engine"),
                           (["--mode", "range"], "range mode"), (["--bootstrap", "-1"], "--bootstrap")):
        result = runner.invoke(app, ["backtest", "--data-dir", str(shared_data), "--out", str(tmp_path / "x"),
                                     *args])
        assert result.exit_code == 2, (args, result.output)
        assert fragment in result.output


def test_backtest_and_tuning_refuse_assets_no_validator_asks_for(shared_data: Path, tmp_path: Path) -> None:
    """SPY has a price file, but validators ask for SPYX and SP500: it must not be scored as an asset."""
    runner = CliRunner()
    for command, option, name in (("backtest", "--lf-assets", "SPY"), ("backtest", "--hf-assets", "BTC,FOO"),
                                  ("tune-ewma", "--lf-assets", "SPY"), ("tune-ewma", "--hf-assets", "doge")):
        result = runner.invoke(app, [command, "--data-dir", str(shared_data), "--out", str(tmp_path / "x"),
                                     option, name])
        said = " ".join(result.output.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())
        assert result.exit_code == 2, (command, option, result.output)
        assert "unknown asset" in said and option in said and "SPYX" in said, said
        assert name.split(",")[-1].upper() in said
    assert not (tmp_path / "x").exists()


def test_tune_command_writes_its_report(shared_data: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["tune-ewma", "--data-dir", str(shared_data), "--out", str(tmp_path),
                                      "--lf-assets", "BTC", "--hf-assets", "BTC", "--days", "10",
                                      "--max-prompts", "4", "--paths", "50", "--final-paths", "0",
                                      "--params", "var_mult", "--passes", "1"])
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "tuning.json").read_text())
    assert set(doc["results"]) == {"300", "60"} and doc["prompts"]["300"]["fit"] == 3
    assert "EwmaConfig(" in result.output


def test_register_mounts_every_command() -> None:
    main = typer.Typer()
    register(main)
    names = {c.name for c in main.registered_commands}
    assert names == {"forecast-batch", "backtest", "tune-ewma"}


def test_forecast_batch_refuses_a_folder_as_output(prices: Path, tmp_path: Path) -> None:
    requests = one_request(tmp_path)
    folder = tmp_path / "out"
    folder.mkdir()
    into_folder = batch(requests, prices, folder, "--seed", "1", "--engine", "ewma_t", "--no-calibration")
    assert into_folder.exit_code == 2 and "--out" in into_folder.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.jsonl"]  # no .tmp left behind


def flat(output: str) -> str:
    """A usage error's text without rich's box and line breaks."""
    return " ".join(output.replace("\u2502", " ").split())


def test_forecast_batch_never_writes_over_its_requests_and_says_when_out_cannot_be_written(
        prices: Path, tmp_path: Path) -> None:
    requests = one_request(tmp_path)
    before = requests.read_bytes()
    for out in (requests, tmp_path / "." / "r.jsonl"):  # the output renamed over the input destroyed it
        over = batch(requests, prices, out, "--seed", "1", "--engine", "ewma_t", "--no-calibration")
        assert over.exit_code == 2 and "is the requests file" in flat(over.output), over.output
    assert requests.read_bytes() == before
    under_a_file = batch(requests, prices, requests / "x.jsonl", "--seed", "1", "--engine", "ewma_t")
    assert under_a_file.exit_code == 2 and "cannot create its folder" in flat(under_a_file.output)
    assert "Traceback" not in under_a_file.output and requests.read_bytes() == before


def test_forecast_batch_says_when_the_calibration_it_was_asked_for_is_missing(
        prices: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNTH_ARTIFACTS_DIR", str(tmp_path / "no-artifacts"))
    result = batch(one_request(tmp_path), prices, tmp_path / "o.jsonl", "--seed", "1", "--engine", "ewma_t")
    assert result.exit_code == 0 and "no published calibration" in " ".join(result.output.split())


@pytest.mark.parametrize("spacing", ["nan", "inf", "-inf"])
def test_a_spacing_that_is_not_a_number_of_hours_is_a_usage_error(shared_data: Path, tmp_path: Path,
                                                                   spacing: str) -> None:
    for command in ("backtest", "tune-ewma"):
        result = CliRunner().invoke(app, [command, "--data-dir", str(shared_data), "--out", str(tmp_path / "x"),
                                          "--lf-spacing-h", spacing])
        assert result.exit_code == 2, (command, spacing, result.output)
        assert "--lf-spacing-h" in result.output


@pytest.mark.parametrize("days", ["nan", "inf", "0", "-5"])
def test_days_that_are_not_a_number_of_days_are_a_usage_error(shared_data: Path, tmp_path: Path, days: str) -> None:
    """nan and inf were ValueError and OverflowError tracebacks; 0 and -5 skipped every window as empty."""
    for command in ("backtest", "tune-ewma"):
        result = CliRunner().invoke(app, [command, "--data-dir", str(shared_data), "--out", str(tmp_path / "x"),
                                          "--days", days])
        assert result.exit_code == 2 and "--days" in result.output, (command, days, result.output)
        assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("command", "option", "value"), [
    ("tune-ewma", "--paths", "0"), ("tune-ewma", "--final-paths", "-3"), ("tune-ewma", "--passes", "-1"),
    ("tune-ewma", "--max-prompts", "-2"), ("tune-ewma", "--max-prompts", "0"), ("backtest", "--max-prompts", "-2")])
def test_counts_below_their_least_are_a_usage_error(shared_data: Path, tmp_path: Path, command: str, option: str,
                                                    value: str) -> None:
    """--paths 0 and --final-paths -3 were SamplingError tracebacks, --max-prompts -2 a numpy ValueError;
    --max-prompts 0 wrote an empty tuning report and exited 0, --passes -1 ran as 0."""
    result = CliRunner().invoke(app, [command, "--data-dir", str(shared_data), "--out", str(tmp_path / "x"),
                                      option, value])
    assert result.exit_code == 2 and option in result.output, result.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("command", ["backtest", "tune-ewma"])
def test_an_out_that_cannot_be_written_is_refused_before_the_run(shared_data: Path, tmp_path: Path,
                                                                 command: str) -> None:
    """Written once the whole run (hours for a full backtest) was done: a traceback then, the run lost."""
    (tmp_path / "plain").write_text("a file")
    quick = ["--engines", "gbm", "--no-plots", "--bootstrap", "0"] if command == "backtest" else ["--passes", "0"]
    for out, said in ((tmp_path / "plain", "is a file"), (tmp_path / "plain" / "report", "cannot be written")):
        result = CliRunner().invoke(app, [command, "--data-dir", str(shared_data), "--out", str(out),
                                          "--max-prompts", "1", "--paths", "10", *quick])
        assert result.exit_code == 2 and said in flat(result.output) and "--out" in result.output, result.output
    assert (tmp_path / "plain").read_text() == "a file"


# "inf" passed the setting's "greater than 0" and crashed with an OverflowError traceback in int().
@pytest.mark.parametrize("value", ["many", "inf", "nan"])
def test_a_bad_setting_in_the_environment_is_a_usage_error(prices: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("SYNTH_BATCH_LOOKBACK_DAYS", value)
    result = batch(one_request(tmp_path), prices, tmp_path / "out.jsonl", "--seed", "1")
    assert result.exit_code == 2 and "SYNTH_BATCH_LOOKBACK_DAYS" in result.output, result.output
    assert not (tmp_path / "out.jsonl").exists()


def test_backtest_takes_models_and_calibration_from_one_version(shared_data: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A publish landing while `backtest --calibrated` builds its engines must not pair one version's
    models with the next version's calibration (what the batch interface already guarantees)."""
    import core.backtest
    import core.engines_registry
    from core.artifacts import ArtifactStore
    from core.calibration import CALIBRATION_FILE, CalibrationState, Entry
    from core.engines.base import Engine
    from core.forecast import ScaleLookup
    from core.settings import Settings

    artifacts = tmp_path / "artifacts"

    def publish(scale: float) -> str:
        store = ArtifactStore(artifacts)
        state = CalibrationState({"ewma_t:BTC:60": Entry("ewma_t", "BTC", 60, scale=scale)})
        return store.publish(store.stage({CALIBRATION_FILE: state.to_json()}))

    publish(1.5)
    real = core.engines_registry.engines_over
    later: list[str] = []

    def build_then_publish(settings: Settings, models_dir: Path | None) -> dict[str, Engine]:
        engines = real(settings, models_dir)
        if not later:
            later.append(publish(1.8))  # the hourly calibration lands meanwhile
        return engines

    used: list[ScaleLookup] = []
    signature = inspect.signature(core.backtest.run_backtest)

    def capture(*args: object, **kwargs: object) -> None:
        used.append(signature.bind(*args, **kwargs).arguments["scale"])
        raise typer.Exit(0)

    monkeypatch.setattr(core.engines_registry, "engines_over", build_then_publish)
    monkeypatch.setattr(core.backtest, "run_backtest", capture)
    monkeypatch.setenv("SYNTH_ARTIFACTS_DIR", str(artifacts))
    monkeypatch.setenv("SYNTH_CALIBRATION_ENGINE", "ewma_t")
    result = CliRunner().invoke(app, ["backtest", "--data-dir", str(shared_data), "--out", str(tmp_path / "x"),
                                      "--engines", "ewma_t", "--lf-assets", "BTC", "--hf-assets", "BTC",
                                      "--max-prompts", "1", "--calibrated"])
    assert result.exit_code == 0, result.output
    assert later and len(used) == 1
    assert used[0]("ewma_t", "BTC", 60) == 1.5


def test_backtest_refuses_zero_paths(shared_data: Path, tmp_path: Path) -> None:
    """typer has no lower bound on --paths: zero paths is refused in one line naming the option, before any
    prompt is planned or report written."""
    result = CliRunner().invoke(app, ["backtest", "--data-dir", str(shared_data), "--out", str(tmp_path / "x"),
                                      "--paths", "0", "--max-prompts", "1", "--no-plots", "--bootstrap", "0",
                                      "--engines", "gbm"])
    assert result.exit_code == 2 and "--paths" in result.output, result.output
    assert not (tmp_path / "x").exists()


def test_backtest_names_prompts_on_dates_a_model_was_fitted_on_and_pools_the_others(shared_data: Path,
                                                                                    tmp_path: Path) -> None:
    """ETH's held-out days are inside the days lf_crypto was fitted on for BTC (each file is split at its own
    boundary): the run says so, marks those prompts, and adds UNSEEN rows over the BTC prompts alone."""
    out = tmp_path / "r"
    result = CliRunner().invoke(app, ["backtest", "--data-dir", str(shared_data), "--out", str(out),
                                      "--engines", "ewma_t,patchtst", "--lf-assets", "BTC,ETH", "--hf-assets", "BTC",
                                      "--max-prompts", "2", "--paths", "50", "--bootstrap", "0", "--no-plots"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # rich wraps at the runner's 80 columns
    assert "patchtst lf_crypto: 2 of its 4 prompts (ETH) fall on dates it was fitted on for BTC" in said
    doc = json.loads((out / "scores.json").read_text())
    assert doc["config"]["seen_in_training"] == [] and len(doc["config"]["on_trained_dates"]) == 1
    dated = {(p["asset"], p["prompt"]) for p in doc["prompts"] if p["on_trained_dates"]}
    assert dated == {("ETH", "24h")}
    unseen = {(row["prompt"], row["engine"]): row["n"] for row in doc["summary"] if row["asset"] == "UNSEEN"}
    assert unseen == {(label, e): n for label, n in (("24h", 2), ("1h", 2), ("ALL", 4)) for e in ("ewma_t", "patchtst")}
    assert "| UNSEEN | 24h | patchtst |" in (out / "table.md").read_text()
