"""The weekly retraining job trains from the durable history store, before a held-back tail on which
the retrained model must not lose to the served one to be published."""

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from core.artifact_files import DataWindow
from core.artifacts import ArtifactStore
from core.champion import COMMITTED_MODELS
from core.checkpoint import load
from core.csv_history import read_csv
from core.history_store import HistoryStore
from core.prices import PriceHistory
from core.retraining import ResampledStore, gate_cases, run_gate, run_retrain_job
from core.settings import Settings
from core.training import REFIT_DEFAULT, REFIT_HALF_LIFE_DAYS, TrainOptions
from synth_miner.cli_model import app

TINY = {"d_model": 16, "n_heads": 2, "n_layers": 1, "d_ff": 32, "head_hidden": 16}


def test_stored_5_minute_bars_and_later_1_minute_bars_are_read_together(tmp_path: Path, shared_data: Path) -> None:
    """`data import` stores 5-minute files; the live refresh then adds 1-minute bars only. The 24 h models must
    see both: the imported past and the live weeks after it (a native bar wins where both exist)."""
    cut = json.loads((shared_data / "manifest.json").read_text())["btc_1m"]["eval_start_ts"]
    minutes = read_csv(shared_data / "btc_1m.csv.gz", 60).between(cut - 4 * 86_400, cut)
    store = HistoryStore(tmp_path / "history")
    imported = minutes.between(cut - 4 * 86_400, cut - 2 * 86_400).resample(300)
    store.append("BTC", imported)  # the imported 5-minute file ends two days before the cut
    store.append("BTC", minutes.between(cut - 2 * 86_400 - 3600, cut))  # live 1-minute bars, an hour of overlap
    read = ResampledStore(store).read("BTC", 300, cut - 4 * 86_400, cut)
    assert read.first_ts == imported.first_ts and read.last_ts == cut - 300  # the live days are there too
    assert len(read) == 4 * 288
    overlap = read.between(cut - 2 * 86_400 - 3600, cut - 2 * 86_400)
    assert len(overlap) == 12 and (overlap.close == imported.between(cut - 2 * 86_400 - 3600, cut).close).all()


def test_retrain_from_store_stages_checkpoints(tmp_path: Path, shared_data: Path) -> None:
    manifest = json.loads((shared_data / "manifest.json").read_text())
    store = HistoryStore(tmp_path / "data" / "history")
    cut = manifest["btc_1m"]["eval_start_ts"]  # gap-free Binance spot before it
    # Only pre-held-out rows enter the store, 1-minute bars only (as live providers deliver).
    btc = read_csv(shared_data / "btc_1m.csv.gz", 60).between(cut - 12 * 86_400, cut)
    store.append("BTC", btc)
    # The crypto models' other assets too (a model trained without them is not published): BTC's bars rescaled.
    for asset, factor in (("ETH", 0.03), ("SOL", 0.002), ("XAU", 0.04)):
        store.append(asset, PriceHistory(60, btc.ts, btc.close * factor))
    assert len(ResampledStore(store).read("BTC", 300, cut - 86_400, cut)) == 288  # 5-minute bars from 1-minute
    settings = fewer_gate_cases(Settings(data_dir=tmp_path / "data", artifacts_dir=tmp_path / "artifacts",
                                         retrain_days=12, retrain_gate_days=1.5, retrain_gate_paths=100))
    options = TrainOptions(epochs=1, batch_size=32, batches_per_epoch=4, val_prompts=4, n_paths=100,
                           stride_s=3600, arch=dict(TINY), val_frac=0.3)
    report = run_retrain_job(settings, now=cut, options=options)
    staged = Path(report["staged"])
    assert report["models"]["lf_equity"].startswith("skipped")  # no equity history in this store
    for kind in ("hf", "lf_crypto"):
        assert isinstance(report["models"][kind], dict), report["models"][kind]
        checkpoint, _ = load(staged / f"{kind}.pt", expected_kind=kind)
        # The 24 h model replays its recipe on every window after selection; the 1 h model does not.
        assert report["models"][kind]["best"]["refit"] == REFIT_DEFAULT[kind] == bool(checkpoint.metrics.get("refit"))
        if REFIT_DEFAULT[kind]:  # and leans on recent windows as the model's default says
            half_life = REFIT_HALF_LIFE_DAYS[kind]
            assert report["models"][kind]["best"]["refit_half_life_days"] == half_life == checkpoint.metrics[
                "refit_half_life_days"]
    # The gate: training stopped 1.5 days before now; the newest prompts after that decide.
    assert report["trained_to"] == cut - 36 * 3600
    artifacts = ArtifactStore.from_settings(settings)
    for kind in ("hf", "lf_crypto"):
        gate = report["models"][kind]["gate"]
        cases = gate_cases(settings, store, kind, cut)
        assert gate["cases"] == len(cases) > 0 and min(c.prompt.start_ts for c in cases) >= report["trained_to"]
        assert gate["challenger_crps"] > 0 and gate["champion_crps"] > 0
        assert gate["promote"] == (gate["challenger_crps"] <= gate["champion_crps"])
        # Publishing is on (the default): a model that does not lose is served, one that loses is not.
        assert bool(gate["published"]) == gate["promote"], gate
        if gate["promote"]:  # served from the artifact now, byte for byte what was trained
            assert (artifacts.versions_dir / gate["published"] / f"{kind}.pt").read_bytes() == (
                staged / f"{kind}.pt").read_bytes()
        else:  # kept in staging with the verdict; nothing served changed
            assert Path(gate["staged"], f"{kind}.pt").read_bytes() == (staged / f"{kind}.pt").read_bytes()
    assert report["models"]["hf"]["gate"]["champion"] == COMMITTED_MODELS  # the first model faces the committed one


def test_retrain_command_says_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNTH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SYNTH_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    runner = CliRunner()
    empty = runner.invoke(app, ["retrain", "--at", "2026-05-01T00:00"])
    assert empty.exit_code == 1, empty.output
    said = " ".join(empty.output.split())  # rich wraps lines
    assert "nothing retrained" in said and "no usable history before the gate" in said
    short = runner.invoke(app, ["retrain", "--gate-days", "0.5"])
    assert short.exit_code == 2 and "SYNTH_RETRAIN_GATE_DAYS" in " ".join(short.output.split())
    assert not (tmp_path / "artifacts" / "current").exists()  # nothing was published
    assert {c.name for c in app.registered_commands} >= {"train", "retrain"}


def test_retrain_at_runs_as_if_it_were_that_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`retrain --at` (a store of old history, e.g. ../shared/data imported): the training stops a gate
    before that time, not before now, and the staged models are named by it."""
    monkeypatch.setenv("SYNTH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SYNTH_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    result = CliRunner().invoke(app, ["retrain", "--at", "2026-05-01T00:00", "--gate-days", "1.5", "--json"])
    assert result.exit_code == 1, result.output  # an empty store: nothing retrained
    report, _ = json.JSONDecoder().raw_decode(result.output)
    assert report["trained_to"] == 1_777_593_600 - 36 * 3600  # 2026-05-01T00:00Z less the 1.5-day gate
    assert re.fullmatch(r"models-20260501T0000-[0-9a-f]{6}", Path(report["staged"]).name)


def test_two_retrains_in_the_same_minute_stage_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`synth-miner retrain` and the beat's weekly run in the same minute: each saves its checkpoints in its
    own folder (one folder per minute let the later run's models overwrite the other's before its gate)."""
    monkeypatch.setenv("SYNTH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SYNTH_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    now = 1_777_593_600
    first, second = (run_retrain_job(Settings(), now=now + s) for s in (0, 30))
    assert first["staged"] != second["staged"]
    assert all(Path(r["staged"]).name.startswith("models-20260501T0000-") for r in (first, second))


def btc_gate_setup(tmp_path: Path, shared_data: Path) -> tuple[int, HistoryStore, Settings, ArtifactStore]:
    """A store holding BTC's 4 pre-cut days of 1-minute bars, settings with a 1.1-day gate, an empty artifact store."""
    cut = json.loads((shared_data / "manifest.json").read_text())["btc_1m"]["eval_start_ts"]
    store = HistoryStore(tmp_path / "data" / "history")
    store.append("BTC", read_csv(shared_data / "btc_1m.csv.gz", 60).between(cut - 4 * 86_400, cut))
    settings = Settings(data_dir=tmp_path / "data", artifacts_dir=tmp_path / "artifacts", retrain_gate_days=1.1,
                        retrain_gate_paths=50)
    return int(cut), store, settings, ArtifactStore.from_settings(settings)


def test_the_gate_reports_every_outcome_and_publishes_only_a_model_that_does_not_lose(
        tmp_path: Path, shared_data: Path) -> None:
    cut, store, settings, artifacts = btc_gate_setup(tmp_path, shared_data)
    trained = DataWindow(cut - 4 * 86_400, cut - 95_040)
    committed = settings.models_dir / "hf.pt"  # "retrained" into the committed weights: a tie, not a loss
    garbage = tmp_path / "garbage" / "hf.pt"
    garbage.parent.mkdir()
    garbage.write_bytes(b"not a checkpoint")

    failed = run_gate(settings, artifacts, store, "hf", garbage, trained, cut)
    assert failed["published"] is None and failed["reason"].startswith("gate failed") and "hf.pt" in failed["reason"]
    held = run_gate(settings.model_copy(update={"retrain_publish": False}), artifacts, store, "hf", committed,
                    trained, cut)
    assert held["promote"] and held["published"] is None and "not published" in held["reason"]
    assert Path(held["staged"], "hf.pt").read_bytes() == committed.read_bytes()
    assert artifacts.current_version() is None
    first = run_gate(settings, artifacts, store, "hf", committed, trained, cut)
    assert first["cases"] == 101 and first["champion"] == COMMITTED_MODELS
    assert first["challenger_crps"] == first["champion_crps"] and first["published"] == artifacts.current_version()
    assert artifacts.load_current().manifest.data_window == trained
    second = run_gate(settings, artifacts, store, "hf", committed, trained, cut)
    assert second["champion"] == first["published"] and second["published"] == artifacts.current_version()


def test_a_corrupt_store_partition_skips_the_model_instead_of_stopping_the_job(tmp_path: Path,
                                                                               shared_data: Path) -> None:
    cut = json.loads((shared_data / "manifest.json").read_text())["btc_1m"]["eval_start_ts"]
    store = HistoryStore(tmp_path / "data" / "history")
    store.append("BTC", read_csv(shared_data / "btc_1m.csv.gz", 60).between(cut - 3 * 86_400, cut))
    store.partition("BTC", 60, (cut - 2 * 86_400) // 86_400).write_bytes(b"torn write")  # fails its header/CRC
    settings = Settings(data_dir=tmp_path / "data", artifacts_dir=tmp_path / "artifacts", retrain_days=2,
                        retrain_gate_days=1.1, retrain_gate_paths=50)
    report = run_retrain_job(settings, now=cut, options=TrainOptions(epochs=1, arch=dict(TINY)))
    for kind in ("hf", "lf_crypto"):  # both read BTC's 1-minute bars; lf_equity has no history at all
        assert report["models"][kind].startswith("skipped: history store unreadable"), report["models"][kind]
    assert report["models"]["lf_equity"].startswith("skipped")
    artifacts = ArtifactStore.from_settings(settings)
    gate = run_gate(settings, artifacts, store, "hf", settings.models_dir / "hf.pt",
                    DataWindow(cut - 3 * 86_400, cut - 95_040), cut)
    assert gate["published"] is None and gate["reason"].startswith("gate failed: history store unreadable")
    assert artifacts.current_version() is None


def test_a_gate_never_publishes_over_a_calibration_published_while_it_ran(tmp_path: Path, shared_data: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The staged set inherits the calibration current when it was staged. If the hourly calibration
    publishes before the gate loads its champion, the gate compares against (and would publish over) a set
    its challenger was not built on: the calibration just published would be silently reverted."""
    from core.calibration import CALIBRATION_FILE, CalibrationState, Entry

    cut, store, settings, artifacts = btc_gate_setup(tmp_path, shared_data)
    calibrated = CalibrationState({"ewma_t:BTC:60": Entry("ewma_t", "BTC", 60, scale=1.2)}).to_json()
    stage = artifacts.stage

    def stage_then_calibration_publishes(files: dict[str, bytes], **kwargs: Any) -> Path:
        staged = stage(files, **kwargs)
        if (kwargs.get("notes") or {}).get("kind") == "models":  # the gate's set: calibration publishes now
            artifacts.publish(stage({CALIBRATION_FILE: calibrated}, inherit=True, version="calibration-new"))
        return staged

    monkeypatch.setattr(artifacts, "stage", stage_then_calibration_publishes)
    gate = run_gate(settings, artifacts, store, "hf", settings.models_dir / "hf.pt",
                    DataWindow(cut - 4 * 86_400, cut - 95_040), cut)
    assert gate["published"] is None, gate  # not published over a champion it was not staged on
    assert artifacts.current_version() == "calibration-new"
    assert (artifacts.versions_dir / "calibration-new" / CALIBRATION_FILE).read_bytes() == calibrated


def fewer_gate_cases(settings: Settings) -> Settings:
    """One gate prompt every 1.5 h of the 1.1-day tail (16, not 101): the verdicts, faster. The floor on prompts
    per asset is met by them (it is tested on its own below)."""
    return settings.model_copy(update={"calibration_spacing_hf_s": 5400, "retrain_gate_min_prompts": 2})


def test_a_retrained_model_that_loses_the_gate_is_staged_not_published(tmp_path: Path, shared_data: Path) -> None:
    """The gate's whole point: a retrained model worse than the one serving stays in staging with the verdict;
    the served set (here: none yet, the committed models) is left as it is."""
    from tests.model_fixtures import write_checkpoints

    cut, store, settings, artifacts = btc_gate_setup(tmp_path, shared_data)
    random_head = write_checkpoints(tmp_path / "random", ("hf",), perturb=0.3) / "hf.pt"
    gate = run_gate(fewer_gate_cases(settings), artifacts, store, "hf", random_head,
                    DataWindow(cut - 4 * 86_400, cut - 95_040), cut)
    assert gate["cases"] == 16 and gate["champion"] == COMMITTED_MODELS, gate
    assert not gate["promote"] and gate["challenger_crps"] > gate["champion_crps"], gate
    assert gate["published"] is None and artifacts.current_version() is None
    assert Path(gate["staged"], "hf.pt").read_bytes() == random_head.read_bytes()


def test_a_gate_never_publishes_over_a_calibration_published_after_its_comparison(
        tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hourly calibration may publish after the gate compared its model with the served set but before it
    publishes: the publish must still be over the set the model was staged on, or it reverts the calibration."""
    from core.calibration import CALIBRATION_FILE, CalibrationState, Entry

    cut, store, settings, artifacts = btc_gate_setup(tmp_path, shared_data)
    calibrated = CalibrationState({"ewma_t:BTC:60": Entry("ewma_t", "BTC", 60, scale=1.2)}).to_json()
    publish = artifacts.publish

    def calibration_publishes_first(staging: Path, **kwargs: Any) -> str:
        if artifacts.current_version() is None:  # the gate's publish: the calibration gets there first
            publish(artifacts.stage({CALIBRATION_FILE: calibrated}, inherit=True, version="calibration-new"))
        return publish(staging, **kwargs)

    monkeypatch.setattr(artifacts, "publish", calibration_publishes_first)
    gate = run_gate(fewer_gate_cases(settings), artifacts, store, "hf", settings.models_dir / "hf.pt",
                    DataWindow(cut - 4 * 86_400, cut - 95_040), cut)
    assert gate["promote"] and gate["published"] is None and "not published" in gate["reason"], gate
    assert artifacts.current_version() == "calibration-new"
    assert (artifacts.versions_dir / "calibration-new" / CALIBRATION_FILE).read_bytes() == calibrated


def test_a_model_trained_without_some_of_its_assets_is_not_published(tmp_path: Path, shared_data: Path) -> None:
    """A young store holding BTC alone: the 1 h model trained on it won the gate (BTC prompts only) and was
    published, so ETH, SOL and XAU were served by a model that never saw them (their embedding rows untrained)
    and was never scored on them. It is now kept in staging with the reason; the committed model serves on."""
    cut = json.loads((shared_data / "manifest.json").read_text())["btc_1m"]["eval_start_ts"]
    store = HistoryStore(tmp_path / "data" / "history", durable=False)
    store.append("BTC", read_csv(shared_data / "btc_1m.csv.gz", 60).between(cut - int(2.7 * 86_400), cut))
    settings = fewer_gate_cases(Settings(data_dir=tmp_path / "data", artifacts_dir=tmp_path / "artifacts",
                                         retrain_gate_days=1.1, retrain_gate_paths=50))
    options = TrainOptions(epochs=1, batch_size=32, batches_per_epoch=4, val_prompts=4, n_paths=100,
                           stride_s=3600, arch=dict(TINY), val_frac=0.3)
    report = run_retrain_job(settings, now=cut, options=options)
    hf = report["models"]["hf"]
    assert isinstance(hf, dict), hf  # trained: 1.6 days of BTC before the gate give it windows
    assert hf["gate"]["published"] is None and hf["gate"]["cases"] == 0, hf["gate"]
    assert "ETH, SOL, XAU" in hf["gate"]["reason"] and "untrained" in hf["gate"]["reason"]
    artifacts = ArtifactStore.from_settings(settings)
    assert artifacts.current_version() is None  # nothing published: the committed models serve on
    assert [p.name for p in artifacts.staging_dir.iterdir()] == [Path(report["staged"]).name]  # no staged set
    checkpoint, _ = load(Path(report["staged"]) / "hf.pt", expected_kind="hf")  # kept for inspection
    assert checkpoint.data_window["BTC"]["train_windows"] > 0


def test_a_gate_longer_than_the_history_says_so_instead_of_an_empty_store(tmp_path: Path, shared_data: Path) -> None:
    """Three days in the store and a five-day gate: every model was reported "skipped: no history in the store"
    (status showed it so) while the store held three days; the report now says the history is all in the tail."""
    cut = json.loads((shared_data / "manifest.json").read_text())["btc_1m"]["eval_start_ts"]
    store = HistoryStore(tmp_path / "data" / "history", durable=False)
    store.append("BTC", read_csv(shared_data / "btc_1m.csv.gz", 60).between(cut - 3 * 86_400, cut))
    settings = Settings(data_dir=tmp_path / "data", artifacts_dir=tmp_path / "artifacts", retrain_gate_days=5)
    report = run_retrain_job(settings, now=cut, options=TrainOptions(epochs=1, arch=dict(TINY)))
    assert report["trained_to"] == cut - 5 * 86_400
    for kind, bars in (("hf", "1-minute bars"), ("lf_crypto", "bars")):
        assert report["models"][kind] == (f"skipped: no {bars} in the store before 2026-05-20T00:00:00+00:00, "
                                          "5 days before now (the gate's held-back tail)"), report["models"][kind]
    artifacts = ArtifactStore.from_settings(settings)
    assert artifacts.current_version() is None and not artifacts.staging_dir.exists()  # nothing trained or staged


def four_asset_store(tmp_path: Path, shared_data: Path, stops: dict[str, int] | None = None,
                     gaps: dict[str, tuple[int, int]] | None = None, days: int = 4) -> tuple[int, HistoryStore]:
    """BTC's last pre-cut ``days`` of 1-minute bars, and ETH, SOL, XAU as BTC rescaled: the crypto models' assets.
    ``stops``: asset -> seconds before the cut its feed stopped; ``gaps``: asset -> a (start, end) hole."""
    cut = int(json.loads((shared_data / "manifest.json").read_text())["btc_1m"]["eval_start_ts"])
    store = HistoryStore(tmp_path / "data" / "history", durable=False)
    btc = read_csv(shared_data / "btc_1m.csv.gz", 60).between(cut - days * 86_400, cut)
    for asset, factor in (("BTC", 1.0), ("ETH", 0.03), ("SOL", 0.002), ("XAU", 0.04)):
        bars = btc.between(cut - days * 86_400, cut - (stops or {}).get(asset, 0))
        keep = np.ones(len(bars), bool)
        if asset in (gaps or {}):
            lo, hi = (gaps or {})[asset]
            keep = (bars.ts < lo) | (bars.ts >= hi)
        store.append(asset, PriceHistory(60, bars.ts[keep], bars.close[keep] * factor))
    return cut, store


def test_a_gate_on_too_few_prompts_per_asset_publishes_nothing_and_says_why(tmp_path: Path, shared_data: Path) -> None:
    """A 1.1-day gate leaves the 24 h models (gate days - 1) x 24 = 2 prompts per asset: the retrained model was
    published on 6 overlapping prompts, a coin toss. Under SYNTH_RETRAIN_GATE_MIN_PROMPTS per asset it is not,
    and the report says how many it had, how many it needs and which gate would give them."""
    cut, store = four_asset_store(tmp_path, shared_data)
    settings = Settings(data_dir=tmp_path / "data", artifacts_dir=tmp_path / "artifacts", retrain_gate_days=1.1,
                        retrain_gate_paths=50)
    artifacts = ArtifactStore.from_settings(settings)
    trained = DataWindow(cut - 4 * 86_400, cut - 95_040)
    committed = settings.models_dir / "lf_crypto.pt"  # a tie with the served model: published on any count
    gate = run_gate(settings, artifacts, store, "lf_crypto", committed, trained, cut)
    assert gate["prompts"] == {"BTC": 2, "ETH": 2, "SOL": 2, "XAU": 2} and gate["published"] is None, gate
    assert gate["reason"] == ("not gated: too few gate prompts (BTC 2, ETH 2, SOL 2, XAU 2; 24 needed per asset, "
                              "SYNTH_RETRAIN_GATE_MIN_PROMPTS): a 1.1-day gate holds at most 2 per asset for "
                              "lf_crypto; SYNTH_RETRAIN_GATE_DAYS >= 2.01 gives 24"), gate["reason"]
    assert artifacts.current_version() is None and not artifacts.staging_dir.exists()  # nothing staged or served
    assert len(gate_cases(settings.model_copy(update={"retrain_gate_days": 2.01}), store, "lf_crypto", cut)) \
        == 4 * 24  # the gate the report names gives the floor
    enough = run_gate(settings.model_copy(update={"retrain_gate_min_prompts": 2}), artifacts, store, "lf_crypto",
                      committed, trained, cut)
    assert enough["cases"] == 8 and enough["promote"] and enough["published"] == artifacts.current_version(), enough


def test_an_asset_whose_feed_stopped_is_reported_not_gated_and_the_others_decide(tmp_path: Path,
                                                                                 shared_data: Path) -> None:
    """XAU's feed stopped two days ago: the gate had no XAU prompt, and the report said nothing of it (the
    retrained model went on to serve XAU, never scored on it). It is now named, with when its feed stopped, and
    the others decide. An asset short of prompts whose feed runs (a hole in the tail) blocks the model instead."""
    cut, store = four_asset_store(tmp_path, shared_data, stops={"XAU": 2 * 86_400},
                                  gaps={"SOL": (cut_of(shared_data) - 20 * 3600, cut_of(shared_data) - 2 * 3600)})
    settings = fewer_gate_cases(Settings(data_dir=tmp_path / "data", artifacts_dir=tmp_path / "artifacts",
                                         retrain_gate_days=1.1, retrain_gate_paths=50))
    settings = settings.model_copy(update={"retrain_gate_min_prompts": 12})
    artifacts = ArtifactStore.from_settings(settings)
    trained = DataWindow(cut - 4 * 86_400, cut - 95_040)
    blocked = run_gate(settings, artifacts, store, "hf", settings.models_dir / "hf.pt", trained, cut)
    assert blocked["prompts"]["XAU"] == 0 and blocked["prompts"]["BTC"] == 16 and blocked["prompts"]["SOL"] < 12
    assert blocked["published"] is None and artifacts.current_version() is None, blocked
    assert f"(SOL {blocked['prompts']['SOL']}; 12 needed" in blocked["reason"], blocked["reason"]
    assert "gaps or market closures in the held-back tail" in blocked["reason"]
    stopped = "feed stopped since 2026-05-23T00:00:00+00:00, 0 gate prompts"
    assert blocked["not_gated"] == {"XAU": stopped}

    cut, store = four_asset_store(tmp_path / "no-hole", shared_data, stops={"XAU": 2 * 86_400})
    gate = run_gate(settings, artifacts, store, "hf", settings.models_dir / "hf.pt", trained, cut)
    assert gate["prompts"] == {"BTC": 16, "ETH": 16, "SOL": 16, "XAU": 0} and gate["cases"] == 48, gate
    assert gate["promote"] and gate["published"] == artifacts.current_version(), gate
    assert gate["not_gated"] == {"XAU": stopped} and gate["reason"].endswith(f"; not gated: XAU ({stopped})")


def test_the_few_gate_prompts_of_a_stopped_feed_are_left_out_of_the_verdict(tmp_path: Path,
                                                                         shared_data: Path) -> None:
    """XAU's feed stopped 16 h before the gate's end, inside its 1.1-day tail: it has a few prompts, under the floor,
    and is reported not gated with them. The verdict is the others' alone: prompts of an asset the report calls
    not gated must not weigh in it."""
    cut, store = four_asset_store(tmp_path, shared_data, stops={"XAU": 16 * 3600})
    settings = fewer_gate_cases(Settings(data_dir=tmp_path / "data", artifacts_dir=tmp_path / "artifacts",
                                         retrain_gate_days=1.1, retrain_gate_paths=50))
    settings = settings.model_copy(update={"retrain_gate_min_prompts": 12})
    artifacts = ArtifactStore.from_settings(settings)
    gate = run_gate(settings, artifacts, store, "hf", settings.models_dir / "hf.pt",
                    DataWindow(cut - 4 * 86_400, cut - 95_040), cut)
    xau = gate["prompts"]["XAU"]
    assert 0 < xau < 12 and gate["not_gated"] == {"XAU": f"feed stopped since 2026-05-24T08:00:00+00:00, {xau} gate "
                                                         "prompts"}, gate
    assert gate["cases"] == 48, gate  # BTC, ETH and SOL's 16 each, none of XAU's


def cut_of(shared_data: Path) -> int:
    return int(json.loads((shared_data / "manifest.json").read_text())["btc_1m"]["eval_start_ts"])


def test_a_checkpoint_the_disk_cannot_hold_is_reported_and_the_other_models_still_train(
        tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk at the first model's save raised OSError out of the whole job: the other models were never
    trained and the record named none. The model is now reported not saved, and the next ones go on."""
    import core.retraining

    cut, store = four_asset_store(tmp_path, shared_data, days=12)
    settings = Settings(data_dir=tmp_path / "data", artifacts_dir=tmp_path / "artifacts", retrain_gate_days=1.1,
                        retrain_gate_paths=50, retrain_gate_min_prompts=2)
    save = core.retraining.save

    def disk_full_for_hf(checkpoint: Any, path: Path) -> None:
        if path.name == "hf.pt":  # as ENOSPC reads from the real save (atomic: nothing is left behind)
            raise OSError(28, "No space left on device")
        save(checkpoint, path)

    monkeypatch.setattr(core.retraining, "save", disk_full_for_hf)
    options = TrainOptions(epochs=1, batch_size=32, batches_per_epoch=2, val_prompts=4, n_paths=50, stride_s=3600,
                           arch=dict(TINY), val_frac=0.3)
    report = run_retrain_job(settings, now=cut, options=options)
    assert report["models"]["hf"].startswith("skipped: checkpoint not saved in ") and "No space left" in \
        report["models"]["hf"], report["models"]["hf"]
    assert isinstance(report["models"]["lf_crypto"], dict) and (Path(report["staged"]) / "lf_crypto.pt").exists()
